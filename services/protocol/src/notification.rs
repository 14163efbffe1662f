//! Notifications: what producers send ([`NotifyRequest`]), what the INBOX stream stores
//! ([`StoredNotification`]) and what users receive ([`Notification`]).

use crate::error::FieldError;
use crate::user::{UserId, UserIdError};
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};
use time::OffsetDateTime;
use time::format_description::well_known::Rfc3339;

/// Longest title, in bytes.
pub const MAX_TITLE_BYTES: usize = 1024;
/// Longest body, in bytes.
pub const MAX_BODY_BYTES: usize = 16 * 1024;
/// Longest category, idempotency key or collapse key, in bytes.
pub const MAX_KEY_BYTES: usize = 256;
/// Longest time to live: the inbox keeps 30 days.
pub const MAX_TTL_SECONDS: u64 = 30 * 24 * 3600;
/// Furthest `send_at` ahead: the inbox stream, which holds the schedule, keeps 30 days.
pub const MAX_SCHEDULE_AHEAD: time::Duration = time::Duration::days(30);

/// Delivery lane. `high` never waits behind the others.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Priority {
    /// OTPs, security alerts.
    High,
    /// Everything else by default.
    #[default]
    Normal,
    /// Marketing, digests.
    Low,
}

impl Priority {
    /// Every lane, most urgent first (the order workers poll them in).
    pub const ALL: [Priority; 3] = [Self::High, Self::Normal, Self::Low];

    /// The lane name used in subjects and headers.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::High => "high",
            Self::Normal => "normal",
            Self::Low => "low",
        }
    }
}

/// A delivery channel.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Channel {
    /// The durable inbox, and live delivery to connected clients.
    Inbox,
    /// APNs / FCM / web push.
    Push,
    /// SMTP.
    Email,
    /// SMS providers.
    Sms,
    /// Signed HTTP callbacks.
    Webhook,
}

impl Channel {
    /// Every channel, in a stable order.
    pub const ALL: [Channel; 5] = [
        Self::Inbox,
        Self::Push,
        Self::Email,
        Self::Sms,
        Self::Webhook,
    ];

    /// The channel's name.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Inbox => "inbox",
            Self::Push => "push",
            Self::Email => "email",
            Self::Sms => "sms",
            Self::Webhook => "webhook",
        }
    }

    /// The channel of that name, if any.
    pub fn parse(raw: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|c| c.as_str() == raw)
    }
}

/// The body of `POST /v1/notify` and of a native publish on `herald.notify`, as sent.
///
/// Fields are loosely typed here on purpose: [`NotifyRequest::validate`] turns it into a
/// [`ValidatedNotify`] and names the first field at fault.
///
/// Unknown fields are refused (400 naming the field): a typo such as `priorty` or
/// `sendAt` must not quietly turn into an inbox-only notification at normal priority.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NotifyRequest {
    /// Recipient.
    pub user_id: Option<String>,
    /// Category, used by preferences.
    pub category: Option<String>,
    /// `high`, `normal` (default) or `low`.
    pub priority: Option<String>,
    /// Title line.
    pub title: Option<String>,
    /// Body text.
    pub body: Option<String>,
    /// Free-form data passed through to clients.
    pub data: Option<Value>,
    /// Template name.
    pub template: Option<String>,
    /// Template variables.
    pub vars: Option<Value>,
    /// Channels to use; default: inbox only.
    pub channels: Option<Vec<String>>,
    /// How long the notification stays relevant.
    pub ttl_seconds: Option<u64>,
    /// Replaces an earlier notification with the same key on push providers.
    pub collapse_key: Option<String>,
    /// Deliver later (RFC 3339).
    pub send_at: Option<String>,
    /// Same as the `Idempotency-Key` header.
    pub idempotency_key: Option<String>,
    /// Folds notifications with the same key for the same user within the category's
    /// window into one (see [`crate::group`]).
    pub group_key: Option<String>,
    /// Who caused it ("Jane"), named in the folded text.
    pub group_actor: Option<String>,
}

