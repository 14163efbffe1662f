//! Firebase Cloud Messaging through the HTTP v1 API (`POST
//! /v1/projects/{project}/messages:send`), for Android and web (webpush) tokens.
//!
//! Not the legacy API (server keys, `fcm.googleapis.com/fcm/send`), which Google has shut
//! down — and which is all the `fcm` crate speaks. Authentication is an OAuth2 bearer token
//! obtained from a service-account key ([`oauth`]); the message JSON is small enough to
//! build here. FCM `data` values must be strings, so non-string data values are sent as
//! their JSON text.

pub mod oauth;

use crate::http::{self, HttpOptions, SetupError};
use crate::{Delivery, Platform, Provider, SendError, Sent, Target};
use herald_protocol::{Channel, Priority};
use oauth::{AccessTokens, ServiceAccount};
use serde::Deserialize;
use serde_json::{Map, Value, json};
use time::OffsetDateTime;

/// Google's endpoint.
pub const PRODUCTION_URL: &str = "https://fcm.googleapis.com";

/// What the FCM provider needs.
#[derive(Debug, Clone)]
pub struct FcmConfig {
    /// Base URL ([`PRODUCTION_URL`] or a fake).
    pub base_url: String,
    /// The parsed service-account key (its `token_uri` is used as is).
    pub service_account: ServiceAccount,
    /// Timeout and trust roots (used for the token endpoint too).
    pub http: HttpOptions,
}

/// Sends to Android and web push tokens through FCM.
pub struct FcmProvider {
    client: reqwest::Client,
    send_url: String,
    tokens: AccessTokens,
}

impl FcmProvider {
    /// Builds the provider.
    ///
    /// # Errors
    /// [`SetupError`] for a bad key, URL or trust root.
    pub fn new(config: &FcmConfig) -> Result<Self, SetupError> {
        let base = http::base_url("FCM URL", &config.base_url)?;
        let tokens = AccessTokens::new(config.service_account.clone())?;
        Ok(Self {
            client: http::client(&config.http, false)?,
            send_url: format!("{base}/v1/projects/{}/messages:send", tokens.project_id()),
            tokens,
        })
    }
}

/// FCM's longest time to live (4 weeks); a longer one is refused as `INVALID_ARGUMENT`.
pub const MAX_TTL_SECONDS: i64 = 2_419_200;

/// A `data` key as FCM takes it: `from`, `message_type` and keys starting with `google`
/// or `gcm` are reserved (FCM refuses the whole message), so they are sent prefixed with
/// `herald_`; every other key as it is.
pub fn data_key(key: &str) -> String {
    let lower = key.to_ascii_lowercase();
    if lower == "from"
        || lower == "message_type"
        || lower.starts_with("google")
        || lower.starts_with("gcm")
    {
        format!("herald_{key}")
    } else {
        key.to_owned()
    }
}

/// The `{"message": ...}` body for one token; the notification's body shortened so the
/// message fits FCM's 4 KiB.
pub fn message(delivery: &Delivery, platform: Platform, token: &str) -> Value {
    if crate::delivery::surely_fits(delivery) {
        return message_with(delivery, delivery.body.as_deref(), platform, token);
    }
    crate::delivery::fit_body(
        delivery.body.as_deref(),
        crate::delivery::MAX_PUSH_PAYLOAD,
        |body| message_with(delivery, body, platform, token),
    )
}

fn message_with(delivery: &Delivery, body: Option<&str>, platform: Platform, token: &str) -> Value {
    let mut notification = Map::new();
    if let Some(title) = &delivery.title {
        notification.insert("title".into(), json!(title));
    }
    if let Some(body) = body {
        notification.insert("body".into(), json!(body));
    }
    let data: Map<String, Value> = delivery
        .data
        .iter()
        .map(|(k, v)| {
            let text = match v {
                Value::String(s) => s.clone(),
                other => other.to_string(),
            };
            (data_key(k), Value::String(text))
        })
        .collect();
    let ttl = delivery.expires_at.map(|at| {
        (at - OffsetDateTime::now_utc())
            .whole_seconds()
            .clamp(0, MAX_TTL_SECONDS)
    });
    let high = delivery.priority == Priority::High;
    let mut message = Map::new();
    message.insert("token".into(), json!(token));
    message.insert("notification".into(), Value::Object(notification.clone()));
    if !data.is_empty() {
        message.insert("data".into(), Value::Object(data));
    }
    match platform {
        Platform::Web => {
            let mut headers = Map::new();
            headers.insert(
                "Urgency".into(),
                json!(if high { "high" } else { "normal" }),
            );
            if let Some(ttl) = ttl {
                headers.insert("TTL".into(), json!(ttl.to_string()));
            }
            if let Some(topic) = &delivery.collapse_key {
                // Web Push topics are at most 32 URL-safe base64 characters (RFC 8030).
                let topic = crate::delivery::collapse_id(topic, 32, |c| {
                    c.is_ascii_alphanumeric() || c == '-' || c == '_'
                });
                headers.insert("Topic".into(), json!(topic));
            }
            message.insert(
                "webpush".into(),
                json!({ "headers": headers, "notification": notification }),
            );
        }
        Platform::Android | Platform::Ios => {
            let mut android = Map::new();
            android.insert(
                "priority".into(),
                json!(if high { "HIGH" } else { "NORMAL" }),
            );
            if let Some(key) = &delivery.collapse_key {
                android.insert("collapse_key".into(), json!(key));
            }
            if let Some(ttl) = ttl {
                android.insert("ttl".into(), json!(format!("{ttl}s")));
            }
            message.insert("android".into(), Value::Object(android));
        }
    }
    json!({ "message": message })
}

