//! Redelivery: nak (at once and delayed), term, in-progress, ack_wait
//! expiry, `max_deliver` with and without a dead-letter stream, and
//! `max_ack_pending`.

use std::time::{Duration, Instant};

use crate::config::{dead_letter_headers as dlq, dead_letter_msg_id, dead_letter_subject};
use crate::message::MSG_ID_HEADER;
use crate::testsuite::Harness;
use crate::testsuite::support::*;
use crate::{AckKind, ConsumerConfig, ErrorKind, OutgoingMessage, ReadRequest, Seq};

const LONG: Duration = Duration::from_secs(30);

fn nak(ms: u64) -> AckKind {
    AckKind::Nak { delay: Duration::from_millis(ms) }
}

/// A nak without delay makes the message due at once; due redeliveries come
/// before new messages, with the delivery count raised.
pub async fn nak_redelivers_at_once<H: Harness>() {
    let h = H::start().await;
    let e = h.engine();
    let s = orders(&*e).await;
    publish_n(&*e, &s, "orders.a", 3).await;
    let c = cname("c");
    e.create_consumer(&s, consumer_config("c", LONG)).await.unwrap();
    let ds = fetch(&*e, &s, &c, 2, Duration::ZERO).await;
    e.ack(&s, &c, &ds[1].token, nak(0)).await.unwrap();
    let again = fetch_exactly(&*e, &s, &c, 2).await;
    let got: Vec<_> = again.iter().map(|d| (d.message.seq.0, d.delivery_count)).collect();
    assert_eq!(got, vec![(2, 2), (3, 1)]);
    let info = e.consumer_info(&s, &c).await.unwrap();
    assert_eq!((info.num_ack_pending, info.num_redelivered, info.ack_floor), (3, 1, Seq(0)));
}

/// A nak with a delay holds the message back for that long.
pub async fn nak_with_delay<H: Harness>() {
    let h = H::start().await;
    let e = h.engine();
    let s = orders(&*e).await;
    publish_n(&*e, &s, "orders.a", 1).await;
    let c = cname("c");
    e.create_consumer(&s, consumer_config("c", LONG)).await.unwrap();
    let d = fetch(&*e, &s, &c, 1, Duration::ZERO).await.remove(0);
    let start = Instant::now();
    e.ack(&s, &c, &d.token, nak(400)).await.unwrap();
    assert!(fetch(&*e, &s, &c, 1, Duration::ZERO).await.is_empty(), "redelivered before the nak delay");
    let again = fetch_exactly(&*e, &s, &c, 1).await;
    assert_eq!((again[0].message.seq, again[0].delivery_count), (Seq(1), 2));
    assert!(start.elapsed() >= Duration::from_millis(350), "nak delay not honoured: {:?}", start.elapsed());
}

/// Term: never delivered again and never dead-lettered.
pub async fn term_stops_delivery<H: Harness>() {
    let h = H::start().await;
    let e = h.engine();
    let s = orders(&*e).await;
    publish_n(&*e, &s, "orders.a", 1).await;
    let c = cname("c");
    let config = ConsumerConfig {
        max_deliver: Some(2),
        dead_letter: Some(sn("DLQ")),
        ..consumer_config("c", Duration::from_millis(200))
    };
    e.create_consumer(&s, config).await.unwrap();
    let d = fetch(&*e, &s, &c, 1, Duration::ZERO).await.remove(0);
    e.ack(&s, &c, &d.token, AckKind::Term).await.unwrap();
    assert!(fetch(&*e, &s, &c, 1, Duration::from_millis(600)).await.is_empty(), "terminated message came back");
    let info = e.consumer_info(&s, &c).await.unwrap();
    assert_eq!((info.ack_floor, info.num_ack_pending), (Seq(1), 0));
    match e.stream_info(&sn("DLQ")).await {
        Ok(info) => assert_eq!(info.state.messages, 0, "a terminated message is not dead-lettered"),
        Err(err) => assert_eq!(err.kind(), ErrorKind::NotFound, "{err:?}"),
    }
}

