//! Operations: `/healthz`, `/readyz`, `/metrics` (request counts and
//! latency per route and status, publishes, subscriptions, engine errors),
//! `/v1/subscribers` (identity, filter, last sequence, lag), the OpenAPI
//! document (served, and the same as the checked-in docs/openapi.json).

mod support;

use std::time::Duration;

use axum::http::Method;
use serde_json::json;
use support::{Gw, Harness, eventually, sse_oneshot};

async fn health_and_metrics<H: Harness>() {
    let gw = Gw::start::<H>().await;
    assert_eq!(gw.get("/healthz").await.json(), json!({"status": "ok"}));
    assert_eq!(gw.get("/readyz").await.json(), json!({"status": "ready"}));
    // The recorder is process-wide (`cargo test` runs both engines' cases in
    // one process): count this case's publishes as a difference.
    let publishes = |text: &str| -> u64 {
        let line = text.lines().find(|l| l.starts_with("finmesh_publishes_total{stream=\"MDM\"}"));
        line.and_then(|l| l.rsplit(' ').next()).map_or(0, |n| n.parse().expect("a count"))
    };
    let before = publishes(&gw.get("/metrics").await.text());
    gw.stream("MDM", json!({"subjects": ["mdm.>"]})).await;
    gw.publish_n("MDM", "mdm.a", 3).await;
    gw.get("/v1/kv/none/k").await.assert_problem(404, "not-found");
    gw.get("/no/such/path").await.assert_problem(404, "not-found");
    gw.send(Method::from_bytes(b"BREW").unwrap(), "/healthz", &[], "").await.assert_problem(405, "method-not-allowed");
    let mut sse = sse_oneshot(&gw, "/v1/streams/MDM/events", &[]).await;
    sse.hello().await;
    let m = gw.get("/metrics").await;
    assert_eq!(m.status, 200);
    assert!(m.header("content-type").unwrap().starts_with("text/plain"));
    let text = m.text();
    for want in [
        "finmesh_http_requests_total{method=\"POST\",route=\"/v1/streams/{stream}/messages\",status=\"200\"}",
        "finmesh_http_request_duration_seconds_bucket{method=\"GET\",route=\"/v1/kv/{bucket}/{key}\",status=\"404\"",
        "finmesh_engine_errors_total{kind=\"not-found\"}",
        // No route matched; a method outside the standard ones.
        "finmesh_http_requests_total{method=\"GET\",route=\"other\",status=\"404\"}",
        "finmesh_http_requests_total{method=\"other\",route=\"/healthz\",status=\"405\"}",
        "finmesh_subscriptions_active{kind=\"sse\"}",
    ] {
        assert!(text.contains(want), "missing `{want}` in:\n{text}");
    }
    assert_eq!(publishes(&text) - before, 3, "{text}");
}

async fn subscribers_listing<H: Harness>() {
    let gw = Gw::start::<H>().await;
    gw.stream("MD", json!({"subjects": ["md.>"]})).await;
    gw.publish_n("MD", "md.a", 2).await;
    let mut sse = sse_oneshot(&gw, "/v1/streams/MD/events?from_seq=1&subject=md.a", &[]).await;
    sse.hello().await;
    for want in 1..=2 {
        assert_eq!(sse.next(Duration::from_secs(10)).await.unwrap().seq(), want);
    }
    // Three more the filter leaves out: stored, never sent to it.
    gw.publish_n("MD", "md.b", 3).await;
    eventually(Duration::from_secs(10), "the listing shows last_seq 2", || async {
        gw.get("/v1/subscribers").await.json()["subscribers"][0]["last_seq"] == 2
    })
    .await;
    let s = gw.get("/v1/subscribers").await.json()["subscribers"][0].clone();
    assert_eq!(s["kind"], "sse");
    assert_eq!(s["identity"], "anonymous");
    assert_eq!(s["resource"], "MD");
    assert_eq!(s["filter"], "md.a");
    assert_eq!(s["lag"], 3, "5 stored, 2 sent: {s}");
    assert_eq!(s["rate_limit"]["per_second"], 1000);
    drop(sse);
    eventually(Duration::from_secs(10), "the subscriber is gone", || async {
        gw.get("/v1/subscribers").await.json()["subscribers"] == json!([])
    })
    .await;
}

/// Path templates of the OpenAPI document, as `METHOD path`.
async fn openapi_matches_docs<H: Harness>() {
    let gw = Gw::start::<H>().await;
    let served = gw.get("/openapi.json").await;
    assert_eq!(served.status, 200);
    let served = served.json();
    let generated = finmesh_gateway::openapi::openapi_json();
    assert_eq!(served, serde_json::from_str::<serde_json::Value>(&generated).unwrap());
    // The runtime value (cargo and nextest set it), so that a test binary
    // reused from a checkout at another path checks this checkout's file.
    let dir = std::env::var("CARGO_MANIFEST_DIR").unwrap_or_else(|_| env!("CARGO_MANIFEST_DIR").to_owned());
    let path = &format!("{dir}/../../docs/openapi.json");
    if std::env::var_os("FINMESH_UPDATE_OPENAPI").is_some() {
        // Each engine's case writes it: write-then-rename so a reader never
        // sees a half-written file.
        let tmp = format!("{path}.{}.tmp", std::process::id());
        std::fs::write(&tmp, format!("{generated}\n")).expect("write docs/openapi.json");
        std::fs::rename(&tmp, path).expect("replace docs/openapi.json");
    }
    let checked_in = std::fs::read_to_string(path).unwrap_or_default();
    assert!(
        checked_in.trim_end() == generated.trim_end(),
        "docs/openapi.json is out of date: run `FINMESH_UPDATE_OPENAPI=1 cargo test -p finmesh-gateway --test ops`"
    );
    assert_eq!(served["components"]["securitySchemes"]["bearer"]["scheme"], "bearer");
    // That it lists exactly the routes of ROUTE_ACCESS: tests/routes.rs.
}

per_engine!(health_and_metrics, subscribers_listing, openapi_matches_docs);
