//! `herald bench notify`: durable notifications per second through the native path and
//! through HTTP, and notify→frame latency at a fixed rate to connected WebSocket clients —
//! with, in the same run and on the same nats-server, the raw ceilings Herald is built
//! on (JetStream async publish with `Nats-Msg-Id`, core pub/sub), so figures read as ratios.
//!
//! Without `--nats-url` it starts its own nats-server in a temp dir. Herald runs in this
//! process, so client and server share the machine's cores, as a laptop would.
//!
//! `herald bench lanes` ([`lanes`]) shows `high` overtaking a queued blast of `low`.
//!
//! `herald bench workers` ([`workers`]) measures channel workers against provider fakes.
//!
//! `herald bench conns` ([`conns`]) holds many idle WebSocket connections on a gateway
//! child process and measures its memory per connection, a broadcast, a reconnect storm
//! and a slow consumer. With `--gateways`/`--client-procs` (`scale`) it spreads N
//! connections over several gateway and client processes (`conns_client`), since one process
//! may hold only 20,000 open files.
//!
//! `herald bench fanout` ([`fanout`]) publishes once to a topic with a million
//! subscribers, thousands of them online on a gateway child process.
//!
//! `herald bench policy` ([`policy`]) measures what preferences, rate caps and templates
//! cost on the whole path, beside the raw JetStream ceiling.

mod ceilings;
mod conns;
mod conns_client;
mod fanout;
mod fleet;
pub mod jobs;
mod lanes;
mod load;
mod natsws;
mod policy;
mod scale;
pub mod workers;

pub use conns::ConnsArgs;
pub use conns_client::ConnsClientArgs;
pub use fanout::FanoutArgs;
pub use lanes::LanesArgs;
pub use policy::PolicyArgs;

use crate::mesh::{Mesh, MeshOptions, Roles};
use async_nats::jetstream::{self, stream};
use clap::{Args, Subcommand};
use futures::{SinkExt as _, StreamExt as _};
use hdrhistogram::Histogram;
use herald_auth::{ApiKey, ApiKeys, JwtConfig, Scope, UserAuth};
use herald_protocol::streams::StreamSettings;
use herald_protocol::{Subjects, UserId};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

/// `herald bench`.
#[derive(Debug, Clone, Args)]
pub struct BenchArgs {
    /// Which benchmark.
    #[command(subcommand)]
    pub which: Which,
}

/// Benchmarks.
#[derive(Debug, Clone, Subcommand)]
pub enum Which {
    /// Notify throughput (native, HTTP) and notify→frame latency, with raw NATS ceilings.
    Notify(NotifyArgs),
    /// Idle WebSocket connections on one gateway process: memory per connection, connect
    /// rate, broadcast delivery, a reconnect storm and a slow consumer.
    Conns(ConnsArgs),
    /// `high` while a blast of `low` is queued: a high notification's time to its
    /// WebSocket frame and to the APNs fake, beside the backlog it overtook.
    Lanes(LanesArgs),
    /// Channel jobs per second through one worker process against provider fakes, with
    /// the raw pull-consumer ceiling.
    Workers(workers::WorkersArgs),
    /// A client process of the multi-process `conns` run (started by it).
    #[command(hide = true)]
    ConnsWorker(ConnsClientArgs),
    /// One publish to a topic with a million subscribers, thousands online over
    /// WebSocket: latency to the last online frame, durable writes, push jobs, NATS RSS,
    /// beside raw core NATS fan-out to the same number of clients.
    Fanout(FanoutArgs),
    /// Notifications per second through accept → route → push jobs with no preferences
    /// stored vs preferences, a rate cap and a template for every user, beside the raw
    /// JetStream publish ceiling.
    Policy(PolicyArgs),
}

