//! Group commit with `sync = always`: concurrent publishers share fsyncs,
//! and however an fsync is run (by the writer thread itself or by the
//! syncer thread, see the `writer` module doc) acks and live notifications
//! keep commit order, with no sequence missing or repeated.

use std::collections::BTreeMap;

use bytes::Bytes;
use finmesh_core::{
    OutgoingMessage, Seq, StreamConfig, StreamEngine, StreamName, Subject, SubjectPattern, SyncPolicy, TailEvent,
};
use finmesh_embedded::EmbeddedEngine;
use futures::StreamExt;

fn config(name: &str, sync: SyncPolicy) -> StreamConfig {
    let mut c =
        StreamConfig::new(StreamName::new(name).unwrap(), vec![SubjectPattern::new(format!("{name}.>")).unwrap()]);
    c.sync = sync;
    c
}

fn payload(publisher: usize, i: usize) -> Bytes {
    Bytes::from(format!("{publisher}:{i}"))
}

/// `publishers` tasks each publish `each` messages to `stream`, awaiting
/// every ack; returns the acked sequence of every (publisher, i), checking
/// that each publisher's acks increase.
async fn publish_all(engine: &EmbeddedEngine, stream: &str, publishers: usize, each: usize) -> BTreeMap<u64, Bytes> {
    let mut tasks = Vec::new();
    for p in 0..publishers {
        let engine = engine.clone();
        let name = StreamName::new(stream).unwrap();
        let subject = Subject::new(format!("{stream}.p{p}")).unwrap();
        tasks.push(tokio::spawn(async move {
            let mut acked = Vec::with_capacity(each);
            for i in 0..each {
                let ack = engine.publish(&name, OutgoingMessage::new(subject.clone(), payload(p, i))).await.unwrap();
                assert!(!ack.duplicate);
                if let Some((last, _)) = acked.last() {
                    assert!(ack.seq.0 > *last, "publisher {p}: ack {} after {last}", ack.seq);
                }
                acked.push((ack.seq.0, payload(p, i)));
            }
            acked
        }));
    }
    let mut by_seq = BTreeMap::new();
    for t in tasks {
        for (seq, body) in t.await.unwrap() {
            assert!(by_seq.insert(seq, body).is_none(), "sequence {seq} acked twice");
        }
    }
    by_seq
}

/// Follow `stream` from its first message until `count` arrived; each must
/// be the next sequence.
async fn tail_all(engine: &EmbeddedEngine, stream: &str, count: u64) -> BTreeMap<u64, Bytes> {
    let mut tail = engine.tail(&StreamName::new(stream).unwrap(), Seq(0), None).await.unwrap();
    let mut seen = BTreeMap::new();
    while (seen.len() as u64) < count {
        match tail.next().await.expect("the tail ended early").unwrap() {
            TailEvent::Message(m) => {
                assert_eq!(m.seq.0, seen.len() as u64 + 1, "tail out of order");
                seen.insert(m.seq.0, m.payload);
            }
            other => panic!("unexpected tail event {other:?}"),
        }
    }
    seen
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn always_publishers_share_fsyncs_and_keep_order() {
    let dir = tempfile::tempdir().unwrap();
    let engine = EmbeddedEngine::open(dir.path()).unwrap();
    engine.create_stream(config("g", SyncPolicy::Always)).await.unwrap();
    let before = engine.sync_stats();
    let (publishers, each) = (16, 100);
    let total = (publishers * each) as u64;
    let tail = tokio::spawn({
        let engine = engine.clone();
        async move { tail_all(&engine, "g", total).await }
    });
    let acked = publish_all(&engine, "g", publishers, each).await;
    assert_eq!(acked.keys().copied().collect::<Vec<_>>(), (1..=total).collect::<Vec<_>>());
    assert_eq!(tail.await.unwrap(), acked, "the tail saw exactly what was acked, at the acked sequences");

    let stats = engine.sync_stats();
    let (fsyncs, requests) = (stats.fsyncs - before.fsyncs, stats.requests - before.requests);
    assert_eq!(requests, total, "every publish waited for an fsync: {stats:?}");
    // Without group commit every publish would have its own fsync; 16
    // publishers awaiting their acks share them (about 16 per fsync on an
    // idle machine; 2 leaves room for a loaded one).
    assert!(fsyncs * 2 <= requests, "{requests} publishes took {fsyncs} fsyncs: {stats:?}");
    assert!(stats.writer_fsyncs <= stats.fsyncs);
    engine.close().await.unwrap();

    // Everything acked is there after reopening.
    let engine = EmbeddedEngine::open(dir.path()).unwrap();
    let info = engine.stream_info(&StreamName::new("g").unwrap()).await.unwrap();
    assert_eq!((info.state.messages, info.state.last_seq), (total, Seq(total)));
}

/// Many more publishers than a round gathers at once, plus a second stream
/// without fsyncs and stream changes that wait for one: fsyncs then run on
/// both threads, and nothing may be reordered or lost on the way.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mixed_load_keeps_order_on_every_stream() {
    let dir = tempfile::tempdir().unwrap();
    let engine = EmbeddedEngine::open(dir.path()).unwrap();
    engine.create_stream(config("a", SyncPolicy::Always)).await.unwrap();
    engine.create_stream(config("n", SyncPolicy::Never)).await.unwrap();
    let (publishers, each) = (64, 25);
    let total = (publishers * each) as u64;
    let tails = ["a", "n"].map(|s| {
        let engine = engine.clone();
        tokio::spawn(async move { tail_all(&engine, s, total).await })
    });
    // The stream without fsyncs gets as many messages from 4 publishers.
    let changes = tokio::spawn({
        let engine = engine.clone();
        async move {
            // Stream creations wait for an fsync too, interleaved with the publishes.
            for i in 0..20 {
                engine.create_stream(config(&format!("c{i}"), SyncPolicy::Always)).await.unwrap();
            }
        }
    });
    let (a, n) =
        tokio::join!(publish_all(&engine, "a", publishers, each), publish_all(&engine, "n", 4, publishers * each / 4));
    changes.await.unwrap();
    let [tail_a, tail_n] = tails;
    assert_eq!(a.len() as u64, total);
    assert_eq!(n.len() as u64, total);
    assert_eq!(tail_a.await.unwrap(), a);
    assert_eq!(tail_n.await.unwrap(), n);
    let stats = engine.sync_stats();
    assert!(stats.requests >= total + 22, "{stats:?}");
    eprintln!("{stats:?}");
}
