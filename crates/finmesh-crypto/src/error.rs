//! The error type of finmesh-crypto: a small comparable [`CryptoErrorKind`],
//! a message, the key id involved (if any) and an optional source.
//!
//! Invariants:
//! - the message never contains key material, a plaintext, a ciphertext or a
//!   client's clear key (a card number used as a key): every message is
//!   written from constants, key ids, bucket names, lengths, positions, file
//!   paths and environment variable names only;
//! - callers branch on [`CryptoError::kind`], never on the text. Two kinds
//!   drive behaviour: [`CryptoErrorKind::UnknownKey`] (reload the ring once,
//!   then retry; [`crate::RingStore::open_value`] does that) and
//!   [`CryptoErrorKind::Integrity`] (the value was changed, moved to another
//!   bucket or key, or is not ours: never retry);
//! - [`From<CryptoError>`] for [`finmesh_core::Error`] is the one place that
//!   maps kinds onto the engine's error kinds.

use std::fmt;

use finmesh_core::ErrorKind;

use crate::KeyId;

/// What went wrong, as a small comparable enum.
#[non_exhaustive]
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum CryptoErrorKind {
    /// A ciphertext, a wrapped key or the stored ring fails to open: it was
    /// changed, moved to another bucket, key or data key, or was never ours.
    Integrity,
    /// The ciphertext names a key id the loaded ring does not hold; see
    /// [`CryptoError::key_id`]. Reload the ring once, then fail.
    UnknownKey,
    /// The key's state forbids the operation (opening with a retired key,
    /// retiring the active key, …); see [`CryptoError::key_id`].
    KeyState,
    /// The master key does not open the stored ring.
    WrongMasterKey,
    /// The master key cannot be had: missing, unreadable, malformed, or in a
    /// file that others can read.
    MasterKey,
    /// Bytes that are not a finmesh ciphertext or wrapped ring at all (too
    /// short, unknown magic or format version, bad JSON).
    Malformed,
    /// The engine holds no key ring yet.
    NoRing,
    /// An argument breaks a rule (an empty clear key, …).
    Invalid,
    /// The engine failed while loading or saving the ring; see the source.
    Storage,
    /// The system random generator or the crypto library failed.
    Internal,
}

impl CryptoErrorKind {
    /// A stable, lower-case name for logs and metrics.
    pub fn as_str(self) -> &'static str {
        match self {
            CryptoErrorKind::Integrity => "integrity",
            CryptoErrorKind::UnknownKey => "unknown-key",
            CryptoErrorKind::KeyState => "key-state",
            CryptoErrorKind::WrongMasterKey => "wrong-master-key",
            CryptoErrorKind::MasterKey => "master-key",
            CryptoErrorKind::Malformed => "malformed",
            CryptoErrorKind::NoRing => "no-ring",
            CryptoErrorKind::Invalid => "invalid",
            CryptoErrorKind::Storage => "storage",
            CryptoErrorKind::Internal => "internal",
        }
    }
}

impl fmt::Display for CryptoErrorKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

type Source = Box<dyn std::error::Error + Send + Sync + 'static>;

/// A finmesh-crypto error: kind, message without secrets, the key id
/// involved, optional source.
pub struct CryptoError {
    kind: CryptoErrorKind,
    message: String,
    key_id: Option<KeyId>,
    source: Option<Source>,
}

/// `Result` with [`CryptoError`].
pub type Result<T, E = CryptoError> = std::result::Result<T, E>;

impl CryptoError {
    /// An error of `kind`. The message must hold no secret (see the module doc).
    pub fn new(kind: CryptoErrorKind, message: impl Into<String>) -> Self {
        CryptoError { kind, message: message.into(), key_id: None, source: None }
    }

    /// Name the key id involved.
    pub fn with_key_id(mut self, id: KeyId) -> Self {
        self.key_id = Some(id);
        self
    }

    /// Attach the underlying cause. Only causes that hold no secret (I/O
    /// errors, engine errors) are ever attached.
    pub fn with_source(mut self, source: impl Into<Source>) -> Self {
        self.source = Some(source.into());
        self
    }

    pub(crate) fn integrity(message: impl Into<String>) -> Self {
        Self::new(CryptoErrorKind::Integrity, message)
    }

    pub(crate) fn unknown_key(id: KeyId) -> Self {
        Self::new(CryptoErrorKind::UnknownKey, format!("data key {id} is not in the loaded key ring")).with_key_id(id)
    }

