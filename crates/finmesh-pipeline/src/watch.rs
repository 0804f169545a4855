//! Watched-directory ingest: every complete file that appears in a
//! directory is ingested once into one run and slice (issue 20 §1).
//!
//! The watcher **polls** the directory (every [`WatchOptions::poll`]) instead
//! of using OS notifications: a file is only taken once its size and mtime
//! stayed the same for [`WatchOptions::settle`], which needs a timer in
//! any case, polling behaves the same on local disks, NFS and container
//! mounts (where inotify misses changes made by other machines), and a scan
//! is one `read_dir` of a directory that `done/` keeps small.
//!
//! This module owns:
//! - the directory convention: files whose name starts with `.` or ends in
//!   `.part`, `.tmp` or `~` are ignored (write under such a name and rename
//!   when complete: the rename is atomic); other regular files are taken
//!   once their size and mtime are unchanged for `settle` (seen by at least
//!   two scans); subdirectories are ignored. A finished file is moved to
//!   `DIR/done/`; a file that could not be ingested, or that was refused, to
//!   `DIR/failed/` with the reason in `failed/NAME.reason`. A name already
//!   present there gets a `.<unix ms>` suffix;
//! - the claims, KV bucket [`WATCH_BUCKET`], key `{pipeline}.{file id}`
//!   (the file id is [`crate::flow::file_id_from_name`] of the file name),
//!   value a JSON [`Claim`]: who ingests the file, the file's name, size
//!   and mtime, and its state (`ingesting`, `done`, `failed`).
//!
//! Invariants:
//! - **One taker.** A claim is created with compare-and-set
//!   ([`finmesh_core::KvEngine::kv_create`]), so of several watchers on one directory (on
//!   one or several machines sharing it) exactly one takes a file. The taker
//!   renews the claim (a compare-and-set update) every third of
//!   [`WatchOptions::lease`]; a claim not renewed for a lease is stale and
//!   another watcher, or the same one restarted, takes it over, again by
//!   compare-and-set. A claim held by this watcher's own
//!   [`WatchOptions::owner`] is resumed at once.
//! - **Exactly once across crashes.** A taken-over file is ingested again
//!   from its first row; the rows the crashed watcher had published carry
//!   the same message ids `F:row` and are stored once (the streams'
//!   duplicate window, which must be longer than the lease). Its
//!   `file_ingested` event is published once, at the end.
//! - **A file id is taken once.** A file whose id already has a claim for a
//!   different file (another name mapping to the same id, or the same name
//!   with another size or mtime, e.g. dropped again later with new content)
//!   is refused to `failed/`: its rows would share message ids with the
//!   first file's and be dropped as duplicates. Rename it to ingest it as a
//!   new file.
//! - The claim is marked `done` / `failed` before the file is moved, and
//!   the file is moved by the claim's owner: a watcher that stops in between
//!   leaves a finished claim, and a scan a lease later (or its restart under
//!   the same owner, at once) only moves the file.
//!
//! Lease expiry compares the claim's last write time (the engine's clock)
//! with this machine's clock: keep the machines' clocks within a fraction of
//! the lease.
//!
//! User documentation: the "Watched directory" section of `docs/pipeline.md`.

