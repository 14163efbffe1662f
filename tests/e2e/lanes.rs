//! Priority lanes in routing. The router has a consumer per partition *and lane*, so a
//! `high` notification is routed while every `low` consumer is stalled behind a backlog:
//! it does not wait for its turn in a shared queue, it is in another one. The test stalls
//! the `low` lane for real (JetStream consumer pause), so it proves the isolation without
//! racing the router.

use anyhow::{Context as _, ensure};
use async_nats::jetstream;
use herald_protocol::Priority;
use herald_protocol::streams::{INBOX, router_consumer};
use herald_tests::{Herald, JobFeed, Nats};
use reqwest::Method;
use serde_json::json;
use std::collections::HashSet;
use std::time::Duration;

const BACKLOG: usize = 1_000;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn high_is_routed_while_the_low_lane_is_stalled_behind_a_backlog() -> anyhow::Result<()> {
    let nats = Nats::single().await?;
    let herald = Herald::builder(&nats).start().await?;
    let r = herald
        .user(Method::POST, "/v1/me/devices", "omar")
        .json(&json!({"platform": "ios", "token": "a".repeat(64)}))
        .send()
        .await?;
    ensure!(r.status().is_success(), "device: {}", r.status());
    let js = jetstream::new(herald.nats_client().await?);
    let inbox = js.get_stream(INBOX).await?;
    let partitions = herald.subjects().partitions();
    let until = time::OffsetDateTime::now_utc() + time::Duration::hours(1);
    for p in 0..partitions {
        inbox
            .pause_consumer(&router_consumer(p, Priority::Low), until)
            .await?;
    }
    let mut jobs = JobFeed::open(&herald).await?;

    // A marketing blast for the same user: stored at once, its routing stalled.
    let blast: Vec<_> = (0..BACKLOG)
        .map(|i| json!({"user_id": "omar", "title": format!("promo {i}"), "priority": "low", "channels": ["inbox", "push"]}))
        .collect();
    let r = herald
        .producer(Method::POST, "/v1/notify/batch")
        .json(&json!({"notifications": blast}))
        .send()
        .await?;
    ensure!(r.status().is_success(), "batch: {}", r.status());
    let low: HashSet<String> = r.json::<serde_json::Value>().await?["results"]
        .as_array()
        .context("batch results")?
        .iter()
        .filter_map(|item| item["id"].as_str().map(str::to_owned))
        .collect();
    ensure!(
        low.len() == BACKLOG,
        "every low one accepted: {}",
        low.len()
    );

    // The OTP behind it is routed, and enqueued on the high lane of the push queue.
    let otp = herald
        .accept(&json!({"user_id": "omar", "title": "OTP 123456", "priority": "high", "channels": ["inbox", "push"]}))
        .await?;
    let job = jobs.next(Duration::from_secs(20)).await?;
    ensure!(job.id == otp.id, "the first job is the OTP: {job:?}");
    ensure!(job.priority == Priority::High, "on the high lane: {job:?}");

    // ...while the whole blast still waits in the low lane, none of it routed.
    let mut waiting = 0;
    for p in 0..partitions {
        let info = inbox
            .consumer_info(&router_consumer(p, Priority::Low))
            .await?;
        waiting += info.num_pending + info.num_ack_pending as u64;
    }
    ensure!(
        waiting == BACKLOG as u64,
        "the low lane still holds the blast: {waiting}"
    );

    // The inbox is one sequence across lanes: the blast in order, then the OTP.
    let stored = herald.inbox("omar").await?;
    ensure!(stored.len() == BACKLOG + 1, "inbox: {}", stored.len());
    let seqs: Vec<u64> = stored
        .iter()
        .map(|n| n["seq"].as_u64().context("seq"))
        .collect::<Result<_, _>>()?;
    ensure!(seqs.windows(2).all(|w| w[0] < w[1]), "seq strictly rises");
    ensure!(stored[BACKLOG]["id"] == otp.id.as_str(), "the OTP is last");

    // Resumed, the low lane routes every one of the blast, once.
    for p in 0..partitions {
        inbox
            .resume_consumer(&router_consumer(p, Priority::Low))
            .await?;
    }
    let mut routed = HashSet::new();
    while routed.len() < BACKLOG {
        let job = jobs.next(Duration::from_secs(30)).await?;
        ensure!(
            job.priority == Priority::Low,
            "only the blast is left: {job:?}"
        );
        ensure!(low.contains(&job.id), "a job of the blast: {job:?}");
        ensure!(routed.insert(job.id.clone()), "routed twice: {job:?}");
    }
    Ok(())
}

