//! Crash test: acked writes survive `SIGKILL`, and the stream has no holes.
//!
//! `crash_recovery` (the parent) runs this test binary again as a child
//! (`crash_child`, selected with `--exact --ignored` and told where to work
//! by `FINMESH_CRASH_DIR`). The child opens the embedded engine, creates the
//! stream `CRASH` with `sync: always`, and publishes from 16 concurrent tasks
//! messages whose payload can be regenerated from its first line
//! (`iteration:publisher:n:`), printing `ACK <seq> <fnv64 of payload>` to
//! stdout only after each ack. The parent reads those lines, kills the child
//! with `SIGKILL` after a random number of acks (now and then before any,
//! while the engine opens or recovers), reads the lines already in the pipe,
//! reopens the engine in the same directory and checks:
//! - every acked sequence is stored with the acked content;
//! - sequences `1..=last_seq` are all stored (no hole), each payload is
//!   intact and no message is stored twice;
//! - the subject index counts exactly the stored messages (a kill between
//!   a write and its index changes is repaired when the store opens);
//! - the stream's epoch never changes: with `sync: always` a crash takes
//!   back nothing a reader could have seen.
//!
//! Iterations share one directory, so each continues the stream left by the
//! crashes before it. 30 iterations by default, `FINMESH_CRASH_ITERATIONS`
//! for a soak, `FINMESH_CRASH_SEED` to replay a run (the seed is printed).

use std::collections::{BTreeMap, HashSet};
use std::io::{BufRead, BufReader, Write};
use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use finmesh_core::{
    ConsumerConfig, ConsumerEngine, ConsumerName, ErrorKind, OutgoingMessage, ReadRequest, Seq, StreamConfig,
    StreamEngine, StreamName, Subject, SubjectPattern, SyncPolicy,
};
use finmesh_embedded::EmbeddedEngine;

const DIR_ENV: &str = "FINMESH_CRASH_DIR";
const ITERATION_ENV: &str = "FINMESH_CRASH_ITERATION";
const PUBLISHERS: u64 = 16;
/// Longest the parent waits for the child's next line.
const LINE_TIMEOUT: Duration = Duration::from_secs(60);

fn stream() -> StreamName {
    StreamName::new("CRASH").unwrap()
}

fn stream_config() -> StreamConfig {
    let mut c = StreamConfig::new(stream(), vec![SubjectPattern::new("crash.>").unwrap()]);
    c.sync = SyncPolicy::Always;
    c
}

/// FNV-1a, 64 bits: the checksum printed with each ack.
fn fnv64(data: &[u8]) -> u64 {
    data.iter().fold(0xcbf2_9ce4_8422_2325, |h, b| (h ^ *b as u64).wrapping_mul(0x0100_0000_01b3))
}

/// SplitMix64: a tiny deterministic generator (payload filler, test choices).
struct SplitMix(u64);

impl SplitMix {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}

/// The payload of message `n` of `publisher` in `iteration`: a header line
/// and 0-2047 filler bytes generated from it, so any payload can be checked
/// on its own.
fn payload(iteration: u64, publisher: u64, n: u64) -> Vec<u8> {
    let head = format!("{iteration}:{publisher}:{n}:");
    let mut rng = SplitMix(fnv64(head.as_bytes()));
    let len = rng.below(2048) as usize;
    let mut out = head.into_bytes();
    out.extend((0..len).map(|_| rng.next() as u8));
    out
}

/// The identity of an intact payload, or why it is not intact.
fn check_payload(p: &[u8]) -> Result<(u64, u64, u64), String> {
    let text = String::from_utf8_lossy(&p[..p.len().min(64)]).into_owned();
    let mut parts = text.splitn(4, ':');
    let mut num = || parts.next().and_then(|s| s.parse::<u64>().ok());
    let (Some(i), Some(pubr), Some(n)) = (num(), num(), num()) else {
        return Err(format!("payload has no header: {text:?}"));
    };
    if payload(i, pubr, n) != p {
        return Err(format!("payload {i}:{pubr}:{n} is corrupt ({} bytes)", p.len()));
    }
    Ok((i, pubr, n))
}

