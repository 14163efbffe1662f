//! Assembles Herald's services into one running process: any mix of api, gateway, router
//! and native ingest over one set of NATS connections, served on one listener.

use crate::ops;
use axum::Router;
use backon::{ExponentialBuilder, Retryable as _};
use herald_api::{Acceptor, ApiConfig, ApiState, Authenticator};
use herald_auth::{ApiKeys, JwtConfig, UserAuth};
use herald_gateway::{GatewayConfig, GatewayState};
use herald_protocol::streams::StreamSettings;
use herald_protocol::{Policy, Subjects};
use herald_store::{FanoutLog, Inbox, PreferenceStore, ReadPositions, Subscriptions};
use herald_templates::Templates;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;
use tokio::net::TcpListener;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

/// Which services this process runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Roles {
    /// Producer API and user writes.
    pub api: bool,
    /// WebSocket, SSE, long-poll.
    pub gateway: bool,
    /// INBOX → channel jobs.
    pub router: bool,
    /// Native `herald.notify` responder.
    pub ingest: bool,
}

impl Roles {
    /// Everything: what `herald up` runs.
    pub const ALL: Roles = Roles {
        api: true,
        gateway: true,
        router: true,
        ingest: true,
    };

    /// The producer API alone (`herald api` without ingest).
    pub const API: Roles = Roles {
        api: true,
        gateway: false,
        router: false,
        ingest: false,
    };

    /// The router (and fan-out worker) alone: `herald router`.
    pub const ROUTER: Roles = Roles {
        api: false,
        gateway: false,
        router: true,
        ingest: false,
    };
}

/// Everything needed to run a mesh process.
#[derive(Debug, Clone)]
pub struct MeshOptions {
    /// NATS URL(s).
    pub nats_url: String,
    /// NATS credentials and TLS.
    pub nats: herald_store::NatsOptions,
    /// Connection name prefix (shows in NATS monitoring).
    pub name: String,
    /// Subject scheme.
    pub subjects: Subjects,
    /// Stream settings, for provisioning.
    pub streams: StreamSettings,
    /// Provision streams before serving.
    pub provision: bool,
    /// Producer keys.
    pub api_keys: ApiKeys,
    /// User token verification.
    pub jwt: JwtConfig,
    /// A JWKS document of user-token keys, loaded at start and read again periodically.
    pub jwks: Option<crate::jwks::JwksSettings>,
    /// API limits.
    pub api: ApiConfig,
    /// Gateway tunables.
    pub gateway: GatewayConfig,
    /// Services to run.
    pub roles: Roles,
    /// Serve the demo page and its token minting.
    pub dev_mode: bool,
    /// Targets, providers and workers.
    pub channels: crate::channels::ChannelSettings,
    /// Configured categories, applied with each user's preferences.
    pub policy: Arc<Policy>,
    /// Notification templates.
    pub templates: Arc<Templates>,
    /// Producer request rates.
    pub rates: herald_api::RateConfig,
    /// Topic rules.
    pub topics: herald_api::TopicSettings,
}

