//! Publishing: single messages and batches, subject capture, size limits,
//! and the stream state that publishes leave behind.

use std::time::Duration;

use bytes::Bytes;

use crate::testsuite::support::*;
use crate::testsuite::{Difference, Harness, differs};
use crate::{ErrorKind, Headers, OutgoingMessage, Seq, Timestamp};

/// Sequences start at 1 and go up by one; subject, headers and payload
/// (binary included) come back as published, with a plausible store time.
pub async fn publish_assigns_consecutive_sequences_and_keeps_content<H: Harness>() {
    let h = H::start().await;
    let e = h.engine();
    let s = orders(&*e).await;
    let before = Timestamp::now().saturating_sub(Duration::from_secs(1));
    let mut headers = Headers::new();
    headers.append("X-Trace", "abc").unwrap();
    headers.append("X-Empty", "").unwrap();
    let binary = Bytes::from_static(&[0, 159, 146, 150, 255, 0, 10, 13]);
    let msgs = [
        OutgoingMessage { subject: subj("orders.eu.1"), headers: headers.clone(), payload: binary.clone() },
        out("orders.us.2", "second"),
        out("orders.eu.1", ""),
    ];
    for (i, m) in msgs.iter().enumerate() {
        let ack = e.publish(&s, m.clone()).await.unwrap();
        assert_eq!(ack.seq, Seq(i as u64 + 1));
        assert!(!ack.duplicate);
    }
    let after = Timestamp::now().saturating_add(Duration::from_secs(1));
    for (i, m) in msgs.iter().enumerate() {
        let got = e.get_message(&s, Seq(i as u64 + 1)).await.unwrap();
        assert_eq!(got.seq, Seq(i as u64 + 1));
        assert_eq!(got.subject, m.subject);
        assert_eq!(got.payload, m.payload);
        assert_eq!(got.headers.len(), m.headers.len(), "headers of seq {}: {:?}", i + 1, got.headers);
        for (name, value) in m.headers.iter() {
            assert_eq!(got.headers.get(name), Some(value), "header {name}");
        }
        assert!(before <= got.time && got.time <= after, "time {:?} not within the publish window", got.time);
    }
}

/// A subject the stream does not capture is `Invalid`, and nothing is stored.
pub async fn publish_to_uncaptured_subject_is_invalid<H: Harness>() {
    let h = H::start().await;
    let e = h.engine();
    let s = orders(&*e).await;
    e.create_stream(stream_config("TRADES", &["trades.*"])).await.unwrap();
    for subject in ["orders", "trades.x", "order.x"] {
        expect_kind(e.publish(&s, out(subject, "x")).await, ErrorKind::Invalid);
    }
    // `trades.*` does not capture two tokens.
    expect_kind(e.publish(&sn("TRADES"), out("trades.a.b", "x")).await, ErrorKind::Invalid);
    assert_eq!(e.stream_info(&s).await.unwrap().state.last_seq, Seq(0));
    assert_eq!(e.stream_info(&sn("TRADES")).await.unwrap().state.last_seq, Seq(0));
    assert_eq!(publish_one(&*e, &s, "orders.x", "ok").await, Seq(1));
}

/// A batch is stored in order with consecutive sequences; acks come back in order.
pub async fn publish_batch_acks_in_order<H: Harness>() {
    let h = H::start().await;
    let e = h.engine();
    let s = orders(&*e).await;
    publish_one(&*e, &s, "orders.a", "first").await;
    let batch: Vec<_> = (0..5).map(|i| out(&format!("orders.{}", i % 2), format!("b{i}"))).collect();
    let acks = e.publish_batch(&s, batch.clone()).await.unwrap();
    assert_eq!(acks.iter().map(|a| a.seq.0).collect::<Vec<_>>(), vec![2, 3, 4, 5, 6]);
    assert!(acks.iter().all(|a| !a.duplicate));
    let stored = read_all(&*e, &s).await;
    assert_eq!(seqs(&stored), vec![1, 2, 3, 4, 5, 6]);
    for (m, sent) in stored[1..].iter().zip(&batch) {
        assert_eq!((&m.subject, &m.payload), (&sent.subject, &sent.payload));
    }
}

/// An empty batch is accepted and changes nothing.
pub async fn publish_empty_batch_is_ok<H: Harness>() {
    let h = H::start().await;
    let e = h.engine();
    let s = orders(&*e).await;
    assert!(e.publish_batch(&s, vec![]).await.unwrap().is_empty());
    assert_eq!(e.stream_info(&s).await.unwrap().state.last_seq, Seq(0));
}

/// One message on an uncaptured subject refuses the whole batch; no
/// sequence is used up.
pub async fn publish_batch_with_bad_subject_writes_nothing<H: Harness>() {
    let h = H::start().await;
    let e = h.engine();
    let s = orders(&*e).await;
    let batch = vec![out("orders.a", "1"), out("orders.b", "2"), out("elsewhere", "3"), out("orders.c", "4")];
    expect_kind(e.publish_batch(&s, batch).await, ErrorKind::Invalid);
    let st = e.stream_info(&s).await.unwrap().state;
    assert_eq!((st.messages, st.last_seq), (0, Seq(0)));
    assert!(read_all(&*e, &s).await.is_empty());
    assert_eq!(publish_one(&*e, &s, "orders.a", "x").await, Seq(1));
}

