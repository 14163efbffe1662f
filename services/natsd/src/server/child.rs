//! Spawning the nats-server process and waiting until it serves clients.
//!
//! The child is owned from the moment it exists ([`OwnedChild`]): it is listed for
//! [`super::kill_all`] at once and killed when its owner drops, so a start that is
//! cancelled (a dropped future: Ctrl-C during `herald bench`, a second Ctrl-C while
//! `herald up` waits for a slow JetStream recovery) or fails leaves no nats-server behind.

use std::{
    fs::{self, File, OpenOptions},
    io::{Read, Seek, SeekFrom, Write},
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use tokio::{io::AsyncReadExt, net::TcpStream};

use super::{ConfigSource, DEV_CONFIG, NatsServerOptions};
use crate::NatsdError;

/// Bound on the whole start-up: spawn, listeners up, first `INFO` line read.
const START_TIMEOUT: Duration = Duration::from_secs(20);
/// Interval between two looks at a starting child.
const POLL: Duration = Duration::from_millis(25);
/// Lines of the child's log quoted in start-up errors.
const TAIL_LINES: usize = 30;

/// The listeners a running server reported in its ports file.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Ports {
    pub(crate) client: u16,
    pub(crate) websocket: Option<u16>,
    pub(crate) monitoring: Option<u16>,
}

/// Everything needed to (re)spawn the same server.
#[derive(Debug)]
pub(crate) struct SpawnPlan {
    pub(crate) binary: PathBuf,
    pub(crate) opts: NatsServerOptions,
    pub(crate) config_path: PathBuf,
    pub(crate) log_path: PathBuf,
    ports_dir: PathBuf,
}

impl SpawnPlan {
    /// Creates the store dir, writes the dev config if asked for, and fixes the paths.
    pub(crate) fn prepare(
        binary: PathBuf,
        mut opts: NatsServerOptions,
    ) -> Result<Self, NatsdError> {
        let prepare_err = |path: &Path| {
            let path = path.to_path_buf();
            move |source| NatsdError::Prepare { path, source }
        };
        fs::create_dir_all(&opts.store_dir).map_err(prepare_err(&opts.store_dir))?;
        // Absolute, because the child reads it from the environment and the config file
        // may live elsewhere.
        opts.store_dir =
            std::path::absolute(&opts.store_dir).map_err(prepare_err(&opts.store_dir))?;
        let config_path = match &opts.config {
            ConfigSource::Dev => {
                let path = opts.store_dir.join("dev.conf");
                fs::write(&path, DEV_CONFIG).map_err(prepare_err(&path))?;
                path
            }
            ConfigSource::File(path) => path.clone(),
        };
        Ok(SpawnPlan {
            binary,
            config_path,
            log_path: opts.store_dir.join("nats-server.log"),
            ports_dir: opts.store_dir.join("ports"),
            opts,
        })
    }

    /// Remembers the ports actually bound, so a restart binds the same ones.
    pub(crate) fn pin_ports(&mut self, ports: &Ports) {
        self.opts.client_port = Some(ports.client);
        self.opts.websocket_port = ports.websocket.or(self.opts.websocket_port);
        self.opts.http_port = ports.monitoring.or(self.opts.http_port);
    }

    /// Spawns the child and waits until it accepts clients. On failure, and when this
    /// future is dropped before it ends, the child is killed and reaped.
    pub(crate) async fn spawn_and_wait(&self) -> Result<(OwnedChild, Ports), NatsdError> {
        let mut child = OwnedChild::new(self.spawn()?);
        let pid = child.id();
        let deadline = Instant::now() + START_TIMEOUT;
        loop {
            match child.try_wait() {
                Ok(Some(status)) => {
                    return Err(NatsdError::ExitedEarly {
                        status,
                        log: self.log_path.clone(),
                        tail: log_tail(&self.log_path),
                    });
                }
                Ok(None) => {}
                Err(source) => {
                    return Err(NatsdError::Process {
                        action: "wait for",
                        pid,
                        source,
                    });
                }
            }
            if let Some(ports) = self.read_ports_file(pid)
                && says_info(ports.client).await
            {
                return Ok((child, ports));
            }
            if Instant::now() >= deadline {
                drop(child);
                return Err(NatsdError::StartTimeout {
                    pid,
                    timeout: START_TIMEOUT,
                    log: self.log_path.clone(),
                    tail: log_tail(&self.log_path),
                });
            }
            tokio::time::sleep(POLL).await;
        }
    }

