//! A three-node cluster with R3 streams: losing a node loses nothing that was accepted.

use anyhow::{Context as _, bail, ensure};
use herald_tests::{Herald, Nats, eventually, within};
use reqwest::StatusCode;
use serde_json::json;
use std::collections::HashSet;
use std::time::Duration;

const USER: &str = "zoe";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cluster_node_loss_keeps_every_accepted_notification() -> anyhow::Result<()> {
    let mut nats = Nats::cluster().await?;
    // Herald is given every node, comma-separated, as an operator would.
    let herald = Herald::builder(&nats).replicas(3).start().await?;
    let mut accepted = Vec::new();
    for i in 0..20 {
        accepted.push(herald.send(USER, &format!("before {i}")).await?);
    }

    nats.kill_node(0)?;
    // During the election a send may be refused with 503, never falsely accepted; every
    // 202 counts.
    let mut refused = 0;
    let mut after_loss = 0;
    within(
        Duration::from_secs(90),
        "20 sends accepted after losing a node",
        async {
            while after_loss < 20 {
                let response = herald
                    .notify(&json!({"user_id": USER, "title": format!("after {after_loss}")}))
                    .await?;
                match response.status() {
                    StatusCode::ACCEPTED => {
                        accepted.push(herald_tests::herald::accepted(response).await?);
                        after_loss += 1;
                    }
                    StatusCode::SERVICE_UNAVAILABLE => refused += 1,
                    other => bail!(
                        "unexpected {other}: {}",
                        response.text().await.unwrap_or_default()
                    ),
                }
            }
            anyhow::Ok(())
        },
    )
    .await??;
    tracing::info!(refused, "sends refused while the cluster recovered");

    let want: HashSet<&str> = accepted.iter().map(|a| a.id.as_str()).collect();
    let stored = eventually(Duration::from_secs(30), "the inbox is readable", || {
        herald.inbox(USER)
    })
    .await?;
    let got: HashSet<&str> = stored.iter().filter_map(|n| n["id"].as_str()).collect();
    let missing: Vec<_> = want.difference(&got).collect();
    ensure!(
        missing.is_empty(),
        "{} accepted notifications lost: {missing:?}",
        missing.len()
    );
    assert_eq!(stored.len(), accepted.len(), "no duplicates");
    let seqs: Vec<u64> = stored.iter().filter_map(|n| n["seq"].as_u64()).collect();
    ensure!(
        seqs.windows(2).all(|w| w[0] < w[1]),
        "inbox out of order: {seqs:?}"
    );
    let last = accepted.last().context("sent nothing")?;
    assert_eq!(stored.last().map(|n| n["id"].clone()), Some(json!(last.id)));
    Ok(())
}

/// `herald provision --replicas 3` after a start at R1 (a laptop's store moved onto a
/// cluster) moves every stream *and every KV bucket* to R3: device tokens, contact data
/// and sent markers must survive a node's loss like the inbox does.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn provisioning_again_at_r3_moves_every_bucket_to_r3() -> anyhow::Result<()> {
    use futures::TryStreamExt as _;
    let nats = Nats::cluster().await?;
    let js = async_nats::jetstream::new(nats.client().await?);
    let subjects = herald_protocol::Subjects::default();
    let r1 = herald_protocol::streams::StreamSettings::default();
    herald_store::provision::provision(&js, &subjects, &r1).await?;
    let r3 = herald_protocol::streams::StreamSettings {
        replicas: 3,
        ..r1.clone()
    };
    herald_store::provision::provision(&js, &subjects, &r3).await?;
    let names: Vec<String> = js.stream_names().try_collect().await?;
    ensure!(
        names.iter().any(|n| n.starts_with("KV_")),
        "buckets: {names:?}"
    );
    let mut single = Vec::new();
    for name in &names {
        let mut stream = js.get_stream(name).await?;
        let replicas = stream.info().await?.config.num_replicas;
        if replicas != 3 {
            single.push(format!("{name}: R{replicas}"));
        }
    }
    ensure!(single.is_empty(), "left below R3: {single:?}");
    let again = herald_store::provision::provision(&js, &subjects, &r3).await?;
    ensure!(
        again.updated.is_empty(),
        "nothing left to update: {again:?}"
    );
    Ok(())
}
