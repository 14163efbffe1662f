//! A small bounded single-consumer queue, for what every idle connection holds.
//!
//! A tokio `mpsc` channel costs about 1 KiB before its first message: two cache-padded
//! (128-byte) fields, a semaphore and a first block of 32 slots, allocated up front. With
//! tens of thousands of idle sockets, the queue from the hub to each connection would be
//! a large share of the gateway's memory. This queue is a `VecDeque` behind a mutex,
//! allocated on the first push and released when drained, and an [`AtomicWaker`] for its
//! one consumer: under 100 bytes when idle.
//!
//! Producers never wait: [`Queue::try_push`] fails when the queue is full or closed.
//! One consumer waits in [`Queue::pop`], or polls [`Queue::poll_pop`] from a hand-written
//! future (both cancel-safe: an item is only taken when returned).

use futures::task::AtomicWaker;
use std::collections::VecDeque;
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, Ordering};
use std::task::{Context, Poll};

/// A bounded queue shared by producers and one consumer (wrap it in an `Arc`).
#[derive(Debug)]
pub struct Queue<T> {
    items: Mutex<VecDeque<T>>,
    capacity: usize,
    /// Wakes the consumer (a push or a close).
    ready: AtomicWaker,
    closed: AtomicBool,
}

/// Why [`Queue::try_push`] refused an item.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PushError {
    /// The queue holds `capacity` items.
    Full,
    /// The queue was closed.
    Closed,
}

impl<T> Queue<T> {
    /// An empty queue that holds at most `capacity` items (at least one).
    pub fn new(capacity: usize) -> Self {
        Self {
            items: Mutex::new(VecDeque::new()),
            capacity: capacity.max(1),
            ready: AtomicWaker::new(),
            closed: AtomicBool::new(false),
        }
    }

    fn items(&self) -> std::sync::MutexGuard<'_, VecDeque<T>> {
        // A panic while holding the lock leaves a valid VecDeque: keep going.
        self.items
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Adds an item without waiting.
    ///
    /// # Errors
    /// [`PushError::Full`] at capacity, [`PushError::Closed`] once closed.
    pub fn try_push(&self, item: T) -> Result<(), PushError> {
        if self.is_closed() {
            return Err(PushError::Closed);
        }
        {
            let mut items = self.items();
            if items.len() >= self.capacity {
                return Err(PushError::Full);
            }
            items.push_back(item);
        }
        self.ready.wake();
        Ok(())
    }

    /// Takes the oldest item, if any, without waiting. Items pushed before a close are
    /// still handed out.
    pub fn try_pop(&self) -> Option<T> {
        let mut items = self.items();
        let item = items.pop_front();
        if items.is_empty() && items.capacity() > 0 {
            // An idle connection keeps no buffer.
            *items = VecDeque::new();
        }
        item
    }

    /// Waits for the oldest item; `None` once the queue is closed and drained.
    pub async fn pop(&self) -> Option<T> {
        std::future::poll_fn(|cx| self.poll_pop(cx)).await
    }

    /// The oldest item, `None` once the queue is closed and drained, or `Pending` with
    /// the consumer's waker registered. Only one consumer may poll.
    pub fn poll_pop(&self, cx: &mut Context<'_>) -> Poll<Option<T>> {
        if let Some(item) = self.try_pop() {
            return Poll::Ready(Some(item));
        }
        self.ready.register(cx.waker());
        // Checked again after registering: a push in between woke the old waker.
        match self.try_pop() {
            Some(item) => Poll::Ready(Some(item)),
            None if self.is_closed() => Poll::Ready(None),
            None => Poll::Pending,
        }
    }

    /// Registers the consumer's waker without taking anything (to be woken by the next
    /// push or [`Queue::wake`]).
    pub fn register(&self, cx: &mut Context<'_>) {
        self.ready.register(cx.waker());
    }

    /// Wakes the consumer, if it waits.
    pub fn wake(&self) {
        self.ready.wake();
    }

    /// Closes the queue: pushes fail, the consumer drains what is left and gets `None`.
    pub fn close(&self) {
        self.closed.store(true, Ordering::Release);
        self.ready.wake();
    }

    /// Whether [`Queue::close`] was called.
    pub fn is_closed(&self) -> bool {
        self.closed.load(Ordering::Acquire)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

    #[test]
    fn bounded_and_ordered() {
        let q = Queue::new(2);
        assert_eq!(q.try_push(1), Ok(()));
        assert_eq!(q.try_push(2), Ok(()));
        assert_eq!(q.try_push(3), Err(PushError::Full));
        assert_eq!(q.try_pop(), Some(1));
        assert_eq!(q.try_pop(), Some(2));
        assert_eq!(q.try_pop(), None);
    }

    #[tokio::test]
    async fn close_drains_then_ends() {
        let q = Arc::new(Queue::new(4));
        assert_eq!(q.try_push("a"), Ok(()));
        q.close();
        assert_eq!(q.try_push("b"), Err(PushError::Closed));
        assert_eq!(q.pop().await, Some("a"));
        assert_eq!(q.pop().await, None);
    }

    #[tokio::test]
    async fn a_waiting_consumer_is_woken() {
        let q = Arc::new(Queue::new(4));
        let consumer = tokio::spawn({
            let q = q.clone();
            async move { (q.pop().await, q.pop().await) }
        });
        assert_eq!(q.try_push(7), Ok(()));
        q.close();
        assert!(matches!(consumer.await, Ok((Some(7), None))));
    }
}
