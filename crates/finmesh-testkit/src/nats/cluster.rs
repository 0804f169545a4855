//! A 3-node (or n-node) JetStream cluster on loopback.
//!
//! Every node gets its own temporary directory, client, monitoring and route
//! ports. Nodes start one after the other, each ready before the next, and
//! each is configured with routes to the nodes started before it (and to
//! itself, which nats-server drops, because a JetStream cluster node must
//! have a configured route): a route
//! dialed before its target listens fails, nats-server dials it again a
//! second later, and by then the target has connected the other way, so
//! the second dial opens duplicate route connections that are closed again
//! — churn that once cost a KV put its reply (an at-most-once request lost
//! in flight) well after the cluster looked ready. Configured routes are
//! redialed for ever, so a restarted node is dialed again by the nodes
//! started after it and dials those started before it. The cluster is ready when every node
//! is ready on its own (see [`super::NatsServer::wait_ready`]) and every
//! node's full `/healthz` answers 200 (the node sees a JetStream meta
//! leader), the meta leader's `/jsz` lists every other node as a current
//! peer, and the leader can place a stream on every node (a probe stream
//! with one replica per node, created and deleted), so an R3 stream can be
//! created right away (without the last two checks, a stream created early
//! fails with "insufficient resources" or "no suitable peers for
//! placement, peer offline").
//!
//! **A slow node** ([`NatsCluster::start_with_slow_node`]): one node whose
//! every route connection passes through a [`DelayProxy`], so its replicas
//! apply each write a delay after the others (a far-away replica). How the
//! links are wired, given how NATS forms routes (each node dials its
//! configured routes, and nodes tell each other about a newcomer, which
//! the others then dial at the route URL it *advertises*):
//! - the fast nodes route to each other directly and are started first;
//!   startup waits until each lists every other fast node in `/routez`, so
//!   none of them is a newcomer whose real URL could be gossiped to the
//!   slow node;
//! - the slow node is configured with one outbound proxy per fast node
//!   (`routes`) and advertises an inbound proxy to its own route port
//!   (`cluster.advertise`), so a fast node dialing it after gossip goes
//!   through a proxy too; no fast node is configured with its real port.
//!
//! Startup then also waits until [`NatsCluster::slow_node_isolated`] holds:
//! every route of the slow node is a proxy connection. Invariant kept
//! while nodes run; a *fast* node restarted later is a newcomer again and
//! its real URL may reach the slow node, so a test that restarts one checks
//! `slow_node_isolated` again. All proxies die with the cluster.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use crate::nats::{ClusterSpec, NatsServer, NatsServerBuilder};
use crate::ports::{MAX_START_ATTEMPTS, free_ports, is_port_collision};
use crate::probe::{http_get, http_status};
use crate::process::{ManagedServer, POLL_INTERVAL};
use crate::proxy::DelayProxy;
use crate::{Error, Result};

/// How long [`NatsCluster::lead_elsewhere`] waits for one step-down to
/// take effect before asking again.
const STEPDOWN_WAIT: Duration = Duration::from_secs(5);

/// Nodes of a cluster started by [`NatsCluster::start`]; all killed on drop.
#[derive(Debug)]
pub struct NatsCluster {
    nodes: Vec<NatsServer>,
    /// The slow node's proxies, if there is one; see the module doc.
    slow: Option<SlowLinks>,
}

/// The proxies around the slow node.
#[derive(Debug)]
struct SlowLinks {
    /// The slow node's index.
    index: usize,
    /// To the slow node's route port; the port it advertises.
    inbound: DelayProxy,
    /// One per fast node, to its route port; the slow node's `routes`.
    outbound: Vec<DelayProxy>,
}

impl NatsCluster {
    /// Start `size` nodes named `n1`, `n2`, … in cluster `finmesh`.
    pub async fn start(size: usize) -> Result<NatsCluster> {
        Self::start_with(size, NatsServerBuilder::default()).await
    }

    /// Like [`start`](Self::start), with `template` supplying the binary,
    /// temp location, startup timeout and JetStream options of every node.
    pub async fn start_with(size: usize, template: NatsServerBuilder) -> Result<NatsCluster> {
        Self::start_inner(size, template, None).await
    }

