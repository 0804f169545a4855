//! Durable pull consumers: configuration, position and pending deliveries,
//! kept in the `meta` keyspace and changed only by the writer thread.
//!
//! # On-disk layout
//!
//! | key | value |
//! |---|---|
//! | `consumer/<stream>/<name>` | JSON head `{config, delivered, initial}` |
//! | `cpend/<stream>/<name>/` + seq (u64 BE) | one pending delivery: deliveries (u32 BE), due time (u64 BE, ns) |
//!
//! Each pending delivery is its own key, so an ack removes one key and a
//! nak or in-progress rewrites one 12-byte value: the I/O of an ack does
//! not grow with the number of pending deliveries. A fetch writes one key
//! per delivery, and the head only when the cursor (`delivered`) or the
//! initial queue moved. Every change of one request is one atomic batch
//! (same durability as the stream's `sync` policy). A head written by an
//! older version carries its `pending` map inline; `load` moves it to keys.
//!
//! State: `delivered` (highest stream sequence handed out as new), a queue of
//! initial sequences (last-per-subject start), and `pending`: sequence ->
//! (deliveries, due time). A pending entry whose due time passed is
//! redelivered; after `max_deliver` deliveries it is dead-lettered instead.
//! The dead-letter copy is committed before the consumer's change, with the
//! message id [`dead_letter_msg_id`] (as on the NATS engine), so a crash in
//! between stores the copy once when the message is dead-lettered again.
//! The ack floor is derived: everything below the smallest pending or queued
//! sequence, and up to `delivered` when nothing is outstanding.
//!
//! Reading the stream is not the writer's job: a fetch reads its candidate
//! new messages on a blocking thread first ([`read_candidates`], through
//! the subject index for a filtered consumer), then the writer claims them
//! ([`ConsumerOp::Fetch`]): it skips those another fetch claimed meanwhile,
//! so the cursor never moves backwards and no message is handed out twice.
//! A fetch that lost every candidate that way reads again from the new
//! cursor (a few times at most), so concurrent fetches with no wait do not
//! come back empty while messages are there.
//!
//! Invariants: only the writer thread mutates a consumer; readers (info,
//! the fetch snapshot) take its lock briefly; `pending.len() <=
//! max_ack_pending` after any fetch; an ack token is the stream sequence in
//! decimal; the in-memory record and the keys agree after every request.

use std::collections::{BTreeMap, BTreeSet, HashMap, VecDeque};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use finmesh_core::config::{dead_letter_headers as dlh, dead_letter_msg_id, dead_letter_subject};
use finmesh_core::{
    AckKind, ConsumerConfig, ConsumerInfo, ConsumerName, DeliverPolicy, Delivery, Error, ErrorKind, Message,
    OutgoingMessage, ReadRequest, Result, Seq, StreamConfig, StreamName, SubjectPattern, SyncPolicy, Timestamp,
};
use fjall::{Keyspace, OwnedWriteBatch as WriteBatch};
use parking_lot::Mutex;
use serde::{Deserialize, Serialize};

use crate::store::{StreamHandle, StreamKind, StreamRecord, storage};
use crate::writer::{Completion, Reply, Writer, complete};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
struct Pending {
    deliveries: u32,
    due: Timestamp,
}

impl Pending {
    fn encode(&self) -> [u8; 12] {
        let mut v = [0u8; 12];
        v[..4].copy_from_slice(&self.deliveries.to_be_bytes());
        v[4..].copy_from_slice(&self.due.0.to_be_bytes());
        v
    }

    fn decode(v: &[u8]) -> Option<Self> {
        let deliveries = u32::from_be_bytes(v.get(..4)?.try_into().ok()?);
        let due = u64::from_be_bytes(v.get(4..12)?.try_into().ok()?);
        (v.len() == 12).then_some(Pending { deliveries, due: Timestamp(due) })
    }
}

/// Pending deliveries, indexed by sequence and by due time, with the count
/// of redelivered ones kept up to date: every operation a fetch, an ack or
/// an info needs is O(log n) or O(1), never a walk over every entry.
#[derive(Debug, Clone, Default)]
struct PendingSet {
    by_seq: BTreeMap<u64, Pending>,
    by_due: BTreeSet<(Timestamp, u64)>,
    redelivered: u64,
}

impl PendingSet {
    fn len(&self) -> usize {
        self.by_seq.len()
    }

    fn get(&self, seq: u64) -> Option<Pending> {
        self.by_seq.get(&seq).copied()
    }

    fn first_seq(&self) -> Option<u64> {
        self.by_seq.keys().next().copied()
    }