/// What needs nothing beyond the inbox is stored under the inbox-only lane, which no router
/// consumer filters: the router is never handed it, yet it is in the inbox, in order with
/// the rest, and delivered live.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn inbox_only_notifications_never_reach_the_router() -> anyhow::Result<()> {
    const INBOX_ONLY: usize = 20;
    let nats = Nats::single().await?;
    let herald = Herald::builder(&nats).start().await?;
    let r = herald
        .user(Method::POST, "/v1/me/devices", "ines")
        .json(&json!({"platform": "ios", "token": "b".repeat(64)}))
        .send()
        .await?;
    ensure!(r.status().is_success(), "device: {}", r.status());
    let mut ws = herald.ws("ines", herald_tests::Resume::After(0)).await?;
    ws.hello().await?;
    let mut jobs = JobFeed::open(&herald).await?;

    let mut sent = Vec::new();
    for i in 0..INBOX_ONLY {
        let priority = Priority::ALL[i % Priority::ALL.len()].as_str();
        sent.push(
            herald
                .accept(&json!({"user_id": "ines", "title": format!("inbox {i}"), "priority": priority}))
                .await?,
        );
    }
    // Then one that the router must route, in the same lane as most of the above.
    let routed = herald
        .accept(&json!({"user_id": "ines", "title": "routed", "channels": ["inbox", "push"]}))
        .await?;
    sent.push(routed.clone());

    let job = jobs.next(Duration::from_secs(30)).await?;
    ensure!(
        job.id == routed.id,
        "the only job is the routed one: {job:?}"
    );

    // Every router consumer together was handed exactly one message, and none is waiting.
    let js = jetstream::new(herald.nats_client().await?);
    let inbox = js.get_stream(INBOX).await?;
    let (mut delivered, mut pending) = (0, 0);
    for p in 0..herald.subjects().partitions() {
        for lane in Priority::ALL {
            let info = inbox.consumer_info(&router_consumer(p, lane)).await?;
            delivered += info.delivered.consumer_sequence;
            pending += info.num_pending;
        }
    }
    ensure!(
        delivered == 1,
        "router consumers were handed {delivered} messages, not 1"
    );
    ensure!(
        pending == 0,
        "router consumers have {pending} messages pending"
    );

    // The inbox holds all of them in order, and the live connection got all of them.
    let stored = herald.inbox("ines").await?;
    let ids: Vec<_> = stored
        .iter()
        .map(|n| n["id"].as_str().unwrap_or(""))
        .collect();
    let want: Vec<_> = sent.iter().map(|a| a.id.as_str()).collect();
    ensure!(ids == want, "inbox order: {ids:?} != {want:?}");
    let live = ws.take(sent.len()).await?;
    let seqs: Vec<_> = live
        .iter()
        .map(|n| n["seq"].as_u64().unwrap_or(0))
        .collect();
    let want: Vec<_> = sent.iter().map(|a| a.seq).collect();
    ensure!(seqs == want, "live seqs: {seqs:?} != {want:?}");
    Ok(())
}

/// A work queue's limit is per lane: a blast that fills `low` to its cap is refused
/// there (backpressure on the router, nothing dropped) while an OTP on `high` is still
/// taken. With one limit for the whole stream the OTP would be refused too.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_low_lane_never_refuses_a_high_job() -> anyhow::Result<()> {
    use herald_protocol::Channel;
    use herald_protocol::streams::StreamSettings;
    let nats = Nats::single().await?;
    let js = jetstream::new(nats.client().await?);
    let subjects = herald_protocol::Subjects::default();
    let settings = StreamSettings {
        work_max_msgs: 5,
        ..StreamSettings::default()
    };
    // The shape earlier versions provisioned (one limit for the whole stream), which
    // provisioning must update in place.
    js.create_stream(jetstream::stream::Config {
        name: herald_protocol::streams::work_stream_name(Channel::Push).to_string(),
        subjects: vec![subjects.work_channel(Channel::Push)],
        retention: jetstream::stream::RetentionPolicy::WorkQueue,
        max_messages: 5,
        discard: jetstream::stream::DiscardPolicy::New,
        ..Default::default()
    })
    .await?;
    let first = herald_store::provision::provision(&js, &subjects, &settings).await?;
    ensure!(
        first.updated.iter().any(|s| s == "HERALD_WORK_PUSH"),
        "the old work stream is updated in place: {first:?}"
    );
    let low = subjects.work(Channel::Push, Priority::Low);
    for i in 0..5 {
        js.publish(low.clone(), format!("blast {i}").into())
            .await?
            .await
            .context("the low lane takes jobs up to its cap")?;
    }
    let refused = js.publish(low.clone(), "one too many".into()).await?.await;
    ensure!(refused.is_err(), "the full low lane refuses: {refused:?}");
    let high = subjects.work(Channel::Push, Priority::High);
    js.publish(high, "otp".into())
        .await?
        .await
        .context("the high lane still takes jobs while low is full")?;
    // Provisioning again changes nothing: the per-lane limit is what it compares with.
    let again = herald_store::provision::provision(&js, &subjects, &settings).await?;
    ensure!(
        again.updated.is_empty(),
        "re-provisioning updated {:?}",
        again.updated
    );
    Ok(())
}
