//! Reference data: time-versioned datasets with as-of lookups (issue 20 §3).
//!
//! A dataset (`currencies`, `books`, …) is loaded as whole **versions**, each
//! named by a timestamp. A version is a complete table of `key → value`: a
//! key absent from version V is absent as of V, whatever older versions held.
//! A run pins one version per dataset for all its records.
//!
//! This module owns:
//! - [`RefStore`], the storage trait, with two backends: [`EngineRefStore`]
//!   over any [`KvEngine`] (the default) and `RedisRefStore` (feature
//!   `redis`: a sorted set per key scored by version, as the original design);
//! - [`RefCache`], the per-worker cache: a pinned version's rows are fetched
//!   once into a [`RefSnapshot`] (`HashMap`), so a lookup on the hot path is a
//!   memory access; a run pinned to a version that is not loaded yet waits
//!   for it, visibly ([`RefCache::waiting`]);
//! - [`RunRefs`], a run's pinned snapshots as the rule language's
//!   [`finmesh_rules::Lookup`] (`LOOKUP(dataset, key)` is a memory access).
//!
//! Invariants, on both backends:
//! - **Atomic versions**: a version's rows are written first and its
//!   "complete" marker last; only versions with a marker are listed, resolved,
//!   looked up or snapshotted, so a reader never sees half a version. A load
//!   that fails or is cancelled midway leaves an invisible partial version;
//!   loading it again first removes the partial rows.
//! - **Immutable versions**: loading a version that is already complete does
//!   nothing and reports [`LoadReport::already_complete`] (reloading is
//!   idempotent; change data by loading a new version).
//! - **Duplicate keys** within one version: the last row wins.
//! - **Resolution**: [`RefStore::resolve`] gives the latest complete version
//!   at or before the pinned time.
//! - **Version timestamps** are whole microseconds, at most 2^53 µs (year
//!   2255): Redis scores are doubles, exact only up to 2^53. Both backends
//!   refuse other versions with `Invalid`, so the same data loads into both.
//! - **Names**: a dataset name is 1–[`MAX_DATASET_LEN`] characters of
//!   `A–Z a–z 0–9 _ -`, starting with a letter or digit; a row key is any
//!   non-empty UTF-8 string of at most [`MAX_REF_KEY_LEN`] bytes. The engine
//!   backend escapes every byte outside `A–Z a–z 0–9 _ -` as `=XX` (so any
//!   key fits the engine's key rules and round-trips); Redis keys are binary
//!   safe and stored as is.
//!
//! One loader per (dataset, version) at a time: two concurrent loads of the
//! same incomplete version may interleave their rows.
//!
//! User documentation: the "Reference data" section of `docs/pipeline.md`.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use async_trait::async_trait;
use bytes::Bytes;
use finmesh_core::{BucketConfig, BucketName, Error, ErrorKind, Key, KvEngine, Result, Revision, Timestamp};
use futures::{StreamExt, TryStreamExt};
use parking_lot::Mutex;
use tokio::time::Instant;

mod csv_rows;
pub use csv_rows::csv_rows;
#[cfg(feature = "redis")]
mod redis_store;
#[cfg(feature = "redis")]
pub use redis_store::RedisRefStore;

/// Longest dataset name, in characters.
pub const MAX_DATASET_LEN: usize = 32;
/// Longest row key, in bytes (the engine backend's escaped form, at most
/// three times longer, must fit the engine's 958-byte key limit).
pub const MAX_REF_KEY_LEN: usize = 256;
/// Latest version a store accepts: 2^53 µs after the epoch (Redis scores are
/// exact doubles up to there).
pub const MAX_VERSION_MICROS: u64 = 1 << 53;
/// Rows written per batch (one Redis pipeline; concurrent engine writes).
pub const LOAD_BATCH_ROWS: usize = 1024;
/// Engine writes and reads in flight per load or snapshot.
pub const ENGINE_CONCURRENCY: usize = 64;
/// Default interval at which [`RefCache`] checks whether a version it waits
/// for is complete.
pub const DEFAULT_POLL_INTERVAL: Duration = Duration::from_millis(50);

