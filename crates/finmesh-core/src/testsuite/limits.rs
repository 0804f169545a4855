//! Deduplication (inside and after the window, inside a batch) and
//! retention by each limit: `max_msgs`, `max_bytes`, `max_age`,
//! `max_msgs_per_subject`. Retention always discards the oldest.

use std::time::{Duration, Instant};

use crate::testsuite::support::*;
use crate::testsuite::{Difference, Harness, differs};
use crate::{ErrorKind, PubAck, Seq};

fn ack(seq: u64, duplicate: bool) -> PubAck {
    PubAck { seq: Seq(seq), duplicate }
}

/// A repeated message id inside the window is acked with the original's
/// sequence and `duplicate: true`, and nothing is stored.
pub async fn dedup_within_window_returns_original<H: Harness>() {
    let h = H::start().await;
    let e = h.engine();
    let s = orders(&*e).await;
    assert_eq!(e.publish(&s, with_id("orders.a", "original", "id-1")).await.unwrap(), ack(1, false));
    publish_one(&*e, &s, "orders.a", "plain").await;
    assert_eq!(e.publish(&s, with_id("orders.a", "again", "id-1")).await.unwrap(), ack(1, true));
    // Dedup is per stream, whatever the subject.
    assert_eq!(e.publish(&s, with_id("orders.b", "other", "id-1")).await.unwrap(), ack(1, true));
    assert_eq!(e.publish(&s, with_id("orders.a", "new", "id-2")).await.unwrap(), ack(3, false));
    let st = e.stream_info(&s).await.unwrap().state;
    assert_eq!((st.messages, st.last_seq), (3, Seq(3)));
    assert_eq!(e.get_message(&s, Seq(1)).await.unwrap().payload, "original");
    // Ids are per stream: another stream does not see id-1.
    e.create_stream(stream_config("OTHER", &["other.>"])).await.unwrap();
    assert_eq!(e.publish(&sn("OTHER"), with_id("other.a", "x", "id-1")).await.unwrap(), ack(1, false));
}

