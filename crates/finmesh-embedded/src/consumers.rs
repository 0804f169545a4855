//! Durable pull consumers: configuration and position, kept in the `meta`
//! keyspace under `consumer/<stream>/<name>` and rewritten by the writer on
//! every fetch and ack (same durability as the stream's `sync` policy).
//!
//! State: `delivered` (highest stream sequence handed out as new), a queue of
//! initial sequences (last-per-subject start), and `pending`: sequence ->
//! (deliveries, due time). A pending entry whose due time passed is
//! redelivered; after `max_deliver` deliveries it is dead-lettered instead.
//! The ack floor is derived: everything below the smallest pending or queued
//! sequence, and up to `delivered` when nothing is outstanding.
//!
//! Invariants: only the writer thread mutates a consumer; readers (info)
//! take the map lock briefly; `pending.len() <= max_ack_pending` after any
//! fetch; an ack token is the stream sequence in decimal.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::sync::Arc;
use std::time::Duration;

use finmesh_core::config::{dead_letter_headers as dlh, dead_letter_subject};
use finmesh_core::{
    AckKind, AckToken, ConsumerConfig, ConsumerInfo, ConsumerName, DeliverPolicy, Delivery, Error, ErrorKind,
    OutgoingMessage, ReadRequest, Result, Seq, StreamConfig, StreamName, SubjectPattern, SyncPolicy, Timestamp,
};
use fjall::{Keyspace, OwnedWriteBatch as WriteBatch};
use parking_lot::Mutex;
use serde::{Deserialize, Serialize};

use crate::store::{StreamHandle, StreamKind, StreamRecord, storage};
use crate::writer::{Completion, Reply, Writer, complete};

#[derive(Debug, Clone, Copy, Serialize, Deserialize)]
struct Pending {
    deliveries: u32,
    due: Timestamp,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub(crate) struct ConsumerRecord {
    config: ConsumerConfig,
    delivered: Seq,
    initial: VecDeque<Seq>,
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
}

fn meta_key(stream: &StreamName, name: &ConsumerName) -> String {
    format!("consumer/{stream}/{name}")
}

/// All consumers, by stream then name.
#[derive(Clone, Default)]
pub(crate) struct Consumers {
    map: Arc<Mutex<HashMap<StreamName, BTreeMap<ConsumerName, ConsumerRecord>>>>,
}

impl Consumers {
    /// Load every consumer recorded in `meta`.
    pub fn load(meta: &Keyspace) -> Result<Self> {
        let c = Consumers::default();
        {
            let mut map = c.map.lock();
            for kv in meta.prefix("consumer/") {
                let (k, v) = kv.into_inner().map_err(storage)?;
                let key = String::from_utf8_lossy(&k).into_owned();
                let rec: ConsumerRecord = serde_json::from_slice(&v)
                    .map_err(|e| Error::internal(format!("corrupt consumer record `{key}`")).with_source(e))?;
                let stream = key.split('/').nth(1).unwrap_or_default();
                let stream =
                    StreamName::new(stream).map_err(|_| Error::internal(format!("corrupt consumer key `{key}`")))?;
                map.entry(stream).or_default().insert(rec.config.name.clone(), rec);
            }
        }
        Ok(c)
    }

    pub fn names(&self, stream: &StreamName) -> Vec<ConsumerName> {
        self.map.lock().get(stream).map(|m| m.keys().cloned().collect()).unwrap_or_default()
    }

    pub fn info(&self, h: &StreamHandle, name: &ConsumerName) -> Result<ConsumerInfo> {
        let rec =
            self.map.lock().get(&h.name).and_then(|m| m.get(name)).cloned().ok_or_else(|| not_found(&h.name, name))?;
        info(h, &rec)
    }

