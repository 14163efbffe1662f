//! `GET /v1/ws`: WebSocket transport.
//!
//! Authenticated at the upgrade (header or `access_token`); `?after=<seq>` resumes. The
//! session (feed, hello, admission ticket) is opened before the upgrade is answered, so a
//! refusal is a plain HTTP error; the connection itself is one task, [`conn::Conn`],
//! whose bounded queue of outgoing frames makes a client that reads too slowly close
//! with 4008, never slowing anyone else.
//!
//! A browser never sees the status of a refused upgrade. So a plain GET of the same URL
//! (no `Upgrade` header) is a probe: it is authenticated the same way and answered with
//! what admission would say now ([`crate::admission::Admission::probe`]): 503 with
//! `Retry-After` while the gateway is refusing upgrades, 429 at the user's cap, else 426
//! (this URL takes WebSocket upgrades; if yours failed, something between us drops
//! them). The answer is readable cross-origin (`Access-Control-Allow-Origin: *`, the
//! token travels in the query as for the WebSocket itself) and carries no user data.

mod conn;

use crate::GatewayState;
use axum::extract::ws::rejection::WebSocketUpgradeRejection;
use axum::extract::ws::{CloseFrame, Message, Utf8Bytes, WebSocketUpgrade};
use axum::extract::{RawQuery, State};
use axum::http::request::Parts;
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use herald_api::AppError;
use herald_protocol::{ClientFrame, FieldError, ServerFrame, UserId};
use herald_store::Mark;
use std::sync::Arc;

/// Close codes (RFC 6455 and Herald's own 4xxx).
pub mod close {
    /// Binary frames are not part of the protocol.
    pub const UNSUPPORTED: u16 = 1003;
    /// Not JSON or not UTF-8.
    pub const INVALID_PAYLOAD: u16 = 1007;
    /// A frame that parses but breaks the protocol.
    pub const POLICY: u16 = 1008;
    /// A frame over the size limit.
    pub const TOO_BIG: u16 = 1009;
    /// Server error (NATS unavailable): reconnect with backoff.
    pub const INTERNAL: u16 = 1011;
    /// Server going away.
    pub const GOING_AWAY: u16 = 1001;
    /// The client read too slowly; resume from the last seq.
    pub const SLOW_CONSUMER: u16 = 4008;
    /// Missed heartbeats.
    pub const HEARTBEAT: u16 = 4000;
    /// The token the session was opened with expired: reconnect with a fresh one.
    pub const TOKEN_EXPIRED: u16 = 4001;
}

pub(crate) async fn upgrade(
    State(state): State<Arc<GatewayState>>,
    RawQuery(query): RawQuery,
    parts: Parts,
    ws: Result<WebSocketUpgrade, WebSocketUpgradeRejection>,
) -> Response {
    match ws {
        Ok(ws) => open(state, query, parts, ws).await.into_response(),
        Err(_) if !parts.headers.contains_key(header::UPGRADE) => probe(&state, &parts),
        // An upgrade that is malformed (a wrong version, no key): axum's answer says how.
        Err(rejection) => rejection.into_response(),
    }
}

/// The answer to a plain GET of the WebSocket URL (see the module doc).
fn probe(state: &GatewayState, parts: &Parts) -> Response {
    let answer = state
        .auth
        .user_from_parts(parts)
        .and_then(|user| state.admission.probe(&user));
    let mut response = match answer {
        Ok(()) => {
            let mut r = AppError::new(
                StatusCode::UPGRADE_REQUIRED,
                "upgrade_required",
                "this URL serves WebSocket: send an upgrade request (one would be accepted now)",
            )
            .into_response();
            r.headers_mut()
                .insert(header::UPGRADE, HeaderValue::from_static("websocket"));
            r
        }
        Err(e) => e.into_response(),
    };
    let headers = response.headers_mut();
    headers.insert(
        header::ACCESS_CONTROL_ALLOW_ORIGIN,
        HeaderValue::from_static("*"),
    );
    headers.insert(
        header::ACCESS_CONTROL_EXPOSE_HEADERS,
        HeaderValue::from_static("retry-after"),
    );
    response
}

async fn open(
    state: Arc<GatewayState>,
    query: Option<String>,
    parts: Parts,
    ws: WebSocketUpgrade,
) -> Result<Response, AppError> {
    let auth = state.auth.session_from_parts(&parts)?;
    let user = auth.user;
    let after = parse_after(query.as_deref())?;
    let ticket = state.admission.admit(&user)?;
    let (feed, hello) = crate::open_session(&state, &user, after).await?;
    let config = state.config;
    // One pointer is all the upgrade closure captures (axum keeps it for the
    // connection's whole life); the hello is serialized before the upgrade.
    let session = conn::Session::new(state, feed, text(&hello), ticket, auth.valid_for);
    Ok(ws
        // Client frames are tiny (`read`, `ack`): a small read buffer, grown on demand.
        .read_buffer_size(256)
        .write_buffer_size(0)
        .max_message_size(config.max_client_frame)
        .max_frame_size(config.max_client_frame)
        .on_upgrade(move |socket| conn::Conn::new(socket, session))
        .into_response())
}

