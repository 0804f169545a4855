//! `kv-scale`: random keys at scale on the embedded engine, over HTTP.
//!
//! 1. **Load**: open the embedded engine on the node's data directory and
//!    put `--scale-keys` keys (`k0000000000`…) of `--value-bytes` bytes into
//!    bucket `bench` (default config: `sync = always`) with
//!    `EmbeddedEngine::kv_put_batch`, batches of [`LOAD_BATCH`] from
//!    [`LOADERS`] tasks; report keys/s (latency per batch) and the data
//!    directory's size on disk after a clean close.
//! 2. **Serve**: start `finmesh serve` on that directory (auth on, as in
//!    `gateway-kv`), check a few keys, then run wrk twice in the same
//!    session: every request on a key picked at random by a Lua script
//!    ([`lua_script`]), and every request on one key (the single-key
//!    figure) through the same script with one key, so that wrk's own cost
//!    per request (it shares the 2 cores with the node) is the same in
//!    both; wrk fails the run on any non-2xx answer (a missing key is a
//!    404); both with [`SCALE_CONNECTIONS`] connections.
//!    The order swaps between odd and even runs.
//! 3. Report the node's resident set (VmRSS) after the random run and the
//!    ratio random / single req/s (target ≥ 0.80; p99 target < 2 ms; RSS
//!    target ≤ 2 GiB at 10M keys).
//!
//! Not part of a default run (it writes the whole bucket to disk): select
//! it with `--scenario kv-scale`.

use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::Context as _;
use bytes::Bytes;
use finmesh_core::{BucketConfig, BucketName, Key, KvEngine};
use finmesh_embedded::EmbeddedEngine;

use super::BenchContext;
use super::embedded_kv::key_name;
use super::gateway::{BUCKET, WRK_THREADS};
use super::measure::{Measurement, Sample, vm_rss_bytes, warmup_for};
use super::node::{Node, NodeOptions, expect_ok, http_client};
use super::tools::{WRK_ENV, WrkResult, WrkRun, find_tool, run_wrk};

/// wrk connections: fewer than `gateway-kv`'s 64, which saturate two
/// cores so that queueing alone puts p99 above the 2 ms target; 16 keep
/// the node busy while measuring the latency of a get.
pub const SCALE_CONNECTIONS: usize = 16;

/// Keys per `kv_put_batch` of the load.
pub const LOAD_BATCH: u64 = 1000;
/// Concurrent loading tasks.
pub const LOADERS: usize = 4;

/// Ids (the ratio refers to them).
pub const LOAD: &str = "kv-scale.load";
pub const DISK: &str = "kv-scale.disk";
pub const RSS: &str = "kv-scale.rss.serving";
pub const SINGLE: &str = "kv-scale.get.single-key";
pub const RANDOM: &str = "kv-scale.get.random-keys";

/// The value of key `i`, `len` bytes: its index (u64 BE), then bytes
/// that do not compress (a splitmix64 stream from the index), as the
/// ciphertexts of an encrypted registry would not, so the disk figure is
/// what real values cost.
pub fn scale_value(i: u64, len: usize) -> Bytes {
    let mut v = Vec::with_capacity(len.max(8));
    v.extend_from_slice(&i.to_be_bytes());
    let mut state = i;
    while v.len() < len {
        state = state.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = state;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        let bytes = (z ^ (z >> 31)).to_le_bytes();
        let take = (len - v.len()).min(8);
        v.extend_from_slice(&bytes[..take]);
    }
    Bytes::from(v)
}

/// The wrk script that GETs a random one of `keys` keys of `bucket` per
/// request, with the headers given on wrk's command line. Each wrk thread
/// seeds its own generator from the clock and its number.
pub fn lua_script(bucket: &str, keys: u64) -> String {
    format!(
        r#"-- finmesh-bench kv-scale: GET a random key of {keys}
local keys = {keys}
local threads = 0
function setup(thread)
  threads = threads + 1
  thread:set("thread_number", threads)
end
function init(args)
  math.randomseed(os.time() * 1000 + thread_number)
end
function request()
  local i = math.random(0, keys - 1)
  return wrk.format(nil, string.format("/v1/kv/{bucket}/k%010d", i))
end
"#
    )
}

/// Bytes of every file under `dir`.
pub fn disk_bytes(dir: &Path) -> anyhow::Result<u64> {
    let mut total = 0;
    for entry in std::fs::read_dir(dir).with_context(|| format!("reading {}", dir.display()))? {
        let entry = entry?;
        let meta = entry.metadata()?;
        total += if meta.is_dir() { disk_bytes(&entry.path())? } else { meta.len() };
    }
    Ok(total)
}