    /// Start `size` nodes where node `slow` (0-based) reaches the others
    /// only through [`DelayProxy`]s adding `delay` each way; see the module
    /// doc. Returns once the cluster is healthy and
    /// [`slow_node_isolated`](Self::slow_node_isolated) holds.
    ///
    /// ```no_run
    /// # async fn f() -> finmesh_testkit::Result<()> {
    /// use std::time::Duration;
    /// let cluster = finmesh_testkit::NatsCluster::start_with_slow_node(3, 2, Duration::from_millis(30)).await?;
    /// let slow_url = cluster.urls()[2].clone(); // replicas on n3 apply writes ~30 ms late
    /// for link in cluster.slow_links() {
    ///     link.set_delay(Duration::from_millis(100));
    /// }
    /// # Ok(()) }
    /// ```
    pub async fn start_with_slow_node(size: usize, slow: usize, delay: Duration) -> Result<NatsCluster> {
        Self::start_slow_with(size, slow, delay, NatsServerBuilder::default()).await
    }

    /// Like [`start_with_slow_node`](Self::start_with_slow_node), with a
    /// template as in [`start_with`](Self::start_with).
    pub async fn start_slow_with(
        size: usize,
        slow: usize,
        delay: Duration,
        template: NatsServerBuilder,
    ) -> Result<NatsCluster> {
        assert!(size >= 2 && slow < size, "a slow node needs another node and an index below the size");
        Self::start_inner(size, template, Some((slow, delay))).await
    }

