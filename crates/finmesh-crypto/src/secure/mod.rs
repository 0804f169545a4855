//! [`SecureEngine`]: the engine wrapper that enforces the security options
//! of KV buckets (STYLE.md "wrappers, not branches"). It implements every
//! engine trait around any `Arc<dyn Engine>` and a [`RingStore`]; the
//! gateway holds it as its engine and never asks what is inside.
//!
//! What it does, per bucket option (options are fixed at creation, see
//! [`finmesh_core::options`]):
//!
//! - `encryption = "aes256gcm"`: every value is sealed ([`crate::seal`])
//!   before it reaches the inner engine and opened after; the associated
//!   data binds bucket and **stored** key, so a ciphertext copied to another
//!   key or bucket fails to open. A value that fails to open is
//!   [`ErrorKind::Integrity`], logged with bucket, key id and revision (never
//!   bytes, never the clear key). Delete and purge markers carry no value
//!   and are not sealed.
//! - `key_hashing = "hmac-sha256"`: the clear key is replaced by its keyed
//!   hash ([`crate::hash_key`]) before it reaches the inner engine. Get,
//!   get at revision, put, create, update, delete (also conditional),
//!   purge, history and a watch of one key all work by the clear key, and
//!   the entries they return carry the clear key. After a rotation of the
//!   hashing key a clear key is looked up under every candidate hash
//!   ([`crate::hash_key_candidates`]: active first, then decrypt-only,
//!   newest first); a key found under an older hash stays there (writes,
//!   CAS and deletes go to where it lives) until a re-keying job moves it.
//!   With one hashing key (the common case) a lookup costs no extra read.
//! - `key_format = "pan"`: every clear key must be a card number
//!   ([`crate::validate_pan`]); otherwise `Invalid`, with a message that
//!   names the rule broken and never the number.
//!
//! Deliberate limits of a bucket with hashed keys (a hash cannot be
//! reversed): `kv_keys` / `kv_keys_page` return the stored hashes and accept
//! only the empty prefix (`Invalid` otherwise); `kv_watch` with the empty
//! prefix watches every key and its entries carry the stored hashes, while
//! a non-empty prefix is taken as **one whole clear key** (not a prefix) and
//! watches that key, its entries carrying the clear key.
//!
//! Size limits: the user's `max_value_size` applies to the plaintext. The
//! inner bucket of an encrypted bucket is given the limit plus
//! [`crate::OVERHEAD`] (so the largest a user may set is
//! [`MAX_SEALED_VALUE_SIZE`]), `bucket_info` reports the user's figure, and
//! a bucket without a limit accepts plaintexts up to
//! [`MAX_SEALED_VALUE_SIZE`]. `bytes` in `bucket_info` counts what is
//! stored (ciphertexts and hashed keys).
//!
//! Streams and consumers are passed through unchanged. Sealing stream
//! payloads is not built, so the wrapper claims no stream option
//! ([`finmesh_core::StreamEngine::supports_stream_security`]) and the
//! gateway keeps refusing encrypted streams.
//!
//! Internal buckets (`_finmesh*`, e.g. the key ring's own) are passed
//! through untouched and left out of `list_buckets`.
//!
//! # Cached bucket options
//!
//! The wrapper caches each bucket's options (read once with `bucket_info`)
//! since they cannot change. A bucket deleted through this wrapper is
//! forgotten at once. If **another** gateway deletes a bucket and creates
//! one of the same name with other security options, this gateway keeps
//! the old options until it restarts: reads then fail (`Integrity`) or
//! miss, and writes follow the old options. Operators must not reuse the
//! name of a deleted encrypted bucket while gateways run (docs/security.md).

mod delegate;
mod kv;

use std::sync::Arc;

use finmesh_core::config::MAX_PAYLOAD_LIMIT;
use finmesh_core::{
    BucketConfig, BucketInfo, BucketName, BucketSecurity, Encryption, Engine, Error, ErrorKind, Key, KeyFormat,
    KeyHashing, Result, Revision,
};
use hashbrown::HashMap;
use parking_lot::RwLock;

use crate::error::CryptoErrorKind;
use crate::pan::validate_pan;
use crate::store::RingStore;
use crate::{OVERHEAD, hash_key, hash_key_candidates, key_id_of};

/// The largest plaintext an encrypted bucket accepts, and the largest
/// `max_value_size` it may be given: the engines' payload limit less the
/// sealing overhead.
pub const MAX_SEALED_VALUE_SIZE: u32 = MAX_PAYLOAD_LIMIT - OVERHEAD as u32;

