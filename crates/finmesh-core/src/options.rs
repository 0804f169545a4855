//! Options that a bucket or stream carries for its whole life: the security
//! options finmesh interprets ([`BucketSecurity`], [`StreamSecurity`]) and
//! free user metadata ([`Metadata`]).
//!
//! Both engines persist them with the configuration (the embedded engine in
//! its `stream/<name>` record, NATS in the JetStream stream's `metadata`
//! map under the keys of [`meta_keys`]) and report them in `bucket_info` /
//! `stream_info`.
//!
//! Invariants:
//! - a security option is **fixed at creation**: an update that changes
//!   one (sets, clears or replaces it) is refused with `Invalid`, on an empty
//!   bucket too (recreate the bucket instead). Changing the encryption or
//!   key hashing of a bucket holding data would make its values unreadable
//!   or its keys unreachable, and "empty" cannot be checked atomically with
//!   the update on every engine;
//! - engines only store the security options; enforcing them (sealing
//!   values, hashing keys, checking PANs) belongs to a wrapper engine that
//!   says so through [`KvEngine::supports_security`](crate::KvEngine::supports_security).
//!   A gateway refuses to create a bucket or stream whose options its engine
//!   stack does not enforce, so nothing is stored in clear under a promise
//!   of encryption;
//! - user metadata may change on update. Its keys are 1-[`MAX_METADATA_KEY_LEN`]
//!   bytes of `A-Z a-z 0-9 . _ -` and do not start with `finmesh.` or
//!   `_nats.` (the engines' and the NATS server's own keys); values are at
//!   most [`MAX_METADATA_VALUE_LEN`] bytes; at most
//!   [`MAX_METADATA_ENTRIES`] entries.

use std::collections::BTreeMap;
use std::fmt;

use serde::{Deserialize, Serialize};

/// How values (or message payloads) are sealed before they reach storage.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum Encryption {
    /// AES-256-GCM with a data key from the node's key ring.
    #[serde(rename = "aes256gcm")]
    Aes256Gcm,
}

/// How keys are replaced before they reach storage.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum KeyHashing {
    /// A keyed hash (HMAC-SHA-256) of the key.
    #[serde(rename = "hmac-sha256")]
    HmacSha256,
}

/// What keys must look like.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum KeyFormat {
    /// A payment card number (primary account number).
    #[serde(rename = "pan")]
    Pan,
}

impl Encryption {
    /// The name used in configs and metadata.
    pub fn as_str(self) -> &'static str {
        match self {
            Encryption::Aes256Gcm => "aes256gcm",
        }
    }

    /// Parse a name as [`as_str`](Self::as_str) writes it.
    pub fn parse(s: &str) -> Option<Self> {
        (s == "aes256gcm").then_some(Encryption::Aes256Gcm)
    }
}

impl KeyHashing {
    /// The name used in configs and metadata.
    pub fn as_str(self) -> &'static str {
        match self {
            KeyHashing::HmacSha256 => "hmac-sha256",
        }
    }

    /// Parse a name as [`as_str`](Self::as_str) writes it.
    pub fn parse(s: &str) -> Option<Self> {
        (s == "hmac-sha256").then_some(KeyHashing::HmacSha256)
    }
}

impl KeyFormat {
    /// The name used in configs and metadata.
    pub fn as_str(self) -> &'static str {
        match self {
            KeyFormat::Pan => "pan",
        }
    }

    /// Parse a name as [`as_str`](Self::as_str) writes it.
    pub fn parse(s: &str) -> Option<Self> {
        (s == "pan").then_some(KeyFormat::Pan)
    }
}

/// One security option with its value, as an engine stack may support it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum SecurityOption {
    /// `encryption = "…"`.
    Encryption(Encryption),
    /// `key_hashing = "…"`.
    KeyHashing(KeyHashing),
    /// `key_format = "…"`.
    KeyFormat(KeyFormat),
}

impl fmt::Display for SecurityOption {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            SecurityOption::Encryption(e) => write!(f, "encryption `{}`", e.as_str()),
            SecurityOption::KeyHashing(h) => write!(f, "key_hashing `{}`", h.as_str()),
            SecurityOption::KeyFormat(k) => write!(f, "key_format `{}`", k.as_str()),
        }
    }
}

