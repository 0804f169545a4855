//! Payloads are bytes: any valid JSON payload, published singly or in an
//! NDJSON batch, comes back byte for byte through every read path (range
//! read, SSE, WebSocket, consumer fetch). Regression for the batch publish
//! that parsed each payload into a `serde_json::Value` and wrote it again:
//! keys came back sorted, `1.50` as `1.5`, `1e2` as `100.0` and
//! `12345678901234567890123` as `1.2345678901234568e+22`.
//!
//! The payloads are random (proptest strategies, a fresh seed per run; set
//! `PROPTEST_RNG_SEED` to replay one) and every failure names the payload.

mod support;

use std::time::Duration;

use axum::http::Method;
use base64::Engine as _;
use futures::StreamExt;
use proptest::prelude::*;
use proptest::strategy::ValueTree;
use proptest::test_runner::TestRunner;
use serde::Deserialize;
use serde_json::json;
use serde_json::value::RawValue;
use support::{Gw, Harness};
use tokio_tungstenite::tungstenite::Message as WsMessage;

const WAIT: Duration = Duration::from_secs(10);

/// Payload sets tried per engine; each set is published twice (singly and
/// as a batch) and read back four ways.
const ROUNDS: usize = 12;

/// Text of a JSON number, spelled the many ways JSON allows.
fn number() -> impl Strategy<Value = String> {
    prop_oneof![
        "-?(0|[1-9][0-9]{0,30})",
        "-?(0|[1-9][0-9]{0,8})\\.[0-9]{1,20}",
        "-?(0|[1-9][0-9]{0,3})(\\.[0-9]{1,6})?[eE][+-]?[0-9]{1,3}",
        Just("1.50".to_owned()),
        Just("1e2".to_owned()),
        Just("12345678901234567890123".to_owned()),
        Just("-0.0".to_owned()),
    ]
}

/// Text of a JSON string: plain characters (any Unicode but `"`, `\` and
/// controls) and every kind of escape, surrogate pairs included.
fn string() -> impl Strategy<Value = String> {
    let piece = prop_oneof![
        4 => "[^\"\\\\\\x00-\\x1f]{1,6}",
        1 => prop::sample::select(vec![
            "\\\"", "\\\\", "\\/", "\\b", "\\f", "\\n", "\\r", "\\t", "\\u00e9", "\\u0000", "\\ud83d\\ude00",
        ])
        .prop_map(str::to_owned),
    ];
    prop::collection::vec(piece, 0..6).prop_map(|pieces| format!("\"{}\"", pieces.concat()))
}

/// Inner whitespace JSON allows between tokens (no CR/LF: a line of NDJSON
/// cannot carry them).
fn space() -> impl Strategy<Value = &'static str> {
    prop::sample::select(vec!["", "", "", " ", "  ", "\t"])
}

fn json_text() -> impl Strategy<Value = String> {
    let leaf =
        prop_oneof![Just("null".to_owned()), Just("true".to_owned()), Just("false".to_owned()), number(), string(),];
    leaf.prop_recursive(3, 24, 5, |inner| {
        prop_oneof![
            prop::collection::vec((space(), inner.clone(), space()), 0..5).prop_map(|items| {
                let items: Vec<String> = items.into_iter().map(|(a, v, b)| format!("{a}{v}{b}")).collect();
                format!("[{}]", items.join(","))
            }),
            prop::collection::vec((string(), space(), inner, space()), 0..5).prop_map(|members| {
                let members: Vec<String> = members.into_iter().map(|(k, a, v, b)| format!("{k}{a}:{b}{v}")).collect();
                format!("{{{}}}", members.join(","))
            }),
        ]
    })
}

/// The members of an envelope that carry the payload.
#[derive(Deserialize)]
struct Envelope<'a> {
    seq: u64,
    #[serde(borrow)]
    payload: &'a RawValue,
    encoding: Option<&'a str>,
}

/// The payload bytes of one envelope and its sequence; inline JSON must
/// stay inline (readable), not fall back to base64.
fn payload_of(envelope: &str) -> (u64, Vec<u8>) {
    let e: Envelope = serde_json::from_str(envelope).unwrap_or_else(|err| panic!("envelope {envelope}: {err}"));
    assert_eq!(e.encoding, None, "a JSON payload without outer whitespace or CR/LF stays inline: {envelope}");
    (e.seq, e.payload.get().as_bytes().to_vec())
}

