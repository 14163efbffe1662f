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
}

/// What a provider answered when it accepted a delivery.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Sent {
    /// The provider's id for the message (APNs `apns-id`, FCM message name, Twilio SID).
    pub provider_message_id: Option<String>,
}
