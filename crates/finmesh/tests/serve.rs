//! `finmesh serve` as a real process: first-start admin token, TLS with
//! HTTP/1.1 and HTTP/2, configuration errors, the CLI client against it, and
//! the drain on SIGTERM with 20 SSE subscribers under a publish load.

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use futures::StreamExt;
use serde_json::{Value, json};

const WAIT: Duration = Duration::from_secs(60);

/// A running `finmesh serve`.
struct Node {
    child: Child,
    url: String,
    admin_token: Option<String>,
}

impl Node {
    /// Start serve on a free port; returns once it printed its URL.
    fn start(data_dir: &Path, extra: &[&str]) -> Node {
        let mut child = Command::new(env!("CARGO_BIN_EXE_finmesh"))
            .args(["serve", "--listen", "127.0.0.1:0", "--data-dir"])
            .arg(data_dir)
            .args(extra)
            .env_remove("FINMESH_CONFIG")
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("start finmesh serve");
        let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
        let mut admin_token = None;
        let mut printed = String::new();
        let url = loop {
            let line = lines.next().expect("serve exited before listening").unwrap();
            printed.push_str(&line);
            if let Some(path) = line.strip_prefix("admin token (valid 30 days) written to ") {
                assert_eq!(Path::new(path), data_dir.join("admin-token"));
                let token = std::fs::read_to_string(path).expect("read the admin token file");
                admin_token = Some(token.trim_end().to_owned());
            }
            if let Some(url) = line.strip_prefix("listening on ") {
                break url.to_owned();
            }
        };
        if let Some(token) = &admin_token {
            assert!(!printed.contains(token.as_str()), "the admin token is never printed: {printed}");
        }
        // Keep draining stdout so the child never blocks on a full pipe.
        std::thread::spawn(move || lines.for_each(drop));
        Node { child, url, admin_token }
    }

    fn signal(&self, sig: libc::c_int) {
        // SAFETY: kill(2) on our own, not yet reaped child.
        assert_eq!(unsafe { libc::kill(self.child.id() as libc::pid_t, sig) }, 0);
    }

