//! `GET /v1/sse`: Server-Sent Events. `id:` is the seq, so a browser's automatic
//! reconnect sends `Last-Event-ID` and resumes exactly after it. The `hello` carries the
//! position the stream starts from as its `id:` too: a plain `EventSource` that started
//! live and reconnects by itself before any notification came resumes from there, not
//! live again (which would skip what was stored while it was away).
//!
//! The session is a task of its own ([`serve`]): it moves the feed into a bounded queue,
//! and ends it when the client is too slow, the feed fails, the token expires or the
//! server shuts down — whether or not the response is being written. A client that stops
//! reading stops hyper from polling the response body, so nothing inside the body could
//! notice any of that; the task drops the queue (and the feed, and its live
//! registrations) at once, and the body ends as soon as it is polled again. The
//! admission ticket and the connection gauge belong to the body: a response the server
//! still holds open counts against the user's cap for as long as it is open.
//!
//! At shutdown the stream's last event is a `reconnect` (`{"type":"reconnect",
//! "after_ms":n}`, jittered as on WebSocket) with `retry: n`, so a plain `EventSource`
//! also comes back spread out rather than all at once.

use crate::feed::{Delivery, PumpEnd};
use crate::{Connected, GatewayState};
use axum::extract::{RawQuery, State};
use axum::http::request::Parts;
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use futures::Stream;
use futures::task::AtomicWaker;
use herald_api::AppError;
use herald_protocol::{FieldError, ServerFrame};
use std::convert::Infallible;
use std::pin::Pin;
use std::sync::{Arc, Mutex, OnceLock, PoisonError};
use std::task::{Context, Poll};
use std::time::Duration;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

/// An event queued for the response, and whether it is a notification (for the counters).
type Queued = (bool, Event);

/// Longest `after_ms` of a shutdown's `reconnect` event: reconnects spread over 5 s.
const RECONNECT_SPREAD_MS: u64 = 5_000;

pub(crate) async fn stream(
    State(state): State<Arc<GatewayState>>,
    RawQuery(query): RawQuery,
    parts: Parts,
) -> Result<Response, AppError> {
    let session = state.auth.session_from_parts(&parts)?;
    let user = session.user;
    // From now: the token's lifetime counts from its verification.
    let expiry = tokio::time::sleep(session.valid_for);
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
    // The position the feed starts from: the client's `after`, the view's head when
    // live only, or 0 when a recreated inbox is replayed whole.
    let hello = Event::default()
        .id(feed.position().to_string())
        .event("hello")
        .data(serde_json::to_string(&hello).unwrap_or_default());
    // A bounded queue per connection: a client that stops reading fills only its own
    // queue, and its stream ends (it resumes with Last-Event-ID).
    let (tx, rx) = mpsc::channel(state.config.queue_frames.max(2));
    let outlet = Arc::new(Outlet {
        rx: Mutex::new(Some(rx)),
        end: OnceLock::new(),
        waker: AtomicWaker::new(),
    });
    tokio::spawn(serve(
        feed,
        tx,
        outlet.clone(),
        state.shutdown.clone(),
        expiry,
    ));
    let body = Body {
        hello: Some(hello),
        outlet,
        done: false,
        _ticket: ticket,
        _connected: Connected::new("sse"),
    };
    Ok(Sse::new(body)
        .keep_alive(KeepAlive::new().interval(state.config.heartbeat))
        .into_response())
}

/// Why a session ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum End {
    /// The client read too slowly, the feed failed, or the response went away.
    Over,
    /// The token expired: a session never outlives its credentials (the client
    /// reconnects with a fresh token and Last-Event-ID, losing nothing).
    Expired,
    /// The server is shutting down: the client is told when to come back.
    Shutdown {
        /// The jittered wait of the `reconnect` event.
        after_ms: u64,
    },
}

/// What the session task and the response body share.
#[derive(Debug)]
struct Outlet {
    /// The queued events; taken (and so dropped) by whichever side ends first.
    rx: Mutex<Option<mpsc::Receiver<Queued>>>,
    /// Set once by the session task when it ends.
    end: OnceLock<End>,
    /// The body's waker, for the end.
    waker: AtomicWaker,
}

impl Outlet {
    fn rx(&self) -> std::sync::MutexGuard<'_, Option<mpsc::Receiver<Queued>>> {
        self.rx.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// The session is over: what is queued is dropped now, even if the body is never
    /// polled again, and the body ends when it is.
    fn finish(&self, end: End) {
        let _ = self.end.set(end);
        drop(self.rx().take());
        self.waker.wake();
    }
}

