//! The conformance suite through [`SecureEngine`] on the NATS engine: the
//! whole suite with every bucket encrypted (`engine_conformance_tests!`)
//! and the cases of enforced security options (`security_conformance_tests!`).
//! Each case starts its own `nats-server -js` (test kit).

mod secure;

use std::sync::Arc;

use async_trait::async_trait;
use finmesh_core::Engine;
use finmesh_core::testsuite::security::SecureHarness;
use finmesh_core::testsuite::{Difference, Harness};
use finmesh_crypto::SecureEngine;
use finmesh_nats::{NATS_DEFAULT_SYNC, NatsEngine, NatsEngineOptions};
use finmesh_testkit::{ManagedServer, NatsServer};
use secure::{MasterKeyFile, wrap};

/// A NATS engine on its own server, inside the wrapper.
struct SecureNats {
    raw: NatsEngine,
    engine: Arc<SecureEngine>,
    master: MasterKeyFile,
    /// Declared after the engines: connections close before the server dies.
    server: NatsServer,
}

async fn connect(server: &NatsServer) -> NatsEngine {
    NatsEngine::connect(NatsEngineOptions::new(server.url())).await.expect("connect the NATS engine")
}

#[async_trait]
impl Harness for SecureNats {
    async fn start() -> Self {
        let server = NatsServer::start().await.expect("start nats-server");
        let raw = connect(&server).await;
        let master = MasterKeyFile::new();
        let engine = wrap(Arc::new(raw.clone()), &master, true).await;
        SecureNats { raw, engine, master, server }
    }

    fn engine(&self) -> Arc<dyn Engine> {
        self.engine.clone()
    }

    async fn restart(&mut self) {
        self.server.restart().await.expect("restart nats-server");
        self.raw = connect(&self.server).await;
        self.engine = wrap(Arc::new(self.raw.clone()), &self.master, true).await;
    }

    fn differences() -> &'static [Difference] {
        &[
            Difference::StoredBytesIncludeOverhead,
            Difference::ServerWideSync(NATS_DEFAULT_SYNC),
            Difference::ConsumerStateMayLagRestart,
            Difference::PartialBatchOnFailure,
        ]
    }
}

impl SecureHarness for SecureNats {
    fn raw(&self) -> Arc<dyn Engine> {
        Arc::new(self.raw.clone())
    }
}

finmesh_core::engine_conformance_tests!(SecureNats);
finmesh_core::security_conformance_tests!(SecureNats);
