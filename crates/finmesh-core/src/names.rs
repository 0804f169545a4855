//! Validated names: [`StreamName`], [`BucketName`], [`ConsumerName`] and
//! KV [`Key`]s.
//!
//! Invariant: a value of these types always satisfies the rules below, so no
//! code past the boundary re-checks a raw string. The rules are JetStream's,
//! so every name is also valid on the NATS engine:
//! - stream, bucket and consumer names: 1–64 characters of `A–Z a–z 0–9 _ -`
//!   (bucket names 1–61, since the NATS engine stores bucket `b` as stream `KV_b`);
//! - keys: 1–[`MAX_KEY_LEN`] (958) characters of `A–Z a–z 0–9 - / _ = .`,
//!   not starting or ending with `.`, no empty `..` token, not starting with
//!   `_kv` (reserved).
//!
//! The limits fit together: both engines store key `k` of bucket `b` under
//! the subject `$KV.b.k`, which must stay within
//! [`MAX_SUBJECT_LEN`](crate::subject::MAX_SUBJECT_LEN) (1024) for the
//! longest bucket name, so `MAX_KEY_LEN = 1024 - len("$KV.") - 61 - len(".")`;
//! and bucket `b`'s stream `KV_b` fits the 64-character stream name limit.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Deserializer, Serialize};

use crate::{Error, Result};

fn check_name(what: &str, s: &str, max: usize) -> Result<()> {
    if s.is_empty() {
        return Err(Error::invalid(format!("{what} must not be empty")));
    }
    if s.len() > max {
        return Err(Error::invalid(format!("{what} `{}…` is {} bytes long; the limit is {max}", truncate(s), s.len())));
    }
    if let Some((i, c)) = s.char_indices().find(|(_, c)| !(c.is_ascii_alphanumeric() || *c == '_' || *c == '-')) {
        return Err(Error::invalid(format!(
            "{what} `{}` has {c:?} at byte {i}; allowed are A-Z a-z 0-9 _ -",
            truncate(s)
        )));
    }
    Ok(())
}

pub(crate) fn truncate(s: &str) -> &str {
    match s.char_indices().nth(64) {
        Some((i, _)) => &s[..i],
        None => s,
    }
}

macro_rules! name_type {
    ($(#[$doc:meta])* $name:ident, $what:literal, $max:expr) => {
        $(#[$doc])*
        #[derive(Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
        #[serde(transparent)]
        pub struct $name(String);

        impl $name {
            /// Validate `s` and wrap it.
            pub fn new(s: impl Into<String>) -> Result<Self> {
                let s = s.into();
                check_name($what, &s, $max)?;
                Ok($name(s))
            }

            /// The name as a string slice.
            pub fn as_str(&self) -> &str {
                &self.0
            }
        }

        impl FromStr for $name {
            type Err = Error;
            fn from_str(s: &str) -> Result<Self> {
                Self::new(s)
            }
        }

        impl TryFrom<&str> for $name {
            type Error = Error;
            fn try_from(s: &str) -> Result<Self> {
                Self::new(s)
            }
        }

        impl AsRef<str> for $name {
            fn as_ref(&self) -> &str {
                &self.0
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(&self.0)
            }
        }

        impl fmt::Debug for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                write!(f, "{}({:?})", stringify!($name), self.0)
            }
        }

        impl<'de> Deserialize<'de> for $name {
            fn deserialize<D: Deserializer<'de>>(d: D) -> std::result::Result<Self, D::Error> {
                let s = String::deserialize(d)?;
                $name::new(s).map_err(serde::de::Error::custom)
            }
        }
    };
}

/// Longest stream name, in bytes.
pub const MAX_STREAM_NAME_LEN: usize = 64;
/// Longest bucket name, in bytes: the NATS engine's backing stream `KV_<b>`
/// must be a valid stream name.
pub const MAX_BUCKET_NAME_LEN: usize = MAX_STREAM_NAME_LEN - "KV_".len();
/// Longest consumer name, in bytes.
pub const MAX_CONSUMER_NAME_LEN: usize = 64;

