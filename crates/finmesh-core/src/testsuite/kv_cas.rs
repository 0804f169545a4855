//! KV compare-and-set (create if absent, update at a revision, with the
//! current revision reported on conflict), value size limits, a full bucket
//! (`max_bytes`), TTL expiry, and bucket-wide revisions.

use std::time::Duration;

use bytes::Bytes;

use crate::testsuite::Harness;
use crate::testsuite::kv::bucket_with_history;
use crate::testsuite::support::*;
use crate::{BucketConfig, Error, ErrorKind, Revision};

#[track_caller]
fn conflict(r: crate::Result<Revision>, current: u64) -> Error {
    let err = expect_kind(r, ErrorKind::WrongRevision);
    assert_eq!(err.current_revision(), Some(Revision(current)), "current revision reported by {err:?}");
    err
}

/// Create succeeds only when the key has no live value; a conflict names
/// the current revision and changes nothing.
pub async fn create_only_if_absent<H: Harness>() {
    let h = H::start().await;
    let e = h.engine();
    let b = bucket_with_history(&*e, 5).await;
    let a = key("a");
    assert_eq!(e.kv_create(&b, &a, Bytes::from("first")).await.unwrap(), Revision(1));
    conflict(e.kv_create(&b, &a, Bytes::from("second")).await, 1);
    e.kv_put(&b, &a, Bytes::from("put")).await.unwrap();
    conflict(e.kv_create(&b, &a, Bytes::from("third")).await, 2);
    assert_eq!(e.kv_get(&b, &a).await.unwrap().unwrap().value, "put");
    assert_eq!(e.kv_history(&b, &a).await.unwrap().len(), 2);
    assert_eq!(e.kv_create(&b, &key("b"), Bytes::from("b")).await.unwrap(), Revision(3));
}

/// A deleted or purged key has no live value, so create succeeds again.
pub async fn create_after_delete_or_purge_succeeds<H: Harness>() {
    let h = H::start().await;
    let e = h.engine();
    let b = bucket_with_history(&*e, 5).await;
    let a = key("a");
    assert_eq!(e.kv_create(&b, &a, Bytes::from("1")).await.unwrap(), Revision(1));
    assert_eq!(e.kv_delete(&b, &a).await.unwrap(), Revision(2));
    assert_eq!(e.kv_create(&b, &a, Bytes::from("2")).await.unwrap(), Revision(3));
    assert_eq!(e.kv_purge(&b, &a).await.unwrap(), Revision(4));
    assert_eq!(e.kv_create(&b, &a, Bytes::from("3")).await.unwrap(), Revision(5));
    conflict(e.kv_create(&b, &a, Bytes::from("4")).await, 5);
    assert_eq!(e.kv_get(&b, &a).await.unwrap().unwrap().value, "3");
}

/// A conditional delete writes its marker only at the key's latest
/// revision; two deletes at the same revision cannot both succeed.
pub async fn delete_if_checks_the_latest_revision<H: Harness>() {
    let h = H::start().await;
    let e = h.engine();
    let b = bucket_with_history(&*e, 5).await;
    let (a, c) = (key("a"), key("c"));
    e.kv_put(&b, &a, Bytes::from("1")).await.unwrap();
    e.kv_put(&b, &a, Bytes::from("2")).await.unwrap();
    conflict(e.kv_delete_if(&b, &a, Revision(1)).await, 2);
    assert_eq!(e.kv_get(&b, &a).await.unwrap().unwrap().value, "2", "a refused delete changes nothing");
    assert_eq!(e.kv_delete_if(&b, &a, Revision(2)).await.unwrap(), Revision(3));
    assert_eq!(e.kv_get(&b, &a).await.unwrap(), None);
    conflict(e.kv_delete_if(&b, &a, Revision(2)).await, 3);
    conflict(e.kv_delete_if(&b, &c, Revision(1)).await, 0);
    assert_eq!(e.kv_history(&b, &a).await.unwrap().len(), 3, "one marker, not two");
}

/// Update succeeds only at the key's latest revision (`Revision(0)`: the key
/// has no entry); a conflict names the current revision (0 if none).
pub async fn update_checks_the_latest_revision<H: Harness>() {
    let h = H::start().await;
    let e = h.engine();
    let b = bucket_with_history(&*e, 5).await;
    let (a, bk, c) = (key("a"), key("b"), key("c"));
    assert_eq!(e.kv_put(&b, &a, Bytes::from("1")).await.unwrap(), Revision(1));
    assert_eq!(e.kv_update(&b, &a, Bytes::from("2"), Revision(1)).await.unwrap(), Revision(2));
    conflict(e.kv_update(&b, &a, Bytes::from("stale"), Revision(1)).await, 2);
    conflict(e.kv_update(&b, &a, Bytes::from("as new"), Revision(0)).await, 2);
    assert_eq!(e.kv_update(&b, &bk, Bytes::from("b"), Revision(0)).await.unwrap(), Revision(3));
    conflict(e.kv_update(&b, &a, Bytes::from("other key's"), Revision(3)).await, 2);
    conflict(e.kv_update(&b, &c, Bytes::from("missing"), Revision(5)).await, 0);
    assert_eq!(e.kv_get(&b, &a).await.unwrap().unwrap().value, "2");
    assert_eq!(e.kv_get(&b, &c).await.unwrap(), None);
    assert_eq!(e.bucket_info(&b).await.unwrap().last_revision, Revision(3));
}

