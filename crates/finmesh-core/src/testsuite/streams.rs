//! Stream lifecycle: create (idempotent, conflicting, overlapping, invalid),
//! update, info, list, delete and purge.

use crate::testsuite::support::*;
use crate::testsuite::{Harness, as_reported_stream};
use crate::{BucketConfig, ConsumerConfig, ErrorKind, ReadRequest, Seq, StreamState};

/// A new stream is empty: first_seq 1, last_seq 0 (JetStream's convention),
/// and reports the configuration it was given.
pub async fn create_stream_starts_empty<H: Harness>() {
    let h = H::start().await;
    let e = h.engine();
    let config = stream_config("ORDERS", &["orders.>", "audit.*"]);
    let info = e.create_stream(config.clone()).await.unwrap();
    assert_eq!(info.config, as_reported_stream::<H>(config));
    let want =
        StreamState { messages: 0, bytes: 0, first_seq: Seq(1), last_seq: Seq(0), first_time: None, last_time: None };
    assert_eq!(info.state, want);
    assert_eq!(e.stream_info(&sn("ORDERS")).await.unwrap(), info);
}

/// Creating again with the same configuration returns the existing stream,
/// data included.
pub async fn create_stream_is_idempotent<H: Harness>() {
    let h = H::start().await;
    let e = h.engine();
    let s = orders(&*e).await;
    publish_one(&*e, &s, "orders.1", "x").await;
    let again = e.create_stream(stream_config("ORDERS", &["orders.>"])).await.unwrap();
    assert_eq!(again.state.messages, 1);
    assert_eq!(again.state.last_seq, Seq(1));
}

/// Same name, other configuration: `AlreadyExists`, and the stream is unchanged.
pub async fn create_stream_with_other_config_is_already_exists<H: Harness>() {
    let h = H::start().await;
    let e = h.engine();
    let s = orders(&*e).await;
    let mut other = stream_config("ORDERS", &["orders.>"]);
    other.max_msgs = Some(10);
    expect_kind(e.create_stream(other).await, ErrorKind::AlreadyExists);
    let other_subjects = stream_config("ORDERS", &["orders.eu.>"]);
    expect_kind(e.create_stream(other_subjects).await, ErrorKind::AlreadyExists);
    assert_eq!(
        e.stream_info(&s).await.unwrap().config,
        as_reported_stream::<H>(stream_config("ORDERS", &["orders.>"]))
    );
}

/// Subjects overlapping another stream's are `Invalid`; a literal that the
/// other stream's `>` does not reach is fine.
pub async fn create_stream_with_overlapping_subjects_is_invalid<H: Harness>() {
    let h = H::start().await;
    let e = h.engine();
    orders(&*e).await;
    for subjects in [&["orders.eu.*"][..], &["orders.>"], &["x.y", "orders.*.z"], &["*.eu"]] {
        let r = e.create_stream(stream_config("EU", subjects)).await;
        expect_kind(r, ErrorKind::Invalid);
    }
    expect_kind(e.stream_info(&sn("EU")).await, ErrorKind::NotFound);
    // `orders.>` needs at least one more token, so plain `orders` is free.
    e.create_stream(stream_config("ROOT", &["orders"])).await.unwrap();
}

/// A configuration that fails validation is `Invalid` and creates nothing.
pub async fn create_stream_with_invalid_config_is_invalid<H: Harness>() {
    let h = H::start().await;
    let e = h.engine();
    let mut c = stream_config("ORDERS", &["orders.>"]);
    c.max_msgs = Some(0);
    expect_kind(e.create_stream(c).await, ErrorKind::Invalid);
    expect_kind(e.create_stream(stream_config("EMPTY", &[])).await, ErrorKind::Invalid);
    expect_kind(e.stream_info(&sn("ORDERS")).await, ErrorKind::NotFound);
    assert!(e.list_streams().await.unwrap().is_empty());
}

