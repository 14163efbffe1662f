//! A templated topic publish reaches each subscriber in their own locale (the
//! `locale` preference, with fallback), on both topic paths: fan-out on write (each
//! copy stored localized) and the big-topic path (stored once with every locale's texts;
//! the view, the live frame and the push are each the subscriber's). Pushes go through
//! the real APNs provider to the APNs fake.

use anyhow::{Context as _, ensure};
use herald::channels::ChannelSettings;
use herald_channels::apns::{ApnsConfig, ApnsProvider};
use herald_channels::{HttpOptions, Provider};
use herald_fakes::apns::ApnsFake;
use herald_tests::herald::{Resume, rand_key};
use herald_tests::{Herald, Nats, eventually};
use reqwest::{Method, StatusCode};
use serde_json::{Value, json};
use std::sync::Arc;
use std::time::Duration;

const TOPIC: &str = "com.example.herald";
const WAIT: Duration = Duration::from_secs(30);

const SALE: &str = r#"
[default]
title = "Sale: {{ off }}% off"
body = "Until {{ until }}."
push.title = "{{ off }}% off today"

[de]
title = "Rabatt: {{ off }} % auf alles"
push.title = "Heute {{ off }} % Rabatt"
"#;

/// Ana has no locale (default texts), Dirk `de-AT` (falls back to `de`), Fay `fr`
/// (no French: default texts).
const USERS: [(&str, Option<&str>, &str); 3] = [
    (
        "ana",
        None,
        "a1a1a1a1a1a1a1a1a1a1a1a1a1a1a1a1a1a1a1a1a1a1a1a1a1a1a1a1a1a1a1a1",
    ),
    (
        "dirk",
        Some("de-AT"),
        "d2d2d2d2d2d2d2d2d2d2d2d2d2d2d2d2d2d2d2d2d2d2d2d2d2d2d2d2d2d2d2d2",
    ),
    (
        "fay",
        Some("fr"),
        "f3f3f3f3f3f3f3f3f3f3f3f3f3f3f3f3f3f3f3f3f3f3f3f3f3f3f3f3f3f3f3f3",
    ),
];

/// What each user should read: (inbox title, push title).
fn expected(user: &str) -> (&'static str, &'static str) {
    match user {
        "dirk" => ("Rabatt: 30 % auf alles", "Heute 30 % Rabatt"),
        _ => ("Sale: 30% off", "30% off today"),
    }
}

fn channels(apns: &ApnsFake) -> anyhow::Result<ChannelSettings> {
    let mut s = ChannelSettings::new(rand_key());
    s.escalation_delay = Duration::ZERO;
    s.concurrency = 4;
    let provider = ApnsProvider::new(&ApnsConfig {
        base_url: apns.url(),
        key_pem: apns.p8_pem().as_bytes().to_vec(),
        key_id: apns.key_id().into(),
        team_id: apns.team_id().into(),
        topic: TOPIC.into(),
        http: HttpOptions {
            timeout: Duration::from_secs(5),
            extra_root_pem: Some(apns.ca_pem().as_bytes().to_vec()),
        },
    })?;
    let provider: Arc<dyn Provider> = Arc::new(provider);
    s.configured = vec![provider];
    Ok(s)
}

async fn ok(response: reqwest::Response) -> anyhow::Result<Value> {
    let status = response.status();
    let body: Value = response.json().await?;
    ensure!(status.is_success(), "{status}: {body}");
    Ok(body)
}

/// A mesh with the template, the APNs fake, and the three users subscribed to `sale`
/// with their locales and devices.
async fn start(
    nats: &Nats,
    apns: &ApnsFake,
    big_threshold: u64,
) -> anyhow::Result<(Herald, tempfile::TempDir)> {
    let dir = tempfile::tempdir()?;
    std::fs::write(dir.path().join("sale.toml"), SALE)?;
    let herald = Herald::builder(nats)
        .templates(herald_templates::Templates::load(dir.path())?)
        .channels(channels(apns)?)
        .topics(herald_api::TopicSettings {
            big_threshold,
            ..Default::default()
        })
        .start()
        .await?;
    for (user, locale, token) in USERS {
        if let Some(locale) = locale {
            ok(herald
                .user(Method::PUT, "/v1/me/preferences", user)
                .json(&json!({ "locale": locale }))
                .send()
                .await?)
            .await?;
        }
        ok(herald
            .user(Method::POST, "/v1/me/devices", user)
            .json(&json!({"platform": "ios", "token": token}))
            .send()
            .await?)
        .await?;
    }
    let users: Vec<&str> = USERS.iter().map(|(u, _, _)| *u).collect();
    ok(herald
        .producer(Method::POST, "/v1/topics/sale/subscribers")
        .json(&json!({ "user_ids": users }))
        .send()
        .await?)
    .await?;
    Ok((herald, dir))
}

