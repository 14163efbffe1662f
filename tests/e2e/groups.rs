//! Aggregation: notifications with the same `group_key` for one user within the
//! category's window fold into one. Every one is stored and goes live carrying the group
//! (count, actors, folded text); push goes out once per window, at its end, with the
//! folded text and the group key as collapse id — over real HTTP/2 + TLS to the APNs fake
//! and to the FCM v1 fake. Followers show `folded` into the first in their status. The
//! window's end is a JetStream schedule and the group state a CAS'd KV document, so two
//! meshes share one group and a restart mid-window loses nothing.

use anyhow::{Context as _, ensure};
use herald::channels::ChannelSettings;
use herald_channels::apns::{ApnsConfig, ApnsProvider};
use herald_channels::fcm::oauth::ServiceAccount;
use herald_channels::fcm::{FcmConfig, FcmProvider};
use herald_channels::{HttpOptions, Provider};
use herald_fakes::apns::ApnsFake;
use herald_fakes::fcm::FcmFake;
use herald_protocol::Policy;
use herald_protocol::preferences::CategoryRule;
use herald_tests::herald::{Resume, rand_key};
use herald_tests::{Herald, Nats, eventually};
use reqwest::Method;
use serde_json::{Value, json};
use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

const TOPIC: &str = "com.example.herald";
const IOS_TOKEN: &str = "b3f1c2d4e5f60718293a4b5c6d7e8f90a1b2c3d4e5f60718293a4b5c6d7e8f90";
const ANDROID_TOKEN: &str = "android-token-group";
const WAIT: Duration = Duration::from_secs(30);

const LIKE: &str = r#"
[default]
title = "{{ actor }} liked your photo"
group.title = "{{ actor }} and {{ others }} others liked your photo"
"#;

/// An accepted APNs push: alert title, `apns-collapse-id`.
type ApnsSent = (Value, Option<String>);
/// An accepted FCM message: notification title, `android.collapse_key`.
type FcmSent = (Value, Value);

/// Real push providers against the fakes.
struct Push {
    apns: ApnsFake,
    fcm: FcmFake,
}

impl Push {
    async fn start() -> anyhow::Result<Self> {
        Ok(Self {
            apns: ApnsFake::start(TOPIC).await?,
            fcm: FcmFake::start().await?,
        })
    }

    fn settings(&self, key: [u8; 32]) -> anyhow::Result<ChannelSettings> {
        let mut s = ChannelSettings::new(key);
        s.escalation_delay = Duration::ZERO;
        s.concurrency = 4;
        let apns = ApnsProvider::new(&ApnsConfig {
            base_url: self.apns.url(),
            key_pem: self.apns.p8_pem().as_bytes().to_vec(),
            key_id: self.apns.key_id().into(),
            team_id: self.apns.team_id().into(),
            topic: TOPIC.into(),
            http: HttpOptions {
                timeout: Duration::from_secs(5),
                extra_root_pem: Some(self.apns.ca_pem().as_bytes().to_vec()),
            },
        })?;
        let account: ServiceAccount = serde_json::from_str(&self.fcm.service_account_json())?;
        let fcm = FcmProvider::new(&FcmConfig {
            base_url: self.fcm.url(),
            service_account: account,
            http: HttpOptions {
                timeout: Duration::from_secs(5),
                extra_root_pem: None,
            },
        })?;
        let providers: Vec<Arc<dyn Provider>> = vec![Arc::new(apns), Arc::new(fcm)];
        s.configured = providers;
        Ok(s)
    }

    /// Pushes the fakes accepted so far: (APNs title, collapse id), (FCM title, collapse key).
    fn sent(&self) -> (Vec<ApnsSent>, Vec<FcmSent>) {
        let apns = self
            .apns
            .received()
            .into_iter()
            .filter(|r| r.answer.starts_with("200"))
            .map(|r| {
                (
                    r.payload["aps"]["alert"]["title"].clone(),
                    r.headers.get("apns-collapse-id").cloned(),
                )
            })
            .collect();
        let fcm = self
            .fcm
            .received()
            .into_iter()
            .filter(|r| r.status == 200)
            .map(|r| {
                (
                    r.message["notification"]["title"].clone(),
                    r.message["android"]["collapse_key"].clone(),
                )
            })
            .collect();
        (apns, fcm)
    }
}

