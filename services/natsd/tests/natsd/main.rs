//! Integration tests of herald-natsd against the real, pinned nats-server.
//!
//! They need nats-server v2.14.6 (`scripts/install-nats-server.sh`); without it they fail
//! with the error telling how to install it.

mod cluster;
mod dev_server;
mod support;
