//! Scheduled sends (`send_at`): held by JetStream's scheduler, delivered at their time
//! (not before), cancellable until then by the producer that scheduled them, and kept
//! across a restart of nats-server.

use anyhow::{Context as _, ensure};
use herald_auth::Scope;
use herald_tests::herald::Resume;
use herald_tests::{Herald, Nats, WsClient, send_at_in, within};
use reqwest::{Method, StatusCode};
use serde_json::{Value, json};
use std::time::Duration;
use time::OffsetDateTime;
use time::format_description::well_known::Rfc3339;

async fn schedule(
    herald: &Herald,
    user: &str,
    title: &str,
    send_at: &str,
) -> anyhow::Result<String> {
    let response = herald
        .notify(&json!({"user_id": user, "title": title, "send_at": send_at}))
        .await?;
    let status = response.status();
    let body: Value = response.json().await?;
    ensure!(
        status == StatusCode::ACCEPTED,
        "expected 202, got {status}: {body}"
    );
    ensure!(body["status"] == "scheduled", "status scheduled: {body}");
    ensure!(
        body.get("seq").is_none(),
        "no inbox position before it fires: {body}"
    );
    ensure!(body["send_at"].is_string(), "send_at echoed: {body}");
    Ok(body["id"].as_str().context("id")?.to_owned())
}

