//! Deliveries and client options shared by the provider tests.

use herald_channels::{Delivery, HttpOptions, SendError, Target};
use herald_protocol::{Channel, Priority, UserId};
use std::future::Future;
use std::time::Duration;

/// A delivery with a UUID id, title and body.
pub fn delivery(channel: Channel, target: Target) -> Delivery {
    Delivery {
        id: uuid::Uuid::now_v7().to_string(),
        seq: 7,
        user_id: UserId::new("user-1").expect("valid user id"),
        channel,
        priority: Priority::Normal,
        category: Some("like".into()),
        title: Some("New like".into()),
        body: Some("Ada liked your photo".into()),
        data: serde_json::Map::new(),
        collapse_key: None,
        expires_at: None,
        target,
        unsubscribe_url: None,
        html: None,
    }
}

/// Client options trusting `ca_pem`, with a short timeout so hangs are quick to detect.
pub fn http(ca_pem: Option<&str>) -> HttpOptions {
    HttpOptions {
        timeout: Duration::from_millis(2500),
        extra_root_pem: ca_pem.map(|p| p.as_bytes().to_vec()),
    }
}

/// Short names for asserting classes.
pub fn class(result: &Result<herald_channels::Sent, SendError>) -> &'static str {
    match result {
        Ok(_) => "sent",
        Err(SendError::Throttled { .. }) => "throttled",
        Err(SendError::Transient { .. }) => "transient",
        Err(SendError::Permanent { .. }) => "permanent",
        Err(SendError::InvalidTarget { .. }) => "invalid-target",
    }
}

/// Polls `attempt` until it returns `Some`, at most `within`.
pub async fn eventually<T, F, Fut>(within: Duration, mut attempt: F) -> Option<T>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Option<T>>,
{
    let deadline = tokio::time::Instant::now() + within;
    loop {
        if let Some(value) = attempt().await {
            return Some(value);
        }
        if tokio::time::Instant::now() >= deadline {
            return None;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// A server that answers every request with `status` and a chunked body that does not
/// end, counting the bytes it manages to write, until the client goes away. (It does stop
/// at [`EndlessBody::CAP`], so that a client that reads everything fails its test rather
/// than exhausting the machine's memory.)
pub struct EndlessBody {
    addr: std::net::SocketAddr,
    written: std::sync::Arc<std::sync::atomic::AtomicU64>,
    hung_up: std::sync::Arc<std::sync::atomic::AtomicUsize>,
}

impl EndlessBody {
    /// Far beyond any answer a provider is read for.
    pub const CAP: u64 = 64 * 1024 * 1024;

    /// Starts the server on a free port of 127.0.0.1.
    pub async fn start(status: u16) -> Self {
        use std::sync::Arc;
        use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
        use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
        let socket = tokio::net::TcpSocket::new_v4().expect("socket");
        // A small send buffer: what is counted as written is close to what left.
        socket.set_send_buffer_size(16 * 1024).expect("send buffer");
        socket
            .bind("127.0.0.1:0".parse().expect("address"))
            .expect("bind");
        let listener = socket.listen(16).expect("listen");
        let addr = listener.local_addr().expect("addr");
        let written = Arc::new(AtomicU64::new(0));
        let hung_up = Arc::new(AtomicUsize::new(0));
        let (count, done) = (written.clone(), hung_up.clone());
        tokio::spawn(async move {
            while let Ok((stream, _)) = listener.accept().await {
                let (count, done) = (count.clone(), done.clone());
                tokio::spawn(async move {
                    let (mut read, mut write) = stream.into_split();
                    // The request's head, then drain whatever else it sends.
                    let mut head = Vec::new();
                    let mut buf = [0u8; 4096];
                    while !head.windows(4).any(|w| w == b"\r\n\r\n") {
                        match read.read(&mut buf).await {
                            Ok(0) | Err(_) => return,
                            Ok(n) => head.extend_from_slice(&buf[..n]),
                        }
                    }
                    tokio::spawn(async move {
                        while matches!(read.read(&mut buf).await, Ok(n) if n > 0) {}
                    });
                    let start = format!(
                        "HTTP/1.1 {status} Whatever\r\ncontent-type: application/json\r\ntransfer-encoding: chunked\r\n\r\n"
                    );
                    if write.write_all(start.as_bytes()).await.is_err() {
                        done.fetch_add(1, Ordering::SeqCst);
                        return;
                    }
                    let mut chunk = b"4000\r\n".to_vec();
                    chunk.extend(std::iter::repeat_n(b'x', 0x4000));
                    chunk.extend_from_slice(b"\r\n");
                    while count.load(Ordering::SeqCst) < Self::CAP {
                        if write.write_all(&chunk).await.is_err() {
                            break;
                        }
                        count.fetch_add(0x4000, Ordering::SeqCst);
                    }
                    done.fetch_add(1, Ordering::SeqCst);
                });
            }
        });
        Self {
            addr,
            written,
            hung_up,
        }
    }

    /// The server's URL with `path`.
    pub fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.addr)
    }

    /// Body bytes written so far.
    pub fn written(&self) -> u64 {
        self.written.load(std::sync::atomic::Ordering::SeqCst)
    }

    /// Waits until the client stopped reading and hung up, then says how much body it
    /// was sent.
    pub async fn written_when_hung_up(&self) -> u64 {
        let hung_up = eventually(Duration::from_secs(10), || async {
            (self.hung_up.load(std::sync::atomic::Ordering::SeqCst) > 0).then_some(())
        })
        .await;
        assert!(hung_up.is_some(), "the client never hung up");
        self.written()
    }
}

/// How much of an endless body a client may cost: the 64 KiB it reads, plus what the
/// socket buffers and the HTTP stack's read buffer hold when it hangs up (128 KiB in
/// all, measured on loopback). Reading the body whole costs [`EndlessBody::CAP`].
pub const ENDLESS_BODY_BUDGET: u64 = 1024 * 1024;
