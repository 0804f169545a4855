//! Exact under crashes, with real processes on NATS: the stages run as
//! `finmesh pipeline worker` processes and the reconciler in a `finmesh
//! serve` node with `[reconcile] pipelines = ["risk"]`, all on one test-kit
//! nats-server, while a generated file flows in through another node.
//!
//! - [`sigkilled_workers_and_reconciler_leave_the_run_exact`]: each stage's
//!   first worker aborts itself between a publish and its ack (the
//!   `FINMESH_TEST_CRASH_BEFORE_ACK` hook of `stages.rs`), then workers and
//!   the reconciler node are SIGKILLed at random points and started again;
//!   the run completes with every count equal to the file, and `validated`
//!   and `exceptions` hold each row once (counted from their rows headers).
//! - [`three_validate_worker_processes_share_a_consumer_and_one_is_sigkilled`]:
//!   scale-out: three validate processes on one consumer, one SIGKILLed
//!   mid-run; the survivors finish it, exactly.
//!
//! Randomness comes from one seed, printed first (`FINMESH_CRASH_SEED=S`
//! repeats a run). The default is sized for CI (a debug build on a loaded
//! 2-core machine); `FINMESH_CRASH_FULL=1` runs the 200k-row file with more
//! kills (docs/testing.md). Workers need an engine they can share with the
//! node: NATS. The embedded engine's data directory belongs to one process,
//! so on it the stages are killed as tasks instead
//! (crates/finmesh-pipeline/tests/stages_end_to_end.rs).

mod support;

use std::collections::HashSet;
use std::io::Read;
use std::os::unix::process::{CommandExt, ExitStatusExt};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use finmesh_core::{ReadRequest, Seq, StreamName};
use finmesh_pipeline::flow::{HDR_FILE, message_rows};
use finmesh_pipeline::stages::CRASH_BEFORE_ACK_ENV;
use serde_json::Value;
use support::{Engine, Node, NodeSpec, until};

/// The reference-data version the run pins.
const VERSION: &str = "2026-12-01T00:00:00Z";
const RUN: &str = "crash";
const FILE: &str = "feed";
/// Rows per record message of the upload: small, so a stage takes many
/// steps (of `[stages] batch` messages) to do the file.
const ROWS_PER_MESSAGE: usize = 50;
/// Rows per record message of the scale-out test: smaller still, so three
/// validators share hundreds of steps and the victim dies with work left
/// (with 50 rows, 4,000 rows were validated within the kill's random delay
/// once, on a fast disk).
const SCALE_OUT_ROWS_PER_MESSAGE: usize = 10;

fn examples() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../examples/pipeline")
}

/// How big a run is: CI default or `FINMESH_CRASH_FULL`.
struct Plan {
    seed: u64,
    rows: u64,
    /// Random SIGKILLs after the two injected crashes.
    kills: usize,
    /// How long the run may take to complete after the last kill.
    settle: Duration,
    /// How long a kill may wait for its random point.
    step: Duration,
}

impl Plan {
    /// The plan of `test`, with `1/share` of the rows.
    fn from_env(test: &str, share: u64) -> Plan {
        let seed = match std::env::var("FINMESH_CRASH_SEED") {
            Ok(s) => s.parse().expect("FINMESH_CRASH_SEED is a u64"),
            Err(_) => fastrand::u64(..),
        };
        let full = std::env::var("FINMESH_CRASH_FULL").is_ok_and(|v| !v.is_empty() && v != "0");
        let mut plan = if full {
            // Under the soak profile: a debug reconciler on a loaded machine
            // counts a few hundred rows a second.
            let hour = Duration::from_secs(3600);
            Plan { seed, rows: 200_000, kills: 10, settle: hour, step: hour }
        } else {
            Plan { seed, rows: 8_000, kills: 3, settle: Duration::from_secs(120), step: Duration::from_secs(120) }
        };
        if let Ok(rows) = std::env::var("FINMESH_CRASH_ROWS") {
            plan.rows = rows.parse().expect("FINMESH_CRASH_ROWS is a row count");
        }
        plan.rows /= share;
        eprintln!("{test}: seed {seed}, {} rows (FINMESH_CRASH_SEED={seed} repeats it)", plan.rows);
        plan
    }
}

