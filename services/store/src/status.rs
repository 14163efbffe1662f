//! What happened to each job: delivery status per notification (for
//! `GET /v1/notifications/{id}`) and sent markers (for exactly-once sends).
//!
//! Status is one JSON document per notification in the `herald_status` bucket, changed with
//! compare-and-set so the router and several workers can write it concurrently. Sent
//! markers live in `herald_sent`, one key per job: a worker writes it after the provider
//! accepted and before acking, and checks it before sending a redelivered job.
//!
//! A worker records a successful send once: the sent marker. It carries what the status
//! document would have said (provider, message id, time, and the job's user and `seq`),
//! and [`StatusStore::get`] merges the markers of a notification into its document when
//! it is read ([`markers`]). That saves a worker the compare-and-set of the document
//! (a read and a write) on every send, which bounded its throughput.

mod markers;

use async_nats::jetstream::kv;
use bytes::Bytes;
use herald_protocol::{Channel, ChannelJob, UserId};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;

/// Where a job stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum State {
    /// Enqueued, not yet sent.
    Queued,
    /// A provider failed; another attempt is scheduled.
    Retrying,
    /// A provider accepted it.
    Sent,
    /// Given up without a dead letter (the target was invalid and removed).
    Failed,
    /// Moved to the dead-letter queue.
    DeadLettered,
    /// Not sent on purpose (seen live, opted out, rate capped, no target, expired).
    Skipped,
    /// Waiting for the user's quiet hours, or an aggregation window, to end.
    Deferred,
    /// Folded into another notification of its aggregation group, which is sent instead.
    Folded,
    /// Waiting for the user's email digest, which lists it unless read by then.
    Digest,
}

/// One step in a job's history.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Step {
    /// State entered.
    pub state: State,
    /// When (RFC 3339).
    pub at: String,
    /// Why, for retries, failures and skips.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    /// Provider involved.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub provider: Option<String>,
}

/// The status of one (channel, target).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TargetStatus {
    /// Opaque target id (`none` when the user had no target on the channel).
    pub target: String,
    /// Current state.
    pub state: State,
    /// Time of the current state.
    pub updated_at: String,
    /// Provider that sent it, or last tried.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub provider: Option<String>,
    /// The provider's message id.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub provider_message_id: Option<String>,
    /// Failed attempts so far.
    pub retries: u32,
    /// Why (last failure or skip).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    /// Every state change, oldest first.
    pub history: Vec<Step>,
}

/// The delivery status of one notification.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DeliveryStatus {
    /// Notification id.
    pub id: String,
    /// Recipient.
    pub user_id: UserId,
    /// Inbox position.
    pub seq: u64,
    /// Per channel, per target.
    pub channels: BTreeMap<String, Vec<TargetStatus>>,
}

/// A change to record.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Update {
    /// New state.
    pub state: State,
    /// Why.
    pub reason: Option<String>,
    /// Provider.
    pub provider: Option<String>,
    /// Provider message id (on `Sent`).
    pub provider_message_id: Option<String>,
}

impl Update {
    /// A bare state change.
    pub fn state(state: State) -> Self {
        Self {
            state,
            reason: None,
            provider: None,
            provider_message_id: None,
        }
    }

    /// With a reason.
    pub fn because(mut self, reason: impl Into<String>) -> Self {
        self.reason = Some(reason.into());
        self
    }

    /// With a provider.
    pub fn by(mut self, provider: impl Into<String>) -> Self {
        self.provider = Some(provider.into());
        self
    }
}

/// The status store could not answer.
#[derive(Debug, thiserror::Error)]
#[error("delivery status store unavailable: {0}")]
pub struct StatusError(String);

fn err(e: impl std::fmt::Display) -> StatusError {
    StatusError(e.to_string())
}

/// The target of status recorded before the targets are known (held work, no target).
const NO_TARGET: &str = "none";

/// Most history steps kept per target (retries beyond it are counted, not listed).
const MAX_HISTORY: usize = 32;

/// Delivery status and sent markers.
#[derive(Clone)]
pub struct StatusStore {
    status: kv::Store,
    sent: kv::Store,
    /// For batched direct gets of the markers.
    client: async_nats::Client,
}

impl std::fmt::Debug for StatusStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("StatusStore")
    }
}

/// A sent marker: what a provider answered when it accepted a job.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SentMarker {
    /// Provider.
    pub provider: String,
    /// Its message id.
    pub provider_message_id: Option<String>,
    /// When (RFC 3339).
    pub at: String,
    /// The job's recipient (markers written before it was recorded lack it).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub user_id: Option<UserId>,
    /// The job's inbox position.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub seq: Option<u64>,
}

