//! finmesh-embedded: the embedded engine. Streams, KV buckets and durable
//! consumers in one process, stored with fjall on local disk.
//!
//! Read in this order: `store` (streams on disk, reads), `writer` (the
//! single writer and group commit), `journal_sync` (fsync without fjall's
//! lock), `txn` (one write), `tail`, `kv`
//! (buckets as streams, gets served from disk), `kvcache` (hot values of
//! gets), `consumers`,
//! `codec` (byte formats).
//!
//! # On-disk layout
//!
//! One fjall database per data directory. Keyspaces:
//!
//! | keyspace | key | value |
//! |---|---|---|
//! | `meta` | `stream/<name>` | JSON `{config, kind}` (kind: `user` or `kv` with the bucket config); `security` and `metadata` are left out when empty, so records without options are the same as before options existed |
//! | `meta` | `state/<name>` | counters `messages, bytes, first_seq, last_seq` (4 × u64 BE), written in the same batch as the messages |
//! | `meta` | `index/<name>` | the same counters as of the last commit of the stream's `x` changes; differs from `state/<name>`, or is missing while `state/<name>` counts a write, only after a crash between a write and its index batch (then `open` repairs `x`) |
//! | `meta` | `epoch/<name>` | the stream's epoch (u64 BE, see `StreamInfo::epoch`) |
//! | `meta` | `clean-close` | empty; written and fsynced by a clean close, removed and fsynced at open |
//! | `meta` | `consumer/<stream>/<name>` | JSON `{config, delivered, initial}` |
//! | `meta` | `cpend/<stream>/<name>/` + seq (u64 BE) | one pending delivery: deliveries (u32 BE), due (u64 BE ns); see `consumers.rs` |
//! | `s.<name>.m` | `seq` (u64 BE) | message record (see `codec.rs`) |
//! | `s.<name>.x` | `subject 0x00 seq` | empty (per-subject index) |
//! | `s.<name>.l` | `subject` | `last_seq (u64 BE), count (u64 BE)` |
//!
//! KV bucket `b` is stream `KV_b` (see `kv.rs`).
//!
//! # Durability
//!
//! Every request is applied atomically: all of it or nothing survives a
//! crash (the publishes of one writer round to one stream share one fjall
//! batch; their per-subject index changes follow in a second batch, which
//! `open` rebuilds from the messages if a crash lost it, see `txn.rs`). A batch is written to the journal and handed to the OS before its
//! ack: it survives a process crash. With `sync = always` (the default) the
//! ack also waits for an fsync of the journal that started after the commit
//! (one fsync for every write waiting, see `writer.rs`): it survives power
//! loss. A duplicate's ack waits for its original's fsync the same way.
//! With `sync = interval(ms)` an fsync runs at most `ms` (plus the fsync
//! itself) after a write, however full the writer's queue; with `never`,
//! when the OS decides.
//!
//! # Visibility
//!
//! Nothing is visible before it is as durable as its ack promised: reads,
//! tails, KV gets and watches of an `always` stream see a write only after
//! the fsync that covers it (`StreamHandle::reveal` in `store.rs`). For
//! `interval` and `never` streams a write is visible once committed, so a
//! power loss can take back what a reader saw. A
//! failed fsync poisons the engine: writes then fail with `Unavailable`.
//! On reopen, fjall replays its journal and cuts a torn last batch (a batch
//! is all or nothing); damage before the last batch makes `open` fail with
//! `Internal` rather than drop acknowledged writes (`tests/journal_recovery.rs`).
//! A directory left by a creation that was killed before it held any data
//! is created again (`interrupted.rs`).
//! A record that fails to decode when read is an `Internal` error, never
//! skipped.

mod codec;
mod consumers;
mod filtered;
mod interrupted;
mod journal_sync;
mod kv;
mod kvcache;
mod store;
mod tail;
mod txn;
mod writer;

pub use consumers::ConsumerIo;
pub use writer::SyncStats;

use std::path::Path;
use std::sync::Arc;

