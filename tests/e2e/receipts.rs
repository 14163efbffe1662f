//! Read receipts and acks are batched: many receipts cost a handful of KV writes, a
//! `POST /v1/me/read` is visible as soon as it is answered, acks show as `seen_seq`, and a
//! shutdown writes what the batcher holds.

use anyhow::{Context as _, ensure};
use herald_gateway::GatewayConfig;
use herald_store::ReceiptsConfig;
use herald_tests::{Herald, Nats, Resume, eventually};
use reqwest::Method;
use serde_json::{Value, json};
use std::time::Duration;
use tokio_tungstenite::tungstenite::Message;

async fn unread(herald: &Herald, user: &str) -> anyhow::Result<Value> {
    let response = herald
        .user(Method::GET, "/v1/me/unread", user)
        .send()
        .await?;
    ensure!(response.status() == 200, "unread: {}", response.status());
    Ok(response.json().await?)
}

/// Sends `count` notifications to `user` in one batch call; their seqs, ascending.
async fn fill(herald: &Herald, user: &str, count: usize) -> anyhow::Result<Vec<u64>> {
    let items: Vec<Value> = (0..count)
        .map(|i| json!({"user_id": user, "title": format!("n{i}")}))
        .collect();
    let response = herald
        .producer(Method::POST, "/v1/notify/batch")
        .json(&json!({ "notifications": items }))
        .send()
        .await?;
    ensure!(response.status() == 202, "batch: {}", response.status());
    let body: Value = response.json().await?;
    let mut seqs: Vec<u64> = body["results"]
        .as_array()
        .context("results")?
        .iter()
        .map(|r| r["seq"].as_u64().context("an accepted item"))
        .collect::<anyhow::Result<_>>()?;
    seqs.sort_unstable();
    Ok(seqs)
}

/// Messages ever written to a KV bucket (its stream's last sequence): every put counts,
/// even with history 1.
async fn kv_writes(herald: &Herald, bucket: &str) -> anyhow::Result<u64> {
    let js = async_nats::jetstream::new(herald.nats_client().await?);
    let mut stream = js.get_stream(format!("KV_{bucket}")).await?;
    Ok(stream.info().await?.state.last_sequence)
}

