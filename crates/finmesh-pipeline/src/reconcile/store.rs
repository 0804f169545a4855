//! The reconciler's documents in the `{P}-recon` bucket and their
//! compare-and-set writes.
//!
//! Invariants: a tally write never loses rows another writer stored (on a
//! revision conflict the stored tally is merged in and the write retried);
//! a run document is only created by [`open_run`] (once; the same spec again
//! is a no-op) and only updated at the revision it was read at.

use finmesh_core::{BucketConfig, Engine, Error, ErrorKind, Result, Revision, Timestamp};

use super::names::{FileRef, Names, check_id, run_files_prefix, run_key};
use super::run::{RunSpec, RunStatus};
use super::tally::FileTally;

/// Create the `{P}-recon` bucket if it does not exist.
pub async fn ensure_bucket(engine: &dyn Engine, names: &Names) -> Result<()> {
    match engine.bucket_info(&names.bucket()).await {
        Ok(_) => Ok(()),
        Err(e) if e.kind() == ErrorKind::NotFound => {
            match engine.create_bucket(BucketConfig::new(names.bucket())).await {
                Ok(_) => Ok(()),
                Err(e) if e.kind() == ErrorKind::AlreadyExists => Ok(()),
                Err(e) => Err(e),
            }
        }
        Err(e) => Err(e),
    }
}

/// Open run `run` with `spec`: its document is created in state `open`.
/// The same request again ([`RunSpec::same_request`]) returns the stored
/// status; another spec is `AlreadyExists` (a run's expectations do not
/// change under it).
pub async fn open_run(engine: &dyn Engine, names: &Names, run: &str, spec: RunSpec) -> Result<RunStatus> {
    check_id("run id", run)?;
    ensure_bucket(engine, names).await?;
    let status = RunStatus::opened(names.pipeline(), run, spec, Timestamp::now());
    let value = serde_json::to_vec(&status).expect("a status serialises");
    match engine.kv_create(&names.bucket(), &run_key(run), value.into()).await {
        Ok(_) => Ok(status),
        Err(e) if e.kind() == ErrorKind::WrongRevision => {
            let (existing, _) = load_run(engine, names, run)
                .await?
                .ok_or_else(|| Error::unavailable(format!("run `{run}` is being replaced; try again")))?;
            if existing.spec.same_request(&status.spec) {
                Ok(existing)
            } else {
                Err(Error::new(
                    ErrorKind::AlreadyExists,
                    format!("run `{run}` is already open with other slices or another deadline"),
                ))
            }
        }
        Err(e) => Err(e),
    }
}

/// The stored status of `run` and its revision; `None` for a run never
/// opened (or a pipeline without reconciliation state).
pub async fn load_run(engine: &dyn Engine, names: &Names, run: &str) -> Result<Option<(RunStatus, Revision)>> {
    check_id("run id", run)?;
    let entry = match engine.kv_get(&names.bucket(), &run_key(run)).await {
        Ok(e) => e,
        Err(e) if e.kind() == ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(e),
    };
    entry
        .map(|e| {
            serde_json::from_slice(&e.value)
                .map(|s| (s, e.revision))
                .map_err(|err| Error::internal(format!("corrupt status of run `{run}`: {err}")))
        })
        .transpose()
}

/// Write `status` at `expected`; the new revision, or `WrongRevision`.
pub async fn save_run(engine: &dyn Engine, names: &Names, status: &RunStatus, expected: Revision) -> Result<Revision> {
    let value = serde_json::to_vec(status).expect("a status serialises");
    engine.kv_update(&names.bucket(), &run_key(&status.run), value.into(), expected).await
}

/// Runs with a document, by id.
pub async fn list_runs(engine: &dyn Engine, names: &Names) -> Result<Vec<String>> {
    let keys = engine.kv_keys(&names.bucket(), "run.").await?;
    Ok(keys.iter().filter_map(|k| k.as_str().strip_prefix("run.").map(str::to_owned)).collect())
}

/// The stored tally of `file` and its revision (`Revision(0)` if none).
pub async fn load_tally(engine: &dyn Engine, names: &Names, file: &FileRef) -> Result<(FileTally, Revision)> {
    match engine.kv_get(&names.bucket(), &file.key()).await? {
        Some(e) => Ok((FileTally::decode(&e.value)?, e.revision)),
        None => Ok((FileTally::default(), Revision(0))),
    }
}

/// The files of `run` with a stored tally.
pub async fn run_files(engine: &dyn Engine, names: &Names, run: &str) -> Result<Vec<FileRef>> {
    let keys = engine.kv_keys(&names.bucket(), &run_files_prefix(run)).await?;
    Ok(keys.iter().filter_map(|k| FileRef::from_key(k.as_str())).collect())
}

/// Write `tally` at `*revision`; on a conflict merge the stored tally into
/// it and retry. On return `tally` is what is stored and `*revision` its
/// revision.
pub async fn save_tally(
    engine: &dyn Engine,
    names: &Names,
    file: &FileRef,
    tally: &mut FileTally,
    revision: &mut Revision,
) -> Result<()> {
    loop {
        match engine.kv_update(&names.bucket(), &file.key(), tally.encode(), *revision).await {
            Ok(r) => {
                *revision = r;
                return Ok(());
            }
            Err(e) if e.kind() == ErrorKind::WrongRevision => {
                let (stored, r) = load_tally(engine, names, file).await?;
                tally.merge(&stored);
                *revision = r;
            }
            Err(e) => return Err(e),
        }
    }
}
