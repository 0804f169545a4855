//! The subscriber registry (`/v1/subscribers/{id}`): CRUD with CAS and
//! precise validation, one registry for every gateway on an engine,
//! enforcement of allowed filters and rate limits at subscribe time, and the
//! live status of a registered server (connection, lag, bytes, disconnect
//! reasons) on the node that serves it.

mod support;

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use axum::http::Method;
use finmesh_auth::Authenticator;
use finmesh_gateway::{AppState, GatewayConfig, SubscriptionConfig, app};
use serde_json::{Value, json};
use support::auth::{AuthKit, bearer};
use support::{Gw, Harness, Res, SseReader, eventually, http_client, sse_oneshot};

const WAIT: Duration = Duration::from_secs(15);

/// A gateway with auth on, stream `S` on `s.>`, and an admin token.
async fn setup<H: Harness>(subscriptions: SubscriptionConfig) -> (Gw, AuthKit, String) {
    let kit = AuthKit::new();
    let config = GatewayConfig { subscriptions, ..Default::default() };
    let gw = Gw::build::<H>(kit.auth.clone(), config, None).await;
    let admin = bearer(&kit.token("root", "admin"));
    let r = gw
        .send(Method::PUT, "/v1/streams/S", &[("authorization", &admin)], json!({"subjects": ["s.>"]}).to_string())
        .await;
    assert_eq!(r.status, 200, "{}", r.text());
    (gw, kit, admin)
}

async fn register(gw: &Gw, admin: &str, id: &str, body: Value) -> Res {
    gw.send(Method::PUT, &format!("/v1/subscribers/{id}"), &[("authorization", admin)], body.to_string()).await
}

async fn status(gw: &Gw, admin: &str, id: &str) -> Value {
    let r = gw.send(Method::GET, &format!("/v1/subscribers/{id}"), &[("authorization", admin)], "").await;
    assert_eq!(r.status, 200, "{}", r.text());
    r.json()["status"].clone()
}

async fn publish(gw: &Gw, admin: &str, n: usize) {
    let body: String = (0..n).map(|i| format!("{{\"subject\":\"s.a\",\"payload\":{{\"i\":{i}}}}}\n")).collect();
    let h = [("authorization", admin), ("content-type", "application/x-ndjson")];
    let r = gw.send(Method::POST, "/v1/streams/S/messages", &h, body).await;
    assert_eq!(r.status, 200, "{}", r.text());
}

/// Serve `gw` on a loopback socket, recording each client's address (as
/// `finmesh serve` does).
async fn serve_with_peers(gw: &Gw) -> std::net::SocketAddr {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("addr");
    let app = gw.app.clone().into_make_service_with_connect_info::<std::net::SocketAddr>();
    let drain = gw.state.drain_token();
    tokio::spawn(async move {
        let _ = axum::serve(listener, app).with_graceful_shutdown(async move { drain.cancelled().await }).await;
    });
    addr
}

/// An SSE subscription over a real socket.
async fn sse_socket(addr: std::net::SocketAddr, uri: &str, token: &str) -> SseReader {
    let res = http_client()
        .get(format!("http://{addr}{uri}"))
        .header("authorization", bearer(token))
        .send()
        .await
        .expect("subscribe");
    assert_eq!(res.status(), 200, "{uri}");
    SseReader::new(res.bytes_stream())
}