/// After delete or purge, the latest revision is the marker's, so that is
/// what update must name.
pub async fn update_of_deleted_key_needs_the_marker_revision<H: Harness>() {
    let h = H::start().await;
    let e = h.engine();
    let b = bucket_with_history(&*e, 5).await;
    let a = key("a");
    e.kv_put(&b, &a, Bytes::from("1")).await.unwrap();
    assert_eq!(e.kv_delete(&b, &a).await.unwrap(), Revision(2));
    conflict(e.kv_update(&b, &a, Bytes::from("x"), Revision(1)).await, 2);
    conflict(e.kv_update(&b, &a, Bytes::from("x"), Revision(0)).await, 2);
    assert_eq!(e.kv_update(&b, &a, Bytes::from("2"), Revision(2)).await.unwrap(), Revision(3));
    assert_eq!(e.kv_purge(&b, &a).await.unwrap(), Revision(4));
    conflict(e.kv_update(&b, &a, Bytes::from("x"), Revision(3)).await, 4);
    assert_eq!(e.kv_update(&b, &a, Bytes::from("3"), Revision(4)).await.unwrap(), Revision(5));
    assert_eq!(e.kv_get(&b, &a).await.unwrap().unwrap().value, "3");
}

/// Values over `max_value_size` are `TooLarge` for put, create and update,
/// and write nothing.
pub async fn value_too_large_writes_nothing<H: Harness>() {
    let h = H::start().await;
    let e = h.engine();
    let b = bucket("b");
    e.create_bucket(BucketConfig { max_value_size: Some(10), history: 3, ..BucketConfig::new(b.clone()) })
        .await
        .unwrap();
    let a = key("a");
    let big = Bytes::from(vec![b'x'; 11]);
    assert_eq!(e.kv_put(&b, &a, Bytes::from(vec![b'y'; 10])).await.unwrap(), Revision(1));
    expect_kind(e.kv_put(&b, &a, big.clone()).await, ErrorKind::TooLarge);
    expect_kind(e.kv_update(&b, &a, big.clone(), Revision(1)).await, ErrorKind::TooLarge);
    expect_kind(e.kv_create(&b, &key("new"), big).await, ErrorKind::TooLarge);
    let info = e.bucket_info(&b).await.unwrap();
    assert_eq!((info.entries, info.last_revision), (1, Revision(1)));
    assert_eq!(e.kv_get(&b, &a).await.unwrap().unwrap().value.len(), 10);
    assert_eq!(e.kv_get(&b, &key("new")).await.unwrap(), None);
}

/// A bucket at its `max_bytes` refuses a write that does not fit
/// (`TooLarge`, nothing written) instead of evicting other keys' values, as
/// JetStream KV (`discard: new`) does. A smaller value replacing a key's
/// only revision still fits; a higher limit makes room.
pub async fn full_bucket_refuses_writes_and_evicts_nothing<H: Harness>() {
    const MAX: u64 = 1024;
    let h = H::start().await;
    let e = h.engine();
    let b = bucket("b");
    let config = BucketConfig { max_bytes: Some(MAX), ..BucketConfig::new(b.clone()) };
    e.create_bucket(config.clone()).await.unwrap();
    let value = Bytes::from(vec![b'v'; 100]);
    let mut stored = Vec::new();
    let (refused, err) = loop {
        let k = key(&format!("k{}", stored.len()));
        match e.kv_put(&b, &k, value.clone()).await {
            Ok(_) => stored.push(k),
            Err(err) => break (k, err),
        }
        assert!(stored.len() <= 10, "ten 100-byte values do not fit in {MAX} bytes");
    };
    assert_eq!(err.kind(), ErrorKind::TooLarge, "{err:?}");
    assert!(stored.len() >= 5, "refused after {} values: {err:?}", stored.len());
    for k in &stored {
        assert_eq!(e.kv_get(&b, k).await.unwrap().map(|v| v.value), Some(value.clone()), "{k:?} evicted");
    }
    assert_eq!(e.kv_get(&b, &refused).await.unwrap(), None);
    expect_kind(e.kv_create(&b, &refused, value.clone()).await, ErrorKind::TooLarge);
    let info = e.bucket_info(&b).await.unwrap();
    assert_eq!(info.entries, stored.len() as u64);
    assert!(info.bytes <= MAX, "{} bytes stored", info.bytes);
    let smaller = Bytes::from(vec![b's'; 50]);
    e.kv_put(&b, &stored[0], smaller.clone()).await.unwrap();
    assert_eq!(e.kv_get(&b, &stored[0]).await.unwrap().map(|v| v.value), Some(smaller));
    e.update_bucket(BucketConfig { max_bytes: Some(4 * MAX), ..config }).await.unwrap();
    e.kv_create(&b, &refused, value.clone()).await.unwrap();
    assert_eq!(e.bucket_info(&b).await.unwrap().entries, stored.len() as u64 + 1);
}

