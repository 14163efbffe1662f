//! JSON bodies of the HTTP API that more than one crate builds.

use crate::notification::Notification;
use serde::{Deserialize, Serialize};

/// `202` answer to a notify.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct Accepted {
    /// The notification id (the first one's, for a repeated idempotency key).
    pub id: String,
    /// `accepted`, or `scheduled` when it waits for its `send_at`.
    pub status: String,
    /// Inbox position (absent while scheduled).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub seq: Option<u64>,
    /// When a scheduled notification will be sent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub send_at: Option<String>,
}

/// A page of an inbox, oldest first.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct InboxPageBody {
    /// The notifications, ascending `seq`.
    pub items: Vec<Notification>,
    /// Pass as `after` to read on (the last item's seq, or the request's `after`).
    pub next_after: u64,
    /// Pass as `before` to read older items (the first item's seq), if any.
    pub prev_before: Option<u64>,
    /// More items exist in the direction read.
    pub has_more: bool,
}

/// `GET /v1/me/unread`.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
pub struct Unread {
    /// Notifications after the read position.
    pub unread: u64,
    /// Newest seq in the inbox.
    pub last_seq: u64,
    /// Highest seq the user acknowledged seeing live (`ack` frames); 0 when none.
    #[serde(default)]
    pub seen_seq: u64,
}
