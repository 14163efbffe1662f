//! `herald bench conns --gateways K --client-procs M`: N connections across K gateway
//! processes, held by M client worker processes.
//!
//! One process may hold 20,000 open files here, so 100,000 connections need several of
//! each. User `c-i` connects to gateway `i mod K` (one port per gateway: a loopback
//! source/destination pair has ~28k ephemeral ports, so each gateway port takes at most
//! N/K of them) from worker `⌊i·M/N⌋`. Phases:
//! 1. **Idle:** all N connect; connects/s, 503s, and each gateway's RSS growth divided by
//!    the connections it holds.
//! 2. **Broadcast:** one notification to each of the N users; the time until all arrived.
//!    With `--topic`, the N users follow one big topic (subscribed in bulk before phase 1)
//!    and the broadcast is one publish to it: stored once, one message to each gateway,
//!    dispatched there to every local follower. That is how Herald broadcasts; the
//!    per-user form measures the ingest of N notifications as much as their delivery.
//! 3. **Storm:** `kill -9` of `--kill` gateways (half by default) and, while they are down,
//!    one notification to each of their users; then they restart on the same ports.
//!    Time until every client is back, lost and duplicated notifications, 503s, and the
//!    restarted gateways' CPU (peak over one-second windows, and the average).
//! 4. **Side by side:** the same N clients on K nats-servers' own WebSocket listeners.

use super::conns::{ConnsArgs, Herald, gateway_env};
use super::conns_client::Report;
use super::fleet::{self, Fleet, GatewayProcess};
use super::load::send_to;
use super::{BenchError, ms};
use hdrhistogram::Histogram;
use std::net::SocketAddr;
use std::process::Stdio;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::io::{AsyncBufReadExt as _, AsyncWriteExt as _};

/// The client worker processes and their latest reports.
struct Workers {
    children: Vec<tokio::process::Child>,
    latest: Arc<Mutex<Vec<Report>>>,
}

impl Workers {
    /// Starts `procs` workers for users `0..n`, user `i` on `targets[i mod K]`.
    fn start(
        n: usize,
        procs: usize,
        targets: &[String],
        secret: Option<&str>,
    ) -> Result<Self, BenchError> {
        let latest = Arc::new(Mutex::new(
            (0..procs).map(|_| Report::default()).collect::<Vec<_>>(),
        ));
        let mut children = Vec::with_capacity(procs);
        for w in 0..procs {
            let (from, to) = (n * w / procs, n * (w + 1) / procs);
            let mut cmd = tokio::process::Command::new(std::env::current_exe()?);
            cmd.args(["bench", "conns-worker", "--from"])
                .arg(from.to_string())
                .arg("--to")
                .arg(to.to_string())
                // 256 upgrades in flight in all, as in the single-process run.
                .arg("--in-flight")
                .arg((256 / procs).max(1).to_string());
            for t in targets {
                cmd.arg("--target").arg(t);
            }
            match secret {
                Some(s) => cmd.arg("--jwt-secret").arg(s),
                None => cmd.arg("--nats"),
            };
            cmd.stdin(Stdio::piped())
                .stdout(Stdio::piped())
                .env("RUST_LOG", "error")
                .kill_on_drop(true);
            let mut child = cmd.spawn()?;
            let stdout = child.stdout.take().ok_or("worker has no stdout")?;
            let latest = latest.clone();
            tokio::spawn(async move {
                let mut lines = tokio::io::BufReader::new(stdout).lines();
                while let Ok(Some(line)) = lines.next_line().await {
                    if let Ok(report) = serde_json::from_str::<Report>(&line)
                        && let Ok(mut latest) = latest.lock()
                    {
                        latest[w] = report;
                    }
                }
            });
            children.push(child);
        }
        Ok(Workers { children, latest })
    }

    /// A counter summed over the workers.
    fn sum(&self, field: impl Fn(&Report) -> u64) -> u64 {
        self.latest
            .lock()
            .map(|l| l.iter().map(&field).sum())
            .unwrap_or(0)
    }

    /// A histogram merged over the workers.
    fn merged(&self, field: impl Fn(&Report) -> &str) -> Result<Histogram<u64>, BenchError> {
        let mut all = Histogram::new_with_bounds(1, 120_000_000, 3)?;
        let latest = self.latest.lock().map_err(|_| "reports poisoned")?;
        for report in latest.iter().filter(|r| !field(r).is_empty()) {
            all.add(Report::histogram(field(report))?)?;
        }
        Ok(all)
    }

