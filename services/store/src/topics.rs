//! Topic subscriptions in the SUBS stream; the FANOUT queue and fan-out progress in KV.
//!
//! Two indexes, both in SUBS (`max_msgs_per_subject = 1`):
//! - `subs.<topic>.<user>`, one message per subscription: what a fan-out reads, in stream
//!   order, resuming from a sequence. Reading one topic's subscribers never scans another
//!   topic's (direct gets filter by subject), and a count is one direct get
//!   (`Nats-Num-Pending`).
//! - `usubs.<user>`, one message per user holding the set of their subscriptions: what a
//!   session opens with and what every inbox read merges. It is one *literal* subject on
//!   purpose. A wildcard read (`usubs.<user>.*`) over a stream holding a million
//!   subscriptions kept nats-server busy enough that 10,000 sessions opening at once all
//!   timed out (BENCHMARKS.md, "Topic fan-out"); a last-message get of one subject is
//!   answered from the subject index at any size.
//!
//! Writes to the set are compare-and-set (`Nats-Expected-Last-Subject-Sequence`). A bulk
//! subscribe of users who follow nothing yet (the common case: a million new followers)
//! writes each set blind, expecting none; only those who already have a set are read,
//! changed and written back, retrying on a concurrent change.

use crate::connect::Nats;
use crate::direct::{self, DirectGetError};
use async_nats::jetstream::context::{PublishAckFuture, PublishErrorKind};
use async_nats::jetstream::kv;
use async_nats::jetstream::message::PublishMessage;
use futures::StreamExt as _;
use herald_protocol::streams::{FANOUT, FANOUT_BUCKET, INBOX, SUBS};
use herald_protocol::topic::{FanoutJob, FanoutProgress};
use herald_protocol::{Priority, Subjects, TopicId, UserId};
use serde::{Deserialize, Serialize};

/// Largest page of subscriptions read at once.
pub const PAGE: usize = 256;

/// Most topics one user may follow (their set is one message: SUBS allows 256 KiB).
pub const MAX_TOPICS_PER_USER: usize = 1000;

/// Most subscription writes of one request awaiting their JetStream ack at a time.
const ACK_WINDOW: usize = 1024;

/// Users whose existing set is updated at once during a bulk subscribe.
const SET_UPDATES_IN_FLIGHT: usize = 32;

/// Attempts at a compare-and-set of one user's set before giving up.
const SET_ATTEMPTS: usize = 16;

/// A write that must find its subject empty: refused (`WrongLastSequence`) when it is not.
fn first_write(payload: bytes::Bytes) -> PublishMessage {
    PublishMessage::build()
        .payload(payload)
        .expected_last_subject_sequence(0)
}

/// Whether a write expecting an empty subject went through (`false`: the subject was not
/// empty), or why it failed.
async fn written(ack: PublishAckFuture) -> Result<bool, TopicsError> {
    match ack.await {
        Ok(_) => Ok(true),
        Err(e) if e.kind() == PublishErrorKind::WrongLastSequence => Ok(false),
        Err(e) => Err(unavailable(e)),
    }
}

/// One followed topic in a user's set.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
struct Followed {
    topic: TopicId,
    by: String,
    since: u64,
}

/// A user's set of subscriptions, as stored on `usubs.<user>`.
#[derive(Debug, Default, Serialize, Deserialize)]
struct UserSet {
    topics: Vec<Followed>,
}

/// A stored subscription.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Subscription {
    /// The topic.
    pub topic: TopicId,
    /// The subscriber.
    pub user_id: UserId,
    /// Who subscribed them: a producer name, or `self`.
    pub by: String,
    /// The last INBOX sequence when they subscribed: of a big topic's publishes (stored
    /// once, in INBOX) they see those after it.
    #[serde(default)]
    pub since: u64,
}

/// Why a subscription operation failed.
#[derive(Debug, thiserror::Error)]
pub enum TopicsError {
    /// NATS did not confirm.
    #[error("NATS is unavailable")]
    Unavailable(#[source] Box<dyn std::error::Error + Send + Sync>),
    /// A read failed.
    #[error("subscription read failed")]
    Read(#[from] DirectGetError),
    /// The user already follows the most topics allowed.
    #[error(
        "user {0} already follows {MAX_TOPICS_PER_USER} topics; unsubscribe them from one first"
    )]
    TooMany(UserId),
    /// The user's set kept changing under this write.
    #[error(
        "the subscriptions of user {0} changed {SET_ATTEMPTS} times during this write; try again"
    )]
    Contended(UserId),
}

