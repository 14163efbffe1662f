//! Topics, big-topic path: a publish stored once and merged into each subscriber's view,
//! on every transport and in REST pages; resume across personal and topic entries;
//! unsubscribing stops delivery; per-recipient policy on the channel work; a crash in the
//! middle of the channel work completes it once.

use anyhow::{Context as _, ensure};
use herald::mesh::Roles;
use herald_tests::herald::Resume;
use herald_tests::jobs::JobFeed;
use herald_tests::{Herald, Nats, eventually, seqs, within};
use reqwest::{Method, StatusCode};
use serde_json::{Value, json};
use std::time::Duration;

const WAIT: Duration = Duration::from_secs(20);

/// Every publish takes the big-topic path.
fn big() -> herald_api::TopicSettings {
    herald_api::TopicSettings {
        big_threshold: 0,
        ..Default::default()
    }
}

async fn ok(response: reqwest::Response) -> anyhow::Result<Value> {
    let status = response.status();
    let body: Value = response.json().await?;
    ensure!(status.is_success(), "{status}: {body}");
    Ok(body)
}

async fn subscribe(herald: &Herald, topic: &str, users: &[&str]) -> anyhow::Result<()> {
    ok(herald
        .producer(Method::POST, &format!("/v1/topics/{topic}/subscribers"))
        .json(&json!({ "user_ids": users }))
        .send()
        .await?)
    .await?;
    Ok(())
}

async fn publish(herald: &Herald, topic: &str, body: Value) -> anyhow::Result<Value> {
    let response = herald
        .producer(Method::POST, &format!("/v1/topics/{topic}/publish"))
        .json(&body)
        .send()
        .await?;
    ensure!(
        response.status() == StatusCode::ACCEPTED,
        "publish: {}",
        response.status()
    );
    let answer: Value = response.json().await?;
    ensure!(answer["path"] == "topic", "big-topic path: {answer}");
    Ok(answer)
}

async fn done(herald: &Herald, topic: &str, id: &str) -> anyhow::Result<Value> {
    eventually(WAIT, "the fan-out finished", || async {
        let p = ok(herald
            .producer(Method::GET, &format!("/v1/topics/{topic}/publishes/{id}"))
            .send()
            .await?)
        .await?;
        ensure!(p["fanout"]["state"] == "done", "{p}");
        Ok(p["fanout"].clone())
    })
    .await
}

