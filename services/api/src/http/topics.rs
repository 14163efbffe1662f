//! Topics: producers (un)subscribe users and publish; users manage their own
//! subscriptions where the topic allows it. A publish is fanned out by the fan-out
//! workers; its progress is readable while it runs.
//!
//! A publish is written in this order, each step deduplicated so that a retry repeats it
//! harmlessly: the record of its idempotency key (its id, path and first answer), its
//! progress record (`queued`, with its topic), its FANOUT job, and — on the big-topic path
//! — the one stored copy. The job is the point of no return: once it is durable the
//! publish happens in full (the worker stores the copy itself if this request did not).

use super::ApiState;
use crate::auth::{Producer, User};
use crate::error::AppError;
use crate::http::notify::read_body;
use axum::Json;
use axum::body::Body;
use axum::extract::{Path, State};
use axum::http::{HeaderMap, StatusCode};
use herald_auth::Scope;
use herald_protocol::{FanoutJob, FieldError, TopicId, UserId};
use herald_store::TopicsError;
use herald_store::topics::{FanoutRun, PATH_TOPIC, PublishRecord, QUEUED};
use serde_json::{Value, json};
use std::sync::Arc;

/// Most users in one bulk subscribe.
const BULK_MAX: usize = 10_000;

/// Default [`TopicSettings::big_threshold`].
pub const DEFAULT_BIG_THRESHOLD: u64 = 10_000;

/// Topic rules: which topics users may join by themselves (exact names, or prefixes
/// ending in `*`), and from what size a topic's publishes are stored once.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TopicSettings {
    /// Patterns of self-subscribable topics.
    pub self_subscribe: Vec<String>,
    /// A publish to a topic with at least this many subscribers takes the big-topic path:
    /// stored once and merged into each subscriber's view, instead of one inbox entry per
    /// subscriber. 0 sends every publish the big-topic way.
    pub big_threshold: u64,
}

impl Default for TopicSettings {
    fn default() -> Self {
        Self {
            self_subscribe: Vec::new(),
            big_threshold: DEFAULT_BIG_THRESHOLD,
        }
    }
}

impl TopicSettings {
    /// Whether users may join `topic` themselves.
    pub fn allows_self(&self, topic: &TopicId) -> bool {
        self.self_subscribe
            .iter()
            .any(|p| match p.strip_suffix('*') {
                Some(prefix) => topic.as_str().starts_with(prefix),
                None => p == topic.as_str(),
            })
    }
}

fn topic(raw: String) -> Result<TopicId, AppError> {
    TopicId::new(raw).map_err(|e| AppError::field(FieldError::new("topic", e.to_string())))
}

fn user(raw: String) -> Result<UserId, AppError> {
    UserId::new(raw).map_err(|e| AppError::field(FieldError::new("user_id", e.to_string())))
}

/// 409 for what the caller can fix or repeat, 503 when NATS failed.
fn topics_error(e: TopicsError) -> AppError {
    match e {
        TopicsError::TooMany(_) => {
            AppError::new(StatusCode::CONFLICT, "too_many_topics", e.to_string())
        }
        TopicsError::Contended(_) => {
            AppError::new(StatusCode::CONFLICT, "conflict", e.to_string()).retry_after(1)
        }
        TopicsError::Unavailable(_) | TopicsError::Read(_) => AppError::unavailable(&e),
    }
}

pub(super) async fn subscribe(
    State(state): State<Arc<ApiState>>,
    producer: Producer,
    Path((t, u)): Path<(String, String)>,
) -> Result<Json<Value>, AppError> {
    producer.require(Scope::Publish)?;
    let (t, u) = (topic(t)?, user(u)?);
    state
        .subscriptions
        .subscribe(&t, std::slice::from_ref(&u), &producer.0.producer)
        .await
        .map_err(topics_error)?;
    Ok(Json(json!({"topic": t, "user_id": u, "subscribed": true})))
}

