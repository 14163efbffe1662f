//! herald-client against a gateway whose network goes silent — no FIN, no RST, nothing
//! more: the connection is kept while pings (WebSocket) or keep-alive comments (SSE)
//! arrive, taken as dead once nothing has arrived for the configured number of
//! heartbeats, and reopened from the last seq. The gateways here are small local servers
//! that greet, deliver one notification, keep the connection alive for a while and then
//! hold it open without a word.

use anyhow::{Context as _, ensure};
use futures::SinkExt as _;
use herald_client::{Client, Mode, State};
use herald_tests::within;
use std::time::Duration;
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::net::TcpListener;
use tokio::sync::mpsc;
use tokio::time::Instant;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::handshake::server::{Request, Response};

/// Bound on one expected event.
const WAIT: Duration = Duration::from_secs(15);
/// The interval the servers announce in their hello (`heartbeat_s`).
const HEARTBEAT: Duration = Duration::from_secs(1);
/// Heartbeats the client lets pass in silence.
const BEATS: u32 = 2;
/// How long the servers keep a connection alive before they fall silent.
const ALIVE_FOR: Duration = Duration::from_millis(1500);
/// How often they ping (or comment) meanwhile: four times a heartbeat, as a live
/// connection would be heard of at least once a heartbeat.
const KEEP_ALIVE_EVERY: Duration = Duration::from_millis(250);
/// The seq the servers' inbox ends at, and the one notification they deliver.
const LAST_SEQ: u64 = 7;

/// One connection a server accepted.
struct Opened {
    at: Instant,
    /// The query of the request (the resume position).
    query: String,
}

fn hello() -> String {
    serde_json::json!({
        "type": "hello", "user_id": "quiet", "last_seq": LAST_SEQ, "unread": 0,
        "heartbeat_s": HEARTBEAT.as_secs(),
    })
    .to_string()
}

fn notification() -> String {
    serde_json::json!({
        "type": "notification", "id": "n8", "seq": LAST_SEQ + 1, "user_id": "quiet",
        "category": null, "priority": "normal", "title": "before the silence", "body": null,
        "data": {}, "topic": null, "created_at": "2025-01-01T00:00:00Z", "read": false,
    })
    .to_string()
}

/// A WebSocket gateway that greets, delivers, pings for [`ALIVE_FOR`] and then holds the
/// connection without reading or writing. Reports every connection it accepts.
async fn silent_ws_gateway() -> anyhow::Result<(String, mpsc::UnboundedReceiver<Opened>)> {
    let listener = TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    let (opened, events) = mpsc::unbounded_channel();
    tokio::spawn(async move {
        while let Ok((socket, _)) = listener.accept().await {
            let opened = opened.clone();
            tokio::spawn(async move {
                let at = Instant::now();
                let mut query = String::new();
                #[expect(clippy::result_large_err, reason = "tungstenite's callback signature")]
                let record = |request: &Request, response: Response| {
                    query = request.uri().query().unwrap_or_default().to_owned();
                    Ok(response)
                };
                let Ok(mut ws) = tokio_tungstenite::accept_hdr_async(socket, record).await else {
                    return;
                };
                let _ = opened.send(Opened { at, query });
                let _ = ws.send(Message::text(hello())).await;
                let _ = ws.send(Message::text(notification())).await;
                while at.elapsed() < ALIVE_FOR {
                    tokio::time::sleep(KEEP_ALIVE_EVERY).await;
                    let _ = ws.send(Message::Ping(Default::default())).await;
                }
                // Silence: the socket stays open, as after a network that vanished.
                std::future::pending::<()>().await;
                drop(ws);
            });
        }
    });
    Ok((format!("ws://{addr}/v1/ws"), events))
}

