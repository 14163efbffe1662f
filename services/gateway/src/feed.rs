//! The delivery core shared by every transport: replay after a position, then live, with
//! no gap and no duplicate.
//!
//! A user's view is their own inbox subject merged with the big topics they follow (see
//! [`herald_store::view`]), so a feed has several sources: the user's live subject and
//! each followed topic's. Duplicates and gaps are judged per source — each source arrives
//! in order, and each live message carries the previous sequence of its own subject —
//! while the hub hands the sources' messages out in sequence order.

use crate::hub::{Hub, Live, Tap};
use backon::{ExponentialBuilder, Retryable as _};
use herald_protocol::topic::{TOPICS_HEADER, for_subscriber};
use herald_protocol::{Notification, StoredNotification, TopicId, UserId};
use herald_store::direct::header_u64;
use herald_store::{InboxEntry as Entry, InboxError, InboxPage, TopicSource, ViewHead};
use std::collections::VecDeque;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll, ready};
use std::time::Duration;
use tokio::sync::Semaphore;

/// Notifications read from the inbox per replay step.
const REPLAY_PAGE: usize = 200;

/// Further tries of a replay read that failed, before the feed fails.
const REPLAY_RETRIES: usize = 3;

/// Catch-ups in a row that may end short of the held live message (the replica that
/// answered is behind) before the feed fails; the pause before each grows from
/// [`SHORT_PAUSE`] (about 1.3 s waited in all).
const SHORT_ROUNDS: u32 = 8;

/// The first pause before a catch-up reads again after ending short.
const SHORT_PAUSE: Duration = Duration::from_millis(5);

/// Why a feed stopped.
#[derive(Debug, thiserror::Error)]
pub enum FeedError {
    /// The live subscription could not be made or ended.
    #[error("live subscription failed")]
    Subscribe(#[source] Box<dyn std::error::Error + Send + Sync>),
    /// The user's topic subscriptions could not be read.
    #[error("reading topic subscriptions failed")]
    Topics(#[source] InboxError),
    /// The live subscription closed (NATS connection gone for good).
    #[error("live subscription closed")]
    Closed,
    /// Reading the inbox failed.
    #[error(transparent)]
    Inbox(#[from] InboxError),
}

/// One user's ordered stream of notifications.
#[derive(Debug)]
pub struct Feed {
    /// The hub, for its inbox (one per process: a feed stays small).
    hub: Hub,
    user: UserId,
    live: Tap,
    /// What has been handed out, per source, and what is read next.
    cursor: Cursor,
    /// The user's topic subscriptions changed: re-read them.
    topics_changed: bool,
    /// The store read in flight, if any (a replay page, the user's topics), kept across
    /// polls: a connection's other work never cancels a read halfway.
    in_flight: Option<InFlight>,
    /// The tap dropped live messages while a catch-up took none: after the tap is
    /// drained, the inbox is read again for them.
    stale_drops: bool,
    /// Shared by a gateway's feeds: one permit per catch-up read in flight.
    pace: Option<Arc<Semaphore>>,
    /// A read position announced since the last call, for other devices' `read` frames.
    read_event: Option<u64>,
    /// The user's `locale` preference, read when they first follow a big topic (its
    /// templated publishes carry every locale's texts; live ones are shown in this one).
    /// Read once per feed: a change applies from the next connection.
    locale: Option<Option<String>>,
}

/// The bookkeeping of a feed, apart from the reads that feed it: the highest seq handed
/// out per source, the catch-up position, the held live message, and what is ready to
/// hand out. It decides what is delivered, in what order, and when a catch-up is over.
#[derive(Debug)]
struct Cursor {
    /// Notifications handed out by the initial replay, until it ends (then recorded).
    replayed: Option<u64>,
    /// Highest seq handed out (or the starting position).
    last_sent: u64,
    /// Highest seq handed out from the user's own subject.
    own_high: u64,
    /// Big topics followed: the topic, the seq from which the user sees it, and the
    /// highest seq handed out from it. Usually empty.
    topics: Vec<Followed>,
    /// Where the next catch-up read starts (exclusive).
    replay_from: u64,
    /// Read position at open, for the `read` flag.
    read_up_to: u64,
    /// Whether the inbox may hold notifications after `last_sent` not yet handed out.
    catching_up: bool,
    /// The newest live message that arrived during a catch-up (the older ones were let
    /// go: the catch-up reads them), delivered once the catch-up has read up to it.
    held: Option<Box<Held>>,
    /// Catch-ups that ended without reaching the held message (see [`Cursor::page`]).
    short_rounds: u32,
    ready: VecDeque<Notification>,
}

/// A live message kept until the catch-up in progress has read everything before it.
#[derive(Debug)]
struct Held {
    seq: u64,
    source: Option<TopicId>,
    stored: StoredNotification,
}

/// Where a catch-up stands after a page ([`Cursor::page`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Caught {
    /// More of the view may follow: read the next page.
    More,
    /// The view has been read to its end, and the held message (if any) handed out.
    Up,
    /// The view read to its end lacks the held message at this seq, stored before it
    /// came live: the replica that answered is behind, unless it has been deleted since.
    Short(u64),
}

#[derive(Debug)]
struct Followed {
    topic: TopicId,
    since: u64,
    high: u64,
}

/// A store read that borrows nothing from its feed, so the feed can keep it while it is
/// polled (boxed: an idle feed holds only the empty `Option`).
struct InFlight(Pin<Box<dyn Future<Output = Result<Step, FeedError>> + Send>>);

impl std::fmt::Debug for InFlight {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("InFlight")
    }
}

/// What a finished [`InFlight`] read brings.
enum Step {
    /// A page of the view after the replay position.
    Page(InboxPage),
    /// The user's topic subscriptions as they are now.
    Topics(Vec<TopicSource>),
    /// Newly followed topics' live subscriptions are confirmed; the user's locale, when
    /// it had to be read.
    Followed(Option<Option<String>>),
    /// Whether the held message a catch-up fell short of is still stored (the stream
    /// leader's word), after a pause that grows with each such round.
    HeldStored(bool),
}

/// A user's live subject, tapped; not yet a feed (see [`Feed::tap`]).
#[derive(Debug)]
pub struct Tapped {
    hub: Hub,
    user: UserId,
    live: Tap,
}

impl Tapped {
    /// The user whose subject is tapped.
    pub fn user(&self) -> &UserId {
        &self.user
    }

