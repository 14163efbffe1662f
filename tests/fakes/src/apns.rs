//! A fake APNs: `POST /3/device/<token>` over HTTP/2 with TLS, verifying the provider token
//! (ES256, `kid`, `iss`, not older than an hour) and the headers as Apple documents them,
//! answering `{"reason": …}` errors with Apple's status codes.

use crate::script::{Log, Reply, Script};
use crate::server::Server;
use crate::tls::{TestCa, TlsError};
use axum::Router;
use axum::body::Bytes;
use axum::extract::{Path, State};
use axum::response::Response;
use axum::routing::post;
use http::{HeaderMap, StatusCode, Version};
use jsonwebtoken::{Algorithm, DecodingKey, Validation};
use serde::Deserialize;
use serde_json::{Value, json};
use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::{SystemTime, UNIX_EPOCH};

/// Apple's limit on a payload.
pub const MAX_PAYLOAD: usize = 4096;

/// One request the fake accepted for inspection (valid or not).
#[derive(Debug, Clone)]
pub struct ApnsRequest {
    /// The device token from the path.
    pub device_token: String,
    /// Whether it came over HTTP/2.
    pub http2: bool,
    /// Request headers (lower-case names; `authorization` included).
    pub headers: BTreeMap<String, String>,
    /// The JSON payload (`Null` if not JSON).
    pub payload: Value,
    /// `iat` of a valid provider token.
    pub token_iat: Option<u64>,
    /// What the fake answered, e.g. `200` or `410 Unregistered`.
    pub answer: String,
}

struct Apns {
    team_id: String,
    key_id: String,
    topic: String,
    key: DecodingKey,
    script: Script,
    log: Log<ApnsRequest>,
    unregistered: Mutex<HashSet<String>>,
    tokens_expired_before: Mutex<u64>,
    /// Provider tokens whose signature checked out, with their `iat`. A client reuses one
    /// token for up to an hour, and Apple, too, does not verify the same token's ES256
    /// signature on every request: without this the fake's signature checks (~100 µs of
    /// CPU each) capped a benchmark at a few thousand requests per second.
    verified: Mutex<HashMap<String, u64>>,
}

/// Verified provider tokens remembered (a client holds one, two around a refresh).
const VERIFIED_TOKENS: usize = 16;

/// A running fake APNs.
pub struct ApnsFake {
    server: Server,
    state: Arc<Apns>,
    ca: TestCa,
    p8_pem: String,
}

