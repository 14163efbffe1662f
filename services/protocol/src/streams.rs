//! Stream and KV bucket definitions as plain data. `herald-store` turns them into
//! JetStream configs and provisions them.

use crate::subjects::Subjects;
use crate::{Channel, Priority};
use std::time::Duration;

/// Name of the per-user inbox stream.
pub const INBOX: &str = "HERALD_INBOX";
/// Name of the stream of rejected native messages.
pub const REJECTED: &str = "HERALD_REJECTED";
/// KV bucket of read positions (key: user token, value: seq as decimal text).
pub const READS_BUCKET: &str = "herald_reads";
/// KV bucket of user preferences (key: user token, value: the sparse preferences JSON).
pub const PREFS_BUCKET: &str = "herald_prefs";
/// KV bucket of "seen live" positions (key: user token, value: seq as decimal text),
/// written from client `ack` frames. Channel workers read it to skip push for what the
/// user already saw on a live connection (escalation driven by real acks).
pub const SEEN_BUCKET: &str = "herald_seen";
/// Stream metadata key recording the partition count the subjects were built with.
pub const PARTITIONS_METADATA: &str = "herald.partitions";

/// How a stream keeps messages.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Retention {
    /// Keep until limits.
    Limits,
    /// Delete once acked by a consumer.
    WorkQueue,
}

/// What a full stream does with a new message.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Discard {
    /// Drop the oldest messages to make room.
    Old,
    /// Refuse the new message (publisher backpressure) when the stream, or the message's
    /// own subject, is at its limit: the per-subject limit then gives each subject its
    /// own budget, so one full subject never refuses another's messages.
    NewPerSubject,
}

/// A stream as Herald wants it.
#[derive(Debug, Clone, PartialEq)]
pub struct StreamSpec {
    /// Stream name.
    pub name: &'static str,
    /// Captured subjects.
    pub subjects: Vec<String>,
    /// Retention policy.
    pub retention: Retention,
    /// Oldest message kept.
    pub max_age: Duration,
    /// Messages kept per subject (-1: unlimited).
    pub max_msgs_per_subject: i64,
    /// Largest message, bytes.
    pub max_msg_size: i32,
    /// Dedup window for `Nats-Msg-Id`.
    pub duplicate_window: Duration,
    /// Allow direct get from any replica.
    pub allow_direct: bool,
    /// Republish (source, destination) after each store.
    pub republish: Option<(String, String)>,
    /// Replica count.
    pub replicas: usize,
    /// Metadata recorded on the stream (and checked on re-provisioning).
    pub metadata: Vec<(String, String)>,
    /// Most messages kept (-1: unlimited).
    pub max_msgs: i64,
    /// Most bytes kept (-1: unlimited).
    pub max_bytes: i64,
    /// What a full stream does with a new message.
    pub discard: Discard,
    /// Message schedules (`Nats-Schedule`, nats-server 2.12+) are allowed.
    pub allow_schedules: bool,
}

/// Tunables for provisioning.
#[derive(Debug, Clone, PartialEq)]
pub struct StreamSettings {
    /// Replica count for every stream (1 on a laptop, 3 on a cluster).
    pub replicas: usize,
    /// How long the inbox keeps notifications.
    pub inbox_max_age: Duration,
    /// How many notifications the inbox keeps per user and lane (the per-subject limit).
    pub inbox_max_per_user: i64,
    /// How long the same idempotency key is recognised.
    pub dedup_window: Duration,
    /// Most jobs one lane of a channel's work stream holds before publishers are refused.
    pub work_max_msgs: i64,
    /// Most bytes one channel's work stream holds before publishers are refused, all
    /// lanes together (-1: only the per-lane message limit; a byte limit reserves that
    /// much JetStream storage up front).
    pub work_max_bytes: i64,
}

impl Default for StreamSettings {
    fn default() -> Self {
        Self {
            replicas: 1,
            inbox_max_age: Duration::from_secs(30 * 24 * 3600),
            inbox_max_per_user: 10_000,
            dedup_window: Duration::from_secs(120),
            work_max_msgs: 1_000_000,
            work_max_bytes: -1,
        }
    }
}

