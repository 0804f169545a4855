//! `[security]` at node start: fetch the master key before anything else
//! is touched, then load (or on the very first start create) the key ring
//! stored in the engine and wrap the engine in
//! [`finmesh_crypto::SecureEngine`].
//!
//! Invariants:
//! - a missing, unreadable or malformed master key stops the node before
//!   the data dir or the engine is touched ([`MasterKeySource::check`]);
//! - a master key that does not open the stored ring stops the node and
//!   changes nothing in the engine ([`finmesh_crypto::RingStore`] never
//!   replaces a ring it cannot open); the error says which source was used,
//!   never any key byte;
//! - the node keeps following the stored ring (`RingStore::follow`) so a
//!   rotation made through another gateway is used without a restart;
//! - `finmesh keys init` ([`MasterKeySource::init`]) creates a ring only
//!   where none is stored: an existing ring, even one this master key does
//!   not open, is left as it is and the command fails.

use std::sync::Arc;

use anyhow::Context;
use finmesh_core::{Engine, KvEngine};
use finmesh_crypto::{
    CryptoErrorKind, KEYS_BUCKET, KeyAdmin, KeyId, KeyProvider, KeyPurpose, MasterKey, Rewrapped, RingStore,
    SecureEngine, keys_bucket_config,
};

use crate::config::SecuritySection;

/// The master key's source, checked once at start.
pub struct MasterKeySource {
    provider: Box<dyn KeyProvider>,
    ring_replicas: u8,
}

impl MasterKeySource {
    /// Fetch the master key once (and drop it) so a missing or bad key
    /// fails before anything else happens.
    pub async fn check(section: &SecuritySection) -> anyhow::Result<MasterKeySource> {
        let provider = section.provider();
        provider.master_key().await.with_context(|| {
            format!("[security]: cannot load the master key from the {}; the node does not start", provider.describe())
        })?;
        Ok(MasterKeySource { provider, ring_replicas: section.ring_replicas })
    }

    /// Create the key ring in `engine` unless one is stored (see the module
    /// doc). Returns the active encryption and hashing key ids.
    pub async fn init(&self, engine: Arc<dyn Engine>) -> anyhow::Result<(KeyId, KeyId)> {
        let kv: Arc<dyn KvEngine> = engine;
        let bucket = finmesh_core::BucketName::new(KEYS_BUCKET).expect("a valid bucket name");
        match RingStore::open(kv.clone(), self.provider.as_ref(), bucket.clone()).await {
            Ok(keys) => anyhow::bail!(
                "a key ring already exists in bucket `{bucket}` (revision {}); not replacing it (rotate keys with \
                 `finmesh keys rotate` on a running node)",
                keys.revision()
            ),
            Err(e) if e.kind() == CryptoErrorKind::NoRing => {}
            Err(e) => anyhow::bail!(
                "a key ring exists in bucket `{bucket}` but cannot be loaded with the master key from the {}: {e}; \
                 not replacing it",
                self.provider.describe()
            ),
        }
        let keys = RingStore::open_or_create(kv, self.provider.as_ref(), keys_bucket_config(self.ring_replicas))
            .await
            .with_context(|| format!("creating the key ring in bucket `{bucket}`"))?;
        let ring = keys.ring();
        Ok((ring.active(KeyPurpose::Encryption).id(), ring.active(KeyPurpose::Hashing).id()))
    }

    /// Store the ring of `engine` wrapped by `new` instead of this source's
    /// master key (a master-key change; see `finmesh_crypto::rewrap`).
    pub async fn rewrap(&self, engine: Arc<dyn Engine>, new: &MasterKey) -> anyhow::Result<Rewrapped> {
        let old = self.provider.master_key().await?;
        let bucket = finmesh_core::BucketName::new(KEYS_BUCKET).expect("a valid bucket name");
        let kv: Arc<dyn KvEngine> = engine;
        finmesh_crypto::rewrap(kv.as_ref(), &bucket, &old, new).await.with_context(|| {
            format!(
                "rewrapping the key ring in bucket `{bucket}` (its master key from the {})",
                self.provider.describe()
            )
        })
    }

    /// Load the key ring stored in `engine` (creating it on the first
    /// start) and wrap `engine`. Returns the wrapped engine and the key
    /// administration of its ring.
    pub async fn wrap(&self, engine: Arc<dyn Engine>) -> anyhow::Result<(Arc<dyn Engine>, Arc<KeyAdmin>)> {
        let kv: Arc<dyn KvEngine> = engine.clone();
        let keys = RingStore::open_or_create(kv, self.provider.as_ref(), keys_bucket_config(self.ring_replicas))
            .await
            .map_err(|e| {
                let hint = match e.kind() {
                    CryptoErrorKind::WrongMasterKey | CryptoErrorKind::Integrity => {
                        " (is it the master key this engine's key ring was made with?)"
                    }
                    _ => "",
                };
                anyhow::anyhow!(
                    "[security]: cannot load the key ring with the master key from the {}{hint}: {e}; the node does \
                     not start and nothing was changed",
                    self.provider.describe()
                )
            })?;
        let keys = Arc::new(keys);
        tracing::info!(source = %self.provider.describe(), ring_revision = keys.revision().0, "key ring loaded");
        let secure = Arc::new(SecureEngine::new(engine, keys));
        Ok((secure.clone(), Arc::new(KeyAdmin::new(secure))))
    }
}
