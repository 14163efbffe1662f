//! `POST /v1/me/read` and `GET /v1/me/unread`.
//!
//! A read goes through the process's receipt batcher, and the answer waits for the flush
//! of its batch: whoever gets the answer may immediately ask `GET /v1/me/unread` or open a
//! connection (`hello`) and see the new position (read-your-writes), while many receipts
//! still cost one KV write per user per flush.

use super::ApiState;
use crate::auth::User;
use crate::error::AppError;
use crate::http::notify::read_body;
use axum::Json;
use axum::body::Body;
use axum::extract::State;
use herald_protocol::UserId;
use herald_protocol::notification::object_from_json;
use herald_protocol::pages::Unread;
use herald_store::Mark;
use std::sync::Arc;

#[derive(serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct ReadBody {
    up_to: u64,
}

pub(super) async fn mark_read(
    State(state): State<Arc<ApiState>>,
    User(user): User,
    body: Body,
) -> Result<Json<Unread>, AppError> {
    let bytes = read_body(body, 1024).await?;
    // An object only: serde would read `[7]` as `{"up_to":7}`.
    let ReadBody { up_to } =
        object_from_json(&bytes, "expected {\"up_to\": <seq>}").map_err(AppError::field)?;
    // The batcher clamps to the newest notification (a read position ahead of the inbox
    // would hide later ones) and announces the new position to the user's other devices.
    let position = state
        .receipts
        .mark_and_wait(Mark::Read, &user, up_to)
        .await
        .map_err(|e| AppError::unavailable(&e))?;
    counts(&state, &user, position).await.map(Json)
}

pub(super) async fn unread(
    State(state): State<Arc<ApiState>>,
    User(user): User,
) -> Result<Json<Unread>, AppError> {
    let position = state
        .reads
        .get(&user)
        .await
        .map_err(|e| AppError::unavailable(&e))?;
    counts(&state, &user, position).await.map(Json)
}

async fn counts(state: &ApiState, user: &UserId, read_up_to: u64) -> Result<Unread, AppError> {
    let inbox = state.acceptor.inbox();
    let (unread, last_seq, seen_seq) = tokio::try_join!(
        async {
            inbox
                .count_after(user, read_up_to)
                .await
                .map_err(|e| AppError::unavailable(&e))
        },
        async {
            inbox
                .last_seq(user)
                .await
                .map_err(|e| AppError::unavailable(&e))
        },
        async {
            state
                .seen
                .get(user)
                .await
                .map_err(|e| AppError::unavailable(&e))
        },
    )?;
    Ok(Unread {
        unread,
        last_seq,
        seen_seq,
    })
}
