//! The user-side HTTP calls the client makes (`/v1/me/read`, `/v1/me/unread`,
//! `/v1/me/subscriptions`, `/healthz`), with the token refreshed once on a 401.

use crate::error::ClientError;
use crate::token::Tokens;
use reqwest::{Method, StatusCode};
use serde_json::Value;
use std::sync::Arc;
use std::time::Duration;

/// Bound on one HTTP call.
const TIMEOUT: Duration = Duration::from_secs(15);

#[derive(Debug, Clone)]
pub(crate) struct Http {
    pub(crate) client: reqwest::Client,
    pub(crate) base: String,
    tokens: Arc<Tokens>,
}

impl Http {
    pub(crate) fn new(base: String, tokens: Arc<Tokens>) -> Result<Self, ClientError> {
        let client = reqwest::Client::builder()
            .connect_timeout(Duration::from_secs(5))
            .build()?;
        Ok(Self {
            client,
            base,
            tokens,
        })
    }

    /// `method path` as the user, with a JSON body; the JSON answer (`null` when empty).
    pub(crate) async fn json(
        &self,
        method: Method,
        path: &str,
        body: Option<Value>,
    ) -> Result<Value, ClientError> {
        let mut refresh = false;
        loop {
            let token = self.tokens.get(refresh).await?;
            let mut request = self
                .client
                .request(method.clone(), format!("{}{path}", self.base))
                .bearer_auth(token)
                .timeout(TIMEOUT);
            if let Some(body) = &body {
                request = request.json(body);
            }
            let response = request.send().await?;
            let status = response.status();
            if status == StatusCode::UNAUTHORIZED && !refresh && self.tokens.can_refresh() {
                refresh = true;
                continue;
            }
            let text = response.text().await?;
            if !status.is_success() {
                return Err(ClientError::Status { status, body: text });
            }
            return Ok(if text.is_empty() {
                Value::Null
            } else {
                serde_json::from_str(&text).map_err(|e| ClientError::Status {
                    status,
                    body: format!("not JSON ({e}): {text}"),
                })?
            });
        }
    }

    /// Whether the server answers plain HTTP at all (`GET /healthz`).
    pub(crate) async fn reachable(&self) -> bool {
        self.client
            .get(format!("{}/healthz", self.base))
            .timeout(Duration::from_secs(5))
            .send()
            .await
            .is_ok()
    }
}