/// In-progress restarts the ack_wait clock.
pub async fn in_progress_extends_ack_wait<H: Harness>() {
    let h = H::start().await;
    let e = h.engine();
    let s = orders(&*e).await;
    publish_n(&*e, &s, "orders.a", 1).await;
    let c = cname("c");
    e.create_consumer(&s, consumer_config("c", Duration::from_millis(800))).await.unwrap();
    let d = fetch(&*e, &s, &c, 1, Duration::ZERO).await.remove(0);
    // 300 ms into the 800 ms ack_wait, still nothing due.
    assert!(fetch(&*e, &s, &c, 1, Duration::from_millis(300)).await.is_empty());
    e.ack(&s, &c, &d.token, AckKind::InProgress).await.unwrap();
    let extended = Instant::now();
    // Past the original deadline (~800 ms) but before the new one (~1100 ms).
    assert!(fetch(&*e, &s, &c, 1, Duration::from_millis(550)).await.is_empty(), "in-progress did not extend ack_wait");
    let again = fetch_exactly(&*e, &s, &c, 1).await;
    assert_eq!((again[0].message.seq, again[0].delivery_count), (Seq(1), 2));
    assert!(extended.elapsed() >= Duration::from_millis(700), "redelivered {:?} after in-progress", extended.elapsed());
    e.ack(&s, &c, &again[0].token, AckKind::Ack).await.unwrap();
}

/// A delivery not acked within ack_wait is delivered again with a higher count.
pub async fn ack_wait_expiry_redelivers<H: Harness>() {
    let h = H::start().await;
    let e = h.engine();
    let s = orders(&*e).await;
    publish_n(&*e, &s, "orders.a", 1).await;
    let c = cname("c");
    e.create_consumer(&s, consumer_config("c", Duration::from_millis(200))).await.unwrap();
    let start = Instant::now();
    let first = fetch(&*e, &s, &c, 1, Duration::ZERO).await.remove(0);
    assert_eq!(first.delivery_count, 1);
    let second = fetch_exactly(&*e, &s, &c, 1).await.remove(0);
    assert!(start.elapsed() >= Duration::from_millis(150), "redelivered before ack_wait: {:?}", start.elapsed());
    assert_eq!((second.message.seq, second.delivery_count), (Seq(1), 2));
    assert_eq!(second.message, first.message);
    let info = e.consumer_info(&s, &c).await.unwrap();
    assert_eq!((info.num_ack_pending, info.num_redelivered, info.delivered), (1, 1, Seq(1)));
    e.ack(&s, &c, &second.token, AckKind::Ack).await.unwrap();
    assert!(fetch(&*e, &s, &c, 1, Duration::from_millis(400)).await.is_empty());
    assert_eq!(e.consumer_info(&s, &c).await.unwrap().num_redelivered, 0);
}

/// After `max_deliver` deliveries the message goes to the dead-letter
/// stream (created by the engine) with the documented subject and headers,
/// and the stable message id `dlq.<stream>.<consumer>.<seq>`.
pub async fn max_deliver_dead_letters<H: Harness>() {
    let h = H::start().await;
    let e = h.engine();
    let s = orders(&*e).await;
    let mut m = with_id("orders.eu.1", "poison", "orig-1");
    m.headers.append("X-Orig", "kept").unwrap();
    e.publish(&s, m).await.unwrap();
    publish_one(&*e, &s, "orders.eu.2", "fine").await;
    let c = cname("worker");
    let config =
        ConsumerConfig { max_deliver: Some(2), dead_letter: Some(sn("DLQ")), ..consumer_config("worker", LONG) };
    e.create_consumer(&s, config).await.unwrap();
    let ds = fetch(&*e, &s, &c, 2, Duration::ZERO).await;
    assert_eq!(delivered_seqs(&ds), vec![1, 2]);
    e.ack(&s, &c, &ds[1].token, AckKind::Ack).await.unwrap();
    e.ack(&s, &c, &ds[0].token, nak(0)).await.unwrap();
    let second = fetch_exactly(&*e, &s, &c, 1).await.remove(0);
    assert_eq!((second.message.seq, second.delivery_count), (Seq(1), 2));
    e.ack(&s, &c, &second.token, nak(0)).await.unwrap();
    assert!(fetch(&*e, &s, &c, 1, Duration::from_millis(300)).await.is_empty(), "delivered past max_deliver");
    let dlq_stream = sn("DLQ");
    eventually("the message reaches the dead-letter stream", STEP, || {
        let (e, d) = (e.clone(), dlq_stream.clone());
        async move { e.stream_info(&d).await.map(|i| i.state.messages == 1).unwrap_or(false) }
    })
    .await;
    assert_eq!(e.stream_info(&dlq_stream).await.unwrap().config.subjects, vec![pat("dlq.ORDERS.>")]);
    let dead = e.read(&dlq_stream, ReadRequest::from_seq(Seq(0), 10)).await.unwrap();
    assert_eq!(dead.len(), 1);
    let d = &dead[0];
    assert_eq!(d.subject, dead_letter_subject(&s, &c));
    assert_eq!(d.payload, "poison");
    let hd = |n: &str| d.headers.get(n).map(str::to_owned);
    assert_eq!(hd(dlq::STREAM).as_deref(), Some("ORDERS"));
    assert_eq!(hd(dlq::CONSUMER).as_deref(), Some("worker"));
    assert_eq!(hd(dlq::SEQ).as_deref(), Some("1"));
    assert_eq!(hd(dlq::SUBJECT).as_deref(), Some("orders.eu.1"));
    assert_eq!(hd(dlq::DELIVERIES).as_deref(), Some("2"));
    assert_eq!(hd("X-Orig").as_deref(), Some("kept"));
    // The copy's id is stable (not the original's), so dead-lettering the
    // same message again, as an engine that died before recording it does,
    // stores no second copy.
    assert_eq!(hd(MSG_ID_HEADER), Some(dead_letter_msg_id(&s, &c, Seq(1))));
    assert_eq!(hd(MSG_ID_HEADER).as_deref(), Some("dlq.ORDERS.worker.1"));
    let replay = OutgoingMessage { subject: d.subject.clone(), headers: d.headers.clone(), payload: d.payload.clone() };
    let ack = e.publish(&dlq_stream, replay).await.unwrap();
    assert_eq!((ack.seq, ack.duplicate), (d.seq, true));
    assert_eq!(e.stream_info(&dlq_stream).await.unwrap().state.messages, 1);
    let info = e.consumer_info(&s, &c).await.unwrap();
    assert_eq!((info.ack_floor, info.num_ack_pending), (Seq(2), 0));
}

