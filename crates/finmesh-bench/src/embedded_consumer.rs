//! Durable consumers on the embedded engine at scale.
//!
//! - **Sparse fetch**: a stream of `--consumer-messages` messages (1M by
//!   default) of which 1% are on `sparse.rare`; a consumer filtered on it
//!   drains them with fetches of 100 (each followed by an `ack_all`),
//!   starting over with a new consumer when drained. Figures: the fetch
//!   latency (`embedded.consumer.sparse-fetch`, value = p99) and the rate
//!   of one publisher on `sparse.common` awaiting each ack meanwhile
//!   (`…publish-while-draining`), next to the same publisher alone
//!   (`…publish-alone`). A fetch that stalls the writer shows in the second.
//! - **Acks**: 16 tasks ack deliveries one by one while `max_ack_pending`
//!   deliveries stay pending (10,000 and 100: the ack rate should not
//!   depend on it), refilling with fetches of 100 when they run out, and
//!   publishing 1,000 more messages when the consumer's backlog runs low.
//!   Streams use `sync = interval(100 ms)`: the ack's own cost, not the
//!   disk's fsync rate, is what is measured.

use std::collections::VecDeque;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use finmesh_core::{
    AckKind, AckToken, ConsumerConfig, ConsumerEngine, ConsumerName, FetchRequest, OutgoingMessage, StreamConfig,
    StreamEngine, StreamName, Subject, SubjectPattern, SyncPolicy,
};
use finmesh_embedded::EmbeddedEngine;

use super::measure::{Measurement, Sample, closed_loop};
use super::{BenchContext, CONCURRENCY, PUBLISH_PAYLOAD};

const PEER: &str = "finmesh-embedded";
/// One message in this many is on the sparse consumer's subject.
const SPARSE_EVERY: u64 = 100;
/// Deliveries per fetch.
const FETCH: usize = 100;

/// Run the consumer scenarios.
pub async fn run(ctx: &BenchContext) -> anyhow::Result<Vec<Measurement>> {
    let dir = ctx.tempdir("embedded-consumer")?;
    let engine = EmbeddedEngine::open(dir.path())?;
    let result = async {
        let mut out = sparse_fetch(ctx, &engine).await?;
        for pending in [10_000, 100] {
            out.push(acks(ctx, &engine, pending).await?);
        }
        anyhow::Ok(out)
    }
    .await;
    engine.close().await?;
    result
}

fn stream(name: &str) -> anyhow::Result<(StreamName, StreamConfig)> {
    let s = StreamName::new(name)?;
    let mut config = StreamConfig::new(s.clone(), vec![SubjectPattern::new(format!("{name}.>"))?]);
    config.sync = SyncPolicy::Interval { ms: 100 };
    Ok((s, config))
}

async fn sparse_fetch(ctx: &BenchContext, engine: &EmbeddedEngine) -> anyhow::Result<Vec<Measurement>> {
    let (s, config) = stream("sparse")?;
    engine.create_stream(config).await?;
    let payload = Bytes::from(vec![0x5a; PUBLISH_PAYLOAD]);
    let (rare, common) = (Subject::new("sparse.rare")?, Subject::new("sparse.common")?);
    let mut n = 0u64;
    while n < ctx.consumer_messages {
        let batch = (n..(n + 1000).min(ctx.consumer_messages))
            .map(|i| {
                let subject = if i % SPARSE_EVERY == 0 { &rare } else { &common };
                OutgoingMessage::new(subject.clone(), payload.clone())
            })
            .collect::<Vec<_>>();
        n += batch.len() as u64;
        engine.publish_batch(&s, batch).await?;
    }
    let publisher = |engine: EmbeddedEngine| {
        let (s, common, payload) = (s.clone(), common.clone(), payload.clone());
        closed_loop(
            1,
            ctx.duration,
            move |_| (engine.clone(), s.clone(), common.clone(), payload.clone()),
            |st, _| async move {
                let (engine, s, subject, payload) = &*st;
                engine.publish(s, OutgoingMessage::new(subject.clone(), payload.clone())).await?;
                Ok(1)
            },
        )
    };
    let alone = publisher(engine.clone()).await?;

    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let drainer = {
        let (engine, s, stop) = (engine.clone(), s.clone(), stop.clone());
        tokio::spawn(async move { drain(&engine, &s, &stop).await })
    };
    let during = publisher(engine.clone()).await;
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let fetches = drainer.await??;
    let during = during?;
    let what = |w: &str| format!("{w}, stream of {} messages, 1% matching", ctx.consumer_messages);
    Ok(vec![
        Measurement::latency(
            "embedded.consumer.sparse-fetch",
            PEER,
            &what("fetch of 100 by a consumer filtered on the 1%"),
            &fetches,
        ),
        Measurement::rate(
            "embedded.consumer.publish-while-draining",
            PEER,
            &what("1 publisher awaiting each ack while that consumer drains"),
            "msgs/s",
            &during,
        ),
        Measurement::rate("embedded.consumer.publish-alone", PEER, &what("the same publisher alone"), "msgs/s", &alone),
    ])
}

