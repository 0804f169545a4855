//! `finmesh-bench` end to end on tiny settings: every scenario family runs
//! against the real engine and a real nats-server, the JSON report has every
//! figure for every run, and the ratios the issue asks for. The gateway
//! families start the real `finmesh` binary ([`finmesh_bin`]) and also run
//! against real nginx and wrk (scripts/test installs them); without them
//! the harness names the package to install.

use std::path::PathBuf;
use std::process::Command;
use std::sync::OnceLock;

use serde_json::Value;

/// The `finmesh` binary the gateway scenarios start: `$FINMESH_BIN` (as
/// scripts/test sets it, after building the workspace), else built here with
/// `cargo build -p finmesh` (a no-op when fresh), so that these tests never
/// measure a stale or missing binary.
fn finmesh_bin() -> PathBuf {
    static BIN: OnceLock<PathBuf> = OnceLock::new();
    BIN.get_or_init(|| {
        if let Some(bin) = std::env::var_os(finmesh_bench::FINMESH_BIN_ENV) {
            return bin.into();
        }
        let out = Command::new(env!("CARGO"))
            .args(["build", "-p", "finmesh", "--message-format=json-render-diagnostics"])
            .current_dir(env!("CARGO_MANIFEST_DIR"))
            .stderr(std::process::Stdio::inherit())
            .output()
            .expect("run cargo build -p finmesh");
        assert!(out.status.success(), "cargo build -p finmesh failed");
        String::from_utf8_lossy(&out.stdout)
            .lines()
            .filter_map(|l| serde_json::from_str::<Value>(l).ok())
            .filter(|m| m["reason"] == "compiler-artifact" && m["target"]["name"] == "finmesh")
            .find_map(|m| m["executable"].as_str().map(PathBuf::from))
            .expect("cargo build -p finmesh names the finmesh executable")
    })
    .clone()
}

/// The engine families (everything but `gateway-*`).
const ENGINE_FAMILIES: [&str; 6] =
    ["fsync", "embedded-publish", "nats-publish", "embedded-kv", "nats-kv", "nats-mirror"];

fn run_bench(args: &[&str], env: &[(&str, &str)]) -> std::process::Output {
    let dir = tempfile::tempdir().unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_finmesh-bench"))
        .args(args)
        .arg("--dir")
        .arg(dir.path())
        .arg("--json")
        .args(if args.contains(&"--duration-secs") { &[][..] } else { &["--duration-secs", "0.2"][..] })
        .env(finmesh_bench::FINMESH_BIN_ENV, finmesh_bin())
        .envs(env.iter().copied())
        .output()
        .expect("run finmesh-bench");
    let leftovers: Vec<_> = std::fs::read_dir(dir.path()).unwrap().collect();
    assert!(leftovers.is_empty(), "bench left files behind: {leftovers:?}");
    out
}

fn bench(args: &[&str]) -> Value {
    let out = run_bench(args, &[]);
    assert!(out.status.success(), "bench failed:\n{}", String::from_utf8_lossy(&out.stderr));
    serde_json::from_slice(&out.stdout).expect("bench --json prints JSON")
}

fn result<'a>(report: &'a Value, id: &str) -> &'a Value {
    report["results"]
        .as_array()
        .unwrap()
        .iter()
        .find(|r| r["id"] == id)
        .unwrap_or_else(|| panic!("no result {id} in {report:#}"))
}

