//! Tails: stored messages from a start sequence, then live ones, with no
//! gap and no duplicate at the join; [`TailEvent::Gap`] when history the tail
//! still had to deliver is gone; an error when the stream is deleted.

use std::time::Duration;

use futures::StreamExt;

use crate::testsuite::Harness;
use crate::testsuite::support::*;
use crate::{Seq, TailEvent};

const QUIET: Duration = Duration::from_millis(150);

/// From `Seq(0)` (and from `Seq(1)`): every stored message, then live ones.
pub async fn tail_from_start_then_live<H: Harness>() {
    let h = H::start().await;
    let e = h.engine();
    let s = orders(&*e).await;
    publish_n(&*e, &s, "orders.a", 3).await;
    let mut t0 = e.tail(&s, Seq(0), None).await.unwrap();
    let mut t1 = e.tail(&s, Seq(1), None).await.unwrap();
    for t in [&mut t0, &mut t1] {
        let m = next_message(t, "stored").await;
        assert_eq!((m.seq, &m.payload[..]), (Seq(1), &b"m1"[..]));
        assert_eq!(next_seqs(t, 2, "stored").await, vec![2, 3]);
    }
    publish_n(&*e, &s, "orders.b", 2).await;
    for t in [&mut t0, &mut t1] {
        let m = next_message(t, "live").await;
        assert_eq!((m.seq, m.subject.as_str()), (Seq(4), "orders.b"));
        assert_eq!(next_seqs(t, 1, "live").await, vec![5]);
        assert_quiet(t, QUIET, "no more messages").await;
    }
}

/// From a sequence in the middle: that message on, then live.
pub async fn tail_from_middle<H: Harness>() {
    let h = H::start().await;
    let e = h.engine();
    let s = orders(&*e).await;
    publish_n(&*e, &s, "orders.a", 5).await;
    let mut t = e.tail(&s, Seq(3), None).await.unwrap();
    assert_eq!(next_seqs(&mut t, 3, "stored").await, vec![3, 4, 5]);
    publish_n(&*e, &s, "orders.a", 1).await;
    assert_eq!(next_seqs(&mut t, 1, "live").await, vec![6]);
}

/// From past the end: nothing until that sequence is published; the
/// sequences before it are skipped without a gap (nothing was removed).
pub async fn tail_past_the_end_waits_for_that_sequence<H: Harness>() {
    let h = H::start().await;
    let e = h.engine();
    let s = orders(&*e).await;
    publish_n(&*e, &s, "orders.a", 2).await;
    let mut next = e.tail(&s, Seq(3), None).await.unwrap();
    let mut later = e.tail(&s, Seq(6), None).await.unwrap();
    assert_quiet(&mut next, QUIET, "tail from the next sequence").await;
    publish_n(&*e, &s, "orders.a", 1).await;
    assert_eq!(next_seqs(&mut next, 1, "the next sequence").await, vec![3]);
    publish_n(&*e, &s, "orders.a", 3).await;
    let m = next_message(&mut later, "tail from 6").await;
    assert_eq!(m.seq, Seq(6), "sequences 3-5 come before the start");
    assert_eq!(next_seqs(&mut next, 3, "the rest").await, vec![4, 5, 6]);
}

/// Filters with `*` and `>` apply to stored and to live messages.
pub async fn tail_with_wildcard_filters<H: Harness>() {
    let h = H::start().await;
    let e = h.engine();
    let s = orders(&*e).await;
    let subjects = ["orders.eu.a", "orders.us.a", "orders.eu.a.x", "orders.eu.b"];
    for subject in subjects {
        publish_one(&*e, &s, subject, subject).await;
    }
    let mut star = e.tail(&s, Seq(0), Some(pat("orders.eu.*"))).await.unwrap();
    let mut gt = e.tail(&s, Seq(0), Some(pat("orders.eu.>"))).await.unwrap();
    let mut lit = e.tail(&s, Seq(2), Some(pat("orders.us.a"))).await.unwrap();
    assert_eq!(next_seqs(&mut star, 2, "orders.eu.* stored").await, vec![1, 4]);
    assert_eq!(next_seqs(&mut gt, 3, "orders.eu.> stored").await, vec![1, 3, 4]);
    assert_eq!(next_seqs(&mut lit, 1, "orders.us.a stored").await, vec![2]);
    for subject in subjects {
        publish_one(&*e, &s, subject, subject).await;
    }
    assert_eq!(next_seqs(&mut star, 2, "orders.eu.* live").await, vec![5, 8]);
    assert_eq!(next_seqs(&mut gt, 3, "orders.eu.> live").await, vec![5, 7, 8]);
    assert_eq!(next_seqs(&mut lit, 1, "orders.us.a live").await, vec![6]);
    assert_quiet(&mut star, QUIET, "orders.eu.* after live").await;
}

/// Requested history removed by retention is reported as one `Gap`, then
/// the stored messages follow.
pub async fn tail_reports_gap_after_retention<H: Harness>() {
    let h = H::start().await;
    let e = h.engine();
    let mut c = stream_config("ORDERS", &["orders.>"]);
    c.max_msgs = Some(3);
    e.create_stream(c).await.unwrap();
    let s = sn("ORDERS");
    publish_n(&*e, &s, "orders.a", 10).await;
    let mut t = e.tail(&s, Seq(1), None).await.unwrap();
    assert_eq!(next_item(&mut t, "gap").await, TailEvent::Gap { from: Seq(1), to: Seq(7) });
    assert_eq!(next_seqs(&mut t, 3, "after the gap").await, vec![8, 9, 10]);
    let mut mid = e.tail(&s, Seq(5), Some(pat("orders.a"))).await.unwrap();
    assert_eq!(next_item(&mut mid, "gap from 5").await, TailEvent::Gap { from: Seq(5), to: Seq(7) });
    assert_eq!(next_seqs(&mut mid, 3, "after the gap").await, vec![8, 9, 10]);
    publish_n(&*e, &s, "orders.a", 1).await;
    assert_eq!(next_seqs(&mut t, 1, "live").await, vec![11]);
    assert_eq!(next_seqs(&mut mid, 1, "live").await, vec![11]);
}

