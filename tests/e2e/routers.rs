//! Routers: each partition is owned by one router at a time, so every notification gets
//! exactly one job per channel, in per-user `seq` order; a standby takes over when the
//! owner stops.

use anyhow::{Context as _, ensure};
use herald::mesh::Roles;
use herald_protocol::{Channel, ChannelJob};
use herald_tests::herald::Accepted;
use herald_tests::{Herald, Nats, eventually};
use serde_json::json;
use std::collections::HashMap;
use std::time::Duration;

const PARTITIONS: u16 = 2;
const USERS: [&str; 4] = ["ann", "ben", "cat.*", "dan >"];
/// Router consumers unpin a silent owner after 20 s; allow for that and a pull cycle.
const TAKEOVER: Duration = Duration::from_secs(40);

async fn router(nats: &Nats) -> anyhow::Result<Herald> {
    Herald::builder(nats)
        .partitions(PARTITIONS)
        .roles(Roles::ROUTER)
        .start()
        .await
}

/// Gives every user one push device, so each notification makes one push job.
async fn register_devices(api: &Herald) -> anyhow::Result<()> {
    for user in USERS {
        let response = api
            .user(reqwest::Method::POST, "/v1/me/devices", user)
            .json(&json!({"platform": "android", "token": format!("tok-{user}")}))
            .send()
            .await?;
        ensure!(
            response.status().is_success(),
            "device for {user}: {}",
            response.status()
        );
    }
    Ok(())
}

/// Sends one notification per user on inbox and push.
async fn send_round(
    api: &Herald,
    round: usize,
    sent: &mut Vec<(String, Accepted)>,
) -> anyhow::Result<()> {
    for user in USERS {
        let body = json!({"user_id": user, "title": format!("round {round}"), "channels": ["inbox", "push"]});
        sent.push((user.to_string(), api.accept(&body).await?));
    }
    Ok(())
}

/// Every job in the push work stream, in stream order, with its subject.
async fn jobs(js: &async_nats::jetstream::Context) -> anyhow::Result<Vec<(String, ChannelJob)>> {
    let mut stream = js.get_stream("HERALD_WORK_PUSH").await?;
    let state = stream.info().await?.state.clone();
    let mut out = Vec::new();
    if state.messages == 0 {
        return Ok(out);
    }
    for seq in state.first_sequence..=state.last_sequence {
        let msg = stream
            .get_raw_message(seq)
            .await
            .with_context(|| format!("WORK message {seq}"))?;
        let job: ChannelJob =
            serde_json::from_slice(&msg.payload).context("a WORK payload is a ChannelJob")?;
        out.push((msg.subject.to_string(), job));
    }
    Ok(out)
}

