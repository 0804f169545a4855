//! A subscriber that falls behind its bounded queue is cut off with
//! `event: lagged` carrying the last sequence it received, and others are
//! not slowed; a reader that keeps up replays history at its own pace.

mod support;

use std::time::Duration;

use finmesh_gateway::{GatewayConfig, SubscriptionConfig};
use serde_json::json;
use support::{Gw, Harness, eventually, sse_oneshot};

const WAIT: Duration = Duration::from_secs(10);

async fn slow_subscriber_gets_lagged<H: Harness>() {
    let config = GatewayConfig {
        subscriptions: SubscriptionConfig {
            queue_capacity: 4,
            stall_timeout: Duration::from_millis(200),
            ..Default::default()
        },
        ..Default::default()
    };
    let gw = Gw::with_config::<H>(config).await;
    gw.stream("MD", json!({"subjects": ["md.>"]})).await;
    gw.publish_n("MD", "md.x", 20).await;
    // The response body is not read yet: the queue fills and the feeder gives up.
    let mut slow = sse_oneshot(&gw, "/v1/streams/MD/events?from_seq=1", &[]).await;
    eventually(WAIT, "the subscriber is marked lagged", || async {
        let subs = gw.get("/v1/subscribers").await.json();
        subs["subscribers"][0]["lagged"] == true && subs["subscribers"][0]["queued"] == 4
    })
    .await;
    // A fast subscriber on the same stream gets everything.
    let mut fast = sse_oneshot(&gw, "/v1/streams/MD/events?from_seq=1", &[]).await;
    fast.hello().await;
    for want in 1..=20 {
        assert_eq!(fast.next(WAIT).await.unwrap().seq(), want);
    }
    // The slow one gets what was queued, then the lagged event, then the end.
    slow.hello().await;
    for want in 1..=4 {
        assert_eq!(slow.next(WAIT).await.unwrap().seq(), want);
    }
    let lagged = slow.next(WAIT).await.unwrap();
    assert_eq!(lagged.event.as_deref(), Some("lagged"));
    assert_eq!(lagged.json()["last_seq"], 4);
    assert!(slow.next(WAIT).await.is_none(), "the stream ends after lagged");
}

per_engine!(slow_subscriber_gets_lagged);
