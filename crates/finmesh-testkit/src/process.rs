//! One server child process.
//!
//! Invariants:
//! - the child's stdout and stderr go to a log file (appended across
//!   restarts), whose tail is attached to errors;
//! - dropping a [`ServerProcess`] SIGKILLs the child and reaps it before
//!   returning, so the caller may delete the child's data directory right
//!   after (a `TempDir` declared after the process field) and no zombie stays.
//!   Drop also runs while a panicking test unwinds. If the test process
//!   itself is killed, nextest's process-group kill ends the child too.
//! - waiting is bounded: [`ServerProcess::stop`] escalates from SIGTERM to
//!   SIGKILL after its grace period.

use std::fs::OpenOptions;
use std::io::{Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use crate::{Error, Result};

/// How long a graceful stop waits before SIGKILL.
pub const STOP_GRACE: Duration = Duration::from_secs(10);

/// How often exit and readiness are polled.
pub(crate) const POLL_INTERVAL: Duration = Duration::from_millis(10);

/// A running server child process with a log file.
#[derive(Debug)]
pub struct ServerProcess {
    program: &'static str,
    child: Child,
    log_path: PathBuf,
}

impl ServerProcess {
    /// Start `command` with stdout and stderr appended to `log_path`.
    pub fn spawn(program: &'static str, mut command: Command, log_path: &Path) -> Result<ServerProcess> {
        let log = OpenOptions::new()
            .create(true)
            .append(true)
            .open(log_path)
            .map_err(|e| Error::io(format!("opening log file {log_path:?}"), e))?;
        let log_err = log.try_clone().map_err(|e| Error::io("duplicating the log file handle", e))?;
        command.stdin(Stdio::null()).stdout(log).stderr(log_err);
        let child = command.spawn().map_err(|e| Error::io(format!("spawning {program} ({command:?})"), e))?;
        tracing::debug!(program, pid = child.id(), ?log_path, "spawned");
        Ok(ServerProcess { program, child, log_path: log_path.to_path_buf() })
    }

    /// The child's process id.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// The log file.
    pub fn log_path(&self) -> &Path {
        &self.log_path
    }

    /// The exit status, if the child has exited (reaping it).
    pub fn try_exit_status(&mut self) -> Result<Option<ExitStatus>> {
        self.child.try_wait().map_err(|e| Error::io(format!("polling {}", self.program), e))
    }

    /// The error to report when the child exited before it was ready.
    pub fn exited_error(&self, status: ExitStatus) -> Error {
        Error::Exited { program: self.program, status, log_path: self.log_path.clone(), log_tail: self.log_tail() }
    }

    /// The error to report when the child did not become ready in time.
    pub fn not_ready_error(&self, timeout: Duration) -> Error {
        Error::NotReady { program: self.program, timeout, log_path: self.log_path.clone(), log_tail: self.log_tail() }
    }

    /// The last 30 lines of the log.
    pub fn log_tail(&self) -> String {
        log_tail(&self.log_path, 30)
    }

    /// SIGKILL the child and reap it.
    pub async fn kill(&mut self) -> Result<ExitStatus> {
        if let Some(status) = self.try_exit_status()? {
            return Ok(status);
        }
        self.child.kill().map_err(|e| Error::io(format!("killing {}", self.program), e))?;
        self.wait_exit(Duration::from_secs(10)).await?.ok_or_else(|| {
            Error::io(format!("waiting for {} after SIGKILL", self.program), std::io::ErrorKind::TimedOut.into())
        })
    }

    /// SIGTERM the child and wait up to `grace` for it to exit, then SIGKILL.
    pub async fn stop(&mut self, grace: Duration) -> Result<ExitStatus> {
        if let Some(status) = self.try_exit_status()? {
            return Ok(status);
        }
        let pid = libc::pid_t::try_from(self.child.id()).expect("pids fit in pid_t");
        // SAFETY: kill(2) has no memory-safety preconditions; the pid is our
        // own child, not yet reaped (try_wait above returned None), so it
        // cannot have been recycled for another process.
        let rc = unsafe { libc::kill(pid, libc::SIGTERM) };
        if rc != 0 {
            return Err(Error::io(format!("sending SIGTERM to {}", self.program), std::io::Error::last_os_error()));
        }
        match self.wait_exit(grace).await? {
            Some(status) => Ok(status),
            None => {
                tracing::warn!(program = self.program, ?grace, "did not exit after SIGTERM; sending SIGKILL");
                self.kill().await
            }
        }
    }

    /// Poll until the child exits or `timeout` passes.
    async fn wait_exit(&mut self, timeout: Duration) -> Result<Option<ExitStatus>> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(status) = self.try_exit_status()? {
                return Ok(Some(status));
            }
            if Instant::now() >= deadline {
                return Ok(None);
            }
            tokio::time::sleep(POLL_INTERVAL).await;
        }
    }
}

