//! The circuit breaker: a pure state machine ([`BreakerCore`]) with an
//! injected clock, and a thread-safe shell ([`CircuitBreaker`]) whose closed
//! path costs one atomic load.
//!
//! - **Closed**: calls pass; consecutive infrastructure failures are counted
//!   and any success resets the count. At the threshold the breaker opens.
//! - **Open**: calls fail fast with [`Error::CircuitOpen`] for the open time,
//!   which starts at the initial back-off, doubles on every re-open without a
//!   close in between, and is capped at the maximum back-off.
//! - **Half-open**: once the open time has passed, exactly one call (the
//!   probe) goes through; the others still fail fast. A successful probe
//!   closes the breaker and resets the back-off; a failed one re-opens it.
//!
//! Results of calls admitted before a state change are ignored (each state
//! change bumps a generation counter), so a slow call from before an outage
//! cannot close or re-open the breaker.

use std::fmt;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use crate::core::error::Error;
use crate::core::sync::lock;

pub use crate::core::breaker::{
    Admission, BreakerConfig, BreakerCore, BreakerState, Clock, Transition,
};

/// The real monotonic clock.
#[derive(Debug, Clone, Copy, Default)]
pub struct SystemClock;

impl Clock for SystemClock {
    fn now(&self) -> Instant {
        Instant::now()
    }
}

/// Decides whether an error counts against the breaker.
pub type FailurePredicate = Arc<dyn Fn(&Error) -> bool + Send + Sync>;

/// Called with every state change, under no lock.
pub type TransitionListener = Arc<dyn Fn(Transition) + Send + Sync>;

/// Thread-safe circuit breaker around [`BreakerCore`].
///
/// [`acquire`](Self::acquire) on a closed breaker is one atomic load, with no
/// lock and no allocation; reporting a success is one more load unless
/// failures were counted.
pub struct CircuitBreaker {
    core: Mutex<BreakerCore>,
    /// `state code | generation << 2`, mirrored after every change.
    fast: AtomicU64,
    /// Mirror of the consecutive failure count.
    failures: AtomicU32,
    /// While open: nanoseconds after `epoch` when the open period ends (0
    /// otherwise), so rejections need neither the lock nor the core.
    open_until: AtomicU64,
    /// While half-open with the probe taken: the retry-after in nanoseconds
    /// told to everyone else (0 otherwise), so they are rejected without
    /// the lock too.
    probe_busy: AtomicU64,
    epoch: Instant,
    clock: Arc<dyn Clock>,
    is_failure: FailurePredicate,
    listener: Option<TransitionListener>,
}

impl fmt::Debug for CircuitBreaker {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("CircuitBreaker")
            .field("state", &self.state())
            .field(
                "consecutive_failures",
                &self.failures.load(Ordering::Relaxed),
            )
            .finish_non_exhaustive()
    }
}

impl CircuitBreaker {
    /// A breaker on the system clock, classifying errors with
    /// [`Error::is_infrastructure`].
    pub fn new(config: BreakerConfig) -> Self {
        Self::with_parts(config, Arc::new(SystemClock), None, None)
    }

    /// A breaker with an injected clock, an optional custom failure predicate
    /// and an optional transition listener.
    pub fn with_parts(
        config: BreakerConfig,
        clock: Arc<dyn Clock>,
        is_failure: Option<FailurePredicate>,
        listener: Option<TransitionListener>,
    ) -> Self {
        Self {
            core: Mutex::new(BreakerCore::new(config)),
            fast: AtomicU64::new(0),
            failures: AtomicU32::new(0),
            open_until: AtomicU64::new(0),
            probe_busy: AtomicU64::new(0),
            epoch: clock.now(),
            clock,
            is_failure: is_failure.unwrap_or_else(|| Arc::new(Error::is_infrastructure)),
            listener,
        }
    }

    /// Current state (see [`BreakerCore::state`]).
    pub fn state(&self) -> BreakerState {
        BreakerState::from_code(self.fast.load(Ordering::Acquire))
    }

