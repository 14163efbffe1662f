//! `herald bench fanout`: one publish to a topic with a million subscribers, of whom
//! thousands are online over WebSocket on a `herald gateway` child process.
//!
//! Starts its own nats-server and an in-process Herald (api, router, fan-out worker; no
//! channel workers, so push jobs stay countable in their queue), then:
//! 1. subscribes N users to one topic through the bulk endpoint (10,000 per request);
//! 2. registers a push device for a share of them (through the targets store);
//! 3. connects `online` of them over WebSocket to the gateway child;
//! 4. publishes once (inbox + push) and measures: the 202, publish → every online
//!    subscriber's frame (p50/p99/last), durable writes the publish caused (stream message
//!    counts before/after), that sampled offline views hold it, the push jobs enqueued
//!    for subscribers with a device and the time until the last, and nats-server's RSS;
//! 5. as the ceiling, the same number of clients on nats-server's own WebSocket listener
//!    subscribed to one subject, and one core publish to it.
//!
//! Progress goes to stderr; the report (Markdown) to stdout.

use super::fleet::{self, Fleet, GatewayProcess};
use super::load::wait_for;
use super::{BenchAuth, BenchError, ms};
use crate::mesh::Mesh;
use clap::Args;
use herald_protocol::streams;
use herald_protocol::{Channel, Subjects, UserId};
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

/// `herald bench fanout`.
#[derive(Debug, Clone, Args)]
pub struct FanoutArgs {
    /// Subscribers of the topic.
    #[arg(long, default_value_t = 1_000_000)]
    pub subscribers: usize,
    /// Of those, connected over WebSocket to one gateway process (keep it below ~19k).
    #[arg(long, default_value_t = 10_000)]
    pub online: usize,
    /// Share of subscribers with a push device (0.0–1.0).
    #[arg(long, default_value_t = 0.1)]
    pub push_share: f64,
    /// Bulk subscribe requests in flight.
    #[arg(long, default_value_t = 4)]
    pub bulk_concurrency: usize,
}

const PREFIX: &str = "hbench";
const PARTITIONS: u16 = 16;
const TOPIC: &str = "bench.big";
const BULK: usize = 10_000;

fn user(i: usize) -> String {
    format!("c-{i}")
}

