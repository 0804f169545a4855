//! The NATS engine (`finmesh-nats`) next to raw async-nats doing the same
//! operation on the same server in the same run: the engine's overhead.
//!
//! Every embedded scenario runs here twice per deployment, once through
//! [`NatsEngine`] (the `StreamEngine`/`KvEngine` traits, as the gateway
//! calls them) and once with async-nats directly (the floor), back to back
//! on the **same** stream or bucket, so both hit the same stream leader
//! (the engine first in odd runs, raw first in even runs, so neither side
//! always gets the fresher stream or the quieter moment):
//! - deployments: a single `nats-server` (R1) and a 3-node cluster with R3
//!   streams and buckets ([`Topology`]); each client connects to the first
//!   node's URL only, so both take the same path to the leader;
//! - publish ([`run_publish`]), 128 B, for the server's default
//!   `sync_interval` (ack before fsync, like the embedded `interval`) and
//!   for `sync_interval: always` (like the embedded `always`): one publisher
//!   awaiting each ack, 16 tasks awaiting theirs, one publisher with
//!   batches of 100 (engine `publish_batch`; raw: 100 `publish` calls, then
//!   the 100 ack futures; latency per batch);
//! - KV ([`super::nats_engine_kv`]).
//!
//! Ids: `nats-engine.<single|r3>.<op>` (peer `finmesh-nats`) and
//! `nats-raw.<single|r3>.<op>` (peer `async-nats`); [`ratio_pairs`] lists
//! every engine/raw pair the report turns into throughput and p99 ratios.

use anyhow::Context as _;
use async_nats::jetstream::{self, context::PublishAckFuture};
use bytes::Bytes;
use finmesh_core::{OutgoingMessage, StreamConfig, StreamEngine, StreamName, Subject, SubjectPattern, SyncPolicy};
use finmesh_nats::{NatsEngine, NatsEngineOptions};
use finmesh_testkit::{NatsCluster, NatsServer, NatsServerBuilder};

use super::measure::{Measurement, Sample, closed_loop};
use super::{BenchContext, CONCURRENCY, PUBLISH_PAYLOAD};

/// Messages per batch in the batch scenarios.
pub const BATCH: usize = 100;
/// Peer name of the engine's figures.
pub const ENGINE_PEER: &str = "finmesh-nats";
/// Peer name of the raw client's figures.
pub const RAW_PEER: &str = "async-nats";

/// Where the servers run.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Topology {
    /// One server, R1.
    Single,
    /// Three routed nodes, R3.
    R3,
}

/// Both deployments, in the order they run.
pub const TOPOLOGIES: [Topology; 2] = [Topology::Single, Topology::R3];

impl Topology {
    /// The token in ids.
    pub fn token(self) -> &'static str {
        match self {
            Topology::Single => "single",
            Topology::R3 => "r3",
        }
    }

    /// Replicas of every stream and bucket.
    pub fn replicas(self) -> u8 {
        match self {
            Topology::Single => 1,
            Topology::R3 => 3,
        }
    }

    pub fn describe(self) -> &'static str {
        match self {
            Topology::Single => "1 server, R1",
            Topology::R3 => "3-node cluster, R3",
        }
    }
}

/// Publish operations, as `(op, tasks, messages per call)`, per sync policy.
pub fn publish_ops() -> Vec<(String, usize, usize)> {
    let mut ops = Vec::new();
    for policy in ["default", "always"] {
        ops.push((format!("publish.{policy}.1-pub"), 1, 1));
        ops.push((format!("publish.{policy}.{CONCURRENCY}-pub"), CONCURRENCY, 1));
        ops.push((format!("publish.{policy}.batch-{BATCH}"), 1, BATCH));
    }
    ops
}

/// Id of the engine's figure for `op` on `topology`.
pub fn engine_id(topology: Topology, op: &str) -> String {
    format!("nats-engine.{}.{op}", topology.token())
}

/// Id of the raw client's figure for `op` on `topology`.
pub fn raw_id(topology: Topology, op: &str) -> String {
    format!("nats-raw.{}.{op}", topology.token())
}

/// Every (engine id, raw id) pair, for the ratios.
pub fn ratio_pairs() -> Vec<(String, String)> {
    let ops = publish_ops().into_iter().map(|(op, ..)| op).chain(super::nats_engine_kv::OPS.map(str::to_owned));
    let ops: Vec<String> = ops.collect();
    TOPOLOGIES.iter().flat_map(|t| ops.iter().map(move |op| (engine_id(*t, op), raw_id(*t, op)))).collect()
}

/// Running servers of one deployment; dropped = killed and removed.
pub struct Deployment {
    _single: Option<NatsServer>,
    _cluster: Option<NatsCluster>,
    /// The URL both clients use (the first node's).
    pub url: String,
    /// `nats-server` version, for notes.
    pub version: String,
}

impl Deployment {
    /// The cluster of an R3 deployment.
    pub fn cluster(&self) -> Option<&NatsCluster> {
        self._cluster.as_ref()
    }
}

/// Start `topology`, its store under the benchmark's directory; `always`
/// adds `sync_interval: always`.
pub async fn deploy(ctx: &BenchContext, topology: Topology, always: bool) -> anyhow::Result<Deployment> {
    let mut builder = NatsServerBuilder::default().tmp_in(&ctx.dir);
    if always {
        builder = builder.jetstream_option("sync_interval: always");
    }
    let (single, cluster, url) = match topology {
        Topology::Single => {
            let s = builder.start().await.context("starting nats-server")?;
            let url = s.url();
            (Some(s), None, url)
        }
        Topology::R3 => {
            let c = NatsCluster::start_with(3, builder).await.context("starting a 3-node nats cluster")?;
            let url = c.urls()[0].clone();
            (None, Some(c), url)
        }
    };
    let version = async_nats::connect(&url).await?.server_info().version;
    Ok(Deployment { _single: single, _cluster: cluster, url, version })
}