    /// The feed, given the view's `head` read after the tap: with `after`, replays
    /// everything after it first; without, starts after the head's newest seq (live
    /// only). Follows the big topics of `head` live.
    ///
    /// # Errors
    /// [`FeedError`] when NATS cannot answer.
    pub async fn start(
        self,
        after: Option<u64>,
        read_up_to: u64,
        head: &ViewHead,
    ) -> Result<Feed, FeedError> {
        let Tapped {
            hub,
            user,
            mut live,
        } = self;
        let inbox = hub.inbox();
        let mut topics = Vec::with_capacity(head.topics.len());
        for (t, _) in &head.topics {
            live.follow(inbox.subjects().topic_live(&t.topic))
                .await
                .map_err(|e| FeedError::Subscribe(Box::new(e)))?;
            topics.push(Followed {
                topic: t.topic.clone(),
                since: t.since,
                high: 0,
            });
        }
        let locale = if topics.is_empty() {
            None
        } else {
            Some(inbox.locale_of(&user).await?)
        };
        // The topics' live subjects were followed after the head was read: a publish in
        // between is neither in the head nor live, so a user who follows any catches up
        // from the head once (one read) even without `after`. Otherwise a client resuming
        // at or past the head has nothing to replay: what is stored from the tap on
        // arrives live (the common reconnect; no read at all).
        let (last_sent, catching_up) = match after {
            // A position past the view's newest seq: on a cluster, most likely a head read
            // from a replica a moment behind the one that sent the client that seq live
            // (resume from it as usual: anything below is a duplicate). But a position
            // past the stream's newest sequence, as its leader says, is from another life
            // of the stream (recreated or restored: its sequences began again), and would
            // throw away as already sent every notification up to it: the whole view is
            // replayed instead, and the hello's `last_seq`, below the client's position,
            // tells the client so (see `Feed::hello_last_seq`).
            Some(after) if after > head.last_seq() && after > inbox.stream_last_seq().await? => {
                tracing::info!(
                    user = %user, after,
                    "resume position past the inbox stream's end: replaying the whole inbox"
                );
                (0, true)
            }
            Some(after) => (after, after < head.last_seq() || !topics.is_empty()),
            None => (head.last_seq(), !topics.is_empty()),
        };
        for t in &mut topics {
            t.high = last_sent;
        }
        Ok(Feed {
            hub,
            user,
            live,
            cursor: Cursor {
                replayed: (after.is_some() && catching_up).then_some(0),
                last_sent,
                own_high: last_sent,
                topics,
                replay_from: last_sent,
                read_up_to,
                catching_up,
                held: None,
                short_rounds: 0,
                ready: VecDeque::new(),
            },
            topics_changed: false,
            in_flight: None,
            stale_drops: false,
            pace: None,
            read_event: None,
            locale,
        })
    }
}

/// What a feed hands out.
#[derive(Debug, Clone, PartialEq)]
// Nearly every value is the notification variant; boxing it would add an allocation
// per delivered frame to save a few bytes on the rare read positions.
#[allow(clippy::large_enum_variant)]
pub enum Delivery {
    /// A notification, in seq order.
    Notification(Notification),
    /// The user's read position moved to this seq.
    Read(u64),
}

impl Feed {
    /// Opens a feed. With `after`, replays everything after it first; without, starts at
    /// the newest notification (live only).
    ///
    /// # Errors
    /// [`FeedError`] when NATS cannot answer.
    pub async fn open(
        hub: &Hub,
        user: UserId,
        after: Option<u64>,
        read_up_to: u64,
    ) -> Result<Self, FeedError> {
        let tapped = Self::tap(hub, user)?;
        let head = hub.inbox().head(tapped.user()).await?;
        tapped.start(after, read_up_to, &head).await
    }

    /// The first half of opening a feed: taps the user's live subject. Read the view's
    /// head ([`herald_store::Inbox::head`]) only after this, then [`Tapped::start`] the
    /// feed: whatever is stored from the tap on is either at or below that head, or
    /// arrives live, and the per-source seq check drops the overlap.
    ///
    /// # Errors
    /// [`FeedError::Subscribe`] when the hub's subscriptions have ended.
    pub fn tap(hub: &Hub, user: UserId) -> Result<Tapped, FeedError> {
        let live = hub
            .tap(hub.inbox().subjects().live(&user))
            .map_err(|e| FeedError::Subscribe(Box::new(e)))?;
        Ok(Tapped {
            hub: hub.clone(),
            user,
            live,
        })
    }

