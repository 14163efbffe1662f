//! Topics: producers (un)subscribe users and publish; users manage their own
//! subscriptions where the topic allows it. A publish is fanned out on write by the
//! fan-out workers; its progress is readable while it runs.

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
use herald_store::topics::{PATH_TOPIC, PublishRecord};
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
    if let Some(key) = key {
        notification.id = publish_id(&producer.0.producer, key);
    }
    let mut job = FanoutJob {
        id: notification.id.clone(),
        topic: t.clone(),
        notification,
        stored_seq: None,
    };
    let record = decide(&state, &t, &producer.0.producer, &job.id, key.is_some()).await?;
    let (big, subscribers) = (record.path == PATH_TOPIC, record.subscribers);
    let mut seq = None;
    if big {
        job.notification.topic = Some(t.as_str().to_owned());
    }
    // The job first: once it is durable, the publish happens in full whatever becomes of
    // this request. On the big-topic path the worker stores the publish itself when it
    // does not find it stored (this process stopped before the append below), so a
    // publish never shows in every view without its channel work following.
    state
        .fanouts
        .enqueue(state.acceptor.inbox().subjects(), &job, big)
        .await
        .map_err(|e| AppError::unavailable(&e))?;
    if big {
        // Stored once, deduplicated by id with the worker's append: every subscriber's
        // view merges the topic's subject, and the answer carries the publish's seq.
        let stored = state
            .acceptor
            .inbox()
            .append_topic(&t, &job.notification)
            .await
            .map_err(|e| AppError::unavailable(&e))?;
        if stored.duplicate {
            same_publish(&state, &job, stored.seq).await?;
        }
        seq = Some(stored.seq);
    }
    metrics::counter!("herald_topic_publishes_total", "path" => if big { PATH_TOPIC } else { PATH_WRITE })
        .increment(1);
    let mut answer = json!({"id": job.id, "status": "accepted", "topic": t, "subscribers": subscribers,
        "path": record.path});
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
    match state.fanouts.get(&id).await.map_err(topics_error)? {
        Some(p) => Ok(Json(json!({"id": id, "topic": t, "fanout": p}))),
        None => Ok(Json(
            json!({"id": id, "topic": t, "fanout": {"state": "queued"}}),
        )),
    }
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

/// How much older than the dedup window a publish's record must be before its key names
/// a new publish: the record is written an instant before the job whose id the FANOUT
/// queue remembers for that window, and API hosts' clocks differ a little.
const RECORD_MARGIN_S: u64 = 10;

/// The path of publish `id` to `topic`: the one recorded by an earlier attempt with the
/// same idempotency key within the dedup window, or else chosen now from the topic's size
/// and recorded before anything is queued or stored. A retry thus never takes the other
/// path after a first attempt that stored something (which would show the publish twice)
/// and is answered as the first time. `keyed`: only a keyed id can have a record already.
///
/// # Errors
/// 409 when the key named a publish to another topic within the window; 503 when NATS
/// fails.
async fn decide(
    state: &ApiState,
    topic: &TopicId,
    producer: &str,
    id: &str,
    keyed: bool,
) -> Result<PublishRecord, AppError> {
    let now = time::OffsetDateTime::now_utc().unix_timestamp();
    for _ in 0..3 {
        let existing = if keyed {
            state.fanouts.record(id).await.map_err(topics_error)?
        } else {
            None
        };
        if let Some((record, _)) = &existing {
            let window = state.fanouts.dedup_window().await.map_err(topics_error)?;
            let age = u64::try_from(now.saturating_sub(record.at)).unwrap_or(0);
            if age <= window.as_secs() + RECORD_MARGIN_S {
                if &record.topic != topic {
                    return Err(AppError::new(
                        StatusCode::CONFLICT,
                        "idempotency_key_reused",
                        format!(
                            "this Idempotency-Key named a publish to another topic within the \
                             last {} s; use a new key",
                            window.as_secs()
                        ),
                    ));
                }
                return Ok(record.clone());
            }
            // Older than the window: the key names a new publish.
        }
        let subscribers = state
            .subscriptions
            .count(topic)
            .await
            .map_err(topics_error)?;
        let record = PublishRecord {
            topic: topic.clone(),
            producer: producer.to_owned(),
            path: if subscribers >= state.topics.big_threshold {
                PATH_TOPIC
            } else {
                PATH_WRITE
            }
            .to_owned(),
            subscribers,
            at: now,
        };
        let previous = existing.map(|(_, revision)| revision);
        if state
            .fanouts
            .put_record(id, &record, previous)
            .await
            .map_err(topics_error)?
        {
            return Ok(record);
        }
        // A concurrent request with the same key recorded first: take its decision.
    }
    Err(AppError::new(
        StatusCode::CONFLICT,
        "conflict",
        "concurrent requests with this Idempotency-Key; retry",
    )
    .retry_after(1))
}

/// The fan-out on write path's name in records and answers.
const PATH_WRITE: &str = "write";

/// Namespace of the ids of topic publishes that carry an idempotency key.
const PUBLISH_IDS: uuid::Uuid = uuid::Uuid::from_u128(0x9e4d_27b1_5c08_4f6a_b3e2_71d0_c8a5_1f94);

/// The id of `producer`'s topic publish with idempotency key `key`: the same for every
/// retry, and in a namespace of its own. A notify with the same key has another id, so
/// neither is taken for a repeat of the other (the INBOX and FANOUT streams deduplicate
/// by id).
fn publish_id(producer: &str, key: &str) -> String {
    let mut name = Vec::with_capacity(producer.len() + key.len() + 1);
    name.extend_from_slice(producer.as_bytes());
    name.push(0);
    name.extend_from_slice(key.as_bytes());
    uuid::Uuid::new_v5(&PUBLISH_IDS, &name).to_string()
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
                _ => Err(AppError::new(
                    StatusCode::CONFLICT,
                    "idempotency_key_reused",
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