pub(super) async fn unsubscribe(
    State(state): State<Arc<ApiState>>,
    producer: Producer,
    Path((t, u)): Path<(String, String)>,
) -> Result<Json<Value>, AppError> {
    producer.require(Scope::Publish)?;
    let (t, u) = (topic(t)?, user(u)?);
    let was = state
        .subscriptions
        .unsubscribe(&t, &u)
        .await
        .map_err(topics_error)?;
    Ok(Json(
        json!({"topic": t, "user_id": u, "subscribed": false, "was_subscribed": was}),
    ))
}

pub(super) async fn subscribe_many(
    State(state): State<Arc<ApiState>>,
    producer: Producer,
    Path(t): Path<String>,
    body: Body,
) -> Result<Json<Value>, AppError> {
    producer.require(Scope::Publish)?;
    let t = topic(t)?;
    let bytes = read_body(body, 4 * 1024 * 1024).await?;
    #[derive(serde::Deserialize)]
    struct Bulk {
        user_ids: Vec<String>,
    }
    let bulk: Bulk = serde_json::from_slice(&bytes).map_err(|e| {
        AppError::field(FieldError::new(
            "user_ids",
            format!("expected {{\"user_ids\": [...]}}: {e}"),
        ))
    })?;
    if bulk.user_ids.is_empty() || bulk.user_ids.len() > BULK_MAX {
        return Err(AppError::field(FieldError::new(
            "user_ids",
            format!("must hold 1 to {BULK_MAX} user ids"),
        )));
    }
    let users = bulk
        .user_ids
        .into_iter()
        .enumerate()
        .map(|(i, u)| {
            UserId::new(u).map_err(|e| {
                AppError::field(FieldError::new(format!("user_ids[{i}]"), e.to_string()))
            })
        })
        .collect::<Result<Vec<_>, _>>()?;
    let n = state
        .subscriptions
        .subscribe(&t, &users, &producer.0.producer)
        .await
        .map_err(topics_error)?;
    Ok(Json(json!({"topic": t, "subscribed": n})))
}

pub(super) async fn describe(
    State(state): State<Arc<ApiState>>,
    producer: Producer,
    Path(t): Path<String>,
) -> Result<Json<Value>, AppError> {
    producer.require(Scope::Read)?;
    let t = topic(t)?;
    let n = state.subscriptions.count(&t).await.map_err(topics_error)?;
    Ok(Json(json!({"topic": t, "subscribers": n})))
}

