//! The batcher's rules with a recording sink and paused time: one write per user and
//! kind per flush, the pending bound, read-your-writes waiting, and the shutdown flush.

use super::*;
use std::sync::{Arc, Mutex};

/// Records every write, like the KV would (advance-only).
#[derive(Clone, Default)]
struct Recorder(Arc<Mutex<Vec<(Mark, String, u64)>>>);

impl PositionSink for Recorder {
    async fn write(&self, mark: Mark, user: &UserId, up_to: u64) -> Result<u64, ReceiptsError> {
        let mut writes = self.0.lock().map_err(|_| ReceiptsError::Stopped)?;
        writes.push((mark, user.as_str().to_string(), up_to));
        Ok(up_to)
    }
}

impl Recorder {
    fn writes(&self) -> Vec<(Mark, String, u64)> {
        self.0.lock().map(|w| w.clone()).unwrap_or_default()
    }
}

fn user(name: &str) -> UserId {
    UserId::new(name).expect("user id")
}

fn config(flush_ms: u64, max_pending: usize) -> ReceiptsConfig {
    ReceiptsConfig {
        flush_every: Duration::from_millis(flush_ms),
        max_pending,
    }
}

#[tokio::test(start_paused = true)]
async fn five_hundred_reads_are_one_write() {
    let sink = Recorder::default();
    let (stop_tx, stop_rx) = oneshot::channel::<()>();
    let (receipts, task) = Receipts::start(sink.clone(), config(2_000, 1_000), async {
        let _ = stop_rx.await;
    });
    let alice = user("alice");
    // Let the first (immediate) tick pass so the 500 share one interval.
    tokio::time::sleep(Duration::from_millis(1)).await;
    for seq in 1..=500 {
        receipts
            .mark(Mark::Read, &alice, seq)
            .await
            .expect("queued");
    }
    // A later, lower position changes nothing.
    receipts.mark(Mark::Read, &alice, 3).await.expect("queued");
    let waited = receipts.mark_and_wait(Mark::Read, &alice, 7);
    let written = tokio::time::timeout(Duration::from_secs(5), waited)
        .await
        .expect("flushed within the interval")
        .expect("written");
    assert_eq!(written, 500);
    assert_eq!(sink.writes(), vec![(Mark::Read, "alice".to_string(), 500)]);
    drop(stop_tx);
    task.await.expect("batcher ends");
}

#[tokio::test(start_paused = true)]
async fn users_and_kinds_are_written_once_each_per_flush() {
    let sink = Recorder::default();
    let (receipts, task) = Receipts::start(sink.clone(), config(1_000, 1_000), async {
        std::future::pending::<()>().await;
    });
    tokio::time::sleep(Duration::from_millis(1)).await;
    for seq in 1..=50 {
        for name in ["a", "b", "c"] {
            receipts
                .mark(Mark::Read, &user(name), seq)
                .await
                .expect("queued");
            receipts
                .mark(Mark::Seen, &user(name), seq + 1)
                .await
                .expect("queued");
        }
    }
    let a = user("a");
    let flushed = receipts.mark_and_wait(Mark::Seen, &a, 1).await;
    assert_eq!(flushed.expect("written"), 51);
    let mut writes = sink.writes();
    writes.sort_by(|x, y| (x.1.as_str(), x.0 as u8).cmp(&(y.1.as_str(), y.0 as u8)));
    assert_eq!(writes.len(), 6, "{writes:?}");
    assert!(writes.iter().all(|(mark, _, up_to)| match mark {
        Mark::Read => *up_to == 50,
        Mark::Seen => *up_to == 51,
    }));
    task.abort();
}

