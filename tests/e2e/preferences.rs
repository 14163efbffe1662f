//! Preferences (SPEC §3): the document round-trips and merges, bad fields are named, and
//! the router applies them — with critical categories ignoring opt-outs — to the very
//! next notification.

use anyhow::{Context as _, ensure};
use herald_protocol::preferences::CategoryRule;
use herald_protocol::{Channel, Policy};
use herald_tests::{Herald, JobFeed, Nats};
use reqwest::{Method, StatusCode};
use serde_json::{Value, json};
use std::collections::BTreeMap;
use std::time::Duration;

async fn put(herald: &Herald, user: &str, body: Value) -> anyhow::Result<reqwest::Response> {
    Ok(herald
        .user(Method::PUT, "/v1/me/preferences", user)
        .json(&body)
        .send()
        .await?)
}

async fn field_of_400(response: reqwest::Response) -> anyhow::Result<String> {
    let status = response.status();
    let body: Value = response.json().await.context("error body is JSON")?;
    ensure!(
        status == StatusCode::BAD_REQUEST,
        "expected 400, got {status}: {body}"
    );
    body["error"]["field"]
        .as_str()
        .map(str::to_owned)
        .with_context(|| format!("no error.field: {body}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn preferences_merge_and_bad_fields_are_named() -> anyhow::Result<()> {
    let nats = Nats::single().await?;
    let herald = Herald::builder(&nats).start().await?;

    let fresh: Value = herald
        .user(Method::GET, "/v1/me/preferences", "pia")
        .send()
        .await?
        .json()
        .await?;
    ensure!(
        fresh["channels"]
            == json!({"inbox":true,"push":true,"email":true,"sms":true,"webhook":true}),
        "defaults: {fresh}"
    );
    ensure!(
        fresh["opt_out"] == json!(false) && fresh["digest"] == json!("off"),
        "defaults: {fresh}"
    );

    let first = put(
        &herald,
        "pia",
        json!({
            "channels": {"sms": false},
            "categories": {"like": {"email": false}},
            "quiet_hours": {"start": "22:00", "end": "07:00"},
            "timezone": "Europe/Berlin", "locale": "de-DE", "digest": "daily"
        }),
    )
    .await?;
    ensure!(first.status() == StatusCode::OK, "PUT: {}", first.status());
    // A second PUT merges; the producer view shows the same document.
    let second = put(
        &herald,
        "pia",
        json!({"categories": {"like": {"push": false}}}),
    )
    .await?;
    ensure!(
        second.status() == StatusCode::OK,
        "PUT: {}",
        second.status()
    );
    let seen: Value = herald
        .producer(Method::GET, "/v1/users/pia/preferences")
        .send()
        .await?
        .json()
        .await?;
    ensure!(
        seen["categories"]["like"] == json!({"push": false, "email": false}),
        "merged: {seen}"
    );
    ensure!(
        seen["channels"]["sms"] == json!(false) && seen["channels"]["push"] == json!(true),
        "{seen}"
    );
    ensure!(
        seen["quiet_hours"] == json!({"start":"22:00","end":"07:00"}),
        "{seen}"
    );
    ensure!(
        seen["timezone"] == json!("Europe/Berlin") && seen["digest"] == json!("daily"),
        "{seen}"
    );
    // Another user's document is untouched.
    let other: Value = herald
        .user(Method::GET, "/v1/me/preferences", "pia2")
        .send()
        .await?
        .json()
        .await?;
    ensure!(other == fresh, "isolation: {other}");

    for (body, field) in [
        (json!({"channels": {"pigeon": true}}), "channels.pigeon"),
        (json!({"timezone": "Mars/Olympus_Mons"}), "timezone"),
        (
            json!({"quiet_hours": {"start": "24:30", "end": "07:00"}}),
            "quiet_hours.start",
        ),
        (json!({"digest": "weekly"}), "digest"),
        (json!({"channels": {"inbox": false}}), "channels.inbox"),
        (
            json!({"categories": {"like": {"email": "no"}}}),
            "categories.like.email",
        ),
    ] {
        let got = field_of_400(put(&herald, "pia", body.clone()).await?).await?;
        ensure!(got == field, "{body} named {got:?}, not {field:?}");
    }
    let garbage = herald
        .user(Method::PUT, "/v1/me/preferences", "pia")
        .body("{not json")
        .send()
        .await?;
    ensure!(
        garbage.status() == StatusCode::BAD_REQUEST,
        "garbage: {}",
        garbage.status()
    );
    // A failed PUT changed nothing.
    let after: Value = herald
        .producer(Method::GET, "/v1/users/pia/preferences")
        .send()
        .await?
        .json()
        .await?;
    ensure!(after == seen, "unchanged after bad PUTs: {after}");
    let anonymous = herald
        .request(Method::GET, "/v1/me/preferences")
        .send()
        .await?;
    ensure!(
        anonymous.status() == StatusCode::UNAUTHORIZED,
        "anonymous: {}",
        anonymous.status()
    );
    Ok(())
}

fn policy() -> Policy {
    let mut categories = BTreeMap::new();
    categories.insert(
        "security".to_owned(),
        CategoryRule {
            critical: true,
            ..Default::default()
        },
    );
    categories.insert(
        "marketing".to_owned(),
        CategoryRule {
            critical: false,
            defaults: [(Channel::Sms, false)].into_iter().collect(),
            ..Default::default()
        },
    );
    categories.insert("social".to_owned(), CategoryRule::default());
    Policy::new(categories)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn configured_categories_are_enforced() -> anyhow::Result<()> {
    let nats = Nats::single().await?;
    let herald = Herald::builder(&nats).policy(policy()).start().await?;
    let unknown = herald
        .notify(&json!({"user_id": "quinn", "title": "hi", "category": "spam"}))
        .await?;
    ensure!(
        field_of_400(unknown).await? == "category",
        "unknown category on notify"
    );
    let prefs = put(
        &herald,
        "quinn",
        json!({"categories": {"spam": {"email": false}}}),
    )
    .await?;
    ensure!(
        field_of_400(prefs).await? == "categories.spam",
        "unknown category on PUT"
    );
    herald
        .accept(&json!({"user_id": "quinn", "title": "hi", "category": "social"}))
        .await?;
    Ok(())
}

/// Jobs the router enqueues, as they pass through NATS (whatever the work streams).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn router_applies_preferences_to_the_next_notification() -> anyhow::Result<()> {
    let nats = Nats::single().await?;
    let herald = Herald::builder(&nats).policy(policy()).start().await?;
    // Jobs are per target: give rae an address, a number and a device.
    let r = herald
        .producer(reqwest::Method::PUT, "/v1/users/rae/contact")
        .json(&json!({"email": "rae@example.com", "phone": "+4915112345678"}))
        .send()
        .await?;
    ensure!(r.status() == StatusCode::OK, "PUT contact {}", r.status());
    let r = herald
        .user(reqwest::Method::POST, "/v1/me/devices", "rae")
        .json(&json!({"platform": "android", "token": "tok-rae"}))
        .send()
        .await?;
    ensure!(r.status().is_success(), "POST device {}", r.status());
    let mut jobs = JobFeed::open(&herald).await?;
    let send = |category: &'static str, channels: Value| {
        let herald = &herald;
        async move {
            herald
                .accept(&json!({"user_id": "rae", "title": category, "category": category, "channels": channels}))
                .await
        }
    };

    // Opted out of marketing email: the marketing job is dropped, the social one goes.
    let r = put(
        &herald,
        "rae",
        json!({"categories": {"marketing": {"email": false}}}),
    )
    .await?;
    ensure!(r.status() == StatusCode::OK, "PUT {}", r.status());
    send("marketing", json!(["inbox", "email"])).await?;
    let social = send("social", json!(["inbox", "email"])).await?;
    let job = jobs.next(Duration::from_secs(20)).await?;
    ensure!(
        job.id == social.id && job.channel == Channel::Email,
        "first job is social's: {job:?}"
    );

    // The configured default keeps marketing SMS off; push is on.
    send("marketing", json!(["sms", "push"])).await?;
    let job = jobs.next(Duration::from_secs(20)).await?;
    ensure!(
        job.channel == Channel::Push,
        "marketing sms suppressed by default: {job:?}"
    );

    // Global opt-out: nothing interrupting, except critical categories.
    let r = put(&herald, "rae", json!({"opt_out": true})).await?;
    ensure!(r.status() == StatusCode::OK, "PUT {}", r.status());
    let quiet = send("social", json!(["inbox", "push", "email"])).await?;
    let alert = send("security", json!(["inbox", "sms"])).await?;
    let job = jobs.next(Duration::from_secs(20)).await?;
    ensure!(
        job.id == alert.id && job.channel == Channel::Sms,
        "only the critical job: {job:?}"
    );
    // The suppressed notification is still in the inbox.
    let inbox = herald.inbox("rae").await?;
    ensure!(
        inbox.iter().any(|n| n["id"] == json!(quiet.id)),
        "opted-out notification kept in the inbox"
    );
    Ok(())
}

/// Preferences that would outgrow what the store keeps are the request's fault: a 400
/// naming `categories`, not a 503 that a client retries forever.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn preferences_too_large_to_store_are_a_400() -> anyhow::Result<()> {
    let nats = Nats::single().await?;
    let herald = Herald::builder(&nats).start().await?;
    let long = "c".repeat(300);
    let r = put(
        &herald,
        "big",
        json!({"categories": {long: {"push": false}}}),
    )
    .await?;
    ensure!(
        field_of_400(r).await? == "categories",
        "a 300-byte category name"
    );
    let overrides = |from: usize, n: usize| {
        let map: serde_json::Map<String, Value> = (from..from + n)
            .map(|i| (format!("{i:04}{}", "x".repeat(246)), json!({"push": false})))
            .collect();
        json!({ "categories": map })
    };
    let r = put(&herald, "big", overrides(0, 150)).await?;
    ensure!(
        r.status() == StatusCode::OK,
        "150 overrides: {}",
        r.status()
    );
    let r = put(&herald, "big", overrides(150, 100)).await?;
    ensure!(
        field_of_400(r).await? == "categories",
        "250 long overrides, over 64 KiB once merged"
    );
    Ok(())
}
