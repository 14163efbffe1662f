//! `GET /v1/admin/templates` and `POST /v1/admin/templates/reload` (scope admin): which
//! templates are loaded, and reading the folder again after an edit. A folder with errors
//! is refused whole — 400 listing every problem — and the previous templates stay in use.

use super::ApiState;
use crate::auth::Producer;
use crate::error::AppError;
use axum::Json;
use axum::extract::State;
use axum::http::StatusCode;
use herald_auth::Scope;
use serde_json::{Value, json};
use std::sync::Arc;

pub(super) async fn list(
    State(state): State<Arc<ApiState>>,
    producer: Producer,
) -> Result<Json<Value>, AppError> {
    producer.require(Scope::Admin)?;
    Ok(Json(
        json!({"templates": state.acceptor.templates().names()}),
    ))
}

pub(super) async fn reload(
    State(state): State<Arc<ApiState>>,
    producer: Producer,
) -> Result<Json<Value>, AppError> {
    producer.require(Scope::Admin)?;
    let templates = state.acceptor.templates().clone();
    // Reading and compiling a folder is blocking work.
    let result = tokio::task::spawn_blocking(move || templates.reload().map(|_| templates.names()))
        .await
        .map_err(|e| AppError::internal(&e))?;
    match result {
        Ok(names) => Ok(Json(json!({"reloaded": true, "templates": names}))),
        Err(e) => Err(AppError::new(
            StatusCode::BAD_REQUEST,
            "invalid_templates",
            format!("{e}; the previous templates stay in use"),
        )),
    }
}
