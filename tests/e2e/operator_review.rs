//! Operator-side review findings, end to end: a channel that has no provider configured.

use anyhow::{Context as _, ensure};
use futures::TryStreamExt as _;
use herald::channels::ChannelSettings;
use herald_channels::Provider;
use herald_protocol::Channel;
use herald_tests::herald::rand_key;
use herald_tests::scripted::Scripted;
use herald_tests::{Herald, Nats, eventually};
use herald_worker::Limits;
use reqwest::Method;
use serde_json::{Value, json};
use std::sync::Arc;
use std::time::Duration;

const WAIT: Duration = Duration::from_secs(30);

/// A worker for SMS with no SMS provider used to pull every SMS job and dead-letter it
/// ("no provider of the channel accepts this target") without calling anyone. A mesh asked
/// to work SMS and push, with a push provider only, now runs the push worker alone: the
/// SMS job stays queued, pulled by nobody, and is not in the dead-letter stream.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_channel_without_a_provider_gets_no_worker_and_keeps_its_jobs() -> anyhow::Result<()> {
    let nats = Nats::single().await?;
    let apns = Arc::new(Scripted::new("apns", Channel::Push));
    let mut s = ChannelSettings::new(rand_key());
    s.escalation_delay = Duration::ZERO;
    s.concurrency = 4;
    s.channels = Some(vec![Channel::Push, Channel::Sms]);
    let p: Arc<dyn Provider> = apns.clone();
    s.extra_providers.push((p, Limits::default()));
    let herald = Herald::builder(&nats).channels(s).start().await?;

    let r = herald
        .user(Method::POST, "/v1/me/devices", "olga")
        .json(&json!({"platform": "ios", "token": "tok-olga"}))
        .send()
        .await?;
    ensure!(r.status().is_success(), "device: {}", r.status());
    let r = herald
        .producer(Method::PUT, "/v1/users/olga/contact")
        .json(&json!({"phone": "+4915112345678"}))
        .send()
        .await?;
    ensure!(r.status() == 200, "contact: {}", r.status());
    let id = herald
        .accept(&json!({"user_id": "olga", "title": "code 1234", "channels": ["push", "sms"]}))
        .await?
        .id;

    // The workers run and the notification was routed: its push went out, and its SMS job
    // was queued beside it.
    let routed = eventually(WAIT, "push sent", || async {
        let s = herald.status(&id).await?;
        ensure!(
            s["channels"]["push"][0]["state"] == "sent",
            "status now {s}"
        );
        Ok(s)
    })
    .await?;
    assert_eq!(routed["channels"]["sms"][0]["state"], "queued", "{routed}");

    // Nobody pulls SMS: no consumer of its queue has delivered anything or waits for a job.
    let js = async_nats::jetstream::new(herald.nats_client().await?);
    let mut stream = js
        .get_stream(herald_protocol::streams::work_stream_name(Channel::Sms))
        .await?;
    let info = stream.info().await?;
    assert_eq!(info.state.messages, 1, "the SMS job waits in its queue");
    let consumers: Vec<_> = stream.consumers().try_collect().await?;
    ensure!(!consumers.is_empty(), "the SMS lanes are provisioned");
    for c in &consumers {
        assert_eq!(c.delivered.stream_sequence, 0, "{} delivered a job", c.name);
        assert_eq!(c.num_waiting, 0, "{} has a worker pulling", c.name);
    }
    // And it was not dead-lettered.
    let dlq: Value = herald
        .producer(Method::GET, "/v1/dlq")
        .send()
        .await?
        .json()
        .await?;
    let letters = dlq["items"].as_array().context("items")?;
    assert!(letters.is_empty(), "{dlq}");
    assert_eq!(
        herald.status(&id).await?["channels"]["sms"][0]["state"],
        "queued"
    );
    Ok(())
}
