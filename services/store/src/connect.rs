//! Connections. Publishing and consuming use separate connections: heavy async publishing
//! on one connection starves the consumers that share it (ARCHITECTURE.md). Both
//! authenticate and use TLS as the process's [`NatsOptions`] say.

mod refusal;

use crate::nats_auth::{Loaded, NatsAuth, NatsOptions, NatsOptionsError, NatsTls, Servers};
use async_nats::jetstream;
use std::time::Duration;

/// How long a JetStream request (publish ack included) may take before the caller is told
/// NATS is unavailable. Short, because an HTTP producer is waiting behind it.
pub const JETSTREAM_TIMEOUT: Duration = Duration::from_secs(3);

/// The connections one Herald process uses.
#[derive(Clone, Debug)]
pub struct Nats {
    /// For JetStream publishes (inbox appends).
    pub publish: async_nats::Client,
    /// For subscriptions, consumers and direct gets.
    pub consume: async_nats::Client,
    /// JetStream on the publish connection.
    pub js: jetstream::Context,
    /// JetStream on the consume connection.
    pub js_consume: jetstream::Context,
    /// Counts the times the consume connection may have lost core messages: each
    /// reconnect after a disconnect, and each slow-consumer drop. Whoever delivers live
    /// messages from it re-reads what they hold from the store when it changes.
    pub losses: tokio::sync::watch::Receiver<u64>,
    /// The last error of a connection attempt (`authorization violation`, an I/O
    /// error), cleared once connected; for messages while NATS is waited for.
    pub problems: tokio::sync::watch::Receiver<Option<String>>,
}

impl Nats {
    /// True while the publish connection is up: a publish now can be acked.
    pub fn is_connected(&self) -> bool {
        matches!(
            self.publish.connection_state(),
            async_nats::connection::State::Connected
        )
    }

    /// The last error connecting, while not connected (see [`Nats::problems`]).
    pub fn problem(&self) -> Option<String> {
        self.problems.borrow().clone()
    }

    /// Closes both connections, flushing what they hold (2 s at most in all). Clones kept
    /// by background tasks would otherwise go on reconnecting, and logging it, after their
    /// server is stopped on purpose (`herald up` stopping its nats-server, a benchmark's).
    pub async fn close(&self) {
        let closing = async {
            for client in [&self.publish, &self.consume] {
                if client.drain().await.is_err() {
                    continue; // closed already
                }
                // `drain` only asks: the connection closes once its handler has flushed,
                // and from then on a command finds no one to take it.
                while client.flush().await.is_ok() {
                    tokio::time::sleep(std::time::Duration::from_millis(5)).await;
                }
            }
        };
        let _ = tokio::time::timeout(std::time::Duration::from_secs(2), closing).await;
    }
}

/// `url` (comma-separated for a cluster) with the credentials of every URL masked
/// (`nats://herald:secret@host` → `nats://***@host`), for logs and error messages: NATS
/// credentials travel in the URL, and logs are read by more people than secrets are.
pub fn redacted(url: &str) -> String {
    url.split(',')
        .map(|one| {
            let one = one.trim();
            let rest_at = one.find("://").map_or(0, |i| i + 3);
            let (scheme, rest) = one.split_at(rest_at);
            let authority_end = rest.find('/').unwrap_or(rest.len());
            match rest[..authority_end].rfind('@') {
                Some(at) => format!("{scheme}***{}", &rest[at..]),
                None => one.to_owned(),
            }
        })
        .collect::<Vec<_>>()
        .join(",")
}

/// Connects to `url` (comma-separated for a cluster) as `name`, with no credentials or
/// TLS beyond what the URL says: for tests and tools against a local server. Services
/// use [`connect_with`] and the configured [`NatsOptions`].
///
/// # Errors
/// As [`connect_with`].
pub async fn connect(url: &str, name: &str) -> Result<Nats, ConnectError> {
    connect_with(url, &NatsOptions::default(), name).await
}

