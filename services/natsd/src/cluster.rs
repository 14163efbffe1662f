//! A three-node nats-server cluster on loopback, for tests and a single-machine mesh.

use std::{
    net::TcpListener,
    path::{Path, PathBuf},
    time::{Duration, Instant},
};

use crate::{ConfigSource, NatsServer, NatsServerOptions, NatsdError, locate, monitor};

/// The text of `nats/cluster.conf`, the per-node config of a cluster.
pub const CLUSTER_CONFIG: &str = include_str!("../../../nats/cluster.conf");

/// Nodes in a [`NatsCluster`]: the smallest size where JetStream R3 survives one loss.
const NODES: usize = 3;
/// Bound on route mesh + JetStream meta leader election (or catch-up after a restart).
const READY_TIMEOUT: Duration = Duration::from_secs(30);
/// Interval between two rounds of monitoring requests.
const POLL: Duration = Duration::from_millis(100);
/// Starts of the nodes on fresh route ports before a taken port is reported.
const ROUTE_PORT_ATTEMPTS: u32 = 4;

/// Three nats-server nodes, `herald-1` to `herald-3`, routed to each other, with
/// JetStream; each node's store is `<base_dir>/herald-<n>`.
#[derive(Debug)]
pub struct NatsCluster {
    /// The nodes, in name order. Kill and restart them individually to test failover.
    pub nodes: Vec<NatsServer>,
}

impl NatsCluster {
    /// Writes `nats/cluster.conf` to `base_dir`, starts three nodes on free loopback
    /// ports and waits (30 s at most) until [`NatsCluster::wait_ready`] holds.
    ///
    /// # Errors
    ///
    /// Those of [`NatsServer::start`]; [`NatsdError::FreePort`] when no cluster port can be
    /// reserved; [`NatsdError::ClusterTimeout`] when the cluster does not form in time.
    pub async fn start(
        binary: Option<PathBuf>,
        base_dir: &Path,
    ) -> Result<NatsCluster, NatsdError> {
        let binary = match binary {
            Some(binary) => binary,
            None => locate()?,
        };
        let prepare_err = |path: &Path| {
            let path = path.to_path_buf();
            move |source| NatsdError::Prepare { path, source }
        };
        std::fs::create_dir_all(base_dir).map_err(prepare_err(base_dir))?;
        let config = base_dir.join("cluster.conf");
        std::fs::write(&config, CLUSTER_CONFIG).map_err(prepare_err(&config))?;

        // Route ports must be known before any node starts, so they cannot be `-1`;
        // the other listeners can, and NatsServer pins them for restarts. Another process
        // can still bind a reserved port between its release and the node's bind (two
        // test clusters drawing the same port); that start is retried on new ports.
        let mut attempt = 1;
        let nodes = loop {
            match start_nodes(&binary, &config, base_dir).await {
                Err(e) if attempt < ROUTE_PORT_ATTEMPTS && route_port_taken(&e) => {
                    tracing::warn!(attempt, error = %e, "a cluster route port was taken; retrying on other ports");
                    attempt += 1;
                }
                started => break started?,
            }
        };
        let cluster = NatsCluster { nodes };
        cluster.wait_ready().await?;
        Ok(cluster)
    }

    /// `nats://127.0.0.1:PORT` of every node, in node order.
    pub fn client_urls(&self) -> Vec<String> {
        self.nodes.iter().map(NatsServer::client_url).collect()
    }

    /// Waits (30 s at most) until every node has a route to every other node, knows the
    /// JetStream meta leader, and reports `/healthz` ok (which, after a restart, means it
    /// has caught up). Every node must be running.
    ///
    /// # Errors
    ///
    /// [`NatsdError::ClusterTimeout`] with the last state seen on each node.
    pub async fn wait_ready(&self) -> Result<(), NatsdError> {
        let deadline = Instant::now() + READY_TIMEOUT;
        loop {
            let mut ready = true;
            let mut states = Vec::with_capacity(self.nodes.len());
            for (i, node) in self.nodes.iter().enumerate() {
                let state = node_state(node, self.nodes.len() - 1).await;
                states.push(format!(
                    "herald-{} (pid {}): {}",
                    i + 1,
                    node.pid(),
                    state.as_ref().err().map_or("ready", String::as_str)
                ));
                ready &= state.is_ok();
            }
            if ready {
                return Ok(());
            }
            if Instant::now() >= deadline {
                return Err(NatsdError::ClusterTimeout {
                    timeout: READY_TIMEOUT,
                    detail: states.join("; "),
                });
            }
            tokio::time::sleep(POLL).await;
        }
    }
}

