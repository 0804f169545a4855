//! The key ring: versioned data keys, their purposes and their states.
//!
//! Owns [`KeyRing`], [`DataKey`], [`KeyId`], [`KeyPurpose`] and [`KeyState`].
//!
//! Invariants (checked by every constructor, kept by every transition):
//! - a key id is unique across purposes and never reused: new ids come from
//!   `next_id`, which only grows, even when a key is destroyed, so a stored
//!   ciphertext can never name a different key than the one that sealed it;
//! - there is exactly one [`KeyState::Active`] key per [`KeyPurpose`]: the
//!   only encryption key that seals, the only hashing key that names new keys;
//! - states move only along
//!   `Active --rotate--> DecryptOnly --retire--> Retired --destroy--> (gone)`
//!   and back by `restore` (`Retired -> DecryptOnly`). A `DecryptOnly`
//!   encryption key opens but never seals; a `DecryptOnly` hashing key is
//!   used only to find keys stored under its hash (lookups), never to name
//!   new ones. A `Retired` key does neither but is kept, so a retirement can
//!   be undone until the key is destroyed;
//! - key material lives in a [`Zeroizing`] buffer and in aws-lc contexts,
//!   which aws-lc zeroes when they are freed; `Debug` of a key or a ring shows
//!   ids, purposes and states only.
//!
//! A `KeyRing` is a plain value: changes happen on a copy (see
//! [`crate::RingStore::update`]) that is then wrapped and stored with a
//! compare-and-set, so two gateways changing the ring at once cannot lose a key.

use std::collections::BTreeMap;
use std::fmt;

use aws_lc_rs::{aead, hmac};
use finmesh_core::Timestamp;
use serde::{Deserialize, Serialize};
use zeroize::Zeroizing;

use crate::error::{CryptoError, Result};

/// Length of every data key and of the master key, in bytes (AES-256, and
/// HMAC-SHA-256 keys of the hash's block-friendly size).
pub const KEY_LEN: usize = 32;

/// A data key's id: stored in every ciphertext header and in every hashed
/// key, so it is a small number, unique within a ring and never reused.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(transparent)]
pub struct KeyId(pub u32);

impl fmt::Display for KeyId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.0)
    }
}

/// What a data key is for. The two purposes never share a key.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum KeyPurpose {
    /// AES-256-GCM sealing of values.
    Encryption,
    /// HMAC-SHA-256 of clients' keys (hashed-key buckets).
    Hashing,
}

impl KeyPurpose {
    /// Both purposes.
    pub const ALL: [KeyPurpose; 2] = [KeyPurpose::Encryption, KeyPurpose::Hashing];

    /// `encryption` or `hashing`.
    pub fn as_str(self) -> &'static str {
        match self {
            KeyPurpose::Encryption => "encryption",
            KeyPurpose::Hashing => "hashing",
        }
    }

    pub(crate) fn code(self) -> u8 {
        match self {
            KeyPurpose::Encryption => 1,
            KeyPurpose::Hashing => 2,
        }
    }
}

impl fmt::Display for KeyPurpose {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Where a data key is in its life (see the module doc for the transitions).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum KeyState {
    /// Seals new values (or names new keys); one per purpose.
    Active,
    /// Opens old values (or finds keys stored under its hash), never seals.
    DecryptOnly,
    /// Does nothing; kept so that the retirement can be undone.
    Retired,
}

impl KeyState {
    /// `active`, `decrypt-only` or `retired`.
    pub fn as_str(self) -> &'static str {
        match self {
            KeyState::Active => "active",
            KeyState::DecryptOnly => "decrypt-only",
            KeyState::Retired => "retired",
        }
    }

    pub(crate) fn code(self) -> u8 {
        match self {
            KeyState::Active => 1,
            KeyState::DecryptOnly => 2,
            KeyState::Retired => 3,
        }
    }
}

impl fmt::Display for KeyState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The key, prepared once for its purpose (key schedule, HMAC pads). The
/// HMAC key is boxed: it holds aws-lc's whole HMAC context (over 1 KiB).
enum Prepared {
    Aead(aead::LessSafeKey),
    Hmac(Box<hmac::Key>),
}

/// One versioned data key. Its material is zeroed on drop and never shown:
/// `Debug` prints id, purpose, state and creation time only.
pub struct DataKey {
    id: KeyId,
    purpose: KeyPurpose,
    state: KeyState,
    created: Timestamp,
    material: Zeroizing<[u8; KEY_LEN]>,
    prepared: Prepared,
}