    fn seqs(&self) -> impl Iterator<Item = u64> + '_ {
        self.by_seq.keys().copied()
    }

    /// Insert or replace the entry of `seq`.
    fn insert(&mut self, seq: u64, p: Pending) {
        self.remove(seq);
        self.by_due.insert((p.due, seq));
        self.redelivered += u64::from(p.deliveries > 1);
        self.by_seq.insert(seq, p);
    }

    fn remove(&mut self, seq: u64) -> Option<Pending> {
        let p = self.by_seq.remove(&seq)?;
        self.by_due.remove(&(p.due, seq));
        self.redelivered -= u64::from(p.deliveries > 1);
        Some(p)
    }

    /// Move the due time of `seq`; false if it is not pending.
    fn set_due(&mut self, seq: u64, due: Timestamp) -> bool {
        match self.get(seq) {
            Some(p) => {
                self.insert(seq, Pending { due, ..p });
                true
            }
            None => false,
        }
    }

    /// Up to `max` sequences due at `now`, earliest due first.
    fn due(&self, now: Timestamp, max: usize) -> Vec<u64> {
        self.by_due.iter().take_while(|(due, _)| *due <= now).take(max).map(|(_, s)| *s).collect()
    }

    fn next_due(&self) -> Option<Timestamp> {
        self.by_due.first().map(|(due, _)| *due)
    }

    /// Remove every entry up to `upto`; returns their sequences.
    fn remove_upto(&mut self, upto: u64) -> BTreeSet<u64> {
        let seqs: BTreeSet<u64> = self.by_seq.range(..=upto).map(|(s, _)| *s).collect();
        for seq in &seqs {
            self.remove(*seq);
        }
        seqs
    }
}

/// One consumer in memory: the head record and every pending delivery.
#[derive(Debug, Clone)]
pub(crate) struct ConsumerRecord {
    config: ConsumerConfig,
    delivered: Seq,
    initial: VecDeque<Seq>,
    pending: PendingSet,
}

/// The head as stored (`consumer/<stream>/<name>`).
#[derive(Serialize)]
struct HeadOut<'a> {
    config: &'a ConsumerConfig,
    delivered: Seq,
    initial: &'a VecDeque<Seq>,
}

/// The head as read; `pending` only in records of older versions.
#[derive(Deserialize)]
struct HeadIn {
    config: ConsumerConfig,
    delivered: Seq,
    #[serde(default)]
    initial: VecDeque<Seq>,
    #[serde(default)]
    pending: BTreeMap<u64, Pending>,
}

impl ConsumerRecord {
    fn ack_floor(&self) -> Seq {
        let lowest = self.pending.first_seq().into_iter().chain(self.initial.iter().map(|s| s.0)).min();
        match lowest {
            Some(s) => Seq(s - 1),
            None => self.delivered,
        }
    }

    fn position(&self) -> Position {
        Position {
            config: self.config.clone(),
            delivered: self.delivered,
            ack_floor: self.ack_floor(),
            queued: self.initial.len() as u64,
            ack_pending: self.pending.len() as u64,
            redelivered: self.pending.redelivered,
        }
    }
}

/// What [`info`] needs of a consumer, taken under its lock.
pub(crate) struct Position {
    config: ConsumerConfig,
    delivered: Seq,
    ack_floor: Seq,
    queued: u64,
    ack_pending: u64,
    redelivered: u64,
}

fn head_key(stream: &StreamName, name: &ConsumerName) -> String {
    format!("consumer/{stream}/{name}")
}

fn pending_prefix(stream: &StreamName, name: &ConsumerName) -> Vec<u8> {
    format!("cpend/{stream}/{name}/").into_bytes()
}

fn pending_key(stream: &StreamName, name: &ConsumerName, seq: u64) -> Vec<u8> {
    let mut k = pending_prefix(stream, name);
    k.extend_from_slice(&seq.to_be_bytes());
    k
}

type Shared = Arc<Mutex<ConsumerRecord>>;

/// Keys and bytes the consumers wrote (removals count their key).
#[derive(Default)]
struct Io {
    keys: AtomicU64,
    bytes: AtomicU64,
}

/// What consumer state cost in writes since the engine opened.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct ConsumerIo {
    /// Keys inserted or removed.
    pub keys_written: u64,
    /// Bytes of those keys and values.
    pub bytes_written: u64,
}

/// All consumers, by stream then name.
#[derive(Clone, Default)]
pub(crate) struct Consumers {
    map: Arc<Mutex<HashMap<StreamName, BTreeMap<ConsumerName, Shared>>>>,
    io: Arc<Io>,
}

