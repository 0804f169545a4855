//! The pipeline commands that talk to a node or an engine:
//!
//! - `finmesh pipeline ingest FILE --run R --slice S [--file-id F]`: uploads
//!   the file to a running node (`POST /v1/pipelines/{pipeline}/files`),
//!   streamed, with a progress bar (bytes/s) on a terminal and the summary
//!   at the end (`--json`: the node's JSON); exit status 1 when the file
//!   failed;
//! - `finmesh pipeline run --config pipeline.toml`: a node (as `finmesh
//!   serve`) that also runs every stage ([`crate::pipeline_node`]);
//! - `finmesh pipeline worker --stage S --config pipeline.toml`: one stage
//!   against the engine of the node configuration (scale-out on NATS);
//! - `finmesh pipeline watch DIR --config pipeline.toml --run R --slice S`:
//!   a watcher of DIR against the engine of the node configuration
//!   ([`finmesh_pipeline::watch`]; on NATS any number of them, on any
//!   machine sharing DIR; with the embedded engine use the `[watch]`
//!   section of `pipeline run` instead, which holds the data directory);
//! - `finmesh pipeline rules apply FILE`: checks the rules against the
//!   pipeline's schema stored in the node and stores them there (KV bucket
//!   `pipelines`, key `{P}.rules`); runs that start after it use them;
//! - `finmesh refdata load DATASET FILE --as-of T`: loads a CSV as version
//!   `T` of a reference dataset, directly on the engine of the node
//!   configuration (with the embedded engine: while no node holds the data
//!   directory), or into Redis with `--redis URL` (or the `[refdata] redis`
//!   of `--config pipeline.toml`).

use std::io::{IsTerminal, Read};
use std::path::PathBuf;

use anyhow::Context as _;
use clap::Args;
use finmesh_pipeline::flow;
use finmesh_pipeline::stages::StageKind;
use reqwest::Method;

use crate::client::{Client, ClientArgs, segment};
use crate::config::{ConfigOverrides, EngineKind};

/// Where the engine is: the node's configuration and the flags that matter.
#[derive(Debug, Clone, Args)]
pub struct NodeArgs {
    /// The node's TOML configuration file (as `finmesh serve --config`).
    #[arg(long, env = "FINMESH_CONFIG")]
    pub node_config: Option<PathBuf>,
    /// Engine [default: embedded].
    #[arg(long, env = "FINMESH_ENGINE")]
    pub engine: Option<EngineKind>,
    /// Data directory of the embedded engine [default: finmesh-data].
    #[arg(long, env = "FINMESH_DATA_DIR")]
    pub data_dir: Option<PathBuf>,
    /// NATS server URLs, comma-separated.
    #[arg(long, env = "FINMESH_NATS_SERVERS", value_delimiter = ',')]
    pub nats_servers: Option<Vec<String>>,
}

impl NodeArgs {
    pub(crate) fn overrides(&self) -> ConfigOverrides {
        ConfigOverrides {
            config: self.node_config.clone(),
            engine: self.engine,
            data_dir: self.data_dir.clone(),
            nats_servers: self.nats_servers.clone(),
            ..ConfigOverrides::default()
        }
    }
}

#[derive(Debug, Args)]
pub struct IngestArgs {
    /// The CSV file.
    file: PathBuf,
    /// Run id (1-64 characters of A-Z a-z 0-9 _ -).
    #[arg(long)]
    run: String,
    /// Slice id.
    #[arg(long)]
    slice: String,
    /// File id [default: the file name, every character outside A-Z a-z 0-9 _ - replaced by `_`].
    #[arg(long)]
    file_id: Option<String>,
    /// The pipeline.
    #[arg(long, default_value = flow::DEFAULT_PIPELINE)]
    pipeline: String,
    /// The reference-data version the run pins (RFC 3339): the stages wait until it is loaded.
    #[arg(long)]
    refdata: Option<String>,
    /// Most rows per record message, 1-4096 [default: the node's, 1000]; a re-upload is
    /// recognised as duplicates only with the same value.
    #[arg(long)]
    rows_per_message: Option<usize>,
    #[command(flatten)]
    client: ClientArgs,
}

#[derive(Debug, Args)]
pub struct RunArgs {
    /// The pipeline's configuration (`pipeline.toml`).
    #[arg(long)]
    config: PathBuf,
    #[command(flatten)]
    node: NodeArgs,
    /// Address to listen on [default: 127.0.0.1:8080].
    #[arg(long, env = "FINMESH_LISTEN")]
    listen: Option<String>,
    /// Turn authentication off (as `finmesh serve --insecure-no-auth`).
    #[arg(long)]
    insecure_no_auth: bool,
}

