//! A fake Vonage SMS API: `POST /sms/json` with `api_key`/`api_secret` in a JSON (or form)
//! body, always answering HTTP 200 with one entry per message part whose `status` is `"0"`
//! on success and a Vonage error code otherwise.

use crate::script::{Log, Reply, Script};
use crate::server::Server;
use axum::Router;
use axum::body::Bytes;
use axum::extract::State;
use axum::http::HeaderMap;
use axum::response::Response;
use axum::routing::post;
use serde_json::{Map, Value, json};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

/// One request the fake received.
#[derive(Debug, Clone)]
pub struct VonageRequest {
    /// The parameters (JSON object; form fields as strings).
    pub params: Map<String, Value>,
    /// The `status` code answered (`None` for scripted non-Vonage answers).
    pub status: Option<u32>,
}

struct Vonage {
    api_key: String,
    api_secret: String,
    script: Script,
    log: Log<VonageRequest>,
    sent: AtomicU64,
}

/// A running fake Vonage.
pub struct VonageFake {
    server: Server,
    state: Arc<Vonage>,
}

impl VonageFake {
    /// Starts the fake with a fixed key and secret.
    ///
    /// # Errors
    /// When the listener cannot be bound.
    pub async fn start() -> std::io::Result<Self> {
        let state = Arc::new(Vonage {
            api_key: "abcd1234".into(),
            api_secret: "vonage-test-secret".into(),
            script: Script::default(),
            log: Log::default(),
            sent: AtomicU64::new(0),
        });
        let router = Router::new()
            .route("/sms/json", post(sms))
            .with_state(Arc::clone(&state));
        Ok(Self {
            server: Server::start(router, None).await?,
            state,
        })
    }

    /// Base URL.
    pub fn url(&self) -> String {
        self.server.url()
    }

    /// The API key.
    pub fn api_key(&self) -> &str {
        &self.state.api_key
    }

    /// The API secret.
    pub fn api_secret(&self) -> &str {
        &self.state.api_secret
    }

    /// Scripted replies (for authenticated, complete requests).
    pub fn script(&self) -> &Script {
        &self.state.script
    }

    /// Every request so far.
    pub fn received(&self) -> Vec<VonageRequest> {
        self.state.log.all()
    }

    /// Messages accepted (status 0) so far.
    pub fn accepted(&self) -> Vec<VonageRequest> {
        self.received()
            .into_iter()
            .filter(|r| r.status == Some(0))
            .collect()
    }
}

/// A 200 answer with one failed part: `status` and `error-text` as Vonage sends them.
pub fn status_reply(status: u32, error_text: &str) -> Reply {
    Reply::json(
        200,
        &json!({"message-count": "1", "messages": [{"status": status.to_string(), "error-text": error_text}]}),
    )
}

async fn sms(State(vonage): State<Arc<Vonage>>, headers: HeaderMap, body: Bytes) -> Response {
    let is_json = headers
        .get("content-type")
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.starts_with("application/json"));
    let params: Map<String, Value> = if is_json {
        serde_json::from_slice(&body).unwrap_or_default()
    } else {
        serde_urlencoded::from_bytes::<Vec<(String, String)>>(&body)
            .unwrap_or_default()
            .into_iter()
            .map(|(k, v)| (k, Value::String(v)))
            .collect()
    };
    let text = |k: &str| {
        params
            .get(k)
            .and_then(Value::as_str)
            .filter(|s| !s.is_empty())
    };
    let (reply, status) = if ["api_key", "api_secret", "from", "to", "text"]
        .iter()
        .any(|k| text(k).is_none())
    {
        (status_reply(2, "Missing from param"), Some(2))
    } else if text("api_key") != Some(vonage.api_key.as_str())
        || text("api_secret") != Some(vonage.api_secret.as_str())
    {
        (status_reply(4, "Bad Credentials"), Some(4))
    } else if !text("to")
        .is_some_and(|to| (8..=15).contains(&to.len()) && to.bytes().all(|b| b.is_ascii_digit()))
    {
        (status_reply(3, "Invalid to address"), Some(3))
    } else if let Some(reply) = vonage.script.take() {
        (reply, None)
    } else {
        let n = vonage.sent.fetch_add(1, Ordering::SeqCst);
        let to = text("to").unwrap_or_default().to_owned();
        let ok = json!({"message-count": "1", "messages": [{"to": to, "message-id": format!("{n:016X}"), "status": "0",
            "remaining-balance": "10.00", "message-price": "0.03", "network": "26202"}]});
        (Reply::json(200, &ok), Some(0))
    };
    vonage.log.push(VonageRequest { params, status });
    vonage.script.latency().await;
    reply.into_response().await
}