    /// Sends a command to every worker.
    async fn tell(&mut self, command: &str) -> Result<(), BenchError> {
        for child in &mut self.children {
            if let Some(stdin) = child.stdin.as_mut() {
                stdin.write_all(format!("{command}\n").as_bytes()).await?;
                stdin.flush().await?;
            }
        }
        Ok(())
    }

    /// Waits until the sum of `field` reaches `want`, the next reports included (so a
    /// `reset` has been seen).
    async fn wait(
        &self,
        field: impl Fn(&Report) -> u64,
        want: u64,
        secs: u64,
        what: &str,
    ) -> Result<(), BenchError> {
        super::load::wait_for(|| self.sum(&field) >= want, secs, what).await
    }

    /// Stops them and waits for them to exit.
    async fn stop(mut self) -> Result<(), BenchError> {
        self.tell("stop").await?;
        for child in &mut self.children {
            if tokio::time::timeout(Duration::from_secs(30), child.wait())
                .await
                .is_err()
            {
                child.start_kill()?;
            }
        }
        Ok(())
    }
}

/// Connections on gateway `g` of `k` when user `i` goes to `i mod k`.
fn share(n: usize, k: usize, g: usize) -> usize {
    n / k + usize::from(g < n % k)
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v.get(v.len() / 2).copied().unwrap_or(0.0)
}

