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

use crate::backoff::Backoff;
use crate::error::Error;

/// A source of the current time, injected so the state machine can be
/// tested without sleeping.
pub trait Clock: Send + Sync + 'static {
    /// The current instant.
    fn now(&self) -> Instant;
}

/// The real monotonic clock.
#[derive(Debug, Clone, Copy, Default)]
pub struct SystemClock;

impl Clock for SystemClock {
    fn now(&self) -> Instant {
        Instant::now()
    }
}

/// State of a circuit breaker.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum BreakerState {
    /// Calls pass through.
    Closed,
    /// Calls fail fast.
    Open,
    /// One probe call is allowed through.
    HalfOpen,
}

impl BreakerState {
    fn code(self) -> u64 {
        match self {
            BreakerState::Closed => 0,
            BreakerState::Open => 1,
            BreakerState::HalfOpen => 2,
        }
    }

    fn from_code(code: u64) -> Self {
        match code & 3 {
            0 => BreakerState::Closed,
            1 => BreakerState::Open,
            _ => BreakerState::HalfOpen,
        }
    }
}

impl fmt::Display for BreakerState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            BreakerState::Closed => "closed",
            BreakerState::Open => "open",
            BreakerState::HalfOpen => "half-open",
        })
    }
}

/// Circuit breaker settings.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct BreakerConfig {
    /// Consecutive failures that open the breaker (at least 1). Default 5.
    pub threshold: u32,
    /// Open-time schedule: starts at `initial` (default 1 s), doubles per
    /// re-open, capped at `max` (default 60 s). Jitter defaults to 0.
    pub backoff: Backoff,
}

impl Default for BreakerConfig {
    fn default() -> Self {
        Self {
            threshold: 5,
            backoff: Backoff::new(Duration::from_secs(1), Duration::from_secs(60)).without_jitter(),
        }
    }
}

/// The answer to "may this call go through?".
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Admission {
    /// The call may proceed; report its outcome with this generation.
    Allowed {
        /// Generation the call was admitted in.
        generation: u64,
        /// Whether this call is the half-open probe.
        probe: bool,
    },
    /// The call must fail fast.
    Rejected {
        /// Time until the breaker lets a probe through.
        retry_after: Duration,
    },
}

/// A state change, returned by the mutating methods of [`BreakerCore`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Transition {
    /// State before.
    pub from: BreakerState,
    /// State after.
    pub to: BreakerState,
}

/// The pure breaker state machine. Every method takes the current time as
/// an argument; nothing here reads a clock, sleeps or locks.
///
/// ```
/// use std::time::{Duration, Instant};
/// use natskit::breaker::{Admission, BreakerConfig, BreakerCore, BreakerState};
///
/// let mut core = BreakerCore::new(BreakerConfig { threshold: 2, ..Default::default() });
/// let t0 = Instant::now();
/// for _ in 0..2 {
///     let Admission::Allowed { generation, probe } = core.admit(t0) else { panic!() };
///     core.record_failure(generation, probe, t0);
/// }
/// assert_eq!(core.state(), BreakerState::Open);
/// assert!(matches!(core.admit(t0), Admission::Rejected { .. }));
/// // one second later (the initial back-off) a single probe is let through
/// let t1 = t0 + Duration::from_secs(1);
/// assert!(matches!(core.admit(t1), Admission::Allowed { probe: true, .. }));
/// assert!(matches!(core.admit(t1), Admission::Rejected { .. }));
/// ```
#[derive(Debug, Clone)]
pub struct BreakerCore {
    config: BreakerConfig,
    state: BreakerState,
    consecutive_failures: u32,
    total_failures: u64,
    last_failure: Option<Instant>,
    /// Re-opens since the last close; the exponent of the open time.
    reopens: u32,
    /// Length of the current (or last) open period.
    open_for: Duration,
    open_until: Option<Instant>,
    /// When the current (or last) open period began.
    opened_at: Option<Instant>,
    probe_in_flight: bool,
    generation: u64,
    rng: fastrand::Rng,
}

impl BreakerCore {
    /// A closed breaker.
    pub fn new(config: BreakerConfig) -> Self {
        Self::with_rng(config, fastrand::Rng::new())
    }

