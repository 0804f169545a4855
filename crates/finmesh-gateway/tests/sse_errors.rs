//! A subscription whose source fails (the stream is deleted under it) ends
//! with `event: error` carrying a problem document, and unregisters.

mod support;

use std::time::Duration;

use serde_json::json;
use support::{Gw, Harness, eventually, sse_oneshot};

const WAIT: Duration = Duration::from_secs(10);

async fn deleted_stream_ends_with_error_event<H: Harness>() {
    let gw = Gw::start::<H>().await;
    gw.stream("MD", json!({"subjects": ["md.>"]})).await;
    gw.publish_n("MD", "md.x", 2).await;
    let mut sse = sse_oneshot(&gw, "/v1/streams/MD/events?from_seq=1", &[]).await;
    sse.hello().await;
    assert_eq!(sse.next(WAIT).await.unwrap().seq(), 1);
    assert_eq!(sse.next(WAIT).await.unwrap().seq(), 2);
    assert_eq!(gw.delete("/v1/streams/MD").await.status, 204);
    let ev = sse.next(WAIT).await.expect("a final event");
    assert_eq!(ev.event.as_deref(), Some("error"), "{ev:?}");
    let p = ev.json();
    assert!(p["type"].as_str().unwrap().starts_with("https://finmesh.dev/problems/"), "{p}");
    assert!(p["status"].as_u64().is_some(), "{p}");
    assert!(sse.next(WAIT).await.is_none(), "the stream ends after the error");
    drop(sse);
    eventually(WAIT, "the subscriber is unregistered", || async { gw.state.subscriber_count() == 0 }).await;
}

per_engine!(deleted_stream_ends_with_error_event);
