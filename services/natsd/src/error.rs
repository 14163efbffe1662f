//! The one error type of this crate.

use std::{io, path::PathBuf, time::Duration};

use crate::locate::PINNED_VERSION;

/// Why a nats-server could not be found, started, queried or stopped.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum NatsdError {
    /// No candidate binary reported the pinned version.
    #[error(
        "no nats-server v{PINNED_VERSION} found ({tried}); run scripts/install-nats-server.sh, \
         or set HERALD_NATS_SERVER to a nats-server v{PINNED_VERSION} binary"
    )]
    NotFound {
        /// Each candidate looked at, and why it was rejected.
        tried: String,
    },

    /// A file or directory the server needs could not be prepared.
    #[error("cannot prepare {path}; check that its parent exists and is writable")]
    Prepare {
        /// The file or directory.
        path: PathBuf,
        /// The underlying I/O error.
        #[source]
        source: io::Error,
    },

    /// The binary could not be executed at all.
    #[error("cannot run {binary}; check that it exists and is executable")]
    Spawn {
        /// The nats-server binary.
        binary: PathBuf,
        /// The underlying I/O error.
        #[source]
        source: io::Error,
    },

    /// The server exited before it accepted clients (bad config, port in use, ...).
    #[error("nats-server exited during start-up ({status}); its log {log} ends with:\n{tail}")]
    ExitedEarly {
        /// How it exited.
        status: std::process::ExitStatus,
        /// The log file of the child.
        log: PathBuf,
        /// The last lines of that log.
        tail: String,
    },

    /// The server did not accept client connections in time.
    #[error(
        "nats-server (pid {pid}) did not accept clients within {timeout:?}; \
         its log {log} ends with:\n{tail}"
    )]
    StartTimeout {
        /// The child's pid (it has been killed).
        pid: u32,
        /// How long we waited.
        timeout: Duration,
        /// The log file of the child.
        log: PathBuf,
        /// The last lines of that log.
        tail: String,
    },

    /// Sending a signal to, or waiting for, the child failed.
    #[error("cannot {action} nats-server (pid {pid})")]
    Process {
        /// What we tried to do (`send SIGTERM to`, `wait for`, ...).
        action: &'static str,
        /// The child's pid.
        pid: u32,
        /// The underlying I/O error.
        #[source]
        source: io::Error,
    },

    /// No free loopback port could be reserved.
    #[error("cannot reserve a free port on 127.0.0.1")]
    FreePort(#[source] io::Error),

    /// The operation needs the monitoring listener, which this server does not have.
    #[error(
        "nats-server (pid {pid}) has no http monitoring listener; set `http_port` in its config"
    )]
    NoMonitoring {
        /// The child's pid.
        pid: u32,
    },

    /// A monitoring endpoint could not be fetched or did not return JSON.
    #[error("cannot read {url}: {reason}")]
    Monitor {
        /// The endpoint.
        url: String,
        /// What went wrong.
        reason: String,
    },

    /// The cluster did not form, or JetStream found no meta leader, in time.
    #[error(
        "nats cluster not ready within {timeout:?} ({detail}); \
         see nats-server.log in each node's store directory"
    )]
    ClusterTimeout {
        /// How long we waited.
        timeout: Duration,
        /// The last state seen on each node.
        detail: String,
    },
}
