//! Limits as layers: body size (413), per-client rate (429 + Retry-After,
//! with per-subject overrides, per client address without auth, a batch
//! counted by its messages, a detail naming the limit and its setting),
//! load shedding (503 + Retry-After, health probes exempt), request
//! timeout (504), each answered as problem+json.

mod support;

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use finmesh_gateway::{GatewayConfig, Limits, Rate};
use serde_json::json;
use support::{Gw, Harness, eventually};

fn limits(f: impl FnOnce(&mut Limits)) -> GatewayConfig {
    let mut c = GatewayConfig::default();
    f(&mut c.limits);
    c
}

async fn body_limit_is_413<H: Harness>() {
    let gw = Gw::with_config::<H>(limits(|l| l.max_body_bytes = 1024)).await;
    gw.put("/v1/kv/b", "").await;
    assert_eq!(gw.put("/v1/kv/b/k", vec![b'x'; 1024]).await.status, 200);
    let p = gw.put("/v1/kv/b/k", vec![b'x'; 1025]).await.assert_problem(413, "too-large");
    assert!(p["detail"].as_str().unwrap().to_lowercase().contains("length limit"), "{p}");
    // The engine's own value limit is a 413 too.
    gw.put("/v1/kv/small", json!({"max_value_size": 10}).to_string()).await;
    gw.put("/v1/kv/small/k", vec![b'x'; 11]).await.assert_problem(413, "too-large");
}

async fn rate_limit_is_429_per_subject<H: Harness>() {
    let gw = Gw::with_config::<H>(limits(|l| l.rate = Some(Rate { per_second: 1, burst: 2 }))).await;
    assert_eq!(gw.get("/v1/streams").await.status, 200);
    assert_eq!(gw.get("/v1/streams").await.status, 200);
    let r = gw.get("/v1/streams").await;
    let p = r.assert_problem(429, "rate-limited");
    assert_eq!(r.header("retry-after"), Some("1"));
    assert_eq!(p["retry_after"], 1);
    // The detail names whose limit, its value, and the setting that raises it.
    let detail = p["detail"].as_str().unwrap();
    assert!(detail.contains("`anonymous`") && detail.contains("1 requests/s (burst 2)"), "{detail}");
    assert!(detail.contains("`limits.rate`"), "{detail}");
    // Health and metrics are not rate limited.
    assert_eq!(gw.get("/healthz").await.status, 200);

    // An override for the caller's subject (`anonymous` without auth) replaces the default.
    let mut overrides = HashMap::new();
    overrides.insert("anonymous".to_owned(), Rate { per_second: 1000, burst: 50 });
    let gw = Gw::with_config::<H>(limits(|l| {
        l.rate = Some(Rate { per_second: 1, burst: 1 });
        l.rate_overrides = overrides;
    }))
    .await;
    for _ in 0..20 {
        assert_eq!(gw.get("/v1/streams").await.status, 200);
    }
}

/// A batch of N messages counts as N requests: refused (and nothing
/// written) when they do not fit the caller's remaining quota.
async fn a_batch_counts_each_message_against_the_rate<H: Harness>() {
    let gw = Gw::with_config::<H>(limits(|l| l.rate = Some(Rate { per_second: 1, burst: 5 }))).await;
    let engine = gw.state.engine().clone();
    let name = finmesh_core::StreamName::new("B").unwrap();
    let config = finmesh_core::StreamConfig::new(name.clone(), vec![finmesh_core::SubjectPattern::new("b").unwrap()]);
    engine.create_stream(config).await.unwrap();
    let batch = |n: usize| (0..n).map(|i| format!("{{\"subject\":\"b\",\"payload\":{i}}}\n")).collect::<String>();
    let publish = |n: usize| {
        gw.send(
            axum::http::Method::POST,
            "/v1/streams/B/messages",
            &[("content-type", "application/x-ndjson")],
            batch(n),
        )
    };
    assert_eq!(publish(3).await.status, 200, "3 of the 5 allowed at once");
    // 2 left: the request itself takes one, its 3 messages do not fit.
    let p = publish(3).await.assert_problem(429, "rate-limited");
    assert!(p["detail"].as_str().unwrap().contains("`limits.rate`"), "{p}");
    // More messages than the burst can ever pass: the detail says so.
    let p = publish(7).await.assert_problem(429, "rate-limited");
    let detail = p["detail"].as_str().unwrap();
    assert!(detail.contains("a batch of 7 messages") && detail.contains("burst of 5"), "{detail}");
    assert_eq!(engine.stream_info(&name).await.unwrap().state.messages, 3, "refused batches wrote nothing");
}