impl SecurityOption {
    /// The field that sets it.
    pub fn field(self) -> &'static str {
        match self {
            SecurityOption::Encryption(_) => "encryption",
            SecurityOption::KeyHashing(_) => "key_hashing",
            SecurityOption::KeyFormat(_) => "key_format",
        }
    }
}

/// The security options of a KV bucket (all absent by default). Fixed at
/// creation (see the module doc).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BucketSecurity {
    /// Values are sealed with this cipher.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub encryption: Option<Encryption>,
    /// Keys are stored as this keyed hash.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub key_hashing: Option<KeyHashing>,
    /// Keys must have this format.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub key_format: Option<KeyFormat>,
}

impl BucketSecurity {
    /// No option set.
    pub fn is_none(&self) -> bool {
        *self == BucketSecurity::default()
    }

    /// The options set, in field order.
    pub fn options(&self) -> Vec<SecurityOption> {
        let mut v = Vec::new();
        v.extend(self.encryption.map(SecurityOption::Encryption));
        v.extend(self.key_hashing.map(SecurityOption::KeyHashing));
        v.extend(self.key_format.map(SecurityOption::KeyFormat));
        v
    }
}

/// The security options of a stream (all absent by default). Fixed at
/// creation (see the module doc).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StreamSecurity {
    /// Payloads are sealed with this cipher.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub encryption: Option<Encryption>,
}

impl StreamSecurity {
    /// No option set.
    pub fn is_none(&self) -> bool {
        *self == StreamSecurity::default()
    }

    /// The options set.
    pub fn options(&self) -> Vec<SecurityOption> {
        self.encryption.map(SecurityOption::Encryption).into_iter().collect()
    }
}

/// Most user metadata entries on one bucket or stream.
pub const MAX_METADATA_ENTRIES: usize = 16;
/// Longest user metadata key, in bytes.
pub const MAX_METADATA_KEY_LEN: usize = 64;
/// Longest user metadata value, in bytes.
pub const MAX_METADATA_VALUE_LEN: usize = 512;
/// Key prefixes user metadata may not use: finmesh's own and the NATS server's.
pub const RESERVED_METADATA_PREFIXES: [&str; 2] = ["finmesh.", "_nats."];

/// Free user metadata: name → text, kept and reported, never interpreted.
pub type Metadata = BTreeMap<String, String>;

/// Keys of finmesh's options in an engine's string map (the NATS engine's
/// stream `metadata`).
pub mod meta_keys {
    /// [`super::Encryption`] of a bucket or stream.
    pub const ENCRYPTION: &str = "finmesh.encryption";
    /// [`super::KeyHashing`] of a bucket.
    pub const KEY_HASHING: &str = "finmesh.key_hashing";
    /// [`super::KeyFormat`] of a bucket.
    pub const KEY_FORMAT: &str = "finmesh.key_format";
}

/// Every problem with `metadata`, appended to `problems`.
pub(crate) fn check_metadata(metadata: &Metadata, problems: &mut Vec<String>) {
    if metadata.len() > MAX_METADATA_ENTRIES {
        problems.push(format!("metadata has {} entries; at most {MAX_METADATA_ENTRIES} are allowed", metadata.len()));
    }
    for (k, v) in metadata {
        let shown: String = k.chars().take(MAX_METADATA_KEY_LEN).collect();
        if k.is_empty() || k.len() > MAX_METADATA_KEY_LEN {
            problems.push(format!("metadata key `{shown}` must be 1-{MAX_METADATA_KEY_LEN} bytes, got {}", k.len()));
        } else if !k.bytes().all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-')) {
            problems.push(format!("metadata key `{shown}` may hold only A-Z a-z 0-9 . _ -"));
        } else if let Some(p) = RESERVED_METADATA_PREFIXES.iter().find(|p| k.starts_with(**p)) {
            problems.push(format!("metadata key `{shown}` starts with `{p}`, which is reserved"));
        }
        if v.len() > MAX_METADATA_VALUE_LEN {
            problems.push(format!(
                "metadata value of `{shown}` is {} bytes; at most {MAX_METADATA_VALUE_LEN} are allowed",
                v.len()
            ));
        }
    }
}

