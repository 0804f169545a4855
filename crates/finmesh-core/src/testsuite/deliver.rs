//! Where consumers start (deliver policies all, new, from sequence, from
//! time, last per subject) and which messages they see (subject filters
//! with wildcards).

use std::time::Duration;

use crate::testsuite::Harness;
use crate::testsuite::support::*;
use crate::{ConsumerConfig, DeliverPolicy, Seq, Timestamp};

const LONG: Duration = Duration::from_secs(30);

fn config(name: &str, deliver: DeliverPolicy, filter: Option<&str>) -> ConsumerConfig {
    ConsumerConfig { deliver, filter: filter.map(pat), ..consumer_config(name, LONG) }
}

/// All: every stored message (from the first still stored), then new ones.
pub async fn deliver_all<H: Harness>() {
    let h = H::start().await;
    let e = h.engine();
    let mut sc = stream_config("ORDERS", &["orders.>"]);
    sc.max_msgs = Some(3);
    e.create_stream(sc).await.unwrap();
    let s = sn("ORDERS");
    publish_n(&*e, &s, "orders.a", 5).await;
    let c = cname("c");
    let info = e.create_consumer(&s, config("c", DeliverPolicy::All, None)).await.unwrap();
    assert_eq!(info.num_pending, 3);
    assert_eq!(delivered_seqs(&fetch(&*e, &s, &c, 10, Duration::ZERO).await), vec![3, 4, 5]);
    publish_n(&*e, &s, "orders.a", 1).await;
    assert_eq!(delivered_seqs(&fetch_exactly(&*e, &s, &c, 1).await), vec![6]);
}

/// New: only messages published after the consumer was created.
pub async fn deliver_new<H: Harness>() {
    let h = H::start().await;
    let e = h.engine();
    let s = orders(&*e).await;
    publish_n(&*e, &s, "orders.a", 3).await;
    let c = cname("c");
    let info = e.create_consumer(&s, config("c", DeliverPolicy::New, None)).await.unwrap();
    assert_eq!(info.num_pending, 0);
    assert!(fetch(&*e, &s, &c, 10, Duration::from_millis(100)).await.is_empty());
    publish_n(&*e, &s, "orders.a", 2).await;
    assert_eq!(delivered_seqs(&fetch_exactly(&*e, &s, &c, 2).await), vec![4, 5]);
}

/// From a sequence: that message on; a start past the end waits for it.
pub async fn deliver_from_seq<H: Harness>() {
    let h = H::start().await;
    let e = h.engine();
    let s = orders(&*e).await;
    publish_n(&*e, &s, "orders.a", 5).await;
    let (mid, ahead) = (cname("mid"), cname("ahead"));
    let info = e.create_consumer(&s, config("mid", DeliverPolicy::FromSeq { seq: Seq(3) }, None)).await.unwrap();
    assert_eq!(info.num_pending, 3);
    e.create_consumer(&s, config("ahead", DeliverPolicy::FromSeq { seq: Seq(8) }, None)).await.unwrap();
    assert_eq!(delivered_seqs(&fetch(&*e, &s, &mid, 10, Duration::ZERO).await), vec![3, 4, 5]);
    assert!(fetch(&*e, &s, &ahead, 10, Duration::ZERO).await.is_empty());
    publish_n(&*e, &s, "orders.a", 3).await;
    assert_eq!(delivered_seqs(&fetch_exactly(&*e, &s, &ahead, 1).await), vec![8]);
    assert_eq!(delivered_seqs(&fetch_exactly(&*e, &s, &mid, 3).await), vec![6, 7, 8]);
}