    async fn start_inner(size: usize, template: NatsServerBuilder, slow: Option<(usize, Duration)>) -> Result<Self> {
        assert!(size >= 1, "a cluster needs at least one node");
        for attempt in 1..=MAX_START_ATTEMPTS {
            let started = match slow {
                None => Self::try_start(size, &template).await,
                Some((index, delay)) => Self::try_start_slow(size, index, delay, &template).await,
            };
            match started {
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
        let mut nodes: Vec<NatsServer> = Vec::with_capacity(size);
        for i in 0..size {
            let node = template
                .clone()
                .server_name(format!("n{}", i + 1))
                .ports(ports[i], ports[size + i])
                .cluster(ClusterSpec {
                    name: "finmesh".into(),
                    port: route_ports[i],
                    routes: route_ports[..=i].to_vec(),
                    advertise: None,
                })
                .spawn()
                .await?;
            nodes.push(node);
            // Listening before the next node dials it (see the module doc).
            if let Err(e) = nodes[i].wait_ready().await {
                return Err(sibling_exit(nodes.iter_mut(), e));
            }
        }
        let mut cluster = NatsCluster { nodes, slow: None };
        if let Err(e) = cluster.wait_healthy(template.startup_timeout).await {
            return Err(sibling_exit(cluster.nodes.iter_mut(), e));
        }
        Ok(cluster)
    }

    async fn try_start_slow(
        size: usize,
        slow: usize,
        delay: Duration,
        template: &NatsServerBuilder,
    ) -> Result<NatsCluster> {
        let ports = free_ports(3 * size)?;
        let route_ports: Vec<u16> = ports[2 * size..].to_vec();
        let fast: Vec<usize> = (0..size).filter(|&i| i != slow).collect();
        let loopback = |port: u16| SocketAddr::from(([127, 0, 0, 1], port));
        let inbound = DelayProxy::start(loopback(route_ports[slow]), delay).await?;
        let mut outbound = Vec::with_capacity(fast.len());
        for &i in &fast {
            outbound.push(DelayProxy::start(loopback(route_ports[i]), delay).await?);
        }
        let spec = |i: usize, routes: Vec<u16>, advertise: Option<u16>| ClusterSpec {
            name: "finmesh".into(),
            port: route_ports[i],
            routes,
            advertise,
        };
        let node = |i: usize, spec: ClusterSpec| {
            template.clone().server_name(format!("n{}", i + 1)).ports(ports[i], ports[size + i]).cluster(spec).spawn()
        };
        // The fast nodes first, routed to each other, so that none is new
        // (and gossiped at its real URL) when the slow node joins.
        let mut nodes: Vec<Option<NatsServer>> = (0..size).map(|_| None).collect();
        // Each routed to the fast nodes before it (and itself), and ready
        // before the next starts (see the module doc).
        for (k, &i) in fast.iter().enumerate() {
            let earlier = fast[..=k].iter().map(|&j| route_ports[j]).collect();
            let mut n = node(i, spec(i, earlier, None)).await?;
            if let Err(e) = n.wait_ready().await {
                let started = nodes.iter_mut().flatten().chain(std::iter::once(&mut n));
                return Err(sibling_exit(started, e));
            }
            nodes[i] = Some(n);
        }
        let fast_names: Vec<String> = fast.iter().map(|i| format!("n{}", i + 1)).collect();
        let deadline = Instant::now() + template.startup_timeout;
        for &i in &fast {
            let Some(n) = nodes[i].as_mut() else { continue };
            let others: Vec<String> = fast_names.iter().filter(|&m| *m != format!("n{}", i + 1)).cloned().collect();
            let saved = std::mem::replace(&mut n.startup_timeout, deadline.saturating_duration_since(Instant::now()));
            let res = n
                .wait_until(|port| {
                    let others = others.clone();
                    async move {
                        let names = route_names(port).await.unwrap_or_default();
                        others.iter().all(|o| names.contains(o))
                    }
                })
                .await;
            n.startup_timeout = saved;
            if let Err(e) = res {
                return Err(sibling_exit(nodes.iter_mut().flatten(), e));
            }
        }
        let slow_routes = outbound.iter().map(DelayProxy::port).collect();
        nodes[slow] = Some(node(slow, spec(slow, slow_routes, Some(inbound.port()))).await?);
        let nodes: Vec<NatsServer> = nodes.into_iter().flatten().collect();
        let mut cluster = NatsCluster { nodes, slow: Some(SlowLinks { index: slow, inbound, outbound }) };
        let slow_index = cluster.nodes.iter().position(|n| n.config().server_name == format!("n{}", slow + 1));
        let mut ready = match slow_index {
            Some(k) => cluster.nodes[k].wait_ready().await,
            None => Ok(()),
        };
        if ready.is_ok() {
            ready = cluster.wait_healthy(template.startup_timeout).await;
        }
        if let Err(e) = ready {
            return Err(sibling_exit(cluster.nodes.iter_mut(), e));
        }
        cluster.wait_slow_node_isolated(deadline.saturating_duration_since(Instant::now())).await?;
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

    /// Index of the node leading JetStream stream `name` (`KV_<bucket>` for
    /// a bucket), asked through `client`; polls until the stream has a
    /// leader, `None` if it has none within `timeout`.
    pub async fn stream_leader(&self, client: &async_nats::Client, name: &str, timeout: Duration) -> Option<usize> {
        let js = async_nats::jetstream::new(client.clone());
        let deadline = Instant::now() + timeout;
        loop {
            if let Ok(mut stream) = js.get_stream(name).await
                && let Ok(info) = stream.info().await
                && let Some(leader) = info.cluster.as_ref().and_then(|c| c.leader.clone())
                && let Some(i) = self.nodes.iter().position(|n| n.config().server_name == leader)
            {
                return Some(i);
            }
            if Instant::now() >= deadline {
                return None;
            }
            tokio::time::sleep(POLL_INTERVAL).await;
        }
    }

    /// Make a node other than `not` lead stream `name`: while `not` leads,
    /// ask it to step down (the JetStream API) and wait for the election.
    /// The new leader's index, `None` if `not` still leads after `timeout`.
    pub async fn lead_elsewhere(
        &self,
        client: &async_nats::Client,
        name: &str,
        not: usize,
        timeout: Duration,
    ) -> Option<usize> {
        let deadline = Instant::now() + timeout;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            let leader = self.stream_leader(client, name, left).await?;
            if leader != not {
                return Some(leader);
            }
            if left.is_zero() {
                return None;
            }
            // The reply says whether the step-down was accepted; the loop
            // checks the outcome instead.
            let _ = client.request(format!("$JS.API.STREAM.LEADER.STEPDOWN.{name}"), bytes::Bytes::new()).await;
            let asked = Instant::now();
            while self.stream_leader(client, name, left).await == Some(not) && asked.elapsed() < STEPDOWN_WAIT {
                tokio::time::sleep(POLL_INTERVAL).await;
            }
        }
    }

    /// The slow node's index, if the cluster has one.
    pub fn slow_node(&self) -> Option<usize> {
        self.slow.as_ref().map(|s| s.index)
    }

    /// Every proxy on the slow node's route links (to change their delay,
    /// or cut them); empty without a slow node.
    pub fn slow_links(&self) -> Vec<&DelayProxy> {
        self.slow.iter().flat_map(|s| std::iter::once(&s.inbound).chain(&s.outbound)).collect()
    }

    /// Does the slow node reach the others only through its proxies right
    /// now? True when its `/routez` lists at least one route to every
    /// other running node, none to a fast node's real route port, no fast
    /// node's `/routez` shows a route to the slow node's real route port,
    /// and the slow node's route count equals the connections open through
    /// all its proxies (so none bypasses them). False without a slow node.
    pub async fn slow_node_isolated(&self) -> bool {
        self.slow_node_bypass().await.is_none()
    }

    /// Why [`slow_node_isolated`](Self::slow_node_isolated) is false, or `None`.
    async fn slow_node_bypass(&self) -> Option<String> {
        let Some(slow) = &self.slow else { return Some("the cluster has no slow node".into()) };
        let Some(routes) = routez(self.nodes[slow.index].config().http_port).await else {
            return Some("the slow node's /routez does not answer".into());
        };
        let outbound: Vec<u16> = slow.outbound.iter().map(DelayProxy::port).collect();
        let through_proxies: usize = self.slow_links().iter().map(|p| p.open_connections()).sum();
        let slow_name = &self.nodes[slow.index].config().server_name;
        let summary = || {
            let r: Vec<String> =
                routes.iter().map(|r| format!("{}:{}", r["remote_name"].as_str().unwrap_or("?"), r["port"])).collect();
            format!(
                "slow node routes (name:port) {r:?}, outbound proxies {outbound:?}, {through_proxies} proxied connections"
            )
        };
        for n in self.nodes.iter().filter(|n| n.pid().is_some()) {
            let name = n.config().server_name.as_str();
            if name != slow_name && !routes.iter().any(|r| r["remote_name"].as_str() == Some(name)) {
                return Some(format!("no route to {name}; {}", summary()));
            }
        }
        // A route dialed straight to a fast node shows that node's route
        // port; one dialed straight to the slow node shows the slow node's
        // on the dialer. A route through a proxy shows the proxy's port on
        // the dialer and an ephemeral port on the acceptor, so the count
        // check catches what the port checks cannot.
        let real_port = |n: &NatsServer| n.config().cluster.as_ref().map(|c| u64::from(c.port));
        for n in self.nodes.iter().filter(|n| n.config().server_name != *slow_name) {
            if routes.iter().any(|r| {
                r["remote_name"].as_str() == Some(n.config().server_name.as_str()) && r["port"].as_u64() == real_port(n)
            }) {
                return Some(format!("the slow node dialed {} directly; {}", n.config().server_name, summary()));
            }
        }
        if routes.len() != through_proxies {
            return Some(format!("routes and proxied connections differ; {}", summary()));
        }
        let slow_port = real_port(&self.nodes[slow.index]);
        for n in self.nodes.iter().filter(|n| n.pid().is_some() && n.config().server_name != *slow_name) {
            let Some(theirs) = routez(n.config().http_port).await else {
                return Some(format!("{}'s /routez does not answer", n.config().server_name));
            };
            if theirs
                .iter()
                .any(|r| r["remote_name"].as_str() == Some(slow_name.as_str()) && r["port"].as_u64() == slow_port)
            {
                return Some(format!("{} dialed the slow node directly", n.config().server_name));
            }
        }
        None
    }

    /// Wait up to `timeout` until [`slow_node_isolated`](Self::slow_node_isolated).
    pub async fn wait_slow_node_isolated(&self, timeout: Duration) -> Result<()> {
        let deadline = Instant::now() + timeout;
        loop {
            let Some(why) = self.slow_node_bypass().await else { return Ok(()) };
            if Instant::now() >= deadline {
                let node = self.slow.as_ref().map_or(&self.nodes[0], |s| &self.nodes[s.index]);
                return Err(Error::NotReady {
                    program: "nats-server",
                    timeout,
                    log_path: node.log_path(),
                    log_tail: format!(
                        "the slow node's routes do not all pass its delay proxies: {why}\n{}",
                        crate::process::log_tail(&node.log_path(), 20)
                    ),
                });
            }
            tokio::time::sleep(POLL_INTERVAL).await;
        }
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
        let (mut running, mut urls) = (Vec::new(), Vec::new());
        for n in &mut self.nodes {
            if n.is_running() {
                running.push((n.config().server_name.clone(), n.config().http_port));
                urls.push(n.url());
            }
        }
        loop {
            if meta_group_complete(&running).await && can_place_on_all(&urls).await {
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
                        "the JetStream meta leader does not see all {} running nodes as current, or cannot \
                         place a stream on all of them yet\n{}",
                        running.len(),
                        crate::process::log_tail(&node.log_path(), 20)
                    ),
                });
            }
            tokio::time::sleep(POLL_INTERVAL).await;
        }
    }
}

