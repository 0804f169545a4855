//! The hot-value cache of KV gets (`kvcache.rs`) never answers what a get
//! from the store would not: each test caches a key with a get, changes
//! the key (put, CAS, delete, purge, TTL, a write waiting for its fsync,
//! concurrent writes) and reads it again. Without the cache's
//! invalidation every one of them reads the old value.

use std::pin::pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use bytes::Bytes;
use finmesh_core::{
    BucketConfig, BucketName, Key, KvEngine, KvEntry, OutgoingMessage, Revision, StreamConfig, StreamEngine,
    StreamName, Subject, SubjectPattern, SyncPolicy,
};
use finmesh_embedded::{EmbeddedEngine, EmbeddedOptions};

fn bucket() -> BucketName {
    BucketName::new("reg").unwrap()
}

fn key(s: &str) -> Key {
    Key::new(s).unwrap()
}

fn value(s: &'static str) -> Bytes {
    Bytes::from_static(s.as_bytes())
}

async fn engine(dir: &std::path::Path, sync: SyncPolicy, kv_cache_bytes: u64) -> EmbeddedEngine {
    let engine =
        EmbeddedEngine::open_with(dir, EmbeddedOptions { kv_cache_bytes, ..EmbeddedOptions::default() }).unwrap();
    let mut config = BucketConfig::new(bucket());
    config.history = 5;
    config.sync = sync;
    engine.create_bucket(config).await.unwrap();
    engine
}

/// Get `k` twice (the second get is served by the cache when it is on)
/// and check both answers agree.
async fn get_twice(engine: &EmbeddedEngine, k: &Key) -> Option<KvEntry> {
    let first = engine.kv_get(&bucket(), k).await.unwrap();
    let second = engine.kv_get(&bucket(), k).await.unwrap();
    assert_eq!(first, second, "two gets with nothing in between");
    second
}

fn seen(e: &Option<KvEntry>) -> Option<(Revision, Bytes)> {
    e.as_ref().map(|e| (e.revision, e.value.clone()))
}

#[tokio::test]
async fn a_cached_key_shows_every_later_write() {
    for (sync, cache) in [(SyncPolicy::Always, 1 << 20), (SyncPolicy::Never, 1 << 20), (SyncPolicy::Always, 0)] {
        let dir = tempfile::tempdir().unwrap();
        let engine = engine(dir.path(), sync, cache).await;
        let (b, k) = (bucket(), key("card.4111"));
        let what = format!("{sync:?}, cache {cache}");
        assert_eq!(get_twice(&engine, &k).await, None, "{what}");
        let r1 = engine.kv_put(&b, &k, value("v1")).await.unwrap();
        assert_eq!(seen(&get_twice(&engine, &k).await), Some((r1, value("v1"))), "{what}: put");
        let r2 = engine.kv_put(&b, &k, value("v2")).await.unwrap();
        assert_eq!(seen(&get_twice(&engine, &k).await), Some((r2, value("v2"))), "{what}: put over a cached value");
        let r3 = engine.kv_update(&b, &k, value("v3"), r2).await.unwrap();
        assert_eq!(seen(&get_twice(&engine, &k).await), Some((r3, value("v3"))), "{what}: CAS update");
        engine.kv_delete_if(&b, &k, r3).await.unwrap();
        assert_eq!(get_twice(&engine, &k).await, None, "{what}: CAS delete");
        let r5 = engine.kv_create(&b, &k, value("v5")).await.unwrap();
        assert_eq!(seen(&get_twice(&engine, &k).await), Some((r5, value("v5"))), "{what}: create after delete");
        engine.kv_delete(&b, &k).await.unwrap();
        assert_eq!(get_twice(&engine, &k).await, None, "{what}: delete");
        let r7 = engine.kv_put(&b, &k, value("v7")).await.unwrap();
        assert_eq!(seen(&get_twice(&engine, &k).await), Some((r7, value("v7"))), "{what}");
        engine.kv_purge(&b, &k).await.unwrap();
        assert_eq!(get_twice(&engine, &k).await, None, "{what}: purge");
        // History is read from the store, the cache aside.
        let r9 = engine.kv_put_batch(&b, vec![(k.clone(), value("v9"))]).await.unwrap()[0];
        assert_eq!(seen(&get_twice(&engine, &k).await), Some((r9, value("v9"))), "{what}: batch put");
        let history = engine.kv_history(&b, &k).await.unwrap();
        assert_eq!(history.last().map(|e| e.revision), Some(r9), "{what}");

        // A deleted and created again bucket starts empty.
        engine.delete_bucket(&b).await.unwrap();
        engine.create_bucket(BucketConfig::new(b.clone())).await.unwrap();
        assert_eq!(get_twice(&engine, &k).await, None, "{what}: a new bucket of the same name");
        engine.close().await.unwrap();
    }
}

