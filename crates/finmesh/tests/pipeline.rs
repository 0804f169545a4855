//! `finmesh pipeline gen` and `finmesh pipeline rules check`, run as the
//! built binary: output, summaries and exit codes.

use std::path::PathBuf;
use std::process::{Command, Output};

fn examples() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../examples/pipeline")
}

fn finmesh(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_finmesh")).args(args).output().unwrap()
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8(bytes.to_vec()).unwrap()
}

#[test]
fn gen_writes_the_feed_to_stdout_and_the_summary_to_stderr() {
    let seed = fastrand::u64(..).to_string();
    let args = ["pipeline", "gen", "--rows", "300", "--seed", &seed, "--bad-share", "0.1", "--rule-fail-share", "0.05"];
    let out = finmesh(&args);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let csv = text(&out.stdout);
    let mut lines = csv.lines();
    assert!(
        lines.next().unwrap().starts_with("trade_id,book,desk,counterparty,ccy,notional,price,quantity,trade_date,")
    );
    let stderr = text(&out.stderr);
    assert!(stderr.starts_with(&format!("300 rows, {} bytes, seed {seed}\n", csv.len())), "{stderr}");
    assert!(stderr.contains("\ngood: ") && stderr.contains("\nfailing one rule: "), "{stderr}");

    // Same seed, same bytes; --json is one object with the seed, the file the same.
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("feed.csv");
    let out = finmesh(&[&args[..], &["--json", "--out", file.to_str().unwrap()]].concat());
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert!(out.stdout.is_empty());
    assert_eq!(std::fs::read_to_string(&file).unwrap(), csv);
    let summary: serde_json::Value = serde_json::from_slice(&out.stderr).unwrap();
    assert_eq!(summary["seed"].as_u64().unwrap().to_string(), seed);
    assert_eq!(summary["rows"], 300);
    assert_eq!(summary["bytes"], csv.len() as u64);
    let n = |k: &str| summary[k].as_u64().unwrap();
    assert_eq!(n("good") + n("bad") + n("rule_fails"), 300);
    assert_eq!(csv.lines().count(), 301);
}

#[test]
fn gen_refuses_bad_options_before_creating_the_file() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("feed.csv");
    let out = finmesh(&["pipeline", "gen", "--rows", "10", "--bad-share", "1.5", "--out", file.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(1));
    let stderr = text(&out.stderr);
    assert!(stderr.starts_with("error: invalid options: shares must each be in 0..=1"), "{stderr}");
    assert!(!file.exists());

    let out = finmesh(&["pipeline", "gen", "--rows", "10", "--as-of", "2019-01-01T00:00:00Z"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(text(&out.stderr).contains("must be within 2024-01-01"), "{}", text(&out.stderr));
    assert!(out.stdout.is_empty());

    let out = finmesh(&["pipeline", "gen"]);
    assert_eq!(out.status.code(), Some(2), "clap: --rows is required");
    assert!(text(&out.stderr).contains("--rows"));
}

#[test]
fn rules_check_summarises_the_example() {
    let dir = examples();
    let rules = dir.join("rules.txt");
    let out = finmesh(&[
        "pipeline",
        "rules",
        "check",
        rules.to_str().unwrap(),
        "--schema",
        dir.join("risk.avsc").to_str().unwrap(),
        "--dataset",
        "currencies=string",
        "--dataset",
        "books=string",
    ]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let stdout = text(&out.stdout);
    assert!(
        stdout.starts_with(&format!("{}: 13 rules; fields read: trade_id, book, desk,", rules.display())),
        "{stdout}"
    );
    assert!(stdout.ends_with("; datasets: currencies, books\n"), "{stdout}");
}

#[test]
fn rules_check_shows_every_error_with_a_caret_and_fails() {
    let dir = tempfile::tempdir().unwrap();
    let rules = dir.path().join("bad.rules");
    std::fs::write(&rules, "rule ok: notional > 0\nrule typo: notionl > 0\nrule ccy: LOOKUP(currencies, ccy)\n")
        .unwrap();
    let schema = examples().join("risk.avsc");
    let out = finmesh(&["pipeline", "rules", "check", rules.to_str().unwrap(), "--schema", schema.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(1));
    assert!(out.stdout.is_empty());
    let stderr = text(&out.stderr);
    let path = rules.display();
    let want = format!(
        "{path}:2:12: unknown field `notionl`\n 2 | rule typo: notionl > 0\n   |            ^^^^^^^ did you mean `notional`?\n"
    );
    assert!(stderr.starts_with(&want), "{stderr}");
    assert!(stderr.contains(&format!("{path}:3:18: unknown reference dataset `currencies`")), "{stderr}");
    assert!(stderr.ends_with(&format!("error: 2 error(s) in {path}\n")), "{stderr}");

    // A schema that is not one, and a dataset flag that is not NAME=KIND.
    let out = finmesh(&["pipeline", "rules", "check", rules.to_str().unwrap(), "--schema", rules.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(1));
    assert!(text(&out.stderr).contains("not a valid Avro schema"), "{}", text(&out.stderr));
    let out = finmesh(&[
        "pipeline",
        "rules",
        "check",
        rules.to_str().unwrap(),
        "--schema",
        schema.to_str().unwrap(),
        "--dataset",
        "currencies=text",
    ]);
    assert_eq!(out.status.code(), Some(2));
    assert!(text(&out.stderr).contains("neither `string` nor `int`"), "{}", text(&out.stderr));
}