/// Without token identities (auth off) every client address has its own
/// quota: one busy client does not use up the node's.
async fn without_auth_the_rate_is_per_client_address<H: Harness>() {
    let gw = Gw::with_config::<H>(limits(|l| l.rate = Some(Rate { per_second: 1, burst: 2 }))).await;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let app = gw.app.clone().into_make_service_with_connect_info::<std::net::SocketAddr>();
    let server = tokio::spawn(async move { axum::serve(listener, app).await });
    let from = |ip: &str| {
        let _ = rustls::crypto::aws_lc_rs::default_provider().install_default();
        reqwest::Client::builder().local_address(ip.parse::<std::net::IpAddr>().unwrap()).build().unwrap()
    };
    let (one, two) = (from("127.0.0.1"), from("127.0.0.2"));
    let url = format!("http://{addr}/v1/streams");
    for _ in 0..2 {
        assert_eq!(one.get(&url).send().await.unwrap().status(), 200);
    }
    let refused = one.get(&url).send().await.unwrap();
    assert_eq!(refused.status(), 429);
    let p: serde_json::Value = refused.json().await.unwrap();
    let detail = p["detail"].as_str().unwrap();
    assert!(detail.contains("client address 127.0.0.1") && detail.contains("`limits.rate`"), "{detail}");
    // Another address still has its whole quota.
    for _ in 0..2 {
        assert_eq!(two.get(&url).send().await.unwrap().status(), 200);
    }
    server.abort();
}

/// A range read and a consumer fetch return at most `max_read_bytes` of
/// messages (plus one): fewer messages than asked, and the rest on the
/// next call; a fetch hands out every delivery it took from the engine.
async fn reads_and_fetches_are_bounded_in_bytes<H: Harness>() {
    let gw = Gw::with_config::<H>(limits(|l| l.max_read_bytes = 100 * 1024)).await;
    gw.stream("R", json!({"subjects": ["r"]})).await;
    gw.put("/v1/streams/R/consumers/c", "").await;
    // 20 messages of a little over 16 KiB: 320 KiB stored, 100 KiB per answer.
    let payload = format!("\"{}\"", "x".repeat(16 * 1024 - 2));
    for _ in 0..20 {
        assert_eq!(gw.post("/v1/streams/R/messages?subject=r", payload.clone()).await.status, 200);
    }
    let seqs = |text: String| -> Vec<u64> {
        text.lines().map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap()["seq"].as_u64().unwrap()).collect()
    };
    // Seven messages reach 100 KiB: the seventh is the one over.
    let first = seqs(gw.get("/v1/streams/R/messages?from_seq=1&limit=20").await.text());
    assert_eq!(first, (1..=7).collect::<Vec<_>>());
    let next = seqs(gw.get("/v1/streams/R/messages?from_seq=8&limit=20").await.text());
    assert_eq!(next, (8..=14).collect::<Vec<_>>());
    let fetched = gw.post("/v1/streams/R/consumers/c/fetch", json!({"batch": 20}).to_string()).await.json();
    assert_eq!(fetched["messages"].as_array().unwrap().len(), 7, "{}", fetched["messages"].as_array().unwrap().len());
    let fetched = gw.post("/v1/streams/R/consumers/c/fetch", json!({"batch": 20}).to_string()).await.json();
    assert_eq!(fetched["messages"][0]["seq"], 8, "the next fetch goes on where the last stopped");

    // A stream that stores less than the budget is read whole.
    gw.stream("SMALL", json!({"subjects": ["small"]})).await;
    gw.publish_n("SMALL", "small", 50).await;
    let all = seqs(gw.get("/v1/streams/SMALL/messages?from_seq=1&limit=100").await.text());
    assert_eq!(all, (1..=50).collect::<Vec<_>>());
}

