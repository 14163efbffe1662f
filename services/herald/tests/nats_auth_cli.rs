//! The `herald` binary authenticates to NATS as configured — by flag, environment or
//! config file — in every command that connects: `provision` and the services. A missing
//! file is a configuration error (exit 2) naming its setting and path; a refused
//! credential ends the command (exit 1) naming what to check; `token`, which never
//! connects, does not care.

use std::path::{Path, PathBuf};
use std::process::{Output, Stdio};
use std::time::Duration;
use tokio::io::{AsyncBufReadExt as _, BufReader};
use tokio::process::Command;

const KEY: &str = "hk_nats_auth_cli_test_key_0123456789";
const SECRET: &str = "nats-auth-cli-test-secret-0123456789abcdef";

/// A nats-server from `nats/dev.conf` that admits only `user`.
async fn guarded_server(dir: &Path, user: &nkeys::KeyPair) -> herald_natsd::NatsServer {
    std::fs::write(dir.join("dev.conf"), herald_natsd::DEV_CONFIG).expect("write dev.conf");
    let config = dir.join("guarded.conf");
    std::fs::write(
        &config,
        format!(
            "include \"dev.conf\"\nauthorization {{\n  users: [ {{ nkey: {} }} ]\n}}\n",
            user.public_key()
        ),
    )
    .expect("write guarded.conf");
    herald_natsd::NatsServer::start(herald_natsd::NatsServerOptions {
        config: herald_natsd::ConfigSource::File(config),
        ..herald_natsd::NatsServerOptions::dev(dir.join("nats"))
    })
    .await
    .expect("nats-server with an nkey user starts")
}

fn seed_file(dir: &Path, name: &str, pair: &nkeys::KeyPair) -> PathBuf {
    let path = dir.join(name);
    std::fs::write(&path, pair.seed().expect("seed")).expect("write seed");
    path
}

/// `herald` with no `HERALD_*` configuration from this process's environment.
fn herald() -> Command {
    let mut command = Command::new(env!("CARGO_BIN_EXE_herald"));
    for (key, _) in std::env::vars() {
        if key.starts_with("HERALD_") && key != "HERALD_NATS_SERVER" {
            command.env_remove(key);
        }
    }
    command.kill_on_drop(true);
    command
}

async fn run(command: &mut Command) -> Output {
    tokio::time::timeout(Duration::from_secs(60), command.output())
        .await
        .expect("herald ends within 60 s")
        .expect("herald runs")
}

fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

#[tokio::test]
async fn every_command_that_connects_uses_the_configured_nkey() {
    let dir = tempfile::tempdir().expect("tempdir");
    let user = nkeys::KeyPair::new_user();
    let nats = guarded_server(dir.path(), &user).await;
    let url = nats.client_url();
    let seed = seed_file(dir.path(), "herald.nk", &user);
    let stranger = seed_file(dir.path(), "stranger.nk", &nkeys::KeyPair::new_user());

    // The flag.
    let out = run(herald()
        .args(["provision", "--nats-url", &url, "--nats-nkey-seed-file"])
        .arg(&seed))
    .await;
    assert!(out.status.success(), "provision: {}", stderr(&out));

    // The environment, with a seed the server does not know: refused at once.
    let out = run(herald()
        .args(["provision", "--nats-url", &url])
        .env("HERALD_NATS_NKEY_SEED_FILE", &stranger))
    .await;
    assert_eq!(out.status.code(), Some(1), "{}", stderr(&out));
    let text = stderr(&out);
    assert!(
        text.contains("refused the connection") && text.contains("nats_nkey_seed_file"),
        "{text}"
    );

    // The config file, naming a file that is not there: a configuration error.
    let config = dir.path().join("herald.toml");
    std::fs::write(
        &config,
        format!("nats_url = {url:?}\nnats_nkey_seed_file = \"/nonexistent/herald.nk\"\n"),
    )
    .expect("write herald.toml");
    let out = run(herald().arg("provision").arg("--config").arg(&config)).await;
    assert_eq!(out.status.code(), Some(2), "{}", stderr(&out));
    assert!(
        stderr(&out).contains("nats_nkey_seed_file /nonexistent/herald.nk: cannot be read"),
        "{}",
        stderr(&out)
    );

    // Minting a token never connects, so the missing file does not stop it.
    let out = run(herald()
        .args([
            "token",
            "--user",
            "alice",
            "--jwt-secret",
            SECRET,
            "--config",
        ])
        .arg(&config))
    .await;
    assert!(out.status.success(), "token: {}", stderr(&out));

    // A service, from the config file with the right seed: it serves and is ready.
    std::fs::write(
        &config,
        format!(
            "nats_url = {url:?}\nnats_nkey_seed_file = {:?}\n",
            seed.display().to_string()
        ),
    )
    .expect("write herald.toml");
    let mut api = herald()
        .args([
            "api",
            "--http-addr",
            "127.0.0.1:0",
            "--api-key",
            KEY,
            "--jwt-secret",
            SECRET,
        ])
        .arg("--config")
        .arg(&config)
        .env("HERALD_LOG", "info")
        .env("HERALD_LOG_FORMAT", "json")
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn herald api");
    let mut lines = BufReader::new(api.stderr.take().expect("stderr piped")).lines();
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
    .expect("herald api serves within 30 s")
    .expect("its address in the log");
    tokio::spawn(async move { while let Ok(Some(_)) = lines.next_line().await {} });
    let ready = reqwest::get(format!("http://{addr}/readyz"))
        .await
        .expect("GET /readyz");
    assert_eq!(ready.status(), reqwest::StatusCode::OK);
    let accepted = reqwest::Client::new()
        .post(format!("http://{addr}/v1/notify"))
        .bearer_auth(KEY)
        .json(&serde_json::json!({"user_id": "alice", "title": "through an nkey"}))
        .send()
        .await
        .expect("POST /v1/notify");
    assert_eq!(accepted.status(), reqwest::StatusCode::ACCEPTED);
    api.start_kill().expect("stop herald api");
    let _ = api.wait().await;
}