/// A `finmesh pipeline worker` process, its standard error kept.
struct Worker {
    stage: &'static str,
    child: Child,
    stderr: Arc<Mutex<String>>,
    /// The thread copying standard error: it ends at the process's end.
    reader: Option<std::thread::JoinHandle<()>>,
}

impl Worker {
    fn start(h: &Harness, stage: &'static str, crash_before_ack: Option<u64>) -> Worker {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_finmesh"));
        cmd.args(["pipeline", "worker", "--stage", stage, "--config"])
            .arg(&h.config)
            .args(["--engine", "nats", "--nats-servers", &h.nats.url()])
            .arg("--data-dir")
            .arg(h.dir.path().join("worker-data"))
            .env_remove("FINMESH_CONFIG")
            .env_remove(CRASH_BEFORE_ACK_ENV)
            .env("FINMESH_LOG", "warn,finmesh_pipeline::stages=debug")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped());
        if let Some(n) = crash_before_ack {
            cmd.env(CRASH_BEFORE_ACK_ENV, n.to_string());
        }
        // SAFETY: setrlimit(2) only, between fork and exec: no core file from
        // the injected abort.
        unsafe {
            cmd.pre_exec(|| {
                let none = libc::rlimit { rlim_cur: 0, rlim_max: 0 };
                libc::setrlimit(libc::RLIMIT_CORE, &none);
                Ok(())
            });
        }
        let mut child = cmd.spawn().expect("start finmesh pipeline worker");
        let stderr = Arc::new(Mutex::new(String::new()));
        let mut err = child.stderr.take().expect("stderr");
        let keep = stderr.clone();
        let reader = std::thread::spawn(move || {
            let mut buf = [0u8; 8192];
            while let Ok(n) = err.read(&mut buf) {
                if n == 0 {
                    break;
                }
                keep.lock().unwrap().push_str(&String::from_utf8_lossy(&buf[..n]));
            }
        });
        Worker { stage, child, stderr, reader: Some(reader) }
    }

    fn stderr(&self) -> String {
        self.stderr.lock().unwrap().clone()
    }

    /// Batches this process acked (its debug log).
    fn batches_acked(&self) -> usize {
        self.stderr.lock().unwrap().matches("batch acked").count()
    }

    /// Running, with its stage started.
    async fn until_running(&mut self) {
        let what = format!("the {} worker to start", self.stage);
        until(support::WAIT, &what, || {
            let exited = self.child.try_wait().expect("try_wait");
            assert!(exited.is_none(), "the {} worker exited: {exited:?}\n{}", self.stage, self.stderr());
            let up = self.stderr().contains("running; Ctrl-C stops them");
            async move { up }
        })
        .await;
    }

    /// SIGKILL, then reap.
    fn kill(&mut self) {
        // SAFETY: kill(2) on our own, not yet reaped child.
        assert_eq!(unsafe { libc::kill(self.child.id() as libc::pid_t, libc::SIGKILL) }, 0);
        let status = self.child.wait().expect("wait");
        assert_eq!(status.signal(), Some(libc::SIGKILL), "{}", self.stderr());
    }

    /// Waits for the injected crash: the process aborted after publishing
    /// a batch and before acking it.
    async fn until_crashed_before_ack(mut self) {
        let what = format!("the {} worker to abort between a publish and its ack", self.stage);
        let mut status = None;
        until(support::WAIT, &what, || {
            status = self.child.try_wait().expect("try_wait");
            let done = status.is_some();
            async move { done }
        })
        .await;
        // Everything it wrote, up to its end.
        self.reader.take().expect("one reader").join().expect("the stderr reader");
        let err = self.stderr();
        assert_eq!(status.unwrap().signal(), Some(libc::SIGABRT), "{err}");
        assert!(err.contains("aborts after publishing batch"), "{err}");
    }
}

