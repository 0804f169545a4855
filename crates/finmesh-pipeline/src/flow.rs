//! The pipeline's wire contract on an engine, and ingest into `raw`.
//!
//! Owns the names every stage and reader agrees on (see `docs/pipeline.md`,
//! "Streams and messages"):
//! - a pipeline `P` (1–32 characters of `A–Z a–z 0–9 _ -`) has five streams:
//!   `{P}-raw`, `{P}-enriched`, `{P}-validated`, `{P}-exceptions` (subjects
//!   `{P}.{stage}.>`) and `{P}-events` (subjects `{P}.events.>` and
//!   `{P}.state.>`), created by [`ensure_streams`] when missing;
//! - run, slice and file ids are 1–64 characters of `A–Z a–z 0–9 _ -`
//!   ([`check_id`]); a file id defaults to the file's name, sanitised by
//!   [`file_id_from_name`];
//! - a record message carries the records of up to
//!   [`crate::rowset::MAX_MESSAGE_ROWS`] rows of file `F` (ingest: up to
//!   [`IngestOptions::batch_rows`] rows and about
//!   [`IngestOptions::message_bytes`] of payload): it is published on
//!   `{P}.{stage}.{run}.{slice}.{F}` with message id `F:{first}-{last}` (the
//!   first and last row ingest put in it; the stages keep the id of the
//!   message they read) and the headers [`HDR_RUN`], [`HDR_SLICE`],
//!   [`HDR_FILE`], [`HDR_ROWS`], [`HDR_LINES`], [`HDR_SCHEMA`] (and
//!   [`HDR_REFDATA`] when the run pins its reference data); its payload is
//!   framed as [`crate::rowset`] says. [`read_records`] reads one back, and
//!   also reads the single-row messages of before (header [`HDR_ROW`],
//!   id `F:n`, payload the bare datum);
//! - an exception of row `n` is one message on
//!   `{P}.exceptions.{run}.{slice}.{F}` with message id `F:n` and the headers
//!   [`HDR_RUN`], [`HDR_SLICE`], [`HDR_FILE`], [`HDR_ROW`]; its payload is
//!   [`ExceptionBody`] as JSON;
//! - the end of a file's ingest is one event on `{P}.events.{run}.{slice}.{F}`:
//!   `file_ingested` (message id `F:ingested`) or `file_failed` (`F:failed`).
//!
//! [`ingest_file`] runs the blocking CSV reader on a blocking thread and
//! publishes its batches as they come (a bounded channel of
//! [`INGEST_QUEUE_BATCHES`] batches between them, so memory stays bounded
//! whatever the file's size). Invariant: at most
//! [`INGEST_PUBLISHES_IN_FLIGHT`] batches are published and not yet
//! acknowledged by the engine (a batch's records and exceptions are two
//! concurrent publishes), so their order in `raw` may interleave; the
//! `file_ingested` event is published only after every row of the file is
//! acknowledged, and a publish that fails stops the ingest (rows already
//! acknowledged stay published, as after a crash).
//! How a reader batch is cut into messages depends only on the file and on
//! [`IngestOptions`], so re-ingesting the same file id with the same options
//! within the streams' duplicate window publishes nothing new: every
//! message's id is acked as a duplicate and the summary says so
//! ([`IngestSummary::duplicates`], in rows).

use std::io::Read;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use finmesh_core::{
    Engine, Error, ErrorKind, Headers, OutgoingMessage, PubAck, Result, StreamConfig, StreamName, Subject,
    SubjectPattern, Timestamp,
};
use futures::StreamExt as _;
use serde::{Deserialize, Serialize};

use crate::ingest::{IngestError, IngestOptions, IngestReport, ingest};
use crate::reader::{Batch, Exception, Progress, ReaderOptions, Record, RowReader};
pub use crate::rowset::{HDR_LINES, HDR_ROWS};
use crate::rowset::{LineMap, MAX_MESSAGE_ROWS, RowSet, push_frame, split_frames};
use crate::schema::IngestSchema;