fn unavailable(e: impl std::error::Error + Send + Sync + 'static) -> TopicsError {
    TopicsError::Unavailable(Box::new(e))
}

/// Subscriptions of every topic.
#[derive(Clone, Debug)]
pub struct Subscriptions {
    nats: Nats,
    subjects: Subjects,
}

impl Subscriptions {
    /// Subscriptions over these connections.
    pub fn new(nats: Nats, subjects: Subjects) -> Self {
        Self { nats, subjects }
    }

    /// Subscribes every user in `users` to `topic` (pipelined); returns how many.
    /// Subscribing someone again changes nothing (in particular not `since`).
    ///
    /// # Errors
    /// [`TopicsError::Unavailable`] unless JetStream confirmed every write;
    /// [`TopicsError::TooMany`] for a user who follows the most topics allowed (every
    /// other user is subscribed: the request can be repeated without that user).
    pub async fn subscribe(
        &self,
        topic: &TopicId,
        users: &[UserId],
        by: &str,
    ) -> Result<usize, TopicsError> {
        let since = self.inbox_last_seq().await?;
        let followed = Followed {
            topic: topic.clone(),
            by: by.to_owned(),
            since,
        };
        let new_set: bytes::Bytes = serde_json::to_vec(&UserSet {
            topics: vec![followed.clone()],
        })
        .map_err(unavailable)?
        .into();
        // Pipelined, but never more than a window of unconfirmed writes: the client
        // allows a fixed number of acks in flight (shared by every request of the
        // process), and a request that queued more than that before awaiting any would
        // wait for a permit only its own acks could free — forever.
        let mut acks = std::collections::VecDeque::with_capacity(ACK_WINDOW);
        // Users who follow something already: their set is read and changed below.
        let mut have_sets = Vec::new();
        for (i, user) in users.iter().enumerate() {
            let sub = Subscription {
                topic: topic.clone(),
                user_id: user.clone(),
                by: by.to_owned(),
                since,
            };
            let payload: bytes::Bytes = serde_json::to_vec(&sub).map_err(unavailable)?.into();
            let writes = [
                (None, self.subjects.subscription(topic, user), payload),
                (Some(i), self.subjects.topics_of(user), new_set.clone()),
            ];
            for (set_of, subject, payload) in writes {
                if acks.len() >= ACK_WINDOW
                    && let Some((set_of, ack)) = acks.pop_front()
                    && !written(ack).await?
                {
                    have_sets.extend(set_of);
                }
                let ack = self
                    .nats
                    .js
                    .send_publish(subject, first_write(payload))
                    .await
                    .map_err(unavailable)?;
                acks.push_back((set_of, ack));
            }
        }
        for (set_of, ack) in acks {
            if !written(ack).await? {
                have_sets.extend(set_of);
            }
        }
        let results = futures::stream::iter(have_sets)
            .map(|i| {
                let (user, followed) = (&users[i], &followed);
                async move {
                    match self
                        .change_set(user, move |set| add(set, followed, user))
                        .await
                    {
                        // Over the cap: not following after all, so the record on the
                        // topic written above goes too (the fan-out reads those).
                        Err(TopicsError::TooMany(user)) => {
                            self.purge(self.subjects.subscription(topic, &user)).await?;
                            Err(TopicsError::TooMany(user))
                        }
                        other => other,
                    }
                }
            })
            .buffer_unordered(SET_UPDATES_IN_FLIGHT)
            .collect::<Vec<Result<bool, TopicsError>>>()
            .await;
        // Every user's set is updated (or their record purged) before an error is
        // answered: stopping at the first refusal would drop the updates still in flight
        // and leave those users with a record on the topic (the fan-out reads those) but
        // not the topic in their set (their view and gateway read that).
        self.announce(users).await;
        let mut refused = None;
        for result in results {
            match result {
                Ok(_) => {}
                Err(e @ TopicsError::TooMany(_)) => {
                    refused.get_or_insert(e);
                }
                Err(e) => return Err(e),
            }
        }
        match refused {
            Some(e) => Err(e),
            None => Ok(users.len()),
        }
    }

