//! The client SDK (`finmesh-client`) against real `finmesh serve`
//! processes on both engines: a node killed (SIGKILL) and restarted on the
//! same port mid-stream, a node that drains (SIGTERM: lame duck, then
//! `reconnect`) with the same node coming back (embedded) or a second
//! gateway on the same NATS cluster to fail over to, and a gap when the
//! stream's retention dropped messages while the subscriber was away. Every
//! case checks that the sequences handed to the application have no hole
//! and no duplicate, over Server-Sent Events and over WebSocket; and that
//! a node's refusals (401, 403, 404) end a subscription with their kind.

mod support;

use std::time::Duration;

use finmesh_client::{Backoff, ErrorKind, Event, Start, Subscription, Transport};
use serde_json::json;
use support::{Engine, Node, NodeSpec, WAIT, create_stream, publish};

const CONFIG: &str = "lame_duck_ms = 200\n[subscriptions]\nretry_ms = 100\nretry_jitter_ms = 100\n";

fn fast() -> Backoff {
    Backoff { initial: Duration::from_millis(50), max: Duration::from_millis(500) }
}

/// Events of `sub` until a message with `seq >= last`; panics after [`WAIT`].
async fn read_until(sub: &mut Subscription, last: u64, events: &mut Vec<Event>) {
    let read = async {
        loop {
            let event = sub.next().await.expect("the subscription goes on").expect("the stream does not end");
            let done = matches!(&event, Event::Message(m) if m.seq >= last);
            events.push(event);
            if done {
                return;
            }
        }
    };
    if tokio::time::timeout(WAIT, read).await.is_err() {
        panic!("no message {last} within {WAIT:?}; events so far: {events:#?}");
    }
}

fn seqs(events: &[Event]) -> Vec<u64> {
    events.iter().filter_map(|e| if let Event::Message(m) = e { Some(m.seq) } else { None }).collect()
}

fn connected_to(events: &[Event]) -> Vec<String> {
    events
        .iter()
        .filter_map(|e| if let Event::Connected { endpoint, .. } = e { Some(endpoint.clone()) } else { None })
        .collect()
}

fn no_anomaly(events: &[Event]) {
    for e in events {
        assert!(
            !matches!(e, Event::Gap { .. } | Event::Reset { .. } | Event::Rewind { .. }),
            "unexpected {e:?} in {events:#?}"
        );
    }
}

/// A node with stream `MD` (`md.>`, `extra` config) and a subscriber token.
async fn setup(spec: &NodeSpec, node: &Node, extra: serde_json::Value) -> (String, String) {
    let admin = spec.admin_token();
    let mut config = json!({"subjects": ["md.>"]});
    config.as_object_mut().unwrap().extend(extra.as_object().unwrap().clone());
    create_stream(node, &admin, "MD", config).await;
    let token = spec.issue_token("feed-reader", &["stream:subscribe:MD"]);
    (admin, token)
}

async fn resumes_after_sigkill(engine: Engine, transport: Transport) {
    let dir = tempfile::tempdir().unwrap();
    let spec = NodeSpec::new(dir.path(), CONFIG, &engine);
    let node = spec.start("127.0.0.1:0");
    let (admin, token) = setup(&spec, &node, json!({})).await;
    publish(&node, &admin, "MD", "md.eu", 1..=20).await;
    let mut sub = Subscription::builder([node.url("")], "MD")
        .token(&token)
        .start(Start::From(1))
        .backoff(fast())
        .transport(transport)
        .build()
        .unwrap();
    let mut events = Vec::new();
    read_until(&mut sub, 10, &mut events).await;

    let addr = node.addr;
    node.stop(libc::SIGKILL);
    let node = spec.start(&addr.to_string());
    publish(&node, &admin, "MD", "md.eu", 21..=40).await;
    read_until(&mut sub, 40, &mut events).await;

    assert_eq!(seqs(&events), (1..=40).collect::<Vec<_>>(), "no loss, no duplicate");
    assert!(connected_to(&events).len() >= 2, "reconnected: {events:#?}");
    assert!(events.iter().any(|e| matches!(e, Event::Disconnected { .. })), "the break was reported");
    no_anomaly(&events);
    assert_eq!(sub.position(), Some(40));
    let stats = sub.stats();
    assert_eq!(stats.delivered, 40);
    assert_eq!((stats.gaps, stats.rewinds, stats.duplicates_dropped, stats.resets), (0, 0, 0, 0), "{stats:?}");
    assert!(stats.connections >= 2 && stats.disconnections >= 1, "{stats:?}");
}

