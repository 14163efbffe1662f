//! One scenario over every transport: a client connects from the beginning while a
//! producer keeps sending, reconnects from its last position midway, and must end up with
//! every notification exactly once, in `seq` order, exactly as the inbox holds them.

use anyhow::{Context as _, ensure};
use herald_tests::{Herald, Nats, Resume, SseClient, WsClient, eventually, within};
use serde_json::Value;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;
use tokio::sync::Notify;

const USER: &str = "stream.user *";
/// Notifications sent in all.
const TOTAL: usize = 300;
/// Sent before the producer pauses for the client's reconnect.
const FIRST_HALF: usize = 120;

#[derive(Debug, Clone, Copy)]
enum Transport {
    WebSocket,
    Sse,
    LongPoll,
}

/// One open subscription on some transport.
enum Conn {
    Ws(WsClient),
    Sse(SseClient),
    Poll { after: u64 },
}

impl Conn {
    async fn open(herald: &Herald, transport: Transport, after: u64) -> anyhow::Result<Conn> {
        Ok(match transport {
            Transport::WebSocket => {
                let mut ws = herald.ws(USER, Resume::After(after)).await?;
                ws.hello().await?;
                Conn::Ws(ws)
            }
            // The first connection names its position in the query; a reconnect is what a
            // browser does, with Last-Event-ID.
            Transport::Sse if after == 0 => Conn::Sse(herald.sse(USER, Resume::After(0)).await?),
            Transport::Sse => Conn::Sse(herald.sse(USER, Resume::LastEventId(after)).await?),
            Transport::LongPoll => Conn::Poll { after },
        })
    }

    async fn next(&mut self, herald: &Herald) -> anyhow::Result<Vec<Value>> {
        match self {
            Conn::Ws(ws) => ws.next_notifications().await,
            Conn::Sse(sse) => Ok(vec![sse.next_notification().await?]),
            Conn::Poll { after } => {
                let page = herald
                    .my_page(USER, &format!("after={after}&wait=5&limit=100"))
                    .await?;
                *after = page["next_after"]
                    .as_u64()
                    .context("page without next_after")?;
                Ok(page["items"].as_array().cloned().unwrap_or_default())
            }
        }
    }
}

