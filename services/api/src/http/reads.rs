//! `POST /v1/me/read` and `GET /v1/me/unread`.

use super::ApiState;
use crate::auth::User;
use crate::error::AppError;
use crate::http::notify::read_body;
use axum::Json;
use axum::body::Body;
use axum::extract::State;
use herald_protocol::FieldError;
use herald_protocol::pages::Unread;
use std::sync::Arc;

#[derive(serde::Deserialize)]
struct ReadBody {
    up_to: u64,
}

pub(super) async fn mark_read(
    State(state): State<Arc<ApiState>>,
    User(user): User,
    body: Body,
) -> Result<Json<Unread>, AppError> {
    let bytes = read_body(body, 1024).await?;
    let ReadBody { up_to } = serde_json::from_slice(&bytes).map_err(|e| {
        AppError::field(FieldError::new(
            "up_to",
            format!("expected {{\"up_to\": <seq>}}: {e}"),
        ))
    })?;
    let inbox = state.acceptor.inbox();
    let last_seq = inbox
        .last_seq(&user)
        .await
        .map_err(|e| AppError::unavailable(&e))?;
    // Never past the newest notification: a read position ahead of the inbox would hide
    // notifications that arrive later.
    let wanted = up_to.min(last_seq);
    let position = state
        .reads
        .advance(&user, wanted)
        .await
        .map_err(|e| AppError::unavailable(&e))?;
    if position == wanted && wanted > 0 {
        // Best effort: devices that miss it see the position in their next hello.
        let _ = inbox.announce_read(&user, position).await;
    }
    let unread = inbox
        .count_after(&user, position)
        .await
        .map_err(|e| AppError::unavailable(&e))?;
    Ok(Json(Unread { unread, last_seq }))
}

pub(super) async fn unread(
    State(state): State<Arc<ApiState>>,
    User(user): User,
) -> Result<Json<Unread>, AppError> {
    let inbox = state.acceptor.inbox();
    let position = state
        .reads
        .get(&user)
        .await
        .map_err(|e| AppError::unavailable(&e))?;
    let (unread, last_seq) =
        tokio::try_join!(inbox.count_after(&user, position), inbox.last_seq(&user))
            .map_err(|e| AppError::unavailable(&e))?;
    Ok(Json(Unread { unread, last_seq }))
}
