//! A notification refused at notify is not a member of its aggregation group: the group's
//! count, actors and folded text are those of the notifications accepted.

use anyhow::{Context as _, ensure};
use herald_tests::{Herald, Nats};
use reqwest::StatusCode;
use serde_json::{Value, json};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_notification_too_large_to_store_does_not_join_its_group() -> anyhow::Result<()> {
    let nats = Nats::single().await?;
    let herald = Herald::builder(&nats).start().await?;
    // Within the 64 KiB notify limit as sent, over the 127 KiB the inbox stores as
    // encoded: `1E15` is written back as `1000000000000000.0`.
    let numbers: Vec<Value> = (0..12_000).map(|_| json!(1e15)).collect();
    let raw = json!({
        "user_id": "wes", "title": "liked your photo", "group_key": "like:photo-3",
        "group_actor": "Mallory", "data": {"n": numbers},
    })
    .to_string()
    .replace("1000000000000000.0", "1E15");
    ensure!(raw.len() < 64 * 1024, "{} bytes sent", raw.len());
    let refused = herald
        .producer(reqwest::Method::POST, "/v1/notify")
        .header("content-type", "application/json")
        .body(raw)
        .send()
        .await?;
    let status = refused.status();
    let body: Value = refused.json().await?;
    ensure!(status == StatusCode::BAD_REQUEST, "{status}: {body}");
    ensure!(body["error"]["field"] == "body", "{body}");

    let accepted = herald
        .accept(&json!({
            "user_id": "wes", "title": "liked your photo", "group_key": "like:photo-3",
            "group_actor": "Ann",
        }))
        .await?;
    let inbox = herald.inbox("wes").await?;
    let stored = inbox.first().context("the accepted one")?;
    ensure!(inbox.len() == 1 && stored["id"] == accepted.id.as_str());
    let group = &stored["group"];
    ensure!(
        group["count"] == 1 && group["first_id"] == accepted.id.as_str(),
        "the refused one counted: {group}"
    );
    ensure!(group["actors"] == json!(["Ann"]), "{group}");
    Ok(())
}