    /// Wait (in a helper thread, so the wait has a deadline) for the exit.
    fn wait_exit(&mut self) -> std::process::ExitStatus {
        let pid = self.child.id();
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::scope(|scope| {
            let child = &mut self.child;
            scope.spawn(move || {
                let _ = tx.send(child.wait());
            });
            match rx.recv_timeout(WAIT) {
                Ok(status) => status.unwrap(),
                Err(_) => {
                    // SAFETY: kill(2) on our own child, which the thread still waits for.
                    unsafe { libc::kill(pid as libc::pid_t, libc::SIGKILL) };
                    panic!("serve did not exit within {WAIT:?}");
                }
            }
        })
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

#[tokio::test]
async fn first_start_prints_an_admin_token_once_and_it_works() {
    use std::os::unix::fs::PermissionsExt;
    let dir = tempfile::tempdir().unwrap();
    let mut node = Node::start(dir.path(), &[]);
    let token = node.admin_token.clone().expect("first start writes an admin token");
    let mode = std::fs::metadata(dir.path().join("admin-token")).unwrap().permissions().mode();
    assert_eq!(mode & 0o777, 0o600, "the admin token file is readable by its owner only");
    let client = http();
    let no_token = client.put(format!("{}/v1/kv/cards", node.url)).json(&json!({})).send().await.unwrap();
    assert_eq!(no_token.status(), 401);
    assert_eq!(no_token.headers()["content-type"], "application/problem+json");
    let created = client.put(format!("{}/v1/kv/cards", node.url)).bearer_auth(&token).json(&json!({})).send().await;
    assert_eq!(created.unwrap().status(), 200);
    node.signal(libc::SIGTERM);
    assert!(node.wait_exit().success());

    // The second start keeps the secret: no new token, the old one still works.
    let node = Node::start(dir.path(), &[]);
    assert_eq!(node.admin_token, None);
    let info = client.get(format!("{}/v1/kv/cards", node.url)).bearer_auth(&token).send().await.unwrap();
    assert_eq!(info.status(), 200);
}

#[tokio::test]
async fn tls_serves_http1_and_http2_and_refuses_plain_http() {
    let dir = tempfile::tempdir().unwrap();
    let certs = dir.path().join("certs");
    let status = Command::new(env!("CARGO_BIN_EXE_finmesh"))
        .args(["certs", "dev", "--out"])
        .arg(&certs)
        .stdout(Stdio::null())
        .status()
        .unwrap();
    assert!(status.success());
    let (cert, key) = (certs.join("cert.pem"), certs.join("key.pem"));
    let (cert_arg, key_arg) = (cert.to_str().unwrap(), key.to_str().unwrap());
    // One serving thread: the stalled handshake below must not hold up the rest.
    let node = Node::start(
        &dir.path().join("data"),
        &["--insecure-no-auth", "--serve-threads", "1", "--tls-cert", cert_arg, "--tls-key", key_arg],
    );
    assert!(node.url.starts_with("https://127.0.0.1:"), "{}", node.url);
    let _stalled = std::net::TcpStream::connect(node.url.trim_start_matches("https://")).unwrap();
    let ca = reqwest::Certificate::from_pem(&std::fs::read(&cert).unwrap()).unwrap();
    let h2 = reqwest::Client::builder().add_root_certificate(ca.clone()).build().unwrap();
    let response = h2.get(format!("{}/healthz", node.url)).send().await.unwrap();
    assert_eq!(response.status(), 200);
    assert_eq!(response.version(), reqwest::Version::HTTP_2, "ALPN negotiates h2");
    let h1 = reqwest::Client::builder().add_root_certificate(ca).http1_only().build().unwrap();
    let response = h1.get(format!("{}/healthz", node.url)).send().await.unwrap();
    assert_eq!(response.version(), reqwest::Version::HTTP_11);
    // An untrusting client fails the handshake; plain HTTP gets no answer.
    assert!(http().get(format!("{}/healthz", node.url)).send().await.is_err());
    let plain = node.url.replace("https://", "http://");
    assert!(http().get(format!("{plain}/healthz")).send().await.is_err());
}

/// Open a connection and finish one request on it, keeping it open.
fn open_connection(url: &str) -> std::net::TcpStream {
    use std::io::{Read, Write};
    let addr = url.trim_start_matches("http://");
    let mut conn = std::net::TcpStream::connect(addr).unwrap();
    conn.set_read_timeout(Some(WAIT)).unwrap();
    conn.write_all(format!("GET /healthz HTTP/1.1\r\nhost: {addr}\r\n\r\n").as_bytes()).unwrap();
    let mut seen = Vec::new();
    let mut buf = [0u8; 1024];
    while !String::from_utf8_lossy(&seen).contains("\r\n\r\n") {
        let n = conn.read(&mut buf).unwrap();
        assert!(n > 0, "closed before answering");
        seen.extend_from_slice(&buf[..n]);
    }
    assert!(seen.starts_with(b"HTTP/1.1 200"), "{}", String::from_utf8_lossy(&seen));
    conn
}

#[tokio::test]
async fn connections_are_handed_to_the_serving_threads_in_turn() {
    let dir = tempfile::tempdir().unwrap();
    let node = Node::start(dir.path(), &["--insecure-no-auth", "--serve-threads", "2"]);
    let open: Vec<_> = (0..4).map(|_| open_connection(&node.url)).collect();
    // The scrape is the fifth connection: threads 0, 1, 0, 1, 0.
    let text = http().get(format!("{}/metrics", node.url)).send().await.unwrap().text().await.unwrap();
    let count = |thread: &str| {
        let prefix = format!("finmesh_connections_accepted_total{{thread=\"{thread}\"}} ");
        text.lines().find_map(|l| l.strip_prefix(&prefix)).map(|v| v.trim().parse::<u64>().unwrap())
    };
    assert_eq!((count("0"), count("1")), (Some(3), Some(2)), "{text}");
    drop(open);
}

#[tokio::test]
async fn the_drain_deadline_ends_requests_that_would_outlast_it() {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("finmesh.toml");
    // One request at a time: while the fetch holds the place, others get 503.
    std::fs::write(&config, "drain_timeout_ms = 300\n[limits]\nmax_concurrent_requests = 1\n").unwrap();
    let mut node = Node::start(&dir.path().join("data"), &["--config", config.to_str().unwrap()]);
    let token = node.admin_token.clone().unwrap();
    let client = http();
    let stream = format!("{}/v1/streams/quiet", node.url);
    let created = client.put(&stream).bearer_auth(&token).json(&json!({"subjects": ["quiet.>"]})).send().await;
    assert_eq!(created.unwrap().status(), 200);
    let consumer = client.put(format!("{stream}/consumers/c")).bearer_auth(&token).json(&json!({})).send().await;
    assert_eq!(consumer.unwrap().status(), 200);
    // A fetch on an empty stream waits its full 20 s: far past the drain deadline.
    let hold = || {
        tokio::spawn(
            client
                .post(format!("{stream}/consumers/c/fetch"))
                .bearer_auth(&token)
                .json(&json!({"batch": 1, "wait_ms": 20_000}))
                .send(),
        )
    };
    // The fetch holds the only place once probes are refused in a row while
    // it runs. A single 503 is not proof: a probe may find the place still
    // counted for the probe before it. If a probe took the place first, the
    // fetch was the one shed (it has finished): start another.
    let mut fetch = hold();
    let (deadline, mut refused) = (std::time::Instant::now() + WAIT, 0);
    while refused < 3 {
        assert!(std::time::Instant::now() < deadline, "the fetch never took the only place");
        if fetch.is_finished() {
            fetch = hold();
            refused = 0;
        }
        // Health probes are never shed: probe with another public route.
        let status = client.get(format!("{}/metrics", node.url)).send().await.unwrap().status();
        refused = if status == 503 && !fetch.is_finished() { refused + 1 } else { 0 };
    }
    let signalled = std::time::Instant::now();
    node.signal(libc::SIGTERM);
    let (status, node) = tokio::task::spawn_blocking(move || (node.wait_exit(), node)).await.unwrap();
    assert!(status.success(), "{status:?}");
    assert!(signalled.elapsed() < Duration::from_secs(15), "exit took {:?}", signalled.elapsed());
    let answer = tokio::time::timeout(WAIT, fetch).await.unwrap().unwrap();
    assert!(answer.is_err(), "the cut request has no answer: {answer:?}");
    drop(node);
}

/// Issue 21: `--insecure-no-auth` on a non-loopback address without TLS
/// refuses to start (exit 1, naming the flag that would allow it); with the
/// second, explicit flag it starts, warning that it serves without TLS.
#[test]
fn insecure_no_auth_on_a_public_address_needs_a_second_flag() {
    let dir = tempfile::tempdir().unwrap();
    let serve = |extra: &[&str]| {
        let mut c = Command::new(env!("CARGO_BIN_EXE_finmesh"));
        c.args(["serve", "--listen", "0.0.0.0:0", "--insecure-no-auth", "--data-dir"])
            .arg(dir.path())
            .args(extra)
            .env_remove("FINMESH_CONFIG");
        c
    };
    let out = serve(&[]).output().unwrap();
    assert_eq!(out.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("--insecure-no-auth-on-public-address"), "{stderr}");

    let mut child =
        serve(&["--insecure-no-auth-on-public-address"]).stdout(Stdio::piped()).stderr(Stdio::piped()).spawn().unwrap();
    let stdout = BufReader::new(child.stdout.take().unwrap());
    let stderr = BufReader::new(child.stderr.take().unwrap());
    let (tx, rx) = std::sync::mpsc::channel();
    let tx2 = tx.clone();
    std::thread::spawn(move || stdout.lines().map_while(Result::ok).for_each(|l| drop(tx.send(l))));
    std::thread::spawn(move || stderr.lines().map_while(Result::ok).for_each(|l| drop(tx2.send(l))));
    let (mut warned, mut listening) = (false, false);
    while !(warned && listening) {
        let line = rx.recv_timeout(WAIT).expect("serve printed the warning and its URL");
        warned |= line.contains("WARNING: listening on 0.0.0.0:0 without TLS");
        listening |= line.starts_with("listening on http://0.0.0.0:");
    }
    let _ = child.kill();
    let _ = child.wait();
}

#[test]
fn a_bad_configuration_lists_every_problem_and_exits_1() {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("finmesh.toml");
    std::fs::write(&config, "listen = \"nowhere\"\nengine = \"nats\"\n[limits]\nmax_body_bytes = 0\n").unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_finmesh")).args(["serve", "--config"]).arg(&config).output().unwrap();
    assert_eq!(out.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&out.stderr);
    for key in ["listen:", "nats:", "limits.max_body_bytes:"] {
        assert!(stderr.contains(key), "missing {key} in:\n{stderr}");
    }
    let out = Command::new(env!("CARGO_BIN_EXE_finmesh"))
        .args(["config", "check", "--config"])
        .arg(&config)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("3 problem(s)"));
}

/// Run the CLI client against `node`; returns stdout, failing on exit != 0.
fn cli(node: &Node, token: &str, args: &[&str]) -> String {
    let out = Command::new(env!("CARGO_BIN_EXE_finmesh"))
        .args(args)
        .env("FINMESH_SERVER", &node.url)
        .env("FINMESH_TOKEN", token)
        .output()
        .unwrap();
    assert!(out.status.success(), "{args:?}: {}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8(out.stdout).unwrap()
}

#[test]
fn the_cli_client_round_trips_kv_streams_and_consumers() {
    let dir = tempfile::tempdir().unwrap();
    let node = Node::start(dir.path(), &[]);
    let token = node.admin_token.clone().unwrap();
    let t = token.as_str();
    // A missing bucket: the CLI reports the server's problem and exits 1.
    let out = Command::new(env!("CARGO_BIN_EXE_finmesh"))
        .args(["kv", "get", "nobucket", "k"])
        .env("FINMESH_SERVER", &node.url)
        .env("FINMESH_TOKEN", t)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("(HTTP 404)"));

    assert!(cli(&node, t, &["kv", "create", "cards", "--history", "5"]).contains("cards"));
    assert!(cli(&node, t, &["kv", "put", "cards", "k1", "v1"]).contains("revision 1"));
    assert_eq!(cli(&node, t, &["kv", "get", "cards", "k1"]), "v1");
    let conflict = Command::new(env!("CARGO_BIN_EXE_finmesh"))
        .args(["kv", "put", "cards", "k1", "v2", "--if-revision", "7"])
        .env("FINMESH_SERVER", &node.url)
        .env("FINMESH_TOKEN", t)
        .output()
        .unwrap();
    assert!(String::from_utf8_lossy(&conflict.stderr).contains("(HTTP 412)"));
    assert!(cli(&node, t, &["kv", "keys", "cards"]).contains("k1"));
    cli(&node, t, &["kv", "put", "cards", "gone", "x"]);
    let stale = Command::new(env!("CARGO_BIN_EXE_finmesh"))
        .args(["kv", "del", "cards", "gone", "--if-revision", "1"])
        .env("FINMESH_SERVER", &node.url)
        .env("FINMESH_TOKEN", t)
        .output()
        .unwrap();
    assert!(String::from_utf8_lossy(&stale.stderr).contains("(HTTP 412)"));
    assert!(cli(&node, t, &["kv", "del", "cards", "gone", "--if-revision", "2"]).contains("revision 3"));
    // Key listing in pages: one page with its cursor, or every page with --all.
    for k in ["k2", "k3", "k4"] {
        cli(&node, t, &["kv", "put", "cards", k, "v"]);
    }
    assert_eq!(cli(&node, t, &["kv", "keys", "cards", "--limit", "2"]), "k1\nk2\n");
    assert_eq!(cli(&node, t, &["kv", "keys", "cards", "--limit", "2", "--after", "k2"]), "k3\nk4\n");
    assert_eq!(cli(&node, t, &["kv", "keys", "cards", "--limit", "1", "--all"]), "k1\nk2\nk3\nk4\n");
    assert_eq!(
        cli(&node, t, &["kv", "keys", "cards", "--limit", "3", "--all", "--prefix", "k", "--json"]),
        "\"k1\"\n\"k2\"\n\"k3\"\n\"k4\"\n"
    );
    let page: serde_json::Value =
        serde_json::from_str(&cli(&node, t, &["kv", "keys", "cards", "--limit", "3", "--json"])).unwrap();
    assert_eq!(page, serde_json::json!({"keys": ["k1", "k2", "k3"], "next": "k3"}));

    cli(&node, t, &["stream", "create", "orders", "--subjects", "orders.>"]);
    assert!(cli(&node, t, &["stream", "pub", "orders", "orders.eu", "{\"id\":1}", "--msg-id", "a"]).contains("seq 1"));
    assert!(
        cli(&node, t, &["stream", "pub", "orders", "orders.eu", "{\"id\":1}", "--msg-id", "a"]).contains("duplicate")
    );
    let read = cli(&node, t, &["stream", "read", "orders", "--json"]);
    let first: Value = serde_json::from_str(read.lines().next().unwrap()).unwrap();
    assert_eq!((first["seq"].as_u64(), &first["payload"]), (Some(1), &json!({"id": 1})));
    // Payloads are shown as published, never re-serialized.
    let exact = r#"{"px":1.50,"id":2,"big":12345678901234567890123}"#;
    cli(&node, t, &["stream", "pub", "orders", "orders.eu", exact]);
    let read = cli(&node, t, &["stream", "read", "orders"]);
    assert!(read.lines().nth(1).is_some_and(|l| l.ends_with(exact)), "{read}");
    let info: Value = serde_json::from_str(&cli(&node, t, &["stream", "info", "orders", "--json"])).unwrap();
    assert_eq!(info["state"]["messages"], 2);

    cli(&node, t, &["consumer", "create", "orders", "billing"]);
    let fetched: Value =
        serde_json::from_str(&cli(&node, t, &["consumer", "fetch", "orders", "billing", "--batch", "1", "--json"]))
            .unwrap();
    let token_of_delivery = fetched["messages"][0]["token"].as_str().unwrap().to_owned();
    cli(&node, t, &["consumer", "ack", "orders", "billing", &token_of_delivery]);
    let human = cli(&node, t, &["consumer", "fetch", "orders", "billing"]);
    assert!(human.contains(exact) && human.contains("token=\""), "{human}");
}

/// Read one SSE subscription until `event: reconnect`; returns the ids seen.
async fn subscribe_until_reconnect(
    client: reqwest::Client,
    url: String,
    token: String,
    connected: tokio::sync::mpsc::Sender<()>,
) -> (Vec<u64>, bool) {
    let response = client.get(url).bearer_auth(token).send().await.unwrap();
    assert_eq!(response.status(), 200);
    connected.send(()).await.unwrap();
    let mut body = response.bytes_stream();
    let (mut text, mut ids) = (String::new(), Vec::new());
    while let Some(chunk) = body.next().await {
        let Ok(chunk) = chunk else { break };
        text.push_str(&String::from_utf8_lossy(&chunk));
        while let Some(end) = text.find("\n\n") {
            let frame: String = text.drain(..end + 2).collect();
            if frame.lines().any(|l| l == "event: reconnect") {
                return (ids, true);
            }
            if let Some(id) = frame.lines().find_map(|l| l.strip_prefix("id: ")) {
                ids.push(id.parse().unwrap());
            }
        }
    }
    (ids, false)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_drains_20_subscribers_and_loses_no_acked_publish() {
    let dir = tempfile::tempdir().unwrap();
    let mut node = Node::start(dir.path(), &[]);
    let token = node.admin_token.clone().unwrap();
    let client = http();
    let stream = format!("{}/v1/streams/ticks", node.url);
    let created = client.put(&stream).bearer_auth(&token).json(&json!({"subjects": ["ticks.>"]})).send().await;
    assert_eq!(created.unwrap().status(), 200);

    let mut subscribers = Vec::new();
    let (connected_tx, mut connected) = tokio::sync::mpsc::channel(20);
    for _ in 0..20 {
        let url = format!("{stream}/events?from_seq=1");
        let task = subscribe_until_reconnect(client.clone(), url, token.clone(), connected_tx.clone());
        subscribers.push(tokio::spawn(task));
    }
    for _ in 0..20 {
        tokio::time::timeout(WAIT, connected.recv()).await.expect("subscribers connect").unwrap();
    }

    // Publish load from 4 tasks until the server stops answering.
    let (acked_tx, mut acked_rx) = tokio::sync::mpsc::unbounded_channel();
    let mut publishers = Vec::new();
    for task in 0..4 {
        let (client, url, token, acked) =
            (client.clone(), format!("{stream}/messages"), token.clone(), acked_tx.clone());
        publishers.push(tokio::spawn(async move {
            for i in 0u64.. {
                let payload = format!("{{\"task\":{task},\"i\":{i}}}");
                let sent = client.post(&url).query(&[("subject", "ticks.x")]).bearer_auth(&token).body(payload.clone());
                match sent.send().await {
                    Ok(r) if r.status() == 200 => {
                        let ack: Value = r.json().await.unwrap();
                        acked.send((ack["seq"].as_u64().unwrap(), payload)).unwrap();
                    }
                    _ => break,
                }
            }
        }));
    }
    drop(acked_tx);
    let mut acked = Vec::new();
    while acked.len() < 300 {
        acked.push(acked_rx.recv().await.expect("publishers stopped early"));
    }

    node.signal(libc::SIGTERM);
    for s in subscribers {
        let (ids, reconnect) = tokio::time::timeout(WAIT, s).await.expect("subscriber ended").unwrap();
        assert!(reconnect, "a subscriber ended without `reconnect` after {} events", ids.len());
        assert!(ids.windows(2).all(|w| w[1] == w[0] + 1), "events in order, no gap or duplicate");
    }
    for p in publishers {
        tokio::time::timeout(WAIT, p).await.expect("publisher stopped").unwrap();
    }
    while let Some(a) = acked_rx.recv().await {
        acked.push(a);
    }
    let status = tokio::task::spawn_blocking(move || {
        let status = node.wait_exit();
        (status, node)
    })
    .await
    .unwrap();
    assert!(status.0.success(), "serve exits 0 after a drain: {:?}", status.0);
    drop(status.1);

    // Every acked publish is there after a restart, with its payload.
    let node = Node::start(dir.path(), &[]);
    let max = acked.iter().map(|(seq, _)| *seq).max().unwrap();
    let read = client
        .get(format!("{}/v1/streams/ticks/messages", node.url))
        .query(&[("from_seq", "1"), ("limit", &max.to_string())])
        .bearer_auth(&token)
        .send()
        .await
        .unwrap();
    let body = read.text().await.unwrap();
    let stored: std::collections::HashMap<u64, Value> = body
        .lines()
        .map(|l| serde_json::from_str::<Value>(l).unwrap())
        .map(|m| (m["seq"].as_u64().unwrap(), m["payload"].clone()))
        .collect();
    for (seq, payload) in &acked {
        let want: Value = serde_json::from_str(payload).unwrap();
        assert_eq!(stored.get(seq), Some(&want), "acked seq {seq} lost or changed");
    }
}

#[tokio::test]
async fn a_client_ca_makes_client_certificates_required() {
    use rcgen::{BasicConstraints, CertificateParams, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair};
    let dir = tempfile::tempdir().unwrap();
    let write = |name: &str, pem: String| {
        let path = dir.path().join(name);
        std::fs::write(&path, pem).unwrap();
        path.to_str().unwrap().to_owned()
    };
    // A server pair for localhost, a client CA, and a client certificate it signed.
    let server = rcgen::generate_simple_self_signed(vec!["127.0.0.1".to_owned()]).unwrap();
    let (cert, key) = (write("cert.pem", server.cert.pem()), write("key.pem", server.signing_key.serialize_pem()));
    let ca_key = KeyPair::generate().unwrap();
    let mut ca_params = CertificateParams::new(Vec::<String>::new()).unwrap();
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    let ca_cert = ca_params.self_signed(&ca_key).unwrap();
    let ca = write("ca.pem", ca_cert.pem());
    let client_key = KeyPair::generate().unwrap();
    let mut client_params = CertificateParams::new(vec!["client.example".to_owned()]).unwrap();
    client_params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
    let client_cert = client_params.signed_by(&client_key, &Issuer::new(ca_params, ca_key)).unwrap();

    let node = Node::start(
        &dir.path().join("data"),
        &["--insecure-no-auth", "--tls-cert", &cert, "--tls-key", &key, "--tls-client-ca", &ca],
    );
    let trust = reqwest::Certificate::from_pem(server.cert.pem().as_bytes()).unwrap();
    let anonymous = reqwest::Client::builder().add_root_certificate(trust.clone()).build().unwrap();
    assert!(anonymous.get(format!("{}/healthz", node.url)).send().await.is_err(), "no client certificate: refused");
    let identity =
        reqwest::Identity::from_pem(format!("{}{}", client_cert.pem(), client_key.serialize_pem()).as_bytes());
    let client = reqwest::Client::builder().add_root_certificate(trust).identity(identity.unwrap()).build().unwrap();
    let response = client.get(format!("{}/healthz", node.url)).send().await.unwrap();
    assert_eq!(response.status(), 200);
}

#[tokio::test]
async fn serve_runs_on_the_nats_engine() {
    let nats = finmesh_testkit::NatsServer::start().await.expect("start nats-server");
    let dir = tempfile::tempdir().unwrap();
    let node = Node::start(dir.path(), &["--engine", "nats", "--nats-servers", &nats.url()]);
    let token = node.admin_token.clone().expect("the node secret lives in the data dir on NATS too");
    let client = http();
    let bucket = client.put(format!("{}/v1/kv/cards", node.url)).bearer_auth(&token).json(&json!({"history": 3}));
    assert_eq!(bucket.send().await.unwrap().status(), 200);
    let put = client.put(format!("{}/v1/kv/cards/k1", node.url)).bearer_auth(&token).body("v1").send().await.unwrap();
    assert_eq!((put.status().as_u16(), put.headers()["etag"].to_str().unwrap()), (200, "\"1\""));
    let get = client.get(format!("{}/v1/kv/cards/k1", node.url)).bearer_auth(&token).send().await.unwrap();
    assert_eq!(get.text().await.unwrap(), "v1");
    // The value sits in the standard KV bucket, readable by a plain NATS client.
    let plain = async_nats::connect(nats.url()).await.unwrap();
    let kv = async_nats::jetstream::new(plain).get_key_value("cards").await.unwrap();
    assert_eq!(kv.get("k1").await.unwrap().unwrap(), "v1".as_bytes());
    let ready = client.get(format!("{}/readyz", node.url)).send().await.unwrap();
    assert_eq!(ready.status(), 200);
}

#[tokio::test]
async fn oauth_client_credentials_through_a_configured_node() {
    let dir = tempfile::tempdir().unwrap();
    let secret_file = dir.path().join("signing.secret");
    std::fs::write(&secret_file, "a-signing-secret-of-at-least-32-bytes-long").unwrap();
    // The operator's path: hash a client secret with the CLI.
    let mut hash = Command::new(env!("CARGO_BIN_EXE_finmesh"))
        .args(["oauth", "hash-secret"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    std::io::Write::write_all(hash.stdin.as_mut().unwrap(), b"client-secret-0123456789\n").unwrap();
    let out = hash.wait_with_output().unwrap();
    let stdout = String::from_utf8(out.stdout).unwrap();
    let secret_hash = stdout.trim().strip_prefix("secret_hash: ").unwrap().to_owned();
    let clients = dir.path().join("clients.toml");
    std::fs::write(
        &clients,
        format!("[[client]]\nid = \"feed\"\nsecret_hash = \"{secret_hash}\"\nscopes = [\"kv:read:refdata\"]\n"),
    )
    .unwrap();
    let config = dir.path().join("finmesh.toml");
    std::fs::write(
        &config,
        format!("[auth]\nclients_file = {clients:?}\n[auth.signing]\nalg = \"HS256\"\nsecret_file = {secret_file:?}\n"),
    )
    .unwrap();
    let node = Node::start(&dir.path().join("data"), &["--config", config.to_str().unwrap()]);
    assert_eq!(node.admin_token, None, "configured auth prints no admin token");

    let client = http();
    let token_url = format!("{}/oauth/token", node.url);
    let form = [("grant_type", "client_credentials")];
    let denied = client.post(&token_url).basic_auth("feed", Some("wrong-secret-0123456789")).form(&form).send();
    let denied = denied.await.unwrap();
    assert_eq!(denied.status(), 401);
    assert_eq!(denied.json::<Value>().await.unwrap()["error"], "invalid_client");
    let granted = client.post(&token_url).basic_auth("feed", Some("client-secret-0123456789")).form(&form).send();
    let granted: Value = granted.await.unwrap().json().await.unwrap();
    let token = granted["access_token"].as_str().expect("an access token");
    assert_eq!(granted["scope"], "kv:read:refdata");
    // Its scope reads refdata (404: no such bucket yet) and nothing else (403).
    let read = client.get(format!("{}/v1/kv/refdata/k", node.url)).bearer_auth(token).send().await.unwrap();
    assert_eq!(read.status(), 404);
    let write = client.put(format!("{}/v1/kv/refdata/k", node.url)).bearer_auth(token).body("x").send().await;
    assert_eq!(write.unwrap().status(), 403);
}
