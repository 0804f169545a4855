//! KV buckets and plain operations: bucket lifecycle and validation, put,
//! get, get at a revision, delete (tombstone), purge, keys and history.
//! Compare-and-set, TTL and size limits are in [`super::kv_cas`].

use std::time::Duration;

use bytes::Bytes;

use crate::testsuite::support::*;
use crate::testsuite::{Harness, as_reported_bucket};
use crate::{BucketConfig, Engine, ErrorKind, KvEntry, KvOp, Revision, Timestamp, WatchStart};

/// A bucket `b` with the given history depth.
pub async fn bucket_with_history(e: &dyn Engine, history: u8) -> crate::BucketName {
    e.create_bucket(BucketConfig { history, ..BucketConfig::new(bucket("b")) }).await.unwrap();
    bucket("b")
}

fn ops(entries: &[KvEntry]) -> Vec<(u64, KvOp, &[u8])> {
    entries.iter().map(|x| (x.revision.0, x.op, &x.value[..])).collect()
}

/// History must be 1 to 64; an invalid bucket is not created.
pub async fn bucket_history_must_be_1_to_64<H: Harness>() {
    let h = H::start().await;
    let e = h.engine();
    for bad in [0, 65, 255] {
        let r = e.create_bucket(BucketConfig { history: bad, ..BucketConfig::new(bucket("b")) }).await;
        expect_kind(r, ErrorKind::Invalid);
    }
    expect_kind(e.bucket_info(&bucket("b")).await, ErrorKind::NotFound);
    for (name, good) in [("one", 1), ("max", 64)] {
        let info = e.create_bucket(BucketConfig { history: good, ..BucketConfig::new(bucket(name)) }).await.unwrap();
        assert_eq!(info.config.history, good);
    }
    let r = e.update_bucket(BucketConfig { history: 65, ..BucketConfig::new(bucket("one")) }).await;
    expect_kind(r, ErrorKind::Invalid);
    assert_eq!(e.bucket_info(&bucket("one")).await.unwrap().config.history, 1);
}

/// Same config again returns the bucket (data kept); another config is
/// `AlreadyExists`.
pub async fn create_bucket_is_idempotent_and_conflicts<H: Harness>() {
    let h = H::start().await;
    let e = h.engine();
    let config = BucketConfig { history: 3, ..BucketConfig::new(bucket("b")) };
    let info = e.create_bucket(config.clone()).await.unwrap();
    let reported = as_reported_bucket::<H>(config.clone());
    assert_eq!((info.config.clone(), info.entries, info.last_revision), (reported.clone(), 0, Revision(0)));
    e.kv_put(&bucket("b"), &key("k"), Bytes::from("v")).await.unwrap();
    let again = e.create_bucket(config.clone()).await.unwrap();
    assert_eq!((again.entries, again.last_revision), (1, Revision(1)));
    let other = BucketConfig { history: 4, ..config.clone() };
    expect_kind(e.create_bucket(other).await, ErrorKind::AlreadyExists);
    let other_ttl = BucketConfig { ttl: Some(Duration::from_secs(60)), ..config.clone() };
    expect_kind(e.create_bucket(other_ttl).await, ErrorKind::AlreadyExists);
    assert_eq!(e.bucket_info(&bucket("b")).await.unwrap().config, reported);
}

