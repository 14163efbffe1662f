//! A Herald mesh running in this process against a test's nats-server, with its own API
//! key and JWT secret, and the HTTP calls tests make against it.

use crate::nats::Nats;
use crate::sse::SseClient;
use crate::ws::WsClient;
use anyhow::{Context as _, bail, ensure};
use herald::mesh::{Mesh, MeshOptions, Roles};
use herald_auth::{ApiKey, ApiKeys, JwtConfig, Scope, UserAuth};
use herald_protocol::streams::StreamSettings;
use herald_protocol::{Policy, Subjects, UserId};
use reqwest::{Method, RequestBuilder, StatusCode};
use serde_json::{Value, json};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;
use tokio::net::TcpListener;

/// Bound on one ordinary HTTP call.
const HTTP_TIMEOUT: Duration = Duration::from_secs(15);

/// What a 202 said.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Accepted {
    /// The notification id.
    pub id: String,
    /// Its inbox position.
    pub seq: u64,
}

/// Where a WebSocket or SSE connection starts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Resume {
    /// Live only: no replay.
    Live,
    /// `?after=<seq>`: replay everything after it, then live.
    After(u64),
    /// SSE only: the `Last-Event-ID` header.
    LastEventId(u64),
}

/// Configures a [`Herald`] before it starts.
#[derive(Debug)]
pub struct HeraldBuilder {
    nats_url: String,
    nats_options: herald_store::NatsOptions,
    partitions: u16,
    replicas: usize,
    inbox_max_age: Option<Duration>,
    roles: Roles,
    keys: Vec<(String, Vec<Scope>)>,
    channels: Option<herald::channels::ChannelSettings>,
    gateway: herald_gateway::GatewayConfig,
    policy: Policy,
    templates: Arc<herald_templates::Templates>,
    rates: herald_api::RateConfig,
    topics: herald_api::TopicSettings,
    dev_mode: bool,
    jwks: Option<herald::jwks::JwksSettings>,
}

/// A running Herald mesh. Dropping it aborts the mesh; [`Herald::shutdown`] drains it.
#[derive(Debug)]
pub struct Herald {
    mesh: Option<Mesh>,
    /// What started the mesh, to start it again on the same address ([`Herald::start_again`]).
    options: MeshOptions,
    addr: std::net::SocketAddr,
    base: String,
    api_key: String,
    users: UserAuth,
    jwt_secret: Vec<u8>,
    http: reqwest::Client,
    subjects: Subjects,
    nats_url: String,
}

static INSTANCES: AtomicU64 = AtomicU64::new(0);

impl Herald {
    /// A builder for a mesh on `nats`: 4 partitions, 1 replica, every role.
    pub fn builder(nats: &Nats) -> HeraldBuilder {
        HeraldBuilder {
            nats_url: nats.url(),
            nats_options: herald_store::NatsOptions::default(),
            partitions: 4,
            replicas: 1,
            inbox_max_age: None,
            roles: Roles::ALL,
            keys: Vec::new(),
            channels: None,
            gateway: herald_gateway::GatewayConfig::default(),
            policy: Policy::default(),
            templates: Arc::new(herald_templates::Templates::none()),
            rates: herald_api::RateConfig::default(),
            topics: herald_api::TopicSettings::default(),
            dev_mode: false,
            jwks: None,
        }
    }

    /// `http://127.0.0.1:PORT`.
    pub fn base_url(&self) -> &str {
        &self.base
    }

    /// The API key with every scope.
    pub fn api_key(&self) -> &str {
        &self.api_key
    }

    /// The subject scheme this mesh uses.
    pub fn subjects(&self) -> &Subjects {
        &self.subjects
    }

    /// A plain NATS client on the server(s) this mesh uses.
    ///
    /// # Errors
    /// When none answers within 10 s.
    pub async fn nats_client(&self) -> anyhow::Result<async_nats::Client> {
        crate::nats::connect_client(&self.nats_url).await
    }

    /// The user-facing store on this mesh's NATS, on connections of its own (`name`), as
    /// a test reads it beside the running services.
    ///
    /// # Errors
    /// When the URL does not parse.
    pub async fn store_inbox(&self, name: &str) -> anyhow::Result<herald_store::Inbox> {
        let store = herald_store::connect_with(&self.nats_url, &self.options.nats, name).await?;
        Ok(herald_store::Inbox::new(store, self.subjects.clone()))
    }

