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

/// The seam a fan-out hub will use: push without waiting, cut off on a full queue.
async fn queue_writer_try_push_and_lagged<H: Harness>() {
    use bytes::Bytes;
    use finmesh_gateway::subscribe::{End, Frame, Item, SubscriberSpec, Subscription};
    let config = GatewayConfig {
        subscriptions: SubscriptionConfig { queue_capacity: 4, ..Default::default() },
        ..Default::default()
    };
    let gw = Gw::with_config::<H>(config).await;
    let spec = SubscriberSpec { kind: "sse", identity: "hub".into(), resource: "MD".into(), filter: None };
    let admitted = Subscription::admit(&gw.state, spec).expect("under the caps");
    let (mut sub, writer) = Subscription::open(&gw.state, admitted, 10);
    let frame = |id| Frame::Message { id, data: Bytes::from_static(b"{}") };
    for id in 11..=14 {
        assert!(writer.try_push(frame(id)).is_ok());
    }
    assert!(writer.try_push(frame(15)).is_err(), "a full queue refuses at once");
    assert_eq!(gw.state.subscriber_count(), 1);
    writer.lagged();
    for want in 11..=14 {
        match sub.next().await {
            Some(Item::Frame(Frame::Message { id, .. })) => assert_eq!(id, want),
            other => panic!("expected message {want}, got {other:?}"),
        }
    }
    match sub.next().await {
        Some(Item::End(End::Lagged { last_sent })) => assert_eq!(last_sent, 14),
        other => panic!("expected lagged, got {other:?}"),
    }
    assert!(sub.next().await.is_none());
    drop(sub);
    assert_eq!(gw.state.subscriber_count(), 0);
}

per_engine!(slow_subscriber_gets_lagged, queue_writer_try_push_and_lagged);
