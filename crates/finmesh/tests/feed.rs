//! `finmesh feed` (the central-server simulator) against real `finmesh
//! serve` processes: a node SIGKILLed and restarted mid-run (embedded), and
//! a feed failing over between two gateways on one NATS server when the
//! first is SIGKILLed. Both end with every tick stored exactly once.

mod support;

use std::collections::HashSet;

use serde_json::Value;
use support::{Engine, Node, NodeSpec, WAIT, http, until};

const CONFIG: &str = "lame_duck_ms = 0\n";
const TICKS: u64 = 3000;

/// Messages stored in `MD` on `node`.
async fn stored_count(node: &Node, token: &str) -> u64 {
    let Ok(res) = http().get(node.url("/v1/streams/MD")).bearer_auth(token).send().await else { return 0 };
    let Ok(info) = res.json::<Value>().await else { return 0 };
    info["state"]["messages"].as_u64().unwrap_or(0)
}

/// Message ids stored in `MD`, in stream order.
async fn stored_ids(node: &Node, token: &str) -> Vec<String> {
    let res = http().get(node.url("/v1/streams/MD/messages?limit=10000")).bearer_auth(token).send().await.unwrap();
    assert_eq!(res.status(), 200);
    res.text()
        .await
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str::<Value>(l).unwrap()["headers"]["Nats-Msg-Id"].as_str().unwrap().to_owned())
        .collect()
}

/// `finmesh feed` of [`TICKS`] ticks against `server` (and `failover`), as a child process.
fn feed(server: &str, failover: &[String], token: &str) -> tokio::process::Child {
    feed_with(server, failover, token, &["--count", &TICKS.to_string()])
}

fn feed_with(server: &str, failover: &[String], token: &str, extra: &[&str]) -> tokio::process::Child {
    let mut cmd = tokio::process::Command::new(env!("CARGO_BIN_EXE_finmesh"));
    cmd.args(["feed", "--server", server, "--json", "--feed-id", "t1", "--symbols", "50", "--rate", "1000"])
        .args(["--burst-every-ms", "700", "--burst-size", "200"])
        .args(extra)
        .env("FINMESH_TOKEN", token)
        .env_remove("FINMESH_SERVER")
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .kill_on_drop(true);
    if !failover.is_empty() {
        cmd.args(["--failover", &failover.join(",")]);
    }
    cmd.spawn().expect("start finmesh feed")
}

/// Wait for the feed to finish; its JSON report.
async fn report(child: tokio::process::Child) -> Value {
    let out = tokio::time::timeout(WAIT, child.wait_with_output()).await.expect("the feed finishes").unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "finmesh feed failed: {stderr}");
    serde_json::from_slice(&out.stdout).unwrap_or_else(|e| panic!("report ({e}): {:?} {stderr}", out.stdout))
}