fn parse_after(query: Option<&str>) -> Result<Option<u64>, AppError> {
    match query.and_then(|q| herald_api::auth::url_param(q, "after")) {
        None => Ok(None),
        Some(v) => v.parse().map(Some).map_err(|_| {
            AppError::field(FieldError::new("after", "must be a whole number (a seq)"))
        }),
    }
}

/// How a connection ends.
enum Outcome {
    /// With this close frame.
    Close(u16, &'static str),
    /// The peer hung up (or the socket failed): nothing more to send.
    Gone,
}

async fn on_client_frame(
    state: &GatewayState,
    user: &UserId,
    text: &str,
) -> Result<Option<ServerFrame>, Outcome> {
    let value: serde_json::Value = serde_json::from_str(text)
        .map_err(|_| Outcome::Close(close::INVALID_PAYLOAD, "frames must be JSON"))?;
    let frame: ClientFrame = serde_json::from_value(value)
        .map_err(|_| Outcome::Close(close::POLICY, "unknown or malformed frame"))?;
    match frame {
        // Batched: one KV write per user per flush, however many frames.
        ClientFrame::Read { up_to } => state
            .receipts
            .mark(Mark::Read, user, up_to)
            .await
            .map_err(|_| Outcome::Close(close::GOING_AWAY, "server restarting"))?,
        ClientFrame::Ack { up_to } => state
            .receipts
            .mark(Mark::Seen, user, up_to)
            .await
            .map_err(|_| Outcome::Close(close::GOING_AWAY, "server restarting"))?,
        ClientFrame::Subscribe { topic } => {
            return Ok(Some(subscription(state, user, topic, true).await));
        }
        ClientFrame::Unsubscribe { topic } => {
            return Ok(Some(subscription(state, user, topic, false).await));
        }
    }
    Ok(None)
}

/// Joins or leaves a topic for a `subscribe`/`unsubscribe` frame; the answer says how it
/// went (a refusal is an answer, not a reason to drop the connection).
async fn subscription(
    state: &GatewayState,
    user: &UserId,
    topic: String,
    join: bool,
) -> ServerFrame {
    let refuse = |topic: String, error: &str| ServerFrame::Subscription {
        topic,
        subscribed: false,
        error: Some(error.to_owned()),
    };
    let Some(topics) = &state.topics else {
        return refuse(topic, "topics are not served by this gateway");
    };
    let id = match herald_protocol::TopicId::new(topic.clone()) {
        Ok(id) => id,
        Err(e) => return refuse(topic, &e.to_string()),
    };
    if join && !topics.settings.allows_self(&id) {
        return refuse(
            topic,
            "this topic does not allow users to subscribe themselves",
        );
    }
    let done = if join {
        topics
            .subscriptions
            .subscribe(&id, std::slice::from_ref(user), "self")
            .await
            .map(|_| ())
    } else {
        topics
            .subscriptions
            .unsubscribe(&id, user)
            .await
            .map(|_| ())
    };
    match done {
        Ok(()) => ServerFrame::Subscription {
            topic,
            subscribed: join,
            error: None,
        },
        Err(e) => {
            // What the caller can act on is said as it is (as `POST /v1/me/subscriptions`
            // answers it with a 409); only NATS trouble is "try again".
            let error = match &e {
                herald_store::TopicsError::TooMany(_) | herald_store::TopicsError::Contended(_) => {
                    e.to_string()
                }
                herald_store::TopicsError::Unavailable(_) | herald_store::TopicsError::Read(_) => {
                    tracing::warn!(error = %e, "topic subscription failed");
                    "the subscription store is unavailable; try again".into()
                }
            };
            ServerFrame::Subscription {
                topic,
                subscribed: !join,
                error: Some(error),
            }
        }
    }
}

fn is_too_big(e: &axum::Error) -> bool {
    let text = e.to_string();
    text.contains("too long") || text.contains("too big") || text.contains("Space limit")
}

fn text(frame: &ServerFrame) -> Message {
    Message::Text(Utf8Bytes::from(
        serde_json::to_string(frame).unwrap_or_else(|_| String::from("{}")),
    ))
}

fn close_frame(code: u16, reason: &'static str) -> Message {
    Message::Close(Some(CloseFrame {
        code,
        reason: Utf8Bytes::from_static(reason),
    }))
}
