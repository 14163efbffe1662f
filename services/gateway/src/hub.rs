//! One NATS subscription per partition for every connection of this gateway, and one per
//! big topic while a local connection follows it.
//!
//! A subscription per connection costs a subscription id, an unbounded-looking channel in
//! the client and interest on the server per socket; with tens of thousands of idle
//! sockets that dominates memory. Instead the hub subscribes once to each partition's live
//! subjects at start (confirmed by a flush, so "subscribe before replay" still holds: a
//! connection registers in the map before its replay reads the inbox) and dispatches each
//! message to the connections registered under its subject. A registration is removed
//! when its [`Tap`] is dropped.
//!
//! Big topics: a connection whose user follows a big topic also registers under the
//! topic's live subject ([`Tap::follow`]). The hub subscribes to that subject when the
//! first local connection follows it and unsubscribes when the last one goes (counted
//! per topic), so a gateway receives a big topic's publishes only while it holds an
//! online subscriber — one message per gateway, dispatched to every local follower.
//!
//! One dispatcher task serves every subscription, and hands messages out in stream
//! sequence order: the client reads them off one connection in the server's order and
//! queues them per subscription, so after taking one message the dispatcher drains every
//! subscription until a full pass finds nothing, then sorts what it took by
//! `Nats-Sequence`. A personal notification and a topic publish stored an instant apart
//! therefore reach a connection in `seq` order even though they came through two
//! subscriptions.
//!
//! Each tap has a small bounded queue; the dispatcher never waits on a connection. When a
//! tap's queue is full the message is dropped and the tap is marked lagged; its feed then
//! re-reads the inbox from its position (the inbox holds everything live delivers), so a
//! busy user costs a catch-up read, never a lost notification or a stalled dispatcher.
//! An announcement that the user's topics changed is stored nowhere, so it is not queued
//! (where a full queue would drop it, and a catch-up would read past what it announces
//! before the feed took it): the tap is marked, and its feed re-reads the topics first.

use crate::queue::{PushError, Queue};
use async_nats::Message;
use dashmap::DashMap;
use futures::FutureExt as _;
use futures::StreamExt as _;
use herald_protocol::StoredNotification;
use herald_store::Inbox;
use herald_store::direct::header_u64;
use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::task::Poll;
use tokio::sync::{OnceCell, mpsc};
use tokio_stream::StreamMap;

/// Live messages queued per connection before it counts as lagged.
const TAP_QUEUE: usize = 64;

/// The live subscriptions of one gateway process.
#[derive(Debug, Clone)]
pub struct Hub {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    /// The inbox feeds replay from (one copy per process, not per connection).
    inbox: Inbox,
    /// Live subject → connections that want it.
    routes: DashMap<String, Slots>,
    next_id: AtomicU64,
    /// Set when a subscription ended (NATS client closed for good).
    closed: AtomicBool,
    /// Big topics' live subjects followed by local connections: how many, and whether
    /// the subscription is confirmed.
    topics: Mutex<HashMap<String, Followed>>,
    /// Adds and removes the dispatcher's topic subscriptions.
    control: mpsc::UnboundedSender<Control>,
    /// The connection the hub subscribes on.
    client: async_nats::Client,
}

#[derive(Debug)]
struct Followed {
    taps: usize,
    subscribed: Arc<OnceCell<()>>,
}

enum Control {
    Add(String, async_nats::Subscriber),
    Remove(String),
}

impl std::fmt::Debug for Control {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Control::Add(s, _) => write!(f, "Add({s})"),
            Control::Remove(s) => write!(f, "Remove({s})"),
        }
    }
}

/// One registration of a tap under a subject (a tap has one for its user and one per
/// followed topic, all sharing its queue).
#[derive(Debug)]
struct Slot {
    id: u64,
    tap: Arc<TapQueue>,
}

/// The taps registered under one subject. Most subjects are a user's, with a device or
/// three: a short vector. A big topic's live subject may hold every local connection
/// (tens of thousands), where removing one must not scan them all (a gateway's
/// connections leaving at once would cost the square of their number): a map by tap id.
#[derive(Debug)]
enum Slots {
    Few(Vec<Slot>),
    Many(HashMap<u64, Arc<TapQueue>>),
}

/// Above this many taps a subject's slots become a map.
const FEW: usize = 16;

impl Default for Slots {
    fn default() -> Self {
        Slots::Few(Vec::new())
    }
}