use async_trait::async_trait;
use bytes::Bytes;
use finmesh_core::{
    AckKind, AckToken, BoxStream, BucketConfig, BucketInfo, BucketName, ConsumerConfig, ConsumerEngine, ConsumerInfo,
    ConsumerName, DeliverPolicy, Delivery, Error, FetchRequest, Key, KeysPage, KvEngine, KvEntry, KvOp, Message,
    OutgoingMessage, PubAck, ReadRequest, Result, Revision, Seq, StreamConfig, StreamEngine, StreamInfo, StreamName,
    Subject, SubjectPattern, TailEvent, Timestamp, WatchStart,
};
use futures::StreamExt;
use parking_lot::Mutex;
use tokio::sync::oneshot;

use crate::consumers::{ConsumerOp, Consumers};
use crate::store::{Registry, StreamHandle, StreamKind, StreamRecord, storage};
use crate::writer::{Cond, Op, StreamKindTag, Writer};

/// How often a fetch whose candidates concurrent fetches all claimed first
/// reads again before it answers (or waits) like an empty one.
const MAX_FETCH_READS_AGAIN: u32 = 8;

/// Default of [`EmbeddedOptions::cache_bytes`]: 32 MiB.
pub const CACHE_BYTES: u64 = 32 * 1024 * 1024;

/// Default of [`EmbeddedOptions::kv_cache_bytes`]: 8 MiB.
pub const KV_CACHE_BYTES: u64 = 8 * 1024 * 1024;

/// Default of [`EmbeddedOptions::writer_queue`].
pub const WRITER_QUEUE: usize = 8192;

/// fjall refuses (panics on) a smaller journal limit.
const MIN_JOURNAL_BYTES: u64 = 64 * 1024 * 1024;

/// Tuning for [`EmbeddedEngine::open_with`].
#[derive(Debug, Clone)]
pub struct EmbeddedOptions {
    /// Block cache size in bytes (default [`CACHE_BYTES`]). KV values live
    /// on disk only: the cache (and the OS page cache below it) is what
    /// keeps the hot set of KV gets, stream reads and history in memory.
    pub cache_bytes: u64,
    /// Journal kept before memtables are flushed (default and minimum
    /// 64 MiB, fjall's lower bound; smaller values are raised to it). The
    /// journal is replayed into memtables at open, so this bounds unflushed
    /// memory, reopen time and memory after reopen. (Each keyspace's
    /// memtable is also capped at 16 MiB.)
    pub journal_bytes: u64,
    /// Requests queued for the writer thread before callers wait (default
    /// [`WRITER_QUEUE`], at least 1). A full queue slows callers down; it
    /// does not delay `interval` fsyncs.
    pub writer_queue: usize,
    /// Hot-value cache of each KV bucket in bytes (default
    /// [`KV_CACHE_BYTES`]; `0` turns it off): the live values of recently
    /// read keys, so a hot key's get skips the store (see `kvcache.rs`).
    /// Counted next to `cache_bytes`, once per bucket.
    pub kv_cache_bytes: u64,
}

impl Default for EmbeddedOptions {
    fn default() -> Self {
        EmbeddedOptions {
            cache_bytes: CACHE_BYTES,
            journal_bytes: MIN_JOURNAL_BYTES,
            writer_queue: WRITER_QUEUE,
            kv_cache_bytes: KV_CACHE_BYTES,
        }
    }
}

/// The embedded engine. Cheap to clone; every clone is the same engine.
#[derive(Clone)]
pub struct EmbeddedEngine {
    inner: Arc<Inner>,
}

struct Inner {
    registry: Arc<Registry>,
    consumers: Consumers,
    tx: flume::Sender<Op>,
    sync: Arc<writer::SyncShared>,
    threads: Mutex<Vec<std::thread::JoinHandle<()>>>,
}

impl Drop for Inner {
    fn drop(&mut self) {
        // Dropping `tx` ends the writer (it fsyncs on the way out); wait for
        // it so the directory can be reopened right after.
        let threads = std::mem::take(&mut *self.threads.lock());
        let (tx, _) = flume::bounded(1);
        drop(std::mem::replace(&mut self.tx, tx));
        for t in threads {
            let _ = t.join();
        }
    }
}

impl EmbeddedEngine {
    /// Open (or create) an engine in `dir` with default options.
    pub fn open(dir: impl AsRef<Path>) -> Result<Self> {
        Self::open_with(dir, EmbeddedOptions::default())
    }