    /// The INBOX stream's last sequence (one stream info request).
    async fn inbox_last_seq(&self) -> Result<u64, TopicsError> {
        let stream = self.nats.js.get_stream(INBOX).await.map_err(unavailable)?;
        Ok(stream.cached_info().state.last_sequence)
    }

    /// Tells the gateways holding these users that their topics changed (a core message
    /// on each user's live subject; nobody listening costs the server nothing).
    async fn announce(&self, users: &[UserId]) {
        for user in users {
            let mut headers = async_nats::HeaderMap::new();
            headers.insert(herald_protocol::topic::TOPICS_HEADER, "1");
            if let Err(e) = self
                .nats
                .publish
                .publish_with_headers(self.subjects.live(user), headers, bytes::Bytes::new())
                .await
            {
                // Gateways holding these users follow the change at their next connect.
                tracing::warn!(error = %e, "announcing a topic change to gateways failed");
                return;
            }
        }
    }

    /// Unsubscribes `user` from `topic`; returns whether they were subscribed.
    ///
    /// # Errors
    /// [`TopicsError::Unavailable`] when NATS fails.
    pub async fn unsubscribe(&self, topic: &TopicId, user: &UserId) -> Result<bool, TopicsError> {
        let by_topic = self.purge(self.subjects.subscription(topic, user)).await?;
        let in_set = self
            .change_set(user, |set| {
                let before = set.topics.len();
                set.topics.retain(|f| &f.topic != topic);
                Ok(set.topics.len() != before)
            })
            .await?;
        self.announce(std::slice::from_ref(user)).await;
        Ok(by_topic > 0 || in_set)
    }

    /// Unsubscribes `user` from every topic and removes their set; returns how many
    /// topics they followed.
    ///
    /// # Errors
    /// [`TopicsError`] when NATS fails.
    pub async fn erase(&self, user: &UserId) -> Result<usize, TopicsError> {
        let topics = self.topics_of(user).await?;
        for topic in &topics {
            self.unsubscribe(topic, user).await?;
        }
        self.purge(self.subjects.topics_of(user)).await?;
        Ok(topics.len())
    }

    /// Removes every record of the SUBS stream on `subject`; returns how many.
    async fn purge(&self, subject: String) -> Result<u64, TopicsError> {
        Ok(self
            .nats
            .js
            .get_stream_no_info(SUBS)
            .await
            .map_err(unavailable)?
            .purge()
            .filter(subject)
            .await
            .map_err(unavailable)?
            .purged)
    }

    /// Reads `user`'s set, applies `change` and writes it back unless `change` answered
    /// `false`, retrying from the read when the set changed in between.
    async fn change_set(
        &self,
        user: &UserId,
        change: impl Fn(&mut UserSet) -> Result<bool, TopicsError>,
    ) -> Result<bool, TopicsError> {
        for attempt in 0..SET_ATTEMPTS {
            let (seq, mut set) = self.read_set(user).await?;
            if !change(&mut set)? {
                return Ok(false);
            }
            let payload = serde_json::to_vec(&set).map_err(unavailable)?;
            let publish = PublishMessage::build()
                .payload(payload.into())
                .expected_last_subject_sequence(seq);
            let ack = self
                .nats
                .js
                .send_publish(self.subjects.topics_of(user), publish)
                .await
                .map_err(unavailable)?;
            if written(ack).await? {
                return Ok(true);
            }
            // Someone else wrote the set first (or a replica answered the read from
            // behind): read it again after a jittered pause that grows.
            let cap_ms = 2u64 << attempt.min(6);
            tokio::time::sleep(std::time::Duration::from_millis(rand::random_range(
                0..=cap_ms,
            )))
            .await;
        }
        Err(TopicsError::Contended(user.clone()))
    }

