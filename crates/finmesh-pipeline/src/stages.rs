//! The enrich and validate stages, as durable consumers.
//!
//! Each stage is a durable consumer named `{P}-{stage}` on its input stream
//! (enrich reads `{P}-raw`, validate reads `{P}-enriched`). One step
//! ([`Stage::step`]) fetches a batch of record messages (each carries many
//! rows, see [`crate::rowset`]), processes every record of every delivery,
//! publishes the outputs (to the next stream) and the exceptions (to
//! `{P}-exceptions`) as two concurrent batch publishes, and only after both are
//! acknowledged acks the whole input batch with one batch ack. A worker
//! ([`Stage::run`]) fetches and processes its next batch while up to
//! [`STEPS_IN_FLIGHT`] processed ones are being published and acked, so
//! its CPU work overlaps the engine's durable round trips. Invariants:
//! - one input message becomes at most one output message, with the
//!   input's message id and headers, holding the records that passed (its
//!   `Finmesh-Rows` rewritten when some did not; the input payload as it is
//!   when all did); none passed: no output. Messages are never merged or
//!   split, so a redelivered input yields the same output id, which the
//!   stream drops as a duplicate;
//! - a row that does not pass is one exception message with id `file:row`;
//!   so a row reaches exactly one of the next stream or `exceptions`;
//! - a crash anywhere in a step loses nothing (the batch was not acked, so
//!   it is redelivered) and doubles nothing within the streams' duplicate
//!   window (republished ids are acked as duplicates);
//! - several workers may share one consumer (on NATS, over several
//!   machines): each delivery goes to one of them at a time.
//!
//! Reference data (both stages): the run's pin is the [`HDR_REFDATA`] header
//! its records carry (set at ingest with `--refdata T`): every dataset the
//! stage needs is pinned to exactly version `T`
//! ([`Pin::Version`]), and a batch of a run whose version is not loaded yet
//! waits for it (listed by [`StageStatus::waiting`]) for up to
//! [`StageOptions::pin_wait`], is then nak'ed with a delay and waits again
//! on its redelivery. Records without the header use the latest version at
//! the time this worker first sees the run ([`Pin::AsOf`]), kept for the
//! worker's life: with several workers, a load during the run may split it,
//! so runs that must be exact pass `--refdata`.
//!
//! Enrich reads only the lookup fields of a record (see
//! `avro_field`); its output is the input datum unchanged plus the
//! header [`HDR_REFDATA_USED`] naming the versions used. A lookup miss is
//! an exception naming the dataset and the key ([`OnMiss::Exception`]) or
//! passes ([`OnMiss::Pass`]). Validate checks the whole datum against the
//! schema and evaluates the rule set on the fields read in place
//! (`avro_field::DatumView`); every failing rule is named in the exception. Validate's rules
//! are the run's revision in the definition bucket
//! ([`crate::definition::run_rules`]: fixed when a worker first sees the
//! run), or [`StageSetup::rules`] when no rules are stored there.
//!
//! Test hook: when [`CRASH_BEFORE_ACK_ENV`] is set (to `N`) at
//! [`Stage::start`], the process aborts right after the worker's `N`-th
//! batch was published and before that batch is acked: a crash at the
//! worst point of a step, for the crash tests that run workers as
//! processes (docs/testing.md). It is read once, at start; unset, a step
//! pays one `Option` check per batch.

use std::collections::HashMap;
use std::future::Future;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use bytes::BytesMut;
use finmesh_core::message::MSG_ID_HEADER;
use finmesh_core::{
    AckKind, AckToken, ConsumerConfig, ConsumerName, Delivery, Engine, Error, ErrorKind, FetchRequest, Headers,
    OutgoingMessage, Result, Subject, Timestamp,
};
use finmesh_rules::{Datasets, RuleSet};
use parking_lot::Mutex;
use serde::{Deserialize, Serialize};

use crate::avro_field::{DatumView, FieldKey, index_record, read_key};
use crate::flow::{
    ExceptionBody, ExceptionStage, FileRef, HDR_FILE, HDR_REFDATA, HDR_REFDATA_USED, HDR_ROWS, HDR_RUN, HDR_SLICE,
    Pipeline, RecordMessage, StreamKind, parse_rfc3339, read_records, rfc3339,
};
use crate::refdata::{Pin, RefCache, RefSnapshot, RunRefs, Waiting};
use crate::rowset::{RowSet, push_frame};
use crate::schema::IngestSchema;

