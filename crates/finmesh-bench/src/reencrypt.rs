//! `reencrypt`: `KeyAdmin::reencrypt` of a whole encrypted bucket on the
//! embedded engine, through library calls (no HTTP, no `finmesh serve`).
//!
//! 1. **Set up** as a node with `[security]` does: a fresh embedded engine
//!    in a temporary directory (default [`EmbeddedOptions`]), a master key
//!    in a file, the key ring in the engine ([`RingStore::open_or_create`]),
//!    the engine wrapped in [`SecureEngine`], and bucket `bench` created
//!    through the wrapper with `encryption = "aes256gcm"` and otherwise the
//!    defaults (history 1, `sync = always`: every write acked after an
//!    fsync).
//! 2. **Load** `--reencrypt-values` values of [`KV_VALUE`] bytes
//!    ([`scale_value`]) under keys `k0000000000`…: each sealed with
//!    [`RingStore::seal_value`] (what the wrapper's `kv_put` stores, bucket
//!    and key bound as associated data) and written with
//!    `EmbeddedEngine::kv_put_batch`, batches of [`LOAD_BATCH`] from
//!    [`LOADERS`] tasks; the wrapper has no batched put, and loading one
//!    value per put would make the set-up longer than the measurement.
//!    Reported as values/s (latency per batch).
//! 3. **Rotate** the encryption key, then time `KeyAdmin::reencrypt` of
//!    the bucket (default options: batches of
//!    [`finmesh_crypto::admin::DEFAULT_REENCRYPT_BATCH`], no rate limit)
//!    until it reports `done`; reported as values/s (latency per batch;
//!    target ≥ 50,000 values/s, issue 18).
//!    Also the CPU time the process, and the engine's writer thread
//!    alone, spent per value during the job (from `/proc/self`, 10 ms
//!    ticks): on a machine shared with other work the rate follows the
//!    CPU this process gets, while these figures do not; the writer is one
//!    thread, so 1 s / its time per value bounds the rate on any machine.
//! 4. **Check**: every value rewritten (none `changed`, `failed` or
//!    `current`), and a sample of keys open through the wrapper to their
//!    plaintext under the new key id.
//!
//! Not part of a default run: select it with `--scenario reencrypt`.

use std::ops::ControlFlow;
use std::path::Path;
use std::sync::Arc;
use std::time::Instant;

use anyhow::Context as _;
use finmesh_core::{BucketConfig, BucketName, Encryption, Engine, Key, KvEngine};
use finmesh_crypto::{
    FileKeyProvider, KeyAdmin, KeyPurpose, ReencryptOptions, RingStore, SecureEngine, key_id_of, keys_bucket_config,
};
use finmesh_embedded::EmbeddedEngine;

use super::embedded_kv::key_name;
use super::kv_scale::{LOAD_BATCH, LOADERS, load_ranges, scale_value};
use super::measure::{Measurement, Sample};
use super::{BenchContext, KV_VALUE};

/// The bucket re-encrypted.
pub const BUCKET: &str = "bench";

/// Ids.
pub const LOAD: &str = "reencrypt.load";
pub const REENCRYPT: &str = "reencrypt.rewrite";
pub const CPU: &str = "reencrypt.cpu.process";
pub const WRITER_CPU: &str = "reencrypt.cpu.writer";

/// Keys checked through the wrapper after the job.
const CHECKED: u64 = 1_000;

/// Seal and put `n` values into `bucket` of `raw` (see the module doc).
async fn load(raw: &EmbeddedEngine, keys: &Arc<RingStore>, bucket: &BucketName, n: u64) -> anyhow::Result<Sample> {
    let (raw, keys, bucket) = (raw.clone(), keys.clone(), bucket.clone());
    load_ranges(n, move |from, to| {
        let (raw, keys, bucket) = (raw.clone(), keys.clone(), bucket.clone());
        async move {
            let mut entries = Vec::with_capacity((to - from) as usize);
            for i in from..to {
                let key = Key::new(key_name(i))?;
                let sealed = keys.seal_value(&bucket, &key, &scale_value(i, KV_VALUE))?;
                entries.push((key, sealed));
            }
            let t = Instant::now();
            raw.kv_put_batch(&bucket, entries).await?;
            Ok(t.elapsed())
        }
    })
    .await
}