/// After `duplicate_window` the same id is stored again (and is then the
/// original for later duplicates).
pub async fn dedup_after_window_stores_again<H: Harness>() {
    let h = H::start().await;
    let e = h.engine();
    let mut c = stream_config("ORDERS", &["orders.>"]);
    c.duplicate_window = Duration::from_millis(200);
    e.create_stream(c).await.unwrap();
    let s = sn("ORDERS");
    let start = Instant::now();
    assert_eq!(e.publish(&s, with_id("orders.a", "first", "id")).await.unwrap(), ack(1, false));
    assert_eq!(e.publish(&s, with_id("orders.a", "dup", "id")).await.unwrap(), ack(1, true));
    // A duplicate stores nothing, so publishing again is a valid probe.
    let deadline = Duration::from_secs(3);
    let stored = loop {
        let a = e.publish(&s, with_id("orders.a", "second", "id")).await.unwrap();
        if !a.duplicate {
            break a;
        }
        assert_eq!(a.seq, Seq(1));
        assert!(start.elapsed() < deadline, "id still a duplicate {deadline:?} after a 200 ms window");
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    assert!(start.elapsed() >= Duration::from_millis(150), "window ended early: {:?}", start.elapsed());
    assert_eq!(stored, ack(2, false));
    assert_eq!(e.publish(&s, with_id("orders.a", "third", "id")).await.unwrap(), ack(2, true));
    assert_eq!(seqs(&read_all(&*e, &s).await), vec![1, 2]);
}

/// Ids seen before the batch and earlier in the same batch are duplicates;
/// the rest of the batch is stored with consecutive sequences.
pub async fn dedup_inside_batch<H: Harness>() {
    let h = H::start().await;
    let e = h.engine();
    let s = orders(&*e).await;
    e.publish(&s, with_id("orders.a", "x", "x")).await.unwrap();
    let batch = vec![
        with_id("orders.a", "y", "y"),
        with_id("orders.a", "x again", "x"),
        with_id("orders.a", "y again", "y"),
        out("orders.a", "no id"),
    ];
    let acks = e.publish_batch(&s, batch).await.unwrap();
    assert_eq!(acks, vec![ack(2, false), ack(1, true), ack(2, true), ack(3, false)]);
    let stored = read_all(&*e, &s).await;
    assert_eq!(seqs(&stored), vec![1, 2, 3]);
    assert_eq!(stored[1].payload, "y");
    assert_eq!(stored[2].payload, "no id");
}

/// Message ids are at most 256 bytes; a longer one is `Invalid`.
pub async fn msg_id_too_long_is_invalid<H: Harness>() {
    let h = H::start().await;
    let e = h.engine();
    let s = orders(&*e).await;
    expect_kind(e.publish(&s, with_id("orders.a", "x", &"i".repeat(257))).await, ErrorKind::Invalid);
    assert_eq!(e.stream_info(&s).await.unwrap().state.last_seq, Seq(0));
    assert_eq!(e.publish(&s, with_id("orders.a", "x", &"i".repeat(256))).await.unwrap(), ack(1, false));
}

/// An empty `Nats-Msg-Id` is `Invalid` on every engine (one cannot
/// deduplicate by nothing), alone or in a batch, and nothing is stored.
pub async fn empty_msg_id_is_invalid<H: Harness>() {
    let h = H::start().await;
    let e = h.engine();
    let s = orders(&*e).await;
    let empty_id = || {
        let mut m = out("orders.a", "x");
        m.headers.insert(crate::message::MSG_ID_HEADER, "").unwrap();
        m
    };
    expect_kind(e.publish(&s, empty_id()).await, ErrorKind::Invalid);
    expect_kind(e.publish_batch(&s, vec![out("orders.a", "ok"), empty_id()]).await, ErrorKind::Invalid);
    assert_eq!(e.stream_info(&s).await.unwrap().state.last_seq, Seq(0));
    assert!(out("orders.a", "x").with_msg_id("").is_err(), "the builder refuses it too");
}

/// `max_msgs` keeps the newest messages; removed ones are `NotFound`.
pub async fn retention_max_msgs<H: Harness>() {
    let h = H::start().await;
    let e = h.engine();
    let mut c = stream_config("ORDERS", &["orders.>"]);
    c.max_msgs = Some(3);
    e.create_stream(c).await.unwrap();
    let s = sn("ORDERS");
    publish_n(&*e, &s, "orders.a", 5).await;
    assert_eq!(seqs(&read_all(&*e, &s).await), vec![3, 4, 5]);
    let st = e.stream_info(&s).await.unwrap().state;
    assert_eq!((st.messages, st.first_seq, st.last_seq), (3, Seq(3), Seq(5)));
    expect_kind(e.get_message(&s, Seq(1)).await, ErrorKind::NotFound);
    expect_kind(e.get_message(&s, Seq(2)).await, ErrorKind::NotFound);
    assert_eq!(e.get_message(&s, Seq(3)).await.unwrap().payload, "m3");
}

/// `max_bytes` keeps the newest messages whose sizes fit, discarding only
/// as many old ones as needed.
pub async fn retention_max_bytes<H: Harness>() {
    let h = H::start().await;
    let e = h.engine();
    let mut c = stream_config("ORDERS", &["orders.>"]);
    c.max_bytes = Some(50);
    e.create_stream(c).await.unwrap();
    let s = sn("ORDERS");
    if differs::<H>(Difference::StoredBytesIncludeOverhead) {
        return retention_max_bytes_with_overhead(&*e, &s).await;
    }
    // "orders.a" (8) + 12 bytes = 20 bytes each: two fit in 50.
    for i in 1..=4 {
        e.publish(&s, out("orders.a", format!("payload-{i:04}"))).await.unwrap();
    }
    assert_eq!(seqs(&read_all(&*e, &s).await), vec![3, 4]);
    assert_eq!(e.stream_info(&s).await.unwrap().state.bytes, 40);
    // A 30-byte message pushes out one 20-byte message: 20 + 30 = 50.
    e.publish(&s, out("orders.a", vec![b'z'; 22])).await.unwrap();
    let st = e.stream_info(&s).await.unwrap().state;
    assert_eq!(seqs(&read_all(&*e, &s).await), vec![4, 5]);
    assert_eq!((st.messages, st.bytes, st.first_seq), (2, 50, Seq(4)));
    expect_kind(e.get_message(&s, Seq(3)).await, ErrorKind::NotFound);
}

/// [`retention_max_bytes`] for an engine that counts its own per-message
/// overhead ([`Difference::StoredBytesIncludeOverhead`]): the oldest
/// messages go first, the newest stays, and the count never passes the limit.
async fn retention_max_bytes_with_overhead(e: &dyn crate::Engine, s: &crate::StreamName) {
    for i in 1..=4 {
        e.publish(s, out("orders.a", format!("payload-{i:04}"))).await.unwrap();
    }
    for last in [4, 5] {
        if last == 5 {
            // Small, so it fits the limit with up to 36 bytes of overhead.
            e.publish(s, out("orders.a", vec![b'z'; 6])).await.unwrap();
        }
        let kept = seqs(&read_all(e, s).await);
        let first = *kept.first().expect("the newest message is kept");
        assert_eq!(kept, (first..=last).collect::<Vec<_>>(), "retention keeps the newest, without holes");
        assert!(first > 1, "max_bytes dropped nothing: {kept:?}");
        let st = e.stream_info(s).await.unwrap().state;
        assert!(st.bytes <= 50, "{} bytes stored, limit 50", st.bytes);
        assert_eq!((st.messages, st.first_seq), (kept.len() as u64, Seq(first)));
        expect_kind(e.get_message(s, Seq(first - 1)).await, ErrorKind::NotFound);
    }
}

/// Messages older than `max_age` disappear by themselves.
pub async fn retention_max_age<H: Harness>() {
    let h = H::start().await;
    let e = h.engine();
    let mut c = stream_config("ORDERS", &["orders.>"]);
    c.max_age = Some(Duration::from_millis(400));
    c.duplicate_window = Duration::from_millis(100);
    e.create_stream(c).await.unwrap();
    let s = sn("ORDERS");
    publish_n(&*e, &s, "orders.a", 2).await;
    assert_eq!(e.stream_info(&s).await.unwrap().state.messages, 2, "messages do not expire before max_age");
    eventually("messages expire after max_age", Duration::from_secs(4), || {
        let (e, s) = (e.clone(), s.clone());
        async move { e.stream_info(&s).await.unwrap().state.messages == 0 }
    })
    .await;
    expect_kind(e.get_message(&s, Seq(1)).await, ErrorKind::NotFound);
    assert!(read_all(&*e, &s).await.is_empty());
    let st = e.stream_info(&s).await.unwrap().state;
    assert_eq!((st.first_seq, st.last_seq, st.bytes), (Seq(3), Seq(2), 0));
    assert_eq!(publish_one(&*e, &s, "orders.a", "fresh").await, Seq(3));
}

/// `max_msgs_per_subject` keeps the newest messages of each subject.
pub async fn retention_max_msgs_per_subject<H: Harness>() {
    let h = H::start().await;
    let e = h.engine();
    let mut c = stream_config("ORDERS", &["orders.>"]);
    c.max_msgs_per_subject = Some(2);
    e.create_stream(c).await.unwrap();
    let s = sn("ORDERS");
    for subject in ["orders.a", "orders.a", "orders.b", "orders.a", "orders.b", "orders.b", "orders.c"] {
        publish_one(&*e, &s, subject, subject).await;
    }
    assert_eq!(seqs(&read_all(&*e, &s).await), vec![2, 4, 5, 6, 7]);
    let st = e.stream_info(&s).await.unwrap().state;
    assert_eq!((st.messages, st.first_seq, st.last_seq), (5, Seq(2), Seq(7)));
    expect_kind(e.get_message(&s, Seq(3)).await, ErrorKind::NotFound);
    assert_eq!(seqs(&e.last_per_subject(&s, None).await.unwrap()), vec![4, 6, 7]);
}

/// A purge starts every subject's count afresh: after it, each subject
/// keeps its newest `max_msgs_per_subject` messages, counted from the
/// purge, with limits of one (the trim that drops a subject's one message
/// by what the subject's last entry names) and of two.
pub async fn purge_resets_max_msgs_per_subject<H: Harness>() {
    let h = H::start().await;
    let e = h.engine();
    for (name, keep) in [("ONE", 1), ("TWO", 2)] {
        let mut c = stream_config(name, &[&format!("{}.>", name.to_lowercase())]);
        c.max_msgs_per_subject = Some(keep);
        e.create_stream(c).await.unwrap();
        let s = sn(name);
        let (a, b) = (format!("{}.a", name.to_lowercase()), format!("{}.b", name.to_lowercase()));
        for subject in [&a, &a, &a, &b] {
            publish_one(&*e, &s, subject, "before").await;
        }
        assert_eq!(e.purge_stream(&s).await.unwrap(), keep + 1, "{name}");
        for subject in [&a, &a, &a, &b] {
            publish_one(&*e, &s, subject, "after").await;
        }
        let expected: Vec<u64> = if keep == 1 { vec![7, 8] } else { vec![6, 7, 8] };
        assert_eq!(seqs(&read_all(&*e, &s).await), expected, "{name}: a purged message counted against its subject");
        assert_eq!(e.stream_info(&s).await.unwrap().state.messages, keep + 1, "{name}");
        assert_eq!(seqs(&e.last_per_subject(&s, None).await.unwrap()), vec![7, 8], "{name}");
    }
}
