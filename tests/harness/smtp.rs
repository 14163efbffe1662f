//! A real SMTP server for email tests: `python3 -m aiosmtpd` with its `Mailbox` handler,
//! writing every received message into a maildir the test reads.

use anyhow::{Context as _, bail};
use std::path::PathBuf;
use std::process::Stdio;
use std::time::Duration;

/// An aiosmtpd handler that stores mail like `Mailbox` but refuses some recipients the
/// way real servers do.
const REJECTING_HANDLER: &str = r#"
from aiosmtpd.handlers import Mailbox

class Rejecting(Mailbox):
    async def handle_RCPT(self, server, session, envelope, address, rcpt_options):
        if address.startswith("gone@"):
            return "550 5.1.1 <%s>: Recipient address rejected: User unknown" % address
        if address.startswith("busy@"):
            return "451 4.3.0 Try again later"
        if address.startswith("flood@"):
            return "451 4.7.1 Rate limit exceeded, try again later"
        envelope.rcpt_tos.append(address)
        return "250 OK"
"#;

/// A running aiosmtpd; killed on drop.
#[derive(Debug)]
pub struct SmtpServer {
    /// Killed on drop (`kill_on_drop`).
    _child: tokio::process::Child,
    port: u16,
    dir: tempfile::TempDir,
}

impl SmtpServer {
    /// Starts aiosmtpd on a free port with a fresh maildir (`HERALD_PYTHON`, else
    /// `python3`; needs `pip install aiosmtpd`).
    ///
    /// # Errors
    /// When Python or aiosmtpd is missing, or the server does not listen within 20 s.
    pub async fn start() -> anyhow::Result<Self> {
        Self::spawn("aiosmtpd.handlers.Mailbox", None).await
    }

    /// Like [`SmtpServer::start`], but the server answers `RCPT TO` for `gone@…` with
    /// `550 5.1.1 User unknown`, for `busy@…` with `451 4.3.0 Try again later` and for
    /// `flood@…` with `451 4.7.1 Rate limit exceeded`.
    ///
    /// # Errors
    /// As [`SmtpServer::start`].
    pub async fn start_rejecting() -> anyhow::Result<Self> {
        Self::spawn("herald_smtp_handler.Rejecting", Some(REJECTING_HANDLER)).await
    }

    async fn spawn(handler: &str, module: Option<&str>) -> anyhow::Result<Self> {
        let dir = tempfile::tempdir().context("maildir")?;
        if let Some(source) = module {
            std::fs::write(dir.path().join("herald_smtp_handler.py"), source)
                .context("writing the handler module")?;
        }
        let python = std::env::var("HERALD_PYTHON").unwrap_or_else(|_| "python3".into());
        // The OS picks the port; aiosmtpd binds it right after.
        let port = {
            let probe = std::net::TcpListener::bind("127.0.0.1:0").context("probe port")?;
            probe.local_addr()?.port()
        };
        let mailbox = dir.path().join("mail");
        let child = tokio::process::Command::new(&python)
            .env("PYTHONPATH", dir.path())
            .args(["-m", "aiosmtpd", "-n", "-l"])
            .arg(format!("127.0.0.1:{port}"))
            .args(["-c", handler])
            .arg(&mailbox)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .kill_on_drop(true)
            .spawn()
            .with_context(|| format!("starting {python} -m aiosmtpd (pip install aiosmtpd)"))?;
        let child = std::sync::Mutex::new(child);
        crate::eventually(Duration::from_secs(20), "aiosmtpd listening", || async {
            let exited = child.lock().map(|mut c| c.try_wait().ok().flatten());
            if let Ok(Some(status)) = exited {
                bail!("aiosmtpd exited: {status} (is it installed? pip install aiosmtpd)");
            }
            tokio::net::TcpStream::connect(("127.0.0.1", port))
                .await
                .context("connect")?;
            Ok(())
        })
        .await?;
        let child = child
            .into_inner()
            .map_err(|_| anyhow::anyhow!("aiosmtpd handle poisoned"))?;
        Ok(Self {
            _child: child,
            port,
            dir,
        })
    }

    /// `smtp://127.0.0.1:PORT`.
    pub fn url(&self) -> String {
        format!("smtp://127.0.0.1:{}", self.port)
    }

    /// Every message received so far, raw.
    ///
    /// # Errors
    /// When the maildir cannot be read.
    pub fn messages(&self) -> anyhow::Result<Vec<Vec<u8>>> {
        let new = self.dir.path().join("mail").join("new");
        let mut out = Vec::new();
        let Ok(entries) = std::fs::read_dir(&new) else {
            return Ok(out);
        };
        let mut paths: Vec<PathBuf> = entries.filter_map(|e| Some(e.ok()?.path())).collect();
        paths.sort();
        for path in paths {
            out.push(std::fs::read(&path).with_context(|| path.display().to_string())?);
        }
        Ok(out)
    }
}