    /// Admits a call or fails fast with [`Error::CircuitOpen`].
    ///
    /// # Errors
    /// [`Error::CircuitOpen`] while open, or half-open with the probe taken.
    #[inline]
    pub fn acquire(&self) -> Result<Permit<'_>, Error> {
        let fast = self.fast.load(Ordering::Acquire);
        if fast & 3 == 0 {
            return Ok(Permit {
                breaker: self,
                generation: fast >> 2,
                flags: 0,
            });
        }
        let now = self.clock.now();
        if fast & 3 == BreakerState::Open.code() {
            // Open and not yet due: reject without the lock, so callers do
            // not convoy on it during an outage.
            let until = self.open_until.load(Ordering::Acquire);
            let at = self.nanos_since_epoch(now);
            if until != 0 && at < until {
                return Err(Error::CircuitOpen {
                    retry_after: Duration::from_nanos(until - at),
                });
            }
        } else if fast & 3 == BreakerState::HalfOpen.code() {
            // The probe is out: everyone else is turned away without the
            // lock (4 threads convoyed on it at 2.2 us a call).
            let busy = self.probe_busy.load(Ordering::Acquire);
            if busy != 0 {
                return Err(Error::CircuitOpen {
                    retry_after: Duration::from_nanos(busy),
                });
            }
        }
        let (admission, transition) = self.mutate(|core| {
            let before = core.state();
            let admission = core.admit(now);
            let after = core.state();
            (
                admission,
                (before != after).then_some(Transition {
                    from: before,
                    to: after,
                }),
            )
        });
        self.notify(transition);
        match admission {
            Admission::Allowed { generation, probe } => Ok(Permit {
                breaker: self,
                generation,
                flags: if probe { PROBE } else { 0 },
            }),
            Admission::Rejected { retry_after } => Err(Error::CircuitOpen { retry_after }),
        }
    }

    /// Whether `err` counts against the breaker.
    pub fn counts(&self, err: &Error) -> bool {
        (self.is_failure)(err)
    }

    /// See [`BreakerCore::connection_failed`].
    pub fn connection_failed(&self) {
        let now = self.clock.now();
        let transition = self.mutate(|core| core.connection_failed(now));
        self.notify(transition);
    }

    /// See [`BreakerCore::connection_succeeded`].
    pub fn connection_succeeded(&self) {
        if self.fast.load(Ordering::Acquire) & 3 == 0 && self.failures.load(Ordering::Relaxed) == 0
        {
            return;
        }
        let transition = self.mutate(BreakerCore::connection_succeeded);
        self.notify(transition);
    }

    /// See [`BreakerCore::server_reachable`].
    pub fn server_reachable(&self) -> bool {
        if self.fast.load(Ordering::Acquire) & 3 == 0 {
            return false;
        }
        let now = self.clock.now();
        self.mutate(|core| core.server_reachable(now))
    }

    /// Opens the breaker by hand.
    pub fn trip(&self) {
        let now = self.clock.now();
        let transition = self.mutate(|core| core.trip(now));
        self.notify(transition);
    }

    /// Closes the breaker by hand and resets its counts and back-off.
    pub fn reset(&self) {
        let transition = self.mutate(BreakerCore::reset);
        self.notify(transition);
    }

    /// Time until the next probe, while open.
    pub fn retry_after(&self) -> Option<Duration> {
        let now = self.clock.now();
        self.lock().retry_after(now)
    }

    /// A snapshot of the counters.
    pub fn snapshot(&self) -> BreakerSnapshot {
        let core = self.lock();
        BreakerSnapshot {
            state: core.state(),
            consecutive_failures: core.consecutive_failures(),
            total_failures: core.total_failures(),
            last_failure: core.last_failure(),
            backoff: core.backoff(),
        }
    }

    fn lock(&self) -> MutexGuard<'_, BreakerCore> {
        lock(&self.core)
    }

    fn mutate<R>(&self, f: impl FnOnce(&mut BreakerCore) -> R) -> R {
        let mut core = self.lock();
        let result = f(&mut core);
        self.fast.store(
            core.state().code() | (core.generation() << 2),
            Ordering::Release,
        );
        self.failures
            .store(core.consecutive_failures(), Ordering::Relaxed);
        let until = core
            .open_until()
            .map_or(0, |until| self.nanos_since_epoch(until).max(1));
        self.open_until.store(until, Ordering::Release);
        let busy = core.probe_busy_retry().map_or(0, |d| {
            u64::try_from(d.as_nanos()).unwrap_or(u64::MAX).max(1)
        });
        self.probe_busy.store(busy, Ordering::Release);
        result
    }

    fn nanos_since_epoch(&self, at: Instant) -> u64 {
        u64::try_from(at.saturating_duration_since(self.epoch).as_nanos()).unwrap_or(u64::MAX)
    }

    fn notify(&self, transition: Option<Transition>) {
        if let (Some(transition), Some(listener)) = (transition, &self.listener) {
            listener(transition);
        }
    }

    #[inline]
    fn settle(&self, generation: u64, probe: bool, failed: bool) {
        if !failed && !probe && self.failures.load(Ordering::Relaxed) == 0 {
            return; // closed-path success with nothing to reset
        }
        self.settle_slow(generation, probe, failed);
    }

    #[cold]
    fn settle_slow(&self, generation: u64, probe: bool, failed: bool) {
        let now = self.clock.now();
        let transition = self.mutate(|core| {
            if failed {
                core.record_failure(generation, probe, now)
            } else {
                core.record_success(generation, probe)
            }
        });
        self.notify(transition);
    }
}

