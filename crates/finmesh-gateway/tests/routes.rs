//! The route access table (`ROUTE_ACCESS`) is the router: every listed
//! route is served, with a sample request that succeeds. The auth matrix
//! (no token 401, wrong scope 403, right scope 2xx for every route) will
//! reuse `sample_request` once `finmesh-auth` verifies tokens.

mod support;

use axum::http::Method;
use finmesh_gateway::{Need, ROUTE_ACCESS};
use serde_json::json;
use support::{Gw, Harness};

/// A request for `path` that succeeds against the fixture below, with the
/// status it answers.
fn sample_request(method: &str, path: &str) -> (Method, String, String, u16) {
    let uri = path.replace("{bucket}", "b").replace("{key}", "k").replace("{stream}", "S").replace("{name}", "c");
    let method = Method::from_bytes(method.as_bytes()).expect("method");
    let (body, status) = match (method.as_str(), path) {
        ("PUT", "/v1/kv/{bucket}") => (json!({"history": 2}).to_string(), 200),
        ("PUT", "/v1/streams/{stream}") => (json!({"subjects": ["s.>"]}).to_string(), 200),
        ("PUT", "/v1/streams/{stream}/consumers/{name}") => (String::new(), 200),
        ("PUT", _) => ("v".to_owned(), 200),
        ("POST", "/v1/streams/{stream}/messages") => ("1".to_owned(), 200),
        ("POST", "/v1/streams/{stream}/consumers/{name}/fetch") => (json!({"batch": 1}).to_string(), 200),
        // Served only with an OAuth client registry; this gateway has none.
        ("POST", "/oauth/token") => ("grant_type=client_credentials".to_owned(), 404),
        // A valid-looking request whose token the engine refuses: routed, checked, answered.
        ("POST", "/v1/streams/{stream}/consumers/{name}/ack") => {
            (json!({"token": "x", "kind": "ack"}).to_string(), 400)
        }
        ("DELETE", _) => (String::new(), if path.ends_with("{key}") { 200 } else { 204 }),
        // Not an upgrade request: the route exists and says so.
        ("GET", "/v1/streams/{stream}/ws") => (String::new(), 400),
        _ => (String::new(), 200),
    };
    let uri = if method == Method::POST && path.ends_with("/messages") { format!("{uri}?subject=s.a") } else { uri };
    (method, uri, body, status)
}

async fn every_route_in_the_table_is_served<H: Harness>() {
    let gw = Gw::start::<H>().await;
    gw.put("/v1/kv/default", "").await;
    gw.put("/v1/kv/default/k", "v").await;
    gw.put("/v1/kv/b", "").await;
    gw.put("/v1/kv/b/k", "v").await;
    gw.stream("S", json!({"subjects": ["s.>"]})).await;
    gw.put("/v1/streams/S/consumers/c", "").await;
    // Deletes last, so every other route still finds its resource.
    let mut table: Vec<_> = ROUTE_ACCESS.to_vec();
    table.sort_by_key(|(m, p, _)| (*m == "DELETE", std::cmp::Reverse(p.len())));
    for (method, path, need) in table {
        let (method, uri, body, want) = sample_request(method, path);
        if path.ends_with("/events") || path.ends_with("/watch") {
            let mut sse = support::sse_oneshot(&gw, &uri, &[]).await;
            sse.hello().await;
            continue;
        }
        let r = gw.send(method.clone(), &uri, &[], body).await;
        assert_eq!(r.status.as_u16(), want, "{method} {uri} ({need:?}): {}", r.text());
    }
    assert!(ROUTE_ACCESS.iter().any(|r| r.2 == Need::StreamConsume));
}

per_engine!(every_route_in_the_table_is_served);
