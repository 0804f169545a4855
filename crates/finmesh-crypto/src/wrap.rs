//! The master key and the wrapped (storable) form of a key ring.
//!
//! Owns [`MasterKey`] and [`WrappedRing`], and the stored format (version 1),
//! a JSON document whose binary fields are standard base64:
//!
//! ```text
//! { "format": 1, "next_id": 9,
//!   "check": b64(nonce 12 || tag 16),
//!   "keys": [ { "id": 7, "purpose": "encryption", "state": "active",
//!               "created": <ns since the epoch>,
//!               "wrapped": b64(nonce 12 || ciphertext 32 || tag 16) }, … ],
//!   "seal": b64(nonce 12 || tag 16) }
//! ```
//!
//! All three are AES-256-GCM under the master key with fresh random nonces:
//! - `wrapped`: a data key's material, associated data
//!   `"finmesh/wrap/v1" || u32 BE id || purpose byte` (1 encryption,
//!   2 hashing), so a wrapped key moved to another id or purpose fails;
//! - `check`: an empty plaintext with associated data
//!   `"finmesh/master-check/v1"`; it tells a wrong master key
//!   ([`CryptoErrorKind::WrongMasterKey`]) apart from a changed ring;
//! - `seal`: an empty plaintext over the ring's metadata: `"finmesh/ring/v1"
//!   || u32 format || u32 next_id || check || u32 count ||` per key `u32 id ||
//!   purpose byte || state byte || u64 created || u32 len || wrapped`. Whoever
//!   can write the engine but lacks the master key cannot change a key's
//!   state (say, make an old key active again), drop a key or reorder
//!   ids: [`WrappedRing::unwrap`] refuses with [`CryptoErrorKind::Integrity`].
//!
//! Invariants: unwrapping checks format, then `check`, then `seal`, then
//! each key, then the ring's own invariants, and builds nothing until all
//! pass; the master key and unwrapped material live in zeroed-on-drop
//! buffers; nothing here ever formats a key's bytes.

use std::fmt;

use aws_lc_rs::aead::{self, Aad, LessSafeKey, NONCE_LEN, Nonce, UnboundKey};
use base64::Engine as _;
use base64::engine::general_purpose::STANDARD;
use finmesh_core::Timestamp;
use serde::{Deserialize, Deserializer, Serialize, Serializer};
use zeroize::Zeroizing;

use crate::error::{CryptoError, CryptoErrorKind, Result};
use crate::ring::{DataKey, KEY_LEN, KeyId, KeyPurpose, KeyRing, KeyState};

/// The stored format version this crate writes and reads.
pub const RING_FORMAT: u32 = 1;

const TAG_LEN: usize = 16;
const WRAP_LABEL: &[u8] = b"finmesh/wrap/v1";
const CHECK_LABEL: &[u8] = b"finmesh/master-check/v1";
const SEAL_LABEL: &[u8] = b"finmesh/ring/v1";

/// The key that wraps the ring. It comes from a [`crate::KeyProvider`],
/// lives only in memory (zeroed on drop) and is never stored in the engine.
pub struct MasterKey {
    material: Zeroizing<[u8; KEY_LEN]>,
    aead: LessSafeKey,
}

impl MasterKey {
    /// A master key from its 32 bytes (moved in, zeroed on drop).
    pub fn from_bytes(material: Zeroizing<[u8; KEY_LEN]>) -> Result<MasterKey> {
        let unbound = UnboundKey::new(&aead::AES_256_GCM, &material[..])
            .map_err(|_| CryptoError::internal("aws-lc refused an AES-256 key"))?;
        Ok(MasterKey { material, aead: LessSafeKey::new(unbound) })
    }

    /// A fresh random master key (for `finmesh keys init` and tests).
    pub fn generate() -> Result<MasterKey> {
        Self::from_bytes(crate::ring::random_key()?)
    }

    /// The raw bytes, for writing a new key file.
    pub fn expose_secret(&self) -> &[u8; KEY_LEN] {
        &self.material
    }

    fn seal(&self, plaintext: &[u8], aad: &[u8]) -> Result<Vec<u8>> {
        let mut nonce = [0u8; NONCE_LEN];
        aws_lc_rs::rand::fill(&mut nonce).map_err(|_| CryptoError::random())?;
        let mut out = Vec::with_capacity(NONCE_LEN + plaintext.len() + TAG_LEN);
        out.extend_from_slice(&nonce);
        out.extend_from_slice(plaintext);
        let tag = self
            .aead
            .seal_in_place_separate_tag(Nonce::assume_unique_for_key(nonce), Aad::from(aad), &mut out[NONCE_LEN..])
            .map_err(|_| CryptoError::internal("AES-GCM key wrapping failed"))?;
        out.extend_from_slice(tag.as_ref());
        Ok(out)
    }