/// Fetch 100 at a time (acking them all) until told to stop; a drained
/// consumer is replaced by a new one from the start.
async fn drain(
    engine: &EmbeddedEngine,
    s: &StreamName,
    stop: &std::sync::atomic::AtomicBool,
) -> anyhow::Result<Sample> {
    let mut sample = Sample::new();
    let name = ConsumerName::new("rare")?;
    let config = ConsumerConfig {
        filter: Some(SubjectPattern::new("sparse.rare")?),
        max_ack_pending: 10_000,
        ..ConsumerConfig::new(name.clone())
    };
    engine.create_consumer(s, config.clone()).await?;
    let started_at = Instant::now();
    while !stop.load(std::sync::atomic::Ordering::Relaxed) || sample.hist.is_empty() {
        let started = Instant::now();
        let ds = engine.fetch(s, &name, FetchRequest { max: FETCH, wait: Duration::ZERO }).await?;
        sample.record(started.elapsed());
        sample.msgs += ds.len() as u64;
        match ds.last() {
            Some(d) => engine.ack_all(s, &name, d.message.seq).await?,
            None => {
                engine.delete_consumer(s, &name).await?;
                engine.create_consumer(s, config.clone()).await?;
            }
        }
    }
    sample.elapsed = started_at.elapsed();
    Ok(sample)
}

async fn acks(ctx: &BenchContext, engine: &EmbeddedEngine, max_ack_pending: u32) -> anyhow::Result<Measurement> {
    let (s, config) = stream(&format!("acks_{max_ack_pending}"))?;
    engine.create_stream(config).await?;
    let payload = Bytes::from(vec![0x5a; PUBLISH_PAYLOAD]);
    let subject = Subject::new(format!("acks_{max_ack_pending}.x"))?;
    let fill = |n: usize| (0..n).map(|_| OutgoingMessage::new(subject.clone(), payload.clone())).collect::<Vec<_>>();
    for _ in 0..(max_ack_pending as usize).div_ceil(1000) + 1 {
        engine.publish_batch(&s, fill(1000)).await?;
    }
    let name = ConsumerName::new("c")?;
    let config =
        ConsumerConfig { max_ack_pending, ack_wait: Duration::from_secs(3600), ..ConsumerConfig::new(name.clone()) };
    engine.create_consumer(&s, config).await?;
    // Keep all but FETCH deliveries pending for the whole run.
    let mut left = (max_ack_pending as usize).saturating_sub(FETCH);
    while left > 0 {
        let got = engine.fetch(&s, &name, FetchRequest { max: left.min(1000), wait: Duration::ZERO }).await?;
        anyhow::ensure!(!got.is_empty(), "the stream ran out while filling the pending deliveries");
        left -= got.len();
    }
    let queue = Arc::new(Mutex::new(VecDeque::<AckToken>::new()));
    let state = {
        let (engine, s, name, queue, subject, payload) =
            (engine.clone(), s.clone(), name.clone(), queue.clone(), subject.clone(), payload.clone());
        move |_| (engine.clone(), s.clone(), name.clone(), queue.clone(), subject.clone(), payload.clone())
    };
    let sample = closed_loop(CONCURRENCY, ctx.duration, state, move |st, _| async move {
        let (engine, s, name, queue, subject, payload) = &*st;
        let next = queue.lock().expect("ack queue").pop_front();
        if let Some(token) = next {
            engine.ack(s, name, &token, AckKind::Ack).await?;
            return Ok(1);
        }
        let ds = engine.fetch(s, name, FetchRequest { max: FETCH, wait: Duration::ZERO }).await?;
        // Empty with the backlog nearly drained: the stream ran out, add more.
        // (Empty while messages wait means no room under max_ack_pending.)
        if ds.is_empty() && engine.consumer_info(s, name).await?.num_pending < FETCH as u64 {
            let more = (0..1000).map(|_| OutgoingMessage::new(subject.clone(), payload.clone())).collect();
            engine.publish_batch(s, more).await?;
        }
        queue.lock().expect("ack queue").extend(ds.into_iter().map(|d| d.token));
        Ok(0)
    })
    .await?;
    let what = format!("{CONCURRENCY} tasks acking one delivery each, {max_ack_pending} pending");
    Ok(Measurement::rate(&format!("embedded.consumer.acks.pending-{max_ack_pending}"), PEER, &what, "acks/s", &sample)
        .note("sync=interval(100ms); latency includes the refill fetches of 100"))
}