/// `herald bench notify`.
#[derive(Debug, Clone, Args)]
pub struct NotifyArgs {
    /// Use this nats-server instead of starting one.
    #[arg(long)]
    pub nats_url: Option<String>,
    /// Messages per throughput phase.
    #[arg(long, default_value_t = 100_000)]
    pub count: u64,
    /// Concurrent HTTP requests in the HTTP phase.
    #[arg(long, default_value_t = 64)]
    pub http_concurrency: usize,
    /// Notifications per second in the latency phase.
    #[arg(long, default_value_t = 2_000)]
    pub rate: u64,
    /// Seconds of the latency phase.
    #[arg(long, default_value_t = 10)]
    pub seconds: u64,
    /// Connected WebSocket users in the latency phase.
    #[arg(long, default_value_t = 200)]
    pub users: usize,
    /// INBOX partitions (router consumers).
    #[arg(long, default_value_t = 16)]
    pub partitions: u16,
    /// Run Herald without the router, to see what routing costs.
    #[arg(long)]
    pub no_router: bool,
}

/// A benchmark failure.
pub type BenchError = Box<dyn std::error::Error + Send + Sync>;

/// Runs the chosen benchmark and prints a report.
///
/// # Errors
/// When NATS or Herald cannot be started.
pub async fn run(args: BenchArgs) -> Result<(), BenchError> {
    match args.which {
        Which::Notify(a) => notify(a).await,
        Which::Conns(a) => conns::run(a).await,
        Which::Lanes(a) => lanes::run(a).await,
        Which::Workers(a) => workers::run(a).await,
        Which::ConnsWorker(a) => conns_client::run(a).await,
        Which::Fanout(a) => fanout::run(a).await,
        Which::Policy(a) => policy::run(a).await,
    }
}

/// What an in-process bench mesh authenticates with: one producer key with every scope,
/// and the HS256 secret ([`conns::SECRET`]) user tokens are minted and checked with.
struct BenchAuth {
    api_key: String,
    keys: ApiKeys,
    jwt: JwtConfig,
    users: UserAuth,
}

impl BenchAuth {
    fn new() -> Result<Self, BenchError> {
        let api_key = herald_auth::api_keys::generate();
        let mut keys = ApiKeys::new();
        keys.insert(
            &api_key,
            ApiKey {
                producer: "bench".into(),
                scopes: Scope::ALL.to_vec(),
            },
        );
        let jwt = JwtConfig {
            hs256_secret: Some(conns::SECRET.as_bytes().to_vec()),
            ..Default::default()
        };
        let users = UserAuth::new(&jwt)?;
        Ok(Self {
            api_key,
            keys,
            jwt,
            users,
        })
    }

    /// Options for an in-process mesh on `nats_url` with every role but the gateway
    /// (the benches run gateways as child processes), authenticating with these keys.
    fn mesh_without_gateway(
        &self,
        nats_url: String,
        name: &str,
        subjects: Subjects,
    ) -> MeshOptions {
        MeshOptions {
            nats_url,
            nats: Default::default(),
            name: name.into(),
            subjects,
            streams: StreamSettings::default(),
            provision: true,
            api_keys: self.keys.clone(),
            jwt: self.jwt.clone(),
            jwks: None,
            api: Default::default(),
            gateway: Default::default(),
            roles: Roles {
                gateway: false,
                ..Roles::ALL
            },
            dev_mode: false,
            policy: Default::default(),
            templates: Default::default(),
            rates: Default::default(),
            topics: Default::default(),
            channels: crate::channels::ChannelSettings::new([0x42; 32]),
        }
    }
}

const BODY_TEXT: &str =
    "Jane liked your photo. Tap to see it and 3 other new reactions from people you follow.";

