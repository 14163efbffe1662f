//! `herald bench` stopped by SIGTERM (or Ctrl-C) takes its own processes with it: the
//! nats-server and the worker it started are gone afterwards, not left running without a
//! parent. Runs the real binary.

use std::collections::HashSet;
use std::process::Stdio;
use std::time::Duration;
use tokio::process::Command;

/// The direct children of `pid`, from every thread's `children` list (a child is listed
/// under the thread that spawned it).
fn children(pid: u32) -> HashSet<u32> {
    let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
        return HashSet::new();
    };
    tasks
        .filter_map(Result::ok)
        .filter_map(|t| std::fs::read_to_string(t.path().join("children")).ok())
        .flat_map(|list| {
            list.split_whitespace()
                .filter_map(|p| p.parse().ok())
                .collect::<Vec<u32>>()
        })
        .collect()
}

/// Whether `pid` still runs (a zombie waiting to be reaped does not).
fn running(pid: u32) -> bool {
    let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
        return false;
    };
    // The state follows the command name, which is in parentheses and may hold spaces.
    let state = stat
        .rsplit_once(')')
        .and_then(|(_, rest)| rest.split_whitespace().next());
    !matches!(state, Some("Z" | "X"))
}

fn command_of(pid: u32) -> String {
    std::fs::read(format!("/proc/{pid}/cmdline"))
        .map(|c| String::from_utf8_lossy(&c).replace('\0', " "))
        .unwrap_or_default()
}

#[tokio::test]
async fn sigterm_stops_the_benchmarks_own_processes() {
    let bin = env!("CARGO_BIN_EXE_herald");
    let mut bench = Command::new(bin)
        .args(["bench", "workers", "--providers", "webhook"])
        .args(["--latency-ms", "50", "--jobs", "20000"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .expect("start herald bench workers");
    let pid = bench.id().expect("bench pid");

    // Wait until both of its processes run: the nats-server, then the worker.
    let mut seen = HashSet::new();
    for _ in 0..600 {
        seen.extend(children(pid));
        let commands: Vec<String> = seen.iter().map(|&p| command_of(p)).collect();
        let nats = commands.iter().any(|c| c.contains("nats-server"));
        let worker = commands.iter().any(|c| c.contains(" worker "));
        if nats && worker {
            break;
        }
        assert!(
            bench.try_wait().expect("poll bench").is_none(),
            "the bench ended before its worker started"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(
        seen.len() >= 2,
        "nats-server and worker never both ran: {:?}",
        seen.iter().map(|&p| command_of(p)).collect::<Vec<_>>()
    );

    let kill = std::process::Command::new("kill")
        .args(["-TERM", &pid.to_string()])
        .status()
        .expect("run kill");
    assert!(kill.success());
    let status = tokio::time::timeout(Duration::from_secs(30), bench.wait())
        .await
        .expect("the bench exits after SIGTERM")
        .expect("wait for the bench");
    assert!(!status.success(), "an interrupted bench reports failure");

    // Its processes were killed as it unwound; give the kernel a moment to finish them.
    for _ in 0..100 {
        if !seen.iter().any(|&p| running(p)) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let left: Vec<u32> = seen.iter().copied().filter(|&p| running(p)).collect();
    let described: Vec<String> = left
        .iter()
        .map(|&p| format!("{p}: {}", command_of(p)))
        .collect();
    // Clean up before failing, so a failure leaves nothing behind either.
    for p in &left {
        let _ = std::process::Command::new("kill")
            .args(["-KILL", &p.to_string()])
            .status();
    }
    assert!(left.is_empty(), "left running: {described:?}");
}
