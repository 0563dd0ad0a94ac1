//! The one retry helper of natskit's loops, with their named back-off
//! schedules: each loop asks for its next delay, and most wait for it or
//! for a reconnect, whichever comes first (after a reconnect there is no
//! reason to wait any longer).

use std::time::Duration;

use tokio::sync::watch;

use crate::core::backoff::Backoff;

/// Reads and exactly-once writes through an election or a restart (KV):
/// 25 ms doubling to 500 ms, so a new leader is found within a few hundred
/// milliseconds of its election.
pub(crate) const ELECTION: Backoff =
    Backoff::new(Duration::from_millis(25), Duration::from_millis(500));

/// Re-creating a lost consumer or KV watch: 100 ms doubling to 5 s.
pub(crate) const RECREATE: Backoff =
    Backoff::new(Duration::from_millis(100), Duration::from_secs(5));

/// The outbox forwarder's go-backs after a failed send: 100 ms doubling to
/// 2 s (after a partition heals without a reconnect nothing tells the
/// forwarder; the pause is what it waits before trying again).
#[cfg(feature = "outbox")]
pub(crate) const OUTBOX_RESEND: Backoff =
    Backoff::new(Duration::from_millis(100), Duration::from_secs(2));

/// The default of a stream publish's retries: 100 ms doubling to 1 s.
pub(crate) const STREAM_PUBLISH: Backoff =
    Backoff::new(Duration::from_millis(100), Duration::from_secs(1));

/// The waits of one retry loop.
#[derive(Debug, Clone)]
pub(crate) struct Retry {
    schedule: Backoff,
    attempt: u32,
}

impl Retry {
    /// A loop on `schedule`, before its first retry.
    pub(crate) fn new(schedule: Backoff) -> Self {
        Self {
            schedule,
            attempt: 0,
        }
    }

    /// Retries so far.
    pub(crate) fn attempt(&self) -> u32 {
        self.attempt
    }

    /// The delay before the next retry (jittered), counting it.
    pub(crate) fn next_delay(&mut self) -> Duration {
        let delay = self.schedule.delay_random(self.attempt);
        self.attempt = self.attempt.saturating_add(1);
        delay
    }

    /// Back to the first delay (the operation succeeded).
    pub(crate) fn reset(&mut self) {
        self.attempt = 0;
    }

    /// Waits the next delay.
    pub(crate) async fn wait(&mut self) {
        tokio::time::sleep(self.next_delay()).await;
    }

    /// Waits the next delay, or until the connection epoch changes (a
    /// reconnect), whichever comes first.
    pub(crate) async fn wait_or_reconnect(&mut self, epoch: &mut watch::Receiver<u64>) {
        let delay = self.next_delay();
        tokio::select! {
            () = tokio::time::sleep(delay) => {}
            _ = epoch.changed() => {}
        }
    }
}