/// Lowering a bucket's `max_bytes` below what it holds evicts nothing
/// (JetStream KV discards new, also on an update): every value stays
/// readable, and writes are refused until deletes make room.
pub async fn lowering_max_bytes_evicts_nothing<H: Harness>() {
    let h = H::start().await;
    let e = h.engine();
    let b = bucket("b");
    let config = BucketConfig { max_bytes: Some(64 * 1024), ..BucketConfig::new(b.clone()) };
    e.create_bucket(config.clone()).await.unwrap();
    let value = Bytes::from(vec![b'v'; 100]);
    let keys: Vec<_> = (0..20).map(|i| key(&format!("k{i}"))).collect();
    for k in &keys {
        e.kv_put(&b, k, value.clone()).await.unwrap();
    }
    let held = e.bucket_info(&b).await.unwrap().bytes;
    e.update_bucket(BucketConfig { max_bytes: Some(held / 2), ..config }).await.unwrap();
    for k in &keys {
        assert_eq!(e.kv_get(&b, k).await.unwrap().map(|v| v.value), Some(value.clone()), "{k:?} evicted");
    }
    assert_eq!(e.bucket_info(&b).await.unwrap().entries, keys.len() as u64);
    expect_kind(e.kv_put(&b, &key("new"), value.clone()).await, ErrorKind::TooLarge);
    assert_eq!(e.kv_get(&b, &key("new")).await.unwrap(), None);
}

/// Entries older than the TTL disappear (get, keys, history); revisions
/// continue after expiry.
pub async fn ttl_expires_values<H: Harness>() {
    let h = H::start().await;
    let e = h.engine();
    let b = bucket("b");
    let config = BucketConfig { ttl: Some(Duration::from_millis(300)), history: 2, ..BucketConfig::new(b.clone()) };
    e.create_bucket(config).await.unwrap();
    let a = key("a");
    e.kv_put(&b, &a, Bytes::from("1")).await.unwrap();
    let r2 = e.kv_put(&b, &a, Bytes::from("2")).await.unwrap();
    assert!(e.kv_get(&b, &a).await.unwrap().is_some(), "not expired before the TTL");
    eventually("value expires after its TTL", Duration::from_secs(4), || {
        let (e, b, a) = (e.clone(), b.clone(), a.clone());
        async move { e.kv_get(&b, &a).await.unwrap().is_none() }
    })
    .await;
    assert!(e.kv_keys(&b, "").await.unwrap().is_empty());
    eventually("history expires too", Duration::from_secs(4), || {
        let (e, b, a) = (e.clone(), b.clone(), a.clone());
        async move { e.kv_history(&b, &a).await.unwrap().is_empty() }
    })
    .await;
    let r3 = e.kv_create(&b, &a, Bytes::from("3")).await.unwrap();
    assert!(r3 > r2, "revisions continue after expiry: {r3} after {r2}");
    assert_eq!(e.kv_get(&b, &a).await.unwrap().unwrap().value, "3");
}

/// Every write in a bucket, whatever the key and op, gets a higher
/// revision than the one before; buckets count independently.
pub async fn revisions_increase_across_keys<H: Harness>() {
    let h = H::start().await;
    let e = h.engine();
    let b = bucket_with_history(&*e, 3).await;
    let (x, y, z) = (key("x"), key("y"), key("z"));
    let mut revs = vec![
        e.kv_put(&b, &x, Bytes::from("1")).await.unwrap(),
        e.kv_put(&b, &y, Bytes::from("1")).await.unwrap(),
        e.kv_delete(&b, &x).await.unwrap(),
        e.kv_create(&b, &z, Bytes::from("1")).await.unwrap(),
    ];
    let last_y = *revs.get(1).unwrap();
    revs.push(e.kv_update(&b, &y, Bytes::from("2"), last_y).await.unwrap());
    revs.push(e.kv_purge(&b, &z).await.unwrap());
    revs.push(e.kv_put(&b, &x, Bytes::from("2")).await.unwrap());
    assert!(revs[0] >= Revision(1));
    assert!(revs.windows(2).all(|w| w[0] < w[1]), "revisions not strictly increasing: {revs:?}");
    assert_eq!(e.bucket_info(&b).await.unwrap().last_revision, *revs.last().unwrap());
    let other = bucket("other");
    e.create_bucket(BucketConfig::new(other.clone())).await.unwrap();
    assert_eq!(e.kv_put(&other, &x, Bytes::from("1")).await.unwrap(), Revision(1));
}