/// Every stream Herald needs, in creation order.
pub fn streams(subjects: &Subjects, settings: &StreamSettings) -> Vec<StreamSpec> {
    let mut specs = vec![
        StreamSpec {
            name: INBOX,
            subjects: vec![
                subjects.inbox_all(),
                subjects.scheduled_all(),
                subjects.deferred_all(),
            ],
            retention: Retention::Limits,
            max_age: settings.inbox_max_age,
            max_msgs_per_subject: settings.inbox_max_per_user,
            max_msg_size: 128 * 1024,
            duplicate_window: settings.dedup_window,
            allow_direct: true,
            republish: Some(subjects.republish()),
            replicas: settings.replicas,
            metadata: vec![(
                PARTITIONS_METADATA.into(),
                subjects.partitions().to_string(),
            )],
            max_msgs: -1,
            max_bytes: -1,
            discard: Discard::Old,
            allow_schedules: true,
        },
        StreamSpec {
            name: REJECTED,
            subjects: vec![subjects.rejected()],
            retention: Retention::Limits,
            max_age: Duration::from_secs(7 * 24 * 3600),
            max_msgs_per_subject: 100_000,
            max_msg_size: 1024 * 1024,
            duplicate_window: Duration::from_secs(120),
            allow_direct: true,
            republish: None,
            replicas: settings.replicas,
            metadata: Vec::new(),
            max_msgs: -1,
            max_bytes: -1,
            discard: Discard::Old,
            allow_schedules: false,
        },
        dlq_stream(subjects, settings),
        StreamSpec {
            name: SUBS,
            subjects: subjects.subscriptions_all(),
            retention: Retention::Limits,
            // Kept until unsubscribed.
            max_age: Duration::ZERO,
            max_msgs_per_subject: 1,
            // A user's set of up to 1,000 followed topics is one message.
            max_msg_size: 256 * 1024,
            duplicate_window: Duration::from_secs(120),
            allow_direct: true,
            republish: None,
            replicas: settings.replicas,
            metadata: Vec::new(),
            max_msgs: -1,
            max_bytes: -1,
            discard: Discard::Old,
            allow_schedules: false,
        },
        StreamSpec {
            name: FANOUT,
            // The lane-less subject keeps jobs queued by earlier versions; each priority
            // lane has a subject (and a consumer) of its own, so a `high` publish never
            // waits behind queued `low` ones.
            subjects: vec![subjects.fanout(), format!("{}.*", subjects.fanout())],
            retention: Retention::WorkQueue,
            max_age: Duration::from_secs(7 * 24 * 3600),
            max_msgs_per_subject: -1,
            max_msg_size: 128 * 1024,
            duplicate_window: settings.dedup_window,
            allow_direct: false,
            republish: None,
            replicas: settings.replicas,
            metadata: Vec::new(),
            max_msgs: -1,
            max_bytes: -1,
            discard: Discard::Old,
            allow_schedules: false,
        },
        StreamSpec {
            name: DIGEST,
            subjects: vec![subjects.digest_all()],
            retention: Retention::Limits,
            // Beyond the longest period (a day, 25 hours across DST): a digest that was
            // never cleared (its user erased mid-period) does not linger.
            max_age: Duration::from_secs(3 * 24 * 3600),
            max_msgs_per_subject: settings.inbox_max_per_user,
            max_msg_size: 128 * 1024,
            duplicate_window: settings.dedup_window,
            allow_direct: true,
            republish: None,
            replicas: settings.replicas,
            metadata: Vec::new(),
            max_msgs: -1,
            max_bytes: -1,
            discard: Discard::Old,
            allow_schedules: false,
        },
    ];
    specs.extend(
        WORK_CHANNELS
            .iter()
            .map(|c| work_stream(subjects, settings, *c)),
    );
    specs
}

/// Name of the topic subscriptions stream.
pub const SUBS: &str = "HERALD_SUBS";
/// Name of the work queue of topic publishes.
pub const FANOUT: &str = "HERALD_FANOUT";
/// Durable consumer of the FANOUT stream.
pub const FANOUT_CONSUMER: &str = "herald-fanout";
/// KV bucket of rate cap counters (key: cap, window and a hash of the tuple).
pub const CAPS_BUCKET: &str = "herald_caps";
/// KV bucket of fan-out progress (key: publish id).
pub const FANOUT_BUCKET: &str = "herald_fanout";

/// Durable name of the router consumer of one lane of one partition.
pub fn router_consumer(partition: u16, lane: crate::Priority) -> String {
    format!("herald-router-p{partition}-{}", lane.as_str())
}

/// Durable name of the single router consumer per partition of earlier versions, before
/// routing had lanes; provisioning removes it.
pub fn legacy_router_consumer(partition: u16) -> String {
    format!("herald-router-p{partition}")
}

/// The lane whose deferred work keeps the lane-less deferred subject of earlier versions
/// ([`crate::Subjects::deferred`]), when only its router consumer read deferred work;
/// each lane's consumer reads its own ([`crate::Subjects::deferred_lane`]).
pub const DEFERRED_LANE: crate::Priority = crate::Priority::Normal;

/// Header of the core message announcing a user's new read position on their live
/// subject (value: the position). Gateways turn it into a `read` frame for every device.
pub const READ_HEADER: &str = "Herald-Read";

/// Header on a deferred notification: its inbox position (the deferred copy has a
/// sequence of its own).
pub const SEQ_HEADER: &str = "Herald-Seq";

