//! A hub and its leaf sites: the NATS set-up of a multi-site finmesh.
//!
//! [`HubAndLeaves`] starts
//! - the **hub**: a [`NatsCluster`] (3 nodes by default) whose JetStream
//!   domain is [`HUB_DOMAIN`] and whose nodes accept leafnode connections;
//! - **leaves** `leaf1`, `leaf2`, …: single JetStream servers, each in its
//!   own JetStream domain named like the server, each with one leafnode
//!   connection to the hub. A direct leaf may use every hub node's leafnode
//!   URL; a proxied leaf connects through its own [`DelayProxy`], which
//!   forwards to the hub nodes in order, so a test can slow, cut and
//!   restore that one leaf's link. Hubs do not advertise other nodes'
//!   leafnode URLs, so a leaf cannot go around its proxy.
//!
//! Readiness: the hub is ready as a [`NatsCluster`] is; a leaf is ready when
//! its own `/healthz?js-enabled-only=true` answers 200, its `/leafz` shows a
//! leafnode connection and some hub node's `/leafz` lists the leaf by name
//! (both ends of the link are up). Everything is polled with a deadline.
//!
//! A leaf's mirror of a hub stream reaches the hub's JetStream API through
//! `external: { api: "$JS.hub.API" }` (see NATS-NOTES.md; the client-side
//! `domain` field is rejected by nats-server 2.15.1).
//!
//! Every server and proxy is killed when the topology is dropped, also
//! while a panicking test unwinds; store dirs go with them.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use crate::nats::{NatsCluster, NatsServer, NatsServerBuilder};
use crate::probe::http_get;
use crate::process::{ManagedServer, POLL_INTERVAL, ServerProcess};
use crate::proxy::DelayProxy;
use crate::{Error, Result};

/// The hub's JetStream domain.
pub const HUB_DOMAIN: &str = "hub";

/// How a leaf reaches the hub.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum LeafLink {
    Direct,
    Proxied { delay: Duration },
}

/// Options of a [`HubAndLeaves`]; see [`HubAndLeaves::builder`].
#[derive(Debug, Clone)]
pub struct HubAndLeavesBuilder {
    hub_size: usize,
    leaves: Vec<LeafLink>,
    template: NatsServerBuilder,
}

impl HubAndLeavesBuilder {
    /// Nodes in the hub cluster (default 3).
    pub fn hub_size(mut self, size: usize) -> Self {
        self.hub_size = size;
        self
    }

    /// Add a leaf connected straight to the hub nodes.
    pub fn direct_leaf(mut self) -> Self {
        self.leaves.push(LeafLink::Direct);
        self
    }

    /// Add a leaf connected through its own [`DelayProxy`] with this one-way
    /// delay (zero is fine: the proxy is then only there to be cut).
    pub fn proxied_leaf(mut self, delay: Duration) -> Self {
        self.leaves.push(LeafLink::Proxied { delay });
        self
    }

    /// The binary, temp location, startup timeout and JetStream options of
    /// every server (server names, domains and leafnode settings are set by
    /// the topology).
    pub fn template(mut self, template: NatsServerBuilder) -> Self {
        self.template = template;
        self
    }

