//! Topic subscriptions in the SUBS stream, and fan-out progress in KV.
//!
//! One message per subscription, on two subjects: `subs.<topic>.<user>` (what a fan-out
//! reads, in stream order, resuming from a sequence) and `usubs.<user>.<topic>` (a user's
//! topics). `max_msgs_per_subject = 1` makes a repeated subscribe idempotent; unsubscribing
//! purges both subjects, so nothing is left to skip. Reading a topic's subscribers never
//! scans another topic's: direct gets filter by subject, and a count is one direct get
//! (`Nats-Num-Pending`).

use crate::connect::Nats;
use crate::direct::{self, DirectGetError};
use async_nats::jetstream::context::PublishErrorKind;
use async_nats::jetstream::kv;
use async_nats::jetstream::message::PublishMessage;
use herald_protocol::streams::{FANOUT_BUCKET, INBOX, SUBS};
use herald_protocol::topic::FanoutProgress;
use herald_protocol::{Subjects, TopicId, UserId};
use serde::{Deserialize, Serialize};

/// Largest page of subscriptions read at once.
pub const PAGE: usize = 256;

/// Most subscription writes of one request awaiting their JetStream ack at a time.
const ACK_WINDOW: usize = 1024;

/// A subscription write's ack: confirmed, or already subscribed (the expected-sequence
/// check refused a second write, which is what keeps `since`).
fn confirmed(
    ack: Result<
        async_nats::jetstream::publish::PublishAck,
        async_nats::jetstream::context::PublishError,
    >,
) -> Result<(), TopicsError> {
    match ack {
        Ok(_) => Ok(()),
        Err(e) if e.kind() == PublishErrorKind::WrongLastSequence => Ok(()),
        Err(e) => Err(unavailable(e)),
    }
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
    ///
    /// # Errors
    /// [`TopicsError::Unavailable`] unless JetStream confirmed every write.
    pub async fn subscribe(
        &self,
        topic: &TopicId,
        users: &[UserId],
        by: &str,
    ) -> Result<usize, TopicsError> {
        let since = self.inbox_last_seq().await?;
        // Pipelined, but never more than a window of unconfirmed writes: the client
        // allows a fixed number of acks in flight (shared by every request of the
        // process), and a request that queued more than that before awaiting any would
        // wait for a permit only its own acks could free — forever.
        let mut acks = std::collections::VecDeque::with_capacity(ACK_WINDOW);
        for user in users {
            let sub = Subscription {
                topic: topic.clone(),
                user_id: user.clone(),
                by: by.to_owned(),
                since,
            };
            let payload: bytes::Bytes = serde_json::to_vec(&sub).map_err(unavailable)?.into();
            for subject in [
                self.subjects.subscription(topic, user),
                self.subjects.user_subscription(user, topic),
            ] {
                if acks.len() >= ACK_WINDOW
                    && let Some(ack) = acks.pop_front()
                {
                    confirmed(ack.await)?;
                }
                // Only when not subscribed yet: subscribing again must not move `since`
                // (that would hide big-topic publishes the user has already seen).
                let publish = PublishMessage::build()
                    .payload(payload.clone())
                    .expected_last_subject_sequence(0);
                acks.push_back(
                    self.nats
                        .js
                        .send_publish(subject, publish)
                        .await
                        .map_err(unavailable)?,
                );
            }
        }
        for ack in acks {
            confirmed(ack.await)?;
        }
        self.announce(users).await;
        Ok(users.len())
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
                tracing::debug!(error = %e, "announcing a topic change failed");
                return;
            }
        }
    }

    /// Unsubscribes `user` from `topic`; returns whether they were subscribed.
    ///
    /// # Errors
    /// [`TopicsError::Unavailable`] when NATS fails.
    pub async fn unsubscribe(&self, topic: &TopicId, user: &UserId) -> Result<bool, TopicsError> {
        let stream = self
            .nats
            .js
            .get_stream_no_info(SUBS)
            .await
            .map_err(unavailable)?;
        let by_topic = stream
            .purge()
            .filter(self.subjects.subscription(topic, user))
            .await
            .map_err(unavailable)?;
        stream
            .purge()
            .filter(self.subjects.user_subscription(user, topic))
            .await
            .map_err(unavailable)?;
        self.announce(std::slice::from_ref(user)).await;
        Ok(by_topic.purged > 0)
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

    /// Up to [`PAGE`] subscriptions of `topic` stored at sequence `from` or later, with
    /// their sequences, in stream order.
    ///
    /// # Errors
    /// [`TopicsError::Read`] when NATS cannot answer.
    pub async fn page(
        &self,
        topic: &TopicId,
        from: u64,
    ) -> Result<Vec<(u64, Subscription)>, TopicsError> {
        let msgs = direct::next_batch(
            &self.nats.consume,
            SUBS,
            &self.subjects.subscribers_of(topic),
            from,
            PAGE,
        )
        .await?;
        Ok(decode(msgs))
    }

    /// The topics `user` is subscribed to (up to 1,000).
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

    /// The subscriptions of `user` (up to 1,000), with when each began.
    ///
    /// # Errors
    /// [`TopicsError::Read`] when NATS cannot answer.
    pub async fn subscriptions_of(&self, user: &UserId) -> Result<Vec<Subscription>, TopicsError> {
        let mut topics = Vec::new();
        let mut from = 1;
        while topics.len() < 1000 {
            let msgs = direct::next_batch(
                &self.nats.consume,
                SUBS,
                &self.subjects.topics_of(user),
                from,
                PAGE,
            )
            .await?;
            let Some(last) = msgs.last().map(|m| m.seq) else {
                break;
            };
            topics.extend(decode(msgs).into_iter().map(|(_, s)| s));
            from = last + 1;
        }
        Ok(topics)
    }
}

fn decode(msgs: Vec<direct::DirectMessage>) -> Vec<(u64, Subscription)> {
    msgs.into_iter()
        .filter_map(|m| Some((m.seq, serde_json::from_slice(&m.payload).ok()?)))
        .collect()
}

/// Fan-out progress, per publish id.
#[derive(Clone)]
pub struct FanoutLog {
    store: kv::Store,
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
        })
    }

    /// The progress of publish `id`, if it started.
    ///
    /// # Errors
    /// [`TopicsError::Unavailable`] when NATS cannot answer.
    pub async fn get(&self, id: &str) -> Result<Option<FanoutProgress>, TopicsError> {
        let value = self.store.get(id).await.map_err(unavailable)?;
        Ok(value.and_then(|v| serde_json::from_slice(&v).ok()))
    }

    /// Records progress.
    ///
    /// # Errors
    /// [`TopicsError::Unavailable`] when NATS does not confirm.
    pub async fn put(&self, id: &str, progress: &FanoutProgress) -> Result<(), TopicsError> {
        let bytes = serde_json::to_vec(progress).map_err(unavailable)?;
        self.store
            .put(id, bytes.into())
            .await
            .map_err(unavailable)?;
        Ok(())
    }
}
