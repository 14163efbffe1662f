//! How a provider's failure is classified. The class, not the provider, decides the
//! worker's next step, so every provider maps its own status codes and error reasons
//! onto these few variants.

use std::time::Duration;

/// Why a delivery was not accepted.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SendError {
    /// The provider asked us to slow down (HTTP 429, quota exceeded). The worker naks
    /// with `retry_after` when given, else backs off.
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
