//! herald-client against a real Herald (real nats-server, the mesh in-process): live
//! delivery on both transports, resume across forced reconnects and a server restart
//! with nothing lost or repeated, the SSE fallback, and read positions.

use anyhow::{Context as _, ensure};
use herald::mesh::Roles;
use herald_client::{Client, Mode, State, Status, Transport};
use herald_tests::{Accepted, Herald, Nats, eventually, within};
use reqwest::Method;
use std::time::Duration;

/// Bound on one expected event.
const WAIT: Duration = Duration::from_secs(15);

async fn until(
    client: &Client,
    what: &str,
    pred: impl Fn(&Status) -> bool,
) -> anyhow::Result<Status> {
    let mut watch = client.watch();
    let status = within(WAIT, what, watch.wait_for(pred))
        .await?
        .context("client task ended")?
        .clone();
    Ok(status)
}

/// The next `n` notifications, each within [`WAIT`].
async fn take(client: &mut Client, n: usize) -> anyhow::Result<Vec<herald_client::Notification>> {
    let mut got = Vec::with_capacity(n);
    while got.len() < n {
        let note = within(
            WAIT,
            &format!("notification {} of {n}", got.len() + 1),
            client.next(),
        )
        .await?
        .context("client closed")?;
        got.push(note);
    }
    Ok(got)
}

