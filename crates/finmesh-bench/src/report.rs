//! The benchmark report: medians over runs, ratios, a table and JSON.
//!
//! A figure's median is taken per field over the runs that produced it
//! (value, p50, p99, p99.9 each on their own). A ratio is computed inside
//! each run, where both of its figures were measured side by side, and the
//! median of those per-run ratios is reported: machine drift between runs
//! then cancels out.

use std::fmt::Write as _;
use std::path::Path;

use serde::Serialize;

use super::measure::Measurement;
use super::{
    BenchArgs, KV_VALUE, PUBLISH_PAYLOAD, embedded_kv, embedded_publish, fanout, fsync, gateway, gateway_secure,
    kv_scale, kv_scale_nats, nats_engine, nats_kv, nats_publish, pipeline, tls_conn,
};

/// The machine the figures come from.
#[derive(Debug, Clone, Serialize)]
pub struct Machine {
    /// Logical CPUs available to this process.
    pub cores: usize,
    /// CPU model, from /proc/cpuinfo.
    pub cpu: Option<String>,
    /// Kernel release.
    pub kernel: Option<String>,
    /// Parent directory of the benchmark's data.
    pub data_dir: String,
    /// Is the data directory on the same filesystem as the working directory?
    pub data_dir_same_fs_as_cwd: Option<bool>,
    /// `nats-server --version`, if one is found.
    pub nats_server: Option<String>,
}

impl Machine {
    /// Read what can be read about this machine.
    pub fn probe(data_dir: &Path, same_fs: Option<bool>) -> Machine {
        let cpu = std::fs::read_to_string("/proc/cpuinfo").ok().and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("model name"))
                .and_then(|l| l.split(':').nth(1))
                .map(|m| m.trim().to_owned())
        });
        let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease").ok().map(|s| s.trim().to_owned());
        let nats_server =
            finmesh_testkit::binary::find_binary("nats-server", None, finmesh_testkit::binary::NATS_SERVER_ENV, "")
                .ok()
                .and_then(|bin| std::process::Command::new(bin).arg("--version").output().ok())
                .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_owned());
        Machine {
            cores: std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1),
            cpu,
            kernel,
            data_dir: data_dir.display().to_string(),
            data_dir_same_fs_as_cwd: same_fs,
            nats_server,
        }
    }
}

/// One figure over all runs.
#[derive(Debug, Clone, Serialize)]
pub struct Aggregate {
    /// Stable id.
    pub id: String,
    /// Who was measured.
    pub peer: String,
    /// What was done.
    pub what: String,
    /// Unit of the values.
    pub unit: String,
    /// Median over runs.
    pub median: f64,
    /// Lowest run.
    pub min: f64,
    /// Highest run.
    pub max: f64,
    /// Every run's value, in run order.
    pub per_run: Vec<f64>,
    /// Median over runs of the per-run p50 (µs).
    pub p50_us: Option<f64>,
    /// Median over runs of the per-run p99 (µs).
    pub p99_us: Option<f64>,
    /// Median over runs of the per-run p99.9 (µs).
    pub p999_us: Option<f64>,
    /// Highest per-run max latency (µs), for latency figures.
    pub max_us: Option<f64>,
    /// The first run's note.
    pub note: Option<String>,
}

/// A ratio between two figures of the same run.
#[derive(Debug, Clone, Serialize)]
pub struct Ratio {
    /// Stable id.
    pub id: String,
    /// How it is computed, for humans.
    pub label: String,
    /// Median of the per-run ratios.
    pub median: f64,
    /// Every run's ratio.
    pub per_run: Vec<f64>,
}

/// Which field of a figure a ratio divides.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Field {
    /// The rate (or size).
    Value,
    /// The p99 latency.
    P99,
}

impl Field {
    fn of(self, m: &Measurement) -> Option<f64> {
        match self {
            Field::Value => Some(m.value),
            Field::P99 => m.p99_us,
        }
    }
}