async fn notify(args: NotifyArgs) -> Result<(), BenchError> {
    let tmp = tempfile::tempdir()?;
    let mut own_server = None;
    let url = match &args.nats_url {
        Some(u) => u.clone(),
        None => {
            let s = herald_natsd::NatsServer::start(herald_natsd::NatsServerOptions::dev(
                tmp.path().join("nats"),
            ))
            .await?;
            let u = s.client_url();
            own_server = Some(s);
            u
        }
    };
    eprintln!(
        "bench: nats-server at {url}; {} messages per phase",
        args.count
    );
    let payload = sample_payload("u-00001");
    let raw_js = raw_jetstream(&url, args.count, payload.len()).await?;
    let raw_core = raw_core(&url, args.count, payload.len()).await?;
    let raw_ack = raw_ack_latency(&url, args.rate, args.seconds, payload.len()).await?;
    eprintln!("bench: raw ceilings measured; starting Herald");

    let BenchAuth {
        api_key,
        keys,
        jwt,
        users: users_auth,
    } = BenchAuth::new()?;
    let options = MeshOptions {
        nats_url: url.clone(),
        nats: Default::default(),
        name: "herald-bench".into(),
        subjects: Subjects::new("hbench", args.partitions)?,
        streams: StreamSettings::default(),
        provision: true,
        api_keys: keys,
        jwt,
        jwks: None,
        api: Default::default(),
        gateway: Default::default(),
        roles: Roles {
            router: !args.no_router,
            ..Roles::ALL
        },
        dev_mode: false,
        channels: crate::channels::ChannelSettings::new([0x42; 32]),
        policy: Default::default(),
        templates: Default::default(),
        rates: Default::default(),
        topics: Default::default(),
    };
    let (server, mesh) = mesh_apart(options, 2, "herald-server").await?;
    let base = format!("http://{}", mesh.addr());
    let native = native_throughput(&url, "hbench.notify", args.count).await?;
    let http = http_throughput(&base, &api_key, args.count, args.http_concurrency).await?;
    // The transports alone, same clients, same runtime: what no per-notification work
    // could exceed on this machine.
    let responder = ceilings::responder(&server, &url).await?;
    let native_ceiling = native_throughput(&url, &responder.target, args.count).await?;
    drop(responder);
    let http_server = ceilings::http(&server).await?;
    let http_ceiling = http_throughput(
        &http_server.target,
        &api_key,
        args.count,
        args.http_concurrency,
    )
    .await?;
    drop(http_server);
    let batch = batch_throughput(&base, &api_key, args.count).await?;
    let (latency, accept_latency) = latency(&base, &api_key, &users_auth, &args).await?;
    server.spawn(mesh.shutdown()).await??;
    drop(server);
    drop(own_server);

    let ratio = |x: f64| 100.0 * x / raw_js;
    println!(
        "\n## herald bench notify ({} msgs/phase, payload {} B)\n",
        args.count,
        payload.len()
    );
    println!("| measure | result | vs raw JetStream publish + Nats-Msg-Id |");
    println!("|---|---|---|");
    println!("| raw JetStream async publish, Nats-Msg-Id, R1 file | {raw_js:.0} msgs/s | 100% |");
    println!("| raw core NATS pub/sub, separate connections | {raw_core:.0} msgs/s | — |");
    println!(
        "| Herald native path (`herald.notify`, acked) | {native:.0} notifications/s | {:.0}% |",
        ratio(native)
    );
    println!(
        "| ceiling: core request/reply to a do-nothing responder, same client | {native_ceiling:.0} msgs/s | {:.0}% |",
        ratio(native_ceiling)
    );
    println!(
        "| Herald HTTP `POST /v1/notify` ({} concurrent) | {http:.0} notifications/s | {:.0}% |",
        args.http_concurrency,
        ratio(http)
    );
    println!(
        "| ceiling: HTTP/1.1 POST to a do-nothing axum handler, same client | {http_ceiling:.0} requests/s | {:.0}% |",
        ratio(http_ceiling)
    );
    println!(
        "| Herald HTTP `POST /v1/notify/batch` ({BATCH} per request, {BATCH_CONCURRENCY} concurrent) | {batch:.0} notifications/s | {:.0}% |",
        ratio(batch)
    );
    println!(
        "| notify→frame latency at {}/s to {} WebSocket users ({} samples) | p50 {:.2} ms, p99 {:.2} ms, p999 {:.2} ms, max {:.2} ms | — |",
        args.rate,
        args.users,
        latency.len(),
        ms(latency.value_at_quantile(0.5)),
        ms(latency.value_at_quantile(0.99)),
        ms(latency.value_at_quantile(0.999)),
        ms(latency.max())
    );
    println!(
        "| raw JetStream publish→ack at {}/s (ceiling of notify→202) | p50 {:.2} ms, p99 {:.2} ms, p999 {:.2} ms, max {:.2} ms | — |",
        args.rate,
        ms(raw_ack.value_at_quantile(0.5)),
        ms(raw_ack.value_at_quantile(0.99)),
        ms(raw_ack.value_at_quantile(0.999)),
        ms(raw_ack.max())
    );
    println!(
        "| notify→202 in the same phase | p50 {:.2} ms, p99 {:.2} ms, p999 {:.2} ms, max {:.2} ms | — |",
        ms(accept_latency.value_at_quantile(0.5)),
        ms(accept_latency.value_at_quantile(0.99)),
        ms(accept_latency.value_at_quantile(0.999)),
        ms(accept_latency.max())
    );
    Ok(())
}

