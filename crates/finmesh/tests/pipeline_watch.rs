//! Watched directories and Redis reference data through the binary:
//! `pipeline run` with a `[watch]` section and `[refdata] redis` takes a
//! dropped file once and runs it to a complete run with reference data
//! loaded into Redis by `refdata load`; `pipeline watch` keeps its claims
//! across a restart.

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::Duration;

use serde_json::Value;

const VERSION: &str = "2026-12-01T00:00:00Z";
const UNTIL: Duration = Duration::from_secs(120);

fn examples() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../examples/pipeline")
}

fn finmesh(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_finmesh"))
        .args(args)
        .env_remove("FINMESH_CONFIG")
        .env_remove("FINMESH_SERVER")
        .env_remove("FINMESH_TOKEN")
        .env_remove("FINMESH_REFDATA_REDIS")
        .output()
        .unwrap()
}

fn ok(out: Output, what: &str) -> String {
    assert!(out.status.success(), "{what}: {}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8(out.stdout).unwrap()
}

/// `pipeline.toml` in `dir`: the example's, plus `extra` TOML.
fn config(dir: &Path, extra: &str) -> PathBuf {
    let example = std::fs::read_to_string(examples().join("pipeline.toml")).unwrap();
    let abs = |f: &str| examples().join(f).display().to_string();
    let text = example
        .replace("\"risk.avsc\"", &format!("{:?}", abs("risk.avsc")))
        .replace("\"rules.txt\"", &format!("{:?}", abs("rules.txt")))
        .replace("[refdata]\n", &format!("[refdata]\n{extra_refdata}", extra_refdata = extra_refdata(extra)));
    let path = dir.join("pipeline.toml");
    std::fs::write(&path, format!("{text}\n{}", extra_tables(extra))).unwrap();
    path
}

/// Lines of `extra` before its first table go into `[refdata]`.
fn extra_refdata(extra: &str) -> String {
    extra.lines().take_while(|l| !l.starts_with('[')).map(|l| format!("{l}\n")).collect()
}

fn extra_tables(extra: &str) -> String {
    extra.lines().skip_while(|l| !l.starts_with('[')).map(|l| format!("{l}\n")).collect()
}

fn generate(path: &Path, rows: u64, seed: u64) -> Value {
    let out = finmesh(&[
        "pipeline",
        "gen",
        "--rows",
        &rows.to_string(),
        "--bad-share",
        "0.05",
        "--rule-fail-share",
        "0.02",
        "--seed",
        &seed.to_string(),
        "--json",
        "--out",
        path.to_str().unwrap(),
    ]);
    assert!(out.status.success());
    serde_json::from_slice(&out.stderr).unwrap()
}

/// Writes under `.part`, then renames: the producer's side of the convention.
fn drop_into(dir: &Path, name: &str, from: &Path) {
    let part = dir.join(format!("{name}.part"));
    std::fs::copy(from, &part).unwrap();
    std::fs::rename(&part, dir.join(name)).unwrap();
}

/// Waits (through the suite's shared poll) until `cond` holds.
async fn until(what: &str, cond: impl Fn() -> bool) {
    finmesh_core::testsuite::support::eventually(what, UNTIL, || std::future::ready(cond())).await
}

/// A running `finmesh` process, killed when dropped.
struct Proc(Child);

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

impl Proc {
    /// SIGTERM, then the exit status.
    fn stop(mut self) -> std::process::ExitStatus {
        let pid = self.0.id().to_string();
        assert!(Command::new("kill").args(["-TERM", &pid]).status().unwrap().success());
        self.0.wait().unwrap()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_watched_directory_runs_to_complete_with_reference_data_in_redis() {
    let redis = finmesh_testkit::RedisServer::start().await.expect("start redis-server");
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let incoming = dir.path().join("incoming");
    std::fs::create_dir(&incoming).unwrap();
    let config = config(
        dir.path(),
        &format!(
            "redis = {:?}\n[watch]\ndir = \"incoming\"\nrun = \"eod\"\nslice = \"rates\"\nrefdata = \"{VERSION}\"\n\
             poll_ms = 50\nsettle_ms = 200\n",
            redis.url()
        ),
    );
    let load = |dataset: &str, how: &[&str]| {
        let file = examples().join(format!("{dataset}.csv"));
        let args = [&["refdata", "load", dataset, file.to_str().unwrap(), "--as-of", VERSION][..], how].concat();
        let out = ok(finmesh(&args), "refdata load");
        assert!(out.contains(&format!("dataset `{dataset}` version {VERSION}:")), "{out}");
    };
    // Through the config's `[refdata] redis`; books comes later.
    load("currencies", &["--config", config.to_str().unwrap()]);

    let mut child = Command::new(env!("CARGO_BIN_EXE_finmesh"))
        .args(["pipeline", "run", "--listen", "127.0.0.1:0", "--config"])
        .arg(&config)
        .arg("--data-dir")
        .arg(&data)
        .env_remove("FINMESH_CONFIG")
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("start finmesh pipeline run");
    let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
    let node = Proc(child);
    let url = loop {
        let line = lines.next().expect("pipeline run exited before listening").unwrap();
        if let Some(url) = line.strip_prefix("listening on ") {
            break url.to_owned();
        }
    };
    std::thread::spawn(move || lines.for_each(drop));
    let token = std::fs::read_to_string(data.join("admin-token")).unwrap().trim_end().to_owned();
    let cli = |args: &[&str]| {
        Command::new(env!("CARGO_BIN_EXE_finmesh"))
            .args(args)
            .env("FINMESH_SERVER", &url)
            .env("FINMESH_TOKEN", &token)
            .output()
            .unwrap()
    };
    ok(cli(&["pipeline", "open-run", "eod", "--slice", "rates=feed_csv", "--window-s", "3600"]), "open-run");

    let feed = dir.path().join("feed.csv");
    let summary = generate(&feed, 2000, fastrand::u64(..));
    assert_eq!(summary["rows"].as_u64(), Some(2000));
    drop_into(&incoming, "feed.csv", &feed);
    until("the file to be taken and moved to done/", || incoming.join("done/feed.csv").is_file()).await;

    // The run waits for its version of `books`, which is not in Redis yet.
    let status: Value =
        serde_json::from_str(ok(cli(&["pipeline", "status", "eod", "--json"]), "status").trim()).unwrap();
    assert_ne!(status["state"], "complete", "{status}");
    load("books", &["--redis", &redis.url()]);

    let out = ok(cli(&["pipeline", "status", "eod", "--watch", "--interval-ms", "100"]), "status --watch");
    assert!(out.starts_with("run eod (pipeline risk): complete"), "{out}");
    let status: Value =
        serde_json::from_str(ok(cli(&["pipeline", "status", "eod", "--json"]), "status").trim()).unwrap();
    assert_eq!(status["state"], "complete", "{status}");

    // The same name again, with other rows: refused, with the reason.
    let again = dir.path().join("again.csv");
    generate(&again, 50, fastrand::u64(..));
    drop_into(&incoming, "feed.csv", &again);
    let reason = incoming.join("failed/feed.csv.reason");
    until("the second feed.csv to be refused", || reason.is_file()).await;
    let text = std::fs::read_to_string(&reason).unwrap();
    assert!(text.contains("file id `feed_csv` was already taken"), "{text}");
    drop(node);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pipeline_watch_keeps_its_claims_across_a_restart() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let incoming = dir.path().join("incoming");
    std::fs::create_dir(&incoming).unwrap();
    let config = examples().join("pipeline.toml");
    let start = || {
        let child = Command::new(env!("CARGO_BIN_EXE_finmesh"))
            .args(["pipeline", "watch"])
            .arg(&incoming)
            .args(["--run", "r1", "--slice", "s1", "--poll-ms", "50", "--settle-ms", "100", "--config"])
            .arg(&config)
            .arg("--data-dir")
            .arg(&data)
            .env_remove("FINMESH_CONFIG")
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("start finmesh pipeline watch");
        Proc(child)
    };

    let feed = dir.path().join("feed.csv");
    generate(&feed, 300, fastrand::u64(..));
    let watcher = start();
    drop_into(&incoming, "a.csv", &feed);
    until("a.csv to be ingested", || incoming.join("done/a.csv").is_file()).await;
    assert!(watcher.stop().success(), "pipeline watch stops cleanly on SIGTERM");

    // Restarted: the claim of a.csv is still there, so a new a.csv is
    // refused, and a new name is ingested.
    let watcher = start();
    let other = dir.path().join("other.csv");
    generate(&other, 40, fastrand::u64(..));
    drop_into(&incoming, "a.csv", &other);
    drop_into(&incoming, "b.csv", &other);
    until("b.csv to be ingested", || incoming.join("done/b.csv").is_file()).await;
    until("the new a.csv to be refused", || incoming.join("failed/a.csv.reason").is_file()).await;
    assert!(watcher.stop().success());

    let bad = finmesh(&[
        "pipeline",
        "watch",
        incoming.to_str().unwrap(),
        "--run",
        "a b",
        "--slice",
        "s",
        "--config",
        config.to_str().unwrap(),
    ]);
    assert!(!bad.status.success());
    let err = String::from_utf8_lossy(&bad.stderr);
    assert!(err.contains("watch.run:") && err.contains("run `a b` has ' '"), "{err}");
}
