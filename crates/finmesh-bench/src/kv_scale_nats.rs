//! `kv-scale-nats`: random keys at scale on the NATS engine, over HTTP:
//! `kv-scale` (see [`super::kv_scale`]) on a 3-node nats-server cluster
//! from the test kit, bucket `bench` with 3 replicas.
//!
//! 1. **Load**: the bucket is created by the NATS engine (a standard NATS
//!    KV bucket, history 1, R3); `--scale-keys` keys of `--value-bytes`
//!    bytes, named and valued as `kv-scale` does, are published to
//!    `$KV.bench.<key>` by raw async-nats JetStream publishes from
//!    [`LOADERS`] tasks: each sends [`LOAD_BATCH`] publishes without
//!    waiting, then awaits their acks (latency per batch). Report keys/s,
//!    the three store directories' size and the servers' memory (`/varz`).
//! 2. **Serve**: `finmesh serve --engine nats` on the first node, then the
//!    same GET phase as `kv-scale` ([`super::kv_scale::get_phase`]): one
//!    key and random keys with wrk, the ratio random / single (target ≥
//!    0.80), p99 (target < 2 ms), the node's RSS.
//!
//! Not part of a default run: select it with `--scenario kv-scale-nats`.

use std::time::Instant;

use anyhow::Context as _;
use async_nats::jetstream;
use finmesh_core::{BucketConfig, BucketName, KvEngine};
use finmesh_nats::{NatsEngine, NatsEngineOptions};

use super::BenchContext;
use super::embedded_kv::key_name;
use super::gateway::BUCKET;
use super::kv_scale::{GetIds, LOAD_BATCH, LOADERS, disk_bytes, get_phase, scale_value};
use super::measure::{Measurement, Sample};
use super::nats_engine::{Topology, deploy};
use super::node::{Node, NodeOptions};
use super::tools::{WRK_ENV, find_tool};

/// Ids (the ratio refers to them).
pub const LOAD: &str = "kv-scale-nats.load";
pub const DISK: &str = "kv-scale-nats.disk";
pub const SERVER_MEM: &str = "kv-scale-nats.nats-server.mem";
pub const RSS: &str = "kv-scale-nats.rss.serving";
pub const SINGLE: &str = "kv-scale-nats.get.single-key";
pub const RANDOM: &str = "kv-scale-nats.get.random-keys";

/// Publish keys `from..to` and wait for every ack.
async fn publish_range(js: &jetstream::Context, from: u64, to: u64, value_bytes: usize) -> anyhow::Result<()> {
    let mut acks = Vec::with_capacity((to - from) as usize);
    for i in from..to {
        let subject = format!("$KV.{BUCKET}.{}", key_name(i));
        acks.push(js.publish(subject, scale_value(i, value_bytes)).await.context("publishing a key")?);
    }
    let acks = acks.into_iter().map(std::future::IntoFuture::into_future);
    for ack in futures::future::try_join_all(acks).await.context("a publish was not acknowledged")? {
        anyhow::ensure!(!ack.duplicate, "a key was taken for a duplicate");
    }
    Ok(())
}

/// Put `keys` keys from [`LOADERS`] tasks; the sample's latency is per batch.
async fn load(js: &jetstream::Context, keys: u64, value_bytes: usize) -> anyhow::Result<Sample> {
    let js = js.clone();
    super::kv_scale::load_ranges(keys, move |from, to| {
        let js = js.clone();
        async move {
            let t = Instant::now();
            publish_range(&js, from, to, value_bytes).await?;
            Ok(t.elapsed())
        }
    })
    .await
}

/// The `mem` figure of a nats-server's `/varz` (its resident memory).
async fn server_mem(monitoring_url: &str) -> anyhow::Result<u64> {
    let varz: serde_json::Value =
        reqwest::get(format!("{monitoring_url}/varz")).await?.error_for_status()?.json().await?;
    varz["mem"].as_u64().context("/varz has no `mem`")
}

/// Run the scenario (see the module doc).
pub async fn run(ctx: &BenchContext) -> anyhow::Result<Vec<Measurement>> {
    let (keys, value_bytes) = (ctx.scale_keys, ctx.value_bytes);
    anyhow::ensure!(keys > 0, "--scale-keys must be at least 1");
    anyhow::ensure!(value_bytes >= 8, "--value-bytes must be at least 8 (the value starts with its key's index)");
    find_tool("wrk", WRK_ENV, "wrk")?;
    let topology = Topology::R3;
    let d = deploy(ctx, topology, false).await?;
    let engine = NatsEngine::connect(NatsEngineOptions::new(d.url.clone())).await?;
    let bucket = BucketName::new(BUCKET)?;
    engine.create_bucket(BucketConfig { replicas: topology.replicas(), ..BucketConfig::new(bucket) }).await?;
    engine.close().await?;
    let js = jetstream::new(async_nats::connect(&d.url).await?);
    let loaded = load(&js, keys, value_bytes).await.context("loading the keys")?;
    let cluster = d.cluster().context("a 3-node deployment has a cluster")?;
    let mut disk = 0;
    let mut mem = 0;
    for node in cluster.nodes() {
        disk += disk_bytes(node.store_dir())?;
        mem += server_mem(&node.monitoring_url()).await.context("reading a server's /varz")?;
    }
    let note = format!("nats-server {}, {}", d.version, topology.describe());
    let mut out = vec![
        Measurement::rate(
            LOAD,
            "nats-server",
            &format!(
                "load {keys} keys × {value_bytes} B: async JetStream publishes, batches of {LOAD_BATCH} acks \
                 awaited, from {LOADERS} tasks"
            ),
            "keys/s",
            &loaded,
        )
        .note(format!("{note}; latency per batch")),
        Measurement::mib(DISK, "nats-server", &format!("3 store directories after loading {keys} keys"), disk)
            .note(format!("{:.0} bytes per key (3 replicas)", disk as f64 / keys as f64)),
        Measurement::mib(SERVER_MEM, "nats-server", &format!("3 servers' memory (/varz mem) with {keys} keys"), mem)
            .note(note.as_str()),
    ];
    let dir = ctx.tempdir("kv-scale-nats")?;
    let node = Node::start(dir.path(), &NodeOptions { nats_url: Some(d.url.clone()), tls: None }).await?;
    let ids = GetIds { single: SINGLE, random: RANDOM, rss: RSS };
    out.extend(get_phase(ctx, node, dir.path(), keys, value_bytes, &ids).await?);
    Ok(out)
}
