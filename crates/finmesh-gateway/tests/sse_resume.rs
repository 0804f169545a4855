//! SSE resume over a real socket: read 100 events, drop the connection,
//! resume with `Last-Event-ID`, receive exactly the rest (also what was
//! published while disconnected, and live messages after the join).

mod support;

use std::time::Duration;

use serde_json::json;
use support::{Gw, Harness, SseReader, http_client};

const WAIT: Duration = Duration::from_secs(10);

async fn resume_with_last_event_id<H: Harness>() {
    let gw = Gw::start::<H>().await;
    gw.stream("MD", json!({"subjects": ["md.>"]})).await;
    gw.publish_n("MD", "md.eu", 150).await;
    let addr = gw.serve().await;
    let client = http_client();
    let url = format!("http://{addr}/v1/streams/MD/events");

    let res = client.get(format!("{url}?from_seq=1")).send().await.expect("connect");
    assert_eq!(res.status(), 200);
    let mut sse = SseReader::new(res.bytes_stream());
    let hello = sse.hello().await;
    assert_eq!(hello.retry, Some(2000));
    let mut last = 0;
    for want in 1..=100u64 {
        let ev = sse.next(WAIT).await.expect("event");
        assert_eq!(ev.event, None);
        assert_eq!(ev.seq(), want);
        let env = ev.json();
        assert_eq!(env["seq"], want);
        assert_eq!(env["subject"], "md.eu");
        assert_eq!(env["payload"], json!({"i": want - 1}));
        last = ev.seq();
    }
    drop(sse); // drops the connection

    // Published while the client was away.
    gw.publish_n("MD", "md.eu", 20).await;

    let res = client.get(&url).header("Last-Event-ID", last.to_string()).send().await.expect("reconnect");
    let mut sse = SseReader::new(res.bytes_stream());
    sse.hello().await;
    let mut seqs = Vec::new();
    while seqs.len() < 70 {
        seqs.push(sse.next(WAIT).await.expect("event").seq());
    }
    assert_eq!(seqs, (101..=170).collect::<Vec<_>>(), "exactly the rest, in order, no gap, no duplicate");
    // And live messages keep coming on the same connection.
    gw.publish_n("MD", "md.eu", 1).await;
    assert_eq!(sse.next(WAIT).await.expect("live").seq(), 171);
}

async fn from_seq_filter_and_defaults<H: Harness>() {
    let gw = Gw::start::<H>().await;
    gw.stream("MD", json!({"subjects": ["md.>"]})).await;
    gw.publish_n("MD", "md.a", 3).await;
    gw.publish_n("MD", "md.b", 3).await;
    let addr = gw.serve().await;
    let client = http_client();
    // from_seq is the first sequence wanted; the filter applies.
    let res = client.get(format!("http://{addr}/v1/streams/MD/events?from_seq=2&subject=md.a")).send().await.unwrap();
    let mut sse = SseReader::new(res.bytes_stream());
    sse.hello().await;
    assert_eq!(sse.next(WAIT).await.unwrap().seq(), 2);
    assert_eq!(sse.next(WAIT).await.unwrap().seq(), 3);
    // Without from_seq: only new messages.
    let res = client.get(format!("http://{addr}/v1/streams/MD/events")).send().await.unwrap();
    let mut fresh = SseReader::new(res.bytes_stream());
    fresh.hello().await;
    gw.publish_n("MD", "md.a", 1).await;
    assert_eq!(fresh.next(WAIT).await.unwrap().seq(), 7);
    assert_eq!(sse.next(WAIT).await.unwrap().seq(), 7);
    // Errors before the stream starts are problems.
    let r = client.get(format!("http://{addr}/v1/streams/NOPE/events")).send().await.unwrap();
    assert_eq!(r.status(), 404);
    assert_eq!(r.headers()["content-type"], "application/problem+json");
    let r =
        client.get(format!("http://{addr}/v1/streams/MD/events")).header("Last-Event-ID", "x").send().await.unwrap();
    assert_eq!(r.status(), 400);
}

per_engine!(resume_with_last_event_id, from_seq_filter_and_defaults);
