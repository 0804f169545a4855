//! The node an audit starts itself: `finmesh serve` (this very binary) as
//! a child process on a fresh data directory, embedded by default or on a
//! NATS server, restarted on the same address mid-audit.
//!
//! Owns the child and its data directory. Invariants: a restart reuses the
//! address and the data directory (the same node comes back, so its
//! subscribers resume on the same URL); the child is killed when the
//! [`ChildNode`] is dropped, and the data directory removed, whatever way
//! the audit ends.

use std::path::PathBuf;
use std::process::Stdio;
use std::time::Duration;

use anyhow::{Context, bail};
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::{Child, Command};

/// The configuration the child runs with: a short lame duck and reconnect
/// hint, so a drain takes a fraction of a second, and a request rate limit
/// the feed cannot reach (a batch counts as one request per message).
const CONFIG: &str = "lame_duck_ms = 200\n[subscriptions]\nretry_ms = 100\nretry_jitter_ms = 100\n[limits.rate]\nper_second = 1000000\nburst = 1000000\n";

/// How long a child may take to listen, or to exit after a signal.
const PATIENCE: Duration = Duration::from_secs(60);

/// How the node is restarted.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Restart {
    /// SIGTERM: the node drains (subscribers get `reconnect`), then exits.
    Drain,
    /// SIGKILL: the node dies without a word.
    Kill,
    /// No restart.
    None,
}

/// A `finmesh serve` child process.
pub struct ChildNode {
    child: Option<Child>,
    dir: PathBuf,
    args: Vec<String>,
    /// `host:port` it listens on.
    pub addr: String,
}

impl ChildNode {
    /// Start a node: embedded, or on the NATS server at `nats`.
    pub async fn start(nats: Option<&str>) -> anyhow::Result<Self> {
        let nanos = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap_or_default().as_nanos();
        let dir = std::env::temp_dir().join(format!("finmesh-audit-{}-{nanos}", std::process::id()));
        std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
        let config = dir.join("finmesh.toml");
        std::fs::write(&config, CONFIG).with_context(|| format!("writing {}", config.display()))?;
        let mut args = vec![
            "serve".to_owned(),
            "--config".to_owned(),
            config.display().to_string(),
            "--data-dir".to_owned(),
            dir.join("data").display().to_string(),
        ];
        if let Some(url) = nats {
            args.extend(["--engine".to_owned(), "nats".to_owned(), "--nats-servers".to_owned(), url.to_owned()]);
        }
        let mut node = ChildNode { child: None, dir, args, addr: String::new() };
        node.spawn("127.0.0.1:0").await?;
        Ok(node)
    }

    /// The base URL.
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// The admin token the node wrote on its first start.
    pub fn admin_token(&self) -> anyhow::Result<String> {
        let path = self.dir.join("data").join("admin-token");
        let token = std::fs::read_to_string(&path).with_context(|| format!("reading {}", path.display()))?;
        Ok(token.trim().to_owned())
    }

    /// Stop the node as `how` says and start it again on the same address.
    pub async fn restart(&mut self, how: Restart) -> anyhow::Result<()> {
        let signal = match how {
            Restart::Drain => libc::SIGTERM,
            Restart::Kill => libc::SIGKILL,
            Restart::None => return Ok(()),
        };
        let mut child = self.child.take().context("the node is not running")?;
        let pid = child.id().context("the node already exited")?;
        // SAFETY: kill(2) on our own child, not yet reaped (we hold it).
        if unsafe { libc::kill(pid as libc::pid_t, signal) } != 0 {
            bail!("cannot signal the node: {}", std::io::Error::last_os_error());
        }
        match tokio::time::timeout(PATIENCE, child.wait()).await {
            Ok(status) => {
                status.context("waiting for the node")?;
            }
            Err(_) => bail!("the node did not exit within {PATIENCE:?} after {how:?}"),
        }
        let addr = self.addr.clone();
        // The port may linger for a moment after the exit: try again briefly.
        let deadline = tokio::time::Instant::now() + PATIENCE;
        loop {
            match self.spawn(&addr).await {
                Ok(()) => return Ok(()),
                Err(e) if tokio::time::Instant::now() < deadline => {
                    tracing::debug!("restarting the node: {e:#}; trying again");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
                Err(e) => return Err(e),
            }
        }
    }

    /// Spawn `finmesh serve --listen listen` and wait for its address.
    async fn spawn(&mut self, listen: &str) -> anyhow::Result<()> {
        let exe = std::env::current_exe().context("locating the finmesh binary")?;
        let mut child = Command::new(exe)
            .args(&self.args)
            .args(["--listen", listen])
            .envs([("FINMESH_LOG", "warn")])
            .env_remove("FINMESH_CONFIG")
            .env_remove("FINMESH_LISTEN")
            .env_remove("FINMESH_ENGINE")
            .env_remove("FINMESH_DATA_DIR")
            .env_remove("FINMESH_NATS_SERVERS")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .kill_on_drop(true)
            .spawn()
            .context("starting finmesh serve")?;
        let mut lines = BufReader::new(child.stdout.take().context("the node's stdout")?).lines();
        let addr = tokio::time::timeout(PATIENCE, async {
            while let Some(line) = lines.next_line().await? {
                if let Some(addr) = line.strip_prefix("listening on http://") {
                    return Ok(Some(addr.trim().to_owned()));
                }
            }
            Ok::<_, std::io::Error>(None)
        })
        .await
        .context("the node did not listen in time")?
        .context("reading the node's output")?;
        let Some(addr) = addr else {
            let status = child.wait().await.context("waiting for the node")?;
            bail!("finmesh serve exited before listening ({status})");
        };
        // Keep draining its stdout so it never blocks on a full pipe.
        tokio::spawn(async move { while let Ok(Some(_)) = lines.next_line().await {} });
        self.addr = addr;
        self.child = Some(child);
        Ok(())
    }
}

impl Drop for ChildNode {
    fn drop(&mut self) {
        if let Some(child) = self.child.as_mut() {
            let _ = child.start_kill();
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}
