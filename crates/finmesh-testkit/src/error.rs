//! Errors of the test kit.
//!
//! Every error that concerns a running (or dying) server carries the last
//! lines of that server's log, so a failed test shows why the server refused
//! to start without anyone having to find its temporary directory.

use std::path::PathBuf;
use std::process::ExitStatus;
use std::time::Duration;

/// What went wrong while launching or driving a server.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// The server binary could not be found.
    #[error("{program} not found: {hint}")]
    BinaryNotFound {
        /// The program looked for (`nats-server`, `redis-server`).
        program: &'static str,
        /// What was tried and how to fix it.
        hint: String,
    },
    /// An I/O operation failed.
    #[error("{context}: {source}")]
    Io {
        /// What the kit was doing.
        context: String,
        /// The underlying error.
        #[source]
        source: std::io::Error,
    },
    /// The server exited before it became ready.
    #[error("{program} exited before it was ready ({status}); log {log_path:?} ends with:\n{log_tail}")]
    Exited {
        /// The program.
        program: &'static str,
        /// Its exit status.
        status: ExitStatus,
        /// Its log file.
        log_path: PathBuf,
        /// The last lines of its log.
        log_tail: String,
    },
    /// The server did not become ready within the deadline.
    #[error("{program} was not ready after {timeout:?}; log {log_path:?} ends with:\n{log_tail}")]
    NotReady {
        /// The program.
        program: &'static str,
        /// The deadline that passed.
        timeout: Duration,
        /// Its log file.
        log_path: PathBuf,
        /// The last lines of its log.
        log_tail: String,
    },
    /// Every attempt to start on free ports collided with another process.
    #[error("{program} could not bind free ports after {attempts} attempts")]
    PortsInUse {
        /// The program.
        program: &'static str,
        /// Attempts made.
        attempts: u32,
    },
    /// The operation needs a running server and there is none.
    #[error("{program} is not running")]
    NotRunning {
        /// The program.
        program: &'static str,
    },
}

impl Error {
    pub(crate) fn io(context: impl Into<String>, source: std::io::Error) -> Error {
        Error::Io { context: context.into(), source }
    }
}

/// The test kit's result type.
pub type Result<T> = std::result::Result<T, Error>;