    /// Catch-up reads (replays) wait for a permit of `pace`, one per read in flight, so
    /// a storm of resuming clients queues its replays instead of flooding the store.
    #[must_use]
    pub fn paced(mut self, pace: Arc<Semaphore>) -> Self {
        self.pace = Some(pace);
        self
    }

    /// The highest seq handed out so far (the resume position).
    pub fn position(&self) -> u64 {
        self.cursor.last_sent
    }

    /// The `last_seq` of the `hello` frame of a feed just started at `after` with
    /// `head`: the view's newest seq, or the client's position when that is newer (a
    /// head read from a replica a moment behind; the client saw that seq live). So
    /// `last_seq` is below the client's position only when the position is from another
    /// life of the stream and the feed replays the whole view ([`Tapped::start`]): the
    /// client's sign to forget its position and take the replay.
    pub fn hello_last_seq(&self, after: Option<u64>, head: &ViewHead) -> u64 {
        match after {
            Some(after) if self.cursor.last_sent >= after => head.last_seq().max(after),
            _ => head.last_seq(),
        }
    }

    /// The user this feed belongs to.
    pub fn user(&self) -> &UserId {
        &self.user
    }

    /// Waits for the next notifications, in `seq` order. Cancel-safe: a notification is
    /// only counted as sent once returned, and a store read in flight is kept.
    ///
    /// # Errors
    /// [`FeedError`] when NATS cannot answer or the subscription ends.
    pub async fn next(&mut self) -> Result<Vec<Notification>, FeedError> {
        std::future::poll_fn(|cx| self.poll_next(cx)).await
    }

    /// [`Feed::next`], at most `max` notifications (see [`Feed::poll_next_up_to`]).
    ///
    /// # Errors
    /// [`FeedError`] when NATS cannot answer or the subscription ends.
    pub async fn next_up_to(&mut self, max: usize) -> Result<Vec<Notification>, FeedError> {
        std::future::poll_fn(|cx| self.poll_next_up_to(cx, max)).await
    }

    /// [`Feed::next`] for hand-written futures: the next notifications (empty when only
    /// the read position moved, see [`Feed::take_read`]), or `Pending` with the waker
    /// registered where the feed waits (the live tap, or the store read in flight).
    ///
    /// # Errors
    /// [`FeedError`] when NATS cannot answer or the subscription ends.
    pub fn poll_next(
        &mut self,
        cx: &mut Context<'_>,
    ) -> Poll<Result<Vec<Notification>, FeedError>> {
        self.poll_next_up_to(cx, usize::MAX)
    }

    /// [`Feed::poll_next`], handing out at most `max` notifications (at least one); the
    /// rest wait in the feed, and no further page is read until they are taken. So a
    /// connection that takes only what its queue has room for makes a replay wait on
    /// the socket instead of overflowing the queue.
    ///
    /// # Errors
    /// [`FeedError`] when NATS cannot answer or the subscription ends.
    pub fn poll_next_up_to(
        &mut self,
        cx: &mut Context<'_>,
        max: usize,
    ) -> Poll<Result<Vec<Notification>, FeedError>> {
        loop {
            if self.live.take_topics_changed() {
                self.topics_changed = true;
            }
            if !self.cursor.ready.is_empty() {
                let n = max.clamp(1, self.cursor.ready.len());
                if n == self.cursor.ready.len() {
                    return Poll::Ready(Ok(self.take_ready()));
                }
                return Poll::Ready(Ok(self.cursor.ready.drain(..n).collect()));
            }
            if self.read_event.is_some() {
                return Poll::Ready(Ok(Vec::new()));
            }
            if self.in_flight.is_none() {
                if self.topics_changed {
                    self.in_flight = Some(self.read_topics());
                } else if self.cursor.catching_up {
                    self.in_flight = Some(self.read_page());
                }
            }
            if self.in_flight.is_some() {
                ready!(self.poll_in_flight(cx))?;
                continue;
            }
            if self.stale_drops {
                // The tap overflowed while a catch-up took nothing live. What it holds
                // comes first, in order (duplicates are dropped); then what it dropped is
                // read from the inbox.
                loop {
                    match self.live.poll_recv(cx) {
                        Poll::Ready(Some(live)) => self.on_live(&live),
                        Poll::Ready(None) => return Poll::Ready(Err(FeedError::Closed)),
                        Poll::Pending => break,
                    }
                }
                self.stale_drops = false;
                self.lost_live();
                continue;
            }
            if self.live.take_lagged() {
                // Live messages went missing (the hub dropped some for this connection,
                // or its NATS connection lost some): read them from the inbox, from the
                // least any source has handed out — `last_sent` may be past a lost
                // message of another lane or source. What is queued meanwhile is in the
                // inbox too, and is dropped as already handed out after the catch-up.
                self.lost_live();
                continue;
            }
            let live = ready!(self.live.poll_recv(cx)).ok_or(FeedError::Closed)?;
            if self.live.take_lagged() {
                // Missing after this one: it is held until the catch-up ends.
                self.lost_live();
            }
            self.on_live(&live);
        }
    }

    /// Live messages may have been lost (dropped by the hub's tap, or by its NATS
    /// connection): what was stored meanwhile is read from the view. The hub's connection
    /// may also have lost an announcement that the user's topics changed, which is stored
    /// nowhere: the topics are read again too (one direct get, on a path that already
    /// pays for an inbox read), or a topic joined meanwhile would never be followed live.
    fn lost_live(&mut self) {
        self.topics_changed = true;
        self.cursor.catch_up(self.cursor.lowest_high());
    }