fn now() -> String {
    herald_protocol::notification::format_time(time::OffsetDateTime::now_utc())
}

impl StatusStore {
    /// Opens both buckets (provisioning creates them).
    ///
    /// # Errors
    /// [`StatusError`] when one is missing or NATS is unreachable.
    pub async fn open(js: &async_nats::jetstream::Context) -> Result<Self, StatusError> {
        use herald_protocol::streams::{SENT_BUCKET, STATUS_BUCKET};
        Ok(Self {
            status: js.get_key_value(STATUS_BUCKET).await.map_err(err)?,
            sent: js.get_key_value(SENT_BUCKET).await.map_err(err)?,
            client: js.client(),
        })
    }

    /// The status of notification `id`, if anything was recorded: its document, with the
    /// sends its sent markers record merged in.
    ///
    /// # Errors
    /// [`StatusError`] when NATS fails.
    pub async fn get(&self, id: &str) -> Result<Option<DeliveryStatus>, StatusError> {
        let key = herald_protocol::notification::kv_safe(id);
        let doc = self
            .status
            .get(&key)
            .await
            .map_err(err)?
            .and_then(|v| serde_json::from_slice(&v).ok());
        let sent = self.markers_of(&key).await?;
        Ok(markers::merge(id, doc, sent))
    }

    /// Records `update` for the job's (channel, target).
    ///
    /// # Errors
    /// [`StatusError`] when NATS fails.
    pub async fn record(&self, job: &ChannelJob, update: Update) -> Result<(), StatusError> {
        self.record_many(
            &job.id,
            &job.user_id,
            job.seq,
            &[(job.channel, job.target.clone())],
            update,
        )
        .await
    }

    /// Records `update` for several (channel, target) pairs of one notification at once.
    ///
    /// # Errors
    /// [`StatusError`] when NATS fails.
    pub async fn record_many(
        &self,
        id: &str,
        user: &UserId,
        seq: u64,
        targets: &[(Channel, String)],
        update: Update,
    ) -> Result<(), StatusError> {
        self.write(id, user, seq, targets, update, true).await
    }

    /// Records `update` only if the notification has a status document already: a job
    /// whose notification is gone (expired, or its user erased) must not bring one back.
    ///
    /// # Errors
    /// [`StatusError`] when NATS fails.
    pub async fn record_if_present(
        &self,
        job: &ChannelJob,
        update: Update,
    ) -> Result<(), StatusError> {
        let targets = [(job.channel, job.target.clone())];
        self.write(&job.id, &job.user_id, job.seq, &targets, update, false)
            .await
    }

    async fn write(
        &self,
        id: &str,
        user: &UserId,
        seq: u64,
        targets: &[(Channel, String)],
        update: Update,
        create: bool,
    ) -> Result<(), StatusError> {
        let key = herald_protocol::notification::kv_safe(id);
        loop {
            let entry = self.status.entry(&key).await.map_err(err)?;
            let (mut doc, revision) = match entry {
                Some(e) if e.operation == kv::Operation::Put => (
                    serde_json::from_slice::<DeliveryStatus>(&e.value).ok(),
                    e.revision,
                ),
                Some(e) => (None, e.revision),
                None => (None, 0),
            };
            if doc.is_none() && !create {
                return Ok(());
            }
            let doc = doc.get_or_insert_with(|| DeliveryStatus {
                id: id.to_string(),
                user_id: user.clone(),
                seq,
                channels: BTreeMap::new(),
            });
            let at = now();
            for (channel, target) in targets {
                let list = doc
                    .channels
                    .entry(channel.as_str().to_string())
                    .or_default();
                let (idx, fresh) = match list.iter().position(|t| t.target == *target) {
                    Some(i) => (i, false),
                    None => {
                        // Held work (quiet hours, an aggregation window) was recorded
                        // before its targets were known: each real target inherits
                        // that history, and the placeholder goes once one exists.
                        let held = list
                            .iter()
                            .find(|t| t.target == NO_TARGET && t.state == State::Deferred)
                            .filter(|_| target != NO_TARGET)
                            .map(|t| t.history.clone())
                            .unwrap_or_default();
                        list.push(TargetStatus {
                            target: target.clone(),
                            state: update.state,
                            updated_at: at.clone(),
                            provider: None,
                            provider_message_id: None,
                            retries: 0,
                            reason: None,
                            history: held,
                        });
                        (list.len() - 1, true)
                    }
                };
                let t = &mut list[idx];
                // A late "queued" (a replayed router) never moves a job back.
                if update.state == State::Queued && !fresh && !t.history.is_empty() {
                    continue;
                }
                // Recorded twice (a redelivery after a lost ack): once is the truth.
                if update.state == State::Sent && t.state == State::Sent {
                    continue;
                }
                t.state = update.state;
                t.updated_at = at.clone();
                if update.provider.is_some() {
                    t.provider = update.provider.clone();
                }
                if update.provider_message_id.is_some() {
                    t.provider_message_id = update.provider_message_id.clone();
                }
                if update.state == State::Retrying {
                    t.retries += 1;
                }
                if update.reason.is_some() {
                    t.reason = update.reason.clone();
                }
                if t.history.len() < MAX_HISTORY {
                    t.history.push(Step {
                        state: update.state,
                        at: at.clone(),
                        reason: update.reason.clone(),
                        provider: update.provider.clone(),
                    });
                }
            }
            for list in doc.channels.values_mut() {
                if list.iter().any(|t| t.target != NO_TARGET) {
                    list.retain(|t| !(t.target == NO_TARGET && t.state == State::Deferred));
                }
            }
            let value = Bytes::from(serde_json::to_vec(&doc).map_err(err)?);
            if revision == 0 {
                match self.status.create(&key, value).await {
                    Ok(_) => return Ok(()),
                    Err(e) if e.kind() == kv::CreateErrorKind::AlreadyExists => continue,
                    Err(e) => return Err(err(e)),
                }
            }
            match self.status.update(&key, value, revision).await {
                Ok(_) => return Ok(()),
                Err(e) if e.kind() == kv::UpdateErrorKind::WrongLastRevision => continue,
                Err(e) => return Err(err(e)),
            }
        }
    }

