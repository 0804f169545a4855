//! Helpers shared by the cases: short constructors for validated names,
//! small fixtures, and bounded waits.
//!
//! Every wait here is bounded by [`STEP`] (or an explicit deadline) and fails
//! the case with a message naming what it waited for.

use std::fmt::Debug;
use std::future::Future;
use std::time::{Duration, Instant};

use bytes::Bytes;
use futures::StreamExt;

use crate::{
    BoxStream, BucketName, ConsumerConfig, ConsumerName, Delivery, Engine, Error, ErrorKind, FetchRequest, Key,
    KvEntry, Message, OutgoingMessage, ReadRequest, Result, Seq, StreamConfig, StreamName, Subject, SubjectPattern,
    TailEvent,
};

/// Longest wait for one expected event (a tail item, a watch entry, a
/// redelivery). Generous, so a loaded machine does not fail a good engine;
/// healthy engines answer in milliseconds.
pub const STEP: Duration = Duration::from_secs(5);

/// A stream name.
pub fn sn(s: &str) -> StreamName {
    StreamName::new(s).expect("valid stream name")
}

/// A subject.
pub fn subj(s: &str) -> Subject {
    Subject::new(s).expect("valid subject")
}

/// A subject pattern.
pub fn pat(s: &str) -> SubjectPattern {
    SubjectPattern::new(s).expect("valid subject pattern")
}

/// A KV key.
pub fn key(s: &str) -> Key {
    Key::new(s).expect("valid key")
}

/// A bucket name.
pub fn bucket(s: &str) -> BucketName {
    BucketName::new(s).expect("valid bucket name")
}

/// A consumer name.
pub fn cname(s: &str) -> ConsumerName {
    ConsumerName::new(s).expect("valid consumer name")
}

/// A message without headers.
pub fn out(subject: &str, payload: impl Into<Bytes>) -> OutgoingMessage {
    OutgoingMessage::new(subj(subject), payload)
}

/// A message with a deduplication id.
pub fn with_id(subject: &str, payload: impl Into<Bytes>, id: &str) -> OutgoingMessage {
    out(subject, payload).with_msg_id(id).expect("valid msg id")
}

/// A stream config with defaults.
pub fn stream_config(name: &str, subjects: &[&str]) -> StreamConfig {
    StreamConfig::new(sn(name), subjects.iter().map(|s| pat(s)).collect())
}

/// Create `ORDERS` capturing `orders.>`, the stream most cases use.
pub async fn orders(e: &dyn Engine) -> StreamName {
    e.create_stream(stream_config("ORDERS", &["orders.>"])).await.expect("create ORDERS");
    sn("ORDERS")
}

/// Publish `n` messages on `subject` with payloads `m1`, `m2`, …
/// (numbered from the stream's next sequence); returns their sequences.
pub async fn publish_n(e: &dyn Engine, stream: &StreamName, subject: &str, n: usize) -> Vec<Seq> {
    let mut seqs = Vec::with_capacity(n);
    for _ in 0..n {
        let next = e.stream_info(stream).await.expect("stream info").state.last_seq.next();
        let ack = e.publish(stream, out(subject, format!("m{}", next.0))).await.expect("publish");
        assert!(!ack.duplicate, "a message without id is never a duplicate");
        seqs.push(ack.seq);
    }
    seqs
}

/// Publish one message and return its sequence.
pub async fn publish_one(e: &dyn Engine, stream: &StreamName, subject: &str, payload: &str) -> Seq {
    e.publish(stream, out(subject, payload.to_owned())).await.expect("publish").seq
}

/// The error of `r`, which must be of `kind`.
#[track_caller]
pub fn expect_kind<T: Debug>(r: Result<T>, kind: ErrorKind) -> Error {
    match r {
        Ok(v) => panic!("expected a {kind} error, got Ok({v:?})"),
        Err(e) => {
            assert_eq!(e.kind(), kind, "expected a {kind} error, got {e:?}");
            e
        }
    }
}