    /// The user's topic subscriptions may have changed (this connection changed them):
    /// they are read again before the next live message is taken, whether or not the
    /// announcement arrives.
    pub fn topics_may_have_changed(&mut self) {
        self.topics_changed = true;
    }

    /// Notifications already available without waiting on the network for live ones
    /// (replay pages still count as available). Empty when caught up.
    ///
    /// # Errors
    /// [`FeedError`] when NATS cannot answer.
    pub async fn next_ready(&mut self) -> Result<Vec<Notification>, FeedError> {
        if self.cursor.catching_up && self.cursor.ready.is_empty() {
            if self.in_flight.is_none() {
                self.in_flight = Some(self.read_page());
            }
            std::future::poll_fn(|cx| self.poll_in_flight(cx)).await?;
        }
        Ok(self.take_ready())
    }

    /// What is ready, leaving no buffer behind (an idle feed holds no capacity).
    fn take_ready(&mut self) -> Vec<Notification> {
        Vec::from(std::mem::take(&mut self.cursor.ready))
    }

    /// Drives the store reads in flight to their end, taking in what each brings (one
    /// may start the next: following new topics after reading them).
    fn poll_in_flight(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), FeedError>> {
        while let Some(in_flight) = &mut self.in_flight {
            let step = ready!(in_flight.0.as_mut().poll(cx));
            self.in_flight = None;
            match step? {
                Step::Page(_) if self.live.take_topics_changed() => {
                    // The user's topics changed while this page was read: it may lack a
                    // topic joined meanwhile and hold later entries of the others, and
                    // taking it would move the position past that topic's publishes. It
                    // is read again once the topics are.
                    self.topics_changed = true;
                }
                Step::Page(page) => self.take_page(page),
                Step::Topics(now) => self.take_topics(now),
                Step::Followed(locale) => {
                    if self.locale.is_none() {
                        self.locale = locale;
                    }
                    // A publish stored between the point this connection sees the new
                    // topics from (see `take_topics`) and this follow never came live:
                    // read it from the view.
                    self.cursor.catch_up(self.cursor.lowest_high());
                }
                Step::HeldStored(true) => {} // the catch-up reads again
                Step::HeldStored(false) => {
                    self.cursor.held_gone();
                    self.caught_up();
                }
            }
        }
        Poll::Ready(Ok(()))
    }

    /// The next page of the view after `replay_from`.
    fn read_page(&self) -> InFlight {
        let topics: Vec<TopicSource> = self
            .cursor
            .topics
            .iter()
            .map(|f| TopicSource {
                topic: f.topic.clone(),
                since: f.since,
            })
            .collect();
        let (hub, user, from, pace) = (
            self.hub.clone(),
            self.user.clone(),
            self.cursor.replay_from,
            self.pace.clone(),
        );
        InFlight(Box::pin(async move {
            // Closed only when the gateway is gone: read anyway.
            let _permit = match pace {
                Some(pace) => pace.acquire_owned().await.ok(),
                None => None,
            };
            let inbox = hub.inbox();
            // A read that times out (a loaded store, a reconnect storm) is tried again
            // after a short jittered pause before the feed gives up: giving up closes the
            // connection, and the client's reconnect would cost the store more.
            let page = (|| inbox.after_with_topics(&user, &topics, from, REPLAY_PAGE))
                .retry(
                    ExponentialBuilder::default()
                        .with_min_delay(Duration::from_millis(100))
                        .with_max_times(REPLAY_RETRIES)
                        .with_jitter(),
                )
                .await?;
            Ok(Step::Page(page))
        }))
    }

    fn take_page(&mut self, page: InboxPage) {
        match self.cursor.page(page) {
            Caught::More => {}
            Caught::Up => self.caught_up(),
            Caught::Short(seq) => {
                let round = self.cursor.short_rounds;
                if round > SHORT_ROUNDS {
                    // Each read came from a replica that has not stored what the leader
                    // has had for seconds: end the connection (its client resumes from
                    // its position) rather than wait on it for ever.
                    let e = format!("the inbox replicas stay behind seq {seq}");
                    self.in_flight = Some(InFlight(Box::pin(async move {
                        Err(FeedError::Inbox(InboxError::Unavailable(e.into())))
                    })));
                    return;
                }
                metrics::counter!("herald_gateway_short_catch_ups_total").increment(1);
                let inbox = self.hub.inbox().clone();
                self.in_flight = Some(InFlight(Box::pin(async move {
                    match inbox.entry_at(seq).await {
                        Entry::Stored(_) => {
                            // A replica a few milliseconds behind: give it a moment.
                            let pause = SHORT_PAUSE.saturating_mul(1 << round.min(6));
                            tokio::time::sleep(pause).await;
                            Ok(Step::HeldStored(true))
                        }
                        Entry::Gone => Ok(Step::HeldStored(false)),
                        Entry::Unavailable(e) => {
                            Err(FeedError::Inbox(InboxError::Unavailable(e.into())))
                        }
                    }
                })));
            }
        }
    }

    /// A catch-up has ended.
    fn caught_up(&mut self) {
        // Drops while this read took nothing live say nothing about the client: they
        // are settled after the tap is drained (see `stale_drops`), and a full client
        // queue meanwhile is not a slow client.
        self.stale_drops |= self.live.take_lagged();
        if let Some(replayed) = self.cursor.replayed.take() {
            metrics::histogram!("herald_gateway_replay_size").record(replayed as f64);
        }
    }