/// Ratios of the gateway scenarios: (id, label, numerator, denominator, field).
fn gateway_ratios() -> Vec<(&'static str, &'static str, &'static str, &'static str, Field)> {
    use gateway::*;
    vec![
        (
            "gateway-kv-vs-nginx-http",
            "gateway KV GET / nginx static, req/s, HTTP (target ≥ 0.80)",
            KV_HTTP,
            NGINX_HTTP,
            Field::Value,
        ),
        (
            "gateway-kv-p99-vs-nginx-http",
            "gateway KV GET p99 / nginx p99, HTTP (target ≤ 1)",
            KV_HTTP,
            NGINX_HTTP,
            Field::P99,
        ),
        (
            "gateway-kv-vs-nginx-https",
            "gateway KV GET / nginx static, req/s, HTTPS (target ≥ 0.80)",
            KV_HTTPS,
            NGINX_HTTPS,
            Field::Value,
        ),
        (
            "gateway-kv-p99-vs-nginx-https",
            "gateway KV GET p99 / nginx p99, HTTPS (target ≤ 1)",
            KV_HTTPS,
            NGINX_HTTPS,
            Field::P99,
        ),
        (
            "gateway-kv-encrypted-vs-plain",
            "gateway KV GET encrypted + hashed bucket / plain bucket, req/s, same node (target ≥ 0.90)",
            gateway_secure::SECURE,
            gateway_secure::PLAIN,
            Field::Value,
        ),
        (
            "gateway-nats-kv-vs-async-nats",
            "gateway KV GET on NATS / async-nats KV get, 64 concurrent",
            NATS_KV_HTTP,
            NATS_KV_DIRECT,
            Field::Value,
        ),
        (
            "gateway-publish-vs-in-process",
            "gateway NDJSON publish / in-process publish_batch, 4 clients, sync = always",
            PUBLISH_HTTP,
            PUBLISH_IN_PROCESS,
            Field::Value,
        ),
        (
            "gateway-publish-vs-in-process-interval",
            "gateway NDJSON publish / in-process publish_batch, 4 clients, sync = interval",
            PUBLISH_HTTP_INTERVAL,
            PUBLISH_IN_PROCESS_INTERVAL,
            Field::Value,
        ),
        (
            "kv-scale-random-vs-single",
            "KV GET random keys / one key, req/s, same node and session (target ≥ 0.80)",
            kv_scale::RANDOM,
            kv_scale::SINGLE,
            Field::Value,
        ),
        (
            "kv-scale-nats-random-vs-single",
            "KV GET on the NATS engine, random keys / one key, req/s, same node and session (target ≥ 0.80)",
            kv_scale_nats::RANDOM,
            kv_scale_nats::SINGLE,
            Field::Value,
        ),
        (
            "gateway-tls-conns-vs-nginx",
            "gateway new TLS conns/s / nginx",
            tls_conn::GATEWAY,
            tls_conn::NGINX,
            Field::Value,
        ),
        (
            "gateway-tls-handshake-p99-vs-nginx",
            "gateway TLS handshake p99 / nginx",
            tls_conn::GATEWAY,
            tls_conn::NGINX,
            Field::P99,
        ),
    ]
}

/// (id, label, numerator, denominator, factor, field): ratio = numerator / (factor × denominator).
fn ratio_definitions() -> Vec<(String, String, String, String, f64, Field)> {
    let mut all: Vec<_> = engine_ratios()
        .into_iter()
        .map(|(id, l, n, d, f)| (id.to_owned(), l.to_owned(), n, d, f, Field::Value))
        .collect();
    all.extend(
        gateway_ratios()
            .into_iter()
            .map(|(id, l, n, d, field)| (id.to_owned(), l.to_owned(), n.to_owned(), d.to_owned(), 1.0, field)),
    );
    // Fan-out next to core NATS (issue 19 targets).
    for (id, label, n, d) in [
        (
            "fanout-max-vs-nats-core",
            "finmesh SSE / core NATS, highest deliveries/s with p99 < 50 ms (target ≥ 1.5)",
            fanout::MAX_FINMESH,
            fanout::MAX_NATS,
        ),
        (
            "fanout-p99-vs-nats-core",
            "finmesh SSE p99 (sync = interval) / core NATS p99 at 1,000 ticks/s × 60",
            fanout::LATENCY_INTERVAL,
            fanout::NATS_LATENCY,
        ),
        (
            "fanout-skew-p99-vs-nats-core",
            "finmesh SSE skew p99 (sync = interval) / core NATS skew p99",
            fanout::SKEW_INTERVAL,
            fanout::NATS_SKEW,
        ),
    ] {
        all.push((id.to_owned(), label.to_owned(), n.to_owned(), d.to_owned(), 1.0, Field::Value));
    }
    // The pipeline's share of the raw csv parse ceiling (issue 20: ≥ 0.20).
    for (engine, label) in [("embedded", "embedded, sync = always"), ("nats-r3", "3-node NATS, R3")] {
        all.push((
            format!("pipeline-{engine}-vs-csv"),
            format!("pipeline end to end ({label}) / csv crate alone, rows/s (target ≥ 0.20)"),
            pipeline::id(engine, "end-to-end"),
            pipeline::CEILING.to_owned(),
            1.0,
            Field::Value,
        ));
    }
    // The NATS engine over raw async-nats: throughput (target ≥ 0.85) and
    // p99 (target ≤ 1.20), for every operation and deployment.
    for (engine, raw) in nats_engine::ratio_pairs() {
        let op = engine.trim_start_matches("nats-engine.").to_owned();
        for (field, what) in [(Field::Value, "throughput"), (Field::P99, "p99")] {
            let id = format!("nats-engine-vs-raw.{op}.{what}");
            let label = format!("NATS engine / raw async-nats {what}, {op}");
            all.push((id, label, engine.clone(), raw.clone(), 1.0, field));
        }
    }
    all
}