/// Runs a session: the feed into the queue until the client is too slow, the feed fails,
/// the response goes away, the token expires or the server shuts down.
async fn serve(
    feed: crate::feed::Feed,
    tx: mpsc::Sender<Queued>,
    outlet: Arc<Outlet>,
    shutdown: CancellationToken,
    expiry: tokio::time::Sleep,
) {
    // Each event goes with whether it is a notification, for the counters, which count
    // events as the response reads them (written), not as they are queued.
    let pumped = crate::feed::pump(feed, tx, |delivery| match delivery {
        Delivery::Notification(n) => {
            let id = n.seq.to_string();
            let data = serde_json::to_string(&ServerFrame::Notification(n)).unwrap_or_default();
            (
                true,
                Event::default().id(id).event("notification").data(data),
            )
        }
        // No `id:`: a read event must not move the client's Last-Event-ID.
        Delivery::Read(up_to) => {
            let data = serde_json::to_string(&ServerFrame::Read { up_to }).unwrap_or_default();
            (false, Event::default().event("read").data(data))
        }
    });
    // The feed (its live registrations, any read in flight) goes with the pump.
    let end = tokio::select! {
        end = pumped => {
            match end {
                PumpEnd::Failed(e) => tracing::warn!(error = %e, "sse feed failed; ending stream"),
                PumpEnd::Slow => tracing::debug!("sse client too slow; ending stream"),
                PumpEnd::Closed => {}
            }
            End::Over
        }
        () = expiry => {
            metrics::counter!("herald_gateway_token_expiries_total", "transport" => "sse")
                .increment(1);
            End::Expired
        }
        () = shutdown.cancelled() => End::Shutdown {
            // Spread reconnects so a restart is not a thundering herd.
            after_ms: rand::random_range(0..RECONNECT_SPREAD_MS),
        },
    };
    outlet.finish(end);
}

/// The response body: the `hello`, then what the session queues, until it ends.
struct Body {
    hello: Option<Event>,
    outlet: Arc<Outlet>,
    done: bool,
    /// The user's place under the per-user cap, held while the response is.
    _ticket: crate::admission::Ticket,
    /// In the connection gauge while the response is open.
    _connected: Connected,
}

impl Stream for Body {
    type Item = Result<Event, Infallible>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        if let Some(hello) = self.hello.take() {
            return Poll::Ready(Some(Ok(hello)));
        }
        if self.done {
            return Poll::Ready(None);
        }
        // Registered before the end is checked: an end set after the check wakes us.
        self.outlet.waker.register(cx.waker());
        if let Some(&end) = self.outlet.end.get() {
            // What is still queued is not sent: the client resumes from the last id it
            // received, so it loses nothing, and an ending session does not wait on it.
            self.done = true;
            return Poll::Ready(match end {
                End::Shutdown { after_ms } => Some(Ok(reconnect(after_ms))),
                End::Over | End::Expired => None,
            });
        }
        let mut rx = self.outlet.rx();
        let Some(rx) = rx.as_mut() else {
            // Taken by an ending session, whose end wakes us.
            return Poll::Pending;
        };
        match rx.poll_recv(cx) {
            Poll::Ready(Some((notification, event))) => {
                metrics::counter!("herald_gateway_frames_out_total", "transport" => "sse")
                    .increment(1);
                if notification {
                    metrics::counter!("herald_gateway_notifications_out_total", "transport" => "sse")
                        .increment(1);
                }
                Poll::Ready(Some(Ok(event)))
            }
            // The pump is gone; the session's end follows and wakes us.
            Poll::Ready(None) | Poll::Pending => Poll::Pending,
        }
    }
}

impl Drop for Body {
    fn drop(&mut self) {
        // The response is gone: the pump sees its queue closed and the session ends.
        drop(self.outlet.rx().take());
    }
}

/// The last event of a stream ended by a shutdown: when to come back, as a `reconnect`
/// frame for clients that read it and as `retry:` for a plain `EventSource`. No `id:`:
/// the client's Last-Event-ID stays its last notification.
fn reconnect(after_ms: u64) -> Event {
    let data = serde_json::to_string(&ServerFrame::Reconnect { after_ms }).unwrap_or_default();
    Event::default()
        .event("reconnect")
        .retry(Duration::from_millis(after_ms))
        .data(data)
}
