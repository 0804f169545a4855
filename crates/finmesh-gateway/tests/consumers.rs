//! Durable consumers over HTTP: create, fetch (batch + wait), ack, nak with
//! redelivery, term, batch acks (`tokens`, `upto`), info and delete.

mod support;

use serde_json::json;
use support::{Gw, Harness};

async fn fetch_ack_nak_term<H: Harness>() {
    let gw = Gw::start::<H>().await;
    gw.stream("JOBS", json!({"subjects": ["jobs.>"]})).await;
    let r = gw.put("/v1/streams/JOBS/consumers/w", json!({"ack_wait": 30000}).to_string()).await;
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(gw.get("/v1/streams/JOBS/consumers").await.json()["consumers"], json!(["w"]));
    gw.publish_n("JOBS", "jobs.a", 3).await;

    let f = gw.post("/v1/streams/JOBS/consumers/w/fetch", json!({"batch": 2}).to_string()).await;
    assert_eq!(f.status, 200, "{}", f.text());
    let msgs = f.json()["messages"].as_array().unwrap().clone();
    assert_eq!(msgs.len(), 2);
    assert_eq!((msgs[0]["seq"].as_u64(), msgs[0]["delivery_count"].as_u64()), (Some(1), Some(1)));
    assert_eq!(msgs[0]["payload"], json!({"i": 0}));
    let tok = |m: &serde_json::Value| m["token"].as_str().unwrap().to_owned();

    // ack the first, nak the second at once: it comes back with count 2.
    let ack = |t: String, kind: &str| json!({"token": t, "kind": kind}).to_string();
    assert_eq!(gw.post("/v1/streams/JOBS/consumers/w/ack", ack(tok(&msgs[0]), "ack")).await.status, 204);
    assert_eq!(gw.post("/v1/streams/JOBS/consumers/w/ack", ack(tok(&msgs[1]), "nak")).await.status, 204);
    let f = gw.post("/v1/streams/JOBS/consumers/w/fetch", json!({"batch": 5, "wait_ms": 2000}).to_string()).await;
    let again = f.json()["messages"].as_array().unwrap().clone();
    let got: Vec<(u64, u64)> =
        again.iter().map(|m| (m["seq"].as_u64().unwrap(), m["delivery_count"].as_u64().unwrap())).collect();
    assert_eq!(got, [(2, 2), (3, 1)], "the nak'ed message is redelivered first");
    for m in &again {
        let r = gw.post("/v1/streams/JOBS/consumers/w/ack", ack(tok(m), "term")).await;
        assert_eq!(r.status, 204, "{}", r.text());
    }
    let r = gw
        .post(
            "/v1/streams/JOBS/consumers/w/ack",
            json!({"token": tok(&again[0]), "kind": "nak", "delay": 10}).to_string(),
        )
        .await;
    assert_eq!(r.status, 204, "acks are idempotent");

    // Nothing left: a fetch with a short wait returns empty.
    let f = gw.post("/v1/streams/JOBS/consumers/w/fetch", json!({"batch": 5, "wait_ms": 50}).to_string()).await;
    assert_eq!(f.json()["messages"], json!([]));
    let info = gw.get("/v1/streams/JOBS/consumers/w").await.json();
    assert_eq!(info["ack_floor"], 3);
    assert_eq!(info["num_ack_pending"], 0);

    // Bad requests.
    gw.post("/v1/streams/JOBS/consumers/w/ack", json!({"token": "garbage", "kind": "ack"}).to_string())
        .await
        .assert_problem(400, "invalid");
    gw.post("/v1/streams/JOBS/consumers/w/ack", json!({"kind": "ack"}).to_string())
        .await
        .assert_problem(400, "invalid");
    gw.post("/v1/streams/JOBS/consumers/w/fetch", json!({"batch": 0}).to_string()).await.assert_problem(400, "invalid");
    gw.post("/v1/streams/JOBS/consumers/nope/fetch", "").await.assert_problem(404, "not-found");
    assert_eq!(gw.delete("/v1/streams/JOBS/consumers/w").await.status, 204);
    gw.get("/v1/streams/JOBS/consumers/w").await.assert_problem(404, "not-found");
}

