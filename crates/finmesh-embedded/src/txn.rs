//! One stream write in preparation: a fjall batch plus what the batch has
//! changed so far, so that later steps of the same write see earlier ones
//! (read-your-writes inside a publish batch, retention, rollups).
//!
//! Invariant: nothing here touches storage or the stream's shared state
//! until [`Txn::commit`]; a write that fails validation leaves no trace.
//!
//! A write is committed as two fjall batches: the messages, the `l`
//! entries and the counters first, then the per-subject index (`x`)
//! changes ([`IndexBatch`]). The index is derived data: it can always be
//! rebuilt from the messages, so it need not share the first batch's
//! atomicity. The writer commits the index batch before anything reads
//! the index and before the write is acknowledged — for `sync = always`
//! writes while the journal's fsync is under way, which takes that work off
//! the acknowledgement's critical path. The index batch records the
//! counters it matches (`index/<name>` in `meta`); after a crash between
//! the two batches the counters differ and `open` rebuilds the stream's
//! index from its messages.

use std::collections::BTreeMap;

// foldhash (randomly seeded per process) instead of SipHash: these maps sit on
// the publish path, where SipHash took ~7% of the instructions.
use hashbrown::{HashMap, HashSet};
use std::sync::Arc;

use finmesh_core::{KvOp, Message, Result, Seq, StreamState, Subject, Timestamp};
use fjall::{Database, OwnedWriteBatch as WriteBatch};

use crate::codec;
use crate::store::{Counters, StreamHandle, index_meta_key, state_meta_key, storage};

pub(crate) struct Txn {
    pub h: Arc<StreamHandle>,
    batch: WriteBatch,
    /// The index changes, committed after `batch` (see the module doc).
    index: WriteBatch,
    /// `l` entries changed by this write: subject -> (last seq, count).
    lasts: HashMap<String, (Seq, u64)>,
    /// Messages this write added: seq -> (subject, size, KV operation).
    added: BTreeMap<Seq, (Subject, u64, KvOp)>,
    /// Messages this write removed (committed or added).
    removed: HashSet<Seq>,
    /// Committed messages of a KV bucket this write removes, kept in
    /// memory until the write is revealed (`StreamHandle::replaced`).
    replaced: Vec<Message>,
    /// The stream's state as it will be after commit, except that while
    /// `first_stale` is set `first_seq` / `first_time` may name a message
    /// this write removed ([`Txn::settle_first`] corrects them).
    pub st: StreamState,
    /// The first message was removed and `st.first_seq` not yet moved on:
    /// a write that removes many messages from the front (history trims of
    /// keys written in order) looks for the new first one once, not once
    /// per removal.
    first_stale: bool,
}

impl Txn {
    pub fn new(db: &Database, h: &Arc<StreamHandle>) -> Self {
        Txn {
            h: h.clone(),
            batch: db.batch(),
            // Not handed to the OS at commit: the next write or fsync does,
            // and a crash before it only costs an index rebuild at open.
            index: db.batch().durability(None),
            lasts: HashMap::new(),
            added: BTreeMap::new(),
            removed: HashSet::new(),
            replaced: Vec::new(),
            st: h.committed_state(),
            first_stale: false,
        }
    }

    /// Last sequence and count of `subject` as this write sees it.
    pub fn last_of(&self, subject: &str) -> Result<Option<(Seq, u64)>> {
        match self.lasts.get(subject) {
            Some(&(_, 0)) => Ok(None),
            Some(&v) => Ok(Some(v)),
            None => self.h.last_of(subject),
        }
    }

    /// Append a message at the next sequence; returns the stored message.
    /// `before` is what [`Txn::last_of`] answers for its subject now (the
    /// caller has read it to check a condition or to trim after).
    pub fn append(
        &mut self,
        time: Timestamp,
        msg: finmesh_core::OutgoingMessage,
        before: Option<(Seq, u64)>,
    ) -> Result<Message> {
        debug_assert_eq!(before, self.last_of(msg.subject.as_str())?);
        let seq = self.st.last_seq.next();
        let size = msg.size() as u64;
        let raw = codec::encode_message(time, &msg.subject, &msg.headers, &msg.payload);
        self.batch.insert(&self.h.msgs, codec::seq_key(seq), raw);
        self.index.insert(&self.h.index, codec::index_key(msg.subject.as_str(), seq), []);
        let count = before.map_or(0, |(_, c)| c);
        self.set_last(msg.subject.as_str(), seq, count + 1);
        let op = crate::kv::op_of_headers(&msg.headers);
        self.added.insert(seq, (msg.subject.clone(), size, op));
        let st = &mut self.st;
        if st.messages == 0 {
            st.first_seq = seq;
            st.first_time = Some(time);
            self.first_stale = false;
        }
        st.messages += 1;
        st.bytes += size;
        st.last_seq = seq;
        st.last_time = Some(time);
        Ok(Message { seq, subject: msg.subject, headers: msg.headers, payload: msg.payload, time })
    }

