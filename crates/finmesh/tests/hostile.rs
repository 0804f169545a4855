//! Hostile clients against `finmesh serve` as a real process, on real
//! sockets, each bounded in time: half-open connections that never finish
//! their headers, idle keep-alive connections, connection floods from one
//! address, an SSE or WebSocket subscriber that stops reading while large
//! messages are published, and the lame duck period after SIGTERM.

mod support;

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use serde_json::{Value, json};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpSocket, TcpStream};

const WAIT: Duration = Duration::from_secs(30);

/// A running `finmesh serve` without auth, configured by `config` (TOML).
struct Node {
    child: Child,
    addr: SocketAddr,
    _dir: tempfile::TempDir,
}

impl Node {
    fn start(config: &str, extra: &[&str]) -> Node {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("finmesh.toml");
        std::fs::write(&file, config).unwrap();
        let mut child = Command::new(env!("CARGO_BIN_EXE_finmesh"))
            .args(["serve", "--insecure-no-auth", "--listen", "127.0.0.1:0", "--config"])
            .arg(&file)
            .arg("--data-dir")
            .arg(dir.path().join("data"))
            .args(extra)
            .env_remove("FINMESH_CONFIG")
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("start finmesh serve");
        let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
        let url = loop {
            let line = lines.next().expect("serve exited before listening").unwrap();
            if let Some(url) = line.strip_prefix("listening on http://") {
                break url.to_owned();
            }
        };
        std::thread::spawn(move || lines.for_each(drop));
        Node { child, addr: url.parse().unwrap(), _dir: dir }
    }

    fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.addr)
    }

    /// The value of a counter or gauge line of `/metrics` (0 when absent).
    async fn metric(&self, line_prefix: &str) -> f64 {
        let text = http().get(self.url("/metrics")).send().await.unwrap().text().await.unwrap();
        text.lines().find_map(|l| l.strip_prefix(line_prefix)).map_or(0.0, |v| v.trim().parse().unwrap())
    }
}

impl Drop for Node {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn http() -> reqwest::Client {
    reqwest::Client::builder().timeout(WAIT).build().unwrap()
}

/// Wait until `cond` holds (it asks the node over HTTP: there is no event
/// to await); fails naming `what` after [`WAIT`].
async fn until<F, Fut>(what: &str, cond: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    support::until(WAIT, what, cond).await
}

/// `conn` is closed by the node without an answer to a request.
async fn assert_unanswered(mut conn: TcpStream, what: &str) {
    let _ = conn.write_all(b"GET /healthz HTTP/1.1\r\nhost: x\r\n\r\n").await;
    let mut buf = [0u8; 64];
    let got = tokio::time::timeout(WAIT, conn.read(&mut buf)).await.expect("closed in time");
    assert!(matches!(got, Ok(0) | Err(_)), "the {what} connection was answered: {got:?}");
}

/// A connection from `local` (an address of 127/8) to the node.
async fn connect_from(node: &Node, local: &str) -> TcpStream {
    let socket = TcpSocket::new_v4().unwrap();
    socket.bind(format!("{local}:0").parse().unwrap()).unwrap();
    socket.connect(node.addr).await.unwrap()
}

/// Wait until the server closes `conn` (EOF or reset), reading and
/// discarding what it sends; panics after `within`.
async fn closed_within(conn: &mut TcpStream, within: Duration) {
    let mut buf = vec![0u8; 64 * 1024];
    let read_to_end = async {
        loop {
            match conn.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(_) => {}
            }
        }
    };
    tokio::time::timeout(within, read_to_end).await.expect("the server closed the connection in time");
}

/// Send one request on `conn` and read its answer's head.
async fn request(conn: &mut TcpStream, path: &str) -> String {
    conn.write_all(format!("GET {path} HTTP/1.1\r\nhost: x\r\n\r\n").as_bytes()).await.unwrap();
    let mut seen = Vec::new();
    let mut buf = [0u8; 4096];
    while !String::from_utf8_lossy(&seen).contains("\r\n\r\n") {
        let n = tokio::time::timeout(WAIT, conn.read(&mut buf)).await.expect("an answer in time").unwrap();
        assert!(n > 0, "closed before answering");
        seen.extend_from_slice(&buf[..n]);
    }
    String::from_utf8_lossy(&seen).into_owned()
}

