//! `herald up`: the whole mesh in one process for a laptop.
//!
//! Starts a child nats-server (unless `--nats-url` is given) with its store under the
//! data dir, generates the development API key and JWT secret on first run and keeps them
//! in `<data-dir>/credentials.toml` so a second start reuses both the data and the keys,
//! provisions, serves every service, and on Ctrl-C stops everything, the child included
//! (also while it is still starting, or being started again after a crash).

use crate::config::Settings;
use crate::mesh::{Mesh, MeshOptions, Roles};
use herald_natsd::{NatsServer, NatsServerOptions};
use serde::{Deserialize, Serialize};
use std::path::Path;
use std::sync::Arc;
use tokio_util::sync::CancellationToken;

/// Credentials generated for development.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct DevCredentials {
    api_key: String,
    jwt_secret: String,
}

/// Why `herald up` failed.
#[derive(Debug, thiserror::Error)]
pub enum UpError {
    /// Reading or writing the data dir failed.
    #[error("data dir {path}: {source}")]
    DataDir {
        /// The path.
        path: String,
        /// Cause.
        #[source]
        source: std::io::Error,
    },
    /// nats-server could not be found or started.
    #[error(transparent)]
    Nats(#[from] herald_natsd::NatsdError),
    /// Configuration is invalid.
    #[error(transparent)]
    Config(#[from] crate::config::ConfigError),
    /// The mesh failed.
    #[error(transparent)]
    Mesh(#[from] crate::mesh::MeshError),
    /// Binding the HTTP address failed.
    #[error("binding {addr}: {source} (is another herald running? use --http-addr)")]
    Bind {
        /// The address.
        addr: String,
        /// Cause.
        #[source]
        source: std::io::Error,
    },
}

/// Runs `herald up` until `shutdown`.
///
/// # Errors
/// [`UpError`] when anything needed cannot be started.
pub async fn run(mut settings: Settings, shutdown: CancellationToken) -> Result<(), UpError> {
    let data_dir = settings.data_dir.clone();
    std::fs::create_dir_all(&data_dir).map_err(|source| UpError::DataDir {
        path: data_dir.display().to_string(),
        source,
    })?;
    let creds = load_or_create_credentials(&data_dir)?;
    let mut generated = Vec::new();
    if settings.api_key.is_none() {
        settings.api_key = Some(creds.api_key.clone());
        generated.push("api key");
    }
    if settings.jwt_secret.is_none() {
        settings.jwt_secret = Some(creds.jwt_secret.clone());
        generated.push("jwt secret");
    }
    settings.dev_mode = true;
    let valid = settings.validate()?;

    let mut child: Option<NatsServer> = None;
    let nats_url = match &settings.nats_url {
        Some(url) => url.clone(),
        None if valid.nats != herald_store::NatsOptions::default() => {
            return Err(UpError::Config(crate::config::ConfigError(vec![
                "the nats_creds_file, nats_nkey_seed_file, nats_token, nats_tls_* and nats_require_tls settings are for a NATS of your own (--nats-url): the nats-server `herald up` starts listens on loopback without authentication or TLS".into(),
            ])));
        }
        None => {
            let store = data_dir.join("nats");
            // A start can take seconds (JetStream recovering a big store). Ctrl-C meanwhile
            // drops it, and with it the child (a starting child is owned too: see
            // `herald_natsd`), instead of starting the whole mesh only to stop it.
            let server = tokio::select! {
                server = NatsServer::start(NatsServerOptions::dev(store)) => server?,
                () = shutdown.cancelled() => {
                    eprintln!("herald stopped before nats-server was up.");
                    return Ok(());
                }
            };
            tracing::info!(pid = server.pid(), url = %server.client_url(), "started nats-server");
            let url = server.client_url();
            child = Some(server);
            url
        }
    };
    let listener = tokio::net::TcpListener::bind(valid.http_addr)
        .await
        .map_err(|source| UpError::Bind {
            addr: valid.http_addr.to_string(),
            source,
        })?;
    let mesh = Mesh::start(
        MeshOptions {
            nats_url: nats_url.clone(),
            nats: valid.nats.clone(),
            name: "herald-up".into(),
            subjects: valid.subjects.clone(),
            streams: valid.streams.clone(),
            provision: true,
            api_keys: valid.api_keys.clone(),
            jwt: valid.jwt.clone(),
            jwks: valid.jwks.clone(),
            api: valid.api,
            gateway: valid.gateway,
            roles: Roles::ALL,
            dev_mode: true,
            channels: valid.channels.clone(),
            policy: Arc::new(valid.policy.clone()),
            templates: valid.templates.clone(),
            rates: valid.rates.clone(),
            topics: valid.topics.clone(),
        },
        listener,
    )
    .await?;
    print_banner(&mesh, &settings, &nats_url, &generated, &data_dir);
    // Supervise the child: a nats-server that dies (OOM-killed, crashed) is started again
    // on the same ports and store, and Herald's clients reconnect by themselves.
    let stop = shutdown.child_token();
    let run = mesh.run_until(stop.clone());
    tokio::pin!(run);
    let mut check = tokio::time::interval(CHILD_CHECK);
    let result = loop {
        tokio::select! {
            result = &mut run => break result,
            _ = check.tick(), if child.is_some() => {
                let Some(server) = child.as_mut() else { continue };
                if server.is_running() || stop.is_cancelled() {
                    continue;
                }
                tracing::error!(log = %server.log_path().display(), "nats-server exited; starting it again on the same ports and store");
                match server.restart().await {
                    Ok(()) => tracing::info!(pid = server.pid(), "nats-server restarted"),
                    Err(e) => {
                        tracing::error!(error = %e, "nats-server did not start again; stopping");
                        stop.cancel();
                    }
                }
            }
        }
    };
    if let Some(mut server) = child
        && let Err(e) = server.stop().await
    {
        tracing::warn!(error = %e, "stopping nats-server");
    }
    eprintln!("herald stopped.");
    Ok(result?)
}

/// How often `herald up` checks that its nats-server still runs.
const CHILD_CHECK: std::time::Duration = std::time::Duration::from_secs(1);

fn load_or_create_credentials(dir: &Path) -> Result<DevCredentials, UpError> {
    let path = dir.join("credentials.toml");
    let io = |source| UpError::DataDir {
        path: path.display().to_string(),
        source,
    };
    if let Ok(text) = std::fs::read_to_string(&path)
        && let Some(creds) = parse_credentials(&text)
    {
        return Ok(creds);
    }
    let creds = DevCredentials {
        api_key: herald_auth::api_keys::generate(),
        jwt_secret: hex::encode(rand::random::<[u8; 32]>()),
    };
    let text = format!(
        "# Generated by `herald up` for development. Delete to regenerate.\napi_key = \"{}\"\njwt_secret = \"{}\"\n",
        creds.api_key, creds.jwt_secret
    );
    // Secrets: readable by the owner only, from the moment the file exists.
    let mut options = std::fs::OpenOptions::new();
    options.write(true).create(true).truncate(true);
    #[cfg(unix)]
    std::os::unix::fs::OpenOptionsExt::mode(&mut options, 0o600);
    let mut file = options.open(&path).map_err(io)?;
    std::io::Write::write_all(&mut file, text.as_bytes()).map_err(io)?;
    Ok(creds)
}

fn parse_credentials(text: &str) -> Option<DevCredentials> {
    use figment::providers::{Format as _, Toml};
    figment::Figment::from(Toml::string(text)).extract().ok()
}

fn print_banner(
    mesh: &Mesh,
    settings: &Settings,
    nats_url: &str,
    generated: &[&str],
    data_dir: &Path,
) {
    let addr = mesh.addr();
    let key = settings.api_key.as_deref().unwrap_or_default();
    let origin = if generated.is_empty() {
        "as configured"
    } else {
        "development credentials, kept in <data-dir>/credentials.toml"
    };
    println!(
        "\n  Herald is up.\n\n  \
         demo page    http://{addr}/\n  \
         API          http://{addr}/v1/notify\n  \
         NATS         {}\n  \
         data dir     {}\n  \
         API key      {key}   ({origin})\n\n  \
         Try it:\n    \
         TOKEN=$({} token --user alice --data-dir {})\n    \
         # then open the demo page, or connect ws://{addr}/v1/ws?access_token=$TOKEN\n    \
         curl -X POST http://{addr}/v1/notify -H 'Authorization: Bearer {key}' \\\n      \
         -H 'Content-Type: application/json' -d '{{\"user_id\":\"alice\",\"title\":\"Hello\"}}'\n\n  \
         Ctrl-C stops everything.\n",
        herald_store::connect::redacted(nats_url),
        data_dir.display(),
        // The binary running now: `herald` is not on PATH after `./scripts/up`.
        std::env::current_exe().map_or_else(|_| "herald".into(), |p| p.display().to_string()),
        data_dir.display()
    );
}

/// Reads the development API key, for `herald topic` without `--api-key`.
pub fn dev_api_key(data_dir: &Path) -> Option<String> {
    let text = std::fs::read_to_string(data_dir.join("credentials.toml")).ok()?;
    parse_credentials(&text).map(|c| c.api_key)
}

/// Reads the development credentials, for `herald token` without `--jwt-secret`.
pub fn dev_jwt_secret(data_dir: &Path) -> Option<String> {
    let text = std::fs::read_to_string(data_dir.join("credentials.toml")).ok()?;
    parse_credentials(&text).map(|c| c.jwt_secret)
}
