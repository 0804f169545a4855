//! KV values live on disk, not in memory: the engine's memory does not
//! grow with what a bucket holds, and the batched put path used to load
//! large buckets.
//!
//! The memory test measures the process's resident set (nextest runs each
//! test in its own process) around a reopen of a bucket holding 160 MiB of
//! values, after reading every value back: an engine that keeps values in
//! memory holds all of them; this one holds at most its block cache and the
//! memtables replayed from the journal.

use bytes::Bytes;
use finmesh_core::{BucketConfig, BucketName, ErrorKind, Key, KvEngine, Revision, SyncPolicy};
use finmesh_embedded::{EmbeddedEngine, EmbeddedOptions};

fn bucket(name: &str) -> BucketName {
    BucketName::new(name).unwrap()
}

fn key(i: usize) -> Key {
    Key::new(format!("key-{i:06}")).unwrap()
}

/// A value that names its key, so a read of the wrong record shows.
fn value(i: usize, len: usize) -> Bytes {
    let mut v = vec![(i % 251) as u8; len];
    v[..8].copy_from_slice(&(i as u64).to_be_bytes());
    Bytes::from(v)
}

/// Resident set of this process in bytes, after handing freed heap pages
/// back to the OS (glibc keeps them otherwise, which would measure the
/// allocator, not the engine).
fn rss_bytes() -> u64 {
    #[cfg(target_env = "gnu")]
    // SAFETY: malloc_trim only releases free heap memory; no pointer is involved.
    unsafe {
        libc::malloc_trim(0);
    }
    let status = std::fs::read_to_string("/proc/self/status").unwrap();
    let line = status.lines().find(|l| l.starts_with("VmRSS")).unwrap();
    line.split_whitespace().nth(1).unwrap().parse::<u64>().unwrap() * 1024
}

const MIB: u64 = 1024 * 1024;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn values_are_not_held_in_memory() {
    const KEYS: usize = 2560;
    const VALUE: usize = 64 * 1024; // 160 MiB of values in all
    const CACHE: u64 = 4 * MIB;
    let dir = tempfile::tempdir().unwrap();
    let options = || EmbeddedOptions { cache_bytes: CACHE, ..EmbeddedOptions::default() };
    let b = bucket("big");
    let before = rss_bytes();
    {
        let engine = EmbeddedEngine::open_with(dir.path(), options()).unwrap();
        let mut config = BucketConfig::new(b.clone());
        config.sync = SyncPolicy::Never;
        config.max_value_size = Some(VALUE as u32);
        engine.create_bucket(config).await.unwrap();
        for chunk in (0..KEYS).collect::<Vec<_>>().chunks(64) {
            let entries = chunk.iter().map(|&i| (key(i), value(i, VALUE))).collect();
            engine.kv_put_batch(&b, entries).await.unwrap();
        }
        engine.close().await.unwrap();
    }
    let engine = EmbeddedEngine::open_with(dir.path(), options()).unwrap();
    for i in 0..KEYS {
        let e = engine.kv_get(&b, &key(i)).await.unwrap().unwrap_or_else(|| panic!("key {i} is missing"));
        assert_eq!(e.value, value(i, VALUE), "key {i}");
    }
    let held = rss_bytes().saturating_sub(before);
    let values = (KEYS * VALUE) as u64;
    eprintln!(
        "{} MiB of values; the process holds {} MiB more after reopening and reading all",
        values / MIB,
        held / MIB
    );
    // At most the cache (4 MiB), the journal's replay into memtables (at
    // most 64 MiB) and slack; values held in memory would be 160 MiB more.
    assert!(held < values * 7 / 10, "the engine holds {} MiB for {} MiB of values", held / MIB, values / MIB);
    engine.close().await.unwrap();
}