fn policy(window_s: u64) -> Policy {
    let mut categories = BTreeMap::new();
    categories.insert(
        "like".to_owned(),
        CategoryRule {
            group_window_s: Some(window_s),
            ..Default::default()
        },
    );
    categories.insert("security".to_owned(), CategoryRule::default());
    Policy::new(categories)
}

fn templates() -> anyhow::Result<(tempfile::TempDir, herald_templates::Templates)> {
    let dir = tempfile::tempdir()?;
    std::fs::write(dir.path().join("like.toml"), LIKE)?;
    let templates = herald_templates::Templates::load(dir.path())?;
    Ok((dir, templates))
}

async fn devices(herald: &Herald, user: &str) -> anyhow::Result<()> {
    for (platform, token) in [("ios", IOS_TOKEN), ("android", ANDROID_TOKEN)] {
        let r = herald
            .user(Method::POST, "/v1/me/devices", user)
            .json(&json!({"platform": platform, "token": token}))
            .send()
            .await?;
        ensure!(r.status().is_success(), "device {platform}: {}", r.status());
    }
    Ok(())
}

fn like(user: &str, actor: &str) -> Value {
    json!({"user_id": user, "category": "like", "template": "like", "vars": {"actor": actor},
           "group_key": "like:photo-9", "group_actor": actor, "channels": ["inbox", "push"]})
}