async fn next_title(ws: &mut WsClient) -> anyhow::Result<(String, OffsetDateTime)> {
    let items = within(
        Duration::from_secs(20),
        "a scheduled notification",
        ws.take(1),
    )
    .await??;
    let arrived = OffsetDateTime::now_utc();
    let title = items[0]["title"].as_str().context("title")?.to_owned();
    Ok((title, arrived))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn scheduled_notification_arrives_at_its_time_not_before() -> anyhow::Result<()> {
    let nats = Nats::single().await?;
    let herald = Herald::builder(&nats).start().await?;
    let mut ws = herald.ws("sam", Resume::After(0)).await?;
    ws.hello().await?;
    let (at, send_at) = send_at_in(1500);
    let id = schedule(&herald, "sam", "later", &send_at).await?;
    ensure!(
        herald.inbox("sam").await?.is_empty(),
        "nothing in the inbox before send_at"
    );
    let (title, arrived) = next_title(&mut ws).await?;
    ensure!(title == "later", "got {title}");
    // The scheduler fires within milliseconds of send_at (same clock): never early, and
    // well inside the ±1 s the contract promises, even on a loaded machine.
    ensure!(
        arrived >= at - time::Duration::milliseconds(5),
        "arrived {arrived}, before {at}"
    );
    ensure!(
        arrived <= at + time::Duration::seconds(1),
        "arrived {arrived}, over 1 s after {at}"
    );
    let inbox = herald.inbox("sam").await?;
    ensure!(
        inbox.len() == 1 && inbox[0]["id"] == json!(id),
        "in the inbox once fired: {inbox:?}"
    );
    // A send_at in the past means now; too far ahead is refused.
    let (_, past) = send_at_in(-60_000);
    herald
        .accept(&json!({"user_id": "sam", "title": "now", "send_at": past}))
        .await?;
    let (far, _) = send_at_in(31 * 24 * 3600 * 1000);
    let refused = herald
        .notify(&json!({"user_id": "sam", "title": "x", "send_at": far.format(&Rfc3339)?}))
        .await?;
    ensure!(
        refused.status() == StatusCode::BAD_REQUEST,
        "31 days ahead: {}",
        refused.status()
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cancelled_schedule_never_fires_and_only_its_producer_may_cancel() -> anyhow::Result<()> {
    let nats = Nats::single().await?;
    let other_key = herald_auth::api_keys::generate();
    let herald = Herald::builder(&nats)
        .key(&other_key, &[Scope::Notify])
        .start()
        .await?;
    let mut ws = herald.ws("tess", Resume::After(0)).await?;
    ws.hello().await?;
    let (_, first_at) = send_at_in(1500);
    let (_, second_at) = send_at_in(2500);
    let cancelled = schedule(&herald, "tess", "cancelled", &first_at).await?;
    schedule(&herald, "tess", "kept", &second_at).await?;

    let path = format!("/v1/notifications/{cancelled}");
    let foreign = herald
        .request(Method::DELETE, &path)
        .bearer_auth(&other_key)
        .send()
        .await?;
    ensure!(
        foreign.status() == StatusCode::NOT_FOUND,
        "another producer: {}",
        foreign.status()
    );
    let first = herald.producer(Method::DELETE, &path).send().await?;
    let body: Value = first.json().await?;
    ensure!(body["status"] == "cancelled", "cancel: {body}");
    let again = herald.producer(Method::DELETE, &path).send().await?;
    ensure!(
        again.status() == StatusCode::NOT_FOUND,
        "second cancel: {}",
        again.status()
    );
    let garbage = herald
        .producer(Method::DELETE, "/v1/notifications/not-a-uuid")
        .send()
        .await?;
    ensure!(
        garbage.status() == StatusCode::BAD_REQUEST,
        "bad id: {}",
        garbage.status()
    );

    // The kept one fires after the cancelled one's time; only it arrives.
    let (title, _) = next_title(&mut ws).await?;
    ensure!(
        title == "kept",
        "the cancelled notification arrived: {title}"
    );
    let inbox = herald.inbox("tess").await?;
    ensure!(inbox.len() == 1, "only the kept one is stored: {inbox:?}");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn schedule_survives_a_nats_restart() -> anyhow::Result<()> {
    let mut nats = Nats::single().await?;
    let herald = Herald::builder(&nats).start().await?;
    let (_, send_at) = send_at_in(4000);
    let id = schedule(&herald, "uma", "after restart", &send_at).await?;
    nats.kill();
    nats.restart().await?;
    let inbox = herald_tests::eventually(
        Duration::from_secs(30),
        "the schedule fired after the restart",
        || async {
            let inbox = herald.inbox("uma").await?;
            ensure!(!inbox.is_empty(), "not yet");
            Ok(inbox)
        },
    )
    .await?;
    ensure!(
        inbox.len() == 1 && inbox[0]["id"] == json!(id),
        "fired once: {inbox:?}"
    );
    Ok(())
}

/// A schedule waits in the inbox stream, so it must fire before the inbox's `max_age`
/// removes it: a `send_at` past the configured retention (less an hour) is refused with a
/// 400 naming `send_at`, never accepted and silently dropped.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_send_at_beyond_the_inbox_retention_is_refused() -> anyhow::Result<()> {
    let nats = Nats::single().await?;
    let herald = Herald::builder(&nats)
        .inbox_max_age(Duration::from_secs(2 * 24 * 3600))
        .start()
        .await?;
    let (beyond, _) = send_at_in(3 * 24 * 3600 * 1000);
    let refused = herald
        .notify(&json!({"user_id": "sam", "title": "x", "send_at": beyond.format(&Rfc3339)?}))
        .await?;
    ensure!(
        refused.status() == StatusCode::BAD_REQUEST,
        "3 days ahead with a 2-day inbox: {}",
        refused.status()
    );
    let body: serde_json::Value = refused.json().await?;
    ensure!(
        body.to_string().contains("send_at"),
        "the error names send_at: {body}"
    );
    // Right at the retention's end: it would race its own expiry.
    let (edge, _) = send_at_in(2 * 24 * 3600 * 1000 - 60_000);
    let refused = herald
        .notify(&json!({"user_id": "sam", "title": "x", "send_at": edge.format(&Rfc3339)?}))
        .await?;
    ensure!(
        refused.status() == StatusCode::BAD_REQUEST,
        "a minute before the inbox drops it: {}",
        refused.status()
    );
    let (inside, _) = send_at_in(24 * 3600 * 1000);
    let accepted = herald
        .notify(&json!({"user_id": "sam", "title": "x", "send_at": inside.format(&Rfc3339)?}))
        .await?;
    ensure!(
        accepted.status() == StatusCode::ACCEPTED,
        "a day ahead: {}",
        accepted.status()
    );
    Ok(())
}