    /// A closed breaker with a seeded random source for the jitter.
    pub fn with_rng(mut config: BreakerConfig, rng: fastrand::Rng) -> Self {
        config.threshold = config.threshold.max(1);
        Self {
            open_for: config.backoff.initial,
            config,
            state: BreakerState::Closed,
            consecutive_failures: 0,
            total_failures: 0,
            last_failure: None,
            reopens: 0,
            open_until: None,
            opened_at: None,
            probe_in_flight: false,
            generation: 0,
            rng,
        }
    }

    /// Current state. An open breaker whose time is up still reports `Open`
    /// until a call is admitted as the probe.
    pub fn state(&self) -> BreakerState {
        self.state
    }

    /// Current generation; bumped on every state change.
    pub fn generation(&self) -> u64 {
        self.generation
    }

    /// Consecutive failures counted in the closed state.
    pub fn consecutive_failures(&self) -> u32 {
        self.consecutive_failures
    }

    /// All failures ever recorded.
    pub fn total_failures(&self) -> u64 {
        self.total_failures
    }

    /// When the last failure was recorded.
    pub fn last_failure(&self) -> Option<Instant> {
        self.last_failure
    }

    /// The open time that applies now (while open) or would apply to the
    /// next opening (while closed).
    pub fn backoff(&self) -> Duration {
        match self.state {
            BreakerState::Closed => self.config.backoff.initial,
            _ => self.open_for,
        }
    }

    /// While half-open with the probe taken: how long other callers are
    /// told to wait (they are rejected); `None` otherwise.
    pub fn probe_busy_retry(&self) -> Option<Duration> {
        (self.state == BreakerState::HalfOpen && self.probe_in_flight)
            .then(|| self.config.backoff.initial.min(self.open_for))
    }

    /// When the current open period ends, while open.
    pub fn open_until(&self) -> Option<Instant> {
        match self.state {
            BreakerState::Open => self.open_until,
            _ => None,
        }
    }

    /// Time until a probe is allowed, while open.
    pub fn retry_after(&self, now: Instant) -> Option<Duration> {
        match (self.state, self.open_until) {
            (BreakerState::Open, Some(until)) => Some(until.saturating_duration_since(now)),
            _ => None,
        }
    }

    /// Decides whether a call may proceed at `now`.
    pub fn admit(&mut self, now: Instant) -> Admission {
        match self.state {
            BreakerState::Closed => Admission::Allowed {
                generation: self.generation,
                probe: false,
            },
            BreakerState::Open => {
                let until = self.open_until.unwrap_or(now);
                if now < until {
                    return Admission::Rejected {
                        retry_after: until - now,
                    };
                }
                self.set_state(BreakerState::HalfOpen);
                self.probe_in_flight = true;
                Admission::Allowed {
                    generation: self.generation,
                    probe: true,
                }
            }
            BreakerState::HalfOpen => {
                if self.probe_in_flight {
                    Admission::Rejected {
                        retry_after: self.config.backoff.initial.min(self.open_for),
                    }
                } else {
                    self.probe_in_flight = true;
                    Admission::Allowed {
                        generation: self.generation,
                        probe: true,
                    }
                }
            }
        }
    }

    /// Reports a call that succeeded (or failed for a reason that is not an
    /// infrastructure failure).
    pub fn record_success(&mut self, generation: u64, probe: bool) -> Option<Transition> {
        if generation != self.generation {
            return None;
        }
        match self.state {
            BreakerState::Closed => {
                self.consecutive_failures = 0;
                None
            }
            BreakerState::HalfOpen if probe => Some(self.close()),
            _ => None,
        }
    }

    /// Reports an infrastructure failure of a call admitted in `generation`.
    pub fn record_failure(
        &mut self,
        generation: u64,
        probe: bool,
        now: Instant,
    ) -> Option<Transition> {
        if generation != self.generation {
            return None;
        }
        self.total_failures += 1;
        self.last_failure = Some(now);
        match self.state {
            BreakerState::Closed => {
                self.consecutive_failures += 1;
                (self.consecutive_failures >= self.config.threshold).then(|| self.open(now, false))
            }
            BreakerState::HalfOpen if probe => Some(self.open(now, true)),
            _ => None,
        }
    }