/// One row of a version: a key and its value.
pub type RefRow = (String, Bytes);

/// Rows to load; an `Err` aborts the load and leaves the version invisible
/// (e.g. a CSV file that cannot be read to its end).
pub type RefRows<'a> = &'a mut (dyn Iterator<Item = Result<RefRow>> + Send);

/// What a load did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LoadReport {
    /// Rows read from the input (duplicates included); 0 when already complete.
    pub rows: u64,
    /// The version was complete before: nothing was read or written.
    pub already_complete: bool,
}

/// All rows of one complete version, in memory.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RefSnapshot {
    /// The dataset.
    pub dataset: String,
    /// The version.
    pub version: Timestamp,
    rows: HashMap<String, Bytes>,
}

impl RefSnapshot {
    /// A snapshot of these rows.
    pub fn new(dataset: impl Into<String>, version: Timestamp, rows: HashMap<String, Bytes>) -> Self {
        RefSnapshot { dataset: dataset.into(), version, rows }
    }

    /// The value of `key`, if this version has it.
    pub fn get(&self, key: &str) -> Option<&Bytes> {
        self.rows.get(key)
    }

    /// Whether this version has `key`.
    pub fn contains(&self, key: &str) -> bool {
        self.rows.contains_key(key)
    }

    /// Number of rows.
    pub fn len(&self) -> usize {
        self.rows.len()
    }

    /// Whether the version has no rows.
    pub fn is_empty(&self) -> bool {
        self.rows.is_empty()
    }

    /// All rows.
    pub fn rows(&self) -> &HashMap<String, Bytes> {
        &self.rows
    }
}

/// Storage of time-versioned reference data (see the module doc for the
/// invariants every backend keeps).
#[async_trait]
pub trait RefStore: Send + Sync + 'static {
    /// Load version `version` of `dataset` from `rows`, marking it complete
    /// after the last row is stored. A no-op if it is complete already.
    async fn load_version(&self, dataset: &str, version: Timestamp, rows: RefRows<'_>) -> Result<LoadReport>;

    /// Complete versions of `dataset`, oldest first.
    async fn versions(&self, dataset: &str) -> Result<Vec<Timestamp>>;

    /// Whether `version` of `dataset` is complete.
    async fn is_complete(&self, dataset: &str, version: Timestamp) -> Result<bool>;

    /// The latest complete version at or before `pinned`.
    async fn resolve(&self, dataset: &str, pinned: Timestamp) -> Result<Option<Timestamp>>;

    /// All rows of a complete version; `NotFound` if it is not complete.
    async fn snapshot(&self, dataset: &str, version: Timestamp) -> Result<RefSnapshot>;

    /// The value of `key` as of `pinned`: its value in the latest complete
    /// version at or before `pinned` (`None` if there is no such version or
    /// that version has no such key). One remote query per call; the hot path
    /// uses a [`RefCache`] instead.
    async fn lookup_remote(&self, dataset: &str, key: &str, pinned: Timestamp) -> Result<Option<Bytes>>;
}

// ---------------------------------------------------------------------------
// validation and encoding shared by the backends

pub(crate) fn check_dataset(dataset: &str) -> Result<()> {
    if dataset.is_empty() {
        return Err(Error::invalid("dataset name must not be empty"));
    }
    if dataset.chars().count() > MAX_DATASET_LEN {
        return Err(Error::invalid(format!(
            "dataset name `{}…` is longer than {MAX_DATASET_LEN} characters",
            dataset.chars().take(MAX_DATASET_LEN).collect::<String>()
        )));
    }
    if let Some((i, c)) = dataset.char_indices().find(|(_, c)| !(c.is_ascii_alphanumeric() || matches!(c, '_' | '-'))) {
        return Err(Error::invalid(format!(
            "dataset name `{dataset}` has {c:?} at byte {i}; allowed are A-Z a-z 0-9 _ -"
        )));
    }
    if !dataset.starts_with(|c: char| c.is_ascii_alphanumeric()) {
        return Err(Error::invalid(format!("dataset name `{dataset}` must start with a letter or digit")));
    }
    Ok(())
}

