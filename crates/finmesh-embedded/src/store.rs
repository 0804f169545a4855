//! Stream storage: the registry of open streams, opening and recovery, and
//! every read path (by sequence, by time, last per subject).
//!
//! Each stream owns three fjall keyspaces (see the crate doc for the key
//! layout): `s.<name>.m` (messages by sequence), `s.<name>.x` (subject
//! index) and `s.<name>.l` (last sequence and count per subject). Its
//! configuration and counters live in the shared `meta` keyspace.
//!
//! Invariants:
//! - only the writer thread (`writer.rs`) mutates keyspaces and
//!   [`StreamHandle::committed`]; readers take the state locks briefly and
//!   never across an await;
//! - `committed.first_seq..=committed.last_seq` bounds every stored
//!   message; a message below `first_seq` found at open is the remainder of
//!   an interrupted purge and is removed before the stream is served;
//! - **nothing is visible before it is as durable as its ack promised**:
//!   readers see the stream through [`StreamHandle::visible`], which a
//!   commit reaches only through [`StreamHandle::reveal`] — at once for
//!   `interval` and `never` streams, after the fsync that covers it for
//!   `always` streams (and for any stream while earlier commits of it
//!   still wait for theirs, see [`StreamHandle::unsynced`]). Every read
//!   path hides sequences above `visible.last_seq` (KV gets included), and
//!   the live feed is updated with `reveal`. Removals (retention,
//!   purge) may show before they are durable: a crash can only bring such
//!   a message back, never lose one a reader saw.
//! - the subject index (`x`) of sequences up to [`StreamHandle::indexed`]
//!   is committed; beyond it, a reader off the writer thread must not
//!   trust the index (see `txn.rs` and `filtered.rs`).

use fixedbitset::FixedBitSet;
use hashbrown::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};

use bytes::Bytes;
use finmesh_core::{
    BucketConfig, BucketName, Error, Message, ReadRequest, ReadStart, Result, Seq, StreamConfig, StreamName,
    StreamState, Subject, SubjectPattern, Timestamp,
};
use fjall::config::{PartitioningPolicy, PinningPolicy};
use fjall::{Database, Keyspace, KeyspaceCreateOptions};
use parking_lot::{Mutex, RwLock};
use serde::{Deserialize, Serialize};
use tokio::sync::broadcast;

use crate::codec;
use crate::kvcache::KvCache;

/// Live messages of one commit, shared by every tail.
pub(crate) type LiveBatch = Arc<[Message]>;

/// How many commits a slow tail may fall behind before it re-reads the store.
const LIVE_CAPACITY: usize = 1024;

/// What a stream is for: a user stream, or the backing stream of a KV bucket.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub(crate) enum StreamKind {
    User,
    Kv(BucketConfig),
}

/// The meta record of a stream: `stream/<name>` in the `meta` keyspace.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub(crate) struct StreamRecord {
    pub config: StreamConfig,
    pub kind: StreamKind,
}

/// The counters of a stream: `state/<name>` in the `meta` keyspace, written
/// in the same batch as the messages they count, as four u64 BE:
/// messages, bytes, first_seq, last_seq.
#[derive(Debug, Clone, Copy, Default)]
pub(crate) struct Counters {
    pub messages: u64,
    pub bytes: u64,
    pub first_seq: u64,
    pub last_seq: u64,
}

impl Counters {
    pub fn encode(&self) -> [u8; 32] {
        let mut v = [0u8; 32];
        for (i, n) in [self.messages, self.bytes, self.first_seq, self.last_seq].into_iter().enumerate() {
            v[i * 8..i * 8 + 8].copy_from_slice(&n.to_be_bytes());
        }
        v
    }

    pub fn decode(v: &[u8]) -> Option<Self> {
        if v.len() != 32 {
            return None;
        }
        let n = |i: usize| u64::from_be_bytes(v[i * 8..i * 8 + 8].try_into().unwrap_or_default());
        Some(Counters { messages: n(0), bytes: n(1), first_seq: n(2), last_seq: n(3) })
    }
}

pub(crate) fn stream_meta_key(name: &StreamName) -> String {
    format!("stream/{name}")
}
pub(crate) fn state_meta_key(name: &StreamName) -> String {
    format!("state/{name}")
}
/// The counters as of the last commit whose subject index changes are
/// stored: differs from `state/<name>` (or is missing while that counts a
/// write: the first index batch writes it) only after a crash between a
/// write and its index changes (see [`crate::txn::IndexBatch`]).
pub(crate) fn index_meta_key(name: &StreamName) -> String {
    format!("index/{name}")
}
/// The stream's epoch (u64 BE): see [`StreamHandle::epoch`].
pub(crate) fn epoch_meta_key(name: &StreamName) -> String {
    format!("epoch/{name}")
}
/// Written (and fsynced) by a clean close, removed (and fsynced) at open:
/// missing at open means the process stopped without closing the store.
pub(crate) const CLEAN_CLOSE_KEY: &str = "clean-close";

