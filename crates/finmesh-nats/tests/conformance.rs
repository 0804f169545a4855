//! The conformance suite (`finmesh_core::testsuite`) run against the NATS
//! engine: each case starts its own `nats-server -js` (test kit) with a
//! temporary store; a restart stops the server and starts it again on the
//! same port and store, then connects a fresh engine.

use std::sync::Arc;

use async_trait::async_trait;
use finmesh_core::Engine;
use finmesh_core::testsuite::{Difference, Harness};
use finmesh_nats::{NATS_DEFAULT_SYNC, NatsEngine, NatsEngineOptions};
use finmesh_testkit::{ManagedServer, NatsServer};

/// A NATS engine on its own server.
struct NatsHarness {
    engine: NatsEngine,
    /// Declared after `engine`: the connection closes before the server dies.
    server: NatsServer,
}

async fn connect(server: &NatsServer) -> NatsEngine {
    NatsEngine::connect(NatsEngineOptions::new(server.url())).await.expect("connect the NATS engine")
}

#[async_trait]
impl Harness for NatsHarness {
    async fn start() -> Self {
        let server = NatsServer::start().await.expect("start nats-server");
        NatsHarness { engine: connect(&server).await, server }
    }

    fn engine(&self) -> Arc<dyn Engine> {
        Arc::new(self.engine.clone())
    }

    async fn restart(&mut self) {
        self.server.restart().await.expect("restart nats-server");
        self.engine = connect(&self.server).await;
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

finmesh_core::engine_conformance_tests!(NatsHarness);