    /// Open (or create) an engine in `dir`.
    pub fn open_with(dir: impl AsRef<Path>, options: EmbeddedOptions) -> Result<Self> {
        let dir = dir.as_ref();
        interrupted::finish_interrupted_create(dir)
            .map_err(|e| Error::unavailable(format!("cannot check the store at {}", dir.display())).with_source(e))?;
        let db = fjall::Database::builder(dir)
            .cache_size(options.cache_bytes)
            .max_journaling_size(options.journal_bytes.max(MIN_JOURNAL_BYTES))
            // fjall compresses journal entries of 4 KiB and more with lz4 by
            // default, on the thread that writes them: here the one writer
            // thread every durable write waits behind. The journal is
            // short-lived (its data is compressed again when flushed to
            // tables), so its bytes are cheaper than the writer's time: lz4
            // was 9.6% of a pipeline run's CPU, all on the writer
            // (BENCHMARKS.md, session 21).
            .journal_compression(fjall::CompressionType::None)
            .open()
            .map_err(|e| match e {
                fjall::Error::JournalRecovery(_) => Error::internal(format!(
                    "the journal in {} is corrupt before its last batch ({e}); refusing to open rather than \
                     skip acknowledged writes",
                    dir.display()
                ))
                .with_source(e),
                e => Error::unavailable(format!("cannot open the store at {}", dir.display())).with_source(e),
            })?;
        let meta = db.keyspace("meta", fjall::KeyspaceCreateOptions::default).map_err(storage)?;
        let registry = Arc::new(Registry::new(options.kv_cache_bytes));
        let unclean = meta.get(store::CLEAN_CLOSE_KEY).map_err(storage)?.is_none();
        store::load_all(&db, &meta, &registry, unclean)?;
        // From here on a stop without `close` is unclean; the removal (and
        // new epochs) must be durable before any write is visible.
        meta.remove(store::CLEAN_CLOSE_KEY).map_err(storage)?;
        db.persist(fjall::PersistMode::SyncAll).map_err(storage)?;
        let consumers = Consumers::load(&meta)?;
        let (tx, rx) = flume::bounded(options.writer_queue.max(1));
        let writer = Writer::new(db, dir, meta, registry.clone(), consumers.clone());
        let sync = writer.sync_shared();
        let writer_thread = std::thread::Builder::new()
            .name("finmesh-writer".into())
            .spawn(move || writer.run(rx))
            .map_err(|e| Error::internal("cannot start the writer thread").with_source(e))?;
        tracing::info!(dir = %dir.display(), streams = registry.all().len(), "embedded engine open");
        Ok(EmbeddedEngine {
            inner: Arc::new(Inner { registry, consumers, tx, sync, threads: Mutex::new(vec![writer_thread]) }),
        })
    }

    /// How writes that wait for their fsync were made durable so far:
    /// fsyncs, and requests answered, which shows how well group commit
    /// shares them.
    pub fn sync_stats(&self) -> SyncStats {
        self.inner.sync.stats()
    }

    /// Requests waiting for the writer thread (at most
    /// [`EmbeddedOptions::writer_queue`]).
    pub fn queued_requests(&self) -> usize {
        self.inner.tx.len()
    }

    /// Hold every fsync that answers waiting writes (`sync = always`
    /// publishes, stream and consumer changes) until the returned guard is
    /// dropped; the writer keeps applying requests meanwhile. A test hook
    /// (no production use): it makes "not acked and not visible before its
    /// fsync" observable. `interval` fsyncs, which run on the same syncer
    /// thread, are held too (they answer nobody: writes go on).
    #[doc(hidden)]
    pub fn hold_fsyncs(&self) -> FsyncHold {
        self.inner.sync.hold(true);
        FsyncHold(self.inner.sync.clone())
    }

    /// Keys and bytes written for consumer state so far: an ack writes one
    /// small key, whatever the number of pending deliveries.
    pub fn consumer_io(&self) -> ConsumerIo {
        self.inner.consumers.io()
    }

