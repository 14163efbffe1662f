//! A fake FCM HTTP v1 API with its OAuth2 token endpoint.
//!
//! `POST /token` takes the JWT bearer grant (RFC 7523): an RS256 assertion from the test
//! service account (`iss` = its e-mail, `aud` = this endpoint, the FCM scope), verified
//! against the account's public key, and answers a random access token. `POST
//! /v1/projects/{project}/messages:send` requires one of the tokens it issued (401
//! `UNAUTHENTICATED` otherwise), checks the message like FCM (a target, string-only `data`)
//! and answers `{"name": "projects/…/messages/…"}` or Google-style errors.

use crate::script::{Log, Reply, Script};
use crate::server::Server;
use axum::Router;
use axum::extract::{Form, Path, State};
use axum::http::HeaderMap;
use axum::response::Response;
use axum::routing::post;
use jsonwebtoken::{Algorithm, DecodingKey, Validation};
use serde::Deserialize;
use serde_json::{Value, json};
use std::collections::HashSet;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

/// The service account's private key (a test-only key generated for these fakes).
pub const TEST_PRIVATE_KEY: &str = include_str!("../fixtures/fcm-test-service-account.key.pem");
const TEST_PUBLIC_KEY: &str = include_str!("../fixtures/fcm-test-service-account.pub.pem");
/// The scope an assertion must ask for.
pub const SCOPE: &str = "https://www.googleapis.com/auth/firebase.messaging";

/// One message the fake was asked to send.
#[derive(Debug, Clone)]
pub struct FcmRequest {
    /// The `message` object.
    pub message: Value,
    /// The bearer token used.
    pub bearer: Option<String>,
    /// What the fake answered (status).
    pub status: u16,
}

struct Fcm {
    project_id: String,
    client_email: String,
    token_uri: Mutex<String>,
    key: DecodingKey,
    issued: Mutex<HashSet<String>>,
    expires_in: AtomicU64,
    token_requests: AtomicU64,
    sent: AtomicU64,
    unregistered: Mutex<HashSet<String>>,
    script: Script,
    token_script: Script,
    log: Log<FcmRequest>,
}

