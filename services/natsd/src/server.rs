//! One supervised nats-server child process: start, health, stop, kill, restart.

mod child;

use std::{
    path::{Path, PathBuf},
    process::Child,
    time::{Duration, Instant},
};

use nix::{errno::Errno, sys::signal::Signal};

use crate::{NatsdError, locate, monitor};
use child::{OwnedChild, Ports, SpawnPlan};

/// The text of `nats/dev.conf`, the single-node development config.
pub const DEV_CONFIG: &str = include_str!("../../../nats/dev.conf");

/// How long [`NatsServer::stop`] waits after SIGTERM before it sends SIGKILL.
const STOP_TIMEOUT: Duration = Duration::from_secs(10);
/// Interval between two looks at a child that is shutting down.
const POLL: Duration = Duration::from_millis(20);

/// Which configuration file the server runs with.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ConfigSource {
    /// `nats/dev.conf` (embedded in this crate), written as `dev.conf` into the store dir.
    Dev,
    /// A config file of your own. It may use the same `$HERALD_NATS_*` variables, which
    /// are always set (see `nats/README.md`); the client port is also forced with `-p`.
    File(PathBuf),
}

/// What to start: binary, config, store and ports.
#[derive(Debug, Clone)]
pub struct NatsServerOptions {
    /// The nats-server binary; `None` runs [`locate`].
    pub binary: Option<PathBuf>,
    /// The configuration file.
    pub config: ConfigSource,
    /// JetStream store (`$HERALD_NATS_STORE`); also holds the log, ports file and dev.conf.
    pub store_dir: PathBuf,
    /// Client port; `None` lets nats-server pick a free one.
    pub client_port: Option<u16>,
    /// WebSocket port (`$HERALD_NATS_WS_PORT`); `None` lets nats-server pick a free one.
    pub websocket_port: Option<u16>,
    /// HTTP monitoring port (`$HERALD_NATS_HTTP_PORT`); `None` picks a free one.
    pub http_port: Option<u16>,
    /// More environment for the child, e.g. the cluster variables of `nats/cluster.conf`.
    pub extra_env: Vec<(String, String)>,
}

impl NatsServerOptions {
    /// A development server from `nats/dev.conf` with every port picked at random.
    pub fn dev(store_dir: impl Into<PathBuf>) -> Self {
        NatsServerOptions {
            binary: None,
            config: ConfigSource::Dev,
            store_dir: store_dir.into(),
            client_port: None,
            websocket_port: None,
            http_port: None,
            extra_env: Vec::new(),
        }
    }
}

/// A running (or stopped, restartable) nats-server child.
///
/// Dropping it kills the child with SIGKILL and reaps it. See the crate docs for what
/// happens when this process dies without running destructors.
#[derive(Debug)]
pub struct NatsServer {
    /// The options with the binary resolved and every port pinned to the one first used,
    /// so that [`NatsServer::restart`] comes back on the same addresses.
    plan: SpawnPlan,
    /// Killed and reaped when dropped; listed for [`kill_all`] from its spawn on.
    child: Option<OwnedChild>,
    pid: u32,
    ports: Ports,
}

impl NatsServer {
    /// Spawns nats-server and returns once it accepts client connections (it has written
    /// its ports file and answers a TCP connection with its `INFO` line).
    ///
    /// # Errors
    ///
    /// [`NatsdError::NotFound`] without a binary of the pinned version;
    /// [`NatsdError::Prepare`] when the store dir or config cannot be written;
    /// [`NatsdError::ExitedEarly`] or [`NatsdError::StartTimeout`] (20 s), both quoting
    /// the end of the child's log.
    pub async fn start(opts: NatsServerOptions) -> Result<NatsServer, NatsdError> {
        let binary = match opts.binary.clone() {
            Some(binary) => binary,
            None => locate()?,
        };
        let mut plan = SpawnPlan::prepare(binary, opts)?;
        let (child, ports) = plan.spawn_and_wait().await?;
        plan.pin_ports(&ports);
        tracing::debug!(pid = child.id(), client = ports.client, "nats-server ready");
        Ok(NatsServer {
            pid: child.id(),
            child: Some(child),
            plan,
            ports,
        })
    }

    /// `nats://127.0.0.1:PORT` of the client listener.
    pub fn client_url(&self) -> String {
        format!("nats://127.0.0.1:{}", self.ports.client)
    }

    /// `ws://127.0.0.1:PORT` of the WebSocket listener, if the config has one.
    pub fn websocket_url(&self) -> Option<String> {
        self.ports.websocket.map(|p| format!("ws://127.0.0.1:{p}"))
    }

    /// `http://127.0.0.1:PORT` of the monitoring listener, if the config has one.
    pub fn monitoring_url(&self) -> Option<String> {
        self.ports
            .monitoring
            .map(|p| format!("http://127.0.0.1:{p}"))
    }

    /// The pid of the current (or, once stopped, the last) child.
    pub fn pid(&self) -> u32 {
        self.pid
    }

    /// The store directory (JetStream data, log, ports file).
    pub fn store_dir(&self) -> &Path {
        &self.plan.opts.store_dir
    }

