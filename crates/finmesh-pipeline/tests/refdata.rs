//! Reference data: the same test bodies on every `RefStore` backend (the
//! embedded and NATS engines, and Redis with feature `redis`), against real
//! servers.

use std::sync::Arc;
use std::time::{Duration, Instant as StdInstant};

use bytes::Bytes;
use finmesh_core::{Error, ErrorKind, Result, Timestamp};
use finmesh_embedded::EmbeddedEngine;
use finmesh_pipeline::refdata::{
    EngineRefStore, MAX_REF_KEY_LEN, Pin, RefCache, RefRow, RefStore, decode_key, encode_key,
};
use tokio::time::Instant;

/// A store and whatever keeps its backend alive.
struct Fixture {
    store: Arc<dyn RefStore>,
    _keep: Box<dyn std::any::Any + Send>,
}

async fn embedded() -> Fixture {
    let dir = tempfile::tempdir().unwrap();
    let engine = Arc::new(EmbeddedEngine::open(dir.path()).expect("open the embedded engine"));
    let store = EngineRefStore::open(engine).await.unwrap();
    Fixture { store: Arc::new(store), _keep: Box::new(dir) }
}

async fn nats() -> Fixture {
    let server = finmesh_testkit::NatsServer::start().await.expect("start nats-server");
    let options = finmesh_nats::NatsEngineOptions::new(server.url());
    let engine = finmesh_nats::NatsEngine::connect(options).await.expect("connect the NATS engine");
    let store = EngineRefStore::open(Arc::new(engine)).await.unwrap();
    Fixture { store: Arc::new(store), _keep: Box::new(server) }
}

#[cfg(feature = "redis")]
async fn redis() -> Fixture {
    let server = finmesh_testkit::RedisServer::start().await.expect("start redis-server");
    let store = finmesh_pipeline::refdata::RedisRefStore::connect(&server.url()).await.unwrap();
    Fixture { store: Arc::new(store), _keep: Box::new(server) }
}

/// Run `body` on every backend.
macro_rules! on_every_store {
    ($($name:ident),* $(,)?) => {$(
        mod $name {
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn embedded() {
                super::$name(super::embedded().await).await
            }
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn nats() {
                super::$name(super::nats().await).await
            }
            #[cfg(feature = "redis")]
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn redis() {
                super::$name(super::redis().await).await
            }
        }
    )*};
}

on_every_store!(
    as_of_resolution_picks_the_latest_version_at_or_before_the_pin,
    a_half_loaded_version_is_invisible_and_a_reload_replaces_it,
    a_cancelled_load_is_invisible,
    a_waiting_run_proceeds_when_its_version_completes,
    a_waiting_run_times_out_visibly,
    reloading_a_complete_version_is_a_no_op,
    a_large_version_loads,
    hostile_names_keys_and_versions,
);

fn us(n: u64) -> Timestamp {
    Timestamp(n * 1000)
}

fn rows(pairs: &[(&str, &str)]) -> Vec<Result<RefRow>> {
    pairs.iter().map(|(k, v)| Ok(((*k).to_owned(), Bytes::from((*v).to_owned())))).collect()
}

async fn load(store: &dyn RefStore, dataset: &str, version: Timestamp, pairs: &[(&str, &str)]) {
    let mut it = rows(pairs).into_iter();
    let report = store.load_version(dataset, version, &mut it).await.unwrap();
    assert!(!report.already_complete);
    assert_eq!(report.rows, pairs.len() as u64);
}

async fn remote(store: &dyn RefStore, dataset: &str, key: &str, pinned: Timestamp) -> Option<String> {
    store.lookup_remote(dataset, key, pinned).await.unwrap().map(|b| String::from_utf8(b.to_vec()).unwrap())
}

