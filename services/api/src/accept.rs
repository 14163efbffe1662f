//! The single way a notification enters Herald: validate, assign its id, append it to the
//! user's inbox and wait for JetStream's ack. One durable write; the inbox republishes it
//! live and the router consumes it for the other channels.

use async_nats::jetstream::context::PublishAckFuture;
use bytes::Bytes;
use herald_protocol::group::Joined;
use herald_protocol::notification::{check_idempotency_key, idempotent_id};
use herald_protocol::{
    FieldError, NotifyRequest, Policy, StoredNotification, UserId, ValidatedNotify,
};
use herald_store::keys::body_hash;
use herald_store::{
    AppendAck, Cancelled, Claim, Groups, Inbox, InboxError, KeyRecord, KeyRecords, KeysError,
    PreferenceStore,
};
use herald_templates::Templates;
use std::sync::Arc;
use time::OffsetDateTime;
use uuid::Uuid;

/// A notification JetStream has made durable.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Accepted {
    /// Its id (the first copy's, for a repeated idempotency key).
    pub id: String,
    /// Its inbox position; `None` while it is scheduled (it gets one when it fires).
    pub seq: Option<u64>,
    /// True when this was a repeat of an earlier request.
    pub duplicate: bool,
    /// When it will be sent, RFC 3339, if scheduled.
    pub send_at: Option<String>,
    /// The INBOX stream sequence of what was stored: the inbox position, or the
    /// schedule's message (what a native producer's JetStream ack reports).
    pub stream_seq: u64,
}

