//! Key administration on a running node: list, rotate, retire and restore
//! data keys, count what a key still protects, and re-encrypt a bucket
//! under the active key. [`KeyAdmin`] is what the gateway's `/v1/keys`
//! routes and `finmesh keys` / `finmesh kv reencrypt` act through; it holds
//! the [`SecureEngine`], so it reaches the inner engine and the ring without
//! the gateway knowing either.
//!
//! Invariants:
//! - nothing here returns or logs key material: [`KeyInfo`] carries id,
//!   purpose, state and creation time only;
//! - a key is retired only after a scan found nothing it still protects
//!   ([`KeyAdmin::usage`]): for an encryption key, the latest value of every
//!   key of every encrypted bucket whose envelope header names it; for a
//!   hashing key, every stored key of every hashed bucket whose `h1.<id>.`
//!   names it. Older revisions kept by `history > 1` are not counted (the
//!   history of a key is not rewritten): after a retirement they no longer
//!   open. A value sealed by a gateway that had not yet seen a rotation
//!   between the scan and the retirement would not open either; `restore`
//!   undoes that (docs/security.md);
//! - [`KeyAdmin::reencrypt`] rewrites a value only with a compare-and-set at
//!   the revision it read, under the same stored key, so a concurrent write
//!   is never overwritten: a value changed meanwhile is skipped (it was
//!   written under the active key). It never re-hashes a key: a hash cannot
//!   be reversed, so the clear key is unknown here (docs/security.md says how
//!   a hashing key is retired);
//! - without a rate limit, the next batch's values are read and sealed
//!   while the current batch's compare-and-sets are under way (never
//!   written before the current batch's cursor is saved); with one,
//!   batches run one after the other;
//! - the job's cursor lives in the keys bucket under
//!   `reencrypt.<bucket>` ([`cursor_key`]) and is written after every batch,
//!   so a job stopped anywhere resumes after the last finished batch; a
//!   cursor made for another active key is not resumed (the job starts
//!   over: everything it did is under a key that is no longer active);
//! - one job per bucket runs on a node at a time (a second start is
//!   `AlreadyExists`); jobs on two gateways at once are harmless (both CAS)
//!   but waste work.

use std::collections::{BTreeMap, HashSet};
use std::num::NonZeroU32;
use std::ops::ControlFlow;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use finmesh_core::{BucketName, Engine, Error, ErrorKind, Key, KvOp, Result, Revision, Timestamp};
use futures::StreamExt;
use parking_lot::Mutex;
use serde::{Deserialize, Serialize};

use crate::ring::{KeyId, KeyPurpose, KeyRing, KeyState};
use crate::secure::SecureEngine;
use crate::store::{KEYS_BUCKET, RingStore};
use crate::{envelope, hashed_key_id, key_id_of};

/// Reads and compare-and-sets a job or a scan keeps in flight at once:
/// more than a default batch, so that an engine with group commit (the
/// embedded one) writes a whole batch in one commit and one fsync.
const IN_FLIGHT: usize = 512;
/// Keys a usage scan lists per page.
const SCAN_PAGE: usize = 1_000;
/// Default keys per re-encryption batch.
pub const DEFAULT_REENCRYPT_BATCH: usize = 500;
/// Largest keys per re-encryption batch.
pub const MAX_REENCRYPT_BATCH: usize = 10_000;

/// What `finmesh keys list` shows of a key: never its material.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct KeyInfo {
    /// The key id (in every ciphertext header and hashed key it made).
    pub id: KeyId,
    /// `encryption` or `hashing`.
    pub purpose: KeyPurpose,
    /// `active`, `decrypt_only` or `retired`.
    pub state: KeyState,
    /// When the key was made.
    pub created: Timestamp,
}

/// What a key still protects: per bucket, the values sealed with it (an
/// encryption key) or the keys stored under its hash (a hashing key).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct KeyUsage {
    /// The key counted.
    pub key_id: KeyId,
    /// The key's purpose.
    pub purpose: KeyPurpose,
    /// Values (or stored keys) across all buckets.
    pub total: u64,
    /// Per bucket with at least one, by name.
    pub buckets: BTreeMap<String, u64>,
}

