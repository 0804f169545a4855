//! finmesh-bench: the embedded engine, the NATS engine and the gateway side
//! by side with their peers, in one run, on this machine. The binary of the
//! same name is the command line (`finmesh-bench --help`); the shipped
//! `finmesh` binary carries none of this code and no test kit.
//!
//! This machine's speed drifts by up to 2× between runs (NATS-NOTES.md), so
//! a figure is only worth something next to its peer measured in the same
//! run. Each of `--runs` runs executes every selected scenario family in
//! turn; the report shows each figure's median over the runs (with min–max),
//! and each ratio is computed within a run and then its median taken.
//!
//! Scenario families (one file each, `--scenario` selects):
//! - `fsync`: the disk's append + fsync ceiling;
//! - `embedded_publish`: the embedded engine's publish, `sync = always`
//!   and `interval(100 ms)`, 1 publisher, 16 publishers, batches of 100;
//! - `nats_publish`: JetStream publish on a real nats-server;
//! - `embedded_kv`: KV put/get over N keys and memory (child processes);
//! - `nats_kv`: NATS KV put/get for comparison;
//! - `nats_mirror`: hub → leaf KV mirror propagation latency, on loopback
//!   and through a 40 ms delaying proxy.
//! - `gateway`: `finmesh serve` (a child process of the real `finmesh`
//!   binary, auth on; [`finmesh_binary`] says which) under wrk next
//!   to nginx (`gateway-kv`), on an encrypted, hashed bucket next to a
//!   plain one (`gateway_secure`, `gateway-kv-secure`), on the NATS engine next to async-nats
//!   (`gateway-nats-kv`), NDJSON publish next to in-process `publish_batch`
//!   (`gateway-publish`); `tls_conn`: new TLS connections per second next
//!   to nginx (`gateway-tls`). These need `wrk` and `nginx` (Debian
//!   packages of those names) except `gateway-publish`.
//! - `embedded_consumer`: a consumer matching 1% of a large stream
//!   (fetch p99, and a publisher's rate while it drains, next to alone);
//!   acks/s with 10,000 and 100 deliveries pending.
//! - `kv_scale` (`kv-scale`, only when selected): load `--scale-keys`
//!   keys in batches, then GET random keys over HTTP with wrk and a Lua
//!   script next to a single-key run, with the node's RSS; `kv_scale_nats`
//!   (`kv-scale-nats`, only when selected): the same on the NATS engine
//!   over a 3-node cluster, loaded by async JetStream publishes.
//! - `nats_engine` (`nats-engine-publish`) and `nats_engine_kv`
//!   (`nats-engine-kv`): every embedded publish and KV scenario through the
//!   NATS engine and through raw async-nats side by side, on one server
//!   and on a 3-node R3 cluster; the report gives engine/raw ratios of
//!   throughput and p99.
//! - `fanout` (`fanout`, `fanout-max`, `fanout-idle`): market data to 60
//!   SSE subscribers of `finmesh serve` next to core NATS fan-out to 60
//!   async-nats connections: latency and skew at 1,000 ticks/s, the highest
//!   deliveries/s with p99 < 50 ms, RSS per idle subscriber, and CPU per
//!   delivery by number of distinct filters (`fanout-filters`); the node
//!   on the NATS engine beside the embedded one.
//! - `reencrypt` (`reencrypt`, only when selected): `KeyAdmin::reencrypt`
//!   of an encrypted bucket of `--reencrypt-values` values after a key
//!   rotation, on the embedded engine, through library calls.
//! - `pipeline` (`pipeline`, `pipeline-nats`, only when selected): the
//!   risk-feed pipeline end to end (ingest, enrich, validate, reconcile)
//!   on the embedded engine and on a 3-node NATS cluster, next to the csv
//!   crate alone parsing the same file.
//!
//! Payloads: 128 bytes per published message, 256 bytes per KV value. Every
//! scenario's data lives in a temporary directory under `--dir` (default
//! `$TMPDIR`, else `/tmp`), removed at the end; keep it on the disk you
//! mean to measure.

mod embedded_consumer;
mod embedded_kv;
mod embedded_publish;
mod fanout;
mod fsync;
mod gateway;
mod gateway_secure;
mod kv_scale;
mod kv_scale_nats;
mod measure;
mod nats_engine;
mod nats_engine_kv;
mod nats_kv;
mod nats_mirror;
mod nats_publish;
mod node;
mod pipeline;
mod reencrypt;
mod report;
mod tls_conn;
mod tools;

