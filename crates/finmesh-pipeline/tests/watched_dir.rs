//! The watched directory on both engines: each complete file is ingested
//! once into `raw`, across a watcher killed mid-file and restarted, and
//! with two watchers on one directory; files still being written wait,
//! bad files and a file id dropped twice go to `failed/` with a reason.

use std::collections::{HashMap, HashSet};
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use finmesh_core::testsuite::support::eventually;
use finmesh_core::{BucketName, Engine, Key, ReadRequest, Seq, StreamName};
use finmesh_embedded::EmbeddedEngine;
use finmesh_pipeline::IngestSchema;
use finmesh_pipeline::feedgen::{self, GenOptions, GenSummary};
use finmesh_pipeline::flow::{self, Pipeline, StreamKind, StreamLimits};
use finmesh_pipeline::watch::{Claim, ClaimState, Outcome, WATCH_BUCKET, WatchOptions, WatchSpec, Watcher};

/// How long a waited-for condition may take.
const UNTIL: Duration = Duration::from_secs(90);

const EXAMPLES: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../../examples/pipeline");

struct Fixture {
    engine: Arc<dyn Engine>,
    _keep: Box<dyn std::any::Any + Send>,
}

async fn embedded() -> Fixture {
    let dir = tempfile::tempdir().unwrap();
    let engine = Arc::new(EmbeddedEngine::open(dir.path()).expect("open the embedded engine"));
    Fixture { engine, _keep: Box::new(dir) }
}

async fn nats() -> Fixture {
    let server = finmesh_testkit::NatsServer::start().await.expect("start nats-server");
    let options = finmesh_nats::NatsEngineOptions::new(server.url());
    let engine = finmesh_nats::NatsEngine::connect(options).await.expect("connect the NATS engine");
    Fixture { engine: Arc::new(engine), _keep: Box::new(server) }
}

macro_rules! on_every_engine {
    ($($name:ident),* $(,)?) => {$(
        mod $name {
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn embedded() {
                super::$name(super::embedded().await).await
            }
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn nats() {
                super::$name(super::nats().await).await
            }
        }
    )*};
}

on_every_engine!(
    a_dropped_file_is_ingested_once_and_moved_to_done,
    a_watcher_killed_mid_file_is_resumed_without_duplicates,
    two_watchers_take_each_file_once,
    a_file_still_being_written_is_not_taken,
    a_bad_file_goes_to_failed_with_its_reason,
    a_file_id_dropped_again_with_new_content_is_refused,
    a_file_that_cannot_be_taken_does_not_hold_up_the_others,
);

struct Setup {
    engine: Arc<dyn Engine>,
    pipeline: Pipeline,
    schema: Arc<IngestSchema>,
    dir: tempfile::TempDir,
}

async fn setup(engine: Arc<dyn Engine>) -> Setup {
    let pipeline = Pipeline::new("risk").unwrap();
    flow::ensure_streams(&*engine, &pipeline, &StreamLimits::default()).await.unwrap();
    let schema = Arc::new(IngestSchema::load(format!("{EXAMPLES}/risk.avsc")).unwrap());
    Setup { engine, pipeline, schema, dir: tempfile::tempdir().unwrap() }
}

fn options(owner: &str) -> WatchOptions {
    WatchOptions {
        poll: Duration::from_millis(20),
        settle: Duration::from_millis(100),
        lease: Duration::from_millis(1500),
        owner: owner.to_owned(),
    }
}

impl Setup {
    async fn watcher(&self, owner: &str) -> Watcher {
        self.watcher_with(options(owner), 500).await
    }

    async fn watcher_with(&self, options: WatchOptions, batch_rows: usize) -> Watcher {
        let spec = WatchSpec {
            dir: self.dir.path().to_owned(),
            run: "run1".into(),
            slice: "slice1".into(),
            refdata: None,
            ingest: finmesh_pipeline::IngestOptions { batch_rows, progress_every: 10_000, ..Default::default() },
            reader: Default::default(),
            options,
        };
        Watcher::open(self.engine.clone(), self.pipeline.clone(), self.schema.clone(), spec).await.unwrap()
    }

    /// Writes a file the way a producer should: under `.part`, then renamed.
    fn drop_file(&self, name: &str, csv: &[u8]) {
        let part = self.dir.path().join(format!("{name}.part"));
        std::fs::write(&part, csv).unwrap();
        std::fs::rename(&part, self.dir.path().join(name)).unwrap();
    }