/// List (sorted), info, update and delete; a bucket created again after
/// delete starts empty.
pub async fn bucket_lifecycle<H: Harness>() {
    let h = H::start().await;
    let e = h.engine();
    assert!(e.list_buckets().await.unwrap().is_empty());
    for name in ["zeta", "alpha", "mid"] {
        e.create_bucket(BucketConfig::new(bucket(name))).await.unwrap();
    }
    assert_eq!(e.list_buckets().await.unwrap(), vec![bucket("alpha"), bucket("mid"), bucket("zeta")]);
    let b = bucket("mid");
    e.kv_put(&b, &key("k1"), Bytes::from("v")).await.unwrap();
    e.kv_put(&b, &key("k2"), Bytes::from("v")).await.unwrap();
    let info = e.bucket_info(&b).await.unwrap();
    assert_eq!((info.entries, info.last_revision), (2, Revision(2)));
    assert!(info.bytes > 0);
    let updated = BucketConfig { history: 10, ..BucketConfig::new(b.clone()) };
    let reported = as_reported_bucket::<H>(updated.clone());
    assert_eq!(e.update_bucket(updated).await.unwrap().config, reported);
    assert_eq!(e.bucket_info(&b).await.unwrap().config, reported);
    e.delete_bucket(&b).await.unwrap();
    expect_kind(e.bucket_info(&b).await, ErrorKind::NotFound);
    expect_kind(e.delete_bucket(&b).await, ErrorKind::NotFound);
    assert_eq!(e.list_buckets().await.unwrap(), vec![bucket("alpha"), bucket("zeta")]);
    let fresh = e.create_bucket(BucketConfig::new(b.clone())).await.unwrap();
    assert_eq!((fresh.entries, fresh.last_revision), (0, Revision(0)));
    assert_eq!(e.kv_get(&b, &key("k1")).await.unwrap(), None);
}

/// Every operation on a missing bucket is `NotFound`.
pub async fn missing_bucket_is_not_found<H: Harness>() {
    let h = H::start().await;
    let e = h.engine();
    let (b, k, v) = (bucket("nope"), key("k"), Bytes::from("v"));
    use ErrorKind::NotFound;
    expect_kind(e.bucket_info(&b).await, NotFound);
    expect_kind(e.update_bucket(BucketConfig::new(b.clone())).await, NotFound);
    expect_kind(e.delete_bucket(&b).await, NotFound);
    expect_kind(e.kv_get(&b, &k).await, NotFound);
    expect_kind(e.kv_get_revision(&b, &k, Revision(1)).await, NotFound);
    expect_kind(e.kv_put(&b, &k, v.clone()).await, NotFound);
    expect_kind(e.kv_create(&b, &k, v.clone()).await, NotFound);
    expect_kind(e.kv_update(&b, &k, v, Revision(0)).await, NotFound);
    expect_kind(e.kv_delete(&b, &k).await, NotFound);
    expect_kind(e.kv_purge(&b, &k).await, NotFound);
    expect_kind(e.kv_keys(&b, "").await, NotFound);
    expect_kind(e.kv_history(&b, &k).await, NotFound);
    match e.kv_watch(&b, "", WatchStart::New).await {
        Ok(_) => panic!("watch of a missing bucket must fail"),
        Err(err) => assert_eq!(err.kind(), NotFound, "{err:?}"),
    }
    assert!(e.list_buckets().await.unwrap().is_empty());
}

/// Put returns increasing revisions; get returns the latest live value;
/// a key never written is `None`; empty values are values.
pub async fn put_and_get<H: Harness>() {
    let h = H::start().await;
    let e = h.engine();
    let b = bucket_with_history(&*e, 1).await;
    let before = Timestamp::now().saturating_sub(Duration::from_secs(1));
    assert_eq!(e.kv_put(&b, &key("a"), Bytes::from("1")).await.unwrap(), Revision(1));
    assert_eq!(e.kv_put(&b, &key("a"), Bytes::from("2")).await.unwrap(), Revision(2));
    assert_eq!(e.kv_put(&b, &key("empty"), Bytes::new()).await.unwrap(), Revision(3));
    let after = Timestamp::now().saturating_add(Duration::from_secs(1));
    let a = e.kv_get(&b, &key("a")).await.unwrap().expect("a has a value");
    assert_eq!((a.key.clone(), &a.value[..], a.revision, a.op), (key("a"), &b"2"[..], Revision(2), KvOp::Put));
    assert!(before <= a.created && a.created <= after, "created {:?}", a.created);
    let empty = e.kv_get(&b, &key("empty")).await.unwrap().expect("an empty value is a value");
    assert!(empty.value.is_empty());
    assert_eq!(e.kv_get(&b, &key("never")).await.unwrap(), None);
    let info = e.bucket_info(&b).await.unwrap();
    assert_eq!((info.entries, info.last_revision), (2, Revision(3)));
}