    /// Stop the writer after everything queued so far, fsync, and close the
    /// store. Tails end with an error. Other clones fail with `Unavailable`.
    pub async fn close(self) -> Result<()> {
        let r = self.call(|reply| Op::Close { reply }).await;
        for h in self.inner.registry.all() {
            h.deleted.store(true, std::sync::atomic::Ordering::Release);
            let _ = h.live.send(Arc::from(Vec::new()));
            self.inner.registry.remove(&h.name);
        }
        let inner = self.inner;
        tokio::task::spawn_blocking(move || drop(inner)).await.map_err(|e| Error::internal("close").with_source(e))?;
        r
    }

    async fn call<T>(&self, op: impl FnOnce(writer::Reply<T>) -> Op) -> Result<T> {
        let (tx, rx) = oneshot::channel();
        let closed = || Error::unavailable("the engine is closed");
        self.inner.tx.send_async(op(tx)).await.map_err(|_| closed())?;
        rx.await.map_err(|_| closed())?
    }

    fn stream(&self, name: &StreamName) -> Result<Arc<StreamHandle>> {
        self.inner.registry.user_stream(name)
    }

    fn bucket(&self, name: &BucketName) -> Result<(Arc<StreamHandle>, BucketConfig)> {
        let h = self.inner.registry.bucket(name)?;
        let config = match &h.record.read().kind {
            StreamKind::Kv(c) => c.clone(),
            StreamKind::User => return Err(Error::internal(format!("bucket `{name}` has a user stream"))),
        };
        Ok((h, config))
    }

    /// Put many keys of `bucket` in one write: one journal batch (all or
    /// nothing after a crash), one fsync under `sync = always`, revisions
    /// in the order given (a key given twice keeps the later value, its
    /// history trimmed as usual). Every value is checked against the
    /// bucket's size limit before anything is written. Refused (`Invalid`)
    /// on a bucket with `max_bytes`, whose cap could stop a batch half way
    /// (put those keys one at a time). The bulk-load path
    /// (e.g. `finmesh-bench --scenario kv-scale`); an inherent method, not
    /// part of the `KvEngine` trait, so engine wrappers (encryption) cannot
    /// be bypassed through it by the gateway.
    pub async fn kv_put_batch(&self, bucket: &BucketName, entries: Vec<(Key, Bytes)>) -> Result<Vec<Revision>> {
        let (h, config) = self.bucket(bucket)?;
        if config.max_bytes.is_some() {
            return Err(Error::invalid(format!(
                "bucket `{bucket}` has max_bytes, which could stop a batch half way: put its keys one at a time"
            )));
        }
        if entries.is_empty() {
            return Ok(Vec::new());
        }
        let mut msgs = Vec::with_capacity(entries.len());
        for (i, (key, value)) in entries.into_iter().enumerate() {
            kv::check_value(&config, &value)
                .map_err(|e| Error::new(e.kind(), format!("entry {i}: {}", e.message())))?;
            msgs.push(kv::message(bucket, &key, value, KvOp::Put));
        }
        let acks = self.call(|reply| Op::Publish { stream: h, msgs, cond: Cond::None, reply }).await?;
        Ok(acks.into_iter().map(|a| Revision(a.seq.0)).collect())
    }

    async fn kv_write(&self, bucket: &BucketName, key: &Key, value: Bytes, op: KvOp, cond: Cond) -> Result<Revision> {
        let (h, config) = self.bucket(bucket)?;
        kv::check_value(&config, &value)?;
        let msg = kv::message(bucket, key, value, op);
        let acks = self.call(|reply| Op::Publish { stream: h, msgs: vec![msg], cond, reply }).await?;
        Ok(Revision(acks[0].seq.0))
    }
}

/// Returned by [`EmbeddedEngine::hold_fsyncs`]; dropping it lets the held
/// fsyncs run.
#[doc(hidden)]
pub struct FsyncHold(Arc<writer::SyncShared>);

impl Drop for FsyncHold {
    fn drop(&mut self) {
        self.0.hold(false);
    }
}

