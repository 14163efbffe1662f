//! Provisioning as code: Herald's streams, KV buckets and router consumers.
//!
//! Idempotent: creates what is missing, applies compatible changes (limits, replicas,
//! dedup window), and refuses incompatible ones (subjects, retention, partition count)
//! with a message that says what to do, since applying them would strand stored data.

use async_nats::jetstream::{self, consumer, kv, stream};
use herald_protocol::streams::{self, Discard, Retention, StreamSettings, StreamSpec};
use herald_protocol::{Priority, Subjects};
use std::collections::HashMap;
use std::time::Duration;

/// What provisioning did.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct ProvisionReport {
    /// Streams and buckets created.
    pub created: Vec<String>,
    /// Streams updated in place.
    pub updated: Vec<String>,
    /// Already as wanted.
    pub unchanged: Vec<String>,
}

/// Why provisioning stopped.
#[derive(Debug, thiserror::Error)]
pub enum ProvisionError {
    /// NATS refused or did not answer.
    #[error("{what}: {source}")]
    Nats {
        /// What was being done.
        what: String,
        /// The NATS error.
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
    /// The existing stream differs in a way that cannot be changed in place.
    #[error(
        "stream {stream} exists with {field} = {existing}, but this Herald wants {wanted}; {advice}"
    )]
    Incompatible {
        /// Stream name.
        stream: String,
        /// The differing setting.
        field: &'static str,
        /// What the server has.
        existing: String,
        /// What we want.
        wanted: String,
        /// What to do about it.
        advice: &'static str,
    },
}

fn nats_err(
    what: impl Into<String>,
) -> impl FnOnce(Box<dyn std::error::Error + Send + Sync>) -> ProvisionError {
    let what = what.into();
    move |source| ProvisionError::Nats { what, source }
}

/// What one step did to one stream or bucket.
enum Change {
    Created(String),
    Updated(String),
    Unchanged(String),
}

impl ProvisionReport {
    fn record(&mut self, change: Option<Change>) {
        match change {
            Some(Change::Created(name)) => self.created.push(name),
            Some(Change::Updated(name)) => self.updated.push(name),
            Some(Change::Unchanged(name)) => self.unchanged.push(name),
            None => {}
        }
    }
}

/// How many times a step is asked again when JetStream leaves it unanswered.
const UNANSWERED_RETRIES: usize = 8;

/// Runs one provisioning step, and runs it again when a JetStream request in it went
/// unanswered.
///
/// A stream moved to more replicas (`--replicas 3` over an R1 set-up) and its consumers
/// form new Raft groups, and a request routed to a group that is still electing its leader
/// gets no answer at all, not an error. Every step here is idempotent (look up, then
/// create or update to the wanted config), so asking again is safe. Anything else, and a
/// server that stays silent past the retries, ends provisioning with the error.
async fn patiently<T, F, Fut>(mut step: F) -> Result<T, ProvisionError>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<T, ProvisionError>>,
{
    use backon::BackoffBuilder as _;
    let mut delays = backon::ExponentialBuilder::default()
        .with_min_delay(Duration::from_millis(250))
        .with_max_delay(Duration::from_secs(2))
        .with_max_times(UNANSWERED_RETRIES)
        .with_jitter()
        .build();
    loop {
        match step().await {
            Err(ProvisionError::Nats { what, source }) if unanswered(source.as_ref()) => {
                let Some(delay) = delays.next() else {
                    return Err(ProvisionError::Nats { what, source });
                };
                tracing::warn!(
                    step = %what,
                    retry_in_ms = delay.as_millis() as u64,
                    "JetStream did not answer; asking again (a stream or consumer moving to \
                     new replicas answers once its new group has elected a leader)"
                );
                tokio::time::sleep(delay).await;
            }
            done => return done,
        }
    }
}