/// The child: publish until killed, printing each ack after it arrives.
#[test]
#[ignore = "child process of crash_recovery, which runs it"]
fn crash_child() {
    let Ok(dir) = std::env::var(DIR_ENV) else { return };
    let iteration: u64 = std::env::var(ITERATION_ENV).unwrap().parse().unwrap();
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
    rt.block_on(async move {
        let engine = EmbeddedEngine::open(&dir).expect("child: open");
        engine.create_stream(stream_config()).await.expect("child: create stream");
        let tasks: Vec<_> = (0..PUBLISHERS)
            .map(|p| {
                let engine = engine.clone();
                tokio::spawn(async move {
                    let subject = Subject::new(format!("crash.p{p}")).unwrap();
                    for n in 0.. {
                        let body = payload(iteration, p, n);
                        let sum = fnv64(&body);
                        let msg = OutgoingMessage::new(subject.clone(), Bytes::from(body));
                        let ack = engine.publish(&stream(), msg).await.expect("child: publish");
                        // One write per line (atomic on a pipe); stop if the parent is gone.
                        let line = format!("ACK {} {sum:016x}\n", ack.seq.0);
                        let mut out = std::io::stdout().lock();
                        if out.write_all(line.as_bytes()).and_then(|_| out.flush()).is_err() {
                            std::process::exit(0);
                        }
                    }
                })
            })
            .collect();
        for t in tasks {
            t.await.unwrap();
        }
    });
}

fn parse_ack(line: &str) -> Option<(u64, u64)> {
    // libtest may print `test crash_child ... ` before the first line.
    let rest = &line[line.find("ACK ")? + 4..];
    let mut it = rest.split_whitespace();
    let seq = it.next()?.parse().ok()?;
    let sum = u64::from_str_radix(it.next()?, 16).ok()?;
    Some((seq, sum))
}

/// One child run: returns the acks it printed (seq → checksum).
fn run_child(dir: &Path, iteration: u64, rng: &mut SplitMix) -> Vec<(u64, u64)> {
    let exe = std::env::current_exe().unwrap();
    let mut child = Command::new(exe)
        .args(["crash_child", "--exact", "--ignored", "--nocapture", "--test-threads=1"])
        .env(DIR_ENV, dir)
        .env(ITERATION_ENV, iteration.to_string())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("spawn the child");
    let stdout = child.stdout.take().unwrap();
    let (tx, rx) = mpsc::channel::<String>();
    let reader = std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines() {
            let Ok(line) = line else { return };
            if tx.send(line).is_err() {
                return;
            }
        }
    });
    // One run in ten is killed at a random moment before any ack (while
    // opening, recovering or creating the stream); the others after 1-400.
    let target = if rng.below(10) == 0 { 0 } else { 1 + rng.below(400) };
    let mut acks = Vec::new();
    if target == 0 {
        std::thread::sleep(Duration::from_micros(rng.below(50_000)));
    }
    while (acks.len() as u64) < target {
        match rx.recv_timeout(LINE_TIMEOUT) {
            Ok(line) => acks.extend(parse_ack(&line)),
            Err(mpsc::RecvTimeoutError::Timeout) => {
                let _ = child.kill();
                panic!("iteration {iteration}: no output from the child for {LINE_TIMEOUT:?}");
            }
            Err(mpsc::RecvTimeoutError::Disconnected) => {
                let status = child.wait().unwrap();
                panic!("iteration {iteration}: the child exited on its own ({status}) after {} acks", acks.len());
            }
        }
    }
    // Land the kill a little after the ack we waited for, somewhere in the
    // middle of the next group commit.
    std::thread::sleep(Duration::from_micros(rng.below(3_000)));
    child.kill().expect("SIGKILL the child");
    child.wait().unwrap();
    // Lines already written are acks too.
    reader.join().unwrap();
    acks.extend(rx.try_iter().filter_map(|l| parse_ack(&l)));
    acks
}

