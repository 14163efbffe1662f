//! OAuth2 access tokens for FCM from a Google service-account key, by the JWT bearer grant
//! (RFC 7523): an RS256 JWT signed with the key is exchanged at the key's `token_uri` for a
//! bearer token, which is shared by every send and refreshed shortly before it expires.

use crate::SendError;
use crate::http::{self, SetupError};
use jsonwebtoken::{Algorithm, EncodingKey, Header};
use serde::{Deserialize, Serialize};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};
use tokio::sync::Mutex;

/// The scope FCM's send endpoint requires.
pub const SCOPE: &str = "https://www.googleapis.com/auth/firebase.messaging";
/// The grant type of RFC 7523.
pub const GRANT_TYPE: &str = "urn:ietf:params:oauth:grant-type:jwt-bearer";
/// A token is replaced this long before Google says it expires.
pub const REFRESH_MARGIN: Duration = Duration::from_secs(60);

/// The fields of a service-account JSON key file that FCM needs.
#[derive(Debug, Clone, Deserialize)]
pub struct ServiceAccount {
    /// The Firebase project.
    pub project_id: String,
    /// The account's e-mail (`iss` of the assertion).
    pub client_email: String,
    /// PKCS#8 PEM RSA key.
    pub private_key: String,
    /// Id of that key (`kid`).
    #[serde(default)]
    pub private_key_id: Option<String>,
    /// Where assertions are exchanged for access tokens.
    pub token_uri: String,
}

#[derive(Serialize)]
struct Assertion<'a> {
    iss: &'a str,
    scope: &'a str,
    aud: &'a str,
    iat: u64,
    exp: u64,
}

#[derive(Deserialize)]
struct TokenAnswer {
    access_token: String,
    #[serde(default)]
    expires_in: Option<u64>,
}

struct Cached {
    token: String,
    refresh_at: Instant,
}

/// Fetches and caches access tokens.
pub struct AccessTokens {
    account: ServiceAccount,
    key: EncodingKey,
    cached: Mutex<Option<Cached>>,
}

impl AccessTokens {
    /// Checks the key.
    ///
    /// # Errors
    /// [`SetupError::Invalid`] when the private key is not an RSA PEM key or the token URI
    /// is not a URL.
    pub fn new(account: ServiceAccount) -> Result<Self, SetupError> {
        let key = EncodingKey::from_rsa_pem(account.private_key.as_bytes()).map_err(|e| {
            SetupError::Invalid {
                what: "FCM service account",
                reason: format!("private_key is not an RSA PEM key: {e}"),
            }
        })?;
        http::base_url("FCM service account token_uri", &account.token_uri)?;
        Ok(Self {
            account,
            key,
            cached: Mutex::new(None),
        })
    }

    /// The project to send under.
    pub fn project_id(&self) -> &str {
        &self.account.project_id
    }

    /// A valid access token, fetched when none is cached or the cached one is due.
    /// Concurrent callers wait for one fetch.
    ///
    /// # Errors
    /// A classified [`SendError`]: the token endpoint unreachable, failing (5xx) or
    /// answering nonsense is transient; refusing the account (4xx) is permanent.
    pub async fn current(&self, client: &reqwest::Client) -> Result<String, SendError> {
        let mut cached = self.cached.lock().await;
        if let Some(c) = cached.as_ref()
            && Instant::now() < c.refresh_at
        {
            return Ok(c.token.clone());
        }
        let (token, lifetime) = self.fetch(client).await?;
        *cached = Some(Cached {
            token: token.clone(),
            refresh_at: Instant::now() + lifetime.saturating_sub(REFRESH_MARGIN),
        });
        Ok(token)
    }

    /// Forgets `stale` (FCM answered 401) so the next call fetches a new token.
    pub async fn discard(&self, stale: &str) {
        let mut cached = self.cached.lock().await;
        if cached.as_ref().is_some_and(|c| c.token == stale) {
            *cached = None;
        }
    }

    async fn fetch(&self, client: &reqwest::Client) -> Result<(String, Duration), SendError> {
        let iat = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or(0);
        let mut header = Header::new(Algorithm::RS256);
        header.kid = self.account.private_key_id.clone();
        let claims = Assertion {
            iss: &self.account.client_email,
            scope: SCOPE,
            aud: &self.account.token_uri,
            iat,
            exp: iat + 3600,
        };
        let assertion = jsonwebtoken::encode(&header, &claims, &self.key).map_err(|e| {
            SendError::Permanent {
                detail: format!("fcm oauth: cannot sign the assertion: {e}"),
            }
        })?;
        let response = client
            .post(&self.account.token_uri)
            .form(&[
                ("grant_type", GRANT_TYPE),
                ("assertion", assertion.as_str()),
            ])
            .send()
            .await
            .map_err(|e| http::transport("fcm oauth", &e))?;
        let status = response.status().as_u16();
        let headers = response.headers().clone();
        let body = http::body_prefix(response)
            .await
            .map_err(|e| http::transport("fcm oauth", &e))?;
        if (200..300).contains(&status) {
            // Nothing was sent yet, so an unreadable token answer is safe to retry.
            let answer: TokenAnswer = serde_json::from_slice(&body).map_err(|_| {
                SendError::transient(format!(
                    "fcm oauth: unreadable token answer: {}",
                    http::body_text(&body)
                ))
            })?;
            let lifetime = Duration::from_secs(answer.expires_in.unwrap_or(3600));
            return Ok((answer.access_token, lifetime));
        }
        // Nothing was sent: a refused grant (`invalid_grant` from a revoked key or a
        // skewed clock) is the provider's failure, not the message's.
        Err(
            match http::by_status("fcm oauth", status, &headers, &body) {
                SendError::Permanent { detail } | SendError::Transient { detail, .. }
                    if (400..500).contains(&status) =>
                {
                    http::credentials_refused(format!("{detail} (check HERALD_FCM_CREDENTIALS)"))
                }
                other => other,
            },
        )
    }
}
