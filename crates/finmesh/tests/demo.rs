//! `finmesh demo` as a user runs it: it prints live tail events, stops
//! gracefully on Ctrl-C (SIGINT) with the engine closed, and a second run
//! finds the first run's data.

use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

/// Start the demo; its stdout lines arrive on the returned channel.
fn start_demo(data_dir: &std::path::Path) -> (Child, mpsc::Receiver<String>) {
    let mut child = Command::new(env!("CARGO_BIN_EXE_finmesh"))
        .args(["demo", "--interval-ms", "50", "--data-dir"])
        .arg(data_dir)
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("start finmesh demo");
    let stdout = child.stdout.take().unwrap();
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    (child, rx)
}

/// Collect lines until `done` says so, failing after a deadline.
fn read_until(rx: &mpsc::Receiver<String>, seen: &mut Vec<String>, done: impl Fn(&[String]) -> bool) {
    let deadline = Instant::now() + Duration::from_secs(60);
    while !done(seen) {
        let left = deadline.saturating_duration_since(Instant::now());
        match rx.recv_timeout(left) {
            Ok(line) => seen.push(line),
            Err(e) => panic!("demo output ended or stalled ({e}); so far:\n{}", seen.join("\n")),
        }
    }
}

fn interrupt(child: &Child) {
    // SAFETY: kill(2) on our own, not yet reaped child.
    let rc = unsafe { libc::kill(child.id() as libc::pid_t, libc::SIGINT) };
    assert_eq!(rc, 0);
}

fn wait_exit(child: &mut Child) -> std::process::ExitStatus {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        if let Some(status) = child.try_wait().unwrap() {
            return status;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            panic!("demo did not exit after SIGINT");
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}

#[test]
fn demo_tails_live_stops_on_ctrl_c_and_keeps_its_data() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");

    let (mut child, rx) = start_demo(&data);
    let mut seen = Vec::new();
    // The seeded messages and at least two live ticks from the background task.
    read_until(&rx, &mut seen, |s| s.iter().filter(|l| l.contains("demo.tick: tick")).count() >= 2);
    interrupt(&child);
    read_until(&rx, &mut seen, |s| s.iter().any(|l| l.starts_with("engine closed")));
    assert!(wait_exit(&mut child).success(), "demo exited with an error:\n{}", seen.join("\n"));
    let out = seen.join("\n");
    assert!(out.contains("kv demo/runs = 1 "), "{out}");
    assert!(out.contains("[seq 1] demo.hello: hello"), "{out}");
    assert!(out.contains("[seq 2] demo.orders.created: order 42 created"), "{out}");
    assert!(out.contains("[seq 3] demo.tick: tick 1"), "{out}");
    assert!(out.contains("SIGINT: shutting down"), "{out}");

    // Second run: the stream and the counter survived the graceful close,
    // and the tail starts after the first run's messages.
    let (mut child, rx) = start_demo(&data);
    let mut seen = Vec::new();
    read_until(&rx, &mut seen, |s| s.iter().any(|l| l.contains("demo.tick: tick 1")));
    interrupt(&child);
    read_until(&rx, &mut seen, |s| s.iter().any(|l| l.starts_with("engine closed")));
    assert!(wait_exit(&mut child).success());
    let out = seen.join("\n");
    assert!(out.contains("kv demo/runs = 2 "), "{out}");
    assert!(!out.contains("[seq 1] "), "the tail must start after the first run's messages:\n{out}");
}
