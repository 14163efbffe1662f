//! Connections. Publishing and consuming use separate connections: heavy async publishing
//! on one connection starves the consumers that share it (ARCHITECTURE.md).

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
}

impl Nats {
    /// True while the publish connection is up: a publish now can be acked.
    pub fn is_connected(&self) -> bool {
        matches!(
            self.publish.connection_state(),
            async_nats::connection::State::Connected
        )
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

/// Connects to `url` (comma-separated for a cluster) as `name`.
///
/// Retries the first connection in the background, so a service can start before NATS
/// and answer 503 until it is there; reconnects forever afterwards.
///
/// # Errors
/// When the URL does not parse.
pub async fn connect(url: &str, name: &str) -> Result<Nats, async_nats::ConnectError> {
    let urls: Vec<&str> = url
        .split(',')
        .map(str::trim)
        .filter(|u| !u.is_empty())
        .collect();
    let publish = options(name, "pub", None).connect(urls.as_slice()).await?;
    let (lost, losses) = tokio::sync::watch::channel(0);
    let consume = options(name, "sub", Some(std::sync::Arc::new(lost)))
        .connect(urls.as_slice())
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
    })
}

/// `lost`: bumped when core messages may have been lost (see [`Nats::losses`]).
fn options(
    name: &str,
    role: &str,
    lost: Option<std::sync::Arc<tokio::sync::watch::Sender<u64>>>,
) -> async_nats::ConnectOptions {
    // Every `Connected` after the first is a reconnect. (Not "a `Connected` after a
    // `Disconnected`": events go through a bounded channel, and a burst of slow-consumer
    // events can crowd the `Disconnected` out.)
    let connected_before = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    async_nats::ConnectOptions::new()
        .name(format!("{name}-{role}"))
        .retry_on_initial_connect()
        .max_reconnects(None)
        .subscription_capacity(65_536)
        .client_capacity(65_536)
        .event_callback(move |event| {
            let (lost, connected_before) = (lost.clone(), connected_before.clone());
            async move {
                let bump = || {
                    if let Some(lost) = &lost {
                        lost.send_modify(|n| *n += 1);
                    }
                };
                match event {
                    async_nats::Event::Connected => {
                        tracing::info!("connected to NATS");
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