pub(crate) fn check_key(key: &str) -> Result<()> {
    if key.is_empty() {
        return Err(Error::invalid("reference key must not be empty"));
    }
    if key.len() > MAX_REF_KEY_LEN {
        let mut end = 32;
        while !key.is_char_boundary(end) {
            end -= 1;
        }
        return Err(Error::invalid(format!(
            "reference key `{}…` is {} bytes long; the limit is {MAX_REF_KEY_LEN}",
            &key[..end],
            key.len()
        )));
    }
    Ok(())
}

/// The version in microseconds, if it is a valid version timestamp.
pub(crate) fn version_micros(version: Timestamp) -> Result<u64> {
    let ns = version.as_nanos();
    if !ns.is_multiple_of(1000) {
        return Err(Error::invalid(format!(
            "version {ns} ns is not a whole number of microseconds (versions have microsecond resolution)"
        )));
    }
    let us = ns / 1000;
    if us > MAX_VERSION_MICROS {
        return Err(Error::invalid(format!("version {ns} ns is later than the latest allowed, 2^53 µs")));
    }
    Ok(us)
}

/// A pinned time as a score: whole microseconds, rounded down, capped.
pub(crate) fn pinned_micros(pinned: Timestamp) -> u64 {
    (pinned.as_nanos() / 1000).min(MAX_VERSION_MICROS)
}

/// Escape `key` into engine key characters: bytes outside
/// `A–Z a–z 0–9 _ -` become `=XX` (upper-case hex).
pub fn encode_key(key: &str) -> String {
    let mut out = String::with_capacity(key.len());
    for &b in key.as_bytes() {
        if b.is_ascii_alphanumeric() || b == b'_' || b == b'-' {
            out.push(b as char);
        } else {
            out.push_str(&format!("={b:02X}"));
        }
    }
    out
}