/// A stage.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum StageKind {
    Enrich,
    Validate,
}

impl StageKind {
    /// Every stage, in pipeline order.
    pub const ALL: [StageKind; 2] = [StageKind::Enrich, StageKind::Validate];

    /// Its name (`enrich`, `validate`).
    pub fn as_str(self) -> &'static str {
        match self {
            StageKind::Enrich => "enrich",
            StageKind::Validate => "validate",
        }
    }

    /// The stream it reads.
    pub fn input(self) -> StreamKind {
        match self {
            StageKind::Enrich => StreamKind::Raw,
            StageKind::Validate => StreamKind::Enriched,
        }
    }

    /// The stream its records go to.
    pub fn output(self) -> StreamKind {
        match self {
            StageKind::Enrich => StreamKind::Enriched,
            StageKind::Validate => StreamKind::Validated,
        }
    }

    fn exception_stage(self) -> ExceptionStage {
        match self {
            StageKind::Enrich => ExceptionStage::Enrich,
            StageKind::Validate => ExceptionStage::Validate,
        }
    }
}

impl std::str::FromStr for StageKind {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        match s {
            "enrich" => Ok(StageKind::Enrich),
            "validate" => Ok(StageKind::Validate),
            _ => Err(Error::invalid(format!("unknown stage `{s}`; the stages are enrich and validate"))),
        }
    }
}

/// What enrich does when a key is not in the pinned version.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum OnMiss {
    /// The row becomes an enrich exception naming the dataset and the key.
    #[default]
    Exception,
    /// The row goes on unchanged.
    Pass,
}

/// One lookup of enrich: `field`'s value must be a key of `dataset`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EnrichLookup {
    pub dataset: String,
    pub field: String,
    #[serde(default)]
    pub on_miss: OnMiss,
}

/// Tuning of a stage.
#[derive(Debug, Clone)]
pub struct StageOptions {
    /// Messages per fetch (each carries up to `IngestOptions::batch_rows`
    /// rows). Default 16.
    pub batch: usize,
    /// How long a fetch waits for input. Default 1 s.
    pub fetch_wait: Duration,
    /// The consumer's ack wait: a batch not acked within it is redelivered.
    /// Default 60 s.
    pub ack_wait: Duration,
    /// How long a batch waits for its run's pinned reference version before
    /// it is nak'ed (and waits again when redelivered). Default 10 s.
    pub pin_wait: Duration,
}

impl Default for StageOptions {
    fn default() -> Self {
        StageOptions {
            batch: 16,
            fetch_wait: Duration::from_secs(1),
            ack_wait: Duration::from_secs(60),
            pin_wait: Duration::from_secs(10),
        }
    }
}

/// What a stage needs to know besides its engine.
pub struct StageSetup {
    pub pipeline: Pipeline,
    pub schema: Arc<IngestSchema>,
    /// Enrich's lookups (validate ignores them).
    pub lookups: Vec<EnrichLookup>,
    /// Validate's rules (enrich ignores them).
    pub rules: Arc<RuleSet>,
    /// The datasets `rules` was compiled against.
    pub datasets: Datasets,
    pub refs: Arc<RefCache>,
    pub options: StageOptions,
}

/// Live figures of a stage worker.
#[derive(Default)]
pub struct StageStatus {
    /// Rows processed and acked; updated after the other figures of the
    /// same step, so a reader that sees it (`Acquire`) sees them too.
    pub processed: AtomicU64,
    /// Of which went to the next stream.
    pub passed: AtomicU64,
    /// Of which went to exceptions.
    pub exceptions: AtomicU64,
    /// Rows of outputs the engine acked as duplicates (redelivered work).
    pub duplicates: AtomicU64,
    /// Deliveries not of the contract's format (headers, framing),
    /// terminated.
    pub malformed: AtomicU64,
    refs: Mutex<Option<Arc<RefCache>>>,
}

impl StageStatus {
    /// Runs waiting for a pinned reference version right now.
    pub fn waiting(&self) -> Vec<Waiting> {
        self.refs.lock().as_ref().map(|r| r.waiting()).unwrap_or_default()
    }
}

/// A run's pinned reference data, as this worker resolved it.
struct RunPins {
    /// The rules the run uses (validate only; enrich: the setup's).
    rules: Arc<RuleSet>,
    snapshots: Vec<Arc<RefSnapshot>>,
    refs: RunRefs,
    used: String,
}

