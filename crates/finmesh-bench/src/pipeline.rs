//! `pipeline` and `pipeline-nats`: the risk-feed pipeline end to end, next
//! to its ceiling, the `csv` crate alone parsing the same file (issue 20).
//!
//! One run of a family:
//! 1. **Feed**: `feedgen` writes `--rows` rows (`--nats-rows` for NATS) to
//!    a file under the benchmark's directory ([`FEED`] shares: 1% bad rows,
//!    1% failing each of the four issue rules), not timed.
//! 2. **Ceiling**: `csv::Reader::read_byte_record` over that file to its
//!    end, one thread (rows/s and MB/s). The file was just written, so both
//!    this and the ingest below read it from the page cache.
//! 3. **Flow**: a fresh engine (the embedded engine with its default
//!    `sync = always`; or a 3-node NATS cluster with every stream R3), the
//!    example schema, rules and reference data of `examples/pipeline`, a
//!    run expecting the one file, then, in this process as
//!    `finmesh pipeline run` does in the node (library calls, one engine):
//!    the reconciler, one enrich and one validate worker, and
//!    `flow::ingest_file` reading the file. The clock runs from the start of
//!    the ingest until the reconciler stores the run `complete` (every row
//!    counted in `raw`, `enriched` or an enrich exception, and `validated`
//!    or an exception).
//!
//! Figures: end-to-end seconds and rows/s; each stage's own rate while it
//! runs (ingest: rows over the ingest's time; enrich and validate: rows
//! over the time from their first to their last processed batch, sampled
//! every [`SAMPLE_EVERY`]); the reconciler's lag behind validate; the
//! share of the ceiling is a ratio of the report. Record messages carry up
//! to [`INGEST_BATCH`] rows each (ingest's default), stage fetches are
//! [`STAGE_BATCH`] messages.
//!
//! Not part of a default run (10M rows write several GB): select it with
//! `--scenario pipeline` or `--scenario pipeline-nats`.

use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use anyhow::Context as _;
use finmesh_core::{Engine, StreamConfig};
use finmesh_pipeline::IngestSchema;
use finmesh_pipeline::feedgen::{self, GenOptions, RuleFailShares};
use finmesh_pipeline::flow::{self, FileRef, IngestSpec, Pipeline, StreamLimits};
use finmesh_pipeline::reconcile::{self, Names, Phase, Reconciler, ReconcilerConfig, RunRequest};
use finmesh_pipeline::refdata::{EngineRefStore, RefCache, RefStore, csv_rows};
use finmesh_pipeline::stages::{EnrichLookup, OnMiss, Stage, StageKind, StageOptions, StageSetup, StageStatus};
use finmesh_rules::{Datasets, KeyType, RuleSet};
use tokio_util::sync::CancellationToken;

use super::BenchContext;
use super::measure::Measurement;
use super::nats_engine::{Topology, clients, deploy};

/// Ids of the csv ceiling (ratios refer to them).
pub const CEILING: &str = "pipeline.csv-ceiling";
pub const CEILING_MB: &str = "pipeline.csv-ceiling.mb";

/// Messages per stage fetch (the stages' default).
pub const STAGE_BATCH: usize = 16;
/// Rows per ingest batch and record message (the ingest's default).
pub const INGEST_BATCH: usize = 1000;
/// How often the stages' progress is sampled.
pub const SAMPLE_EVERY: Duration = Duration::from_millis(20);
/// The generated feed's shares of bad and rule-failing rows.
pub const FEED: (f64, f64) = (0.01, 0.01);

const PIPELINE: &str = "risk";
const RUN: &str = "bench";
const SLICE: &str = "s1";
const FILE: &str = "feed";
const VERSION: &str = "2026-12-01T00:00:00Z";
const AVSC: &str = include_str!("../../../examples/pipeline/risk.avsc");
const RULES: &str = include_str!("../../../examples/pipeline/rules.txt");
const BOOKS: &str = include_str!("../../../examples/pipeline/books.csv");
const CURRENCIES: &str = include_str!("../../../examples/pipeline/currencies.csv");

/// Id of a flow figure: `pipeline.{engine}.{what}`.
pub fn id(engine: &str, what: &str) -> String {
    format!("pipeline.{engine}.{what}")
}