/// An SSE gateway that greets, delivers, sends keep-alive comments (the only thing an
/// SSE server sends when idle) for [`ALIVE_FOR`] and then holds the stream in silence.
async fn silent_sse_gateway() -> anyhow::Result<(String, mpsc::UnboundedReceiver<Opened>)> {
    let listener = TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    let (opened, events) = mpsc::unbounded_channel();
    tokio::spawn(async move {
        while let Ok((mut socket, _)) = listener.accept().await {
            let opened = opened.clone();
            tokio::spawn(async move {
                let at = Instant::now();
                let mut request = vec![0u8; 8192];
                let Ok(n) = socket.read(&mut request).await else {
                    return;
                };
                let head = String::from_utf8_lossy(&request[..n]);
                let target = head.split(' ').nth(1).unwrap_or_default();
                let query = target.split_once('?').map(|(_, q)| q).unwrap_or_default();
                let _ = opened.send(Opened {
                    at,
                    query: query.to_owned(),
                });
                let start = format!(
                    "HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ncache-control: no-cache\r\n\
                     connection: close\r\n\r\nevent: hello\ndata: {}\n\nid: {}\nevent: notification\ndata: {}\n\n",
                    hello(),
                    LAST_SEQ + 1,
                    notification()
                );
                let _ = socket.write_all(start.as_bytes()).await;
                while at.elapsed() < ALIVE_FOR {
                    tokio::time::sleep(KEEP_ALIVE_EVERY).await;
                    let _ = socket.write_all(b":\n\n").await;
                }
                std::future::pending::<()>().await;
                drop(socket);
            });
        }
    });
    Ok((format!("http://{addr}"), events))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_silent_connection_is_dropped_and_resumed_after_the_missed_heartbeats()
-> anyhow::Result<()> {
    for mode in [Mode::WebSocket, Mode::Sse] {
        let (builder, mut opened) = match mode {
            Mode::Sse => {
                let (base, opened) = silent_sse_gateway().await?;
                (Client::builder(base), opened)
            }
            _ => {
                let (ws_url, opened) = silent_ws_gateway().await?;
                // Never asked: HTTP is used only once WebSocket fails to open.
                (Client::builder("http://127.0.0.1:9").ws_url(ws_url), opened)
            }
        };
        let mut client = builder
            .token("a-token")
            .mode(mode)
            .missed_heartbeats(BEATS)
            .backoff(Duration::from_millis(10), Duration::from_millis(50))
            .connect()?;
        let first = within(WAIT, "the first connection", opened.recv())
            .await?
            .context("server gone")?;
        ensure!(
            first.query.is_empty(),
            "{mode:?}: live only: {}",
            first.query
        );
        let note = within(WAIT, "the notification", client.next())
            .await?
            .context("client closed")?;
        ensure!(note.seq == LAST_SEQ + 1, "{mode:?}: {note:?}");

        let second = within(WAIT, "a reconnect after the silence", opened.recv())
            .await?
            .context("server gone")?;
        ensure!(
            second.query == format!("after={}", LAST_SEQ + 1),
            "{mode:?}: resumes from the last seq: {}",
            second.query
        );
        // Not before the keep-alives stopped and two heartbeats passed after the last one
        // (not one, and not counted from the last *frame*: that would be at about 2 s)...
        let gap = second.at - first.at;
        let limit = HEARTBEAT * BEATS;
        ensure!(
            gap >= ALIVE_FOR - KEEP_ALIVE_EVERY + limit,
            "{mode:?}: reconnected after {gap:?}, while pings still came or too soon after"
        );
        // ...and soon after: the silence limit, then one back-off step (under 50 ms).
        ensure!(
            gap < ALIVE_FOR + limit + Duration::from_secs(2),
            "{mode:?}: reconnected only after {gap:?}"
        );
        let status = client.status();
        ensure!(status.reconnects >= 1, "{mode:?}: {status:?}");
        let error = status.last_error.unwrap_or_default();
        ensure!(
            error.contains("nothing received"),
            "{mode:?}: the reason is told: {error}"
        );
        let mut watch = client.watch();
        within(
            WAIT,
            "live again",
            watch.wait_for(|s| s.state == State::Live),
        )
        .await??;
        client.close().await;
    }
    Ok(())
}