    /// Re-reads the user's topic subscriptions after a change (one read covers every
    /// change announced before it starts).
    fn read_topics(&mut self) -> InFlight {
        self.topics_changed = false;
        let (hub, user) = (self.hub.clone(), self.user.clone());
        InFlight(Box::pin(async move {
            let now = hub
                .inbox()
                .subscribed_topics(&user)
                .await
                .map_err(FeedError::Topics)?;
            Ok(Step::Topics(now))
        }))
    }

    /// Follows new topics and stops following those left. New ones are confirmed (and
    /// the locale read, the first time) before the view is read again, which holds
    /// anything published since they subscribed.
    ///
    /// A topic joined mid-connection is seen by this connection from the later of its
    /// `since` and what the connection has handed out: its publishes stored while the
    /// subscription was being written (after `since`, but before this connection heard of
    /// it) may lie below a seq already sent, and sending them now would break the order
    /// a client dedups by. They stay in the user's inbox view: pages (`GET
    /// /v1/me/notifications`, newest first or `after` a position below them) show them.
    fn take_topics(&mut self, now: Vec<TopicSource>) {
        let subjects = self.hub.inbox().subjects().clone();
        let mut confirms = Vec::new();
        for t in &now {
            if self.cursor.topics.iter().all(|f| f.topic != t.topic) {
                confirms.push(self.live.follow_start(subjects.topic_live(&t.topic)));
                self.cursor.join(t);
            }
        }
        let topics = &mut self.cursor.topics;
        let gone: Vec<TopicId> = topics
            .iter()
            .filter(|f| now.iter().all(|t| t.topic != f.topic))
            .map(|f| f.topic.clone())
            .collect();
        for topic in gone {
            self.live.unfollow(&subjects.topic_live(&topic));
            topics.retain(|f| f.topic != topic);
        }
        if confirms.is_empty() {
            return;
        }
        let read_locale = self.locale.is_none();
        let (hub, user) = (self.hub.clone(), self.user.clone());
        self.in_flight = Some(InFlight(Box::pin(async move {
            futures::future::try_join_all(confirms)
                .await
                .map_err(|e| FeedError::Subscribe(Box::new(e)))?;
            let locale = if read_locale {
                Some(hub.inbox().locale_of(&user).await?)
            } else {
                None
            };
            Ok(Step::Followed(locale))
        })));
    }

    /// Whether live messages were dropped for this feed because it was not taking them
    /// (see [`Tap::poll_lagged`]) while it is live; registers the waker for the next drop.
    ///
    /// During a replay or catch-up the feed does not take live messages at all (they are
    /// in the inbox it is reading), so drops then are expected and say nothing about the
    /// client: a client that keeps up with a long replay must not be closed as slow. A
    /// drop still makes the feed read again once the catch-up ends.
    pub fn poll_lagged(&self, cx: &mut Context<'_>) -> bool {
        let dropped = self.live.poll_lagged(cx);
        dropped && !self.cursor.catching_up && self.in_flight.is_none()
    }

    /// The read position announced since the last call, if any.
    pub fn take_read(&mut self) -> Option<u64> {
        self.read_event.take()
    }

    fn on_live(&mut self, live: &Live) {
        let msg = &live.msg;
        let Some(headers) = msg.headers.as_ref() else {
            return;
        };
        let Some(seq) = header_u64(headers, "Nats-Sequence") else {
            if headers.get(TOPICS_HEADER).is_some() {
                // The hub marks announcements apart (`Tap::take_topics_changed`) rather
                // than queue them; one that came this way means the same.
                self.topics_changed = true;
            } else if let Some(up_to) = header_u64(headers, herald_protocol::streams::READ_HEADER)
                && up_to > self.cursor.read_up_to
            {
                self.cursor.read_up_to = up_to;
                self.read_event = Some(up_to);
            }
            return;
        };
        // Which source: the user's own subject, or a big topic they follow.
        let subjects = self.hub.inbox().subjects();
        let (source, floor) = match subjects.topic_of(&msg.subject) {
            None => (None, 0),
            Some(topic) => match self.cursor.topics.iter().find(|f| f.topic == topic) {
                Some(f) => (Some(topic), f.since),
                None => return, // no longer followed
            },
        };
        if seq <= floor || seq <= self.cursor.high(source.as_ref()) {
            return; // before they subscribed, or already handed out
        }
        // Decoded once per gateway (the hub's `Live`), copied per connection.
        let stored = match live.stored() {
            Ok(stored) if source.is_none() && stored.user_id == self.user => stored.clone(),
            Ok(stored)
                if source.is_some()
                    && stored.topic.as_deref() == source.as_ref().map(TopicId::as_str) =>
            {
                for_subscriber(stored.clone(), &self.user)
                    .localize(self.locale.as_ref().and_then(Option::as_deref))
            }
            Ok(_) => return tracing::error!(seq, "live message for another user; dropped"),
            Err(e) => return tracing::warn!(seq, error = %e, "undecodable live message; dropped"),
        };
        let previous = header_u64(headers, "Nats-Last-Sequence").unwrap_or(0);
        self.cursor.live(
            Held {
                seq,
                source,
                stored,
            },
            floor,
            previous,
        );
    }
}

impl Cursor {
    /// Takes a live message of a followed source (`floor`: the seq from which the user
    /// sees it) that is newer than what the source has handed out; `previous` is the seq
    /// of the message stored before it on its subject.
    fn live(&mut self, live: Held, floor: u64, previous: u64) {
        if self.catching_up {
            // Its predecessors are being read from the inbox; it follows them.
            self.hold(live);
            return;
        }
        if previous > floor && previous > self.high(live.source.as_ref()) {
            // A live message of this source was lost (or arrived before the replay saw
            // its predecessor): read the gap from the view, from the last one of this
            // source handed out (other sources may have handed out more), then this one.
            metrics::counter!("herald_gateway_gap_repairs_total").increment(1);
            self.catch_up(self.high(live.source.as_ref()).max(floor));
            self.hold(live);
            return;
        }
        self.push(live.seq, live.source.as_ref(), live.stored);
    }