async fn check_round<H: Harness>(gw: &Gw, addr: std::net::SocketAddr, round: usize, payloads: &[String]) {
    let stream = format!("P{round}");
    gw.stream(&stream, json!({"subjects": [format!("p{round}.>")]})).await;
    let subject = format!("p{round}.x");
    let uri = format!("/v1/streams/{stream}/messages");

    // Singly (the body is the payload), then the same payloads as one batch.
    for p in payloads {
        let r = gw.send(Method::POST, &format!("{uri}?subject={subject}"), &[], p.clone()).await;
        assert_eq!(r.status, 200, "publish {p}: {}", r.text());
    }
    let batch: String = payloads.iter().map(|p| format!("{{\"subject\":\"{subject}\",\"payload\": {p} }}\n")).collect();
    let r = gw.send(Method::POST, &uri, &[("content-type", "application/x-ndjson")], batch).await;
    assert_eq!(r.status, 200, "batch: {}", r.text());
    let want: Vec<(u64, Vec<u8>)> =
        payloads.iter().chain(payloads).enumerate().map(|(i, p)| (i as u64 + 1, p.clone().into_bytes())).collect();
    let n = want.len();
    let check = |path: &str, got: Vec<(u64, Vec<u8>)>| {
        for (g, w) in got.iter().zip(&want) {
            assert_eq!(
                g,
                w,
                "{path}: seq {} came back as {:?}, published as {:?}",
                w.0,
                String::from_utf8_lossy(&g.1),
                String::from_utf8_lossy(&w.1)
            );
        }
        assert_eq!(got.len(), n, "{path}: all messages");
    };

    // Range read (NDJSON).
    let r = gw.get(&format!("{uri}?from_seq=1&limit={n}")).await;
    assert_eq!(r.status, 200, "{}", r.text());
    check("range read", r.text().lines().filter(|l| !l.is_empty()).map(payload_of).collect());

    // SSE.
    let mut sse = support::sse_oneshot(gw, &format!("/v1/streams/{stream}/events?from_seq=1"), &[]).await;
    sse.hello().await;
    let mut got = Vec::new();
    while got.len() < n {
        let ev = sse.next(WAIT).await.expect("an SSE event");
        assert_eq!(ev.event, None, "only messages: {ev:?}");
        got.push(payload_of(&ev.data));
    }
    check("SSE", got);

    // WebSocket, on a real socket.
    let (mut ws, _) = tokio_tungstenite::connect_async(format!("ws://{addr}/v1/streams/{stream}/ws?from_seq=1"))
        .await
        .expect("connect");
    let mut got = Vec::new();
    while got.len() < n {
        match tokio::time::timeout(WAIT, ws.next()).await.expect("a frame in time").expect("open").expect("ok") {
            WsMessage::Text(t) => got.push(payload_of(t.as_str())),
            WsMessage::Ping(_) | WsMessage::Pong(_) => {}
            other => panic!("unexpected frame {other:?}"),
        }
    }
    check("WebSocket", got);

    // Consumer fetch.
    let r = gw.put(&format!("/v1/streams/{stream}/consumers/c"), json!({"ack_wait": 30000}).to_string()).await;
    assert_eq!(r.status, 200, "{}", r.text());
    let r = gw
        .post(&format!("/v1/streams/{stream}/consumers/c/fetch"), json!({"batch": n, "wait_ms": 2000}).to_string())
        .await;
    assert_eq!(r.status, 200, "{}", r.text());
    #[derive(Deserialize)]
    struct Fetched<'a> {
        #[serde(borrow)]
        messages: Vec<&'a RawValue>,
    }
    let body = r.text();
    let fetched: Fetched = serde_json::from_str(&body).expect("fetch answer");
    check("fetch", fetched.messages.iter().map(|m| payload_of(m.get())).collect());
}

async fn any_json_payload_comes_back_byte_identical<H: Harness>() {
    let gw = Gw::start::<H>().await;
    let addr = gw.serve().await;
    let mut runner = TestRunner::new(ProptestConfig::default());
    let sets = prop::collection::vec(json_text(), 1..8);
    for round in 0..ROUNDS {
        let payloads = sets.new_tree(&mut runner).expect("generate payloads").current();
        for p in &payloads {
            serde_json::from_str::<serde::de::IgnoredAny>(p)
                .unwrap_or_else(|e| panic!("generator made bad JSON {p}: {e}"));
        }
        check_round::<H>(&gw, addr, round, &payloads).await;
    }
}

/// The exact spellings the batch path used to rewrite, and a payload that is
/// not inline-able (line breaks) coming back through base64 unchanged.
async fn known_rewrites_are_gone<H: Harness>() {
    let gw = Gw::start::<H>().await;
    gw.stream("K", json!({"subjects": ["k.>"]})).await;
    let payloads = [r#"{"z":1,"a":2}"#, "1.50", "1e2", "12345678901234567890123", r#"{"px": 1.50 ,"qty":[1e2,	-0.0]}"#];
    let batch: String = payloads.iter().map(|p| format!("{{\"subject\":\"k.a\",\"payload\":{p}}}\n")).collect();
    let r = gw.send(Method::POST, "/v1/streams/K/messages", &[("content-type", "application/x-ndjson")], batch).await;
    assert_eq!(r.status, 200, "{}", r.text());
    let multi_line = "{\r\n  \"px\": 1.50\n}";
    let r = gw.send(Method::POST, "/v1/streams/K/messages?subject=k.a", &[], multi_line).await;
    assert_eq!(r.status, 200, "{}", r.text());

    let r = gw.get("/v1/streams/K/messages?from_seq=1&limit=10").await;
    let lines: Vec<&str> = std::str::from_utf8(&r.body).unwrap().lines().collect();
    assert_eq!(lines.len(), payloads.len() + 1);
    for (line, want) in lines.iter().zip(payloads) {
        assert_eq!(payload_of(line).1, want.as_bytes(), "{line}");
    }
    let last: Envelope = serde_json::from_str(lines[payloads.len()]).unwrap();
    assert_eq!(last.encoding, Some("base64"));
    let text: String = serde_json::from_str(last.payload.get()).unwrap();
    assert_eq!(base64::engine::general_purpose::STANDARD.decode(text).unwrap(), multi_line.as_bytes());
}

per_engine!(any_json_payload_comes_back_byte_identical, known_rewrites_are_gone);
