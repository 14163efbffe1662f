//! The gateway's metrics reach `/metrics`: connections by transport, connects, replay
//! sizes, live delay, receipts and the KV writes they cost. (Metrics are process-wide and
//! tests run in parallel, so this checks presence and lower bounds, not exact values.)

use anyhow::Context as _;
use herald_tests::{Herald, Nats, Resume, eventually};
use serde_json::json;
use std::time::Duration;
use tokio_tungstenite::tungstenite::Message;

pub(crate) use herald_tests::metric_sample as sample;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn gateway_metrics_are_exported() -> anyhow::Result<()> {
    let nats = Nats::single().await?;
    let herald = Herald::builder(&nats).start().await?;
    let a = herald.send("mia", "one").await?;
    let mut ws = herald.ws("mia", Resume::After(0)).await?;
    ws.hello().await?;
    assert_eq!(ws.take(1).await?[0]["seq"], a.seq);
    let mut sse = herald.sse("mia", Resume::Live).await?;
    sse.next_event().await?;
    let b = herald.send("mia", "two").await?;
    assert_eq!(ws.take(1).await?[0]["seq"], b.seq);
    ws.send(Message::text(
        json!({"type": "read", "up_to": b.seq}).to_string(),
    ))
    .await?;
    ws.send(Message::text(
        json!({"type": "ack", "up_to": b.seq}).to_string(),
    ))
    .await?;
    let text = eventually(Duration::from_secs(10), "receipts written", || async {
        let text = herald.metrics().await?;
        let writes = sample(
            &text,
            "herald_positions_kv_writes_total{bucket=\"herald_seen\"}",
        )
        .context("no seen writes yet")?;
        anyhow::ensure!(writes >= 1.0);
        Ok(text)
    })
    .await?;
    for (prefix, at_least) in [
        ("herald_gateway_connections{transport=\"ws\"}", 1.0),
        ("herald_gateway_connections{transport=\"sse\"}", 1.0),
        ("herald_gateway_connects_total{transport=\"ws\"}", 1.0),
        ("herald_gateway_connects_total{transport=\"sse\"}", 1.0),
        ("herald_receipts_total{kind=\"read\"}", 1.0),
        ("herald_receipts_total{kind=\"seen\"}", 1.0),
        ("herald_receipts_flushes_total", 1.0),
        (
            "herald_positions_kv_writes_total{bucket=\"herald_reads\"}",
            1.0,
        ),
        ("herald_gateway_replay_size_count", 1.0),
        // hello, two notifications (ws); hello, one notification (sse).
        ("herald_gateway_frames_out_total{transport=\"ws\"}", 3.0),
        (
            "herald_gateway_notifications_out_total{transport=\"ws\"}",
            2.0,
        ),
        (
            "herald_gateway_notifications_out_total{transport=\"sse\"}",
            1.0,
        ),
        ("herald_gateway_live_delay_seconds_count", 1.0),
    ] {
        let value = sample(&text, prefix).with_context(|| format!("{prefix} missing"))?;
        anyhow::ensure!(value >= at_least, "{prefix} = {value}");
    }
    Ok(())
}

/// A refused notify is counted on its path: `http` for `POST /v1/notify`, `batch` per
/// refused item. (Metrics are process-wide: lower bounds only.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refused_notifications_are_counted_by_path() -> anyhow::Result<()> {
    let nats = Nats::single().await?;
    let herald = Herald::builder(&nats).start().await?;
    let r = herald.notify(&json!({"title": "no user"})).await?;
    anyhow::ensure!(r.status() == 400, "{}", r.status());
    let r = herald
        .producer(reqwest::Method::POST, "/v1/notify/batch")
        .json(&json!({"notifications": [{"user_id": "ok", "title": "fine"}, {"title": "no user"}]}))
        .send()
        .await?;
    anyhow::ensure!(r.status() == 202, "{}", r.status());
    let text = herald.metrics().await?;
    for prefix in [
        "herald_notify_rejected_total{path=\"http\"}",
        "herald_notify_rejected_total{path=\"batch\"}",
    ] {
        let value = sample(&text, prefix).with_context(|| format!("{prefix} missing"))?;
        anyhow::ensure!(value >= 1.0, "{prefix} = {value}");
    }
    Ok(())
}
