//! `DELETE /v1/users/{user_id}` (scope admin): the GDPR erase. Removes the user's
//! notifications and pending schedules, preferences, read and seen positions, devices,
//! contact data and topic subscriptions, and answers with what it removed. Channel jobs already queued find
//! their notification gone and are dropped by the workers.

use super::ApiState;
use crate::auth::Producer;
use crate::error::AppError;
use axum::Json;
use axum::extract::{Path, State};
use herald_auth::Scope;
use herald_protocol::{FieldError, UserId};
use serde_json::{Value, json};
use std::sync::Arc;

pub(super) async fn erase(
    State(state): State<Arc<ApiState>>,
    producer: Producer,
    Path(user_id): Path<String>,
) -> Result<Json<Value>, AppError> {
    producer.require(Scope::Admin)?;
    let user = UserId::new(user_id)
        .map_err(|e| AppError::field(FieldError::new("user_id", e.to_string())))?;
    let (notifications, scheduled) = state
        .acceptor
        .inbox()
        .erase(&user)
        .await
        .map_err(|e| AppError::unavailable(&e))?;
    let preferences = state
        .preferences
        .erase(&user)
        .await
        .map_err(|e| AppError::unavailable(&e))?;
    let read_position = state
        .reads
        .erase(&user)
        .await
        .map_err(|e| AppError::unavailable(&e))?;
    let seen_position = state
        .seen
        .erase(&user)
        .await
        .map_err(|e| AppError::unavailable(&e))?;
    state
        .targets
        .erase(&user)
        .await
        .map_err(|e| AppError::unavailable(&e))?;
    // Their topics too: what they follow is theirs, and big topics' publishes (stored
    // once, shared) leave their view with the subscriptions.
    let topics = state
        .subscriptions
        .topics_of(&user)
        .await
        .map_err(|e| AppError::unavailable(&e))?;
    for topic in &topics {
        state
            .subscriptions
            .unsubscribe(topic, &user)
            .await
            .map_err(|e| AppError::unavailable(&e))?;
    }
    tracing::info!(producer = %producer.0.producer, notifications, scheduled, "user erased");
    metrics::counter!("herald_users_erased_total").increment(1);
    Ok(Json(json!({
        "user_id": user.as_str(),
        "erased": true,
        "removed": {
            "notifications": notifications,
            "scheduled": scheduled,
            "preferences": preferences,
            "read_position": read_position,
            "seen_position": seen_position,
            "devices_and_contact": true,
            "subscriptions": topics.len(),
        }
    })))
}
