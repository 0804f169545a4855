//! A simple in-memory model of one stream and one KV bucket, written from
//! the semantics in [`crate::engine`] and nothing else: the oracle the
//! [`super::property`] test compares engines against.
//!
//! Deliberately naive (vectors and maps, no clever indexing) so that it is
//! obviously right. What it models:
//! - streams: subject capture (`Invalid`), `max_msg_size` (`TooLarge`),
//!   batches checked before anything is stored, dedup by message id for the
//!   whole test (ids are remembered even after retention removed the
//!   message, as JetStream's window does), `max_msgs` retention, reads;
//! - KV: bucket-wide revisions, history depth (markers count), delete and
//!   purge markers, create/update preconditions with the current revision,
//!   `max_value_size`.
//!
//! Where the contract leaves the order of two checks open (a value both too
//! large and in conflict), the model answers with every acceptable kind.

use std::collections::{BTreeMap, HashMap};

use bytes::Bytes;

use crate::{ErrorKind, KvOp, OutgoingMessage, PubAck, Seq, Subject, SubjectPattern};

/// What the model expects instead of a value: one of `kinds`, and for
/// `WrongRevision` the current revision.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ModelError {
    /// Error kinds an engine may answer with.
    pub kinds: Vec<ErrorKind>,
    /// The key's current revision, for `WrongRevision`.
    pub current: Option<u64>,
}

impl ModelError {
    fn of(kind: ErrorKind) -> Self {
        ModelError { kinds: vec![kind], current: None }
    }
}

/// A stored message as the model keeps it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ModelMessage {
    /// Its sequence.
    pub seq: u64,
    /// Its subject.
    pub subject: Subject,
    /// Its payload.
    pub payload: Bytes,
    /// Its message id, if it had one.
    pub msg_id: Option<String>,
    /// Its size as [`crate::Message::size`] counts it.
    pub size: u64,
}

/// One stream.
#[derive(Debug, Clone)]
pub struct StreamModel {
    captures: Vec<SubjectPattern>,
    max_msgs: Option<u64>,
    max_msg_size: usize,
    last_seq: u64,
    msgs: BTreeMap<u64, ModelMessage>,
    ids: HashMap<String, u64>,
}

impl StreamModel {
    /// A stream capturing `captures`, keeping at most `max_msgs`.
    pub fn new(captures: Vec<SubjectPattern>, max_msgs: Option<u64>, max_msg_size: u32) -> Self {
        StreamModel {
            captures,
            max_msgs,
            max_msg_size: max_msg_size as usize,
            last_seq: 0,
            msgs: BTreeMap::new(),
            ids: HashMap::new(),
        }
    }

    fn problems(&self, m: &OutgoingMessage) -> Vec<ErrorKind> {
        let mut p = Vec::new();
        if !self.captures.iter().any(|c| c.matches(&m.subject)) {
            p.push(ErrorKind::Invalid);
        }
        if m.size() > self.max_msg_size {
            p.push(ErrorKind::TooLarge);
        }
        p
    }

    fn store(&mut self, m: &OutgoingMessage) -> PubAck {
        if let Some(&seq) = m.msg_id().and_then(|id| self.ids.get(id)) {
            return PubAck { seq: Seq(seq), duplicate: true };
        }
        self.last_seq += 1;
        let seq = self.last_seq;
        let msg_id = m.msg_id().map(str::to_owned);
        if let Some(id) = &msg_id {
            self.ids.insert(id.clone(), seq);
        }
        let stored =
            ModelMessage { seq, subject: m.subject.clone(), payload: m.payload.clone(), msg_id, size: m.size() as u64 };
        self.msgs.insert(seq, stored);
        while self.max_msgs.is_some_and(|max| self.msgs.len() as u64 > max) {
            self.msgs.pop_first();
        }
        PubAck { seq: Seq(seq), duplicate: false }
    }

    /// Publish one message.
    pub fn publish(&mut self, m: &OutgoingMessage) -> Result<PubAck, ModelError> {
        self.publish_batch(std::slice::from_ref(m)).map(|acks| acks[0])
    }

    /// Publish a batch: every message checked first, then stored in order.
    pub fn publish_batch(&mut self, ms: &[OutgoingMessage]) -> Result<Vec<PubAck>, ModelError> {
        let mut kinds: Vec<ErrorKind> = ms.iter().flat_map(|m| self.problems(m)).collect();
        kinds.dedup();
        if !kinds.is_empty() {
            return Err(ModelError { kinds, current: None });
        }
        Ok(ms.iter().map(|m| self.store(m)).collect())
    }

    /// The message at `seq`.
    pub fn get(&self, seq: u64) -> Result<ModelMessage, ModelError> {
        self.msgs.get(&seq).cloned().ok_or(ModelError::of(ErrorKind::NotFound))
    }

    /// Up to `limit` matching messages from `from` on (`0` = the first).
    pub fn read(&self, from: u64, limit: usize, filter: Option<&SubjectPattern>) -> Vec<ModelMessage> {
        self.msgs
            .range(from.max(1)..)
            .map(|(_, m)| m)
            .filter(|m| filter.is_none_or(|f| f.matches(&m.subject)))
            .take(limit)
            .cloned()
            .collect()
    }

    /// The last message on `subject`.
    pub fn last_message(&self, subject: &Subject) -> Result<ModelMessage, ModelError> {
        self.msgs.values().rev().find(|m| &m.subject == subject).cloned().ok_or(ModelError::of(ErrorKind::NotFound))
    }

