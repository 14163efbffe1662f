//! `herald bench conns`: many idle WebSocket connections on one gateway process.
//!
//! Starts its own nats-server, an in-process Herald (api, router, native ingest) that
//! accepts the notifications, and a `herald gateway` child process that holds the
//! connections, so the gateway's resident memory is measured apart from the clients'.
//! Phases:
//! 1. **Idle:** N clients connect (at most 256 upgrades in flight); connect rate, and the
//!    gateway's RSS per connection (after − before, divided by N).
//! 2. **Broadcast:** one notification to each of the N users, sent as fast as the batch
//!    endpoint takes them; delivery p50/p99 and the time until all N arrived.
//! 3. **Storm:** `kill -9` of the gateway while one notification per user is sent, then a
//!    restart on the same port; every client reconnects with full-jitter backoff and
//!    resumes after its last seq. Time until all are back, 503s served, connect p99/max,
//!    lost and duplicated notifications, the gateway's CPU during the recovery.
//! 4. **Slow consumer:** fast clients receive at a fixed rate: alone; while a flood goes
//!    to a user with no connection (without the slow one: the flood's ingest cost on the
//!    shared cores); while it goes to a client that reads (control); and beside one
//!    client that never reads and gets the flood. The fast clients' p50/p99 each time,
//!    how the slow one was ended (4008, or dropped when its socket had no room for the
//!    close frame) and the gateway's own count of slow-consumer closes.
//! 5. **Side by side:** the same N clients on nats-server's own WebSocket listener.

use super::fleet::{self, Fleet, GatewayProcess};
use super::load::{flood, paced, send_one_each, wait_for};
use super::{BenchError, ms};
use crate::mesh::Mesh;
use clap::Args;
use herald_auth::UserAuth;
use herald_protocol::{Subjects, UserId};
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

/// `herald bench conns`.
#[derive(Debug, Clone, Args)]
pub struct ConnsArgs {
    /// Idle WebSocket connections (the process may hold 20,000 files: keep it below ~19k).
    #[arg(long, default_value_t = 10_000)]
    pub conns: usize,
    /// Upgrades per second the gateway admits (its admission control; 503 beyond).
    #[arg(long, default_value_t = 2_000)]
    pub upgrades_per_sec: u32,
    /// Skip the reconnect storm.
    #[arg(long)]
    pub no_storm: bool,
    /// Skip the slow-consumer phase.
    #[arg(long)]
    pub no_slow: bool,
    /// Fast clients in the slow-consumer phase.
    #[arg(long, default_value_t = 1_000)]
    pub fast: usize,
    /// Notifications per second to the fast clients.
    #[arg(long, default_value_t = 1_000)]
    pub rate: u64,
    /// Seconds of each slow-consumer half.
    #[arg(long, default_value_t = 5)]
    pub seconds: u64,
    /// Skip the side-by-side on nats-server's own WebSocket listener.
    #[arg(long)]
    pub no_nats_ws: bool,
    /// Gateway processes (user `c-i` connects to gateway `i mod K`). Above 1, or with
    /// several client processes, the run is the multi-process one: idle, broadcast, storm
    /// and side by side, without the slow-consumer phase.
    #[arg(long, default_value_t = 1)]
    pub gateways: usize,
    /// Client worker processes holding the connections (each at most ~19k).
    #[arg(long, default_value_t = 1)]
    pub client_procs: usize,
    /// Gateways killed in the multi-process storm (default: half of them, rounded up).
    #[arg(long)]
    pub kill: Option<usize>,
    /// Multi-process run: every user follows one big topic (subscribed in bulk before
    /// connecting), and the broadcast is ONE publish to it instead of one notification
    /// per user.
    #[arg(long)]
    pub topic: bool,
}

