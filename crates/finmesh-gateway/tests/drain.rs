//! Drain: `begin_drain` flips `/readyz` to 503 at once, every SSE
//! subscriber (streams and watches) receives `event: reconnect` with a
//! jittered `retry:` hint and its stream ends, and the server's graceful shutdown
//! completes.

mod support;

use std::time::Duration;

use serde_json::json;
use support::{Gw, Harness, SseReader, http_client};

const WAIT: Duration = Duration::from_secs(10);

async fn subscribers_get_reconnect_and_readyz_flips<H: Harness>() {
    let gw = Gw::start::<H>().await;
    gw.stream("MD", json!({"subjects": ["md.>"]})).await;
    gw.put("/v1/kv/b", "").await;
    gw.publish_n("MD", "md.x", 3).await;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (app, drain) = (gw.app.clone(), gw.state.drain_token());
    let server = tokio::spawn(async move {
        axum::serve(listener, app).with_graceful_shutdown(async move { drain.cancelled().await }).await
    });
    let client = http_client();
    let ready = client.get(format!("http://{addr}/readyz")).send().await.unwrap();
    assert_eq!(ready.status(), 200);

    let mut subs = Vec::new();
    for i in 0..10 {
        let url = if i % 5 == 4 {
            format!("http://{addr}/v1/kv/b/watch")
        } else {
            format!("http://{addr}/v1/streams/MD/events?from_seq=1")
        };
        let res = client.get(url).send().await.unwrap();
        assert_eq!(res.status(), 200);
        let mut sse = SseReader::new(res.bytes_stream());
        sse.hello().await;
        if i % 5 != 4 {
            for want in 1..=3 {
                assert_eq!(sse.next(WAIT).await.unwrap().seq(), want);
            }
        }
        subs.push((i % 5 != 4, sse));
    }
    assert_eq!(gw.state.subscriber_count(), 10);

    gw.state.begin_drain();
    let r = gw.get("/readyz").await;
    r.assert_problem(503, "unavailable");
    let mut retries = std::collections::BTreeSet::new();
    for (is_stream, sse) in &mut subs {
        let ev = sse.next(WAIT).await.expect("reconnect event");
        assert_eq!(ev.event.as_deref(), Some("reconnect"), "{ev:?}");
        // `retry_ms` (2 s) plus up to `retry_jitter_ms` (3 s) at random.
        let retry = ev.retry.expect("a retry hint");
        assert!((2000..=5000).contains(&retry), "{ev:?}");
        retries.insert(retry);
        assert_eq!(ev.json()["last_seq"], if *is_stream { 3 } else { 0 });
        assert!(sse.next(WAIT).await.is_none(), "the stream ends after reconnect");
    }
    // Ten draws from 3,001 values: all equal only if there is no jitter.
    assert!(retries.len() > 1, "every subscriber got the same retry hint: {retries:?}");
    // With every subscriber gone, graceful shutdown finishes.
    tokio::time::timeout(WAIT, server).await.expect("server shut down").unwrap().unwrap();
    assert_eq!(gw.state.subscriber_count(), 0);
}

per_engine!(subscribers_get_reconnect_and_readyz_flips);