/// The embedded family: ceiling, then the flow on the embedded engine.
pub async fn run_embedded(ctx: &BenchContext) -> anyhow::Result<Vec<Measurement>> {
    let dir = ctx.tempdir("pipeline")?;
    let feed = dir.path().join("feed.csv");
    let rows = write_feed(&feed, ctx.pipeline_rows)?;
    let mut out = ceiling(&feed, rows).await?;
    let data = dir.path().join("data");
    let engine: Arc<dyn Engine> = Arc::new(finmesh_embedded::EmbeddedEngine::open(&data)?);
    let flow = run_flow(engine.clone(), &feed, rows, 1).await?;
    drop(engine);
    out.extend(flow.measurements("embedded", "finmesh-embedded", "embedded engine, sync = always"));
    Ok(out)
}

/// The NATS family: ceiling, then the flow on a 3-node cluster, R3.
pub async fn run_nats(ctx: &BenchContext) -> anyhow::Result<Vec<Measurement>> {
    let dir = ctx.tempdir("pipeline-nats")?;
    let feed = dir.path().join("feed.csv");
    let rows = write_feed(&feed, ctx.pipeline_nats_rows)?;
    let mut out = ceiling(&feed, rows).await?;
    let deployment = deploy(ctx, Topology::R3, false).await?;
    let (engine, _raw) = clients(&deployment, false).await?;
    let engine: Arc<dyn Engine> = Arc::new(engine);
    let flow = run_flow(engine.clone(), &feed, rows, Topology::R3.replicas()).await?;
    drop(engine);
    let what = format!("nats-server {}, 3-node cluster, streams R3, default sync_interval", deployment.version);
    out.extend(flow.measurements("nats-r3", "finmesh-nats", &what));
    Ok(out)
}

/// Writes the feed; returns its rows.
fn write_feed(path: &Path, rows: u64) -> anyhow::Result<u64> {
    let opts = GenOptions {
        rows,
        seed: fastrand::u64(..),
        bad_share: FEED.0,
        rule_fail: RuleFailShares {
            notional_not_positive: FEED.1,
            unknown_currency: FEED.1,
            maturity_out_of_range: FEED.1,
            counterparty_null_or_desk_not_rates_fx: FEED.1,
        },
        ..GenOptions::default()
    };
    let file = std::fs::File::create(path).with_context(|| format!("creating {}", path.display()))?;
    let summary = feedgen::generate(std::io::BufWriter::with_capacity(1 << 20, file), &opts)?;
    Ok(summary.rows)
}

/// The csv crate alone over the file: rows/s and MB/s.
async fn ceiling(feed: &Path, rows: u64) -> anyhow::Result<Vec<Measurement>> {
    let path = feed.to_path_buf();
    let (read, bytes, elapsed) = tokio::task::spawn_blocking(move || -> anyhow::Result<(u64, u64, Duration)> {
        let started = Instant::now();
        let mut reader = csv::ReaderBuilder::new().flexible(true).from_path(&path)?;
        let mut record = csv::ByteRecord::new();
        let mut read = 0u64;
        while reader.read_byte_record(&mut record)? {
            read += 1;
        }
        Ok((read, reader.position().byte(), started.elapsed()))
    })
    .await??;
    anyhow::ensure!(read == rows, "the csv crate read {read} rows of {rows}");
    let secs = elapsed.as_secs_f64();
    let note =
        format!("{rows} rows, {:.1} MB, {:.1} bytes/row, one thread", bytes as f64 / 1e6, bytes as f64 / rows as f64);
    Ok(vec![
        figure(CEILING, "csv crate", "csv::Reader::read_byte_record over the feed file", rows as f64 / secs, "rows/s")
            .note(note),
        figure(CEILING_MB, "csv crate", "the same, in MB/s", bytes as f64 / 1e6 / secs, "MB/s"),
    ])
}

fn figure(id: &str, peer: &str, what: &str, value: f64, unit: &str) -> Measurement {
    let mut m = Measurement::mib(id, peer, what, 0);
    m.value = value;
    m.unit = unit.to_owned();
    m
}