use std::os::unix::fs::MetadataExt as _;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::Context as _;
use finmesh_testkit::NatsServer;

use measure::Measurement;
pub use node::{FINMESH_BIN_ENV, SERVE_CONFIG, finmesh_binary};

/// Bytes per published message.
pub const PUBLISH_PAYLOAD: usize = 128;
/// Bytes per KV value.
pub const KV_VALUE: usize = 256;
/// Concurrent publishers (or putters) in the "16" scenarios.
pub const CONCURRENCY: usize = 16;

/// A family of scenarios.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum, serde::Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Scenario {
    /// Disk: append 4 KiB + fsync.
    Fsync,
    /// Embedded engine publish (sync always / interval).
    EmbeddedPublish,
    /// nats-server JetStream publish.
    NatsPublish,
    /// Embedded engine KV put/get and memory.
    EmbeddedKv,
    /// nats-server KV put/get.
    NatsKv,
    /// Hub → leaf KV mirror propagation latency.
    NatsMirror,
    /// Gateway KV GET (embedded engine) vs nginx, HTTP and HTTPS, with wrk.
    GatewayKv,
    /// Gateway KV GET on an encrypted, hashed bucket vs a plain bucket.
    GatewayKvSecure,
    /// Gateway KV GET on the NATS engine vs async-nats KV get.
    GatewayNatsKv,
    /// Gateway NDJSON publish vs in-process publish_batch.
    GatewayPublish,
    /// New TLS connections per second, gateway vs nginx.
    GatewayTls,
    /// All `gateway-*` families.
    Gateway,
    /// NATS engine vs raw async-nats publish, single server and R3 cluster.
    NatsEnginePublish,
    /// NATS engine vs raw async-nats KV, single server and R3 cluster.
    NatsEngineKv,
    /// Embedded consumers: sparse filtered fetch, acks/s.
    EmbeddedConsumer,
    /// Fan-out: 1,000 ticks/s to 60 SSE subscribers (latency, skew) vs core NATS.
    Fanout,
    /// Fan-out: highest deliveries/s to 60 subscribers with p99 < 50 ms vs core NATS
    /// (only when selected).
    FanoutMax,
    /// Fan-out: RSS per idle SSE subscriber, 15,000 of them (only when selected).
    FanoutIdle,
    /// Fan-out: CPU per delivered message with 1, 10 and 100 distinct filters
    /// among 100 subscribers at 100k msgs/s in (only when selected).
    FanoutFilters,
    /// Random keys at scale: batched load, then random-key GETs over HTTP
    /// (only when selected).
    KvScale,
    /// Risk-feed pipeline: `--rows` rows through every stage on the embedded
    /// engine (sync = always) next to the csv crate alone (only when selected).
    Pipeline,
    /// The same on a 3-node NATS cluster, R3, `--nats-rows` rows (only when selected).
    PipelineNats,
    /// Random keys at scale on the NATS engine (3-node cluster): batched
    /// async publishes, then random-key GETs over HTTP (only when selected).
    KvScaleNats,
    /// Re-encryption of an encrypted bucket after a key rotation, embedded
    /// engine, library calls (only when selected).
    Reencrypt,
}

impl Scenario {
    const ALL: [Scenario; 15] = [
        Scenario::Fsync,
        Scenario::EmbeddedPublish,
        Scenario::NatsPublish,
        Scenario::EmbeddedKv,
        Scenario::NatsKv,
        Scenario::NatsMirror,
        Scenario::GatewayKv,
        Scenario::GatewayKvSecure,
        Scenario::GatewayNatsKv,
        Scenario::GatewayPublish,
        Scenario::GatewayTls,
        Scenario::NatsEnginePublish,
        Scenario::NatsEngineKv,
        Scenario::EmbeddedConsumer,
        Scenario::Fanout,
    ];

    /// Families that run only when named (they write a lot of data).
    const ON_REQUEST: [Scenario; 8] = [
        Scenario::KvScale,
        Scenario::Reencrypt,
        Scenario::KvScaleNats,
        Scenario::FanoutMax,
        Scenario::FanoutIdle,
        Scenario::FanoutFilters,
        Scenario::Pipeline,
        Scenario::PipelineNats,
    ];

    /// Is `self` selected by `chosen` (empty = all but [`Self::ON_REQUEST`])?
    fn selected_by(self, chosen: &[Scenario]) -> bool {
        if Self::ON_REQUEST.contains(&self) {
            return chosen.contains(&self);
        }
        chosen.is_empty()
            || chosen.contains(&self)
            || (chosen.contains(&Scenario::Gateway) && self.name().starts_with("gateway-"))
    }