/// Herald's own runtime inside a benchmark. Dropped from async code — on a benchmark's
/// error path, say — it shuts down in the background, instead of panicking (as dropping a
/// tokio runtime there does) and hiding the error the benchmark was returning.
pub(super) struct Apart(Option<tokio::runtime::Runtime>);

impl Apart {
    /// Spawns `future` on Herald's runtime.
    pub(super) fn spawn<F>(&self, future: F) -> tokio::task::JoinHandle<F::Output>
    where
        F: std::future::Future + Send + 'static,
        F::Output: Send + 'static,
    {
        match &self.0 {
            Some(runtime) => runtime.spawn(future),
            // Only `Drop` takes the runtime.
            None => tokio::spawn(future),
        }
    }
}

impl Drop for Apart {
    fn drop(&mut self) {
        if let Some(runtime) = self.0.take() {
            runtime.shutdown_background();
        }
    }
}

/// Starts Herald on 127.0.0.1:0 on a runtime of its own, as in its own process: the
/// benchmark's clients must not queue in front of the server's tasks on the same workers.
/// The runtime must outlive the mesh.
async fn mesh_apart(
    options: MeshOptions,
    workers: usize,
    name: &str,
) -> Result<(Apart, Mesh), BenchError> {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(workers)
        .thread_name(name)
        .enable_all()
        .build()?;
    let listener = std::net::TcpListener::bind("127.0.0.1:0")?;
    listener.set_nonblocking(true)?;
    let mesh = runtime
        .spawn(async move {
            let listener = tokio::net::TcpListener::from_std(listener)?;
            Mesh::start(options, listener)
                .await
                .map_err(BenchError::from)
        })
        .await??;
    Ok((Apart(Some(runtime)), mesh))
}

/// A histogram of microseconds (1 µs to 60 s) that many tasks record into.
fn shared_histogram() -> Result<Arc<std::sync::Mutex<Histogram<u64>>>, BenchError> {
    Ok(Arc::new(std::sync::Mutex::new(Histogram::new_with_bounds(
        1, 60_000_000, 3,
    )?)))
}

fn ms(us: u64) -> f64 {
    us as f64 / 1000.0
}

fn sample_payload(user: &str) -> Vec<u8> {
    serde_json::to_vec(&serde_json::json!({
        "user_id": user, "category": "like", "title": "New like", "body": BODY_TEXT,
        "data": {"photo": "p-9"}
    }))
    .unwrap_or_default()
}

fn rate(count: u64, elapsed: Duration) -> f64 {
    count as f64 / elapsed.as_secs_f64()
}

