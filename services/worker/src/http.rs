//! HTTP routes of the channel layer: push devices and contact data, delivery status,
//! dead letters, channel pause/resume, and the one-click unsubscribe endpoint.

use crate::dlq::{Dlq, DlqError};
use crate::optout::OptOut;
use crate::unsubscribe::Links;
use axum::Json;
use axum::Router;
use axum::body::Bytes;
use axum::extract::{Path, Query, State};
use axum::http::StatusCode;
use axum::response::{Html, IntoResponse, Response};
use axum::routing::{get, post};
use herald_api::auth::{Authenticator, HasAuth};
use herald_api::{AppError, Producer, User};
use herald_auth::Scope;
use herald_channels::Platform;
use herald_protocol::streams::{self, WORK_CHANNELS};
use herald_protocol::{Channel, FieldError, Priority, UserId};
use herald_store::targets::{Contact, Targets};
use herald_store::{Nats, StatusStore};
use serde::Deserialize;
use serde_json::{Value, json};
use std::sync::Arc;
use std::time::Duration;

/// Everything the channel routes share.
#[derive(Clone, Debug)]
pub struct ChannelsState {
    /// Verifies callers.
    pub auth: Authenticator,
    /// NATS (consumer pause).
    pub nats: Nats,
    /// Devices and contacts.
    pub targets: Targets,
    /// Delivery status.
    pub status: StatusStore,
    /// Dead letters.
    pub dlq: Dlq,
    /// Opt-out writes.
    pub optout: OptOut,
    /// Unsubscribe tokens.
    pub links: Links,
    /// Seen-live positions (`herald_seen`).
    pub seen: async_nats::jetstream::kv::Store,
    /// Read positions (`herald_reads`).
    pub reads: async_nats::jetstream::kv::Store,
}

impl HasAuth for ChannelsState {
    fn authenticator(&self) -> &Authenticator {
        &self.auth
    }
}

type S = State<Arc<ChannelsState>>;

/// The routes.
pub fn routes(state: ChannelsState) -> Router {
    Router::new()
        .route("/v1/me/devices", post(add_device).delete(remove_device))
        .route(
            "/v1/users/{user_id}/contact",
            axum::routing::put(put_contact),
        )
        .route("/v1/notifications/{id}", get(status))
        .route("/v1/dlq", get(list_dlq))
        .route("/v1/dlq/{id}/retry", post(retry_dlq))
        .route("/v1/channels/{channel}/pause", post(pause))
        .route("/v1/channels/{channel}/resume", post(resume))
        .route("/v1/unsubscribe", post(unsubscribe).get(unsubscribe_page))
        .with_state(Arc::new(state))
}

fn json_body<T: serde::de::DeserializeOwned>(body: &Bytes) -> Result<T, AppError> {
    let de = &mut serde_json::Deserializer::from_slice(body);
    serde_path_to_error::deserialize(de).map_err(|e| {
        let path = e.path().to_string();
        let field = if path == "." {
            "body".to_string()
        } else {
            path
        };
        AppError::field(FieldError::new(field, e.inner().to_string()))
    })
}

fn unavailable(e: impl std::error::Error) -> AppError {
    AppError::unavailable(&e)
}

#[derive(Deserialize)]
struct DeviceBody {
    platform: Platform,
    token: String,
}

fn check_token(token: &str) -> Result<(), AppError> {
    if token.is_empty() || token.len() > 4096 || token.chars().any(char::is_control) {
        return Err(AppError::field(FieldError::new(
            "token",
            "must be 1 to 4096 bytes without control characters",
        )));
    }
    Ok(())
}

async fn add_device(State(s): S, User(user): User, body: Bytes) -> Result<Response, AppError> {
    let body: DeviceBody = json_body(&body)?;
    check_token(&body.token)?;
    let added = s
        .targets
        .add_device(&user, body.platform, &body.token)
        .await
        .map_err(unavailable)?;
    let status = if added {
        StatusCode::CREATED
    } else {
        StatusCode::OK
    };
    Ok((
        status,
        Json(json!({"platform": body.platform, "token": body.token})),
    )
        .into_response())
}

#[derive(Deserialize)]
struct TokenBody {
    token: String,
}

