//! `pipeline.toml` and the stage workers the binary runs.
//!
//! - [`PipelineConfig`]: the file, parsed (`deny_unknown_fields`; the
//!   `[reconcile]` table is reserved for reconciliation and accepted as is),
//!   then validated by [`PipelineConfig::validate`] (every problem at once),
//!   then loaded into a [`Loaded`] (schema, rules and datasets, with paths
//!   relative to the file);
//! - [`define`]: stores the schema in the engine, and the rules unless rules
//!   are already stored there (`finmesh pipeline rules apply` changed them:
//!   the engine's copy wins), creates the streams;
//! - [`start_stages`]: spawns the configured number of workers per stage;
//!   they stop when the shutdown signal fires, each finishing its step;
//!   their reference data comes from the engine, or from Redis when
//!   `[refdata] redis` names a server ([`open_refstore`]);
//! - [`start_watch`]: the `[watch]` directory's watcher
//!   ([`finmesh_pipeline::watch`]), in `pipeline run` / `serve --pipeline`.
//!
//! Where stages run: `finmesh pipeline run` is a node (the gateway, as
//! `finmesh serve`) that also runs every stage, so with the embedded engine
//! the stages run in the process that owns the data directory;
//! `finmesh pipeline worker --stage S` runs one stage against the engine the
//! node configuration names, for scaling out on NATS (several workers on one
//! consumer, on any machine).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use finmesh_core::Engine;
use finmesh_pipeline::IngestSchema;
use finmesh_pipeline::flow::{Pipeline, StreamLimits};
use finmesh_pipeline::refdata::{EngineRefStore, RedisRefStore, RefCache, RefStore};
use finmesh_pipeline::stages::{EnrichLookup, Stage, StageKind, StageOptions, StageSetup};
use finmesh_pipeline::watch::{WatchOptions, WatchSpec, Watcher};
use finmesh_rules::{Datasets, KeyType, RuleSet};
use serde::Deserialize;

/// The whole `pipeline.toml`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PipelineConfig {
    pub pipeline: PipelineSection,
    #[serde(default)]
    pub stages: StagesSection,
    #[serde(default)]
    pub refdata: RefdataSection,
    #[serde(default)]
    pub enrich: EnrichSection,
    /// A watched directory ingested by `pipeline run` / `serve --pipeline`.
    #[serde(default)]
    pub watch: Option<WatchSection>,
    /// Reserved for reconciliation (`finmesh pipeline status`): accepted,
    /// not read here.
    #[serde(default)]
    #[allow(dead_code)]
    pub reconcile: Option<toml::Table>,
}

/// `[pipeline]`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PipelineSection {
    /// The pipeline's name [default: risk].
    #[serde(default = "default_name")]
    pub name: String,
    /// The Avro record schema (`.avsc`), relative to this file.
    pub schema: PathBuf,
    /// The rules file, relative to this file.
    pub rules: PathBuf,
    /// Limits of the streams when they are created.
    #[serde(default)]
    pub streams: StreamLimits,
}

fn default_name() -> String {
    finmesh_pipeline::flow::DEFAULT_PIPELINE.to_owned()
}

/// `[stages]`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct StagesSection {
    /// Messages per fetch, each of up to 1,000 rows [default: 16].
    pub batch: usize,
    /// Wait of an empty fetch, ms [default: 1000].
    pub fetch_wait_ms: u64,
    /// The consumers' ack wait, ms [default: 60000].
    pub ack_wait_ms: u64,
    /// Wait for a run's pinned reference version per batch, ms [default: 10000].
    pub pin_wait_ms: u64,
    /// Enrich workers in `pipeline run` [default: 1].
    pub enrich_workers: usize,
    /// Validate workers in `pipeline run` [default: 1].
    pub validate_workers: usize,
}

impl Default for StagesSection {
    fn default() -> Self {
        let d = StageOptions::default();
        StagesSection {
            batch: d.batch,
            fetch_wait_ms: d.fetch_wait.as_millis() as u64,
            ack_wait_ms: d.ack_wait.as_millis() as u64,
            pin_wait_ms: d.pin_wait.as_millis() as u64,
            enrich_workers: 1,
            validate_workers: 1,
        }
    }
}

/// `[refdata]`.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RefdataSection {
    /// Reference datasets the rules may look up, with their key type
    /// (`"string"` or `"int"`).
    #[serde(default)]
    pub datasets: BTreeMap<String, String>,
    /// Keep reference data in this Redis server (`redis://host:port`)
    /// instead of the engine [default: the engine].
    #[serde(default)]
    pub redis: Option<String>,
}

