//! The single-node development server from nats/dev.conf.

use std::time::Duration;

use herald_natsd::{ConfigSource, NatsServer, NatsServerOptions, NatsdError, PINNED_VERSION};

use crate::support::{
    RawClient, eventually, js_ok, never_ready_pid, never_ready_server, read_info, running,
};

#[tokio::test]
async fn dev_server_serves_clients_on_random_ports() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut server = NatsServer::start(NatsServerOptions::dev(dir.path()))
        .await
        .expect("start dev server");

    let info = read_info(&server.client_url()).await;
    assert_eq!(info["version"], PINNED_VERSION);
    assert_eq!(info["server_name"], "herald-dev");
    assert_eq!(info["jetstream"], true);
    assert_eq!(info["max_payload"], 1024 * 1024);

    let ws = server
        .websocket_url()
        .expect("dev.conf has a websocket listener");
    assert!(ws.starts_with("ws://127.0.0.1:"), "{ws}");
    let varz = server.monitor("/varz").await.expect("/varz");
    assert_eq!(varz["version"], PINNED_VERSION);
    assert_eq!(
        varz["jetstream"]["config"]["store_dir"],
        dir.path().join("jetstream").to_str().expect("utf-8")
    );
    assert!(server.log_path().starts_with(dir.path()));

    server.stop().await.expect("graceful stop");
    assert!(!server.is_running());
    assert!(
        tokio::net::TcpStream::connect(server.client_url().trim_start_matches("nats://"))
            .await
            .is_err()
    );
}

#[tokio::test]
async fn dev_server_restarts_on_the_same_ports_with_its_streams() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut server = NatsServer::start(NatsServerOptions::dev(dir.path()))
        .await
        .expect("start dev server");
    let url = server.client_url();
    let ws = server.websocket_url();
    let old_pid = server.pid();

    js_ok(
        &url,
        "$JS.API.STREAM.CREATE.KEEP",
        None,
        r#"{"name":"KEEP","subjects":["keep.>"]}"#,
    )
    .await;
    let ack = js_ok(&url, "keep.one", Some("m1"), "hello").await;
    assert_eq!(ack["seq"], 1);

    server.kill();
    assert!(!server.is_running());
    server.restart().await.expect("restart");
    assert_ne!(server.pid(), old_pid);
    assert_eq!(server.client_url(), url);
    assert_eq!(server.websocket_url(), ws);

    let info = js_ok(&url, "$JS.API.STREAM.INFO.KEEP", None, "").await;
    assert_eq!(info["state"]["messages"], 1, "{info}");

    // A restart of a running server is a graceful stop and a start.
    server.restart().await.expect("second restart");
    let info = read_info(&url).await;
    assert_eq!(info["version"], PINNED_VERSION);
}

#[tokio::test]
async fn explicit_client_port_is_used() {
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("free port")
        .port();
    let dir = tempfile::tempdir().expect("tempdir");
    let server = NatsServer::start(NatsServerOptions {
        client_port: Some(port),
        ..NatsServerOptions::dev(dir.path())
    })
    .await
    .expect("start dev server");
    assert_eq!(server.client_url(), format!("nats://127.0.0.1:{port}"));
    read_info(&server.client_url()).await;
}

#[tokio::test]
async fn a_bad_config_fails_fast_quoting_the_server_log() {
    let dir = tempfile::tempdir().expect("tempdir");
    let config = dir.path().join("broken.conf");
    std::fs::write(
        &config,
        "port: $HERALD_NATS_PORT\njetstream {\n  store_dir: $NO_SUCH_HERALD_VAR\n}\n",
    )
    .expect("write config");
    let err = NatsServer::start(NatsServerOptions {
        config: ConfigSource::File(config),
        ..NatsServerOptions::dev(dir.path())
    })
    .await
    .expect_err("unset variable must fail");
    assert!(matches!(err, NatsdError::ExitedEarly { .. }), "{err:?}");
    let text = err.to_string();
    assert!(text.contains("NO_SUCH_HERALD_VAR"), "{text}");
}

#[tokio::test]
async fn dropping_the_server_kills_the_child() {
    let dir = tempfile::tempdir().expect("tempdir");
    let server = NatsServer::start(NatsServerOptions::dev(dir.path()))
        .await
        .expect("start dev server");
    let pid = server.pid();
    let url = server.client_url();
    drop(server);
    // Reaped by Drop: the pid no longer names a process.
    assert!(!std::path::Path::new(&format!("/proc/{pid}")).exists());
    eventually(Duration::from_secs(5), "client port closed", || {
        let addr = url.trim_start_matches("nats://").to_owned();
        async move {
            RawClient::connect(&format!("nats://{addr}"))
                .await
                .is_err()
                .then_some(())
        }
    })
    .await;
}

/// A start dropped before the server serves (Ctrl-C during `herald bench`, or during a
/// slow `herald up` start) takes its child with it: nothing owned it before its start
/// ended, so it used to live on, holding the store.
#[tokio::test]
async fn a_start_dropped_half_way_kills_the_child() {
    let dir = tempfile::tempdir().expect("tempdir");
    let store = dir.path().join("store");
    let opts = NatsServerOptions {
        binary: Some(never_ready_server(dir.path())),
        ..NatsServerOptions::dev(&store)
    };
    let pid = tokio::select! {
        result = NatsServer::start(opts) => panic!("a server that never serves started: {result:?}"),
        pid = eventually(Duration::from_secs(10), "the child runs", || {
            let store = store.clone();
            async move { never_ready_pid(&store).filter(|pid| running(*pid)) }
        }) => pid,
    };
    // The start future is dropped with the `select!`.
    eventually(Duration::from_secs(5), "the child is gone", || async move {
        (!running(pid)).then_some(())
    })
    .await;
    // Reaped too, not left a zombie.
    assert!(!std::path::Path::new(&format!("/proc/{pid}")).exists());
}

/// The process group of `pid` (field 5 of `/proc/<pid>/stat`, after the command name).
fn process_group(pid: &str) -> u32 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).expect("stat");
    let after_name = &stat[stat.rfind(')').expect("(comm)") + 2..];
    after_name
        .split(' ')
        .nth(2)
        .and_then(|g| g.parse().ok())
        .expect("pgrp")
}

/// Ctrl-C in a terminal signals the whole foreground process group: the child must not be
/// in ours, or it would stop while Herald still drains into it.
#[tokio::test]
async fn the_child_runs_in_a_process_group_of_its_own() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut server = NatsServer::start(NatsServerOptions::dev(dir.path()))
        .await
        .expect("start dev server");
    let child = server.pid();
    assert_eq!(process_group(&child.to_string()), child, "its own group");
    assert_ne!(process_group("self"), child);
    server.stop().await.expect("graceful stop");
}