/// Counters of a breaker at one moment.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BreakerSnapshot {
    /// State.
    pub state: BreakerState,
    /// Consecutive failures in the closed state.
    pub consecutive_failures: u32,
    /// All failures recorded.
    pub total_failures: u64,
    /// When the last failure was recorded.
    pub last_failure: Option<Instant>,
    /// Current or next open time.
    pub backoff: Duration,
}

/// Permission for one call. Report its outcome with [`record`](Self::record)
/// (or [`success`](Self::success)/[`failure`](Self::failure)); a probe permit
/// dropped without an outcome lets the next call probe.
#[must_use = "report the outcome of the call"]
#[derive(Debug)]
pub struct Permit<'a> {
    breaker: &'a CircuitBreaker,
    generation: u64,
    /// [`PROBE`] and [`SETTLED`], in a whole word: two `bool`s here were
    /// written a byte each and then copied as one word with the permit
    /// (moved into every publish future), a store-forwarding stall on
    /// every core publish (`perf annotate`; with the word, the publish
    /// loop's own samples on its thread fell from 10.8% to 7.0%, and 28
    /// instructions a publish less).
    flags: u64,
}

/// The permit is the half-open probe.
const PROBE: u64 = 1;
/// The permit's outcome was reported.
const SETTLED: u64 = 2;

impl Permit<'_> {
    /// Whether this permit is the half-open probe.
    pub fn is_probe(&self) -> bool {
        self.flags & PROBE != 0
    }

    /// Reports the call's result and passes it through. An error the
    /// breaker's predicate counts is a failure; an error that proves nothing
    /// about the server ([`Error::is_breaker_neutral`]: not connected,
    /// closed, circuit open, invalid input) settles nothing; any other
    /// outcome is an answer from the server and counts as a success.
    pub fn record<T>(self, result: Result<T, Error>) -> Result<T, Error> {
        match &result {
            Ok(_) => self.finish(false),
            Err(e) if self.breaker.counts(e) => self.finish(true),
            Err(e) if e.is_breaker_neutral() => drop(self),
            Err(_) => self.finish(false),
        }
        result
    }

    /// Reports the result of a call that did not wait for the server (a
    /// core publish handed to the client's buffer): a counted error is a
    /// failure, anything else settles nothing, since a buffered publish
    /// does not prove the server reachable.
    #[inline]
    pub fn record_unconfirmed<T>(self, result: Result<T, Error>) -> Result<T, Error> {
        if let Err(e) = &result {
            self.unconfirmed_failure(e);
        }
        result
    }

    #[cold]
    fn unconfirmed_failure(self, error: &Error) {
        if self.breaker.counts(error) {
            self.finish(true);
        }
    }

    /// Reports success (or a non-infrastructure outcome).
    #[inline]
    pub fn success(self) {
        self.finish(false);
    }

    /// Reports an infrastructure failure.
    pub fn failure(self) {
        self.finish(true);
    }

    #[inline]
    fn finish(mut self, failed: bool) {
        self.flags |= SETTLED;
        self.breaker
            .settle(self.generation, self.flags & PROBE != 0, failed);
    }
}

impl Drop for Permit<'_> {
    #[inline]
    fn drop(&mut self) {
        if self.flags == PROBE {
            self.release();
        }
    }
}

