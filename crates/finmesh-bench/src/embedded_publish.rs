//! Publish on the embedded engine, through the `StreamEngine` trait as the
//! gateway would call it, with 128-byte payloads.
//!
//! For each durability policy, `sync = always` (the ack waits for an fsync
//! shared by the writer's round) and `sync = interval(100 ms)` (the ack waits
//! for the OS write; fsync at least every 100 ms):
//! (a) one publisher awaiting each ack; (b) 16 tasks each awaiting its own
//! ack; (c) one publisher sending batches of 100 with `publish_batch`
//! (latency is per batch, i.e. per ack of 100 messages). Every measurement
//! uses a fresh stream in one engine opened in the benchmark's temporary
//! directory.

use bytes::Bytes;
use finmesh_core::{OutgoingMessage, StreamConfig, StreamEngine, StreamName, Subject, SubjectPattern, SyncPolicy};
use finmesh_embedded::EmbeddedEngine;

use super::measure::{Measurement, closed_loop};
use super::{BenchContext, CONCURRENCY, PUBLISH_PAYLOAD};

/// Messages per `publish_batch` call.
pub const BATCH: usize = 100;

/// Id of a measurement: `embedded.publish.<always|interval>.<1-pub|16-pub|batch-100>`.
pub fn id(policy: &str, mode: &str) -> String {
    format!("embedded.publish.{policy}.{mode}")
}

/// Run the six embedded publish scenarios.
pub async fn run(ctx: &BenchContext) -> anyhow::Result<Vec<Measurement>> {
    let dir = ctx.tempdir("embedded-publish")?;
    let engine = EmbeddedEngine::open(dir.path())?;
    let result = measure_all(ctx, &engine).await;
    engine.close().await?;
    result
}

async fn measure_all(ctx: &BenchContext, engine: &EmbeddedEngine) -> anyhow::Result<Vec<Measurement>> {
    let payload = Bytes::from(vec![0x5a; PUBLISH_PAYLOAD]);
    let peer = "finmesh-embedded";
    let mut out = Vec::new();
    for (policy_name, policy) in [("always", SyncPolicy::Always), ("interval", SyncPolicy::Interval { ms: 100 })] {
        let sync_label = match policy {
            SyncPolicy::Always => "sync=always",
            _ => "sync=interval(100ms)",
        };
        let n = CONCURRENCY;
        let modes = [
            ("1-pub".to_owned(), 1, 1, format!("publish {sync_label}, 1 publisher awaiting each ack")),
            (format!("{n}-pub"), n, 1, format!("publish {sync_label}, {n} tasks awaiting acks")),
            (format!("batch-{BATCH}"), 1, BATCH, format!("publish_batch of {BATCH} {sync_label}, 1 publisher")),
        ];
        for (mode, tasks, batch, what) in modes {
            let id = id(policy_name, &mode);
            let token = id.replace(['.', '-'], "_");
            let stream = StreamName::new(&token)?;
            let mut config = StreamConfig::new(stream.clone(), vec![SubjectPattern::new(format!("{token}.>"))?]);
            config.sync = policy;
            engine.create_stream(config).await?;
            let subject = Subject::new(format!("{token}.x"))?;
            let (engine2, payload) = (engine.clone(), payload.clone());
            let state = move |_| (engine2.clone(), stream.clone(), subject.clone(), payload.clone());
            let sample = closed_loop(tasks, ctx.duration, state, move |st, _| async move {
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
            let mut m = Measurement::rate(&id, peer, &what, "msgs/s", &sample);
            if batch > 1 {
                m = m.note(format!("latency per batch of {batch}"));
            }
            out.push(m);
            engine.delete_stream(&StreamName::new(&token)?).await?;
        }
    }
    Ok(out)
}