impl Consumers {
    /// Load every consumer recorded in `meta`, moving the inline pending
    /// maps of older versions to their own keys.
    pub fn load(meta: &Keyspace) -> Result<Self> {
        let c = Consumers::default();
        let mut legacy = Vec::new();
        {
            let mut map = c.map.lock();
            for kv in meta.prefix("consumer/") {
                let (k, v) = kv.into_inner().map_err(storage)?;
                let key = String::from_utf8_lossy(&k).into_owned();
                let head: HeadIn = serde_json::from_slice(&v)
                    .map_err(|e| Error::internal(format!("corrupt consumer record `{key}`")).with_source(e))?;
                let stream = key.split('/').nth(1).unwrap_or_default();
                let stream =
                    StreamName::new(stream).map_err(|_| Error::internal(format!("corrupt consumer key `{key}`")))?;
                let mut rec = ConsumerRecord {
                    config: head.config,
                    delivered: head.delivered,
                    initial: head.initial,
                    pending: PendingSet::default(),
                };
                let prefix = pending_prefix(&stream, &rec.config.name);
                for kv in meta.prefix(&prefix) {
                    let (k, v) = kv.into_inner().map_err(storage)?;
                    let seq = k.get(prefix.len()..).and_then(|b| <[u8; 8]>::try_from(b).ok()).map(u64::from_be_bytes);
                    let corrupt = || Error::internal(format!("corrupt pending entry of consumer `{key}`"));
                    rec.pending.insert(seq.ok_or_else(corrupt)?, Pending::decode(&v).ok_or_else(corrupt)?);
                }
                if !head.pending.is_empty() {
                    legacy.push((stream.clone(), rec.config.name.clone()));
                    for (seq, p) in head.pending {
                        if rec.pending.get(seq).is_none() {
                            rec.pending.insert(seq, p);
                        }
                    }
                }
                map.entry(stream).or_default().insert(rec.config.name.clone(), Arc::new(Mutex::new(rec)));
            }
        }
        // Keys first, then the head without its map: a crash in between
        // loads the same entries again.
        for (stream, name) in legacy {
            let shared = c.get(&stream, &name).expect("loaded above");
            let rec = shared.lock();
            for (seq, p) in &rec.pending.by_seq {
                meta.insert(pending_key(&stream, &name, *seq), p.encode()).map_err(storage)?;
            }
            meta.insert(head_key(&stream, &name), encode_head(&rec)?).map_err(storage)?;
            tracing::info!(%stream, consumer = %name, "moved the consumer's pending deliveries to their own keys");
        }
        Ok(c)
    }

    fn get(&self, stream: &StreamName, name: &ConsumerName) -> Option<Shared> {
        self.map.lock().get(stream).and_then(|m| m.get(name)).cloned()
    }

    fn require(&self, stream: &StreamName, name: &ConsumerName) -> Result<Shared> {
        self.get(stream, name).ok_or_else(|| not_found(stream, name))
    }

    pub fn names(&self, stream: &StreamName) -> Vec<ConsumerName> {
        self.map.lock().get(stream).map(|m| m.keys().cloned().collect()).unwrap_or_default()
    }

    /// `NotFound` unless the consumer exists.
    pub fn exists(&self, stream: &StreamName, name: &ConsumerName) -> Result<()> {
        self.require(stream, name).map(|_| ())
    }

    pub fn position(&self, stream: &StreamName, name: &ConsumerName) -> Result<Position> {
        Ok(self.require(stream, name)?.lock().position())
    }

    /// Where the next fetch reads new messages: after `delivered`, at most
    /// `want` (0: no room under `max_ack_pending`), through `filter`.
    pub fn fetch_plan(&self, stream: &StreamName, name: &ConsumerName, max: usize) -> Result<FetchPlan> {
        let shared = self.require(stream, name)?;
        let rec = shared.lock();
        let room = (rec.config.max_ack_pending as usize).saturating_sub(rec.pending.len());
        Ok(FetchPlan { after: rec.delivered, filter: rec.config.filter.clone(), want: max.min(room) })
    }

    pub fn io(&self) -> ConsumerIo {
        ConsumerIo {
            keys_written: self.io.keys.load(Ordering::Relaxed),
            bytes_written: self.io.bytes.load(Ordering::Relaxed),
        }
    }

    /// Drop every consumer of a deleted stream (into `batch`).
    pub fn remove_stream(&self, batch: &mut WriteBatch, meta: &Keyspace, stream: &StreamName) -> Result<()> {
        if let Some(m) = self.map.lock().remove(stream) {
            for (name, shared) in m {
                remove_keys(batch, meta, stream, &name, &shared.lock());
            }
        }
        Ok(())
    }
}

fn remove_keys(
    batch: &mut WriteBatch,
    meta: &Keyspace,
    stream: &StreamName,
    name: &ConsumerName,
    rec: &ConsumerRecord,
) {
    batch.remove(meta, head_key(stream, name));
    for seq in rec.pending.seqs() {
        batch.remove(meta, pending_key(stream, name, seq));
    }
}

fn not_found(stream: &StreamName, name: &ConsumerName) -> Error {
    Error::not_found(format!("consumer `{name}` does not exist on stream `{stream}`"))
}

/// A consumer's info; counts the backlog, so run it off the writer and
/// off the async workers.
pub(crate) fn info(h: &StreamHandle, pos: Position) -> Result<ConsumerInfo> {
    Ok(ConsumerInfo {
        stream: h.name.clone(),
        num_pending: count_after(h, pos.delivered, pos.config.filter.as_ref())? + pos.queued,
        config: pos.config,
        delivered: pos.delivered,
        ack_floor: pos.ack_floor,
        num_ack_pending: pos.ack_pending,
        num_redelivered: pos.redelivered,
    })
}