    /// A probe was admitted but its call ended without an outcome (for
    /// example, its future was dropped): let the next call probe instead.
    pub fn release_probe(&mut self, generation: u64) {
        if generation == self.generation && self.state == BreakerState::HalfOpen {
            self.probe_in_flight = false;
        }
    }

    /// A connection attempt made outside [`admit`](Self::admit) (the
    /// client's own reconnect loop) failed. While open with the time up, it
    /// counts as the failed probe.
    pub fn connection_failed(&mut self, now: Instant) -> Option<Transition> {
        match self.state {
            BreakerState::Closed => self.record_failure(self.generation, false, now),
            BreakerState::HalfOpen => self.record_failure(self.generation, true, now),
            BreakerState::Open => {
                if self.open_until.is_some_and(|until| now >= until) {
                    self.total_failures += 1;
                    self.last_failure = Some(now);
                    Some(self.open(now, true))
                } else {
                    None
                }
            }
        }
    }

    /// A connection was established by the client's own reconnect loop.
    pub fn connection_succeeded(&mut self) -> Option<Transition> {
        match self.state {
            BreakerState::Closed => {
                self.consecutive_failures = 0;
                None
            }
            _ => Some(self.close()),
        }
    }

    /// The client's own background probe (a cheap round trip through the
    /// server, never user traffic) succeeded while the breaker is open: the
    /// server is reachable again, so the open period ends early and the next
    /// call is admitted as the half-open probe. User traffic is still risked
    /// at most once per initial back-off: the period never ends sooner than
    /// that after it began. Returns whether the open period was shortened.
    ///
    /// ```
    /// use std::time::{Duration, Instant};
    /// use natskit::breaker::{Admission, BreakerConfig, BreakerCore};
    ///
    /// let mut core = BreakerCore::new(BreakerConfig { threshold: 1, ..Default::default() });
    /// let t0 = Instant::now();
    /// let Admission::Allowed { generation, probe } = core.admit(t0) else { panic!() };
    /// core.record_failure(generation, probe, t0); // open for 1 s
    /// let t1 = t0 + Duration::from_secs(1);
    /// let Admission::Allowed { generation, probe } = core.admit(t1) else { panic!() };
    /// core.record_failure(generation, probe, t1); // the probe failed: open for 2 s
    /// let t2 = t1 + Duration::from_millis(1200);
    /// assert!(matches!(core.admit(t2), Admission::Rejected { .. }));
    /// assert!(core.server_reachable(t2)); // a background round trip answered
    /// assert!(matches!(core.admit(t2), Admission::Allowed { probe: true, .. }));
    /// ```
    pub fn server_reachable(&mut self, now: Instant) -> bool {
        if self.state != BreakerState::Open {
            return false;
        }
        let (Some(until), Some(opened)) = (self.open_until, self.opened_at) else {
            return false;
        };
        let earliest = opened + self.config.backoff.initial.min(self.open_for);
        let new_until = now.max(earliest);
        if new_until < until {
            self.open_until = Some(new_until);
            true
        } else {
            false
        }
    }

    /// Opens the breaker by hand, for the current back-off.
    pub fn trip(&mut self, now: Instant) -> Option<Transition> {
        (self.state != BreakerState::Open).then(|| self.open(now, false))
    }

    /// Closes the breaker by hand and resets counts and back-off.
    pub fn reset(&mut self) -> Option<Transition> {
        let transition = (self.state != BreakerState::Closed).then(|| self.close());
        self.consecutive_failures = 0;
        transition
    }

    fn open(&mut self, now: Instant, reopen: bool) -> Transition {
        if reopen {
            self.reopens = self.reopens.saturating_add(1);
        }
        let random = self.rng.f64();
        self.open_for = self.config.backoff.delay(self.reopens, random);
        self.open_until = Some(now + self.open_for);
        self.opened_at = Some(now);
        self.probe_in_flight = false;
        self.set_state(BreakerState::Open)
    }

    fn close(&mut self) -> Transition {
        self.consecutive_failures = 0;
        self.reopens = 0;
        self.open_for = self.config.backoff.initial;
        self.open_until = None;
        self.probe_in_flight = false;
        self.set_state(BreakerState::Closed)
    }