async fn replay_then_live(transport: Transport) -> anyhow::Result<()> {
    let nats = Nats::single().await?;
    let herald = Arc::new(Herald::builder(&nats).start().await?);
    let sent = Arc::new(AtomicUsize::new(0));
    let resume = Arc::new(Notify::new());
    let producer = {
        let (herald, sent, resume) = (herald.clone(), sent.clone(), resume.clone());
        tokio::spawn(async move {
            let mut accepted = Vec::with_capacity(TOTAL);
            for i in 0..TOTAL {
                if i == FIRST_HALF {
                    resume.notified().await;
                }
                accepted.push(herald.send(USER, &format!("n{i}")).await?);
                sent.fetch_add(1, Ordering::SeqCst);
            }
            anyhow::Ok(accepted)
        })
    };
    eventually(
        Duration::from_secs(10),
        "the producer is under way",
        || async {
            ensure!(sent.load(Ordering::SeqCst) >= 30);
            Ok(())
        },
    )
    .await?;

    let mut received: Vec<Value> = Vec::new();
    let mut conn = Conn::open(&herald, transport, 0).await?;
    within(
        Duration::from_secs(30),
        "the first connection's items",
        async {
            while received.len() < 60 {
                received.extend(conn.next(&herald).await?);
            }
            anyhow::Ok(())
        },
    )
    .await??;
    drop(conn);
    // The producer resumes while the client reconnects from its last position.
    resume.notify_one();
    let last = received
        .last()
        .and_then(|n| n["seq"].as_u64())
        .context("no seq")?;
    let mut conn = Conn::open(&herald, transport, last).await?;
    let accepted = within(Duration::from_secs(60), "the producer", producer).await???;
    let final_seq = accepted.last().context("nothing sent")?.seq;
    within(Duration::from_secs(60), "every notification", async {
        while received.last().and_then(|n| n["seq"].as_u64()) < Some(final_seq) {
            received.extend(conn.next(&herald).await?);
        }
        anyhow::Ok(())
    })
    .await??;

    let got: Vec<u64> = received.iter().filter_map(|n| n["seq"].as_u64()).collect();
    let first_bad = got.windows(2).position(|w| w[0] >= w[1]);
    ensure!(
        first_bad.is_none(),
        "{transport:?}: seqs not strictly increasing at {first_bad:?}: {got:?}"
    );
    let inbox = herald.inbox(USER).await?;
    let stored: Vec<u64> = inbox.iter().filter_map(|n| n["seq"].as_u64()).collect();
    assert_eq!(
        stored,
        accepted.iter().map(|a| a.seq).collect::<Vec<_>>(),
        "the inbox holds what got 202"
    );
    assert_eq!(
        got, stored,
        "{transport:?}: received exactly the inbox, no gap, no duplicate"
    );
    for (n, a) in received.iter().zip(&accepted) {
        assert_eq!(
            n["id"],
            a.id.as_str(),
            "{transport:?}: same id on every path"
        );
        assert_eq!(n["user_id"], USER);
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replay_then_live_has_no_gap_over_websocket() -> anyhow::Result<()> {
    replay_then_live(Transport::WebSocket).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replay_then_live_has_no_gap_over_sse() -> anyhow::Result<()> {
    replay_then_live(Transport::Sse).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replay_then_live_has_no_gap_over_long_poll() -> anyhow::Result<()> {
    replay_then_live(Transport::LongPoll).await
}

/// The seqs of notifications received, in order.
fn seqs(items: &[Value]) -> Vec<u64> {
    items.iter().filter_map(|n| n["seq"].as_u64()).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_position_from_before_the_inbox_was_recreated_replays_the_new_inbox() -> anyhow::Result<()>
{
    let nats = Nats::single().await?;
    let mut herald = Herald::builder(&nats).start().await?;
    for i in 0..5 {
        herald.send(USER, &format!("old {i}")).await?;
    }
    // The client's position, from the inbox's first life.
    let old = herald.inbox(USER).await?;
    let position = *seqs(&old).last().context("nothing stored")?;
    ensure!(position == 5);

    // The INBOX stream is deleted and provisioned again: its sequences begin again.
    herald.stop().await?;
    let js = async_nats::jetstream::new(nats.client().await?);
    js.delete_stream(herald_protocol::streams::INBOX).await?;
    herald.start_again().await?;
    let mut sent = Vec::new();
    for i in 0..2 {
        sent.push(herald.send(USER, &format!("new {i}")).await?);
    }
    ensure!(sent.iter().map(|a| a.seq).collect::<Vec<_>>() == [1, 2]);

    // A long-poll from the old position answers the new inbox from its start, at once.
    let page = within(
        Duration::from_secs(10),
        "the long-poll",
        herald.my_page(USER, &format!("after={position}&wait=30")),
    )
    .await??;
    let items = page["items"].as_array().context("items")?;
    assert_eq!(seqs(items), [1, 2]);
    assert_eq!(
        page["next_after"], 2,
        "below the after asked: the position is void"
    );

    let mut ws = herald.ws(USER, Resume::After(position)).await?;
    let hello = ws.hello().await?;
    assert_eq!(
        hello["last_seq"], 2,
        "the hello's last_seq, below the client's position, tells it the position is void"
    );
    // More: at seqs up to the old position, and one past it.
    for i in 2..6 {
        sent.push(herald.send(USER, &format!("new {i}")).await?);
    }
    // Up to the last one sent: whatever came before it is all that will.
    let got = within(Duration::from_secs(20), "the new inbox", async {
        let mut got = Vec::new();
        while seqs(&got).last() != Some(&6) {
            got.extend(ws.next_notifications().await?);
        }
        anyhow::Ok(got)
    })
    .await??;
    assert_eq!(
        seqs(&got),
        [1, 2, 3, 4, 5, 6],
        "the new inbox replayed, then live: none thrown away as already sent"
    );
    for (n, a) in got.iter().zip(&sent) {
        assert_eq!(n["id"], a.id.as_str());
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_position_past_the_view_but_within_the_stream_is_resumed_as_it_is() -> anyhow::Result<()>
{
    // What a client sees on a cluster when the head is read from a replica a moment
    // behind the one that sent it its last seq live: the position is past the view's
    // newest seq as read, but not past the stream's. It must not be replayed from 0
    // (duplicates), nor be told its position is void.
    let nats = Nats::single().await?;
    let herald = Herald::builder(&nats).start().await?;
    herald.send(USER, "mine 1").await?;
    herald.send(USER, "mine 2").await?;
    let mut others = Vec::new();
    for i in 0..3 {
        others.push(
            herald
                .send("someone else", &format!("theirs {i}"))
                .await?
                .seq,
        );
    }
    let position = others[1]; // past the user's newest, below the stream's newest
    ensure!(position > 2 && position < others[2]);

    let mut ws = herald.ws(USER, Resume::After(position)).await?;
    let hello = ws.hello().await?;
    assert_eq!(
        hello["last_seq"], position,
        "last_seq is not below the client's position: it keeps it"
    );
    let next = herald.send(USER, "mine 3").await?;
    let got = within(Duration::from_secs(20), "the live one", ws.take(1)).await??;
    assert_eq!(seqs(&got), [next.seq], "nothing replayed, the new one live");
    Ok(())
}