/// Refuse an update that changes a security option (see the module doc).
pub fn check_security_unchanged(what: &str, old: &[SecurityOption], new: &[SecurityOption]) -> crate::Result<()> {
    let fields = ["encryption", "key_hashing", "key_format"];
    let mut changed = Vec::new();
    for f in fields {
        let o = old.iter().find(|x| x.field() == f);
        let n = new.iter().find(|x| x.field() == f);
        if o != n {
            let show = |x: Option<&SecurityOption>| x.map_or("none".to_owned(), |x| x.to_string());
            changed.push(format!("{f} from {} to {}", show(o), show(n)));
        }
    }
    if changed.is_empty() {
        Ok(())
    } else {
        Err(crate::Error::invalid(format!(
            "{what}: security options are fixed at creation and cannot change ({}); create a new one instead",
            changed.join(", ")
        )))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_the_documented_ones_and_unknown_values_are_refused() {
        let s: BucketSecurity =
            serde_json::from_str(r#"{"encryption":"aes256gcm","key_hashing":"hmac-sha256","key_format":"pan"}"#)
                .unwrap();
        assert_eq!(s.encryption, Some(Encryption::Aes256Gcm));
        assert_eq!(s.key_hashing, Some(KeyHashing::HmacSha256));
        assert_eq!(s.key_format, Some(KeyFormat::Pan));
        for o in s.options() {
            let name = match o {
                SecurityOption::Encryption(e) => e.as_str(),
                SecurityOption::KeyHashing(h) => h.as_str(),
                SecurityOption::KeyFormat(k) => k.as_str(),
            };
            assert_eq!(serde_json::to_value(s).unwrap()[o.field()], name);
        }
        let e = serde_json::from_str::<BucketSecurity>(r#"{"encryption":"aes128"}"#).unwrap_err().to_string();
        assert!(e.contains("aes128") && e.contains("aes256gcm"), "{e}");
        assert!(serde_json::from_str::<BucketSecurity>(r#"{"compression":"s2"}"#).is_err());
        assert!(serde_json::from_str::<StreamSecurity>(r#"{"key_hashing":"hmac-sha256"}"#).is_err());
        assert_eq!(serde_json::to_string(&BucketSecurity::default()).unwrap(), "{}");
        assert_eq!(Encryption::parse("aes256gcm"), Some(Encryption::Aes256Gcm));
        assert_eq!(KeyHashing::parse("HMAC-SHA256"), None);
        assert_eq!(KeyFormat::parse("pan"), Some(KeyFormat::Pan));
    }

    #[test]
    fn metadata_limits_report_every_problem() {
        let mut m = Metadata::new();
        m.insert(String::new(), "v".into());
        m.insert("k".repeat(MAX_METADATA_KEY_LEN + 1), "v".into());
        m.insert("a b".into(), "v".into());
        m.insert("finmesh.x".into(), "v".into());
        m.insert("_nats.req.level".into(), "v".into());
        m.insert("big".into(), "v".repeat(MAX_METADATA_VALUE_LEN + 1));
        let mut p = Vec::new();
        check_metadata(&m, &mut p);
        assert_eq!(p.len(), 6, "{p:?}");
        let mut ok = Metadata::new();
        for i in 0..MAX_METADATA_ENTRIES {
            ok.insert(format!("k{i}"), "v".repeat(MAX_METADATA_VALUE_LEN));
        }
        ok.insert("k".repeat(MAX_METADATA_KEY_LEN), String::new());
        let mut p = Vec::new();
        check_metadata(&ok, &mut p);
        assert_eq!(p.len(), 1, "only the count: {p:?}");
        assert!(p[0].contains("at most 16"), "{p:?}");
    }

    #[test]
    fn a_changed_security_option_is_named() {
        let enc = [SecurityOption::Encryption(Encryption::Aes256Gcm)];
        assert!(check_security_unchanged("bucket `b`", &enc, &enc).is_ok());
        let e = check_security_unchanged("bucket `b`", &enc, &[]).unwrap_err();
        assert_eq!(e.kind(), crate::ErrorKind::Invalid);
        assert!(e.message().contains("encryption from encryption `aes256gcm` to none"), "{e}");
        let e = check_security_unchanged("bucket `b`", &[], &[SecurityOption::KeyFormat(KeyFormat::Pan)]).unwrap_err();
        assert!(e.message().contains("key_format from none to key_format `pan`"), "{e}");
    }
}
