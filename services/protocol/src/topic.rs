//! Topics: named audiences a notification can be published to.
//!
//! A topic name is, like a user id, opaque UTF-8 of 1–128 bytes; it reaches subjects only
//! through [`TopicId::token`] (unpadded base64url), so no name can reach another topic's
//! subjects or a wildcard.

use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use serde::{Deserialize, Serialize};
use std::fmt;

/// Longest topic name, bytes.
pub const MAX_TOPIC_BYTES: usize = 128;

/// A validated topic name.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize)]
#[serde(transparent)]
pub struct TopicId(String);

/// Why a string is not a topic name.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TopicIdError {
    /// Empty.
    #[error("topic must not be empty")]
    Empty,
    /// Over [`MAX_TOPIC_BYTES`].
    #[error("topic is {0} bytes long; the limit is 128")]
    TooLong(usize),
    /// A subject token that is not one of ours.
    #[error("not a topic token")]
    BadToken,
}

impl TopicId {
    /// Validates a topic name.
    ///
    /// # Errors
    /// [`TopicIdError`] when empty or over 128 bytes.
    pub fn new(raw: impl Into<String>) -> Result<Self, TopicIdError> {
        let raw = raw.into();
        match raw.len() {
            0 => Err(TopicIdError::Empty),
            n if n > MAX_TOPIC_BYTES => Err(TopicIdError::TooLong(n)),
            _ => Ok(Self(raw)),
        }
    }

    /// The name as given.
    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// The subject token of this topic.
    pub fn token(&self) -> String {
        URL_SAFE_NO_PAD.encode(self.0.as_bytes())
    }

    /// Decodes a subject token back into a topic.
    ///
    /// # Errors
    /// [`TopicIdError::BadToken`] when `token` is not one of ours.
    pub fn decode(token: &str) -> Result<Self, TopicIdError> {
        let bytes = URL_SAFE_NO_PAD
            .decode(token)
            .map_err(|_| TopicIdError::BadToken)?;
        Self::new(String::from_utf8(bytes).map_err(|_| TopicIdError::BadToken)?)
    }
}

impl fmt::Display for TopicId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl<'de> Deserialize<'de> for TopicId {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        TopicId::new(String::deserialize(d)?).map_err(serde::de::Error::custom)
    }
}

/// A publish waiting to be fanned out: the notification as every subscriber gets it,
/// minus the recipient. Stored in the FANOUT work queue until done.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct FanoutJob {
    /// The publish id.
    pub id: String,
    /// The topic.
    pub topic: TopicId,
    /// The notification, with a placeholder recipient; each copy gets its own.
    pub notification: crate::StoredNotification,
    /// Big-topic path: the INBOX sequence of the one stored copy. The job then only
    /// enqueues channel work for the subscribers whose preferences want it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stored_seq: Option<u64>,
}

/// How far a fan-out is (kept in KV; shown in the publish's status).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct FanoutProgress {
    /// `running` or `done`.
    pub state: String,
    /// Subscribers when the fan-out started.
    pub total: u64,
    /// Inbox entries written (each acked by JetStream).
    pub done: u64,
    /// Stream sequence of the last subscription handled: where a resumed fan-out starts.
    pub cursor: u64,
    /// `write` (one inbox entry per subscriber) or `topic` (stored once; `done` counts
    /// subscribers whose channel work is enqueued).
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub path: String,
    /// Big-topic path: subscribers whose preferences want an interrupting channel,
    /// handed to their router for channel work (push, email, SMS, webhook).
    #[serde(default)]
    pub routed: u64,
    /// Start time, RFC 3339.
    pub started_at: String,
    /// End time, RFC 3339.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub finished_at: Option<String>,
}

/// The id of one subscriber's copy of publish `publish_id`: stable, so a resumed fan-out
/// writes the same id (and JetStream deduplicates it), and unique per recipient.
pub fn copy_id(publish_id: &str, user: &crate::UserId) -> String {
    const NAMESPACE: uuid::Uuid = uuid::Uuid::from_u128(0x3c0f_61d2_8a4b_4e1f_9b07_d2e5_a1c8_44f3);
    let mut name = Vec::with_capacity(publish_id.len() + user.as_str().len() + 1);
    name.extend_from_slice(publish_id.as_bytes());
    name.push(0);
    name.extend_from_slice(user.as_str().as_bytes());
    uuid::Uuid::new_v5(&NAMESPACE, &name).to_string()
}

/// The view of a big topic's stored publish for one subscriber: the id of their copy
/// ([`copy_id`], the same id their push or email carries) and them as the recipient.
pub fn for_subscriber(
    mut stored: crate::StoredNotification,
    user: &crate::UserId,
) -> crate::StoredNotification {
    stored.id = copy_id(&stored.id, user);
    stored.user_id = user.clone();
    stored
}

/// Header on a core message on a user's live subject saying their topic subscriptions
/// changed (gateways re-read them, so a big topic's live messages start or stop).
pub const TOPICS_HEADER: &str = "Herald-Topics";

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hostile_topics_become_plain_tokens() {
        for raw in ["*", ">", "news.>", "a b", "ünï", "$JS.API.>"] {
            let t = TopicId::new(raw).expect("valid");
            let token = t.token();
            assert!(
                token
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
            );
            assert_eq!(TopicId::decode(&token), Ok(t));
        }
        assert_eq!(TopicId::new(""), Err(TopicIdError::Empty));
    }

    #[test]
    fn copies_have_distinct_stable_ids() {
        let a = crate::UserId::new("a").expect("valid");
        let b = crate::UserId::new("b").expect("valid");
        assert_eq!(copy_id("p", &a), copy_id("p", &a));
        assert_ne!(copy_id("p", &a), copy_id("p", &b));
        assert_ne!(copy_id("p", &a), copy_id("q", &a));
    }
}