/// What the wrapper enforces on one bucket.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Policy {
    /// The options enforced (the bucket's own, or the wrapper's default).
    pub security: BucketSecurity,
    /// Largest plaintext accepted when values are sealed.
    pub plaintext_limit: u32,
}

impl Policy {
    fn plain() -> Policy {
        Policy { security: BucketSecurity::default(), plaintext_limit: MAX_PAYLOAD_LIMIT }
    }

    pub(crate) fn sealed(&self) -> bool {
        self.security.encryption.is_some()
    }

    pub(crate) fn hashed(&self) -> bool {
        self.security.key_hashing.is_some()
    }
}

/// The encrypting engine wrapper (see the module doc).
pub struct SecureEngine {
    /// The engine that stores what this wrapper hands it.
    inner: Arc<dyn Engine>,
    /// The key ring in use (kept current by [`RingStore::follow`], which the
    /// node runs; this wrapper only reads it and reloads on an unknown id).
    keys: Arc<RingStore>,
    /// Options applied to buckets that have none of their own (tests run
    /// the whole conformance suite with encryption this way).
    default_security: BucketSecurity,
    /// Each bucket's policy, read once (options are fixed at creation).
    /// A plain map (foldhash: every request looks its bucket up) under a
    /// short lock, never held across an await.
    policies: RwLock<HashMap<BucketName, Policy>>,
}

impl SecureEngine {
    /// Wrap `inner`, sealing and hashing with the ring of `keys`.
    pub fn new(inner: Arc<dyn Engine>, keys: Arc<RingStore>) -> SecureEngine {
        SecureEngine { inner, keys, default_security: BucketSecurity::default(), policies: RwLock::new(HashMap::new()) }
    }

    /// Enforce `security` on every client bucket whose own options are all
    /// absent, without storing it in the bucket's configuration (so `info`
    /// still shows none). Meant for tests that run the whole conformance
    /// suite through the wrapper; a node never sets it.
    pub fn with_default_security(mut self, security: BucketSecurity) -> SecureEngine {
        self.default_security = security;
        self
    }

    /// The engine inside.
    pub fn inner(&self) -> &Arc<dyn Engine> {
        &self.inner
    }

    /// The key ring store.
    pub fn keys(&self) -> &Arc<RingStore> {
        &self.keys
    }

    /// The options enforced on a bucket whose configuration holds `own`.
    fn effective(&self, bucket: &BucketName, own: BucketSecurity) -> BucketSecurity {
        if bucket.is_reserved() {
            BucketSecurity::default()
        } else if own.is_none() {
            self.default_security
        } else {
            own
        }
    }

    /// The policy for an inner bucket configuration.
    fn policy_of(&self, inner: &BucketConfig) -> Policy {
        let security = self.effective(&inner.name, inner.security);
        if security.encryption.is_none() {
            return Policy { security, ..Policy::plain() };
        }
        let plaintext_limit =
            inner.max_value_size.map_or(MAX_SEALED_VALUE_SIZE, |n| n.saturating_sub(OVERHEAD as u32).max(1));
        Policy { security, plaintext_limit }
    }

    /// The policy of `bucket`, from the cache or read once.
    pub(crate) async fn policy(&self, bucket: &BucketName) -> Result<Policy> {
        if bucket.is_reserved() {
            return Ok(Policy::plain());
        }
        if let Some(p) = self.policies.read().get(bucket) {
            return Ok(*p);
        }
        let info = self.inner.bucket_info(bucket).await?;
        Ok(self.remember(&info))
    }

    fn remember(&self, inner: &BucketInfo) -> Policy {
        let policy = self.policy_of(&inner.config);
        if !inner.config.name.is_reserved() {
            self.policies.write().insert(inner.config.name.clone(), policy);
        }
        policy
    }

    fn forget(&self, bucket: &BucketName) {
        self.policies.write().remove(bucket);
    }

    /// The configuration the inner engine stores for the user's `config`.
    fn to_inner(&self, config: BucketConfig) -> Result<BucketConfig> {
        config.validate()?;
        let security = self.effective(&config.name, config.security);
        if security.encryption.is_none() {
            return Ok(config);
        }
        let mut inner = config;
        if let Some(n) = inner.max_value_size {
            if n > MAX_SEALED_VALUE_SIZE {
                return Err(Error::invalid(format!(
                    "max_value_size {n} exceeds the limit of {MAX_SEALED_VALUE_SIZE} bytes of an encrypted bucket \
                     (a sealed value is {OVERHEAD} bytes longer than its plaintext)"
                )));
            }
            inner.max_value_size = Some(n + OVERHEAD as u32);
        }
        Ok(inner)
    }