/// The environment of a `herald gateway` child on `url`'s NATS.
pub(super) fn gateway_env(url: &str, upgrades_per_sec: u32) -> Vec<(&'static str, String)> {
    vec![
        ("HERALD_NATS_URL", url.to_string()),
        ("HERALD_JWT_SECRET", SECRET.to_string()),
        ("HERALD_SUBJECT_PREFIX", PREFIX.to_string()),
        ("HERALD_PARTITIONS", PARTITIONS.to_string()),
        ("HERALD_UPGRADES_PER_S", upgrades_per_sec.to_string()),
    ]
}

pub(super) const SECRET: &str = "bench-secret-bench-secret-bench-secret";
const PREFIX: &str = "hbench";
const PARTITIONS: u16 = 16;

pub(super) async fn run(args: ConnsArgs) -> Result<(), BenchError> {
    if args.gateways > 1 || args.client_procs > 1 {
        return super::scale::run(args).await;
    }
    let soft = rlimit::increase_nofile_limit(u64::MAX)?;
    let n = args.conns;
    if (soft as usize) < n + 500 {
        return Err(format!(
            "{n} connections need {} open files; the limit is {soft}",
            n + 500
        )
        .into());
    }
    let tmp = tempfile::tempdir()?;
    let nats = herald_natsd::NatsServer::start(herald_natsd::NatsServerOptions::dev(
        tmp.path().join("nats"),
    ))
    .await?;
    let url = nats.client_url();
    let raw_core = super::raw_core(&url, 100_000, 177).await?;
    eprintln!("bench: raw core pub/sub {raw_core:.0}/s; starting Herald");

    let herald = Herald::start(&url).await?;
    let (api, api_key, users) = (herald.api.clone(), herald.api_key.clone(), &herald.users);

    // The gateway in its own process.
    let gateway_addr = std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?;
    let env = gateway_env(&url, args.upgrades_per_sec);
    let log = tmp.path().join("gateway.log");
    let mut gateway = GatewayProcess::start(gateway_addr, &env, &log).await?;
    let pid = gateway.pid().ok_or("gateway child has no pid")?;
    let rss_before = fleet::rss_bytes(pid)?;

    // 1. Idle connections.
    let fleet = Fleet::new()?;
    let ws_base = format!("ws://{}/v1/ws", gateway.addr());
    let connecting = Arc::new(tokio::sync::Semaphore::new(256));
    let mut clients = tokio::task::JoinSet::new();
    let started = Instant::now();
    for i in 0..n {
        let token = users.mint(&UserId::new(format!("c-{i}"))?, 24 * 3600)?;
        let permit = connecting.clone().acquire_owned().await?;
        let url = format!("{ws_base}?access_token={token}");
        clients.spawn(fleet::client(fleet.clone(), url, Some(permit)));
    }
    wait_for(
        || fleet.connected.load(Ordering::Relaxed) >= n as u64,
        300,
        "all connected",
    )
    .await?;
    let connect_secs = started.elapsed().as_secs_f64();
    let idle_refused = fleet.refused.swap(0, Ordering::Relaxed);
    let idle_connect = Fleet::snapshot(&fleet.connect)?;
    // Let allocations settle before reading memory.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let rss_after = fleet::rss_bytes(pid)?;
    let per_conn = (rss_after.saturating_sub(rss_before)) as f64 / n as f64;

    // 2. Broadcast: one notification to each user.
    let http = reqwest::Client::new();
    Fleet::reset(&fleet.delivery);
    let burst_start = fleet.now_us();
    send_one_each(&http, &api, &api_key, &fleet, n).await?;
    wait_for(
        || fleet.received.load(Ordering::Relaxed) >= n as u64,
        120,
        "broadcast delivered",
    )
    .await?;
    let burst_all_ms = (fleet.now_us() - burst_start) as f64 / 1000.0;
    let burst = Fleet::snapshot(&fleet.delivery)?;

    println!("\n## herald bench conns ({n} connections, one gateway process)\n");
    println!("| measure | result |");
    println!("|---|---|");
    println!("| raw core NATS pub/sub, same server | {raw_core:.0} msgs/s |");
    println!(
        "| connect {n} (256 in flight, admission {}/s) | {:.0} connects/s, {idle_refused} refused (503), connect p99 {:.1} ms |",
        args.upgrades_per_sec,
        n as f64 / connect_secs,
        ms(idle_connect.value_at_quantile(0.99))
    );
    println!(
        "| gateway RSS | {:.1} MiB before, {:.1} MiB after → **{:.2} KiB per connection** |",
        rss_before as f64 / 1048576.0,
        rss_after as f64 / 1048576.0,
        per_conn / 1024.0
    );
    println!(
        "| broadcast: 1 notification to each of {n} users | p50 {:.1} ms, p99 {:.1} ms, max {:.1} ms; all delivered after {burst_all_ms:.0} ms |",
        ms(burst.value_at_quantile(0.5)),
        ms(burst.value_at_quantile(0.99)),
        ms(burst.max())
    );

    // 3. Reconnect storm.
    if !args.no_storm {
        Fleet::reset(&fleet.connect);
        fleet.refused.store(0, Ordering::Relaxed);
        let received_before = fleet.received.load(Ordering::Relaxed);
        gateway.kill().await?;
        wait_for(
            || fleet.connected.load(Ordering::Relaxed) == 0,
            60,
            "all dropped",
        )
        .await?;
        // Sent while no gateway runs: each client must find its one on resume.
        send_one_each(&http, &api, &api_key, &fleet, n).await?;
        let restart = Instant::now();
        gateway = GatewayProcess::start(gateway_addr, &env, &log).await?;
        let pid = gateway.pid().ok_or("gateway child has no pid")?;
        let cpu_before = fleet::cpu_seconds(pid)?;
        wait_for(
            || fleet.connected.load(Ordering::Relaxed) >= n as u64,
            300,
            "all back",
        )
        .await?;
        let back_secs = restart.elapsed().as_secs_f64();
        let cpu = (fleet::cpu_seconds(pid)? - cpu_before) / back_secs;
        let want = received_before + n as u64;
        let _ = wait_for(
            || fleet.received.load(Ordering::Relaxed) >= want,
            60,
            "resumed",
        )
        .await;
        let lost = want.saturating_sub(fleet.received.load(Ordering::Relaxed));
        let storm = Fleet::snapshot(&fleet.connect)?;
        println!(
            "| storm: kill -9 + restart, {n} reconnect (full jitter, 500 ms–30 s as the SDKs, Retry-After as a floor) | all back {back_secs:.1} s after the restart; {} refused (503); connect p99 {:.0} ms, max {:.0} ms; gateway CPU {:.0}% of one core meanwhile |",
            fleet.refused.load(Ordering::Relaxed),
            ms(storm.value_at_quantile(0.99)),
            ms(storm.max()),
            cpu * 100.0
        );
        println!(
            "| storm: {n} notifications sent during the outage | lost {lost}, duplicated {} |",
            fleet.duplicates.load(Ordering::Relaxed)
        );
    }

    // 4. Slow consumer.
    if !args.no_slow {
        let fast = args.fast.min(n);
        let alone = paced(&http, &api, &api_key, &fleet, fast, &args).await?;
        // Without the slow one: the same flood to a user with no connection, which costs
        // the ingest (JetStream writes, routing) and nothing at the gateway's sockets.
        let flooding = tokio::spawn(flood(
            http.clone(),
            api.clone(),
            api_key.clone(),
            "flood-offline",
        ));
        let offline = paced(&http, &api, &api_key, &fleet, fast, &args).await?;
        flooding.await??;
        // Control: the same flood to a client that reads, to tell the flood's own cost
        // (JetStream writes, routing, the hub) from the slow client's.
        let token = users.mint(&UserId::new("flood-reader")?, 3600)?;
        let url = format!("{ws_base}?access_token={token}");
        clients.spawn(fleet::client(fleet.clone(), url, None));
        let flooding = tokio::spawn(flood(
            http.clone(),
            api.clone(),
            api_key.clone(),
            "flood-reader",
        ));
        let control = paced(&http, &api, &api_key, &fleet, fast, &args).await?;
        flooding.await??;
        let token = users.mint(&UserId::new("slow")?, 3600)?;
        let slow = fleet::stalled_client(format!("{ws_base}?access_token={token}")).await?;
        let flooding = tokio::spawn(flood(http.clone(), api.clone(), api_key.clone(), "slow"));
        let beside = paced(&http, &api, &api_key, &fleet, fast, &args).await?;
        flooding.await??;
        let ended = fleet::how_it_ended(slow).await;
        let slow_closes =
            fleet::metric(gateway.addr(), "herald_gateway_slow_consumer_closes_total").await?;
        println!(
            "| {fast} fast clients at {}/s, alone | p50 {:.1} ms, p99 {:.1} ms |",
            args.rate,
            ms(alone.value_at_quantile(0.5)),
            ms(alone.value_at_quantile(0.99))
        );
        println!(
            "| the same while 10,000 × 2 KiB go to a user with no connection (without the slow one) | p50 {:.1} ms, p99 {:.1} ms |",
            ms(offline.value_at_quantile(0.5)),
            ms(offline.value_at_quantile(0.99))
        );
        println!(
            "| the same while a client that reads gets 10,000 × 2 KiB (control) | p50 {:.1} ms, p99 {:.1} ms |",
            ms(control.value_at_quantile(0.5)),
            ms(control.value_at_quantile(0.99))
        );
        println!(
            "| the same while a client that never reads gets 10,000 × 2 KiB | p50 {:.1} ms, p99 {:.1} ms; the slow one: {ended}; gateway's herald_gateway_slow_consumer_closes_total = {slow_closes} |",
            ms(beside.value_at_quantile(0.5)),
            ms(beside.value_at_quantile(0.99)),
        );
    }

    fleet.stop.cancel();
    while clients.join_next().await.is_some() {}
    gateway.kill().await?;

    // 5. The side-by-side: the same N on nats-server's WebSocket listener.
    if !args.no_nats_ws {
        let side = super::natsws::run(n, tmp.path()).await?;
        println!(
            "| side by side: {n} idle clients on nats-server's own WebSocket listener (one SUB each) | {:.0} connects/s; **{:.2} KiB per connection** of nats-server RSS; one core message to each: p50 {:.1} ms, p99 {:.1} ms, all after {:.0} ms |",
            side.connects_per_sec,
            side.rss_per_conn / 1024.0,
            ms(side.delivery.value_at_quantile(0.5)),
            ms(side.delivery.value_at_quantile(0.99)),
            side.all_ms
        );
    }
    herald.stop().await?;
    drop(nats);
    Ok(())
}

