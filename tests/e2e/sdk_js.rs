//! The JavaScript SDK's own tests (`sdk/js/test/*.test.mjs`, `node --test`), run against
//! a real Herald: this test starts one (development mode, so the JS tests can mint tokens
//! for their own users at `/dev/token`) and hands its URL and API key to node.

use anyhow::{Context as _, bail, ensure};
use herald_tests::{Herald, Nats, within};
use std::path::{Path, PathBuf};
use std::time::Duration;

/// The JS suite, all files together, must finish within this.
const SUITE_TIMEOUT: Duration = Duration::from_secs(180);

/// Topics starting with this may be joined by users themselves (`HERALD_SELF_TOPICS`).
const SELF_TOPICS: &str = "sdk-open-";

/// Connections one user may hold (`HERALD_MAX_PER_USER`): low enough for a test to reach
/// it, high enough for the tests that hold two devices and reconnect.
const MAX_PER_USER: u32 = 4;

/// `node` (or `HERALD_NODE`), and the flags it needs for a global `WebSocket`: none from
/// Node 22; `--experimental-websocket` on 20.10–21.
pub(crate) async fn node() -> anyhow::Result<(PathBuf, Vec<&'static str>)> {
    let node = std::env::var_os("HERALD_NODE").map_or_else(|| PathBuf::from("node"), PathBuf::from);
    let out = tokio::process::Command::new(&node)
        .arg("--version")
        .output()
        .await
        .with_context(|| {
            format!(
                "running {} --version: Node.js is needed for the SDK tests (scripts/install-test-deps.sh installs it)",
                node.display()
            )
        })?;
    let version = String::from_utf8_lossy(&out.stdout).trim().to_string();
    let mut parts = version
        .trim_start_matches('v')
        .split('.')
        .map(str::parse::<u32>);
    let (Some(Ok(major)), Some(Ok(minor))) = (parts.next(), parts.next()) else {
        bail!("{} --version said {version:?}", node.display());
    };
    match (major, minor) {
        (22.., _) => Ok((node, Vec::new())),
        (21, _) | (20, 10..) => Ok((node, vec!["--experimental-websocket"])),
        _ => bail!(
            "Node.js {version} is too old for the SDK tests (needs >= 22, or 20.10+); see scripts/install-test-deps.sh"
        ),
    }
}

fn js_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../sdk/js")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn javascript_sdk_suite_passes_against_a_running_herald() -> anyhow::Result<()> {
    let (node, flags) = node().await?;
    let nats = Nats::single().await?;
    let herald = Herald::builder(&nats)
        .dev_mode()
        .topics(herald_api::TopicSettings {
            self_subscribe: vec![format!("{SELF_TOPICS}*")],
            ..Default::default()
        })
        .gateway(herald_gateway::GatewayConfig {
            limits: herald_gateway::admission::Limits {
                max_per_user: MAX_PER_USER,
                ..Default::default()
            },
            ..Default::default()
        })
        .start()
        .await?;

    let dir = js_dir();
    let mut files: Vec<PathBuf> = std::fs::read_dir(dir.join("test"))
        .context("reading sdk/js/test")?
        .filter_map(Result::ok)
        .map(|e| e.path())
        .filter(|p| p.to_string_lossy().ends_with(".test.mjs"))
        .collect();
    files.sort();
    ensure!(
        files.len() >= 6,
        "expected the SDK's test files, found {files:?}"
    );

    let run = tokio::process::Command::new(&node)
        .args(&flags)
        .arg("--test")
        .args(&files)
        .current_dir(&dir)
        .env("HERALD_URL", herald.base_url())
        .env("HERALD_API_KEY", herald.api_key())
        .env("HERALD_SELF_TOPICS", SELF_TOPICS)
        .env("HERALD_MAX_PER_USER", MAX_PER_USER.to_string())
        .kill_on_drop(true)
        .output();
    let out = within(SUITE_TIMEOUT, "node --test sdk/js/test", run)
        .await?
        .context("running node --test")?;
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    ensure!(
        out.status.success(),
        "node --test failed ({}):\n{stdout}\n{stderr}",
        out.status
    );
    // The TAP summary: every test ran and passed, none skipped.
    ensure!(stdout.contains("# fail 0"), "{stdout}");
    ensure!(stdout.contains("# skipped 0"), "{stdout}");
    let passed = stdout
        .lines()
        .find_map(|l| l.strip_prefix("# pass "))
        .and_then(|n| n.trim().parse::<u32>().ok())
        .context("no pass count in node's output")?;
    ensure!(passed >= 20, "only {passed} JS tests ran:\n{stdout}");
    Ok(())
}