/// Header: the run id.
pub const HDR_RUN: &str = "Finmesh-Run";
/// Header: the slice id.
pub const HDR_SLICE: &str = "Finmesh-Slice";
/// Header: the file id.
pub const HDR_FILE: &str = "Finmesh-File";
/// Header of an exception (and of a single-row record message of before
/// batching): the data row number (from 1).
pub const HDR_ROW: &str = "Finmesh-Row";
/// Header of a single-row record message of before batching: the physical
/// line on which the row starts (batch messages: [`HDR_LINES`]).
pub const HDR_LINE: &str = "Finmesh-Line";
/// Header: the Avro schema's fingerprint (16 hex digits).
pub const HDR_SCHEMA: &str = "Finmesh-Schema";
/// Header: the reference-data version the run pins (RFC 3339), when given
/// at ingest; see [`crate::stages`] for what the stages do with it.
pub const HDR_REFDATA: &str = "Finmesh-Refdata";
/// Header set by enrich: the versions it used, `dataset@RFC3339,…`.
pub const HDR_REFDATA_USED: &str = "Finmesh-Refdata-Used";

/// Default pipeline name.
pub const DEFAULT_PIPELINE: &str = "risk";
/// Longest pipeline name, in characters.
pub const MAX_PIPELINE_LEN: usize = 32;
/// Longest run, slice or file id, in characters.
pub const MAX_ID_LEN: usize = 64;
/// Batches queued between the CSV reader thread and the publisher.
pub const INGEST_QUEUE_BATCHES: usize = 4;
/// Batches the publisher has sent and not yet seen acknowledged, at most.
pub const INGEST_PUBLISHES_IN_FLIGHT: usize = 4;

/// The four record-carrying stages, as they appear in subjects.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum StreamKind {
    Raw,
    Enriched,
    Validated,
    Exceptions,
}

impl StreamKind {
    /// The subject token and stream suffix.
    pub fn as_str(self) -> &'static str {
        match self {
            StreamKind::Raw => "raw",
            StreamKind::Enriched => "enriched",
            StreamKind::Validated => "validated",
            StreamKind::Exceptions => "exceptions",
        }
    }
}

fn check_chars(what: &str, s: &str, max: usize) -> Result<()> {
    if s.is_empty() {
        return Err(Error::invalid(format!("{what} must not be empty")));
    }
    if s.chars().count() > max {
        return Err(Error::invalid(format!("{what} is longer than {max} characters")));
    }
    if let Some((i, c)) = s.char_indices().find(|(_, c)| !(c.is_ascii_alphanumeric() || matches!(c, '_' | '-'))) {
        return Err(Error::invalid(format!("{what} `{s}` has {c:?} at byte {i}; allowed are A-Z a-z 0-9 _ -")));
    }
    Ok(())
}

/// Checks a run, slice or file id (`what` names it in the error).
pub fn check_id(what: &str, id: &str) -> Result<()> {
    check_chars(what, id, MAX_ID_LEN)
}

/// The default file id of a file named `name`: its last path component,
/// every character outside `A–Z a–z 0–9 _ -` (the dot of an extension too)
/// replaced by `_`, cut to [`MAX_ID_LEN`] characters; `file` if nothing is
/// left. `trades 2026-12-01.csv` → `trades_2026-12-01_csv`.
pub fn file_id_from_name(name: &str) -> String {
    let base = name.rsplit(['/', '\\']).next().unwrap_or(name);
    let id: String = base
        .chars()
        .map(|c| if c.is_ascii_alphanumeric() || matches!(c, '_' | '-') { c } else { '_' })
        .take(MAX_ID_LEN)
        .collect();
    if id.is_empty() { "file".to_owned() } else { id }
}

/// A pipeline's name and its streams.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Pipeline {
    name: String,
    raw: StreamName,
    enriched: StreamName,
    validated: StreamName,
    exceptions: StreamName,
    events: StreamName,
}

impl Pipeline {
    /// The pipeline `name` (checked).
    pub fn new(name: &str) -> Result<Self> {
        check_chars("pipeline name", name, MAX_PIPELINE_LEN)?;
        let s = |suffix: &str| StreamName::new(format!("{name}-{suffix}"));
        Ok(Pipeline {
            name: name.to_owned(),
            raw: s("raw")?,
            enriched: s("enriched")?,
            validated: s("validated")?,
            exceptions: s("exceptions")?,
            events: s("events")?,
        })
    }

