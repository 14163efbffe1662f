//! `GET /v1/ws`: WebSocket transport.
//!
//! Authenticated at the upgrade (header or `access_token`); `?after=<seq>` resumes.
//! A writer task drains a bounded queue to the socket, so a client that reads too slowly
//! fills only its own queue and is closed with 4008, never slowing anyone else.
//!
//! Two tasks per connection, no more: the connection task reads client frames, sends
//! pings and moves the user's feed into the queue (one `select!`); the writer drains the
//! queue. Both queues (hub → feed, feed → writer) are [`crate::queue::Queue`]s, which
//! cost nothing while empty: an idle connection is mostly its socket.

use crate::GatewayState;
use crate::feed::{Delivery, Feed};
use crate::queue::{PushError, Queue};
use axum::extract::ws::{CloseFrame, Message, Utf8Bytes, WebSocket, WebSocketUpgrade};
use axum::extract::{RawQuery, State};
use axum::http::request::Parts;
use axum::response::{IntoResponse, Response};
use futures::{SinkExt as _, StreamExt as _};
use herald_api::AppError;
use herald_protocol::{ClientFrame, FieldError, ServerFrame, UserId};
use herald_store::Mark;
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// How long a closing handshake may take.
const CLOSE_GRACE: Duration = Duration::from_secs(1);
use tokio::time::{Instant, interval_at};

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
}

