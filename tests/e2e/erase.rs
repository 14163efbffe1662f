//! GDPR erase: `DELETE /v1/users/{id}` removes the user's notifications, pending
//! schedules, preferences and read position, delivery status, sent markers, queued
//! channel jobs, aggregation groups, digest entries, deferred copies and dead letters,
//! says what it removed, and touches no one else.

use anyhow::ensure;
use futures::TryStreamExt as _;
use herald::channels::ChannelSettings;
use herald_auth::Scope;
use herald_channels::Provider;
use herald_protocol::Channel;
use herald_tests::herald::rand_key;
use herald_tests::scripted::Scripted;
use herald_tests::{Herald, Nats, eventually, send_at_in};
use herald_worker::Limits;
use reqwest::{Method, StatusCode};
use serde_json::{Value, json};
use std::sync::Arc;
use std::time::Duration;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn erase_removes_everything_of_one_user_and_nothing_else() -> anyhow::Result<()> {
    let nats = Nats::single().await?;
    let notify_only = herald_auth::api_keys::generate();
    let herald = Herald::builder(&nats)
        .key(&notify_only, &[Scope::Notify])
        .start()
        .await?;
    let user = "zoe.*>";
    let mut seqs = Vec::new();
    for i in 0..3 {
        seqs.push(herald.send(user, &format!("n{i}")).await?.seq);
        herald.send("zed", &format!("n{i}")).await?;
    }
    let scheduled = herald
        .notify(&json!({"user_id": user, "title": "later", "send_at": send_at_in(8000).1}))
        .await?;
    ensure!(
        scheduled.status() == StatusCode::ACCEPTED,
        "schedule: {}",
        scheduled.status()
    );
    let token = herald.token(user);
    let put = herald
        .request(Method::PUT, "/v1/me/preferences")
        .bearer_auth(&token)
        .json(&json!({"opt_out": true}))
        .send()
        .await?;
    ensure!(put.status() == StatusCode::OK, "prefs: {}", put.status());
    let read = herald
        .request(Method::POST, "/v1/me/read")
        .bearer_auth(&token)
        .json(&json!({"up_to": seqs[1]}))
        .send()
        .await?;
    ensure!(read.status() == StatusCode::OK, "read: {}", read.status());

    let path = format!("/v1/users/{}", herald_tests::encode(user));
    let forbidden = herald
        .request(Method::DELETE, &path)
        .bearer_auth(&notify_only)
        .send()
        .await?;
    ensure!(
        forbidden.status() == StatusCode::FORBIDDEN,
        "notify scope: {}",
        forbidden.status()
    );

    // The mark-read above is batched by the gateway: wait until it is stored, so the
    // erase has something to remove.
    eventually(
        Duration::from_secs(10),
        "the read position stored",
        || async {
            let unread: Value = herald
                .request(Method::GET, "/v1/me/unread")
                .bearer_auth(&token)
                .send()
                .await?
                .json()
                .await?;
            ensure!(unread["unread"] == json!(1), "{unread}");
            Ok(())
        },
    )
    .await?;
    let answer: Value = herald
        .producer(Method::DELETE, &path)
        .send()
        .await?
        .json()
        .await?;
    ensure!(
        answer["removed"]
            == json!({
                "notifications": 3, "scheduled": 1, "preferences": true, "read_position": true,
                "seen_position": false, "devices_and_contact": true, "delivery_status": 0,
                "groups": 0, "digest_entries": 0, "subscriptions": 0, "dead_letters": 0
            }),
        "{answer}"
    );
    ensure!(herald.inbox(user).await?.is_empty(), "inbox erased");
    ensure!(
        herald.inbox("zed").await?.len() == 3,
        "another user untouched"
    );
    let prefs: Value = herald
        .request(Method::GET, "/v1/me/preferences")
        .bearer_auth(&token)
        .send()
        .await?
        .json()
        .await?;
    ensure!(
        prefs["opt_out"] == json!(false),
        "preferences back to defaults: {prefs}"
    );

    // The erased schedule never fires: a notification scheduled after it arrives alone.
    // (The schedules are seconds away so that the erase surely comes first.)
    let sentinel = herald
        .notify(&json!({"user_id": user, "title": "sentinel", "send_at": send_at_in(9000).1}))
        .await?;
    ensure!(
        sentinel.status() == StatusCode::ACCEPTED,
        "sentinel: {}",
        sentinel.status()
    );
    let inbox = eventually(Duration::from_secs(30), "the sentinel fired", || async {
        let inbox = herald.inbox(user).await?;
        ensure!(!inbox.is_empty(), "not yet");
        Ok(inbox)
    })
    .await?;
    ensure!(
        inbox.len() == 1 && inbox[0]["title"] == "sentinel",
        "{inbox:?}"
    );
    Ok(())
}

