//! Topics, small-topic path: subscriptions (producer, bulk, self), publish fanned out on
//! write to every subscriber on every transport, progress, and a fan-out that resumes
//! from where it stopped.

use anyhow::{Context as _, ensure};
use herald::mesh::Roles;
use herald_tests::herald::Resume;
use herald_tests::{Herald, Nats, eventually, within};
use reqwest::{Method, StatusCode};
use serde_json::{Value, json};
use std::time::Duration;

async fn ok(response: reqwest::Response) -> anyhow::Result<Value> {
    let status = response.status();
    let body: Value = response.json().await?;
    ensure!(status.is_success(), "{status}: {body}");
    Ok(body)
}

async fn publish(herald: &Herald, topic: &str, title: &str) -> anyhow::Result<Value> {
    let response = herald
        .producer(Method::POST, &format!("/v1/topics/{topic}/publish"))
        .json(&json!({"title": title, "channels": ["inbox"]}))
        .send()
        .await?;
    ensure!(
        response.status() == StatusCode::ACCEPTED,
        "publish: {}",
        response.status()
    );
    Ok(response.json().await?)
}

async fn fanout_of(herald: &Herald, topic: &str, id: &str) -> anyhow::Result<Value> {
    let p = ok(herald
        .producer(Method::GET, &format!("/v1/topics/{topic}/publishes/{id}"))
        .send()
        .await?)
    .await?;
    Ok(p["fanout"].clone())
}