impl Slots {
    fn push(&mut self, id: u64, tap: Arc<TapQueue>) {
        match self {
            Slots::Few(few) if few.len() < FEW => few.push(Slot { id, tap }),
            Slots::Few(few) => {
                let mut many: HashMap<u64, Arc<TapQueue>> =
                    few.drain(..).map(|s| (s.id, s.tap)).collect();
                many.insert(id, tap);
                *self = Slots::Many(many);
            }
            Slots::Many(many) => {
                many.insert(id, tap);
            }
        }
    }

    fn remove(&mut self, id: u64) {
        match self {
            Slots::Few(few) => few.retain(|s| s.id != id),
            Slots::Many(many) => {
                many.remove(&id);
            }
        }
    }

    fn is_empty(&self) -> bool {
        match self {
            Slots::Few(few) => few.is_empty(),
            Slots::Many(many) => many.is_empty(),
        }
    }

    fn taps(&self) -> impl Iterator<Item = &Arc<TapQueue>> {
        let (few, many) = match self {
            Slots::Few(few) => (Some(few.iter().map(|s| &s.tap)), None),
            Slots::Many(many) => (None, Some(many.values())),
        };
        few.into_iter().flatten().chain(many.into_iter().flatten())
    }
}

/// What the hub and one connection share: a light queue (an idle connection holds tens
/// of thousands of these, see [`crate::queue`]) and the lagged mark.
#[derive(Debug)]
struct TapQueue {
    queue: Queue<Arc<Live>>,
    /// The hub dropped a message for this tap (its queue was full).
    lagged: AtomicBool,
    /// The hub's NATS connection may have lost messages for every tap (a reconnect, a
    /// slow-consumer drop): re-read, but this connection is not slow.
    resync: AtomicBool,
    /// The user's topic subscriptions changed (announced on their live subject). Kept
    /// apart from the queue: an announcement carries no data, so it neither waits behind
    /// the messages queued before it nor is dropped with them when the queue is full.
    topics: AtomicBool,
}

/// A live message as the hub hands it to every tap registered under its subject. The
/// stored notification it carries is decoded at most once, however many local
/// connections follow the subject: one publish to a big topic reaches thousands of them.
#[derive(Debug)]
pub struct Live {
    /// The message as NATS delivered it.
    pub msg: Message,
    decoded: OnceLock<Result<StoredNotification, String>>,
}

impl Live {
    fn new(msg: Message) -> Self {
        Self {
            msg,
            decoded: OnceLock::new(),
        }
    }

    /// The stored notification in the payload, decoded on first use; why it is not one.
    ///
    /// # Errors
    /// The decoding error, when the payload is not a stored notification.
    pub fn stored(&self) -> Result<&StoredNotification, &str> {
        self.decoded
            .get_or_init(|| {
                let stored = serde_json::from_slice::<StoredNotification>(&self.msg.payload);
                if let Ok(stored) = &stored {
                    record_live_delay(&stored.created_at);
                }
                stored.map_err(|e| e.to_string())
            })
            .as_ref()
            .map_err(String::as_str)
    }
}

/// Accepted → live at this gateway (the router's republish and the hub included; the
/// writes to the sockets follow at once unless a client is slow). Recorded once per
/// message and gateway, when the message is first decoded for a local connection.
fn record_live_delay(created_at: &str) {
    let format = &time::format_description::well_known::Rfc3339;
    if let Ok(created) = time::OffsetDateTime::parse(created_at, format) {
        let delay = (time::OffsetDateTime::now_utc() - created).as_seconds_f64();
        metrics::histogram!("herald_gateway_live_delay_seconds").record(delay.max(0.0));
    }
}