    /// The name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The stream of a stage.
    pub fn stream(&self, kind: StreamKind) -> &StreamName {
        match kind {
            StreamKind::Raw => &self.raw,
            StreamKind::Enriched => &self.enriched,
            StreamKind::Validated => &self.validated,
            StreamKind::Exceptions => &self.exceptions,
        }
    }

    /// The events stream.
    pub fn events(&self) -> &StreamName {
        &self.events
    }

    /// `{P}.{stage}.{run}.{slice}.{file}` (ids checked by the caller).
    pub fn subject(&self, kind: StreamKind, file: &FileRef) -> Result<Subject> {
        Subject::new(format!("{}.{}.{}.{}.{}", self.name, kind.as_str(), file.run, file.slice, file.file))
    }

    /// `{P}.events.{run}.{slice}.{file}`.
    pub fn event_subject(&self, file: &FileRef) -> Result<Subject> {
        Subject::new(format!("{}.events.{}.{}.{}", self.name, file.run, file.slice, file.file))
    }

    /// The stream configurations, with `limits`.
    pub fn stream_configs(&self, limits: &StreamLimits) -> Result<Vec<StreamConfig>> {
        let mut out = Vec::new();
        for kind in [StreamKind::Raw, StreamKind::Enriched, StreamKind::Validated, StreamKind::Exceptions] {
            let pattern = SubjectPattern::new(format!("{}.{}.>", self.name, kind.as_str()))?;
            out.push(limits.apply(StreamConfig::new(self.stream(kind).clone(), vec![pattern])));
        }
        let events = vec![
            SubjectPattern::new(format!("{}.events.>", self.name))?,
            SubjectPattern::new(format!("{}.state.>", self.name))?,
        ];
        out.push(limits.apply(StreamConfig::new(self.events.clone(), events)));
        Ok(out)
    }
}

/// Limits of the pipeline's streams when [`ensure_streams`] creates them.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct StreamLimits {
    /// Window in which a repeated message id is a duplicate: a row re-sent
    /// (a re-upload, a stage's redelivery) within it is stored once.
    /// Default 1 hour.
    #[serde(with = "humantime_secs")]
    pub duplicate_window: Duration,
    /// Drop messages older than this. Default 7 days.
    #[serde(with = "humantime_secs")]
    pub max_age: Duration,
    /// Keep at most this many bytes per stream. Default: unlimited.
    pub max_bytes: Option<u64>,
}

mod humantime_secs {
    use std::time::Duration;

    use serde::{Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_u64(d.as_secs())
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
        Ok(Duration::from_secs(u64::deserialize(d)?))
    }
}

impl Default for StreamLimits {
    fn default() -> Self {
        StreamLimits {
            duplicate_window: Duration::from_secs(3600),
            max_age: Duration::from_secs(7 * 24 * 3600),
            max_bytes: None,
        }
    }
}

impl StreamLimits {
    fn apply(&self, mut config: StreamConfig) -> StreamConfig {
        config.duplicate_window = self.duplicate_window;
        config.max_age = Some(self.max_age);
        config.max_bytes = self.max_bytes;
        config
    }
}

