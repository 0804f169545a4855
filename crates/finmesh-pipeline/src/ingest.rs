//! The ingest driver: a [`RowReader`] drained in batches into a publisher,
//! with progress and a final [`IngestReport`].
//!
//! Owns batching (a batch holds at most [`IngestOptions::batch_rows`] rows;
//! records and exceptions of the same rows travel together so a publisher
//! can publish both before asking for more), the progress callback (every
//! [`IngestOptions::progress_every`] rows and once at the end) and the
//! report's figures.
//!
//! Reading is blocking `std::io::Read`; an async publisher runs [`ingest`]
//! on a blocking thread (`tokio::task::spawn_blocking`) with a sink that
//! sends each batch into a bounded channel (`blocking_send`), so a slow
//! publisher slows the reader instead of filling memory.
//!
//! Invariants: the report's `rows == records + exceptions`; a batch handed
//! to the sink is never empty; when the sink fails, ingest stops at once
//! and says which batch failed; when the file fails, the report of what was
//! read before travels with the error.

use std::fmt;
use std::io::Read;
use std::time::{Duration, Instant};

use crate::reader::{Batch, FileError, Progress, RowReader};

/// How [`ingest`] batches and reports.
#[derive(Debug, Clone)]
pub struct IngestOptions {
    /// Rows per batch handed to the sink, and most rows per record message
    /// ([`crate::flow`]; capped at [`crate::rowset::MAX_MESSAGE_ROWS`]).
    /// Default 1,000.
    pub batch_rows: usize,
    /// Rows between progress callbacks. Default 10,000.
    pub progress_every: u64,
    /// Payload bytes a record message is filled to at most (a row larger on
    /// its own travels alone): keep it under the engine's max message size
    /// (NATS' default `max_payload` is 1 MiB). Default 512 KiB.
    pub message_bytes: usize,
}

/// [`IngestOptions::message_bytes`]'s default.
pub const DEFAULT_MESSAGE_BYTES: usize = 512 * 1024;

impl Default for IngestOptions {
    fn default() -> Self {
        IngestOptions { batch_rows: 1000, progress_every: 10_000, message_bytes: DEFAULT_MESSAGE_BYTES }
    }
}

/// What one file's ingest did.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct IngestReport {
    /// Data rows read (header and empty lines not counted).
    pub rows: u64,
    /// Rows that became records.
    pub records: u64,
    /// Rows that became exceptions.
    pub exceptions: u64,
    /// Input bytes read.
    pub bytes: u64,
    /// Wall time of the `ingest` call (the header was read before it).
    #[serde(rename = "elapsed_s", serialize_with = "secs")]
    pub elapsed: Duration,
    /// `rows / elapsed`.
    pub rows_per_s: f64,
}

fn secs<S: serde::Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_f64(d.as_secs_f64())
}

impl IngestReport {
    /// The report for `progress` after `elapsed`.
    pub fn new(progress: Progress, elapsed: Duration) -> Self {
        let secs = elapsed.as_secs_f64();
        let rows_per_s = if secs > 0.0 { progress.rows as f64 / secs } else { 0.0 };
        IngestReport {
            rows: progress.rows,
            records: progress.records,
            exceptions: progress.exceptions,
            bytes: progress.bytes,
            elapsed,
            rows_per_s,
        }
    }

    /// One JSON object (for `--json`).
    pub fn to_json(&self) -> String {
        serde_json::to_string(self).expect("a report always serialises")
    }
}

/// The human summary, e.g. `1,000 rows: 990 records, 10 exceptions; 131.1 KB in 0.02 s (50,000 rows/s, 6.6 MB/s)`.
impl fmt::Display for IngestReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let secs = self.elapsed.as_secs_f64();
        let mb_s = if secs > 0.0 { self.bytes as f64 / secs / 1e6 } else { 0.0 };
        write!(
            f,
            "{} rows: {} records, {} exceptions; {} in {:.2} s ({} rows/s, {:.1} MB/s)",
            thousands(self.rows),
            thousands(self.records),
            thousands(self.exceptions),
            human_bytes(self.bytes),
            secs,
            thousands(self.rows_per_s.round() as u64),
            mb_s,
        )
    }
}

fn thousands(n: u64) -> String {
    let s = n.to_string();
    let mut out = String::with_capacity(s.len() + s.len() / 3);
    for (i, c) in s.chars().enumerate() {
        if i > 0 && (s.len() - i).is_multiple_of(3) {
            out.push(',');
        }
        out.push(c);
    }
    out
}

fn human_bytes(n: u64) -> String {
    match n {
        n if n >= 1_000_000_000 => format!("{:.1} GB", n as f64 / 1e9),
        n if n >= 1_000_000 => format!("{:.1} MB", n as f64 / 1e6),
        n if n >= 1_000 => format!("{:.1} KB", n as f64 / 1e3),
        n => format!("{n} B"),
    }
}

