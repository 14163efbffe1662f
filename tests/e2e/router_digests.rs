//! A digest is built from the user's preferences as they are when its period ends: a
//! category whose email they switched off meanwhile is left out; and a digest held for
//! quiet hours goes out when its schedule brings it back, whatever the router's clock
//! says about the quiet hours.

use anyhow::{Context as _, ensure};
use herald::channels::{ChannelSettings, SmtpSettings};
use herald_protocol::Policy;
use herald_protocol::digest::DigestSettings;
use herald_protocol::preferences::CategoryRule;
use herald_tests::herald::rand_key;
use herald_tests::schedules::{fire_early, pending};
use herald_tests::smtp::SmtpServer;
use herald_tests::{Herald, Nats, eventually};
use reqwest::Method;
use serde_json::{Value, json};
use std::time::Duration;

const WAIT: Duration = Duration::from_secs(30);

async fn mesh(nats: &Nats, smtp: &SmtpServer) -> anyhow::Result<Herald> {
    let mut settings = ChannelSettings::new(rand_key());
    settings.escalation_delay = Duration::ZERO;
    settings.smtp = Some(SmtpSettings {
        url: smtp.url(),
        from: "Herald <noreply@herald.test>".into(),
        pool: 2,
    });
    let categories = ["news", "promo"]
        .into_iter()
        .map(|c| (c.to_owned(), CategoryRule::default()))
        .collect();
    Herald::builder(nats)
        .policy(Policy::new(categories).with_digest(DigestSettings::default()))
        .channels(settings)
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

/// A user on an hourly digest with an email address.
async fn digest_user(herald: &Herald, user: &str) -> anyhow::Result<()> {
    put(
        herald,
        &format!("/v1/users/{user}/contact"),
        json!({"email": format!("{user}@example.com")}),
    )
    .await?;
    put(
        herald,
        &format!("/v1/users/{user}/preferences"),
        json!({"digest": "hourly", "timezone": "UTC"}),
    )
    .await
}

async fn email(herald: &Herald, user: &str, category: &str, title: &str) -> anyhow::Result<String> {
    let sent = herald
        .accept(
            &json!({"user_id": user, "title": title, "category": category,
                        "channels": ["inbox", "email"]}),
        )
        .await?;
    herald.channel_state(&sent.id, "email", "digest").await?;
    Ok(sent.id)
}

/// The one digest email sent so far: (subject, text).
async fn the_digest(smtp: &SmtpServer) -> anyhow::Result<(String, String)> {
    eventually(WAIT, "the digest email", || async {
        let mails = smtp.messages()?;
        ensure!(mails.len() == 1, "{} emails", mails.len());
        let parsed = mail_parser::MessageParser::default()
            .parse(&mails[0])
            .context("MIME")?;
        Ok((
            parsed.subject().unwrap_or_default().to_owned(),
            parsed.body_text(0).context("text part")?.into_owned(),
        ))
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_category_switched_off_during_the_period_is_left_out_of_the_digest() -> anyhow::Result<()>
{
    let smtp = SmtpServer::start().await?;
    let nats = Nats::single().await?;
    let herald = mesh(&nats, &smtp).await?;
    digest_user(&herald, "dot").await?;
    let promo = email(&herald, "dot", "promo", "Flash sale").await?;
    email(&herald, "dot", "news", "Weekly news").await?;
    // An unsubscribe link, a settings page: promo emails are off from now on.
    put(
        &herald,
        "/v1/users/dot/preferences",
        json!({"categories": {"promo": {"email": false}}}),
    )
    .await?;

    fire_early(&herald, "dot", "d-").await?;
    let (subject, text) = the_digest(&smtp).await?;
    ensure!(subject == "1 notification you missed", "{subject}");
    ensure!(text.contains("Weekly news"), "{text}");
    ensure!(
        !text.contains("Flash sale"),
        "the switched-off category: {text}"
    );
    let entry = herald.channel_state(&promo, "email", "skipped").await?;
    ensure!(
        entry["reason"] == "opted out: preferences.categories.promo.email",
        "{entry}"
    );
    Ok(())
}

/// JetStream fires a schedule by the server's clock; a router whose clock is a little
/// behind still sees the quiet hours the digest waited for. Firing the schedule early
/// through the harness seam is that skew, larger.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_digest_held_for_quiet_hours_goes_out_when_its_schedule_brings_it_back()
-> anyhow::Result<()> {
    let smtp = SmtpServer::start().await?;
    let nats = Nats::single().await?;
    let herald = mesh(&nats, &smtp).await?;
    digest_user(&herald, "dax").await?;
    email(&herald, "dax", "news", "Weekly news").await?;
    herald.quiet_now("dax").await?;

    // The period ends during quiet hours: the digest is held until they end.
    let period_end = fire_early(&herald, "dax", "d-").await?;
    let held = eventually(WAIT, "the digest held for quiet hours", || async {
        let (subject, _, _) = pending(&herald, "dax", "d-")
            .await?
            .context("no pending digest")?;
        ensure!(subject != period_end, "still only {subject}");
        Ok(subject)
    })
    .await?;
    ensure!(
        smtp.messages()?.is_empty(),
        "nothing sent during quiet hours"
    );

    fire_early(&herald, "dax", "d-").await?;
    let (subject, text) = the_digest(&smtp)
        .await
        .with_context(|| format!("after {held} fired"))?;
    ensure!(subject == "1 notification you missed", "{subject}");
    ensure!(text.contains("Weekly news"), "{text}");
    Ok(())
}
