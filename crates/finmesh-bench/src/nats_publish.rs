//! JetStream publish on a real nats-server on this machine, through
//! async-nats directly (no finmesh code in the path): the peer the embedded
//! engine's publish figures are read against.
//!
//! The server is the test kit's `NatsServer` (file storage, its store in the
//! benchmark's temporary directory) with JetStream's default `sync_interval`
//! (2 min): NATS acks once a message reached the OS, before any fsync, which
//! is closest to the embedded engine's `sync = interval`. Each measurement
//! gets a fresh stream. Three ways to publish 128-byte messages:
//! (a) one publisher awaiting each ack; (b) 16 tasks, each awaiting its own
//! ack, sharing one connection; (c) one publisher with up to 1000 acks in
//! flight (a bounded FIFO of ack futures).
//!
//! For the durable comparison with the embedded engine's `sync = always`,
//! (a) and (b) run again on a second server configured with
//! `sync_interval: always` (JetStream fsyncs every write before its ack).

use std::collections::VecDeque;
use std::time::Instant;

use anyhow::Context as _;
use async_nats::jetstream::{self, context::PublishAckFuture};
use bytes::Bytes;
use finmesh_testkit::NatsServer;

use super::measure::{Measurement, Sample, Window, closed_loop};
use super::{BenchContext, CONCURRENCY, PUBLISH_PAYLOAD, start_nats};

/// (a) one publisher awaiting each ack.
pub const ACK_EACH: &str = "nats.publish.1-pub";
/// (b) 16 publishers awaiting their acks.
pub const CONCURRENT: &str = "nats.publish.16-pub";
/// (c) pipelined, ≤ 1000 acks in flight.
pub const ASYNC: &str = "nats.publish.async-1000";
/// (a) on a server with `sync_interval: always`.
pub const ALWAYS_ACK_EACH: &str = "nats.publish.always.1-pub";
/// (b) on a server with `sync_interval: always`.
pub const ALWAYS_CONCURRENT: &str = "nats.publish.always.16-pub";

/// Most acks in flight in the pipelined scenario.
const MAX_IN_FLIGHT: usize = 1000;

/// Run the NATS publish scenarios.
pub async fn run(ctx: &BenchContext) -> anyhow::Result<Vec<Measurement>> {
    let server = start_nats(ctx).await?;
    let client = async_nats::connect(server.url()).await?;
    let version = client.server_info().version;
    let js = jetstream::new(client);
    let payload = Bytes::from(vec![0x5a; PUBLISH_PAYLOAD]);
    let note = format!("nats-server {version}, file storage, default sync_interval (ack before fsync)");
    let mut out = awaited(ctx, &js, [ACK_EACH, CONCURRENT], &note).await?;

    let (name, subject) = fresh_stream(&js, ASYNC).await?;
    let window = Window::after_warmup(ctx.duration);
    let mut counted = false;
    let sample = pipelined(&js, window.measure_from, |_| {
        let now = Instant::now();
        window.keep_going(now, counted).then(|| {
            counted |= window.counts(now);
            (subject.clone(), payload.clone())
        })
    })
    .await?;
    js.delete_stream(&name).await?;
    out.push(
        Measurement::rate(ASYNC, PEER, "JetStream publish, ≤1000 acks in flight", "msgs/s", &sample)
            .note(format!("{note}; latency = publish to ack with the pipeline full")),
    );
    drop(server);

    let server = NatsServer::builder()
        .tmp_in(&ctx.dir)
        .jetstream_option("sync_interval: always")
        .start()
        .await
        .context("starting nats-server with sync_interval: always")?;
    let js = jetstream::new(async_nats::connect(server.url()).await?);
    let note = format!("nats-server {version}, file storage, sync_interval: always (fsync before ack)");
    out.extend(awaited(ctx, &js, [ALWAYS_ACK_EACH, ALWAYS_CONCURRENT], &note).await?);
    Ok(out)
}

const PEER: &str = "nats-server";

/// (a) and (b): one publisher, then 16 tasks, each awaiting its acks.
async fn awaited(
    ctx: &BenchContext,
    js: &jetstream::Context,
    ids: [&str; 2],
    note: &str,
) -> anyhow::Result<Vec<Measurement>> {
    let payload = Bytes::from(vec![0x5a; PUBLISH_PAYLOAD]);
    let mut out = Vec::new();
    for (id, tasks, what) in [
        (ids[0], 1, "JetStream publish, 1 publisher awaiting each ack".to_owned()),
        (ids[1], CONCURRENCY, format!("JetStream publish, {CONCURRENCY} tasks awaiting acks, one connection")),
    ] {
        let (name, subject) = fresh_stream(js, id).await?;
        let (js2, payload) = (js.clone(), payload.clone());
        let state = move |_| (js2.clone(), subject.clone(), payload.clone());
        let sample = closed_loop(tasks, ctx.duration, state, |st, _| async move {
            let (js, subject, payload) = &*st;
            js.publish(subject.clone(), payload.clone()).await?.await?;
            Ok(1)
        })
        .await?;
        js.delete_stream(&name).await?;
        out.push(Measurement::rate(id, PEER, &what, "msgs/s", &sample).note(note));
    }
    Ok(out)
}

/// A new file-storage stream for measurement `id`: its name and a subject it captures.
async fn fresh_stream(js: &jetstream::Context, id: &str) -> anyhow::Result<(String, async_nats::Subject)> {
    let token = id.replace(['.', '-'], "_");
    let name = format!("BENCH_{token}");
    js.create_stream(jetstream::stream::Config {
        name: name.clone(),
        subjects: vec![format!("bench.{token}.>")],
        storage: jetstream::stream::StorageType::File,
        ..Default::default()
    })
    .await?;
    Ok((name, async_nats::Subject::from(format!("bench.{token}.x"))))
}

/// One publisher with up to [`MAX_IN_FLIGHT`] acks outstanding, awaited
/// oldest first. `next(i)` gives the `i`-th message, or `None` to stop;
/// acks of messages published before `measure_from` are not counted. The
/// window ends when the last ack arrived.
pub async fn pipelined(
    js: &jetstream::Context,
    measure_from: Instant,
    mut next: impl FnMut(u64) -> Option<(async_nats::Subject, Bytes)>,
) -> anyhow::Result<Sample> {
    let mut in_flight: VecDeque<(Instant, PublishAckFuture)> = VecDeque::with_capacity(MAX_IN_FLIGHT);
    let mut sample = Sample::new();
    let settle = |sample: &mut Sample, started: Instant| {
        if started >= measure_from {
            sample.record(started.elapsed());
            sample.msgs += 1;
        }
    };
    let mut i = 0;
    while let Some((subject, payload)) = next(i) {
        i += 1;
        if in_flight.len() >= MAX_IN_FLIGHT
            && let Some((started, ack)) = in_flight.pop_front()
        {
            ack.await?;
            settle(&mut sample, started);
        }
        let started = Instant::now();
        let ack = js.publish(subject, payload).await?;
        in_flight.push_back((started, ack));
    }
    while let Some((started, ack)) = in_flight.pop_front() {
        ack.await?;
        settle(&mut sample, started);
    }
    sample.elapsed = Instant::now().saturating_duration_since(measure_from);
    Ok(sample)
}
