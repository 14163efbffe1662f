//! The producer-facing API and the user-facing writes, over HTTP and native NATS.
//!
//! - [`accept`]: the one path every notification takes into Herald — validate, assign the
//!   id, append to the user's inbox and wait for JetStream's ack. HTTP and NATS share it.
//! - [`http`]: axum routes (`POST /v1/notify`, `/v1/notify/batch`, service-side inbox reads,
//!   read receipts, ops endpoints).
//! - [`ingest`]: the native path: a responder on `herald.notify` that answers with the
//!   JetStream ack of the inbox write, so a native publish costs one durable write.
//! - [`limits`]: a token bucket per producer (429 with `Retry-After`).
//! - [`auth`] and [`error`]: extractors for callers, and the one error type.

pub mod accept;
pub mod auth;
pub mod error;
pub mod http;
pub mod ingest;
pub mod limits;

pub use accept::{AcceptError, Accepted, Acceptor, KeyedError, Locales};
pub use auth::{Authenticator, Producer, User};
pub use error::AppError;
pub use http::{ApiConfig, ApiState, TopicSettings, routes};
pub use limits::{ProducerRates, RateConfig};
