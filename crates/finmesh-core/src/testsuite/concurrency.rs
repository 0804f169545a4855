//! Concurrent clients: publishers never share or skip a sequence,
//! compare-and-set has exactly one winner, and concurrent fetchers of one
//! consumer never get the same message.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;

use crate::testsuite::Harness;
use crate::testsuite::kv::bucket_with_history;
use crate::testsuite::support::*;
use crate::{AckKind, Engine, ErrorKind, Revision, Seq};

async fn join_all<T: Send + 'static>(tasks: Vec<tokio::task::JoinHandle<T>>) -> Vec<T> {
    let mut out = Vec::with_capacity(tasks.len());
    for t in tasks {
        out.push(t.await.expect("task panicked"));
    }
    out
}

/// Eight publishers at once: every sequence 1..=800 is used exactly once,
/// each publisher's sequences increase, and each stored message is the one
/// acked with its sequence.
pub async fn concurrent_publishers_have_no_duplicate_or_missing_seq<H: Harness>() {
    const PUBLISHERS: usize = 8;
    const EACH: usize = 100;
    let h = H::start().await;
    let e = h.engine();
    let s = orders(&*e).await;
    let tasks = (0..PUBLISHERS)
        .map(|p| {
            let (e, s) = (e.clone(), s.clone());
            tokio::spawn(async move {
                let mut acked = Vec::with_capacity(EACH);
                for i in 0..EACH {
                    let payload = format!("p{p}-{i}");
                    let ack = e.publish(&s, out(&format!("orders.p{p}"), payload.clone())).await.unwrap();
                    assert!(!ack.duplicate);
                    acked.push((ack.seq, payload));
                }
                acked
            })
        })
        .collect();
    let mut by_seq = BTreeMap::new();
    for acked in join_all(tasks).await {
        assert!(acked.windows(2).all(|w| w[0].0 < w[1].0), "one publisher's sequences go up");
        for (seq, payload) in acked {
            assert!(by_seq.insert(seq.0, payload).is_none(), "sequence {seq} acked twice");
        }
    }
    let total = (PUBLISHERS * EACH) as u64;
    assert_eq!(by_seq.keys().copied().collect::<Vec<_>>(), (1..=total).collect::<Vec<_>>());
    let stored = read_all(&*e, &s).await;
    assert_eq!(stored.len() as u64, total);
    for m in &stored {
        assert_eq!(m.payload, by_seq[&m.seq.0], "content of {}", m.seq);
    }
    let st = e.stream_info(&s).await.unwrap().state;
    assert_eq!((st.messages, st.last_seq), (total, Seq(total)));
}

/// Eight `kv_create`s of one key: one wins, the others see its revision.
pub async fn concurrent_creates_have_one_winner<H: Harness>() {
    let h = H::start().await;
    let e = h.engine();
    let b = bucket_with_history(&*e, 10).await;
    let tasks = (0..8)
        .map(|i| {
            let (e, b) = (e.clone(), b.clone());
            tokio::spawn(async move { (i, e.kv_create(&b, &key("k"), Bytes::from(format!("v{i}"))).await) })
        })
        .collect();
    let results = join_all(tasks).await;
    let winners: Vec<_> = results.iter().filter_map(|(i, r)| r.as_ref().ok().map(|rev| (*i, *rev))).collect();
    assert_eq!(winners.len(), 1, "exactly one create wins: {results:?}");
    let (winner, rev) = winners[0];
    for (_, r) in &results {
        if let Err(err) = r {
            assert_eq!(err.kind(), ErrorKind::WrongRevision, "{err:?}");
            assert_eq!(err.current_revision(), Some(rev));
        }
    }
    let got = e.kv_get(&b, &key("k")).await.unwrap().unwrap();
    assert_eq!((got.value, got.revision), (Bytes::from(format!("v{winner}")), rev));
    assert_eq!(e.kv_history(&b, &key("k")).await.unwrap().len(), 1);
}