/// A new epoch: the time in nanoseconds, above every epoch this process
/// handed out and above `old` (so it changes even if the clock does not).
pub(crate) fn new_epoch(old: Option<u64>) -> u64 {
    static LAST: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    let floor = old.map_or(0, |o| o.saturating_add(1));
    let now = Timestamp::now().0.max(floor);
    let mut last = LAST.load(Ordering::Relaxed);
    loop {
        let next = now.max(last.saturating_add(1));
        match LAST.compare_exchange_weak(last, next, Ordering::Relaxed, Ordering::Relaxed) {
            Ok(_) => return next,
            Err(seen) => last = seen,
        }
    }
}

/// One open stream.
pub(crate) struct StreamHandle {
    pub name: StreamName,
    /// Configuration and kind; replaced by the writer on update.
    pub record: RwLock<StreamRecord>,
    /// Counters and bounds as of the last commit; the writer's view.
    pub committed: Mutex<StreamState>,
    /// Counters and bounds readers see: at most `committed`, and only what
    /// is as durable as the stream's policy promises (see the module doc).
    pub visible: Mutex<StreamState>,
    /// Commits of this stream waiting for an fsync before [`reveal`](Self::reveal):
    /// while it is not zero, later commits are revealed after an fsync
    /// too, whatever the policy, so reveals keep commit order.
    pub unsynced: AtomicUsize,
    pub msgs: Keyspace,
    pub index: Keyspace,
    pub last: Keyspace,
    /// Revealed messages (see [`reveal`](Self::reveal)), for tails.
    pub live: broadcast::Sender<LiveBatch>,
    /// Set when the stream is deleted; tails end with `NotFound`.
    pub deleted: AtomicBool,
    /// Names the stream's history (`StreamInfo::epoch`): set at creation,
    /// replaced at open after an unclean stop if the stream's policy let
    /// readers see writes the crash may have taken back.
    pub epoch: u64,
    /// Every index change of the writes up to this sequence is committed
    /// (moved by [`crate::txn::IndexBatch::commit`]).
    pub indexed: AtomicU64,
    /// The backing stream of a KV bucket.
    pub kv: bool,
    /// KV values removed by commits readers do not see yet (a key's older
    /// revision trimmed by a newer write that waits for its fsync), by
    /// subject, each with the last sequence of the commit that removed it:
    /// kept until that commit is revealed, so a get meanwhile still finds
    /// the key's last visible value (see [`Self::last_visible_message`]).
    /// Holds only what writes in flight replaced.
    pub replaced: Mutex<HashMap<String, Vec<(Seq, Message)>>>,
    /// Hot values of a KV bucket's gets (see `kvcache.rs`); off (capacity
    /// 0) for user streams.
    pub kv_cache: KvCache,
}

impl StreamHandle {
    pub fn config(&self) -> StreamConfig {
        self.record.read().config.clone()
    }

    /// The state readers see (see the module doc).
    pub fn state(&self) -> StreamState {
        *self.visible.lock()
    }

    /// The state as of the last commit: the writer's view.
    pub fn committed_state(&self) -> StreamState {
        *self.committed.lock()
    }

    /// Record the state a commit produced. Called by the writer right
    /// after each commit; readers see it only after [`reveal`](Self::reveal).
    pub fn after_commit(&self, st: StreamState) {
        *self.committed.lock() = st;
    }

    /// Whether commits of this stream still wait for an fsync before they show.
    pub fn has_unsynced(&self) -> bool {
        self.unsynced.load(Ordering::Acquire) > 0
    }

    /// Show a commit to readers: its state (KV gets follow it, see
    /// `kv::get_live`). Called in commit order, once the commit is as
    /// durable as its policy promises, before its ack.
    pub fn reveal(&self, st: StreamState) {
        *self.visible.lock() = st;
        // After the state: a get that starts after this sees the new state.
        self.kv_cache.revealed(st.last_seq);
        // After the state: a get that missed a value dropped here sees the
        // new state when it checks again (see `kv::get_live`).
        let mut replaced = self.replaced.lock();
        if !replaced.is_empty() {
            replaced.retain(|_, v| {
                v.retain(|(by, _)| *by > st.last_seq);
                !v.is_empty()
            });
        }
    }