#[test]
fn every_engine_scenario_reports_every_run_and_the_ratios() {
    let mut args = vec!["--runs", "2", "--kv-keys", "3000", "--nats-kv-keys", "1000", "--mirror-puts", "50"];
    for family in ENGINE_FAMILIES {
        args.extend(["--scenario", family]);
    }
    let report = bench(&args);
    assert_eq!(report["runs"], 2);
    assert_eq!(report["publish_payload_bytes"], 128);
    assert_eq!(report["kv_value_bytes"], 256);
    let rates = [
        "disk.fsync.4k",
        "embedded.publish.always.1-pub",
        "embedded.publish.always.16-pub",
        "embedded.publish.always.batch-100",
        "embedded.publish.interval.1-pub",
        "embedded.publish.interval.16-pub",
        "embedded.publish.interval.batch-100",
        "nats.publish.1-pub",
        "nats.publish.16-pub",
        "nats.publish.async-1000",
        "nats.publish.always.1-pub",
        "nats.publish.always.16-pub",
        "embedded.kv.put.16-tasks",
        "embedded.kv.put.16-tasks.interval",
        "embedded.kv.get.1-task",
        "embedded.kv.get.2-tasks",
        "nats.kv.put.async-1000",
        "nats.kv.get.1-conn",
        "nats.mirror.hub-to-leaf.loopback",
        "nats.mirror.hub-to-leaf.proxy-40ms",
    ];
    for id in rates {
        let r = result(&report, id);
        assert_eq!(r["per_run"].as_array().unwrap().len(), 2, "{id}");
        assert!(r["median"].as_f64().unwrap() > 0.0, "{id}: {r}");
        assert!(r["p50_us"].as_f64().unwrap() > 0.0, "{id}: {r}");
        assert!(r["p99_us"].as_f64().unwrap() >= r["p50_us"].as_f64().unwrap(), "{id}: {r}");
    }
    assert!(result(&report, "embedded.kv.get.1-task")["p999_us"].as_f64().is_some());
    for id in ["embedded.kv.rss.loaded", "embedded.kv.rss.reopened", "nats.kv.rss.loaded"] {
        let r = result(&report, id);
        assert_eq!(r["unit"], "MiB");
        assert!(r["median"].as_f64().unwrap() > 1.0, "{id}: {r}");
    }
    // The NATS KV figures say how many keys they used.
    assert!(result(&report, "nats.kv.get.1-conn")["note"].as_str().unwrap().contains("1000 keys"));

    let ratios = report["ratios"].as_array().unwrap();
    for label in ["embedded always 16-pub / (16 × fsync/s)", "embedded interval batch-100 / NATS async publish"] {
        let r = ratios.iter().find(|r| r["label"] == label).unwrap_or_else(|| panic!("no ratio {label}"));
        assert_eq!(r["per_run"].as_array().unwrap().len(), 2);
        assert!(r["median"].as_f64().unwrap() > 0.0);
    }
    // The group-commit ratio is what its label says.
    let ratio = ratios.iter().find(|r| r["id"] == "group-commit").unwrap();
    let always16 = &result(&report, "embedded.publish.always.16-pub")["per_run"][0];
    let fsync = &result(&report, "disk.fsync.4k")["per_run"][0];
    let expected = always16.as_f64().unwrap() / (16.0 * fsync.as_f64().unwrap());
    assert!((ratio["per_run"][0].as_f64().unwrap() - expected).abs() < 1e-9);
}

