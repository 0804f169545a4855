//! Reading stored messages: by sequence (first, past the end), by range and
//! limit, by wildcard filter, by time, the last message of a subject and the
//! last message of every subject.

use std::time::Duration;

use crate::testsuite::Harness;
use crate::testsuite::support::*;
use crate::{ErrorKind, ReadRequest, Seq, Timestamp};

/// An empty stream reads as empty everywhere.
pub async fn empty_stream_reads<H: Harness>() {
    let h = H::start().await;
    let e = h.engine();
    let s = orders(&*e).await;
    assert!(read_all(&*e, &s).await.is_empty());
    assert!(e.read(&s, ReadRequest::from_seq(Seq(1), 10)).await.unwrap().is_empty());
    assert!(e.read(&s, ReadRequest::from_time(Timestamp(0), 10)).await.unwrap().is_empty());
    assert!(e.last_per_subject(&s, None).await.unwrap().is_empty());
    expect_kind(e.last_message(&s, &subj("orders.a")).await, ErrorKind::NotFound);
    expect_kind(e.get_message(&s, Seq(1)).await, ErrorKind::NotFound);
}

/// `get_message` of `Seq(0)` (never a sequence) and of sequences not yet
/// assigned is `NotFound`.
pub async fn get_message_seq_zero_and_past_end_are_not_found<H: Harness>() {
    let h = H::start().await;
    let e = h.engine();
    let s = orders(&*e).await;
    publish_n(&*e, &s, "orders.a", 2).await;
    for seq in [0, 3, 1_000_000] {
        expect_kind(e.get_message(&s, Seq(seq)).await, ErrorKind::NotFound);
    }
    assert_eq!(e.get_message(&s, Seq(2)).await.unwrap().payload, "m2");
}

/// `Seq(0)` reads from the first stored message; a start past the end reads
/// nothing; a start before the first stored one starts at the first.
pub async fn read_from_seq_zero_and_past_end<H: Harness>() {
    let h = H::start().await;
    let e = h.engine();
    let mut c = stream_config("ORDERS", &["orders.>"]);
    c.max_msgs = Some(3);
    e.create_stream(c).await.unwrap();
    let s = sn("ORDERS");
    publish_n(&*e, &s, "orders.a", 5).await;
    let from = |seq: u64| ReadRequest::from_seq(Seq(seq), 100);
    assert_eq!(seqs(&e.read(&s, from(0)).await.unwrap()), vec![3, 4, 5]);
    assert_eq!(seqs(&e.read(&s, from(1)).await.unwrap()), vec![3, 4, 5]);
    assert_eq!(seqs(&e.read(&s, from(4)).await.unwrap()), vec![4, 5]);
    assert_eq!(seqs(&e.read(&s, from(5)).await.unwrap()), vec![5]);
    assert!(e.read(&s, from(6)).await.unwrap().is_empty());
    assert!(e.read(&s, from(1_000)).await.unwrap().is_empty());
}

/// `end` is inclusive and `limit` bounds the count.
pub async fn read_respects_end_and_limit<H: Harness>() {
    let h = H::start().await;
    let e = h.engine();
    let s = orders(&*e).await;
    publish_n(&*e, &s, "orders.a", 10).await;
    let r = |start: u64, limit: usize| ReadRequest::from_seq(Seq(start), limit);
    assert_eq!(seqs(&e.read(&s, r(3, 4)).await.unwrap()), vec![3, 4, 5, 6]);
    assert_eq!(seqs(&e.read(&s, r(3, 100).end(Seq(5))).await.unwrap()), vec![3, 4, 5]);
    assert_eq!(seqs(&e.read(&s, r(3, 2).end(Seq(5))).await.unwrap()), vec![3, 4]);
    assert_eq!(seqs(&e.read(&s, r(7, 100).end(Seq(7))).await.unwrap()), vec![7]);
    assert!(e.read(&s, r(7, 100).end(Seq(6))).await.unwrap().is_empty());
    assert_eq!(seqs(&e.read(&s, r(8, 100).end(Seq(50))).await.unwrap()), vec![8, 9, 10]);
    let msgs = e.read(&s, r(9, 1)).await.unwrap();
    assert_eq!((msgs.len(), &msgs[0].payload[..]), (1, &b"m9"[..]));
}

