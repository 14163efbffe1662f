//! The channel layer of a mesh process: target and status stores, the channel HTTP
//! routes, the router's routing data, and the workers of every channel that has a
//! provider.
//!
//! Providers are registered in [`providers`]: SMTP, then those `herald_channels::build`
//! makes from configuration (APNs, FCM, Twilio, Vonage, webhook), then any given by an
//! embedder or test, each an `Arc<dyn Provider>` with its [`Limits`], in failover order.
//!
//! A channel without a provider gets no worker. A worker would pull every job of its
//! queue and dead-letter it ("no provider accepts this target") without calling anyone;
//! left queued, the jobs go out once a provider is configured. `herald worker <channel>`
//! for such a channel is a configuration error ([`no_provider`]), and a mesh that runs
//! workers logs, once at start, which channels have none.

use futures::future::BoxFuture;
use herald_channels::Provider;
use herald_protocol::{Channel, Subjects};
use herald_store::targets::ContactKeys;
use herald_store::{Nats, StatusStore, Targets};
use herald_worker::backoff::Backoff;
use herald_worker::dlq::Dlq;
use herald_worker::email::SmtpProvider;
use herald_worker::optout::OptOut;
use herald_worker::unsubscribe::Links;
use herald_worker::{Hooks, LaneBudget, Limits, NoHooks, Providers, WorkerConfig, WorkerDeps};
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

/// SMTP configuration.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SmtpSettings {
    /// `smtp://user:pass@host:port` or `smtps://…`.
    pub url: String,
    /// Sender (`Name <addr>` or `addr`).
    pub from: String,
    /// Pooled connections.
    pub pool: u32,
}

/// Everything the channel layer is configured with.
#[derive(Clone)]
pub struct ChannelSettings {
    /// Contact-data encryption keys (current first).
    pub contact_keys: ContactKeys,
    /// Key signing unsubscribe links.
    pub link_key: Vec<u8>,
    /// Keys that signed links before a contact-key rotation: links already mailed keep
    /// working.
    pub old_link_keys: Vec<Vec<u8>>,
    /// Public origin for links in emails; `http://<listen address>` when absent.
    pub public_url: Option<String>,
    /// The email provider, when configured.
    pub smtp: Option<SmtpSettings>,
    /// Send rate per provider (token bucket), when limited.
    pub provider_limits: Limits,
    /// Providers built from configuration (APNs, FCM, Twilio, Vonage, webhook), in
    /// failover order, registered after SMTP.
    pub configured: Vec<Arc<dyn Provider>>,
    /// Providers registered after the configured ones (embedders and tests).
    pub extra_providers: Vec<(Arc<dyn Provider>, Limits)>,
    /// Run workers in this process: for `channels` only, or every channel with a provider.
    pub run_workers: bool,
    /// The channels to work (None: every channel that has a provider).
    pub channels: Option<Vec<Channel>>,
    /// Jobs in flight per lane (normal; high as much, low a quarter).
    pub concurrency: usize,
    /// Push waits this long for a live `ack` before sending.
    pub escalation_delay: Duration,
    /// Consumer settings.
    pub queue: herald_store::provision::WorkerQueue,
    /// Transient-failure back-off.
    pub backoff: Backoff,
    /// Provider call timeout.
    pub send_timeout: Duration,
    /// How long a job whose state could not be read waits before it comes back.
    pub store_retry: Duration,
    /// Fault injection (tests).
    pub hooks: Arc<dyn Hooks>,
}

impl std::fmt::Debug for ChannelSettings {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ChannelSettings")
            .field("public_url", &self.public_url)
            .field("smtp", &self.smtp.as_ref().map(|s| &s.from))
            .field(
                "configured",
                &self
                    .configured
                    .iter()
                    .map(|p| p.name().to_string())
                    .collect::<Vec<_>>(),
            )
            .field("extra_providers", &self.extra_providers.len())
            .field("run_workers", &self.run_workers)
            .field("channels", &self.channels)
            .field("concurrency", &self.concurrency)
            .field("escalation_delay", &self.escalation_delay)
            .finish_non_exhaustive()
    }
}

/// The settings that give `channel` a provider, for messages that tell what to set.
pub fn provider_settings(channel: Channel) -> &'static str {
    match channel {
        Channel::Push => {
            "APNs for iOS devices (HERALD_APNS_KEY_FILE, HERALD_APNS_KEY_ID, HERALD_APNS_TEAM_ID, \
             HERALD_APNS_TOPIC) and/or FCM for Android and web devices (HERALD_FCM_CREDENTIALS)"
        }
        Channel::Email => "HERALD_SMTP_URL and HERALD_EMAIL_FROM",
        Channel::Sms => {
            "Twilio (HERALD_TWILIO_ACCOUNT_SID, HERALD_TWILIO_AUTH_TOKEN, HERALD_TWILIO_FROM) \
             and/or Vonage (HERALD_VONAGE_API_KEY, HERALD_VONAGE_API_SECRET, HERALD_VONAGE_FROM)"
        }
        Channel::Webhook => "HERALD_WEBHOOK_SECRET",
        // Written by the router itself; never a worker's.
        Channel::Inbox => "nothing (the inbox needs no provider)",
    }
}