/// When a stage did its work, from the sampled counters.
#[derive(Debug, Default, Clone, Copy)]
struct Span {
    first: Option<Duration>,
    last: Option<Duration>,
    count: u64,
}

impl Span {
    fn observe(&mut self, at: Duration, count: u64) {
        if count > self.count {
            if self.first.is_none() {
                self.first = Some(at.saturating_sub(SAMPLE_EVERY));
            }
            self.last = Some(at);
            self.count = count;
        }
    }

    fn rate(&self) -> f64 {
        match (self.first, self.last) {
            (Some(a), Some(b)) if b > a => self.count as f64 / (b - a).as_secs_f64(),
            _ => 0.0,
        }
    }
}

/// What one flow took.
struct Flow {
    rows: u64,
    total: Duration,
    ingest: Duration,
    enrich: Span,
    validate: Span,
    validated: u64,
    exceptions: u64,
}

impl Flow {
    fn measurements(&self, engine: &str, peer: &str, what: &str) -> Vec<Measurement> {
        let secs = self.total.as_secs_f64();
        let rows = self.rows as f64;
        let lag = self.validate.last.map(|l| self.total.saturating_sub(l).as_secs_f64()).unwrap_or(0.0);
        let how = format!(
            "{} rows ({} validated, {} exceptions) in {secs:.2} s; stages in-process (as `finmesh pipeline run`), \
             1 enrich + 1 validate worker, batches of {STAGE_BATCH}",
            self.rows, self.validated, self.exceptions
        );
        vec![
            figure(&id(engine, "end-to-end"), peer, &format!("ingest → complete run, {what}"), rows / secs, "rows/s")
                .note(how),
            figure(&id(engine, "seconds"), peer, "ingest start → run complete", secs, "s"),
            figure(&id(engine, "ingest"), peer, "ingest: CSV → Avro → raw", rows / self.ingest.as_secs_f64(), "rows/s"),
            figure(&id(engine, "enrich"), peer, "enrich: raw → enriched, while it ran", self.enrich.rate(), "rows/s"),
            figure(
                &id(engine, "validate"),
                peer,
                "validate: enriched → validated + exceptions, while it ran",
                self.validate.rate(),
                "rows/s",
            ),
            figure(&id(engine, "reconcile-lag"), peer, "run complete after validate's last batch", lag, "s"),
        ]
    }
}

