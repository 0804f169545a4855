//! Runs: what a run expects ([`RunSpec`]), what it has ([`RunStatus`]) and
//! the pure function from tallies to status ([`RunStatus::summarize`]).
//!
//! The model:
//! - a run has slices; a slice expects either a list of files (by id) or a
//!   number of files; a run has one deadline (the end of its window);
//! - a file's stages are complete when its counts equal what its ingest
//!   said: `raw` holds `records` rows, enrichment accounted for `records`
//!   rows (enriched or enrich exceptions), and the end accounts for `rows`
//!   rows (validated or any exception);
//! - a slice is complete when every expected file arrived on time and is
//!   complete; a run when every slice is, and the last count that made it
//!   so was stored before the deadline;
//! - a run fails when a file's ingest failed, or when the reconciler has
//!   seen every message stored up to the deadline (its watermark passed it)
//!   and the run is not complete; the reasons name the slice, the file, the
//!   stage and the rows missing, or the file that never arrived;
//! - a file whose ingest ended after the deadline is late: it is listed in
//!   `late` and never merged into its slice; a file the spec does not expect
//!   is listed in `unexpected` and not merged either.
//!
//! Invariants: a run's state leaves `open` once and never changes again
//! (late files are still recorded after); summarizing is deterministic and
//! idempotent, so recomputing after a crash gives the same status and the
//! same state-change message ids (the event stream deduplicates them).

use std::collections::{BTreeMap, BTreeSet};

use bytes::Bytes;
use finmesh_core::{Error, Result, Subject, Timestamp};
use serde::{Deserialize, Serialize};

use super::names::{FileRef, Names, check_id};
use super::tally::{Counted, FileTally};
use super::time_fmt;

/// Most slices a run may declare.
pub const MAX_SLICES: usize = 1000;
/// Most files a slice may expect.
pub const MAX_FILES_PER_SLICE: u32 = 10_000;

/// What one slice expects.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SliceSpec {
    /// The files expected, by id (exclusive with `expected_files`).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub files: Vec<String>,
    /// How many files are expected, whatever their ids.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub expected_files: Option<u32>,
}

impl SliceSpec {
    /// The number of files the slice waits for.
    pub fn expected(&self) -> u32 {
        if self.files.is_empty() { self.expected_files.unwrap_or(0) } else { self.files.len() as u32 }
    }
}

/// What a run expects: its slices and the end of its window.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RunSpec {
    /// The slices, by id.
    pub slices: BTreeMap<String, SliceSpec>,
    /// The end of the run's window.
    #[serde(with = "time_fmt")]
    pub deadline: Timestamp,
    /// The window's length when it was given relative to the opening.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub window_s: Option<u64>,
}

impl RunSpec {
    /// Whether `other` asks for the same run: the same slices, and the same
    /// deadline or the same relative window (so repeating a request that
    /// gave `window_s` is not a conflict).
    pub fn same_request(&self, other: &RunSpec) -> bool {
        self.slices == other.slices
            && (self.deadline == other.deadline || (self.window_s.is_some() && self.window_s == other.window_s))
    }
}

/// The body of `PUT /v1/pipelines/runs/{run}` (and of `pipeline open-run`):
/// the slices and either an absolute `deadline` (RFC 3339) or a window
/// `window_s` seconds from now.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RunRequest {
    /// The slices, by id.
    pub slices: BTreeMap<String, SliceSpec>,
    /// The end of the window (RFC 3339).
    #[serde(default)]
    pub deadline: Option<String>,
    /// The window's length from now, in seconds.
    #[serde(default)]
    pub window_s: Option<u64>,
}

