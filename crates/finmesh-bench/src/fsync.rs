//! The disk's fsync ceiling: append 4 KiB to a file and `sync_data` it, in a
//! loop, on the same disk as the engines' data.
//!
//! This bounds what any engine can ack with `sync = always` from one
//! writer: at most one fsync round per ack round. Group commit lets many
//! concurrent publishers share one fsync, which is what the ratio
//! `embedded always 16-pub / (16 × fsync/s)` reports.

use std::io::Write as _;
use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::Context as _;

use super::measure::{Measurement, Sample, Window};

/// Id of the fsync measurement (ratios refer to it).
pub const ID: &str = "disk.fsync.4k";

/// Measure appends + fsyncs in a temporary file under `dir` for `duration`.
pub async fn run(dir: &Path, duration: Duration) -> anyhow::Result<Vec<Measurement>> {
    let dir = dir.to_path_buf();
    let sample =
        tokio::task::spawn_blocking(move || append_and_sync(&dir, duration)).await.context("fsync task panicked")??;
    Ok(vec![
        Measurement::rate(ID, "disk", "append 4 KiB + sync_data, one thread", "fsyncs/s", &sample)
            .note("the ceiling for acks that wait for their own fsync"),
    ])
}

fn append_and_sync(dir: &Path, duration: Duration) -> anyhow::Result<Sample> {
    let mut file = tempfile::Builder::new()
        .prefix("fsync-")
        .tempfile_in(dir)
        .with_context(|| format!("creating a file in {}", dir.display()))?;
    let block = [0x5au8; 4096];
    let mut sample = Sample::new();
    let window = Window::after_warmup(duration);
    loop {
        let started = Instant::now();
        if !window.keep_going(started, sample.msgs > 0) {
            break;
        }
        file.write_all(&block).context("appending 4 KiB")?;
        file.as_file().sync_data().context("sync_data")?;
        if window.counts(started) {
            sample.record(started.elapsed());
            sample.msgs += 1;
        }
    }
    sample.elapsed = window.elapsed();
    Ok(sample)
}
