//! Configuration: flags > environment (`HERALD_*`) > TOML file (`--config`) > defaults.
//!
//! Everything is read into [`Settings`], then [`Settings::validate`] checks it whole and
//! reports every problem at once; `main` exits with code 2 on any. Tests build the typed
//! configs directly and never touch process environment.

use figment::Figment;
use figment::providers::{Env, Format as _, Serialized, Toml};
use herald_auth::{ApiKey, ApiKeys, JwtConfig, Scope};
use herald_protocol::preferences::{CategoryRule, RateCap};
use herald_protocol::streams::StreamSettings;
use herald_protocol::{Policy, Subjects};
use herald_templates::Templates;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::num::NonZeroU32;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

mod nats;

/// A producer key in the TOML file.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct ApiKeyEntry {
    /// Producer name.
    pub producer: String,
    /// The key in clear text (or give `key_sha256`).
    #[serde(default)]
    pub key: Option<String>,
    /// Hex SHA-256 of the key.
    #[serde(default)]
    pub key_sha256: Option<String>,
    /// Scopes; default `["notify"]`.
    #[serde(default)]
    pub scopes: Option<Vec<String>>,
    /// Notifications per second this producer may send (per api instance).
    pub rate_per_s: Option<u32>,
}

/// Every setting, as read from all sources.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(default)]
pub struct Settings {
    /// HTTP listen address.
    pub http_addr: String,
    /// Where `herald up` keeps the nats-server store and its generated credentials.
    pub data_dir: PathBuf,
    /// NATS server URL(s), comma-separated. `herald up` starts its own when absent.
    pub nats_url: Option<String>,
    /// A `.creds` file (user JWT + nkey seed, operator mode) to authenticate to NATS.
    pub nats_creds_file: Option<PathBuf>,
    /// A file holding the user nkey seed (`SU…`) to authenticate to NATS.
    pub nats_nkey_seed_file: Option<PathBuf>,
    /// A token to authenticate to NATS (file or environment only, never a flag).
    pub nats_token: Option<herald_store::Secret>,
    /// PEM certificate(s) of the CA that signed the NATS servers' certificates.
    pub nats_tls_ca_file: Option<PathBuf>,
    /// Client certificate (PEM) for NATS servers that verify clients (mutual TLS).
    pub nats_tls_cert_file: Option<PathBuf>,
    /// Private key (PEM) of `nats_tls_cert_file`.
    pub nats_tls_key_file: Option<PathBuf>,
    /// Refuse NATS connections without TLS (implied by the TLS files).
    pub nats_require_tls: bool,
    /// A producer key with every scope (the development key).
    pub api_key: Option<String>,
    /// More producer keys, with scopes.
    pub api_keys: Vec<ApiKeyEntry>,
    /// HS256 secret for user tokens.
    pub jwt_secret: Option<String>,
    /// PEM public key for RS256/ES256/EdDSA user tokens.
    pub jwt_public_key: Option<PathBuf>,
    /// Algorithm of `jwt_public_key`: RS256, ES256 or EdDSA.
    pub jwt_algorithm: Option<String>,
    /// Required `aud` of user tokens.
    pub jwt_audience: Option<String>,
    /// Required `iss` of user tokens.
    pub jwt_issuer: Option<String>,
    /// A JWKS document of user-token public keys, picked by `kid`: a file path or an
    /// `https://` URL.
    pub jwt_jwks: Option<String>,
    /// Seconds between reads of `jwt_jwks` (key rotation).
    pub jwt_jwks_refresh_s: u64,
    /// Subject prefix.
    pub subject_prefix: String,
    /// INBOX partitions (fixed once data exists).
    pub partitions: u16,
    /// Stream replicas: 1, or 3 on a cluster.
    pub replicas: usize,
    /// Idempotency window, seconds.
    pub dedup_window_s: u64,
    /// Inbox retention, days.
    pub inbox_days: u64,
    /// WebSocket ping / SSE keep-alive interval, seconds.
    pub heartbeat_s: u64,
    /// Largest notify body, bytes.
    pub body_limit: usize,
    /// WebSocket/SSE upgrades admitted per second per gateway (over it: 503 + Retry-After).
    pub upgrades_per_s: u32,
    /// Longest a read receipt or ack waits before its batched KV write, milliseconds.
    pub receipts_flush_ms: u64,
    /// Development mode: the demo page may mint tokens for any user (`herald up` turns it
    /// on; refused on an address other than loopback).
    pub dev_mode: bool,
    /// SMTP server for the email channel: `smtp://user:pass@host:port` or `smtps://…`.
    pub smtp_url: Option<String>,
    /// Sender of emails (`Name <addr>` or `addr`).
    pub email_from: Option<String>,
    /// AES-256 key sealing contact data (64 hex characters or base64url); derived from
    /// `jwt_secret` when absent (development only).
    pub contact_key: Option<String>,
    /// Earlier contact keys, still accepted for reading (key rotation).
    pub contact_old_keys: Vec<String>,
    /// Public origin of this Herald, for links in emails (`https://herald.example.com`).
    pub public_url: Option<String>,
    /// Jobs in flight per lane and channel in one worker process.
    pub worker_concurrency: usize,
    /// Push waits this long (ms) for a live `ack` before sending; 0 sends at once.
    pub escalation_delay_ms: u64,
    /// A channel job not acked within this many seconds goes to another worker (how soon
    /// a crashed worker's jobs move on; must exceed the provider timeout).
    pub worker_ack_wait_s: u64,
    /// Sends per second per provider (0: unlimited).
    pub provider_rate: u32,
    /// APNs, FCM, SMS and webhook providers (`HERALD_APNS_*`, `HERALD_FCM_*`, ...).
    #[serde(flatten)]
    pub providers: herald_channels::ProvidersConfig,
    /// Notifications per second a producer may send (per api instance) unless its key
    /// sets its own `rate_per_s`; unlimited when unset.
    pub producer_rate_per_s: Option<u32>,
    /// Rate caps: `[[rate_caps]] category = "like"  limit = 10  window_s = 3600`.
    pub rate_caps: Vec<RateCap>,
    /// Length of an `hourly` email digest period, seconds (divides 3600; shorter for
    /// tests and demos).
    pub digest_hourly_s: u64,
    /// The local hour (0–23, in each user's time zone) at which a `daily` email digest
    /// is sent; 0 is midnight. A user's `digest_hour` preference overrides it.
    pub digest_daily_hour: u8,
    /// Topics users may subscribe to themselves: exact names or prefixes ending in `*`.
    pub self_subscribe_topics: Vec<String>,
    /// Subscribers from which a topic publish is stored once (big-topic path) instead of
    /// written into each subscriber's inbox; 0 sends every publish that way.
    pub big_topic_threshold: u64,
    /// Folder of notification templates (`<name>.toml`); none when unset.
    pub templates_dir: Option<PathBuf>,
    /// Notification categories: `[categories.security] critical = true`,
    /// `[categories.marketing.defaults] sms = false`. None configured: any name goes.
    pub categories: BTreeMap<String, CategoryRule>,
}