    /// Raw records of file id `file`: their rows as `file:row`, each once
    /// (panics on a row stored twice, or a message id stored twice).
    async fn raw_ids(&self, file: &str) -> HashSet<String> {
        let (mut ids, mut messages) = (HashSet::new(), HashSet::new());
        for m in read_all(&*self.engine, self.pipeline.stream(StreamKind::Raw)).await {
            if m.headers.get(flow::HDR_FILE) != Some(file) {
                continue;
            }
            let id = m.headers.get(finmesh_core::message::MSG_ID_HEADER).unwrap().to_owned();
            assert!(messages.insert(id.clone()), "raw holds message {id} twice");
            for row in flow::message_rows(&m.headers).unwrap().iter() {
                assert!(ids.insert(format!("{file}:{row}")), "raw holds row {row} twice");
            }
        }
        ids
    }

    /// The `file_ingested` events of file id `file`.
    async fn ingested_events(&self, file: &str) -> Vec<flow::FileEvent> {
        read_all(&*self.engine, self.pipeline.events())
            .await
            .into_iter()
            .filter_map(|m| serde_json::from_slice::<flow::FileEvent>(&m.payload).ok())
            .filter(|e| e.kind == "file_ingested" && e.file == file)
            .collect()
    }

    async fn claim(&self, file: &str) -> Option<Claim> {
        let key = Key::new(format!("risk.{file}")).unwrap();
        let entry = self.engine.kv_get(&BucketName::new(WATCH_BUCKET).unwrap(), &key).await.unwrap()?;
        Some(serde_json::from_slice(&entry.value).unwrap())
    }

    fn done(&self, name: &str) -> bool {
        self.dir.path().join("done").join(name).is_file()
    }
}

async fn read_all(engine: &dyn Engine, stream: &StreamName) -> Vec<finmesh_core::Message> {
    let mut out = Vec::new();
    let mut next = Seq(1);
    loop {
        let batch = engine.read(stream, ReadRequest::from_seq(next, 5_000)).await.unwrap();
        let Some(last) = batch.last() else { return out };
        next = Seq(last.seq.0 + 1);
        out.extend(batch);
    }
}

fn feed(rows: u64) -> (Vec<u8>, GenSummary) {
    let opts = GenOptions { rows, seed: fastrand::u64(..), bad_share: 0.05, ..GenOptions::default() };
    let mut csv = Vec::new();
    let summary = feedgen::generate(&mut csv, &opts).unwrap();
    (csv, summary)
}

