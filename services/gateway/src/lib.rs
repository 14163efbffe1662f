//! Real-time delivery to connected users over WebSocket, SSE and long-poll.
//!
//! All three transports sit on one delivery core, [`feed::Feed`]: it subscribes to the
//! user's live subject *before* replaying the inbox from the client's position, then
//! forwards live messages, dropping any `seq` already sent and repairing any gap from the
//! inbox (each live message carries the previous `seq` of its subject). So replay and live
//! meet with no gap and no duplicate, whatever arrives during the replay.
//!
//! Live messages reach feeds through the [`hub::Hub`]: one NATS subscription per partition
//! for the whole process, dispatched to connections by subject. Read receipts and acks go
//! through the process's batcher ([`herald_store::receipts`]).

pub mod admission;
pub mod feed;
pub mod hub;
mod longpoll;
pub mod queue;
mod sse;
mod ws;

use axum::Router;
use axum::routing::get;
use herald_api::Authenticator;
use herald_api::auth::HasAuth;
use herald_store::{Inbox, ReadPositions, Receipts, ReceiptsConfig};
use std::sync::Arc;
use std::time::Duration;

pub use feed::{Feed, FeedError};
pub use hub::{Hub, HubError};

/// Gateway tunables.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct GatewayConfig {
    /// Interval of WebSocket pings and SSE keep-alives.
    pub heartbeat: Duration,
    /// Frames queued for one connection before it counts as too slow (close 4008).
    pub queue_frames: usize,
    /// Largest client frame, bytes.
    pub max_client_frame: usize,
    /// Admission limits.
    pub limits: admission::Limits,
    /// Most notifications coalesced into one `batch` frame. Coalescing is opportunistic:
    /// only what queued up while the previous write was in flight, so it adds no latency.
    pub max_batch: usize,
    /// Batching of read receipts and acks (the process's batcher, shared with the API).
    pub receipts: ReceiptsConfig,
    /// Inbox reads for replays (catching up) in flight at once on this gateway.
    pub replay_reads: usize,
}

impl Default for GatewayConfig {
    fn default() -> Self {
        Self {
            heartbeat: Duration::from_secs(30),
            queue_frames: 1024,
            max_client_frame: 16 * 1024,
            limits: admission::Limits::default(),
            max_batch: 100,
            receipts: ReceiptsConfig::default(),
            replay_reads: 64,
        }
    }
}

/// What the gateway's handlers share.
#[derive(Clone, Debug)]
pub struct GatewayState {
    /// Inbox reads and the live subjects.
    pub inbox: Inbox,
    /// Read positions.
    pub reads: ReadPositions,
    /// Where `read` and `ack` frames go (batched KV writes).
    pub receipts: Receipts,
    /// Live messages for every local connection.
    pub hub: Hub,
    /// Verifies user tokens at upgrade.
    pub auth: Authenticator,
    /// Tunables.
    pub config: GatewayConfig,
    /// Cancelled at shutdown: connections get a `reconnect` frame and close.
    pub shutdown: tokio_util::sync::CancellationToken,
    /// Who may connect now.
    pub admission: Arc<admission::Admission>,
    /// Topic subscriptions, for `subscribe`/`unsubscribe` frames.
    pub topics: Option<Topics>,
    /// Paces replays: one permit per inbox read in flight (`replay_reads` of them).
    pub replay_pace: Arc<tokio::sync::Semaphore>,
}

/// What `subscribe`/`unsubscribe` frames need: the store and the rules.
#[derive(Debug, Clone)]
pub struct Topics {
    /// Subscriptions.
    pub subscriptions: herald_store::Subscriptions,
    /// Which topics users may join themselves.
    pub settings: Arc<herald_api::TopicSettings>,
}

