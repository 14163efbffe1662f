//! Aggregation when the router runs behind: a group's push goes out once, however late
//! its members reach the router, and a window that ends during quiet hours is sent when
//! its schedule brings it back, even if the router's clock says they have not quite
//! ended yet.

use anyhow::{Context as _, ensure};
use herald::mesh::Roles;
use herald_protocol::Policy;
use herald_protocol::preferences::CategoryRule;
use herald_tests::schedules::fire_early;
use herald_tests::{Herald, JobFeed, Nats, eventually};
use reqwest::Method;
use serde_json::{Value, json};
use std::collections::BTreeMap;
use std::time::Duration;

const WAIT: Duration = Duration::from_secs(30);

/// `like` folds within `window_s`.
fn policy(window_s: u64) -> Policy {
    let mut categories = BTreeMap::new();
    categories.insert(
        "like".to_owned(),
        CategoryRule {
            group_window_s: Some(window_s),
            ..Default::default()
        },
    );
    Policy::new(categories)
}

fn like(user: &str, actor: &str) -> Value {
    json!({"user_id": user, "title": format!("{actor} liked your photo"), "category": "like",
           "group_key": "like:photo-1", "group_actor": actor, "channels": ["inbox", "push"]})
}

async fn device(herald: &Herald, user: &str) -> anyhow::Result<()> {
    let r = herald
        .user(Method::POST, "/v1/me/devices", user)
        .json(&json!({"platform": "android", "token": format!("tok-{user}")}))
        .send()
        .await?;
    ensure!(r.status().is_success(), "device: {}", r.status());
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_member_routed_after_its_window_closed_is_folded_not_sent_again() -> anyhow::Result<()> {
    let nats = Nats::single().await?;
    // Only the api runs while the likes come in: no router is there to hold the window.
    let api = Herald::builder(&nats)
        .roles(Roles::API)
        .policy(policy(1))
        .start()
        .await?;
    device(&api, "lea").await?;
    let first = api.accept(&like("lea", "Ann")).await?;
    let second = api.accept(&like("lea", "Bob")).await?;
    let inbox = api.inbox("lea").await?;
    let ends: jiff::Timestamp = inbox
        .last()
        .and_then(|n| n["group"]["window_ends_at"].as_str())
        .context("the group snapshot")?
        .parse()?;
    ensure!(
        inbox.last().is_some_and(|n| n["group"]["count"] == 2),
        "both joined one window: {inbox:?}"
    );
    eventually(WAIT, "the window is over", || async {
        ensure!(jiff::Timestamp::now() > ends, "it ends at {ends}");
        Ok(())
    })
    .await?;

    // The router comes late: the first closes the window, and carries it.
    let mut jobs = JobFeed::open(&api).await?;
    let _router = Herald::builder(&nats)
        .roles(Roles::ROUTER)
        .policy(policy(1))
        .start()
        .await?;
    let job = jobs.next(WAIT).await?;
    ensure!(job.id == first.id, "the first carries the group: {job:?}");
    ensure!(
        job.folded.as_ref().is_some_and(|f| f.count == 2),
        "with both in it: {job:?}"
    );
    // The second, late as well, scheduled a close of its own: it finds the window
    // closed by the first, and folds into it.
    let entry = api.channel_state(&second.id, "push", "folded").await?;
    ensure!(
        entry["reason"]
            .as_str()
            .is_some_and(|r| r.contains(&first.id)),
        "folded into the first: {entry}"
    );
    let probe = api
        .accept(&json!({"user_id": "lea", "title": "probe", "channels": ["inbox", "push"]}))
        .await?;
    let next = jobs.next(WAIT).await?;
    ensure!(
        next.id == probe.id,
        "the group is not sent a second time: {next:?}"
    );
    Ok(())
}

/// The scheduler fires by the server's clock; a router whose clock is a little behind
/// still sees the quiet hours the close waited for. Firing the schedule early through
/// the harness seam is that skew, larger.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_group_close_back_from_quiet_hours_is_sent_whatever_the_router_clock_says()
-> anyhow::Result<()> {
    let nats = Nats::single().await?;
    let herald = Herald::builder(&nats).policy(policy(1)).start().await?;
    device(&herald, "qia").await?;
    herald.quiet_now("qia").await?;
    let mut jobs = JobFeed::open(&herald).await?;
    let first = herald.accept(&like("qia", "Ann")).await?;
    herald.accept(&like("qia", "Bob")).await?;
    // The window ends within quiet hours: its close waits for them to end.
    let entry = eventually(WAIT, "the close held for quiet hours", || async {
        let entry = herald.channel_state(&first.id, "push", "deferred").await?;
        ensure!(
            entry["reason"]
                .as_str()
                .is_some_and(|r| r.starts_with("quiet_hours")),
            "{entry}"
        );
        Ok(entry)
    })
    .await?;

    fire_early(&herald, "qia", "gq-").await?;
    let job = jobs
        .next(WAIT)
        .await
        .with_context(|| format!("the group's push, after {entry}"))?;
    ensure!(
        job.id == first.id && job.folded.as_ref().is_some_and(|f| f.count == 2),
        "the group goes out when its schedule brings it back: {job:?}"
    );
    Ok(())
}

/// A window whose close quiet hours hold keeps folding until that close fires, however
/// long after the window's end: a member that comes more than an hour past it (the limit
/// for a window nobody closed) still joins, and the one push carries every member. The
/// hour is made to pass by moving the stored window's end two hours back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_window_held_by_quiet_hours_keeps_folding_past_the_stale_limit() -> anyhow::Result<()> {
    let nats = Nats::single().await?;
    let herald = Herald::builder(&nats).policy(policy(1)).start().await?;
    device(&herald, "hal").await?;
    herald.quiet_now("hal").await?;
    let mut jobs = JobFeed::open(&herald).await?;
    let first = herald.accept(&like("hal", "Ann")).await?;
    herald.accept(&like("hal", "Bob")).await?;
    eventually(WAIT, "the close held for quiet hours", || async {
        let entry = herald.channel_state(&first.id, "push", "deferred").await?;
        ensure!(
            entry["reason"]
                .as_str()
                .is_some_and(|r| r.starts_with("quiet_hours")),
            "{entry}"
        );
        Ok(())
    })
    .await?;

    // Two hours pass: the stored window ended long ago.
    let js = async_nats::jetstream::new(herald.nats_client().await?);
    let groups = js
        .get_key_value(herald_protocol::streams::GROUPS_BUCKET)
        .await?;
    let mut keys = Vec::new();
    let mut listed = groups.keys().await?;
    while let Some(key) = futures::StreamExt::next(&mut listed).await {
        let key = key?;
        if !key.contains(".closed.") {
            keys.push(key);
        }
    }
    ensure!(keys.len() == 1, "one group: {keys:?}");
    let stored = groups.get(&keys[0]).await?.context("the group state")?;
    let mut state: Value = serde_json::from_slice(&stored)?;
    state["window_ends_at"] = json!(jiff::Timestamp::now().as_second() - 7200);
    groups
        .put(&keys[0], serde_json::to_vec(&state)?.into())
        .await?;

    let third = herald.accept(&like("hal", "Cy")).await?;
    let inbox = herald.inbox("hal").await?;
    let snapshot = inbox
        .iter()
        .find(|n| n["id"] == third.id)
        .map(|n| n["group"].clone())
        .context("the third in the inbox")?;
    ensure!(
        snapshot["first_id"] == first.id && snapshot["count"] == 3,
        "the third joins the held window: {snapshot}"
    );
    // Routed: folded, or carrying a close of its own that quiet hours hold as well.
    eventually(WAIT, "the third routed", || async {
        let s = herald.status(&third.id).await?;
        let entry = &s["channels"]["push"][0];
        let quiet = entry["reason"]
            .as_str()
            .is_some_and(|r| r.starts_with("quiet_hours"));
        ensure!(
            entry["state"] == "folded" || (entry["state"] == "deferred" && quiet),
            "status now {s}"
        );
        Ok(())
    })
    .await?;

    fire_early(&herald, "hal", "gq-").await?;
    let job = jobs.next(WAIT).await.context("the group's push")?;
    ensure!(
        job.folded.as_ref().is_some_and(|f| f.count == 3),
        "one push carries all three: {job:?}"
    );
    Ok(())
}