/// `[watch]`: a directory whose files are ingested once each.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct WatchSection {
    /// The directory, relative to this file.
    pub dir: PathBuf,
    /// The run of every file.
    pub run: String,
    /// The slice of every file.
    pub slice: String,
    /// The reference-data version the run pins (RFC 3339).
    #[serde(default)]
    pub refdata: Option<String>,
    /// Interval between scans, ms [default: 1000].
    #[serde(default = "default_poll_ms")]
    pub poll_ms: u64,
    /// How long a file must stay unchanged before it is taken, ms [default: 2000].
    #[serde(default = "default_settle_ms")]
    pub settle_ms: u64,
    /// A claim not renewed for this long is taken over, ms [default: 30000].
    #[serde(default = "default_lease_ms")]
    pub lease_ms: u64,
    /// This watcher's owner name in its claims [default: random per start].
    #[serde(default)]
    pub owner: Option<String>,
}

fn default_poll_ms() -> u64 {
    1000
}
fn default_settle_ms() -> u64 {
    2000
}
fn default_lease_ms() -> u64 {
    30_000
}

impl WatchSection {
    /// Every problem of the section (`max_lease`: the raw stream's
    /// duplicate window, which a takeover's re-sent rows must fall in).
    pub fn problems(&self, max_lease: Duration) -> Vec<String> {
        let mut problems = Vec::new();
        for (what, id) in [("run", &self.run), ("slice", &self.slice)] {
            if let Err(e) = finmesh_pipeline::flow::check_id(what, id) {
                problems.push(format!("watch.{what}: {e}"));
            }
        }
        if let Some(t) = &self.refdata
            && let Err(e) = finmesh_pipeline::flow::parse_rfc3339(t)
        {
            problems.push(format!("watch.refdata: {e}"));
        }
        if self.poll_ms == 0 {
            problems.push("watch.poll_ms: must be at least 1".to_owned());
        }
        if self.lease_ms < 300 {
            problems.push("watch.lease_ms: must be at least 300".to_owned());
        }
        if Duration::from_millis(self.lease_ms) >= max_lease {
            problems.push(
                "watch.lease_ms: must be below pipeline.streams.duplicate_window (a taken-over file's rows are re-sent)"
                    .to_owned(),
            );
        }
        problems
    }
}

/// `[enrich]`.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EnrichSection {
    /// `[[enrich.lookup]]`: a field whose value must be a key of a dataset.
    #[serde(default)]
    pub lookup: Vec<EnrichLookup>,
}

/// A validated, loaded configuration.
pub struct Loaded {
    pub config: PipelineConfig,
    pub pipeline: Pipeline,
    pub schema_text: String,
    pub schema: Arc<IngestSchema>,
    pub rules_text: String,
    pub rules: Arc<RuleSet>,
    pub datasets: Datasets,
    /// The directory of the file: relative paths start there.
    pub base: PathBuf,
}

impl PipelineConfig {
    /// Every problem of the configuration, at once.
    pub fn validate(&self) -> Vec<String> {
        let mut problems = Vec::new();
        if let Err(e) = Pipeline::new(&self.pipeline.name) {
            problems.push(format!("pipeline.name: {e}"));
        }
        let s = &self.stages;
        if s.batch == 0 || s.batch > 10_000 {
            problems.push(format!("stages.batch: {} is outside 1-10000", s.batch));
        }
        if s.ack_wait_ms < 1000 {
            problems.push("stages.ack_wait_ms: must be at least 1000".to_owned());
        }
        if s.pin_wait_ms >= s.ack_wait_ms {
            problems
                .push("stages.pin_wait_ms: must be below stages.ack_wait_ms (a waiting batch is not acked)".to_owned());
        }
        for (name, kind) in &self.refdata.datasets {
            if !matches!(kind.as_str(), "string" | "int") {
                problems.push(format!("refdata.datasets.{name}: key type `{kind}` is not \"string\" or \"int\""));
            }
        }
        if let Some(url) = &self.refdata.redis
            && !(url.starts_with("redis://") || url.starts_with("rediss://") || url.starts_with("unix://"))
        {
            problems.push(format!("refdata.redis: `{url}` is not a redis://, rediss:// or unix:// URL"));
        }
        if let Some(w) = &self.watch {
            problems.extend(w.problems(self.pipeline.streams.duplicate_window));
        }
        for (i, l) in self.enrich.lookup.iter().enumerate() {
            if !self.refdata.datasets.contains_key(&l.dataset) {
                problems.push(format!("enrich.lookup[{i}]: dataset `{}` is not in [refdata] datasets", l.dataset));
            }
        }
        problems
    }

