//! The connection task: connect, read frames, deliver, and on any end wait (backoff, the
//! server's `after_ms`, or at once) and connect again from the last seq.

use crate::backoff::Backoff;
use crate::http::Http;
use crate::token::Tokens;
use crate::tracker::Tracker;
use crate::{ClientBuilder, Mode, State, Status, Transport};
use eventsource_stream::{EventStreamError, Eventsource as _};
use futures::{SinkExt as _, StreamExt as _};
use herald_protocol::{ClientFrame, Notification, ServerFrame};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;
use tokio::sync::{mpsc, oneshot, watch};
use tokio::time::Instant;
use tokio_tungstenite::tungstenite::client::IntoClientRequest as _;
use tokio_tungstenite::tungstenite::http::{HeaderValue, StatusCode, header};
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tokio_tungstenite::tungstenite::{self, Message, Utf8Bytes};

/// Close codes after which the token may be the problem.
const AUTH_CLOSE_CODES: [u16; 5] = [1008, 4001, 4003, 4401, 4403];
/// The gateway's slow-consumer close.
const SLOW_CONSUMER: u16 = 4008;
/// The longest heartbeat interval believed from a hello (Herald allows up to an hour): a
/// larger one would stretch the silence limit past any use, or overflow it.
const MAX_HEARTBEAT: Duration = Duration::from_secs(3600);

/// What the [`crate::Client`] asks of the task.
#[derive(Debug)]
pub(crate) enum Command {
    /// Send a frame on the open WebSocket; answers whether it was sent.
    Frame(ClientFrame, oneshot::Sender<bool>),
    /// Drop the connection and reconnect at once.
    Reconnect,
    /// The server said how many are unread (an HTTP answer).
    Unread(u64),
    /// Stop for good.
    Close,
}

/// How one connection ended.
enum Next {
    /// Connect again after this wait (`None`: the backoff decides).
    Retry(Option<Duration>),
    /// Stop.
    Stop,
}

pub(crate) struct Driver {
    pub(crate) ws_url: String,
    pub(crate) sse_url: String,
    pub(crate) settings: ClientBuilder,
    pub(crate) http: Http,
    pub(crate) tokens: Arc<Tokens>,
    pub(crate) status: Arc<watch::Sender<Status>>,
    pub(crate) notes: mpsc::Sender<Notification>,
    pub(crate) commands: mpsc::UnboundedReceiver<Command>,
    pub(crate) tracker: Tracker,
    pub(crate) backoff: Backoff,
    pub(crate) use_sse: bool,
    pub(crate) ws_failures: u32,
    pub(crate) refresh_token: bool,
    /// The application asked to reconnect while a notification waited for room in its
    /// queue: done once that one is delivered.
    pub(crate) reconnect_requested: bool,
    /// When the current connection went live: the back-off starts over only once one
    /// has stayed up for [`STABLE`].
    pub(crate) live_since: Option<std::time::Instant>,
    /// The interval between the server's heartbeats, as the current connection's hello
    /// announced it; `None` before the hello.
    pub(crate) heartbeat: Option<Duration>,
}

/// How long a connection must stay live before the back-off starts over: a gateway that
/// greets and then drops every client at once would otherwise have them all back within
/// the first back-off step, again and again.
const STABLE: Duration = Duration::from_secs(10);

impl Driver {
    pub(crate) async fn run(mut self) {
        loop {
            let next = match self.tokens.get(self.refresh_token).await {
                Ok(token) => {
                    self.refresh_token = false;
                    if self.use_sse {
                        self.run_sse(&token).await
                    } else {
                        self.run_ws(&token).await
                    }
                }
                Err(e) => {
                    self.note_error(&e.to_string());
                    Next::Retry(None)
                }
            };
            self.status.send_modify(|s| s.transport = None);
            match next {
                Next::Stop => break,
                Next::Retry(delay) => {
                    if !self.wait(delay).await {
                        break;
                    }
                }
            }
        }
        self.status.send_modify(|s| {
            s.state = State::Closed;
            s.transport = None;
        });
    }

