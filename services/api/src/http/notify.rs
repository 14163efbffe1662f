//! `POST /v1/notify`, `POST /v1/notify/batch`, and `DELETE /v1/notifications/{id}`
//! (cancelling a scheduled one).

use super::ApiState;
use crate::accept::{Accepted, KeyedError};
use crate::auth::Producer;
use crate::error::AppError;
use axum::Json;
use axum::body::Body;
use axum::extract::{Path, State};
use axum::http::{HeaderMap, StatusCode};
use herald_auth::Scope;
use herald_protocol::notification::check_idempotency_key;
use herald_protocol::pages;
use herald_protocol::{ErrorBody, FieldError};
use herald_store::Cancelled;
use serde_json::Value;
use std::sync::Arc;

/// Reads a body up to `limit` bytes, answering 413 past it, and 400 when it cannot be
/// read (the client hung up, broken chunked encoding): not "too large".
pub(crate) async fn read_body(body: Body, limit: usize) -> Result<axum::body::Bytes, AppError> {
    use futures::StreamExt as _;
    let mut chunks = body.into_data_stream();
    let mut read = bytes::BytesMut::new();
    while let Some(chunk) = chunks.next().await {
        let chunk = chunk.map_err(|e| {
            AppError::field(FieldError::new(
                "body",
                format!("the request body could not be read: {e}"),
            ))
        })?;
        if read.len() + chunk.len() > limit {
            return Err(AppError::too_large(limit));
        }
        read.extend_from_slice(&chunk);
    }
    Ok(read.freeze())
}

pub(super) fn idempotency_header(headers: &HeaderMap) -> Result<Option<&str>, AppError> {
    match headers.get("idempotency-key") {
        None => Ok(None),
        Some(v) => v.to_str().map(Some).map_err(|_| {
            AppError::field(FieldError::new(
                "Idempotency-Key",
                "must be printable ASCII",
            ))
        }),
    }
}

/// 409 `idempotency_key_reused`: the key already named another request (of
/// `/v1/notify`, `/v1/notify/batch` or a topic publish) within the dedup window.
pub(super) fn key_reused(message: impl Into<String>) -> AppError {
    AppError::new(StatusCode::CONFLICT, "idempotency_key_reused", message)
}

/// 409 `conflict` with `Retry-After`: concurrent requests with one key are settling
/// which of them it names.
pub(super) fn key_contended() -> AppError {
    AppError::new(
        StatusCode::CONFLICT,
        "conflict",
        "concurrent requests with this Idempotency-Key; retry",
    )
    .retry_after(1)
}

/// A keyed request's refusal as an answer.
fn keyed_error(e: KeyedError) -> AppError {
    match e {
        KeyedError::Accept(e) => e.into(),
        KeyedError::Reused { window } => key_reused(format!(
            "this Idempotency-Key was used with a different request body within the last {} s; \
             use a new key for a new notification (a retry must resend the same body)",
            window.as_secs()
        )),
        KeyedError::Contended => key_contended(),
        KeyedError::Keys(e) => AppError::unavailable(&e),
    }
}

fn accepted_body(a: Accepted) -> pages::Accepted {
    pages::Accepted {
        id: a.id,
        status: if a.send_at.is_some() {
            "scheduled"
        } else {
            "accepted"
        }
        .into(),
        seq: a.seq,
        send_at: a.send_at,
    }
}

pub(super) async fn notify(
    state: State<Arc<ApiState>>,
    producer: Producer,
    headers: HeaderMap,
    body: Body,
) -> Result<(StatusCode, Json<pages::Accepted>), AppError> {
    notify_one(state, producer, headers, body)
        .await
        .inspect_err(|e| count_rejected("http", e))
}

/// Counts notifications refused for what they are (4xx: invalid, too big, over a rate),
/// not for Herald's trouble (503), in `herald_notify_rejected_total{path}`.
fn count_rejected(path: &'static str, error: &AppError) {
    if error.status().is_client_error() {
        metrics::counter!("herald_notify_rejected_total", "path" => path).increment(1);
    }
}