impl Default for Settings {
    fn default() -> Self {
        Self {
            http_addr: "127.0.0.1:8080".into(),
            data_dir: PathBuf::from(".herald"),
            nats_url: None,
            nats_creds_file: None,
            nats_nkey_seed_file: None,
            nats_token: None,
            nats_tls_ca_file: None,
            nats_tls_cert_file: None,
            nats_tls_key_file: None,
            nats_require_tls: false,
            api_key: None,
            api_keys: Vec::new(),
            jwt_secret: None,
            jwt_public_key: None,
            jwt_algorithm: None,
            jwt_audience: None,
            jwt_issuer: None,
            jwt_jwks: None,
            jwt_jwks_refresh_s: 300,
            subject_prefix: herald_protocol::subjects::DEFAULT_PREFIX.into(),
            partitions: herald_protocol::subjects::DEFAULT_PARTITIONS,
            replicas: 1,
            dedup_window_s: 120,
            inbox_days: 30,
            heartbeat_s: 30,
            body_limit: 64 * 1024,
            upgrades_per_s: herald_gateway::admission::Limits::default().upgrades_per_sec,
            receipts_flush_ms: herald_store::ReceiptsConfig::default()
                .flush_every
                .as_millis() as u64,
            dev_mode: false,
            smtp_url: None,
            email_from: None,
            contact_key: None,
            contact_old_keys: Vec::new(),
            public_url: None,
            worker_concurrency: 64,
            escalation_delay_ms: 5000,
            worker_ack_wait_s: 30,
            provider_rate: 0,
            providers: herald_channels::ProvidersConfig::default(),
            categories: BTreeMap::new(),
            templates_dir: None,
            producer_rate_per_s: None,
            self_subscribe_topics: Vec::new(),
            big_topic_threshold: herald_api::http::DEFAULT_BIG_THRESHOLD,
            rate_caps: Vec::new(),
            digest_hourly_s: herald_protocol::digest::DEFAULT_HOURLY_S,
            digest_daily_hour: herald_protocol::digest::DEFAULT_DAILY_HOUR,
        }
    }
}

