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
use std::time::{Duration, Instant};

use crate::core::backoff::Backoff;

/// A source of the current time, injected so the state machine can be
/// tested without sleeping.
pub trait Clock: Send + Sync + 'static {
    /// The current instant.
    fn now(&self) -> Instant;
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
    pub(crate) fn code(self) -> u64 {
        match self {
            BreakerState::Closed => 0,
            BreakerState::Open => 1,
            BreakerState::HalfOpen => 2,
        }
    }

    pub(crate) fn from_code(code: u64) -> Self {
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

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// A breaker configuration without jitter, for the core's and the
    /// shell's tests.
    pub(crate) fn config(threshold: u32, initial: u64, max: u64) -> BreakerConfig {
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
}
