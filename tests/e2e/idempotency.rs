//! Idempotency keys of `POST /v1/notify` and `/v1/notify/batch`, as a producer retries:
//! a key names one notification for the dedup window and a new one (with a new id) after
//! it; the same key with another body is a 409; a retried schedule keeps its first
//! answer; a batch's key is checked once and gives its items keys of their own.

use anyhow::{Context as _, ensure};
use herald_protocol::streams::INBOX;
use herald_store::keys::KEYS_BUCKET;
use herald_tests::{Herald, Nats, eventually, send_at_in};
use reqwest::{Method, StatusCode};
use serde_json::{Value, json};
use std::time::Duration;

/// `POST /v1/notify` of `body` with `Idempotency-Key: key`: its status and answer.
async fn notify(herald: &Herald, key: &str, body: &Value) -> anyhow::Result<(StatusCode, Value)> {
    let response = herald
        .producer(Method::POST, "/v1/notify")
        .header("Idempotency-Key", key)
        .header("content-type", "application/json")
        .body(serde_json::to_vec(body)?)
        .send()
        .await
        .context("POST /v1/notify")?;
    Ok((response.status(), response.json().await?))
}

/// [`notify`], which must be a 202.
async fn accepted(herald: &Herald, key: &str, body: &Value) -> anyhow::Result<Value> {
    let (status, answer) = notify(herald, key, body).await?;
    ensure!(status == StatusCode::ACCEPTED, "{status}: {answer}");
    Ok(answer)
}

/// `POST /v1/notify/batch` of `items`, with `Idempotency-Key: key` when given.
async fn batch(
    herald: &Herald,
    key: Option<&str>,
    items: &[Value],
) -> anyhow::Result<(StatusCode, Value)> {
    let mut request = herald.producer(Method::POST, "/v1/notify/batch");
    if let Some(key) = key {
        request = request.header("Idempotency-Key", key);
    }
    let response = request
        .json(&json!({ "notifications": items }))
        .send()
        .await
        .context("POST /v1/notify/batch")?;
    Ok((response.status(), response.json().await?))
}

/// The ids in `user`'s inbox, oldest first.
async fn ids(herald: &Herald, user: &str) -> anyhow::Result<Vec<String>> {
    Ok(herald
        .inbox(user)
        .await?
        .iter()
        .filter_map(|n| n["id"].as_str().map(str::to_owned))
        .collect())
}

/// Changes `stream`'s configuration.
async fn reconfigure(
    nats: &Nats,
    stream: &str,
    change: impl FnOnce(&mut async_nats::jetstream::stream::Config),
) -> anyhow::Result<()> {
    let js = async_nats::jetstream::new(nats.client().await?);
    let mut config = js
        .get_stream(stream)
        .await
        .map_err(|e| anyhow::anyhow!("{e}"))?
        .info()
        .await
        .map_err(|e| anyhow::anyhow!("{e}"))?
        .config
        .clone();
    change(&mut config);
    js.update_stream(config)
        .await
        .map_err(|e| anyhow::anyhow!("{e}"))?;
    Ok(())
}

/// How many records the key bucket holds.
async fn key_records(nats: &Nats) -> anyhow::Result<u64> {
    let js = async_nats::jetstream::new(nats.client().await?);
    let mut stream = js
        .get_stream(format!("KV_{KEYS_BUCKET}"))
        .await
        .map_err(|e| anyhow::anyhow!("{e}"))?;
    Ok(stream
        .info()
        .await
        .map_err(|e| anyhow::anyhow!("{e}"))?
        .state
        .messages)
}