/// Run the scenario (see the module doc).
pub async fn run(ctx: &BenchContext) -> anyhow::Result<Vec<Measurement>> {
    let n = ctx.reencrypt_values;
    anyhow::ensure!(n > 0, "--reencrypt-values must be at least 1");
    let dir = ctx.tempdir("reencrypt")?;
    let raw = EmbeddedEngine::open(dir.path().join("data"))?;
    let (secure, admin, keys) = wrap(&raw, dir.path()).await?;
    let bucket = BucketName::new(BUCKET)?;
    let mut config = BucketConfig::new(bucket.clone());
    config.security.encryption = Some(Encryption::Aes256Gcm);
    secure.create_bucket(config).await.context("creating the encrypted bucket")?;

    let loaded = load(&raw, &keys, &bucket, n).await.context("loading the values")?;
    let old = keys.ring().active(KeyPurpose::Encryption).id();
    let new = admin.rotate(KeyPurpose::Encryption).await?.id;
    anyhow::ensure!(new != old, "the rotation kept key {old:?}");

    let mut batches = Sample::new();
    let cpu_before = (cpu_ticks(None)?, cpu_ticks(Some(WRITER_THREAD))?);
    let started = Instant::now();
    let mut last = started;
    let mut on_progress = |_: &finmesh_crypto::ReencryptProgress| {
        batches.record(last.elapsed());
        last = Instant::now();
        ControlFlow::Continue(())
    };
    let progress = admin.reencrypt(&bucket, ReencryptOptions::default(), &mut on_progress).await?;
    batches.record(last.elapsed());
    batches.elapsed = started.elapsed();
    batches.msgs = progress.run.scanned;
    let cpu = (cpu_ticks(None)? - cpu_before.0, cpu_ticks(Some(WRITER_THREAD))? - cpu_before.1);

    let run = progress.run;
    anyhow::ensure!(progress.done, "the job stopped before the end: {progress:?}");
    anyhow::ensure!(
        run.scanned == n && run.rewritten == n && run.changed + run.failed + run.current == 0,
        "expected {n} values rewritten, got {run:?}"
    );
    for i in (0..n).step_by((n / CHECKED).max(1) as usize) {
        let key = Key::new(key_name(i))?;
        let stored = raw.kv_get(&bucket, &key).await?.context("a value went missing")?;
        anyhow::ensure!(key_id_of(&stored.value)? == new, "value {i} is not under the new key");
        let entry = secure.kv_get(&bucket, &key).await?.context("a value went missing")?;
        anyhow::ensure!(entry.value == scale_value(i, KV_VALUE), "value {i} does not open to what was put");
    }
    drop((admin, secure, keys));
    raw.close().await?;

    let what = format!("{n} values × {KV_VALUE} B, encrypted bucket, embedded engine, sync = always");
    Ok(vec![
        Measurement::rate(LOAD, "finmesh-embedded", &format!("load {what}: seal + kv_put_batch"), "values/s", &loaded)
            .note(format!("latency per batch of {LOAD_BATCH}, {LOADERS} tasks")),
        Measurement::rate(REENCRYPT, "finmesh-crypto", &format!("KeyAdmin::reencrypt of {what}"), "values/s", &batches)
            .note("library calls, no HTTP; latency per batch; target ≥ 50,000 values/s"),
        cpu_per_value(CPU, "CPU time of the whole process during the job, per value", cpu.0, n)
            .note("every thread: job, engine writer, fjall flushes and compactions"),
        cpu_per_value(WRITER_CPU, "CPU time of the engine's writer thread during the job, per value", cpu.1, n).note(
            format!(
                "one thread: the job cannot go faster than 1 s / this on one core ({:.0} values/s)",
                n as f64 / (cpu.1 as f64 / TICKS_PER_SEC)
            ),
        ),
    ])
}

