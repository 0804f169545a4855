//! Batch acknowledgement: a list of tokens
//! ([`ack_many`](crate::ConsumerEngine::ack_many)) and everything delivered
//! up to a sequence ([`ack_all`](crate::ConsumerEngine::ack_all)).

use std::time::Duration;

use crate::testsuite::Harness;
use crate::testsuite::support::*;
use crate::{AckKind, AckToken, ConsumerConfig, Delivery, ErrorKind, Seq};

fn tokens(ds: &[&Delivery]) -> Vec<AckToken> {
    ds.iter().map(|d| d.token.clone()).collect()
}

/// Each listed delivery is acked, the others stay pending; repeating a
/// list (or a token inside one) is fine; a nak list redelivers them all.
pub async fn ack_many_applies_the_kind_to_each_token<H: Harness>() {
    let h = H::start().await;
    let e = h.engine();
    let s = orders(&*e).await;
    publish_n(&*e, &s, "orders.a", 7).await;
    let c = cname("c");
    e.create_consumer(&s, consumer_config("c", Duration::from_secs(30))).await.unwrap();
    let ds = fetch_exactly(&*e, &s, &c, 5).await;
    assert_eq!(delivered_seqs(&ds), vec![1, 2, 3, 4, 5]);
    let odd = tokens(&[&ds[0], &ds[2], &ds[4], &ds[0]]);
    e.ack_many(&s, &c, &odd, AckKind::Ack).await.unwrap();
    let info = e.consumer_info(&s, &c).await.unwrap();
    assert_eq!((info.num_ack_pending, info.ack_floor), (2, Seq(1)));
    e.ack_many(&s, &c, &odd, AckKind::Ack).await.unwrap();
    e.ack_many(&s, &c, &tokens(&[&ds[1], &ds[3]]), AckKind::Ack).await.unwrap();
    let info = e.consumer_info(&s, &c).await.unwrap();
    assert_eq!((info.num_ack_pending, info.ack_floor), (0, Seq(5)));
    e.ack_many(&s, &c, &[], AckKind::Ack).await.unwrap();

    let more = fetch_exactly(&*e, &s, &c, 2).await;
    assert_eq!(delivered_seqs(&more), vec![6, 7]);
    e.ack_many(&s, &c, &tokens(&[&more[0], &more[1]]), AckKind::Nak { delay: Duration::ZERO }).await.unwrap();
    let again = fetch_exactly(&*e, &s, &c, 2).await;
    assert_eq!(delivered_seqs(&again), vec![6, 7]);
    assert!(again.iter().all(|d| d.delivery_count == 2));
    e.ack_many(&s, &c, &tokens(&[&again[0], &again[1]]), AckKind::Term).await.unwrap();
    assert_eq!(e.consumer_info(&s, &c).await.unwrap().num_ack_pending, 0);
}

/// One token that does not parse fails the whole list with `Invalid`, and
/// nothing of it is applied; a missing consumer is `NotFound`.
pub async fn ack_many_with_a_bad_token_applies_nothing<H: Harness>() {
    let h = H::start().await;
    let e = h.engine();
    let s = orders(&*e).await;
    publish_n(&*e, &s, "orders.a", 2).await;
    let c = cname("c");
    e.create_consumer(&s, consumer_config("c", Duration::from_secs(30))).await.unwrap();
    let ds = fetch_exactly(&*e, &s, &c, 2).await;
    let mut list = tokens(&[&ds[0], &ds[1]]);
    list.insert(1, AckToken("garbage".to_owned()));
    expect_kind(e.ack_many(&s, &c, &list, AckKind::Ack).await, ErrorKind::Invalid);
    assert_eq!(e.consumer_info(&s, &c).await.unwrap().num_ack_pending, 2);
    let r = e.ack_many(&s, &cname("missing"), &tokens(&[&ds[0]]), AckKind::Ack).await;
    expect_kind(r, ErrorKind::NotFound);
    assert_eq!(e.consumer_info(&s, &c).await.unwrap().num_ack_pending, 2);
}

/// `ack_all(upto)` acks every pending delivery up to `upto` (redelivered
/// ones too) and nothing after it; it never skips messages the consumer
/// has not delivered yet, whatever `upto` says.
pub async fn ack_all_acks_deliveries_up_to_a_sequence<H: Harness>() {
    let h = H::start().await;
    let e = h.engine();
    let s = orders(&*e).await;
    for i in 0..10 {
        let subject = if i % 2 == 0 { "orders.a" } else { "orders.b" };
        publish_one(&*e, &s, subject, "x").await;
    }
    let c = cname("c");
    let config = ConsumerConfig { filter: Some(pat("orders.a")), ..consumer_config("c", Duration::from_secs(30)) };
    e.create_consumer(&s, config).await.unwrap();
    let ds = fetch_exactly(&*e, &s, &c, 3).await;
    assert_eq!(delivered_seqs(&ds), vec![1, 3, 5]);
    e.ack_all(&s, &c, Seq(3)).await.unwrap();
    let info = e.consumer_info(&s, &c).await.unwrap();
    assert_eq!((info.num_ack_pending, info.ack_floor), (1, Seq(4)));
    e.ack_all(&s, &c, Seq(3)).await.unwrap();
    e.ack_all(&s, &c, Seq(0)).await.unwrap();
    assert_eq!(e.consumer_info(&s, &c).await.unwrap().num_ack_pending, 1);

    // Past what was delivered: acks 5, does not skip 7 and 9.
    e.ack_all(&s, &c, Seq(1_000)).await.unwrap();
    let info = e.consumer_info(&s, &c).await.unwrap();
    assert_eq!((info.num_ack_pending, info.ack_floor, info.delivered), (0, Seq(5), Seq(5)));
    let rest = fetch_exactly(&*e, &s, &c, 2).await;
    assert_eq!(delivered_seqs(&rest), vec![7, 9]);

    // A redelivered one is acked as well.
    e.ack(&s, &c, &rest[0].token, AckKind::Nak { delay: Duration::ZERO }).await.unwrap();
    let again = fetch_exactly(&*e, &s, &c, 1).await;
    assert_eq!((delivered_seqs(&again), again[0].delivery_count), (vec![7], 2));
    e.ack_all(&s, &c, Seq(9)).await.unwrap();
    let info = e.consumer_info(&s, &c).await.unwrap();
    assert_eq!((info.num_ack_pending, info.ack_floor), (0, Seq(9)));
    assert!(fetch(&*e, &s, &c, 10, Duration::from_millis(100)).await.is_empty());
    expect_kind(e.ack_all(&s, &cname("missing"), Seq(9)).await, ErrorKind::NotFound);
}