/// Whether an error, or any error under it, is a JetStream or NATS request that timed out.
fn unanswered(error: &(dyn std::error::Error + 'static)) -> bool {
    use async_nats::jetstream::context::{
        ConsumerInfoError, ConsumerInfoErrorKind, CreateKeyValueError, CreateKeyValueErrorKind,
        CreateStreamError, CreateStreamErrorKind, RequestError, RequestErrorKind,
    };
    use async_nats::jetstream::stream::{
        ConsumerError, ConsumerErrorKind, ConsumerUpdateError, ConsumerUpdateErrorKind,
    };
    let mut next = Some(error);
    while let Some(e) = next {
        let timed_out = e
            .downcast_ref::<RequestError>()
            .is_some_and(|e| e.kind() == RequestErrorKind::TimedOut)
            || e.downcast_ref::<async_nats::RequestError>()
                .is_some_and(|e| e.kind() == async_nats::RequestErrorKind::TimedOut)
            || e.downcast_ref::<CreateStreamError>()
                .is_some_and(|e| e.kind() == CreateStreamErrorKind::TimedOut)
            || e.downcast_ref::<ConsumerInfoError>()
                .is_some_and(|e| e.kind() == ConsumerInfoErrorKind::TimedOut)
            || e.downcast_ref::<CreateKeyValueError>()
                .is_some_and(|e| e.kind() == CreateKeyValueErrorKind::TimedOut)
            || e.downcast_ref::<ConsumerError>()
                .is_some_and(|e| e.kind() == ConsumerErrorKind::TimedOut)
            || e.downcast_ref::<ConsumerUpdateError>()
                .is_some_and(|e| e.kind() == ConsumerUpdateErrorKind::TimedOut);
        if timed_out {
            return true;
        }
        next = e.source();
    }
    false
}

/// The KV buckets Herald keeps, as created on a fresh server.
fn buckets(settings: &StreamSettings) -> Vec<kv::Config> {
    const DAY: u64 = 24 * 3600;
    // (bucket, description, max age (0: none), value limit (0: the server's))
    let table: [(&str, &str, u64, i32); 8] = [
        (
            streams::PREFS_BUCKET,
            "Herald preferences: user token -> sparse preferences JSON",
            0,
            crate::preferences::MAX_PREFERENCES_BYTES as i32,
        ),
        (
            streams::TARGETS_BUCKET,
            "Herald delivery targets: device tokens and encrypted contact data",
            0,
            0,
        ),
        (
            streams::SENT_BUCKET,
            "Herald sent markers: jobs a provider accepted",
            7 * DAY,
            0,
        ),
        (
            streams::STATUS_BUCKET,
            "Herald delivery status per notification",
            30 * DAY,
            0,
        ),
        (
            streams::FANOUT_BUCKET,
            "Herald fan-out progress: publish id -> progress JSON",
            7 * DAY,
            4 * 1024,
        ),
        // Caps and groups outlive the longest window (a day), so old ones expire.
        (
            streams::CAPS_BUCKET,
            "Herald rate cap counters: one key per cap, window and tuple",
            2 * DAY,
            1024,
        ),
        (
            streams::GROUPS_BUCKET,
            "Herald aggregation groups: one key per (user, group key)",
            2 * DAY,
            64 * 1024,
        ),
        // A key names the same notification for INBOX's dedup window, no longer: the
        // records expire with it (and are read as gone past the window INBOX has now).
        (
            crate::keys::KEYS_BUCKET,
            "Herald idempotency keys of HTTP notifies: (producer, key) -> id, body hash, first answer",
            settings.dedup_window.as_secs().max(1),
            1024,
        ),
    ];
    table
        .into_iter()
        .map(
            |(bucket, description, max_age_s, max_value_size)| kv::Config {
                bucket: bucket.to_string(),
                description: description.to_string(),
                history: 1,
                max_age: Duration::from_secs(max_age_s),
                max_value_size,
                storage: stream::StorageType::File,
                num_replicas: settings.replicas,
                ..Default::default()
            },
        )
        .collect()
}

/// Provisions everything Herald needs.
///
/// # Errors
/// [`ProvisionError`] when NATS fails or an existing stream is incompatible.
pub async fn provision(
    js: &jetstream::Context,
    subjects: &Subjects,
    settings: &StreamSettings,
) -> Result<ProvisionReport, ProvisionError> {
    let mut report = ProvisionReport::default();
    report.record(patiently(|| remove_legacy_work_stream(js)).await?);
    for spec in &streams::streams(subjects, settings) {
        report.record(patiently(|| ensure_stream(js, spec)).await?);
    }
    for (bucket, description) in [
        (
            streams::READS_BUCKET,
            "Herald read positions: user token -> highest seq read",
        ),
        (
            streams::SEEN_BUCKET,
            "Herald seen positions (ack frames): user token -> highest seq seen live",
        ),
    ] {
        report.record(
            patiently(|| ensure_positions_bucket(js, settings, bucket, description)).await?,
        );
    }
    for config in &buckets(settings) {
        report.record(patiently(|| ensure_bucket(js, config.clone())).await?);
    }
    for partition in 0..subjects.partitions() {
        for lane in Priority::ALL {
            patiently(|| ensure_router_consumer(js, subjects, partition, lane)).await?;
        }
        patiently(|| remove_legacy_router_consumer(js, partition)).await?;
    }
    patiently(|| ensure_fanout_consumers(js, subjects)).await?;
    for channel in streams::WORK_CHANNELS {
        for lane in Priority::ALL {
            patiently(|| ensure_worker_consumer(js, subjects, channel, lane)).await?;
        }
    }
    Ok(report)
}

/// Earlier versions kept every channel's jobs in one `HERALD_WORK` stream, whose subjects
/// overlap the per-channel streams. Removed when empty; refused when it still holds jobs.
async fn remove_legacy_work_stream(
    js: &jetstream::Context,
) -> Result<Option<Change>, ProvisionError> {
    let Ok(mut legacy) = js.get_stream(streams::LEGACY_WORK).await else {
        return Ok(None);
    };
    let info = legacy
        .info()
        .await
        .map_err(|e| nats_err("reading the legacy work stream")(Box::new(e)))?;
    if info.state.messages > 0 {
        return Err(ProvisionError::Incompatible {
            stream: streams::LEGACY_WORK.to_string(),
            field: "messages",
            existing: info.state.messages.to_string(),
            wanted: "0".into(),
            advice: "jobs are now kept per channel (HERALD_WORK_PUSH, ...); let an older worker drain HERALD_WORK, or delete it (losing its jobs)",
        });
    }
    js.delete_stream(streams::LEGACY_WORK)
        .await
        .map_err(|e| nats_err("deleting the legacy work stream")(Box::new(e)))?;
    Ok(Some(Change::Updated(streams::LEGACY_WORK.to_string())))
}

/// How a channel's worker consumers behave. Workers apply their own values at start
/// (an update of the same durable consumer); provisioning creates them with the defaults.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct WorkerQueue {
    /// A job not acked within this long is redelivered (a crashed worker's jobs move on).
    pub ack_wait: Duration,
    /// Failed provider attempts after which a job is dead-lettered. Deliveries that
    /// attempt nothing (every circuit of the job's providers open, the push escalation
    /// wait, state that could not be read) do not count: the consumer's `MaxDeliver` is
    /// this plus [`SPARE_DELIVERIES`], and workers dead-letter at the last of those.
    pub max_deliver: i64,
    /// Jobs delivered and not yet acked, per lane (in flight, plus naked with a delay).
    pub max_ack_pending: i64,
}