/// A notification request that passed validation.
#[derive(Debug, Clone, PartialEq)]
pub struct ValidatedNotify {
    /// Recipient.
    pub user_id: UserId,
    /// Category.
    pub category: Option<String>,
    /// Lane.
    pub priority: Priority,
    /// Title.
    pub title: Option<String>,
    /// Body.
    pub body: Option<String>,
    /// Data object (`{}` when absent).
    pub data: Map<String, Value>,
    /// Channels, inbox first when present, without duplicates.
    pub channels: Vec<Channel>,
    /// Time to live.
    pub ttl_seconds: Option<u64>,
    /// Push collapse key.
    pub collapse_key: Option<String>,
    /// Deliver at this time instead of now.
    pub send_at: Option<OffsetDateTime>,
    /// Template to render (by the acceptor, which knows the templates and the locale).
    pub template: Option<String>,
    /// Template variables.
    pub vars: Map<String, Value>,
    /// Idempotency key from the body.
    pub idempotency_key: Option<String>,
    /// Aggregation key.
    pub group_key: Option<String>,
    /// Who caused it, for the folded text.
    pub group_actor: Option<String>,
}

/// Parses a request body that must be a JSON object into `T`, naming the field at
/// fault: its path when serde can tell (a wrong type, an unknown field), else `body`,
/// with `whole` before serde's message (a syntax error, a missing field).
///
/// # Errors
/// A [`FieldError`]: `body` for anything but a JSON object (serde would read a struct
/// from a JSON array too), for malformed JSON or trailing data; the path of a bad field.
pub fn object_from_json<T: serde::de::DeserializeOwned>(
    bytes: &[u8],
    whole: &str,
) -> Result<T, FieldError> {
    if bytes.iter().find(|b| !b.is_ascii_whitespace()) != Some(&b'{') {
        return Err(FieldError::new("body", "must be a JSON object"));
    }
    // The plain parse first: tracking the path costs on every field of every body,
    // and only a refusal needs it (parsed again, for its path).
    if let Ok(parsed) = serde_json::from_slice(bytes) {
        return Ok(parsed);
    }
    let mut de = serde_json::Deserializer::from_slice(bytes);
    let parsed: T = serde_path_to_error::deserialize(&mut de).map_err(|e| {
        let path = e.path().to_string();
        let inner = e.into_inner();
        if path == "." || path.is_empty() {
            FieldError::new(
                "body",
                format!("{whole}: {}", strip_position(&inner.to_string())),
            )
        } else {
            FieldError::new(path, strip_position(&inner.to_string()))
        }
    })?;
    de.end()
        .map_err(|e| FieldError::new("body", format!("trailing data after JSON: {e}")))?;
    Ok(parsed)
}

impl NotifyRequest {
    /// Parses a JSON body, naming the field whose type is wrong.
    ///
    /// # Errors
    /// A [`FieldError`] with field `body` for malformed JSON, or the path of the bad field.
    pub fn from_json(bytes: &[u8]) -> Result<Self, FieldError> {
        object_from_json(bytes, "not a JSON object")
    }