    /// Waits before the next attempt; false when the client closed meanwhile.
    async fn wait(&mut self, fixed: Option<Duration>) -> bool {
        if self
            .live_since
            .take()
            .is_some_and(|since| since.elapsed() >= STABLE)
        {
            self.backoff.reset();
        }
        let delay = fixed.unwrap_or_else(|| self.backoff.next_delay());
        self.status.send_modify(|s| {
            s.state = State::Reconnecting;
            s.reconnects += 1;
        });
        let sleep = tokio::time::sleep(delay);
        tokio::pin!(sleep);
        loop {
            tokio::select! {
                () = &mut sleep => return true,
                cmd = self.commands.recv() => match cmd {
                    None | Some(Command::Close) => return false,
                    Some(Command::Reconnect) => return true,
                    Some(Command::Frame(_, reply)) => { let _ = reply.send(false); }
                    Some(Command::Unread(n)) => self.set_unread(n),
                },
            }
        }
    }

    fn note_error(&self, error: &str) {
        tracing::debug!(error, "herald client");
        self.status
            .send_modify(|s| s.last_error = Some(error.to_string()));
    }

    fn resume_query(&self) -> Option<String> {
        self.tracker.position.map(|p| format!("after={p}"))
    }

    /// How long the current connection may go without receiving anything before it is
    /// taken as dead (a network that dropped it without a FIN or RST leaves it open on
    /// this side for good): the open timeout until the hello, then `missed_heartbeats`
    /// of the interval the hello announced. `None` when the server sends no heartbeats.
    fn silence_limit(&self) -> Option<Duration> {
        match self.heartbeat {
            None => Some(self.settings.open_timeout),
            Some(beat) if beat.is_zero() => None,
            Some(beat) => Some(beat * self.settings.missed_heartbeats),
        }
    }

    fn note_silence(&self, limit: Duration) {
        self.note_error(&format!(
            "nothing received for {limit:?} (no frame, no heartbeat); reconnecting"
        ));
    }

    // ---- WebSocket -------------------------------------------------------------------------

    async fn run_ws(&mut self, token: &str) -> Next {
        let url = match self.resume_query() {
            Some(q) if self.ws_url.contains('?') => format!("{}&{q}", self.ws_url),
            Some(q) => format!("{}?{q}", self.ws_url),
            None => self.ws_url.clone(),
        };
        let mut request = match url.as_str().into_client_request() {
            Ok(r) => r,
            Err(e) => {
                self.note_error(&format!("websocket url {url}: {e}"));
                return Next::Stop;
            }
        };
        if let Ok(value) = HeaderValue::from_str(&format!("Bearer {token}")) {
            request.headers_mut().insert(header::AUTHORIZATION, value);
        }
        let connect = tokio::time::timeout(
            self.settings.open_timeout,
            tokio_tungstenite::connect_async(request),
        );
        tokio::pin!(connect);
        // The upgrade may take a while: keep answering the client meanwhile.
        let socket = loop {
            tokio::select! {
                opened = &mut connect => match opened {
                    Ok(Ok((socket, _))) => break socket,
                    Ok(Err(e)) => return self.ws_failed(Some(e)).await,
                    Err(_) => return self.ws_failed(None).await,
                },
                cmd = self.commands.recv() => match cmd {
                    Some(Command::Frame(_, reply)) => { let _ = reply.send(false); }
                    Some(Command::Unread(n)) => self.set_unread(n),
                    Some(Command::Reconnect) => return Next::Retry(Some(Duration::ZERO)),
                    None | Some(Command::Close) => return Next::Stop,
                },
            }
        };
        let (mut sink, mut stream) = socket.split();
        let mut server_delay = None;
        self.heartbeat = None;
        let mut limit = self.silence_limit();
        let silence = tokio::time::sleep(self.settings.open_timeout);
        tokio::pin!(silence);
        loop {
            tokio::select! {
                incoming = stream.next() => {
                    if let Some(next) = self.on_ws_message(incoming, &mut sink, &mut server_delay).await {
                        return next;
                    }
                    // Counted from now, not from when the message came: delivering it
                    // may have waited on the application, with the socket unread.
                    limit = self.silence_limit();
                    if let Some(limit) = limit {
                        silence.as_mut().reset(Instant::now() + limit);
                    }
                }
                // Dropped, not closed: a close handshake on a dead network could only
                // wait, and dropping the socket is what ends it on this side.
                () = &mut silence, if limit.is_some() => {
                    self.note_silence(limit.unwrap_or_default());
                    return Next::Retry(None);
                }
                cmd = self.commands.recv() => match cmd {
                    Some(Command::Frame(frame, reply)) => {
                        let sent = sink.send(text_frame(&frame)).await.is_ok();
                        if sent && let ClientFrame::Read { up_to } = frame && up_to >= self.tracker.latest {
                            self.set_unread(0);
                        }
                        let _ = reply.send(sent);
                    }
                    Some(Command::Unread(n)) => self.set_unread(n),
                    Some(Command::Reconnect) => {
                        let _ = close_ws(&mut sink).await;
                        return Next::Retry(Some(Duration::ZERO));
                    }
                    None | Some(Command::Close) => {
                        let _ = close_ws(&mut sink).await;
                        return Next::Stop;
                    }
                },
            }
        }
    }

