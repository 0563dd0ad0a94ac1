//! The forwarder's decisions as a pure state machine: which stored message
//! goes out next, what an acknowledgement, a refusal or a failure means for
//! the window of sends in flight, when to go back and resend, what counts as
//! reordered, when acknowledged messages are removed from the store, and the
//! low-water mark `flush_outbox` waits on.
//!
//! [`Window`] holds the messages (their bodies `M` are opaque to it) and the
//! shell's handle `A` of each pending acknowledgement, which it never looks
//! into. Each step takes the time as an argument and queues [`Effect`]s,
//! which the shell in `outbox/forward.rs` drains and carries out (counters,
//! metrics, the breaker, the store).
//!
//! Sends are pipelined, go-back-N: when the oldest message in flight fails
//! transiently, every message in flight goes back to the front of the queue
//! in order and is sent again (the message id makes a resend of a stored
//! message a duplicate the stream absorbs).
//!
//! In strict order ([`Window::strict_order`]) a message sent while an
//! earlier one is in flight names what the stream must hold last before
//! it, so the stream refuses any message that would overtake a lost one.
//! A refusal of the oldest message in flight ([`Settle::ExpectationFailed`]: a
//! server that forgot its last message id, a dead-lettered predecessor,
//! another writer) sends everything in flight again at once, in order.
//! Two ways to name it, chosen by the stream's replication
//! ([`Window::set_stream_replicas`]):
//!
//! * **By message id** (`Nats-Expected-Last-Msg-Id`),
//!   for a stream without replicas: the newest message in flight. A message
//!   sent with nothing in flight names nothing, since everything before it
//!   is settled. The server answers a resend of a stored message as a
//!   duplicate before it checks the expectation, so resends after a lost
//!   connection stay pipelined.
//! * **By sequence** (`Nats-Expected-Last-Sequence`), for a replicated stream, which checks a
//!   message id expectation only when it applies the replicated entry,
//!   after it staged the id as "in process": a refusal there leaves the id
//!   staged for the whole duplicate window, and every resend of that
//!   message goes unanswered; on nats-server 2.15.1 the whole stream
//!   answered no publish for over a minute after one such refusal (R3). The sequence expectation is checked before the proposal,
//!   after the duplicate check, and stages nothing. The window knows the
//!   predecessor's sequence from its ack, or predicts it as one past what
//!   the predecessor expected (in strict order the outbox's messages sit in
//!   the stream in store order with nothing between them: the outbox writes
//!   it alone). Where nothing is known (after open, or after a refusal) the
//!   oldest unsettled message goes out alone with no expectation and its
//!   ack anchors the sequence again: the pipeline waits for that one ack.
//!   (A server without replicas checks the sequence before the duplicate,
//!   so there a resend of a stored message would be refused: hence the
//!   message id there.)

use std::collections::{HashSet, VecDeque};
use std::time::{Duration, Instant};

use crate::core::backoff::Backoff;

/// Loads below this many queued messages.
pub(crate) const LOAD_BATCH: usize = 4096;
/// Acknowledged messages are removed from the store when the window
/// empties, or once this many are waiting, or once the oldest has waited
/// [`REMOVE_AFTER`]: removal is bookkeeping (a crash before it only resends
/// what the duplicate window absorbs), so it runs in few large commits, not
/// beside every ack. The age bound keeps every resend after a crash well
/// inside the duplicate window at any rate.
pub(crate) const REMOVE_BATCH: usize = 65_536;
/// See [`REMOVE_BATCH`].
pub(crate) const REMOVE_AFTER: Duration = Duration::from_secs(1);
/// Failed sends of a message while later ones were acknowledged before it
/// is moved aside (the signature of a publish permission denial).
pub(crate) const MAX_STALLS: u32 = 3;
/// The pause after a send could not be written.
const SEND_FAILED_PAUSE: Duration = Duration::from_millis(100);
/// The pause after the store could not be read.
const LOAD_FAILED_PAUSE: Duration = Duration::from_secs(1);

/// A stored message the forwarder holds.
#[derive(Debug)]
pub(crate) struct Message<M> {
    /// Its sequence in the store.
    pub(crate) seq: u64,
    /// Its size as counted against the outbox's limits.
    pub(crate) size: u64,
    /// When it was stored (ms since the epoch).
    pub(crate) enqueued_ms: u64,
    /// What the shell sends.
    pub(crate) body: M,
    /// Sends so far.
    attempts: u32,
    /// Failed sends while a later message was acknowledged.
    stalls: u32,
    /// A later message was acknowledged before this one.
    overtaken: bool,
    /// Its last send carried the window's expectation (strict order).
    expects: bool,
    /// The stream sequence it will hold, when known (strict order).
    position: Option<u64>,
}

impl<M> Message<M> {
    /// A message as loaded from the store, never sent.
    pub(crate) fn new(seq: u64, size: u64, enqueued_ms: u64, body: M) -> Self {
        Self {
            seq,
            size,
            enqueued_ms,
            body,
            attempts: 0,
            stalls: 0,
            overtaken: false,
            expects: false,
            position: None,
        }
    }
}

/// A message sent and not yet settled.
#[derive(Debug)]
struct InFlight<M, A> {
    msg: Message<M>,
    deadline: Instant,
    ack: A,
}

/// What the stream's acknowledgement says.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Ack {
    /// The stream that stored the message.
    pub(crate) stream: String,
    /// Its sequence in the stream (the first copy's, for a duplicate).
    pub(crate) sequence: u64,
    /// The message was stored before (a resend).
    pub(crate) duplicate: bool,
}

/// What a strict-order message names as the stream's last before it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Expectation<'a, M> {
    /// The message it must follow (by its message id).
    MessageId(&'a M),
    /// The stream sequence the stream must hold last.
    Sequence(u64),
}