fn config(flush: Duration) -> GatewayConfig {
    GatewayConfig {
        receipts: ReceiptsConfig {
            flush_every: flush,
            max_pending: 10_000,
        },
        ..GatewayConfig::default()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn five_hundred_reads_cost_a_handful_of_kv_writes() -> anyhow::Result<()> {
    let nats = Nats::single().await?;
    let herald = Herald::builder(&nats)
        .gateway(config(Duration::from_millis(500)))
        .start()
        .await?;
    let seqs = fill(&herald, "rhea", 500).await?;
    let before = kv_writes(&herald, "herald_reads").await?;

    // "Read up to 1 … read up to 500", as a client scrolling through, from 10 devices.
    let mut devices = Vec::new();
    for _ in 0..10 {
        let mut ws = herald.ws("rhea", Resume::Live).await?;
        ws.hello().await?;
        devices.push(ws);
    }
    for (i, seq) in seqs.iter().enumerate() {
        let frame = json!({"type": "read", "up_to": seq}).to_string();
        devices[i % 10].send(Message::text(frame)).await?;
    }
    for ws in &mut devices {
        ws.round_trip().await?;
    }
    eventually(Duration::from_secs(10), "everything read", || async {
        let now = unread(&herald, "rhea").await?;
        ensure!(now["unread"] == 0, "{now}");
        Ok(())
    })
    .await?;
    let frame_writes = kv_writes(&herald, "herald_reads").await? - before;
    ensure!(
        (1..=5).contains(&frame_writes),
        "500 read frames cost {frame_writes} KV writes"
    );

    // The same over HTTP, 200 requests at once: each answer is right, a few writes in all.
    let more = fill(&herald, "rhea", 200).await?;
    let before = kv_writes(&herald, "herald_reads").await?;
    let posts = more.iter().map(|seq| {
        herald
            .user(Method::POST, "/v1/me/read", "rhea")
            .json(&json!({"up_to": seq}))
            .send()
    });
    let answers = futures::future::join_all(posts).await;
    let last = more[more.len() - 1];
    for answer in answers {
        let answer = answer?;
        ensure!(answer.status() == 200, "read: {}", answer.status());
        let body: Value = answer.json().await?;
        // Each answer reflects at least its own receipt (batched with others, maybe more).
        ensure!(body["last_seq"] == last, "{body}");
        ensure!(body["unread"].as_u64().is_some_and(|u| u < 200), "{body}");
    }
    let http_writes = kv_writes(&herald, "herald_reads").await? - before;
    ensure!(
        (1..=10).contains(&http_writes),
        "200 POST /v1/me/read cost {http_writes} KV writes"
    );
    assert_eq!(unread(&herald, "rhea").await?["unread"], 0);
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_read_is_visible_as_soon_as_it_is_answered() -> anyhow::Result<()> {
    let nats = Nats::single().await?;
    let herald = Herald::builder(&nats)
        .gateway(config(Duration::from_millis(300)))
        .start()
        .await?;
    let seqs = fill(&herald, "sven", 5).await?;
    let response = herald
        .user(Method::POST, "/v1/me/read", "sven")
        .json(&json!({"up_to": seqs[2]}))
        .send()
        .await?;
    assert_eq!(response.status(), 200);
    let answer: Value = response.json().await?;
    let expected = json!({"unread": 2, "last_seq": seqs[4], "seen_seq": 0});
    assert_eq!(answer, expected);
    // No waiting: the very next reads see it.
    assert_eq!(unread(&herald, "sven").await?, expected);
    let mut ws = herald.ws("sven", Resume::After(0)).await?;
    assert_eq!(ws.hello().await?["unread"], 2);
    let replay = ws.take(5).await?;
    let flags: Vec<&Value> = replay.iter().map(|n| &n["read"]).collect();
    assert_eq!(flags, [true, true, true, false, false]);
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn acks_record_the_seen_position() -> anyhow::Result<()> {
    let nats = Nats::single().await?;
    let herald = Herald::builder(&nats)
        .gateway(config(Duration::from_millis(200)))
        .start()
        .await?;
    let mut ws = herald.ws("tara", Resume::Live).await?;
    ws.hello().await?;
    let a = herald.send("tara", "one").await?;
    let b = herald.send("tara", "two").await?;
    assert_eq!(ws.take(2).await?.len(), 2);
    assert_eq!(unread(&herald, "tara").await?["seen_seq"], 0);

    ws.send(Message::text(
        json!({"type": "ack", "up_to": a.seq}).to_string(),
    ))
    .await?;
    eventually(Duration::from_secs(5), "seen_seq moves", || async {
        let now = unread(&herald, "tara").await?;
        ensure!(now["seen_seq"] == a.seq, "{now}");
        // Seen is not read.
        ensure!(now["unread"] == 2, "{now}");
        Ok(())
    })
    .await?;
    // Stored where channel workers read it: herald_seen, the seq as decimal text.
    let js = async_nats::jetstream::new(herald.nats_client().await?);
    let kv = js.get_key_value("herald_seen").await?;
    let token = herald_protocol::UserId::new("tara")?
        .token()
        .as_str()
        .to_string();
    let stored = kv.get(&token).await?.context("a seen entry")?;
    assert_eq!(std::str::from_utf8(&stored)?, a.seq.to_string());

    // An older ack never moves it back; one past the newest stops at the newest.
    ws.send(Message::text(
        json!({"type": "ack", "up_to": 1}).to_string(),
    ))
    .await?;
    ws.send(Message::text(
        json!({"type": "ack", "up_to": b.seq + 1000}).to_string(),
    ))
    .await?;
    ws.round_trip().await?;
    eventually(
        Duration::from_secs(5),
        "seen_seq reaches the newest",
        || async {
            let now = unread(&herald, "tara").await?;
            ensure!(now["seen_seq"] == b.seq, "{now}");
            Ok(())
        },
    )
    .await?;
    // Another user is untouched.
    assert_eq!(unread(&herald, "uma").await?["seen_seq"], 0);
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_writes_the_receipts_it_holds() -> anyhow::Result<()> {
    let nats = Nats::single().await?;
    // Receipts would wait an hour: only the shutdown flush can write them.
    let herald = Herald::builder(&nats)
        .gateway(config(Duration::from_secs(3600)))
        .start()
        .await?;
    let seqs = fill(&herald, "vera", 4).await?;
    let mut ws = herald.ws("vera", Resume::Live).await?;
    ws.hello().await?;
    ws.send(Message::text(
        json!({"type": "read", "up_to": seqs[1]}).to_string(),
    ))
    .await?;
    ws.send(Message::text(
        json!({"type": "ack", "up_to": seqs[2]}).to_string(),
    ))
    .await?;
    // The server has handled both frames once it answers the ping.
    ws.round_trip().await?;
    assert_eq!(
        unread(&herald, "vera").await?,
        json!({"unread": 4, "last_seq": seqs[3], "seen_seq": 0}),
        "nothing written before the flush"
    );
    herald.shutdown().await?;

    let after = Herald::builder(&nats).start().await?;
    assert_eq!(
        unread(&after, "vera").await?,
        json!({"unread": 2, "last_seq": seqs[3], "seen_seq": seqs[2]})
    );
    Ok(())
}

/// A hello's `unread` counts up to its `last_seq` and no further: a client adds what it
/// is sent after that itself, so a notification stored between reading the head and
/// counting must not be counted twice (the page's badge showed one too many when
/// notifications kept arriving during a reconnect).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unread_counts_stop_at_the_head_they_were_read_with() -> anyhow::Result<()> {
    let nats = Nats::single().await?;
    let herald = Herald::builder(&nats).start().await?;
    let inbox = herald.store_inbox("unread-test").await?;
    let user = herald_protocol::UserId::new("wren")?;

    let seqs = fill(&herald, "wren", 3).await?;
    let head = inbox.head(&user).await?;
    assert_eq!(head.last_seq(), seqs[2]);
    // Stored after the head was read, before the count: a race made deterministic.
    let later = fill(&herald, "wren", 2).await?;
    assert_eq!(inbox.unread(&head, 0).await?, 3);
    assert_eq!(inbox.unread(&head, seqs[0]).await?, 2);
    assert_eq!(inbox.unread(&head, seqs[2]).await?, 0);
    // A fresh head sees everything.
    let head = inbox.head(&user).await?;
    assert_eq!(head.last_seq(), later[1]);
    assert_eq!(inbox.unread(&head, seqs[0]).await?, 4);
    Ok(())
}