async fn notify_one(
    State(state): State<Arc<ApiState>>,
    producer: Producer,
    headers: HeaderMap,
    body: Body,
) -> Result<(StatusCode, Json<pages::Accepted>), AppError> {
    producer.require(Scope::Notify)?;
    state.rates.check(&producer.0.producer, 1)?;
    let bytes = read_body(body, state.config.body_limit).await?;
    let key = idempotency_header(&headers)?;
    let prepared = state
        .acceptor
        .prepare_keyed(&bytes, &producer.0.producer, key)
        .await
        .map_err(keyed_error)?;
    let accepted = state
        .acceptor
        .commit(prepared)
        .await
        .map_err(AppError::from)?;
    metrics::counter!("herald_notify_accepted_total", "path" => "http").increment(1);
    Ok((StatusCode::ACCEPTED, Json(accepted_body(accepted))))
}

/// One item's outcome in a batch.
#[derive(serde::Serialize)]
#[serde(untagged)]
enum ItemResult {
    Accepted(pages::Accepted),
    Rejected {
        status: &'static str,
        error: herald_protocol::error::ErrorDetail,
        /// The item failed for Herald's trouble (a single notify would have been a 503),
        /// not for what it is: sending it again, with the same idempotency key, may
        /// succeed. `false` for an item that would be refused again (400, 413).
        retryable: bool,
        /// With `retryable`: seconds to wait first (a single notify's `Retry-After`).
        #[serde(skip_serializing_if = "Option::is_none")]
        retry_after_s: Option<u64>,
    },
}

pub(super) async fn batch(
    state: State<Arc<ApiState>>,
    producer: Producer,
    headers: HeaderMap,
    body: Body,
) -> Result<(StatusCode, Json<Value>), AppError> {
    batch_all(state, producer, headers, body)
        .await
        .inspect_err(|e| count_rejected("batch", e))
}