use std::collections::{HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use finmesh_core::{BucketConfig, BucketName, Engine, Error, ErrorKind, Key, Result, Revision, Timestamp};
use serde::{Deserialize, Serialize};
use tokio::time::Instant;

use crate::flow::{self, FileRef, IngestSpec, IngestSummary, Pipeline};
use crate::ingest::IngestOptions;
use crate::reader::ReaderOptions;
use crate::schema::IngestSchema;

/// The bucket holding the claims of every pipeline's watched directories.
pub const WATCH_BUCKET: &str = "pipeline-watch";
/// Where finished files go, under the watched directory.
pub const DONE_DIR: &str = "done";
/// Where failed and refused files go, under the watched directory.
pub const FAILED_DIR: &str = "failed";

/// Timing and identity of a watcher.
#[derive(Debug, Clone)]
pub struct WatchOptions {
    /// Interval between scans. Default 1 s.
    pub poll: Duration,
    /// How long a file's size and mtime must stay unchanged before it is
    /// taken. Default 2 s.
    pub settle: Duration,
    /// A claim not renewed for this long is taken over. Default 30 s.
    pub lease: Duration,
    /// This watcher's name in its claims; a watcher restarted with the same
    /// owner resumes its claims at once instead of after the lease.
    /// Default: random per process. Two running watchers must not share one.
    pub owner: String,
}

impl Default for WatchOptions {
    fn default() -> Self {
        WatchOptions {
            poll: Duration::from_secs(1),
            settle: Duration::from_secs(2),
            lease: Duration::from_secs(30),
            owner: format!("watcher-{:016x}", fastrand::u64(..)),
        }
    }
}

/// What a watcher ingests, and how.
#[derive(Debug, Clone)]
pub struct WatchSpec {
    /// The watched directory.
    pub dir: PathBuf,
    /// The run every file of the directory belongs to.
    pub run: String,
    /// The slice every file of the directory belongs to.
    pub slice: String,
    /// The reference-data version the run pins, if any.
    pub refdata: Option<Timestamp>,
    /// Batching of the ingest.
    pub ingest: IngestOptions,
    /// Reader limits of the ingest.
    pub reader: ReaderOptions,
    /// Timing and identity.
    pub options: WatchOptions,
}

/// A claim's state.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ClaimState {
    /// Its owner is ingesting the file (or crashed doing so).
    Ingesting,
    /// Ingested; the file belongs in `done/`.
    Done,
    /// The file could not be read to its end; it belongs in `failed/`.
    Failed,
}

/// The value of a claim (see the module doc).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Claim {
    pub state: ClaimState,
    pub owner: String,
    /// The file's name in the watched directory.
    pub name: String,
    pub size: u64,
    /// Modification time, ns since the epoch.
    pub mtime_ns: u64,
    /// Why the file failed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
}

impl Claim {
    fn encode(&self) -> Bytes {
        Bytes::from(serde_json::to_vec(self).expect("a claim serializes"))
    }

    fn decode(value: &[u8]) -> Result<Claim> {
        serde_json::from_slice(value).map_err(|e| Error::internal(format!("a watch claim is not a claim: {e}")))
    }

    fn is_of(&self, name: &str, fp: Fingerprint) -> bool {
        self.name == name && self.size == fp.size && self.mtime_ns == fp.mtime_ns
    }
}

