//! KV watches: from a revision (markers included), latest values, new
//! changes only, and prefix filtering. Entries come in revision order, the
//! kept history first, then live changes, with nothing in between.

use std::time::Duration;

use bytes::Bytes;

use crate::testsuite::Harness;
use crate::testsuite::kv::bucket_with_history;
use crate::testsuite::support::*;
use crate::{BoxStream, KvEntry, KvOp, Revision, WatchStart};

const QUIET: Duration = Duration::from_millis(150);

async fn expect(w: &mut BoxStream<KvEntry>, k: &str, rev: u64, op: KvOp, value: &str) {
    let what = format!("watch entry {k}@{rev}");
    let x = next_entry(w, &what).await;
    assert_eq!((x.key.as_str(), x.revision, x.op, &x.value[..]), (k, Revision(rev), op, value.as_bytes()), "{what}");
}

/// From a revision: every kept entry from there on, delete and purge
/// markers included, then live changes.
pub async fn watch_from_revision_includes_deletes<H: Harness>() {
    let h = H::start().await;
    let e = h.engine();
    let b = bucket_with_history(&*e, 5).await;
    e.kv_put(&b, &key("a"), Bytes::from("1")).await.unwrap();
    e.kv_put(&b, &key("b"), Bytes::from("1")).await.unwrap();
    e.kv_delete(&b, &key("a")).await.unwrap();
    e.kv_put(&b, &key("c"), Bytes::from("1")).await.unwrap();
    let mut w = e.kv_watch(&b, "", WatchStart::FromRevision(Revision(2))).await.unwrap();
    let mut all = e.kv_watch(&b, "", WatchStart::FromRevision(Revision(1))).await.unwrap();
    expect(&mut all, "a", 1, KvOp::Put, "1").await;
    for w in [&mut w, &mut all] {
        expect(w, "b", 2, KvOp::Put, "1").await;
        expect(w, "a", 3, KvOp::Delete, "").await;
        expect(w, "c", 4, KvOp::Put, "1").await;
    }
    e.kv_put(&b, &key("a"), Bytes::from("2")).await.unwrap();
    e.kv_purge(&b, &key("b")).await.unwrap();
    for w in [&mut w, &mut all] {
        expect(w, "a", 5, KvOp::Put, "2").await;
        expect(w, "b", 6, KvOp::Purge, "").await;
        assert_quiet(w, QUIET, "nothing after the last change").await;
    }
}

/// Latest values: the latest entry of each key (delete markers included),
/// in revision order, then changes.
pub async fn watch_latest_values<H: Harness>() {
    let h = H::start().await;
    let e = h.engine();
    let b = bucket_with_history(&*e, 5).await;
    e.kv_put(&b, &key("a"), Bytes::from("1")).await.unwrap();
    e.kv_put(&b, &key("a"), Bytes::from("2")).await.unwrap();
    e.kv_put(&b, &key("b"), Bytes::from("1")).await.unwrap();
    e.kv_delete(&b, &key("b")).await.unwrap();
    e.kv_put(&b, &key("c"), Bytes::from("1")).await.unwrap();
    e.kv_put(&b, &key("a"), Bytes::from("3")).await.unwrap();
    let mut w = e.kv_watch(&b, "", WatchStart::LatestValues).await.unwrap();
    expect(&mut w, "b", 4, KvOp::Delete, "").await;
    expect(&mut w, "c", 5, KvOp::Put, "1").await;
    expect(&mut w, "a", 6, KvOp::Put, "3").await;
    e.kv_put(&b, &key("d"), Bytes::from("1")).await.unwrap();
    expect(&mut w, "d", 7, KvOp::Put, "1").await;
    assert_quiet(&mut w, QUIET, "latest values after the live change").await;
}

/// New: nothing from before the watch, every change after it.
pub async fn watch_new_only_changes<H: Harness>() {
    let h = H::start().await;
    let e = h.engine();
    let b = bucket_with_history(&*e, 5).await;
    e.kv_put(&b, &key("a"), Bytes::from("old")).await.unwrap();
    e.kv_put(&b, &key("b"), Bytes::from("old")).await.unwrap();
    let mut w = e.kv_watch(&b, "", WatchStart::New).await.unwrap();
    assert_quiet(&mut w, QUIET, "no history for a New watch").await;
    e.kv_put(&b, &key("a"), Bytes::from("new")).await.unwrap();
    e.kv_delete(&b, &key("b")).await.unwrap();
    e.kv_create(&b, &key("c"), Bytes::from("c")).await.unwrap();
    expect(&mut w, "a", 3, KvOp::Put, "new").await;
    expect(&mut w, "b", 4, KvOp::Delete, "").await;
    expect(&mut w, "c", 5, KvOp::Put, "c").await;
}

/// A prefix is a plain string prefix of the key, for history and changes.
pub async fn watch_filters_by_prefix<H: Harness>() {
    let h = H::start().await;
    let e = h.engine();
    let b = bucket_with_history(&*e, 5).await;
    for k in ["orders.1", "trades.1", "ordersX", "orders.2"] {
        e.kv_put(&b, &key(k), Bytes::from(k)).await.unwrap();
    }
    let mut dot = e.kv_watch(&b, "orders.", WatchStart::FromRevision(Revision(1))).await.unwrap();
    let mut plain = e.kv_watch(&b, "orders", WatchStart::LatestValues).await.unwrap();
    let mut new = e.kv_watch(&b, "trades.", WatchStart::New).await.unwrap();
    expect(&mut dot, "orders.1", 1, KvOp::Put, "orders.1").await;
    expect(&mut dot, "orders.2", 4, KvOp::Put, "orders.2").await;
    expect(&mut plain, "orders.1", 1, KvOp::Put, "orders.1").await;
    expect(&mut plain, "ordersX", 3, KvOp::Put, "ordersX").await;
    expect(&mut plain, "orders.2", 4, KvOp::Put, "orders.2").await;
    e.kv_put(&b, &key("trades.2"), Bytes::from("t")).await.unwrap();
    e.kv_delete(&b, &key("orders.1")).await.unwrap();
    expect(&mut dot, "orders.1", 6, KvOp::Delete, "").await;
    expect(&mut plain, "orders.1", 6, KvOp::Delete, "").await;
    expect(&mut new, "trades.2", 5, KvOp::Put, "t").await;
    assert_quiet(&mut new, QUIET, "trades. after trades.2").await;
    assert_quiet(&mut dot, QUIET, "orders. after the delete").await;
}