async fn overload_is_shed_with_503<H: Harness>() {
    let gw = Arc::new(Gw::with_config::<H>(limits(|l| l.max_concurrent_requests = 1)).await);
    gw.stream("J", json!({"subjects": ["j"]})).await;
    gw.put("/v1/streams/J/consumers/c", "").await;
    // One long fetch holds the only slot. If a probe takes the slot first,
    // the fetch is the one shed (and finishes at once): start another.
    let hold = |gw: Arc<Gw>| {
        tokio::spawn(
            async move { gw.post("/v1/streams/J/consumers/c/fetch", json!({"wait_ms": 10000}).to_string()).await },
        )
    };
    let holder = Arc::new(std::sync::Mutex::new(hold(gw.clone())));
    eventually(Duration::from_secs(10), "a request is shed", || {
        let (gw, holder) = (gw.clone(), holder.clone());
        async move {
            {
                let mut h = holder.lock().unwrap();
                if h.is_finished() {
                    *h = hold(gw.clone());
                }
            }
            let r = gw.get("/metrics").await;
            if r.status == 503 {
                let p = r.assert_problem(503, "overloaded");
                assert_eq!(r.header("retry-after"), Some("1"), "{p}");
                true
            } else {
                false
            }
        }
    })
    .await;
    // While requests are shed, the health probes still answer.
    assert_eq!(gw.get("/healthz").await.status, 200);
    assert_eq!(gw.get("/readyz").await.status, 200);
    assert_eq!(gw.get("/metrics").await.status, 503, "the slot is still held");
    // Release the slot by dropping the holder.
    let Ok(holder) = Arc::try_unwrap(holder) else { panic!("the probes are done") };
    let holder = holder.into_inner().unwrap();
    holder.abort();
    let _ = holder.await;
    eventually(Duration::from_secs(10), "the slot is free again", || async { gw.get("/metrics").await.status == 200 })
        .await;
}

async fn slow_request_times_out_with_504<H: Harness>() {
    use finmesh_core::{
        ConsumerConfig, ConsumerName, OutgoingMessage, StreamConfig, StreamName, Subject, SubjectPattern,
    };
    let gw = Gw::with_config::<H>(limits(|l| l.request_timeout = Duration::from_millis(200))).await;
    // Set up through the engine: a create may itself take longer than 200 ms.
    let engine = gw.state.engine().clone();
    let name = StreamName::new("J").unwrap();
    engine.create_stream(StreamConfig::new(name.clone(), vec![SubjectPattern::new("j").unwrap()])).await.unwrap();
    engine.create_consumer(&name, ConsumerConfig::new(ConsumerName::new("c").unwrap())).await.unwrap();
    let r = gw.post("/v1/streams/J/consumers/c/fetch", json!({"wait_ms": 5000}).to_string()).await;
    r.assert_problem(504, "timeout");
    // Subscriptions are not cut by the request timeout.
    let mut sse = support::sse_oneshot(&gw, "/v1/streams/J/events", &[]).await;
    sse.hello().await;
    tokio::time::sleep(Duration::from_millis(500)).await; // outlive the timeout, on purpose
    engine.publish(&name, OutgoingMessage::new(Subject::new("j").unwrap(), "1")).await.unwrap();
    assert_eq!(sse.next(Duration::from_secs(10)).await.unwrap().seq(), 1);
}

per_engine!(
    body_limit_is_413,
    rate_limit_is_429_per_subject,
    a_batch_counts_each_message_against_the_rate,
    without_auth_the_rate_is_per_client_address,
    reads_and_fetches_are_bounded_in_bytes,
    overload_is_shed_with_503,
    slow_request_times_out_with_504
);