/// Creates the pipeline's streams that do not exist yet (existing streams
/// are left as they are).
pub async fn ensure_streams(engine: &dyn Engine, pipeline: &Pipeline, limits: &StreamLimits) -> Result<()> {
    for config in pipeline.stream_configs(limits)? {
        match engine.stream_info(&config.name).await {
            Ok(_) => continue,
            Err(e) if e.kind() == ErrorKind::NotFound => {}
            Err(e) => return Err(e),
        }
        match engine.create_stream(config).await {
            Ok(_) => {}
            Err(e) if e.kind() == ErrorKind::AlreadyExists => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

/// Which file of which run and slice.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct FileRef {
    pub run: String,
    pub slice: String,
    pub file: String,
}

impl FileRef {
    /// A checked file reference.
    pub fn new(run: &str, slice: &str, file: &str) -> Result<Self> {
        check_id("run id", run)?;
        check_id("slice id", slice)?;
        check_id("file id", file)?;
        Ok(FileRef { run: run.to_owned(), slice: slice.to_owned(), file: file.to_owned() })
    }

    /// The message id of row `row`: `file:row`.
    pub fn msg_id(&self, row: u64) -> String {
        format!("{}:{row}", self.file)
    }

    /// The headers every record and exception of row `row` carries.
    pub fn headers(&self, row: u64) -> Result<Headers> {
        let mut h = Headers::new();
        h.insert(HDR_RUN, self.run.as_str())?;
        h.insert(HDR_SLICE, self.slice.as_str())?;
        h.insert(HDR_FILE, self.file.as_str())?;
        h.insert(HDR_ROW, row.to_string())?;
        Ok(h)
    }

    /// The message id of a record message that ingest filled with `rows`:
    /// `file:first-last`.
    pub fn batch_msg_id(&self, rows: &RowSet) -> String {
        format!("{}:{}-{}", self.file, rows.first(), rows.last())
    }

    /// The file reference of a message's headers; `Invalid` naming the
    /// missing or bad header otherwise.
    pub fn of_headers(headers: &Headers) -> Result<FileRef> {
        let get =
            |name: &str| headers.get(name).ok_or_else(|| Error::invalid(format!("the message has no {name} header")));
        FileRef::new(get(HDR_RUN)?, get(HDR_SLICE)?, get(HDR_FILE)?)
    }

    /// The file reference and row of a single-row message's headers (an
    /// exception); `Invalid` naming the missing or bad header otherwise.
    pub fn from_headers(headers: &Headers) -> Result<(FileRef, u64)> {
        let file = FileRef::of_headers(headers)?;
        Ok((file, single_row(headers)?))
    }
}

fn single_row(headers: &Headers) -> Result<u64> {
    headers
        .get(HDR_ROW)
        .ok_or_else(|| Error::invalid(format!("the message has no {HDR_ROWS} or {HDR_ROW} header")))?
        .parse::<u64>()
        .ok()
        .filter(|r| *r >= 1)
        .ok_or_else(|| Error::invalid(format!("header {HDR_ROW} is not a row number")))
}

/// The rows a record message carries, from its headers alone: [`HDR_ROWS`],
/// or [`HDR_ROW`] for a single-row message.
pub fn message_rows(headers: &Headers) -> Result<RowSet> {
    match headers.get(HDR_ROWS) {
        Some(text) => RowSet::parse(text),
        None => {
            let row = single_row(headers)?;
            RowSet::single(u32::try_from(row).map_err(|_| Error::invalid(format!("row {row} is beyond 2^32-1")))?)
        }
    }
}

/// A record message read back: its file, rows, their lines and datums.
#[derive(Debug, Clone)]
pub struct RecordMessage {
    pub file: FileRef,
    pub rows: RowSet,
    pub lines: LineMap,
    /// One raw Avro datum per row, in the order of `rows`.
    pub datums: Vec<Bytes>,
    /// A single-row message of before batching (bare datum, [`HDR_ROW`]).
    pub single: bool,
}

impl RecordMessage {
    /// `(row, line, datum)` of every record, ascending by row.
    pub fn records(&self) -> impl Iterator<Item = (u32, u64, &Bytes)> {
        self.rows.iter().zip(&self.datums).map(|(row, datum)| (row, self.lines.line(row), datum))
    }
}

/// Reads a record message of `raw`, `enriched` or `validated` (either
/// format, see the module doc); `Invalid` saying what does not fit.
pub fn read_records(headers: &Headers, payload: &Bytes) -> Result<RecordMessage> {
    let file = FileRef::of_headers(headers)?;
    let rows = message_rows(headers)?;
    if headers.get(HDR_ROWS).is_none() {
        let mut lines = LineMap::default();
        let line = headers.get(HDR_LINE).and_then(|l| l.parse().ok()).unwrap_or(0);
        lines.push(rows.first(), line);
        return Ok(RecordMessage { file, rows, lines, datums: vec![payload.clone()], single: true });
    }
    let lines = match headers.get(HDR_LINES) {
        Some(text) => LineMap::parse(text)?,
        None => LineMap::default(),
    };
    let datums = split_frames(payload, rows.len())?;
    Ok(RecordMessage { file, rows, lines, datums, single: false })
}

/// The stage that sent a row to `exceptions`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ExceptionStage {
    Ingest,
    Enrich,
    Validate,
}

/// The JSON payload of an exception (the contract's field names).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ExceptionBody {
    pub run: String,
    pub slice: String,
    pub file: String,
    pub row: u64,
    pub line: u64,
    pub stage: ExceptionStage,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub column: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rules: Option<Vec<String>>,
    pub reason: String,
}

