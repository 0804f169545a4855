//! Sealing and opening values: AES-256-GCM under the ring's data keys.
//!
//! Owns the ciphertext format (version 1). A sealed value is
//!
//! ```text
//! offset  size  field
//! 0       1     magic 0xFE (never the first byte of UTF-8 text or JSON)
//! 1       1     format version, 1
//! 2       4     data key id, u32 big-endian
//! 6       12    nonce, fresh from the system random generator per value
//! 18      n     ciphertext (n = plaintext length)
//! 18+n    16    GCM tag
//! ```
//!
//! so a value grows by [`OVERHEAD`] (34) bytes. The associated data binds
//! the value to where it is stored and to its header:
//!
//! ```text
//! "finmesh/kv-value/v1" || header (bytes 0..6)
//!   || u32 BE len(bucket) || bucket || u32 BE len(key) || key
//! ```
//!
//! where `key` is the key **as stored in the engine** (for a bucket with
//! hashed keys, the hash, so a value can be opened from what a watch or a
//! history returns). Invariants that follow:
//! - a value copied to another bucket or key, or relabelled with another
//!   data key id, fails to open ([`CryptoErrorKind::Integrity`]); so does any
//!   changed byte of nonce, ciphertext or tag; a changed magic or version is
//!   [`CryptoErrorKind::Malformed`]; a changed key id naming no loaded key is
//!   [`CryptoErrorKind::UnknownKey`]. Nothing that fails returns plaintext,
//!   and the buffer that held a failed attempt is zeroed;
//! - only the ring's active encryption key seals; decrypt-only keys open;
//!   retired keys do neither ([`CryptoErrorKind::KeyState`]);
//! - nonces are random, 96 bits: keep a data key to well under 2^32 seals
//!   (rotate; see docs/security.md) so the chance of a repeat stays below
//!   2^-32.

use aws_lc_rs::aead::{Aad, NONCE_LEN, Nonce};
use bytes::Bytes;
use finmesh_core::{BucketName, Key};
use zeroize::Zeroize;

#[cfg(doc)]
use crate::error::CryptoErrorKind;
use crate::error::{CryptoError, Result};
use crate::ring::{KeyId, KeyPurpose, KeyRing, KeyState};

/// First byte of every sealed value.
pub const MAGIC: u8 = 0xFE;
/// The format version this crate writes and reads.
pub const FORMAT_VERSION: u8 = 1;
/// Header length: magic, version, key id.
pub const HEADER_LEN: usize = 6;
/// GCM tag length.
pub const TAG_LEN: usize = 16;
/// Bytes a sealed value has beyond its plaintext.
pub const OVERHEAD: usize = HEADER_LEN + NONCE_LEN + TAG_LEN;

const AAD_LABEL: &[u8] = b"finmesh/kv-value/v1";

/// Seal `plaintext` for `key` of `bucket` under the ring's active encryption key.
pub fn seal(ring: &KeyRing, bucket: &BucketName, key: &Key, plaintext: &[u8]) -> Result<Bytes> {
    let mut nonce = [0u8; NONCE_LEN];
    aws_lc_rs::rand::fill(&mut nonce).map_err(|_| CryptoError::random())?;
    seal_with_nonce(ring, bucket, key, plaintext, nonce)
}

/// [`seal`] with a given nonce: the seam for known-answer tests. Never call
/// it with a nonce that is not fresh.
pub(crate) fn seal_with_nonce(
    ring: &KeyRing,
    bucket: &BucketName,
    key: &Key,
    plaintext: &[u8],
    nonce: [u8; NONCE_LEN],
) -> Result<Bytes> {
    let data_key = ring.active(KeyPurpose::Encryption);
    debug_assert_eq!(data_key.state(), KeyState::Active);
    let aead = data_key.aead().expect("the active encryption key is an AEAD key");
    let header = header(data_key.id());
    let mut out = Vec::with_capacity(OVERHEAD + plaintext.len());
    out.extend_from_slice(&header);
    out.extend_from_slice(&nonce);
    out.extend_from_slice(plaintext);
    let body = HEADER_LEN + NONCE_LEN;
    let tag = with_associated_data(&header, bucket, key, |aad| {
        aead.seal_in_place_separate_tag(Nonce::assume_unique_for_key(nonce), Aad::from(aad), &mut out[body..])
    })
    .map_err(|_| CryptoError::internal("AES-GCM sealing failed"))?;
    out.extend_from_slice(tag.as_ref());
    Ok(Bytes::from(out))
}