impl Drop for Worker {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The NATS server, the files, the ingest node, and a reader of the streams.
struct Harness {
    nats: finmesh_testkit::NatsServer,
    dir: tempfile::TempDir,
    config: PathBuf,
    feed: PathBuf,
    /// `pipeline gen --json`'s summary.
    gen_summary: Value,
    engine: Arc<dyn finmesh_core::Engine>,
}

impl Harness {
    async fn start(plan: &Plan) -> Harness {
        let nats = finmesh_testkit::NatsServer::start().await.expect("start nats-server");
        let dir = tempfile::tempdir().unwrap();
        let config = dir.path().join("pipeline.toml");
        let ex = examples();
        std::fs::write(
            &config,
            format!(
                "[pipeline]\nname = \"risk\"\nschema = {:?}\nrules = {:?}\n\
                 [pipeline.streams]\nduplicate_window = 600\nmax_age = 86400\n\
                 [stages]\nbatch = 4\nfetch_wait_ms = 200\nack_wait_ms = 2000\npin_wait_ms = 1000\n\
                 [refdata]\ndatasets = {{ currencies = \"string\", books = \"string\" }}\n\
                 [[enrich.lookup]]\ndataset = \"books\"\nfield = \"book\"\n",
                ex.join("risk.avsc"),
                ex.join("rules.txt"),
            ),
        )
        .unwrap();
        let feed = dir.path().join("feed.csv");
        let out = cli(&[
            "pipeline",
            "gen",
            "--rows",
            &plan.rows.to_string(),
            "--seed",
            &plan.seed.to_string(),
            "--bad-share",
            "0.02",
            "--rule-fail-share",
            "0.02",
            "--json",
            "--out",
            feed.to_str().unwrap(),
        ]);
        assert!(out.status.success(), "gen: {}", String::from_utf8_lossy(&out.stderr));
        let gen_summary: Value = serde_json::from_slice(&out.stderr).unwrap();
        for dataset in ["currencies", "books"] {
            let file = ex.join(format!("{dataset}.csv"));
            let out = cli(&[
                "refdata",
                "load",
                dataset,
                file.to_str().unwrap(),
                "--as-of",
                VERSION,
                "--engine",
                "nats",
                "--nats-servers",
                &nats.url(),
            ]);
            assert!(out.status.success(), "refdata load: {}", String::from_utf8_lossy(&out.stderr));
        }
        let options = finmesh_nats::NatsEngineOptions::new(nats.url());
        let engine = Arc::new(finmesh_nats::NatsEngine::connect(options).await.expect("connect"));
        Harness { nats, dir, config, feed, gen_summary, engine }
    }

    fn count(&self, key: &str) -> u64 {
        self.gen_summary[key].as_u64().unwrap_or_else(|| panic!("{key} in {}", self.gen_summary))
    }

    /// A `finmesh serve` on this NATS server, with `toml` as its configuration.
    fn node_spec(&self, name: &str, toml: &str) -> NodeSpec {
        let dir = self.dir.path().join(name);
        std::fs::create_dir_all(&dir).unwrap();
        NodeSpec::new(&dir, toml, &Engine::Nats(self.nats.url().to_owned()))
    }

    /// Uploads the feed through `node` (a thread: the CLI blocks).
    fn ingest(
        &self,
        node: &Node,
        token: &str,
        rows_per_message: usize,
    ) -> tokio::task::JoinHandle<std::process::Output> {
        let (url, token, feed) = (node.url(""), token.to_owned(), self.feed.clone());
        tokio::task::spawn_blocking(move || {
            Command::new(env!("CARGO_BIN_EXE_finmesh"))
                .args(["pipeline", "ingest"])
                .arg(&feed)
                .args(["--run", RUN, "--slice", "s", "--file-id", FILE, "--refdata", VERSION, "--json"])
                // Small messages, so each stage takes many steps to do the file.
                .args(["--rows-per-message", &rows_per_message.to_string()])
                .env("FINMESH_SERVER", url)
                .env("FINMESH_TOKEN", token)
                .env_remove("FINMESH_CONFIG")
                .output()
                .expect("run finmesh pipeline ingest")
        })
    }

    /// Messages (not rows) stored in `stream` (0 while it is missing).
    async fn stored(&self, stream: &str) -> u64 {
        let stream = StreamName::new(stream).unwrap();
        self.engine.stream_info(&stream).await.map(|i| i.state.messages).unwrap_or(0)
    }

    /// What each stream holds, and what the reconciler counted: for the log.
    async fn progress(&self, node: &Node, token: &str) -> String {
        format!(
            "messages: raw {}, enriched {}, validated {}, exceptions {}; reconciled {} of {} rows",
            self.stored("risk-raw").await,
            self.stored("risk-enriched").await,
            self.stored("risk-validated").await,
            self.stored("risk-exceptions").await,
            reconciled(node, token).await,
            self.count("rows"),
        )
    }

