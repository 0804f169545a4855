//! Test helpers for reconciliation: engines, a synthetic feed published
//! straight into the stage streams with the wire contract's subjects, ids
//! and headers, a reconciler task that can be killed, and waiting for a
//! condition with a deadline.

#![allow(dead_code)]

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use finmesh_core::{Engine, OutgoingMessage, Timestamp};
use finmesh_embedded::EmbeddedEngine;
use finmesh_pipeline::reconcile::time_fmt;
use finmesh_pipeline::reconcile::{FileRef, Names, Reconciler, ReconcilerConfig, RunStatus, Source, load_run};
use finmesh_pipeline::rowset::{LineMap, RowSet, push_frame};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

/// An engine and whatever keeps it alive.
pub struct Fixture {
    pub engine: Arc<dyn Engine>,
    /// Which engine (`embedded` or `nats`).
    pub kind: &'static str,
    _keep: Box<dyn std::any::Any + Send>,
}

pub async fn embedded() -> Fixture {
    let dir = tempfile::tempdir().unwrap();
    let engine = Arc::new(EmbeddedEngine::open(dir.path()).expect("open the embedded engine"));
    Fixture { engine, kind: "embedded", _keep: Box::new(dir) }
}

pub async fn nats() -> Fixture {
    let server = finmesh_testkit::NatsServer::start().await.expect("start nats-server");
    let options = finmesh_nats::NatsEngineOptions::new(server.url());
    let engine = finmesh_nats::NatsEngine::connect(options).await.expect("connect the NATS engine");
    Fixture { engine: Arc::new(engine), kind: "nats", _keep: Box::new(server) }
}

/// Stamp each test body once per engine.
#[macro_export]
macro_rules! on_both_engines {
    ($($name:ident),* $(,)?) => {$(
        mod $name {
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn embedded() {
                super::$name(super::recon_support::embedded().await).await
            }
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn nats() {
                super::$name(super::recon_support::nats().await).await
            }
        }
    )*};
}

