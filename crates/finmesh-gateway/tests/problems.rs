//! Every error is application/problem+json with a stable `type`: handler
//! errors of each reachable kind, axum's rejections, router 404/405, and the
//! status/type table for every `ErrorKind`.

mod support;

use axum::http::Method;
use axum::response::IntoResponse;
use finmesh_core::{Error, ErrorKind, Revision};
use finmesh_gateway::{ApiError, problem::kind_info};
use http_body_util::BodyExt;
use serde_json::json;
use support::{Gw, Harness};

async fn every_kind_maps_to_a_stable_problem<H: Harness>() {
    let kinds = [
        (ErrorKind::NotFound, 404, "not-found"),
        (ErrorKind::AlreadyExists, 409, "already-exists"),
        (ErrorKind::WrongRevision, 412, "wrong-revision"),
        (ErrorKind::Invalid, 400, "invalid"),
        (ErrorKind::TooLarge, 413, "too-large"),
        (ErrorKind::Unauthorized, 401, "unauthorized"),
        (ErrorKind::Forbidden, 403, "forbidden"),
        (ErrorKind::Unavailable, 503, "unavailable"),
        (ErrorKind::Timeout, 504, "timeout"),
        (ErrorKind::Internal, 500, "internal"),
        (ErrorKind::Integrity, 500, "integrity"),
    ];
    for (kind, status, slug) in kinds {
        assert_eq!((kind_info(kind).0.as_u16(), kind_info(kind).1), (status, slug));
        let err = if kind == ErrorKind::WrongRevision {
            Error::wrong_revision(Revision(9), "changed")
        } else {
            Error::new(kind, "secret-free message")
                .with_source(std::io::Error::other("/var/lib/finmesh/db: disk on fire"))
        };
        let res = ApiError::from(err).into_response();
        assert_eq!(res.status().as_u16(), status);
        assert_eq!(res.headers()["content-type"], "application/problem+json");
        let www = res.headers().get("www-authenticate").map(|v| v.to_str().unwrap().to_owned());
        let want_www = match status {
            401 => Some(finmesh_auth::BEARER_CHALLENGE),
            403 => Some(finmesh_auth::BEARER_INSUFFICIENT_SCOPE),
            _ => None,
        };
        assert_eq!(www.as_deref(), want_www);
        assert_eq!(res.headers().contains_key("retry-after"), status == 503);
        let body: serde_json::Value =
            serde_json::from_slice(&res.into_body().collect().await.unwrap().to_bytes()).unwrap();
        assert_eq!(body["type"], format!("https://finmesh.dev/problems/{slug}"));
        assert_eq!(body["status"], status);
        assert!(!body["title"].as_str().unwrap().is_empty());
        let detail = body["detail"].as_str().unwrap();
        assert!(!detail.contains("disk on fire"), "sources are never sent: {detail}");
        if matches!(kind, ErrorKind::Internal | ErrorKind::Integrity) {
            assert!(!detail.contains("secret-free"), "internal messages are logged, not sent");
        }
        if kind == ErrorKind::WrongRevision {
            assert_eq!(body["current_revision"], 9);
        }
    }
    // The engine is not needed for the table, but the harness keeps this
    // case stamped per engine with the others.
    let _ = Gw::start::<H>().await;
}

async fn rejections_and_router_errors_are_problems<H: Harness>() {
    let gw = Gw::start::<H>().await;
    gw.stream("S", json!({"subjects": ["s"]})).await;
    // Unknown route and wrong method.
    gw.get("/v2/nothing").await.assert_problem(404, "not-found");
    gw.send(Method::PATCH, "/v1/streams/S", &[], "").await.assert_problem(405, "method-not-allowed");
    // Bad JSON body, unknown config member, body not an object.
    gw.put("/v1/streams/T", "{not json").await.assert_problem(400, "invalid");
    let p = gw
        .put("/v1/streams/T", json!({"subjects": ["t"], "max_msg": 1}).to_string())
        .await
        .assert_problem(400, "invalid");
    assert!(p["detail"].as_str().unwrap().contains("max_msg"), "{p}");
    gw.put("/v1/streams/T", "[1]").await.assert_problem(400, "invalid");
    // Overlapping subjects, bad query types, bad names.
    gw.put("/v1/streams/T", json!({"subjects": ["s"]}).to_string()).await.assert_problem(400, "invalid");
    gw.get("/v1/streams/S/messages?limit=many").await.assert_problem(400, "invalid");
    gw.get("/v1/streams/bad%20name").await.assert_problem(400, "invalid");
    gw.get("/v1/streams/S/events?subject=a..b").await.assert_problem(400, "invalid");
    gw.get("/v1/streams/S/ws").await.assert_problem(400, "invalid"); // not an upgrade request
    gw.post("/v1/streams/S/consumers/c/ack", "{}").await.assert_problem(400, "invalid");
}

/// A handler with a bug.
async fn boom() -> String {
    let empty: Vec<String> = std::hint::black_box(Vec::new());
    empty[0].clone()
}

async fn a_panic_is_a_500_problem<H: Harness>() {
    use axum::Router;
    use axum::routing::get;
    use finmesh_gateway::edge::EdgeLayer;
    use tower::ServiceExt;
    // A service that panics while building its future, not while running it.
    let panics_in_call = tower::service_fn(
        |_: axum::extract::Request| -> std::future::Ready<Result<String, std::convert::Infallible>> {
            let empty: Vec<String> = std::hint::black_box(Vec::new());
            std::future::ready(Ok(empty[0].clone()))
        },
    );
    // One request in flight at most: a panicked request must free its place.
    let app: Router =
        Router::new().route("/boom", get(boom)).route_service("/boom-in-call", panics_in_call).layer(EdgeLayer::new(1));
    for path in ["/boom", "/boom-in-call", "/boom", "/boom-in-call"] {
        let req = axum::http::Request::get(path).body(axum::body::Body::empty()).unwrap();
        let res = app.clone().oneshot(req).await.unwrap();
        assert_eq!(res.status(), 500, "{path}");
        assert_eq!(res.headers()["content-type"], "application/problem+json");
        let body = res.into_body().collect().await.unwrap().to_bytes();
        assert!(!String::from_utf8_lossy(&body).contains("out of bounds"), "panic messages are logged, not sent");
    }
    let _ = Gw::start::<H>().await;
}

per_engine!(every_kind_maps_to_a_stable_problem, rejections_and_router_errors_are_problems, a_panic_is_a_500_problem);