pub(crate) async fn upgrade(
    State(state): State<Arc<GatewayState>>,
    RawQuery(query): RawQuery,
    parts: Parts,
    ws: WebSocketUpgrade,
) -> Result<Response, AppError> {
    let user = state.auth.user_from_parts(&parts)?;
    let after = parse_after(query.as_deref())?;
    let ticket = state.admission.admit(&user)?;
    let (feed, hello) = crate::open_session(&state, &user, after).await?;
    Ok(ws
        // Client frames are tiny (`read`, `ack`): a small read buffer, grown on demand.
        .read_buffer_size(256)
        .write_buffer_size(0)
        .max_message_size(state.config.max_client_frame)
        .max_frame_size(state.config.max_client_frame)
        // The connection's future is `serve` itself (no wrapper holding a second copy of
        // its arguments); the hello is serialized before the upgrade.
        .on_upgrade(move |socket| serve(socket, state, user, feed, text(&hello), ticket))
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

/// What a connection's writer sends: ready frames, or notifications it may coalesce.
/// Both boxed: an idle connection's queue holds one block of 32 of these, so each stays
/// a pointer and a tag (16 bytes, not 208).
enum Out {
    Msg(Box<Message>),
    Note(Box<herald_protocol::Notification>),
}

impl Out {
    fn msg(m: Message) -> Self {
        Out::Msg(Box::new(m))
    }

    fn into_message(self) -> Message {
        match self {
            Out::Msg(m) => *m,
            Out::Note(n) => text(&ServerFrame::Notification(*n)),
        }
    }
}

type Sink = futures::stream::SplitSink<WebSocket, Message>;

/// What the connection task and its writer share: the bounded queue of frames, and the
/// close frame to end with.
struct Outbox {
    queue: Queue<Out>,
    close: Mutex<Option<(u16, &'static str)>>,
}

impl Outbox {
    fn new(frames: usize) -> Self {
        Self {
            queue: Queue::new(frames),
            close: Mutex::new(None),
        }
    }

    /// Tells the writer to end with this close frame.
    fn close_with(&self, code: u16, reason: &'static str) {
        if let Ok(mut close) = self.close.lock() {
            *close = Some((code, reason));
        }
        self.queue.close();
    }

    fn take_close(&self) -> Option<(u16, &'static str)> {
        self.close.lock().ok()?.take()
    }
}

/// Drains a connection's queue to its socket until told to close or the queue ends.
async fn write_loop(mut sink: Sink, outbox: Arc<Outbox>, max_batch: usize) {
    let rx = &outbox.queue;
    loop {
        if let Some((code, reason)) = outbox.take_close() {
            // Boxed: the closing path's timer is only allocated when closing, so an idle
            // writer stays small.
            Box::pin(close_with(&mut sink, rx, code, reason)).await;
            break;
        }
        {
            match rx.pop().await {
                Some(Out::Note(first)) => {
                    // Coalesce: whatever queued up while the last write was in flight
                    // goes out as one `batch` frame. No added latency when idle.
                    let mut items = vec![*first];
                    let mut after = None;
                    while items.len() < max_batch {
                        match rx.try_pop() {
                            Some(Out::Note(n)) => items.push(*n),
                            Some(Out::Msg(m)) => {
                                after = Some(*m);
                                break;
                            }
                            None => break,
                        }
                    }
                    let frame = if items.len() == 1 {
                        items.pop().map(ServerFrame::Notification)
                    } else {
                        metrics::counter!("herald_gateway_batches_total").increment(1);
                        Some(ServerFrame::Batch { items })
                    };
                    if let Some(frame) = frame
                        && sink.send(text(&frame)).await.is_err()
                    {
                        break;
                    }
                    if let Some(m) = after
                        && sink.send(m).await.is_err()
                    {
                        break;
                    }
                }
                Some(Out::Msg(m)) => {
                    if sink.send(*m).await.is_err() {
                        break;
                    }
                }
                None => {
                    if let Some((code, reason)) = outbox.take_close() {
                        Box::pin(close_with(&mut sink, rx, code, reason)).await;
                    }
                    break;
                }
            }
        }
    }
    // The connection task sees the writer gone (a peer that stopped reading or hung up).
    rx.close();
    Box::pin(async {
        let _ = tokio::time::timeout(CLOSE_GRACE, sink.close()).await;
    })
    .await;
}

/// Flushes what is queued (a `reconnect` frame, say) unless the peer is the problem, then
/// sends the close frame; all within the grace period.
async fn close_with(sink: &mut Sink, rx: &Queue<Out>, code: u16, reason: &'static str) {
    let flush = code != close::SLOW_CONSUMER;
    let _ = tokio::time::timeout(CLOSE_GRACE, async {
        while flush && let Some(out) = rx.try_pop() {
            sink.send(out.into_message()).await?;
        }
        sink.send(close_frame(code, reason)).await
    })
    .await;
}

enum Outcome {
    Close(u16, &'static str),
    Gone,
}

/// Moves what the feed handed out into the connection's queue; a full queue is a slow
/// client (4008).
fn deliver(
    queue: &Queue<Out>,
    items: Vec<herald_protocol::Notification>,
    read: Option<u64>,
) -> Result<(), Outcome> {
    let read = read.map(Delivery::Read);
    for delivery in items.into_iter().map(Delivery::Notification).chain(read) {
        metrics::counter!("herald_gateway_frames_out_total", "transport" => "ws").increment(1);
        let out = match delivery {
            Delivery::Notification(n) => Out::Note(Box::new(n)),
            Delivery::Read(up_to) => Out::msg(text(&ServerFrame::Read { up_to })),
        };
        match queue.try_push(out) {
            Ok(()) => {}
            Err(PushError::Full) => {
                metrics::counter!("herald_gateway_slow_consumer_closes_total").increment(1);
                return Err(Outcome::Close(
                    close::SLOW_CONSUMER,
                    "slow consumer: resume from your last seq",
                ));
            }
            Err(PushError::Closed) => return Err(Outcome::Gone),
        }
    }
    Ok(())
}

async fn serve(
    socket: WebSocket,
    state: Arc<GatewayState>,
    user: UserId,
    mut feed: Feed,
    hello: Message,
    _ticket: crate::admission::Ticket,
) {
    let _connected = crate::Connected::new("ws");
    let (sink, mut stream) = socket.split();
    let outbox = Arc::new(Outbox::new(state.config.queue_frames));
    let tx = &outbox.queue;
    let max_batch = state.config.max_batch.max(1);
    let writer = tokio::spawn(write_loop(sink, outbox.clone(), max_batch));
    let heartbeat = state.config.heartbeat;
    let mut ping = interval_at(Instant::now() + heartbeat, heartbeat);
    let mut last_heard = Instant::now();
    let frames = state.admission.frame_limiter();
    let outcome = 'conn: {
        if tx.try_push(Out::msg(hello)).is_err() {
            break 'conn Outcome::Gone;
        }
        loop {
            tokio::select! {
                // Cancel-safe (see `Feed::next`): when another branch wins, nothing the
                // feed read is lost, at most an inbox page is read again.
                items = feed.next() => match items {
                    Ok(items) => {
                        let read = feed.take_read();
                        if let Err(end) = deliver(tx, items, read) {
                            break end;
                        }
                    }
                    Err(e) => {
                        tracing::warn!(error = %e, "feed failed; closing connection");
                        break Outcome::Close(close::INTERNAL, "delivery interrupted: reconnect with after=<last seq>");
                    }
                },
                // The writer ended: the peer hung up or stopped reading.
                () = tx.closed() => break Outcome::Gone,
                incoming = stream.next() => {
                    last_heard = Instant::now();
                    match incoming {
                        None | Some(Ok(Message::Close(_))) => break Outcome::Gone,
                        Some(Err(e)) => {
                            break if is_too_big(&e) {
                                Outcome::Close(close::TOO_BIG, "frame too large")
                            } else {
                                Outcome::Gone
                            };
                        }
                        Some(Ok(Message::Binary(_))) => break Outcome::Close(close::UNSUPPORTED, "binary frames are not supported; send JSON text"),
                        Some(Ok(Message::Ping(_) | Message::Pong(_))) => {}
                        Some(Ok(Message::Text(_))) if frames.check().is_err() => {
                            break Outcome::Close(close::POLICY, "too many frames; slow down");
                        }
                        Some(Ok(Message::Text(t))) => {
                            // Boxed: allocated per client frame, so an idle connection
                            // does not carry this future's state.
                            match Box::pin(on_client_frame(&state, &user, t.as_str())).await {
                                Err(outcome) => break outcome,
                                // An answer waits in the same bounded queue as notifications.
                                Ok(Some(answer)) => {
                                    if tx.try_push(Out::msg(text(&answer))).is_err() {
                                        break Outcome::Close(close::SLOW_CONSUMER, "slow consumer: resume from your last seq");
                                    }
                                }
                                Ok(None) => {}
                            }
                        }
                    }
                },
                _ = state.shutdown.cancelled() => {
                    // Spread reconnects so a restart is not a thundering herd.
                    let after_ms = rand::random_range(0..5_000);
                    let _ = tx.try_push(Out::msg(text(&ServerFrame::Reconnect { after_ms })));
                    break Outcome::Close(close::GOING_AWAY, "server restarting; reconnect with after=<last seq>");
                }
                _ = ping.tick() => {
                    if last_heard.elapsed() > heartbeat * 2 {
                        break Outcome::Close(close::HEARTBEAT, "missed heartbeats");
                    }
                    if tx.try_push(Out::msg(Message::Ping(Default::default()))).is_err() {
                        break Outcome::Gone;
                    }
                },
            }
        }
    };
    match outcome {
        Outcome::Close(code, reason) => {
            tracing::debug!(user = %user, code, reason, "closing websocket");
            outbox.close_with(code, reason);
        }
        Outcome::Gone => tx.close(),
    }
    // A writer stuck on a peer that does not read is given a grace period, then dropped.
    // (Boxed, like every timer used only at the end, to keep idle connections small.)
    let abort = writer.abort_handle();
    if Box::pin(tokio::time::timeout(CLOSE_GRACE * 2, writer))
        .await
        .is_err()
    {
        abort.abort();
    }
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
            tracing::warn!(error = %e, "topic subscription failed");
            ServerFrame::Subscription {
                topic,
                subscribed: !join,
                error: Some("the subscription store is unavailable; try again".into()),
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