/// Without a dead-letter stream, a message past `max_deliver` is dropped.
pub async fn max_deliver_without_dead_letter_drops<H: Harness>() {
    let h = H::start().await;
    let e = h.engine();
    let s = orders(&*e).await;
    publish_n(&*e, &s, "orders.a", 2).await;
    let c = cname("c");
    let config = ConsumerConfig { max_deliver: Some(1), ..consumer_config("c", Duration::from_millis(150)) };
    e.create_consumer(&s, config).await.unwrap();
    assert_eq!(delivered_seqs(&fetch(&*e, &s, &c, 1, Duration::ZERO).await), vec![1]);
    assert_eq!(delivered_seqs(&fetch(&*e, &s, &c, 10, Duration::ZERO).await), vec![2]);
    assert!(fetch(&*e, &s, &c, 10, Duration::from_millis(600)).await.is_empty(), "delivered past max_deliver");
    assert_eq!(e.list_streams().await.unwrap(), vec![s.clone()]);
    assert_eq!(e.stream_info(&s).await.unwrap().state.messages, 2, "dropping a delivery keeps the message");
}

/// At most `max_ack_pending` deliveries are outstanding; acks make room.
pub async fn max_ack_pending_bounds_fetch<H: Harness>() {
    let h = H::start().await;
    let e = h.engine();
    let s = orders(&*e).await;
    publish_n(&*e, &s, "orders.a", 5).await;
    let c = cname("c");
    e.create_consumer(&s, ConsumerConfig { max_ack_pending: 2, ..consumer_config("c", LONG) }).await.unwrap();
    let ds = fetch(&*e, &s, &c, 10, Duration::ZERO).await;
    assert_eq!(delivered_seqs(&ds), vec![1, 2]);
    assert!(fetch(&*e, &s, &c, 10, Duration::from_millis(200)).await.is_empty(), "max_ack_pending exceeded");
    e.ack(&s, &c, &ds[0].token, AckKind::Ack).await.unwrap();
    let more = fetch(&*e, &s, &c, 10, Duration::ZERO).await;
    assert_eq!(delivered_seqs(&more), vec![3]);
    e.ack(&s, &c, &ds[1].token, AckKind::Ack).await.unwrap();
    e.ack(&s, &c, &more[0].token, AckKind::Ack).await.unwrap();
    assert_eq!(delivered_seqs(&fetch(&*e, &s, &c, 10, Duration::ZERO).await), vec![4, 5]);
    assert_eq!(e.consumer_info(&s, &c).await.unwrap().num_ack_pending, 2);
}
