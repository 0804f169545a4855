//! finmesh-client: the Rust SDK for finmesh subscribers.
//!
//! [`Subscription`] follows a stream over Server-Sent Events
//! (`GET /v1/streams/{stream}/events`) or WebSocket
//! (`GET /v1/streams/{stream}/ws`, [`Transport`]) across failures: it
//! reconnects with a
//! jittered exponential [`Backoff`], resumes after the last sequence it
//! handed to the application (`Last-Event-ID`), fails over between a list
//! of endpoints, and reports every break in continuity (`gap`, `reset`, a
//! rewind) as an [`Event`] and in its [`Stats`] instead of hiding it.
//!
//! ```no_run
//! # async fn run() -> Result<(), finmesh_client::Error> {
//! use finmesh_client::{Event, Start, Subscription};
//! let mut sub = Subscription::builder(["http://node-a:8080", "http://node-b:8080"], "MD")
//!     .subject("md.eu.>")
//!     .token(std::env::var("FINMESH_TOKEN").unwrap_or_default())
//!     .start(Start::After(41)) // the position this application persisted
//!     .build()?;
//! while let Some(event) = sub.next().await? {
//!     match event {
//!         Event::Message(m) => println!("{} {}", m.seq, m.envelope),
//!         Event::Gap { from, to, .. } => eprintln!("lost {from}..={to}"),
//!         other => eprintln!("{other:?}"),
//!     }
//! }
//! # Ok(()) }
//! ```
//!
//! Read in this order: [`subscribe`] (the guarantees and the reconnection
//! rules), [`continuity`] (the sequence checks), [`transport`] (SSE and
//! WebSocket on the wire), [`backoff`], [`sse`] (the wire parser, shared
//! with the CLI).

pub mod backoff;
pub mod continuity;
pub mod sse;
pub mod subscribe;
pub mod transport;

pub use backoff::Backoff;
pub use continuity::{Continuity, Stats};
pub use subscribe::{Event, Message, Start, Subscription, SubscriptionBuilder};
pub use transport::Transport;

/// What went wrong, as a small comparable kind.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum ErrorKind {
    /// The subscription's settings or request are invalid (400).
    Invalid,
    /// No or a bad token (401).
    Unauthorized,
    /// The token does not grant the subscription (403).
    Forbidden,
    /// The stream does not exist, or was deleted (404).
    NotFound,
    /// Every attempt failed ([`SubscriptionBuilder::max_failed_attempts`]).
    Unavailable,
    /// The node sent something that is not finmesh's SSE or WebSocket protocol.
    Protocol,
}

/// A fatal error of a subscription: a kind and a message.
#[derive(Debug, Clone, thiserror::Error)]
#[error("{message}")]
pub struct Error {
    kind: ErrorKind,
    message: String,
}

impl Error {
    /// An error of `kind`.
    pub fn new(kind: ErrorKind, message: impl Into<String>) -> Self {
        Error { kind, message: message.into() }
    }

    /// Its kind.
    pub fn kind(&self) -> ErrorKind {
        self.kind
    }
}