/// Check a publish before anything is written: subjects captured, sizes.
pub(crate) fn check_publish(config: &StreamConfig, msgs: &[OutgoingMessage]) -> Result<()> {
    let limit = config.msg_size_limit() as usize;
    for (i, m) in msgs.iter().enumerate() {
        if !config.subjects.iter().any(|p| p.matches(&m.subject)) {
            return Err(Error::invalid(format!(
                "message {i}: subject `{}` is not captured by stream `{}`",
                m.subject, config.name
            )));
        }
        if m.size() > limit {
            return Err(Error::too_large(format!(
                "message {i} is {} bytes; stream `{}` accepts at most {limit}",
                m.size(),
                config.name
            )));
        }
        if m.msg_id().is_some_and(|id| id.len() > 256 || id.is_empty()) {
            return Err(Error::invalid(format!("message {i}: message id must be 1-256 bytes")));
        }
    }
    Ok(())
}

fn info_of(h: &StreamHandle) -> StreamInfo {
    StreamInfo { config: h.config(), state: h.state(), epoch: h.epoch }
}

#[async_trait]
impl StreamEngine for EmbeddedEngine {
    async fn create_stream(&self, config: StreamConfig) -> Result<StreamInfo> {
        config.validate()?;
        if config.replicas != 1 {
            return Err(Error::invalid("the embedded engine keeps one copy: replicas must be 1"));
        }
        let record = StreamRecord { config, kind: StreamKind::User };
        let h = self.call(|reply| Op::CreateStream { record: Box::new(record), reply }).await?;
        Ok(info_of(&h))
    }

    async fn update_stream(&self, config: StreamConfig) -> Result<StreamInfo> {
        config.validate()?;
        self.stream(&config.name)?;
        let record = StreamRecord { config, kind: StreamKind::User };
        let h = self.call(|reply| Op::UpdateStream { record: Box::new(record), reply }).await?;
        Ok(info_of(&h))
    }

    async fn stream_info(&self, stream: &StreamName) -> Result<StreamInfo> {
        let h = self.stream(stream)?;
        Ok(info_of(&h))
    }

    async fn list_streams(&self) -> Result<Vec<StreamName>> {
        let mut v: Vec<StreamName> = self
            .inner
            .registry
            .all()
            .into_iter()
            .filter(|h| h.record.read().kind == StreamKind::User)
            .map(|h| h.name.clone())
            .collect();
        v.sort();
        Ok(v)
    }

    async fn delete_stream(&self, stream: &StreamName) -> Result<()> {
        let name = stream.clone();
        self.call(|reply| Op::DeleteStream { name, kind: StreamKindTag::User, reply }).await
    }

    async fn purge_stream(&self, stream: &StreamName) -> Result<u64> {
        let h = self.stream(stream)?;
        self.call(|reply| Op::PurgeStream { stream: h, reply }).await
    }

    async fn publish(&self, stream: &StreamName, msg: OutgoingMessage) -> Result<PubAck> {
        let mut acks = self.publish_batch(stream, vec![msg]).await?;
        acks.pop().ok_or_else(|| Error::internal("publish returned no ack"))
    }

    async fn publish_batch(&self, stream: &StreamName, msgs: Vec<OutgoingMessage>) -> Result<Vec<PubAck>> {
        let h = self.stream(stream)?;
        if msgs.is_empty() {
            return Ok(Vec::new());
        }
        // Subjects and sizes are checked by the writer, before anything is staged.
        self.call(|reply| Op::Publish { stream: h, msgs, cond: Cond::None, reply }).await
    }

    async fn get_message(&self, stream: &StreamName, seq: Seq) -> Result<Message> {
        self.stream(stream)?
            .get(seq)?
            .ok_or_else(|| Error::not_found(format!("stream `{stream}` has no message {seq}")))
    }

    async fn read(&self, stream: &StreamName, request: ReadRequest) -> Result<Vec<Message>> {
        let h = self.stream(stream)?;
        blocking(move || h.read(&request)).await
    }

    async fn last_message(&self, stream: &StreamName, subject: &Subject) -> Result<Message> {
        self.stream(stream)?.last_message(subject)
    }

    async fn last_per_subject(&self, stream: &StreamName, filter: Option<&SubjectPattern>) -> Result<Vec<Message>> {
        let (h, filter) = (self.stream(stream)?, filter.cloned());
        blocking(move || h.last_per_subject(filter.as_ref())).await
    }

