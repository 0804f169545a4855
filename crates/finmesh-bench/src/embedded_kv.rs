//! KV on the embedded engine: put and get with 256-byte values over N keys
//! (default 1,000,000), and the memory it takes.
//!
//! Memory is the process's resident set (`VmRSS`), so each phase runs in a
//! fresh child process (`finmesh-bench __bench-child`) whose RSS holds nothing
//! but the runtime and the engine:
//! - **load** (child 1): open the engine, put N keys from 16 tasks (each
//!   awaiting its put) into a `sync = interval(100 ms)` bucket, read VmRSS,
//!   then get random keys from 1 task (throughput and p50/p99/p999) and
//!   from 2 tasks (throughput), then put for the run's duration from 16
//!   tasks into a bucket with the default `sync = always`, close;
//! - **reopen** (child 2): open the loaded directory, read VmRSS, do 10,000
//!   random gets, close.
//!
//! Every get is checked: the value must be the one put for that key (its
//! first 8 bytes are the key's index), so a fast wrong answer fails the run.
//! The loaded bucket is `sync = interval(100 ms)`: a put is acked once it
//! reached the OS (survives a process crash; a power loss loses at most the
//! last 100 ms). The default, `always`, acks after the fsync: measured as
//! `embedded.kv.put.16-tasks`.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::Context as _;
use bytes::Bytes;
use finmesh_core::{BucketConfig, BucketName, Key, KvEngine, SyncPolicy};
use finmesh_embedded::EmbeddedEngine;

use super::measure::{KeyPicker, Measurement, Sample, closed_loop, new_histogram, vm_rss_bytes};
use super::{BenchContext, CONCURRENCY, ChildArgs, ChildPhase, KV_VALUE, child_measurements};

/// Bucket loaded by the benchmark (`sync = interval(100 ms)`).
const BUCKET: &str = "bench";
/// Bucket of the `sync = always` puts.
const BUCKET_ALWAYS: &str = "bench-always";
/// Random gets done after reopening.
const REOPEN_GETS: u64 = 10_000;

/// Id of the 1-task get measurement (ratios refer to it).
pub const GET_1: &str = "embedded.kv.get.1-task";

/// The key of index `i`.
pub fn key_name(i: u64) -> String {
    format!("k{i:010}")
}

/// The value stored under key `i`: its index (u64 BE), then filler.
pub fn value_for(i: u64) -> Bytes {
    let mut v = vec![0x5a; KV_VALUE];
    v[..8].copy_from_slice(&i.to_be_bytes());
    Bytes::from(v)
}

/// Check that `value` is the one stored under key `i`.
pub fn check_value(i: u64, value: &[u8]) -> anyhow::Result<()> {
    anyhow::ensure!(value.len() == KV_VALUE, "key {i}: value has {} bytes, expected {KV_VALUE}", value.len());
    anyhow::ensure!(value[..8] == i.to_be_bytes(), "key {i}: value belongs to another key");
    Ok(())
}

/// Run both phases in child processes; return their measurements.
pub async fn run(ctx: &BenchContext) -> anyhow::Result<Vec<Measurement>> {
    let dir = ctx.tempdir("embedded-kv")?;
    let mut args = ChildArgs {
        phase: ChildPhase::KvLoad,
        dir: dir.path().to_path_buf(),
        keys: ctx.kv_keys,
        duration_secs: ctx.duration.as_secs_f64(),
    };
    let mut out = child_measurements(&args).await.context("KV load phase")?;
    args.phase = ChildPhase::KvReopen;
    out.extend(child_measurements(&args).await.context("KV reopen phase")?);
    Ok(out)
}

