//! The engine traits: the contract every engine implements and the
//! conformance suite checks.
//!
//! Semantics follow JetStream on purpose, so the NATS engine maps onto them
//! one to one and the embedded engine reproduces them:
//!
//! - **Streams** capture the subjects they are configured with; a publish
//!   names its stream and a subject the stream captures (else `Invalid`).
//!   Sequences start at 1, increase by one per stored message, and are never
//!   reused, even after purge or retention. A message whose `Nats-Msg-Id` was
//!   seen within `duplicate_window` is acked with the original's sequence and
//!   `duplicate: true`, and nothing is stored. Retention discards the oldest.
//! - **Batches**: [`StreamEngine::publish_batch`] checks every message first
//!   (subject, size) and refuses the whole batch before writing anything if
//!   one is bad; acks come back in order.
//! - **Tail**: [`StreamEngine::tail`] yields every matching stored message
//!   from a start sequence, then live messages, with no gap and no duplicate
//!   at the join. If messages the tail still had to deliver were removed
//!   (retention, purge), it yields [`TailEvent::Gap`] naming the missing range
//!   instead of silently skipping.
//! - **KV**: a revision is bucket-wide and strictly increasing. Delete and
//!   purge write markers with their own revisions; purge also removes the
//!   key's older history. `kv_get` returns only live values.
//! - **Consumers** are durable pull consumers with explicit acks. A delivery
//!   that is not acked within `ack_wait` (or is nak'ed) is delivered again
//!   with a higher delivery count; after `max_deliver` deliveries it goes to
//!   the dead-letter stream (if configured) instead of an `(max_deliver+1)`th
//!   delivery. Positions and pending state survive a restart. Acks come one
//!   at a time, as a list of tokens, or as "everything delivered up to a
//!   sequence" ([`ConsumerEngine::ack_all`]).
//!
//! Every trait is object safe (`Arc<dyn Engine>` is what the gateway holds);
//! cross-cutting concerns (encryption, metrics, timeouts) are wrappers that
//! implement the same traits.

use std::pin::Pin;
use std::time::Duration;

use async_trait::async_trait;
use bytes::Bytes;
use futures::Stream;
use serde::{Deserialize, Serialize};

use crate::{
    BucketConfig, BucketInfo, BucketName, ConsumerConfig, ConsumerInfo, ConsumerName, Key, Message, OutgoingMessage,
    PubAck, Result, Revision, Seq, StreamConfig, StreamInfo, StreamName, Subject, SubjectPattern, Timestamp,
};

/// A boxed, sendable stream of results: what tails and watches return.
pub type BoxStream<T> = Pin<Box<dyn Stream<Item = Result<T>> + Send + 'static>>;

/// Where a range read starts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReadStart {
    /// At this sequence (`Seq(0)` reads from the first stored).
    Seq(Seq),
    /// At the first message stored at or after this time.
    Time(Timestamp),
}

/// A bounded read of stored messages.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReadRequest {
    /// Where to start.
    pub start: ReadStart,
    /// Stop after this sequence (inclusive), if set.
    pub end: Option<Seq>,
    /// Only messages whose subject matches.
    pub filter: Option<SubjectPattern>,
    /// At most this many messages (engines may cap it; see [`MAX_READ_LIMIT`]).
    pub limit: usize,
}

/// Most messages one read returns.
pub const MAX_READ_LIMIT: usize = 10_000;

impl ReadRequest {
    /// Read up to `limit` messages from `seq` on.
    pub fn from_seq(seq: Seq, limit: usize) -> Self {
        ReadRequest { start: ReadStart::Seq(seq), end: None, filter: None, limit }
    }

    /// Read up to `limit` messages stored at or after `time`.
    pub fn from_time(time: Timestamp, limit: usize) -> Self {
        ReadRequest { start: ReadStart::Time(time), end: None, filter: None, limit }
    }

    /// Only messages whose subject matches `filter`.
    pub fn filter(mut self, filter: SubjectPattern) -> Self {
        self.filter = Some(filter);
        self
    }

    /// Stop after `end` (inclusive).
    pub fn end(mut self, end: Seq) -> Self {
        self.end = Some(end);
        self
    }
}

/// One item of a tail.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TailEvent {
    /// The next matching message.
    Message(Message),
    /// Messages in `from..=to` are gone (retention or purge) and will not be
    /// delivered; some of them might not have matched the filter.
    Gap {
        /// First missing sequence.
        from: Seq,
        /// Last missing sequence.
        to: Seq,
    },
}

