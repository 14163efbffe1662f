//! Extractors for the two kinds of caller: producers (API keys) and users (JWTs, from the
//! `Authorization` header; on the WebSocket and SSE endpoints also, for browsers, which
//! cannot set headers there, from the `access_token` query parameter — SPEC §2).
//!
//! A token in a URL ends up in access logs and browser history, so it is taken only where
//! SPEC allows it, and request logs show the query with `access_token` redacted
//! ([`redacted_uri`]).

use crate::error::AppError;
use axum::extract::FromRequestParts;
use axum::http::request::Parts;
use herald_auth::{ApiKey, ApiKeys, Scope, UserAuth};
use herald_protocol::UserId;
use std::sync::Arc;

/// Verifies both kinds of credentials. Shared by the API and the gateway.
#[derive(Clone, Debug)]
pub struct Authenticator {
    /// Producer keys.
    pub keys: Arc<ApiKeys>,
    /// User token verifier.
    pub users: UserAuth,
}

/// A caller that presented a valid API key.
#[derive(Debug, Clone)]
pub struct Producer(pub ApiKey);

impl Producer {
    /// Fails with 403 unless the key has `scope`.
    ///
    /// # Errors
    /// 403 naming the missing scope.
    pub fn require(&self, scope: Scope) -> Result<(), AppError> {
        if self.0.allows(scope) {
            Ok(())
        } else {
            Err(AppError::forbidden(format!(
                "this API key lacks the {} scope",
                scope.as_str()
            )))
        }
    }
}

/// A caller that presented a valid user token.
#[derive(Debug, Clone)]
pub struct User(pub UserId);

/// Something that holds an [`Authenticator`].
pub trait HasAuth {
    /// The authenticator.
    fn authenticator(&self) -> &Authenticator;
}

impl<T: HasAuth> HasAuth for Arc<T> {
    fn authenticator(&self) -> &Authenticator {
        (**self).authenticator()
    }
}

impl Authenticator {
    /// The user a WebSocket or SSE request's credentials name: the `Authorization`
    /// header or the `access_token` query parameter.
    ///
    /// # Errors
    /// 401 when no token is present or it does not verify.
    pub fn user_from_parts(&self, parts: &Parts) -> Result<UserId, AppError> {
        self.session_from_parts(parts).map(|session| session.user)
    }

    /// The user a request's `Authorization` header names (every user endpoint but the
    /// WebSocket and SSE ones, which use [`Authenticator::session_from_parts`]).
    ///
    /// # Errors
    /// 401 when no token is present or it does not verify.
    pub fn user_from_header(&self, parts: &Parts) -> Result<UserId, AppError> {
        let Some(token) = header_token(parts) else {
            let message = if query_token(parts.uri.query()).is_some() {
                "a user token is required in the Authorization header (Bearer <jwt>): \
                 ?access_token= is accepted on the WebSocket and SSE endpoints only"
            } else {
                "a user token is required: Authorization: Bearer <jwt>"
            };
            return Err(AppError::unauthorized(message));
        };
        self.users
            .verify(&token)
            .map_err(|e| self.user_token_refused(&token, &e))
    }

    /// 401 for a refused user token, saying so when it is one of our API keys (sent to a
    /// user endpoint by mistake) rather than calling it a malformed JWT.
    fn user_token_refused(&self, token: &str, e: &herald_auth::JwtError) -> AppError {
        if self.keys.verify(token).is_some() {
            return AppError::unauthorized(
                "this is an API key; user endpoints (/v1/me/*, /v1/ws, /v1/sse) take a user \
                 token (a JWT: `herald token --user <id>`, or your backend's)",
            );
        }
        AppError::unauthorized(e.to_string())
    }

    /// The user a WebSocket or SSE request's credentials name (the `Authorization`
    /// header or the `access_token` query parameter), and how long their token stays
    /// valid (the session ends then).
    ///
    /// # Errors
    /// 401 when no token is present or it does not verify.
    pub fn session_from_parts(&self, parts: &Parts) -> Result<herald_auth::Session, AppError> {
        let token = header_token(parts)
            .or_else(|| query_token(parts.uri.query()))
            .ok_or_else(|| {
                AppError::unauthorized(
                    "a user token is required: Authorization: Bearer <jwt> or ?access_token=<jwt>",
                )
            })?;
        self.users
            .verify_session(&token)
            .map_err(|e| self.user_token_refused(&token, &e))
    }

