//! Channel workers end to end: real nats-server, the whole mesh in-process, providers
//! scripted per error class (a real `Provider` implementation), and a real SMTP server
//! for email.

use anyhow::{Context as _, ensure};
use herald::channels::{ChannelSettings, SmtpSettings};
use herald_channels::Provider;
use herald_protocol::Channel;
use herald_tests::herald::rand_key;
use herald_tests::scripted::{Answer, Scripted};
use herald_tests::smtp::SmtpServer;
use herald_tests::{Herald, Nats, eventually};
use herald_worker::Limits;
use herald_worker::backoff::Backoff;
use herald_worker::breaker::BreakerConfig;
use reqwest::Method;
use serde_json::{Value, json};
use std::sync::Arc;
use std::time::Duration;

const WAIT: Duration = Duration::from_secs(30);

/// Fast retries, short ack wait, no escalation delay, small pools.
fn settings(key: [u8; 32]) -> ChannelSettings {
    let mut s = ChannelSettings::new(key);
    s.escalation_delay = Duration::ZERO;
    s.concurrency = 4;
    s.backoff = Backoff {
        base: Duration::from_millis(100),
        max: Duration::from_millis(400),
    };
    s.queue.ack_wait = Duration::from_secs(3);
    s.queue.max_deliver = 4;
    s
}

fn with(mut s: ChannelSettings, provider: &Arc<Scripted>, limits: Limits) -> ChannelSettings {
    let p: Arc<dyn Provider> = provider.clone();
    s.extra_providers.push((p, limits));
    s
}

/// Limits whose breaker opens after `failures` failures in a row, for `open_for`.
fn breaker_opening_after(failures: u32, open_for: Duration) -> Limits {
    Limits {
        rate_per_second: None,
        breaker: BreakerConfig {
            consecutive_failures: failures,
            error_rate: 1.0,
            window: 10,
            open_for,
        },
    }
}

async fn device(herald: &Herald, user: &str, token: &str) -> anyhow::Result<()> {
    let r = herald
        .user(Method::POST, "/v1/me/devices", user)
        .json(&json!({"platform": "ios", "token": token}))
        .send()
        .await?;
    ensure!(r.status().is_success(), "device: {}", r.status());
    Ok(())
}

async fn contact(herald: &Herald, user: &str, body: Value) -> anyhow::Result<reqwest::Response> {
    Ok(herald
        .producer(Method::PUT, &format!("/v1/users/{user}/contact"))
        .json(&body)
        .send()
        .await?)
}

/// `GET /v1/dlq`: the dead letters.
async fn dlq(herald: &Herald) -> anyhow::Result<Value> {
    Ok(herald
        .producer(Method::GET, "/v1/dlq")
        .send()
        .await?
        .json()
        .await?)
}

/// The dead letter of notification `id`.
async fn dead_letter_of(herald: &Herald, id: &str) -> anyhow::Result<Value> {
    let list = dlq(herald).await?;
    list["items"]
        .as_array()
        .context("items")?
        .iter()
        .find(|l| l["job"]["id"] == id)
        .cloned()
        .with_context(|| format!("dead letter of {id} in {list}"))
}

/// Waits until the one target of `channel` reaches `state`; returns its entry.
async fn reaches(herald: &Herald, id: &str, channel: &str, state: &str) -> anyhow::Result<Value> {
    eventually(WAIT, &format!("{id} {channel} {state}"), || async {
        let s = herald.status(id).await?;
        let entry = s["channels"][channel][0].clone();
        ensure!(entry["state"] == state, "status now {s}");
        Ok(entry)
    })
    .await
}