pub(super) async fn run(args: ConnsArgs) -> Result<(), BenchError> {
    let (n, k, m) = (args.conns, args.gateways.max(1), args.client_procs.max(1));
    let per_gateway = share(n, k, 0);
    let per_worker = n.div_ceil(m);
    if per_gateway > 19_000 || per_worker > 19_000 {
        return Err(format!(
            "{n} connections on {k} gateways from {m} client processes: {per_gateway} per gateway, \
             {per_worker} per client process; a process holds at most 20,000 files (keep both ≤ 19,000)"
        )
        .into());
    }
    rlimit::increase_nofile_limit(u64::MAX)?;
    let tmp = tempfile::tempdir()?;
    let nats = herald_natsd::NatsServer::start(herald_natsd::NatsServerOptions::dev(
        tmp.path().join("nats"),
    ))
    .await?;
    let url = nats.client_url();
    let raw_core = super::raw_core(&url, 100_000, 177).await?;
    eprintln!("bench: raw core pub/sub {raw_core:.0}/s; starting Herald and {k} gateways");
    let herald = Herald::start(&url).await?;
    let env = gateway_env(&url, args.upgrades_per_sec);
    let mut gateways = Vec::with_capacity(k);
    let mut rss_before = Vec::with_capacity(k);
    for g in 0..k {
        let addr = std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?;
        let log = tmp.path().join(format!("gateway-{g}.log"));
        let gateway = GatewayProcess::start(addr, &env, &log).await?;
        rss_before.push(fleet::rss_bytes(gateway.pid().ok_or("no pid")?)?);
        gateways.push(Some(gateway));
    }
    let addrs: Vec<SocketAddr> = gateways.iter().flatten().map(|g| g.addr()).collect();
    let targets: Vec<String> = addrs.iter().map(|a| format!("ws://{a}")).collect();

    // 0. With `--topic`, everyone follows one big topic before connecting.
    let http = reqwest::Client::new();
    if args.topic {
        subscribe_all(&http, &herald.api, &herald.api_key, n).await?;
    }

    // 1. Idle.
    let started = Instant::now();
    let mut workers = Workers::start(n, m, &targets, Some(super::conns::SECRET))?;
    workers
        .wait(|r| r.connected, n as u64, 900, "all connected")
        .await?;
    let connect_secs = started.elapsed().as_secs_f64();
    let idle_refused = workers.sum(|r| r.refused);
    let idle_connect = workers.merged(|r| &r.connect)?;
    eprintln!("bench: {n} connected in {connect_secs:.1} s; memory in 2 s, then the broadcast");
    // Let allocations settle before reading memory.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let mut per_conn = Vec::with_capacity(k);
    let mut rss_total = 0u64;
    for (g, gateway) in gateways.iter().flatten().enumerate() {
        let rss = fleet::rss_bytes(gateway.pid().ok_or("no pid")?)?;
        rss_total += rss;
        per_conn.push(rss.saturating_sub(rss_before[g]) as f64 / share(n, k, g) as f64);
    }

    // 2. Broadcast: one notification per user, or one publish to the topic they follow.
    let clock = Fleet::new()?;
    workers.tell("reset").await?;
    // CPU time of the gateways and of the client processes over the broadcast: on a
    // noisy shared machine, a steadier figure than the wall time.
    let gateway_pids: Vec<u32> = gateways.iter().flatten().filter_map(|g| g.pid()).collect();
    let client_pids: Vec<u32> = workers.children.iter().filter_map(|c| c.id()).collect();
    let cpu_of = |pids: &[u32]| -> Result<(f64, f64), BenchError> {
        pids.iter().try_fold((0.0, 0.0), |(u, s), p| {
            let (user, system) = fleet::cpu_split(*p)?;
            Ok::<_, BenchError>((u + user, s + system))
        })
    };
    let (gateway_cpu, client_cpu) = (cpu_of(&gateway_pids)?, cpu_of(&client_pids)?);
    let burst_start = clock.now_us();
    if args.topic {
        publish_to_all(&http, &herald.api, &herald.api_key, &clock).await?;
    } else {
        send_to(&http, &herald.api, &herald.api_key, &clock, 0..n).await?;
    }
    let accepted_ms = (clock.now_us() - burst_start) as f64 / 1000.0;
    workers
        .wait(|r| r.received, n as u64, 300, "broadcast delivered")
        .await?;
    let burst_all_ms = (clock.now_us() - burst_start) as f64 / 1000.0;
    let per_frame = |(u1, s1): (f64, f64), (u0, s0): (f64, f64)| {
        ((u1 - u0) * 1e6 / n as f64, (s1 - s0) * 1e6 / n as f64)
    };
    let (gateway_user, gateway_sys) = per_frame(cpu_of(&gateway_pids)?, gateway_cpu);
    let (client_user, client_sys) = per_frame(cpu_of(&client_pids)?, client_cpu);
    // The last report may be up to one tick old: wait for one more.
    tokio::time::sleep(Duration::from_millis(400)).await;
    let burst = workers.merged(|r| &r.delivery)?;
    // Every client stays connected through a broadcast; a reconnect here is a fault.
    let reconnects = workers.merged(|r| &r.connect)?.len();

    println!(
        "\n## herald bench conns ({n} connections, {k} gateway processes, {m} client processes)\n"
    );
    println!("| measure | result |");
    println!("|---|---|");
    println!("| raw core NATS pub/sub, same server | {raw_core:.0} msgs/s |");
    println!(
        "| connect {n} (256 in flight, admission {}/s per gateway) | {:.0} connects/s, {idle_refused} refused (503), connect p99 {:.1} ms |",
        args.upgrades_per_sec,
        n as f64 / connect_secs,
        ms(idle_connect.value_at_quantile(0.99))
    );
    println!(
        "| gateway RSS per connection ({k} gateways, ~{per_gateway} each) | **{:.2} KiB median** (min {:.2}, max {:.2}); {:.1} MiB in all |",
        median(per_conn.clone()) / 1024.0,
        per_conn.iter().copied().fold(f64::MAX, f64::min) / 1024.0,
        per_conn.iter().copied().fold(0.0, f64::max) / 1024.0,
        rss_total as f64 / 1048576.0
    );
    // One publish: the last frame's latency from it is when all had arrived (the
    // clients' reports, every 200 ms, only confirm the count). Many sends: from the first.
    let (all_ms, counted) = if args.topic {
        (
            ms(burst.max()),
            format!(
                "the last frame's latency from the publish; all {n} counted by the clients' reports at {burst_all_ms:.0} ms"
            ),
        )
    } else {
        (
            burst_all_ms,
            format!("from the first send until the clients' reports counted all {n}"),
        )
    };
    let how = if args.topic {
        format!("ONE publish to a big topic all {n} follow")
    } else {
        format!("1 notification to each of {n} users")
    };
    println!(
        "| broadcast: {how} | all accepted after {accepted_ms:.0} ms; p50 {:.1} ms, p99 {:.1} ms, max {:.1} ms; **all delivered after {all_ms:.0} ms** ({counted}); {reconnects} reconnects meanwhile; CPU per delivered frame (user + kernel): gateways {gateway_user:.1} + {gateway_sys:.1} µs, bench clients {client_user:.1} + {client_sys:.1} µs |",
        ms(burst.value_at_quantile(0.5)),
        ms(burst.value_at_quantile(0.99)),
        ms(burst.max())
    );

    // 3. Storm.
    if !args.no_storm {
        let kill = args.kill.unwrap_or(k.div_ceil(2)).clamp(1, k);
        let affected: Vec<usize> = (0..n).filter(|i| i % k < kill).collect();
        workers.tell("reset").await?;
        let received_before = workers.sum(|r| r.received);
        let duplicates_before = workers.sum(|r| r.duplicates);
        for gateway in gateways.iter_mut().take(kill) {
            if let Some(g) = gateway.take() {
                g.kill().await?;
            }
        }
        super::load::wait_for(
            || workers.sum(|r| r.connected) <= (n - affected.len()) as u64,
            120,
            "the killed gateways' clients dropped",
        )
        .await?;
        // Sent while their gateways are down: each client must find its one on resume.
        send_to(
            &http,
            &herald.api,
            &herald.api_key,
            &clock,
            affected.iter().copied(),
        )
        .await?;
        let restart = Instant::now();
        let mut cpu = Vec::with_capacity(kill);
        for (g, slot) in gateways.iter_mut().enumerate().take(kill) {
            let log = tmp.path().join(format!("gateway-{g}.log"));
            let gateway = GatewayProcess::start(addrs[g], &env, &log).await?;
            let pid = gateway.pid().ok_or("no pid")?;
            cpu.push((pid, fleet::cpu_seconds(pid)?));
            *slot = Some(gateway);
        }
        let cpu_start: f64 = cpu.iter().map(|c| c.1).sum();
        let mut last: Vec<f64> = cpu.iter().map(|c| c.1).collect();
        // The peak is taken over one-second windows (the last four 250 ms samples): the
        // kernel accounts a busy thread's CPU time in jumps, so a single 250 ms sample
        // can read more than the machine's cores.
        let mut windows: Vec<std::collections::VecDeque<(Instant, f64)>> = cpu
            .iter()
            .map(|c| std::collections::VecDeque::from([(Instant::now(), c.1)]))
            .collect();
        let mut peak = 0.0f64;
        let mut told = Instant::now();
        let deadline = restart + Duration::from_secs(900);
        while workers.sum(|r| r.connected) < n as u64 {
            if Instant::now() > deadline {
                return Err("bench: storm: not all back within 900 s".into());
            }
            if told.elapsed() >= Duration::from_secs(5) {
                told = Instant::now();
                eprintln!(
                    "bench: storm: {}/{n} connected, {} refused so far, {:.0} s after the restart",
                    workers.sum(|r| r.connected),
                    workers.sum(|r| r.refused),
                    restart.elapsed().as_secs_f64()
                );
            }
            tokio::time::sleep(Duration::from_millis(250)).await;
            for (i, (pid, _)) in cpu.iter().enumerate() {
                let now = fleet::cpu_seconds(*pid)?;
                let window = &mut windows[i];
                window.push_back((Instant::now(), now));
                if window.len() > 4
                    && let Some((then, before)) = window.pop_front()
                {
                    peak = peak.max((now - before) / then.elapsed().as_secs_f64());
                }
                last[i] = now;
            }
        }
        let back_secs = restart.elapsed().as_secs_f64();
        let cpu_avg = (last.iter().sum::<f64>() - cpu_start) / back_secs / kill as f64;
        let want = received_before + affected.len() as u64;
        let _ = workers.wait(|r| r.received, want, 120, "resumed").await;
        tokio::time::sleep(Duration::from_millis(400)).await;
        let lost = want.saturating_sub(workers.sum(|r| r.received));
        let duplicated = workers.sum(|r| r.duplicates) - duplicates_before;
        let storm = workers.merged(|r| &r.connect)?;
        println!(
            "| storm: kill -9 of {kill} of {k} gateways, {} clients reconnect (full jitter, 500 ms–30 s as the SDKs, Retry-After as a floor) | **all back {back_secs:.1} s after the restart**; {} refused (503); connect p99 {:.0} ms, max {:.0} ms; restarted gateways' CPU: peak {:.0}%, average {:.0}% of a core each |",
            affected.len(),
            workers.sum(|r| r.refused),
            ms(storm.value_at_quantile(0.99)),
            ms(storm.max()),
            peak * 100.0,
            cpu_avg * 100.0
        );
        println!(
            "| storm: {} notifications sent during the outage | **lost {lost}, duplicated {duplicated}** |",
            affected.len()
        );
    }
    workers.stop().await?;
    for gateway in gateways.into_iter().flatten() {
        gateway.kill().await?;
    }

    // 4. Side by side: K nats-servers' WebSocket listeners holding the same N.
    if !args.no_nats_ws {
        side_by_side(n, k, m, tmp.path()).await?;
    }
    herald.stop().await?;
    drop(nats);
    Ok(())
}

