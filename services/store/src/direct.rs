//! Batched direct gets (`$JS.API.DIRECT.GET.<stream>` with `batch`, NATS 2.11+).
//!
//! async-nats 0.51 has no helper for batches, so this sends the raw request and reads the
//! replies until the server's end-of-batch status. Direct gets read from any replica and
//! need no consumer: the right tool for paging one user's subject out of a big stream.

use async_nats::{HeaderMap, StatusCode};
use bytes::Bytes;
use futures::StreamExt as _;
use serde::Serialize;
use std::time::Duration;

/// One stored message returned by a direct get.
#[derive(Debug, Clone)]
pub struct DirectMessage {
    /// Stream sequence.
    pub seq: u64,
    /// Messages after this one that match the request (from `Nats-Num-Pending`).
    pub pending: Option<u64>,
    /// Stored headers.
    pub headers: HeaderMap,
    /// Stored payload.
    pub payload: Bytes,
}

/// Why a direct get failed.
#[derive(Debug, thiserror::Error)]
pub enum DirectGetError {
    /// Sending the request failed (NATS unreachable).
    #[error("direct get request failed")]
    Request(#[source] Box<dyn std::error::Error + Send + Sync>),
    /// No complete answer in time.
    #[error("direct get timed out")]
    Timeout,
    /// The server answered with an error status.
    #[error("direct get failed with status {0}: {1}")]
    Status(u16, String),
    /// A reply lacked its sequence header.
    #[error("direct get reply without a Nats-Sequence header")]
    Malformed,
}

#[derive(Serialize, Default)]
struct Request<'a> {
    #[serde(skip_serializing_if = "Option::is_none")]
    seq: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    next_by_subj: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    last_by_subj: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    batch: Option<usize>,
    #[serde(skip_serializing_if = "Option::is_none")]
    multi_last: Option<&'a [&'a str]>,
    #[serde(skip_serializing_if = "Option::is_none")]
    up_to_seq: Option<u64>,
    /// The payload alone: the server builds no headers for the reply (NATS 2.11+; an older
    /// server ignores it and sends them anyway).
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    no_hdr: bool,
}

const TIMEOUT: Duration = Duration::from_secs(3);

/// Up to `batch` messages of `subject` with sequence ≥ `from`, in order.
///
/// Give a literal subject where there is a choice: the server finds a literal subject's
/// next message from its per-subject index, but a wildcard's by scanning every later
/// message of the stream until the batch is full or the stream ends (see
/// `Subjects::inbox_lanes`).
///
/// # Errors
/// [`DirectGetError`] when NATS is unreachable or answers with an error.
pub async fn next_batch(
    client: &async_nats::Client,
    stream: &str,
    subject: &str,
    from: u64,
    batch: usize,
) -> Result<Vec<DirectMessage>, DirectGetError> {
    let req = Request {
        seq: Some(from.max(1)),
        next_by_subj: Some(subject),
        batch: Some(batch.max(1)),
        ..Request::default()
    };
    request(client, stream, &req).await
}

/// The first message of `subject` with sequence ≥ `from`, if any. Not batched, so the
/// server counts no pending messages for it (a batch does, over every subject the filter
/// matches).
///
/// # Errors
/// [`DirectGetError`] when NATS is unreachable or answers with an error.
pub async fn next(
    client: &async_nats::Client,
    stream: &str,
    subject: &str,
    from: u64,
) -> Result<Option<DirectMessage>, DirectGetError> {
    let req = Request {
        seq: Some(from.max(1)),
        next_by_subj: Some(subject),
        ..Request::default()
    };
    Ok(request(client, stream, &req).await?.pop())
}

/// The payload of the message at `seq`, or `None` when the stream has none there, without
/// its headers: the server builds none and the client parses none, which is what makes
/// this cheaper than a full direct get for a reader that needs only the body. One request
/// on the client's shared reply subscription (no subscription of its own).
///
/// # Errors
/// [`DirectGetError`] when NATS is unreachable or answers with an error.
pub async fn payload_at(
    client: &async_nats::Client,
    stream: &str,
    seq: u64,
) -> Result<Option<Bytes>, DirectGetError> {
    let req = Request {
        seq: Some(seq),
        no_hdr: true,
        ..Request::default()
    };
    let msg = ask(client, stream, &req).await?;
    match msg.status {
        None | Some(StatusCode::OK) => Ok(Some(msg.payload)),
        Some(StatusCode::NOT_FOUND) => Ok(None),
        Some(status) => Err(DirectGetError::Status(
            status.as_u16(),
            msg.description.unwrap_or_default(),
        )),
    }
}

/// The newest message of `subject` (which may hold wildcards: the newest of every subject
/// it matches), at or below `up_to` when given.
///
/// # Errors
/// [`DirectGetError`] when NATS is unreachable or answers with an error.
pub async fn last(
    client: &async_nats::Client,
    stream: &str,
    subject: &str,
    up_to: Option<u64>,
) -> Result<Option<DirectMessage>, DirectGetError> {
    let req = match up_to {
        None => Request {
            last_by_subj: Some(subject),
            ..Request::default()
        },
        // `last_by_subj` cannot be bounded; `multi_last` with one filter can. It answers
        // the newest message of each subject the filter matches: the newest of those wins.
        Some(up_to) => Request {
            multi_last: Some(std::slice::from_ref(&subject)),
            up_to_seq: Some(up_to),
            ..Request::default()
        },
    };
    Ok(request(client, stream, &req)
        .await?
        .into_iter()
        .max_by_key(|m| m.seq))
}