    /// Whether the gateway holds a live registration for `subject` (a connection or a
    /// waiting long-poll of that user).
    pub fn is_tapped(&self, subject: &str) -> bool {
        self.mesh
            .as_ref()
            .and_then(Mesh::hub)
            .is_some_and(|hub| hub.is_tapped(subject))
    }

    /// The shared HTTP client.
    pub fn http(&self) -> &reqwest::Client {
        &self.http
    }

    /// A valid user token for `user` (one hour).
    ///
    /// # Panics
    /// When `user` is not a valid user id (1–128 bytes).
    pub fn token(&self, user: &str) -> String {
        let id = UserId::new(user).expect("a valid user id");
        self.users
            .mint(&id, 3600)
            .expect("minting with the HS256 secret")
    }

    /// The HS256 secret user tokens are signed with, to forge bad tokens.
    pub fn jwt_secret(&self) -> &[u8] {
        &self.jwt_secret
    }

    /// The text of `GET /metrics` (Prometheus; process-wide, shared by parallel tests).
    ///
    /// # Errors
    /// When the request fails.
    pub async fn metrics(&self) -> anyhow::Result<String> {
        Ok(self
            .request(Method::GET, "/metrics")
            .send()
            .await?
            .error_for_status()?
            .text()
            .await?)
    }

    /// The value of the first `/metrics` sample line that starts with `prefix` (a name,
    /// or a name and its labels); 0 when there is none yet.
    ///
    /// # Errors
    /// When `/metrics` does not answer.
    pub async fn metric(&self, prefix: &str) -> anyhow::Result<f64> {
        Ok(crate::metric_sample(&self.metrics().await?, prefix).unwrap_or(0.0))
    }

    /// A request to `path` with no credentials.
    pub fn request(&self, method: Method, path: &str) -> RequestBuilder {
        self.http
            .request(method, format!("{}{path}", self.base))
            .timeout(HTTP_TIMEOUT)
    }

    /// A request to `path` as the producer (the all-scopes API key).
    pub fn producer(&self, method: Method, path: &str) -> RequestBuilder {
        self.request(method, path).bearer_auth(&self.api_key)
    }

    /// A request to `path` as `user` (a fresh token in `Authorization`).
    pub fn user(&self, method: Method, path: &str, user: &str) -> RequestBuilder {
        self.request(method, path).bearer_auth(self.token(user))
    }

    /// `POST /v1/notify` with `body`, whatever the answer.
    ///
    /// # Errors
    /// When the request cannot be sent.
    pub async fn notify(&self, body: &Value) -> anyhow::Result<reqwest::Response> {
        self.producer(Method::POST, "/v1/notify")
            .json(body)
            .send()
            .await
            .context("POST /v1/notify")
    }

    /// `POST /v1/notify` that must answer 202; returns its id and seq.
    ///
    /// # Errors
    /// Any other answer.
    pub async fn accept(&self, body: &Value) -> anyhow::Result<Accepted> {
        accepted(self.notify(body).await?).await
    }

    /// Sends `{"user_id": user, "title": title}` and expects 202.
    ///
    /// # Errors
    /// Any answer but 202.
    pub async fn send(&self, user: &str, title: &str) -> anyhow::Result<Accepted> {
        self.accept(&json!({"user_id": user, "title": title})).await
    }

    /// `GET /v1/notifications/{id}` (the delivery status) as the producer; must answer 200.
    ///
    /// # Errors
    /// Any other answer.
    pub async fn status(&self, id: &str) -> anyhow::Result<Value> {
        let path = format!("/v1/notifications/{id}");
        json_ok(self.producer(Method::GET, &path).send().await?).await
    }

    /// The first `channel` entry of `id`'s delivery status, once it is `state` (30 s at
    /// most).
    ///
    /// # Errors
    /// When it is not `state` in time; the error shows the last status.
    pub async fn channel_state(
        &self,
        id: &str,
        channel: &str,
        state: &str,
    ) -> anyhow::Result<Value> {
        crate::eventually(
            Duration::from_secs(30),
            &format!("{id} {channel} {state}"),
            || async {
                let s = self.status(id).await?;
                let entry = s["channels"][channel][0].clone();
                ensure!(entry["state"] == state, "status now {s}");
                Ok(entry)
            },
        )
        .await
    }