async fn publish(herald: &Herald, path: &str) -> anyhow::Result<Value> {
    let response = herald
        .producer(Method::POST, "/v1/topics/sale/publish")
        .json(
            &json!({"template": "sale", "vars": {"off": 30, "until": "Sunday"},
            "channels": ["inbox", "push"]}),
        )
        .send()
        .await?;
    let status = response.status();
    let answer: Value = response.json().await?;
    ensure!(status == StatusCode::ACCEPTED, "publish: {status} {answer}");
    ensure!(answer["path"] == path, "{path} path: {answer}");
    Ok(answer)
}

/// Every user's push, by device token, reached the fake in their language, once.
async fn pushes_are_localized(apns: &ApnsFake) -> anyhow::Result<()> {
    let sent = eventually(WAIT, "a push to each subscriber", || async {
        let sent: Vec<(String, Value)> = apns
            .received()
            .into_iter()
            .filter(|r| r.answer.starts_with("200"))
            .map(|r| (r.device_token, r.payload["aps"]["alert"]["title"].clone()))
            .collect();
        ensure!(sent.len() >= USERS.len(), "so far {sent:?}");
        Ok(sent)
    })
    .await?;
    ensure!(sent.len() == USERS.len(), "one push each: {sent:?}");
    for (user, _, token) in USERS {
        let title = sent
            .iter()
            .find(|(t, _)| t == token)
            .map(|(_, title)| title.clone())
            .with_context(|| format!("no push for {user}: {sent:?}"))?;
        ensure!(title == expected(user).1, "{user}'s push: {title}");
    }
    Ok(())
}

async fn inboxes_are_localized(herald: &Herald) -> anyhow::Result<()> {
    for (user, _, _) in USERS {
        let inbox = herald.inbox(user).await?;
        ensure!(inbox.len() == 1, "{user}: {inbox:?}");
        ensure!(
            inbox[0]["title"] == expected(user).0,
            "{user}'s inbox: {inbox:?}"
        );
        ensure!(
            inbox[0]["body"] == "Until Sunday.",
            "the body falls back per field: {inbox:?}"
        );
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_small_topic_publish_reaches_each_subscriber_in_their_locale() -> anyhow::Result<()> {
    let nats = Nats::single().await?;
    let apns = ApnsFake::start(TOPIC).await?;
    let (herald, _dir) = start(&nats, &apns, 10_000).await?;
    let mut dirk = herald.ws("dirk", Resume::After(0)).await?;
    dirk.hello().await?;
    publish(&herald, "write").await?;
    let live = dirk.take(1).await?;
    ensure!(
        live[0]["title"] == expected("dirk").0,
        "Dirk's live frame: {live:?}"
    );
    pushes_are_localized(&apns).await?;
    inboxes_are_localized(&herald).await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_big_topic_publish_reaches_each_subscriber_in_their_locale() -> anyhow::Result<()> {
    let nats = Nats::single().await?;
    let apns = ApnsFake::start(TOPIC).await?;
    let (herald, _dir) = start(&nats, &apns, 0).await?;
    // Dirk online: his live frame of the stored-once publish is German.
    let mut dirk = herald.ws("dirk", Resume::After(0)).await?;
    dirk.hello().await?;
    let mut ana = herald.ws("ana", Resume::After(0)).await?;
    ana.hello().await?;
    publish(&herald, "topic").await?;
    let live = dirk.take(1).await?;
    ensure!(
        live[0]["title"] == expected("dirk").0,
        "Dirk's live frame: {live:?}"
    );
    let live = ana.take(1).await?;
    ensure!(
        live[0]["title"] == expected("ana").0,
        "Ana's live frame: {live:?}"
    );
    pushes_are_localized(&apns).await?;
    inboxes_are_localized(&herald).await?;
    // A replay on a new connection is localized by the view.
    let mut again = herald.ws("dirk", Resume::After(0)).await?;
    again.hello().await?;
    let replayed = again.take(1).await?;
    ensure!(
        replayed[0]["title"] == expected("dirk").0,
        "Dirk's replay: {replayed:?}"
    );
    Ok(())
}