    fn spawn(&self) -> Result<Child, NatsdError> {
        let prepare_err = |path: &Path| {
            let path = path.to_path_buf();
            move |source| NatsdError::Prepare { path, source }
        };
        // Stale ports files of killed children would otherwise accumulate.
        match fs::remove_dir_all(&self.ports_dir) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(prepare_err(&self.ports_dir)(e)),
        }
        fs::create_dir_all(&self.ports_dir).map_err(prepare_err(&self.ports_dir))?;
        let mut log = OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log_path)
            .map_err(prepare_err(&self.log_path))?;
        writeln!(
            log,
            "--- herald-natsd: starting {} -c {}",
            self.binary.display(),
            self.config_path.display()
        )
        .map_err(prepare_err(&self.log_path))?;
        let log_err = log.try_clone().map_err(prepare_err(&self.log_path))?;

        let opts = &self.opts;
        let mut command = Command::new(&self.binary);
        command
            .arg("-c")
            .arg(&self.config_path)
            .arg("--ports_file_dir")
            .arg(&self.ports_dir)
            // The command line overrides the config file, so this holds for any config.
            .arg("-p")
            .arg(port_value(opts.client_port))
            .env("HERALD_NATS_STORE", &opts.store_dir)
            .env("HERALD_NATS_PORT", port_value(opts.client_port))
            .env("HERALD_NATS_HTTP_PORT", port_value(opts.http_port))
            .env("HERALD_NATS_WS_PORT", port_value(opts.websocket_port))
            .envs(opts.extra_env.iter().map(|(k, v)| (k, v)))
            .stdin(Stdio::null())
            .stdout(Stdio::from(log))
            .stderr(Stdio::from(log_err));
        // A process group of its own: Ctrl-C in a terminal reaches the whole foreground
        // group, and nats-server must not stop while Herald still drains into it; Herald
        // stops it after.
        #[cfg(unix)]
        std::os::unix::process::CommandExt::process_group(&mut command, 0);
        command.spawn().map_err(|source| NatsdError::Spawn {
            binary: self.binary.clone(),
            source,
        })
    }

    /// Parses `<exe>_<pid>.ports` (`{"nats":["nats://h:p"],"monitoring":[..],"websocket":[..]}`).
    /// `None` until the file exists and is complete.
    fn read_ports_file(&self, pid: u32) -> Option<Ports> {
        let suffix = format!("_{pid}.ports");
        let entry = fs::read_dir(&self.ports_dir)
            .ok()?
            .filter_map(Result::ok)
            .find(|e| e.file_name().to_string_lossy().ends_with(&suffix))?;
        let json: serde_json::Value = serde_json::from_slice(&fs::read(entry.path()).ok()?).ok()?;
        let first_port = |key: &str| json.get(key)?.get(0)?.as_str().and_then(url_port);
        Some(Ports {
            client: first_port("nats")?,
            websocket: first_port("websocket"),
            monitoring: first_port("monitoring"),
        })
    }

    /// Removes the ports file of a child that is gone (nats-server only removes it on a
    /// clean shutdown).
    pub(crate) fn forget_ports_file(&self, pid: u32) {
        let suffix = format!("_{pid}.ports");
        if let Ok(entries) = fs::read_dir(&self.ports_dir) {
            for entry in entries.filter_map(Result::ok) {
                if entry.file_name().to_string_lossy().ends_with(&suffix) {
                    let _ = fs::remove_file(entry.path());
                }
            }
        }
    }
}

/// A nats-server child owned by this process: listed for [`super::kill_all`] (a forced
/// exit runs no destructor) while it exists, SIGKILLed and reaped when dropped.
#[derive(Debug)]
pub(crate) struct OwnedChild {
    child: Child,
}

impl OwnedChild {
    /// Takes ownership of a child just spawned.
    fn new(child: Child) -> Self {
        super::live(child.id(), true);
        Self { child }
    }
}

impl std::ops::Deref for OwnedChild {
    type Target = Child;

    fn deref(&self) -> &Child {
        &self.child
    }
}

impl std::ops::DerefMut for OwnedChild {
    fn deref_mut(&mut self) -> &mut Child {
        &mut self.child
    }
}

impl Drop for OwnedChild {
    fn drop(&mut self) {
        // Errors mean it has already exited (or was reaped: std then sends nothing, so a
        // reused pid is never hit); wait() reaps it either way, and SIGKILL cannot be
        // caught, so the wait is short even on an async thread.
        let _ = self.child.kill();
        let _ = self.child.wait();
        super::live(self.child.id(), false);
    }
}

/// `-1` asks nats-server for a free port; it works both on the command line and through
/// `$VAR` expansion in the config.
fn port_value(port: Option<u16>) -> String {
    port.map_or_else(|| "-1".to_owned(), |p| p.to_string())
}

/// The port of `scheme://host:port[/path]`.
fn url_port(url: &str) -> Option<u16> {
    let authority = url.split_once("://")?.1.split('/').next()?;
    authority.rsplit_once(':')?.1.parse().ok()
}

/// Whether a client connection to `port` gets nats-server's `INFO` greeting.
async fn says_info(port: u16) -> bool {
    let attempt = async {
        let mut stream = TcpStream::connect(("127.0.0.1", port)).await.ok()?;
        let mut buf = [0u8; 5];
        stream.read_exact(&mut buf).await.ok()?;
        Some(&buf == b"INFO ")
    };
    matches!(
        tokio::time::timeout(Duration::from_secs(2), attempt).await,
        Ok(Some(true))
    )
}

/// The last [`TAIL_LINES`] lines of the log, for error messages.
fn log_tail(path: &Path) -> String {
    const WINDOW: u64 = 16 * 1024;
    let read = || -> std::io::Result<String> {
        let mut file = File::open(path)?;
        let len = file.metadata()?.len();
        file.seek(SeekFrom::Start(len.saturating_sub(WINDOW)))?;
        let mut bytes = Vec::new();
        file.read_to_end(&mut bytes)?;
        Ok(String::from_utf8_lossy(&bytes).into_owned())
    };
    match read() {
        Ok(text) => {
            let lines: Vec<&str> = text.lines().collect();
            lines[lines.len().saturating_sub(TAIL_LINES)..].join("\n")
        }
        Err(e) => format!("(log unreadable: {e})"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn url_port_reads_every_listener_form() {
        assert_eq!(url_port("nats://127.0.0.1:4222"), Some(4222));
        assert_eq!(url_port("http://127.0.0.1:8222/"), Some(8222));
        assert_eq!(url_port("ws://[::1]:8080"), Some(8080));
        assert_eq!(url_port("nats://127.0.0.1"), None);
    }

    #[test]
    fn random_port_is_minus_one() {
        assert_eq!(port_value(None), "-1");
        assert_eq!(port_value(Some(4222)), "4222");
    }
}
