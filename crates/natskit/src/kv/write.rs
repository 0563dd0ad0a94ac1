//! The decisions of one exactly-once KV write, as a pure state machine.
//!
//! A write is a JetStream publish with a unique `Nats-Msg-Id`, resent with
//! the same id until its outcome is known. [`WriteCore`] takes what each
//! send came to ([`Sent`]) and what a read of the stream found
//! ([`Resolution`]), with the time as an argument, and says what to do next
//! ([`Next`]); the async shell in `kv/mod.rs` does the sends, reads, waits
//! and error values.
//!
//! - Resends stop at the *soft* deadline (the operation's timeout) while no
//!   send can have been applied unheard.
//! - Once a send may have been applied without its ack being heard (no ack,
//!   a dropped connection, a timeout or no leader), the write is
//!   *uncertain*: resending goes on until the *hard* deadline (one more
//!   timeout, less a tenth kept for the last read), and then the stream is
//!   read once to learn the outcome; only an outcome still unknown is a
//!   timeout.
//! - A failed precondition while uncertain may be our own earlier send that
//!   won: the stream is read before it is reported as a conflict.

use std::time::{Duration, Instant};

use crate::client::jetstream_errors::PublishFault;
use crate::core::backoff::Backoff;

/// How long one send waits for its ack before it is resent with the same
/// message id.
pub(crate) const RESEND_ACK_WAIT: Duration = Duration::from_secs(1);

/// What one send came to, short of an ack (an ack, also a duplicate's,
/// carries the revision and ends the write in the shell).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Sent {
    /// Refused or failed, as classified.
    Fault(PublishFault),
    /// No ack within the ack wait.
    NoAck,
    /// The connection was replaced while the ack was awaited.
    Reconnected,
}

/// Whether an unconfirmed write was applied, as read from the stream.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Resolution {
    /// Our message is stored at this revision.
    Applied(u64),
    /// Another write took the expected revision: ours was not applied.
    NotApplied,
    /// The read failed or could not tell.
    Unknown,
}

/// What the shell does next.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Next {
    /// `Ok(revision)`: the write was applied.
    Applied(u64),
    /// The expected revision did not match, and ours is not the write
    /// that took it.
    Conflict,
    /// The value exceeds the server's maximum payload.
    TooLarge,
    /// Fail with the last send's error: retrying cannot help.
    Failed,
    /// Read the stream for our message id, then call
    /// [`WriteCore::resolved`].
    Resolve,
    /// Wait `delay` (a reconnect ends the wait early), then send again.
    Resend {
        /// The back-off before the next send.
        delay: Duration,
    },
    /// Time is up and nothing can have been applied: fail with the last
    /// send's error.
    GiveUp,
    /// Time is up and the outcome is still unknown: a timeout.
    TimedOut,
}

/// Why the stream is being read.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Reading {
    /// A precondition failed while an earlier send is unconfirmed.
    Conflict,
    /// The hard deadline came: the last look before giving up.
    Final,
}

/// The state of one KV write.
#[derive(Debug, Clone)]
pub(crate) struct WriteCore {
    soft_deadline: Instant,
    hard_deadline: Instant,
    backoff: Backoff,
    /// Whether an earlier send may have been applied unheard.
    uncertain: bool,
    /// Resends so far.
    attempt: u32,
    reading: Option<Reading>,
}

impl WriteCore {
    /// A write started at `now` with the operation's `timeout`; both
    /// deadlines are fixed here.
    pub(crate) fn new(now: Instant, timeout: Duration, backoff: Backoff) -> Self {
        Self {
            soft_deadline: now + timeout,
            hard_deadline: now + (timeout * 2).saturating_sub(timeout / 10),
            backoff,
            uncertain: false,
            attempt: 0,
            reading: None,
        }
    }

    /// The deadline in force: the hard one once the write is uncertain.
    pub(crate) fn deadline(&self) -> Instant {
        if self.uncertain {
            self.hard_deadline
        } else {
            self.soft_deadline
        }
    }

