//! One WebSocket connection: one task, one hand-polled future.
//!
//! Why not `split()` and a writer task: an idle connection is what a gateway holds by the
//! tens of thousands, and every byte of per-connection state is paid that many times.
//! Two tasks (two task cells, each sized for its largest future, the connection's also
//! keeping axum's upgrade closure and `serve`'s parameters beside its locals), the
//! `BiLock` of the split halves and the queue shared between them came to about 3.5 KiB
//! per idle socket. Here one [`Conn`] owns the socket and polls, in turn: shutdown, the
//! client frame being handled (or the socket's next frame), the feed, the heartbeat,
//! then writes what is queued. Each source registers the task's waker, so the task
//! sleeps until any of them has something.
//!
//! Backpressure: the feed is asked only for as many notifications as the outgoing queue
//! has room for, so a replay waits on the socket (the store keeps it) and never fills the
//! queue. A client is too slow (4008) when, with its queue full, the live messages
//! waiting for it overflow the hub's small tap as well: notifications arrive faster than
//! it reads. Memory per connection stays bounded either way.
//!
//! Everything that is not needed to wait sits in one boxed [`Session`], made before the
//! upgrade; what exists only while something happens (a client frame's work, the client
//! frame limiter, queued frames) is allocated then and freed after.

use super::{Outcome, close, close_frame, on_client_frame, text};
use crate::GatewayState;
use crate::admission::Ticket;
use crate::feed::{Delivery, Feed};
use axum::extract::ws::{Message, WebSocket};
use futures::{Sink, Stream};
use governor::DefaultDirectRateLimiter;
use herald_protocol::{Notification, ServerFrame};
use std::collections::VecDeque;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;
use tokio::time::{Instant, Sleep};
use tokio_util::sync::WaitForCancellationFutureOwned;

/// How long a closing handshake (the queued frames, the close frame) may take.
const CLOSE_GRACE: Duration = Duration::from_secs(2);

/// Rounds of polling every source in one poll of the task, before it yields to others.
const ROUNDS: usize = 32;

/// A queued frame: ready to send, or a notification that may be coalesced with the ones
/// queued behind it into one `batch` frame. Boxed, so a queue slot is 16 bytes.
enum Out {
    Msg(Box<Message>),
    Note(Box<Notification>),
}

/// Which of a connection's sources to poll (see [`Conn::poll_serve`]). The write side
/// is not among them: whatever is queued is written in every round.
#[derive(Clone, Copy)]
struct Sources {
    shutdown: bool,
    /// The client frame being handled, or else the socket's next frame.
    client: bool,
    feed: bool,
    timer: bool,
}

impl Sources {
    const ALL: Self = Self {
        shutdown: true,
        client: true,
        feed: true,
        timer: true,
    };
    const NONE: Self = Self {
        shutdown: false,
        client: false,
        feed: false,
        timer: false,
    };

    fn is_none(self) -> bool {
        !(self.shutdown || self.client || self.feed || self.timer)
    }
}

/// A client frame being handled (a receipt write, a topic subscription).
type Work = Pin<Box<dyn Future<Output = Result<Option<ServerFrame>, Outcome>> + Send>>;

/// What a connection holds besides its socket and timers (boxed once, before the
/// upgrade).
pub(crate) struct Session {
    state: Arc<GatewayState>,
    feed: Feed,
    /// Frames waiting for the socket, oldest first; at most `queue_frames`. Holds no
    /// buffer while empty.
    out: VecDeque<Out>,
    /// The client frame rate limiter, made at the first client frame (most idle
    /// connections never send one).
    frames: Option<Box<DefaultDirectRateLimiter>>,
    /// When the token the session was opened with stops being valid: the connection
    /// ends then (4001), so a session never outlives its credentials.
    expires: Instant,
    _ticket: Ticket,
}

/// The queue is full: the client reads too slowly.
struct Full;

/// Answers to client frames a full queue still takes (see [`Session::queue_answer`]).
const ANSWER_SLACK: usize = 4;

const SLOW: Outcome = Outcome::Close(
    close::SLOW_CONSUMER,
    "slow consumer: resume from your last seq",
);

