//! A pipeline's definition in the engine: its schema and its rules.
//!
//! Owns the KV bucket [`DEFINITION_BUCKET`] (history [`RULES_HISTORY`]), so
//! every gateway and stage worker, on any machine, reads the same
//! definition from the engine instead of from local files:
//! - `{P}.schema`: the `.avsc` text (put by `finmesh pipeline run` /
//!   `pipeline worker` from their config at start, and by [`store_schema`]);
//! - `{P}.rules`: the rules text, checked against the schema before it is
//!   stored ([`store_rules`], `finmesh pipeline rules apply`);
//! - `{P}.run.{run}`: the rules revision a run uses ([`run_rules`]), fixed by
//!   compare-and-set the first time a stage sees the run. A run keeps the
//!   rules it started with; a rules change applies to runs that a validate
//!   worker first sees after the change is stored.

use std::sync::Arc;

use bytes::Bytes;
use finmesh_core::{BucketConfig, BucketName, Error, ErrorKind, Key, KvEngine, Result, Revision};
use finmesh_rules::{Datasets, RuleSet};

use crate::flow::Pipeline;
use crate::schema::IngestSchema;

/// The bucket holding pipeline definitions.
pub const DEFINITION_BUCKET: &str = "pipelines";
/// Revisions of a key the bucket keeps (a run's rules must still be
/// readable at its revision: at most this many `rules apply` during a run).
pub const RULES_HISTORY: u8 = 64;

fn bucket() -> BucketName {
    BucketName::new(DEFINITION_BUCKET).expect("a valid bucket name")
}

fn key(p: &Pipeline, what: &str) -> Result<Key> {
    Key::new(format!("{}.{what}", p.name()))
}

/// Creates the definition bucket if it is missing.
pub async fn ensure_bucket(engine: &dyn KvEngine) -> Result<()> {
    match engine.bucket_info(&bucket()).await {
        Ok(_) => return Ok(()),
        Err(e) if e.kind() == ErrorKind::NotFound => {}
        Err(e) => return Err(e),
    }
    let mut config = BucketConfig::new(bucket());
    config.history = RULES_HISTORY;
    match engine.create_bucket(config).await {
        Ok(_) => Ok(()),
        Err(e) if e.kind() == ErrorKind::AlreadyExists => Ok(()),
        Err(e) => Err(e),
    }
}

/// Stores the schema text after checking it parses as an ingest schema.
pub async fn store_schema(engine: &dyn KvEngine, p: &Pipeline, avsc: &str) -> Result<Revision> {
    IngestSchema::parse(avsc).map_err(|e| Error::invalid(format!("the schema of pipeline `{}`: {e}", p.name())))?;
    ensure_bucket(engine).await?;
    engine.kv_put(&bucket(), &key(p, "schema")?, Bytes::copy_from_slice(avsc.as_bytes())).await
}

/// The pipeline's schema; `NotFound` naming how to define it.
pub async fn load_schema(engine: &dyn KvEngine, p: &Pipeline) -> Result<Arc<IngestSchema>> {
    let entry = match engine.kv_get(&bucket(), &key(p, "schema")?).await {
        Ok(Some(e)) => e,
        Ok(None) => return Err(not_defined(p)),
        Err(e) if e.kind() == ErrorKind::NotFound => return Err(not_defined(p)),
        Err(e) => return Err(e),
    };
    let text = std::str::from_utf8(&entry.value).map_err(|_| Error::internal("the stored schema is not UTF-8"))?;
    IngestSchema::parse(text)
        .map(Arc::new)
        .map_err(|e| Error::internal(format!("the stored schema of pipeline `{}` does not parse: {e}", p.name())))
}

fn not_defined(p: &Pipeline) -> Error {
    Error::not_found(format!(
        "pipeline `{}` is not defined: start `finmesh pipeline run` (or `pipeline worker`) with its config first",
        p.name()
    ))
}

/// Compiles `text` against `schema` and `datasets`; every error rendered.
pub fn compile_rules(text: &str, schema: &IngestSchema, datasets: &Datasets, origin: &str) -> Result<RuleSet> {
    RuleSet::compile(text, schema.avro(), datasets)
        .map_err(|errors| Error::invalid(finmesh_rules::render_all(&errors, text, origin)))
}

/// Checks the rules against the stored schema and stores them; the new
/// rules apply to runs first seen after this (see the module doc).
pub async fn store_rules(engine: &dyn KvEngine, p: &Pipeline, text: &str, datasets: &Datasets) -> Result<Revision> {
    let schema = load_schema(engine, p).await?;
    compile_rules(text, &schema, datasets, "rules")?;
    engine.kv_put(&bucket(), &key(p, "rules")?, Bytes::copy_from_slice(text.as_bytes())).await
}

/// The current rules text and its revision, if any are stored.
pub async fn current_rules(engine: &dyn KvEngine, p: &Pipeline) -> Result<Option<(String, Revision)>> {
    ensure_bucket(engine).await?;
    let Some(entry) = engine.kv_get(&bucket(), &key(p, "rules")?).await? else { return Ok(None) };
    let text = String::from_utf8(entry.value.to_vec()).map_err(|_| Error::internal("stored rules are not UTF-8"))?;
    Ok(Some((text, entry.revision)))
}

/// The rules text run `run` uses: the revision fixed for the run, or, the
/// first time, the current rules (fixed for the run from then on). `None`
/// when no rules are stored.
pub async fn run_rules(engine: &dyn KvEngine, p: &Pipeline, run: &str) -> Result<Option<(String, Revision)>> {
    let run_key = key(p, &format!("run.{run}"))?;
    let rules_key = key(p, "rules")?;
    ensure_bucket(engine).await?;
    loop {
        if let Some(entry) = engine.kv_get(&bucket(), &run_key).await? {
            let rev = std::str::from_utf8(&entry.value)
                .ok()
                .and_then(|s| s.parse::<u64>().ok())
                .ok_or_else(|| Error::internal(format!("the rules revision of run `{run}` is not a number")))?;
            let Some(rules) = engine.kv_get_revision(&bucket(), &rules_key, Revision(rev)).await? else {
                return Err(Error::not_found(format!(
                    "the rules revision {rev} of run `{run}` is no longer kept (more than {RULES_HISTORY} changes since)"
                )));
            };
            let text =
                String::from_utf8(rules.value.to_vec()).map_err(|_| Error::internal("stored rules are not UTF-8"))?;
            return Ok(Some((text, Revision(rev))));
        }
        let Some((_, rev)) = current_rules(engine, p).await? else { return Ok(None) };
        match engine.kv_create(&bucket(), &run_key, Bytes::from(rev.0.to_string())).await {
            Ok(_) => continue,
            Err(e) if matches!(e.kind(), ErrorKind::AlreadyExists | ErrorKind::WrongRevision) => continue,
            Err(e) => return Err(e),
        }
    }
}