/// Starts the nodes on newly reserved route ports. On error the nodes already started
/// are dropped, which kills them.
async fn start_nodes(
    binary: &Path,
    config: &Path,
    base_dir: &Path,
) -> Result<Vec<NatsServer>, NatsdError> {
    let route_ports = free_ports(NODES)?;
    let route_env: Vec<(String, String)> = route_ports
        .iter()
        .enumerate()
        .map(|(i, port)| {
            (
                format!("HERALD_NATS_ROUTE_{}", i + 1),
                format!("nats://127.0.0.1:{port}"),
            )
        })
        .collect();
    let mut nodes = Vec::with_capacity(NODES);
    for (i, port) in route_ports.iter().enumerate() {
        let name = format!("herald-{}", i + 1);
        let mut extra_env = vec![
            ("HERALD_NATS_NAME".to_owned(), name.clone()),
            ("HERALD_NATS_CLUSTER_PORT".to_owned(), port.to_string()),
        ];
        extra_env.extend(route_env.iter().cloned());
        let opts = NatsServerOptions {
            binary: Some(binary.to_path_buf()),
            config: ConfigSource::File(config.to_path_buf()),
            store_dir: base_dir.join(&name),
            client_port: None,
            websocket_port: None,
            http_port: None,
            extra_env,
        };
        nodes.push(NatsServer::start(opts).await?);
    }
    Ok(nodes)
}

/// Whether a node stopped at start because its route port was already bound.
fn route_port_taken(error: &NatsdError) -> bool {
    matches!(error, NatsdError::ExitedEarly { tail, .. }
        if tail.contains("router port") && tail.contains("address already in use"))
}

/// `Ok` when `node` routes to `peers` distinct servers, sees a meta leader and is
/// healthy; otherwise what is missing.
async fn node_state(node: &NatsServer, peers: usize) -> Result<(), String> {
    let port = node.monitoring_port().map_err(|e| e.to_string())?;
    let (_, routez) = monitor::get_json(port, "/routez")
        .await
        .map_err(|e| e.to_string())?;
    // Route pooling opens several connections per peer; count peers, not connections.
    let mut remotes: Vec<&str> = routez["routes"]
        .as_array()
        .map(|routes| {
            routes
                .iter()
                .filter_map(|r| r["remote_name"].as_str())
                .collect()
        })
        .unwrap_or_default();
    remotes.sort_unstable();
    remotes.dedup();
    if remotes.len() < peers {
        return Err(format!("routes to {remotes:?}, want {peers} peers"));
    }
    let (_, jsz) = monitor::get_json(port, "/jsz")
        .await
        .map_err(|e| e.to_string())?;
    let leader = jsz["meta_cluster"]["leader"].as_str().unwrap_or_default();
    if leader.is_empty() {
        return Err("no JetStream meta leader yet".to_owned());
    }
    let (status, health) = monitor::get_json(port, "/healthz")
        .await
        .map_err(|e| e.to_string())?;
    if status != 200 {
        return Err(format!("/healthz {status}: {health}"));
    }
    Ok(())
}

/// Reserves `n` distinct free loopback ports for the cluster routes, then releases them
/// for the nodes to bind.
///
/// They are taken below Linux's ephemeral range (32768+), where port-0 binds — every other
/// listener of every node and client on the machine — never land, so no other process can
/// take one in the moment between our check and the node's bind.
fn free_ports(n: usize) -> Result<Vec<u16>, NatsdError> {
    const LOW: u16 = 20_000;
    const HIGH: u16 = 32_000;
    let mut listeners = Vec::with_capacity(n);
    let mut tried = 0;
    while listeners.len() < n {
        tried += 1;
        if tried > 1_000 {
            return Err(NatsdError::FreePort(std::io::Error::new(
                std::io::ErrorKind::AddrInUse,
                format!("no free port in {LOW}..{HIGH} for the cluster routes"),
            )));
        }
        let port = rand::random_range(LOW..HIGH);
        if let Ok(l) = TcpListener::bind(("127.0.0.1", port)) {
            listeners.push(l);
        }
    }
    listeners
        .iter()
        .map(|l| l.local_addr().map(|a| a.port()))
        .collect::<Result<_, _>>()
        .map_err(NatsdError::FreePort)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::process::ExitStatusExt as _;

    fn exited(tail: &str) -> NatsdError {
        NatsdError::ExitedEarly {
            status: std::process::ExitStatus::from_raw(256),
            log: PathBuf::from("nats.log"),
            tail: tail.to_owned(),
        }
    }

    #[test]
    fn only_a_taken_route_port_starts_the_nodes_again() {
        assert!(route_port_taken(&exited(
            "[FTL] Error listening on router port: 21930 - listen tcp 127.0.0.1:21930: \
             bind: address already in use"
        )));
        // The client port is nats-server's to choose here; any other failure is reported.
        assert!(!route_port_taken(&exited(
            "[FTL] Error listening on port: 127.0.0.1:4222, \"listen tcp 127.0.0.1:4222: \
             bind: address already in use\""
        )));
        assert!(!route_port_taken(&exited(
            "[FTL] Error parsing config file: unknown field"
        )));
    }
}
