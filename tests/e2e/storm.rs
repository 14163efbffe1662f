//! A reconnect storm, small: every client of a restarted gateway comes back at once,
//! through admission that refuses most of them at first, and each one gets exactly what
//! was sent while it was away: nothing lost, nothing twice.

use futures::StreamExt as _;
use herald::mesh::Roles;
use herald_gateway::GatewayConfig;
use herald_gateway::admission::Limits;
use herald_gateway::admission::adaptive::OpenLimits;
use herald_tests::{Herald, Nats, WsClient};
use reqwest::StatusCode;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

const CLIENTS: usize = 120;
/// Bound on every client being back after the restart.
const STORM_DEADLINE: Duration = Duration::from_secs(60);

/// Admission far below the storm: a bucket of 30 upgrades per second and few sessions
/// opening at once, so most reconnects are refused at first and must retry, and replays
/// paced two at a time.
fn tight_admission() -> GatewayConfig {
    GatewayConfig {
        limits: Limits {
            upgrades_per_sec: 30,
            opening: OpenLimits {
                initial: 8,
                min: 2,
                max: 16,
                // A short line, so some upgrades are refused and retried, not only queued.
                max_queued: 16,
                max_wait: Duration::from_secs(2),
                ..OpenLimits::default()
            },
            ..Limits::default()
        },
        replay_reads: 2,
        ..GatewayConfig::default()
    }
}

fn user(i: usize) -> String {
    format!("storm-{i}")
}

/// Reconnects after `after` as a client SDK does: a refused upgrade (503) is retried
/// after a short jittered back-off until the deadline. Counts the refusals.
async fn reconnect(
    herald: &Herald,
    user: &str,
    after: u64,
    refused: &AtomicU64,
) -> anyhow::Result<WsClient> {
    let url = herald.ws_url(&format!("/v1/ws?after={after}"));
    let token = herald.token(user);
    let started = Instant::now();
    let mut attempt = 0u32;
    loop {
        match WsClient::connect(&url, Some(&token)).await {
            Ok(ws) => return Ok(ws),
            Err(e) if started.elapsed() < STORM_DEADLINE => {
                let status = match e.downcast_ref::<tokio_tungstenite::tungstenite::Error>() {
                    Some(tokio_tungstenite::tungstenite::Error::Http(r)) => Some(r.status()),
                    _ => None,
                };
                anyhow::ensure!(
                    status.is_none_or(|s| s == StatusCode::SERVICE_UNAVAILABLE),
                    "{user}: upgrade refused with {status:?}: {e:#}"
                );
                refused.fetch_add(1, Ordering::Relaxed);
                attempt = (attempt + 1).min(5);
                // Exponential back-off with full jitter, as the SDKs do (a client's pause,
                // not a wait for something to happen).
                let cap_ms = 20u64 << attempt;
                tokio::time::sleep(Duration::from_millis(rand::random_range(0..=cap_ms))).await;
            }
            Err(e) => return Err(e.context(format!("{user} not back within the deadline"))),
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reconnect_storm_loses_nothing_and_duplicates_nothing() -> anyhow::Result<()> {
    let nats = Nats::single().await?;
    let mut herald = Herald::builder(&nats)
        .gateway(tight_admission())
        .start()
        .await?;
    // Producers keep sending through another API process while the gateway is down.
    let producer = Herald::builder(&nats).roles(Roles::API).start().await?;
    let refused = AtomicU64::new(0);

    // Everyone connects (admission spreads it) and receives a first notification.
    let mut positions = Vec::with_capacity(CLIENTS);
    let clients: Vec<WsClient> = futures::stream::iter(0..CLIENTS)
        .map(|i| {
            let (herald, refused) = (&herald, &refused);
            async move { reconnect(herald, &user(i), 0, refused).await }
        })
        .buffered(32)
        .collect::<Vec<_>>()
        .await
        .into_iter()
        .collect::<anyhow::Result<_>>()?;
    for (i, mut ws) in clients.into_iter().enumerate() {
        ws.hello().await?;
        let first = producer.send(&user(i), "before").await?;
        let got = ws.take(1).await?;
        assert_eq!(got[0]["id"], first.id.as_str());
        positions.push(first.seq);
        drop(ws);
    }

    // The gateway goes away; one notification per user is accepted meanwhile.
    herald.stop().await?;
    let mut during = Vec::with_capacity(CLIENTS);
    for i in 0..CLIENTS {
        during.push(producer.send(&user(i), "during the outage").await?);
    }
    herald.start_again().await?;

    // The storm: every client at once, each from its own last seq.
    refused.store(0, Ordering::Relaxed);
    let back: Vec<WsClient> = futures::future::join_all((0..CLIENTS).map(|i| {
        let (herald, refused, after) = (&herald, &refused, positions[i]);
        async move { reconnect(herald, &user(i), after, refused).await }
    }))
    .await
    .into_iter()
    .collect::<anyhow::Result<_>>()?;
    let refusals = refused.load(Ordering::Relaxed);
    assert!(
        refusals > 0,
        "admission refused nobody: the storm did not test it"
    );

    // Each replays exactly the one sent during the outage; then a live one arrives next,
    // so nothing was delivered twice in between.
    for (i, mut ws) in back.into_iter().enumerate() {
        let hello = ws.hello().await?;
        assert_eq!(hello["last_seq"], during[i].seq, "{}", user(i));
        let replayed = ws.take(1).await?;
        assert_eq!(replayed.len(), 1, "{}: {replayed:?}", user(i));
        assert_eq!(replayed[0]["id"], during[i].id.as_str(), "{}", user(i));
        let after = producer.send(&user(i), "after").await?;
        let live = ws.take(1).await?;
        assert_eq!(
            live.iter().map(|n| n["id"].clone()).collect::<Vec<_>>(),
            vec![serde_json::Value::from(after.id.as_str())],
            "{}: the next frame is the live one, no duplicate before it",
            user(i)
        );
    }
    producer.shutdown().await?;
    herald.shutdown().await?;
    Ok(())
}