name_type!(
    /// The name of a stream: 1–64 characters of `A–Z a–z 0–9 _ -`.
    StreamName, "stream name", MAX_STREAM_NAME_LEN
);
name_type!(
    /// The name of a KV bucket: 1–61 characters of `A–Z a–z 0–9 _ -`.
    BucketName, "bucket name", MAX_BUCKET_NAME_LEN
);
name_type!(
    /// The name of a durable consumer: 1–64 characters of `A–Z a–z 0–9 _ -`.
    ConsumerName, "consumer name", MAX_CONSUMER_NAME_LEN
);

/// Buckets whose names start with this (case-insensitively) hold finmesh's
/// own data, such as the wrapped key ring (`_finmesh_keys`): engines accept
/// them, the gateway refuses them to clients ([`BucketName::is_reserved`]).
pub const RESERVED_BUCKET_PREFIX: &str = "_finmesh";

impl BucketName {
    /// Is this one of finmesh's internal buckets ([`RESERVED_BUCKET_PREFIX`])?
    pub fn is_reserved(&self) -> bool {
        self.as_str()
            .get(..RESERVED_BUCKET_PREFIX.len())
            .is_some_and(|p| p.eq_ignore_ascii_case(RESERVED_BUCKET_PREFIX))
    }
}

/// Longest key accepted, in bytes: the subject `$KV.<bucket>.<key>` of the
/// longest bucket name must stay within the subject limit.
pub const MAX_KEY_LEN: usize = crate::subject::MAX_SUBJECT_LEN - "$KV.".len() - MAX_BUCKET_NAME_LEN - ".".len();

/// A KV key, following the JetStream KV key rules (see the module doc).
#[derive(Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
#[serde(transparent)]
pub struct Key(String);

impl Key {
    /// Validate `s` and wrap it.
    pub fn new(s: impl Into<String>) -> Result<Self> {
        let s = s.into();
        if s.is_empty() {
            return Err(Error::invalid("key must not be empty"));
        }
        if s.len() > MAX_KEY_LEN {
            return Err(Error::invalid(format!(
                "key `{}…` is {} bytes long; the limit is {MAX_KEY_LEN}",
                truncate(&s),
                s.len()
            )));
        }
        // One pass over the bytes (every request names a key): the first
        // byte outside the allowed set, and the first `..`.
        let mut empty_token = None;
        for (i, w) in s.as_bytes().iter().enumerate() {
            let c = *w;
            if !(c.is_ascii_alphanumeric() || matches!(c, b'-' | b'/' | b'_' | b'=' | b'.')) {
                // A byte outside ASCII is the first of its character here.
                let c = s[i..].chars().next().expect("i is a character boundary");
                return Err(Error::invalid(format!(
                    "key `{}` has {c:?} at byte {i}; allowed are A-Z a-z 0-9 - / _ = .",
                    truncate(&s)
                )));
            }
            if c == b'.' && i > 0 && s.as_bytes()[i - 1] == b'.' && empty_token.is_none() {
                empty_token = Some(i - 1);
            }
        }
        if s.starts_with('.') || s.ends_with('.') {
            return Err(Error::invalid(format!("key `{}` must not start or end with `.`", truncate(&s))));
        }
        if let Some(i) = empty_token {
            return Err(Error::invalid(format!("key `{}` has an empty token (`..`) at byte {i}", truncate(&s))));
        }
        if s.starts_with("_kv") {
            return Err(Error::invalid(format!("key `{}` starts with `_kv`, which is reserved", truncate(&s))));
        }
        Ok(Key(s))
    }

    /// The key as a string slice.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl FromStr for Key {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        Self::new(s)
    }
}

impl TryFrom<&str> for Key {
    type Error = Error;
    fn try_from(s: &str) -> Result<Self> {
        Self::new(s)
    }
}

