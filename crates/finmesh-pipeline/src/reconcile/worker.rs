//! The reconciler: one loop over five durable consumers (`raw`, `enriched`,
//! `validated`, `exceptions` and the file events), applying each message to
//! its file's tally, writing the tallies, acking, then settling runs.
//!
//! One round, in this order (the order is what makes it exact):
//! 1. fetch a batch from every consumer (concurrently, each waiting up to
//!    `fetch_wait`);
//! 2. apply every message to its file's tally in memory (a file seen for
//!    the first time is loaded from the bucket first) and keep its ack
//!    token: a record message sets the bits of every row its
//!    `Finmesh-Rows` header lists (or of its one `Finmesh-Row`, the
//!    single-row format, which exceptions keep), read from the headers
//!    alone, without decoding the payload;
//! 3. unless the round flushes, stop here: a round flushes when it fetched
//!    nothing, when the oldest kept token is `flush_every` old, or when
//!    `max_unwritten` tokens are kept (while messages stream in, a tally is
//!    written a few times a second instead of once per batch: a shard of
//!    it grows to 2^19 rows, and writing it per batch would cost time
//!    quadratic in its rows);
//! 4. write every changed tally by compare-and-set (merging on conflict):
//!    only the keys whose shard of rows changed, parts before the head
//!    ([`store::save_tally`]), so a flush costs what changed, not the
//!    file's size;
//! 5. ack every kept message (batch ack);
//! 6. advance the watermark (only while an open run's deadline has
//!    passed, since it only decides deadlines): a consumer with nothing
//!    delivered-but-unacked has seen every message stored up to the last
//!    one it got (or up to the round's start when it got none and none is
//!    pending);
//! 7. settle the runs touched since the last flush, changed, or whose
//!    deadline the watermark passed: summarize, publish the state changes,
//!    write the run document.
//!
//! A crash anywhere loses nothing: before 4 the messages are redelivered
//! after `ack_wait`; during 4 (some keys of a tally written, not all) or
//! between 4 and 5 they are redelivered and set again only the bits that
//! did not reach storage (see [`store`] for why a half-written tally is
//! still a correct one); run documents are recomputed from the tallies at
//! start.
//!
//! The clock: deadlines are compared with stored message times (the
//! engine's clock) and with the reconciler's clock for the watermark, so
//! the two must agree (same host, or NTP) within the precision wanted.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::Arc;
use std::time::{Duration, Instant};

use finmesh_core::{
    AckKind, AckToken, ConsumerConfig, Delivery, Engine, ErrorKind, FetchRequest, Message, OutgoingMessage, Result,
    Revision, StreamConfig, Timestamp,
};
use serde::Deserialize;
use tokio_util::sync::CancellationToken;

use super::names::{FileRef, Names, Source};
use super::run::{Phase, RunStatus};
use super::store::{self, HeldTally};
use super::tally::{Counted, Failed, FileTally, Ingested};
use super::time_fmt;
use crate::rowset::RowSet;

/// Header carrying the row number of an exception or of a single-row
/// record message (contract).
pub const ROW_HEADER: &str = "Finmesh-Row";
/// Header listing the rows of a record message (contract,
/// [`crate::rowset`]).
pub const ROWS_HEADER: &str = crate::rowset::HDR_ROWS;

/// How a [`Reconciler`] runs.
#[derive(Debug, Clone)]
pub struct ReconcilerConfig {
    /// The pipeline (default `risk`).
    pub pipeline: String,
    /// Most messages fetched per consumer per round. Default 1,000.
    pub batch: usize,
    /// How long a fetch waits when nothing is ready. Default 200 ms.
    pub fetch_wait: Duration,
    /// The consumers' `ack_wait`: how soon a crashed reconciler's unacked
    /// messages are redelivered. Default 30 s.
    pub ack_wait: Duration,
    /// How often run documents are re-listed (runs opened elsewhere).
    /// Default 1 s.
    pub refresh: Duration,
    /// Longest time an applied message waits for its tally's write and its
    /// ack while messages keep coming (at most a tenth of `ack_wait`).
    /// Default 250 ms.
    pub flush_every: Duration,
    /// Most applied messages, over all five consumers, waiting for their
    /// tally's write and ack (also each consumer's `max_ack_pending`, with
    /// `batch` as the floor). Default 10,000.
    pub max_unwritten: usize,
    /// Fault injection for tests: after this many rounds that wrote
    /// tallies, return an error after the write and before the ack.
    #[doc(hidden)]
    pub fail_before_ack_after: Option<u32>,
}

