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
//! provider testable against a local fake that speaks its protocol (crate `herald-fakes`).
//!
//! | module | provider |
//! |---|---|
//! | [`apns`] | iOS push: APNs over HTTP/2, ES256 provider tokens |
//! | [`fcm`] | Android and web push: FCM HTTP v1, OAuth2 from a service-account key |
//! | [`twilio`], [`vonage`] | SMS, primary and secondary; [`phone`] validates E.164 first |
//! | [`webhook`] | HMAC-SHA256 signed callbacks; [`webhook::signature`] verifies them |
//! | [`build`] | every configured provider from [`ProvidersConfig`], in failover order |

mod config;
mod delivery;
mod error;
mod http;

pub mod apns;
pub mod fcm;
pub mod phone;
pub mod sms;
pub mod twilio;
pub mod vonage;
pub mod webhook;

pub use config::{ENV_KEYS, ProvidersConfig, ProvidersConfigError, build};
pub use delivery::{Delivery, Platform, Sent, Target};
pub use error::SendError;
pub use http::{HttpOptions, SetupError};

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

#[cfg(test)]
mod testing {
    use super::*;
    use herald_protocol::{Priority, UserId};

    /// A delivery with a title and body, for unit tests.
    pub(crate) fn delivery(target: Target) -> Delivery {
        Delivery {
            id: "0195f5a2-7c1e-7d3a-9b1e-2f6a1c3d4e5f".into(),
            seq: 1,
            user_id: UserId::new("u1").unwrap_or_else(|_| unreachable!()),
            channel: Channel::Push,
            priority: Priority::Normal,
            category: None,
            title: Some("Hello".into()),
            body: Some("World".into()),
            data: serde_json::Map::new(),
            collapse_key: None,
            expires_at: None,
            target,
            unsubscribe_url: None,
            html: None,
        }
    }
}
