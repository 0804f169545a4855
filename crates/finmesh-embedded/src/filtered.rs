//! Filtered reads through the subject index.
//!
//! A read with a subject filter first looks up the matching subjects in the
//! stream's `l` keyspace (a prefix scan on the filter's literal part) and
//! adds up their message counts. When the matches are a small share of the
//! stream (at most 1 in [`INDEX_SHARE`]) and few subjects match (at most
//! [`MAX_MERGE_SUBJECTS`]), it walks each subject's range of the `x`
//! keyspace, merges them in sequence order and fetches only those
//! messages: the cost follows the matches, not the stream. Otherwise the
//! sequential scan of the messages is cheaper, and the caller does that.
//!
//! The index of the newest writes may not be committed yet (see `txn.rs`):
//! only sequences up to [`StreamHandle::indexed`] are read through it; the
//! rest of the range (a round's writes at most) is scanned.
//!
//! Invariant: the result equals the sequential scan's: every stored
//! message of the range whose subject matches, in sequence order, at most
//! `limit` of them.

use std::cmp::Reverse;
use std::collections::BinaryHeap;
use std::sync::atomic::Ordering;

use finmesh_core::{Error, Message, Result, Seq, SubjectPattern};

use crate::codec;
use crate::store::{StreamHandle, storage};

/// Most subjects merged; a filter matching more is read by a scan.
const MAX_MERGE_SUBJECTS: usize = 1024;
/// The index is used when at most 1 in this many messages match.
const INDEX_SHARE: u64 = 4;

/// The literal part of a pattern before its first wildcard token, for prefix scans.
pub(crate) fn literal_prefix(p: &SubjectPattern) -> String {
    let mut out = String::new();
    for t in p.as_str().split('.') {
        if t == "*" || t == ">" {
            return out;
        }
        out.push_str(t);
        out.push('.');
    }
    out.pop();
    out
}

/// Read `start..=end` through the index when that is cheaper (see the
/// module doc); `None` when the caller should scan instead.
pub(crate) fn read_by_index(
    h: &StreamHandle,
    start: Seq,
    end: Seq,
    filter: &SubjectPattern,
    limit: usize,
) -> Result<Option<Vec<Message>>> {
    #[cfg(test)]
    tests::pause_point(h);
    let mut subjects = Vec::new();
    let mut matching = 0u64;
    for kv in h.last.prefix(literal_prefix(filter).as_bytes()) {
        let (k, v) = kv.into_inner().map_err(storage)?;
        let subject = std::str::from_utf8(&k).map_err(|_| Error::internal("corrupt subject in last index"))?;
        if !filter.matches_str(subject) {
            continue;
        }
        let (last, count) = codec::decode_last(&v)?;
        if last < start {
            continue;
        }
        if subjects.len() == MAX_MERGE_SUBJECTS {
            return Ok(None);
        }
        matching += count;
        subjects.push(subject.to_owned());
    }
    if matching.saturating_mul(INDEX_SHARE) > h.state().messages {
        return Ok(None);
    }
    let indexed = Seq(h.indexed.load(Ordering::Acquire));
    let mut out = Vec::new();
    let index_end = end.min(indexed);
    if start <= index_end {
        let mut ranges: Vec<fjall::Iter> = subjects
            .iter()
            .map(|s| h.index.range(codec::index_key(s, start)..=codec::index_key(s, index_end)))
            .collect();
        let mut heads = BinaryHeap::with_capacity(ranges.len());
        for (i, r) in ranges.iter_mut().enumerate() {
            if let Some(seq) = next_seq(r)? {
                heads.push(Reverse((seq, i)));
            }
        }
        while out.len() < limit {
            let Some(Reverse((seq, i))) = heads.pop() else { break };
            count_visit();
            // Gone if retention removed it after its index entry was read.
            if let Some(m) = h.get(seq)? {
                out.push(m);
            }
            if let Some(next) = next_seq(&mut ranges[i])? {
                heads.push(Reverse((next, i)));
            }
        }
    }
    // Writes whose index is not committed yet.
    let rest = start.max(index_end.next());
    h.scan(rest, end, Some(filter), limit, out).map(Some)
}

fn next_seq(range: &mut fjall::Iter) -> Result<Option<Seq>> {
    match range.next() {
        Some(kv) => Ok(Some(codec::index_key_seq(&kv.key().map_err(storage)?)?)),
        None => Ok(None),
    }
}

