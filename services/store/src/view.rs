//! A user's inbox view: their own inbox subject merged with the big topics they follow.
//!
//! A big topic's publish is stored once, on the topic's subject in the INBOX stream
//! ([`Subjects::topic_inbox`]), so it takes a sequence in the same space as every
//! user's inbox entries. A user's view is then the INBOX stream filtered by their own
//! subject plus the subjects of the topics they subscribe to, each topic bounded below by
//! the sequence at which they subscribed. `seq` stays the stream sequence, so `after=<seq>`
//! resumes across personal and topic entries alike, in order, with no gap and no
//! duplicate, and the cursor is still one number.
//!
//! Reading it costs one direct get for the user's subscriptions, one `multi_last` over
//! their topics' subjects (which topics hold anything new), then one batched direct get
//! per source that has something: a user without subscriptions pays one extra round trip.
//! A newest-first page (no `after`, or `before`) reads every source's lanes at once, each
//! in a few batched direct gets whatever the page size ([`direct::newest`]), not one
//! direct get per message.
//! A topic entry is shown to each subscriber as their copy: the id of their copy
//! ([`herald_protocol::topic::copy_id`]) and them as the recipient, `topic` set, and —
//! when it was rendered from a template — in their locale: the stored publish carries
//! its texts in every locale of the template, and a page holding one reads the user's
//! `locale` preference once (one direct get) to pick theirs
//! ([`herald_protocol::locale`]).
//!
//! [`Subjects::topic_inbox`]: herald_protocol::Subjects::topic_inbox

use crate::direct::{self, DirectMessage};
use crate::inbox::{Inbox, InboxError, InboxPage, MAX_PAGE, decode_one};
use crate::topics::Subscriptions;
use herald_protocol::streams::INBOX;
use herald_protocol::topic::for_subscriber;
use herald_protocol::{StoredNotification, TopicId, UserId};
use std::collections::{HashMap, HashSet};

/// A big topic a user follows, and the INBOX sequence from which they see it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TopicSource {
    /// The topic.
    pub topic: TopicId,
    /// Their view holds the topic's publishes with a greater sequence.
    pub since: u64,
}

/// The newest sequence of every source of a user's view, read once when a connection
/// opens ([`Inbox::head`]).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ViewHead {
    /// The newest sequence of each lane of the user's own inbox that holds anything, as
    /// `(lane subject, newest seq)`.
    pub own: Vec<(String, u64)>,
    /// The big topics they follow, each with the newest sequence on its subject (0 when
    /// none).
    pub topics: Vec<(TopicSource, u64)>,
}

impl ViewHead {
    /// The newest `seq` of the view: of the user's own entries and of the topic publishes
    /// they see (those after they subscribed).
    pub fn last_seq(&self) -> u64 {
        self.topics
            .iter()
            .filter(|(source, last)| *last > source.since)
            .map(|(_, last)| *last)
            .fold(self.own_last(), u64::max)
    }

    /// The newest sequence of the user's own entries, 0 when they have none.
    pub fn own_last(&self) -> u64 {
        self.own.iter().map(|(_, last)| *last).max().unwrap_or(0)
    }
}

/// Subjects per `multi_last` request.
const MULTI_LAST_CHUNK: usize = 256;

/// One message read for a view, and which topic subject it came from (`None`: the
/// user's own subject).
type Read = (DirectMessage, Option<TopicId>);

fn unavailable(e: crate::TopicsError) -> InboxError {
    InboxError::Unavailable(Box::new(e))
}

impl Inbox {
    /// Every topic `user` subscribes to, with the sequence each began at.
    ///
    /// # Errors
    /// [`InboxError`] when NATS cannot answer.
    pub async fn subscribed_topics(&self, user: &UserId) -> Result<Vec<TopicSource>, InboxError> {
        let subs = Subscriptions::new(self.nats().clone(), self.subjects().clone());
        Ok(subs
            .subscriptions_of(user)
            .await
            .map_err(unavailable)?
            .into_iter()
            .map(|s| TopicSource {
                topic: s.topic,
                since: s.since,
            })
            .collect())
    }