    /// Checks every field against the contract.
    ///
    /// # Errors
    /// The first [`FieldError`] found.
    pub fn validate(self) -> Result<ValidatedNotify, FieldError> {
        let user_id = match self.user_id {
            None => return Err(FieldError::new("user_id", "is required")),
            Some(raw) => UserId::new(raw)
                .map_err(|e: UserIdError| FieldError::new("user_id", e.to_string()))?,
        };
        let priority = match self.priority.as_deref() {
            None => Priority::Normal,
            Some("high") => Priority::High,
            Some("normal") => Priority::Normal,
            Some("low") => Priority::Low,
            Some(other) => {
                return Err(FieldError::new(
                    "priority",
                    format!("must be high, normal or low, not {other:?}"),
                ));
            }
        };
        if let Some(category) = &self.category {
            check_key("category", category)?;
        }
        check_len("title", self.title.as_deref(), MAX_TITLE_BYTES)?;
        check_len("body", self.body.as_deref(), MAX_BODY_BYTES)?;
        if let Some(template) = &self.template {
            check_key("template", template)?;
        }
        if self.template.is_none()
            && self.title.as_deref().is_none_or(str::is_empty)
            && self.body.as_deref().is_none_or(str::is_empty)
        {
            return Err(FieldError::new(
                "title",
                "one of title, body or template is required",
            ));
        }
        let data = match self.data {
            None | Some(Value::Null) => Map::new(),
            Some(Value::Object(map)) => map,
            Some(_) => return Err(FieldError::new("data", "must be a JSON object")),
        };
        let vars = match self.vars {
            None | Some(Value::Null) => Map::new(),
            Some(Value::Object(map)) => map,
            Some(_) => return Err(FieldError::new("vars", "must be a JSON object")),
        };
        let channels = parse_channels(self.channels)?;
        if let Some(ttl) = self.ttl_seconds
            && (ttl == 0 || ttl > MAX_TTL_SECONDS)
        {
            return Err(FieldError::new(
                "ttl_seconds",
                format!("must be between 1 and {MAX_TTL_SECONDS}"),
            ));
        }
        if let Some(key) = &self.collapse_key {
            check_key("collapse_key", key)?;
        }
        if let Some(key) = &self.idempotency_key {
            check_idempotency_key("idempotency_key", key)?;
        }
        if let Some(key) = &self.group_key {
            check_key("group_key", key)?;
            if self.send_at.is_some() {
                return Err(FieldError::new(
                    "group_key",
                    "cannot be combined with send_at: a group folds what arrives now",
                ));
            }
        }
        if let Some(actor) = &self.group_actor {
            check_key("group_actor", actor)?;
        }
        let send_at = match &self.send_at {
            None => None,
            Some(at) => {
                let when = OffsetDateTime::parse(at, &Rfc3339).map_err(|e| {
                    FieldError::new("send_at", format!("not an RFC 3339 time: {e}"))
                })?;
                let now = OffsetDateTime::now_utc();
                if when > now + MAX_SCHEDULE_AHEAD {
                    return Err(FieldError::new(
                        "send_at",
                        "must be at most 30 days ahead (the inbox's retention)",
                    ));
                }
                // A time already past (or this very moment) means "now".
                (when > now).then_some(when)
            }
        };
        Ok(ValidatedNotify {
            user_id,
            category: self.category,
            priority,
            title: self.title,
            body: self.body,
            data,
            channels,
            ttl_seconds: self.ttl_seconds,
            collapse_key: self.collapse_key,
            send_at,
            template: self.template,
            vars,
            idempotency_key: self.idempotency_key,
            group_key: self.group_key,
            group_actor: self.group_actor,
        })
    }
}

/// Validates an idempotency key (header or field): 1–256 printable ASCII bytes.
///
/// # Errors
/// A [`FieldError`] naming `field`.
pub fn check_idempotency_key(field: &str, key: &str) -> Result<(), FieldError> {
    if key.is_empty() || key.len() > MAX_KEY_BYTES {
        return Err(FieldError::new(field, "must be 1 to 256 bytes"));
    }
    if !key.bytes().all(|b| b.is_ascii_graphic()) {
        return Err(FieldError::new(
            field,
            "must be printable ASCII without spaces",
        ));
    }
    Ok(())
}

/// Namespace of idempotent ids: id = UUIDv5(namespace, producer, key).
const IDEMPOTENT_NAMESPACE: uuid::Uuid =
    uuid::Uuid::from_u128(0x6a1f_3c52_9d0e_4b7a_8e21_55c0_f3a9_0d17);

/// The id a (producer, idempotency key) pair always maps to: UUIDv5 over a fixed
/// namespace and `producer`, a NUL byte, `key`. A repeated key therefore gets the first
/// copy's id on every path, and a native producer (producer `"nats"`, key its
/// `Nats-Msg-Id`) knows its notification's id without being told.
pub fn idempotent_id(producer: &str, key: &str) -> uuid::Uuid {
    let mut name = Vec::with_capacity(producer.len() + key.len() + 1);
    name.extend_from_slice(producer.as_bytes());
    name.push(0);
    name.extend_from_slice(key.as_bytes());
    uuid::Uuid::new_v5(&IDEMPOTENT_NAMESPACE, &name)
}