#[cfg(test)]
thread_local! {
    /// Messages a read on this thread decoded (tests only).
    pub(crate) static VISITED: std::cell::Cell<u64> = const { std::cell::Cell::new(0) };
}

/// Count one message decoded by a read (tests only; free otherwise).
#[inline]
pub(crate) fn count_visit() {
    #[cfg(test)]
    VISITED.with(|v| v.set(v.get() + 1));
}

#[cfg(test)]
mod tests {
    use std::sync::{Arc, mpsc};
    use std::time::Duration;

    use finmesh_core::{
        ConsumerConfig, ConsumerEngine, ConsumerName, FetchRequest, OutgoingMessage, ReadRequest, Seq, StreamConfig,
        StreamEngine, StreamName, SubjectPattern,
    };

    use super::*;
    use crate::EmbeddedEngine;

    /// A read of stream `PAUSED` reports here, then waits for a go.
    type Pause = (mpsc::Sender<()>, mpsc::Receiver<()>);
    static PAUSE: parking_lot::Mutex<Option<Pause>> = parking_lot::Mutex::new(None);

    pub(super) fn pause_point(h: &StreamHandle) {
        if h.name.as_str() != "PAUSED" {
            return;
        }
        // Not in the `if let`: its guard would live through the wait and
        // hold up every other read.
        let pause = PAUSE.lock().take();
        if let Some((reached, go)) = pause {
            reached.send(()).unwrap();
            go.recv_timeout(Duration::from_secs(30)).unwrap();
        }
    }

    fn visited() -> u64 {
        VISITED.with(|v| v.get())
    }

    fn pattern(s: &str) -> SubjectPattern {
        SubjectPattern::new(s).unwrap()
    }

    /// 20,000 messages; every 100th is on `s.rare.<0..3>`, the rest on `s.common.<0..7>`.
    async fn sparse_stream(name: &str) -> (tempfile::TempDir, EmbeddedEngine, Arc<StreamHandle>) {
        let dir = tempfile::tempdir().unwrap();
        let e = EmbeddedEngine::open(dir.path()).unwrap();
        let s = StreamName::new(name).unwrap();
        e.create_stream(StreamConfig::new(s.clone(), vec![pattern("s.>")])).await.unwrap();
        for b in 0..20 {
            let batch = (0..1000)
                .map(|i| {
                    let n = b * 1000 + i;
                    let subject =
                        if n % 100 == 0 { format!("s.rare.{}", n % 3) } else { format!("s.common.{}", n % 7) };
                    OutgoingMessage::new(subject.parse().unwrap(), n.to_string())
                })
                .collect();
            e.publish_batch(&s, batch).await.unwrap();
        }
        let h = e.inner.registry.get(&s).unwrap();
        (dir, e, h)
    }

    /// A sparse filtered read decodes only the matching messages and
    /// returns exactly what the sequential scan returns, also for a range
    /// the index does not cover yet.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn sparse_filtered_read_visits_only_matches() {
        let (_dir, _e, h) = sparse_stream("S").await;
        let rare = pattern("s.rare.*");
        let scanned = h.scan(Seq(1), Seq(u64::MAX), Some(&rare), 10_000, Vec::new()).unwrap();
        assert_eq!(scanned.len(), 200);

        let v0 = visited();
        let got = h.read(&ReadRequest::from_seq(Seq(1), 10_000).filter(rare.clone())).unwrap();
        assert_eq!((got == scanned, visited() - v0), (true, 200));

        let v0 = visited();
        let part = h.read(&ReadRequest::from_seq(Seq(5_000), 10).filter(rare.clone()).end(Seq(15_000))).unwrap();
        let want: Vec<_> = scanned.iter().filter(|m| m.seq >= Seq(5_000)).take(10).cloned().collect();
        assert_eq!((part == want, visited() - v0), (true, 10));

        // Index changes of the newest writes not committed yet: that part is scanned.
        h.indexed.store(15_000, Ordering::Release);
        let v0 = visited();
        let got = h.read(&ReadRequest::from_seq(Seq(1), 10_000).filter(rare.clone())).unwrap();
        assert_eq!((got == scanned, visited() - v0), (true, 150 + 5_000));
        h.indexed.store(20_000, Ordering::Release);