/// Configuration that failed to load or validate: every problem found.
#[derive(Debug, thiserror::Error)]
#[error("invalid configuration:\n  - {}", .0.join("\n  - "))]
pub struct ConfigError(pub Vec<String>);

/// The validated, typed configuration.
#[derive(Debug, Clone)]
pub struct Validated {
    /// Listen address.
    pub http_addr: SocketAddr,
    /// Subjects.
    pub subjects: Subjects,
    /// Stream settings.
    pub streams: StreamSettings,
    /// Producer keys.
    pub api_keys: ApiKeys,
    /// User token settings.
    pub jwt: JwtConfig,
    /// The JWKS document of user-token keys, if any (loaded when the mesh starts).
    pub jwks: Option<crate::jwks::JwksSettings>,
    /// API limits.
    pub api: herald_api::ApiConfig,
    /// Gateway tunables.
    pub gateway: herald_gateway::GatewayConfig,
    /// Targets, providers and workers.
    pub channels: crate::channels::ChannelSettings,
    /// Categories, for notify validation and preferences.
    pub policy: Policy,
    /// Loaded templates.
    pub templates: Arc<Templates>,
    /// Producer request rates.
    pub rates: herald_api::RateConfig,
    /// Topic rules.
    pub topics: herald_api::TopicSettings,
    /// NATS credentials and TLS, the same for every connection of every role.
    pub nats: herald_store::NatsOptions,
}

impl Settings {
    /// Loads settings: defaults, then `file`, then `HERALD_*` environment, then `flags`.
    ///
    /// # Errors
    /// [`ConfigError`] when a source cannot be read or a value has the wrong type.
    pub fn load(
        file: Option<&std::path::Path>,
        flags: &impl Serialize,
    ) -> Result<Self, ConfigError> {
        let mut figment = Figment::from(Serialized::defaults(Settings::default()));
        if let Some(file) = file {
            if !file.exists() {
                return Err(ConfigError(vec![format!(
                    "config file {} does not exist",
                    file.display()
                )]));
            }
            figment = figment.merge(Toml::file(file));
        }
        figment = figment.merge(Env::prefixed("HERALD_").only(&ENV_KEYS));
        // Provider and NATS secrets, numbers and paths stay exact strings (figment's Env
        // would parse `+15005550006`, or a token of digits, as a number).
        for (key, value) in Env::prefixed("HERALD_")
            .only(&herald_channels::ENV_KEYS)
            .iter()
            .chain(Env::prefixed("HERALD_").only(&NATS_STRING_KEYS).iter())
        {
            figment = figment.merge(Serialized::default(key.as_str(), value));
        }
        figment = figment.merge(Serialized::defaults(flags));
        figment
            .extract()
            .map_err(|e| ConfigError(e.into_iter().map(|e| e.to_string()).collect()))
    }