fn check_key(field: &str, value: &str) -> Result<(), FieldError> {
    if value.is_empty() || value.len() > MAX_KEY_BYTES {
        return Err(FieldError::new(field, "must be 1 to 256 bytes"));
    }
    if value.chars().any(char::is_control) {
        return Err(FieldError::new(
            field,
            "must not contain control characters",
        ));
    }
    Ok(())
}

fn check_len(field: &str, value: Option<&str>, max: usize) -> Result<(), FieldError> {
    match value {
        Some(v) if v.len() > max => Err(FieldError::new(
            field,
            format!("is {} bytes; the limit is {max}", v.len()),
        )),
        _ => Ok(()),
    }
}

fn parse_channels(raw: Option<Vec<String>>) -> Result<Vec<Channel>, FieldError> {
    let Some(raw) = raw else {
        return Ok(vec![Channel::Inbox]);
    };
    if raw.is_empty() {
        return Err(FieldError::new(
            "channels",
            "must name at least one channel",
        ));
    }
    let mut channels = Vec::with_capacity(raw.len());
    for (i, name) in raw.iter().enumerate() {
        let channel = Channel::parse(name).ok_or_else(|| {
            FieldError::new(
                format!("channels[{i}]"),
                format!("unknown channel {name:?}; use inbox, push, email, sms or webhook"),
            )
        })?;
        if !channels.contains(&channel) {
            channels.push(channel);
        }
    }
    Ok(channels)
}

/// serde_json appends "at line 1 column 9"; the field path already says where.
fn strip_position(message: &str) -> String {
    match message.rfind(" at line ") {
        Some(i) => message[..i].to_string(),
        None => message.to_string(),
    }
}

/// What the INBOX stream stores for one notification. Its stream sequence is its `seq`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct StoredNotification {
    /// Globally unique id.
    pub id: String,
    /// Recipient.
    pub user_id: UserId,
    /// Category.
    #[serde(default)]
    pub category: Option<String>,
    /// Lane.
    #[serde(default)]
    pub priority: Priority,
    /// Title.
    #[serde(default)]
    pub title: Option<String>,
    /// Body.
    #[serde(default)]
    pub body: Option<String>,
    /// Data object.
    #[serde(default)]
    pub data: Map<String, Value>,
    /// Topic it came from, if any.
    #[serde(default)]
    pub topic: Option<String>,
    /// Acceptance time, RFC 3339.
    pub created_at: String,
    /// Channels requested.
    #[serde(default)]
    pub channels: Vec<Channel>,
    /// Push collapse key.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub collapse_key: Option<String>,
    /// End of relevance, RFC 3339.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub expires_at: Option<String>,
    /// The time it was scheduled for, RFC 3339, when it was.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub send_at: Option<String>,
    /// Channel texts rendered from a template, when one was used.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rendered: Option<Rendered>,
    /// The producer that sent it (rate caps are per producer); never shown to users.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub producer: Option<String>,
    /// Its aggregation group as it stood when this one joined.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub group: Option<crate::group::Group>,
    /// A templated topic publish: its texts in every other locale the template defines,
    /// by locale (see [`crate::locale`]). Empty on every copy made for one recipient.
    #[serde(default, skip_serializing_if = "std::collections::BTreeMap::is_empty")]
    pub variants: std::collections::BTreeMap<String, crate::locale::Localized>,
}

/// The texts a template produced for each channel (the inbox's are `title`/`body` of the
/// notification itself). Rendered once, at acceptance, in the recipient's locale, so every
/// channel shows the same words and a retry never renders differently.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Rendered {
    /// Template name.
    pub template: String,
    /// Locale the texts are in (`default` when none matched).
    pub locale: String,
    /// Push title.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub push_title: Option<String>,
    /// Push body.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub push_body: Option<String>,
    /// Email subject.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub email_subject: Option<String>,
    /// Email plain text.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub email_text: Option<String>,
    /// Email HTML (escaped by the template engine).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub email_html: Option<String>,
    /// SMS text.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sms_text: Option<String>,
}

