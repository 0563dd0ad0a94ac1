//! Exponential back-off with jitter: pure arithmetic, no clock, no sleeping.

use std::time::Duration;

/// An exponential back-off schedule: `initial * multiplier^attempt`, capped
/// at `max`, optionally with jitter.
///
/// ```
/// use std::time::Duration;
/// use natskit::Backoff;
///
/// let b = Backoff::new(Duration::from_millis(100), Duration::from_secs(2)).without_jitter();
/// assert_eq!(b.delay(0, 0.0), Duration::from_millis(100));
/// assert_eq!(b.delay(3, 0.0), Duration::from_millis(800));
/// assert_eq!(b.delay(10, 0.0), Duration::from_secs(2)); // capped
/// ```
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Backoff {
    /// Delay before the first retry.
    pub initial: Duration,
    /// Upper bound on any delay.
    pub max: Duration,
    /// Growth factor per attempt (at least 1.0).
    pub multiplier: f64,
    /// Jitter as a fraction of the delay, in `0.0..=1.0`: a delay `d` becomes
    /// a value in `[d * (1 - jitter), d]` ("equal jitter" when 0.5), so the
    /// cap is never exceeded and retries of many clients spread out.
    pub jitter: f64,
}

impl Backoff {
    /// Doubling from `initial` up to `max`, with 50% jitter.
    pub const fn new(initial: Duration, max: Duration) -> Self {
        Self {
            initial,
            max,
            multiplier: 2.0,
            jitter: 0.5,
        }
    }

    /// The same schedule without jitter.
    pub const fn without_jitter(mut self) -> Self {
        self.jitter = 0.0;
        self
    }

    /// The delay before retry number `attempt` (0-based), where `random` is
    /// a uniform sample from `0.0..1.0` supplied by the caller (tests pass a
    /// fixed value).
    pub fn delay(&self, attempt: u32, random: f64) -> Duration {
        let base = self.base_delay(attempt);
        let jitter = self.jitter.clamp(0.0, 1.0) * random.clamp(0.0, 1.0);
        base.mul_f64(1.0 - jitter)
    }

    /// The delay before retry number `attempt` without jitter.
    pub fn base_delay(&self, attempt: u32) -> Duration {
        let factor = self
            .multiplier
            .max(1.0)
            .powi(i32::try_from(attempt).unwrap_or(i32::MAX));
        let secs = self.initial.as_secs_f64() * factor;
        if !secs.is_finite() || secs >= self.max.as_secs_f64() {
            self.max
        } else {
            Duration::from_secs_f64(secs).min(self.max)
        }
    }

    /// The delay before retry number `attempt` with a fresh random sample.
    pub fn delay_random(&self, attempt: u32) -> Duration {
        self.delay(attempt, fastrand::f64())
    }
}

/// Retry settings of a request ([`RequestOptions::retry`](crate::RequestOptions::retry)) or a stream publish.
///
/// Defaults: 3 retries, 100 ms first back-off, doubling, capped at 2 s, with
/// jitter. Only no-responders and timeouts are retried.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct RetryConfig {
    /// Retries after the first attempt.
    pub max_retries: u32,
    /// Back-off schedule between attempts.
    pub backoff: Backoff,
}

impl Default for RetryConfig {
    fn default() -> Self {
        Self {
            max_retries: 3,
            backoff: Backoff::new(Duration::from_millis(100), Duration::from_secs(2)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn doubles_and_caps() {
        let b = Backoff::new(Duration::from_secs(1), Duration::from_secs(60)).without_jitter();
        let delays: Vec<u64> = (0..8).map(|a| b.delay(a, 0.9).as_secs()).collect();
        assert_eq!(delays, vec![1, 2, 4, 8, 16, 32, 60, 60]);
        assert_eq!(b.delay(u32::MAX, 0.0), Duration::from_secs(60));
    }

    #[test]
    fn jitter_stays_within_bounds() {
        let b = Backoff::new(Duration::from_millis(100), Duration::from_secs(2));
        assert_eq!(b.delay(0, 0.0), Duration::from_millis(100));
        assert_eq!(b.delay(0, 1.0), Duration::from_millis(50));
        for _ in 0..1000 {
            let d = b.delay_random(5);
            assert!(
                d >= Duration::from_secs(1) && d <= Duration::from_secs(2),
                "{d:?}"
            );
        }
    }

    #[test]
    fn multiplier_below_one_does_not_shrink() {
        let mut b =
            Backoff::new(Duration::from_millis(100), Duration::from_secs(2)).without_jitter();
        b.multiplier = 0.5;
        assert_eq!(b.delay(4, 0.0), Duration::from_millis(100));
    }
}
