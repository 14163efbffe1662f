//! Batched read receipts and acks: "read up to 500" is one KV write, not 500.
//!
//! `read` and `ack` frames and `POST /v1/me/read` hand positions to one batcher per
//! process. It keeps the highest position per user and kind, and writes each user's once
//! per flush — every `flush_every`, or sooner when `max_pending` users are waiting. A
//! caller that needs read-your-writes (the HTTP POST) waits for the flush of its batch;
//! frames do not wait. On shutdown the batcher stops taking new positions, writes what it
//! holds, and only then ends, so an accepted receipt is never lost to a restart.

use crate::reads::{ReadPositions, ReadsError};
use crate::{Inbox, InboxError};
use futures::StreamExt as _;
use herald_protocol::UserId;
use std::collections::HashMap;
use std::future::Future;
use std::time::Duration;
use tokio::sync::{mpsc, oneshot};

/// Writes in flight at once during a flush.
const FLUSH_CONCURRENCY: usize = 64;
/// Positions queued towards the batcher before senders wait.
const QUEUE: usize = 65_536;

/// Batching tunables.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ReceiptsConfig {
    /// Longest a position waits before it is written.
    pub flush_every: Duration,
    /// Users waiting that trigger a flush before the timer.
    pub max_pending: usize,
}

impl Default for ReceiptsConfig {
    fn default() -> Self {
        Self {
            flush_every: Duration::from_millis(1_000),
            max_pending: 10_000,
        }
    }
}

/// Which position a receipt moves.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Mark {
    /// Read up to (`read` frame, `POST /v1/me/read`).
    Read,
    /// Seen live up to (`ack` frame).
    Seen,
}

impl Mark {
    fn label(self) -> &'static str {
        match self {
            Mark::Read => "read",
            Mark::Seen => "seen",
        }
    }
}

/// A receipt could not be recorded.
#[derive(Debug, Clone, thiserror::Error)]
pub enum ReceiptsError {
    /// The store did not answer; the position will be retried at the next flush.
    #[error("position store unavailable: {0}")]
    Unavailable(String),
    /// The batcher has stopped (the process is shutting down).
    #[error("receipts are not taken any more: shutting down")]
    Stopped,
}

impl From<ReadsError> for ReceiptsError {
    fn from(e: ReadsError) -> Self {
        ReceiptsError::Unavailable(error_chain(&e))
    }
}

impl From<InboxError> for ReceiptsError {
    fn from(e: InboxError) -> Self {
        ReceiptsError::Unavailable(error_chain(&e))
    }
}

fn error_chain(e: &dyn std::error::Error) -> String {
    let mut text = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        text.push_str(": ");
        text.push_str(&s.to_string());
        source = s.source();
    }
    text
}

/// Where a flush writes one user's position.
pub trait PositionSink: Send + Sync + 'static {
    /// Moves `user`'s `mark` position forward to `up_to`; returns the position now stored.
    fn write(
        &self,
        mark: Mark,
        user: &UserId,
        up_to: u64,
    ) -> impl Future<Output = Result<u64, ReceiptsError>> + Send;
}

/// The real sink: KV buckets, clamped to the newest notification (a position ahead of the
/// inbox would hide notifications that arrive later), reads announced to every device.
#[derive(Debug, Clone)]
pub struct KvSink {
    /// For the newest seq and the read announcement.
    pub inbox: Inbox,
    /// `herald_reads`.
    pub reads: ReadPositions,
    /// `herald_seen`.
    pub seen: ReadPositions,
}

impl PositionSink for KvSink {
    async fn write(&self, mark: Mark, user: &UserId, up_to: u64) -> Result<u64, ReceiptsError> {
        let last = self.inbox.last_seq(user).await?;
        let wanted = up_to.min(last);
        let positions = match mark {
            Mark::Read => &self.reads,
            Mark::Seen => &self.seen,
        };
        let position = positions.advance(user, wanted).await?;
        if mark == Mark::Read && position == wanted && wanted > 0 {
            // Best effort: devices that miss it see the position in their next hello.
            let _ = self.inbox.announce_read(user, position).await;
        }
        Ok(position)
    }
}

type Waiter = oneshot::Sender<Result<u64, ReceiptsError>>;

struct Cmd {
    mark: Mark,
    user: UserId,
    up_to: u64,
    done: Option<Waiter>,
}

#[derive(Default)]
struct Pending {
    up_to: u64,
    waiters: Vec<Waiter>,
}

/// The handle every connection and request shares.
#[derive(Debug, Clone)]
pub struct Receipts {
    tx: mpsc::Sender<Cmd>,
}

impl std::fmt::Debug for Cmd {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{:?} {} up to {}", self.mark, self.user, self.up_to)
    }
}

impl Receipts {
    /// Starts the batcher; it runs until `stop` resolves, then writes what it holds.
    /// Await the returned handle to know every accepted receipt is written.
    pub fn start<S: PositionSink>(
        sink: S,
        config: ReceiptsConfig,
        stop: impl Future<Output = ()> + Send + 'static,
    ) -> (Receipts, tokio::task::JoinHandle<()>) {
        let (tx, rx) = mpsc::channel(QUEUE);
        let task = tokio::spawn(run(sink, config, rx, stop));
        (Receipts { tx }, task)
    }

