//! The gateway's live hub: one subscription per partition, connections registered by
//! subject and removed when they go, and a connection whose live queue overflows catches
//! up from the inbox instead of losing notifications.

use anyhow::Context as _;
use herald_gateway::{Feed, Hub};
use herald_protocol::UserId;
use herald_tests::{Herald, Nats, Resume, eventually};
use reqwest::Method;
use serde_json::{Value, json};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio_util::sync::CancellationToken;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_subscription_per_partition_not_per_connection() -> anyhow::Result<()> {
    let nats = Nats::single().await?;
    let herald = Herald::builder(&nats).partitions(4).start().await?;
    let mut clients = Vec::new();
    for i in 0..12 {
        let mut ws = herald.ws(&format!("user{i}"), Resume::Live).await?;
        ws.hello().await?;
        clients.push(ws);
    }
    // A message to any user reaches the gateway through its partition's subscription,
    // and no connection has a subscription of its own.
    for i in 0..12 {
        let user = UserId::new(format!("user{i}"))?;
        let live = herald.subjects().live(&user);
        let partition = herald.subjects().live_partition(user.partition(4));
        let subs = nats.subscriptions_matching(&live).await?;
        assert!(subs.contains(&partition), "{live}: {subs:?}");
        assert!(
            !subs.contains(&live),
            "{live} has its own subscription: {subs:?}"
        );
    }
    let user0 = herald.subjects().live(&UserId::new("user0")?);
    assert!(herald.is_tapped(&user0));
    // Everyone gets their own, and only their own.
    for (i, ws) in clients.iter_mut().enumerate() {
        let n = herald.send(&format!("user{i}"), "hi").await?;
        let got = ws.take(1).await?;
        assert_eq!(got[0]["id"], n.id.as_str());
    }
    // Closing removes the registration.
    let first = clients.remove(0);
    first.close().await;
    eventually(Duration::from_secs(5), "user0 unregistered", || async {
        anyhow::ensure!(!herald.is_tapped(&user0));
        Ok(())
    })
    .await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_overflowing_tap_catches_up_from_the_inbox() -> anyhow::Result<()> {
    let nats = Nats::single().await?;
    let herald = Herald::builder(&nats).start().await?;
    let inbox = herald.store_inbox("hub-test").await?;
    let hub = Hub::start(inbox).await?;
    let user = UserId::new("yara")?;
    let mut feed = Feed::open(&hub, user.clone(), None, 0).await?;
    assert_eq!(hub.subjects_tapped(), 1);

    // 300 notifications while the feed is not read: far more than a tap queues.
    let items: Vec<Value> = (0..300)
        .map(|i| json!({"user_id": "yara", "title": format!("n{i}")}))
        .collect();
    let response = herald
        .producer(Method::POST, "/v1/notify/batch")
        .json(&json!({ "notifications": items }))
        .send()
        .await?;
    anyhow::ensure!(response.status() == 202);
    let body: Value = response.json().await?;
    let mut want: Vec<u64> = body["results"]
        .as_array()
        .context("results")?
        .iter()
        .filter_map(|r| r["seq"].as_u64())
        .collect();
    want.sort_unstable();
    anyhow::ensure!(want.len() == 300);

    let mut got = Vec::new();
    herald_tests::within(Duration::from_secs(20), "all 300 through the feed", async {
        while got.len() < 300 {
            got.extend(feed.next().await?.into_iter().map(|n| n.seq));
        }
        anyhow::Ok(())
    })
    .await??;
    assert_eq!(got, want, "every notification once, in order");
    drop(feed);
    assert_eq!(hub.subjects_tapped(), 0);
    Ok(())
}

/// A TCP relay to nats-server that can cut its connections and refuse new ones: the
/// hub's NATS connection goes away and comes back while the server stays up and keeps
/// storing (what a gateway sees when its cluster node restarts).
struct Relay {
    addr: std::net::SocketAddr,
    open: Arc<AtomicBool>,
    /// Cancelled to drop the connections relayed so far; replaced by a fresh one.
    cut: Arc<Mutex<CancellationToken>>,
    task: tokio::task::JoinHandle<()>,
}

impl Relay {
    async fn start(upstream: &str) -> anyhow::Result<Relay> {
        let upstream = upstream.trim_start_matches("nats://").to_owned();
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        let addr = listener.local_addr()?;
        let open = Arc::new(AtomicBool::new(true));
        let cut = Arc::new(Mutex::new(CancellationToken::new()));
        let (accepting, cuts) = (open.clone(), cut.clone());
        let task = tokio::spawn(async move {
            while let Ok((mut client, _)) = listener.accept().await {
                if !accepting.load(Ordering::Acquire) {
                    continue; // refused: dropped at once
                }
                let Ok(mut server) = tokio::net::TcpStream::connect(&upstream).await else {
                    continue;
                };
                let cut = cuts.lock().unwrap_or_else(|e| e.into_inner()).clone();
                tokio::spawn(async move {
                    tokio::select! {
                        _ = tokio::io::copy_bidirectional(&mut client, &mut server) => {}
                        _ = cut.cancelled() => {}
                    }
                });
            }
        });
        Ok(Relay {
            addr,
            open,
            cut,
            task,
        })
    }

    fn url(&self) -> String {
        format!("nats://{}", self.addr)
    }

    /// Drops every relayed connection and refuses new ones.
    fn cut(&self) {
        self.open.store(false, Ordering::Release);
        let mut cut = self.cut.lock().unwrap_or_else(|e| e.into_inner());
        std::mem::take(&mut *cut).cancel();
    }

    /// Accepts connections again.
    fn resume(&self) {
        self.open.store(true, Ordering::Release);
    }
}

impl Drop for Relay {
    fn drop(&mut self) {
        self.task.abort();
        self.cut.lock().unwrap_or_else(|e| e.into_inner()).cancel();
    }
}

/// Notifications stored while the gateway's NATS connection was away never arrive live;
/// once it is back, every feed re-reads its inbox and hands them out — even with nothing
/// published afterwards to reveal the gap.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_feed_gets_what_was_stored_while_its_nats_connection_was_away() -> anyhow::Result<()> {
    let nats = Nats::single().await?;
    let herald = Herald::builder(&nats).start().await?;
    let relay = Relay::start(&nats.url()).await?;
    let through_relay = herald_store::connect(&relay.url(), "hub-relayed").await?;
    let connected = through_relay.consume.clone();
    let hub = Hub::start(herald_store::Inbox::new(
        through_relay,
        herald.subjects().clone(),
    ))
    .await?;
    let user = UserId::new("zoe")?;
    let mut feed = Feed::open(&hub, user.clone(), None, 0).await?;
    let before = herald.send("zoe", "before").await?;
    let got =
        herald_tests::within(Duration::from_secs(10), "the first, live", feed.next()).await??;
    assert_eq!(got.iter().map(|n| n.seq).collect::<Vec<_>>(), [before.seq]);

    relay.cut();
    eventually(
        Duration::from_secs(10),
        "the hub's connection is down",
        || async {
            anyhow::ensure!(
                connected.connection_state() != async_nats::connection::State::Connected
            );
            Ok(())
        },
    )
    .await?;
    // Stored (Herald's own connection is direct) while the hub cannot hear it.
    let during = herald.send("zoe", "while away").await?;
    relay.resume();

    let got =
        herald_tests::within(Duration::from_secs(20), "the missed one", feed.next()).await??;
    assert_eq!(
        got.iter().map(|n| n.seq).collect::<Vec<_>>(),
        [during.seq],
        "handed out once the connection is back, with nothing published after it"
    );
    // And live again: the next one arrives once, after it.
    let after = herald.send("zoe", "after").await?;
    let got =
        herald_tests::within(Duration::from_secs(10), "the next, live", feed.next()).await??;
    assert_eq!(got.iter().map(|n| n.seq).collect::<Vec<_>>(), [after.seq]);
    Ok(())
}