/// JetStream async publish with Nats-Msg-Id, 4,096 in flight, into a stream of many
/// subjects (like the inbox).
async fn raw_jetstream(url: &str, count: u64, size: usize) -> Result<f64, BenchError> {
    let client = async_nats::connect(url).await?;
    let js = jetstream::ContextBuilder::new()
        .max_ack_inflight(4096)
        .build(client);
    let _ = js.delete_stream("RAWBENCH").await;
    js.create_stream(stream::Config {
        name: "RAWBENCH".into(),
        subjects: vec!["rawbench.>".into()],
        duplicate_window: Duration::from_secs(120),
        ..Default::default()
    })
    .await?;
    let body = bytes::Bytes::from(vec![b'x'; size]);
    let (tx, mut rx) = tokio::sync::mpsc::channel(4096);
    let waiter = tokio::spawn(async move {
        while let Some(ack) = rx.recv().await {
            let ack: jetstream::context::PublishAckFuture = ack;
            ack.await?;
        }
        Ok::<_, BenchError>(())
    });
    let start = Instant::now();
    for i in 0..count {
        let publish = jetstream::message::PublishMessage::build()
            .payload(body.clone())
            .message_id(format!("raw-{i}"));
        let ack = js
            .send_publish(format!("rawbench.{}", i % 10_000), publish)
            .await?;
        tx.send(ack).await?;
    }
    drop(tx);
    waiter.await??;
    let r = rate(count, start.elapsed());
    js.delete_stream("RAWBENCH").await?;
    Ok(r)
}

/// Publish→ack latency of raw JetStream at the latency phase's rate, one ack awaited per
/// message, into a stream of many subjects.
async fn raw_ack_latency(
    url: &str,
    rate: u64,
    seconds: u64,
    size: usize,
) -> Result<Histogram<u64>, BenchError> {
    let js = jetstream::new(async_nats::connect(url).await?);
    let _ = js.delete_stream("RAWLAT").await;
    js.create_stream(stream::Config {
        name: "RAWLAT".into(),
        subjects: vec!["rawlat.>".into()],
        ..Default::default()
    })
    .await?;
    let hist = shared_histogram()?;
    let body = bytes::Bytes::from(vec![b'x'; size]);
    let mut ticker = tokio::time::interval(Duration::from_secs_f64(1.0 / rate as f64));
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Burst);
    let mut acks = tokio::task::JoinSet::new();
    for i in 0..rate * seconds {
        ticker.tick().await;
        let (js, body, hist) = (js.clone(), body.clone(), hist.clone());
        acks.spawn(async move {
            let sent = Instant::now();
            let publish = jetstream::message::PublishMessage::build()
                .payload(body)
                .message_id(format!("lat-{i}"));
            if let Ok(ack) = js
                .send_publish(format!("rawlat.{}", i % 200), publish)
                .await
                && ack.await.is_ok()
                && let Ok(mut h) = hist.lock()
            {
                let _ = h.record((sent.elapsed().as_micros() as u64).max(1));
            }
        });
        while acks.try_join_next().is_some() {}
    }
    while acks.join_next().await.is_some() {}
    js.delete_stream("RAWLAT").await?;
    let h = hist.lock().map_err(|_| "histogram poisoned")?.clone();
    Ok(h)
}

/// Core publish → subscribe across two connections.
async fn raw_core(url: &str, count: u64, size: usize) -> Result<f64, BenchError> {
    let sub_client = async_nats::ConnectOptions::new()
        .subscription_capacity(1 << 20)
        .connect(url)
        .await?;
    let pub_client = async_nats::connect(url).await?;
    let mut sub = sub_client.subscribe("rawcore.bench").await?;
    sub_client.flush().await?;
    let body = bytes::Bytes::from(vec![b'x'; size]);
    let start = Instant::now();
    let publisher = tokio::spawn(async move {
        for _ in 0..count {
            pub_client.publish("rawcore.bench", body.clone()).await?;
        }
        pub_client.flush().await?;
        Ok::<_, BenchError>(())
    });
    let mut got = 0;
    while got < count {
        match tokio::time::timeout(Duration::from_secs(5), sub.next()).await {
            Ok(Some(_)) => got += 1,
            _ => break, // slow consumer drops count against the rate
        }
    }
    publisher.await??;
    Ok(rate(got, start.elapsed()))
}