async fn crud_with_cas_and_precise_validation<H: Harness>() {
    let (gw, kit, admin) = setup::<H>(SubscriptionConfig::default()).await;
    let body = json!({"identity": "srv-eu1", "region": "eu-west", "filters": ["s.eu.>"],
        "rate_limit": {"messages_per_second": 100, "bytes_per_second": 100000}, "notes": "Frankfurt"});
    let r = register(&gw, &admin, "eu1", body.clone()).await;
    assert_eq!(r.status, 200, "{}", r.text());
    let etag = r.header("etag").expect("etag").to_owned();
    assert_eq!(etag, format!("\"{}\"", r.json()["revision"]));

    let got = gw.send(Method::GET, "/v1/subscribers/eu1", &[("authorization", &admin)], "").await;
    assert_eq!(got.status, 200, "{}", got.text());
    assert_eq!(got.header("etag"), Some(etag.as_str()));
    let v = got.json();
    for field in ["identity", "region", "filters", "rate_limit", "notes"] {
        assert_eq!(v[field], body[field], "{field}: {v}");
    }
    assert_eq!(v["id"], "eu1");
    assert_eq!(v["status"]["connected"], false);
    assert!(v["status"]["node"].as_str().is_some_and(|n| !n.is_empty()), "{v}");

    // A read scope reads, and only admin writes.
    let reader = bearer(&kit.token("ops", "subscribers:read"));
    let r = gw.send(Method::GET, "/v1/subscribers/eu1", &[("authorization", &reader)], "").await;
    assert_eq!(r.status, 200, "{}", r.text());
    let r = gw.send(Method::GET, "/v1/subscribers", &[("authorization", &reader)], "").await;
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.json()["registered"][0]["id"], "eu1");
    register(&gw, &reader, "eu2", body.clone()).await.assert_problem(403, "forbidden");

    // CAS: a stale If-Match and a create-only on an existing id are 412.
    let h = [("authorization", admin.as_str()), ("if-match", "\"999999\"")];
    gw.send(Method::PUT, "/v1/subscribers/eu1", &h, body.to_string()).await.assert_problem(412, "wrong-revision");
    let h = [("authorization", admin.as_str()), ("if-none-match", "*")];
    gw.send(Method::PUT, "/v1/subscribers/eu1", &h, body.to_string()).await.assert_problem(412, "wrong-revision");
    let h = [("authorization", admin.as_str()), ("if-match", etag.as_str())];
    let r = gw.send(Method::PUT, "/v1/subscribers/eu1", &h, body.to_string()).await;
    assert_eq!(r.status, 200, "{}", r.text());
    let etag = r.header("etag").unwrap().to_owned();

    // Validation: every problem at once, each naming its field.
    let bad = json!({"identity": "", "filters": ["s..x", "s.>"], "rate_limit": {"messages_per_second": 0}});
    let p = register(&gw, &admin, "eu2", bad).await.assert_problem(400, "invalid");
    let detail = p["detail"].as_str().unwrap();
    for want in ["identity:", "filters[0]:", "rate_limit.messages_per_second:"] {
        assert!(detail.contains(want), "{detail}");
    }
    let p = register(&gw, &admin, "eu2", json!({"identity": "x", "filters": [">"], "colour": "red"}))
        .await
        .assert_problem(400, "invalid");
    assert!(p["detail"].as_str().unwrap().contains("colour"), "{p}");
    register(&gw, &admin, "eu2", json!({"identity": "x", "filters": []})).await.assert_problem(400, "invalid");
    register(&gw, &admin, "a.b", json!({"identity": "x", "filters": [">"]})).await.assert_problem(400, "invalid");
    // One identity, one registration.
    let p = register(&gw, &admin, "eu2", body.clone()).await.assert_problem(409, "already-exists");
    assert!(p["detail"].as_str().unwrap().contains("eu1"), "{p}");
    // The bucket is internal: clients cannot touch it through /v1/kv.
    let r = gw.send(Method::GET, "/v1/kv/_finmesh_subscribers/eu1", &[("authorization", &admin)], "").await;
    r.assert_problem(400, "invalid");

    // Delete: a stale If-Match is 412, then 204, then 404.
    let h = [("authorization", admin.as_str()), ("if-match", "\"1\"")];
    if etag != "\"1\"" {
        gw.send(Method::DELETE, "/v1/subscribers/eu1", &h, "").await.assert_problem(412, "wrong-revision");
    }
    let r = gw.send(Method::DELETE, "/v1/subscribers/eu1", &[("authorization", &admin)], "").await;
    assert_eq!(r.status, 204, "{}", r.text());
    let r = gw.send(Method::GET, "/v1/subscribers/eu1", &[("authorization", &admin)], "").await;
    r.assert_problem(404, "not-found");
    let r = gw.send(Method::DELETE, "/v1/subscribers/eu1", &[("authorization", &admin)], "").await;
    r.assert_problem(404, "not-found");
}

