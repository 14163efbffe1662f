//! The `herald` binary killed with SIGKILL mid-load loses nothing it accepted: every 202
//! it answered is in the user's inbox afterwards. Runs the real binary against a real
//! nats-server.

use herald_protocol::{Subjects, UserId};
use herald_store::Inbox;
use std::collections::HashSet;
use std::process::Stdio;
use std::time::Duration;
use tokio::io::{AsyncBufReadExt as _, BufReader};
use tokio::process::Command;

const KEY: &str = "hk_process_kill_test_key_0123456789";
const SECRET: &str = "process-kill-test-secret-0123456789abcdef";

#[tokio::test]
async fn sigkill_loses_nothing_accepted() {
    let dir = tempfile::tempdir().expect("tempdir");
    let nats = herald_natsd::NatsServer::start(herald_natsd::NatsServerOptions::dev(
        dir.path().join("nats"),
    ))
    .await
    .expect("nats-server starts");
    let url = nats.client_url();
    let bin = env!("CARGO_BIN_EXE_herald");

    let provision = Command::new(bin)
        .args(["provision", "--nats-url", &url])
        .env_remove("HERALD_API_KEY")
        .output()
        .await
        .expect("run herald provision");
    assert!(provision.status.success(), "provision: {provision:?}");

    let mut api = Command::new(bin)
        .args(["api", "--nats-url", &url, "--http-addr", "127.0.0.1:0"])
        .args(["--api-key", KEY, "--jwt-secret", SECRET])
        .env("HERALD_LOG", "info")
        .env("HERALD_LOG_FORMAT", "json")
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .expect("spawn herald api");
    let stderr = api.stderr.take().expect("stderr piped");
    let mut lines = BufReader::new(stderr).lines();
    let addr = tokio::time::timeout(Duration::from_secs(30), async {
        while let Some(line) = lines.next_line().await.expect("read stderr") {
            let Ok(v) = serde_json::from_str::<serde_json::Value>(&line) else {
                continue;
            };
            if v["fields"]["message"] == "herald serving" {
                return v["fields"]["addr"].as_str().map(str::to_string);
            }
        }
        None
    })
    .await
    .expect("herald api announces its address in time")
    .expect("address in the log");
    // Keep draining stderr so the child never blocks on a full pipe.
    tokio::spawn(async move { while let Ok(Some(_)) = lines.next_line().await {} });

    let client = reqwest::Client::new();
    let url_notify = format!("http://{addr}/v1/notify");
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<String>();
    let mut senders = tokio::task::JoinSet::new();
    for worker in 0..16 {
        let (client, url_notify, tx) = (client.clone(), url_notify.clone(), tx.clone());
        senders.spawn(async move {
            for i in 0.. {
                let body = serde_json::json!({"user_id": format!("k{}", worker % 4), "title": format!("{worker}-{i}")});
                let Ok(resp) = client.post(&url_notify).bearer_auth(KEY).json(&body).send().await else {
                    break; // the process is gone
                };
                if resp.status() == reqwest::StatusCode::ACCEPTED {
                    let v: serde_json::Value = resp.json().await.expect("202 body");
                    let _ = tx.send(v["id"].as_str().expect("id").to_string());
                }
            }
        });
    }
    drop(tx);
    // Kill once a good number have been accepted, while requests are still in flight.
    let mut accepted = HashSet::new();
    while accepted.len() < 300 {
        let id = tokio::time::timeout(Duration::from_secs(30), rx.recv())
            .await
            .expect("notifications keep being accepted")
            .expect("senders alive");
        accepted.insert(id);
    }
    api.start_kill().expect("SIGKILL");
    let status = api.wait().await.expect("reap");
    assert!(!status.success(), "killed, not exited: {status:?}");
    while senders.join_next().await.is_some() {}
    while let Some(id) = rx.recv().await {
        accepted.insert(id);
    }

    let conn = herald_store::connect(&url, "kill-test")
        .await
        .expect("connect");
    let inbox = Inbox::new(conn, Subjects::default());
    let mut stored = HashSet::new();
    for u in 0..4 {
        let user = UserId::new(format!("k{u}")).expect("user id");
        let mut after = 0;
        loop {
            let page = inbox.after(&user, after, 500).await.expect("read inbox");
            let Some((last, _)) = page.items.last() else {
                break;
            };
            after = *last;
            stored.extend(page.items.into_iter().map(|(_, n)| n.id));
        }
    }
    let lost: Vec<_> = accepted.difference(&stored).collect();
    assert!(
        lost.is_empty(),
        "{} accepted notifications lost: {lost:?}",
        lost.len()
    );
    assert!(accepted.len() >= 300);
}