    /// Handles what the WebSocket yielded (every message, pings included, proves the
    /// connection alive); `Some` once the connection is over.
    async fn on_ws_message<S>(
        &mut self,
        incoming: Option<Result<Message, tungstenite::Error>>,
        sink: &mut S,
        server_delay: &mut Option<Duration>,
    ) -> Option<Next>
    where
        S: futures::Sink<Message, Error = tungstenite::Error> + Unpin,
    {
        match incoming {
            None | Some(Err(_)) => Some(Next::Retry(*server_delay)),
            Some(Ok(Message::Text(text))) => {
                let Ok(frame) = serde_json::from_str::<ServerFrame>(text.as_str()) else {
                    return None; // a frame this SDK does not know yet
                };
                if matches!(frame, ServerFrame::Hello { .. }) {
                    self.ws_failures = 0;
                    self.status
                        .send_modify(|s| s.transport = Some(Transport::WebSocket));
                }
                match self.on_frame(frame).await {
                    Ok(Some(delay)) => *server_delay = Some(delay),
                    Ok(None) => {}
                    Err(()) => return Some(Next::Stop),
                }
                if std::mem::take(&mut self.reconnect_requested) {
                    let _ = close_ws(sink).await;
                    return Some(Next::Retry(Some(Duration::ZERO)));
                }
                None
            }
            Some(Ok(Message::Close(close))) => {
                let code = close.as_ref().map_or(1005, |c| u16::from(c.code));
                if AUTH_CLOSE_CODES.contains(&code) {
                    self.refresh_token = true;
                }
                if code == SLOW_CONSUMER && server_delay.is_none() {
                    // Only slow: resume right away, jittered a little.
                    *server_delay = Some(self.settings.backoff_base.mul_f64(rand::random::<f64>()));
                }
                if let Some(c) = close {
                    self.note_error(&format!(
                        "server closed the websocket: {} {}",
                        u16::from(c.code),
                        c.reason.as_str()
                    ));
                }
                None
            }
            // Pings are answered by tungstenite; binary is not ours.
            Some(Ok(_)) => None,
        }
    }