impl DataKey {
    /// Build a key from its parts; the material is moved into the key.
    pub(crate) fn from_material(
        id: KeyId,
        purpose: KeyPurpose,
        state: KeyState,
        created: Timestamp,
        material: Zeroizing<[u8; KEY_LEN]>,
    ) -> Result<Self> {
        let prepared = match purpose {
            KeyPurpose::Encryption => {
                let unbound = aead::UnboundKey::new(&aead::AES_256_GCM, &material[..])
                    .map_err(|_| CryptoError::internal("aws-lc refused an AES-256 key"))?;
                Prepared::Aead(aead::LessSafeKey::new(unbound))
            }
            KeyPurpose::Hashing => Prepared::Hmac(Box::new(hmac::Key::new(hmac::HMAC_SHA256, &material[..]))),
        };
        Ok(DataKey { id, purpose, state, created, material, prepared })
    }

    fn generate(id: KeyId, purpose: KeyPurpose) -> Result<Self> {
        Self::from_material(id, purpose, KeyState::Active, Timestamp::now(), random_key()?)
    }

    /// The key's id.
    pub fn id(&self) -> KeyId {
        self.id
    }

    /// What the key is for.
    pub fn purpose(&self) -> KeyPurpose {
        self.purpose
    }

    /// Where the key is in its life.
    pub fn state(&self) -> KeyState {
        self.state
    }

    /// When the key was made.
    pub fn created(&self) -> Timestamp {
        self.created
    }

    pub(crate) fn material(&self) -> &[u8; KEY_LEN] {
        &self.material
    }

    /// The AEAD key; `None` for a hashing key.
    pub(crate) fn aead(&self) -> Option<&aead::LessSafeKey> {
        match &self.prepared {
            Prepared::Aead(k) => Some(k),
            Prepared::Hmac(_) => None,
        }
    }

    /// The HMAC key; `None` for an encryption key.
    pub(crate) fn hmac(&self) -> Option<&hmac::Key> {
        match &self.prepared {
            Prepared::Hmac(k) => Some(k),
            Prepared::Aead(_) => None,
        }
    }
}

impl Clone for DataKey {
    fn clone(&self) -> Self {
        let prepared = match &self.prepared {
            // aws-lc's AEAD contexts cannot be copied; build a new one from
            // the same material (it was accepted once, so it is again).
            Prepared::Aead(_) => Prepared::Aead(aead::LessSafeKey::new(
                aead::UnboundKey::new(&aead::AES_256_GCM, &self.material[..]).expect("a 32-byte AES-256 key"),
            )),
            Prepared::Hmac(k) => Prepared::Hmac(k.clone()),
        };
        DataKey {
            id: self.id,
            purpose: self.purpose,
            state: self.state,
            created: self.created,
            material: self.material.clone(),
            prepared,
        }
    }
}

impl fmt::Debug for DataKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("DataKey")
            .field("id", &self.id)
            .field("purpose", &self.purpose)
            .field("state", &self.state)
            .field("created", &self.created)
            .finish_non_exhaustive()
    }
}

/// 32 bytes from the system random generator, in a buffer zeroed on drop.
pub(crate) fn random_key() -> Result<Zeroizing<[u8; KEY_LEN]>> {
    let mut k = Zeroizing::new([0u8; KEY_LEN]);
    aws_lc_rs::rand::fill(&mut k[..]).map_err(|_| CryptoError::random())?;
    Ok(k)
}

/// The versioned data keys of one deployment: exactly one active encryption
/// key and one active hashing key, plus older keys (see the module doc).
#[derive(Clone)]
pub struct KeyRing {
    keys: BTreeMap<KeyId, DataKey>,
    next_id: u32,
    active_encryption: KeyId,
    active_hashing: KeyId,
}

impl KeyRing {
    /// A new ring with a fresh random active encryption key (id 1) and active
    /// hashing key (id 2).
    pub fn generate() -> Result<KeyRing> {
        let keys = vec![
            DataKey::generate(KeyId(1), KeyPurpose::Encryption)?,
            DataKey::generate(KeyId(2), KeyPurpose::Hashing)?,
        ];
        KeyRing::from_parts(3, keys)
    }