/// From a time: the first message stored at or after it, on.
pub async fn deliver_from_time<H: Harness>() {
    let h = H::start().await;
    let e = h.engine();
    let s = orders(&*e).await;
    publish_n(&*e, &s, "orders.a", 3).await;
    let t = Timestamp::now();
    publish_n(&*e, &s, "orders.a", 2).await;
    let want: Vec<u64> = read_all(&*e, &s).await.iter().filter(|m| m.time >= t).map(|m| m.seq.0).collect();
    assert!(want.ends_with(&[4, 5]));
    let c = cname("c");
    e.create_consumer(&s, config("c", DeliverPolicy::FromTime { time: t }, None)).await.unwrap();
    assert_eq!(delivered_seqs(&fetch(&*e, &s, &c, 10, Duration::ZERO).await), want);
    let future = Timestamp::now().saturating_add(Duration::from_secs(3600));
    let later = cname("later");
    e.create_consumer(&s, config("later", DeliverPolicy::FromTime { time: future }, None)).await.unwrap();
    assert!(fetch(&*e, &s, &later, 10, Duration::ZERO).await.is_empty());
}

/// Last per subject: the last message of each (matching) subject in
/// sequence order, then everything new.
pub async fn deliver_last_per_subject<H: Harness>() {
    let h = H::start().await;
    let e = h.engine();
    let s = orders(&*e).await;
    for subject in ["orders.a", "orders.b", "orders.a", "orders.c", "orders.b"] {
        publish_one(&*e, &s, subject, subject).await;
    }
    let (all, only_a) = (cname("all"), cname("only-a"));
    e.create_consumer(&s, config("all", DeliverPolicy::LastPerSubject, None)).await.unwrap();
    e.create_consumer(&s, config("only-a", DeliverPolicy::LastPerSubject, Some("orders.a"))).await.unwrap();
    assert_eq!(delivered_seqs(&fetch(&*e, &s, &all, 10, Duration::ZERO).await), vec![3, 4, 5]);
    assert_eq!(delivered_seqs(&fetch(&*e, &s, &only_a, 10, Duration::ZERO).await), vec![3]);
    publish_one(&*e, &s, "orders.b", "new b").await;
    publish_one(&*e, &s, "orders.a", "new a").await;
    assert_eq!(delivered_seqs(&fetch_exactly(&*e, &s, &all, 2).await), vec![6, 7]);
    assert_eq!(delivered_seqs(&fetch_exactly(&*e, &s, &only_a, 1).await), vec![7]);
}

/// Filters with `*` and `>` select stored and new messages; `num_pending`
/// counts matching messages only.
pub async fn filtered_consumer_with_wildcards<H: Harness>() {
    let h = H::start().await;
    let e = h.engine();
    let s = orders(&*e).await;
    for subject in ["orders.eu.a", "orders.us.a", "orders.eu.b", "orders.eu.a.x"] {
        publish_one(&*e, &s, subject, subject).await;
    }
    let cases = [
        ("star", "orders.eu.*", vec![1, 3]),
        ("tail", "orders.eu.>", vec![1, 3, 4]),
        ("mid", "orders.*.a", vec![1, 2]),
    ];
    for (name, filter, want) in &cases {
        let info = e.create_consumer(&s, config(name, DeliverPolicy::All, Some(filter))).await.unwrap();
        assert_eq!(info.num_pending, want.len() as u64, "num_pending of {filter}");
        assert_eq!(&delivered_seqs(&fetch(&*e, &s, &cname(name), 10, Duration::ZERO).await), want, "{filter}");
    }
    publish_one(&*e, &s, "orders.us.b", "x").await;
    publish_one(&*e, &s, "orders.eu.c", "x").await;
    assert_eq!(delivered_seqs(&fetch_exactly(&*e, &s, &cname("star"), 1).await), vec![6]);
    assert_eq!(delivered_seqs(&fetch_exactly(&*e, &s, &cname("tail"), 1).await), vec![6]);
    assert!(fetch(&*e, &s, &cname("mid"), 10, Duration::from_millis(100)).await.is_empty());
    assert_eq!(e.consumer_info(&s, &cname("mid")).await.unwrap().num_pending, 0);
}