/// The configuration error of `herald worker <channel>` when `channel` has no provider.
pub fn no_provider(channel: Channel) -> String {
    let name = channel.as_str();
    format!(
        "herald worker {name}: no {name} provider is configured, and a worker without one \
         would dead-letter every job it pulls; set {} (see README.md, \"Providers\")",
        provider_settings(channel)
    )
}

/// The unsubscribe-link key derived from a contact key.
fn link_key(contact_key: &[u8; 32]) -> Vec<u8> {
    use sha2::Digest as _;
    sha2::Sha256::new()
        .chain_update(b"herald unsubscribe links\0")
        .chain_update(contact_key)
        .finalize()
        .to_vec()
}

impl ChannelSettings {
    /// The contact key, and the `old` ones it replaced: contact data sealed with an old
    /// key is still read, and unsubscribe links signed with one still verify.
    pub fn with_old_contact_keys(mut self, current: [u8; 32], old: &[[u8; 32]]) -> Self {
        self.contact_keys = ContactKeys::new(current, old);
        self.old_link_keys = old.iter().map(link_key).collect();
        self
    }

    /// Whether `channel` has a provider: SMTP for email, or one built from configuration
    /// or given by an embedder. The inbox needs none.
    pub fn serves(&self, channel: Channel) -> bool {
        channel == Channel::Inbox
            || (channel == Channel::Email && self.smtp.is_some())
            || self.configured.iter().any(|p| p.channel() == channel)
            || self
                .extra_providers
                .iter()
                .any(|(p, _)| p.channel() == channel)
    }

    /// Defaults around one contact key (links are signed with a key derived from it).
    pub fn new(contact_key: [u8; 32]) -> Self {
        Self {
            contact_keys: ContactKeys::new(contact_key, &[]),
            link_key: link_key(&contact_key),
            old_link_keys: Vec::new(),
            public_url: None,
            smtp: None,
            provider_limits: Limits::default(),
            configured: Vec::new(),
            extra_providers: Vec::new(),
            run_workers: true,
            channels: None,
            concurrency: 64,
            escalation_delay: Duration::from_secs(5),
            queue: herald_store::provision::WorkerQueue::default(),
            backoff: Backoff::default(),
            send_timeout: Duration::from_secs(15),
            store_retry: herald_worker::job::STORE_RETRY,
            hooks: Arc::new(NoHooks),
        }
    }
}

