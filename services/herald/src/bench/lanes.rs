//! `herald bench lanes`: shows that `high` never waits behind `low`, end to end. A
//! marketing blast of `--low` notifications (push and inbox) goes in through the batch
//! endpoint as fast as Herald accepts it, so it queues at every stage: the router's `low`
//! lane, the push work queue's `low` lane, the provider. While that backlog stands, OTP
//! probes at `high` go to one user who is connected over WebSocket and has a device; each
//! probe reports accepted→frame and accepted→sent by the APNs fake (HTTP/2 with TLS, the
//! real wire protocol), beside the backlog that was waiting at that moment.
//!
//! The raw JetStream publish→ack latency of the same server is the ceiling beside them.

use super::{BenchAuth, BenchError, ms, raw_ack_latency, shared_histogram};
use crate::mesh::{MeshOptions, Roles};
use async_nats::jetstream;
use clap::Args;
use futures::StreamExt as _;
use herald_fakes::apns::ApnsFake;
use herald_protocol::streams::{self, StreamSettings};
use herald_protocol::{Channel, Priority, Subjects, UserId};
use serde_json::{Value, json};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

/// `herald bench lanes`.
#[derive(Debug, Clone, Args)]
pub struct LanesArgs {
    /// `low` notifications in the blast (each with an inbox entry and a push).
    #[arg(long, default_value_t = 200_000)]
    pub low: u64,
    /// Recipients of the blast, each with one iOS device.
    #[arg(long, default_value_t = 1_000)]
    pub users: usize,
    /// `high` probes sent while the backlog stands.
    #[arg(long, default_value_t = 10)]
    pub probes: usize,
    /// INBOX partitions (router consumers per lane).
    #[arg(long, default_value_t = 16)]
    pub partitions: u16,
}

/// Batch endpoint requests in flight during the blast.
const BLAST_CONCURRENCY: usize = 4;
/// Notifications per batch request.
const BLAST_BATCH: u64 = 1_000;
const PROBE_USER: &str = "otp-user";

