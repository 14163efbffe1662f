//! `herald bench policy`: what policy costs. The same load runs twice, each time on a
//! fresh nats-server with Herald in-process (api and router, no workers, so the channel
//! jobs stay countable in the push queue):
//!
//! - **bare**: no preferences stored for any user, no categories, no caps, no templates;
//! - **policy**: every user has stored preferences (time zone, locale, quiet hours that
//!   are not on now, a category switch), a rate cap applies to every notification (it is
//!   counted in KV; its limit is not reached, so both runs enqueue the same jobs), and
//!   every notification names a template rendered in the user's locale.
//!
//! Each notification goes through the whole path: `POST /v1/notify/batch` → accept (and
//! render) → one durable inbox write → the router (preferences, quiet hours, the cap,
//! targets, status) → one push job per notification in `HERALD_WORK_PUSH`. The rate is
//! notifications over the time from the first request to the last job enqueued. Before
//! Herald starts, the raw JetStream publish ceiling (async, `Nats-Msg-Id`, 4,096 in
//! flight) of the same nats-server is measured, so the figures read as ratios.

use super::{BenchAuth, BenchError, rate, raw_jetstream};
use clap::Args;
use futures::StreamExt as _;
use herald_protocol::preferences::{CategoryRule, PreferencesPatch, RateCap};
use herald_protocol::{Channel, Policy, Subjects, UserId, streams};
use indicatif::{ProgressBar, ProgressStyle};
use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

/// `herald bench policy`.
#[derive(Debug, Clone, Args)]
pub struct PolicyArgs {
    /// Notifications per run.
    #[arg(long, default_value_t = 30_000)]
    pub count: u64,
    /// Distinct recipients, each with a push device (and, in the policy run, preferences).
    #[arg(long, default_value_t = 5_000)]
    pub users: usize,
    /// Notifications per `POST /v1/notify/batch`.
    #[arg(long, default_value_t = 100)]
    pub batch: u64,
    /// Batch requests in flight.
    #[arg(long, default_value_t = 8)]
    pub concurrency: usize,
    /// INBOX partitions (router consumers).
    #[arg(long, default_value_t = 16)]
    pub partitions: u16,
}

const PREFIX: &str = "hpolicy";
const CATEGORY: &str = "like";
const TEMPLATE: &str = r#"
[default]
title = "{{ actor }} liked your photo"
body = "{{ actor }} and {{ others }} others reacted to {{ photo }}."
push.title = "New like from {{ actor }}"

[de]
title = "{{ actor }} gefällt dein Foto"
push.title = "Neues Like von {{ actor }}"
"#;

/// One run's figures.
struct Outcome {
    raw: f64,
    accepted: f64,
    through: f64,
    jobs: u64,
}

/// Runs both scenarios and prints the report.
///
/// # Errors
/// When NATS or Herald cannot be started, or the jobs do not all arrive.
pub async fn run(args: PolicyArgs) -> Result<(), BenchError> {
    if args.users == 0 || args.count == 0 {
        return Err("--users and --count must be at least 1".into());
    }
    let bare = scenario(&args, false).await?;
    let policy = scenario(&args, true).await?;
    let slowdown = 100.0 * (1.0 - policy.through / bare.through);
    println!(
        "\n## herald bench policy ({} notifications, {} users, batches of {}, {} in flight)\n",
        args.count, args.users, args.batch, args.concurrency
    );
    println!(
        "| run | raw JetStream publish (same server) | accepted (202s) | through to push jobs | push jobs |"
    );
    println!("|---|---|---|---|---|");
    for (name, o) in [
        ("bare: no preferences, caps or templates", &bare),
        (
            "policy: preferences for every user, a cap, a template",
            &policy,
        ),
    ] {
        println!(
            "| {name} | {:.0} msgs/s | {:.0}/s | **{:.0}/s** | {} |",
            o.raw, o.accepted, o.through, o.jobs
        );
    }
    println!("\npolicy slowdown (through to push jobs): {slowdown:.1}% (goal ≤ 15%)");
    Ok(())
}