/// Matching stored messages after `after`.
fn count_after(h: &StreamHandle, after: Seq, filter: Option<&SubjectPattern>) -> Result<u64> {
    match filter {
        None => {
            let st = h.state();
            let start = after.next().max(st.first_seq);
            if start > st.last_seq {
                return Ok(0);
            }
            let after_cursor = st.last_seq.0 - start.0 + 1;
            let stored_span = st.last_seq.0 - st.first_seq.0 + 1;
            if st.messages == stored_span || start == st.first_seq {
                // No holes inside the stream, or everything stored is after
                // the cursor: no need to walk the keys.
                return Ok(if start == st.first_seq { st.messages } else { after_cursor });
            }
            // Holes (per-subject limits): count the shorter side.
            let count = |lo: Seq, hi: Seq| -> Result<u64> {
                let mut n = 0;
                for kv in h.msgs.range(crate::codec::seq_key(lo)..=crate::codec::seq_key(hi)) {
                    kv.key().map_err(storage)?;
                    n += 1;
                }
                #[cfg(test)]
                tests::WALKED.with(|w| w.set(w.get() + n));
                Ok(n)
            };
            if after_cursor <= stored_span - after_cursor {
                count(start, st.last_seq)
            } else {
                Ok(st.messages.saturating_sub(count(st.first_seq, after)?))
            }
        }
        Some(f) => {
            let mut n = 0;
            for kv in h.last.prefix(crate::filtered::literal_prefix(f).as_bytes()) {
                let k = kv.key().map_err(storage)?;
                let subject = String::from_utf8_lossy(&k);
                if !f.matches_str(&subject) {
                    continue;
                }
                let lo = crate::codec::index_key(&subject, after.next());
                let hi = crate::codec::index_key(&subject, Seq(u64::MAX));
                n += h.index.range(lo..=hi).count() as u64;
            }
            Ok(n)
        }
    }
}

/// Where a fetch reads its candidate new messages (see the module doc).
pub(crate) struct FetchPlan {
    pub after: Seq,
    pub filter: Option<SubjectPattern>,
    pub want: usize,
}

/// New messages read for a fetch, before the writer claims them.
#[derive(Default)]
pub(crate) struct Candidates {
    /// Matching messages after the plan's cursor, in order.
    msgs: Vec<Message>,
    /// Set when `msgs` holds every matching message up to this sequence.
    complete_to: Option<Seq>,
}

/// Read up to `plan.want` matching messages after the plan's cursor. Runs
/// on a blocking thread; a filtered read goes through the subject index.
pub(crate) fn read_candidates(h: &StreamHandle, plan: &FetchPlan) -> Result<Candidates> {
    let end = h.state().last_seq;
    if plan.want == 0 {
        return Ok(Candidates::default());
    }
    if plan.after >= end {
        return Ok(Candidates { msgs: Vec::new(), complete_to: Some(end) });
    }
    let want = plan.want.min(finmesh_core::engine::MAX_READ_LIMIT);
    let mut req = ReadRequest::from_seq(plan.after.next(), want).end(end);
    req.filter = plan.filter.clone();
    let msgs = h.read(&req)?;
    let complete_to = (msgs.len() < want).then_some(end);
    Ok(Candidates { msgs, complete_to })
}

/// What a fetch found; an empty batch tells when to look again.
pub(crate) struct FetchOutcome {
    pub deliveries: Vec<Delivery>,
    /// Earliest time a pending message becomes due, if any.
    pub next_due: Option<Timestamp>,
    /// Nothing was handed out because a concurrent fetch claimed every
    /// candidate first, while there is room for more: read again at once
    /// (the stream may hold more after the new cursor), whatever the wait.
    pub read_again: bool,
}

pub(crate) enum ConsumerOp {
    /// `start`: for a new last-per-subject consumer, the visible last
    /// sequence and the subjects' last sequences, read off the writer.
    Create {
        stream: Arc<StreamHandle>,
        config: ConsumerConfig,
        update: bool,
        start: Option<(Seq, Vec<Seq>)>,
        reply: Reply<Position>,
    },
    Delete {
        stream: Arc<StreamHandle>,
        name: ConsumerName,
        reply: Reply<()>,
    },
    Fetch {
        stream: Arc<StreamHandle>,
        name: ConsumerName,
        max: usize,
        new: Candidates,
        reply: Reply<FetchOutcome>,
    },
    Ack {
        stream: Arc<StreamHandle>,
        name: ConsumerName,
        seqs: Vec<u64>,
        kind: AckKind,
        reply: Reply<()>,
    },
    AckAll {
        stream: Arc<StreamHandle>,
        name: ConsumerName,
        upto: Seq,
        reply: Reply<()>,
    },
}

impl ConsumerOp {
    pub fn needs_sync(&self) -> bool {
        match self {
            ConsumerOp::Create { .. } | ConsumerOp::Delete { .. } => true,
            ConsumerOp::Fetch { stream, .. } | ConsumerOp::Ack { stream, .. } | ConsumerOp::AckAll { stream, .. } => {
                stream.record.read().config.sync == SyncPolicy::Always
            }
        }
    }