fn seqs(sent: &[Accepted]) -> Vec<u64> {
    sent.iter().map(|a| a.seq).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn live_delivery_over_both_transports() -> anyhow::Result<()> {
    let nats = Nats::single().await?;
    let herald = Herald::builder(&nats).start().await?;
    for (mode, transport) in [
        (Mode::WebSocket, Transport::WebSocket),
        (Mode::Sse, Transport::Sse),
    ] {
        let user = format!("rust-live-{mode:?}");
        let before = herald.send(&user, "before").await?;
        let mut client = Client::builder(herald.base_url())
            .token(herald.token(&user))
            .mode(mode)
            .connect()?;
        let status = until(&client, "live", |s| s.state == State::Live).await?;
        assert_eq!(status.transport, Some(transport));
        assert_eq!(status.unread, 1);
        assert_eq!(
            status.last_seq,
            Some(before.seq),
            "live only: resumes from where it started"
        );
        let live = herald.send(&user, "live").await?;
        let got = take(&mut client, 1).await?;
        assert_eq!(got[0].id, live.id);
        assert_eq!(got[0].seq, live.seq);
        assert_eq!(got[0].title.as_deref(), Some("live"));
        let status = until(&client, "counted", |s| s.unread == 2).await?;
        assert_eq!(status.last_seq, Some(live.seq));
        client.close().await;
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forced_reconnects_lose_nothing_and_repeat_nothing() -> anyhow::Result<()> {
    let nats = Nats::single().await?;
    let herald = Herald::builder(&nats).start().await?;
    for mode in [Mode::WebSocket, Mode::Sse] {
        let user = format!("rust-resume-{mode:?}");
        let mut client = Client::builder(herald.base_url())
            .token(herald.token(&user))
            .mode(mode)
            .backoff(Duration::from_millis(20), Duration::from_millis(200))
            .connect()?;
        until(&client, "live", |s| s.state == State::Live).await?;
        let mut sent = Vec::new();
        for i in 0..30 {
            sent.push(herald.send(&user, &format!("n{i}")).await?);
            if i % 7 == 3 {
                // A reconnect asked for while one is under way joins it: wait until this
                // one has begun, then keep sending while it reopens.
                let before = client.status().reconnects;
                client.reconnect();
                until(&client, "the reconnect begins", |s| s.reconnects > before).await?;
            }
        }
        let got = take(&mut client, sent.len()).await?;
        assert_eq!(
            got.iter().map(|n| n.seq).collect::<Vec<_>>(),
            seqs(&sent),
            "{mode:?}"
        );
        let status = client.status();
        assert!(
            status.reconnects >= 4,
            "{mode:?}: it reconnected: {status:?}"
        );
        // Nothing more is pending: one more live one is the very next.
        let last = herald.send(&user, "last").await?;
        assert_eq!(take(&mut client, 1).await?[0].id, last.id);
        client.close().await;
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_server_restart_loses_nothing_and_repeats_nothing() -> anyhow::Result<()> {
    let nats = Nats::single().await?;
    let mut herald = Herald::builder(&nats).start().await?;
    let producer = Herald::builder(&nats)
        .roles(Roles {
            api: true,
            gateway: false,
            router: false,
            ingest: false,
        })
        .start()
        .await?;
    let user = "rust-restart";
    let mut client = Client::builder(herald.base_url())
        .token(herald.token(user))
        .after(Some(0))
        .backoff(Duration::from_millis(50), Duration::from_millis(500))
        .connect()?;
    until(&client, "live", |s| s.state == State::Live).await?;
    let mut sent = vec![producer.send(user, "before").await?];
    herald.stop().await?;
    for i in 0..5 {
        sent.push(producer.send(user, &format!("while down {i}")).await?);
    }
    herald.start_again().await?;
    sent.push(producer.send(user, "after").await?);
    let got = take(&mut client, sent.len()).await?;
    assert_eq!(got.iter().map(|n| n.seq).collect::<Vec<_>>(), seqs(&sent));
    let status = until(&client, "live again", |s| s.state == State::Live).await?;
    assert_eq!(
        status.transport,
        Some(Transport::WebSocket),
        "a restart is not a reason to leave WebSocket"
    );
    assert!(status.reconnects >= 1);
    client.close().await;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_position_from_before_the_inbox_was_recreated_gives_way_to_the_new_inbox()
-> anyhow::Result<()> {
    let nats = Nats::single().await?;
    let mut herald = Herald::builder(&nats).start().await?;
    let user = "rust-recreated";
    let mut client = Client::builder(herald.base_url())
        .token(herald.token(user))
        .after(Some(0))
        .backoff(Duration::from_millis(50), Duration::from_millis(500))
        .connect()?;
    let mut old = Vec::new();
    for i in 0..5 {
        old.push(herald.send(user, &format!("old {i}")).await?);
    }
    take(&mut client, old.len()).await?;
    until(&client, "at the old inbox's end", |s| s.last_seq == Some(5)).await?;

    // The INBOX stream is deleted and provisioned again while the client is away: its
    // seqs begin again, below the client's position.
    herald.stop().await?;
    let deleted = nats
        .client()
        .await?
        .request(
            format!("$JS.API.STREAM.DELETE.{}", herald_protocol::streams::INBOX),
            "".into(),
        )
        .await?;
    let deleted = String::from_utf8_lossy(&deleted.payload).into_owned();
    ensure!(deleted.contains(r#""success":true"#), "{deleted}");
    until(&client, "away", |s| s.state != State::Live).await?;
    herald.start_again().await?;
    let mut sent = Vec::new();
    for i in 0..2 {
        sent.push(herald.send(user, &format!("new {i}")).await?);
    }
    // Back (live is only ever the new mesh's now) before the new inbox passes the old
    // position: past it, a position from the old life cannot be told from one of the new.
    until(&client, "live again", |s| s.state == State::Live).await?;
    for i in 2..6 {
        sent.push(herald.send(user, &format!("new {i}")).await?);
    }
    ensure!(seqs(&sent) == [1, 2, 3, 4, 5, 6], "{:?}", seqs(&sent));
    // Up to the last one sent: whatever came before it is all that will.
    let got = within(Duration::from_secs(30), "the new inbox", async {
        let mut got = Vec::new();
        while got.last().map(|n: &herald_client::Notification| n.seq) != Some(6) {
            got.push(client.next().await.context("client closed")?);
        }
        anyhow::Ok(got)
    })
    .await??;
    assert_eq!(
        got.iter().map(|n| n.seq).collect::<Vec<_>>(),
        seqs(&sent),
        "none dropped as delivered before"
    );
    assert_eq!(client.status().last_seq, Some(6));
    client.close().await;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn falls_back_to_sse_when_websocket_is_refused() -> anyhow::Result<()> {
    let nats = Nats::single().await?;
    let herald = Herald::builder(&nats).start().await?;
    let user = "rust-fallback";
    let earlier = herald.send(user, "earlier").await?;
    let mut client = Client::builder(herald.base_url())
        .token(herald.token(user))
        .after(Some(0))
        .ws_url(herald.ws_url("/no-websocket-here"))
        .ws_failures_before_fallback(2)
        .backoff(Duration::from_millis(10), Duration::from_millis(50))
        .connect()?;
    let status = until(&client, "live over SSE", |s| s.state == State::Live).await?;
    assert_eq!(status.transport, Some(Transport::Sse));
    assert!(status.reconnects >= 2, "{status:?}");
    assert_eq!(take(&mut client, 1).await?[0].id, earlier.id);
    let live = herald.send(user, "live over sse").await?;
    assert_eq!(take(&mut client, 1).await?[0].id, live.id);
    client.close().await;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mark_read_reaches_the_server_and_other_devices() -> anyhow::Result<()> {
    let nats = Nats::single().await?;
    let herald = Herald::builder(&nats).start().await?;
    for mode in [Mode::WebSocket, Mode::Sse] {
        let user = format!("rust-read-{mode:?}");
        let mut phone = Client::builder(herald.base_url())
            .token(herald.token(&user))
            .mode(mode)
            .connect()?;
        let laptop = Client::connect(herald.base_url(), herald.token(&user), None)?;
        until(&phone, "phone live", |s| s.state == State::Live).await?;
        until(&laptop, "laptop live", |s| s.state == State::Live).await?;
        let mut sent = Vec::new();
        for i in 0..3 {
            sent.push(herald.send(&user, &format!("r{i}")).await?);
        }
        take(&mut phone, 3).await?;
        until(&phone, "3 unread", |s| s.unread == 3).await?;
        until(&laptop, "3 unread on the laptop", |s| s.unread == 3).await?;

        phone.mark_read(sent[2].seq).await?;
        until(&phone, "0 unread", |s| s.unread == 0).await?;
        until(&laptop, "the laptop hears of it", |s| {
            s.unread == 0 && s.read_up_to == Some(sent[2].seq)
        })
        .await?;
        eventually(WAIT, "GET /v1/me/unread agrees", || async {
            let body: serde_json::Value = herald
                .user(Method::GET, "/v1/me/unread", &user)
                .send()
                .await?
                .json()
                .await?;
            ensure!(
                body["unread"] == 0 && body["last_seq"] == sent[2].seq,
                "{body}"
            );
            Ok(())
        })
        .await?;
        phone.close().await;
        laptop.close().await;
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refused_token_is_replaced_by_the_provider() -> anyhow::Result<()> {
    use std::sync::Arc;
    use std::sync::atomic::{AtomicUsize, Ordering};
    let nats = Nats::single().await?;
    let herald = Herald::builder(&nats).start().await?;
    for mode in [Mode::WebSocket, Mode::Sse] {
        let user = format!("rust-token-{mode:?}");
        let calls = Arc::new(AtomicUsize::new(0));
        let provider: herald_client::TokenProvider = {
            let (calls, good) = (calls.clone(), herald.token(&user));
            Arc::new(move || {
                // The first token is garbage: the server refuses it (401).
                let n = calls.fetch_add(1, Ordering::SeqCst);
                let token = if n == 0 {
                    "not-a-jwt".to_string()
                } else {
                    good.clone()
                };
                Box::pin(async move { Ok(token) })
            })
        };
        let mut client = Client::builder(herald.base_url())
            .token_provider(provider)
            .mode(mode)
            .backoff(Duration::from_millis(10), Duration::from_millis(50))
            .connect()?;
        until(&client, "live with the second token", |s| {
            s.state == State::Live
        })
        .await?;
        assert!(calls.load(Ordering::SeqCst) >= 2, "{mode:?}: asked again");
        let n = herald.send(&user, "after the refresh").await?;
        assert_eq!(take(&mut client, 1).await?[0].id, n.id);
        client.close().await;
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refused_fixed_token_stops_the_client() -> anyhow::Result<()> {
    let nats = Nats::single().await?;
    let herald = Herald::builder(&nats).start().await?;
    let client = Client::connect(herald.base_url(), "not-a-jwt", None)?;
    let status = until(&client, "closed", |s| s.state == State::Closed).await?;
    let error = status.last_error.unwrap_or_default();
    assert!(error.contains("401"), "{error}");
    Ok(())
}

/// The documented loop — read a notification, `mark_read` it, read the next — over a
/// backlog larger than the client's queue: the connection task, waiting for room in the
/// queue, still answers the application's commands, so neither waits on the other.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mark_read_while_the_queue_is_full_does_not_hang() -> anyhow::Result<()> {
    let nats = Nats::single().await?;
    let herald = Herald::builder(&nats).start().await?;
    let user = "rust-full-queue";
    let mut sent = Vec::new();
    for i in 0..8 {
        sent.push(herald.send(user, &format!("q{i}")).await?);
    }
    let mut client = Client::builder(herald.base_url())
        .token(herald.token(user))
        .mode(Mode::WebSocket)
        .queue(2)
        .after(Some(0))
        .connect()?;
    let mut read = Vec::new();
    for _ in 0..sent.len() {
        let note = take(&mut client, 1).await?.remove(0);
        within(
            WAIT,
            "mark_read with a full queue",
            client.mark_read(note.seq),
        )
        .await??;
        read.push(note.seq);
    }
    ensure!(read == seqs(&sent), "{read:?}");
    until(&client, "nothing unread", |s| s.unread == 0).await?;
    client.close().await;
    Ok(())
}

/// A gateway that answers the upgrade with 503 and `Retry-After` is busy, not refusing
/// WebSocket: the client comes back after the wait, on WebSocket, instead of moving to
/// SSE for good.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_busy_gateway_is_retried_not_taken_for_a_websocket_refusal() -> anyhow::Result<()> {
    use std::sync::Arc;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
    let nats = Nats::single().await?;
    let herald = Herald::builder(&nats).start().await?;
    // A gateway in a reconnect storm: every upgrade gets 503, come back in a second.
    let busy = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let addr = busy.local_addr()?;
    let upgrades = Arc::new(AtomicUsize::new(0));
    let seen = upgrades.clone();
    tokio::spawn(async move {
        while let Ok((mut socket, _)) = busy.accept().await {
            seen.fetch_add(1, Ordering::SeqCst);
            let mut request = [0u8; 4096];
            let _ = socket.read(&mut request).await;
            let _ = socket
                .write_all(
                    b"HTTP/1.1 503 Service Unavailable\r\nRetry-After: 1\r\ncontent-length: 0\r\n\r\n",
                )
                .await;
        }
    });
    let client = Client::builder(herald.base_url())
        .token(herald.token("rust-busy"))
        .ws_url(format!("ws://{addr}/v1/ws"))
        .ws_failures_before_fallback(1)
        .connect()?;
    eventually(WAIT, "the client came back to the busy gateway", || async {
        ensure!(upgrades.load(Ordering::SeqCst) >= 2);
        Ok(())
    })
    .await?;
    let status = client.status();
    ensure!(
        status.transport != Some(Transport::Sse),
        "moved to SSE: {status:?}"
    );
    client.close().await;
    Ok(())
}

/// A gateway that greets every client and then drops it (1011) must not have them all
/// back within the first back-off step forever: the back-off starts over only once a
/// connection has stayed up, so the retries spread out.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_gateway_that_greets_and_drops_is_not_hammered() -> anyhow::Result<()> {
    use futures::SinkExt as _;
    use std::sync::Arc;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use tokio_tungstenite::tungstenite::Message;
    use tokio_tungstenite::tungstenite::protocol::CloseFrame;
    use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
    let nats = Nats::single().await?;
    let herald = Herald::builder(&nats).start().await?;
    let flaky = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let addr = flaky.local_addr()?;
    let connections = Arc::new(AtomicUsize::new(0));
    let seen = connections.clone();
    let hello = serde_json::to_string(&herald_protocol::ServerFrame::Hello {
        user_id: herald_protocol::UserId::new("rust-flaky".to_owned())?,
        last_seq: 0,
        unread: 0,
        heartbeat_s: 25,
    })?;
    tokio::spawn(async move {
        while let Ok((socket, _)) = flaky.accept().await {
            seen.fetch_add(1, Ordering::SeqCst);
            let hello = hello.clone();
            tokio::spawn(async move {
                if let Ok(mut ws) = tokio_tungstenite::accept_async(socket).await {
                    let _ = ws.send(Message::text(hello)).await;
                    let _ = ws
                        .send(Message::Close(Some(CloseFrame {
                            code: CloseCode::Error,
                            reason: "feed failed".into(),
                        })))
                        .await;
                }
            });
        }
    });
    let client = Client::builder(herald.base_url())
        .token(herald.token("rust-flaky"))
        .mode(Mode::WebSocket)
        .ws_url(format!("ws://{addr}/v1/ws"))
        .backoff(Duration::from_millis(50), Duration::from_secs(2))
        .connect()?;
    // Four seconds: with the back-off starting over at every greeting, retries every
    // 0–50 ms come to about 160 connections; growing, to a handful.
    tokio::time::sleep(Duration::from_secs(4)).await;
    let n = connections.load(Ordering::SeqCst);
    client.close().await;
    ensure!((2..=20).contains(&n), "{n} connections in 4 s");
    Ok(())
}

/// A subscription is stored by the server (a `subscribe` frame and
/// `POST /v1/me/subscriptions` write the same store), so the client does not send it again
/// on reconnect: a producer's unsubscribe made meanwhile stands. `subscribe` answers with
/// the server's verdict.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_producers_unsubscribe_survives_a_client_reconnect() -> anyhow::Result<()> {
    let nats = Nats::single().await?;
    let herald = Herald::builder(&nats)
        .topics(herald_api::TopicSettings {
            self_subscribe: vec!["public.*".into()],
            ..Default::default()
        })
        .start()
        .await?;
    let user = "rust-topics";
    let subscribed = || async {
        let body: serde_json::Value = herald
            .user(Method::GET, "/v1/me/subscriptions", user)
            .send()
            .await?
            .error_for_status()?
            .json()
            .await?;
        anyhow::Ok(body["topics"].clone())
    };
    let mut client = Client::builder(herald.base_url())
        .token(herald.token(user))
        .mode(Mode::WebSocket)
        .connect()?;
    until(&client, "live", |s| s.state == State::Live).await?;
    client.subscribe("public.news").await?;
    let refused = client.subscribe("staff-only").await;
    ensure!(
        matches!(&refused, Err(herald_client::ClientError::Status { status, .. }) if status.as_u16() == 403),
        "a topic users may not join is refused, not taken: {refused:?}"
    );
    eventually(WAIT, "subscribed", || async {
        let topics = subscribed().await?;
        ensure!(topics == serde_json::json!(["public.news"]), "{topics}");
        Ok(())
    })
    .await?;
    let left = herald
        .producer(
            Method::DELETE,
            &format!("/v1/topics/public.news/subscribers/{user}"),
        )
        .send()
        .await?;
    ensure!(left.status().is_success(), "{}", left.status());

    let before = client.status().reconnects;
    client.reconnect();
    until(&client, "live again", |s| {
        s.reconnects > before && s.state == State::Live
    })
    .await?;
    // A frame on the new connection, after anything the client sent on it at its hello:
    // the gateway handles one connection's frames in order, so once this read is stored
    // a re-sent `subscribe` would have been too.
    let n = herald.send(user, "after the reconnect").await?;
    ensure!(take(&mut client, 1).await?[0].id == n.id);
    client.mark_read(n.seq).await?;
    eventually(WAIT, "the read is stored", || async {
        let body: serde_json::Value = herald
            .user(Method::GET, "/v1/me/unread", user)
            .send()
            .await?
            .json()
            .await?;
        ensure!(body["unread"] == 0, "{body}");
        Ok(())
    })
    .await?;
    let topics = subscribed().await?;
    ensure!(
        topics == serde_json::json!([]),
        "the producer's unsubscribe was undone: {topics}"
    );
    client.close().await;
    Ok(())
}