impl StoredNotification {
    /// Builds the stored form of a validated request accepted at `now` under `id`.
    pub fn from_request(req: ValidatedNotify, id: String, now: OffsetDateTime) -> Self {
        // Relevance starts when the notification goes out.
        let start = req.send_at.unwrap_or(now);
        let expires_at = req
            .ttl_seconds
            .map(|ttl| format_time(start + time::Duration::seconds(ttl as i64)));
        Self {
            id,
            user_id: req.user_id,
            category: req.category,
            priority: req.priority,
            title: req.title,
            body: req.body,
            data: req.data,
            topic: None,
            created_at: format_time(now),
            channels: req.channels,
            collapse_key: req.collapse_key,
            expires_at,
            send_at: req.send_at.map(format_time),
            rendered: None,
            producer: None,
            group: None,
            variants: std::collections::BTreeMap::new(),
        }
    }
}

/// RFC 3339 with second precision... and a `Z`, as every Herald timestamp.
pub fn format_time(t: OffsetDateTime) -> String {
    t.to_offset(time::UtcOffset::UTC)
        .format(&Rfc3339)
        .unwrap_or_else(|_| t.unix_timestamp().to_string())
}

/// A job for a channel worker: which notification, for whom, on which channel, to which
/// target. Workers read the content from the inbox by `seq` and the target from the target
/// store by `target`, so neither content nor contact data is copied into work queues.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ChannelJob {
    /// Notification id.
    pub id: String,
    /// Its inbox position.
    pub seq: u64,
    /// Recipient.
    pub user_id: UserId,
    /// Channel to deliver on.
    pub channel: Channel,
    /// Lane.
    pub priority: Priority,
    /// Opaque id of the target (a hash of the device token, address or number; see
    /// `herald_store::targets::target_id`).
    #[serde(default)]
    pub target: String,
    /// The folded text of an aggregation group, sent instead of the notification's own
    /// (the group is closed when this job is made, so its text is final).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub folded: Option<Folded>,
    /// The one email of a digest: `id` is then the digest's id (see
    /// [`crate::digest::digest_id`]), not a notification's, and `seq` the newest listed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub digest: Option<crate::digest::DigestMail>,
    /// A big topic's publish, stored once with every locale's texts: the locale of this
    /// subscriber's (see [`StoredNotification::localize`]).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub locale: Option<String>,
}

/// What a folded group's one push, email or SMS says.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Folded {
    /// Group key (the default collapse key).
    pub key: String,
    /// Notifications folded into it.
    pub count: u64,
    /// Folded title.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub title: Option<String>,
    /// Folded body.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub body: Option<String>,
}

impl ChannelJob {
    /// The `Nats-Msg-Id` of this job: one job per (notification, channel, target),
    /// whatever the number of router replays.
    pub fn msg_id(&self) -> String {
        format!("{}:{}:{}", self.id, self.channel.as_str(), self.target)
    }

    /// The key of this job's sent marker and status entry: `<id>.<channel>.<target>`
    /// (valid as a NATS KV key).
    pub fn key(&self) -> String {
        let channel = self.channel.as_str();
        let mut key = String::with_capacity(self.id.len() + channel.len() + self.target.len() + 2);
        push_kv_safe(&mut key, &self.id);
        key.push('.');
        key.push_str(channel);
        key.push('.');
        key.push_str(&self.target);
        key
    }
}

/// `raw` with every byte a KV key cannot hold replaced by `_` (ids are UUIDs; this is
/// only a guard).
pub fn kv_safe(raw: &str) -> String {
    let mut safe = String::with_capacity(raw.len());
    push_kv_safe(&mut safe, raw);
    safe
}

/// Appends [`kv_safe`]`(raw)` to `out` (a worker builds a key per job; most ids need no
/// replacing).
fn push_kv_safe(out: &mut String, raw: &str) {
    let keeps = |c: char| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '=');
    if raw.chars().all(keeps) {
        out.push_str(raw);
    } else {
        out.extend(raw.chars().map(|c| if keeps(c) { c } else { '_' }));
    }
}