    /// The topics of `user` that hold a publish they see with `seq > after`, each with
    /// the sequence to read from (exclusive).
    async fn active_sources(
        &self,
        user: &UserId,
        after: u64,
    ) -> Result<Vec<(TopicSource, u64)>, InboxError> {
        let topics = self.subscribed_topics(user).await?;
        self.sources_after(&topics, after).await
    }

    /// Of `topics`, those holding a publish with `seq > after` that the user sees, each
    /// with the sequence to read from (exclusive). No request when `topics` is empty.
    async fn sources_after(
        &self,
        topics: &[TopicSource],
        after: u64,
    ) -> Result<Vec<(TopicSource, u64)>, InboxError> {
        let last_of = self.topic_lasts(topics).await?;
        Ok(topics
            .iter()
            .filter_map(|t| {
                let from = after.max(t.since);
                let last = *last_of.get(&t.topic)?;
                (last > from).then(|| (t.clone(), from))
            })
            .collect())
    }

    /// The newest sequence stored on each topic's subject (topics with none are absent):
    /// one `multi_last` per 256 topics, none when `topics` is empty.
    async fn topic_lasts(
        &self,
        topics: &[TopicSource],
    ) -> Result<HashMap<TopicId, u64>, InboxError> {
        let mut last_of = HashMap::new();
        if topics.is_empty() {
            return Ok(last_of);
        }
        let subjects: Vec<String> = topics
            .iter()
            .map(|t| self.subjects().topic_inbox(&t.topic))
            .collect();
        for chunk in subjects.chunks(MULTI_LAST_CHUNK) {
            let refs: Vec<&str> = chunk.iter().map(String::as_str).collect();
            for msg in direct::last_of_many(&self.nats().consume, INBOX, &refs).await? {
                let topic = msg
                    .headers
                    .get("Nats-Subject")
                    .and_then(|s| self.subjects().topic_of(s.as_str()));
                if let Some(topic) = topic {
                    // One answer per lane subject of the topic: keep the newest.
                    let last = last_of.entry(topic).or_insert(0);
                    *last = msg.seq.max(*last);
                }
            }
        }
        Ok(last_of)
    }

    /// What a connection needs of the view when it opens: the topics followed and the
    /// newest sequence of every source, read once — the user's own newest entry and their
    /// subscriptions in one concurrent step, then (only for a user who follows big
    /// topics) one `multi_last` over the topics. The unread count then comes from
    /// [`Inbox::unread`] without reading any of this again. A reconnect storm pays two
    /// requests per upgrade for most users, not the seven of reading each figure apart.
    ///
    /// # Errors
    /// [`InboxError`] when NATS cannot answer.
    pub async fn head(&self, user: &UserId) -> Result<ViewHead, InboxError> {
        let lanes = self.subjects().inbox_lanes(user);
        let own = self.lane_lasts(&lanes);
        let (own, topics) = tokio::try_join!(own, self.subscribed_topics(user))?;
        let last_of = self.topic_lasts(&topics).await?;
        let topics = topics
            .into_iter()
            .map(|t| {
                let last = last_of.get(&t.topic).copied().unwrap_or(0);
                (t, last)
            })
            .collect();
        Ok(ViewHead { own, topics })
    }

    /// How many notifications of the view read as `head` have `seq > after` — and no
    /// newer ones: a hello's `unread` counts up to its `last_seq`, and a client counts
    /// what it is sent past that itself, so a notification stored while this counts must
    /// not be counted here too. Lanes holding anything newer are counted (one request
    /// per message, up to a few dozen: see `walk`), none at all when nothing is (the
    /// user has read everything, the common case on a reconnect).
    ///
    /// # Errors
    /// [`InboxError`] when NATS cannot answer.
    pub async fn unread(&self, head: &ViewHead, after: u64) -> Result<u64, InboxError> {
        let mut counts = Vec::new();
        for (lane, last) in &head.own {
            if *last > after {
                counts.push(self.count_between(lane.clone(), after, *last));
            }
        }
        for (source, last) in &head.topics {
            let from = after.max(source.since);
            if *last > from {
                for lane in self.subjects().topic_inbox_lanes(&source.topic) {
                    counts.push(self.count_between(lane, from, *last));
                }
            }
        }
        Ok(futures::future::try_join_all(counts)
            .await?
            .into_iter()
            .sum())
    }

