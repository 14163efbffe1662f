//! A fake Twilio Programmable Messaging API: `POST
//! /2010-04-01/Accounts/{AccountSid}/Messages.json` with a form body and HTTP basic auth,
//! answering 201 with a message resource, or Twilio's JSON errors (`code`, `message`,
//! `more_info`, `status`).

use crate::script::{Log, Reply, Script};
use crate::server::Server;
use axum::Router;
use axum::body::Bytes;
use axum::extract::{Path, State};
use axum::http::HeaderMap;
use axum::response::Response;
use axum::routing::post;
use base64::Engine as _;
use serde_json::json;
use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

/// One request the fake received.
#[derive(Debug, Clone)]
pub struct TwilioRequest {
    /// The form fields.
    pub form: BTreeMap<String, String>,
    /// The status answered.
    pub status: u16,
}

struct Twilio {
    account_sid: String,
    auth_token: String,
    script: Script,
    log: Log<TwilioRequest>,
    sent: AtomicU64,
}

/// A running fake Twilio.
pub struct TwilioFake {
    server: Server,
    state: Arc<Twilio>,
}

impl TwilioFake {
    /// Starts a fake for account `AC…` with a fixed auth token.
    ///
    /// # Errors
    /// When the listener cannot be bound.
    pub async fn start() -> std::io::Result<Self> {
        let state = Arc::new(Twilio {
            account_sid: format!("AC{}", "0123456789abcdef".repeat(2)),
            auth_token: "twilio-test-auth-token".into(),
            script: Script::default(),
            log: Log::default(),
            sent: AtomicU64::new(0),
        });
        let router = Router::new()
            .route("/2010-04-01/Accounts/{sid}/Messages.json", post(create))
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

    /// TCP connections accepted so far.
    pub fn connections(&self) -> usize {
        self.server.connections()
    }

    /// The account SID.
    pub fn account_sid(&self) -> &str {
        &self.state.account_sid
    }

    /// The auth token.
    pub fn auth_token(&self) -> &str {
        &self.state.auth_token
    }

    /// Scripted replies (for authenticated, well-formed requests).
    pub fn script(&self) -> &Script {
        &self.state.script
    }

    /// Every request so far.
    pub fn received(&self) -> Vec<TwilioRequest> {
        self.state.log.all()
    }

    /// How many requests so far (cheap enough to poll).
    pub fn received_count(&self) -> usize {
        self.state.log.len()
    }

    /// From now on, counts requests without keeping them (a benchmark's long run).
    pub fn count_only(&self) {
        self.state.log.count_only();
    }

    /// Messages accepted (201) so far.
    pub fn accepted(&self) -> Vec<TwilioRequest> {
        self.received()
            .into_iter()
            .filter(|r| r.status == 201)
            .collect()
    }
}

/// A Twilio error answer.
pub fn error_reply(status: u16, code: u32, message: &str) -> Reply {
    Reply::json(
        status,
        &json!({"code": code, "message": message, "more_info": format!("https://www.twilio.com/docs/errors/{code}"), "status": status}),
    )
}

async fn create(
    State(twilio): State<Arc<Twilio>>,
    Path(sid): Path<String>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let form: BTreeMap<String, String> = serde_urlencoded::from_bytes(&body).unwrap_or_default();
    let reply = answer(&twilio, &sid, &headers, &form);
    let status = match &reply {
        Reply::Respond { status, .. } => *status,
        Reply::Hang => 0,
    };
    twilio.log.push(TwilioRequest { form, status });
    twilio.script.latency().await;
    reply.into_response().await
}

fn answer(
    twilio: &Twilio,
    sid: &str,
    headers: &HeaderMap,
    form: &BTreeMap<String, String>,
) -> Reply {
    let expected = base64::engine::general_purpose::STANDARD
        .encode(format!("{}:{}", twilio.account_sid, twilio.auth_token));
    let authorized = headers
        .get("authorization")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Basic "))
        .is_some_and(|v| v == expected);
    if !authorized {
        return error_reply(401, 20003, "Authenticate");
    }
    if sid != twilio.account_sid {
        return error_reply(404, 20404, "The requested resource was not found");
    }
    if !headers
        .get("content-type")
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.starts_with("application/x-www-form-urlencoded"))
    {
        return error_reply(400, 21601, "Request must be form-encoded");
    }
    let Some(to) = form.get("To") else {
        return error_reply(400, 21604, "A 'To' phone number is required.");
    };
    if form.get("From").is_none_or(String::is_empty) {
        return error_reply(400, 21603, "A 'From' phone number is required.");
    }
    if form.get("Body").is_none_or(String::is_empty) {
        return error_reply(400, 21602, "Message body is required.");
    }
    let digits = to.strip_prefix('+').unwrap_or("");
    if digits.len() < 8 || digits.len() > 15 || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return error_reply(
            400,
            21211,
            &format!("The 'To' number {to} is not a valid phone number."),
        );
    }
    if let Some(reply) = twilio.script.take() {
        return reply;
    }
    let n = twilio.sent.fetch_add(1, Ordering::SeqCst);
    Reply::json(
        201,
        &json!({"sid": format!("SM{n:032x}"), "account_sid": twilio.account_sid, "to": to, "from": form.get("From"),
            "body": form.get("Body"), "status": "queued", "num_segments": "1", "direction": "outbound-api",
            "error_code": null, "error_message": null}),
    )
}
