//! Locates, verifies and supervises the nats-server that Herald runs on.
//!
//! Herald is pinned to one nats-server release ([`PINNED_VERSION`]). This crate
//!
//! - finds a binary of exactly that version ([`locate`]): `HERALD_NATS_SERVER`, then
//!   `$HERALD_HOME/bin/nats-server` (as installed by `scripts/install-nats-server.sh`),
//!   then `PATH`;
//! - runs it as a child process from the repository's own configs, `nats/dev.conf`
//!   ([`NatsServer`]) or `nats/cluster.conf` three times over ([`NatsCluster`]), on
//!   loopback with free ports, and waits until it really serves clients;
//! - stops, kills and restarts it on the same ports and store, which is what the
//!   durability tests need.
//!
//! The child's stdout and stderr go to `nats-server.log` in its store directory; a failed
//! start quotes the last lines of that log.
//!
//! # Lifetime of the child
//!
//! [`NatsServer`] kills (SIGKILL) and reaps its child on drop, so a panicking test does
//! not leak servers. The child is owned from its spawn, not from the end of its start: a
//! start (or restart) whose future is dropped, or that fails, kills it too, and
//! [`kill_all`] knows it while it starts. The child runs in a process group of its own, so Ctrl-C in a
//! terminal reaches only this process, which stops the child after draining into it; a
//! forced exit calls [`kill_all`]. If this process is itself SIGKILLed, nothing runs and
//! the child survives:
//! `prctl(PR_SET_PDEATHSIG)` would cover that, but it needs `unsafe` (forbidden in this
//! workspace) and fires when the *spawning thread* exits, which in a tokio runtime is not
//! the same as the process exiting.

mod cluster;
mod error;
mod locate;
mod monitor;
mod server;

pub use cluster::{CLUSTER_CONFIG, NatsCluster};
pub use error::NatsdError;
pub use locate::{PINNED_VERSION, locate, locate_with};
pub use server::{ConfigSource, DEV_CONFIG, NatsServer, NatsServerOptions, kill_all};
