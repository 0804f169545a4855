//! `finmesh audit` end to end: the audit starts its own node (embedded, or
//! on a real nats-server), connects SSE and WebSocket subscribers with and
//! without filters, feeds, forces a reconnect of every subscriber, restarts
//! the node (drain, and kill), and must find zero loss; with a gap injected
//! in one subscriber it must fail and name the missing sequence; and it
//! audits a node it did not start (`--server`, no restart then).

mod support;

use std::process::Output;

use serde_json::Value;

/// Run `finmesh audit --json` with `extra` arguments.
async fn audit(extra: &[&str]) -> (Output, Value) {
    let out = tokio::process::Command::new(env!("CARGO_BIN_EXE_finmesh"))
        .args(["audit", "--json", "--subscribers", "4", "--messages", "600", "--rate", "3000", "--batch", "20"])
        .args(extra)
        .env_remove("FINMESH_TOKEN")
        .kill_on_drop(true)
        .output();
    let out =
        tokio::time::timeout(std::time::Duration::from_secs(180), out).await.expect("audit in time").expect("run");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let report = serde_json::from_str(&stdout).unwrap_or_else(|e| {
        panic!("the report is not JSON ({e}):\n{stdout}\nstderr:\n{}", String::from_utf8_lossy(&out.stderr))
    });
    (out, report)
}

/// The report's shape, and zero loss.
fn assert_lossless(out: &Output, r: &Value, engine: &str) {
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "audit failed: {r:#}\n{stderr}");
    assert_eq!(r["ok"], true, "{r:#}");
    assert_eq!(r["node"]["engine"], engine);
    assert_eq!(r["forced_reconnect"], true);
    assert_eq!(r["published"], 600);
    assert_eq!(r["acked_not_stored"], 0);
    let restarted = r["restart"] != "none";
    let (first, last) = (r["first_seq"].as_u64().unwrap(), r["last_seq"].as_u64().unwrap());
    assert_eq!(last - first + 1, 600, "every batch stored once, resends included");
    let subs = r["subscribers"].as_array().unwrap();
    assert_eq!(subs.len(), 4);
    let wires: Vec<_> = subs.iter().map(|s| s["transport"].as_str().unwrap()).collect();
    assert_eq!(wires, ["sse", "ws", "sse", "ws"]);
    assert_eq!(subs[0]["filter"], Value::Null);
    assert_eq!(subs[1]["filter"], "md.S0");
    for s in subs {
        assert_eq!(s["ok"], true, "{s:#}");
        assert!(s["expected"].as_u64().unwrap() > 0, "{s:#}");
        assert_eq!(s["received"], s["expected"], "{s:#}");
        for field in ["missing", "duplicates", "out_of_order", "unexpected", "gaps_reported"] {
            assert_eq!(s[field], 0, "{field}: {s:#}");
        }
        assert_eq!(s["forced_reconnects"], 1);
        // The first connection and the forced reconnect at least. The
        // restart usually adds one more, but not always: when the forced
        // reconnect lands while the node is down, one connection made after
        // the restart serves both (seen in CI). What the restart must not
        // cost is a message, which the counts above check.
        assert!(s["connections"].as_u64().unwrap() >= 2, "first and forced (restarted: {restarted}): {s:#}");
    }
    // Unfiltered subscribers expect the whole range.
    assert_eq!(subs[0]["expected"], 600);
    for key in ["count", "p50", "p99", "p999", "max"] {
        assert!(r["latency_us"][key].is_u64(), "latency_us.{key}: {r:#}");
    }
    for key in ["count", "p50", "p99", "max"] {
        assert!(r["skew_us"][key].is_u64(), "skew_us.{key}: {r:#}");
    }
    assert!(r["latency_us"]["count"].as_u64().unwrap() >= 600);
    assert!(r["latency_us"]["p50"].as_u64().unwrap() <= r["latency_us"]["max"].as_u64().unwrap());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn embedded_audit_finds_no_loss_across_reconnect_and_drain() {
    let (out, r) = audit(&[]).await;
    assert_lossless(&out, &r, "embedded");
    assert_eq!(r["restart"], "drain");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn embedded_audit_finds_no_loss_across_a_killed_node() {
    let (out, r) = audit(&["--restart", "kill"]).await;
    assert_lossless(&out, &r, "embedded");
    assert_eq!(r["restart"], "kill");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nats_audit_finds_no_loss_across_reconnect_and_drain() {
    let nats = finmesh_testkit::NatsServer::start().await.expect("start nats-server");
    let (out, r) = audit(&["--nats", &nats.url()]).await;
    assert_lossless(&out, &r, "nats");
}

/// The checker is not blind: one message forgotten by subscriber 0 fails
/// the audit (exit status 1) and is named.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_injected_gap_fails_the_audit() {
    let (out, r) = audit(&["--inject-gap", "--restart", "none"]).await;
    assert!(!out.status.success(), "{r:#}");
    assert!(String::from_utf8_lossy(&out.stderr).contains("loss audit failed"));
    assert_eq!(r["ok"], false);
    let subs = r["subscribers"].as_array().unwrap();
    assert_eq!(subs[0]["ok"], false);
    assert_eq!(subs[0]["missing"], 1);
    let first = r["first_seq"].as_u64().unwrap();
    assert_eq!(subs[0]["first_missing"], serde_json::json!([first + 1]), "the second message it received");
    assert!(subs[1..].iter().all(|s| s["ok"] == true), "{r:#}");
}

/// A node the audit did not start: targeted with `--server` and a token,
/// never restarted; a stream that already holds messages is audited from
/// its head on.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn embedded_audit_of_a_running_node() {
    use support::{Engine, NodeSpec, create_stream, publish};
    let dir = tempfile::tempdir().unwrap();
    let spec = NodeSpec::new(dir.path(), "[limits.rate]\nper_second = 100000\nburst = 100000\n", &Engine::Embedded);
    let node = spec.start("127.0.0.1:0");
    let admin = spec.admin_token();
    create_stream(&node, &admin, "AUDIT", serde_json::json!({"subjects": ["md.>"]})).await;
    publish(&node, &admin, "AUDIT", "md.S3", 1..=7).await;
    let (out, r) = audit(&["--server", &node.url(""), "--token", &admin]).await;
    assert_lossless(&out, &r, "target");
    assert_eq!(r["restart"], "none", "a node the audit did not start is not restarted");
    assert_eq!(r["first_seq"], 8, "from the stream's head on");
}