/// A later send's answer, read early (see [`Window::settle_front`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Early {
    /// Stored (or a duplicate of a stored message).
    Acked(Ack),
    /// The stream answered with a refusal; the message goes back with the
    /// rest and is sent again.
    Answered,
}

/// How the oldest send in flight ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Settle {
    /// Stored (or a duplicate of a stored message).
    Acked(Ack),
    /// Refused for good: a dead letter.
    Refused(String),
    /// An expectation in the message's headers failed (the stream's last
    /// message or sequence differs). When it was the window's own (strict
    /// order), everything in flight goes back at once; otherwise the
    /// message is refused for good.
    ExpectationFailed(String),
    /// Nothing known (no ack in time, no leader, a dropped connection):
    /// go back and send again.
    Transient(String),
}

/// What the shell carries out, in order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Effect {
    /// Report the call the breaker admitted as a success.
    BreakerSuccess,
    /// Report the call the breaker admitted as a failure.
    BreakerFailure,
    /// Forget the breaker's admission unreported (a reconnect).
    BreakerRelease,
    /// A send failed.
    CountFailed,
    /// This many messages go out again.
    CountResent(u64),
    /// A resend was answered as a duplicate.
    CountDuplicate,
    /// The message reached the stream out of store order.
    Reordered {
        /// Its sequence in the store.
        seq: u64,
    },
    /// Move the message to the dead letters.
    DeadLetter {
        /// Its sequence in the store.
        seq: u64,
        /// Its counted size.
        size: u64,
        /// Why.
        reason: String,
    },
    /// Check the duplicate window of a stream acknowledged for the first
    /// time.
    CheckStream(String),
}

/// Progress since the last call of [`Window::progress`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Progress {
    /// Messages acknowledged.
    pub(crate) forwarded: u64,
    /// Their counted bytes.
    pub(crate) bytes: u64,
    /// The lowest sequence not yet settled.
    pub(crate) low_water: u64,
    /// The oldest message held: its sequence and store time (ms).
    pub(crate) head: Option<(u64, u64)>,
}

/// The forwarder's window: queued messages, sends in flight, the pause,
/// and what was settled since the shell last looked.
#[derive(Debug)]
pub(crate) struct Window<M, A> {
    queue: VecDeque<Message<M>>,
    inflight: VecDeque<InFlight<M, A>>,
    /// Next sequence to load from the store.
    cursor: u64,
    /// Acknowledged, not yet removed from the store.
    removed: Vec<u64>,
    /// When the oldest entry of `removed` was acknowledged.
    removed_since: Option<Instant>,
    /// Consecutive go-backs (the back-off step).
    go_backs: u32,
    pause_until: Option<Instant>,
    /// A resent message was stored fresh since the last go-back.
    fresh_in_resend: bool,
    streams_checked: HashSet<String>,
    /// Messages name what the stream holds last before them.
    strict: bool,
    /// ...by message id, not by stream sequence.
    by_id: bool,
    /// Strict order: the stream sequence of the newest acknowledged
    /// message, when it anchors the next one.
    anchor: Option<u64>,
    /// The only stream whose ack counts as delivery.
    expected_stream: Option<String>,
    /// Acknowledged since the last `progress`: messages, bytes.
    settled: (u64, u64),
    backoff: Backoff,
    effects: Vec<Effect>,
}

impl<M, A> Window<M, A> {
    /// An empty window whose first load starts at sequence `first`;
    /// `backoff` spaces the go-backs after failures.
    pub(crate) fn new(first: u64, backoff: Backoff) -> Self {
        Self {
            queue: VecDeque::new(),
            inflight: VecDeque::new(),
            cursor: first,
            removed: Vec::new(),
            removed_since: None,
            go_backs: 0,
            pause_until: None,
            fresh_in_resend: false,
            streams_checked: HashSet::new(),
            strict: false,
            by_id: false,
            anchor: None,
            expected_stream: None,
            settled: (0, 0),
            backoff,
            effects: Vec::new(),
        }
    }

    /// Strict order: see the module docs.
    pub(crate) fn strict_order(mut self, strict: bool) -> Self {
        self.strict = strict;
        self
    }

    /// Only an ack from `stream` counts as delivery; an ack from any other
    /// stream moves the message to the dead letters (it was stored, but
    /// not where it should be).
    pub(crate) fn expect_stream(mut self, stream: Option<String>) -> Self {
        self.expected_stream = stream;
        self
    }

    /// The stream's replicas, once known (0: not known): strict order names
    /// the predecessor by message id on a stream without replicas and by
    /// stream sequence otherwise (see the module docs). Takes effect from
    /// the next send.
    pub(crate) fn set_stream_replicas(&mut self, replicas: u64) {
        self.by_id = replicas == 1;
    }

