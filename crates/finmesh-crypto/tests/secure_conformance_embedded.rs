//! The conformance suite through [`SecureEngine`] on the embedded engine:
//! the whole suite with every bucket encrypted (`engine_conformance_tests!`)
//! and the cases of enforced security options (`security_conformance_tests!`).

mod secure;

use std::sync::Arc;

use async_trait::async_trait;
use finmesh_core::Engine;
use finmesh_core::testsuite::Harness;
use finmesh_core::testsuite::security::SecureHarness;
use finmesh_crypto::SecureEngine;
use finmesh_embedded::EmbeddedEngine;
use secure::{MasterKeyFile, wrap};
use tempfile::TempDir;

/// An embedded engine on a temporary directory inside the wrapper.
struct SecureEmbedded {
    /// `None` only while restarting.
    raw: Option<EmbeddedEngine>,
    /// `None` only while restarting; holds handles of `raw`.
    engine: Option<Arc<SecureEngine>>,
    master: MasterKeyFile,
    /// Declared last so the engine is dropped before its directory.
    dir: TempDir,
}

#[async_trait]
impl Harness for SecureEmbedded {
    async fn start() -> Self {
        let dir = tempfile::tempdir().expect("create a temporary directory");
        let raw = EmbeddedEngine::open(dir.path()).expect("open the embedded engine");
        let master = MasterKeyFile::new();
        let engine = wrap(Arc::new(raw.clone()), &master, true).await;
        SecureEmbedded { raw: Some(raw), engine: Some(engine), master, dir }
    }

    fn engine(&self) -> Arc<dyn Engine> {
        self.engine.clone().expect("engine is open")
    }

    async fn restart(&mut self) {
        let raw = self.raw.take().expect("engine is open");
        // The wrapper and its ring hold handles of the engine: drop them first.
        drop(self.engine.take());
        raw.close().await.expect("close the embedded engine");
        let raw = EmbeddedEngine::open(self.dir.path()).expect("reopen the embedded engine");
        self.engine = Some(wrap(Arc::new(raw.clone()), &self.master, true).await);
        self.raw = Some(raw);
    }
}

impl SecureHarness for SecureEmbedded {
    fn raw(&self) -> Arc<dyn Engine> {
        Arc::new(self.raw.clone().expect("engine is open"))
    }
}

finmesh_core::engine_conformance_tests!(SecureEmbedded);
finmesh_core::security_conformance_tests!(SecureEmbedded);

/// The whole suite above really runs through the sealing path: a bucket
/// created without options holds ciphertexts in the engine.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn buckets_without_options_are_sealed_in_this_run() {
    use bytes::Bytes;
    use finmesh_core::testsuite::support::{bucket, key};
    let h = SecureEmbedded::start().await;
    let b = bucket("plain");
    h.engine().create_bucket(finmesh_core::BucketConfig::new(b.clone())).await.unwrap();
    h.engine().kv_put(&b, &key("k"), Bytes::from("clear text")).await.unwrap();
    let stored = h.raw().kv_get(&b, &key("k")).await.unwrap().unwrap().value;
    assert_eq!(stored.len(), "clear text".len() + finmesh_crypto::OVERHEAD);
    assert!(!stored.windows(10).any(|w| w == b"clear text"));
    assert!(h.engine().bucket_info(&b).await.unwrap().config.security.is_none(), "nothing stored in the config");
}