    /// A WebSocket that never opened: refresh the token on a 401, and count the failure
    /// towards the SSE fallback only when the server answers plain HTTP.
    async fn ws_failed(&mut self, error: Option<tungstenite::Error>) -> Next {
        let counts = match &error {
            Some(tungstenite::Error::Http(response))
                if response.status() == StatusCode::UNAUTHORIZED =>
            {
                self.refresh_token = true;
                if !self.tokens.can_refresh() {
                    self.note_error("the token was refused (401) and there is no token provider");
                    return Next::Stop;
                }
                false
            }
            // Busy, not refusing WebSocket: a reconnect storm, the per-user connection cap,
            // NATS away. Back after its `Retry-After` (spread a little, so a crowd told
            // the same does not return at once); nothing counts towards the fallback.
            Some(tungstenite::Error::Http(response))
                if matches!(response.status().as_u16(), 429 | 503) =>
            {
                let after = response
                    .headers()
                    .get("retry-after")
                    .and_then(|v| v.to_str().ok())
                    .and_then(|v| v.trim().parse::<u64>().ok())
                    .map(|s| Duration::from_secs(s.min(300)));
                self.note_error(&format!(
                    "the gateway is busy ({}); retrying",
                    response.status()
                ));
                return Next::Retry(after.map(|d| d + d.mul_f64(rand::random::<f64>() / 2.0)));
            }
            // The server answered, but not with an upgrade: something refuses WebSocket.
            Some(tungstenite::Error::Http(_)) => true,
            _ => self.http.reachable().await,
        };
        let message = error.map_or_else(
            || "websocket did not open in time".to_string(),
            |e| e.to_string(),
        );
        self.note_error(&message);
        if counts {
            self.ws_failures += 1;
        }
        if self.settings.mode == Mode::Auto
            && self.ws_failures >= self.settings.ws_failures_before_fallback
        {
            self.use_sse = true;
            self.note_error(&format!(
                "WebSocket failed {} times while HTTP works ({message}); falling back to SSE",
                self.ws_failures
            ));
            return Next::Retry(Some(Duration::ZERO));
        }
        Next::Retry(None)
    }

    // ---- SSE -------------------------------------------------------------------------------