impl ReconcilerConfig {
    /// Defaults for `pipeline`.
    pub fn new(pipeline: impl Into<String>) -> Self {
        ReconcilerConfig {
            pipeline: pipeline.into(),
            batch: 1000,
            fetch_wait: Duration::from_millis(200),
            ack_wait: Duration::from_secs(30),
            refresh: Duration::from_secs(1),
            flush_every: Duration::from_millis(250),
            max_unwritten: 10_000,
            fail_before_ack_after: None,
        }
    }
}

/// The reconciler of one pipeline (see the module doc).
pub struct Reconciler {
    engine: Arc<dyn Engine>,
    names: Names,
    config: ReconcilerConfig,
    /// The tally of every file seen, with each key's revision and the
    /// keys changed since the last flush.
    tallies: HashMap<FileRef, HeldTally>,
    files_of: HashMap<String, BTreeSet<FileRef>>,
    runs: BTreeMap<String, (RunStatus, Revision)>,
    dirty_runs: BTreeSet<String>,
    caught_up: [Timestamp; 5],
    last_refresh: Option<Instant>,
    rounds_written: u32,
    busy: bool,
    /// Tokens of applied messages not acked yet, per source.
    unacked: [Vec<AckToken>; 5],
    /// When the oldest of `unacked` was applied.
    unwritten_since: Option<Instant>,
    /// Runs whose files changed since the last flush.
    touched: BTreeSet<String>,
}

/// The fetch wait of a round that follows a round that got messages.
const BUSY_FETCH_WAIT: Duration = Duration::from_millis(5);

#[derive(Deserialize)]
struct FileEvent {
    #[serde(rename = "type")]
    kind: String,
    rows: Option<u64>,
    records: Option<u64>,
    exceptions: Option<u64>,
    at: Option<String>,
    reason: Option<String>,
}

#[derive(Deserialize)]
struct ExceptionBody {
    stage: String,
}

enum Effect {
    Rows(Counted, RowSet),
    Ingested(Ingested),
    Failed(Failed),
}

impl Reconciler {
    /// Run the reconciler of `config.pipeline` until `shutdown` is
    /// cancelled: create its streams, bucket and consumers when missing,
    /// then loop (see the module doc). Returns the first engine error.
    pub async fn run(engine: Arc<dyn Engine>, config: ReconcilerConfig, shutdown: CancellationToken) -> Result<()> {
        let mut r = Reconciler::start(engine, config).await?;
        loop {
            tokio::select! {
                biased;
                _ = shutdown.cancelled() => return Ok(()),
                res = r.round() => res?,
            }
        }
    }

