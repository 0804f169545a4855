//! The reconciler's documents in the `{P}-recon` bucket and their
//! compare-and-set writes.
//!
//! Keys: `run.{run}` (a [`RunStatus`]); a file's tally in a head
//! `file.{run}.{slice}.{file}` and parts `part.{run}.{slice}.{file}.{n}`
//! (format and size bound in [`super::tally`]). Listing a run's files reads
//! the heads (prefix `file.{run}.`); parts are never listed: the head names
//! them, so loading a tally is one read per key, where listing keys by a
//! prefix would cost a scan of the bucket (a consumer on NATS) per file.
//!
//! Invariants:
//! - a tally write never loses rows another writer stored: every key is
//!   written by compare-and-set, and on a conflict the stored value is
//!   merged in (union) and the write retried;
//! - a part is stored before a head lists it ([`save_tally`] writes parts
//!   first), so a reader finds every part the head it read lists; parts
//!   and lists only grow;
//! - a run document is only created by [`open_run`] (once; the same spec
//!   again is a no-op) and only updated at the revision it was read at.
//!
//! Why a tally written over several keys, not atomically, stays correct
//! whatever the crash: the reconciler acks a message only after every key
//! of its flush is written, so every row of an acked message is in a key
//! the head lists. A crash part-way leaves some rows of unacked messages
//! stored and some not (never a row no message carries: a count can lag,
//! never exceed); those messages are redelivered and re-applied, and bits
//! already stored are set again, which changes nothing. A part written whose head was not (a new shard) is unlisted
//! until the redelivery: the next writer does not know its revision, so it
//! writes the part as new, meets the stored one (`WrongRevision`), merges
//! it and then writes a head that lists it. Two reconcilers interleave the
//! same way, key by key, and converge on the union of their rows.

use std::collections::{BTreeMap, BTreeSet};

use finmesh_core::{BucketConfig, Engine, Error, ErrorKind, Result, Revision, Timestamp};

use super::names::{FileRef, Names, check_id, run_files_prefix, run_key};
use super::run::{RunSpec, RunStatus};
use super::tally::{Counted, Failed, FileTally, Ingested};
use crate::rowset::RowSet;

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

/// A file's tally as one process holds it: the tally, the revision of
/// each of its keys as last read or written, and which keys changed since.
/// Changes go through its methods, so none is forgotten by
/// [`save_tally`].
#[derive(Debug, Clone, Default)]
pub struct HeldTally {
    tally: FileTally,
    /// Revision of each shard's key (0: the head) as last read or written;
    /// a shard without one was never seen stored here (written as if new).
    revisions: BTreeMap<u32, Revision>,
    /// Shards whose key must be written (0: the head, also for events).
    dirty: BTreeSet<u32>,
}

impl HeldTally {
    /// The tally.
    pub fn tally(&self) -> &FileTally {
        &self.tally
    }

    /// The tally, without its bookkeeping.
    pub fn into_tally(self) -> FileTally {
        self.tally
    }

    /// Whether something changed since the last [`save_tally`].
    pub fn is_dirty(&self) -> bool {
        !self.dirty.is_empty()
    }

    /// The highest revision of the file's keys (`Revision(0)`: none stored).
    pub fn revision(&self) -> Revision {
        self.revisions.values().copied().max().unwrap_or(Revision(0))
    }

    /// [`FileTally::insert_rows`]; whether a row was new.
    pub fn insert_rows(&mut self, which: Counted, rows: &RowSet, time: Timestamp) -> bool {
        let changed = self.tally.insert_rows(which, rows, time);
        let new = !changed.is_empty();
        self.dirty.extend(changed);
        new
    }

    /// [`FileTally::end_ingest`].
    pub fn end_ingest(&mut self, ingested: Ingested, time: Timestamp) -> bool {
        self.mark_head(|t| t.end_ingest(ingested, time))
    }

    /// [`FileTally::fail_ingest`].
    pub fn fail_ingest(&mut self, failed: Failed, time: Timestamp) -> bool {
        self.mark_head(|t| t.fail_ingest(failed, time))
    }

    /// [`FileTally::note`] (written with the head's next write, not a
    /// change by itself).
    pub fn note(&mut self, source: &str, seq: u64) {
        self.tally.note(source, seq);
    }

