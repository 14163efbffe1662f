//! `herald bench workers`: channel jobs per second through ONE `herald worker` process
//! (a child of this one, the real binary) against local provider fakes that speak each
//! provider's wire protocol — APNs over HTTP/2 with TLS, FCM v1 with its OAuth endpoint,
//! Twilio's `Messages.json`, a signed-webhook receiver — answering at once or after a set
//! latency. Beside it, from the same run and server, the raw ceiling: a plain JetStream
//! pull consumer draining as many messages (batched fetches, explicit acks) with no
//! provider and no per-job state.
//!
//! The fakes (`herald-fakes`) are built into the `herald` binary for this:
//! `cargo run --release -p herald -- bench workers`.
//!
//! Jobs are loaded with [`super::jobs::enqueue`] before the worker starts; the clock runs
//! from the fake's first request to the moment the work queue is empty (every job acked),
//! so worker start-up is not counted and unacked work is.

use super::BenchError;
use super::jobs::{JobLoad, enqueue};
use async_nats::jetstream::{consumer, stream};
use clap::Args;
use futures::StreamExt as _;
use herald_channels::{Platform, Target};
use herald_fakes::apns::ApnsFake;
use herald_fakes::fcm::FcmFake;
use herald_fakes::script::Script;
use herald_fakes::twilio::TwilioFake;
use herald_fakes::webhook::WebhookReceiver;
use herald_protocol::streams::{StreamSettings, work_stream_name};
use herald_protocol::{Channel, Priority, Subjects, UserId};
use herald_store::targets::{Contact, ContactKeys, target_id};
use herald_store::{Nats, Targets};
use std::path::Path;
use std::process::Stdio;
use std::time::{Duration, Instant};

/// `herald bench workers`.
#[derive(Debug, Clone, Args)]
pub struct WorkersArgs {
    /// Use this nats-server instead of starting one.
    #[arg(long)]
    pub nats_url: Option<String>,
    /// Jobs per measurement.
    #[arg(long, default_value_t = 20_000)]
    pub jobs: usize,
    /// `--concurrency` of the worker process (jobs in flight per lane).
    #[arg(long, default_value_t = 1_024)]
    pub concurrency: usize,
    /// Provider answer latencies to measure, in milliseconds.
    #[arg(long, value_delimiter = ',', default_value = "0,50")]
    pub latency_ms: Vec<u64>,
    /// Providers to measure: apns, fcm, twilio, webhook.
    #[arg(long, value_delimiter = ',', default_value = "apns,fcm,twilio,webhook")]
    pub providers: Vec<String>,
    /// Recipients the jobs go to in turn, each with an iOS and an Android device, a phone
    /// and a webhook. Real queues hold jobs for many users, so a pulled batch names as
    /// many users as jobs (at least jobs / 10,000: the inbox keeps 10,000 per user).
    #[arg(long, default_value_t = 10_000)]
    pub users: usize,
    /// Run the worker from this `herald` binary instead of this one, to compare two
    /// builds' workers under the same load (`--worker-bin /tmp/herald-before`).
    #[arg(long)]
    pub worker_bin: Option<std::path::PathBuf>,
}

impl WorkersArgs {
    /// Users the jobs go to: `--users`, or more when the inbox could not hold the jobs.
    fn recipients(&self) -> usize {
        self.users.max(self.jobs.div_ceil(PER_USER))
    }
}

const TOPIC: &str = "com.herald.bench";
const WEBHOOK_SECRET: &str = "herald-bench-webhook-secret";
const CONTACT_KEY: [u8; 32] = [42; 32];
const JWT_SECRET: &str = "herald-bench-workers-jwt-secret-0123456789";
const API_KEY: &str = "hk_bench_workers_0123456789abcdef";
const APNS_TOKEN: &str = "00fc13adff785122b4ad28809a3420982341241421348097878e577c991de8f0";
const FCM_TOKEN: &str = "bench-android-registration-token";
const PHONE: &str = "+4915112345678";
/// Jobs one user may get (the inbox keeps 10,000 per user).
const PER_USER: usize = 5_000;
/// Users registered at once.
const REGISTERING: usize = 256;
/// How long one measurement may take before the bench gives up on it.
const DEADLINE: Duration = Duration::from_secs(600);

/// The fakes, and what the worker process needs to reach them.
struct Fakes {
    apns: ApnsFake,
    fcm: FcmFake,
    twilio: TwilioFake,
    webhook: WebhookReceiver,
    env: Vec<(String, String)>,
    hook_url: String,
}