    /// Follows a topic joined while the connection is open, from the later of the
    /// subscription's `since` and the connection's position (see [`Feed::take_topics`]).
    fn join(&mut self, t: &TopicSource) {
        let since = t.since.max(self.last_sent);
        if since > t.since {
            metrics::counter!("herald_gateway_topic_joins_past_since_total").increment(1);
        }
        self.topics.push(Followed {
            topic: t.topic.clone(),
            since,
            high: since,
        });
    }

    /// Keeps the newest live message while catching up; the older ones are let go (the
    /// catch-up reads them, as it reads everything up to the one held).
    fn hold(&mut self, live: Held) {
        if self.held.as_ref().is_none_or(|held| held.seq < live.seq) {
            self.held = Some(Box::new(live));
        }
    }

    /// Starts (or widens) a catch-up read from the view after `from`.
    fn catch_up(&mut self, from: u64) {
        if !self.catching_up {
            self.replay_from = from;
        }
        self.replay_from = self.replay_from.min(from);
        self.catching_up = true;
    }

    /// Takes a page of the catch-up: hands out what is new per source, and says whether
    /// the catch-up goes on.
    ///
    /// It ends at the first empty page, which means the view holds nothing after
    /// `replay_from` — in the state of the replica that answered. A page's reads all
    /// stop at one replica's state, which holds every message stored before its newest
    /// one (see [`herald_store::Inbox::after`]). So the held live message, stored
    /// before it came live, shows whether that state reached it: if the pages brought
    /// it, they brought everything before it, and the catch-up is over. If not, the
    /// replica that answered is behind the one that sent it live (on a cluster, any
    /// replica answers a direct get), and what is stored just before it — other live
    /// messages let go while it was held — may be missing too: the catch-up is short
    /// ([`Caught::Short`]) and must read again before the held message is handed out.
    fn page(&mut self, page: InboxPage) -> Caught {
        for (seq, stored) in page.items {
            let source = if page.shared.contains(&seq) {
                stored.topic.as_deref().and_then(|t| TopicId::new(t).ok())
            } else {
                None
            };
            self.push(seq, source.as_ref(), stored);
        }
        if let Some((_, last)) = page.read_span {
            // Step past messages that did not decode, too.
            self.replay_from = self.replay_from.max(last);
            self.last_sent = self.last_sent.max(last);
            return Caught::More;
        }
        // Every source has been read up to `replay_from`: nothing at or below it can
        // still be missing, so no later catch-up need start below it (a quiet source
        // would otherwise pull every later one back to where the connection opened).
        self.own_high = self.own_high.max(self.replay_from);
        for f in &mut self.topics {
            f.high = f.high.max(self.replay_from);
        }
        if let Some(held) = &self.held {
            let followed = held
                .source
                .as_ref()
                .is_none_or(|t| self.topics.iter().any(|f| &f.topic == t));
            if followed && held.seq > self.high(held.source.as_ref()) {
                self.short_rounds += 1;
                return Caught::Short(held.seq);
            }
        }
        // Read up to the held message (or it is of a topic no longer followed): handed
        // out by the pages already, or dropped.
        self.held = None;
        self.short_rounds = 0;
        self.catching_up = false;
        Caught::Up
    }

    /// The held message a catch-up fell short of is not stored any more (deleted since
    /// it came live): the catch-up is over without it.
    fn held_gone(&mut self) {
        self.held = None;
        self.short_rounds = 0;
        self.catching_up = false;
    }

    /// The lowest of the sources' highest seqs handed out: a catch-up from here misses
    /// no source (what it reads again is dropped per source).
    fn lowest_high(&self) -> u64 {
        self.topics
            .iter()
            .map(|f| f.high)
            .fold(self.own_high, u64::min)
    }

    /// The highest seq handed out from a source.
    fn high(&self, source: Option<&TopicId>) -> u64 {
        match source {
            None => self.own_high,
            Some(topic) => self
                .topics
                .iter()
                .find(|f| &f.topic == topic)
                .map_or(self.last_sent, |f| f.high),
        }
    }

