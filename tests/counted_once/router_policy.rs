//! Rate caps and the policy metrics count each notification once: one that a cap
//! suppresses uses up no other cap's allowance (caps of different windows: a burst cap's
//! suppressions would otherwise eat the hourly one), and one the router retries in place is
//! counted in `herald_policy_suppressed_total` and `herald_rate_capped_total` once, not
//! once per try.

use anyhow::{Context as _, ensure};
use futures::StreamExt as _;
use herald_protocol::Policy;
use herald_protocol::preferences::{CapOver, RateCap};
use herald_tests::{Herald, JobFeed, Nats, eventually};
use reqwest::Method;
use serde_json::json;
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

/// Tries of one notification counted by the tests below: the router retries it in place
/// this many times (telling JetStream each time it is still in progress) before the stream
/// it needs comes back.
const TRIES: usize = 20;

/// Runs `send` while `stream` is gone, and puts the stream back once the router has
/// retried the notification in place [`TRIES`] times.
async fn without_stream<T, F, Fut>(nats: &Nats, stream: &str, send: F) -> anyhow::Result<T>
where
    F: FnOnce() -> Fut,
    Fut: std::future::Future<Output = anyhow::Result<T>>,
{
    let client = nats.client().await?;
    let mut acks = client
        .subscribe(format!("$JS.ACK.{}.>", herald_protocol::streams::INBOX))
        .await?;
    client.flush().await?;
    let js = async_nats::jetstream::new(client);
    let config = js.get_stream(stream).await?.info().await?.config.clone();
    js.delete_stream(stream).await?;
    let sent = send().await?;
    let mut tries = 0;
    while tries < TRIES {
        let ack = herald_tests::within(WAIT, "the next try", acks.next())
            .await?
            .context("ack subscription closed")?;
        if ack.payload.starts_with(b"+WPI") {
            tries += 1;
        }
    }
    js.create_stream(config).await?;
    Ok(sent)
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
    let capped = herald.channel_state(&burst.id, "push", "skipped").await?;
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
    herald.channel_state(&later.id, "push", "queued").await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_notification_retried_in_place_is_counted_once_in_the_policy_metrics()
-> anyhow::Result<()> {
    let nats = Nats::single().await?;
    // Over a promo cap, the email folds into a digest.
    let policy = Policy::default().with_caps(vec![cap(Some("promo"), 1, 3600, CapOver::Digest)]);
    let herald = Herald::builder(&nats).policy(policy).start().await?;
    let r = herald
        .producer(Method::PUT, "/v1/users/mac/contact")
        .json(&json!({"email": "mac@example.com", "webhook": "https://hooks.example.com/mac"}))
        .send()
        .await?;
    ensure!(r.status().is_success(), "contact: {}", r.status());
    // Webhooks off: every notification asking for one counts a suppression. No other
    // test of this process switches webhooks off, so that count is this test's alone.
    let r = herald
        .producer(Method::PUT, "/v1/users/mac/preferences")
        .json(&json!({"channels": {"webhook": false}}))
        .send()
        .await?;
    ensure!(r.status().is_success(), "prefs: {}", r.status());
    let metric = |name: &'static str| herald.metric(name);
    let suppressed = r#"herald_policy_suppressed_total{channel="webhook"}"#;
    let promo = |title: &str| {
        json!({"user_id": "mac", "title": title, "category": "promo",
               "channels": ["inbox", "email", "webhook"]})
    };
    let first = herald.accept(&promo("first")).await?;
    herald.channel_state(&first.id, "email", "queued").await?;
    let (suppressed_before, capped_before) = (
        metric(suppressed).await?,
        metric("herald_rate_capped_total").await?,
    );

    // The digest stream is gone: the second promo, over the cap, is retried in place
    // (its email cannot be recorded for the digest) until it is back. Each try tells
    // JetStream the message is still in progress.
    let body = promo("second");
    let second = without_stream(&nats, herald_protocol::streams::DIGEST, || {
        herald.accept(&body)
    })
    .await?;
    herald.channel_state(&second.id, "email", "digest").await?;

    let suppressed_now = metric(suppressed).await?;
    ensure!(
        suppressed_now - suppressed_before == 1.0,
        "one suppression counted for twenty tries: {suppressed_before} → {suppressed_now}"
    );
    // The other test of this process caps a few notifications: far fewer than twenty.
    let capped_now = metric("herald_rate_capped_total").await?;
    ensure!(
        capped_now - capped_before < 5.0,
        "one capped notification counted for twenty tries: {capped_before} → {capped_now}"
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_email_held_for_a_digest_is_counted_once_however_many_tries() -> anyhow::Result<()> {
    let nats = Nats::single().await?;
    let herald = Herald::builder(&nats).start().await?;
    let r = herald
        .producer(Method::PUT, "/v1/users/dee/contact")
        .json(&json!({"email": "dee@example.com"}))
        .send()
        .await?;
    ensure!(r.status().is_success(), "contact: {}", r.status());
    let r = herald
        .producer(Method::PUT, "/v1/users/dee/preferences")
        .json(&json!({"digest": "daily"}))
        .send()
        .await?;
    ensure!(r.status().is_success(), "prefs: {}", r.status());
    device(&herald, "dee").await?;
    let digested = || herald.metric("herald_router_digested_total");
    let before = digested().await?;

    // The push queue is gone: the email is held for the digest, then the push job cannot
    // be queued, and the notification is retried in place until the queue is back.
    let push = herald_protocol::streams::work_stream_name(herald_protocol::Channel::Push);
    let body = json!({"user_id": "dee", "title": "weekly report",
                      "channels": ["inbox", "email", "push"]});
    let held = without_stream(&nats, push, || herald.accept(&body)).await?;
    herald.channel_state(&held.id, "push", "queued").await?;
    herald.channel_state(&held.id, "email", "digest").await?;
    // Another test of this process folds an email into a digest: far fewer than twenty.
    let after = digested().await?;
    ensure!(
        after - before >= 1.0 && after - before < 5.0,
        "one held email counted for twenty tries: {before} → {after}"
    );
    Ok(())
}