    /// `user`'s set and the sequence it is stored at (0 and an empty set: none).
    async fn read_set(&self, user: &UserId) -> Result<(u64, UserSet), TopicsError> {
        let msg = direct::last(
            &self.nats.consume,
            SUBS,
            &self.subjects.topics_of(user),
            None,
        )
        .await?;
        Ok(match msg {
            None => (0, UserSet::default()),
            // An unreadable set is replaced on the next write rather than blocking it.
            Some(m) => (
                m.seq,
                serde_json::from_slice(&m.payload).unwrap_or_default(),
            ),
        })
    }

    /// How many users are subscribed to `topic`.
    ///
    /// # Errors
    /// [`TopicsError::Read`] when NATS cannot answer.
    pub async fn count(&self, topic: &TopicId) -> Result<u64, TopicsError> {
        let first = direct::next_batch(
            &self.nats.consume,
            SUBS,
            &self.subjects.subscribers_of(topic),
            1,
            1,
        )
        .await?;
        Ok(first.first().map_or(0, |m| 1 + m.pending.unwrap_or(0)))
    }

    /// The subscriptions of `topic` stored at sequence `from` or later, in stream order,
    /// a page of up to [`PAGE`] at a time, until the last one stored.
    ///
    /// Read through an ordered consumer, not paged direct gets: a batched direct get
    /// makes the server count what is pending after it over every subject its filter
    /// matches, which at a million subscribers was 76% of nats-server's CPU during a
    /// fan-out (BENCHMARKS.md, "Topic fan-out"). A consumer counts once, when created.
    ///
    /// # Errors
    /// [`TopicsError::Unavailable`] when the consumer cannot be created.
    pub async fn pages(&self, topic: &TopicId, from: u64) -> Result<SubscriberPages, TopicsError> {
        use async_nats::jetstream::consumer::{DeliverPolicy, pull::OrderedConfig};
        let filter = self.subjects.subscribers_of(topic);
        let stream = self
            .nats
            .js_consume
            .get_stream_no_info(SUBS)
            .await
            .map_err(unavailable)?;
        let mut consumer = stream
            .create_consumer(OrderedConfig {
                filter_subject: filter.clone(),
                deliver_policy: DeliverPolicy::ByStartSequence {
                    start_sequence: from.max(1),
                },
                ..Default::default()
            })
            .await
            .map_err(unavailable)?;
        let empty = consumer.info().await.map_err(unavailable)?.num_pending == 0;
        Ok(SubscriberPages {
            messages: if empty {
                None
            } else {
                Some(consumer.messages().await.map_err(unavailable)?)
            },
            client: self.nats.consume.clone(),
            filter,
            last: from.saturating_sub(1),
        })
    }

    /// The topics `user` is subscribed to.
    ///
    /// # Errors
    /// [`TopicsError::Read`] when NATS cannot answer.
    pub async fn topics_of(&self, user: &UserId) -> Result<Vec<TopicId>, TopicsError> {
        Ok(self
            .subscriptions_of(user)
            .await?
            .into_iter()
            .map(|s| s.topic)
            .collect())
    }

    /// The subscriptions of `user`, with when each began: one direct get of their set.
    ///
    /// # Errors
    /// [`TopicsError::Read`] when NATS cannot answer.
    pub async fn subscriptions_of(&self, user: &UserId) -> Result<Vec<Subscription>, TopicsError> {
        let (_, set) = self.read_set(user).await?;
        Ok(set
            .topics
            .into_iter()
            .map(|f| Subscription {
                topic: f.topic,
                user_id: user.clone(),
                by: f.by,
                since: f.since,
            })
            .collect())
    }
}

/// A topic's subscriptions a page at a time: see [`Subscriptions::pages`].
pub struct SubscriberPages {
    /// `None` once the last one stored was read.
    messages: Option<async_nats::jetstream::consumer::pull::Ordered>,
    client: async_nats::Client,
    filter: String,
    /// The sequence of the last one read.
    last: u64,
}

impl std::fmt::Debug for SubscriberPages {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SubscriberPages")
            .field("filter", &self.filter)
            .field("last", &self.last)
            .finish_non_exhaustive()
    }
}

/// How long the consumer may stay silent before asking the stream whether anything is
/// left (the last subscriptions it counted may have been unsubscribed since).
const PAGE_IDLE: std::time::Duration = std::time::Duration::from_secs(2);

