//! The native path: a responder on `herald.notify` (queue group `herald-ingest`).
//!
//! A producer publishes a notify body with a JetStream client (`js.publish`), using
//! `Nats-Msg-Id` as its idempotency key. Herald validates it and appends it to the user's
//! inbox with the producer's reply subject as the append's own, so the PubAck the producer
//! receives is JetStream's, sent by the server once the notification is durable — Herald
//! waits for no ack and sends no answer of its own. A notification costs one durable
//! write and two hops through nats-server (producer → Herald → stream), and the ack can
//! never be false: only JetStream sends it. The notification's `id` is derived from the
//! `Nats-Msg-Id` ([`herald_protocol::notification::idempotent_id`] with producer
//! [`NATIVE_PRODUCER`]).
//!
//! A body that fails validation is written to the REJECTED stream with its reason and
//! answered by Herald with *that* append's ack plus the reason: acknowledged, recorded for
//! operators, never redelivered. With no Herald running the producer gets "no
//! responders" — never a false ack.

use crate::accept::{AcceptError, Acceptor};
use async_nats::HeaderMap;
use async_nats::jetstream::message::PublishMessage;
use futures::StreamExt as _;
use herald_protocol::streams::REJECTED;
use herald_store::InboxError;
use std::future::Future;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;

/// Queue group shared by every ingest responder.
pub const QUEUE_GROUP: &str = "herald-ingest";
/// Producer name native idempotency keys are namespaced under.
pub const NATIVE_PRODUCER: &str = "nats";
/// Bytes of a rejected body kept in the REJECTED stream.
const REJECTED_KEEP: usize = 64 * 1024;
/// Rejections being recorded at once, per process; more wait (and so does the ingest).
const REJECTS_IN_FLIGHT: usize = 256;

/// Serves `herald.notify` until `shutdown` resolves, then drains in-flight appends.
///
/// # Errors
/// When the subscription cannot be made.
pub async fn run(
    acceptor: Acceptor,
    shutdown: impl Future<Output = ()>,
) -> Result<(), async_nats::SubscribeError> {
    listen(acceptor).await?.run(shutdown).await;
    Ok(())
}

/// The ingest subscription, made and confirmed by the server, not yet served.
#[derive(Debug)]
pub struct Listening {
    acceptor: Acceptor,
    sub: async_nats::Subscriber,
}

/// Subscribes to `herald.notify` and waits until the server has the subscription, so a
/// producer publishing right after this returns finds a responder.
///
/// # Errors
/// When the subscription cannot be made.
pub async fn listen(acceptor: Acceptor) -> Result<Listening, async_nats::SubscribeError> {
    let nats = acceptor.inbox().nats();
    let subject = acceptor.inbox().subjects().notify();
    let sub = nats
        .consume
        .queue_subscribe(subject.clone(), QUEUE_GROUP.into())
        .await?;
    if let Err(e) = nats.consume.flush().await {
        tracing::warn!(error = %e, "could not confirm the ingest subscription");
    }
    tracing::info!(%subject, "native ingest listening");
    Ok(Listening { acceptor, sub })
}

impl Listening {
    /// Serves until `shutdown` resolves, then records pending rejections and flushes the
    /// appends sent, so every message taken gets its answer.
    pub async fn run(self, shutdown: impl Future<Output = ()>) {
        let Listening { acceptor, mut sub } = self;
        let nats = acceptor.inbox().nats().clone();
        let own_prefix = format!("{}.", acceptor.inbox().subjects().prefix());
        let accepted = metrics::counter!("herald_notify_accepted_total", "path" => "nats");
        // Rejections (rare) are recorded by one task, a bounded number at a time, so a
        // flood of bad input neither spawns without bound nor holds up good messages.
        let (rejects, rx) = mpsc::channel::<Rejection>(REJECTS_IN_FLIGHT);
        let recorder = tokio::spawn(record_all(
            rx,
            nats.clone(),
            acceptor.inbox().subjects().rejected(),
            own_prefix.clone(),
        ));
        tokio::pin!(shutdown);
        loop {
            let msg = tokio::select! {
                _ = &mut shutdown => break,
                msg = sub.next() => match msg { Some(m) => m, None => break },
            };
            let key = msg
                .headers
                .as_ref()
                .and_then(|h| h.get("Nats-Msg-Id"))
                .map(|v| v.as_str().to_string());
            // Appends go out in arrival order, keeping a producer's order per user.
            let sent = match acceptor
                .prepare(&msg.payload, NATIVE_PRODUCER, key.as_deref())
                .await
            {
                Ok(prepared) => {
                    let reply = msg.reply.clone().filter(|r| safe_reply(r, &own_prefix));
                    acceptor.forward(&prepared, reply).await
                }
                Err(e) => Err(e),
            };
            let reason = match sent {
                Ok(()) => {
                    accepted.increment(1);
                    continue;
                }
                Err(AcceptError::Invalid(e)) => e.to_string(),
                Err(AcceptError::Store(e @ InboxError::TooLarge(_))) => e.to_string(),
                // No answer: the producer's client times out and retries with the same
                // Nats-Msg-Id, which the inbox deduplicates.
                Err(AcceptError::Store(e)) => {
                    tracing::warn!(error = %e, "native notify not sent");
                    continue;
                }
            };
            if rejects.send(Rejection { msg, reason }).await.is_err() {
                break;
            }
        }
        drop(rejects);
        let _ = recorder.await;
        if let Err(e) = nats.publish.flush().await {
            tracing::warn!(error = %e, "could not flush the last native appends");
        }
    }
}

