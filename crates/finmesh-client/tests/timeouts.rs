//! Nodes that stop answering without closing anything (a partition, a
//! dead machine): an attempt that gets no answer within the open timeout,
//! and an open connection silent past the idle timeout, both move the
//! subscription to the next endpoint, which resumes after the position.

use std::time::Duration;

use finmesh_client::{Backoff, Event, Start, Subscription};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

const WAIT: Duration = Duration::from_secs(10);

/// Accept one connection and read its request head.
async fn accept(listener: &TcpListener) -> (TcpStream, String) {
    let (mut conn, _) = listener.accept().await.expect("accept");
    let mut head = Vec::new();
    while !head.ends_with(b"\r\n\r\n") {
        let mut byte = [0u8; 1];
        assert_eq!(conn.read(&mut byte).await.expect("read"), 1, "the request head ended early");
        head.push(byte[0]);
    }
    (conn, String::from_utf8(head).expect("ASCII head").to_ascii_lowercase())
}

async fn stream_head(conn: &mut TcpStream, body: &str) {
    let head = "HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\nconnection: close\r\n\r\n";
    conn.write_all(format!("{head}{body}").as_bytes()).await.expect("write");
}

async fn next(sub: &mut Subscription) -> Event {
    let event = tokio::time::timeout(WAIT, sub.next()).await.expect("an event in time");
    event.expect("no fatal error").expect("not the end")
}

fn fast() -> Backoff {
    Backoff { initial: Duration::from_millis(10), max: Duration::from_millis(50) }
}

#[tokio::test]
async fn an_attempt_without_an_answer_moves_to_the_next_endpoint() {
    let mute = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let good = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let (a, b) = (format!("http://{}", mute.local_addr().unwrap()), format!("http://{}", good.local_addr().unwrap()));
    let server = tokio::spawn(async move {
        // Accepted, read, never answered (kept open until the test ends).
        let (held, _) = accept(&mute).await;
        let (mut conn, _) = accept(&good).await;
        stream_head(&mut conn, "id: 1\ndata: {\"seq\":1}\n\n").await;
        (held, conn)
    });
    let mut sub = Subscription::builder([a.clone(), b.clone()], "MD")
        .start(Start::From(1))
        .backoff(fast())
        .open_timeout(Duration::from_millis(300))
        .build()
        .unwrap();
    match next(&mut sub).await {
        Event::Disconnected { endpoint, reason, .. } => {
            assert_eq!(endpoint, a);
            assert!(reason.contains("no answer"), "{reason}");
        }
        other => panic!("expected the silent endpoint to be given up, got {other:?}"),
    }
    assert!(matches!(next(&mut sub).await, Event::Connected { endpoint, .. } if endpoint == b));
    assert!(matches!(next(&mut sub).await, Event::Message(m) if m.seq == 1));
    drop(server.await.unwrap());
}

#[tokio::test]
async fn a_connection_silent_past_the_idle_timeout_is_left_for_the_next_endpoint() {
    let silent = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let good = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let (a, b) = (format!("http://{}", silent.local_addr().unwrap()), format!("http://{}", good.local_addr().unwrap()));
    let server = tokio::spawn(async move {
        // One message, then silence on an open connection.
        let (mut held, _) = accept(&silent).await;
        stream_head(&mut held, "id: 1\ndata: {\"seq\":1}\n\n").await;
        let (mut conn, head) = accept(&good).await;
        stream_head(&mut conn, "id: 2\ndata: {\"seq\":2}\n\n").await;
        (held, conn, head)
    });
    let mut sub = Subscription::builder([a.clone(), b.clone()], "MD")
        .start(Start::From(1))
        .backoff(fast())
        .idle_timeout(Duration::from_millis(300))
        .build()
        .unwrap();
    assert!(matches!(next(&mut sub).await, Event::Connected { endpoint, .. } if endpoint == a));
    assert!(matches!(next(&mut sub).await, Event::Message(m) if m.seq == 1));
    match next(&mut sub).await {
        Event::Disconnected { endpoint, reason, .. } => {
            assert_eq!(endpoint, a);
            assert!(reason.contains("heartbeat"), "{reason}");
        }
        other => panic!("expected the silent connection to be left, got {other:?}"),
    }
    assert!(matches!(next(&mut sub).await, Event::Connected { endpoint, resume_after: Some(1), .. } if endpoint == b));
    assert!(matches!(next(&mut sub).await, Event::Message(m) if m.seq == 2));
    let (_, _, head) = server.await.unwrap();
    assert!(head.contains("last-event-id: 1\r\n"), "{head}");
}
