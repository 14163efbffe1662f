//! WebSocket, SSE and long-poll: hello, live delivery, resume, authentication at upgrade.

use anyhow::{Context as _, ensure};
use herald_protocol::UserId;
use herald_tests::{Herald, Nats, Resume, WsClient, eventually, seqs};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::task::JoinHandle;

/// A long-poll of `user` for what comes after `after`, waiting up to `wait_s`, started in
/// its own task; returned once it waits on the user's live subject. Its task answers the
/// page and the moment it came.
async fn waiting_poll(
    herald: &Arc<Herald>,
    user: &str,
    after: u64,
    wait_s: u64,
) -> anyhow::Result<JoinHandle<(anyhow::Result<serde_json::Value>, Instant)>> {
    let live = herald.subjects().live(&UserId::new(user)?);
    let (poller, user) = (herald.clone(), user.to_owned());
    let poll = tokio::spawn(async move {
        let page = poller
            .my_page(&user, &format!("after={after}&wait={wait_s}"))
            .await;
        (page, Instant::now())
    });
    eventually(
        Duration::from_secs(5),
        "the long-poll waits on the user's live subject",
        || async {
            ensure!(herald.is_tapped(&live));
            Ok(())
        },
    )
    .await?;
    Ok(poll)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn websocket_says_hello_then_delivers_live() -> anyhow::Result<()> {
    let nats = Nats::single().await?;
    let herald = Herald::builder(&nats).start().await?;
    herald.send("gina", "before 1").await?;
    let before = herald.send("gina", "before 2").await?;

    let mut by_header = herald.ws("gina", Resume::Live).await?;
    let hello = by_header.hello().await?;
    assert_eq!(hello["user_id"], "gina", "{hello}");
    assert_eq!(hello["last_seq"], before.seq, "{hello}");
    assert_eq!(hello["unread"], 2, "{hello}");
    assert_eq!(hello["heartbeat_s"], 30, "{hello}");

    // Browsers cannot set headers: the token in the query works the same.
    let url = herald.ws_url(&format!("/v1/ws?access_token={}", herald.token("gina")));
    let mut by_query = WsClient::connect(&url, None).await?;
    assert_eq!(by_query.hello().await?["user_id"], "gina");
    // The alias path serves the same protocol.
    let url = herald.ws_url(&format!(
        "/ws/connect?access_token={}",
        herald.token("gina")
    ));
    let mut by_alias = WsClient::connect(&url, None).await?;
    by_alias.hello().await?;

    let live = herald.send("gina", "live").await?;
    for ws in [&mut by_header, &mut by_query, &mut by_alias] {
        let got = ws.take(1).await?;
        assert_eq!(
            got.len(),
            1,
            "live only: nothing from before the connection: {got:?}"
        );
        assert_eq!(got[0]["type"], "notification");
        assert_eq!(got[0]["id"], live.id.as_str());
        assert_eq!(got[0]["seq"], live.seq);
        assert_eq!(got[0]["title"], "live");
        assert_eq!(got[0]["user_id"], "gina");
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn websocket_resumes_after_a_seq_then_goes_live() -> anyhow::Result<()> {
    let nats = Nats::single().await?;
    let herald = Herald::builder(&nats).start().await?;
    let mut sent = Vec::new();
    for i in 1..=5 {
        sent.push(herald.send("hank", &format!("offline {i}")).await?);
    }
    let mut ws = herald.ws("hank", Resume::After(sent[1].seq)).await?;
    let hello = ws.hello().await?;
    assert_eq!(hello["last_seq"], sent[4].seq);
    let replayed = ws.take(3).await?;
    assert_eq!(seqs(&replayed), [sent[2].seq, sent[3].seq, sent[4].seq]);
    assert_eq!(replayed[0]["id"], sent[2].id.as_str());
    let live = herald.send("hank", "online").await?;
    let got = ws.take(1).await?;
    assert_eq!(
        seqs(&got),
        [live.seq],
        "after the replay comes the live one, nothing else"
    );
    Ok(())
}

/// A read from another device is announced to every open feed of the user, the waiting
/// long-poll's included. The poll must go on waiting for a notification — it once
/// spun on the announcement without yielding, so neither its `wait` nor the next
/// notification ever ended it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_read_elsewhere_does_not_wedge_a_waiting_long_poll() -> anyhow::Result<()> {
    let nats = Nats::single().await?;
    let herald = Arc::new(Herald::builder(&nats).start().await?);
    let first = herald.send("ivy", "first").await?.seq;
    let last = herald.send("ivy", "second").await?.seq;
    let poll = waiting_poll(&herald, "ivy", last, 20).await?;
    let read = herald
        .user(reqwest::Method::POST, "/v1/me/read", "ivy")
        .json(&serde_json::json!({"up_to": first}))
        .send()
        .await?;
    ensure!(read.status() == 200, "read: {}", read.status());
    let n = herald.send("ivy", "third").await?;
    let (page, _) = tokio::time::timeout(Duration::from_secs(10), poll)
        .await
        .context("the long-poll never answered after a read and a notification")??;
    let page = page?;
    let items = page["items"].as_array().cloned().unwrap_or_default();
    assert_eq!(seqs(&items), [n.seq], "{page}");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn long_poll_returns_as_soon_as_a_notification_arrives() -> anyhow::Result<()> {
    let nats = Nats::single().await?;
    let herald = Herald::builder(&nats).start().await?;
    let last = herald.send("ida", "first").await?.seq;
    let live = herald.subjects().live(&UserId::new("ida")?);

    // Nothing new: the poll waits out its `wait` and answers an empty page.
    let started = Instant::now();
    let page = herald
        .my_page("ida", &format!("after={last}&wait=1"))
        .await?;
    ensure!(
        page["items"].as_array().is_some_and(Vec::is_empty),
        "{page}"
    );
    ensure!(
        started.elapsed() >= Duration::from_millis(900),
        "wait=1 answered after {:?}",
        started.elapsed()
    );
    eventually(
        Duration::from_secs(5),
        "the first poll's live registration is gone",
        || async {
            ensure!(!herald.is_tapped(&live));
            Ok(())
        },
    )
    .await?;

    let h = Arc::new(herald);
    let poll = waiting_poll(&h, "ida", last, 10).await?;
    let sent_at = Instant::now();
    let n = h.send("ida", "wake up").await?;
    let (page, answered_at) = poll.await?;
    let page = page?;
    let latency = answered_at.duration_since(sent_at);
    ensure!(
        latency < Duration::from_secs(5),
        "the long-poll answered {latency:?} after the send"
    );
    let items = page["items"].as_array().cloned().unwrap_or_default();
    assert_eq!(seqs(&items), [n.seq], "{page}");
    assert_eq!(items[0]["id"], n.id.as_str());
    assert_eq!(page["next_after"], n.seq);
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sse_resumes_from_last_event_id_without_duplicates() -> anyhow::Result<()> {
    let nats = Nats::single().await?;
    let herald = Herald::builder(&nats).start().await?;
    let mut sent = Vec::new();
    for i in 1..=5 {
        sent.push(herald.send("ivy", &format!("n{i}")).await?.seq);
    }
    let mut sse = herald.sse("ivy", Resume::After(0)).await?;
    let hello = sse.next_event().await?;
    assert_eq!(hello.event, "hello", "{hello:?}");
    let hello = hello.json()?;
    assert_eq!(hello["user_id"], "ivy");
    assert_eq!(hello["last_seq"], sent[4]);
    assert_eq!(seqs(&sse.take(3).await?), sent[..3]);
    drop(sse);

    // What a browser does on reconnect: Last-Event-ID = the last id it processed.
    let mut sse = herald.sse("ivy", Resume::LastEventId(sent[1])).await?;
    assert_eq!(seqs(&sse.take(3).await?), sent[2..]);
    let live = herald.send("ivy", "n6").await?;
    let next = sse.next_notification().await?;
    assert_eq!(
        next["seq"], live.seq,
        "the next event after the replay is the live one, not a repeat"
    );
    assert_eq!(next["id"], live.id.as_str());

    // Without a position, SSE starts live.
    let mut fresh = herald.sse("ivy", Resume::Live).await?;
    assert_eq!(fresh.next_event().await?.event, "hello");
    let live = herald.send("ivy", "n7").await?;
    assert_eq!(fresh.next_notification().await?["seq"], live.seq);
    Ok(())
}

/// A waiting long-poll holds a live registration, so it counts against the per-user cap
/// like a connection: one token cannot open thousands of them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn waiting_long_polls_count_against_the_per_user_cap() -> anyhow::Result<()> {
    let nats = Nats::single().await?;
    let config = herald_gateway::GatewayConfig {
        limits: herald_gateway::admission::Limits {
            max_per_user: 1,
            ..Default::default()
        },
        ..Default::default()
    };
    let herald = Arc::new(Herald::builder(&nats).gateway(config).start().await?);
    let last = herald.send("kai", "first").await?.seq;
    let waiting = waiting_poll(&herald, "kai", last, 20).await?;
    let second = herald
        .user(
            reqwest::Method::GET,
            &format!("/v1/me/notifications?after={last}&wait=20"),
            "kai",
        )
        .send()
        .await?;
    ensure!(
        second.status() == reqwest::StatusCode::TOO_MANY_REQUESTS,
        "a second waiting poll: {}",
        second.status()
    );
    let body: serde_json::Value = second.json().await?;
    ensure!(body["error"]["code"] == "too_many_connections", "{body}");
    // A plain page read (no wait) is not a registration and is not capped.
    let page = herald.my_page("kai", "after=0").await?;
    ensure!(
        page["items"].as_array().is_some_and(|i| i.len() == 1),
        "{page}"
    );
    let n = herald.send("kai", "second").await?;
    let (page, _) = tokio::time::timeout(Duration::from_secs(10), waiting)
        .await
        .context("the first poll never answered")??;
    let page = page?;
    let items = page["items"].as_array().cloned().unwrap_or_default();
    assert_eq!(seqs(&items), [n.seq], "{page}");
    Ok(())
}

/// A browser's WebSocket never says why an upgrade failed; a plain GET of the same URL
/// (the SDK's probe) answers what an upgrade would be told now — 426 while one would be
/// taken, 429 at the user's cap, 401 for a bad token — readable from another origin. (The
/// 503 a busy gateway answers is the admission unit tests'.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_plain_get_of_the_websocket_url_says_what_an_upgrade_would_get() -> anyhow::Result<()> {
    use reqwest::StatusCode;
    let nats = Nats::single().await?;
    let config = herald_gateway::GatewayConfig {
        limits: herald_gateway::admission::Limits {
            max_per_user: 1,
            ..Default::default()
        },
        ..Default::default()
    };
    let herald = &Herald::builder(&nats).gateway(config).start().await?;
    let probe = |token: String| async move {
        let r = herald
            .request(
                reqwest::Method::GET,
                &format!("/v1/ws?access_token={token}"),
            )
            .send()
            .await?;
        let cors = r.headers().get("access-control-allow-origin").cloned();
        ensure!(
            cors.is_some_and(|v| v == "*"),
            "not readable cross-origin: {r:?}"
        );
        let upgrade = r.headers().get("upgrade").cloned();
        let status = r.status();
        let body: serde_json::Value = r.json().await?;
        anyhow::Ok((status, upgrade, body["error"]["code"].clone()))
    };

    let (status, upgrade, code) = probe(herald.token("lea")).await?;
    assert_eq!(status, StatusCode::UPGRADE_REQUIRED, "{code}");
    assert_eq!(
        upgrade.as_ref().map(|v| v.as_bytes()),
        Some(&b"websocket"[..])
    );
    assert_eq!(code, "upgrade_required");

    let _held = herald.ws("lea", Resume::Live).await?;
    let (status, _, code) = probe(herald.token("lea")).await?;
    assert_eq!(status, StatusCode::TOO_MANY_REQUESTS, "{code}");
    assert_eq!(code, "too_many_connections");
    // Another user is not at their cap.
    let (status, _, _) = probe(herald.token("max")).await?;
    assert_eq!(status, StatusCode::UPGRADE_REQUIRED);

    let (status, _, code) = probe("not-a-token".into()).await?;
    assert_eq!(status, StatusCode::UNAUTHORIZED, "{code}");
    Ok(())
}

/// A plain `EventSource` sends `Last-Event-ID` on its own reconnect only if some event
/// had an `id:`. The `hello` carries the position the stream starts from, so one that
/// started live and loses its stream before any notification comes resumes from there —
/// and gets what was stored while it was away — instead of starting live again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_sse_hello_carries_the_position_a_browser_resumes_from() -> anyhow::Result<()> {
    let nats = Nats::single().await?;
    let herald = Herald::builder(&nats).start().await?;
    let first = herald.send("eve", "before").await?;
    let mut sse = herald.sse("eve", Resume::Live).await?;
    let hello = sse.next_event().await?;
    ensure!(hello.event == "hello", "{hello:?}");
    assert_eq!(hello.json()?["last_seq"], first.seq);
    let id = hello.id.clone().context("the hello has no id")?;
    assert_eq!(id, first.seq.to_string(), "live only: the head");
    drop(sse);

    let missed = herald.send("eve", "while away").await?;
    // The browser's own reconnect: the same URL, Last-Event-ID = the last id it got.
    let mut again = herald.sse("eve", Resume::LastEventId(id.parse()?)).await?;
    let hello = again.next_event().await?;
    assert_eq!(hello.id.as_deref(), Some(id.as_str()));
    assert_eq!(again.next_notification().await?["seq"], missed.seq);

    // Resuming: the hello's id is the position asked for.
    let mut replay = herald.sse("eve", Resume::After(0)).await?;
    let hello = replay.next_event().await?;
    assert_eq!(hello.id.as_deref(), Some("0"));
    assert_eq!(
        seqs(&replay.take(2).await?),
        [first.seq, missed.seq],
        "after 0: everything"
    );
    Ok(())
}

/// At shutdown an SSE stream ends with a `reconnect` event, like a WebSocket's frame:
/// `after_ms` jittered below 5 s, and the same wait as `retry:`, which a plain
/// `EventSource` honours. It has no `id:` (the client's Last-Event-ID stays the last
/// notification's).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_sse_stream_ends_at_shutdown_with_a_jittered_reconnect() -> anyhow::Result<()> {
    let nats = Nats::single().await?;
    let mut herald = Herald::builder(&nats).start().await?;
    let n = herald.send("sam", "n").await?;
    let response = herald
        .request(reqwest::Method::GET, "/v1/sse?after=0")
        .bearer_auth(herald.token("sam"))
        .timeout(Duration::from_secs(60))
        .send()
        .await?;
    ensure!(response.status() == 200, "{}", response.status());
    let mut response = response;
    // Read until the notification is in, so the stream is live when the server stops.
    let mut text = String::new();
    while !text.contains(&format!("id: {}\n", n.seq)) {
        let chunk = herald_tests::within(Duration::from_secs(10), "the replay", response.chunk())
            .await??
            .context("the stream ended early")?;
        text.push_str(std::str::from_utf8(&chunk)?);
    }
    let rest = async {
        while let Some(chunk) = response.chunk().await? {
            text.push_str(std::str::from_utf8(&chunk)?);
        }
        anyhow::Ok(())
    };
    let (stopped, ended) = tokio::join!(
        herald.stop(),
        herald_tests::within(Duration::from_secs(20), "the stream's end", rest)
    );
    stopped?;
    ended??;
    // The events, keep-alive comments left out.
    let events: Vec<Vec<&str>> = text
        .split("\n\n")
        .map(|block| {
            block
                .lines()
                .filter(|l| !l.is_empty() && !l.starts_with(':'))
                .collect::<Vec<_>>()
        })
        .filter(|lines| !lines.is_empty())
        .collect();
    let last = events.last().context("no events")?;
    ensure!(last.contains(&"event: reconnect"), "last event: {last:?}");
    ensure!(
        !last.iter().any(|l| l.starts_with("id:")),
        "no id: {last:?}"
    );
    let retry: u64 = last
        .iter()
        .find_map(|l| l.strip_prefix("retry: "))
        .context("no retry:")?
        .parse()?;
    let data: serde_json::Value = serde_json::from_str(
        last.iter()
            .find_map(|l| l.strip_prefix("data: "))
            .context("no data")?,
    )?;
    ensure!(data["type"] == "reconnect", "{data}");
    assert_eq!(data["after_ms"], retry, "retry: is the same wait");
    ensure!(retry < 5_000, "jittered below 5 s: {retry}");
    Ok(())
}
