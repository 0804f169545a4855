//! End to end on both engines: a generated feed with known good, bad and
//! rule-failing rows is ingested into `raw`, flows through enrich and
//! validate (durable consumers), and every row ends in exactly one of
//! `validated` or `exceptions`, each exception naming the right stage and
//! rule or column. Stage workers are killed (their task aborted, at whatever
//! point of a step it was) and restarted mid-file: still exact. A stage
//! whose input is replayed after the dedup window (its consumer reset)
//! stores its outputs again, and the reconciler's counts do not move. The
//! tests that read reference data also run with it in Redis (feature
//! `redis`).

use std::collections::{BTreeMap, HashSet};
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use finmesh_core::testsuite::support::eventually;
use finmesh_core::{Engine, ReadRequest, Seq, StreamName};
use finmesh_embedded::EmbeddedEngine;
use finmesh_pipeline::IngestSchema;
use finmesh_pipeline::feedgen::{self, GenOptions, GenSummary, RuleFailShares};
use finmesh_pipeline::flow::{
    self, ExceptionStage, FileRef, HDR_REFDATA_USED, IngestSpec, Pipeline, StreamKind, StreamLimits,
};
use finmesh_pipeline::refdata::{EngineRefStore, RefCache, RefStore, csv_rows};
use finmesh_pipeline::stages::{EnrichLookup, OnMiss, Stage, StageKind, StageOptions, StageSetup};
use finmesh_rules::{Datasets, KeyType, RuleSet};

/// How long a waited-for condition may take.
const UNTIL: Duration = Duration::from_secs(60);

const EXAMPLES: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../../examples/pipeline");

struct Fixture {
    engine: Arc<dyn Engine>,
    /// Reference data in this Redis server (`None`: in the engine).
    redis: Option<String>,
    _keep: Box<dyn std::any::Any + Send>,
}

async fn embedded() -> Fixture {
    let dir = tempfile::tempdir().unwrap();
    let engine = Arc::new(EmbeddedEngine::open(dir.path()).expect("open the embedded engine"));
    Fixture { engine, redis: None, _keep: Box::new(dir) }
}

/// The embedded engine, reference data in a real redis-server.
#[cfg(feature = "redis")]
async fn embedded_with_redis() -> Fixture {
    let server = finmesh_testkit::RedisServer::start().await.expect("start redis-server");
    let mut f = embedded().await;
    f.redis = Some(server.url());
    f._keep = Box::new((f._keep, server));
    f
}

async fn nats() -> Fixture {
    let server = finmesh_testkit::NatsServer::start().await.expect("start nats-server");
    let options = finmesh_nats::NatsEngineOptions::new(server.url());
    let engine = finmesh_nats::NatsEngine::connect(options).await.expect("connect the NATS engine");
    Fixture { engine: Arc::new(engine), redis: None, _keep: Box::new(server) }
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

/// As `on_every_engine`, and once more with reference data in Redis.
macro_rules! on_every_engine_and_refstore {
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
            #[cfg(feature = "redis")]
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn embedded_with_redis_refdata() {
                super::$name(super::embedded_with_redis().await).await
            }
        }
    )*};
}

on_every_engine!(
    killed_stage_workers_resume_exactly,
    rules_applied_in_the_engine_change_later_runs_only,
    three_validate_workers_share_one_consumer_and_one_dies,
    a_stage_replayed_after_the_dedup_window_changes_no_count,
    a_redelivered_message_yields_the_same_output_ids,
    single_row_messages_of_before_still_flow,
    a_record_that_is_not_a_datum_of_the_schema_is_an_exception,
);

on_every_engine_and_refstore!(
    every_row_ends_validated_or_excepted_with_the_right_reason,
    a_run_waits_for_its_pinned_reference_version,
);

/// Reference data version of the tests.
const VERSION: &str = "2026-12-01T00:00:00Z";

struct Setup {
    engine: Arc<dyn Engine>,
    pipeline: Pipeline,
    schema: Arc<IngestSchema>,
    rules: Arc<RuleSet>,
    datasets: Datasets,
    refs: Arc<RefCache>,
}