    /// Hands out a notification of `source` that it has not handed out yet — unless a
    /// greater seq has been handed out already: a connection's seqs only ever grow (a
    /// client dedups by seq, and an SSE `id:` must never move back). Such a notification
    /// is stored, and pages of the view show it; it is not sent on this connection.
    fn push(&mut self, seq: u64, source: Option<&TopicId>, stored: StoredNotification) {
        if seq <= self.high(source) {
            return;
        }
        match source {
            None => self.own_high = seq,
            Some(topic) => {
                if let Some(f) = self.topics.iter_mut().find(|f| &f.topic == topic) {
                    f.high = seq;
                }
            }
        }
        if seq <= self.last_sent {
            metrics::counter!("herald_gateway_below_position_drops_total").increment(1);
            tracing::debug!(
                seq,
                position = self.last_sent,
                "a notification below what this connection sent; left to inbox pages"
            );
            return;
        }
        self.last_sent = seq;
        if let Some(replayed) = &mut self.replayed {
            *replayed += 1;
        }
        self.ready.push_back(Notification::from_stored(
            stored,
            seq,
            seq <= self.read_up_to,
        ));
    }
}

/// How a [`pump`] ended.
#[derive(Debug)]
pub enum PumpEnd {
    /// The connection's queue was full: the client reads too slowly.
    Slow,
    /// The connection went away.
    Closed,
    /// The feed failed (NATS trouble).
    Failed(FeedError),
}

/// Moves a feed into a connection's bounded queue until the client is too slow, the
/// connection goes away, or the feed fails. Runs as its own task, so a connection's other
/// work never cancels an inbox read halfway.
///
/// Backpressure as on the WebSocket ([`crate::ws`]): only what the queue has room for is
/// taken from the feed, so a replay waits for the client; the client is too slow when,
/// with the queue full, the live messages waiting for it overflow the hub's tap too.
pub async fn pump<T>(
    mut feed: Feed,
    queue: tokio::sync::mpsc::Sender<T>,
    frame: impl Fn(Delivery) -> T,
) -> PumpEnd {
    use tokio::sync::mpsc::error::TrySendError;
    loop {
        // One slot stays free for a read position handed out with the notifications.
        let room = queue.capacity().saturating_sub(1);
        let items = if room == 0 {
            // Borrowed mutably: a `&mut Feed` is `Send` where a `&Feed` is not.
            let feed = &mut feed;
            let lagged = std::future::poll_fn(move |cx| {
                if feed.poll_lagged(cx) {
                    std::task::Poll::Ready(())
                } else {
                    std::task::Poll::Pending
                }
            });
            tokio::select! {
                // Room again (the permit is returned at once).
                permit = queue.reserve_many(2) => match permit {
                    Ok(_) => continue,
                    Err(_) => return PumpEnd::Closed,
                },
                () = lagged => {
                    metrics::counter!("herald_gateway_slow_consumer_closes_total").increment(1);
                    return PumpEnd::Slow;
                }
            }
        } else {
            tokio::select! {
                items = feed.next_up_to(room) => match items {
                    Ok(items) => items,
                    Err(e) => return PumpEnd::Failed(e),
                },
                () = queue.closed() => return PumpEnd::Closed,
            }
        };
        let read = feed.take_read().map(Delivery::Read);
        for delivery in items.into_iter().map(Delivery::Notification).chain(read) {
            match queue.try_send(frame(delivery)) {
                Ok(()) => {}
                Err(TrySendError::Full(_)) => {
                    metrics::counter!("herald_gateway_slow_consumer_closes_total").increment(1);
                    return PumpEnd::Slow;
                }
                Err(TrySendError::Closed(_)) => return PumpEnd::Closed,
            }
        }
    }
}

#[cfg(test)]
mod tests {
    //! The feed's decisions over pages as a store would answer them — one a replica behind
    //! the live messages may give — with no NATS: what is handed out, in what order, and
    //! when a catch-up is over.

    use super::*;

    const USER: &str = "ada";

    fn stored(seq: u64, topic: Option<&str>) -> StoredNotification {
        serde_json::from_value(serde_json::json!({
            "id": format!("n{seq}"),
            "user_id": USER,
            "topic": topic,
            "title": format!("#{seq}"),
            "created_at": "2025-01-01T00:00:00Z",
        }))
        .expect("a stored notification")
    }

    fn topic(name: &str) -> TopicId {
        TopicId::new(name).expect("a topic id")
    }

    /// A live-only cursor at `at`, following `topics` (each seen since 0).
    fn cursor(at: u64, topics: &[&str]) -> Cursor {
        Cursor {
            replayed: None,
            last_sent: at,
            own_high: at,
            topics: topics
                .iter()
                .map(|t| Followed {
                    topic: topic(t),
                    since: 0,
                    high: at,
                })
                .collect(),
            replay_from: at,
            read_up_to: 0,
            catching_up: false,
            held: None,
            short_rounds: 0,
            ready: VecDeque::new(),
        }
    }

    /// A page of the view as the store reads it: own seqs, then `(seq, topic)` ones.
    fn page(own: &[u64], shared: &[(u64, &str)]) -> InboxPage {
        let mut items: Vec<(u64, StoredNotification)> =
            own.iter().map(|&seq| (seq, stored(seq, None))).collect();
        items.extend(shared.iter().map(|&(seq, t)| (seq, stored(seq, Some(t)))));
        items.sort_by_key(|(seq, _)| *seq);
        InboxPage {
            read_span: items.first().map(|f| (f.0, items[items.len() - 1].0)),
            shared: shared.iter().map(|s| s.0).collect(),
            has_more: false,
            items,
        }
    }

    fn live(c: &mut Cursor, seq: u64, source: Option<&str>, previous: u64) {
        c.live(
            Held {
                seq,
                source: source.map(topic),
                stored: stored(seq, source),
            },
            0,
            previous,
        );
    }

    fn taken(c: &mut Cursor) -> Vec<u64> {
        std::mem::take(&mut c.ready).iter().map(|n| n.seq).collect()
    }