impl ExceptionBody {
    /// The exception message of this body on `pipeline`.
    pub fn to_message(&self, pipeline: &Pipeline, file: &FileRef) -> Result<OutgoingMessage> {
        let payload = serde_json::to_vec(self).map_err(|e| Error::internal(e.to_string()))?;
        let mut msg = OutgoingMessage::new(pipeline.subject(StreamKind::Exceptions, file)?, payload);
        msg.headers = file.headers(self.row)?;
        msg.with_msg_id(file.msg_id(self.row))
    }
}

/// How one file is ingested.
#[derive(Debug, Clone)]
pub struct IngestSpec {
    /// Run, slice and file.
    pub file: FileRef,
    /// The reference-data version the run pins ([`HDR_REFDATA`]), if any.
    pub refdata: Option<Timestamp>,
    /// Batching and progress.
    pub options: IngestOptions,
    /// Reader limits.
    pub reader: ReaderOptions,
}

/// What [`ingest_file`] did: the `finmesh pipeline ingest` summary and the
/// `POST /v1/pipelines/{pipeline}/files` answer.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct IngestSummary {
    pub pipeline: String,
    pub run: String,
    pub slice: String,
    pub file: String,
    /// Data rows read: the file's expected count.
    pub rows: u64,
    pub records: u64,
    pub exceptions: u64,
    pub bytes: u64,
    pub elapsed_s: f64,
    pub rows_per_s: f64,
    /// Rows in messages whose id the engine had already stored (a re-upload
    /// of the same file id within the duplicate window): not stored again.
    pub duplicates: u64,
    /// `completed`, `already_ingested` (every row was a duplicate), or
    /// `failed` (the file could not be read to its end; see `reason`).
    pub status: &'static str,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
}

impl std::fmt::Display for IngestSummary {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{}/{}/{}: {} rows: {} records, {} exceptions; {} bytes in {:.2} s ({:.0} rows/s)",
            self.run,
            self.slice,
            self.file,
            self.rows,
            self.records,
            self.exceptions,
            self.bytes,
            self.elapsed_s,
            self.rows_per_s
        )?;
        match self.status {
            "already_ingested" => {
                write!(f, "; already ingested: all {} rows were duplicates, nothing new stored", self.duplicates)
            }
            "failed" => write!(f, "; FAILED: {}", self.reason.as_deref().unwrap_or("")),
            _ if self.duplicates > 0 => write!(f, "; {} rows were duplicates", self.duplicates),
            _ => Ok(()),
        }
    }
}

/// The `file_ingested` / `file_failed` event.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FileEvent {
    #[serde(rename = "type")]
    pub kind: String,
    pub run: String,
    pub slice: String,
    pub file: String,
    pub rows: u64,
    pub records: u64,
    pub exceptions: u64,
    pub at: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
}

fn rfc3339_now() -> String {
    rfc3339(Timestamp::now())
}

/// A timestamp as RFC 3339 (UTC, nanoseconds).
pub fn rfc3339(t: Timestamp) -> String {
    let dt = time::OffsetDateTime::from_unix_timestamp_nanos(t.as_nanos() as i128)
        .unwrap_or(time::OffsetDateTime::UNIX_EPOCH);
    dt.format(&time::format_description::well_known::Rfc3339).unwrap_or_default()
}

/// An RFC 3339 text as a timestamp (`Invalid` with the reason otherwise).
pub fn parse_rfc3339(s: &str) -> Result<Timestamp> {
    let dt = time::OffsetDateTime::parse(s, &time::format_description::well_known::Rfc3339)
        .map_err(|e| Error::invalid(format!("`{s}` is not an RFC 3339 time: {e}")))?;
    let ns = dt.unix_timestamp_nanos();
    u64::try_from(ns).map(Timestamp).map_err(|_| Error::invalid(format!("`{s}` is before 1970")))
}