#[derive(Deserialize)]
struct SendAnswer {
    name: String,
}

#[derive(Deserialize)]
struct ErrorAnswer {
    error: GoogleError,
}

#[derive(Deserialize)]
struct GoogleError {
    #[serde(default)]
    message: String,
    #[serde(default)]
    status: String,
    #[serde(default)]
    details: Vec<ErrorDetail>,
}

#[derive(Deserialize)]
struct ErrorDetail {
    #[serde(rename = "errorCode")]
    error_code: Option<String>,
    #[serde(rename = "fieldViolations", default)]
    field_violations: Vec<FieldViolation>,
}

#[derive(Deserialize)]
struct FieldViolation {
    #[serde(default)]
    field: String,
}

#[async_trait::async_trait]
impl Provider for FcmProvider {
    fn name(&self) -> &str {
        "fcm"
    }

    fn channel(&self) -> Channel {
        Channel::Push
    }

    fn accepts(&self, target: &Target) -> bool {
        matches!(
            target,
            Target::Device {
                platform: Platform::Android | Platform::Web,
                ..
            }
        )
    }

    async fn send(&self, delivery: &Delivery) -> Result<Sent, SendError> {
        let (platform, device) = match &delivery.target {
            Target::Device {
                platform: platform @ (Platform::Android | Platform::Web),
                token,
            } => (*platform, token),
            other => {
                return Err(SendError::Permanent {
                    detail: format!("fcm: cannot deliver to {}", other.key()),
                });
            }
        };
        if device.is_empty() {
            return Err(SendError::InvalidTarget {
                detail: "fcm: empty registration token".into(),
            });
        }
        let bearer = self.tokens.current(&self.client).await?;
        let response = self
            .client
            .post(&self.send_url)
            .bearer_auth(&bearer)
            .json(&message(delivery, platform, device))
            .send()
            .await
            .map_err(|e| http::transport("fcm", &e))?;
        let status = response.status().as_u16();
        let headers = response.headers().clone();
        let body = http::body_prefix(response)
            .await
            .map_err(|e| http::transport("fcm", &e))?;
        if (200..300).contains(&status) {
            let answer: SendAnswer = serde_json::from_slice(&body)
                .map_err(|_| http::unreadable_success("fcm", status, &body))?;
            return Ok(Sent {
                provider_message_id: Some(answer.name),
            });
        }
        let error = classify(status, &headers, &body);
        // A 401 about our access token (retried) gets a fresh one; the permanent one,
        // `THIRD_PARTY_AUTH_ERROR`, is about the project's APNs or web push key, which a
        // new access token does not change.
        if status == 401 && !matches!(error, SendError::Permanent { .. }) {
            self.tokens.discard(&bearer).await;
        }
        Err(error)
    }
}