    /// The user's view of an inner bucket's info.
    fn to_user(&self, mut info: BucketInfo) -> BucketInfo {
        let policy = self.remember(&info);
        if policy.sealed() {
            info.config.max_value_size = info.config.max_value_size.map(|_| policy.plaintext_limit);
        }
        info
    }

    /// The stored key for a clear `key` that is written now: where it lives
    /// already (an older hash, after a rotation), else its hash under the
    /// active hashing key. Checks the key format first.
    pub(crate) async fn stored_key(&self, bucket: &BucketName, policy: &Policy, key: &Key) -> Result<Key> {
        check_format(policy, key)?;
        if !policy.hashed() {
            return Ok(key.clone());
        }
        let ring = self.keys.ring();
        let candidates = hash_key_candidates(&ring, bucket, key.as_str())?;
        if candidates.len() > 1 {
            for c in &candidates {
                if self.inner.kv_get(bucket, c).await?.is_some() {
                    return Ok(c.clone());
                }
            }
        }
        Ok(hash_key(&ring, bucket, key.as_str())?)
    }

    /// Every stored key a clear `key` may have, the one to write first.
    pub(crate) fn candidates(&self, bucket: &BucketName, policy: &Policy, key: &Key) -> Result<Vec<Key>> {
        check_format(policy, key)?;
        if !policy.hashed() {
            return Ok(vec![key.clone()]);
        }
        Ok(hash_key_candidates(&self.keys.ring(), bucket, key.as_str())?)
    }

    /// Seal `value` for `stored` if the bucket is encrypted, after checking
    /// the plaintext size limit.
    pub(crate) fn seal(
        &self,
        bucket: &BucketName,
        policy: &Policy,
        stored: &Key,
        value: bytes::Bytes,
    ) -> Result<bytes::Bytes> {
        if !policy.sealed() {
            return Ok(value);
        }
        if value.len() > policy.plaintext_limit as usize {
            return Err(Error::too_large(format!(
                "a value of {} bytes exceeds bucket `{bucket}`'s max_value_size of {} bytes",
                value.len(),
                policy.plaintext_limit
            )));
        }
        Ok(self.keys.seal_value(bucket, stored, &value)?)
    }

    /// Open a sealed value read back from `stored` at `revision`.
    pub(crate) async fn open(
        &self,
        bucket: &BucketName,
        stored: &Key,
        revision: Revision,
        sealed: &[u8],
    ) -> Result<bytes::Bytes> {
        open_with(&self.keys, bucket, stored, revision, sealed).await
    }
}

/// Open a sealed value read back from `stored` at `revision` with the ring
/// of `keys`; a value that fails to open is logged (bucket, key id,
/// revision: never bytes or key) and is [`ErrorKind::Integrity`].
pub(crate) async fn open_with(
    keys: &RingStore,
    bucket: &BucketName,
    stored: &Key,
    revision: Revision,
    sealed: &[u8],
) -> Result<bytes::Bytes> {
    match keys.open_value(bucket, stored, sealed).await {
        Ok(plain) => Ok(plain),
        Err(e) if matches!(e.kind(), CryptoErrorKind::Integrity | CryptoErrorKind::Malformed) => {
            let key_id = key_id_of(sealed).ok().map(|id| id.0);
            tracing::error!(
                bucket = %bucket,
                key_id = ?key_id,
                revision = revision.0,
                reason = e.kind().as_str(),
                "a stored value fails to open"
            );
            Err(Error::new(
                ErrorKind::Integrity,
                format!("a value in bucket `{bucket}` at revision {revision} fails its integrity check"),
            )
            .with_source(e))
        }
        Err(e) => Err(e.into()),
    }
}

/// Refuse a clear key that breaks the bucket's key format.
fn check_format(policy: &Policy, key: &Key) -> Result<()> {
    match policy.security.key_format {
        Some(KeyFormat::Pan) => validate_pan(key.as_str()).map_err(|e| Error::invalid(format!("key: {e}"))),
        None => Ok(()),
    }
}

/// The options [`SecureEngine`] enforces.
pub(crate) fn enforces(option: finmesh_core::SecurityOption) -> bool {
    use finmesh_core::SecurityOption as O;
    matches!(
        option,
        O::Encryption(Encryption::Aes256Gcm) | O::KeyHashing(KeyHashing::HmacSha256) | O::KeyFormat(KeyFormat::Pan)
    )
}
