//! The client side of the multi-process `herald bench conns`: a hidden `herald bench
//! conns-worker` process holding a slice of the clients.
//!
//! A process may hold 20,000 open files on these machines, so 100,000 clients need several
//! processes. Each worker runs the same lean clients as the single-process run
//! ([`super::fleet::client`], or [`super::natsws::client`] for the nats-server
//! side-by-side) for users `c-{from} … c-{to-1}`, user `i` on gateway `i mod K`. It reports
//! its counters and histograms as one JSON line on stdout every 200 ms, and obeys `reset`
//! (clear the histograms and the refusal count) and `stop` on stdin. The parent sums the
//! counters and merges the histograms.

use super::BenchError;
use super::fleet::Fleet;
use base64::Engine as _;
use clap::Args;
use hdrhistogram::Histogram;
use hdrhistogram::serialization::{Deserializer, Serializer as _, V2Serializer};
use herald_auth::{JwtConfig, UserAuth};
use herald_protocol::UserId;
use serde::{Deserialize, Serialize};
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;
use tokio::io::AsyncBufReadExt as _;

/// `herald bench conns-worker` (started by `herald bench conns`, not by hand).
#[derive(Debug, Clone, Args)]
pub struct ConnsClientArgs {
    /// WebSocket base URLs, one per gateway (or nats-server); user `i` uses `i mod K`.
    #[arg(long = "target", required = true)]
    pub targets: Vec<String>,
    /// First user index.
    #[arg(long)]
    pub from: usize,
    /// One past the last user index.
    #[arg(long)]
    pub to: usize,
    /// Upgrades in flight while first connecting.
    #[arg(long, default_value_t = 64)]
    pub in_flight: usize,
    /// HS256 secret to mint the users' tokens with (Herald mode).
    #[arg(long, default_value = "")]
    pub jwt_secret: String,
    /// Connect to nats-server's WebSocket listener instead of Herald's gateway.
    #[arg(long)]
    pub nats: bool,
}

/// One progress line of a worker.
#[derive(Debug, Default, Serialize, Deserialize)]
pub(super) struct Report {
    /// Clients holding a connection that said hello (or got nats-server's PONG).
    pub(super) connected: u64,
    /// Notifications received, first time only.
    pub(super) received: u64,
    /// Notifications received again.
    pub(super) duplicates: u64,
    /// Upgrades refused with 503 since the last `reset`.
    pub(super) refused: u64,
    /// Delivery latency histogram, µs (V2, base64).
    pub(super) delivery: String,
    /// Connect time histogram, µs (V2, base64).
    pub(super) connect: String,
}

impl Report {
    /// Decodes one of the histograms.
    pub(super) fn histogram(encoded: &str) -> Result<Histogram<u64>, BenchError> {
        let bytes = base64::engine::general_purpose::STANDARD.decode(encoded)?;
        Ok(Deserializer::new().deserialize(&mut bytes.as_slice())?)
    }
}

fn encode(hist: &std::sync::Mutex<Histogram<u64>>) -> Result<String, BenchError> {
    let snapshot = Fleet::snapshot(hist)?;
    let mut bytes = Vec::new();
    V2Serializer::new().serialize(&snapshot, &mut bytes)?;
    Ok(base64::engine::general_purpose::STANDARD.encode(bytes))
}

/// Runs a worker until `stop` (or the end of stdin).
///
/// # Errors
/// When the open-files limit is too low or a token cannot be minted.
pub async fn run(args: ConnsClientArgs) -> Result<(), BenchError> {
    let soft = rlimit::increase_nofile_limit(u64::MAX)?;
    let n = args.to.saturating_sub(args.from);
    if (soft as usize) < n + 100 {
        return Err(format!(
            "{n} clients need {} open files; the limit is {soft}",
            n + 100
        )
        .into());
    }
    let fleet = Fleet::new()?;
    let users = (!args.nats)
        .then(|| {
            UserAuth::new(&JwtConfig {
                hs256_secret: Some(args.jwt_secret.as_bytes().to_vec()),
                ..Default::default()
            })
        })
        .transpose()?;
    let connecting = Arc::new(tokio::sync::Semaphore::new(args.in_flight.max(1)));
    let mut clients = tokio::task::JoinSet::new();
    let spawning = {
        let fleet = fleet.clone();
        let targets = args.targets.clone();
        async move {
            for i in args.from..args.to {
                let permit = connecting.clone().acquire_owned().await?;
                let target = &targets[i % targets.len()];
                match &users {
                    Some(users) => {
                        let token = users.mint(&UserId::new(format!("c-{i}"))?, 24 * 3600)?;
                        let url = format!("{target}/v1/ws?access_token={token}");
                        clients.spawn(super::fleet::client(fleet.clone(), url, Some(permit)));
                    }
                    None => {
                        clients.spawn(super::natsws::client(
                            fleet.clone(),
                            target.clone(),
                            format!("live.c-{i}"),
                            permit,
                        ));
                    }
                }
            }
            Ok::<_, BenchError>(clients)
        }
    };
    let spawner = tokio::spawn(spawning);
    let mut stdin = tokio::io::BufReader::new(tokio::io::stdin()).lines();
    let mut tick = tokio::time::interval(Duration::from_millis(200));
    loop {
        tokio::select! {
            line = stdin.next_line() => match line?.as_deref() {
                Some("reset") => {
                    Fleet::reset(&fleet.delivery);
                    Fleet::reset(&fleet.connect);
                    fleet.refused.store(0, Ordering::Relaxed);
                }
                Some("stop") | None => break,
                Some(_) => {}
            },
            _ = tick.tick() => {
                let report = Report {
                    connected: fleet.connected.load(Ordering::Relaxed),
                    received: fleet.received.load(Ordering::Relaxed),
                    duplicates: fleet.duplicates.load(Ordering::Relaxed),
                    refused: fleet.refused.load(Ordering::Relaxed),
                    delivery: encode(&fleet.delivery)?,
                    connect: encode(&fleet.connect)?,
                };
                println!("{}", serde_json::to_string(&report)?);
            }
        }
    }
    fleet.stop.cancel();
    let mut clients = spawner.await??;
    while clients.join_next().await.is_some() {}
    Ok(())
}
