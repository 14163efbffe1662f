//! One NATS subscription per partition for every connection of this gateway.
//!
//! A subscription per connection costs a subscription id, an unbounded-looking channel in
//! the client and interest on the server per socket; with tens of thousands of idle
//! sockets that dominates memory. Instead the hub subscribes once to each partition's live
//! subjects at start (confirmed by a flush, so "subscribe before replay" still holds: a
//! connection registers in the map before its replay reads the inbox) and dispatches each
//! message to the connections registered under its subject. A registration is removed
//! when its [`Tap`] is dropped.
//!
//! Each tap has a small bounded queue; the dispatcher never waits on a connection. When a
//! tap's queue is full the message is dropped and the tap is marked lagged; its feed then
//! re-reads the inbox from its position (the inbox holds everything live delivers), so a
//! busy user costs a catch-up read, never a lost notification or a stalled dispatcher.

use crate::queue::{PushError, Queue};
use async_nats::Message;
use dashmap::DashMap;
use futures::StreamExt as _;
use herald_store::Inbox;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

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
    routes: DashMap<String, Vec<Slot>>,
    next_id: AtomicU64,
    /// Set when a subscription ended (NATS client closed for good).
    closed: AtomicBool,
}

#[derive(Debug)]
struct Slot {
    id: u64,
    tap: Arc<TapQueue>,
}

impl Drop for Slot {
    /// The hub let go of this connection (its subscriptions ended): its feed sees the end.
    fn drop(&mut self) {
        self.tap.queue.close();
    }
}

/// What the hub and one connection share: a light queue (an idle connection holds tens
/// of thousands of these, see [`crate::queue`]) and the lagged mark.
#[derive(Debug)]
struct TapQueue {
    queue: Queue<Arc<Message>>,
    lagged: AtomicBool,
}

/// The hub could not subscribe.
#[derive(Debug, thiserror::Error)]
#[error("subscribing to live subjects")]
pub struct HubError(#[source] Box<dyn std::error::Error + Send + Sync>);

/// One connection's view of its user's live subject.
#[derive(Debug)]
pub struct Tap {
    shared: Arc<TapQueue>,
    inner: Arc<Inner>,
    key: String,
    id: u64,
}

impl Tap {
    /// The next live message; `None` when the hub's subscriptions ended.
    pub async fn recv(&mut self) -> Option<Arc<Message>> {
        self.shared.queue.pop().await
    }

    /// Whether messages were dropped since the last call (then re-read the inbox).
    pub fn take_lagged(&self) -> bool {
        self.shared.lagged.swap(false, Ordering::AcqRel)
    }
}

impl Drop for Tap {
    fn drop(&mut self) {
        let now_empty = match self.inner.routes.get_mut(&self.key) {
            Some(mut slots) => {
                slots.retain(|s| s.id != self.id);
                slots.is_empty()
            }
            None => false,
        };
        if now_empty {
            self.inner
                .routes
                .remove_if(&self.key, |_, slots| slots.is_empty());
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
        let inner = Arc::new(Inner {
            inbox,
            routes: DashMap::new(),
            next_id: AtomicU64::new(0),
            closed: AtomicBool::new(false),
        });
        let mut subs = Vec::with_capacity(usize::from(subjects.partitions()));
        for partition in 0..subjects.partitions() {
            let sub = client
                .subscribe(subjects.live_partition(partition))
                .await
                .map_err(|e| HubError(Box::new(e)))?;
            subs.push(sub);
        }
        client.flush().await.map_err(|e| HubError(Box::new(e)))?;
        for sub in subs {
            tokio::spawn(dispatch(sub, inner.clone()));
        }
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
        });
        let id = self.inner.next_id.fetch_add(1, Ordering::Relaxed);
        self.inner
            .routes
            .entry(subject.clone())
            .or_default()
            .push(Slot {
                id,
                tap: shared.clone(),
            });
        Ok(Tap {
            shared,
            inner: self.inner.clone(),
            key: subject,
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
}

async fn dispatch(mut sub: async_nats::Subscriber, inner: Arc<Inner>) {
    while let Some(msg) = sub.next().await {
        let Some(slots) = inner.routes.get(msg.subject.as_str()) else {
            continue;
        };
        let msg = Arc::new(msg);
        for slot in slots.iter() {
            if let Err(PushError::Full) = slot.tap.queue.try_push(msg.clone()) {
                slot.tap.lagged.store(true, Ordering::Release);
                metrics::counter!("herald_gateway_hub_drops_total").increment(1);
            }
        }
    }
    // The client is gone for good: end every feed (they close with 1011 and clients
    // reconnect elsewhere).
    tracing::error!("live subscription ended; closing local feeds");
    inner.closed.store(true, Ordering::Release);
    inner.routes.clear();
}
