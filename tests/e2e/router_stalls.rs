//! What the router can never do must not hold up a partition's lane: it retries a
//! notification in place (moving on would break per-user order), so anything it retries
//! that cannot succeed stalls every user behind it. A digest email too big for the email
//! work queue is bounded, or recorded `failed` when the queue still refuses it; a contact
//! record sealed with a key the process no longer has fails its own channels only.
//!
//! Every test runs one partition, so the user behind shares the stuck user's lane.

use anyhow::{Context as _, ensure};
use herald::channels::{ChannelSettings, SmtpSettings};
use herald_protocol::Policy;
use herald_protocol::digest::DigestSettings;
use herald_protocol::preferences::CategoryRule;
use herald_store::targets::{Contact, ContactKeys, Targets};
use herald_tests::herald::rand_key;
use herald_tests::schedules::fire_early;
use herald_tests::smtp::SmtpServer;
use herald_tests::{Herald, JobFeed, Nats, eventually};
use reqwest::Method;
use serde_json::{Value, json};
use std::time::Duration;

const WAIT: Duration = Duration::from_secs(30);

fn settings(smtp: &SmtpServer) -> ChannelSettings {
    let mut s = ChannelSettings::new(rand_key());
    s.escalation_delay = Duration::ZERO;
    s.concurrency = 4;
    s.smtp = Some(SmtpSettings {
        url: smtp.url(),
        from: "Herald <noreply@herald.test>".into(),
        pool: 2,
    });
    s
}

/// Hour-long hourly digests (the test fires the period's end early), category `news`.
fn policy() -> Policy {
    let categories = [("news".to_owned(), CategoryRule::default())]
        .into_iter()
        .collect();
    Policy::new(categories).with_digest(DigestSettings::default())
}

async fn mesh(nats: &Nats, smtp: &SmtpServer) -> anyhow::Result<Herald> {
    Herald::builder(nats)
        .partitions(1)
        .policy(policy())
        .channels(settings(smtp))
        .start()
        .await
}

async fn put(herald: &Herald, path: &str, body: Value) -> anyhow::Result<()> {
    let r = herald
        .producer(Method::PUT, path)
        .json(&body)
        .send()
        .await?;
    ensure!(r.status().is_success(), "PUT {path}: {}", r.status());
    Ok(())
}

async fn contact(herald: &Herald, user: &str) -> anyhow::Result<()> {
    put(
        herald,
        &format!("/v1/users/{user}/contact"),
        json!({"email": format!("{user}@example.com")}),
    )
    .await
}

/// A digest user with `count` notifications of `body_bytes` each recorded for the
/// period; returns their ids, oldest first.
async fn digest_user(
    herald: &Herald,
    user: &str,
    count: usize,
    body_bytes: usize,
) -> anyhow::Result<Vec<String>> {
    contact(herald, user).await?;
    put(
        herald,
        &format!("/v1/users/{user}/preferences"),
        json!({"digest": "hourly", "timezone": "UTC"}),
    )
    .await?;
    let mut ids = Vec::new();
    for n in 1..=count {
        let body = format!("{n:04} {}", "b".repeat(body_bytes));
        let sent = herald
            .accept(
                &json!({"user_id": user, "title": format!("note {n:04}"), "body": body,
                            "category": "news", "channels": ["inbox", "email"]}),
            )
            .await?;
        ids.push(sent.id);
    }
    for id in &ids {
        herald.channel_state(id, "email", "digest").await?;
    }
    Ok(ids)
}

/// An ordinary email for `user`, routed on the same partition and lane as a digest's end.
async fn probe_is_sent(herald: &Herald, user: &str) -> anyhow::Result<()> {
    let probe = herald
        .accept(&json!({"user_id": user, "title": "behind the digest",
                        "channels": ["inbox", "email"]}))
        .await?;
    herald.channel_state(&probe.id, "email", "sent").await?;
    Ok(())
}