impl RunArgs {
    /// The `serve` arguments of this node.
    pub fn serve_args(self) -> crate::serve::ServeArgs {
        let mut config = self.node.overrides();
        config.listen = self.listen;
        crate::serve::ServeArgs {
            config,
            insecure_no_auth: self.insecure_no_auth,
            insecure_no_auth_on_public_address: false,
            pipeline: Some(self.config),
        }
    }
}

#[derive(Debug, Args)]
pub struct WorkerArgs {
    /// The stage: enrich or validate.
    #[arg(long)]
    stage: StageKind,
    /// The pipeline's configuration (`pipeline.toml`).
    #[arg(long)]
    config: PathBuf,
    /// Workers of the stage in this process.
    #[arg(long, default_value_t = 1)]
    workers: usize,
    #[command(flatten)]
    node: NodeArgs,
}

#[derive(Debug, Args)]
pub struct WatchArgs {
    /// The watched directory (`done/` and `failed/` are created in it).
    dir: PathBuf,
    /// The pipeline's configuration (`pipeline.toml`).
    #[arg(long)]
    config: PathBuf,
    /// Run id of every file (1-64 characters of A-Z a-z 0-9 _ -).
    #[arg(long)]
    run: String,
    /// Slice id of every file.
    #[arg(long)]
    slice: String,
    /// The reference-data version the run pins (RFC 3339).
    #[arg(long)]
    refdata: Option<String>,
    /// Milliseconds between scans.
    #[arg(long, default_value_t = 1000)]
    poll_ms: u64,
    /// Milliseconds a file's size and mtime must stay unchanged before it is taken.
    #[arg(long, default_value_t = 2000)]
    settle_ms: u64,
    /// Milliseconds after which a claim not renewed (its watcher died) is taken over.
    #[arg(long, default_value_t = 30_000)]
    lease_ms: u64,
    /// This watcher's name in its claims; restarted with the same name it resumes
    /// its files at once [default: random]. Never give two running watchers one name.
    #[arg(long)]
    owner: Option<String>,
    #[command(flatten)]
    node: NodeArgs,
}

#[derive(Debug, Args)]
pub struct ApplyArgs {
    /// The rules file.
    rules: PathBuf,
    /// The pipeline's configuration, for its reference datasets.
    #[arg(long)]
    config: PathBuf,
    #[command(flatten)]
    client: ClientArgs,
}

#[derive(Debug, Args)]
pub struct RefdataLoadArgs {
    /// The dataset (1-32 characters of A-Z a-z 0-9 _ -).
    dataset: String,
    /// The CSV file (header first; the key column first unless --key).
    file: PathBuf,
    /// The version: its time (RFC 3339, whole microseconds).
    #[arg(long)]
    as_of: String,
    /// The key column [default: the first].
    #[arg(long)]
    key: Option<String>,
    /// Load into this Redis server (`redis://host:port`) instead of the engine.
    #[arg(long, env = "FINMESH_REFDATA_REDIS", conflicts_with = "config")]
    redis: Option<String>,
    /// Load where this `pipeline.toml` keeps reference data (its `[refdata] redis`, else the engine).
    #[arg(long)]
    config: Option<PathBuf>,
    #[command(flatten)]
    node: NodeArgs,
}

