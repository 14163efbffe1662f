//! The two sides of `herald bench conns`: the gateway as a child process (so its memory
//! is measured apart from the clients'), and a fleet of lean WebSocket clients that
//! reconnect with full-jitter exponential backoff and resume from their last seq.

use super::BenchError;
use futures::StreamExt as _;
use hdrhistogram::Histogram;
use std::net::SocketAddr;
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio_tungstenite::tungstenite::{self, Message, protocol::WebSocketConfig};
use tokio_util::sync::CancellationToken;

/// A `herald gateway` child process on a fixed address.
pub(super) struct GatewayProcess {
    child: tokio::process::Child,
    addr: SocketAddr,
}

impl GatewayProcess {
    /// Starts `herald gateway` on `addr` with `env`, and waits until it is ready.
    pub(super) async fn start(
        addr: SocketAddr,
        env: &[(&str, String)],
        log: &Path,
    ) -> Result<Self, BenchError> {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(log)?;
        let mut cmd = tokio::process::Command::new(std::env::current_exe()?);
        cmd.arg("gateway")
            .env("HERALD_HTTP_ADDR", addr.to_string())
            .env("RUST_LOG", "warn")
            .stdout(log.try_clone()?)
            .stderr(log)
            .kill_on_drop(true);
        for (k, v) in env {
            cmd.env(k, v);
        }
        let child = cmd.spawn()?;
        let gateway = GatewayProcess { child, addr };
        let http = reqwest::Client::new();
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let ready = http
                .get(format!("http://{addr}/readyz"))
                .send()
                .await
                .is_ok_and(|r| r.status().is_success());
            if ready {
                return Ok(gateway);
            }
            if Instant::now() > deadline {
                return Err("the gateway child did not become ready in 30 s".into());
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// The child's pid.
    pub(super) fn pid(&self) -> Option<u32> {
        self.child.id()
    }

    /// The address it serves.
    pub(super) fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// `kill -9`, and wait for it to be gone.
    pub(super) async fn kill(mut self) -> Result<(), BenchError> {
        self.child.start_kill()?;
        self.child.wait().await?;
        Ok(())
    }
}

/// Resident memory of a process, bytes (`VmRSS` of `/proc/<pid>/status`).
pub(super) fn rss_bytes(pid: u32) -> Result<u64, BenchError> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    let kib = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        .ok_or("no VmRSS")?;
    Ok(kib * 1024)
}

/// CPU time a process has used so far (user + system), seconds.
pub(super) fn cpu_seconds(pid: u32) -> Result<f64, BenchError> {
    let (user, system) = cpu_split(pid)?;
    Ok(user + system)
}

/// A process's CPU time so far, in seconds: in user space, and in the kernel (for a
/// socket server on loopback, mostly the TCP stack on both ends).
pub(super) fn cpu_split(pid: u32) -> Result<(f64, f64), BenchError> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))?;
    // Fields after the command name (which may hold spaces) start after the last ')'.
    let rest = stat.rsplit_once(')').map(|(_, r)| r).ok_or("bad stat")?;
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let ticks = |i: usize| {
        fields
            .get(i)
            .and_then(|f| f.parse::<u64>().ok())
            .unwrap_or(0)
    };
    // utime and stime are fields 14 and 15 of stat, 11 and 12 after the name.
    Ok((ticks(11) as f64 / 100.0, ticks(12) as f64 / 100.0))
}

/// What every client of the fleet reports into.
pub(super) struct Fleet {
    /// Clients holding a connection that said hello.
    pub(super) connected: AtomicU64,
    /// Notifications received (first time only).
    pub(super) received: AtomicU64,
    /// Of those, notifications that carried a send time (the measured ones).
    pub(super) timed: AtomicU64,
    /// Notifications received again (a seq at or below the client's last).
    pub(super) duplicates: AtomicU64,
    /// Upgrades refused with 503.
    pub(super) refused: AtomicU64,
    /// Close codes seen, by code (4008 and 1001 matter).
    pub(super) slow_closes: AtomicU64,
    /// Delivery latency, µs (send time carried in `data.sent_us`).
    pub(super) delivery: Mutex<Histogram<u64>>,
    /// Connect time (TCP + upgrade + hello), µs.
    pub(super) connect: Mutex<Histogram<u64>>,
    pub(super) stop: CancellationToken,
}