/// Regression (issue 21): a stream may not capture the engines' own
/// subjects (`$KV.…` values of other buckets, `$JS.…`, `$SYS.…`, `_INBOX.…`
/// replies), by a literal or a leading wildcard, at creation or by an
/// update: `Invalid`, nothing created or changed, and the bucket still works.
pub async fn create_stream_with_reserved_subjects_is_invalid<H: Harness>() {
    let h = H::start().await;
    let e = h.engine();
    e.create_bucket(BucketConfig::new(bucket("other"))).await.unwrap();
    let s = orders(&*e).await;
    for bad in ["_INBOX.>", "$KV.other.>", "$KV.>", "$JS.API.>", "$SYS.>", ">", "*.>", "*.*.*"] {
        expect_kind(e.create_stream(stream_config("SPY", &[bad])).await, ErrorKind::Invalid);
        expect_kind(e.update_stream(stream_config("ORDERS", &["orders.>", bad])).await, ErrorKind::Invalid);
    }
    expect_kind(e.stream_info(&sn("SPY")).await, ErrorKind::NotFound);
    assert_eq!(e.list_streams().await.unwrap(), vec![s.clone()]);
    assert_eq!(
        e.stream_info(&s).await.unwrap().config,
        as_reported_stream::<H>(stream_config("ORDERS", &["orders.>"]))
    );
    let rev = e.kv_put(&bucket("other"), &key("k"), "v".into()).await.unwrap();
    assert_eq!(e.kv_get(&bucket("other"), &key("k")).await.unwrap().unwrap().revision, rev);
}

/// Every stream operation on a stream that does not exist is `NotFound`.
pub async fn missing_stream_is_not_found<H: Harness>() {
    let h = H::start().await;
    let e = h.engine();
    let s = sn("NOPE");
    use ErrorKind::NotFound;
    expect_kind(e.stream_info(&s).await, NotFound);
    expect_kind(e.delete_stream(&s).await, NotFound);
    expect_kind(e.purge_stream(&s).await, NotFound);
    expect_kind(e.publish(&s, out("nope.a", "x")).await, NotFound);
    expect_kind(e.publish_batch(&s, vec![out("nope.a", "x")]).await, NotFound);
    expect_kind(e.get_message(&s, Seq(1)).await, NotFound);
    expect_kind(e.read(&s, ReadRequest::from_seq(Seq(0), 10)).await, NotFound);
    expect_kind(e.last_message(&s, &subj("nope.a")).await, NotFound);
    expect_kind(e.last_per_subject(&s, None).await, NotFound);
    match e.tail(&s, Seq(0), None).await {
        Ok(_) => panic!("tail of a missing stream must fail"),
        Err(err) => assert_eq!(err.kind(), NotFound, "{err:?}"),
    }
    expect_kind(e.list_consumers(&s).await, NotFound);
}

/// Lowering a limit applies retention at once.
pub async fn update_stream_applies_retention_at_once<H: Harness>() {
    let h = H::start().await;
    let e = h.engine();
    let s = orders(&*e).await;
    publish_n(&*e, &s, "orders.a", 5).await;
    let mut c = stream_config("ORDERS", &["orders.>"]);
    c.max_msgs = Some(2);
    let info = e.update_stream(c.clone()).await.unwrap();
    assert_eq!(info.config, as_reported_stream::<H>(c));
    assert_eq!((info.state.messages, info.state.first_seq, info.state.last_seq), (2, Seq(4), Seq(5)));
    assert_eq!(seqs(&read_all(&*e, &s).await), vec![4, 5]);
    expect_kind(e.get_message(&s, Seq(1)).await, ErrorKind::NotFound);
    // The new limit holds for later publishes too.
    publish_one(&*e, &s, "orders.a", "x").await;
    assert_eq!(seqs(&read_all(&*e, &s).await), vec![5, 6]);
}

/// Subjects can be added and removed; overlapping another stream is `Invalid`.
pub async fn update_stream_changes_subjects<H: Harness>() {
    let h = H::start().await;
    let e = h.engine();
    let s = orders(&*e).await;
    e.create_stream(stream_config("AUDIT", &["audit.>"])).await.unwrap();
    e.update_stream(stream_config("ORDERS", &["orders.>", "trades.>"])).await.unwrap();
    assert_eq!(publish_one(&*e, &s, "trades.x", "t").await, Seq(1));
    e.update_stream(stream_config("ORDERS", &["trades.>"])).await.unwrap();
    expect_kind(e.publish(&s, out("orders.x", "o")).await, ErrorKind::Invalid);
    expect_kind(e.update_stream(stream_config("ORDERS", &["trades.>", "audit.x"])).await, ErrorKind::Invalid);
    assert_eq!(e.stream_info(&s).await.unwrap().config.subjects, vec![pat("trades.>")]);
    assert_eq!(e.stream_info(&s).await.unwrap().state.messages, 1);
}

/// `update_stream` of an absent stream is `NotFound` and creates nothing.
pub async fn update_missing_stream_is_not_found<H: Harness>() {
    let h = H::start().await;
    let e = h.engine();
    expect_kind(e.update_stream(stream_config("ORDERS", &["orders.>"])).await, ErrorKind::NotFound);
    expect_kind(e.stream_info(&sn("ORDERS")).await, ErrorKind::NotFound);
}