    /// The datasets, as the rules see them.
    pub fn datasets(&self) -> Datasets {
        let mut d = Datasets::new();
        for (name, kind) in &self.refdata.datasets {
            d.add(name.clone(), if kind == "int" { KeyType::Int } else { KeyType::String });
        }
        d
    }

    /// The stage options.
    pub fn stage_options(&self) -> StageOptions {
        let s = &self.stages;
        StageOptions {
            batch: s.batch,
            fetch_wait: Duration::from_millis(s.fetch_wait_ms),
            ack_wait: Duration::from_millis(s.ack_wait_ms),
            pin_wait: Duration::from_millis(s.pin_wait_ms),
        }
    }
}

/// Reads, validates and loads `path` (schema and rules compiled).
pub fn load(path: &Path) -> anyhow::Result<Loaded> {
    let text = std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    let config: PipelineConfig = toml::from_str(&text).map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))?;
    let problems = config.validate();
    if !problems.is_empty() {
        anyhow::bail!("{} has {} problem(s):\n  {}", path.display(), problems.len(), problems.join("\n  "));
    }
    let base = path.parent().unwrap_or(Path::new("."));
    let schema_path = base.join(&config.pipeline.schema);
    let schema_text =
        std::fs::read_to_string(&schema_path).with_context(|| format!("reading {}", schema_path.display()))?;
    let schema = Arc::new(IngestSchema::parse(&schema_text).with_context(|| schema_path.display().to_string())?);
    let rules_path = base.join(&config.pipeline.rules);
    let rules_text =
        std::fs::read_to_string(&rules_path).with_context(|| format!("reading {}", rules_path.display()))?;
    let datasets = config.datasets();
    let rules = RuleSet::compile(&rules_text, schema.avro(), &datasets).map_err(|errors| {
        anyhow::anyhow!("{}", finmesh_rules::render_all(&errors, &rules_text, &rules_path.display().to_string()))
    })?;
    let pipeline = Pipeline::new(&config.pipeline.name)?;
    let base = base.to_owned();
    Ok(Loaded { config, pipeline, schema_text, schema, rules_text, rules: Arc::new(rules), datasets, base })
}

/// Stores the definition in the engine and creates the streams.
pub async fn define(engine: &Arc<dyn Engine>, loaded: &Loaded) -> anyhow::Result<()> {
    use finmesh_pipeline::definition;
    definition::store_schema(&**engine, &loaded.pipeline, &loaded.schema_text).await?;
    if definition::current_rules(&**engine, &loaded.pipeline).await?.is_none() {
        definition::store_rules(&**engine, &loaded.pipeline, &loaded.rules_text, &loaded.datasets).await?;
    }
    finmesh_pipeline::flow::ensure_streams(&**engine, &loaded.pipeline, &loaded.config.pipeline.streams).await?;
    Ok(())
}

/// Starts `workers` workers of each listed stage; they stop (each after its
/// current step) when `shutdown` is cancelled.
pub async fn start_stages(
    engine: Arc<dyn Engine>,
    loaded: &Loaded,
    stages: &[(StageKind, usize)],
    shutdown: tokio::sync::watch::Receiver<bool>,
) -> anyhow::Result<Vec<tokio::task::JoinHandle<()>>> {
    let refs = Arc::new(RefCache::new(open_refstore(&engine, loaded.config.refdata.redis.as_deref()).await?));
    let mut tasks = Vec::new();
    for &(kind, workers) in stages {
        for _ in 0..workers {
            let setup = StageSetup {
                pipeline: loaded.pipeline.clone(),
                schema: loaded.schema.clone(),
                lookups: loaded.config.enrich.lookup.clone(),
                rules: loaded.rules.clone(),
                datasets: loaded.datasets.clone(),
                refs: refs.clone(),
                options: loaded.config.stage_options(),
            };
            let stage = Stage::start(engine.clone(), kind, setup)
                .await
                .with_context(|| format!("starting the {} stage", kind.as_str()))?;
            let mut shutdown = shutdown.clone();
            tasks.push(tokio::spawn(async move {
                let stop = async move {
                    let _ = shutdown.wait_for(|stop| *stop).await;
                };
                if let Err(e) = stage.run(stop).await {
                    tracing::error!(stage = kind.as_str(), error = %e, "stage stopped");
                }
            }));
        }
    }
    tracing::info!(pipeline = loaded.pipeline.name(), ?stages, "pipeline stages running");
    Ok(tasks)
}