async fn batch_all(
    State(state): State<Arc<ApiState>>,
    producer: Producer,
    headers: HeaderMap,
    body: Body,
) -> Result<(StatusCode, Json<Value>), AppError> {
    producer.require(Scope::Notify)?;
    let bytes = read_body(body, state.config.batch_body_limit).await?;
    let batch_key = idempotency_header(&headers)?;
    // Checked once for the whole batch: the items' keys are derived from it.
    if let Some(k) = batch_key {
        check_idempotency_key("Idempotency-Key", k).map_err(AppError::field)?;
    }
    #[derive(serde::Deserialize)]
    #[serde(deny_unknown_fields)]
    struct Batch {
        notifications: Vec<Box<serde_json::value::RawValue>>,
    }
    // An object only: serde would read `[[…]]` as `{"notifications":[…]}`.
    let parsed: Batch = herald_protocol::notification::object_from_json(
        &bytes,
        "expected {\"notifications\": [...]}",
    )
    .map_err(AppError::field)?;
    let max = state.config.batch_max_items;
    if parsed.notifications.is_empty() || parsed.notifications.len() > max {
        return Err(AppError::field(FieldError::new(
            "notifications",
            format!("must hold 1 to {max} items"),
        )));
    }
    state
        .rates
        .check(&producer.0.producer, parsed.notifications.len() as u32)?;
    if !state.acceptor.inbox().nats().is_connected() {
        // The whole batch is a 503 with Retry-After, as a single notify is.
        return Err(AppError::unavailable(
            &herald_store::InboxError::Unavailable("not connected to NATS".into()),
        ));
    }
    // Each item is held to the limit of one notification (`POST /v1/notify`'s body
    // limit): a batch is no way around it.
    let item_limit = state.config.body_limit;
    let fits = |raw: &serde_json::value::RawValue| raw.get().len() <= item_limit;
    // Validate everything, send every valid append, then collect acks: one round trip of
    // latency for the whole batch.
    // Templated items render in their recipient's locale: one batched preference read
    // for the whole batch rather than one round trip per item.
    let locales = state
        .acceptor
        .read_locales(
            parsed
                .notifications
                .iter()
                .filter(|raw| fits(raw))
                .map(|raw| raw.get().as_bytes()),
        )
        .await
        .map_err(AppError::from)?;
    let mut results: Vec<Option<ItemResult>> = Vec::with_capacity(parsed.notifications.len());
    let mut pending = Vec::new();
    for (i, raw) in parsed.notifications.iter().enumerate() {
        if !fits(raw) {
            results.push(Some(rejected(AppError::new(
                StatusCode::PAYLOAD_TOO_LARGE,
                "payload_too_large",
                format!(
                    "the notification is {} bytes, over the {item_limit}-byte limit of one notification",
                    raw.get().len()
                ),
            ))));
            continue;
        }
        match state
            .acceptor
            .prepare_item(
                raw.get().as_bytes(),
                &producer.0.producer,
                batch_key,
                i,
                &locales,
            )
            .await
        {
            Err(e) => results.push(Some(rejected(keyed_error(e)))),
            Ok(prepared) => match state.acceptor.send(&prepared).await {
                Ok(ack) => {
                    results.push(None);
                    pending.push((i, prepared, ack));
                }
                // Items already sent stay sent: report this one, carry on with the rest.
                Err(e) => results.push(Some(rejected(AppError::from(e)))),
            },
        }
    }
    for (i, prepared, ack) in pending {
        results[i] = Some(match crate::Acceptor::finish(prepared, ack).await {
            Ok(a) => ItemResult::Accepted(accepted_body(a)),
            Err(e) => rejected(AppError::from(e)),
        });
    }
    let accepted = results
        .iter()
        .filter(|r| matches!(r, Some(ItemResult::Accepted(_))))
        .count();
    metrics::counter!("herald_notify_accepted_total", "path" => "batch").increment(accepted as u64);
    Ok((
        StatusCode::ACCEPTED,
        Json(serde_json::json!({ "accepted": accepted, "results": results })),
    ))
}

/// One refused item of a batch, counted (the batch as a whole is a 202).
fn rejected(error: AppError) -> ItemResult {
    count_rejected("batch", &error);
    let retryable = error.status().is_server_error();
    let retry_after_s = error.retry_after_secs().filter(|_| retryable);
    let body = ErrorBody::from(error);
    ItemResult::Rejected {
        status: "rejected",
        error: body.error,
        retryable,
        retry_after_s,
    }
}

impl From<AppError> for ErrorBody {
    fn from(e: AppError) -> Self {
        e.into_body()
    }
}

/// `DELETE /v1/notifications/{id}`: cancels a scheduled notification before it fires.
pub(super) async fn cancel(
    State(state): State<Arc<ApiState>>,
    producer: Producer,
    Path(id): Path<String>,
) -> Result<Json<Value>, AppError> {
    producer.require(Scope::Notify)?;
    // Ids are issued (and schedules stored) in the hyphenated lower-case form; any other
    // spelling of the same UUID (upper case, braces, no hyphens) names the same one.
    let id = match uuid::Uuid::parse_str(&id) {
        Ok(uuid) => uuid.hyphenated().to_string(),
        Err(_) => {
            return Err(AppError::field(FieldError::new(
                "id",
                "not a notification id (a UUID)",
            )));
        }
    };
    match state
        .acceptor
        .cancel(&id, &producer.0.producer)
        .await
        .map_err(AppError::from)?
    {
        Cancelled::Cancelled => {
            metrics::counter!("herald_scheduled_cancelled_total").increment(1);
            Ok(Json(serde_json::json!({"id": id, "status": "cancelled"})))
        }
        Cancelled::NotPending => Err(AppError::new(
            StatusCode::NOT_FOUND,
            "not_pending",
            "no scheduled notification with this id is pending for this producer: it was sent \
             already, cancelled already, or never scheduled",
        )),
    }
}
