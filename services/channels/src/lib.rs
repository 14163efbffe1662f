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

    /// Whether this provider is one service whose health its answers describe (APNs, an
    /// SMTP relay): true by default. A provider that stands for many independent endpoints
    /// (webhooks: every producer's own receiver) says false, and then one target's
    /// failure, throttle or `Retry-After` holds back that target's job only: it never
    /// pauses the provider nor counts against its circuit.
    fn health_is_shared(&self) -> bool {
        true
    }

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

/// `text` with every email address and phone number in it masked (`<email>`, `<phone>`),
/// for provider answers that quote the recipient before they reach logs, delivery status
/// or the dead-letter queue: contact data is sealed at rest and must not leak beside it.
pub fn redact_contacts(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut word = String::new();
    let flush = |word: &mut String, out: &mut String| {
        let looks_like_email = word
            .split_once('@')
            .is_some_and(|(local, domain)| !local.is_empty() && domain.contains('.'));
        let digits = word.chars().filter(char::is_ascii_digit).count();
        let looks_like_phone = word.starts_with('+') && digits >= 7;
        if looks_like_email {
            out.push_str("<email>");
        } else if looks_like_phone {
            out.push_str("<phone>");
        } else {
            out.push_str(word);
        }
        word.clear();
    };
    for c in text.chars() {
        if c.is_whitespace()
            || matches!(
                c,
                '<' | '>' | '"' | '\'' | ',' | ';' | '(' | ')' | '[' | ']'
            )
        {
            flush(&mut word, &mut out);
            out.push(c);
        } else {
            word.push(c);
        }
    }
    flush(&mut word, &mut out);
    out
}

#[cfg(test)]
mod redact_tests {
    use super::redact_contacts;

    #[test]
    fn addresses_and_numbers_are_masked_and_the_rest_kept() {
        assert_eq!(
            redact_contacts("550 5.1.1 <ann@example.com>: Recipient address rejected"),
            "550 5.1.1 <<email>>: Recipient address rejected"
        );
        assert_eq!(
            redact_contacts("twilio: 400 21211: The 'To' number +14155552671 is not valid"),
            "twilio: 400 21211: The 'To' number <phone> is not valid"
        );
        assert_eq!(
            redact_contacts("fcm: 404 UNREGISTERED: token (42) at v1@2"),
            "fcm: 404 UNREGISTERED: token (42) at v1@2"
        );
    }
}