fn user(i: u64, users: usize) -> String {
    format!("p-{:06}", i % users as u64)
}

async fn scenario(args: &PolicyArgs, with_policy: bool) -> Result<Outcome, BenchError> {
    let label = if with_policy { "policy" } else { "bare" };
    let tmp = tempfile::tempdir()?;
    let nats = herald_natsd::NatsServer::start(herald_natsd::NatsServerOptions::dev(
        tmp.path().join("nats"),
    ))
    .await?;
    let url = nats.client_url();
    let sample = notification(0, args.users, with_policy).to_string();
    let raw = raw_jetstream(&url, args.count, sample.len()).await?;
    eprintln!("bench policy [{label}]: raw JetStream publish {raw:.0}/s; starting Herald");

    let auth = BenchAuth::new()?;
    let subjects = Subjects::new(PREFIX, args.partitions)?;
    let mut options = auth.mesh_without_gateway(url.clone(), "herald-bench-policy", subjects);
    options.channels.run_workers = false;
    if with_policy {
        let mut categories = BTreeMap::new();
        categories.insert(CATEGORY.to_owned(), CategoryRule::default());
        let cap = RateCap {
            category: Some(CATEGORY.into()),
            producer: None,
            limit: 1_000_000,
            window_s: 3600,
            over: Default::default(),
        };
        options.policy = Arc::new(Policy::new(categories).with_caps(vec![cap]));
        let dir = tmp.path().join("templates");
        std::fs::create_dir_all(&dir)?;
        std::fs::write(dir.join("like.toml"), TEMPLATE)?;
        options.templates = Arc::new(herald_templates::Templates::load(&dir)?);
    }
    let api_key = auth.api_key.clone();
    let (server, mesh) = super::mesh_apart(options, 2, "herald-server").await?;
    let base = format!("http://{}", mesh.addr());

    setup(&url, args, with_policy).await?;

    let js = async_nats::jetstream::new(async_nats::connect(&url).await?);
    let push_queue = streams::work_stream_name(Channel::Push);
    let before = queued(&js, push_queue).await?;
    let bar = progress(args.count, label);
    let start = Instant::now();
    let accepted = send(&base, &api_key, args, with_policy, &bar).await?;
    let accepted_secs = start.elapsed();
    if accepted < args.count {
        eprintln!(
            "bench policy [{label}]: {} notifications not accepted",
            args.count - accepted
        );
    }
    bar.set_message("waiting for push jobs");
    // Progress of work done elsewhere: sampled, not synchronised on.
    let mut jobs = 0;
    while jobs < accepted {
        jobs = queued(&js, push_queue).await? - before;
        bar.set_position(jobs);
        if start.elapsed() > Duration::from_secs(900) {
            return Err(format!("{jobs} of {accepted} push jobs after 15 min").into());
        }
        if jobs < accepted {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
    let through_secs = start.elapsed();
    bar.finish_and_clear();
    server.spawn(mesh.shutdown()).await??;
    drop(server);
    drop(nats);
    let outcome = Outcome {
        raw,
        accepted: rate(accepted, accepted_secs),
        through: rate(jobs, through_secs),
        jobs,
    };
    eprintln!(
        "bench policy [{label}]: {:.0}/s accepted, {:.0}/s through to push jobs",
        outcome.accepted, outcome.through
    );
    Ok(outcome)
}

/// A push device for every user and, with policy, their preferences — straight into the
/// stores, before the clock starts.
async fn setup(url: &str, args: &PolicyArgs, with_policy: bool) -> Result<(), BenchError> {
    let store = herald_store::connect(url, "bench-policy").await?;
    let targets = herald_store::Targets::open(
        &store.js,
        herald_store::targets::ContactKeys::new([0x42; 32], &[]),
    )
    .await?;
    let prefs = herald_store::PreferenceStore::open(&store.js).await?;
    let policy = Policy::default();
    // Quiet hours twelve hours away from now, in UTC: read and checked, never on.
    let hour = (time::OffsetDateTime::now_utc().hour() + 12) % 24;
    let document = serde_json::json!({
        "timezone": "UTC",
        "locale": "de-DE",
        "quiet_hours": {"start": format!("{hour:02}:00"), "end": format!("{:02}:00", (hour + 1) % 24)},
        "categories": {CATEGORY: {"email": false}},
    })
    .to_string();
    let mut work = futures::stream::iter((0..args.users as u64).map(|i| {
        let (targets, prefs, policy, document) =
            (targets.clone(), prefs.clone(), &policy, &document);
        async move {
            let u = UserId::new(user(i, args.users))?;
            targets
                .add_device(&u, herald_channels::Platform::Ios, &format!("tok-{i}"))
                .await?;
            if with_policy {
                let patch = PreferencesPatch::from_json(document.as_bytes(), policy)?;
                prefs.update(&u, patch).await?;
            }
            Ok::<_, BenchError>(())
        }
    }))
    .buffer_unordered(128);
    while let Some(r) = work.next().await {
        r?;
    }
    Ok(())
}

fn notification(i: u64, users: usize, with_policy: bool) -> serde_json::Value {
    let mut n = serde_json::json!({
        "user_id": user(i, users), "category": CATEGORY, "channels": ["inbox", "push"],
        "data": {"photo": "p-9"},
    });
    if with_policy {
        n["template"] = "like".into();
        n["vars"] = serde_json::json!({"actor": "Jane", "others": 3, "photo": "p-9"});
    } else {
        n["title"] = "Jane liked your photo".into();
        n["body"] = "Jane and 3 others reacted to p-9.".into();
    }
    n
}

/// Posts every notification in batches; returns how many were accepted.
async fn send(
    base: &str,
    key: &str,
    args: &PolicyArgs,
    with_policy: bool,
    bar: &ProgressBar,
) -> Result<u64, BenchError> {
    let client = reqwest::Client::new();
    let next = Arc::new(AtomicU64::new(0));
    let accepted = Arc::new(AtomicU64::new(0));
    let mut tasks = tokio::task::JoinSet::new();
    for _ in 0..args.concurrency.max(1) {
        let (client, next, accepted, bar) =
            (client.clone(), next.clone(), accepted.clone(), bar.clone());
        let url = format!("{base}/v1/notify/batch");
        let (key, count, batch, users) = (key.to_owned(), args.count, args.batch, args.users);
        tasks.spawn(async move {
            loop {
                let first = next.fetch_add(batch, Ordering::Relaxed);
                if first >= count {
                    break;
                }
                let items: Vec<serde_json::Value> = (first..(first + batch).min(count))
                    .map(|i| notification(i, users, with_policy))
                    .collect();
                let Ok(resp) = client
                    .post(&url)
                    .bearer_auth(&key)
                    .json(&serde_json::json!({ "notifications": items }))
                    .send()
                    .await
                else {
                    continue;
                };
                if let Ok(v) = resp.json::<serde_json::Value>().await {
                    let n = v["accepted"].as_u64().unwrap_or(0);
                    accepted.fetch_add(n, Ordering::Relaxed);
                    bar.set_message(format!("{} accepted", accepted.load(Ordering::Relaxed)));
                }
            }
        });
    }
    while let Some(r) = tasks.join_next().await {
        r?;
    }
    Ok(accepted.load(Ordering::Relaxed))
}

async fn queued(js: &async_nats::jetstream::Context, name: &str) -> Result<u64, BenchError> {
    Ok(js.get_stream(name).await?.info().await?.state.messages)
}

fn progress(total: u64, label: &str) -> ProgressBar {
    let bar = ProgressBar::new(total);
    let template = "{prefix} [{elapsed_precise}] {bar:40} {pos}/{len} push jobs ({per_sec}) {msg}";
    if let Ok(style) = ProgressStyle::with_template(template) {
        bar.set_style(style.progress_chars("=> "));
    }
    bar.set_prefix(format!("bench policy [{label}]"));
    bar
}
