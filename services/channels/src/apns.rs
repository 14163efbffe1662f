//! Apple Push Notification service over HTTP/2 with token (`.p8`) authentication.
//!
//! Why not the `a2` crate: its endpoints are hard-coded to Apple's hosts, so it cannot be
//! pointed at a local fake, and APNs behaviour we must prove (expired provider tokens,
//! 410 `Unregistered`, 429) would go untested. The wire protocol is small — one `POST
//! /3/device/<token>` with a handful of headers and a JSON body — so we build the payload
//! ourselves with serde and send it with reqwest forced to HTTP/2 (ALPN `h2` over TLS, as
//! APNs requires), which also gives us connection reuse (one multiplexed connection),
//! timeouts and extra trust roots for a test CA. Pulling a2 in only for its payload types
//! would add a second HTTP stack (hyper-based) we do not use.
//!
//! Provider tokens are ES256 JWTs (`iss` = team id, `kid` = key id) cached and replaced
//! every 50 minutes ([`token`]). `apns-id` is the notification id (a UUID; a non-UUID id is
//! mapped to a stable UUIDv5 so retries keep one id).

pub mod token;

use crate::http::{self, HttpOptions, SetupError};
use crate::{Delivery, Platform, Provider, SendError, Sent, Target};
use herald_protocol::{Channel, Priority};
use serde::Deserialize;
use serde_json::{Map, Value, json};
use time::OffsetDateTime;
use token::ProviderTokens;
use uuid::Uuid;

/// Apple's production endpoint.
pub const PRODUCTION_URL: &str = "https://api.push.apple.com";
/// Apple's development (sandbox) endpoint.
pub const SANDBOX_URL: &str = "https://api.sandbox.push.apple.com";

/// Namespace for UUIDv5 ids derived from non-UUID notification ids.
const ID_NAMESPACE: Uuid = Uuid::from_u128(0x6a1d_5c1e_8f0b_4b7e_9a55_3d2c_0e4f_a7b1);

/// What the APNs provider needs.
#[derive(Debug, Clone)]
pub struct ApnsConfig {
    /// Base URL ([`PRODUCTION_URL`], [`SANDBOX_URL`], or a fake).
    pub base_url: String,
    /// Contents of the `.p8` key file.
    pub key_pem: Vec<u8>,
    /// The key's 10-character id (`kid`).
    pub key_id: String,
    /// The Apple developer team id (`iss`).
    pub team_id: String,
    /// The app's bundle id (`apns-topic`).
    pub topic: String,
    /// Timeout and trust roots.
    pub http: HttpOptions,
}

/// Sends to iOS device tokens through APNs.
pub struct ApnsProvider {
    /// Several HTTP/2 connections, the next used only when one is busy.
    clients: http::spread::Spread,
    base_url: String,
    topic: String,
    tokens: ProviderTokens,
}

impl ApnsProvider {
    /// Builds the provider: parses the key and signs a first token.
    ///
    /// # Errors
    /// [`SetupError`] for a bad key, base URL or trust root.
    pub fn new(config: &ApnsConfig) -> Result<Self, SetupError> {
        Ok(Self {
            clients: http::spread::Spread::new(|| http::client(&config.http, true))?,
            base_url: http::base_url("APNs URL", &config.base_url)?,
            topic: config.topic.clone(),
            tokens: ProviderTokens::new(&config.key_pem, &config.key_id, &config.team_id)?,
        })
    }
}

/// The JSON body: `aps.alert` from title/body, the notification's data beside it; the
/// body shortened to fit APNs' 4 KiB.
pub fn payload(delivery: &Delivery) -> Value {
    if crate::delivery::surely_fits(delivery) {
        return payload_with(delivery, delivery.body.as_deref());
    }
    crate::delivery::fit_body(
        delivery.body.as_deref(),
        crate::delivery::MAX_PUSH_PAYLOAD,
        |body| payload_with(delivery, body),
    )
}

fn payload_with(delivery: &Delivery, body: Option<&str>) -> Value {
    let mut alert = Map::new();
    if let Some(title) = &delivery.title {
        alert.insert("title".into(), Value::String(title.clone()));
    }
    if let Some(body) = body {
        alert.insert("body".into(), Value::String(body.to_owned()));
    }
    let mut root = Map::new();
    for (key, value) in &delivery.data {
        // `aps` is Apple's; data cannot override it.
        if key != "aps" {
            root.insert(key.clone(), value.clone());
        }
    }
    root.insert("aps".into(), json!({ "alert": alert }));
    Value::Object(root)
}

