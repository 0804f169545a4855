//! A subscriber whose bounded queue is full when the fan-out hub has a frame
//! for it is cut off with `event: error` (reason `slow_consumer`) carrying
//! the last sequence it received, and others are not slowed.

mod support;

use std::time::Duration;

use finmesh_gateway::{GatewayConfig, SubscriptionConfig};
use serde_json::json;
use support::{Gw, Harness, eventually, sse_oneshot};

const WAIT: Duration = Duration::from_secs(10);

async fn slow_subscriber_is_cut_as_slow_consumer<H: Harness>() {
    let config = GatewayConfig {
        subscriptions: SubscriptionConfig { queue_capacity: 4, ..Default::default() },
        ..Default::default()
    };
    let gw = Gw::with_config::<H>(config).await;
    gw.stream("MD", json!({"subjects": ["md.>"]})).await;
    // The subscriber joins the live feed (it reads message 1), then stops reading.
    let mut slow = sse_oneshot(&gw, "/v1/streams/MD/events", &[]).await;
    slow.hello().await;
    gw.publish_n("MD", "md.x", 1).await;
    assert_eq!(slow.next(WAIT).await.unwrap().seq(), 1);
    // 20 more: the hub never waits; the fifth frame finds the queue full.
    gw.publish_n("MD", "md.x", 20).await;
    eventually(WAIT, "the subscriber is cut off", || async {
        let subs = gw.get("/v1/subscribers").await.json();
        subs["subscribers"][0]["lagged"] == true && subs["subscribers"][0]["queued"] == 4
    })
    .await;
    // A fast subscriber on the same stream gets everything.
    let mut fast = sse_oneshot(&gw, "/v1/streams/MD/events?from_seq=1", &[]).await;
    fast.hello().await;
    for want in 1..=21 {
        assert_eq!(fast.next(WAIT).await.unwrap().seq(), want);
    }
    // The slow one gets what was queued, then the error, then the end.
    for want in 2..=5 {
        assert_eq!(slow.next(WAIT).await.unwrap().seq(), want);
    }
    let cut = slow.next(WAIT).await.unwrap();
    assert_eq!(cut.event.as_deref(), Some("error"));
    assert_eq!(cut.json()["reason"], "slow_consumer");
    assert_eq!(cut.json()["last_seq"], 5);
    assert!(slow.next(WAIT).await.is_none(), "the stream ends after the error");
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

per_engine!(slow_subscriber_is_cut_as_slow_consumer, queue_writer_try_push_and_lagged);