    /// Every setting read from the environment, as its key (`HERALD_` + the key in upper
    /// case): the documentation test checks each is in the README.
    pub fn env_keys() -> Vec<&'static str> {
        ENV_KEYS
            .iter()
            .chain(&herald_channels::ENV_KEYS)
            .chain(&NATS_STRING_KEYS)
            .copied()
            .collect()
    }

    /// Checks everything and builds the typed configuration.
    ///
    /// # Errors
    /// [`ConfigError`] listing every problem.
    pub fn validate(&self) -> Result<Validated, ConfigError> {
        let mut errors = Vec::new();
        let http_addr = self
            .http_addr
            .parse::<SocketAddr>()
            .map_err(|e| errors.push(format!("http_addr {:?}: {e}", self.http_addr)))
            .ok();
        if self.dev_mode
            && let Some(addr) = &http_addr
            && !addr.ip().is_loopback()
        {
            errors.push(format!(
                "dev_mode (`herald up`, or HERALD_DEV_MODE) lets anyone mint a token for any user (POST /dev/token): it is only allowed on a loopback http_addr, not {addr}"
            ));
        }
        if self.partitions == 0 || self.partitions > 1024 {
            errors.push(format!(
                "partitions must be 1 to 1024, not {}",
                self.partitions
            ));
        }
        if ![1, 3, 5].contains(&self.replicas) {
            errors.push(format!("replicas must be 1, 3 or 5, not {}", self.replicas));
        }
        let subjects = Subjects::new(&self.subject_prefix, self.partitions)
            .map_err(|e| errors.push(e.to_string()))
            .ok();
        if !(1..=3600).contains(&self.heartbeat_s) {
            errors.push(format!(
                "heartbeat_s must be 1 to 3600, not {}",
                self.heartbeat_s
            ));
        }
        if self.upgrades_per_s == 0 {
            errors.push("upgrades_per_s must be at least 1".into());
        }
        if !(1..=60_000).contains(&self.receipts_flush_ms) {
            errors.push(format!(
                "receipts_flush_ms must be 1 to 60000, not {}",
                self.receipts_flush_ms
            ));
        }
        if !(1..=3650).contains(&self.inbox_days) {
            errors.push(format!(
                "inbox_days must be 1 to 3650, not {}",
                self.inbox_days
            ));
        }
        if self.dedup_window_s > self.inbox_days.saturating_mul(24 * 3600) {
            errors.push("dedup_window_s must not exceed the inbox retention (inbox_days)".into());
        }
        if self.body_limit > 120 * 1024 {
            errors.push(format!(
                "body_limit must be at most 122880 bytes (the inbox stores up to 127 KiB), not {}",
                self.body_limit
            ));
        }
        if self.body_limit < 1024 {
            errors.push("body_limit must be at least 1024 bytes".into());
        }
        if !(1..=7 * 24 * 3600).contains(&self.dedup_window_s) {
            errors.push(format!(
                "dedup_window_s must be 1 to 604800 (a week), not {}",
                self.dedup_window_s
            ));
        }
        for (name, rule) in &self.categories {
            if name.is_empty() || name.len() > herald_protocol::notification::MAX_KEY_BYTES {
                errors.push(format!("categories: name {name:?} must be 1 to 256 bytes"));
            }
            if let Some(w) = rule.group_window_s
                && !(1..=herald_protocol::group::MAX_GROUP_WINDOW_S).contains(&w)
            {
                errors.push(format!(
                    "categories.{name}.group_window_s must be 1 to 86400 seconds, not {w}"
                ));
            }
            if rule.defaults.get(&herald_protocol::Channel::Inbox) == Some(&false) {
                errors.push(format!(
                    "categories.{name}.defaults.inbox: the inbox cannot be off by default; \
                     turn off the interrupting channels instead"
                ));
            }
        }
        let templates = match &self.templates_dir {
            None => Templates::none(),
            Some(dir) => Templates::load(dir).unwrap_or_else(|e| {
                errors.extend(
                    e.0.into_iter()
                        .map(|m| format!("templates_dir {}: {m}", dir.display())),
                );
                Templates::none()
            }),
        };
        for (i, cap) in self.rate_caps.iter().enumerate() {
            if cap.limit == 0 {
                errors.push(format!("rate_caps[{i}].limit must be at least 1"));
            }
            if !(1..=86_400).contains(&cap.window_s) {
                errors.push(format!(
                    "rate_caps[{i}].window_s must be 1 to 86400 (a day), not {}",
                    cap.window_s
                ));
            }
        }
        let digest = herald_protocol::digest::DigestSettings {
            hourly_s: self.digest_hourly_s,
            daily_hour: self.digest_daily_hour,
        };
        if let Err(e) = digest.check() {
            errors.push(e);
        }
        let rates = self.rates(&mut errors);
        let api_keys = self.api_keys(&mut errors);
        let jwks = self.jwks(&mut errors);
        let jwt = self.jwt(jwks.is_some(), &mut errors);
        let channels = self.channels(&mut errors);
        if let Some(url) = &self.nats_url
            && url.trim().is_empty()
        {
            errors.push("nats_url is empty".into());
        }
        let nats = self.nats(&mut errors);
        match (http_addr, subjects) {
            (Some(http_addr), Some(subjects)) if errors.is_empty() => Ok(Validated {
                http_addr,
                subjects,
                streams: StreamSettings {
                    replicas: self.replicas,
                    inbox_max_age: Duration::from_secs(self.inbox_days.max(1) * 24 * 3600),
                    dedup_window: Duration::from_secs(self.dedup_window_s),
                    ..StreamSettings::default()
                },
                api_keys,
                jwt,
                jwks,
                api: herald_api::ApiConfig {
                    body_limit: self.body_limit,
                    ..Default::default()
                },
                gateway: herald_gateway::GatewayConfig {
                    heartbeat: Duration::from_secs(self.heartbeat_s),
                    limits: herald_gateway::admission::Limits {
                        upgrades_per_sec: self.upgrades_per_s,
                        ..Default::default()
                    },
                    receipts: herald_store::ReceiptsConfig {
                        flush_every: Duration::from_millis(self.receipts_flush_ms),
                        ..Default::default()
                    },
                    ..Default::default()
                },
                channels,
                policy: Policy::new(self.categories.clone())
                    .with_caps(self.rate_caps.clone())
                    .with_digest(digest),
                templates: Arc::new(templates),
                rates,
                topics: herald_api::TopicSettings {
                    self_subscribe: self.self_subscribe_topics.clone(),
                    big_threshold: self.big_topic_threshold,
                },
                nats,
            }),
            _ => Err(ConfigError(errors)),
        }
    }

    /// [`Settings::validate`] for `herald worker <channel>`: a channel with no provider
    /// is one more error, since its worker would dead-letter every job it pulls.
    ///
    /// # Errors
    /// [`ConfigError`] listing every problem, that one included.
    pub fn validate_worker(
        &self,
        channel: herald_protocol::Channel,
    ) -> Result<Validated, ConfigError> {
        match self.validate() {
            Ok(v) if v.channels.serves(channel) => Ok(v),
            Ok(_) => Err(ConfigError(vec![crate::channels::no_provider(channel)])),
            Err(mut e) => {
                if !self.names_a_provider_of(channel) {
                    e.0.push(crate::channels::no_provider(channel));
                }
                Err(e)
            }
        }
    }

    /// Whether any provider setting of `channel` is given (it may be invalid: that is
    /// reported on its own).
    fn names_a_provider_of(&self, channel: herald_protocol::Channel) -> bool {
        use herald_protocol::Channel;
        let p = &self.providers;
        match channel {
            Channel::Inbox => true,
            Channel::Email => self.smtp_url.is_some() || self.email_from.is_some(),
            Channel::Push => {
                [
                    &p.apns_url,
                    &p.apns_key_id,
                    &p.apns_team_id,
                    &p.apns_topic,
                    &p.fcm_url,
                ]
                .iter()
                .any(|v| v.is_some())
                    || p.apns_key_file.is_some()
                    || p.fcm_credentials.is_some()
            }
            Channel::Sms => [
                &p.twilio_url,
                &p.twilio_account_sid,
                &p.twilio_auth_token,
                &p.twilio_from,
                &p.vonage_url,
                &p.vonage_api_key,
                &p.vonage_api_secret,
                &p.vonage_from,
            ]
            .iter()
            .any(|v| v.is_some()),
            Channel::Webhook => p.webhook_secret.is_some(),
        }
    }

    fn channels(&self, errors: &mut Vec<String>) -> crate::channels::ChannelSettings {
        use herald_store::targets::ContactKeys;
        let key = match (&self.contact_key, &self.jwt_secret) {
            (Some(raw), _) => ContactKeys::parse_key(raw)
                .map_err(|e| errors.push(format!("contact_key: {e}")))
                .unwrap_or_default(),
            (None, Some(secret)) => derived_contact_key(secret),
            (None, None) if self.dev_mode => derived_contact_key(""),
            (None, None) => {
                // Without a secret to derive it from, the key would be the same public
                // constant in every deployment: contact data readable by anyone with the
                // bucket, unsubscribe links forgeable.
                errors.push(
                    "contact_key (HERALD_CONTACT_KEY) is required when user tokens are verified without jwt_secret (jwt_public_key, jwt_jwks): set it to 64 hex characters, e.g. `openssl rand -hex 32`".into(),
                );
                [0; 32]
            }
        };
        let mut old = Vec::new();
        for (i, raw) in self.contact_old_keys.iter().enumerate() {
            match ContactKeys::parse_key(raw) {
                Ok(k) => old.push(k),
                Err(e) => errors.push(format!("contact_old_keys[{i}]: {e}")),
            }
        }
        let mut channels =
            crate::channels::ChannelSettings::new(key).with_old_contact_keys(key, &old);
        channels.public_url = self.public_url.clone();
        match (&self.smtp_url, &self.email_from) {
            (Some(url), Some(from)) => {
                if let Err(e) = herald_worker::email::SmtpProvider::check(url, from) {
                    errors.push(e.to_string());
                }
                channels.smtp = Some(crate::channels::SmtpSettings {
                    url: url.clone(),
                    from: from.clone(),
                    pool: u32::try_from(self.worker_concurrency.clamp(1, 64)).unwrap_or(8),
                });
            }
            (None, None) => {}
            _ => errors.push("smtp_url and email_from go together".into()),
        }
        if !(1..=10_000).contains(&self.worker_concurrency) {
            errors.push(format!(
                "worker_concurrency must be 1 to 10000, not {}",
                self.worker_concurrency
            ));
        }
        if self.escalation_delay_ms > 3_600_000 {
            errors.push("escalation_delay_ms must be at most 3600000 (an hour)".into());
        }
        if !(1..=3600).contains(&self.worker_ack_wait_s) {
            errors.push(format!(
                "worker_ack_wait_s must be 1 to 3600, not {}",
                self.worker_ack_wait_s
            ));
        }
        channels.queue.ack_wait = Duration::from_secs(self.worker_ack_wait_s.clamp(1, 3600));
        match herald_channels::build(&self.providers) {
            Ok(built) => channels.configured = built,
            Err(e) => errors.extend(e.0),
        }
        channels.concurrency = self.worker_concurrency.max(1);
        channels.escalation_delay = Duration::from_millis(self.escalation_delay_ms);
        channels.provider_limits.rate_per_second = std::num::NonZeroU32::new(self.provider_rate);
        channels
    }

    fn rates(&self, errors: &mut Vec<String>) -> herald_api::RateConfig {
        let mut rates = herald_api::RateConfig::default();
        match self.producer_rate_per_s.map(NonZeroU32::new) {
            Some(None) => errors.push("producer_rate_per_s must be at least 1".into()),
            Some(Some(r)) => rates.default_per_s = Some(r),
            None => {}
        }
        for (i, entry) in self.api_keys.iter().enumerate() {
            match entry.rate_per_s.map(NonZeroU32::new) {
                Some(None) => errors.push(format!("api_keys[{i}].rate_per_s must be at least 1")),
                Some(Some(r)) => {
                    rates.per_producer.insert(entry.producer.clone(), r);
                }
                None => {}
            }
        }
        rates
    }

    fn api_keys(&self, errors: &mut Vec<String>) -> ApiKeys {
        let mut keys = ApiKeys::new();
        if let Some(key) = &self.api_key {
            if key.len() < 16 {
                errors.push("api_key must be at least 16 characters".into());
            }
            keys.insert(
                key,
                ApiKey {
                    producer: "default".into(),
                    scopes: Scope::ALL.to_vec(),
                },
            );
        }
        for (i, entry) in self.api_keys.iter().enumerate() {
            let mut scopes = Vec::new();
            for name in entry
                .scopes
                .clone()
                .unwrap_or_else(|| vec!["notify".into()])
            {
                match Scope::ALL.iter().find(|s| s.as_str() == name) {
                    Some(s) => scopes.push(*s),
                    None => errors.push(format!(
                        "api_keys[{i}].scopes: unknown scope {name:?} (notify, publish, read, admin)"
                    )),
                }
            }
            let api_key = ApiKey {
                producer: entry.producer.clone(),
                scopes,
            };
            match (&entry.key, &entry.key_sha256) {
                (Some(k), None) => keys.insert(k, api_key),
                (None, Some(d)) => {
                    if let Err(e) = keys.insert_digest(d, api_key) {
                        errors.push(format!("api_keys[{i}].key_sha256: {e}"));
                    }
                }
                _ => errors.push(format!(
                    "api_keys[{i}]: give exactly one of key, key_sha256"
                )),
            }
        }
        keys
    }

    fn jwks(&self, errors: &mut Vec<String>) -> Option<crate::jwks::JwksSettings> {
        let value = self.jwt_jwks.as_deref()?;
        match crate::jwks::JwksSource::parse(value) {
            Ok(source) => {
                if let crate::jwks::JwksSource::File(path) = &source {
                    match std::fs::read(path) {
                        Ok(bytes) => {
                            if let Err(e) = herald_auth::Jwks::parse(&bytes) {
                                errors.push(format!("jwt_jwks {}: {e}", path.display()));
                            }
                        }
                        Err(e) => errors.push(format!("jwt_jwks {}: {e}", path.display())),
                    }
                }
                Some(crate::jwks::JwksSettings {
                    source,
                    refresh: Duration::from_secs(self.jwt_jwks_refresh_s.max(1)),
                })
            }
            Err(e) => {
                errors.push(e);
                None
            }
        }
    }

    fn jwt(&self, jwks: bool, errors: &mut Vec<String>) -> JwtConfig {
        let mut jwt = JwtConfig {
            hs256_secret: self.jwt_secret.as_ref().map(|s| s.as_bytes().to_vec()),
            audience: self.jwt_audience.clone(),
            issuer: self.jwt_issuer.clone(),
            ..JwtConfig::default()
        };
        if let Some(s) = &self.jwt_secret
            && s.len() < 32
        {
            errors.push("jwt_secret must be at least 32 characters".into());
        }
        match (&self.jwt_public_key, &self.jwt_algorithm) {
            (None, None) => {}
            (Some(path), Some(alg)) => {
                let alg = match alg.as_str() {
                    "RS256" => Some(jsonwebtoken::Algorithm::RS256),
                    "ES256" => Some(jsonwebtoken::Algorithm::ES256),
                    "EdDSA" => Some(jsonwebtoken::Algorithm::EdDSA),
                    other => {
                        errors.push(format!(
                            "jwt_algorithm {other:?}: use RS256, ES256 or EdDSA"
                        ));
                        None
                    }
                };
                match std::fs::read(path) {
                    Ok(pem) => jwt.public_key = alg.map(|a| (a, pem)),
                    Err(e) => errors.push(format!("jwt_public_key {}: {e}", path.display())),
                }
            }
            _ => errors.push("jwt_public_key and jwt_algorithm go together".into()),
        }
        if jwt.hs256_secret.is_none() && jwt.public_key.is_none() && !jwks {
            errors.push("no way to verify user tokens: set jwt_secret (HERALD_JWT_SECRET), jwt_public_key or jwt_jwks".into());
        }
        if let Err(e) = herald_auth::UserAuth::new(&jwt)
            && jwt.public_key.is_some()
        {
            errors.push(format!("jwt_public_key: {e}"));
        }
        jwt
    }
}

