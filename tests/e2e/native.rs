//! The native path: JetStream publishes on `herald.notify`, answered with JetStream's own
//! PubAck for the inbox append (or Herald's, with the reason, for a rejected body).

use anyhow::Context as _;
use async_nats::HeaderMap;
use async_nats::jetstream::{self, context::PublishAckFuture};
use herald_tests::{Herald, Nats, Resume};
use serde_json::json;
use std::time::Duration;

const INBOX: &str = "HERALD_INBOX";
const REJECTED: &str = "HERALD_REJECTED";

async fn publish(
    js: &jetstream::Context,
    msg_id: Option<&str>,
    body: &str,
) -> anyhow::Result<jetstream::publish::PublishAck> {
    let mut headers = HeaderMap::new();
    if let Some(id) = msg_id {
        headers.insert("Nats-Msg-Id", id);
    }
    let ack: PublishAckFuture = js
        .publish_with_headers("herald.notify", headers, body.to_string().into())
        .await
        .context("publishing on herald.notify")?;
    ack.await.with_context(|| format!("no PubAck for {body:?}"))
}

/// The id of the notification a native producer published with `Nats-Msg-Id` = `key`.
fn native_id(key: &str) -> String {
    herald_protocol::notification::idempotent_id(herald_api::ingest::NATIVE_PRODUCER, key)
        .to_string()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn native_publish_is_acked_once_durable_and_delivered() -> anyhow::Result<()> {
    let nats = Nats::single().await?;
    let herald = Herald::builder(&nats).start().await?;
    let js = jetstream::new(herald.nats_client().await?);
    let mut ws = herald.ws("nina", Resume::Live).await?;
    ws.hello().await?;

    let body =
        json!({"user_id": "nina", "title": "from a service", "priority": "high"}).to_string();
    let ack = publish(&js, Some("order-7-paid"), &body).await?;
    assert_eq!(ack.stream, INBOX);
    assert!(ack.sequence > 0 && !ack.duplicate, "{ack:?}");
    let got = ws.take(1).await?;
    assert_eq!(got[0]["seq"], ack.sequence);
    assert_eq!(got[0]["title"], "from a service");
    assert_eq!(got[0]["priority"], "high");

    // The same Nats-Msg-Id again: the first answer, one inbox entry.
    let again = publish(&js, Some("order-7-paid"), &body).await?;
    assert_eq!(again.sequence, ack.sequence, "{again:?}");
    assert!(again.duplicate, "{again:?}");
    let inbox = herald.inbox("nina").await?;
    assert_eq!(inbox.len(), 1, "{inbox:?}");
    assert_eq!(
        inbox[0]["id"], got[0]["id"],
        "same id on the native path and the WebSocket"
    );
    // The ack is JetStream's own and names no id: the producer derives it from its key.
    assert_eq!(inbox[0]["id"], native_id("order-7-paid"));
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn native_scheduled_publish_is_acked_by_its_schedule_and_fires() -> anyhow::Result<()> {
    let nats = Nats::single().await?;
    let herald = Herald::builder(&nats).start().await?;
    let js = jetstream::new(herald.nats_client().await?);
    let mut ws = herald.ws("pia", Resume::After(0)).await?;
    ws.hello().await?;
    let (_, send_at) = herald_tests::send_at_in(1000);
    let body = json!({"user_id": "pia", "title": "soon", "send_at": send_at}).to_string();
    let ack = publish(&js, Some("pia-soon"), &body).await?;
    assert_eq!(ack.stream, INBOX, "{ack:?}");
    assert!(!ack.duplicate, "{ack:?}");
    assert!(herald.inbox("pia").await?.is_empty(), "not before its time");
    let fired = herald_tests::within(Duration::from_secs(20), "the schedule", ws.take(1)).await??;
    assert_eq!(fired[0]["title"], "soon");
    assert_eq!(fired[0]["id"], native_id("pia-soon"));
    assert!(
        fired[0]["seq"].as_u64() > Some(ack.sequence),
        "fired after its schedule was stored: {fired:?}"
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn native_producer_gets_jetstreams_refusal_never_a_false_ack() -> anyhow::Result<()> {
    let nats = Nats::single().await?;
    let herald = Herald::builder(&nats).start().await?;
    let client = herald.nats_client().await?;
    let js = jetstream::new(client.clone());
    let body = json!({"user_id": "quinn", "title": "before"}).to_string();
    publish(&js, Some("quinn-1"), &body).await?;
    // Seal the inbox: JetStream now refuses every append.
    let mut stream = js.get_stream(INBOX).await?;
    let mut config = stream.info().await?.config.clone();
    config.sealed = true;
    js.update_stream(config).await?;

    let body = json!({"user_id": "quinn", "title": "refused"}).to_string();
    let refused = publish(&js, Some("quinn-2"), &body).await;
    let error = refused.expect_err("a sealed inbox cannot ack an append");
    assert!(
        format!("{error:#}").contains("sealed"),
        "JetStream's own refusal reaches the producer: {error:#}"
    );
    let inbox = herald.inbox("quinn").await?;
    assert_eq!(inbox.len(), 1, "{inbox:?}");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn native_bad_input_is_acked_recorded_and_never_blocks() -> anyhow::Result<()> {
    let nats = Nats::single().await?;
    let herald = Herald::builder(&nats).start().await?;
    let js = jetstream::new(herald.nats_client().await?);
    let mut ws = herald.ws("olga", Resume::Live).await?;
    ws.hello().await?;
    let rejected = js
        .get_stream(REJECTED)
        .await
        .context("the REJECTED stream")?;

    let cases = [
        ("bad-json", "this is not JSON", "body"),
        ("no-user", r#"{"title":"who is this for?"}"#, "user_id"),
        ("wrong-type", r#"{"user_id":"olga","title":7}"#, "title"),
    ];
    for (msg_id, body, field) in cases {
        let ack = publish(&js, Some(msg_id), body).await?;
        assert_eq!(
            ack.stream, REJECTED,
            "{msg_id}: acked by the REJECTED stream: {ack:?}"
        );
        let stored = rejected
            .get_raw_message(ack.sequence)
            .await
            .context("reading the rejected message")?;
        assert_eq!(
            &stored.payload[..],
            body.as_bytes(),
            "{msg_id}: recorded as sent"
        );
        let reason = stored
            .headers
            .get("Herald-Reason")
            .with_context(|| format!("{msg_id}: no Herald-Reason header"))?
            .as_str()
            .to_string();
        assert!(
            reason.contains(field),
            "{msg_id}: the reason {reason:?} names {field}"
        );
        assert_eq!(
            stored.headers.get("Herald-Msg-Id").map(|v| v.as_str()),
            Some(msg_id)
        );

        // The next valid message goes through at once: bad input never blocks the path.
        let good = json!({"user_id": "olga", "title": format!("after {msg_id}")}).to_string();
        let ack = publish(&js, Some(&format!("good-after-{msg_id}")), &good).await?;
        assert_eq!(ack.stream, INBOX);
        let got = ws.take(1).await?;
        assert_eq!(got[0]["seq"], ack.sequence);
        assert_eq!(got[0]["title"], format!("after {msg_id}"));
    }
    let mut rejected = rejected;
    assert_eq!(
        rejected.info().await?.state.messages,
        3,
        "each bad message recorded once"
    );
    assert_eq!(
        herald.inbox("olga").await?.len(),
        3,
        "only the good ones reached the inbox"
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn native_answers_never_go_to_system_or_herald_subjects() -> anyhow::Result<()> {
    let nats = Nats::single().await?;
    let herald = Herald::builder(&nats).start().await?;
    let client = herald.nats_client().await?;
    let victim = herald_protocol::UserId::new("victim")?;
    // A producer names the victim's read position and inbox as reply subjects.
    let read_key = format!("$KV.herald_reads.{}", victim.token());
    let victim_inbox = herald
        .subjects()
        .inbox_entry(&victim, herald_protocol::Priority::Normal);
    let mut watch_kv = client.subscribe(read_key.clone()).await?;
    let mut watch_inbox = client.subscribe(victim_inbox.clone()).await?;
    let body = json!({"user_id": "mallory", "title": "x"}).to_string();
    for reply in [read_key, victim_inbox] {
        client
            .publish_with_reply("herald.notify", reply, body.clone().into())
            .await?;
    }
    // A proper request after them is answered: the two before it were processed.
    let js = jetstream::new(client.clone());
    publish(&js, None, &body).await?;
    assert_eq!(herald.inbox("mallory").await?.len(), 3);
    assert!(herald.inbox("victim").await?.is_empty());
    client.flush().await?;
    use futures::FutureExt as _;
    use futures::StreamExt as _;
    assert!(watch_kv.next().now_or_never().is_none(), "answered on $KV");
    assert!(
        watch_inbox.next().now_or_never().is_none(),
        "answered on an inbox subject"
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn native_oversized_notification_is_rejected_not_retried() -> anyhow::Result<()> {
    let nats = Nats::single().await?;
    let herald = Herald::builder(&nats).start().await?;
    let js = jetstream::new(herald.nats_client().await?);
    let big = "x".repeat(200 * 1024);
    let body = json!({"user_id": "olga", "title": "big", "data": {"blob": big}}).to_string();
    let ack = publish(&js, Some("too-big-1"), &body).await?;
    assert_eq!(ack.stream, REJECTED, "{ack:?}");
    assert!(herald.inbox("olga").await?.is_empty());
    Ok(())
}