    pub fn fail(self, e: Error) -> Completion {
        match self {
            ConsumerOp::Create { reply, .. } => complete(reply, Err(e)),
            ConsumerOp::Delete { reply, .. } => complete(reply, Err(e)),
            ConsumerOp::Fetch { reply, .. } => complete(reply, Err(e)),
            ConsumerOp::Ack { reply, .. } => complete(reply, Err(e)),
            ConsumerOp::AckAll { reply, .. } => complete(reply, Err(e)),
        }
    }

    pub fn apply(self, w: &mut Writer) -> Completion {
        match self {
            ConsumerOp::Create { stream, config, update, start, reply } => {
                let r = create(w, &stream, config, update, start);
                complete(reply, r)
            }
            ConsumerOp::Delete { stream, name, reply } => {
                let r = delete(w, &stream, &name);
                complete(reply, r)
            }
            ConsumerOp::Fetch { stream, name, max, new, reply } => {
                let r = fetch(w, &stream, &name, max, new);
                complete(reply, r)
            }
            ConsumerOp::Ack { stream, name, seqs, kind, reply } => {
                let r = ack(w, &stream, &name, &seqs, kind);
                complete(reply, r)
            }
            ConsumerOp::AckAll { stream, name, upto, reply } => {
                let r = ack_all(w, &stream, &name, upto);
                complete(reply, r)
            }
        }
    }
}

fn encode_head(rec: &ConsumerRecord) -> Result<Vec<u8>> {
    let head = HeadOut { config: &rec.config, delivered: rec.delivered, initial: &rec.initial };
    serde_json::to_vec(&head).map_err(|e| Error::internal("encode consumer").with_source(e))
}

/// The keys one request changes: the head, and pending entries by sequence.
#[derive(Default)]
struct Changes {
    head: bool,
    pending: BTreeSet<u64>,
}

impl Changes {
    /// Write the changed keys as `rec` now has them, in one batch.
    fn commit(self, w: &Writer, stream: &StreamName, rec: &ConsumerRecord) -> Result<()> {
        if !self.head && self.pending.is_empty() {
            return Ok(());
        }
        let name = &rec.config.name;
        let mut batch = w.db.batch();
        let mut bytes = 0;
        if self.head {
            let (k, v) = (head_key(stream, name), encode_head(rec)?);
            bytes += k.len() + v.len();
            batch.insert(&w.meta, k, v);
        }
        for seq in &self.pending {
            let k = pending_key(stream, name, *seq);
            bytes += k.len();
            match rec.pending.get(*seq) {
                Some(p) => {
                    bytes += 12;
                    batch.insert(&w.meta, k, p.encode());
                }
                None => batch.remove(&w.meta, k),
            }
        }
        let keys = self.pending.len() as u64 + u64::from(self.head);
        w.consumers.io.keys.fetch_add(keys, Ordering::Relaxed);
        w.consumers.io.bytes.fetch_add(bytes as u64, Ordering::Relaxed);
        batch.commit().map_err(storage)
    }
}

fn check_live(h: &StreamHandle) -> Result<()> {
    if h.is_deleted() {
        return Err(Error::not_found(format!("stream `{}` does not exist", h.name)));
    }
    Ok(())
}

fn create(
    w: &mut Writer,
    h: &Arc<StreamHandle>,
    config: ConsumerConfig,
    update: bool,
    start: Option<(Seq, Vec<Seq>)>,
) -> Result<Position> {
    check_live(h)?;
    let existing = w.consumers.get(&h.name, &config.name);
    let shared = match (existing, update) {
        (Some(old), false) => {
            let old = old.lock();
            if old.config == config {
                return Ok(old.position());
            }
            return Err(Error::new(
                ErrorKind::AlreadyExists,
                format!("consumer `{}` exists with a different configuration", config.name),
            ));
        }
        (None, true) => return Err(not_found(&h.name, &config.name)),
        (Some(old), true) => {
            {
                let rec = old.lock();
                if rec.config.filter != config.filter || rec.config.deliver != config.deliver {
                    return Err(Error::invalid("a consumer's filter and deliver policy cannot change"));
                }
            }
            old
        }
        (None, false) => {
            let st = h.state();
            let filter = config.filter.as_ref();
            let (delivered, initial) = match config.deliver {
                DeliverPolicy::All => (Seq(st.first_seq.0.saturating_sub(1)), VecDeque::new()),
                DeliverPolicy::New => (st.last_seq, VecDeque::new()),
                DeliverPolicy::FromSeq { seq } => (Seq(seq.0 - 1), VecDeque::new()),
                DeliverPolicy::FromTime { time } => (Seq(h.seq_at_time(time)?.0 - 1), VecDeque::new()),
                DeliverPolicy::LastPerSubject => {
                    let (visible, last) = match start {
                        Some(start) => start,
                        None => h.last_seqs(filter)?,
                    };
                    (visible, last.into())
                }
            };
            let rec = ConsumerRecord { config: config.clone(), delivered, initial, pending: PendingSet::default() };
            Arc::new(Mutex::new(rec))
        }
    };
    if let (Some(dlq), Some(_)) = (&config.dead_letter, config.max_deliver) {
        ensure_dead_letter_stream(w, &h.name, dlq, &config.name)?;
    }
    let mut rec = shared.lock();
    let before = std::mem::replace(&mut rec.config, config);
    let r = Changes { head: true, ..Changes::default() }.commit(w, &h.name, &rec);
    if let Err(e) = r {
        rec.config = before;
        return Err(e);
    }
    let pos = rec.position();
    drop(rec);
    w.consumers.map.lock().entry(h.name.clone()).or_default().insert(pos.config.name.clone(), shared);
    Ok(pos)
}