/// Operations on streams.
#[async_trait]
pub trait StreamEngine: Send + Sync + 'static {
    /// Create a stream. Creating an existing stream with the same
    /// configuration returns its info; with another configuration,
    /// `AlreadyExists`. Subjects overlapping another stream's: `Invalid`.
    async fn create_stream(&self, config: StreamConfig) -> Result<StreamInfo>;

    /// Change a stream's limits (retention applies at once). The subjects may
    /// change; `replicas` may not on the embedded engine. `NotFound` if absent.
    async fn update_stream(&self, config: StreamConfig) -> Result<StreamInfo>;

    /// A stream's configuration and state.
    async fn stream_info(&self, stream: &StreamName) -> Result<StreamInfo>;

    /// Names of all streams (KV buckets' backing streams excluded), sorted.
    async fn list_streams(&self) -> Result<Vec<StreamName>>;

    /// Delete a stream, its messages and its consumers.
    async fn delete_stream(&self, stream: &StreamName) -> Result<()>;

    /// Remove every message; sequences continue after the last one. Returns
    /// how many were removed.
    async fn purge_stream(&self, stream: &StreamName) -> Result<u64>;

    /// Publish one message (see the module doc for dedup and limits).
    async fn publish(&self, stream: &StreamName, msg: OutgoingMessage) -> Result<PubAck>;

    /// Publish many messages; all are checked before any is written.
    async fn publish_batch(&self, stream: &StreamName, msgs: Vec<OutgoingMessage>) -> Result<Vec<PubAck>>;

    /// The message at `seq`; `NotFound` if never stored or already removed.
    async fn get_message(&self, stream: &StreamName, seq: Seq) -> Result<Message>;

    /// Stored messages in sequence order, as the request bounds them.
    async fn read(&self, stream: &StreamName, request: ReadRequest) -> Result<Vec<Message>>;

    /// The last stored message on `subject`; `NotFound` if there is none.
    async fn last_message(&self, stream: &StreamName, subject: &Subject) -> Result<Message>;

    /// The last stored message of every subject matching `filter` (all
    /// subjects if `None`), in sequence order.
    async fn last_per_subject(&self, stream: &StreamName, filter: Option<&SubjectPattern>) -> Result<Vec<Message>>;

    /// Matching messages from `from` on (`Seq(0)` = from the first stored),
    /// then live ones; see the module doc. The tail ends with an error if the
    /// stream is deleted.
    async fn tail(
        &self,
        stream: &StreamName,
        from: Seq,
        filter: Option<SubjectPattern>,
    ) -> Result<BoxStream<TailEvent>>;

    /// Whether this engine stack enforces `option` itself (seals payloads)
    /// on streams that set it: [`KvEngine::supports_security`] for
    /// streams, asked separately because a stack may seal bucket values
    /// without sealing stream payloads. Default `false`; a gateway refuses
    /// to create a stream with an option its stack does not enforce.
    fn supports_stream_security(&self, option: crate::SecurityOption) -> bool {
        let _ = option;
        false
    }
}

/// The kind of a KV entry.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum KvOp {
    /// A value.
    Put,
    /// A tombstone written by delete.
    Delete,
    /// A marker written by purge; the key's older history is gone.
    Purge,
}

/// One revision of a key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KvEntry {
    /// The key.
    pub key: Key,
    /// The value (empty for delete and purge markers).
    pub value: Bytes,
    /// The bucket-wide revision of this entry.
    pub revision: Revision,
    /// When this revision was written.
    pub created: Timestamp,
    /// What this revision is.
    pub op: KvOp,
}

/// Where a watch starts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WatchStart {
    /// The latest entry of every matching key (delete markers included), then changes.
    LatestValues,
    /// Every kept entry from this revision on, then changes.
    FromRevision(Revision),
    /// Only changes made after the watch started.
    New,
}

/// Most keys one [`KvEngine::kv_keys_page`] call returns; a larger limit is
/// clamped to it.
pub const MAX_KEYS_PAGE: usize = 10_000;

/// One page of a key listing ([`KvEngine::kv_keys_page`]).
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct KeysPage {
    /// Live keys, sorted bytewise, all after the request's cursor.
    pub keys: Vec<Key>,
    /// The cursor of the next page (the last key of this one) when more
    /// keys followed it at the time of the read; `None` on the last page.
    pub next: Option<Key>,
}

impl KeysPage {
    /// The page of `sorted` (live keys matching the prefix, sorted bytewise)
    /// after `after`, at most `limit` long. For engines and wrappers that
    /// have the whole sorted list at hand.
    pub fn cut(sorted: impl IntoIterator<Item = Key>, after: Option<&Key>, limit: usize) -> KeysPage {
        let mut rest = sorted.into_iter().skip_while(|k| after.is_some_and(|a| k <= a));
        let keys: Vec<Key> = rest.by_ref().take(limit).collect();
        let next = if rest.next().is_some() { keys.last().cloned() } else { None };
        KeysPage { keys, next }
    }
}