/// The inverse of [`encode_key`]; `None` for text it cannot have produced.
pub fn decode_key(encoded: &str) -> Option<String> {
    let bytes = encoded.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'=' {
            let hex = encoded.get(i + 1..i + 3)?;
            out.push(u8::from_str_radix(hex, 16).ok()?);
            i += 3;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    String::from_utf8(out).ok()
}

/// Read up to [`LOAD_BATCH_ROWS`] rows, validated, duplicates resolved
/// (last wins). `None` at the end of the input.
pub(crate) fn next_batch(rows: RefRows<'_>, read: &mut u64) -> Result<Option<HashMap<String, Bytes>>> {
    let mut batch = HashMap::new();
    let mut n = 0;
    for row in &mut *rows {
        let (key, value) = row?;
        check_key(&key)?;
        *read += 1;
        batch.insert(key, value);
        n += 1;
        if n == LOAD_BATCH_ROWS {
            break;
        }
    }
    Ok(if n == 0 { None } else { Some(batch) })
}

// ---------------------------------------------------------------------------
// the engine backend

/// Default bucket of [`EngineRefStore`].
pub const DEFAULT_BUCKET: &str = "refdata";

/// Reference data in one KV bucket of a [`KvEngine`] (embedded or NATS).
///
/// Layout, for dataset `d` and version V (16 hex digits of microseconds):
/// - `r.<d>.<V>.<encode_key(key)>`: the value of row `key`;
/// - `k.<d>.<V>.<i>`: chunk `i` (from 0) of the version's key list, the
///   escaped keys of one load batch separated by `\n`, written before the
///   batch's rows, so every row written is listed;
/// - `v.<d>`: the dataset's index of complete versions, JSON
///   `{"<V>": <chunks>, …}`, updated by compare-and-set after the last row:
///   the "complete" marker.
///
/// No operation lists keys (`kv_keys`): versions come from one read of the
/// index and a snapshot reads the chunks the index names, then each row.
/// The bucket keeps one revision per key.
pub struct EngineRefStore {
    engine: Arc<dyn KvEngine>,
    bucket: BucketName,
}

/// Complete versions of a dataset (µs) and their number of key chunks.
type VersionIndex = std::collections::BTreeMap<u64, u64>;

impl EngineRefStore {
    /// A store in bucket [`DEFAULT_BUCKET`], created if absent.
    pub async fn open(engine: Arc<dyn KvEngine>) -> Result<Self> {
        Self::open_in(engine, BucketName::new(DEFAULT_BUCKET)?).await
    }

    /// A store in `bucket`, created (history 1) if absent.
    pub async fn open_in(engine: Arc<dyn KvEngine>, bucket: BucketName) -> Result<Self> {
        match engine.bucket_info(&bucket).await {
            Ok(_) => {}
            Err(e) if e.kind() == ErrorKind::NotFound => {
                match engine.create_bucket(BucketConfig::new(bucket.clone())).await {
                    Ok(_) => {}
                    Err(e) if e.kind() == ErrorKind::AlreadyExists => {}
                    Err(e) => return Err(e),
                }
            }
            Err(e) => return Err(e),
        }
        Ok(EngineRefStore { engine, bucket })
    }

    fn index_key(dataset: &str) -> Result<Key> {
        Key::new(format!("v.{dataset}"))
    }

    fn chunk_key(dataset: &str, us: u64, i: u64) -> Result<Key> {
        Key::new(format!("k.{dataset}.{us:016x}.{i}"))
    }

    fn row_key_encoded(dataset: &str, us: u64, encoded: &str) -> Result<Key> {
        Key::new(format!("r.{dataset}.{us:016x}.{encoded}"))
    }

    fn row_key(dataset: &str, us: u64, key: &str) -> Result<Key> {
        Self::row_key_encoded(dataset, us, &encode_key(key))
    }

    /// The dataset's index and its revision (`Revision(0)`: no index yet).
    async fn index(&self, dataset: &str) -> Result<(VersionIndex, Revision)> {
        check_dataset(dataset)?;
        let Some(entry) = self.engine.kv_get(&self.bucket, &Self::index_key(dataset)?).await? else {
            return Ok((VersionIndex::new(), Revision(0)));
        };
        let raw: HashMap<String, u64> = serde_json::from_slice(&entry.value).map_err(|e| {
            Error::internal(format!("the version index of dataset `{dataset}` is not valid JSON")).with_source(e)
        })?;
        let mut index = VersionIndex::new();
        for (v, chunks) in raw {
            let us = u64::from_str_radix(&v, 16)
                .map_err(|_| Error::internal(format!("the version index of dataset `{dataset}` has version `{v}`")))?;
            index.insert(us, chunks);
        }
        Ok((index, entry.revision))
    }

    /// Add version `us` with `chunks` key chunks to the index (compare and set).
    async fn mark_complete(&self, dataset: &str, us: u64, chunks: u64) -> Result<()> {
        let key = Self::index_key(dataset)?;
        loop {
            let (mut index, revision) = self.index(dataset).await?;
            index.insert(us, chunks);
            let raw: HashMap<String, u64> = index.iter().map(|(v, c)| (format!("{v:016x}"), *c)).collect();
            let value = Bytes::from(serde_json::to_vec(&raw).map_err(|e| Error::internal(e.to_string()))?);
            match self.engine.kv_update(&self.bucket, &key, value, revision).await {
                Ok(_) => return Ok(()),
                Err(e) if e.kind() == ErrorKind::WrongRevision => continue,
                Err(e) => return Err(e),
            }
        }
    }

    /// Chunk `i` of a version's key list (escaped keys), if written.
    async fn chunk(&self, dataset: &str, us: u64, i: u64) -> Result<Option<Vec<String>>> {
        let Some(entry) = self.engine.kv_get(&self.bucket, &Self::chunk_key(dataset, us, i)?).await? else {
            return Ok(None);
        };
        let text = std::str::from_utf8(&entry.value)
            .map_err(|_| Error::internal(format!("key chunk {i} of dataset `{dataset}` is not UTF-8")))?;
        Ok(Some(text.split('\n').filter(|k| !k.is_empty()).map(str::to_owned).collect()))
    }

    /// Remove what a partial load of version `us` wrote: the rows of each
    /// chunk, then the chunk, last chunk first (so what is left is always
    /// chunks 0..n listing every row left).
    async fn clear_partial(&self, dataset: &str, us: u64) -> Result<()> {
        let mut chunks = Vec::new();
        while let Some(keys) = self.chunk(dataset, us, chunks.len() as u64).await? {
            chunks.push(keys);
        }
        for (i, keys) in chunks.into_iter().enumerate().rev() {
            let keys = keys.iter().map(|k| Self::row_key_encoded(dataset, us, k)).collect::<Result<Vec<_>>>()?;
            self.for_each_concurrently(keys, |k| async move { self.engine.kv_purge(&self.bucket, &k).await.map(drop) })
                .await?;
            self.engine.kv_purge(&self.bucket, &Self::chunk_key(dataset, us, i as u64)?).await?;
        }
        Ok(())
    }

    async fn for_each_concurrently<T, F, Fut>(&self, items: Vec<T>, f: F) -> Result<()>
    where
        F: Fn(T) -> Fut,
        Fut: std::future::Future<Output = Result<()>>,
    {
        futures::stream::iter(items).map(f).buffer_unordered(ENGINE_CONCURRENCY).try_collect::<()>().await
    }
}

#[async_trait]
impl RefStore for EngineRefStore {
    async fn load_version(&self, dataset: &str, version: Timestamp, rows: RefRows<'_>) -> Result<LoadReport> {
        let us = version_micros(version)?;
        if self.index(dataset).await?.0.contains_key(&us) {
            return Ok(LoadReport { rows: 0, already_complete: true });
        }
        self.clear_partial(dataset, us).await?;
        let mut read = 0;
        let mut chunks = 0;
        while let Some(batch) = next_batch(rows, &mut read)? {
            let mut list = String::new();
            let mut writes = Vec::with_capacity(batch.len());
            for (k, v) in batch {
                let encoded = encode_key(&k);
                writes.push((Self::row_key_encoded(dataset, us, &encoded)?, v));
                list.push_str(&encoded);
                list.push('\n');
            }
            self.engine.kv_put(&self.bucket, &Self::chunk_key(dataset, us, chunks)?, Bytes::from(list)).await?;
            chunks += 1;
            self.for_each_concurrently(writes, |(key, value)| async move {
                self.engine.kv_put(&self.bucket, &key, value).await.map(drop)
            })
            .await?;
        }
        self.mark_complete(dataset, us, chunks).await?;
        Ok(LoadReport { rows: read, already_complete: false })
    }

    async fn versions(&self, dataset: &str) -> Result<Vec<Timestamp>> {
        Ok(self.index(dataset).await?.0.into_keys().map(|us| Timestamp(us * 1000)).collect())
    }

    async fn is_complete(&self, dataset: &str, version: Timestamp) -> Result<bool> {
        let us = version_micros(version)?;
        Ok(self.index(dataset).await?.0.contains_key(&us))
    }

    async fn resolve(&self, dataset: &str, pinned: Timestamp) -> Result<Option<Timestamp>> {
        let limit = pinned_micros(pinned);
        let (index, _) = self.index(dataset).await?;
        Ok(index.range(..=limit).next_back().map(|(us, _)| Timestamp(us * 1000)))
    }

    async fn snapshot(&self, dataset: &str, version: Timestamp) -> Result<RefSnapshot> {
        let us = version_micros(version)?;
        let Some(&chunks) = self.index(dataset).await?.0.get(&us) else {
            return Err(Error::not_found(format!(
                "version {} of dataset `{dataset}` is not loaded",
                version.as_nanos()
            )));
        };
        let mut encoded = Vec::new();
        for i in 0..chunks {
            let keys = self.chunk(dataset, us, i).await?.ok_or_else(|| {
                Error::internal(format!("key chunk {i} of version {us:016x} of dataset `{dataset}` is missing"))
            })?;
            encoded.extend(keys);
        }
        encoded.sort_unstable();
        encoded.dedup();
        let rows: Vec<(String, Bytes)> = futures::stream::iter(encoded)
            .map(|enc| async move {
                let key = decode_key(&enc)
                    .ok_or_else(|| Error::internal(format!("reference key chunk holds `{enc}`, not an encoded key")))?;
                // A complete version is immutable: a listed row that is gone
                // means the store lost it.
                let k = Self::row_key_encoded(dataset, us, &enc)?;
                let entry = self.engine.kv_get(&self.bucket, &k).await?.ok_or_else(|| {
                    Error::unavailable(format!("reference row `{}` of a complete version is missing", k.as_str()))
                })?;
                Ok::<_, Error>((key, entry.value))
            })
            .buffer_unordered(ENGINE_CONCURRENCY)
            .try_collect()
            .await?;
        Ok(RefSnapshot::new(dataset, version, rows.into_iter().collect()))
    }

    async fn lookup_remote(&self, dataset: &str, key: &str, pinned: Timestamp) -> Result<Option<Bytes>> {
        check_key(key)?;
        let Some(version) = self.resolve(dataset, pinned).await? else { return Ok(None) };
        let k = Self::row_key(dataset, version_micros(version)?, key)?;
        Ok(self.engine.kv_get(&self.bucket, &k).await?.map(|e| e.value))
    }
}

// ---------------------------------------------------------------------------
// the per-worker cache

/// Which version of a dataset a run uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Pin {
    /// Exactly this version; wait until it is complete (the run's creator
    /// names the version it expects, e.g. the one being loaded now).
    Version(Timestamp),
    /// The latest complete version at or before this time, as of now; no
    /// waiting (`NotFound` if there is none).
    AsOf(Timestamp),
}