    /// Assemble a ring, checking the invariants of the module doc.
    pub(crate) fn from_parts(next_id: u32, keys: Vec<DataKey>) -> Result<KeyRing> {
        let mut map = BTreeMap::new();
        let mut active = [None, None];
        for key in keys {
            if key.id.0 == 0 || key.id.0 >= next_id {
                return Err(CryptoError::malformed(format!(
                    "the key ring holds key id {} but hands out ids below {next_id} only",
                    key.id
                )));
            }
            if key.state == KeyState::Active {
                let slot = &mut active[usize::from(key.purpose == KeyPurpose::Hashing)];
                if let Some(other) = slot.replace(key.id) {
                    return Err(CryptoError::malformed(format!(
                        "the key ring has two active {} keys ({other} and {})",
                        key.purpose, key.id
                    )));
                }
            }
            let id = key.id;
            if map.insert(id, key).is_some() {
                return Err(CryptoError::malformed(format!("the key ring holds key id {id} twice")));
            }
        }
        let missing = |p: KeyPurpose| CryptoError::malformed(format!("the key ring has no active {p} key"));
        let active_encryption = active[0].ok_or_else(|| missing(KeyPurpose::Encryption))?;
        let active_hashing = active[1].ok_or_else(|| missing(KeyPurpose::Hashing))?;
        Ok(KeyRing { keys: map, next_id, active_encryption, active_hashing })
    }

    /// The key with this id, whatever its state.
    pub fn get(&self, id: KeyId) -> Option<&DataKey> {
        self.keys.get(&id)
    }

    /// Every key, by id.
    pub fn keys(&self) -> impl DoubleEndedIterator<Item = &DataKey> {
        self.keys.values()
    }

    /// The active key of `purpose`.
    pub fn active(&self, purpose: KeyPurpose) -> &DataKey {
        let id = match purpose {
            KeyPurpose::Encryption => self.active_encryption,
            KeyPurpose::Hashing => self.active_hashing,
        };
        &self.keys[&id]
    }

    /// The id the next new key will get.
    pub fn next_id(&self) -> KeyId {
        KeyId(self.next_id)
    }

    /// Make a new active key for `purpose`; the previous active key becomes
    /// decrypt-only. Returns the new key's id.
    pub fn rotate(&mut self, purpose: KeyPurpose) -> Result<KeyId> {
        let id = KeyId(self.next_id);
        let next = self
            .next_id
            .checked_add(1)
            .ok_or_else(|| CryptoError::new(crate::CryptoErrorKind::KeyState, "the key ring has used every key id"))?;
        let key = DataKey::generate(id, purpose)?;
        let slot = match purpose {
            KeyPurpose::Encryption => &mut self.active_encryption,
            KeyPurpose::Hashing => &mut self.active_hashing,
        };
        let old = std::mem::replace(slot, id);
        if let Some(old) = self.keys.get_mut(&old) {
            old.state = KeyState::DecryptOnly;
        }
        self.keys.insert(id, key);
        self.next_id = next;
        Ok(id)
    }

    /// Retire a decrypt-only key: it no longer opens anything. The active key
    /// cannot be retired (rotate first).
    pub fn retire(&mut self, id: KeyId) -> Result<()> {
        let key = self.keys.get_mut(&id).ok_or_else(|| CryptoError::unknown_key(id))?;
        match key.state {
            KeyState::DecryptOnly => {
                key.state = KeyState::Retired;
                Ok(())
            }
            KeyState::Active => Err(CryptoError::key_state(
                id,
                format!("key {id} is the active {} key and cannot be retired; rotate first", key.purpose),
            )),
            KeyState::Retired => Err(CryptoError::key_state(id, format!("key {id} is already retired"))),
        }
    }

    /// Undo a retirement: the key becomes decrypt-only again.
    pub fn restore(&mut self, id: KeyId) -> Result<()> {
        let key = self.keys.get_mut(&id).ok_or_else(|| CryptoError::unknown_key(id))?;
        match key.state {
            KeyState::Retired => {
                key.state = KeyState::DecryptOnly;
                Ok(())
            }
            state => Err(CryptoError::key_state(
                id,
                format!("key {id} is {state}, not retired; only a retired key can be restored"),
            )),
        }
    }

    /// Remove a retired key for good: what it sealed can never be opened
    /// again. Its id is not reused.
    pub fn destroy(&mut self, id: KeyId) -> Result<()> {
        let key = self.keys.get(&id).ok_or_else(|| CryptoError::unknown_key(id))?;
        if key.state != KeyState::Retired {
            return Err(CryptoError::key_state(
                id,
                format!("key {id} is {}; only a retired key can be destroyed", key.state),
            ));
        }
        self.keys.remove(&id);
        Ok(())
    }
}

impl fmt::Debug for KeyRing {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("KeyRing")
            .field("next_id", &self.next_id)
            .field("keys", &self.keys.values().collect::<Vec<_>>())
            .finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::CryptoErrorKind;