impl KeyUsage {
    /// `bucket `a`: 3 values, bucket `b`: 1 value`.
    pub fn describe(&self) -> String {
        let what = match self.purpose {
            KeyPurpose::Hashing => "keys",
            KeyPurpose::Encryption => "values",
        };
        self.buckets.iter().map(|(b, n)| format!("bucket `{b}`: {n} {what}")).collect::<Vec<_>>().join(", ")
    }
}

/// How a re-encryption runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ReencryptOptions {
    /// Most values examined per second; `None` = as fast as the engine goes.
    pub rate: Option<NonZeroU32>,
    /// Keys per batch (1 to [`MAX_REENCRYPT_BATCH`]); progress is reported
    /// and the cursor saved after each.
    pub batch: usize,
    /// Ignore a saved cursor and start from the first key.
    pub restart: bool,
}

impl Default for ReencryptOptions {
    fn default() -> Self {
        ReencryptOptions { rate: None, batch: DEFAULT_REENCRYPT_BATCH, restart: false }
    }
}

/// Counts of a re-encryption.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ReencryptCounts {
    /// Keys examined.
    pub scanned: u64,
    /// Values rewritten under the target key.
    pub rewritten: u64,
    /// Values already under the target key (or deleted: nothing to seal).
    pub current: u64,
    /// Values changed by a client between read and rewrite: skipped, since
    /// the client's write was sealed with the active key.
    pub changed: u64,
    /// Values that do not open (integrity failure, retired key): left as
    /// they are and logged (bucket, revision, key id).
    pub failed: u64,
}

impl ReencryptCounts {
    fn add(&mut self, other: &ReencryptCounts) {
        self.scanned += other.scanned;
        self.rewritten += other.rewritten;
        self.current += other.current;
        self.changed += other.changed;
        self.failed += other.failed;
    }
}

/// Where a re-encryption is: reported after every batch and saved as the
/// job's cursor.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ReencryptProgress {
    /// The bucket.
    pub bucket: String,
    /// The encryption key values are rewritten under (the active one when
    /// the job started).
    pub key_id: KeyId,
    /// Entries in the bucket when the job started (live keys plus delete
    /// markers and history): the progress bar's length, an upper bound.
    pub estimate: u64,
    /// The last stored key finished; the job resumes after it.
    pub after: Option<String>,
    /// Whether this run continued a saved cursor.
    pub resumed: bool,
    /// Whether every key was examined.
    pub done: bool,
    /// Counts of this run.
    pub run: ReencryptCounts,
    /// Counts since the job first started (this run and the ones it resumed).
    pub total: ReencryptCounts,
}

/// The key of a bucket's re-encryption cursor in [`KEYS_BUCKET`].
pub fn cursor_key(bucket: &BucketName) -> Key {
    Key::new(format!("reencrypt.{bucket}")).expect("a bucket name makes a valid key")
}

/// Key administration (see the module doc).
pub struct KeyAdmin {
    secure: Arc<SecureEngine>,
    /// Buckets with a re-encryption running on this node.
    running: Mutex<HashSet<BucketName>>,
}

/// Removes a bucket from [`KeyAdmin::running`] when its job ends, however.
struct Running<'a> {
    admin: &'a KeyAdmin,
    bucket: BucketName,
}

impl Drop for Running<'_> {
    fn drop(&mut self) {
        self.admin.running.lock().remove(&self.bucket);
    }
}

impl KeyAdmin {
    /// Administer the keys of `secure`.
    pub fn new(secure: Arc<SecureEngine>) -> KeyAdmin {
        KeyAdmin { secure, running: Mutex::new(HashSet::new()) }
    }

    /// The key ring store.
    pub fn keys(&self) -> &Arc<RingStore> {
        self.secure.keys()
    }

    fn inner(&self) -> &Arc<dyn Engine> {
        self.secure.inner()
    }

    /// Every key of the stored ring (read fresh, so a rotation made through
    /// another gateway shows at once).
    pub async fn list(&self) -> Result<Vec<KeyInfo>> {
        let ring = self.keys().reload().await?;
        Ok(ring.keys().map(info).collect())
    }

    /// Make a new active key for `purpose`; the old one becomes decrypt-only.
    pub async fn rotate(&self, purpose: KeyPurpose) -> Result<KeyInfo> {
        let id = self.keys().rotate(purpose).await?;
        self.key(id).await
    }