/// Waits until every push entry of `id` is in `state`; returns the first.
async fn push_state(herald: &Herald, id: &str, state: &str) -> anyhow::Result<Value> {
    eventually(WAIT, &format!("{id} push {state}"), || async {
        let s = herald.status(id).await?;
        let entries = s["channels"]["push"]
            .as_array()
            .cloned()
            .unwrap_or_default();
        ensure!(
            !entries.is_empty() && entries.iter().all(|e| e["state"] == state),
            "status now {s}"
        );
        Ok(entries[0].clone())
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn likes_within_a_window_fold_into_one_push_with_the_group_text() -> anyhow::Result<()> {
    let nats = Nats::single().await?;
    let push = Push::start().await?;
    let (_dir, templates) = templates()?;
    let herald = Herald::builder(&nats)
        .policy(policy(4))
        .templates(templates)
        .channels(push.settings(rand_key())?)
        .start()
        .await?;
    devices(&herald, "pat").await?;
    let mut ws = herald.ws("pat", Resume::Live).await?;
    ws.hello().await?;

    let actors = ["Ann", "Bob", "Cid", "Dee", "Eve"];
    let mut ids = Vec::new();
    for actor in actors {
        ids.push(herald.accept(&like("pat", actor)).await?.id);
    }
    // Live: every like arrives at once, each with the group as it stood.
    let live = ws.take(actors.len()).await?;
    for (i, n) in live.iter().enumerate() {
        ensure!(n["id"] == ids[i], "live order: {live:?}");
        ensure!(n["group"]["key"] == "like:photo-9", "{n}");
        ensure!(n["group"]["count"] == i as u64 + 1, "count: {n}");
        ensure!(n["group"]["first_id"] == ids[0], "first: {n}");
        ensure!(
            n["title"] == format!("{} liked your photo", actors[i]),
            "own text: {n}"
        );
    }
    let last = &live[actors.len() - 1];
    ensure!(
        last["group"]["title"] == "Eve and 4 others liked your photo",
        "folded text from the template: {last}"
    );
    ensure!(
        last["group"]["actors"] == json!(["Eve", "Dee", "Cid", "Bob", "Ann"]),
        "{last}"
    );
    // The inbox stores every one, with its group.
    let inbox = herald.inbox("pat").await?;
    ensure!(inbox.len() == actors.len(), "inbox: {inbox:?}");
    ensure!(inbox[2]["group"]["count"] == 3, "{}", inbox[2]);

    // Status: the first waits for the window, the others are folded into it.
    let held = herald.status(&ids[0]).await?;
    let first = &held["channels"]["push"][0];
    ensure!(
        first["state"] == "deferred" || first["state"] == "queued" || first["state"] == "sent",
        "{held}"
    );
    for id in &ids[1..] {
        let folded = push_state(&herald, id, "folded").await?;
        ensure!(
            folded["reason"]
                .as_str()
                .is_some_and(|r| r.starts_with(&format!("folded_into: {}", ids[0]))),
            "the rule names the notification it folded into: {folded}"
        );
    }
    // At the window's end: one push per device, with the folded text and collapse id.
    let sent = push_state(&herald, &ids[0], "sent").await?;
    let history = sent["history"].as_array().context("history")?;
    ensure!(
        history.iter().any(|h| h["state"] == "deferred"
            && h["reason"]
                .as_str()
                .is_some_and(|r| r.starts_with("group: like:photo-9"))),
        "the hold shows with its rule: {sent}"
    );
    let (apns, fcm) = push.sent();
    ensure!(
        apns.len() == 1 && fcm.len() == 1,
        "one push each: {apns:?} {fcm:?}"
    );
    ensure!(
        apns[0]
            == (
                json!("Eve and 4 others liked your photo"),
                Some("like:photo-9".into())
            ),
        "APNs: {apns:?}"
    );
    ensure!(
        fcm[0]
            == (
                json!("Eve and 4 others liked your photo"),
                json!("like:photo-9")
            ),
        "FCM: {fcm:?}"
    );

    // After the window a new group starts: count 1, its own text, its own push.
    let next = herald.accept(&like("pat", "Fay")).await?;
    let n = ws.take(1).await?;
    ensure!(
        n[0]["group"]["count"] == 1 && n[0]["group"]["first_id"] == next.id,
        "a new window: {}",
        n[0]
    );
    push_state(&herald, &next.id, "sent").await?;
    let (apns, fcm) = push.sent();
    ensure!(apns.len() == 2 && fcm.len() == 2, "{apns:?} {fcm:?}");
    ensure!(apns[1].0 == "Fay liked your photo", "{apns:?}");
    ensure!(
        push.sent().0.len() == 2,
        "the folded likes never pushed on their own"
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_group_spans_two_meshes_and_survives_a_restart_mid_window() -> anyhow::Result<()> {
    let nats = Nats::single().await?;
    let push = Push::start().await?;
    let key = rand_key();
    let (_dir, t1) = templates()?;
    let (_dir2, t2) = templates()?;
    let mut one = Herald::builder(&nats)
        .policy(policy(6))
        .templates(t1)
        .channels(push.settings(key)?)
        .start()
        .await?;
    let mut two = Herald::builder(&nats)
        .policy(policy(6))
        .templates(t2)
        .channels(push.settings(key)?)
        .start()
        .await?;
    devices(&one, "kim").await?;
    // Likes through both apis: one group, counted across instances.
    let mut ids = Vec::new();
    for (i, actor) in ["Ann", "Bob", "Cid", "Dee"].into_iter().enumerate() {
        let api = if i % 2 == 0 { &one } else { &two };
        ids.push(api.accept(&like("kim", actor)).await?.id);
    }
    let inbox = one.inbox("kim").await?;
    let counts: Vec<&Value> = inbox.iter().map(|n| &n["group"]["count"]).collect();
    ensure!(
        counts == [&json!(1), &json!(2), &json!(3), &json!(4)],
        "{counts:?}"
    );
    // Hold and folds recorded before anything stops.
    push_state(&one, &ids[0], "deferred").await?;
    push_state(&one, &ids[3], "folded").await?;

    // Everything stops mid-window; the window ends while no Herald runs.
    one.stop().await?;
    two.stop().await?;
    let js = async_nats::jetstream::new(nats.client().await?);
    let subjects = one.subjects().clone();
    let user = herald_protocol::UserId::new("kim")?;
    let deferred = subjects.deferred(&user);
    eventually(
        Duration::from_secs(30),
        "the window's end fired",
        || async {
            let stream = js.get_stream(herald_protocol::streams::INBOX).await?;
            stream
                .get_last_raw_message_by_subject(&deferred)
                .await
                .context("no window end yet")?;
            Ok(())
        },
    )
    .await?;
    ensure!(push.sent().0.is_empty(), "nothing sent while stopped");
    one.start_again().await?;
    push_state(&one, &ids[0], "sent").await?;
    let (apns, _) = push.sent();
    ensure!(
        apns == [(
            json!("Dee and 3 others liked your photo"),
            Some("like:photo-9".into())
        )],
        "one push with the whole group: {apns:?}"
    );
    two.start_again().await?;
    one.shutdown().await?;
    two.shutdown().await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_group_fields_are_a_400_naming_the_field() -> anyhow::Result<()> {
    let nats = Nats::single().await?;
    let herald = Herald::builder(&nats).policy(policy(60)).start().await?;
    let (_, send_at) = herald_tests::send_at_in(60_000);
    let cases = [
        (
            json!({"user_id": "u", "title": "x", "group_key": ""}),
            "group_key",
        ),
        (
            json!({"user_id": "u", "title": "x", "group_key": "k".repeat(257)}),
            "group_key",
        ),
        (
            json!({"user_id": "u", "title": "x", "group_key": "like:1", "send_at": send_at}),
            "group_key",
        ),
        (
            json!({"user_id": "u", "title": "x", "group_key": "like:1", "group_actor": "a\nb"}),
            "group_actor",
        ),
        (
            json!({"user_id": "u", "title": "x", "group_key": 5}),
            "group_key",
        ),
    ];
    for (body, field) in cases {
        let r = herald.notify(&body).await?;
        let status = r.status();
        let error: Value = r.json().await?;
        ensure!(
            status == 400 && error["error"]["field"] == field,
            "{body}: {status} {error}"
        );
    }
    let r = herald
        .producer(Method::POST, "/v1/topics/news/publish")
        .json(&json!({"title": "x", "group_key": "like:1"}))
        .send()
        .await?;
    let status = r.status();
    let error: Value = r.json().await?;
    ensure!(
        status == 400 && error["error"]["field"] == "group_key",
        "topic publish: {status} {error}"
    );
    ensure!(
        herald.inbox("u").await?.is_empty(),
        "nothing was stored for a refused notify"
    );
    Ok(())
}

/// The group's first notification has nothing for the router (inbox only): the next
/// member carries the window's close, and the group's push goes out at its end with the
/// folded text, instead of every later member being folded into a close that never comes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_group_whose_first_member_has_no_channel_work_still_pushes() -> anyhow::Result<()> {
    let nats = Nats::single().await?;
    let push = Push::start().await?;
    let (_dir, templates) = templates()?;
    let herald = Herald::builder(&nats)
        .policy(policy(2))
        .templates(templates)
        .channels(push.settings(rand_key())?)
        .start()
        .await?;
    devices(&herald, "pia").await?;
    let mut quiet = like("pia", "Ann");
    quiet["channels"] = json!(["inbox"]);
    let first = herald.accept(&quiet).await?;
    let second = herald.accept(&like("pia", "Bob")).await?;
    let third = herald.accept(&like("pia", "Cid")).await?;
    let group = |n: &Value| n["group"]["first_id"].clone();
    let inbox = herald.inbox("pia").await?;
    ensure!(
        inbox.len() == 3 && inbox.iter().all(|n| group(n) == first.id.as_str()),
        "one group, opened by the inbox-only one: {inbox:?}"
    );
    let sent = push_state(&herald, &second.id, "sent").await?;
    ensure!(
        sent["reason"]
            .as_str()
            .is_none_or(|r| !r.starts_with("folded_into")),
        "{sent}"
    );
    let folded = push_state(&herald, &third.id, "folded").await?;
    ensure!(
        folded["reason"]
            .as_str()
            .is_some_and(|r| r.starts_with(&format!("folded_into: {}", first.id))),
        "{folded}"
    );
    let (apns, fcm) = push.sent();
    ensure!(
        apns.len() == 1 && fcm.len() == 1,
        "one push each: {apns:?} {fcm:?}"
    );
    ensure!(
        apns[0].0 == json!("Cid and 2 others liked your photo"),
        "the group's text: {apns:?}"
    );
    Ok(())
}