#[tokio::test]
async fn a_batch_put_writes_every_key_in_order() {
    let dir = tempfile::tempdir().unwrap();
    let engine = EmbeddedEngine::open(dir.path()).unwrap();
    let b = bucket("batch");
    let mut config = BucketConfig::new(b.clone());
    config.history = 2;
    engine.create_bucket(config).await.unwrap();
    assert_eq!(engine.kv_put_batch(&b, Vec::new()).await.unwrap(), Vec::<Revision>::new());
    let revs = engine
        .kv_put_batch(
            &b,
            vec![(key(1), value(1, 8)), (key(2), value(2, 8)), (key(1), value(3, 8)), (key(1), value(4, 8))],
        )
        .await
        .unwrap();
    assert_eq!(revs, vec![Revision(1), Revision(2), Revision(3), Revision(4)]);
    let got = engine.kv_get(&b, &key(1)).await.unwrap().unwrap();
    assert_eq!((got.revision, got.value), (Revision(4), value(4, 8)));
    // History 2: the key's first revision is trimmed.
    let history: Vec<Revision> = engine.kv_history(&b, &key(1)).await.unwrap().iter().map(|e| e.revision).collect();
    assert_eq!(history, vec![Revision(3), Revision(4)]);
    assert_eq!(engine.kv_get(&b, &key(2)).await.unwrap().unwrap().revision, Revision(2));
    // Survives a reopen like any write.
    engine.close().await.unwrap();
    let engine = EmbeddedEngine::open(dir.path()).unwrap();
    assert_eq!(engine.kv_get(&b, &key(1)).await.unwrap().unwrap().value, value(4, 8));
    assert_eq!(engine.kv_keys(&b, "").await.unwrap(), vec![key(1), key(2)]);
    engine.close().await.unwrap();
}

#[tokio::test]
async fn a_batch_with_a_bad_entry_writes_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let engine = EmbeddedEngine::open(dir.path()).unwrap();
    let b = bucket("strict");
    let mut config = BucketConfig::new(b.clone());
    config.max_value_size = Some(16);
    engine.create_bucket(config).await.unwrap();
    let err = engine.kv_put_batch(&b, vec![(key(1), value(1, 8)), (key(2), value(2, 17))]).await.unwrap_err();
    assert_eq!(err.kind(), ErrorKind::TooLarge);
    assert!(err.message().contains("entry 1"), "{err}");
    assert_eq!(engine.kv_get(&b, &key(1)).await.unwrap(), None);
    assert_eq!(engine.bucket_info(&b).await.unwrap().last_revision, Revision(0));
    let err = engine.kv_put_batch(&bucket("missing"), vec![(key(1), value(1, 8))]).await.unwrap_err();
    assert_eq!(err.kind(), ErrorKind::NotFound);
    // A byte cap could stop a batch half way: refused whole.
    let capped = bucket("capped");
    let mut config = BucketConfig::new(capped.clone());
    config.max_bytes = Some(1 << 20);
    engine.create_bucket(config).await.unwrap();
    let err = engine.kv_put_batch(&capped, vec![(key(1), value(1, 8))]).await.unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Invalid);
    engine.close().await.unwrap();
}

/// Regression: with values read from disk, an `always` write that trims
/// the key's only older revision removes it from disk at commit, before
/// the write is visible. A get in between must still answer the old value
/// (kept in memory until the write is revealed), never nothing.
#[tokio::test]
async fn a_get_finds_the_replaced_value_while_its_replacement_waits_for_its_fsync() {
    let dir = tempfile::tempdir().unwrap();
    let engine = EmbeddedEngine::open(dir.path()).unwrap();
    let b = bucket("reg");
    engine.create_bucket(BucketConfig::new(b.clone())).await.unwrap(); // history 1, sync always
    assert_eq!(engine.kv_put(&b, &key(1), value(1, 8)).await.unwrap(), Revision(1));
    // Created first: creating waits for an fsync.
    let barrier = bucket("barrier");
    let mut config = BucketConfig::new(barrier.clone());
    config.sync = SyncPolicy::Never;
    engine.create_bucket(config).await.unwrap();
    let hold = engine.hold_fsyncs();
    let k1 = key(1);
    let put = engine.kv_put(&b, &k1, value(2, 8));
    let mut put = std::pin::pin!(put);
    assert!(futures::poll!(put.as_mut()).is_pending());
    // A `never` write is acked once the writer committed it, and the
    // writer takes requests in order: the put above is committed now.
    engine.kv_put(&barrier, &key(0), value(0, 8)).await.unwrap();
    assert!(futures::poll!(put.as_mut()).is_pending(), "not acked before its fsync");
    for _ in 0..3 {
        let got = engine.kv_get(&b, &key(1)).await.unwrap().expect("the replaced value is still visible");
        assert_eq!((got.revision, got.value), (Revision(1), value(1, 8)));
    }
    drop(hold);
    assert_eq!(put.await.unwrap(), Revision(2));
    let got = engine.kv_get(&b, &key(1)).await.unwrap().unwrap();
    assert_eq!((got.revision, got.value), (Revision(2), value(2, 8)));
    assert_eq!(engine.kv_history(&b, &key(1)).await.unwrap().len(), 1, "revision 1 is gone from disk");
}
