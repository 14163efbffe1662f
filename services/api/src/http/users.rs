//! `DELETE /v1/users/{user_id}` (scope admin): the GDPR erase. Removes the user's
//! notifications and pending schedules, their delivery status and sent markers,
//! preferences, read and seen positions, devices and contact data, topic subscriptions,
//! aggregation groups, digest entries and dead letters, and answers with what it
//! removed. Channel jobs already queued carry only ids (notification, user, an opaque
//! target hash); a worker that pulls one finds the notification gone, drops it without
//! sending and without writing status back, and acks it off the queue.

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
    // The ids name the delivery status documents; read them before the inbox is purged.
    let ids = notification_ids(state.acceptor.inbox(), &user)
        .await
        .map_err(|e| AppError::unavailable(&e))?;
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
    let delivery_status = state
        .status
        .erase(&user, &ids)
        .await
        .map_err(|e| AppError::unavailable(&e))?;
    // Their topics too: what they follow is theirs, and big topics' publishes (stored
    // once, shared) leave their view with the subscriptions.
    let subscriptions = state
        .subscriptions
        .erase(&user)
        .await
        .map_err(|e| AppError::unavailable(&e))?;
    let nats = state.acceptor.inbox().nats();
    let groups = herald_store::Groups::open(&nats.js)
        .await
        .map_err(|e| AppError::unavailable(&e))?
        .erase(&user)
        .await
        .map_err(|e| AppError::unavailable(&e))?;
    let digest_entries =
        herald_store::Digests::new(nats.clone(), state.acceptor.inbox().subjects().clone())
            .erase(&user)
            .await
            .map_err(|e| AppError::unavailable(&e))?;
    // Dead letters name the job, its folded text and the provider's last answer.
    let dead_letters = nats
        .js
        .get_stream_no_info(herald_protocol::streams::DLQ)
        .await
        .map_err(|e| AppError::unavailable(&e))?
        .purge()
        .filter(state.acceptor.inbox().subjects().dlq_of_user(&user))
        .await
        .map_err(|e| AppError::unavailable(&e))?
        .purged;
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
            "delivery_status": delivery_status,
            "subscriptions": subscriptions,
            "groups": groups,
            "digest_entries": digest_entries,
            "dead_letters": dead_letters,
        }
    })))
}

/// Every notification id in `user`'s inbox.
async fn notification_ids(
    inbox: &herald_store::Inbox,
    user: &UserId,
) -> Result<Vec<String>, herald_store::InboxError> {
    let mut ids = Vec::new();
    let mut after = 0;
    loop {
        let page = inbox.after(user, after, 1_000).await?;
        ids.extend(page.items.into_iter().map(|(_, n)| n.id));
        match page.read_span {
            Some((_, last)) if page.has_more => after = last,
            _ => return Ok(ids),
        }
    }
}