/// Connects to `url` (comma-separated for a cluster) as `name`, authenticating and using
/// TLS as `options` say.
///
/// A NATS that cannot be reached yet is waited for: the connections retry in the
/// background, so a service can start before NATS and answer 503 until it is there, and
/// they reconnect forever afterwards. A NATS that answers and refuses — wrong or missing
/// credentials, a certificate that does not verify — is an error at once: retrying would
/// not change its answer.
///
/// # Errors
/// [`ConnectError::Options`] for a URL that does not parse or options whose files cannot
/// be used; [`ConnectError::Refused`] when NATS refuses the credentials or TLS fails.
pub async fn connect_with(
    url: &str,
    options: &NatsOptions,
    name: &str,
) -> Result<Nats, ConnectError> {
    let servers = Servers::parse(url)?;
    let auth = options.auth_with(&servers)?;
    let loaded = Loaded::load(&auth)?;
    tracing::info!(
        url = %redacted(url),
        auth = %options.describe(&auth),
        nkey = loaded.public_key().as_deref(),
        "connecting to NATS"
    );
    let target = Target {
        servers: &servers.addrs,
        url: redacted(url),
        auth: &auth,
        tls: &options.tls,
    };
    let (problem, problems) = tokio::sync::watch::channel(None);
    let problem = std::sync::Arc::new(problem);
    let base = || loaded.options(&options.tls);
    let publish = target
        .open(|| Ok(tune(base()?, name, "pub", None, problem.clone())))
        .await?;
    let (lost, losses) = tokio::sync::watch::channel(0);
    let lost = std::sync::Arc::new(lost);
    let consume = target
        .open(|| {
            Ok(tune(
                base()?,
                name,
                "sub",
                Some(lost.clone()),
                problem.clone(),
            ))
        })
        .await?;
    let js = jetstream::ContextBuilder::new()
        .timeout(JETSTREAM_TIMEOUT)
        .max_ack_inflight(16_384)
        .build(publish.clone());
    let js_consume = jetstream::ContextBuilder::new()
        .timeout(JETSTREAM_TIMEOUT)
        .build(consume.clone());
    Ok(Nats {
        publish,
        consume,
        js,
        js_consume,
        losses,
        problems,
    })
}

/// Why [`connect_with`] failed.
#[derive(Debug, thiserror::Error)]
pub enum ConnectError {
    /// The URL or the options cannot be used (a file missing, two ways to authenticate).
    #[error(transparent)]
    Options(#[from] NatsOptionsError),
    /// NATS answered and refused: the credentials, or the TLS handshake. The message
    /// says which settings to look at.
    // `cause` is not a `#[source]`: an async-nats error shows its own cause in its
    // message and again as its source, which would repeat it in every error chain.
    #[error("NATS at {url} refused the connection ({cause}): {hint}")]
    Refused {
        /// The URL, credentials masked.
        url: String,
        /// What to check.
        hint: String,
        /// What the client saw.
        cause: async_nats::ConnectError,
    },
    /// Connecting could not even start.
    #[error("connecting to NATS at {url}: {cause}")]
    Connect {
        /// The URL, credentials masked.
        url: String,
        /// What the client saw.
        cause: async_nats::ConnectError,
    },
}

/// Where and how one process connects.
struct Target<'a> {
    servers: &'a [async_nats::ServerAddr],
    url: String,
    auth: &'a NatsAuth,
    tls: &'a NatsTls,
}

impl Target<'_> {
    /// One connection: a first attempt that fails at once if NATS refuses, then, while
    /// no server is reachable, attempts in the background.
    async fn open(
        &self,
        options: impl Fn() -> Result<async_nats::ConnectOptions, NatsOptionsError>,
    ) -> Result<async_nats::Client, ConnectError> {
        let first = match options()?.connect(self.servers).await {
            Ok(client) => return Ok(client),
            Err(e) => e,
        };
        if let Some(hint) = refusal::hint(&first, self.auth, self.tls) {
            return Err(ConnectError::Refused {
                url: self.url.clone(),
                hint,
                cause: first,
            });
        }
        if first.kind() == async_nats::ConnectErrorKind::ServerParse {
            return Err(ConnectError::Connect {
                url: self.url.clone(),
                cause: first,
            });
        }
        tracing::warn!(url = %self.url, error = %first, "NATS not reachable yet; connecting in the background");
        options()?
            .retry_on_initial_connect()
            .connect(self.servers)
            .await
            .map_err(|cause| ConnectError::Connect {
                url: self.url.clone(),
                cause,
            })
    }
}

