//! The INBOX stream: one subject per user, the stream sequence is the user's `seq`.
//!
//! Appends carry `Nats-Msg-Id` = notification id, so a retried append is deduplicated by
//! JetStream within the dedup window. Reads use direct gets, never a consumer per user.

use crate::connect::Nats;
use crate::direct::{self, DirectGetError, DirectMessage};
use async_nats::header::{NATS_EXPECTED_STREAM, NATS_MESSAGE_ID};
use async_nats::jetstream::context::{PublishAckFuture, PublishErrorKind};
use async_nats::jetstream::message::PublishMessage;
use async_nats::jetstream::stream::RawMessageErrorKind;
use async_nats::{HeaderMap, Subject};
use bytes::Bytes;
use herald_protocol::streams::INBOX;
use herald_protocol::{StoredNotification, Subjects, UserId};

/// Largest encoded notification: the stream's message limit less room for headers.
pub const MAX_STORED_BYTES: usize = 127 * 1024;

/// Largest page a reader may ask for.
pub const MAX_PAGE: usize = 500;

/// An append ready to publish: where and how a notification is stored, whoever then
/// waits for JetStream's ack ([`Inbox::send_append`] or [`Inbox::forward`]).
#[derive(Debug, Clone)]
pub struct Append {
    pub(crate) subject: String,
    pub(crate) headers: HeaderMap,
    pub(crate) payload: Bytes,
}

/// What JetStream said about an append.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AppendAck {
    /// Inbox position.
    pub seq: u64,
    /// True when the id was already stored: `seq` is the first copy's.
    pub duplicate: bool,
}

/// A page of a user's inbox, oldest first.
#[derive(Debug, Clone, Default)]
pub struct InboxPage {
    /// `(seq, notification)` pairs in ascending `seq`.
    pub items: Vec<(u64, StoredNotification)>,
    /// More messages exist past the page in the direction read.
    pub has_more: bool,
    /// The seqs of the first and last messages read, decodable or not, so a cursor moves
    /// past messages that were skipped.
    pub read_span: Option<(u64, u64)>,
    /// The seqs among `items` read from a big topic's subject (not the user's own).
    pub shared: std::collections::HashSet<u64>,
}