/// The limit a page request may use: 0 is `Invalid`, more than
/// [`MAX_KEYS_PAGE`] is clamped to it.
pub fn keys_page_limit(limit: usize) -> Result<usize> {
    if limit == 0 {
        return Err(crate::Error::invalid("a key page needs a limit of at least 1"));
    }
    Ok(limit.min(MAX_KEYS_PAGE))
}

/// Operations on KV buckets.
#[async_trait]
pub trait KvEngine: Send + Sync + 'static {
    /// Create a bucket; same config again returns its info, another config
    /// `AlreadyExists`.
    async fn create_bucket(&self, config: BucketConfig) -> Result<BucketInfo>;

    /// Change a bucket's history, TTL and limits. `NotFound` if absent.
    async fn update_bucket(&self, config: BucketConfig) -> Result<BucketInfo>;

    /// A bucket's configuration and state.
    async fn bucket_info(&self, bucket: &BucketName) -> Result<BucketInfo>;

    /// Names of all buckets, sorted.
    async fn list_buckets(&self) -> Result<Vec<BucketName>>;

    /// Delete a bucket and everything in it.
    async fn delete_bucket(&self, bucket: &BucketName) -> Result<()>;

    /// The live value of `key`: `None` if it never existed, was deleted or
    /// purged, or expired.
    async fn kv_get(&self, bucket: &BucketName, key: &Key) -> Result<Option<KvEntry>>;

    /// The entry of `key` at exactly `revision` (any op), if it is still kept.
    async fn kv_get_revision(&self, bucket: &BucketName, key: &Key, revision: Revision) -> Result<Option<KvEntry>>;

    /// Write a value; returns its revision.
    async fn kv_put(&self, bucket: &BucketName, key: &Key, value: Bytes) -> Result<Revision>;

    /// Write only if the key has no live value; else `WrongRevision` with the
    /// current revision.
    async fn kv_create(&self, bucket: &BucketName, key: &Key, value: Bytes) -> Result<Revision>;

    /// Write only if the key's latest revision is `expected` (`Revision(0)`
    /// = the key has no entry at all); else `WrongRevision` with the current.
    async fn kv_update(&self, bucket: &BucketName, key: &Key, value: Bytes, expected: Revision) -> Result<Revision>;

    /// Write a delete marker; returns its revision.
    async fn kv_delete(&self, bucket: &BucketName, key: &Key) -> Result<Revision>;

    /// Write a delete marker only if the key's latest revision is `expected`
    /// (as [`kv_update`](Self::kv_update)); else `WrongRevision` with the
    /// current one. A delete that must not race a concurrent write or delete.
    async fn kv_delete_if(&self, bucket: &BucketName, key: &Key, expected: Revision) -> Result<Revision>;

    /// Remove the key's history and write a purge marker; returns its revision.
    async fn kv_purge(&self, bucket: &BucketName, key: &Key) -> Result<Revision>;

    /// Keys with a live value whose name starts with `prefix` (plain string
    /// prefix, `""` for all), sorted. Unbounded: for a bucket of any size
    /// use [`kv_keys_page`](Self::kv_keys_page).
    async fn kv_keys(&self, bucket: &BucketName, prefix: &str) -> Result<Vec<Key>>;

    /// One page of [`kv_keys`](Self::kv_keys): the first `limit` live keys
    /// starting with `prefix` that sort (bytewise) after `after` (`None`:
    /// from the first). Follow [`KeysPage::next`] until it is `None` to see
    /// every key once; a key written or deleted during the walk may or may
    /// not show, every other key shows exactly once. `limit` 0 is
    /// `Invalid`; above [`MAX_KEYS_PAGE`] it is clamped. The default reads
    /// every key and cuts ([`KeysPage::cut`]); engines override it with a
    /// bounded read where they can.
    async fn kv_keys_page(
        &self,
        bucket: &BucketName,
        prefix: &str,
        after: Option<&Key>,
        limit: usize,
    ) -> Result<KeysPage> {
        let limit = keys_page_limit(limit)?;
        Ok(KeysPage::cut(self.kv_keys(bucket, prefix).await?, after, limit))
    }

    /// Whether this engine stack enforces `option` itself (seals values,
    /// hashes keys, checks key formats) on buckets and streams that set it.
    /// Engines only store options, so the default is `false`; a wrapper
    /// engine that enforces one answers `true` for it. A gateway refuses to
    /// create a bucket or stream with an option its stack does not enforce
    /// (see [`crate::options`]).
    fn supports_security(&self, option: crate::SecurityOption) -> bool {
        let _ = option;
        false
    }

    /// Every kept entry of `key`, oldest first, markers included.
    async fn kv_history(&self, bucket: &BucketName, key: &Key) -> Result<Vec<KvEntry>>;

    /// Changes of keys starting with `prefix`, in revision order.
    async fn kv_watch(&self, bucket: &BucketName, prefix: &str, start: WatchStart) -> Result<BoxStream<KvEntry>>;
}

