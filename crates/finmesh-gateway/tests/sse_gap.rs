//! History the stream no longer keeps is reported as an explicit
//! `event: gap`, never skipped silently; heartbeats arrive while idle.

mod support;

use std::time::Duration;

use finmesh_gateway::{GatewayConfig, SubscriptionConfig};
use serde_json::json;
use support::{Gw, Harness, SseReader, http_client, sse_oneshot};

const WAIT: Duration = Duration::from_secs(10);

async fn gap_event_after_retention<H: Harness>() {
    let gw = Gw::start::<H>().await;
    gw.stream("MD", json!({"subjects": ["md.>"], "max_msgs": 10})).await;
    gw.publish_n("MD", "md.x", 30).await;
    let addr = gw.serve().await;
    let res = http_client().get(format!("http://{addr}/v1/streams/MD/events?from_seq=5")).send().await.unwrap();
    let mut sse = SseReader::new(res.bytes_stream());
    sse.hello().await;
    let gap = sse.next(WAIT).await.unwrap();
    assert_eq!(gap.event.as_deref(), Some("gap"), "{gap:?}");
    assert_eq!(gap.json(), json!({"from": 5, "to": 20}));
    assert_eq!(gap.seq(), 20, "the gap's id lets a client resume after it");
    let seqs: Vec<u64> = {
        let mut v = Vec::new();
        for _ in 0..10 {
            v.push(sse.next(WAIT).await.unwrap().seq());
        }
        v
    };
    assert_eq!(seqs, (21..=30).collect::<Vec<_>>());
}

async fn heartbeat_comments_when_idle<H: Harness>() {
    let config = GatewayConfig {
        subscriptions: SubscriptionConfig { heartbeat: Duration::from_millis(50), ..Default::default() },
        ..Default::default()
    };
    let gw = Gw::with_config::<H>(config).await;
    gw.stream("MD", json!({"subjects": ["md.>"]})).await;
    let mut sse = sse_oneshot(&gw, "/v1/streams/MD/events", &[]).await;
    sse.hello().await;
    // Idle: heartbeat comments arrive (and nothing else); then a message
    // still comes through on the same subscription.
    sse.comments_at_least(2, WAIT).await;
    gw.publish_n("MD", "md.x", 1).await;
    assert_eq!(sse.next(WAIT).await.unwrap().seq(), 1);
}

per_engine!(gap_event_after_retention, heartbeat_comments_when_idle);