    /// Start the hub, then every leaf, and wait until all links are up.
    pub async fn start(self) -> Result<HubAndLeaves> {
        assert!(self.hub_size >= 1, "a hub needs at least one node");
        let hub_template = self.template.clone().jetstream_domain(HUB_DOMAIN).leafnode_listen();
        let hub = NatsCluster::start_with(self.hub_size, hub_template).await?;
        let hub_leaf_ports: Vec<u16> = hub.nodes().iter().filter_map(|n| n.config().leafnode_port).collect();
        let hub_http_ports: Vec<u16> = hub.nodes().iter().map(|n| n.config().http_port).collect();
        let mut leaves = Vec::with_capacity(self.leaves.len());
        for (i, link) in self.leaves.iter().enumerate() {
            let name = format!("leaf{}", i + 1);
            let (proxy, urls) = match *link {
                LeafLink::Direct => {
                    (None, hub_leaf_ports.iter().map(|p| format!("nats-leaf://127.0.0.1:{p}")).collect())
                }
                LeafLink::Proxied { delay } => {
                    let mut targets = hub_leaf_ports.iter().map(|&p| SocketAddr::from(([127, 0, 0, 1], p)));
                    let first = targets.next().ok_or(Error::NotRunning { program: "nats-server" })?;
                    let proxy =
                        targets.fold(DelayProxy::builder(first), |b, t| b.target(t)).delay(delay).start().await?;
                    let url = format!("nats-leaf://127.0.0.1:{}", proxy.port());
                    (Some(proxy), vec![url])
                }
            };
            let server = self
                .template
                .clone()
                .server_name(name.clone())
                .jetstream_domain(name.clone())
                .leafnode_remote_urls(urls)
                .start()
                .await?;
            let mut leaf = LeafSite { server, proxy, name, hub_http_ports: hub_http_ports.clone() };
            leaf.wait_link_up().await?;
            leaves.push(leaf);
        }
        Ok(HubAndLeaves { hub, leaves })
    }
}

/// A hub cluster and its leaf servers; see the module doc.
///
/// ```no_run
/// # async fn f() -> finmesh_testkit::Result<()> {
/// use finmesh_testkit::{HubAndLeaves, ManagedServer};
/// use std::time::Duration;
/// let mut sites = HubAndLeaves::builder().direct_leaf().proxied_leaf(Duration::from_millis(40)).start().await?;
/// let hub_url = sites.hub().urls()[0].clone(); // JetStream domain "hub"
/// let leaf_url = sites.leaf(1).url(); // JetStream domain "leaf2"
/// sites.leaf(1).proxy().unwrap().cut().await; // the WAN link fails
/// sites.leaf(1).proxy().unwrap().restore().await?;
/// sites.leaf_mut(0).kill().await?; // kill -9 a leaf
/// sites.leaf_mut(0).restart().await?; // same store, waits for the link
/// # Ok(()) }
/// ```
#[derive(Debug)]
pub struct HubAndLeaves {
    // Leaves first: they are killed before the hub they connect to.
    leaves: Vec<LeafSite>,
    hub: NatsCluster,
}

impl HubAndLeaves {
    /// A 3-node hub and no leaves yet; add them with
    /// [`direct_leaf`](HubAndLeavesBuilder::direct_leaf) and
    /// [`proxied_leaf`](HubAndLeavesBuilder::proxied_leaf).
    pub fn builder() -> HubAndLeavesBuilder {
        HubAndLeavesBuilder { hub_size: 3, leaves: Vec::new(), template: NatsServerBuilder::default() }
    }

    /// The hub cluster.
    pub fn hub(&self) -> &NatsCluster {
        &self.hub
    }

    /// The hub cluster, to stop, kill or restart a node.
    pub fn hub_mut(&mut self) -> &mut NatsCluster {
        &mut self.hub
    }

    /// The leaves, in order `leaf1`, `leaf2`, …
    pub fn leaves(&self) -> &[LeafSite] {
        &self.leaves
    }

    /// One leaf (index 0 is `leaf1`).
    pub fn leaf(&self, index: usize) -> &LeafSite {
        &self.leaves[index]
    }

    /// One leaf, to stop, kill or restart it.
    pub fn leaf_mut(&mut self, index: usize) -> &mut LeafSite {
        &mut self.leaves[index]
    }
}

/// One leaf server, its JetStream domain and the proxy on its link, if any.
///
/// As a [`ManagedServer`], its readiness includes the leafnode link:
/// [`restart`](ManagedServer::restart) returns once the link is up again
/// (restart a leaf whose link is cut through [`server_mut`](Self::server_mut)).
#[derive(Debug)]
pub struct LeafSite {
    server: NatsServer,
    proxy: Option<DelayProxy>,
    /// Server name and JetStream domain.
    name: String,
    /// Monitoring ports of the hub nodes, to see the link from the hub's end.
    hub_http_ports: Vec<u16>,
}