#[test]
fn nats_engine_families_report_engine_raw_pairs_and_their_ratios() {
    let report = bench(&[
        "--runs",
        "1",
        "--scenario",
        "nats-engine-publish",
        "--scenario",
        "nats-engine-kv",
        "--nats-kv-keys",
        "500",
        // Long enough for a batch of 100 fsynced publishes on a busy machine.
        "--duration-secs",
        "0.5",
    ]);
    assert_eq!(report["scenarios"], serde_json::json!(["nats-engine-publish", "nats-engine-kv"]));
    let ratios = report["ratios"].as_array().unwrap();
    for topology in ["single", "r3"] {
        let ops = ["default", "always"]
            .iter()
            .flat_map(|p| ["1-pub", "16-pub", "batch-100"].map(|m| format!("publish.{p}.{m}")))
            .chain(["kv.put.16-tasks", "kv.get.1-task", "kv.get.2-tasks"].map(str::to_owned));
        for op in ops {
            for (side, peer) in [("engine", "finmesh-nats"), ("raw", "async-nats")] {
                let r = result(&report, &format!("nats-{side}.{topology}.{op}"));
                assert_eq!(r["peer"], peer);
                assert!(r["median"].as_f64().unwrap() > 0.0, "{r}");
                assert!(r["p99_us"].as_f64().unwrap() > 0.0, "{r}");
            }
            let engine = result(&report, &format!("nats-engine.{topology}.{op}"));
            let raw = result(&report, &format!("nats-raw.{topology}.{op}"));
            for (metric, field) in [("throughput", "median"), ("p99", "p99_us")] {
                let id = format!("nats-engine-vs-raw.{topology}.{op}.{metric}");
                let ratio = ratios.iter().find(|r| r["id"] == id.as_str()).unwrap_or_else(|| panic!("no ratio {id}"));
                let expected = engine[field].as_f64().unwrap() / raw[field].as_f64().unwrap();
                assert!((ratio["median"].as_f64().unwrap() - expected).abs() < 1e-9, "{id}: {ratio}");
            }
        }
    }
    // Only these families ran.
    assert!(report["results"].as_array().unwrap().iter().all(|r| r["id"].as_str().unwrap().starts_with("nats-")));
    assert!(result(&report, "nats-engine.r3.kv.get.1-task")["note"].as_str().unwrap().contains("R3"));
}

#[test]
fn consumer_family_reports_sparse_fetch_publish_rates_and_acks() {
    let report = bench(&["--runs", "1", "--scenario", "embedded-consumer", "--consumer-messages", "5000"]);
    assert_eq!(report["scenarios"], serde_json::json!(["embedded-consumer"]));
    assert_eq!(report["consumer_messages"], 5000);
    let fetch = result(&report, "embedded.consumer.sparse-fetch");
    assert_eq!((fetch["unit"].as_str(), fetch["median"].clone()), (Some("µs p99"), fetch["p99_us"].clone()));
    assert!(fetch["p99_us"].as_f64().unwrap() > 0.0, "{fetch}");
    for (id, unit) in [
        ("embedded.consumer.publish-while-draining", "msgs/s"),
        ("embedded.consumer.publish-alone", "msgs/s"),
        ("embedded.consumer.acks.pending-10000", "acks/s"),
        ("embedded.consumer.acks.pending-100", "acks/s"),
    ] {
        let r = result(&report, id);
        assert_eq!(r["unit"], unit, "{r}");
        assert!(r["median"].as_f64().unwrap() > 0.0, "{id}: {r}");
    }
}

#[test]
fn scenario_filter_runs_only_the_chosen_family() {
    let report = bench(&["--runs", "1", "--scenario", "fsync"]);
    let ids: Vec<&str> = report["results"].as_array().unwrap().iter().map(|r| r["id"].as_str().unwrap()).collect();
    assert_eq!(ids, ["disk.fsync.4k"]);
    assert_eq!(report["scenarios"], serde_json::json!(["fsync"]));
    assert!(report["ratios"].as_array().unwrap().is_empty(), "no ratio without both of its figures");
}

#[test]
fn mirror_scenario_times_every_put_on_loopback_and_through_the_40ms_proxy() {
    let report = bench(&["--runs", "1", "--scenario", "nats-mirror", "--mirror-puts", "50"]);
    assert_eq!(report["scenarios"], serde_json::json!(["nats-mirror"]));
    assert_eq!(report["mirror_puts"], 50);
    let loopback = result(&report, "nats.mirror.hub-to-leaf.loopback");
    let proxied = result(&report, "nats.mirror.hub-to-leaf.proxy-40ms");
    for r in [loopback, proxied] {
        assert_eq!(r["unit"], "µs p99");
        assert_eq!(r["median"], r["p99_us"], "the value is the p99: {r}");
        let (p50, p99, max) =
            (r["p50_us"].as_f64().unwrap(), r["p99_us"].as_f64().unwrap(), r["max_us"].as_f64().unwrap());
        assert!(0.0 < p50 && p50 <= p99 && p99 <= max, "{r}");
    }
    // Through the proxy every put waits at least its 40 ms one-way delay.
    assert!(proxied["p50_us"].as_f64().unwrap() >= 40_000.0, "{proxied}");
    assert!(loopback["p50_us"].as_f64().unwrap() < 40_000.0, "{loopback}");
}

