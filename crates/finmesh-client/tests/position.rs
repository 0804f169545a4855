//! Scripted nodes on real sockets: the position an application can persist
//! counts only what [`Subscription::next`] handed out, never what was
//! merely received; a 5xx answer is retried on the next endpoint.

use std::time::Duration;

use finmesh_client::{Backoff, Event, Start, Subscription};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;

const WAIT: Duration = Duration::from_secs(10);

/// Answer one request with `status` and `body` (an event stream when the
/// status is 200), then close; returns the request head.
async fn answer(listener: &TcpListener, status: &str, body: &str) -> String {
    let (mut conn, _) = listener.accept().await.expect("accept");
    let mut head = Vec::new();
    while !head.ends_with(b"\r\n\r\n") {
        let mut byte = [0u8; 1];
        assert_eq!(conn.read(&mut byte).await.expect("read"), 1, "the request head ended early");
        head.push(byte[0]);
    }
    let kind = if status.starts_with("200") { "text/event-stream" } else { "application/problem+json" };
    let response = format!(
        "HTTP/1.1 {status}\r\ncontent-type: {kind}\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
        body.len()
    );
    conn.write_all(response.as_bytes()).await.expect("write");
    conn.shutdown().await.expect("close");
    String::from_utf8(head).expect("ASCII head").to_ascii_lowercase()
}

async fn next(sub: &mut Subscription) -> Option<Event> {
    tokio::time::timeout(WAIT, sub.next()).await.expect("an event in time").expect("no fatal error")
}

#[tokio::test]
async fn the_position_counts_only_messages_handed_out() {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let endpoint = format!("http://{}", listener.local_addr().unwrap());
    // Three messages in one write: the SDK receives them all at once.
    let body =
        "id: 1\ndata: {\"seq\":1}\n\nid: 2\ndata: {\"seq\":2}\n\nid: 3\ndata: {\"seq\":3}\n\nevent: end\ndata: {}\n\n";
    let server = tokio::spawn(async move { answer(&listener, "200 OK", body).await });

    let mut sub = Subscription::builder([endpoint], "MD").start(Start::From(1)).build().unwrap();
    assert!(matches!(next(&mut sub).await, Some(Event::Connected { .. })));
    assert_eq!(sub.position(), None);
    for seq in 1..=3 {
        assert!(matches!(next(&mut sub).await, Some(Event::Message(m)) if m.seq == seq));
        assert_eq!(sub.position(), Some(seq), "received 3, handed out {seq}");
    }
    assert_eq!(next(&mut sub).await, None);
    assert_eq!(sub.stats().delivered, 3);
    server.await.unwrap();
}

#[tokio::test]
async fn a_5xx_answer_moves_to_the_next_endpoint() {
    let failing = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let working = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let a = format!("http://{}", failing.local_addr().unwrap());
    let b = format!("http://{}", working.local_addr().unwrap());
    let server = tokio::spawn(async move {
        answer(&failing, "503 Service Unavailable", r#"{"title":"unavailable","detail":"engine down"}"#).await;
        answer(&working, "200 OK", "id: 4\ndata: {\"seq\":4}\n\nevent: end\ndata: {}\n\n").await
    });

    let backoff = Backoff { initial: Duration::from_millis(10), max: Duration::from_millis(50) };
    let mut sub =
        Subscription::builder([a.clone(), b.clone()], "MD").start(Start::After(3)).backoff(backoff).build().unwrap();
    match next(&mut sub).await {
        Some(Event::Disconnected { endpoint, reason, .. }) => {
            assert_eq!(endpoint, a);
            assert!(reason.contains("HTTP 503") && reason.contains("engine down"), "{reason}");
        }
        other => panic!("expected the refusal, got {other:?}"),
    }
    assert!(
        matches!(next(&mut sub).await, Some(Event::Connected { endpoint, resume_after: Some(3), .. }) if endpoint == b)
    );
    assert!(matches!(next(&mut sub).await, Some(Event::Message(m)) if m.seq == 4));
    assert_eq!(next(&mut sub).await, None);
    let head = server.await.unwrap();
    assert!(head.contains("last-event-id: 3\r\n"), "{head}");
    assert_eq!((sub.stats().failovers, sub.stats().connections), (1, 1));
}