/// A run and the version its records pin (none: latest when first seen).
type PinKey = (String, Option<Timestamp>);

/// One stage worker.
pub struct Stage {
    kind: StageKind,
    engine: Arc<dyn Engine>,
    setup: StageSetup,
    consumer: ConsumerName,
    datasets: Vec<String>,
    lookup_fields: Vec<usize>,
    pins: Mutex<HashMap<PinKey, Arc<RunPins>>>,
    /// Rules compiled from the definition bucket, by revision.
    compiled: Mutex<HashMap<u64, Arc<RuleSet>>>,
    status: Arc<StageStatus>,
    /// [`CRASH_BEFORE_ACK_ENV`], read at start.
    crash_before_ack: Option<u64>,
    /// Batches published so far (counted only with the test hook set).
    published: AtomicU64,
}

/// Test hook (see the module doc): `FINMESH_TEST_CRASH_BEFORE_ACK=N` aborts
/// the process after the worker's `N`-th published batch, before its ack.
pub const CRASH_BEFORE_ACK_ENV: &str = "FINMESH_TEST_CRASH_BEFORE_ACK";

/// The test hook's crash: the process ends at once (no destructor, no
/// flush beyond this line on standard error).
#[cold]
fn crash_before_ack(kind: StageKind, n: u64) -> ! {
    eprintln!("{CRASH_BEFORE_ACK_ENV}: stage {} aborts after publishing batch {n}, before its ack", kind.as_str());
    std::process::abort()
}

/// Runs kept in a worker's pin table before it is cleared.
const MAX_PINNED_RUNS: usize = 64;

/// Processed batches a worker publishes and acks while it fetches and
/// processes the next one ([`Stage::run`]).
pub const STEPS_IN_FLIGHT: usize = 2;

/// A fetched batch, processed, waiting to be published and acked.
struct Processed {
    deliveries: Vec<Delivery>,
    /// Tokens of deliveries that are not record messages (terminated).
    malformed: Vec<AckToken>,
    outputs: Vec<OutgoingMessage>,
    /// Rows in each of `outputs`.
    output_rows: Vec<u64>,
    exceptions: Vec<OutgoingMessage>,
    rows_in: u64,
    passed: u64,
}

/// How long a worker fetches nothing new after a failed step.
const RETRY_AFTER: Duration = Duration::from_secs(1);

/// Runs `prepare` and `finish` as an overlapped loop until `shutdown`:
/// whatever `prepare` yields goes to `finish`, and while up to `depth`
/// finishes run, the next `prepare` runs beside them. A `prepare` is
/// started only when there is room and is never dropped half way (only by
/// `shutdown`, which drops everything where it stands). An error of either
/// goes to `on_error`, then no `prepare` starts for `retry_after`
/// (finishes in progress go on).
async fn overlapped<T, P, PF, F, FF>(
    mut prepare: P,
    finish: F,
    depth: usize,
    retry_after: Duration,
    on_error: impl Fn(Error),
    shutdown: impl Future<Output = ()>,
) where
    P: FnMut() -> PF,
    PF: Future<Output = Result<Option<T>>>,
    F: Fn(T) -> FF,
    FF: Future<Output = Result<()>>,
{
    use futures::StreamExt as _;
    use futures::future::{Fuse, FusedFuture as _, FutureExt as _};
    tokio::pin!(shutdown);
    let mut finishing = futures::stream::FuturesUnordered::<FF>::new();
    let preparing = Fuse::terminated();
    tokio::pin!(preparing);
    let mut paused_until: Option<tokio::time::Instant> = None;
    loop {
        if preparing.is_terminated() && finishing.len() < depth.max(1) && paused_until.is_none() {
            preparing.set(prepare().fuse());
        }
        let error = tokio::select! {
            biased;
            _ = &mut shutdown => return,
            Some(r) = finishing.next(), if !finishing.is_empty() => r.err(),
            r = &mut preparing => match r {
                Ok(Some(item)) => {
                    finishing.push(finish(item));
                    None
                }
                Ok(None) => None,
                Err(e) => Some(e),
            },
            _ = tokio::time::sleep_until(paused_until.unwrap_or_else(tokio::time::Instant::now)),
                if paused_until.is_some() => {
                paused_until = None;
                None
            }
        };
        if let Some(e) = error {
            on_error(e);
            paused_until = Some(tokio::time::Instant::now() + retry_after);
        }
    }
}