/// Poll `cond` until it returns `Some`, failing after `deadline`.
pub async fn until<T, F, Fut>(deadline: Duration, what: &str, mut cond: F) -> T
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Option<T>>,
{
    let end = tokio::time::Instant::now() + deadline;
    loop {
        if let Some(v) = cond().await {
            return v;
        }
        assert!(tokio::time::Instant::now() < end, "timed out after {deadline:?} waiting for {what}");
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
}

/// Publishes what the stages would, as the contract says.
pub struct Feed {
    pub engine: Arc<dyn Engine>,
    pub names: Names,
}

impl Feed {
    pub async fn new(engine: Arc<dyn Engine>) -> Feed {
        let names = Names::new("risk").unwrap();
        finmesh_pipeline::reconcile::worker::ensure_streams(&*engine, &names).await.unwrap();
        Feed { engine, names }
    }

    fn message(&self, source: Source, file: &FileRef, row: u32, payload: Vec<u8>) -> OutgoingMessage {
        let mut m = OutgoingMessage::new(self.names.file_subject(source, file), payload)
            .with_msg_id(format!("{}:{row}", file.file))
            .unwrap();
        m.headers.insert("Finmesh-Run", &file.run).unwrap();
        m.headers.insert("Finmesh-Slice", &file.slice).unwrap();
        m.headers.insert("Finmesh-File", &file.file).unwrap();
        m.headers.insert("Finmesh-Row", row.to_string()).unwrap();
        if source != Source::Exceptions {
            m.headers.insert("Finmesh-Schema", "0123456789abcdef").unwrap();
        }
        m
    }

    /// Records of `rows` on a stage stream; how many were stored (not duplicates).
    pub async fn records(&self, source: Source, file: &FileRef, rows: impl IntoIterator<Item = u32>) -> u64 {
        let msgs: Vec<_> = rows.into_iter().map(|r| self.message(source, file, r, b"avro".to_vec())).collect();
        let mut stored = 0;
        for chunk in msgs.chunks(1000) {
            let acks = self.engine.publish_batch(&self.names.stream(source), chunk.to_vec()).await.unwrap();
            stored += acks.iter().filter(|a| !a.duplicate).count() as u64;
        }
        stored
    }

    /// One record message carrying `rows` (ascending, deduplicated here) on
    /// a stage stream, as ingest and the stages publish it: id
    /// `file:{id_range}` (ingest's first-last, which a stage keeps),
    /// `Finmesh-Rows`, `Finmesh-Lines`, one framed datum per row; whether
    /// it was stored (not a duplicate).
    pub async fn batch(&self, source: Source, file: &FileRef, id_range: (u32, u32), rows: &[u32]) -> bool {
        let rows: std::collections::BTreeSet<u32> = rows.iter().copied().collect();
        let set = RowSet::from_sorted(rows.iter().copied()).unwrap();
        let mut payload = bytes::BytesMut::new();
        let mut lines = LineMap::default();
        for &r in &rows {
            push_frame(&mut payload, b"avro");
            lines.push(r, u64::from(r) + 1);
        }
        let mut m = OutgoingMessage::new(self.names.file_subject(source, file), payload.freeze())
            .with_msg_id(format!("{}:{}-{}", file.file, id_range.0, id_range.1))
            .unwrap();
        m.headers.insert("Finmesh-Run", &file.run).unwrap();
        m.headers.insert("Finmesh-Slice", &file.slice).unwrap();
        m.headers.insert("Finmesh-File", &file.file).unwrap();
        m.headers.insert("Finmesh-Rows", set.to_string()).unwrap();
        m.headers.insert("Finmesh-Lines", lines.to_string()).unwrap();
        m.headers.insert("Finmesh-Schema", "0123456789abcdef").unwrap();
        !self.engine.publish(&self.names.stream(source), m).await.unwrap().duplicate
    }

    /// Exceptions of `rows` raised at `stage`.
    pub async fn exceptions(&self, file: &FileRef, stage: &str, rows: impl IntoIterator<Item = u32>) {
        let msgs: Vec<_> = rows
            .into_iter()
            .map(|r| {
                let body = serde_json::json!({
                    "run": file.run, "slice": file.slice, "file": file.file, "row": r, "line": r + 1,
                    "stage": stage, "reason": "synthetic",
                });
                self.message(Source::Exceptions, file, r, serde_json::to_vec(&body).unwrap())
            })
            .collect();
        for chunk in msgs.chunks(1000) {
            self.engine.publish_batch(&self.names.stream(Source::Exceptions), chunk.to_vec()).await.unwrap();
        }
    }

    /// The end of a file's ingest.
    pub async fn ingested(&self, file: &FileRef, rows: u64, records: u64, at: Timestamp) {
        let body = serde_json::json!({
            "type": "file_ingested", "run": file.run, "slice": file.slice, "file": file.file,
            "rows": rows, "records": records, "exceptions": rows - records, "at": time_fmt::format(at),
        });
        let m = OutgoingMessage::new(self.names.file_subject(Source::Events, file), serde_json::to_vec(&body).unwrap())
            .with_msg_id(format!("{}:ingested", file.file))
            .unwrap();
        self.engine.publish(&self.names.stream(Source::Events), m).await.unwrap();
    }

    /// A file's ingest failed.
    pub async fn failed(&self, file: &FileRef, reason: &str) {
        let body = serde_json::json!({
            "type": "file_failed", "run": file.run, "slice": file.slice, "file": file.file, "reason": reason,
        });
        let m = OutgoingMessage::new(self.names.file_subject(Source::Events, file), serde_json::to_vec(&body).unwrap())
            .with_msg_id(format!("{}:failed", file.file))
            .unwrap();
        self.engine.publish(&self.names.stream(Source::Events), m).await.unwrap();
    }

    /// A whole file through every stage: `rows` rows, of which
    /// `ingest_bad`, `enrich_bad` and `validate_bad` (row numbers) end as
    /// exceptions at that stage; ingested now.
    pub async fn flow(&self, file: &FileRef, rows: u32, ingest_bad: &[u32], enrich_bad: &[u32], validate_bad: &[u32]) {
        let raw: Vec<u32> = (1..=rows).filter(|r| !ingest_bad.contains(r)).collect();
        self.exceptions(file, "ingest", ingest_bad.iter().copied()).await;
        self.records(Source::Raw, file, raw.iter().copied()).await;
        self.ingested(file, u64::from(rows), raw.len() as u64, Timestamp::now()).await;
        let enriched: Vec<u32> = raw.iter().copied().filter(|r| !enrich_bad.contains(r)).collect();
        self.exceptions(file, "enrich", enrich_bad.iter().copied()).await;
        self.records(Source::Enriched, file, enriched.iter().copied()).await;
        let valid: Vec<u32> = enriched.iter().copied().filter(|r| !validate_bad.contains(r)).collect();
        self.exceptions(file, "validate", validate_bad.iter().copied()).await;
        self.records(Source::Validated, file, valid).await;
    }

    /// The stored status of `run`.
    pub async fn status(&self, run: &str) -> Option<RunStatus> {
        load_run(&*self.engine, &self.names, run).await.unwrap().map(|(s, _)| s)
    }
}

/// A reconciler task.
pub struct Running {
    pub task: JoinHandle<finmesh_core::Result<()>>,
    pub shutdown: CancellationToken,
}

pub fn config() -> ReconcilerConfig {
    let mut c = ReconcilerConfig::new("risk");
    c.fetch_wait = Duration::from_millis(50);
    c.refresh = Duration::from_millis(100);
    c.ack_wait = Duration::from_millis(500);
    c
}

pub fn spawn(engine: &Arc<dyn Engine>, config: ReconcilerConfig) -> Running {
    let shutdown = CancellationToken::new();
    let task = tokio::spawn(Reconciler::run(engine.clone(), config, shutdown.clone()));
    Running { task, shutdown }
}

impl Running {
    /// Kill it: the task is aborted wherever it is, like a crash.
    pub async fn kill(self) {
        self.task.abort();
        let _ = self.task.await;
    }

    /// Stop it gracefully; it must not have failed.
    pub async fn stop(self) {
        self.shutdown.cancel();
        self.task.await.unwrap().unwrap();
    }
}

pub fn file(run: &str, slice: &str, file: &str) -> FileRef {
    FileRef::new(run, slice, file).unwrap()
}