/// `finmesh pipeline ingest`.
pub async fn ingest(args: IngestArgs) -> anyhow::Result<()> {
    let client = Client::new(&args.client)?;
    let file_id = args.file_id.clone().unwrap_or_else(|| flow::file_id_from_name(&args.file.to_string_lossy()));
    flow::FileRef::new(&args.run, &args.slice, &file_id)?;
    let mut input = std::fs::File::open(&args.file).with_context(|| format!("opening {}", args.file.display()))?;
    let total = input.metadata().map(|m| m.len()).ok();
    let bar = (!client.json && std::io::stderr().is_terminal()).then(|| {
        let bar = indicatif::ProgressBar::new(total.unwrap_or(0));
        bar.set_style(
            indicatif::ProgressStyle::with_template(
                "{bar:40} {binary_bytes}/{binary_total_bytes} {binary_bytes_per_sec} {msg}",
            )
            .expect("a valid template"),
        );
        bar.set_message(format!("uploading {file_id}"));
        bar
    });
    // A reader thread feeds the request body chunk by chunk (never the whole file).
    let (tx, rx) = tokio::sync::mpsc::channel::<std::io::Result<bytes::Bytes>>(8);
    let progress = bar.clone();
    std::thread::spawn(move || {
        let mut buf = vec![0u8; 256 << 10];
        loop {
            let item = match input.read(&mut buf) {
                Ok(0) => return,
                Ok(n) => Ok(bytes::Bytes::copy_from_slice(&buf[..n])),
                Err(e) => Err(e),
            };
            if let (Ok(chunk), Some(bar)) = (&item, &progress) {
                bar.inc(chunk.len() as u64);
            }
            let stop = item.is_err();
            if tx.blocking_send(item).is_err() || stop {
                return;
            }
        }
    });
    let body = futures::stream::unfold(rx, |mut rx| async move { rx.recv().await.map(|item| (item, rx)) });
    let mut query = vec![("run", args.run.clone()), ("slice", args.slice.clone()), ("file", file_id)];
    if let Some(t) = &args.refdata {
        query.push(("refdata", t.clone()));
    }
    if let Some(n) = args.rows_per_message {
        query.push(("rows_per_message", n.to_string()));
    }
    let mut request = client
        .request(Method::POST, &format!("/v1/pipelines/{}/files", segment(&args.pipeline)))
        .query(&query)
        .header(reqwest::header::CONTENT_TYPE, "text/csv")
        .body(reqwest::Body::wrap_stream(body));
    if let Some(n) = total {
        request = request.header(reqwest::header::CONTENT_LENGTH, n);
    }
    let summary = client.json(request).await;
    if let Some(bar) = &bar {
        bar.finish_and_clear();
    }
    let summary = summary?;
    if client.json {
        println!("{summary}");
    } else {
        println!("{}", describe(&summary));
    }
    if summary["status"] == "failed" {
        anyhow::bail!("the file failed: {}", summary["reason"].as_str().unwrap_or("no reason given"));
    }
    Ok(())
}

/// The human summary of an ingest.
fn describe(s: &serde_json::Value) -> String {
    let n = |k: &str| s[k].as_u64().unwrap_or(0);
    let mut out = format!(
        "{}/{}/{}: {} rows: {} records, {} exceptions; {} bytes in {:.2} s ({:.0} rows/s)",
        s["run"].as_str().unwrap_or(""),
        s["slice"].as_str().unwrap_or(""),
        s["file"].as_str().unwrap_or(""),
        n("rows"),
        n("records"),
        n("exceptions"),
        n("bytes"),
        s["elapsed_s"].as_f64().unwrap_or(0.0),
        s["rows_per_s"].as_f64().unwrap_or(0.0),
    );
    match s["status"].as_str() {
        Some("already_ingested") => out
            .push_str(&format!("\nalready ingested: all {} rows were duplicates, nothing new stored", n("duplicates"))),
        Some("failed") => out.push_str(&format!("\nFAILED: {}", s["reason"].as_str().unwrap_or(""))),
        _ if n("duplicates") > 0 => {
            out.push_str(&format!("\n{} rows were duplicates (not stored again)", n("duplicates")))
        }
        _ => {}
    }
    out
}

/// `finmesh pipeline worker`: runs until SIGINT/SIGTERM, then finishes the
/// current step of each worker.
pub async fn worker(args: WorkerArgs) -> anyhow::Result<()> {
    let loaded = crate::pipeline_node::load(&args.config)?;
    let config = crate::config::ServeConfig::load(&args.node.overrides())?;
    let engine = crate::serve::OpenEngine::open(&config).await?;
    let shared = engine.shared();
    crate::pipeline_node::define(&shared, &loaded).await?;
    let (stop, stop_rx) = tokio::sync::watch::channel(false);
    let tasks =
        crate::pipeline_node::start_stages(shared, &loaded, &[(args.stage, args.workers.max(1))], stop_rx).await?;
    eprintln!("{} worker(s) of stage {} running; Ctrl-C stops them", args.workers.max(1), args.stage.as_str());
    wait_for_signal().await;
    let _ = stop.send(true);
    for t in tasks {
        let _ = t.await;
    }
    engine.close().await
}

async fn wait_for_signal() {
    use tokio::signal::unix::{SignalKind, signal};
    let (Ok(mut term), Ok(mut int)) = (signal(SignalKind::terminate()), signal(SignalKind::interrupt())) else {
        return std::future::pending().await;
    };
    tokio::select! {
        _ = term.recv() => {}
        _ = int.recv() => {}
    }
}