    /// Keep the KV values a commit ending at `removed_by` removes until it
    /// is revealed (see [`Self::replaced`]). Called before the commit.
    pub fn stash_replaced(&self, removed_by: Seq, msgs: Vec<Message>) {
        let mut replaced = self.replaced.lock();
        for m in msgs {
            replaced.entry(m.subject.as_str().to_owned()).or_default().push((removed_by, m));
        }
    }

    /// The last message of `subject` visible at `visible`, when its last
    /// committed one is not visible yet: the newer of what the subject
    /// index has up to `visible` and what a commit not yet revealed
    /// replaced.
    pub fn last_visible_message(&self, subject: &str, visible: Seq) -> Result<Option<Message>> {
        let stashed = self.replaced.lock().get(subject).and_then(|v| {
            v.iter()
                .filter(|(by, m)| *by > visible && m.seq <= visible)
                .max_by_key(|(_, m)| m.seq)
                .map(|(_, m)| m.clone())
        });
        let mut indexed = None;
        for kv in self.index.prefix(codec::subject_prefix(subject)).rev() {
            let seq = codec::index_key_seq(&kv.key().map_err(storage)?)?;
            if seq <= visible {
                indexed = Some(seq);
                break;
            }
        }
        match (indexed, stashed) {
            (Some(i), Some(m)) if m.seq >= i => Ok(Some(m)),
            (Some(i), m) => Ok(self.get(i)?.or(m)),
            (None, m) => Ok(m),
        }
    }

    /// The last sequence readers may see.
    pub fn visible_seq(&self) -> Seq {
        self.visible.lock().last_seq
    }

    pub fn is_deleted(&self) -> bool {
        self.deleted.load(Ordering::Acquire)
    }

    /// The message at `seq`, if stored and visible.
    pub fn get(&self, seq: Seq) -> Result<Option<Message>> {
        if seq > self.visible_seq() {
            return Ok(None);
        }
        self.get_committed(seq)
    }

    /// The message at `seq`, if stored, visible or not (the writer's view).
    pub fn get_committed(&self, seq: Seq) -> Result<Option<Message>> {
        match self.msgs.get(codec::seq_key(seq)).map_err(storage)? {
            Some(raw) => Ok(Some(codec::decode_message(seq, Bytes::from(raw))?)),
            None => Ok(None),
        }
    }

    /// The last visible sequence of `subject`, if it has one. The `l`
    /// entry answers unless it names a message not visible yet; then the
    /// subject index is searched backwards.
    pub fn last_visible_of(&self, subject: &str) -> Result<Option<Seq>> {
        let Some((last, _)) = self.last_of(subject)? else { return Ok(None) };
        let visible = self.visible_seq();
        if last <= visible {
            return Ok(Some(last));
        }
        for kv in self.index.prefix(codec::subject_prefix(subject)).rev() {
            let seq = codec::index_key_seq(&kv.key().map_err(storage)?)?;
            if seq <= visible {
                return Ok(Some(seq));
            }
        }
        Ok(None)
    }

    /// The last sequence and count of `subject`, if it has messages,
    /// visible or not (the writer's view).
    pub fn last_of(&self, subject: &str) -> Result<Option<(Seq, u64)>> {
        match self.last.get(subject.as_bytes()).map_err(storage)? {
            Some(v) => Ok(Some(codec::decode_last(&v)?)),
            None => Ok(None),
        }
    }

    /// Sequences of `subject`, oldest first, visible or not (the writer's view).
    pub fn subject_seqs(&self, subject: &str) -> Result<Vec<Seq>> {
        let mut out = Vec::new();
        for kv in self.index.prefix(codec::subject_prefix(subject)) {
            out.push(codec::index_key_seq(&kv.key().map_err(storage)?)?);
        }
        Ok(out)
    }

    /// First stored sequence whose time is at or after `time`.
    pub fn seq_at_time(&self, time: Timestamp) -> Result<Seq> {
        let st = self.state();
        if st.messages == 0 {
            return Ok(st.last_seq.next());
        }
        // Times are non-decreasing in sequence order (the writer enforces it),
        // so binary search over sequences, stepping over interior holes.
        let (mut lo, mut hi) = (st.first_seq.0, st.last_seq.0 + 1);
        while lo < hi {
            let mid = lo + (hi - lo) / 2;
            match self.first_at_or_after(Seq(mid))? {
                Some(m) if m.seq.0 < hi => {
                    if m.time >= time {
                        hi = mid;
                    } else {
                        lo = m.seq.0 + 1;
                    }
                }
                _ => hi = mid,
            }
        }
        Ok(Seq(lo))
    }

    fn first_at_or_after(&self, seq: Seq) -> Result<Option<Message>> {
        match self.msgs.range(codec::seq_key(seq)..).next() {
            Some(kv) => {
                let (k, v) = kv.into_inner().map_err(storage)?;
                Ok(Some(codec::decode_message(codec::key_seq(&k)?, Bytes::from(v))?))
            }
            None => Ok(None),
        }
    }