/// The `apns-id` for a notification id.
pub fn apns_id(id: &str) -> Uuid {
    Uuid::parse_str(id).unwrap_or_else(|_| Uuid::new_v5(&ID_NAMESPACE, id.as_bytes()))
}

/// An APNs device token is hex; anything else cannot be one (and must not reach the path).
fn device_token(target: &Target) -> Result<&str, SendError> {
    match target {
        Target::Device {
            platform: Platform::Ios,
            token,
        } if !token.is_empty()
            && token.len() <= 200
            && token.bytes().all(|b| b.is_ascii_hexdigit()) =>
        {
            Ok(token)
        }
        Target::Device {
            platform: Platform::Ios,
            ..
        } => Err(SendError::InvalidTarget {
            detail: "apns: a device token is a non-empty hex string".into(),
        }),
        other => Err(SendError::Permanent {
            detail: format!("apns: cannot deliver to {}", other.key()),
        }),
    }
}

#[derive(Deserialize)]
struct ErrorBody {
    reason: String,
}

#[async_trait::async_trait]
impl Provider for ApnsProvider {
    fn name(&self) -> &str {
        "apns"
    }

    fn channel(&self) -> Channel {
        Channel::Push
    }

    fn accepts(&self, target: &Target) -> bool {
        matches!(
            target,
            Target::Device {
                platform: Platform::Ios,
                ..
            }
        )
    }

    async fn send(&self, delivery: &Delivery) -> Result<Sent, SendError> {
        let device = device_token(&delivery.target)?;
        let jwt = self.tokens.current().map_err(|e| SendError::Permanent {
            detail: format!("apns: {e}"),
        })?;
        let id = apns_id(&delivery.id);
        let priority = if delivery.priority == Priority::High {
            "10"
        } else {
            "5"
        };
        let slot = self.clients.slot();
        let mut request = slot
            .client()
            .post(format!("{}/3/device/{device}", self.base_url))
            .header("authorization", format!("bearer {jwt}"))
            .header("apns-push-type", "alert")
            .header("apns-priority", priority)
            .header("apns-topic", &self.topic)
            .header("apns-id", id.to_string())
            .json(&payload(delivery));
        if let Some(collapse) = &delivery.collapse_key {
            let id = crate::delivery::collapse_id(collapse, 64, |c| c.is_ascii_graphic());
            request = request.header("apns-collapse-id", id);
        }
        if let Some(expires) = delivery.expires_at {
            let at = expires
                .unix_timestamp()
                .max(OffsetDateTime::now_utc().unix_timestamp());
            request = request.header("apns-expiration", at.to_string());
        }
        let response = request
            .send()
            .await
            .map_err(|e| http::transport("apns", &e))?;
        let status = response.status().as_u16();
        let echoed_id = response
            .headers()
            .get("apns-id")
            .and_then(|v| v.to_str().ok())
            .map(str::to_owned);
        let headers = response.headers().clone();
        let body = http::body_prefix(response)
            .await
            .map_err(|e| http::transport("apns", &e))?;
        if status == 200 {
            return Ok(Sent {
                provider_message_id: Some(echoed_id.unwrap_or_else(|| id.to_string())),
            });
        }
        let reason = serde_json::from_slice::<ErrorBody>(&body)
            .ok()
            .map(|e| e.reason);
        let error = classify(status, reason.as_deref(), &headers, &body);
        if reason.as_deref() == Some("ExpiredProviderToken") {
            self.tokens.discard(&jwt);
        }
        Err(error)
    }
}

