//! Publishing over HTTP (one message, a batch as NDJSON, dedup by Msg-Id,
//! malformed lines) and range reads as NDJSON.

mod support;

use axum::http::Method;
use serde_json::{Value, json};
use support::{Gw, Harness};

const NDJSON: (&str, &str) = ("content-type", "application/x-ndjson");

fn lines(body: &[u8]) -> Vec<Value> {
    body.split(|b| *b == b'\n')
        .filter(|l| !l.is_empty())
        .map(|l| serde_json::from_slice(l).expect("JSON line"))
        .collect()
}

async fn publish_one_and_dedup<H: Harness>() {
    let gw = Gw::start::<H>().await;
    gw.stream("ORDERS", json!({"subjects": ["orders.>"]})).await;
    let r = gw.post("/v1/streams/ORDERS/messages?subject=orders.new", "{\"id\":1}").await;
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.json(), json!({"seq": 1, "duplicate": false}));
    // Subject from the header, with a message id.
    let hdrs = [("finmesh-subject", "orders.paid"), ("msg-id", "m-1")];
    let r = gw.send(Method::POST, "/v1/streams/ORDERS/messages", &hdrs, "bin\u{0}").await;
    assert_eq!(r.json(), json!({"seq": 2, "duplicate": false}));
    let r = gw.send(Method::POST, "/v1/streams/ORDERS/messages", &hdrs, "bin\u{0}").await;
    assert_eq!(r.json(), json!({"seq": 2, "duplicate": true}), "a repeated Msg-Id is acked as duplicate");
    assert_eq!(gw.get("/v1/streams/ORDERS").await.json()["state"]["messages"], 2);
    // No subject / a subject outside the stream / a bad subject.
    gw.post("/v1/streams/ORDERS/messages", "x").await.assert_problem(400, "invalid");
    gw.post("/v1/streams/ORDERS/messages?subject=other", "x").await.assert_problem(400, "invalid");
    gw.post("/v1/streams/ORDERS/messages?subject=a..b", "x").await.assert_problem(400, "invalid");
    gw.post("/v1/streams/NOPE/messages?subject=orders.x", "x").await.assert_problem(404, "not-found");
    assert_eq!(gw.get("/v1/streams").await.json()["streams"], json!(["ORDERS"]));
}

async fn publish_batch<H: Harness>() {
    let gw = Gw::start::<H>().await;
    gw.stream("MD", json!({"subjects": ["md.>"]})).await;
    let body = concat!(
        "{\"subject\":\"md.a\",\"payload\":{\"px\":1.5},\"headers\":{\"src\":\"feed\"},\"msg_id\":\"x1\"}\n",
        "\n",
        "{\"subject\":\"md.b\",\"payload\":\"AAEC\",\"encoding\":\"base64\"}\n",
        "{\"subject\":\"md.a\",\"payload\":{\"px\":1.5},\"msg_id\":\"x1\"}\n",
    );
    let r = gw.send(Method::POST, "/v1/streams/MD/messages", &[NDJSON], body).await;
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(
        r.json()["acks"],
        json!([{"seq": 1, "duplicate": false}, {"seq": 2, "duplicate": false}, {"seq": 1, "duplicate": true}])
    );
    let read = gw.get("/v1/streams/MD/messages?from_seq=1").await;
    assert_eq!(read.header("content-type"), Some("application/x-ndjson"));
    let msgs = lines(&read.body);
    assert_eq!(msgs.len(), 2);
    assert_eq!(msgs[0]["payload"], json!({"px": 1.5}));
    assert_eq!(msgs[0]["headers"]["src"], "feed");
    assert_eq!(msgs[1]["payload"], "AAEC");
    assert_eq!(msgs[1]["encoding"], "base64");
    assert!(msgs[0]["time"].as_str().unwrap().ends_with('Z'));
}

async fn malformed_batch_names_line_and_column<H: Harness>() {
    let gw = Gw::start::<H>().await;
    gw.stream("MD", json!({"subjects": ["md.>"]})).await;
    let body = "{\"subject\":\"md.a\",\"payload\":1}\n{\"subject\":\"md.a\",\"payload\":[1,}\n";
    let r = gw.send(Method::POST, "/v1/streams/MD/messages", &[NDJSON], body).await;
    let p = r.assert_problem(400, "invalid");
    assert_eq!(p["line"], 2);
    assert_eq!(p["column"], 32, "the closing brace after `[1,`");
    assert!(p["detail"].as_str().unwrap().starts_with("line 2, column 32"), "{p}");
    // A bad subject on line 3 and an unknown member: also nothing published.
    let body = "{\"subject\":\"md.a\"}\n{\"subject\":\"md.a\"}\n{\"subject\":\"md. a\"}\n";
    let p = gw.send(Method::POST, "/v1/streams/MD/messages", &[NDJSON], body).await.assert_problem(400, "invalid");
    assert_eq!(p["line"], 3);
    let body = "{\"subject\":\"md.a\",\"payloads\":1}\n";
    assert_eq!(gw.send(Method::POST, "/v1/streams/MD/messages", &[NDJSON], body).await.json()["line"], 1);
    // A subject outside the stream fails the whole batch in the engine.
    let body = "{\"subject\":\"md.a\"}\n{\"subject\":\"zz\"}\n";
    gw.send(Method::POST, "/v1/streams/MD/messages", &[NDJSON], body).await.assert_problem(400, "invalid");
    assert_eq!(gw.get("/v1/streams/MD").await.json()["state"]["messages"], 0, "nothing was published");
}

async fn read_ranges<H: Harness>() {
    let gw = Gw::start::<H>().await;
    gw.stream("S", json!({"subjects": ["s.>"]})).await;
    gw.publish_n("S", "s.a", 10).await;
    gw.publish_n("S", "s.b", 5).await;
    let all = lines(&gw.get("/v1/streams/S/messages").await.body);
    assert_eq!(all.len(), 15);
    let seqs: Vec<u64> = all.iter().map(|m| m["seq"].as_u64().unwrap()).collect();
    assert_eq!(seqs, (1..=15).collect::<Vec<_>>());
    let page = lines(&gw.get("/v1/streams/S/messages?from_seq=4&limit=3").await.body);
    assert_eq!(page.iter().map(|m| m["seq"].as_u64().unwrap()).collect::<Vec<_>>(), [4, 5, 6]);
    let b = lines(&gw.get("/v1/streams/S/messages?subject=s.b").await.body);
    assert_eq!(b.len(), 5);
    assert!(b.iter().all(|m| m["subject"] == "s.b"));
    assert_eq!(b[0]["payload"], json!({"i": 0}));
    gw.get("/v1/streams/S/messages?limit=0").await.assert_problem(400, "invalid");
    gw.get("/v1/streams/S/messages?from_seq=abc").await.assert_problem(400, "invalid");
    assert!(lines(&gw.get("/v1/streams/S/messages?from_seq=100").await.body).is_empty());
    assert_eq!(gw.delete("/v1/streams/S").await.status, 204);
    gw.get("/v1/streams/S/messages").await.assert_problem(404, "not-found");
}

per_engine!(publish_one_and_dedup, publish_batch, malformed_batch_names_line_and_column, read_ranges);