impl Default for WorkerQueue {
    fn default() -> Self {
        Self {
            ack_wait: Duration::from_secs(30),
            max_deliver: 8,
            max_ack_pending: 10_000,
        }
    }
}

/// Deliveries a job may use beyond its provider attempts ([`WorkerQueue::max_deliver`]):
/// at the default back-off, hours of a provider outage.
pub const SPARE_DELIVERIES: i64 = 100;

/// The durable pull consumer of one channel's lane.
pub fn worker_consumer_config(
    subjects: &Subjects,
    channel: herald_protocol::Channel,
    lane: herald_protocol::Priority,
    queue: WorkerQueue,
) -> consumer::pull::Config {
    consumer::pull::Config {
        durable_name: Some(streams::worker_consumer(channel, lane)),
        filter_subject: subjects.work(channel, lane),
        ack_policy: consumer::AckPolicy::Explicit,
        ack_wait: queue.ack_wait,
        max_deliver: queue.max_deliver.saturating_add(SPARE_DELIVERIES),
        max_ack_pending: queue.max_ack_pending,
        deliver_policy: consumer::DeliverPolicy::All,
        ..Default::default()
    }
}

async fn ensure_worker_consumer(
    js: &jetstream::Context,
    subjects: &Subjects,
    channel: herald_protocol::Channel,
    lane: herald_protocol::Priority,
) -> Result<(), ProvisionError> {
    let name = streams::work_stream_name(channel);
    let stream = js
        .get_stream_no_info(name)
        .await
        .map_err(|e| nats_err(format!("opening stream {name}"))(Box::new(e)))?;
    stream
        .get_or_create_consumer::<consumer::pull::Config>(
            &streams::worker_consumer(channel, lane),
            worker_consumer_config(subjects, channel, lane, WorkerQueue::default()),
        )
        .await
        .map_err(|e| {
            nats_err(format!(
                "creating worker consumer {}",
                streams::worker_consumer(channel, lane)
            ))(Box::new(e))
        })?;
    Ok(())
}