/// An opaque handle to acknowledge one delivery; pass it back to
/// [`ConsumerEngine::ack`]. Tokens may be sent to clients and back.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(transparent)]
pub struct AckToken(pub String);

/// A message handed to a consumer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Delivery {
    /// The message.
    pub message: Message,
    /// 1 on first delivery, then 2, 3, …
    pub delivery_count: u32,
    /// Handle for [`ConsumerEngine::ack`].
    pub token: AckToken,
}

/// How a delivery is acknowledged.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", tag = "kind")]
pub enum AckKind {
    /// Done; never deliver it again.
    Ack,
    /// Failed; deliver it again after `delay` (zero: at once).
    Nak {
        /// Wait this long before redelivering.
        #[serde(with = "crate::config::millis", default)]
        delay: Duration,
    },
    /// Give up on it; never deliver again and do not dead-letter.
    Term,
    /// Still working; restart the ack_wait clock.
    InProgress,
}

/// Parameters of a fetch.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FetchRequest {
    /// At most this many deliveries (also bounded by `max_ack_pending`).
    pub max: usize,
    /// If nothing is ready, wait up to this long for something to arrive.
    pub wait: Duration,
}

/// Operations on durable consumers.
#[async_trait]
pub trait ConsumerEngine: Send + Sync + 'static {
    /// Create a durable consumer on `stream`; same config again returns its
    /// info, another config `AlreadyExists`.
    async fn create_consumer(&self, stream: &StreamName, config: ConsumerConfig) -> Result<ConsumerInfo>;

    /// Change `ack_wait`, `max_deliver`, `max_ack_pending` and `dead_letter`;
    /// `filter` and `deliver` are fixed (`Invalid` if changed).
    async fn update_consumer(&self, stream: &StreamName, config: ConsumerConfig) -> Result<ConsumerInfo>;

    /// A consumer's configuration and position.
    async fn consumer_info(&self, stream: &StreamName, consumer: &ConsumerName) -> Result<ConsumerInfo>;

    /// Names of the stream's consumers, sorted.
    async fn list_consumers(&self, stream: &StreamName) -> Result<Vec<ConsumerName>>;

    /// Delete a consumer and its state.
    async fn delete_consumer(&self, stream: &StreamName, consumer: &ConsumerName) -> Result<()>;

    /// Up to `request.max` deliveries: due redeliveries first (oldest
    /// sequence first), then new messages. Waits up to `request.wait` when
    /// nothing is ready; returns an empty batch after that.
    async fn fetch(&self, stream: &StreamName, consumer: &ConsumerName, request: FetchRequest)
    -> Result<Vec<Delivery>>;

    /// Acknowledge one delivery. Acking something already acked is not an
    /// error (acks are idempotent); an unparsable token is `Invalid`.
    async fn ack(&self, stream: &StreamName, consumer: &ConsumerName, token: &AckToken, kind: AckKind) -> Result<()>;

    /// Apply `kind` to every delivery in `tokens`, as [`ack`](Self::ack)
    /// would one by one. Every token is checked first: one that does not
    /// parse, or that belongs to another consumer, is `Invalid` and nothing
    /// is applied. Tokens already acked (or repeated) are not an error.
    async fn ack_many(
        &self,
        stream: &StreamName,
        consumer: &ConsumerName,
        tokens: &[AckToken],
        kind: AckKind,
    ) -> Result<()>;

    /// Acknowledge every delivery of the consumer that is still pending and
    /// whose stream sequence is at most `upto` (JetStream's AckAll, on an
    /// explicit-ack consumer). Only deliveries are acked: messages the
    /// consumer has not handed out yet are delivered as usual, whatever
    /// `upto` says. Idempotent.
    async fn ack_all(&self, stream: &StreamName, consumer: &ConsumerName, upto: Seq) -> Result<()>;
}

/// Everything an engine offers.
pub trait Engine: StreamEngine + KvEngine + ConsumerEngine {}

impl<T: StreamEngine + KvEngine + ConsumerEngine> Engine for T {}
