//! `herald worker <channel>` for a channel with no provider configured is refused at
//! start with exit code 2, naming the settings to set: such a worker would pull every job
//! of its queue and dead-letter it without calling anyone.

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

/// Without the check the worker goes on to dial NATS, and waits for it for ever.
const DEADLINE: Duration = Duration::from_secs(30);

#[test]
fn a_worker_for_a_channel_without_a_provider_refuses_to_start() {
    for (channel, names) in [
        (
            "push",
            &["HERALD_APNS_KEY_FILE", "HERALD_FCM_CREDENTIALS"][..],
        ),
        (
            "sms",
            &["HERALD_TWILIO_AUTH_TOKEN", "HERALD_VONAGE_API_SECRET"],
        ),
        ("email", &["HERALD_SMTP_URL"]),
        ("webhook", &["HERALD_WEBHOOK_SECRET"]),
    ] {
        let mut command = Command::new(env!("CARGO_BIN_EXE_herald"));
        command
            .args(["worker", channel, "--http-addr", "127.0.0.1:0"])
            // Never reached: the configuration is refused before NATS is dialled.
            .args(["--nats-url", "nats://127.0.0.1:9"])
            .args(["--api-key", "hk_worker_config_test_key_0123"])
            .args(["--jwt-secret", "worker-config-test-secret-0123456789"]);
        // Whatever the environment running the tests configures, none here.
        for (key, _) in std::env::vars() {
            if key.starts_with("HERALD_") {
                command.env_remove(key);
            }
        }
        let mut child = command
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("run herald worker");
        let start = Instant::now();
        while child.try_wait().expect("wait").is_none() {
            if start.elapsed() > DEADLINE {
                let _ = child.kill();
                let _ = child.wait();
                panic!("herald worker {channel} started instead of refusing its configuration");
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let out = child.wait_with_output().expect("output");
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{channel}: {stderr}");
        for name in names {
            assert!(stderr.contains(name), "{channel}: {name} not in {stderr}");
        }
    }
}
