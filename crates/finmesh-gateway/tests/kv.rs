//! KV over HTTP: buckets, ETag, compare-and-set (If-Match / If-None-Match),
//! 404 for missing and deleted keys, history, keys, the default bucket.

mod support;

use serde_json::json;
use support::{Gw, Harness};

async fn bucket_lifecycle<H: Harness>() {
    let gw = Gw::start::<H>().await;
    let r = gw.put("/v1/kv/cards", json!({"history": 5}).to_string()).await;
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.json()["config"]["history"], 5);
    // Same again is fine; a changed config updates.
    assert_eq!(gw.put("/v1/kv/cards", json!({"history": 5}).to_string()).await.status, 200);
    assert_eq!(gw.put("/v1/kv/cards", json!({"history": 7}).to_string()).await.json()["config"]["history"], 7);
    assert_eq!(gw.put("/v1/kv/other", "").await.status, 200);
    assert_eq!(gw.get("/v1/kv").await.json()["buckets"], json!(["cards", "other"]));
    assert_eq!(gw.get("/v1/kv/cards").await.json()["config"]["name"], "cards");
    gw.put("/v1/kv/cards", json!({"name": "nope"}).to_string()).await.assert_problem(400, "invalid");
    gw.put("/v1/kv/bad.name", "").await.assert_problem(400, "invalid");
    assert_eq!(gw.delete("/v1/kv/other").await.status, 204);
    gw.get("/v1/kv/other").await.assert_problem(404, "not-found");
}

async fn etag_and_cas<H: Harness>() {
    let gw = Gw::start::<H>().await;
    gw.put("/v1/kv/b", "").await;
    let r = gw.put("/v1/kv/b/k1", "v1").await;
    assert_eq!(r.status, 200);
    let rev1 = r.json()["revision"].as_u64().unwrap();
    assert_eq!(r.header("etag"), Some(format!("\"{rev1}\"").as_str()));

    let r = gw.get("/v1/kv/b/k1").await;
    assert_eq!((r.status.as_u16(), &r.body[..]), (200, &b"v1"[..]));
    assert_eq!(r.header("content-type"), Some("application/octet-stream"));
    assert_eq!(r.header("etag"), Some(format!("\"{rev1}\"").as_str()));

    // Update at the right revision.
    let etag = format!("\"{rev1}\"");
    let r = gw.send(axum::http::Method::PUT, "/v1/kv/b/k1", &[("if-match", &etag)], "v2").await;
    assert_eq!(r.status, 200, "{}", r.text());
    let rev2 = r.json()["revision"].as_u64().unwrap();
    assert!(rev2 > rev1);

    // Stale revision: 412 with the current one.
    let r = gw.send(axum::http::Method::PUT, "/v1/kv/b/k1", &[("if-match", &etag)], "v3").await;
    let p = r.assert_problem(412, "wrong-revision");
    assert_eq!(p["current_revision"], rev2);
    assert_eq!(&gw.get("/v1/kv/b/k1").await.body[..], b"v2");

    // Create only.
    let r = gw.send(axum::http::Method::PUT, "/v1/kv/b/k1", &[("if-none-match", "*")], "x").await;
    assert_eq!(r.assert_problem(412, "wrong-revision")["current_revision"], rev2);
    let r = gw.send(axum::http::Method::PUT, "/v1/kv/b/new", &[("if-none-match", "*")], "x").await;
    assert_eq!(r.status, 200, "{}", r.text());

    // Garbage If-Match is a 400.
    let r = gw.send(axum::http::Method::PUT, "/v1/kv/b/k1", &[("if-match", "W/\"x\"")], "x").await;
    r.assert_problem(400, "invalid");
}

async fn missing_and_deleted_are_404<H: Harness>() {
    let gw = Gw::start::<H>().await;
    gw.put("/v1/kv/b", json!({"history": 10}).to_string()).await;
    gw.get("/v1/kv/b/nope").await.assert_problem(404, "not-found");
    gw.get("/v1/kv/missing/k").await.assert_problem(404, "not-found");
    gw.put("/v1/kv/b/k", "v").await;
    let r = gw.delete("/v1/kv/b/k").await;
    assert_eq!(r.status, 200);
    gw.get("/v1/kv/b/k").await.assert_problem(404, "not-found");
    gw.delete("/v1/kv/b/k").await.assert_problem(404, "not-found");
    // The delete is in the history, as a marker.
    let h = gw.get("/v1/kv/b/k/history").await.json();
    let ops: Vec<_> = h["entries"].as_array().unwrap().iter().map(|e| e["op"].as_str().unwrap().to_owned()).collect();
    assert_eq!(ops, ["put", "delete"]);
    assert_eq!(h["entries"][0]["payload"], "v".parse::<serde_json::Value>().unwrap_or(json!("dg==")));
    assert!(h["entries"][1].get("payload").is_none(), "a delete marker has no payload");
    gw.get("/v1/kv/b/never/history").await.assert_problem(404, "not-found");
    // Invalid keys are 400 through the core newtype.
    gw.get("/v1/kv/b/_kvx").await.assert_problem(400, "invalid");
    gw.get("/v1/kv/b/a..b").await.assert_problem(400, "invalid");
}