    /// How long the next send waits for its ack.
    pub(crate) fn ack_wait(&self, now: Instant) -> Duration {
        self.deadline()
            .saturating_duration_since(now)
            .min(RESEND_ACK_WAIT)
    }

    /// Resends so far.
    pub(crate) fn attempts(&self) -> u32 {
        self.attempt
    }

    /// What follows from one send; `random` is a uniform sample in
    /// `0.0..1.0` for the back-off's jitter.
    pub(crate) fn sent(&mut self, sent: Sent, now: Instant, random: f64) -> Next {
        match sent {
            Sent::Fault(PublishFault::Conflict) if self.uncertain => {
                self.reading = Some(Reading::Conflict);
                Next::Resolve
            }
            Sent::Fault(PublishFault::Conflict) => Next::Conflict,
            Sent::Fault(PublishFault::Timeout | PublishFault::Unavailable)
            | Sent::NoAck
            | Sent::Reconnected => {
                self.uncertain = true;
                self.retry(now, random)
            }
            // Nobody took this send: it was not applied.
            Sent::Fault(PublishFault::NoResponders) => self.retry(now, random),
            Sent::Fault(PublishFault::TooLarge) => Next::TooLarge,
            Sent::Fault(PublishFault::WrongMessageId | PublishFault::Other) => Next::Failed,
        }
    }

    /// What follows from reading the stream after [`Next::Resolve`].
    pub(crate) fn resolved(&mut self, resolution: Resolution, now: Instant, random: f64) -> Next {
        match (self.reading.take(), resolution) {
            (_, Resolution::Applied(revision)) => Next::Applied(revision),
            (Some(Reading::Conflict), Resolution::NotApplied) => Next::Conflict,
            (Some(Reading::Conflict), Resolution::Unknown) => self.retry(now, random),
            (Some(Reading::Final) | None, _) => Next::TimedOut,
        }
    }

