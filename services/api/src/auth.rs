//! Extractors for the two kinds of caller: producers (API keys) and users (JWTs, from the
//! `Authorization` header or, for browsers, the `access_token` query parameter).

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
    /// The user a request's credentials name.
    ///
    /// # Errors
    /// 401 when no token is present or it does not verify.
    pub fn user_from_parts(&self, parts: &Parts) -> Result<UserId, AppError> {
        self.session_from_parts(parts).map(|session| session.user)
    }

    /// The user a request's credentials name, and how long their token stays valid (a
    /// WebSocket or SSE session ends then).
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
            .map_err(|e| AppError::unauthorized(e.to_string()))
    }

    /// The producer a request's API key names.
    ///
    /// # Errors
    /// 401 when no key is present or it is unknown.
    pub fn producer_from_parts(&self, parts: &Parts) -> Result<ApiKey, AppError> {
        let key = header_token(parts).ok_or_else(|| {
            AppError::unauthorized("an API key is required: Authorization: Bearer <key>")
        })?;
        self.keys
            .verify(&key)
            .cloned()
            .ok_or_else(|| AppError::unauthorized("unknown API key"))
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
        state.authenticator().user_from_parts(parts).map(User)
    }
}
