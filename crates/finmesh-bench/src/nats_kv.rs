//! KV on a real nats-server (async-nats directly), for comparison with the
//! embedded engine's KV figures.
//!
//! Fewer keys than the embedded run by default (`--nats-kv-keys`, 50,000):
//! loading a million keys through one connection takes long and the figures
//! that matter here (per-get latency, pipelined put rate) do not depend on
//! the count at this scale. The output says how many keys were used.
//! - put: one publisher to `$KV.bench.<key>` with up to 1000 acks in flight;
//! - get: one connection, one get at a time, random keys (direct get, as
//!   async-nats uses for buckets it creates), every value checked;
//! - memory: the nats-server process's VmRSS after the load.

use finmesh_testkit::ManagedServer;
use std::time::Instant;

use anyhow::Context as _;
use async_nats::jetstream::{self, kv};

use super::embedded_kv::{check_value, key_name, value_for};
use super::measure::{KeyPicker, Measurement, closed_loop, vm_rss_bytes};
use super::nats_publish::pipelined;
use super::{BenchContext, start_nats};

/// Id of the get measurement (ratios refer to it).
pub const GET_1: &str = "nats.kv.get.1-conn";

/// Load the bucket, measure gets.
pub async fn run(ctx: &BenchContext) -> anyhow::Result<Vec<Measurement>> {
    let keys = ctx.nats_kv_keys;
    anyhow::ensure!(keys > 0, "--nats-kv-keys must be at least 1");
    let server = start_nats(ctx).await?;
    let client = async_nats::connect(server.url()).await?;
    let version = client.server_info().version;
    let js = jetstream::new(client);
    let store = js
        .create_key_value(kv::Config {
            bucket: "bench".into(),
            history: 1,
            storage: jetstream::stream::StorageType::File,
            ..Default::default()
        })
        .await
        .context("creating the NATS KV bucket")?;
    let peer = "nats-server";
    let note = format!("nats-server {version}, {keys} keys, file storage");
    let mut out = Vec::new();

    let put = pipelined(&js, Instant::now(), |i| {
        (i < keys).then(|| (async_nats::Subject::from(format!("$KV.bench.{}", key_name(i))), value_for(i)))
    })
    .await?;
    anyhow::ensure!(put.msgs == keys, "{} of {keys} puts acked", put.msgs);
    out.push(
        Measurement::rate(
            "nats.kv.put.async-1000",
            peer,
            &format!("KV put 256 B, ≤1000 in flight, loading {keys} keys"),
            "puts/s",
            &put,
        )
        .note(note.clone()),
    );
    if let Some(pid) = server.pid() {
        out.push(
            Measurement::mib(
                "nats.kv.rss.loaded",
                peer,
                &format!("nats-server RSS after loading {keys} keys"),
                vm_rss_bytes(&pid.to_string())?,
            )
            .note(note.clone()),
        );
    }

    let sample = closed_loop(
        1,
        ctx.duration,
        move |_| store.clone(),
        move |store, n| async move {
            let i = KeyPicker::new(n).next_below(keys);
            let value = store.get(key_name(i)).await?.with_context(|| format!("key {i} missing"))?;
            check_value(i, &value)?;
            Ok(1)
        },
    )
    .await?;
    out.push(
        Measurement::rate(
            GET_1,
            peer,
            &format!("KV get, 1 connection sequential, random keys of {keys}"),
            "gets/s",
            &sample,
        )
        .note(note),
    );
    Ok(out)
}