impl Fakes {
    async fn start(dir: &Path) -> Result<Self, BenchError> {
        let apns = ApnsFake::start(TOPIC).await?;
        let fcm = FcmFake::start().await?;
        let twilio = TwilioFake::start().await?;
        let webhook = WebhookReceiver::start(WEBHOOK_SECRET).await?;
        // The bench reads only how many requests each fake answered.
        apns.count_only();
        fcm.count_only();
        twilio.count_only();
        webhook.count_only();
        let write = |name: &str, content: &str| -> Result<String, BenchError> {
            let path = dir.join(name);
            std::fs::write(&path, content)?;
            Ok(path.to_string_lossy().into_owned())
        };
        let env = vec![
            ("HERALD_APNS_URL", apns.url()),
            ("HERALD_APNS_KEY_FILE", write("AuthKey.p8", apns.p8_pem())?),
            ("HERALD_APNS_KEY_ID", apns.key_id().to_string()),
            ("HERALD_APNS_TEAM_ID", apns.team_id().to_string()),
            ("HERALD_APNS_TOPIC", TOPIC.to_string()),
            ("HERALD_PROVIDER_CA_FILE", write("ca.pem", apns.ca_pem())?),
            ("HERALD_FCM_URL", fcm.url()),
            (
                "HERALD_FCM_CREDENTIALS",
                write("firebase.json", &fcm.service_account_json())?,
            ),
            ("HERALD_TWILIO_URL", twilio.url()),
            (
                "HERALD_TWILIO_ACCOUNT_SID",
                twilio.account_sid().to_string(),
            ),
            ("HERALD_TWILIO_AUTH_TOKEN", twilio.auth_token().to_string()),
            ("HERALD_TWILIO_FROM", "+15005550006".to_string()),
            ("HERALD_WEBHOOK_SECRET", WEBHOOK_SECRET.to_string()),
            ("HERALD_CONTACT_KEY", hex::encode(CONTACT_KEY)),
            ("HERALD_ESCALATION_DELAY_MS", "0".to_string()),
            ("HERALD_LOG", "warn".to_string()),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_string(), v))
        .collect();
        let hook_url = webhook.url("/bench");
        Ok(Self {
            apns,
            fcm,
            twilio,
            webhook,
            env,
            hook_url,
        })
    }

    /// The channel, target and fake of one provider.
    fn of(&self, provider: &str) -> Result<(Channel, Target, &Script, Counter<'_>), BenchError> {
        Ok(match provider {
            "apns" => (
                Channel::Push,
                Target::Device {
                    platform: Platform::Ios,
                    token: APNS_TOKEN.into(),
                },
                self.apns.script(),
                Counter::Apns(&self.apns),
            ),
            "fcm" => (
                Channel::Push,
                Target::Device {
                    platform: Platform::Android,
                    token: FCM_TOKEN.into(),
                },
                self.fcm.script(),
                Counter::Fcm(&self.fcm),
            ),
            "twilio" => (
                Channel::Sms,
                Target::Phone { e164: PHONE.into() },
                self.twilio.script(),
                Counter::Twilio(&self.twilio),
            ),
            "webhook" => (
                Channel::Webhook,
                Target::Webhook {
                    url: self.hook_url.clone(),
                },
                self.webhook.script(),
                Counter::Webhook(&self.webhook),
            ),
            other => return Err(format!("unknown provider {other:?}").into()),
        })
    }
}

