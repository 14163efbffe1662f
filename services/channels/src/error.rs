//! How a provider's failure is classified. The class, not the provider, decides the
//! worker's next step, so every provider maps its own status codes and error reasons
//! onto these few variants.

use std::time::Duration;

/// The note a throttle about one target ends its detail with
/// ([`SendError::target_throttled`]).
const ONE_TARGET: &str = " (this target only)";

/// Why a delivery was not accepted.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SendError {
    /// The provider asked us to slow down (HTTP 429, quota exceeded). The worker naks
    /// with `retry_after` when given, else backs off. Usually about our account or
    /// project, so the worker leaves the provider alone for a while; a throttle about one
    /// target only is made with [`SendError::target_throttled`].
    #[error("throttled by provider: {detail}")]
    Throttled {
        /// The provider's `Retry-After`, if it sent one.
        retry_after: Option<Duration>,
        /// The provider's answer, shortened.
        detail: String,
    },
    /// A failure that may pass (5xx, timeout, connection refused). Exponential back-off
    /// with full jitter, never sooner than the provider's `Retry-After` when its answer
    /// had one (a 503 that says when to come back); counts towards the provider's
    /// circuit breaker.
    #[error("transient provider failure: {detail}")]
    Transient {
        /// What happened.
        detail: String,
        /// The provider's `Retry-After` on a 5xx answer, if it sent one.
        retry_after: Option<Duration>,
    },
    /// The request itself is wrong (bad payload, bad credentials for this message); a
    /// retry cannot help. Dead-lettered at once.
    #[error("permanent provider failure: {detail}")]
    Permanent {
        /// The provider's answer, shortened.
        detail: String,
    },
    /// The target no longer exists (APNs 410 `Unregistered`, FCM `UNREGISTERED` or an
    /// invalid `message.token`, an invalid phone number). The worker removes the target and gives up.
    #[error("invalid target: {detail}")]
    InvalidTarget {
        /// The provider's answer, shortened.
        detail: String,
    },
}

impl SendError {
    /// A transient failure without a `Retry-After`.
    pub fn transient(detail: impl Into<String>) -> Self {
        Self::Transient {
            detail: detail.into(),
            retry_after: None,
        }
    }

    /// A throttle about one target only: too many messages to one device (APNs 429
    /// `TooManyRequests`, FCM's device message rate). Only that target's job waits and
    /// comes back later; the provider keeps serving every other target, where a
    /// [`SendError::Throttled`] about the account leaves it alone for every job.
    ///
    /// Still a `Throttled` (every match on the class stays as it is, in every crate),
    /// told apart by [`SendError::throttles_one_target`] through the note its detail
    /// ends with.
    pub fn target_throttled(retry_after: Option<Duration>, detail: impl Into<String>) -> Self {
        Self::Throttled {
            retry_after,
            detail: format!("{}{ONE_TARGET}", detail.into()),
        }
    }

    /// Whether this throttle is about its target only ([`SendError::target_throttled`]),
    /// not about the provider or our account.
    pub fn throttles_one_target(&self) -> bool {
        matches!(self, Self::Throttled { detail, .. } if detail.ends_with(ONE_TARGET))
    }

    /// Whether a retry could succeed.
    pub fn is_retryable(&self) -> bool {
        matches!(self, Self::Throttled { .. } | Self::Transient { .. })
    }

    /// Whether this failure says something about the provider's health (and so counts
    /// towards its circuit breaker). Throttling and bad requests do not.
    pub fn counts_against_provider(&self) -> bool {
        matches!(self, Self::Transient { .. })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_throttle_about_one_target_says_so_and_stays_a_throttle() {
        let one = SendError::target_throttled(None, "apns: 429 TooManyRequests");
        assert!(one.throttles_one_target());
        assert!(matches!(one, SendError::Throttled { .. }));
        assert!(one.is_retryable() && !one.counts_against_provider());
        assert_eq!(
            one.to_string(),
            "throttled by provider: apns: 429 TooManyRequests (this target only)"
        );
        let account = SendError::Throttled {
            retry_after: None,
            detail: "fcm: 429 QUOTA_EXCEEDED".into(),
        };
        assert!(!account.throttles_one_target());
        assert!(!SendError::transient("x (this target only)").throttles_one_target());
    }
}