async fn inbox_messages(nats: &Nats) -> anyhow::Result<u64> {
    let js = async_nats::jetstream::new(nats.client().await?);
    let mut stream = js
        .get_stream(herald_protocol::streams::INBOX)
        .await
        .map_err(|e| anyhow::anyhow!("{e}"))?;
    Ok(stream
        .info()
        .await
        .map_err(|e| anyhow::anyhow!("{e}"))?
        .state
        .messages)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_big_topic_publish_is_stored_once_and_reaches_every_transport() -> anyhow::Result<()> {
    let nats = Nats::single().await?;
    let herald = Herald::builder(&nats).topics(big()).start().await?;
    let topic = "world.cup";
    subscribe(
        &herald,
        topic,
        &["ws-user", "sse-user", "poller", "offline"],
    )
    .await?;
    let mut ws = herald.ws("ws-user", Resume::After(0)).await?;
    ws.hello().await?;
    let mut sse = herald.sse("sse-user", Resume::After(0)).await?;
    let poll = {
        let herald_url = herald.base_url().to_owned();
        let token = herald.token("poller");
        let http = herald.http().clone();
        tokio::spawn(async move {
            http.get(format!("{herald_url}/v1/me/notifications?after=0&wait=20"))
                .bearer_auth(token)
                .send()
                .await?
                .json::<Value>()
                .await
        })
    };
    // The long-poll is waiting once its connection counts; then publish.
    eventually(WAIT, "the long-poll waits", || async {
        let metrics = herald.metrics().await?;
        ensure!(
            metrics.contains("herald_gateway_connections{transport=\"longpoll\"} 1"),
            "not waiting yet"
        );
        Ok(())
    })
    .await?;
    let before = inbox_messages(&nats).await?;
    let published = publish(
        &herald,
        topic,
        json!({"title": "goal!", "channels": ["inbox"]}),
    )
    .await?;
    let id = published["id"].as_str().context("id")?.to_owned();
    let seq = published["seq"].as_u64().context("seq")?;
    ensure!(
        inbox_messages(&nats).await? == before + 1,
        "stored once, whatever the audience"
    );

    let live = within(WAIT, "the WebSocket frame", ws.take(1)).await??;
    ensure!(
        live[0]["title"] == "goal!" && live[0]["topic"] == topic && live[0]["seq"] == seq,
        "{live:?}"
    );
    ensure!(
        live[0]["user_id"] == "ws-user" && live[0]["id"] != json!(id),
        "their copy: {live:?}"
    );
    let event = within(WAIT, "the SSE event", sse.next_notification()).await??;
    ensure!(event["topic"] == topic && event["seq"] == seq, "{event}");
    let polled = within(WAIT, "the long-poll answer", poll).await???;
    ensure!(
        seqs(polled["items"].as_array().context("items")?) == [seq],
        "{polled}"
    );

    // The offline subscriber's view holds it, after and before alike; unread counts it.
    let offline = herald.inbox("offline").await?;
    ensure!(
        offline.len() == 1 && offline[0]["topic"] == topic,
        "{offline:?}"
    );
    let newest = herald.my_page("offline", "limit=10").await?;
    ensure!(
        seqs(newest["items"].as_array().context("items")?) == [seq],
        "{newest}"
    );
    let unread = ok(herald
        .user(Method::GET, "/v1/me/unread", "offline")
        .send()
        .await?)
    .await?;
    ensure!(
        unread["unread"] == 1 && unread["last_seq"] == seq,
        "{unread}"
    );
    let fanout = done(&herald, topic, &id).await?;
    ensure!(fanout["path"] == "topic" && fanout["done"] == 4, "{fanout}");

    // Someone who subscribes later does not see what came before.
    subscribe(&herald, topic, &["late"]).await?;
    ensure!(
        herald.inbox("late").await?.is_empty(),
        "published before they joined"
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn resume_after_a_seq_spans_personal_and_topic_entries() -> anyhow::Result<()> {
    let nats = Nats::single().await?;
    let herald = Herald::builder(&nats).topics(big()).start().await?;
    subscribe(&herald, "news", &["alice"]).await?;
    let mut expected = Vec::new();
    for i in 0..3 {
        expected.push(herald.send("alice", &format!("p{i}")).await?.seq);
        let t = publish(
            &herald,
            "news",
            json!({"title": format!("t{i}"), "channels": ["inbox"]}),
        )
        .await?;
        expected.push(t["seq"].as_u64().context("seq")?);
    }
    // Pages of two, chained by next_after: every entry once, in order.
    let mut after = 0;
    let mut paged = Vec::new();
    loop {
        let page = herald
            .my_page("alice", &format!("after={after}&limit=2"))
            .await?;
        let items = page["items"].as_array().context("items")?;
        paged.extend(seqs(items));
        after = page["next_after"].as_u64().context("next_after")?;
        if page["has_more"] != true {
            break;
        }
    }
    ensure!(paged == expected, "{paged:?} != {expected:?}");
    // Resume over WebSocket after the first topic entry: the rest, in order.
    let mut ws = herald.ws("alice", Resume::After(expected[1])).await?;
    let hello = ws.hello().await?;
    ensure!(hello["last_seq"] == expected[5], "{hello}");
    let replayed = within(WAIT, "the replay", ws.take(4)).await??;
    ensure!(seqs(&replayed) == expected[2..], "{replayed:?}");
    // Live, a personal and a topic entry at the same moment: both, in seq order.
    let (p, t) = tokio::join!(
        herald.send("alice", "p-live"),
        publish(
            &herald,
            "news",
            json!({"title": "t-live", "channels": ["inbox"]})
        )
    );
    let (p, t) = (p?.seq, t?["seq"].as_u64().context("seq")?);
    let live = within(WAIT, "both live", ws.take(2)).await??;
    let mut want = vec![p, t];
    want.sort_unstable();
    ensure!(seqs(&live) == want, "{live:?}");
    // SSE resumes the same way.
    let mut sse = herald
        .sse("alice", Resume::LastEventId(expected[3]))
        .await?;
    let events = within(WAIT, "the SSE replay", sse.take(4)).await??;
    let mut all = vec![expected[4], expected[5], p, t];
    all.sort_unstable();
    ensure!(seqs(&events) == all, "{events:?}");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unsubscribing_stops_live_and_stored_delivery() -> anyhow::Result<()> {
    let nats = Nats::single().await?;
    let herald = Herald::builder(&nats).topics(big()).start().await?;
    subscribe(&herald, "alerts", &["bob"]).await?;
    let mut ws = herald.ws("bob", Resume::Live).await?;
    ws.hello().await?;
    let live_subject = herald
        .subjects()
        .topic_live(&herald_protocol::TopicId::new("alerts")?);
    ensure!(
        herald.is_tapped(&live_subject),
        "the gateway follows the topic"
    );
    publish(
        &herald,
        "alerts",
        json!({"title": "first", "channels": ["inbox"]}),
    )
    .await?;
    let first = within(WAIT, "the first", ws.take(1)).await??;
    ensure!(first[0]["title"] == "first", "{first:?}");

    let gone = ok(herald
        .producer(Method::DELETE, "/v1/topics/alerts/subscribers/bob")
        .send()
        .await?)
    .await?;
    ensure!(gone["was_subscribed"] == true, "{gone}");
    eventually(WAIT, "the gateway stops following", || async {
        ensure!(!herald.is_tapped(&live_subject));
        Ok(())
    })
    .await?;
    publish(
        &herald,
        "alerts",
        json!({"title": "second", "channels": ["inbox"]}),
    )
    .await?;
    let marker = herald.send("bob", "marker").await?;
    let next = within(WAIT, "the marker", ws.take(1)).await??;
    ensure!(
        next[0]["id"] == marker.id.as_str(),
        "nothing from the topic: {next:?}"
    );
    let titles: Vec<Value> = herald
        .inbox("bob")
        .await?
        .iter()
        .map(|n| n["title"].clone())
        .collect();
    // A big topic's publishes belong to the topic: the view shows those of the topics
    // the user follows now (from when they joined), so leaving takes them along.
    ensure!(titles == [json!("marker")], "{titles:?}");
    Ok(())
}

async fn add_device(herald: &Herald, user: &str) -> anyhow::Result<()> {
    let r = herald
        .user(Method::POST, "/v1/me/devices", user)
        .json(&json!({"platform": "ios", "token": format!("tok-{user}")}))
        .send()
        .await?;
    ensure!(r.status().is_success(), "device for {user}: {}", r.status());
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_opted_out_subscriber_gets_no_push_from_a_big_topic() -> anyhow::Result<()> {
    let nats = Nats::single().await?;
    let herald = Herald::builder(&nats).topics(big()).start().await?;
    let users = ["keen-1", "opted-out", "keen-2", "no-device"];
    for user in &users[..3] {
        add_device(&herald, user).await?;
    }
    subscribe(&herald, "deals", &users).await?;
    ok(herald
        .user(Method::PUT, "/v1/me/preferences", "opted-out")
        .json(&json!({"opt_out": true}))
        .send()
        .await?)
    .await?;
    let mut jobs = JobFeed::open(&herald).await?;
    let published = publish(
        &herald,
        "deals",
        json!({"title": "50% off", "channels": ["inbox", "push"]}),
    )
    .await?;
    let seq = published["seq"].as_u64().context("seq")?;
    let fanout = done(&herald, "deals", published["id"].as_str().context("id")?).await?;
    // Only the two who want push and have a device are handed to the router: the
    // opted-out one is not, and neither is the one who has no device at all.
    ensure!(
        fanout["routed"] == 2,
        "opted-out and no-device are not handed on: {fanout}"
    );
    let mut pushed = Vec::new();
    for _ in 0..2 {
        let job = jobs.next(WAIT).await?;
        ensure!(
            job.seq == seq,
            "the job points at the stored publish: {job:?}"
        );
        pushed.push(job.user_id.as_str().to_owned());
    }
    pushed.sort();
    ensure!(pushed == ["keen-1", "keen-2"], "{pushed:?}");
    // Nothing else is on its way: a later notification's job is the next one seen.
    let marker = herald
        .accept(&json!({"user_id": "keen-1", "title": "marker", "channels": ["inbox", "push"]}))
        .await?;
    let job = jobs.next(WAIT).await?;
    ensure!(
        job.id == marker.id,
        "no job for the opted-out subscriber: {job:?}"
    );
    ensure!(
        herald.inbox("opted-out").await?.len() == 1,
        "the opted-out user's view still holds it"
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn channel_work_interrupted_mid_way_completes_once() -> anyhow::Result<()> {
    let nats = Nats::single().await?;
    // An api alone: the publish is stored and its fan-out job waits in the queue.
    let api = Herald::builder(&nats)
        .topics(big())
        .roles(Roles::API)
        .start()
        .await?;
    let users: Vec<String> = (0..300).map(|i| format!("fan-{i:03}")).collect();
    let refs: Vec<&str> = users.iter().map(String::as_str).collect();
    for user in &refs {
        add_device(&api, user).await?;
    }
    subscribe(&api, "drops", &refs).await?;
    let published = publish(
        &api,
        "drops",
        json!({"title": "drop", "channels": ["inbox", "push"]}),
    )
    .await?;
    let id = published["id"].as_str().context("id")?.to_owned();

    // As if a worker had handed over the first page and then died.
    let store = herald_store::connect(&nats.url(), "test").await?;
    let subs = herald_store::Subscriptions::new(store, api.subjects().clone());
    let topic = herald_protocol::TopicId::new("drops")?;
    let first_page = subs
        .pages(&topic, 1)
        .await?
        .next_page()
        .await?
        .context("a first page")?;
    let (cursor, _) = *first_page.last().context("a first page")?;
    let js = async_nats::jetstream::new(nats.client().await?);
    let log = herald_store::FanoutLog::open(&js).await?;
    log.put(
        &id,
        &herald_protocol::FanoutProgress {
            state: "running".into(),
            total: 300,
            done: first_page.len() as u64,
            cursor,
            path: "topic".into(),
            started_at: "2026-01-01T00:00:00Z".into(),
            ..Default::default()
        },
    )
    .await?;

    let mut jobs = JobFeed::open(&api).await?;
    let _router = Herald::builder(&nats)
        .topics(big())
        .roles(Roles::ROUTER)
        .start()
        .await?;
    let fanout = done(&api, "drops", &id).await?;
    let rest = 300 - first_page.len() as u64;
    ensure!(
        fanout["done"] == 300 && fanout["routed"] == rest,
        "{fanout}"
    );
    let mut pushed = std::collections::BTreeSet::new();
    for _ in 0..rest {
        let job = jobs.next(WAIT).await?;
        ensure!(
            pushed.insert(job.user_id.as_str().to_owned()),
            "twice: {job:?}"
        );
    }
    let first: std::collections::BTreeSet<String> = first_page
        .iter()
        .map(|(_, s)| s.user_id.as_str().to_owned())
        .collect();
    ensure!(
        pushed.is_disjoint(&first),
        "the recorded page was not redone"
    );
    let marker = api
        .accept(&json!({"user_id": "fan-000", "title": "marker", "channels": ["inbox", "push"]}))
        .await?;
    let job = jobs.next(WAIT).await?;
    ensure!(job.id == marker.id, "nothing more was enqueued: {job:?}");
    Ok(())
}

/// The seqs of a WebSocket frame's notifications (none for other frames).
fn frame_seqs(frame: &Value) -> Vec<u64> {
    match frame["type"].as_str() {
        Some("notification") => frame["seq"].as_u64().into_iter().collect(),
        Some("batch") => frame["items"]
            .as_array()
            .map(|items| seqs(items))
            .unwrap_or_default(),
        _ => Vec::new(),
    }
}

/// A user who joins a big topic while connected, with the topic busy and notifications
/// of their own arriving meanwhile: the connection's seqs only ever grow (a client
/// dedups by seq, and would drop anything below one it has), and from the first of the
/// topic's publishes the connection hands out, it misses none of them. Publishes stored
/// while the subscription was being written, below what the connection had sent by
/// then, are in the inbox view only. Joined by a `subscribe` frame and by
/// `POST /v1/me/subscriptions`, in turns.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_topic_joined_while_connected_never_goes_below_a_sent_seq() -> anyhow::Result<()> {
    use std::sync::Arc;
    use std::sync::atomic::{AtomicBool, Ordering};
    const ROUNDS: usize = 24;
    let nats = Nats::single().await?;
    let herald = Arc::new(
        Herald::builder(&nats)
            .topics(herald_api::TopicSettings {
                big_threshold: 0,
                self_subscribe: vec!["public.*".into()],
            })
            .start()
            .await?,
    );
    let user = "joiner";
    let mut ws = herald.ws(user, Resume::Live).await?;
    let hello = ws.hello().await?;
    let start = hello["last_seq"].as_u64().context("last_seq")?;
    let mut received: Vec<u64> = Vec::new();
    let mut own_sent: Vec<u64> = Vec::new();
    for round in 0..ROUNDS {
        let topic = format!("public.r{round}");
        let stop = Arc::new(AtomicBool::new(false));
        // The topic's publishes and the user's own notifications, back to back, until
        // the join is over.
        let topic_loop = tokio::spawn({
            let (herald, stop, topic) = (herald.clone(), stop.clone(), topic.clone());
            async move {
                while !stop.load(Ordering::Relaxed) {
                    publish(
                        &herald,
                        &topic,
                        json!({"title": "t", "channels": ["inbox"]}),
                    )
                    .await?;
                }
                anyhow::Ok(())
            }
        });
        let own_loop = tokio::spawn({
            let (herald, stop) = (herald.clone(), stop.clone());
            async move {
                let mut sent = Vec::new();
                while !stop.load(Ordering::Relaxed) {
                    sent.push(herald.send(user, "own").await?.seq);
                }
                anyhow::Ok(sent)
            }
        });
        tokio::time::sleep(Duration::from_millis(5)).await;
        if round % 2 == 0 {
            let frame = json!({"type": "subscribe", "topic": topic}).to_string();
            ws.send(tokio_tungstenite::tungstenite::Message::text(frame))
                .await?;
            loop {
                let frame = ws.next_frame().await?;
                if frame["type"] == "subscription" {
                    ensure!(frame["subscribed"] == true, "{frame}");
                    break;
                }
                received.extend(frame_seqs(&frame));
            }
        } else {
            ok(herald
                .user(Method::POST, "/v1/me/subscriptions", user)
                .json(&json!({ "topic": topic }))
                .send()
                .await?)
            .await?;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
        stop.store(true, Ordering::Relaxed);
        topic_loop.await??;
        own_sent.extend(own_loop.await??);
        // One more of each, after the join: both must come.
        let last_topic = publish(
            &herald,
            &topic,
            json!({"title": "t", "channels": ["inbox"]}),
        )
        .await?["seq"]
            .as_u64()
            .context("seq")?;
        let marker = herald.send(user, "marker").await?.seq;
        own_sent.push(marker);
        while received.last().is_none_or(|&s| s < marker) {
            let frame = within(WAIT, "the round's marker", ws.next_frame()).await??;
            received.extend(frame_seqs(&frame));
        }
        ensure!(
            received.contains(&last_topic),
            "round {round}: the topic's publish after the join never came"
        );
    }
    ensure!(
        received.windows(2).all(|w| w[0] < w[1]),
        "the connection's seqs went back: {received:?}"
    );
    let missing: Vec<&u64> = own_sent.iter().filter(|s| !received.contains(s)).collect();
    ensure!(missing.is_empty(), "own notifications missing: {missing:?}");
    // Per topic: nothing missing from the first publish the connection handed out on;
    // what it did not hand out is in the inbox view, below that.
    let view = herald.inbox(user).await?;
    for round in 0..ROUNDS {
        let topic = format!("public.r{round}");
        let of_topic: Vec<u64> = view
            .iter()
            .filter(|n| n["topic"] == topic.as_str())
            .filter_map(|n| n["seq"].as_u64())
            .filter(|&s| s > start)
            .collect();
        let first = of_topic
            .iter()
            .copied()
            .find(|s| received.contains(s))
            .with_context(|| format!("nothing of {topic} on the connection"))?;
        let skipped: Vec<&u64> = of_topic
            .iter()
            .filter(|&&s| s > first && !received.contains(&s))
            .collect();
        ensure!(
            skipped.is_empty(),
            "{topic}: missing after {first}: {skipped:?}"
        );
    }
    Ok(())
}