async fn setup(f: &Fixture, load_refdata: bool) -> Setup {
    let engine = f.engine.clone();
    let pipeline = Pipeline::new("risk").unwrap();
    flow::ensure_streams(&*engine, &pipeline, &StreamLimits::default()).await.unwrap();
    let schema = Arc::new(IngestSchema::load(format!("{EXAMPLES}/risk.avsc")).unwrap());
    let datasets = Datasets::new().with("currencies", KeyType::String).with("books", KeyType::String);
    let src = std::fs::read_to_string(format!("{EXAMPLES}/rules.txt")).unwrap();
    let rules = Arc::new(RuleSet::compile(&src, schema.avro(), &datasets).unwrap());
    let store: Arc<dyn RefStore> = match &f.redis {
        #[cfg(feature = "redis")]
        Some(url) => Arc::new(finmesh_pipeline::refdata::RedisRefStore::connect(url).await.unwrap()),
        #[cfg(not(feature = "redis"))]
        Some(_) => unreachable!("a Redis fixture needs feature `redis`"),
        None => Arc::new(EngineRefStore::open(engine.clone()).await.unwrap()),
    };
    if load_refdata {
        load_examples(&*store).await;
    }
    let refs = Arc::new(RefCache::with_poll_interval(store, Duration::from_millis(20)));
    Setup { engine, pipeline, schema, rules, datasets, refs }
}

async fn load_examples(store: &dyn RefStore) {
    let version = flow::parse_rfc3339(VERSION).unwrap();
    for dataset in ["currencies", "books"] {
        let file = std::fs::File::open(format!("{EXAMPLES}/{dataset}.csv")).unwrap();
        let mut rows = csv_rows(file, None).unwrap();
        store.load_version(dataset, version, &mut rows).await.unwrap();
    }
}

impl Setup {
    async fn stage(&self, kind: StageKind) -> Stage {
        self.stage_fetching(kind, 200).await
    }

    /// A stage worker fetching `batch` messages at a time.
    async fn stage_fetching(&self, kind: StageKind, batch: usize) -> Stage {
        let setup = StageSetup {
            pipeline: self.pipeline.clone(),
            schema: self.schema.clone(),
            lookups: vec![EnrichLookup { dataset: "books".into(), field: "book".into(), on_miss: OnMiss::Exception }],
            rules: self.rules.clone(),
            datasets: self.datasets.clone(),
            refs: self.refs.clone(),
            options: StageOptions {
                batch,
                fetch_wait: Duration::from_millis(200),
                ack_wait: Duration::from_secs(2),
                pin_wait: Duration::from_millis(300),
            },
        };
        Stage::start(self.engine.clone(), kind, setup).await.unwrap()
    }

    async fn ingest(&self, csv: Vec<u8>, file: &str) -> flow::IngestSummary {
        self.ingest_run(csv, "run1", file).await
    }

    async fn ingest_run(&self, csv: Vec<u8>, run: &str, file: &str) -> flow::IngestSummary {
        self.ingest_rows_per_message(csv, run, file, 300).await
    }

    async fn ingest_rows_per_message(&self, csv: Vec<u8>, run: &str, file: &str, rows: usize) -> flow::IngestSummary {
        let spec = IngestSpec {
            file: FileRef::new(run, "slice1", file).unwrap(),
            refdata: Some(flow::parse_rfc3339(VERSION).unwrap()),
            options: finmesh_pipeline::IngestOptions { batch_rows: rows, progress_every: 1000, ..Default::default() },
            reader: Default::default(),
        };
        flow::ingest_file(
            self.engine.clone(),
            &self.pipeline,
            self.schema.clone(),
            spec,
            std::io::Cursor::new(csv),
            |_| {},
        )
        .await
        .unwrap()
    }

    /// Every message of a stream (id, payload, headers).
    async fn all(&self, kind: StreamKind) -> Vec<finmesh_core::Message> {
        read_all(&*self.engine, self.pipeline.stream(kind)).await
    }