impl Stage {
    /// A worker of `kind`; creates its durable consumer if missing.
    pub async fn start(engine: Arc<dyn Engine>, kind: StageKind, setup: StageSetup) -> Result<Stage> {
        let consumer = ConsumerName::new(format!("{}-{}", setup.pipeline.name(), kind.as_str()))?;
        let mut lookup_fields = Vec::new();
        let mut datasets: Vec<String> = Vec::new();
        if kind == StageKind::Enrich {
            for l in &setup.lookups {
                let i = setup.schema.fields().iter().position(|f| f.name == l.field).ok_or_else(|| {
                    Error::invalid(format!("enrich lookup on `{}`: the schema has no such field", l.field))
                })?;
                lookup_fields.push(i);
                if !datasets.contains(&l.dataset) {
                    datasets.push(l.dataset.clone());
                }
            }
        }
        let mut config = ConsumerConfig::new(consumer.clone());
        config.ack_wait = setup.options.ack_wait;
        config.max_ack_pending = (setup.options.batch as u32).saturating_mul(4).max(1000);
        let input = setup.pipeline.stream(kind.input()).clone();
        match engine.create_consumer(&input, config.clone()).await {
            Ok(_) => {}
            Err(e) if e.kind() == ErrorKind::AlreadyExists => {
                engine.update_consumer(&input, config).await?;
            }
            Err(e) => return Err(e),
        }
        let crash_before_ack = match std::env::var(CRASH_BEFORE_ACK_ENV) {
            Err(_) => None,
            Ok(v) => Some(v.parse::<u64>().ok().filter(|n| *n > 0).ok_or_else(|| {
                Error::invalid(format!("{CRASH_BEFORE_ACK_ENV}=`{v}`: expected a batch count of at least 1"))
            })?),
        };
        let status = Arc::new(StageStatus::default());
        *status.refs.lock() = Some(setup.refs.clone());
        Ok(Stage {
            kind,
            engine,
            setup,
            consumer,
            datasets,
            lookup_fields,
            pins: Mutex::new(HashMap::new()),
            compiled: Mutex::new(HashMap::new()),
            status,
            crash_before_ack,
            published: AtomicU64::new(0),
        })
    }

    /// The live figures.
    pub fn status(&self) -> Arc<StageStatus> {
        self.status.clone()
    }

    /// Runs steps until `shutdown` resolves, overlapping them: while up to
    /// [`STEPS_IN_FLIGHT`] processed batches are being published and acked,
    /// the next batch is fetched and processed. A step in progress when
    /// `shutdown` resolves is dropped where it stands: its batch is not
    /// acked, so it is redelivered, and outputs it already published are
    /// duplicates by message id (the same path as a crash mid-step). Engine
    /// errors other than a closed engine are logged and the worker fetches
    /// nothing new for a second (batches already processed still finish).
    pub async fn run(&self, shutdown: impl Future<Output = ()>) -> Result<()> {
        let on_error = |e: Error| tracing::warn!(stage = self.kind.as_str(), error = %e, "stage step failed; retrying");
        overlapped(|| self.prepare(), |batch| self.finish(batch), STEPS_IN_FLIGHT, RETRY_AFTER, on_error, shutdown)
            .await;
        Ok(())
    }

    /// One fetch–process–publish–ack cycle; returns the deliveries fetched.
    pub async fn step(&self) -> Result<usize> {
        match self.prepare().await? {
            Some(batch) => {
                let n = batch.deliveries.len();
                self.finish(batch).await?;
                Ok(n)
            }
            None => Ok(0),
        }
    }