fn ensure_dead_letter_stream(w: &mut Writer, stream: &StreamName, dlq: &StreamName, name: &ConsumerName) -> Result<()> {
    let subject = dead_letter_subject(stream, name);
    if let Some(h) = w.registry.get(dlq) {
        let rec = h.record.read();
        if rec.kind != StreamKind::User || !rec.config.subjects.iter().any(|p| p.matches(&subject)) {
            return Err(Error::invalid(format!("dead-letter stream `{dlq}` does not capture subject `{subject}`")));
        }
        return Ok(());
    }
    let pattern = SubjectPattern::new(format!("dlq.{stream}.>")).expect("valid pattern");
    let record = StreamRecord { config: StreamConfig::new(dlq.clone(), vec![pattern]), kind: StreamKind::User };
    w.create_stream(record).map(|_| ())
}

fn delete(w: &mut Writer, h: &StreamHandle, name: &ConsumerName) -> Result<()> {
    let removed = w.consumers.map.lock().get_mut(&h.name).and_then(|m| m.remove(name));
    let Some(shared) = removed else { return Err(not_found(&h.name, name)) };
    let mut batch = w.db.batch();
    remove_keys(&mut batch, &w.meta, &h.name, name, &shared.lock());
    batch.commit().map_err(storage)
}

fn fetch(
    w: &mut Writer,
    h: &Arc<StreamHandle>,
    name: &ConsumerName,
    max: usize,
    new: Candidates,
) -> Result<FetchOutcome> {
    check_live(h)?;
    let shared = w.consumers.require(&h.name, name)?;
    let mut rec = shared.lock();
    let now = Timestamp::now();
    let ack_wait = rec.config.ack_wait;
    let mut out = Vec::new();
    let mut ch = Changes::default();
    // Due redeliveries first, earliest due first. Dead-lettered and vanished
    // entries leave the set, so look again until `max` or none is due.
    let mut again = true;
    while again && out.len() < max {
        again = false;
        for seq in rec.pending.due(now, max - out.len()) {
            // Handed out by this fetch already (possible with a zero ack wait).
            if !ch.pending.insert(seq) {
                continue;
            }
            let p = rec.pending.get(seq).expect("due entries are pending");
            let Some(msg) = h.get(Seq(seq))? else {
                rec.pending.remove(seq);
                again = true;
                continue;
            };
            if rec.config.max_deliver.is_some_and(|m| p.deliveries >= m) {
                rec.pending.remove(seq);
                again = true;
                if let Some(dlq) = rec.config.dead_letter.clone() {
                    dead_letter(w, h, &dlq, name, msg, p.deliveries)?;
                }
                continue;
            }
            let deliveries = p.deliveries + 1;
            rec.pending.insert(seq, Pending { deliveries, due: now.saturating_add(ack_wait) });
            out.push(delivery(msg, deliveries));
        }
    }
    // Then new messages, within max_ack_pending.
    let room = |rec: &ConsumerRecord, out: &Vec<Delivery>| {
        out.len() < max && rec.pending.len() < rec.config.max_ack_pending as usize
    };
    while room(&rec, &out) {
        let Some(seq) = rec.initial.pop_front() else { break };
        ch.head = true;
        if let Some(msg) = h.get(seq)? {
            rec.pending.insert(seq.0, Pending { deliveries: 1, due: now.saturating_add(ack_wait) });
            ch.pending.insert(seq.0);
            out.push(delivery(msg, 1));
        }
    }
    // The candidates read before this request; another fetch may have
    // claimed the first of them meanwhile, and retention removed some.
    let front = h.state().first_seq;
    let mut took_all = true;
    let mut claimed_elsewhere = false;
    for msg in new.msgs {
        if msg.seq <= rec.delivered || msg.seq < front {
            claimed_elsewhere |= msg.seq <= rec.delivered;
            continue;
        }
        if !room(&rec, &out) {
            took_all = false;
            break;
        }
        rec.delivered = msg.seq;
        rec.pending.insert(msg.seq.0, Pending { deliveries: 1, due: now.saturating_add(ack_wait) });
        ch.pending.insert(msg.seq.0);
        ch.head = true;
        out.push(delivery(msg, 1));
    }
    // Nothing matching is left up to where the read looked: move the cursor there.
    if let Some(end) = new.complete_to
        && took_all
        && out.is_empty()
        && rec.initial.is_empty()
        && end > rec.delivered
        && room(&rec, &out)
    {
        rec.delivered = end;
        ch.head = true;
    }
    ch.commit(w, &h.name, &rec)?;
    let next_due = rec.pending.next_due();
    let read_again = out.is_empty() && claimed_elsewhere && room(&rec, &out);
    Ok(FetchOutcome { deliveries: out, next_due, read_again })
}

