//! Lanes hold for deferred work too (SPEC §6.6): what comes back to the router later —
//! from quiet hours, a group's window, a digest period — comes back on its own lane, so
//! `low` work the router is stuck on never holds up `normal` or `high` work of the same
//! partition.

use anyhow::ensure;
use herald_tests::schedules::fire_early;
use herald_tests::{Herald, JobFeed, Nats, eventually};
use reqwest::Method;
use serde_json::json;
use std::time::Duration;

const WAIT: Duration = Duration::from_secs(30);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn low_work_back_from_quiet_hours_never_holds_up_normal_work() -> anyhow::Result<()> {
    let nats = Nats::single().await?;
    // One partition: both users' work goes through the same router consumers.
    let herald = Herald::builder(&nats).partitions(1).start().await?;
    let r = herald
        .producer(Method::PUT, "/v1/users/lou/contact")
        .json(&json!({"phone": "+15550100123"}))
        .send()
        .await?;
    ensure!(r.status().is_success(), "contact: {}", r.status());
    herald.quiet_now("lou").await?;
    let low = herald
        .accept(
            &json!({"user_id": "lou", "title": "weekend sale", "priority": "low",
                        "channels": ["inbox", "sms"]}),
        )
        .await?;
    herald.channel_state(&low.id, "sms", "deferred").await?;

    // The SMS queue is gone: once back from quiet hours, lou's low work is retried in
    // place until it returns.
    let js = async_nats::jetstream::new(nats.client().await?);
    let sms = herald_protocol::streams::work_stream_name(herald_protocol::Channel::Sms);
    let config = js.get_stream(sms).await?.info().await?.config.clone();
    js.delete_stream(sms).await?;
    let refused = || async {
        let text = herald.metrics().await?;
        anyhow::Ok(
            crate::metrics::sample(&text, "herald_router_enqueue_refused_total").unwrap_or(0.0),
        )
    };
    let before = refused().await?;
    fire_early(&herald, "lou", "q-").await?;
    eventually(WAIT, "the router retrying lou's low work", || async {
        let now = refused().await?;
        ensure!(now > before, "{now} refusals (from {before})");
        Ok(())
    })
    .await?;

    // Meanwhile a normal notification of another user is routed.
    let r = herald
        .user(Method::POST, "/v1/me/devices", "nia")
        .json(&json!({"platform": "android", "token": "tok-nia"}))
        .send()
        .await?;
    ensure!(r.status().is_success(), "device: {}", r.status());
    let mut jobs = JobFeed::open(&herald).await?;
    let normal = herald
        .accept(&json!({"user_id": "nia", "title": "your code", "channels": ["inbox", "push"]}))
        .await?;
    // The stuck SMS job's retries pass by on the work subjects too.
    let deadline = tokio::time::Instant::now() + WAIT;
    while jobs
        .next(deadline.saturating_duration_since(tokio::time::Instant::now()))
        .await?
        .id
        != normal.id
    {}

    js.create_stream(config).await?;
    herald.channel_state(&low.id, "sms", "queued").await?;
    Ok(())
}
