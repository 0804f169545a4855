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

/// One consumer in memory: the head record and every pending delivery.
#[derive(Debug, Clone)]
pub(crate) struct ConsumerRecord {
    config: ConsumerConfig,
    delivered: Seq,
    initial: VecDeque<Seq>,
    pending: BTreeMap<u64, Pending>,
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
        let lowest = self.pending.keys().next().copied().into_iter().chain(self.initial.iter().map(|s| s.0)).min();
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
            redelivered: self.pending.values().filter(|p| p.deliveries > 1).count() as u64,
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
                    pending: BTreeMap::new(),
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
                        rec.pending.entry(seq).or_insert(p);
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
            for (seq, p) in &rec.pending {
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
    for seq in rec.pending.keys() {
        batch.remove(meta, pending_key(stream, name, *seq));
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
            let mut n = 0;
            for kv in h.msgs.range(crate::codec::seq_key(after.next())..) {
                kv.key().map_err(storage)?;
                n += 1;
            }
            Ok(n)
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
}

pub(crate) enum ConsumerOp {
    Create { stream: Arc<StreamHandle>, config: ConsumerConfig, update: bool, reply: Reply<Position> },
    Delete { stream: Arc<StreamHandle>, name: ConsumerName, reply: Reply<()> },
    Fetch { stream: Arc<StreamHandle>, name: ConsumerName, max: usize, new: Candidates, reply: Reply<FetchOutcome> },
    Ack { stream: Arc<StreamHandle>, name: ConsumerName, seqs: Vec<u64>, kind: AckKind, reply: Reply<()> },
    AckAll { stream: Arc<StreamHandle>, name: ConsumerName, upto: Seq, reply: Reply<()> },
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
            ConsumerOp::Create { stream, config, update, reply } => {
                let r = create(w, &stream, config, update);
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
            match rec.pending.get(seq) {
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

fn create(w: &mut Writer, h: &Arc<StreamHandle>, config: ConsumerConfig, update: bool) -> Result<Position> {
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
                    let last = h.last_per_subject(filter)?;
                    (st.last_seq, last.into_iter().map(|m| m.seq).collect())
                }
            };
            let rec = ConsumerRecord { config: config.clone(), delivered, initial, pending: BTreeMap::new() };
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
    // Due redeliveries first, oldest sequence first.
    let due: Vec<u64> = rec.pending.iter().filter(|(_, p)| p.due <= now).map(|(s, _)| *s).collect();
    for seq in due {
        if out.len() >= max {
            break;
        }
        let p = rec.pending[&seq];
        ch.pending.insert(seq);
        let Some(msg) = h.get(Seq(seq))? else {
            rec.pending.remove(&seq);
            continue;
        };
        if rec.config.max_deliver.is_some_and(|m| p.deliveries >= m) {
            rec.pending.remove(&seq);
            if let Some(dlq) = rec.config.dead_letter.clone() {
                dead_letter(w, h, &dlq, name, msg, p.deliveries)?;
            }
            continue;
        }
        let deliveries = p.deliveries + 1;
        rec.pending.insert(seq, Pending { deliveries, due: now.saturating_add(ack_wait) });
        out.push(delivery(msg, deliveries));
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
    for msg in new.msgs {
        if msg.seq <= rec.delivered || msg.seq < front {
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
    let next_due = rec.pending.values().map(|p| p.due).min();
    Ok(FetchOutcome { deliveries: out, next_due })
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
            AckKind::Ack | AckKind::Term => rec.pending.remove(&seq).is_some(),
            AckKind::Nak { delay } => set_due(&mut rec, seq, now.saturating_add(delay)),
            AckKind::InProgress => {
                let wait = rec.config.ack_wait;
                set_due(&mut rec, seq, now.saturating_add(wait))
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
    let acked: BTreeSet<u64> = rec.pending.range(..=upto.0).map(|(s, _)| *s).collect();
    for seq in &acked {
        rec.pending.remove(seq);
    }
    Changes { head: false, pending: acked }.commit(w, &h.name, &rec)
}

fn set_due(rec: &mut ConsumerRecord, seq: u64, due: Timestamp) -> bool {
    match rec.pending.get_mut(&seq) {
        Some(p) => {
            p.due = due;
            true
        }
        None => false,
    }
}

/// How long a waiting fetch should sleep before looking again.
pub(crate) fn until(next_due: Option<Timestamp>, deadline: Timestamp) -> Duration {
    let now = Timestamp::now();
    next_due.map_or(deadline, |d| d.min(deadline)).since(now)
}