/// The newest message of each of `subjects` (at most a few hundred per call), in one
/// round trip. Subjects with no message are absent from the answer; each message's
/// subject is in its `Nats-Subject` header.
///
/// # Errors
/// [`DirectGetError`] when NATS is unreachable or answers with an error.
pub async fn last_of_many(
    client: &async_nats::Client,
    stream: &str,
    subjects: &[&str],
) -> Result<Vec<DirectMessage>, DirectGetError> {
    if subjects.is_empty() {
        return Ok(Vec::new());
    }
    let req = Request {
        multi_last: Some(subjects),
        ..Request::default()
    };
    request(client, stream, &req).await
}

/// Subjects per `multi_last` request made by [`kv_live_many`].
const KV_CHUNK: usize = 256;

/// The current value of each of `keys` in KV bucket `bucket` that has one (deleted and
/// purged keys are absent), as `(key, value)`, in batched direct gets of the bucket's
/// literal subjects — one round trip per 256 keys instead of one per key.
///
/// # Errors
/// [`DirectGetError`] when NATS is unreachable or answers with an error.
pub async fn kv_live_many(
    client: &async_nats::Client,
    bucket: &str,
    keys: &[String],
) -> Result<Vec<(String, Bytes)>, DirectGetError> {
    let prefix = format!("$KV.{bucket}.");
    let subjects: Vec<String> = keys.iter().map(|k| format!("{prefix}{k}")).collect();
    let mut out = Vec::new();
    for chunk in subjects.chunks(KV_CHUNK) {
        let refs: Vec<&str> = chunk.iter().map(String::as_str).collect();
        for msg in last_of_many(client, &format!("KV_{bucket}"), &refs).await? {
            let live = kv_live(&msg.headers);
            let key = msg
                .headers
                .get("Nats-Subject")
                .and_then(|s| s.as_str().strip_prefix(&prefix).map(str::to_owned));
            if let (true, Some(key)) = (live, key) {
                out.push((key, msg.payload));
            }
        }
    }
    Ok(out)
}

async fn request(
    client: &async_nats::Client,
    stream: &str,
    req: &Request<'_>,
) -> Result<Vec<DirectMessage>, DirectGetError> {
    if req.batch.is_none() && req.multi_last.is_none() {
        return Ok(reply(ask(client, stream, req).await?)?
            .into_iter()
            .collect());
    }
    let body = serde_json::to_vec(req).map_err(|e| DirectGetError::Request(Box::new(e)))?;
    let inbox = client.new_inbox();
    let mut replies = client
        .subscribe(inbox.clone())
        .await
        .map_err(|e| DirectGetError::Request(Box::new(e)))?;
    client
        .publish_with_reply(format!("$JS.API.DIRECT.GET.{stream}"), inbox, body.into())
        .await
        .map_err(|e| DirectGetError::Request(Box::new(e)))?;
    let mut out = Vec::new();
    let deadline = tokio::time::Instant::now() + TIMEOUT;
    loop {
        let msg = tokio::time::timeout_at(deadline, replies.next())
            .await
            .map_err(|_| DirectGetError::Timeout)?
            .ok_or(DirectGetError::Timeout)?;
        match reply(msg)? {
            Some(m) => out.push(m),
            None => break,
        }
    }
    let _ = replies.unsubscribe().await;
    Ok(out)
}

/// A direct get with one answer, as a request on the client's shared reply subscription
/// (no subscription of its own: no SUB and UNSUB, no channel per request).
async fn ask(
    client: &async_nats::Client,
    stream: &str,
    req: &Request<'_>,
) -> Result<async_nats::Message, DirectGetError> {
    let body = serde_json::to_vec(req).map_err(|e| DirectGetError::Request(Box::new(e)))?;
    let request = client.request(format!("$JS.API.DIRECT.GET.{stream}"), body.into());
    tokio::time::timeout(TIMEOUT, request)
        .await
        .map_err(|_| DirectGetError::Timeout)?
        .map_err(|e| DirectGetError::Request(Box::new(e)))
}

/// One reply of a direct get: a stored message, or `None` at the end of a batch or when
/// nothing matched.
fn reply(msg: async_nats::Message) -> Result<Option<DirectMessage>, DirectGetError> {
    match msg.status {
        None | Some(StatusCode::OK) => {}
        Some(status) if status.as_u16() == 204 || status == StatusCode::NOT_FOUND => {
            return Ok(None);
        }
        Some(status) => {
            return Err(DirectGetError::Status(
                status.as_u16(),
                msg.description.unwrap_or_default(),
            ));
        }
    }
    let headers = msg.headers.unwrap_or_default();
    let seq = header_u64(&headers, "Nats-Sequence").ok_or(DirectGetError::Malformed)?;
    let pending = header_u64(&headers, "Nats-Num-Pending");
    Ok(Some(DirectMessage {
        seq,
        pending,
        headers,
        payload: msg.payload,
    }))
}

/// Whether a stored KV message holds a value: a put, not a delete or purge marker (whose
/// `KV-Operation` header says so).
pub(crate) fn kv_live(headers: &HeaderMap) -> bool {
    headers
        .get("KV-Operation")
        .is_none_or(|op| op.as_str() == "PUT")
}

/// A numeric header, if present and numeric.
pub fn header_u64(headers: &HeaderMap, name: &str) -> Option<u64> {
    headers.get(name)?.as_str().parse().ok()
}