    /// Open `sealed` (nonce || ciphertext || tag); `None` if it fails.
    fn open(&self, sealed: &[u8], aad: &[u8]) -> Option<Zeroizing<Vec<u8>>> {
        if sealed.len() < NONCE_LEN + TAG_LEN {
            return None;
        }
        let (nonce, body) = sealed.split_at(NONCE_LEN);
        let nonce = Nonce::try_assume_unique_for_key(nonce).ok()?;
        let mut buf = Zeroizing::new(body.to_vec());
        let n = self.aead.open_in_place(nonce, Aad::from(aad), &mut buf).ok()?.len();
        buf.truncate(n);
        Some(buf)
    }
}

impl fmt::Debug for MasterKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("MasterKey(<redacted>)")
    }
}

/// Bytes serialized as standard base64.
#[derive(Clone, PartialEq, Eq)]
struct Blob(Vec<u8>);

impl Serialize for Blob {
    fn serialize<S: Serializer>(&self, s: S) -> std::result::Result<S::Ok, S::Error> {
        s.serialize_str(&STANDARD.encode(&self.0))
    }
}

impl<'de> Deserialize<'de> for Blob {
    fn deserialize<D: Deserializer<'de>>(d: D) -> std::result::Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        STANDARD.decode(s).map(Blob).map_err(serde::de::Error::custom)
    }
}

impl fmt::Debug for Blob {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "<{} bytes>", self.0.len())
    }
}

/// One data key as stored: metadata in clear, material wrapped.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct WrappedKey {
    /// The key's id.
    pub id: KeyId,
    /// What it is for.
    pub purpose: KeyPurpose,
    /// Where it is in its life.
    pub state: KeyState,
    /// When it was made.
    pub created: Timestamp,
    wrapped: Blob,
}

/// A key ring as stored in the engine: every data key wrapped by the master
/// key, the metadata sealed by it (see the module doc).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct WrappedRing {
    format: u32,
    next_id: u32,
    check: Blob,
    keys: Vec<WrappedKey>,
    seal: Blob,
}

impl WrappedRing {
    /// Wrap `ring` under `master`, with fresh nonces.
    pub fn wrap(ring: &KeyRing, master: &MasterKey) -> Result<WrappedRing> {
        let check = Blob(master.seal(&[], CHECK_LABEL)?);
        let keys = ring
            .keys()
            .map(|k| {
                Ok(WrappedKey {
                    id: k.id(),
                    purpose: k.purpose(),
                    state: k.state(),
                    created: k.created(),
                    wrapped: Blob(master.seal(k.material(), &wrap_aad(k.id(), k.purpose()))?),
                })
            })
            .collect::<Result<Vec<_>>>()?;
        let mut wrapped =
            WrappedRing { format: RING_FORMAT, next_id: ring.next_id().0, check, keys, seal: Blob(Vec::new()) };
        wrapped.seal = Blob(master.seal(&[], &wrapped.metadata())?);
        Ok(wrapped)
    }

    /// Unwrap with `master`: [`CryptoErrorKind::WrongMasterKey`] if it is
    /// not the key the ring was wrapped with, [`CryptoErrorKind::Integrity`]
    /// if the stored ring was changed, [`CryptoErrorKind::Malformed`] for an
    /// unknown format or a ring that breaks its invariants.
    pub fn unwrap(&self, master: &MasterKey) -> Result<KeyRing> {
        if self.format != RING_FORMAT {
            return Err(CryptoError::malformed(format!(
                "the stored key ring has format {}; this node reads format {RING_FORMAT}",
                self.format
            )));
        }
        if master.open(&self.check.0, CHECK_LABEL).is_none() {
            return Err(CryptoError::new(
                CryptoErrorKind::WrongMasterKey,
                "wrong master key: it does not open the stored key ring (nothing was changed)",
            ));
        }
        if master.open(&self.seal.0, &self.metadata()).is_none() {
            return Err(CryptoError::integrity(
                "the stored key ring was changed by someone without the master key: its seal does not match",
            ));
        }
        let mut keys = Vec::with_capacity(self.keys.len());
        for k in &self.keys {
            let material = master.open(&k.wrapped.0, &wrap_aad(k.id, k.purpose)).ok_or_else(|| {
                CryptoError::integrity(format!("wrapped key {} fails to open", k.id)).with_key_id(k.id)
            })?;
            let material: [u8; KEY_LEN] = material[..].try_into().map_err(|_| {
                CryptoError::malformed(format!("wrapped key {} is not {KEY_LEN} bytes long", k.id)).with_key_id(k.id)
            })?;
            keys.push(DataKey::from_material(k.id, k.purpose, k.state, k.created, Zeroizing::new(material))?);
        }
        KeyRing::from_parts(self.next_id, keys)
    }