/// A running fake FCM.
pub struct FcmFake {
    server: Server,
    state: Arc<Fcm>,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl FcmFake {
    /// Starts a fake for project `herald-test`.
    ///
    /// # Errors
    /// When the listener cannot be bound or the fixture key does not parse.
    pub async fn start() -> std::io::Result<Self> {
        let key =
            DecodingKey::from_rsa_pem(TEST_PUBLIC_KEY.as_bytes()).map_err(std::io::Error::other)?;
        let state = Arc::new(Fcm {
            project_id: "herald-test".into(),
            client_email: "herald@herald-test.iam.gserviceaccount.com".into(),
            token_uri: Mutex::default(),
            key,
            issued: Mutex::default(),
            expires_in: AtomicU64::new(3599),
            token_requests: AtomicU64::new(0),
            sent: AtomicU64::new(0),
            unregistered: Mutex::default(),
            script: Script::default(),
            token_script: Script::default(),
            log: Log::default(),
        });
        let router = Router::new()
            .route("/token", post(token))
            .route("/v1/projects/{project}/messages:send", post(send))
            .with_state(Arc::clone(&state));
        let server = Server::start(router, None).await?;
        *lock(&state.token_uri) = format!("{}/token", server.url());
        Ok(Self { server, state })
    }

    /// Base URL of the API.
    pub fn url(&self) -> String {
        self.server.url()
    }

    /// A service-account JSON key whose `token_uri` points at this fake.
    pub fn service_account_json(&self) -> String {
        json!({
            "type": "service_account",
            "project_id": self.state.project_id,
            "private_key_id": "test-key-1",
            "private_key": TEST_PRIVATE_KEY,
            "client_email": self.state.client_email,
            "client_id": "1",
            "token_uri": *lock(&self.state.token_uri),
        })
        .to_string()
    }

    /// Lifetime of the access tokens issued from now on.
    pub fn set_token_lifetime(&self, seconds: u64) {
        self.state.expires_in.store(seconds, Ordering::SeqCst);
    }

    /// Forgets every issued access token (sends with them get 401).
    pub fn revoke_access_tokens(&self) {
        lock(&self.state.issued).clear();
    }

    /// How many access tokens were requested.
    pub fn token_requests(&self) -> u64 {
        self.state.token_requests.load(Ordering::SeqCst)
    }

    /// Marks a registration token as unregistered (404 `UNREGISTERED`).
    pub fn unregister(&self, token: &str) {
        lock(&self.state.unregistered).insert(token.to_owned());
    }

    /// Scripted replies of the send endpoint (for authenticated, well-formed requests).
    pub fn script(&self) -> &Script {
        &self.state.script
    }

    /// Scripted replies of the token endpoint.
    pub fn token_script(&self) -> &Script {
        &self.state.token_script
    }

    /// Every send request so far.
    pub fn received(&self) -> Vec<FcmRequest> {
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
}

/// A Google API error answer with an `FcmError` detail.
pub fn error_reply(
    status: u16,
    google_status: &str,
    fcm_code: Option<&str>,
    message: &str,
) -> Reply {
    let mut details = Vec::new();
    if let Some(code) = fcm_code {
        details.push(json!({"@type": "type.googleapis.com/google.firebase.fcm.v1.FcmError", "errorCode": code}));
    }
    Reply::json(
        status,
        &json!({"error": {"code": status, "message": message, "status": google_status, "details": details}}),
    )
}

#[derive(Deserialize)]
struct Grant {
    grant_type: String,
    assertion: String,
}

#[derive(Deserialize)]
struct Assertion {
    iss: String,
    scope: String,
}

fn oauth_error(error: &str, description: &str) -> Reply {
    Reply::json(
        400,
        &json!({"error": error, "error_description": description}),
    )
}

async fn token(State(fcm): State<Arc<Fcm>>, Form(grant): Form<Grant>) -> Response {
    fcm.token_requests.fetch_add(1, Ordering::SeqCst);
    if let Some(reply) = fcm.token_script.take() {
        return reply.into_response().await;
    }
    if grant.grant_type != "urn:ietf:params:oauth:grant-type:jwt-bearer" {
        return oauth_error("unsupported_grant_type", "Invalid grant_type")
            .into_response()
            .await;
    }
    let mut validation = Validation::new(Algorithm::RS256);
    validation.set_audience(&[lock(&fcm.token_uri).clone()]);
    validation.set_required_spec_claims(&["exp", "iat", "aud", "iss"]);
    let claims = match jsonwebtoken::decode::<Assertion>(&grant.assertion, &fcm.key, &validation) {
        Ok(data) => data.claims,
        Err(e) => {
            return oauth_error("invalid_grant", &format!("Invalid JWT: {e}"))
                .into_response()
                .await;
        }
    };
    if claims.iss != fcm.client_email {
        return oauth_error("invalid_grant", "Invalid issuer")
            .into_response()
            .await;
    }
    if !claims.scope.split(' ').any(|s| s == SCOPE) {
        return oauth_error("invalid_scope", "Invalid OAuth scope")
            .into_response()
            .await;
    }
    let access_token = format!("ya29.{}", uuid::Uuid::new_v4().simple());
    lock(&fcm.issued).insert(access_token.clone());
    Reply::json(
        200,
        &json!({"access_token": access_token, "expires_in": fcm.expires_in.load(Ordering::SeqCst), "token_type": "Bearer"}),
    )
    .into_response()
    .await
}

async fn send(
    State(fcm): State<Arc<Fcm>>,
    Path(project): Path<String>,
    headers: HeaderMap,
    body: axum::body::Bytes,
) -> Response {
    let bearer = headers
        .get("authorization")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .map(str::to_owned);
    let request: Option<Value> = serde_json::from_slice(&body).ok();
    let message = request
        .as_ref()
        .and_then(|r| r.get("message"))
        .cloned()
        .unwrap_or(Value::Null);
    let reply = answer(&fcm, &project, bearer.as_deref(), &message);
    let status = match &reply {
        Reply::Respond { status, .. } => *status,
        Reply::Hang => 0,
    };
    fcm.log.push(FcmRequest {
        message,
        bearer,
        status,
    });
    fcm.script.latency().await;
    reply.into_response().await
}

fn answer(fcm: &Fcm, project: &str, bearer: Option<&str>, message: &Value) -> Reply {
    if !bearer.is_some_and(|b| lock(&fcm.issued).contains(b)) {
        return error_reply(
            401,
            "UNAUTHENTICATED",
            None,
            "Request had invalid authentication credentials. Expected OAuth 2 access token.",
        );
    }
    if project != fcm.project_id {
        return error_reply(
            403,
            "PERMISSION_DENIED",
            None,
            "Permission denied on the project.",
        );
    }
    let Some(token) = message.get("token").and_then(Value::as_str) else {
        return Reply::json(
            400,
            &json!({"error": {"code": 400, "message": "Recipient of the message is not set.", "status": "INVALID_ARGUMENT",
                "details": [{"@type": "type.googleapis.com/google.rpc.BadRequest", "fieldViolations": [{"field": "message", "description": "Recipient of the message is not set."}]}]}}),
        );
    };
    if let Some(data) = message.get("data").and_then(Value::as_object)
        && let Some((index, _)) = data.values().enumerate().find(|(_, v)| !v.is_string())
    {
        let text = format!("Invalid value at 'message.data[{index}].value' (TYPE_STRING)");
        return Reply::json(
            400,
            &json!({"error": {"code": 400, "message": text, "status": "INVALID_ARGUMENT",
                "details": [{"@type": "type.googleapis.com/google.rpc.BadRequest", "fieldViolations": [{"field": format!("message.data[{index}].value"), "description": text}]}]}}),
        );
    }
    // Reserved data keys and a time to live over four weeks are refused, as FCM does.
    let invalid = |text: String| {
        Reply::json(
            400,
            &json!({"error": {"code": 400, "message": text, "status": "INVALID_ARGUMENT",
                "details": [{"@type": "type.googleapis.com/google.firebase.fcm.v1.FcmError", "errorCode": "INVALID_ARGUMENT"}]}}),
        )
    };
    if let Some(data) = message.get("data").and_then(Value::as_object)
        && let Some(key) = data.keys().find(|k| {
            let k = k.to_ascii_lowercase();
            k == "from" || k == "message_type" || k.starts_with("google") || k.starts_with("gcm")
        })
    {
        return invalid(format!("Invalid data payload key: {key}"));
    }
    if let Some(ttl) = message
        .pointer("/android/ttl")
        .and_then(Value::as_str)
        .and_then(|t| t.strip_suffix('s'))
        .and_then(|t| t.parse::<f64>().ok())
        && !(0.0..=2_419_200.0).contains(&ttl)
    {
        return invalid(format!(
            "Invalid value at 'message.android.ttl' ({ttl}s): TTL must be between 0 and 4 weeks"
        ));
    }
    if let Some(reply) = fcm.script.take() {
        return reply;
    }
    if lock(&fcm.unregistered).contains(token) {
        return error_reply(
            404,
            "NOT_FOUND",
            Some("UNREGISTERED"),
            "Requested entity was not found.",
        );
    }
    let n = fcm.sent.fetch_add(1, Ordering::SeqCst);
    Reply::json(
        200,
        &json!({"name": format!("projects/{project}/messages/0:{n}%fake")}),
    )
}