impl Session {
    /// A session whose first frame is `hello`.
    pub(crate) fn new(
        state: Arc<GatewayState>,
        feed: Feed,
        hello: Message,
        ticket: Ticket,
        valid_for: Duration,
    ) -> Box<Self> {
        let now = Instant::now();
        Box::new(Self {
            state,
            feed,
            out: VecDeque::from([Out::Msg(Box::new(hello))]),
            frames: None,
            expires: now.checked_add(valid_for).unwrap_or(now + MAX_SESSION),
            _ticket: ticket,
        })
    }

    /// Queues the answer to a client frame. A replay fills the queue to exactly its bound
    /// by design (the feed is asked for no more than [`Session::room`]) while it waits on
    /// a client that reads, so an answer gets a little slack past it, as pings and read
    /// positions do; a client that sends frames faster than it reads their answers still
    /// runs out of it.
    fn queue_answer(&mut self, out: Out) -> Result<(), Full> {
        if self.out.len() >= self.state.config.queue_frames.max(1) + ANSWER_SLACK {
            metrics::counter!("herald_gateway_slow_consumer_closes_total").increment(1);
            return Err(Full);
        }
        self.out.push_back(out);
        Ok(())
    }

    /// How many more frames the queue takes before it is full.
    fn room(&self) -> usize {
        self.state
            .config
            .queue_frames
            .max(1)
            .saturating_sub(self.out.len())
    }

    /// Queues what the feed handed out: at most [`Session::room`] notifications (the
    /// feed was asked for no more), and a read position, which may go one over.
    fn deliver(&mut self, items: Vec<Notification>, read: Option<u64>) {
        let read = read.map(Delivery::Read);
        for delivery in items.into_iter().map(Delivery::Notification).chain(read) {
            self.out.push_back(match delivery {
                Delivery::Notification(n) => Out::Note(Box::new(n)),
                Delivery::Read(up_to) => Out::Msg(Box::new(text(&ServerFrame::Read { up_to }))),
            });
        }
    }

    /// The next frame to send: a queued message, or the notifications at the head of the
    /// queue, coalesced into one `batch` when several wait (no added latency: only what
    /// queued up while the socket was busy).
    fn next_frame(&mut self) -> Option<Message> {
        let frame = match self.out.pop_front()? {
            Out::Msg(m) => {
                if matches!(*m, Message::Text(_)) {
                    metrics::counter!("herald_gateway_frames_out_total", "transport" => "ws")
                        .increment(1);
                }
                *m
            }
            Out::Note(first) => {
                let max = self.state.config.max_batch.max(1);
                let mut items = vec![*first];
                while items.len() < max
                    && let Some(Out::Note(_)) = self.out.front()
                    && let Some(Out::Note(n)) = self.out.pop_front()
                {
                    items.push(*n);
                }
                // Counted as they are written, not as they are queued: a queue dropped
                // with its connection (4008) never reached the client.
                metrics::counter!("herald_gateway_frames_out_total", "transport" => "ws")
                    .increment(1);
                metrics::counter!("herald_gateway_notifications_out_total", "transport" => "ws")
                    .increment(items.len() as u64);
                if items.len() == 1 {
                    text(&ServerFrame::Notification(items.remove(0)))
                } else {
                    metrics::counter!("herald_gateway_batches_total").increment(1);
                    text(&ServerFrame::Batch { items })
                }
            }
        };
        if self.out.is_empty() && self.out.capacity() > 0 {
            // An idle connection keeps no buffer.
            self.out = VecDeque::new();
        }
        Some(frame)
    }

    /// Whether one more client frame is within the connection's rate.
    fn allow_frame(&mut self) -> bool {
        let admission = &self.state.admission;
        self.frames
            .get_or_insert_with(|| Box::new(admission.frame_limiter()))
            .check()
            .is_ok()
    }
}