fn stream_config(spec: &StreamSpec) -> stream::Config {
    stream::Config {
        name: spec.name.to_string(),
        subjects: spec.subjects.clone(),
        retention: match spec.retention {
            Retention::Limits => stream::RetentionPolicy::Limits,
            Retention::WorkQueue => stream::RetentionPolicy::WorkQueue,
        },
        storage: stream::StorageType::File,
        max_age: spec.max_age,
        max_messages_per_subject: spec.max_msgs_per_subject,
        max_message_size: spec.max_msg_size,
        duplicate_window: spec.duplicate_window,
        allow_direct: spec.allow_direct,
        republish: spec
            .republish
            .as_ref()
            .map(|(src, dest)| stream::Republish {
                source: src.clone(),
                destination: dest.clone(),
                headers_only: false,
            }),
        num_replicas: spec.replicas,
        discard: match spec.discard {
            Discard::Old => stream::DiscardPolicy::Old,
            Discard::NewPerSubject => stream::DiscardPolicy::New,
        },
        discard_new_per_subject: spec.discard == Discard::NewPerSubject,
        max_messages: spec.max_msgs,
        max_bytes: spec.max_bytes,
        metadata: spec.metadata.iter().cloned().collect::<HashMap<_, _>>(),
        allow_message_schedules: spec.allow_schedules,
        ..Default::default()
    }
}

async fn ensure_stream(
    js: &jetstream::Context,
    spec: &StreamSpec,
) -> Result<Option<Change>, ProvisionError> {
    let wanted = stream_config(spec);
    let existing = match js.get_stream(spec.name).await {
        Ok(mut s) => Some(
            s.info()
                .await
                .map_err(|e| nats_err(format!("reading stream {}", spec.name))(Box::new(e)))?
                .config
                .clone(),
        ),
        Err(e)
            if matches!(
                e.kind(),
                jetstream::context::GetStreamErrorKind::JetStream(ref js_err)
                    if js_err.error_code() == jetstream::ErrorCode::STREAM_NOT_FOUND
            ) =>
        {
            None
        }
        Err(e) => {
            return Err(nats_err(format!("looking up stream {}", spec.name))(
                Box::new(e),
            ));
        }
    };
    let Some(existing) = existing else {
        js.create_stream(wanted)
            .await
            .map_err(|e| nats_err(format!("creating stream {}", spec.name))(Box::new(e)))?;
        return Ok(Some(Change::Created(spec.name.to_string())));
    };
    check_compatible(spec.name, &existing, &wanted)?;
    let mut merged = wanted.clone();
    // Keep metadata the server or an operator added; ours wins on our keys.
    let mut metadata = existing.metadata.clone();
    metadata.extend(wanted.metadata.clone());
    merged.metadata = metadata;
    if same_tunables(&existing, &merged) {
        return Ok(Some(Change::Unchanged(spec.name.to_string())));
    }
    js.update_stream(&merged)
        .await
        .map_err(|e| nats_err(format!("updating stream {}", spec.name))(Box::new(e)))?;
    Ok(Some(Change::Updated(spec.name.to_string())))
}

