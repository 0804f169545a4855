//! A 3-node (or n-node) JetStream cluster on loopback.
//!
//! Every node gets its own temporary directory, client, monitoring and route
//! ports, and routes to all the others. The cluster is ready when every node
//! is ready on its own (see [`super::NatsServer::wait_ready`]) and every
//! node's full `/healthz` answers 200 (the node sees a JetStream meta
//! leader), and the meta leader's `/jsz` lists every other node as a
//! current peer, so an R3 stream can be created right away (without that
//! last check, a stream created early fails with "insufficient resources").

use std::time::{Duration, Instant};

use crate::nats::{ClusterSpec, NatsServer, NatsServerBuilder};
use crate::ports::{MAX_START_ATTEMPTS, free_ports, is_port_collision};
use crate::probe::{http_get, http_status};
use crate::process::{ManagedServer, POLL_INTERVAL};
use crate::{Error, Result};

/// Nodes of a cluster started by [`NatsCluster::start`]; all killed on drop.
#[derive(Debug)]
pub struct NatsCluster {
    nodes: Vec<NatsServer>,
}

impl NatsCluster {
    /// Start `size` nodes named `n1`, `n2`, … in cluster `finmesh`.
    pub async fn start(size: usize) -> Result<NatsCluster> {
        Self::start_with(size, NatsServerBuilder::default()).await
    }

    /// Like [`start`](Self::start), with `template` supplying the binary,
    /// temp location, startup timeout and JetStream options of every node.
    pub async fn start_with(size: usize, template: NatsServerBuilder) -> Result<NatsCluster> {
        assert!(size >= 1, "a cluster needs at least one node");
        for attempt in 1..=MAX_START_ATTEMPTS {
            match Self::try_start(size, &template).await {
                Err(Error::Exited { ref log_tail, .. }) if is_port_collision(log_tail) => {
                    tracing::info!(attempt, "nats cluster port collision; retrying with fresh ports");
                }
                other => return other,
            }
        }
        Err(Error::PortsInUse { program: "nats-server", attempts: MAX_START_ATTEMPTS })
    }

    async fn try_start(size: usize, template: &NatsServerBuilder) -> Result<NatsCluster> {
        let ports = free_ports(3 * size)?;
        let route_ports: Vec<u16> = ports[2 * size..].to_vec();
        let mut nodes = Vec::with_capacity(size);
        for i in 0..size {
            let node = template
                .clone()
                .server_name(format!("n{}", i + 1))
                .ports(ports[i], ports[size + i])
                .cluster(ClusterSpec { name: "finmesh".into(), port: route_ports[i], routes: route_ports.clone() })
                .spawn()
                .await?;
            nodes.push(node);
        }
        for node in &mut nodes {
            node.wait_ready().await?;
        }
        let mut cluster = NatsCluster { nodes };
        cluster.wait_healthy(template.startup_timeout).await?;
        Ok(cluster)
    }

    /// The nodes, in order `n1`, `n2`, …
    pub fn nodes(&self) -> &[NatsServer] {
        &self.nodes
    }

    /// One node, to kill or restart it.
    pub fn node_mut(&mut self, index: usize) -> &mut NatsServer {
        &mut self.nodes[index]
    }

    /// Every node's client URL.
    pub fn urls(&self) -> Vec<String> {
        self.nodes.iter().map(NatsServer::url).collect()
    }

    /// Wait up to `timeout` until every running node's full `/healthz`
    /// answers 200 and the meta leader sees every running node as a current
    /// peer (after a node was restarted, say).
    pub async fn wait_healthy(&mut self, timeout: Duration) -> Result<()> {
        let deadline = Instant::now() + timeout;
        for node in &mut self.nodes {
            if node.is_running() {
                let saved =
                    std::mem::replace(&mut node.startup_timeout, deadline.saturating_duration_since(Instant::now()));
                let res = node.wait_until(|port| async move { http_status(port, "/healthz").await == Some(200) }).await;
                node.startup_timeout = saved;
                res?;
            }
        }
        let running: Vec<(String, u16)> = self
            .nodes
            .iter_mut()
            .filter_map(|n| n.is_running().then(|| (n.config().server_name.clone(), n.config().http_port)))
            .collect();
        loop {
            if meta_group_complete(&running).await {
                return Ok(());
            }
            if Instant::now() >= deadline {
                let node = self
                    .nodes
                    .iter()
                    .find(|n| n.pid().is_some())
                    .ok_or(Error::NotRunning { program: "nats-server" })?;
                return Err(Error::NotReady {
                    program: "nats-server",
                    timeout,
                    log_path: node.log_path(),
                    log_tail: format!(
                        "the JetStream meta leader does not see all {} running nodes as current\n{}",
                        running.len(),
                        crate::process::log_tail(&node.log_path(), 20)
                    ),
                });
            }
            tokio::time::sleep(POLL_INTERVAL).await;
        }
    }
}

/// Does the meta leader (asked through its own `/jsz`) list every other
/// running node as a current peer?
async fn meta_group_complete(running: &[(String, u16)]) -> bool {
    let Some((_, any_port)) = running.first() else { return true };
    let Some(leader) = meta_cluster(*any_port).await.and_then(|m| m["leader"].as_str().map(str::to_owned)) else {
        return false;
    };
    let Some((_, leader_port)) = running.iter().find(|(name, _)| *name == leader) else { return false };
    let Some(meta) = meta_cluster(*leader_port).await else { return false };
    let Some(replicas) = meta["replicas"].as_array() else { return running.len() == 1 };
    running.iter().filter(|(name, _)| *name != leader).all(|(name, _)| {
        replicas.iter().any(|r| r["name"].as_str() == Some(name) && r["current"].as_bool() == Some(true))
    })
}

async fn meta_cluster(http_port: u16) -> Option<serde_json::Value> {
    let (status, body) = http_get(http_port, "/jsz").await?;
    if status != 200 {
        return None;
    }
    let mut v: serde_json::Value = serde_json::from_slice(&body).ok()?;
    Some(v.get_mut("meta_cluster")?.take())
}