async fn remove_device(State(s): S, User(user): User, body: Bytes) -> Result<StatusCode, AppError> {
    let body: TokenBody = json_body(&body)?;
    check_token(&body.token)?;
    if s.targets
        .remove_device(&user, &body.token)
        .await
        .map_err(unavailable)?
    {
        Ok(StatusCode::NO_CONTENT)
    } else {
        Err(AppError::not_found("no such device token"))
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ContactBody {
    #[serde(default)]
    email: Option<String>,
    #[serde(default)]
    phone: Option<String>,
    #[serde(default)]
    locale: Option<String>,
    #[serde(default)]
    timezone: Option<String>,
    #[serde(default)]
    webhook: Option<String>,
}

/// `+` and 8 to 15 digits, the first not 0 (ITU-T E.164).
pub fn is_e164(phone: &str) -> bool {
    let Some(digits) = phone.strip_prefix('+') else {
        return false;
    };
    (8..=15).contains(&digits.len())
        && digits.bytes().all(|b| b.is_ascii_digit())
        && !digits.starts_with('0')
}

fn validate_contact(body: ContactBody) -> Result<Contact, AppError> {
    let field = |name: &str, message: &str| AppError::field(FieldError::new(name, message));
    if let Some(email) = &body.email
        && (email.len() > 254 || email.parse::<lettre::Address>().is_err())
    {
        return Err(field("email", "not a valid email address"));
    }
    if let Some(phone) = &body.phone
        && !is_e164(phone)
    {
        return Err(field(
            "phone",
            "not an E.164 number (+, country code, number; 8 to 15 digits)",
        ));
    }
    if let Some(locale) = &body.locale
        && (locale.is_empty()
            || locale.len() > 35
            || !locale
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_'))
    {
        return Err(field("locale", "not a BCP 47 language tag"));
    }
    if let Some(tz) = &body.timezone
        && (tz.is_empty()
            || tz.len() > 64
            || !tz
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, '/' | '_' | '-' | '+')))
    {
        return Err(field("timezone", "not an IANA time zone name"));
    }
    if let Some(url) = &body.webhook
        && !(url.starts_with("https://") || url.starts_with("http://"))
    {
        return Err(field("webhook", "must be an http(s) URL"));
    }
    Ok(Contact {
        email: body.email,
        phone: body.phone,
        locale: body.locale,
        timezone: body.timezone,
        webhook: body.webhook,
    })
}

fn user_id(raw: String) -> Result<UserId, AppError> {
    UserId::new(raw).map_err(|e| AppError::field(FieldError::new("user_id", e.to_string())))
}

async fn put_contact(
    State(s): S,
    producer: Producer,
    Path(user): Path<String>,
    body: Bytes,
) -> Result<Json<Value>, AppError> {
    producer.require(Scope::Notify)?;
    let user = user_id(user)?;
    let contact = validate_contact(json_body(&body)?)?;
    s.targets
        .put_contact(&user, &contact)
        .await
        .map_err(unavailable)?;
    let mut out = serde_json::to_value(&contact).unwrap_or_else(|_| json!({}));
    out["user_id"] = json!(user.as_str());
    Ok(Json(out))
}

async fn status(
    State(s): S,
    producer: Producer,
    Path(id): Path<String>,
) -> Result<Json<Value>, AppError> {
    if !producer.0.allows(Scope::Read) {
        producer.require(Scope::Notify)?;
    }
    // Notification ids are UUIDs. Anything else has no status, and must never reach a
    // subject: a key of kilobytes would overflow NATS' protocol line and cost the
    // process its connection.
    let id = uuid::Uuid::parse_str(&id)
        .map_err(|_| {
            AppError::field(FieldError::new(
                "id",
                "must be a notification id (a UUID, as POST /v1/notify answered)",
            ))
        })?
        .hyphenated()
        .to_string();
    match s.status.get(&id).await.map_err(unavailable)? {
        Some(doc) => {
            // Seen live (a client `ack`) and read, from the user's positions.
            let token = doc.user_id.token();
            let seen = position(&s.seen, token.as_str()).await;
            let read = position(&s.reads, token.as_str()).await;
            let mut out = serde_json::to_value(&doc).unwrap_or_default();
            out["seen"] = json!(seen.is_some_and(|p| p >= doc.seq));
            out["read"] = json!(read.is_some_and(|p| p >= doc.seq));
            Ok(Json(out))
        }
        None => Err(AppError::not_found(
            "no delivery status for this id (inbox-only notifications have none)",
        )),
    }
}

/// A position (seq as decimal text) from a KV bucket; `None` when absent or unreadable.
async fn position(kv: &async_nats::jetstream::kv::Store, key: &str) -> Option<u64> {
    let value = kv.get(key).await.ok()??;
    std::str::from_utf8(&value).ok()?.trim().parse().ok()
}

#[derive(Deserialize)]
struct DlqQuery {
    #[serde(default)]
    after: u64,
    #[serde(default)]
    limit: Option<usize>,
}

async fn list_dlq(
    State(s): S,
    producer: Producer,
    Query(q): Query<DlqQuery>,
) -> Result<Json<Value>, AppError> {
    producer.require(Scope::Admin)?;
    let limit = q.limit.unwrap_or(100).clamp(1, 1000);
    let items = s.dlq.list(q.after, limit).await.map_err(unavailable)?;
    let next_after = items.last().map_or(q.after, |l| l.dlq_id);
    Ok(Json(json!({"items": items, "next_after": next_after})))
}

async fn retry_dlq(
    State(s): S,
    producer: Producer,
    Path(id): Path<String>,
) -> Result<Response, AppError> {
    producer.require(Scope::Admin)?;
    let id: u64 = id
        .parse()
        .map_err(|_| AppError::field(FieldError::new("id", "a dead-letter id is a number")))?;
    let letter = match s.dlq.get(id).await {
        Ok(letter) => letter,
        Err(DlqError::NotFound(id)) => {
            return Err(AppError::not_found(format!("no dead letter {id}")));
        }
        Err(e) => return Err(unavailable(e)),
    };
    // Recorded before the job is back on its queue, so it never lands after "sent".
    let update = herald_store::status::Update::state(herald_store::status::State::Retrying)
        .because("retried from the dead-letter queue");
    if let Err(e) = s.status.record(&letter.job, update).await {
        tracing::warn!(error = %e, "recording delivery status failed");
    }
    s.dlq.requeue(id, &letter.job).await.map_err(unavailable)?;
    Ok((
        StatusCode::ACCEPTED,
        Json(json!({"requeued": true, "job": letter.job})),
    )
        .into_response())
}

fn work_channel(raw: &str) -> Result<Channel, AppError> {
    WORK_CHANNELS
        .into_iter()
        .find(|c| c.as_str() == raw)
        .ok_or_else(|| {
            AppError::field(FieldError::new(
                "channel",
                "one of push, email, sms, webhook",
            ))
        })
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct PauseBody {
    #[serde(default)]
    for_seconds: Option<u64>,
}

async fn pause(
    State(s): S,
    producer: Producer,
    Path(channel): Path<String>,
    body: Bytes,
) -> Result<Json<Value>, AppError> {
    producer.require(Scope::Admin)?;
    let channel = work_channel(&channel)?;
    let body: PauseBody = if body.is_empty() {
        PauseBody::default()
    } else {
        json_body(&body)?
    };
    // NATS pauses until a time; "until resumed" is a long time.
    let for_ = Duration::from_secs(
        body.for_seconds
            .unwrap_or(365 * 24 * 3600)
            .min(10 * 365 * 24 * 3600),
    );
    let until = time::OffsetDateTime::now_utc() + for_;
    let stream = s
        .nats
        .js_consume
        .get_stream_no_info(streams::work_stream_name(channel))
        .await
        .map_err(unavailable)?;
    for lane in Priority::ALL {
        stream
            .pause_consumer(&streams::worker_consumer(channel, lane), until)
            .await
            .map_err(unavailable)?;
    }
    Ok(Json(json!({
        "channel": channel.as_str(),
        "paused": true,
        "until": herald_protocol::notification::format_time(until),
    })))
}

async fn resume(
    State(s): S,
    producer: Producer,
    Path(channel): Path<String>,
) -> Result<Json<Value>, AppError> {
    producer.require(Scope::Admin)?;
    let channel = work_channel(&channel)?;
    let stream = s
        .nats
        .js_consume
        .get_stream_no_info(streams::work_stream_name(channel))
        .await
        .map_err(unavailable)?;
    for lane in Priority::ALL {
        stream
            .resume_consumer(&streams::worker_consumer(channel, lane))
            .await
            .map_err(unavailable)?;
    }
    Ok(Json(json!({"channel": channel.as_str(), "paused": false})))
}

#[derive(Deserialize)]
struct UnsubscribeQuery {
    #[serde(default)]
    token: Option<String>,
}

fn verify(links: &Links, q: &UnsubscribeQuery) -> Result<(UserId, Option<String>), AppError> {
    let token = q
        .token
        .as_deref()
        .ok_or_else(|| AppError::field(FieldError::new("token", "missing")))?;
    links.verify(token).map_err(|_| {
        AppError::field(FieldError::new(
            "token",
            "invalid or altered unsubscribe token",
        ))
    })
}

/// RFC 8058 one-click: the mail client POSTs `List-Unsubscribe=One-Click` to the URL.
async fn unsubscribe(
    State(s): S,
    Query(q): Query<UnsubscribeQuery>,
) -> Result<Json<Value>, AppError> {
    let (user, category) = verify(&s.links, &q)?;
    match s.optout.unsubscribe_email(&user, category.as_deref()).await {
        Ok(()) => {}
        Err(herald_store::PreferencesError::Invalid(e)) => return Err(AppError::field(e)),
        Err(e) => return Err(unavailable(e)),
    }
    Ok(Json(
        json!({"unsubscribed": true, "category": category, "channel": "email"}),
    ))
}

/// A person who opens the link gets a confirmation button: a GET never changes anything
/// (link scanners follow GETs).
async fn unsubscribe_page(
    State(s): S,
    Query(q): Query<UnsubscribeQuery>,
) -> Result<Html<String>, AppError> {
    let (_, category) = verify(&s.links, &q)?;
    let what = category.map_or_else(|| "all email".to_string(), |c| format!("{c} email"));
    let token = q.token.unwrap_or_default();
    Ok(Html(format!(
        "<!doctype html><title>Unsubscribe</title><form method=post action=\"/v1/unsubscribe?token={}\">\
         <p>Stop receiving {}?</p><button>Unsubscribe</button></form>",
        html_escape::encode_double_quoted_attribute(&token),
        html_escape::encode_text(&what)
    )))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn e164_numbers() {
        for ok in ["+4915112345678", "+14155552671", "+12345678"] {
            assert!(is_e164(ok), "{ok}");
        }
        for bad in [
            "4915112345678",
            "+0123456789",
            "+12 345 678",
            "+1234567",
            "+1234567890123456",
            "+",
        ] {
            assert!(!is_e164(bad), "{bad}");
        }
    }
}