async fn side_by_side(
    n: usize,
    k: usize,
    m: usize,
    dir: &std::path::Path,
) -> Result<(), BenchError> {
    let mut servers = Vec::with_capacity(k);
    let mut before = Vec::with_capacity(k);
    for s in 0..k {
        let server = herald_natsd::NatsServer::start(herald_natsd::NatsServerOptions::dev(
            dir.join(format!("natsws-{s}")),
        ))
        .await?;
        before.push(fleet::rss_bytes(server.pid())?);
        servers.push(server);
    }
    let targets = servers
        .iter()
        .map(|s| {
            s.websocket_url()
                .ok_or("nats-server has no websocket listener")
        })
        .collect::<Result<Vec<_>, _>>()?;
    let started = Instant::now();
    let workers = Workers::start(n, m, &targets, None)?;
    workers
        .wait(|r| r.connected, n as u64, 900, "nats ws clients connected")
        .await?;
    let connects_per_sec = n as f64 / started.elapsed().as_secs_f64();
    tokio::time::sleep(Duration::from_secs(2)).await;
    let mut per_conn = Vec::with_capacity(k);
    for (s, server) in servers.iter().enumerate() {
        let rss = fleet::rss_bytes(server.pid())?;
        per_conn.push(rss.saturating_sub(before[s]) as f64 / share(n, k, s) as f64);
    }
    let mut publishers = Vec::with_capacity(k);
    for server in &servers {
        publishers.push(async_nats::connect(server.client_url()).await?);
    }
    let clock = Fleet::new()?;
    let start = clock.now_us();
    for i in 0..n {
        let payload = clock.now_us().to_string();
        publishers[i % k]
            .publish(format!("live.c-{i}"), payload.into())
            .await?;
    }
    for p in &publishers {
        p.flush().await?;
    }
    let _ = workers
        .wait(|r| r.received, n as u64, 120, "nats ws delivered")
        .await;
    let all_ms = (clock.now_us() - start) as f64 / 1000.0;
    tokio::time::sleep(Duration::from_millis(400)).await;
    let delivery = workers.merged(|r| &r.delivery)?;
    let received = workers.sum(|r| r.received);
    println!(
        "| side by side: {n} idle clients on {k} nats-servers' own WebSocket listeners (one SUB each) | {connects_per_sec:.0} connects/s; **{:.2} KiB per connection** (median of the servers) of nats-server RSS; one core message to each: {received} arrived, p50 {:.1} ms, p99 {:.1} ms, all after {all_ms:.0} ms |",
        median(per_conn) / 1024.0,
        ms(delivery.value_at_quantile(0.5)),
        ms(delivery.value_at_quantile(0.99)),
    );
    workers.stop().await?;
    Ok(())
}

