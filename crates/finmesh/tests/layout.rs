//! The shipped binary carries no test or benchmark code: its normal
//! dependencies name no test kit and no bench crate (those are
//! dev-dependencies, or `finmesh-bench`'s), and it has no `bench` command.

use std::process::Command;

#[test]
fn the_shipped_binary_depends_on_no_test_kit_or_bench_code() {
    let manifest = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/Cargo.toml")).unwrap();
    let manifest: toml::Table = manifest.parse().unwrap();
    let deps = manifest["dependencies"].as_table().unwrap();
    for name in deps.keys() {
        assert!(!name.contains("testkit") && !name.contains("bench"), "finmesh depends on {name}");
    }
    assert!(manifest["dev-dependencies"].as_table().unwrap().contains_key("finmesh-testkit"));

    let help = Command::new(env!("CARGO_BIN_EXE_finmesh")).arg("--help").output().unwrap();
    let help = String::from_utf8_lossy(&help.stdout);
    assert!(help.contains("serve"), "{help}");
    assert!(!help.lines().any(|l| l.trim_start().starts_with("bench")), "{help}");
    let bench = Command::new(env!("CARGO_BIN_EXE_finmesh")).arg("bench").output().unwrap();
    assert!(!bench.status.success());
}