/// Header on a big topic's copy handed to a user's router (on their routing subject,
/// value `1`): route it now, with quiet hours applied as for a new notification.
pub const FANOUT_HEADER: &str = "Herald-Fanout";

/// Header on a scheduled notification naming the producer that may cancel it.
pub const PRODUCER_HEADER: &str = "Herald-Producer";

/// KV bucket of aggregation groups (key: `g<hash of user and group key>`).
pub const GROUPS_BUCKET: &str = "herald_groups";

/// Header on a deferred message that closes an aggregation window (value: the group key).
pub const GROUP_HEADER: &str = "Herald-Group";

/// Name of the stream of notifications waiting for their user's email digest.
pub const DIGEST: &str = "HERALD_DIGEST";

/// Header on a deferred message that ends a digest period (value: the period's end).
pub const DIGEST_HEADER: &str = "Herald-Digest";

/// Header on inbox messages that ask for channels beyond the inbox (value `1`).
pub const ROUTE_HEADER: &str = "Herald-Route";

/// The priority group router consumers pin one client in.
pub const ROUTER_GROUP: &str = "router";

/// Name of the single work stream of earlier versions; provisioning removes it when empty.
pub const LEGACY_WORK: &str = "HERALD_WORK";

/// Channels with a work queue (every channel but the inbox).
pub const WORK_CHANNELS: [Channel; 4] = [
    Channel::Push,
    Channel::Email,
    Channel::Sms,
    Channel::Webhook,
];

/// Name of one channel's work-queue stream (`HERALD_WORK_PUSH`, ...).
pub fn work_stream_name(channel: Channel) -> &'static str {
    match channel {
        Channel::Push => "HERALD_WORK_PUSH",
        Channel::Email => "HERALD_WORK_EMAIL",
        Channel::Sms => "HERALD_WORK_SMS",
        Channel::Webhook => "HERALD_WORK_WEBHOOK",
        // The inbox has no work queue; the name is never provisioned.
        Channel::Inbox => "HERALD_WORK_INBOX",
    }
}

/// One channel's work stream: a work queue over its three lane subjects, consumed by that
/// channel's workers. Discard-new with a limit per lane: a full lane refuses the router's
/// publish (which retries later) instead of silently dropping jobs, and a marketing blast
/// that fills the `low` lane never refuses an OTP on `high` (a limit on the whole stream
/// would).
pub fn work_stream(subjects: &Subjects, settings: &StreamSettings, channel: Channel) -> StreamSpec {
    StreamSpec {
        name: work_stream_name(channel),
        subjects: vec![subjects.work_channel(channel)],
        retention: Retention::WorkQueue,
        max_age: Duration::from_secs(7 * 24 * 3600),
        max_msgs_per_subject: settings.work_max_msgs,
        max_msg_size: 64 * 1024,
        duplicate_window: settings.dedup_window,
        allow_direct: false,
        republish: None,
        replicas: settings.replicas,
        metadata: Vec::new(),
        max_msgs: -1,
        max_bytes: settings.work_max_bytes,
        discard: Discard::NewPerSubject,
        allow_schedules: false,
    }
}

/// Name of the dead-letter stream.
pub const DLQ: &str = "HERALD_DLQ";

/// The dead-letter stream: jobs that failed permanently or ran out of deliveries, with
/// the reason and the provider's last answer, kept for 30 days or until retried.
pub fn dlq_stream(subjects: &Subjects, settings: &StreamSettings) -> StreamSpec {
    StreamSpec {
        name: DLQ,
        subjects: vec![subjects.dlq_all()],
        retention: Retention::Limits,
        max_age: Duration::from_secs(30 * 24 * 3600),
        max_msgs_per_subject: -1,
        max_msg_size: 256 * 1024,
        duplicate_window: settings.dedup_window,
        allow_direct: true,
        republish: None,
        replicas: settings.replicas,
        metadata: Vec::new(),
        max_msgs: 1_000_000,
        max_bytes: -1,
        discard: Discard::Old,
        allow_schedules: false,
    }
}

/// Durable name of the worker consumer of one channel's lane.
pub fn worker_consumer(channel: Channel, lane: Priority) -> String {
    format!("herald-worker-{}-{}", channel.as_str(), lane.as_str())
}

/// KV bucket of delivery targets: device tokens (`d.<user-token>`) and encrypted contact
/// data (`c.<user-token>`).
pub const TARGETS_BUCKET: &str = "herald_targets";
/// KV bucket of sent markers (key `<id>.<channel>.<target>`): written after a provider
/// accepted and before the job is acked, checked before sending a redelivered job.
pub const SENT_BUCKET: &str = "herald_sent";
/// KV bucket of delivery status per notification (key: notification id).
pub const STATUS_BUCKET: &str = "herald_status";