/// The contact key of a deployment without `contact_key`: derived from the JWT secret, so
/// it stays the same across restarts with the same secret.
fn derived_contact_key(jwt_secret: &str) -> [u8; 32] {
    use sha2::Digest as _;
    sha2::Sha256::new()
        .chain_update(b"herald contact key\0")
        .chain_update(jwt_secret)
        .finalize()
        .into()
}

/// Environment keys read (as `HERALD_<KEY>`). Others, like `HERALD_NATS_SERVER`, belong
/// to other parts and are not configuration errors.
const ENV_KEYS: [&str; 38] = [
    "http_addr",
    "data_dir",
    "nats_url",
    "nats_require_tls",
    "api_key",
    "jwt_secret",
    "jwt_public_key",
    "jwt_algorithm",
    "jwt_audience",
    "jwt_issuer",
    "jwt_jwks",
    "jwt_jwks_refresh_s",
    "subject_prefix",
    "partitions",
    "replicas",
    "dedup_window_s",
    "inbox_days",
    "heartbeat_s",
    "body_limit",
    "upgrades_per_s",
    "receipts_flush_ms",
    "dev_mode",
    "api_keys",
    "smtp_url",
    "email_from",
    "contact_key",
    "contact_old_keys",
    "public_url",
    "worker_concurrency",
    "escalation_delay_ms",
    "worker_ack_wait_s",
    "provider_rate",
    "templates_dir",
    "producer_rate_per_s",
    "self_subscribe_topics",
    "big_topic_threshold",
    "digest_hourly_s",
    "digest_daily_hour",
];