    /// Up to `limit` notifications of the user's view with `seq > after`, oldest first.
    ///
    /// # Errors
    /// [`InboxError::Read`] when NATS cannot answer.
    pub async fn after(
        &self,
        user: &UserId,
        after: u64,
        limit: usize,
    ) -> Result<InboxPage, InboxError> {
        self.after_in(user, None, after, limit).await
    }

    /// [`Inbox::after`] for a reader that already knows the topics the user follows (a
    /// connection's feed): their subscriptions are not read again, and a user who follows
    /// none costs one request per page.
    ///
    /// # Errors
    /// [`InboxError::Read`] when NATS cannot answer.
    pub async fn after_with_topics(
        &self,
        user: &UserId,
        topics: &[TopicSource],
        after: u64,
        limit: usize,
    ) -> Result<InboxPage, InboxError> {
        self.after_in(user, Some(topics), after, limit).await
    }

    async fn after_in(
        &self,
        user: &UserId,
        known: Option<&[TopicSource]>,
        after: u64,
        limit: usize,
    ) -> Result<InboxPage, InboxError> {
        let limit = limit.clamp(1, MAX_PAGE);
        let topics = match known {
            None => self.subscribed_topics(user).await?,
            Some(topics) => topics.to_vec(),
        };
        // Every lane of the view, the user's own and each followed topic's, has its newest
        // sequence read in one snapshot, and each is walked up to it. Read apart, a page
        // could hold a topic publish read a moment later than the own lanes, but not an
        // own entry stored in that moment with a lower seq: the reader's position would
        // pass over it for good. One snapshot holds 256 lanes: a user who follows more
        // than 84 big topics is read in several, milliseconds apart, and keeps that
        // (narrow) window.
        let own = self.subjects().inbox_lanes(user);
        let mut lanes = own.clone();
        for t in &topics {
            lanes.extend(self.subjects().topic_inbox_lanes(&t.topic));
        }
        let lasts: HashMap<String, u64> =
            self.lane_lasts_chunked(&lanes).await?.into_iter().collect();
        let lasts_of = |lanes: &[String]| -> Vec<(String, u64)> {
            lanes
                .iter()
                .filter_map(|l| Some((l.clone(), *lasts.get(l)?)))
                .collect()
        };
        let (msgs, mut has_more) = self.walk_lanes(&lasts_of(&own), after, limit).await?;
        let mut read: Vec<Read> = msgs.into_iter().map(|m| (m, None)).collect();
        for source in topics {
            let from = after.max(source.since);
            let lanes = self.subjects().topic_inbox_lanes(&source.topic);
            let (msgs, more) = self.walk_lanes(&lasts_of(&lanes), from, limit).await?;
            has_more |= more;
            read.extend(msgs.into_iter().map(|m| (m, Some(source.topic.clone()))));
        }
        read.sort_by_key(|(m, _)| m.seq);
        if read.len() > limit {
            read.truncate(limit);
            has_more = true;
        }
        self.localized(user, page(user, read, has_more)).await
    }