/// Run `put(from, to)` over keys `0..n` in ranges of [`LOAD_BATCH`] from
/// [`LOADERS`] tasks. `put` returns how long its write took (preparing the
/// batch left out), recorded as the batch's latency; the sample's rate
/// covers the whole load.
pub async fn load_ranges<F, Fut>(n: u64, put: F) -> anyhow::Result<Sample>
where
    F: Fn(u64, u64) -> Fut + Clone + Send + 'static,
    Fut: std::future::Future<Output = anyhow::Result<Duration>> + Send,
{
    let next = Arc::new(AtomicU64::new(0));
    let started = Instant::now();
    let mut tasks = Vec::new();
    for _ in 0..LOADERS {
        let (put, next) = (put.clone(), next.clone());
        tasks.push(tokio::spawn(async move {
            let mut sample = Sample::new();
            loop {
                let from = next.fetch_add(LOAD_BATCH, Ordering::Relaxed);
                if from >= n {
                    return anyhow::Ok(sample);
                }
                sample.record(put(from, (from + LOAD_BATCH).min(n)).await?);
            }
        }));
    }
    let mut total = Sample::new();
    for t in tasks {
        let s = t.await.context("a loading task panicked")??;
        total.hist.add(&s.hist).context("merging histograms")?;
    }
    total.elapsed = started.elapsed();
    total.msgs = n;
    Ok(total)
}

/// Put `keys` keys into bucket [`BUCKET`] of a fresh engine in `data`.
async fn load(data: &Path, keys: u64, value_bytes: usize) -> anyhow::Result<Sample> {
    let engine = EmbeddedEngine::open(data)?;
    let bucket = BucketName::new(BUCKET)?;
    engine.create_bucket(BucketConfig::new(bucket.clone())).await?;
    let total = load_ranges(keys, {
        let (engine, bucket) = (engine.clone(), bucket.clone());
        move |from, to| {
            let (engine, bucket) = (engine.clone(), bucket.clone());
            async move {
                let mut entries = Vec::with_capacity((to - from) as usize);
                for i in from..to {
                    entries.push((Key::new(key_name(i))?, scale_value(i, value_bytes)));
                }
                let t = Instant::now();
                let revs = engine.kv_put_batch(&bucket, entries).await?;
                let took = t.elapsed();
                anyhow::ensure!(revs.len() as u64 == to - from, "{} revisions for {} keys", revs.len(), to - from);
                Ok(took)
            }
        }
    })
    .await?;
    engine.close().await?;
    Ok(total)
}

/// Check that key `i` answers its own value over HTTP.
async fn check_key(client: &reqwest::Client, url: &str, token: &str, i: u64, value_bytes: usize) -> anyhow::Result<()> {
    let body =
        expect_ok(client.get(format!("{url}/v1/kv/{BUCKET}/{}", key_name(i))).bearer_auth(token), "get a key").await?;
    anyhow::ensure!(body == scale_value(i, value_bytes), "key {i}: wrong value over HTTP");
    Ok(())
}

/// A warm-up run of wrk, then the measured one.
async fn measure(run: &WrkRun<'_>, duration: Duration) -> anyhow::Result<WrkResult> {
    run_wrk(run, warmup_for(duration)).await.context("wrk warm-up")?;
    run_wrk(run, duration).await
}

/// Run the scenario (see the module doc).
pub async fn run(ctx: &BenchContext) -> anyhow::Result<Vec<Measurement>> {
    let (keys, value_bytes) = (ctx.scale_keys, ctx.value_bytes);
    anyhow::ensure!(keys > 0, "--scale-keys must be at least 1");
    anyhow::ensure!(value_bytes >= 8, "--value-bytes must be at least 8 (the value starts with its key's index)");
    find_tool("wrk", WRK_ENV, "wrk")?;
    let dir = ctx.tempdir("kv-scale")?;
    let data = dir.path().join("data");
    let loaded = load(&data, keys, value_bytes).await.context("loading the keys")?;
    let disk = disk_bytes(&data)?;
    let mut out = vec![
        Measurement::rate(
            LOAD,
            "finmesh-embedded",
            &format!(
                "load {keys} keys × {value_bytes} B: kv_put_batch of {LOAD_BATCH} from {LOADERS} tasks, sync = always"
            ),
            "keys/s",
            &loaded,
        )
        .note("latency per batch (target ≥ 200,000 keys/s)"),
        Measurement::mib(DISK, "finmesh-embedded", &format!("data directory after loading {keys} keys"), disk)
            .note(format!("{:.0} bytes per key", disk as f64 / keys as f64)),
    ];

    let node = Node::start(dir.path(), &NodeOptions::default()).await?;
    let ids = GetIds { single: SINGLE, random: RANDOM, rss: RSS };
    out.extend(get_phase(ctx, node, dir.path(), keys, value_bytes, &ids).await?);
    Ok(out)
}

