//! WebSocket subscription over a real socket (tokio-tungstenite): the same
//! envelopes as SSE in text frames, history then live, gap events, and a
//! close frame with a reason when the gateway drains.

mod support;

use std::time::Duration;

use futures::StreamExt;
use serde_json::{Value, json};
use support::{Gw, Harness};
use tokio_tungstenite::tungstenite::Message;

const WAIT: Duration = Duration::from_secs(10);

type Ws = tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>;

async fn next_text(ws: &mut Ws) -> Value {
    loop {
        let msg = tokio::time::timeout(WAIT, ws.next()).await.expect("a frame in time").expect("open").expect("ok");
        match msg {
            Message::Text(t) => return serde_json::from_str(t.as_str()).expect("JSON text frame"),
            Message::Ping(_) | Message::Pong(_) => continue,
            other => panic!("unexpected frame {other:?}"),
        }
    }
}

async fn subscribe_history_then_live<H: Harness>() {
    let gw = Gw::start::<H>().await;
    gw.stream("MD", json!({"subjects": ["md.>"], "max_msgs": 5})).await;
    gw.publish_n("MD", "md.a", 8).await;
    let addr = gw.serve().await;
    let (mut ws, response) =
        tokio_tungstenite::connect_async(format!("ws://{addr}/v1/streams/MD/ws?from_seq=2&subject=md.a"))
            .await
            .expect("connect");
    let epoch = gw.get("/v1/streams/MD").await.json()["epoch"].clone();
    let header = response.headers().get("finmesh-stream-epoch").map(|v| v.to_str().unwrap().to_owned());
    assert_eq!(header, Some(epoch.to_string()), "the upgrade response carries the epoch");
    assert_eq!(next_text(&mut ws).await, json!({"event": "gap", "from": 2, "to": 3, "epoch": epoch}));
    for want in 4..=8 {
        let env = next_text(&mut ws).await;
        assert_eq!(env["seq"], want);
        assert_eq!(env["payload"], json!({"i": want - 1}));
    }
    gw.publish_n("MD", "md.b", 1).await; // filtered out
    gw.publish_n("MD", "md.a", 1).await;
    assert_eq!(next_text(&mut ws).await["seq"], 10);
    assert_eq!(gw.get("/v1/subscribers").await.json()["subscribers"][0]["kind"], "ws");

    // Drain: a final reconnect event, then a close frame with code 1012.
    gw.state.begin_drain();
    let last = next_text(&mut ws).await;
    assert_eq!((&last["event"], &last["last_seq"]), (&json!("reconnect"), &json!(10)), "{last}");
    // The retry hint: `retry_ms` (2 s) plus up to `retry_jitter_ms` (3 s).
    assert!(last["retry_ms"].as_u64().is_some_and(|r| (2000..=5000).contains(&r)), "{last}");
    let close = tokio::time::timeout(WAIT, ws.next()).await.expect("close in time").expect("frame").expect("ok");
    match close {
        Message::Close(Some(frame)) => {
            assert_eq!(u16::from(frame.code), 1012);
            assert!(frame.reason.contains("draining"));
        }
        other => panic!("expected a close frame, got {other:?}"),
    }
}

async fn missing_stream_is_a_problem_before_upgrade<H: Harness>() {
    let gw = Gw::start::<H>().await;
    let addr = gw.serve().await;
    let err = tokio_tungstenite::connect_async(format!("ws://{addr}/v1/streams/NOPE/ws")).await.expect_err("no stream");
    match err {
        tokio_tungstenite::tungstenite::Error::Http(res) => assert_eq!(res.status(), 404),
        other => panic!("expected an HTTP 404, got {other:?}"),
    }
}

per_engine!(subscribe_history_then_live, missing_stream_is_a_problem_before_upgrade);
