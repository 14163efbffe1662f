//! Rate caps count each notification once: one that a cap suppresses uses up no other
//! cap's allowance (caps of different windows: a burst cap's suppressions would
//! otherwise eat the hourly one).

use anyhow::ensure;
use herald_protocol::Policy;
use herald_protocol::preferences::{CapOver, RateCap};
use herald_tests::{Herald, JobFeed, Nats, eventually};
use reqwest::Method;
use serde_json::{Value, json};
use std::time::Duration;

const WAIT: Duration = Duration::from_secs(30);

async fn device(herald: &Herald, user: &str) -> anyhow::Result<()> {
    let r = herald
        .user(Method::POST, "/v1/me/devices", user)
        .json(&json!({"platform": "android", "token": format!("tok-{user}")}))
        .send()
        .await?;
    ensure!(r.status().is_success(), "device: {}", r.status());
    Ok(())
}

async fn state(herald: &Herald, id: &str, channel: &str, state: &str) -> anyhow::Result<Value> {
    eventually(WAIT, &format!("{id} {channel} {state}"), || async {
        let s: Value = herald
            .producer(Method::GET, &format!("/v1/notifications/{id}"))
            .send()
            .await?
            .json()
            .await?;
        let entry = s["channels"][channel][0].clone();
        ensure!(entry["state"] == state, "status now {s}");
        Ok(entry)
    })
    .await
}

fn cap(category: Option<&str>, limit: u32, window_s: u64, over: CapOver) -> RateCap {
    RateCap {
        category: category.map(str::to_owned),
        producer: None,
        limit,
        window_s,
        over,
    }
}

/// The caps' fixed window of `window_s` seconds that holds the present.
fn window(window_s: u64) -> u64 {
    u64::try_from(jiff::Timestamp::now().as_second()).unwrap_or(0) / window_s
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_notification_one_cap_suppresses_uses_up_no_other_cap() -> anyhow::Result<()> {
    const BURST_S: u64 = 5;
    let nats = Nats::single().await?;
    // Two an hour, and one per five seconds: the hourly cap is checked first.
    let policy = Policy::default().with_caps(vec![
        cap(None, 2, 3600, CapOver::default()),
        cap(None, 1, BURST_S, CapOver::default()),
    ]);
    let herald = Herald::builder(&nats).policy(policy).start().await?;
    device(&herald, "cyd").await?;
    let mut jobs = JobFeed::open(&herald).await?;
    let like = |title: &str| json!({"user_id": "cyd", "title": title, "category": "like", "channels": ["inbox", "push"]});
    // Two at once, early in a five-second window: the second is over the burst cap.
    let start = eventually(WAIT, "the start of a burst window", || async {
        let now = jiff::Timestamp::now().as_second();
        ensure!(now % 5 == 0, "{now}");
        Ok(window(BURST_S))
    })
    .await?;
    let first = herald.accept(&like("one")).await?;
    let burst = herald.accept(&like("two")).await?;
    ensure!(jobs.next(WAIT).await?.id == first.id, "the first");
    let capped = state(&herald, &burst.id, "push", "skipped").await?;
    ensure!(
        capped["reason"] == "rate_cap: 1 per 5 s",
        "over the burst cap: {capped}"
    );
    ensure!(
        window(BURST_S) == start,
        "the two were sent within one burst window"
    );

    // A later burst window: the suppressed one did not count against the hourly cap,
    // so this one is the second of the hour.
    eventually(WAIT, "the next burst window", || async {
        ensure!(window(BURST_S) > start, "still window {start}");
        Ok(())
    })
    .await?;
    let later = herald.accept(&like("three")).await?;
    let job = jobs.next(WAIT).await?;
    ensure!(job.id == later.id, "the later one is sent: {job:?}");
    state(&herald, &later.id, "push", "queued").await?;
    Ok(())
}
