//! Events a node may send that today's gateway does not emit yet (the
//! shared fan-out hub will): a heartbeat that carries only an `id:` (the
//! head sequence) and an `error` with reason `slow_consumer`. A scripted
//! SSE server on a real socket plays them; the SDK must move its position
//! to the heartbeat's id without handing anything out, reconnect to the
//! same endpoint at once after `slow_consumer`, and resume from there.

use std::time::Duration;

use finmesh_client::{Event, Start, Subscription};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;

const WAIT: Duration = Duration::from_secs(10);

/// Answer one request with `body` as an event stream, then close; returns
/// the request head.
async fn serve_one(listener: &TcpListener, body: &str) -> String {
    let (mut conn, _) = listener.accept().await.expect("accept");
    let mut head = Vec::new();
    while !head.ends_with(b"\r\n\r\n") {
        let mut byte = [0u8; 1];
        assert_eq!(conn.read(&mut byte).await.expect("read"), 1, "the request head ended early");
        head.push(byte[0]);
    }
    let response = format!(
        "HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\nfinmesh-stream-epoch: 7\r\nconnection: close\r\n\r\n{body}"
    );
    conn.write_all(response.as_bytes()).await.expect("write");
    conn.shutdown().await.expect("close");
    String::from_utf8(head).expect("ASCII head").to_ascii_lowercase()
}

async fn next(sub: &mut Subscription) -> Option<Event> {
    tokio::time::timeout(WAIT, sub.next()).await.expect("an event in time").expect("no fatal error")
}

#[tokio::test]
async fn heartbeat_ids_move_the_position_and_slow_consumer_reconnects_at_once() {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let endpoint = format!("http://{}", listener.local_addr().unwrap());
    let server = tokio::spawn(async move {
        let first = serve_one(
            &listener,
            "retry: 50\n\nid: 1\ndata: {\"seq\":1}\n\nid: 5\n\n: heartbeat\n\n\
             event: error\ndata: {\"reason\":\"slow_consumer\",\"last_seq\":1}\n\n",
        )
        .await;
        let second = serve_one(&listener, "id: 6\ndata: {\"seq\":6}\n\nevent: end\ndata: {}\n\n").await;
        (first, second)
    });

    let mut sub = Subscription::builder([endpoint.clone()], "MD").start(Start::From(1)).build().unwrap();
    assert!(matches!(next(&mut sub).await, Some(Event::Connected { epoch: Some(7), resume_after: None, .. })));
    assert!(matches!(next(&mut sub).await, Some(Event::Message(m)) if m.seq == 1));
    match next(&mut sub).await {
        Some(Event::Disconnected { endpoint: e, reason, retry_in }) => {
            assert_eq!(e, endpoint);
            assert!(reason.contains("slow consumer"), "{reason}");
            assert_eq!(retry_in, Duration::ZERO, "back at once");
        }
        other => panic!("expected the slow consumer cut, got {other:?}"),
    }
    assert_eq!(sub.position(), Some(5), "the heartbeat's id moved the position");
    assert!(matches!(next(&mut sub).await, Some(Event::Connected { resume_after: Some(5), .. })));
    assert!(matches!(next(&mut sub).await, Some(Event::Message(m)) if m.seq == 6));
    assert_eq!(next(&mut sub).await, None, "`end` ends the subscription");

    let (first, second) = server.await.unwrap();
    assert!(first.contains("from_seq=1") && !first.contains("last-event-id"), "{first}");
    assert!(second.contains("last-event-id: 5\r\n") && second.contains("epoch=7"), "{second}");
}