/// The embedded engine's writer thread (`std::thread::Builder::name`).
const WRITER_THREAD: &str = "finmesh-writer";
/// `/proc` counts CPU time in ticks of 1/100 s (USER_HZ).
const TICKS_PER_SEC: f64 = 100.0;

/// CPU time (user + system, in ticks) this process has used: all of it,
/// or only that of its live threads named `thread`.
fn cpu_ticks(thread: Option<&str>) -> anyhow::Result<u64> {
    let ticks = |stat: &str| -> anyhow::Result<u64> {
        // Fields after the command, which is in parentheses and may hold spaces.
        let rest = stat.rsplit_once(')').context("a /proc stat line without `)`")?.1;
        let f: Vec<&str> = rest.split_whitespace().collect();
        // utime and stime are fields 14 and 15 of the line, 12 and 13 after `)`.
        Ok(f.get(11).context("short stat line")?.parse::<u64>()?
            + f.get(12).context("short stat line")?.parse::<u64>()?)
    };
    let Some(name) = thread else { return ticks(&std::fs::read_to_string("/proc/self/stat")?) };
    let mut total = 0;
    for task in std::fs::read_dir("/proc/self/task")? {
        let path = task?.path();
        if std::fs::read_to_string(path.join("comm")).is_ok_and(|c| c.trim_end() == name) {
            total += ticks(&std::fs::read_to_string(path.join("stat"))?)?;
        }
    }
    Ok(total)
}

/// A figure of CPU µs per value.
fn cpu_per_value(id: &str, what: &str, ticks: u64, values: u64) -> Measurement {
    Measurement {
        id: id.to_owned(),
        peer: "finmesh-crypto".to_owned(),
        what: what.to_owned(),
        value: ticks as f64 / TICKS_PER_SEC * 1e6 / values as f64,
        unit: "µs CPU/value".to_owned(),
        p50_us: None,
        p99_us: None,
        p999_us: None,
        max_us: None,
        note: None,
    }
}

/// What a node with `[security]` builds on `raw`: a master key in a file
/// under `dir`, the ring in the engine, the wrapper and its key admin.
async fn wrap(raw: &EmbeddedEngine, dir: &Path) -> anyhow::Result<(Arc<SecureEngine>, KeyAdmin, Arc<RingStore>)> {
    let path = dir.join("master.key");
    FileKeyProvider::create(&path)?;
    let provider = FileKeyProvider::new(path);
    let kv: Arc<dyn KvEngine> = Arc::new(raw.clone());
    let keys = Arc::new(RingStore::open_or_create(kv, &provider, keys_bucket_config(1)).await?);
    let inner: Arc<dyn Engine> = Arc::new(raw.clone());
    let secure = Arc::new(SecureEngine::new(inner, keys.clone()));
    Ok((secure.clone(), KeyAdmin::new(secure), keys))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reencrypt_runs_only_when_named() {
        use crate::Scenario;
        assert!(!Scenario::Reencrypt.selected_by(&[]));
        assert!(Scenario::Reencrypt.selected_by(&[Scenario::Reencrypt]));
    }

    #[tokio::test]
    async fn a_small_run_rewrites_every_value() {
        let dir = tempfile::tempdir().unwrap();
        let ctx = BenchContext {
            dir: dir.path().to_owned(),
            duration: std::time::Duration::from_secs(1),
            kv_keys: 0,
            nats_kv_keys: 0,
            scale_keys: 0,
            value_bytes: KV_VALUE,
            reencrypt_values: 1_500,
            mirror_puts: 0,
            consumer_messages: 0,
            idle_subscribers: 0,
            pipeline_rows: 0,
            pipeline_nats_rows: 0,
            feed: crate::fanout::FeedTransport::Upload,
            run: 1,
        };
        let m = run(&ctx).await.unwrap();
        assert_eq!(m.iter().map(|m| m.id.as_str()).collect::<Vec<_>>(), [LOAD, REENCRYPT, CPU, WRITER_CPU]);
        assert!(m[..2].iter().all(|m| m.value > 0.0), "{m:?}");
        assert!(cpu_ticks(None).unwrap() > 0);
    }
}