async fn progress_done(herald: &Herald, topic: &str, id: &str) -> anyhow::Result<Value> {
    eventually(Duration::from_secs(30), "the fan-out finished", || async {
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

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_publish_reaches_every_subscriber_once_on_every_transport() -> anyhow::Result<()> {
    let nats = Nats::single().await?;
    let herald = Herald::builder(&nats).start().await?;
    let topic = "launch.news";
    for user in ["ws-user", "sse-user", "offline *"] {
        let path = format!(
            "/v1/topics/{topic}/subscribers/{}",
            herald_tests::encode(user)
        );
        ok(herald.producer(Method::PUT, &path).send().await?).await?;
    }
    let bulk: Vec<String> = (0..300).map(|i| format!("bulk-{i}")).collect();
    let answer = ok(herald
        .producer(Method::POST, &format!("/v1/topics/{topic}/subscribers"))
        .json(&json!({"user_ids": bulk}))
        .send()
        .await?)
    .await?;
    ensure!(answer["subscribed"] == 300, "{answer}");
    let described = ok(herald
        .producer(Method::GET, &format!("/v1/topics/{topic}"))
        .send()
        .await?)
    .await?;
    ensure!(described["subscribers"] == 303, "{described}");

    let mut ws = herald.ws("ws-user", Resume::After(0)).await?;
    ws.hello().await?;
    let mut sse = herald.sse("sse-user", Resume::After(0)).await?;
    let published = publish(&herald, topic, "we launched").await?;
    ensure!(published["subscribers"] == 303, "{published}");
    let id = published["id"].as_str().context("id")?;

    let live = within(Duration::from_secs(20), "the WebSocket copy", ws.take(1)).await??;
    ensure!(
        live[0]["title"] == "we launched" && live[0]["topic"] == topic,
        "{live:?}"
    );
    let event = within(
        Duration::from_secs(20),
        "the SSE copy",
        sse.next_notification(),
    )
    .await??;
    ensure!(event["topic"] == topic, "{event}");
    let fanout = progress_done(&herald, topic, id).await?;
    ensure!(fanout["done"] == 303 && fanout["total"] == 303, "{fanout}");
    let offline = herald.inbox("offline *").await?;
    ensure!(
        offline.len() == 1 && offline[0]["topic"] == topic,
        "{offline:?}"
    );
    ensure!(
        offline[0]["id"] != json!(id),
        "each copy has an id of its own"
    );

    // Unsubscribed users get the next publish no more.
    let path = format!(
        "/v1/topics/{topic}/subscribers/{}",
        herald_tests::encode("offline *")
    );
    let gone = ok(herald.producer(Method::DELETE, &path).send().await?).await?;
    ensure!(gone["was_subscribed"] == true, "{gone}");
    let second = publish(&herald, topic, "second").await?;
    progress_done(&herald, topic, second["id"].as_str().context("id")?).await?;
    ensure!(
        herald.inbox("offline *").await?.len() == 1,
        "unsubscribed: no second copy"
    );
    ensure!(herald.inbox("bulk-7").await?.len() == 2, "subscribed: both");
    let bad = herald
        .producer(Method::POST, &format!("/v1/topics/{topic}/publish"))
        .json(&json!({"user_id": "x", "title": "t"}))
        .send()
        .await?;
    ensure!(
        bad.status() == StatusCode::BAD_REQUEST,
        "user_id on a topic publish: {}",
        bad.status()
    );
    let hostile = herald
        .producer(
            Method::GET,
            &format!("/v1/topics/{topic}/publishes/a%20*%3E"),
        )
        .send()
        .await?;
    ensure!(
        hostile.status() == StatusCode::BAD_REQUEST,
        "a publish id that is not a UUID: {}",
        hostile.status()
    );
    // Other spellings of the same UUID name the same publish.
    let id = second["id"].as_str().context("id")?;
    for spelled in [
        format!("%7B{}%7D", id.to_uppercase()),
        format!("urn:uuid:{id}"),
    ] {
        let r = herald
            .producer(
                Method::GET,
                &format!("/v1/topics/{topic}/publishes/{spelled}"),
            )
            .send()
            .await?;
        let p = ok(r).await?;
        ensure!(
            p["id"] == id && p["fanout"]["state"] == "done",
            "{spelled}: {p}"
        );
    }
    // An idempotency key that is not printable ASCII is refused, as on /v1/notify,
    // rather than ignored (a retry would then fan out twice).
    let r = herald
        .producer(Method::POST, &format!("/v1/topics/{topic}/publish"))
        .header(
            "Idempotency-Key",
            reqwest::header::HeaderValue::from_bytes(b"caf\xe9")?,
        )
        .json(&json!({"title": "t"}))
        .send()
        .await?;
    ensure!(r.status() == StatusCode::BAD_REQUEST, "{}", r.status());
    let body: Value = r.json().await?;
    ensure!(
        body["error"]["message"]
            .as_str()
            .is_some_and(|m| m.contains("Idempotency-Key")),
        "{body}"
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn users_join_only_topics_that_allow_it() -> anyhow::Result<()> {
    let nats = Nats::single().await?;
    let herald = Herald::builder(&nats)
        .topics(herald_api::TopicSettings {
            self_subscribe: vec!["public.*".into()],
            ..Default::default()
        })
        .start()
        .await?;
    let join = |topic: &str| {
        herald
            .user(Method::POST, "/v1/me/subscriptions", "ivy")
            .json(&json!({"topic": topic}))
            .send()
    };
    ok(join("public.sports").await?).await?;
    let refused = join("staff-only").await?;
    ensure!(
        refused.status() == StatusCode::FORBIDDEN,
        "private topic: {}",
        refused.status()
    );
    let mine = ok(herald
        .user(Method::GET, "/v1/me/subscriptions", "ivy")
        .send()
        .await?)
    .await?;
    ensure!(mine["topics"] == json!(["public.sports"]), "{mine}");
    let left = ok(herald
        .user(Method::DELETE, "/v1/me/subscriptions", "ivy")
        .json(&json!({"topic": "public.sports"}))
        .send()
        .await?)
    .await?;
    ensure!(left["was_subscribed"] == true, "{left}");
    let mine = ok(herald
        .user(Method::GET, "/v1/me/subscriptions", "ivy")
        .send()
        .await?)
    .await?;
    ensure!(mine["topics"] == json!([]), "{mine}");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_interrupted_fanout_resumes_from_its_cursor() -> anyhow::Result<()> {
    let nats = Nats::single().await?;
    let api = Herald::builder(&nats).roles(Roles::API).start().await?;
    let topic = herald_protocol::TopicId::new("resume")?;
    let users: Vec<String> = (0..600).map(|i| format!("r{i}")).collect();
    ok(api
        .producer(Method::POST, "/v1/topics/resume/subscribers")
        .json(&json!({"user_ids": users}))
        .send()
        .await?)
    .await?;
    // No router runs yet: the publish waits in the queue.
    let id = publish(&api, "resume", "resumed").await?["id"]
        .as_str()
        .context("id")?
        .to_owned();

    // As if a worker had done the first page and then died: its progress is recorded.
    let client = nats.client().await?;
    let js = async_nats::jetstream::new(client.clone());
    let subjects = api.subjects().clone();
    let store = herald_store::connect(&nats.url(), "test").await?;
    let subs = herald_store::Subscriptions::new(store.clone(), subjects);
    let first_page = subs
        .pages(&topic, 1)
        .await?
        .next_page()
        .await?
        .context("a first page")?;
    let (cursor, _) = *first_page.last().context("a first page")?;
    let log = herald_store::FanoutLog::open(&js).await?;
    log.put(
        &id,
        &herald_protocol::FanoutProgress {
            state: "running".into(),
            total: 600,
            done: first_page.len() as u64,
            cursor,
            started_at: "2026-01-01T00:00:00Z".into(),
            ..Default::default()
        },
    )
    .await?;

    let _router = Herald::builder(&nats).roles(Roles::ROUTER).start().await?;
    let fanout = progress_done(&api, "resume", &id).await?;
    ensure!(fanout["done"] == 600, "{fanout}");
    let skipped = &first_page[0].1.user_id;
    ensure!(
        api.inbox(skipped.as_str()).await?.is_empty(),
        "the recorded page was not redone"
    );
    let last = &users[599];
    let inbox = api.inbox(last).await?;
    ensure!(
        inbox.len() == 1 && inbox[0]["title"] == "resumed",
        "{inbox:?}"
    );
    Ok(())
}

/// A router stopped mid fan-out finishes the page it is on and records it: every copy
/// written is counted in the recorded progress (none beyond the cursor, which a resume
/// after the dedup window would write again), and the next router completes the rest.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stopping_router_hands_its_fanout_back_at_a_page_boundary() -> anyhow::Result<()> {
    let nats = Nats::single().await?;
    let api = Herald::builder(&nats)
        .roles(Roles::API)
        .topics(herald_api::TopicSettings {
            big_threshold: u64::MAX,
            ..Default::default()
        })
        .start()
        .await?;
    const USERS: u64 = 20_000;
    for chunk in (0..USERS).collect::<Vec<_>>().chunks(10_000) {
        let users: Vec<String> = chunk.iter().map(|i| format!("d{i}")).collect();
        ok(api
            .producer(Method::POST, "/v1/topics/drain/subscribers")
            .json(&json!({"user_ids": users}))
            .send()
            .await?)
        .await?;
    }
    let id = publish(&api, "drain", "drained").await?["id"]
        .as_str()
        .context("id")?
        .to_owned();
    let mut router = Herald::builder(&nats).roles(Roles::ROUTER).start().await?;
    eventually(Duration::from_secs(30), "a few pages done", || async {
        let p = fanout_of(&api, "drain", &id).await?;
        ensure!(p["done"].as_u64().unwrap_or(0) >= 512, "{p}");
        Ok(())
    })
    .await?;
    router.stop().await?;

    let stopped = fanout_of(&api, "drain", &id).await?;
    let done = stopped["done"].as_u64().context("done")?;
    ensure!(
        stopped["state"] == "running" && done < USERS,
        "the fan-out ended before the stop, nothing was shown: {stopped}"
    );
    let js = async_nats::jetstream::new(nats.client().await?);
    let mut inbox = js.get_stream(herald_protocol::streams::INBOX).await?;
    let written = inbox.info().await?.state.messages;
    ensure!(
        written == done,
        "{written} copies written, {done} recorded: a page was dropped half done"
    );

    let _next = Herald::builder(&nats).roles(Roles::ROUTER).start().await?;
    let finished = progress_done(&api, "drain", &id).await?;
    ensure!(finished["done"] == USERS, "{finished}");
    let written = inbox.info().await?.state.messages;
    ensure!(written == USERS, "{written} copies for {USERS} subscribers");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fanout_applies_each_subscribers_preferences() -> anyhow::Result<()> {
    use futures::StreamExt as _;
    let nats = Nats::single().await?;
    let herald = Herald::builder(&nats).start().await?;
    let users = ["keen-1", "opted-out", "keen-2"];
    // Jobs are per target: every subscriber has a push device.
    for user in users {
        let r = herald
            .user(Method::POST, "/v1/me/devices", user)
            .json(&json!({"platform": "ios", "token": format!("tok-{user}")}))
            .send()
            .await?;
        ensure!(r.status().is_success(), "device for {user}: {}", r.status());
    }
    ok(herald
        .producer(Method::POST, "/v1/topics/deals/subscribers")
        .json(&json!({"user_ids": users}))
        .send()
        .await?)
    .await?;
    ok(herald
        .user(Method::PUT, "/v1/me/preferences", "opted-out")
        .json(&json!({"opt_out": true}))
        .send()
        .await?)
    .await?;
    let client = herald.nats_client().await?;
    let mut jobs = client
        .subscribe(format!("{}.work.>", herald.subjects().prefix()))
        .await?;
    client.flush().await?;
    let response = herald
        .producer(Method::POST, "/v1/topics/deals/publish")
        .json(&json!({"title": "50% off", "channels": ["inbox", "push"]}))
        .send()
        .await?;
    ensure!(
        response.status() == StatusCode::ACCEPTED,
        "publish: {}",
        response.status()
    );
    let id = response.json::<Value>().await?["id"]
        .as_str()
        .context("id")?
        .to_owned();
    progress_done(&herald, "deals", &id).await?;
    let mut pushed = Vec::new();
    for _ in 0..2 {
        let msg = within(Duration::from_secs(20), "a push job", jobs.next())
            .await?
            .context("job feed closed")?;
        let job: herald_protocol::ChannelJob = serde_json::from_slice(&msg.payload)?;
        pushed.push(job.user_id.as_str().to_owned());
    }
    pushed.sort();
    ensure!(
        pushed == ["keen-1", "keen-2"],
        "push only for those who want it: {pushed:?}"
    );
    ensure!(
        herald.inbox("opted-out").await?.len() == 1,
        "the opted-out user's inbox still records"
    );
    // Nothing else is on its way: a later notification's job is the next one seen.
    let marker = herald
        .accept(&json!({"user_id": "keen-1", "title": "marker", "channels": ["inbox", "push"]}))
        .await?;
    let msg = within(Duration::from_secs(20), "the marker's job", jobs.next())
        .await?
        .context("job feed closed")?;
    let job: herald_protocol::ChannelJob = serde_json::from_slice(&msg.payload)?;
    ensure!(
        job.id == marker.id,
        "no job for the opted-out subscriber: {job:?}"
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn websocket_frames_join_and_leave_topics() -> anyhow::Result<()> {
    use tokio_tungstenite::tungstenite::Message;
    let nats = Nats::single().await?;
    let herald = Herald::builder(&nats)
        .topics(herald_api::TopicSettings {
            self_subscribe: vec!["public.*".into()],
            ..Default::default()
        })
        .start()
        .await?;
    let mut ws = herald.ws("jon", Resume::After(0)).await?;
    ws.hello().await?;
    let frame = |kind: &str, topic: &str| {
        Message::Text(json!({"type": kind, "topic": topic}).to_string().into())
    };
    ws.send(frame("subscribe", "public.weather")).await?;
    let answer = ws.next_frame().await?;
    ensure!(
        answer == json!({"type": "subscription", "topic": "public.weather", "subscribed": true}),
        "{answer}"
    );
    ws.send(frame("subscribe", "staff-only")).await?;
    let refused = ws.next_frame().await?;
    ensure!(
        refused["subscribed"] == false && refused["error"].is_string(),
        "{refused}"
    );
    let mine = ok(herald
        .user(Method::GET, "/v1/me/subscriptions", "jon")
        .send()
        .await?)
    .await?;
    ensure!(mine["topics"] == json!(["public.weather"]), "{mine}");

    // The connection receives what is published to the topic it joined.
    let published = publish(&herald, "public.weather", "storm warning").await?;
    let live = within(Duration::from_secs(20), "the topic copy", ws.take(1)).await??;
    ensure!(live[0]["title"] == "storm warning", "{live:?}");
    progress_done(
        &herald,
        "public.weather",
        published["id"].as_str().context("id")?,
    )
    .await?;

    ws.send(frame("unsubscribe", "public.weather")).await?;
    let left = ws.next_frame().await?;
    ensure!(
        left["subscribed"] == false && left.get("error").is_none(),
        "{left}"
    );
    let mine = ok(herald
        .user(Method::GET, "/v1/me/subscriptions", "jon")
        .send()
        .await?)
    .await?;
    ensure!(mine["topics"] == json!([]), "{mine}");
    Ok(())
}

/// Full-size bulk requests side by side: each writes 20,000 subscription records, more
/// than the client's JetStream acks in flight, so a request that queued every write
/// before awaiting any would wait forever for a permit (it did, before the write window).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn full_size_bulk_subscribes_side_by_side_all_complete() -> anyhow::Result<()> {
    let nats = Nats::single().await?;
    let herald = Herald::builder(&nats).roles(Roles::API).start().await?;
    let requests = (0..3).map(|r| {
        let users: Vec<String> = (0..10_000).map(|i| format!("bulk-{r}-{i}")).collect();
        let request = herald
            .producer(Method::POST, "/v1/topics/big.bulk/subscribers")
            .json(&json!({ "user_ids": users }));
        async move { ok(request.send().await?).await }
    });
    let answers = within(
        Duration::from_secs(120),
        "three bulk subscribes of 10,000",
        futures::future::try_join_all(requests),
    )
    .await??;
    for answer in &answers {
        ensure!(answer["subscribed"] == 10_000, "{answer}");
    }
    let described = ok(herald
        .producer(Method::GET, "/v1/topics/big.bulk")
        .send()
        .await?)
    .await?;
    ensure!(described["subscribers"] == 30_000, "{described}");
    Ok(())
}

/// A user's topics are one set, written compare-and-set: subscribes to many topics at
/// once (single and bulk, side by side) all land, a repeated one changes nothing, an
/// unsubscribe removes only its topic, and the set is capped with a 409 that says what
/// to do.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_users_topics_survive_concurrent_subscribes_and_are_capped() -> anyhow::Result<()> {
    let nats = Nats::single().await?;
    let herald = Herald::builder(&nats).roles(Roles::API).start().await?;
    let topics: Vec<String> = (0..24).map(|i| format!("news.t{i:02}")).collect();
    let subscribes = topics.iter().enumerate().map(|(i, topic)| {
        // Half one by one, half through the bulk endpoint with another user beside.
        let request = if i % 2 == 0 {
            herald.producer(Method::PUT, &format!("/v1/topics/{topic}/subscribers/ann"))
        } else {
            herald
                .producer(Method::POST, &format!("/v1/topics/{topic}/subscribers"))
                .json(&json!({ "user_ids": ["ann", format!("other-{i}")] }))
        };
        async move { ok(request.send().await?).await }
    });
    within(
        Duration::from_secs(60),
        "24 concurrent subscribes of one user",
        futures::future::try_join_all(subscribes),
    )
    .await??;
    let mine = |user: &'static str| {
        let request = herald.user(Method::GET, "/v1/me/subscriptions", user);
        async move {
            let answer = ok(request.send().await?).await?;
            let mut topics: Vec<String> = serde_json::from_value(answer["topics"].clone())?;
            topics.sort();
            anyhow::Ok(topics)
        }
    };
    ensure!(mine("ann").await? == topics, "{:?}", mine("ann").await?);

    // Again: nothing changes.
    ok(herald
        .producer(Method::PUT, "/v1/topics/news.t00/subscribers/ann")
        .send()
        .await?)
    .await?;
    ensure!(mine("ann").await? == topics);

    ok(herald
        .producer(Method::DELETE, "/v1/topics/news.t05/subscribers/ann")
        .send()
        .await?)
    .await?;
    let left: Vec<String> = topics
        .iter()
        .filter(|t| *t != "news.t05")
        .cloned()
        .collect();
    ensure!(mine("ann").await? == left);

    // The cap: 1,000 topics per user.
    for i in 0..herald_store::MAX_TOPICS_PER_USER {
        ok(herald
            .producer(
                Method::PUT,
                &format!("/v1/topics/many.t{i}/subscribers/max"),
            )
            .send()
            .await?)
        .await?;
    }
    let over = herald
        .producer(Method::PUT, "/v1/topics/one.more/subscribers/max")
        .send()
        .await?;
    ensure!(over.status() == StatusCode::CONFLICT, "{}", over.status());
    let body: Value = over.json().await?;
    ensure!(body["error"]["code"] == "too_many_topics", "{body}");
    ensure!(mine("max").await?.len() == herald_store::MAX_TOPICS_PER_USER);
    // Refused means not subscribed: the topic does not count them, nor would a publish.
    let described = ok(herald
        .producer(Method::GET, "/v1/topics/one.more")
        .send()
        .await?)
    .await?;
    ensure!(described["subscribers"] == 0, "{described}");

    // A bulk subscribe naming the capped user beside 200 who follow something already
    // (their sets are read and changed after the records are written): refused for that
    // user only, and every other one follows the topic both ways — a record on the topic
    // (what the fan-out reads) and the topic in their set (what their view reads).
    let others: Vec<String> = (0..200).map(|i| format!("had-{i:03}")).collect();
    ok(herald
        .producer(Method::POST, "/v1/topics/prior/subscribers")
        .json(&json!({ "user_ids": others }))
        .send()
        .await?)
    .await?;
    let mut named = vec!["max".to_owned()];
    named.extend(others.iter().cloned());
    let bulk = herald
        .producer(Method::POST, "/v1/topics/bulk.t/subscribers")
        .json(&json!({ "user_ids": named }))
        .send()
        .await?;
    ensure!(bulk.status() == StatusCode::CONFLICT, "{}", bulk.status());
    let described = ok(herald
        .producer(Method::GET, "/v1/topics/bulk.t")
        .send()
        .await?)
    .await?;
    ensure!(described["subscribers"] == 200, "{described}");
    for user in &others {
        let answer = ok(herald
            .user(Method::GET, "/v1/me/subscriptions", user)
            .send()
            .await?)
        .await?;
        let theirs: Vec<String> = serde_json::from_value(answer["topics"].clone())?;
        ensure!(
            theirs.iter().any(|t| t == "bulk.t"),
            "{user} has a record on bulk.t but not the topic in their set: {theirs:?}"
        );
    }
    Ok(())
}

/// A fan-out reads a topic's subscribers through an ordered consumer: every one stored
/// is read once, in stream order, and the read ends, even when the last ones counted
/// when it began were unsubscribed before it reached them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn subscriber_pages_read_each_once_and_end_after_the_tail_left() -> anyhow::Result<()> {
    let nats = Nats::single().await?;
    let herald = Herald::builder(&nats).roles(Roles::API).start().await?;
    let users: Vec<String> = (0..600).map(|i| format!("pager-{i:03}")).collect();
    ok(herald
        .producer(Method::POST, "/v1/topics/paged/subscribers")
        .json(&json!({ "user_ids": users }))
        .send()
        .await?)
    .await?;
    let store = herald_store::connect(&nats.url(), "test").await?;
    let subs = herald_store::Subscriptions::new(store, herald.subjects().clone());
    let topic = herald_protocol::TopicId::new("paged")?;
    let mut pages = subs.pages(&topic, 1).await?;
    for user in &users[590..] {
        subs.unsubscribe(&topic, &herald_protocol::UserId::new(user.as_str())?)
            .await?;
    }
    let mut read = Vec::new();
    let mut last_seq = 0;
    while let Some(page) = within(Duration::from_secs(30), "a page", pages.next_page()).await?? {
        ensure!(page.len() <= herald_store::topics::PAGE, "{}", page.len());
        for (seq, sub) in page {
            ensure!(seq > last_seq, "stream order: {seq} after {last_seq}");
            last_seq = seq;
            read.push(sub.user_id.as_str().to_owned());
        }
    }
    // What was still subscribed was read exactly once; of the tail that left, at most
    // what the consumer had already been handed.
    ensure!((590..=600).contains(&read.len()), "{} read", read.len());
    ensure!(read[..590] == users[..590], "{:?}", &read[..5]);
    Ok(())
}

/// A topic name may take the whole 128 bytes a name may; its publishes still go out
/// (they were once validated with the recipient `topic:<name>`, over a user id's limit).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_topic_with_the_longest_name_can_be_published_to() -> anyhow::Result<()> {
    let nats = Nats::single().await?;
    let herald = Herald::builder(&nats).start().await?;
    // 128 bytes, multi-byte characters across the cut `topic:` would fall on.
    let topic = format!("{}{}", "é".repeat(60), "x".repeat(8));
    assert_eq!(topic.len(), 128);
    let path = format!(
        "/v1/topics/{}/subscribers/{}",
        herald_tests::encode(&topic),
        herald_tests::encode("lia")
    );
    ok(herald.producer(Method::PUT, &path).send().await?).await?;
    let sent = publish(&herald, &herald_tests::encode(&topic), "long").await?;
    progress_done(
        &herald,
        &herald_tests::encode(&topic),
        sent["id"].as_str().context("id")?,
    )
    .await?;
    let inbox = herald.inbox("lia").await?;
    ensure!(inbox.len() == 1 && inbox[0]["title"] == "long", "{inbox:?}");
    Ok(())
}

/// A `subscribe` frame refused for what the user can fix (the 1,000-topic cap) says so,
/// as `POST /v1/me/subscriptions` does with its 409, instead of "the store is
/// unavailable; try again", which a client would retry forever.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_subscribe_frame_over_the_cap_says_why() -> anyhow::Result<()> {
    let nats = Nats::single().await?;
    let herald = Herald::builder(&nats)
        .topics(herald_api::TopicSettings {
            self_subscribe: vec!["public.*".into()],
            ..Default::default()
        })
        .start()
        .await?;
    let users: Vec<String> = vec!["cap".into()];
    for i in 0..herald_store::MAX_TOPICS_PER_USER {
        ok(herald
            .producer(Method::POST, &format!("/v1/topics/many.t{i}/subscribers"))
            .json(&json!({ "user_ids": users }))
            .send()
            .await?)
        .await?;
    }
    let mut ws = herald.ws("cap", Resume::Live).await?;
    ws.hello().await?;
    ws.send(tokio_tungstenite::tungstenite::Message::text(
        r#"{"type":"subscribe","topic":"public.one.more"}"#,
    ))
    .await?;
    let answer = ws.next_frame().await?;
    ensure!(answer["type"] == "subscription", "{answer}");
    ensure!(answer["subscribed"] == false, "{answer}");
    let error = answer["error"].as_str().unwrap_or_default();
    ensure!(error.contains("already follows"), "{answer}");
    Ok(())
}