/// A feed replaying a backlog takes nothing live (the live ones are in the inbox it reads),
/// so its tap overflows; that is no sign of a slow client, and the connection must not
/// be closed for it. Everything still arrives once, in order.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn drops_during_a_replay_do_not_mark_the_client_slow() -> anyhow::Result<()> {
    let nats = Nats::single().await?;
    let herald = Herald::builder(&nats).start().await?;
    let batch = |from: usize| -> Value {
        let items: Vec<Value> = (from..from + 100)
            .map(|i| json!({"user_id": "uma", "title": format!("n{i}")}))
            .collect();
        json!({ "notifications": items })
    };
    let mut want = Vec::new();
    let mut send = async |from: usize| -> anyhow::Result<()> {
        let response = herald
            .producer(Method::POST, "/v1/notify/batch")
            .json(&batch(from))
            .send()
            .await?;
        anyhow::ensure!(response.status() == 202);
        let body: Value = response.json().await?;
        want.extend(
            body["results"]
                .as_array()
                .context("results")?
                .iter()
                .filter_map(|r| r["seq"].as_u64()),
        );
        Ok(())
    };
    send(0).await?;
    let hub = Hub::start(herald.store_inbox("hub-replay").await?).await?;
    let mut feed = Feed::open(&hub, UserId::new("uma")?, Some(0), 0).await?;
    let drops = |text: &str| crate::metrics::sample(text, "herald_gateway_hub_drops_total");
    let before = drops(&herald.metrics().await?).unwrap_or(0.0);
    // 200 live while the feed replays and takes nothing: its tap (64) overflows.
    send(100).await?;
    send(200).await?;
    eventually(Duration::from_secs(10), "the tap overflowed", || async {
        let now = drops(&herald.metrics().await?).unwrap_or(0.0);
        anyhow::ensure!(now >= before + 100.0, "{now} drops");
        Ok(())
    })
    .await?;
    let slow = std::future::poll_fn(|cx| std::task::Poll::Ready(feed.poll_lagged(cx))).await;
    assert!(!slow, "a replaying feed was reported slow");
    want.sort_unstable();
    let mut got = Vec::new();
    herald_tests::within(Duration::from_secs(20), "all 300 through the feed", async {
        while got.len() < want.len() {
            got.extend(feed.next().await?.into_iter().map(|n| n.seq));
        }
        anyhow::Ok(())
    })
    .await??;
    assert_eq!(got, want, "every notification once, in order");
    Ok(())
}