    pub(crate) fn key_state(id: KeyId, message: impl Into<String>) -> Self {
        Self::new(CryptoErrorKind::KeyState, message).with_key_id(id)
    }

    pub(crate) fn malformed(message: impl Into<String>) -> Self {
        Self::new(CryptoErrorKind::Malformed, message)
    }

    pub(crate) fn internal(message: impl Into<String>) -> Self {
        Self::new(CryptoErrorKind::Internal, message)
    }

    pub(crate) fn random() -> Self {
        Self::internal("the system random generator failed")
    }

    /// What went wrong.
    pub fn kind(&self) -> CryptoErrorKind {
        self.kind
    }

    /// The message (holds no secret).
    pub fn message(&self) -> &str {
        &self.message
    }

    /// The key id involved: the unknown one for [`CryptoErrorKind::UnknownKey`],
    /// the one in the wrong state for [`CryptoErrorKind::KeyState`].
    pub fn key_id(&self) -> Option<KeyId> {
        self.key_id
    }
}

impl fmt::Debug for CryptoError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut d = f.debug_struct("CryptoError");
        d.field("kind", &self.kind).field("message", &self.message);
        if let Some(id) = self.key_id {
            d.field("key_id", &id);
        }
        if let Some(s) = &self.source {
            d.field("source", s);
        }
        d.finish()
    }
}

impl fmt::Display for CryptoError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.kind, self.message)
    }
}

impl std::error::Error for CryptoError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        self.source.as_deref().map(|s| s as &(dyn std::error::Error + 'static))
    }
}

impl From<finmesh_core::Error> for CryptoError {
    fn from(e: finmesh_core::Error) -> Self {
        CryptoError::new(CryptoErrorKind::Storage, format!("the key ring store failed: {}", e.message())).with_source(e)
    }
}

impl From<CryptoError> for finmesh_core::Error {
    /// Integrity failures and malformed values are `Integrity` (a stored
    /// value that fails to open: server side, never retried); a key not loaded or a master key problem means the node
    /// cannot serve now (`Unavailable`); a refused key state change is
    /// `Invalid`; an engine failure keeps the engine's kind.
    fn from(e: CryptoError) -> Self {
        let kind = match e.kind {
            CryptoErrorKind::Integrity | CryptoErrorKind::Malformed => ErrorKind::Integrity,
            CryptoErrorKind::Internal => ErrorKind::Internal,
            CryptoErrorKind::UnknownKey | CryptoErrorKind::WrongMasterKey | CryptoErrorKind::MasterKey => {
                ErrorKind::Unavailable
            }
            CryptoErrorKind::KeyState | CryptoErrorKind::Invalid => ErrorKind::Invalid,
            CryptoErrorKind::NoRing => ErrorKind::NotFound,
            CryptoErrorKind::Storage => e
                .source
                .as_deref()
                .and_then(|s| s.downcast_ref::<finmesh_core::Error>())
                .map_or(ErrorKind::Internal, |s| s.kind()),
        };
        let message = e.message.clone();
        finmesh_core::Error::new(kind, message).with_source(e)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn maps_onto_engine_kinds() {
        let e: finmesh_core::Error = CryptoError::unknown_key(KeyId(9)).into();
        assert_eq!(e.kind(), ErrorKind::Unavailable);
        assert_eq!(e.message(), "data key 9 is not in the loaded key ring");
        let e: finmesh_core::Error = CryptoError::integrity("x").into();
        assert_eq!(e.kind(), ErrorKind::Integrity);
        let e: finmesh_core::Error = CryptoError::malformed("x").into();
        assert_eq!(e.kind(), ErrorKind::Integrity);
        let storage: CryptoError = finmesh_core::Error::wrong_revision(finmesh_core::Revision(3), "changed").into();
        assert_eq!(storage.kind(), CryptoErrorKind::Storage);
        let e: finmesh_core::Error = storage.into();
        assert_eq!(e.kind(), ErrorKind::WrongRevision);
    }

    #[test]
    fn unknown_key_names_its_id() {
        let e = CryptoError::unknown_key(KeyId(42));
        assert_eq!(e.kind(), CryptoErrorKind::UnknownKey);
        assert_eq!(e.key_id(), Some(KeyId(42)));
        assert_eq!(e.to_string(), "unknown-key: data key 42 is not in the loaded key ring");
    }
}