pub(super) async fn publish(
    State(state): State<Arc<ApiState>>,
    producer: Producer,
    Path(t): Path<String>,
    headers: HeaderMap,
    body: Body,
) -> Result<(StatusCode, Json<Value>), AppError> {
    producer.require(Scope::Publish)?;
    state.rates.check(&producer.0.producer, 1)?;
    let t = topic(t)?;
    let bytes = read_body(body, state.config.body_limit).await?;
    let mut doc: serde_json::Map<String, Value> = serde_json::from_slice(&bytes).map_err(|e| {
        AppError::field(FieldError::new(
            "body",
            format!("expected a JSON object: {e}"),
        ))
    })?;
    for (field, why) in [
        (
            "user_id",
            "a topic publish goes to the topic's subscribers; omit user_id",
        ),
        (
            "send_at",
            "scheduled topic publishes are not supported; omit send_at",
        ),
    ] {
        if doc.contains_key(field) {
            return Err(AppError::field(FieldError::new(field, why)));
        }
    }
    // Validated like a notify to one user; each copy gets its recipient at fan-out.
    doc.insert("user_id".into(), Value::String(placeholder_recipient(&t)));
    let raw = serde_json::to_vec(&doc).map_err(|e| AppError::internal(&e))?;
    let key = super::notify::idempotency_header(&headers)?;
    let prepared = state
        .acceptor
        .prepare_topic(&raw, &producer.0.producer, key)
        .await
        .map_err(AppError::from)?;
    let mut notification = prepared.into_stored();
    // The header wins over the body's key, as on /v1/notify; both were validated above.
    let key = key.or_else(|| doc.get("idempotency_key").and_then(Value::as_str));
    let (record, retry) = match key {
        Some(key) => keyed(&state, &t, &producer.0.producer, key).await?,
        None => (new_record(&state, &t, &producer.0.producer).await?, false),
    };
    notification.id.clone_from(&record.id);
    let big = record.path == PATH_TOPIC;
    if big {
        notification.topic = Some(t.as_str().to_owned());
    }
    let job = FanoutJob {
        id: record.id.clone(),
        topic: t.clone(),
        notification,
        stored_seq: None,
    };
    // Recorded as queued, with its topic, before the job can start (kept if a retry or
    // the worker wrote it first): its progress is readable from the 202 on, on this
    // topic only.
    state
        .fanouts
        .create_run(
            &job.id,
            &FanoutRun {
                progress: herald_protocol::FanoutProgress {
                    state: QUEUED.into(),
                    total: record.subscribers,
                    path: record.path.clone(),
                    ..Default::default()
                },
                topic: Some(t.clone()),
                ..FanoutRun::default()
            },
        )
        .await
        .map_err(topics_error)?;
    // The job first: once it is durable, the publish happens in full whatever becomes of
    // this request. On the big-topic path the worker stores the publish itself when it
    // does not find it stored (this process stopped before the append below), so a
    // publish never shows in every view without its channel work following.
    state
        .fanouts
        .enqueue(state.acceptor.inbox().subjects(), &job, big)
        .await
        .map_err(|e| AppError::unavailable(&e))?;
    let seq = if big {
        Some(store_once(&state, &job, &record, retry).await?)
    } else {
        None
    };
    metrics::counter!("herald_topic_publishes_total", "path" => if big { PATH_TOPIC } else { PATH_WRITE })
        .increment(1);
    let mut answer = json!({"id": job.id, "status": "accepted", "topic": t,
        "subscribers": record.subscribers, "path": record.path});
    if let Some(seq) = seq {
        answer["seq"] = json!(seq);
    }
    Ok((StatusCode::ACCEPTED, Json(answer)))
}

pub(super) async fn progress(
    State(state): State<Arc<ApiState>>,
    producer: Producer,
    Path((t, id)): Path<(String, String)>,
) -> Result<Json<Value>, AppError> {
    producer.require(Scope::Read)?;
    let t = topic(t)?;
    // Any spelling of the UUID (braced, `urn:uuid:`, upper case) names the same publish.
    let id = match uuid::Uuid::parse_str(&id) {
        Ok(uuid) => uuid.hyphenated().to_string(),
        Err(_) => {
            return Err(AppError::field(FieldError::new(
                "id",
                "not a publish id (a UUID)",
            )));
        }
    };
    // A publish is recorded (queued) before its job is: no record, or one of another
    // topic, is no publish of this topic. A record written before topics were recorded
    // (`topic` absent) cannot be checked.
    let run = state
        .fanouts
        .run(&id)
        .await
        .map_err(topics_error)?
        .filter(|r| r.topic.as_ref().is_none_or(|of| *of == t))
        .ok_or_else(|| AppError::not_found("no publish with this id on this topic"))?;
    if run.progress.state == QUEUED {
        return Ok(Json(
            json!({"id": id, "topic": t, "fanout": {"state": QUEUED}}),
        ));
    }
    Ok(Json(json!({"id": id, "topic": t, "fanout": run.progress})))
}

#[derive(serde::Deserialize)]
struct TopicBody {
    topic: String,
}

async fn topic_body(body: Body) -> Result<TopicId, AppError> {
    let bytes = read_body(body, 4096).await?;
    let b: TopicBody = serde_json::from_slice(&bytes).map_err(|e| {
        AppError::field(FieldError::new(
            "topic",
            format!("expected {{\"topic\": \"...\"}}: {e}"),
        ))
    })?;
    topic(b.topic)
}

