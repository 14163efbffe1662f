//! Real nats-server processes for one test: a single dev server or a three-node cluster,
//! from the repository's own `nats/*.conf`, on random ports in a temp dir.

use anyhow::{Context as _, bail};
use herald_natsd::{NatsCluster, NatsServer, NatsServerOptions};
use std::time::Duration;
use tempfile::TempDir;

/// The nats-server(s) one test owns. Dropping it kills them and removes their stores.
#[derive(Debug)]
pub struct Nats {
    // Declared before `dir`, so the servers die before their store is removed.
    servers: Servers,
    dir: TempDir,
}

#[derive(Debug)]
enum Servers {
    Single(Box<NatsServer>),
    Cluster(NatsCluster),
}

impl Nats {
    /// One dev nats-server (`nats/dev.conf`) on random ports.
    ///
    /// # Errors
    /// When the pinned nats-server is missing or does not start.
    pub async fn single() -> anyhow::Result<Nats> {
        crate::init_tracing();
        let dir = tempfile::tempdir().context("creating a temp dir for nats-server")?;
        let server = NatsServer::start(NatsServerOptions::dev(dir.path().join("nats")))
            .await
            .context("starting nats-server (run scripts/install-nats-server.sh?)")?;
        Ok(Nats {
            servers: Servers::Single(Box::new(server)),
            dir,
        })
    }

    /// One dev server whose configuration is `nats/dev.conf`, included unchanged, and
    /// `extra` after it: an `authorization` block, `tls`, operator mode
    /// ([`crate::trust`] writes them). Its readiness check reads only the plain-text
    /// `INFO` line, so it starts the same with authentication and TLS on.
    ///
    /// # Errors
    /// When nats-server refuses the configuration or does not start.
    pub async fn single_with(extra: &str) -> anyhow::Result<Nats> {
        crate::init_tracing();
        let dir = tempfile::tempdir().context("creating a temp dir for nats-server")?;
        let dev = dir.path().join("dev.conf");
        std::fs::write(&dev, herald_natsd::DEV_CONFIG).context("writing dev.conf")?;
        let config = dir.path().join("guarded.conf");
        std::fs::write(&config, format!("include \"dev.conf\"\n\n{extra}\n"))
            .context("writing guarded.conf")?;
        let server = NatsServer::start(NatsServerOptions {
            config: herald_natsd::ConfigSource::File(config),
            ..NatsServerOptions::dev(dir.path().join("nats"))
        })
        .await
        .context("starting nats-server with authentication or TLS")?;
        Ok(Nats {
            servers: Servers::Single(Box::new(server)),
            dir,
        })
    }

    /// Three nodes from `nats/cluster.conf`, routed, with a JetStream meta leader.
    ///
    /// # Errors
    /// When the cluster does not form.
    pub async fn cluster() -> anyhow::Result<Nats> {
        crate::init_tracing();
        let dir = tempfile::tempdir().context("creating a temp dir for the cluster")?;
        let cluster = NatsCluster::start(None, dir.path())
            .await
            .context("starting a 3-node nats cluster")?;
        Ok(Nats {
            servers: Servers::Cluster(cluster),
            dir,
        })
    }

    /// The client URL(s), comma-separated for a cluster.
    pub fn url(&self) -> String {
        match &self.servers {
            Servers::Single(s) => s.client_url(),
            Servers::Cluster(c) => c.client_urls().join(","),
        }
    }

    /// The temp dir holding every store (for messages on failure).
    pub fn dir(&self) -> &std::path::Path {
        self.dir.path()
    }

    /// A plain NATS client connected to the server(s), for native-path tests.
    ///
    /// # Errors
    /// When no server answers within 10 s.
    pub async fn client(&self) -> anyhow::Result<async_nats::Client> {
        connect_client(&self.url()).await
    }

    /// SIGKILLs the single server (a crash). On a cluster, use [`Nats::kill_node`].
    ///
    /// # Panics
    /// On a cluster.
    pub fn kill(&mut self) {
        match &mut self.servers {
            Servers::Single(s) => s.kill(),
            Servers::Cluster(_) => panic!("Nats::kill is for a single server; use kill_node"),
        }
    }

    /// Starts the single server again on the same ports and store.
    ///
    /// # Errors
    /// When it does not come back, or on a cluster.
    pub async fn restart(&mut self) -> anyhow::Result<()> {
        match &mut self.servers {
            Servers::Single(s) => s.restart().await.context("restarting nats-server"),
            Servers::Cluster(_) => bail!("Nats::restart is for a single server"),
        }
    }

    /// SIGKILLs node `index` (0-based) of the cluster.
    ///
    /// # Errors
    /// On a single server or an index out of range.
    pub fn kill_node(&mut self, index: usize) -> anyhow::Result<()> {
        match &mut self.servers {
            Servers::Cluster(c) => {
                let node = c
                    .nodes
                    .get_mut(index)
                    .with_context(|| format!("no cluster node {index}"))?;
                node.kill();
                Ok(())
            }
            Servers::Single(_) => bail!("Nats::kill_node is for a cluster"),
        }
    }

    /// Whether some client of the single server subscribes to exactly `subject` (read
    /// from the monitoring endpoint `/subsz`). Lets a test wait until a gateway listens.
    ///
    /// # Errors
    /// When monitoring cannot be read, or on a cluster.
    pub async fn has_subscription(&self, subject: &str) -> anyhow::Result<bool> {
        Ok(self
            .subscriptions_matching(subject)
            .await?
            .iter()
            .any(|s| s == subject))
    }

    /// The subjects (wildcards included) of every subscription on the single server that
    /// a message on the literal `subject` would reach.
    ///
    /// # Errors
    /// When monitoring cannot be read, or on a cluster.
    pub async fn subscriptions_matching(&self, subject: &str) -> anyhow::Result<Vec<String>> {
        let Servers::Single(s) = &self.servers else {
            bail!("subscriptions_matching reads a single server's monitoring");
        };
        let subsz = s
            .monitor(&format!("/subsz?subs=1&limit=100000&test={subject}"))
            .await
            .context("reading /subsz")?;
        let list = subsz["subscriptions_list"]
            .as_array()
            .cloned()
            .unwrap_or_default();
        Ok(list
            .iter()
            .filter_map(|sub| sub["subject"].as_str().map(str::to_string))
            .collect())
    }
}

/// A plain NATS client for `url` (comma-separated for a cluster), within 10 s.
///
/// # Errors
/// When no server answers within 10 s.
pub async fn connect_client(url: &str) -> anyhow::Result<async_nats::Client> {
    let urls: Vec<&str> = url.split(',').collect();
    let connect = async_nats::ConnectOptions::new().connect(urls.as_slice());
    crate::within(
        Duration::from_secs(10),
        "connecting a test NATS client",
        connect,
    )
    .await?
    .with_context(|| format!("connecting to {url}"))
}
