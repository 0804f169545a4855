//! `POST /oauth/token` through `oneshot`: a granted token works on the
//! routes its scope grants (and only those), Basic and form client
//! authentication, the RFC 6749 errors (`invalid_client` with its
//! challenge, `invalid_scope`, `unsupported_grant_type`, `invalid_request`),
//! 404 without a client registry, the per-IP and the global rate limits, and
//! the cap on argon2 verifications running at once.

mod support;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use argon2::Params;

use axum::body::Body;
use axum::extract::ConnectInfo;
use axum::http::{Method, Request};
use finmesh_auth::oauth::hash_client_secret_with;
use finmesh_auth::{ClientConfig, ClientRegistry};
use finmesh_gateway::{GatewayConfig, Rate};
use http_body_util::BodyExt;
use serde_json::json;
use support::auth::{AuthKit, basic, bearer};
use support::{Gw, Harness, Res};
use tower::ServiceExt;

const FORM: &str = "application/x-www-form-urlencoded";

async fn token_request(gw: &Gw, authorization: Option<&str>, form: &str) -> Res {
    let mut h = vec![("content-type", FORM)];
    if let Some(a) = authorization {
        h.push(("authorization", a));
    }
    gw.send(Method::POST, "/oauth/token", &h, form.to_owned()).await
}

/// An RFC 6749 §5.2 error: JSON (not problem+json), no caching.
fn assert_oauth_error(r: &Res, status: u16, error: &str) {
    assert_eq!(r.status.as_u16(), status, "{}", r.text());
    assert_eq!(r.header("content-type"), Some("application/json"), "{}", r.text());
    assert_eq!(r.json()["error"], error, "{}", r.text());
    assert!(r.json()["error_description"].as_str().is_some_and(|d| !d.is_empty()));
    assert_eq!(r.header("cache-control"), Some("no-store"));
    assert_eq!(r.header("pragma"), Some("no-cache"));
}

async fn granted_token_is_accepted_within_its_scope<H: Harness>() {
    let kit = AuthKit::new();
    let gw = Gw::with_auth::<H>(kit.auth.clone(), Some(kit.clients())).await;
    gw.send(Method::PUT, "/v1/streams/S", &[("authorization", &bearer(&kit.token("ops", "admin")))], {
        json!({"subjects": ["s.>", "t.>"]}).to_string()
    })
    .await;

    let r = token_request(
        &gw,
        Some(&basic("feed", "feed-secret")),
        "grant_type=client_credentials&scope=stream%3Apublish%3AS%3As.a",
    )
    .await;
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.header("content-type"), Some("application/json"));
    assert_eq!(r.header("cache-control"), Some("no-store"));
    assert_eq!(r.header("pragma"), Some("no-cache"));
    let grant = r.json();
    assert_eq!(grant["token_type"], "Bearer");
    assert_eq!(grant["expires_in"], 120);
    assert_eq!(grant["scope"], "stream:publish:S:s.a");
    let token = bearer(grant["access_token"].as_str().unwrap());

    let publish = |subject: &'static str| {
        let token = token.clone();
        let gw = &gw;
        async move {
            let uri = format!("/v1/streams/S/messages?subject={subject}");
            gw.send(Method::POST, &uri, &[("authorization", &token)], "1").await
        }
    };
    let ok = publish("s.a").await;
    assert_eq!(ok.status, 200, "{}", ok.text());
    assert_eq!(ok.json()["seq"], 1);
    publish("s.b").await.assert_problem(403, "forbidden");
    publish("t.a").await.assert_problem(403, "forbidden");
    let r = gw.send(Method::GET, "/v1/streams/S/messages", &[("authorization", &token)], "").await;
    r.assert_problem(403, "forbidden");

    // Form authentication, no scope: every scope the client may have.
    let r = token_request(&gw, None, "grant_type=client_credentials&client_id=feed&client_secret=feed-secret").await;
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.json()["scope"], "stream:publish:S:s.> stream:subscribe:S:s.>");
    let token = bearer(r.json()["access_token"].as_str().unwrap());
    let r = gw.send(Method::GET, "/v1/streams/S/messages?subject=s.%3E", &[("authorization", &token)], "").await;
    assert_eq!(r.status, 200, "{}", r.text());
    assert!(r.text().contains("\"seq\":1"), "{}", r.text());
}