    async fn run(self, ctx: &BenchContext) -> anyhow::Result<Vec<Measurement>> {
        match self {
            Scenario::Fsync => fsync::run(&ctx.dir, ctx.duration).await,
            Scenario::EmbeddedPublish => embedded_publish::run(ctx).await,
            Scenario::NatsPublish => nats_publish::run(ctx).await,
            Scenario::EmbeddedKv => embedded_kv::run(ctx).await,
            Scenario::NatsKv => nats_kv::run(ctx).await,
            Scenario::NatsMirror => nats_mirror::run(ctx).await,
            Scenario::GatewayKv => gateway::run_kv(ctx).await,
            Scenario::GatewayKvSecure => gateway_secure::run(ctx).await,
            Scenario::GatewayNatsKv => gateway::run_nats_kv(ctx).await,
            Scenario::GatewayPublish => gateway::run_publish(ctx).await,
            Scenario::GatewayTls => tls_conn::run(ctx).await,
            Scenario::Gateway => Ok(Vec::new()),
            Scenario::NatsEnginePublish => nats_engine::run_publish(ctx).await,
            Scenario::NatsEngineKv => nats_engine_kv::run(ctx).await,
            Scenario::EmbeddedConsumer => embedded_consumer::run(ctx).await,
            Scenario::Fanout => fanout::run_latency(ctx).await,
            Scenario::FanoutMax => fanout::run_max(ctx).await,
            Scenario::FanoutIdle => fanout::run_idle(ctx).await,
            Scenario::FanoutFilters => fanout::run_filters(ctx).await,
            Scenario::KvScale => kv_scale::run(ctx).await,
            Scenario::Pipeline => pipeline::run_embedded(ctx).await,
            Scenario::PipelineNats => pipeline::run_nats(ctx).await,
            Scenario::KvScaleNats => kv_scale_nats::run(ctx).await,
            Scenario::Reencrypt => reencrypt::run(ctx).await,
        }
    }

    fn name(self) -> &'static str {
        match self {
            Scenario::Fsync => "fsync",
            Scenario::EmbeddedPublish => "embedded-publish",
            Scenario::NatsPublish => "nats-publish",
            Scenario::EmbeddedKv => "embedded-kv",
            Scenario::NatsKv => "nats-kv",
            Scenario::NatsMirror => "nats-mirror",
            Scenario::GatewayKv => "gateway-kv",
            Scenario::GatewayKvSecure => "gateway-kv-secure",
            Scenario::GatewayNatsKv => "gateway-nats-kv",
            Scenario::GatewayPublish => "gateway-publish",
            Scenario::GatewayTls => "gateway-tls",
            Scenario::Gateway => "gateway",
            Scenario::NatsEnginePublish => "nats-engine-publish",
            Scenario::NatsEngineKv => "nats-engine-kv",
            Scenario::EmbeddedConsumer => "embedded-consumer",
            Scenario::Fanout => "fanout",
            Scenario::FanoutMax => "fanout-max",
            Scenario::FanoutIdle => "fanout-idle",
            Scenario::FanoutFilters => "fanout-filters",
            Scenario::KvScale => "kv-scale",
            Scenario::Pipeline => "pipeline",
            Scenario::PipelineNats => "pipeline-nats",
            Scenario::KvScaleNats => "kv-scale-nats",
            Scenario::Reencrypt => "reencrypt",
        }
    }
}

