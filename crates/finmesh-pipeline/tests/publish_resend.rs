//! An ingest rides out a NATS server that stops answering for a while: the
//! publishes whose acks time out are resent with the same message ids
//! (`flow::publish_resending`), and every row is stored exactly once.
//!
//! The outage is real: the test stops the nats-server process (SIGSTOP)
//! until a publish has timed out and been resent, then lets it go on.

use std::collections::BTreeSet;
use std::process::Command;
use std::sync::Arc;
use std::time::Duration;

use finmesh_core::testsuite::support::eventually;
use finmesh_core::{Engine, ReadRequest, Seq};
use finmesh_pipeline::IngestSchema;
use finmesh_pipeline::feedgen::{self, GenOptions};
use finmesh_pipeline::flow::{self, FileRef, IngestSpec, Pipeline, StreamKind, StreamLimits};
use finmesh_pipeline::rowset::{HDR_ROWS, RowSet};
use finmesh_testkit::ManagedServer as _;

const EXAMPLES: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../../examples/pipeline");

/// The engine's request timeout here: short, so the outage outlasts it.
const REQUEST_TIMEOUT: Duration = Duration::from_millis(400);
/// Longest wait for the first resend (it comes after one request timeout).
const UNTIL: Duration = Duration::from_secs(30);

fn signal(pid: u32, sig: &str) {
    let status = Command::new("kill").args([sig, &pid.to_string()]).status().expect("run kill");
    assert!(status.success(), "kill {sig} {pid}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_ingest_rides_out_a_server_that_stops_answering() {
    let server = finmesh_testkit::NatsServer::start().await.expect("start nats-server");
    let mut options = finmesh_nats::NatsEngineOptions::new(server.url());
    options.request_timeout = REQUEST_TIMEOUT;
    let engine: Arc<dyn Engine> =
        Arc::new(finmesh_nats::NatsEngine::connect(options).await.expect("connect the NATS engine"));
    let pipeline = Pipeline::new("risk").unwrap();
    flow::ensure_streams(&*engine, &pipeline, &StreamLimits::default()).await.unwrap();
    let schema = Arc::new(IngestSchema::load(format!("{EXAMPLES}/risk.avsc")).unwrap());
    let opts = GenOptions { rows: 3_000, seed: fastrand::u64(..), bad_share: 0.05, ..GenOptions::default() };
    let mut csv = Vec::new();
    let generated = feedgen::generate(&mut csv, &opts).unwrap();
    let spec = IngestSpec {
        file: FileRef::new("run1", "slice1", "feed").unwrap(),
        refdata: None,
        options: finmesh_pipeline::IngestOptions { batch_rows: 100, progress_every: 1000, ..Default::default() },
        reader: Default::default(),
    };

    // The server stops before the first publish: the ingest's first acks
    // cannot come, whatever the scheduling.
    let pid = server.pid().expect("nats-server runs");
    let before = flow::publish_resends();
    signal(pid, "-STOP");
    let ingest = tokio::spawn({
        let (engine, pipeline) = (engine.clone(), pipeline.clone());
        async move { flow::ingest_file(engine, &pipeline, schema, spec, std::io::Cursor::new(csv), |_| {}).await }
    });
    // The server answers again once a publish has timed out and was resent
    // (the tries left, four, outlast the wait for the server to go on).
    eventually("a publish is resent", UNTIL, || async { flow::publish_resends() > before }).await;
    signal(pid, "-CONT");
    let summary = ingest.await.unwrap().expect("the ingest rides out the outage");

    assert_eq!(summary.status, "completed", "seed {}: {summary:?}", opts.seed);
    assert_eq!(summary.rows, opts.rows);
    assert_eq!(summary.exceptions, generated.bad, "seed {}", opts.seed);
    // Every record row is on `raw` exactly once, however many resends.
    let raw = engine.read(pipeline.stream(StreamKind::Raw), ReadRequest::from_seq(Seq(1), 10_000)).await.unwrap();
    let mut rows = BTreeSet::new();
    let mut stored = 0;
    for m in &raw {
        let set = RowSet::parse(m.headers.get(HDR_ROWS).expect("a record message names its rows")).unwrap();
        stored += set.len();
        rows.extend(set.iter());
    }
    assert_eq!(stored, summary.records, "seed {}: a row stored twice", opts.seed);
    assert_eq!(rows.len() as u64, summary.records, "seed {}", opts.seed);
    let exceptions =
        engine.read(pipeline.stream(StreamKind::Exceptions), ReadRequest::from_seq(Seq(1), 10_000)).await.unwrap();
    assert_eq!(exceptions.len() as u64, summary.exceptions, "seed {}: an exception stored twice", opts.seed);
}
