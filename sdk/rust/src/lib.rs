//! Herald's Rust client: a self-healing real-time connection for one user.
//!
//! [`Client::connect`] returns at once; a background task keeps a WebSocket (or, where
//! WebSocket is blocked, Server-Sent Events) open and yields every notification exactly
//! once, in `seq` order, through [`Client::next`] (or the [`futures::Stream`] impl):
//!
//! - **Resume**: every reconnect asks for what came after the last seq delivered
//!   (`?after=` / SSE `after`), so nothing is lost; anything at or below that seq, or with
//!   an id seen recently, is dropped, so nothing is repeated (SPEC §5, §6.2). A `hello`
//!   whose `last_seq` is below that seq says it is from another life of the inbox
//!   (recreated or restored): the server replays the whole inbox and the client takes it.
//! - **Backoff**: waits are uniform in `[0, min(max, base·2ⁿ)]` (full jitter), and `n`
//!   starts over only after a connection stayed live for 10 s; a server `reconnect`
//!   frame's `after_ms`, or a 503/429's `Retry-After`, replaces the wait; close 4008 (slow
//!   consumer) resumes at once; a refused token is replaced through a [`Token::Provider`].
//! - **Silence**: a connection that receives nothing — no frame, no WebSocket ping, no
//!   SSE keep-alive comment — for [`ClientBuilder::missed_heartbeats`] of the server's
//!   heartbeat interval (the hello's `heartbeat_s`) is taken as dead, dropped and
//!   reconnected with back-off: a network that drops a connection without a FIN or RST
//!   would otherwise leave the client waiting for good.
//! - **Topics**: [`Client::subscribe`] stores a subscription on the server (over HTTP,
//!   with its answer); it outlives the connection and is never sent again on reconnect,
//!   so a producer's later unsubscribe stands.
//! - **Fallback**: in [`Mode::Auto`], after `ws_failures_before_fallback` WebSocket
//!   failures *while the server answers HTTP* (not 503/429: busy), the client moves to
//!   SSE for good.
//! - **Back-pressure**: notifications wait in a bounded queue; an application that stops
//!   reading stops the socket being read, the server closes it as a slow consumer, and
//!   the client resumes from its seq once the application reads again.
//!
//! ```no_run
//! # async fn demo() -> Result<(), herald_client::ClientError> {
//! let mut client = herald_client::Client::connect("http://127.0.0.1:8080", "<user jwt>", None)?;
//! while let Some(n) = client.next().await {
//!     println!("#{} {}", n.seq, n.title.as_deref().unwrap_or(""));
//!     client.mark_read(n.seq).await?;
//! }
//! # Ok(()) }
//! ```

mod backoff;
mod driver;
mod error;
mod http;
mod token;
mod tracker;

pub use error::ClientError;
pub use herald_protocol::Notification;
pub use token::{Token, TokenProvider};

use herald_protocol::ClientFrame;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;
use tokio::sync::{mpsc, oneshot, watch};

/// Which transport to use.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Mode {
    /// WebSocket, falling back to SSE where WebSocket is blocked.
    #[default]
    Auto,
    /// WebSocket only.
    WebSocket,
    /// Server-Sent Events only.
    Sse,
}

/// The transport of a live connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Transport {
    /// `GET /v1/ws`.
    WebSocket,
    /// `GET /v1/sse`.
    Sse,
}

/// Where the connection is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum State {
    /// The first attempt is under way.
    Connecting,
    /// Connected; `hello` received.
    Live,
    /// Waiting before the next attempt.
    Reconnecting,
    /// Closed for good.
    Closed,
}

/// A snapshot of the client, updated as frames arrive.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Status {
    /// Connection state.
    pub state: State,
    /// The transport while live.
    pub transport: Option<Transport>,
    /// The seq the next connection resumes after.
    pub last_seq: Option<u64>,
    /// The newest seq known to exist.
    pub latest_seq: u64,
    /// Unread notifications.
    pub unread: u64,
    /// The newest read position announced (`read` frames).
    pub read_up_to: Option<u64>,
    /// Connections that ended and were retried.
    pub reconnects: u64,
    /// The last problem seen, for logs and UIs.
    pub last_error: Option<String>,
}

/// Connection settings; see [`Client::builder`].
#[derive(Debug, Clone)]
pub struct ClientBuilder {
    url: String,
    token: Option<Token>,
    after: Option<u64>,
    mode: Mode,
    ws_url: Option<String>,
    backoff_base: Duration,
    backoff_max: Duration,
    ws_failures_before_fallback: u32,
    open_timeout: Duration,
    missed_heartbeats: u32,
    queue: usize,
    dedup_window: usize,
}