/// `kv_get_revision` returns the key's entry at exactly that revision, of
/// any op, while it is kept.
pub async fn get_at_revision<H: Harness>() {
    let h = H::start().await;
    let e = h.engine();
    let b = bucket_with_history(&*e, 5).await;
    let (a, other) = (key("a"), key("other"));
    e.kv_put(&b, &a, Bytes::from("1")).await.unwrap();
    e.kv_put(&b, &other, Bytes::from("x")).await.unwrap();
    e.kv_put(&b, &a, Bytes::from("2")).await.unwrap();
    e.kv_delete(&b, &a).await.unwrap();
    let at = |r: u64| {
        let (e, b, a) = (e.clone(), b.clone(), a.clone());
        async move { e.kv_get_revision(&b, &a, Revision(r)).await.unwrap().map(|x| (x.op, x.value)) }
    };
    assert_eq!(at(1).await, Some((KvOp::Put, Bytes::from("1"))));
    assert_eq!(at(3).await, Some((KvOp::Put, Bytes::from("2"))));
    assert_eq!(at(4).await, Some((KvOp::Delete, Bytes::new())));
    assert_eq!(at(2).await, None, "revision 2 belongs to another key");
    assert_eq!(at(99).await, None);
    // Revisions beyond the history depth are gone.
    let one = bucket("one");
    e.create_bucket(BucketConfig::new(one.clone())).await.unwrap();
    let r1 = e.kv_put(&one, &a, Bytes::from("old")).await.unwrap();
    let r2 = e.kv_put(&one, &a, Bytes::from("new")).await.unwrap();
    assert_eq!(e.kv_get_revision(&one, &a, r1).await.unwrap(), None);
    assert_eq!(e.kv_get_revision(&one, &a, r2).await.unwrap().unwrap().value, "new");
}

/// Delete writes a tombstone: get is `None`, keys skip it, history shows it.
pub async fn delete_leaves_a_tombstone<H: Harness>() {
    let h = H::start().await;
    let e = h.engine();
    let b = bucket_with_history(&*e, 5).await;
    let a = key("a");
    e.kv_put(&b, &a, Bytes::from("1")).await.unwrap();
    e.kv_put(&b, &a, Bytes::from("2")).await.unwrap();
    e.kv_put(&b, &key("b"), Bytes::from("x")).await.unwrap();
    assert_eq!(e.kv_delete(&b, &a).await.unwrap(), Revision(4));
    assert_eq!(e.kv_get(&b, &a).await.unwrap(), None);
    assert_eq!(e.kv_keys(&b, "").await.unwrap(), vec![key("b")]);
    let hist = e.kv_history(&b, &a).await.unwrap();
    assert_eq!(ops(&hist), vec![(1, KvOp::Put, &b"1"[..]), (2, KvOp::Put, &b"2"[..]), (4, KvOp::Delete, &b""[..])]);
    assert!(hist.iter().all(|x| x.key == a));
    let info = e.bucket_info(&b).await.unwrap();
    assert_eq!((info.entries, info.last_revision), (4, Revision(4)));
    assert_eq!(e.kv_put(&b, &a, Bytes::from("3")).await.unwrap(), Revision(5));
    assert_eq!(e.kv_get(&b, &a).await.unwrap().unwrap().value, "3");
}

/// Purge replaces the key's whole history with one purge marker.
pub async fn purge_collapses_history<H: Harness>() {
    let h = H::start().await;
    let e = h.engine();
    let b = bucket_with_history(&*e, 5).await;
    let a = key("a");
    for v in ["1", "2", "3"] {
        e.kv_put(&b, &a, Bytes::from(v)).await.unwrap();
    }
    e.kv_put(&b, &key("b"), Bytes::from("x")).await.unwrap();
    assert_eq!(e.kv_purge(&b, &a).await.unwrap(), Revision(5));
    assert_eq!(ops(&e.kv_history(&b, &a).await.unwrap()), vec![(5, KvOp::Purge, &b""[..])]);
    assert_eq!(e.kv_get(&b, &a).await.unwrap(), None);
    assert_eq!(e.kv_get_revision(&b, &a, Revision(2)).await.unwrap(), None);
    assert_eq!(e.kv_get(&b, &key("b")).await.unwrap().unwrap().value, "x");
    let info = e.bucket_info(&b).await.unwrap();
    assert_eq!((info.entries, info.last_revision), (2, Revision(5)));
    assert_eq!(e.kv_keys(&b, "").await.unwrap(), vec![key("b")]);
}