/// The topic every user follows in a `--topic` run.
const TOPIC: &str = "bench-everyone";

/// Subscribes users `c-0 … c-{n-1}` to [`TOPIC`], 1,000 per request.
async fn subscribe_all(
    http: &reqwest::Client,
    api: &str,
    key: &str,
    n: usize,
) -> Result<(), BenchError> {
    use futures::StreamExt as _;
    let started = Instant::now();
    let mut done = futures::stream::iter((0..n).step_by(1_000).map(|from| {
        let ids: Vec<String> = (from..(from + 1_000).min(n))
            .map(|i| format!("c-{i}"))
            .collect();
        let request = http
            .post(format!("{api}/v1/topics/{TOPIC}/subscribers"))
            .bearer_auth(key)
            .json(&serde_json::json!({ "user_ids": ids }));
        async move {
            let r = request.send().await?;
            if !r.status().is_success() {
                return Err(BenchError::from(format!("bulk subscribe: {}", r.status())));
            }
            Ok(ids.len())
        }
    }))
    .buffer_unordered(4);
    let mut subscribed = 0;
    while let Some(batch) = done.next().await {
        subscribed += batch?;
    }
    eprintln!(
        "bench: {subscribed} users follow {TOPIC} ({:.1} s)",
        started.elapsed().as_secs_f64()
    );
    Ok(())
}

/// One publish to [`TOPIC`], stamped for the clients' latency histogram.
async fn publish_to_all(
    http: &reqwest::Client,
    api: &str,
    key: &str,
    clock: &Fleet,
) -> Result<(), BenchError> {
    let r = http
        .post(format!("{api}/v1/topics/{TOPIC}/publish"))
        .bearer_auth(key)
        .json(&serde_json::json!({"title": "broadcast", "data": {"sent_us": clock.now_us()}}))
        .send()
        .await?;
    if r.status().as_u16() != 202 {
        return Err(format!("topic publish answered {}", r.status()).into());
    }
    Ok(())
}