    /// The file the child's stdout and stderr go to.
    pub fn log_path(&self) -> &Path {
        &self.plan.log_path
    }

    /// Whether the child is still running (false after stop/kill or if it died).
    pub fn is_running(&mut self) -> bool {
        matches!(
            self.child.as_deref_mut().map(Child::try_wait),
            Some(Ok(None))
        )
    }

    /// Fetches a monitoring endpoint such as `/varz`, `/jsz` or `/routez?subs=1` as JSON.
    ///
    /// # Errors
    ///
    /// [`NatsdError::NoMonitoring`] without a monitoring listener; [`NatsdError::Monitor`]
    /// when the request fails or the answer is not JSON.
    pub async fn monitor(&self, endpoint: &str) -> Result<serde_json::Value, NatsdError> {
        let port = self.monitoring_port()?;
        Ok(monitor::get_json(port, endpoint).await?.1)
    }

    pub(crate) fn monitoring_port(&self) -> Result<u16, NatsdError> {
        self.ports
            .monitoring
            .ok_or(NatsdError::NoMonitoring { pid: self.pid })
    }

    /// Graceful stop: SIGTERM (nats-server flushes JetStream and exits), then SIGKILL if
    /// it is still running after 10 s. Stopping a stopped server does nothing.
    ///
    /// # Errors
    ///
    /// [`NatsdError::Process`] when the child cannot be signalled or waited for.
    pub async fn stop(&mut self) -> Result<(), NatsdError> {
        let pid = self.pid;
        let Some(child) = self.child.as_mut() else {
            return Ok(());
        };
        let process_err = |action, source| NatsdError::Process {
            action,
            pid,
            source,
        };
        // Not reaped yet, so the pid cannot have been reused by another process.
        if child
            .try_wait()
            .map_err(|e| process_err("wait for", e))?
            .is_none()
        {
            send_signal(pid, Signal::SIGTERM).map_err(|e| process_err("send SIGTERM to", e))?;
            let deadline = Instant::now() + STOP_TIMEOUT;
            loop {
                if child
                    .try_wait()
                    .map_err(|e| process_err("wait for", e))?
                    .is_some()
                {
                    break;
                }
                if Instant::now() >= deadline {
                    tracing::warn!(
                        pid,
                        "nats-server ignored SIGTERM for {STOP_TIMEOUT:?}; killing it"
                    );
                    child
                        .kill()
                        .map_err(|e| process_err("send SIGKILL to", e))?;
                    child.wait().map_err(|e| process_err("wait for", e))?;
                    break;
                }
                tokio::time::sleep(POLL).await;
            }
        }
        // Reaped: dropping it signals nothing, and takes it off the live list.
        self.child = None;
        self.plan.forget_ports_file(pid);
        Ok(())
    }

    /// SIGKILL now and reap: a crash, as far as nats-server is concerned. JetStream data
    /// not yet synced to disk is left to the OS page cache, which survives a process kill.
    pub fn kill(&mut self) {
        if let Some(child) = self.child.take() {
            // Dropping it SIGKILLs and reaps it.
            drop(child);
            self.plan.forget_ports_file(self.pid);
        }
    }

    /// Stops the server if it runs (gracefully, see [`NatsServer::stop`]) and starts it
    /// again with the same binary, config, store and ports.
    ///
    /// # Errors
    ///
    /// As [`NatsServer::stop`] and [`NatsServer::start`]; a port taken by someone else in
    /// the meantime shows as [`NatsdError::ExitedEarly`].
    pub async fn restart(&mut self) -> Result<(), NatsdError> {
        self.stop().await?;
        // Cancelled half-way, the new child dies with the future (see `OwnedChild`).
        let (child, ports) = self.plan.spawn_and_wait().await?;
        self.pid = child.id();
        self.child = Some(child);
        self.ports = ports;
        Ok(())
    }
}

impl Drop for NatsServer {
    fn drop(&mut self) {
        self.kill();
    }
}

/// The children of this process that run now: a forced exit kills them
/// ([`kill_all`]), since `std::process::exit` runs no destructor.
static LIVE: std::sync::Mutex<Vec<u32>> = std::sync::Mutex::new(Vec::new());

fn live(pid: u32, running: bool) {
    let mut pids = LIVE
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    pids.retain(|p| *p != pid);
    if running {
        pids.push(pid);
    }
}

/// SIGKILLs every nats-server this process started and has not stopped, including one
/// still starting: for a forced exit (a second Ctrl-C), which skips [`NatsServer`]'s
/// drop. The children run in process groups of their own, so nothing else would stop them.
pub fn kill_all() {
    let pids = LIVE
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
        .clone();
    for pid in pids {
        let _ = send_signal(pid, Signal::SIGKILL);
    }
}

/// Sends `signal` to `pid`; a process that is already gone is not an error.
fn send_signal(pid: u32, signal: Signal) -> std::io::Result<()> {
    let raw = i32::try_from(pid).map_err(std::io::Error::other)?;
    match nix::sys::signal::kill(nix::unistd::Pid::from_raw(raw), signal) {
        Ok(()) | Err(Errno::ESRCH) => Ok(()),
        Err(errno) => Err(errno.into()),
    }
}