fn delivery(message: Message, delivery_count: u32) -> Delivery {
    Delivery { token: finmesh_core::AckToken(message.seq.0.to_string()), message, delivery_count }
}

fn dead_letter(
    w: &mut Writer,
    h: &StreamHandle,
    dlq: &StreamName,
    consumer: &ConsumerName,
    msg: Message,
    deliveries: u32,
) -> Result<()> {
    let Some(target) = w.registry.get(dlq) else {
        tracing::warn!(stream = %h.name, %consumer, "dead-letter stream `{dlq}` is gone; dropping message {}", msg.seq);
        return Ok(());
    };
    let mut out = OutgoingMessage::new(dead_letter_subject(&h.name, consumer), msg.payload);
    out.headers = msg.headers;
    // A stable id: a crash after this commit and before the consumer's
    // (separate) commit dead-letters the message again, and dedup in the
    // dead-letter stream then keeps one copy.
    out.headers.insert(finmesh_core::message::MSG_ID_HEADER, dead_letter_msg_id(&h.name, consumer, msg.seq))?;
    out.headers.insert(dlh::STREAM, h.name.as_str())?;
    out.headers.insert(dlh::CONSUMER, consumer.as_str())?;
    out.headers.insert(dlh::SEQ, msg.seq.0.to_string())?;
    out.headers.insert(dlh::SUBJECT, msg.subject.as_str())?;
    out.headers.insert(dlh::DELIVERIES, deliveries.to_string())?;
    w.publish_now(&target, vec![out])?;
    Ok(())
}

/// Parse an ack token of this engine: the stream sequence in decimal.
pub(crate) fn parse_token(token: &finmesh_core::AckToken) -> Result<u64> {
    token.0.parse().map_err(|_| Error::invalid(format!("`{}` is not an ack token of this engine", token.0)))
}

fn ack(w: &mut Writer, h: &StreamHandle, name: &ConsumerName, seqs: &[u64], kind: AckKind) -> Result<()> {
    check_live(h)?;
    let shared = w.consumers.require(&h.name, name)?;
    let mut rec = shared.lock();
    let now = Timestamp::now();
    let mut ch = Changes::default();
    for &seq in seqs {
        let changed = match kind {
            AckKind::Ack | AckKind::Term => rec.pending.remove(seq).is_some(),
            AckKind::Nak { delay } => rec.pending.set_due(seq, now.saturating_add(delay)),
            AckKind::InProgress => {
                let wait = rec.config.ack_wait;
                rec.pending.set_due(seq, now.saturating_add(wait))
            }
        };
        if changed {
            ch.pending.insert(seq);
        }
    }
    ch.commit(w, &h.name, &rec)
}

fn ack_all(w: &mut Writer, h: &StreamHandle, name: &ConsumerName, upto: Seq) -> Result<()> {
    check_live(h)?;
    let shared = w.consumers.require(&h.name, name)?;
    let mut rec = shared.lock();
    let acked = rec.pending.remove_upto(upto.0);
    Changes { head: false, pending: acked }.commit(w, &h.name, &rec)
}

/// How long a waiting fetch should sleep before looking again.
pub(crate) fn until(next_due: Option<Timestamp>, deadline: Timestamp) -> Duration {
    let now = Timestamp::now();
    next_due.map_or(deadline, |d| d.min(deadline)).since(now)
}

#[cfg(test)]
mod tests {
    use std::cell::Cell;

    use finmesh_core::{
        ConsumerConfig, ConsumerEngine, ConsumerName, OutgoingMessage, Seq, StreamConfig, StreamEngine, StreamName,
        SubjectPattern,
    };
    use proptest::prelude::*;

    use super::*;
    use crate::EmbeddedEngine;

    thread_local! {
        /// Message keys [`count_after`] walked on this thread.
        pub(super) static WALKED: Cell<u64> = const { Cell::new(0) };
    }

    fn walked() -> u64 {
        WALKED.with(Cell::get)
    }

    /// `messages` messages on `s.<i % subjects>`, at most `per_subject` kept per subject.
    async fn stream(e: &EmbeddedEngine, messages: u64, subjects: u64, per_subject: Option<u64>) -> Arc<StreamHandle> {
        let s = StreamName::new("S").unwrap();
        let mut config = StreamConfig::new(s.clone(), vec![SubjectPattern::new("s.>").unwrap()]);
        config.max_msgs_per_subject = per_subject;
        e.create_stream(config).await.unwrap();
        for chunk in (0..messages).collect::<Vec<_>>().chunks(1000) {
            let batch = chunk.iter().map(|i| OutgoingMessage::new(format!("s.{}", i % subjects).parse().unwrap(), "x"));
            e.publish_batch(&s, batch.collect()).await.unwrap();
        }
        e.inner.registry.get(&s).unwrap()
    }

