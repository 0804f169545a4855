//! Shared by the conformance runs through [`SecureEngine`]: one wrapped
//! stack over any engine, with its key ring in that engine.

use std::sync::Arc;

use finmesh_core::{BucketSecurity, Encryption, Engine, KvEngine};
use finmesh_crypto::{FileKeyProvider, RingStore, SecureEngine, keys_bucket_config};
use tempfile::TempDir;

/// A master key file in its own directory (dropped with the stack).
pub struct MasterKeyFile {
    pub provider: FileKeyProvider,
    _dir: TempDir,
}

impl MasterKeyFile {
    pub fn new() -> MasterKeyFile {
        let dir = tempfile::tempdir().expect("a temporary directory");
        let path = dir.path().join("master.key");
        FileKeyProvider::create(&path).expect("create a master key");
        MasterKeyFile { provider: FileKeyProvider::new(path), _dir: dir }
    }
}

/// Wrap `inner` as a node would: load (or create) the ring stored in it,
/// then the wrapper. `encrypt_all`: buckets without options of their own
/// are encrypted too (to run the whole suite through the sealing path).
pub async fn wrap(inner: Arc<dyn Engine>, master: &MasterKeyFile, encrypt_all: bool) -> Arc<SecureEngine> {
    let kv: Arc<dyn KvEngine> = inner.clone();
    let keys = RingStore::open_or_create(kv, &master.provider, keys_bucket_config(1)).await.expect("open the key ring");
    let mut engine = SecureEngine::new(inner, Arc::new(keys));
    if encrypt_all {
        engine = engine
            .with_default_security(BucketSecurity { encryption: Some(Encryption::Aes256Gcm), ..Default::default() });
    }
    Arc::new(engine)
}