/// A batch the store refuses midway, after the engine's own checks
/// passed: the embedded engine commits a batch atomically, NATS stores the
/// messages around the refused one (see
/// [`Difference::PartialBatchOnFailure`]). The refusal here is a JetStream
/// precondition header set by the caller (`Nats-Expected-Stream` naming
/// another stream), which NATS enforces and the embedded engine stores as
/// an ordinary header.
pub async fn publish_batch_refused_midway<H: Harness>() {
    let h = H::start().await;
    let e = h.engine();
    let s = orders(&*e).await;
    let mut refused = out("orders.b", "2");
    refused.headers.insert("Nats-Expected-Stream", "OTHER").unwrap();
    let r = e.publish_batch(&s, vec![out("orders.a", "1"), refused, out("orders.c", "3")]).await;
    let subjects =
        |msgs: Vec<crate::Message>| msgs.into_iter().map(|m| m.subject.as_str().to_owned()).collect::<Vec<_>>();
    if differs::<H>(Difference::PartialBatchOnFailure) {
        expect_kind(r, ErrorKind::Invalid);
        assert_eq!(subjects(read_all(&*e, &s).await), ["orders.a", "orders.c"]);
    } else {
        let acks = r.unwrap();
        assert_eq!(acks.iter().map(|a| a.seq.0).collect::<Vec<_>>(), [1, 2, 3]);
        assert_eq!(subjects(read_all(&*e, &s).await), ["orders.a", "orders.b", "orders.c"]);
    }
}

/// One oversized message refuses the whole batch with `TooLarge`.
pub async fn publish_batch_with_too_large_message_writes_nothing<H: Harness>() {
    let h = H::start().await;
    let e = h.engine();
    let mut c = stream_config("ORDERS", &["orders.>"]);
    c.max_msg_size = Some(64);
    e.create_stream(c).await.unwrap();
    let s = sn("ORDERS");
    let batch = vec![out("orders.a", "small"), out("orders.a", vec![b'x'; 100]), out("orders.a", "small")];
    expect_kind(e.publish_batch(&s, batch).await, ErrorKind::TooLarge);
    assert_eq!(e.stream_info(&s).await.unwrap().state.last_seq, Seq(0));
    assert!(read_all(&*e, &s).await.is_empty());
}

/// Size = subject + headers + payload; exactly the limit is accepted, one
/// byte more is `TooLarge` with nothing written.
pub async fn max_msg_size_is_too_large_and_writes_nothing<H: Harness>() {
    let h = H::start().await;
    let e = h.engine();
    let mut c = stream_config("ORDERS", &["orders.>"]);
    c.max_msg_size = Some(32);
    e.create_stream(c).await.unwrap();
    let s = sn("ORDERS");
    // "orders.a" is 8 bytes, so a 24-byte payload is exactly 32.
    let fits = out("orders.a", vec![b'a'; 24]);
    assert_eq!(fits.size(), 32);
    assert_eq!(e.publish(&s, fits).await.unwrap().seq, Seq(1));
    expect_kind(e.publish(&s, out("orders.a", vec![b'a'; 25])).await, ErrorKind::TooLarge);
    // Headers count too.
    let mut with_header = out("orders.a", vec![b'a'; 20]);
    with_header.headers.append("X-H", "v").unwrap();
    assert!(with_header.size() > 32);
    expect_kind(e.publish(&s, with_header).await, ErrorKind::TooLarge);
    let st = e.stream_info(&s).await.unwrap().state;
    assert_eq!((st.messages, st.last_seq), (1, Seq(1)));
    assert_eq!(publish_one(&*e, &s, "orders.a", "ok").await, Seq(2));
}

/// `messages`, `bytes` (as [`crate::Message::size`] counts them) and the
/// first/last times describe what is stored.
pub async fn stream_state_counts_bytes_and_times<H: Harness>() {
    let h = H::start().await;
    let e = h.engine();
    let s = orders(&*e).await;
    let mut m = out("orders.eu", "payload-1");
    m.headers.append("X-A", "1").unwrap();
    e.publish(&s, m).await.unwrap();
    publish_one(&*e, &s, "orders.us.long.subject", "p2").await;
    publish_one(&*e, &s, "orders.eu", "").await;
    let stored = read_all(&*e, &s).await;
    let st = e.stream_info(&s).await.unwrap().state;
    assert_eq!(st.messages, 3);
    let sizes = stored.iter().map(|m| m.size() as u64).sum::<u64>();
    if differs::<H>(Difference::StoredBytesIncludeOverhead) {
        assert!(st.bytes >= sizes, "stored bytes {} below the messages' {sizes}", st.bytes);
    } else {
        assert_eq!(st.bytes, sizes);
    }
    assert_eq!((st.first_seq, st.last_seq), (Seq(1), Seq(3)));
    assert_eq!(st.first_time, Some(stored[0].time));
    assert_eq!(st.last_time, Some(stored[2].time));
    assert!(stored[0].time <= stored[1].time && stored[1].time <= stored[2].time, "store times go forward");
}