const WAIT: Duration = Duration::from_secs(30);

async fn push_status(herald: &Herald, id: &str) -> anyhow::Result<(StatusCode, Value)> {
    let r = herald
        .producer(Method::GET, &format!("/v1/notifications/{id}"))
        .send()
        .await?;
    let status = r.status();
    Ok((status, r.json().await.unwrap_or(Value::Null)))
}

async fn sent_markers(nats: &Nats) -> anyhow::Result<Vec<String>> {
    let js = async_nats::jetstream::new(nats.client().await?);
    let kv = js
        .get_key_value(herald_protocol::streams::SENT_BUCKET)
        .await?;
    Ok(kv.keys().await?.try_collect().await?)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn erase_removes_delivery_status_sent_markers_and_queued_jobs() -> anyhow::Result<()> {
    let nats = Nats::single().await?;
    let apns = Arc::new(Scripted::new("apns", Channel::Push));
    let mut settings = ChannelSettings::new(rand_key());
    settings.escalation_delay = Duration::ZERO;
    let provider: Arc<dyn Provider> = apns.clone();
    settings.extra_providers.push((provider, Limits::default()));
    let herald = Herald::builder(&nats).channels(settings).start().await?;
    for user in ["erin", "ezra"] {
        let r = herald
            .user(Method::POST, "/v1/me/devices", user)
            .json(&json!({"platform": "ios", "token": format!("tok-{user}")}))
            .send()
            .await?;
        ensure!(r.status().is_success(), "device: {}", r.status());
    }
    let push = |user: &'static str, title: &'static str| {
        let herald = &herald;
        async move {
            anyhow::Ok(
                herald
                    .accept(&json!({"user_id": user, "title": title, "channels": ["push"]}))
                    .await?
                    .id,
            )
        }
    };
    let sent = push("erin", "delivered").await?;
    let other = push("ezra", "delivered").await?;
    for id in [&sent, &other] {
        eventually(WAIT, "pushed", || async {
            let (code, s) = push_status(&herald, id).await?;
            ensure!(
                code == 200 && s["channels"]["push"][0]["state"] == "sent",
                "{s}"
            );
            Ok(())
        })
        .await?;
    }
    ensure!(
        sent_markers(&nats)
            .await?
            .iter()
            .any(|k| k.starts_with(&sent)),
        "a sent marker for the delivered push"
    );

    // A job waiting on the queue while the channel is paused.
    let r = herald
        .producer(Method::POST, "/v1/channels/push/pause")
        .json(&json!({"for_seconds": 600}))
        .send()
        .await?;
    ensure!(r.status() == 200, "pause: {}", r.status());
    let queued = push("erin", "still queued").await?;
    eventually(WAIT, "the job is queued", || async {
        let (code, s) = push_status(&herald, &queued).await?;
        ensure!(
            code == 200 && s["channels"]["push"][0]["state"] == "queued",
            "{s}"
        );
        Ok(())
    })
    .await?;

    let answer: Value = herald
        .producer(Method::DELETE, "/v1/users/erin")
        .send()
        .await?
        .json()
        .await?;
    ensure!(
        answer["removed"]["delivery_status"] == 2 && answer["removed"]["notifications"] == 2,
        "{answer}"
    );
    for id in [&sent, &queued] {
        let (code, s) = push_status(&herald, id).await?;
        ensure!(code == 404, "status of an erased notification: {code} {s}");
    }
    let markers = sent_markers(&nats).await?;
    ensure!(
        !markers.iter().any(|k| k.starts_with(&sent)),
        "sent marker left: {markers:?}"
    );
    ensure!(
        markers.iter().any(|k| k.starts_with(&other)),
        "another user's marker removed: {markers:?}"
    );
    let (code, s) = push_status(&herald, &other).await?;
    ensure!(
        code == 200 && s["channels"]["push"][0]["state"] == "sent",
        "{s}"
    );

    // Resumed, the queued job is dropped: never sent, no status written back.
    let r = herald
        .producer(Method::POST, "/v1/channels/push/resume")
        .send()
        .await?;
    ensure!(r.status() == 200, "resume: {}", r.status());
    let js = async_nats::jetstream::new(nats.client().await?);
    eventually(WAIT, "the queued job is off the queue", || async {
        let mut stream = js.get_stream("HERALD_WORK_PUSH").await?;
        let n = stream.info().await?.state.messages;
        ensure!(n == 0, "{n} jobs left");
        Ok(())
    })
    .await?;
    ensure!(
        apns.calls_for(&queued).is_empty(),
        "an erased user's job was sent"
    );
    let (code, s) = push_status(&herald, &queued).await?;
    ensure!(
        code == 404,
        "status written back after the erase: {code} {s}"
    );
    Ok(())
}

/// The `group` snapshot of the newest inbox entry of `user`.
async fn newest_group(herald: &Herald, user: &str) -> anyhow::Result<Value> {
    let inbox = herald.inbox(user).await?;
    Ok(inbox
        .last()
        .map(|n| n["group"].clone())
        .unwrap_or(Value::Null))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn erase_removes_aggregation_groups_and_digest_entries() -> anyhow::Result<()> {
    let nats = Nats::single().await?;
    let herald = Herald::builder(&nats).start().await?;
    let like = |user: &str| {
        json!({"user_id": user, "title": "liked", "group_key": "like:photo-1",
               "group_actor": "Ann", "channels": ["inbox", "push"]})
    };
    for user in ["gil", "gus"] {
        herald.accept(&like(user)).await?;
        let r = herald
            .producer(Method::PUT, &format!("/v1/users/{user}/preferences"))
            .json(&json!({"digest": "daily"}))
            .send()
            .await?;
        ensure!(r.status() == StatusCode::OK, "prefs: {}", r.status());
        let n = herald
            .accept(&json!({"user_id": user, "title": "news", "channels": ["inbox", "email"]}))
            .await?;
        eventually(WAIT, "recorded for the digest", || async {
            let (code, s) = push_status(&herald, &n.id).await?;
            ensure!(
                code == 200 && s["channels"]["email"][0]["state"] == "digest",
                "{s}"
            );
            Ok(())
        })
        .await?;
    }
    let answer: Value = herald
        .producer(Method::DELETE, "/v1/users/gil")
        .send()
        .await?
        .json()
        .await?;
    let removed = &answer["removed"];
    ensure!(
        removed["groups"] == json!(1) && removed["digest_entries"] == json!(1),
        "{answer}"
    );
    // The group's window end and the digest's period end were pending schedules.
    ensure!(removed["scheduled"] == json!(2), "{answer}");
    // gil starts afresh; gus's group still counts.
    herald.accept(&like("gil")).await?;
    herald.accept(&like("gus")).await?;
    let gil = newest_group(&herald, "gil").await?;
    let gus = newest_group(&herald, "gus").await?;
    ensure!(gil["count"] == json!(1), "gil's group was erased: {gil}");
    ensure!(gus["count"] == json!(2), "gus's group untouched: {gus}");
    let again: Value = herald
        .producer(Method::DELETE, "/v1/users/gus")
        .send()
        .await?
        .json()
        .await?;
    ensure!(
        again["removed"]["digest_entries"] == json!(1),
        "gus's digest entry untouched by gil's erase: {again}"
    );
    Ok(())
}

/// Whole notifications also sit on a user's deferral subject (a big topic's hand-over,
/// a return from quiet hours) and in dead letters; the erase removes those too, and
/// another user's stay.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn erase_removes_deferred_copies_and_dead_letters() -> anyhow::Result<()> {
    use herald_tests::scripted::Answer;
    let nats = Nats::single().await?;
    let apns = Arc::new(Scripted::new("apns", Channel::Push));
    apns.fallback(Answer::Permanent);
    let mut settings = ChannelSettings::new(rand_key());
    settings.escalation_delay = Duration::ZERO;
    let provider: Arc<dyn Provider> = apns.clone();
    settings.extra_providers.push((provider, Limits::default()));
    let herald = Herald::builder(&nats)
        .channels(settings)
        .topics(herald_api::TopicSettings {
            big_threshold: 0,
            ..Default::default()
        })
        .start()
        .await?;
    let users = ["eve", "eli"];
    for user in users {
        let r = herald
            .user(Method::POST, "/v1/me/devices", user)
            .json(&json!({"platform": "ios", "token": format!("tok-{user}")}))
            .send()
            .await?;
        ensure!(r.status().is_success(), "device: {}", r.status());
    }
    let r = herald
        .producer(Method::POST, "/v1/topics/alerts/subscribers")
        .json(&json!({ "user_ids": users }))
        .send()
        .await?;
    ensure!(r.status().is_success(), "subscribe: {}", r.status());
    let r = herald
        .producer(Method::POST, "/v1/topics/alerts/publish")
        .json(&json!({"title": "private matter", "channels": ["inbox", "push"]}))
        .send()
        .await?;
    ensure!(
        r.status() == StatusCode::ACCEPTED,
        "publish: {}",
        r.status()
    );
    // The provider refuses every push for good: one dead letter per subscriber.
    let letters_of = |list: &Value, user: &str| {
        list["items"]
            .as_array()
            .into_iter()
            .flatten()
            .filter(|l| l["job"]["user_id"] == user)
            .count()
    };
    eventually(WAIT, "a dead letter for each subscriber", || async {
        let list: Value = herald
            .producer(Method::GET, "/v1/dlq")
            .send()
            .await?
            .json()
            .await?;
        ensure!(
            letters_of(&list, "eve") == 1 && letters_of(&list, "eli") == 1,
            "{list}"
        );
        Ok(())
    })
    .await?;
    let js = async_nats::jetstream::new(nats.client().await?);
    let inbox = js.get_stream(herald_protocol::streams::INBOX).await?;
    let deferred = |user: &str| -> anyhow::Result<String> {
        Ok(herald
            .subjects()
            .deferred(&herald_protocol::UserId::new(user.to_owned())?))
    };
    // Work back from quiet hours or a group's window on the `high` and `low` lanes has
    // subjects of its own: a copy of each user's hand-over there.
    let laned = |user: &str| -> anyhow::Result<String> {
        Ok(herald.subjects().deferred_in(
            &herald_protocol::UserId::new(user.to_owned())?,
            herald_protocol::Priority::Low,
        ))
    };
    for user in users {
        let copy = inbox
            .get_last_raw_message_by_subject(&deferred(user)?)
            .await
            .map_err(|e| anyhow::anyhow!("the hand-over copy of {user} is not stored: {e}"))?;
        js.publish(laned(user)?, copy.payload.clone())
            .await?
            .await?;
    }

    let answer: Value = herald
        .producer(Method::DELETE, "/v1/users/eve")
        .send()
        .await?
        .json()
        .await?;
    ensure!(answer["removed"]["dead_letters"] == 1, "{answer}");
    ensure!(
        inbox
            .get_last_raw_message_by_subject(&deferred("eve")?)
            .await
            .is_err(),
        "the erased user's hand-over copy is still in INBOX"
    );
    ensure!(
        inbox
            .get_last_raw_message_by_subject(&laned("eve")?)
            .await
            .is_err(),
        "the erased user's deferred copy on the low lane is still in INBOX"
    );
    ensure!(
        inbox
            .get_last_raw_message_by_subject(&laned("eli")?)
            .await
            .is_ok(),
        "another user's low-lane copy was removed"
    );
    ensure!(
        inbox
            .get_last_raw_message_by_subject(&deferred("eli")?)
            .await
            .is_ok(),
        "another user's copy was removed"
    );
    let list: Value = herald
        .producer(Method::GET, "/v1/dlq")
        .send()
        .await?
        .json()
        .await?;
    ensure!(
        letters_of(&list, "eve") == 0 && letters_of(&list, "eli") == 1,
        "{list}"
    );
    Ok(())
}