    /// Record a subject's new last sequence and count; written to the `l`
    /// keyspace once per subject at commit, however often it changes.
    fn set_last(&mut self, subject: &str, seq: Seq, count: u64) {
        match self.lasts.get_mut(subject) {
            Some(v) => *v = (seq, count),
            None => {
                self.lasts.insert(subject.to_owned(), (seq, count));
            }
        }
    }

    /// Subject and size of a message this write can still see.
    fn describe(&self, seq: Seq) -> Result<Option<(Subject, u64, Timestamp)>> {
        if self.removed.contains(&seq) {
            return Ok(None);
        }
        if let Some((s, size, _)) = self.added.get(&seq) {
            return Ok(Some((s.clone(), *size, self.st.last_time.unwrap_or_default())));
        }
        Ok(self.h.get_committed(seq)?.map(|m| {
            let size = m.size() as u64;
            (m.subject, size, m.time)
        }))
    }

    /// Remove a stored message, keeping indexes and counters right.
    fn remove(&mut self, seq: Seq, subject: &Subject, size: u64) -> Result<()> {
        let committed = if self.h.kv && !self.added.contains_key(&seq) { self.h.get_committed(seq)? } else { None };
        self.remove_read(seq, subject, size, committed)
    }

    /// Remove the message at `seq` if this write can still see it, reading
    /// a committed one once (for its subject, size and, in a KV bucket,
    /// [`Txn::replaced`]).
    fn remove_seq(&mut self, seq: Seq) -> Result<()> {
        if self.removed.contains(&seq) {
            return Ok(());
        }
        if let Some((subject, size, _)) = self.added.get(&seq) {
            let (subject, size) = (subject.clone(), *size);
            return self.remove_read(seq, &subject, size, None);
        }
        let Some(m) = self.h.get_committed(seq)? else { return Ok(()) };
        let (subject, size) = (m.subject.clone(), m.size() as u64);
        self.remove_read(seq, &subject, size, self.h.kv.then_some(m))
    }

    /// [`Txn::remove`] of a message already read: `committed` is the
    /// stored message when it is a committed one of a KV bucket.
    fn remove_read(&mut self, seq: Seq, subject: &Subject, size: u64, committed: Option<Message>) -> Result<()> {
        if let Some(m) = committed {
            self.replaced.push(m);
        }
        self.batch.remove(&self.h.msgs, codec::seq_key(seq).to_vec());
        self.index.remove(&self.h.index, codec::index_key(subject.as_str(), seq));
        if let Some((last, count)) = self.last_of(subject.as_str())? {
            debug_assert!(count >= 1);
            self.set_last(subject.as_str(), last, count - 1);
        }
        self.removed.insert(seq);
        self.st.messages -= 1;
        self.st.bytes = self.st.bytes.saturating_sub(size);
        if seq == self.st.first_seq {
            self.first_stale = true;
        }
        Ok(())
    }

    /// If the first message was removed, move `first_seq` (and
    /// `first_time`) to the first message still present, at or after it.
    fn settle_first(&mut self) -> Result<()> {
        if !std::mem::take(&mut self.first_stale) {
            return Ok(());
        }
        if self.st.messages == 0 {
            self.st.first_seq = self.st.last_seq.next();
            self.st.first_time = None;
            return Ok(());
        }
        let from = self.st.first_seq;
        let from_store = {
            let mut found = None;
            for kv in self.h.msgs.range(codec::seq_key(from)..) {
                let k = kv.key().map_err(storage)?;
                let s = codec::key_seq(&k)?;
                if !self.removed.contains(&s) {
                    found = Some(s);
                    break;
                }
            }
            found
        };
        let from_added = self.added.range(from..).map(|(s, _)| *s).find(|s| !self.removed.contains(s));
        let next = match (from_store, from_added) {
            (Some(a), Some(b)) => a.min(b),
            (a, b) => a.or(b).unwrap_or(self.st.last_seq.next()),
        };
        self.st.first_seq = next;
        self.st.first_time = self.describe(next)?.map(|(_, _, t)| t);
        Ok(())
    }

    /// The KV operation of the message at `seq`, as this write sees it.
    pub fn kv_op(&self, seq: Seq) -> Result<Option<KvOp>> {
        if self.removed.contains(&seq) {
            return Ok(None);
        }
        if let Some((_, _, op)) = self.added.get(&seq) {
            return Ok(Some(*op));
        }
        Ok(self.h.get_committed(seq)?.map(|m| crate::kv::op_of(&m)))
    }

    /// Has this write anything to commit?
    pub fn is_empty(&self) -> bool {
        self.added.is_empty() && self.removed.is_empty()
    }

    /// Drop the oldest message of the stream.
    pub fn evict_front(&mut self) -> Result<()> {
        self.settle_first()?;
        let seq = self.st.first_seq;
        match self.describe(seq)? {
            Some((subject, size, _)) => self.remove(seq, &subject, size),
            None => Err(finmesh_core::Error::internal(format!(
                "stream `{}`: first sequence {seq} is missing from the store",
                self.h.name
            ))),
        }
    }

    /// Time of the oldest message, if any.
    pub fn front_time(&mut self) -> Result<Option<Timestamp>> {
        self.settle_first()?;
        Ok(if self.st.messages == 0 { None } else { self.st.first_time })
    }