impl Fleet {
    pub(super) fn new() -> Result<Arc<Self>, BenchError> {
        Ok(Arc::new(Fleet {
            connected: AtomicU64::new(0),
            received: AtomicU64::new(0),
            timed: AtomicU64::new(0),
            duplicates: AtomicU64::new(0),
            refused: AtomicU64::new(0),
            slow_closes: AtomicU64::new(0),
            delivery: Mutex::new(Histogram::new_with_bounds(1, 120_000_000, 3)?),
            connect: Mutex::new(Histogram::new_with_bounds(1, 120_000_000, 3)?),
            stop: CancellationToken::new(),
        }))
    }

    /// Wall-clock microseconds (what senders put in `data.sent_us`): the clients may run
    /// in other processes, so the clock is the machine's, not one process's.
    pub(super) fn now_us(&self) -> u64 {
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_micros() as u64)
    }

    /// Clears a histogram for the next phase.
    pub(super) fn reset(hist: &Mutex<Histogram<u64>>) {
        if let Ok(mut h) = hist.lock() {
            h.reset();
        }
    }

    /// A copy of a histogram.
    pub(super) fn snapshot(hist: &Mutex<Histogram<u64>>) -> Result<Histogram<u64>, BenchError> {
        Ok(hist.lock().map_err(|_| "histogram poisoned")?.clone())
    }

    pub(super) fn record(hist: &Mutex<Histogram<u64>>, us: u64) {
        if let Ok(mut h) = hist.lock() {
            let _ = h.record(us.max(1));
        }
    }
}

/// Client-side socket settings: small buffers, like the server's, so 19k clients fit.
fn client_config() -> WebSocketConfig {
    WebSocketConfig::default()
        .read_buffer_size(4096)
        .write_buffer_size(0)
}

/// Full jitter: a random wait in [0, min(cap, base·2^attempt)).
/// Full-jitter exponential backoff with the defaults of Herald's SDKs (500 ms first
/// ceiling, 30 s cap), so a storm's clients behave as real ones do.
fn backoff(attempt: u32) -> Duration {
    let base_ms: u64 = 500;
    let cap_ms: u64 = 30_000;
    let ceiling = base_ms.saturating_mul(1 << attempt.min(16)).min(cap_ms);
    Duration::from_millis(rand::random_range(0..ceiling.max(1)))
}

/// One client: connects (backing off on refusal), reads frames, and on any drop
/// reconnects with `after=<last seq>` until the fleet stops.
pub(super) async fn client(
    fleet: Arc<Fleet>,
    url: String,
    first_connect: Option<tokio::sync::OwnedSemaphorePermit>,
) {
    let mut permit = first_connect;
    let mut last_seq: Option<u64> = None;
    let mut attempt = 0u32;
    let mut retry_after: Option<Duration> = None;
    while !fleet.stop.is_cancelled() {
        let target = match last_seq {
            Some(seq) => format!("{url}&after={seq}"),
            None => url.clone(),
        };
        let started = Instant::now();
        let connect =
            tokio_tungstenite::connect_async_with_config(target, Some(client_config()), true);
        let outcome = tokio::select! {
            outcome = connect => outcome,
            () = fleet.stop.cancelled() => return,
        };
        match outcome {
            Ok((ws, _)) => {
                attempt = 0;
                permit = None;
                serve(&fleet, ws, started, &mut last_seq).await;
            }
            Err(tungstenite::Error::Http(response)) if response.status().as_u16() == 503 => {
                fleet.refused.fetch_add(1, Ordering::Relaxed);
                // The server's own (jittered) delay is a floor for the next try.
                retry_after = response
                    .headers()
                    .get("retry-after")
                    .and_then(|v| v.to_str().ok()?.trim().parse::<u64>().ok())
                    .map(Duration::from_secs);
            }
            Err(_) => {}
        }
        drop(permit.take());
        attempt = attempt.saturating_add(1);
        let wait = backoff(attempt).max(retry_after.take().unwrap_or_default());
        tokio::select! {
            () = tokio::time::sleep(wait) => {}
            () = fleet.stop.cancelled() => return,
        }
    }
}

type Socket =
    tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>;