impl RunRequest {
    /// Check everything at once and build the spec (`now` anchors `window_s`).
    pub fn into_spec(self, now: Timestamp) -> Result<RunSpec> {
        let mut p = Vec::new();
        if self.slices.is_empty() {
            p.push("a run needs at least one slice".to_owned());
        }
        if self.slices.len() > MAX_SLICES {
            p.push(format!("a run may have at most {MAX_SLICES} slices, got {}", self.slices.len()));
        }
        for (name, s) in &self.slices {
            if let Err(e) = check_id("slice id", name) {
                p.push(e.message().to_owned());
            }
            match (s.files.is_empty(), s.expected_files) {
                (false, Some(_)) => p.push(format!("slice `{name}`: give `files` or `expected_files`, not both")),
                (true, None) => p.push(format!("slice `{name}`: give `files` (ids) or `expected_files` (a count)")),
                (true, Some(0)) => p.push(format!("slice `{name}`: expected_files must be at least 1")),
                _ => {}
            }
            if s.expected() > MAX_FILES_PER_SLICE {
                p.push(format!("slice `{name}`: at most {MAX_FILES_PER_SLICE} files, got {}", s.expected()));
            }
            let mut seen = BTreeSet::new();
            for f in &s.files {
                if let Err(e) = check_id("file id", f) {
                    p.push(format!("slice `{name}`: {}", e.message()));
                } else if !seen.insert(f) {
                    p.push(format!("slice `{name}`: file `{f}` is listed twice"));
                }
            }
        }
        let deadline = match (self.deadline, self.window_s) {
            (Some(_), Some(_)) => {
                p.push("give `deadline` or `window_s`, not both".to_owned());
                None
            }
            (None, None) => {
                p.push("a run needs a `deadline` (RFC 3339) or a `window_s` (seconds from now)".to_owned());
                None
            }
            (Some(d), None) => match time_fmt::parse(&d) {
                Ok(t) if t <= now => {
                    p.push(format!("deadline `{d}` has already passed"));
                    None
                }
                Ok(t) => Some(t),
                Err(e) => {
                    p.push(format!("deadline `{d}`: {e}"));
                    None
                }
            },
            (None, Some(0)) => {
                p.push("window_s must be at least 1".to_owned());
                None
            }
            (None, Some(s)) => Some(now.saturating_add(std::time::Duration::from_secs(s))),
        };
        match deadline {
            Some(deadline) if p.is_empty() => Ok(RunSpec { slices: self.slices, deadline, window_s: self.window_s }),
            _ => Err(Error::invalid(format!("invalid run: {}", p.join("; ")))),
        }
    }
}

/// Where a run, slice or file stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum Phase {
    /// Waiting for files or counts.
    #[default]
    Open,
    /// A file whose records are arriving but whose ingest has not ended.
    Ingesting,
    /// A file whose ingest ended and whose stages are not all complete.
    Reconciling,
    /// Every count equals its expected count.
    Complete,
    /// The window passed first, or an ingest failed.
    Failed,
    /// A file whose ingest ended after the run's deadline.
    Late,
}

impl Phase {
    fn as_str(self) -> &'static str {
        match self {
            Phase::Open => "open",
            Phase::Ingesting => "ingesting",
            Phase::Reconciling => "reconciling",
            Phase::Complete => "complete",
            Phase::Failed => "failed",
            Phase::Late => "late",
        }
    }

    /// Complete or failed.
    pub fn is_terminal(self) -> bool {
        matches!(self, Phase::Complete | Phase::Failed)
    }
}

/// Expected and actual count of one stage of one file.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct StageCount {
    /// Known once the file's ingest ended.
    pub expected: Option<u64>,
    /// Distinct rows the stage's output accounts for.
    pub actual: u64,
    /// `actual == expected`.
    pub complete: bool,
}

impl StageCount {
    fn new(expected: Option<u64>, actual: u64) -> Self {
        StageCount { expected, actual, complete: expected == Some(actual) }
    }
}

/// Distinct exception rows, by the stage that raised them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
pub struct ExceptionCounts {
    /// Raised at ingest.
    pub ingest: u64,
    /// Raised by enrichment.
    pub enrich: u64,
    /// Raised by validation.
    pub validate: u64,
}