    /// Sets `user`'s quiet hours from an hour ago to two hours from now, UTC.
    ///
    /// # Errors
    /// Any answer but success.
    pub async fn quiet_now(&self, user: &str) -> anyhow::Result<()> {
        let now = jiff::Timestamp::now().to_zoned(jiff::tz::TimeZone::UTC);
        let hhmm = |t: jiff::civil::Time| format!("{:02}:{:02}", t.hour(), t.minute());
        let start = now.time().wrapping_sub(jiff::Span::new().hours(1));
        let end = now.time().wrapping_add(jiff::Span::new().hours(2));
        let r = self
            .user(Method::PUT, "/v1/me/preferences", user)
            .json(&json!({"quiet_hours": {"start": hhmm(start), "end": hhmm(end)}, "timezone": "UTC"}))
            .send()
            .await?;
        ensure!(r.status().is_success(), "prefs: {}", r.status());
        Ok(())
    }

    /// `GET /v1/users/{user}/notifications?{query}` as the producer; must answer 200.
    ///
    /// # Errors
    /// Any other answer.
    pub async fn page(&self, user: &str, query: &str) -> anyhow::Result<Value> {
        let path = format!("/v1/users/{}/notifications?{query}", crate::encode(user));
        json_ok(self.producer(Method::GET, &path).send().await?).await
    }

    /// `GET /v1/me/notifications?{query}` as `user`; must answer 200.
    ///
    /// # Errors
    /// Any other answer.
    pub async fn my_page(&self, user: &str, query: &str) -> anyhow::Result<Value> {
        let path = format!("/v1/me/notifications?{query}");
        json_ok(self.user(Method::GET, &path, user).send().await?).await
    }

    /// The whole inbox of `user`, oldest first, read page by page with `after`.
    ///
    /// # Errors
    /// When a page cannot be read.
    pub async fn inbox(&self, user: &str) -> anyhow::Result<Vec<Value>> {
        let mut items = Vec::new();
        let mut after = 0;
        loop {
            let page = self.page(user, &format!("after={after}&limit=500")).await?;
            let batch = page["items"].as_array().context("page without items")?;
            items.extend(batch.iter().cloned());
            after = page["next_after"]
                .as_u64()
                .context("page without next_after")?;
            if !page["has_more"]
                .as_bool()
                .context("page without has_more")?
            {
                return Ok(items);
            }
            ensure!(!batch.is_empty(), "has_more with an empty page: {page}");
        }
    }

    /// `ws://127.0.0.1:PORT{path_and_query}`.
    pub fn ws_url(&self, path_and_query: &str) -> String {
        format!(
            "{}{path_and_query}",
            self.base.replacen("http://", "ws://", 1)
        )
    }

    /// A WebSocket as `user` (token in `Authorization`), resuming as asked; the `hello`
    /// frame is left for the caller to read.
    ///
    /// # Errors
    /// When the upgrade fails.
    pub async fn ws(&self, user: &str, resume: Resume) -> anyhow::Result<WsClient> {
        let query = match resume {
            Resume::Live => String::new(),
            Resume::After(after) => format!("?after={after}"),
            Resume::LastEventId(_) => bail!("Last-Event-ID is an SSE header"),
        };
        WsClient::connect(
            &self.ws_url(&format!("/v1/ws{query}")),
            Some(&self.token(user)),
        )
        .await
    }

    /// An SSE stream as `user`, resuming as asked.
    ///
    /// # Errors
    /// When the request fails or is not answered with 200.
    pub async fn sse(&self, user: &str, resume: Resume) -> anyhow::Result<SseClient> {
        let mut request = self
            .http
            .get(format!("{}/v1/sse", self.base))
            .bearer_auth(self.token(user));
        request = match resume {
            Resume::Live => request,
            Resume::After(after) => request.query(&[("after", after)]),
            Resume::LastEventId(seq) => request.header("Last-Event-ID", seq.to_string()),
        };
        SseClient::open(request).await
    }

    /// Stops the mesh and drains it (open connections are told to reconnect), keeping
    /// its address, keys and secret for [`Herald::start_again`]: a restart as clients see
    /// it. Tokens minted before stay valid.
    ///
    /// # Errors
    /// The first service error of the mesh.
    pub async fn stop(&mut self) -> anyhow::Result<()> {
        if let Some(mesh) = self.mesh.take() {
            crate::within(
                Duration::from_secs(20),
                "draining the mesh",
                mesh.shutdown(),
            )
            .await?
            .context("mesh shutdown")?;
        }
        Ok(())
    }

    /// Runs the mesh until one of its services fails, within `wait`, and returns that
    /// failure (the mesh is stopped then, as `herald up` would end).
    ///
    /// # Errors
    /// When it is not running, or nothing failed within `wait`.
    pub async fn failure(&mut self, wait: Duration) -> anyhow::Result<herald::mesh::MeshError> {
        let mesh = self.mesh.take().context("the mesh is not running")?;
        let run = mesh.run_until(tokio_util::sync::CancellationToken::new());
        match crate::within(wait, "a service of the mesh to fail", run).await? {
            Err(e) => Ok(e),
            Ok(()) => bail!("the mesh ended without an error"),
        }
    }