pub(super) async fn run(args: FanoutArgs) -> Result<(), BenchError> {
    let soft = rlimit::increase_nofile_limit(u64::MAX)?;
    let n = args.subscribers;
    let online = args.online.min(n);
    if (soft as usize) < online + 500 {
        return Err(format!(
            "{online} connections need {} open files; the limit is {soft}",
            online + 500
        )
        .into());
    }
    let tmp = tempfile::tempdir()?;
    let nats = herald_natsd::NatsServer::start(herald_natsd::NatsServerOptions::dev(
        tmp.path().join("nats"),
    ))
    .await?;
    let url = nats.client_url();
    eprintln!("bench fanout: nats-server at {url}; {n} subscribers, {online} online");

    let auth = BenchAuth::new()?;
    let subjects = Subjects::new(PREFIX, PARTITIONS)?;
    let options = auth.mesh_without_gateway(url.clone(), "herald-bench-fanout", subjects.clone());
    let BenchAuth { api_key, users, .. } = auth;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let mesh = Mesh::start(options, listener).await?;
    let api = format!("http://{}", mesh.addr());
    let http = reqwest::Client::new();

    // 1. Subscribers, in bulk.
    let started = Instant::now();
    let mut chunks = futures::stream::iter((0..n).step_by(BULK).map(|from| {
        let ids: Vec<String> = (from..(from + BULK).min(n)).map(user).collect();
        let (http, api, key) = (http.clone(), api.clone(), api_key.clone());
        async move {
            let r = http
                .post(format!("{api}/v1/topics/{TOPIC}/subscribers"))
                .bearer_auth(key)
                .json(&serde_json::json!({ "user_ids": ids }))
                .send()
                .await?;
            if !r.status().is_success() {
                return Err(BenchError::from(format!("bulk subscribe: {}", r.status())));
            }
            Ok(ids.len())
        }
    }))
    .buffer_unordered(args.bulk_concurrency.max(1));
    let mut subscribed = 0;
    use futures::StreamExt as _;
    while let Some(done) = chunks.next().await {
        subscribed += done?;
        if subscribed.is_multiple_of(100_000) || subscribed == n {
            eprintln!(
                "bench fanout: subscribed {subscribed}/{n} ({:.0}/s)",
                subscribed as f64 / started.elapsed().as_secs_f64()
            );
        }
    }
    let subscribe_secs = started.elapsed().as_secs_f64();

    // 2. Push devices for a share of them, spread over the population (every k-th user).
    let store = herald_store::connect(&url, "bench-fanout").await?;
    let targets = herald_store::Targets::open(
        &store.js,
        herald_store::targets::ContactKeys::new([0x42; 32], &[]),
    )
    .await?;
    let every = if args.push_share > 0.0 {
        (1.0 / args.push_share).round().max(1.0) as usize
    } else {
        usize::MAX
    };
    let with_device: Vec<usize> = (0..n)
        .step_by(every.max(1))
        .filter(|_| args.push_share > 0.0)
        .collect();
    let started = Instant::now();
    let mut adds = futures::stream::iter(with_device.iter().map(|i| {
        let targets = targets.clone();
        let i = *i;
        async move {
            let u = UserId::new(user(i))?;
            targets
                .add_device(&u, herald_channels::Platform::Ios, &format!("tok-{i}"))
                .await?;
            Ok::<_, BenchError>(())
        }
    }))
    .buffer_unordered(256);
    let mut added = 0usize;
    while let Some(r) = adds.next().await {
        r?;
        added += 1;
        if added.is_multiple_of(20_000) {
            eprintln!("bench fanout: devices {added}/{}", with_device.len());
        }
    }
    eprintln!(
        "bench fanout: {} devices in {:.1} s",
        with_device.len(),
        started.elapsed().as_secs_f64()
    );

    // 3. Online subscribers on a gateway child process.
    let gateway_addr = std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?;
    let env = [
        ("HERALD_NATS_URL", url.clone()),
        ("HERALD_JWT_SECRET", super::conns::SECRET.to_string()),
        ("HERALD_SUBJECT_PREFIX", PREFIX.to_string()),
        ("HERALD_PARTITIONS", PARTITIONS.to_string()),
        ("HERALD_UPGRADES_PER_S", "5000".to_string()),
    ];
    let gateway =
        GatewayProcess::start(gateway_addr, &env, &tmp.path().join("gateway.log")).await?;
    let fleet = Fleet::new()?;
    let ws_base = format!("ws://{}/v1/ws", gateway.addr());
    let connecting = Arc::new(tokio::sync::Semaphore::new(256));
    let mut clients = tokio::task::JoinSet::new();
    for i in 0..online {
        let token = users.mint(&UserId::new(user(i))?, 24 * 3600)?;
        let permit = connecting.clone().acquire_owned().await?;
        clients.spawn(fleet::client(
            fleet.clone(),
            format!("{ws_base}?access_token={token}"),
            Some(permit),
        ));
    }
    wait_for(
        || fleet.connected.load(Ordering::Relaxed) >= online as u64,
        300,
        "all connected",
    )
    .await?;
    eprintln!("bench fanout: {online} online");

    // 4. One publish.
    let js = async_nats::jetstream::new(async_nats::connect(&url).await?);
    let counted = [
        streams::INBOX,
        streams::FANOUT,
        streams::work_stream_name(Channel::Push),
    ];
    let before = counts(&js, &counted).await?;
    let rss_before = fleet::rss_bytes(nats.pid())?;
    Fleet::reset(&fleet.delivery);
    let sent_us = fleet.now_us();
    let publish_at = Instant::now();
    let r = http
        .post(format!("{api}/v1/topics/{TOPIC}/publish"))
        .bearer_auth(&api_key)
        .json(&serde_json::json!({"title": "Kick-off in 10 minutes", "channels": ["inbox", "push"], "data": {"sent_us": sent_us}}))
        .send()
        .await?;
    let accepted_ms = publish_at.elapsed().as_secs_f64() * 1000.0;
    if r.status().as_u16() != 202 {
        return Err(format!("publish: {}", r.status()).into());
    }
    let answer: serde_json::Value = r.json().await?;
    let id = answer["id"].as_str().ok_or("publish id")?.to_owned();
    // Below the big-topic threshold the publish fans out on write (one inbox entry per
    // subscriber, after the 202); at or above it, it is stored once.
    let big = answer["path"] == "topic";
    let after_accept = counts(&js, &counted).await?;
    wait_for(
        || fleet.received.load(Ordering::Relaxed) >= online as u64,
        120,
        "every online subscriber's frame",
    )
    .await?;
    let all_online_ms = (fleet.now_us() - sent_us) as f64 / 1000.0;
    let delivery = Fleet::snapshot(&fleet.delivery)?;
    eprintln!("bench fanout: every online subscriber has it after {all_online_ms:.0} ms");

    // Channel work: the fan-out job hands push recipients to their routers.
    let expected_jobs = with_device.len() as u64;
    let mut last_progress = Instant::now();
    loop {
        let pushed = counts(&js, &counted).await?[2] - before[2];
        if pushed >= expected_jobs {
            break;
        }
        if last_progress.elapsed() > Duration::from_secs(2) {
            let p = progress(&http, &api, &api_key, &id).await?;
            eprintln!(
                "bench fanout: channel work {}/{} subscribers, {} routed, {pushed}/{expected_jobs} push jobs",
                p["fanout"]["done"], p["fanout"]["total"], p["fanout"]["routed"]
            );
            last_progress = Instant::now();
        }
        if publish_at.elapsed() > Duration::from_secs(900) {
            return Err("push jobs not all enqueued in 15 min".into());
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let jobs_secs = publish_at.elapsed().as_secs_f64();
    // When every inbox view holds it: at the 202 for a big topic; on the write path, when
    // the fan-out has written every subscriber's entry (read after the push jobs are all
    // there, so an upper bound).
    let views_ms = if big {
        accepted_ms
    } else {
        loop {
            let p = progress(&http, &api, &api_key, &id).await?;
            if p["fanout"]["done"].as_u64() >= p["fanout"]["total"].as_u64()
                && p["fanout"]["total"].as_u64().is_some()
            {
                break publish_at.elapsed().as_secs_f64() * 1000.0;
            }
            if publish_at.elapsed() > Duration::from_secs(900) {
                return Err("the fan-out did not finish in 15 min".into());
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    };
    // Sample offline subscribers' views.
    let mut sampled = 0;
    for k in 0..100 {
        let i = online + (k * 7_919) % (n - online).max(1);
        let page: serde_json::Value = http
            .get(format!("{api}/v1/users/{}/notifications?limit=1", user(i)))
            .bearer_auth(&api_key)
            .send()
            .await?
            .json()
            .await?;
        if page["items"][0]["data"]["sent_us"] == sent_us {
            sampled += 1;
        }
    }

    let after_jobs = counts(&js, &counted).await?;
    let rss_after = fleet::rss_bytes(nats.pid())?;

    fleet.stop.cancel();
    while clients.join_next().await.is_some() {}
    gateway.kill().await?;
    drop(mesh);

    // 5. The ceiling: the same number of clients on nats-server's WebSocket listener, one
    // core publish to the subject they all subscribe to.
    eprintln!("bench fanout: raw core NATS fan-out to {online} WebSocket clients");
    let raw = super::natsws::run_fanout(online, tmp.path()).await?;

    let delta = |a: &[u64], b: &[u64], k: usize| b[k].saturating_sub(a[k]);
    println!(
        "\n## herald bench fanout ({n} subscribers, {online} online on one gateway process, {} with a push device)\n",
        with_device.len()
    );
    println!("| measure | result |");
    println!("|---|---|");
    println!(
        "| bulk subscribe {n} (10,000 per request, {} in flight) | {:.1} s ({:.0}/s) |",
        args.bulk_concurrency,
        subscribe_secs,
        n as f64 / subscribe_secs
    );
    let path = if big {
        "stored once"
    } else {
        "below the big-topic threshold: fan-out on write"
    };
    println!("| publish → 202 ({path}) | {accepted_ms:.1} ms |");
    println!(
        "| durable writes at the 202 | INBOX +{}, FANOUT +{} |",
        delta(&before, &after_accept, 0),
        delta(&before, &after_accept, 1)
    );
    println!(
        "| publish → online frames, {online} clients | p50 {:.1} ms, p99 {:.1} ms, last {all_online_ms:.1} ms |",
        ms(delivery.value_at_quantile(0.5)),
        ms(delivery.value_at_quantile(0.99))
    );
    println!(
        "| raw core NATS fan-out, same message, {online} WebSocket clients | p50 {:.1} ms, p99 {:.1} ms, last {:.1} ms |",
        ms(raw.delivery.value_at_quantile(0.5)),
        ms(raw.delivery.value_at_quantile(0.99)),
        raw.all_ms
    );
    let when = if big {
        "at the 202"
    } else {
        "when the fan-out wrote the last entry"
    };
    println!(
        "| all {n} inbox views include it | {when} ({views_ms:.1} ms); {sampled}/100 sampled offline views hold it |"
    );
    println!(
        "| push jobs for subscribers with a device | {} enqueued, the last {jobs_secs:.1} s after the publish |",
        delta(&before, &after_jobs, 2)
    );
    let inbox_writes = if big {
        "one hand-over to the router per push recipient"
    } else {
        "one copy per subscriber, each routed for its channels"
    };
    println!(
        "| durable writes after the 202 | INBOX +{} ({inbox_writes}), push queue +{} |",
        delta(&after_accept, &after_jobs, 0),
        delta(&before, &after_jobs, 2)
    );
    println!(
        "| nats-server RSS before → after the publish | {:.0} MiB → {:.0} MiB |",
        rss_before as f64 / 1048576.0,
        rss_after as f64 / 1048576.0
    );
    drop(nats);
    Ok(())
}

/// The publish's progress document (`GET /v1/topics/{topic}/publishes/{id}`).
async fn progress(
    http: &reqwest::Client,
    api: &str,
    api_key: &str,
    id: &str,
) -> Result<serde_json::Value, BenchError> {
    Ok(http
        .get(format!("{api}/v1/topics/{TOPIC}/publishes/{id}"))
        .bearer_auth(api_key)
        .send()
        .await?
        .json()
        .await?)
}

async fn counts(
    js: &async_nats::jetstream::Context,
    names: &[&str],
) -> Result<Vec<u64>, BenchError> {
    let mut out = Vec::with_capacity(names.len());
    for name in names {
        let mut stream = js.get_stream(*name).await?;
        out.push(stream.info().await?.state.messages);
    }
    Ok(out)
}
