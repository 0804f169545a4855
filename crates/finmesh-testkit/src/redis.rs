//! A real `redis-server` for tests and benchmarks.
//!
//! Started on a free loopback port with `--save '' --appendonly no` (nothing
//! is persisted: these are caches and fixtures), its working directory and
//! log in a fresh temporary directory. Ready when its log since this start
//! says `Ready to accept connections` (so a stranger holding the port cannot
//! answer for it) and it answers `PING` with `PONG`, polled every 10 ms until the deadline (default 10 s). Redis
//! refuses port 0 (it means "no TCP"), so the kit picks a free port and
//! retries with another one if the server reports "Address already in use".
//! [`RedisServer::restart`] reuses the port. Dropping the handle SIGKILLs the
//! server and deletes the directory.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use tempfile::TempDir;

use crate::binary::{REDIS_SERVER_ENV, find_binary};
use crate::ports::{MAX_START_ATTEMPTS, free_port, is_port_collision};
use crate::probe::redis_ping;
use crate::process::{ManagedServer, POLL_INTERVAL, ServerProcess};
use crate::{Error, Result};

const PROGRAM: &str = "redis-server";
const INSTALL_HINT: &str = "install it with `apt-get install -y redis-server` (scripts/test does)";
const DEFAULT_STARTUP_TIMEOUT: Duration = Duration::from_secs(10);

/// Options for starting a [`RedisServer`]; see [`RedisServer::builder`].
#[derive(Debug, Clone)]
pub struct RedisServerBuilder {
    binary: Option<PathBuf>,
    tmp_in: Option<PathBuf>,
    startup_timeout: Duration,
    extra_args: Vec<String>,
}

impl Default for RedisServerBuilder {
    fn default() -> Self {
        RedisServerBuilder { binary: None, tmp_in: None, startup_timeout: DEFAULT_STARTUP_TIMEOUT, extra_args: vec![] }
    }
}

impl RedisServerBuilder {
    /// Use this binary instead of `$FINMESH_REDIS_SERVER` or `PATH`.
    pub fn binary(mut self, path: impl Into<PathBuf>) -> Self {
        self.binary = Some(path.into());
        self
    }

    /// Create the temporary directory under `dir`.
    pub fn tmp_in(mut self, dir: impl Into<PathBuf>) -> Self {
        self.tmp_in = Some(dir.into());
        self
    }

    /// How long to wait for `PONG` (default 10 s).
    pub fn startup_timeout(mut self, timeout: Duration) -> Self {
        self.startup_timeout = timeout;
        self
    }

    /// Extra command-line arguments, e.g. `["--maxmemory", "64mb"]`.
    pub fn args<I: IntoIterator<Item = S>, S: Into<String>>(mut self, args: I) -> Self {
        self.extra_args.extend(args.into_iter().map(Into::into));
        self
    }

    /// Start the server and wait until it answers `PING`.
    pub async fn start(self) -> Result<RedisServer> {
        let binary = find_binary(PROGRAM, self.binary.as_deref(), REDIS_SERVER_ENV, INSTALL_HINT)?;
        let mut root = match &self.tmp_in {
            Some(dir) => tempfile::Builder::new().prefix("finmesh-redis-").tempdir_in(dir),
            None => tempfile::Builder::new().prefix("finmesh-redis-").tempdir(),
        }
        .map_err(|e| Error::io("creating the redis-server temporary directory", e))?;
        for attempt in 1..=MAX_START_ATTEMPTS {
            let mut server = RedisServer {
                process: None,
                port: free_port()?,
                binary: binary.clone(),
                extra_args: self.extra_args.clone(),
                startup_timeout: self.startup_timeout,
                log_offset: 0,
                root,
            };
            server.spawn()?;
            match server.ready().await {
                Ok(()) => return Ok(server),
                Err(Error::Exited { log_tail, .. }) if is_port_collision(&log_tail) => {
                    tracing::info!(attempt, "redis-server port collision; retrying with a fresh port");
                    server.process = None;
                    root = server.root;
                }
                Err(e) => return Err(e),
            }
        }
        Err(Error::PortsInUse { program: PROGRAM, attempts: MAX_START_ATTEMPTS })
    }
}

/// A running `redis-server` on loopback; killed when dropped.
#[derive(Debug)]
pub struct RedisServer {
    // Declared before `root`: killed and reaped before the directory goes.
    process: Option<ServerProcess>,
    port: u16,
    binary: PathBuf,
    extra_args: Vec<String>,
    startup_timeout: Duration,
    /// Length of the log file when the current process started.
    log_offset: u64,
    root: TempDir,
}

impl RedisServer {
    /// Start a server with default options.
    pub async fn start() -> Result<RedisServer> {
        RedisServerBuilder::default().start().await
    }

    /// Options: binary, temp location, extra arguments.
    pub fn builder() -> RedisServerBuilder {
        RedisServerBuilder::default()
    }

    /// The port.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// `redis://127.0.0.1:<port>`.
    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }

    /// The server's working directory.
    pub fn dir(&self) -> &Path {
        self.root.path()
    }

    /// The log file (all starts, appended).
    pub fn log_path(&self) -> PathBuf {
        self.root.path().join("redis.log")
    }

    async fn ready(&mut self) -> Result<()> {
        let deadline = Instant::now() + self.startup_timeout;
        loop {
            let log_ready = self.logged_ready();
            let process = self.process.as_mut().ok_or(Error::NotRunning { program: PROGRAM })?;
            if let Some(status) = process.try_exit_status()? {
                let err = process.exited_error(status);
                self.process = None;
                return Err(err);
            }
            if log_ready && redis_ping(self.port).await {
                return Ok(());
            }
            if Instant::now() >= deadline {
                return Err(process.not_ready_error(self.startup_timeout));
            }
            tokio::time::sleep(POLL_INTERVAL).await;
        }
    }

    fn logged_ready(&self) -> bool {
        const READY_LINE: &[u8] = b"Ready to accept connections";
        let Ok(log) = std::fs::read(self.log_path()) else { return false };
        let since = log.get(self.log_offset as usize..).unwrap_or_default();
        since.windows(READY_LINE.len()).any(|w| w == READY_LINE)
    }

    fn spawn(&mut self) -> Result<()> {
        self.log_offset = std::fs::metadata(self.log_path()).map(|m| m.len()).unwrap_or(0);
        let mut cmd = Command::new(&self.binary);
        cmd.arg("--port")
            .arg(self.port.to_string())
            .args(["--bind", "127.0.0.1", "--save", "", "--appendonly", "no", "--daemonize", "no"])
            .arg("--dir")
            .arg(self.root.path())
            .args(&self.extra_args);
        self.process = Some(ServerProcess::spawn(PROGRAM, cmd, &self.log_path())?);
        Ok(())
    }
}

impl ManagedServer for RedisServer {
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