/// Arguments of `finmesh-bench`.
#[derive(Debug, Clone, clap::Args)]
pub struct BenchArgs {
    /// Runs of every selected scenario; the report shows medians.
    #[arg(long, default_value_t = 3, value_parser = clap::value_parser!(u32).range(1..))]
    runs: u32,
    /// Length of each measured window, in seconds (after a short warm-up).
    #[arg(long, default_value_t = 2.0)]
    duration_secs: f64,
    /// Run only these scenario families (repeat the flag; default: all);
    /// `gateway` selects the four `gateway-*` families.
    #[arg(long = "scenario", visible_alias = "only", value_enum)]
    scenarios: Vec<Scenario>,
    /// Keys loaded into the embedded engine's KV bucket.
    #[arg(long, default_value_t = 1_000_000)]
    kv_keys: u64,
    /// Keys loaded into the NATS KV bucket (fewer: one connection loads them).
    #[arg(long, default_value_t = 50_000)]
    nats_kv_keys: u64,
    /// Keys loaded by `kv-scale` and `kv-scale-nats`.
    #[arg(long, default_value_t = 10_000_000)]
    scale_keys: u64,
    /// Bytes per value of `kv-scale`.
    #[arg(long, default_value_t = KV_VALUE)]
    value_bytes: usize,
    /// Values of 256 B re-encrypted by `reencrypt`.
    #[arg(long, default_value_t = 200_000)]
    reencrypt_values: u64,
    /// Puts timed per leaf by the mirror propagation scenario.
    #[arg(long, default_value_t = 1_000)]
    mirror_puts: u64,
    /// Messages in the stream of the sparse consumer scenario.
    #[arg(long, default_value_t = 1_000_000)]
    consumer_messages: u64,
    /// Idle SSE subscribers of the `fanout-idle` scenario (this machine's
    /// file limit is 20,000 per process).
    #[arg(long, default_value_t = fanout::IDLE_SUBSCRIBERS)]
    idle_subscribers: usize,
    /// How the `fanout` scenarios feed finmesh: one long upload to the
    /// feed receiver, or one publish request per millisecond.
    #[arg(long, value_enum, default_value_t = fanout::FeedTransport::Upload)]
    fanout_feed: fanout::FeedTransport,
    /// Rows of the `pipeline` scenario's generated feed.
    #[arg(long, default_value_t = 10_000_000)]
    rows: u64,
    /// Rows of the `pipeline-nats` scenario's generated feed.
    #[arg(long, default_value_t = 1_000_000)]
    nats_rows: u64,
    /// Where temporary data goes (default: $TMPDIR, else /tmp).
    #[arg(long, env = "FINMESH_BENCH_DIR")]
    dir: Option<PathBuf>,
    /// Print the report as JSON instead of a table.
    #[arg(long)]
    json: bool,
}

/// What every scenario needs to know.
#[derive(Debug, Clone)]
pub struct BenchContext {
    /// Parent of every temporary directory.
    pub dir: PathBuf,
    /// Measured window.
    pub duration: Duration,
    /// Keys for the embedded KV scenarios.
    pub kv_keys: u64,
    /// Keys for the NATS KV scenarios.
    pub nats_kv_keys: u64,
    /// Keys loaded by `kv-scale` and `kv-scale-nats`.
    pub scale_keys: u64,
    /// Bytes per value of `kv-scale`.
    pub value_bytes: usize,
    /// Values re-encrypted by `reencrypt`.
    pub reencrypt_values: u64,
    /// Puts timed per leaf by the mirror scenario.
    pub mirror_puts: u64,
    /// Messages in the sparse consumer scenario's stream.
    pub consumer_messages: u64,
    /// Idle subscribers of `fanout-idle`.
    pub idle_subscribers: usize,
    /// How the `fanout` scenarios feed finmesh.
    pub feed: fanout::FeedTransport,
    /// Rows of the `pipeline` feed.
    pub pipeline_rows: u64,
    /// Rows of the `pipeline-nats` feed.
    pub pipeline_nats_rows: u64,
    /// The current run, from 1; side-by-side scenarios swap which side
    /// goes first between odd and even runs.
    pub run: u32,
}

impl BenchContext {
    /// A fresh temporary directory for one scenario, removed on drop.
    pub fn tempdir(&self, what: &str) -> anyhow::Result<tempfile::TempDir> {
        tempfile::Builder::new()
            .prefix(&format!("finmesh-bench-{what}-"))
            .tempdir_in(&self.dir)
            .with_context(|| format!("creating a temporary directory in {}", self.dir.display()))
    }
}

/// Start a nats-server whose store lives under the benchmark's directory.
pub async fn start_nats(ctx: &BenchContext) -> anyhow::Result<NatsServer> {
    NatsServer::builder()
        .tmp_in(&ctx.dir)
        .start()
        .await
        .context("starting nats-server (see scripts/test to install it)")
}