        // A dense filter is scanned, and still right.
        let common = pattern("s.common.>");
        let got = h.read(&ReadRequest::from_seq(Seq(1), 100).filter(common)).unwrap();
        assert_eq!(got.len(), 100);
        assert!(got.iter().all(|m| m.subject.as_str().starts_with("s.common.")));
    }

    /// A sparse consumer's fetch reads its candidates through the index.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn sparse_consumer_fetch_reads_only_matches() {
        let (_dir, e, h) = sparse_stream("S").await;
        let (s, c) = (h.name.clone(), ConsumerName::new("rare").unwrap());
        let config = ConsumerConfig { filter: Some(pattern("s.rare.1")), ..ConsumerConfig::new(c.clone()) };
        let info = e.create_consumer(&s, config).await.unwrap();
        assert_eq!(info.num_pending, 67);
        let plan = e.inner.consumers.fetch_plan(&s, &c, 50).unwrap();
        let v0 = visited();
        let new = crate::consumers::read_candidates(&h, &plan).unwrap();
        assert_eq!(visited() - v0, 50);
        drop(new);
        let ds = e.fetch(&s, &c, FetchRequest { max: 100, wait: Duration::ZERO }).await.unwrap();
        assert_eq!(ds.len(), 67);
        assert!(ds.iter().all(|d| d.message.subject.as_str() == "s.rare.1"));
    }

    /// Stream `PAUSED` with consumer `rare` on `s.rare.*`; the next read of
    /// the stream stops at its start and reports `reached`, then waits for
    /// `go`.
    async fn paused_rare_consumer()
    -> (tempfile::TempDir, EmbeddedEngine, StreamName, ConsumerName, tokio::task::JoinHandle<()>, mpsc::Sender<()>)
    {
        let (dir, e, h) = sparse_stream("PAUSED").await;
        let (s, c) = (h.name.clone(), ConsumerName::new("rare").unwrap());
        let config = ConsumerConfig { filter: Some(pattern("s.rare.*")), ..ConsumerConfig::new(c.clone()) };
        e.create_consumer(&s, config).await.unwrap();
        let (reached_tx, reached) = mpsc::channel();
        let (go, go_rx) = mpsc::channel();
        *PAUSE.lock() = Some((reached_tx, go_rx));
        let reached = tokio::task::spawn_blocking(move || reached.recv_timeout(Duration::from_secs(30)).unwrap());
        (dir, e, s, c, reached, go)
    }

    /// A fetch whose candidates a concurrent fetch claimed while it read
    /// them reads again from the new cursor: with no wait it does not come
    /// back empty while matching messages are there.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_fetch_that_lost_its_candidates_reads_again() {
        let (_dir, e, s, c, reached, go) = paused_rare_consumer().await;
        let fetch = |e: EmbeddedEngine| {
            let (s, c) = (s.clone(), c.clone());
            async move { e.fetch(&s, &c, FetchRequest { max: 10, wait: Duration::ZERO }).await.unwrap() }
        };
        let paused = tokio::spawn(fetch(e.clone()));
        reached.await.unwrap();
        // The first fetch has planned from the start and waits in its read;
        // this one claims the same ten messages meanwhile.
        let first: Vec<Seq> = fetch(e.clone()).await.iter().map(|d| d.message.seq).collect();
        go.send(()).unwrap();
        let second: Vec<Seq> = paused.await.unwrap().iter().map(|d| d.message.seq).collect();
        assert_eq!((first.len(), second.len()), (10, 10), "first {first:?}, second {second:?}");
        assert!(first.last() < second.first(), "handed out twice: {first:?} then {second:?}");
    }

    /// While a consumer's fetch is reading the stream, publishes go on: the
    /// read does not run on the writer thread.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn publishes_proceed_while_a_fetch_reads() {
        let (_dir, e, s, c, reached, go) = paused_rare_consumer().await;
        let fetcher = {
            let (e, s, c) = (e.clone(), s.clone(), c.clone());
            tokio::spawn(async move { e.fetch(&s, &c, FetchRequest { max: 10, wait: Duration::ZERO }).await })
        };
        reached.await.unwrap();
        // The fetch is paused inside its read; the writer must still take publishes.
        let publish = e.publish(&s, OutgoingMessage::new("s.common.0".parse().unwrap(), "during"));
        let ack = tokio::time::timeout(Duration::from_secs(20), publish).await;
        go.send(()).unwrap();
        assert_eq!(ack.expect("a publish waited for a fetch's read").unwrap().seq, Seq(20_001));
        let ds = fetcher.await.unwrap().unwrap();
        assert_eq!(ds.len(), 10);
    }
}