/// Errors starting a fake.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    /// Certificates or keys.
    #[error(transparent)]
    Tls(#[from] TlsError),
    /// The listener.
    #[error("bind")]
    Io(#[from] std::io::Error),
    /// The key.
    #[error("key")]
    Key(#[from] jsonwebtoken::errors::Error),
}

impl ApnsFake {
    /// Starts a fake APNs for `topic`, with a fresh `.p8` key for team `TEAM123456`, key id
    /// `KEY1234567`.
    ///
    /// # Errors
    /// [`StartError`] when keys, certificates or the listener fail.
    pub async fn start(topic: &str) -> Result<Self, StartError> {
        let key = rcgen::KeyPair::generate().map_err(TlsError::from)?;
        let state = Arc::new(Apns {
            team_id: "TEAM123456".into(),
            key_id: "KEY1234567".into(),
            topic: topic.to_owned(),
            key: DecodingKey::from_ec_pem(key.public_key_pem().as_bytes())?,
            script: Script::default(),
            log: Log::default(),
            unregistered: Mutex::default(),
            tokens_expired_before: Mutex::new(0),
            verified: Mutex::default(),
        });
        let ca = TestCa::new(&[b"h2"])?;
        let router = Router::new()
            .route("/3/device/{token}", post(push))
            .with_state(Arc::clone(&state));
        let server = Server::start(router, Some(ca.server_config())).await?;
        Ok(Self {
            server,
            state,
            ca,
            p8_pem: key.serialize_pem(),
        })
    }

    /// Base URL (`https://127.0.0.1:<port>`).
    pub fn url(&self) -> String {
        self.server.url()
    }

    /// TCP connections accepted so far.
    pub fn connections(&self) -> usize {
        self.server.connections()
    }

    /// The test CA the client must trust.
    pub fn ca_pem(&self) -> &str {
        self.ca.ca_pem()
    }

    /// The `.p8` signing key (PKCS#8 PEM).
    pub fn p8_pem(&self) -> &str {
        &self.p8_pem
    }

    /// Key id expected in the token's `kid`.
    pub fn key_id(&self) -> &str {
        &self.state.key_id
    }

    /// Team id expected in the token's `iss`.
    pub fn team_id(&self) -> &str {
        &self.state.team_id
    }

    /// Scripted replies, given to requests that pass every protocol check.
    pub fn script(&self) -> &Script {
        &self.state.script
    }

    /// Every request so far.
    pub fn received(&self) -> Vec<ApnsRequest> {
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

    /// Marks a device token as unregistered (410 from now on).
    pub fn unregister(&self, device_token: &str) {
        lock(&self.state.unregistered).insert(device_token.to_owned());
    }

    /// From now on, provider tokens issued at or before `iat` are answered 403
    /// `ExpiredProviderToken` — as APNs does with tokens older than an hour.
    pub fn expire_tokens_issued_until(&self, iat: u64) {
        *lock(&self.state.tokens_expired_before) = iat + 1;
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// An APNs error answer.
pub fn error_reply(status: u16, reason: &str) -> Reply {
    let mut body = json!({ "reason": reason });
    if status == 410 {
        body["timestamp"] = json!(now() * 1000);
    }
    Reply::json(status, &body)
}

#[derive(Deserialize)]
struct Claims {
    iss: String,
    iat: u64,
}

fn now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

async fn push(
    State(apns): State<Arc<Apns>>,
    Path(device_token): Path<String>,
    version: Version,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let header_map: BTreeMap<String, String> = headers
        .iter()
        .map(|(k, v)| {
            (
                k.as_str().to_owned(),
                String::from_utf8_lossy(v.as_bytes()).into_owned(),
            )
        })
        .collect();
    let payload = serde_json::from_slice::<Value>(&body).unwrap_or(Value::Null);
    let mut record = ApnsRequest {
        device_token: device_token.clone(),
        http2: version == Version::HTTP_2,
        headers: header_map,
        payload: payload.clone(),
        token_iat: None,
        answer: String::new(),
    };
    let verdict = check(&apns, &mut record, &headers, &body, &payload);
    let reply = match verdict {
        Err((status, reason)) => error_reply(status, reason),
        Ok(()) => match apns.script.take() {
            Some(reply) => reply,
            None if lock(&apns.unregistered).contains(&device_token) => {
                error_reply(410, "Unregistered")
            }
            None => {
                let id = headers
                    .get("apns-id")
                    .and_then(|v| v.to_str().ok())
                    .map(str::to_owned)
                    .unwrap_or_else(|| uuid::Uuid::new_v4().to_string());
                Reply::status(200).header("apns-id", &id)
            }
        },
    };
    record.answer = match &reply {
        Reply::Respond { status, body, .. } => {
            format!("{status} {}", String::from_utf8_lossy(body))
        }
        Reply::Hang => "hang".into(),
    };
    apns.log.push(record);
    apns.script.latency().await;
    reply.into_response().await
}

/// Apple's checks, in the order its documentation lists the reasons.
fn check(
    apns: &Apns,
    record: &mut ApnsRequest,
    headers: &HeaderMap,
    body: &[u8],
    payload: &Value,
) -> Result<(), (u16, &'static str)> {
    if !record.http2 {
        return Err((StatusCode::HTTP_VERSION_NOT_SUPPORTED.as_u16(), "BadPath"));
    }
    let header = |name: &str| headers.get(name).and_then(|v| v.to_str().ok());
    let Some(jwt) = header("authorization").and_then(|a| a.strip_prefix("bearer ")) else {
        return Err((403, "MissingProviderToken"));
    };
    let cached = lock(&apns.verified).get(jwt).copied();
    let iat = match cached {
        Some(iat) => iat,
        None => {
            let iat = verify_token(apns, jwt)?;
            let mut verified = lock(&apns.verified);
            if verified.len() >= VERIFIED_TOKENS {
                verified.clear();
            }
            verified.insert(jwt.to_owned(), iat);
            iat
        }
    };
    if iat + 3600 < now() || iat < *lock(&apns.tokens_expired_before) {
        return Err((403, "ExpiredProviderToken"));
    }
    record.token_iat = Some(iat);
    match header("apns-topic") {
        None => return Err((400, "MissingTopic")),
        Some(t) if t != apns.topic => return Err((400, "TopicDisallowed")),
        Some(_) => {}
    }
    if !matches!(
        header("apns-push-type"),
        Some(
            "alert"
                | "background"
                | "voip"
                | "complication"
                | "fileprovider"
                | "mdm"
                | "liveactivity"
        )
    ) {
        return Err((400, "InvalidPushType"));
    }
    if header("apns-id").is_some_and(|id| uuid::Uuid::parse_str(id).is_err()) {
        return Err((400, "BadMessageId"));
    }
    if header("apns-priority").is_some_and(|p| !matches!(p, "10" | "5" | "1")) {
        return Err((400, "BadPriority"));
    }
    if header("apns-expiration").is_some_and(|e| e.parse::<u64>().is_err()) {
        return Err((400, "BadExpirationDate"));
    }
    if header("apns-collapse-id").is_some_and(|c| c.len() > 64) {
        return Err((400, "BadCollapseId"));
    }
    if record.device_token.is_empty() || !record.device_token.bytes().all(|b| b.is_ascii_hexdigit())
    {
        return Err((400, "BadDeviceToken"));
    }
    if body.is_empty() {
        return Err((400, "PayloadEmpty"));
    }
    if body.len() > MAX_PAYLOAD {
        return Err((413, "PayloadTooLarge"));
    }
    if !payload.get("aps").is_some_and(Value::is_object) {
        return Err((400, "PayloadEmpty"));
    }
    Ok(())
}

/// Checks a provider token's header, ES256 signature and issuer; returns its `iat`.
fn verify_token(apns: &Apns, jwt: &str) -> Result<u64, (u16, &'static str)> {
    let jwt_header = jsonwebtoken::decode_header(jwt).map_err(|_| (403, "InvalidProviderToken"))?;
    if jwt_header.alg != Algorithm::ES256 || jwt_header.kid.as_deref() != Some(apns.key_id.as_str())
    {
        return Err((403, "InvalidProviderToken"));
    }
    let mut validation = Validation::new(Algorithm::ES256);
    validation.required_spec_claims = HashSet::from(["iss".to_owned()]);
    validation.validate_exp = false;
    validation.set_issuer(&[apns.team_id.as_str()]);
    let claims = jsonwebtoken::decode::<Claims>(jwt, &apns.key, &validation)
        .map_err(|_| (403, "InvalidProviderToken"))?
        .claims;
    if claims.iss != apns.team_id {
        return Err((403, "InvalidProviderToken"));
    }
    Ok(claims.iat)
}