/// Keys with a live value starting with a plain string prefix, sorted.
pub async fn keys_by_prefix<H: Harness>() {
    let h = H::start().await;
    let e = h.engine();
    let b = bucket_with_history(&*e, 1).await;
    assert!(e.kv_keys(&b, "").await.unwrap().is_empty());
    for k in ["a.3", "b.1", "a.1", "ab", "a.2", "abc.x"] {
        e.kv_put(&b, &key(k), Bytes::from(k)).await.unwrap();
    }
    e.kv_delete(&b, &key("a.2")).await.unwrap();
    e.kv_purge(&b, &key("abc.x")).await.unwrap();
    let keys = |prefix: &'static str| {
        let (e, b) = (e.clone(), b.clone());
        async move { e.kv_keys(&b, prefix).await.unwrap().iter().map(|k| k.to_string()).collect::<Vec<_>>() }
    };
    assert_eq!(keys("").await, ["a.1", "a.3", "ab", "b.1"]);
    assert_eq!(keys("a.").await, ["a.1", "a.3"]);
    assert_eq!(keys("a").await, ["a.1", "a.3", "ab"]);
    assert_eq!(keys("ab").await, ["ab"]);
    assert!(keys("zzz").await.is_empty());
}

/// History keeps the last `history` revisions of a key, markers included;
/// a key without entries has an empty history.
pub async fn history_is_bounded<H: Harness>() {
    let h = H::start().await;
    let e = h.engine();
    let b = bucket_with_history(&*e, 3).await;
    let a = key("a");
    assert!(e.kv_history(&b, &a).await.unwrap().is_empty());
    for i in 1..=5 {
        e.kv_put(&b, &a, Bytes::from(format!("v{i}"))).await.unwrap();
    }
    e.kv_put(&b, &key("other"), Bytes::from("x")).await.unwrap();
    let hist = e.kv_history(&b, &a).await.unwrap();
    assert_eq!(ops(&hist), vec![(3, KvOp::Put, &b"v3"[..]), (4, KvOp::Put, &b"v4"[..]), (5, KvOp::Put, &b"v5"[..])]);
    e.kv_delete(&b, &a).await.unwrap();
    let hist = e.kv_history(&b, &a).await.unwrap();
    assert_eq!(ops(&hist), vec![(4, KvOp::Put, &b"v4"[..]), (5, KvOp::Put, &b"v5"[..]), (7, KvOp::Delete, &b""[..])]);
    assert_eq!(e.bucket_info(&b).await.unwrap().entries, 4);
}

/// Lowering `history` trims every key's kept revisions at once.
pub async fn update_bucket_trims_history<H: Harness>() {
    let h = H::start().await;
    let e = h.engine();
    let b = bucket_with_history(&*e, 5).await;
    let a = key("a");
    for i in 1..=5 {
        e.kv_put(&b, &a, Bytes::from(format!("v{i}"))).await.unwrap();
    }
    let info = e.update_bucket(BucketConfig { history: 2, ..BucketConfig::new(b.clone()) }).await.unwrap();
    assert_eq!(info.config.history, 2);
    let revs = |h: Vec<KvEntry>| h.iter().map(|x| x.revision.0).collect::<Vec<_>>();
    assert_eq!(revs(e.kv_history(&b, &a).await.unwrap()), vec![4, 5]);
    e.kv_put(&b, &a, Bytes::from("v6")).await.unwrap();
    assert_eq!(revs(e.kv_history(&b, &a).await.unwrap()), vec![5, 6]);
    assert_eq!(e.bucket_info(&b).await.unwrap().entries, 2);
}
