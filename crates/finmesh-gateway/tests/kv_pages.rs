//! Key listing in pages over HTTP (issue 18, scale): `GET
//! /v1/kv/{bucket}/keys?prefix=&limit=&after=` answers `{keys, next}`, one
//! page (default 1,000 keys, at most `limits.max_keys_page`), never the
//! whole bucket; following `next` visits every live key once, in order.

mod support;

use finmesh_gateway::GatewayConfig;
use serde_json::{Value, json};
use support::{Gw, Harness};

/// Every key of `prefix` by following `next` with pages of `limit`.
async fn walk(gw: &Gw, bucket: &str, prefix: &str, limit: usize) -> Vec<String> {
    let mut keys = Vec::new();
    let mut after: Option<String> = None;
    loop {
        let mut uri = format!("/v1/kv/{bucket}/keys?prefix={prefix}&limit={limit}");
        if let Some(a) = &after {
            uri.push_str(&format!("&after={a}"));
        }
        let r = gw.get(&uri).await;
        assert_eq!(r.status, 200, "{}", r.text());
        let page = r.json();
        let got: Vec<String> =
            page["keys"].as_array().unwrap().iter().map(|k| k.as_str().unwrap().to_owned()).collect();
        assert!(got.len() <= limit);
        keys.extend(got);
        match &page["next"] {
            Value::Null => return keys,
            Value::String(next) => {
                assert_eq!(Some(next), keys.last(), "next is the page's last key");
                after = Some(next.clone());
            }
            other => panic!("next must be a string or null, got {other}"),
        }
    }
}

async fn keys_are_listed_in_pages<H: Harness>() {
    let gw = Gw::start::<H>().await;
    assert_eq!(gw.put("/v1/kv/b", "").await.status, 200);
    let mut want = Vec::new();
    for i in (0..40).rev() {
        let k = format!("{}.{i:02}", if i % 2 == 0 { "even" } else { "odd" });
        assert_eq!(gw.put(&format!("/v1/kv/b/{k}"), "v").await.status, 200);
        want.push(k);
    }
    for k in ["even.04", "odd.07"] {
        assert_eq!(gw.delete(&format!("/v1/kv/b/{k}")).await.status, 200);
    }
    want.retain(|k| k != "even.04" && k != "odd.07");
    want.sort();
    // The default page holds them all: `next` is null.
    let all = gw.get("/v1/kv/b/keys").await.json();
    assert_eq!(all["next"], Value::Null);
    assert_eq!(all["keys"], json!(want));
    assert_eq!(walk(&gw, "b", "", 7).await, want);
    let odd: Vec<String> = want.iter().filter(|k| k.starts_with("odd.")).cloned().collect();
    assert_eq!(walk(&gw, "b", "odd.", 3).await, odd);
    let page = gw.get("/v1/kv/b/keys?limit=2&after=even.10").await.json();
    assert_eq!(page, json!({"keys": ["even.12", "even.14"], "next": "even.14"}));
    assert_eq!(gw.get("/v1/kv/b/keys?after=zzz").await.json(), json!({"keys": [], "next": null}));
    // Bad parameters are 400s; a missing bucket a 404.
    for q in ["limit=0", "limit=10001", "limit=-1", "limit=x", "after=a..b", "after=", "after=%20"] {
        gw.get(&format!("/v1/kv/b/keys?{q}")).await.assert_problem(400, "invalid");
    }
    gw.get("/v1/kv/nope/keys?limit=5").await.assert_problem(404, "not-found");
}

/// The largest page is the setting `limits.max_keys_page`; the default
/// page is 1,000 keys or that setting, if lower.
async fn the_largest_page_is_a_setting<H: Harness>() {
    let mut config = GatewayConfig::default();
    config.limits.max_keys_page = 3;
    let gw = Gw::with_config::<H>(config).await;
    gw.put("/v1/kv/b", "").await;
    for k in ["a", "b", "c", "d", "e"] {
        gw.put(&format!("/v1/kv/b/{k}"), "v").await;
    }
    assert_eq!(gw.get("/v1/kv/b/keys").await.json(), json!({"keys": ["a", "b", "c"], "next": "c"}));
    assert_eq!(gw.get("/v1/kv/b/keys?limit=3&after=c").await.json(), json!({"keys": ["d", "e"], "next": null}));
    let p = gw.get("/v1/kv/b/keys?limit=4").await.assert_problem(400, "invalid");
    assert!(p["detail"].as_str().unwrap().contains("limits.max_keys_page"), "{p}");
}

per_engine!(keys_are_listed_in_pages, the_largest_page_is_a_setting);
