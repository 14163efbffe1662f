//! [`herald_natsd::kill_all`] (a forced exit: the second Ctrl-C of `herald up`) kills a
//! nats-server that is still starting, not only those whose start has ended.
//!
//! A test binary of its own: `kill_all` kills every child of the process, which would
//! take other tests' servers with it.

#[allow(dead_code)]
#[path = "natsd/support.rs"]
mod support;

use herald_natsd::{NatsServer, NatsServerOptions, NatsdError};
use std::time::Duration;
use support::{eventually, never_ready_pid, never_ready_server, running};

#[tokio::test]
async fn kill_all_kills_a_child_that_is_still_starting() {
    let dir = tempfile::tempdir().expect("tempdir");
    let store = dir.path().join("store");
    let opts = NatsServerOptions {
        binary: Some(never_ready_server(dir.path())),
        ..NatsServerOptions::dev(&store)
    };
    let start = tokio::spawn(NatsServer::start(opts));
    let pid = eventually(Duration::from_secs(10), "the child runs", || {
        let store = store.clone();
        async move { never_ready_pid(&store).filter(|pid| running(*pid)) }
    })
    .await;

    herald_natsd::kill_all();

    eventually(Duration::from_secs(5), "the child is gone", || async move {
        (!running(pid)).then_some(())
    })
    .await;
    // The start sees its child die, and says so (instead of waiting out its 20 s).
    let result = tokio::time::timeout(Duration::from_secs(5), start)
        .await
        .expect("the start ends once its child is killed")
        .expect("the start task");
    assert!(
        matches!(result, Err(NatsdError::ExitedEarly { .. })),
        "{result:?}"
    );
}