fn check_compatible(
    name: &str,
    existing: &stream::Config,
    wanted: &stream::Config,
) -> Result<(), ProvisionError> {
    let incompatible = |field, existing: String, wanted: String, advice| {
        Err(ProvisionError::Incompatible {
            stream: name.to_string(),
            field,
            existing,
            wanted,
            advice,
        })
    };
    // Adding subjects is compatible (new kinds of data); dropping one would strand data.
    if !existing
        .subjects
        .iter()
        .all(|s| wanted.subjects.contains(s))
    {
        return incompatible(
            "subjects",
            format!("{:?}", existing.subjects),
            format!("{:?}", wanted.subjects),
            "the subject prefix changed, or this Herald is older than the one that provisioned it; set the prefix the data was written with, run the newer Herald, or delete the stream (losing its data)",
        );
    }
    if existing.retention != wanted.retention {
        return incompatible(
            "retention",
            format!("{:?}", existing.retention),
            format!("{:?}", wanted.retention),
            "retention cannot change in place; delete the stream or keep its retention",
        );
    }
    if existing.storage != wanted.storage {
        return incompatible(
            "storage",
            format!("{:?}", existing.storage),
            format!("{:?}", wanted.storage),
            "storage cannot change in place; delete the stream",
        );
    }
    let key = streams::PARTITIONS_METADATA;
    if let (Some(have), Some(want)) = (existing.metadata.get(key), wanted.metadata.get(key))
        && have != want
    {
        return incompatible(
            "partitions",
            have.clone(),
            want.clone(),
            "stored subjects embed the partition count; start Herald with --partitions set to the stored value",
        );
    }
    Ok(())
}

fn same_tunables(a: &stream::Config, b: &stream::Config) -> bool {
    a.max_age == b.max_age
        && a.max_messages_per_subject == b.max_messages_per_subject
        && a.max_message_size == b.max_message_size
        && a.duplicate_window == b.duplicate_window
        && a.allow_direct == b.allow_direct
        && a.republish == b.republish
        && a.subjects == b.subjects
        && a.allow_message_schedules == b.allow_message_schedules
        && a.num_replicas == b.num_replicas
        && a.max_messages == b.max_messages
        && a.max_bytes == b.max_bytes
        && a.discard == b.discard
        && a.discard_new_per_subject == b.discard_new_per_subject
        && a.metadata.iter().all(|(k, v)| b.metadata.get(k) == Some(v))
        && b.metadata.iter().all(|(k, v)| a.metadata.get(k) == Some(v))
}

/// Largest read-position message: NATS counts the CAS headers against the value limit.
const READS_VALUE_LIMIT: i32 = 1024;

async fn ensure_positions_bucket(
    js: &jetstream::Context,
    settings: &StreamSettings,
    bucket: &str,
    description: &str,
) -> Result<Option<Change>, ProvisionError> {
    let config = kv::Config {
        bucket: bucket.to_string(),
        description: description.into(),
        history: 1,
        max_value_size: READS_VALUE_LIMIT,
        storage: stream::StorageType::File,
        num_replicas: settings.replicas,
        ..Default::default()
    };
    // Early versions capped values at 32 bytes, which the CAS headers overflow.
    ensure_bucket_growing(js, config, Some(READS_VALUE_LIMIT)).await
}