/// Streams are listed sorted by name; KV buckets' backing streams are not listed.
pub async fn list_streams_is_sorted_and_excludes_buckets<H: Harness>() {
    let h = H::start().await;
    let e = h.engine();
    assert!(e.list_streams().await.unwrap().is_empty());
    for (name, subject) in [("B", "b.>"), ("C", "c.>"), ("A", "a.>")] {
        e.create_stream(stream_config(name, &[subject])).await.unwrap();
    }
    e.create_bucket(BucketConfig::new(bucket("cards"))).await.unwrap();
    assert_eq!(e.list_streams().await.unwrap(), vec![sn("A"), sn("B"), sn("C")]);
    e.delete_stream(&sn("B")).await.unwrap();
    assert_eq!(e.list_streams().await.unwrap(), vec![sn("A"), sn("C")]);
}

/// Delete removes messages and consumers; a stream created again under the
/// same name starts from scratch.
pub async fn delete_stream_removes_messages_and_consumers<H: Harness>() {
    let h = H::start().await;
    let e = h.engine();
    let s = orders(&*e).await;
    publish_n(&*e, &s, "orders.a", 3).await;
    e.create_consumer(&s, ConsumerConfig::new(cname("worker"))).await.unwrap();
    e.delete_stream(&s).await.unwrap();
    expect_kind(e.stream_info(&s).await, ErrorKind::NotFound);
    expect_kind(e.consumer_info(&s, &cname("worker")).await, ErrorKind::NotFound);
    expect_kind(e.delete_stream(&s).await, ErrorKind::NotFound);
    let info = orders_info(&*e).await;
    assert_eq!((info.messages, info.last_seq), (0, Seq(0)));
    assert!(e.list_consumers(&s).await.unwrap().is_empty());
    expect_kind(e.consumer_info(&s, &cname("worker")).await, ErrorKind::NotFound);
    assert_eq!(publish_one(&*e, &s, "orders.a", "x").await, Seq(1));
}

/// The epoch names a stream's history: it is set at creation, stays while
/// the stream lives (writes, purge), and changes when the stream is deleted
/// and created again, so a subscriber can tell reused sequences apart.
pub async fn epoch_changes_only_when_the_stream_is_recreated<H: Harness>() {
    let h = H::start().await;
    let e = h.engine();
    let created = e.create_stream(stream_config("ORDERS", &["orders.>"])).await.unwrap();
    assert_ne!(created.epoch, 0, "no epoch reported");
    let s = sn("ORDERS");
    publish_n(&*e, &s, "orders.a", 2).await;
    e.purge_stream(&s).await.unwrap();
    assert_eq!(e.stream_info(&s).await.unwrap().epoch, created.epoch);
    e.delete_stream(&s).await.unwrap();
    let again = e.create_stream(stream_config("ORDERS", &["orders.>"])).await.unwrap();
    assert_ne!(again.epoch, created.epoch, "a recreated stream kept its epoch");
    assert_eq!(e.stream_info(&s).await.unwrap().epoch, again.epoch);
}

async fn orders_info(e: &dyn crate::Engine) -> StreamState {
    orders(e).await;
    e.stream_info(&sn("ORDERS")).await.unwrap().state
}

/// Purge removes every message and reports how many; sequences continue.
pub async fn purge_removes_everything_and_sequences_continue<H: Harness>() {
    let h = H::start().await;
    let e = h.engine();
    let s = orders(&*e).await;
    publish_n(&*e, &s, "orders.a", 3).await;
    assert_eq!(e.purge_stream(&s).await.unwrap(), 3);
    let st = e.stream_info(&s).await.unwrap().state;
    assert_eq!((st.messages, st.bytes, st.first_seq, st.last_seq), (0, 0, Seq(4), Seq(3)));
    // JetStream keeps `last_time` (like `last_seq`) after a purge, so only
    // `first_time` is asserted.
    assert_eq!(st.first_time, None);
    assert!(read_all(&*e, &s).await.is_empty());
    expect_kind(e.get_message(&s, Seq(3)).await, ErrorKind::NotFound);
    expect_kind(e.last_message(&s, &subj("orders.a")).await, ErrorKind::NotFound);
    assert_eq!(e.purge_stream(&s).await.unwrap(), 0);
    assert_eq!(publish_one(&*e, &s, "orders.a", "after").await, Seq(4));
    assert_eq!(seqs(&read_all(&*e, &s).await), vec![4]);
}
