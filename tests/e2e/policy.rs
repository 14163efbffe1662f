//! Quiet hours and rate caps, applied by the router to every channel beyond the inbox:
//! the inbox records at once; during quiet hours the channel work waits (JetStream's
//! scheduler holds it) unless the notification is `high`; over a cap it is skipped with
//! the rule, visible in the delivery status.

use anyhow::ensure;
use herald_protocol::Policy;
use herald_protocol::preferences::RateCap;
use herald_tests::{Herald, JobFeed, Nats, eventually};
use reqwest::{Method, StatusCode};
use serde_json::{Value, json};
use std::time::Duration;

async fn with_device(herald: &Herald, user: &str) -> anyhow::Result<()> {
    let r = herald
        .user(Method::POST, "/v1/me/devices", user)
        .json(&json!({"platform": "ios", "token": format!("{:0>64x}", user.len())}))
        .send()
        .await?;
    ensure!(r.status().is_success(), "device: {}", r.status());
    Ok(())
}

/// The push entry of a notification's delivery status, once it has one.
async fn push_status(herald: &Herald, id: &str) -> anyhow::Result<Value> {
    eventually(Duration::from_secs(20), "a push status", || async {
        let s: Value = herald
            .producer(Method::GET, &format!("/v1/notifications/{id}"))
            .send()
            .await?
            .json()
            .await?;
        let entry = s["channels"]["push"][0].clone();
        ensure!(entry.is_object(), "no push entry yet: {s}");
        Ok(entry)
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn quiet_hours_hold_channel_work_until_they_end_except_for_high() -> anyhow::Result<()> {
    let nats = Nats::single().await?;
    let herald = Herald::builder(&nats).start().await?;
    with_device(&herald, "quinn").await?;
    // Quiet from a minute ago until the start of the next minute but one (UTC), so the
    // test waits at most two minutes and at least a few seconds.
    let now = jiff::Timestamp::now().to_zoned(jiff::tz::TimeZone::UTC);
    // Wrapping: a minute before 00:00:30 is 23:59, a window over midnight.
    let start = now.time().wrapping_sub(jiff::Span::new().minutes(1));
    let end_at = now
        .checked_add(jiff::Span::new().minutes(if now.second() > 50 { 2 } else { 1 }))?
        .with()
        .second(0)
        .subsec_nanosecond(0)
        .build()?;
    let hhmm = |t: jiff::civil::Time| format!("{:02}:{:02}", t.hour(), t.minute());
    let r = herald
        .user(Method::PUT, "/v1/me/preferences", "quinn")
        .json(&json!({"quiet_hours": {"start": hhmm(start), "end": hhmm(end_at.time())}, "timezone": "UTC"}))
        .send()
        .await?;
    ensure!(r.status() == StatusCode::OK, "prefs: {}", r.status());
    let mut jobs = JobFeed::open(&herald).await?;

    let quiet = herald
        .accept(&json!({"user_id": "quinn", "title": "later", "channels": ["inbox", "push"]}))
        .await?;
    let urgent = herald
        .accept(&json!({"user_id": "quinn", "title": "otp", "priority": "high", "channels": ["inbox", "push"]}))
        .await?;
    // The inbox has both at once.
    ensure!(
        herald.inbox("quinn").await?.len() == 2,
        "inbox records during quiet hours"
    );
    // The high one's job comes first, while the normal one waits.
    let first = jobs.next(Duration::from_secs(20)).await?;
    ensure!(first.id == urgent.id, "high is not held: {first:?}");
    let waiting = push_status(&herald, &quiet.id).await?;
    ensure!(
        waiting["state"] == "deferred",
        "deferred in the status: {waiting}"
    );
    ensure!(
        waiting["reason"]
            .as_str()
            .is_some_and(|r| r.starts_with("quiet_hours")),
        "with the rule: {waiting}"
    );
    // When quiet hours end, JetStream hands it back and the router enqueues it.
    let job = jobs.next(Duration::from_secs(150)).await?;
    let released = jiff::Timestamp::now();
    ensure!(
        job.id == quiet.id && job.seq == quiet.seq,
        "the deferred job, for its inbox entry: {job:?}"
    );
    ensure!(
        released >= end_at.timestamp(),
        "released at {released}, before {end_at}"
    );
    ensure!(
        herald.inbox("quinn").await?.len() == 2,
        "no second inbox entry"
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rate_caps_skip_interrupting_channels_over_the_cap() -> anyhow::Result<()> {
    let nats = Nats::single().await?;
    let policy = Policy::default().with_caps(vec![RateCap {
        category: Some("like".into()),
        producer: None,
        limit: 2,
        window_s: 3600,
        over: Default::default(),
    }]);
    let herald = Herald::builder(&nats).policy(policy).start().await?;
    with_device(&herald, "rae").await?;
    let mut jobs = JobFeed::open(&herald).await?;
    let like = |n: u32| json!({"user_id": "rae", "title": format!("like {n}"), "category": "like", "channels": ["inbox", "push"]});
    let first = herald.accept(&like(1)).await?;
    let second = herald.accept(&like(2)).await?;
    let third = herald.accept(&like(3)).await?;
    let other = herald
        .accept(&json!({"user_id": "rae", "title": "login", "category": "security", "channels": ["inbox", "push"]}))
        .await?;
    let mut ids = Vec::new();
    for _ in 0..3 {
        ids.push(jobs.next(Duration::from_secs(20)).await?.id);
    }
    ensure!(
        ids == [first.id.clone(), second.id.clone(), other.id.clone()],
        "jobs: {ids:?}"
    );
    let capped = push_status(&herald, &third.id).await?;
    ensure!(capped["state"] == "skipped", "{capped}");
    ensure!(
        capped["reason"]
            .as_str()
            .is_some_and(|r| r.starts_with("rate_cap")),
        "the rule is named: {capped}"
    );
    ensure!(
        herald.inbox("rae").await?.len() == 4,
        "the inbox records everything"
    );
    Ok(())
}

/// A notification the router has to retry (its work queue refuses the job) is counted
/// against the rate caps once, not once per try: after the queue is back it is queued,
/// not skipped as over a cap it never exceeded.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_retried_notification_counts_once_against_a_rate_cap() -> anyhow::Result<()> {
    let nats = Nats::single().await?;
    let policy = Policy::default().with_caps(vec![RateCap {
        category: Some("like".into()),
        producer: None,
        limit: 2,
        window_s: 3600,
        over: Default::default(),
    }]);
    let herald = Herald::builder(&nats).policy(policy).start().await?;
    with_device(&herald, "ray").await?;
    let refused = || async {
        let text = herald.metrics().await?;
        anyhow::Ok(
            crate::metrics::sample(&text, "herald_router_enqueue_refused_total").unwrap_or(0.0),
        )
    };
    let before = refused().await?;
    // Take the push queue away: every enqueue of the job goes unacknowledged.
    let js = async_nats::jetstream::new(nats.client().await?);
    let work = herald_protocol::streams::work_stream_name(herald_protocol::Channel::Push);
    let config = js.get_stream(&work).await?.info().await?.config.clone();
    js.delete_stream(&work).await?;
    let like = herald
        .accept(&json!({"user_id": "ray", "title": "like", "category": "like", "channels": ["inbox", "push"]}))
        .await?;
    // Four tries, more than the cap allows; or a verdict already (skipped as capped).
    eventually(
        Duration::from_secs(20),
        "the router retried four times",
        || async {
            let now = refused().await?;
            let status: Value = herald
                .producer(Method::GET, &format!("/v1/notifications/{}", like.id))
                .send()
                .await?
                .json()
                .await?;
            ensure!(
                now >= before + 4.0 || status["channels"]["push"][0].is_object(),
                "{now} refusals (from {before})"
            );
            Ok(())
        },
    )
    .await?;
    js.create_stream(config).await?;
    // The first push status written is the router's verdict: queued, or skipped.
    let entry = push_status(&herald, &like.id).await?;
    ensure!(
        entry["state"] == "queued",
        "one notification, under a cap of two: {entry}"
    );
    Ok(())
}