    /// Drop every consumer of a deleted stream (into `batch`).
    pub fn remove_stream(&self, batch: &mut WriteBatch, meta: &Keyspace, stream: &StreamName) -> Result<()> {
        if let Some(m) = self.map.lock().remove(stream) {
            for name in m.keys() {
                batch.remove(meta, meta_key(stream, name));
            }
        }
        Ok(())
    }
}

fn not_found(stream: &StreamName, name: &ConsumerName) -> Error {
    Error::not_found(format!("consumer `{name}` does not exist on stream `{stream}`"))
}

fn info(h: &StreamHandle, rec: &ConsumerRecord) -> Result<ConsumerInfo> {
    Ok(ConsumerInfo {
        stream: h.name.clone(),
        config: rec.config.clone(),
        delivered: rec.delivered,
        ack_floor: rec.ack_floor(),
        num_pending: count_after(h, rec.delivered, rec.config.filter.as_ref())? + rec.initial.len() as u64,
        num_ack_pending: rec.pending.len() as u64,
        num_redelivered: rec.pending.values().filter(|p| p.deliveries > 1).count() as u64,
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
            for kv in h.last.iter() {
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

/// What a fetch found; an empty batch tells when to look again.
pub(crate) struct FetchOutcome {
    pub deliveries: Vec<Delivery>,
    /// Earliest time a pending message becomes due, if any.
    pub next_due: Option<Timestamp>,
}

pub(crate) enum ConsumerOp {
    Create { stream: Arc<StreamHandle>, config: ConsumerConfig, update: bool, reply: Reply<ConsumerInfo> },
    Delete { stream: Arc<StreamHandle>, name: ConsumerName, reply: Reply<()> },
    Fetch { stream: Arc<StreamHandle>, name: ConsumerName, max: usize, reply: Reply<FetchOutcome> },
    Ack { stream: Arc<StreamHandle>, name: ConsumerName, token: AckToken, kind: AckKind, reply: Reply<()> },
}

impl ConsumerOp {
    pub fn needs_sync(&self) -> bool {
        match self {
            ConsumerOp::Create { .. } | ConsumerOp::Delete { .. } => true,
            ConsumerOp::Fetch { stream, .. } | ConsumerOp::Ack { stream, .. } => {
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
            ConsumerOp::Fetch { stream, name, max, reply } => {
                let r = fetch(w, &stream, &name, max);
                complete(reply, r)
            }
            ConsumerOp::Ack { stream, name, token, kind, reply } => {
                let r = ack(w, &stream, &name, &token, kind);
                complete(reply, r)
            }
        }
    }
}

fn save(w: &Writer, stream: &StreamName, rec: &ConsumerRecord) -> Result<()> {
    let v = serde_json::to_vec(rec).map_err(|e| Error::internal("encode consumer").with_source(e))?;
    w.meta.insert(meta_key(stream, &rec.config.name), v).map_err(storage)
}

fn check_live(h: &StreamHandle) -> Result<()> {
    if h.is_deleted() {
        return Err(Error::not_found(format!("stream `{}` does not exist", h.name)));
    }
    Ok(())
}

fn create(w: &mut Writer, h: &Arc<StreamHandle>, config: ConsumerConfig, update: bool) -> Result<ConsumerInfo> {
    check_live(h)?;
    let existing = w.consumers.map.lock().get(&h.name).and_then(|m| m.get(&config.name)).cloned();
    let rec = match (existing, update) {
        (Some(old), false) if old.config == config => return info(h, &old),
        (Some(_), false) => {
            return Err(Error::new(
                ErrorKind::AlreadyExists,
                format!("consumer `{}` exists with a different configuration", config.name),
            ));
        }
        (None, true) => return Err(not_found(&h.name, &config.name)),
        (Some(mut old), true) => {
            if old.config.filter != config.filter || old.config.deliver != config.deliver {
                return Err(Error::invalid("a consumer's filter and deliver policy cannot change"));
            }
            old.config = config;
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
            ConsumerRecord { config, delivered, initial, pending: BTreeMap::new() }
        }
    };
    if let (Some(dlq), Some(_)) = (&rec.config.dead_letter, rec.config.max_deliver) {
        ensure_dead_letter_stream(w, &h.name, dlq, &rec.config.name)?;
    }
    save(w, &h.name, &rec)?;
    let out = info(h, &rec)?;
    w.consumers.map.lock().entry(h.name.clone()).or_default().insert(rec.config.name.clone(), rec);
    Ok(out)
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
    if removed.is_none() {
        return Err(not_found(&h.name, name));
    }
    w.meta.remove(meta_key(&h.name, name)).map_err(storage)
}

fn fetch(w: &mut Writer, h: &Arc<StreamHandle>, name: &ConsumerName, max: usize) -> Result<FetchOutcome> {
    check_live(h)?;
    let mut rec = w
        .consumers
        .map
        .lock()
        .get(&h.name)
        .and_then(|m| m.get(name))
        .cloned()
        .ok_or_else(|| not_found(&h.name, name))?;
    let now = Timestamp::now();
    let ack_wait = rec.config.ack_wait;
    let mut out = Vec::new();
    let mut changed = false;
    // Due redeliveries first, oldest sequence first.
    let due: Vec<u64> = rec.pending.iter().filter(|(_, p)| p.due <= now).map(|(s, _)| *s).collect();
    for seq in due {
        if out.len() >= max {
            break;
        }
        let p = rec.pending[&seq];
        let Some(msg) = h.get(Seq(seq))? else {
            rec.pending.remove(&seq);
            changed = true;
            continue;
        };
        if rec.config.max_deliver.is_some_and(|m| p.deliveries >= m) {
            rec.pending.remove(&seq);
            changed = true;
            if let Some(dlq) = rec.config.dead_letter.clone() {
                dead_letter(w, h, &dlq, name, msg, p.deliveries)?;
            }
            continue;
        }
        let deliveries = p.deliveries + 1;
        rec.pending.insert(seq, Pending { deliveries, due: now.saturating_add(ack_wait) });
        changed = true;
        out.push(Delivery { message: msg, delivery_count: deliveries, token: AckToken(seq.to_string()) });
    }
    // Then new messages, within max_ack_pending.
    let room = |rec: &ConsumerRecord, out: &Vec<Delivery>| {
        out.len() < max && rec.pending.len() < rec.config.max_ack_pending as usize
    };
    while room(&rec, &out) {
        let Some(seq) = rec.initial.pop_front() else { break };
        changed = true;
        if let Some(msg) = h.get(seq)? {
            rec.pending.insert(seq.0, Pending { deliveries: 1, due: now.saturating_add(ack_wait) });
            out.push(Delivery { message: msg, delivery_count: 1, token: AckToken(seq.0.to_string()) });
        }
    }
    while room(&rec, &out) {
        let want = (max - out.len()).min(rec.config.max_ack_pending as usize - rec.pending.len());
        let mut req = ReadRequest::from_seq(rec.delivered.next(), want);
        req.filter = rec.config.filter.clone();
        let batch = h.read(&req)?;
        if batch.is_empty() {
            break;
        }
        for msg in batch {
            rec.delivered = msg.seq;
            rec.pending.insert(msg.seq.0, Pending { deliveries: 1, due: now.saturating_add(ack_wait) });
            out.push(Delivery { token: AckToken(msg.seq.0.to_string()), message: msg, delivery_count: 1 });
        }
        changed = true;
    }
    // Nothing matching is left below the stream's end: move the cursor there.
    if out.is_empty() && rec.initial.is_empty() && rec.delivered < h.state().last_seq && room(&rec, &out) {
        rec.delivered = h.state().last_seq;
        changed = true;
    }
    if changed {
        save(w, &h.name, &rec)?;
        w.consumers.map.lock().entry(h.name.clone()).or_default().insert(name.clone(), rec.clone());
    }
    let next_due = rec.pending.values().map(|p| p.due).min();
    Ok(FetchOutcome { deliveries: out, next_due })
}

fn dead_letter(
    w: &mut Writer,
    h: &StreamHandle,
    dlq: &StreamName,
    consumer: &ConsumerName,
    msg: finmesh_core::Message,
    deliveries: u32,
) -> Result<()> {
    let Some(target) = w.registry.get(dlq) else {
        tracing::warn!(stream = %h.name, %consumer, "dead-letter stream `{dlq}` is gone; dropping message {}", msg.seq);
        return Ok(());
    };
    let mut out = OutgoingMessage::new(dead_letter_subject(&h.name, consumer), msg.payload);
    out.headers = msg.headers;
    out.headers.remove(finmesh_core::message::MSG_ID_HEADER);
    out.headers.insert(dlh::STREAM, h.name.as_str())?;
    out.headers.insert(dlh::CONSUMER, consumer.as_str())?;
    out.headers.insert(dlh::SEQ, msg.seq.0.to_string())?;
    out.headers.insert(dlh::SUBJECT, msg.subject.as_str())?;
    out.headers.insert(dlh::DELIVERIES, deliveries.to_string())?;
    w.publish_now(&target, vec![out])?;
    Ok(())
}

fn ack(w: &mut Writer, h: &StreamHandle, name: &ConsumerName, token: &AckToken, kind: AckKind) -> Result<()> {
    check_live(h)?;
    let seq: u64 =
        token.0.parse().map_err(|_| Error::invalid(format!("`{}` is not an ack token of this engine", token.0)))?;
    let mut map = w.consumers.map.lock();
    let rec = map.get_mut(&h.name).and_then(|m| m.get_mut(name)).ok_or_else(|| not_found(&h.name, name))?;
    let now = Timestamp::now();
    let changed = match kind {
        AckKind::Ack | AckKind::Term => rec.pending.remove(&seq).is_some(),
        AckKind::Nak { delay } => set_due(rec, seq, now.saturating_add(delay)),
        AckKind::InProgress => {
            let wait = rec.config.ack_wait;
            set_due(rec, seq, now.saturating_add(wait))
        }
    };
    if changed {
        let rec = rec.clone();
        drop(map);
        save(w, &h.name, &rec)?;
    }
    Ok(())
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