    #[test]
    fn a_catch_up_answered_by_a_replica_behind_does_not_hand_out_the_held_message() {
        // Delivered up to 5 live; 6..=9 lost (the tap overflowed): a catch-up starts.
        let mut c = cursor(5, &[]);
        c.catch_up(c.lowest_high());
        // While it reads, 10, 11 and 12 come live: 12 is held, 10 and 11 let go.
        live(&mut c, 10, None, 9);
        live(&mut c, 11, None, 10);
        live(&mut c, 12, None, 11);
        assert_eq!(c.held.as_ref().map(|h| h.seq), Some(12));
        // The replica that answers has stored up to 9.
        assert_eq!(c.page(page(&[6, 7, 8, 9], &[])), Caught::More);
        assert_eq!(
            c.page(page(&[], &[])),
            Caught::Short(12),
            "10 and 11 unread"
        );
        assert_eq!(taken(&mut c), [6, 7, 8, 9], "12 waits for 10 and 11");
        assert!(c.catching_up);
        // Read again (from where the pages got to), from a replica that has them all.
        assert_eq!(c.replay_from, 9);
        assert_eq!(c.page(page(&[10, 11, 12], &[])), Caught::More);
        assert_eq!(c.page(page(&[], &[])), Caught::Up);
        assert_eq!(taken(&mut c), [10, 11, 12]);
        assert!(!c.catching_up && c.held.is_none() && c.short_rounds == 0);
        // Live again: the next one is handed out at once.
        live(&mut c, 13, None, 12);
        assert_eq!(taken(&mut c), [13]);
    }

    #[test]
    fn a_gap_is_read_from_the_last_one_its_source_handed_out() {
        // A big topic handed out up to 5; the user's own subject up to 20 since.
        let mut c = cursor(5, &["news"]);
        live(&mut c, 20, None, 5);
        assert_eq!(taken(&mut c), [20]);
        // The topic's 24 and 25 were lost live; 30 arrives, stored after 25.
        live(&mut c, 30, Some("news"), 25);
        assert!(c.catching_up);
        assert_eq!(
            c.replay_from, 5,
            "the topic's gap begins after its 5, not at 24"
        );
        // The view after 5: the own 20 again (dropped), the topic's 24, 25 and 30.
        assert_eq!(
            c.page(page(&[20], &[(24, "news"), (25, "news"), (30, "news")])),
            Caught::More
        );
        assert_eq!(c.page(page(&[], &[])), Caught::Up);
        assert_eq!(taken(&mut c), [24, 25, 30]);
    }

    #[test]
    fn a_gap_repair_that_reads_nothing_new_holds_the_live_message_back() {
        let mut c = cursor(5, &[]);
        // 7 arrives, stored after 6, which this connection never saw; the replica that
        // answers the repair has neither yet.
        live(&mut c, 7, None, 6);
        assert_eq!(c.page(page(&[], &[])), Caught::Short(7));
        assert!(taken(&mut c).is_empty());
        assert_eq!(c.page(page(&[6, 7], &[])), Caught::More);
        assert_eq!(c.page(page(&[], &[])), Caught::Up);
        assert_eq!(taken(&mut c), [6, 7]);
    }

    #[test]
    fn a_held_message_deleted_since_ends_the_catch_up_without_it() {
        let mut c = cursor(5, &[]);
        live(&mut c, 7, None, 6);
        assert_eq!(c.page(page(&[], &[])), Caught::Short(7));
        c.held_gone();
        assert!(!c.catching_up && c.held.is_none());
        assert!(taken(&mut c).is_empty());
    }

    #[test]
    fn a_topic_joined_mid_connection_is_seen_from_the_connections_position() {
        // 103 (the user's own) went out live while the user subscribed to `news`: the
        // subscription's `since` is 101, and `news` stored 102 before this connection
        // heard of it (and followed the topic live).
        let mut c = cursor(103, &[]);
        c.join(&TopicSource {
            topic: topic("news"),
            since: 101,
        });
        c.catch_up(c.lowest_high());
        // A view read from 101 (as a store reads it, the topic from its `since`).
        assert_eq!(
            c.page(page(&[103], &[(102, "news"), (104, "news")])),
            Caught::More
        );
        assert_eq!(c.page(page(&[], &[])), Caught::Up);
        assert_eq!(
            taken(&mut c),
            [104],
            "102 is below what was sent: pages only"
        );
        // Live, the topic goes on from there.
        live(&mut c, 105, Some("news"), 104);
        live(&mut c, 106, None, 103);
        assert_eq!(taken(&mut c), [105, 106]);
    }

    #[test]
    fn nothing_below_what_was_handed_out_is_handed_out() {
        // A source that has handed out less than the connection (a topic followed from
        // its `since`) brings a seq below the position: it is not sent.
        let mut c = cursor(103, &[]);
        c.topics.push(Followed {
            topic: topic("news"),
            since: 101,
            high: 101,
        });
        c.catch_up(c.lowest_high());
        assert_eq!(c.replay_from, 101);
        assert_eq!(c.page(page(&[103], &[(102, "news")])), Caught::More);
        assert_eq!(c.page(page(&[], &[])), Caught::Up);
        assert!(taken(&mut c).is_empty(), "102 after 103 breaks the order");
        assert_eq!(c.last_sent, 103);
        live(&mut c, 104, Some("news"), 102);
        assert_eq!(
            taken(&mut c),
            [104],
            "and the topic goes on, with no gap repair"
        );
        assert!(!c.catching_up);
    }

    #[test]
    fn a_held_message_of_a_topic_left_meanwhile_is_dropped() {
        let mut c = cursor(5, &["news"]);
        live(&mut c, 9, Some("news"), 8);
        c.topics.clear(); // unsubscribed while the repair read
        assert_eq!(c.page(page(&[], &[])), Caught::Up);
        assert!(taken(&mut c).is_empty());
    }
}
