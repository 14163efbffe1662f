//! The native path: a responder on `herald.notify` (queue group `herald-ingest`).
//!
//! A producer publishes a notify body with a JetStream client (`js.publish`), using
//! `Nats-Msg-Id` as its idempotency key. Herald validates it, appends it to the user's
//! inbox and answers with that append's JetStream ack (plus the notification `id`), so the
//! producer's client sees an ordinary PubAck and the notification costs one durable write.
//! A body that fails validation is written to the REJECTED stream with its reason and
//! answered with *that* ack: acknowledged, recorded for operators, never redelivered.
//! With no Herald running the producer gets "no responders" — never a false ack.

use crate::accept::{AcceptError, Acceptor};
use async_nats::HeaderMap;
use async_nats::jetstream::context::PublishAckFuture;
use async_nats::jetstream::message::PublishMessage;
use futures::StreamExt as _;
use herald_protocol::streams::REJECTED;
use std::future::Future;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;

/// Queue group shared by every ingest responder.
pub const QUEUE_GROUP: &str = "herald-ingest";
/// Producer name native idempotency keys are namespaced under.
pub const NATIVE_PRODUCER: &str = "nats";
/// Bytes of a rejected body kept in the REJECTED stream.
const REJECTED_KEEP: usize = 64 * 1024;
/// Appends awaiting their ack at once, per process.
const IN_FLIGHT: usize = 8192;

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
    /// Serves until `shutdown` resolves, then drains in-flight appends.
    pub async fn run(self, shutdown: impl Future<Output = ()>) {
        let Listening { acceptor, mut sub } = self;
        let nats = acceptor.inbox().nats().clone();
        // Appends are sent here in arrival order (keeping a producer's order per user); one
        // task awaits their acks concurrently and answers, so no task is spawned per message.
        let (tx, rx) = mpsc::channel::<Pending>(IN_FLIGHT);
        let answerer = tokio::spawn(answer_all(
            rx,
            nats.clone(),
            acceptor.inbox().subjects().rejected(),
            format!("{}.", acceptor.inbox().subjects().prefix()),
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
            let outcome = match acceptor
                .prepare(&msg.payload, NATIVE_PRODUCER, key.as_deref())
                .await
            {
                Ok(prepared) => match acceptor.send(&prepared).await {
                    Ok(ack) => Ok((prepared, ack)),
                    Err(e) => Err(e),
                },
                Err(e) => Err(e),
            };
            if tx.send(Pending { msg, outcome }).await.is_err() {
                break;
            }
        }
        // Drain: every append sent gets its answer before we return.
        drop(tx);
        let _ = answerer.await;
    }
}

/// A native message whose append was sent (or refused) and still needs its answer.
struct Pending {
    msg: async_nats::Message,
    outcome: Result<(crate::accept::Prepared, PublishAckFuture), AcceptError>,
}

/// The PubAck-shaped answer to a producer.
#[derive(serde::Serialize)]
struct Answer<'a> {
    stream: &'a str,
    seq: u64,
    duplicate: bool,
    #[serde(skip_serializing_if = "Option::is_none")]
    id: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    rejected: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    send_at: Option<&'a str>,
}

async fn answer_all(
    rx: mpsc::Receiver<Pending>,
    nats: herald_store::Nats,
    rejected: String,
    own_prefix: String,
) {
    let own_prefix = own_prefix.as_str();
    let accepted = metrics::counter!("herald_notify_accepted_total", "path" => "nats");
    let (nats, rejected, accepted) = (&nats, rejected.as_str(), &accepted);
    ReceiverStream::new(rx)
        .map(|p| async move {
            let reply = p.msg.reply.clone().filter(|r| safe_reply(r, own_prefix));
            let answer = answer(nats, rejected, accepted, p).await;
            if let (Some(reply), Some(answer)) = (reply, answer) {
                let _ = nats.publish.publish(reply, answer.into()).await;
            }
        })
        .buffer_unordered(IN_FLIGHT)
        .for_each(|()| async {})
        .await;
}

async fn answer(
    nats: &herald_store::Nats,
    rejected: &str,
    accepted: &metrics::Counter,
    pending: Pending,
) -> Option<Vec<u8>> {
    match pending.outcome {
        Ok((prepared, ack)) => match Acceptor::finish(prepared, ack).await {
            Ok(a) => {
                accepted.increment(1);
                serde_json::to_vec(&Answer {
                    stream: herald_protocol::streams::INBOX,
                    seq: a.stream_seq,
                    duplicate: a.duplicate,
                    id: Some(&a.id),
                    rejected: None,
                    send_at: a.send_at.as_deref(),
                })
                .ok()
            }
            // No answer: the producer's client times out and retries with the same
            // Nats-Msg-Id, which the inbox deduplicates.
            Err(e) => {
                tracing::warn!(error = %e, "native notify not acked");
                None
            }
        },
        Err(AcceptError::Invalid(e)) => {
            let reason = e.to_string();
            let msg = &pending.msg;
            let seq = reject(nats, rejected, &msg.payload, msg.headers.as_ref(), &reason).await?;
            serde_json::to_vec(&Answer {
                stream: REJECTED,
                seq,
                duplicate: false,
                id: None,
                rejected: Some(&reason),
                send_at: None,
            })
            .ok()
        }
        Err(AcceptError::Store(e)) => {
            tracing::warn!(error = %e, "native notify not sent");
            None
        }
    }
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