/// The notification object of SPEC §4, as returned and as delivered.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Notification {
    /// Globally unique id.
    pub id: String,
    /// Position in the user's inbox.
    pub seq: u64,
    /// Recipient.
    pub user_id: UserId,
    /// Category.
    pub category: Option<String>,
    /// Lane.
    pub priority: Priority,
    /// Title.
    pub title: Option<String>,
    /// Body.
    pub body: Option<String>,
    /// Data object.
    pub data: Map<String, Value>,
    /// Topic it came from.
    pub topic: Option<String>,
    /// Acceptance time.
    pub created_at: String,
    /// Whether the user has read it.
    pub read: bool,
    /// Its aggregation group, when it has one (additive to SPEC §4; boxed, as few
    /// notifications have one).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub group: Option<Box<crate::group::Group>>,
}

impl Notification {
    /// The delivered form of a stored notification at inbox position `seq`.
    pub fn from_stored(stored: StoredNotification, seq: u64, read: bool) -> Self {
        Self {
            id: stored.id,
            seq,
            user_id: stored.user_id,
            category: stored.category,
            priority: stored.priority,
            title: stored.title,
            body: stored.body,
            data: stored.data,
            topic: stored.topic,
            created_at: stored.created_at,
            read,
            group: stored.group.map(Box::new),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn validate(json: &str) -> Result<ValidatedNotify, FieldError> {
        NotifyRequest::from_json(json.as_bytes())?.validate()
    }

    #[test]
    fn unknown_fields_are_refused_by_name() {
        for (json, field) in [
            (r#"{"user_id":"u","title":"t","priorty":"high"}"#, "priorty"),
            (
                r#"{"user_id":"u","title":"t","channel":["sms"]}"#,
                "channel",
            ),
            (
                r#"{"user_id":"u","title":"t","sendAt":"2030-01-01T00:00:00Z"}"#,
                "sendAt",
            ),
        ] {
            let e = NotifyRequest::from_json(json.as_bytes()).expect_err("refused");
            assert!(
                e.field == field || e.message.contains(&format!("`{field}`")),
                "{json}: {e:?}"
            );
            assert!(e.to_string().contains(field), "{json}: {e}");
        }
        // Every field of the contract (SPEC §3, and the aggregation fields) is taken.
        let all = r#"{"user_id":"u1","category":"like","priority":"high","title":"t",
            "body":"b","data":{"k":1},"template":"name","vars":{"v":2},
            "channels":["inbox","push","email","sms","webhook"],"ttl_seconds":86400,
            "collapse_key":"photo-9","send_at":"2030-01-01T00:00:00Z",
            "idempotency_key":"k1","group_key":"g","group_actor":"Jane"}"#;
        NotifyRequest::from_json(all.as_bytes()).expect("every documented field");
    }

    #[test]
    fn object_bodies_refuse_arrays_and_unknown_fields() {
        #[derive(Debug, serde::Deserialize)]
        #[serde(deny_unknown_fields)]
        struct Read {
            #[allow(dead_code)]
            up_to: u64,
        }
        let whole = "expected {\"up_to\": <seq>}";
        for raw in ["[7]", " [[1]]", "7", "\"x\""] {
            let e = object_from_json::<Read>(raw.as_bytes(), whole).expect_err("refused");
            assert_eq!(e.field, "body", "{raw}: {e:?}");
        }
        let e = object_from_json::<Read>(br#"{"up_to":1,"upto":2}"#, whole).expect_err("refused");
        assert!(e.to_string().contains("upto"), "{e}");
        let e = object_from_json::<Read>(br#"{"up_to":"x"}"#, whole).expect_err("refused");
        assert_eq!(e.field, "up_to", "{e:?}");
        let e = object_from_json::<Read>(b"{}", whole).expect_err("refused");
        assert!(e.message.contains("up_to"), "{e:?}");
        assert_eq!(
            object_from_json::<Read>(br#" {"up_to":3}"#, whole)
                .expect("parsed")
                .up_to,
            3
        );
    }

    #[test]
    fn idempotent_ids_are_per_producer() {
        assert_eq!(idempotent_id("a", "k"), idempotent_id("a", "k"));
        assert_ne!(idempotent_id("a", "k"), idempotent_id("b", "k"));
        // The separator keeps ("ab","c") and ("a","bc") apart.
        assert_ne!(idempotent_id("ab", "c"), idempotent_id("a", "bc"));
        // Fixed for good: producers compute it themselves (README: Python's
        // uuid5(UUID(int=0x6a1f3c529d0e4b7a8e2155c0f3a90d17), "nats\x00order-7-paid")),
        // and ids already stored must stay theirs.
        assert_eq!(
            idempotent_id("nats", "order-7-paid").to_string(),
            "35380333-7f70-540d-ac92-01b68c17e2c5"
        );
    }

    #[test]
    fn minimal_request_is_valid() {
        let v = validate(r#"{"user_id":"u1","title":"hi"}"#).expect("valid");
        assert_eq!(v.user_id.as_str(), "u1");
        assert_eq!(v.priority, Priority::Normal);
        assert_eq!(v.channels, vec![Channel::Inbox]);
    }

    #[test]
    fn errors_name_the_field() {
        let cases = [
            (r#"{"title":"x"}"#, "user_id"),
            (r#"{"user_id":"","title":"x"}"#, "user_id"),
            (r#"{"user_id":5,"title":"x"}"#, "user_id"),
            (r#"{"user_id":"u","title":7}"#, "title"),
            (r#"{"user_id":"u"}"#, "title"),
            (
                r#"{"user_id":"u","title":"x","priority":"urgent"}"#,
                "priority",
            ),
            (
                r#"{"user_id":"u","title":"x","channels":["inbox","pigeon"]}"#,
                "channels[1]",
            ),
            (r#"{"user_id":"u","title":"x","data":[1]}"#, "data"),
            (
                r#"{"user_id":"u","title":"x","ttl_seconds":-1}"#,
                "ttl_seconds",
            ),
            (
                r#"{"user_id":"u","title":"x","send_at":"tomorrow"}"#,
                "send_at",
            ),
            (r#"not json"#, "body"),
            (r#"[1,2]"#, "body"),
            (r#"{"user_id":"u","title":"x"} trailing"#, "body"),
        ];
        for (json, field) in cases {
            let err = validate(json).expect_err(json);
            assert_eq!(err.field, field, "{json}: {err}");
        }
    }

    #[test]
    fn stored_round_trips_into_delivered() {
        let v = validate(r#"{"user_id":"a.b","title":"t","data":{"k":1}}"#).expect("valid");
        let stored = StoredNotification::from_request(v, "id1".into(), OffsetDateTime::UNIX_EPOCH);
        let bytes = serde_json::to_vec(&stored).expect("serialize");
        let back: StoredNotification = serde_json::from_slice(&bytes).expect("deserialize");
        let n = Notification::from_stored(back, 42, false);
        assert_eq!(n.seq, 42);
        assert_eq!(n.created_at, "1970-01-01T00:00:00Z");
        assert_eq!(n.data["k"], 1);
    }

    #[test]
    fn job_keys_are_kv_safe_and_fixed() {
        assert_eq!(kv_safe("6f1c-AZ_09="), "6f1c-AZ_09=");
        assert_eq!(kv_safe("a.b*c >é"), "a_b_c___");
        let job: ChannelJob = serde_json::from_value(serde_json::json!({
            "id": "0192e4c1-7b3a-7c2d-9e8f-0123456789ab",
            "seq": 7,
            "user_id": "u",
            "channel": "push",
            "priority": "high",
            "target": "3f2a"
        }))
        .expect("job");
        // Sent markers already stored are found by this key: it must not change.
        assert_eq!(job.key(), "0192e4c1-7b3a-7c2d-9e8f-0123456789ab.push.3f2a");
        let hostile = ChannelJob {
            id: "x.y>".into(),
            ..job
        };
        assert_eq!(hostile.key(), "x_y_.push.3f2a");
    }
}