/// Creates a KV bucket when missing. An existing one keeps its limits (changing history
/// would drop revisions) but takes the replica count asked for: `herald provision
/// --replicas 3` after a start at R1 must move device tokens, contact data and sent
/// markers to R3 with the streams, or one node's loss loses them.
async fn ensure_bucket(
    js: &jetstream::Context,
    config: kv::Config,
) -> Result<Option<Change>, ProvisionError> {
    ensure_bucket_growing(js, config, None).await
}

/// [`ensure_bucket`], and an existing bucket whose value limit is below `min_value_size`
/// has it raised.
async fn ensure_bucket_growing(
    js: &jetstream::Context,
    config: kv::Config,
    min_value_size: Option<i32>,
) -> Result<Option<Change>, ProvisionError> {
    let bucket = config.bucket.clone();
    if js.get_key_value(&bucket).await.is_err() {
        js.create_key_value(config)
            .await
            .map_err(|e| nats_err(format!("creating bucket {bucket}"))(Box::new(e)))?;
        return Ok(Some(Change::Created(bucket)));
    }
    let mut stream = js
        .get_stream(format!("KV_{bucket}"))
        .await
        .map_err(|e| nats_err(format!("opening bucket {bucket}"))(Box::new(e)))?;
    let mut existing = stream
        .info()
        .await
        .map_err(|e| nats_err(format!("reading bucket {bucket}"))(Box::new(e)))?
        .config
        .clone();
    let small = min_value_size
        .filter(|&min| existing.max_message_size >= 0 && existing.max_message_size < min);
    if small.is_none() && existing.num_replicas == config.num_replicas {
        return Ok(Some(Change::Unchanged(bucket)));
    }
    if let Some(min) = small {
        existing.max_message_size = min;
    }
    existing.num_replicas = config.num_replicas;
    js.update_stream(&existing)
        .await
        .map_err(|e| nats_err(format!("updating bucket {bucket}"))(Box::new(e)))?;
    Ok(Some(Change::Updated(bucket)))
}

/// The consumers of the FANOUT queue: one per priority lane
/// ([`crate::topics::fanout_lane_consumer`], filtered to `<prefix>.fanout.<lane>`), so a
/// `high` publish never waits behind queued `low` ones, and the first consumer
/// ([`streams::FANOUT_CONSUMER`]) kept to the lane-less `<prefix>.fanout`, where jobs queued
/// by earlier versions wait. A publish is worked on by one process at a time; if it dies,
/// the job comes back after `ack_wait` (the worker signals progress well within it) and
/// resumes from its recorded cursor.
///
/// A work queue's consumers must not overlap, so an unfiltered first consumer (made by an
/// earlier version) is narrowed before the lane consumers are created. Fan-out workers
/// older than the lanes read the first consumer only: upgrade routers before provisioning.
async fn ensure_fanout_consumers(
    js: &jetstream::Context,
    subjects: &Subjects,
) -> Result<(), ProvisionError> {
    let stream = js
        .get_stream_no_info(streams::FANOUT)
        .await
        .map_err(|e| nats_err("opening the fan-out stream")(Box::new(e)))?;
    let first = consumer::pull::Config {
        durable_name: Some(streams::FANOUT_CONSUMER.to_string()),
        filter_subject: subjects.fanout(),
        ack_policy: consumer::AckPolicy::Explicit,
        ack_wait: Duration::from_secs(30),
        max_ack_pending: 64,
        ..Default::default()
    };
    ensure_consumer(&stream, first, |existing| {
        existing.filter_subject == subjects.fanout() && existing.filter_subjects.is_empty()
    })
    .await?;
    for lane in Priority::ALL {
        let wanted = crate::topics::fanout_lane_consumer_config(subjects, lane);
        ensure_consumer(&stream, wanted.clone(), |existing| {
            existing.filter_subject == wanted.filter_subject
        })
        .await?;
    }
    Ok(())
}