    /// The key `id` of the stored ring; `NotFound` if there is none.
    pub async fn key(&self, id: KeyId) -> Result<KeyInfo> {
        let ring = self.keys().reload().await?;
        ring.get(id).map(info).ok_or_else(|| Error::not_found(format!("the key ring has no key {id}")))
    }

    /// Retire key `id` unless it still protects something: `Ok(Err(usage))`
    /// when it does (nothing changed), `Ok(Ok(key))` when it was retired.
    pub async fn retire(&self, id: KeyId) -> Result<std::result::Result<KeyInfo, KeyUsage>> {
        let key = self.key(id).await?;
        if key.state == KeyState::DecryptOnly {
            let usage = self.usage(id).await?;
            if usage.total > 0 {
                return Ok(Err(usage));
            }
        }
        self.keys().retire(id).await?;
        Ok(Ok(self.key(id).await?))
    }

    /// Undo a retirement.
    pub async fn restore(&self, id: KeyId) -> Result<KeyInfo> {
        self.key(id).await?;
        self.keys().restore(id).await?;
        self.key(id).await
    }

    /// Count what key `id` still protects (see the module doc): scans the
    /// inner engine page by page.
    pub async fn usage(&self, id: KeyId) -> Result<KeyUsage> {
        let purpose = self.key(id).await?.purpose;
        let mut usage = KeyUsage { key_id: id, purpose, total: 0, buckets: BTreeMap::new() };
        for bucket in self.inner().list_buckets().await? {
            if bucket.is_reserved() {
                continue;
            }
            let policy = match self.secure.policy(&bucket).await {
                Err(e) if e.kind() == ErrorKind::NotFound => continue, // deleted meanwhile
                r => r?,
            };
            let n = match purpose {
                KeyPurpose::Encryption if policy.sealed() => self.count_sealed(&bucket, id).await?,
                KeyPurpose::Hashing if policy.hashed() => self.count_hashed(&bucket, id).await?,
                _ => 0,
            };
            if n > 0 {
                usage.total += n;
                usage.buckets.insert(bucket.to_string(), n);
            }
        }
        Ok(usage)
    }

    async fn count_sealed(&self, bucket: &BucketName, id: KeyId) -> Result<u64> {
        let mut after: Option<Key> = None;
        let mut n = 0;
        loop {
            let page = self.inner().kv_keys_page(bucket, "", after.as_ref(), SCAN_PAGE).await?;
            let entries: Vec<_> = futures::stream::iter(page.keys.iter().cloned())
                .map(|k| {
                    let (inner, bucket) = (self.inner().clone(), bucket.clone());
                    async move { inner.kv_get(&bucket, &k).await }
                })
                .buffered(IN_FLIGHT)
                .collect()
                .await;
            for entry in entries {
                if let Some(e) = entry?
                    && e.op == KvOp::Put
                    && key_id_of(&e.value).ok() == Some(id)
                {
                    n += 1;
                }
            }
            match page.next {
                Some(next) => after = Some(next),
                None => return Ok(n),
            }
        }
    }

    async fn count_hashed(&self, bucket: &BucketName, id: KeyId) -> Result<u64> {
        let mut after: Option<Key> = None;
        let mut n = 0;
        loop {
            let page = self.inner().kv_keys_page(bucket, "", after.as_ref(), SCAN_PAGE).await?;
            n += page.keys.iter().filter(|k| hashed_key_id(k) == Some(id)).count() as u64;
            match page.next {
                Some(next) => after = Some(next),
                None => return Ok(n),
            }
        }
    }

    /// The saved cursor of `bucket`'s re-encryption, if any.
    pub async fn cursor(&self, bucket: &BucketName) -> Result<Option<ReencryptProgress>> {
        let keys = keys_bucket();
        let Some(entry) = self.inner().kv_get(&keys, &cursor_key(bucket)).await? else { return Ok(None) };
        if entry.op != KvOp::Put {
            return Ok(None);
        }
        serde_json::from_slice(&entry.value)
            .map(Some)
            .map_err(|e| Error::internal(format!("the re-encryption cursor of bucket `{bucket}` is unreadable: {e}")))
    }

    async fn save_cursor(&self, progress: &ReencryptProgress, bucket: &BucketName) -> Result<()> {
        let bytes = Bytes::from(serde_json::to_vec(progress).map_err(|e| Error::internal(e.to_string()))?);
        self.inner().kv_put(&keys_bucket(), &cursor_key(bucket), bytes).await?;
        Ok(())
    }

