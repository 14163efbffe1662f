//! Herald's JetStream layer: the only crate that knows how Herald's data sits in NATS.
//!
//! - [`connect`]: client connections with the options every service wants.
//! - [`nats_auth`]: credentials and TLS for those connections, checked before use.
//! - [`provision`]: streams, buckets and consumers as code, idempotent.
//! - [`inbox`]: appending to and reading from the per-user INBOX stream.
//! - [`direct`]: batched direct gets (`$JS.API.DIRECT.GET`), which async-nats lacks.
//! - [`reads`]: per-user read and seen positions.
//! - [`receipts`]: the batcher that writes them (one KV write per user per flush).
//! - [`targets`]: push devices and encrypted contact data.
//! - [`status`]: delivery status per notification, and sent markers.
//! - [`preferences`]: per-user preferences.
//! - [`caps`]: rate caps counted across instances.
//! - [`groups`]: aggregation groups, joined and closed with compare-and-set.
//! - [`keys`]: idempotency-key records of HTTP notifies (id, body hash, first answer).
//! - [`digests`]: notifications waiting for their user's email digest.
//! - [`topics`]: topic subscriptions and fan-out progress.
//! - [`view`]: a user's inbox merged with the big topics they follow.
//! - [`scheduled`]: `send_at`, held by JetStream's message scheduler.

pub mod caps;
pub mod connect;
pub mod digests;
pub mod direct;
pub mod groups;
pub mod inbox;
pub mod keys;
pub mod nats_auth;
pub mod preferences;
pub mod provision;
pub mod reads;
pub mod receipts;
pub mod scheduled;
pub mod status;
pub mod targets;
pub mod topics;
pub mod view;
mod walk;

pub use caps::{CapDecision, CapsError, RateCaps};
pub use connect::{ConnectError, Nats, connect, connect_with, is_unavailable};
pub use digests::{Digests, DigestsError};
pub use groups::{Groups, GroupsError};
pub use inbox::{Append, AppendAck, Entry as InboxEntry, Inbox, InboxError, InboxPage};
pub use keys::{Claim, KeyRecord, KeyRecords, KeysError};
pub use nats_auth::{ClientCert, NatsAuth, NatsOptions, NatsOptionsError, NatsTls, Secret};
pub use preferences::{PreferenceStore, PreferencesError};
pub use provision::{ProvisionError, ProvisionReport, provision};
pub use reads::ReadPositions;
pub use receipts::{Mark, Receipts, ReceiptsConfig};
pub use scheduled::Cancelled;
pub use status::StatusStore;
pub use targets::Targets;
pub use topics::{
    FanoutLog, MAX_TOPICS_PER_USER, SubscriberPages, Subscription, Subscriptions, TopicsError,
};
pub use view::{TopicSource, ViewHead};