#[test]
fn gateway_scenarios_measure_the_gateway_and_its_peers_with_every_ratio() {
    let report = bench(&["--runs", "1", "--only", "gateway"]);
    assert_eq!(
        report["scenarios"],
        serde_json::json!(["gateway-kv", "gateway-kv-secure", "gateway-nats-kv", "gateway-publish", "gateway-tls"])
    );
    let ids = [
        ("gateway.kv.get.http", "req/s"),
        ("nginx.static.http", "req/s"),
        ("gateway.kv.get.https", "req/s"),
        ("nginx.static.https", "req/s"),
        ("gateway.kv.get.http.plain-bucket", "req/s"),
        ("gateway.kv.get.http.encrypted-hashed-bucket", "req/s"),
        ("gateway.nats.kv.get.http", "req/s"),
        ("nats.kv.get.64-tasks", "req/s"),
        ("gateway.publish.ndjson-100", "msgs/s"),
        ("embedded.publish.batch-100.4-tasks", "msgs/s"),
        ("gateway.publish.ndjson-100.interval", "msgs/s"),
        ("embedded.publish.batch-100.4-tasks.interval", "msgs/s"),
        ("gateway.tls.new-conn", "conns/s"),
        ("nginx.tls.new-conn", "conns/s"),
    ];
    for (id, unit) in ids {
        let r = result(&report, id);
        assert_eq!(r["unit"], unit, "{id}");
        assert!(r["median"].as_f64().unwrap() > 0.0, "{id}: {r}");
        assert!(r["p99_us"].as_f64().unwrap() >= r["p50_us"].as_f64().unwrap(), "{id}: {r}");
        assert!(r["p50_us"].as_f64().unwrap() > 0.0, "{id}: {r}");
    }
    let ratios = report["ratios"].as_array().unwrap();
    let ratio = |id: &str| {
        let r = ratios.iter().find(|r| r["id"] == id).unwrap_or_else(|| panic!("no ratio {id} in {ratios:?}"));
        r["per_run"][0].as_f64().unwrap()
    };
    // Each ratio divides the figures of its label, within the run.
    let value = |id: &str| result(&report, id)["per_run"][0].as_f64().unwrap();
    let p99 = |id: &str| result(&report, id)["p99_us"].as_f64().unwrap();
    assert!(
        (ratio("gateway-kv-vs-nginx-http") - value("gateway.kv.get.http") / value("nginx.static.http")).abs() < 1e-9
    );
    assert!(
        (ratio("gateway-kv-p99-vs-nginx-https") - p99("gateway.kv.get.https") / p99("nginx.static.https")).abs() < 1e-9
    );
    for id in [
        "gateway-kv-vs-nginx-https",
        "gateway-kv-p99-vs-nginx-http",
        "gateway-kv-encrypted-vs-plain",
        "gateway-nats-kv-vs-async-nats",
        "gateway-publish-vs-in-process",
        "gateway-publish-vs-in-process-interval",
        "gateway-tls-conns-vs-nginx",
        "gateway-tls-handshake-p99-vs-nginx",
    ] {
        assert!(ratio(id) > 0.0, "{id}");
    }
}

#[test]
fn without_wrk_and_nginx_the_error_names_the_package_and_publish_still_runs() {
    let missing = [("FINMESH_WRK", "/nonexistent/wrk"), ("FINMESH_NGINX", "/nonexistent/nginx")];
    let out = run_bench(&["--runs", "1", "--only", "gateway-kv"], &missing);
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("apt-get install wrk"), "{stderr}");

    let out = run_bench(&["--runs", "1", "--only", "gateway-tls"], &missing);
    assert!(String::from_utf8_lossy(&out.stderr).contains("apt-get install nginx"));

    // The publish family needs neither.
    let out = run_bench(&["--runs", "1", "--only", "gateway-publish"], &missing);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let report: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert!(result(&report, "gateway.publish.ndjson-100")["median"].as_f64().unwrap() > 0.0);
}