/// Ids of the GET phase's figures.
pub struct GetIds {
    pub single: &'static str,
    pub random: &'static str,
    pub rss: &'static str,
}

/// The GET phase on a running node whose bucket [`BUCKET`] holds `keys`
/// keys written as `load` writes them: check a few keys, run wrk on one
/// key and on random keys (the order swapping between runs), then stop the
/// node after reading its RSS. `dir` takes the Lua script.
pub async fn get_phase(
    ctx: &BenchContext,
    node: Node,
    dir: &Path,
    keys: u64,
    value_bytes: usize,
    ids: &GetIds,
) -> anyhow::Result<Vec<Measurement>> {
    let wrk = find_tool("wrk", WRK_ENV, "wrk")?;
    let token = node.token.clone().context("finmesh serve printed no admin token")?;
    let client = http_client(None)?;
    for i in [0, keys / 2, keys - 1] {
        check_key(&client, &node.url, &token, i, value_bytes).await?;
    }
    // The single key through the same script (keys = 1: always key 0), so
    // both runs cost wrk the same per request.
    let (script, one_key) = (dir.join("random-keys.lua"), dir.join("one-key.lua"));
    std::fs::write(&script, lua_script(BUCKET, keys))?;
    std::fs::write(&one_key, lua_script(BUCKET, 1))?;
    let headers = [format!("Authorization: Bearer {token}")];
    let url = format!("{}/", node.url);
    let single = WrkRun {
        wrk: &wrk,
        url: &url,
        headers: &headers,
        threads: WRK_THREADS,
        connections: SCALE_CONNECTIONS,
        script: Some(&one_key),
    };
    let random = WrkRun { script: Some(&script), ..single.clone() };
    let (single_result, random_result) = if ctx.run % 2 == 1 {
        let s = measure(&single, ctx.duration).await.context("wrk, single key")?;
        (s, measure(&random, ctx.duration).await.context("wrk, random keys")?)
    } else {
        let r = measure(&random, ctx.duration).await.context("wrk, random keys")?;
        (measure(&single, ctx.duration).await.context("wrk, single key")?, r)
    };
    let rss = vm_rss_bytes(&node.pid().to_string())?;
    node.stop().await?;
    let note =
        format!("wrk -t{WRK_THREADS} -c{SCALE_CONNECTIONS}, HTTP/1.1, bearer token (auth on), p99 target < 2 ms");
    Ok(vec![
        single_result
            .measurement(ids.single, "finmesh-gateway", &format!("KV GET of one key among {keys}, {value_bytes} B"))
            .note(note.as_str()),
        random_result
            .measurement(
                ids.random,
                "finmesh-gateway",
                &format!("KV GET of a random key among {keys}, {value_bytes} B"),
            )
            .note(format!("{note}; keys picked by a wrk Lua script")),
        Measurement::mib(
            ids.rss,
            "finmesh-gateway",
            &format!("finmesh serve RSS after the random GETs, {keys} keys"),
            rss,
        )
        .note("target ≤ 2 GiB at 10M keys"),
    ])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_script_asks_for_keys_named_as_loaded() {
        let script = lua_script("bench", 10_000_000);
        assert!(script.contains("local keys = 10000000"), "{script}");
        assert!(script.contains("\"/v1/kv/bench/k%010d\""), "{script}");
        // The Lua format gives what `key_name` gives.
        assert_eq!(key_name(42), format!("k{:010}", 42));
        let v = scale_value(7, 256);
        assert_eq!((v.len(), &v[..8]), (256, &7u64.to_be_bytes()[..]));
        assert_eq!(scale_value(7, 256), v, "the same key, the same value");
        assert_ne!(scale_value(8, 256)[8..], v[8..]);
        assert_eq!(scale_value(3, 13).len(), 13);
    }

    #[test]
    fn kv_scale_runs_only_when_named() {
        use crate::Scenario;
        assert!(!Scenario::KvScale.selected_by(&[]));
        assert!(!Scenario::KvScale.selected_by(&[Scenario::Gateway]));
        assert!(Scenario::KvScale.selected_by(&[Scenario::KvScale]));
        assert!(Scenario::Fsync.selected_by(&[]));
    }
}