/// A run waiting for a version (for run status).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Waiting {
    /// The dataset.
    pub dataset: String,
    /// The version waited for.
    pub version: Timestamp,
    /// Since when.
    pub since: Timestamp,
    /// How many times the store was asked so far.
    pub checks: u64,
}

struct WaitEntry {
    dataset: String,
    version: Timestamp,
    since: Timestamp,
    checks: Arc<AtomicU64>,
}

/// A worker's cache of pinned versions (see the module doc).
///
/// Snapshots are shared: every run pinned to the same (dataset, version)
/// holds the same `Arc<RefSnapshot>`. [`evict_unused`](Self::evict_unused)
/// drops the ones no run holds any more.
pub struct RefCache {
    store: Arc<dyn RefStore>,
    poll: Duration,
    snapshots: Mutex<HashMap<(String, Timestamp), Arc<RefSnapshot>>>,
    waits: Mutex<HashMap<u64, WaitEntry>>,
    next_wait: AtomicU64,
}

struct WaitGuard<'a> {
    cache: &'a RefCache,
    id: u64,
}

impl Drop for WaitGuard<'_> {
    fn drop(&mut self) {
        self.cache.waits.lock().remove(&self.id);
    }
}

impl RefCache {
    /// A cache over `store`, checking waited-for versions every
    /// [`DEFAULT_POLL_INTERVAL`].
    pub fn new(store: Arc<dyn RefStore>) -> Self {
        Self::with_poll_interval(store, DEFAULT_POLL_INTERVAL)
    }