async fn as_of_resolution_picks_the_latest_version_at_or_before_the_pin(f: Fixture) {
    let s = &*f.store;
    load(s, "ccy", us(100), &[("EUR", "1.10"), ("GBP", "1.30"), ("JPY", "0.007")]).await;
    load(s, "ccy", us(200), &[("EUR", "1.20"), ("GBP", "1.31")]).await; // JPY dropped
    load(s, "ccy", us(300), &[("EUR", "1.30"), ("GBP", "1.32"), ("JPY", "0.009")]).await;
    load(s, "other", us(150), &[("EUR", "other")]).await;

    assert_eq!(s.versions("ccy").await.unwrap(), vec![us(100), us(200), us(300)]);
    assert_eq!(s.versions("other").await.unwrap(), vec![us(150)]);
    assert_eq!(s.versions("none").await.unwrap(), vec![]);
    assert_eq!(s.resolve("ccy", Timestamp(99_999)).await.unwrap(), None, "before the first");
    assert_eq!(s.resolve("ccy", us(100)).await.unwrap(), Some(us(100)), "exactly at a version");
    assert_eq!(s.resolve("ccy", Timestamp(199_999)).await.unwrap(), Some(us(100)));
    assert_eq!(s.resolve("ccy", Timestamp(250_500)).await.unwrap(), Some(us(200)));
    assert_eq!(s.resolve("ccy", Timestamp(u64::MAX)).await.unwrap(), Some(us(300)));

    assert_eq!(remote(s, "ccy", "EUR", Timestamp(99_999)).await, None);
    assert_eq!(remote(s, "ccy", "EUR", Timestamp(150_000)).await.as_deref(), Some("1.10"));
    assert_eq!(remote(s, "ccy", "EUR", us(200)).await.as_deref(), Some("1.20"));
    assert_eq!(remote(s, "ccy", "JPY", Timestamp(250_000)).await, None, "absent from the version pinned");
    assert_eq!(remote(s, "ccy", "JPY", us(300)).await.as_deref(), Some("0.009"));
    assert_eq!(remote(s, "ccy", "CHF", us(300)).await, None);
    assert_eq!(remote(s, "other", "EUR", us(300)).await.as_deref(), Some("other"));

    let snap = s.snapshot("ccy", us(200)).await.unwrap();
    assert_eq!(snap.len(), 2);
    assert_eq!(snap.get("EUR").map(|b| &b[..]), Some(&b"1.20"[..]));
    assert!(!snap.contains("JPY"));
    let e = s.snapshot("ccy", us(250)).await.unwrap_err();
    assert_eq!(e.kind(), ErrorKind::NotFound, "{e}");

    // The cache answers the same, from memory.
    let cache = RefCache::new(f.store.clone());
    let deadline = Instant::now() + Duration::from_secs(10);
    let a = cache.pin("ccy", Pin::AsOf(Timestamp(250_000)), deadline).await.unwrap();
    assert_eq!(a.version, us(200));
    let b = cache.pin("ccy", Pin::Version(us(200)), deadline).await.unwrap();
    assert!(Arc::ptr_eq(&a, &b), "runs pinned to the same version share one snapshot");
    assert_eq!(cache.cached_versions(), 1);
    let e = cache.pin("ccy", Pin::AsOf(Timestamp(5)), deadline).await.unwrap_err();
    assert_eq!(e.kind(), ErrorKind::NotFound, "{e}");
    drop((a, b));
    assert_eq!(cache.evict_unused(), 1);
}

/// Rows, then a read error after `n` of them.
fn failing_after(n: usize) -> impl Iterator<Item = Result<RefRow>> + Send {
    (0..).map(move |i| {
        if i < n {
            Ok((format!("k{i}"), Bytes::from(format!("partial-{i}"))))
        } else {
            Err(Error::invalid("the file ends early"))
        }
    })
}

async fn a_half_loaded_version_is_invisible_and_a_reload_replaces_it(f: Fixture) {
    let s = &*f.store;
    load(s, "books", us(10), &[("k1", "old-1"), ("k2", "old-2")]).await;
    let mut broken = failing_after(2500);
    let e = s.load_version("books", us(20), &mut broken).await.unwrap_err();
    assert_eq!(e.message(), "the file ends early");

    assert_eq!(s.versions("books").await.unwrap(), vec![us(10)], "the partial version is not listed");
    assert!(!s.is_complete("books", us(20)).await.unwrap());
    assert_eq!(s.resolve("books", us(25)).await.unwrap(), Some(us(10)));
    assert_eq!(remote(s, "books", "k1", us(25)).await.as_deref(), Some("old-1"), "falls back to the previous version");
    assert_eq!(remote(s, "books", "k2000", us(25)).await, None, "partial rows are never seen");
    assert_eq!(s.snapshot("books", us(20)).await.unwrap_err().kind(), ErrorKind::NotFound);

    // Loading the version again replaces the partial rows entirely.
    load(s, "books", us(20), &[("k1", "new-1"), ("k9", "new-9")]).await;
    assert_eq!(s.versions("books").await.unwrap(), vec![us(10), us(20)]);
    let snap = s.snapshot("books", us(20)).await.unwrap();
    let mut keys: Vec<_> = snap.rows().keys().cloned().collect();
    keys.sort();
    assert_eq!(keys, ["k1", "k9"], "no partial row survives the reload");
    assert_eq!(remote(s, "books", "k2", us(25)).await, None, "k2 is not in the new version");
    assert_eq!(remote(s, "books", "k1", us(25)).await.as_deref(), Some("new-1"));
}