    /// The last message of every matching subject, in sequence order.
    pub fn last_per_subject(&self, filter: Option<&SubjectPattern>) -> Vec<ModelMessage> {
        let mut last: BTreeMap<&Subject, &ModelMessage> = BTreeMap::new();
        for m in self.msgs.values().filter(|m| filter.is_none_or(|f| f.matches(&m.subject))) {
            last.insert(&m.subject, m);
        }
        let mut out: Vec<_> = last.into_values().cloned().collect();
        out.sort_by_key(|m| m.seq);
        out
    }

    /// `(messages, bytes, first_seq, last_seq)` as `stream_info` reports them.
    pub fn state(&self) -> (u64, u64, u64, u64) {
        let first = self.msgs.keys().next().copied().unwrap_or(self.last_seq + 1);
        (self.msgs.len() as u64, self.msgs.values().map(|m| m.size).sum(), first, self.last_seq)
    }
}

/// One kept revision of a key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ModelEntry {
    /// The key.
    pub key: String,
    /// Its value (empty for markers).
    pub value: Bytes,
    /// Its revision.
    pub revision: u64,
    /// What it is.
    pub op: KvOp,
}

/// One KV bucket.
#[derive(Debug, Clone)]
pub struct KvModel {
    history: usize,
    max_value_size: usize,
    last_revision: u64,
    keys: BTreeMap<String, Vec<ModelEntry>>,
}

impl KvModel {
    /// A bucket keeping `history` revisions per key.
    pub fn new(history: u8, max_value_size: u32) -> Self {
        KvModel {
            history: history as usize,
            max_value_size: max_value_size as usize,
            last_revision: 0,
            keys: BTreeMap::new(),
        }
    }

    fn latest(&self, key: &str) -> Option<&ModelEntry> {
        self.keys.get(key).and_then(|h| h.last())
    }

    fn latest_revision(&self, key: &str) -> u64 {
        self.latest(key).map_or(0, |e| e.revision)
    }

    fn is_live(&self, key: &str) -> bool {
        self.latest(key).is_some_and(|e| e.op == KvOp::Put)
    }

    /// The revision `update` must name to succeed now.
    pub fn current_revision(&self, key: &str) -> u64 {
        self.latest_revision(key)
    }

    fn write(&mut self, key: &str, op: KvOp, value: Bytes) -> u64 {
        self.last_revision += 1;
        let entry = ModelEntry { key: key.to_owned(), value, revision: self.last_revision, op };
        let history = self.keys.entry(key.to_owned()).or_default();
        if op == KvOp::Purge {
            history.clear();
        }
        history.push(entry);
        let excess = history.len().saturating_sub(self.history);
        history.drain(..excess);
        self.last_revision
    }

    fn check_size(&self, value: &Bytes) -> Option<ErrorKind> {
        (value.len() > self.max_value_size).then_some(ErrorKind::TooLarge)
    }

    /// Write a value.
    pub fn put(&mut self, key: &str, value: Bytes) -> Result<u64, ModelError> {
        if let Some(kind) = self.check_size(&value) {
            return Err(ModelError::of(kind));
        }
        Ok(self.write(key, KvOp::Put, value))
    }

    fn conditional(&mut self, key: &str, value: Bytes, ok: bool) -> Result<u64, ModelError> {
        let mut kinds: Vec<ErrorKind> = self.check_size(&value).into_iter().collect();
        if !ok {
            kinds.push(ErrorKind::WrongRevision);
        }
        if kinds.is_empty() {
            return Ok(self.write(key, KvOp::Put, value));
        }
        let current = (!ok).then(|| self.latest_revision(key));
        Err(ModelError { kinds, current })
    }

    /// Write only if the key has no live value.
    pub fn create(&mut self, key: &str, value: Bytes) -> Result<u64, ModelError> {
        let ok = !self.is_live(key);
        self.conditional(key, value, ok)
    }

    /// Write only if the key's latest revision is `expected`.
    pub fn update(&mut self, key: &str, value: Bytes, expected: u64) -> Result<u64, ModelError> {
        let ok = self.latest_revision(key) == expected;
        self.conditional(key, value, ok)
    }

    /// Write a delete marker.
    pub fn delete(&mut self, key: &str) -> u64 {
        self.write(key, KvOp::Delete, Bytes::new())
    }

    /// Replace the key's history with a purge marker.
    pub fn purge(&mut self, key: &str) -> u64 {
        self.write(key, KvOp::Purge, Bytes::new())
    }

    /// The live value.
    pub fn get(&self, key: &str) -> Option<ModelEntry> {
        self.latest(key).filter(|e| e.op == KvOp::Put).cloned()
    }

    /// The kept entry at exactly `revision`.
    pub fn get_revision(&self, key: &str, revision: u64) -> Option<ModelEntry> {
        self.keys.get(key)?.iter().find(|e| e.revision == revision).cloned()
    }

    /// Every kept entry, oldest first.
    pub fn history(&self, key: &str) -> Vec<ModelEntry> {
        self.keys.get(key).cloned().unwrap_or_default()
    }

    /// Live keys starting with `prefix`, sorted.
    pub fn keys(&self, prefix: &str) -> Vec<String> {
        self.keys.keys().filter(|k| k.starts_with(prefix) && self.is_live(k)).cloned().collect()
    }

    /// `(entries, last_revision)` as `bucket_info` reports them.
    pub fn info(&self) -> (u64, u64) {
        (self.keys.values().map(|h| h.len() as u64).sum(), self.last_revision)
    }
}