    async fn start(engine: Arc<dyn Engine>, config: ReconcilerConfig) -> Result<Reconciler> {
        let names = Names::new(&config.pipeline)?;
        if config.batch == 0 || config.batch > finmesh_core::engine::MAX_READ_LIMIT {
            return Err(finmesh_core::Error::invalid(format!(
                "reconciler batch must be 1-{}, got {}",
                finmesh_core::engine::MAX_READ_LIMIT,
                config.batch
            )));
        }
        ensure_streams(&*engine, &names).await?;
        store::ensure_bucket(&*engine, &names).await?;
        for source in Source::ALL {
            let mut c = ConsumerConfig::new(names.consumer(source));
            c.filter = Some(names.consumer_filter(source));
            c.ack_wait = config.ack_wait;
            c.max_ack_pending = config.max_unwritten.max(config.batch).min(u32::MAX as usize) as u32;
            match engine.create_consumer(&names.stream(source), c.clone()).await {
                Err(e) if e.kind() == ErrorKind::AlreadyExists => {
                    engine.update_consumer(&names.stream(source), c).await?;
                }
                other => {
                    other?;
                }
            }
        }
        Ok(Reconciler {
            engine,
            names,
            config,
            tallies: HashMap::new(),
            files_of: HashMap::new(),
            runs: BTreeMap::new(),
            dirty_runs: BTreeSet::new(),
            caught_up: [Timestamp(0); 5],
            last_refresh: None,
            rounds_written: 0,
            busy: false,
            unacked: Default::default(),
            unwritten_since: None,
            touched: BTreeSet::new(),
        })
    }

    /// The time up to which every stored message has been applied.
    fn watermark(&self) -> Timestamp {
        self.caught_up.iter().copied().min().unwrap_or_default()
    }

    async fn round(&mut self) -> Result<()> {
        if self.last_refresh.is_none_or(|t| t.elapsed() >= self.config.refresh) {
            self.refresh().await?;
            self.last_refresh = Some(Instant::now());
        }
        let started = Timestamp::now();
        // While messages flow, a consumer with nothing ready must not hold
        // the round up for the whole wait.
        let wait = if self.busy { BUSY_FETCH_WAIT.min(self.config.fetch_wait) } else { self.config.fetch_wait };
        let request = FetchRequest { max: self.config.batch, wait };
        let fetches = Source::ALL.map(|s| {
            let (engine, stream, consumer) = (self.engine.clone(), self.names.stream(s), self.names.consumer(s));
            async move { engine.fetch(&stream, &consumer, request).await }
        });
        let fetched: Vec<Vec<Delivery>> =
            futures::future::join_all(fetches).await.into_iter().collect::<Result<_>>()?;

        self.busy = fetched.iter().any(|d| !d.is_empty());
        for (i, (source, deliveries)) in Source::ALL.into_iter().zip(&fetched).enumerate() {
            for d in deliveries {
                if let Some(file) = self.apply(source, &d.message).await? {
                    self.touched.insert(file.run);
                }
                self.unacked[i].push(d.token.clone());
            }
        }
        let kept: usize = self.unacked.iter().map(Vec::len).sum();
        if kept > 0 && self.unwritten_since.is_none() {
            self.unwritten_since = Some(Instant::now());
        }
        let flush_every = self.config.flush_every.min(self.config.ack_wait / 10);
        let flush = !self.busy
            || kept >= self.config.max_unwritten
            || self.unwritten_since.is_some_and(|t| t.elapsed() >= flush_every);
        if !flush {
            return Ok(());
        }

        let mut wrote = false;
        for (file, held) in self.tallies.iter_mut().filter(|(_, h)| h.is_dirty()) {
            store::save_tally(&*self.engine, &self.names, file, held).await?;
            wrote = true;
        }
        if wrote {
            self.rounds_written += 1;
            if self.config.fail_before_ack_after.is_some_and(|n| self.rounds_written >= n) {
                return Err(finmesh_core::Error::unavailable(
                    "injected fault: stopped after the write, before the ack",
                ));
            }
        }

        for (source, tokens) in Source::ALL.into_iter().zip(&mut self.unacked) {
            if tokens.is_empty() {
                continue;
            }
            self.engine
                .ack_many(&self.names.stream(source), &self.names.consumer(source), tokens, AckKind::Ack)
                .await?;
            tokens.clear();
        }
        self.unwritten_since = None;

        // The watermark only decides deadlines: ask the consumers where
        // they stand only while an open run's deadline has passed.
        let deadline_passed = self.runs.values().any(|(s, _)| s.state == Phase::Open && s.spec.deadline < started);
        for (i, (source, deliveries)) in Source::ALL.into_iter().zip(&fetched).enumerate() {
            if !deadline_passed {
                break;
            }
            let info = self.engine.consumer_info(&self.names.stream(source), &self.names.consumer(source)).await?;
            if info.num_ack_pending != 0 {
                continue;
            }
            let seen = match deliveries.iter().map(|d| d.message.time).max() {
                Some(t) => t,
                None if info.num_pending == 0 => started,
                None => continue,
            };
            self.caught_up[i] = self.caught_up[i].max(seen);
        }

        let watermark = self.watermark();
        let due: Vec<String> = self
            .runs
            .iter()
            .filter(|(_, (s, _))| s.state == Phase::Open && s.spec.deadline < watermark)
            .map(|(r, _)| r.clone())
            .collect();
        let mut settle: BTreeSet<String> = std::mem::take(&mut self.dirty_runs);
        settle.extend(std::mem::take(&mut self.touched));
        settle.extend(due);
        for run in settle {
            self.settle(&run, watermark).await?;
        }
        Ok(())
    }

