//! The direct SSE path of `finmesh serve` (`src/direct_sse.rs`): a
//! connection whose first request is a stream subscription is answered off
//! hyper, through the same router (authentication, `access_token`, the
//! route's checks), and ends with the subscription: a client's close frees
//! its place, a drain sends `reconnect`. Every other connection, one that
//! subscribes after another request included, is hyper's as before.

mod support;

use serde_json::{Value, json};
use support::{Engine, NodeSpec, WAIT, create_stream, http, publish, until};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// A raw HTTP/1.1 connection and everything it received so far.
struct Raw {
    conn: TcpStream,
    seen: String,
}

impl Raw {
    async fn send(node: &support::Node, request: &str) -> Raw {
        let mut conn = TcpStream::connect(node.addr).await.expect("connect");
        conn.write_all(request.as_bytes()).await.expect("send the request");
        Raw { conn, seen: String::new() }
    }

    /// Read until `what` was received; returns everything so far.
    async fn until(&mut self, what: &str) -> &str {
        let mut buf = [0u8; 4096];
        while !self.seen.contains(what) {
            let read = tokio::time::timeout(WAIT, self.conn.read(&mut buf)).await;
            let n = read.unwrap_or_else(|_| panic!("no `{what}` within {WAIT:?}: {}", self.seen)).expect("read");
            assert!(n > 0, "closed before `{what}`: {}", self.seen);
            self.seen.push_str(&String::from_utf8_lossy(&buf[..n]));
        }
        &self.seen
    }

    /// Read until the server closes; returns everything received.
    async fn until_closed(&mut self) -> &str {
        let mut rest = Vec::new();
        tokio::time::timeout(WAIT, self.conn.read_to_end(&mut rest)).await.expect("the server closes").expect("read");
        self.seen.push_str(&String::from_utf8_lossy(&rest));
        &self.seen
    }
}

fn subscribe(node: &support::Node, path_and_query: &str, auth: Option<&str>) -> String {
    let auth = auth.map(|t| format!("authorization: Bearer {t}\r\n")).unwrap_or_default();
    format!("GET {path_and_query} HTTP/1.1\r\nhost: {}\r\naccept: text/event-stream\r\n{auth}\r\n", node.addr)
}

async fn gauge(node: &support::Node, name: &str) -> Option<f64> {
    let text = http().get(node.url("/metrics")).send().await.ok()?.text().await.ok()?;
    text.lines().find_map(|l| l.strip_prefix(&format!("{name} "))).and_then(|v| v.trim().parse().ok())
}

async fn connected(node: &support::Node, token: &str) -> usize {
    let res = http().get(node.url("/v1/subscribers")).bearer_auth(token).send().await.expect("subscribers");
    let body: Value = res.json().await.expect("JSON");
    body["subscribers"].as_array().map_or(0, |subs| subs.iter().filter(|s| s["resource"] == "md").count())
}

#[tokio::test]
async fn a_first_request_subscription_is_served_off_hyper_with_the_route_s_checks() {
    let dir = tempfile::tempdir().unwrap();
    let spec = NodeSpec::new(dir.path(), "[subscriptions]\nheartbeat_ms = 200\n", &Engine::Embedded);
    let node = spec.start("127.0.0.1:0");
    let token = spec.admin_token();
    create_stream(&node, &token, "md", json!({"subjects": ["md.>"]})).await;
    publish(&node, &token, "md", "md.A", 1..=3).await;

    // History, then live messages, then heartbeats, on a direct connection.
    let mut sub = Raw::send(&node, &subscribe(&node, "/v1/streams/md/events?from_seq=1", Some(&token))).await;
    let head = sub.until("\r\n\r\n").await.to_owned();
    assert!(head.starts_with("HTTP/1.1 200 OK\r\n"), "{head}");
    for line in
        ["content-type: text/event-stream", "transfer-encoding: chunked", "connection: close", "finmesh-stream-epoch: "]
    {
        assert!(head.contains(line), "`{line}` in {head}");
    }
    sub.until("id: 3\ndata: ").await;
    publish(&node, &token, "md", "md.B", 4..=4).await;
    sub.until("id: 4\ndata: ").await;
    sub.until(": heartbeat").await;
    let direct = || gauge(&node, "finmesh_connections_direct_sse");
    assert_eq!(direct().await, Some(1.0), "the subscription is on the direct path");
    assert_eq!(connected(&node, &token).await, 1);

    // The route's refusals, answered whole and closed.
    let mut refused = Raw::send(&node, &subscribe(&node, "/v1/streams/md/events", None)).await;
    let answer = refused.until_closed().await;
    assert!(answer.starts_with("HTTP/1.1 401 Unauthorized\r\n"), "{answer}");
    assert!(
        answer.contains("content-type: application/problem+json") && answer.contains("connection: close"),
        "{answer}"
    );
    let mut missing = Raw::send(&node, &subscribe(&node, "/v1/streams/nope/events", Some(&token))).await;
    assert!(missing.until_closed().await.starts_with("HTTP/1.1 404 Not Found\r\n"));

    // A browser's `access_token` goes through the edge as on hyper's path.
    let query = format!("/v1/streams/md/events?access_token={token}");
    let mut browser = Raw::send(&node, &subscribe(&node, &query, None)).await;
    let head = browser.until("\r\n\r\n").await;
    assert!(head.starts_with("HTTP/1.1 200 OK\r\n") && head.contains("cache-control: no-store, private"), "{head}");
    drop(browser);

    // A subscription after another request on the same connection is hyper's.
    let kept = format!("GET /healthz HTTP/1.1\r\nhost: {}\r\n\r\n", node.addr)
        + &subscribe(&node, "/v1/streams/md/events?from_seq=4", Some(&token));
    let mut pipelined = Raw::send(&node, &kept).await;
    pipelined.until("id: 4\ndata: ").await;
    assert!(!pipelined.seen.contains("connection: close"), "hyper keeps the connection: {}", pipelined.seen);

    // A client's close ends its subscription and frees its place.
    drop(sub);
    drop(pipelined);
    until(WAIT, "closed subscriptions leave the registry", || async { connected(&node, &token).await == 0 }).await;
    until(WAIT, "the direct gauge drops", || async { direct().await == Some(0.0) }).await;
}

#[tokio::test]
async fn a_drain_ends_a_direct_subscription_with_reconnect() {
    let dir = tempfile::tempdir().unwrap();
    let spec = NodeSpec::new(dir.path(), "lame_duck_ms = 0\n", &Engine::Embedded);
    let node = spec.start("127.0.0.1:0");
    let token = spec.admin_token();
    create_stream(&node, &token, "md", json!({"subjects": ["md.>"]})).await;
    publish(&node, &token, "md", "md.A", 1..=2).await;
    let mut sub = Raw::send(&node, &subscribe(&node, "/v1/streams/md/events?from_seq=1", Some(&token))).await;
    sub.until("id: 2\ndata: ").await;
    node.signal(libc::SIGTERM);
    let all = sub.until_closed().await;
    assert!(all.contains("event: reconnect\n"), "{all}");
    assert!(all.contains("\"last_seq\":2"), "{all}");
    assert!(all.ends_with("0\r\n\r\n"), "the chunked body is terminated: {all}");
}
