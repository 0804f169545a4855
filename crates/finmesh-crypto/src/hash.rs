//! Keyed hashing of clients' keys, for buckets whose keys are themselves
//! sensitive (a card number used as a key).
//!
//! Owns the hashed-key format (version 1):
//!
//! ```text
//! h1.<hashing key id, decimal>.<base64url, no padding, of HMAC-SHA-256>
//! HMAC input: "finmesh/kv-key/v1" || u32 BE len(bucket) || bucket || clear key (UTF-8)
//! ```
//!
//! e.g. `h1.2.Xw3…` (at most 3 + 10 + 1 + 43 = 57 bytes). Every character is
//! allowed in a KV key (`A–Z a–z 0–9 - _ .`), no token is empty and the
//! length is far below the 958-byte key limit, so the result is always a
//! valid [`Key`]. The bucket is hashed in, so the same card number stored in
//! two buckets gets two unrelated stored keys.
//!
//! Rotation of the hashing key: a clear key has one stored key per hashing
//! key, and the id in the stored key says which one made it. Writes name
//! the key with [`hash_key`] (the active hashing key). Reads after a
//! rotation try [`hash_key_candidates`] in order (the active key first, then
//! decrypt-only keys, newest first; retired keys are skipped) and take the
//! first that exists; an entry found under an old hash stays there (the
//! encrypting engine wrapper writes to where a key lives) until a re-keying
//! job moves the whole bucket to the active key, before the old hashing
//! key is retired. Listing keys of
//! such a bucket returns stored keys only: a hash cannot be reversed.

use std::fmt::Write as _;

use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use finmesh_core::{BucketName, Key};

use crate::envelope::len_prefix;
use crate::error::{CryptoError, CryptoErrorKind, Result};
use crate::ring::{DataKey, KeyId, KeyPurpose, KeyRing, KeyState};

/// The prefix of every version 1 hashed key.
pub const HASHED_KEY_PREFIX: &str = "h1";

const HASH_LABEL: &[u8] = b"finmesh/kv-key/v1";

/// The longest stored key: `h1.` + a u32 id + `.` + 43 base64 characters.
const MAX_HASHED_KEY_LEN: usize = 3 + 10 + 1 + 43;

/// The stored key for `clear_key` of `bucket` under the active hashing key.
pub fn hash_key(ring: &KeyRing, bucket: &BucketName, clear_key: &str) -> Result<Key> {
    hash_with(ring.active(KeyPurpose::Hashing), bucket, clear_key)
}

/// The stored keys `clear_key` of `bucket` may have: one per hashing key
/// that is not retired, the active key's first, then newer before older
/// (see the module doc for how reads use them).
pub fn hash_key_candidates(ring: &KeyRing, bucket: &BucketName, clear_key: &str) -> Result<Vec<Key>> {
    let active = ring.active(KeyPurpose::Hashing);
    let mut keys = vec![hash_with(active, bucket, clear_key)?];
    for key in ring.keys().rev() {
        if key.purpose() == KeyPurpose::Hashing && key.state() == KeyState::DecryptOnly {
            keys.push(hash_with(key, bucket, clear_key)?);
        }
    }
    Ok(keys)
}

/// The hashing key id a stored key was made with, if it is a version 1
/// hashed key.
pub fn hashed_key_id(stored: &Key) -> Option<KeyId> {
    let mut parts = stored.as_str().split('.');
    let (prefix, id, mac) = (parts.next()?, parts.next()?, parts.next()?);
    if prefix != HASHED_KEY_PREFIX || parts.next().is_some() || mac.len() != 43 {
        return None;
    }
    if id.starts_with('0') || !id.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    id.parse().ok().map(KeyId)
}

