//! Bucket and stream options in the JetStream stream's `metadata` map.
//!
//! Layout: finmesh's own keys start with `finmesh.` (`finmesh.encryption`,
//! `finmesh.key_hashing`, `finmesh.key_format`, and the size limits kept by
//! `streams.rs` and `kv.rs`); the server's own keys start with `_nats.`
//! (nats-server 2.11+ records the API level that created the stream).
//! Every other key is user metadata, stored as given. A finmesh key with a
//! value this version does not know (written by a newer one) makes the
//! info call fail rather than report the bucket or stream without its
//! security option.

use std::collections::HashMap;

use finmesh_core::options::{RESERVED_METADATA_PREFIXES, meta_keys};
use finmesh_core::{
    BucketSecurity, Encryption, Error, KeyFormat, KeyHashing, Metadata, Result, SecurityOption, StreamSecurity,
};
use serde_json::{Map, Value};

/// The metadata map for a stream config: `own` (finmesh's size limits),
/// the security `options` and the user `metadata`. `None` when empty.
pub(crate) fn encode(own: &[(&str, String)], options: &[SecurityOption], metadata: &Metadata) -> Option<Value> {
    let mut m = Map::new();
    for (k, v) in own {
        m.insert((*k).to_owned(), Value::String(v.clone()));
    }
    for o in options {
        let (k, v) = match o {
            SecurityOption::Encryption(e) => (meta_keys::ENCRYPTION, e.as_str()),
            SecurityOption::KeyHashing(h) => (meta_keys::KEY_HASHING, h.as_str()),
            SecurityOption::KeyFormat(f) => (meta_keys::KEY_FORMAT, f.as_str()),
        };
        m.insert(k.to_owned(), Value::String(v.to_owned()));
    }
    for (k, v) in metadata {
        m.insert(k.clone(), Value::String(v.clone()));
    }
    (!m.is_empty()).then_some(Value::Object(m))
}

fn parsed<T>(map: &HashMap<String, String>, key: &str, parse: fn(&str) -> Option<T>, what: &str) -> Result<Option<T>> {
    match map.get(key) {
        None => Ok(None),
        Some(v) => parse(v).map(Some).ok_or_else(|| {
            Error::internal(format!(
                "{what} has `{key}` = `{v}`, which this finmesh does not know (written by a newer version?)"
            ))
        }),
    }
}

/// The security options of a bucket's stream.
pub(crate) fn bucket_security(map: &HashMap<String, String>, what: &str) -> Result<BucketSecurity> {
    Ok(BucketSecurity {
        encryption: parsed(map, meta_keys::ENCRYPTION, Encryption::parse, what)?,
        key_hashing: parsed(map, meta_keys::KEY_HASHING, KeyHashing::parse, what)?,
        key_format: parsed(map, meta_keys::KEY_FORMAT, KeyFormat::parse, what)?,
    })
}

/// The security options of a stream.
pub(crate) fn stream_security(map: &HashMap<String, String>, what: &str) -> Result<StreamSecurity> {
    Ok(StreamSecurity { encryption: parsed(map, meta_keys::ENCRYPTION, Encryption::parse, what)? })
}

/// The user metadata: every key that is neither finmesh's nor the server's.
pub(crate) fn user(map: &HashMap<String, String>) -> Metadata {
    map.iter()
        .filter(|(k, _)| !RESERVED_METADATA_PREFIXES.iter().any(|p| k.starts_with(p)))
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn options_and_metadata_round_trip_and_server_keys_are_not_user_metadata() {
        let security = BucketSecurity {
            encryption: Some(Encryption::Aes256Gcm),
            key_hashing: Some(KeyHashing::HmacSha256),
            key_format: Some(KeyFormat::Pan),
        };
        let user_meta: Metadata = [("owner".to_owned(), "team".to_owned())].into();
        let v = encode(&[("finmesh.max_value_size", "10".to_owned())], &security.options(), &user_meta).unwrap();
        let mut map: HashMap<String, String> = serde_json::from_value(v).unwrap();
        assert_eq!(map["finmesh.encryption"], "aes256gcm");
        map.insert("_nats.req.level".into(), "0".into());
        assert_eq!(bucket_security(&map, "b").unwrap(), security);
        assert_eq!(user(&map), user_meta);
        assert!(encode(&[], &[], &Metadata::new()).is_none());
        map.insert("finmesh.encryption".into(), "aes512".into());
        let e = bucket_security(&map, "bucket `b`").unwrap_err();
        assert!(e.message().contains("aes512"), "{e}");
    }
}
