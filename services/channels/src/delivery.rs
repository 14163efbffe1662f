//! What a provider is asked to deliver, and what it answers on success.

use herald_protocol::{Channel, Priority, UserId};
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};
use time::OffsetDateTime;

/// A push platform.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Platform {
    /// Apple devices, through APNs.
    Ios,
    /// Android devices, through FCM.
    Android,
    /// Browsers, through FCM's web push.
    Web,
}

/// Where one delivery goes.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "lowercase")]
pub enum Target {
    /// A push device token.
    Device {
        /// Platform the token belongs to.
        platform: Platform,
        /// The token as the platform issued it.
        token: String,
    },
    /// An email address.
    Email {
        /// The address.
        address: String,
    },
    /// A phone number in E.164 form (`+4915112345678`).
    Phone {
        /// The number.
        e164: String,
    },
    /// An HTTPS endpoint receiving signed callbacks.
    Webhook {
        /// The endpoint.
        url: String,
    },
}

impl Target {
    /// A stable key for this target, used in `Nats-Msg-Id`s and sent markers.
    pub fn key(&self) -> String {
        match self {
            Self::Device { platform, token } => format!("{platform:?}:{token}").to_lowercase(),
            Self::Email { address } => format!("email:{}", address.to_lowercase()),
            Self::Phone { e164 } => format!("phone:{e164}"),
            Self::Webhook { url } => format!("webhook:{url}"),
        }
    }
}

/// One notification, rendered for one channel, to one target.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Delivery {
    /// Notification id; stable across retries (APNs `apns-id`, email `Message-ID`, ...).
    pub id: String,
    /// Position in the user's inbox.
    pub seq: u64,
    /// Recipient.
    pub user_id: UserId,
    /// Channel.
    pub channel: Channel,
    /// Lane (maps to `apns-priority`, FCM `android.priority`, ...).
    pub priority: Priority,
    /// Category (used for unsubscribe links and analytics).
    pub category: Option<String>,
    /// Title / email subject.
    pub title: Option<String>,
    /// Body text.
    pub body: Option<String>,
    /// Extra data passed to the device or webhook.
    pub data: Map<String, Value>,
    /// Collapse key (`apns-collapse-id`, FCM `collapse_key`).
    pub collapse_key: Option<String>,
    /// After this the notification is useless (`apns-expiration`, FCM `ttl`).
    #[serde(with = "time::serde::rfc3339::option")]
    pub expires_at: Option<OffsetDateTime>,
    /// Where it goes.
    pub target: Target,
    /// One-click unsubscribe URL for this user and category (email only; RFC 8058).
    pub unsubscribe_url: Option<String>,
    /// An HTML part rendered by a template (an email digest); without it the email's HTML
    /// is the escaped title and body.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub html: Option<String>,
}

/// What a provider answered when it accepted a delivery.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Sent {
    /// The provider's id for the message (APNs `apns-id`, FCM message name, Twilio SID).
    pub provider_message_id: Option<String>,
}

/// Largest push payload APNs and FCM take, in bytes.
pub const MAX_PUSH_PAYLOAD: usize = 4096;

/// Whether `delivery`'s push payload fits [`MAX_PUSH_PAYLOAD`] without measuring it: no
/// data, and title and body short enough even if every byte were escaped (6 bytes), with
/// room for the rest. Most pushes; the others go through [`fit_body`].
pub fn surely_fits(delivery: &Delivery) -> bool {
    let text = delivery.title.as_deref().map_or(0, str::len)
        + delivery.body.as_deref().map_or(0, str::len);
    delivery.data.is_empty() && text * 6 + 1024 <= MAX_PUSH_PAYLOAD
}

/// Builds a push payload with `build(body)`, shortening `body` (on a character boundary,
/// ending with `…`) until the serialized payload fits in `max` bytes; a notification body
/// may be 16 KiB, a push 4 KiB, and a payload over it is refused outright. What does not
/// fit even with an empty body (large `data`) is returned as is, for the provider to
/// refuse.
pub fn fit_body(
    body: Option<&str>,
    max: usize,
    build: impl Fn(Option<&str>) -> serde_json::Value,
) -> serde_json::Value {
    let size = |v: &serde_json::Value| serde_json::to_vec(v).map_or(usize::MAX, |b| b.len());
    let full = build(body);
    let Some(body) = body else {
        return full;
    };
    if size(&full) <= max {
        return full;
    }
    // The longest prefix that fits, by bisection: escaping makes a character of text
    // take from one to six bytes of JSON, so the excess alone does not say where to cut.
    let cut = |end: usize| {
        let mut end = end.min(body.len());
        while !body.is_char_boundary(end) {
            end -= 1;
        }
        end
    };
    let shortened = |end: usize| build(Some(&format!("{}…", &body[..end])));
    let (mut fits, mut too_long) = (0, body.len());
    while too_long - fits > 1 {
        let mid = cut(fits + (too_long - fits) / 2);
        if mid <= fits {
            break;
        }
        if size(&shortened(mid)) <= max {
            fits = mid;
        } else {
            too_long = mid;
        }
    }
    shortened(fits)
}

/// `key` as a provider's collapse identifier: unchanged when it is at most `max` bytes
/// of characters `allowed` accepts, otherwise the first `max` hex digits of its SHA-256
/// (the same key always maps to the same identifier, so collapsing still works). APNs
/// takes 64 bytes in `apns-collapse-id`; a Web Push `Topic` 32 URL-safe base64 chars;
/// group keys such as `like:photo-9` or long ones would otherwise be refused.
pub fn collapse_id(key: &str, max: usize, allowed: fn(char) -> bool) -> String {
    if !key.is_empty() && key.len() <= max && key.chars().all(allowed) {
        return key.to_owned();
    }
    use sha2::Digest as _;
    let mut hex = hex::encode(sha2::Sha256::digest(key.as_bytes()));
    hex.truncate(max);
    hex
}

#[cfg(test)]
mod collapse_tests {
    use super::collapse_id;

    #[test]
    fn collapse_ids_fit_the_provider_or_are_hashed_stably() {
        let graphic = |c: char| c.is_ascii_graphic();
        assert_eq!(collapse_id("like:photo-9", 64, graphic), "like:photo-9");
        let long = "x".repeat(100);
        assert_eq!(collapse_id(&long, 64, graphic).len(), 64);
        assert_eq!(
            collapse_id(&long, 64, graphic),
            collapse_id(&long, 64, graphic)
        );
        let web = |c: char| c.is_ascii_alphanumeric() || c == '-' || c == '_';
        assert_eq!(collapse_id("like:photo-9", 32, web).len(), 32);
    }
}