/// The hub could not subscribe.
#[derive(Debug, thiserror::Error)]
#[error("subscribing to live subjects")]
pub struct HubError(#[source] Box<dyn std::error::Error + Send + Sync>);

/// One connection's view of its user's live subject and the big topics they follow.
#[derive(Debug)]
pub struct Tap {
    shared: Arc<TapQueue>,
    inner: Arc<Inner>,
    key: String,
    /// Topic live subjects this tap follows.
    topics: Vec<String>,
    id: u64,
}

impl Tap {
    /// The next live message; `None` when the hub's subscriptions ended.
    pub async fn recv(&mut self) -> Option<Arc<Live>> {
        self.shared.queue.pop().await
    }

    /// [`Tap::recv`] for hand-written futures.
    pub fn poll_recv(&mut self, cx: &mut std::task::Context<'_>) -> Poll<Option<Arc<Live>>> {
        self.shared.queue.poll_pop(cx)
    }

    /// Whether live messages may be missing since the last call — dropped for this tap,
    /// or lost by the hub's connection — so the inbox must be re-read.
    pub fn take_lagged(&self) -> bool {
        let dropped = self.shared.lagged.swap(false, Ordering::AcqRel);
        self.shared.resync.swap(false, Ordering::AcqRel) || dropped
    }

    /// Whether the user's topic subscriptions were announced as changed since the last
    /// call (the hub marks it as the announcement arrives, ahead of any message queued).
    pub fn take_topics_changed(&self) -> bool {
        self.shared.topics.load(Ordering::Acquire)
            && self.shared.topics.swap(false, Ordering::AcqRel)
    }

    /// Whether messages were dropped (without clearing it); registers the waker, which
    /// the hub wakes when it drops one.
    pub fn poll_lagged(&self, cx: &mut std::task::Context<'_>) -> bool {
        self.shared.queue.register(cx);
        self.shared.lagged.load(Ordering::Acquire)
    }
}

impl Tap {
    /// Follows a big topic's live subject: registers this tap under it, and subscribes
    /// the hub to it unless a local connection already does. Returns once the
    /// subscription is confirmed (so a replay read afterwards misses nothing).
    ///
    /// # Errors
    /// [`HubError`] when NATS refuses or does not answer.
    pub async fn follow(&mut self, subject: String) -> Result<(), HubError> {
        self.follow_start(subject).await
    }

    /// [`Tap::follow`] in two halves: registers this tap now, and returns the wait for
    /// the hub's subscription to be confirmed as a future that borrows nothing (a feed
    /// keeps it across polls).
    pub fn follow_start(
        &mut self,
        subject: String,
    ) -> impl Future<Output = Result<(), HubError>> + Send + 'static {
        let confirm = (!self.topics.contains(&subject)).then(|| {
            register(&self.inner, &subject, self.id, &self.shared);
            let subscribed = {
                let mut topics = self.inner.topics.lock().unwrap_or_else(|e| e.into_inner());
                let followed = topics.entry(subject.clone()).or_insert_with(|| Followed {
                    taps: 0,
                    subscribed: Arc::new(OnceCell::new()),
                });
                followed.taps += 1;
                followed.subscribed.clone()
            };
            // Counted before subscribing, so a failure or cancellation is undone by `drop`.
            self.topics.push(subject.clone());
            (subscribed, self.inner.clone(), subject)
        });
        async move {
            let Some((subscribed, inner, subject)) = confirm else {
                return Ok(());
            };
            subscribed
                .get_or_try_init(|| async move {
                    let sub = inner
                        .client
                        .subscribe(subject.clone())
                        .await
                        .map_err(|e| HubError(Box::new(e)))?;
                    inner
                        .client
                        .flush()
                        .await
                        .map_err(|e| HubError(Box::new(e)))?;
                    inner
                        .control
                        .send(Control::Add(subject, sub))
                        .map_err(|_| HubError("live subscriptions ended".into()))?;
                    metrics::gauge!("herald_gateway_topics_followed").increment(1.0);
                    Ok::<_, HubError>(())
                })
                .await?;
            Ok(())
        }
    }

    /// Stops following a big topic's live subject.
    pub fn unfollow(&mut self, subject: &str) {
        if let Some(i) = self.topics.iter().position(|t| t == subject) {
            let subject = self.topics.swap_remove(i);
            unregister(&self.inner, &subject, self.id);
            release(&self.inner, &subject);
        }
    }

    /// The topic live subjects followed.
    pub fn following(&self) -> &[String] {
        &self.topics
    }
}

fn register(inner: &Inner, key: &str, id: u64, tap: &Arc<TapQueue>) {
    inner
        .routes
        .entry(key.to_owned())
        .or_default()
        .push(id, tap.clone());
}

fn unregister(inner: &Inner, key: &str, id: u64) {
    let now_empty = match inner.routes.get_mut(key) {
        Some(mut slots) => {
            slots.remove(id);
            slots.is_empty()
        }
        None => false,
    };
    if now_empty {
        inner.routes.remove_if(key, |_, slots| slots.is_empty());
    }
}

/// One follower of a topic fewer; the last one unsubscribes the hub.
fn release(inner: &Inner, subject: &str) {
    let mut topics = inner.topics.lock().unwrap_or_else(|e| e.into_inner());
    let last = topics.get_mut(subject).is_some_and(|f| {
        f.taps -= 1;
        f.taps == 0
    });
    if last {
        let was_subscribed = topics
            .remove(subject)
            .is_some_and(|f| f.subscribed.initialized());
        if was_subscribed {
            metrics::gauge!("herald_gateway_topics_followed").decrement(1.0);
        }
        let _ = inner.control.send(Control::Remove(subject.to_owned()));
    }
}

