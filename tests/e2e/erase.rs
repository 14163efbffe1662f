//! GDPR erase: `DELETE /v1/users/{id}` removes the user's notifications, pending
//! schedules, preferences and read position, says what it removed, and touches no one else.

use anyhow::ensure;
use herald_auth::Scope;
use herald_tests::{Herald, Nats, eventually, send_at_in};
use reqwest::{Method, StatusCode};
use serde_json::{Value, json};
use std::time::Duration;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn erase_removes_everything_of_one_user_and_nothing_else() -> anyhow::Result<()> {
    let nats = Nats::single().await?;
    let notify_only = herald_auth::api_keys::generate();
    let herald = Herald::builder(&nats)
        .key(&notify_only, &[Scope::Notify])
        .start()
        .await?;
    let user = "zoe.*>";
    let mut seqs = Vec::new();
    for i in 0..3 {
        seqs.push(herald.send(user, &format!("n{i}")).await?.seq);
        herald.send("zed", &format!("n{i}")).await?;
    }
    let scheduled = herald
        .notify(&json!({"user_id": user, "title": "later", "send_at": send_at_in(8000).1}))
        .await?;
    ensure!(
        scheduled.status() == StatusCode::ACCEPTED,
        "schedule: {}",
        scheduled.status()
    );
    let token = herald.token(user);
    let put = herald
        .request(Method::PUT, "/v1/me/preferences")
        .bearer_auth(&token)
        .json(&json!({"opt_out": true}))
        .send()
        .await?;
    ensure!(put.status() == StatusCode::OK, "prefs: {}", put.status());
    let read = herald
        .request(Method::POST, "/v1/me/read")
        .bearer_auth(&token)
        .json(&json!({"up_to": seqs[1]}))
        .send()
        .await?;
    ensure!(read.status() == StatusCode::OK, "read: {}", read.status());

    let path = format!("/v1/users/{}", herald_tests::encode(user));
    let forbidden = herald
        .request(Method::DELETE, &path)
        .bearer_auth(&notify_only)
        .send()
        .await?;
    ensure!(
        forbidden.status() == StatusCode::FORBIDDEN,
        "notify scope: {}",
        forbidden.status()
    );

    // The mark-read above is batched by the gateway: wait until it is stored, so the
    // erase has something to remove.
    eventually(
        Duration::from_secs(10),
        "the read position stored",
        || async {
            let unread: Value = herald
                .request(Method::GET, "/v1/me/unread")
                .bearer_auth(&token)
                .send()
                .await?
                .json()
                .await?;
            ensure!(unread["unread"] == json!(1), "{unread}");
            Ok(())
        },
    )
    .await?;
    let answer: Value = herald
        .producer(Method::DELETE, &path)
        .send()
        .await?
        .json()
        .await?;
    ensure!(
        answer["removed"]
            == json!({
                "notifications": 3, "scheduled": 1, "preferences": true, "read_position": true,
                "seen_position": false, "devices_and_contact": true
            }),
        "{answer}"
    );
    ensure!(herald.inbox(user).await?.is_empty(), "inbox erased");
    ensure!(
        herald.inbox("zed").await?.len() == 3,
        "another user untouched"
    );
    let prefs: Value = herald
        .request(Method::GET, "/v1/me/preferences")
        .bearer_auth(&token)
        .send()
        .await?
        .json()
        .await?;
    ensure!(
        prefs["opt_out"] == json!(false),
        "preferences back to defaults: {prefs}"
    );

    // The erased schedule never fires: a notification scheduled after it arrives alone.
    // (The schedules are seconds away so that the erase surely comes first.)
    let sentinel = herald
        .notify(&json!({"user_id": user, "title": "sentinel", "send_at": send_at_in(9000).1}))
        .await?;
    ensure!(
        sentinel.status() == StatusCode::ACCEPTED,
        "sentinel: {}",
        sentinel.status()
    );
    let inbox = eventually(Duration::from_secs(30), "the sentinel fired", || async {
        let inbox = herald.inbox(user).await?;
        ensure!(!inbox.is_empty(), "not yet");
        Ok(inbox)
    })
    .await?;
    ensure!(
        inbox.len() == 1 && inbox[0]["title"] == "sentinel",
        "{inbox:?}"
    );
    Ok(())
}