    async fn tail(
        &self,
        stream: &StreamName,
        from: Seq,
        filter: Option<SubjectPattern>,
    ) -> Result<BoxStream<TailEvent>> {
        Ok(tail::start(self.stream(stream)?, from, filter))
    }
}

#[async_trait]
impl KvEngine for EmbeddedEngine {
    async fn create_bucket(&self, config: BucketConfig) -> Result<BucketInfo> {
        config.validate()?;
        if config.replicas != 1 {
            return Err(Error::invalid("the embedded engine keeps one copy: replicas must be 1"));
        }
        let record = StreamRecord { config: kv::stream_config(&config), kind: StreamKind::Kv(config.clone()) };
        let h = self.call(|reply| Op::CreateStream { record: Box::new(record), reply }).await.map_err(|e| {
            if e.kind() == finmesh_core::ErrorKind::AlreadyExists {
                Error::new(e.kind(), format!("bucket `{}` exists with a different configuration", config.name))
            } else {
                e
            }
        })?;
        Ok(kv::info(config, &h.state()))
    }

    async fn update_bucket(&self, config: BucketConfig) -> Result<BucketInfo> {
        config.validate()?;
        self.bucket(&config.name)?;
        let record = StreamRecord { config: kv::stream_config(&config), kind: StreamKind::Kv(config.clone()) };
        let h = self.call(|reply| Op::UpdateStream { record: Box::new(record), reply }).await?;
        Ok(kv::info(config, &h.state()))
    }

    async fn bucket_info(&self, bucket: &BucketName) -> Result<BucketInfo> {
        let (h, config) = self.bucket(bucket)?;
        Ok(kv::info(config, &h.state()))
    }

    async fn list_buckets(&self) -> Result<Vec<BucketName>> {
        let mut v: Vec<BucketName> = self
            .inner
            .registry
            .all()
            .into_iter()
            .filter_map(|h| match &h.record.read().kind {
                StreamKind::Kv(c) => Some(c.name.clone()),
                StreamKind::User => None,
            })
            .collect();
        v.sort();
        Ok(v)
    }

    async fn delete_bucket(&self, bucket: &BucketName) -> Result<()> {
        self.bucket(bucket)?;
        let name = kv::stream_name(bucket);
        self.call(|reply| Op::DeleteStream { name, kind: StreamKindTag::Kv, reply }).await
    }

    async fn kv_get(&self, bucket: &BucketName, key: &Key) -> Result<Option<KvEntry>> {
        let now = Timestamp::now();
        self.inner.registry.with_bucket(bucket, |h| kv::get_live(h, bucket, key, now))?
    }

    async fn kv_get_revision(&self, bucket: &BucketName, key: &Key, revision: Revision) -> Result<Option<KvEntry>> {
        let (h, config) = self.bucket(bucket)?;
        let Some(m) = h.get(Seq(revision.0))? else { return Ok(None) };
        let e = kv::entry(bucket, m)?;
        if &e.key != key || kv::expired(config.ttl, e.created, Timestamp::now()) {
            return Ok(None);
        }
        Ok(Some(e))
    }

    async fn kv_put(&self, bucket: &BucketName, key: &Key, value: Bytes) -> Result<Revision> {
        self.kv_write(bucket, key, value, KvOp::Put, Cond::None).await
    }

    async fn kv_create(&self, bucket: &BucketName, key: &Key, value: Bytes) -> Result<Revision> {
        self.kv_write(bucket, key, value, KvOp::Put, Cond::NoLiveValue).await
    }

    async fn kv_update(&self, bucket: &BucketName, key: &Key, value: Bytes, expected: Revision) -> Result<Revision> {
        self.kv_write(bucket, key, value, KvOp::Put, Cond::LastSubjectSeq(expected)).await
    }

    async fn kv_delete(&self, bucket: &BucketName, key: &Key) -> Result<Revision> {
        self.kv_write(bucket, key, Bytes::new(), KvOp::Delete, Cond::None).await
    }

    async fn kv_delete_if(&self, bucket: &BucketName, key: &Key, expected: Revision) -> Result<Revision> {
        self.kv_write(bucket, key, Bytes::new(), KvOp::Delete, Cond::LastSubjectSeq(expected)).await
    }