    #[test]
    fn a_new_ring_has_one_active_key_per_purpose() {
        let ring = KeyRing::generate().unwrap();
        assert_eq!(ring.active(KeyPurpose::Encryption).id(), KeyId(1));
        assert_eq!(ring.active(KeyPurpose::Hashing).id(), KeyId(2));
        assert_eq!(ring.next_id(), KeyId(3));
        assert_ne!(ring.get(KeyId(1)).unwrap().material(), ring.get(KeyId(2)).unwrap().material());
    }

    #[test]
    fn rotation_demotes_the_old_key_and_ids_are_never_reused() {
        let mut ring = KeyRing::generate().unwrap();
        let k3 = ring.rotate(KeyPurpose::Encryption).unwrap();
        assert_eq!(k3, KeyId(3));
        assert_eq!(ring.active(KeyPurpose::Encryption).id(), k3);
        assert_eq!(ring.get(KeyId(1)).unwrap().state(), KeyState::DecryptOnly);
        assert_eq!(ring.active(KeyPurpose::Hashing).id(), KeyId(2), "the other purpose is untouched");
        ring.retire(KeyId(1)).unwrap();
        ring.destroy(KeyId(1)).unwrap();
        assert!(ring.get(KeyId(1)).is_none());
        assert_eq!(ring.rotate(KeyPurpose::Hashing).unwrap(), KeyId(4));
        assert_eq!(ring.get(KeyId(2)).unwrap().state(), KeyState::DecryptOnly);
    }

    #[test]
    fn refused_transitions_say_why() {
        let mut ring = KeyRing::generate().unwrap();
        let e = ring.retire(KeyId(1)).unwrap_err();
        assert_eq!(e.kind(), CryptoErrorKind::KeyState);
        assert_eq!(e.key_id(), Some(KeyId(1)));
        assert_eq!(e.message(), "key 1 is the active encryption key and cannot be retired; rotate first");
        let e = ring.destroy(KeyId(2)).unwrap_err();
        assert_eq!(e.message(), "key 2 is active; only a retired key can be destroyed");
        let e = ring.restore(KeyId(2)).unwrap_err();
        assert_eq!(e.message(), "key 2 is active, not retired; only a retired key can be restored");
        assert_eq!(ring.retire(KeyId(7)).unwrap_err().kind(), CryptoErrorKind::UnknownKey);
        ring.rotate(KeyPurpose::Encryption).unwrap();
        ring.retire(KeyId(1)).unwrap();
        assert_eq!(ring.retire(KeyId(1)).unwrap_err().message(), "key 1 is already retired");
        ring.restore(KeyId(1)).unwrap();
        assert_eq!(ring.get(KeyId(1)).unwrap().state(), KeyState::DecryptOnly);
    }

    #[test]
    fn from_parts_refuses_broken_rings() {
        let key = |id, purpose, state| {
            DataKey::from_material(KeyId(id), purpose, state, Timestamp(0), Zeroizing::new([id as u8; KEY_LEN]))
                .unwrap()
        };
        use KeyPurpose::*;
        use KeyState::*;
        let ok = KeyRing::from_parts(3, vec![key(1, Encryption, Active), key(2, Hashing, Active)]);
        assert!(ok.is_ok());
        for (next, keys, why) in [
            (3, vec![key(1, Encryption, Active)], "no active hashing key"),
            (
                4,
                vec![key(1, Encryption, Active), key(2, Hashing, Active), key(3, Encryption, Active)],
                "two active encryption keys (1 and 3)",
            ),
            (2, vec![key(1, Encryption, Active), key(2, Hashing, Active)], "holds key id 2 but hands out ids below 2"),
            (3, vec![key(1, Encryption, Active), key(2, Hashing, Active), key(2, Hashing, Retired)], "key id 2 twice"),
        ] {
            let e = KeyRing::from_parts(next, keys).unwrap_err();
            assert_eq!(e.kind(), CryptoErrorKind::Malformed);
            assert!(e.message().contains(why), "{e}");
        }
    }

    #[test]
    fn debug_shows_no_key_material() {
        let ring = KeyRing::generate().unwrap();
        let text = format!("{ring:?} {:#?}", ring.active(KeyPurpose::Encryption));
        assert!(text.contains("id: KeyId(1)") && text.contains("Active"), "{text}");
        for key in ring.keys() {
            crate::testutil::assert_no_secret(&text, key.material());
        }
    }
}