async fn grant_errors_follow_rfc_6749<H: Harness>() {
    let kit = AuthKit::new();
    let gw = Gw::with_auth::<H>(kit.auth.clone(), Some(kit.clients())).await;
    let gt = "grant_type=client_credentials";

    for auth in [basic("feed", "wrong"), basic("nobody", "feed-secret"), "Basic !!!".to_owned()] {
        let r = token_request(&gw, Some(&auth), gt).await;
        assert_oauth_error(&r, 401, "invalid_client");
        assert!(r.header("www-authenticate").is_some_and(|v| v.starts_with("Basic ")), "{:?}", r.headers);
    }
    let r = token_request(&gw, None, gt).await;
    assert_oauth_error(&r, 401, "invalid_client");
    let r = token_request(&gw, None, "grant_type=client_credentials&client_id=feed&client_secret=nope").await;
    assert_oauth_error(&r, 401, "invalid_client");

    let feed = basic("feed", "feed-secret");
    for scope in ["kv%3Aread%3Ab", "stream%3Apublish%3AS", "bogus", "admin"] {
        let r = token_request(&gw, Some(&feed), &format!("{gt}&scope={scope}")).await;
        assert_oauth_error(&r, 400, "invalid_scope");
    }
    let r = token_request(&gw, Some(&feed), "grant_type=password").await;
    assert_oauth_error(&r, 400, "unsupported_grant_type");
    let r = token_request(&gw, Some(&feed), "scope=stream%3Apublish%3AS%3As.a").await;
    assert_oauth_error(&r, 400, "invalid_request");
    let r = token_request(&gw, Some(&feed), &format!("{gt}&client_id=feed&client_secret=feed-secret")).await;
    assert_oauth_error(&r, 400, "invalid_request");
    let r = gw.send(Method::POST, "/oauth/token", &[("authorization", &feed)], r#"{"grant_type":"x"}"#).await;
    assert_oauth_error(&r, 400, "invalid_request");
    let big = format!("{gt}&pad={}", "x".repeat(finmesh_auth::oauth::MAX_FORM_LEN));
    let r = token_request(&gw, Some(&feed), &big).await;
    assert_oauth_error(&r, 400, "invalid_request");
    // Only POST.
    gw.get("/oauth/token").await.assert_problem(405, "method-not-allowed");
}

async fn no_registry_is_404<H: Harness>() {
    let kit = AuthKit::new();
    let gw = Gw::with_auth::<H>(kit.auth.clone(), None).await;
    let r = token_request(&gw, Some(&basic("feed", "feed-secret")), "grant_type=client_credentials").await;
    r.assert_problem(404, "not-found");
}

/// A client-credentials request for `id`/`secret` from `ip`: (status, has Retry-After).
fn from_ip(gw: &Gw, ip: [u8; 4], id: &str, secret: &str) -> impl std::future::Future<Output = (u16, bool)> + use<> {
    let app = gw.app.clone();
    let auth = basic(id, secret);
    async move {
        let mut req = Request::builder()
            .method(Method::POST)
            .uri("/oauth/token")
            .header("content-type", FORM)
            .header("authorization", auth)
            .body(Body::from("grant_type=client_credentials"))
            .unwrap();
        req.extensions_mut().insert(ConnectInfo(SocketAddr::from((ip, 40_000))));
        let res = app.oneshot(req).await.unwrap();
        let status = res.status().as_u16();
        let retry = res.headers().get("retry-after").is_some();
        let _ = res.into_body().collect().await;
        (status, retry)
    }
}

/// Regression (issue 21): the per-IP rate alone let many addresses add up
/// to unbounded argon2 work. A global rate (`token_rate_global`) caps all
/// clients together: an IP well within its own quota gets 429 once the
/// others used the global one.
async fn global_rate_spans_client_ips<H: Harness>() {
    let kit = AuthKit::new();
    let mut config = GatewayConfig::default();
    config.limits.token_rate = Some(Rate { per_second: 1, burst: 2 });
    config.limits.token_rate_global = Some(Rate { per_second: 1, burst: 3 });
    let gw = Gw::build::<H>(kit.auth.clone(), config, Some(kit.clients())).await;
    let from = |ip: [u8; 4]| from_ip(&gw, ip, "feed", "feed-secret");
    assert_eq!(from([10, 0, 0, 1]).await.0, 200);
    assert_eq!(from([10, 0, 0, 1]).await.0, 200);
    assert_eq!(from([10, 0, 0, 2]).await.0, 200);
    assert_eq!(from([10, 0, 0, 2]).await, (429, true), "10.0.0.2 has used 1 of its 2, but all clients used 3 of 3");
    assert_eq!(from([10, 0, 0, 3]).await, (429, true));
}

/// Regression (issue 21): argon2 verifications were not capped, so a burst
/// of token requests could occupy every blocking thread. With one slot, a
/// request arriving while a (slow) verification runs is answered 503
/// `overloaded` with `Retry-After` at once; the running one still succeeds
/// and frees its slot.
async fn argon2_verifications_are_capped<H: Harness>() {
    let kit = AuthKit::new();
    let mut config = GatewayConfig::default();
    config.limits.max_concurrent_token_grants = 1;
    let slow = Params::new(64 * 1024, 12, 1, None).expect("argon2 params");
    let clients = vec![
        ClientConfig {
            id: "slow".into(),
            secret_hash: hash_client_secret_with("slow-secret", slow).expect("hash"),
            scopes: vec!["stream:subscribe:S".into()],
            ttl_secs: Some(60),
        },
        ClientConfig {
            id: "feed".into(),
            secret_hash: hash_client_secret_with("feed-secret", Params::new(1024, 1, 1, None).unwrap()).unwrap(),
            scopes: vec!["stream:subscribe:S".into()],
            ttl_secs: Some(60),
        },
    ];
    let registry = Arc::new(ClientRegistry::new(clients, kit.issuer.clone()).expect("registry"));
    let gw = Gw::build::<H>(kit.auth.clone(), config, Some(registry)).await;
    let slow = tokio::spawn(from_ip(&gw, [10, 0, 0, 1], "slow", "slow-secret"));
    let state = gw.state.clone();
    support::eventually(Duration::from_secs(10), "the slow verification runs", || {
        let running = state.token_grants_running();
        async move { running == 1 }
    })
    .await;
    let mut req = Request::builder()
        .method(Method::POST)
        .uri("/oauth/token")
        .header("content-type", FORM)
        .header("authorization", basic("feed", "feed-secret"))
        .body(Body::from("grant_type=client_credentials"))
        .unwrap();
    req.extensions_mut().insert(ConnectInfo(SocketAddr::from(([10, 0, 0, 2], 40_000))));
    let res = gw.app.clone().oneshot(req).await.unwrap();
    let (parts, body) = res.into_parts();
    let shed = Res { status: parts.status, headers: parts.headers, body: body.collect().await.unwrap().to_bytes() };
    shed.assert_problem(503, "overloaded");
    assert!(shed.header("retry-after").is_some());
    assert_eq!(slow.await.unwrap().0, 200, "the running verification finishes");
    assert_eq!(gw.state.token_grants_running(), 0);
    assert_eq!(from_ip(&gw, [10, 0, 0, 2], "feed", "feed-secret").await.0, 200, "its slot is free again");
}

/// The token endpoint has its own rate per client IP (`token_rate`, not the
/// per-subject `rate`): one IP over its burst gets 429 while another still
/// gets answers.
async fn rate_limited_per_client_ip<H: Harness>() {
    let kit = AuthKit::new();
    let mut config = GatewayConfig::default();
    config.limits.rate = Some(Rate { per_second: 1_000_000, burst: 1_000_000 });
    config.limits.token_rate = Some(Rate { per_second: 1, burst: 2 });
    let gw = Gw::build::<H>(kit.auth.clone(), config, Some(kit.clients())).await;
    let from = |ip: [u8; 4]| from_ip(&gw, ip, "feed", "feed-secret");
    assert_eq!(from([10, 0, 0, 1]).await.0, 200);
    assert_eq!(from([10, 0, 0, 1]).await.0, 200);
    assert_eq!(from([10, 0, 0, 1]).await, (429, true));
    assert_eq!(from([10, 0, 0, 2]).await.0, 200, "another IP has its own quota");
}

per_engine!(
    granted_token_is_accepted_within_its_scope,
    grant_errors_follow_rfc_6749,
    no_registry_is_404,
    rate_limited_per_client_ip,
    global_rate_spans_client_ips,
    argon2_verifications_are_capped
);
