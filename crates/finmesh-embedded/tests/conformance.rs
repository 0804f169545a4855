//! The conformance suite (`finmesh_core::testsuite`) run against the
//! embedded engine: each case opens a fresh engine in its own temporary
//! directory; a restart closes the engine and reopens the same directory.

use std::sync::Arc;

use async_trait::async_trait;
use finmesh_core::Engine;
use finmesh_core::testsuite::Harness;
use finmesh_embedded::EmbeddedEngine;
use tempfile::TempDir;

/// An embedded engine on a temporary directory.
struct EmbeddedHarness {
    /// `None` only while restarting.
    engine: Option<EmbeddedEngine>,
    /// Declared after `engine` so the engine is dropped before its directory.
    dir: TempDir,
}

#[async_trait]
impl Harness for EmbeddedHarness {
    async fn start() -> Self {
        let dir = tempfile::tempdir().expect("create a temporary directory");
        let engine = EmbeddedEngine::open(dir.path()).expect("open the embedded engine");
        EmbeddedHarness { engine: Some(engine), dir }
    }

    fn engine(&self) -> Arc<dyn Engine> {
        Arc::new(self.engine.clone().expect("engine is open"))
    }

    async fn restart(&mut self) {
        let engine = self.engine.take().expect("engine is open");
        engine.close().await.expect("close the embedded engine");
        self.engine = Some(EmbeddedEngine::open(self.dir.path()).expect("reopen the embedded engine"));
    }
}

finmesh_core::engine_conformance_tests!(EmbeddedHarness);