impl ClientBuilder {
    /// The user token (a JWT).
    pub fn token(mut self, token: impl Into<String>) -> Self {
        self.token = Some(Token::Static(token.into()));
        self
    }

    /// A token provider, asked first and again after every refusal.
    pub fn token_provider(mut self, provider: TokenProvider) -> Self {
        self.token = Some(Token::Provider(provider));
        self
    }

    /// Resume after this seq; `None` (the default): live only from now.
    pub fn after(mut self, after: Option<u64>) -> Self {
        self.after = after;
        self
    }

    /// Transport choice (default [`Mode::Auto`]).
    pub fn mode(mut self, mode: Mode) -> Self {
        self.mode = mode;
        self
    }

    /// Overrides the WebSocket endpoint (default `ws(s)://…/v1/ws`).
    pub fn ws_url(mut self, url: impl Into<String>) -> Self {
        self.ws_url = Some(url.into());
        self
    }

    /// First backoff ceiling (default 500 ms) and the cap (default 30 s).
    pub fn backoff(mut self, base: Duration, max: Duration) -> Self {
        self.backoff_base = base;
        self.backoff_max = max.max(base);
        self
    }

    /// WebSocket failures (while HTTP works) before [`Mode::Auto`] moves to SSE (default 3).
    pub fn ws_failures_before_fallback(mut self, n: u32) -> Self {
        self.ws_failures_before_fallback = n.max(1);
        self
    }

    /// How many of the server's heartbeat intervals a connection may go without receiving
    /// anything (no frame, no WebSocket ping, no SSE keep-alive comment) before it is
    /// taken as dead: dropped, and reconnected with back-off from the last seq. Default 2,
    /// as the gateway allows its peers: a minute at Herald's default `heartbeat_s` of 30.
    /// At least 1 (a connection heard of exactly every interval is alive), at most 100.
    /// The interval is the one each connection's hello announces; until the hello
    /// arrives, the limit is the open timeout (10 s).
    pub fn missed_heartbeats(mut self, beats: u32) -> Self {
        self.missed_heartbeats = beats.clamp(1, 100);
        self
    }

    /// Notifications buffered for the application (default 1024).
    pub fn queue(mut self, n: usize) -> Self {
        self.queue = n.max(1);
        self
    }

    /// Starts the connection task.
    ///
    /// # Errors
    /// [`ClientError::Url`] for an unusable URL, [`ClientError::Token`] without a token.
    pub fn connect(self) -> Result<Client, ClientError> {
        let base = self.url.trim_end_matches('/').to_string();
        let bad = |reason: &str| ClientError::Url {
            url: self.url.clone(),
            reason: reason.to_string(),
        };
        let ws_base = if let Some(rest) = base.strip_prefix("http://") {
            format!("ws://{rest}")
        } else if let Some(rest) = base.strip_prefix("https://") {
            format!("wss://{rest}")
        } else {
            return Err(bad("must start with http:// or https://"));
        };
        let token = self
            .token
            .clone()
            .ok_or_else(|| ClientError::Token("no token or token provider given".into()))?;
        let tokens = Arc::new(token::Tokens::new(token));
        let http = http::Http::new(base.clone(), tokens.clone())?;
        let status = Arc::new(watch::Sender::new(Status {
            state: State::Connecting,
            transport: None,
            last_seq: self.after,
            latest_seq: 0,
            unread: 0,
            read_up_to: None,
            reconnects: 0,
            last_error: None,
        }));
        let (commands, command_rx) = mpsc::unbounded_channel();
        let (notes_tx, notes) = mpsc::channel(self.queue);
        let driver = driver::Driver {
            ws_url: self
                .ws_url
                .clone()
                .unwrap_or_else(|| format!("{ws_base}/v1/ws")),
            sse_url: format!("{base}/v1/sse"),
            settings: self.clone(),
            http: http.clone(),
            tokens,
            status: status.clone(),
            notes: notes_tx,
            commands: command_rx,
            tracker: tracker::Tracker::new(self.after, self.dedup_window),
            backoff: backoff::Backoff::new(self.backoff_base, self.backoff_max),
            use_sse: self.mode == Mode::Sse,
            ws_failures: 0,
            refresh_token: false,
            reconnect_requested: false,
            live_since: None,
            heartbeat: None,
        };
        let task = tokio::spawn(driver.run());
        Ok(Client {
            commands,
            notes,
            status,
            http,
            task,
        })
    }
}

/// A live connection for one user. Dropping it stops the connection.
#[derive(Debug)]
pub struct Client {
    commands: mpsc::UnboundedSender<driver::Command>,
    notes: mpsc::Receiver<Notification>,
    status: Arc<watch::Sender<Status>>,
    http: http::Http,
    task: tokio::task::JoinHandle<()>,
}