    /// A cache checking waited-for versions every `poll`.
    pub fn with_poll_interval(store: Arc<dyn RefStore>, poll: Duration) -> Self {
        RefCache {
            store,
            poll,
            snapshots: Mutex::new(HashMap::new()),
            waits: Mutex::new(HashMap::new()),
            next_wait: AtomicU64::new(0),
        }
    }

    /// The store behind this cache.
    pub fn store(&self) -> &Arc<dyn RefStore> {
        &self.store
    }

    /// The snapshot a run uses for `dataset`. [`Pin::Version`] waits until
    /// the version is complete, listed meanwhile by [`waiting`](Self::waiting),
    /// and fails with `Timeout` at `deadline`. A cached snapshot is returned
    /// without asking the store.
    pub async fn pin(&self, dataset: &str, pin: Pin, deadline: Instant) -> Result<Arc<RefSnapshot>> {
        check_dataset(dataset)?;
        let version = match pin {
            Pin::Version(v) => {
                version_micros(v)?;
                if let Some(s) = self.cached(dataset, v) {
                    return Ok(s);
                }
                self.wait_complete(dataset, v, deadline).await?;
                v
            }
            Pin::AsOf(t) => self.store.resolve(dataset, t).await?.ok_or_else(|| {
                Error::not_found(format!("dataset `{dataset}` has no complete version at or before {}", t.as_nanos()))
            })?,
        };
        if let Some(s) = self.cached(dataset, version) {
            return Ok(s);
        }
        let snapshot = Arc::new(self.store.snapshot(dataset, version).await?);
        Ok(self.snapshots.lock().entry((dataset.to_owned(), version)).or_insert(snapshot).clone())
    }

