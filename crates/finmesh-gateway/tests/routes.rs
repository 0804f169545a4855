//! The route access table (`ROUTE_ACCESS`) is the one source of the route
//! list; the three other places that list routes are checked against it:
//! - the router: every listed route is served, with a sample request that
//!   succeeds (the same samples drive the auth matrix in `auth_matrix.rs`),
//!   other methods on its paths answer 405, and `app` in src/lib.rs
//!   registers exactly the listed routes;
//! - the OpenAPI document: exactly the listed operations, public ones
//!   marked `security: []`;
//! - docs/api.md: one table row per listed route, with its access.
//!
//! A route added to, or left out of, any of the four fails one of these.

mod support;

use std::collections::BTreeSet;

use axum::http::Method;
use finmesh_gateway::{Need, ROUTE_ACCESS};
use support::auth::{is_sse, sample_request, seed};
use support::{Gw, Harness};
use utoipa::OpenApi;

async fn every_route_in_the_table_is_served<H: Harness>() {
    let gw = Gw::start::<H>().await;
    seed(&gw, "").await;
    // Deletes last, so every other route still finds its resource.
    let mut table: Vec<_> = ROUTE_ACCESS.to_vec();
    table.sort_by_key(|(m, p, _)| (*m == "DELETE", std::cmp::Reverse(p.len())));
    for (method, path, need) in table {
        let (method, uri, body, want) = sample_request(method, path);
        if is_sse(path) {
            let mut sse = support::sse_oneshot(&gw, &uri, &[]).await;
            sse.hello().await;
            continue;
        }
        let r = gw.send(method.clone(), &uri, &[], body).await;
        assert_eq!(r.status.as_u16(), want, "{method} {uri} ({need:?}): {}", r.text());
    }
    assert!(ROUTE_ACCESS.iter().any(|r| r.2 == Need::StreamConsume));
}

/// `(METHOD, path template)` of every route in the table; fails on a
/// route listed twice.
fn table() -> BTreeSet<(String, String)> {
    let mut set = BTreeSet::new();
    for (method, path, _) in ROUTE_ACCESS {
        assert!(set.insert((method.to_string(), path.to_string())), "{method} {path} is in ROUTE_ACCESS twice");
    }
    set
}

/// How docs/api.md writes each need in its `access` column.
fn access_label(need: Need) -> &'static str {
    match need {
        Need::Public => "public",
        Need::Admin => "admin",
        Need::KvRead => "kv:read",
        Need::KvWrite => "kv:write",
        Need::KvAdmin => "kv:admin",
        Need::StreamPublish => "stream:publish",
        Need::StreamSubscribe => "stream:subscribe",
        Need::StreamConsume => "stream:consume",
        Need::StreamAdmin => "stream:admin",
        Need::SubscribersRead => "subscribers:read",
    }
}

/// What differs between two route lists, for the failure message.
fn assert_same_routes(what: &str, found: &BTreeSet<(String, String)>) {
    let table = table();
    let missing: Vec<_> = table.difference(found).collect();
    let extra: Vec<_> = found.difference(&table).collect();
    assert!(
        missing.is_empty() && extra.is_empty(),
        "{what} and ROUTE_ACCESS differ: missing from {what}: {missing:?}; not in ROUTE_ACCESS: {extra:?}"
    );
}

/// The router, as written in `app` (src/lib.rs): every `.route("path",
/// get(..).put(..))` with its methods. (axum cannot list a router's routes;
/// the served-routes test above proves the other direction by requests.)
fn router_routes() -> BTreeSet<(String, String)> {
    let src = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/src/lib.rs")).expect("read src/lib.rs");
    let mut routes = BTreeSet::new();
    for (at, _) in src.match_indices(".route(") {
        let args = &src[at + ".route(".len()..];
        let mut depth = 1;
        let end = args
            .char_indices()
            .find(|&(_, c)| {
                depth += match c {
                    '(' => 1,
                    ')' => -1,
                    _ => 0,
                };
                depth == 0
            })
            .map(|(i, _)| i)
            .expect("balanced .route( call");
        let call = &args[..end];
        let path = call.split('"').nth(1).expect("a .route( call starts with its path literal");
        let handlers = &call[call.find(',').expect("path, handlers")..];
        for method in ["get", "put", "post", "delete", "patch"] {
            let called = handlers
                .match_indices(&format!("{method}("))
                .any(|(i, _)| !handlers[..i].ends_with(|c: char| c.is_alphanumeric() || c == '_' || c == ':'));
            if called {
                routes.insert((method.to_uppercase(), path.to_owned()));
            }
        }
    }
    routes
}

