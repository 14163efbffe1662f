//! A client that stops reading: once its bounded queue is full the gateway ends
//! it (4008, or a dropped socket when not even the close frame fits), without delaying
//! anyone else, and it resumes from its last seq (over WebSocket or SSE) with nothing
//! lost and nothing repeated, however much longer the replay is than the queue. An SSE
//! response the server cannot end while its socket takes nothing keeps the user's place
//! until it closes; a client whose live messages overflow mid-replay still follows a
//! topic it joins meanwhile.

use anyhow::{Context as _, bail, ensure};
use futures::{SinkExt as _, StreamExt as _};
use herald_tests::ws::FRAME_TIMEOUT;
use herald_tests::{Herald, Nats, Resume, eventually, seqs, within};
use serde_json::{Value, json};
use std::time::Duration;
use tokio::net::TcpStream;
use tokio_tungstenite::WebSocketStream;
use tokio_tungstenite::tungstenite::client::IntoClientRequest as _;
use tokio_tungstenite::tungstenite::http::{HeaderValue, header};
use tokio_tungstenite::tungstenite::{self, Message};

/// Frames a connection may have queued before it counts as too slow (the default is
/// 1,024; small here so a few notifications fill it).
const QUEUE_FRAMES: usize = 8;

/// A WebSocket as `user` over a socket with a 4 KiB receive buffer, which reads its
/// `hello` and then nothing: the gateway's writes back up after a few frames.
async fn stalled(herald: &Herald, user: &str) -> anyhow::Result<WebSocketStream<TcpStream>> {
    stalled_at(herald, user, "/v1/ws").await
}

/// [`stalled`] on another path (`/v1/ws?after=0` to replay).
async fn stalled_at(
    herald: &Herald,
    user: &str,
    path: &str,
) -> anyhow::Result<WebSocketStream<TcpStream>> {
    let url = herald.ws_url(path);
    let addr: std::net::SocketAddr = url
        .trim_start_matches("ws://")
        .split('/')
        .next()
        .context("no address in the url")?
        .parse()?;
    let socket = tokio::net::TcpSocket::new_v4()?;
    socket.set_recv_buffer_size(4096)?;
    let stream = socket.connect(addr).await?;
    let mut request = url.into_client_request()?;
    let bearer = HeaderValue::from_str(&format!("Bearer {}", herald.token(user)))?;
    request.headers_mut().insert(header::AUTHORIZATION, bearer);
    let (mut ws, _) = within(
        FRAME_TIMEOUT,
        "websocket upgrade",
        tokio_tungstenite::client_async(request, stream),
    )
    .await??;
    match within(FRAME_TIMEOUT, "hello", ws.next()).await? {
        Some(Ok(Message::Text(text))) if text.as_str().contains("\"hello\"") => Ok(ws),
        other => bail!("expected a hello, got {other:?}"),
    }
}

/// Reads a stalled socket to its end: the seqs that reached it, in order, and how it
/// ended (the close code, if a close frame made it).
async fn drain(mut ws: WebSocketStream<TcpStream>) -> anyhow::Result<(Vec<u64>, Option<u16>)> {
    let mut seqs = Vec::new();
    loop {
        let next = within(FRAME_TIMEOUT, "the stalled socket's backlog", ws.next()).await?;
        match next {
            Some(Ok(Message::Text(text))) => {
                let frame: Value = serde_json::from_str(text.as_str())?;
                let items = match frame["type"].as_str() {
                    Some("notification") => vec![frame],
                    Some("batch") => frame["items"].as_array().cloned().unwrap_or_default(),
                    _ => Vec::new(),
                };
                for item in items {
                    seqs.push(item["seq"].as_u64().context("notification without seq")?);
                }
            }
            Some(Ok(Message::Close(frame))) => {
                return Ok((seqs, frame.map(|f| u16::from(f.code))));
            }
            Some(Ok(_)) => {}
            // The server dropped the socket: its close frame did not fit.
            Some(Err(tungstenite::Error::Protocol(_) | tungstenite::Error::Io(_))) | None => {
                return Ok((seqs, None));
            }
            Some(Err(e)) => return Err(e.into()),
        }
    }
}

