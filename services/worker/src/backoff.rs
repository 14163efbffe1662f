//! Retry delays for transient failures: exponential (from `backon`) with full jitter, so
//! jobs that failed together do not come back together.

use backon::{BackoffBuilder as _, ExponentialBuilder};
use std::time::Duration;

/// Bounds of the back-off.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Backoff {
    /// Ceiling of the first retry's delay.
    pub base: Duration,
    /// Largest delay.
    pub max: Duration,
}

impl Default for Backoff {
    fn default() -> Self {
        Self {
            base: Duration::from_secs(1),
            max: Duration::from_secs(300),
        }
    }
}

impl Backoff {
    /// The exponential ceiling before retry number `attempt` (1 = first retry).
    pub fn ceiling(&self, attempt: u32) -> Duration {
        ExponentialBuilder::default()
            .with_min_delay(self.base)
            .with_max_delay(self.max)
            .with_factor(2.0)
            .without_max_times()
            .build()
            .nth(attempt.saturating_sub(1) as usize)
            .unwrap_or(self.max)
    }

    /// The delay before retry number `attempt`: uniform in `[0, ceiling]` (full jitter).
    pub fn delay(&self, attempt: u32) -> Duration {
        let ceiling = self.ceiling(attempt);
        ceiling.mul_f64(rand::random::<f64>())
    }

    /// The delay before retry number `attempt` of a throttled job: the provider's
    /// `Retry-After` when it is a usable wait, capped at [`MAX_RETRY_AFTER`]; the
    /// back-off when there is none, or when it asks for less than a second (`0`, or a
    /// date already past through clock skew) — taken literally, that would spend every
    /// delivery of the job at once on a provider that asked us to slow down.
    pub fn throttled(&self, attempt: u32, retry_after: Option<Duration>) -> Duration {
        match retry_after {
            Some(wait) if wait >= Duration::from_secs(1) => wait.min(MAX_RETRY_AFTER),
            _ => self.delay(attempt),
        }
    }

    /// The delay before retry number `attempt` of a transient failure: the back-off, but
    /// never sooner than the provider's `Retry-After` (capped at [`MAX_RETRY_AFTER`]) when
    /// its 5xx answer had one.
    pub fn transient(&self, attempt: u32, retry_after: Option<Duration>) -> Duration {
        let delay = self.delay(attempt);
        match retry_after {
            Some(wait) => delay.max(wait.min(MAX_RETRY_AFTER)),
            None => delay,
        }
    }
}

/// The longest a `Retry-After` holds a job back. A receiver's URL is the producer's, and
/// its `Retry-After: 4294967295` must not park a job for a century.
pub const MAX_RETRY_AFTER: Duration = Duration::from_secs(3_600);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ceilings_double_up_to_the_max() {
        let b = Backoff {
            base: Duration::from_millis(100),
            max: Duration::from_secs(1),
        };
        // backon multiplies in f32: compare whole milliseconds.
        let ms = |attempt| b.ceiling(attempt).as_millis();
        assert_eq!(ms(1), 100);
        assert_eq!(ms(2), 200);
        assert_eq!(ms(4), 800);
        assert_eq!(ms(5), 1000);
        assert_eq!(ms(50), 1000);
    }

    #[test]
    fn retry_after_is_honoured_within_bounds() {
        let b = Backoff::default();
        let secs = Duration::from_secs;
        assert_eq!(b.throttled(1, Some(secs(30))), secs(30));
        assert_eq!(b.throttled(1, Some(secs(1))), secs(1));
        assert_eq!(b.throttled(1, Some(secs(4_294_967_295))), MAX_RETRY_AFTER);
        // Zero, a past date, or none: the back-off, never an immediate redelivery storm.
        for ra in [Some(Duration::ZERO), Some(Duration::from_millis(300)), None] {
            for _ in 0..50 {
                assert!(b.throttled(3, ra) <= b.ceiling(3));
            }
        }
    }

    #[test]
    fn a_5xx_retry_after_is_a_floor_under_the_back_off() {
        let b = Backoff::default();
        let secs = Duration::from_secs;
        for _ in 0..50 {
            assert!(b.transient(1, Some(secs(20))) >= secs(20));
            assert!(b.transient(1, None) <= b.ceiling(1));
            // A long back-off is not shortened by a short Retry-After.
            assert!(b.transient(9, Some(secs(1))) >= secs(1));
            assert_eq!(b.transient(1, Some(secs(u64::MAX / 4))), MAX_RETRY_AFTER);
        }
    }

    #[test]
    fn delays_stay_within_the_ceiling() {
        let b = Backoff::default();
        for attempt in 1..10 {
            for _ in 0..50 {
                assert!(b.delay(attempt) <= b.ceiling(attempt));
            }
        }
    }
}