/// The configuration the gateway scenarios start `finmesh serve` with is one
/// that the shipped binary accepts.
#[test]
fn the_serve_config_passes_finmesh_config_check() {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("serve.toml");
    std::fs::write(&config, finmesh_bench::SERVE_CONFIG).unwrap();
    let out = Command::new(finmesh_bin()).args(["config", "check", "--config"]).arg(&config).output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(String::from_utf8_lossy(&out.stdout).contains("configuration is valid"));
}

/// Without a `finmesh` to measure, the gateway families say how to get one.
#[test]
fn without_a_finmesh_binary_the_error_says_how_to_build_one() {
    let missing = std::env::temp_dir().join("no-such-finmesh-binary");
    let out = run_bench(&["--runs", "1", "--only", "gateway-publish"], &[("FINMESH_BIN", missing.to_str().unwrap())]);
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("FINMESH_BIN") && stderr.contains("is not a file"), "{stderr}");
}

/// `kv-scale` end to end on a tiny bucket: the batched load, the node
/// serving it, wrk on one key and on random keys (a missing key would fail
/// the run with a 404), the node's RSS, and the random / single ratio.
#[test]
fn kv_scale_loads_in_batches_and_gets_random_keys_over_http() {
    let report = bench(&["--runs", "1", "--scenario", "kv-scale", "--scale-keys", "2500", "--value-bytes", "64"]);
    assert_eq!(report["scenarios"], serde_json::json!(["kv-scale"]));
    let load = result(&report, "kv-scale.load");
    assert_eq!(load["unit"], "keys/s");
    assert!(load["median"].as_f64().unwrap() > 0.0, "{load:#}");
    assert!(load["what"].as_str().unwrap().contains("2500 keys × 64 B"), "{load:#}");
    assert!(result(&report, "kv-scale.disk")["median"].as_f64().unwrap() > 0.0);
    assert!(result(&report, "kv-scale.rss.serving")["median"].as_f64().unwrap() > 1.0);
    for id in ["kv-scale.get.single-key", "kv-scale.get.random-keys"] {
        let r = result(&report, id);
        assert_eq!(r["unit"], "req/s");
        assert!(r["median"].as_f64().unwrap() > 0.0 && r["p99_us"].as_f64().unwrap() > 0.0, "{r:#}");
    }
    let ratios = report["ratios"].as_array().unwrap();
    assert!(ratios.iter().any(|r| r["id"] == "kv-scale-random-vs-single"), "{ratios:#?}");
}