async fn increment(e: Arc<dyn Engine>, b: crate::BucketName, times: usize) -> usize {
    let k = key("counter");
    let mut conflicts = 0;
    for _ in 0..times {
        loop {
            let cur = e.kv_get(&b, &k).await.unwrap().unwrap();
            let n: u64 = std::str::from_utf8(&cur.value).unwrap().parse().unwrap();
            match e.kv_update(&b, &k, Bytes::from((n + 1).to_string()), cur.revision).await {
                Ok(rev) => {
                    assert!(rev > cur.revision);
                    break;
                }
                Err(err) => {
                    assert_eq!(err.kind(), ErrorKind::WrongRevision, "{err:?}");
                    assert!(err.current_revision().unwrap() > cur.revision, "a conflict reports a newer revision");
                    conflicts += 1;
                }
            }
        }
    }
    conflicts
}

/// Eight `kv_update`s at one revision: one wins. Then eight tasks increment
/// a counter by read-modify-write: no increment is lost.
pub async fn concurrent_updates_have_one_winner<H: Harness>() {
    let h = H::start().await;
    let e = h.engine();
    let b = bucket_with_history(&*e, 1).await;
    let start = e.kv_put(&b, &key("k"), Bytes::from("0")).await.unwrap();
    let tasks = (0..8)
        .map(|i| {
            let (e, b) = (e.clone(), b.clone());
            tokio::spawn(async move { e.kv_update(&b, &key("k"), Bytes::from(format!("v{i}")), start).await })
        })
        .collect();
    let results = join_all(tasks).await;
    let wins: Vec<Revision> = results.iter().filter_map(|r| r.as_ref().ok().copied()).collect();
    assert_eq!(wins.len(), 1, "exactly one update wins: {results:?}");
    for err in results.iter().filter_map(|r| r.as_ref().err()) {
        assert_eq!((err.kind(), err.current_revision()), (ErrorKind::WrongRevision, Some(wins[0])), "{err:?}");
    }
    e.kv_put(&b, &key("counter"), Bytes::from("0")).await.unwrap();
    let tasks = (0..8).map(|_| tokio::spawn(increment(e.clone(), b.clone(), 10))).collect();
    join_all(tasks).await;
    assert_eq!(e.kv_get(&b, &key("counter")).await.unwrap().unwrap().value, "80");
}

/// Four tasks fetching from one consumer share out the messages: each is
/// delivered once, none is lost.
pub async fn concurrent_fetchers_never_share_a_message<H: Harness>() {
    let h = H::start().await;
    let e = h.engine();
    let s = orders(&*e).await;
    let batch: Vec<_> = (1..=200).map(|i| out("orders.a", format!("m{i}"))).collect();
    e.publish_batch(&s, batch).await.unwrap();
    e.create_consumer(&s, consumer_config("c", Duration::from_secs(30))).await.unwrap();
    let tasks = (0..4)
        .map(|_| {
            let (e, s) = (e.clone(), s.clone());
            tokio::spawn(async move {
                let c = cname("c");
                let mut got = Vec::new();
                loop {
                    let ds = fetch(&*e, &s, &c, 7, Duration::from_millis(200)).await;
                    if ds.is_empty() {
                        return got;
                    }
                    for d in ds {
                        assert_eq!(d.delivery_count, 1);
                        e.ack(&s, &c, &d.token, AckKind::Ack).await.unwrap();
                        got.push(d.message.seq.0);
                    }
                }
            })
        })
        .collect();
    let mut all = BTreeSet::new();
    for got in join_all(tasks).await {
        assert!(got.windows(2).all(|w| w[0] < w[1]), "one fetcher sees increasing sequences");
        for seq in got {
            assert!(all.insert(seq), "sequence {seq} delivered to two fetchers");
        }
    }
    assert_eq!(all.into_iter().collect::<Vec<_>>(), (1..=200).collect::<Vec<_>>());
    let info = e.consumer_info(&s, &cname("c")).await.unwrap();
    assert_eq!((info.ack_floor, info.num_ack_pending, info.num_pending), (Seq(200), 0, 0));
}