impl Permit<'_> {
    #[cold]
    fn release(&self) {
        let generation = self.generation;
        self.breaker.mutate(|core| core.release_probe(generation));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::core::breaker::tests::config;
    use std::sync::atomic::AtomicUsize;

    #[test]
    fn neutral_outcomes_settle_nothing() {
        let clock = Arc::new(ManualClock(Mutex::new(Instant::now())));
        let breaker = CircuitBreaker::with_parts(config(3, 1, 60), clock, None, None);
        for _ in 0..2 {
            let _ = breaker
                .acquire()
                .unwrap()
                .record::<()>(Err(Error::ConnectionTimeout(Duration::from_secs(1))));
        }
        assert_eq!(breaker.snapshot().consecutive_failures, 2);
        // Not connected, closed, invalid input, a buffered publish: no reset.
        let _ = breaker
            .acquire()
            .unwrap()
            .record::<()>(Err(Error::NotConnected));
        let _ = breaker.acquire().unwrap().record::<()>(Err(Error::Closed));
        let _ = breaker
            .acquire()
            .unwrap()
            .record::<()>(Err(Error::InvalidArgument("x".into())));
        let _ = breaker.acquire().unwrap().record_unconfirmed::<()>(Ok(()));
        assert_eq!(breaker.snapshot().consecutive_failures, 2);
        // A buffered publish that failed to send still counts.
        let _ = breaker
            .acquire()
            .unwrap()
            .record_unconfirmed::<()>(Err(Error::ConnectionTimeout(Duration::from_secs(1))));
        assert_eq!(breaker.state(), BreakerState::Open);
        // An answer from the server (no responders) is a success.
        breaker.reset();
        let _ = breaker
            .acquire()
            .unwrap()
            .record::<()>(Err(Error::ConnectionTimeout(Duration::from_secs(1))));
        let _ = breaker
            .acquire()
            .unwrap()
            .record::<()>(Err(Error::NoResponders {
                subject: "x".into(),
            }));
        assert_eq!(breaker.snapshot().consecutive_failures, 0);
    }

    struct ManualClock(Mutex<Instant>);
    impl Clock for ManualClock {
        fn now(&self) -> Instant {
            *self.0.lock().unwrap()
        }
    }

    /// While the probe is out, other callers are turned away (on the
    /// lock-free path) with the initial back-off as retry-after; once the
    /// probe is released, the next caller becomes the probe.
    #[test]
    fn half_open_rejections_while_the_probe_is_out() {
        let clock = Arc::new(ManualClock(Mutex::new(Instant::now())));
        let breaker = CircuitBreaker::with_parts(config(1, 2, 60), clock.clone(), None, None);
        breaker.trip();
        *clock.0.lock().unwrap() += Duration::from_secs(2);
        let probe = breaker.acquire().unwrap();
        assert!(probe.is_probe());
        assert_eq!(breaker.state(), BreakerState::HalfOpen);
        for _ in 0..3 {
            match breaker.acquire() {
                Err(Error::CircuitOpen { retry_after }) => {
                    assert_eq!(retry_after, Duration::from_secs(2));
                }
                other => panic!(
                    "expected a rejection, got {:?}",
                    other.map(|p| p.is_probe())
                ),
            }
        }
        drop(probe);
        let next = breaker.acquire().unwrap();
        assert!(next.is_probe(), "the released slot goes to the next caller");
        next.success();
        assert_eq!(breaker.state(), BreakerState::Closed);
        assert!(!breaker.acquire().unwrap().is_probe());
    }

    #[test]
    fn shell_classifies_and_notifies() {
        let clock = Arc::new(ManualClock(Mutex::new(Instant::now())));
        let transitions = Arc::new(AtomicUsize::new(0));
        let seen = transitions.clone();
        let breaker = CircuitBreaker::with_parts(
            config(2, 1, 60),
            clock.clone(),
            None,
            Some(Arc::new(move |_| {
                seen.fetch_add(1, Ordering::SeqCst);
            })),
        );
        // Application outcomes never count.
        for _ in 0..10 {
            let permit = breaker.acquire().unwrap();
            let _ = permit.record::<()>(Err(Error::NoResponders {
                subject: "x".into(),
            }));
        }
        assert_eq!(breaker.state(), BreakerState::Closed);
        for _ in 0..2 {
            let permit = breaker.acquire().unwrap();
            let _ = permit.record::<()>(Err(Error::ConnectionTimeout(Duration::from_secs(1))));
        }
        assert_eq!(breaker.state(), BreakerState::Open);
        assert!(breaker.acquire().unwrap_err().is_circuit_open());
        *clock.0.lock().unwrap() += Duration::from_secs(1);
        let probe = breaker.acquire().unwrap();
        assert!(probe.is_probe());
        assert!(breaker.acquire().is_err(), "second caller must not probe");
        drop(probe); // no outcome: slot freed
        breaker.acquire().unwrap().success();
        assert_eq!(breaker.state(), BreakerState::Closed);
        // closed -> open, open -> half-open, half-open -> closed
        assert_eq!(transitions.load(Ordering::SeqCst), 3);
    }
}