    /// Sequences of `subject` this write can see, oldest first.
    fn subject_seqs(&self, subject: &str) -> Result<Vec<Seq>> {
        let mut seqs: Vec<Seq> =
            self.h.subject_seqs(subject)?.into_iter().filter(|s| !self.removed.contains(s)).collect();
        seqs.extend(
            self.added
                .iter()
                .filter(|(s, (sub, _, _))| sub.as_str() == subject && !self.removed.contains(*s))
                .map(|(s, _)| *s),
        );
        Ok(seqs)
    }

    /// Bytes that appending one message to `subject` and then trimming it
    /// to `keep` messages ([`Txn::trim_subject`]) would remove.
    pub fn bytes_trimmed_by_append(&self, subject: &Subject, keep: u64) -> Result<u64> {
        let count = self.last_of(subject.as_str())?.map_or(0, |(_, c)| c);
        let excess = (count + 1).saturating_sub(keep);
        if excess == 0 {
            return Ok(0);
        }
        let mut freed = 0;
        for seq in self.subject_seqs(subject.as_str())?.into_iter().take(excess as usize) {
            if let Some((_, size, _)) = self.describe(seq)? {
                freed += size;
            }
        }
        Ok(freed)
    }

    /// Drop the oldest messages of `subject` until at most `keep` remain.
    pub fn trim_subject(&mut self, subject: &Subject, keep: u64) -> Result<()> {
        let count = self.last_of(subject.as_str())?.map_or(0, |(_, c)| c);
        if count <= keep {
            return Ok(());
        }
        let seqs = self.subject_seqs(subject.as_str())?;
        let excess = seqs.len().saturating_sub(keep as usize);
        for seq in seqs.into_iter().take(excess) {
            self.remove_seq(seq)?;
        }
        Ok(())
    }

    /// [`Txn::trim_subject`] right after an [`Txn::append`] to `subject`
    /// that saw `before`. When the subject held one message and keeps one
    /// (a KV bucket with history 1, a rollup), that message is the one to
    /// drop: it is `before`'s last sequence (a subject's `l` entry names
    /// its newest message while it has any), so no scan of the subject
    /// index is needed.
    pub fn trim_after_append(&mut self, subject: &Subject, keep: u64, before: Option<(Seq, u64)>) -> Result<()> {
        match before {
            Some((only, 1)) if keep == 1 => {
                debug_assert_eq!(self.subject_seqs(subject.as_str())?.first(), Some(&only));
                self.remove_seq(only)
            }
            _ => self.trim_subject(subject, keep),
        }
    }

    /// Commit the write and its index changes; returns the new state, for
    /// [`StreamHandle::after_commit`].
    pub fn commit(self, meta: &fjall::Keyspace) -> Result<StreamState> {
        let (st, index) = self.commit_deferring_index(meta)?;
        index.commit()?;
        Ok(st)
    }

    /// Commit the write atomically, except for its index changes, which
    /// the caller must commit before anything reads the index or the write
    /// is acknowledged.
    pub fn commit_deferring_index(mut self, meta: &fjall::Keyspace) -> Result<(StreamState, IndexBatch)> {
        self.settle_first()?;
        if self.h.kv_cache.enabled() && !self.lasts.is_empty() {
            // Before the commit (see `kvcache.rs`): the subjects whose last
            // entry this write changes.
            self.h.kv_cache.changed(self.st.last_seq, Some(self.lasts.keys().cloned().collect()));
        }
        for (subject, (seq, count)) in self.lasts.drain() {
            if count == 0 {
                self.batch.remove(&self.h.last, subject.into_bytes());
            } else {
                self.batch.insert(&self.h.last, subject.into_bytes(), codec::encode_last(seq, count));
            }
        }
        let c = Counters {
            messages: self.st.messages,
            bytes: self.st.bytes,
            first_seq: self.st.first_seq.0,
            last_seq: self.st.last_seq.0,
        };
        self.batch.insert(meta, state_meta_key(&self.h.name), c.encode());
        if !self.replaced.is_empty() && !self.added.is_empty() {
            // Before the commit: a get must never find neither the old value nor the new.
            self.h.stash_replaced(self.st.last_seq, std::mem::take(&mut self.replaced));
        }
        self.batch.commit().map_err(storage)?;
        let mut index = self.index;
        if !index.is_empty() {
            index.insert(meta, index_meta_key(&self.h.name), c.encode());
        }
        Ok((self.st, IndexBatch(index, self.h, self.st.last_seq)))
    }
}

/// The subject index changes of a committed write (possibly none), the
/// stream, and the last sequence the index covers once they are in.
pub(crate) struct IndexBatch(WriteBatch, Arc<StreamHandle>, Seq);

impl IndexBatch {
    /// Commit the changes, then move the stream's index watermark
    /// ([`StreamHandle::indexed`]) so readers off the writer may use them.
    pub fn commit(self) -> Result<()> {
        self.0.commit().map_err(storage)?;
        self.1.indexed.fetch_max(self.2.0, std::sync::atomic::Ordering::Release);
        Ok(())
    }
}