    /// Stored visible messages as `req` bounds them.
    pub fn read(&self, req: &ReadRequest) -> Result<Vec<Message>> {
        let limit = req.limit.min(finmesh_core::engine::MAX_READ_LIMIT);
        let start = match req.start {
            ReadStart::Seq(s) => s.max(Seq(1)),
            ReadStart::Time(t) => self.seq_at_time(t)?,
        };
        let end = req.end.unwrap_or(Seq(u64::MAX)).min(self.visible_seq());
        if limit == 0 || start > end {
            return Ok(Vec::new());
        }
        if let Some(f) = &req.filter
            && let Some(out) = crate::filtered::read_by_index(self, start, end, f, limit)?
        {
            return Ok(out);
        }
        self.scan(start, end, req.filter.as_ref(), limit, Vec::new())
    }

    /// Messages in `start..=end` matching `filter`, read in sequence order,
    /// appended to `out` until it holds `limit`.
    pub(crate) fn scan(
        &self,
        start: Seq,
        end: Seq,
        filter: Option<&SubjectPattern>,
        limit: usize,
        mut out: Vec<Message>,
    ) -> Result<Vec<Message>> {
        if out.len() >= limit || start > end {
            return Ok(out);
        }
        for kv in self.msgs.range(codec::seq_key(start)..=codec::seq_key(end)) {
            let (k, v) = kv.into_inner().map_err(storage)?;
            crate::filtered::count_visit();
            let m = codec::decode_message(codec::key_seq(&k)?, Bytes::from(v))?;
            if filter.is_none_or(|f| f.matches(&m.subject)) {
                out.push(m);
                if out.len() >= limit {
                    break;
                }
            }
        }
        Ok(out)
    }

    /// The last visible message of each subject matching `filter`, in sequence order.
    pub fn last_per_subject(&self, filter: Option<&SubjectPattern>) -> Result<Vec<Message>> {
        let (_, seqs) = self.last_seqs(filter)?;
        let mut out = Vec::with_capacity(seqs.len());
        for s in seqs {
            if let Some(m) = self.get(s)? {
                out.push(m);
            }
        }
        Ok(out)
    }

    /// The last visible sequence of every subject `filter` matches, in
    /// order, as of the visible last sequence returned with them: a subject
    /// whose last visible message came later is left out (its messages
    /// after that sequence are new to whoever started there).
    pub fn last_seqs(&self, filter: Option<&SubjectPattern>) -> Result<(Seq, Vec<Seq>)> {
        let literal_prefix = filter.map(crate::filtered::literal_prefix).unwrap_or_default();
        let visible = self.visible_seq();
        let mut seqs = Vec::new();
        for kv in self.last.prefix(literal_prefix.as_bytes()) {
            let (k, v) = kv.into_inner().map_err(storage)?;
            let subject = std::str::from_utf8(&k).map_err(|_| Error::internal("corrupt subject in last index"))?;
            if filter.is_none_or(|f| f.matches_str(subject)) {
                match codec::decode_last(&v)?.0 {
                    seq if seq <= visible => seqs.push(seq),
                    _ => seqs.extend(self.last_visible_of(subject)?.filter(|s| *s <= visible)),
                }
            }
        }
        seqs.sort_unstable();
        Ok((visible, seqs))
    }

    pub fn last_message(&self, subject: &Subject) -> Result<Message> {
        let not_found = || Error::not_found(format!("stream `{}` has no message on subject `{subject}`", self.name));
        let seq = self.last_visible_of(subject.as_str())?.ok_or_else(not_found)?;
        self.get(seq)?.ok_or_else(not_found)
    }
}

/// Map a fjall error: a poisoned database, and a resource that ran out
/// (disk space, quota, file descriptors, memory: see [`exhausted`]), are
/// `Unavailable` (retrying once the operator freed some may succeed);
/// anything else is `Internal`.
pub(crate) fn storage(e: impl Into<fjall::Error>) -> Error {
    let e: fjall::Error = e.into();
    if let fjall::Error::Poisoned = e {
        return Error::unavailable("store is poisoned after a failed write or fsync; restart the node").with_source(e);
    }
    match exhausted(&e) {
        Some(what) => {
            Error::unavailable(format!("the store is out of {what}; retry once some is freed")).with_source(e)
        }
        None => Error::internal("storage error").with_source(e),
    }
}