/// Can the meta leader place a stream on every running node? It skips a
/// peer it has not had a STATSZ report from yet ("no suitable peers for
/// placement, peer offline"), which `/jsz` does not show, and on a loaded
/// machine that report can come after the peer is current in the meta
/// group. So ask it: create a memory stream with one replica per running
/// node (at most 5) and delete it again.
async fn can_place_on_all(urls: &[String]) -> bool {
    const PROBE: &str = "_finmesh_ready";
    let Some(url) = urls.first() else { return true };
    let Ok(client) = async_nats::ConnectOptions::new().request_timeout(Some(POLL_TIMEOUT)).connect(url.as_str()).await
    else {
        return false;
    };
    let js = async_nats::jetstream::new(client);
    let config = async_nats::jetstream::stream::Config {
        name: PROBE.into(),
        subjects: vec![format!("{PROBE}.probe")],
        storage: async_nats::jetstream::stream::StorageType::Memory,
        num_replicas: urls.len().min(5),
        ..Default::default()
    };
    js.create_stream(config).await.is_ok() && js.delete_stream(PROBE).await.is_ok()
}

/// How long one placement probe's API request may take.
const POLL_TIMEOUT: Duration = Duration::from_secs(5);

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

/// The routes in a node's `/routez`.
async fn routez(http_port: u16) -> Option<Vec<serde_json::Value>> {
    let (status, body) = http_get(http_port, "/routez").await?;
    if status != 200 {
        return None;
    }
    let mut v: serde_json::Value = serde_json::from_slice(&body).ok()?;
    match v.get_mut("routes")?.take() {
        serde_json::Value::Array(routes) => Some(routes),
        serde_json::Value::Null => Some(Vec::new()),
        _ => None,
    }
}

/// The server names a node has routes to.
async fn route_names(http_port: u16) -> Option<Vec<String>> {
    let routes = routez(http_port).await?;
    Some(routes.iter().filter_map(|r| r["remote_name"].as_str().map(str::to_owned)).collect())
}

async fn meta_cluster(http_port: u16) -> Option<serde_json::Value> {
    let (status, body) = http_get(http_port, "/jsz").await?;
    if status != 200 {
        return None;
    }
    let mut v: serde_json::Value = serde_json::from_slice(&body).ok()?;
    Some(v.get_mut("meta_cluster")?.take())
}

/// A node that is not ready may only be waiting for another that died, e.g.
/// one whose port another process took between [`free_ports`] and its bind:
/// report that exit instead (the start is then retried with fresh ports),
/// else `err` as it was.
fn sibling_exit<'a>(nodes: impl Iterator<Item = &'a mut NatsServer>, err: Error) -> Error {
    if matches!(err, Error::Exited { .. }) {
        return err;
    }
    nodes.filter_map(NatsServer::exit_error).next().unwrap_or(err)
}