/// `finmesh pipeline watch`: runs until SIGINT/SIGTERM (a file in progress
/// is resumed by the next watcher, see [`finmesh_pipeline::watch`]).
pub async fn watch(args: WatchArgs) -> anyhow::Result<()> {
    let loaded = crate::pipeline_node::load(&args.config)?;
    let section = crate::pipeline_node::WatchSection {
        dir: std::path::absolute(&args.dir).with_context(|| format!("{}", args.dir.display()))?,
        run: args.run,
        slice: args.slice,
        refdata: args.refdata,
        poll_ms: args.poll_ms,
        settle_ms: args.settle_ms,
        lease_ms: args.lease_ms,
        owner: args.owner,
    };
    let problems = section.problems(loaded.config.pipeline.streams.duplicate_window);
    if !problems.is_empty() {
        anyhow::bail!("{}", problems.join("\n"));
    }
    let mut loaded = loaded;
    loaded.config.watch = Some(section);
    let config = crate::config::ServeConfig::load(&args.node.overrides())?;
    let engine = crate::serve::OpenEngine::open(&config).await?;
    let shared = engine.shared();
    crate::pipeline_node::define(&shared, &loaded).await?;
    let (stop, stop_rx) = tokio::sync::watch::channel(false);
    let task = crate::pipeline_node::start_watch(shared, &loaded, stop_rx).await?;
    eprintln!("watching {}; Ctrl-C stops", args.dir.display());
    wait_for_signal().await;
    let _ = stop.send(true);
    if let Some(task) = task {
        let _ = task.await;
    }
    engine.close().await
}

/// `finmesh pipeline rules apply`.
pub async fn apply(args: ApplyArgs) -> anyhow::Result<()> {
    let client = Client::new(&args.client)?;
    let loaded = crate::pipeline_node::load(&args.config)?;
    let text = std::fs::read_to_string(&args.rules).with_context(|| format!("reading {}", args.rules.display()))?;
    let p = loaded.pipeline.name();
    // Check against the schema the node holds, not a local copy.
    let schema_path =
        format!("/v1/kv/{}/{}", finmesh_pipeline::definition::DEFINITION_BUCKET, segment(&format!("{p}.schema")));
    let response = client.send(client.request(Method::GET, &schema_path)).await.with_context(|| {
        format!("reading the schema of pipeline `{p}` from the node (is `finmesh pipeline run` running?)")
    })?;
    let avsc = response.text().await?;
    let schema = finmesh_pipeline::IngestSchema::parse(&avsc).context("the node's schema")?;
    finmesh_pipeline::definition::compile_rules(&text, &schema, &loaded.datasets, &args.rules.display().to_string())
        .map_err(|e| anyhow::anyhow!("{}", e.message()))?;
    let rules_path =
        format!("/v1/kv/{}/{}", finmesh_pipeline::definition::DEFINITION_BUCKET, segment(&format!("{p}.rules")));
    let answer = client.json(client.request(Method::PUT, &rules_path).body(text)).await?;
    if client.json {
        println!("{answer}");
    } else {
        println!(
            "rules of pipeline `{p}` stored (revision {}); runs that start from now on use them",
            answer["revision"]
        );
    }
    Ok(())
}

/// `finmesh refdata load`.
pub async fn refdata_load(args: RefdataLoadArgs) -> anyhow::Result<()> {
    use finmesh_pipeline::refdata::csv_rows;
    let version = flow::parse_rfc3339(&args.as_of)?;
    let file = std::fs::File::open(&args.file).with_context(|| format!("opening {}", args.file.display()))?;
    let mut rows = csv_rows(std::io::BufReader::new(file), args.key.as_deref())?;
    let redis = match (&args.redis, &args.config) {
        (Some(url), _) => Some(url.clone()),
        (None, Some(path)) => crate::pipeline_node::load(path)?.config.refdata.redis,
        (None, None) => None,
    };
    let report = if let Some(url) = &redis {
        let store = crate::pipeline_node::open_refstore_redis(url).await?;
        store.load_version(&args.dataset, version, &mut rows).await
    } else {
        let config = crate::config::ServeConfig::load(&args.node.overrides())?;
        let engine = crate::serve::OpenEngine::open(&config).await?;
        let store = crate::pipeline_node::open_refstore(&engine.shared(), None).await?;
        let report = store.load_version(&args.dataset, version, &mut rows).await;
        engine.close().await?;
        report
    };
    let report = report.with_context(|| format!("loading {} into dataset `{}`", args.file.display(), args.dataset))?;
    if report.already_complete {
        println!("dataset `{}` version {} was already loaded: nothing changed", args.dataset, args.as_of);
    } else {
        println!("dataset `{}` version {}: {} rows loaded", args.dataset, args.as_of, report.rows);
    }
    Ok(())
}