#[tokio::test]
async fn half_open_connections_are_closed_after_the_header_timeout() {
    let node = Node::start("[connections]\nheader_timeout_ms = 500\nidle_timeout_ms = 60000\n", &[]);
    // 150 clients: a third send nothing, a third half a request line, a
    // third a request line and some headers, never the blank line.
    let mut conns = Vec::new();
    for i in 0..150 {
        let mut conn = TcpStream::connect(node.addr).await.unwrap();
        match i % 3 {
            0 => {}
            1 => conn.write_all(b"GET /heal").await.unwrap(),
            _ => conn.write_all(b"GET /healthz HTTP/1.1\r\nhost: x\r\nx-slow: 1\r\n").await.unwrap(),
        }
        conns.push(conn);
    }
    let start = tokio::time::Instant::now();
    futures::future::join_all(conns.iter_mut().map(|c| closed_within(c, Duration::from_secs(10)))).await;
    // 500 ms, plus at most a watchdog tick (125 ms), plus scheduling.
    assert!(start.elapsed() < Duration::from_secs(5), "closed after {:?}", start.elapsed());
    // A client that finishes its request is served as usual.
    let mut good = TcpStream::connect(node.addr).await.unwrap();
    assert!(request(&mut good, "/healthz").await.starts_with("HTTP/1.1 200"));
    let cut = node.metric("finmesh_connections_cut_total{reason=\"header_timeout\"} ").await;
    assert!(cut >= 150.0, "cut for the header timeout: {cut}");
}

#[tokio::test]
async fn an_idle_keep_alive_connection_is_closed_after_the_idle_timeout() {
    let node = Node::start("[connections]\nheader_timeout_ms = 5000\nidle_timeout_ms = 600\n", &[]);
    let mut idle = TcpStream::connect(node.addr).await.unwrap();
    assert!(request(&mut idle, "/healthz").await.starts_with("HTTP/1.1 200"));
    let start = tokio::time::Instant::now();
    closed_within(&mut idle, Duration::from_secs(10)).await;
    assert!(start.elapsed() >= Duration::from_millis(500), "closed too early: {:?}", start.elapsed());
    let cut = node.metric("finmesh_connections_cut_total{reason=\"idle_timeout\"} ").await;
    assert!(cut >= 1.0, "cut for idling: {cut}");
}