/// One file's status.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FileStatus {
    /// Where it stands.
    pub state: Phase,
    /// Data rows (the expected end count), once its ingest ended.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rows: Option<u64>,
    /// When its ingest ended.
    #[serde(default, skip_serializing_if = "Option::is_none", with = "time_fmt::option")]
    pub ingested_at: Option<Timestamp>,
    /// Records on `raw` (expected: the ingest's `records`).
    pub raw: StageCount,
    /// Rows enriched or sent to exceptions by enrichment (expected: `records`).
    pub enriched: StageCount,
    /// Rows validated or in exceptions (expected: `rows`).
    pub validated: StageCount,
    /// Records on `validated` alone.
    pub valid_records: u64,
    /// Exception rows by stage.
    pub exceptions: ExceptionCounts,
    /// Why it failed (ingest failure).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
}

impl FileStatus {
    /// The status a tally gives.
    pub fn of(t: &FileTally) -> FileStatus {
        let (records, rows) = match t.ingested() {
            Some(i) => (Some(i.records), Some(i.rows)),
            None => (None, None),
        };
        let raw = StageCount::new(records, t.count(Counted::Raw));
        let enriched = StageCount::new(records, t.enriched_actual());
        let validated = StageCount::new(rows, t.final_actual());
        let state = if t.failed().is_some() {
            Phase::Failed
        } else if t.ingested().is_none() {
            Phase::Ingesting
        } else if raw.complete && enriched.complete && validated.complete {
            Phase::Complete
        } else {
            Phase::Reconciling
        };
        FileStatus {
            state,
            rows,
            ingested_at: t.ingested().map(|i| i.at),
            raw,
            enriched,
            validated,
            valid_records: t.count(Counted::Validated),
            exceptions: ExceptionCounts {
                ingest: t.count(Counted::ExcIngest),
                enrich: t.count(Counted::ExcEnrich),
                validate: t.count(Counted::ExcValidate),
            },
            reason: t.failed().map(|f| f.reason.clone()),
        }
    }

    /// Why this file is not complete, stage by stage (empty when it is).
    fn shortfall(&self) -> Vec<String> {
        if self.state == Phase::Ingesting {
            return vec![format!("ingest did not finish ({} records on raw so far)", self.raw.actual)];
        }
        let mut v = Vec::new();
        for (name, c) in [("raw", self.raw), ("enriched", self.enriched), ("validated", self.validated)] {
            let Some(exp) = c.expected else { continue };
            if c.actual < exp {
                v.push(format!("stage {name} has {} of {exp} rows, {} missing", c.actual, exp - c.actual));
            } else if c.actual > exp {
                v.push(format!("stage {name} has {} of {exp} rows, {} more than expected", c.actual, c.actual - exp));
            }
        }
        v
    }
}

/// One slice's status.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SliceStatus {
    /// Where it stands (`open`, `complete` or `failed`).
    pub state: Phase,
    /// Files the slice waits for.
    pub expected_files: u32,
    /// Files that arrived on time, by id.
    pub files: BTreeMap<String, FileStatus>,
    /// Expected files (by id) that have not arrived.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub missing: Vec<String>,
}

/// A file listed outside the slices: late or unexpected.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FileNote {
    /// Its slice.
    pub slice: String,
    /// Its id.
    pub file: String,
    /// When its ingest ended, if it did.
    #[serde(default, skip_serializing_if = "Option::is_none", with = "time_fmt::option")]
    pub ingested_at: Option<Timestamp>,
    /// Its data rows, if its ingest ended.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rows: Option<u64>,
}

/// A run's reconciliation state: the document `GET /v1/pipelines/runs/{run}`
/// returns, stored under `run.{run}` in `{P}-recon`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RunStatus {
    /// The pipeline.
    pub pipeline: String,
    /// The run id.
    pub run: String,
    /// What it expects.
    pub spec: RunSpec,
    /// When it was opened.
    #[serde(with = "time_fmt")]
    pub opened_at: Timestamp,
    /// `open`, `complete` or `failed`.
    pub state: Phase,
    /// When it left `open`.
    #[serde(default, skip_serializing_if = "Option::is_none", with = "time_fmt::option")]
    pub state_at: Option<Timestamp>,
    /// Per slice.
    pub slices: BTreeMap<String, SliceStatus>,
    /// Why it failed, one precise reason per problem.
    #[serde(default)]
    pub failures: Vec<String>,
    /// Files whose ingest ended after the deadline (not merged).
    #[serde(default)]
    pub late: Vec<FileNote>,
    /// Files the spec does not expect (not merged).
    #[serde(default)]
    pub unexpected: Vec<FileNote>,
}

