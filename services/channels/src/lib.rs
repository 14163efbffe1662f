//! Channel providers: the one seam between Herald's workers and the outside world.
//!
//! A worker pulls a [`Delivery`] (one notification, one channel, one target) from its
//! work queue and hands it to a [`Provider`]. The provider speaks the provider's real wire
//! protocol (APNs over HTTP/2, FCM HTTP v1, SMTP, Twilio-shaped REST, signed webhooks) to a
//! configurable base URL, and answers with a [`Sent`] receipt or a [`SendError`] whose
//! *class* decides what the worker does next: retry after the provider's `Retry-After`,
//! back off with jitter, give up at once, or drop the dead target and give up.
//!
//! Providers know nothing of NATS; workers know nothing of HTTP. That keeps every
//! provider testable against a local fake that speaks its protocol.

mod delivery;
mod error;

pub use delivery::{Delivery, Platform, Sent, Target};
pub use error::SendError;

use herald_protocol::Channel;

/// One provider of one channel (e.g. "apns" for push, "twilio" for SMS).
///
/// Implementations must be cheap to share (`Arc<dyn Provider>`) and safe to call
/// concurrently; connection pools and cached credentials live inside them.
#[async_trait::async_trait]
pub trait Provider: Send + Sync {
    /// Short, stable name used in metrics, logs, delivery status and configuration
    /// (`apns`, `fcm`, `smtp`, `twilio`, `webhook`, ...).
    fn name(&self) -> &str;

    /// The channel this provider delivers on.
    fn channel(&self) -> Channel;

    /// Whether this provider can deliver to `target` (e.g. APNs takes iOS device tokens
    /// only). Workers pick the first provider of a channel that accepts the target and
    /// whose circuit is closed.
    fn accepts(&self, target: &Target) -> bool;

    /// Sends one delivery.
    ///
    /// # Errors
    /// A [`SendError`] classified by what the provider answered (see its variants).
    async fn send(&self, delivery: &Delivery) -> Result<Sent, SendError>;
}
