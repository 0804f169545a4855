//! Messages, sequence numbers, revisions, timestamps and headers.
//!
//! Invariants:
//! - [`Seq`] and [`Revision`] start at 1; `0` means "none" (an empty stream's
//!   last sequence, a key that does not exist);
//! - header names are 1–128 bytes of visible ASCII without `:`; values have no
//!   CR or LF (NATS header rules), so headers survive both engines unchanged;
//! - payloads are [`Bytes`] end to end: cloning a message never copies data.

use std::fmt;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use serde::{Deserialize, Serialize};

use crate::{Error, Result, Subject};

/// A stream sequence number. `Seq(0)` means none.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default, Serialize, Deserialize)]
#[serde(transparent)]
pub struct Seq(pub u64);

/// A KV revision: bucket-wide and strictly increasing. `Revision(0)` means none.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default, Serialize, Deserialize)]
#[serde(transparent)]
pub struct Revision(pub u64);

impl Seq {
    /// The sequence after this one.
    pub fn next(self) -> Seq {
        Seq(self.0 + 1)
    }
}

impl fmt::Display for Seq {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.fmt(f)
    }
}

impl fmt::Display for Revision {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.fmt(f)
    }
}

/// A point in time, in nanoseconds since the Unix epoch (UTC).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default, Serialize, Deserialize)]
#[serde(transparent)]
pub struct Timestamp(pub u64);

impl Timestamp {
    /// The current wall-clock time.
    pub fn now() -> Timestamp {
        Timestamp::from(SystemTime::now())
    }

    /// Nanoseconds since the epoch.
    pub fn as_nanos(self) -> u64 {
        self.0
    }

    /// This time plus `d`, saturating.
    pub fn saturating_add(self, d: Duration) -> Timestamp {
        Timestamp(self.0.saturating_add(d.as_nanos().min(u64::MAX as u128) as u64))
    }

    /// This time minus `d`, saturating at the epoch.
    pub fn saturating_sub(self, d: Duration) -> Timestamp {
        Timestamp(self.0.saturating_sub(d.as_nanos().min(u64::MAX as u128) as u64))
    }

    /// Time elapsed from `earlier` to `self`, zero if `earlier` is later.
    pub fn since(self, earlier: Timestamp) -> Duration {
        Duration::from_nanos(self.0.saturating_sub(earlier.0))
    }
}

impl From<SystemTime> for Timestamp {
    fn from(t: SystemTime) -> Self {
        let nanos = t.duration_since(UNIX_EPOCH).map(|d| d.as_nanos()).unwrap_or(0);
        Timestamp(nanos.min(u64::MAX as u128) as u64)
    }
}

impl From<Timestamp> for SystemTime {
    fn from(t: Timestamp) -> Self {
        UNIX_EPOCH + Duration::from_nanos(t.0)
    }
}

/// Longest header name, in bytes.
pub const MAX_HEADER_NAME_LEN: usize = 128;

/// The header that carries a message id for deduplication (JetStream's name).
pub const MSG_ID_HEADER: &str = "Nats-Msg-Id";

/// Message headers: an ordered multimap of names to values.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(transparent)]
pub struct Headers(Vec<(String, String)>);

impl Headers {
    /// No headers.
    pub fn new() -> Self {
        Headers(Vec::new())
    }

    /// Check one header; the error names the rule broken.
    pub fn validate_pair(name: &str, value: &str) -> Result<()> {
        if name.is_empty() || name.len() > MAX_HEADER_NAME_LEN {
            return Err(Error::invalid(format!(
                "header name must be 1-{MAX_HEADER_NAME_LEN} bytes, got {}",
                name.len()
            )));
        }
        if let Some((i, c)) = name.char_indices().find(|(_, c)| !c.is_ascii_graphic() || *c == ':') {
            return Err(Error::invalid(format!(
                "header name `{name}` has {c:?} at byte {i}; allowed is visible ASCII except `:`"
            )));
        }
        if let Some(i) = value.find(['\r', '\n']) {
            return Err(Error::invalid(format!("value of header `{name}` has a line break at byte {i}")));
        }
        Ok(())
    }

    /// Append a header after validating it.
    pub fn append(&mut self, name: impl Into<String>, value: impl Into<String>) -> Result<()> {
        let (name, value) = (name.into(), value.into());
        Self::validate_pair(&name, &value)?;
        self.0.push((name, value));
        Ok(())
    }