/// The API, router and native ingest, in this process on a runtime of their own: what
/// takes the benchmark's notifications (the gateways run as child processes).
pub(super) struct Herald {
    server: super::Apart,
    mesh: Mesh,
    /// `http://…` of the API.
    pub(super) api: String,
    /// An API key with every scope.
    pub(super) api_key: String,
    /// Mints the users' tokens.
    pub(super) users: UserAuth,
}

impl Herald {
    /// Starts it on `url`'s NATS (provisioning the streams).
    pub(super) async fn start(url: &str) -> Result<Self, BenchError> {
        let url = url.to_string();
        // The API, router and ingest in this process, on a runtime of their own.
        let auth = super::BenchAuth::new()?;
        let options = auth.mesh_without_gateway(
            url.clone(),
            "herald-bench-api",
            Subjects::new(PREFIX, PARTITIONS)?,
        );
        let super::BenchAuth { api_key, users, .. } = auth;
        let (server, mesh) = super::mesh_apart(options, 1, "herald-api").await?;

        let api = format!("http://{}", mesh.addr());
        Ok(Herald {
            server,
            mesh,
            api,
            api_key,
            users,
        })
    }

    /// Shuts it down.
    pub(super) async fn stop(self) -> Result<(), BenchError> {
        let Herald { server, mesh, .. } = self;
        server.spawn(mesh.shutdown()).await??;
        drop(server);
        Ok(())
    }
}
