//! `GET/PUT /v1/me/preferences` (the user) and `/v1/users/{user_id}/preferences` (a
//! producer acting for the user). `PUT` merges: every field is optional, and the answer
//! is the whole effective document, as `GET` returns it.

use super::ApiState;
use crate::auth::{Producer, User};
use crate::error::AppError;
use crate::http::notify::read_body;
use axum::Json;
use axum::body::Body;
use axum::extract::{Path, State};
use herald_auth::Scope;
use herald_protocol::preferences::PreferencesPatch;
use herald_protocol::{FieldError, UserId};
use herald_store::PreferencesError;
use serde_json::Value;
use std::sync::Arc;

/// Largest preferences body, bytes.
const BODY_LIMIT: usize = 64 * 1024;

pub(super) async fn get_mine(
    State(state): State<Arc<ApiState>>,
    User(user): User,
) -> Result<Json<Value>, AppError> {
    get(&state, &user).await
}

pub(super) async fn put_mine(
    State(state): State<Arc<ApiState>>,
    User(user): User,
    body: Body,
) -> Result<Json<Value>, AppError> {
    put(&state, &user, body).await
}

pub(super) async fn get_users(
    State(state): State<Arc<ApiState>>,
    producer: Producer,
    Path(user_id): Path<String>,
) -> Result<Json<Value>, AppError> {
    producer.require(Scope::Read)?;
    get(&state, &path_user(user_id)?).await
}

pub(super) async fn put_users(
    State(state): State<Arc<ApiState>>,
    producer: Producer,
    Path(user_id): Path<String>,
    body: Body,
) -> Result<Json<Value>, AppError> {
    producer.require(Scope::Notify)?;
    put(&state, &path_user(user_id)?, body).await
}

fn path_user(raw: String) -> Result<UserId, AppError> {
    UserId::new(raw).map_err(|e| AppError::field(FieldError::new("user_id", e.to_string())))
}

async fn get(state: &ApiState, user: &UserId) -> Result<Json<Value>, AppError> {
    let prefs = state
        .preferences
        .get(user)
        .await
        .map_err(|e| AppError::unavailable(&e))?;
    Ok(Json(prefs.effective()))
}

async fn put(state: &ApiState, user: &UserId, body: Body) -> Result<Json<Value>, AppError> {
    let bytes = read_body(body, BODY_LIMIT).await?;
    let patch =
        PreferencesPatch::from_json(&bytes, &state.acceptor.policy()).map_err(AppError::field)?;
    match state.preferences.update(user, patch).await {
        Ok(prefs) => Ok(Json(prefs.effective())),
        Err(PreferencesError::Invalid(e)) => Err(AppError::field(e)),
        Err(e) => Err(AppError::unavailable(&e)),
    }
}