    /// The stored keys' metadata (no material), by id.
    pub fn keys(&self) -> &[WrappedKey] {
        &self.keys
    }

    /// The stored bytes (JSON).
    pub fn to_bytes(&self) -> Vec<u8> {
        serde_json::to_vec(self).expect("a wrapped ring always serializes")
    }

    /// Parse stored bytes; [`CryptoErrorKind::Malformed`] if they are not a
    /// wrapped ring.
    pub fn from_bytes(bytes: &[u8]) -> Result<WrappedRing> {
        serde_json::from_slice(bytes)
            .map_err(|e| CryptoError::malformed(format!("the stored key ring does not parse: {e}")))
    }

    /// What `seal` authenticates (see the module doc).
    fn metadata(&self) -> Vec<u8> {
        let mut m = Vec::with_capacity(64 + self.keys.len() * 80);
        m.extend_from_slice(SEAL_LABEL);
        m.extend_from_slice(&self.format.to_be_bytes());
        m.extend_from_slice(&self.next_id.to_be_bytes());
        crate::envelope::put_len_prefixed(&mut m, &self.check.0);
        m.extend_from_slice(&(self.keys.len() as u32).to_be_bytes());
        for k in &self.keys {
            m.extend_from_slice(&k.id.0.to_be_bytes());
            m.push(k.purpose.code());
            m.push(k.state.code());
            m.extend_from_slice(&k.created.0.to_be_bytes());
            crate::envelope::put_len_prefixed(&mut m, &k.wrapped.0);
        }
        m
    }
}