#[tokio::test]
async fn a_cached_key_expires_when_a_ttl_is_set() {
    let dir = tempfile::tempdir().unwrap();
    let engine = engine(dir.path(), SyncPolicy::Never, 1 << 20).await;
    let (b, k) = (bucket(), key("k"));
    engine.kv_put(&b, &k, value("v1")).await.unwrap();
    assert!(get_twice(&engine, &k).await.is_some());
    let mut config = BucketConfig::new(b.clone());
    config.history = 5;
    config.sync = SyncPolicy::Never;
    config.ttl = Some(Duration::from_millis(100));
    engine.update_bucket(config).await.unwrap();
    // The value was written before the TTL was set; it expires 100 ms
    // after it was written, whether or not age retention removed it yet.
    let deadline = Instant::now() + Duration::from_secs(10);
    while engine.kv_get(&b, &k).await.unwrap().is_some() {
        assert!(Instant::now() < deadline, "a cached value outlived the bucket's TTL");
        tokio::task::yield_now().await;
    }
    engine.close().await.unwrap();
}

/// Between a write's commit and its fsync, gets see (and may cache) the
/// value before it; once the write is acked, they see the write.
#[tokio::test]
async fn a_value_cached_while_a_write_waits_for_its_fsync_gives_way_when_it_is_acked() {
    let dir = tempfile::tempdir().unwrap();
    let engine = engine(dir.path(), SyncPolicy::Always, 1 << 20).await;
    let n = StreamName::new("N").unwrap();
    let mut sc = StreamConfig::new(n.clone(), vec![SubjectPattern::new("n.>").unwrap()]);
    sc.sync = SyncPolicy::Never;
    engine.create_stream(sc).await.unwrap();
    let (b, k) = (bucket(), key("k"));
    let r1 = engine.kv_put(&b, &k, value("v1")).await.unwrap();
    assert_eq!(seen(&get_twice(&engine, &k).await), Some((r1, value("v1"))));

    let hold = engine.hold_fsyncs();
    let writer = engine.clone();
    let mut put = pin!(writer.kv_put(&b, &k, value("v2")));
    assert!(futures::poll!(put.as_mut()).is_pending());
    // The writer applies requests in order: once this is answered, the put
    // is committed and waits for its fsync.
    engine.publish(&n, OutgoingMessage::new(Subject::new("n.x").unwrap(), value("b"))).await.unwrap();
    assert_eq!(seen(&get_twice(&engine, &k).await), Some((r1, value("v1"))), "a get saw an unsynced put");
    drop(hold);
    let r2 = put.await.unwrap();
    assert_eq!(seen(&get_twice(&engine, &k).await), Some((r2, value("v2"))), "the acked put is not seen");
    engine.close().await.unwrap();
}

/// Readers racing a writer never get a revision older than one already
/// acknowledged: a value read before a write and cached after it would be.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn readers_racing_writes_never_see_a_value_older_than_an_ack() {
    const WRITES: u64 = 400;
    let dir = tempfile::tempdir().unwrap();
    let engine = engine(dir.path(), SyncPolicy::Never, 1 << 20).await;
    let (b, k) = (bucket(), key("hot"));
    let acked =
        Arc::new(AtomicU64::new(engine.kv_put(&b, &k, Bytes::from(0u64.to_be_bytes().to_vec())).await.unwrap().0));
    let done = Arc::new(AtomicBool::new(false));
    let mut readers = Vec::new();
    for _ in 0..3 {
        let (engine, b, k, acked, done) = (engine.clone(), b.clone(), k.clone(), acked.clone(), done.clone());
        readers.push(tokio::spawn(async move {
            let mut reads = 0u64;
            while !done.load(Ordering::Acquire) {
                let floor = acked.load(Ordering::Acquire);
                let got = engine.kv_get(&b, &k).await.unwrap().expect("the key is always live");
                assert!(got.revision.0 >= floor, "read revision {} after revision {floor} was acked", got.revision.0);
                reads += 1;
            }
            reads
        }));
    }
    for i in 1..=WRITES {
        let rev = engine.kv_put(&b, &k, Bytes::from(i.to_be_bytes().to_vec())).await.unwrap();
        acked.store(rev.0, Ordering::Release);
        tokio::task::yield_now().await;
    }
    done.store(true, Ordering::Release);
    for r in readers {
        assert!(r.await.unwrap() > 0);
    }
    let last = engine.kv_get(&b, &k).await.unwrap().unwrap();
    assert_eq!((last.revision.0, &last.value[..]), (acked.load(Ordering::Acquire), &WRITES.to_be_bytes()[..]));
    engine.close().await.unwrap();
}