    async fn kv_purge(&self, bucket: &BucketName, key: &Key) -> Result<Revision> {
        self.kv_write(bucket, key, Bytes::new(), KvOp::Purge, Cond::Rollup).await
    }

    async fn kv_keys(&self, bucket: &BucketName, prefix: &str) -> Result<Vec<Key>> {
        let (h, config) = self.bucket(bucket)?;
        let bucket = bucket.clone();
        let prefix = prefix.to_owned();
        let page = blocking(move || kv::keys_page(&h, &config, &bucket, &prefix, None, usize::MAX)).await?;
        Ok(page.keys)
    }

    async fn kv_keys_page(
        &self,
        bucket: &BucketName,
        prefix: &str,
        after: Option<&Key>,
        limit: usize,
    ) -> Result<KeysPage> {
        let limit = finmesh_core::engine::keys_page_limit(limit)?;
        let (h, config) = self.bucket(bucket)?;
        let (bucket, prefix, after) = (bucket.clone(), prefix.to_owned(), after.cloned());
        blocking(move || kv::keys_page(&h, &config, &bucket, &prefix, after.as_ref(), limit)).await
    }

    async fn kv_history(&self, bucket: &BucketName, key: &Key) -> Result<Vec<KvEntry>> {
        let (h, config) = self.bucket(bucket)?;
        let now = Timestamp::now();
        let mut out = Vec::new();
        for seq in h.subject_seqs(kv::subject(bucket, key).as_str())? {
            if let Some(m) = h.get(seq)? {
                let e = kv::entry(bucket, m)?;
                if !kv::expired(config.ttl, e.created, now) {
                    out.push(e);
                }
            }
        }
        Ok(out)
    }

    async fn kv_watch(&self, bucket: &BucketName, prefix: &str, start: WatchStart) -> Result<BoxStream<KvEntry>> {
        let (h, _) = self.bucket(bucket)?;
        let filter = SubjectPattern::new(format!("$KV.{bucket}.>")).expect("valid pattern");
        let key_prefix = format!("{}{prefix}", kv::key_prefix(bucket));
        let mut initial = Vec::new();
        let from = match start {
            WatchStart::FromRevision(r) => Seq(r.0.max(1)),
            WatchStart::New => h.state().last_seq.next(),
            WatchStart::LatestValues => {
                let upto = h.state().last_seq;
                initial = h
                    .last_per_subject(Some(&filter))?
                    .into_iter()
                    .filter(|m| m.seq <= upto && m.subject.as_str().starts_with(&key_prefix))
                    .collect();
                upto.next()
            }
        };
        let bucket = bucket.clone();
        let b2 = bucket.clone();
        let head = futures::stream::iter(initial.into_iter().map(move |m| kv::entry(&b2, m)));
        let live = tail::start(h, from, Some(filter)).filter_map(move |ev| {
            let out = match ev {
                Ok(TailEvent::Message(m)) if m.subject.as_str().starts_with(&key_prefix) => Some(kv::entry(&bucket, m)),
                Ok(_) => None,
                Err(e) => Some(Err(e)),
            };
            std::future::ready(out)
        });
        Ok(Box::pin(head.chain(live)))
    }
}

/// Run a read that may touch many records on tokio's blocking pool, off
/// the async workers (and never on the writer thread).
pub(crate) async fn blocking<T: Send + 'static>(f: impl FnOnce() -> Result<T> + Send + 'static) -> Result<T> {
    tokio::task::spawn_blocking(f).await.map_err(|e| Error::internal("a read task failed").with_source(e))?
}

#[async_trait]
impl ConsumerEngine for EmbeddedEngine {
    async fn create_consumer(&self, stream: &StreamName, config: ConsumerConfig) -> Result<ConsumerInfo> {
        config.validate()?;
        let h = self.stream(stream)?;
        // A last-per-subject start walks every matching subject: off the writer.
        let start = match config.deliver {
            DeliverPolicy::LastPerSubject if self.inner.consumers.exists(stream, &config.name).is_err() => {
                let (hh, filter) = (h.clone(), config.filter.clone());
                Some(blocking(move || hh.last_seqs(filter.as_ref())).await?)
            }
            _ => None,
        };
        let hh = h.clone();
        let pos = self.call(|reply| {
            Op::Consumer(Box::new(ConsumerOp::Create { stream: hh, config, update: false, start, reply }))
        });
        let pos = pos.await?;
        blocking(move || consumers::info(&h, pos)).await
    }

