//! The side-by-side of `herald bench conns`: the same N idle clients on nats-server's own
//! WebSocket listener (a second nats-server, so its memory is its own), each subscribed to
//! one subject, then one core message to each. What a bare NATS WebSocket costs, beside
//! what a Herald connection (auth, replay, resume, receipts) costs.

use super::BenchError;
use super::fleet::{Fleet, rss_bytes};
use futures::{SinkExt as _, StreamExt as _};
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;

/// What the side-by-side measured.
pub(super) struct NatsWs {
    pub(super) rss_per_conn: f64,
    pub(super) connects_per_sec: f64,
    pub(super) delivery: hdrhistogram::Histogram<u64>,
    pub(super) all_ms: f64,
}

pub(super) async fn run(n: usize, dir: &std::path::Path) -> Result<NatsWs, BenchError> {
    let server =
        herald_natsd::NatsServer::start(herald_natsd::NatsServerOptions::dev(dir.join("natsws")))
            .await?;
    let ws_url = server
        .websocket_url()
        .ok_or("nats-server has no websocket listener")?;
    let rss_before = rss_bytes(server.pid())?;
    let fleet = Fleet::new()?;
    let connecting = Arc::new(tokio::sync::Semaphore::new(256));
    let mut clients = tokio::task::JoinSet::new();
    let started = Instant::now();
    for i in 0..n {
        let permit = connecting.clone().acquire_owned().await?;
        clients.spawn(client(
            fleet.clone(),
            ws_url.clone(),
            format!("live.c-{i}"),
            permit,
        ));
    }
    super::load::wait_for(
        || fleet.connected.load(Ordering::Relaxed) >= n as u64,
        300,
        "nats ws clients connected",
    )
    .await?;
    let connects_per_sec = n as f64 / started.elapsed().as_secs_f64();
    tokio::time::sleep(Duration::from_secs(2)).await;
    let rss_after = rss_bytes(server.pid())?;

    let publisher = async_nats::connect(server.client_url()).await?;
    let start = fleet.now_us();
    for i in 0..n {
        let payload = fleet.now_us().to_string();
        publisher
            .publish(format!("live.c-{i}"), payload.into())
            .await?;
    }
    publisher.flush().await?;
    let _ = super::load::wait_for(
        || fleet.received.load(Ordering::Relaxed) >= n as u64,
        60,
        "nats ws delivered",
    )
    .await;
    let all_ms = (fleet.now_us() - start) as f64 / 1000.0;
    let delivery = Fleet::snapshot(&fleet.delivery)?;
    fleet.stop.cancel();
    while clients.join_next().await.is_some() {}
    drop(server);
    Ok(NatsWs {
        rss_per_conn: rss_after.saturating_sub(rss_before) as f64 / n as f64,
        connects_per_sec,
        delivery,
        all_ms,
    })
}

/// The ceiling of `herald bench fanout`: `n` clients on nats-server's WebSocket listener
/// (a nats-server of its own) all subscribed to one subject, and one core publish to it.
pub(super) async fn run_fanout(n: usize, dir: &std::path::Path) -> Result<NatsWs, BenchError> {
    let server = herald_natsd::NatsServer::start(herald_natsd::NatsServerOptions::dev(
        dir.join("natsws-fanout"),
    ))
    .await?;
    let ws_url = server
        .websocket_url()
        .ok_or("nats-server has no websocket listener")?;
    let fleet = Fleet::new()?;
    let connecting = Arc::new(tokio::sync::Semaphore::new(256));
    let mut clients = tokio::task::JoinSet::new();
    let started = Instant::now();
    for _ in 0..n {
        let permit = connecting.clone().acquire_owned().await?;
        clients.spawn(client(
            fleet.clone(),
            ws_url.clone(),
            "topic.big".into(),
            permit,
        ));
    }
    super::load::wait_for(
        || fleet.connected.load(Ordering::Relaxed) >= n as u64,
        300,
        "nats ws clients connected",
    )
    .await?;
    let connects_per_sec = n as f64 / started.elapsed().as_secs_f64();
    let publisher = async_nats::connect(server.client_url()).await?;
    let start = fleet.now_us();
    publisher
        .publish("topic.big", fleet.now_us().to_string().into())
        .await?;
    publisher.flush().await?;
    super::load::wait_for(
        || fleet.received.load(Ordering::Relaxed) >= n as u64,
        60,
        "nats ws fan-out delivered",
    )
    .await?;
    let all_ms = (fleet.now_us() - start) as f64 / 1000.0;
    let delivery = Fleet::snapshot(&fleet.delivery)?;
    fleet.stop.cancel();
    while clients.join_next().await.is_some() {}
    drop(server);
    Ok(NatsWs {
        rss_per_conn: 0.0,
        connects_per_sec,
        delivery,
        all_ms,
    })
}

/// One client of the side-by-side: subscribes to `live.c-{i}` and counts what arrives
/// (also run by the client worker processes of the multi-process run).
pub(super) async fn client(
    fleet: Arc<Fleet>,
    url: String,
    subject: String,
    permit: tokio::sync::OwnedSemaphorePermit,
) {
    let config = WebSocketConfig::default()
        .read_buffer_size(4096)
        .write_buffer_size(0);
    let Ok((mut ws, _)) =
        tokio_tungstenite::connect_async_with_config(url, Some(config), true).await
    else {
        return;
    };
    let hello = format!(
        "CONNECT {{\"verbose\":false,\"pedantic\":false,\"protocol\":1}}\r\nSUB {subject} 1\r\nPING\r\n"
    );
    if ws.send(Message::binary(hello.into_bytes())).await.is_err() {
        return;
    }
    drop(permit);
    let mut ready = false;
    loop {
        let msg = tokio::select! {
            msg = ws.next() => msg,
            () = fleet.stop.cancelled() => break,
        };
        let Some(Ok(msg)) = msg else { break };
        let data = match &msg {
            Message::Binary(b) => String::from_utf8_lossy(b).into_owned(),
            Message::Text(t) => t.as_str().to_string(),
            _ => continue,
        };
        let mut lines = data.split("\r\n");
        while let Some(line) = lines.next() {
            if line == "PONG" && !ready {
                ready = true;
                fleet.connected.fetch_add(1, Ordering::Relaxed);
            } else if line == "PING" {
                let _ = ws.send(Message::binary(b"PONG\r\n".to_vec())).await;
            } else if line.starts_with("MSG ")
                && let Some(sent) = lines.next().and_then(|p| p.parse::<u64>().ok())
            {
                fleet.received.fetch_add(1, Ordering::Relaxed);
                if let Ok(mut h) = fleet.delivery.lock() {
                    let _ = h.record(fleet.now_us().saturating_sub(sent).max(1));
                }
            }
        }
    }
}
