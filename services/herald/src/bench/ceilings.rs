//! Transport ceilings for `herald bench notify`: the same clients as the Herald phases,
//! against servers that do nothing but answer. They bound what Herald can reach on this
//! machine with that transport whatever it does per notification, so a gap to the raw
//! JetStream figure can be split into "the transport costs this much" and "Herald costs
//! the rest".
//!
//! - HTTP: an axum server on Herald's runtime, with the same listener settings
//!   (TCP_NODELAY), that reads each `POST /v1/notify` body and answers 202 with a small
//!   JSON body; no auth, no parsing, no NATS.
//! - Native: a queue-group responder on the same nats-server that answers each request at
//!   once with a PubAck-shaped body; no parsing, no durable write.

use super::BenchError;
use axum::http::StatusCode;
use futures::StreamExt as _;
use tokio_util::sync::CancellationToken;

/// The subject the responder ceiling listens on.
pub const RESPONDER_SUBJECT: &str = "hceiling.notify";

/// A ceiling server running until dropped.
pub struct Ceiling {
    stop: CancellationToken,
    /// Where it listens: an HTTP base URL, or a NATS subject.
    pub target: String,
}

impl Drop for Ceiling {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

/// Starts the do-nothing HTTP server on `runtime` (Herald's).
///
/// # Errors
/// When it cannot bind.
pub async fn http(runtime: &super::Apart) -> Result<Ceiling, BenchError> {
    let listener = std::net::TcpListener::bind("127.0.0.1:0")?;
    listener.set_nonblocking(true)?;
    let target = format!("http://{}", listener.local_addr()?);
    let stop = CancellationToken::new();
    let until = stop.clone();
    runtime.spawn(async move {
        let Ok(listener) = tokio::net::TcpListener::from_std(listener) else {
            return;
        };
        let listener = axum::serve::ListenerExt::tap_io(listener, |tcp| {
            let _ = tcp.set_nodelay(true);
        });
        let app = axum::Router::new().route(
            "/v1/notify",
            axum::routing::post(|body: axum::body::Bytes| async move {
                (
                    StatusCode::ACCEPTED,
                    [("content-type", "application/json")],
                    format!(r#"{{"status":"accepted","bytes":{}}}"#, body.len()),
                )
            }),
        );
        let _ = axum::serve(listener, app)
            .with_graceful_shutdown(until.cancelled_owned())
            .await;
    });
    Ok(Ceiling { stop, target })
}

/// Starts the do-nothing responder on `runtime` (Herald's), on its own connection.
///
/// # Errors
/// When NATS cannot be reached.
pub async fn responder(runtime: &super::Apart, url: &str) -> Result<Ceiling, BenchError> {
    let url = url.to_owned();
    let stop = CancellationToken::new();
    let until = stop.clone();
    runtime
        .spawn(async move {
            let client = async_nats::connect(url).await?;
            let mut sub = client
                .queue_subscribe(RESPONDER_SUBJECT, "ceiling".into())
                .await?;
            client.flush().await?;
            tokio::spawn(async move {
                let mut seq = 0u64;
                loop {
                    let msg = tokio::select! {
                        () = until.cancelled() => break,
                        msg = sub.next() => match msg { Some(m) => m, None => break },
                    };
                    seq += 1;
                    if let Some(reply) = msg.reply {
                        let body = format!(r#"{{"stream":"CEILING","seq":{seq}}}"#);
                        let _ = client.publish(reply, body.into()).await;
                    }
                }
            });
            Ok::<_, BenchError>(())
        })
        .await??;
    Ok(Ceiling {
        stop,
        target: RESPONDER_SUBJECT.into(),
    })
}