/// Native path: what a producer does — a JetStream client publishing on `subject`
/// (`hbench.notify`) with `Nats-Msg-Id`, 4,096 acks in flight.
async fn native_throughput(url: &str, subject: &str, count: u64) -> Result<f64, BenchError> {
    let client = async_nats::connect(url).await?;
    let js = jetstream::ContextBuilder::new()
        .max_ack_inflight(4096)
        .timeout(Duration::from_secs(10))
        .build(client);
    let (tx, mut rx) = tokio::sync::mpsc::channel::<jetstream::context::PublishAckFuture>(4096);
    let waiter = tokio::spawn(async move {
        let mut failed = 0u64;
        while let Some(ack) = rx.recv().await {
            if ack.await.is_err() {
                failed += 1;
            }
        }
        failed
    });
    let start = Instant::now();
    for i in 0..count {
        let publish = jetstream::message::PublishMessage::build()
            .payload(sample_payload(&format!("u-{:05}", i % 10_000)).into())
            .message_id(format!("native-{i}"));
        tx.send(js.send_publish(subject.to_owned(), publish).await?)
            .await?;
    }
    drop(tx);
    let failed = waiter.await?;
    if failed > 0 {
        eprintln!("bench: native path: {failed} publishes not acked");
    }
    Ok(rate(count - failed, start.elapsed()))
}

/// HTTP path: `concurrency` keep-alive connections posting notifications.
async fn http_throughput(
    base: &str,
    key: &str,
    count: u64,
    concurrency: usize,
) -> Result<f64, BenchError> {
    let client = reqwest::Client::builder()
        .pool_max_idle_per_host(concurrency)
        .build()?;
    let next = Arc::new(AtomicU64::new(0));
    let failures = Arc::new(AtomicU64::new(0));
    let start = Instant::now();
    let mut tasks = tokio::task::JoinSet::new();
    for _ in 0..concurrency {
        let (client, next, failures) = (client.clone(), next.clone(), failures.clone());
        let url = format!("{base}/v1/notify");
        let auth = format!("Bearer {key}");
        tasks.spawn(async move {
            loop {
                let i = next.fetch_add(1, Ordering::Relaxed);
                if i >= count {
                    break;
                }
                let body = sample_payload(&format!("u-{:05}", i % 10_000));
                let ok = client
                    .post(&url)
                    .header("authorization", &auth)
                    .header("content-type", "application/json")
                    .body(body)
                    .send()
                    .await
                    .is_ok_and(|r| r.status() == reqwest::StatusCode::ACCEPTED);
                if !ok {
                    failures.fetch_add(1, Ordering::Relaxed);
                }
            }
        });
    }
    while tasks.join_next().await.is_some() {}
    let failed = failures.load(Ordering::Relaxed);
    if failed > 0 {
        eprintln!("bench: http path: {failed} requests not accepted");
    }
    Ok(rate(count - failed, start.elapsed()))
}

const BATCH: u64 = 100;
const BATCH_CONCURRENCY: usize = 8;

/// HTTP batch path: `BATCH_CONCURRENCY` clients posting `BATCH` notifications per request.
async fn batch_throughput(base: &str, key: &str, count: u64) -> Result<f64, BenchError> {
    let client = reqwest::Client::new();
    let next = Arc::new(AtomicU64::new(0));
    let accepted = Arc::new(AtomicU64::new(0));
    let start = Instant::now();
    let mut tasks = tokio::task::JoinSet::new();
    for _ in 0..BATCH_CONCURRENCY {
        let (client, next, accepted) = (client.clone(), next.clone(), accepted.clone());
        let url = format!("{base}/v1/notify/batch");
        let auth = format!("Bearer {key}");
        tasks.spawn(async move {
            loop {
                let first = next.fetch_add(BATCH, Ordering::Relaxed);
                if first >= count {
                    break;
                }
                let items: Vec<serde_json::Value> = (first..(first + BATCH).min(count))
                    .map(|i| {
                        serde_json::from_slice(&sample_payload(&format!("u-{:05}", i % 10_000)))
                            .unwrap_or_default()
                    })
                    .collect();
                let body = serde_json::json!({ "notifications": items });
                let Ok(resp) = client
                    .post(&url)
                    .header("authorization", &auth)
                    .json(&body)
                    .send()
                    .await
                else {
                    continue;
                };
                if let Ok(v) = resp.json::<serde_json::Value>().await {
                    accepted.fetch_add(v["accepted"].as_u64().unwrap_or(0), Ordering::Relaxed);
                }
            }
        });
    }
    while tasks.join_next().await.is_some() {}
    let done = accepted.load(Ordering::Relaxed);
    if done < count {
        eprintln!(
            "bench: batch path: {} notifications not accepted",
            count - done
        );
    }
    Ok(rate(done, start.elapsed()))
}