/// (id, label, numerator, denominator, factor) of the engine scenarios.
fn engine_ratios() -> Vec<(&'static str, &'static str, String, String, f64)> {
    let fsync = fsync::ID.to_owned();
    let ep = embedded_publish::id;
    vec![
        ("group-commit", "embedded always 16-pub / (16 × fsync/s)", ep("always", "16-pub"), fsync.clone(), 16.0),
        (
            "batch-vs-nats-async",
            "embedded interval batch-100 / NATS async publish",
            ep("interval", "batch-100"),
            nats_publish::ASYNC.to_owned(),
            1.0,
        ),
        ("always-1-pub-vs-fsync", "embedded always 1-pub / fsync/s", ep("always", "1-pub"), fsync, 1.0),
        (
            "interval-1-pub-vs-nats",
            "embedded interval 1-pub / NATS 1-pub",
            ep("interval", "1-pub"),
            nats_publish::ACK_EACH.to_owned(),
            1.0,
        ),
        (
            "interval-16-pub-vs-nats",
            "embedded interval 16-pub / NATS 16-pub",
            ep("interval", "16-pub"),
            nats_publish::CONCURRENT.to_owned(),
            1.0,
        ),
        (
            "always-16-pub-vs-nats-always",
            "embedded always 16-pub / NATS sync_interval:always 16-pub",
            ep("always", "16-pub"),
            nats_publish::ALWAYS_CONCURRENT.to_owned(),
            1.0,
        ),
        (
            "kv-get-vs-nats",
            "embedded KV get 1 task / NATS KV get 1 connection",
            embedded_kv::GET_1.to_owned(),
            nats_kv::GET_1.to_owned(),
            1.0,
        ),
    ]
}

/// The whole report.
#[derive(Debug, Clone, Serialize)]
pub struct Report {
    /// Where it was measured.
    pub machine: Machine,
    /// Seconds since the epoch when the report was made.
    pub finished_unix: u64,
    /// Runs made.
    pub runs: u32,
    /// Measured window per figure, seconds.
    pub duration_secs: f64,
    /// Bytes per published message.
    pub publish_payload_bytes: usize,
    /// Bytes per KV value.
    pub kv_value_bytes: usize,
    /// Keys loaded into the embedded KV bucket.
    pub kv_keys: u64,
    /// Keys loaded into the NATS KV bucket.
    pub nats_kv_keys: u64,
    /// Puts timed by the mirror propagation scenario.
    pub mirror_puts: u64,
    /// Messages in the sparse consumer scenario's stream.
    pub consumer_messages: u64,
    /// Scenario families run.
    pub scenarios: Vec<&'static str>,
    /// Every figure, medians over runs.
    pub results: Vec<Aggregate>,
    /// Ratios whose two figures were measured.
    pub ratios: Vec<Ratio>,
}

