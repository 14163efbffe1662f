//! Email digests end to end, against a real SMTP server (aiosmtpd) whose messages are
//! parsed as MIME: a digest user gets no email per notification, and one email per period
//! listing what they have not read, even across a restart; a rate cap may fold into it.
//!
//! Periods: most tests keep the hourly period an hour long and fire the pending schedule
//! early through the harness seam ([`herald_tests::schedules::fire_early`]), which
//! publishes exactly what JetStream's scheduler would; one test shortens the period
//! (`digest_hourly_s`) and lets the scheduler fire by itself.

use anyhow::{Context as _, ensure};
use herald::channels::{ChannelSettings, SmtpSettings};
use herald_protocol::Policy;
use herald_protocol::digest::DigestSettings;
use herald_protocol::preferences::{CapOver, CategoryRule, RateCap};
use herald_tests::herald::rand_key;
use herald_tests::schedules::{fire_early, pending};
use herald_tests::smtp::SmtpServer;
use herald_tests::{Herald, Nats, eventually};
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

/// An hour-long hourly period; `security` is critical (never held for a digest).
fn policy(hourly_s: u64) -> Policy {
    let categories = [
        (
            "security".to_owned(),
            CategoryRule {
                critical: true,
                ..Default::default()
            },
        ),
        ("news".to_owned(), CategoryRule::default()),
    ]
    .into_iter()
    .collect();
    Policy::new(categories).with_digest(DigestSettings {
        hourly_s,
        ..DigestSettings::default()
    })
}

async fn setup_user(herald: &Herald, user: &str, prefs: Value) -> anyhow::Result<()> {
    let r = herald
        .producer(Method::PUT, &format!("/v1/users/{user}/contact"))
        .json(&json!({"email": format!("{user}@example.com")}))
        .send()
        .await?;
    ensure!(r.status() == 200, "contact: {}", r.status());
    let r = herald
        .producer(Method::PUT, &format!("/v1/users/{user}/preferences"))
        .json(&prefs)
        .send()
        .await?;
    ensure!(r.status() == 200, "preferences: {}", r.status());
    Ok(())
}

async fn email(herald: &Herald, user: &str, title: &str) -> anyhow::Result<herald_tests::Accepted> {
    herald
        .accept(&json!({"user_id": user, "title": title, "category": "news",
                        "body": format!("about {title}"), "channels": ["inbox", "email"]}))
        .await
}

/// Waits for `n` emails in all.
async fn emails(smtp: &SmtpServer, n: usize) -> anyhow::Result<Vec<Vec<u8>>> {
    eventually(WAIT, &format!("{n} email(s)"), || async {
        let m = smtp.messages()?;
        ensure!(m.len() >= n, "{} so far", m.len());
        Ok(m)
    })
    .await
}

/// Waits until the email work queue is empty: every job sent (or dropped).
async fn email_queue_drained(herald: &Herald) -> anyhow::Result<()> {
    let js = async_nats::jetstream::new(herald.nats_client().await?);
    eventually(WAIT, "the email queue drained", || async {
        let mut stream = js.get_stream("HERALD_WORK_EMAIL").await?;
        let info = stream.info().await?;
        ensure!(info.state.messages == 0, "{} jobs", info.state.messages);
        Ok(())
    })
    .await
}

struct Mail {
    subject: String,
    message_id: String,
    text: String,
    html: String,
}