#[test]
fn the_router_serves_exactly_the_route_table() {
    assert_same_routes("the router in src/lib.rs", &router_routes());
}

#[test]
fn the_openapi_document_has_exactly_the_route_table() {
    let doc = serde_json::to_value(finmesh_gateway::openapi::ApiDoc::openapi()).expect("document");
    let mut found = BTreeSet::new();
    for (path, item) in doc["paths"].as_object().expect("paths") {
        for (method, op) in item.as_object().expect("path item") {
            let method = method.to_uppercase();
            let need = ROUTE_ACCESS.iter().find(|(m, p, _)| *m == method && p == path).map(|r| r.2);
            // Public operations say so (`security: []`); every other one needs the bearer token.
            if let Some(need) = need {
                assert_eq!(op.get("security").is_some(), need == Need::Public, "{method} {path}: security of {need:?}");
            }
            found.insert((method, path.clone()));
        }
    }
    assert_same_routes("the OpenAPI document", &found);
}

#[test]
fn docs_api_md_lists_exactly_the_route_table_with_its_access() {
    let docs = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/../../docs/api.md")).expect("docs/api.md");
    let mut found = BTreeSet::new();
    for line in docs.lines() {
        // Table rows `| `METHOD /path?query` | access | what |`.
        let cells: Vec<&str> = line.split('|').map(str::trim).collect();
        let Some(route) = cells.get(1).and_then(|c| c.strip_prefix('`')).and_then(|c| c.strip_suffix('`')) else {
            continue;
        };
        let Some((method, target)) = route.split_once(' ') else { continue };
        if !["GET", "PUT", "POST", "DELETE", "PATCH"].contains(&method) {
            continue;
        }
        let path = target.split('?').next().unwrap_or(target);
        assert!(found.insert((method.to_owned(), path.to_owned())), "docs/api.md lists {method} {path} twice");
        if let Some(&(_, _, need)) = ROUTE_ACCESS.iter().find(|(m, p, _)| *m == method && *p == path) {
            let access = cells.get(2).copied().unwrap_or_default();
            assert!(
                access.split([' ', '(']).next() == Some(access_label(need)),
                "docs/api.md gives {method} {path} the access `{access}`, ROUTE_ACCESS says {need:?} (`{}`)",
                access_label(need)
            );
        }
    }
    assert_same_routes("docs/api.md", &found);
}

/// A known path answers 405 to every method the table does not list for
/// it: the router has no method the table misses.
async fn unlisted_methods_on_known_paths_answer_405<H: Harness>() {
    let gw = Gw::start::<H>().await;
    let paths: BTreeSet<&str> = ROUTE_ACCESS.iter().map(|r| r.1).collect();
    for path in paths {
        for method in ["GET", "PUT", "POST", "DELETE", "PATCH"] {
            if ROUTE_ACCESS.iter().any(|(m, p, _)| *m == method && *p == path) {
                continue;
            }
            let (_, uri, _, _) = sample_request("GET", path);
            let r = gw.send(Method::from_bytes(method.as_bytes()).expect("method"), &uri, &[], "").await;
            assert_eq!(r.status.as_u16(), 405, "{method} {uri}: {}", r.text());
        }
    }
}

per_engine!(every_route_in_the_table_is_served, unlisted_methods_on_known_paths_answer_405);