    /// The producer a request's API key names.
    ///
    /// # Errors
    /// 401 when no key is present or it is unknown.
    pub fn producer_from_parts(&self, parts: &Parts) -> Result<ApiKey, AppError> {
        let key = header_token(parts).ok_or_else(|| {
            AppError::unauthorized("an API key is required: Authorization: Bearer <key>")
        })?;
        self.keys.verify(&key).cloned().ok_or_else(|| {
            if self.users.verify(&key).is_ok() {
                AppError::unauthorized(
                    "this is a user token; producer endpoints take an API key \
                     (Authorization: Bearer <key>)",
                )
            } else {
                AppError::unauthorized("unknown API key")
            }
        })
    }
}

fn header_token(parts: &Parts) -> Option<String> {
    bearer_of(&parts.headers)
}

fn bearer_of(headers: &axum::http::HeaderMap) -> Option<String> {
    let value = headers.get(axum::http::header::AUTHORIZATION)?;
    herald_auth::bearer(value.to_str().ok()?).map(str::to_string)
}

/// Middleware, where user tokens may come from a JWKS document: a token naming a key the
/// document lacks has it read again before the request goes on (rate-limited; see
/// [`herald_auth::UserAuth::refetch_for`]), so a key the provider rotated in is taken on
/// the first request signed with it, on every path, WebSocket and SSE included.
pub async fn refetch_unknown_keys(
    axum::extract::State(auth): axum::extract::State<Authenticator>,
    request: axum::extract::Request,
    next: axum::middleware::Next,
) -> axum::response::Response {
    if auth.users.jwks().is_some()
        && let Some(token) =
            bearer_of(request.headers()).or_else(|| query_token(request.uri().query()))
    {
        auth.users.refetch_for(&token).await;
    }
    next.run(request).await
}

/// The request's path and query for logs, an `access_token` parameter's value replaced
/// by `REDACTED`.
pub fn redacted_uri(uri: &axum::http::Uri) -> String {
    let path = uri.path();
    let Some(query) = uri.query() else {
        return path.to_owned();
    };
    let pairs: Vec<&str> = query
        .split('&')
        .map(|pair| {
            let name = pair.split_once('=').map_or(pair, |(name, _)| name);
            let decoded: String = form_urlencoded::parse(name.as_bytes())
                .map(|(k, _)| k.into_owned())
                .collect();
            if decoded == "access_token" {
                "access_token=REDACTED"
            } else {
                pair
            }
        })
        .collect();
    format!("{path}?{}", pairs.join("&"))
}

fn query_token(query: Option<&str>) -> Option<String> {
    url_param(query?, "access_token")
}

/// The first value of a query parameter, percent-decoded.
pub fn url_param(query: &str, name: &str) -> Option<String> {
    form_urlencoded::parse(query.as_bytes())
        .find(|(k, _)| k == name)
        .map(|(_, v)| v.into_owned())
}

impl<S: HasAuth + Send + Sync> FromRequestParts<S> for Producer {
    type Rejection = AppError;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, Self::Rejection> {
        state
            .authenticator()
            .producer_from_parts(parts)
            .map(Producer)
    }
}

impl<S: HasAuth + Send + Sync> FromRequestParts<S> for User {
    type Rejection = AppError;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, Self::Rejection> {
        state.authenticator().user_from_header(parts).map(User)
    }
}

#[cfg(test)]
mod tests {
    use super::redacted_uri;

    #[test]
    fn access_tokens_are_redacted_from_logged_uris() {
        let uri = |s: &str| s.parse::<axum::http::Uri>().expect("uri");
        assert_eq!(redacted_uri(&uri("/v1/ws")), "/v1/ws");
        assert_eq!(
            redacted_uri(&uri("/v1/ws?after=5&access_token=eyJ.abc.def&x")),
            "/v1/ws?after=5&access_token=REDACTED&x"
        );
        // However it is spelled: percent-encoded name, no value, repeated.
        assert_eq!(
            redacted_uri(&uri(
                "/v1/sse?access%5Ftoken=eyJ&access_token&access_token=b"
            )),
            "/v1/sse?access_token=REDACTED&access_token=REDACTED&access_token=REDACTED"
        );
    }
}
