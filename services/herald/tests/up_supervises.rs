//! `herald up` supervises its child nats-server: killed (as the OOM killer would), it is
//! started again on the same ports and store, Herald reconnects by itself, and Ctrl-C
//! still stops both.

use std::process::Stdio;
use std::time::Duration;
use tokio::io::{AsyncBufReadExt as _, BufReader};
use tokio::process::Command;

/// The JSON log lines whose messages are `messages`, whatever their order.
async fn all_logged(
    lines: &mut tokio::io::Lines<BufReader<tokio::process::ChildStderr>>,
    messages: &[&str],
) -> Vec<serde_json::Value> {
    let mut found: Vec<Option<serde_json::Value>> = vec![None; messages.len()];
    tokio::time::timeout(Duration::from_secs(60), async {
        while found.iter().any(Option::is_none) {
            let line = lines
                .next_line()
                .await
                .expect("read stderr")
                .unwrap_or_else(|| panic!("herald up ended before logging {messages:?}"));
            if let Ok(v) = serde_json::from_str::<serde_json::Value>(&line)
                && let Some(i) = messages.iter().position(|m| v["fields"]["message"] == *m)
            {
                found[i] = Some(v);
            }
        }
    })
    .await
    .unwrap_or_else(|_| panic!("not all of {messages:?} in time"));
    found.into_iter().flatten().collect()
}

/// The next JSON log line whose message is `message`.
async fn logged(
    lines: &mut tokio::io::Lines<BufReader<tokio::process::ChildStderr>>,
    message: &str,
) -> serde_json::Value {
    tokio::time::timeout(Duration::from_secs(60), async {
        while let Some(line) = lines.next_line().await.expect("read stderr") {
            if let Ok(v) = serde_json::from_str::<serde_json::Value>(&line)
                && v["fields"]["message"] == message
            {
                return v;
            }
        }
        panic!("herald up ended before logging {message:?}");
    })
    .await
    .unwrap_or_else(|_| panic!("no {message:?} in time"))
}

fn signal(pid: &str, name: &str) {
    let status = std::process::Command::new("kill")
        .args([&format!("-{name}"), pid])
        .status()
        .expect("run kill");
    assert!(status.success(), "kill -{name} {pid}");
}

#[tokio::test]
async fn a_killed_nats_server_is_started_again() {
    let dir = tempfile::tempdir().expect("tempdir");
    let bin = env!("CARGO_BIN_EXE_herald");
    let mut up = Command::new(bin)
        .args(["up", "--http-addr", "127.0.0.1:0", "--data-dir"])
        .arg(dir.path())
        .env("HERALD_LOG", "info")
        .env("HERALD_LOG_FORMAT", "json")
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .expect("spawn herald up");
    let stderr = up.stderr.take().expect("stderr piped");
    let mut lines = BufReader::new(stderr).lines();
    // Started through: serving, and the router and fan-out have opened their consumers
    // (they wait for a NATS that is away while they do; this test is about one that
    // dies later).
    let started = all_logged(
        &mut lines,
        &[
            "started nats-server",
            "herald serving",
            "router running",
            "fan-out running",
        ],
    )
    .await;
    let pid = started[0]["fields"]["pid"].to_string();
    let addr = started[1]["fields"]["addr"]
        .as_str()
        .expect("addr")
        .to_owned();

    signal(&pid, "KILL");
    let again = logged(&mut lines, "nats-server restarted").await;
    let new_pid = again["fields"]["pid"].to_string();
    assert_ne!(new_pid, pid);
    // Herald's clients find the server again by themselves.
    let http = reqwest::Client::new();
    let ready = tokio::time::timeout(Duration::from_secs(60), async {
        loop {
            if let Ok(r) = http.get(format!("http://{addr}/readyz")).send().await
                && r.status() == 200
            {
                return;
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    })
    .await;
    assert!(
        ready.is_ok(),
        "/readyz never answered 200 after the restart"
    );

    // Ctrl-C stops Herald, which stops its nats-server (its own process group).
    let drain = tokio::spawn(async move {
        let mut last = Vec::new();
        while let Ok(Some(line)) = lines.next_line().await {
            last.push(line);
        }
        last
    });
    signal(&up.id().expect("pid").to_string(), "INT");
    let status = tokio::time::timeout(Duration::from_secs(30), up.wait())
        .await
        .expect("herald up stops in time")
        .expect("wait");
    let last = drain.await.expect("stderr drained");
    assert!(status.success(), "{status}: {}", last.join("\n"));
    assert!(
        !std::path::Path::new(&format!("/proc/{new_pid}")).exists(),
        "nats-server {new_pid} outlived herald up"
    );
}