/// Reads how many requests a fake has received.
enum Counter<'a> {
    Apns(&'a ApnsFake),
    Fcm(&'a FcmFake),
    Twilio(&'a TwilioFake),
    Webhook(&'a WebhookReceiver),
}

impl Counter<'_> {
    fn count(&self) -> usize {
        match self {
            Self::Apns(f) => f.received_count(),
            Self::Fcm(f) => f.received_count(),
            Self::Twilio(f) => f.received_count(),
            Self::Webhook(f) => f.received_count(),
        }
    }
}

/// One measured row.
struct Row {
    provider: String,
    channel: Channel,
    latency_ms: u64,
    jobs: usize,
    seconds: f64,
    received: usize,
}

/// Runs the benchmark and prints the table.
///
/// # Errors
/// When NATS, the fakes or the worker process cannot be started, or a measurement does
/// not finish.
pub async fn run(args: WorkersArgs) -> Result<(), BenchError> {
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
        "bench workers: nats-server at {url}; {} jobs per measurement, worker --concurrency {}",
        args.jobs, args.concurrency
    );
    let nats = herald_store::connect(&url, "herald-bench-workers").await?;
    let subjects = Subjects::default();
    herald_store::provision(&nats.js_consume, &subjects, &StreamSettings::default()).await?;

    let raw = raw_pull_ceiling(&nats, args.jobs).await?;
    eprintln!("bench workers: raw pull-consumer ceiling {raw:.0} msgs/s");

    let fakes = Fakes::start(tmp.path()).await?;
    let users = register_targets(&nats, &fakes, args.recipients()).await?;
    let mut rows = Vec::new();
    for provider in &args.providers {
        for &latency_ms in &args.latency_ms {
            let row = measure(
                &url, &nats, &subjects, &fakes, &users, &args, provider, latency_ms,
            )
            .await?;
            eprintln!(
                "bench workers: {provider} at {latency_ms} ms: {:.0} jobs/s",
                row.jobs as f64 / row.seconds
            );
            rows.push(row);
        }
    }
    print_table(&args, raw, &rows);
    nats.close().await;
    drop(own_server);
    Ok(())
}

/// Registers a device of each platform, a phone and a webhook for `count` users.
async fn register_targets(
    nats: &Nats,
    fakes: &Fakes,
    count: usize,
) -> Result<Vec<UserId>, BenchError> {
    let targets = Targets::open(&nats.js, ContactKeys::new(CONTACT_KEY, &[])).await?;
    let contact = Contact {
        phone: Some(PHONE.into()),
        webhook: Some(fakes.hook_url.clone()),
        ..Contact::default()
    };
    eprintln!("bench workers: registering the targets of {count} users");
    let (targets, contact) = (&targets, &contact);
    futures::stream::iter(0..count)
        .map(|i| async move {
            let user = UserId::new(format!("bench-worker-{i}"))?;
            targets.add_device(&user, Platform::Ios, APNS_TOKEN).await?;
            targets
                .add_device(&user, Platform::Android, FCM_TOKEN)
                .await?;
            targets.put_contact(&user, contact).await?;
            Ok::<_, BenchError>(user)
        })
        .buffered(REGISTERING)
        .collect::<Vec<_>>()
        .await
        .into_iter()
        .collect()
}

#[allow(clippy::too_many_arguments)]
async fn measure(
    url: &str,
    nats: &Nats,
    subjects: &Subjects,
    fakes: &Fakes,
    users: &[UserId],
    args: &WorkersArgs,
    provider: &str,
    latency_ms: u64,
) -> Result<Row, BenchError> {
    let (channel, target, script, counter) = fakes.of(provider)?;
    script.set_latency(Duration::from_millis(latency_ms));
    let load = JobLoad {
        users: users.to_vec(),
        channel,
        lane: Priority::Normal,
        target: target_id(&target),
        count: args.jobs,
        title: format!("bench {provider}"),
    };
    eprintln!(
        "bench workers: {provider} at {latency_ms} ms: loading {} jobs",
        args.jobs
    );
    enqueue(nats, subjects, &load).await?;
    let before = counter.count();
    let bin = match &args.worker_bin {
        Some(bin) => bin.clone(),
        None => std::env::current_exe()?,
    };
    let mut worker = tokio::process::Command::new(&bin)
        .args(["worker", channel.as_str(), "--nats-url", url])
        .args(["--http-addr", "127.0.0.1:0", "--api-key", API_KEY])
        .args(["--jwt-secret", JWT_SECRET])
        .args(["--concurrency", &args.concurrency.to_string()])
        .envs(fakes.env.iter().map(|(k, v)| (k.as_str(), v.as_str())))
        .stdin(Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .map_err(|e| format!("cannot start the worker {}: {e}", bin.display()))?;
    let work = nats
        .js_consume
        .get_stream(work_stream_name(channel))
        .await?;
    let started = Instant::now();
    let mut tick = tokio::time::interval(Duration::from_millis(5));
    let t0 = loop {
        tick.tick().await;
        if counter.count() > before {
            break Instant::now();
        }
        if let Some(status) = worker.try_wait()? {
            return Err(format!("the worker exited before sending: {status}").into());
        }
        if started.elapsed() > DEADLINE {
            return Err(format!("{provider}: no request within {DEADLINE:?}").into());
        }
    };
    let mut tick = tokio::time::interval(Duration::from_millis(20));
    let mut last_report = Instant::now();
    let t1 = loop {
        tick.tick().await;
        let mut info = work.clone();
        let left = info.info().await?.state.messages;
        if left == 0 {
            break Instant::now();
        }
        if last_report.elapsed() > Duration::from_secs(2) {
            last_report = Instant::now();
            eprintln!(
                "bench workers: {provider}: {} sent, {left} jobs left",
                counter.count() - before
            );
        }
        if started.elapsed() > DEADLINE {
            return Err(format!("{provider}: {left} jobs left after {DEADLINE:?}").into());
        }
    };
    worker.start_kill()?;
    let _ = worker.wait().await;
    let received = counter.count() - before;
    if received < args.jobs {
        return Err(format!(
            "{provider}: the queue drained but the fake received {received} of {} (jobs skipped or dead-lettered; is the target set up?)",
            args.jobs
        )
        .into());
    }
    Ok(Row {
        provider: provider.to_string(),
        channel,
        latency_ms,
        jobs: args.jobs,
        seconds: (t1 - t0).as_secs_f64(),
        received,
    })
}

/// Messages per second a plain pull consumer drains from a work-queue stream: batched
/// fetches, one explicit ack per message, nothing else.
async fn raw_pull_ceiling(nats: &Nats, count: usize) -> Result<f64, BenchError> {
    let js = &nats.js;
    let name = "BENCH_RAW_PULL";
    let _ = js.delete_stream(name).await;
    let stream = js
        .create_stream(stream::Config {
            name: name.into(),
            subjects: vec!["bench.raw.pull".into()],
            retention: stream::RetentionPolicy::WorkQueue,
            ..Default::default()
        })
        .await?;
    // A job-sized payload.
    let payload = bytes::Bytes::from(vec![b'x'; 200]);
    futures::stream::iter(0..count)
        .map(|_| {
            let payload = payload.clone();
            async move {
                js.publish("bench.raw.pull", payload).await?.await?;
                Ok::<(), BenchError>(())
            }
        })
        .buffered(2_048)
        .collect::<Vec<_>>()
        .await
        .into_iter()
        .collect::<Result<Vec<()>, _>>()?;
    let consumer: consumer::PullConsumer = stream
        .create_consumer(consumer::pull::Config {
            durable_name: Some("bench".into()),
            ack_policy: consumer::AckPolicy::Explicit,
            max_ack_pending: 10_000,
            ..Default::default()
        })
        .await?;
    let started = Instant::now();
    let mut drained = 0;
    while drained < count {
        let mut batch = consumer
            .fetch()
            .max_messages(1_000)
            .expires(Duration::from_secs(1))
            .messages()
            .await?;
        while let Some(msg) = batch.next().await {
            msg?.ack().await?;
            drained += 1;
        }
    }
    // Acks are sent without waiting; a flush makes sure they reached the server.
    nats.publish.flush().await?;
    let rate = count as f64 / started.elapsed().as_secs_f64();
    js.delete_stream(name).await?;
    Ok(rate)
}

fn print_table(args: &WorkersArgs, raw: f64, rows: &[Row]) {
    println!();
    println!(
        "herald bench workers — {} jobs per row to {} users, one worker process, --concurrency {}",
        args.jobs,
        args.recipients(),
        args.concurrency
    );
    if let Some(bin) = &args.worker_bin {
        println!("worker binary: {}", bin.display());
    }
    println!(
        "raw JetStream pull consumer (fetch 1,000, explicit ack), same server: {raw:.0} msgs/s"
    );
    println!();
    println!(
        "| provider | channel | provider latency | jobs | seconds | jobs/s | of raw ceiling | goal |"
    );
    println!("|---|---|---|---|---|---|---|---|");
    for r in rows {
        let rate = r.jobs as f64 / r.seconds;
        let goal = if r.latency_ms == 0 {
            20_000.0
        } else {
            10_000.0
        };
        println!(
            "| {} | {} | {} ms | {} | {:.2} | {:.0} | {:.0} % | {} {:.0} |",
            r.provider,
            r.channel.as_str(),
            r.latency_ms,
            r.received,
            r.seconds,
            rate,
            100.0 * rate / raw,
            if rate >= goal { "≥" } else { "<" },
            goal
        );
    }
}