impl Report {
    /// Aggregate `runs` (one list of measurements per run).
    pub fn new(
        machine: Machine,
        args: &BenchArgs,
        scenarios: Vec<&'static str>,
        runs: Vec<Vec<Measurement>>,
    ) -> Report {
        let mut ids: Vec<&str> = Vec::new();
        for m in runs.iter().flatten() {
            if !ids.contains(&m.id.as_str()) {
                ids.push(&m.id);
            }
        }
        let results = ids
            .iter()
            .map(|id| {
                let ms: Vec<&Measurement> = runs.iter().flatten().filter(|m| m.id == *id).collect();
                let values: Vec<f64> = ms.iter().map(|m| m.value).collect();
                let pick =
                    |f: fn(&Measurement) -> Option<f64>| median(&ms.iter().filter_map(|m| f(m)).collect::<Vec<_>>());
                Aggregate {
                    id: id.to_string(),
                    peer: ms[0].peer.clone(),
                    what: ms[0].what.clone(),
                    unit: ms[0].unit.clone(),
                    median: median(&values).unwrap_or(0.0),
                    min: values.iter().copied().fold(f64::INFINITY, f64::min),
                    max: values.iter().copied().fold(f64::NEG_INFINITY, f64::max),
                    per_run: values,
                    p50_us: pick(|m| m.p50_us),
                    p99_us: pick(|m| m.p99_us),
                    p999_us: pick(|m| m.p999_us),
                    max_us: ms.iter().filter_map(|m| m.max_us).reduce(f64::max),
                    note: ms[0].note.clone(),
                }
            })
            .collect();
        let ratios = ratio_definitions()
            .into_iter()
            .filter_map(|(id, label, num, den, factor, field)| {
                let per_run: Vec<f64> = runs
                    .iter()
                    .filter_map(|run| {
                        let n = field.of(run.iter().find(|m| m.id == num)?)?;
                        let d = field.of(run.iter().find(|m| m.id == den)?)?;
                        (d > 0.0).then(|| n / (factor * d))
                    })
                    .collect();
                Some(Ratio { id, label, median: median(&per_run)?, per_run })
            })
            .collect();
        Report {
            machine,
            finished_unix: std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_secs())
                .unwrap_or(0),
            runs: args.runs,
            duration_secs: args.duration_secs,
            publish_payload_bytes: PUBLISH_PAYLOAD,
            kv_value_bytes: KV_VALUE,
            kv_keys: args.kv_keys,
            nats_kv_keys: args.nats_kv_keys,
            mirror_puts: args.mirror_puts,
            consumer_messages: args.consumer_messages,
            scenarios,
            results,
            ratios,
        }
    }

    /// The report as a plain-text table.
    pub fn table(&self) -> String {
        let mut s = String::new();
        let m = &self.machine;
        let _ = writeln!(
            s,
            "finmesh-bench: {} run(s), median [min-max]; {} s windows; {} B messages, {} B KV values",
            self.runs, self.duration_secs, self.publish_payload_bytes, self.kv_value_bytes
        );
        let _ = writeln!(
            s,
            "machine: {} cores, {}, kernel {}; {}",
            m.cores,
            m.cpu.as_deref().unwrap_or("unknown CPU"),
            m.kernel.as_deref().unwrap_or("?"),
            m.nats_server.as_deref().unwrap_or("nats-server not found")
        );
        let same = match m.data_dir_same_fs_as_cwd {
            Some(true) => "same filesystem as the working directory",
            Some(false) => "NOT the working directory's filesystem",
            None => "filesystem unknown",
        };
        let _ = writeln!(s, "data under {} ({same})\n", m.data_dir);

        let header = ["scenario", "peer", "median", "[min-max]", "unit", "p50 µs", "p99 µs", "p99.9 µs", "max µs"];
        let rows: Vec<[String; 9]> = self
            .results
            .iter()
            .map(|r| {
                [
                    r.id.clone(),
                    r.peer.clone(),
                    fmt_value(r.median),
                    format!("[{}-{}]", fmt_value(r.min), fmt_value(r.max)),
                    r.unit.clone(),
                    fmt_us(r.p50_us),
                    fmt_us(r.p99_us),
                    fmt_us(r.p999_us),
                    fmt_us(r.max_us),
                ]
            })
            .collect();
        let mut widths = header.map(|h| h.chars().count());
        for row in &rows {
            for (w, cell) in widths.iter_mut().zip(row) {
                *w = (*w).max(cell.chars().count());
            }
        }
        let line = |cells: &[String]| {
            let mut l = String::new();
            for (i, (cell, w)) in cells.iter().zip(widths).enumerate() {
                // Text columns left-aligned, figures right-aligned.
                let pad = w - cell.chars().count();
                if i < 2 || i == 4 {
                    l.push_str(cell);
                    l.push_str(&" ".repeat(pad));
                } else {
                    l.push_str(&" ".repeat(pad));
                    l.push_str(cell);
                }
                l.push_str("  ");
            }
            l.trim_end().to_owned() + "\n"
        };
        s.push_str(&line(&header.map(str::to_owned)));
        for row in &rows {
            s.push_str(&line(row));
        }

        if !self.ratios.is_empty() {
            let _ = writeln!(s, "\nratios (median of per-run ratios):");
            let w = self.ratios.iter().map(|r| r.label.chars().count()).max().unwrap_or(0);
            for r in &self.ratios {
                let runs: Vec<String> = r.per_run.iter().map(|x| format!("{x:.2}")).collect();
                let _ = writeln!(s, "  {:<w$}  {:>6.2}   runs: {}", r.label, r.median, runs.join(", "));
            }
        }

        let _ = writeln!(s, "\nwhat each scenario measures:");
        for r in &self.results {
            let _ = write!(s, "  {}: {}", r.id, r.what);
            if let Some(note) = &r.note {
                let _ = write!(s, " ({note})");
            }
            s.push('\n');
        }
        s
    }
}

