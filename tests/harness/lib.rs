//! The end-to-end harness: real nats-server processes, Herald meshes in-process, and
//! small clients for every transport. Everything cleans up on `Drop`.
//!
//! - [`nats`]: [`Nats::single`] and [`Nats::cluster`], on random ports in a temp dir.
//! - [`herald`]: [`Herald::builder`] runs `herald::mesh::Mesh` on `127.0.0.1:0` with a
//!   fresh API key and JWT secret, and wraps the HTTP calls tests make.
//! - [`ws`] and [`sse`]: a WebSocket client and a Server-Sent Events reader.
//! - [`scripted`]: a provider whose answers a test scripts; [`smtp`]: a real SMTP server.
//! - [`schedules`]: fire a pending JetStream schedule early (digest period ends).
//! - [`trust`]: nkey users, a test CA and operator-mode `.creds` for a nats-server that
//!   demands authentication or TLS ([`Nats::single_with`]).
//! - [`wait`]: bounded waiting ([`eventually`], [`within`]); tests never sleep to
//!   synchronise.

pub mod herald;
pub mod jobs;
pub mod nats;
pub mod schedules;
pub mod scripted;
pub mod smtp;
pub mod sse;
pub mod trust;
pub mod wait;
pub mod ws;

pub use herald::{Accepted, Herald, HeraldBuilder, Resume};
pub use jobs::JobFeed;
pub use nats::Nats;
pub use sse::{SseClient, SseEvent};
pub use wait::{eventually, within};
pub use ws::WsClient;

/// The value of the first sample line of a Prometheus `text` that starts with `prefix`.
pub fn metric_sample(text: &str, prefix: &str) -> Option<f64> {
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .find(|l| l.starts_with(prefix))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
}

/// Percent-encodes `raw` as one URL path segment or query value: every byte outside the
/// RFC 3986 unreserved set is escaped, so `/`, `*`, `>`, spaces and unicode survive.
pub fn encode(raw: &str) -> String {
    let mut out = String::with_capacity(raw.len() * 3);
    for byte in raw.bytes() {
        if byte.is_ascii_alphanumeric() || matches!(byte, b'-' | b'_' | b'.' | b'~') {
            out.push(char::from(byte));
        } else {
            out.push_str(&format!("%{byte:02X}"));
        }
    }
    out
}

/// Installs a test-friendly tracing subscriber once (`RUST_LOG` filters it; silent by
/// default).
pub fn init_tracing() {
    use tracing_subscriber::EnvFilter;
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("off"));
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_test_writer()
        .try_init();
}

/// A `send_at` `ms` milliseconds from now: the instant and its RFC 3339 text (with
/// sub-second precision, which the scheduler honours).
///
/// # Panics
/// Never in practice: formatting a UTC time as RFC 3339 cannot fail.
pub fn send_at_in(ms: i64) -> (time::OffsetDateTime, String) {
    let at = time::OffsetDateTime::now_utc() + time::Duration::milliseconds(ms);
    let text = at
        .format(&time::format_description::well_known::Rfc3339)
        .expect("a UTC time formats as RFC 3339");
    (at, text)
}

/// The `seq`s of delivered notifications, in the order given.
pub fn seqs(items: &[serde_json::Value]) -> Vec<u64> {
    items.iter().filter_map(|n| n["seq"].as_u64()).collect()
}