/// Maps an APNs error answer to its class.
fn classify(
    status: u16,
    reason: Option<&str>,
    headers: &reqwest::header::HeaderMap,
    body: &[u8],
) -> SendError {
    let Some(reason) = reason else {
        return http::by_status("apns", status, headers, body);
    };
    let detail = format!("apns: {status} {reason}");
    match (status, reason) {
        (410, _) => SendError::InvalidTarget { detail },
        // Also what APNs answers for a token of the other environment (a sandbox token
        // sent to production, or the other way round): a setup error would otherwise
        // remove every user's token. Refused for this message, the token kept.
        (400, "BadDeviceToken") => SendError::Permanent { detail },
        // The token is another app's (a user registered a wrong one). One user's data must
        // not open the circuit for everyone, so like `BadDeviceToken`: this message fails,
        // the token stays. Every push failing so means the topic is wrong.
        (400, "DeviceTokenNotForTopic") => SendError::Permanent {
            detail: format!(
                "{detail} (this token is another app's; if every iOS push fails so, \
                 HERALD_APNS_TOPIC is wrong)"
            ),
        },
        // The topic itself (bundle id): our configuration, counted by the circuit.
        (400, "TopicDisallowed" | "BadTopic" | "MissingTopic") => {
            http::configuration_refused(detail, "HERALD_APNS_TOPIC")
        }
        // "Too many requests were made consecutively to the same device token": that
        // device's job waits, every other device is still pushed to.
        (429, "TooManyRequests") => SendError::target_throttled(http::retry_after(headers), detail),
        // `TooManyProviderTokenUpdates` and the like: about our account.
        (429, _) => SendError::Throttled {
            retry_after: http::retry_after(headers),
            detail,
        },
        // The token is re-signed on the next send; the message itself was fine.
        (403, "ExpiredProviderToken") => SendError::transient(detail),
        // Our key, team or certificate: every message fails alike (see
        // `http::credentials_refused`).
        (
            403,
            "InvalidProviderToken"
            | "MissingProviderToken"
            | "BadCertificate"
            | "BadCertificateEnvironment"
            | "Forbidden",
        ) => http::credentials_refused(detail),
        // APNs 503 `ServiceUnavailable`, 500 `InternalServerError`.
        (500..=599, _) => SendError::Transient {
            detail,
            retry_after: http::retry_after(headers),
        },
        _ => SendError::Permanent { detail },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_long_body_is_shortened_to_fit_4_kib() {
        let mut delivery = crate::testing::delivery(Target::Device {
            platform: Platform::Ios,
            token: "ab".into(),
        });
        delivery.body = Some("é\"x".repeat(4000));
        let p = payload(&delivery);
        let size = serde_json::to_vec(&p).expect("json").len();
        assert!(size <= 4096, "{size}");
        let body = p["aps"]["alert"]["body"].as_str().expect("body");
        assert!(body.ends_with('…') && body.len() > 1000, "{}", body.len());
        delivery.body = Some("short".into());
        assert_eq!(payload(&delivery)["aps"]["alert"]["body"], "short");
    }

    #[test]
    fn payload_keeps_aps_to_apple() {
        let mut data = Map::new();
        data.insert("aps".into(), json!({"badge": 99}));
        data.insert("photo".into(), json!("9"));
        let delivery = crate::testing::delivery(Target::Device {
            platform: Platform::Ios,
            token: "ab".into(),
        });
        let delivery = Delivery { data, ..delivery };
        let body = payload(&delivery);
        assert_eq!(
            body["aps"],
            json!({"alert": {"title": "Hello", "body": "World"}})
        );
        assert_eq!(body["photo"], json!("9"));
    }

    #[test]
    fn ids_are_uuids_and_stable() {
        let uuid = "0195f5a2-7c1e-7d3a-9b1e-2f6a1c3d4e5f";
        assert_eq!(apns_id(uuid).to_string(), uuid);
        assert_eq!(apns_id("not-a-uuid"), apns_id("not-a-uuid"));
        assert_ne!(apns_id("a"), apns_id("b"));
    }

    #[test]
    fn reasons_map_to_classes() {
        let h = reqwest::header::HeaderMap::new();
        let class = |s, r| classify(s, Some(r), &h, b"");
        assert!(matches!(
            class(400, "BadDeviceToken"),
            SendError::Permanent { .. }
        ));
        assert!(matches!(
            class(410, "Unregistered"),
            SendError::InvalidTarget { .. }
        ));
        assert!(class(429, "TooManyRequests").throttles_one_target());
        let account = class(429, "TooManyProviderTokenUpdates");
        assert!(matches!(account, SendError::Throttled { .. }));
        assert!(!account.throttles_one_target());
        assert!(matches!(
            class(403, "ExpiredProviderToken"),
            SendError::Transient { .. }
        ));
        assert!(matches!(
            class(503, "ServiceUnavailable"),
            SendError::Transient { .. }
        ));
        assert!(matches!(
            class(400, "PayloadEmpty"),
            SendError::Permanent { .. }
        ));
        // Our credentials, not the message: the provider's circuit counts it.
        assert!(matches!(
            class(403, "InvalidProviderToken"),
            SendError::Transient { .. }
        ));
    }
}
