//! The `herald` binary's library: configuration, assembling services into a running mesh,
//! the development set-up of `herald up`, ops endpoints, and the benchmarks.
//!
//! `main.rs` only parses the command line and calls into here, so tests run the very same
//! assembly in-process ([`mesh::Mesh::start`]) against a real nats-server.

pub mod bench;
pub mod channels;
pub mod cli;
pub mod config;
pub mod jwks;
pub mod mesh;
pub mod ops;
pub mod page;
pub mod shutdown;
pub mod topic_cli;
pub mod up;