    /// The messages of one file.
    async fn of_file(&self, kind: StreamKind, file: &str) -> Vec<finmesh_core::Message> {
        self.all(kind).await.into_iter().filter(|m| m.headers.get(flow::HDR_FILE) == Some(file)).collect()
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

fn msg_id(m: &finmesh_core::Message) -> String {
    m.headers.get(finmesh_core::message::MSG_ID_HEADER).expect("every pipeline message has an id").to_owned()
}

/// The rows a message carries, as `file:row`: a record message's rows
/// (read through its framing, which must hold one datum per row), or an
/// exception's one row.
fn row_ids(m: &finmesh_core::Message) -> Vec<String> {
    if m.subject.as_str().starts_with("risk.exceptions.") {
        return vec![msg_id(m)];
    }
    let records = flow::read_records(&m.headers, &m.payload).expect("a well-formed record message");
    records.rows.iter().map(|r| format!("{}:{r}", records.file.file)).collect()
}

/// Rows in `messages`.
fn rows_in(messages: &[finmesh_core::Message]) -> u64 {
    messages.iter().map(|m| row_ids(m).len() as u64).sum()
}

fn feed(rows: u64) -> (Vec<u8>, GenSummary) {
    let opts = GenOptions {
        rows,
        seed: fastrand::u64(..),
        bad_share: 0.05,
        rule_fail: RuleFailShares {
            notional_not_positive: 0.03,
            unknown_currency: 0.03,
            maturity_out_of_range: 0.03,
            counterparty_null_or_desk_not_rates_fx: 0.03,
        },
        ..GenOptions::default()
    };
    let mut csv = Vec::new();
    let summary = feedgen::generate(&mut csv, &opts).unwrap();
    (csv, summary)
}

/// Waits (polling the streams, with a deadline) until every row of the
/// file is in validated or exceptions.
async fn until_drained(s: &Setup, file: &str, rows: u64) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(120);
    loop {
        let done: HashSet<String> = s
            .of_file(StreamKind::Validated, file)
            .await
            .iter()
            .chain(s.of_file(StreamKind::Exceptions, file).await.iter())
            .flat_map(row_ids)
            .collect();
        if done.len() as u64 >= rows {
            return;
        }
        assert!(tokio::time::Instant::now() < deadline, "only {} of {rows} rows arrived", done.len());
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// The exact outcome: validated and exceptions are disjoint, without
/// duplicates, cover rows 1..=rows, and exceptions name the right reason.
async fn assert_exact(s: &Setup, summary: &GenSummary, file: &str) {
    assert_outcome(s, summary, file, &["notional_positive", "ccy_known", "maturity", "cpty"]).await
}

/// As [`assert_exact`], with only the rules in `active` in force (rows
/// breaking another rule are validated).
async fn assert_outcome(s: &Setup, summary: &GenSummary, file: &str, active: &[&str]) {
    let validated = s.of_file(StreamKind::Validated, file).await;
    let exceptions = s.of_file(StreamKind::Exceptions, file).await;
    let messages: Vec<String> = validated.iter().map(msg_id).collect();
    assert_eq!(messages.iter().collect::<HashSet<_>>().len(), messages.len(), "no duplicate message in validated");
    let decoder = apache_avro::reader::datum::GenericDatumReader::builder(s.schema.avro()).build().unwrap();
    let mut gaps = 0;
    for m in &validated {
        // Ingest's id `file:first-last` is kept: the rows that passed are
        // within the range ingest put in the message.
        let r = flow::read_records(&m.headers, &m.payload).unwrap();
        let id = msg_id(m);
        let (first, last) = id.rsplit_once(':').unwrap().1.split_once('-').expect("a batch id");
        let (first, last): (u32, u32) = (first.parse().unwrap(), last.parse().unwrap());
        assert!(first <= r.rows.first() && r.rows.last() <= last, "{} holds rows {}", msg_id(m), r.rows);
        gaps += r.rows.ranges().len() - 1;
        for (_, line, datum) in r.records() {
            assert!(line > 0, "every row has its line");
            decoder.read_value(&mut &datum[..]).expect("each frame is a datum of the schema");
        }
    }
    let v_ids: Vec<String> = validated.iter().flat_map(row_ids).collect();
    let v_set: HashSet<&String> = v_ids.iter().collect();
    assert_eq!(v_set.len(), v_ids.len(), "no duplicate record in validated");
    let e_ids: Vec<String> = exceptions.iter().map(msg_id).collect();
    let e_set: HashSet<&String> = e_ids.iter().collect();
    assert_eq!(e_set.len(), e_ids.len(), "no duplicate id in exceptions");
    assert!(v_set.is_disjoint(&e_set), "a row is in exactly one of validated or exceptions");
    let want: HashSet<String> = (1..=summary.rows).map(|r| format!("{file}:{r}")).collect();
    let got: HashSet<String> = v_ids.iter().chain(e_ids.iter()).cloned().collect();
    assert_eq!(got, want, "validated + exceptions = rows");
    assert!(gaps > 0, "some validated message has a gap where rows went to exceptions");
    let want: BTreeMap<String, u64> = [
        ("notional_positive", summary.notional_not_positive),
        ("ccy_known", summary.unknown_currency),
        ("maturity", summary.maturity_out_of_range),
        ("cpty", summary.counterparty_null_or_desk_not_rates_fx),
    ]
    .into_iter()
    .filter(|(k, n)| *n > 0 && active.contains(k))
    .map(|(k, n)| (k.to_string(), n))
    .collect();
    assert_eq!(v_ids.len() as u64, summary.rows - summary.bad - want.values().sum::<u64>());
    for m in &validated {
        assert!(m.headers.get(HDR_REFDATA_USED).is_some_and(|u| u.contains("books@")), "{:?}", m.headers);
        assert!(m.subject.as_str().starts_with("risk.validated.run"), "{}", m.subject.as_str());
    }

    let mut ingest = 0;
    let mut by_rule: BTreeMap<String, u64> = BTreeMap::new();
    for m in &exceptions {
        let body = flow::parse_exception(&m.payload).unwrap();
        assert_eq!(msg_id(m), format!("{}:{}", body.file, body.row));
        assert_eq!(body.slice, "slice1");
        match body.stage {
            ExceptionStage::Ingest => {
                ingest += 1;
                assert!(body.column.is_some() || body.reason.contains("field"), "{body:?}");
            }
            ExceptionStage::Enrich => panic!("no generated row misses a book: {body:?}"),
            ExceptionStage::Validate => {
                let rules = body.rules.clone().expect("a validate exception names its rules");
                assert_eq!(rules.len(), 1, "a generated row breaks one rule: {body:?}");
                assert!(body.reason.contains(&rules[0]));
                *by_rule.entry(rules[0].clone()).or_default() += 1;
            }
        }
    }
    assert_eq!(ingest, summary.bad);
    assert_eq!(by_rule, want);
}

fn spawn(stage: Stage) -> (tokio::task::JoinHandle<()>, Arc<finmesh_pipeline::stages::StageStatus>) {
    let status = stage.status();
    let task = tokio::spawn(async move {
        stage.run(std::future::pending()).await.unwrap();
    });
    (task, status)
}

async fn every_row_ends_validated_or_excepted_with_the_right_reason(f: Fixture) {
    let s = setup(&f, true).await;
    let (csv, summary) = feed(3_000);
    let (enrich, _) = spawn(s.stage(StageKind::Enrich).await);
    let (validate, _) = spawn(s.stage(StageKind::Validate).await);
    let report = s.ingest(csv.clone(), "f1").await;
    assert_eq!(report.status, "completed", "{report}");
    assert_eq!((report.rows, report.exceptions), (summary.rows, summary.bad));
    until_drained(&s, "f1", summary.rows).await;
    assert_exact(&s, &summary, "f1").await;

    // The file_ingested event carries the expected count.
    let events = read_all(&*s.engine, s.pipeline.events()).await;
    assert_eq!(events.len(), 1);
    let event: flow::FileEvent = serde_json::from_slice(&events[0].payload).unwrap();
    assert_eq!((event.kind.as_str(), event.rows, event.exceptions), ("file_ingested", summary.rows, summary.bad));
    assert_eq!(msg_id(&events[0]), "f1:ingested");

    // A re-upload of the same file id stores nothing new and says so.
    let again = s.ingest(csv, "f1").await;
    assert_eq!(again.status, "already_ingested", "{again}");
    assert_eq!(again.duplicates, summary.rows);
    assert_eq!(rows_in(&s.all(StreamKind::Raw).await), summary.rows - summary.bad);
    assert_eq!(read_all(&*s.engine, s.pipeline.events()).await.len(), 1);
    enrich.abort();
    validate.abort();
}

async fn killed_stage_workers_resume_exactly(f: Fixture) {
    let s = setup(&f, true).await;
    let (csv, summary) = feed(6_000);
    let report = s.ingest(csv, "f2").await;
    assert_eq!(report.rows, summary.rows);
    let records = summary.rows - summary.bad;
    // Kill each stage's worker a few times at a random point of its work
    // (mid-fetch, mid-publish, between publish and ack), then start another.
    for kind in [StageKind::Enrich, StageKind::Validate] {
        for _ in 0..3 {
            let (task, status) = spawn(s.stage(kind).await);
            let target = fastrand::u64(1..records / 4);
            let (engine, input) = (s.engine.clone(), s.pipeline.stream(kind.input()).clone());
            let consumer = finmesh_core::ConsumerName::new(format!("risk-{}", kind.as_str())).unwrap();
            eventually("some progress, or no input left", UNTIL, || {
                let (status, engine, input, consumer) =
                    (status.clone(), engine.clone(), input.clone(), consumer.clone());
                async move {
                    let info = engine.consumer_info(&input, &consumer).await.unwrap();
                    status.processed.load(Ordering::Relaxed) >= target
                        || (info.num_pending == 0 && info.num_ack_pending == 0)
                }
            })
            .await;
            tokio::time::sleep(Duration::from_millis(fastrand::u64(0..20))).await;
            task.abort();
            let _ = task.await;
        }
    }
    let (enrich, _) = spawn(s.stage(StageKind::Enrich).await);
    let (validate, _) = spawn(s.stage(StageKind::Validate).await);
    until_drained(&s, "f2", summary.rows).await;
    assert_exact(&s, &summary, "f2").await;
    enrich.abort();
    validate.abort();
}

async fn a_run_waits_for_its_pinned_reference_version(f: Fixture) {
    let s = setup(&f, false).await;
    let (csv, summary) = feed(500);
    let (enrich, status) = spawn(s.stage(StageKind::Enrich).await);
    let (validate, _) = spawn(s.stage(StageKind::Validate).await);
    s.ingest(csv, "f3").await;
    eventually("the run to wait for its version", UNTIL, || {
        let status = status.clone();
        async move { status.waiting().iter().any(|w| w.dataset == "books") }
    })
    .await;
    assert!(s.all(StreamKind::Enriched).await.is_empty(), "nothing is enriched with a missing version");
    load_examples(&**s.refs.store()).await;
    until_drained(&s, "f3", summary.rows).await;
    assert_exact(&s, &summary, "f3").await;
    assert!(status.waiting().is_empty());
    enrich.abort();
    validate.abort();
}

async fn rules_applied_in_the_engine_change_later_runs_only(f: Fixture) {
    use finmesh_pipeline::definition;
    let s = setup(&f, true).await;
    let all = std::fs::read_to_string(format!("{EXAMPLES}/rules.txt")).unwrap();
    let avsc = std::fs::read_to_string(format!("{EXAMPLES}/risk.avsc")).unwrap();
    definition::store_schema(&*s.engine, &s.pipeline, &avsc).await.unwrap();
    definition::store_rules(&*s.engine, &s.pipeline, &all, &s.datasets).await.unwrap();
    let (enrich, _) = spawn(s.stage(StageKind::Enrich).await);
    let (validate, _) = spawn(s.stage(StageKind::Validate).await);

    let (csv1, sum1) = feed(1_000);
    s.ingest_run(csv1.clone(), "run1", "a1").await;
    until_drained(&s, "a1", sum1.rows).await;
    assert_exact(&s, &sum1, "a1").await;

    // A rules file that does not type-check is refused and changes nothing.
    let err = definition::store_rules(&*s.engine, &s.pipeline, "rule r: notionl > 0", &s.datasets).await.unwrap_err();
    assert!(err.to_string().contains("unknown field `notionl`"), "{err}");

    // Without notional_positive: run2's rows that break only it are valid;
    // run1, seen before the change, keeps its rules (its second file too).
    let relaxed: String =
        all.lines().filter(|l| !l.starts_with("rule notional_positive")).collect::<Vec<_>>().join("\n");
    definition::store_rules(&*s.engine, &s.pipeline, &relaxed, &s.datasets).await.unwrap();
    let (csv2, sum2) = feed(1_000);
    s.ingest_run(csv2.clone(), "run2", "b1").await;
    s.ingest_run(csv2, "run1", "a2").await;
    until_drained(&s, "b1", sum2.rows).await;
    until_drained(&s, "a2", sum2.rows).await;
    assert_outcome(&s, &sum2, "b1", &["ccy_known", "maturity", "cpty"]).await;
    assert_exact(&s, &sum2, "a2").await;
    enrich.abort();
    validate.abort();
}

async fn three_validate_workers_share_one_consumer_and_one_dies(f: Fixture) {
    let s = setup(&f, true).await;
    let (csv, summary) = feed(4_000);
    let (enrich, _) = spawn(s.stage(StageKind::Enrich).await);
    let mut validators = Vec::new();
    // Small messages, fetched two at a time: the work spreads over the three.
    for _ in 0..3 {
        validators.push(spawn(s.stage_fetching(StageKind::Validate, 2).await));
    }
    s.ingest_rows_per_message(csv, "run1", "f4", 40).await;
    // Kill one worker once it has done some of the work.
    let (victim, status) = validators.remove(fastrand::usize(0..3));
    eventually("the victim to work", UNTIL, || {
        let status = status.clone();
        async move { status.processed.load(Ordering::Relaxed) > 0 }
    })
    .await;
    victim.abort();
    let _ = victim.await;
    until_drained(&s, "f4", summary.rows).await;
    assert_exact(&s, &summary, "f4").await;
    let survivors: u64 = validators.iter().map(|(_, st)| st.processed.load(Ordering::Relaxed)).sum();
    assert!(survivors > 0, "the survivors took over the consumer");
    enrich.abort();
    for (t, _) in validators {
        t.abort();
    }
}

async fn a_stage_replayed_after_the_dedup_window_changes_no_count(f: Fixture) {
    use finmesh_pipeline::reconcile::{self, Names, Phase, Reconciler, ReconcilerConfig, RunRequest, Source};
    // The streams, with a short dedup window, before anything else makes them.
    let window = Duration::from_millis(200);
    let limits = StreamLimits { duplicate_window: window, ..StreamLimits::default() };
    flow::ensure_streams(&*f.engine, &Pipeline::new("risk").unwrap(), &limits).await.unwrap();
    let s = setup(&f, true).await;
    let names = Names::new("risk").unwrap();
    let mut config = ReconcilerConfig::new("risk");
    config.fetch_wait = Duration::from_millis(50);
    config.refresh = Duration::from_millis(100);
    let stop = tokio_util::sync::CancellationToken::new();
    let reconciler = tokio::spawn(Reconciler::run(s.engine.clone(), config, stop.clone()));
    let spec: RunRequest =
        serde_json::from_value(serde_json::json!({"slices": {"slice1": {"files": ["f5"]}}, "window_s": 3600})).unwrap();
    let spec = spec.into_spec(finmesh_core::Timestamp::now()).unwrap();
    reconcile::open_run(&*s.engine, &names, "run1", spec).await.unwrap();

    let (csv, summary) = feed(1_500);
    let (enrich, _) = spawn(s.stage(StageKind::Enrich).await);
    let (validate, _) = spawn(s.stage(StageKind::Validate).await);
    s.ingest(csv, "f5").await;
    until_drained(&s, "f5", summary.rows).await;
    let status = |engine: Arc<dyn Engine>, names: Names| async move {
        reconcile::load_run(&*engine, &names, "run1").await.unwrap().map(|(st, _)| st)
    };
    eventually("the run to complete", UNTIL, || {
        let (engine, names) = (s.engine.clone(), names.clone());
        async move { status(engine, names).await.is_some_and(|st| st.state == Phase::Complete) }
    })
    .await;
    let before = status(s.engine.clone(), names.clone()).await.unwrap();
    validate.abort();
    let _ = validate.await;

    // Wait out the dedup window: a probe published after everything else,
    // on a stream with the same window, is a duplicate until it has passed.
    let probe = StreamName::new("probe").unwrap();
    let mut c =
        finmesh_core::StreamConfig::new(probe.clone(), vec![finmesh_core::SubjectPattern::new("probe").unwrap()]);
    c.duplicate_window = window;
    s.engine.create_stream(c).await.unwrap();
    let probe_msg = || {
        finmesh_core::OutgoingMessage::new(finmesh_core::Subject::new("probe").unwrap(), bytes::Bytes::new())
            .with_msg_id("p")
            .unwrap()
    };
    s.engine.publish(&probe, probe_msg()).await.unwrap();
    eventually("the dedup window to pass", UNTIL, || {
        let (engine, probe, msg) = (s.engine.clone(), probe.clone(), probe_msg());
        async move { !engine.publish(&probe, msg).await.unwrap().duplicate }
    })
    .await;

    // Replay validate's whole input: its consumer reset, a new worker.
    let enriched = s.pipeline.stream(StreamKind::Enriched).clone();
    let consumer = finmesh_core::ConsumerName::new("risk-validate").unwrap();
    s.engine.delete_consumer(&enriched, &consumer).await.unwrap();
    let (validate, _) = spawn(s.stage(StageKind::Validate).await);
    let passed = summary.rows - summary.bad - summary.rule_fails;
    eventually("the replay to be stored again", UNTIL, || {
        let s = &s;
        async move { rows_in(&s.of_file(StreamKind::Validated, "f5").await) == 2 * passed }
    })
    .await;
    let validated = s.of_file(StreamKind::Validated, "f5").await;
    assert!(validated.len() as u64 * 100 < 2 * passed, "the replay is of batch messages: {} of them", validated.len());
    // Every stream the reconciler reads is consumed to its end.
    eventually("the reconciler to consume the replay", UNTIL, || {
        let (engine, names) = (s.engine.clone(), names.clone());
        async move {
            for source in [Source::Raw, Source::Enriched, Source::Validated, Source::Exceptions] {
                let stream = names.stream(source);
                let last = engine.stream_info(&stream).await.unwrap().state.last_seq;
                let info = engine.consumer_info(&stream, &names.consumer(source)).await.unwrap();
                if info.ack_floor < last || info.num_ack_pending != 0 {
                    return false;
                }
            }
            true
        }
    })
    .await;
    stop.cancel();
    reconciler.await.unwrap().unwrap();
    let after = status(s.engine.clone(), names.clone()).await.unwrap();
    assert_eq!(after.slices, before.slices, "counts unchanged by the replay");
    assert_eq!(after.state, Phase::Complete);
    let file = &after.slices["slice1"].files["f5"];
    assert_eq!((file.validated.expected, file.validated.actual), (Some(summary.rows), summary.rows));
    assert_eq!(file.valid_records, passed);
    enrich.abort();
    validate.abort();
}

/// Each stage maps one input message to at most one output message with
/// the input's id: the whole input redelivered within the dedup window (the
/// consumer reset, a new worker) publishes only duplicates, and the
/// streams are unchanged.
async fn a_redelivered_message_yields_the_same_output_ids(f: Fixture) {
    let s = setup(&f, true).await;
    let (csv, summary) = feed(2_000);
    let (enrich, _) = spawn(s.stage(StageKind::Enrich).await);
    let (validate, _) = spawn(s.stage(StageKind::Validate).await);
    s.ingest(csv, "f6").await;
    until_drained(&s, "f6", summary.rows).await;
    validate.abort();
    let _ = validate.await;
    let ids = |messages: Vec<finmesh_core::Message>| messages.iter().map(msg_id).collect::<Vec<_>>();
    let validated = ids(s.of_file(StreamKind::Validated, "f6").await);
    let exceptions = ids(s.of_file(StreamKind::Exceptions, "f6").await);
    let enriched = s.of_file(StreamKind::Enriched, "f6").await;
    assert!(validated.len() < enriched.len() * 2, "messages carry many rows: {} messages", validated.len());
    assert!(rows_in(&enriched) > enriched.len() as u64 * 10, "messages carry many rows");

    let input = s.pipeline.stream(StreamKind::Enriched).clone();
    let consumer = finmesh_core::ConsumerName::new("risk-validate").unwrap();
    s.engine.delete_consumer(&input, &consumer).await.unwrap();
    let (validate, status) = spawn(s.stage(StageKind::Validate).await);
    let total = rows_in(&enriched);
    eventually("the redelivered input to be processed", UNTIL, || {
        let status = status.clone();
        async move { status.processed.load(Ordering::Acquire) == total }
    })
    .await;
    assert_eq!(status.duplicates.load(Ordering::Relaxed), total, "every output of the redelivery was a duplicate");
    assert_eq!(ids(s.of_file(StreamKind::Validated, "f6").await), validated, "validated is unchanged");
    assert_eq!(ids(s.of_file(StreamKind::Exceptions, "f6").await), exceptions, "exceptions are unchanged");
    assert_exact(&s, &summary, "f6").await;
    enrich.abort();
    validate.abort();
}

/// Every row of `csv` read as file `file`.
fn read_rows(s: &Setup, csv: &[u8], file: &str) -> finmesh_pipeline::Batch {
    let mut reader = finmesh_pipeline::RowReader::new(csv, s.schema.clone(), file, Default::default()).unwrap();
    let mut batch = finmesh_pipeline::Batch { records: Vec::new(), exceptions: Vec::new() };
    while reader.next_batch(1000, &mut batch).unwrap() {}
    batch
}

/// A record message of one row in the format before batching (id `F:row`,
/// `Finmesh-Row` and `Finmesh-Line`, the bare datum), pinned to [`VERSION`].
fn single_row(
    file: &FileRef,
    subject: &finmesh_core::Subject,
    row: u64,
    line: u64,
    datum: bytes::Bytes,
) -> finmesh_core::OutgoingMessage {
    let mut m = finmesh_core::OutgoingMessage::new(subject.clone(), datum);
    m.headers = file.headers(row).unwrap();
    m.headers.insert(flow::HDR_LINE, line.to_string()).unwrap();
    m.headers.insert(flow::HDR_REFDATA, VERSION).unwrap();
    m.with_msg_id(file.msg_id(row)).unwrap()
}

/// Records published one per message in the format before batching (id
/// `F:row`, `Finmesh-Row` and `Finmesh-Line`, the bare datum) still flow:
/// each stage keeps that format, and the rows end validated or excepted.
async fn single_row_messages_of_before_still_flow(f: Fixture) {
    let s = setup(&f, true).await;
    let (csv, summary) = feed(300);
    let batch = read_rows(&s, &csv, "old");
    let file = FileRef::new("run1", "slice1", "old").unwrap();
    let subject = s.pipeline.subject(StreamKind::Raw, &file).unwrap();
    let messages = batch.records.iter().map(|r| single_row(&file, &subject, r.row, r.line, r.avro.clone())).collect();
    s.engine.publish_batch(s.pipeline.stream(StreamKind::Raw), messages).await.unwrap();
    let (enrich, _) = spawn(s.stage(StageKind::Enrich).await);
    let (validate, _) = spawn(s.stage(StageKind::Validate).await);
    let records = batch.records.len() as u64;
    assert_eq!(records, summary.rows - summary.bad);
    until_drained(&s, "old", records).await;
    let validated = s.of_file(StreamKind::Validated, "old").await;
    assert_eq!(validated.len() as u64, summary.rows - summary.bad - summary.rule_fails);
    let decoder = apache_avro::reader::datum::GenericDatumReader::builder(s.schema.avro()).build().unwrap();
    for m in &validated {
        let row = m.headers.get(flow::HDR_ROW).expect("the single-row format is kept");
        assert!(m.headers.get(flow::HDR_ROWS).is_none());
        assert_eq!(msg_id(m), format!("old:{row}"));
        decoder.read_value(&mut &m.payload[..]).expect("the bare datum");
    }
    enrich.abort();
    validate.abort();
}

/// Validate checks each datum against the schema before the rules read it:
/// a truncated datum, one with a byte after its last field and bytes that
/// are no datum at all are each an exception saying so, and a good record
/// in the same batch is not affected.
async fn a_record_that_is_not_a_datum_of_the_schema_is_an_exception(f: Fixture) {
    let s = setup(&f, true).await;
    let (csv, _) = feed(20);
    let batch = read_rows(&s, &csv, "bent");
    let good = batch.records[0].avro.clone();
    let mut longer = good.to_vec();
    longer.push(0);
    let rows: [(u64, bytes::Bytes); 4] = [
        (1, good.clone()),
        (2, good.slice(..good.len() - 1)),
        (3, longer.into()),
        (4, bytes::Bytes::from_static(&[0xFF; 8])),
    ];
    let file = FileRef::new("run1", "slice1", "bent").unwrap();
    let subject = s.pipeline.subject(StreamKind::Enriched, &file).unwrap();
    let messages = rows.into_iter().map(|(row, datum)| single_row(&file, &subject, row, row + 1, datum)).collect();
    s.engine.publish_batch(s.pipeline.stream(StreamKind::Enriched), messages).await.unwrap();
    let validate = s.stage(StageKind::Validate).await;
    let mut fetched = 0;
    while fetched < 4 {
        fetched += validate.step().await.unwrap();
    }
    let reasons: BTreeMap<u64, String> = s
        .of_file(StreamKind::Exceptions, "bent")
        .await
        .iter()
        .map(|m| {
            let body: serde_json::Value = serde_json::from_slice(&m.payload).unwrap();
            (body["row"].as_u64().unwrap(), body["reason"].as_str().unwrap().to_owned())
        })
        .collect();
    for row in 2..=4 {
        assert_eq!(
            reasons.get(&row).map(String::as_str),
            Some("the record is not a datum of the pipeline's schema"),
            "row {row}: {reasons:?}"
        );
    }
    let validated = s.of_file(StreamKind::Validated, "bent").await;
    let row1_validated = validated.iter().flat_map(row_ids).any(|id| id == "bent:1");
    let row1_excepted = reasons.get(&1).is_some_and(|r| r.starts_with("failed rules: "));
    assert!(row1_validated ^ row1_excepted, "row 1 is validated or fails rules, once: {reasons:?}");
}