pub(super) async fn my_subscribe(
    State(state): State<Arc<ApiState>>,
    User(user): User,
    body: Body,
) -> Result<Json<Value>, AppError> {
    let t = topic_body(body).await?;
    if !state.topics.allows_self(&t) {
        return Err(AppError::new(
            StatusCode::FORBIDDEN,
            "not_self_subscribable",
            "this topic does not allow users to subscribe themselves",
        ));
    }
    state
        .subscriptions
        .subscribe(&t, std::slice::from_ref(&user), "self")
        .await
        .map_err(topics_error)?;
    Ok(Json(json!({"topic": t, "subscribed": true})))
}

pub(super) async fn my_unsubscribe(
    State(state): State<Arc<ApiState>>,
    User(user): User,
    body: Body,
) -> Result<Json<Value>, AppError> {
    let t = topic_body(body).await?;
    // Leaving is always allowed, whoever subscribed the user.
    let was = state
        .subscriptions
        .unsubscribe(&t, &user)
        .await
        .map_err(topics_error)?;
    Ok(Json(
        json!({"topic": t, "subscribed": false, "was_subscribed": was}),
    ))
}

pub(super) async fn my_topics(
    State(state): State<Arc<ApiState>>,
    User(user): User,
) -> Result<Json<Value>, AppError> {
    let topics = state
        .subscriptions
        .topics_of(&user)
        .await
        .map_err(topics_error)?;
    Ok(Json(json!({"topics": topics})))
}

/// The record of `producer`'s publish to `topic` with idempotency key `key`, and whether
/// it is a repeat: the record an earlier request with the key wrote within the dedup
/// window (the same id, path and answer), or else a new one, written before anything is
/// queued or stored. A retry thus never takes the other path after a first attempt that
/// stored something (which would show the publish twice). A key used again after the
/// window names a new publish, with an id of its own: nothing stored for the earlier one
/// (its progress, its copies, its INBOX entry) is taken for this one's.
///
/// # Errors
/// 409 when the key named a publish to another topic within the window; 503 when NATS
/// fails.
async fn keyed(
    state: &ApiState,
    topic: &TopicId,
    producer: &str,
    key: &str,
) -> Result<(PublishRecord, bool), AppError> {
    let key = key_id(producer, key);
    for _ in 0..3 {
        let existing = state.fanouts.record(&key).await.map_err(topics_error)?;
        if let Some((record, _)) = &existing {
            let window = state.fanouts.dedup_window().await.map_err(topics_error)?;
            let now = time::OffsetDateTime::now_utc().unix_timestamp();
            let age = u64::try_from(now.saturating_sub(record.at)).unwrap_or(0);
            if age <= window.as_secs() {
                if &record.topic != topic {
                    return Err(super::notify::key_reused(format!(
                        "this Idempotency-Key named a publish to another topic within the \
                         last {} s; use a new key",
                        window.as_secs()
                    )));
                }
                return Ok((record.clone(), true));
            }
        }
        let record = new_record(state, topic, producer).await?;
        let previous = existing.map(|(_, revision)| revision);
        if state
            .fanouts
            .put_record(&key, &record, previous)
            .await
            .map_err(topics_error)?
        {
            return Ok((record, false));
        }
        // A concurrent request with the same key recorded first: take its record.
    }
    Err(super::notify::key_contended())
}

/// A new publish to `topic`: a new id, and its path chosen from the topic's size now.
async fn new_record(
    state: &ApiState,
    topic: &TopicId,
    producer: &str,
) -> Result<PublishRecord, AppError> {
    let subscribers = state
        .subscriptions
        .count(topic)
        .await
        .map_err(topics_error)?;
    Ok(PublishRecord {
        id: uuid::Uuid::now_v7().to_string(),
        topic: topic.clone(),
        producer: producer.to_owned(),
        path: if subscribers >= state.topics.big_threshold {
            PATH_TOPIC
        } else {
            PATH_WRITE
        }
        .to_owned(),
        subscribers,
        at: time::OffsetDateTime::now_utc().unix_timestamp(),
    })
}