/// Why the channel layer could not start.
#[derive(Debug, thiserror::Error)]
pub enum ChannelsError {
    /// A bucket is missing or NATS failed.
    #[error("opening {0} (run `herald provision`)")]
    Open(
        &'static str,
        #[source] Box<dyn std::error::Error + Send + Sync>,
    ),
    /// A provider is misconfigured.
    #[error(transparent)]
    Smtp(#[from] herald_worker::email::SmtpConfigError),
    /// A worker failed.
    #[error(transparent)]
    Worker(#[from] herald_worker::WorkerError),
}

/// Every configured provider, in failover order per channel. Providers of other kinds
/// register here the same way: build, then `providers.register(Arc::new(p), limits)`.
///
/// # Errors
/// [`ChannelsError`] when a provider's configuration is invalid.
pub fn providers(settings: &ChannelSettings) -> Result<Providers, ChannelsError> {
    let mut providers = Providers::new();
    if let Some(smtp) = &settings.smtp {
        let provider = SmtpProvider::new(&smtp.url, &smtp.from, smtp.pool)?;
        providers.register(Arc::new(provider), settings.provider_limits);
    }
    for provider in &settings.configured {
        providers.register(provider.clone(), settings.provider_limits);
    }
    for (provider, limits) in &settings.extra_providers {
        providers.register(provider.clone(), *limits);
    }
    Ok(providers)
}

/// The opened channel layer.
#[derive(Debug, Clone)]
pub struct Channels {
    nats: Nats,
    subjects: Subjects,
    settings: ChannelSettings,
    targets: Targets,
    status: StatusStore,
    optout: OptOut,
    links: Links,
    providers: Arc<Providers>,
    seen: async_nats::jetstream::kv::Store,
    reads: async_nats::jetstream::kv::Store,
}

impl Channels {
    /// Opens the stores and builds the providers.
    ///
    /// # Errors
    /// [`ChannelsError`] when a bucket is missing or a provider misconfigured.
    pub async fn open(
        nats: &Nats,
        subjects: &Subjects,
        settings: &ChannelSettings,
        policy: Arc<herald_protocol::Policy>,
        addr: SocketAddr,
    ) -> Result<Self, ChannelsError> {
        let js = &nats.js_consume;
        let targets = Targets::open(js, settings.contact_keys.clone())
            .await
            .map_err(|e| ChannelsError::Open("the target store", Box::new(e)))?;
        let status = StatusStore::open(js)
            .await
            .map_err(|e| ChannelsError::Open("the status store", Box::new(e)))?;
        let optout = OptOut::open(js, policy)
            .await
            .map_err(|e| ChannelsError::Open("the preference store", Box::new(e)))?;
        let seen = js
            .get_key_value(herald_protocol::streams::SEEN_BUCKET)
            .await
            .map_err(|e| ChannelsError::Open("the seen positions", Box::new(e)))?;
        let reads = js
            .get_key_value(herald_protocol::streams::READS_BUCKET)
            .await
            .map_err(|e| ChannelsError::Open("the read positions", Box::new(e)))?;
        let base = settings
            .public_url
            .clone()
            .unwrap_or_else(|| format!("http://{addr}"));
        Ok(Self {
            nats: nats.clone(),
            subjects: subjects.clone(),
            links: Links::new(&settings.link_key, &base).with_old_keys(&settings.old_link_keys),
            providers: Arc::new(providers(settings)?),
            settings: settings.clone(),
            targets,
            status,
            optout,
            seen,
            reads,
        })
    }

    /// The channel routes (devices, contacts, status, DLQ, pause, unsubscribe).
    pub fn routes(&self, auth: herald_api::Authenticator) -> axum::Router {
        herald_worker::http::routes(herald_worker::http::ChannelsState {
            auth,
            nats: self.nats.clone(),
            targets: self.targets.clone(),
            status: self.status.clone(),
            dlq: Dlq::new(self.nats.clone(), self.subjects.clone()),
            optout: self.optout.clone(),
            links: self.links.clone(),
            seen: self.seen.clone(),
            reads: self.reads.clone(),
        })
    }

    /// Where users can be reached (devices and sealed contacts).
    pub fn targets(&self) -> &Targets {
        &self.targets
    }

    /// Delivery status and sent markers.
    pub fn status(&self) -> &StatusStore {
        &self.status
    }

    /// What the router needs, with the templates it renders digests with.
    pub fn routing(
        &self,
        templates: std::sync::Arc<herald_templates::Templates>,
    ) -> herald_router::Routing {
        herald_router::Routing {
            targets: self.targets.clone(),
            status: self.status.clone(),
            templates,
        }
    }

    /// The worker loops to run in this process, each until `stop`.
    pub fn workers(
        &self,
        stop: tokio_util::sync::CancellationToken,
    ) -> Vec<BoxFuture<'static, Result<(), ChannelsError>>> {
        if !self.settings.run_workers {
            return Vec::new();
        }
        let wanted = self
            .settings
            .channels
            .clone()
            .unwrap_or_else(|| herald_protocol::streams::WORK_CHANNELS.to_vec());
        let (channels, unserved): (Vec<Channel>, Vec<Channel>) = wanted
            .into_iter()
            .filter(|c| *c != Channel::Inbox)
            .partition(|c| self.providers.serves(*c));
        if !unserved.is_empty() {
            let names: Vec<&str> = unserved.iter().map(|c| c.as_str()).collect();
            let settings: Vec<String> = unserved
                .iter()
                .map(|c| format!("{}: {}", c.as_str(), provider_settings(*c)))
                .collect();
            tracing::warn!(
                channels = %names.join(","),
                "no provider is configured for {}: these channels get no worker, and their jobs \
                 stay queued until one is; set {}",
                names.join(", "),
                settings.join("; ")
            );
        }
        let deps = WorkerDeps {
            nats: self.nats.clone(),
            subjects: self.subjects.clone(),
            targets: self.targets.clone(),
            status: self.status.clone(),
            providers: self.providers.clone(),
            links: Some(self.links.clone()),
            optout: Some(self.optout.clone()),
            hooks: self.settings.hooks.clone(),
        };
        channels
            .into_iter()
            .map(|channel| {
                let config = WorkerConfig {
                    budget: LaneBudget::from_concurrency(self.settings.concurrency),
                    queue: self.settings.queue,
                    escalation_delay: self.settings.escalation_delay,
                    send_timeout: self.settings.send_timeout,
                    store_retry: self.settings.store_retry,
                    backoff: self.settings.backoff,
                    ..WorkerConfig::new(channel)
                };
                let (deps, stop) = (deps.clone(), stop.clone());
                let fut: BoxFuture<'static, Result<(), ChannelsError>> = Box::pin(async move {
                    herald_worker::run(config, deps, stop.cancelled_owned())
                        .await
                        .map_err(ChannelsError::from)
                });
                fut
            })
            .collect()
    }
}