    /// In strict order, what the next message sent must name as the
    /// stream's last before it; `None` when it names nothing (nothing is
    /// in flight and nothing anchors it, or no strict order).
    pub(crate) fn expectation(&self) -> Option<Expectation<'_, M>> {
        self.predecessor()
            .map(Expectation::MessageId)
            .or_else(|| self.expected_last().map(Expectation::Sequence))
    }

    /// Strict order by message id: the message the next one sent must
    /// follow in the stream, the newest in flight. `None` when nothing is
    /// in flight (all before it are settled), or in another mode.
    fn predecessor(&self) -> Option<&M> {
        if self.strict && self.by_id {
            self.inflight.back().map(|f| &f.msg.body)
        } else {
            None
        }
    }

    /// Strict order by sequence: the stream sequence the next message sent
    /// expects as the stream's last: the newest message in flight's, or
    /// with nothing in flight the newest acknowledged one's. `None` when it
    /// is not known (the message goes out with no expectation and anchors
    /// the sequence), or in another mode.
    fn expected_last(&self) -> Option<u64> {
        if !self.strict || self.by_id {
            return None;
        }
        match self.inflight.back() {
            Some(f) => f.msg.position,
            None => self.anchor,
        }
    }

    /// Strict order: the newest message in flight has no known position,
    /// so the next one waits for its ack.
    fn awaits_anchor(&self) -> bool {
        self.strict
            && !self.by_id
            && self
                .inflight
                .back()
                .is_some_and(|f| f.msg.position.is_none())
    }

    /// The effects queued so far, oldest first.
    pub(crate) fn drain_effects(&mut self) -> std::vec::Drain<'_, Effect> {
        self.effects.drain(..)
    }

    /// The next sequence to load.
    pub(crate) fn cursor(&self) -> u64 {
        self.cursor
    }

    /// Whether a load should start, given the last sequence committed to
    /// the store.
    pub(crate) fn wants_load(&self, last_committed: u64) -> bool {
        self.queue.len() < LOAD_BATCH && last_committed >= self.cursor
    }

    /// A row loaded from the store: queued, or moved aside when its record
    /// cannot be read.
    pub(crate) fn loaded(&mut self, seq: u64, size: u64, row: Result<(u64, M), String>) {
        self.cursor = seq + 1;
        match row {
            Ok((enqueued_ms, body)) => {
                self.queue
                    .push_back(Message::new(seq, size, enqueued_ms, body));
            }
            Err(err) => {
                let reason = format!("unreadable record: {err}");
                tracing::error!(seq, %reason, "outbox: moving a record aside");
                self.effects.push(Effect::DeadLetter { seq, size, reason });
            }
        }
    }

    /// The store could not be read: try again after a pause.
    pub(crate) fn load_failed(&mut self, now: Instant) {
        self.pause_until = Some(now + LOAD_FAILED_PAUSE);
    }

    /// Until when sending waits, if it does; a pause that has passed ends.
    pub(crate) fn pause(&mut self, now: Instant) -> Option<Instant> {
        if self.pause_until.is_some_and(|t| now >= t) {
            self.pause_until = None;
        }
        self.pause_until
    }

    /// Pauses sending until `until` (the breaker is open).
    pub(crate) fn pause_until(&mut self, until: Instant) {
        self.pause_until = Some(until);
    }

    /// Whether a message would be sent now: not paused, something queued,
    /// room in a window of `max`.
    pub(crate) fn can_send(&mut self, now: Instant, max: usize) -> bool {
        self.pause(now).is_none()
            && !self.queue.is_empty()
            && self.inflight.len() < max
            && !self.awaits_anchor()
    }

    /// Nothing in flight.
    pub(crate) fn idle(&self) -> bool {
        self.inflight.is_empty()
    }

    /// Messages queued to be sent.
    pub(crate) fn queued(&self) -> usize {
        self.queue.len()
    }

    /// The next message to send, if a window of `max` has room (and in
    /// strict order, no anchor is awaited). Send it with
    /// [`expected_last`](Self::expected_last) as asked before
    /// [`sent`](Self::sent).
    pub(crate) fn next_to_send(&mut self, max: usize) -> Option<Message<M>> {
        if self.inflight.len() >= max || self.awaits_anchor() {
            return None;
        }
        self.queue.pop_front()
    }

    /// `msg` was sent; its acknowledgement is awaited through `ack` until
    /// `deadline`.
    /// In strict order it was sent with the [`expectation`](Self::expectation)
    /// asked just before.
    pub(crate) fn sent(&mut self, mut msg: Message<M>, ack: A, deadline: Instant) {
        msg.attempts += 1;
        let expected = self.expected_last();
        msg.expects = expected.is_some() || self.predecessor().is_some();
        msg.position = expected.map(|p| p + 1);
        self.inflight.push_back(InFlight { msg, deadline, ack });
    }

    /// `msg` could not be sent and never will be (too large).
    pub(crate) fn send_refused(&mut self, msg: Message<M>, reason: String) {
        self.dead_letter(msg.seq, msg.size, reason);
    }

    /// `msg` could not be written: it goes first again after a pause.
    pub(crate) fn send_failed(&mut self, msg: Message<M>, now: Instant) {
        self.queue.push_front(msg);
        self.effects.push(Effect::CountFailed);
        self.pause_until = Some(now + SEND_FAILED_PAUSE);
    }

    /// The acknowledgement handle of the oldest send in flight.
    pub(crate) fn front_ack(&mut self) -> Option<&mut A> {
        self.inflight.front_mut().map(|f| &mut f.ack)
    }

    /// The ack of the send in flight that `order` finds, by binary search
    /// in send order (`order` compares a send's ack with the one sought:
    /// the shell's acks carry a number that grows with every send).
    pub(crate) fn ack_by(
        &mut self,
        mut order: impl FnMut(&A) -> std::cmp::Ordering,
    ) -> Option<&mut A> {
        let at = self.inflight.binary_search_by(|f| order(&f.ack)).ok()?;
        self.inflight.get_mut(at).map(|f| &mut f.ack)
    }

    /// The oldest send in flight (its body), if any.
    pub(crate) fn front(&self) -> Option<&M> {
        self.inflight.front().map(|f| &f.msg.body)
    }

    /// Whether the oldest send in flight is past its ack deadline.
    pub(crate) fn front_overdue(&self, now: Instant) -> bool {
        self.inflight.front().is_some_and(|f| now >= f.deadline)
    }

    /// Settles the oldest send in flight. On a transient failure, the later
    /// sends whose answer `ready` reports as already here are read first
    /// (it is asked once per later send, in order; what it consumed is
    /// never asked for again): acknowledged ones are settled, refused ones
    /// go back with the rest; then everything still in flight goes back,
    /// after a back-off (`random` is a uniform sample in `0.0..1.0` for its
    /// jitter).
    pub(crate) fn settle_front(
        &mut self,
        settle: Settle,
        now: Instant,
        random: f64,
        mut ready: impl FnMut(&mut A) -> Option<Early>,
    ) {
        match settle {
            Settle::Acked(ack) => {
                self.effects.push(Effect::BreakerSuccess);
                let Some(f) = self.inflight.pop_front() else {
                    return;
                };
                self.acked(f.msg, ack, now);
                self.go_backs = 0;
            }
            Settle::ExpectationFailed(reason)
                if !self.inflight.front().is_some_and(|f| f.msg.expects) =>
            {
                // Not an expectation of ours (one in its own headers):
                // final.
                self.settle_front(Settle::Refused(reason), now, random, ready);
            }
            Settle::ExpectationFailed(reason) => {
                // The stream answered: the link is fine. Whatever made the
                // expectation wrong, the oldest goes first with none (and,
                // by sequence, alone, to anchor).
                self.effects.push(Effect::BreakerSuccess);
                tracing::debug!(
                    seq = self.inflight.front().map(|f| f.msg.seq),
                    %reason,
                    "outbox: the stream's last message differs; resending in order"
                );
                self.anchor = None;
                self.go_back(None);
            }
            Settle::Refused(reason) => {
                self.effects.push(Effect::BreakerSuccess);
                let Some(f) = self.inflight.pop_front() else {
                    return;
                };
                tracing::warn!(seq = f.msg.seq, %reason, "outbox: message refused; moved to the dead letters");
                self.dead_letter(f.msg.seq, f.msg.size, reason);
            }
            Settle::Transient(reason) => {
                self.effects.push(Effect::BreakerFailure);
                self.effects.push(Effect::CountFailed);
                // Later messages already acknowledged are settled; if the
                // stream answers them but never this one, this one is
                // refused in a way that has no answer (permission denied).
                // (In strict order the later ones are refused, not stored:
                // they expected this one.)
                let (mut later_acked, mut later_answered) = (false, false);
                let mut rest = std::mem::take(&mut self.inflight);
                let front = rest.pop_front();
                let mut kept = VecDeque::with_capacity(rest.len());
                for mut f in rest {
                    match ready(&mut f.ack) {
                        Some(Early::Acked(ack)) => {
                            later_acked = true;
                            self.acked(f.msg, ack, now);
                        }
                        Some(Early::Answered) => {
                            later_answered = true;
                            kept.push_back(f);
                        }
                        None => kept.push_back(f),
                    }
                }
                self.inflight = kept;
                if let Some(mut f) = front {
                    if later_acked {
                        f.msg.overtaken = true;
                    }
                    if later_acked || later_answered {
                        f.msg.stalls += 1;
                    }
                    if f.msg.stalls >= MAX_STALLS {
                        let reason = format!(
                            "no acknowledgement in {} sends while later messages were acknowledged \
                             (is publishing to this subject denied?): {reason}",
                            f.msg.attempts
                        );
                        tracing::warn!(seq = f.msg.seq, %reason, "outbox: moved to the dead letters");
                        self.dead_letter(f.msg.seq, f.msg.size, reason);
                    } else {
                        tracing::debug!(seq = f.msg.seq, %reason, "outbox: send failed; going back");
                        self.inflight.push_front(f);
                    }
                }
                self.go_back(Some((now, random)));
            }
        }
    }

    /// The connection was replaced: acks of the old one are lost, so what
    /// is in flight is sent again at once, with no back-off.
    pub(crate) fn reconnected(&mut self) {
        if !self.inflight.is_empty() {
            tracing::debug!(
                in_flight = self.inflight.len(),
                "outbox: reconnected; resending"
            );
            self.go_back(None);
            self.effects.push(Effect::BreakerRelease);
        }
        self.pause_until = None;
        self.go_backs = 0;
    }

    /// Every message in flight goes back to the front of the queue, in
    /// order; with `pause` (`now` and a jitter sample), sending resumes
    /// after a back-off.
    fn go_back(&mut self, pause: Option<(Instant, f64)>) {
        let n = self.inflight.len() as u64;
        for f in std::mem::take(&mut self.inflight).into_iter().rev() {
            self.queue.push_front(f.msg);
        }
        self.effects.push(Effect::CountResent(n));
        self.fresh_in_resend = false;
        if let Some((now, random)) = pause {
            let delay = self.backoff.delay(self.go_backs, random);
            self.go_backs = self.go_backs.saturating_add(1);
            self.pause_until = Some(now + delay);
        }
    }

    fn acked(&mut self, msg: Message<M>, ack: Ack, now: Instant) {
        if let Some(expected) = &self.expected_stream
            && *expected != ack.stream
        {
            let reason = format!(
                "acknowledged by stream {} instead of the expected {expected} \
                 (does another stream capture the subject?)",
                ack.stream
            );
            tracing::warn!(seq = msg.seq, %reason, "outbox: moved to the dead letters");
            self.dead_letter(msg.seq, msg.size, reason);
            return;
        }
        if !self.streams_checked.contains(&ack.stream) {
            self.streams_checked.insert(ack.stream.clone());
            self.effects.push(Effect::CheckStream(ack.stream.clone()));
        }
        if self.strict {
            self.anchor = Some(ack.sequence);
        }
        let resent = msg.attempts > 1;
        if ack.duplicate {
            self.effects.push(Effect::CountDuplicate);
            if resent && self.fresh_in_resend {
                // An earlier message of this resend was stored only now,
                // after this one: the stream holds them out of order.
                self.reordered(msg.seq);
            }
        } else if msg.overtaken {
            self.reordered(msg.seq);
        } else if resent {
            self.fresh_in_resend = true;
        }
        self.settled.0 += 1;
        self.settled.1 += msg.size;
        self.removed_since.get_or_insert(now);
        self.removed.push(msg.seq);
    }

    fn reordered(&mut self, seq: u64) {
        tracing::warn!(seq, "outbox: a message reached the stream out of order");
        self.effects.push(Effect::Reordered { seq });
    }

    fn dead_letter(&mut self, seq: u64, size: u64, reason: String) {
        self.effects.push(Effect::DeadLetter { seq, size, reason });
    }

    /// Whether acknowledged messages should be removed from the store now.
    pub(crate) fn removals_due(&self, now: Instant) -> bool {
        !self.removed.is_empty()
            && (self.removed.len() >= REMOVE_BATCH
                || self.inflight.is_empty()
                || self
                    .removed_since
                    .is_some_and(|t| now.saturating_duration_since(t) >= REMOVE_AFTER))
    }

    /// The acknowledged sequences to remove from the store.
    pub(crate) fn take_removals(&mut self) -> Vec<u64> {
        self.removed_since = None;
        std::mem::take(&mut self.removed)
    }

    /// What was settled since the last call, and the low-water mark: the
    /// oldest message held, or the cursor when nothing is held (a load
    /// under way starts there).
    pub(crate) fn progress(&mut self) -> Progress {
        let (forwarded, bytes) = std::mem::take(&mut self.settled);
        let head = self
            .inflight
            .front()
            .map(|f| (f.msg.seq, f.msg.enqueued_ms))
            .or_else(|| self.queue.front().map(|m| (m.seq, m.enqueued_ms)));
        Progress {
            forwarded,
            bytes,
            low_water: head.map_or(self.cursor, |(seq, _)| seq),
            head,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The ack handle in tests: the ack that is "already here", if any.
    type Handle = Option<Early>;
    type W = Window<&'static str, Handle>;

    fn window() -> W {
        let backoff =
            Backoff::new(Duration::from_millis(100), Duration::from_secs(2)).without_jitter();
        Window::new(1, backoff)
    }

    fn ack(duplicate: bool) -> Ack {
        Ack {
            stream: "S".into(),
            sequence: 1,
            duplicate,
        }
    }

    fn load(w: &mut W, seqs: std::ops::RangeInclusive<u64>) {
        for seq in seqs {
            w.loaded(seq, 10, Ok((1_000 + seq, "body")));
        }
    }

    /// Sends what fits in a window of `max`; returns the sequences sent.
    fn fill(w: &mut W, max: usize, now: Instant) -> Vec<u64> {
        let mut sent = Vec::new();
        while let Some(msg) = w.next_to_send(max) {
            sent.push(msg.seq);
            w.sent(msg, None, now + Duration::from_secs(5));
        }
        sent
    }

    fn settle(w: &mut W, settle: Settle, now: Instant) -> Vec<Effect> {
        w.settle_front(settle, now, 0.0, Option::take);
        w.drain_effects().collect()
    }

    fn acked(w: &mut W, duplicate: bool, now: Instant) -> Vec<Effect> {
        settle(w, Settle::Acked(ack(duplicate)), now)
    }

    fn reordered(effects: &[Effect]) -> Vec<u64> {
        effects
            .iter()
            .filter_map(|e| match e {
                Effect::Reordered { seq } => Some(*seq),
                _ => None,
            })
            .collect()
    }

    /// The shell finds the send an ack answers by the number it gave the
    /// send (growing with every send), among those still in flight.
    #[test]
    fn an_ack_is_found_by_its_send_number_among_the_sends_in_flight() {
        let t0 = Instant::now();
        let backoff =
            Backoff::new(Duration::from_millis(100), Duration::from_secs(2)).without_jitter();
        let mut w: Window<&'static str, (u64, Option<Early>)> = Window::new(1, backoff);
        for seq in 1..=4 {
            w.loaded(seq, 10, Ok((1_000 + seq, "body")));
        }
        for number in [10, 11, 13, 20] {
            let msg = w.next_to_send(8).expect("a queued message");
            w.sent(msg, (number, None), t0 + Duration::from_secs(5));
        }
        let find = |w: &mut Window<_, (u64, Option<Early>)>, n: u64| {
            w.ack_by(|ack| ack.0.cmp(&n)).map(|ack| ack.0)
        };
        assert_eq!(find(&mut w, 13), Some(13));
        assert_eq!(find(&mut w, 20), Some(20));
        assert_eq!(find(&mut w, 12), None, "never sent");
        assert_eq!(find(&mut w, 21), None);
        w.settle_front(Settle::Acked(ack(false)), t0, 0.0, |ack| ack.1.take());
        assert_eq!(find(&mut w, 10), None, "settled: no longer in flight");
        assert_eq!(find(&mut w, 11), Some(11));
    }

    #[test]
    fn acks_in_order_settle_each_message_once_and_move_the_low_water_mark() {
        let t0 = Instant::now();
        let mut w = window();
        assert!(!w.wants_load(0), "nothing committed yet");
        assert!(w.wants_load(3));
        load(&mut w, 1..=3);
        assert_eq!(w.cursor(), 4);
        assert_eq!(fill(&mut w, 2, t0), vec![1, 2], "a window of two");
        assert_eq!(w.progress().low_water, 1);
        let effects = acked(&mut w, false, t0);
        assert_eq!(
            effects,
            vec![Effect::BreakerSuccess, Effect::CheckStream("S".into())]
        );
        assert_eq!(fill(&mut w, 2, t0), vec![3]);
        assert_eq!(
            acked(&mut w, false, t0),
            vec![Effect::BreakerSuccess],
            "checked once"
        );
        acked(&mut w, false, t0);
        let progress = w.progress();
        assert_eq!((progress.forwarded, progress.bytes), (3, 30));
        assert_eq!(progress.low_water, 4, "nothing held: the cursor");
        assert_eq!(progress.head, None);
        assert!(w.removals_due(t0), "the window is empty");
        assert_eq!(w.take_removals(), vec![1, 2, 3]);
        assert!(!w.removals_due(t0));
        assert_eq!(w.progress().forwarded, 0, "reported once");
    }

    #[test]
    fn a_transient_failure_goes_back_in_order_after_a_back_off() {
        let t0 = Instant::now();
        let mut w = window();
        load(&mut w, 1..=4);
        fill(&mut w, 4, t0);
        let effects = settle(&mut w, Settle::Transient("no ack".into()), t0);
        assert_eq!(
            effects,
            vec![
                Effect::BreakerFailure,
                Effect::CountFailed,
                Effect::CountResent(4)
            ]
        );
        assert_eq!(w.pause(t0), Some(t0 + Duration::from_millis(100)));
        assert!(!w.can_send(t0, 4), "paused");
        let later = t0 + Duration::from_millis(100);
        assert!(w.can_send(later, 4));
        assert_eq!(fill(&mut w, 4, later), vec![1, 2, 3, 4], "the same order");
        // A second failure in a row doubles the back-off; an ack resets it.
        settle(&mut w, Settle::Transient("no ack".into()), later);
        assert_eq!(w.pause(later), Some(later + Duration::from_millis(200)));
        let again = later + Duration::from_millis(200);
        fill(&mut w, 4, again);
        acked(&mut w, true, again);
        settle(&mut w, Settle::Transient("no ack".into()), again);
        assert_eq!(w.pause(again), Some(again + Duration::from_millis(100)));
    }

    #[test]
    fn a_lost_middle_ack_resends_from_it_and_counts_no_reorder() {
        let t0 = Instant::now();
        let mut w = window();
        load(&mut w, 1..=3);
        fill(&mut w, 3, t0);
        acked(&mut w, false, t0); // 1
        // 2's ack is lost; 3's has not come yet.
        settle(&mut w, Settle::Transient("no ack".into()), t0);
        let t1 = t0 + Duration::from_secs(1);
        assert_eq!(fill(&mut w, 3, t1), vec![2, 3]);
        // 2 was stored the first time: its resend is a duplicate; 3 is new.
        let mut effects = acked(&mut w, true, t1);
        effects.extend(acked(&mut w, false, t1));
        assert!(effects.contains(&Effect::CountDuplicate));
        assert_eq!(reordered(&effects), Vec::<u64>::new());
        assert_eq!(w.progress().low_water, 4);
    }

    #[test]
    fn a_resend_stored_fresh_before_a_duplicate_is_counted_as_reordered() {
        let t0 = Instant::now();
        let mut w = window();
        load(&mut w, 1..=2);
        fill(&mut w, 2, t0);
        settle(&mut w, Settle::Transient("no ack".into()), t0);
        let t1 = t0 + Duration::from_secs(1);
        fill(&mut w, 2, t1);
        // 1 was lost and is stored only now; 2 had been stored before it.
        let mut effects = acked(&mut w, false, t1);
        effects.extend(acked(&mut w, true, t1));
        assert_eq!(reordered(&effects), vec![2]);
    }

    #[test]
    fn a_message_overtaken_by_later_acks_is_reordered_or_finally_refused() {
        let t0 = Instant::now();
        let mut w = window();
        load(&mut w, 1..=2);
        // 2's ack is already here when 1 fails: 2 is settled, 1 goes back.
        let m1 = w.next_to_send(2).expect("1");
        w.sent(m1, None, t0);
        let m2 = w.next_to_send(2).expect("2");
        w.sent(m2, Some(Early::Acked(ack(false))), t0);
        let effects = settle(&mut w, Settle::Transient("no ack".into()), t0);
        assert!(effects.contains(&Effect::CountResent(1)), "{effects:?}");
        assert_eq!(w.progress().forwarded, 1, "2 was settled");
        // 1 now arrives: after 2, out of order.
        let t1 = t0 + Duration::from_secs(1);
        fill(&mut w, 2, t1);
        assert_eq!(reordered(&acked(&mut w, false, t1)), vec![1]);

        // A message that never gets an ack while later ones do, three
        // times over, is a dead letter (a permission denial).
        let mut w = window();
        load(&mut w, 1..=4);
        let mut now = t0;
        for round in 0..MAX_STALLS {
            let m = w.next_to_send(2).expect("the stuck message");
            assert_eq!(m.seq, 1);
            w.sent(m, None, now);
            let later = w.next_to_send(2).expect("a later message");
            w.sent(later, Some(Early::Acked(ack(false))), now);
            let effects = settle(&mut w, Settle::Transient("no ack".into()), now);
            let dead = effects.iter().any(|e| {
                matches!(
                    e,
                    Effect::DeadLetter {
                        seq: 1,
                        size: 10,
                        ..
                    }
                )
            });
            assert_eq!(dead, round + 1 == MAX_STALLS, "round {round}: {effects:?}");
            now = w.pause(now).unwrap_or(now);
        }
        assert_eq!(w.progress().low_water, 5, "nothing left but 1's removal");
    }

    #[test]
    fn a_reconnect_resends_what_is_in_flight_at_once() {
        let t0 = Instant::now();
        let mut w = window();
        load(&mut w, 1..=3);
        fill(&mut w, 3, t0);
        settle(&mut w, Settle::Transient("x".into()), t0);
        assert!(w.pause(t0).is_some());
        fill(&mut w, 3, t0 + Duration::from_secs(1));
        w.reconnected();
        let effects: Vec<Effect> = w.drain_effects().collect();
        assert_eq!(
            effects,
            vec![Effect::CountResent(3), Effect::BreakerRelease]
        );
        assert_eq!(w.pause(t0), None, "no back-off after a reconnect");
        assert_eq!(fill(&mut w, 3, t0), vec![1, 2, 3]);
        // With nothing in flight a reconnect resends nothing.
        let mut idle = window();
        idle.reconnected();
        assert_eq!(idle.drain_effects().count(), 0);
    }

    #[test]
    fn refusals_and_unsendable_messages_are_dead_letters() {
        let t0 = Instant::now();
        let mut w = window();
        load(&mut w, 1..=2);
        w.loaded(3, 7, Err("bad bytes".into()));
        let effects: Vec<Effect> = w.drain_effects().collect();
        assert!(
            matches!(&effects[..], [Effect::DeadLetter { seq: 3, size: 7, reason }] if reason.contains("bad bytes"))
        );
        assert_eq!(w.cursor(), 4);
        fill(&mut w, 1, t0);
        let effects = settle(&mut w, Settle::Refused("no stream".into()), t0);
        assert!(matches!(
            &effects[..],
            [Effect::BreakerSuccess, Effect::DeadLetter { seq: 1, .. }]
        ));
        let m2 = w.next_to_send(1).expect("2");
        w.send_refused(m2, "too large".into());
        assert!(matches!(
            &w.drain_effects().collect::<Vec<_>>()[..],
            [Effect::DeadLetter { seq: 2, .. }]
        ));
        assert_eq!(w.progress().low_water, 4);
    }

    #[test]
    fn failed_sends_stay_first_and_pause() {
        let t0 = Instant::now();
        let mut w = window();
        load(&mut w, 1..=2);
        let m = w.next_to_send(4).expect("1");
        w.send_failed(m, t0);
        assert_eq!(
            w.drain_effects().collect::<Vec<_>>(),
            vec![Effect::CountFailed]
        );
        assert_eq!(w.pause(t0), Some(t0 + SEND_FAILED_PAUSE));
        assert_eq!(fill(&mut w, 4, t0), vec![1, 2]);
        w.load_failed(t0);
        assert_eq!(w.pause(t0), Some(t0 + LOAD_FAILED_PAUSE));
    }

    #[test]
    fn overdue_acks_and_removal_batching_follow_the_clock() {
        let t0 = Instant::now();
        let mut w = window();
        load(&mut w, 1..=3);
        fill(&mut w, 3, t0);
        assert!(!w.front_overdue(t0));
        assert!(w.front_overdue(t0 + Duration::from_secs(5)));
        acked(&mut w, false, t0);
        // Acked with sends still in flight: removed after REMOVE_AFTER.
        assert!(!w.removals_due(t0));
        assert!(w.removals_due(t0 + REMOVE_AFTER));
        assert_eq!(w.queued(), 0);
        assert!(!w.idle());
        let p = w.progress();
        assert_eq!((p.low_water, p.head), (2, Some((2, 1_002))));
    }

    #[test]
    fn loads_stop_at_the_batch_size() {
        let mut w = window();
        for seq in 1..=LOAD_BATCH as u64 {
            w.loaded(seq, 1, Ok((0, "x")));
        }
        assert!(!w.wants_load(u64::MAX), "the queue is full enough");
        let _ = w.next_to_send(1);
        assert!(w.wants_load(u64::MAX));
        assert!(!w.wants_load(LOAD_BATCH as u64), "nothing new committed");
    }

    fn strict() -> W {
        window().strict_order(true)
    }

    /// Sends what fits, recording the expectation each one carried.
    fn fill_strict(w: &mut W, max: usize, now: Instant) -> Vec<(u64, Option<u64>)> {
        let mut sent = Vec::new();
        while let Some(msg) = w.next_to_send(max) {
            sent.push((msg.seq, w.expected_last()));
            w.sent(msg, None, now + Duration::from_secs(5));
        }
        sent
    }

    /// Acknowledges the oldest in flight as stored at stream `sequence`.
    fn stored_at(w: &mut W, sequence: u64, now: Instant) -> Vec<Effect> {
        let ack = Ack {
            stream: "S".into(),
            sequence,
            duplicate: false,
        };
        settle(w, Settle::Acked(ack), now)
    }

    #[test]
    fn strict_order_expects_the_predecessors_stream_sequence() {
        let t0 = Instant::now();
        let mut w = strict();
        load(&mut w, 1..=4);
        assert_eq!(
            fill_strict(&mut w, 3, t0),
            vec![(1, None)],
            "nothing known: the first goes alone"
        );
        assert!(!w.can_send(t0, 3), "the rest waits for its ack");
        stored_at(&mut w, 10, t0);
        assert_eq!(
            fill_strict(&mut w, 3, t0),
            vec![(2, Some(10)), (3, Some(11)), (4, Some(12))],
            "pipelined, each one past its predecessor"
        );
        for sequence in 11..=13 {
            stored_at(&mut w, sequence, t0);
        }
        load(&mut w, 5..=5);
        assert_eq!(
            fill_strict(&mut w, 3, t0),
            vec![(5, Some(13))],
            "the anchor outlives an empty window"
        );
        let mut plain = window();
        load(&mut plain, 1..=2);
        assert_eq!(fill(&mut plain, 2, t0), vec![1, 2]);
        assert_eq!(plain.expected_last(), None, "only in strict order");
    }

    #[test]
    fn a_refused_expectation_goes_back_at_once_and_anchors_again() {
        let t0 = Instant::now();
        let mut w = strict();
        load(&mut w, 1..=3);
        fill_strict(&mut w, 3, t0);
        stored_at(&mut w, 10, t0);
        assert_eq!(
            fill_strict(&mut w, 3, t0),
            vec![(2, Some(10)), (3, Some(11))]
        );
        // Someone else wrote to the stream: 2 is refused, and so is 3.
        let effects = settle(
            &mut w,
            Settle::ExpectationFailed("wrong last sequence".into()),
            t0,
        );
        assert_eq!(
            effects,
            vec![Effect::BreakerSuccess, Effect::CountResent(2)]
        );
        assert_eq!(w.pause(t0), None, "no back-off: the stream answered");
        assert_eq!(fill_strict(&mut w, 3, t0), vec![(2, None)], "alone");
        let effects = stored_at(&mut w, 20, t0);
        assert_eq!(reordered(&effects), Vec::<u64>::new());
        assert_eq!(fill_strict(&mut w, 3, t0), vec![(3, Some(20))]);
        stored_at(&mut w, 21, t0);
        assert_eq!(w.progress().low_water, 4);

        // A refusal of a message that carried no expectation of ours is
        // final: the expectation was in its own headers.
        let mut w = strict();
        load(&mut w, 1..=1);
        fill_strict(&mut w, 1, t0);
        let effects = settle(
            &mut w,
            Settle::ExpectationFailed("wrong last sequence".into()),
            t0,
        );
        assert!(
            matches!(
                &effects[..],
                [Effect::BreakerSuccess, Effect::DeadLetter { seq: 1, .. }]
            ),
            "{effects:?}"
        );
    }

    #[test]
    fn in_strict_order_a_message_never_answered_while_later_ones_are_is_a_dead_letter() {
        let t0 = Instant::now();
        let mut w = strict();
        load(&mut w, 1..=4);
        fill_strict(&mut w, 1, t0);
        stored_at(&mut w, 5, t0);
        let mut now = t0;
        for round in 0..MAX_STALLS {
            let m = w.next_to_send(2).expect("the stuck message");
            assert_eq!(m.seq, 2);
            w.sent(m, None, now);
            // The later one expected 2 and was refused: the stream answers.
            let later = w.next_to_send(2).expect("a later message");
            w.sent(later, Some(Early::Answered), now);
            let effects = settle(&mut w, Settle::Transient("no ack".into()), now);
            let dead = effects
                .iter()
                .any(|e| matches!(e, Effect::DeadLetter { seq: 2, .. }));
            assert_eq!(dead, round + 1 == MAX_STALLS, "round {round}: {effects:?}");
            assert_eq!(reordered(&effects), Vec::<u64>::new());
            now = w.pause(now).unwrap_or(now);
        }
        assert_eq!(
            fill_strict(&mut w, 2, now),
            vec![(3, Some(5)), (4, Some(6))],
            "the rest follows the last stored one"
        );
    }

    /// Sends what fits by message id, recording the predecessor each named.
    fn fill_by_id(w: &mut W, max: usize, now: Instant) -> Vec<(u64, Option<u64>)> {
        let mut sent = Vec::new();
        loop {
            let named = w.predecessor().and(w.inflight.back().map(|f| f.msg.seq));
            let Some(msg) = w.next_to_send(max) else {
                break;
            };
            assert_eq!(w.expected_last(), None, "one way at a time");
            sent.push((msg.seq, named));
            w.sent(msg, None, now + Duration::from_secs(5));
        }
        sent
    }

    #[test]
    fn by_message_id_the_predecessor_is_named_while_it_is_in_flight() {
        let t0 = Instant::now();
        let mut w = strict();
        w.set_stream_replicas(1);
        load(&mut w, 1..=4);
        assert_eq!(
            fill_by_id(&mut w, 3, t0),
            vec![(1, None), (2, Some(1)), (3, Some(2))],
            "pipelined from the start"
        );
        acked(&mut w, false, t0);
        // 2 expected 1, but the server forgot 1 (a restart): refused.
        let effects = settle(
            &mut w,
            Settle::ExpectationFailed("wrong last msg id".into()),
            t0,
        );
        assert_eq!(
            effects,
            vec![Effect::BreakerSuccess, Effect::CountResent(2)]
        );
        assert_eq!(
            fill_by_id(&mut w, 3, t0),
            vec![(2, None), (3, Some(2)), (4, Some(3))],
            "the oldest goes first naming nothing; the rest stays pipelined"
        );
    }

    #[test]
    fn an_ack_from_another_stream_is_a_dead_letter_not_a_delivery() {
        let t0 = Instant::now();
        let mut w = window().expect_stream(Some("HUB".into()));
        load(&mut w, 1..=2);
        fill(&mut w, 2, t0);
        let effects = acked(&mut w, false, t0); // from "S"
        assert!(
            matches!(&effects[..], [Effect::BreakerSuccess, Effect::DeadLetter { seq: 1, reason, .. }]
                if reason.contains("stream S instead of the expected HUB")),
            "{effects:?}"
        );
        let hub = Ack {
            stream: "HUB".into(),
            sequence: 1,
            duplicate: false,
        };
        let effects = settle(&mut w, Settle::Acked(hub), t0);
        assert_eq!(
            effects,
            vec![Effect::BreakerSuccess, Effect::CheckStream("HUB".into())]
        );
        let p = w.progress();
        assert_eq!((p.forwarded, p.low_water), (1, 3), "only HUB's ack counts");
    }
}