    async fn update_consumer(&self, stream: &StreamName, config: ConsumerConfig) -> Result<ConsumerInfo> {
        config.validate()?;
        let h = self.stream(stream)?;
        let hh = h.clone();
        let pos = self.call(|reply| {
            Op::Consumer(Box::new(ConsumerOp::Create { stream: hh, config, update: true, start: None, reply }))
        });
        let pos = pos.await?;
        blocking(move || consumers::info(&h, pos)).await
    }

    async fn consumer_info(&self, stream: &StreamName, consumer: &ConsumerName) -> Result<ConsumerInfo> {
        let h = self.stream(stream)?;
        let pos = self.inner.consumers.position(stream, consumer)?;
        blocking(move || consumers::info(&h, pos)).await
    }

    async fn list_consumers(&self, stream: &StreamName) -> Result<Vec<ConsumerName>> {
        self.stream(stream)?;
        Ok(self.inner.consumers.names(stream))
    }

    async fn delete_consumer(&self, stream: &StreamName, consumer: &ConsumerName) -> Result<()> {
        let h = self.stream(stream)?;
        let name = consumer.clone();
        self.call(|reply| Op::Consumer(Box::new(ConsumerOp::Delete { stream: h, name, reply }))).await
    }

    async fn fetch(
        &self,
        stream: &StreamName,
        consumer: &ConsumerName,
        request: FetchRequest,
    ) -> Result<Vec<Delivery>> {
        let h = self.stream(stream)?;
        if request.max == 0 {
            return Ok(Vec::new());
        }
        let deadline = Timestamp::now().saturating_add(request.wait);
        // Subscribe before looking, so a publish in between wakes us.
        let mut live = h.live.subscribe();
        let mut reads_again = 0;
        loop {
            // Read the candidates off the writer; it only claims them.
            let plan = self.inner.consumers.fetch_plan(stream, consumer, request.max)?;
            let hh = h.clone();
            let new = blocking(move || consumers::read_candidates(&hh, &plan)).await?;
            let (name, hh, max) = (consumer.clone(), h.clone(), request.max);
            let outcome = self
                .call(|reply| Op::Consumer(Box::new(ConsumerOp::Fetch { stream: hh, name, max, new, reply })))
                .await?;
            if outcome.read_again && reads_again < MAX_FETCH_READS_AGAIN {
                reads_again += 1;
                continue;
            }
            if !outcome.deliveries.is_empty() || Timestamp::now() >= deadline {
                return Ok(outcome.deliveries);
            }
            let wait = consumers::until(outcome.next_due, deadline);
            tokio::select! {
                r = live.recv() => {
                    if let Err(tokio::sync::broadcast::error::RecvError::Closed) = r {
                        return Err(Error::not_found(format!("stream `{stream}` was deleted")));
                    }
                }
                _ = tokio::time::sleep(wait) => {}
            }
        }
    }

    async fn ack(&self, stream: &StreamName, consumer: &ConsumerName, token: &AckToken, kind: AckKind) -> Result<()> {
        self.ack_many(stream, consumer, std::slice::from_ref(token), kind).await
    }

    async fn ack_many(
        &self,
        stream: &StreamName,
        consumer: &ConsumerName,
        tokens: &[AckToken],
        kind: AckKind,
    ) -> Result<()> {
        let h = self.stream(stream)?;
        self.inner.consumers.exists(stream, consumer)?;
        let seqs = tokens.iter().map(consumers::parse_token).collect::<Result<Vec<u64>>>()?;
        let name = consumer.clone();
        self.call(|reply| Op::Consumer(Box::new(ConsumerOp::Ack { stream: h, name, seqs, kind, reply }))).await
    }

    async fn ack_all(&self, stream: &StreamName, consumer: &ConsumerName, upto: Seq) -> Result<()> {
        let h = self.stream(stream)?;
        let name = consumer.clone();
        self.call(|reply| Op::Consumer(Box::new(ConsumerOp::AckAll { stream: h, name, upto, reply }))).await
    }
}
