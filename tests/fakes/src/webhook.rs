//! A webhook receiver that verifies `Herald-Signature` on its own (HMAC-SHA256 over
//! `"<t>.<raw body>"`, written here independently of the product's code so a bug there
//! cannot verify itself), records every delivery, and answers 204 — or 401 to a bad
//! signature, or whatever is scripted.

use crate::script::{Log, Reply, Script};
use crate::server::Server;
use axum::Router;
use axum::body::Bytes;
use axum::extract::State;
use axum::http::{HeaderMap, Uri};
use axum::response::Response;
use hmac::{Hmac, Mac};
use serde_json::Value;
use sha2::Sha256;
use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

/// How far a signature's timestamp may be from now.
pub const TOLERANCE_S: i64 = 300;

/// One delivery received.
#[derive(Debug, Clone)]
pub struct WebhookRequest {
    /// Request path.
    pub path: String,
    /// The `Herald-Id` header.
    pub id: Option<String>,
    /// The JSON body (`Null` if not JSON).
    pub body: Value,
    /// Whether the signature verified.
    pub signature_valid: bool,
    /// The status answered.
    pub status: u16,
}

struct Receiver {
    secret: Vec<u8>,
    script: Script,
    log: Log<WebhookRequest>,
}

/// A running webhook receiver.
pub struct WebhookReceiver {
    server: Server,
    state: Arc<Receiver>,
}

impl WebhookReceiver {
    /// Starts a receiver sharing `secret` with the sender.
    ///
    /// # Errors
    /// When the listener cannot be bound.
    pub async fn start(secret: &str) -> std::io::Result<Self> {
        let state = Arc::new(Receiver {
            secret: secret.as_bytes().to_vec(),
            script: Script::default(),
            log: Log::default(),
        });
        let router = Router::new()
            .fallback(receive)
            .with_state(Arc::clone(&state));
        Ok(Self {
            server: Server::start(router, None).await?,
            state,
        })
    }

    /// A URL on this receiver.
    pub fn url(&self, path: &str) -> String {
        format!("{}{path}", self.server.url())
    }

    /// Scripted replies (for correctly signed requests).
    pub fn script(&self) -> &Script {
        &self.state.script
    }

    /// Every request so far.
    pub fn received(&self) -> Vec<WebhookRequest> {
        self.state.log.all()
    }

    /// How many connections are open now.
    pub fn open_connections(&self) -> usize {
        self.server.open_connections()
    }

    /// How many requests so far (cheap enough to poll).
    pub fn received_count(&self) -> usize {
        self.state.log.len()
    }

    /// From now on, counts requests without keeping them (a benchmark's long run).
    pub fn count_only(&self) {
        self.state.log.count_only();
    }
}

fn valid(secret: &[u8], header: Option<&str>, body: &[u8]) -> bool {
    let Some(header) = header else { return false };
    let mut t = None;
    let mut sigs = Vec::new();
    for part in header.split(',') {
        match part.split_once('=') {
            Some(("t", v)) => t = v.parse::<i64>().ok(),
            Some(("v1", v)) => sigs.extend(hex::decode(v).ok()),
            _ => {}
        }
    }
    let Some(t) = t else { return false };
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0);
    if (now - t).abs() > TOLERANCE_S {
        return false;
    }
    sigs.iter().any(|sig| {
        let Ok(mut mac) = Hmac::<Sha256>::new_from_slice(secret) else {
            return false;
        };
        mac.update(format!("{t}.").as_bytes());
        mac.update(body);
        mac.verify_slice(sig).is_ok()
    })
}

async fn receive(
    State(receiver): State<Arc<Receiver>>,
    uri: Uri,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let header = |n: &str| headers.get(n).and_then(|v| v.to_str().ok());
    let signature_valid = valid(&receiver.secret, header("herald-signature"), &body);
    let reply = if !signature_valid {
        Reply::status(401)
    } else {
        receiver.script.take().unwrap_or(Reply::status(204))
    };
    let status = match &reply {
        Reply::Respond { status, .. } => *status,
        Reply::Hang => 0,
    };
    receiver.log.record(|| WebhookRequest {
        path: uri.path().to_owned(),
        id: header("herald-id").map(str::to_owned),
        body: serde_json::from_slice(&body).unwrap_or(Value::Null),
        signature_valid,
        status,
    });
    receiver.script.latency().await;
    reply.into_response().await
}