impl SubscriberPages {
    /// The next page, with each subscription's sequence; `None` after the last.
    ///
    /// # Errors
    /// [`TopicsError`] when NATS fails.
    pub async fn next_page(&mut self) -> Result<Option<Vec<(u64, Subscription)>>, TopicsError> {
        let mut page = Vec::new();
        while page.len() < PAGE {
            let Some(messages) = self.messages.as_mut() else {
                break;
            };
            match tokio::time::timeout(PAGE_IDLE, messages.next()).await {
                Ok(Some(Ok(msg))) => {
                    let info = msg.info().map_err(TopicsError::Unavailable)?;
                    let (seq, pending) = (info.stream_sequence, info.pending);
                    self.last = seq;
                    if let Ok(sub) = serde_json::from_slice(&msg.payload) {
                        page.push((seq, sub));
                    }
                    if pending == 0 {
                        self.messages = None;
                    }
                }
                Ok(Some(Err(e))) => return Err(unavailable(e)),
                Ok(None) => {
                    return Err(TopicsError::Unavailable(
                        "the subscription consumer ended".into(),
                    ));
                }
                Err(_) => {
                    // Silent: done if nothing is stored after the last one read.
                    let next =
                        direct::next(&self.client, SUBS, &self.filter, self.last + 1).await?;
                    if next.is_none() {
                        self.messages = None;
                    }
                }
            }
        }
        Ok((!page.is_empty()).then_some(page))
    }
}

/// Adds `followed` to `user`'s `set` unless it is there (then `since` stays: moving it
/// would hide big-topic publishes the user has already seen).
fn add(set: &mut UserSet, followed: &Followed, user: &UserId) -> Result<bool, TopicsError> {
    if set.topics.iter().any(|f| f.topic == followed.topic) {
        return Ok(false);
    }
    if set.topics.len() >= MAX_TOPICS_PER_USER {
        return Err(TopicsError::TooMany(user.clone()));
    }
    set.topics.push(followed.clone());
    Ok(true)
}

/// Header on a FANOUT job saying which path its publish takes: [`PATH_TOPIC`] for a big
/// topic's (stored once in INBOX; the job only hands out channel work), absent for fan-out
/// on write.
pub const PATH_HEADER: &str = "Herald-Fanout-Path";

/// [`PATH_HEADER`]'s value for the big-topic path.
pub const PATH_TOPIC: &str = "topic";

/// The FANOUT subject of the jobs of priority lane `lane`: `<prefix>.fanout.<lane>`. Used
/// once the FANOUT stream captures it ([`fanout_lanes`]); until then every job goes on
/// [`Subjects::fanout`].
pub fn fanout_lane(subjects: &Subjects, lane: Priority) -> String {
    format!("{}.{}", subjects.fanout(), lane.as_str())
}

/// The durable consumer of one lane of the FANOUT queue (filtered to
/// [`fanout_lane`]), beside [`herald_protocol::streams::FANOUT_CONSUMER`], which then
/// takes the jobs of [`Subjects::fanout`] only.
pub fn fanout_lane_consumer(lane: Priority) -> String {
    format!(
        "{}-{}",
        herald_protocol::streams::FANOUT_CONSUMER,
        lane.as_str()
    )
}

/// The configuration of one lane's consumer (what provisioning creates; a fan-out worker
/// creates it too when the stream has lane subjects and the consumer is missing): as the
/// one consumer — a job is worked on by one process at a time and, if it dies, comes back
/// after `ack_wait` and resumes from its recorded cursor — filtered to the lane.
pub fn fanout_lane_consumer_config(
    subjects: &Subjects,
    lane: Priority,
) -> async_nats::jetstream::consumer::pull::Config {
    async_nats::jetstream::consumer::pull::Config {
        durable_name: Some(fanout_lane_consumer(lane)),
        filter_subject: fanout_lane(subjects, lane),
        ack_policy: async_nats::jetstream::consumer::AckPolicy::Explicit,
        ack_wait: std::time::Duration::from_secs(30),
        max_ack_pending: 64,
        ..Default::default()
    }
}

