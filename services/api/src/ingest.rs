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
use async_nats::jetstream::message::PublishMessage;
use futures::StreamExt as _;
use herald_protocol::streams::REJECTED;
use serde_json::json;
use std::future::Future;
use std::sync::Arc;
use tokio::sync::Semaphore;

/// Queue group shared by every ingest responder.
pub const QUEUE_GROUP: &str = "herald-ingest";
/// Producer name native idempotency keys are namespaced under.
pub const NATIVE_PRODUCER: &str = "nats";
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
    let nats = acceptor.inbox().nats().clone();
    let subject = acceptor.inbox().subjects().notify();
    let rejected_subject = acceptor.inbox().subjects().rejected();
    let mut sub = nats
        .consume
        .queue_subscribe(subject.clone(), QUEUE_GROUP.into())
        .await?;
    tracing::info!(%subject, "native ingest listening");
    let permits = Arc::new(Semaphore::new(IN_FLIGHT));
    tokio::pin!(shutdown);
    loop {
        let msg = tokio::select! {
            _ = &mut shutdown => break,
            msg = sub.next() => match msg { Some(m) => m, None => break },
        };
        let Ok(permit) = permits.clone().acquire_owned().await else {
            break;
        };
        // Send in arrival order (keeps a producer's order per user), await acks concurrently.
        let key = msg
            .headers
            .as_ref()
            .and_then(|h| h.get("Nats-Msg-Id"))
            .map(|v| v.as_str().to_string());
        let reply = msg.reply.clone();
        let outcome = match acceptor.prepare(&msg.payload, NATIVE_PRODUCER, key.as_deref()) {
            Ok(prepared) => match acceptor.send(&prepared).await {
                Ok(ack) => Ok((prepared, ack)),
                Err(e) => Err(e),
            },
            Err(e) => Err(AcceptError::Invalid(e)),
        };
        let nats = nats.clone();
        let rejected_subject = rejected_subject.clone();
        tokio::spawn(async move {
            let answer = match outcome {
                Ok((prepared, ack)) => match Acceptor::finish(prepared, ack).await {
                    Ok(a) => {
                        metrics::counter!("herald_notify_accepted_total", "path" => "nats")
                            .increment(1);
                        Some(
                            json!({"stream": herald_protocol::streams::INBOX, "seq": a.seq,
                                    "duplicate": a.duplicate, "id": a.id}),
                        )
                    }
                    // No answer: the producer's client times out and retries with the
                    // same Nats-Msg-Id, which the inbox deduplicates.
                    Err(e) => {
                        tracing::warn!(error = %e, "native notify not acked");
                        None
                    }
                },
                Err(AcceptError::Invalid(e)) => {
                    reject(
                        &nats,
                        &rejected_subject,
                        &msg.payload,
                        msg.headers.as_ref(),
                        &e.to_string(),
                    )
                    .await
                }
                Err(AcceptError::Store(e)) => {
                    tracing::warn!(error = %e, "native notify not sent");
                    None
                }
            };
            if let (Some(reply), Some(answer)) = (reply, answer) {
                let _ = nats.publish.publish(reply, answer.to_string().into()).await;
            }
            drop(permit);
        });
    }
    // Drain: wait until every spawned append has answered.
    let _ = permits.acquire_many(IN_FLIGHT as u32).await;
    Ok(())
}

/// Records a rejected message with its reason; returns the ack to answer with.
async fn reject(
    nats: &herald_store::Nats,
    subject: &str,
    payload: &[u8],
    original: Option<&HeaderMap>,
    reason: &str,
) -> Option<serde_json::Value> {
    metrics::counter!("herald_notify_rejected_total", "path" => "nats").increment(1);
    tracing::info!(reason, "native notify rejected");
    let mut headers = HeaderMap::new();
    headers.insert("Herald-Reason", sanitize(reason));
    if let Some(id) = original.and_then(|h| h.get("Nats-Msg-Id")) {
        headers.insert("Herald-Msg-Id", sanitize(id.as_str()));
    }
    let publish = PublishMessage::build()
        .payload(payload.to_vec().into())
        .headers(headers)
        .expected_stream(REJECTED);
    let ack = nats
        .js
        .send_publish(subject.to_string(), publish)
        .await
        .ok()?
        .await
        .ok()?;
    Some(
        json!({"stream": REJECTED, "seq": ack.sequence, "duplicate": false,
                "rejected": reason}),
    )
}

/// Header values must not carry CR/LF.
fn sanitize(value: &str) -> String {
    value
        .chars()
        .map(|c| if c.is_control() { ' ' } else { c })
        .take(512)
        .collect()
}
