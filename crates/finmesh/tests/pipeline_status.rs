//! `finmesh pipeline open-run` and `finmesh pipeline status` against a real
//! `finmesh serve` on NATS, with a reconciler running beside it on the same
//! NATS server: text and `--json` output, a 404 for an unknown run, and
//! `--watch` following a run until its window fails it (exit status 1).

mod support;

use std::process::Command;
use std::sync::Arc;
use std::time::Duration;

use finmesh_pipeline::reconcile::{Reconciler, ReconcilerConfig};
use support::{Engine, NodeSpec};

fn cli(node: &support::Node, token: &str, args: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_finmesh"))
        .args(args)
        .env("FINMESH_SERVER", node.url(""))
        .env("FINMESH_TOKEN", token)
        .env_remove("FINMESH_CONFIG")
        .output()
        .expect("run the CLI")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn open_run_status_and_watch_until_the_window_fails_the_run() {
    let nats = finmesh_testkit::NatsServer::start().await.expect("start nats-server");
    let dir = tempfile::tempdir().unwrap();
    let spec = NodeSpec::new(dir.path(), "", &Engine::Nats(nats.url().to_owned()));
    let node = spec.start("127.0.0.1:0");
    let token = spec.admin_token();

    let out = cli(&node, &token, &["pipeline", "open-run", "r1", "--slice", "s1=a,b", "--window-s", "2"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let text = String::from_utf8(out.stdout).unwrap();
    assert!(text.starts_with("run r1 (pipeline risk): open"), "{text}");
    assert!(text.contains("slice s1: open (0 of 2 files)") && text.contains("missing: a, b"), "{text}");

    let out = cli(&node, &token, &["pipeline", "status", "r1", "--json"]);
    assert!(out.status.success());
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!((v["run"].as_str(), v["state"].as_str()), (Some("r1"), Some("open")));

    let out = cli(&node, &token, &["pipeline", "status", "nope"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("(HTTP 404)"));

    // The reconciler, as `pipeline run` would start it, on the same NATS.
    let options = finmesh_nats::NatsEngineOptions::new(nats.url());
    let engine = Arc::new(finmesh_nats::NatsEngine::connect(options).await.expect("connect"));
    let mut config = ReconcilerConfig::new("risk");
    config.fetch_wait = Duration::from_millis(50);
    config.refresh = Duration::from_millis(100);
    let shutdown = tokio_util::sync::CancellationToken::new();
    let task = tokio::spawn(Reconciler::run(engine, config, shutdown.clone()));

    let watch = tokio::task::spawn_blocking({
        let (url, token) = (node.url(""), token.clone());
        move || {
            Command::new(env!("CARGO_BIN_EXE_finmesh"))
                .args(["pipeline", "status", "r1", "--watch", "--interval-ms", "100"])
                .env("FINMESH_SERVER", url)
                .env("FINMESH_TOKEN", token)
                .output()
                .expect("run the CLI")
        }
    });
    let out = tokio::time::timeout(Duration::from_secs(60), watch).await.expect("watch ends").unwrap();
    assert_eq!(out.status.code(), Some(1), "a failed run: {}", String::from_utf8_lossy(&out.stderr));
    let text = String::from_utf8(out.stdout).unwrap();
    assert!(text.starts_with("run r1 (pipeline risk): failed at "), "{text}");
    assert!(
        text.contains("slice s1: file a never arrived") && text.contains("slice s1: file b never arrived"),
        "{text}"
    );
    assert!(String::from_utf8_lossy(&out.stderr).contains("run r1 failed"));
    shutdown.cancel();
    task.await.unwrap().unwrap();
}

/// `[reconcile] pipelines = ["risk"]`: the node itself reconciles, so a run
/// whose file never arrives fails when its window passes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_with_a_reconcile_section_reconciles_its_runs() {
    let dir = tempfile::tempdir().unwrap();
    let spec =
        NodeSpec::new(dir.path(), "[reconcile]\npipelines = [\"risk\"]\nack_wait_ms = 1000\n", &Engine::Embedded);
    let node = spec.start("127.0.0.1:0");
    let token = spec.admin_token();
    let out = cli(&node, &token, &["pipeline", "open-run", "n1", "--slice", "s=1", "--window-s", "1"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let watch = tokio::task::spawn_blocking({
        let (url, token) = (node.url(""), token.clone());
        move || {
            Command::new(env!("CARGO_BIN_EXE_finmesh"))
                .args(["pipeline", "status", "n1", "--watch", "--interval-ms", "100"])
                .env("FINMESH_SERVER", url)
                .env("FINMESH_TOKEN", token)
                .output()
                .expect("run the CLI")
        }
    });
    let out = tokio::time::timeout(Duration::from_secs(60), watch).await.expect("watch ends").unwrap();
    assert_eq!(out.status.code(), Some(1), "{}", String::from_utf8_lossy(&out.stderr));
    let text = String::from_utf8(out.stdout).unwrap();
    assert!(text.contains("slice s: 0 of 1 expected files arrived (none)"), "{text}");
}

#[test]
fn config_check_names_reconcile_problems() {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("finmesh.toml");
    std::fs::write(&config, "[reconcile]\npipelines = [\"risk\", \"bad name\", \"risk\"]\nbatch = 0\n").unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_finmesh"))
        .args(["config", "check", "--config"])
        .arg(&config)
        .env_remove("FINMESH_CONFIG")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    for needle in ["reconcile.pipelines[1]", "reconcile.pipelines[2]: `risk` is listed twice", "reconcile.batch"] {
        assert!(err.contains(needle), "{needle} in {err}");
    }
}