/// Exactly the ids `t1-1..=t1-TICKS`, each once, in the order they were generated.
fn assert_exactly_once(ids: &[String]) {
    let unique: HashSet<&String> = ids.iter().collect();
    assert_eq!(unique.len(), ids.len(), "duplicates in the stream");
    let want: Vec<String> = (1..=TICKS).map(|n| format!("t1-{n}")).collect();
    assert_eq!(ids.len(), want.len(), "missing ticks");
    assert_eq!(ids, &want[..], "ticks out of order");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_feed_survives_a_node_restart_with_every_tick_once_embedded() {
    let dir = tempfile::tempdir().unwrap();
    let spec = NodeSpec::new(dir.path(), CONFIG, &Engine::Embedded);
    let node = spec.start("127.0.0.1:0");
    let admin = spec.admin_token();
    let addr = node.addr;
    let child = feed(&node.url(""), &[], &admin);
    until(WAIT, "the feed has stored 500 ticks", || stored_count(&node, &admin).map_above(500)).await;
    node.stop(libc::SIGKILL);
    let node = spec.start(&addr.to_string());
    let report = report(child).await;
    eprintln!("feed report: {report}");
    assert_eq!(report["ticks"], TICKS, "{report}");
    assert!(report["reconnects"].as_u64().unwrap() >= 1, "{report}");
    assert!(report["resent"].as_u64().is_some(), "{report}");
    assert_exactly_once(&stored_ids(&node, &admin).await);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_feed_fails_over_between_gateways_on_one_nats_with_every_tick_once() {
    let nats = finmesh_testkit::NatsServer::start().await.expect("start nats-server");
    let dir = tempfile::tempdir().unwrap();
    let spec = NodeSpec::new(dir.path(), CONFIG, &Engine::Nats(nats.url()));
    let a = spec.start("127.0.0.1:0");
    let b = spec.start("127.0.0.1:0");
    let admin = spec.admin_token();
    let a_url = a.url("");
    let child = feed(&a_url, &[b.url("")], &admin);
    until(WAIT, "the feed has stored 500 ticks", || stored_count(&b, &admin).map_above(500)).await;
    a.stop(libc::SIGKILL);
    let report = report(child).await;
    eprintln!("feed report: {report}");
    assert_eq!(report["ticks"], TICKS, "{report}");
    let receivers: Vec<&str> = report["receivers"].as_array().unwrap().iter().map(|r| r.as_str().unwrap()).collect();
    assert_eq!(receivers.first(), Some(&a_url.as_str()), "{report}");
    assert_eq!(receivers.last(), Some(&b.url("").as_str()), "{report}");
    assert_exactly_once(&stored_ids(&b, &admin).await);
}

/// A node that drains (SIGTERM) answers the feed `reconnect` after acking
/// what it received, exits without waiting for the feed, and the feed
/// resumes on the restarted node with every tick once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_feed_follows_a_draining_node_back_with_every_tick_once() {
    let dir = tempfile::tempdir().unwrap();
    let spec = NodeSpec::new(dir.path(), CONFIG, &Engine::Embedded);
    let node = spec.start("127.0.0.1:0");
    let admin = spec.admin_token();
    let addr = node.addr;
    let child = feed(&node.url(""), &[], &admin);
    until(WAIT, "the feed has stored 500 ticks", || stored_count(&node, &admin).map_above(500)).await;
    let started = std::time::Instant::now();
    let log = node.stop(libc::SIGTERM);
    assert!(started.elapsed() < std::time::Duration::from_secs(5), "the drain waited for the feed: {log}");
    let node = spec.start(&addr.to_string());
    let report = report(child).await;
    eprintln!("feed report: {report}");
    assert!(report["reconnects"].as_u64().unwrap() >= 1, "{report}");
    assert_exactly_once(&stored_ids(&node, &admin).await);
}

/// Ctrl-C stops generating; the ticks generated so far are still sent
/// and acked, and the report counts them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_interrupted_feed_acks_what_it_generated() {
    let dir = tempfile::tempdir().unwrap();
    let spec = NodeSpec::new(dir.path(), CONFIG, &Engine::Embedded);
    let node = spec.start("127.0.0.1:0");
    let admin = spec.admin_token();
    let child = feed_with(&node.url(""), &[], &admin, &[]);
    until(WAIT, "the feed has stored 300 ticks", || stored_count(&node, &admin).map_above(300)).await;
    // SAFETY: kill(2) on our own, not yet reaped child.
    assert_eq!(unsafe { libc::kill(child.id().unwrap() as libc::pid_t, libc::SIGINT) }, 0);
    let report = report(child).await;
    let ticks = report["ticks"].as_u64().unwrap();
    assert!(ticks >= 300, "{report}");
    assert_eq!(report["acked"], ticks, "{report}");
    let ids = stored_ids(&node, &admin).await;
    assert_eq!(ids, (1..=ticks).map(|n| format!("t1-{n}")).collect::<Vec<_>>());
}

/// `until` takes a boolean future: a count above a threshold.
trait Above {
    fn map_above(self, n: u64) -> impl std::future::Future<Output = bool>;
}

impl<F: std::future::Future<Output = u64>> Above for F {
    async fn map_above(self, n: u64) -> bool {
        self.await >= n
    }
}