/// Waits until every sent notification has its job, then checks there is exactly one
/// each, on the push lane, and that each user's jobs come in strictly increasing `seq`.
async fn check_jobs(
    js: &async_nats::jetstream::Context,
    sent: &[(String, Accepted)],
    timeout: Duration,
) -> anyhow::Result<()> {
    let all = eventually(timeout, "a job for every notification", || async {
        let all = jobs(js).await?;
        ensure!(
            all.len() >= sent.len(),
            "{} jobs for {} notifications",
            all.len(),
            sent.len()
        );
        Ok(all)
    })
    .await?;
    let mut per_id: HashMap<&str, usize> = HashMap::new();
    for (_, job) in &all {
        *per_id.entry(job.id.as_str()).or_default() += 1;
    }
    for (user, accepted) in sent {
        ensure!(
            per_id.get(accepted.id.as_str()) == Some(&1),
            "{accepted:?} has {:?} jobs",
            per_id.get(accepted.id.as_str())
        );
        let (subject, job) = all
            .iter()
            .find(|(_, j)| j.id == accepted.id)
            .context("job")?;
        assert_eq!(subject, "herald.work.push.normal");
        assert_eq!(
            (job.seq, job.user_id.as_str(), job.channel),
            (accepted.seq, user.as_str(), Channel::Push)
        );
    }
    assert_eq!(all.len(), sent.len(), "no job for anything not sent");
    for user in USERS {
        let seqs: Vec<u64> = all
            .iter()
            .filter(|(_, j)| j.user_id.as_str() == user)
            .map(|(_, j)| j.seq)
            .collect();
        ensure!(
            seqs.windows(2).all(|w| w[0] < w[1]),
            "{user:?}'s jobs out of order: {seqs:?}"
        );
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn routers_keep_per_user_order_and_a_standby_takes_over() -> anyhow::Result<()> {
    let nats = Nats::single().await?;
    let api = Herald::builder(&nats)
        .partitions(PARTITIONS)
        .roles(Roles::API)
        .start()
        .await?;
    let first = router(&nats).await?;
    let second = router(&nats).await?;
    let js = async_nats::jetstream::new(nats.client().await?);
    register_devices(&api).await?;
    let mut sent = Vec::new();
    for round in 0..5 {
        send_round(&api, round, &mut sent).await?;
    }
    check_jobs(&js, &sent, Duration::from_secs(15))
        .await
        .context("two routers running")?;

    // Whichever of the two owned which partitions, after this one `second` owns them all.
    first.shutdown().await?;
    for round in 5..8 {
        send_round(&api, round, &mut sent).await?;
    }
    check_jobs(&js, &sent, TAKEOVER)
        .await
        .context("after the first router stopped")?;

    // `second` certainly owns every partition now: stopping it forces a takeover.
    let third = router(&nats).await?;
    second.shutdown().await?;
    for round in 8..11 {
        send_round(&api, round, &mut sent).await?;
    }
    check_jobs(&js, &sent, TAKEOVER)
        .await
        .context("after the owning router stopped")?;
    third.shutdown().await?;
    Ok(())
}

/// A router consumer deleted under a running router (an operator, INBOX recreated, a lost
/// replica) leaves its partition-lane unrouted. The router does not go on silently: it
/// opens the consumer again, finds it gone, and ends with that error, so supervision
/// (`herald up`) stops and says so.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_router_whose_consumer_is_deleted_ends_with_an_error() -> anyhow::Result<()> {
    let nats = Nats::single().await?;
    let mut router = router(&nats).await?;
    let js = async_nats::jetstream::new(router.nats_client().await?);
    let name = herald_protocol::streams::router_consumer(0, herald_protocol::Priority::Normal);
    let inbox = js.get_stream(herald_protocol::streams::INBOX).await?;
    // Deleted once the router pulls from it (not while it opens it at start).
    eventually(TAKEOVER, "the router pulling from the consumer", || async {
        let info = inbox.consumer_info(&name).await?;
        ensure!(info.num_waiting > 0, "no pull waiting: {info:?}");
        Ok(())
    })
    .await?;
    inbox.delete_consumer(&name).await?;
    let failure = router.failure(Duration::from_secs(60)).await?;
    let text = format!("{failure}");
    ensure!(
        matches!(
            failure,
            herald::mesh::MeshError::Router(herald_router::RouterError::Consumer {
                partition: 0,
                lane: herald_protocol::Priority::Normal,
                ..
            })
        ),
        "the router names the partition-lane whose consumer is gone: {text}"
    );
    Ok(())
}

/// The router consumers' pin outlasts their ack wait plus a pull expiry, and provisioning
/// raises it on consumers an earlier version made with the ack wait's 10 s.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn provisioning_raises_the_pin_timeout_of_existing_router_consumers() -> anyhow::Result<()> {
    let nats = Nats::single().await?;
    let mut first = router(&nats).await?;
    first.stop().await?;
    let js = async_nats::jetstream::new(nats.client().await?);
    let inbox = js.get_stream(herald_protocol::streams::INBOX).await?;
    let name = herald_protocol::streams::router_consumer(1, herald_protocol::Priority::Low);
    let mut old = inbox.consumer_info(&name).await?.config.clone();
    ensure!(
        old.priority_timeout > old.ack_wait + Duration::from_secs(2),
        "pin {:?}, ack wait {:?}",
        old.priority_timeout,
        old.ack_wait
    );
    old.priority_timeout = Duration::from_secs(10);
    inbox.update_consumer(old).await?;
    let _again = router(&nats).await?;
    let now = inbox.consumer_info(&name).await?.config.clone();
    ensure!(
        now.priority_timeout == herald_store::provision::ROUTER_PIN_TIMEOUT,
        "provisioned again: {:?}",
        now.priority_timeout
    );
    Ok(())
}
