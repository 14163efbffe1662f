//! `herald topic subscribe|publish|info` against a running `herald up`: the real binary
//! on both sides, a real nats-server. Bulk subscribe from a file spans several requests
//! (`--batch`); publish follows the fan-out to `done` and prints it.

use herald_protocol::{Subjects, UserId};
use herald_store::Inbox;
use std::process::Stdio;
use std::time::Duration;
use tokio::io::{AsyncBufReadExt as _, BufReader};
use tokio::process::Command;

const KEY: &str = "hk_topic_cli_test_key_0123456789ab";
const SECRET: &str = "topic-cli-test-secret-0123456789abcdef";
const SUBSCRIBERS: usize = 2_345;

/// Runs `herald topic …` and returns its stdout as JSON; fails the test on a non-zero exit.
async fn topic(api: &str, args: &[&str]) -> serde_json::Value {
    let out = Command::new(env!("CARGO_BIN_EXE_herald"))
        .arg("topic")
        .args(args)
        .args(["--api-url", api, "--api-key", KEY])
        .output()
        .await
        .expect("run herald topic");
    assert!(
        out.status.success(),
        "herald topic {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).expect("herald topic prints JSON on stdout")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn subscribe_from_a_file_then_publish_and_follow_to_done() {
    let dir = tempfile::tempdir().expect("tempdir");
    let nats = herald_natsd::NatsServer::start(herald_natsd::NatsServerOptions::dev(
        dir.path().join("nats"),
    ))
    .await
    .expect("nats-server starts");
    let url = nats.client_url();
    let mut up = Command::new(env!("CARGO_BIN_EXE_herald"))
        .args(["up", "--nats-url", &url, "--http-addr", "127.0.0.1:0"])
        .args(["--api-key", KEY, "--jwt-secret", SECRET])
        .arg("--data-dir")
        .arg(dir.path().join("data"))
        .env("HERALD_LOG", "info")
        .env("HERALD_LOG_FORMAT", "json")
        .stderr(Stdio::piped())
        .stdout(Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .expect("spawn herald up");
    let mut lines = BufReader::new(up.stderr.take().expect("stderr piped")).lines();
    let addr = tokio::time::timeout(Duration::from_secs(60), async {
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
    .expect("herald up announces its address in time")
    .expect("address in the log");
    tokio::spawn(async move { while let Ok(Some(_)) = lines.next_line().await {} });
    let api = format!("http://{addr}");

    // 2,345 ids in a file (with a blank line): three bulk requests of up to 1,000.
    let ids: Vec<String> = (0..SUBSCRIBERS).map(|i| format!("cli-{i}")).collect();
    let file = dir.path().join("users.txt");
    std::fs::write(&file, format!("{}\n\n", ids.join("\n"))).expect("write ids");
    let file = file.to_str().expect("utf-8 path");
    let subscribed = topic(
        &api,
        &["subscribe", "cli.news", "--file", file, "--batch", "1000"],
    )
    .await;
    assert_eq!(subscribed["requested"], SUBSCRIBERS);
    assert_eq!(subscribed["subscribers"], SUBSCRIBERS);
    let info = topic(&api, &["info", "cli.news"]).await;
    assert_eq!(info["subscribers"], SUBSCRIBERS);

    // Publish and follow: the command returns when the fan-out says done.
    let done = topic(
        &api,
        &[
            "publish",
            "cli.news",
            "--title",
            "Release 2.0",
            "--channels",
            "inbox",
            "--idempotency-key",
            "cli-release-2",
        ],
    )
    .await;
    assert_eq!(done["fanout"]["state"], "done", "{done}");
    assert_eq!(done["fanout"]["total"], SUBSCRIBERS);
    assert_eq!(done["fanout"]["done"], SUBSCRIBERS);
    let id = done["publish"]["id"].as_str().expect("publish id");

    // Every subscriber's view holds it: check the first and the last.
    let client = herald_store::connect(&url, "topic-cli-test")
        .await
        .expect("connect");
    let inbox = Inbox::new(client, Subjects::default());
    for i in [0, SUBSCRIBERS - 1] {
        let user = UserId::new(format!("cli-{i}")).expect("user id");
        let page = inbox.after(&user, 0, 10).await.expect("read inbox");
        assert_eq!(page.items.len(), 1, "cli-{i}: {page:?}");
        assert_eq!(page.items[0].1.title.as_deref(), Some("Release 2.0"));
    }

    // The same idempotency key again: the same publish, and `progress` finds it done.
    let again = topic(
        &api,
        &[
            "publish",
            "cli.news",
            "--title",
            "Release 2.0",
            "--idempotency-key",
            "cli-release-2",
            "--no-wait",
        ],
    )
    .await;
    assert_eq!(again["id"], id);
    let progress = topic(&api, &["progress", "cli.news", id]).await;
    assert_eq!(progress["fanout"]["done"], SUBSCRIBERS);

    // A wrong key is the API's 401, shown with its reason, and a non-zero exit.
    let out = Command::new(env!("CARGO_BIN_EXE_herald"))
        .args(["topic", "info", "cli.news", "--api-url", &api])
        .args(["--api-key", "hk_not_a_key_of_this_herald_000000"])
        .output()
        .await
        .expect("run herald topic");
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("401"), "{stderr}");
    up.kill().await.expect("stop herald up");
}