/// A state change to publish on the events stream.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StateChange {
    /// `{P}.state.{run}[.{slice}[.{file}]]`.
    pub subject: Subject,
    /// Fixed per (scope, state), so republishing after a crash is a duplicate.
    pub msg_id: String,
    /// JSON `{"type":"run_state"|"slice_state"|"file_state","run",...,"state","at"}`.
    pub payload: Bytes,
}

#[derive(Serialize)]
struct StateEvent<'a> {
    #[serde(rename = "type")]
    kind: &'static str,
    run: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    slice: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    file: Option<&'a str>,
    state: Phase,
    #[serde(with = "time_fmt")]
    at: Timestamp,
    #[serde(skip_serializing_if = "<[String]>::is_empty")]
    reasons: &'a [String],
}

fn change(
    names: &Names,
    run: &str,
    slice: Option<&str>,
    file: Option<&str>,
    state: Phase,
    at: Timestamp,
    reasons: &[String],
) -> StateChange {
    let kind = match (slice, file) {
        (None, _) => "run_state",
        (Some(_), None) => "slice_state",
        (Some(_), Some(_)) => "file_state",
    };
    let scope = [Some(run), slice, file].into_iter().flatten().collect::<Vec<_>>().join(".");
    let payload = serde_json::to_vec(&StateEvent { kind, run, slice, file, state, at, reasons }).expect("serialises");
    StateChange {
        subject: names.state_subject(run, slice, file),
        msg_id: format!("state:{scope}:{}", state.as_str()),
        payload: Bytes::from(payload),
    }
}

impl RunStatus {
    /// A freshly opened run.
    pub fn opened(pipeline: &str, run: &str, spec: RunSpec, now: Timestamp) -> RunStatus {
        let slices = spec
            .slices
            .iter()
            .map(|(name, s)| {
                let status = SliceStatus {
                    state: Phase::Open,
                    expected_files: s.expected(),
                    files: BTreeMap::new(),
                    missing: s.files.clone(),
                };
                (name.clone(), status)
            })
            .collect();
        RunStatus {
            pipeline: pipeline.to_owned(),
            run: run.to_owned(),
            spec,
            opened_at: now,
            state: Phase::Open,
            state_at: None,
            slices,
            failures: Vec::new(),
            late: Vec::new(),
            unexpected: Vec::new(),
        }
    }