/// Creates the durable consumer `wanted` when missing, and updates it to `wanted` when
/// `current` says the one on the server is not as wanted.
async fn ensure_consumer(
    stream: &stream::Stream<()>,
    wanted: consumer::pull::Config,
    current: impl Fn(&consumer::Config) -> bool,
) -> Result<(), ProvisionError> {
    let name = wanted.durable_name.clone().unwrap_or_default();
    match stream.consumer_info(&name).await {
        Ok(info) if current(&info.config) => Ok(()),
        Ok(_) => stream
            .update_consumer(wanted)
            .await
            .map(drop)
            .map_err(|e| nats_err(format!("updating consumer {name}"))(Box::new(e))),
        Err(e) if e.kind() == jetstream::context::ConsumerInfoErrorKind::NotFound => stream
            .create_consumer(wanted)
            .await
            .map(drop)
            .map_err(|e| nats_err(format!("creating consumer {name}"))(Box::new(e))),
        Err(e) => Err(nats_err(format!("reading consumer {name}"))(Box::new(e))),
    }
}

/// The router consumer of one lane of one partition: one pinned client at a time, so one
/// router owns each user's lane; a standby router takes over when the pinned one stops
/// pulling. A lane has its own consumer so that `high` never waits behind `low`.
pub fn router_consumer_config(
    subjects: &Subjects,
    partition: u16,
    lane: Priority,
) -> consumer::pull::Config {
    consumer::pull::Config {
        durable_name: Some(streams::router_consumer(partition, lane)),
        // The lane's inbox entries and its deferred work (back from quiet hours, a
        // group's window, a digest period; a big topic's hand-overs).
        filter_subjects: vec![
            subjects.inbox_lane(partition, lane),
            subjects.deferred_lane(partition, lane),
        ],
        // Explicit, per message: with AckAll, a router taking over a partition would ack
        // the messages its crashed predecessor had pulled but not routed.
        ack_policy: consumer::AckPolicy::Explicit,
        // A crashed router's messages go to its successor after this long.
        ack_wait: Duration::from_secs(10),
        max_ack_pending: 20_000,
        deliver_policy: consumer::DeliverPolicy::New,
        priority_policy: consumer::PriorityPolicy::PinnedClient,
        priority_groups: vec![streams::ROUTER_GROUP.to_string()],
        // The pin outlasts the ack wait plus the router's pull expiry (2 s): when the
        // owner dies, what its last pull delivered has passed its ack wait and is queued
        // for redelivery — served before new messages — by the time a standby is pinned,
        // so the standby routes a user's older messages before their newer ones. With
        // both at 10 s a standby could be pinned first and route newer messages ahead.
        priority_timeout: ROUTER_PIN_TIMEOUT,
        ..Default::default()
    }
}

/// How long a router consumer keeps its pin without pulls (see
/// [`router_consumer_config`]): clearly above its 10 s ack wait plus the 2 s pull expiry.
pub const ROUTER_PIN_TIMEOUT: Duration = Duration::from_secs(20);

/// Removes the lane-less router consumer of earlier versions: its filter no longer
/// matches the inbox subjects, and nobody pulls it.
async fn remove_legacy_router_consumer(
    js: &jetstream::Context,
    partition: u16,
) -> Result<(), ProvisionError> {
    let stream = js
        .get_stream_no_info(streams::INBOX)
        .await
        .map_err(|e| nats_err("opening the inbox stream")(Box::new(e)))?;
    let name = streams::legacy_router_consumer(partition);
    if stream.consumer_info(&name).await.is_ok() {
        stream.delete_consumer(&name).await.map_err(|e| {
            nats_err(format!(
                "removing the lane-less router consumer p{partition}"
            ))(Box::new(e))
        })?;
        tracing::info!(
            partition,
            "removed the lane-less router consumer of an earlier version"
        );
    }
    Ok(())
}

async fn ensure_router_consumer(
    js: &jetstream::Context,
    subjects: &Subjects,
    partition: u16,
    lane: Priority,
) -> Result<(), ProvisionError> {
    let stream = js
        .get_stream_no_info(streams::INBOX)
        .await
        .map_err(|e| nats_err("opening the inbox stream")(Box::new(e)))?;
    let wanted = router_consumer_config(subjects, partition, lane);
    // Filters change between versions (quiet-hours deferral added one, lanes for deferred
    // work another), and the pin timeout was raised above the ack wait: updated in place,
    // the consumer keeps its position.
    ensure_consumer(&stream, wanted.clone(), |existing| {
        existing.filter_subjects == wanted.filter_subjects
            && existing.priority_timeout == wanted.priority_timeout
    })
    .await
}