    /// Starts a stopped mesh again on the same address, with the same keys and secret
    /// (provisioning is idempotent).
    ///
    /// # Errors
    /// When it is still running, the address cannot be bound again within 10 s, or the
    /// mesh does not start.
    pub async fn start_again(&mut self) -> anyhow::Result<()> {
        ensure!(
            self.mesh.is_none(),
            "the mesh is still running; stop it first"
        );
        let addr = self.addr;
        let listener = crate::eventually(
            Duration::from_secs(10),
            "binding the address again",
            || async move {
                TcpListener::bind(addr)
                    .await
                    .with_context(|| format!("binding {addr}"))
            },
        )
        .await?;
        let mesh = crate::within(
            Duration::from_secs(60),
            "starting the mesh again",
            Mesh::start(self.options.clone(), listener),
        )
        .await?
        .context("Mesh::start")?;
        self.mesh = Some(mesh);
        Ok(())
    }

    /// Stops the mesh and drains it (open connections are told to reconnect).
    ///
    /// # Errors
    /// The first service error of the mesh.
    pub async fn shutdown(mut self) -> anyhow::Result<()> {
        if let Some(mesh) = self.mesh.take() {
            crate::within(
                Duration::from_secs(20),
                "draining the mesh",
                mesh.shutdown(),
            )
            .await?
            .context("mesh shutdown")?;
        }
        Ok(())
    }
}

impl Drop for Herald {
    fn drop(&mut self) {
        // Connection tasks live outside the mesh's task set; the token ends them too.
        if let Some(mesh) = &self.mesh {
            mesh.stop_token().cancel();
        }
    }
}

impl HeraldBuilder {
    /// INBOX partitions (router ownership units).
    pub fn partitions(mut self, partitions: u16) -> Self {
        self.partitions = partitions;
        self
    }

    /// Replicas of every stream (3 on a cluster).
    pub fn replicas(mut self, replicas: usize) -> Self {
        self.replicas = replicas;
        self
    }

    /// How long the inbox keeps notifications (default: 30 days).
    pub fn inbox_max_age(mut self, max_age: Duration) -> Self {
        self.inbox_max_age = Some(max_age);
        self
    }

    /// Configured categories (default: none, so any category goes).
    pub fn policy(mut self, policy: Policy) -> Self {
        self.policy = policy;
        self
    }

    /// Templates to render.
    pub fn templates(mut self, templates: herald_templates::Templates) -> Self {
        self.templates = Arc::new(templates);
        self
    }

    /// Producer request rates (the all-scopes key's producer is `test-<n>`).
    pub fn rates(mut self, rates: herald_api::RateConfig) -> Self {
        self.rates = rates;
        self
    }

    /// Also verify user tokens against this JWKS document (beside the HS256 secret).
    pub fn jwks(mut self, jwks: herald::jwks::JwksSettings) -> Self {
        self.jwks = Some(jwks);
        self
    }

    /// Topic rules (which topics users may join themselves).
    pub fn topics(mut self, topics: herald_api::TopicSettings) -> Self {
        self.topics = topics;
        self
    }

    /// Which services run.
    pub fn roles(mut self, roles: Roles) -> Self {
        self.roles = roles;
        self
    }

    /// Channel settings (providers, workers, escalation); by default a fresh contact key,
    /// no providers, no workers.
    pub fn channels(mut self, channels: herald::channels::ChannelSettings) -> Self {
        self.channels = Some(channels);
        self
    }

    /// Gateway tunables (heartbeat, limits, receipt batching).
    pub fn gateway(mut self, config: herald_gateway::GatewayConfig) -> Self {
        self.gateway = config;
        self
    }

    /// Connects to `url` with `options` (credentials, TLS) instead of the plain URL of
    /// the test's server.
    pub fn nats(mut self, url: String, options: herald_store::NatsOptions) -> Self {
        self.nats_url = url;
        self.nats_options = options;
        self
    }

    /// Also accepts `key` with only `scopes`.
    pub fn key(mut self, key: &str, scopes: &[Scope]) -> Self {
        self.keys.push((key.to_string(), scopes.to_vec()));
        self
    }

    /// Development mode: the demo page at `/`, `/sdk/herald.js`, `/dev/token` and
    /// `/dev/notify`.
    pub fn dev_mode(mut self) -> Self {
        self.dev_mode = true;
        self
    }