    fn mark_head(&mut self, f: impl FnOnce(&mut FileTally) -> bool) -> bool {
        let changed = f(&mut self.tally);
        if changed {
            self.dirty.insert(0);
        }
        changed
    }

    /// Merge `stored`, just read at `stored.revisions`, after a conflict:
    /// take its revisions, and mark dirty every shard whose key lacks
    /// something this copy holds.
    fn absorb(&mut self, stored: HeldTally) {
        let shards: BTreeSet<u32> = std::iter::once(0).chain(self.tally.parts()).chain(stored.tally.parts()).collect();
        let before: BTreeMap<u32, u64> = shards.iter().map(|&n| (n, self.tally.shard_len(n))).collect();
        self.tally.merge(&stored.tally);
        for &n in &shards {
            let now = self.tally.shard_len(n);
            let behind = match stored.revisions.get(&n) {
                // What the key holds is `stored`'s shard `n`.
                Some(_) => now > stored.tally.shard_len(n) || self.tally.shard_time(n) > stored.tally.shard_time(n),
                // Rows of a key not read (a `v:1` head's beyond shard 0).
                None => now > before[&n],
            };
            if behind {
                self.dirty.insert(n);
            }
        }
        self.dirty.insert(0);
        self.revisions.extend(stored.revisions);
    }
}

/// Read `file`'s tally: its head, then every part the head lists. A part
/// the head lists is always stored before the head lists it.
pub async fn load_tally(engine: &dyn Engine, names: &Names, file: &FileRef) -> Result<HeldTally> {
    let bucket = names.bucket();
    let Some(head) = engine.kv_get(&bucket, &file.key()).await? else { return Ok(HeldTally::default()) };
    let (mut tally, parts) = FileTally::decode_head(&head.value)?;
    let mut revisions = BTreeMap::from([(0, head.revision)]);
    for n in parts {
        let part = engine.kv_get(&bucket, &file.part_key(n)).await?.ok_or_else(|| {
            Error::internal(format!("corrupt reconciliation tally: `{}` lists part {n}, which is missing", file.key()))
        })?;
        tally.merge(&FileTally::decode_part(n, &part.value)?);
        revisions.insert(n, part.revision);
    }
    Ok(HeldTally { tally, revisions, dirty: BTreeSet::new() })
}

/// The files of `run` with a stored tally.
pub async fn run_files(engine: &dyn Engine, names: &Names, run: &str) -> Result<Vec<FileRef>> {
    let keys = engine.kv_keys(&names.bucket(), &run_files_prefix(run)).await?;
    Ok(keys.iter().filter_map(|k| FileRef::from_key(k.as_str())).collect())
}

/// Write what changed in `held` since it was read or last written: first
/// each changed part (and any part the store has not seen from here), then
/// the head if it changed or must list a new part. Every key is written
/// by compare-and-set; on a conflict the stored value is merged in and the
/// write retried (a head conflict re-reads the whole tally, which may make
/// more parts due). On return every key holds what `held` holds.
pub async fn save_tally(engine: &dyn Engine, names: &Names, file: &FileRef, held: &mut HeldTally) -> Result<()> {
    let bucket = names.bucket();
    loop {
        let due: Vec<u32> = held
            .tally
            .parts()
            .into_iter()
            .filter(|n| held.dirty.contains(n) || !held.revisions.contains_key(n))
            .collect();
        for n in due {
            if !held.revisions.contains_key(&n) {
                held.dirty.insert(0); // the head must list it
            }
            save_part(engine, names, file, held, n).await?;
        }
        if !held.dirty.contains(&0) {
            held.dirty.clear();
            return Ok(());
        }
        let expected = held.revisions.get(&0).copied().unwrap_or(Revision(0));
        match engine.kv_update(&bucket, &file.key(), held.tally.encode_head(), expected).await {
            Ok(r) => {
                held.revisions.insert(0, r);
                held.dirty.clear();
                return Ok(());
            }
            Err(e) if e.kind() == ErrorKind::WrongRevision => {
                let stored = load_tally(engine, names, file).await?;
                if !stored.revisions.contains_key(&0) {
                    return Err(Error::unavailable(format!("`{}` was deleted while being written", file.key())));
                }
                held.absorb(stored);
            }
            Err(e) => return Err(e),
        }
    }
}