    /// The backlog of an unfiltered consumer, counted by walking every key.
    fn walk_count(h: &StreamHandle, after: Seq) -> u64 {
        h.msgs.range(crate::codec::seq_key(after.next())..).count() as u64
    }

    /// An unfiltered consumer's backlog on a stream without holes is
    /// arithmetic: `info` walks no key, however long the backlog.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn backlog_without_holes_is_counted_without_a_walk() {
        let dir = tempfile::tempdir().unwrap();
        let e = EmbeddedEngine::open(dir.path()).unwrap();
        let h = stream(&e, 20_000, 7, None).await;
        for after in [0, 1, 9_999, 19_999, 20_000, 25_000] {
            let w0 = walked();
            let n = count_after(&h, Seq(after), None).unwrap();
            assert_eq!((n, walked() - w0), (walk_count(&h, Seq(after)), 0), "after {after}");
        }
        let c = ConsumerName::new("c").unwrap();
        let info = e.create_consumer(&h.name, ConsumerConfig::new(c)).await.unwrap();
        assert_eq!(info.num_pending, 20_000);
    }

    /// With holes (a per-subject limit), the count is still exact and walks
    /// only the shorter side of the cursor.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn backlog_with_holes_walks_the_shorter_side() {
        let dir = tempfile::tempdir().unwrap();
        let e = EmbeddedEngine::open(dir.path()).unwrap();
        // Subjects s.0..s.499 cycle, 2 kept each: the last 1,000 of 10,000
        // stay, without holes. A burst on one subject then leaves holes
        // where its older messages were, and inside the burst.
        let h = stream(&e, 10_000, 500, Some(2)).await;
        let burst = (0..300).map(|_| OutgoingMessage::new("s.7".parse().unwrap(), "y")).collect();
        e.publish_batch(&h.name, burst).await.unwrap();
        let st = h.state();
        assert!(st.messages < st.last_seq.0 - st.first_seq.0 + 1, "the burst left holes: {st:?}");
        for after in [0, st.first_seq.0, st.first_seq.0 + 100, st.last_seq.0 - 100, st.last_seq.0 - 1, st.last_seq.0] {
            let w0 = walked();
            let n = count_after(&h, Seq(after), None).unwrap();
            let want = walk_count(&h, Seq(after));
            let start = after.max(st.first_seq.0 - 1);
            let shorter = (st.last_seq.0 - start).min(start + 1 - st.first_seq.0);
            assert_eq!(n, want, "after {after}");
            assert!(walked() - w0 <= shorter, "after {after}: walked {} keys, shorter side {shorter}", walked() - w0);
        }
    }

    #[derive(Debug, Clone)]
    enum Op {
        Insert(u64, u32, u64),
        Remove(u64),
        SetDue(u64, u64),
        RemoveUpto(u64),
    }

    fn op() -> impl Strategy<Value = Op> {
        prop_oneof![
            (0..64u64, 1..4u32, 0..100u64).prop_map(|(s, d, t)| Op::Insert(s, d, t)),
            (0..64u64).prop_map(Op::Remove),
            (0..64u64, 0..100u64).prop_map(|(s, t)| Op::SetDue(s, t)),
            (0..64u64).prop_map(Op::RemoveUpto),
        ]
    }

    proptest! {
        /// The due-time index and the redelivered count always agree with
        /// the entries themselves.
        #[test]
        fn pending_set_indexes_agree(ops in proptest::collection::vec(op(), 1..200), now in 0..100u64, max in 1..20usize) {
            let mut set = PendingSet::default();
            let mut model = BTreeMap::<u64, Pending>::new();
            for op in ops {
                match op {
                    Op::Insert(seq, deliveries, due) => {
                        let p = Pending { deliveries, due: Timestamp(due) };
                        set.insert(seq, p);
                        model.insert(seq, p);
                    }
                    Op::Remove(seq) => prop_assert_eq!(set.remove(seq), model.remove(&seq)),
                    Op::SetDue(seq, due) => {
                        let had = model.get_mut(&seq).map(|p| p.due = Timestamp(due)).is_some();
                        prop_assert_eq!(set.set_due(seq, Timestamp(due)), had);
                    }
                    Op::RemoveUpto(upto) => {
                        let want: BTreeSet<u64> = model.range(..=upto).map(|(s, _)| *s).collect();
                        model.retain(|s, _| *s > upto);
                        prop_assert_eq!(set.remove_upto(upto), want);
                    }
                }
                prop_assert_eq!(&set.by_seq, &model);
                prop_assert_eq!(set.by_due.len(), model.len());
                prop_assert_eq!(set.redelivered, model.values().filter(|p| p.deliveries > 1).count() as u64);
                prop_assert_eq!(set.next_due(), model.values().map(|p| p.due).min());
                let mut due: Vec<(Timestamp, u64)> =
                    model.iter().filter(|(_, p)| p.due <= Timestamp(now)).map(|(s, p)| (p.due, *s)).collect();
                due.sort();
                let want: Vec<u64> = due.into_iter().take(max).map(|(_, s)| s).collect();
                prop_assert_eq!(set.due(Timestamp(now), max), want);
            }
        }
    }
}