/// A live connection, as the future of its task: serves until the connection must end,
/// then closes it within [`CLOSE_GRACE`].
pub(crate) struct Conn {
    socket: WebSocket,
    session: Box<Session>,
    /// The client frame being handled; the socket is not read meanwhile.
    work: Option<Work>,
    /// Every heartbeat: a ping, and the check that the peer was heard from. While
    /// closing, the deadline of the closing handshake.
    timer: Pin<Box<Sleep>>,
    last_heard: Instant,
    shutdown: Pin<Box<WaitForCancellationFutureOwned>>,
    /// Frames were handed to the socket and not yet flushed.
    unflushed: bool,
    /// Set once the connection must end: the close frame still to send, if any.
    closing: Option<Option<Message>>,
    _connected: crate::Connected,
}

impl Conn {
    /// Serves `socket` for `session` (called once the upgrade succeeded).
    pub(crate) fn new(socket: WebSocket, session: Box<Session>) -> Self {
        let heartbeat = session.state.config.heartbeat;
        let shutdown = Box::pin(session.state.shutdown.clone().cancelled_owned());
        let first = (Instant::now() + heartbeat).min(session.expires);
        Self {
            socket,
            session,
            work: None,
            timer: Box::pin(tokio::time::sleep_until(first)),
            last_heard: Instant::now(),
            shutdown,
            unflushed: false,
            closing: None,
            _connected: crate::Connected::new("ws"),
        }
    }

    /// Serves the connection until it must end; then says how.
    ///
    /// On a wake-up every source is polled: the task's one waker does not say which
    /// fired. After that, only the sources that made progress are polled again (until
    /// they return `Pending` and so register the waker); the others are registered
    /// already. A broadcast then costs each connection one poll of its feed and one
    /// write, not a round of every source for nothing.
    fn poll_serve(&mut self, cx: &mut Context<'_>) -> Poll<Outcome> {
        let mut poll = Sources::ALL;
        for _ in 0..ROUNDS {
            let mut progress = Sources::NONE;
            if poll.shutdown && self.shutdown.as_mut().poll(cx).is_ready() {
                // Spread reconnects so a restart is not a thundering herd.
                let after_ms = rand::random_range(0..5_000);
                let reconnect = text(&ServerFrame::Reconnect { after_ms });
                // Once, as the connection ends: past the queue's bound if need be.
                self.session.out.push_back(Out::Msg(Box::new(reconnect)));
                return Poll::Ready(Outcome::Close(
                    close::GOING_AWAY,
                    "server restarting; reconnect with after=<last seq>",
                ));
            }
            if poll.client {
                if let Some(work) = &mut self.work {
                    if let Poll::Ready(done) = work.as_mut().poll(cx) {
                        self.work = None;
                        // Reading the socket resumes.
                        progress.client = true;
                        match done {
                            Err(outcome) => return Poll::Ready(outcome),
                            // An answer waits in the same bounded queue as notifications.
                            Ok(Some(answer)) => {
                                if let ServerFrame::Subscription { error: None, .. } = &answer {
                                    // This connection changed the user's topics: its feed
                                    // reads them again, announced or not.
                                    self.session.feed.topics_may_have_changed();
                                    progress.feed = true;
                                }
                                if self
                                    .session
                                    .queue_answer(Out::Msg(Box::new(text(&answer))))
                                    .is_err()
                                {
                                    return Poll::Ready(SLOW);
                                }
                            }
                            Ok(None) => {}
                        }
                    }
                } else if let Poll::Ready(incoming) = Pin::new(&mut self.socket).poll_next(cx) {
                    progress.client = true;
                    self.last_heard = Instant::now();
                    if let Some(outcome) = self.on_incoming(incoming) {
                        return Poll::Ready(outcome);
                    }
                }
            }
            let room = self.session.room();
            if poll.feed && room == 0 {
                // The queue is full: nothing more is taken from the feed (a replay waits,
                // the store keeps it), and live messages wait in the hub's tap. When even
                // that overflows, notifications arrive faster than the client reads.
                if self.session.feed.poll_lagged(cx) {
                    metrics::counter!("herald_gateway_slow_consumer_closes_total").increment(1);
                    return Poll::Ready(SLOW);
                }
            } else if poll.feed {
                match self.session.feed.poll_next_up_to(cx, room) {
                    Poll::Ready(Ok(items)) => {
                        progress.feed = true;
                        let read = self.session.feed.take_read();
                        self.session.deliver(items, read);
                    }
                    Poll::Ready(Err(e)) => {
                        tracing::warn!(error = %e, "feed failed; closing connection");
                        return Poll::Ready(Outcome::Close(
                            close::INTERNAL,
                            "delivery interrupted: reconnect with after=<last seq>",
                        ));
                    }
                    Poll::Pending => {}
                }
            }
            if poll.timer && self.timer.as_mut().poll(cx).is_ready() {
                // Reset: polled again to register.
                progress.timer = true;
                let heartbeat = self.session.state.config.heartbeat;
                if Instant::now() >= self.session.expires {
                    metrics::counter!("herald_gateway_token_expiries_total", "transport" => "ws")
                        .increment(1);
                    return Poll::Ready(Outcome::Close(
                        close::TOKEN_EXPIRED,
                        "token expired: reconnect with a fresh token and after=<last seq>",
                    ));
                }
                if self.last_heard.elapsed() > heartbeat * 2 {
                    return Poll::Ready(Outcome::Close(close::HEARTBEAT, "missed heartbeats"));
                }
                // Up to two past the queue's bound and the answers' slack: a full queue
                // may be a replay waiting on a client that reads. A third means the pings
                // themselves go unread.
                let bound = self.session.state.config.queue_frames.max(1) + ANSWER_SLACK;
                if self.session.out.len() >= bound + 2 {
                    metrics::counter!("herald_gateway_slow_consumer_closes_total").increment(1);
                    return Poll::Ready(SLOW);
                }
                let ping = Out::Msg(Box::new(Message::Ping(Default::default())));
                self.session.out.push_back(ping);
                // The next beat, or the token's end if that comes first.
                let next = (Instant::now() + heartbeat).min(self.session.expires);
                self.timer.as_mut().reset(next);
            }
            // Whatever was queued goes out now; a socket that cannot take it registers
            // the waker and wakes the task when it can.
            if self.poll_write(cx).is_err() {
                return Poll::Ready(Outcome::Gone);
            }
            // The feed waited for room, and the socket made some: take from it again.
            if room == 0 && self.session.room() > 0 {
                progress.feed = true;
            }
            if progress.is_none() {
                return Poll::Pending;
            }
            poll = progress;
        }
        // Still busy: let other connections run, and come back.
        cx.waker().wake_by_ref();
        Poll::Pending
    }