fn parse(raw: &[u8]) -> anyhow::Result<Mail> {
    let parsed = mail_parser::MessageParser::default()
        .parse(raw)
        .context("MIME")?;
    ensure!(parsed.text_body.len() == 1, "one text part");
    ensure!(parsed.html_body.len() == 1, "one html part");
    Ok(Mail {
        subject: parsed.subject().unwrap_or_default().to_owned(),
        message_id: parsed.message_id().unwrap_or_default().to_owned(),
        text: parsed.body_text(0).context("text part")?.into_owned(),
        html: parsed.body_html(0).context("html part")?.into_owned(),
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_hourly_digest_is_one_email_listing_what_was_not_read() -> anyhow::Result<()> {
    let smtp = SmtpServer::start().await?;
    let nats = Nats::single().await?;
    let herald = Herald::builder(&nats)
        .policy(policy(3600))
        .channels(settings(&smtp))
        .start()
        .await?;
    setup_user(
        &herald,
        "dee",
        json!({"digest": "hourly", "timezone": "Europe/Berlin", "locale": "de-DE"}),
    )
    .await?;
    let mut sent = Vec::new();
    for title in ["Seen <first>", "Second & more", "Third", "Fourth"] {
        sent.push(email(&herald, "dee", title).await?);
    }
    for n in &sent {
        let entry = herald.channel_state(&n.id, "email", "digest").await?;
        let reason = entry["reason"].as_str().unwrap_or_default();
        ensure!(
            reason.starts_with("preferences.digest: hourly email digest at "),
            "{entry}"
        );
    }
    ensure!(
        pending(&herald, "dee", "d-").await?.is_some(),
        "the period's end is scheduled"
    );
    // The first is read before the period ends: left out.
    let read = herald
        .user(Method::POST, "/v1/me/read", "dee")
        .json(&json!({"up_to": sent[0].seq}))
        .send()
        .await?;
    ensure!(read.status() == 200, "read: {}", read.status());
    // A critical notification is never held: its email goes out at once.
    let alert = herald
        .accept(
            &json!({"user_id": "dee", "title": "New login", "category": "security",
                        "channels": ["inbox", "email"]}),
        )
        .await?;
    herald.channel_state(&alert.id, "email", "sent").await?;
    ensure!(
        smtp.messages()?.len() == 1,
        "no email per digested notification"
    );

    fire_early(&herald, "dee", "d-").await?;
    let all = emails(&smtp, 2).await?;
    let digests: Vec<Mail> = all
        .iter()
        .map(|raw| parse(raw))
        .collect::<anyhow::Result<Vec<_>>>()?
        .into_iter()
        .filter(|m| m.message_id.starts_with("digest-"))
        .collect();
    ensure!(digests.len() == 1, "one digest");
    let digest = &digests[0];
    assert_eq!(digest.subject, "3 notifications you missed");
    for title in ["Second & more", "Third", "Fourth"] {
        ensure!(digest.text.contains(title), "{title} in {}", digest.text);
    }
    ensure!(
        digest.html.contains("Second &amp; more") && digest.html.contains("about Fourth"),
        "{}",
        digest.html
    );
    ensure!(
        !digest.text.contains("Seen <first>") && !digest.html.contains("Seen &lt;first"),
        "the read one is left out: {}",
        digest.text
    );

    // A replay of the period's end sends nothing more: the period was cleared.
    fire_early(&herald, "dee", "d-").await?;
    // Behind the replay on the same partition's router: a critical email, sent at once.
    let probe = herald
        .accept(
            &json!({"user_id": "dee", "title": "Password changed", "category": "security",
                        "channels": ["inbox", "email"]}),
        )
        .await?;
    herald.channel_state(&probe.id, "email", "sent").await?;
    email_queue_drained(&herald).await?;
    assert_eq!(
        smtp.messages()?.len(),
        3,
        "alert, digest, probe: no second digest"
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pending_digest_survives_a_restart() -> anyhow::Result<()> {
    let smtp = SmtpServer::start().await?;
    let nats = Nats::single().await?;
    let mut herald = Herald::builder(&nats)
        .policy(policy(3600))
        .channels(settings(&smtp))
        .start()
        .await?;
    setup_user(
        &herald,
        "ria",
        json!({"digest": "daily", "timezone": "America/New_York"}),
    )
    .await?;
    let a = email(&herald, "ria", "Alpha").await?;
    let b = email(&herald, "ria", "Beta").await?;
    for n in [&a, &b] {
        let entry = herald.channel_state(&n.id, "email", "digest").await?;
        ensure!(
            entry["reason"]
                .as_str()
                .is_some_and(|r| r.contains("daily email digest at")),
            "{entry}"
        );
    }
    herald.stop().await?;
    herald.start_again().await?;
    fire_early(&herald, "ria", "d-").await?;
    let all = emails(&smtp, 1).await?;
    ensure!(all.len() == 1, "one email");
    let digest = parse(&all[0])?;
    assert_eq!(digest.subject, "2 notifications you missed");
    ensure!(
        digest.text.contains("Alpha") && digest.text.contains("Beta"),
        "{}",
        digest.text
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_schedule_fires_at_the_period_end_by_itself() -> anyhow::Result<()> {
    let smtp = SmtpServer::start().await?;
    let nats = Nats::single().await?;
    // Two-second "hourly" periods (`digest_hourly_s = 2`).
    let herald = Herald::builder(&nats)
        .policy(policy(2))
        .channels(settings(&smtp))
        .start()
        .await?;
    setup_user(&herald, "kai", json!({"digest": "hourly"})).await?;
    let n = email(&herald, "kai", "Only one").await?;
    herald.channel_state(&n.id, "email", "digest").await?;
    let all = emails(&smtp, 1).await?;
    let digest = parse(&all[0])?;
    assert_eq!(digest.subject, "1 notification you missed");
    ensure!(digest.text.contains("Only one"), "{}", digest.text);
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rate_cap_can_fold_email_into_a_digest() -> anyhow::Result<()> {
    let smtp = SmtpServer::start().await?;
    let nats = Nats::single().await?;
    let policy = policy(3600).with_caps(vec![RateCap {
        category: Some("news".into()),
        producer: None,
        limit: 1,
        window_s: 3600,
        over: CapOver::Digest,
    }]);
    let herald = Herald::builder(&nats)
        .policy(policy)
        .channels(settings(&smtp))
        .start()
        .await?;
    setup_user(&herald, "cy", json!({})).await?;
    let first = email(&herald, "cy", "Within the cap").await?;
    herald.channel_state(&first.id, "email", "sent").await?;
    let over = email(&herald, "cy", "Over the cap").await?;
    let entry = herald.channel_state(&over.id, "email", "digest").await?;
    ensure!(
        entry["reason"]
            .as_str()
            .is_some_and(|r| r.starts_with("rate_cap: 1 per 3600 s: hourly email digest at")),
        "{entry}"
    );
    fire_early(&herald, "cy", "d-").await?;
    let all = emails(&smtp, 2).await?;
    let digest = all
        .iter()
        .map(|raw| parse(raw))
        .collect::<anyhow::Result<Vec<_>>>()?
        .into_iter()
        .find(|m| m.message_id.starts_with("digest-"))
        .context("a digest")?;
    assert_eq!(digest.subject, "1 notification you missed");
    ensure!(digest.text.contains("Over the cap"), "{}", digest.text);
    Ok(())
}

/// A big topic's copy reaches the router as a hand-over, not as a fresh notification;
/// a digest user's email from it is still held for the digest, as on the write path,
/// rather than dropped.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_big_topic_publish_is_held_for_a_digest_user() -> anyhow::Result<()> {
    let smtp = SmtpServer::start().await?;
    let nats = Nats::single().await?;
    let herald = Herald::builder(&nats)
        .policy(policy(3600))
        .channels(settings(&smtp))
        .topics(herald_api::TopicSettings {
            big_threshold: 0,
            ..Default::default()
        })
        .start()
        .await?;
    setup_user(&herald, "dora", json!({"digest": "hourly"})).await?;
    let r = herald
        .producer(Method::POST, "/v1/topics/weekly/subscribers")
        .json(&json!({"user_ids": ["dora"]}))
        .send()
        .await?;
    ensure!(r.status().is_success(), "subscribe: {}", r.status());
    let r = herald
        .producer(Method::POST, "/v1/topics/weekly/publish")
        .json(
            &json!({"title": "This week", "body": "five things", "category": "news",
                      "channels": ["inbox", "email"]}),
        )
        .send()
        .await?;
    let published: Value = r.json().await?;
    ensure!(published["path"] == "topic", "big-topic path: {published}");
    eventually(WAIT, "the digest period's end is scheduled", || async {
        ensure!(pending(&herald, "dora", "d-").await?.is_some());
        Ok(())
    })
    .await?;
    ensure!(smtp.messages()?.is_empty(), "no email of its own");
    fire_early(&herald, "dora", "d-").await?;
    let all = emails(&smtp, 1).await?;
    let digest = parse(&all[0])?;
    ensure!(
        digest.message_id.starts_with("digest-"),
        "{}",
        digest.message_id
    );
    ensure!(
        digest.text.contains("This week") && digest.text.contains("five things"),
        "{}",
        digest.text
    );
    Ok(())
}

/// A user switches from a daily to an hourly digest: the hourly period's digest lists
/// and clears only its own entries; the one waiting for the daily period (recorded
/// earlier, so at a lower sequence) stays for that digest.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_digest_clears_only_the_entries_it_listed() -> anyhow::Result<()> {
    let smtp = SmtpServer::start().await?;
    let nats = Nats::single().await?;
    // The daily period ends about 12 hours away, never with the hourly one.
    let hour = (time::OffsetDateTime::now_utc().hour() + 12) % 24;
    let policy = Policy::default().with_digest(DigestSettings {
        hourly_s: 3600,
        daily_hour: hour,
    });
    let herald = Herald::builder(&nats)
        .policy(policy)
        .channels(settings(&smtp))
        .start()
        .await?;
    setup_user(&herald, "dax", json!({"digest": "daily"})).await?;
    let daily = email(&herald, "dax", "Daily one").await?;
    herald.channel_state(&daily.id, "email", "digest").await?;
    let r = herald
        .producer(Method::PUT, "/v1/users/dax/preferences")
        .json(&json!({"digest": "hourly"}))
        .send()
        .await?;
    ensure!(r.status() == 200, "preferences: {}", r.status());
    let hourly = email(&herald, "dax", "Hourly one").await?;
    herald.channel_state(&hourly.id, "email", "digest").await?;

    // The newest schedule is the hourly period's end.
    fire_early(&herald, "dax", "d-").await?;
    let all = emails(&smtp, 1).await?;
    let digest = parse(&all[0])?;
    ensure!(
        digest.text.contains("Hourly one") && !digest.text.contains("Daily one"),
        "{}",
        digest.text
    );
    email_queue_drained(&herald).await?;
    let js = async_nats::jetstream::new(herald.nats_client().await?);
    let stream = js.get_stream(herald_protocol::streams::DIGEST).await?;
    let subject = herald
        .subjects()
        .digest(&herald_protocol::UserId::new("dax".to_owned())?);
    let left = stream
        .get_last_raw_message_by_subject(&subject)
        .await
        .map_err(|e| anyhow::anyhow!("the daily entry was cleared with the hourly digest: {e}"))?;
    let entry: Value = serde_json::from_slice(&left.payload)?;
    ensure!(entry["id"] == daily.id.as_str(), "{entry}");
    Ok(())
}

/// A digest is email below `high`: when its period ends inside the user's quiet hours it
/// is held, and scheduled again for the moment they end.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_digest_due_in_quiet_hours_waits_for_their_end() -> anyhow::Result<()> {
    let smtp = SmtpServer::start().await?;
    let nats = Nats::single().await?;
    let herald = Herald::builder(&nats)
        .policy(policy(3600))
        .channels(settings(&smtp))
        .start()
        .await?;
    // Quiet from an hour ago until an hour from now (UTC, wrapping over midnight).
    let now = jiff::Timestamp::now().to_zoned(jiff::tz::TimeZone::UTC);
    let hhmm = |t: jiff::civil::Time| format!("{:02}:{:02}", t.hour(), t.minute());
    let start = now.time().wrapping_sub(jiff::Span::new().hours(1));
    let end = now.time().wrapping_add(jiff::Span::new().hours(1));
    setup_user(
        &herald,
        "qin",
        json!({"digest": "hourly", "timezone": "UTC",
               "quiet_hours": {"start": hhmm(start), "end": hhmm(end)}}),
    )
    .await?;
    let held = email(&herald, "qin", "Overnight news").await?;
    herald.channel_state(&held.id, "email", "digest").await?;
    let period = fire_early(&herald, "qin", "d-").await?;
    let (subject, headers) = eventually(WAIT, "the digest rescheduled", || async {
        let (subject, headers, _) = pending(&herald, "qin", "d-")
            .await?
            .context("no digest schedule")?;
        ensure!(subject != period, "still only {subject}");
        Ok((subject, headers))
    })
    .await?;
    let at = headers
        .get("Nats-Schedule")
        .context("a schedule without its time")?
        .as_str()
        .to_owned();
    let quiet_end = now
        .checked_add(jiff::Span::new().hours(1))?
        .with()
        .second(0)
        .subsec_nanosecond(0)
        .build()?
        .timestamp();
    ensure!(
        at == format!("@at {quiet_end}"),
        "{subject} fires {at}, not when quiet hours end ({quiet_end})"
    );
    ensure!(
        smtp.messages()?.is_empty(),
        "a digest went out in quiet hours"
    );
    Ok(())
}