async fn filters_outside_the_registration_are_refused<H: Harness>() {
    let (gw, kit, admin) = setup::<H>(SubscriptionConfig::default()).await;
    let r = register(&gw, &admin, "eu1", json!({"identity": "srv-eu1", "filters": ["s.eu.>"]})).await;
    assert_eq!(r.status, 200, "{}", r.text());
    let token = bearer(&kit.token("srv-eu1", "stream:subscribe:S"));
    for uri in ["/v1/streams/S/events?subject=s.us.x", "/v1/streams/S/events?subject=s.%3E", "/v1/streams/S/events"] {
        let r = gw.send(Method::GET, uri, &[("authorization", &token)], "").await;
        let p = r.assert_problem(403, "forbidden");
        let detail = p["detail"].as_str().unwrap();
        assert!(detail.contains("not allowed for subscriber `eu1`") && detail.contains("`s.eu.>`"), "{uri}: {detail}");
    }
    let named = gw.send(Method::GET, "/v1/streams/S/events?subject=s.us.x", &[("authorization", &token)], "").await;
    assert!(named.json()["detail"].as_str().unwrap().contains("`s.us.x`"), "{}", named.text());
    // Over WebSocket too, before the upgrade.
    let addr = gw.serve().await;
    let mut req = tokio_tungstenite::tungstenite::client::IntoClientRequest::into_client_request(format!(
        "ws://{addr}/v1/streams/S/ws?subject=s.us.x"
    ))
    .unwrap();
    req.headers_mut().insert("authorization", token.parse().unwrap());
    match tokio_tungstenite::connect_async(req).await {
        Err(tokio_tungstenite::tungstenite::Error::Http(res)) => assert_eq!(res.status(), 403),
        other => panic!("expected 403, got {:?}", other.map(|(_, r)| r.status())),
    }
    // An allowed filter subscribes; an unregistered identity keeps today's behaviour.
    let mut ok = sse_oneshot(&gw, "/v1/streams/S/events?subject=s.eu.x", &[("authorization", &token)]).await;
    ok.hello().await;
    let other = bearer(&kit.token("someone", "stream:subscribe:S"));
    let mut free = sse_oneshot(&gw, "/v1/streams/S/events", &[("authorization", &other)]).await;
    free.hello().await;
}

async fn require_registration_refuses_unregistered_identities<H: Harness>() {
    let subs = SubscriptionConfig { require_registration: true, ..Default::default() };
    let (gw, kit, admin) = setup::<H>(subs).await;
    let stranger = bearer(&kit.token("stranger", "stream:subscribe:S"));
    let r = gw.send(Method::GET, "/v1/streams/S/events", &[("authorization", &stranger)], "").await;
    let p = r.assert_problem(403, "forbidden");
    assert!(p["detail"].as_str().unwrap().contains("require_registration"), "{p}");
    let r = register(&gw, &admin, "st", json!({"identity": "stranger", "filters": [">"]})).await;
    assert_eq!(r.status, 200, "{}", r.text());
    let mut sse = sse_oneshot(&gw, "/v1/streams/S/events", &[("authorization", &stranger)]).await;
    sse.hello().await;
}