    /// The status the tallies of the run's files give, and the state
    /// changes from `self` to it. `watermark`: every message stored up to
    /// it has been applied; `now`: the time stamped on changes.
    pub fn summarize(
        &self,
        names: &Names,
        files: &[(&FileRef, &FileTally)],
        watermark: Timestamp,
        now: Timestamp,
    ) -> (RunStatus, Vec<StateChange>) {
        let spec = &self.spec;
        let deadline = spec.deadline;
        let mut next = RunStatus::opened(&self.pipeline, &self.run, spec.clone(), self.opened_at);
        next.state = self.state;
        next.state_at = self.state_at;
        next.failures.clone_from(&self.failures);
        next.late.clone_from(&self.late);
        let mut changes = Vec::new();
        let mut completion = Timestamp(0);

        for (f, t) in files {
            debug_assert_eq!(f.run, self.run);
            let note = || FileNote {
                slice: f.slice.clone(),
                file: f.file.clone(),
                ingested_at: t.ingested().map(|i| i.at),
                rows: t.ingested().map(|i| i.rows),
            };
            let expected = spec.slices.get(&f.slice).is_some_and(|s| s.files.is_empty() || s.files.contains(&f.file));
            if !expected {
                next.unexpected.push(note());
                continue;
            }
            if t.ingested().is_some_and(|i| i.at > deadline) {
                if !next.late.iter().any(|l| l.slice == f.slice && l.file == f.file) {
                    next.late.push(note());
                    changes.push(change(names, &self.run, Some(&f.slice), Some(&f.file), Phase::Late, now, &[]));
                }
                continue;
            }
            let status = FileStatus::of(t);
            if status.state == Phase::Complete {
                completion = completion.max(t.last_time());
            }
            let slice = next.slices.get_mut(&f.slice).expect("a slice of the spec");
            slice.missing.retain(|m| *m != f.file);
            slice.files.insert(f.file.clone(), status);
        }

        // Slices, from their files.
        let mut ingest_failures = Vec::new();
        for (name, slice) in &mut next.slices {
            let failed: Vec<_> = slice.files.iter().filter(|(_, f)| f.state == Phase::Failed).collect();
            for (file, f) in &failed {
                ingest_failures.push(format!(
                    "slice {name}, file {file}: ingest failed: {}",
                    f.reason.as_deref().unwrap_or("no reason given")
                ));
            }
            let complete = slice.missing.is_empty()
                && slice.files.len() as u32 >= slice.expected_files
                && slice.files.values().all(|f| f.state == Phase::Complete);
            slice.state = if !failed.is_empty() {
                Phase::Failed
            } else if complete {
                Phase::Complete
            } else {
                Phase::Open
            };
        }

        // The run.
        if next.state == Phase::Open {
            let all_complete = next.slices.values().all(|s| s.state == Phase::Complete);
            if !ingest_failures.is_empty() {
                next.state = Phase::Failed;
                next.failures = ingest_failures;
            } else if all_complete && completion <= deadline {
                next.state = Phase::Complete;
            } else if watermark > deadline {
                next.state = Phase::Failed;
                next.failures = next.deadline_reasons(completion);
            }
            if next.state != Phase::Open {
                next.state_at = Some(now);
            }
        }
        // Slice states freeze with the run: once the run left `open`, a
        // slice keeps the state it had then (failed if it was still open).
        for (name, slice) in &mut next.slices {
            let before = self.slices.get(name).map(|s| s.state).unwrap_or_default();
            if self.state.is_terminal() {
                slice.state = before;
            } else if next.state == Phase::Failed && slice.state == Phase::Open {
                slice.state = Phase::Failed;
            }
        }

        // Changes, innermost first, so the run's change comes last.
        for (name, slice) in &next.slices {
            let before = self.slices.get(name);
            for (file, f) in &slice.files {
                let was = before.and_then(|s| s.files.get(file)).map(|f| f.state);
                if was != Some(f.state) {
                    let reasons: Vec<String> = f.reason.iter().cloned().collect();
                    changes.push(change(names, &self.run, Some(name), Some(file), f.state, now, &reasons));
                }
            }
            if before.map(|s| s.state).unwrap_or_default() != slice.state {
                changes.push(change(names, &self.run, Some(name), None, slice.state, now, &[]));
            }
        }
        if self.state != next.state {
            changes.push(change(names, &self.run, None, None, next.state, now, &next.failures));
        }
        (next, changes)
    }

    /// Every reason a run that is not complete at its deadline fails.
    fn deadline_reasons(&self, completion: Timestamp) -> Vec<String> {
        let deadline = time_fmt::format(self.spec.deadline);
        let mut v = Vec::new();
        for (name, slice) in &self.slices {
            for m in &slice.missing {
                v.push(format!("slice {name}: file {m} never arrived (deadline {deadline})"));
            }
            let arrived = slice.files.len() as u32;
            if self.spec.slices[name].files.is_empty() && arrived < slice.expected_files {
                let ids: Vec<&str> = slice.files.keys().map(String::as_str).collect();
                v.push(format!(
                    "slice {name}: {arrived} of {} expected files arrived ({}) by the deadline {deadline}",
                    slice.expected_files,
                    if ids.is_empty() { "none".to_owned() } else { ids.join(", ") }
                ));
            }
            for (file, f) in &slice.files {
                for s in f.shortfall() {
                    v.push(format!("slice {name}, file {file}: {s}"));
                }
            }
        }
        if v.is_empty() {
            v.push(format!("the run completed at {}, after its deadline {deadline}", time_fmt::format(completion)));
        }
        v
    }
}