/// Why a notification was not accepted.
#[derive(Debug, thiserror::Error)]
pub enum AcceptError {
    /// The request is invalid; nothing was written.
    #[error(transparent)]
    Invalid(#[from] FieldError),
    /// The store did not confirm the write; the caller may retry with the same key.
    #[error(transparent)]
    Store(#[from] InboxError),
}

/// Why an HTTP request with an idempotency key was not prepared ([`Acceptor::prepare_keyed`]).
#[derive(Debug, thiserror::Error)]
pub enum KeyedError {
    /// Invalid, or the store failed, as for any request.
    #[error(transparent)]
    Accept(#[from] AcceptError),
    /// The key named a request with another body within the dedup window: 409.
    #[error("the idempotency key was used for another request within the last {} s", .window.as_secs())]
    Reused {
        /// INBOX's dedup window.
        window: std::time::Duration,
    },
    /// Concurrent requests with the key kept replacing its record: 409, retry.
    #[error("concurrent requests with this idempotency key")]
    Contended,
    /// The key records could not be read or written: 503.
    #[error(transparent)]
    Keys(KeysError),
}

impl From<KeysError> for KeyedError {
    fn from(e: KeysError) -> Self {
        match e {
            KeysError::Contended => Self::Contended,
            e @ KeysError::Unavailable(_) => Self::Keys(e),
        }
    }
}

/// Where a request's idempotency key comes from, and what it does to the id.
#[derive(Debug, Clone, Copy)]
enum KeyMode<'a> {
    /// The id is UUIDv5(producer, key) (`key` wins over the body's): the native path,
    /// whose key is a `Nats-Msg-Id` a JetStream client reuses only within the window.
    Derived(Option<&'a str>),
    /// An HTTP notify (`key`, the header, wins over the body's): recorded, see
    /// [`herald_store::keys`].
    Recorded(Option<&'a str>),
    /// Item `index` of an HTTP batch: recorded under the item's own `idempotency_key`
    /// (as a single notify's), else under the batch's `header` key and the item's index,
    /// in a namespace of their own.
    BatchItem {
        header: Option<&'a str>,
        index: usize,
    },
}

/// Namespace of the records of keys of `POST /v1/notify` (and of batch items' own keys).
const NOTIFY_KEYS: Uuid = Uuid::from_u128(0x3b7e_91c4_0d2a_4f58_a6e1_c9f0_2d84_7b13);

/// Namespace of the records of the keys a batch's `Idempotency-Key` gives its items.
const BATCH_ITEM_KEYS: Uuid = Uuid::from_u128(0x71c0_5e2b_a94d_4c37_8f16_0b3d_e5a2_9c48);

/// What `producer`'s idempotency key `key` (for a batch, with the item's `index`) is
/// recorded under: UUIDv5 in `namespace`, so keys of different kinds (a notify, a
/// batch's items, a topic publish) never meet, and every record key has the same length
/// whatever the key's.
pub(crate) fn key_id(namespace: Uuid, producer: &str, key: &str, index: Option<usize>) -> String {
    let mut name = Vec::with_capacity(producer.len() + key.len() + 22);
    name.extend_from_slice(producer.as_bytes());
    name.push(0);
    name.extend_from_slice(key.as_bytes());
    if let Some(i) = index {
        name.push(0);
        name.extend_from_slice(i.to_string().as_bytes());
    }
    Uuid::new_v5(&namespace, &name).to_string()
}

/// Turns requests into durable inbox entries.
#[derive(Clone, Debug)]
pub struct Acceptor {
    inbox: Inbox,
    policy: Arc<Policy>,
    templates: Arc<Templates>,
    preferences: Option<PreferenceStore>,
    groups: Option<Groups>,
    /// Records of HTTP idempotency keys, opened at the first keyed request (an unkeyed
    /// one never touches them).
    keys: Arc<tokio::sync::OnceCell<KeyRecords>>,
    /// Furthest `send_at` ahead: a schedule waits in the inbox stream, so it must fire
    /// well before the stream's `max_age` removes it.
    schedule_horizon: std::time::Duration,
}

/// How long before the inbox's `max_age` a schedule must fire (the scheduler's own delay,
/// clocks a little apart).
const SCHEDULE_MARGIN: std::time::Duration = std::time::Duration::from_secs(3600);

fn horizon(inbox_max_age: std::time::Duration) -> std::time::Duration {
    let most: std::time::Duration = herald_protocol::notification::MAX_SCHEDULE_AHEAD
        .try_into()
        .unwrap_or(inbox_max_age);
    inbox_max_age
        .min(most + SCHEDULE_MARGIN)
        .saturating_sub(SCHEDULE_MARGIN)
}

/// Recipients' `locale` preferences read ahead for a batch ([`Acceptor::read_locales`]).
#[derive(Debug, Clone, Default)]
pub struct Locales(std::collections::HashMap<UserId, Option<String>>);

/// A validated, rendered notification, before its group is joined and it is encoded.
#[derive(Debug)]
struct Rendered {
    stored: StoredNotification,
    send_at: Option<OffsetDateTime>,
    group_key: Option<String>,
    group_actor: Option<String>,
    template: Option<String>,
    locale: Option<String>,
    vars: serde_json::Map<String, serde_json::Value>,
}

/// Now, Unix milliseconds.
fn unix_ms() -> i64 {
    i64::try_from(OffsetDateTime::now_utc().unix_timestamp_nanos() / 1_000_000).unwrap_or(i64::MAX)
}

/// A [`KeyedError`] of a request whose key is not recorded: only [`KeyedError::Accept`]
/// can happen; anything else would be the store's trouble.
fn derived(e: KeyedError) -> AcceptError {
    match e {
        KeyedError::Accept(e) => e,
        other => AcceptError::Store(InboxError::Unavailable(Box::new(other))),
    }
}

/// A validated notification with its id, ready to append.
#[derive(Debug, Clone)]
pub struct Prepared {
    stored: StoredNotification,
    bytes: Bytes,
    send_at: Option<OffsetDateTime>,
    producer: String,
    /// The answer's `send_at`: `Some` answers `scheduled`. The first answer's, for a
    /// repeat of a recorded key (a schedule retried once its time has passed is sent as
    /// an append now, deduplicated by id, and still answered as scheduled).
    answer_send_at: Option<String>,
}

impl Prepared {
    /// Its id.
    pub fn id(&self) -> &str {
        &self.stored.id
    }

    /// The notification as it would be stored.
    pub fn into_stored(self) -> StoredNotification {
        self.stored
    }
}

impl Acceptor {
    /// An acceptor appending to `inbox`, accepting any category, with no templates.
    pub fn new(inbox: Inbox) -> Self {
        Self {
            inbox,
            policy: Arc::new(Policy::default()),
            templates: Arc::new(Templates::none()),
            preferences: None,
            groups: None,
            keys: Arc::default(),
            schedule_horizon: horizon(std::time::Duration::from_secs(30 * 24 * 3600)),
        }
    }

    /// Refuses a `send_at` the inbox would drop before it fires: with the inbox keeping
    /// notifications for `max_age`, a schedule may be at most `max_age` less an hour ahead
    /// (and never more than 30 days).
    pub fn with_inbox_max_age(mut self, max_age: std::time::Duration) -> Self {
        self.schedule_horizon = horizon(max_age);
        self
    }

    /// Folds notifications that carry a `group_key` (see [`herald_protocol::group`]).
    pub fn with_groups(mut self, groups: Groups) -> Self {
        self.groups = Some(groups);
        self
    }

    /// Checks categories against the configured `policy`.
    pub fn with_policy(mut self, policy: Arc<Policy>) -> Self {
        self.policy = policy;
        self
    }

    /// Renders `template`s, in each recipient's locale from `preferences`.
    pub fn with_templates(
        mut self,
        templates: Arc<Templates>,
        preferences: PreferenceStore,
    ) -> Self {
        self.templates = templates;
        self.preferences = Some(preferences);
        self
    }

    /// The loaded templates.
    pub fn templates(&self) -> &Arc<Templates> {
        &self.templates
    }

    /// The configured categories.
    pub fn policy(&self) -> Arc<Policy> {
        self.policy.clone()
    }

    /// The inbox it appends to.
    pub fn inbox(&self) -> &Inbox {
        &self.inbox
    }

    /// Validates a JSON body, renders its template, and assigns its id. `key` (header)
    /// wins over the body's `idempotency_key`; `producer` namespaces the key.
    ///
    /// # Errors
    /// [`AcceptError::Invalid`] naming the bad field; [`AcceptError::Store`] when the
    /// recipient's locale cannot be read for a template.
    pub async fn prepare(
        &self,
        body: &[u8],
        producer: &str,
        key: Option<&str>,
    ) -> Result<Prepared, AcceptError> {
        self.prepare_for(body, producer, KeyMode::Derived(key), false, None)
            .await
            .map_err(derived)
    }

    /// [`Acceptor::prepare`] for an HTTP request: with an idempotency key (`key`, the
    /// header, wins over the body's `idempotency_key`), the id comes from the key's
    /// record — a new random id for a new key (recorded with KV `create`, so concurrent
    /// requests with one key agree), the recorded id for the same key and body again
    /// within INBOX's dedup window, refused for the same key with another body — and the
    /// answer is the first answer's shape. Without a key the records are not touched.
    ///
    /// # Errors
    /// As [`Acceptor::prepare`]; [`KeyedError::Reused`] for a key used with another body;
    /// [`KeyedError::Contended`]/[`KeyedError::Keys`] when its record cannot be settled.
    pub async fn prepare_keyed(
        &self,
        body: &[u8],
        producer: &str,
        key: Option<&str>,
    ) -> Result<Prepared, KeyedError> {
        self.prepare_for(body, producer, KeyMode::Recorded(key), false, None)
            .await
    }

    /// Reads ahead, in one batched direct get, the locale of every recipient of a
    /// templated notification among `bodies` (the items of a batch), so that
    /// [`Acceptor::prepare_read_ahead`] costs no preference read per item. Bodies that do
    /// not parse, or name no template, are skipped (their own prepare reports them).
    ///
    /// # Errors
    /// [`AcceptError::Store`] when the preferences cannot be read.
    pub async fn read_locales<'a>(
        &self,
        bodies: impl IntoIterator<Item = &'a [u8]>,
    ) -> Result<Locales, AcceptError> {
        #[derive(serde::Deserialize)]
        struct Recipient {
            user_id: Option<String>,
            template: Option<serde::de::IgnoredAny>,
        }
        let Some(prefs) = &self.preferences else {
            return Ok(Locales::default());
        };
        let mut users: Vec<UserId> = bodies
            .into_iter()
            .filter_map(|b| serde_json::from_slice::<Recipient>(b).ok())
            .filter(|r| r.template.is_some())
            .filter_map(|r| UserId::new(r.user_id?).ok())
            .collect();
        users.sort();
        users.dedup();
        if users.is_empty() {
            return Ok(Locales::default());
        }
        let read = prefs
            .get_many(&users)
            .await
            .map_err(|e| InboxError::Unavailable(Box::new(e)))?;
        Ok(Locales(
            read.into_iter().map(|(u, p)| (u, p.locale)).collect(),
        ))
    }

    /// [`Acceptor::prepare_keyed`] for item `index` of a batch, with recipients' locales
    /// read ahead by [`Acceptor::read_locales`] (a recipient missing from them is read as
    /// usual). The item's own `idempotency_key` wins, recorded as a single notify's;
    /// else the batch's `batch_key` (validated by the caller) names the item with its
    /// index, in a namespace no single notify's key reaches.
    ///
    /// # Errors
    /// As [`Acceptor::prepare_keyed`].
    pub async fn prepare_item(
        &self,
        body: &[u8],
        producer: &str,
        batch_key: Option<&str>,
        index: usize,
        locales: &Locales,
    ) -> Result<Prepared, KeyedError> {
        let mode = KeyMode::BatchItem {
            header: batch_key,
            index,
        };
        self.prepare_for(body, producer, mode, false, Some(locales))
            .await
    }

    /// Prepares the notification of a topic publish (its `user_id` a placeholder): a
    /// template renders once per locale it defines (the default texts, and the others in
    /// [`StoredNotification::variants`]; each recipient's copy picks its own, see
    /// [`herald_protocol::locale`]) — the recipients' locales are not read on the
    /// publish path — and `group_key` is refused, since aggregation is per recipient.
    ///
    /// # Errors
    /// As [`Acceptor::prepare`].
    pub async fn prepare_topic(
        &self,
        body: &[u8],
        producer: &str,
        key: Option<&str>,
    ) -> Result<Prepared, AcceptError> {
        self.prepare_for(body, producer, KeyMode::Derived(key), true, None)
            .await
            .map_err(derived)
    }

    async fn prepare_for(
        &self,
        body: &[u8],
        producer: &str,
        mode: KeyMode<'_>,
        topic: bool,
        locales: Option<&Locales>,
    ) -> Result<Prepared, KeyedError> {
        let (mut rendered, record_key) = self.render(body, producer, mode, topic, locales).await?;
        let mut answer_send_at = rendered.stored.send_at.clone();
        // Recorded last, once the request is known valid: a refused request leaves its key
        // free for a corrected one.
        let mut created = None;
        if let Some(record_key) = &record_key {
            let keys = self.keys().await?;
            let candidate = KeyRecord {
                id: rendered.stored.id.clone(),
                hash: body_hash(body),
                send_at: answer_send_at.clone(),
                at_ms: unix_ms(),
            };
            match keys.claim(record_key, &candidate).await? {
                Claim::New(revision) => created = Some((keys, revision)),
                Claim::Held(held) if held.hash == candidate.hash => {
                    rendered.stored.id = held.id;
                    answer_send_at = held.send_at;
                }
                Claim::Held(_) => {
                    return Err(KeyedError::Reused {
                        window: keys.window().await?,
                    });
                }
            }
        }
        match self.encode_joined(&mut rendered).await {
            Ok(bytes) => Ok(Prepared {
                stored: rendered.stored,
                bytes,
                send_at: rendered.send_at,
                producer: producer.to_owned(),
                answer_send_at,
            }),
            Err(e) => {
                if let (Some((keys, revision)), Some(record_key), AcceptError::Invalid(_)) =
                    (created, &record_key, &e)
                    && let Err(release) = keys.release(record_key, revision).await
                {
                    tracing::warn!(error = %release, "an idempotency key of a refused request stays recorded");
                }
                Err(e.into())
            }
        }
    }

    /// The key records, opened at the first keyed request.
    async fn keys(&self) -> Result<&KeyRecords, KeysError> {
        self.keys
            .get_or_try_init(|| KeyRecords::open(&self.inbox.nats().js_consume))
            .await
    }

    /// Validates and renders a request, with its id unless `mode` records its key (then
    /// a new random id, and the key's record key returned beside it).
    async fn render(
        &self,
        body: &[u8],
        producer: &str,
        mode: KeyMode<'_>,
        topic: bool,
        locales: Option<&Locales>,
    ) -> Result<(Rendered, Option<String>), AcceptError> {
        let request = NotifyRequest::from_json(body)?;
        if let KeyMode::Derived(Some(k)) | KeyMode::Recorded(Some(k)) = mode {
            check_idempotency_key("Idempotency-Key", k)?;
        }
        let mut validated: ValidatedNotify = request.validate()?;
        if topic && validated.group_key.is_some() {
            return Err(FieldError::new(
                "group_key",
                "aggregation is per recipient; not supported on topic publishes",
            )
            .into());
        }
        if let Some(category) = &validated.category {
            self.policy.check_category("category", category)?;
        }
        let own_key = validated.idempotency_key.as_deref();
        let (id, record_key) = match mode {
            KeyMode::Derived(key) => match key.or(own_key) {
                Some(k) => (idempotent_id(producer, k), None),
                None => (Uuid::now_v7(), None),
            },
            KeyMode::Recorded(key) => (
                Uuid::now_v7(),
                key.or(own_key)
                    .map(|k| key_id(NOTIFY_KEYS, producer, k, None)),
            ),
            KeyMode::BatchItem { header, index } => (
                Uuid::now_v7(),
                match (own_key, header) {
                    (Some(own), _) => Some(key_id(NOTIFY_KEYS, producer, own, None)),
                    (None, Some(batch)) => {
                        Some(key_id(BATCH_ITEM_KEYS, producer, batch, Some(index)))
                    }
                    (None, None) => None,
                },
            ),
        };
        let send_at = validated.send_at;
        if let Some(at) = send_at
            && at > OffsetDateTime::now_utc() + self.schedule_horizon
        {
            return Err(FieldError::new(
                "send_at",
                format!(
                    "must be at most {} hours ahead: the inbox, which holds the schedule until it fires, keeps notifications for {} hours",
                    self.schedule_horizon.as_secs() / 3600,
                    (self.schedule_horizon + SCHEDULE_MARGIN).as_secs() / 3600
                ),
            )
            .into());
        }
        let template = validated.template.clone();
        let vars = std::mem::take(&mut validated.vars);
        let user = validated.user_id.clone();
        let group_key = validated.group_key.take();
        let group_actor = validated.group_actor.take();
        let mut stored =
            StoredNotification::from_request(validated, id.to_string(), OffsetDateTime::now_utc());
        stored.producer = Some(producer.to_owned());
        let mut locale = None;
        if let Some(name) = &template {
            let texts = if topic {
                // Many recipients: every locale the template has, each copy picks its own.
                let (texts, others) = self.templates.render_all(name, &vars)?;
                stored.variants = others
                    .into_iter()
                    .map(|(l, t)| {
                        let v = t.into_localized(stored.title.as_deref(), stored.body.as_deref());
                        (l, v)
                    })
                    .collect();
                texts
            } else {
                let read_ahead = locales.and_then(|l| l.0.get(&user));
                locale = match (&self.preferences, read_ahead) {
                    (_, Some(locale)) => locale.clone(),
                    (Some(prefs), None) => {
                        prefs
                            .get(&user)
                            .await
                            .map_err(|e| InboxError::Unavailable(Box::new(e)))?
                            .locale
                    }
                    (None, None) => None,
                };
                self.templates.render(name, locale.as_deref(), &vars)?
            };
            // Texts the producer sent themselves win over the template's.
            stored.title = stored.title.or(texts.title);
            stored.body = stored.body.or(texts.body);
            stored.rendered = Some(texts.channels);
            if stored.title.as_deref().is_none_or(str::is_empty)
                && stored.body.as_deref().is_none_or(str::is_empty)
            {
                return Err(FieldError::new(
                    "template",
                    format!("template {name:?} defines neither title nor body"),
                )
                .into());
            }
        }
        Ok((
            Rendered {
                stored,
                send_at,
                group_key,
                group_actor,
                template,
                locale,
                vars,
            },
            record_key,
        ))
    }

    /// `rendered` as it will be stored, joined to its aggregation group if it has one.
    async fn encode_joined(&self, rendered: &mut Rendered) -> Result<Bytes, AcceptError> {
        let stored = &mut rendered.stored;
        Ok(match rendered.group_key.take() {
            None => encode(stored)?,
            Some(key) => {
                // A notification refused here must not count in its group: it is encoded,
                // with the group's text as it will be stored, before the join is written.
                stored.collapse_key = stored.collapse_key.take().or(Some(key.clone()));
                let (group, bytes) = self
                    .join_group(
                        stored,
                        &key,
                        rendered.group_actor.as_deref(),
                        rendered.template.as_deref(),
                        rendered.locale.as_deref(),
                        &rendered.vars,
                    )
                    .await?;
                stored.group = Some(group);
                match bytes {
                    Some(bytes) => bytes,
                    None => encode(stored)?,
                }
            }
        })
    }

    /// Adds `stored` to its aggregation group (compare-and-set in the group bucket) and
    /// returns the group as it stands with it: count, actors, and the folded text from
    /// the template's `group.title`/`group.body` or [`herald_protocol::group::default_folded`];
    /// and `stored` encoded with that group, unless it was in the group already. When
    /// `stored` with the group would be too large to store, the group is left as it was
    /// and the notification refused.
    async fn join_group(
        &self,
        stored: &StoredNotification,
        key: &str,
        actor: Option<&str>,
        template: Option<&str>,
        locale: Option<&str>,
        vars: &serde_json::Map<String, serde_json::Value>,
    ) -> Result<(herald_protocol::group::Group, Option<Bytes>), AcceptError> {
        let Some(groups) = &self.groups else {
            return Err(
                InboxError::Unavailable("aggregation groups are not configured".into()).into(),
            );
        };
        let window = self.policy.group_window_s(stored.category.as_deref());
        let mut encoded = None;
        let now = OffsetDateTime::now_utc().unix_timestamp();
        let joined = groups
            .join(
                &stored.user_id,
                key,
                &stored.id,
                actor,
                now,
                window,
                |state| {
                    let (title, body) = (stored.title.as_deref(), stored.body.as_deref());
                    let mut folded = (None, None);
                    if state.count > 1
                        && let Some(name) = template
                    {
                        let mut all = vars.clone();
                        all.extend(herald_protocol::group::group_vars(
                            state.count,
                            &state.actors,
                        ));
                        folded = self.templates.render_group(name, locale, &all)?;
                    }
                    if folded == (None, None) {
                        folded = herald_protocol::group::default_folded(
                            title,
                            body,
                            state.count,
                            &state.actors,
                        );
                    }
                    (state.title, state.body) = folded;
                    let mut member = stored.clone();
                    member.group = Some(state.snapshot());
                    encoded = Some(encode(&member)?);
                    Ok::<(), FieldError>(())
                },
            )
            .await
            .map_err(|e| InboxError::Unavailable(Box::new(e)))??;
        // A repeat (a retry of a member) changed nothing and checked nothing.
        let encoded = encoded.filter(|_| !matches!(joined, Joined::Repeat(_)));
        Ok((joined.state().snapshot(), encoded))
    }

    /// Appends and waits for the ack.
    ///
    /// # Errors
    /// [`AcceptError::Store`] unless JetStream confirmed the write.
    pub async fn commit(&self, prepared: Prepared) -> Result<Accepted, AcceptError> {
        if prepared.send_at.is_some() {
            if !self.inbox.nats().is_connected() {
                return Err(InboxError::Unavailable("not connected to NATS".into()).into());
            }
            let ack = self.send(&prepared).await?;
            return Self::finish(prepared, ack).await;
        }
        let ack = self
            .inbox
            .append(&prepared.stored, prepared.bytes.clone())
            .await?;
        Ok(accepted(prepared, ack))
    }

    /// Cancels a scheduled notification of `producer` before it fires.
    ///
    /// # Errors
    /// [`AcceptError::Store`] when NATS cannot answer.
    pub async fn cancel(&self, id: &str, producer: &str) -> Result<Cancelled, AcceptError> {
        Ok(self.inbox.cancel_scheduled(id, producer).await?)
    }

    /// Sends the append without waiting, for pipelining; pair with [`Acceptor::finish`].
    ///
    /// # Errors
    /// [`AcceptError::Store`] when the publish cannot be sent.
    pub async fn send(&self, prepared: &Prepared) -> Result<PublishAckFuture, AcceptError> {
        let (stored, bytes) = (&prepared.stored, prepared.bytes.clone());
        Ok(match prepared.send_at {
            Some(at) => {
                self.inbox
                    .send_scheduled(stored, bytes, at, &prepared.producer)
                    .await?
            }
            None => self.inbox.send(stored, bytes).await?,
        })
    }

    /// Sends the append with `reply` as its reply subject: JetStream acks (or refuses) it
    /// straight to whoever waits there, once it is durable, and nothing here waits. With
    /// no `reply` the append is sent and nobody is told.
    ///
    /// # Errors
    /// [`AcceptError::Store`] when the publish cannot be sent.
    pub async fn forward(
        &self,
        prepared: &Prepared,
        reply: Option<async_nats::Subject>,
    ) -> Result<(), AcceptError> {
        let bytes = prepared.bytes.clone();
        let append = match prepared.send_at {
            Some(at) => {
                self.inbox
                    .scheduled_append_of(&prepared.stored, bytes, at, &prepared.producer)?
            }
            None => self.inbox.append_of(&prepared.stored, bytes),
        };
        Ok(self.inbox.forward(append, reply).await?)
    }

    /// Waits for a pipelined append's ack.
    ///
    /// # Errors
    /// [`AcceptError::Store`] unless JetStream confirmed the write.
    pub async fn finish(
        prepared: Prepared,
        ack: PublishAckFuture,
    ) -> Result<Accepted, AcceptError> {
        let ack = ack
            .await
            .map_err(|e| InboxError::Unavailable(Box::new(e)))?;
        Ok(accepted(
            prepared,
            AppendAck {
                seq: ack.sequence,
                duplicate: ack.duplicate,
            },
        ))
    }
}

/// `n` as the inbox stores it; too large to store is a 400 naming the body.
fn encode(n: &StoredNotification) -> Result<Bytes, FieldError> {
    Inbox::encode(n).map_err(|e| FieldError::new("body", e.to_string()))
}

fn accepted(prepared: Prepared, ack: AppendAck) -> Accepted {
    // Answered as scheduled when it was first scheduled: a schedule's stream sequence,
    // or a retry's duplicate of it, is not an inbox position.
    let scheduled = prepared.answer_send_at.is_some();
    Accepted {
        id: prepared.stored.id,
        seq: (!scheduled).then_some(ack.seq),
        duplicate: ack.duplicate,
        send_at: prepared.answer_send_at,
        stream_seq: ack.seq,
    }
}