    /// Fetches a batch and processes every record of it: `None` when
    /// nothing came (or the batch was nak'ed to wait for its pinned
    /// reference data).
    async fn prepare(&self) -> Result<Option<Processed>> {
        let input = self.setup.pipeline.stream(self.kind.input());
        let request = FetchRequest { max: self.setup.options.batch, wait: self.setup.options.fetch_wait };
        let deliveries = self.engine.fetch(input, &self.consumer, request).await?;
        if deliveries.is_empty() {
            return Ok(None);
        }
        let mut starts = Vec::with_capacity(self.setup.schema.fields().len());
        let mut failures = self.setup.rules.failure_buffer();
        let mut outputs = Vec::with_capacity(deliveries.len());
        let mut output_rows = Vec::with_capacity(deliveries.len());
        let mut exceptions = Vec::new();
        let mut malformed = Vec::new();
        let (mut rows_in, mut passed) = (0u64, 0u64);
        // The file, output subject and pins of the previous delivery: a
        // batch is mostly messages of one file, so they are resolved once.
        let mut current: Option<Current> = None;
        for d in &deliveries {
            let headers = &d.message.headers;
            let msg = match read_records(headers, &d.message.payload) {
                Ok(m) => m,
                Err(e) => {
                    tracing::warn!(stage = self.kind.as_str(), seq = d.message.seq.0, error = %e, "malformed delivery terminated");
                    malformed.push(d.token.clone());
                    continue;
                }
            };
            if !current.as_ref().is_some_and(|c| c.same_file(headers)) {
                let pins = match self.pins(&msg.file.run, d).await {
                    Ok(p) => p,
                    Err(e) if matches!(e.kind(), ErrorKind::Timeout) => {
                        let tokens: Vec<_> = deliveries.iter().map(|d| d.token.clone()).collect();
                        self.engine
                            .ack_many(
                                input,
                                &self.consumer,
                                &tokens,
                                AckKind::Nak { delay: Duration::from_millis(500) },
                            )
                            .await?;
                        return Ok(None);
                    }
                    Err(e) => return Err(e),
                };
                let subject = self.setup.pipeline.subject(self.kind.output(), &msg.file)?;
                let refdata = headers.get(HDR_REFDATA).map(str::to_owned);
                current = Some(Current { file: msg.file.clone(), subject, pins, refdata });
            }
            let c = current.as_ref().expect("resolved above");
            let mut kept = Vec::with_capacity(msg.datums.len());
            for (i, (row, line, datum)) in msg.records().enumerate() {
                match self.process(datum, &c.file, u64::from(row), line, &c.pins, &mut starts, &mut failures)? {
                    None => kept.push(i),
                    Some(exception) => exceptions.push(exception),
                }
            }
            rows_in += msg.rows.len();
            passed += kept.len() as u64;
            if !kept.is_empty() {
                output_rows.push(kept.len() as u64);
                outputs.push(self.output(d, &msg, &kept, c)?);
            }
        }
        Ok(Some(Processed { deliveries, malformed, outputs, output_rows, exceptions, rows_in, passed }))
    }

    /// Publishes a processed batch's outputs and exceptions and, once both
    /// are acknowledged, acks its input.
    async fn finish(&self, batch: Processed) -> Result<()> {
        let Processed { deliveries, malformed, outputs, output_rows, exceptions, rows_in, passed } = batch;
        let input = self.setup.pipeline.stream(self.kind.input());
        let excepted = exceptions.len() as u64;
        let mut duplicates = 0;
        // Outputs and exceptions are published concurrently (one durable
        // round trip); the input is acked only after both are acked.
        let publish = |stream: StreamKind, msgs: Vec<OutgoingMessage>| async move {
            if msgs.is_empty() {
                Ok(Vec::new())
            } else {
                crate::flow::publish_resending(&*self.engine, self.setup.pipeline.stream(stream), msgs).await
            }
        };
        let (output_acks, exception_acks) =
            tokio::try_join!(publish(self.kind.output(), outputs), publish(StreamKind::Exceptions, exceptions))?;
        duplicates += output_acks.iter().zip(&output_rows).filter(|(a, _)| a.duplicate).map(|(_, n)| n).sum::<u64>();
        duplicates += exception_acks.iter().filter(|a| a.duplicate).count() as u64;
        if let Some(n) = self.crash_before_ack
            && self.published.fetch_add(1, Ordering::Relaxed) + 1 >= n
        {
            crash_before_ack(self.kind, n);
        }
        let tokens: Vec<_> = deliveries.iter().map(|d| d.token.clone()).filter(|t| !malformed.contains(t)).collect();
        if !tokens.is_empty() {
            self.engine.ack_many(input, &self.consumer, &tokens, AckKind::Ack).await?;
        }
        tracing::debug!(
            stage = self.kind.as_str(),
            deliveries = deliveries.len(),
            rows_in,
            passed,
            excepted,
            "batch acked"
        );
        if !malformed.is_empty() {
            self.engine.ack_many(input, &self.consumer, &malformed, AckKind::Term).await?;
        }
        let s = &self.status;
        s.passed.fetch_add(passed, Ordering::Relaxed);
        s.exceptions.fetch_add(excepted, Ordering::Relaxed);
        s.duplicates.fetch_add(duplicates, Ordering::Relaxed);
        s.malformed.fetch_add(malformed.len() as u64, Ordering::Relaxed);
        s.processed.fetch_add(rows_in, Ordering::Release);
        Ok(())
    }