    fn set_state(&mut self, to: BreakerState) -> Transition {
        let from = self.state;
        self.state = to;
        self.generation += 1;
        Transition { from, to }
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
                probe: false,
                settled: false,
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
                probe,
                settled: false,
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
        // The core never panics while locked; recover from poisoning anyway.
        self.core
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
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
    probe: bool,
    settled: bool,
}

impl Permit<'_> {
    /// Whether this permit is the half-open probe.
    pub fn is_probe(&self) -> bool {
        self.probe
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
        self.settled = true;
        self.breaker.settle(self.generation, self.probe, failed);
    }
}

impl Drop for Permit<'_> {
    #[inline]
    fn drop(&mut self) {
        if !self.settled && self.probe {
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
    use std::sync::atomic::AtomicUsize;

    fn config(threshold: u32, initial: u64, max: u64) -> BreakerConfig {
        BreakerConfig {
            threshold,
            backoff: Backoff::new(Duration::from_secs(initial), Duration::from_secs(max))
                .without_jitter(),
        }
    }

    fn allowed(core: &mut BreakerCore, now: Instant) -> (u64, bool) {
        match core.admit(now) {
            Admission::Allowed { generation, probe } => (generation, probe),
            Admission::Rejected { retry_after } => panic!("rejected, retry after {retry_after:?}"),
        }
    }

    fn fail_n(core: &mut BreakerCore, n: u32, now: Instant) {
        for _ in 0..n {
            let (g, p) = allowed(core, now);
            core.record_failure(g, p, now);
        }
    }

    #[test]
    fn opens_at_threshold_and_fails_fast() {
        let t0 = Instant::now();
        let mut core = BreakerCore::new(config(5, 1, 60));
        fail_n(&mut core, 4, t0);
        assert_eq!(core.state(), BreakerState::Closed);
        assert_eq!(core.consecutive_failures(), 4);
        fail_n(&mut core, 1, t0);
        assert_eq!(core.state(), BreakerState::Open);
        assert_eq!(
            core.admit(t0 + Duration::from_millis(400)),
            Admission::Rejected {
                retry_after: Duration::from_millis(600)
            }
        );
    }

    #[test]
    fn success_resets_the_count() {
        let t0 = Instant::now();
        let mut core = BreakerCore::new(config(3, 1, 60));
        fail_n(&mut core, 2, t0);
        let (g, p) = allowed(&mut core, t0);
        core.record_success(g, p);
        fail_n(&mut core, 2, t0);
        assert_eq!(core.state(), BreakerState::Closed);
        assert_eq!(core.total_failures(), 4);
    }

    #[test]
    fn half_open_lets_exactly_one_probe_through() {
        let t0 = Instant::now();
        let mut core = BreakerCore::new(config(1, 1, 60));
        fail_n(&mut core, 1, t0);
        let t1 = t0 + Duration::from_secs(1);
        let (g, probe) = allowed(&mut core, t1);
        assert!(probe);
        assert_eq!(core.state(), BreakerState::HalfOpen);
        for _ in 0..10 {
            assert!(matches!(core.admit(t1), Admission::Rejected { .. }));
        }
        assert_eq!(
            core.record_success(g, true),
            Some(Transition {
                from: BreakerState::HalfOpen,
                to: BreakerState::Closed
            })
        );
        assert!(matches!(
            core.admit(t1),
            Admission::Allowed { probe: false, .. }
        ));
    }

    #[test]
    fn backoff_doubles_to_the_cap_and_resets_on_close() {
        let mut now = Instant::now();
        let mut core = BreakerCore::new(config(1, 1, 8));
        fail_n(&mut core, 1, now);
        let mut open_times = vec![core.backoff().as_secs()];
        for _ in 0..5 {
            now += core.backoff();
            let (g, p) = allowed(&mut core, now);
            assert!(p);
            core.record_failure(g, p, now);
            open_times.push(core.backoff().as_secs());
        }
        assert_eq!(open_times, vec![1, 2, 4, 8, 8, 8]);
        now += core.backoff();
        let (g, p) = allowed(&mut core, now);
        core.record_success(g, p);
        assert_eq!(core.state(), BreakerState::Closed);
        fail_n(&mut core, 1, now);
        assert_eq!(core.backoff(), Duration::from_secs(1));
    }

    #[test]
    fn stale_results_are_ignored() {
        let t0 = Instant::now();
        let mut core = BreakerCore::new(config(1, 1, 60));
        let (old_gen, _) = allowed(&mut core, t0);
        fail_n(&mut core, 1, t0); // opens
        let t1 = t0 + Duration::from_secs(1);
        let (probe_gen, _) = allowed(&mut core, t1);
        // A success from before the outage must not close the breaker.
        assert_eq!(core.record_success(old_gen, false), None);
        assert_eq!(core.state(), BreakerState::HalfOpen);
        // Nor can an old failure re-open it after the probe closed it.
        core.record_success(probe_gen, true);
        assert_eq!(core.record_failure(old_gen, false, t1), None);
        assert_eq!(core.state(), BreakerState::Closed);
        assert_eq!(core.consecutive_failures(), 0);
    }

    #[test]
    fn dropped_probe_frees_the_slot() {
        let t0 = Instant::now();
        let mut core = BreakerCore::new(config(1, 1, 60));
        fail_n(&mut core, 1, t0);
        let t1 = t0 + Duration::from_secs(1);
        let (g, _) = allowed(&mut core, t1);
        core.release_probe(g);
        let (_, probe) = allowed(&mut core, t1);
        assert!(probe);
    }

    #[test]
    fn reconnect_loop_failures_drive_the_breaker() {
        let t0 = Instant::now();
        let mut core = BreakerCore::new(config(2, 1, 60));
        core.connection_failed(t0);
        assert_eq!(core.state(), BreakerState::Closed);
        core.connection_failed(t0);
        assert_eq!(core.state(), BreakerState::Open);
        // Not yet time: an attempt cannot have been made, nothing changes.
        assert_eq!(core.connection_failed(t0), None);
        // At the end of the open period the attempt was the probe: re-open, doubled.
        core.connection_failed(t0 + Duration::from_secs(1));
        assert_eq!(core.backoff(), Duration::from_secs(2));
        core.connection_succeeded();
        assert_eq!(core.state(), BreakerState::Closed);
        assert_eq!(core.backoff(), Duration::from_secs(1));
    }

    #[test]
    fn trip_and_reset() {
        let t0 = Instant::now();
        let mut core = BreakerCore::new(config(5, 1, 60));
        core.trip(t0);
        assert_eq!(core.state(), BreakerState::Open);
        core.reset();
        assert_eq!(core.state(), BreakerState::Closed);
        assert!(matches!(core.admit(t0), Admission::Allowed { .. }));
    }

    #[test]
    fn jitter_keeps_open_time_within_bounds() {
        let t0 = Instant::now();
        let mut cfg = config(1, 10, 60);
        cfg.backoff.jitter = 0.5;
        let mut core = BreakerCore::with_rng(cfg, fastrand::Rng::with_seed(7));
        fail_n(&mut core, 1, t0);
        let b = core.backoff();
        assert!(
            b >= Duration::from_secs(5) && b <= Duration::from_secs(10),
            "{b:?}"
        );
    }

    #[test]
    fn server_reachable_ends_the_open_period_but_not_before_the_initial_backoff() {
        let t0 = Instant::now();
        let mut core = BreakerCore::new(config(1, 1, 60));
        fail_n(&mut core, 1, t0); // open for 1 s
        let t1 = t0 + Duration::from_secs(1);
        let (g, p) = allowed(&mut core, t1);
        core.record_failure(g, p, t1); // re-open for 2 s
        let t2 = t1 + Duration::from_secs(2);
        let (g, p) = allowed(&mut core, t2);
        core.record_failure(g, p, t2); // re-open for 4 s at t2
        assert_eq!(core.backoff(), Duration::from_secs(4));
        // Too soon after opening: only brought forward to t2 + 1 s.
        assert!(core.server_reachable(t2 + Duration::from_millis(100)));
        assert!(matches!(
            core.admit(t2 + Duration::from_millis(500)),
            Admission::Rejected { .. }
        ));
        let (_, probe) = allowed(&mut core, t2 + Duration::from_secs(1));
        assert!(probe, "admitted as the half-open probe");
        // Closed or half-open: nothing to shorten.
        assert!(!core.server_reachable(t2 + Duration::from_secs(1)));
    }

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
