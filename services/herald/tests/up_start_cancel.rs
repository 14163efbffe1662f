//! Ctrl-C while `herald up` waits for its nats-server to start (JetStream recovering a
//! big store takes seconds) stops Herald and leaves no nats-server behind: nothing owned
//! a starting child before, so a forced exit (second Ctrl-C) orphaned it, holding the
//! store for the next `herald up`.
//!
//! The nats-server here is a script that answers `--version` like the pinned release and
//! then never serves.

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};
use tokio::process::{Child, Command};

const DEADLINE: Duration = Duration::from_secs(10);

/// The never-serving stand-in; it writes its pid to `<store>/never-ready.pid`.
fn never_ready_server(dir: &Path) -> PathBuf {
    use std::os::unix::fs::PermissionsExt as _;
    let path = dir.join("never-ready-nats-server");
    let script = format!(
        "#!/bin/sh\n\
         if [ \"$1\" = --version ]; then echo 'nats-server: v{}'; exit 0; fi\n\
         echo $$ > \"$HERALD_NATS_STORE/never-ready.pid\"\n\
         exec sleep 600\n",
        herald_natsd::PINNED_VERSION
    );
    std::fs::write(&path, script).expect("write the script");
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755)).expect("chmod");
    path
}

/// Whether `pid` names a process that runs (a zombie does not).
fn running(pid: u32) -> bool {
    let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
        return false;
    };
    let state = stat
        .rfind(')')
        .and_then(|i| stat[i + 1..].split_whitespace().next());
    state != Some("Z")
}

/// Polls `check` every 20 ms until it gives a value, failing after [`DEADLINE`].
async fn until<T>(what: &str, mut check: impl FnMut() -> Option<T>) -> T {
    let start = Instant::now();
    loop {
        if let Some(value) = check() {
            return value;
        }
        assert!(start.elapsed() < DEADLINE, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

fn signal(pid: u32, name: &str) {
    let status = std::process::Command::new("kill")
        .args([&format!("-{name}"), &pid.to_string()])
        .status()
        .expect("run kill");
    assert!(status.success(), "kill -{name} {pid}");
}

/// `herald up` on `dir`, and the pid of its nats-server once that runs (still starting).
async fn up_while_nats_starts(dir: &Path) -> (Child, u32) {
    let server = never_ready_server(dir);
    let data = dir.join("data");
    let up = Command::new(env!("CARGO_BIN_EXE_herald"))
        .args(["up", "--http-addr", "127.0.0.1:0", "--data-dir"])
        .arg(&data)
        .env("HERALD_NATS_SERVER", &server)
        .env_remove("HERALD_NATS_URL")
        .env("HERALD_LOG", "warn")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .expect("spawn herald up");
    let pid_file = data.join("nats").join("never-ready.pid");
    let child = until("nats-server to be spawned", || {
        let pid: u32 = std::fs::read_to_string(&pid_file)
            .ok()?
            .trim()
            .parse()
            .ok()?;
        running(pid).then_some(pid)
    })
    .await;
    (up, child)
}

#[tokio::test]
async fn ctrl_c_while_nats_server_starts_stops_herald_and_the_child() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (mut up, child) = up_while_nats_starts(dir.path()).await;

    signal(up.id().expect("pid"), "INT");
    let status = tokio::time::timeout(DEADLINE, up.wait())
        .await
        .expect("herald up stops at once, without waiting out the start")
        .expect("wait");
    assert!(status.success(), "{status}");
    until("the nats-server to be gone", || {
        (!running(child)).then_some(())
    })
    .await;
}

#[tokio::test]
async fn a_forced_exit_while_nats_server_starts_kills_the_child() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (mut up, child) = up_while_nats_starts(dir.path()).await;

    // The second signal forces the exit, whatever the first had got to.
    let pid = up.id().expect("pid");
    signal(pid, "INT");
    signal(pid, "INT");
    let status = tokio::time::timeout(DEADLINE, up.wait())
        .await
        .expect("herald up exits")
        .expect("wait");
    assert!(status.code().is_some(), "{status}");
    until("the nats-server to be gone", || {
        (!running(child)).then_some(())
    })
    .await;
}