fn parse(raw: &[u8]) -> anyhow::Result<(String, String, String)> {
    let parsed = mail_parser::MessageParser::default()
        .parse(raw)
        .context("MIME")?;
    Ok((
        parsed.subject().unwrap_or_default().to_owned(),
        parsed.body_text(0).context("text part")?.into_owned(),
        parsed.message_id().unwrap_or_default().to_owned(),
    ))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_digest_too_big_for_one_job_is_bounded_and_holds_up_nobody() -> anyhow::Result<()> {
    let smtp = SmtpServer::start().await?;
    let nats = Nats::single().await?;
    let herald = mesh(&nats, &smtp).await?;
    // 55 notifications of 2 KiB: a whole digest is over 200 KiB in text and HTML, far
    // beyond the 64 KiB a job of the email work queue may take.
    digest_user(&herald, "dora", 55, 2048).await?;
    contact(&herald, "otto").await?;

    fire_early(&herald, "dora", "d-").await?;
    probe_is_sent(&herald, "otto").await?;

    let digest = eventually(WAIT, "the digest email", || async {
        let mails = smtp.messages()?;
        let parsed = mails
            .iter()
            .map(|raw| parse(raw))
            .collect::<anyhow::Result<Vec<_>>>()?;
        parsed
            .into_iter()
            .find(|(_, _, id)| id.starts_with("digest-"))
            .context("no digest yet")
    })
    .await?;
    let (subject, text, _) = digest;
    ensure!(subject == "55 notifications you missed", "{subject}");
    ensure!(
        text.contains("note 0055") && text.contains("note 0006"),
        "the newest fifty are listed: {text}"
    );
    ensure!(
        !text.contains("note 0005"),
        "the oldest five are not: {text}"
    );
    ensure!(
        text.contains("…and 5 more notifications: open your inbox"),
        "what is left out is counted: {text}"
    );
    ensure!(
        text.len() < 40 * 1024,
        "bodies are shortened: {} bytes",
        text.len()
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_digest_the_email_queue_refuses_is_recorded_failed_not_retried() -> anyhow::Result<()> {
    let smtp = SmtpServer::start().await?;
    let nats = Nats::single().await?;
    let herald = mesh(&nats, &smtp).await?;
    let ids = digest_user(&herald, "dina", 3, 1024).await?;
    contact(&herald, "oleg").await?;
    // An operator shrank the email queue's message size: an ordinary job (a few hundred
    // bytes) still fits, the digest (some kilobytes) never will.
    let js = async_nats::jetstream::new(herald.nats_client().await?);
    let mut stream = js.get_stream("HERALD_WORK_EMAIL").await?;
    let mut config = stream.info().await?.config.clone();
    config.max_message_size = 1500;
    js.update_stream(&config).await?;

    fire_early(&herald, "dina", "d-").await?;
    probe_is_sent(&herald, "oleg").await?;
    for id in &ids {
        let entry = herald.channel_state(id, "email", "failed").await?;
        let reason = entry["reason"].as_str().unwrap_or_default();
        ensure!(
            reason.contains("maximum message size") && reason.contains("max_msg_size"),
            "the reason says what to do: {entry}"
        );
    }
    ensure!(
        smtp.messages()?.len() == 1,
        "only the probe was sent: no digest"
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_contact_sealed_with_a_dropped_key_fails_its_channels_and_routes_the_rest()
-> anyhow::Result<()> {
    let nats = Nats::single().await?;
    let herald = Herald::builder(&nats).partitions(1).start().await?;
    // Sealed with a key this Herald was never given (an old key dropped from
    // contact_old_keys): the record exists, but cannot be opened.
    let js = async_nats::jetstream::new(herald.nats_client().await?);
    let stale = Targets::open(&js, ContactKeys::new(rand_key(), &[])).await?;
    let user = herald_protocol::UserId::new("ursa")?;
    stale
        .put_contact(
            &user,
            &Contact {
                email: Some("ursa@example.com".into()),
                ..Contact::default()
            },
        )
        .await?;
    let r = herald
        .user(Method::POST, "/v1/me/devices", "ursa")
        .json(&json!({"platform": "ios", "token": "a1".repeat(32)}))
        .send()
        .await?;
    ensure!(r.status().is_success(), "device: {}", r.status());
    let mut jobs = JobFeed::open(&herald).await?;

    let sent = herald
        .accept(&json!({"user_id": "ursa", "title": "hello",
                        "channels": ["inbox", "push", "email"]}))
        .await?;
    let job = jobs.next(WAIT).await?;
    ensure!(
        job.id == sent.id && job.channel == herald_protocol::Channel::Push,
        "push is routed: {job:?}"
    );
    let entry = herald.channel_state(&sent.id, "email", "failed").await?;
    ensure!(
        entry["reason"]
            .as_str()
            .is_some_and(|r| r.contains("contact_old_keys")),
        "the reason says what to do: {entry}"
    );
    // The lane moves on: the next notification is routed too.
    let next = herald
        .accept(&json!({"user_id": "ursa", "title": "again", "channels": ["inbox", "push"]}))
        .await?;
    let job = jobs.next(WAIT).await?;
    ensure!(job.id == next.id, "the next one is routed: {job:?}");
    Ok(())
}
