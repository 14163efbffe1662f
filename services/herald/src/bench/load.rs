//! What `herald bench conns` sends: one notification to each user, a paced stream to the
//! fast clients, a flood to one user; and bounded waiting on the fleet's counters.

use super::BenchError;
use super::conns::ConnsArgs;
use super::fleet::Fleet;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

pub(super) async fn wait_for(
    done: impl Fn() -> bool,
    secs: u64,
    what: &str,
) -> Result<(), BenchError> {
    let deadline = Instant::now() + Duration::from_secs(secs);
    while !done() {
        if Instant::now() > deadline {
            return Err(format!("bench: {what}: not within {secs} s").into());
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    Ok(())
}

/// One notification to each of users `c-0 … c-{n-1}`, 1,000 per batch request, 4 at once.
pub(super) async fn send_one_each(
    http: &reqwest::Client,
    api: &str,
    key: &str,
    fleet: &Fleet,
    n: usize,
) -> Result<(), BenchError> {
    send_to(http, api, key, fleet, 0..n).await
}

/// One notification to each user `c-i` for `i` in `users`, 1,000 per batch request, 4 at
/// once.
pub(super) async fn send_to(
    http: &reqwest::Client,
    api: &str,
    key: &str,
    fleet: &Fleet,
    users: impl IntoIterator<Item = usize>,
) -> Result<(), BenchError> {
    let users: Vec<usize> = users.into_iter().collect();
    let chunks: Vec<&[usize]> = users.chunks(1000).collect();
    let sends = chunks.into_iter().map(|range| {
        let items: Vec<serde_json::Value> = range
            .iter()
            .map(|i| {
                serde_json::json!({"user_id": format!("c-{i}"), "title": "broadcast",
                "data": {"sent_us": fleet.now_us()}})
            })
            .collect();
        let body = serde_json::json!({ "notifications": items });
        let request = http
            .post(format!("{api}/v1/notify/batch"))
            .bearer_auth(key)
            .json(&body);
        async move {
            let response = request.send().await?;
            if response.status().as_u16() != 202 {
                return Err::<(), BenchError>(
                    format!("batch answered {}", response.status()).into(),
                );
            }
            Ok(())
        }
    });
    let results: Vec<Result<(), BenchError>> = futures::StreamExt::collect(
        futures::StreamExt::buffer_unordered(futures::stream::iter(sends), 4),
    )
    .await;
    results.into_iter().collect()
}

/// `rate`/s single notifications to users `c-0 … c-{fast-1}` for `seconds`; their
/// delivery latency.
pub(super) async fn paced(
    http: &reqwest::Client,
    api: &str,
    key: &str,
    fleet: &Arc<Fleet>,
    fast: usize,
    args: &ConnsArgs,
) -> Result<hdrhistogram::Histogram<u64>, BenchError> {
    Fleet::reset(&fleet.delivery);
    let total = args.rate * args.seconds;
    let want = fleet.timed.load(Ordering::Relaxed) + total;
    let mut ticker = tokio::time::interval(Duration::from_secs_f64(1.0 / args.rate as f64));
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Burst);
    let mut sends = tokio::task::JoinSet::new();
    for i in 0..total {
        ticker.tick().await;
        let body = serde_json::json!({"user_id": format!("c-{}", i as usize % fast),
            "title": "paced", "data": {"sent_us": fleet.now_us()}});
        let request = http
            .post(format!("{api}/v1/notify"))
            .bearer_auth(key)
            .json(&body);
        sends.spawn(async move { request.send().await.is_ok() });
        while sends.try_join_next().is_some() {}
    }
    while sends.join_next().await.is_some() {}
    let _ = wait_for(
        || fleet.timed.load(Ordering::Relaxed) >= want,
        30,
        "paced delivered",
    )
    .await;
    Fleet::snapshot(&fleet.delivery)
}

/// 10,000 notifications of ~2 KiB to `user`.
pub(super) async fn flood(
    http: reqwest::Client,
    api: String,
    key: String,
    user: &'static str,
) -> Result<(), BenchError> {
    let body_text = "x".repeat(2000);
    for _ in 0..20 {
        let items: Vec<serde_json::Value> = (0..500)
            .map(|_| serde_json::json!({"user_id": user, "title": "flood", "body": body_text}))
            .collect();
        http.post(format!("{api}/v1/notify/batch"))
            .bearer_auth(&key)
            .json(&serde_json::json!({ "notifications": items }))
            .send()
            .await?;
    }
    Ok(())
}