/// Whether the FANOUT stream captures the subject of every lane ([`fanout_lane`]): one
/// stream info request.
///
/// # Errors
/// [`TopicsError::Unavailable`] when NATS cannot answer.
pub async fn fanout_lanes(
    js: &async_nats::jetstream::Context,
    subjects: &Subjects,
) -> Result<bool, TopicsError> {
    let stream = js.get_stream(FANOUT).await.map_err(unavailable)?;
    let patterns = &stream.cached_info().config.subjects;
    Ok(Priority::ALL
        .iter()
        .all(|lane| captures(patterns, &fanout_lane(subjects, *lane))))
}

/// Whether one of the subject `patterns` (NATS wildcards `*` and `>`) matches `subject`.
fn captures(patterns: &[String], subject: &str) -> bool {
    patterns.iter().any(|pattern| {
        let mut tokens = subject.split('.');
        for want in pattern.split('.') {
            match (want, tokens.next()) {
                (">", Some(_)) => return true,
                ("*", Some(_)) => {}
                (want, Some(token)) if want == token => {}
                _ => return false,
            }
        }
        tokens.next().is_none()
    })
}

/// A job JetStream has made durable in the FANOUT queue.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Enqueued {
    /// Its FANOUT stream sequence (the first job's, for a repeat).
    pub seq: u64,
    /// True when a job with this id was already queued within the dedup window.
    pub duplicate: bool,
}

/// The [`FanoutProgress::state`] of a publish accepted and not yet started by a worker.
pub const QUEUED: &str = "queued";

/// One fan-out's record: its progress and what it works on.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct FanoutRun {
    /// What the API shows.
    #[serde(flatten)]
    pub progress: FanoutProgress,
    /// The topic published to (`None` in records written before topics were recorded).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub topic: Option<TopicId>,
    /// Big-topic path: the INBOX sequence of the stored publish, once known.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stored_seq: Option<u64>,
}

/// A keyed topic publish as the API accepted it, recorded under its idempotency key
/// before anything else is written: a retry with the key gets the same id, takes the same
/// path and gets the same answer, even when the topic has crossed the big-topic threshold
/// in between. Once the record is older than the dedup window the key names a new
/// publish, with a new id.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PublishRecord {
    /// The publish id.
    pub id: String,
    /// The topic published to.
    pub topic: TopicId,
    /// The producer that published.
    pub producer: String,
    /// `topic` (stored once) or `write` (a copy per subscriber).
    pub path: String,
    /// Subscribers when the path was chosen.
    pub subscribers: u64,
    /// When it was recorded, Unix seconds.
    pub at: i64,
}

/// The INBOX sequence of big-topic publish `id` if it is stored on `subject` (its topic's
/// lane subject) at or after `since`.
///
/// Read backwards from the subject's newest message, one direct get of a literal subject
/// per step, until a message stored before `since`: a topic's publishes are few, so this
/// is mostly one read. By time rather than by the INBOX dedup window, because a fan-out
/// job may wait in its queue for longer than that window.
///
/// # Errors
/// [`TopicsError::Read`] when NATS cannot answer.
pub async fn find_publish(
    nats: &Nats,
    subject: &str,
    id: &str,
    since: time::OffsetDateTime,
) -> Result<Option<u64>, TopicsError> {
    #[derive(Deserialize)]
    struct Id<'a> {
        #[serde(borrow)]
        id: std::borrow::Cow<'a, str>,
    }
    let mut up_to = None;
    while let Some(m) = direct::last(&nats.consume, INBOX, subject, up_to).await? {
        if serde_json::from_slice::<Id>(&m.payload).is_ok_and(|s| s.id == id) {
            return Ok(Some(m.seq));
        }
        let stored = m.headers.get("Nats-Time-Stamp").and_then(|t| {
            time::OffsetDateTime::parse(t.as_str(), &time::format_description::well_known::Rfc3339)
                .ok()
        });
        // A message without a readable time stops the walk: never a walk to the start.
        if stored.is_none_or(|t| t < since) || m.seq <= 1 {
            return Ok(None);
        }
        up_to = Some(m.seq - 1);
    }
    Ok(None)
}

/// The KV key of the [`PublishRecord`] of idempotency key `key`, beside the progress of
/// each publish (keyed by the bare publish id).
fn record_key(key: &str) -> String {
    format!("k.{key}")
}