/// Maps an FCM v1 error answer to its class, by `details[].errorCode`, then `status`.
fn classify(status: u16, headers: &reqwest::header::HeaderMap, body: &[u8]) -> SendError {
    let Ok(ErrorAnswer { error }) = serde_json::from_slice::<ErrorAnswer>(body) else {
        return match status {
            401 => SendError::transient(format!(
                "fcm: 401 (access token refreshed): {}",
                http::body_text(body)
            )),
            _ => http::by_status("fcm", status, headers, body),
        };
    };
    let code = error
        .details
        .iter()
        .find_map(|d| d.error_code.clone())
        .unwrap_or_else(|| error.status.clone());
    let detail = format!("fcm: {status} {code}: {}", http::shorten(&error.message));
    let token_field = error
        .details
        .iter()
        .flat_map(|d| &d.field_violations)
        .any(|v| v.field == "message.token");
    match code.as_str() {
        "UNREGISTERED" => SendError::InvalidTarget { detail },
        // The token is another Firebase project's than our service account's: a user's
        // wrong token, or our configuration if every push fails so. One user's data must
        // not open the circuit for everyone: this message fails, the token stays.
        "SENDER_ID_MISMATCH" => SendError::Permanent {
            detail: format!(
                "{detail} (this token is another Firebase project's; if every push fails \
                 so, HERALD_FCM_CREDENTIALS names the wrong project)"
            ),
        },
        "INVALID_ARGUMENT"
            if token_field || error.message.to_lowercase().contains("registration token") =>
        {
            SendError::InvalidTarget { detail }
        }
        // The rate of messages to one device: that device's job waits, every other
        // device is still sent to. Any other quota is the project's.
        "QUOTA_EXCEEDED" if error.message.to_lowercase().contains("device") => {
            SendError::target_throttled(http::retry_after(headers), detail)
        }
        "QUOTA_EXCEEDED" | "RESOURCE_EXHAUSTED" => SendError::Throttled {
            retry_after: http::retry_after(headers),
            detail,
        },
        // FCM's documentation: on 500 and 503, honour `Retry-After` when it is given.
        "UNAVAILABLE" | "INTERNAL" => SendError::Transient {
            detail,
            retry_after: http::retry_after(headers),
        },
        // A bad APNs certificate or web-push key on the Firebase project: configuration of
        // that platform only. Not counted against FCM's circuit, which Android shares.
        "THIRD_PARTY_AUTH_ERROR" => SendError::Permanent {
            detail: format!(
                "{detail} (the Firebase project's APNs or web push key is refused: fix it in the Firebase console, then retry from the DLQ)"
            ),
        },
        _ if status == 401 => SendError::transient(format!("{detail} (access token refreshed)")),
        _ => http::class_for(status, headers, detail),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn data_values_become_strings() {
        let mut delivery = crate::testing::delivery(Target::Device {
            platform: Platform::Android,
            token: "t".into(),
        });
        delivery.data.insert("n".into(), json!(3));
        delivery.data.insert("s".into(), json!("x"));
        let body = message(&delivery, Platform::Android, "t");
        assert_eq!(body["message"]["data"], json!({"n": "3", "s": "x"}));
        assert_eq!(body["message"]["android"]["priority"], json!("NORMAL"));
        // Four weeks at most, however far the notification's expiry.
        delivery.expires_at = Some(OffsetDateTime::now_utc() + time::Duration::days(30));
        let far = message(&delivery, Platform::Android, "t");
        assert_eq!(far["message"]["android"]["ttl"], json!("2419200s"));
        let web = message(&delivery, Platform::Web, "t");
        assert_eq!(
            web["message"]["webpush"]["notification"]["title"],
            json!("Hello")
        );
    }

    #[test]
    fn a_long_body_is_shortened_to_fit_4_kib() {
        let mut delivery = crate::testing::delivery(Target::Device {
            platform: Platform::Web,
            token: "t".into(),
        });
        delivery.body = Some("ü".repeat(8000));
        for platform in [Platform::Web, Platform::Android] {
            let m = message(&delivery, platform, "t");
            let size = serde_json::to_vec(&m).expect("json").len();
            assert!(size <= 4096, "{platform:?}: {size}");
            let body = m["message"]["notification"]["body"].as_str().expect("body");
            assert!(body.ends_with('…'), "{platform:?}");
        }
    }

    #[test]
    fn a_device_message_rate_is_that_devices_throttle_a_quota_the_projects() {
        let h = reqwest::header::HeaderMap::new();
        let answer = |message: &str| {
            let body = json!({"error": {"code": 429, "message": message, "status": "RESOURCE_EXHAUSTED",
                "details": [{"@type": "type.googleapis.com/google.firebase.fcm.v1.FcmError", "errorCode": "QUOTA_EXCEEDED"}]}});
            classify(429, &h, body.to_string().as_bytes())
        };
        assert!(answer("Device message rate exceeded.").throttles_one_target());
        let project = answer("Quota exceeded for quota metric 'Send requests'");
        assert!(matches!(project, SendError::Throttled { .. }));
        assert!(!project.throttles_one_target());
    }

    #[test]
    fn invalid_argument_is_the_token_only_when_it_says_so() {
        let h = reqwest::header::HeaderMap::new();
        let token = br#"{"error":{"code":400,"message":"The registration token is not a valid FCM registration token","status":"INVALID_ARGUMENT","details":[{"@type":"type.googleapis.com/google.firebase.fcm.v1.FcmError","errorCode":"INVALID_ARGUMENT"}]}}"#;
        assert!(matches!(
            classify(400, &h, token),
            SendError::InvalidTarget { .. }
        ));
        let data = br#"{"error":{"code":400,"message":"Invalid value at 'message.data[0].value' (TYPE_STRING), 12","status":"INVALID_ARGUMENT","details":[{"@type":"type.googleapis.com/google.rpc.BadRequest","fieldViolations":[{"field":"message.data[0].value","description":"x"}]}]}}"#;
        assert!(matches!(
            classify(400, &h, data),
            SendError::Permanent { .. }
        ));
    }
}