impl Drop for Tap {
    fn drop(&mut self) {
        unregister(&self.inner, &self.key, self.id);
        for subject in std::mem::take(&mut self.topics) {
            unregister(&self.inner, &subject, self.id);
            release(&self.inner, &subject);
        }
    }
}

impl Hub {
    /// Subscribes to every partition's live subjects on the inbox's consume connection and
    /// starts dispatching. Returns once the server has confirmed the subscriptions.
    ///
    /// # Errors
    /// [`HubError`] when NATS refuses or does not answer.
    pub async fn start(inbox: Inbox) -> Result<Hub, HubError> {
        let client = inbox.nats().consume.clone();
        let subjects = inbox.subjects().clone();
        let (control, control_rx) = mpsc::unbounded_channel();
        let inner = Arc::new(Inner {
            inbox,
            routes: DashMap::new(),
            next_id: AtomicU64::new(0),
            closed: AtomicBool::new(false),
            topics: Mutex::new(HashMap::new()),
            control,
            client: client.clone(),
        });
        let mut subs = StreamMap::new();
        for partition in 0..subjects.partitions() {
            let subject = subjects.live_partition(partition);
            let sub = client
                .subscribe(subject.clone())
                .await
                .map_err(|e| HubError(Box::new(e)))?;
            subs.insert(subject, sub);
        }
        client.flush().await.map_err(|e| HubError(Box::new(e)))?;
        let mut losses = inner.inbox.nats().losses.clone();
        losses.borrow_and_update();
        tokio::spawn(dispatch(subs, control_rx, losses, inner.clone()));
        Ok(Hub { inner })
    }

    /// The inbox feeds read from.
    pub fn inbox(&self) -> &Inbox {
        &self.inner.inbox
    }

    /// Registers a connection for `subject`; messages published from now on reach the tap.
    ///
    /// # Errors
    /// [`HubError`] when the hub's subscriptions have ended.
    pub fn tap(&self, subject: String) -> Result<Tap, HubError> {
        if self.inner.closed.load(Ordering::Acquire) {
            return Err(HubError("live subscriptions ended".into()));
        }
        let shared = Arc::new(TapQueue {
            queue: Queue::new(TAP_QUEUE),
            lagged: AtomicBool::new(false),
            resync: AtomicBool::new(false),
            topics: AtomicBool::new(false),
        });
        let id = self.inner.next_id.fetch_add(1, Ordering::Relaxed);
        register(&self.inner, &subject, id, &shared);
        Ok(Tap {
            shared,
            inner: self.inner.clone(),
            key: subject,
            topics: Vec::new(),
            id,
        })
    }

    /// Live subjects with at least one local connection.
    pub fn subjects_tapped(&self) -> usize {
        self.inner.routes.len()
    }

    /// Whether a local connection is registered for `subject`.
    pub fn is_tapped(&self, subject: &str) -> bool {
        self.inner.routes.contains_key(subject)
    }

    /// Big-topic live subjects this gateway is subscribed to.
    pub fn topics_followed(&self) -> usize {
        self.inner
            .topics
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .len()
    }
}

/// Most messages taken from the subscriptions before they are sorted and handed out.
const DISPATCH_BATCH: usize = 4096;

async fn dispatch(
    mut subs: StreamMap<String, async_nats::Subscriber>,
    mut control: mpsc::UnboundedReceiver<Control>,
    mut losses: tokio::sync::watch::Receiver<u64>,
    inner: Arc<Inner>,
) {
    let mut batch: Vec<Message> = Vec::new();
    let mut watching = true;
    loop {
        let first = tokio::select! {
            biased;
            c = control.recv() => {
                match c {
                    Some(Control::Add(subject, sub)) => { subs.insert(subject, sub); }
                    Some(Control::Remove(subject)) => { subs.remove(&subject); }
                    None => {}
                }
                continue;
            }
            lost = losses.changed(), if watching => {
                match lost {
                    Ok(()) => resync_all(&inner),
                    // The connection is gone for good; the subscriptions end with it.
                    Err(_) => watching = false,
                }
                continue;
            }
            next = subs.next() => next,
        };
        let Some((_, msg)) = first else { break };
        batch.push(msg);
        // Whatever was queued before the last message taken is in some subscription's
        // queue by now: drain until a full pass finds nothing, then hand out in order.
        loop {
            let mut took = false;
            for (_, sub) in subs.iter_mut() {
                while batch.len() < DISPATCH_BATCH
                    && let Some(Some(msg)) = sub.next().now_or_never()
                {
                    batch.push(msg);
                    took = true;
                }
            }
            if !took || batch.len() >= DISPATCH_BATCH {
                break;
            }
        }
        // Every gateway receives every partition's live messages; most are for users
        // connected elsewhere, or nowhere. Those are dropped before the sort, which reads
        // each message's sequence header once (not once per comparison).
        batch.retain(|m| inner.routes.contains_key(m.subject.as_str()));
        if batch.len() > 1 {
            // Stable: announcements without a sequence keep their place among equals.
            batch.sort_by_cached_key(|m| {
                m.headers
                    .as_ref()
                    .and_then(|h| header_u64(h, "Nats-Sequence"))
                    .unwrap_or(0)
            });
        }
        for msg in batch.drain(..) {
            deliver(&inner, msg);
        }
    }
    // The client is gone for good: end every feed (they close with 1011 and clients
    // reconnect elsewhere). It reconnects without limit, so only a close ends its
    // subscriptions: the process stopping (a mesh drains its connections last).
    tracing::info!("the NATS connection was closed; closing local feeds");
    inner.closed.store(true, Ordering::Release);
    for slots in inner.routes.iter() {
        for tap in slots.taps() {
            tap.queue.close();
        }
    }
    inner.routes.clear();
}