/// Sets up the pipeline on `engine` (streams with `replicas`), runs the
/// file through every stage and the reconciler until the run is complete.
async fn run_flow(engine: Arc<dyn Engine>, feed: &Path, rows: u64, replicas: u8) -> anyhow::Result<Flow> {
    let pipeline = Pipeline::new(PIPELINE)?;
    let limits = StreamLimits::default();
    for mut config in pipeline.stream_configs(&limits)? {
        config.replicas = replicas;
        create(&*engine, config).await?;
    }
    flow::ensure_streams(&*engine, &pipeline, &limits).await?;
    let names = Names::new(PIPELINE)?;
    if replicas > 1 {
        let mut bucket = finmesh_core::BucketConfig::new(names.bucket());
        bucket.replicas = replicas;
        engine.create_bucket(bucket).await?;
    }

    let schema = Arc::new(IngestSchema::parse(AVSC)?);
    let datasets = Datasets::new().with("currencies", KeyType::String).with("books", KeyType::String);
    let rules = Arc::new(
        RuleSet::compile(RULES, schema.avro(), &datasets)
            .map_err(|e| anyhow::anyhow!("the example rules do not compile: {e:?}"))?,
    );
    let store: Arc<dyn RefStore> = Arc::new(EngineRefStore::open(engine.clone()).await?);
    let version = flow::parse_rfc3339(VERSION)?;
    for (dataset, text) in [("currencies", CURRENCIES), ("books", BOOKS)] {
        let mut rows = csv_rows(std::io::Cursor::new(text.as_bytes()), None)?;
        store.load_version(dataset, version, &mut rows).await?;
    }
    let refs = Arc::new(RefCache::new(store));

    let request: RunRequest = serde_json::from_value(serde_json::json!({
        "slices": { SLICE: { "files": [FILE] } },
        "window_s": 24 * 3600,
    }))?;
    reconcile::open_run(&*engine, &names, RUN, request.into_spec(finmesh_core::Timestamp::now())?).await?;

    let shutdown = CancellationToken::new();
    let _stop = shutdown.clone().drop_guard();
    let reconciler =
        tokio::spawn(Reconciler::run(engine.clone(), ReconcilerConfig::new(PIPELINE), shutdown.child_token()));
    let mut statuses: Vec<Arc<StageStatus>> = Vec::new();
    let mut workers = Vec::new();
    for kind in StageKind::ALL {
        let setup = StageSetup {
            pipeline: pipeline.clone(),
            schema: schema.clone(),
            lookups: vec![EnrichLookup { dataset: "books".into(), field: "book".into(), on_miss: OnMiss::Exception }],
            rules: rules.clone(),
            datasets: datasets.clone(),
            refs: refs.clone(),
            options: StageOptions { batch: STAGE_BATCH, fetch_wait: Duration::from_millis(200), ..Default::default() },
        };
        let stage = Stage::start(engine.clone(), kind, setup).await?;
        statuses.push(stage.status());
        let stop = shutdown.child_token();
        workers.push(tokio::spawn(async move { stage.run(stop.cancelled_owned()).await }));
    }

    let spec = IngestSpec {
        file: FileRef::new(RUN, SLICE, FILE)?,
        refdata: Some(version),
        options: finmesh_pipeline::IngestOptions { batch_rows: INGEST_BATCH, ..Default::default() },
        reader: Default::default(),
    };
    let input = std::fs::File::open(feed).with_context(|| format!("opening {}", feed.display()))?;
    let started = Instant::now();
    let ingest = {
        let (engine, pipeline) = (engine.clone(), pipeline.clone());
        tokio::spawn(async move {
            let summary = flow::ingest_file(engine, &pipeline, schema, spec, input, |_| {}).await;
            (summary, started.elapsed())
        })
    };
    let mut ingest = Some(ingest);
    let mut ingest_took = None;
    let (mut enrich, mut validate) = (Span::default(), Span::default());
    let mut tick = tokio::time::interval(SAMPLE_EVERY);
    let mut polls = 0u64;
    let total = loop {
        tick.tick().await;
        let at = started.elapsed();
        enrich.observe(at, statuses[0].processed.load(Ordering::Relaxed));
        validate.observe(at, statuses[1].processed.load(Ordering::Relaxed));
        if let Some(handle) = ingest.take_if(|h| h.is_finished()) {
            let (summary, took) = handle.await?;
            let summary = summary?;
            anyhow::ensure!(summary.rows == rows, "ingest read {} rows of {rows}: {summary}", summary.rows);
            ingest_took = Some(took);
        }
        polls += 1;
        // The run document is read every 5th tick (100 ms): it is a KV get.
        if ingest_took.is_some() && polls.is_multiple_of(5) {
            let (status, _) = reconcile::load_run(&*engine, &names, RUN).await?.context("the run document vanished")?;
            match status.state {
                Phase::Complete => break started.elapsed(),
                Phase::Failed => anyhow::bail!("the run failed: {}", status.failures.join("; ")),
                _ => {}
            }
        }
        for w in &workers {
            anyhow::ensure!(!w.is_finished(), "a stage worker stopped early");
        }
        if reconciler.is_finished() {
            anyhow::bail!("the reconciler stopped early: {:?}", reconciler.await?);
        }
    };
    shutdown.cancel();
    for w in workers {
        w.await??;
    }
    reconciler.await??;
    let s = &statuses[1];
    Ok(Flow {
        rows,
        total,
        ingest: ingest_took.unwrap_or(total),
        enrich,
        validate,
        validated: s.passed.load(Ordering::Relaxed),
        exceptions: rows - s.passed.load(Ordering::Relaxed),
    })
}

/// Creates a stream unless it exists.
async fn create(engine: &dyn Engine, config: StreamConfig) -> anyhow::Result<()> {
    match engine.create_stream(config).await {
        Err(e) if e.kind() != finmesh_core::ErrorKind::AlreadyExists => Err(e.into()),
        _ => Ok(()),
    }
}