async fn a_cancelled_load_is_invisible(f: Fixture) {
    use std::sync::atomic::{AtomicBool, Ordering};
    let s = &*f.store;
    load(s, "books", us(10), &[("k1", "old-1")]).await;
    // The load is dropped at its first await after row 1500 was read (in
    // the middle of writing the second batch).
    let reached = Arc::new(AtomicBool::new(false));
    let mut rows = (0..5000).map({
        let reached = reached.clone();
        move |i| {
            if i == 1500 {
                reached.store(true, Ordering::SeqCst);
            }
            Ok((format!("k{i}"), Bytes::from(format!("cancelled-{i}"))))
        }
    });
    tokio::select! {
        biased;
        () = async { while !reached.load(Ordering::SeqCst) { tokio::task::yield_now().await } } => {}
        r = s.load_version("books", us(20), &mut rows) => panic!("the load was not cancelled: {r:?}"),
    }
    assert_eq!(s.versions("books").await.unwrap(), vec![us(10)]);
    assert_eq!(remote(s, "books", "k1", us(20)).await.as_deref(), Some("old-1"));
    assert_eq!(remote(s, "books", "k5", us(20)).await, None);
    load(s, "books", us(20), &[("k5", "new-5")]).await;
    let snap = s.snapshot("books", us(20)).await.unwrap();
    assert_eq!(snap.len(), 1, "no row of the cancelled load survives the reload");
    assert_eq!(snap.get("k5").map(|b| &b[..]), Some(&b"new-5"[..]));
}

async fn a_waiting_run_proceeds_when_its_version_completes(f: Fixture) {
    let cache = Arc::new(RefCache::with_poll_interval(f.store.clone(), Duration::from_millis(5)));
    let run = tokio::spawn({
        let cache = cache.clone();
        async move { cache.pin("books", Pin::Version(us(500)), Instant::now() + Duration::from_secs(30)).await }
    });
    // The run is visibly waiting; a partial load does not release it.
    let checks_after = |min: u64| {
        let cache = cache.clone();
        async move {
            let deadline = StdInstant::now() + Duration::from_secs(10);
            loop {
                let w = cache.waiting();
                if let Some(w) = w.first()
                    && w.checks >= min
                {
                    return w.clone();
                }
                assert!(StdInstant::now() < deadline, "the run never showed as waiting: {w:?}");
                tokio::task::yield_now().await;
            }
        }
    };
    let w = checks_after(1).await;
    assert_eq!((w.dataset.as_str(), w.version), ("books", us(500)));
    let mut broken = failing_after(10);
    f.store.load_version("books", us(500), &mut broken).await.unwrap_err();
    let seen = checks_after(1).await.checks;
    let w = checks_after(seen + 2).await; // it has looked at the partial version twice since
    assert!(!run.is_finished(), "released by a partial version: {w:?}");
    load(&*f.store, "books", us(500), &[("B1", "desk-1")]).await;
    let snap = tokio::time::timeout(Duration::from_secs(10), run).await.expect("released in time").unwrap().unwrap();
    assert_eq!(snap.version, us(500));
    assert_eq!(snap.get("B1").map(|b| &b[..]), Some(&b"desk-1"[..]));
    assert!(cache.waiting().is_empty(), "no longer listed as waiting");
}

async fn a_waiting_run_times_out_visibly(f: Fixture) {
    let cache = RefCache::with_poll_interval(f.store.clone(), Duration::from_millis(5));
    let e = cache.pin("books", Pin::Version(us(7)), Instant::now() + Duration::from_millis(50)).await.unwrap_err();
    assert_eq!(e.kind(), ErrorKind::Timeout, "{e}");
    assert!(e.message().contains("books"), "{e}");
    assert!(cache.waiting().is_empty(), "a finished wait is not listed");
}

async fn reloading_a_complete_version_is_a_no_op(f: Fixture) {
    let s = &*f.store;
    load(s, "ccy", us(1), &[("EUR", "1.1")]).await;
    let mut again = rows(&[("EUR", "9.9"), ("USD", "1")]).into_iter();
    let report = s.load_version("ccy", us(1), &mut again).await.unwrap();
    assert!(report.already_complete);
    assert_eq!(report.rows, 0);
    assert_eq!(s.versions("ccy").await.unwrap(), vec![us(1)]);
    assert_eq!(remote(s, "ccy", "EUR", us(1)).await.as_deref(), Some("1.1"), "a complete version is immutable");
    assert_eq!(remote(s, "ccy", "USD", us(1)).await, None);
}