    fn cached(&self, dataset: &str, version: Timestamp) -> Option<Arc<RefSnapshot>> {
        self.snapshots.lock().get(&(dataset.to_owned(), version)).cloned()
    }

    async fn wait_complete(&self, dataset: &str, version: Timestamp, deadline: Instant) -> Result<()> {
        let id = self.next_wait.fetch_add(1, Ordering::Relaxed);
        let checks = Arc::new(AtomicU64::new(0));
        self.waits.lock().insert(
            id,
            WaitEntry { dataset: dataset.to_owned(), version, since: Timestamp::now(), checks: checks.clone() },
        );
        let _guard = WaitGuard { cache: self, id };
        loop {
            let complete = self.store.is_complete(dataset, version).await?;
            checks.fetch_add(1, Ordering::Relaxed);
            if complete {
                return Ok(());
            }
            let now = Instant::now();
            if now >= deadline {
                return Err(Error::new(
                    ErrorKind::Timeout,
                    format!("version {} of dataset `{dataset}` was not loaded in time", version.as_nanos()),
                ));
            }
            tokio::time::sleep_until(deadline.min(now + self.poll)).await;
        }
    }

    /// Runs waiting for a version right now, oldest first.
    pub fn waiting(&self) -> Vec<Waiting> {
        let mut out: Vec<Waiting> = self
            .waits
            .lock()
            .values()
            .map(|w| Waiting {
                dataset: w.dataset.clone(),
                version: w.version,
                since: w.since,
                checks: w.checks.load(Ordering::Relaxed),
            })
            .collect();
        out.sort_by_key(|w| w.since);
        out
    }

    /// Drop cached snapshots no run holds; returns how many.
    pub fn evict_unused(&self) -> usize {
        let mut snapshots = self.snapshots.lock();
        let before = snapshots.len();
        snapshots.retain(|_, s| Arc::strong_count(s) > 1);
        before - snapshots.len()
    }

    /// Number of cached snapshots.
    pub fn cached_versions(&self) -> usize {
        self.snapshots.lock().len()
    }
}

/// The snapshots one run pinned, by the rules' dataset ids: what
/// `LOOKUP(dataset, key)` in a rule set reads ([`finmesh_rules::Lookup`]).
///
/// A string key is looked up as is; an integer key as its decimal text
/// (formatted on the stack, no allocation). A dataset the run did not pin
/// has no keys.
#[derive(Clone, Debug, Default)]
pub struct RunRefs {
    by_id: Vec<Option<Arc<RefSnapshot>>>,
}

impl RunRefs {
    /// The pinned `snapshots` placed at their ids in `datasets` (matched by
    /// dataset name; snapshots of datasets the rules do not name are left out).
    pub fn new(datasets: &finmesh_rules::Datasets, snapshots: impl IntoIterator<Item = Arc<RefSnapshot>>) -> Self {
        let mut by_id: Vec<Option<Arc<RefSnapshot>>> = datasets.names().map(|_| None).collect();
        for snapshot in snapshots {
            if let Some(id) = datasets.id(&snapshot.dataset) {
                by_id[id.0 as usize] = Some(snapshot);
            }
        }
        RunRefs { by_id }
    }