/// NATS settings read from the environment as exact strings: a token, and paths.
const NATS_STRING_KEYS: [&str; 6] = [
    "nats_creds_file",
    "nats_nkey_seed_file",
    "nats_token",
    "nats_tls_ca_file",
    "nats_tls_cert_file",
    "nats_tls_key_file",
];

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dev_mode_is_for_loopback_only() {
        let dev = |addr: &str| Settings {
            http_addr: addr.into(),
            dev_mode: true,
            jwt_secret: Some("x".repeat(32)),
            ..Settings::default()
        };
        assert!(dev("127.0.0.1:8080").validate().is_ok());
        let err = dev("0.0.0.0:8080").validate().expect_err("public dev mode");
        assert!(err.to_string().contains("dev_mode"), "{err}");
    }

    #[test]
    fn old_contact_keys_keep_their_unsubscribe_links_valid() {
        let s = Settings {
            jwt_secret: Some("x".repeat(32)),
            contact_key: Some("11".repeat(32)),
            contact_old_keys: vec!["22".repeat(32), "33".repeat(32)],
            ..Settings::default()
        };
        let v = s.validate().expect("valid");
        assert_eq!(v.channels.old_link_keys.len(), 2);
        assert!(!v.channels.old_link_keys.contains(&v.channels.link_key));
    }

    #[test]
    fn every_problem_is_reported_at_once() {
        let s = Settings {
            http_addr: "nowhere".into(),
            partitions: 0,
            replicas: 2,
            jwt_secret: Some("short".into()),
            ..Settings::default()
        };
        let err = s.validate().expect_err("invalid");
        assert_eq!(err.0.len(), 4, "{err}");
    }

    #[test]
    fn group_windows_outside_a_day_are_refused() {
        let mut s = Settings {
            api_key: Some("hk_0123456789abcdef".into()),
            jwt_secret: Some("x".repeat(32)),
            ..Settings::default()
        };
        for (name, window) in [("like", 0), ("follow", 86_401), ("ok", 60)] {
            s.categories.insert(
                name.into(),
                CategoryRule {
                    group_window_s: Some(window),
                    ..CategoryRule::default()
                },
            );
        }
        let err = s.validate().expect_err("invalid windows");
        assert_eq!(err.0.len(), 2, "{err}");
        assert!(
            err.0
                .iter()
                .all(|e| e.contains("group_window_s") && !e.contains("categories.ok")),
            "{err}"
        );
    }

    #[test]
    fn a_daily_digest_hour_outside_the_day_is_refused() {
        let s = Settings {
            api_key: Some("hk_0123456789abcdef".into()),
            jwt_secret: Some("x".repeat(32)),
            digest_daily_hour: 24,
            ..Settings::default()
        };
        let err = s.validate().expect_err("invalid hour");
        assert!(
            err.0.len() == 1 && err.0[0].contains("digest_daily_hour"),
            "{err}"
        );
    }

    #[test]
    fn tokens_without_a_jwt_secret_need_a_contact_key() {
        let jwks = Settings {
            api_key: Some("hk_0123456789abcdef".into()),
            jwt_jwks: Some("https://id.example.com/.well-known/jwks.json".into()),
            ..Settings::default()
        };
        let err = jwks.validate().expect_err("no contact key");
        assert!(
            err.0.len() == 1 && err.0[0].contains("contact_key"),
            "{err}"
        );
        let keyed = Settings {
            contact_key: Some("11".repeat(32)),
            ..jwks.clone()
        };
        assert!(keyed.validate().is_ok());
        let dev = Settings {
            dev_mode: true,
            ..jwks
        };
        assert!(dev.validate().is_ok(), "development derives one");
    }

    /// `herald worker <channel>` without a provider for it would dead-letter its whole
    /// queue: it is refused at start, naming the settings to set, with the other problems.
    #[test]
    fn a_worker_without_a_provider_for_its_channel_is_a_configuration_error() {
        use herald_protocol::Channel;
        let base = Settings {
            api_key: Some("hk_0123456789abcdef".into()),
            jwt_secret: Some("x".repeat(32)),
            ..Settings::default()
        };
        for (channel, names) in [
            (
                Channel::Push,
                &["HERALD_APNS_KEY_FILE", "HERALD_FCM_CREDENTIALS"][..],
            ),
            (Channel::Email, &["HERALD_SMTP_URL", "HERALD_EMAIL_FROM"]),
            (
                Channel::Sms,
                &["HERALD_TWILIO_ACCOUNT_SID", "HERALD_VONAGE_API_KEY"],
            ),
            (Channel::Webhook, &["HERALD_WEBHOOK_SECRET"]),
        ] {
            let err = base.validate_worker(channel).expect_err("no provider");
            assert_eq!(err.0.len(), 1, "{err}");
            for name in names {
                assert!(err.0[0].contains(name), "{channel:?}: {err}");
            }
        }
        // Reported whole: with the other problems, not after they are fixed.
        let broken = Settings {
            partitions: 0,
            ..base.clone()
        };
        let err = broken.validate_worker(Channel::Sms).expect_err("invalid");
        assert_eq!(err.0.len(), 2, "{err}");
        // A configured provider is enough.
        let webhooks = Settings {
            providers: herald_channels::ProvidersConfig {
                webhook_secret: Some("a-webhook-secret-of-some-length".into()),
                ..Default::default()
            },
            ..base.clone()
        };
        assert!(webhooks.validate_worker(Channel::Webhook).is_ok());
        assert!(webhooks.validate_worker(Channel::Sms).is_err());
        let email = Settings {
            smtp_url: Some("smtp://127.0.0.1:25".into()),
            email_from: Some("Herald <herald@example.com>".into()),
            ..base
        };
        assert!(email.validate_worker(Channel::Email).is_ok());
    }

    #[test]
    fn a_valid_config_builds() {
        let s = Settings {
            api_key: Some("hk_0123456789abcdef".into()),
            jwt_secret: Some("x".repeat(32)),
            ..Settings::default()
        };
        let v = s.validate().expect("valid");
        assert_eq!(v.http_addr.port(), 8080);
        assert_eq!(v.api_keys.len(), 1);
    }
}