    /// Whether every row of the file has passed `stage`: its outputs cover
    /// the file.
    async fn done(&self, stage: &str) -> bool {
        let (rows, bad) = (self.count("rows"), self.count("bad"));
        let distinct = |ids: Vec<String>| ids.into_iter().collect::<HashSet<_>>().len() as u64;
        if stage == "enrich" {
            distinct(self.ids("risk-enriched").await) >= rows - bad
        } else {
            let (v, e) = (self.ids("risk-validated").await, self.ids("risk-exceptions").await);
            distinct(v) + distinct(e) >= rows
        }
    }

    /// The rows of the feed in `stream` as `F:row`, in stream order (a row
    /// stored twice is listed twice); panics on a message id stored twice.
    async fn ids(&self, stream: &str) -> Vec<String> {
        let stream = StreamName::new(stream).unwrap();
        let (mut ids, mut messages) = (Vec::new(), HashSet::new());
        let mut next = Seq(1);
        loop {
            let batch = self.engine.read(&stream, ReadRequest::from_seq(next, 5_000)).await.unwrap();
            let Some(last) = batch.last() else { return ids };
            next = Seq(last.seq.0 + 1);
            for m in batch.iter().filter(|m| m.headers.get(HDR_FILE) == Some(FILE)) {
                let id = m.headers.get(finmesh_core::message::MSG_ID_HEADER).expect("an id").to_owned();
                assert!(messages.insert(id.clone()), "message {id} stored twice in {stream}");
                ids.extend(message_rows(&m.headers).expect("a row header").iter().map(|r| format!("{FILE}:{r}")));
            }
        }
    }

