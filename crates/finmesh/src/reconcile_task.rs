//! The `[reconcile]` section of `finmesh serve`: reconcilers that run as
//! tasks inside the node (`finmesh_pipeline::reconcile::Reconciler`), one
//! per listed pipeline, on the node's engine.
//!
//! Invariants: a reconciler that stops with an error is logged and started
//! again after [`RESTART_DELAY`] (its state is durable, so a restart loses
//! nothing); all of them stop when the node stops. Several nodes may run
//! the same pipeline's reconciler: they share its consumers and merge
//! their writes (docs/pipeline.md#reconciliation).

use std::sync::Arc;
use std::time::Duration;

use finmesh_core::Engine;
use finmesh_pipeline::reconcile::{Names, Reconciler, ReconcilerConfig};
use serde::{Deserialize, Serialize};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

/// Wait before a failed reconciler is started again.
pub const RESTART_DELAY: Duration = Duration::from_secs(1);

/// `[reconcile]`: which pipelines this node reconciles, and how.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ReconcileSection {
    /// Pipelines whose reconciler runs in this node; empty = none.
    pub pipelines: Vec<String>,
    /// Messages fetched per consumer per round.
    pub batch: usize,
    /// The reconciler consumers' `ack_wait`, in milliseconds.
    pub ack_wait_ms: u64,
}

impl Default for ReconcileSection {
    fn default() -> Self {
        let d = ReconcilerConfig::new("risk");
        ReconcileSection { pipelines: Vec::new(), batch: d.batch, ack_wait_ms: d.ack_wait.as_millis() as u64 }
    }
}

impl ReconcileSection {
    /// Every problem, as `(key, message)`.
    pub fn problems(&self) -> Vec<(String, String)> {
        let mut p = Vec::new();
        for (i, name) in self.pipelines.iter().enumerate() {
            if let Err(e) = Names::new(name) {
                p.push((format!("reconcile.pipelines[{i}]"), e.message().to_owned()));
            } else if self.pipelines[..i].contains(name) {
                p.push((format!("reconcile.pipelines[{i}]"), format!("`{name}` is listed twice")));
            }
        }
        if !(1..=finmesh_core::engine::MAX_READ_LIMIT).contains(&self.batch) {
            p.push((
                "reconcile.batch".to_owned(),
                format!("must be 1 to {}, not {}", finmesh_core::engine::MAX_READ_LIMIT, self.batch),
            ));
        }
        if self.ack_wait_ms == 0 {
            p.push(("reconcile.ack_wait_ms".to_owned(), "must be at least 1".to_owned()));
        }
        p
    }

    /// Start one reconciler task per pipeline; they stop when `stop` is cancelled.
    pub fn spawn(&self, engine: Arc<dyn Engine>, stop: CancellationToken) -> Vec<JoinHandle<()>> {
        self.pipelines
            .iter()
            .map(|pipeline| {
                let mut config = ReconcilerConfig::new(pipeline.clone());
                config.batch = self.batch;
                config.ack_wait = Duration::from_millis(self.ack_wait_ms);
                let (engine, stop) = (engine.clone(), stop.clone());
                tokio::spawn(async move {
                    tracing::info!(pipeline = config.pipeline, "reconciler started");
                    loop {
                        match Reconciler::run(engine.clone(), config.clone(), stop.clone()).await {
                            Ok(()) => return,
                            Err(e) => {
                                tracing::warn!(pipeline = config.pipeline, error = %e, "reconciler stopped; restarting")
                            }
                        }
                        tokio::select! {
                            _ = stop.cancelled() => return,
                            _ = tokio::time::sleep(RESTART_DELAY) => {}
                        }
                    }
                })
            })
            .collect()
    }
}
