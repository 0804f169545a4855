//! History the stream no longer keeps is reported as an explicit
//! `event: gap`, never skipped silently; a position from another epoch of
//! the stream (recreated, or recovered with loss) gets `event: reset`;
//! heartbeats arrive while idle.

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
    let epoch = gw.get("/v1/streams/MD").await.json()["epoch"].as_u64().expect("stream info has an epoch");
    let res = http_client().get(format!("http://{addr}/v1/streams/MD/events?from_seq=5")).send().await.unwrap();
    let header = res.headers().get("finmesh-stream-epoch").map(|v| v.to_str().unwrap().to_owned());
    assert_eq!(header, Some(epoch.to_string()));
    let mut sse = SseReader::new(res.bytes_stream());
    sse.hello().await;
    let gap = sse.next(WAIT).await.unwrap();
    assert_eq!(gap.event.as_deref(), Some("gap"), "{gap:?}");
    assert_eq!(gap.json(), json!({"from": 5, "to": 20, "epoch": epoch}));
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

/// A client resuming under the epoch it got keeps going; one whose epoch is
/// no longer the stream's (recreated here) is told `reset` with the new
/// epoch and the stream's last sequence, then gets new messages.
async fn reset_event_when_the_epoch_changed<H: Harness>() {
    let gw = Gw::start::<H>().await;
    gw.stream("MD", json!({"subjects": ["md.>"]})).await;
    gw.publish_n("MD", "md.x", 5).await;
    let old = gw.get("/v1/streams/MD").await.json()["epoch"].as_u64().unwrap();
    let same = format!("/v1/streams/MD/events?epoch={old}");
    let mut sse = sse_oneshot(&gw, &same, &[("last-event-id", "3")]).await;
    sse.hello().await;
    let next = sse.next(WAIT).await.unwrap();
    assert_eq!((next.event.as_deref(), next.seq()), (None, 4), "{next:?}");
    drop(sse);

    assert_eq!(gw.delete("/v1/streams/MD").await.status, 204);
    gw.stream("MD", json!({"subjects": ["md.>"]})).await;
    gw.publish_n("MD", "md.x", 2).await;
    let new = gw.get("/v1/streams/MD").await.json()["epoch"].as_u64().unwrap();
    assert_ne!(new, old);
    let mut sse = sse_oneshot(&gw, &same, &[("last-event-id", "3")]).await;
    sse.hello().await;
    let reset = sse.next(WAIT).await.unwrap();
    assert_eq!(reset.event.as_deref(), Some("reset"), "{reset:?}");
    assert_eq!((reset.json()["epoch"].as_u64(), reset.json()["last_seq"].as_u64()), (Some(new), Some(2)));
    assert_eq!(reset.seq(), 2, "the reset's id is where the client now stands");
    gw.publish_n("MD", "md.x", 1).await;
    assert_eq!(sse.next(WAIT).await.unwrap().seq(), 3);
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

/// A heartbeat goes out when the subscription has been idle for the
/// heartbeat interval, counted from its last message: none while messages
/// flow for longer than the interval, and the first one no sooner than the
/// interval after the last message.
async fn heartbeat_counts_from_the_last_message<H: Harness>() {
    const BEAT: Duration = Duration::from_millis(500);
    let config = GatewayConfig {
        subscriptions: SubscriptionConfig { heartbeat: BEAT, ..Default::default() },
        ..Default::default()
    };
    let gw = Gw::with_config::<H>(config).await;
    gw.stream("MD", json!({"subjects": ["md.>"]})).await;
    let mut sse = sse_oneshot(&gw, "/v1/streams/MD/events", &[]).await;
    sse.hello().await;
    // Messages back to back, each awaited on the subscription, for 1.5
    // intervals: a timer not re-armed by them would beat in between.
    let started = std::time::Instant::now();
    let mut want = 0;
    let mut last = started;
    while started.elapsed() < BEAT * 3 / 2 {
        want += 1;
        gw.publish_n("MD", "md.x", 1).await;
        assert_eq!(sse.next(WAIT).await.unwrap().seq(), want);
        last = std::time::Instant::now();
    }
    assert_eq!(sse.comments, 0, "a heartbeat went out while messages flowed");
    sse.comments_at_least(1, WAIT).await;
    let quiet = last.elapsed();
    assert!(quiet >= BEAT - Duration::from_millis(20), "the heartbeat came {quiet:?} after the last message");
}

per_engine!(
    gap_event_after_retention,
    reset_event_when_the_epoch_changed,
    heartbeat_comments_when_idle,
    heartbeat_counts_from_the_last_message
);