    /// The run's pinned snapshots (resolved once per run and pin).
    async fn pins(&self, run: &str, d: &Delivery) -> Result<Arc<RunPins>> {
        let pinned = match d.message.headers.get(HDR_REFDATA) {
            Some(t) => Some(parse_rfc3339(t)?),
            None => None,
        };
        let key = (run.to_owned(), pinned);
        if let Some(p) = self.pins.lock().get(&key) {
            return Ok(p.clone());
        }
        let deadline = tokio::time::Instant::now() + self.setup.options.pin_wait;
        let pin = match pinned {
            Some(t) => Pin::Version(t),
            None => Pin::AsOf(Timestamp::now()),
        };
        let (rules, datasets) = match self.kind {
            StageKind::Enrich => (self.setup.rules.clone(), self.datasets.clone()),
            StageKind::Validate => {
                let rules = self.rules_for(run).await?;
                let names = rules
                    .datasets_used()
                    .iter()
                    .filter_map(|id| self.setup.datasets.name(*id).map(str::to_owned))
                    .collect();
                (rules, names)
            }
        };
        let mut snapshots = Vec::new();
        for dataset in &datasets {
            snapshots.push(self.setup.refs.pin(dataset, pin, deadline).await?);
        }
        let used =
            snapshots.iter().map(|s| format!("{}@{}", s.dataset, rfc3339(s.version))).collect::<Vec<_>>().join(",");
        let refs = RunRefs::new(&self.setup.datasets, snapshots.iter().cloned());
        let pins = Arc::new(RunPins { rules, snapshots, refs, used });
        let mut table = self.pins.lock();
        if table.len() >= MAX_PINNED_RUNS {
            table.clear();
        }
        table.insert(key, pins.clone());
        Ok(pins)
    }

    /// The rules of `run`: the revision fixed for it in the definition
    /// bucket, or the setup's rules when none are stored.
    async fn rules_for(&self, run: &str) -> Result<Arc<RuleSet>> {
        let Some((text, rev)) = crate::definition::run_rules(&*self.engine, &self.setup.pipeline, run).await? else {
            return Ok(self.setup.rules.clone());
        };
        if let Some(r) = self.compiled.lock().get(&rev.0) {
            return Ok(r.clone());
        }
        let rules = Arc::new(crate::definition::compile_rules(
            &text,
            &self.setup.schema,
            &self.setup.datasets,
            &format!("rules revision {}", rev.0),
        )?);
        self.compiled.lock().insert(rev.0, rules.clone());
        Ok(rules)
    }

    /// The output of delivery `d` read as `msg`, keeping the records at
    /// the indexes `kept` (ascending, not empty): the input's message id,
    /// headers and, when every record passed, its payload as it is.
    fn output(&self, d: &Delivery, msg: &RecordMessage, kept: &[usize], c: &Current) -> Result<OutgoingMessage> {
        let mut headers = d.message.headers.clone();
        let id = match headers.get(MSG_ID_HEADER) {
            Some(id) => id.to_owned(),
            None if msg.single => c.file.msg_id(u64::from(msg.rows.first())),
            None => c.file.batch_msg_id(&msg.rows),
        };
        if self.kind == StageKind::Enrich && !c.pins.used.is_empty() {
            headers.insert(HDR_REFDATA_USED, c.pins.used.as_str())?;
        }
        let payload = if kept.len() == msg.datums.len() {
            d.message.payload.clone()
        } else {
            let rows: Vec<u32> = msg.rows.iter().collect();
            headers.insert(HDR_ROWS, RowSet::from_sorted(kept.iter().map(|&i| rows[i]))?.to_string())?;
            let mut payload = BytesMut::with_capacity(kept.iter().map(|&i| msg.datums[i].len() + 5).sum());
            for &i in kept {
                push_frame(&mut payload, &msg.datums[i]);
            }
            payload.freeze()
        };
        let out = OutgoingMessage { subject: c.subject.clone(), headers, payload };
        out.with_msg_id(id)
    }

