//! `POST /v1/notify/batch` answers for each item what `POST /v1/notify` would have: an
//! item over the notification size limit is a 413 of its own, and an item that failed for
//! Herald's trouble (a 503 alone) says it may be sent again.

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
    ensure!(refused["retryable"] == false, "{refused}");
    let inbox = herald.inbox("rea").await?;
    ensure!(
        inbox.len() == 1 && inbox[0]["title"] == "small",
        "only the small one is stored: {inbox:?}"
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn items_that_failed_for_the_store_are_marked_retryable() -> anyhow::Result<()> {
    let nats = Nats::single().await?;
    let herald = Herald::builder(&nats).start().await?;
    // NATS is connected, but the inbox stream is gone: every append fails, as a single
    // notify shows with its 503.
    let js = async_nats::jetstream::new(herald.nats_client().await?);
    js.delete_stream(herald_protocol::streams::INBOX).await?;
    let alone = herald
        .notify(&json!({"user_id": "sam", "title": "one"}))
        .await?;
    ensure!(
        alone.status() == StatusCode::SERVICE_UNAVAILABLE,
        "alone: {}",
        alone.status()
    );

    let answer = batch(
        &herald,
        json!([{"user_id": "sam", "title": "two"}, {"user_id": "sam"}]),
    )
    .await?;
    ensure!(answer["accepted"] == 0, "{answer}");
    let results = answer["results"].as_array().context("results")?;
    let failed = &results[0];
    ensure!(
        failed["status"] == "rejected" && failed["error"]["code"] == "unavailable",
        "{failed}"
    );
    ensure!(failed["retryable"] == true, "{failed}");
    ensure!(failed["retry_after_s"].as_u64().is_some(), "{failed}");
    let invalid = &results[1];
    ensure!(invalid["error"]["code"] == "invalid_field", "{invalid}");
    ensure!(invalid["retryable"] == false, "{invalid}");
    ensure!(invalid.get("retry_after_s").is_none(), "{invalid}");
    Ok(())
}