async fn follows_a_draining_node_back(engine: Engine, transport: Transport) {
    let dir = tempfile::tempdir().unwrap();
    let spec = NodeSpec::new(dir.path(), CONFIG, &engine);
    let node = spec.start("127.0.0.1:0");
    let (admin, token) = setup(&spec, &node, json!({})).await;
    publish(&node, &admin, "MD", "md.eu", 1..=5).await;
    let mut sub = Subscription::builder([node.url("")], "MD")
        .token(&token)
        .start(Start::From(1))
        .backoff(fast())
        .transport(transport)
        .build()
        .unwrap();
    let mut events = Vec::new();
    read_until(&mut sub, 5, &mut events).await;

    // The drain ends the subscription with `reconnect`; the SDK retries
    // until the node is back.
    let addr = node.addr;
    let log = node.stop(libc::SIGTERM);
    let node = spec.start(&addr.to_string());
    publish(&node, &admin, "MD", "md.eu", 6..=12).await;
    read_until(&mut sub, 12, &mut events).await;

    assert_eq!(seqs(&events), (1..=12).collect::<Vec<_>>());
    let drained = events.iter().any(|e| matches!(e, Event::Disconnected { reason, .. } if reason.contains("draining")));
    assert!(drained, "the drain was seen as such: {events:#?}\nthe node's log:\n{log}");
    no_anomaly(&events);
}

