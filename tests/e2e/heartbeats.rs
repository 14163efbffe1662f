//! Heartbeats: a WebSocket peer that stops answering pings is dropped within two missed
//! beats and its resources are freed; SSE streams carry comment keep-alives.

use herald_gateway::GatewayConfig;
use herald_gateway::admission::Limits;
use herald_tests::{Herald, Nats, Resume, eventually};
use reqwest::StatusCode;
use std::time::{Duration, Instant};

fn one_second_heartbeat(max_per_user: u32) -> GatewayConfig {
    GatewayConfig {
        heartbeat: Duration::from_secs(1),
        limits: Limits {
            max_per_user,
            ..Limits::default()
        },
        ..GatewayConfig::default()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_peer_that_stops_answering_pings_is_dropped_and_freed() -> anyhow::Result<()> {
    let nats = Nats::single().await?;
    let herald = Herald::builder(&nats)
        .gateway(one_second_heartbeat(1))
        .start()
        .await?;
    // The zombie reads its hello, then is never polled again: the client library answers
    // pings only while it is read, so the server's pings go unanswered.
    let mut zombie = herald.ws("wade", Resume::Live).await?;
    assert_eq!(zombie.hello().await?["heartbeat_s"], 1);
    let started = Instant::now();
    let url = herald.ws_url("/v1/ws");
    let token = herald.token("wade");
    // Wade's only slot is taken while the zombie is held...
    assert_eq!(
        herald_tests::WsClient::upgrade_status(&url, Some(&token)).await?,
        Some(StatusCode::TOO_MANY_REQUESTS)
    );
    // ...and freed once the server gives up on it: within two missed beats (plus one tick).
    let mut fresh = eventually(
        Duration::from_secs(8),
        "the zombie's slot is freed",
        || async { herald.ws("wade", Resume::Live).await },
    )
    .await?;
    let freed_after = started.elapsed();
    assert!(
        freed_after >= Duration::from_millis(1900),
        "dropped after {freed_after:?}, before two beats were missed"
    );
    fresh.hello().await?;
    // What the zombie finds when it finally reads: pings, then the heartbeat close.
    assert_eq!(zombie.closed_with().await?, 4000);
    // The live client answers pings (by reading) and stays connected past several beats.
    let n = herald.send("wade", "still here").await?;
    assert_eq!(fresh.take(1).await?[0]["seq"], n.seq);
    // Reading (and so answering pings) for four beats: nothing arrives, nothing closes.
    let quiet = tokio::time::timeout(Duration::from_secs(4), fresh.next_frame()).await;
    assert!(quiet.is_err(), "a responsive client got {quiet:?}");
    let n = herald.send("wade", "after four beats").await?;
    assert_eq!(fresh.take(1).await?[0]["seq"], n.seq);
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sse_streams_carry_keep_alive_comments() -> anyhow::Result<()> {
    let nats = Nats::single().await?;
    let herald = Herald::builder(&nats)
        .gateway(one_second_heartbeat(4))
        .start()
        .await?;
    let mut sse = herald.sse("xavi", Resume::Live).await?;
    let started = Instant::now();
    // Two keep-alives on an idle stream, about a heartbeat apart.
    sse.next_comment().await?;
    sse.next_comment().await?;
    let elapsed = started.elapsed();
    assert!(
        elapsed >= Duration::from_millis(900) && elapsed < Duration::from_secs(5),
        "two keep-alives took {elapsed:?}"
    );
    Ok(())
}