/// Stores a big topic's publish once and returns its INBOX sequence: deduplicated by id
/// with the fan-out worker's append (which stores it when this request does not get that
/// far) and, for a `retry`, found where an earlier attempt or the worker stored it — even
/// once INBOX no longer remembers the id.
async fn store_once(
    state: &ApiState,
    job: &FanoutJob,
    record: &PublishRecord,
    retry: bool,
) -> Result<u64, AppError> {
    let inbox = state.acceptor.inbox();
    if retry {
        let subject = inbox
            .subjects()
            .topic_inbox_entry(&job.topic, job.notification.priority);
        let since = time::OffsetDateTime::from_unix_timestamp(record.at - STORED_SINCE_S)
            .unwrap_or(time::OffsetDateTime::UNIX_EPOCH);
        if let Some(seq) =
            herald_store::topics::find_publish(inbox.nats(), &subject, &job.id, since)
                .await
                .map_err(topics_error)?
        {
            return Ok(seq);
        }
    }
    let stored = inbox
        .append_topic(&job.topic, &job.notification)
        .await
        .map_err(|e| AppError::unavailable(&e))?;
    if stored.duplicate {
        same_publish(state, job, stored.seq).await?;
    }
    Ok(stored.seq)
}

/// How long before its record a retried publish may have been stored (clocks of API hosts
/// and the INBOX stream leader a little apart).
const STORED_SINCE_S: i64 = 60;

/// The fan-out on write path's name in records and answers.
const PATH_WRITE: &str = "write";

/// Namespace of the records of idempotency keys of topic publishes.
const PUBLISH_KEYS: uuid::Uuid = uuid::Uuid::from_u128(0x9e4d_27b1_5c08_4f6a_b3e2_71d0_c8a5_1f94);

/// What `producer`'s idempotency key `key` is recorded under: in a namespace of its own,
/// so a notify with the same key is never taken for this publish or the other way round.
fn key_id(producer: &str, key: &str) -> String {
    crate::accept::key_id(PUBLISH_KEYS, producer, key, None)
}

/// Checks that what INBOX holds at `seq`, which it named as the first copy of `job`'s
/// publish, is that publish: the same id on this topic. A repeat answers the first
/// answer; anything else there is refused rather than answered as this publish.
async fn same_publish(state: &ApiState, job: &FanoutJob, seq: u64) -> Result<(), AppError> {
    #[derive(serde::Deserialize)]
    struct Stored {
        id: String,
        topic: Option<String>,
    }
    match state.acceptor.inbox().entry_at(seq).await {
        herald_store::InboxEntry::Stored(payload) => {
            match serde_json::from_slice::<Stored>(&payload) {
                Ok(s) if s.id == job.id && s.topic.as_deref() == Some(job.topic.as_str()) => Ok(()),
                _ => Err(super::notify::key_reused(
                    "this Idempotency-Key already named another notification; use a new key",
                )),
            }
        }
        // Stored once and gone since (expired): still the first answer.
        herald_store::InboxEntry::Gone => Ok(()),
        herald_store::InboxEntry::Unavailable(e) => Err(AppError::unavailable(&InboxRead(e))),
    }
}

/// An inbox read that NATS did not answer.
#[derive(Debug, thiserror::Error)]
#[error("reading the stored publish failed: {0}")]
struct InboxRead(String);

/// The recipient a topic publish is validated (and stored) with before each copy gets its
/// subscriber: `topic:<name>`, cut on a character boundary to fit a user id — a topic
/// name may take all 128 bytes a user id may, and `topic:` does not fit beside it.
fn placeholder_recipient(topic: &TopicId) -> String {
    let mut placeholder = format!("topic:{topic}");
    let mut end = placeholder
        .len()
        .min(herald_protocol::user::MAX_USER_ID_BYTES);
    while !placeholder.is_char_boundary(end) {
        end -= 1;
    }
    placeholder.truncate(end);
    placeholder
}