    /// A frame (or the end) from the client; `Some` when the connection must end.
    fn on_incoming(&mut self, incoming: Option<Result<Message, axum::Error>>) -> Option<Outcome> {
        match incoming {
            None | Some(Ok(Message::Close(_))) => Some(Outcome::Gone),
            Some(Err(e)) if super::is_too_big(&e) => {
                Some(Outcome::Close(close::TOO_BIG, "frame too large"))
            }
            Some(Err(e)) => Some(match broken_frame(&e) {
                Some(BrokenFrame::Utf8) => {
                    Outcome::Close(close::INVALID_PAYLOAD, "text frames must be UTF-8 JSON")
                }
                Some(BrokenFrame::Protocol) => {
                    Outcome::Close(PROTOCOL_ERROR, "websocket protocol error")
                }
                // The connection itself failed (reset, closed without a close frame).
                None => Outcome::Gone,
            }),
            Some(Ok(Message::Binary(_))) => Some(Outcome::Close(
                close::UNSUPPORTED,
                "binary frames are not supported; send JSON text",
            )),
            // Pongs only prove the peer is alive (`last_heard`); pings are answered by
            // the socket itself.
            Some(Ok(Message::Ping(_) | Message::Pong(_))) => None,
            Some(Ok(Message::Text(t))) => {
                if !self.session.allow_frame() {
                    return Some(Outcome::Close(close::POLICY, "too many frames; slow down"));
                }
                let state = self.session.state.clone();
                let user = self.session.feed.user().clone();
                self.work = Some(Box::pin(async move {
                    on_client_frame(&state, &user, t.as_str()).await
                }));
                None
            }
        }
    }