async fn push(herald: &Herald, user: &str, title: &str) -> anyhow::Result<String> {
    Ok(herald
        .accept(&json!({"user_id": user, "title": title, "channels": ["inbox", "push"]}))
        .await?
        .id)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn transient_failures_are_retried_and_delivered_once() -> anyhow::Result<()> {
    let nats = Nats::single().await?;
    let apns = Arc::new(Scripted::new("apns", Channel::Push));
    apns.script([Answer::Transient, Answer::Transient]);
    let herald = Herald::builder(&nats)
        .channels(with(settings(rand_key()), &apns, Limits::default()))
        .start()
        .await?;
    device(&herald, "ann", "tok-1").await?;
    let id = push(&herald, "ann", "hello").await?;
    let entry = reaches(&herald, &id, "push", "sent").await?;
    assert_eq!(entry["retries"], 2, "{entry}");
    assert_eq!(entry["provider"], "apns");
    assert_eq!(entry["provider_message_id"], format!("apns-{id}"));
    let calls = apns.calls_for(&id);
    assert_eq!(calls.len(), 3, "two failures and one success: {calls:?}");
    assert_eq!(calls[2].delivery.title.as_deref(), Some("hello"));
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_jobs_are_terminated_and_do_not_hold_the_queue() -> anyhow::Result<()> {
    use herald_protocol::{ChannelJob, Priority, UserId, streams};
    let nats = Nats::single().await?;
    let apns = Arc::new(Scripted::new("apns", Channel::Push));
    let herald = Herald::builder(&nats)
        .channels(with(settings(rand_key()), &apns, Limits::default()))
        .start()
        .await?;
    // Two jobs no router writes: bytes that are no job, and a job naming no inbox entry.
    let js = async_nats::jetstream::new(herald.nats_client().await?);
    let subject = herald.subjects().work(Channel::Push, Priority::Normal);
    let no_entry = ChannelJob {
        id: "no-entry".into(),
        seq: 0,
        user_id: UserId::new("ann".to_owned())?,
        channel: Channel::Push,
        priority: Priority::Normal,
        target: "t".into(),
        folded: None,
        digest: None,
        locale: None,
    };
    for payload in [b"{not a job".to_vec(), serde_json::to_vec(&no_entry)?] {
        js.publish(subject.clone(), payload.into()).await?.await?;
    }
    device(&herald, "ann", "tok-1").await?;
    let id = push(&herald, "ann", "after the bad ones").await?;
    reaches(&herald, &id, "push", "sent").await?;
    eventually(WAIT, "both terminated, the queue empty", || async {
        let metrics = herald.metrics().await?;
        let line = r#"herald_worker_jobs_total{channel="push",outcome="undecodable"} 2"#;
        ensure!(metrics.contains(line), "no `{line}` in the metrics");
        let mut work = js
            .get_stream(streams::work_stream_name(Channel::Push))
            .await?;
        let left = work.info().await?.state.messages;
        ensure!(left == 0, "{left} jobs left in the queue");
        Ok(())
    })
    .await?;
    assert_eq!(
        apns.calls_for("no-entry").len(),
        0,
        "a malformed job is never sent"
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_job_whose_state_stays_unreadable_is_dead_lettered_not_stranded() -> anyhow::Result<()> {
    use herald_protocol::streams;
    let nats = Nats::single().await?;
    let apns = Arc::new(Scripted::new("apns", Channel::Push));
    let mut settings = with(settings(rand_key()), &apns, Limits::default());
    // The first delivery waits out the escalation delay: time to break the store.
    settings.escalation_delay = Duration::from_secs(1);
    // NATS trouble spends no attempt: the job comes back until the consumer's last
    // delivery, quickly here.
    settings.store_retry = Duration::from_millis(10);
    let herald = Herald::builder(&nats).channels(settings).start().await?;
    device(&herald, "dora", "tok-d").await?;
    let id = push(&herald, "dora", "never readable").await?;
    let js = async_nats::jetstream::new(herald.nats_client().await?);
    let work = streams::work_stream_name(Channel::Push);
    eventually(WAIT, "the job is queued", || async {
        let queued = js.get_stream(work).await?.info().await?.state.messages;
        ensure!(queued == 1, "{queued} jobs queued");
        Ok(())
    })
    .await?;
    // The targets bucket is gone: every later read of it fails (NATS trouble, not "no
    // target"), so each delivery retries, and the last one must not strand the job.
    js.delete_stream(format!("KV_{}", streams::TARGETS_BUCKET))
        .await?;

    let entry = reaches(&herald, &id, "push", "dead_lettered").await?;
    let reason = entry["reason"].as_str().unwrap_or_default();
    assert!(reason.contains("target store unavailable"), "{entry}");
    let letter = dead_letter_of(&herald, &id).await?;
    let last = 4 + herald_store::provision::SPARE_DELIVERIES;
    assert_eq!(
        letter["attempts"], last,
        "on the consumer's last delivery: {letter}"
    );
    eventually(WAIT, "the work queue is empty", || async {
        let left = js.get_stream(work).await?.info().await?.state.messages;
        ensure!(left == 0, "{left} jobs left");
        Ok(())
    })
    .await?;
    assert!(apns.calls_for(&id).is_empty(), "nothing was sent");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn throttling_honours_retry_after() -> anyhow::Result<()> {
    let nats = Nats::single().await?;
    let apns = Arc::new(Scripted::new("apns", Channel::Push));
    apns.script([Answer::Throttled(Duration::from_millis(1500))]);
    let herald = Herald::builder(&nats)
        .channels(with(settings(rand_key()), &apns, Limits::default()))
        .start()
        .await?;
    device(&herald, "bo", "tok-b").await?;
    let id = push(&herald, "bo", "otp").await?;
    reaches(&herald, &id, "push", "sent").await?;
    let calls = apns.calls_for(&id);
    assert_eq!(calls.len(), 2, "{calls:?}");
    let waited = calls[1].at - calls[0].at;
    ensure!(
        waited >= Duration::from_millis(1400),
        "retried after {waited:?}, before the provider's Retry-After of 1.5 s"
    );
    Ok(())
}

/// A 503 that says when to come back (FCM and APNs document it) is honoured like a 429's
/// `Retry-After`, though it still counts against the provider's circuit.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_5xx_retry_after_is_honoured() -> anyhow::Result<()> {
    let nats = Nats::single().await?;
    let apns = Arc::new(Scripted::new("apns", Channel::Push));
    apns.script([Answer::Unavailable(Duration::from_millis(1500))]);
    let herald = Herald::builder(&nats)
        .channels(with(settings(rand_key()), &apns, Limits::default()))
        .start()
        .await?;
    device(&herald, "cy", "tok-c").await?;
    let id = push(&herald, "cy", "otp").await?;
    reaches(&herald, &id, "push", "sent").await?;
    let calls = apns.calls_for(&id);
    assert_eq!(calls.len(), 2, "{calls:?}");
    let waited = calls[1].at - calls[0].at;
    ensure!(
        waited >= Duration::from_millis(1400),
        "retried after {waited:?}, before the provider's Retry-After of 1.5 s"
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn permanent_errors_are_dead_lettered_and_can_be_retried() -> anyhow::Result<()> {
    let nats = Nats::single().await?;
    let apns = Arc::new(Scripted::new("apns", Channel::Push));
    apns.script([Answer::Permanent]);
    let herald = Herald::builder(&nats)
        .channels(with(settings(rand_key()), &apns, Limits::default()))
        .start()
        .await?;
    device(&herald, "cy", "tok-c").await?;
    let id = push(&herald, "cy", "bad payload").await?;
    let entry = reaches(&herald, &id, "push", "dead_lettered").await?;
    assert!(
        entry["reason"]
            .as_str()
            .unwrap_or_default()
            .contains("400 InvalidPayload"),
        "{entry}"
    );
    assert_eq!(
        apns.calls_for(&id).len(),
        1,
        "no retry of a permanent error"
    );

    let letter = dead_letter_of(&herald, &id).await?;
    assert_eq!(letter["reason"], "permanent provider error");
    assert!(
        letter["last_response"]
            .as_str()
            .unwrap_or_default()
            .contains("400"),
        "{letter}"
    );
    assert_eq!(letter["provider"], "apns");

    let dlq_id = letter["dlq_id"].as_u64().context("dlq_id")?;
    let r = herald
        .producer(Method::POST, &format!("/v1/dlq/{dlq_id}/retry"))
        .send()
        .await?;
    assert_eq!(r.status(), 202);
    reaches(&herald, &id, "push", "sent").await?;
    assert_eq!(apns.calls_for(&id).len(), 2);
    let after = dlq(&herald).await?;
    ensure!(
        !after["items"]
            .as_array()
            .context("items")?
            .iter()
            .any(|l| l["job"]["id"] == id.as_str()),
        "retried letter still listed: {after}"
    );
    let again = herald
        .producer(Method::POST, &format!("/v1/dlq/{dlq_id}/retry"))
        .send()
        .await?;
    assert_eq!(again.status(), 404);
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_invalid_token_is_removed() -> anyhow::Result<()> {
    let nats = Nats::single().await?;
    let apns = Arc::new(Scripted::new("apns", Channel::Push));
    apns.script([Answer::InvalidTarget]);
    let herald = Herald::builder(&nats)
        .channels(with(settings(rand_key()), &apns, Limits::default()))
        .start()
        .await?;
    device(&herald, "di", "tok-dead").await?;
    let id = push(&herald, "di", "one").await?;
    let entry = reaches(&herald, &id, "push", "failed").await?;
    assert!(
        entry["reason"]
            .as_str()
            .unwrap_or_default()
            .contains("invalid target"),
        "{entry}"
    );
    // The token is gone: the next notification has no push target at all.
    let next = push(&herald, "di", "two").await?;
    let entry = reaches(&herald, &next, "push", "skipped").await?;
    assert_eq!(entry["target"], "none", "{entry}");
    assert_eq!(apns.calls().len(), 1);
    // Deleting it again says it is not there.
    let r = herald
        .user(Method::DELETE, "/v1/me/devices", "di")
        .json(&json!({"token": "tok-dead"}))
        .send()
        .await?;
    assert_eq!(r.status(), 404);
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_open_breaker_fails_over_and_the_primary_comes_back() -> anyhow::Result<()> {
    let nats = Nats::single().await?;
    let primary = Arc::new(Scripted::new("twilio", Channel::Sms));
    let secondary = Arc::new(Scripted::new("vonage", Channel::Sms));
    primary.fallback(Answer::Transient);
    let limits = breaker_opening_after(2, Duration::from_secs(3));
    let s = with(
        with(settings(rand_key()), &primary, limits),
        &secondary,
        limits,
    );
    let herald = Herald::builder(&nats).channels(s).start().await?;
    let r = contact(&herald, "eve", json!({"phone": "+4915112345678"})).await?;
    assert_eq!(r.status(), 200);
    let mut ids = Vec::new();
    for i in 0..6 {
        ids.push(
            herald
                .accept(
                    &json!({"user_id": "eve", "title": format!("code {i}"), "channels": ["sms"]}),
                )
                .await?
                .id,
        );
    }
    for id in &ids {
        let entry = reaches(&herald, id, "sms", "sent").await?;
        assert_eq!(entry["provider"], "vonage", "{entry}");
    }
    let failed = primary.calls().len();
    ensure!(
        failed <= 3,
        "the primary kept getting traffic while its circuit was open: {failed} calls"
    );
    // An operator sees it: results, latency and breaker state per provider. (Metrics are
    // process-wide and tests run in parallel: lower bounds and presence only.)
    let text = herald.metrics().await?;
    for (prefix, at_least) in [
        (
            "herald_provider_sends_total{provider=\"twilio\",result=\"transient\"}",
            2.0,
        ),
        (
            "herald_provider_sends_total{provider=\"vonage\",result=\"sent\"}",
            6.0,
        ),
        (
            "herald_provider_send_seconds_count{provider=\"vonage\"}",
            6.0,
        ),
        ("herald_provider_breaker_state{provider=\"twilio\"}", 0.0),
        (
            "herald_worker_jobs_total{channel=\"sms\",outcome=\"sent\"}",
            6.0,
        ),
    ] {
        let value = crate::metrics::sample(&text, prefix)
            .with_context(|| format!("{prefix} missing from /metrics:\n{text}"))?;
        ensure!(
            value >= at_least,
            "{prefix} = {value}, expected ≥ {at_least}"
        );
    }
    // The primary recovers; after the open period a probe reaches it and closes the circuit.
    primary.fallback(Answer::Ok);
    // Each attempt waits up to WAIT for its own delivery; leave room for several, or one
    // slow attempt on a loaded machine uses up the whole window.
    eventually(WAIT * 3, "the primary takes traffic again", || async {
        let id = herald
            .accept(&json!({"user_id": "eve", "title": "probe", "channels": ["sms"]}))
            .await?
            .id;
        let entry = reaches(&herald, &id, "sms", "sent").await?;
        ensure!(
            entry["provider"] == "twilio",
            "sent by {}",
            entry["provider"]
        );
        Ok(())
    })
    .await?;
    Ok(())
}

/// Every circuit of a channel open for longer than its jobs' back-off allows: the lanes
/// stop pulling, then pull one job per half-open probe. The queued jobs keep their
/// deliveries for real attempts, and once the provider is back each is sent once; a job
/// is dead-lettered only after `max_deliver` real failed calls, never for being pulled
/// while nothing could be called.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_outage_longer_than_the_back_off_spends_no_delivery_without_a_call() -> anyhow::Result<()>
{
    let nats = Nats::single().await?;
    let sms = Arc::new(Scripted::new("twilio", Channel::Sms));
    sms.fallback(Answer::Transient);
    let limits = breaker_opening_after(1, Duration::from_millis(700));
    let settings = with(settings(rand_key()), &sms, limits);
    let max_deliver = usize::try_from(settings.queue.max_deliver)?;
    let herald = Herald::builder(&nats).channels(settings).start().await?;
    let r = contact(&herald, "oz", json!({"phone": "+4915112345678"})).await?;
    assert_eq!(r.status(), 200);
    let sms_to_oz = |title: String| json!({"user_id": "oz", "title": title, "channels": ["sms"]});
    let mut ids = vec![herald.accept(&sms_to_oz("first".into())).await?.id];
    eventually(WAIT, "the first failure opened the circuit", || async {
        ensure!(!sms.calls().is_empty());
        Ok(())
    })
    .await?;
    for i in 0..8 {
        ids.push(herald.accept(&sms_to_oz(format!("code {i}"))).await?.id);
    }
    // Four more failed probes: at least four open periods after the eight were queued,
    // more than their back-off (at most 0.4 s after each circuit wait) lets three retries
    // last. A job deferred at every pull would be dead-lettered by now.
    let seen = sms.calls().len();
    eventually(WAIT, "four more probes failed", || async {
        ensure!(sms.calls().len() >= seen + 4, "{} calls", sms.calls().len());
        Ok(())
    })
    .await?;
    sms.fallback(Answer::Ok);
    for id in &ids {
        let entry = eventually(WAIT, &format!("{id} ends"), || async {
            let s = herald.status(id).await?;
            let entry = s["channels"]["sms"][0].clone();
            ensure!(
                entry["state"] == "sent" || entry["state"] == "dead_lettered",
                "status now {s}"
            );
            Ok(entry)
        })
        .await?;
        let calls = sms.calls_for(id);
        let sent = calls.iter().filter(|c| c.answer == Answer::Ok).count();
        let failed = calls.len() - sent;
        for step in entry["history"].as_array().into_iter().flatten() {
            let reason = step["reason"].as_str().unwrap_or_default();
            ensure!(
                !reason.contains("circuit is open"),
                "{id} was pulled while no circuit admitted a call: {entry}"
            );
        }
        if entry["state"] == "sent" {
            ensure!(sent == 1, "{id} sent {sent} times: {entry}");
            ensure!(
                entry["retries"] == failed,
                "{id}: {failed} failed calls, but {} retries: {entry}",
                entry["retries"]
            );
        } else {
            ensure!(
                sent == 0 && failed == max_deliver,
                "{id} dead after {failed} failed calls ({sent} sent), max_deliver {max_deliver}: {entry}"
            );
        }
    }
    Ok(())
}

/// APNs down while FCM works: the push channel keeps pulling (Android jobs go out), so
/// iOS jobs are pulled and deferred again and again. Deferrals send nothing and spend no
/// attempt: once APNs is back every job is sent, and a job is dead-lettered only after
/// `max_deliver` failed sends.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deferrals_while_one_platform_is_down_spend_no_attempts() -> anyhow::Result<()> {
    use herald_channels::Platform;
    let nats = Nats::single().await?;
    let apns = Arc::new(Scripted::for_platform("apns", Platform::Ios));
    let fcm = Arc::new(Scripted::for_platform("fcm", Platform::Android));
    apns.fallback(Answer::Transient);
    let limits = breaker_opening_after(1, Duration::from_millis(1500));
    let settings = with(with(settings(rand_key()), &apns, limits), &fcm, limits);
    let attempts = usize::try_from(settings.queue.max_deliver)?;
    let herald = Herald::builder(&nats).channels(settings).start().await?;
    device(&herald, "ivy", "tok-ivy").await?;
    let mut ids = Vec::new();
    // Each half-open probe sends one job (an attempt); the others come back meanwhile and
    // are deferred: with six jobs, deferrals outpace attempts five to one.
    for i in 0..6 {
        ids.push(push(&herald, "ivy", &format!("ios {i}")).await?);
    }
    let deferrals = |entry: &Value| {
        entry["history"]
            .as_array()
            .into_iter()
            .flatten()
            .filter(|h| h["state"] == "deferred")
            .count()
    };
    // Some job deferred as often as it may attempt (counting deferrals as attempts, it
    // would have been dead-lettered by now).
    eventually(WAIT, "a job deferred max_deliver times", || async {
        let mut most = 0;
        for id in &ids {
            let entry = herald.status(id).await?["channels"]["push"][0].clone();
            most = most.max(deferrals(&entry));
        }
        ensure!(most >= attempts, "at most {most} deferrals so far");
        Ok(())
    })
    .await?;
    apns.fallback(Answer::Ok);
    for id in &ids {
        let entry = eventually(WAIT, &format!("{id} ends"), || async {
            let entry = herald.status(id).await?["channels"]["push"][0].clone();
            ensure!(
                entry["state"] == "sent" || entry["state"] == "dead_lettered",
                "{entry}"
            );
            Ok(entry)
        })
        .await?;
        let calls = apns.calls_for(id);
        let failed = calls.iter().filter(|c| c.answer != Answer::Ok).count();
        if entry["state"] == "sent" {
            ensure!(calls.len() - failed == 1, "{id} sent once: {entry}");
            ensure!(entry["retries"] == failed, "{entry}");
        } else {
            ensure!(
                failed == attempts,
                "{id} dead-lettered after {failed} failed sends: {entry}"
            );
        }
    }
    ensure!(fcm.calls().is_empty(), "no Android device, no FCM call");
    Ok(())
}

/// A provider's throttle (429 with `Retry-After`) is usually per account: while it lasts
/// no job calls that provider — the next ones fail over to the secondary — and the job
/// that was told comes back after `Retry-After`, to the primary again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_throttle_pauses_the_provider_for_every_job() -> anyhow::Result<()> {
    let nats = Nats::single().await?;
    let primary = Arc::new(Scripted::new("twilio", Channel::Sms));
    let secondary = Arc::new(Scripted::new("vonage", Channel::Sms));
    primary.script([Answer::Throttled(Duration::from_secs(10))]);
    let s = with(
        with(settings(rand_key()), &primary, Limits::default()),
        &secondary,
        Limits::default(),
    );
    let herald = Herald::builder(&nats).channels(s).start().await?;
    let r = contact(&herald, "tia", json!({"phone": "+4915112345678"})).await?;
    assert_eq!(r.status(), 200);
    let sms = |title: &'static str| {
        let herald = &herald;
        async move {
            anyhow::Ok(
                herald
                    .accept(&json!({"user_id": "tia", "title": title, "channels": ["sms"]}))
                    .await?
                    .id,
            )
        }
    };
    let told = sms("first").await?;
    eventually(WAIT, "the primary throttled the first", || async {
        ensure!(!primary.calls().is_empty());
        Ok(())
    })
    .await?;
    let mut next = Vec::new();
    for title in ["second", "third"] {
        next.push(sms(title).await?);
    }
    for id in &next {
        let entry = reaches(&herald, id, "sms", "sent").await?;
        ensure!(entry["provider"] == "vonage", "during the pause: {entry}");
    }
    // After its Retry-After the first goes to the primary, which takes calls again.
    let entry = reaches(&herald, &told, "sms", "sent").await?;
    ensure!(entry["provider"] == "twilio", "{entry}");
    ensure!(
        primary.calls().len() == 2,
        "the primary was called during its pause: {:?}",
        primary.calls().len()
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn high_is_delivered_while_low_has_a_backlog() -> anyhow::Result<()> {
    let nats = Nats::single().await?;
    let apns = Arc::new(Scripted::new("apns", Channel::Push));
    apns.delay(Duration::from_millis(150));
    let herald = Herald::builder(&nats)
        .channels(with(settings(rand_key()), &apns, Limits::default()))
        .start()
        .await?;
    device(&herald, "fay", "tok-f").await?;
    let mut batch = Vec::new();
    for i in 0..60 {
        batch.push(json!({"user_id": "fay", "title": format!("promo {i}"), "priority": "low", "channels": ["push"]}));
    }
    let r = herald
        .producer(Method::POST, "/v1/notify/batch")
        .json(&json!({"notifications": batch}))
        .send()
        .await?;
    ensure!(r.status().is_success(), "batch: {}", r.status());
    // Low runs one at a time (a quarter of 4): 60 × 150 ms ≈ 9 s of backlog.
    eventually(WAIT, "the low backlog started", || async {
        ensure!(!apns.calls().is_empty());
        Ok(())
    })
    .await?;
    let otp = herald
        .accept(&json!({"user_id": "fay", "title": "OTP 123456", "priority": "high", "channels": ["push"]}))
        .await?
        .id;
    reaches(&herald, &otp, "push", "sent").await?;
    let low_sent = apns
        .calls()
        .iter()
        .filter(|c| c.delivery.priority == herald_protocol::Priority::Low)
        .count();
    ensure!(low_sent < 40, "high waited for {low_sent} of 60 low jobs");
    Ok(())
}

/// Low jobs waiting in [`high_is_delivered_while_100k_low_jobs_wait`].
const LOW_BACKLOG: usize = 100_000;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn high_is_delivered_while_100k_low_jobs_wait() -> anyhow::Result<()> {
    use herald_protocol::streams::worker_consumer;
    use herald_protocol::{Priority, UserId};
    let nats = Nats::single().await?;
    let apns = Arc::new(Scripted::new("apns", Channel::Push));
    // Slow enough that the backlog cannot drain while the test runs.
    apns.delay(Duration::from_millis(5));
    let herald = Herald::builder(&nats)
        .channels(with(settings(rand_key()), &apns, Limits::default()))
        .start()
        .await?;
    // The inbox keeps 10,000 per user: spread the backlog over enough users.
    let mut users = Vec::new();
    for i in 0..20 {
        let user = format!("backlog-{i}");
        device(&herald, &user, "tok-backlog").await?;
        users.push(UserId::new(user)?);
    }
    let target = herald_store::targets::target_id(&herald_channels::Target::Device {
        platform: herald_channels::Platform::Ios,
        token: "tok-backlog".into(),
    });
    let store = herald_store::connect(&nats.url(), "backlog-loader").await?;
    let load = herald::bench::jobs::JobLoad {
        users,
        channel: Channel::Push,
        lane: Priority::Low,
        target,
        count: LOW_BACKLOG,
        title: "promo".into(),
    };
    herald::bench::jobs::enqueue(&store, herald.subjects(), &load)
        .await
        .map_err(|e| anyhow::anyhow!("enqueue: {e}"))?;
    eventually(WAIT, "the low backlog is being worked", || async {
        ensure!(!apns.calls().is_empty());
        Ok(())
    })
    .await?;

    // The OTP goes the whole way: API, inbox, router, high lane.
    let otp = herald
        .accept(&json!({"user_id": "backlog-0", "title": "OTP 123456", "priority": "high", "channels": ["push"]}))
        .await?
        .id;
    reaches(&herald, &otp, "push", "sent").await?;
    let calls = apns.calls();
    let at = calls
        .iter()
        .position(|c| c.delivery.id == otp)
        .context("the OTP reached the provider")?;
    let low_before = calls[..at]
        .iter()
        .filter(|c| c.delivery.priority == Priority::Low)
        .count();
    let js = async_nats::jetstream::new(nats.client().await?);
    let mut low = js
        .get_stream("HERALD_WORK_PUSH")
        .await?
        .get_consumer::<async_nats::jetstream::consumer::pull::Config>(&worker_consumer(
            Channel::Push,
            Priority::Low,
        ))
        .await
        .map_err(|e| anyhow::anyhow!("low consumer: {e}"))?;
    let waiting = low.info().await?.num_pending;
    ensure!(
        low_before < LOW_BACKLOG && waiting > 0,
        "the OTP came after {low_before} low jobs; {waiting} low still waiting"
    );
    ensure!(
        waiting as usize + low_before >= LOW_BACKLOG - 1_000,
        "the backlog was not there: {waiting} waiting, {low_before} sent"
    );
    Ok(())
}

/// Stalls forever after the first sent marker: the worker "dies" between the provider's
/// acceptance and its ack.
#[derive(Debug, Default)]
struct DieBeforeAck {
    fired: std::sync::atomic::AtomicBool,
}

#[async_trait::async_trait]
impl herald_worker::Hooks for DieBeforeAck {
    async fn after_marked(&self, _job: &herald_protocol::ChannelJob) {
        if !self.fired.swap(true, std::sync::atomic::Ordering::SeqCst) {
            std::future::pending::<()>().await;
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_dying_after_the_send_does_not_send_twice() -> anyhow::Result<()> {
    let nats = Nats::single().await?;
    let apns = Arc::new(Scripted::new("apns", Channel::Push));
    let key = rand_key();
    let hook = Arc::new(DieBeforeAck::default());
    let mut first = with(settings(key), &apns, Limits::default());
    first.hooks = hook.clone();
    let dying = Herald::builder(&nats).channels(first).start().await?;
    device(&dying, "gus", "tok-g").await?;
    let id = push(&dying, "gus", "once").await?;
    eventually(WAIT, "the provider accepted", || async {
        ensure!(
            apns.calls_for(&id).len() == 1 && hook.fired.load(std::sync::atomic::Ordering::SeqCst)
        );
        Ok(())
    })
    .await?;
    drop(dying);
    // A new worker gets the unacked job after the ack wait, finds the marker, acks.
    let second = Herald::builder(&nats)
        .channels(with(settings(key), &apns, Limits::default()))
        .start()
        .await?;
    let js = async_nats::jetstream::new(nats.client().await?);
    eventually(WAIT, "the job is acked", || async {
        let mut stream = js.get_stream("HERALD_WORK_PUSH").await?;
        let n = stream.info().await?.state.messages;
        ensure!(n == 0, "{n} jobs left");
        Ok(())
    })
    .await?;
    assert_eq!(
        apns.calls_for(&id).len(),
        1,
        "sent again after the redelivery"
    );
    let s = second.status(&id).await?;
    assert_eq!(s["channels"]["push"][0]["state"], "sent", "{s}");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn push_is_skipped_when_seen_live_within_the_escalation_delay() -> anyhow::Result<()> {
    let nats = Nats::single().await?;
    let apns = Arc::new(Scripted::new("apns", Channel::Push));
    let mut s = with(settings(rand_key()), &apns, Limits::default());
    s.escalation_delay = Duration::from_secs(2);
    let herald = Herald::builder(&nats).channels(s).start().await?;
    device(&herald, "hal", "tok-h").await?;
    let seen = herald
        .accept(&json!({"user_id": "hal", "title": "seen", "channels": ["inbox", "push"]}))
        .await?;
    // What the gateway writes for {"type":"ack","up_to":seq}.
    let js = async_nats::jetstream::new(nats.client().await?);
    let kv = js
        .get_key_value(herald_protocol::streams::SEEN_BUCKET)
        .await?;
    let token = herald_protocol::UserId::new("hal")?.token();
    kv.put(token.as_str(), seen.seq.to_string().into()).await?;
    let entry = reaches(&herald, &seen.id, "push", "skipped").await?;
    assert!(
        entry["reason"]
            .as_str()
            .unwrap_or_default()
            .starts_with("seen"),
        "{entry}"
    );
    // Not seen: pushed after the delay.
    let unseen = herald
        .accept(&json!({"user_id": "hal", "title": "unseen", "channels": ["inbox", "push"]}))
        .await?;
    reaches(&herald, &unseen.id, "push", "sent").await?;
    let calls = apns.calls();
    assert_eq!(calls.len(), 1, "{calls:?}");
    assert_eq!(calls[0].delivery.id, unseen.id);
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn contact_data_is_validated() -> anyhow::Result<()> {
    let nats = Nats::single().await?;
    let herald = Herald::builder(&nats).start().await?;
    for (body, field) in [
        (json!({"email": "not-an-address"}), "email"),
        (json!({"phone": "0151 1234"}), "phone"),
        (json!({"timezone": "Europe/Berlin; drop"}), "timezone"),
        (json!({"email": 5}), "email"),
    ] {
        let r = contact(&herald, "ivy", body.clone()).await?;
        assert_eq!(r.status(), 400, "{body}");
        let err: Value = r.json().await?;
        assert_eq!(err["error"]["field"], field, "{err}");
    }
    let r = herald
        .user(Method::POST, "/v1/me/devices", "ivy")
        .json(&json!({"platform": "blackberry", "token": "x"}))
        .send()
        .await?;
    assert_eq!(r.status(), 400);
    let ok = contact(&herald, "ivy", json!({"email": "ivy@example.com", "phone": "+14155552671", "locale": "en-US", "timezone": "America/New_York"})).await?;
    assert_eq!(ok.status(), 200);
    // Stored encrypted: the address is nowhere in the bucket's raw messages.
    let js = async_nats::jetstream::new(nats.client().await?);
    let mut stream = js.get_stream("KV_herald_targets").await?;
    let last = stream.info().await?.state.last_sequence;
    let raw = stream.get_raw_message(last).await?;
    let text = String::from_utf8_lossy(&raw.payload);
    ensure!(
        !text.contains("ivy@example.com") && !text.contains("4155552671"),
        "plaintext at rest: {text}"
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn email_reaches_a_real_smtp_server_and_unsubscribe_opts_out() -> anyhow::Result<()> {
    let smtp = SmtpServer::start().await?;
    let nats = Nats::single().await?;
    let mut s = settings(rand_key());
    s.smtp = Some(SmtpSettings {
        url: smtp.url(),
        from: "Herald <noreply@herald.test>".into(),
        pool: 2,
    });
    let herald = Herald::builder(&nats).channels(s).start().await?;
    let r = contact(&herald, "jo", json!({"email": "jo@example.com"})).await?;
    assert_eq!(r.status(), 200);
    let first = herald
        .accept(
            &json!({"user_id": "jo", "category": "marketing", "title": "Sale <today>",
            "body": "50% off & more", "channels": ["inbox", "email"]}),
        )
        .await?;
    reaches(&herald, &first.id, "email", "sent").await?;
    let messages = eventually(WAIT, "one email received", || async {
        let m = smtp.messages()?;
        ensure!(!m.is_empty());
        Ok(m)
    })
    .await?;
    assert_eq!(messages.len(), 1);
    let parsed = mail_parser::MessageParser::default()
        .parse(&messages[0])
        .context("MIME")?;
    assert_eq!(parsed.subject(), Some("Sale <today>"));
    assert_eq!(
        parsed.message_id(),
        Some(format!("{}@herald.test", first.id).as_str())
    );
    assert_eq!(parsed.text_body.len(), 1, "one text part");
    assert_eq!(parsed.html_body.len(), 1, "one html part");
    let text = parsed.body_text(0).context("text part")?;
    assert!(text.contains("50% off & more"), "{text}");
    let html = parsed.body_html(0).context("html part")?;
    assert!(
        html.contains("Sale &lt;today&gt;") && html.contains("50% off &amp; more"),
        "{html}"
    );
    let header = |name: &str| {
        parsed
            .header_raw(name)
            .map(|v| v.trim().to_string())
            .with_context(|| format!("no {name} header"))
    };
    assert_eq!(
        header("List-Unsubscribe-Post")?,
        "List-Unsubscribe=One-Click"
    );
    let link = header("List-Unsubscribe")?;
    let url = link
        .trim_start_matches('<')
        .trim_end_matches('>')
        .replace(['\r', '\n', ' '], "");
    ensure!(url.starts_with(herald.base_url()), "{url}");

    // A tampered token is refused; the real one opts out of marketing email (RFC 8058 POST).
    let tampered = herald
        .http()
        .post(format!("{url}x"))
        .body("List-Unsubscribe=One-Click")
        .send()
        .await?;
    assert_eq!(tampered.status(), 400);
    let r = herald
        .http()
        .post(&url)
        .header("Content-Type", "application/x-www-form-urlencoded")
        .body("List-Unsubscribe=One-Click")
        .send()
        .await?;
    assert_eq!(r.status(), 200, "{}", r.text().await?);

    let second = herald
        .accept(&json!({"user_id": "jo", "category": "marketing", "title": "Another sale", "channels": ["inbox", "email"]}))
        .await?;
    let entry = reaches(&herald, &second.id, "email", "skipped").await?;
    assert!(
        entry["reason"]
            .as_str()
            .unwrap_or_default()
            .contains("opted out"),
        "{entry}"
    );
    let other = herald
        .accept(&json!({"user_id": "jo", "category": "security", "title": "New login", "channels": ["email"]}))
        .await?;
    reaches(&herald, &other.id, "email", "sent").await?;
    let all = eventually(WAIT, "the security email", || async {
        let m = smtp.messages()?;
        ensure!(m.len() >= 2, "{} messages", m.len());
        Ok(m)
    })
    .await?;
    assert_eq!(all.len(), 2, "the opted-out email was not sent");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_provider_failing_every_delivery_ends_in_the_dlq_after_max_deliver() -> anyhow::Result<()>
{
    let nats = Nats::single().await?;
    let apns = Arc::new(Scripted::new("apns", Channel::Push));
    apns.fallback(Answer::Transient);
    // A breaker that never opens: this is about delivery counts, not failover.
    let limits = Limits {
        rate_per_second: None,
        breaker: BreakerConfig {
            consecutive_failures: 1000,
            error_rate: 1.0,
            window: 1000,
            open_for: Duration::from_secs(1),
        },
    };
    let herald = Herald::builder(&nats)
        .channels(with(settings(rand_key()), &apns, limits))
        .start()
        .await?;
    device(&herald, "kim", "tok-k").await?;
    let id = push(&herald, "kim", "doomed").await?;
    let entry = reaches(&herald, &id, "push", "dead_lettered").await?;
    assert_eq!(entry["retries"], 3, "{entry}");
    assert_eq!(apns.calls_for(&id).len(), 4, "MaxDeliver is 4");
    let list = dlq(&herald).await?;
    let letter = &list["items"][0];
    assert_eq!(letter["job"]["id"], id.as_str(), "{list}");
    assert_eq!(letter["reason"], "gave up after 4 failed attempts");
    assert_eq!(letter["attempts"], 4);
    assert!(
        letter["last_response"]
            .as_str()
            .unwrap_or_default()
            .contains("503"),
        "{letter}"
    );
    // Admin only.
    let r = Herald::builder(&nats)
        .key("hk_notify_only_key_0001", &[herald_auth::Scope::Notify])
        .start()
        .await?;
    let denied = r
        .request(Method::GET, "/v1/dlq")
        .bearer_auth("hk_notify_only_key_0001")
        .send()
        .await?;
    assert_eq!(denied.status(), 403);
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_paused_channel_holds_its_jobs_until_resumed() -> anyhow::Result<()> {
    let nats = Nats::single().await?;
    let apns = Arc::new(Scripted::new("apns", Channel::Push));
    let herald = Herald::builder(&nats)
        .channels(with(settings(rand_key()), &apns, Limits::default()))
        .start()
        .await?;
    device(&herald, "lou", "tok-l").await?;
    let r = herald
        .producer(Method::POST, "/v1/channels/push/pause")
        .json(&json!({"for_seconds": 600}))
        .send()
        .await?;
    assert_eq!(r.status(), 200);
    let id = push(&herald, "lou", "during the outage").await?;
    let js = async_nats::jetstream::new(nats.client().await?);
    let stream = js.get_stream_no_info("HERALD_WORK_PUSH").await?;
    eventually(WAIT, "the job waits on the paused consumer", || async {
        let mut consumer: async_nats::jetstream::consumer::PullConsumer = stream
            .get_consumer("herald-worker-push-normal")
            .await
            .map_err(|e| anyhow::anyhow!("{e}"))?;
        let info = consumer.info().await?;
        ensure!(info.paused, "not paused: {info:?}");
        ensure!(info.num_pending == 1, "{} pending", info.num_pending);
        Ok(())
    })
    .await?;
    assert!(apns.calls_for(&id).is_empty(), "sent while paused");
    let r = herald
        .producer(Method::POST, "/v1/channels/push/resume")
        .send()
        .await?;
    assert_eq!(r.status(), 200);
    reaches(&herald, &id, "push", "sent").await?;
    let bad = herald
        .producer(Method::POST, "/v1/channels/inbox/pause")
        .send()
        .await?;
    assert_eq!(bad.status(), 400);
    Ok(())
}

/// Pauses push and waits until `n` jobs wait on its normal lane.
async fn pause_push_until(nats: &Nats, n: u64) -> anyhow::Result<()> {
    let js = async_nats::jetstream::new(nats.client().await?);
    let stream = js.get_stream_no_info("HERALD_WORK_PUSH").await?;
    eventually(
        WAIT,
        &format!("{n} jobs wait on the paused consumer"),
        || async {
            let mut consumer: async_nats::jetstream::consumer::PullConsumer = stream
                .get_consumer("herald-worker-push-normal")
                .await
                .map_err(|e| anyhow::anyhow!("{e}"))?;
            let info = consumer.info().await?;
            ensure!(info.paused, "not paused: {info:?}");
            ensure!(info.num_pending == n, "{} pending", info.num_pending);
            Ok(())
        },
    )
    .await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_batch_with_permanent_failures_dead_letters_exactly_those() -> anyhow::Result<()> {
    let nats = Nats::single().await?;
    let apns = Arc::new(Scripted::new("apns", Channel::Push));
    let mut s = settings(rand_key());
    // Room for the whole backlog in one pulled batch.
    s.concurrency = 32;
    let herald = Herald::builder(&nats)
        .channels(with(s, &apns, Limits::default()))
        .start()
        .await?;
    for user in ["bo", "di", "ev"] {
        device(&herald, user, &format!("tok-{user}")).await?;
    }
    let r = herald
        .producer(Method::POST, "/v1/channels/push/pause")
        .json(&json!({"for_seconds": 600}))
        .send()
        .await?;
    assert_eq!(r.status(), 200);
    let mut ids = Vec::new();
    for i in 0..12 {
        let user = ["bo", "di", "ev"][i % 3];
        let title = format!("batch {i}");
        if i % 4 == 1 {
            apns.answer_title(&title, Answer::Permanent);
        }
        ids.push((i, push(&herald, user, &title).await?));
    }
    pause_push_until(&nats, 12).await?;
    let r = herald
        .producer(Method::POST, "/v1/channels/push/resume")
        .send()
        .await?;
    assert_eq!(r.status(), 200);
    for (i, id) in &ids {
        let state = if i % 4 == 1 { "dead_lettered" } else { "sent" };
        reaches(&herald, id, "push", state).await?;
        assert_eq!(apns.calls_for(id).len(), 1, "batch {i} sent once");
    }
    let list = dlq(&herald).await?;
    let mut dead: Vec<String> = list["items"]
        .as_array()
        .context("items")?
        .iter()
        .filter_map(|l| l["job"]["id"].as_str().map(str::to_string))
        .collect();
    dead.sort();
    let mut expected: Vec<String> = ids
        .iter()
        .filter(|(i, _)| i % 4 == 1)
        .map(|(_, id)| id.clone())
        .collect();
    expected.sort();
    assert_eq!(dead, expected, "exactly the failing jobs are dead letters");
    let sent = herald.status(&ids[0].1).await?;
    let entry = &sent["channels"]["push"][0];
    assert_eq!(entry["provider"], "apns", "{sent}");
    assert_eq!(
        entry["provider_message_id"],
        format!("apns-{}", ids[0].1),
        "{sent}"
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn smtp_answers_are_classified_unknown_mailbox_removed_and_4xx_retried() -> anyhow::Result<()>
{
    let smtp = SmtpServer::start_rejecting().await?;
    let nats = Nats::single().await?;
    let mut s = settings(rand_key());
    s.smtp = Some(SmtpSettings {
        url: smtp.url(),
        from: "noreply@herald.test".into(),
        pool: 2,
    });
    let herald = Herald::builder(&nats).channels(s).start().await?;
    let email = |user: &'static str| {
        let herald = &herald;
        async move {
            herald
                .accept(&json!({"user_id": user, "title": "hi", "channels": ["email"]}))
                .await
        }
    };
    // 550 5.1.1: the address is invalid, removed, and the job ends.
    contact(&herald, "gone", json!({"email": "gone@example.com"})).await?;
    let first = email("gone").await?;
    let entry = reaches(&herald, &first.id, "email", "failed").await?;
    assert!(
        entry["reason"].as_str().unwrap_or_default().contains("550"),
        "{entry}"
    );
    let next = email("gone").await?;
    let entry = reaches(&herald, &next.id, "email", "skipped").await?;
    assert_eq!(entry["target"], "none", "the address was removed: {entry}");
    // 451: transient, retried until MaxDeliver, then dead-lettered with the answer.
    contact(&herald, "busy", json!({"email": "busy@example.com"})).await?;
    let busy = email("busy").await?;
    let entry = reaches(&herald, &busy.id, "email", "dead_lettered").await?;
    assert_eq!(entry["retries"], 3, "{entry}");
    assert!(
        entry["reason"].as_str().unwrap_or_default().contains("451"),
        "{entry}"
    );
    // 451 4.7.1, a rate limit: throttled, not a failure of the relay.
    contact(&herald, "flood", json!({"email": "flood@example.com"})).await?;
    let flood = email("flood").await?;
    let entry = reaches(&herald, &flood.id, "email", "retrying").await?;
    assert!(
        entry["reason"]
            .as_str()
            .unwrap_or_default()
            .contains("4.7.1"),
        "{entry}"
    );
    let text = herald.metrics().await?;
    let throttled = crate::metrics::sample(
        &text,
        "herald_provider_sends_total{provider=\"smtp\",result=\"throttled\"}",
    );
    assert!(throttled.is_some_and(|n| n >= 1.0), "{throttled:?}");
    assert!(smtp.messages()?.is_empty(), "nothing was accepted");
    Ok(())
}

/// The push `normal` lane's consumer as the server sees it: its delivery sequence counts
/// every delivery, redeliveries included.
async fn push_normal_consumer(
    herald: &Herald,
) -> anyhow::Result<async_nats::jetstream::consumer::Info> {
    let js = async_nats::jetstream::new(herald.nats_client().await?);
    let mut consumer: async_nats::jetstream::consumer::PullConsumer = js
        .get_stream(herald_protocol::streams::work_stream_name(Channel::Push))
        .await?
        .get_consumer(&herald_protocol::streams::worker_consumer(
            Channel::Push,
            herald_protocol::Priority::Normal,
        ))
        .await
        .map_err(|e| anyhow::anyhow!("the push consumer: {e}"))?;
    Ok(consumer.info().await?.clone())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_job_waiting_behind_a_slow_bucket_is_not_redelivered() -> anyhow::Result<()> {
    let nats = Nats::single().await?;
    let apns = Arc::new(Scripted::new("apns", Channel::Push));
    // One send per second, and an ack wait of one second: the fourth job of a batch
    // waits three ack waits for its token.
    let limits = Limits {
        rate_per_second: std::num::NonZeroU32::new(1),
        ..Limits::default()
    };
    let mut s = with(settings(rand_key()), &apns, limits);
    s.queue.ack_wait = Duration::from_secs(1);
    s.concurrency = 8;
    let herald = Herald::builder(&nats).channels(s).start().await?;
    device(&herald, "kim", "tok-k").await?;
    let mut ids = Vec::new();
    for i in 0..4 {
        ids.push(push(&herald, "kim", &format!("n{i}")).await?);
    }
    for id in &ids {
        let entry = reaches(&herald, id, "push", "sent").await?;
        assert_eq!(entry["retries"], 0, "{entry}");
        assert_eq!(apns.calls_for(id).len(), 1, "{id} sent once");
    }
    let info = push_normal_consumer(&herald).await?;
    assert_eq!(
        info.delivered.consumer_sequence, 4,
        "four jobs, four deliveries: none was redelivered while it waited ({info:?})"
    );
    Ok(())
}

/// More jobs than slots, behind a slow bucket, on two workers: a worker pulls only as
/// many jobs as it has free slots, so no job waits unannounced in a client buffer past
/// `AckWait` to be delivered to the other worker as well, and sent twice.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn jobs_beyond_the_free_slots_stay_queued_not_redelivered() -> anyhow::Result<()> {
    let nats = Nats::single().await?;
    let apns = Arc::new(Scripted::new("apns", Channel::Push));
    // Two slots per worker at two sends a second, and an ack wait of one second: a job
    // held for a slot behind two others waits longer than that.
    let limits = Limits {
        rate_per_second: std::num::NonZeroU32::new(2),
        ..Limits::default()
    };
    // Both workers decrypt the same targets.
    let key = rand_key();
    let worker = || {
        let mut s = with(settings(key), &apns, limits);
        s.queue.ack_wait = Duration::from_secs(1);
        s.concurrency = 2;
        s
    };
    let herald = Herald::builder(&nats).channels(worker()).start().await?;
    let _second = Herald::builder(&nats).channels(worker()).start().await?;
    const JOBS: usize = 12;
    let mut ids = Vec::new();
    for i in 0..JOBS {
        let user = format!("u{i}");
        device(&herald, &user, &format!("tok-{i}")).await?;
        ids.push(push(&herald, &user, &format!("n{i}")).await?);
    }
    for id in &ids {
        let entry = reaches(&herald, id, "push", "sent").await?;
        assert_eq!(entry["retries"], 0, "{entry}");
    }
    for id in &ids {
        assert_eq!(apns.calls_for(id).len(), 1, "{id} sent once");
    }
    let info = push_normal_consumer(&herald).await?;
    assert_eq!(
        info.delivered.consumer_sequence, JOBS as u64,
        "one delivery per job: none was redelivered while it waited ({info:?})"
    );
    Ok(())
}

/// `GET /v1/notifications/{id}` takes notification ids (UUIDs, any spelling) and answers
/// anything else with a 400 naming `id`, before NATS: a key of kilobytes in a direct-get
/// subject would overflow the protocol line and cost the process its NATS connection.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn delivery_status_takes_only_notification_ids() -> anyhow::Result<()> {
    let nats = Nats::single().await?;
    let apns = Arc::new(Scripted::new("apns", Channel::Push));
    let herald = Herald::builder(&nats)
        .channels(with(settings(rand_key()), &apns, Limits::default()))
        .start()
        .await?;
    device(&herald, "ida", "tok-i").await?;
    let id = push(&herald, "ida", "otp").await?;
    reaches(&herald, &id, "push", "sent").await?;
    for bad in [
        "a".repeat(5_000),
        "not-an-id".to_string(),
        "x.y.>".to_string(),
    ] {
        let r = herald
            .producer(Method::GET, &format!("/v1/notifications/{bad}"))
            .send()
            .await?;
        ensure!(
            r.status() == 400,
            "{}: {}",
            &bad[..bad.len().min(20)],
            r.status()
        );
        let body: Value = r.json().await?;
        ensure!(body["error"]["field"] == "id", "{body}");
    }
    // The connection is whole, and an upper-case spelling names the same notification.
    let again = herald.status(&id.to_uppercase()).await?;
    ensure!(again["id"] == json!(id), "{again}");
    Ok(())
}

/// A critical category's email (an OTP, a security alert) carries no `List-Unsubscribe`:
/// critical categories ignore opt-outs, so a one-click unsubscribe would answer
/// "unsubscribed" and change nothing. Other categories keep it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn critical_emails_offer_no_unsubscribe_they_could_not_honour() -> anyhow::Result<()> {
    use herald_protocol::preferences::{CategoryRule, Policy};
    let smtp = SmtpServer::start().await?;
    let nats = Nats::single().await?;
    let mut s = settings(rand_key());
    s.smtp = Some(SmtpSettings {
        url: smtp.url(),
        from: "Herald <noreply@herald.test>".into(),
        pool: 2,
    });
    let critical = CategoryRule {
        critical: true,
        ..Default::default()
    };
    let policy = Policy::new(
        [
            ("security".to_owned(), critical),
            ("news".to_owned(), CategoryRule::default()),
        ]
        .into_iter()
        .collect(),
    );
    let herald = Herald::builder(&nats)
        .policy(policy)
        .channels(s)
        .start()
        .await?;
    let r = contact(&herald, "kim", json!({"email": "kim@example.com"})).await?;
    assert_eq!(r.status(), 200);
    for (category, title) in [("security", "New login"), ("news", "Weekly news")] {
        let n = herald
            .accept(&json!({"user_id": "kim", "category": category, "title": title, "channels": ["email"]}))
            .await?;
        reaches(&herald, &n.id, "email", "sent").await?;
    }
    let messages = eventually(WAIT, "two emails received", || async {
        let m = smtp.messages()?;
        ensure!(m.len() >= 2, "{} messages", m.len());
        Ok(m)
    })
    .await?;
    for raw in &messages {
        let parsed = mail_parser::MessageParser::default()
            .parse(raw)
            .context("MIME")?;
        let has_link = parsed.header_raw("List-Unsubscribe").is_some();
        match parsed.subject() {
            Some("New login") => ensure!(!has_link, "the critical email offers an unsubscribe"),
            Some("Weekly news") => ensure!(has_link, "the news email lost its unsubscribe"),
            other => anyhow::bail!("unexpected email {other:?}"),
        }
    }
    Ok(())
}

/// The signing secret of the webhook tests' receivers.
const WEBHOOK_SECRET: &str = "a-webhook-secret-of-some-length";

/// A Herald whose webhook channel is the real webhook provider with `limits`, and two
/// users whose webhooks go to `receivers` (one each, in order).
async fn webhook_herald(
    nats: &Nats,
    limits: Limits,
    receivers: [(&str, &herald_fakes::webhook::WebhookReceiver); 2],
) -> anyhow::Result<Herald> {
    use herald_channels::webhook::{WebhookConfig, WebhookProvider};
    let mut s = settings(rand_key());
    let provider: Arc<dyn Provider> = Arc::new(WebhookProvider::new(&WebhookConfig {
        secret: WEBHOOK_SECRET.into(),
        http: Default::default(),
    })?);
    s.extra_providers.push((provider, limits));
    let herald = Herald::builder(nats).channels(s).start().await?;
    for (user, receiver) in receivers {
        let r = contact(&herald, user, json!({"webhook": receiver.url("/hook")})).await?;
        ensure!(r.status() == 200, "contact: {}", r.status());
    }
    Ok(herald)
}

/// A webhook receiver answering 503 with a long `Retry-After` holds back its own jobs
/// only: the webhook "provider" is every producer's receiver at once, so it is never
/// paused for one of them, and another receiver's webhook goes out at once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_receivers_retry_after_never_holds_back_another_receivers_webhooks()
-> anyhow::Result<()> {
    use herald_fakes::Reply;
    use herald_fakes::webhook::WebhookReceiver;
    let down = WebhookReceiver::start(WEBHOOK_SECRET).await?;
    down.script()
        .push(100, Reply::status(503).header("retry-after", "600"));
    let up = WebhookReceiver::start(WEBHOOK_SECRET).await?;
    let nats = Nats::single().await?;
    let herald = webhook_herald(&nats, Limits::default(), [("wanda", &down), ("wes", &up)]).await?;
    let held = herald
        .accept(&json!({"user_id": "wanda", "title": "to the receiver that is down", "channels": ["webhook"]}))
        .await?;
    eventually(WAIT, "the first receiver answered 503", || async {
        ensure!(down.received_count() >= 1);
        Ok(())
    })
    .await?;
    let other = herald
        .accept(&json!({"user_id": "wes", "title": "to the receiver that is up", "channels": ["webhook"]}))
        .await?;
    reaches(&herald, &other.id, "webhook", "sent").await?;
    let entry = reaches(&herald, &held.id, "webhook", "retrying").await?;
    ensure!(
        down.received_count() == 1,
        "retried before its Retry-After: {entry}"
    );
    Ok(())
}

/// One receiver down (every webhook to it a 500) does not open the circuit every
/// producer's webhooks go through: the webhook "provider" is all receivers at once, so
/// only that receiver's jobs back off, and another receiver's webhooks go out.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_receiver_down_never_opens_the_circuit_for_every_webhook() -> anyhow::Result<()> {
    use herald_fakes::Reply;
    use herald_fakes::webhook::WebhookReceiver;
    let down = WebhookReceiver::start(WEBHOOK_SECRET).await?;
    down.script().push(1_000, Reply::status(500));
    let up = WebhookReceiver::start(WEBHOOK_SECRET).await?;
    let nats = Nats::single().await?;
    // A circuit that would open after two failures in a row, for a minute.
    let limits = breaker_opening_after(2, Duration::from_secs(60));
    let herald = webhook_herald(&nats, limits, [("vic", &down), ("val", &up)]).await?;
    for i in 0..4 {
        herald
            .accept(
                &json!({"user_id": "vic", "title": format!("down {i}"), "channels": ["webhook"]}),
            )
            .await?;
    }
    eventually(
        WAIT,
        "four failures at the receiver that is down",
        || async {
            ensure!(down.received_count() >= 4, "{}", down.received_count());
            Ok(())
        },
    )
    .await?;
    let other = herald
        .accept(&json!({"user_id": "val", "title": "to the receiver that is up", "channels": ["webhook"]}))
        .await?;
    reaches(&herald, &other.id, "webhook", "sent").await?;
    Ok(())
}

/// A letter retried from the DLQ whose job fails for good again is listed again: its
/// identity is the work-queue message it came from, so JetStream does not drop the second
/// letter as a duplicate of the first within its duplicate window (the job was then
/// terminated, in no queue and in no dead letter).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_job_dead_lettered_again_after_a_retry_is_listed_again() -> anyhow::Result<()> {
    let nats = Nats::single().await?;
    let apns = Arc::new(Scripted::new("apns", Channel::Push));
    apns.script([Answer::Permanent, Answer::Permanent]);
    let herald = Herald::builder(&nats)
        .channels(with(settings(rand_key()), &apns, Limits::default()))
        .start()
        .await?;
    device(&herald, "dora", "tok-d").await?;
    let id = push(&herald, "dora", "still a bad payload").await?;
    reaches(&herald, &id, "push", "dead_lettered").await?;
    let first = dead_letter_of(&herald, &id).await?["dlq_id"]
        .as_u64()
        .context("dlq_id")?;
    let retry = |dlq_id: u64| {
        let herald = &herald;
        async move {
            let r = herald
                .producer(Method::POST, &format!("/v1/dlq/{dlq_id}/retry"))
                .send()
                .await?;
            ensure!(r.status() == 202, "retry {dlq_id}: {}", r.status());
            anyhow::Ok(())
        }
    };
    retry(first).await?;
    let second = eventually(WAIT, "the job dead-lettered again, listed", || async {
        let letter = dead_letter_of(&herald, &id).await?;
        let dlq_id = letter["dlq_id"].as_u64().context("dlq_id")?;
        ensure!(dlq_id != first, "only the first letter: {letter}");
        ensure!(letter["reason"] == "permanent provider error", "{letter}");
        Ok(dlq_id)
    })
    .await?;
    assert_eq!(apns.calls_for(&id).len(), 2, "sent once per delivery");
    // And it can be retried again, to be sent this time.
    retry(second).await?;
    reaches(&herald, &id, "push", "sent").await?;
    assert_eq!(apns.calls_for(&id).len(), 3);
    Ok(())
}

/// While the only provider of a channel is paused by its throttle (429 with
/// `Retry-After`), the lanes pull nothing: no queued job is pulled only to be deferred
/// (a status write and one of its spare deliveries, for nothing). When the pause ends
/// every job is sent.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_throttle_of_the_only_provider_pulls_nothing_until_it_ends() -> anyhow::Result<()> {
    const PAUSE: Duration = Duration::from_secs(10);
    let nats = Nats::single().await?;
    let twilio = Arc::new(Scripted::new("twilio", Channel::Sms));
    twilio.script([Answer::Throttled(PAUSE)]);
    let herald = Herald::builder(&nats)
        .channels(with(settings(rand_key()), &twilio, Limits::default()))
        .start()
        .await?;
    let r = contact(&herald, "theo", json!({"phone": "+4915112345679"})).await?;
    ensure!(r.status() == 200, "contact: {}", r.status());
    let sms = |title: String| {
        let herald = &herald;
        async move {
            anyhow::Ok(
                herald
                    .accept(&json!({"user_id": "theo", "title": title, "channels": ["sms"]}))
                    .await?
                    .id,
            )
        }
    };
    let told = sms("told".into()).await?;
    eventually(WAIT, "the provider throttled the first", || async {
        ensure!(!twilio.calls().is_empty());
        Ok(())
    })
    .await?;
    let throttled_at = twilio.calls()[0].at;
    let mut queued = Vec::new();
    for i in 0..60 {
        queued.push(sms(format!("queued {i}")).await?);
    }
    ensure!(
        throttled_at.elapsed() < PAUSE - Duration::from_secs(2),
        "queueing took too long for the test to mean anything"
    );
    for id in queued.iter().chain([&told]) {
        reaches(&herald, id, "sms", "sent").await?;
    }
    let mut deferred = Vec::new();
    for id in &queued {
        let s = herald.status(id).await?;
        let history = &s["channels"]["sms"][0]["history"];
        let steps = history.as_array().context("history")?;
        if steps.iter().any(|step| step["state"] == "deferred") {
            deferred.push(id.clone());
        }
    }
    ensure!(
        deferred.is_empty(),
        "{} of {} queued jobs were pulled and deferred during the pause: {deferred:?}",
        deferred.len(),
        queued.len()
    );
    let during: Vec<_> = twilio.calls()[1..]
        .iter()
        .filter(|c| c.at < throttled_at + PAUSE - Duration::from_millis(500))
        .map(|c| c.delivery.id.clone())
        .collect();
    ensure!(during.is_empty(), "called during its pause: {during:?}");
    Ok(())
}

/// APNs 429 `TooManyRequests` is about one device token: the job for it waits, but the
/// provider is not paused, so a push to another device goes out at once, not deferred
/// for as long as the hot device was told to wait.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_devices_throttle_never_holds_back_another_devices_push() -> anyhow::Result<()> {
    use herald_channels::HttpOptions;
    use herald_channels::apns::{ApnsConfig, ApnsProvider};
    use herald_fakes::apns::{ApnsFake, error_reply};
    const TOPIC: &str = "com.example.herald";
    const HOT: &str = "a3f1c2d4e5f60718293a4b5c6d7e8f90a1b2c3d4e5f60718293a4b5c6d7e8f90";
    const CALM: &str = "b3f1c2d4e5f60718293a4b5c6d7e8f90a1b2c3d4e5f60718293a4b5c6d7e8f90";
    // Long enough that a paused provider could not have sent the calm push in time.
    const HOT_WAIT: Duration = Duration::from_secs(30);
    let fake = ApnsFake::start(TOPIC).await?;
    fake.script().push(
        1,
        error_reply(429, "TooManyRequests").header("retry-after", "30"),
    );
    let provider: Arc<dyn Provider> = Arc::new(ApnsProvider::new(&ApnsConfig {
        base_url: fake.url(),
        key_pem: fake.p8_pem().as_bytes().to_vec(),
        key_id: fake.key_id().into(),
        team_id: fake.team_id().into(),
        topic: TOPIC.into(),
        http: HttpOptions {
            timeout: Duration::from_secs(5),
            extra_root_pem: Some(fake.ca_pem().as_bytes().to_vec()),
        },
    })?);
    let nats = Nats::single().await?;
    let mut s = settings(rand_key());
    s.extra_providers.push((provider, Limits::default()));
    let herald = Herald::builder(&nats).channels(s).start().await?;
    device(&herald, "hana", HOT).await?;
    device(&herald, "cole", CALM).await?;
    let hot = push(&herald, "hana", "one push too many").await?;
    let entry = reaches(&herald, &hot, "push", "retrying").await?;
    ensure!(
        entry["reason"]
            .as_str()
            .unwrap_or_default()
            .contains("TooManyRequests"),
        "{entry}"
    );
    let told_at = std::time::Instant::now();
    let calm = push(&herald, "cole", "a push to another device").await?;
    let entry = reaches(&herald, &calm, "push", "sent").await?;
    ensure!(
        told_at.elapsed() < HOT_WAIT / 2,
        "the other device waited {:?}, as long as the hot device's throttle",
        told_at.elapsed()
    );
    let steps = entry["history"].as_array().context("history")?;
    ensure!(
        !steps.iter().any(|step| step["state"] == "deferred"),
        "the other device's push was deferred: {entry}"
    );
    ensure!(
        fake.received()
            .iter()
            .filter(|r| r.device_token == HOT)
            .count()
            == 1,
        "the hot device was pushed to again before its Retry-After"
    );
    Ok(())
}

/// A provider that records when each call began and whether it ended, answering after
/// a delay (each call is under way for a while).
struct Slow {
    delay: Duration,
    began: std::sync::Mutex<Vec<(String, std::time::Instant)>>,
    ended: std::sync::Mutex<Vec<String>>,
}

#[async_trait::async_trait]
impl Provider for Slow {
    fn name(&self) -> &str {
        "slow-sms"
    }
    fn channel(&self) -> Channel {
        Channel::Sms
    }
    fn accepts(&self, target: &herald_channels::Target) -> bool {
        matches!(target, herald_channels::Target::Phone { .. })
    }
    async fn send(
        &self,
        delivery: &herald_channels::Delivery,
    ) -> Result<herald_channels::Sent, herald_channels::SendError> {
        let now = std::time::Instant::now();
        self.began
            .lock()
            .expect("began")
            .push((delivery.id.clone(), now));
        tokio::time::sleep(self.delay).await;
        self.ended.lock().expect("ended").push(delivery.id.clone());
        Ok(herald_channels::Sent {
            provider_message_id: Some(delivery.id.clone()),
        })
    }
}

/// A graceful stop begins no provider call: jobs waiting for the provider's token
/// bucket go back to the queue, the calls under way end and are marked, and after a
/// restart every job is sent exactly once. (Calls begun during the drain could be cut off
/// when it ends, after the provider accepted them, and be sent again.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_graceful_stop_begins_no_provider_call_and_sends_nothing_twice() -> anyhow::Result<()> {
    let nats = Nats::single().await?;
    let slow = Arc::new(Slow {
        delay: Duration::from_millis(400),
        began: Default::default(),
        ended: Default::default(),
    });
    let mut s = settings(rand_key());
    s.concurrency = 8;
    let limits = Limits {
        rate_per_second: std::num::NonZeroU32::new(3),
        ..Limits::default()
    };
    s.extra_providers.push((slow.clone(), limits));
    let mut herald = Herald::builder(&nats).channels(s).start().await?;
    let r = contact(&herald, "stan", json!({"phone": "+4915112345670"})).await?;
    ensure!(r.status() == 200, "contact: {}", r.status());
    let mut ids = Vec::new();
    for i in 0..24 {
        ids.push(
            herald
                .accept(
                    &json!({"user_id": "stan", "title": format!("sms {i}"), "channels": ["sms"]}),
                )
                .await?
                .id,
        );
    }
    eventually(WAIT, "a few calls under way", || async {
        let began = slow.began.lock().expect("began").len();
        ensure!(began >= 3, "{began} calls");
        Ok(())
    })
    .await?;
    let stopping = std::time::Instant::now();
    herald.stop().await?;
    let began = slow.began.lock().expect("began").clone();
    let late: Vec<_> = began
        .iter()
        .filter(|(_, at)| *at > stopping + Duration::from_millis(300))
        .map(|(id, at)| (id.clone(), at.duration_since(stopping)))
        .collect();
    ensure!(
        late.is_empty(),
        "provider calls begun during the drain: {late:?}"
    );
    ensure!(
        slow.ended.lock().expect("ended").len() == began.len(),
        "a call under way was cut off by the stop"
    );
    ensure!(
        began.len() < ids.len(),
        "everything was sent before the stop"
    );

    herald.start_again().await?;
    for id in &ids {
        reaches(&herald, id, "sms", "sent").await?;
    }
    let began = slow.began.lock().expect("began").clone();
    for id in &ids {
        let calls = began.iter().filter(|(i, _)| i == id).count();
        ensure!(calls == 1, "{id} was sent {calls} times");
    }
    Ok(())
}