    /// Whether a re-encryption of `bucket` may start now: the bucket exists,
    /// is encrypted, and no job on it runs on this node.
    pub async fn check_reencrypt(&self, bucket: &BucketName) -> Result<()> {
        let policy = self.secure.policy(bucket).await?;
        if !policy.sealed() {
            return Err(Error::invalid(format!("bucket `{bucket}` is not encrypted: there is nothing to re-encrypt")));
        }
        if self.running.lock().contains(bucket) {
            return Err(already_running(bucket));
        }
        Ok(())
    }

    /// Rewrite every value of encrypted `bucket` that is not under the
    /// active encryption key (see the module doc), calling `on_progress`
    /// after every batch; it stops the job (cursor saved) by returning
    /// `Break`. Returns the last progress: `done` when every key was examined.
    pub async fn reencrypt(
        &self,
        bucket: &BucketName,
        options: ReencryptOptions,
        on_progress: &mut (dyn FnMut(&ReencryptProgress) -> ControlFlow<()> + Send),
    ) -> Result<ReencryptProgress> {
        if !(1..=MAX_REENCRYPT_BATCH).contains(&options.batch) {
            return Err(Error::invalid(format!("batch must be 1 to {MAX_REENCRYPT_BATCH}, not {}", options.batch)));
        }
        self.check_reencrypt(bucket).await?;
        if !self.running.lock().insert(bucket.clone()) {
            return Err(already_running(bucket));
        }
        let _running = Running { admin: self, bucket: bucket.clone() };

        let ring = self.keys().reload().await?;
        let target = ring.active(KeyPurpose::Encryption).id();
        let estimate = self.inner().bucket_info(bucket).await?.entries;
        let saved = if options.restart { None } else { self.cursor(bucket).await? };
        let mut progress = match saved {
            Some(p) if !p.done && p.key_id == target => {
                ReencryptProgress { resumed: true, run: ReencryptCounts::default(), estimate, ..p }
            }
            _ => ReencryptProgress {
                bucket: bucket.to_string(),
                key_id: target,
                estimate,
                after: None,
                resumed: false,
                done: false,
                run: ReencryptCounts::default(),
                total: ReencryptCounts::default(),
            },
        };
        let batch = options.rate.map_or(options.batch, |r| options.batch.min(r.get() as usize));
        // Without a rate limit the next batch is read and sealed while this
        // one's compare-and-sets wait for the engine; with one, batches run
        // one after the other so no value is read ahead of its time.
        let read_ahead = options.rate.is_none();
        let started = Instant::now();
        let after = progress.after.as_deref().map(Key::new).transpose()?;
        let mut prepared = self.prepare_batch(bucket, &ring, after.as_ref(), batch).await?;
        loop {
            let Prepared { last, end, read, writes } = prepared;
            let next_after = last.as_deref().map(Key::new).transpose()?;
            let write = self.write_batch(bucket, writes);
            let (written, next) = if read_ahead && !end {
                let ahead = self.prepare_batch(bucket, &ring, next_after.as_ref(), batch);
                let (written, next) = tokio::join!(write, ahead);
                (written?, Some(next))
            } else {
                (write.await?, None)
            };
            for counts in [read, written] {
                progress.run.add(&counts);
                progress.total.add(&counts);
            }
            if last.is_some() {
                progress.after = last;
            }
            progress.done = end;
            self.save_cursor(&progress, bucket).await?;
            if progress.done || on_progress(&progress).is_break() {
                return Ok(progress);
            }
            if let Some(rate) = options.rate {
                let due = Duration::from_secs_f64(progress.run.scanned as f64 / f64::from(rate.get()));
                tokio::time::sleep_until((started + due).into()).await;
            }
            prepared = match next {
                Some(next) => next?,
                None => self.prepare_batch(bucket, &ring, next_after.as_ref(), batch).await?,
            };
        }
    }

