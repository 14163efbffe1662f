//! Topic publishes as a producer retries them: idempotency keys of their own, the same
//! answer and the same path for every retry, no half-done publish, a key used again after
//! its dedup window, priority lanes for fan-outs, and progress that belongs to its topic.

use anyhow::{Context as _, ensure};
use herald::mesh::Roles;
use herald_protocol::streams::{FANOUT, INBOX};
use herald_tests::jobs::JobFeed;
use herald_tests::{Herald, Nats, eventually};
use reqwest::{Method, StatusCode};
use serde_json::{Value, json};
use std::time::Duration;

const WAIT: Duration = Duration::from_secs(30);

/// Publishes from this many subscribers take the big-topic path.
fn threshold(big_threshold: u64) -> herald_api::TopicSettings {
    herald_api::TopicSettings {
        big_threshold,
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

/// A publish with `key`; its status and answer.
async fn publish(
    herald: &Herald,
    topic: &str,
    key: &str,
    body: &Value,
) -> anyhow::Result<(StatusCode, Value)> {
    let response = herald
        .producer(Method::POST, &format!("/v1/topics/{topic}/publish"))
        .header("Idempotency-Key", key)
        .json(body)
        .send()
        .await?;
    Ok((response.status(), response.json().await?))
}

/// A publish with `key` that must be accepted; its answer.
async fn accepted(herald: &Herald, topic: &str, key: &str, body: &Value) -> anyhow::Result<Value> {
    let (status, answer) = publish(herald, topic, key, body).await?;
    ensure!(status == StatusCode::ACCEPTED, "{status}: {answer}");
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

async fn add_device(herald: &Herald, user: &str) -> anyhow::Result<()> {
    ok(herald
        .user(Method::POST, "/v1/me/devices", user)
        .json(&json!({"platform": "ios", "token": format!("tok-{user}")}))
        .send()
        .await?)
    .await?;
    Ok(())
}

fn titles(inbox: &[Value]) -> Vec<&str> {
    inbox.iter().filter_map(|n| n["title"].as_str()).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_topic_publish_key_is_not_taken_for_a_notify_with_that_key() -> anyhow::Result<()> {
    let nats = Nats::single().await?;
    let herald = Herald::builder(&nats).topics(threshold(0)).start().await?;
    add_device(&herald, "fan").await?;
    subscribe(&herald, "launches", &["fan"]).await?;
    let mut jobs = JobFeed::open(&herald).await?;
    // The producer uses one key for a personal notification and, later, for a publish.
    let notified = ok(herald
        .producer(Method::POST, "/v1/notify")
        .header("Idempotency-Key", "launch-7")
        .json(&json!({"user_id": "owner", "title": "your launch is live", "channels": ["inbox"]}))
        .send()
        .await?)
    .await?;
    let body = json!({"title": "launch 7 is live", "channels": ["inbox", "push"]});
    let published = accepted(&herald, "launches", "launch-7", &body).await?;
    ensure!(
        published["id"] != notified["id"] && published["seq"] != notified["seq"],
        "the publish is not the notify: {published} / {notified}"
    );
    let seq = published["seq"].as_u64().context("seq")?;
    let fan = herald.inbox("fan").await?;
    ensure!(
        titles(&fan) == ["launch 7 is live"] && fan[0]["seq"] == seq,
        "{fan:?}"
    );
    ensure!(
        titles(&herald.inbox("owner").await?) == ["your launch is live"],
        "the notify is untouched"
    );
    let job = jobs.next(WAIT).await?;
    ensure!(
        job.seq == seq && job.user_id.as_str() == "fan",
        "the push points at the stored publish: {job:?}"
    );
    // A retry of the publish is answered as the first time, and stored nothing more.
    let again = accepted(&herald, "launches", "launch-7", &body).await?;
    ensure!(
        again["id"] == published["id"] && again["seq"] == seq,
        "{again} / {published}"
    );
    let id = published["id"].as_str().context("id")?;
    let fanout = done(&herald, "launches", id).await?;
    ensure!(fanout["routed"] == 1, "{fanout}");
    ensure!(herald.inbox("fan").await?.len() == 1, "stored once");
    Ok(())
}

/// Changes `stream`'s configuration with `change`, as an operator would.
async fn reconfigure(
    nats: &Nats,
    stream: &str,
    change: impl FnOnce(&mut async_nats::jetstream::stream::Config),
) -> anyhow::Result<()> {
    let js = async_nats::jetstream::new(nats.client().await?);
    let mut config = js
        .get_stream(stream)
        .await
        .map_err(|e| anyhow::anyhow!("{e}"))?
        .info()
        .await
        .map_err(|e| anyhow::anyhow!("{e}"))?
        .config
        .clone();
    change(&mut config);
    js.update_stream(config)
        .await
        .map_err(|e| anyhow::anyhow!("{e}"))?;
    Ok(())
}

/// Sets the largest message `stream` takes: lowered, it refuses one of the two writes of
/// a publish while the other goes through.
async fn max_msg_size(nats: &Nats, stream: &str, size: i32) -> anyhow::Result<()> {
    reconfigure(nats, stream, |c| c.max_message_size = size).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_publish_refused_before_its_fan_out_was_queued_shows_nowhere() -> anyhow::Result<()> {
    let nats = Nats::single().await?;
    let api = Herald::builder(&nats)
        .topics(threshold(0))
        .roles(Roles::API)
        .start()
        .await?;
    add_device(&api, "fan").await?;
    subscribe(&api, "flash", &["fan"]).await?;
    // The fan-out queue refuses the job (the stored publish would pass).
    max_msg_size(&nats, FANOUT, 256).await?;
    let body = json!({"title": "flash sale", "channels": ["inbox", "push"]});
    let (status, answer) = publish(&api, "flash", "flash-1", &body).await?;
    ensure!(
        status == StatusCode::SERVICE_UNAVAILABLE,
        "{status}: {answer}"
    );
    ensure!(
        api.inbox("fan").await?.is_empty(),
        "a 503 leaves no publish in any view whose channel work nothing would ever send"
    );
    // The queue takes jobs again; the producer retries and it happens once, in full.
    max_msg_size(&nats, FANOUT, 128 * 1024).await?;
    let published = accepted(&api, "flash", "flash-1", &body).await?;
    let seq = published["seq"].as_u64().context("seq")?;
    let mut jobs = JobFeed::open(&api).await?;
    let _router = Herald::builder(&nats)
        .topics(threshold(0))
        .roles(Roles::ROUTER)
        .start()
        .await?;
    let fanout = done(&api, "flash", published["id"].as_str().context("id")?).await?;
    ensure!(fanout["routed"] == 1, "{fanout}");
    let job = jobs.next(WAIT).await?;
    ensure!(job.seq == seq, "{job:?}");
    ensure!(api.inbox("fan").await?.len() == 1, "stored once");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_queued_fan_out_stores_the_publish_the_api_failed_to_store() -> anyhow::Result<()> {
    let nats = Nats::single().await?;
    let api = Herald::builder(&nats)
        .topics(threshold(0))
        .roles(Roles::API)
        .start()
        .await?;
    for user in ["fan-1", "fan-2"] {
        add_device(&api, user).await?;
    }
    subscribe(&api, "drops", &["fan-1", "fan-2"]).await?;
    // The inbox refuses the publish (the fan-out job would pass): as if the API had
    // stopped between the two writes.
    max_msg_size(&nats, INBOX, 2048).await?;
    let body = json!({"title": "drop", "channels": ["inbox", "push"],
        "data": {"pad": "x".repeat(4096)}});
    let (status, answer) = publish(&api, "drops", "drop-1", &body).await?;
    ensure!(
        status == StatusCode::SERVICE_UNAVAILABLE,
        "{status}: {answer}"
    );
    max_msg_size(&nats, INBOX, 128 * 1024).await?;
    // Nobody retries. A fan-out worker completes what was queued: stored once, pushed.
    let mut jobs = JobFeed::open(&api).await?;
    let _router = Herald::builder(&nats)
        .topics(threshold(0))
        .roles(Roles::ROUTER)
        .start()
        .await?;
    let stored = eventually(WAIT, "the publish in the view", || async {
        let inbox = api.inbox("fan-1").await?;
        ensure!(titles(&inbox) == ["drop"], "{inbox:?}");
        inbox[0]["seq"].as_u64().context("seq")
    })
    .await?;
    let mut pushed = Vec::new();
    for _ in 0..2 {
        let job = jobs.next(WAIT).await?;
        ensure!(
            job.seq == stored,
            "the push points at the stored publish: {job:?}"
        );
        pushed.push(job.user_id.as_str().to_owned());
    }
    pushed.sort();
    ensure!(pushed == ["fan-1", "fan-2"], "{pushed:?}");
    // A late retry is answered with what the worker stored, and stores nothing more.
    let again = accepted(&api, "drops", "drop-1", &body).await?;
    ensure!(again["seq"] == stored, "{again}");
    ensure!(api.inbox("fan-2").await?.len() == 1, "stored once");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_retry_takes_the_path_its_first_attempt_chose() -> anyhow::Result<()> {
    let nats = Nats::single().await?;
    let herald = Herald::builder(&nats).topics(threshold(2)).start().await?;
    subscribe(&herald, "ops", &["stays", "leaves"]).await?;
    // Two subscribers: the big-topic path. The first attempt fails at the fan-out queue.
    max_msg_size(&nats, FANOUT, 256).await?;
    let body = json!({"title": "maintenance tonight", "channels": ["inbox"]});
    let (status, answer) = publish(&herald, "ops", "maint-1", &body).await?;
    ensure!(
        status == StatusCode::SERVICE_UNAVAILABLE,
        "{status}: {answer}"
    );
    // Below the threshold by the time the producer retries.
    ok(herald
        .producer(Method::DELETE, "/v1/topics/ops/subscribers/leaves")
        .send()
        .await?)
    .await?;
    max_msg_size(&nats, FANOUT, 128 * 1024).await?;
    let published = accepted(&herald, "ops", "maint-1", &body).await?;
    done(&herald, "ops", published["id"].as_str().context("id")?).await?;
    let inbox = herald.inbox("stays").await?;
    ensure!(
        titles(&inbox) == ["maintenance tonight"],
        "once, not a stored publish and a copy: {inbox:?}"
    );
    ensure!(
        published["path"] == "topic" && published["subscribers"] == 2,
        "the first attempt's choice: {published}"
    );
    // And again: the same answer.
    let again = accepted(&herald, "ops", "maint-1", &body).await?;
    ensure!(again == published, "{again} / {published}");
    // The key now names that publish: another topic with it is refused.
    let (status, answer) = publish(&herald, "other", "maint-1", &body).await?;
    ensure!(status == StatusCode::CONFLICT, "{status}: {answer}");
    Ok(())
}

/// Sets `stream`'s dedup window.
async fn dedup_window(nats: &Nats, stream: &str, window: Duration) -> anyhow::Result<()> {
    reconfigure(nats, stream, |c| c.duplicate_window = window).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_key_used_again_after_its_dedup_window_publishes_again() -> anyhow::Result<()> {
    let nats = Nats::single().await?;
    // `weekly` has two subscribers (stored once), `daily` one (a copy each).
    let herald = Herald::builder(&nats).topics(threshold(2)).start().await?;
    for user in ["reader", "other"] {
        add_device(&herald, user).await?;
    }
    subscribe(&herald, "weekly", &["reader", "other"]).await?;
    subscribe(&herald, "daily", &["reader"]).await?;
    let mut jobs = JobFeed::open(&herald).await?;
    let weekly = json!({"title": "this week", "channels": ["inbox", "push"]});
    let daily = json!({"title": "today", "channels": ["inbox"]});
    let first = accepted(&herald, "weekly", "digest", &weekly).await?;
    let seq = first["seq"].as_u64().context("seq")?;
    let id = first["id"].as_str().context("id")?.to_owned();
    done(&herald, "weekly", &id).await?;
    for _ in 0..2 {
        let job = jobs.next(WAIT).await?;
        ensure!(job.seq == seq, "{job:?}");
    }
    let first_daily = accepted(&herald, "daily", "digest-d", &daily).await?;
    done(&herald, "daily", first_daily["id"].as_str().context("id")?).await?;

    // The queue and the inbox now remember ids for a second only.
    for stream in [FANOUT, INBOX] {
        dedup_window(&nats, stream, Duration::from_secs(1)).await?;
    }
    // Retries are answered as the first publish until the key is forgotten; then the
    // same key publishes again, with every subscriber's push.
    let second = eventually(Duration::from_secs(60), "the key forgotten", || async {
        let answer = accepted(&herald, "weekly", "digest", &weekly).await?;
        ensure!(answer["seq"] != seq, "still the first publish: {answer}");
        Ok(answer)
    })
    .await?;
    ensure!(
        second["id"] != first["id"],
        "a new publish, with an id of its own: {second}"
    );
    let seq2 = second["seq"].as_u64().context("seq")?;
    let id2 = second["id"].as_str().context("id")?.to_owned();
    let mut pushed = Vec::new();
    for _ in 0..2 {
        let job = jobs.next(WAIT).await?;
        ensure!(job.seq == seq2, "the second publish's push: {job:?}");
        pushed.push(job.user_id.as_str().to_owned());
    }
    pushed.sort();
    ensure!(pushed == ["other", "reader"], "{pushed:?}");
    let routed = eventually(WAIT, "the second fan-out finished", || async {
        let p = ok(herald
            .producer(Method::GET, &format!("/v1/topics/weekly/publishes/{id2}"))
            .send()
            .await?)
        .await?;
        ensure!(
            p["fanout"]["state"] == "done" && p["fanout"]["routed"] == 2,
            "{p}"
        );
        Ok(p)
    })
    .await?;
    ensure!(routed["fanout"]["done"] == 2, "{routed}");
    // Fan-out on write alike: a second copy.
    eventually(
        Duration::from_secs(60),
        "the daily key forgotten",
        || async {
            accepted(&herald, "daily", "digest-d", &daily).await?;
            let inbox = herald.inbox("reader").await?;
            let copies = titles(&inbox).iter().filter(|t| **t == "today").count();
            ensure!(copies >= 2, "{inbox:?}");
            Ok(())
        },
    )
    .await?;
    Ok(())
}

/// Subscribes `n` users (`<prefix>-<i>`) to `topic`, 10,000 a request.
async fn subscribe_many(
    herald: &Herald,
    topic: &str,
    prefix: &str,
    n: usize,
) -> anyhow::Result<()> {
    let users: Vec<String> = (0..n).map(|i| format!("{prefix}-{i}")).collect();
    for chunk in users.chunks(10_000) {
        let refs: Vec<&str> = chunk.iter().map(String::as_str).collect();
        subscribe(herald, topic, &refs).await?;
    }
    Ok(())
}

/// The state of a publish's fan-out.
async fn state(herald: &Herald, topic: &str, id: &str) -> anyhow::Result<Value> {
    let p = ok(herald
        .producer(Method::GET, &format!("/v1/topics/{topic}/publishes/{id}"))
        .send()
        .await?)
    .await?;
    Ok(p["fanout"].clone())
}

/// A marketing blast's fan-out on write (20,000 copies) and a security alert to a small
/// topic: the alert's fan-out is done while the blast's still runs.
async fn blast_then_alert(herald: &Herald, blasts: usize) -> anyhow::Result<()> {
    subscribe_many(herald, "promo", "m", 20_000).await?;
    subscribe(herald, "security", &["on-call"]).await?;
    let mut low = Vec::new();
    for i in 0..blasts {
        let blast = json!({"title": format!("sale {i}"), "priority": "low", "channels": ["inbox"]});
        let answer = accepted(herald, "promo", &format!("promo-{i}"), &blast).await?;
        low.push(answer["id"].as_str().context("id")?.to_owned());
    }
    let alert = json!({"title": "new sign-in", "priority": "high", "channels": ["inbox"]});
    let high = accepted(herald, "security", "sec-1", &alert).await?;
    let high_id = high["id"].as_str().context("id")?;
    let done_high = done(herald, "security", high_id).await?;
    let first_low = state(herald, "promo", &low[0]).await?;
    ensure!(
        first_low["state"] != "done",
        "the alert waited for the blast: alert {done_high}, blast {first_low}"
    );
    ensure!(
        titles(&herald.inbox("on-call").await?) == ["new sign-in"],
        "the alert is in the on-call inbox"
    );
    for id in &low {
        done(herald, "promo", id).await?;
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_high_fan_out_does_not_wait_for_a_running_low_one() -> anyhow::Result<()> {
    let nats = Nats::single().await?;
    let herald = Herald::builder(&nats)
        .topics(threshold(1_000_000))
        .start()
        .await?;
    blast_then_alert(&herald, 1).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn provisioning_gives_an_earlier_fan_out_queue_its_lanes_and_high_passes_queued_low()
-> anyhow::Result<()> {
    use async_nats::jetstream::{consumer, stream};
    let nats = Nats::single().await?;
    // The FANOUT queue as an earlier version left it: one subject, one unfiltered consumer.
    let js = async_nats::jetstream::new(nats.client().await?);
    let lane_less = "herald.fanout".to_owned();
    let queue = js
        .create_stream(stream::Config {
            name: FANOUT.to_owned(),
            subjects: vec![lane_less.clone()],
            retention: stream::RetentionPolicy::WorkQueue,
            max_message_size: 128 * 1024,
            max_age: Duration::from_secs(7 * 24 * 3600),
            ..Default::default()
        })
        .await
        .map_err(|e| anyhow::anyhow!("{e}"))?;
    let first = herald_protocol::streams::FANOUT_CONSUMER;
    queue
        .create_consumer(consumer::pull::Config {
            durable_name: Some(first.to_owned()),
            ack_policy: consumer::AckPolicy::Explicit,
            ack_wait: Duration::from_secs(30),
            max_ack_pending: 64,
            ..Default::default()
        })
        .await
        .map_err(|e| anyhow::anyhow!("{e}"))?;

    // Starting Herald provisions.
    let herald = Herald::builder(&nats)
        .topics(threshold(1_000_000))
        .start()
        .await?;
    let mut queue = js
        .get_stream(FANOUT)
        .await
        .map_err(|e| anyhow::anyhow!("{e}"))?;
    let subjects = queue
        .info()
        .await
        .map_err(|e| anyhow::anyhow!("{e}"))?
        .config
        .subjects
        .clone();
    ensure!(
        subjects == [lane_less.clone(), format!("{lane_less}.*")],
        "FANOUT subjects: {subjects:?}"
    );
    let narrowed = queue
        .consumer_info(first)
        .await
        .map_err(|e| anyhow::anyhow!("{e}"))?;
    ensure!(
        narrowed.config.filter_subject == lane_less,
        "the first consumer keeps the lane-less jobs: {:?}",
        narrowed.config.filter_subject
    );
    for lane in herald_protocol::Priority::ALL {
        let name = herald_store::topics::fanout_lane_consumer(lane);
        let info = queue
            .consumer_info(&name)
            .await
            .map_err(|e| anyhow::anyhow!("{name}: {e}"))?;
        ensure!(
            info.config.filter_subject == format!("{lane_less}.{}", lane.as_str()),
            "{name} filter: {:?}",
            info.config.filter_subject
        );
    }
    // Three blasts queued: the alert passes them all.
    blast_then_alert(&herald, 3).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_publish_s_progress_is_found_on_its_own_topic_only() -> anyhow::Result<()> {
    let nats = Nats::single().await?;
    let herald = Herald::builder(&nats).start().await?;
    subscribe(&herald, "orders", &["buyer"]).await?;
    let body = json!({"title": "shipped", "channels": ["inbox"]});
    let published = accepted(&herald, "orders", "ship-1", &body).await?;
    let id = published["id"].as_str().context("id")?;
    done(&herald, "orders", id).await?;
    let get = |path: String| herald.producer(Method::GET, &path).send();
    let elsewhere = get(format!("/v1/topics/payroll/publishes/{id}")).await?;
    ensure!(
        elsewhere.status() == StatusCode::NOT_FOUND,
        "another topic's publish: {}",
        elsewhere.status()
    );
    let unknown = get(format!(
        "/v1/topics/orders/publishes/{}",
        uuid::Uuid::new_v4()
    ))
    .await?;
    ensure!(
        unknown.status() == StatusCode::NOT_FOUND,
        "no such publish: {}",
        unknown.status()
    );
    // Queued, before any worker took it: shown as queued, on its topic only.
    let api = Herald::builder(&nats).roles(Roles::API).start().await?;
    let queued = accepted(&api, "orders", "ship-2", &body).await?;
    let queued_id = queued["id"].as_str().context("id")?;
    let p = ok(get(format!("/v1/topics/orders/publishes/{queued_id}")).await?).await?;
    ensure!(
        ["queued", "running", "done"].contains(&p["fanout"]["state"].as_str().unwrap_or("")),
        "{p}"
    );
    let elsewhere = get(format!("/v1/topics/payroll/publishes/{queued_id}")).await?;
    ensure!(
        elsewhere.status() == StatusCode::NOT_FOUND,
        "{}",
        elsewhere.status()
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_high_big_topic_publish_is_routed_past_stuck_normal_work() -> anyhow::Result<()> {
    let nats = Nats::single().await?;
    // One partition: every user's work goes through the same router consumers.
    let herald = Herald::builder(&nats)
        .partitions(1)
        .topics(threshold(0))
        .start()
        .await?;
    ok(herald
        .producer(Method::PUT, "/v1/users/sam/contact")
        .json(&json!({"phone": "+15550100123"}))
        .send()
        .await?)
    .await?;
    add_device(&herald, "fan").await?;
    subscribe(&herald, "alerts", &["fan"]).await?;
    // The SMS queue is gone: sam's normal notification is retried in place, holding up
    // the partition's normal lane until it returns.
    let js = async_nats::jetstream::new(nats.client().await?);
    let sms = herald_protocol::streams::work_stream_name(herald_protocol::Channel::Sms);
    let config = js
        .get_stream(sms)
        .await
        .map_err(|e| anyhow::anyhow!("{e}"))?
        .info()
        .await
        .map_err(|e| anyhow::anyhow!("{e}"))?
        .config
        .clone();
    js.delete_stream(sms)
        .await
        .map_err(|e| anyhow::anyhow!("{e}"))?;
    let refused = || async {
        let text = herald.metrics().await?;
        anyhow::Ok(
            crate::metrics::sample(&text, "herald_router_enqueue_refused_total").unwrap_or(0.0),
        )
    };
    let before = refused().await?;
    herald
        .accept(
            &json!({"user_id": "sam", "title": "statement ready", "channels": ["inbox", "sms"]}),
        )
        .await?;
    eventually(WAIT, "the router retrying sam's normal work", || async {
        let now = refused().await?;
        ensure!(now > before, "{now} refusals (from {before})");
        Ok(())
    })
    .await?;
    // A high publish to a big topic: its channel work goes by the high lane.
    let mut jobs = JobFeed::open(&herald).await?;
    let alert = json!({"title": "outage", "priority": "high", "channels": ["inbox", "push"]});
    let published = accepted(&herald, "alerts", "outage-1", &alert).await?;
    let seq = published["seq"].as_u64().context("seq")?;
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        let job = jobs
            .next(deadline.saturating_duration_since(tokio::time::Instant::now()))
            .await?;
        if job.seq == seq {
            ensure!(job.user_id.as_str() == "fan", "{job:?}");
            break;
        }
    }
    js.create_stream(config)
        .await
        .map_err(|e| anyhow::anyhow!("{e}"))?;
    Ok(())
}
