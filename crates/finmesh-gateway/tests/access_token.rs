//! The `access_token` query parameter (RFC 6750 §2.3), for browsers whose
//! `EventSource` cannot send `Authorization`: accepted on the subscription
//! routes (SSE events, WebSocket, KV watch) over a real socket, checked
//! like a header token (invalid → 401, wrong scope → 403), refused with 400
//! `invalid_request` on every other route and together with a header, and
//! every answer to it is `Cache-Control: no-store`.

mod support;

use std::time::Duration;

use axum::http::Method;
use futures::StreamExt;
use serde_json::json;
use support::auth::{AuthKit, bearer};
use support::{Gw, Harness, Res, SseReader, http_client};

const WAIT: Duration = Duration::from_secs(10);
const INVALID_REQUEST: &str = "Bearer realm=\"finmesh\", error=\"invalid_request\"";

fn assert_no_store(headers: &axum::http::HeaderMap) {
    let cc = headers.get("cache-control").and_then(|v| v.to_str().ok());
    assert_eq!(cc, Some("no-store, private"), "an answer to a token in the URL is never cached");
}

async fn setup<H: Harness>(kit: &AuthKit) -> Gw {
    let gw = Gw::with_auth::<H>(kit.auth.clone(), None).await;
    let admin = bearer(&kit.token("ops", "admin"));
    let h = [("authorization", admin.as_str())];
    let r = gw.send(Method::PUT, "/v1/streams/S", &h, json!({"subjects": ["s.>"]}).to_string()).await;
    assert_eq!(r.status, 200, "{}", r.text());
    let r = gw.send(Method::PUT, "/v1/kv/b", &h, "").await;
    assert_eq!(r.status, 200, "{}", r.text());
    for i in 1..=3 {
        let r = gw.send(Method::POST, "/v1/streams/S/messages?subject=s.a", &h, format!("{i}")).await;
        assert_eq!(r.status, 200, "{}", r.text());
    }
    let r = gw.send(Method::PUT, "/v1/kv/b/k", &h, "v").await;
    assert_eq!(r.status, 200, "{}", r.text());
    gw
}

async fn sse_and_watch_accept_a_query_token_over_a_socket<H: Harness>() {
    let kit = AuthKit::new();
    let gw = setup::<H>(&kit).await;
    let addr = gw.serve().await;
    let client = http_client();
    let token = kit.token("browser", "stream:subscribe:S kv:read:b");

    let res = client
        .get(format!("http://{addr}/v1/streams/S/events?from_seq=1&access_token={token}"))
        .send()
        .await
        .expect("connect");
    assert_eq!(res.status(), 200);
    assert_no_store(res.headers());
    let mut sse = SseReader::new(res.bytes_stream());
    sse.hello().await;
    for want in 1..=3 {
        assert_eq!(sse.next(WAIT).await.expect("event").seq(), want);
    }

    let res = client.get(format!("http://{addr}/v1/kv/b/watch?access_token={token}")).send().await.expect("connect");
    assert_eq!(res.status(), 200);
    assert_no_store(res.headers());
    let mut sse = SseReader::new(res.bytes_stream());
    sse.hello().await;
    assert_eq!(sse.next(WAIT).await.expect("entry").json()["key"], "k");
}

async fn websocket_accepts_a_query_token<H: Harness>() {
    let kit = AuthKit::new();
    let gw = setup::<H>(&kit).await;
    let addr = gw.serve().await;
    let token = kit.token("browser", "stream:subscribe:S");
    let url = format!("ws://{addr}/v1/streams/S/ws?from_seq=1&access_token={token}");
    let (mut ws, response) = tokio_tungstenite::connect_async(url).await.expect("upgrade");
    assert_no_store(response.headers());
    let frame = tokio::time::timeout(WAIT, ws.next()).await.expect("in time").expect("open").expect("ok");
    let env: serde_json::Value = serde_json::from_str(frame.to_text().expect("text")).expect("JSON");
    assert_eq!(env["seq"], 1);

    let bad = format!("ws://{addr}/v1/streams/S/ws?access_token={}", kit.expired("browser", "stream:subscribe:S"));
    match tokio_tungstenite::connect_async(bad).await {
        Err(tokio_tungstenite::tungstenite::Error::Http(res)) => assert_eq!(res.status(), 401),
        other => panic!("an expired query token must be refused before the upgrade: {other:?}"),
    }
}

async fn a_query_token_is_checked_like_a_header_token<H: Harness>() {
    let kit = AuthKit::new();
    let gw = setup::<H>(&kit).await;
    let get = |uri: String| {
        let gw = &gw;
        async move { gw.send(Method::GET, &uri, &[], "").await }
    };
    let bad = get(format!("/v1/streams/S/events?access_token={}", kit.bad_signature("browser", "admin"))).await;
    bad.assert_problem(401, "unauthorized");
    assert_eq!(bad.header("www-authenticate"), Some(finmesh_auth::BEARER_INVALID_TOKEN));
    assert_no_store(&bad.headers);
    let empty = get("/v1/streams/S/events?access_token=".to_owned()).await;
    empty.assert_problem(401, "unauthorized");

    let wrong = kit.token("browser", "stream:subscribe:T kv:read:b stream:publish:S");
    let res = get(format!("/v1/streams/S/events?access_token={wrong}")).await;
    res.assert_problem(403, "forbidden");
    assert_no_store(&res.headers);
    let res = get(format!("/v1/kv/other/watch?access_token={wrong}")).await;
    res.assert_problem(403, "forbidden");
}

async fn a_query_token_is_refused_outside_subscriptions<H: Harness>() {
    let kit = AuthKit::new();
    let gw = setup::<H>(&kit).await;
    let token = kit.token("browser", "admin");
    let check = |res: Res, what: &str| {
        let p = res.assert_problem(400, "invalid");
        assert!(p["detail"].as_str().unwrap().contains("access_token"), "{what}: {p}");
        assert_eq!(res.header("www-authenticate"), Some(INVALID_REQUEST), "{what}");
        assert!(!res.text().contains(&token), "{what}: the token is not echoed");
        assert_no_store(&res.headers);
    };
    for (method, uri) in [
        (Method::GET, "/v1/kv/b/k"),
        (Method::GET, "/v1/kv/b/keys?prefix=k"),
        (Method::GET, "/v1/streams/S/messages?from_seq=1"),
        (Method::POST, "/v1/streams/S/messages?subject=s.a"),
        (Method::GET, "/v1/streams"),
        (Method::GET, "/v1/subscribers"),
    ] {
        let sep = if uri.contains('?') { '&' } else { '?' };
        let res = gw.send(method.clone(), &format!("{uri}{sep}access_token={token}"), &[], "1").await;
        check(res, uri);
    }
    // Both ways at once, and twice in the query: ambiguous.
    let header = bearer(&token);
    let uri = format!("/v1/streams/S/events?access_token={token}");
    check(gw.send(Method::GET, &uri, &[("authorization", &header)], "").await, "header and query");
    let uri = format!("/v1/streams/S/events?access_token={token}&access_token={token}");
    check(gw.send(Method::GET, &uri, &[], "").await, "twice");
}

per_engine!(
    sse_and_watch_accept_a_query_token_over_a_socket,
    websocket_accepts_a_query_token,
    a_query_token_is_checked_like_a_header_token,
    a_query_token_is_refused_outside_subscriptions,
);