    /// The snapshot pinned for `dataset`, if any.
    pub fn snapshot(&self, dataset: finmesh_rules::DatasetId) -> Option<&Arc<RefSnapshot>> {
        self.by_id.get(dataset.0 as usize).and_then(Option::as_ref)
    }
}

impl finmesh_rules::Lookup for RunRefs {
    fn contains(&self, dataset: finmesh_rules::DatasetId, key: &finmesh_rules::FieldRef<'_>) -> bool {
        let Some(snapshot) = self.snapshot(dataset) else { return false };
        match key {
            finmesh_rules::FieldRef::Str(s) => snapshot.contains(s),
            finmesh_rules::FieldRef::Int(i) => {
                use std::io::Write;
                let mut buf = [0u8; 20];
                let mut cursor = std::io::Cursor::new(&mut buf[..]);
                // An i64 has at most 20 characters: the write cannot fail.
                if write!(cursor, "{i}").is_err() {
                    return false;
                }
                let len = cursor.position() as usize;
                std::str::from_utf8(&buf[..len]).is_ok_and(|k| snapshot.contains(k))
            }
            _ => false,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_round_trip_through_the_engine_encoding() {
        for key in ["EUR", "a.b", "..", "=", "_kv", "a b/c", "€uro", "\u{0}\n", "x=41"] {
            let enc = encode_key(key);
            assert!(Key::new(format!("r.d.0.{enc}")).is_ok(), "{enc}");
            assert_eq!(decode_key(&enc).as_deref(), Some(key));
        }
        let long = "\u{7f}".repeat(MAX_REF_KEY_LEN);
        let k = EngineRefStore::row_key(&"d".repeat(MAX_DATASET_LEN), MAX_VERSION_MICROS, &long);
        assert!(k.is_ok(), "the longest escaped key fits the engine's key limit");
        assert_eq!(decode_key("=4"), None);
        assert_eq!(decode_key("=ZZ"), None);
    }

    #[test]
    fn run_refs_answer_lookup_by_dataset_id() {
        use finmesh_rules::{Datasets, FieldRef, KeyType, Lookup};
        let datasets =
            Datasets::new().with("books", KeyType::String).with("ids", KeyType::Int).with("unpinned", KeyType::String);
        let snap = |name: &str, keys: &[&str]| {
            Arc::new(RefSnapshot::new(
                name,
                Timestamp(0),
                keys.iter().map(|k| ((*k).to_owned(), Bytes::new())).collect(),
            ))
        };
        let refs = RunRefs::new(
            &datasets,
            [snap("books", &["B1"]), snap("ids", &["-9223372036854775808", "42"]), snap("other", &["B1"])],
        );
        let [books, ids, unpinned] = ["books", "ids", "unpinned"].map(|n| datasets.id(n).unwrap());
        assert!(refs.contains(books, &FieldRef::Str("B1")));
        assert!(!refs.contains(books, &FieldRef::Str("B2")));
        assert!(refs.contains(ids, &FieldRef::Int(42)));
        assert!(refs.contains(ids, &FieldRef::Int(i64::MIN)));
        assert!(!refs.contains(ids, &FieldRef::Int(7)));
        assert!(!refs.contains(books, &FieldRef::Int(1)));
        assert!(!refs.contains(unpinned, &FieldRef::Str("B1")), "a dataset the run did not pin has no keys");
        assert!(!refs.contains(finmesh_rules::DatasetId(99), &FieldRef::Str("B1")));
    }

    #[test]
    fn names_and_versions_are_checked() {
        assert!(check_dataset("books").is_ok());
        assert!(check_dataset("").is_err());
        assert!(check_dataset("_x").is_err());
        assert!(check_dataset("a.b").is_err());
        assert!(check_dataset(&"a".repeat(MAX_DATASET_LEN + 1)).is_err());
        assert!(version_micros(Timestamp(1_500)).is_err());
        assert_eq!(version_micros(Timestamp(2_000)).unwrap(), 2);
        assert!(version_micros(Timestamp((MAX_VERSION_MICROS + 1) * 1000)).is_err());
        assert_eq!(pinned_micros(Timestamp(u64::MAX)), MAX_VERSION_MICROS);
    }
}