async fn status_shows_connection_lag_bytes_and_disconnect_reasons<H: Harness>() {
    let subs = SubscriptionConfig { heartbeat: Duration::from_millis(100), queue_capacity: 4, ..Default::default() };
    let (gw, kit, admin) = setup::<H>(subs).await;
    let body = json!({"identity": "srv-eu1", "filters": ["s.>"], "rate_limit": {"messages_per_second": 1}});
    assert_eq!(register(&gw, &admin, "eu1", body).await.status, 200);
    let token = kit.token("srv-eu1", "stream:subscribe:S");
    let addr = serve_with_peers(&gw).await;

    // Connected over a socket, paced at 1 message/s: lag shows while it reads.
    let mut sse = sse_socket(addr, "/v1/streams/S/events?subject=s.%3E&from_seq=1", &token).await;
    sse.hello().await;
    publish(&gw, &admin, 3).await;
    assert_eq!(sse.next(WAIT).await.unwrap().seq(), 1);
    eventually(WAIT, "status: connected, behind the head", || async {
        let st = status(&gw, &admin, "eu1").await;
        let c = &st["connections"][0];
        st["connected"] == true && c["lag_messages"].as_u64().is_some_and(|l| l >= 1) && c["lag_ms"].is_u64()
    })
    .await;
    let st = status(&gw, &admin, "eu1").await;
    let c = &st["connections"][0];
    assert_eq!(c["filter"], "s.>", "{st}");
    assert_eq!(c["stream"], "S");
    assert_eq!(c["kind"], "sse");
    assert!(c["peer"].as_str().is_some_and(|p| p.starts_with("127.0.0.1:")), "{st}");
    assert!(c["bytes_sent"].as_u64().unwrap() > 0, "{st}");
    for want in 2..=3 {
        assert_eq!(sse.next(WAIT).await.unwrap().seq(), want);
    }
    eventually(WAIT, "caught up", || async {
        let st = status(&gw, &admin, "eu1").await;
        st["connections"][0]["last_seq"] == 3 && st["connections"][0]["lag_messages"] == 0
    })
    .await;

    // The client closes: the node records it.
    drop(sse);
    eventually(WAIT, "client_closed recorded", || async {
        let st = status(&gw, &admin, "eu1").await;
        st["connected"] == false && st["disconnects"]["client_closed"] == 1
    })
    .await;
    let st = status(&gw, &admin, "eu1").await;
    assert_eq!(st["last_disconnect"]["reason"], "client_closed", "{st}");
    assert!(st["bytes_sent"].as_u64().unwrap() > 0 && st["messages_sent"].as_u64().unwrap() >= 3, "{st}");

    // A reader that stops reading is cut as a slow consumer: recorded too
    // (unpaced now, so what was queued comes at once).
    assert_eq!(register(&gw, &admin, "eu1", json!({"identity": "srv-eu1", "filters": ["s.>"]})).await.status, 200);
    let auth = bearer(&token);
    let mut slow = sse_oneshot(&gw, "/v1/streams/S/events?subject=s.%3E", &[("authorization", &auth)]).await;
    slow.hello().await;
    // It joins the live feed (reads message 4), then stops reading.
    publish(&gw, &admin, 1).await;
    assert_eq!(slow.next(WAIT).await.unwrap().seq(), 4);
    publish(&gw, &admin, 30).await;
    loop {
        let ev = slow.next(WAIT).await.expect("the cut ends the stream with an error");
        if ev.event.as_deref() == Some("error") {
            assert_eq!(ev.json()["reason"], "slow_consumer");
            break;
        }
    }
    assert!(slow.next(WAIT).await.is_none());
    drop(slow);
    eventually(WAIT, "slow_consumer recorded", || async {
        let st = status(&gw, &admin, "eu1").await;
        st["disconnects"]["slow_consumer"] == 1 && st["last_disconnect"]["reason"] == "slow_consumer"
    })
    .await;
    // The list says the same, with the node.
    let list = gw.send(Method::GET, "/v1/subscribers", &[("authorization", &admin)], "").await.json();
    assert_eq!(list["registered"][0]["status"]["disconnects"]["slow_consumer"], 1, "{list}");
    assert_eq!(list["node"], list["registered"][0]["status"]["node"]);
    // Metrics per registered id.
    let metrics = gw.get("/metrics").await.text();
    for want in [
        "finmesh_subscriber_disconnects_total{id=\"eu1\",reason=\"slow_consumer\"}",
        "finmesh_subscriber_disconnects_total{id=\"eu1\",reason=\"client_closed\"}",
        "finmesh_subscriber_sent_messages_total{id=\"eu1\"}",
        "finmesh_subscriber_sent_bytes_total{id=\"eu1\"}",
        "finmesh_subscriber_disconnected_seconds{id=\"eu1\"}",
    ] {
        assert!(metrics.contains(want), "{want} missing");
    }
}

