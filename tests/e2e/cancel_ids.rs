//! `DELETE /v1/notifications/{id}` takes any spelling of the id's UUID (upper case,
//! braces, no hyphens): each names the same scheduled notification, which is cancelled
//! and never fires — never a 404 for a schedule that then goes out anyway.

use anyhow::{Context as _, ensure};
use herald_tests::herald::Resume;
use herald_tests::{Herald, Nats, send_at_in, within};
use reqwest::{Method, StatusCode};
use serde_json::{Value, json};
use std::time::Duration;

async fn schedule(herald: &Herald, user: &str, title: &str, ms: i64) -> anyhow::Result<String> {
    let (_, send_at) = send_at_in(ms);
    let body: Value = herald
        .notify(&json!({"user_id": user, "title": title, "send_at": send_at}))
        .await?
        .json()
        .await?;
    ensure!(body["status"] == "scheduled", "{body}");
    Ok(body["id"].as_str().context("id")?.to_owned())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn any_spelling_of_a_scheduled_id_cancels_it() -> anyhow::Result<()> {
    let nats = Nats::single().await?;
    let herald = Herald::builder(&nats).start().await?;
    let mut ws = herald.ws("vic", Resume::After(0)).await?;
    ws.hello().await?;
    let upper = schedule(&herald, "vic", "upper", 1500).await?;
    let braced = schedule(&herald, "vic", "braced", 1500).await?;
    let simple = schedule(&herald, "vic", "simple", 1500).await?;
    schedule(&herald, "vic", "kept", 2500).await?;

    for (id, spelled) in [
        (&upper, upper.to_uppercase()),
        (&braced, format!("{{{braced}}}")),
        (&simple, simple.replace('-', "")),
    ] {
        let path = format!("/v1/notifications/{spelled}");
        let response = herald.producer(Method::DELETE, &path).send().await?;
        let status = response.status();
        let body: Value = response.json().await?;
        ensure!(status == StatusCode::OK, "{spelled}: {status} {body}");
        ensure!(
            body["status"] == "cancelled" && body["id"] == id.as_str(),
            "{spelled}: {body}"
        );
        // Cancelled: the id as issued finds nothing pending any more.
        let again = herald
            .producer(Method::DELETE, &format!("/v1/notifications/{id}"))
            .send()
            .await?;
        ensure!(again.status() == StatusCode::NOT_FOUND, "{id} again");
    }

    // The kept one fires after the others' time; only it arrives.
    let items = within(Duration::from_secs(20), "the kept one", ws.take(1)).await??;
    ensure!(items[0]["title"] == "kept", "{:?}", items[0]);
    let inbox = herald.inbox("vic").await?;
    ensure!(inbox.len() == 1, "only the kept one is stored: {inbox:?}");
    Ok(())
}