/// Write part `n` of `held` by compare-and-set, merging the stored part on
/// a conflict.
async fn save_part(engine: &dyn Engine, names: &Names, file: &FileRef, held: &mut HeldTally, n: u32) -> Result<()> {
    let (bucket, key) = (names.bucket(), file.part_key(n));
    loop {
        let expected = held.revisions.get(&n).copied().unwrap_or(Revision(0));
        match engine.kv_update(&bucket, &key, held.tally.encode_part(n), expected).await {
            Ok(r) => {
                held.revisions.insert(n, r);
                held.dirty.remove(&n);
                return Ok(());
            }
            Err(e) if e.kind() == ErrorKind::WrongRevision => {
                let stored = engine.kv_get(&bucket, &key).await?;
                if let Some(stored) = stored {
                    held.tally.merge(&FileTally::decode_part(n, &stored.value)?);
                    held.revisions.insert(n, stored.revision);
                } else {
                    return Err(Error::unavailable(format!("`{key}` was deleted while being written")));
                }
            }
            Err(e) => return Err(e),
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use finmesh_embedded::EmbeddedEngine;

    use super::*;
    use crate::reconcile::tally::SHARD_ROWS_LOG2;

    const SHARD: u32 = 1 << SHARD_ROWS_LOG2;

    async fn setup() -> (Arc<dyn Engine>, Names, FileRef, tempfile::TempDir) {
        let dir = tempfile::tempdir().unwrap();
        let engine: Arc<dyn Engine> = Arc::new(EmbeddedEngine::open(dir.path()).unwrap());
        let names = Names::new("risk").unwrap();
        ensure_bucket(&*engine, &names).await.unwrap();
        (engine, names, FileRef::new("r", "s", "a").unwrap(), dir)
    }

    fn add(held: &mut HeldTally, which: Counted, rows: &[u32], time: u64) -> bool {
        held.insert_rows(which, &RowSet::from_sorted(rows.iter().copied()).unwrap(), Timestamp(time))
    }

    fn rows(t: &FileTally, which: Counted) -> Vec<u32> {
        t.bits(which).iter().collect()
    }

    async fn head(engine: &dyn Engine, names: &Names, file: &FileRef) -> String {
        let e = engine.kv_get(&names.bucket(), &file.key()).await.unwrap().unwrap();
        String::from_utf8(e.value.to_vec()).unwrap()
    }

    #[tokio::test]
    async fn a_tally_round_trips_through_its_keys() {
        let (engine, names, a, _dir) = setup().await;
        let mut held = load_tally(&*engine, &names, &a).await.unwrap();
        assert_eq!(held.revision(), Revision(0));
        add(&mut held, Counted::Raw, &[1, 2, SHARD - 1, SHARD, 3 * SHARD + 5], 7);
        assert!(held.end_ingest(Ingested { rows: 9, records: 9, exceptions: 0, at: Timestamp(8) }, Timestamp(8)));
        held.note("raw", 41);
        save_tally(&*engine, &names, &a, &mut held).await.unwrap();
        assert!(!held.is_dirty());
        let back = load_tally(&*engine, &names, &a).await.unwrap();
        assert_eq!(back.tally(), held.tally());
        assert_eq!(back.tally().applied()["raw"], 41);
        assert!(head(&*engine, &names, &a).await.contains("\"parts\":[1,3]"));
        assert_eq!(back.revision(), Revision(3), "parts 1 and 3, then the head");

        // Nothing changed: nothing written.
        let mut again = back;
        again.note("raw", 42);
        assert!(!add(&mut again, Counted::Raw, &[2], 9));
        save_tally(&*engine, &names, &a, &mut again).await.unwrap();
        assert_eq!(load_tally(&*engine, &names, &a).await.unwrap().revision(), Revision(3));
    }

    /// Two copies read at the same time and written one after the other:
    /// the second meets the first's writes key by key (a part both
    /// changed, the head, a part it does not know yet) and stores the
    /// union; the first, stale, does the same on its next write.
    #[tokio::test]
    async fn stale_copies_merge_key_by_key() {
        let (engine, names, a, _dir) = setup().await;
        let mut x = load_tally(&*engine, &names, &a).await.unwrap();
        let mut y = x.clone();
        add(&mut x, Counted::Raw, &[5, 2 * SHARD + 1], 1);
        add(&mut y, Counted::Raw, &[6, 2 * SHARD + 2, 4 * SHARD], 2);
        assert!(y.fail_ingest(Failed { reason: "bad".into(), at: Timestamp(2) }, Timestamp(2)));
        save_tally(&*engine, &names, &a, &mut x).await.unwrap();
        save_tally(&*engine, &names, &a, &mut y).await.unwrap();
        let stored = load_tally(&*engine, &names, &a).await.unwrap();
        assert_eq!(rows(stored.tally(), Counted::Raw), vec![5, 6, 2 * SHARD + 1, 2 * SHARD + 2, 4 * SHARD]);
        assert_eq!(stored.tally().failed().unwrap().reason, "bad");
        assert_eq!(stored.tally(), y.tally(), "the second writer holds the union");

        add(&mut x, Counted::Validated, &[4 * SHARD + 1], 3);
        save_tally(&*engine, &names, &a, &mut x).await.unwrap();
        let stored = load_tally(&*engine, &names, &a).await.unwrap();
        assert_eq!(rows(stored.tally(), Counted::Raw).len(), 5);
        assert_eq!(rows(stored.tally(), Counted::Validated), vec![4 * SHARD + 1]);
        assert_eq!(stored.tally(), x.tally());
        assert_eq!(stored.tally().last_time(), Timestamp(3));
    }

    /// A writer that crashed after writing a new part and before the head
    /// that lists it left the part unlisted: the next writer of that shard
    /// writes it as new, meets it, merges it, and lists it.
    #[tokio::test]
    async fn an_unlisted_part_is_merged_not_overwritten() {
        let (engine, names, a, _dir) = setup().await;
        let mut crashed = HeldTally::default();
        add(&mut crashed, Counted::Raw, &[SHARD + 1, SHARD + 3], 1);
        engine.kv_put(&names.bucket(), &a.part_key(1), crashed.tally().encode_part(1)).await.unwrap();

        let mut next = load_tally(&*engine, &names, &a).await.unwrap();
        assert_eq!(next.tally().count(Counted::Raw), 0, "an unlisted part is not read");
        add(&mut next, Counted::Raw, &[SHARD + 1, SHARD + 2], 2);
        save_tally(&*engine, &names, &a, &mut next).await.unwrap();
        let stored = load_tally(&*engine, &names, &a).await.unwrap();
        assert_eq!(rows(stored.tally(), Counted::Raw), vec![SHARD + 1, SHARD + 2, SHARD + 3]);
        assert!(head(&*engine, &names, &a).await.contains("\"parts\":[1]"));
    }

    /// A head stored before shards existed (`v:1`, rows of any shard) is
    /// read whole; the next write moves its rows beyond shard 0 into parts
    /// before the head (now `v:2`) drops them.
    #[tokio::test]
    async fn a_v1_head_is_read_and_rewritten_in_parts() {
        let (engine, names, a, _dir) = setup().await;
        let mut raw = roaring::RoaringBitmap::new();
        raw.insert_range(1..=SHARD + 9);
        let mut buf = Vec::new();
        raw.serialize_into(&mut buf).unwrap();
        use base64::Engine as _;
        let v1 = serde_json::json!({
            "v": 1,
            "bits": {"raw": base64::engine::general_purpose::STANDARD.encode(buf)},
            "last_time": 5,
            "applied": {"raw": 3},
        });
        engine.kv_put(&names.bucket(), &a.key(), serde_json::to_vec(&v1).unwrap().into()).await.unwrap();
        let mut held = load_tally(&*engine, &names, &a).await.unwrap();
        assert_eq!(held.tally().count(Counted::Raw), u64::from(SHARD + 9));
        add(&mut held, Counted::Validated, &[1], 6);
        save_tally(&*engine, &names, &a, &mut held).await.unwrap();
        assert!(head(&*engine, &names, &a).await.starts_with("{\"v\":2,"));
        let back = load_tally(&*engine, &names, &a).await.unwrap();
        assert_eq!(back.tally(), held.tally());
        assert_eq!(back.tally().count(Counted::Raw), u64::from(SHARD + 9), "no row lost in the move");
        assert_eq!(back.tally().last_time(), Timestamp(6));
    }
}
