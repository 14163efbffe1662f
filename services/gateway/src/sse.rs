//! `GET /v1/sse`: Server-Sent Events. `id:` is the seq, so a browser's automatic
//! reconnect sends `Last-Event-ID` and resumes exactly after it.

use crate::GatewayState;
use axum::extract::{RawQuery, State};
use axum::http::request::Parts;
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use futures::stream::{self, StreamExt as _};
use herald_api::AppError;
use herald_protocol::{FieldError, ServerFrame};
use std::convert::Infallible;
use std::sync::Arc;

pub(crate) async fn stream(
    State(state): State<Arc<GatewayState>>,
    RawQuery(query): RawQuery,
    parts: Parts,
) -> Result<Response, AppError> {
    let session = state.auth.session_from_parts(&parts)?;
    let user = session.user;
    let after = match parts.headers.get("last-event-id") {
        Some(v) => Some(
            v.to_str()
                .ok()
                .and_then(|s| s.trim().parse().ok())
                .ok_or_else(|| {
                    AppError::field(FieldError::new("Last-Event-ID", "must be a seq"))
                })?,
        ),
        None => match query
            .as_deref()
            .and_then(|q| herald_api::auth::url_param(q, "after"))
        {
            Some(v) => Some(v.parse().map_err(|_| {
                AppError::field(FieldError::new("after", "must be a whole number (a seq)"))
            })?),
            None => None,
        },
    };
    let ticket = state.admission.admit(&user)?;
    let (feed, hello) = crate::open_session(&state, &user, after).await?;
    let hello = Event::default()
        .event("hello")
        .data(serde_json::to_string(&hello).unwrap_or_default());
    // A bounded queue per connection: a client that stops reading fills only its own
    // queue, and its stream ends (it resumes with Last-Event-ID).
    let (tx, rx) = tokio::sync::mpsc::channel(state.config.queue_frames.max(2));
    let connected = crate::Connected::new("sse");
    tokio::spawn(async move {
        // Each event goes with whether it is a notification, for the counters, which
        // count events as the response reads them (written), not as they are queued.
        let end = crate::feed::pump(feed, tx, |delivery| match delivery {
            crate::feed::Delivery::Notification(n) => {
                let id = n.seq.to_string();
                let data = serde_json::to_string(&ServerFrame::Notification(n)).unwrap_or_default();
                let event = Event::default().id(id).event("notification").data(data);
                (true, event)
            }
            // No `id:`: a read event must not move the client's Last-Event-ID.
            crate::feed::Delivery::Read(up_to) => {
                let data = serde_json::to_string(&ServerFrame::Read { up_to }).unwrap_or_default();
                (false, Event::default().event("read").data(data))
            }
        })
        .await;
        match end {
            crate::feed::PumpEnd::Failed(e) => {
                tracing::warn!(error = %e, "sse feed failed; ending stream");
            }
            // The stream simply ends; the browser resumes with Last-Event-ID.
            crate::feed::PumpEnd::Slow => tracing::debug!("sse client too slow; ending stream"),
            crate::feed::PumpEnd::Closed => {}
        }
        drop(connected);
        drop(ticket);
    });
    let live = tokio_stream::wrappers::ReceiverStream::new(rx).map(|(notification, event)| {
        metrics::counter!("herald_gateway_frames_out_total", "transport" => "sse").increment(1);
        if notification {
            metrics::counter!("herald_gateway_notifications_out_total", "transport" => "sse")
                .increment(1);
        }
        Ok::<_, Infallible>(event)
    });
    // The stream ends when the token does (a session never outlives its credentials); the
    // client reconnects with a fresh token and Last-Event-ID, losing nothing.
    let expiry = tokio::time::sleep(session.valid_for);
    let shutdown = state.shutdown.clone().cancelled_owned();
    let events = stream::once(async move { Ok::<_, Infallible>(hello) })
        .chain(live)
        .take_until(async move {
            tokio::select! {
                () = shutdown => {}
                () = expiry => metrics::counter!("herald_gateway_token_expiries_total", "transport" => "sse").increment(1),
            }
        });
    Ok(Sse::new(events)
        .keep_alive(KeepAlive::new().interval(state.config.heartbeat))
        .into_response())
}