impl GatewayState {
    /// The gateway's state.
    pub fn new(
        inbox: Inbox,
        reads: ReadPositions,
        receipts: Receipts,
        hub: Hub,
        auth: Authenticator,
        config: GatewayConfig,
        shutdown: tokio_util::sync::CancellationToken,
    ) -> Self {
        Self {
            inbox,
            reads,
            receipts,
            hub,
            auth,
            admission: Arc::new(admission::Admission::new(config.limits)),
            replay_pace: Arc::new(tokio::sync::Semaphore::new(config.replay_reads.max(1))),
            config,
            shutdown,
            topics: None,
        }
    }

    /// Lets connections join and leave topics with frames.
    #[must_use]
    pub fn with_topics(mut self, topics: Topics) -> Self {
        self.topics = Some(topics);
        self
    }
}

impl HasAuth for GatewayState {
    fn authenticator(&self) -> &Authenticator {
        &self.auth
    }
}

/// Counts an open connection in `herald_gateway_connections{transport}` (and the connect
/// in `herald_gateway_connects_total`) for as long as it lives, however it ends.
pub(crate) struct Connected(&'static str);

impl Connected {
    pub(crate) fn new(transport: &'static str) -> Self {
        metrics::gauge!("herald_gateway_connections", "transport" => transport).increment(1.0);
        metrics::counter!("herald_gateway_connects_total", "transport" => transport).increment(1);
        Connected(transport)
    }
}

impl Drop for Connected {
    fn drop(&mut self) {
        metrics::gauge!("herald_gateway_connections", "transport" => self.0).decrement(1.0);
    }
}

/// Opens a user's feed and builds the `hello` frame that starts every connection.
///
/// The store is asked as little as possible, so that a reconnect storm costs it little
/// per upgrade: the read position and the view's head in one concurrent step (two or
/// three requests), then the unread count only when something is unread. The whole open
/// passes the gateway's adaptive cap ([`admission::adaptive`]), which learns from how
/// long these reads take; over it the upgrade is refused before it costs anything.
///
/// # Errors
/// 503 when NATS cannot answer, or when the store is busy with other opens.
pub(crate) async fn open_session(
    state: &GatewayState,
    user: &herald_protocol::UserId,
    after: Option<u64>,
) -> Result<(Feed, herald_protocol::ServerFrame), herald_api::AppError> {
    let opening = state.admission.begin_open().await?;
    let opened = lookup(state, user, after).await;
    opening.finish(opened.is_ok());
    opened
}

async fn lookup(
    state: &GatewayState,
    user: &herald_protocol::UserId,
    after: Option<u64>,
) -> Result<(Feed, herald_protocol::ServerFrame), herald_api::AppError> {
    let unavailable = |e: &dyn std::error::Error| herald_api::AppError::unavailable(e);
    // Tap first, then read: see `Feed::tap`.
    let tapped = Feed::tap(&state.hub, user.clone()).map_err(|e| unavailable(&e))?;
    let (read_up_to, head) = tokio::try_join!(
        async { state.reads.get(user).await.map_err(|e| unavailable(&e)) },
        async { state.inbox.head(user).await.map_err(|e| unavailable(&e)) },
    )?;
    let (unread, feed) = tokio::try_join!(
        async {
            state
                .inbox
                .unread(&head, read_up_to)
                .await
                .map_err(|e| unavailable(&e))
        },
        async {
            tapped
                .start(after, read_up_to, &head)
                .await
                .map_err(|e| unavailable(&e))
        },
    )?;
    let hello = herald_protocol::ServerFrame::Hello {
        user_id: user.clone(),
        last_seq: feed.hello_last_seq(after, &head),
        unread,
        heartbeat_s: state.config.heartbeat.as_secs(),
    };
    Ok((feed.paced(Arc::clone(&state.replay_pace)), hello))
}

/// The gateway's routes: `/v1/ws` (alias `/ws/connect`), `/v1/sse`, and the long-polling
/// inbox read `GET /v1/me/notifications`.
pub fn routes(state: GatewayState) -> Router {
    Router::new()
        .route("/v1/ws", get(ws::upgrade))
        .route("/ws/connect", get(ws::upgrade))
        .route("/v1/sse", get(sse::stream))
        .route("/v1/me/notifications", get(longpoll::page))
        .with_state(Arc::new(state))
}