    /// Up to `limit` of the newest notifications of the user's view with `seq < before`
    /// (all when `None`), returned oldest first.
    ///
    /// # Errors
    /// [`InboxError::Read`] when NATS cannot answer.
    pub async fn before(
        &self,
        user: &UserId,
        before: Option<u64>,
        limit: usize,
    ) -> Result<InboxPage, InboxError> {
        let limit = limit.clamp(1, MAX_PAGE);
        let own = self.subjects().inbox_lanes(user);
        let (personal, topics) = tokio::try_join!(
            self.lanes_before(&own, before, 0, limit),
            self.active_sources(user, 0)
        )?;
        let (msgs, mut has_more) = personal;
        let mut read: Vec<Read> = msgs.into_iter().map(|m| (m, None)).collect();
        let topic_reads = topics.into_iter().map(|(source, floor)| async move {
            let lanes = self.subjects().topic_inbox_lanes(&source.topic);
            let read = self.lanes_before(&lanes, before, floor, limit).await?;
            Ok::<_, InboxError>((source.topic, read))
        });
        for (topic, (msgs, more)) in futures::future::try_join_all(topic_reads).await? {
            has_more |= more;
            read.extend(msgs.into_iter().map(|m| (m, Some(topic.clone()))));
        }
        // Newest first, keep `limit`, then oldest first.
        read.sort_by_key(|(m, _)| std::cmp::Reverse(m.seq));
        if read.len() > limit {
            read.truncate(limit);
            has_more = true;
        }
        read.reverse();
        self.localized(user, page(user, read, has_more)).await
    }

    /// The user's `locale` preference (`None` when unset): what a big topic's templated
    /// publish is shown in ([`StoredNotification::localize`]). One direct get.
    ///
    /// # Errors
    /// [`InboxError::Unavailable`] when NATS cannot answer.
    pub async fn locale_of(&self, user: &UserId) -> Result<Option<String>, InboxError> {
        let mut prefs =
            crate::preferences::read_many(&self.nats().consume, std::slice::from_ref(user))
                .await
                .map_err(|e| InboxError::Unavailable(Box::new(e)))?;
        Ok(prefs.remove(user).and_then(|p| p.locale))
    }

    /// `page` with each templated topic entry in the user's locale: read only when the
    /// page holds one, so a view without any costs nothing more.
    async fn localized(&self, user: &UserId, mut page: InboxPage) -> Result<InboxPage, InboxError> {
        if page.items.iter().all(|(_, n)| n.variants.is_empty()) {
            return Ok(page);
        }
        let locale = self.locale_of(user).await?;
        page.items = page
            .items
            .into_iter()
            .map(|(seq, n)| (seq, n.localize(locale.as_deref())))
            .collect();
        Ok(page)
    }

    /// The newest `seq` in the user's view, 0 when empty.
    ///
    /// # Errors
    /// [`InboxError::Read`] when NATS cannot answer.
    pub async fn last_seq(&self, user: &UserId) -> Result<u64, InboxError> {
        Ok(self.head(user).await?.last_seq())
    }

    /// How many notifications the user's view has with `seq > after`.
    ///
    /// # Errors
    /// [`InboxError::Read`] when NATS cannot answer.
    pub async fn count_after(&self, user: &UserId, after: u64) -> Result<u64, InboxError> {
        let head = self.head(user).await?;
        self.unread(&head, after).await
    }
}

/// Decodes what was read into a page: personal entries as stored, topic entries as the
/// user's copy. The span covers everything read, decodable or not.
fn page(user: &UserId, read: Vec<Read>, has_more: bool) -> InboxPage {
    let read_span = match (read.first(), read.last()) {
        (Some((first, _)), Some((last, _))) => Some((first.seq, last.seq)),
        _ => None,
    };
    let mut shared = HashSet::new();
    let items = read
        .into_iter()
        .filter_map(|(m, topic)| match topic {
            None => decode_one(user, &m),
            Some(topic) => {
                let n = decode_topic(&topic, &m)?;
                shared.insert(m.seq);
                Some((m.seq, for_subscriber(n, user)))
            }
        })
        .collect();
    InboxPage {
        items,
        has_more,
        read_span,
        shared,
    }
}

/// A big topic's stored publish, if it is one of `topic`'s.
pub(crate) fn decode_topic(topic: &TopicId, m: &DirectMessage) -> Option<StoredNotification> {
    match serde_json::from_slice::<StoredNotification>(&m.payload) {
        Ok(n) if n.topic.as_deref() == Some(topic.as_str()) => Some(n),
        Ok(_) => {
            tracing::error!(seq = m.seq, "topic message of another topic; skipped");
            None
        }
        Err(e) => {
            tracing::warn!(seq = m.seq, error = %e, "undecodable topic message; skipped");
            None
        }
    }
}