    /// The sent marker of a job, if a provider accepted it before.
    ///
    /// # Errors
    /// [`StatusError`] when NATS fails.
    pub async fn sent_marker(&self, job: &ChannelJob) -> Result<Option<SentMarker>, StatusError> {
        Ok(self
            .sent
            .get(job.key())
            .await
            .map_err(err)?
            .and_then(|v| serde_json::from_slice(&v).ok()))
    }

    /// Records that a provider accepted the job (before it is acked).
    ///
    /// # Errors
    /// [`StatusError`] when NATS fails.
    pub async fn mark_sent(
        &self,
        job: &ChannelJob,
        provider: &str,
        provider_message_id: Option<String>,
    ) -> Result<(), StatusError> {
        let marker = SentMarker {
            provider: provider.to_string(),
            provider_message_id,
            at: now(),
            user_id: Some(job.user_id.clone()),
            seq: Some(job.seq),
        };
        let value = Bytes::from(serde_json::to_vec(&marker).map_err(err)?);
        self.sent.put(job.key(), value).await.map_err(err)?;
        Ok(())
    }

    /// GDPR erase: removes the status documents of `user`'s notifications `ids`, and the
    /// sent markers of every target they list. A document of another user under one of
    /// the ids is left alone. Returns how many documents were removed.
    ///
    /// # Errors
    /// [`StatusError`] when NATS fails.
    pub async fn erase(&self, user: &UserId, ids: &[String]) -> Result<u64, StatusError> {
        use futures::StreamExt as _;
        let removed = futures::stream::iter(ids.iter().cloned())
            .map(|id| async move { self.erase_one(user, &id).await })
            .buffer_unordered(32)
            .collect::<Vec<_>>()
            .await;
        let mut count = 0;
        for r in removed {
            count += u64::from(r?);
        }
        Ok(count)
    }

    async fn erase_one(&self, user: &UserId, id: &str) -> Result<bool, StatusError> {
        let key = herald_protocol::notification::kv_safe(id);
        let Some(doc) = self.get(id).await? else {
            return Ok(false);
        };
        if doc.user_id != *user {
            return Ok(false);
        }
        for (channel, list) in &doc.channels {
            for t in list {
                self.sent
                    .purge(format!("{key}.{channel}.{}", t.target))
                    .await
                    .map_err(err)?;
            }
        }
        self.status.purge(&key).await.map_err(err)?;
        Ok(true)
    }

    /// Forgets a sent marker (a dead letter retried by an operator is sent again).
    ///
    /// # Errors
    /// [`StatusError`] when NATS fails.
    pub async fn clear_sent(&self, job: &ChannelJob) -> Result<(), StatusError> {
        self.sent.purge(job.key()).await.map_err(err)?;
        Ok(())
    }
}
