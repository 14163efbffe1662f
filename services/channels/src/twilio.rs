//! SMS through Twilio's Programmable Messaging REST API (and anything speaking it):
//! `POST /2010-04-01/Accounts/{AccountSid}/Messages.json`, form-encoded `To`/`From`/`Body`,
//! HTTP basic auth with the account SID and auth token, JSON answers.
//!
//! Twilio's errors carry a numeric `code` beside the HTTP status. The codes that say the
//! number itself is unusable (invalid, not a mobile, opted out with STOP) make the target
//! invalid; 20429 / HTTP 429 and 21611 (our sender's queue is full) are throttling; 5xx is
//! transient; 401/403 (our credentials) and the codes that refuse our sender or account
//! (a `From` not on the account or not able to send, an account or endpoint that does not
//! exist) are the provider's failure, retried and counted by its circuit so the channel
//! fails over ([`http::configuration_refused`]); other 4xx are permanent.

use crate::http::{self, HttpOptions, SetupError};
use crate::{Delivery, Provider, SendError, Sent, Target, sms};
use herald_protocol::Channel;
use serde::Deserialize;

/// Twilio's endpoint.
pub const PRODUCTION_URL: &str = "https://api.twilio.com";

/// Error codes meaning "this number cannot receive from us": 21211 invalid 'To', 21217
/// number does not appear valid, 21401 invalid phone number, 21407 not supported, 21610
/// recipient unsubscribed (STOP), 21614 not a mobile number.
const INVALID_TARGET_CODES: [u32; 6] = [21211, 21217, 21401, 21407, 21610, 21614];

/// Error codes meaning "our sender is refused", whatever the message: 21212 invalid 'From'
/// number, 21603 'From' missing, 21606 'From' is not a message-capable number of the
/// account, 21659 'From' is not a Twilio number, 21660 'From' belongs to another account.
/// Every message fails alike until `HERALD_TWILIO_FROM` is fixed.
const SENDER_REFUSED_CODES: [u32; 5] = [21212, 21603, 21606, 21659, 21660];

/// 21611: "This 'From' number has exceeded the maximum number of queued messages" — a
/// throttle of our sender, not a fault of the message.
const SENDER_QUEUE_FULL: u32 = 21611;

/// 20404: the requested resource (our account's Messages endpoint) was not found.
const NOT_FOUND: u32 = 20404;

/// What the Twilio provider needs.
#[derive(Debug, Clone)]
pub struct TwilioConfig {
    /// Base URL ([`PRODUCTION_URL`] or a compatible service / fake).
    pub base_url: String,
    /// Account SID (`AC…`), the basic-auth user.
    pub account_sid: String,
    /// Auth token, the basic-auth password.
    pub auth_token: String,
    /// Sender: a number in E.164 form, a short code or a messaging service.
    pub from: String,
    /// Timeout and trust roots.
    pub http: HttpOptions,
}

/// Sends SMS through a Twilio-compatible API.
pub struct TwilioProvider {
    client: reqwest::Client,
    url: String,
    account_sid: String,
    auth_token: String,
    from: String,
}

impl TwilioProvider {
    /// Builds the provider.
    ///
    /// # Errors
    /// [`SetupError`] for a bad base URL, account SID or trust root.
    pub fn new(config: &TwilioConfig) -> Result<Self, SetupError> {
        let base = http::base_url("Twilio URL", &config.base_url)?;
        if config.account_sid.is_empty()
            || !config
                .account_sid
                .bytes()
                .all(|b| b.is_ascii_alphanumeric())
        {
            return Err(SetupError::Invalid {
                what: "Twilio account SID",
                reason: "must be letters and digits (AC…)".into(),
            });
        }
        Ok(Self {
            client: http::client(&config.http, false)?,
            url: format!(
                "{base}/2010-04-01/Accounts/{}/Messages.json",
                config.account_sid
            ),
            account_sid: config.account_sid.clone(),
            auth_token: config.auth_token.clone(),
            from: config.from.clone(),
        })
    }
}

#[derive(Deserialize)]
struct Created {
    sid: String,
}

#[derive(Deserialize)]
struct TwilioError {
    code: Option<u32>,
    #[serde(default)]
    message: String,
}

#[async_trait::async_trait]
impl Provider for TwilioProvider {
    fn name(&self) -> &str {
        "twilio"
    }

    fn channel(&self) -> Channel {
        Channel::Sms
    }

    fn accepts(&self, target: &Target) -> bool {
        matches!(target, Target::Phone { .. })
    }

    async fn send(&self, delivery: &Delivery) -> Result<Sent, SendError> {
        let to = sms::number("twilio", &delivery.target)?;
        let text = sms::text(delivery)?;
        let response = self
            .client
            .post(&self.url)
            .basic_auth(&self.account_sid, Some(&self.auth_token))
            .form(&[
                ("To", to),
                ("From", self.from.as_str()),
                ("Body", text.as_str()),
            ])
            .send()
            .await
            .map_err(|e| http::transport("twilio", &e))?;
        let status = response.status().as_u16();
        let headers = response.headers().clone();
        let body = http::body_prefix(response)
            .await
            .map_err(|e| http::transport("twilio", &e))?;
        if (200..300).contains(&status) {
            let created: Created = serde_json::from_slice(&body)
                .map_err(|_| http::unreadable_success("twilio", status, &body))?;
            return Ok(Sent {
                provider_message_id: Some(created.sid),
            });
        }
        Err(classify(status, &headers, &body))
    }
}

fn classify(status: u16, headers: &reqwest::header::HeaderMap, body: &[u8]) -> SendError {
    let Ok(TwilioError {
        code: Some(code),
        message,
    }) = serde_json::from_slice::<TwilioError>(body)
    else {
        // The Messages endpoint of our account always exists: a 404 is our URL or SID.
        if status == 404 {
            return http::configuration_refused(
                format!("twilio: 404: {}", http::body_text(body)),
                "HERALD_TWILIO_URL and HERALD_TWILIO_ACCOUNT_SID",
            );
        }
        return http::by_status("twilio", status, headers, body);
    };
    let detail = format!("twilio: {status} code {code}: {}", http::shorten(&message));
    match code {
        c if INVALID_TARGET_CODES.contains(&c) => SendError::InvalidTarget { detail },
        20429 | SENDER_QUEUE_FULL => SendError::Throttled {
            retry_after: http::retry_after(headers),
            detail,
        },
        c if SENDER_REFUSED_CODES.contains(&c) => {
            http::configuration_refused(detail, "HERALD_TWILIO_FROM")
        }
        NOT_FOUND => {
            http::configuration_refused(detail, "HERALD_TWILIO_URL and HERALD_TWILIO_ACCOUNT_SID")
        }
        _ => http::class_for(status, headers, detail),
    }
}