/// Sequences of messages, as plain numbers.
pub fn seqs(msgs: &[Message]) -> Vec<u64> {
    msgs.iter().map(|m| m.seq.0).collect()
}

/// Sequences of deliveries, as plain numbers.
pub fn delivered_seqs(ds: &[Delivery]) -> Vec<u64> {
    ds.iter().map(|d| d.message.seq.0).collect()
}

/// Every stored message of `stream` (up to 10 000).
pub async fn read_all(e: &dyn Engine, stream: &StreamName) -> Vec<Message> {
    e.read(stream, ReadRequest::from_seq(Seq(0), 10_000)).await.expect("read all")
}

/// The next item of a stream, within [`STEP`]; fails if the stream ends or
/// yields an error.
pub async fn next_item<T: Debug>(s: &mut BoxStream<T>, what: &str) -> T {
    match tokio::time::timeout(STEP, s.next()).await {
        Err(_) => panic!("{what}: nothing arrived within {STEP:?}"),
        Ok(None) => panic!("{what}: the stream ended"),
        Ok(Some(Err(e))) => panic!("{what}: the stream failed: {e:?}"),
        Ok(Some(Ok(v))) => v,
    }
}

/// The next tail item, which must be a message.
pub async fn next_message(s: &mut BoxStream<TailEvent>, what: &str) -> Message {
    match next_item(s, what).await {
        TailEvent::Message(m) => m,
        other => panic!("{what}: expected a message, got {other:?}"),
    }
}

/// The next `n` tail messages' sequences.
pub async fn next_seqs(s: &mut BoxStream<TailEvent>, n: usize, what: &str) -> Vec<u64> {
    let mut out = Vec::with_capacity(n);
    for _ in 0..n {
        out.push(next_message(s, what).await.seq.0);
    }
    out
}

/// The next watch entry.
pub async fn next_entry(s: &mut BoxStream<KvEntry>, what: &str) -> KvEntry {
    next_item(s, what).await
}

/// Nothing arrives on `s` within `d` (a bounded check for absence).
pub async fn assert_quiet<T: Debug>(s: &mut BoxStream<T>, d: Duration, what: &str) {
    if let Ok(item) = tokio::time::timeout(d, s.next()).await {
        panic!("{what}: expected nothing, got {item:?}");
    }
}

/// Poll `cond` every 20 ms until it holds; fail after `deadline`. Only for
/// time-based behaviour (expiry), where there is no event to wait for.
pub async fn eventually<F, Fut>(what: &str, deadline: Duration, mut cond: F)
where
    F: FnMut() -> Fut,
    Fut: Future<Output = bool>,
{
    let start = Instant::now();
    loop {
        if cond().await {
            return;
        }
        if start.elapsed() > deadline {
            panic!("{what}: condition still false after {deadline:?}");
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// A consumer config with a short ack_wait.
pub fn consumer_config(name: &str, ack_wait: Duration) -> ConsumerConfig {
    ConsumerConfig { ack_wait, ..ConsumerConfig::new(cname(name)) }
}

/// Fetch up to `max` deliveries, waiting up to `wait`.
pub async fn fetch(e: &dyn Engine, stream: &StreamName, c: &ConsumerName, max: usize, wait: Duration) -> Vec<Delivery> {
    e.fetch(stream, c, FetchRequest { max, wait }).await.expect("fetch")
}

/// Fetch until `n` deliveries arrived in total (each fetch waits up to
/// [`STEP`]); fails if a fetch comes back empty.
pub async fn fetch_exactly(e: &dyn Engine, stream: &StreamName, c: &ConsumerName, n: usize) -> Vec<Delivery> {
    let mut got = Vec::new();
    while got.len() < n {
        let batch = fetch(e, stream, c, n - got.len(), STEP).await;
        assert!(!batch.is_empty(), "fetch: wanted {n} deliveries, got {} then nothing within {STEP:?}", got.len());
        got.extend(batch);
    }
    got
}