async fn a_large_version_loads(f: Fixture) {
    const N: u64 = 100_000;
    let started = StdInstant::now();
    let mut it = (0..N).map(|i| Ok((format!("ISIN{i:08}"), Bytes::from(format!("{{\"book\":\"B{}\"}}", i % 97)))));
    let report = f.store.load_version("instruments", us(42), &mut it).await.unwrap();
    let load = started.elapsed();
    assert_eq!(report.rows, N);
    let started = StdInstant::now();
    let snap = f.store.snapshot("instruments", us(42)).await.unwrap();
    let read = started.elapsed();
    assert_eq!(snap.len() as u64, N);
    assert_eq!(snap.get("ISIN00012345").map(|b| &b[..]), Some(&br#"{"book":"B26"}"#[..]));
    println!(
        "loaded {N} rows in {load:?} ({:.0} rows/s); snapshot in {read:?} ({:.0} rows/s)",
        N as f64 / load.as_secs_f64(),
        N as f64 / read.as_secs_f64()
    );
}

async fn hostile_names_keys_and_versions(f: Fixture) {
    let s = &*f.store;
    for bad in ["", "a.b", "_x", "a b", "x:y", &"d".repeat(33)] {
        let mut it = rows(&[("k", "v")]).into_iter();
        let e = s.load_version(bad, us(1), &mut it).await.unwrap_err();
        assert_eq!(e.kind(), ErrorKind::Invalid, "{bad:?}: {e}");
        assert_eq!(s.versions(bad).await.unwrap_err().kind(), ErrorKind::Invalid, "{bad:?}");
    }
    // Versions have microsecond resolution.
    let mut it = rows(&[("k", "v")]).into_iter();
    let e = s.load_version("ds", Timestamp(1_500), &mut it).await.unwrap_err();
    assert_eq!(e.kind(), ErrorKind::Invalid, "{e}");

    // A key too long or empty refuses the load and leaves nothing visible.
    for bad in [String::new(), "k".repeat(MAX_REF_KEY_LEN + 1)] {
        let mut it = vec![Ok(("ok".to_owned(), Bytes::new())), Ok((bad.clone(), Bytes::from_static(b"v")))].into_iter();
        let e = s.load_version("ds", us(2), &mut it).await.unwrap_err();
        assert_eq!(e.kind(), ErrorKind::Invalid, "{e}");
    }
    assert_eq!(s.versions("ds").await.unwrap(), vec![]);

    // Keys the engine refuses as they are round-trip; duplicates: the last wins.
    let strange =
        ["a.b", "..", "=41", "_kvx", "a b/c", "€", "tab\there", "x:y", "\u{0}", &"é".repeat(MAX_REF_KEY_LEN / 2)];
    let mut pairs: Vec<(&str, &str)> = strange.iter().map(|k| (*k, "first")).collect();
    pairs.extend(strange.iter().map(|k| (*k, *k)));
    load(s, "ds", us(3), &pairs).await;
    let snap = s.snapshot("ds", us(3)).await.unwrap();
    assert_eq!(snap.len(), strange.len());
    for k in strange {
        assert_eq!(snap.get(k).map(|b| &b[..]), Some(k.as_bytes()), "{k:?}");
        assert_eq!(remote(s, "ds", k, us(3)).await.as_deref(), Some(k), "{k:?}");
        assert_eq!(decode_key(&encode_key(k)).as_deref(), Some(k));
    }
    // A lookup of a key that cannot exist is refused precisely.
    let e = s.lookup_remote("ds", "", us(3)).await.unwrap_err();
    assert_eq!(e.kind(), ErrorKind::Invalid, "{e}");
    // An empty version is a version.
    let mut none = std::iter::empty();
    s.load_version("ds", us(4), &mut none).await.unwrap();
    assert_eq!(s.resolve("ds", us(5)).await.unwrap(), Some(us(4)));
    assert!(s.snapshot("ds", us(4)).await.unwrap().is_empty());
}

/// A Redis that takes its time is waited for, not timed out: a load's
/// pipeline on a busy host takes longer than redis-rs's default response
/// timeout (500 ms), and a timed-out load fails a run for nothing.
#[cfg(feature = "redis")]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_redis_is_waited_for_not_timed_out() {
    let server = finmesh_testkit::RedisServer::start().await.expect("start redis-server");
    let store = finmesh_pipeline::refdata::RedisRefStore::connect(&server.url()).await.unwrap();
    load(&store, "ccy", us(100), &[("EUR", "1.10")]).await;
    // Every client's commands wait out the pause (the server answers none).
    let client = redis::Client::open(server.url()).unwrap();
    let mut admin = client.get_multiplexed_async_connection().await.unwrap();
    redis::cmd("CLIENT").arg("PAUSE").arg(1500).arg("ALL").query_async::<()>(&mut admin).await.unwrap();
    let started = StdInstant::now();
    assert_eq!(remote(&store, "ccy", "EUR", us(100)).await.as_deref(), Some("1.10"));
    let waited = started.elapsed();
    assert!(waited >= Duration::from_millis(1000), "the pause did not hold the lookup ({waited:?})");
}