/// Open a value sealed by [`seal`] for `key` of `bucket`.
pub fn open(ring: &KeyRing, bucket: &BucketName, key: &Key, sealed: &[u8]) -> Result<Bytes> {
    let id = key_id_of(sealed)?;
    let data_key = ring.get(id).ok_or_else(|| CryptoError::unknown_key(id))?;
    let Some(aead) = data_key.aead() else {
        return Err(CryptoError::integrity(format!(
            "the value names key {id}, a hashing key: it was not sealed by finmesh or was changed"
        )));
    };
    if data_key.state() == KeyState::Retired {
        return Err(CryptoError::key_state(
            id,
            format!("the value is sealed with key {id}, which is retired; restore the key to read it"),
        ));
    }
    let (header, rest) = sealed.split_at(HEADER_LEN);
    let (nonce, body) = rest.split_at(NONCE_LEN);
    let (ciphertext, tag) = body.split_at(body.len() - TAG_LEN);
    let nonce = Nonce::try_assume_unique_for_key(nonce).expect("a 12-byte nonce");
    // Exactly the plaintext's size, so the `Bytes` made of it owns the
    // allocation as is (no second allocation for a shared header).
    let mut buf = ciphertext.to_vec();
    let opened = with_associated_data(header.try_into().expect("a 6-byte header"), bucket, key, |aad| {
        aead.open_in_place_separate_tag(nonce, Aad::from(aad), tag, &mut buf).map(|_| ())
    });
    match opened {
        Ok(()) => Ok(Bytes::from(buf)),
        Err(_) => {
            buf.zeroize();
            Err(CryptoError::integrity(format!(
                "a value in bucket `{bucket}` fails to open with key {id}: it was changed, or moved from another \
                 bucket, key or data key"
            )))
        }
    }
}

/// The data key id a sealed value names, after checking magic, version and
/// length. Tells a re-encryption job which values still use an old key.
pub fn key_id_of(sealed: &[u8]) -> Result<KeyId> {
    if sealed.len() < OVERHEAD {
        return Err(CryptoError::malformed(format!(
            "a sealed value is at least {OVERHEAD} bytes long; this one has {}",
            sealed.len()
        )));
    }
    if sealed[0] != MAGIC {
        return Err(CryptoError::malformed("the value is not a finmesh ciphertext (wrong magic byte)"));
    }
    if sealed[1] != FORMAT_VERSION {
        return Err(CryptoError::malformed(format!(
            "the value has ciphertext format version {}; this node reads version {FORMAT_VERSION}",
            sealed[1]
        )));
    }
    Ok(KeyId(u32::from_be_bytes(sealed[2..6].try_into().expect("4 bytes"))))
}

fn header(id: KeyId) -> [u8; HEADER_LEN] {
    let id = id.0.to_be_bytes();
    [MAGIC, FORMAT_VERSION, id[0], id[1], id[2], id[3]]
}

/// Associated data that fits here is built on the stack: every get of a
/// sealed value builds one, and bucket names plus hashed keys fit.
const STACK_AAD: usize = 192;

/// Call `f` with the associated data of `header`, `bucket` and `key` (the
/// layout is in the module doc).
fn with_associated_data<T>(header: &[u8; HEADER_LEN], bucket: &BucketName, key: &Key, f: impl FnOnce(&[u8]) -> T) -> T {
    let (bucket, key) = (bucket.as_str().as_bytes(), key.as_str().as_bytes());
    let len = AAD_LABEL.len() + HEADER_LEN + 8 + bucket.len() + key.len();
    let mut stack = [0u8; STACK_AAD];
    let mut heap = Vec::new();
    let aad: &mut [u8] = if len <= STACK_AAD {
        &mut stack[..len]
    } else {
        heap.resize(len, 0);
        &mut heap
    };
    let mut at = 0;
    for part in [AAD_LABEL, header, &len_prefix(bucket), bucket, &len_prefix(key), key] {
        aad[at..at + part.len()].copy_from_slice(part);
        at += part.len();
    }
    debug_assert_eq!(at, len);
    f(aad)
}

