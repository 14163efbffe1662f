//! `POST /v1/notify/batch` answers for each item what `POST /v1/notify` would have: an
//! item over the notification size limit is a 413 of its own.

use anyhow::{Context as _, ensure};
use herald_tests::{Herald, Nats};
use reqwest::{Method, StatusCode};
use serde_json::{Value, json};

async fn batch(herald: &Herald, items: Value) -> anyhow::Result<Value> {
    let response = herald
        .producer(Method::POST, "/v1/notify/batch")
        .json(&json!({ "notifications": items }))
        .send()
        .await?;
    ensure!(
        response.status() == StatusCode::ACCEPTED,
        "{}",
        response.status()
    );
    Ok(response.json().await?)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_item_over_the_notification_limit_is_refused_on_its_own() -> anyhow::Result<()> {
    let nats = Nats::single().await?;
    let herald = Herald::builder(&nats).start().await?;
    // Within what the inbox stores (127 KiB), over the 64 KiB of one notify.
    let big = json!({"user_id": "rea", "title": "big", "data": {"blob": "x".repeat(100 * 1024)}});
    let alone = herald.notify(&big).await?;
    ensure!(
        alone.status() == StatusCode::PAYLOAD_TOO_LARGE,
        "alone: {}",
        alone.status()
    );

    let answer = batch(&herald, json!([{"user_id": "rea", "title": "small"}, big])).await?;
    ensure!(answer["accepted"] == 1, "{answer}");
    let results = answer["results"].as_array().context("results")?;
    ensure!(results[0]["status"] == "accepted", "{}", results[0]);
    let refused = &results[1];
    ensure!(refused["status"] == "rejected", "{refused}");
    ensure!(refused["error"]["code"] == "payload_too_large", "{refused}");
    let inbox = herald.inbox("rea").await?;
    ensure!(
        inbox.len() == 1 && inbox[0]["title"] == "small",
        "only the small one is stored: {inbox:?}"
    );
    Ok(())
}