/// `DELETE` with `If-Match` deletes only at that revision; concurrent plain
/// deletes of one value write one marker: one answers 200, the others 404.
async fn conditional_and_concurrent_deletes<H: Harness>() {
    let gw = Gw::start::<H>().await;
    gw.put("/v1/kv/b", json!({"history": 64}).to_string()).await;
    let rev1 = gw.put("/v1/kv/b/k", "v1").await.json()["revision"].as_u64().unwrap();
    let rev2 = gw.put("/v1/kv/b/k", "v2").await.json()["revision"].as_u64().unwrap();
    let stale = format!("\"{rev1}\"");
    let r = gw.send(axum::http::Method::DELETE, "/v1/kv/b/k", &[("if-match", &stale)], "").await;
    assert_eq!(r.assert_problem(412, "wrong-revision")["current_revision"], rev2);
    assert_eq!(&gw.get("/v1/kv/b/k").await.body[..], b"v2", "a refused delete changes nothing");
    let r = gw.send(axum::http::Method::DELETE, "/v1/kv/b/k", &[("if-match", &format!("\"{rev2}\""))], "").await;
    assert_eq!(r.status, 200, "{}", r.text());
    gw.get("/v1/kv/b/k").await.assert_problem(404, "not-found");

    for round in 0..10 {
        gw.put("/v1/kv/b/k", format!("round {round}")).await;
        let deletes = (0..4).map(|_| gw.delete("/v1/kv/b/k"));
        let statuses: Vec<u16> = futures::future::join_all(deletes).await.iter().map(|r| r.status.as_u16()).collect();
        assert_eq!(statuses.iter().filter(|s| **s == 200).count(), 1, "round {round}: {statuses:?}");
        assert_eq!(statuses.iter().filter(|s| **s == 404).count(), 3, "round {round}: {statuses:?}");
    }
    let h = gw.get("/v1/kv/b/k/history").await.json();
    let markers = h["entries"].as_array().unwrap().iter().filter(|e| e["op"] == "delete").count();
    assert_eq!(markers, 11, "one marker per deleted value");
}

async fn keys_history_and_default_bucket<H: Harness>() {
    let gw = Gw::start::<H>().await;
    gw.put("/v1/kv/b", json!({"history": 3}).to_string()).await;
    for k in ["card.1", "card.2", "acct.1"] {
        gw.put(&format!("/v1/kv/b/{k}"), "{\"n\":1}").await;
    }
    assert_eq!(gw.get("/v1/kv/b/keys?prefix=card.").await.json()["keys"], json!(["card.1", "card.2"]));
    assert_eq!(gw.get("/v1/kv/b/keys").await.json()["keys"].as_array().unwrap().len(), 3);
    gw.put("/v1/kv/b/card.1", "raw\u{1}").await;
    let h = gw.get("/v1/kv/b/card.1/history").await.json();
    let entries = h["entries"].as_array().unwrap();
    assert_eq!(entries.len(), 2);
    assert_eq!(entries[0]["payload"], json!({"n": 1}));
    assert_eq!(entries[1]["encoding"], "base64");
    // A key with a slash travels percent-encoded.
    assert_eq!(gw.put("/v1/kv/b/a%2Fb", "s").await.status, 200);
    assert_eq!(&gw.get("/v1/kv/b/a%2Fb").await.body[..], b"s");

    // The default bucket.
    gw.get("/kv/x").await.assert_problem(404, "not-found");
    gw.put("/v1/kv/default", "").await;
    gw.put("/v1/kv/default/x", "dv").await;
    let r = gw.get("/kv/x").await;
    assert_eq!((r.status.as_u16(), &r.body[..]), (200, &b"dv"[..]));
    assert!(r.header("etag").is_some());
}

per_engine!(
    bucket_lifecycle,
    etag_and_cas,
    missing_and_deleted_are_404,
    conditional_and_concurrent_deletes,
    keys_history_and_default_bucket
);