    /// Provisions and starts the mesh on `127.0.0.1:0`.
    ///
    /// # Errors
    /// When the mesh does not start within 60 s.
    pub async fn start(self) -> anyhow::Result<Herald> {
        let n = INSTANCES.fetch_add(1, Ordering::Relaxed);
        let api_key = herald_auth::api_keys::generate();
        let mut keys = ApiKeys::new();
        keys.insert(
            &api_key,
            ApiKey {
                producer: format!("test-{n}"),
                scopes: Scope::ALL.to_vec(),
            },
        );
        for (i, (key, scopes)) in self.keys.iter().enumerate() {
            let producer = format!("test-{n}-extra-{i}");
            keys.insert(
                key,
                ApiKey {
                    producer,
                    scopes: scopes.clone(),
                },
            );
        }
        let jwt_secret = herald_auth::api_keys::generate().into_bytes();
        let jwt = JwtConfig {
            hs256_secret: Some(jwt_secret.clone()),
            ..JwtConfig::default()
        };
        let users = UserAuth::new(&jwt).context("user auth")?;
        let subjects = Subjects::new("herald", self.partitions)?;
        let listener = TcpListener::bind("127.0.0.1:0")
            .await
            .context("binding 127.0.0.1:0")?;
        let options = MeshOptions {
            nats_url: self.nats_url.clone(),
            nats: self.nats_options.clone(),
            name: format!("herald-test-{n}"),
            subjects: subjects.clone(),
            streams: StreamSettings {
                replicas: self.replicas,
                inbox_max_age: self
                    .inbox_max_age
                    .unwrap_or(StreamSettings::default().inbox_max_age),
                ..StreamSettings::default()
            },
            provision: true,
            api_keys: keys,
            jwt,
            jwks: self.jwks.clone(),
            api: herald_api::ApiConfig::default(),
            gateway: self.gateway,
            roles: self.roles,
            dev_mode: self.dev_mode,
            channels: self
                .channels
                .unwrap_or_else(|| herald::channels::ChannelSettings::new(rand_key())),
            policy: Arc::new(self.policy.clone()),
            templates: self.templates.clone(),
            rates: self.rates.clone(),
            topics: self.topics.clone(),
        };
        let mesh = crate::within(
            Duration::from_secs(60),
            "starting the mesh",
            Mesh::start(options.clone(), listener),
        )
        .await?
        .map_err(|e| anyhow::anyhow!("{e:?}"))
        .context("Mesh::start")?;
        let http = reqwest::Client::builder()
            .connect_timeout(Duration::from_secs(5))
            .build()
            .context("http client")?;
        Ok(Herald {
            base: format!("http://{}", mesh.addr()),
            addr: mesh.addr(),
            options,
            mesh: Some(mesh),
            api_key,
            users,
            jwt_secret,
            http,
            subjects,
            nats_url: self.nats_url,
        })
    }
}

/// A fresh 32-byte key.
pub fn rand_key() -> [u8; 32] {
    let mut key = [0u8; 32];
    for (i, b) in uuid::Uuid::new_v4()
        .as_bytes()
        .iter()
        .chain(uuid::Uuid::new_v4().as_bytes())
        .enumerate()
    {
        key[i] = *b;
    }
    key
}

/// Reads a 202 answer into [`Accepted`].
///
/// # Errors
/// Any status but 202, or a body without `id` and `seq`.
pub async fn accepted(response: reqwest::Response) -> anyhow::Result<Accepted> {
    let status = response.status();
    let body: Value = response.json().await.context("notify answer is not JSON")?;
    ensure!(
        status == StatusCode::ACCEPTED,
        "expected 202, got {status}: {body}"
    );
    ensure!(
        body["status"] == "accepted",
        "202 without status accepted: {body}"
    );
    Ok(Accepted {
        id: body["id"].as_str().context("202 without id")?.to_string(),
        seq: body["seq"].as_u64().context("202 without seq")?,
    })
}

/// The JSON body of a 200 answer.
///
/// # Errors
/// Any other status, or a body that is not JSON.
pub async fn json_ok(response: reqwest::Response) -> anyhow::Result<Value> {
    let status = response.status();
    let url = response.url().path().to_string();
    let text = response.text().await.context("reading the body")?;
    ensure!(
        status == StatusCode::OK,
        "{url}: expected 200, got {status}: {text}"
    );
    serde_json::from_str(&text).with_context(|| format!("{url}: body is not JSON: {text}"))
}
