//! What one benchmark measurement is, and the loops that take them.
//!
//! - [`Measurement`]: one figure (a rate, a latency, or a memory size) with
//!   optional latency percentiles, named by a stable `id` that ratios and JSON refer to.
//! - [`closed_loop`]: `tasks` tasks each awaiting one operation at a time,
//!   for a warm-up then a measured window; every operation's latency goes
//!   into an HDR histogram (nanoseconds, 3 significant digits).
//! - [`vm_rss_bytes`]: the process's resident set, from `/proc/<pid>/status`.
//!
//! Rates count *messages* (an operation may carry many, e.g. a batch of 100),
//! over the measured window only; latencies are per operation.

use std::future::Future;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context as _;
use hdrhistogram::Histogram;
use serde::{Deserialize, Serialize};

/// One figure of a benchmark run.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Measurement {
    /// Stable name, e.g. `embedded.publish.always.16-pub`.
    pub id: String,
    /// Who was measured: `disk`, `finmesh-embedded`, `nats-server`.
    pub peer: String,
    /// What was done, for humans.
    pub what: String,
    /// The figure: a rate per second, or a size in MiB (see `unit`).
    pub value: f64,
    /// Unit of `value`: `msgs/s`, `fsyncs/s`, `gets/s`, `MiB`, …
    pub unit: String,
    /// Median latency of one operation, in microseconds.
    pub p50_us: Option<f64>,
    /// 99th percentile latency, µs.
    pub p99_us: Option<f64>,
    /// 99.9th percentile latency, µs.
    pub p999_us: Option<f64>,
    /// Highest latency, µs (latency figures only).
    #[serde(default)]
    pub max_us: Option<f64>,
    /// Anything a reader needs to interpret the figure.
    pub note: Option<String>,
}

impl Measurement {
    /// A rate measured with `sample`, with its latency percentiles.
    pub fn rate(id: &str, peer: &str, what: &str, unit: &str, sample: &Sample) -> Measurement {
        Measurement {
            id: id.to_owned(),
            peer: peer.to_owned(),
            what: what.to_owned(),
            value: sample.rate(),
            unit: unit.to_owned(),
            p50_us: sample.percentile_us(50.0),
            p99_us: sample.percentile_us(99.0),
            p999_us: sample.percentile_us(99.9),
            max_us: None,
            note: None,
        }
    }

    /// A latency figure: its value is the p99 in µs, with p50, p99.9 and max.
    pub fn latency(id: &str, peer: &str, what: &str, sample: &Sample) -> Measurement {
        let p99 = sample.percentile_us(99.0);
        Measurement {
            id: id.to_owned(),
            peer: peer.to_owned(),
            what: what.to_owned(),
            value: p99.unwrap_or(0.0),
            unit: "µs p99".to_owned(),
            p50_us: sample.percentile_us(50.0),
            p99_us: p99,
            p999_us: sample.percentile_us(99.9),
            max_us: (!sample.hist.is_empty()).then(|| sample.hist.max() as f64 / 1000.0),
            note: None,
        }
    }

    /// A size in MiB.
    pub fn mib(id: &str, peer: &str, what: &str, bytes: u64) -> Measurement {
        Measurement {
            id: id.to_owned(),
            peer: peer.to_owned(),
            what: what.to_owned(),
            value: bytes as f64 / (1024.0 * 1024.0),
            unit: "MiB".to_owned(),
            p50_us: None,
            p99_us: None,
            p999_us: None,
            max_us: None,
            note: None,
        }
    }

    /// Attach a note.
    pub fn note(mut self, note: impl Into<String>) -> Measurement {
        self.note = Some(note.into());
        self
    }
}

/// Messages done in a measured window, and per-operation latencies.
#[derive(Debug, Clone)]
pub struct Sample {
    /// Messages completed in the window.
    pub msgs: u64,
    /// Length of the window.
    pub elapsed: Duration,
    /// Latency of each operation, in nanoseconds.
    pub hist: Histogram<u64>,
}

impl Sample {
    /// An empty sample.
    pub fn new() -> Sample {
        Sample { msgs: 0, elapsed: Duration::ZERO, hist: new_histogram() }
    }