fn median(values: &[f64]) -> Option<f64> {
    if values.is_empty() {
        return None;
    }
    let mut v = values.to_vec();
    v.sort_by(f64::total_cmp);
    let mid = v.len() / 2;
    Some(if v.len() % 2 == 1 { v[mid] } else { (v[mid - 1] + v[mid]) / 2.0 })
}

/// `1234567.8` → `1,234,568`; small values keep one decimal.
fn fmt_value(v: f64) -> String {
    if !v.is_finite() {
        return "-".to_owned();
    }
    if v.abs() < 100.0 {
        return format!("{v:.1}");
    }
    let digits = format!("{:.0}", v.abs());
    let mut out = String::new();
    for (i, c) in digits.chars().enumerate() {
        if i > 0 && (digits.len() - i) % 3 == 0 {
            out.push(',');
        }
        out.push(c);
    }
    if v < 0.0 { format!("-{out}") } else { out }
}

fn fmt_us(v: Option<f64>) -> String {
    match v {
        None => "-".to_owned(),
        Some(v) if v < 100.0 => format!("{v:.1}"),
        Some(v) => fmt_value(v),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn m(id: &str, value: f64) -> Measurement {
        Measurement {
            id: id.into(),
            peer: "p".into(),
            what: "w".into(),
            value,
            unit: "msgs/s".into(),
            p50_us: Some(value / 10.0),
            p99_us: None,
            p999_us: None,
            max_us: None,
            note: None,
        }
    }

    #[test]
    fn medians_and_formatting() {
        assert_eq!(median(&[3.0, 1.0, 2.0]), Some(2.0));
        assert_eq!(median(&[4.0, 1.0, 2.0, 3.0]), Some(2.5));
        assert_eq!(median(&[]), None);
        assert_eq!(fmt_value(1_234_567.8), "1,234,568");
        assert_eq!(fmt_value(999.0), "999");
        assert_eq!(fmt_value(12.345), "12.3");
        assert_eq!(fmt_us(Some(1234.0)), "1,234");
        assert_eq!(fmt_us(None), "-");
    }

    #[test]
    fn ratios_are_per_run_then_median() {
        use clap::Parser as _;
        #[derive(clap::Parser)]
        struct Cli {
            #[command(flatten)]
            args: BenchArgs,
        }
        let args = Cli::parse_from(["x", "--runs", "3"]).args;
        let always16 = embedded_publish::id("always", "16-pub");
        let runs = vec![
            vec![m(fsync::ID, 1000.0), m(&always16, 8000.0)],
            vec![m(fsync::ID, 2000.0), m(&always16, 16000.0)],
            vec![m(fsync::ID, 500.0), m(&always16, 8000.0)],
        ];
        let machine = Machine::probe(Path::new("/tmp"), None);
        let report = Report::new(machine, &args, vec!["fsync"], runs);
        let fs = report.results.iter().find(|r| r.id == fsync::ID).unwrap();
        assert_eq!((fs.median, fs.min, fs.max), (1000.0, 500.0, 2000.0));
        assert_eq!(fs.p50_us, Some(100.0));
        // Per run: 8000/16000 = 0.5, 16000/32000 = 0.5, 8000/8000 = 1.0.
        assert_eq!(report.ratios.len(), 1, "only ratios whose figures exist");
        assert_eq!(report.ratios[0].per_run, vec![0.5, 0.5, 1.0]);
        assert_eq!(report.ratios[0].median, 0.5);
        let table = report.table();
        assert!(table.contains("embedded always 16-pub / (16 × fsync/s)    0.50"), "{table}");
        assert!(table.contains("[500-2,000]"), "{table}");
    }
}
