//! Channel workers: everything between a channel job on a durable work queue and a
//! provider's answer.
//!
//! - [`runtime`]: per channel, one durable pull consumer per lane (`high` never waits
//!   behind `normal`/`low`), bounded concurrency, drain on shutdown.
//! - [`batch`]: a pulled batch prepared together (sent markers, per-user reads).
//! - [`job`]: one job to its ack: sent markers for exactly-once sends, escalation by real
//!   acks for push, retries by error class, dead letters.
//! - [`providers`]: the registry providers plug into, with a token bucket and a circuit
//!   breaker ([`breaker`]) each, and failover in registration order.
//! - [`dlq`]: the dead-letter stream; [`backoff`]: retry delays with full jitter.
//! - [`email`]: the SMTP provider; [`unsubscribe`] and [`optout`]: RFC 8058 one-click
//!   unsubscribe into the user's preferences.
//! - [`http`]: devices, contacts, delivery status, dead letters, pause/resume.

pub mod backoff;
pub mod batch;
pub mod breaker;
pub mod dlq;
pub mod email;
pub mod http;
pub mod job;
pub mod optout;
pub mod providers;
pub mod runtime;
pub mod unsubscribe;

pub use providers::{Limits, Providers};
pub use runtime::{Hooks, LaneBudget, NoHooks, WorkerConfig, WorkerDeps, WorkerError, run};