/// Reads `input` as one CSV file of `schema` and publishes it into
/// `pipeline`'s streams (which must exist, see [`ensure_streams`]), calling
/// `on_progress` from the reader thread. A file that cannot be read to its
/// end is not an `Err`: its summary says `failed` and a `file_failed` event
/// is published; `Err` means the engine refused something.
pub async fn ingest_file<R>(
    engine: Arc<dyn Engine>,
    pipeline: &Pipeline,
    schema: Arc<IngestSchema>,
    spec: IngestSpec,
    input: R,
    on_progress: impl FnMut(&Progress) + Send + 'static,
) -> Result<IngestSummary>
where
    R: Read + Send + 'static,
{
    let start = Instant::now();
    let (tx, mut rx) = tokio::sync::mpsc::channel::<Batch>(INGEST_QUEUE_BATCHES);
    let file_id = spec.file.file.clone();
    let fingerprint = schema.fingerprint_hex();
    let reader_opts = spec.reader.clone();
    let ingest_opts = spec.options.clone();
    let reader = tokio::task::spawn_blocking(move || {
        let reader = match RowReader::new(input, schema, file_id, reader_opts) {
            Ok(r) => r,
            Err(error) => {
                return Err(error.to_string());
            }
        };
        let mut on_progress = on_progress;
        match ingest(reader, &ingest_opts, |batch| tx.blocking_send(batch), &mut on_progress) {
            Ok(report) => Ok((report, None)),
            Err(IngestError::File { error, report }) => Ok((report, Some(error.to_string()))),
            // The publisher stopped receiving: it failed, and says why.
            Err(IngestError::Sink { report, .. }) => Ok((report, Some("the publisher stopped".to_owned()))),
        }
    });

    let mut duplicates = 0;
    let mut publish_error = None;
    // Up to INGEST_PUBLISHES_IN_FLIGHT batches are being made durable at
    // once, so the next batch's write overlaps the previous one's sync.
    let mut in_flight = futures::stream::FuturesUnordered::new();
    let mut read_all = false;
    loop {
        tokio::select! {
            Some(r) = in_flight.next(), if !in_flight.is_empty() => match r {
                Ok(d) => duplicates += d,
                Err(e) => {
                    publish_error = Some(e);
                    break;
                }
            },
            batch = rx.recv(), if !read_all && in_flight.len() < INGEST_PUBLISHES_IN_FLIGHT => match batch {
                Some(batch) => in_flight.push(publish_batch(&*engine, pipeline, &spec, &fingerprint, batch)),
                None => read_all = true,
            },
            else => break,
        }
    }
    drop(in_flight);
    drop(rx);
    let outcome = reader.await.map_err(|e| Error::internal(format!("the CSV reader thread failed: {e}")))?;
    if let Some(e) = publish_error {
        return Err(e);
    }
    let (report, reason) = match outcome {
        Ok((report, reason)) => (report, reason),
        Err(reason) => (IngestReport::new(Progress::default(), start.elapsed()), Some(reason)),
    };
    let status = match &reason {
        Some(_) => "failed",
        None if report.rows > 0 && duplicates == report.rows => "already_ingested",
        None => "completed",
    };
    let event = FileEvent {
        kind: if reason.is_some() { "file_failed" } else { "file_ingested" }.to_owned(),
        run: spec.file.run.clone(),
        slice: spec.file.slice.clone(),
        file: spec.file.file.clone(),
        rows: report.rows,
        records: report.records,
        exceptions: report.exceptions,
        at: rfc3339_now(),
        reason: reason.clone(),
    };
    let id = format!("{}:{}", spec.file.file, if reason.is_some() { "failed" } else { "ingested" });
    let payload = serde_json::to_vec(&event).map_err(|e| Error::internal(e.to_string()))?;
    let mut msg = OutgoingMessage::new(pipeline.event_subject(&spec.file)?, payload);
    msg.headers = spec.file.headers(0)?;
    publish_resending(&*engine, pipeline.events(), vec![msg.with_msg_id(id)?]).await?;
    let elapsed = start.elapsed();
    Ok(IngestSummary {
        pipeline: pipeline.name().to_owned(),
        run: spec.file.run,
        slice: spec.file.slice,
        file: spec.file.file,
        rows: report.rows,
        records: report.records,
        exceptions: report.exceptions,
        bytes: report.bytes,
        elapsed_s: elapsed.as_secs_f64(),
        rows_per_s: if elapsed.as_secs_f64() > 0.0 { report.rows as f64 / elapsed.as_secs_f64() } else { 0.0 },
        duplicates,
        status,
        reason,
    })
}