    async fn run_sse(&mut self, token: &str) -> Next {
        let mut request = self
            .http
            .client
            .get(&self.sse_url)
            .bearer_auth(token)
            .header(reqwest::header::ACCEPT, "text/event-stream");
        if let Some(p) = self.tracker.position {
            request = request.query(&[("after", p)]);
        }
        let response = tokio::select! {
            r = tokio::time::timeout(self.settings.open_timeout, request.send()) => r,
            cmd = self.commands.recv() => return match cmd {
                Some(Command::Frame(_, reply)) => { let _ = reply.send(false); Next::Retry(Some(Duration::ZERO)) }
                Some(Command::Unread(n)) => { self.set_unread(n); Next::Retry(Some(Duration::ZERO)) }
                Some(Command::Reconnect) => Next::Retry(Some(Duration::ZERO)),
                None | Some(Command::Close) => Next::Stop,
            },
        };
        let response = match response {
            Ok(Ok(r)) => r,
            Ok(Err(e)) => {
                self.note_error(&format!("sse request: {e}"));
                return Next::Retry(None);
            }
            Err(_) => {
                self.note_error("sse did not answer in time");
                return Next::Retry(None);
            }
        };
        let status = response.status();
        if status == reqwest::StatusCode::UNAUTHORIZED || status == reqwest::StatusCode::FORBIDDEN {
            self.note_error(&format!("sse refused with {status}"));
            if !self.tokens.can_refresh() {
                return Next::Stop;
            }
            self.refresh_token = true;
            return Next::Retry(None);
        }
        if !status.is_success() {
            self.note_error(&format!("sse answered {status}"));
            return Next::Retry(None);
        }
        // reqwest without its `stream` feature: chunks, made into a stream of bytes. The
        // silence limit applies here, below the event parser, because keep-alive
        // comments never come out of it as events.
        self.heartbeat = None;
        let limit = Arc::new(SilenceLimit::new(self.silence_limit()));
        let bytes =
            futures::stream::unfold((response, limit.clone()), |(mut r, limit)| async move {
                let chunk = match limit.get() {
                    Some(d) => match tokio::time::timeout(d, r.chunk()).await {
                        Ok(read) => read.map_err(SseRead::Http),
                        Err(_) => Err(SseRead::Silent(d)),
                    },
                    None => r.chunk().await.map_err(SseRead::Http),
                };
                match chunk {
                    Ok(Some(chunk)) => Some((Ok(chunk), (r, limit))),
                    Ok(None) => None,
                    Err(e) => Some((Err(e), (r, limit))),
                }
            });
        let mut events = Box::pin(bytes.eventsource());
        let mut server_delay = None;
        loop {
            tokio::select! {
                event = events.next() => match event {
                    None => return Next::Retry(server_delay),
                    Some(Err(EventStreamError::Transport(SseRead::Silent(d)))) => {
                        self.note_silence(d);
                        return Next::Retry(server_delay);
                    }
                    Some(Err(e)) => {
                        self.note_error(&format!("sse stream: {e}"));
                        return Next::Retry(server_delay);
                    }
                    Some(Ok(event)) => {
                        let Ok(frame) = serde_json::from_str::<ServerFrame>(&event.data) else { continue };
                        let hello = matches!(frame, ServerFrame::Hello { .. });
                        if hello {
                            self.status.send_modify(|s| s.transport = Some(Transport::Sse));
                        }
                        match self.on_frame(frame).await {
                            Ok(Some(delay)) => server_delay = Some(delay),
                            Ok(None) => {}
                            Err(()) => return Next::Stop,
                        }
                        if hello {
                            limit.set(self.silence_limit());
                        }
                        if std::mem::take(&mut self.reconnect_requested) {
                            return Next::Retry(Some(Duration::ZERO));
                        }
                    }
                },
                cmd = self.commands.recv() => match cmd {
                    Some(Command::Frame(_, reply)) => { let _ = reply.send(false); }
                    Some(Command::Unread(n)) => self.set_unread(n),
                    Some(Command::Reconnect) => return Next::Retry(Some(Duration::ZERO)),
                    None | Some(Command::Close) => return Next::Stop,
                },
            }
        }
    }

    // ---- frames ----------------------------------------------------------------------------

    /// Applies one server frame. `Ok(Some(d))`: the server asked to reconnect after `d`;
    /// `Err(())`: the application is gone.
    async fn on_frame(&mut self, frame: ServerFrame) -> Result<Option<Duration>, ()> {
        match frame {
            ServerFrame::Hello {
                last_seq,
                unread,
                heartbeat_s,
                ..
            } => {
                self.heartbeat = Some(Duration::from_secs(heartbeat_s).min(MAX_HEARTBEAT));
                self.live_since = Some(std::time::Instant::now());
                self.tracker.hello(last_seq, unread);
                self.publish(State::Live);
            }
            ServerFrame::Notification(n) => self.deliver(n).await?,
            ServerFrame::Batch { items } => {
                for n in items {
                    self.deliver(n).await?;
                }
            }
            ServerFrame::Read { up_to } => {
                self.status.send_modify(|s| {
                    s.read_up_to = Some(s.read_up_to.map_or(up_to, |r| r.max(up_to)));
                });
                if up_to >= self.tracker.latest {
                    self.tracker.unread = 0;
                } else {
                    // Read up to somewhere in the middle: only the server knows what is left.
                    match self
                        .http
                        .json(reqwest::Method::GET, "/v1/me/unread", None)
                        .await
                    {
                        Ok(body) => {
                            if let Some(n) = body["unread"].as_u64() {
                                self.tracker.unread = n;
                            }
                        }
                        Err(e) => self.note_error(&e.to_string()),
                    }
                }
                self.publish_counts();
            }
            ServerFrame::Reconnect { after_ms } => {
                return Ok(Some(Duration::from_millis(after_ms)));
            }
            ServerFrame::Subscription { topic, error, .. } => {
                if let Some(error) = error {
                    self.note_error(&format!("topic {topic:?}: {error}"));
                }
            }
        }
        Ok(None)
    }