impl AsRef<str> for Key {
    fn as_ref(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for Key {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl fmt::Debug for Key {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Key({:?})", self.0)
    }
}

impl<'de> Deserialize<'de> for Key {
    fn deserialize<D: Deserializer<'de>>(d: D) -> std::result::Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        Key::new(s).map_err(serde::de::Error::custom)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ErrorKind;

    #[test]
    fn stream_names() {
        assert!(StreamName::new("ORDERS").is_ok());
        assert!(StreamName::new("md_eu-1").is_ok());
        let e = StreamName::new("a.b").unwrap_err();
        assert_eq!(e.kind(), ErrorKind::Invalid);
        assert!(e.message().contains("'.' at byte 1"), "{e}");
        assert!(StreamName::new("").unwrap_err().message().contains("empty"));
        assert!(StreamName::new("a b").is_err());
        assert!(StreamName::new("a*").is_err());
        assert!(StreamName::new("x".repeat(65)).unwrap_err().message().contains("limit is 64"));
        assert!(BucketName::new("x".repeat(62)).is_err());
        assert!(ConsumerName::new("worker-1").is_ok());
    }

    #[test]
    fn keys_follow_jetstream_rules() {
        assert_eq!(MAX_KEY_LEN, 958);
        for ok in ["a", "card.4111", "a/b=c_d-e", "A.B.C", "x".repeat(MAX_KEY_LEN).as_str()] {
            assert!(Key::new(ok).is_ok(), "{ok}");
        }
        let cases = [
            ("", "empty"),
            (".a", "start or end"),
            ("a.", "start or end"),
            ("a..b", "empty token"),
            ("a b", "' ' at byte 1"),
            ("a*", "'*' at byte 1"),
            ("a>", "'>'"),
            ("_kv.x", "reserved"),
        ];
        for (bad, why) in cases {
            let e = Key::new(bad).unwrap_err();
            assert_eq!(e.kind(), ErrorKind::Invalid);
            assert!(e.message().contains(why), "{bad}: {e}");
        }
        assert!(Key::new("x".repeat(959)).unwrap_err().message().contains("limit is 958"));
    }

    /// The rules of `Key::new` as first written (several passes), to check
    /// the one-pass version against.
    fn key_reference(s: &str) -> std::result::Result<(), String> {
        if s.is_empty() {
            return Err("key must not be empty".into());
        }
        if let Some((i, c)) =
            s.char_indices().find(|(_, c)| !(c.is_ascii_alphanumeric() || matches!(c, '-' | '/' | '_' | '=' | '.')))
        {
            return Err(format!("key `{}` has {c:?} at byte {i}; allowed are A-Z a-z 0-9 - / _ = .", truncate(s)));
        }
        if s.starts_with('.') || s.ends_with('.') {
            return Err(format!("key `{}` must not start or end with `.`", truncate(s)));
        }
        if let Some(i) = s.find("..") {
            return Err(format!("key `{}` has an empty token (`..`) at byte {i}", truncate(s)));
        }
        if s.starts_with("_kv") {
            return Err(format!("key `{}` starts with `_kv`, which is reserved", truncate(s)));
        }
        Ok(())
    }

    /// Every string of up to 5 characters over an alphabet that hits each
    /// rule (and their order) gets the reference's answer, word for word.
    #[test]
    fn one_pass_key_check_matches_the_reference() {
        let alphabet = ['a', '.', '*', 'é', '_', 'k', 'v', '/'];
        let mut strings = vec![String::new()];
        let mut checked = 0;
        for _ in 0..5 {
            let mut next = Vec::new();
            for s in &strings {
                for c in alphabet {
                    let mut t = s.clone();
                    t.push(c);
                    let got = Key::new(t.as_str()).map(|_| ()).map_err(|e| e.message().to_owned());
                    assert_eq!(got, key_reference(&t), "{t:?}");
                    checked += 1;
                    next.push(t);
                }
            }
            strings = next;
        }
        assert_eq!(checked, 8 + 64 + 512 + 4096 + 32768);
    }

    /// Regression (issue 17): a key of 1,020–1,024 bytes was valid, but its
    /// subject `$KV.<bucket>.<key>` was not, and the embedded engine panicked.
    /// Every valid key of the longest bucket name makes a valid subject.
    #[test]
    fn longest_key_of_longest_bucket_is_a_valid_subject() {
        let bucket = BucketName::new("b".repeat(MAX_BUCKET_NAME_LEN)).unwrap();
        let key = Key::new("k".repeat(MAX_KEY_LEN)).unwrap();
        let subject = crate::Subject::new(format!("$KV.{bucket}.{key}")).unwrap();
        assert_eq!(subject.as_str().len(), crate::subject::MAX_SUBJECT_LEN);
        assert!(StreamName::new(format!("KV_{bucket}")).is_ok());
    }

    #[test]
    fn serde_validates() {
        let k: Key = serde_json::from_str("\"a.b\"").unwrap();
        assert_eq!(k.as_str(), "a.b");
        assert!(serde_json::from_str::<Key>("\"a..b\"").is_err());
        assert!(serde_json::from_str::<StreamName>("\"a.b\"").is_err());
    }
}
