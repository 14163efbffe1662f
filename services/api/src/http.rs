//! HTTP routes of the API service. `fn routes(state) -> Router`, so tests drive it with
//! `oneshot` or bind it to port 0.

mod inbox;
mod notify;
mod preferences;
mod reads;
mod templates;
mod topics;
mod users;

use crate::accept::Acceptor;
use crate::auth::{Authenticator, HasAuth};
use axum::Router;
use axum::routing::{delete, get, post};
use herald_store::{FanoutLog, PreferenceStore, ReadPositions, Receipts, Subscriptions};
use std::sync::Arc;

pub use inbox::{PageQuery, read_page};
pub use topics::{DEFAULT_BIG_THRESHOLD, TopicSettings};

/// Limits of the API.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ApiConfig {
    /// Largest notify body, bytes (SPEC: 64 KiB by default).
    pub body_limit: usize,
    /// Largest batch body, bytes.
    pub batch_body_limit: usize,
    /// Most items in one batch.
    pub batch_max_items: usize,
}

impl Default for ApiConfig {
    fn default() -> Self {
        Self {
            body_limit: 64 * 1024,
            batch_body_limit: 4 * 1024 * 1024,
            batch_max_items: 1000,
        }
    }
}

/// Everything the API handlers share.
#[derive(Clone, Debug)]
pub struct ApiState {
    /// Writes notifications.
    pub acceptor: Acceptor,
    /// Verifies callers.
    pub auth: Authenticator,
    /// Read positions.
    pub reads: ReadPositions,
    /// Seen positions (`ack` frames).
    pub seen: ReadPositions,
    /// The batcher read receipts go through.
    pub receipts: Receipts,
    /// User preferences.
    pub preferences: PreferenceStore,
    /// Producer request rates.
    pub rates: Arc<crate::ProducerRates>,
    /// Topic subscriptions.
    pub subscriptions: Subscriptions,
    /// Devices and contacts (erased with the user).
    pub targets: herald_store::Targets,
    /// Delivery status and sent markers (erased with the user).
    pub status: herald_store::StatusStore,
    /// Fan-out progress.
    pub fanouts: FanoutLog,
    /// Topic rules.
    pub topics: Arc<TopicSettings>,
    /// Limits.
    pub config: ApiConfig,
}

impl HasAuth for ApiState {
    fn authenticator(&self) -> &Authenticator {
        &self.auth
    }
}

/// The API's routes.
pub fn routes(state: ApiState) -> Router {
    Router::new()
        .route("/v1/notify", post(notify::notify))
        .route("/v1/notify/batch", post(notify::batch))
        .route("/v1/notifications/{id}", delete(notify::cancel))
        .route(
            "/v1/users/{user_id}/notifications",
            get(inbox::producer_page),
        )
        .route("/v1/admin/templates", get(templates::list))
        .route("/v1/admin/templates/reload", post(templates::reload))
        .route("/v1/users/{user_id}", delete(users::erase))
        .route("/v1/topics/{topic}", get(topics::describe))
        .route("/v1/topics/{topic}/publish", post(topics::publish))
        .route("/v1/topics/{topic}/publishes/{id}", get(topics::progress))
        .route(
            "/v1/topics/{topic}/subscribers",
            post(topics::subscribe_many),
        )
        .route(
            "/v1/topics/{topic}/subscribers/{user_id}",
            axum::routing::put(topics::subscribe).delete(topics::unsubscribe),
        )
        .route(
            "/v1/me/subscriptions",
            get(topics::my_topics)
                .post(topics::my_subscribe)
                .delete(topics::my_unsubscribe),
        )
        .route("/v1/me/read", post(reads::mark_read))
        .route("/v1/me/unread", get(reads::unread))
        .route(
            "/v1/me/preferences",
            get(preferences::get_mine).put(preferences::put_mine),
        )
        .route(
            "/v1/users/{user_id}/preferences",
            get(preferences::get_users).put(preferences::put_users),
        )
        .with_state(Arc::new(state))
}