/// Why [`ingest`] stopped early.
#[derive(Debug, thiserror::Error)]
pub enum IngestError<E> {
    /// The file cannot be read further; `report` counts what was read.
    #[error("{error} ({report})")]
    File { error: FileError, report: IngestReport },
    /// The sink refused a batch; `report` counts the rows before that batch
    /// too (the refused batch's rows are counted as read).
    #[error("publishing a batch failed: {error}")]
    Sink { error: E, report: IngestReport },
}

/// Drains `reader` in batches of `opts.batch_rows` rows into `sink`,
/// calling `on_progress` every `opts.progress_every` rows and once at the
/// end. The sink receives each batch by value (its records' `avro` share
/// buffers; cloning a record is cheap).
pub fn ingest<R, E>(
    mut reader: RowReader<R>,
    opts: &IngestOptions,
    mut sink: impl FnMut(Batch) -> Result<(), E>,
    mut on_progress: impl FnMut(&Progress),
) -> Result<IngestReport, IngestError<E>>
where
    R: Read,
{
    let start = Instant::now();
    let batch_rows = opts.batch_rows.max(1);
    let every = opts.progress_every.max(1);
    let mut next_progress = every;
    loop {
        let mut batch = Batch { records: Vec::with_capacity(batch_rows.min(4096)), exceptions: Vec::new() };
        let more = match reader.next_batch(batch_rows, &mut batch) {
            Ok(more) => more,
            Err(error) => {
                // Rows read before the error are still published.
                let progress = reader.progress();
                if !batch.is_empty()
                    && let Err(e) = sink(batch)
                {
                    return Err(IngestError::Sink { error: e, report: IngestReport::new(progress, start.elapsed()) });
                }
                on_progress(&progress);
                return Err(IngestError::File { error, report: IngestReport::new(progress, start.elapsed()) });
            }
        };
        if !batch.is_empty() {
            sink(batch).map_err(|error| IngestError::Sink {
                error,
                report: IngestReport::new(reader.progress(), start.elapsed()),
            })?;
        }
        let progress = reader.progress();
        if progress.rows >= next_progress {
            on_progress(&progress);
            next_progress = (progress.rows / every + 1) * every;
        }
        if !more {
            on_progress(&progress);
            return Ok(IngestReport::new(progress, start.elapsed()));
        }
    }
}

/// An indicatif progress bar fed by [`ingest`]'s progress callback: bytes
/// read out of `total_bytes` (or a spinner when unknown), rows/s in the
/// message.
#[cfg(feature = "indicatif")]
pub fn progress_bar(total_bytes: Option<u64>) -> (indicatif::ProgressBar, impl FnMut(&Progress)) {
    use indicatif::{ProgressBar, ProgressStyle};
    let bar = match total_bytes {
        Some(n) => ProgressBar::new(n).with_style(
            ProgressStyle::with_template("{bar:40} {binary_bytes}/{binary_total_bytes} {msg}").expect("valid template"),
        ),
        None => ProgressBar::new_spinner()
            .with_style(ProgressStyle::with_template("{spinner} {binary_bytes} {msg}").expect("valid template")),
    };
    let handle = bar.clone();
    let start = Instant::now();
    let hook = move |p: &Progress| {
        let secs = start.elapsed().as_secs_f64().max(1e-9);
        handle.set_position(p.bytes);
        handle.set_message(format!(
            "{} rows ({} exceptions), {} rows/s",
            thousands(p.rows),
            thousands(p.exceptions),
            thousands((p.rows as f64 / secs) as u64)
        ));
    };
    (bar, hook)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn summary_reads_well_and_json_has_every_figure() {
        let r = IngestReport::new(
            Progress { rows: 1_234_567, records: 1_234_000, exceptions: 567, bytes: 150_000_000 },
            Duration::from_secs(2),
        );
        assert_eq!(
            r.to_string(),
            "1,234,567 rows: 1,234,000 records, 567 exceptions; 150.0 MB in 2.00 s (617,284 rows/s, 75.0 MB/s)"
        );
        let v: serde_json::Value = serde_json::from_str(&r.to_json()).unwrap();
        assert_eq!(v["rows"], 1_234_567);
        assert_eq!(v["records"], 1_234_000);
        assert_eq!(v["exceptions"], 567);
        assert_eq!(v["bytes"], 150_000_000);
        assert_eq!(v["elapsed_s"], 2.0);
        assert_eq!(v["rows_per_s"], 617_283.5);
        assert_eq!(thousands(0), "0");
        assert_eq!(thousands(999), "999");
        assert_eq!(thousands(1000), "1,000");
    }

    #[cfg(feature = "indicatif")]
    #[test]
    fn progress_bar_follows_the_hook() {
        let (bar, mut hook) = progress_bar(Some(1000));
        hook(&Progress { rows: 10, records: 9, exceptions: 1, bytes: 400 });
        assert_eq!(bar.position(), 400);
        assert!(bar.message().starts_with("10 rows (1 exceptions), "), "{}", bar.message());
    }
}
