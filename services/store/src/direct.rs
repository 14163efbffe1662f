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

/// The newest message of each of `subjects` at or below `up_to` (every message when
/// `None`), in one round trip: [`last_of_many`] as of a sequence.
///
/// # Errors
/// [`DirectGetError`] when NATS is unreachable or answers with an error.
pub async fn last_of_many_up_to(
    client: &async_nats::Client,
    stream: &str,
    subjects: &[&str],
    up_to: Option<u64>,
) -> Result<Vec<DirectMessage>, DirectGetError> {
    if subjects.is_empty() {
        return Ok(Vec::new());
    }
    let req = Request {
        multi_last: Some(subjects),
        up_to_seq: up_to,
        ..Request::default()
    };
    request(client, stream, &req).await
}

/// Requests [`newest`] makes to find where its last batch starts, before it walks back
/// one message at a time.
const NEWEST_PROBES: usize = 12;

/// Messages beyond twice what it still needs that [`newest`] reads rather than probe
/// again.
const READ_WHOLE_SLACK: u64 = 64;

/// Up to `limit` of the newest messages of literal `subject` with `floor < seq <= top`,
/// newest first, and whether more exist below them. `top` is a message of the subject
/// (its newest in the range, from [`last_of_many_up_to`]); `at_head` says it was its
/// newest of all when read, so nothing after it needs counting.
///
/// JetStream reads forward only. Walking back one direct get per message cost `limit`+1
/// round trips; instead this finds where a forward batch must start. The number of
/// messages of the subject from a sequence on is what a batch's first reply says
/// (`Nats-Num-Pending` + 1), so an interpolation search on that count, seeded by the
/// first batch of the range, lands on a start from which one batch holds the newest
/// `limit`: 1 to 4 requests for a page, whatever its size. Which messages are taken is
/// decided by what the batches return, never by the counts alone: a count off under
/// concurrent writes costs a request more, not a message.
///
/// # Errors
/// [`DirectGetError`] when NATS is unreachable or answers with an error.
pub async fn newest(
    client: &async_nats::Client,
    stream: &str,
    subject: &str,
    floor: u64,
    top: u64,
    at_head: bool,
    limit: usize,
) -> Result<(Vec<DirectMessage>, bool), DirectGetError> {
    let limit = limit.max(1);
    if top <= floor {
        return Ok((Vec::new(), false));
    }
    let reader = Reader {
        client,
        stream,
        subject,
    };
    // The oldest `limit` of the range: the whole of it when they reach `top`.
    let start = floor.saturating_add(1);
    let (first, all_from_start) = reader.probe(start, limit).await?;
    if covers(&first, top) {
        return Ok((newest_of(first, top, limit), false));
    }
    let above = match at_head {
        true => 0,
        false => reader.probe(top.saturating_add(1), 1).await?.1,
    };
    let in_range = all_from_start.saturating_sub(above);
    let mut search = Search {
        lo: start,
        count_lo: all_from_start,
        hi: top,
        count_above_hi: above,
        density: None,
    };
    // What was read from `lo` on, oldest first: not read again.
    let mut read_from_lo = first;
    let mut found = Vec::new();
    let mut want = limit;
    for probe in 0..NEWEST_PROBES {
        let n = search.count_lo.saturating_sub(search.count_above_hi);
        // Few enough to read whole: a few dozen more messages in one batch cost less
        // than another round trip. (Or a bracket of one sequence with more to take:
        // counts taken apart disagree.)
        if n <= 2 * want as u64 + READ_WHOLE_SLACK || search.hi <= search.lo {
            let mut all = read_from_lo;
            if !covers(&all, search.hi) {
                let from = all.last().map_or(search.lo, |m| m.seq.saturating_add(1));
                let rest = n.saturating_sub(all.len() as u64);
                all.extend(reader.through(from, search.hi, rest).await?);
            }
            let taken = newest_of(all, search.hi, want);
            want -= taken.len();
            found.extend(taken);
            // Everything of [lo, hi] was read: what is left is below `lo`.
            search.hi = search.lo.saturating_sub(1);
            break;
        }
        let at = search.start_for(n, want, probe);
        // One more than needed: seeing past `hi` is what says the batch holds all of it.
        let (batch, count_at) = reader.probe(at, want + 1).await?;
        let newer = count_at.saturating_sub(search.count_above_hi);
        search.measured(at, newer);
        if newer <= want as u64 {
            // [at, hi] fits in one batch: take all of it, reading on when the probe
            // stopped short of `hi`.
            let mut all = batch;
            if !covers(&all, search.hi)
                && let Some(from) = all.last().map(|m| m.seq.saturating_add(1))
            {
                all.extend(reader.through(from, search.hi, newer).await?);
            }
            let taken = newest_of(all, search.hi, want);
            want -= taken.len();
            found.extend(taken);
            search.hi = at - 1;
            search.count_above_hi = count_at;
            if want == 0 {
                break;
            }
        } else {
            search.lo = at;
            search.count_lo = count_at;
            read_from_lo = batch;
        }
    }
    if want > 0 && search.hi > floor {
        // The search did not settle (a subject written to without pause), or counts
        // read apart disagreed: the rest the slow way.
        found.extend(walk_back(client, stream, subject, floor, search.hi, want).await?);
    }
    let more = in_range > found.len() as u64;
    Ok((found, more))
}

