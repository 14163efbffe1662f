//! Loading channel work fast: notifications appended to the inbox and one channel job per
//! notification published straight onto a channel's work queue, both with pipelined
//! JetStream acks (a window of publishes in flight, not one round trip each).
//!
//! Used by `herald bench workers` and by the tests that need tens of thousands of jobs
//! waiting (a lane under a backlog, a worker killed under load). The router is bypassed on
//! purpose: what is measured or tested is the worker, and the notifications are stored
//! with the inbox channel only, so a router that happens to run routes none of them again.
//! Jobs carry the same `Nats-Msg-Id` as the router's, so the queue's dedup still applies.

use async_nats::jetstream::context::{PublishAckFuture, PublishError, PublishErrorKind};
use async_nats::jetstream::message::PublishMessage;
use async_nats::jetstream::publish::PublishAck;
use backon::{ExponentialBuilder, Retryable as _};
use bytes::Bytes;
use futures::StreamExt as _;
use herald_protocol::notification::format_time;
use herald_protocol::{Channel, ChannelJob, Priority, StoredNotification, Subjects, UserId};
use herald_store::{Inbox, Nats};

/// Publishes awaiting their JetStream ack at once.
const WINDOW: usize = 2_048;

/// What to load.
#[derive(Debug, Clone)]
pub struct JobLoad {
    /// Recipients, in turn (the inbox keeps a bounded number per user, so spread big loads).
    pub users: Vec<UserId>,
    /// The channel of the jobs.
    pub channel: Channel,
    /// Their lane.
    pub lane: Priority,
    /// The target id of every job (`herald_store::targets::target_id`), registered for
    /// every user.
    pub target: String,
    /// How many.
    pub count: usize,
    /// Title prefix (`"<prefix> <n>"`).
    pub title: String,
}

/// Why loading failed.
pub type LoadError = Box<dyn std::error::Error + Send + Sync>;

/// Appends `load.count` notifications and enqueues their jobs; returns the jobs in order.
///
/// # Errors
/// When a publish is refused or not acked (e.g. a full work queue).
pub async fn enqueue(
    nats: &Nats,
    subjects: &Subjects,
    load: &JobLoad,
) -> Result<Vec<ChannelJob>, LoadError> {
    if load.users.is_empty() {
        return Err("a job load needs at least one user".into());
    }
    let inbox = Inbox::new(nats.clone(), subjects.clone());
    let created_at = format_time(time::OffsetDateTime::now_utc());
    let notifications: Vec<StoredNotification> = (0..load.count)
        .map(|i| StoredNotification {
            id: uuid::Uuid::now_v7().to_string(),
            user_id: load.users[i % load.users.len()].clone(),
            category: None,
            priority: load.lane,
            title: Some(format!("{} {i}", load.title)),
            body: Some("Herald job load".into()),
            data: serde_json::Map::new(),
            topic: None,
            created_at: created_at.clone(),
            // Inbox only: a running router has nothing to route.
            channels: vec![Channel::Inbox],
            collapse_key: None,
            expires_at: None,
            send_at: None,
            rendered: None,
            producer: None,
            group: None,
            variants: std::collections::BTreeMap::new(),
        })
        .collect();
    let inbox = &inbox;
    let seqs: Vec<u64> = futures::stream::iter(notifications.iter())
        .map(|n| async move {
            let payload = Inbox::encode(n)?;
            let ack = acked(|| async { Ok(inbox.send(n, payload.clone()).await?) }).await?;
            Ok::<u64, LoadError>(ack.sequence)
        })
        .buffered(WINDOW)
        .collect::<Vec<_>>()
        .await
        .into_iter()
        .collect::<Result<_, _>>()?;
    let jobs: Vec<ChannelJob> = notifications
        .iter()
        .zip(seqs)
        .map(|(n, seq)| ChannelJob {
            id: n.id.clone(),
            seq,
            user_id: n.user_id.clone(),
            channel: load.channel,
            priority: load.lane,
            target: load.target.clone(),
            folded: None,
            digest: None,
            locale: None,
        })
        .collect();
    let subject = subjects.work(load.channel, load.lane);
    let js = &nats.js;
    let subject = &subject;
    futures::stream::iter(jobs.iter())
        .map(|job| async move {
            let payload = Bytes::from(serde_json::to_vec(job)?);
            acked(|| async {
                let publish = PublishMessage::build()
                    .payload(payload.clone())
                    .message_id(job.msg_id());
                Ok(js.send_publish(subject.clone(), publish).await?)
            })
            .await?;
            Ok::<(), LoadError>(())
        })
        .buffered(WINDOW)
        .collect::<Vec<_>>()
        .await
        .into_iter()
        .collect::<Result<Vec<()>, _>>()?;
    Ok(jobs)
}

/// One publish and its ack, made again when the ack does not come in time: the message
/// carries a `Nats-Msg-Id`, so a second try of one already stored is a no-op, and a
/// loaded server (a CI machine running the whole suite) can take longer than the ack
/// timeout with thousands of publishes in flight. Refusals are not retried.
async fn acked<F, Fut>(publish: F) -> Result<PublishAck, LoadError>
where
    F: Fn() -> Fut,
    Fut: Future<Output = Result<PublishAckFuture, LoadError>>,
{
    (|| async { Ok::<_, LoadError>(publish().await?.await?) })
        .retry(
            ExponentialBuilder::default()
                .with_min_delay(std::time::Duration::from_millis(200))
                .with_max_times(5)
                .with_jitter(),
        )
        .when(|e| {
            e.downcast_ref::<PublishError>()
                .is_some_and(|e| e.kind() == PublishErrorKind::TimedOut)
        })
        .await
}
