//! Producer request rates: a token bucket per producer, so one noisy service cannot
//! starve the others. Over its rate a producer gets 429 with a `Retry-After` computed
//! from the bucket (not a guess). Buckets are per api process: behind N instances a
//! producer may send N times its rate; size the rate for one instance.

use crate::error::AppError;
use axum::http::StatusCode;
use governor::clock::{Clock as _, DefaultClock};
use governor::{DefaultDirectRateLimiter, Quota, RateLimiter};
use std::collections::HashMap;
use std::num::NonZeroU32;
use std::sync::{Arc, Mutex};

/// Notifications per second allowed per producer.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RateConfig {
    /// For producers without a rate of their own; `None`: unlimited.
    pub default_per_s: Option<NonZeroU32>,
    /// Per producer name.
    pub per_producer: HashMap<String, NonZeroU32>,
}

/// The buckets of one api process.
#[derive(Debug, Default)]
pub struct ProducerRates {
    config: RateConfig,
    buckets: Mutex<HashMap<String, Arc<DefaultDirectRateLimiter>>>,
}

impl ProducerRates {
    /// Buckets for these rates.
    pub fn new(config: RateConfig) -> Self {
        Self {
            config,
            buckets: Mutex::new(HashMap::new()),
        }
    }

    /// Takes `n` notifications from `producer`'s bucket.
    ///
    /// # Errors
    /// 429 with `Retry-After` when the bucket is empty; 400 naming `notifications` when
    /// `n` exceeds what the bucket can ever hold (a batch larger than one second's rate).
    pub fn check(&self, producer: &str, n: u32) -> Result<(), AppError> {
        let Some(rate) = self
            .config
            .per_producer
            .get(producer)
            .copied()
            .or(self.config.default_per_s)
        else {
            return Ok(());
        };
        let bucket = {
            let mut buckets = self.buckets.lock().unwrap_or_else(|p| p.into_inner());
            buckets
                .entry(producer.to_owned())
                .or_insert_with(|| Arc::new(RateLimiter::direct(Quota::per_second(rate))))
                .clone()
        };
        let n = NonZeroU32::new(n).unwrap_or(NonZeroU32::MIN);
        let over = |retry_after: u64, message: String| {
            metrics::counter!("herald_producer_throttled_total").increment(1);
            Err(
                AppError::new(StatusCode::TOO_MANY_REQUESTS, "rate_limited", message)
                    .retry_after(retry_after),
            )
        };
        match bucket.check_n(n) {
            Ok(Ok(())) => Ok(()),
            Ok(Err(not_until)) => {
                let wait = not_until.wait_time_from(DefaultClock::default().now());
                over(
                    wait.as_secs() + u64::from(wait.subsec_nanos() > 0),
                    format!(
                        "over this producer's rate of {rate} notifications/s; retry after the Retry-After delay"
                    ),
                )
            }
            // No wait makes this fit: a 429 would have clients retry it for ever.
            Err(_) => Err(AppError::field(herald_protocol::FieldError::new(
                "notifications",
                format!(
                    "a batch of {n} is more than this producer's rate of {rate}/s allows at once; send at most {rate} per batch"
                ),
            ))),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_producer_has_its_own_bucket() {
        let rates = ProducerRates::new(RateConfig {
            default_per_s: NonZeroU32::new(2),
            per_producer: [("big".to_owned(), NonZeroU32::MIN.saturating_add(99))].into(),
        });
        assert!(rates.check("small", 1).is_ok());
        assert!(rates.check("small", 1).is_ok());
        let over = rates.check("small", 1).expect_err("third in a second");
        assert_eq!(over.retry_after_secs(), Some(1));
        assert!(
            rates.check("other", 2).is_ok(),
            "another producer is unaffected"
        );
        assert!(rates.check("big", 100).is_ok(), "its own, larger rate");
        let never = rates
            .check("small", 3)
            .expect_err("more than the bucket holds");
        assert_eq!(never.retry_after_secs(), None, "no wait makes it fit");
        assert_eq!(never.status(), StatusCode::BAD_REQUEST);
        assert!(
            ProducerRates::default().check("anyone", 1000).is_ok(),
            "unlimited"
        );
    }
}