async fn a_rate_limited_subscriber_never_slows_another<H: Harness>() {
    const N: usize = 300;
    const RATE: u64 = 20;
    let (gw, kit, admin) = setup::<H>(SubscriptionConfig::default()).await;
    let body = json!({"identity": "paced", "filters": [">"], "rate_limit": {"messages_per_second": RATE}});
    assert_eq!(register(&gw, &admin, "paced", body).await.status, 200);
    publish(&gw, &admin, N).await;
    let addr = gw.serve().await;

    let started = Instant::now();
    let mut paced =
        sse_socket(addr, "/v1/streams/S/events?from_seq=1", &kit.token("paced", "stream:subscribe:S")).await;
    paced.hello().await;
    let received = Arc::new(AtomicU64::new(0));
    let counter = received.clone();
    let reader = tokio::spawn(async move {
        let mut last = 0;
        while let Some(ev) = paced.next(WAIT).await {
            assert_eq!(ev.seq(), last + 1, "in order, no gap");
            last = ev.seq();
            counter.fetch_add(1, Ordering::SeqCst);
            if last == 2 * RATE {
                return;
            }
        }
    });

    let mut fast = sse_socket(addr, "/v1/streams/S/events?from_seq=1", &kit.token("fast", "stream:subscribe:S")).await;
    fast.hello().await;
    for want in 1..=N as u64 {
        assert_eq!(fast.next(WAIT).await.unwrap().seq(), want);
    }
    let elapsed = started.elapsed().as_secs_f64();
    let paced_so_far = received.load(Ordering::SeqCst);
    // A bucket of one second's worth, then RATE per second.
    let bound = RATE as f64 * (1.0 + elapsed) + 1.0;
    assert!((paced_so_far as f64) <= bound, "paced got {paced_so_far} in {elapsed:.3}s (bound {bound:.1})");
    // And it keeps going, in order, at its own pace.
    tokio::time::timeout(WAIT, reader).await.expect("the paced reader finishes").expect("reader");
    let elapsed = started.elapsed().as_secs_f64();
    assert!(elapsed >= (RATE as f64 - 1.0) / RATE as f64, "2×RATE messages took at least ~1 s: {elapsed:.3}s");
}

/// A registered server disconnected longer than the threshold is a
/// readiness detail (never a failure) and a metric; connected, it is not.
async fn a_long_disconnect_shows_in_readiness_and_metrics<H: Harness>() {
    let subs = SubscriptionConfig { registered_disconnect_alert: Duration::ZERO, ..Default::default() };
    let (gw, kit, admin) = setup::<H>(subs).await;
    assert_eq!(register(&gw, &admin, "eu1", json!({"identity": "srv-eu1", "filters": [">"]})).await.status, 200);
    let ready = gw.get("/readyz").await;
    assert_eq!(ready.status, 200, "{}", ready.text());
    assert_eq!(ready.json()["status"], "ready");
    assert_eq!(ready.json()["disconnected_subscribers"][0]["id"], "eu1", "{}", ready.text());
    let metrics = gw.get("/metrics").await.text();
    assert!(metrics.contains("finmesh_subscribers_disconnected_over_threshold 1"), "{metrics}");

    let auth = bearer(&kit.token("srv-eu1", "stream:subscribe:S"));
    let mut sse = sse_oneshot(&gw, "/v1/streams/S/events", &[("authorization", &auth)]).await;
    sse.hello().await;
    let ready = gw.get("/readyz").await.json();
    assert!(ready.get("disconnected_subscribers").is_none(), "{ready}");
    let metrics = gw.get("/metrics").await.text();
    assert!(metrics.contains("finmesh_subscribers_disconnected_over_threshold 0"), "{metrics}");
    assert!(metrics.contains("finmesh_subscriber_connections{id=\"eu1\"} 1"), "{metrics}");
}

/// A WebSocket connection shows in the status as `ws` with its peer, and a
/// drain is recorded as its disconnect reason.
async fn websocket_status_and_drain_reason<H: Harness>() {
    use futures::StreamExt;
    let (gw, kit, admin) = setup::<H>(SubscriptionConfig::default()).await;
    assert_eq!(register(&gw, &admin, "ws1", json!({"identity": "srv-ws1", "filters": ["s.>"]})).await.status, 200);
    let addr = serve_with_peers(&gw).await;
    let mut req = tokio_tungstenite::tungstenite::client::IntoClientRequest::into_client_request(format!(
        "ws://{addr}/v1/streams/S/ws?subject=s.a&from_seq=1"
    ))
    .unwrap();
    let token = bearer(&kit.token("srv-ws1", "stream:subscribe:S"));
    req.headers_mut().insert("authorization", token.parse().unwrap());
    let (mut ws, _) = tokio_tungstenite::connect_async(req).await.expect("connect");
    publish(&gw, &admin, 2).await;
    for _ in 0..2 {
        let msg = tokio::time::timeout(WAIT, ws.next()).await.expect("in time").expect("open").expect("frame");
        assert!(msg.is_text(), "{msg:?}");
    }
    let st = status(&gw, &admin, "ws1").await;
    let c = &st["connections"][0];
    assert_eq!((c["kind"].as_str(), c["filter"].as_str(), c["last_seq"].as_u64()), (Some("ws"), Some("s.a"), Some(2)));
    assert!(c["peer"].as_str().is_some_and(|p| p.starts_with("127.0.0.1:")), "{st}");
    gw.state.begin_drain();
    eventually(WAIT, "drain recorded", || async {
        let st = status(&gw, &admin, "ws1").await;
        st["connected"] == false && st["disconnects"]["drain"] == 1
    })
    .await;
}