impl LeafSite {
    /// The leaf's server name, also its JetStream domain.
    pub fn domain(&self) -> &str {
        &self.name
    }

    /// The leaf's client URL.
    pub fn url(&self) -> String {
        self.server.url()
    }

    /// The leaf's server.
    pub fn server(&self) -> &NatsServer {
        &self.server
    }

    /// The leaf's server, to start or stop it without waiting for the link.
    pub fn server_mut(&mut self) -> &mut NatsServer {
        &mut self.server
    }

    /// The proxy on the link to the hub, for a proxied leaf.
    pub fn proxy(&self) -> Option<&DelayProxy> {
        self.proxy.as_ref()
    }

    /// Are both ends of the leafnode link up right now?
    pub async fn link_up(&self) -> bool {
        link_up(self.server.config().http_port, &self.name, &self.hub_http_ports).await
    }

    /// Wait (up to the startup timeout) until the leaf is ready and both ends
    /// of its link are up.
    pub async fn wait_link_up(&mut self) -> Result<()> {
        let name = self.name.clone();
        let hub_ports = self.hub_http_ports.clone();
        self.server
            .wait_until(|port| {
                let (name, hub_ports) = (name.clone(), hub_ports.clone());
                async move {
                    http_get(port, "/healthz?js-enabled-only=true").await.is_some_and(|(s, _)| s == 200)
                        && link_up(port, &name, &hub_ports).await
                }
            })
            .await
    }

    /// Wait up to `timeout` until neither end reports the link (after a
    /// cut, say).
    pub async fn wait_link_down(&self, timeout: Duration) -> Result<()> {
        let deadline = Instant::now() + timeout;
        let port = self.server.config().http_port;
        loop {
            if leaf_connections(port).await == Some(0) && !hub_lists(&self.hub_http_ports, &self.name).await {
                return Ok(());
            }
            if Instant::now() >= deadline {
                return Err(Error::NotReady {
                    program: "nats-server",
                    timeout,
                    log_path: self.server.log_path(),
                    log_tail: format!(
                        "the leafnode link of {} is still up\n{}",
                        self.name,
                        crate::process::log_tail(&self.server.log_path(), 20)
                    ),
                });
            }
            tokio::time::sleep(POLL_INTERVAL).await;
        }
    }
}

impl ManagedServer for LeafSite {
    fn process(&self) -> Option<&ServerProcess> {
        self.server.process()
    }

    fn process_mut(&mut self) -> &mut Option<ServerProcess> {
        self.server.process_mut()
    }

    fn spawn_process(&mut self) -> Result<()> {
        self.server.spawn_process()
    }

    fn wait_ready(&mut self) -> impl Future<Output = Result<()>> + Send {
        self.wait_link_up()
    }
}

/// Does the leaf's `/leafz` show a connection, and does a hub node list it?
async fn link_up(leaf_http_port: u16, name: &str, hub_http_ports: &[u16]) -> bool {
    leaf_connections(leaf_http_port).await.is_some_and(|n| n > 0) && hub_lists(hub_http_ports, name).await
}

/// The number of leafnode connections `/leafz` reports.
async fn leaf_connections(http_port: u16) -> Option<u64> {
    leafz(http_port).await?.get("leafnodes")?.as_u64()
}

/// Does any running hub node list a leafnode connection from `name`?
async fn hub_lists(hub_http_ports: &[u16], name: &str) -> bool {
    for &port in hub_http_ports {
        if let Some(z) = leafz(port).await
            && z["leafs"].as_array().is_some_and(|ls| ls.iter().any(|l| l["name"].as_str() == Some(name)))
        {
            return true;
        }
    }
    false
}

async fn leafz(http_port: u16) -> Option<serde_json::Value> {
    let (status, body) = http_get(http_port, "/leafz").await?;
    if status != 200 {
        return None;
    }
    serde_json::from_slice(&body).ok()
}
