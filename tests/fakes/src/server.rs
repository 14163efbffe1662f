//! Serving a fake's axum router on a port-0 listener, in cleartext (HTTP/1.1 and h2c) or
//! over TLS. Dropping the [`Server`] stops it and every connection it holds.

use axum::Router;
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto;
use hyper_util::service::TowerToHyperService;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use tokio::net::TcpListener;
use tokio::task::{JoinHandle, JoinSet};
use tokio_rustls::TlsAcceptor;

/// Concurrent HTTP/2 streams per connection, as APNs advertises.
const MAX_STREAMS: u32 = 1_000;

/// A running fake server.
#[derive(Debug)]
pub struct Server {
    addr: SocketAddr,
    tls: bool,
    connections: Arc<AtomicUsize>,
    open: Arc<AtomicUsize>,
    task: JoinHandle<()>,
}

impl Server {
    /// Serves `router` on `127.0.0.1:0`; with `tls`, HTTPS with the ALPN the config offers
    /// (HTTP/2 only if it offers only `h2`).
    ///
    /// # Errors
    /// When the listener cannot be bound.
    pub async fn start(
        router: Router,
        tls: Option<Arc<rustls::ServerConfig>>,
    ) -> std::io::Result<Self> {
        let listener = TcpListener::bind("127.0.0.1:0").await?;
        let addr = listener.local_addr()?;
        let h2_only = tls
            .as_ref()
            .is_some_and(|c| c.alpn_protocols == [b"h2".to_vec()]);
        let acceptor = tls.clone().map(TlsAcceptor::from);
        let connections_accepted = Arc::new(AtomicUsize::new(0));
        let counter = Arc::clone(&connections_accepted);
        let open = Arc::new(AtomicUsize::new(0));
        let open_count = Arc::clone(&open);
        let task = tokio::spawn(async move {
            // Connections live in this set, so aborting the accept loop ends them too.
            let mut connections = JoinSet::new();
            loop {
                let (stream, _) = tokio::select! {
                    accepted = listener.accept() => match accepted {
                        Ok(a) => a,
                        Err(e) => {
                            tracing::warn!(error = %e, "fake server accept failed");
                            continue;
                        }
                    },
                    Some(_) = connections.join_next(), if !connections.is_empty() => continue,
                };
                counter.fetch_add(1, Ordering::SeqCst);
                // As real providers' front ends do: without it Nagle holds a burst's later
                // responses until the client's delayed ACK (~40 ms) and the fake, not the
                // worker, sets the pace.
                if let Err(e) = stream.set_nodelay(true) {
                    tracing::debug!(error = %e, "fake server could not set TCP_NODELAY");
                }
                let service = TowerToHyperService::new(router.clone());
                let acceptor = acceptor.clone();
                let open = OpenConnection::new(&open_count);
                connections.spawn(async move {
                    let _open = open;
                    let mut builder = auto::Builder::new(TokioExecutor::new());
                    // As many concurrent streams as APNs allows (hyper's default is 200).
                    builder.http2().max_concurrent_streams(MAX_STREAMS);
                    if h2_only {
                        builder = builder.http2_only();
                    }
                    let result = match acceptor {
                        Some(acceptor) => match acceptor.accept(stream).await {
                            Ok(tls) => builder.serve_connection(TokioIo::new(tls), service).await,
                            Err(e) => {
                                tracing::debug!(error = %e, "fake server tls handshake failed");
                                return;
                            }
                        },
                        None => {
                            builder
                                .serve_connection(TokioIo::new(stream), service)
                                .await
                        }
                    };
                    if let Err(e) = result {
                        tracing::debug!(error = %e, "fake server connection ended");
                    }
                });
            }
        });
        Ok(Self {
            addr,
            tls: tls.is_some(),
            connections: connections_accepted,
            open,
            task,
        })
    }

    /// `http://127.0.0.1:<port>` or `https://…`.
    pub fn url(&self) -> String {
        let scheme = if self.tls { "https" } else { "http" };
        format!("{scheme}://{}", self.addr)
    }

    /// How many TCP connections were accepted (clients should reuse theirs).
    pub fn connections(&self) -> usize {
        self.connections.load(Ordering::SeqCst)
    }

    /// How many connections are open now (every request a closed one carried has been
    /// handled).
    pub fn open_connections(&self) -> usize {
        self.open.load(Ordering::SeqCst)
    }

    /// The bound address.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Counts a connection as open until it is dropped, however its task ends.
struct OpenConnection(Arc<AtomicUsize>);

impl OpenConnection {
    fn new(count: &Arc<AtomicUsize>) -> Self {
        count.fetch_add(1, Ordering::SeqCst);
        Self(Arc::clone(count))
    }
}

impl Drop for OpenConnection {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::SeqCst);
    }
}