    /// Queues a position without waiting for it to be written.
    ///
    /// # Errors
    /// [`ReceiptsError::Stopped`] once the batcher has stopped.
    pub async fn mark(&self, mark: Mark, user: &UserId, up_to: u64) -> Result<(), ReceiptsError> {
        self.send(mark, user, up_to, None).await
    }

    /// Queues a position and waits until the flush of its batch has written it; returns
    /// the position now stored.
    ///
    /// # Errors
    /// [`ReceiptsError`] when the store fails or the batcher has stopped.
    pub async fn mark_and_wait(
        &self,
        mark: Mark,
        user: &UserId,
        up_to: u64,
    ) -> Result<u64, ReceiptsError> {
        let (done, written) = oneshot::channel();
        self.send(mark, user, up_to, Some(done)).await?;
        written.await.map_err(|_| ReceiptsError::Stopped)?
    }

    async fn send(
        &self,
        mark: Mark,
        user: &UserId,
        up_to: u64,
        done: Option<Waiter>,
    ) -> Result<(), ReceiptsError> {
        metrics::counter!("herald_receipts_total", "kind" => mark.label()).increment(1);
        let cmd = Cmd {
            mark,
            user: user.clone(),
            up_to,
            done,
        };
        self.tx.send(cmd).await.map_err(|_| ReceiptsError::Stopped)
    }
}

/// What a flush could not write: the key and its position, to merge back.
type Failed = Vec<((Mark, UserId), u64)>;

async fn run<S: PositionSink>(
    sink: S,
    config: ReceiptsConfig,
    mut rx: mpsc::Receiver<Cmd>,
    stop: impl Future<Output = ()> + Send,
) {
    let mut pending: HashMap<(Mark, UserId), Pending> = HashMap::new();
    // A flush runs beside intake: while NATS is slow or away (a flush of 10,000 failing
    // writes takes minutes), positions keep being taken and merged, so a connection's
    // `read` frame never waits on the store and its socket keeps being read.
    let mut in_flight: Option<std::pin::Pin<Box<dyn Future<Output = Failed> + Send + '_>>> = None;
    let mut tick = tokio::time::interval(config.flush_every.max(Duration::from_millis(1)));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    // Beyond this many users waiting (a long outage), intake waits for the flush.
    let most_held = config.max_pending.max(1).saturating_mul(HELD_FLUSHES);
    tokio::pin!(stop);
    loop {
        tokio::select! {
            biased;
            () = &mut stop => break,
            failed = async { in_flight.as_mut().expect("checked").await }, if in_flight.is_some() => {
                in_flight = None;
                merge_back(&mut pending, failed);
            }
            cmd = rx.recv(), if pending.len() < most_held => match cmd {
                Some(cmd) => {
                    add(&mut pending, cmd);
                    if pending.len() >= config.max_pending.max(1) && in_flight.is_none() {
                        in_flight = Some(Box::pin(flush(&sink, std::mem::take(&mut pending))));
                    }
                }
                None => break,
            },
            _ = tick.tick() => if !pending.is_empty() && in_flight.is_none() {
                in_flight = Some(Box::pin(flush(&sink, std::mem::take(&mut pending))));
            },
        }
    }
    // Shutting down: take nothing new, write everything accepted so far.
    rx.close();
    if let Some(flushing) = in_flight.take() {
        let failed = flushing.await;
        merge_back(&mut pending, failed);
    }
    while let Some(cmd) = rx.recv().await {
        add(&mut pending, cmd);
    }
    let held = pending.len();
    let failed = flush(&sink, std::mem::take(&mut pending)).await;
    if !failed.is_empty() {
        tracing::error!(
            lost = failed.len(),
            "receipts could not be written before shutdown"
        );
    }
    tracing::debug!(held, "receipts flushed at shutdown");
}

/// How many flushes' worth of users may wait while one flush is in flight.
const HELD_FLUSHES: usize = 8;

fn add(pending: &mut HashMap<(Mark, UserId), Pending>, cmd: Cmd) {
    let entry = pending.entry((cmd.mark, cmd.user)).or_default();
    entry.up_to = entry.up_to.max(cmd.up_to);
    entry.waiters.extend(cmd.done);
}

/// Puts what a flush could not write back with what arrived meanwhile (the higher
/// position wins), for the next flush.
fn merge_back(pending: &mut HashMap<(Mark, UserId), Pending>, failed: Failed) {
    for (key, up_to) in failed {
        let entry = pending.entry(key).or_default();
        entry.up_to = entry.up_to.max(up_to);
    }
}

/// Writes every position of `batch` once; returns the ones that failed.
async fn flush<S: PositionSink>(sink: &S, batch: HashMap<(Mark, UserId), Pending>) -> Failed {
    metrics::counter!("herald_receipts_flushes_total").increment(1);
    futures::stream::iter(batch)
        .map(|((mark, user), p)| async move {
            let result = sink.write(mark, &user, p.up_to).await;
            let failed = result.is_err();
            if let Err(e) = &result {
                tracing::warn!(error = %e, user = %user, "receipt not written; retrying at the next flush");
            }
            for waiter in p.waiters {
                let _ = waiter.send(result.clone());
            }
            failed.then_some(((mark, user), p.up_to))
        })
        .buffer_unordered(FLUSH_CONCURRENCY)
        .filter_map(std::future::ready)
        .collect()
        .await
}

#[cfg(test)]
mod tests;