impl Drop for ServerProcess {
    fn drop(&mut self) {
        // A failing test drops its servers while it unwinds, just before
        // their temporary directories go: show what they logged, so a
        // failure in CI can be read without reproducing it.
        if std::thread::panicking() {
            eprintln!(
                "--- {} (pid {}), last lines of {}:\n{}\n---",
                self.program,
                self.child.id(),
                self.log_path.display(),
                self.log_tail()
            );
        }
        if let Ok(None) = self.child.try_wait() {
            // SIGKILL cannot be ignored, so the blocking wait is short.
            let _ = self.child.kill();
            let _ = self.child.wait();
            tracing::debug!(program = self.program, pid = self.child.id(), "killed on drop");
        }
    }
}

/// The last `lines` lines of the file at `path` (reads at most its last 64 KiB).
pub fn log_tail(path: &Path, lines: usize) -> String {
    let Ok(mut f) = std::fs::File::open(path) else {
        return "<no log>".to_owned();
    };
    let len = f.metadata().map(|m| m.len()).unwrap_or(0);
    let _ = f.seek(SeekFrom::Start(len.saturating_sub(64 * 1024)));
    let mut buf = Vec::new();
    let _ = f.read_to_end(&mut buf);
    let text = String::from_utf8_lossy(&buf);
    let all: Vec<&str> = text.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}

/// The lifecycle every server of the kit shares: pid, liveness, graceful
/// stop, SIGKILL, restart on the same ports and data. A server supplies
/// where its process lives, how to spawn it and how to tell it is ready.
pub trait ManagedServer: Send {
    /// The running process, if any.
    fn process(&self) -> Option<&ServerProcess>;

    /// The slot holding the running process.
    fn process_mut(&mut self) -> &mut Option<ServerProcess>;

    /// Start the process again with the same configuration (ports, data dir).
    fn spawn_process(&mut self) -> Result<()>;

    /// Wait until the server answers, within its startup timeout.
    fn wait_ready(&mut self) -> impl Future<Output = Result<()>> + Send;

    /// The server's process id, while it runs.
    fn pid(&self) -> Option<u32> {
        self.process().map(ServerProcess::pid)
    }

    /// Is the process alive?
    fn is_running(&mut self) -> bool {
        match self.process_mut().as_mut() {
            Some(p) => matches!(p.try_exit_status(), Ok(None)),
            None => false,
        }
    }

    /// Graceful stop: SIGTERM, then SIGKILL after [`STOP_GRACE`]. Data is kept.
    fn stop(&mut self) -> impl Future<Output = Result<()>> + Send {
        async move {
            if let Some(mut p) = self.process_mut().take() {
                p.stop(STOP_GRACE).await?;
            }
            Ok(())
        }
    }

    /// SIGKILL, as a crash of the process would. Data is kept.
    fn kill(&mut self) -> impl Future<Output = Result<()>> + Send {
        async move {
            if let Some(mut p) = self.process_mut().take() {
                p.kill().await?;
            }
            Ok(())
        }
    }

    /// Start again on the same ports and data (stopping it gracefully first
    /// if it still runs), and wait for readiness.
    fn restart(&mut self) -> impl Future<Output = Result<()>> + Send {
        async move {
            self.stop().await?;
            self.spawn_process()?;
            self.wait_ready().await
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn stop_escalates_to_sigkill_and_drop_reaps() {
        let dir = tempfile::tempdir().unwrap();
        let log = dir.path().join("log");
        // A child that ignores SIGTERM.
        let mut cmd = Command::new("sh");
        cmd.args(["-c", "trap '' TERM; echo started; while :; do sleep 1; done"]);
        let mut p = ServerProcess::spawn("sh", cmd, &log).unwrap();
        // Wait until the trap is installed, else SIGTERM would end it.
        let deadline = Instant::now() + Duration::from_secs(10);
        while !std::fs::read_to_string(&log).unwrap_or_default().contains("started") {
            assert!(Instant::now() < deadline, "sh did not start");
            tokio::time::sleep(POLL_INTERVAL).await;
        }
        let started = Instant::now();
        let status = p.stop(Duration::from_millis(300)).await.unwrap();
        assert!(started.elapsed() >= Duration::from_millis(300));
        use std::os::unix::process::ExitStatusExt;
        assert_eq!(status.signal(), Some(libc::SIGKILL));

        let mut cmd = Command::new("sleep");
        cmd.arg("1000");
        let p = ServerProcess::spawn("sleep", cmd, &log).unwrap();
        let pid = p.pid();
        assert!(Path::new(&format!("/proc/{pid}")).exists());
        drop(p);
        assert!(!Path::new(&format!("/proc/{pid}")).exists(), "child {pid} still exists after drop");
    }

    #[test]
    fn log_tail_keeps_the_last_lines() {
        let dir = tempfile::tempdir().unwrap();
        let log = dir.path().join("log");
        std::fs::write(&log, (1..=100).map(|i| format!("line {i}\n")).collect::<String>()).unwrap();
        assert_eq!(log_tail(&log, 2), "line 99\nline 100");
        assert_eq!(log_tail(&dir.path().join("missing"), 2), "<no log>");
    }
}
