//! Accepted means durable: a NATS outage is a 503 (never a false 202), and restarting
//! Herald loses nothing that was accepted.

use anyhow::{Context as _, ensure};
use futures::{StreamExt as _, TryStreamExt as _};
use herald_tests::{Herald, Nats, Resume, eventually};
use reqwest::{Method, StatusCode};
use serde_json::{Value, json};
use std::time::Duration;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nats_outage_is_503_then_recovers_without_restarting_herald() -> anyhow::Result<()> {
    let mut nats = Nats::single().await?;
    let herald = Herald::builder(&nats).start().await?;
    let before = herald.send("uma", "before the outage").await?;

    nats.kill();
    for i in 0..3 {
        let response = herald
            .notify(&json!({"user_id": "uma", "title": format!("during {i}")}))
            .await?;
        let status = response.status();
        let retry_after = response.headers().get("retry-after").cloned();
        let body: Value = response.json().await.context("503 body is JSON")?;
        assert_eq!(
            status,
            StatusCode::SERVICE_UNAVAILABLE,
            "never a 202 without NATS: {body}"
        );
        assert!(retry_after.is_some(), "503 carries Retry-After");
        assert_eq!(body["error"]["code"], "unavailable", "{body}");
    }
    // A batch too: refused as a whole, never queued in the client to land later.
    let response = herald
        .producer(Method::POST, "/v1/notify/batch")
        .json(&json!({"notifications": [{"user_id": "uma", "title": "during, batched"}]}))
        .send()
        .await?;
    assert_eq!(response.status(), StatusCode::SERVICE_UNAVAILABLE);
    eventually(
        Duration::from_secs(10),
        "/readyz reports NATS down",
        || async {
            let status = herald
                .request(Method::GET, "/readyz")
                .send()
                .await?
                .status();
            ensure!(
                status == StatusCode::SERVICE_UNAVAILABLE,
                "/readyz {status}"
            );
            Ok(())
        },
    )
    .await?;

    nats.restart().await?;
    // The producer retries with one idempotency key, as the 503 tells it to.
    let after = eventually(
        Duration::from_secs(30),
        "notify accepted after NATS is back",
        || async {
            let response = herald
                .producer(Method::POST, "/v1/notify")
                .header("Idempotency-Key", "uma-after-outage")
                .json(&json!({"user_id": "uma", "title": "after the outage"}))
                .send()
                .await?;
            herald_tests::herald::accepted(response).await
        },
    )
    .await?;
    let inbox = herald.inbox("uma").await?;
    let ids: Vec<&str> = inbox.iter().filter_map(|n| n["id"].as_str()).collect();
    // Nothing refused during the outage landed once NATS came back.
    assert_eq!(ids, [before.id.as_str(), after.id.as_str()], "{inbox:?}");
    let status = herald
        .request(Method::GET, "/readyz")
        .send()
        .await?
        .status();
    assert_eq!(status, StatusCode::OK);
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn herald_restart_loses_nothing_accepted() -> anyhow::Result<()> {
    const N: usize = 200;
    let nats = Nats::single().await?;
    let herald = Herald::builder(&nats).start().await?;
    let mut accepted: Vec<_> = futures::stream::iter(0..N)
        .map(|i| {
            let herald = &herald;
            async move { herald.send("rita", &format!("n{i}")).await }
        })
        .buffer_unordered(16)
        .try_collect()
        .await?;
    accepted.sort_by_key(|a| a.seq);
    herald.shutdown().await?;

    let herald = Herald::builder(&nats).start().await?;
    let inbox = herald.inbox("rita").await?;
    let stored: Vec<(u64, &str)> = inbox
        .iter()
        .filter_map(|n| Some((n["seq"].as_u64()?, n["id"].as_str()?)))
        .collect();
    let want: Vec<(u64, &str)> = accepted.iter().map(|a| (a.seq, a.id.as_str())).collect();
    assert_eq!(stored, want, "every 202 is in the inbox after the restart");

    let mut ws = herald.ws("rita", Resume::After(0)).await?;
    assert_eq!(ws.hello().await?["last_seq"], want[N - 1].0);
    let replayed = ws.take(N).await?;
    let got: Vec<(u64, &str)> = replayed
        .iter()
        .filter_map(|n| Some((n["seq"].as_u64()?, n["id"].as_str()?)))
        .collect();
    assert_eq!(
        got, want,
        "the new Herald replays all of them over WebSocket"
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_asks_connected_clients_to_reconnect() -> anyhow::Result<()> {
    let nats = Nats::single().await?;
    let herald = Herald::builder(&nats).start().await?;
    let mut ws = herald.ws("vera", Resume::Live).await?;
    ws.hello().await?;
    herald.shutdown().await?;
    // SPEC §5: `{"type":"reconnect","after_ms":n}`, then the close ("going away").
    let frame = ws.next_frame().await?;
    assert_eq!(frame["type"], "reconnect", "{frame}");
    assert!(frame["after_ms"].is_u64(), "{frame}");
    assert_eq!(ws.closed_with().await?, 1001);
    Ok(())
}