/// The connection may have lost live messages (it reconnected, or the client dropped
/// some): every feed re-reads its inbox from the lowest position any of its sources has
/// handed out (its own entries, each followed topic). Messages published
/// while it was away never arrive live, and a gap across a user's lanes cannot be seen
/// from the next message's `Nats-Last-Sequence` (that is per lane).
fn resync_all(inner: &Inner) {
    let mut taps = 0_usize;
    for slots in inner.routes.iter() {
        for tap in slots.taps() {
            tap.resync.store(true, Ordering::Release);
            tap.queue.wake();
            taps += 1;
        }
    }
    metrics::counter!("herald_gateway_resyncs_total").increment(1);
    tracing::info!(
        taps,
        "live messages may have been lost by NATS; every feed re-reads its inbox"
    );
}

fn deliver(inner: &Inner, msg: Message) {
    let Some(slots) = inner.routes.get(msg.subject.as_str()) else {
        return;
    };
    if is_topics_announcement(&msg) {
        // Marked, not queued: a feed learns of it before taking anything queued, even
        // mid catch-up, and a full queue does not lose it.
        for tap in slots.taps() {
            tap.topics.store(true, Ordering::Release);
            tap.queue.wake();
        }
        return;
    }
    let msg = Arc::new(Live::new(msg));
    for tap in slots.taps() {
        if let Err(PushError::Full) = tap.queue.try_push(msg.clone()) {
            tap.lagged.store(true, Ordering::Release);
            // A consumer that stopped taking (its connection's queue is full) learns it.
            tap.queue.wake();
            metrics::counter!("herald_gateway_hub_drops_total").increment(1);
        }
    }
}

/// Whether a message on a user's live subject announces that their topic subscriptions
/// changed (no sequence: it is not stored).
fn is_topics_announcement(msg: &Message) -> bool {
    msg.headers.as_ref().is_some_and(|h| {
        h.get(herald_protocol::topic::TOPICS_HEADER).is_some() && h.get("Nats-Sequence").is_none()
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tap() -> Arc<TapQueue> {
        Arc::new(TapQueue {
            queue: Queue::new(1),
            lagged: AtomicBool::new(false),
            resync: AtomicBool::new(false),
            topics: AtomicBool::new(false),
        })
    }

    #[test]
    fn slots_grow_into_a_map_and_remove_exactly_the_tap_named() {
        let mut slots = Slots::default();
        let taps: Vec<Arc<TapQueue>> = (0..40).map(|_| tap()).collect();
        for (id, t) in taps.iter().enumerate().take(FEW) {
            slots.push(id as u64, t.clone());
        }
        assert!(matches!(slots, Slots::Few(_)));
        for (id, t) in taps.iter().enumerate().skip(FEW) {
            slots.push(id as u64, t.clone());
        }
        assert!(matches!(slots, Slots::Many(_)));
        assert_eq!(slots.taps().count(), 40);
        for id in (0..40).filter(|id| id % 2 == 0) {
            slots.remove(id);
        }
        // Exactly the odd taps are left.
        let left: Vec<usize> = slots
            .taps()
            .filter_map(|t| taps.iter().position(|x| Arc::ptr_eq(x, t)))
            .collect();
        assert_eq!(left.len(), 20);
        assert!(left.iter().all(|i| i % 2 == 1));
        for id in (0..40).filter(|id| id % 2 == 1) {
            slots.remove(id);
        }
        assert!(slots.is_empty());
    }
}