async fn reports_a_gap_when_retention_dropped_messages(engine: Engine, transport: Transport) {
    let dir = tempfile::tempdir().unwrap();
    let spec = NodeSpec::new(dir.path(), CONFIG, &engine);
    let node = spec.start("127.0.0.1:0");
    let (admin, token) = setup(&spec, &node, json!({"max_msgs": 5})).await;
    publish(&node, &admin, "MD", "md.eu", 1..=3).await;
    let mut sub = Subscription::builder([node.url("")], "MD")
        .token(&token)
        .start(Start::From(1))
        .backoff(fast())
        .transport(transport)
        .build()
        .unwrap();
    let mut events = Vec::new();
    read_until(&mut sub, 3, &mut events).await;

    // While the subscriber is away, retention drops 4..=8.
    let addr = node.addr;
    node.stop(libc::SIGKILL);
    let node = spec.start(&addr.to_string());
    publish(&node, &admin, "MD", "md.eu", 4..=13).await;
    read_until(&mut sub, 13, &mut events).await;

    assert_eq!(seqs(&events), [1, 2, 3, 9, 10, 11, 12, 13]);
    let gaps: Vec<_> = events.iter().filter(|e| matches!(e, Event::Gap { .. })).collect();
    assert_eq!(gaps.len(), 1, "{events:#?}");
    assert!(matches!(gaps[0], Event::Gap { from: 4, to: 8, announced: true, .. }), "{gaps:?}");
    // The gap comes before the messages after it.
    let gap_at = events.iter().position(|e| matches!(e, Event::Gap { .. })).unwrap();
    let nine_at = events.iter().position(|e| matches!(e, Event::Message(m) if m.seq == 9)).unwrap();
    assert!(gap_at < nine_at);
    assert_eq!((sub.stats().gaps, sub.stats().missing), (1, 5));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn embedded_resumes_after_sigkill() {
    resumes_after_sigkill(Engine::Embedded, Transport::Sse).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn embedded_ws_resumes_after_sigkill() {
    resumes_after_sigkill(Engine::Embedded, Transport::WebSocket).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nats_resumes_after_sigkill() {
    let nats = finmesh_testkit::NatsServer::start().await.expect("start nats-server");
    resumes_after_sigkill(Engine::Nats(nats.url()), Transport::Sse).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nats_ws_resumes_after_sigkill() {
    let nats = finmesh_testkit::NatsServer::start().await.expect("start nats-server");
    resumes_after_sigkill(Engine::Nats(nats.url()), Transport::WebSocket).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn embedded_follows_a_draining_node_back() {
    follows_a_draining_node_back(Engine::Embedded, Transport::Sse).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn embedded_ws_follows_a_draining_node_back() {
    follows_a_draining_node_back(Engine::Embedded, Transport::WebSocket).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nats_follows_a_draining_node_back() {
    let nats = finmesh_testkit::NatsServer::start().await.expect("start nats-server");
    follows_a_draining_node_back(Engine::Nats(nats.url()), Transport::Sse).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nats_ws_follows_a_draining_node_back() {
    let nats = finmesh_testkit::NatsServer::start().await.expect("start nats-server");
    follows_a_draining_node_back(Engine::Nats(nats.url()), Transport::WebSocket).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn embedded_reports_a_gap_when_retention_dropped_messages() {
    reports_a_gap_when_retention_dropped_messages(Engine::Embedded, Transport::Sse).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn embedded_ws_reports_a_gap_when_retention_dropped_messages() {
    reports_a_gap_when_retention_dropped_messages(Engine::Embedded, Transport::WebSocket).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nats_reports_a_gap_when_retention_dropped_messages() {
    let nats = finmesh_testkit::NatsServer::start().await.expect("start nats-server");
    reports_a_gap_when_retention_dropped_messages(Engine::Nats(nats.url()), Transport::Sse).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nats_ws_reports_a_gap_when_retention_dropped_messages() {
    let nats = finmesh_testkit::NatsServer::start().await.expect("start nats-server");
    reports_a_gap_when_retention_dropped_messages(Engine::Nats(nats.url()), Transport::WebSocket).await;
}

/// Two gateways on one NATS cluster: when the first drains, the SDK fails
/// over to the second and resumes there.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nats_fails_over_to_another_gateway_when_one_drains() {
    fails_over_to_another_gateway_when_one_drains(Transport::Sse).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nats_ws_fails_over_to_another_gateway_when_one_drains() {
    fails_over_to_another_gateway_when_one_drains(Transport::WebSocket).await;
}

async fn fails_over_to_another_gateway_when_one_drains(transport: Transport) {
    let nats = finmesh_testkit::NatsServer::start().await.expect("start nats-server");
    let dir = tempfile::tempdir().unwrap();
    // One data directory: both gateways verify with the same node secret.
    let spec = NodeSpec::new(dir.path(), CONFIG, &Engine::Nats(nats.url()));
    let a = spec.start("127.0.0.1:0");
    let b = spec.start("127.0.0.1:0");
    let (admin, token) = setup(&spec, &a, json!({})).await;
    publish(&a, &admin, "MD", "md.eu", 1..=5).await;
    let endpoints = [a.url(""), b.url("")];
    let mut sub = Subscription::builder(endpoints.clone(), "MD")
        .token(&token)
        .start(Start::From(1))
        .backoff(fast())
        .transport(transport)
        .build()
        .unwrap();
    let mut events = Vec::new();
    read_until(&mut sub, 5, &mut events).await;

    a.stop(libc::SIGTERM);
    publish(&b, &admin, "MD", "md.eu", 6..=15).await;
    read_until(&mut sub, 15, &mut events).await;

    assert_eq!(seqs(&events), (1..=15).collect::<Vec<_>>());
    assert_eq!(connected_to(&events), endpoints, "first the node that drained, then the other one");
    no_anomaly(&events);
    assert_eq!(sub.stats().failovers, 1);
    assert_eq!(sub.endpoint(), b.url(""));
}

/// 401 (no valid token), 403 (no scope for the stream), 404 (no such
/// stream) end the subscription at once with that kind, on both transports.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn embedded_refusals_end_the_subscription_with_their_kind() {
    let dir = tempfile::tempdir().unwrap();
    let spec = NodeSpec::new(dir.path(), CONFIG, &Engine::Embedded);
    let node = spec.start("127.0.0.1:0");
    let (admin, _token) = setup(&spec, &node, json!({})).await;
    let other = spec.issue_token("other-reader", &["stream:subscribe:OTHER"]);
    for transport in [Transport::Sse, Transport::WebSocket] {
        for (stream, token, kind) in [
            ("MD", "not-a-token", ErrorKind::Unauthorized),
            ("MD", other.as_str(), ErrorKind::Forbidden),
            ("NOPE", admin.as_str(), ErrorKind::NotFound),
        ] {
            let mut sub = Subscription::builder([node.url("")], stream)
                .token(token)
                .transport(transport)
                .backoff(fast())
                .build()
                .unwrap();
            let outcome = tokio::time::timeout(WAIT, async {
                loop {
                    match sub.next().await {
                        Ok(Some(Event::Disconnected { reason, .. })) => panic!("retried a refusal: {reason}"),
                        Ok(Some(_)) => continue,
                        Ok(None) => panic!("ended without an error"),
                        Err(e) => return e,
                    }
                }
            })
            .await
            .expect("a verdict in time");
            assert_eq!(outcome.kind(), kind, "{transport:?} {stream}: {outcome}");
        }
    }
}

/// `finmesh stream sub --ws --endpoints DEAD,NODE`: the CLI subscribes over
/// WebSocket through the SDK, skips the endpoint that refuses connections
/// and prints every message once, in order.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn embedded_cli_sub_over_websocket_fails_over_between_endpoints() {
    use tokio::io::AsyncBufReadExt;
    let dir = tempfile::tempdir().unwrap();
    let spec = NodeSpec::new(dir.path(), CONFIG, &Engine::Embedded);
    let node = spec.start("127.0.0.1:0");
    let (admin, token) = setup(&spec, &node, json!({})).await;
    publish(&node, &admin, "MD", "md.eu", 1..=5).await;
    // A port nobody listens on: bound, then released.
    let dead = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap();
    let endpoints = format!("http://{dead},{}", node.url(""));
    let mut child = tokio::process::Command::new(env!("CARGO_BIN_EXE_finmesh"))
        .args(["stream", "sub", "MD", "--ws", "--from-seq", "1", "--json", "--endpoints", &endpoints])
        .env("FINMESH_TOKEN", &token)
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .expect("run finmesh stream sub");
    let mut lines = tokio::io::BufReader::new(child.stdout.take().unwrap()).lines();
    let mut seqs = Vec::new();
    let read = async {
        while seqs.len() < 5 {
            let line = lines.next_line().await.expect("read").expect("the subscription goes on");
            let event: serde_json::Value = serde_json::from_str(&line).expect("JSON lines");
            assert_eq!(event["event"], "message", "{line}");
            seqs.push(event["id"].as_str().unwrap().parse::<u64>().unwrap());
        }
    };
    tokio::time::timeout(WAIT, read).await.expect("five messages in time");
    assert_eq!(seqs, [1, 2, 3, 4, 5]);
    child.kill().await.unwrap();
    let mut stderr = String::new();
    tokio::io::AsyncReadExt::read_to_string(&mut child.stderr.take().unwrap(), &mut stderr).await.unwrap();
    assert!(stderr.contains(&format!("disconnected from http://{dead}")), "{stderr}");
    assert!(stderr.contains(&format!("connected to {}", node.url(""))), "{stderr}");
}

/// `finmesh stream sub --ws` against an HTTPS node: ALPN would pick HTTP/2,
/// which has no WebSocket upgrade, so the CLI must upgrade over HTTP/1.1.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn embedded_cli_sub_over_websocket_on_tls() {
    use tokio::io::AsyncBufReadExt;
    let dir = tempfile::tempdir().unwrap();
    let certs = dir.path().join("certs");
    let made = std::process::Command::new(env!("CARGO_BIN_EXE_finmesh"))
        .args(["certs", "dev", "--out"])
        .arg(&certs)
        .stdout(std::process::Stdio::null())
        .status()
        .unwrap();
    assert!(made.success());
    let (cert, key) = (certs.join("cert.pem"), certs.join("key.pem"));
    let config =
        format!("{CONFIG}[tls]\ncert = {:?}\nkey = {:?}\n", cert.display().to_string(), key.display().to_string());
    let spec = NodeSpec::new(dir.path(), &config, &Engine::Embedded);
    let node = spec.start("127.0.0.1:0");
    assert!(node.url("").starts_with("https://"), "{}", node.url(""));
    let admin = spec.admin_token();
    let token = spec.issue_token("feed-reader", &["stream:subscribe:MD"]);
    let ca = reqwest::Certificate::from_pem(&std::fs::read(&cert).unwrap()).unwrap();
    let https = reqwest::Client::builder().add_root_certificate(ca).build().unwrap();
    let created = https.put(node.url("/v1/streams/MD")).bearer_auth(&admin).json(&json!({"subjects": ["md.>"]})).send();
    assert_eq!(created.await.unwrap().status(), 200);
    let body: String = (1..=3).map(|i| format!("{{\"subject\":\"md.eu\",\"payload\":{{\"i\":{i}}}}}\n")).collect();
    let published = https
        .post(node.url("/v1/streams/MD/messages"))
        .bearer_auth(&admin)
        .header("content-type", "application/x-ndjson")
        .body(body)
        .send();
    assert_eq!(published.await.unwrap().status(), 200);

    let mut child = tokio::process::Command::new(env!("CARGO_BIN_EXE_finmesh"))
        .args(["stream", "sub", "MD", "--ws", "--from-seq", "1", "--json", "--server", &node.url(""), "--ca-cert"])
        .arg(&cert)
        .env("FINMESH_TOKEN", &token)
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .expect("run finmesh stream sub");
    let mut lines = tokio::io::BufReader::new(child.stdout.take().unwrap()).lines();
    let mut seqs = Vec::new();
    let read = async {
        while seqs.len() < 3 {
            let line = lines.next_line().await.expect("read").expect("the subscription goes on");
            let event: serde_json::Value = serde_json::from_str(&line).expect("JSON lines");
            seqs.push(event["id"].as_str().unwrap().parse::<u64>().unwrap());
        }
    };
    if tokio::time::timeout(WAIT, read).await.is_err() {
        child.kill().await.unwrap();
        let mut stderr = String::new();
        tokio::io::AsyncReadExt::read_to_string(&mut child.stderr.take().unwrap(), &mut stderr).await.unwrap();
        panic!("no three messages in time; got {seqs:?}; stderr:\n{stderr}");
    }
    assert_eq!(seqs, [1, 2, 3]);
}