#[tokio::test(start_paused = true)]
async fn many_pending_users_flush_before_the_timer() {
    let sink = Recorder::default();
    // The timer would take an hour; the pending bound flushes first.
    let (receipts, task) = Receipts::start(sink.clone(), config(3_600_000, 3), async {
        std::future::pending::<()>().await;
    });
    tokio::time::sleep(Duration::from_millis(1)).await;
    let started = tokio::time::Instant::now();
    receipts
        .mark(Mark::Read, &user("a"), 1)
        .await
        .expect("queued");
    receipts
        .mark(Mark::Read, &user("b"), 1)
        .await
        .expect("queued");
    let c = user("c");
    let third = receipts.mark_and_wait(Mark::Read, &c, 1).await;
    assert_eq!(third.expect("written"), 1);
    assert!(started.elapsed() < Duration::from_secs(1));
    assert_eq!(sink.writes().len(), 3);
    task.abort();
}

#[tokio::test(start_paused = true)]
async fn shutdown_writes_what_is_held_and_refuses_more() {
    let sink = Recorder::default();
    let (stop_tx, stop_rx) = oneshot::channel::<()>();
    let (receipts, task) = Receipts::start(sink.clone(), config(3_600_000, 1_000), async {
        let _ = stop_rx.await;
    });
    tokio::time::sleep(Duration::from_millis(1)).await;
    receipts
        .mark(Mark::Read, &user("a"), 9)
        .await
        .expect("queued");
    receipts
        .mark(Mark::Seen, &user("b"), 4)
        .await
        .expect("queued");
    assert!(sink.writes().is_empty(), "nothing written before the flush");
    let _ = stop_tx.send(());
    task.await.expect("batcher ends");
    let mut writes = sink.writes();
    writes.sort_by(|x, y| x.1.cmp(&y.1));
    assert_eq!(
        writes,
        vec![(Mark::Read, "a".into(), 9), (Mark::Seen, "b".into(), 4)]
    );
    assert!(matches!(
        receipts.mark(Mark::Read, &user("a"), 10).await,
        Err(ReceiptsError::Stopped)
    ));
}

/// A sink whose writes wait until released (a store that stopped answering).
#[derive(Clone)]
struct Stuck {
    release: Arc<tokio::sync::Notify>,
    writes: Recorder,
}

impl PositionSink for Stuck {
    async fn write(&self, mark: Mark, user: &UserId, up_to: u64) -> Result<u64, ReceiptsError> {
        self.release.notified().await;
        self.writes.write(mark, user, up_to).await
    }
}

/// While a flush waits on a store that does not answer, positions are still taken at
/// once (a connection's `read` frame never waits on NATS), merged per user, and written
/// by the next flush once the store answers.
#[tokio::test(start_paused = true)]
async fn intake_goes_on_while_a_flush_is_stuck() {
    let release = Arc::new(tokio::sync::Notify::new());
    let sink = Stuck {
        release: release.clone(),
        writes: Recorder::default(),
    };
    let (stop_tx, stop_rx) = oneshot::channel::<()>();
    let (receipts, task) = Receipts::start(sink.clone(), config(100, 2), async {
        let _ = stop_rx.await;
    });
    tokio::time::sleep(Duration::from_millis(1)).await;
    // Two users start a flush, which hangs on the store.
    receipts
        .mark(Mark::Read, &user("a"), 1)
        .await
        .expect("queued");
    receipts
        .mark(Mark::Read, &user("b"), 1)
        .await
        .expect("queued");
    // Far more than the channel's first flush and the pending bound: taken at once, as
    // long as they merge into few users.
    for seq in 2..=QUEUE as u64 + 10 {
        tokio::time::timeout(
            Duration::from_millis(10),
            receipts.mark(Mark::Read, &user("c"), seq),
        )
        .await
        .expect("taken without waiting for the stuck flush")
        .expect("queued");
    }
    release.notify_waiters();
    // The store answers from now on.
    let answering = tokio::spawn({
        let release = release.clone();
        async move {
            loop {
                release.notify_waiters();
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        }
    });
    let written = tokio::time::timeout(
        Duration::from_secs(5),
        receipts.mark_and_wait(Mark::Read, &user("c"), 1),
    )
    .await
    .expect("written once the store answers")
    .expect("written");
    assert_eq!(written, QUEUE as u64 + 10);
    answering.abort();
    drop(stop_tx);
    let _ = tokio::time::timeout(Duration::from_secs(5), task).await;
}
