//! CORS for browsers (`[cors]`): preflights from an allowed origin are
//! answered before authentication; answers to it (errors and SSE included)
//! carry the origin, credentials and exposed headers; another origin, or a
//! gateway without `[cors]`, gets no CORS header at all.

mod support;

use std::time::Duration;

use axum::body::Body;
use axum::http::Method;
use finmesh_gateway::{CorsConfig, GatewayConfig};
use serde_json::json;
use support::auth::{AuthKit, bearer};
use support::{Gw, Harness, Res};

const ORIGIN: &str = "http://127.0.0.1:4100";

async fn gateway<H: Harness>(kit: &AuthKit) -> Gw {
    let cors = CorsConfig { allowed_origins: vec![ORIGIN.to_owned()], max_age: Duration::from_secs(90) };
    let config = GatewayConfig { cors: Some(cors), ..GatewayConfig::default() };
    Gw::build::<H>(kit.auth.clone(), config, None).await
}

fn cors_headers(res: &Res) -> Vec<String> {
    res.headers.keys().map(|k| k.as_str().to_owned()).filter(|k| k.starts_with("access-control-")).collect()
}

fn preflight(origin: &str) -> [(&str, &str); 3] {
    [
        ("origin", origin),
        ("access-control-request-method", "GET"),
        ("access-control-request-headers", "authorization, last-event-id"),
    ]
}

async fn preflight_from_an_allowed_origin_is_answered_before_authentication<H: Harness>() {
    let kit = AuthKit::new();
    let gw = gateway::<H>(&kit).await;
    let res = gw.send(Method::OPTIONS, "/v1/streams/S/events", &preflight(ORIGIN), Body::empty()).await;
    assert_eq!(res.status, 204, "{}", res.text());
    assert_eq!(res.header("access-control-allow-origin"), Some(ORIGIN));
    assert_eq!(res.header("access-control-allow-credentials"), Some("true"));
    assert_eq!(res.header("access-control-max-age"), Some("90"));
    let methods = res.header("access-control-allow-methods").unwrap();
    assert!(methods.contains("GET") && methods.contains("PUT") && methods.contains("DELETE"), "{methods}");
    let headers = res.header("access-control-allow-headers").unwrap();
    assert!(headers.contains("authorization") && headers.contains("last-event-id"), "{headers}");
    let vary: Vec<_> = res.headers.get_all("vary").iter().map(|v| v.to_str().unwrap()).collect();
    assert!(vary.contains(&"origin"), "{vary:?}");
}

async fn another_origin_gets_no_cors_header<H: Harness>() {
    let kit = AuthKit::new();
    let gw = gateway::<H>(&kit).await;
    for origin in ["http://127.0.0.1:4101", "https://127.0.0.1:4100", "null", "http://127.0.0.1:4100.evil.test"] {
        let res = gw.send(Method::OPTIONS, "/v1/streams/S/events", &preflight(origin), Body::empty()).await;
        assert_ne!(res.status, 204, "{origin}: a preflight from another origin is not answered");
        assert_eq!(cors_headers(&res), Vec::<String>::new(), "{origin}");
        let token = bearer(&kit.token("ops", "admin"));
        let res = gw.send(Method::GET, "/v1/streams", &[("origin", origin), ("authorization", &token)], "").await;
        assert_eq!(res.status, 200);
        assert_eq!(cors_headers(&res), Vec::<String>::new(), "{origin}");
    }
}

async fn answers_to_an_allowed_origin_carry_cors_headers<H: Harness>() {
    let kit = AuthKit::new();
    let gw = gateway::<H>(&kit).await;
    let token = bearer(&kit.token("ops", "admin"));
    let h = [("origin", ORIGIN), ("authorization", token.as_str())];
    let res = gw.send(Method::PUT, "/v1/streams/S", &h, json!({"subjects": ["s.>"]}).to_string()).await;
    assert_eq!(res.status, 200, "{}", res.text());
    assert_eq!(res.header("access-control-allow-origin"), Some(ORIGIN));
    // An error answer too, or the page could not read why it failed.
    let res = gw.send(Method::GET, "/v1/streams/S/messages", &[("origin", ORIGIN)], "").await;
    res.assert_problem(401, "unauthorized");
    assert_eq!(res.header("access-control-allow-origin"), Some(ORIGIN));
    assert_eq!(res.header("access-control-allow-credentials"), Some("true"));
    let exposed = res.header("access-control-expose-headers").unwrap();
    for name in ["finmesh-stream-epoch", "etag", "retry-after", "www-authenticate"] {
        assert!(exposed.contains(name), "{name} in {exposed}");
    }
    // A subscription's answer (the stream stays open: read the head only).
    let res = gw.send_head(Method::GET, "/v1/streams/S/events", &h).await;
    assert_eq!(res.status(), 200);
    assert_eq!(res.headers()["access-control-allow-origin"], ORIGIN);
    assert!(res.headers().contains_key("finmesh-stream-epoch"));
}

async fn without_cors_config_there_is_no_cors_header<H: Harness>() {
    let kit = AuthKit::new();
    let gw = Gw::with_auth::<H>(kit.auth.clone(), None).await;
    let res = gw.send(Method::OPTIONS, "/v1/streams/S/events", &preflight(ORIGIN), Body::empty()).await;
    assert_eq!(cors_headers(&res), Vec::<String>::new());
    let res = gw.send(Method::GET, "/healthz", &[("origin", ORIGIN)], "").await;
    assert_eq!(res.status, 200);
    assert_eq!(cors_headers(&res), Vec::<String>::new());
    assert!(res.headers.get("vary").is_none(), "no layer at all without [cors]");
}

per_engine!(
    preflight_from_an_allowed_origin_is_answered_before_authentication,
    another_origin_gets_no_cors_header,
    answers_to_an_allowed_origin_carry_cors_headers,
    without_cors_config_there_is_no_cors_header,
);