/// The engine and a raw client, both on `d`'s URL.
pub async fn clients(d: &Deployment, always: bool) -> anyhow::Result<(NatsEngine, async_nats::Client)> {
    let mut options = NatsEngineOptions::new(d.url.clone());
    if always {
        options.server_sync = SyncPolicy::Always;
    }
    let engine = NatsEngine::connect(options).await?;
    let raw = async_nats::connect(&d.url).await?;
    Ok((engine, raw))
}

/// Run the publish scenarios on both deployments.
pub async fn run_publish(ctx: &BenchContext) -> anyhow::Result<Vec<Measurement>> {
    let mut out = Vec::new();
    for topology in TOPOLOGIES {
        for (policy, always) in [("default", false), ("always", true)] {
            let d = deploy(ctx, topology, always).await?;
            let (engine, raw) = clients(&d, always).await?;
            let js = jetstream::new(raw);
            let sync = if always { "sync_interval: always" } else { "default sync_interval (ack before fsync)" };
            let note = format!("nats-server {}, {}, file storage, {sync}", d.version, topology.describe());
            for (op, tasks, batch) in publish_ops().into_iter().filter(|(op, ..)| op.contains(policy)) {
                out.extend(publish_pair(ctx, topology, &engine, &js, &op, tasks, batch, &note).await?);
            }
            engine.close().await?;
        }
    }
    Ok(out)
}

/// The engine, then the raw client, on one fresh stream.
#[allow(clippy::too_many_arguments)]
async fn publish_pair(
    ctx: &BenchContext,
    topology: Topology,
    engine: &NatsEngine,
    js: &jetstream::Context,
    op: &str,
    tasks: usize,
    batch: usize,
    note: &str,
) -> anyhow::Result<Vec<Measurement>> {
    let token = format!("B_{}_{op}", topology.token()).replace(['.', '-'], "_");
    let stream = StreamName::new(&token)?;
    let mut config = StreamConfig::new(stream.clone(), vec![SubjectPattern::new(format!("{token}.>"))?]);
    config.replicas = topology.replicas();
    engine.create_stream(config).await?;
    let subject = Subject::new(format!("{token}.x"))?;
    let payload = Bytes::from(vec![0x5a; PUBLISH_PAYLOAD]);
    let what = match (tasks, batch) {
        (1, 1) => "1 publisher awaiting each ack".to_owned(),
        (n, 1) => format!("{n} tasks awaiting acks, one connection"),
        (_, b) => format!("1 publisher, batches of {b} (latency per batch)"),
    };

    let mut raw_sample = None;
    if ctx.run.is_multiple_of(2) {
        raw_sample = Some(raw_publish_loop(ctx, js, &subject, &payload, tasks, batch).await?);
    }
    let (e, s, p) = (engine.clone(), stream.clone(), payload.clone());
    let sub = subject.clone();
    let state = move |_| (e.clone(), s.clone(), sub.clone(), p.clone());
    let engine_sample = closed_loop(tasks, ctx.duration, state, move |st, _| async move {
        let (engine, stream, subject, payload) = &*st;
        if batch == 1 {
            engine.publish(stream, OutgoingMessage::new(subject.clone(), payload.clone())).await?;
        } else {
            let msgs = (0..batch).map(|_| OutgoingMessage::new(subject.clone(), payload.clone())).collect();
            let acks = engine.publish_batch(stream, msgs).await?;
            anyhow::ensure!(acks.len() == batch, "batch of {batch} got {} acks", acks.len());
        }
        Ok(batch as u64)
    })
    .await?;

    let raw_sample = match raw_sample {
        Some(s) => s,
        None => raw_publish_loop(ctx, js, &subject, &payload, tasks, batch).await?,
    };
    engine.delete_stream(&stream).await?;

    let m = |id: String, peer: &str, via: &str, sample: &Sample| {
        Measurement::rate(&id, peer, &format!("{via} publish 128 B, {what}"), "msgs/s", sample).note(note)
    };
    Ok(vec![
        m(engine_id(topology, op), ENGINE_PEER, "engine", &engine_sample),
        m(raw_id(topology, op), RAW_PEER, "raw async-nats", &raw_sample),
    ])
}

/// The raw side of a publish measurement.
async fn raw_publish_loop(
    ctx: &BenchContext,
    js: &jetstream::Context,
    subject: &Subject,
    payload: &Bytes,
    tasks: usize,
    batch: usize,
) -> anyhow::Result<Sample> {
    let (j, sub, p) = (js.clone(), async_nats::Subject::from(subject.as_str()), payload.clone());
    let state = move |_| (j.clone(), sub.clone(), p.clone());
    closed_loop(tasks, ctx.duration, state, move |st, _| async move {
        let (js, subject, payload) = &*st;
        raw_publish(js, subject, payload, batch).await?;
        Ok(batch as u64)
    })
    .await
}

/// `batch` JetStream publishes, then their acks, oldest first.
async fn raw_publish(
    js: &jetstream::Context,
    subject: &async_nats::Subject,
    payload: &Bytes,
    batch: usize,
) -> anyhow::Result<()> {
    if batch == 1 {
        js.publish(subject.clone(), payload.clone()).await?.await?;
        return Ok(());
    }
    let mut acks: Vec<PublishAckFuture> = Vec::with_capacity(batch);
    for _ in 0..batch {
        acks.push(js.publish(subject.clone(), payload.clone()).await?);
    }
    for ack in acks {
        ack.await?;
    }
    Ok(())
}
