//! Topic publishes as a producer retries them: idempotency keys of their own, the same
//! answer and the same path for every retry, no half-done publish, a key used again after
//! its dedup window, priority lanes for fan-outs, and progress that belongs to its topic.

use anyhow::{Context as _, ensure};
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
