//! The pipeline commands as real processes, as the walk-through of
//! docs/pipeline.md runs them: `refdata load` into the data directory,
//! `pipeline run` (a node with every stage), `pipeline ingest` of a
//! generated feed (summary, then a duplicate-free re-upload), the stages
//! draining it exactly, and `pipeline rules apply` (a bad file refused with
//! its caret, a good one stored).

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::Duration;

use serde_json::Value;

const VERSION: &str = "2026-12-01T00:00:00Z";

fn examples() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../examples/pipeline")
}

fn finmesh(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_finmesh"))
        .args(args)
        .env_remove("FINMESH_CONFIG")
        .env_remove("FINMESH_SERVER")
        .env_remove("FINMESH_TOKEN")
        .output()
        .unwrap()
}

fn ok(out: Output, what: &str) -> String {
    assert!(out.status.success(), "{what}: {}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8(out.stdout).unwrap()
}

/// `finmesh pipeline run` on a free port.
struct Node {
    child: Child,
    url: String,
    token: String,
}

impl Node {
    fn start(data_dir: &Path) -> Node {
        let config = examples().join("pipeline.toml");
        let mut child = Command::new(env!("CARGO_BIN_EXE_finmesh"))
            .args(["pipeline", "run", "--listen", "127.0.0.1:0", "--config"])
            .arg(&config)
            .arg("--data-dir")
            .arg(data_dir)
            .env_remove("FINMESH_CONFIG")
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("start finmesh pipeline run");
        let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
        let url = loop {
            let line = lines.next().expect("pipeline run exited before listening").unwrap();
            if let Some(url) = line.strip_prefix("listening on ") {
                break url.to_owned();
            }
        };
        std::thread::spawn(move || lines.for_each(drop));
        let token = std::fs::read_to_string(data_dir.join("admin-token")).unwrap().trim_end().to_owned();
        Node { child, url, token }
    }

    /// The CLI against this node, not started.
    fn command(&self, args: &[&str]) -> Command {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_finmesh"));
        cmd.args(args).env("FINMESH_SERVER", &self.url).env("FINMESH_TOKEN", &self.token);
        cmd
    }

    fn cli(&self, args: &[&str]) -> Output {
        self.command(args).output().unwrap()
    }

    async fn messages(&self, stream: &str) -> u64 {
        let info: Value = reqwest::Client::new()
            .get(format!("{}/v1/streams/{stream}", self.url))
            .bearer_auth(&self.token)
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        info["state"]["messages"].as_u64().unwrap_or_else(|| panic!("{info}"))
    }
}

impl Drop for Node {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_walk_through_runs_a_feed_to_validated_and_exceptions() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let feed = dir.path().join("feed.csv");
    let generated = finmesh(&[
        "pipeline",
        "gen",
        "--rows",
        "3000",
        "--bad-share",
        "0.05",
        "--rule-fail-share",
        "0.02",
        "--json",
        "--out",
        feed.to_str().unwrap(),
    ]);
    assert!(generated.status.success());
    let summary: Value = serde_json::from_slice(&generated.stderr).unwrap();
    let (rows, good, bad) =
        (summary["rows"].as_u64().unwrap(), summary["good"].as_u64().unwrap(), summary["bad"].as_u64().unwrap());

    for dataset in ["currencies", "books"] {
        let file = examples().join(format!("{dataset}.csv"));
        let out = ok(
            finmesh(&[
                "refdata",
                "load",
                dataset,
                file.to_str().unwrap(),
                "--as-of",
                VERSION,
                "--data-dir",
                data.to_str().unwrap(),
            ]),
            "refdata load",
        );
        assert!(out.contains(&format!("dataset `{dataset}` version {VERSION}:")), "{out}");
    }

    let node = Node::start(&data);
    // The run is declared first: one slice of one file, a window far away.
    ok(node.cli(&["pipeline", "open-run", "eod", "--slice", "rates=1", "--window-s", "3600"]), "open-run");
    let ingest =
        ["pipeline", "ingest", feed.to_str().unwrap(), "--run", "eod", "--slice", "rates", "--refdata", VERSION];
    let out = ok(node.cli(&[&ingest[..], &["--json"]].concat()), "ingest");
    let s: Value = serde_json::from_str(out.trim()).unwrap();
    assert_eq!((s["rows"].as_u64(), s["exceptions"].as_u64()), (Some(rows), Some(bad)), "{s}");
    assert_eq!(s["file"], "feed_csv", "the file id defaults to the sanitised name");
    assert_eq!(s["status"], "completed");

    let out = ok(node.cli(&ingest), "ingest again");
    assert!(out.contains(&format!("already ingested: all {rows} rows were duplicates")), "{out}");

    // `pipeline run` reconciles its pipeline's runs: the run completes, with
    // the file's rows counted exactly once at every stage (the re-upload
    // above changed nothing).
    // `status --watch` returns once the run ends (complete or failed).
    let mut watch = node.command(&["pipeline", "status", "eod", "--watch", "--interval-ms", "100"]);
    let watched = tokio::time::timeout(Duration::from_secs(120), tokio::task::spawn_blocking(move || watch.output()))
        .await
        .expect("the run ended within 120 s")
        .unwrap()
        .unwrap();
    let out = ok(watched, "status --watch");
    assert!(out.starts_with("run eod (pipeline risk): complete"), "{out}");
    let out = ok(node.cli(&["pipeline", "status", "eod", "--json"]), "status --json");
    let status: Value = serde_json::from_str(out.trim()).unwrap();
    assert_eq!(status["state"], "complete", "{status}");
    let f = &status["slices"]["rates"]["files"]["feed_csv"];
    assert_eq!(f["validated"]["actual"].as_u64(), Some(rows), "{f}");
    assert_eq!(f["valid_records"].as_u64(), Some(good), "{f}");
    // An exception is one message; validated records travel many per message.
    assert_eq!(node.messages("risk-exceptions").await, rows - good);
    let v = node.messages("risk-validated").await;
    assert!(v > 0 && v * 100 <= good, "{v} validated messages for {good} records");

    // Rules: a bad file is refused with its caret; a good one is stored.
    let bad_rules = dir.path().join("bad.txt");
    std::fs::write(&bad_rules, "rule r: notionl > 0\n").unwrap();
    let config = examples().join("pipeline.toml");
    let out =
        node.cli(&["pipeline", "rules", "apply", bad_rules.to_str().unwrap(), "--config", config.to_str().unwrap()]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("unknown field `notionl`") && err.contains('^'), "{err}");
    let rules = examples().join("rules.txt");
    let out = ok(
        node.cli(&["pipeline", "rules", "apply", rules.to_str().unwrap(), "--config", config.to_str().unwrap()]),
        "rules apply",
    );
    assert!(out.contains("rules of pipeline `risk` stored"), "{out}");
}

#[test]
fn ingest_refuses_bad_ids_before_sending_anything() {
    let out =
        finmesh(&["pipeline", "ingest", "x.csv", "--run", "a b", "--slice", "s", "--server", "http://127.0.0.1:9"]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("run id `a b`"), "{err}");
}