    /// Resend after a back-off, unless that would pass the deadline.
    fn retry(&mut self, now: Instant, random: f64) -> Next {
        let delay = self.backoff.delay(self.attempt, random);
        if now + delay < self.deadline() {
            self.attempt += 1;
            return Next::Resend { delay };
        }
        if self.uncertain {
            self.reading = Some(Reading::Final);
            Next::Resolve
        } else {
            Next::GiveUp
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const TIMEOUT: Duration = Duration::from_secs(5);

    fn core(t0: Instant) -> WriteCore {
        let backoff =
            Backoff::new(Duration::from_millis(25), Duration::from_millis(500)).without_jitter();
        WriteCore::new(t0, TIMEOUT, backoff)
    }

    fn ms(n: u64) -> Duration {
        Duration::from_millis(n)
    }

    #[test]
    fn deadlines_are_fixed_at_the_start() {
        let t0 = Instant::now();
        let mut w = core(t0);
        assert_eq!(w.deadline(), t0 + TIMEOUT);
        assert_eq!(w.ack_wait(t0), RESEND_ACK_WAIT);
        assert_eq!(w.ack_wait(t0 + TIMEOUT - ms(300)), ms(300));
        assert_eq!(w.ack_wait(t0 + TIMEOUT * 3), Duration::ZERO);
        // Uncertain: two timeouts less a tenth.
        w.sent(Sent::NoAck, t0 + ms(10), 0.0);
        assert_eq!(w.deadline(), t0 + ms(9_500));
    }

    #[test]
    fn a_conflict_on_a_certain_write_is_reported_at_once() {
        let t0 = Instant::now();
        let mut w = core(t0);
        assert_eq!(
            w.sent(Sent::Fault(PublishFault::Conflict), t0, 0.0),
            Next::Conflict
        );
    }

    #[test]
    fn a_conflict_after_a_lost_ack_reads_the_stream_first() {
        let t0 = Instant::now();
        for (found, then) in [
            (Resolution::Applied(12), Next::Applied(12)),
            (Resolution::NotApplied, Next::Conflict),
            (Resolution::Unknown, Next::Resend { delay: ms(50) }),
        ] {
            let mut w = core(t0);
            assert_eq!(
                w.sent(Sent::NoAck, t0 + ms(1_000), 0.0),
                Next::Resend { delay: ms(25) }
            );
            let t1 = t0 + ms(1_100);
            assert_eq!(
                w.sent(Sent::Fault(PublishFault::Conflict), t1, 0.0),
                Next::Resolve
            );
            assert_eq!(w.resolved(found, t1, 0.0), then, "{found:?}");
        }
    }

    #[test]
    fn lost_acks_and_reconnects_make_the_write_uncertain() {
        let t0 = Instant::now();
        for sent in [
            Sent::NoAck,
            Sent::Reconnected,
            Sent::Fault(PublishFault::Timeout),
            Sent::Fault(PublishFault::Unavailable),
        ] {
            let mut w = core(t0);
            assert!(
                matches!(w.sent(sent, t0, 0.0), Next::Resend { .. }),
                "{sent:?}"
            );
            assert_eq!(w.deadline(), t0 + ms(9_500), "{sent:?}");
        }
    }

    #[test]
    fn no_responders_is_resent_until_the_soft_deadline_then_given_up() {
        let t0 = Instant::now();
        let mut w = core(t0);
        let no_responders = Sent::Fault(PublishFault::NoResponders);
        // The back-off doubles from 25 ms and is capped at 500 ms.
        let mut now = t0;
        let mut delays = Vec::new();
        loop {
            match w.sent(no_responders, now, 0.0) {
                Next::Resend { delay } => {
                    delays.push(delay);
                    now += delay;
                }
                Next::GiveUp => break,
                other => panic!("unexpected {other:?}"),
            }
        }
        assert_eq!(
            &delays[..6],
            &[ms(25), ms(50), ms(100), ms(200), ms(400), ms(500)]
        );
        assert!(
            now < t0 + TIMEOUT && now + ms(500) >= t0 + TIMEOUT,
            "{now:?}"
        );
        assert_eq!(w.attempts() as usize, delays.len());
        assert_eq!(w.deadline(), t0 + TIMEOUT, "never uncertain");
    }

    #[test]
    fn an_uncertain_write_ends_with_a_read_of_the_stream() {
        let t0 = Instant::now();
        for (found, then) in [
            (Resolution::Applied(3), Next::Applied(3)),
            (Resolution::NotApplied, Next::TimedOut),
            (Resolution::Unknown, Next::TimedOut),
        ] {
            let mut w = core(t0);
            // Past the soft deadline an uncertain write still resends.
            assert!(matches!(
                w.sent(Sent::NoAck, t0 + ms(6_000), 0.0),
                Next::Resend { .. }
            ));
            assert_eq!(
                w.sent(Sent::Reconnected, t0 + ms(9_490), 0.0),
                Next::Resolve
            );
            assert_eq!(w.resolved(found, t0 + ms(9_500), 0.0), then, "{found:?}");
        }
    }

    #[test]
    fn refusals_that_retrying_cannot_change_end_the_write() {
        let t0 = Instant::now();
        let cases = [
            (PublishFault::TooLarge, Next::TooLarge),
            (PublishFault::WrongMessageId, Next::Failed),
            (PublishFault::Other, Next::Failed),
        ];
        for (fault, then) in cases {
            assert_eq!(
                core(t0).sent(Sent::Fault(fault), t0, 0.0),
                then,
                "{fault:?}"
            );
        }
    }

    #[test]
    fn jitter_shortens_the_delay_but_never_below_half() {
        let t0 = Instant::now();
        let backoff = Backoff::new(ms(100), ms(500));
        let mut w = WriteCore::new(t0, TIMEOUT, backoff);
        assert_eq!(
            w.sent(Sent::NoAck, t0, 0.999),
            Next::Resend {
                delay: ms(100).mul_f64(1.0 - 0.5 * 0.999)
            }
        );
    }
}