#[cfg(test)]
mod tests {
    use super::*;

    fn timed_out() -> ProvisionError {
        use async_nats::jetstream::stream::{ConsumerError, ConsumerErrorKind};
        nats_err("step")(Box::new(ConsumerError::new(ConsumerErrorKind::TimedOut)))
    }

    #[test]
    fn a_request_nobody_answered_is_asked_again_a_refusal_is_not() {
        use async_nats::jetstream::context::{
            GetStreamError, GetStreamErrorKind, RequestError, RequestErrorKind,
        };
        use async_nats::jetstream::stream::{ConsumerError, ConsumerErrorKind};
        let ProvisionError::Nats { source, .. } = timed_out() else {
            unreachable!("nats_err makes a Nats error")
        };
        assert!(unanswered(source.as_ref()));
        // get_stream wraps the timed-out request in an error of another kind.
        let wrapped = GetStreamError::with_source(
            GetStreamErrorKind::Request,
            RequestError::new(RequestErrorKind::TimedOut),
        );
        assert!(unanswered(&wrapped));
        assert!(!unanswered(&ConsumerError::new(
            ConsumerErrorKind::InvalidConsumerType
        )));
        assert!(!unanswered(&RequestError::new(
            RequestErrorKind::NoResponders
        )));
    }

    #[tokio::test(start_paused = true)]
    async fn a_step_left_unanswered_runs_again_then_gives_up_with_its_error() {
        let runs = std::cell::Cell::new(0);
        let answered = patiently(|| async {
            runs.set(runs.get() + 1);
            if runs.get() < 3 {
                return Err(timed_out());
            }
            Ok(runs.get())
        })
        .await;
        assert_eq!(answered.ok(), Some(3));

        runs.set(0);
        let silent = patiently(|| async {
            runs.set(runs.get() + 1);
            Err::<(), _>(timed_out())
        })
        .await;
        assert!(matches!(silent, Err(ProvisionError::Nats { .. })));
        assert_eq!(runs.get(), UNANSWERED_RETRIES + 1);

        runs.set(0);
        let refused = patiently(|| async {
            runs.set(runs.get() + 1);
            Err::<(), _>(ProvisionError::Incompatible {
                stream: "S".into(),
                field: "subjects",
                existing: "a".into(),
                wanted: "b".into(),
                advice: "none",
            })
        })
        .await;
        assert!(refused.is_err());
        assert_eq!(runs.get(), 1, "a refusal is not asked again");
    }

    #[test]
    fn each_lane_reads_its_own_deferred_work_normal_on_the_lane_less_subject() {
        let subjects = Subjects::default();
        let user = herald_protocol::UserId::new("ann").expect("an id");
        let partition = user.partition(subjects.partitions());
        let matches = |filter: &str, subject: &str| {
            let (f, s): (Vec<&str>, Vec<&str>) =
                (filter.split('.').collect(), subject.split('.').collect());
            f.len() == s.len() && f.iter().zip(&s).all(|(f, s)| *f == "*" || f == s)
        };
        for lane in Priority::ALL {
            let config = router_consumer_config(&subjects, partition, lane);
            for other in Priority::ALL {
                let deferred = subjects.deferred_in(&user, other);
                let read = config.filter_subjects.iter().any(|f| matches(f, &deferred));
                assert_eq!(read, lane == other, "{lane:?} consumer and {deferred}");
            }
            let legacy = subjects.deferred(&user);
            let read = config.filter_subjects.iter().any(|f| matches(f, &legacy));
            assert_eq!(
                read,
                lane == streams::DEFERRED_LANE,
                "{lane:?} and {legacy}"
            );
        }
    }
}
