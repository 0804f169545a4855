//! Hub → leaf mirror propagation latency, on real nats-server processes
//! (async-nats directly, no finmesh code in the path).
//!
//! Set-up: the test kit's [`HubAndLeaves`] — a 3-node hub in JetStream
//! domain `hub` with an R3 KV bucket, and two leaves, `leaf1` linked
//! directly on loopback and `leaf2` through a [`finmesh_testkit::DelayProxy`]
//! adding [`WAN_DELAY`] one way. Each leaf holds a mirror of the bucket
//! (`mirror: KV_<bucket>` with `external: $JS.hub.API`, `mirror_direct`).
//!
//! Measurement, one leaf at a time: `--mirror-puts` puts of 256 B on the
//! hub, paced every [`PUT_INTERVAL`] (open loop, so a slow put does not
//! hide the latency of the next), each value carrying its put's index. An
//! ordered push consumer on the leaf's mirror stream sees each one arrive;
//! a put's latency is from just before `put` was called on the hub to its
//! arrival on the leaf. The figure's value is the p99 in µs; p50, p99.9 and
//! the max are reported beside it.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::Context as _;
use async_nats::jetstream::{self, consumer, kv, stream};
use bytes::{BufMut as _, Bytes, BytesMut};
use finmesh_testkit::{HUB_DOMAIN, HubAndLeaves, NatsServer, until_placed, until_routed};
use futures::StreamExt as _;

use super::measure::{Measurement, Sample};
use super::{BenchContext, KV_VALUE};

/// Leaf linked on loopback.
pub const LOOPBACK: &str = "nats.mirror.hub-to-leaf.loopback";
/// Leaf linked through the delaying proxy.
pub const PROXIED: &str = "nats.mirror.hub-to-leaf.proxy-40ms";

/// One-way delay of the proxied leaf's link.
pub const WAN_DELAY: Duration = Duration::from_millis(40);
/// Time between two puts on the hub.
pub const PUT_INTERVAL: Duration = Duration::from_millis(2);
/// Keys the puts cycle through.
const KEYS: u64 = 100;
/// How long to wait for every put to show up on the leaf.
const OBSERVE_DEADLINE: Duration = Duration::from_secs(60);
/// How long the hub may refuse to place the bucket (see [`until_placed`]).
const PLACEMENT_TIMEOUT: Duration = Duration::from_secs(30);
const BUCKET: &str = "mirror_bench";
const PEER: &str = "nats-server";

/// Run the mirror propagation scenario.
pub async fn run(ctx: &BenchContext) -> anyhow::Result<Vec<Measurement>> {
    let puts = ctx.mirror_puts;
    anyhow::ensure!(puts > 0, "--mirror-puts must be at least 1");
    let sites = HubAndLeaves::builder()
        .template(NatsServer::builder().tmp_in(&ctx.dir))
        .direct_leaf()
        .proxied_leaf(WAN_DELAY)
        .start()
        .await
        .context("starting a 3-node hub and two leaves")?;
    let client = async_nats::connect(sites.hub().urls()[0].as_str()).await?;
    let version = client.server_info().version;
    let hub = jetstream::new(client);
    let config = kv::Config { bucket: BUCKET.into(), history: 1, num_replicas: 3, ..Default::default() };
    let origin = until_placed(PLACEMENT_TIMEOUT, || hub.create_key_value(config.clone()))
        .await
        .context("creating the hub's R3 bucket")?;

    let mut out = Vec::new();
    for (leaf, id, link) in [(0, LOOPBACK, "loopback"), (1, PROXIED, "a 40 ms one-way proxy")] {
        let leaf_client = async_nats::connect(sites.leaf(leaf).url()).await?;
        let sample = measure(&origin, leaf_client, leaf, puts).await.with_context(|| format!("leaf over {link}"))?;
        let what = format!("KV put on the R3 hub → seen on the leaf's mirror over {link}, {puts} puts");
        let note = format!(
            "nats-server {version}; value = p99 µs; max {:.0} µs; a put every {} ms",
            sample.hist.max() as f64 / 1000.0,
            PUT_INTERVAL.as_millis()
        );
        out.push(Measurement::latency(id, PEER, &what, &sample).note(note));
    }
    Ok(out)
}

