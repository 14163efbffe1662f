//! Signed webhooks: the notification as JSON, `POST`ed to the target URL, with an
//! HMAC-SHA256 signature over the timestamp and body ([`signature`] documents the scheme
//! and has the verification a receiver needs).
//!
//! Answers: 2xx delivered; 410 Gone means the endpoint is retired (invalid target); 429
//! throttled (honouring `Retry-After`); 408, 5xx and timeouts transient; redirects and other
//! 4xx permanent (redirects are not followed: the signed request goes where it was told).
//! A success's body is never read, an error's only its first 64 KiB ([`http::body_prefix`]):
//! the URL is a tenant's, and so is whatever its server streams back.

pub mod signature;

use crate::http::{self, HttpOptions, SetupError};
use crate::{Delivery, Provider, SendError, Sent, Target};
use herald_protocol::{Channel, Priority};
use serde::Serialize;
use serde_json::{Map, Value};
use std::time::{SystemTime, UNIX_EPOCH};

/// What the webhook provider needs.
#[derive(Debug, Clone)]
pub struct WebhookConfig {
    /// The shared signing secret.
    pub secret: String,
    /// Timeout and trust roots.
    pub http: HttpOptions,
}

/// Delivers signed webhooks.
pub struct WebhookProvider {
    client: reqwest::Client,
    secret: Vec<u8>,
}

impl WebhookProvider {
    /// Builds the provider.
    ///
    /// # Errors
    /// [`SetupError`] for an empty secret or a bad trust root.
    pub fn new(config: &WebhookConfig) -> Result<Self, SetupError> {
        if config.secret.len() < 16 {
            return Err(SetupError::Invalid {
                what: "webhook secret",
                reason: "must be at least 16 bytes".into(),
            });
        }
        Ok(Self {
            client: http::client(&config.http, false)?,
            secret: config.secret.as_bytes().to_vec(),
        })
    }
}

/// The JSON a webhook receives: the notification object of the public contract.
#[derive(Debug, Serialize)]
pub struct WebhookBody<'a> {
    /// Notification id.
    pub id: &'a str,
    /// Inbox position.
    pub seq: u64,
    /// Recipient.
    pub user_id: &'a str,
    /// Category.
    pub category: Option<&'a str>,
    /// Priority.
    pub priority: Priority,
    /// Title.
    pub title: Option<&'a str>,
    /// Body.
    pub body: Option<&'a str>,
    /// Data.
    pub data: &'a Map<String, Value>,
    /// Collapse key.
    pub collapse_key: Option<&'a str>,
}

impl<'a> From<&'a Delivery> for WebhookBody<'a> {
    fn from(d: &'a Delivery) -> Self {
        Self {
            id: &d.id,
            seq: d.seq,
            user_id: d.user_id.as_str(),
            category: d.category.as_deref(),
            priority: d.priority,
            title: d.title.as_deref(),
            body: d.body.as_deref(),
            data: &d.data,
            collapse_key: d.collapse_key.as_deref(),
        }
    }
}

#[async_trait::async_trait]
impl Provider for WebhookProvider {
    fn name(&self) -> &str {
        "webhook"
    }

    fn channel(&self) -> Channel {
        Channel::Webhook
    }

    fn accepts(&self, target: &Target) -> bool {
        matches!(target, Target::Webhook { .. })
    }

    /// Every producer's receiver at once: one receiver's trouble is its own.
    fn health_is_shared(&self) -> bool {
        false
    }

    async fn send(&self, delivery: &Delivery) -> Result<Sent, SendError> {
        let Target::Webhook { url } = &delivery.target else {
            return Err(SendError::Permanent {
                detail: format!("webhook: cannot deliver to {}", delivery.target.key()),
            });
        };
        let url = match reqwest::Url::parse(url) {
            Ok(u) if matches!(u.scheme(), "http" | "https") && u.host().is_some() => u,
            _ => {
                return Err(SendError::InvalidTarget {
                    detail: "webhook: the target is not an http(s) URL".into(),
                });
            }
        };
        let body =
            serde_json::to_vec(&WebhookBody::from(delivery)).map_err(|e| SendError::Permanent {
                detail: format!("webhook: cannot encode the notification: {e}"),
            })?;
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or(0);
        let timestamp = i64::try_from(now).unwrap_or(i64::MAX);
        let response = self
            .client
            .post(url)
            .header(reqwest::header::CONTENT_TYPE, "application/json")
            .header(
                signature::SIGNATURE_HEADER,
                signature::sign(&self.secret, timestamp, &body),
            )
            .header(signature::ID_HEADER, &delivery.id)
            .body(body)
            .send()
            .await
            .map_err(|e| http::transport("webhook", &e))?;
        let status = response.status().as_u16();
        if (200..300).contains(&status) {
            return Ok(Sent {
                provider_message_id: None,
            });
        }
        let headers = response.headers().clone();
        // The receiver is a tenant's: never more than a bounded prefix of its answer.
        let body = http::body_prefix(response).await.unwrap_or_default();
        Err(match status {
            410 => SendError::InvalidTarget {
                detail: format!("webhook: 410 Gone: {}", http::body_text(&body)),
            },
            // One receiver's refusal (of our signature, say) is that receiver's: it must
            // not open the circuit every other receiver's webhooks go through.
            401 | 403 => SendError::Permanent {
                detail: format!("webhook: {status}: {}", http::body_text(&body)),
            },
            _ => http::by_status("webhook", status, &headers, &body),
        })
    }
}
