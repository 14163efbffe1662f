//! WebSocket/SSE frames (SPEC §5): JSON text, tagged by `type`.

use crate::notification::Notification;
use crate::user::UserId;
use serde::{Deserialize, Serialize};

/// Frames the server sends.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum ServerFrame {
    /// First frame on every connection.
    Hello {
        /// Who the connection is authenticated as.
        user_id: UserId,
        /// Newest position in the inbox (0 when empty).
        last_seq: u64,
        /// Notifications after the read position.
        unread: u64,
        /// Seconds between server pings.
        heartbeat_s: u64,
    },
    /// One notification.
    Notification(Notification),
    /// Several notifications coalesced, in `seq` order.
    Batch {
        /// The notifications.
        items: Vec<Notification>,
    },
    /// The user's read position moved (on this or another device): everything up to and
    /// including `up_to` is read.
    Read {
        /// Inbox position.
        up_to: u64,
    },
    /// The server asks the client to reconnect after `after_ms`.
    Reconnect {
        /// Delay before reconnecting, jittered per client.
        after_ms: u64,
    },
    /// The answer to a `subscribe`/`unsubscribe` frame: the topic's state for this user,
    /// and why, when the request was refused.
    Subscription {
        /// The topic.
        topic: String,
        /// Whether the user is now subscribed.
        subscribed: bool,
        /// Why the request was refused.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        error: Option<String>,
    },
}

/// Frames a client may send.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case", deny_unknown_fields)]
pub enum ClientFrame {
    /// Mark read up to and including `up_to`.
    Read {
        /// Inbox position.
        up_to: u64,
    },
    /// Seen live up to and including `up_to`.
    Ack {
        /// Inbox position.
        up_to: u64,
    },
    /// Join a topic.
    Subscribe {
        /// Topic name.
        topic: String,
    },
    /// Leave a topic.
    Unsubscribe {
        /// Topic name.
        topic: String,
    },
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hello_matches_the_spec_shape() {
        let f = ServerFrame::Hello {
            user_id: UserId::new("u1").expect("valid"),
            last_seq: 3,
            unread: 1,
            heartbeat_s: 30,
        };
        let v = serde_json::to_value(&f).expect("serialize");
        assert_eq!(
            v,
            serde_json::json!({"type":"hello","user_id":"u1","last_seq":3,"unread":1,"heartbeat_s":30})
        );
    }

    #[test]
    fn client_frames_parse_and_reject_garbage() {
        let f: ClientFrame = serde_json::from_str(r#"{"type":"read","up_to":5}"#).expect("parse");
        assert_eq!(f, ClientFrame::Read { up_to: 5 });
        assert!(serde_json::from_str::<ClientFrame>(r#"{"type":"read"}"#).is_err());
        assert!(serde_json::from_str::<ClientFrame>(r#"{"type":"explode"}"#).is_err());
        assert!(serde_json::from_str::<ClientFrame>(r#"{"type":"read","up_to":-1}"#).is_err());
    }
}
