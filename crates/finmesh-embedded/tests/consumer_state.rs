//! Consumer state on disk: an ack writes one small key whatever the number
//! of pending deliveries, the pending set survives a restart, and a
//! consumer record of the older layout (pending inline in the JSON head) is
//! moved to the per-delivery keys when the store opens.

use std::time::Duration;

use finmesh_core::{
    AckKind, ConsumerConfig, ConsumerEngine, ConsumerName, FetchRequest, OutgoingMessage, Seq, StreamConfig,
    StreamEngine, StreamName, SubjectPattern,
};
use finmesh_embedded::EmbeddedEngine;

fn names() -> (StreamName, ConsumerName) {
    (StreamName::new("JOBS").unwrap(), ConsumerName::new("w").unwrap())
}

async fn setup(e: &EmbeddedEngine, messages: usize, max_ack_pending: u32) {
    let (s, c) = names();
    e.create_stream(StreamConfig::new(s.clone(), vec![SubjectPattern::new("jobs.>").unwrap()])).await.unwrap();
    let mut left = messages;
    while left > 0 {
        let n = left.min(1000);
        let batch = (0..n).map(|_| OutgoingMessage::new("jobs.a".parse().unwrap(), "x")).collect();
        e.publish_batch(&s, batch).await.unwrap();
        left -= n;
    }
    let config = ConsumerConfig { max_ack_pending, ack_wait: Duration::from_secs(60), ..ConsumerConfig::new(c) };
    e.create_consumer(&s, config).await.unwrap();
}

async fn fetch(e: &EmbeddedEngine, max: usize) -> Vec<finmesh_core::Delivery> {
    let (s, c) = names();
    let ds = e.fetch(&s, &c, FetchRequest { max, wait: Duration::ZERO }).await.unwrap();
    assert_eq!(ds.len(), max);
    ds
}

/// The bytes one ack writes are the same with 10 and with 5,000 pending
/// deliveries (the old layout rewrote every pending entry per ack).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ack_io_does_not_grow_with_pending() {
    let dir = tempfile::tempdir().unwrap();
    let e = EmbeddedEngine::open(dir.path()).unwrap();
    let (s, c) = names();
    setup(&e, 6_000, 10_000).await;
    let ack_cost = |e: &EmbeddedEngine, before: finmesh_embedded::ConsumerIo| {
        let after = e.consumer_io();
        (after.keys_written - before.keys_written, after.bytes_written - before.bytes_written)
    };

    let few = fetch(&e, 10).await;
    let before = e.consumer_io();
    e.ack(&s, &c, &few[0].token, AckKind::Ack).await.unwrap();
    let with_few = ack_cost(&e, before);

    for _ in 0..5 {
        fetch(&e, 1000).await;
    }
    assert_eq!(e.consumer_info(&s, &c).await.unwrap().num_ack_pending, 5_009);
    let before = e.consumer_io();
    e.ack(&s, &c, &few[1].token, AckKind::Ack).await.unwrap();
    let with_many = ack_cost(&e, before);
    assert_eq!(with_few, with_many, "(keys, bytes) of one ack");
    assert_eq!(with_many.0, 1);
    assert!(with_many.1 < 64, "one ack wrote {} bytes", with_many.1);

    let before = e.consumer_io();
    e.ack(&s, &c, &few[2].token, AckKind::Nak { delay: Duration::from_secs(5) }).await.unwrap();
    assert_eq!(ack_cost(&e, before).0, 1, "a nak rewrites one entry");
    let before = e.consumer_io();
    e.ack_all(&s, &c, Seq(10)).await.unwrap();
    assert_eq!(ack_cost(&e, before).0, 8, "ack_all removes one key per pending delivery it acks");
}

/// Pending deliveries, their counts and the cursor survive a restart.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pending_deliveries_survive_restart() {
    let dir = tempfile::tempdir().unwrap();
    let (s, c) = names();
    {
        let e = EmbeddedEngine::open(dir.path()).unwrap();
        setup(&e, 10, 100).await;
        let ds = fetch(&e, 6).await;
        e.ack_many(&s, &c, &[ds[0].token.clone(), ds[2].token.clone()], AckKind::Ack).await.unwrap();
        e.ack(&s, &c, &ds[1].token, AckKind::Nak { delay: Duration::ZERO }).await.unwrap();
        e.close().await.unwrap();
    }
    let e = EmbeddedEngine::open(dir.path()).unwrap();
    let info = e.consumer_info(&s, &c).await.unwrap();
    assert_eq!((info.delivered, info.ack_floor, info.num_ack_pending), (Seq(6), Seq(1), 4));
    let ds = fetch(&e, 5).await;
    let got: Vec<(u64, u32)> = ds.iter().map(|d| (d.message.seq.0, d.delivery_count)).collect();
    assert_eq!(got, [(2, 2), (7, 1), (8, 1), (9, 1), (10, 1)]);
}

/// A head written by the older layout, with its pending map inline, loads
/// with that map and is rewritten without it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn older_consumer_records_are_migrated() {
    let dir = tempfile::tempdir().unwrap();
    let (s, c) = names();
    {
        let e = EmbeddedEngine::open(dir.path()).unwrap();
        setup(&e, 5, 100).await;
        e.close().await.unwrap();
    }
    {
        let db = fjall::Database::builder(dir.path()).open().unwrap();
        let meta = db.keyspace("meta", fjall::KeyspaceCreateOptions::default).unwrap();
        let key = "consumer/JOBS/w";
        let mut head: serde_json::Value = serde_json::from_slice(&meta.get(key).unwrap().unwrap()).unwrap();
        head["delivered"] = serde_json::json!(3);
        head["pending"] =
            serde_json::json!({"2": {"deliveries": 1, "due": u64::MAX}, "3": {"deliveries": 2, "due": 0}});
        meta.insert(key, serde_json::to_vec(&head).unwrap()).unwrap();
        db.persist(fjall::PersistMode::SyncAll).unwrap();
    }
    let e = EmbeddedEngine::open(dir.path()).unwrap();
    let info = e.consumer_info(&s, &c).await.unwrap();
    assert_eq!((info.delivered, info.ack_floor, info.num_ack_pending, info.num_redelivered), (Seq(3), Seq(1), 2, 1));
    let ds = fetch(&e, 3).await;
    let got: Vec<(u64, u32)> = ds.iter().map(|d| (d.message.seq.0, d.delivery_count)).collect();
    assert_eq!(got, [(3, 3), (4, 1), (5, 1)]);
    e.close().await.unwrap();

    let db = fjall::Database::builder(dir.path()).open().unwrap();
    let meta = db.keyspace("meta", fjall::KeyspaceCreateOptions::default).unwrap();
    let head: serde_json::Value = serde_json::from_slice(&meta.get("consumer/JOBS/w").unwrap().unwrap()).unwrap();
    assert!(head.get("pending").is_none(), "head still carries pending: {head}");
    assert_eq!(meta.prefix("cpend/JOBS/w/").count(), 4, "2, 3, 4 and 5 are pending, one key each");
}