    /// Waits for the run to complete (printing the last state seen when it
    /// does not), then checks every count against the file and scans
    /// `validated` and `exceptions` for duplicates.
    async fn assert_exact(&self, node: &Node, token: &str, within: Duration) {
        let deadline = tokio::time::Instant::now() + within;
        let last = loop {
            let v = run_status(node, token).await;
            assert_ne!(v["state"], "failed", "{v:#}");
            if v["state"] == "complete" {
                break v;
            }
            assert!(tokio::time::Instant::now() < deadline, "the run did not complete within {within:?}: {v:#}");
            tokio::time::sleep(Duration::from_millis(50)).await;
        };
        let (rows, good, bad, rule_fails) =
            (self.count("rows"), self.count("good"), self.count("bad"), self.count("rule_fails"));
        let f = &last["slices"]["s"]["files"][FILE];
        let records = rows - bad;
        let counts = |stage: &str| (f[stage]["expected"].as_u64(), f[stage]["actual"].as_u64());
        assert_eq!(counts("raw"), (Some(records), Some(records)), "{f:#}");
        assert_eq!(counts("enriched"), (Some(records), Some(records)), "{f:#}");
        assert_eq!(counts("validated"), (Some(rows), Some(rows)), "{f:#}");
        assert_eq!(f["valid_records"].as_u64(), Some(good), "{f:#}");
        let exc = &f["exceptions"];
        assert_eq!(
            (exc["ingest"].as_u64(), exc["enrich"].as_u64(), exc["validate"].as_u64()),
            (Some(bad), Some(0), Some(rule_fails)),
            "{f:#}"
        );

        // What the streams really hold: each id once, every row in exactly one.
        let validated = self.ids("risk-validated").await;
        let exceptions = self.ids("risk-exceptions").await;
        let v: HashSet<&String> = validated.iter().collect();
        let e: HashSet<&String> = exceptions.iter().collect();
        assert_eq!(v.len(), validated.len(), "a duplicate record in validated");
        assert_eq!(e.len(), exceptions.len(), "a duplicate record in exceptions");
        assert_eq!(validated.len() as u64, good);
        assert!(v.is_disjoint(&e), "a row both validated and excepted");
        let want: HashSet<String> = (1..=rows).map(|r| format!("{FILE}:{r}")).collect();
        let got: HashSet<String> = validated.into_iter().chain(exceptions).collect();
        assert_eq!(got, want, "validated + exceptions = the file's rows");
    }
}

fn cli(args: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_finmesh"))
        .args(args)
        .env_remove("FINMESH_CONFIG")
        .env_remove("FINMESH_SERVER")
        .env_remove("FINMESH_TOKEN")
        .output()
        .expect("run the CLI")
}

fn node_cli(node: &Node, token: &str, args: &[&str]) -> std::process::Output {
    let out = Command::new(env!("CARGO_BIN_EXE_finmesh"))
        .args(args)
        .env("FINMESH_SERVER", node.url(""))
        .env("FINMESH_TOKEN", token)
        .env_remove("FINMESH_CONFIG")
        .output()
        .expect("run the CLI");
    assert!(out.status.success(), "{args:?}: {}", String::from_utf8_lossy(&out.stderr));
    out
}

/// The reconciler's node: fast redelivery after a kill, and one message
/// per consumer per round. Record messages carry many rows, so the stages
/// run well ahead of a reconciler that takes one message at a time (most
/// of its messages are the exceptions, one per row): it is still counting
/// when its kill comes, as the test wants.
const RECONCILER_TOML: &str = "[reconcile]\npipelines = [\"risk\"]\nbatch = 1\nack_wait_ms = 2000\n";

/// The run's status document (`null` while the node cannot answer).
async fn run_status(node: &Node, token: &str) -> Value {
    let url = node.url(&format!("/v1/pipelines/runs/{RUN}"));
    let Ok(res) = support::http().get(url).bearer_auth(token).send().await else { return Value::Null };
    res.json().await.unwrap_or_default()
}

/// Rows the run status counts at the end of the pipeline so far.
async fn reconciled(node: &Node, token: &str) -> u64 {
    run_status(node, token).await["slices"]["s"]["files"][FILE]["validated"]["actual"].as_u64().unwrap_or(0)
}

#[derive(Debug, Clone, Copy, PartialEq)]
enum Victim {
    Enrich,
    Validate,
    Reconciler,
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkilled_workers_and_reconciler_leave_the_run_exact() {
    let plan = Plan::from_env("sigkilled_workers_and_reconciler_leave_the_run_exact", 1);
    let mut rng = fastrand::Rng::with_seed(plan.seed);
    let started = std::time::Instant::now();
    let h = Harness::start(&plan).await;

    // Each stage's first worker aborts itself between a publish and its ack
    // (after a random number of batches); it defines the pipeline first.
    let mut enrich = Worker::start(&h, "enrich", Some(rng.u64(1..=3)));
    enrich.until_running().await;
    let mut validate = Worker::start(&h, "validate", Some(rng.u64(1..=3)));
    validate.until_running().await;
    let ingest_spec = h.node_spec("ingest", "");
    let node = ingest_spec.start("127.0.0.1:0");
    let token = ingest_spec.admin_token();
    let recon_spec = h.node_spec("reconciler", RECONCILER_TOML);
    let mut reconciler = recon_spec.start("127.0.0.1:0");
    node_cli(&node, &token, &["pipeline", "open-run", RUN, "--slice", &format!("s={FILE}"), "--window-s", "3600"]);
    let upload = h.ingest(&node, &token, ROWS_PER_MESSAGE);

    enrich.until_crashed_before_ack().await;
    let mut enrich = Worker::start(&h, "enrich", None);
    validate.until_crashed_before_ack().await;
    let mut validate = Worker::start(&h, "validate", None);

    // Random kills: the reconciler and a stage worker at least once each,
    // then any process.
    let mut victims = vec![Victim::Reconciler, [Victim::Enrich, Victim::Validate][rng.usize(..2)]];
    victims.extend((2..plan.kills).map(|_| [Victim::Enrich, Victim::Validate, Victim::Reconciler][rng.usize(..3)]));
    rng.shuffle(&mut victims);
    let mut killed_mid_run = 0;
    for victim in victims {
        eprintln!("{:?}: {victim:?} next; {}", started.elapsed(), h.progress(&node, &token).await);
        match victim {
            Victim::Enrich | Victim::Validate => {
                let (w, name) = match victim {
                    Victim::Enrich => (&mut enrich, "enrich"),
                    _ => (&mut validate, "validate"),
                };
                let batches = rng.usize(1..=3);
                let hh = &h;
                until(plan.step, "the victim to ack some batches, or its stage to be done", || {
                    let acked = w.batches_acked() >= batches;
                    async move { acked || hh.done(name).await }
                })
                .await;
                tokio::time::sleep(Duration::from_millis(rng.u64(0..300))).await;
                let mid_run = !h.done(name).await;
                w.kill();
                *w = Worker::start(&h, name, None);
                killed_mid_run += usize::from(mid_run);
                eprintln!("SIGKILLed the {name} worker ({})", if mid_run { "mid-run" } else { "its stage was done" });
            }
            Victim::Reconciler => {
                // A random mark a little ahead of what is counted (never
                // beyond half of what is left).
                let counted = reconciled(&node, &token).await;
                let ahead = (plan.rows / (2 * plan.kills as u64)).min(plan.rows.saturating_sub(counted) / 2);
                let mark = counted + rng.u64(1..=ahead.max(1));
                let deadline = tokio::time::Instant::now() + plan.step;
                while reconciled(&node, &token).await < mark {
                    let at = h.progress(&node, &token).await;
                    assert!(tokio::time::Instant::now() < deadline, "the reconciler did not count {mark} rows: {at}");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
                tokio::time::sleep(Duration::from_millis(rng.u64(0..300))).await;
                let counted = reconciled(&node, &token).await;
                reconciler.stop(libc::SIGKILL);
                reconciler = recon_spec.start("127.0.0.1:0");
                eprintln!("SIGKILLed the reconciler's node at {counted} of {} rows counted", plan.rows);
                assert!(counted < plan.rows, "the reconciler was killed during reconciliation");
            }
        }
    }
    let out = upload.await.unwrap();
    assert!(out.status.success(), "ingest: {}", String::from_utf8_lossy(&out.stderr));
    let summary: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(summary["rows"].as_u64(), Some(h.count("rows")), "{summary}");
    eprintln!("{:?}: ingest done; {}", started.elapsed(), h.progress(&node, &token).await);
    h.assert_exact(&node, &token, plan.settle).await;
    eprintln!(
        "{:?}: exact after 2 injected crashes and {} random kills ({killed_mid_run} workers mid-run)",
        started.elapsed(),
        plan.kills
    );
    drop((enrich, validate, reconciler));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_validate_worker_processes_share_a_consumer_and_one_is_sigkilled() {
    let plan = Plan::from_env("three_validate_worker_processes_share_a_consumer_and_one_is_sigkilled", 1);
    let mut rng = fastrand::Rng::with_seed(plan.seed);
    let h = Harness::start(&plan).await;
    let mut enrich = Worker::start(&h, "enrich", None);
    enrich.until_running().await;
    let mut validators = Vec::new();
    for _ in 0..3 {
        let mut w = Worker::start(&h, "validate", None);
        w.until_running().await;
        validators.push(w);
    }
    let spec = h.node_spec("node", RECONCILER_TOML);
    let node = spec.start("127.0.0.1:0");
    let token = spec.admin_token();
    node_cli(&node, &token, &["pipeline", "open-run", RUN, "--slice", &format!("s={FILE}"), "--window-s", "3600"]);
    let upload = h.ingest(&node, &token, SCALE_OUT_ROWS_PER_MESSAGE);

    let mut victim = validators.remove(rng.usize(..3));
    let batches = rng.usize(1..=2);
    until(plan.step, "the victim to ack some batches", || {
        let acked = victim.batches_acked() >= batches;
        async move { acked }
    })
    .await;
    // A random point in the victim's step cycle (a few ms), not a wait.
    tokio::time::sleep(Duration::from_millis(rng.u64(0..20))).await; // chaos timing, not synchronisation
    assert!(!h.done("validate").await, "the victim is killed mid-run");
    let victim_batches = victim.batches_acked();
    victim.kill();
    let out = upload.await.unwrap();
    assert!(out.status.success(), "ingest: {}", String::from_utf8_lossy(&out.stderr));
    h.assert_exact(&node, &token, plan.settle).await;
    let survivors: usize = validators.iter().map(Worker::batches_acked).sum();
    eprintln!("the victim acked {victim_batches} batches; the survivors {survivors}");
    assert!(survivors > 0, "the survivors shared the consumer");
    drop((enrich, validators));
}
