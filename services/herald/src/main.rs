//! `herald`: tracing → config → run → drain. Invalid configuration exits with code 2.

use clap::Parser as _;
use herald::cli::{Cli, Command, Common};
use herald::config::{ConfigError, Settings};
use herald::mesh::{Mesh, MeshOptions, Roles};
use std::process::ExitCode;
use std::sync::Arc;

// glibc malloc showed up as the top cost under load (fragmented, lock-heavy frees);
// mimalloc is made for many small short-lived allocations across threads. The
// `system-alloc` feature builds with glibc's malloc instead, to compare memory per
// connection (`herald bench conns`) and to profile with heaptrack.
#[cfg(not(feature = "system-alloc"))]
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> ExitCode {
    let cli = Cli::parse();
    init_tracing();
    let runtime = match tokio::runtime::Runtime::new() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("herald: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    runtime.block_on(run(cli))
}

fn init_tracing() {
    use tracing_subscriber::EnvFilter;
    let filter = EnvFilter::try_from_env("HERALD_LOG")
        .unwrap_or_else(|_| EnvFilter::new("info,async_nats=warn,tower_http=warn"));
    let json = std::env::var("HERALD_LOG_FORMAT").is_ok_and(|v| v == "json");
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    if json {
        builder.json().init();
    } else {
        builder.init();
    }
}

fn settings(common: &Common) -> Result<Settings, ConfigError> {
    Settings::load(common.config.as_deref(), common)
}

async fn run(cli: Cli) -> ExitCode {
    let result: Result<(), Failure> = match cli.command {
        Command::Up(common) => match settings(&common) {
            Ok(s) => herald::up::run(s, herald::shutdown::on_signal())
                .await
                .map_err(|e| match e {
                    herald::up::UpError::Config(c) => Failure::Config(c),
                    other => Failure::Run(Box::new(other)),
                }),
            Err(e) => Err(Failure::Config(e)),
        },
        Command::Api(c) => {
            service(
                &c,
                Roles {
                    api: true,
                    ingest: true,
                    gateway: false,
                    router: false,
                },
                "herald-api",
                None,
            )
            .await
        }
        Command::Gateway(c) => {
            service(
                &c,
                Roles {
                    gateway: true,
                    api: false,
                    ingest: false,
                    router: false,
                },
                "herald-gateway",
                None,
            )
            .await
        }
        Command::Router(c) => {
            service(
                &c,
                Roles {
                    router: true,
                    api: false,
                    ingest: false,
                    gateway: false,
                },
                "herald-router",
                None,
            )
            .await
        }
        Command::Worker(w) => {
            let channel = herald_protocol::streams::WORK_CHANNELS
                .into_iter()
                .find(|c| c.as_str() == w.channel);
            service(
                &w.common,
                Roles {
                    router: false,
                    api: false,
                    ingest: false,
                    gateway: false,
                },
                "herald-worker",
                channel.map(|c| (c, w.concurrency)),
            )
            .await
        }
        Command::Provision(c) => provision(&c).await,
        Command::Token(t) => token(&t),
        Command::Topic(t) => herald::topic_cli::run(t).await.map_err(Failure::Run),
        Command::Bench(b) => bench(b).await,
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(Failure::Config(e)) => {
            eprintln!("herald: {e}");
            ExitCode::from(2)
        }
        Err(Failure::Run(e)) => {
            eprintln!("herald: {}", herald_api::error::error_chain(e.as_ref()));
            ExitCode::FAILURE
        }
    }
}

enum Failure {
    Config(ConfigError),
    Run(Box<dyn std::error::Error + Send + Sync>),
}

/// Runs a benchmark until it ends or a SIGINT/SIGTERM arrives. On a signal the benchmark
/// is dropped, so its nats-server, worker and client processes are stopped with it (they
/// are killed when their handles drop) instead of living on without a parent.
async fn bench(args: herald::bench::BenchArgs) -> Result<(), Failure> {
    let stop = herald::shutdown::on_signal();
    tokio::select! {
        result = herald::bench::run(args) => result.map_err(Failure::Run),
        () = stop.cancelled() => Err(Failure::Run(
            "interrupted; the benchmark's own processes were stopped".into(),
        )),
    }
}

async fn service(
    common: &Common,
    roles: Roles,
    name: &str,
    worker: Option<(herald_protocol::Channel, Option<usize>)>,
) -> Result<(), Failure> {
    let s = settings(common).map_err(Failure::Config)?;
    // A worker for a channel with no provider would dead-letter its whole queue.
    let mut v = match worker {
        Some((channel, _)) => s.validate_worker(channel),
        None => s.validate(),
    }
    .map_err(Failure::Config)?;
    // Only `herald worker <channel>` runs workers, for that channel alone.
    v.channels.run_workers = worker.is_some();
    if let Some((channel, concurrency)) = worker {
        v.channels.channels = Some(vec![channel]);
        if let Some(n) = concurrency {
            v.channels.concurrency = n.clamp(1, 10_000);
        }
    }
    let Some(nats_url) = s.nats_url.clone() else {
        return Err(Failure::Config(ConfigError(vec![
            "nats_url is required (--nats-url or HERALD_NATS_URL); `herald up` starts its own"
                .into(),
        ])));
    };
    let listener = tokio::net::TcpListener::bind(v.http_addr)
        .await
        .map_err(|e| Failure::Run(format!("binding {}: {e}", v.http_addr).into()))?;
    let mesh = Mesh::start(
        MeshOptions {
            nats_url,
            nats: v.nats,
            name: name.into(),
            subjects: v.subjects,
            streams: v.streams,
            provision: false,
            api_keys: v.api_keys,
            jwt: v.jwt,
            jwks: v.jwks,
            api: v.api,
            gateway: v.gateway,
            roles,
            dev_mode: s.dev_mode,
            channels: v.channels,
            policy: Arc::new(v.policy),
            templates: v.templates,
            rates: v.rates,
            topics: v.topics,
        },
        listener,
    )
    .await
    .map_err(|e| Failure::Run(Box::new(e)))?;
    mesh.run_until(herald::shutdown::on_signal())
        .await
        .map_err(|e| Failure::Run(Box::new(e)))
}

async fn provision(common: &Common) -> Result<(), Failure> {
    let mut s = settings(common).map_err(Failure::Config)?;
    // Provisioning needs no user-token settings; don't demand them.
    s.jwt_secret.get_or_insert_with(|| "x".repeat(32));
    let v = s.validate().map_err(Failure::Config)?;
    let url = s.nats_url.clone().ok_or_else(|| {
        Failure::Config(ConfigError(vec![
            "nats_url is required (--nats-url or HERALD_NATS_URL)".into(),
        ]))
    })?;
    let nats = herald_store::connect_with(&url, &v.nats, "herald-provision")
        .await
        .map_err(|e| Failure::Run(Box::new(e)))?;
    let report = herald_store::provision(&nats.js_consume, &v.subjects, &v.streams)
        .await
        .map_err(|e| Failure::Run(Box::new(e)))?;
    println!(
        "provisioned: created {:?}, updated {:?}, unchanged {:?}",
        report.created, report.updated, report.unchanged
    );
    Ok(())
}

fn token(args: &herald::cli::TokenArgs) -> Result<(), Failure> {
    // Minting a token needs no NATS; its files need not be readable here.
    let mut s = settings(&args.common)
        .map_err(Failure::Config)?
        .without_nats();
    if s.jwt_secret.is_none() {
        s.jwt_secret = herald::up::dev_jwt_secret(&s.data_dir);
        if s.jwt_secret.is_none() {
            return Err(Failure::Config(ConfigError(vec![format!(
                "no JWT secret: set HERALD_JWT_SECRET, or point --data-dir at the data dir \
                 `herald up` used (no credentials.toml in {})",
                s.data_dir.display()
            )])));
        }
    }
    let v = s.validate().map_err(Failure::Config)?;
    let auth = herald_auth::UserAuth::new(&v.jwt).map_err(|e| Failure::Run(Box::new(e)))?;
    let user = herald_protocol::UserId::new(args.user.clone())
        .map_err(|e| Failure::Config(ConfigError(vec![format!("--user: {e}")])))?;
    let token = auth
        .mint(&user, args.ttl)
        .map_err(|e| Failure::Run(Box::new(e)))?;
    println!("{token}");
    Ok(())
}