/// Publishes one reader batch: its records as record messages to `raw`
/// (cut by [`IngestOptions::batch_rows`], [`MAX_MESSAGE_ROWS`] and
/// [`IngestOptions::message_bytes`]), its exceptions one per row to
/// `exceptions`; returns how many rows were duplicates.
async fn publish_batch(
    engine: &dyn Engine,
    pipeline: &Pipeline,
    spec: &IngestSpec,
    fingerprint: &str,
    batch: Batch,
) -> Result<u64> {
    let file = &spec.file;
    let refdata = spec.refdata.map(rfc3339);
    let subject = pipeline.subject(StreamKind::Raw, file)?;
    let max_rows = spec.options.batch_rows.clamp(1, MAX_MESSAGE_ROWS);
    let max_bytes = spec.options.message_bytes.max(1);
    let mut records = Vec::new();
    let mut record_rows = Vec::new();
    let mut rest = &batch.records[..];
    while !rest.is_empty() {
        let mut n = 0;
        let mut bytes = 0;
        while n < rest.len() && n < max_rows && (n == 0 || bytes + rest[n].avro.len() + 10 <= max_bytes) {
            bytes += rest[n].avro.len() + 10;
            n += 1;
        }
        let (chunk, tail) = rest.split_at(n);
        rest = tail;
        let msg = record_message(file, &subject, fingerprint, refdata.as_deref(), chunk)?;
        record_rows.push(chunk.len() as u64);
        records.push(msg);
    }
    let exceptions = batch
        .exceptions
        .iter()
        .map(|e| ingest_exception(file, e).to_message(pipeline, file))
        .collect::<Result<Vec<_>>>()?;
    // Both publishes are in flight at once (one durable round trip, not
    // two); both are acked before the next batch is asked for.
    let publish = |stream: StreamKind, msgs: Vec<OutgoingMessage>| async move {
        if msgs.is_empty() { Ok(Vec::new()) } else { publish_resending(engine, pipeline.stream(stream), msgs).await }
    };
    let (record_acks, exception_acks) =
        tokio::try_join!(publish(StreamKind::Raw, records), publish(StreamKind::Exceptions, exceptions))?;
    let duplicates = record_acks.iter().zip(&record_rows).filter(|(a, _)| a.duplicate).map(|(_, n)| n).sum::<u64>()
        + exception_acks.iter().filter(|a| a.duplicate).count() as u64;
    Ok(duplicates)
}

/// Tries of one publish whose ack did not come ([`ErrorKind::Timeout`]) or
/// whose engine could not take it now ([`ErrorKind::Unavailable`]).
pub const PUBLISH_TRIES: u32 = 5;
/// Wait before the first resend; it doubles, up to [`RESEND_WAIT_MAX`].
const RESEND_WAIT: Duration = Duration::from_millis(200);
/// Longest wait between two resends.
const RESEND_WAIT_MAX: Duration = Duration::from_secs(2);

/// Publishes resent by [`publish_resending`] in this process: a stalling
/// engine shows here before it fails anything.
static RESENDS: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);

/// How many publishes [`publish_resending`] resent since the process
/// started.
pub fn publish_resends() -> u64 {
    RESENDS.load(std::sync::atomic::Ordering::Relaxed)
}

/// Publish `msgs` to `stream`, resending them all when the ack does not
/// come: every message of a pipeline carries its `Nats-Msg-Id`, so what
/// the first try stored is acked as a duplicate, never stored twice (the
/// streams' dedup window is an hour; the tries take well under a minute).
/// A stall of the engine shorter than the tries (a NATS leader election,
/// a slow fsync) so costs a pause, not the file or the batch. The rows a
/// resend finds stored count as duplicates in the caller's figures.
pub async fn publish_resending(
    engine: &dyn Engine,
    stream: &StreamName,
    msgs: Vec<OutgoingMessage>,
) -> Result<Vec<PubAck>> {
    let mut wait = RESEND_WAIT;
    let mut tries = 1;
    loop {
        match engine.publish_batch(stream, msgs.clone()).await {
            Err(e) if tries < PUBLISH_TRIES && matches!(e.kind(), ErrorKind::Timeout | ErrorKind::Unavailable) => {
                tracing::warn!(%stream, tries, error = %e, "publish not acked; resending with the same message ids");
                RESENDS.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                tokio::time::sleep(wait).await;
                wait = (wait * 2).min(RESEND_WAIT_MAX);
                tries += 1;
            }
            r => return r,
        }
    }
}