async fn fetch_waits_for_a_publish<H: Harness>() {
    let gw = Gw::start::<H>().await;
    gw.stream("JOBS", json!({"subjects": ["jobs.>"]})).await;
    gw.put("/v1/streams/JOBS/consumers/w", "").await;
    let gw = std::sync::Arc::new(gw);
    let waiter = {
        let gw = gw.clone();
        tokio::spawn(async move {
            gw.post("/v1/streams/JOBS/consumers/w/fetch", json!({"batch": 1, "wait_ms": 10000}).to_string()).await
        })
    };
    gw.publish_n("JOBS", "jobs.x", 1).await;
    let r = waiter.await.unwrap();
    assert_eq!(r.json()["messages"][0]["seq"], 1);
}

/// `tokens` acks a list, `upto` everything delivered up to a sequence;
/// bodies mixing the forms, or out of bounds, are 400 with nothing applied.
async fn batch_acks<H: Harness>() {
    let gw = Gw::start::<H>().await;
    gw.stream("JOBS", json!({"subjects": ["jobs.>"]})).await;
    gw.put("/v1/streams/JOBS/consumers/w", json!({"ack_wait": 30000}).to_string()).await;
    gw.publish_n("JOBS", "jobs.a", 6).await;
    let f = gw.post("/v1/streams/JOBS/consumers/w/fetch", json!({"batch": 6}).to_string()).await;
    let msgs = f.json()["messages"].as_array().unwrap().clone();
    assert_eq!(msgs.len(), 6);
    let tok = |i: usize| msgs[i]["token"].clone();
    let ack = |body: serde_json::Value| gw.post("/v1/streams/JOBS/consumers/w/ack", body.to_string());
    let pending = || async { gw.get("/v1/streams/JOBS/consumers/w").await.json()["num_ack_pending"].clone() };

    for bad in [
        json!({"tokens": [tok(0), "garbage"], "kind": "ack"}),
        json!({"tokens": [], "kind": "ack"}),
        json!({"token": tok(0), "tokens": [tok(1)], "kind": "ack"}),
        json!({"token": tok(0), "upto": 3, "kind": "ack"}),
        json!({"upto": 3, "kind": "term"}),
        json!({"upto": -1, "kind": "ack"}),
    ] {
        ack(bad.clone()).await.assert_problem(400, "invalid");
        assert_eq!(pending().await, 6, "{bad} applied nothing");
    }
    let too_many: Vec<String> = (0..10_001).map(|i| i.to_string()).collect();
    ack(json!({"tokens": too_many, "kind": "ack"})).await.assert_problem(400, "invalid");

    let r = ack(json!({"tokens": [tok(1), tok(3)], "kind": "ack"})).await;
    assert_eq!(r.status, 204, "{}", r.text());
    assert_eq!(pending().await, 4);
    let r = ack(json!({"upto": 4, "kind": "ack"})).await;
    assert_eq!(r.status, 204, "{}", r.text());
    let info = gw.get("/v1/streams/JOBS/consumers/w").await.json();
    assert_eq!((info["num_ack_pending"].clone(), info["ack_floor"].clone()), (json!(2), json!(4)));
    let r = ack(json!({"tokens": [tok(4), tok(5)], "kind": "nak"})).await;
    assert_eq!(r.status, 204, "{}", r.text());
    let f = gw.post("/v1/streams/JOBS/consumers/w/fetch", json!({"batch": 5, "wait_ms": 2000}).to_string()).await;
    let again: Vec<u64> = f.json()["messages"].as_array().unwrap().iter().map(|m| m["seq"].as_u64().unwrap()).collect();
    assert_eq!(again, [5, 6]);
    assert_eq!(ack(json!({"upto": 100, "kind": "ack"})).await.status, 204);
    assert_eq!(pending().await, 0);
    gw.post("/v1/streams/JOBS/consumers/nope/ack", json!({"upto": 1, "kind": "ack"}).to_string())
        .await
        .assert_problem(404, "not-found");
}

per_engine!(fetch_ack_nak_term, fetch_waits_for_a_publish, batch_acks);
