//! Herald's wire contract, with no I/O and no async: what users, producers and the
//! other Herald crates agree on.
//!
//! The subject tree (prefix `herald` by default, see [`Subjects`]):
//!
//! ```text
//! herald.notify                      native ingest (request/reply, answered with a JetStream ack)
//! herald.inbox.<part>.<user-token>.<lane>  INBOX stream: a user's inbox is their three lane
//!                                    subjects (high/normal/low); stream seq = inbox `seq`
//! herald.live.<part>.<user-token>    republished by INBOX after each store, carries Nats-Sequence
//! herald.work.<channel>.<lane>       HERALD_WORK_<CHANNEL> streams: jobs, lanes high/normal/low
//! herald.dlq.<channel>               HERALD_DLQ stream: dead-lettered jobs with the reason
//! herald.rejected                    REJECTED stream: native messages that failed validation
//! herald.sched.<part>.<user>.<id>    INBOX stream: a scheduled notification until its send_at
//!                                    (`q-<id>`: quiet hours, `g-<id>`: a group's window,
//!                                    `d-<unix>`: the end of a digest period)
//! herald.defer.<part>.<user>[.<lane>] INBOX stream: what those schedules fire into (router;
//!                                    `normal` has no lane token, `high` and `low` do)
//! herald.digest.<part>.<user>        HERALD_DIGEST stream: notifications awaiting a digest
//! herald.subs.<topic>.<user>         SUBS stream: one subscription (one message per subject)
//! herald.usubs.<user>                SUBS stream: the user's set of subscriptions (one message)
//! herald.fanout                      FANOUT stream: topic publishes waiting to be fanned out
//! herald.events.<id>                 EVENTS stream: delivery status of one notification
//! ```
//!
//! `<user-token>` is the unpadded base64url encoding of the user id's bytes ([`UserToken`]):
//! injective, and never `*`, `>` or a `.`, so no id reaches another user's subject.
//! `<part>` is a stable hash of the id modulo the partition count, so one router owns a user
//! (per lane: routing has lanes, so `high` never waits behind a backlog of `low`).

pub mod digest;
pub mod error;
pub mod frames;
pub mod group;
pub mod locale;
pub mod notification;
pub mod pages;
pub mod preferences;
pub mod streams;
pub mod subjects;
pub mod topic;
pub mod user;

pub use error::{ErrorBody, FieldError};
pub use frames::{ClientFrame, ServerFrame};
pub use notification::{
    Channel, ChannelJob, Folded, Notification, NotifyRequest, Priority, Rendered,
    StoredNotification, ValidatedNotify,
};
pub use preferences::{Policy, Preferences, PreferencesPatch};
pub use streams::StreamSpec;
pub use subjects::Subjects;
pub use topic::{FanoutJob, FanoutProgress, TopicId};
pub use user::{UserId, UserIdError, UserToken};