impl Client {
    /// Settings for a client of the Herald at `url` (`http(s)://host:port`).
    pub fn builder(url: impl Into<String>) -> ClientBuilder {
        ClientBuilder {
            url: url.into(),
            token: None,
            after: None,
            mode: Mode::Auto,
            ws_url: None,
            backoff_base: Duration::from_millis(500),
            backoff_max: Duration::from_secs(30),
            ws_failures_before_fallback: 3,
            open_timeout: Duration::from_secs(10),
            missed_heartbeats: 2,
            queue: 1024,
            dedup_window: 2048,
        }
    }

    /// Connects to `url` as the user of `token`, resuming after `after` (or live only).
    ///
    /// # Errors
    /// [`ClientError::Url`] for an unusable URL. Network trouble is not an error: the
    /// client keeps retrying; watch [`Client::status`].
    pub fn connect(
        url: &str,
        token: impl Into<String>,
        after: Option<u64>,
    ) -> Result<Client, ClientError> {
        Self::builder(url).token(token).after(after).connect()
    }

    /// The next notification (never one twice, in `seq` order); `None` once closed.
    pub async fn next(&mut self) -> Option<Notification> {
        self.notes.recv().await
    }

    /// The current status.
    pub fn status(&self) -> Status {
        self.status.borrow().clone()
    }

    /// A receiver that sees every status change (e.g. `wait_for(|s| s.state == Live)`).
    pub fn watch(&self) -> watch::Receiver<Status> {
        self.status.subscribe()
    }

    /// Marks read up to and including `up_to`: a `read` frame over WebSocket, else
    /// `POST /v1/me/read`. Returns the unread count as this client now knows it.
    ///
    /// # Errors
    /// When the HTTP call fails.
    pub async fn mark_read(&self, up_to: u64) -> Result<u64, ClientError> {
        if self.frame(ClientFrame::Read { up_to }).await {
            return Ok(self.status.borrow().unread);
        }
        let body = self
            .http
            .json(
                reqwest::Method::POST,
                "/v1/me/read",
                Some(serde_json::json!({ "up_to": up_to })),
            )
            .await?;
        let unread = body["unread"].as_u64().ok_or_else(|| ClientError::Status {
            status: reqwest::StatusCode::OK,
            body: format!("no unread count in {body}"),
        })?;
        // The connection task owns the count; it publishes it.
        let _ = self.commands.send(driver::Command::Unread(unread));
        Ok(unread)
    }

    /// Seen live up to `up_to`; WebSocket only. Whether the frame was sent.
    pub async fn ack(&self, up_to: u64) -> bool {
        self.frame(ClientFrame::Ack { up_to }).await
    }

    /// Joins `topic` (`POST /v1/me/subscriptions`). The server stores the subscription:
    /// it outlives this connection and is not sent again after a reconnect, so a
    /// producer's `DELETE /v1/topics/{topic}/subscribers/{user_id}` stands.
    ///
    /// Over HTTP even while a WebSocket is open: its answer says whether the subscription
    /// was made, where a `subscribe` frame lost with its connection would go unnoticed.
    ///
    /// # Errors
    /// When the HTTP call fails, or Herald refuses (403: the topic does not let users
    /// join it themselves).
    pub async fn subscribe(&self, topic: &str) -> Result<(), ClientError> {
        self.topic(reqwest::Method::POST, topic).await
    }

    /// Leaves `topic` (`DELETE /v1/me/subscriptions`).
    ///
    /// # Errors
    /// When the HTTP call fails.
    pub async fn unsubscribe(&self, topic: &str) -> Result<(), ClientError> {
        self.topic(reqwest::Method::DELETE, topic).await
    }

    async fn topic(&self, method: reqwest::Method, topic: &str) -> Result<(), ClientError> {
        let body = serde_json::json!({ "topic": topic });
        self.http
            .json(method, "/v1/me/subscriptions", Some(body))
            .await
            .map(drop)
    }

    /// Drops the current connection and reconnects now, resuming from the last seq.
    pub fn reconnect(&self) {
        let _ = self.commands.send(driver::Command::Reconnect);
    }

    /// Closes the connection and waits for the task to end.
    pub async fn close(mut self) {
        let _ = self.commands.send(driver::Command::Close);
        let _ = (&mut self.task).await;
    }

    /// Sends `frame` on an open WebSocket; false when there is none.
    async fn frame(&self, frame: ClientFrame) -> bool {
        let (reply, answer) = oneshot::channel();
        if self
            .commands
            .send(driver::Command::Frame(frame, reply))
            .is_err()
        {
            return false;
        }
        answer.await.unwrap_or(false)
    }
}

impl Drop for Client {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl futures::Stream for Client {
    type Item = Notification;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Notification>> {
        self.notes.poll_recv(cx)
    }
}