/// Runs the benchmark and prints its report.
///
/// # Errors
/// When NATS, the fake or Herald cannot be started, or a probe is lost.
pub async fn run(args: LanesArgs) -> Result<(), BenchError> {
    let tmp = tempfile::tempdir()?;
    let server = herald_natsd::NatsServer::start(herald_natsd::NatsServerOptions::dev(
        tmp.path().join("nats"),
    ))
    .await?;
    let url = server.client_url();
    eprintln!("bench lanes: nats-server at {url}");
    let raw_ack = raw_ack_latency(&url, 500, 2, 200).await?;

    let apns = ApnsFake::start("com.herald.bench").await?;
    let key_file = tmp.path().join("apns.p8");
    let ca_file = tmp.path().join("ca.pem");
    std::fs::write(&key_file, apns.p8_pem())?;
    std::fs::write(&ca_file, apns.ca_pem())?;
    let providers = herald_channels::build(&herald_channels::ProvidersConfig {
        apns_url: Some(apns.url()),
        apns_key_file: Some(key_file),
        apns_key_id: Some(apns.key_id().into()),
        apns_team_id: Some(apns.team_id().into()),
        apns_topic: Some("com.herald.bench".into()),
        provider_ca_file: Some(ca_file),
        ..Default::default()
    })?;
    let mut channels = crate::channels::ChannelSettings::new([0x42; 32]);
    channels.configured = providers;
    channels.channels = Some(vec![Channel::Push]);
    // Push at once: the probe user is connected but acks nothing; what is measured is the
    // lane, not the escalation delay.
    channels.escalation_delay = Duration::ZERO;

    let BenchAuth {
        api_key,
        keys,
        jwt,
        users: auth,
    } = BenchAuth::new()?;
    let subjects = Subjects::new("hbench", args.partitions)?;
    let options = MeshOptions {
        nats_url: url.clone(),
        nats: Default::default(),
        name: "herald-bench-lanes".into(),
        subjects: subjects.clone(),
        streams: StreamSettings::default(),
        provision: true,
        api_keys: keys,
        jwt,
        jwks: None,
        api: Default::default(),
        gateway: Default::default(),
        roles: Roles::ALL,
        dev_mode: false,
        channels,
        policy: Default::default(),
        templates: Default::default(),
        rates: Default::default(),
        topics: Default::default(),
    };
    let (runtime, mesh) = super::mesh_apart(options, 2, "herald-server").await?;
    let base = format!("http://{}", mesh.addr());
    let http = reqwest::Client::new();

    eprintln!("bench lanes: registering {} devices", args.users + 1);
    let mut recipients: Vec<String> = (0..args.users).map(|u| format!("fan-{u:05}")).collect();
    recipients.push(PROBE_USER.into());
    for (i, user) in recipients.iter().enumerate() {
        let token = auth.mint(&UserId::new(user.as_str())?, 3600)?;
        let r = http
            .post(format!("{base}/v1/me/devices"))
            .bearer_auth(token)
            .json(&json!({"platform": "ios", "token": format!("{i:064x}")}))
            .send()
            .await?;
        if !r.status().is_success() {
            return Err(format!("registering a device: {}", r.status()).into());
        }
    }
    let token = auth.mint(&UserId::new(PROBE_USER)?, 3600)?;
    let (mut ws, _) = tokio_tungstenite::connect_async(format!(
        "{}/v1/ws?access_token={token}",
        base.replacen("http://", "ws://", 1)
    ))
    .await?;
    ws.next().await.ok_or("no hello")??;

    eprintln!("bench lanes: blasting {} low notifications", args.low);
    let blast_start = Instant::now();
    blast(&http, &base, &api_key, &recipients[..args.users], args.low).await?;
    let blast_took = blast_start.elapsed();

    let js = jetstream::new(async_nats::connect(&url).await?);
    let arrivals = Arrivals::follow(ws);
    let mut probes = Vec::with_capacity(args.probes);
    let frames = shared_histogram()?;
    let pushes = shared_histogram()?;
    for p in 0..args.probes {
        let backlog = Backlog::read(&js, &subjects).await?;
        let sent = Instant::now();
        let r = http
            .post(format!("{base}/v1/notify"))
            .bearer_auth(&api_key)
            .json(&json!({"user_id": PROBE_USER, "title": format!("OTP {p:06}"), "priority": "high", "channels": ["inbox", "push"]}))
            .send()
            .await?;
        if r.status() != reqwest::StatusCode::ACCEPTED {
            return Err(format!("probe not accepted: {}", r.status()).into());
        }
        let id = r.json::<Value>().await?["id"]
            .as_str()
            .ok_or("no id")?
            .to_owned();
        let (frame_at, push_at) = tokio::try_join!(
            arrivals.wait(&id, sent),
            sent_by_provider(&http, &base, &api_key, &id, sent)
        )?;
        record(&frames, frame_at)?;
        record(&pushes, push_at)?;
        eprintln!(
            "bench lanes: probe {p}: frame {:.1} ms, push sent {:.1} ms; waiting: router low {}, push queue low {}",
            frame_at.as_secs_f64() * 1e3,
            push_at.as_secs_f64() * 1e3,
            backlog.router_low,
            backlog.queue_low
        );
        probes.push(backlog);
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    // How long the backlog the probes overtook took to clear.
    let drain_deadline = Instant::now() + Duration::from_secs(1800);
    loop {
        let b = Backlog::read(&js, &subjects).await?;
        if b.router_low + b.queue_low == 0 || Instant::now() > drain_deadline {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let drained = blast_start.elapsed();
    runtime.spawn(mesh.shutdown()).await??;
    drop(runtime);

    let frames = frames.lock().map_err(|_| "poisoned")?.clone();
    let pushes = pushes.lock().map_err(|_| "poisoned")?.clone();
    let min_router = probes.iter().map(|b| b.router_low).min().unwrap_or(0);
    let min_queue = probes.iter().map(|b| b.queue_low).min().unwrap_or(0);
    println!(
        "\n## herald bench lanes ({} low, {} users, {} high probes)\n",
        args.low, args.users, args.probes
    );
    println!("| measure | result |");
    println!("|---|---|");
    println!(
        "| raw JetStream publish→ack at 500/s (ceiling) | p50 {:.2} ms, p99 {:.2} ms |",
        ms(raw_ack.value_at_quantile(0.5)),
        ms(raw_ack.value_at_quantile(0.99))
    );
    println!(
        "| blast accepted (batch endpoint, {BLAST_BATCH} × {BLAST_CONCURRENCY}) | {:.1} s, {:.0}/s |",
        blast_took.as_secs_f64(),
        args.low as f64 / blast_took.as_secs_f64()
    );
    println!(
        "| backlog at each probe, smallest: router `low` lane / push queue `low` lane | {min_router} / {min_queue} |"
    );
    println!(
        "| high: notify→WebSocket frame | p50 {:.1} ms, max {:.1} ms |",
        ms(frames.value_at_quantile(0.5)),
        ms(frames.max())
    );
    println!(
        "| high: notify→sent by the APNs fake (status `sent`) | p50 {:.1} ms, max {:.1} ms |",
        ms(pushes.value_at_quantile(0.5)),
        ms(pushes.max())
    );
    println!(
        "| the blast's backlog (router and queue `low` lanes) cleared after | {:.1} s from its start |",
        drained.as_secs_f64()
    );
    Ok(())
}

/// What waits behind the probes: the `low` lane of the router (summed over partitions)
/// and of the push work queue.
struct Backlog {
    router_low: u64,
    queue_low: u64,
}

impl Backlog {
    async fn read(js: &jetstream::Context, subjects: &Subjects) -> Result<Self, BenchError> {
        let inbox = js.get_stream(streams::INBOX).await?;
        let mut router_low = 0;
        for p in 0..subjects.partitions() {
            let info = inbox
                .consumer_info(&streams::router_consumer(p, Priority::Low))
                .await?;
            router_low += info.num_pending + info.num_ack_pending as u64;
        }
        let work = js
            .get_stream(streams::work_stream_name(Channel::Push))
            .await?;
        let info = work
            .consumer_info(&streams::worker_consumer(Channel::Push, Priority::Low))
            .await?;
        Ok(Self {
            router_low,
            queue_low: info.num_pending + info.num_ack_pending as u64,
        })
    }
}

fn record(
    hist: &std::sync::Mutex<hdrhistogram::Histogram<u64>>,
    took: Duration,
) -> Result<(), BenchError> {
    hist.lock()
        .map_err(|_| "poisoned")?
        .record((took.as_micros() as u64).max(1))?;
    Ok(())
}

/// Sends `count` low notifications to `users` through the batch endpoint.
async fn blast(
    http: &reqwest::Client,
    base: &str,
    key: &str,
    users: &[String],
    count: u64,
) -> Result<(), BenchError> {
    let next = Arc::new(AtomicU64::new(0));
    let accepted = Arc::new(AtomicU64::new(0));
    let users: Arc<[String]> = users.into();
    let mut tasks = tokio::task::JoinSet::new();
    for _ in 0..BLAST_CONCURRENCY {
        let (http, next, accepted, users) =
            (http.clone(), next.clone(), accepted.clone(), users.clone());
        let url = format!("{base}/v1/notify/batch");
        let key = key.to_owned();
        tasks.spawn(async move {
            loop {
                let first = next.fetch_add(BLAST_BATCH, Ordering::Relaxed);
                if first >= count {
                    return Ok::<_, BenchError>(());
                }
                let items: Vec<Value> = (first..(first + BLAST_BATCH).min(count))
                    .map(|i| json!({"user_id": users[i as usize % users.len()], "title": format!("Sale {i}"), "priority": "low", "category": "marketing", "channels": ["inbox", "push"]}))
                    .collect();
                let r = http
                    .post(&url)
                    .bearer_auth(&key)
                    .json(&json!({"notifications": items}))
                    .send()
                    .await?;
                let body: Value = r.json().await?;
                accepted.fetch_add(body["accepted"].as_u64().unwrap_or(0), Ordering::Relaxed);
            }
        });
    }
    while let Some(done) = tasks.join_next().await {
        done??;
    }
    let got = accepted.load(Ordering::Relaxed);
    if got < count {
        return Err(format!("blast: {got} of {count} accepted").into());
    }
    Ok(())
}

/// When each notification id reached the probe user's WebSocket, recorded by a reader
/// task as frames arrive (so a frame that beats the 202 is timed when it came).
struct Arrivals {
    seen: Arc<std::sync::Mutex<std::collections::HashMap<String, Instant>>>,
    changed: Arc<tokio::sync::Notify>,
}

impl Arrivals {
    fn follow<S>(mut ws: S) -> Self
    where
        S: futures::Stream<
                Item = Result<
                    tokio_tungstenite::tungstenite::Message,
                    tokio_tungstenite::tungstenite::Error,
                >,
            > + Unpin
            + Send
            + 'static,
    {
        let seen = Arc::new(std::sync::Mutex::new(std::collections::HashMap::new()));
        let changed = Arc::new(tokio::sync::Notify::new());
        let (s, c) = (seen.clone(), changed.clone());
        tokio::spawn(async move {
            while let Some(Ok(msg)) = ws.next().await {
                let at = Instant::now();
                let tokio_tungstenite::tungstenite::Message::Text(text) = msg else {
                    continue;
                };
                let Ok(v) = serde_json::from_str::<Value>(&text) else {
                    continue;
                };
                let items = match v["items"].as_array() {
                    Some(items) => items.clone(),
                    None => vec![v],
                };
                if let Ok(mut seen) = s.lock() {
                    for item in items {
                        if let Some(id) = item["id"].as_str() {
                            seen.insert(id.to_owned(), at);
                        }
                    }
                }
                c.notify_waiters();
            }
        });
        Self { seen, changed }
    }

    /// The time from `since` until the frame carrying `id` arrived.
    async fn wait(&self, id: &str, since: Instant) -> Result<Duration, BenchError> {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
        loop {
            let changed = self.changed.notified();
            if let Some(at) = self.seen.lock().map_err(|_| "poisoned")?.get(id) {
                return Ok(at.saturating_duration_since(since));
            }
            tokio::time::timeout_at(deadline, changed)
                .await
                .map_err(|_| format!("no frame for probe {id} within 60 s"))?;
        }
    }
}

/// Polls the delivery status until the push entry says `sent` (the provider answered
/// 200); returns the time since `since`. Polling every 2 ms overstates it by at most that.
async fn sent_by_provider(
    http: &reqwest::Client,
    base: &str,
    key: &str,
    id: &str,
    since: Instant,
) -> Result<Duration, BenchError> {
    let deadline = since + Duration::from_secs(60);
    while Instant::now() < deadline {
        let s: Value = http
            .get(format!("{base}/v1/notifications/{id}"))
            .bearer_auth(key)
            .send()
            .await?
            .json()
            .await?;
        if s["channels"]["push"][0]["state"] == "sent" {
            return Ok(since.elapsed());
        }
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    Err(format!("probe {id} not sent within 60 s").into())
}