    /// Record one operation that took `latency`.
    pub fn record(&mut self, latency: Duration) {
        self.hist.saturating_record(latency.as_nanos().min(u64::MAX as u128) as u64);
    }

    /// Messages per second.
    pub fn rate(&self) -> f64 {
        if self.elapsed.is_zero() { 0.0 } else { self.msgs as f64 / self.elapsed.as_secs_f64() }
    }

    /// A latency percentile in µs; `None` if nothing was recorded.
    pub fn percentile_us(&self, q: f64) -> Option<f64> {
        (!self.hist.is_empty()).then(|| self.hist.value_at_quantile(q / 100.0) as f64 / 1000.0)
    }
}

impl Default for Sample {
    fn default() -> Self {
        Sample::new()
    }
}

/// A histogram for latencies from 1 ns to 60 s, 3 significant digits.
pub fn new_histogram() -> Histogram<u64> {
    Histogram::new_with_bounds(1, 60_000_000_000, 3).expect("valid histogram bounds")
}

/// Warm-up before a measured window: a quarter of it, at most 500 ms.
pub fn warmup_for(duration: Duration) -> Duration {
    (duration / 4).min(Duration::from_millis(500))
}

/// A measured window after a warm-up: operations that start inside it are
/// counted. A loop keeps starting operations until the window has ended
/// *and* it has counted at least one: on a loaded machine a single operation
/// (an fsync stalled behind other I/O) can outlast warm-up and window
/// together, and a window with nothing in it would report a rate of 0.
#[derive(Debug, Clone, Copy)]
pub struct Window {
    /// Operations that start at or after this are counted.
    pub measure_from: Instant,
    /// No operation starts after this, once one was counted.
    pub end: Instant,
    duration: Duration,
}

impl Window {
    /// A window of `duration` starting after [`warmup_for`]`(duration)` from now.
    pub fn after_warmup(duration: Duration) -> Window {
        let measure_from = Instant::now() + warmup_for(duration);
        Window { measure_from, end: measure_from + duration, duration }
    }

    /// Should an operation starting at `started` run, given whether this
    /// loop has `counted` one yet?
    pub fn keep_going(&self, started: Instant, counted: bool) -> bool {
        started < self.end || !counted
    }

    /// Is an operation that started at `started` inside the window?
    pub fn counts(&self, started: Instant) -> bool {
        started >= self.measure_from
    }

    /// The window's length as measured now: from its start until now, at
    /// least its nominal duration (operations started before `end` may
    /// finish a little after it).
    pub fn elapsed(&self) -> Duration {
        Instant::now().saturating_duration_since(self.measure_from).max(self.duration)
    }
}

/// Run `tasks` concurrent tasks, each calling `op(state, i)` and awaiting it
/// before the next call, for a warm-up and then `duration`. Each task gets
/// its own `state(task)` behind its own `Arc`, so the per-call clone touches
/// a counter no other core uses (a shared handle cloned per call made the
/// cores fight over one cache line and showed up as engine latency). `op`
/// returns the number of messages the operation completed. Only the
/// measured window counts; an error in any task aborts the measurement.
pub async fn closed_loop<S, M, F, Fut>(tasks: usize, duration: Duration, state: M, op: F) -> anyhow::Result<Sample>
where
    S: Send + Sync + 'static,
    M: Fn(usize) -> S,
    F: Fn(Arc<S>, u64) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = anyhow::Result<u64>> + Send,
{
    let op = Arc::new(op);
    let window = Window::after_warmup(duration);
    let mut handles = Vec::with_capacity(tasks);
    for task in 0..tasks {
        let op = op.clone();
        let state = Arc::new(state(task));
        handles.push(tokio::spawn(async move {
            let mut sample = Sample::new();
            let mut i = 0u64;
            loop {
                let started = Instant::now();
                if !window.keep_going(started, !sample.hist.is_empty()) {
                    break;
                }
                let msgs = op(state.clone(), i).await?;
                i += 1;
                if window.counts(started) {
                    sample.record(started.elapsed());
                    sample.msgs += msgs;
                }
            }
            anyhow::Ok(sample)
        }));
    }
    let mut total = Sample::new();
    for h in handles {
        let s = h.await.context("benchmark task panicked")??;
        total.msgs += s.msgs;
        total.hist.add(&s.hist).context("merging histograms")?;
    }
    total.elapsed = window.elapsed();
    Ok(total)
}

