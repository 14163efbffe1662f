//! Inbox pages: `GET /v1/users/{user_id}/notifications` here, and [`read_page`] for the
//! gateway's `GET /v1/me/notifications`.

use super::ApiState;
use crate::auth::Producer;
use crate::error::AppError;
use axum::Json;
use axum::extract::{Path, RawQuery, State};
use herald_auth::Scope;
use herald_protocol::pages::InboxPageBody;
use herald_protocol::{FieldError, Notification, UserId};
use herald_store::{Inbox, ReadPositions};
use std::sync::Arc;

/// Default page size.
pub const DEFAULT_LIMIT: usize = 50;

/// Paging parameters: `after`, `before`, `limit`, `wait` (seconds, long-poll).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct PageQuery {
    /// Items with `seq > after`, oldest first.
    pub after: Option<u64>,
    /// The newest items with `seq < before`.
    pub before: Option<u64>,
    /// Page size, 1–500.
    pub limit: usize,
    /// Long-poll seconds, 0–60.
    pub wait: u64,
}

impl PageQuery {
    /// Parses a query string, naming the bad parameter.
    ///
    /// # Errors
    /// 400 naming the parameter.
    pub fn parse(query: Option<&str>) -> Result<Self, AppError> {
        let mut q = Self {
            limit: DEFAULT_LIMIT,
            ..Self::default()
        };
        for (k, v) in form_urlencoded::parse(query.unwrap_or("").as_bytes()) {
            let num = |max: u64| -> Result<u64, AppError> {
                v.parse::<u64>().ok().filter(|n| *n <= max).ok_or_else(|| {
                    AppError::field(FieldError::new(
                        k.to_string(),
                        format!("must be a whole number from 0 to {max}"),
                    ))
                })
            };
            match &*k {
                "after" => q.after = Some(num(u64::MAX)?),
                "before" => q.before = Some(num(u64::MAX)?),
                "limit" => q.limit = num(herald_store::inbox::MAX_PAGE as u64)?.max(1) as usize,
                "wait" => q.wait = num(60)?,
                _ => {}
            }
        }
        if q.after.is_some() && q.before.is_some() {
            return Err(AppError::field(FieldError::new(
                "before",
                "give after or before, not both",
            )));
        }
        Ok(q)
    }
}

/// Reads one page of `user`'s inbox, marking items read up to the read position.
///
/// # Errors
/// 503 when NATS cannot answer.
pub async fn read_page(
    inbox: &Inbox,
    reads: &ReadPositions,
    user: &UserId,
    query: &PageQuery,
) -> Result<InboxPageBody, AppError> {
    let page = match query.after {
        Some(after) => inbox.after(user, after, query.limit).await,
        None => inbox.before(user, query.before, query.limit).await,
    }
    .map_err(|e| AppError::unavailable(&e))?;
    let read_up_to = reads
        .get(user)
        .await
        .map_err(|e| AppError::unavailable(&e))?;
    let read_span = page.read_span;
    let items: Vec<Notification> = page
        .items
        .into_iter()
        .map(|(seq, n)| Notification::from_stored(n, seq, seq <= read_up_to))
        .collect();
    // From what was read, not what decoded: a skipped message must not pin the cursor.
    let next_after = read_span.map_or(query.after.unwrap_or(0), |(_, last)| last);
    let prev_before = read_span.map(|(first, _)| first);
    Ok(InboxPageBody {
        items,
        next_after,
        prev_before,
        has_more: page.has_more,
    })
}

pub(super) async fn producer_page(
    State(state): State<Arc<ApiState>>,
    producer: Producer,
    Path(user_id): Path<String>,
    RawQuery(query): RawQuery,
) -> Result<Json<InboxPageBody>, AppError> {
    producer.require(Scope::Read)?;
    let user = UserId::new(user_id)
        .map_err(|e| AppError::field(FieldError::new("user_id", e.to_string())))?;
    let query = PageQuery::parse(query.as_deref())?;
    let reads = &state.reads;
    Ok(Json(
        read_page(state.acceptor.inbox(), reads, &user, &query).await?,
    ))
}