    /// Replace every value of `name` with one value.
    pub fn insert(&mut self, name: impl Into<String>, value: impl Into<String>) -> Result<()> {
        let (name, value) = (name.into(), value.into());
        Self::validate_pair(&name, &value)?;
        self.0.retain(|(n, _)| !n.eq_ignore_ascii_case(&name));
        self.0.push((name, value));
        Ok(())
    }

    /// Remove every value of `name`.
    pub fn remove(&mut self, name: &str) {
        self.0.retain(|(n, _)| !n.eq_ignore_ascii_case(name));
    }

    /// The first value of `name` (names compare case-insensitively).
    pub fn get(&self, name: &str) -> Option<&str> {
        self.0.iter().find(|(n, _)| n.eq_ignore_ascii_case(name)).map(|(_, v)| v.as_str())
    }

    /// All headers in order.
    pub fn iter(&self) -> impl Iterator<Item = (&str, &str)> {
        self.0.iter().map(|(n, v)| (n.as_str(), v.as_str()))
    }

    /// Number of header entries.
    pub fn len(&self) -> usize {
        self.0.len()
    }

    /// No headers at all?
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// Bytes the headers occupy (names + values), counted against size limits.
    pub fn encoded_len(&self) -> usize {
        self.0.iter().map(|(n, v)| n.len() + v.len() + 4).sum()
    }

    /// Check every header (for headers built by deserialization).
    pub fn validate(&self) -> Result<()> {
        self.0.iter().try_for_each(|(n, v)| Self::validate_pair(n, v))
    }
}

/// A message to publish.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OutgoingMessage {
    /// Must match one of the stream's subject patterns.
    pub subject: Subject,
    /// Headers; a [`MSG_ID_HEADER`] deduplicates within the stream's window.
    pub headers: Headers,
    /// The payload.
    pub payload: Bytes,
}

impl OutgoingMessage {
    /// A message without headers.
    pub fn new(subject: Subject, payload: impl Into<Bytes>) -> Self {
        OutgoingMessage { subject, headers: Headers::new(), payload: payload.into() }
    }

    /// Set the deduplication id: `Invalid` if it is empty. Ids longer than
    /// 256 bytes are refused by the engines with `Invalid`, and so is an
    /// empty one set through the headers directly.
    pub fn with_msg_id(mut self, id: impl Into<String>) -> Result<Self> {
        let id = id.into();
        if id.is_empty() {
            return Err(Error::invalid("a message id must not be empty"));
        }
        self.headers.insert(MSG_ID_HEADER, id)?;
        Ok(self)
    }

    /// The deduplication id, if any.
    pub fn msg_id(&self) -> Option<&str> {
        self.headers.get(MSG_ID_HEADER)
    }

    /// Size counted against `max_msg_size`: subject + headers + payload.
    pub fn size(&self) -> usize {
        self.subject.as_str().len() + self.headers.encoded_len() + self.payload.len()
    }
}

/// A stored message, as read back from a stream.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Message {
    /// Its stream sequence.
    pub seq: Seq,
    /// Its subject.
    pub subject: Subject,
    /// Its headers, as published.
    pub headers: Headers,
    /// Its payload.
    pub payload: Bytes,
    /// When the stream stored it.
    pub time: Timestamp,
}

impl Message {
    /// Size counted against limits: subject + headers + payload.
    pub fn size(&self) -> usize {
        self.subject.as_str().len() + self.headers.encoded_len() + self.payload.len()
    }
}

/// The answer to a publish.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct PubAck {
    /// The sequence the message is stored at (for a duplicate: the original's).
    pub seq: Seq,
    /// The message id was seen within the duplicate window; nothing was stored.
    pub duplicate: bool,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn headers_validate_and_lookup() {
        let mut h = Headers::new();
        h.append("X-A", "1").unwrap();
        h.append("x-a", "2").unwrap();
        assert_eq!(h.get("X-a"), Some("1"));
        h.insert("X-A", "3").unwrap();
        assert_eq!(h.len(), 1);
        assert!(h.append("bad name", "v").unwrap_err().message().contains("' ' at byte 3"));
        assert!(h.append("a:b", "v").is_err());
        assert!(h.append("n", "a\r\nb").unwrap_err().message().contains("line break"));
    }

    #[test]
    fn timestamp_arithmetic() {
        let t = Timestamp(1_000);
        assert_eq!(t.saturating_sub(Duration::from_nanos(2_000)), Timestamp(0));
        assert_eq!(t.saturating_add(Duration::from_nanos(5)).since(t), Duration::from_nanos(5));
        let now = Timestamp::now();
        assert_eq!(Timestamp::from(SystemTime::from(now)), now);
    }
}