    /// Load run documents that are new or changed since last seen.
    async fn refresh(&mut self) -> Result<()> {
        for run in store::list_runs(&*self.engine, &self.names).await? {
            if self.runs.get(&run).is_some_and(|(s, _)| s.state.is_terminal()) {
                continue;
            }
            let Some((status, revision)) = store::load_run(&*self.engine, &self.names, &run).await? else {
                continue;
            };
            if self.runs.get(&run).is_some_and(|(_, r)| *r == revision) {
                continue;
            }
            if !self.runs.contains_key(&run) {
                for file in store::run_files(&*self.engine, &self.names, &run).await? {
                    self.slot(&file).await?;
                }
            }
            self.runs.insert(run.clone(), (status, revision));
            self.dirty_runs.insert(run);
        }
        Ok(())
    }

    /// The tally of `file`, loaded from the bucket the first time.
    async fn slot(&mut self, file: &FileRef) -> Result<&mut HeldTally> {
        if !self.tallies.contains_key(file) {
            let held = store::load_tally(&*self.engine, &self.names, file).await?;
            self.files_of.entry(file.run.clone()).or_default().insert(file.clone());
            self.tallies.insert(file.clone(), held);
        }
        Ok(self.tallies.get_mut(file).expect("inserted above"))
    }

    /// Apply one message; the file it counts for, if it is well formed.
    async fn apply(&mut self, source: Source, msg: &Message) -> Result<Option<FileRef>> {
        let Some(file) = self.names.parse_subject(source, msg.subject.as_str()) else {
            tracing::warn!(
                subject = msg.subject.as_str(),
                seq = msg.seq.0,
                "reconciler: subject not of the contract's shape; skipped"
            );
            return Ok(None);
        };
        let Some(effect) = effect(source, msg) else {
            tracing::warn!(
                subject = msg.subject.as_str(),
                seq = msg.seq.0,
                "reconciler: message without a usable row or body; skipped"
            );
            return Ok(None);
        };
        let held = self.slot(&file).await?;
        match effect {
            Effect::Rows(which, rows) => held.insert_rows(which, &rows, msg.time),
            Effect::Ingested(i) => held.end_ingest(i, msg.time),
            Effect::Failed(f) => held.fail_ingest(f, msg.time),
        };
        held.note(source.as_str(), msg.seq.0);
        Ok(Some(file))
    }