async fn slow_closes(herald: &Herald) -> anyhow::Result<f64> {
    let text = herald.metrics().await?;
    Ok(text
        .lines()
        .find(|l| l.starts_with("herald_gateway_slow_consumer_closes_total"))
        .and_then(|l| l.rsplit(' ').next()?.parse().ok())
        .unwrap_or(0.0))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_stops_reading_is_ended_alone_and_resumes_without_loss() -> anyhow::Result<()>
{
    let nats = Nats::single().await?;
    let herald = Herald::builder(&nats)
        .gateway(herald_gateway::GatewayConfig {
            queue_frames: QUEUE_FRAMES,
            ..Default::default()
        })
        .start()
        .await?;
    let mut fast = herald.ws("fast", Resume::Live).await?;
    fast.hello().await?;
    let slow = stalled(&herald, "slow").await?;
    // Metrics are process-wide (tests run in parallel): count from here.
    let closes_before = slow_closes(&herald).await?;

    // 400 notifications of 16 KiB (6.4 MB, more than a loopback socket's send buffer
    // grows to) for the stalled client, 8 requests at a time; the fast client is served
    // all the while.
    let flood = async {
        let body = "x".repeat(16 * 1024);
        let herald = &herald;
        let mut seqs: Vec<u64> = futures::stream::iter(0..400)
            .map(|i| {
                let n = json!({"user_id": "slow", "title": format!("n{i}"), "body": body});
                async move { herald.accept(&n).await.map(|a| a.seq) }
            })
            .buffer_unordered(8)
            .collect::<Vec<_>>()
            .await
            .into_iter()
            .collect::<anyhow::Result<_>>()?;
        seqs.sort_unstable();
        anyhow::Ok(seqs)
    };
    let served = async {
        for i in 0..5 {
            let f = herald.send("fast", &format!("f{i}")).await?;
            assert_eq!(fast.take(1).await?[0]["seq"], f.seq);
        }
        anyhow::Ok(())
    };
    let (sent, served) = tokio::join!(flood, served);
    served?;
    let sent = sent?;
    eventually(
        Duration::from_secs(20),
        "the gateway ends the slow client",
        || async {
            let closes = slow_closes(&herald).await?;
            ensure!(closes > closes_before, "slow-consumer closes: {closes}");
            Ok(())
        },
    )
    .await?;

    // What reached the socket is the start of what was sent, in order; then the
    // connection ended from the server's side (we never closed it).
    let (seen, code) = drain(slow).await?;
    ensure!(
        seen.len() < sent.len(),
        "all {} arrived: the client was not slow",
        sent.len()
    );
    assert_eq!(seen, sent[..seen.len()], "a prefix, in order");
    if let Some(code) = code {
        assert_eq!(code, 4008, "closed as a slow consumer");
    }

    // It resumes after the last seq it saw: the rest, once each, in order.
    let last = seen.last().copied().unwrap_or(0);
    let mut again = herald.ws("slow", Resume::After(last)).await?;
    again.hello().await?;
    let rest = seqs(&again.take(sent.len() - seen.len()).await?);
    assert_eq!(rest, sent[seen.len()..]);
    // Over SSE too: the replay waits for the client instead of ending its stream.
    let mut sse = herald.sse("slow", Resume::LastEventId(last)).await?;
    let rest = seqs(&sse.take(sent.len() - seen.len()).await?);
    assert_eq!(rest, sent[seen.len()..], "over SSE");

    // And the fast client was never disturbed.
    let f = herald.send("fast", "after").await?;
    assert_eq!(fast.take(1).await?[0]["seq"], f.seq);
    Ok(())
}

/// A client on a slow link mid-replay (the gateway's queue full by design, the feed
/// waiting for it to read) that sends a `subscribe` gets its answer after the replay's
/// queued frames, and is not closed as a slow consumer for it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_answer_during_a_slow_replay_does_not_close_the_client() -> anyhow::Result<()> {
    const STORED: usize = 2_000;
    let nats = Nats::single().await?;
    let herald = Herald::builder(&nats)
        .gateway(herald_gateway::GatewayConfig {
            queue_frames: QUEUE_FRAMES,
            ..Default::default()
        })
        .start()
        .await?;
    for chunk in 0..STORED / 100 {
        let batch: Vec<Value> = (0..100)
            .map(|i| json!({"user_id": "sid", "title": format!("n{}", chunk * 100 + i), "body": "x".repeat(200)}))
            .collect();
        let r = herald
            .producer(reqwest::Method::POST, "/v1/notify/batch")
            .json(&json!({ "notifications": batch }))
            .send()
            .await?;
        ensure!(r.status() == 202, "batch: {}", r.status());
    }
    let mut ws = stalled_at(&herald, "sid", "/v1/ws?after=0").await?;
    ws.send(Message::text(r#"{"type":"subscribe","topic":"news"}"#))
        .await?;
    let mut seqs = Vec::new();
    let mut answered = false;
    while seqs.len() < STORED || !answered {
        let next = within(FRAME_TIMEOUT, "the replay and the answer", ws.next()).await?;
        match next {
            Some(Ok(Message::Text(text))) => {
                let frame: Value = serde_json::from_str(text.as_str())?;
                match frame["type"].as_str() {
                    Some("notification") => seqs.push(frame["seq"].as_u64().context("seq")?),
                    Some("batch") => {
                        for item in frame["items"].as_array().context("items")? {
                            seqs.push(item["seq"].as_u64().context("seq")?);
                        }
                    }
                    Some("subscription") => answered = true,
                    _ => {}
                }
            }
            Some(Ok(Message::Close(frame))) => bail!("closed mid-replay: {frame:?}"),
            Some(Ok(_)) => {}
            other => bail!("the socket ended mid-replay: {other:?}"),
        }
    }
    ensure!(
        seqs.windows(2).all(|w| w[0] < w[1]),
        "in order, no duplicate"
    );
    Ok(())
}

/// An SSE client that stops reading, over a socket with a 4 KiB receive buffer: it reads
/// the response head and the `hello`, then nothing.
async fn stalled_sse(herald: &Herald, user: &str) -> anyhow::Result<TcpStream> {
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
    let addr: std::net::SocketAddr = herald.base_url().trim_start_matches("http://").parse()?;
    let socket = tokio::net::TcpSocket::new_v4()?;
    socket.set_recv_buffer_size(4096)?;
    let mut stream = socket.connect(addr).await?;
    let request = format!(
        "GET /v1/sse HTTP/1.1\r\nHost: {addr}\r\nAccept: text/event-stream\r\n\
         Authorization: Bearer {}\r\n\r\n",
        herald.token(user)
    );
    stream.write_all(request.as_bytes()).await?;
    let mut head = Vec::new();
    while !String::from_utf8_lossy(&head).contains("event: hello") {
        let mut buf = [0_u8; 512];
        let n = within(FRAME_TIMEOUT, "the hello", stream.read(&mut buf)).await??;
        ensure!(
            n > 0,
            "the stream ended: {}",
            String::from_utf8_lossy(&head)
        );
        head.extend_from_slice(&buf[..n]);
    }
    ensure!(
        head.starts_with(b"HTTP/1.1 200"),
        "{}",
        String::from_utf8_lossy(&head)
    );
    Ok(stream)
}

/// An SSE client too slow for its queue has its session ended at once (its feed, queue
/// and live registration), even though the server cannot end the response while the
/// client's socket takes nothing: that response keeps the user's place under the
/// per-user cap until the socket closes, so a client cannot open stream after stream by
/// letting each one stall.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stalled_sse_response_keeps_its_place_until_its_socket_closes() -> anyhow::Result<()> {
    let nats = Nats::single().await?;
    let herald = Herald::builder(&nats)
        .gateway(herald_gateway::GatewayConfig {
            queue_frames: QUEUE_FRAMES,
            limits: herald_gateway::admission::Limits {
                max_per_user: 1,
                ..Default::default()
            },
            ..Default::default()
        })
        .start()
        .await?;
    let user = "zed";
    let live = herald.subjects().live(&herald_protocol::UserId::new(user)?);
    let zombie = stalled_sse(&herald, user).await?;
    let closes_before = slow_closes(&herald).await?;
    // More than the socket buffers and the queue hold (see the WebSocket test above).
    let body = "x".repeat(16 * 1024);
    let herald_ref = &herald;
    futures::stream::iter(0..400)
        .map(|i| {
            let n = json!({"user_id": user, "title": format!("n{i}"), "body": body});
            async move { herald_ref.accept(&n).await }
        })
        .buffer_unordered(8)
        .collect::<Vec<_>>()
        .await
        .into_iter()
        .collect::<anyhow::Result<Vec<_>>>()?;
    eventually(
        Duration::from_secs(20),
        "the gateway ends the slow session",
        || async {
            let closes = slow_closes(&herald).await?;
            ensure!(closes > closes_before, "slow-consumer closes: {closes}");
            ensure!(
                !herald.is_tapped(&live),
                "the feed still holds the live subject"
            );
            Ok(())
        },
    )
    .await?;
    // The response is still open (the client never reads it): it holds the one place.
    let second = herald
        .user(reqwest::Method::GET, "/v1/sse", user)
        .send()
        .await?;
    ensure!(
        second.status() == reqwest::StatusCode::TOO_MANY_REQUESTS,
        "a second stream while the stalled one is open: {}",
        second.status()
    );
    // Once the socket closes, the place is free again.
    drop(zombie);
    eventually(Duration::from_secs(10), "the place is freed", || async {
        let mut sse = herald.sse(user, Resume::Live).await?;
        ensure!(sse.next_event().await?.event == "hello");
        Ok(())
    })
    .await?;
    Ok(())
}

/// A client mid-replay on a slow link, whose live messages overflow the hub's tap (by
/// design: the replay reads them from the inbox), joins a big topic. The announcement
/// that its topics changed was dropped with the overflow, and is stored nowhere: the
/// feed reads the topics again after any loss, so it follows the topic once the replay
/// is over.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_topic_joined_while_live_messages_overflow_is_still_followed() -> anyhow::Result<()> {
    const STORED: usize = 2_000;
    const LIVE: usize = 100;
    let nats = Nats::single().await?;
    let herald = Herald::builder(&nats)
        .gateway(herald_gateway::GatewayConfig {
            queue_frames: QUEUE_FRAMES,
            ..Default::default()
        })
        .topics(herald_api::TopicSettings {
            big_threshold: 0,
            self_subscribe: vec!["public.*".into()],
        })
        .start()
        .await?;
    let user = "tia";
    let batch = |from: usize, count: usize| {
        let items: Vec<Value> = (from..from + count)
            .map(|i| json!({"user_id": user, "title": format!("n{i}"), "body": "x".repeat(1000)}))
            .collect();
        herald
            .producer(reqwest::Method::POST, "/v1/notify/batch")
            .json(&json!({ "notifications": items }))
            .send()
    };
    for chunk in 0..STORED / 100 {
        let r = batch(chunk * 100, 100).await?;
        ensure!(r.status() == 202, "batch: {}", r.status());
    }
    let mut ws = stalled_at(&herald, user, "/v1/ws?after=0").await?;
    // Live messages while the replay waits on the client: the tap overflows. The hub
    // offers each to both of the user's connections at once, so once a second one that
    // reads has them all, the stalled one's tap has had them too.
    let mut watcher = herald.ws(user, Resume::Live).await?;
    watcher.hello().await?;
    let r = batch(STORED, LIVE).await?;
    ensure!(r.status() == 202, "batch: {}", r.status());
    within(Duration::from_secs(20), "the live ones", watcher.take(LIVE)).await??;
    let joined = herald
        .user(reqwest::Method::POST, "/v1/me/subscriptions", user)
        .json(&json!({"topic": "public.a"}))
        .send()
        .await?;
    ensure!(joined.status().is_success(), "join: {}", joined.status());

    // The replay and the live messages, then a publish to the topic: it comes live.
    let mut seen = Vec::new();
    let mut published = None;
    loop {
        let next = within(FRAME_TIMEOUT, "the replay, then the topic", ws.next()).await?;
        let frame: Value = match next {
            Some(Ok(Message::Text(text))) => serde_json::from_str(text.as_str())?,
            Some(Ok(Message::Close(frame))) => bail!("closed: {frame:?}"),
            Some(Ok(_)) => continue,
            other => bail!("the socket ended: {other:?}"),
        };
        let items = match frame["type"].as_str() {
            Some("notification") => vec![frame],
            Some("batch") => frame["items"].as_array().cloned().unwrap_or_default(),
            _ => Vec::new(),
        };
        for item in items {
            seen.push(item["seq"].as_u64().context("seq")?);
            if item["topic"] == "public.a" {
                ensure!(item["seq"].as_u64() == published, "{item}");
                ensure!(seen.windows(2).all(|w| w[0] < w[1]), "in order");
                return Ok(());
            }
        }
        if seen.len() >= STORED + LIVE && published.is_none() {
            let answer = herald
                .producer(reqwest::Method::POST, "/v1/topics/public.a/publish")
                .json(&json!({"title": "now", "channels": ["inbox"]}))
                .send()
                .await?;
            ensure!(answer.status() == 202, "publish: {}", answer.status());
            let answer: Value = answer.json().await?;
            published = Some(answer["seq"].as_u64().context("seq")?);
        }
    }
}