/// Scans until a scan reports something.
async fn scan_until_taken(w: &mut Watcher) -> Vec<Outcome> {
    let deadline = tokio::time::Instant::now() + UNTIL;
    loop {
        let outcomes = w.scan().await.unwrap();
        if !outcomes.is_empty() {
            return outcomes;
        }
        assert!(tokio::time::Instant::now() < deadline, "no file was taken within {UNTIL:?}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

fn ingested(outcome: &Outcome) -> &flow::IngestSummary {
    match outcome {
        Outcome::Ingested { summary, .. } => summary,
        other => panic!("expected an ingest, got {other:?}"),
    }
}

async fn a_dropped_file_is_ingested_once_and_moved_to_done(f: Fixture) {
    let s = setup(f.engine).await;
    let (csv, fed) = feed(700);
    s.drop_file("trades.csv", &csv);
    let mut w = s.watcher("w1").await;
    let outcomes = scan_until_taken(&mut w).await;
    assert_eq!(outcomes.len(), 1, "{outcomes:?}");
    let summary = ingested(&outcomes[0]);
    assert_eq!((summary.file.as_str(), summary.run.as_str(), summary.slice.as_str()), ("trades_csv", "run1", "slice1"));
    assert_eq!(summary.rows, 700);
    assert_eq!(summary.records, fed.rows - fed.bad);
    assert_eq!(summary.duplicates, 0);
    assert_eq!(s.raw_ids("trades_csv").await.len() as u64, summary.records);
    assert_eq!(s.ingested_events("trades_csv").await.len(), 1);
    assert!(s.done("trades.csv"));
    assert!(!s.dir.path().join("trades.csv").exists());
    assert_eq!(s.claim("trades_csv").await.unwrap().state, ClaimState::Done);

    // A second watcher, or the same one again, finds nothing to do.
    let mut other = s.watcher("w2").await;
    for _ in 0..3 {
        assert_eq!(other.scan().await.unwrap(), vec![]);
        assert_eq!(w.scan().await.unwrap(), vec![]);
    }

    // A watcher that stopped between marking the claim done and moving the
    // file: the next scan only moves it.
    std::fs::rename(s.dir.path().join("done/trades.csv"), s.dir.path().join("trades.csv")).unwrap();
    let outcomes = scan_until_taken(&mut other).await;
    assert_eq!(outcomes, vec![Outcome::Moved { name: "trades.csv".into(), to: "done" }]);
    assert_eq!(s.raw_ids("trades_csv").await.len() as u64, summary.records, "nothing ingested again");
    assert_eq!(s.ingested_events("trades_csv").await.len(), 1);
}

async fn a_watcher_killed_mid_file_is_resumed_without_duplicates(f: Fixture) {
    let s = setup(f.engine).await;
    let (csv, fed) = feed(20_000);
    s.drop_file("big.csv", &csv);
    // Small batches, so the ingest publishes many times before it ends.
    let first = s.watcher_with(options("w1"), 100).await;
    let task = tokio::spawn(first.run(std::future::pending()));
    let engine = s.engine.clone();
    let raw = s.pipeline.stream(StreamKind::Raw).clone();
    eventually("the first watcher published some rows", UNTIL, || {
        let (engine, raw) = (engine.clone(), raw.clone());
        async move { engine.stream_info(&raw).await.unwrap().state.messages > 0 }
    })
    .await;
    task.abort();
    let _ = task.await;
    let claim = s.claim("big_csv").await.expect("the file is claimed");
    let killed_mid_file = claim.state == ClaimState::Ingesting;
    let published = s.raw_ids("big_csv").await.len() as u64;
    if killed_mid_file {
        assert_eq!(claim.owner, "w1");
        assert!(published < fed.rows - fed.bad, "killed mid-file: {published} rows published");
        assert!(!s.done("big.csv"));
    }

    // Another watcher takes the claim over once its lease has passed (or,
    // if the kill came after the end, moves the file the claim says is done).
    let mut second = s.watcher_with(options("w2"), 100).await;
    if !s.done("big.csv") {
        let outcomes = scan_until_taken(&mut second).await;
        assert_eq!(outcomes.len(), 1, "{outcomes:?}");
        if killed_mid_file {
            let summary = ingested(&outcomes[0]);
            assert_eq!(summary.rows, fed.rows);
            assert!(summary.duplicates >= published.min(1), "the rows published before the kill were duplicates");
        }
    }
    assert!(s.done("big.csv"));
    assert_eq!(s.raw_ids("big_csv").await.len() as u64, fed.rows - fed.bad, "every record once");
    let events = s.ingested_events("big_csv").await;
    assert_eq!(events.len(), 1, "{events:?}");
    assert_eq!(events[0].rows, fed.rows);
    assert_eq!(s.claim("big_csv").await.unwrap().state, ClaimState::Done);
}

async fn two_watchers_take_each_file_once(f: Fixture) {
    let s = setup(f.engine).await;
    let names: Vec<String> = (0..6).map(|i| format!("f{i}.csv")).collect();
    let mut records = HashMap::new();
    for name in &names {
        let (csv, fed) = feed(300);
        s.drop_file(name, &csv);
        records.insert(flow::file_id_from_name(name), fed.rows - fed.bad);
    }
    let spawn = |mut w: Watcher, expected: usize| {
        let dir = s.dir.path().join("done");
        tokio::spawn(async move {
            let mut taken = Vec::new();
            let deadline = tokio::time::Instant::now() + UNTIL;
            while std::fs::read_dir(&dir).unwrap().count() < expected {
                taken.extend(w.scan().await.unwrap());
                assert!(tokio::time::Instant::now() < deadline, "not every file was taken");
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
            taken
        })
    };
    let a = spawn(s.watcher("a").await, names.len());
    let b = spawn(s.watcher("b").await, names.len());
    let (a, b) = (a.await.unwrap(), b.await.unwrap());
    let mut taken: Vec<String> = a.iter().chain(&b).map(|o| o.name().to_owned()).collect();
    taken.sort();
    assert_eq!(taken, names, "each file taken exactly once (a: {a:?}, b: {b:?})");
    for o in a.iter().chain(&b) {
        let summary = ingested(o);
        assert_eq!(summary.duplicates, 0, "{} was ingested twice", o.name());
        assert_eq!(s.raw_ids(&summary.file).await.len() as u64, records[&summary.file]);
        assert_eq!(s.ingested_events(&summary.file).await.len(), 1);
    }
}

async fn a_file_still_being_written_is_not_taken(f: Fixture) {
    let s = setup(f.engine).await;
    let (csv, fed) = feed(400);
    let text = String::from_utf8(csv).unwrap();
    let lines: Vec<&str> = text.split_inclusive('\n').collect();
    let path = s.dir.path().join("growing.csv");
    // A `.part` file is never taken, however long it stays.
    std::fs::write(s.dir.path().join("other.csv.part"), lines.concat()).unwrap();
    std::fs::write(&path, lines[..100].concat()).unwrap();
    let mut w = s.watcher("w1").await;
    // Every scan sees another size: never taken.
    let mut written = 100;
    while written < lines.len() {
        assert_eq!(w.scan().await.unwrap(), vec![], "taken while still written");
        let next = (written + 50).min(lines.len());
        use std::io::Write;
        let mut file = std::fs::OpenOptions::new().append(true).open(&path).unwrap();
        file.write_all(lines[written..next].concat().as_bytes()).unwrap();
        written = next;
    }
    let outcomes = scan_until_taken(&mut w).await;
    assert_eq!(outcomes.len(), 1, "{outcomes:?}");
    let summary = ingested(&outcomes[0]);
    assert_eq!(summary.rows, fed.rows, "the whole file, not the part seen first");
    assert_eq!(s.raw_ids("growing_csv").await.len() as u64, fed.rows - fed.bad);
    assert!(s.dir.path().join("other.csv.part").exists());
    assert!(s.claim("other_csv_part").await.is_none());
}

async fn a_bad_file_goes_to_failed_with_its_reason(f: Fixture) {
    let s = setup(f.engine).await;
    s.drop_file("wrong.csv", b"alpha,beta\n1,2\n");
    let mut w = s.watcher("w1").await;
    let outcomes = scan_until_taken(&mut w).await;
    let [Outcome::Failed { name, reason }] = &outcomes[..] else { panic!("{outcomes:?}") };
    assert_eq!(name, "wrong.csv");
    assert!(reason.contains("header does not fit the schema") && reason.contains("alpha"), "{reason}");
    let failed = s.dir.path().join("failed");
    assert!(failed.join("wrong.csv").is_file());
    let written = std::fs::read_to_string(failed.join("wrong.csv.reason")).unwrap();
    assert_eq!(written.trim_end(), reason);
    let claim = s.claim("wrong_csv").await.unwrap();
    assert_eq!((claim.state, claim.reason.as_deref()), (ClaimState::Failed, Some(reason.as_str())));
    assert_eq!(w.scan().await.unwrap(), vec![]);
}

async fn a_file_id_dropped_again_with_new_content_is_refused(f: Fixture) {
    let s = setup(f.engine).await;
    let (csv, fed) = feed(200);
    s.drop_file("daily.csv", &csv);
    let mut w = s.watcher("w1").await;
    ingested(&scan_until_taken(&mut w).await[0]);

    // The same name again, other rows: refused (its ids would collide).
    let (again, _) = feed(250);
    s.drop_file("daily.csv", &again);
    let outcomes = scan_until_taken(&mut w).await;
    let [Outcome::Failed { name, reason }] = &outcomes[..] else { panic!("{outcomes:?}") };
    assert_eq!(name, "daily.csv");
    assert!(reason.contains("file id `daily_csv` was already taken") && reason.contains("rename"), "{reason}");
    assert!(s.dir.path().join("failed/daily.csv.reason").is_file());
    // Another name mapping to the same file id: refused too.
    s.drop_file("daily_csv", &again);
    let outcomes = scan_until_taken(&mut w).await;
    assert!(matches!(&outcomes[..], [Outcome::Failed { .. }]), "{outcomes:?}");
    assert_eq!(s.raw_ids("daily_csv").await.len() as u64, fed.rows - fed.bad, "the first file's rows only");

    // Renamed, it is a new file.
    s.drop_file("daily-2.csv", &again);
    let outcomes = scan_until_taken(&mut w).await;
    assert_eq!(ingested(&outcomes[0]).file, "daily-2_csv");
    assert!(Path::new(&s.dir.path().join("done/daily-2.csv")).is_file());
}

async fn a_file_that_cannot_be_taken_does_not_hold_up_the_others(f: Fixture) {
    let s = setup(f.engine).await;
    let mut w = s.watcher("w1").await;
    // A claim the watcher cannot read, for the file listed first.
    let bucket = BucketName::new(WATCH_BUCKET).unwrap();
    s.engine.kv_put(&bucket, &Key::new("risk.a_csv").unwrap(), bytes::Bytes::from_static(b"not json")).await.unwrap();
    let (csv, fed) = feed(100);
    s.drop_file("a.csv", &csv);
    s.drop_file("b.csv", &csv);
    let outcomes = scan_until_taken(&mut w).await;
    assert_eq!(outcomes.len(), 1, "{outcomes:?}");
    assert_eq!(ingested(&outcomes[0]).file, "b_csv");
    assert_eq!(s.raw_ids("b_csv").await.len() as u64, fed.rows - fed.bad);
    // a.csv stays where it is, and the scan says why.
    assert!(s.dir.path().join("a.csv").is_file());
    let err = w.scan().await.unwrap_err();
    assert!(err.message().contains("not a claim"), "{err}");
}