    /// Hands queued frames to the socket while it takes them, then flushes.
    fn poll_write(&mut self, cx: &mut Context<'_>) -> Result<(), axum::Error> {
        while !self.session.out.is_empty() {
            match Pin::new(&mut self.socket).poll_ready(cx) {
                Poll::Ready(ready) => ready?,
                // Waits for the socket to drain; the queue fills meanwhile.
                Poll::Pending => break,
            }
            let Some(frame) = self.session.next_frame() else {
                break;
            };
            Pin::new(&mut self.socket).start_send(frame)?;
            self.unflushed = true;
        }
        if self.unflushed
            && let Poll::Ready(flushed) = Pin::new(&mut self.socket).poll_flush(cx)
        {
            flushed?;
            self.unflushed = false;
        }
        Ok(())
    }

    /// Starts ending the connection: what is queued still goes out first unless the peer
    /// is the problem (slow, or gone), then the close frame, if any.
    fn begin_close(&mut self, outcome: Outcome) {
        let frame = match outcome {
            Outcome::Close(code, reason) => {
                tracing::debug!(user = %self.session.feed.user(), code, reason, "closing websocket");
                if code == close::SLOW_CONSUMER {
                    self.session.out = VecDeque::new();
                }
                Some(close_frame(code, reason))
            }
            Outcome::Gone => {
                self.session.out = VecDeque::new();
                None
            }
        };
        self.work = None;
        self.closing = Some(frame);
        self.timer.as_mut().reset(Instant::now() + CLOSE_GRACE);
    }

    /// Sends what is left and the close frame, then closes the socket; gives up at the
    /// deadline (a peer that does not read).
    fn poll_close(&mut self, cx: &mut Context<'_>) -> Poll<()> {
        if self.timer.as_mut().poll(cx).is_ready() {
            return Poll::Ready(());
        }
        loop {
            let has_frame = matches!(self.closing, Some(Some(_)));
            if self.session.out.is_empty() && !has_frame {
                break;
            }
            match Pin::new(&mut self.socket).poll_ready(cx) {
                Poll::Ready(Ok(())) => {}
                Poll::Ready(Err(_)) => return Poll::Ready(()),
                Poll::Pending => return Poll::Pending,
            }
            let frame = match self.session.next_frame() {
                Some(frame) => frame,
                None => match self.closing.as_mut().and_then(Option::take) {
                    Some(frame) => frame,
                    None => break,
                },
            };
            if Pin::new(&mut self.socket).start_send(frame).is_err() {
                return Poll::Ready(());
            }
        }
        Pin::new(&mut self.socket).poll_close(cx).map(|_| ())
    }
}

impl Future for Conn {
    type Output = ();

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
        let this = self.get_mut();
        if this.closing.is_none() {
            let outcome = std::task::ready!(this.poll_serve(cx));
            this.begin_close(outcome);
        }
        this.poll_close(cx)
    }
}

/// The longest a session lasts when its token's lifetime does not fit an `Instant`.
const MAX_SESSION: Duration = Duration::from_secs(365 * 24 * 3600);

/// RFC 6455's close code for a protocol violation.
const PROTOCOL_ERROR: u16 = 1002;

/// A frame the client sent that breaks WebSocket itself, as opposed to a failed
/// connection.
enum BrokenFrame {
    /// A text frame that is not UTF-8.
    Utf8,
    /// A violation of RFC 6455 (bad opcode, unmasked frame, reserved bits...).
    Protocol,
}

/// What kind of broken frame `e` reports, if any. axum hides tungstenite's error type,
/// so its message is what can be read (as for [`super::is_too_big`]).
fn broken_frame(e: &axum::Error) -> Option<BrokenFrame> {
    let text = e.to_string();
    // A peer gone without a close frame (the network lost, the app killed) is reported
    // by tungstenite as a protocol error too; it is a connection that failed.
    if text.contains("without closing handshake") || text.contains("Connection reset") {
        return None;
    }
    if text.contains("UTF-8") || text.contains("utf-8") {
        Some(BrokenFrame::Utf8)
    } else if text.contains("protocol error") {
        Some(BrokenFrame::Protocol)
    } else {
        None
    }
}
