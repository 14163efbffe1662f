//! Hostile user ids: wildcards, dots, spaces, unicode, `$JS` subjects and slashes stay in
//! their own inbox on every path.

use anyhow::Context as _;
use futures::StreamExt as _;
use herald_protocol::UserId;
use herald_tests::{Herald, Nats, Resume, SseClient, WsClient, encode};
use reqwest::{Method, StatusCode};
use serde_json::{Value, json};
use std::collections::HashMap;

fn hostile_ids() -> Vec<String> {
    let mut ids: Vec<String> = [
        "*",
        ">",
        "a.b",
        "bob",
        "bob.x",
        "bob.*",
        "bob.>",
        "with space",
        "ünï 🚀",
        "$JS.API.>",
        "a/b",
        "../etc/passwd",
        "%2F",
        "herald.live.>",
    ]
    .map(String::from)
    .to_vec();
    // 128 bytes exactly, ending in a 4-byte character.
    ids.push(format!("{}🚀🚀", "x".repeat(120)));
    ids
}

fn ids_of(items: &[Value]) -> Vec<String> {
    items
        .iter()
        .filter_map(|n| n["id"].as_str().map(String::from))
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hostile_ids_each_page_only_their_own_inbox() -> anyhow::Result<()> {
    let nats = Nats::single().await?;
    let herald = Herald::builder(&nats).start().await?;
    let ids = hostile_ids();
    let mut sent: HashMap<&str, Vec<String>> = HashMap::new();
    for round in 0..2 {
        for id in &ids {
            let accepted = herald
                .send(id, &format!("{id} #{round}"))
                .await
                .context(id.clone())?;
            sent.entry(id).or_default().push(accepted.id);
        }
    }
    for id in &ids {
        let by_producer = herald.inbox(id).await.context(id.clone())?;
        assert_eq!(
            ids_of(&by_producer),
            sent[id.as_str()],
            "producer page of {id:?}"
        );
        assert!(
            by_producer.iter().all(|n| n["user_id"] == id.as_str()),
            "{id:?}: {by_producer:?}"
        );
        let mine = herald.my_page(id, "after=0&limit=500").await?;
        let mine = mine["items"].as_array().cloned().unwrap_or_default();
        assert_eq!(ids_of(&mine), sent[id.as_str()], "own page of {id:?}");
    }

    let too_long = "y".repeat(129);
    let response = herald
        .notify(&json!({"user_id": too_long, "title": "x"}))
        .await?;
    assert_eq!(response.status(), StatusCode::BAD_REQUEST);
    let body: Value = response.json().await?;
    assert_eq!(body["error"]["field"], "user_id", "{body}");
    let path = format!("/v1/users/{}/notifications", encode(&too_long));
    let response = herald.producer(Method::GET, &path).send().await?;
    assert_eq!(response.status(), StatusCode::BAD_REQUEST);
    Ok(())
}

/// A WebSocket and an SSE stream of one user, hello already read.
struct Clients {
    ws: WsClient,
    sse: SseClient,
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hostile_ids_receive_only_their_own_live_notifications() -> anyhow::Result<()> {
    let nats = Nats::single().await?;
    let herald = Herald::builder(&nats).start().await?;
    // Every message Herald republishes for live delivery, seen natively.
    let client = nats.client().await?;
    let mut tap = client.subscribe("herald.live.>").await?;
    client.flush().await?;

    let ids = hostile_ids();
    let listeners = ["*", ">", "bob.*", "bob.>", "$JS.API.>", "herald.live.>"];
    let mut clients = HashMap::new();
    for id in listeners {
        let mut ws = herald.ws(id, Resume::Live).await?;
        assert_eq!(ws.hello().await?["user_id"], id);
        let mut sse = herald.sse(id, Resume::Live).await?;
        assert_eq!(sse.next_event().await?.json()?["user_id"], id);
        clients.insert(id, Clients { ws, sse });
    }
    // Everyone gets one, then each listener a last one: anything that leaked to a
    // listener arrives before its last one.
    let mut own = HashMap::new();
    for id in &ids {
        own.insert(id.as_str(), vec![herald.send(id, "for you").await?.id]);
    }
    for id in listeners {
        own.get_mut(id)
            .context("listener in ids")?
            .push(herald.send(id, "last").await?.id);
    }
    for (id, c) in &mut clients {
        let over_ws = c.ws.take(2).await?;
        assert_eq!(
            ids_of(&over_ws),
            own[id],
            "{id:?} over WebSocket got exactly its own"
        );
        let over_sse = c.sse.take(2).await?;
        assert_eq!(
            ids_of(&over_sse),
            own[id],
            "{id:?} over SSE got exactly its own"
        );
    }

    // At the NATS level: each message went to its own user's subject, and no two users
    // share one.
    let total = ids.len() + listeners.len();
    let mut subject_of: HashMap<String, String> = HashMap::new();
    for _ in 0..total {
        let msg = herald_tests::within(
            std::time::Duration::from_secs(5),
            "tapped live message",
            tap.next(),
        )
        .await?
        .context("tap ended")?;
        let n: Value = serde_json::from_slice(&msg.payload)?;
        let user = n["user_id"].as_str().context("stored without user_id")?;
        let expected = herald.subjects().live(&UserId::new(user)?);
        assert_eq!(
            msg.subject.as_str(),
            expected,
            "{user:?} published off its own subject"
        );
        let tokens: Vec<&str> = expected.split('.').collect();
        assert_eq!(tokens.len(), 4, "{expected}");
        assert!(tokens.iter().all(|t| *t != "*" && *t != ">"), "{expected}");
        if let Some(previous) = subject_of.insert(expected.clone(), user.to_string()) {
            assert_eq!(previous, user, "two users share the subject {expected}");
        }
    }
    assert_eq!(subject_of.len(), ids.len(), "one subject per user");
    Ok(())
}