/// Two gateways on one engine see one registry; status is per node.
async fn the_registry_is_shared_by_gateways_on_one_engine<H: Harness>() {
    let gw = Gw::start::<H>().await;
    let second = AppState::new(gw.state.engine().clone(), Authenticator::disabled(), GatewayConfig::default());
    let other = Gw2 { app: app(second) };
    shared_registry(&gw.app, &other.app).await;
}

struct Gw2 {
    app: axum::Router,
}

async fn call(app: &axum::Router, method: Method, uri: &str, body: String) -> (u16, Value) {
    use http_body_util::BodyExt;
    use tower::ServiceExt;
    let req = axum::http::Request::builder().method(method).uri(uri).body(axum::body::Body::from(body)).unwrap();
    let res = app.clone().oneshot(req).await.unwrap();
    let status = res.status().as_u16();
    let bytes = res.into_body().collect().await.unwrap().to_bytes();
    (status, serde_json::from_slice(&bytes).unwrap_or(Value::Null))
}

async fn shared_registry(a: &axum::Router, b: &axum::Router) {
    let (s, v) = call(a, Method::PUT, "/v1/streams/S", json!({"subjects": ["s.>"]}).to_string()).await;
    assert_eq!(s, 200, "{v}");
    // B reads the (empty) registry first, so its snapshot is cached.
    let (s, _) = call(b, Method::GET, "/v1/subscribers", String::new()).await;
    assert_eq!(s, 200);
    let body = json!({"identity": "anonymous", "filters": ["s.eu.>"]}).to_string();
    let (s, v) = call(a, Method::PUT, "/v1/subscribers/all", body).await;
    assert_eq!(s, 200, "{v}");
    let (s, v) = call(b, Method::GET, "/v1/subscribers/all", String::new()).await;
    assert_eq!(s, 200, "{v}");
    assert_eq!(v["filters"][0], "s.eu.>");
    let (_, la) = call(a, Method::GET, "/v1/subscribers", String::new()).await;
    let (_, lb) = call(b, Method::GET, "/v1/subscribers", String::new()).await;
    assert_ne!(la["node"], lb["node"], "each node names itself");
    assert_eq!(lb["registered"][0]["id"], "all");
    // B enforces A's registration (within the registry's refresh interval).
    eventually(WAIT, "B refuses a filter A's registration does not allow", || async {
        call(b, Method::GET, "/v1/streams/S/events?subject=s.us.x", String::new()).await.0 == 403
    })
    .await;
}

per_engine!(
    crud_with_cas_and_precise_validation,
    filters_outside_the_registration_are_refused,
    require_registration_refuses_unregistered_identities,
    status_shows_connection_lag_bytes_and_disconnect_reasons,
    a_rate_limited_subscriber_never_slows_another,
    the_registry_is_shared_by_gateways_on_one_engine,
    a_long_disconnect_shows_in_readiness_and_metrics,
    websocket_status_and_drain_reason,
);

/// Two gateways, each with its own connection to one `nats-server`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_registry_is_shared_by_two_gateways_on_one_nats_server() {
    let server = finmesh_testkit::NatsServer::start().await.expect("start nats-server");
    let mut apps = Vec::new();
    for _ in 0..2 {
        let options = finmesh_nats::NatsEngineOptions::new(server.url());
        let engine = finmesh_nats::NatsEngine::connect(options).await.expect("connect the NATS engine");
        let state = AppState::new(Arc::new(engine), Authenticator::disabled(), GatewayConfig::default());
        apps.push(app(state));
    }
    tokio::time::timeout(Duration::from_secs(60), shared_registry(&apps[0], &apps[1])).await.expect("in time");
}