/// Why the mesh could not start or stopped with an error.
#[derive(Debug, thiserror::Error)]
pub enum MeshError {
    /// A bad NATS URL or options, or NATS refused the credentials or TLS.
    #[error(transparent)]
    Connect(#[from] herald_store::ConnectError),
    /// NATS did not become reachable in time.
    #[error(
        "NATS at {url} did not accept a connection within {waited:?}{}; is nats-server running? (`herald up` starts one)",
        last.as_ref().map(|e| format!(" (last error: {e})")).unwrap_or_default()
    )]
    NatsTimeout {
        /// The URL, credentials masked.
        url: String,
        /// How long it was waited for.
        waited: Duration,
        /// The last connection error, if any.
        last: Option<String>,
    },
    /// Provisioning failed.
    #[error(transparent)]
    Provision(#[from] herald_store::ProvisionError),
    /// The read-position bucket is missing.
    #[error("opening read positions (run `herald provision`)")]
    Reads(#[source] herald_store::reads::ReadsError),
    /// The preferences bucket could not be opened.
    #[error("opening the preferences bucket; run `herald provision`")]
    Preferences(#[source] herald_store::PreferencesError),
    /// The aggregation group bucket could not be opened.
    #[error("opening the aggregation group bucket; run `herald provision`")]
    Groups(#[source] herald_store::GroupsError),
    /// User auth misconfigured.
    #[error("user token configuration")]
    Jwt(#[from] herald_auth::JwtError),
    /// The JWKS document could not be loaded.
    #[error("user token keys (jwt_jwks): {0}")]
    Jwks(String),
    /// The HTTP server failed.
    #[error("http server")]
    Http(#[source] std::io::Error),
    /// The router failed.
    #[error(transparent)]
    Router(#[from] herald_router::RouterError),
    /// The fan-out worker failed.
    #[error(transparent)]
    Fanout(#[from] herald_fanout::FanoutError),
    /// The fan-out progress bucket could not be opened.
    #[error("opening the fan-out progress bucket; run `herald provision`")]
    FanoutLog(#[source] herald_store::TopicsError),
    /// The inbox stream is missing or was written with another layout.
    #[error("{0}")]
    Layout(String),
    /// The gateway could not subscribe to live subjects.
    #[error(transparent)]
    Hub(#[from] herald_gateway::HubError),
    /// Native ingest failed.
    #[error("native ingest")]
    Ingest(#[source] async_nats::SubscribeError),
    /// The channel layer (targets, providers, workers) failed.
    #[error(transparent)]
    Channels(#[from] crate::channels::ChannelsError),
}

/// A running mesh process.
#[derive(Debug)]
pub struct Mesh {
    addr: SocketAddr,
    hub: Option<herald_gateway::Hub>,
    stop: CancellationToken,
    tasks: JoinSet<Result<(), MeshError>>,
    /// Closed once the services have stopped: background tasks keep clones of the clients,
    /// which would otherwise go on reconnecting (and logging it) while `herald up` stops
    /// its nats-server.
    nats: herald_store::Nats,
}

/// How long to wait for NATS at start.
const NATS_WAIT: Duration = Duration::from_secs(30);
/// How long in-flight work gets to finish at shutdown: HTTP requests, and the channel
/// workers' jobs, which may be in a provider call of up to its send timeout (15 s) and
/// must then write their sent marker (see `herald_worker::WorkerConfig::drain_grace`).
const DRAIN_GRACE: Duration = Duration::from_secs(20);

impl Mesh {
    /// Connects, provisions if asked, and starts serving on `listener`.
    ///
    /// # Errors
    /// [`MeshError`] when NATS is unreachable or misprovisioned, or auth is misconfigured.
    pub async fn start(opts: MeshOptions, listener: TcpListener) -> Result<Mesh, MeshError> {
        // Before any part takes a metric handle (see `ops::prometheus`).
        let _ = ops::prometheus();
        let addr = listener.local_addr().map_err(MeshError::Http)?;
        let nats = herald_store::connect_with(&opts.nats_url, &opts.nats, &opts.name).await?;
        wait_connected(&nats, &opts.nats_url).await?;
        if opts.provision {
            // Provisioning is idempotent, so a request NATS did not answer in time (a
            // cluster electing leaders, a busy server) is simply made again; an
            // incompatible stream is not retried.
            let report =
                (|| herald_store::provision(&nats.js_consume, &opts.subjects, &opts.streams))
                    .retry(
                        ExponentialBuilder::default()
                            .with_min_delay(Duration::from_millis(500))
                            .with_max_times(4)
                            .with_jitter(),
                    )
                    .when(|e| matches!(e, herald_store::ProvisionError::Nats { .. }))
                    .notify(|e, after| {
                        tracing::warn!(error = %e, ?after, "provisioning failed; retrying");
                    })
                    .await?;
            tracing::info!(created = ?report.created, updated = ?report.updated, "provisioned");
        }
        check_layout(&nats, &opts.subjects).await?;
        let reads = ReadPositions::open(&nats.js_consume)
            .await
            .map_err(MeshError::Reads)?;
        let seen = ReadPositions::open_seen(&nats.js_consume)
            .await
            .map_err(MeshError::Reads)?;
        let inbox = Inbox::new(nats.clone(), opts.subjects.clone());
        let subscriptions = Subscriptions::new(nats.clone(), opts.subjects.clone());
        let preferences = PreferenceStore::open(&nats.js_consume)
            .await
            .map_err(MeshError::Preferences)?;
        let acceptor = Acceptor::new(inbox.clone())
            .with_inbox_max_age(opts.streams.inbox_max_age)
            .with_policy(opts.policy.clone())
            .with_templates(opts.templates.clone(), preferences.clone())
            .with_groups(
                herald_store::Groups::open(&nats.js_consume)
                    .await
                    .map_err(MeshError::Groups)?,
            );
        let mut jwt = opts.jwt.clone();
        // Only a mesh that reads a JWKS document needs a client for it.
        let jwks_http = match &opts.jwks {
            Some(_) => Some(crate::jwks::client().map_err(MeshError::Jwks)?),
            None => None,
        };
        if let (Some(jwks), Some(http)) = (&opts.jwks, &jwks_http)
            && jwt.jwks.is_none()
        {
            jwt.jwks = Some(jwks.load_at_start(http).await.map_err(MeshError::Jwks)?);
        }
        let auth = Authenticator {
            keys: Arc::new(opts.api_keys.clone()),
            users: UserAuth::new(&jwt)?,
        };
        let channels = crate::channels::Channels::open(
            &nats,
            &opts.subjects,
            &opts.channels,
            opts.policy.clone(),
            addr,
        )
        .await?;
        let stop = CancellationToken::new();
        let mut tasks = JoinSet::new();
        // One receipt batcher per process; at shutdown it writes what it holds before the
        // mesh reports stopped.
        let sink = herald_store::receipts::KvSink {
            inbox: inbox.clone(),
            reads: reads.clone(),
            seen: seen.clone(),
        };
        let (receipts, batcher) = herald_store::Receipts::start(
            sink,
            opts.gateway.receipts,
            stop.clone().cancelled_owned(),
        );
        let batcher_stop = stop.clone();
        tasks.spawn(async move {
            if let Err(e) = batcher.await {
                tracing::error!(error = %e, "receipt batcher failed");
            }
            // The batcher also ends when nothing in this process can send receipts (a
            // worker or router process drops every handle at once); the first task to end
            // stops the mesh, so this one must only end with it.
            batcher_stop.cancelled().await;
            Ok(())
        });
        if let (Some(settings), Some(handle), Some(jwks_http)) =
            (opts.jwks.clone(), auth.users.jwks().cloned(), jwks_http)
        {
            let stop = stop.clone();
            tasks.spawn(async move {
                crate::jwks::refresh(settings, handle, jwks_http, stop).await;
                Ok(())
            });
        }
        let mut app = Router::new().merge(ops::routes(nats.clone()));
        if opts.roles.api {
            app = app.merge(herald_api::routes(ApiState {
                acceptor: acceptor.clone(),
                auth: auth.clone(),
                reads: reads.clone(),
                seen,
                receipts: receipts.clone(),
                preferences: preferences.clone(),
                rates: Arc::new(herald_api::ProducerRates::new(opts.rates.clone())),
                subscriptions: subscriptions.clone(),
                targets: channels.targets().clone(),
                status: channels.status().clone(),
                fanouts: FanoutLog::open(&nats.js_consume)
                    .await
                    .map_err(MeshError::FanoutLog)?,
                topics: Arc::new(opts.topics.clone()),
                config: opts.api,
            }));
            app = app.merge(channels.routes(auth.clone()));
        }
        let mut gateway_hub = None;
        if opts.roles.gateway {
            let hub = herald_gateway::Hub::start(inbox.clone()).await?;
            gateway_hub = Some(hub.clone());
            app = app.merge(herald_gateway::routes(
                GatewayState::new(
                    inbox.clone(),
                    reads.clone(),
                    receipts,
                    hub,
                    auth.clone(),
                    opts.gateway,
                    stop.clone(),
                )
                .with_topics(herald_gateway::Topics {
                    subscriptions: subscriptions.clone(),
                    settings: Arc::new(opts.topics.clone()),
                }),
            ));
        }
        if opts.dev_mode {
            app = app.merge(crate::page::routes(acceptor.clone(), auth.clone()));
        }
        if auth.users.jwks().is_some() {
            app = app.layer(axum::middleware::from_fn_with_state(
                auth.clone(),
                herald_api::auth::refetch_unknown_keys,
            ));
        }
        // 5xx answers log themselves once, with their cause (`AppError::unavailable`,
        // `AppError::internal`); an admission refusal is counted, not logged. At ERROR
        // here a reconnect storm wrote one line per refused upgrade.
        let app = app.layer(axum::middleware::from_fn(herald_api::error::json_errors));
        // The span names the path and query with `access_token` redacted: the default
        // one records the whole URI, a browser's user token included.
        let app = app.layer(
            tower_http::trace::TraceLayer::new_for_http()
                .make_span_with(|request: &axum::http::Request<_>| {
                    tracing::debug_span!(
                        "request",
                        method = %request.method(),
                        uri = %herald_api::auth::redacted_uri(request.uri()),
                        version = ?request.version(),
                    )
                })
                .on_failure(
                    tower_http::trace::DefaultOnFailure::new().level(tracing::Level::DEBUG),
                ),
        );
        let http_stop = stop.clone();
        // Small frames must leave at once: without TCP_NODELAY, Nagle's algorithm holds
        // a WebSocket frame back until the previous one is acked (tens of milliseconds).
        let listener = axum::serve::ListenerExt::tap_io(listener, |tcp| {
            if let Err(e) = tcp.set_nodelay(true) {
                tracing::debug!(error = %e, "TCP_NODELAY not set");
            }
        });
        tasks.spawn(async move {
            axum::serve(listener, app)
                .with_graceful_shutdown(async move { http_stop.cancelled().await })
                .await
                .map_err(MeshError::Http)
        });
        if opts.roles.router {
            let (router_nats, subjects, router_stop) =
                (nats.clone(), opts.subjects.clone(), stop.clone());
            let policy = opts.policy.clone();
            let routing = channels.routing(opts.templates.clone());
            tasks.spawn(async move {
                herald_router::run(
                    router_nats,
                    subjects,
                    policy,
                    routing,
                    router_stop.cancelled_owned(),
                )
                .await
                .map_err(MeshError::from)
            });
            let (nats, inbox, subscriptions, stop) = (
                nats.clone(),
                inbox.clone(),
                subscriptions.clone(),
                stop.clone(),
            );
            let policy = opts.policy.clone();
            tasks.spawn(async move {
                herald_fanout::run(nats, inbox, subscriptions, policy, stop.cancelled_owned())
                    .await
                    .map_err(MeshError::from)
            });
        }
        for worker in channels.workers(stop.clone()) {
            tasks.spawn(async move { worker.await.map_err(MeshError::from) });
        }
        if opts.roles.ingest {
            let stop = stop.clone();
            // Subscribed before `start` returns: a producer may publish at once.
            let listening = herald_api::ingest::listen(acceptor)
                .await
                .map_err(MeshError::Ingest)?;
            tasks.spawn(async move {
                listening.run(stop.cancelled_owned()).await;
                Ok(())
            });
        }
        tracing::info!(%addr, roles = ?opts.roles, "herald serving");
        Ok(Mesh {
            addr,
            hub: gateway_hub,
            stop,
            tasks,
            nats,
        })
    }

    /// The address served.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// The gateway's live hub, when this process runs the gateway.
    pub fn hub(&self) -> Option<&herald_gateway::Hub> {
        self.hub.as_ref()
    }

    /// A token that stops the mesh when cancelled.
    pub fn stop_token(&self) -> CancellationToken {
        self.stop.clone()
    }

    /// Runs until `shutdown` is cancelled or a service fails, then drains.
    ///
    /// # Errors
    /// The first service error.
    pub async fn run_until(mut self, shutdown: CancellationToken) -> Result<(), MeshError> {
        let first = tokio::select! {
            _ = shutdown.cancelled() => None,
            done = self.tasks.join_next() => done,
        };
        self.stop.cancel();
        let mut result = match first {
            Some(Ok(Err(e))) => Err(e),
            _ => Ok(()),
        };
        let drain = async {
            while let Some(done) = self.tasks.join_next().await {
                if let (Ok(Err(e)), Ok(())) = (done, &result) {
                    result = Err(e);
                }
            }
        };
        if tokio::time::timeout(DRAIN_GRACE, drain).await.is_err() {
            tracing::warn!("drain grace period over; stopping the rest");
            self.tasks.abort_all();
        }
        self.nats.close().await;
        result
    }

    /// Stops and drains.
    ///
    /// # Errors
    /// The first service error.
    pub async fn shutdown(self) -> Result<(), MeshError> {
        let token = CancellationToken::new();
        token.cancel();
        self.run_until(token).await
    }
}

/// Refuses to serve against an inbox written with another subject layout: users would be
/// written where no gateway or router looks.
async fn check_layout(nats: &herald_store::Nats, subjects: &Subjects) -> Result<(), MeshError> {
    use herald_protocol::streams::{INBOX, PARTITIONS_METADATA};
    let mut stream = nats.js_consume.get_stream(INBOX).await.map_err(|e| {
        MeshError::Layout(format!(
            "stream {INBOX} is not there ({e}); run `herald provision --nats-url …` first"
        ))
    })?;
    let info = stream
        .info()
        .await
        .map_err(|e| MeshError::Layout(format!("reading stream {INBOX}: {e}")))?;
    let stored = info.config.metadata.get(PARTITIONS_METADATA);
    let configured = subjects.partitions().to_string();
    match stored {
        Some(stored) if *stored != configured => Err(MeshError::Layout(format!(
            "stream {INBOX} was provisioned with {stored} partitions but this process is \
             configured with {configured}; start it with --partitions {stored}"
        ))),
        _ if !info.config.subjects.contains(&subjects.inbox_all()) => {
            Err(MeshError::Layout(format!(
                "stream {INBOX} captures {:?}, not {}; start with the subject prefix it was provisioned with",
                info.config.subjects,
                subjects.inbox_all()
            )))
        }
        _ => Ok(()),
    }
}

async fn wait_connected(nats: &herald_store::Nats, url: &str) -> Result<(), MeshError> {
    let deadline = tokio::time::Instant::now() + NATS_WAIT;
    let mut logged = false;
    while !nats.is_connected() {
        if tokio::time::Instant::now() > deadline {
            return Err(MeshError::NatsTimeout {
                url: herald_store::connect::redacted(url),
                waited: NATS_WAIT,
                last: nats.problem(),
            });
        }
        if !logged {
            tracing::info!(url = %herald_store::connect::redacted(url), "waiting for NATS");
            logged = true;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    Ok(())
}
