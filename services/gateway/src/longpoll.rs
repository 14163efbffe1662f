//! `GET /v1/me/notifications?after=&before=&limit=&wait=`: an inbox page; with `after`
//! and `wait`, an empty page waits up to `wait` seconds for the next notification. A
//! waiting poll is admitted like a connection (upgrade rate, per-user cap, adaptive cap).

use crate::GatewayState;
use crate::feed::Feed;
use axum::Json;
use axum::extract::{RawQuery, State};
use herald_api::AppError;
use herald_api::auth::User;
use herald_api::http::{PageQuery, read_page};
use herald_protocol::pages::InboxPageBody;
use std::sync::Arc;
use std::time::Duration;

pub(crate) async fn page(
    State(state): State<Arc<GatewayState>>,
    User(user): User,
    RawQuery(query): RawQuery,
) -> Result<Json<InboxPageBody>, AppError> {
    let query = PageQuery::parse(query.as_deref())?;
    let (Some(after), true) = (query.after, query.wait > 0) else {
        return Ok(Json(
            read_page(&state.inbox, &state.reads, &user, &query).await?,
        ));
    };
    // A waiting poll holds a live registration like a connection does, so it passes the
    // same admission: the upgrade rate, the per-user cap (its ticket is held while it
    // waits), and the adaptive cap on opens that read the store.
    let _ticket = state.admission.admit(&user)?;
    let opening = state.admission.begin_open().await?;
    // Open a feed at `after`: it replays what is there, or waits for the next one live.
    let opened = async {
        let read_up_to = state
            .reads
            .get(&user)
            .await
            .map_err(|e| AppError::unavailable(&e))?;
        Feed::open(&state.hub, user.clone(), Some(after), read_up_to)
            .await
            .map_err(|e| AppError::unavailable(&e))
    }
    .await;
    opening.finish(opened.is_ok());
    let mut feed = opened?.paced(std::sync::Arc::clone(&state.replay_pace));
    // A position past the INBOX stream's end is from another life of it (recreated or
    // restored): the feed replays the whole inbox, and so does this poll, its page read
    // from the start; a `next_after` below the `after` asked tells the client. Read from
    // `after`, it would answer an empty page at once, again and again.
    let query = if feed.position() < after {
        PageQuery {
            after: Some(0),
            ..query
        }
    } else {
        query
    };
    let first = feed
        .next_ready()
        .await
        .map_err(|e| AppError::unavailable(&e))?;
    if first.is_empty() {
        let _waiting = crate::Connected::new("longpoll");
        // Wait for a notification; a read announcement alone does not end the wait. The
        // feed answers a read announcement (an empty batch) until it is taken: taking it
        // is what lets the next `next()` wait instead of answering at once, forever.
        let next_notification = async {
            loop {
                if !feed.next().await?.is_empty() {
                    return Ok::<_, crate::feed::FeedError>(());
                }
                feed.take_read();
            }
        };
        let waited = tokio::time::timeout(Duration::from_secs(query.wait), next_notification).await;
        if let Ok(Err(e)) = waited {
            return Err(AppError::unavailable(&e));
        }
    }
    // Whatever arrived, answer with a proper page from the inbox (limit, has_more, read).
    Ok(Json(
        read_page(&state.inbox, &state.reads, &user, &query).await?,
    ))
}