/// Child 1: load N keys, measure gets, report RSS after the load.
pub async fn load_phase(dir: PathBuf, keys: u64, duration: Duration) -> anyhow::Result<Vec<Measurement>> {
    anyhow::ensure!(keys > 0, "--kv-keys must be at least 1");
    let baseline = vm_rss_bytes("self")?;
    let engine = EmbeddedEngine::open(&dir)?;
    let bucket = BucketName::new(BUCKET)?;
    let mut config = BucketConfig::new(bucket.clone());
    config.sync = SyncPolicy::Interval { ms: 100 };
    engine.create_bucket(config).await?;
    let peer = "finmesh-embedded";
    let mut out = Vec::new();

    // Put every key once, from CONCURRENCY tasks awaiting their puts.
    let started = Instant::now();
    let mut handles = Vec::new();
    for task in 0..CONCURRENCY as u64 {
        let (engine, bucket) = (engine.clone(), bucket.clone());
        handles.push(tokio::spawn(async move {
            let mut sample = Sample::new();
            let mut i = task;
            while i < keys {
                let key = Key::new(key_name(i))?;
                let t = Instant::now();
                engine.kv_put(&bucket, &key, value_for(i)).await?;
                sample.record(t.elapsed());
                sample.msgs += 1;
                i += CONCURRENCY as u64;
            }
            anyhow::Ok(sample)
        }));
    }
    let mut put = Sample { hist: new_histogram(), ..Sample::new() };
    for h in handles {
        let s = h.await.context("put task panicked")??;
        put.msgs += s.msgs;
        put.hist.add(&s.hist)?;
    }
    put.elapsed = started.elapsed();
    out.push(
        Measurement::rate(
            "embedded.kv.put.16-tasks.interval",
            peer,
            &format!("KV put 256 B, {CONCURRENCY} tasks awaiting, loading {keys} keys"),
            "puts/s",
            &put,
        )
        .note("sync=interval(100ms) (acked at the OS write)"),
    );
    let loaded = vm_rss_bytes("self")?;
    out.push(
        Measurement::mib("embedded.kv.rss.loaded", peer, &format!("process RSS after loading {keys} keys"), loaded)
            .note(format!("fresh process; {:.1} MiB before opening the engine", mib(baseline))),
    );

    for (id, tasks) in [(GET_1, 1), ("embedded.kv.get.2-tasks", 2)] {
        let (engine2, bucket2) = (engine.clone(), bucket.clone());
        let state = move |task: usize| (engine2.clone(), bucket2.clone(), task as u64);
        let sample = closed_loop(tasks, duration, state, move |st, n| async move {
            let (engine, bucket, task) = &*st;
            let i = KeyPicker::new((task << 40) | n).next_below(keys);
            let entry = engine.kv_get(bucket, &Key::new(key_name(i))?).await?;
            let entry = entry.with_context(|| format!("key {i} missing"))?;
            check_value(i, &entry.value)?;
            Ok(1)
        })
        .await?;
        let what = format!("KV get, {tasks} task{}, random keys of {keys}", if tasks == 1 { "" } else { "s" });
        out.push(Measurement::rate(id, peer, &what, "gets/s", &sample));
    }

    // The default policy: puts acked after their (shared) fsync.
    let always = BucketName::new(BUCKET_ALWAYS)?;
    engine.create_bucket(BucketConfig::new(always.clone())).await?;
    let engine2 = engine.clone();
    let state = move |task: usize| (engine2.clone(), always.clone(), task as u64);
    let sample = closed_loop(CONCURRENCY, duration, state, move |st, n| async move {
        let (engine, bucket, task) = &*st;
        let i = (n * CONCURRENCY as u64 + task) % keys;
        engine.kv_put(bucket, &Key::new(key_name(i))?, value_for(i)).await?;
        Ok(1)
    })
    .await?;
    out.push(
        Measurement::rate(
            "embedded.kv.put.16-tasks",
            peer,
            &format!("KV put 256 B, {CONCURRENCY} tasks awaiting, keys of {keys}"),
            "puts/s",
            &sample,
        )
        .note("sync=always, the default (acked after the fsync)"),
    );
    engine.close().await?;
    Ok(out)
}

/// Child 2: reopen the loaded directory, report RSS and the time to open.
pub async fn reopen_phase(dir: PathBuf, keys: u64) -> anyhow::Result<Vec<Measurement>> {
    let baseline = vm_rss_bytes("self")?;
    let started = Instant::now();
    let engine = EmbeddedEngine::open(&dir)?;
    let open_time = started.elapsed();
    let reopened = vm_rss_bytes("self")?;
    let bucket = BucketName::new(BUCKET)?;
    let mut picker = KeyPicker::new(42);
    for _ in 0..REOPEN_GETS.min(keys) {
        let i = picker.next_below(keys);
        let entry = engine.kv_get(&bucket, &Key::new(key_name(i))?).await?;
        check_value(i, &entry.with_context(|| format!("key {i} missing after reopen"))?.value)?;
    }
    let after_gets = vm_rss_bytes("self")?;
    engine.close().await?;
    Ok(vec![
        Measurement::mib(
            "embedded.kv.rss.reopened",
            "finmesh-embedded",
            &format!("process RSS after reopening {keys} keys"),
            reopened,
        )
        .note(format!(
            "fresh process ({:.1} MiB before open); open took {} ms; {:.1} MiB after {} random gets",
            mib(baseline),
            open_time.as_millis(),
            mib(after_gets),
            REOPEN_GETS.min(keys)
        )),
    ])
}

fn mib(bytes: u64) -> f64 {
    bytes as f64 / (1024.0 * 1024.0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn values_identify_their_key() {
        let v = value_for(12345);
        assert_eq!(v.len(), KV_VALUE);
        check_value(12345, &v).unwrap();
        assert!(check_value(12346, &v).is_err());
        assert!(check_value(12345, &v[..100]).is_err());
        assert_eq!(key_name(7), "k0000000007");
    }
}