/// Where [`newest`] reads from.
struct Reader<'a> {
    client: &'a async_nats::Client,
    stream: &'a str,
    subject: &'a str,
}

impl Reader<'_> {
    /// Up to `batch` messages from `from` on, and how many the subject has from `from`
    /// on (all of them, not only the batch's).
    async fn probe(
        &self,
        from: u64,
        batch: usize,
    ) -> Result<(Vec<DirectMessage>, u64), DirectGetError> {
        let msgs = next_batch(self.client, self.stream, self.subject, from, batch).await?;
        let count = msgs.first().map_or(0, |m| 1 + m.pending.unwrap_or(0));
        Ok((msgs, count))
    }

    /// Every message with `from <= seq <= hi`, `expect` of them by the counts: in
    /// batches of one more, so that the first normally sees past `hi` and is the last.
    async fn through(
        &self,
        mut from: u64,
        hi: u64,
        expect: u64,
    ) -> Result<Vec<DirectMessage>, DirectGetError> {
        let batch = usize::try_from(expect.saturating_add(1).min(1024)).unwrap_or(1024);
        let mut out = Vec::new();
        while from <= hi {
            let msgs = next_batch(self.client, self.stream, self.subject, from, batch).await?;
            let done = covers(&msgs, hi);
            from = msgs.last().map_or(u64::MAX, |m| m.seq.saturating_add(1));
            out.extend(msgs.into_iter().take_while(|m| m.seq <= hi));
            if done {
                break;
            }
        }
        Ok(out)
    }
}

/// The bracket [`newest`] searches: `[lo, hi]` holds the start it looks for; how many
/// messages the subject has from `lo` on, and after `hi`; and, once a probe measured it,
/// how densely the subject's messages lie just below `hi` (a user's messages are not
/// spread evenly over the stream: the bracket's average misleads).
struct Search {
    lo: u64,
    count_lo: u64,
    hi: u64,
    count_above_hi: u64,
    /// Messages of the subject per stream sequence near `hi`.
    density: Option<f64>,
}

impl Search {
    /// A start in `(lo, hi]` from which about 1.5 × `want` messages lie up to `hi`, so
    /// the next step reads them whole: by the density measured near `hi`, or the
    /// bracket's average (`n` messages) before any; halving the bracket once a few
    /// probes did not settle.
    fn start_for(&self, n: u64, want: usize, probe: usize) -> u64 {
        let target = (want as f64 * 1.5).max(1.0);
        let span = self.hi - self.lo;
        let density = self.density.unwrap_or(n as f64 / (span as f64 + 1.0));
        let distance = if probe < 6 && density > 0.0 {
            (target / density).ceil().min(span as f64) as u64
        } else {
            span / 2
        };
        self.hi.saturating_sub(distance).clamp(self.lo + 1, self.hi)
    }

    /// A probe found `newer` messages in `[at, hi]`.
    fn measured(&mut self, at: u64, newer: u64) {
        let span = self.hi.saturating_sub(at) + 1;
        self.density = Some(newer.max(1) as f64 / span as f64);
    }
}

/// Whether a forward batch read everything up to `hi`: it reached it (or passed it), or
/// nothing of the subject follows its last message.
fn covers(msgs: &[DirectMessage], hi: u64) -> bool {
    match msgs.last() {
        None => true,
        Some(last) => last.seq >= hi || last.pending == Some(0),
    }
}

/// The newest `limit` of `msgs` (oldest first) at or below `hi`, newest first.
fn newest_of(msgs: Vec<DirectMessage>, hi: u64, limit: usize) -> Vec<DirectMessage> {
    let mut kept: Vec<DirectMessage> = msgs.into_iter().filter(|m| m.seq <= hi).collect();
    kept.reverse();
    kept.truncate(limit);
    kept
}

/// Up to `limit` messages of `subject` with `floor < seq <= top`, newest first, one
/// direct get each.
async fn walk_back(
    client: &async_nats::Client,
    stream: &str,
    subject: &str,
    floor: u64,
    top: u64,
    limit: usize,
) -> Result<Vec<DirectMessage>, DirectGetError> {
    let mut out = Vec::new();
    let mut bound = top;
    while out.len() < limit && bound > floor {
        let Some(msg) = last(client, stream, subject, Some(bound)).await? else {
            break;
        };
        if msg.seq <= floor {
            break;
        }
        bound = msg.seq.saturating_sub(1);
        out.push(msg);
    }
    Ok(out)
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