    /// Read the next page of `bucket`'s keys after `after` and every value
    /// on it, and seal under the ring's active key those that need it.
    async fn prepare_batch(
        &self,
        bucket: &BucketName,
        ring: &Arc<KeyRing>,
        after: Option<&Key>,
        limit: usize,
    ) -> Result<Prepared> {
        let page = self.inner().kv_keys_page(bucket, "", after, limit).await?;
        let last = page.keys.last().map(|k| k.as_str().to_owned());
        let mut read = ReencryptCounts { scanned: page.keys.len() as u64, ..ReencryptCounts::default() };
        let outcomes: Vec<Result<Read>> = futures::stream::iter(page.keys)
            .map(|stored| {
                let (inner, store, ring, bucket) =
                    (self.inner().clone(), self.keys().clone(), ring.clone(), bucket.clone());
                async move { read_one(inner, store, ring, bucket, stored).await }
            })
            .buffer_unordered(IN_FLIGHT)
            .collect()
            .await;
        let mut writes = Vec::with_capacity(outcomes.len());
        for outcome in outcomes {
            match outcome? {
                Read::Current => read.current += 1,
                Read::Failed => read.failed += 1,
                Read::Rewrite(write) => writes.push(write),
            }
        }
        Ok(Prepared { last, end: page.next.is_none(), read, writes })
    }

    /// Compare-and-set every prepared value at the revision it was read.
    async fn write_batch(&self, bucket: &BucketName, writes: Vec<Rewrite>) -> Result<ReencryptCounts> {
        let mut counts = ReencryptCounts::default();
        let outcomes: Vec<Result<bool>> = futures::stream::iter(writes)
            .map(|w| {
                let inner = self.inner().clone();
                async move {
                    match inner.kv_update(bucket, &w.stored, w.sealed, w.revision).await {
                        Ok(_) => Ok(true),
                        Err(e) if e.kind() == ErrorKind::WrongRevision => Ok(false),
                        Err(e) => Err(e),
                    }
                }
            })
            .buffer_unordered(IN_FLIGHT)
            .collect()
            .await;
        for outcome in outcomes {
            if outcome? {
                counts.rewritten += 1;
            } else {
                counts.changed += 1;
            }
        }
        Ok(counts)
    }
}

/// One batch of a re-encryption, read and sealed, not yet written.
struct Prepared {
    /// The last stored key of the page.
    last: Option<String>,
    /// Whether the page was the bucket's last.
    end: bool,
    /// Keys scanned, and those found current or failing to open.
    read: ReencryptCounts,
    /// The values to compare-and-set.
    writes: Vec<Rewrite>,
}

/// A value sealed under the target key, to write at the revision read.
struct Rewrite {
    stored: Key,
    sealed: Bytes,
    revision: Revision,
}

/// Read the value of `stored` and, unless it is already under the ring's
/// active encryption key (or deleted, or does not open), seal it under
/// that key for a compare-and-set at the revision read.
async fn read_one(
    inner: Arc<dyn Engine>,
    store: Arc<RingStore>,
    ring: Arc<KeyRing>,
    bucket: BucketName,
    stored: Key,
) -> Result<Read> {
    let target = ring.active(KeyPurpose::Encryption).id();
    let Some(entry) = inner.kv_get(&bucket, &stored).await? else { return Ok(Read::Current) };
    if entry.op != KvOp::Put || key_id_of(&entry.value).ok() == Some(target) {
        return Ok(Read::Current);
    }
    let plain = match store.open_value(&bucket, &stored, &entry.value).await {
        Ok(p) => p,
        Err(e) => {
            tracing::error!(
                bucket = %bucket,
                revision = entry.revision.0,
                key_id = ?key_id_of(&entry.value).ok().map(|k| k.0),
                reason = e.kind().as_str(),
                "re-encryption: a stored value does not open; left as it is"
            );
            return Ok(Read::Failed);
        }
    };
    let sealed = envelope::seal(&ring, &bucket, &stored, &plain)?;
    drop(plain);
    Ok(Read::Rewrite(Rewrite { stored, sealed, revision: entry.revision }))
}

enum Read {
    Current,
    Rewrite(Rewrite),
    Failed,
}

fn already_running(bucket: &BucketName) -> Error {
    Error::new(
        ErrorKind::AlreadyExists,
        format!("a re-encryption of bucket `{bucket}` is already running on this node"),
    )
}

fn keys_bucket() -> BucketName {
    BucketName::new(KEYS_BUCKET).expect("a valid bucket name")
}

fn info(key: &crate::DataKey) -> KeyInfo {
    KeyInfo { id: key.id(), purpose: key.purpose(), state: key.state(), created: key.created() }
}