#[tokio::test]
async fn connections_are_capped_per_address_and_per_node() {
    let node = Node::start("[connections]\nmax = 8\nmax_per_address = 5\n", &[]);
    // Five from 127.0.0.1, each served (so the acceptor has counted it).
    let mut one = Vec::new();
    for _ in 0..5 {
        let mut conn = connect_from(&node, "127.0.0.1").await;
        assert!(request(&mut conn, "/healthz").await.starts_with("HTTP/1.1 200"));
        one.push(conn);
    }
    // The sixth from that address is closed at once, unanswered.
    assert_unanswered(connect_from(&node, "127.0.0.1").await, "sixth").await;
    // Another address still gets in, up to the node's cap of 8.
    let mut two = Vec::new();
    for _ in 0..3 {
        let mut conn = connect_from(&node, "127.0.0.2").await;
        assert!(request(&mut conn, "/healthz").await.starts_with("HTTP/1.1 200"));
        two.push(conn);
    }
    assert_unanswered(connect_from(&node, "127.0.0.3").await, "ninth").await;
    // Closing connections gives their places back.
    drop(one);
    let refused_address = "finmesh_connections_refused_total{reason=\"address_limit\"} ";
    let mut scrape = None;
    for _ in 0..100 {
        // The acceptor sees the closes a moment later: retry until it let us in.
        match http().get(node.url("/metrics")).send().await {
            Ok(r) => {
                scrape = Some(r.text().await.unwrap());
                break;
            }
            Err(_) => tokio::time::sleep(Duration::from_millis(50)).await,
        }
    }
    let text = scrape.expect("a connection is accepted again once others closed");
    let count = |prefix: &str| text.lines().find_map(|l| l.strip_prefix(prefix)).map(|v| v.trim().to_owned());
    assert_eq!(count(refused_address).as_deref(), Some("1"), "{text}");
    assert_eq!(count("finmesh_connections_refused_total{reason=\"node_limit\"} ").as_deref(), Some("1"), "{text}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stalled_sse_reader_is_cut_and_its_queue_stays_bounded() {
    let config = "[connections]\nwrite_timeout_ms = 1000\n\
                  [subscriptions]\nqueue_max_bytes = 1048576\nstall_timeout_ms = 60000\n";
    let node = Node::start(config, &[]);
    let client = http();
    let created = client.put(node.url("/v1/streams/big")).json(&json!({"subjects": ["big"]})).send().await;
    assert_eq!(created.unwrap().status(), 200);
    // A subscriber with a tiny receive buffer that never reads.
    let socket = TcpSocket::new_v4().unwrap();
    socket.set_recv_buffer_size(4096).unwrap();
    let mut stalled = socket.connect(node.addr).await.unwrap();
    stalled.write_all(b"GET /v1/streams/big/events?from_seq=1 HTTP/1.1\r\nhost: x\r\n\r\n").await.unwrap();
    let subscribers = || async {
        let list: Value = http().get(node.url("/v1/subscribers")).send().await.unwrap().json().await.unwrap();
        list["subscribers"].as_array().unwrap().clone()
    };
    until("the subscriber is registered", || async { !subscribers().await.is_empty() }).await;
    // 100 messages of 128 KiB: 12.5 MiB, far more than the socket buffers hold.
    let payload = "x".repeat(128 * 1024);
    let publisher = {
        let (client, url) = (client.clone(), node.url("/v1/streams/big/messages?subject=big"));
        tokio::spawn(async move {
            for _ in 0..100 {
                let r = client.post(&url).body(payload.clone()).send().await.unwrap();
                assert_eq!(r.status(), 200);
            }
        })
    };
    // Until it is cut, the subscriber's queue never holds more than 1 MiB.
    let mut most = 0u64;
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        let subs = subscribers().await;
        let Some(sub) = subs.first() else { break };
        most = most.max(sub["queued_bytes"].as_u64().unwrap());
        assert!(most <= 1024 * 1024, "queued bytes over the bound: {sub}");
        assert!(tokio::time::Instant::now() < deadline, "the stalled reader was never cut: {sub}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(most > 0, "the queue filled before the cut");
    tokio::time::timeout(WAIT, publisher).await.expect("publishing finished").unwrap();
    let cut = node.metric("finmesh_connections_cut_total{reason=\"write_timeout\"} ").await;
    assert!(cut >= 1.0, "cut by the write timeout: {cut}");
    assert_eq!(node.metric("finmesh_subscriber_queued_bytes ").await, 0.0, "nothing stays queued");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stalled_websocket_reader_is_cut_by_the_write_timeout() {
    let node = Node::start("[connections]\nwrite_timeout_ms = 1000\n[subscriptions]\nstall_timeout_ms = 60000\n", &[]);
    let client = http();
    let created = client.put(node.url("/v1/streams/big")).json(&json!({"subjects": ["big"]})).send().await;
    assert_eq!(created.unwrap().status(), 200);
    // Upgrade by hand, read the 101, then never read again.
    let socket = TcpSocket::new_v4().unwrap();
    socket.set_recv_buffer_size(4096).unwrap();
    let mut stalled = socket.connect(node.addr).await.unwrap();
    let upgrade = "GET /v1/streams/big/ws?from_seq=1 HTTP/1.1\r\nhost: x\r\nconnection: upgrade\r\n\
                   upgrade: websocket\r\nsec-websocket-version: 13\r\n\
                   sec-websocket-key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n";
    stalled.write_all(upgrade.as_bytes()).await.unwrap();
    let mut head = Vec::new();
    let mut byte = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        assert_eq!(tokio::time::timeout(WAIT, stalled.read(&mut byte)).await.expect("an answer").unwrap(), 1);
        head.push(byte[0]);
    }
    assert!(head.starts_with(b"HTTP/1.1 101"), "{}", String::from_utf8_lossy(&head));
    let payload = "x".repeat(128 * 1024);
    let url = node.url("/v1/streams/big/messages?subject=big");
    let publisher = tokio::spawn(async move {
        for _ in 0..100 {
            assert_eq!(client.post(&url).body(payload.clone()).send().await.unwrap().status(), 200);
        }
    });
    until("the stalled WebSocket is cut", || async {
        let list: Value = http().get(node.url("/v1/subscribers")).send().await.unwrap().json().await.unwrap();
        list["subscribers"].as_array().unwrap().is_empty()
    })
    .await;
    tokio::time::timeout(WAIT, publisher).await.expect("publishing finished").unwrap();
    let cut = node.metric("finmesh_connections_cut_total{reason=\"write_timeout\"} ").await;
    assert!(cut >= 1.0, "cut by the write timeout: {cut}");
}

#[tokio::test]
async fn after_sigterm_the_node_keeps_accepting_while_not_ready() {
    let mut node = Node::start("", &["--lame-duck-ms", "4000"]);
    let client = http();
    assert_eq!(client.get(node.url("/readyz")).send().await.unwrap().status(), 200);
    // SAFETY: kill(2) on our own, not yet reaped child.
    assert_eq!(unsafe { libc::kill(node.child.id() as libc::pid_t, libc::SIGTERM) }, 0);
    until("readiness fails", || async { client.get(node.url("/readyz")).send().await.unwrap().status() == 503 }).await;
    // Not ready, yet a new connection is still accepted and served.
    let mut fresh = TcpStream::connect(node.addr).await.unwrap();
    assert!(request(&mut fresh, "/healthz").await.starts_with("HTTP/1.1 200"));
    drop(fresh);
    // After the lame duck period the node drains and exits.
    let status = tokio::task::spawn_blocking(move || {
        let status = node.child.wait().unwrap();
        (status, node)
    });
    let (status, _node) = tokio::time::timeout(WAIT, status).await.expect("serve exits").unwrap();
    assert!(status.success(), "{status:?}");
}