async fn serve(fleet: &Fleet, mut ws: Socket, started: Instant, last_seq: &mut Option<u64>) {
    let mut said_hello = false;
    loop {
        let msg = tokio::select! {
            msg = ws.next() => msg,
            () = fleet.stop.cancelled() => break,
        };
        let Some(Ok(msg)) = msg else { break };
        match msg {
            Message::Text(text) => {
                let Ok(frame) = serde_json::from_str::<Frame<'_>>(text.as_str()) else {
                    continue;
                };
                match frame.kind.as_ref() {
                    "hello" if !said_hello => {
                        said_hello = true;
                        Fleet::record(&fleet.connect, started.elapsed().as_micros() as u64);
                        fleet.connected.fetch_add(1, Ordering::Relaxed);
                    }
                    "notification" => {
                        let item = Item {
                            seq: frame.seq,
                            data: frame.data,
                        };
                        on_item(fleet, &item, last_seq);
                    }
                    "batch" => {
                        for item in &frame.items {
                            on_item(fleet, item, last_seq);
                        }
                    }
                    _ => {}
                }
            }
            Message::Close(frame) => {
                if frame.is_some_and(|f| u16::from(f.code) == 4008) {
                    fleet.slow_closes.fetch_add(1, Ordering::Relaxed);
                }
                break;
            }
            // Pings are answered by the library as it reads.
            _ => {}
        }
    }
    if said_hello {
        fleet.connected.fetch_sub(1, Ordering::Relaxed);
    }
}

/// What a bench client reads of a server frame: its type, and the seq and send time of
/// each notification in it (a typed read that skips the rest, as a lean client would).
#[derive(serde::Deserialize)]
struct Frame<'a> {
    #[serde(rename = "type", borrow)]
    kind: std::borrow::Cow<'a, str>,
    /// A `notification` frame's own fields (not `flatten`ed: that buffers the frame).
    seq: Option<u64>,
    #[serde(default)]
    data: ItemData,
    /// A `batch` frame's notifications.
    #[serde(default)]
    items: Vec<Item>,
}

#[derive(serde::Deserialize)]
struct Item {
    seq: Option<u64>,
    #[serde(default)]
    data: ItemData,
}

#[derive(serde::Deserialize, Default)]
struct ItemData {
    sent_us: Option<u64>,
}

fn on_item(fleet: &Fleet, item: &Item, last_seq: &mut Option<u64>) {
    let Some(seq) = item.seq else {
        return;
    };
    if last_seq.is_some_and(|last| seq <= last) {
        fleet.duplicates.fetch_add(1, Ordering::Relaxed);
        return;
    }
    *last_seq = Some(seq);
    fleet.received.fetch_add(1, Ordering::Relaxed);
    if let Some(sent) = item.data.sent_us {
        Fleet::record(&fleet.delivery, fleet.now_us().saturating_sub(sent));
        fleet.timed.fetch_add(1, Ordering::Relaxed);
    }
}

/// A client that reads its hello and then never reads again; returns the close code the
/// server eventually sent (read once the test is over), and when it was read.
pub(super) async fn stalled_client(url: String) -> Result<Socket, BenchError> {
    let (mut ws, _) =
        tokio_tungstenite::connect_async_with_config(url, Some(client_config()), true).await?;
    let _hello = ws.next().await;
    Ok(ws)
}

/// Reads a stalled client's backlog to its end: how the server ended it.
pub(super) async fn how_it_ended(mut ws: Socket) -> String {
    let read = async {
        loop {
            match ws.next().await {
                Some(Ok(Message::Close(Some(frame)))) => {
                    return format!("close frame {}", u16::from(frame.code));
                }
                Some(Ok(Message::Close(None))) => return "close frame without a code".into(),
                Some(Ok(_)) => {}
                // The server gave up writing to a full socket and dropped it.
                Some(Err(_)) | None => {
                    return "dropped by the server (its socket was full: no room for the close frame)".into();
                }
            }
        }
    };
    tokio::time::timeout(Duration::from_secs(60), read)
        .await
        .unwrap_or_else(|_| "still open after 60 s".into())
}

/// A counter from a Herald process's `/metrics` (0 when absent).
pub(super) async fn metric(addr: SocketAddr, name: &str) -> Result<f64, BenchError> {
    let text = reqwest::get(format!("http://{addr}/metrics"))
        .await?
        .text()
        .await?;
    Ok(text
        .lines()
        .filter(|l| l.starts_with(name))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum())
}