/// Why an inbox operation failed.
#[derive(Debug, thiserror::Error)]
pub enum InboxError {
    /// NATS did not take or confirm the write: the notification is not accepted.
    #[error("NATS is unavailable")]
    Unavailable(#[source] Box<dyn std::error::Error + Send + Sync>),
    /// The encoded notification is larger than the inbox stores.
    #[error("the notification takes {0} bytes stored; the limit is {MAX_STORED_BYTES}")]
    TooLarge(usize),
    /// A read failed.
    #[error("inbox read failed")]
    Read(#[from] DirectGetError),
}

/// What [`Inbox::entry_at`] found at a sequence.
#[derive(Debug, Clone)]
pub enum Entry {
    /// The stored notification, as stored.
    Stored(Bytes),
    /// Not in the inbox (expired, or its user erased), as the stream leader says.
    Gone,
    /// It could not be read (NATS trouble); ask again later.
    Unavailable(String),
}

/// Reads and appends one user's notifications.
#[derive(Clone, Debug)]
pub struct Inbox {
    nats: Nats,
    subjects: Subjects,
}

impl Inbox {
    /// An inbox over these connections and subjects.
    pub fn new(nats: Nats, subjects: Subjects) -> Self {
        Self { nats, subjects }
    }

    /// The subject scheme in use.
    pub fn subjects(&self) -> &Subjects {
        &self.subjects
    }

    /// The connections in use.
    pub fn nats(&self) -> &Nats {
        &self.nats
    }

    /// Encodes a notification for the inbox, refusing what the stream would not store.
    ///
    /// # Errors
    /// [`InboxError::TooLarge`] with the encoded size.
    pub fn encode(n: &StoredNotification) -> Result<Bytes, InboxError> {
        let bytes = serde_json::to_vec(n).map_err(|e| InboxError::Unavailable(Box::new(e)))?;
        if bytes.len() > MAX_STORED_BYTES {
            return Err(InboxError::TooLarge(bytes.len()));
        }
        Ok(bytes.into())
    }

    /// Sends an append (of [`Inbox::encode`]d bytes) and returns the pending ack, so callers can pipeline many.
    ///
    /// # Errors
    /// [`InboxError::Unavailable`] when the publish cannot be sent.
    pub async fn send(
        &self,
        n: &StoredNotification,
        payload: Bytes,
    ) -> Result<PublishAckFuture, InboxError> {
        self.send_append(self.append_of(n, payload)).await
    }

    /// How `n` is appended: its subject and headers (`Nats-Msg-Id` = its id, the INBOX
    /// stream expected, the route marker when the router has work for it).
    pub fn append_of(&self, n: &StoredNotification, payload: Bytes) -> Append {
        let mut headers = HeaderMap::new();
        headers.insert(NATS_MESSAGE_ID, n.id.as_str());
        headers.insert(NATS_EXPECTED_STREAM, INBOX);
        if needs_routing(n) {
            headers.insert(herald_protocol::streams::ROUTE_HEADER, "1");
        }
        Append {
            subject: self.entry_subject(n),
            headers,
            payload,
        }
    }

    /// Publishes `append` through JetStream and returns the pending ack.
    ///
    /// # Errors
    /// [`InboxError::TooLarge`] over the server's payload limit, else
    /// [`InboxError::Unavailable`] when the publish cannot be sent.
    pub async fn send_append(&self, append: Append) -> Result<PublishAckFuture, InboxError> {
        if !self.nats.is_connected() {
            // Published now, it would wait in the client and might land after the caller
            // was told it failed (and retried it).
            return Err(InboxError::Unavailable("not connected to NATS".into()));
        }
        let Append {
            subject,
            headers,
            payload,
        } = append;
        let publish = PublishMessage::build().payload(payload).headers(headers);
        self.nats
            .js
            .send_publish(subject, publish)
            .await
            .map_err(|e| match e.kind() {
                PublishErrorKind::MaxPayloadExceeded => InboxError::TooLarge(0),
                _ => InboxError::Unavailable(Box::new(e)),
            })
    }

    /// Publishes `append` with `reply` as its reply subject, so JetStream sends its ack —
    /// or its error — straight to whoever waits on `reply`, and Herald waits for nothing.
    /// The native ingest answers producers this way: their PubAck is JetStream's own,
    /// sent once the notification is durable. With no `reply`, nobody is told.
    ///
    /// # Errors
    /// [`InboxError::TooLarge`] over the server's payload limit, else
    /// [`InboxError::Unavailable`] when the publish cannot be sent.
    pub async fn forward(&self, append: Append, reply: Option<Subject>) -> Result<(), InboxError> {
        let Append {
            subject,
            headers,
            payload,
        } = append;
        let client = &self.nats.publish;
        let sent = match reply {
            Some(reply) => {
                client
                    .publish_with_reply_and_headers(subject, reply, headers, payload)
                    .await
            }
            None => client.publish_with_headers(subject, headers, payload).await,
        };
        sent.map_err(|e| match e.kind() {
            async_nats::client::PublishErrorKind::MaxPayloadExceeded => InboxError::TooLarge(0),
            _ => InboxError::Unavailable(Box::new(e)),
        })
    }

    /// The subject `n` is stored under: its priority lane when the router has work for it
    /// (a channel beyond the inbox), else the inbox-only lane that no router consumer
    /// reads, so the many notifications that need nothing but the inbox cost no consumer
    /// delivery and no ack.
    pub fn entry_subject(&self, n: &StoredNotification) -> String {
        if needs_routing(n) {
            self.subjects.inbox_entry(&n.user_id, n.priority)
        } else {
            self.subjects.inbox_only_entry(&n.user_id)
        }
    }

    /// Appends and waits until JetStream has it durable.
    ///
    /// # Errors
    /// [`InboxError::Unavailable`] unless JetStream confirmed the write.
    pub async fn append(
        &self,
        n: &StoredNotification,
        payload: Bytes,
    ) -> Result<AppendAck, InboxError> {
        if !self.nats.is_connected() {
            // Publishing now would queue in the client and might land after we answered 503.
            return Err(InboxError::Unavailable("not connected to NATS".into()));
        }
        let ack = self
            .send(n, payload)
            .await?
            .await
            .map_err(|e| InboxError::Unavailable(Box::new(e)))?;
        Ok(AppendAck {
            seq: ack.sequence,
            duplicate: ack.duplicate,
        })
    }

    /// Stores a big topic's publish once, on the topic's subject in INBOX (`n.id` is the
    /// publish id, the idempotency key), and waits until it is durable. Subscribers see
    /// it through their view ([`crate::view`]); INBOX republishes it to the topic's live
    /// subject.
    ///
    /// # Errors
    /// [`InboxError::Unavailable`] unless JetStream confirmed the write.
    pub async fn append_topic(
        &self,
        topic: &herald_protocol::TopicId,
        n: &StoredNotification,
    ) -> Result<AppendAck, InboxError> {
        if !self.nats.is_connected() {
            return Err(InboxError::Unavailable("not connected to NATS".into()));
        }
        let publish = PublishMessage::build()
            .payload(Self::encode(n)?)
            .message_id(&n.id)
            .expected_stream(INBOX);
        let ack = self
            .nats
            .js
            .send_publish(self.subjects.topic_inbox_entry(topic, n.priority), publish)
            .await
            .map_err(|e| InboxError::Unavailable(Box::new(e)))?
            .await
            .map_err(|e| InboxError::Unavailable(Box::new(e)))?;
        Ok(AppendAck {
            seq: ack.sequence,
            duplicate: ack.duplicate,
        })
    }

    /// Tells every connected device of `user` that the read position is now `up_to`
    /// (a core message on the user's live subject; devices that miss it see the position
    /// in their next `hello`).
    ///
    /// # Errors
    /// [`InboxError::Unavailable`] when the message cannot be sent.
    pub async fn announce_read(&self, user: &UserId, up_to: u64) -> Result<(), InboxError> {
        let mut headers = async_nats::HeaderMap::new();
        headers.insert(herald_protocol::streams::READ_HEADER, up_to.to_string());
        self.nats
            .publish
            .publish_with_headers(self.subjects.live(user), headers, Bytes::new())
            .await
            .map_err(|e| InboxError::Unavailable(Box::new(e)))
    }

    /// What is stored at `seq` (a stream sequence the caller knows was written: a job's).
    ///
    /// A direct get is answered by any replica, and on a cluster a replica may not yet
    /// have applied an append that the leader has acknowledged, so a sequence the direct
    /// get does not find is asked of the stream leader (`STREAM.MSG.GET`) before it is
    /// called [`Entry::Gone`]. That costs a second round trip only for what is really
    /// gone, which is rare.
    pub async fn entry_at(&self, seq: u64) -> Entry {
        // The body alone: a worker needs nothing of the headers, and building and parsing
        // them was most of what a direct get cost (BENCHMARKS.md, session 11).
        match direct::payload_at(&self.nats.consume, INBOX, seq).await {
            Ok(Some(payload)) => Entry::Stored(payload),
            Ok(None) => {
                let stream = match self.nats.js_consume.get_stream_no_info(INBOX).await {
                    Ok(stream) => stream,
                    Err(e) => return Entry::Unavailable(e.to_string()),
                };
                match stream.get_raw_message(seq).await {
                    Ok(m) => Entry::Stored(m.payload),
                    Err(e) if e.kind() == RawMessageErrorKind::NoMessageFound => Entry::Gone,
                    Err(e) => Entry::Unavailable(e.to_string()),
                }
            }
            Err(e) => Entry::Unavailable(e.to_string()),
        }
    }

    /// The INBOX stream's newest sequence, as its leader says (`STREAM.INFO`): unlike a
    /// direct get, never a replica's state that is behind. One request, for the rare
    /// caller that must tell a replica behind from a sequence the stream never reached.
    ///
    /// # Errors
    /// [`InboxError::Unavailable`] when NATS cannot answer.
    pub async fn stream_last_seq(&self) -> Result<u64, InboxError> {
        let stream = self
            .nats
            .js_consume
            .get_stream_no_info(INBOX)
            .await
            .map_err(|e| InboxError::Unavailable(Box::new(e)))?;
        let info = stream
            .get_info()
            .await
            .map_err(|e| InboxError::Unavailable(Box::new(e)))?;
        Ok(info.state.last_sequence)
    }

    /// Up to `limit` messages of one subject with `seq > after`, oldest first, and
    /// whether more follow.
    pub(crate) async fn subject_after(
        &self,
        subject: &str,
        after: u64,
        limit: usize,
    ) -> Result<(Vec<DirectMessage>, bool), InboxError> {
        let msgs = direct::next_batch(
            &self.nats.consume,
            INBOX,
            subject,
            after.saturating_add(1),
            limit,
        )
        .await?;
        let has_more = msgs.last().and_then(|m| m.pending).is_some_and(|p| p > 0);
        Ok((msgs, has_more))
    }

    /// Up to `limit` of the newest messages of the literal subjects `lanes` (one source
    /// of a view: a user's inbox lanes, or a big topic's) with `floor < seq < before`
    /// (no upper bound when `None`), newest first, and whether more exist below them.
    ///
    /// The newest message of every lane below the bound is read in one `multi_last`, then
    /// each lane that holds any is read back from it concurrently, a few batched direct
    /// gets each whatever `limit` is ([`direct::newest`]).
    pub(crate) async fn lanes_before(
        &self,
        lanes: &[String],
        before: Option<u64>,
        floor: u64,
        limit: usize,
    ) -> Result<(Vec<DirectMessage>, bool), InboxError> {
        let top = match before {
            Some(b) if b <= floor.saturating_add(1) => return Ok((Vec::new(), false)),
            Some(b) => Some(b - 1),
            None => None,
        };
        let client = &self.nats.consume;
        let refs: Vec<&str> = lanes.iter().map(String::as_str).collect();
        let mut tops = direct::last_of_many_up_to(client, INBOX, &refs, top).await?;
        let mut at_head = top.is_none();
        if let Some(top) = top
            && tops.is_empty()
        {
            // nats-server answers "No Results" to an `up_to_seq` above the stream's last
            // sequence, so a `before` past it (a sentinel such as u64::MAX, or a cursor
            // from before the stream was recreated) read as an empty inbox. Ask again
            // without the bound: a lane's newest at or below `top` is its newest of all.
            // One above it means the stream has grown past `top` since (or the lane has
            // nothing below it): then the bounded request is answered as asked.
            tops = direct::last_of_many(client, INBOX, &refs).await?;
            at_head = true;
            if tops.iter().any(|m| m.seq > top) {
                tops = direct::last_of_many_up_to(client, INBOX, &refs, Some(top)).await?;
                at_head = false;
            }
        }
        let reads = tops.iter().filter(|m| m.seq > floor).filter_map(|m| {
            let lane = m.headers.get("Nats-Subject")?.as_str();
            Some(direct::newest(
                client, INBOX, lane, floor, m.seq, at_head, limit,
            ))
        });
        let mut has_more = false;
        let mut newest_first = Vec::new();
        for (msgs, more) in futures::future::try_join_all(reads).await? {
            has_more |= more;
            newest_first.extend(msgs);
        }
        newest_first.sort_by_key(|m| std::cmp::Reverse(m.seq));
        if newest_first.len() > limit {
            newest_first.truncate(limit);
            has_more = true;
        }
        Ok((newest_first, has_more))
    }

    /// How many messages one subject has with `seq > after`.
    pub(crate) async fn subject_count_after(
        &self,
        subject: &str,
        after: u64,
    ) -> Result<u64, InboxError> {
        let msgs = direct::next_batch(
            &self.nats.consume,
            INBOX,
            subject,
            after.saturating_add(1),
            1,
        )
        .await?;
        Ok(msgs.first().map_or(0, |m| 1 + m.pending.unwrap_or(0)))
    }
}

/// Decodes stored payloads, skipping (and logging) any that are not ours or not this
/// user's: only Herald writes INBOX, but a misconfigured NATS permission must not turn
/// into another user's data or a failed page.
pub(crate) fn decode_one(user: &UserId, m: &DirectMessage) -> Option<(u64, StoredNotification)> {
    match serde_json::from_slice::<StoredNotification>(&m.payload) {
        Ok(n) if &n.user_id == user => Some((m.seq, n)),
        Ok(_) => {
            tracing::error!(
                seq = m.seq,
                "inbox message addressed to another user; skipped"
            );
            None
        }
        Err(e) => {
            tracing::warn!(seq = m.seq, error = %e, "undecodable inbox message; skipped");
            None
        }
    }
}

/// Whether the router has work for `n`: a channel beyond the inbox. Marked by the
/// [`herald_protocol::streams::ROUTE_HEADER`] and by the entry's lane.
pub(crate) fn needs_routing(n: &StoredNotification) -> bool {
    n.channels
        .iter()
        .any(|c| *c != herald_protocol::Channel::Inbox)
}
