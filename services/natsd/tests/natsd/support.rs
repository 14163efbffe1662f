//! A minimal NATS protocol client over TCP (enough for JetStream API requests) and a
//! bounded polling helper.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use serde_json::Value;
use tokio::{
    io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader},
    net::{
        TcpStream,
        tcp::{OwnedReadHalf, OwnedWriteHalf},
    },
};

/// Reads the first line a NATS server sends on `url` and returns its `INFO` JSON.
pub async fn read_info(url: &str) -> Value {
    let stream = TcpStream::connect(host_port(url)).await.expect("connect");
    let mut line = String::new();
    BufReader::new(stream)
        .read_line(&mut line)
        .await
        .expect("read INFO");
    let json = line.strip_prefix("INFO ").expect("first line is INFO");
    serde_json::from_str(json.trim()).expect("INFO is JSON")
}

fn host_port(url: &str) -> String {
    url.strip_prefix("nats://").expect("nats:// url").to_owned()
}

/// The next reply inbox number, shared by every [`RawClient`] of the process.
static NEXT_INBOX: AtomicU64 = AtomicU64::new(1);

/// One connection speaking just enough of the NATS protocol for request/reply.
pub struct RawClient {
    reader: BufReader<OwnedReadHalf>,
    writer: OwnedWriteHalf,
    next_sid: u64,
}

impl RawClient {
    /// Connects and sends CONNECT (headers on, so `Nats-Msg-Id` can be used).
    pub async fn connect(url: &str) -> std::io::Result<RawClient> {
        let stream = TcpStream::connect(host_port(url)).await?;
        let (read, writer) = stream.into_split();
        let mut client = RawClient {
            reader: BufReader::new(read),
            writer,
            next_sid: 1,
        };
        let mut info = String::new();
        client.reader.read_line(&mut info).await?;
        client
            .writer
            .write_all(b"CONNECT {\"verbose\":false,\"pedantic\":false,\"headers\":true}\r\n")
            .await?;
        Ok(client)
    }

    /// Publishes `payload` on `subject` (with `Nats-Msg-Id` if given) and returns the
    /// JSON reply, or `None` when no reply came within 3 s.
    pub async fn request(
        &mut self,
        subject: &str,
        msg_id: Option<&str>,
        payload: &str,
    ) -> std::io::Result<Option<Value>> {
        let sid = self.next_sid;
        self.next_sid += 1;
        // Unique across connections: a reply sent late to an earlier request (a new
        // stream leader answers the entries it applies on taking over, to their original
        // reply subjects) must not be read as the answer to this one.
        let inbox = format!("_INBOX.test.{}", NEXT_INBOX.fetch_add(1, Ordering::Relaxed));
        let mut out = format!("SUB {inbox} {sid}\r\n");
        match msg_id {
            Some(id) => {
                let headers = format!("NATS/1.0\r\nNats-Msg-Id: {id}\r\n\r\n");
                let total = headers.len() + payload.len();
                out += &format!(
                    "HPUB {subject} {inbox} {} {total}\r\n{headers}{payload}\r\n",
                    headers.len()
                );
            }
            None => out += &format!("PUB {subject} {inbox} {}\r\n{payload}\r\n", payload.len()),
        }
        self.writer.write_all(out.as_bytes()).await?;
        let reply = tokio::time::timeout(Duration::from_secs(3), self.read_reply(&inbox)).await;
        self.writer
            .write_all(format!("UNSUB {sid}\r\n").as_bytes())
            .await?;
        match reply {
            Ok(body) => Ok(Some(serde_json::from_slice(&body?).unwrap_or(Value::Null))),
            Err(_) => Ok(None),
        }
    }