fn hash_with(key: &DataKey, bucket: &BucketName, clear_key: &str) -> Result<Key> {
    if clear_key.is_empty() {
        return Err(CryptoError::new(CryptoErrorKind::Invalid, "a key to hash must not be empty"));
    }
    let hmac = key.hmac().expect("a hashing key");
    let mut ctx = aws_lc_rs::hmac::Context::with_key(hmac);
    let bucket = bucket.as_str().as_bytes();
    ctx.update(HASH_LABEL);
    ctx.update(&len_prefix(bucket));
    ctx.update(bucket);
    ctx.update(clear_key.as_bytes());
    let tag = ctx.sign();
    // Built in place: this runs on every request to a hashed bucket.
    let mut stored = String::with_capacity(MAX_HASHED_KEY_LEN);
    write!(stored, "{HASHED_KEY_PREFIX}.{}.", key.id()).expect("writing to a String cannot fail");
    URL_SAFE_NO_PAD.encode_string(tag.as_ref(), &mut stored);
    Ok(Key::new(stored).expect("a hashed key is always a valid key"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::envelope::tests::{b, fixed_ring, hex};

    /// Known answer: key 8 = 0x20..0x3f, bucket "cards", clear key
    /// "4111111111111111". Computed with Python's `hmac` from the format in
    /// the module doc, and from plain SHA-256 in
    /// `the_hmac_is_standard_hmac_sha256`.
    #[test]
    fn known_answer_v1() {
        let stored = hash_key(&fixed_ring(), &b("cards"), "4111111111111111").unwrap();
        assert_eq!(stored.as_str(), KAT_V1);
        assert_eq!(hashed_key_id(&stored), Some(KeyId(8)));
    }

    const KAT_V1: &str = "h1.8._3kS6-N2S39HKQScoJ1WNYdkQMWF9LA0csGCUkwvg7M";

    #[test]
    fn the_hmac_is_standard_hmac_sha256() {
        // HMAC-SHA-256 spelled out from FIPS 198-1 over aws-lc's plain SHA-256,
        // so the known answer does not rest on aws-lc's HMAC alone.
        use aws_lc_rs::digest::{SHA256, digest};
        let key: [u8; 32] = std::array::from_fn(|i| 0x20 + i as u8);
        let mut block = [0u8; 64];
        block[..32].copy_from_slice(&key);
        let mut msg = b"finmesh/kv-key/v1".to_vec();
        msg.extend_from_slice(&[0, 0, 0, 5]);
        msg.extend_from_slice(b"cards");
        msg.extend_from_slice(b"4111111111111111");
        let mut inner: Vec<u8> = block.iter().map(|b| b ^ 0x36).collect();
        inner.extend_from_slice(&msg);
        let mut outer: Vec<u8> = block.iter().map(|b| b ^ 0x5c).collect();
        outer.extend_from_slice(digest(&SHA256, &inner).as_ref());
        let mac = digest(&SHA256, &outer);
        assert_eq!(format!("h1.8.{}", URL_SAFE_NO_PAD.encode(mac.as_ref())), KAT_V1, "{}", hex(mac.as_ref()));
    }

    #[test]
    fn same_clear_key_other_bucket_or_key_gives_another_hash() {
        let ring = fixed_ring();
        let a = hash_key(&ring, &b("cards"), "4111111111111111").unwrap();
        assert_eq!(a, hash_key(&ring, &b("cards"), "4111111111111111").unwrap(), "deterministic");
        assert_ne!(a, hash_key(&ring, &b("tokens"), "4111111111111111").unwrap());
        assert_ne!(a, hash_key(&ring, &b("cards"), "4111111111111112").unwrap());
        assert!(!a.as_str().contains("4111"));
        let e = hash_key(&ring, &b("cards"), "").unwrap_err();
        assert_eq!(e.kind(), CryptoErrorKind::Invalid);
    }

    #[test]
    fn any_clear_key_hashes_to_a_valid_key() {
        let ring = fixed_ring();
        for clear in ["a", "with space", "ünïcödé", "../..", "_kv.reserved", &"x".repeat(5000)] {
            let stored = hash_key(&ring, &b("cards"), clear).unwrap();
            assert!(stored.as_str().len() <= 57);
            assert_eq!(hashed_key_id(&stored), Some(KeyId(8)));
        }
    }

    #[test]
    fn candidates_after_rotation_are_new_then_old_and_skip_retired() {
        let mut ring = fixed_ring();
        let before = hash_key(&ring, &b("cards"), "4111111111111111").unwrap();
        let k9 = ring.rotate(KeyPurpose::Hashing).unwrap();
        let after = hash_key(&ring, &b("cards"), "4111111111111111").unwrap();
        assert_ne!(before, after);
        assert_eq!(hashed_key_id(&after), Some(k9));
        let k10 = ring.rotate(KeyPurpose::Hashing).unwrap();
        let newest = hash_key(&ring, &b("cards"), "4111111111111111").unwrap();
        let candidates = hash_key_candidates(&ring, &b("cards"), "4111111111111111").unwrap();
        assert_eq!(candidates, vec![newest.clone(), after.clone(), before.clone()]);
        assert_eq!(hashed_key_id(&candidates[0]), Some(k10));
        ring.retire(KeyId(8)).unwrap();
        assert_eq!(hash_key_candidates(&ring, &b("cards"), "4111111111111111").unwrap(), vec![newest, after]);
    }

    #[test]
    fn hashed_key_id_reads_only_well_formed_keys() {
        let mac = "A".repeat(43);
        for (s, id) in [
            (format!("h1.12.{mac}"), Some(KeyId(12))),
            (format!("h2.12.{mac}"), None),
            (format!("h1.012.{mac}"), None),
            (format!("h1.x.{mac}"), None),
            (format!("h1.12.{mac}.x"), None),
            ("h1.12.short".to_string(), None),
            ("card.4111".to_string(), None),
        ] {
            assert_eq!(hashed_key_id(&Key::new(s.clone()).unwrap()), id, "{s}");
        }
    }
}