/// `Seq(0)` asks for "the first stored", so a trimmed stream has no gap.
pub async fn tail_from_zero_on_trimmed_stream_has_no_gap<H: Harness>() {
    let h = H::start().await;
    let e = h.engine();
    let mut c = stream_config("ORDERS", &["orders.>"]);
    c.max_msgs = Some(3);
    e.create_stream(c).await.unwrap();
    let s = sn("ORDERS");
    publish_n(&*e, &s, "orders.a", 10).await;
    let mut t = e.tail(&s, Seq(0), None).await.unwrap();
    assert_eq!(next_seqs(&mut t, 3, "first stored on").await, vec![8, 9, 10]);
    // Starting exactly at the first stored message has no gap either.
    let mut at_first = e.tail(&s, Seq(8), None).await.unwrap();
    assert_eq!(next_seqs(&mut at_first, 1, "first stored").await, vec![8]);
}

/// Purged history is a gap too; from `Seq(0)` a purged stream just waits.
pub async fn tail_reports_gap_after_purge<H: Harness>() {
    let h = H::start().await;
    let e = h.engine();
    let s = orders(&*e).await;
    publish_n(&*e, &s, "orders.a", 3).await;
    e.purge_stream(&s).await.unwrap();
    let mut t1 = e.tail(&s, Seq(1), None).await.unwrap();
    let mut t0 = e.tail(&s, Seq(0), None).await.unwrap();
    assert_eq!(next_item(&mut t1, "gap").await, TailEvent::Gap { from: Seq(1), to: Seq(3) });
    assert_quiet(&mut t0, QUIET, "purged stream from 0").await;
    publish_n(&*e, &s, "orders.a", 1).await;
    assert_eq!(next_seqs(&mut t1, 1, "after purge").await, vec![4]);
    assert_eq!(next_seqs(&mut t0, 1, "after purge").await, vec![4]);
}

/// Tails opened while a publisher runs see every sequence exactly once, in
/// order, across the join from stored to live.
pub async fn tail_joins_live_without_gap_or_duplicate<H: Harness>() {
    const TOTAL: u64 = 400;
    let h = H::start().await;
    let e = h.engine();
    let s = orders(&*e).await;
    let (started_tx, started_rx) = tokio::sync::oneshot::channel();
    let publisher = {
        let (e, s) = (e.clone(), s.clone());
        tokio::spawn(async move {
            let mut started = Some(started_tx);
            for i in 1..=TOTAL {
                let ack = e.publish(&s, out("orders.live", format!("m{i}"))).await.unwrap();
                assert_eq!(ack.seq, Seq(i));
                if i == 100 {
                    let _ = started.take().unwrap().send(());
                }
            }
        })
    };
    started_rx.await.unwrap();
    let mut tails = Vec::new();
    for (from, first) in [(0, 1), (1, 1), (50, 50)] {
        tails.push((first, e.tail(&s, Seq(from), None).await.unwrap()));
    }
    for (first, mut t) in tails {
        let mut want = first;
        while want <= TOTAL {
            let m = next_message(&mut t, "tail across the join").await;
            assert_eq!(m.seq, Seq(want), "tail from {first}: gap or duplicate at {}", m.seq);
            assert_eq!(m.payload, format!("m{want}"));
            want += 1;
        }
    }
    publisher.await.unwrap();
}

/// Deleting the stream ends its tails with an error.
pub async fn tail_ends_with_error_when_stream_deleted<H: Harness>() {
    let h = H::start().await;
    let e = h.engine();
    let s = orders(&*e).await;
    publish_n(&*e, &s, "orders.a", 1).await;
    let mut t = e.tail(&s, Seq(0), None).await.unwrap();
    assert_eq!(next_seqs(&mut t, 1, "before delete").await, vec![1]);
    e.delete_stream(&s).await.unwrap();
    match tokio::time::timeout(STEP, t.next()).await {
        Err(_) => panic!("tail still open {STEP:?} after its stream was deleted"),
        Ok(Some(Err(_))) => {}
        Ok(other) => panic!("expected an error after delete, got {other:?}"),
    }
}

/// Several tails on one stream with concurrent publishers see one order.
pub async fn tails_agree_on_order<H: Harness>() {
    let h = H::start().await;
    let e = h.engine();
    let s = orders(&*e).await;
    let mut tails = Vec::new();
    for _ in 0..3 {
        tails.push(e.tail(&s, Seq(0), None).await.unwrap());
    }
    let publishers: Vec<_> = (0..3)
        .map(|p| {
            let (e, s) = (e.clone(), s.clone());
            tokio::spawn(async move {
                for i in 0..50 {
                    e.publish(&s, out(&format!("orders.p{p}"), format!("{p}-{i}"))).await.unwrap();
                }
            })
        })
        .collect();
    let mut seen = Vec::new();
    for t in &mut tails {
        let mut msgs = Vec::new();
        for _ in 0..150 {
            msgs.push(next_message(t, "concurrent publish").await);
        }
        assert_eq!(seqs(&msgs), (1..=150).collect::<Vec<_>>());
        seen.push(msgs);
    }
    for p in publishers {
        p.await.unwrap();
    }
    assert!(seen.windows(2).all(|w| w[0] == w[1]), "tails disagree");
    assert_eq!(seen[0], read_all(&*e, &s).await);
}
