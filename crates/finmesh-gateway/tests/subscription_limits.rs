//! Subscriptions are capped per principal (429) and per node (503), SSE
//! and watches alike, with a metric per refusal; and a
//! subscriber's queue is bounded in bytes as well as in frames.

mod support;

use std::time::Duration;

use finmesh_gateway::{GatewayConfig, SubscriptionConfig};
use serde_json::json;
use support::auth::{AuthKit, bearer};
use support::{Gw, Harness, eventually, sse_oneshot};

const WAIT: Duration = Duration::from_secs(10);

async fn subscriptions_are_capped_per_principal_and_per_node<H: Harness>() {
    let kit = AuthKit::new();
    let config = GatewayConfig {
        subscriptions: SubscriptionConfig { max_per_principal: 2, max_total: 3, ..Default::default() },
        ..Default::default()
    };
    let gw = Gw::build::<H>(kit.auth.clone(), config, None).await;
    let admin = bearer(&kit.token("root", "admin"));
    support::auth::seed(&gw, &admin).await;
    let (alice, bob) = (bearer(&kit.token("alice", "admin")), bearer(&kit.token("bob", "admin")));
    let events = "/v1/streams/S/events";
    let a1 = sse_oneshot(&gw, events, &[("authorization", &alice)]).await;
    let _a2 = sse_oneshot(&gw, "/v1/kv/b/watch", &[("authorization", &alice)]).await;
    // A third for alice: her cap.
    let r = gw.send(axum::http::Method::GET, events, &[("authorization", &alice)], "").await;
    let p = r.assert_problem(429, "too-many-subscriptions");
    let detail = p["detail"].as_str().unwrap();
    assert!(detail.contains("`alice`") && detail.contains("subscriptions.max_per_principal"), "{detail}");
    assert_eq!(r.header("retry-after"), Some("1"));
    // Bob takes the node's last place; then the node is full, for him too.
    let _b1 = sse_oneshot(&gw, events, &[("authorization", &bob)]).await;
    let r = gw.send(axum::http::Method::GET, events, &[("authorization", &bob)], "").await;
    let p = r.assert_problem(503, "too-many-subscriptions");
    assert!(p["detail"].as_str().unwrap().contains("subscriptions.max_total"), "{p}");
    // Closing one gives its place back.
    drop(a1);
    eventually(WAIT, "alice's place is free", || async { gw.state.subscriber_count() == 2 }).await;
    let _a3 = sse_oneshot(&gw, events, &[("authorization", &alice)]).await;
    let metrics = gw.get("/metrics").await.text();
    for reason in ["principal", "node"] {
        let line = format!("finmesh_subscriptions_refused_total{{reason=\"{reason}\"}} ");
        assert!(metrics.lines().any(|l| l.starts_with(&line)), "no {line} in\n{metrics}");
    }
}

/// Without token identities (auth off) the per-principal cap counts per
/// client address, as the rate limit does.
async fn without_auth_subscriptions_are_capped_per_client_address<H: Harness>() {
    let config = GatewayConfig {
        subscriptions: SubscriptionConfig { max_per_principal: 1, ..Default::default() },
        ..Default::default()
    };
    let gw = Gw::with_config::<H>(config).await;
    gw.stream("MD", json!({"subjects": ["md.>"]})).await;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let app = gw.app.clone().into_make_service_with_connect_info::<std::net::SocketAddr>();
    let server = tokio::spawn(async move { axum::serve(listener, app).await });
    let from = |ip: &str| {
        let _ = rustls::crypto::aws_lc_rs::default_provider().install_default();
        reqwest::Client::builder().local_address(ip.parse::<std::net::IpAddr>().unwrap()).build().unwrap()
    };
    let url = format!("http://{addr}/v1/streams/MD/events");
    let (one, two) = (from("127.0.0.1"), from("127.0.0.2"));
    let first = one.get(&url).send().await.unwrap();
    assert_eq!(first.status(), 200);
    let refused = one.get(&url).send().await.unwrap();
    assert_eq!(refused.status(), 429);
    let p: serde_json::Value = refused.json().await.unwrap();
    assert!(p["detail"].as_str().unwrap().contains("client address 127.0.0.1"), "{p}");
    let other = two.get(&url).send().await.unwrap();
    assert_eq!(other.status(), 200, "another address has its own place");
    drop((first, other));
    server.abort();
}

async fn a_subscriber_queue_is_bounded_in_bytes<H: Harness>() {
    let config = GatewayConfig {
        subscriptions: SubscriptionConfig {
            queue_max_bytes: 64 * 1024,
            stall_timeout: Duration::from_secs(30),
            ..Default::default()
        },
        ..Default::default()
    };
    let gw = Gw::with_config::<H>(config).await;
    gw.stream("MD", json!({"subjects": ["md.>"]})).await;
    // A JSON string: inline in the envelope, which is a little over 16 KiB.
    let payload = format!("\"{}\"", "x".repeat(16 * 1024 - 2));
    let publish = || async {
        let r = gw.post("/v1/streams/MD/messages?subject=md.x", payload.clone()).await;
        assert_eq!(r.status, 200, "{}", r.text());
    };
    // The subscriber joins the live feed (it reads message 1), then stops reading.
    let mut sse = sse_oneshot(&gw, "/v1/streams/MD/events", &[]).await;
    sse.hello().await;
    publish().await;
    assert_eq!(sse.next(WAIT).await.unwrap().seq(), 1);
    for _ in 0..20 {
        publish().await;
    }
    // The hub fills the queue up to its byte bound (three envelopes of a
    // little over 16 KiB fit in 64 KiB, a fourth does not: cut off).
    eventually(WAIT, "the queue is full by bytes", || async {
        let subs = gw.get("/v1/subscribers").await.json();
        subs["subscribers"][0]["queued"] == 3 && subs["subscribers"][0]["lagged"] == true
    })
    .await;
    let subs = gw.get("/v1/subscribers").await.json();
    let queued_bytes = subs["subscribers"][0]["queued_bytes"].as_u64().unwrap();
    assert!((48 * 1024..=64 * 1024).contains(&queued_bytes), "{subs}");
    let gauge = gw.get("/metrics").await.text();
    assert!(gauge.lines().any(|l| l.starts_with("finmesh_subscriber_queued_bytes ")), "{gauge}");
    // The reader then gets what was queued, in order, and the cut.
    for want in 2..=4 {
        assert_eq!(sse.next(WAIT).await.unwrap().seq(), want);
    }
    let cut = sse.next(WAIT).await.unwrap();
    assert_eq!((cut.event.as_deref(), cut.json()["last_seq"].as_u64()), (Some("error"), Some(4)));
}

per_engine!(
    subscriptions_are_capped_per_principal_and_per_node,
    without_auth_subscriptions_are_capped_per_client_address,
    a_subscriber_queue_is_bounded_in_bytes
);