    /// One record: `None` when it passes, or its exception message.
    #[allow(clippy::too_many_arguments)]
    fn process(
        &self,
        datum: &[u8],
        file: &FileRef,
        row: u64,
        line: u64,
        pins: &RunPins,
        starts: &mut Vec<usize>,
        failures: &mut Vec<finmesh_rules::RuleId>,
    ) -> Result<Option<OutgoingMessage>> {
        let exception = |column: Option<String>, rules: Option<Vec<String>>, reason: String| {
            let body = ExceptionBody {
                run: file.run.clone(),
                slice: file.slice.clone(),
                file: file.file.clone(),
                row,
                line,
                stage: self.kind.exception_stage(),
                column,
                rules,
                reason,
            };
            body.to_message(&self.setup.pipeline, file).map(Some)
        };
        let fields = self.setup.schema.fields();
        match self.kind {
            StageKind::Enrich => {
                for (l, &index) in self.setup.lookups.iter().zip(&self.lookup_fields) {
                    let Some(key) = read_key(fields, datum, index) else {
                        return exception(None, None, "the record is not a datum of the pipeline's schema".into());
                    };
                    let snapshot = pins.snapshots.iter().find(|s| s.dataset == l.dataset);
                    let key_text = match key {
                        FieldKey::Str(s) => s.to_owned(),
                        FieldKey::Int(i) => i.to_string(),
                        FieldKey::Null => String::new(),
                    };
                    let found = !key_text.is_empty() && snapshot.is_some_and(|s| s.contains(&key_text));
                    if !found && l.on_miss == OnMiss::Exception {
                        let version = snapshot.map(|s| rfc3339(s.version)).unwrap_or_default();
                        return exception(
                            Some(l.field.clone()),
                            None,
                            format!(
                                "lookup miss: key `{key_text}` of field `{}` is not in dataset `{}` (version {version})",
                                l.field, l.dataset
                            ),
                        );
                    }
                }
                Ok(None)
            }
            StageKind::Validate => {
                if pins.rules.field_count() != fields.len() {
                    let reason = format!(
                        "the record does not fit the rules' schema: the rules were compiled for {} fields, the \
                         record has {}",
                        pins.rules.field_count(),
                        fields.len()
                    );
                    return exception(None, None, reason);
                }
                if index_record(fields, datum, starts).is_none() {
                    return exception(None, None, "the record is not a datum of the pipeline's schema".into());
                }
                let record = DatumView { fields, datum, starts };
                if pins.rules.evaluate(&record, &pins.refs, failures) {
                    Ok(None)
                } else {
                    let names: Vec<String> = failures.iter().map(|&id| pins.rules.name(id).to_owned()).collect();
                    let reason = format!("failed rules: {}", names.join(", "));
                    exception(None, Some(names), reason)
                }
            }
        }
    }
}

/// What a step resolved for the file of its previous delivery.
struct Current {
    file: FileRef,
    subject: Subject,
    pins: Arc<RunPins>,
    /// The [`HDR_REFDATA`] header the pins were resolved for.
    refdata: Option<String>,
}