    /// Reads protocol lines until a message on `inbox` arrives; answers PINGs.
    async fn read_reply(&mut self, inbox: &str) -> std::io::Result<Vec<u8>> {
        loop {
            let mut line = String::new();
            if self.reader.read_line(&mut line).await? == 0 {
                return Err(std::io::ErrorKind::UnexpectedEof.into());
            }
            let words: Vec<&str> = line.split_whitespace().collect();
            match words.first().copied() {
                Some("PING") => self.writer.write_all(b"PONG\r\n").await?,
                Some("-ERR") => return Err(std::io::Error::other(line)),
                // MSG <subject> <sid> [reply] <len>; HMSG <subject> <sid> [reply] <hdr> <total>
                Some(op @ ("MSG" | "HMSG")) => {
                    let total: usize = words.last().and_then(|w| w.parse().ok()).unwrap_or(0);
                    let header_len: usize = if op == "HMSG" {
                        words[words.len() - 2].parse().unwrap_or(0)
                    } else {
                        0
                    };
                    let mut body = vec![0u8; total + 2];
                    self.reader.read_exact(&mut body).await?;
                    body.truncate(total);
                    if words.get(1) == Some(&inbox) {
                        return Ok(body.split_off(header_len));
                    }
                }
                _ => {}
            }
        }
    }
}

/// Calls `check` until it returns `Some`, at most for `within`; panics with `what`.
pub async fn eventually<T, F, Fut>(within: Duration, what: &str, mut check: F) -> T
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Option<T>>,
{
    let deadline = Instant::now() + within;
    loop {
        if let Some(value) = check().await {
            return value;
        }
        assert!(Instant::now() < deadline, "not within {within:?}: {what}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// A JetStream API request through `url` that retries (new connection each time) until
/// the answer has no `error`, for at most 20 s. Returns that answer.
pub async fn js_ok(url: &str, subject: &str, msg_id: Option<&str>, payload: &str) -> Value {
    let within = Duration::from_secs(20);
    let deadline = Instant::now() + within;
    loop {
        let last = match RawClient::connect(url).await {
            Ok(mut client) => match client.request(subject, msg_id, payload).await {
                Ok(Some(reply)) if reply.get("error").is_none() => return reply,
                Ok(Some(reply)) => reply.to_string(),
                Ok(None) => "no reply".to_owned(),
                Err(e) => e.to_string(),
            },
            Err(e) => e.to_string(),
        };
        assert!(
            Instant::now() < deadline,
            "{subject} on {url} failed for {within:?}, last: {last}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Where [`never_ready_server`] writes its pid, in the store dir it is started on.
const NEVER_READY_PID: &str = "never-ready.pid";

/// A stand-in for nats-server that never serves (like a real one recovering a huge
/// JetStream store): it answers `--version` like the pinned release, and otherwise writes
/// its pid to `<store>/never-ready.pid` and sleeps. Returns its path, under `dir`.
pub fn never_ready_server(dir: &std::path::Path) -> std::path::PathBuf {
    use std::os::unix::fs::PermissionsExt as _;
    let path = dir.join("never-ready-nats-server");
    let script = format!(
        "#!/bin/sh\n\
         if [ \"$1\" = --version ]; then echo 'nats-server: v{}'; exit 0; fi\n\
         echo $$ > \"$HERALD_NATS_STORE/{NEVER_READY_PID}\"\n\
         exec sleep 600\n",
        herald_natsd::PINNED_VERSION
    );
    std::fs::write(&path, script).expect("write the script");
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755)).expect("chmod");
    // A file just written may still be open for writing in a child another test thread
    // forked meanwhile (until that child execs): running it then fails with "Text file
    // busy". Wait until it runs.
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        match std::process::Command::new(&path).arg("--version").output() {
            Ok(out) if out.status.success() => return path,
            result => assert!(
                Instant::now() < deadline,
                "{path:?} does not run: {result:?}"
            ),
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// The pid [`never_ready_server`] wrote into `store`, once it runs.
pub fn never_ready_pid(store: &std::path::Path) -> Option<u32> {
    std::fs::read_to_string(store.join(NEVER_READY_PID))
        .ok()?
        .trim()
        .parse()
        .ok()
}

/// Whether `pid` names a process that runs (a zombie, killed but not yet reaped, does not).
pub fn running(pid: u32) -> bool {
    let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
        return false;
    };
    let state = stat
        .rfind(')')
        .and_then(|i| stat[i + 1..].split_whitespace().next());
    state != Some("Z")
}