/// `high` is never held: a `high` notification whose group a `normal` one opened, during
/// the user's quiet hours, is neither folded nor held for the window or the quiet hours;
/// its push is queued at once, as itself, on the `high` lane.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_high_member_of_a_normal_group_goes_out_at_once_on_the_high_lane() -> anyhow::Result<()> {
    let nats = Nats::single().await?;
    let herald = Herald::builder(&nats).policy(policy(600)).start().await?;
    device(&herald, "hil").await?;
    herald.quiet_now("hil").await?;
    let client = herald.nats_client().await?;
    let mut high_lane = client
        .subscribe(herald.subjects().work(
            herald_protocol::Channel::Push,
            herald_protocol::Priority::High,
        ))
        .await?;
    client.flush().await?;
    let first = herald.accept(&like("hil", "Ann")).await?;
    herald.channel_state(&first.id, "push", "deferred").await?;
    let mut urgent = like("hil", "Bob");
    urgent["priority"] = json!("high");
    let high = herald.accept(&urgent).await?;
    let msg = herald_tests::within(
        WAIT,
        "the high push on the high lane",
        futures::StreamExt::next(&mut high_lane),
    )
    .await?
    .context("subscription closed")?;
    let job: herald_protocol::ChannelJob = serde_json::from_slice(&msg.payload)?;
    ensure!(
        job.id == high.id && job.folded.is_none(),
        "the high one, as itself: {job:?}"
    );
    herald.channel_state(&high.id, "push", "queued").await?;
    Ok(())
}