/// Fan-out progress, per publish id, and the FANOUT queue the API feeds.
#[derive(Clone)]
pub struct FanoutLog {
    store: kv::Store,
    js: async_nats::jetstream::Context,
}

impl std::fmt::Debug for FanoutLog {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("FanoutLog")
    }
}

impl FanoutLog {
    /// Opens the bucket (provisioning creates it).
    ///
    /// # Errors
    /// [`TopicsError::Unavailable`] when it is missing or NATS is unreachable.
    pub async fn open(js: &async_nats::jetstream::Context) -> Result<Self, TopicsError> {
        Ok(Self {
            store: js.get_key_value(FANOUT_BUCKET).await.map_err(unavailable)?,
            js: js.clone(),
        })
    }

    /// The progress of publish `id`, if it started.
    ///
    /// # Errors
    /// [`TopicsError::Unavailable`] when NATS cannot answer.
    pub async fn get(&self, id: &str) -> Result<Option<FanoutProgress>, TopicsError> {
        Ok(self.run(id).await?.map(|r| r.progress))
    }

    /// Records progress.
    ///
    /// # Errors
    /// [`TopicsError::Unavailable`] when NATS does not confirm.
    pub async fn put(&self, id: &str, progress: &FanoutProgress) -> Result<(), TopicsError> {
        self.put_run(
            id,
            &FanoutRun {
                progress: progress.clone(),
                ..FanoutRun::default()
            },
        )
        .await
    }

    /// The record of publish `id`'s fan-out, if it started.
    ///
    /// # Errors
    /// [`TopicsError::Unavailable`] when NATS cannot answer.
    pub async fn run(&self, id: &str) -> Result<Option<FanoutRun>, TopicsError> {
        let value = self.store.get(id).await.map_err(unavailable)?;
        Ok(value.and_then(|v| serde_json::from_slice(&v).ok()))
    }

    /// Records `run` for publish `id` unless a record exists (left as it is).
    ///
    /// # Errors
    /// [`TopicsError::Unavailable`] when NATS does not confirm.
    pub async fn create_run(&self, id: &str, run: &FanoutRun) -> Result<(), TopicsError> {
        let bytes = serde_json::to_vec(run).map_err(unavailable)?;
        match self.store.create(id, bytes.into()).await {
            Ok(_) => Ok(()),
            Err(e) if e.kind() == kv::CreateErrorKind::AlreadyExists => Ok(()),
            Err(e) => Err(unavailable(e)),
        }
    }

    /// Records a fan-out's progress and what it works on.
    ///
    /// # Errors
    /// [`TopicsError::Unavailable`] when NATS does not confirm.
    pub async fn put_run(&self, id: &str, run: &FanoutRun) -> Result<(), TopicsError> {
        let bytes = serde_json::to_vec(run).map_err(unavailable)?;
        self.store
            .put(id, bytes.into())
            .await
            .map_err(unavailable)?;
        Ok(())
    }

    /// The record of the publish with idempotency key `key` (as derived by the API) and
    /// its revision, if there is one.
    ///
    /// # Errors
    /// [`TopicsError::Unavailable`] when NATS cannot answer.
    pub async fn record(&self, key: &str) -> Result<Option<(PublishRecord, u64)>, TopicsError> {
        let entry = self
            .store
            .entry(record_key(key))
            .await
            .map_err(unavailable)?;
        Ok(entry
            .filter(|e| e.operation == kv::Operation::Put)
            .and_then(|e| Some((serde_json::from_slice(&e.value).ok()?, e.revision))))
    }

    /// Records `record` under idempotency key `key`: a new record when `previous` is
    /// `None`, else in place of the record at that revision. `false` when another request
    /// with the same key wrote first (read it again).
    ///
    /// # Errors
    /// [`TopicsError::Unavailable`] when NATS does not confirm.
    pub async fn put_record(
        &self,
        key: &str,
        record: &PublishRecord,
        previous: Option<u64>,
    ) -> Result<bool, TopicsError> {
        let bytes: bytes::Bytes = serde_json::to_vec(record).map_err(unavailable)?.into();
        let key = record_key(key);
        let written = match previous {
            None => self
                .store
                .create(&key, bytes)
                .await
                .map(|_| ())
                .map_err(|e| match e.kind() {
                    kv::CreateErrorKind::AlreadyExists => None,
                    _ => Some(unavailable(e)),
                }),
            Some(revision) => self
                .store
                .update(&key, bytes, revision)
                .await
                .map(|_| ())
                .map_err(|e| match e.kind() {
                    kv::UpdateErrorKind::WrongLastRevision => None,
                    _ => Some(unavailable(e)),
                }),
        };
        match written {
            Ok(()) => Ok(true),
            Err(None) => Ok(false),
            Err(Some(e)) => Err(e),
        }
    }