    /// Recompute `run`'s status; publish its changes; write it.
    async fn settle(&mut self, run: &str, watermark: Timestamp) -> Result<()> {
        let Some((status, revision)) = self.runs.get(run) else { return Ok(()) };
        let files: Vec<(&FileRef, &FileTally)> = self
            .files_of
            .get(run)
            .into_iter()
            .flatten()
            .filter_map(|f| self.tallies.get(f).map(|h| (f, h.tally())))
            .collect();
        let (next, changes) = status.summarize(&self.names, &files, watermark, Timestamp::now());
        if next == *status && changes.is_empty() {
            return Ok(());
        }
        let revision = *revision;
        if !changes.is_empty() {
            let stream = self.names.stream(Source::Events);
            let msgs = changes
                .into_iter()
                .map(|c| OutgoingMessage::new(c.subject, c.payload).with_msg_id(c.msg_id))
                .collect::<Result<Vec<_>>>()?;
            self.engine.publish_batch(&stream, msgs).await?;
        }
        match store::save_run(&*self.engine, &self.names, &next, revision).await {
            Ok(r) => {
                self.runs.insert(run.to_owned(), (next, r));
            }
            Err(e) if e.kind() == ErrorKind::WrongRevision => {
                // Changed elsewhere: take the stored one and settle again next round.
                if let Some(stored) = store::load_run(&*self.engine, &self.names, run).await? {
                    self.runs.insert(run.to_owned(), stored);
                }
                self.dirty_runs.insert(run.to_owned());
            }
            Err(e) => return Err(e),
        }
        Ok(())
    }
}

/// What a message does to its file's tally (`None`: not usable).
fn effect(source: Source, msg: &Message) -> Option<Effect> {
    let rows = || -> Option<RowSet> {
        if let Some(text) = msg.headers.get(ROWS_HEADER) {
            return RowSet::parse(text).ok();
        }
        let text = match msg.headers.get(ROW_HEADER) {
            Some(r) => r,
            None => msg.headers.get(finmesh_core::message::MSG_ID_HEADER)?.rsplit_once(':')?.1,
        };
        RowSet::single(text.trim().parse::<u32>().ok()?).ok()
    };
    match source {
        Source::Raw => Some(Effect::Rows(Counted::Raw, rows()?)),
        Source::Enriched => Some(Effect::Rows(Counted::Enriched, rows()?)),
        Source::Validated => Some(Effect::Rows(Counted::Validated, rows()?)),
        Source::Exceptions => {
            let body: ExceptionBody = serde_json::from_slice(&msg.payload).ok()?;
            Some(Effect::Rows(Counted::exception(&body.stage)?, rows()?))
        }
        Source::Events => {
            let ev: FileEvent = serde_json::from_slice(&msg.payload).ok()?;
            match ev.kind.as_str() {
                "file_ingested" => {
                    let (rows, records) = (ev.rows?, ev.records?);
                    let at = ev.at.as_deref().and_then(|a| time_fmt::parse(a).ok()).unwrap_or(msg.time);
                    let exceptions = ev.exceptions.unwrap_or(rows.saturating_sub(records));
                    Some(Effect::Ingested(Ingested { rows, records, exceptions, at }))
                }
                "file_failed" => Some(Effect::Failed(Failed {
                    reason: ev.reason.unwrap_or_else(|| "no reason given".to_owned()),
                    at: msg.time,
                })),
                _ => None,
            }
        }
    }
}

/// Create the pipeline's five streams when missing; make sure the events
/// stream also captures `{P}.state.>`.
pub async fn ensure_streams(engine: &dyn Engine, names: &Names) -> Result<()> {
    for source in Source::ALL {
        let name = names.stream(source);
        match engine.stream_info(&name).await {
            Ok(info) => {
                let missing: Vec<_> = names
                    .stream_subjects(source)
                    .into_iter()
                    .filter(|p| !info.config.subjects.iter().any(|s| s.covers(p)))
                    .collect();
                if !missing.is_empty() {
                    let mut config = info.config;
                    config.subjects.extend(missing);
                    engine.update_stream(config).await?;
                }
            }
            Err(e) if e.kind() == ErrorKind::NotFound => {
                match engine.create_stream(StreamConfig::new(name, names.stream_subjects(source))).await {
                    Err(e) if e.kind() != ErrorKind::AlreadyExists => return Err(e),
                    _ => {}
                }
            }
            Err(e) => return Err(e),
        }
    }
    Ok(())
}