/// Check the stream against every ack so far; `checked_to` is where the
/// previous full content check ended.
async fn verify(engine: &EmbeddedEngine, acked: &BTreeMap<u64, u64>, checked_to: u64, iteration: u64) -> u64 {
    let s = stream();
    let info = match engine.stream_info(&s).await {
        Ok(info) => info,
        Err(e) if e.kind() == ErrorKind::NotFound && acked.is_empty() => return 0,
        Err(e) => panic!("iteration {iteration}: stream_info: {e:?}"),
    };
    let st = info.state;
    let max_acked = acked.keys().next_back().copied().unwrap_or(0);
    assert!(st.last_seq.0 >= max_acked, "iteration {iteration}: last_seq {} < acked {max_acked}", st.last_seq);
    assert_eq!(st.first_seq, Seq(1), "iteration {iteration}: messages lost from the front");
    assert_eq!(st.messages, st.last_seq.0, "iteration {iteration}: hole in 1..={}", st.last_seq);
    // Content of every message not checked before: contiguous and intact.
    let mut seen = HashSet::new();
    let mut next = checked_to + 1;
    while next <= st.last_seq.0 {
        let batch = engine.read(&s, ReadRequest::from_seq(Seq(next), 5_000)).await.unwrap();
        assert!(!batch.is_empty(), "iteration {iteration}: nothing readable at {next}");
        for m in batch {
            assert_eq!(m.seq, Seq(next), "iteration {iteration}: hole before {}", m.seq);
            let id = check_payload(&m.payload).unwrap_or_else(|e| panic!("iteration {iteration}, seq {next}: {e}"));
            assert!(seen.insert(id), "iteration {iteration}: payload {id:?} stored twice");
            next += 1;
        }
    }
    // The subject index holds every message, none twice (a filtered
    // consumer counts through it): the index changes of the last write may
    // have been lost with the process, and reopening rebuilt them.
    let mut c = ConsumerConfig::new(ConsumerName::new("index_check").unwrap());
    c.filter = Some(SubjectPattern::new("crash.>").unwrap());
    let c = engine.create_consumer(&s, c).await.unwrap();
    assert_eq!(c.num_pending, st.messages, "iteration {iteration}: the subject index disagrees with the stream");
    engine.delete_consumer(&s, &c.config.name).await.unwrap();
    // Every acked message has the acked content (older ones re-read too).
    for (&seq, &sum) in acked.range(checked_to.saturating_sub(1_000) + 1..) {
        let m = engine.get_message(&s, Seq(seq)).await.unwrap_or_else(|e| panic!("acked seq {seq} lost: {e:?}"));
        assert_eq!(fnv64(&m.payload), sum, "iteration {iteration}: acked seq {seq} has other content");
    }
    st.last_seq.0
}

#[test]
fn crash_recovery() {
    let iterations: u64 = std::env::var("FINMESH_CRASH_ITERATIONS").ok().and_then(|v| v.parse().ok()).unwrap_or(30);
    let seed = std::env::var("FINMESH_CRASH_SEED")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| SystemTime::now().duration_since(UNIX_EPOCH).unwrap().as_nanos() as u64);
    println!("crash test: {iterations} iterations, FINMESH_CRASH_SEED={seed}");
    let mut rng = SplitMix(seed);
    let dir = tempfile::tempdir().unwrap();
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
    let mut acked = BTreeMap::new();
    let mut checked_to = 0;
    let mut epoch = None;
    for iteration in 0..iterations {
        let started = Instant::now();
        let acks = run_child(dir.path(), iteration, &mut rng);
        let child_time = started.elapsed();
        for (seq, sum) in &acks {
            assert!(acked.insert(*seq, *sum).is_none(), "iteration {iteration}: seq {seq} acked twice");
        }
        let now;
        (checked_to, now) = rt.block_on(async {
            let engine = EmbeddedEngine::open(dir.path()).expect("reopen after the crash");
            let last = verify(&engine, &acked, checked_to, iteration).await;
            let epoch = engine.stream_info(&stream()).await.ok().map(|i| i.epoch);
            engine.close().await.expect("close");
            (last, epoch)
        });
        if let (Some(before), Some(now)) = (epoch, now) {
            assert_eq!(before, now, "iteration {iteration}: the `always` stream got a new epoch from a crash");
        }
        epoch = epoch.or(now);
        let verify_time = started.elapsed() - child_time;
        println!(
            "iteration {iteration}: {} acks, stream at {checked_to} (child {child_time:.1?}, reopen and verify {verify_time:.1?})",
            acks.len()
        );
    }
    assert!(!acked.is_empty(), "no ack in {iterations} iterations");
    // A final full pass over everything.
    rt.block_on(async {
        let engine = EmbeddedEngine::open(dir.path()).unwrap();
        let last = verify(&engine, &acked, 0, iterations).await;
        assert_eq!(last, checked_to);
        engine.close().await.unwrap();
    });
}