/// The `u32 BE` length that precedes `bytes` in associated data and hash
/// inputs.
pub(crate) fn len_prefix(bytes: &[u8]) -> [u8; 4] {
    u32::try_from(bytes.len()).expect("names and keys are far shorter than 4 GiB").to_be_bytes()
}

/// Append `u32 BE len(bytes) || bytes`: the unambiguous encoding used in
/// every associated data and hash input of this crate.
pub(crate) fn put_len_prefixed(out: &mut Vec<u8>, bytes: &[u8]) {
    out.extend_from_slice(&len_prefix(bytes));
    out.extend_from_slice(bytes);
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::CryptoErrorKind;
    use crate::ring::{DataKey, KEY_LEN};
    use finmesh_core::Timestamp;
    use proptest::prelude::*;
    use zeroize::Zeroizing;

    pub(crate) fn b(s: &str) -> BucketName {
        BucketName::new(s).unwrap()
    }

    pub(crate) fn k(s: &str) -> Key {
        Key::new(s).unwrap()
    }

    /// A ring with fixed material: decrypt-only encryption key 3 =
    /// 0x40..0x5f, active encryption key 7 = 0x00..0x1f, active hashing key
    /// 8 = 0x20..0x3f.
    pub(crate) fn fixed_ring() -> KeyRing {
        let material = |start: u8| Zeroizing::new(std::array::from_fn::<u8, KEY_LEN, _>(|i| start + i as u8));
        let key = |id, purpose, state, start| {
            DataKey::from_material(KeyId(id), purpose, state, Timestamp(0), material(start)).unwrap()
        };
        KeyRing::from_parts(
            9,
            vec![
                key(3, KeyPurpose::Encryption, KeyState::DecryptOnly, 0x40),
                key(7, KeyPurpose::Encryption, KeyState::Active, 0x00),
                key(8, KeyPurpose::Hashing, KeyState::Active, 0x20),
            ],
        )
        .unwrap()
    }

    const NONCE: [u8; 12] = [0xA0, 0xA1, 0xA2, 0xA3, 0xA4, 0xA5, 0xA6, 0xA7, 0xA8, 0xA9, 0xAA, 0xAB];

    pub(crate) fn hex(bytes: &[u8]) -> String {
        bytes.iter().map(|b| format!("{b:02x}")).collect()
    }

    /// Version 1 of `seal(key 7 = 00..1f, bucket "cards", key "4111.1111",
    /// "hello, card")` with nonce a0..ab: header, nonce, ciphertext, tag.
    /// Computed with Python's `cryptography` (`AESGCM`) from the format in
    /// the module doc, and by RustCrypto's `aes-gcm` in the test below.
    const KAT_V1: &str = "fe0100000007a0a1a2a3a4a5a6a7a8a9aaab8e7d10412ae722dc0317e33331b63d8ec31572b228324734feb1fa";

    /// Known answer: the exact bytes of version 1 for a fixed key, nonce,
    /// bucket, key and plaintext. A change to the format, the associated
    /// data or the cipher breaks this test.
    #[test]
    fn known_answer_v1() {
        let sealed = seal_with_nonce(&fixed_ring(), &b("cards"), &k("4111.1111"), b"hello, card", NONCE).unwrap();
        assert_eq!(hex(&sealed[..18]), "fe0100000007a0a1a2a3a4a5a6a7a8a9aaab", "header and nonce");
        assert_eq!(hex(&sealed), KAT_V1);
        let plain = open(&fixed_ring(), &b("cards"), &k("4111.1111"), &sealed).unwrap();
        assert_eq!(&plain[..], b"hello, card");
    }

    /// The known answer computed by a second, independent implementation
    /// (RustCrypto's `aes-gcm`) from the format as the module doc states it.
    #[test]
    fn aes_gcm_crate_agrees_on_the_known_answer() {
        use aes_gcm::aead::{Aead, KeyInit, Payload};
        let key: [u8; 32] = std::array::from_fn(|i| i as u8);
        let cipher = aes_gcm::Aes256Gcm::new_from_slice(&key).unwrap();
        let mut aad = b"finmesh/kv-value/v1".to_vec();
        aad.extend_from_slice(&[0xfe, 0x01, 0, 0, 0, 7]);
        aad.extend_from_slice(&[0, 0, 0, 5]);
        aad.extend_from_slice(b"cards");
        aad.extend_from_slice(&[0, 0, 0, 9]);
        aad.extend_from_slice(b"4111.1111");
        let ct = cipher.encrypt(&NONCE.into(), Payload { msg: b"hello, card", aad: &aad }).unwrap();
        assert_eq!(format!("fe0100000007{}{}", hex(&NONCE), hex(&ct)), KAT_V1);
    }

    #[test]
    fn round_trip_of_every_size_and_fresh_nonces() {
        let ring = fixed_ring();
        for len in [0, 1, 15, 16, 17, 255, 256, 4096] {
            let plain: Vec<u8> = (0..len).map(|i| i as u8).collect();
            let a = seal(&ring, &b("x"), &k("y"), &plain).unwrap();
            let c = seal(&ring, &b("x"), &k("y"), &plain).unwrap();
            assert_eq!(a.len(), len + OVERHEAD);
            assert_ne!(a[6..18], c[6..18], "each value gets its own nonce");
            assert_eq!(&open(&ring, &b("x"), &k("y"), &a).unwrap()[..], &plain[..]);
        }
    }

    #[test]
    fn a_value_moved_to_another_bucket_or_key_fails_to_open() {
        let ring = fixed_ring();
        let sealed = seal(&ring, &b("cards"), &k("a"), b"secret").unwrap();
        for (bucket, key) in [("cards", "b"), ("other", "a"), ("cards", "a.b"), ("Cards", "a")] {
            let e = open(&ring, &b(bucket), &k(key), &sealed).unwrap_err();
            assert_eq!(e.kind(), CryptoErrorKind::Integrity, "{bucket}/{key}");
        }
        // The length prefixes keep `ab` + `c` apart from `a` + `bc`.
        let sealed = seal(&ring, &b("ab"), &k("c"), b"secret").unwrap();
        assert_eq!(open(&ring, &b("a"), &k("bc"), &sealed).unwrap_err().kind(), CryptoErrorKind::Integrity);
    }

    #[test]
    fn associated_data_longer_than_the_stack_buffer_binds_the_whole_key() {
        let ring = fixed_ring();
        // Keys on both sides of the stack buffer's size, differing only in
        // their last byte.
        for len in [STACK_AAD - 40, STACK_AAD, 900] {
            let (key, other) = (k(&"a".repeat(len)), k(&format!("{}b", "a".repeat(len - 1))));
            let sealed = seal(&ring, &b("cards"), &key, b"secret").unwrap();
            assert_eq!(&open(&ring, &b("cards"), &key, &sealed).unwrap()[..], b"secret", "{len}");
            let e = open(&ring, &b("cards"), &other, &sealed).unwrap_err();
            assert_eq!(e.kind(), CryptoErrorKind::Integrity, "{len}");
        }
    }

    #[test]
    fn a_value_relabelled_with_another_data_key_fails_to_open() {
        let ring = fixed_ring();
        let mut sealed = seal(&ring, &b("cards"), &k("a"), b"secret").unwrap().to_vec();
        sealed[2..6].copy_from_slice(&3u32.to_be_bytes());
        let e = open(&ring, &b("cards"), &k("a"), &sealed).unwrap_err();
        assert_eq!(e.kind(), CryptoErrorKind::Integrity);
        sealed[2..6].copy_from_slice(&8u32.to_be_bytes());
        let e = open(&ring, &b("cards"), &k("a"), &sealed).unwrap_err();
        assert_eq!(e.kind(), CryptoErrorKind::Integrity, "{e}");
        assert!(e.message().contains("hashing key"), "{e}");
        sealed[2..6].copy_from_slice(&99u32.to_be_bytes());
        let e = open(&ring, &b("cards"), &k("a"), &sealed).unwrap_err();
        assert_eq!((e.kind(), e.key_id()), (CryptoErrorKind::UnknownKey, Some(KeyId(99))));
    }

    #[test]
    fn decrypt_only_keys_open_but_never_seal_and_retired_keys_do_neither() {
        let mut ring = fixed_ring();
        let old = seal(&ring, &b("x"), &k("y"), b"v").unwrap();
        assert_eq!(key_id_of(&old).unwrap(), KeyId(7));
        let new_id = ring.rotate(KeyPurpose::Encryption).unwrap();
        assert_eq!(ring.get(KeyId(7)).unwrap().state(), KeyState::DecryptOnly);
        let new = seal(&ring, &b("x"), &k("y"), b"v").unwrap();
        assert_eq!(key_id_of(&new).unwrap(), new_id, "seals with the new key only");
        assert_eq!(&open(&ring, &b("x"), &k("y"), &old).unwrap()[..], b"v", "decrypt-only still opens");
        ring.retire(KeyId(7)).unwrap();
        let e = open(&ring, &b("x"), &k("y"), &old).unwrap_err();
        assert_eq!((e.kind(), e.key_id()), (CryptoErrorKind::KeyState, Some(KeyId(7))));
        assert_eq!(e.message(), "the value is sealed with key 7, which is retired; restore the key to read it");
        ring.restore(KeyId(7)).unwrap();
        assert_eq!(&open(&ring, &b("x"), &k("y"), &old).unwrap()[..], b"v");
    }

    #[test]
    fn short_or_foreign_values_are_malformed() {
        let ring = fixed_ring();
        let sealed = seal(&ring, &b("x"), &k("y"), b"").unwrap();
        for bad in [&b""[..], &sealed[..OVERHEAD - 1], b"{\"json\": \"value, not sealed at all\"}"] {
            let e = open(&ring, &b("x"), &k("y"), bad).unwrap_err();
            assert_eq!(e.kind(), CryptoErrorKind::Malformed, "{e}");
        }
        let mut v2 = sealed.to_vec();
        v2[1] = 2;
        let e = open(&ring, &b("x"), &k("y"), &v2).unwrap_err();
        assert_eq!(e.message(), "the value has ciphertext format version 2; this node reads version 1");
    }

    #[test]
    fn errors_never_show_plaintext_key_or_material() {
        let ring = fixed_ring();
        let clear_key = k("4111111111111111");
        let sealed = seal(&ring, &b("cards"), &clear_key, b"plaintext-marker").unwrap();
        let mut errors = vec![open(&ring, &b("cards"), &k("4111111111111112"), &sealed).unwrap_err()];
        let mut changed = sealed.to_vec();
        *changed.last_mut().unwrap() ^= 1;
        errors.push(open(&ring, &b("cards"), &clear_key, &changed).unwrap_err());
        for e in errors {
            let shown = format!("{e} {e:?}");
            let text = format!("{shown} {:?}", finmesh_core::Error::from(e));
            assert!(!text.contains("4111111111111111") && !text.contains("plaintext-marker"), "{text}");
            for key in ring.keys() {
                crate::testutil::assert_no_secret(&text, key.material());
            }
        }
    }

    proptest! {
        /// Flipping any bit of any byte (header, nonce, ciphertext or tag)
        /// makes the value fail to open; no plaintext comes back.
        #[test]
        fn any_changed_byte_fails_to_open(len in 0usize..300, pos in any::<prop::sample::Index>(), bit in 0u8..8) {
            let ring = fixed_ring();
            let plain: Vec<u8> = (0..len).map(|i| i as u8).collect();
            let mut sealed = seal(&ring, &b("cards"), &k("a"), &plain).unwrap().to_vec();
            let pos = pos.index(sealed.len());
            sealed[pos] ^= 1 << bit;
            let e = open(&ring, &b("cards"), &k("a"), &sealed).unwrap_err();
            let allowed: &[CryptoErrorKind] = match pos {
                0 | 1 => &[CryptoErrorKind::Malformed],
                // Another id: not loaded, or key 3 (7 ^ 4), which fails the tag.
                2..=5 => &[CryptoErrorKind::UnknownKey, CryptoErrorKind::Integrity],
                _ => &[CryptoErrorKind::Integrity],
            };
            prop_assert!(allowed.contains(&e.kind()), "byte {} bit {}: {:?}", pos, bit, e);
        }
    }
}
