//! CPU cost of the publish path, for instruction counting under callgrind
//! (repeatable whatever else the machine does):
//!
//! ```text
//! cargo build --release -p finmesh-embedded --example publish_cost
//! valgrind --tool=callgrind target/release/examples/publish_cost 20000
//! ```
//!
//! 16 tasks publish 128-byte messages with `sync = never` (no fsync, so the
//! count is the engine's own work) until `N` messages are acked. A second
//! argument `always` makes every publish wait for its fsync instead, to look
//! at group commit (`RUST_LOG=finmesh_embedded=debug` prints, for the
//! writer's own fsyncs and the syncer's, requests per fsync and where each
//! cycle went); the rate is printed at the end.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use bytes::Bytes;
use finmesh_core::{OutgoingMessage, StreamConfig, StreamEngine, StreamName, Subject, SubjectPattern, SyncPolicy};
use finmesh_embedded::EmbeddedEngine;

/// The binary's allocator, so the count matches what `finmesh` runs.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let total: u64 = std::env::args().nth(1).map(|s| s.parse()).transpose()?.unwrap_or(20_000);
    let dir = tempfile::tempdir()?;
    let engine = EmbeddedEngine::open(dir.path())?;
    let stream = StreamName::new("cost")?;
    let mut config = StreamConfig::new(stream.clone(), vec![SubjectPattern::new("cost.>")?]);
    config.sync = match std::env::args().nth(2).as_deref() {
        Some("always") => SyncPolicy::Always,
        _ => SyncPolicy::Never,
    };
    if std::env::var_os("RUST_LOG").is_some() {
        tracing_subscriber::fmt().with_env_filter(tracing_subscriber::EnvFilter::from_default_env()).init();
    }
    let started = std::time::Instant::now();
    engine.create_stream(config).await?;
    let subject = Subject::new("cost.x")?;
    let payload = Bytes::from(vec![0x5a; 128]);
    let left = Arc::new(AtomicU64::new(total));
    let mut tasks = Vec::new();
    for _ in 0..16 {
        let (engine, stream, subject, payload, left) =
            (engine.clone(), stream.clone(), subject.clone(), payload.clone(), left.clone());
        tasks.push(tokio::spawn(async move {
            while left.fetch_update(Ordering::Relaxed, Ordering::Relaxed, |n| n.checked_sub(1)).is_ok() {
                engine.publish(&stream, OutgoingMessage::new(subject.clone(), payload.clone())).await?;
            }
            Ok::<_, finmesh_core::Error>(())
        }));
    }
    for t in tasks {
        t.await??;
    }
    let elapsed = started.elapsed();
    eprintln!("{total} msgs in {elapsed:.2?}: {:.0} msgs/s", total as f64 / elapsed.as_secs_f64());
    let info = engine.stream_info(&stream).await?;
    assert_eq!(info.state.messages, total);
    engine.close().await?;
    Ok(())
}