/// Mirror the hub bucket on leaf `leaf`, then time `puts` puts to it.
async fn measure(
    origin: &kv::Store,
    leaf_client: async_nats::Client,
    leaf: usize,
    puts: u64,
) -> anyhow::Result<Sample> {
    let js = jetstream::new(leaf_client.clone());
    let mirror_bucket = format!("{BUCKET}_leaf{}", leaf + 1);
    let external = stream::External { api_prefix: format!("$JS.{HUB_DOMAIN}.API"), delivery_prefix: None };
    js.create_key_value(kv::Config {
        bucket: mirror_bucket.clone(),
        history: 1,
        mirror: Some(stream::Source { name: format!("KV_{BUCKET}"), external: Some(external), ..Default::default() }),
        mirror_direct: true,
        ..Default::default()
    })
    .await
    .context("creating the leaf's mirror")?;
    let mirror = js.get_stream(format!("KV_{mirror_bucket}")).await?;
    let mut arrivals = mirror
        .create_consumer(consumer::push::OrderedConfig {
            deliver_subject: leaf_client.new_inbox(),
            deliver_policy: consumer::DeliverPolicy::New,
            filter_subject: format!("$KV.{BUCKET}.>"),
            ..Default::default()
        })
        .await
        .context("creating an ordered consumer on the mirror")?
        .messages()
        .await?;

    // Warm-up: the mirror is live once a fresh put arrives through it. The
    // bucket is new, so the hub server may not know its leader's subjects yet.
    until_routed(PLACEMENT_TIMEOUT, || origin.put("warmup", value(u64::MAX))).await.context("the warm-up put")?;
    loop {
        let msg = tokio::time::timeout(OBSERVE_DEADLINE, arrivals.next())
            .await
            .context("the mirror did not start within the deadline")?
            .context("the ordered consumer ended")??;
        if index_of(&msg.payload) == Some(u64::MAX) {
            break;
        }
    }

    let base = Instant::now();
    let sent: Arc<Vec<AtomicU64>> = Arc::new((0..puts).map(|_| AtomicU64::new(0)).collect());
    let putter = {
        let (origin, sent) = (origin.clone(), sent.clone());
        tokio::spawn(async move {
            for i in 0..puts {
                let at = base + PUT_INTERVAL * u32::try_from(i).unwrap_or(u32::MAX);
                tokio::time::sleep_until(at.into()).await;
                sent[i as usize].store(nanos_since(base), Ordering::Release);
                origin.put(format!("k{}", i % KEYS), value(i)).await?;
            }
            anyhow::Ok(())
        })
    };
    let mut sample = Sample::new();
    let deadline =
        tokio::time::Instant::now() + PUT_INTERVAL * u32::try_from(puts).unwrap_or(u32::MAX) + OBSERVE_DEADLINE;
    while sample.msgs < puts {
        let msg = tokio::time::timeout_at(deadline, arrivals.next())
            .await
            .with_context(|| format!("only {} of {puts} puts seen on the leaf", sample.msgs))?
            .context("the ordered consumer ended")??;
        let now = nanos_since(base);
        let i = index_of(&msg.payload).context("a value without an index")?;
        let sent_at = sent.get(i as usize).map(|s| s.load(Ordering::Acquire)).context("an unknown index")?;
        anyhow::ensure!(sent_at > 0, "put {i} seen before it was sent");
        sample.record(Duration::from_nanos(now.saturating_sub(sent_at)));
        sample.msgs += 1;
    }
    sample.elapsed = base.elapsed();
    putter.await.context("the putter panicked")??;
    Ok(sample)
}

fn nanos_since(base: Instant) -> u64 {
    // At least 1, so 0 can mean "not sent yet".
    u64::try_from(base.elapsed().as_nanos()).unwrap_or(u64::MAX).max(1)
}

/// A 256-byte value whose first 8 bytes are `index`.
fn value(index: u64) -> Bytes {
    let mut v = BytesMut::with_capacity(KV_VALUE);
    v.put_u64(index);
    v.resize(KV_VALUE, 0x6d);
    v.freeze()
}

fn index_of(payload: &[u8]) -> Option<u64> {
    Some(u64::from_be_bytes(payload.get(..8)?.try_into().ok()?))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn values_carry_their_index() {
        let v = value(42);
        assert_eq!(v.len(), KV_VALUE);
        assert_eq!(index_of(&v), Some(42));
        assert_eq!(index_of(b"short"), None);
    }
}
