//! SMS through Vonage's (Nexmo's) SMS API: `POST /sms/json` with a JSON body carrying
//! `api_key`/`api_secret`, answered 200 with a per-part `status` code — a different shape
//! from Twilio's, which is why it is the second SMS provider for failover.
//!
//! Status codes (Vonage "SMS API errors"): 0 accepted; 1 throttled and 10 too many binds
//! → throttled; 5 internal error and 9 out of credit → transient (so the circuit opens and
//! traffic fails over); 4 invalid credentials, 8 account barred, 14 invalid signature → our
//! credentials refused; 11 account not enabled for this API, 15 invalid sender address,
//! 32 signature required instead of the secret → our configuration refused (both transient:
//! every message fails alike, so the circuit counts them and the channel fails over);
//! 6 unroutable prefix, 7 barred number, 33 deactivated number → invalid target;
//! everything else (bad parameters, a text too long) → permanent.

use crate::http::{self, HttpOptions, SetupError};
use crate::{Delivery, Provider, SendError, Sent, Target, sms};
use herald_protocol::Channel;
use serde::{Deserialize, Deserializer, Serialize};

/// Vonage's endpoint.
pub const PRODUCTION_URL: &str = "https://rest.nexmo.com";

/// What the Vonage provider needs.
#[derive(Debug, Clone)]
pub struct VonageConfig {
    /// Base URL ([`PRODUCTION_URL`] or a fake).
    pub base_url: String,
    /// API key.
    pub api_key: String,
    /// API secret.
    pub api_secret: String,
    /// Sender id or number.
    pub from: String,
    /// Timeout and trust roots.
    pub http: HttpOptions,
}

/// Sends SMS through Vonage.
pub struct VonageProvider {
    client: reqwest::Client,
    url: String,
    api_key: String,
    api_secret: String,
    from: String,
}

impl VonageProvider {
    /// Builds the provider.
    ///
    /// # Errors
    /// [`SetupError`] for a bad base URL or trust root.
    pub fn new(config: &VonageConfig) -> Result<Self, SetupError> {
        let base = http::base_url("Vonage URL", &config.base_url)?;
        Ok(Self {
            client: http::client(&config.http, false)?,
            url: format!("{base}/sms/json"),
            api_key: config.api_key.clone(),
            api_secret: config.api_secret.clone(),
            from: config.from.clone(),
        })
    }
}

#[derive(Serialize)]
struct Request<'a> {
    api_key: &'a str,
    api_secret: &'a str,
    from: &'a str,
    /// International format without the `+`.
    to: &'a str,
    text: &'a str,
    #[serde(rename = "client-ref")]
    client_ref: &'a str,
    #[serde(rename = "type")]
    kind: &'static str,
}

#[derive(Deserialize)]
struct Answer {
    messages: Vec<Part>,
}

#[derive(Deserialize)]
struct Part {
    #[serde(deserialize_with = "code")]
    status: u32,
    #[serde(rename = "message-id")]
    message_id: Option<String>,
    #[serde(rename = "error-text")]
    error_text: Option<String>,
}

/// Vonage documents `status` as a string of digits; accept a number too.
fn code<'de, D: Deserializer<'de>>(d: D) -> Result<u32, D::Error> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum Code {
        Text(String),
        Number(u32),
    }
    match Code::deserialize(d)? {
        Code::Number(n) => Ok(n),
        Code::Text(s) => s.trim().parse().map_err(serde::de::Error::custom),
    }
}

#[async_trait::async_trait]
impl Provider for VonageProvider {
    fn name(&self) -> &str {
        "vonage"
    }

    fn channel(&self) -> Channel {
        Channel::Sms
    }

    fn accepts(&self, target: &Target) -> bool {
        matches!(target, Target::Phone { .. })
    }

    async fn send(&self, delivery: &Delivery) -> Result<Sent, SendError> {
        let to = sms::number("vonage", &delivery.target)?;
        let text = sms::text(delivery)?;
        let kind = if text.is_ascii() { "text" } else { "unicode" };
        let request = Request {
            api_key: &self.api_key,
            api_secret: &self.api_secret,
            from: &self.from,
            to: to.trim_start_matches('+'),
            text: &text,
            // Vonage keeps at most 40 characters of a reference; our ids are 36.
            client_ref: delivery
                .id
                .char_indices()
                .nth(40)
                .map_or(delivery.id.as_str(), |(end, _)| &delivery.id[..end]),
            kind,
        };
        let response = self
            .client
            .post(&self.url)
            .json(&request)
            .send()
            .await
            .map_err(|e| http::transport("vonage", &e))?;
        let status = response.status().as_u16();
        let headers = response.headers().clone();
        let body = http::body_prefix(response)
            .await
            .map_err(|e| http::transport("vonage", &e))?;
        if status == 404 {
            // The SMS endpoint always exists: a 404 is our URL.
            return Err(http::configuration_refused(
                format!("vonage: 404: {}", http::body_text(&body)),
                "HERALD_VONAGE_URL",
            ));
        }
        if !(200..300).contains(&status) {
            return Err(http::by_status("vonage", status, &headers, &body));
        }
        let answer: Answer = serde_json::from_slice(&body)
            .map_err(|_| http::unreadable_success("vonage", status, &body))?;
        if answer.messages.is_empty() {
            return Err(http::unreadable_success("vonage", status, &body));
        }
        // A long text goes out in parts; it was accepted only if every part was.
        if let Some(failed) = answer.messages.iter().find(|p| p.status != 0) {
            let accepted = answer.messages.iter().filter(|p| p.status == 0).count();
            if accepted > 0 {
                // Some parts are on their way: a retry would send those again. Not
                // retried; dead-lettered where an operator sees what happened.
                return Err(SendError::Permanent {
                    detail: format!(
                        "vonage: {accepted} of {} parts accepted, not retried (a retry would send them twice); {}",
                        answer.messages.len(),
                        classify(failed)
                    ),
                });
            }
            return Err(classify(failed));
        }
        let ids: Vec<&str> = answer
            .messages
            .iter()
            .filter_map(|p| p.message_id.as_deref())
            .collect();
        Ok(Sent {
            provider_message_id: (!ids.is_empty()).then(|| ids.join(",")),
        })
    }
}

fn classify(part: &Part) -> SendError {
    let detail = format!(
        "vonage: status {}: {}",
        part.status,
        http::shorten(part.error_text.as_deref().unwrap_or(""))
    );
    match part.status {
        1 | 10 => SendError::Throttled {
            retry_after: None,
            detail,
        },
        5 | 9 => SendError::transient(detail),
        // Our key or account (invalid credentials, account barred), not the message: the
        // provider's circuit counts it and the job is retried, failing over meanwhile.
        4 | 8 | 14 => http::credentials_refused(detail),
        // Our sender id, or the account's setup for this API: every message alike.
        15 => http::configuration_refused(detail, "HERALD_VONAGE_FROM"),
        11 | 32 => http::configuration_refused(detail, "the Vonage account's API settings"),
        6 | 7 | 33 => SendError::InvalidTarget { detail },
        _ => SendError::Permanent { detail },
    }
}
