//! Reconnect delays: exponential ceilings from `backon`, with *full* jitter on top — the
//! wait is uniform in `[0, ceiling]`, which spreads a crowd of clients that lost the same
//! server far better than a fixed or "equal" jitter (backon's own jitter adds to the
//! delay rather than drawing below it, so it is not used).

use backon::{BackoffBuilder as _, ExponentialBackoff, ExponentialBuilder};
use std::time::Duration;

/// Full-jitter exponential backoff.
#[derive(Debug)]
pub(crate) struct Backoff {
    builder: ExponentialBuilder,
    ceilings: ExponentialBackoff,
}

impl Backoff {
    /// Ceilings `base, 2·base, 4·base, …` capped at `max`.
    pub(crate) fn new(base: Duration, max: Duration) -> Self {
        let builder = ExponentialBuilder::default()
            .with_min_delay(base)
            .with_max_delay(max)
            .with_factor(2.0)
            .without_max_times();
        Self {
            ceilings: builder.build(),
            builder,
        }
    }

    /// The next wait: uniform in `[0, ceiling]`.
    pub(crate) fn next_delay(&mut self) -> Duration {
        let ceiling = self.ceilings.next().unwrap_or_default();
        ceiling.mul_f64(rand::random::<f64>())
    }

    /// After a successful connection, start from the smallest ceiling again.
    pub(crate) fn reset(&mut self) {
        self.ceilings = self.builder.build();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn delays_stay_under_growing_capped_ceilings() {
        let mut b = Backoff::new(Duration::from_millis(100), Duration::from_millis(1000));
        let ceilings = [100, 200, 400, 800, 1000, 1000, 1000];
        for ceiling in ceilings {
            let d = b.next_delay();
            assert!(d <= Duration::from_millis(ceiling), "{d:?} > {ceiling} ms");
        }
        b.reset();
        assert!(b.next_delay() <= Duration::from_millis(100));
    }

    #[test]
    fn jitter_is_full_not_a_fixed_floor() {
        // Over many draws from the first ceiling, some land in its lower tenth.
        let low = (0..200)
            .filter(|_| {
                let mut b = Backoff::new(Duration::from_millis(1000), Duration::from_secs(10));
                b.next_delay() < Duration::from_millis(100)
            })
            .count();
        assert!(low > 0, "no draw below 10% of the ceiling in 200 tries");
    }
}
