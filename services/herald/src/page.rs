//! Development mode only: the demo page at `/`, the JavaScript SDK it is built on
//! (`/sdk/herald.js`, compiled in from `sdk/js/herald.js`), token minting for any user
//! name, and a "send me a test notification" endpoint. Never mounted outside `dev_mode`.

use axum::Json;
use axum::Router;
use axum::body::Body;
use axum::extract::State;
use axum::http::request::Parts;
use axum::http::{StatusCode, header};
use axum::response::IntoResponse;
use axum::routing::{get, post};
use herald_api::{Acceptor, AppError, Authenticator};
use herald_protocol::{FieldError, UserId};
use std::sync::Arc;

#[derive(Clone)]
struct DevState {
    acceptor: Acceptor,
    auth: Authenticator,
}

/// How long a development token lives.
const DEV_TOKEN_TTL: u64 = 24 * 3600;

/// The development routes.
pub fn routes(acceptor: Acceptor, auth: Authenticator) -> Router {
    Router::new()
        .route("/", get(index))
        .route("/sdk/herald.js", get(sdk))
        .route("/dev/token", post(token))
        .route("/dev/notify", post(notify_self))
        .with_state(Arc::new(DevState { acceptor, auth }))
}

async fn index() -> impl IntoResponse {
    (
        [(header::CONTENT_TYPE, "text/html; charset=utf-8")],
        include_str!("../assets/index.html"),
    )
}

/// The SDK the page imports: the very file published as the JavaScript client.
async fn sdk() -> impl IntoResponse {
    (
        [
            (header::CONTENT_TYPE, "text/javascript; charset=utf-8"),
            (header::CACHE_CONTROL, "no-cache"),
        ],
        include_str!("../../../sdk/js/herald.js"),
    )
}

#[derive(serde::Deserialize)]
struct TokenRequest {
    user_id: String,
}

async fn token(
    State(state): State<Arc<DevState>>,
    body: Body,
) -> Result<Json<serde_json::Value>, AppError> {
    let bytes = axum::body::to_bytes(body, 4096)
        .await
        .map_err(|_| AppError::too_large(4096))?;
    let req: TokenRequest = serde_json::from_slice(&bytes)
        .map_err(|e| AppError::field(FieldError::new("user_id", e.to_string())))?;
    let user = UserId::new(req.user_id)
        .map_err(|e| AppError::field(FieldError::new("user_id", e.to_string())))?;
    let token =
        state.auth.users.mint(&user, DEV_TOKEN_TTL).map_err(|e| {
            AppError::new(StatusCode::INTERNAL_SERVER_ERROR, "internal", e.to_string())
        })?;
    Ok(Json(serde_json::json!({ "token": token, "user_id": user })))
}

/// Sends the calling user a notification: `{"title","body"}`. The token comes in the
/// `Authorization` header, as on every user endpoint but WebSocket and SSE (SPEC §2).
async fn notify_self(
    State(state): State<Arc<DevState>>,
    parts: Parts,
    body: Body,
) -> Result<(StatusCode, Json<serde_json::Value>), AppError> {
    let user = state.auth.user_from_header(&parts)?;
    let bytes = axum::body::to_bytes(body, 64 * 1024)
        .await
        .map_err(|_| AppError::too_large(64 * 1024))?;
    let mut value: serde_json::Value = serde_json::from_slice(&bytes)
        .map_err(|e| AppError::field(FieldError::new("body", e.to_string())))?;
    if let Some(obj) = value.as_object_mut() {
        obj.insert("user_id".into(), user.as_str().into());
    }
    let raw = serde_json::to_vec(&value).unwrap_or_default();
    let prepared = state
        .acceptor
        .prepare(&raw, "dev-page", None)
        .await
        .map_err(AppError::from)?;
    let accepted = state
        .acceptor
        .commit(prepared)
        .await
        .map_err(AppError::from)?;
    Ok((
        StatusCode::ACCEPTED,
        Json(serde_json::json!({"id": accepted.id, "status": "accepted", "seq": accepted.seq})),
    ))
}