fn wrap_aad(id: KeyId, purpose: KeyPurpose) -> Vec<u8> {
    let mut aad = WRAP_LABEL.to_vec();
    aad.extend_from_slice(&id.0.to_be_bytes());
    aad.push(purpose.code());
    aad
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rotated_ring() -> KeyRing {
        let mut ring = KeyRing::generate().unwrap();
        ring.rotate(KeyPurpose::Encryption).unwrap();
        ring.rotate(KeyPurpose::Hashing).unwrap();
        ring.retire(KeyId(1)).unwrap();
        ring
    }

    fn same_keys(a: &KeyRing, b: &KeyRing) {
        let a: Vec<_> = a.keys().map(|k| (k.id(), k.purpose(), k.state(), k.created(), *k.material())).collect();
        let b: Vec<_> = b.keys().map(|k| (k.id(), k.purpose(), k.state(), k.created(), *k.material())).collect();
        assert_eq!(a, b);
    }

    /// A version 1 ring written by a second, independent implementation
    /// (Python's `cryptography`, from the format in the module doc) with
    /// master key 0x80..0x9f: rings stored today must keep opening.
    const STORED_V1: &str = r#"{"format": 1, "next_id": 4, "check": "YYnuvSZVy+aOV0pjW8GFIwTJWIhICmTRvA4wSw==", "keys": [{"id": 1, "purpose": "encryption", "state": "decrypt_only", "created": 1700000000000000000, "wrapped": "B4dCaMgTdDM9G/GOEwrCOh6ojDxAigzFoTKzRaVGo1sqTIBY4EQH3PGeVCBwXaNWSiNdvmQw9L6scy6G"}, {"id": 2, "purpose": "hashing", "state": "active", "created": 1700000000000000001, "wrapped": "0PKjA/+uDTxGrV+bjJL2Mr1PkOfOf80cL+sxwHDbHSgt1TdxgPRKN6+WiinuQ1baPDe5spwJ7Z1lpCDx"}, {"id": 3, "purpose": "encryption", "state": "active", "created": 1700000000000000002, "wrapped": "hjHQEGF7DQ/J+vQyfB9uEqQiCC+dE+D+e7I0DEwXcLEqco4Rswu5Ung+H0O6/WDlKFuDg0uaVYFU5W9n"}], "seal": "XZH6WJpMQ+HgVBjwdXhmcyTDUi+gxz6xd+gIsA=="}"#;

    #[test]
    fn known_answer_v1_ring_opens() {
        let master = MasterKey::from_bytes(Zeroizing::new(std::array::from_fn(|i| 0x80 + i as u8))).unwrap();
        let ring = WrappedRing::from_bytes(STORED_V1.as_bytes()).unwrap().unwrap(&master).unwrap();
        let keys: Vec<_> =
            ring.keys().map(|k| (k.id().0, k.purpose(), k.state(), k.created().0, k.material()[0])).collect();
        assert_eq!(
            keys,
            vec![
                (1, KeyPurpose::Encryption, KeyState::DecryptOnly, 1_700_000_000_000_000_000, 0x40),
                (2, KeyPurpose::Hashing, KeyState::Active, 1_700_000_000_000_000_001, 0x20),
                (3, KeyPurpose::Encryption, KeyState::Active, 1_700_000_000_000_000_002, 0x00),
            ]
        );
        let expected: [u8; KEY_LEN] = std::array::from_fn(|i| 0x40 + i as u8);
        assert_eq!(ring.get(KeyId(1)).unwrap().material(), &expected);
        assert_eq!(ring.next_id(), KeyId(4));
        let e = WrappedRing::from_bytes(STORED_V1.as_bytes()).unwrap().unwrap(&MasterKey::generate().unwrap());
        assert_eq!(e.unwrap_err().kind(), CryptoErrorKind::WrongMasterKey);
    }

    #[test]
    fn wrap_then_unwrap_gives_the_same_ring() {
        let (ring, master) = (rotated_ring(), MasterKey::generate().unwrap());
        let wrapped = WrappedRing::wrap(&ring, &master).unwrap();
        let back = WrappedRing::from_bytes(&wrapped.to_bytes()).unwrap().unwrap(&master).unwrap();
        same_keys(&ring, &back);
        assert_eq!(back.next_id(), ring.next_id());
        assert_eq!(back.active(KeyPurpose::Encryption).id(), KeyId(3));
    }

    #[test]
    fn the_stored_form_shows_no_key_material() {
        let (ring, master) = (rotated_ring(), MasterKey::generate().unwrap());
        let wrapped = WrappedRing::wrap(&ring, &master).unwrap();
        let text = format!("{} {wrapped:?} {master:?}", String::from_utf8(wrapped.to_bytes()).unwrap());
        assert!(text.contains("\"state\":\"decrypt_only\"") && text.contains("MasterKey(<redacted>)"), "{text}");
        crate::testutil::assert_no_secret(&text, master.expose_secret());
        for key in ring.keys() {
            crate::testutil::assert_no_secret(&text, key.material());
        }
    }

    #[test]
    fn a_wrong_master_key_is_named_as_such() {
        let wrapped = WrappedRing::wrap(&rotated_ring(), &MasterKey::generate().unwrap()).unwrap();
        let e = wrapped.unwrap(&MasterKey::generate().unwrap()).unwrap_err();
        assert_eq!(e.kind(), CryptoErrorKind::WrongMasterKey);
        assert_eq!(
            e.to_string(),
            "wrong-master-key: wrong master key: it does not open the stored key ring (nothing was changed)"
        );
    }

    #[test]
    fn changed_metadata_or_wrapped_keys_fail_to_open() {
        let master = MasterKey::generate().unwrap();
        let wrapped = WrappedRing::wrap(&rotated_ring(), &master).unwrap();
        type Edit = Box<dyn Fn(&mut WrappedRing)>;
        let edits: Vec<(&str, Edit)> = vec![
            ("state", Box::new(|w| w.keys[0].state = KeyState::Active)),
            ("revive a decrypt-only key", Box::new(|w| w.keys[1].state = KeyState::Active)),
            ("created", Box::new(|w| w.keys[0].created.0 += 1)),
            ("next_id", Box::new(|w| w.next_id += 1)),
            ("drop a key", Box::new(|w| drop(w.keys.remove(0)))),
            ("swap ids", Box::new(|w| w.keys.swap(0, 1))),
            ("wrapped byte", Box::new(|w| w.keys[2].wrapped.0[20] ^= 1)),
            ("purpose", Box::new(|w| w.keys[3].purpose = KeyPurpose::Encryption)),
        ];
        for (what, edit) in edits {
            let mut w = wrapped.clone();
            edit(&mut w);
            let e = w.unwrap(&master).unwrap_err();
            assert_eq!(e.kind(), CryptoErrorKind::Integrity, "{what}: {e}");
        }
        // A wrapped key moved to another id, with the seal redone by the
        // master key holder, still fails: the id is in its associated data.
        let mut w = wrapped.clone();
        let moved = w.keys[1].wrapped.clone();
        w.keys[0].wrapped = moved;
        w.seal = Blob(master.seal(&[], &w.metadata()).unwrap());
        let e = w.unwrap(&master).unwrap_err();
        assert_eq!((e.kind(), e.key_id()), (CryptoErrorKind::Integrity, Some(w.keys[0].id)));
    }

    #[test]
    fn unknown_formats_and_garbage_are_malformed() {
        let master = MasterKey::generate().unwrap();
        let mut w = WrappedRing::wrap(&rotated_ring(), &master).unwrap();
        w.format = 2;
        let e = w.unwrap(&master).unwrap_err();
        assert_eq!(e.message(), "the stored key ring has format 2; this node reads format 1");
        for bad in [&b""[..], b"{}", b"not json", b"{\"format\":1}"] {
            assert_eq!(WrappedRing::from_bytes(bad).unwrap_err().kind(), CryptoErrorKind::Malformed);
        }
    }
}