/// The resident set size of process `pid` (`self` for this one), in bytes.
pub fn vm_rss_bytes(pid: &str) -> anyhow::Result<u64> {
    let path = format!("/proc/{pid}/status");
    let status = std::fs::read_to_string(&path).with_context(|| format!("reading {path}"))?;
    parse_vm_rss(&status).with_context(|| format!("no VmRSS line in {path}"))
}

fn parse_vm_rss(status: &str) -> Option<u64> {
    let line = status.lines().find(|l| l.starts_with("VmRSS:"))?;
    let kb: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb * 1024)
}

/// A fast deterministic pseudo-random sequence (splitmix64) for picking keys;
/// good enough to defeat caching patterns, no dependency needed.
#[derive(Debug, Clone)]
pub struct KeyPicker(u64);

impl KeyPicker {
    /// A sequence seeded with `seed`.
    pub fn new(seed: u64) -> KeyPicker {
        KeyPicker(seed)
    }

    /// The next index in `0..n`.
    pub fn next_below(&mut self, n: u64) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        (z ^ (z >> 31)) % n
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_vm_rss() {
        let status = "Name:\tfinmesh\nVmPeak:\t  100 kB\nVmRSS:\t   2048 kB\nThreads: 3\n";
        assert_eq!(parse_vm_rss(status), Some(2048 * 1024));
        assert_eq!(parse_vm_rss("Name: x\n"), None);
        assert!(vm_rss_bytes("self").unwrap() > 0);
    }

    /// Every operation outlasts warm-up and window together (as one stalled
    /// fsync can on a loaded machine): the window still counts one.
    #[tokio::test]
    async fn a_window_counts_at_least_one_operation() {
        let window = Duration::from_millis(40);
        let slow = window * 3;
        let sample = closed_loop(
            2,
            window,
            |_| (),
            move |_, _| async move {
                tokio::time::sleep(slow).await;
                Ok(1)
            },
        )
        .await
        .unwrap();
        assert_eq!(sample.msgs, 2, "one per task");
        assert!(sample.rate() > 0.0);
        assert!(sample.elapsed >= slow, "{:?}", sample.elapsed);
        assert!(sample.percentile_us(50.0).unwrap() >= slow.as_micros() as f64 * 0.99);
    }

    #[test]
    fn sample_rate_and_percentiles() {
        let mut s = Sample::new();
        assert_eq!(s.percentile_us(50.0), None);
        for us in 1..=100u64 {
            s.record(Duration::from_micros(us));
        }
        s.msgs = 500;
        s.elapsed = Duration::from_millis(250);
        assert_eq!(s.rate(), 2000.0);
        let p50 = s.percentile_us(50.0).unwrap();
        assert!((49.9..=50.1).contains(&p50), "{p50}");
        assert!(s.percentile_us(99.0).unwrap() >= 98.9);
    }

    #[tokio::test]
    async fn closed_loop_counts_messages_in_the_window_only() {
        let calls = Arc::new(std::sync::atomic::AtomicU64::new(0));
        let c = calls.clone();
        let s = closed_loop(
            2,
            Duration::from_millis(200),
            move |_| c.clone(),
            |c, _| async move {
                c.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                tokio::time::sleep(Duration::from_millis(1)).await;
                Ok(10)
            },
        )
        .await
        .unwrap();
        assert!(s.msgs > 0 && s.msgs % 10 == 0);
        // Warm-up calls are not counted.
        assert!(s.msgs / 10 < calls.load(std::sync::atomic::Ordering::Relaxed));
        assert_eq!(s.hist.len(), s.msgs / 10);
        assert!(s.percentile_us(50.0).unwrap() >= 1000.0);
    }

    #[test]
    fn key_picker_stays_in_range_and_spreads() {
        let mut p = KeyPicker::new(7);
        let picks: Vec<u64> = (0..1000).map(|_| p.next_below(10)).collect();
        assert!(picks.iter().all(|&k| k < 10));
        assert!((0..10).all(|k| picks.contains(&k)));
    }
}