/// The reference-data store: Redis at `redis` if given, else the engine.
pub async fn open_refstore(engine: &Arc<dyn Engine>, redis: Option<&str>) -> anyhow::Result<Arc<dyn RefStore>> {
    Ok(match redis {
        Some(url) => open_refstore_redis(url).await?,
        None => Arc::new(EngineRefStore::open(engine.clone()).await?),
    })
}

/// The Redis reference-data store at `url`.
pub async fn open_refstore_redis(url: &str) -> anyhow::Result<Arc<dyn RefStore>> {
    let store =
        RedisRefStore::connect(url).await.with_context(|| format!("connecting to the reference data at {url}"))?;
    Ok(Arc::new(store))
}

/// Starts the watcher of the `[watch]` directory, if there is one; it stops
/// when `shutdown` is set (a file in progress is resumed by the next start).
pub async fn start_watch(
    engine: Arc<dyn Engine>,
    loaded: &Loaded,
    mut shutdown: tokio::sync::watch::Receiver<bool>,
) -> anyhow::Result<Option<tokio::task::JoinHandle<()>>> {
    let Some(w) = &loaded.config.watch else { return Ok(None) };
    let mut options = WatchOptions {
        poll: Duration::from_millis(w.poll_ms),
        settle: Duration::from_millis(w.settle_ms),
        lease: Duration::from_millis(w.lease_ms),
        ..WatchOptions::default()
    };
    if let Some(owner) = &w.owner {
        options.owner = owner.clone();
    }
    let spec = WatchSpec {
        dir: loaded.base.join(&w.dir),
        run: w.run.clone(),
        slice: w.slice.clone(),
        refdata: w.refdata.as_deref().map(finmesh_pipeline::flow::parse_rfc3339).transpose()?,
        ingest: Default::default(),
        reader: Default::default(),
        options,
    };
    let dir = spec.dir.clone();
    let watcher = Watcher::open(engine, loaded.pipeline.clone(), loaded.schema.clone(), spec)
        .await
        .with_context(|| format!("watching {}", dir.display()))?;
    tracing::info!(dir = %dir.display(), run = %w.run, slice = %w.slice, "watching a directory");
    Ok(Some(tokio::spawn(watcher.run(async move {
        let _ = shutdown.wait_for(|stop| *stop).await;
    }))))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_example_config_loads_and_problems_are_listed_at_once() {
        let path = Path::new(concat!(env!("CARGO_MANIFEST_DIR"), "/../../examples/pipeline/pipeline.toml"));
        let loaded = load(path).expect("the example loads");
        assert_eq!(loaded.pipeline.name(), "risk");
        assert_eq!(loaded.config.enrich.lookup.len(), 1);

        let bad: PipelineConfig = toml::from_str(
            r#"
            [pipeline]
            name = "a.b"
            schema = "s"
            rules = "r"
            [stages]
            batch = 0
            [refdata]
            datasets = { ccy = "float" }
            [[enrich.lookup]]
            dataset = "books"
            field = "book"
            [reconcile]
            window_s = 60
            [watch]
            dir = "in"
            run = "r.1"
            slice = "s"
            refdata = "yesterday"
            lease_ms = 100
            "#,
        )
        .unwrap();
        let problems = bad.validate();
        assert_eq!(problems.len(), 7, "{problems:#?}");
        assert!(problems.iter().any(|p| p.starts_with("watch.run:")), "{problems:#?}");
        assert!(problems.iter().any(|p| p.starts_with("watch.refdata:")), "{problems:#?}");
        assert!(problems.iter().any(|p| p.starts_with("watch.lease_ms:")), "{problems:#?}");
        let redis: PipelineConfig =
            toml::from_str("[pipeline]\nschema='s'\nrules='r'\n[refdata]\nredis='localhost:6379'").unwrap();
        assert_eq!(redis.validate().len(), 1, "{:#?}", redis.validate());
        assert!(toml::from_str::<PipelineConfig>("[pipeline]\nschema='s'\nrules='r'\nnope=1").is_err());
    }
}