/// A native message that failed validation, to record and answer.
struct Rejection {
    msg: async_nats::Message,
    reason: String,
}

/// Herald's answer to a rejected message: shaped like a PubAck (a JetStream client reads
/// it as one), from the REJECTED stream, with the reason.
#[derive(serde::Serialize)]
struct Answer<'a> {
    stream: &'a str,
    seq: u64,
    duplicate: bool,
    rejected: &'a str,
}

async fn record_all(
    rx: mpsc::Receiver<Rejection>,
    nats: herald_store::Nats,
    rejected: String,
    own_prefix: String,
) {
    let (nats, rejected, own_prefix) = (&nats, rejected.as_str(), own_prefix.as_str());
    ReceiverStream::new(rx)
        .map(|Rejection { msg, reason }| async move {
            let reply = msg.reply.clone().filter(|r| safe_reply(r, own_prefix));
            let Some(seq) =
                reject(nats, rejected, &msg.payload, msg.headers.as_ref(), &reason).await
            else {
                return;
            };
            let answer = serde_json::to_vec(&Answer {
                stream: REJECTED,
                seq,
                duplicate: false,
                rejected: &reason,
            });
            if let (Some(reply), Ok(answer)) = (reply, answer) {
                let _ = nats.publish.publish(reply, answer.into()).await;
            }
        })
        .buffer_unordered(REJECTS_IN_FLIGHT)
        .for_each(|()| async {})
        .await;
}

/// Records a rejected message with its reason; returns its REJECTED stream sequence.
async fn reject(
    nats: &herald_store::Nats,
    subject: &str,
    payload: &[u8],
    original: Option<&HeaderMap>,
    reason: &str,
) -> Option<u64> {
    metrics::counter!("herald_notify_rejected_total", "path" => "nats").increment(1);
    tracing::info!(reason, "native notify rejected");
    let mut headers = HeaderMap::new();
    headers.insert("Herald-Reason", sanitize(reason));
    if let Some(id) = original.and_then(|h| h.get("Nats-Msg-Id")) {
        headers.insert("Herald-Msg-Id", sanitize(id.as_str()));
    }
    // Keep enough to diagnose; the stream must accept the record whatever was sent.
    let kept = &payload[..payload.len().min(REJECTED_KEEP)];
    if kept.len() < payload.len() {
        headers.insert("Herald-Truncated", payload.len().to_string());
    }
    let publish = PublishMessage::build()
        .payload(kept.to_vec().into())
        .headers(headers)
        .expected_stream(REJECTED);
    let ack = nats
        .js
        .send_publish(subject.to_string(), publish)
        .await
        .ok()?
        .await
        .ok()?;
    Some(ack.sequence)
}

/// Whether Herald may publish its answer to `reply`. The reply subject is the caller's
/// choice and Herald publishes with its own permissions, so answers never go to system
/// subjects (`$JS.`, `$KV.`, `$SYS.`, …) or Herald's own: a producer must not be able to
/// make Herald write into a stream, a bucket or another user's inbox.
fn safe_reply(reply: &str, own_prefix: &str) -> bool {
    let safe = !reply.starts_with('$') && !reply.starts_with(own_prefix);
    if !safe {
        tracing::warn!(
            reply,
            "refusing to answer a native notify on a protected subject"
        );
    }
    safe
}

/// Header values must not carry CR/LF.
fn sanitize(value: &str) -> String {
    value
        .chars()
        .map(|c| if c.is_control() { ' ' } else { c })
        .take(512)
        .collect()
}