/// Sends `key` again until the answer's id is no longer `first_id` (the key forgotten),
/// checking that every answer before is the first answer.
async fn until_forgotten(
    herald: &Herald,
    key: &str,
    body: &Value,
    first: &Value,
) -> anyhow::Result<Value> {
    eventually(Duration::from_secs(60), "the key forgotten", || async {
        let answer = accepted(herald, key, body).await?;
        if answer["id"] == first["id"] {
            // Still within the window: the first answer, whole.
            ensure!(answer == *first, "{answer} differs from the first {first}");
            anyhow::bail!("still the first notification");
        }
        Ok(answer)
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_key_used_again_after_the_window_is_a_new_notification_with_its_own_id()
-> anyhow::Result<()> {
    let nats = Nats::single().await?;
    let herald = Herald::builder(&nats).start().await?;
    let first_body = json!({"user_id": "frank", "title": "first"});
    let first = accepted(&herald, "reuse-after-window", &first_body).await?;
    ensure!(
        accepted(&herald, "reuse-after-window", &first_body).await? == first,
        "a retry within the window is the first answer"
    );
    // INBOX remembers ids, and the key bucket its records, for a second only.
    reconfigure(&nats, INBOX, |c| {
        c.duplicate_window = Duration::from_secs(1)
    })
    .await?;
    reconfigure(&nats, &format!("KV_{KEYS_BUCKET}"), |c| {
        c.max_age = Duration::from_secs(1);
        c.duplicate_window = Duration::from_secs(1);
    })
    .await?;
    let second_body = json!({"user_id": "frank", "title": "second, a new event"});
    let second = until_forgotten(&herald, "reuse-after-window", &second_body, &first).await?;
    ensure!(second["status"] == "accepted", "{second}");
    ensure!(
        second["seq"].as_u64() > first["seq"].as_u64(),
        "{second} after {first}"
    );
    let ids = ids(&herald, "frank").await?;
    ensure!(
        ids == [first["id"].as_str(), second["id"].as_str()]
            .map(|id| id.unwrap_or_default().to_owned()),
        "two notifications, each with its own id: {ids:?}"
    );
    Ok(())
}

/// A record the bucket still holds, older than the window INBOX has now (the window was
/// shortened after the bucket was made), is taken as gone: INBOX no longer deduplicates
/// its id, so reusing it would store a second notification with the same id.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_record_older_than_the_inbox_window_is_not_reused() -> anyhow::Result<()> {
    let nats = Nats::single().await?;
    let herald = Herald::builder(&nats).start().await?;
    let body = json!({"user_id": "gail", "title": "weekly"});
    let first = accepted(&herald, "weekly-1", &body).await?;
    reconfigure(&nats, INBOX, |c| {
        c.duplicate_window = Duration::from_secs(1)
    })
    .await?;
    let second = until_forgotten(&herald, "weekly-1", &body, &first).await?;
    let ids = ids(&herald, "gail").await?;
    ensure!(
        ids.len() == 2 && ids[0] != ids[1],
        "two distinct ids: {ids:?}"
    );
    ensure!(
        ids[1] == second["id"].as_str().unwrap_or_default(),
        "{ids:?} {second}"
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_same_key_with_another_body_is_refused_and_unkeyed_requests_record_nothing()
-> anyhow::Result<()> {
    let nats = Nats::single().await?;
    let herald = Herald::builder(&nats).start().await?;
    for i in 0..3 {
        herald.send("alice", &format!("unkeyed {i}")).await?;
    }
    ensure!(
        key_records(&nats).await? == 0,
        "unkeyed notifies never touch the key records"
    );
    let for_alice = json!({"user_id": "alice", "title": "order 7 shipped"});
    let first = accepted(&herald, "order-7", &for_alice).await?;
    ensure!(key_records(&nats).await? == 1, "one record for the key");
    // Another recipient, or another text, with the key: refused, nothing stored.
    for other in [
        json!({"user_id": "bob", "title": "order 7 shipped"}),
        json!({"user_id": "alice", "title": "order 7 delivered"}),
    ] {
        let (status, answer) = notify(&herald, "order-7", &other).await?;
        ensure!(status == StatusCode::CONFLICT, "{status}: {answer}");
        ensure!(
            answer["error"]["code"] == "idempotency_key_reused",
            "{answer}"
        );
        let message = answer["error"]["message"].as_str().unwrap_or_default();
        ensure!(message.contains("new key"), "{message}");
    }
    ensure!(ids(&herald, "bob").await?.is_empty(), "bob got nothing");
    // The same body again is still the first answer.
    ensure!(accepted(&herald, "order-7", &for_alice).await? == first);
    ensure!(ids(&herald, "alice").await?.len() == 4);
    // A request refused as invalid does not take its key: the corrected one is new.
    let (status, answer) = notify(&herald, "order-8", &json!({"user_id": "alice"})).await?;
    ensure!(status == StatusCode::BAD_REQUEST, "{status}: {answer}");
    let fixed = accepted(
        &herald,
        "order-8",
        &json!({"user_id": "alice", "title": "order 8 shipped"}),
    )
    .await?;
    ensure!(fixed["id"] != first["id"], "{fixed}");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_requests_with_one_key_agree_on_one_notification() -> anyhow::Result<()> {
    let nats = Nats::single().await?;
    let herald = Herald::builder(&nats).start().await?;
    let body = json!({"user_id": "cora", "title": "once"});
    let answers =
        futures::future::try_join_all((0..8).map(|_| accepted(&herald, "race-1", &body))).await?;
    ensure!(
        answers.iter().all(|a| *a == answers[0]),
        "every request got the same answer: {answers:?}"
    );
    let ids = ids(&herald, "cora").await?;
    ensure!(
        ids == [answers[0]["id"].as_str().unwrap_or_default()],
        "{ids:?}"
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_schedule_retried_after_it_fired_keeps_its_first_answer() -> anyhow::Result<()> {
    let nats = Nats::single().await?;
    let herald = Herald::builder(&nats).start().await?;
    let (_, send_at) = send_at_in(1500);
    let body = json!({"user_id": "gina", "title": "sched retry", "send_at": send_at});
    let first = accepted(&herald, "sched-retry-1", &body).await?;
    ensure!(
        first["status"] == "scheduled" && first.get("seq").is_none(),
        "{first}"
    );
    let fired = eventually(Duration::from_secs(30), "the schedule fired", || async {
        let ids = ids(&herald, "gina").await?;
        ensure!(!ids.is_empty(), "not fired yet");
        Ok(ids)
    })
    .await?;
    ensure!(
        fired == [first["id"].as_str().unwrap_or_default()],
        "{fired:?}"
    );
    // Its send_at is past now: the retry is still the first answer, not an "accepted"
    // with the schedule's stream sequence for an inbox position.
    let retry = accepted(&herald, "sched-retry-1", &body).await?;
    ensure!(retry == first, "retry {retry} != first {first}");
    ensure!(ids(&herald, "gina").await? == fired, "sent once");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_batch_key_is_checked_once_and_its_items_keys_never_meet_a_notify_key()
-> anyhow::Result<()> {
    let nats = Nats::single().await?;
    let herald = Herald::builder(&nats).start().await?;
    let items: Vec<Value> = (0..11)
        .map(|i| json!({"user_id": "hana", "title": format!("item {i}")}))
        .collect();

    // A header key over 256 bytes refuses the whole batch up front.
    let (status, answer) = batch(&herald, Some(&"k".repeat(257)), &items).await?;
    ensure!(status == StatusCode::BAD_REQUEST, "{status}: {answer}");
    ensure!(answer["error"]["field"] == "Idempotency-Key", "{answer}");
    ensure!(ids(&herald, "hana").await?.is_empty());

    // The longest key allowed holds for every item, however many.
    let long = "k".repeat(256);
    let (status, first) = batch(&herald, Some(&long), &items).await?;
    ensure!(status == StatusCode::ACCEPTED, "{status}: {first}");
    ensure!(first["accepted"] == 11, "{first}");
    let (_, again) = batch(&herald, Some(&long), &items).await?;
    ensure!(
        again == first,
        "a retried batch is the first answer: {again}"
    );

    // `bk` makes no `bk:0` of its first item: a notify with that key is its own.
    let (_, bk) = batch(&herald, Some("bk"), &items[..1]).await?;
    let single = accepted(
        &herald,
        "bk:0",
        &json!({"user_id": "hana", "title": "collide"}),
    )
    .await?;
    ensure!(single["id"] != bk["results"][0]["id"], "{single} {bk}");
    ensure!(single["seq"].as_u64() > bk["results"][0]["seq"].as_u64());
    ensure!(ids(&herald, "hana").await?.len() == 13);
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_batch_item_own_key_wins_over_the_batch_key() -> anyhow::Result<()> {
    let nats = Nats::single().await?;
    let herald = Herald::builder(&nats).start().await?;
    let own = json!({"user_id": "ivan", "title": "own key", "idempotency_key": "own-1"});
    let plain = json!({"user_id": "ivan", "title": "batch key"});
    let (_, first) = batch(&herald, Some("batch-a"), &[own.clone(), plain.clone()]).await?;
    // Sent again under another batch key: the item with its own key is the same
    // notification; the other is new.
    let (_, second) = batch(&herald, Some("batch-b"), &[own.clone(), plain]).await?;
    ensure!(
        second["results"][0] == first["results"][0],
        "own key: {second}"
    );
    ensure!(
        second["results"][1]["id"] != first["results"][1]["id"],
        "batch key: {second}"
    );
    // The item's own key is a notify key: the same body on /v1/notify is the same one.
    ensure!(accepted(&herald, "own-1", &own).await? == first["results"][0]);
    ensure!(ids(&herald, "ivan").await?.len() == 3);
    Ok(())
}