/// One record message holding `chunk` (rows ascending, at most
/// [`MAX_MESSAGE_ROWS`]).
fn record_message(
    file: &FileRef,
    subject: &Subject,
    fingerprint: &str,
    refdata: Option<&str>,
    chunk: &[Record],
) -> Result<OutgoingMessage> {
    let row = |r: &Record| u32::try_from(r.row).map_err(|_| Error::invalid(format!("row {} is beyond 2^32-1", r.row)));
    let rows = RowSet::from_sorted(chunk.iter().map(row).collect::<Result<Vec<_>>>()?)?;
    let mut lines = LineMap::default();
    let mut payload = bytes::BytesMut::with_capacity(chunk.iter().map(|r| r.avro.len() + 5).sum());
    for (r, n) in chunk.iter().zip(rows.iter()) {
        lines.push(n, r.line);
        push_frame(&mut payload, &r.avro);
    }
    let mut headers = Headers::new();
    headers.insert(HDR_RUN, file.run.as_str())?;
    headers.insert(HDR_SLICE, file.slice.as_str())?;
    headers.insert(HDR_FILE, file.file.as_str())?;
    headers.insert(HDR_ROWS, rows.to_string())?;
    headers.insert(HDR_LINES, lines.to_string())?;
    headers.insert(HDR_SCHEMA, fingerprint)?;
    if let Some(v) = refdata {
        headers.insert(HDR_REFDATA, v)?;
    }
    let msg = OutgoingMessage { subject: subject.clone(), headers, payload: payload.freeze() };
    msg.with_msg_id(file.batch_msg_id(&rows))
}

fn ingest_exception(file: &FileRef, e: &Exception) -> ExceptionBody {
    ExceptionBody {
        run: file.run.clone(),
        slice: file.slice.clone(),
        file: file.file.clone(),
        row: e.row,
        line: e.line,
        stage: ExceptionStage::Ingest,
        column: e.column.clone(),
        rules: None,
        reason: e.reason.to_string(),
    }
}

/// Payload helper for tests and readers: an exception message's body.
pub fn parse_exception(payload: &Bytes) -> Result<ExceptionBody> {
    serde_json::from_slice(payload).map_err(|e| Error::invalid(format!("not an exception body: {e}")))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_and_names_are_checked_and_file_names_sanitised() {
        assert!(Pipeline::new("risk").is_ok());
        assert!(Pipeline::new("").is_err());
        assert!(Pipeline::new(&"p".repeat(33)).is_err());
        assert!(Pipeline::new("a.b").is_err());
        assert!(check_id("run id", "2026-12-01_eod").is_ok());
        let e = check_id("run id", "a b").unwrap_err();
        assert_eq!(e.kind(), ErrorKind::Invalid);
        assert!(e.to_string().contains("run id `a b` has ' ' at byte 1"), "{e}");
        assert!(check_id("slice id", &"s".repeat(65)).is_err());
        assert_eq!(file_id_from_name("/in/trades 2026-12-01.csv"), "trades_2026-12-01_csv");
        assert_eq!(file_id_from_name("C:\\x\\a.b"), "a_b");
        assert_eq!(file_id_from_name(""), "file");
        assert_eq!(file_id_from_name(&"é".repeat(100)).len(), MAX_ID_LEN);
    }

    #[test]
    fn subjects_headers_and_times_follow_the_contract() {
        let p = Pipeline::new("risk").unwrap();
        let f = FileRef::new("r1", "s1", "f1").unwrap();
        assert_eq!(p.subject(StreamKind::Raw, &f).unwrap().as_str(), "risk.raw.r1.s1.f1");
        assert_eq!(p.event_subject(&f).unwrap().as_str(), "risk.events.r1.s1.f1");
        assert_eq!(p.stream(StreamKind::Exceptions).as_str(), "risk-exceptions");
        let h = f.headers(7).unwrap();
        assert_eq!(FileRef::from_headers(&h).unwrap(), (f.clone(), 7));
        assert_eq!(f.msg_id(7), "f1:7");
        let t = parse_rfc3339("2026-12-01T00:00:00Z").unwrap();
        assert_eq!(rfc3339(t), "2026-12-01T00:00:00Z");
        assert!(parse_rfc3339("yesterday").is_err());
    }
}