/// `pipeline` and `pipeline-nats` end to end on a tiny feed: the csv
/// ceiling, every stage's figure and the share of the ceiling, for both
/// engines; the run only ends when the reconciler stored it complete.
#[test]
fn pipeline_scenarios_report_every_stage_and_the_share_of_the_csv_ceiling() {
    let report = bench(&[
        "--runs",
        "1",
        "--scenario",
        "pipeline",
        "--scenario",
        "pipeline-nats",
        "--rows",
        "2500",
        "--nats-rows",
        "1500",
    ]);
    assert_eq!(report["scenarios"], serde_json::json!(["pipeline", "pipeline-nats"]));
    for id in ["pipeline.csv-ceiling", "pipeline.csv-ceiling.mb"] {
        let r = result(&report, id);
        assert_eq!(r["per_run"].as_array().unwrap().len(), 2, "one ceiling per family: {r}");
        assert!(r["median"].as_f64().unwrap() > 0.0, "{id}: {r}");
    }
    assert!(result(&report, "pipeline.csv-ceiling")["note"].as_str().unwrap().contains("2500 rows"));
    for engine in ["embedded", "nats-r3"] {
        for what in ["end-to-end", "seconds", "ingest", "enrich", "validate"] {
            let id = format!("pipeline.{engine}.{what}");
            let r = result(&report, &id);
            assert!(r["median"].as_f64().unwrap() > 0.0, "{id}: {r}");
        }
        assert!(result(&report, &format!("pipeline.{engine}.reconcile-lag"))["median"].as_f64().unwrap() >= 0.0);
        let rows = if engine == "embedded" { 2500.0 } else { 1500.0 };
        let e2e = result(&report, &format!("pipeline.{engine}.end-to-end"))["median"].as_f64().unwrap();
        let secs = result(&report, &format!("pipeline.{engine}.seconds"))["median"].as_f64().unwrap();
        assert!((e2e * secs - rows).abs() < 1.0, "{engine}: {e2e} rows/s × {secs} s is not {rows} rows");
        let ratio = report["ratios"]
            .as_array()
            .unwrap()
            .iter()
            .find(|r| r["id"] == format!("pipeline-{engine}-vs-csv"))
            .unwrap_or_else(|| panic!("no ratio pipeline-{engine}-vs-csv in {:#}", report["ratios"]));
        assert!(ratio["median"].as_f64().unwrap() > 0.0);
    }
}

/// `kv-scale-nats` end to end on a tiny bucket: the async-publish load
/// into a 3-node cluster, the node on the NATS engine serving it, wrk on
/// one key and on random keys, and the random / single ratio.
#[test]
fn kv_scale_nats_loads_a_cluster_and_gets_random_keys_over_http() {
    let report = bench(&["--runs", "1", "--scenario", "kv-scale-nats", "--scale-keys", "2500", "--value-bytes", "64"]);
    assert_eq!(report["scenarios"], serde_json::json!(["kv-scale-nats"]));
    let load = result(&report, "kv-scale-nats.load");
    assert_eq!(load["unit"], "keys/s");
    assert!(load["median"].as_f64().unwrap() > 0.0, "{load:#}");
    assert!(load["what"].as_str().unwrap().contains("2500 keys × 64 B"), "{load:#}");
    for id in ["kv-scale-nats.disk", "kv-scale-nats.nats-server.mem", "kv-scale-nats.rss.serving"] {
        assert!(result(&report, id)["median"].as_f64().unwrap() > 0.0, "{id}");
    }
    for id in ["kv-scale-nats.get.single-key", "kv-scale-nats.get.random-keys"] {
        let r = result(&report, id);
        assert_eq!(r["unit"], "req/s");
        assert!(r["median"].as_f64().unwrap() > 0.0 && r["p99_us"].as_f64().unwrap() > 0.0, "{r:#}");
    }
    let ratios = report["ratios"].as_array().unwrap();
    assert!(ratios.iter().any(|r| r["id"] == "kv-scale-nats-random-vs-single"), "{ratios:#?}");
}

/// `gateway-kv-secure` alone: a node with `[security]`, the encrypted,
/// hashed bucket next to the plain one, and their ratio.
#[test]
fn gateway_kv_secure_measures_an_encrypted_hashed_bucket_next_to_a_plain_one() {
    let report = bench(&["--runs", "2", "--scenario", "gateway-kv-secure"]);
    assert_eq!(report["scenarios"], serde_json::json!(["gateway-kv-secure"]));
    for id in ["gateway.kv.get.http.plain-bucket", "gateway.kv.get.http.encrypted-hashed-bucket"] {
        let r = result(&report, id);
        assert_eq!(r["per_run"].as_array().unwrap().len(), 2, "{id}");
        assert!(r["median"].as_f64().unwrap() > 0.0, "{r:#}");
    }
    let ratios = report["ratios"].as_array().unwrap();
    let r = ratios.iter().find(|r| r["id"] == "gateway-kv-encrypted-vs-plain").expect("the ratio");
    assert!(r["median"].as_f64().unwrap() > 0.0, "{r:#}");
}