/// Run the benchmark and print the report.
pub async fn run(args: BenchArgs) -> anyhow::Result<()> {
    anyhow::ensure!(
        args.duration_secs.is_finite() && args.duration_secs > 0.0,
        "--duration-secs must be a positive number"
    );
    let dir = match &args.dir {
        Some(d) => d.clone(),
        None => std::env::temp_dir(),
    };
    std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    let mut ctx = BenchContext {
        dir: dir.clone(),
        duration: Duration::from_secs_f64(args.duration_secs),
        kv_keys: args.kv_keys,
        nats_kv_keys: args.nats_kv_keys,
        scale_keys: args.scale_keys,
        feed: args.fanout_feed,
        value_bytes: args.value_bytes,
        reencrypt_values: args.reencrypt_values,
        mirror_puts: args.mirror_puts,
        consumer_messages: args.consumer_messages,
        idle_subscribers: args.idle_subscribers,
        pipeline_rows: args.rows,
        pipeline_nats_rows: args.nats_rows,
        run: 1,
    };
    let scenarios: Vec<Scenario> =
        Scenario::ALL.into_iter().chain(Scenario::ON_REQUEST).filter(|s| s.selected_by(&args.scenarios)).collect();
    let machine = report::Machine::probe(&dir, same_filesystem(&dir, Path::new(".")));
    eprintln!(
        "finmesh-bench: {} run(s) of [{}], {} s windows, data under {}",
        args.runs,
        scenarios.iter().map(|s| s.name()).collect::<Vec<_>>().join(", "),
        args.duration_secs,
        dir.display()
    );

    let mut runs = Vec::new();
    for run in 1..=args.runs {
        ctx.run = run;
        let mut measurements = Vec::new();
        for scenario in &scenarios {
            eprintln!("run {run}/{}: {} …", args.runs, scenario.name());
            let m = scenario.run(&ctx).await.with_context(|| format!("scenario {} (run {run})", scenario.name()))?;
            for x in &m {
                eprintln!("  {:<34} {:>12.0} {}", x.id, x.value, x.unit);
            }
            measurements.extend(m);
        }
        runs.push(measurements);
    }
    let report = report::Report::new(machine, &args, scenarios.iter().map(|s| s.name()).collect(), runs);
    if args.json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        print!("{}", report.table());
    }
    Ok(())
}

fn same_filesystem(a: &Path, b: &Path) -> Option<bool> {
    Some(std::fs::metadata(a).ok()?.dev() == std::fs::metadata(b).ok()?.dev())
}

/// Which phase a child process runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum ChildPhase {
    /// Load N keys, measure gets and RSS.
    KvLoad,
    /// Reopen the loaded directory, measure RSS.
    KvReopen,
}

/// Arguments of the hidden `finmesh-bench __bench-child`.
#[derive(Debug, Clone, clap::Args)]
pub struct ChildArgs {
    /// The phase to run.
    #[arg(long, value_enum)]
    phase: ChildPhase,
    /// The engine's data directory.
    #[arg(long)]
    dir: PathBuf,
    /// Keys in the bucket.
    #[arg(long)]
    keys: u64,
    /// Measured window, seconds.
    #[arg(long)]
    duration_secs: f64,
}

/// Run one child phase; print its measurements as one JSON line on stdout.
pub async fn run_child(args: ChildArgs) -> anyhow::Result<()> {
    let measurements = match args.phase {
        ChildPhase::KvLoad => {
            embedded_kv::load_phase(args.dir, args.keys, Duration::from_secs_f64(args.duration_secs)).await?
        }
        ChildPhase::KvReopen => embedded_kv::reopen_phase(args.dir, args.keys).await?,
    };
    println!("{}", serde_json::to_string(&measurements)?);
    Ok(())
}

/// Run `finmesh-bench __bench-child` (this executable) with `args` and
/// parse its measurements.
async fn child_measurements(args: &ChildArgs) -> anyhow::Result<Vec<Measurement>> {
    let exe = std::env::current_exe().context("locating the finmesh-bench binary")?;
    let phase = match args.phase {
        ChildPhase::KvLoad => "kv-load",
        ChildPhase::KvReopen => "kv-reopen",
    };
    let output = tokio::process::Command::new(&exe)
        .arg("__bench-child")
        .args(["--phase", phase])
        .arg("--dir")
        .arg(&args.dir)
        .args(["--keys", &args.keys.to_string(), "--duration-secs", &args.duration_secs.to_string()])
        .stderr(std::process::Stdio::inherit())
        .kill_on_drop(true)
        .output()
        .await
        .with_context(|| format!("running {}", exe.display()))?;
    anyhow::ensure!(output.status.success(), "child phase {phase} failed: {}", output.status);
    let stdout = String::from_utf8_lossy(&output.stdout);
    let line = stdout.lines().last().context("child printed nothing")?;
    serde_json::from_str(line).with_context(|| format!("parsing the child's output: {line}"))
}