/// What one scan did with a file.
#[derive(Debug, Clone, PartialEq)]
pub enum Outcome {
    /// Ingested by this watcher and moved to `done/`.
    Ingested { name: String, summary: IngestSummary },
    /// Moved to `failed/`: it could not be read to its end, or it was refused.
    Failed { name: String, reason: String },
    /// Finished by a watcher that stopped before moving it: moved now.
    Moved { name: String, to: &'static str },
}

impl Outcome {
    /// The file's name.
    pub fn name(&self) -> &str {
        match self {
            Outcome::Ingested { name, .. } | Outcome::Failed { name, .. } | Outcome::Moved { name, .. } => name,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Fingerprint {
    size: u64,
    mtime_ns: u64,
}

struct Seen {
    fp: Fingerprint,
    since: Instant,
}

/// One watcher of one directory.
pub struct Watcher {
    engine: Arc<dyn Engine>,
    pipeline: Pipeline,
    schema: Arc<IngestSchema>,
    spec: WatchSpec,
    bucket: BucketName,
    /// Files seen by earlier scans, with the fingerprint they have had since when.
    seen: HashMap<String, Seen>,
}

fn bucket() -> BucketName {
    BucketName::new(WATCH_BUCKET).expect("a valid bucket name")
}

fn conflict(e: &Error) -> bool {
    matches!(e.kind(), ErrorKind::AlreadyExists | ErrorKind::WrongRevision)
}

/// Names the watcher leaves alone (files still being written).
pub fn is_ignored(name: &str) -> bool {
    name.starts_with('.') || name.ends_with(".part") || name.ends_with(".tmp") || name.ends_with('~')
}

impl Watcher {
    /// A watcher of `spec.dir`; checks the ids, creates the claims bucket
    /// and `done/` and `failed/` if missing.
    pub async fn open(
        engine: Arc<dyn Engine>,
        pipeline: Pipeline,
        schema: Arc<IngestSchema>,
        spec: WatchSpec,
    ) -> Result<Watcher> {
        flow::check_id("run", &spec.run)?;
        flow::check_id("slice", &spec.slice)?;
        if spec.options.lease < Duration::from_millis(300) {
            return Err(Error::invalid("the watch lease must be at least 300 ms"));
        }
        if !spec.dir.is_dir() {
            return Err(Error::invalid(format!("the watched directory {} does not exist", spec.dir.display())));
        }
        for sub in [DONE_DIR, FAILED_DIR] {
            std::fs::create_dir_all(spec.dir.join(sub))
                .map_err(|e| Error::invalid(format!("creating {}: {e}", spec.dir.join(sub).display())))?;
        }
        match engine.bucket_info(&bucket()).await {
            Ok(_) => {}
            Err(e) if e.kind() == ErrorKind::NotFound => {
                match engine.create_bucket(BucketConfig::new(bucket())).await {
                    Ok(_) => {}
                    Err(e) if e.kind() == ErrorKind::AlreadyExists => {}
                    Err(e) => return Err(e),
                }
            }
            Err(e) => return Err(e),
        }
        Ok(Watcher { engine, pipeline, schema, spec, bucket: bucket(), seen: HashMap::new() })
    }

    /// Scans until `shutdown` resolves, waiting [`WatchOptions::poll`]
    /// between scans. A stop mid-file leaves the file claimed: it is resumed
    /// by the next watcher (see the module doc). Scan errors are logged and
    /// the scan is retried.
    pub async fn run(mut self, shutdown: impl std::future::Future<Output = ()>) {
        tokio::pin!(shutdown);
        loop {
            tokio::select! {
                biased;
                _ = &mut shutdown => return,
                r = self.scan() => match r {
                    Ok(outcomes) => for o in outcomes {
                        match &o {
                            Outcome::Ingested { name, summary } => tracing::info!(%name, %summary, "watched file ingested"),
                            Outcome::Failed { name, reason } => tracing::warn!(%name, %reason, "watched file failed"),
                            Outcome::Moved { name, to } => tracing::info!(%name, to, "watched file moved"),
                        }
                    },
                    Err(e) => tracing::warn!(dir = %self.spec.dir.display(), error = %e, "scanning the watched directory failed"),
                },
            }
            tokio::select! {
                _ = &mut shutdown => return,
                _ = tokio::time::sleep(self.spec.options.poll) => {}
            }
        }
    }

    /// One scan: lists the directory and takes every file that has settled.
    /// A file that fails is left for the next scan; the error is returned
    /// when no other file was taken.
    pub async fn scan(&mut self) -> Result<Vec<Outcome>> {
        let now = Instant::now();
        let mut present = HashSet::new();
        let mut ready = Vec::new();
        let entries = std::fs::read_dir(&self.spec.dir)
            .map_err(|e| Error::unavailable(format!("reading {}: {e}", self.spec.dir.display())))?;
        for entry in entries {
            let Ok(entry) = entry else { continue };
            let name = entry.file_name().to_string_lossy().into_owned();
            if is_ignored(&name) {
                continue;
            }
            // A file removed or renamed since the listing is no longer ours to take.
            let Ok(meta) = entry.metadata() else { continue };
            if !meta.is_file() {
                continue;
            }
            let fp = Fingerprint { size: meta.len(), mtime_ns: mtime_ns(&meta) };
            present.insert(name.clone());
            match self.seen.get(&name) {
                Some(s) if s.fp == fp => {
                    if now.duration_since(s.since) >= self.spec.options.settle {
                        ready.push((name, fp));
                    }
                }
                _ => {
                    self.seen.insert(name, Seen { fp, since: now });
                }
            }
        }
        self.seen.retain(|name, _| present.contains(name));
        ready.sort_by(|a, b| a.0.cmp(&b.0));
        let mut outcomes = Vec::new();
        let mut first_error = None;
        for (name, fp) in ready {
            match self.take(&name, fp).await {
                Ok(Some(o)) => {
                    self.seen.remove(&name);
                    outcomes.push(o);
                }
                Ok(None) => {}
                // One file's trouble (say, a move refused) does not hold up
                // the others; it is tried again next scan.
                Err(e) => {
                    tracing::warn!(%name, error = %e, "taking a watched file failed; retrying next scan");
                    first_error.get_or_insert(e);
                }
            }
        }
        match first_error {
            Some(e) if outcomes.is_empty() => Err(e),
            _ => Ok(outcomes),
        }
    }

    /// Claims `name` and ingests it, or finishes what an earlier watcher
    /// left; `None` when another watcher holds it (or took it over).
    async fn take(&self, name: &str, fp: Fingerprint) -> Result<Option<Outcome>> {
        // Files before this one in the scan may have taken long: a file
        // that changed meanwhile has not settled.
        match std::fs::metadata(self.spec.dir.join(name)) {
            Ok(meta) if (Fingerprint { size: meta.len(), mtime_ns: mtime_ns(&meta) }) == fp => {}
            _ => return Ok(None),
        }
        let file_id = flow::file_id_from_name(name);
        let key = Key::new(format!("{}.{file_id}", self.pipeline.name()))?;
        let mine = Claim {
            state: ClaimState::Ingesting,
            owner: self.spec.options.owner.clone(),
            name: name.to_owned(),
            size: fp.size,
            mtime_ns: fp.mtime_ns,
            reason: None,
        };
        let revision = match self.engine.kv_get(&self.bucket, &key).await? {
            None => match self.engine.kv_create(&self.bucket, &key, mine.encode()).await {
                Ok(rev) => rev,
                Err(e) if conflict(&e) => return Ok(None),
                Err(e) => return Err(e),
            },
            Some(entry) => {
                let claim = Claim::decode(&entry.value)?;
                if !claim.is_of(name, fp) {
                    let reason = format!(
                        "file id `{file_id}` was already taken for `{}` ({} bytes, modified {}; {}): a file id is \
                         ingested once, rename the file to ingest it as a new file",
                        claim.name,
                        claim.size,
                        flow::rfc3339(Timestamp(claim.mtime_ns)),
                        match claim.state {
                            ClaimState::Ingesting => "being ingested",
                            ClaimState::Done => "ingested",
                            ClaimState::Failed => "failed",
                        }
                    );
                    return self.finish_failed(name, &reason).map(Some);
                }
                // The claim's owner moves the file itself, unless it stopped
                // (no write for a lease) or this is its restart.
                let stale = Timestamp::now().since(entry.created) >= self.spec.options.lease;
                if claim.owner != mine.owner && !stale {
                    return Ok(None);
                }
                match claim.state {
                    ClaimState::Done => return self.move_finished(name, DONE_DIR, None),
                    ClaimState::Failed => return self.move_finished(name, FAILED_DIR, claim.reason.as_deref()),
                    ClaimState::Ingesting => {
                        match self.engine.kv_update(&self.bucket, &key, mine.encode(), entry.revision).await {
                            Ok(rev) => rev,
                            Err(e) if conflict(&e) => return Ok(None),
                            Err(e) => return Err(e),
                        }
                    }
                }
            }
        };
        let Some((summary, revision)) = self.ingest_claimed(name, &file_id, &key, &mine, revision).await? else {
            return Ok(None);
        };
        let failed = summary.status == "failed";
        let done = Claim {
            state: if failed { ClaimState::Failed } else { ClaimState::Done },
            reason: summary.reason.clone(),
            ..mine
        };
        match self.engine.kv_update(&self.bucket, &key, done.encode(), revision).await {
            Ok(_) => {}
            Err(e) if conflict(&e) => {
                tracing::warn!(%name, "the claim was taken over before the ingest was marked done");
                return Ok(None);
            }
            Err(e) => return Err(e),
        }
        if failed {
            let reason = summary.reason.unwrap_or_default();
            self.finish_failed(name, &reason).map(Some)
        } else {
            match self.move_to(name, DONE_DIR) {
                Ok(_) => {}
                // Removed meanwhile: the ingest stands.
                Err(e) if e.kind() == ErrorKind::NotFound => tracing::warn!(%name, "the ingested file is gone"),
                Err(e) => return Err(e),
            }
            Ok(Some(Outcome::Ingested { name: name.to_owned(), summary }))
        }
    }

    /// Ingests a claimed file, renewing the claim meanwhile; the summary and
    /// the claim's last revision, or `None` when the claim was lost.
    async fn ingest_claimed(
        &self,
        name: &str,
        file_id: &str,
        key: &Key,
        mine: &Claim,
        mut revision: Revision,
    ) -> Result<Option<(IngestSummary, Revision)>> {
        let path = self.spec.dir.join(name);
        let input = match std::fs::File::open(&path) {
            Ok(f) => f,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                // Removed after the listing: release the claim.
                match self.engine.kv_delete_if(&self.bucket, key, revision).await {
                    Ok(_) => return Ok(None),
                    Err(e) if conflict(&e) => return Ok(None),
                    Err(e) => return Err(e),
                }
            }
            Err(e) => return Err(Error::unavailable(format!("opening {}: {e}", path.display()))),
        };
        let spec = IngestSpec {
            file: FileRef::new(&self.spec.run, &self.spec.slice, file_id)?,
            refdata: self.spec.refdata,
            options: self.spec.ingest.clone(),
            reader: self.spec.reader.clone(),
        };
        let ingest = flow::ingest_file(
            self.engine.clone(),
            &self.pipeline,
            self.schema.clone(),
            spec,
            std::io::BufReader::with_capacity(256 << 10, input),
            |_| {},
        );
        tokio::pin!(ingest);
        let mut renew = tokio::time::interval(self.spec.options.lease / 3);
        renew.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        renew.tick().await;
        loop {
            tokio::select! {
                summary = &mut ingest => return Ok(Some((summary?, revision))),
                _ = renew.tick() => {
                    match self.engine.kv_update(&self.bucket, key, mine.encode(), revision).await {
                        Ok(rev) => revision = rev,
                        Err(e) if conflict(&e) => {
                            tracing::warn!(%name, "the claim was taken over (not renewed within the lease); stopping");
                            return Ok(None);
                        }
                        Err(e) => return Err(e),
                    }
                }
            }
        }
    }

    /// Moves a file whose claim an earlier watcher finished.
    fn move_finished(&self, name: &str, to: &'static str, reason: Option<&str>) -> Result<Option<Outcome>> {
        let target = match self.move_to(name, to) {
            Ok(t) => t,
            // Another watcher moved it first.
            Err(e) if e.kind() == ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(e),
        };
        if let Some(reason) = reason {
            write_reason(&target, reason)?;
        }
        Ok(Some(Outcome::Moved { name: name.to_owned(), to }))
    }

    fn finish_failed(&self, name: &str, reason: &str) -> Result<Outcome> {
        match self.move_to(name, FAILED_DIR) {
            Ok(target) => write_reason(&target, reason)?,
            Err(e) if e.kind() == ErrorKind::NotFound => tracing::warn!(%name, %reason, "the failed file is gone"),
            Err(e) => return Err(e),
        }
        Ok(Outcome::Failed { name: name.to_owned(), reason: reason.to_owned() })
    }

    /// Moves `name` into `DIR/sub/`, under a suffixed name if taken.
    fn move_to(&self, name: &str, sub: &str) -> Result<PathBuf> {
        let from = self.spec.dir.join(name);
        let mut to = self.spec.dir.join(sub).join(name);
        if to.exists() {
            let ms = Timestamp::now().as_nanos() / 1_000_000;
            to = self.spec.dir.join(sub).join(format!("{name}.{ms}"));
        }
        match std::fs::rename(&from, &to) {
            Ok(()) => Ok(to),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                Err(Error::not_found(format!("{} is gone", from.display())))
            }
            Err(e) => Err(Error::unavailable(format!("moving {} to {}: {e}", from.display(), to.display()))),
        }
    }
}

fn write_reason(target: &Path, reason: &str) -> Result<()> {
    let mut path = target.as_os_str().to_owned();
    path.push(".reason");
    std::fs::write(&path, format!("{reason}\n"))
        .map_err(|e| Error::unavailable(format!("writing {}: {e}", Path::new(&path).display())))
}

fn mtime_ns(meta: &std::fs::Metadata) -> u64 {
    meta.modified().map(|t| Timestamp::from(t).as_nanos()).unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn files_being_written_are_ignored() {
        for name in [".x.csv", "a.csv.part", "a.csv.tmp", "a.csv~"] {
            assert!(is_ignored(name), "{name}");
        }
        for name in ["a.csv", "part", "a.partial.csv"] {
            assert!(!is_ignored(name), "{name}");
        }
    }

    #[test]
    fn claims_round_trip_and_match_one_file() {
        let c = Claim {
            state: ClaimState::Ingesting,
            owner: "w".into(),
            name: "a.csv".into(),
            size: 10,
            mtime_ns: 5,
            reason: None,
        };
        assert_eq!(Claim::decode(&c.encode()).unwrap(), c);
        assert!(c.is_of("a.csv", Fingerprint { size: 10, mtime_ns: 5 }));
        assert!(!c.is_of("a.csv", Fingerprint { size: 11, mtime_ns: 5 }));
        assert!(!c.is_of("a_csv", Fingerprint { size: 10, mtime_ns: 5 }));
        assert_eq!(Claim::decode(b"{}").unwrap_err().kind(), ErrorKind::Internal);
    }
}