/// The resource `e` (or an I/O error in its source chain) says ran out, if any.
pub(crate) fn exhausted(e: &(dyn std::error::Error + 'static)) -> Option<&'static str> {
    let mut next = Some(e);
    while let Some(e) = next {
        if let Some(io) = e.downcast_ref::<std::io::Error>() {
            use std::io::ErrorKind as K;
            let what = match (io.kind(), io.raw_os_error()) {
                (K::StorageFull, _) | (_, Some(libc::ENOSPC)) => Some("disk space"),
                (K::QuotaExceeded, _) | (_, Some(libc::EDQUOT)) => Some("disk quota"),
                (_, Some(libc::EMFILE | libc::ENFILE)) => Some("file descriptors"),
                (K::OutOfMemory, _) | (_, Some(libc::ENOMEM)) => Some("memory"),
                _ => None,
            };
            if what.is_some() {
                return what;
            }
        }
        next = e.source();
    }
    None
}

fn ks_name(name: &StreamName, part: char) -> String {
    format!("s.{name}.{part}")
}

/// Memtable size per keyspace: three per stream, so keep them modest.
const MEMTABLE_BYTES: u64 = 16 * 1024 * 1024;

fn data_options() -> KeyspaceCreateOptions {
    KeyspaceCreateOptions::default().max_memtable_size(MEMTABLE_BYTES)
}

/// Options of a KV bucket's `m` and `l` keyspaces, which every get reads
/// by point lookup at random. fjall's defaults pin index and filter blocks
/// only in the upper levels (and partition them from level 3); in the lower
/// levels, where nearly every key of a large bucket lives, a get then loads
/// the table's whole index block (and filter block) through the block
/// cache, hundreds of KiB per table, or one partition of each, which random
/// keys evict from a cache smaller than the index. Whole and pinned at
/// every level instead, a get's lookups need at most one data block each
/// from the cache or the disk, at a memory cost of about 5 bytes per key:
/// the index (one entry per 4 KiB data block) and, for `l`, a
/// 10-bit-per-key filter.
/// `m` is read by sequences the caller found in `l`, which exist, so its
/// last level needs no filter (`expect_point_read_hits`). Set when the
/// keyspace is created: fjall keeps a keyspace's options with it, so a
/// bucket created by an older version keeps the defaults.
fn kv_options(part: char) -> KeyspaceCreateOptions {
    data_options()
        .index_block_partitioning_policy(PartitioningPolicy::all(false))
        .filter_block_partitioning_policy(PartitioningPolicy::all(false))
        .index_block_pinning_policy(PinningPolicy::all(true))
        .filter_block_pinning_policy(PinningPolicy::all(true))
        .expect_point_read_hits(part == 'm')
}

/// Open (or create) the keyspaces of a stream and build its handle.
///
/// `index_current` says whether the subject index matches the messages
/// (see `txn.rs`); if not, it is repaired from them.
pub(crate) fn open_handle(
    db: &Database,
    record: StreamRecord,
    counters: Counters,
    index_current: bool,
    epoch: u64,
    kv_cache_bytes: u64,
) -> Result<Arc<StreamHandle>> {
    let name = record.config.name.clone();
    let kv = matches!(record.kind, StreamKind::Kv(_));
    let ks = |p| {
        let options = || if kv && p != 'x' { kv_options(p) } else { data_options() };
        db.keyspace(&ks_name(&name, p), options).map_err(storage)
    };
    let (msgs, index, last) = (ks('m')?, ks('x')?, ks('l')?);
    let mut state = StreamState {
        messages: counters.messages,
        bytes: counters.bytes,
        first_seq: Seq(counters.first_seq.max(1)),
        last_seq: Seq(counters.last_seq),
        first_time: None,
        last_time: None,
    };
    if state.messages == 0 {
        state.first_seq = state.last_seq.next();
    }
    let handle = StreamHandle {
        kv,
        kv_cache: KvCache::new(if kv { kv_cache_bytes } else { 0 }),
        replaced: Mutex::new(HashMap::new()),
        epoch,
        name,
        record: RwLock::new(record),
        committed: Mutex::new(state),
        visible: Mutex::new(state),
        unsynced: AtomicUsize::new(0),
        msgs,
        index,
        last,
        live: broadcast::channel(LIVE_CAPACITY).0,
        deleted: AtomicBool::new(false),
        // `recover` below repairs the index if it is behind.
        indexed: AtomicU64::new(counters.last_seq),
    };
    handle.recover(db, index_current)?;
    Ok(Arc::new(handle))
}

impl StreamHandle {
    /// Bring keyspaces and counters into agreement after open.
    fn recover(&self, db: &Database, index_current: bool) -> Result<()> {
        let mut st = self.committed.lock();
        // Remainder of a purge interrupted by a crash: the counters (written
        // first) say empty, the keyspaces still hold messages.
        if st.messages == 0 && self.msgs.first_key_value().is_some() {
            tracing::warn!(stream = %self.name, "finishing a purge interrupted by a crash");
            for ks in [&self.msgs, &self.index, &self.last] {
                ks.clear().map_err(storage)?;
            }
        }
        if !index_current {
            self.repair_index(db)?;
        }
        if let Some(kv) = self.msgs.first_key_value() {
            let (k, v) = kv.into_inner().map_err(storage)?;
            let m = codec::decode_message(codec::key_seq(&k)?, Bytes::from(v))?;
            st.first_seq = m.seq;
            st.first_time = Some(m.time);
        }
        if let Some(kv) = self.msgs.last_key_value() {
            let (k, v) = kv.into_inner().map_err(storage)?;
            let m = codec::decode_message(codec::key_seq(&k)?, Bytes::from(v))?;
            if m.seq > st.last_seq {
                return Err(Error::internal(format!(
                    "stream `{}`: message {} is past the recorded last sequence {}; the store is inconsistent",
                    self.name, m.seq, st.last_seq
                )));
            }
            st.last_time = Some(m.time);
        }
        // What survived the reopen is as durable as it gets.
        *self.visible.lock() = *st;
        drop(st);
        Ok(())
    }
}

impl StreamHandle {
    /// Bring the subject index back in line with the messages after a crash
    /// between a write and its index changes (see `txn.rs`): drop entries
    /// whose message is gone, add the missing ones. Two key scans and a
    /// bitmap over the sequence range; only the differences are written and
    /// only the messages missing from the index are decoded.
    fn repair_index(&self, db: &Database) -> Result<()> {
        let started = std::time::Instant::now();
        let first_last = |kv: Option<fjall::KvPair>| -> Result<Option<u64>> {
            kv.map(|(k, _)| codec::key_seq(&k).map(|s| s.0)).transpose()
        };
        let first = first_last(self.msgs.first_key_value().map(|g| g.into_inner()).transpose().map_err(storage)?)?;
        let last = first_last(self.msgs.last_key_value().map(|g| g.into_inner()).transpose().map_err(storage)?)?;
        let (first, last) = match (first, last) {
            (Some(f), Some(l)) => (f, l),
            _ => (1, 0),
        };
        let span = (last + 1).saturating_sub(first) as usize;
        // Bit i stands for sequence first + i.
        let bit = |seq: u64| (seq >= first && seq <= last).then(|| (seq - first) as usize);
        let mut stored = FixedBitSet::with_capacity(span);
        for kv in self.msgs.iter() {
            if let Some(i) = bit(codec::key_seq(&kv.key().map_err(storage)?)?.0) {
                stored.insert(i);
            }
        }
        let mut indexed = FixedBitSet::with_capacity(span);
        let (mut batch, mut removed, mut added) = (db.batch(), 0u64, 0u64);
        for kv in self.index.iter() {
            let k = kv.key().map_err(storage)?;
            match bit(codec::index_key_seq(&k)?.0) {
                // The first entry of a stored message: keep it.
                Some(i) if stored.contains(i) && !indexed.put(i) => {}
                // Dangling (message gone), or a second entry for one message.
                _ => {
                    batch.remove(&self.index, k);
                    removed += 1;
                }
            }
            if batch.len() >= REPAIR_BATCH {
                std::mem::replace(&mut batch, db.batch()).commit().map_err(storage)?;
            }
        }
        stored.difference_with(&indexed);
        for i in stored.ones() {
            let seq = Seq(first + i as u64);
            let m = self.get_committed(seq)?.ok_or_else(|| Error::internal(format!("message {seq} vanished")))?;
            batch.insert(&self.index, codec::index_key(m.subject.as_str(), seq), []);
            added += 1;
            if batch.len() >= REPAIR_BATCH {
                std::mem::replace(&mut batch, db.batch()).commit().map_err(storage)?;
            }
        }
        batch.commit().map_err(storage)?;
        tracing::warn!(
            stream = %self.name,
            removed,
            added,
            took = ?started.elapsed(),
            "repaired the subject index: the last writes before a crash had not stored their index changes"
        );
        Ok(())
    }
}

/// Index changes per batch when repairing an index.
const REPAIR_BATCH: usize = 10_000;

/// Every open stream by name. KV buckets' streams are here too (as `KV_<bucket>`).
#[derive(Default)]
pub(crate) struct Registry {
    streams: RwLock<HashMap<StreamName, Arc<StreamHandle>>>,
    /// The same handles for buckets, by bucket name (the KV get path).
    buckets: RwLock<HashMap<BucketName, Arc<StreamHandle>>>,
    /// Capacity of each bucket's hot-value cache
    /// (`EmbeddedOptions::kv_cache_bytes`), for the handles opened here.
    pub kv_cache_bytes: u64,
}

impl Registry {
    /// An empty registry whose buckets get hot-value caches of
    /// `kv_cache_bytes` each.
    pub fn new(kv_cache_bytes: u64) -> Self {
        Registry { kv_cache_bytes, ..Registry::default() }
    }

    pub fn get(&self, name: &StreamName) -> Option<Arc<StreamHandle>> {
        self.streams.read().get(name).cloned()
    }

    pub fn insert(&self, handle: Arc<StreamHandle>) {
        if let StreamKind::Kv(b) = &handle.record.read().kind {
            self.buckets.write().insert(b.name.clone(), handle.clone());
        }
        self.streams.write().insert(handle.name.clone(), handle);
    }

    pub fn remove(&self, name: &StreamName) -> Option<Arc<StreamHandle>> {
        let h = self.streams.write().remove(name)?;
        if let StreamKind::Kv(b) = &h.record.read().kind {
            self.buckets.write().remove(&b.name);
        }
        Some(h)
    }

    /// Run `f` on the backing stream of bucket `name` under the registry's
    /// read lock, without taking a reference (the KV get path).
    pub fn with_bucket<T>(&self, name: &BucketName, f: impl FnOnce(&StreamHandle) -> T) -> Result<T> {
        match self.buckets.read().get(name) {
            Some(h) => Ok(f(h)),
            None => Err(Error::not_found(format!("bucket `{name}` does not exist"))),
        }
    }

    /// The backing stream of bucket `name`.
    pub fn bucket(&self, name: &BucketName) -> Result<Arc<StreamHandle>> {
        self.buckets
            .read()
            .get(name)
            .cloned()
            .ok_or_else(|| Error::not_found(format!("bucket `{name}` does not exist")))
    }

    pub fn all(&self) -> Vec<Arc<StreamHandle>> {
        self.streams.read().values().cloned().collect()
    }

    /// The stream named `name`, as a user stream.
    pub fn user_stream(&self, name: &StreamName) -> Result<Arc<StreamHandle>> {
        match self.get(name) {
            Some(h) if h.record.read().kind == StreamKind::User => Ok(h),
            _ => Err(Error::not_found(format!("stream `{name}` does not exist"))),
        }
    }
}

/// Load every stream recorded in `meta`. After an unclean stop
/// (`unclean`), every stream whose policy is not `always` gets a new epoch:
/// its readers may have seen writes the crash took back.
pub(crate) fn load_all(db: &Database, meta: &Keyspace, registry: &Registry, unclean: bool) -> Result<()> {
    for kv in meta.prefix("stream/") {
        let (k, v) = kv.into_inner().map_err(storage)?;
        let record: StreamRecord = serde_json::from_slice(&v).map_err(|e| {
            Error::internal(format!("corrupt meta record `{}`", String::from_utf8_lossy(&k))).with_source(e)
        })?;
        let name = record.config.name.clone();
        let counters = match meta.get(state_meta_key(&name)).map_err(storage)? {
            Some(v) => Counters::decode(&v).ok_or_else(|| Error::internal(format!("corrupt counters of `{name}`")))?,
            None => Counters::default(),
        };
        // The marker is first written by the index batch of the stream's
        // first write, so none is current only for a stream never written
        // to; a stream with messages and no marker lost that first batch.
        let marker = meta.get(index_meta_key(&name)).map_err(storage)?;
        let index_current = match marker {
            Some(m) => *m == counters.encode(),
            None => counters.last_seq == 0,
        };
        let stored = match meta.get(epoch_meta_key(&name)).map_err(storage)? {
            Some(v) => Some(u64::from_be_bytes(
                <[u8; 8]>::try_from(&v[..]).map_err(|_| Error::internal(format!("corrupt epoch of `{name}`")))?,
            )),
            None => None,
        };
        let lossy = unclean && record.config.sync != finmesh_core::SyncPolicy::Always;
        let epoch = match stored {
            Some(e) if !lossy => e,
            old => {
                let e = new_epoch(old);
                if lossy {
                    tracing::warn!(
                        stream = %name,
                        epoch = e,
                        "new epoch: the store was not closed cleanly and the stream's sync policy is not `always`, \
                         so readers may have seen writes the crash lost"
                    );
                }
                meta.insert(epoch_meta_key(&name), e.to_be_bytes()).map_err(storage)?;
                e
            }
        };
        registry.insert(open_handle(db, record, counters, index_current, epoch, registry.kv_cache_bytes)?);
        if !index_current {
            meta.insert(index_meta_key(&name), counters.encode()).map_err(storage)?;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use finmesh_core::ErrorKind;

    use super::storage;

    fn os(errno: i32) -> std::io::Error {
        std::io::Error::from_raw_os_error(errno)
    }

    /// Regression (issue 17): a full disk or exhausted descriptors were
    /// `Internal` (500, not retryable); they are `Unavailable` (503).
    #[test]
    fn resource_exhaustion_is_unavailable() {
        for (errno, what) in [
            (libc::ENOSPC, "disk space"),
            (libc::EDQUOT, "disk quota"),
            (libc::EMFILE, "file descriptors"),
            (libc::ENFILE, "file descriptors"),
            (libc::ENOMEM, "memory"),
        ] {
            let e = storage(fjall::Error::Io(os(errno)));
            assert_eq!(e.kind(), ErrorKind::Unavailable, "errno {errno}");
            assert!(e.message().contains(what), "{e}");
            // Also when the I/O error comes through the LSM tree.
            let e = storage(fjall::Error::Storage(fjall::LsmError::Io(os(errno))));
            assert_eq!(e.kind(), ErrorKind::Unavailable, "errno {errno} via lsm-tree");
        }
        let e = storage(fjall::Error::Io(std::io::ErrorKind::StorageFull.into()));
        assert_eq!(e.kind(), ErrorKind::Unavailable);
        assert_eq!(storage(fjall::Error::Poisoned).kind(), ErrorKind::Unavailable);
        for other in [fjall::Error::Io(os(libc::EIO)), fjall::Error::InvalidTrailer, fjall::Error::Unrecoverable] {
            assert_eq!(storage(other).kind(), ErrorKind::Internal);
        }
    }
}

#[cfg(test)]
mod kv_keyspace_tests {
    use bytes::Bytes;
    use finmesh_core::{
        BucketConfig, BucketName, Key, KvEngine, OutgoingMessage, StreamConfig, StreamEngine, StreamName,
        SubjectPattern,
    };
    use fjall::AbstractTree;

    use super::Keyspace;
    use crate::EmbeddedEngine;

    /// Flush `ks` and compact it into its last level, where a large
    /// bucket's keys live.
    fn settle(ks: &Keyspace) {
        ks.rotate_memtable_and_wait().unwrap();
        ks.major_compact().unwrap();
        assert!(ks.table_count() > 0, "{}", ks.name());
    }

    /// Regression (issue 18, random keys at scale): with fjall's defaults a
    /// KV get in the last level loaded the table's whole index and filter
    /// blocks through the block cache (0.22 of the one-key req/s at 10M
    /// keys). A bucket's `m` and `l` keep them pinned at every level; a
    /// user stream, read in order, keeps the defaults.
    #[tokio::test]
    async fn kv_lookups_keep_index_and_filter_in_memory_at_every_level() {
        let dir = tempfile::tempdir().unwrap();
        let e = EmbeddedEngine::open(dir.path()).unwrap();
        let b = BucketName::new("b").unwrap();
        e.create_bucket(BucketConfig::new(b.clone())).await.unwrap();
        let entries = (0..5_000).map(|i| (Key::new(format!("k{i}")).unwrap(), Bytes::from(vec![7; 64]))).collect();
        e.kv_put_batch(&b, entries).await.unwrap();
        let s = StreamName::new("S").unwrap();
        e.create_stream(StreamConfig::new(s.clone(), vec![SubjectPattern::new("s.>").unwrap()])).await.unwrap();
        let batch = (0..5_000).map(|i| OutgoingMessage::new(format!("s.{i}").parse().unwrap(), vec![7; 64]));
        e.publish_batch(&s, batch.collect()).await.unwrap();

        let (h, _) = e.bucket(&b).unwrap();
        for ks in [&h.msgs, &h.last] {
            settle(ks);
            assert!(ks.tree.pinned_block_index_size() > 0, "{}: index not pinned", ks.name());
        }
        assert!(h.last.tree.pinned_filter_size() > 0, "the key lookup's filter is not pinned");
        let user = e.inner.registry.get(&s).unwrap();
        settle(&user.msgs);
        // The same messages in a user stream: fjall's defaults keep only the
        // top of a partitioned index in memory in the last level.
        let (kv_index, user_index) = (h.msgs.tree.pinned_block_index_size(), user.msgs.tree.pinned_block_index_size());
        assert!(user_index * 4 < kv_index, "user stream {user_index} B pinned, bucket {kv_index} B");
        // Gets read through the pinned blocks.
        for i in [0, 2_500, 4_999] {
            let got = e.kv_get(&b, &Key::new(format!("k{i}")).unwrap()).await.unwrap().unwrap();
            assert_eq!(got.value.len(), 64);
        }
    }
}