/// `*` matches exactly one token, `>` one or more; the limit counts matches.
pub async fn read_with_wildcard_filters<H: Harness>() {
    let h = H::start().await;
    let e = h.engine();
    let s = orders(&*e).await;
    for subject in ["orders.eu.a", "orders.us.a", "orders.eu.b", "orders.eu.a.x", "orders.eu", "orders.eu.c"] {
        publish_one(&*e, &s, subject, subject).await;
    }
    let read = |filter: &str, limit: usize| {
        let e = e.clone();
        let s = s.clone();
        let filter = pat(filter);
        async move { seqs(&e.read(&s, ReadRequest::from_seq(Seq(0), limit).filter(filter)).await.unwrap()) }
    };
    assert_eq!(read("orders.eu.*", 100).await, vec![1, 3, 6]);
    assert_eq!(read("orders.eu.>", 100).await, vec![1, 3, 4, 6]);
    assert_eq!(read("orders.*.a", 100).await, vec![1, 2]);
    assert_eq!(read("orders.*", 100).await, vec![5]);
    assert_eq!(read("orders.eu.a", 100).await, vec![1]);
    assert_eq!(read(">", 100).await, vec![1, 2, 3, 4, 5, 6]);
    assert_eq!(read("orders.eu.*", 2).await, vec![1, 3]);
    assert!(read("orders.asia.*", 100).await.is_empty());
    let from2 = ReadRequest::from_seq(Seq(2), 100).filter(pat("orders.eu.*")).end(Seq(5));
    assert_eq!(seqs(&e.read(&s, from2).await.unwrap()), vec![3]);
}

/// A time start returns the messages stored at or after that time.
pub async fn read_from_time<H: Harness>() {
    let h = H::start().await;
    let e = h.engine();
    let s = orders(&*e).await;
    publish_n(&*e, &s, "orders.a", 3).await;
    let t = Timestamp::now();
    publish_n(&*e, &s, "orders.a", 2).await;
    let all = read_all(&*e, &s).await;
    let want: Vec<u64> = all.iter().filter(|m| m.time >= t).map(|m| m.seq.0).collect();
    assert!(want.ends_with(&[4, 5]), "messages published after {t:?} are at or after it: {all:?}");
    assert_eq!(seqs(&e.read(&s, ReadRequest::from_time(t, 100)).await.unwrap()), want);
    // From a stored message's own time: that message is included.
    let t3 = all[2].time;
    let want3: Vec<u64> = all.iter().filter(|m| m.time >= t3).map(|m| m.seq.0).collect();
    assert!(want3.contains(&3), "a message is stored at or after its own time");
    assert_eq!(seqs(&e.read(&s, ReadRequest::from_time(t3, 100)).await.unwrap()), want3);
    assert_eq!(seqs(&e.read(&s, ReadRequest::from_time(Timestamp(0), 100)).await.unwrap()), vec![1, 2, 3, 4, 5]);
    let future = Timestamp::now().saturating_add(Duration::from_secs(3600));
    assert!(e.read(&s, ReadRequest::from_time(future, 100)).await.unwrap().is_empty());
    let limited = e.read(&s, ReadRequest::from_time(Timestamp(0), 2)).await.unwrap();
    assert_eq!(seqs(&limited), vec![1, 2]);
}

/// The last message of a literal subject; `NotFound` for a subject without one.
pub async fn last_message_of_subject<H: Harness>() {
    let h = H::start().await;
    let e = h.engine();
    let s = orders(&*e).await;
    publish_one(&*e, &s, "orders.a", "a1").await;
    publish_one(&*e, &s, "orders.b", "b1").await;
    publish_one(&*e, &s, "orders.a", "a2").await;
    let a = e.last_message(&s, &subj("orders.a")).await.unwrap();
    assert_eq!((a.seq, &a.payload[..]), (Seq(3), &b"a2"[..]));
    assert_eq!(e.last_message(&s, &subj("orders.b")).await.unwrap().seq, Seq(2));
    expect_kind(e.last_message(&s, &subj("orders.c")).await, ErrorKind::NotFound);
    expect_kind(e.last_message(&s, &subj("orders.a.deeper")).await, ErrorKind::NotFound);
}

/// The last message of every matching subject, in sequence order.
pub async fn last_per_subject_with_filters<H: Harness>() {
    let h = H::start().await;
    let e = h.engine();
    let s = orders(&*e).await;
    for subject in ["orders.eu.a", "orders.us.a", "orders.eu.b", "orders.eu.a", "orders.eu.a.x", "orders.us.a"] {
        publish_one(&*e, &s, subject, subject).await;
    }
    let lps = |filter: Option<&str>| {
        let e = e.clone();
        let s = s.clone();
        let filter = filter.map(pat);
        async move { seqs(&e.last_per_subject(&s, filter.as_ref()).await.unwrap()) }
    };
    assert_eq!(lps(None).await, vec![3, 4, 5, 6]);
    assert_eq!(lps(Some(">")).await, vec![3, 4, 5, 6]);
    assert_eq!(lps(Some("orders.eu.*")).await, vec![3, 4]);
    assert_eq!(lps(Some("orders.eu.>")).await, vec![3, 4, 5]);
    assert_eq!(lps(Some("orders.*.a")).await, vec![4, 6]);
    assert_eq!(lps(Some("orders.us.a")).await, vec![6]);
    assert!(lps(Some("orders.asia.>")).await.is_empty());
    let last = e.last_per_subject(&s, Some(&pat("orders.eu.a"))).await.unwrap();
    assert_eq!(&last[0].payload[..], b"orders.eu.a");
}