/// Fixed-rate notifications over HTTP to connected WebSocket users; each carries its send
/// time, each client records arrival − send in microseconds.
async fn latency(
    base: &str,
    key: &str,
    auth: &UserAuth,
    args: &NotifyArgs,
) -> Result<(Histogram<u64>, Histogram<u64>), BenchError> {
    let epoch = Instant::now();
    let hist = shared_histogram()?;
    let total = args.rate * args.seconds;
    let received = Arc::new(AtomicU64::new(0));
    let ws_base = base.replacen("http://", "ws://", 1);
    let mut clients = tokio::task::JoinSet::new();
    for u in 0..args.users {
        let user = UserId::new(format!("lat-{u}"))?;
        let token = auth.mint(&user, 3600)?;
        let (mut ws, _) =
            tokio_tungstenite::connect_async(format!("{ws_base}/v1/ws?access_token={token}"))
                .await?;
        // Wait for hello so the subscription exists before sending.
        let _ = ws.next().await;
        let (hist, received) = (hist.clone(), received.clone());
        clients.spawn(async move {
            while let Some(Ok(msg)) = ws.next().await {
                if let tokio_tungstenite::tungstenite::Message::Text(t) = msg {
                    let now = epoch.elapsed().as_micros() as u64;
                    let Ok(v) = serde_json::from_str::<serde_json::Value>(&t) else {
                        continue;
                    };
                    // A `notification` frame, or each item of a coalesced `batch` frame.
                    let items = match v["items"].as_array() {
                        Some(items) => items.clone(),
                        None => vec![v],
                    };
                    for item in items {
                        if let Some(sent) = item["data"]["sent_us"].as_u64() {
                            if let Ok(mut h) = hist.lock() {
                                let _ = h.record(now.saturating_sub(sent).max(1));
                            }
                            received.fetch_add(1, Ordering::Relaxed);
                        }
                    }
                } else if let tokio_tungstenite::tungstenite::Message::Ping(p) = msg {
                    let _ = ws
                        .send(tokio_tungstenite::tungstenite::Message::Pong(p))
                        .await;
                }
            }
        });
    }
    let client = reqwest::Client::new();
    // Time to the 202, to tell a slow write from a slow live path.
    let accept_hist = shared_histogram()?;
    let interval = Duration::from_secs_f64(1.0 / args.rate as f64);
    let mut ticker = tokio::time::interval(interval);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Burst);
    let mut sends = tokio::task::JoinSet::new();
    for i in 0..total {
        ticker.tick().await;
        let body = serde_json::json!({
            "user_id": format!("lat-{}", i as usize % args.users), "title": "latency",
            "body": BODY_TEXT, "data": {"sent_us": epoch.elapsed().as_micros() as u64}
        });
        let req = client
            .post(format!("{base}/v1/notify"))
            .bearer_auth(key)
            .json(&body);
        let accept_hist = accept_hist.clone();
        sends.spawn(async move {
            let sent = Instant::now();
            let ok = req.send().await.is_ok_and(|r| r.status().as_u16() == 202);
            if let Ok(mut h) = accept_hist.lock() {
                let _ = h.record((sent.elapsed().as_micros() as u64).max(1));
            }
            ok
        });
        while sends.try_join_next().is_some() {}
    }
    while sends.join_next().await.is_some() {}
    let deadline = Instant::now() + Duration::from_secs(10);
    while received.load(Ordering::Relaxed) < total && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let got = received.load(Ordering::Relaxed);
    if got < total {
        eprintln!("bench: latency phase: {got} of {total} frames arrived");
    }
    clients.abort_all();
    let h = hist.lock().map_err(|_| "histogram poisoned")?.clone();
    let a = accept_hist
        .lock()
        .map_err(|_| "histogram poisoned")?
        .clone();
    Ok((h, a))
}