    /// How long the FANOUT queue remembers a job's id: an idempotency key is the same
    /// publish for that long (one stream info request).
    ///
    /// # Errors
    /// [`TopicsError::Unavailable`] when NATS cannot answer.
    pub async fn dedup_window(&self) -> Result<std::time::Duration, TopicsError> {
        let stream = self.js.get_stream(FANOUT).await.map_err(unavailable)?;
        Ok(stream.cached_info().config.duplicate_window)
    }

    /// Queues `job` for the fan-out workers, deduplicated by its id, and waits until
    /// JetStream has it: on its priority lane's subject when the FANOUT stream has lanes
    /// (so an urgent publish never waits behind a marketing blast), else on the one
    /// subject. `big`: its publish takes the big-topic path ([`PATH_HEADER`]).
    ///
    /// # Errors
    /// [`TopicsError::Unavailable`] unless JetStream confirmed the write.
    pub async fn enqueue(
        &self,
        subjects: &Subjects,
        job: &FanoutJob,
        big: bool,
    ) -> Result<Enqueued, TopicsError> {
        // Disconnected, a publish would wait in the client's buffer for its ack to time
        // out: fail at once instead.
        if self.js.client().connection_state() != async_nats::connection::State::Connected {
            return Err(TopicsError::Unavailable("not connected to NATS".into()));
        }
        let payload = serde_json::to_vec(job).map_err(unavailable)?;
        let mut publish = PublishMessage::build()
            .payload(payload.into())
            .message_id(&job.id)
            .expected_stream(FANOUT);
        if big {
            publish = publish.header(PATH_HEADER, PATH_TOPIC);
        }
        // Read at every publish, not cached: a topic publish is rare, and jobs must move
        // to the lanes as soon as provisioning adds them.
        let subject = if fanout_lanes(&self.js, subjects).await? {
            fanout_lane(subjects, job.notification.priority)
        } else {
            subjects.fanout()
        };
        let ack = self
            .js
            .send_publish(subject, publish)
            .await
            .map_err(unavailable)?
            .await
            .map_err(unavailable)?;
        Ok(Enqueued {
            seq: ack.sequence,
            duplicate: ack.duplicate,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::captures;

    #[test]
    fn a_run_keeps_its_topic_beside_the_progress() {
        let run = super::FanoutRun {
            progress: herald_protocol::FanoutProgress {
                state: "done".into(),
                ..Default::default()
            },
            topic: Some(herald_protocol::TopicId::new("orders").expect("valid")),
            stored_seq: Some(7),
        };
        let json = serde_json::to_vec(&run).expect("encodes");
        let back: super::FanoutRun = serde_json::from_slice(&json).expect("decodes");
        assert_eq!(back, run, "{}", String::from_utf8_lossy(&json));
    }

    #[test]
    fn lane_subjects_are_captured_by_wildcards_and_literals() {
        let p = |v: &[&str]| v.iter().map(|s| (*s).to_owned()).collect::<Vec<_>>();
        assert!(!captures(&p(&["herald.fanout"]), "herald.fanout.high"));
        assert!(captures(
            &p(&["herald.fanout", "herald.fanout.*"]),
            "herald.fanout.high"
        ));
        assert!(captures(&p(&["herald.>"]), "herald.fanout.low"));
        assert!(captures(&p(&["herald.fanout.low"]), "herald.fanout.low"));
        assert!(!captures(&p(&["herald.fanout.*"]), "herald.fanout"));
        assert!(!captures(&p(&["herald.fanout.*"]), "herald.fanout.high.x"));
        assert!(!captures(&p(&["other.fanout.*"]), "herald.fanout.high"));
    }
}