    async fn deliver(&mut self, n: Notification) -> Result<(), ()> {
        if !self.tracker.accept(&n) {
            return Ok(());
        }
        self.publish_counts();
        // Bounded: an application that stops reading stops this task reading the socket.
        // Its commands are still answered meanwhile: an application that awaits
        // `mark_read` (or `ack`, `subscribe`) before it reads the next notification waits
        // on this task while this task waits on it. A frame is answered "not sent", so the
        // call goes over HTTP instead.
        let notes = self.notes.clone();
        loop {
            tokio::select! {
                permit = notes.reserve() => {
                    return permit.map(|p| p.send(n)).map_err(|_| ());
                }
                cmd = self.commands.recv() => match cmd {
                    Some(Command::Frame(_, reply)) => { let _ = reply.send(false); }
                    Some(Command::Unread(u)) => self.set_unread(u),
                    Some(Command::Reconnect) => self.reconnect_requested = true,
                    None | Some(Command::Close) => return Err(()),
                },
            }
        }
    }

    /// The new state and the counts in one change, so no watcher sees one without the other.
    fn publish(&self, state: State) {
        let (position, latest, unread) = (
            self.tracker.position,
            self.tracker.latest,
            self.tracker.unread,
        );
        self.status.send_modify(|s| {
            s.state = state;
            s.last_seq = position;
            s.latest_seq = latest;
            s.unread = unread;
        });
    }

    fn publish_counts(&self) {
        let (position, latest, unread) = (
            self.tracker.position,
            self.tracker.latest,
            self.tracker.unread,
        );
        self.status.send_modify(|s| {
            s.last_seq = position;
            s.latest_seq = latest;
            s.unread = unread;
        });
    }

    /// The server's unread count (from `POST /v1/me/read`).
    fn set_unread(&mut self, unread: u64) {
        self.tracker.unread = unread;
        self.publish_counts();
    }
}

/// Why the SSE byte stream failed.
#[derive(Debug, thiserror::Error)]
enum SseRead {
    /// The response body failed.
    #[error(transparent)]
    Http(reqwest::Error),
    /// Nothing arrived, not even a keep-alive comment, for this long.
    #[error("nothing received for {0:?}")]
    Silent(Duration),
}

/// The silence limit of one SSE stream, shared between the connection task (which learns
/// the heartbeat from the hello) and the stream's reads. Milliseconds; 0: none.
struct SilenceLimit(AtomicU64);

impl SilenceLimit {
    fn new(limit: Option<Duration>) -> Self {
        let new = Self(AtomicU64::new(0));
        new.set(limit);
        new
    }

    fn set(&self, limit: Option<Duration>) {
        // At least 1 ms, so a limit is never taken for none.
        let ms = limit.map_or(0, |d| {
            u64::try_from(d.as_millis()).unwrap_or(u64::MAX).max(1)
        });
        self.0.store(ms, Ordering::Relaxed);
    }

    fn get(&self) -> Option<Duration> {
        match self.0.load(Ordering::Relaxed) {
            0 => None,
            ms => Some(Duration::from_millis(ms)),
        }
    }
}

fn text_frame(frame: &ClientFrame) -> Message {
    Message::Text(Utf8Bytes::from(
        serde_json::to_string(frame).unwrap_or_default(),
    ))
}

async fn close_ws<S>(sink: &mut S) -> Result<(), tungstenite::Error>
where
    S: futures::Sink<Message, Error = tungstenite::Error> + Unpin,
{
    let frame = tungstenite::protocol::CloseFrame {
        code: CloseCode::Normal,
        reason: "client closing".into(),
    };
    sink.send(Message::Close(Some(frame))).await?;
    sink.close().await
}
