//! The gateway's live hub: one subscription per partition, connections registered by
//! subject and removed when they go, and a connection whose live queue overflows catches
//! up from the inbox instead of losing notifications.

use anyhow::Context as _;
use herald_gateway::{Feed, Hub};
use herald_protocol::UserId;
use herald_tests::{Herald, Nats, Resume, eventually};
use reqwest::Method;
use serde_json::{Value, json};
use std::time::Duration;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_subscription_per_partition_not_per_connection() -> anyhow::Result<()> {
    let nats = Nats::single().await?;
    let herald = Herald::builder(&nats).partitions(4).start().await?;
    let mut clients = Vec::new();
    for i in 0..12 {
        let mut ws = herald.ws(&format!("user{i}"), Resume::Live).await?;
        ws.hello().await?;
        clients.push(ws);
    }
    // A message to any user reaches the gateway through its partition's subscription,
    // and no connection has a subscription of its own.
    for i in 0..12 {
        let user = UserId::new(format!("user{i}"))?;
        let live = herald.subjects().live(&user);
        let partition = herald.subjects().live_partition(user.partition(4));
        let subs = nats.subscriptions_matching(&live).await?;
        assert!(subs.contains(&partition), "{live}: {subs:?}");
        assert!(
            !subs.contains(&live),
            "{live} has its own subscription: {subs:?}"
        );
    }
    let user0 = herald.subjects().live(&UserId::new("user0")?);
    assert!(herald.is_tapped(&user0));
    // Everyone gets their own, and only their own.
    for (i, ws) in clients.iter_mut().enumerate() {
        let n = herald.send(&format!("user{i}"), "hi").await?;
        let got = ws.take(1).await?;
        assert_eq!(got[0]["id"], n.id.as_str());
    }
    // Closing removes the registration.
    let first = clients.remove(0);
    first.close().await;
    eventually(Duration::from_secs(5), "user0 unregistered", || async {
        anyhow::ensure!(!herald.is_tapped(&user0));
        Ok(())
    })
    .await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_overflowing_tap_catches_up_from_the_inbox() -> anyhow::Result<()> {
    let nats = Nats::single().await?;
    let herald = Herald::builder(&nats).start().await?;
    let inbox = herald.store_inbox("hub-test").await?;
    let hub = Hub::start(inbox).await?;
    let user = UserId::new("yara")?;
    let mut feed = Feed::open(&hub, user.clone(), None, 0).await?;
    assert_eq!(hub.subjects_tapped(), 1);

    // 300 notifications while the feed is not read: far more than a tap queues.
    let items: Vec<Value> = (0..300)
        .map(|i| json!({"user_id": "yara", "title": format!("n{i}")}))
        .collect();
    let response = herald
        .producer(Method::POST, "/v1/notify/batch")
        .json(&json!({ "notifications": items }))
        .send()
        .await?;
    anyhow::ensure!(response.status() == 202);
    let body: Value = response.json().await?;
    let mut want: Vec<u64> = body["results"]
        .as_array()
        .context("results")?
        .iter()
        .filter_map(|r| r["seq"].as_u64())
        .collect();
    want.sort_unstable();
    anyhow::ensure!(want.len() == 300);

    let mut got = Vec::new();
    herald_tests::within(Duration::from_secs(20), "all 300 through the feed", async {
        while got.len() < 300 {
            got.extend(feed.next().await?.into_iter().map(|n| n.seq));
        }
        anyhow::Ok(())
    })
    .await??;
    assert_eq!(got, want, "every notification once, in order");
    drop(feed);
    assert_eq!(hub.subjects_tapped(), 0);
    Ok(())
}
