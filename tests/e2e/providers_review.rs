//! Provider clients end to end, through the real Twilio and Vonage clients and their
//! fakes: an answer that refuses our configuration, not the message, must fail the
//! channel over to its next provider instead of dead-lettering every message.

use anyhow::{Context as _, ensure};
use herald::channels::ChannelSettings;
use herald_channels::twilio::{TwilioConfig, TwilioProvider};
use herald_channels::vonage::{VonageConfig, VonageProvider};
use herald_channels::{HttpOptions, Provider};
use herald_fakes::twilio::{TwilioFake, error_reply};
use herald_fakes::vonage::VonageFake;
use herald_tests::herald::rand_key;
use herald_tests::{Herald, Nats, eventually};
use herald_worker::Limits;
use herald_worker::backoff::Backoff;
use herald_worker::breaker::BreakerConfig;
use reqwest::Method;
use serde_json::{Value, json};
use std::sync::Arc;
use std::time::Duration;

const WAIT: Duration = Duration::from_secs(30);

/// Fast retries, short ack wait, no escalation delay, small pools (as in `channels`).
fn settings() -> ChannelSettings {
    let mut s = ChannelSettings::new(rand_key());
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

/// A circuit that opens after two failures in a row and stays open a minute.
fn limits() -> Limits {
    Limits {
        rate_per_second: None,
        breaker: BreakerConfig {
            consecutive_failures: 2,
            error_rate: 1.0,
            window: 10,
            open_for: Duration::from_secs(60),
        },
    }
}

/// Twilio refusing our `From` (code 21212, on every send) says nothing about the
/// messages: each is retried and the failures open Twilio's circuit, so Vonage takes
/// over and every message is sent — none is dead-lettered.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refused_twilio_sender_fails_over_to_vonage_instead_of_dead_lettering()
-> anyhow::Result<()> {
    let twilio_fake = TwilioFake::start().await?;
    twilio_fake.script().push(
        1_000,
        error_reply(
            400,
            21212,
            "The 'From' number +15005550006 is not a valid phone number",
        ),
    );
    let vonage_fake = VonageFake::start().await?;
    let twilio: Arc<dyn Provider> = Arc::new(TwilioProvider::new(&TwilioConfig {
        base_url: twilio_fake.url(),
        account_sid: twilio_fake.account_sid().into(),
        auth_token: twilio_fake.auth_token().into(),
        from: "+15005550006".into(),
        http: HttpOptions::default(),
    })?);
    let vonage: Arc<dyn Provider> = Arc::new(VonageProvider::new(&VonageConfig {
        base_url: vonage_fake.url(),
        api_key: vonage_fake.api_key().into(),
        api_secret: vonage_fake.api_secret().into(),
        from: "Herald".into(),
        http: HttpOptions::default(),
    })?);
    let mut s = settings();
    s.extra_providers.push((twilio, limits()));
    s.extra_providers.push((vonage, limits()));
    let nats = Nats::single().await?;
    let herald = Herald::builder(&nats).channels(s).start().await?;
    let r = herald
        .producer(Method::PUT, "/v1/users/fay/contact")
        .json(&json!({"phone": "+4915112345678"}))
        .send()
        .await?;
    ensure!(r.status() == 200, "contact: {}", r.status());
    let mut ids = Vec::new();
    for i in 0..4 {
        ids.push(
            herald
                .accept(
                    &json!({"user_id": "fay", "title": format!("code {i}"), "channels": ["sms"]}),
                )
                .await?
                .id,
        );
    }
    for id in &ids {
        let entry = eventually(WAIT, &format!("{id} sent"), || async {
            let s = herald.status(id).await?;
            let entry = s["channels"]["sms"][0].clone();
            ensure!(
                entry["state"] != "dead_lettered",
                "a refused sender dead-lettered the message: {s}"
            );
            ensure!(entry["state"] == "sent", "status now {s}");
            Ok(entry)
        })
        .await?;
        ensure!(entry["provider"] == "vonage", "{entry}");
    }
    ensure!(
        vonage_fake.accepted().len() == ids.len(),
        "vonage accepted {} of {}",
        vonage_fake.accepted().len(),
        ids.len()
    );
    ensure!(
        twilio_fake.received_count() >= 2,
        "the circuit opened without Twilio's answers"
    );
    let dlq: Value = herald
        .producer(Method::GET, "/v1/dlq")
        .send()
        .await?
        .json()
        .await?;
    let letters = dlq["items"].as_array().context("items")?;
    ensure!(letters.is_empty(), "dead letters: {dlq}");
    Ok(())
}
