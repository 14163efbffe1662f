//! The router: consumes the INBOX stream partition by partition and turns each stored
//! notification into channel jobs (push, email, SMS, webhook) on the WORK stream.
//!
//! Live delivery needs no router hop — INBOX republishes every stored message to the
//! user's live subject. What the router owns is everything after the inbox, and for that
//! per-user order matters: each partition has one durable consumer whose priority group
//! pins a single client, so exactly one router process owns a partition (and so a user)
//! at a time; a standby takes over when the owner stops pulling.

use async_nats::jetstream::consumer::PullConsumer;
use async_nats::jetstream::message::PublishMessage;
use futures::StreamExt as _;
use herald_protocol::Subjects;
use herald_protocol::streams::{self, INBOX, WORK};
use herald_protocol::{Channel, ChannelJob, Policy, StoredNotification};
use herald_store::{Nats, PreferenceStore};
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;
use tokio_util::sync::CancellationToken;

/// Pull expiry: well under the consumers' pin timeout, so an idle owner keeps its pin.
const PULL_EXPIRY: Duration = Duration::from_secs(2);

/// Why the router stopped.
#[derive(Debug, thiserror::Error)]
pub enum RouterError {
    /// The preferences bucket could not be opened.
    #[error("opening the preferences bucket")]
    Preferences(#[source] herald_store::PreferencesError),
    /// A partition consumer could not be opened.
    #[error("opening router consumer for partition {partition}")]
    Consumer {
        /// The partition.
        partition: u16,
        /// The NATS error.
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
}

/// Runs one router over every partition until `shutdown`, then finishes in-flight work.
///
/// # Errors
/// [`RouterError`] when a partition consumer cannot be opened.
pub async fn run(
    nats: Nats,
    subjects: Subjects,
    policy: Arc<Policy>,
    shutdown: impl Future<Output = ()> + Send,
) -> Result<(), RouterError> {
    let route = Route {
        nats: nats.clone(),
        subjects: subjects.clone(),
        preferences: PreferenceStore::open(&nats.js_consume)
            .await
            .map_err(RouterError::Preferences)?,
        policy,
    };
    let stop = CancellationToken::new();
    let mut tasks = tokio::task::JoinSet::new();
    for partition in 0..subjects.partitions() {
        let consumer = open(&nats, partition).await?;
        tasks.spawn(partition_loop(
            route.clone(),
            partition,
            consumer,
            stop.clone(),
        ));
    }
    tracing::info!(partitions = subjects.partitions(), "router running");
    shutdown.await;
    stop.cancel();
    while tasks.join_next().await.is_some() {}
    Ok(())
}

async fn open(nats: &Nats, partition: u16) -> Result<PullConsumer, RouterError> {
    fn err(partition: u16, e: impl std::error::Error + Send + Sync + 'static) -> RouterError {
        RouterError::Consumer {
            partition,
            source: Box::new(e),
        }
    }
    let stream = nats
        .js_consume
        .get_stream_no_info(INBOX)
        .await
        .map_err(|e| err(partition, e))?;
    stream
        .get_consumer(&streams::router_consumer(partition))
        .await
        .map_err(|source| RouterError::Consumer { partition, source })
}

/// At shutdown, stop once no message arrived for this long...
const DRAIN_QUIET: Duration = Duration::from_millis(250);
/// ...or after this long in all.
const DRAIN_LIMIT: Duration = Duration::from_secs(3);

/// Back-off between attempts to enqueue one notification's jobs.
const RETRY_BACKOFF: Duration = Duration::from_millis(500);

/// What routing one message needs.
#[derive(Clone)]
struct Route {
    nats: Nats,
    subjects: Subjects,
    preferences: PreferenceStore,
    policy: Arc<Policy>,
}

async fn partition_loop(
    route: Route,
    partition: u16,
    consumer: PullConsumer,
    stop: CancellationToken,
) {
    while !stop.is_cancelled() {
        let messages = consumer
            .stream()
            .group(streams::ROUTER_GROUP)
            .expires(PULL_EXPIRY)
            .max_messages_per_batch(256)
            .messages()
            .await;
        let mut messages = match messages {
            Ok(m) => m,
            Err(e) => {
                tracing::warn!(partition, error = %e, "router pull failed; retrying");
                tokio::select! {
                    _ = stop.cancelled() => return,
                    _ = tokio::time::sleep(Duration::from_secs(1)) => continue,
                }
            }
        };
        loop {
            let next = tokio::select! {
                _ = stop.cancelled() => {
                    // Route what is already on its way to this process before letting go:
                    // the server keeps delivering on our open pull until it goes quiet, and
                    // anything left unacked would reach the next owner only after its ack
                    // wait, behind newer messages.
                    let deadline = tokio::time::Instant::now() + DRAIN_LIMIT;
                    while let Ok(Some(Ok(msg))) =
                        tokio::time::timeout_at(deadline.min(tokio::time::Instant::now() + DRAIN_QUIET), messages.next()).await
                    {
                        if let Routed::Done = route.message(&msg).await {
                            let _ = msg.ack().await;
                        }
                    }
                    return;
                }
                next = messages.next() => next,
            };
            match next {
                Some(Ok(msg)) => {
                    // Retry in place: moving on would break per-user order.
                    while let Routed::Retry = route.message(&msg).await {
                        tokio::select! {
                            // Unacked: redelivered to whichever router owns the partition next.
                            _ = stop.cancelled() => return,
                            _ = tokio::time::sleep(RETRY_BACKOFF) => {}
                        }
                    }
                    if let Err(e) = msg.ack().await {
                        tracing::warn!(partition, error = %e, "router ack failed; message will be redelivered");
                    }
                }
                Some(Err(e)) => {
                    tracing::debug!(partition, error = %e, "router stream error");
                }
                None => break,
            }
        }
    }
}

enum Routed {
    /// Nothing left to do for this message.
    Done,
    /// Enqueueing failed; try again.
    Retry,
}

impl Route {
    /// Routes one stored notification: one job per channel beyond the inbox that the
    /// user's preferences allow. `Nats-Msg-Id` per (id, channel) makes a retry harmless
    /// for the jobs that did land.
    async fn message(&self, msg: &async_nats::jetstream::Message) -> Routed {
        let Route { nats, subjects, .. } = self;
        let needs_routing = msg
            .headers
            .as_ref()
            .and_then(|h| h.get(streams::ROUTE_HEADER))
            .is_some();
        if !needs_routing {
            metrics::counter!("herald_router_skipped_total").increment(1);
            return Routed::Done;
        }
        let seq = match msg.info() {
            Ok(info) => info.stream_sequence,
            Err(e) => {
                tracing::warn!(error = %e, "router message without metadata; skipping it");
                return Routed::Done;
            }
        };
        let stored: StoredNotification = match serde_json::from_slice(&msg.payload) {
            Ok(n) => n,
            Err(e) => {
                tracing::warn!(seq, error = %e, "undecodable inbox message; skipping");
                return Routed::Done;
            }
        };
        let Some(channels) = self.allowed_channels(&stored, seq).await else {
            return Routed::Retry;
        };
        let mut acks = Vec::new();
        for channel in channels {
            let job = ChannelJob {
                id: stored.id.clone(),
                seq,
                user_id: stored.user_id.clone(),
                channel,
                priority: stored.priority,
            };
            let Ok(payload) = serde_json::to_vec(&job) else {
                continue;
            };
            let publish = PublishMessage::build()
                .payload(payload.into())
                .message_id(job.msg_id())
                .expected_stream(WORK);
            match nats
                .js
                .send_publish(subjects.work(channel, stored.priority), publish)
                .await
            {
                Ok(ack) => acks.push(ack),
                Err(e) => {
                    tracing::warn!(seq, error = %e, "enqueue failed; will retry");
                    return Routed::Retry;
                }
            }
        }
        for ack in acks {
            if let Err(e) = ack.await {
                tracing::warn!(seq, error = %e, "enqueue not acked; will retry");
                return Routed::Retry;
            }
        }
        metrics::counter!("herald_router_routed_total").increment(1);
        Routed::Done
    }

    /// The channels beyond the inbox that policy lets this notification use, read from the
    /// user's preferences as they are now; `None` when the preferences cannot be read.
    async fn allowed_channels(
        &self,
        stored: &StoredNotification,
        seq: u64,
    ) -> Option<Vec<Channel>> {
        let wanted: Vec<Channel> = stored
            .channels
            .iter()
            .copied()
            .filter(|c| *c != Channel::Inbox)
            .collect();
        if wanted.is_empty() {
            return Some(wanted);
        }
        let prefs = match self.preferences.get(&stored.user_id).await {
            Ok(p) => p,
            Err(e) => {
                tracing::warn!(seq, error = %e, "preferences unavailable; will retry");
                return None;
            }
        };
        let category = stored.category.as_deref();
        Some(
        wanted
            .into_iter()
            .filter(|channel| match self.policy.decide(&prefs, category, *channel) {
                Ok(()) => true,
                Err(suppressed) => {
                    metrics::counter!("herald_policy_suppressed_total", "channel" => channel.as_str())
                        .increment(1);
                    tracing::debug!(seq, id = %stored.id, channel = channel.as_str(), rule = %suppressed.rule, "suppressed by policy");
                    false
                }
            })
            .collect(),
    )
    }
}
