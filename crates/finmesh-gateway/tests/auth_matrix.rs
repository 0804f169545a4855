//! The auth matrix: for every route of `ROUTE_ACCESS` that needs a token,
//! no token → 401, a bad signature, an expired token, `alg: none` and a
//! non-bearer scheme → 401 (`invalid_token`), a valid token holding every
//! scope but the one the route needs → 403 (`insufficient_scope`), and a
//! token holding exactly that scope (never `admin` unless the route needs
//! it) → the route's normal answer. Public routes answer without a token.

mod support;

use axum::http::Method;
use finmesh_auth::{BEARER_CHALLENGE, BEARER_INSUFFICIENT_SCOPE, BEARER_INVALID_TOKEN};
use finmesh_gateway::{Need, ROUTE_ACCESS};
use support::auth::{AuthKit, bearer, is_sse, sample_request, seed};
use support::{Gw, Harness, sse_oneshot};

/// Every scope a token can hold for the fixture's resources, `admin` aside.
const ALL_SCOPES: &[&str] = &[
    "kv:read:b",
    "kv:read:default",
    "kv:write:b",
    "kv:write:default",
    "kv:admin:b",
    "kv:admin:default",
    "stream:publish:S",
    "stream:subscribe:S",
    "stream:consume:S",
    "stream:admin:S",
];

/// The one scope that grants `need` on the route's resource.
fn right_scope(need: Need, path: &str) -> String {
    let bucket = if path.starts_with("/kv/") {
        "default"
    } else if path.starts_with("/v1/pipelines/") {
        "risk-recon"
    } else {
        "b"
    };
    match need {
        Need::Admin => "admin".to_owned(),
        Need::KvRead => format!("kv:read:{bucket}"),
        Need::KvWrite => format!("kv:write:{bucket}"),
        Need::KvAdmin => format!("kv:admin:{bucket}"),
        Need::StreamPublish if path.starts_with("/v1/pipelines/") => "stream:publish:risk-raw".to_owned(),
        Need::StreamPublish => "stream:publish:S".to_owned(),
        Need::StreamSubscribe => "stream:subscribe:S".to_owned(),
        Need::StreamConsume => "stream:consume:S".to_owned(),
        Need::StreamAdmin => "stream:admin:S".to_owned(),
        Need::SubscribersRead => "subscribers:read".to_owned(),
        Need::Public => unreachable!("public routes take no token"),
    }
}

/// Every other scope on the route's resource, plus the right action on
/// another resource: nothing of it grants the route.
fn wrong_scopes(need: Need, path: &str) -> String {
    if need == Need::Admin {
        let wild: Vec<String> = ALL_SCOPES
            .iter()
            .map(|s| {
                let (action, _) = s.rsplit_once(':').unwrap();
                format!("{action}:*")
            })
            .collect();
        return wild.join(" ");
    }
    if need == Need::SubscribersRead {
        return ALL_SCOPES.join(" ");
    }
    let right = right_scope(need, path);
    let (action, _) = right.rsplit_once(':').unwrap();
    let other = if action.starts_with("kv:") { format!("{action}:other") } else { format!("{action}:T") };
    let mut scopes: Vec<String> =
        ALL_SCOPES.iter().filter(|s| **s != right).map(|s| (*s).to_owned()).chain([other]).collect();
    scopes.dedup();
    scopes.join(" ")
}

async fn every_route_enforces_authentication_and_scopes<H: Harness>() {
    let kit = AuthKit::new();
    let gw = Gw::with_auth::<H>(kit.auth.clone(), None).await;
    seed(&gw, &bearer(&kit.token("seeder", "admin"))).await;
    let mut table: Vec<_> = ROUTE_ACCESS.to_vec();
    table.sort_by_key(|(m, p, _)| (*m == "DELETE", std::cmp::Reverse(p.len())));
    let mut checked = 0;
    for (method, path, need) in table {
        let (method, uri, body, want) = sample_request(method, path);
        let what = format!("{method} {uri} ({need:?})");
        if need == Need::Public {
            let r = gw.send(method, &uri, &[], body).await;
            assert_eq!(r.status.as_u16(), want, "{what} without a token: {}", r.text());
            continue;
        }
        let right = right_scope(need, path);

        let r = gw.send(method.clone(), &uri, &[], body.clone()).await;
        r.assert_problem(401, "unauthorized");
        assert_eq!(r.header("www-authenticate"), Some(BEARER_CHALLENGE), "{what}: no token");

        let refused = [
            ("bad signature", bearer(&kit.bad_signature("mallory", &right))),
            ("expired", bearer(&kit.expired("late", &right))),
            ("alg none", bearer(&kit.alg_none("mallory", &right))),
            ("not a bearer token", format!("Basic {}", kit.token("basic", &right))),
            ("garbage", bearer("not.a.jwt")),
        ];
        for (case, header) in &refused {
            let r = gw.send(method.clone(), &uri, &[("authorization", header)], body.clone()).await;
            assert_eq!(r.status, 401, "{what}: {case}: {}", r.text());
            r.assert_problem(401, "unauthorized");
            assert_eq!(r.header("www-authenticate"), Some(BEARER_INVALID_TOKEN), "{what}: {case}");
        }

        let wrong = bearer(&kit.token("wrong", &wrong_scopes(need, path)));
        let r = gw.send(method.clone(), &uri, &[("authorization", &wrong)], body.clone()).await;
        assert_eq!(r.status, 403, "{what}: wrong scopes {}: {}", wrong_scopes(need, path), r.text());
        r.assert_problem(403, "forbidden");
        assert_eq!(r.header("www-authenticate"), Some(BEARER_INSUFFICIENT_SCOPE), "{what}");

        let token = bearer(&kit.token("right", &right));
        if is_sse(path) {
            let mut sse = sse_oneshot(&gw, &uri, &[("authorization", &token)]).await;
            sse.hello().await;
        } else {
            let r = gw.send(method.clone(), &uri, &[("authorization", &token)], body).await;
            assert!(r.status != 401 && r.status != 403, "{what} with `{right}`: {}", r.text());
            assert_eq!(r.status.as_u16(), want, "{what} with `{right}`: {}", r.text());
        }
        checked += 1;
    }
    assert_eq!(checked, ROUTE_ACCESS.iter().filter(|r| r.2 != Need::Public).count());
    assert!(checked >= 25, "the table shrank: {checked}");
}

/// A header that is not UTF-8 is refused as a bad token, not a panic.
async fn non_utf8_authorization_is_401<H: Harness>() {
    let kit = AuthKit::new();
    let gw = Gw::with_auth::<H>(kit.auth.clone(), None).await;
    let req = axum::http::Request::builder()
        .method(Method::GET)
        .uri("/v1/kv")
        .header("authorization", &b"Bearer \xff\xfe"[..])
        .body(axum::body::Body::empty())
        .unwrap();
    let res = tower::ServiceExt::oneshot(gw.app.clone(), req).await.unwrap();
    assert_eq!(res.status(), 401);
    assert_eq!(res.headers()["www-authenticate"], BEARER_INVALID_TOKEN);
}

per_engine!(every_route_enforces_authentication_and_scopes, non_utf8_authorization_is_401);
