//! The one error type of finmesh: a small comparable [`ErrorKind`] plus a
//! message and an optional source.
//!
//! Invariants:
//! - callers and tests branch on [`Error::kind`], never on message text;
//! - the message is safe to show to a client (no secrets, no internal paths);
//!   internal detail goes into the `source`, which the gateway logs and never
//!   sends;
//! - a [`ErrorKind::WrongRevision`] error always carries the current revision
//!   (`Revision(0)` when the key does not exist), so a client can retry.

use std::fmt;

use crate::Revision;

/// What went wrong, as a small comparable enum. One place (the gateway) maps
/// each kind to an HTTP status and a `problem+json` type.
#[non_exhaustive]
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ErrorKind {
    /// The stream, bucket, consumer, key or message does not exist.
    NotFound,
    /// Creating something that exists with a different configuration.
    AlreadyExists,
    /// A compare-and-set precondition failed; see [`Error::current_revision`].
    WrongRevision,
    /// The request breaks a rule (name, subject, configuration, argument).
    Invalid,
    /// A message or value is larger than the configured limit, or a write
    /// does not fit in what a bucket's `max_bytes` leaves; nothing was written.
    TooLarge,
    /// No valid credentials.
    Unauthorized,
    /// Valid credentials without the needed permission.
    Forbidden,
    /// The engine cannot serve the request now (server down, no quorum,
    /// poisoned store, shutting down). Retrying later may succeed.
    Unavailable,
    /// The operation did not finish within its deadline.
    Timeout,
    /// A bug or an unexpected failure (corrupt record, I/O error).
    Internal,
    /// A stored value fails its integrity check: a sealed value of an
    /// encrypted bucket was changed, copied from another key or bucket, or
    /// was never sealed by finmesh. A server-side problem (HTTP 500 with its
    /// own problem type), never retried; the message names no key or byte.
    Integrity,
}

impl ErrorKind {
    /// A stable, lower-case name for logs, metrics and `problem+json` types.
    pub fn as_str(self) -> &'static str {
        match self {
            ErrorKind::NotFound => "not-found",
            ErrorKind::AlreadyExists => "already-exists",
            ErrorKind::WrongRevision => "wrong-revision",
            ErrorKind::Invalid => "invalid",
            ErrorKind::TooLarge => "too-large",
            ErrorKind::Unauthorized => "unauthorized",
            ErrorKind::Forbidden => "forbidden",
            ErrorKind::Unavailable => "unavailable",
            ErrorKind::Timeout => "timeout",
            ErrorKind::Internal => "internal",
            ErrorKind::Integrity => "integrity",
        }
    }
}

impl fmt::Display for ErrorKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

type Source = Box<dyn std::error::Error + Send + Sync + 'static>;

/// A finmesh error: kind, client-safe message, optional source.
pub struct Error {
    kind: ErrorKind,
    message: String,
    current_revision: Option<Revision>,
    source: Option<Source>,
}

/// `Result` with finmesh's [`Error`].
pub type Result<T, E = Error> = std::result::Result<T, E>;

impl Error {
    /// An error of `kind` with a client-safe message.
    pub fn new(kind: ErrorKind, message: impl Into<String>) -> Self {
        Error { kind, message: message.into(), current_revision: None, source: None }
    }

    /// Attach the underlying cause (logged, never shown to clients).
    pub fn with_source(mut self, source: impl Into<Source>) -> Self {
        self.source = Some(source.into());
        self
    }

    /// A [`ErrorKind::NotFound`] error.
    pub fn not_found(message: impl Into<String>) -> Self {
        Self::new(ErrorKind::NotFound, message)
    }

    /// An [`ErrorKind::Invalid`] error.
    pub fn invalid(message: impl Into<String>) -> Self {
        Self::new(ErrorKind::Invalid, message)
    }

    /// A [`ErrorKind::TooLarge`] error.
    pub fn too_large(message: impl Into<String>) -> Self {
        Self::new(ErrorKind::TooLarge, message)
    }

    /// A [`ErrorKind::Unavailable`] error.
    pub fn unavailable(message: impl Into<String>) -> Self {
        Self::new(ErrorKind::Unavailable, message)
    }

    /// An [`ErrorKind::Internal`] error.
    pub fn internal(message: impl Into<String>) -> Self {
        Self::new(ErrorKind::Internal, message)
    }

    /// A failed compare-and-set. `current` is the key's current revision,
    /// `Revision(0)` when it has none.
    pub fn wrong_revision(current: Revision, message: impl Into<String>) -> Self {
        let mut e = Self::new(ErrorKind::WrongRevision, message);
        e.current_revision = Some(current);
        e
    }

    /// What went wrong.
    pub fn kind(&self) -> ErrorKind {
        self.kind
    }

    /// The client-safe message.
    pub fn message(&self) -> &str {
        &self.message
    }

    /// For [`ErrorKind::WrongRevision`]: the key's current revision.
    pub fn current_revision(&self) -> Option<Revision> {
        self.current_revision
    }
}

impl fmt::Debug for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut d = f.debug_struct("Error");
        d.field("kind", &self.kind).field("message", &self.message);
        if let Some(r) = self.current_revision {
            d.field("current_revision", &r);
        }
        if let Some(s) = &self.source {
            d.field("source", s);
        }
        d.finish()
    }
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.kind, self.message)?;
        if let Some(r) = self.current_revision {
            write!(f, " (current revision {r})")?;
        }
        Ok(())
    }
}

impl std::error::Error for Error {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        self.source.as_deref().map(|s| s as &(dyn std::error::Error + 'static))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn display_names_kind_and_revision() {
        let e = Error::wrong_revision(Revision(7), "key `a` changed");
        assert_eq!(e.kind(), ErrorKind::WrongRevision);
        assert_eq!(e.current_revision(), Some(Revision(7)));
        assert_eq!(e.to_string(), "wrong-revision: key `a` changed (current revision 7)");
    }

    #[test]
    fn source_is_kept_but_not_displayed() {
        let io = std::io::Error::other("disk on fire");
        let e = Error::internal("write failed").with_source(io);
        assert_eq!(e.to_string(), "internal: write failed");
        assert!(std::error::Error::source(&e).is_some());
    }
}
