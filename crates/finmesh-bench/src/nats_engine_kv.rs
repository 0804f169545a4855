//! KV through the NATS engine next to raw async-nats KV, on the same
//! bucket of the same deployment (see [`super::nats_engine`] for the
//! deployments and ids).
//!
//! One bucket per deployment (history 1, R1 or R3), created by the engine:
//! a standard NATS KV bucket, which async-nats opens as any KV client would
//! (direct gets, as the bucket allows them). The engine writes and reads
//! keys `e.<key>`, the raw client `r.<key>`, so both load fresh keys and
//! hit the same stream leader:
//! - `kv.put.16-tasks`: load `--nats-kv-keys` keys from 16 tasks, each
//!   awaiting its put (the embedded load);
//! - `kv.get.1-task`, `kv.get.2-tasks`: random gets of loaded keys, every
//!   value checked (the embedded gets).
//!
//! The embedded memory figures have no counterpart here: the engine keeps
//! no data, the server's RSS is `nats-kv`'s figure.

use std::time::Instant;

use anyhow::Context as _;
use async_nats::jetstream::{self, kv};
use finmesh_core::{BucketConfig, BucketName, Key, KvEngine};
use finmesh_nats::NatsEngine;

use super::embedded_kv::{check_value, key_name, value_for};
use super::measure::{KeyPicker, Measurement, Sample, closed_loop, new_histogram};
use super::nats_engine::{ENGINE_PEER, RAW_PEER, TOPOLOGIES, clients, deploy, engine_id, raw_id};
use super::{BenchContext, CONCURRENCY};

/// The KV operations, as they appear in ids.
pub const OPS: [&str; 3] = ["kv.put.16-tasks", "kv.get.1-task", "kv.get.2-tasks"];
const BUCKET: &str = "bench";

/// Run the KV scenarios on both deployments.
pub async fn run(ctx: &BenchContext) -> anyhow::Result<Vec<Measurement>> {
    let keys = ctx.nats_kv_keys;
    anyhow::ensure!(keys > 0, "--nats-kv-keys must be at least 1");
    let mut out = Vec::new();
    for topology in TOPOLOGIES {
        let d = deploy(ctx, topology, false).await?;
        let (engine, raw) = clients(&d, false).await?;
        let bucket = BucketName::new(BUCKET)?;
        let config = BucketConfig { replicas: topology.replicas(), ..BucketConfig::new(bucket.clone()) };
        engine.create_bucket(config).await?;
        let store = jetstream::new(raw).get_key_value(BUCKET).await.context("opening the bucket with async-nats")?;
        let note = format!("nats-server {}, {}, {keys} keys", d.version, topology.describe());
        let pair = |op: &str, what: String, unit: &str, e: &Sample, r: &Sample| {
            [
                Measurement::rate(&engine_id(topology, op), ENGINE_PEER, &format!("engine {what}"), unit, e)
                    .note(note.clone()),
                Measurement::rate(&raw_id(topology, op), RAW_PEER, &format!("raw async-nats {what}"), unit, r)
                    .note(note.clone()),
            ]
        };

        // The engine first in odd runs, raw first in even runs.
        let raw_first = ctx.run.is_multiple_of(2);
        let raw_load = || {
            load(keys, |i| {
                let store = store.clone();
                async move {
                    store.put(format!("r.{}", key_name(i)), value_for(i)).await?;
                    Ok(())
                }
            })
        };
        let early = if raw_first { Some(raw_load().await?) } else { None };
        let e = load(keys, |i| {
            let (engine, bucket) = (engine.clone(), bucket.clone());
            async move {
                engine.kv_put(&bucket, &Key::new(format!("e.{}", key_name(i)))?, value_for(i)).await?;
                Ok(())
            }
        })
        .await?;
        let r = match early {
            Some(r) => r,
            None => raw_load().await?,
        };
        let what = format!("KV put 256 B, {CONCURRENCY} tasks awaiting, loading {keys} keys");
        out.extend(pair(OPS[0], what, "puts/s", &e, &r));

        for (op, tasks) in [(OPS[1], 1), (OPS[2], 2)] {
            let early =
                if raw_first { Some(gets(ctx, &engine, &bucket, &store, tasks, keys, false).await?) } else { None };
            let e = gets(ctx, &engine, &bucket, &store, tasks, keys, true).await?;
            let r = match early {
                Some(r) => r,
                None => gets(ctx, &engine, &bucket, &store, tasks, keys, false).await?,
            };
            let what = format!("KV get, {tasks} task{}, random keys of {keys}", if tasks == 1 { "" } else { "s" });
            out.extend(pair(op, what, "gets/s", &e, &r));
        }
        engine.close().await?;
    }
    Ok(out)
}

/// Put keys `0..keys` from [`CONCURRENCY`] tasks, each awaiting its put.
async fn load<F, Fut>(keys: u64, put: F) -> anyhow::Result<Sample>
where
    F: Fn(u64) -> Fut,
    Fut: Future<Output = anyhow::Result<()>> + Send + 'static,
{
    let started = Instant::now();
    let mut handles = Vec::new();
    for task in 0..CONCURRENCY as u64 {
        let puts: Vec<Fut> = (task..keys).step_by(CONCURRENCY).map(&put).collect();
        handles.push(tokio::spawn(async move {
            let mut sample = Sample::new();
            for p in puts {
                let t = Instant::now();
                p.await?;
                sample.record(t.elapsed());
                sample.msgs += 1;
            }
            anyhow::Ok(sample)
        }));
    }
    let mut total = Sample { hist: new_histogram(), ..Sample::new() };
    for h in handles {
        let s = h.await.context("put task panicked")??;
        total.msgs += s.msgs;
        total.hist.add(&s.hist)?;
    }
    total.elapsed = started.elapsed();
    anyhow::ensure!(total.msgs == keys, "{} of {keys} puts acked", total.msgs);
    Ok(total)
}

/// Random checked gets from `tasks` tasks, through the engine or raw.
async fn gets(
    ctx: &BenchContext,
    engine: &NatsEngine,
    bucket: &BucketName,
    store: &kv::Store,
    tasks: usize,
    keys: u64,
    through_engine: bool,
) -> anyhow::Result<Sample> {
    let (engine, bucket, store) = (engine.clone(), bucket.clone(), store.clone());
    let state = move |task: usize| (engine.clone(), bucket.clone(), store.clone(), task as u64);
    closed_loop(tasks, ctx.duration, state, move |st, n| async move {
        let (engine, bucket, store, task) = &*st;
        let i = KeyPicker::new((task << 40) | n).next_below(keys);
        let value = if through_engine {
            let entry = engine.kv_get(bucket, &Key::new(format!("e.{}", key_name(i)))?).await?;
            entry.with_context(|| format!("key {i} missing"))?.value
        } else {
            store.get(format!("r.{}", key_name(i))).await?.with_context(|| format!("key {i} missing"))?
        };
        check_value(i, &value)?;
        Ok(1)
    })
    .await
}
