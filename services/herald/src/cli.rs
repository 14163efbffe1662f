//! The command line. Every subcommand takes the same configuration flags; flags beat
//! `HERALD_*` environment variables, which beat the `--config` TOML file. Secrets (the
//! NATS token, an nkey seed) have no flag: a command line is visible to every user of the
//! machine, so they come from files or the environment.

use clap::{Args, Parser, Subcommand};
use serde::Serialize;
use std::path::PathBuf;

/// Herald: notifications live over WebSocket/SSE, from a durable inbox, and through push,
/// email, SMS and webhooks, on NATS JetStream (`about` is the crate description).
#[derive(Debug, Parser)]
#[command(name = "herald", version, about, long_about = None, propagate_version = true)]
pub struct Cli {
    /// What to run.
    #[command(subcommand)]
    pub command: Command,
}

/// Subcommands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the whole mesh in one process (starts its own nats-server unless --nats-url).
    Up(Common),
    /// Run the producer API (HTTP) and the native `herald.notify` ingest.
    Api(Common),
    /// Run the real-time gateway (WebSocket, SSE, long-poll).
    Gateway(Common),
    /// Run the router (INBOX partitions → channel work queues).
    Router(Common),
    /// Run the workers of one channel (push, email, sms, webhook) for its providers.
    Worker(WorkerArgs),
    /// Create or update Herald's streams, buckets and consumers, then exit.
    Provision(Common),
    /// Mint a user token (JWT) with the configured secret.
    Token(TokenArgs),
    /// Subscribe users to a topic in bulk, publish to it, and follow its fan-out (a
    /// client of a running Herald's HTTP API, with progress bars).
    Topic(crate::topic_cli::TopicArgs),
    /// Measure throughput and latency against a real nats-server.
    Bench(crate::bench::BenchArgs),
}

/// Configuration flags shared by every subcommand.
#[derive(Debug, Clone, Default, Args, Serialize)]
pub struct Common {
    /// TOML configuration file.
    #[arg(long, value_name = "FILE")]
    #[serde(skip)]
    pub config: Option<PathBuf>,
    /// HTTP listen address [env: HERALD_HTTP_ADDR] [default: 127.0.0.1:8080]
    #[arg(long, value_name = "ADDR")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub http_addr: Option<String>,
    /// Data directory of `herald up` [env: HERALD_DATA_DIR] [default: .herald]
    #[arg(long, value_name = "DIR")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub data_dir: Option<PathBuf>,
    /// NATS URL(s), comma-separated [env: HERALD_NATS_URL]
    #[arg(long, value_name = "URL")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub nats_url: Option<String>,
    /// NATS `.creds` file (user JWT + nkey seed) [env: HERALD_NATS_CREDS_FILE]
    #[arg(long, value_name = "FILE")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub nats_creds_file: Option<PathBuf>,
    /// File holding the NATS user nkey seed (SU…) [env: HERALD_NATS_NKEY_SEED_FILE]
    #[arg(long, value_name = "FILE")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub nats_nkey_seed_file: Option<PathBuf>,
    /// CA certificate(s) that signed the NATS servers' certificates, PEM; implies
    /// --nats-require-tls [env: HERALD_NATS_TLS_CA_FILE]
    #[arg(long, value_name = "FILE")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub nats_tls_ca_file: Option<PathBuf>,
    /// Client certificate for NATS (mutual TLS), PEM [env: HERALD_NATS_TLS_CERT_FILE]
    #[arg(long, value_name = "FILE")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub nats_tls_cert_file: Option<PathBuf>,
    /// Private key of --nats-tls-cert-file, PEM [env: HERALD_NATS_TLS_KEY_FILE]
    #[arg(long, value_name = "FILE")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub nats_tls_key_file: Option<PathBuf>,
    /// Never talk to NATS without TLS [env: HERALD_NATS_REQUIRE_TLS]
    #[arg(long)]
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    pub nats_require_tls: bool,
    /// Producer API key with every scope [env: HERALD_API_KEY]
    #[arg(long, value_name = "KEY")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub api_key: Option<String>,
    /// HS256 secret for user tokens, 32+ characters [env: HERALD_JWT_SECRET]
    #[arg(long, value_name = "SECRET")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub jwt_secret: Option<String>,
    /// INBOX partitions; fixed once data exists [env: HERALD_PARTITIONS] [default: 16]
    #[arg(long, value_name = "N")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub partitions: Option<u16>,
    /// Stream replicas: 1, or 3 on a cluster [env: HERALD_REPLICAS] [default: 1]
    #[arg(long, value_name = "N")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub replicas: Option<usize>,
    /// Subject prefix [env: HERALD_SUBJECT_PREFIX] [default: herald]
    #[arg(long, value_name = "PREFIX")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub subject_prefix: Option<String>,
}

/// `herald worker`.
#[derive(Debug, Clone, Args)]
pub struct WorkerArgs {
    /// The channel: push, email, sms or webhook.
    #[arg(value_parser = ["push", "email", "sms", "webhook"])]
    pub channel: String,
    /// Jobs in flight per lane [env: HERALD_WORKER_CONCURRENCY] [default: 64]
    #[arg(long, value_name = "N")]
    pub concurrency: Option<usize>,
    /// Configuration flags.
    #[command(flatten)]
    pub common: Common,
}

/// `herald token`.
#[derive(Debug, Clone, Args)]
pub struct TokenArgs {
    /// The user id (`sub`).
    #[arg(long)]
    pub user: String,
    /// Lifetime in seconds.
    #[arg(long, default_value_t = 3600)]
    pub ttl: u64,
    /// Configuration flags.
    #[command(flatten)]
    pub common: Common,
}