/// `lost`: bumped when core messages may have been lost (see [`Nats::losses`]);
/// `problem`: the last connection error, for [`Nats::problem`].
fn tune(
    options: async_nats::ConnectOptions,
    name: &str,
    role: &str,
    lost: Option<std::sync::Arc<tokio::sync::watch::Sender<u64>>>,
    problem: std::sync::Arc<tokio::sync::watch::Sender<Option<String>>>,
) -> async_nats::ConnectOptions {
    // Every `Connected` after the first is a reconnect. (Not "a `Connected` after a
    // `Disconnected`": events go through a bounded channel, and a burst of slow-consumer
    // events can crowd the `Disconnected` out.)
    let connected_before = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    options
        .name(format!("{name}-{role}"))
        .max_reconnects(None)
        .subscription_capacity(65_536)
        .client_capacity(65_536)
        .event_callback(move |event| {
            let (lost, connected_before, problem) =
                (lost.clone(), connected_before.clone(), problem.clone());
            async move {
                let bump = || {
                    if let Some(lost) = &lost {
                        lost.send_modify(|n| *n += 1);
                    }
                };
                match event {
                    async_nats::Event::Connected => {
                        tracing::info!("connected to NATS");
                        problem.send_replace(None);
                        // Messages published while this connection was away never
                        // reached its subscriptions.
                        if connected_before.swap(true, std::sync::atomic::Ordering::AcqRel) {
                            bump();
                        }
                    }
                    async_nats::Event::Disconnected => tracing::warn!("disconnected from NATS"),
                    async_nats::Event::SlowConsumer(sid) => {
                        tracing::warn!(sid, "NATS slow consumer: messages were dropped");
                        bump();
                    }
                    async_nats::Event::ClientError(e) => {
                        tracing::warn!(error = %e, "NATS connection failed");
                        problem.send_replace(Some(e.to_string()));
                    }
                    async_nats::Event::ServerError(e) => {
                        tracing::warn!(error = %e, "NATS server error");
                        problem.send_replace(Some(e.to_string()));
                    }
                    other => tracing::info!(%other, "NATS event"),
                }
            }
        })
}

/// Whether `error` (or a cause of it) says NATS did not answer — a request that timed
/// out, no responders while JetStream restarts, no connection — rather than that what
/// was asked for is wrong or missing. A component that meets it while opening waits for
/// NATS, as the rest of Herald does; any other error is for the operator.
pub fn is_unavailable(error: &(dyn std::error::Error + 'static)) -> bool {
    let mut cause = Some(error);
    while let Some(e) = cause {
        let text = e.to_string().to_ascii_lowercase();
        if [
            "timed out",
            "no responders",
            "not connected",
            "disconnected",
        ]
        .iter()
        .any(|m| text.contains(m))
        {
            return true;
        }
        cause = e.source();
    }
    false
}

#[cfg(test)]
mod tests {
    use super::redacted;

    #[test]
    fn credentials_are_masked_in_every_url() {
        assert_eq!(
            redacted("nats://herald:s3cret@n1:4222, nats://token@n2:4222,nats://n3:4222"),
            "nats://***@n1:4222,nats://***@n2:4222,nats://n3:4222"
        );
        assert_eq!(redacted("tls://u:p@h/x@y"), "tls://***@h/x@y");
        assert_eq!(redacted("127.0.0.1:4222"), "127.0.0.1:4222");
        assert_eq!(redacted("a:b@127.0.0.1"), "***@127.0.0.1");
    }
}