impl Current {
    /// Whether `headers` name the same run, slice, file and pinned version.
    fn same_file(&self, headers: &Headers) -> bool {
        headers.get(HDR_FILE) == Some(self.file.file.as_str())
            && headers.get(HDR_RUN) == Some(self.file.run.as_str())
            && headers.get(HDR_SLICE) == Some(self.file.slice.as_str())
            && headers.get(HDR_REFDATA) == self.refdata.as_deref()
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::AtomicUsize;

    use tokio::sync::{mpsc, watch};
    use tokio::time::Instant;

    use super::*;

    /// `overlapped` over numbered items: `prepare` reports each number it
    /// starts on `started` and yields it; `finish(i)` waits until
    /// `released` passes `i`, reports on `finished`, and fails at once for
    /// the numbers in `failing`.
    struct Harness {
        started: mpsc::UnboundedReceiver<(usize, Instant)>,
        finished: mpsc::UnboundedReceiver<(usize, Instant)>,
        released: watch::Sender<usize>,
        errors: Arc<AtomicUsize>,
        stop: Option<tokio::sync::oneshot::Sender<()>>,
        task: tokio::task::JoinHandle<()>,
    }

    fn harness(depth: usize, failing: &'static [usize]) -> Harness {
        let (started_tx, started) = mpsc::unbounded_channel();
        let (finished_tx, finished) = mpsc::unbounded_channel();
        let (released, released_rx) = watch::channel(0usize);
        let errors = Arc::new(AtomicUsize::new(0));
        let (stop, stop_rx) = tokio::sync::oneshot::channel::<()>();
        let errs = errors.clone();
        let task = tokio::spawn(async move {
            let next = AtomicUsize::new(0);
            let prepare = || {
                let i = next.fetch_add(1, Ordering::SeqCst);
                started_tx.send((i, Instant::now())).unwrap();
                async move { Ok(Some(i)) }
            };
            let finish = |i: usize| {
                let mut released = released_rx.clone();
                let finished = finished_tx.clone();
                async move {
                    if failing.contains(&i) {
                        return Err(Error::unavailable(format!("finish {i} failed")));
                    }
                    released.wait_for(|r| *r > i).await.unwrap();
                    finished.send((i, Instant::now())).unwrap();
                    Ok(())
                }
            };
            let on_error = |_| {
                errs.fetch_add(1, Ordering::SeqCst);
            };
            overlapped(prepare, finish, depth, Duration::from_secs(1), on_error, async {
                let _ = stop_rx.await;
            })
            .await;
        });
        Harness { started, finished, released, errors, stop: Some(stop), task }
    }

    impl Harness {
        /// The next `prepare` to start (within a minute of the paused clock).
        async fn next_started(&mut self) -> (usize, Instant) {
            let next = tokio::time::timeout(Duration::from_secs(60), self.started.recv()).await;
            next.expect("no prepare started").expect("the loop runs")
        }

        async fn next_finished(&mut self) -> (usize, Instant) {
            let next = tokio::time::timeout(Duration::from_secs(60), self.finished.recv()).await;
            next.expect("no finish ended").expect("the loop runs")
        }

        /// Whether no further `prepare` starts while the runtime has
        /// nothing else to do (the clock is paused, so a minute passes at
        /// once when every task waits).
        async fn nothing_more_starts(&mut self) -> bool {
            tokio::time::timeout(Duration::from_secs(60), self.started.recv()).await.is_err()
        }

        async fn stop(mut self) {
            self.stop.take().unwrap().send(()).unwrap();
            self.task.await.unwrap();
        }
    }

    #[tokio::test(start_paused = true)]
    async fn the_next_batch_is_prepared_while_earlier_ones_finish() {
        let mut h = harness(2, &[]);
        assert_eq!(h.next_started().await.0, 0);
        // Batch 0's finish waits, yet batch 1 is prepared: the overlap.
        assert_eq!(h.next_started().await.0, 1);
        // Two finishes waiting is the depth: nothing more is prepared.
        assert!(h.nothing_more_starts().await, "a third batch while two finish");
        h.released.send(1).unwrap();
        assert_eq!(h.next_started().await.0, 2, "room again once batch 0 finished");
        assert!(h.nothing_more_starts().await);
        h.released.send(usize::MAX).unwrap();
        assert_eq!(h.next_started().await.0, 3);
        h.stop().await;
    }

    #[tokio::test(start_paused = true)]
    async fn a_failed_finish_pauses_preparing_but_not_the_other_finishes() {
        let mut h = harness(3, &[1]);
        assert_eq!(h.next_started().await.0, 0);
        assert_eq!(h.next_started().await.0, 1);
        // Batch 2 starts beside them; batch 1's finish fails at once.
        let (i, failed_at) = h.next_started().await;
        assert_eq!(i, 2);
        // The finishes of batches 0 and 2 go on during the pause…
        h.released.send(usize::MAX).unwrap();
        let mut done = Vec::new();
        for _ in 0..2 {
            let (i, at) = h.next_finished().await;
            assert!(at - failed_at < Duration::from_secs(1), "finish {i} waited for the pause");
            done.push(i);
        }
        done.sort_unstable();
        assert_eq!(done, [0, 2]);
        // …but the next batch is prepared only a second after the error,
        // although there was room at once.
        let (i, at) = h.next_started().await;
        assert_eq!(i, 3);
        assert!(at - failed_at >= Duration::from_secs(1), "prepared again after {:?}", at - failed_at);
        assert_eq!(h.errors.load(Ordering::SeqCst), 1, "the error was reported once");
        h.stop().await;
    }
}
