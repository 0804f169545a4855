//! `finmesh demo`: the embedded engine at work, in one terminal.
//!
//! Opens (or creates) an engine under `--data-dir`, makes sure a `demo`
//! stream (subjects `demo.>`) and a `demo` KV bucket exist, publishes a few
//! messages and KV entries, then tails the stream from the first message of
//! this run, printing every event as it arrives, while a background task
//! publishes one `demo.tick` message per interval. Ctrl-C (or SIGTERM) stops
//! the publisher, ends the tail and closes the engine, so everything acked is
//! on disk; a second run finds the previous runs' data (the `runs` counter).

use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context as _;
use bytes::Bytes;
use finmesh_core::{
    BucketConfig, BucketName, Key, KvEngine, OutgoingMessage, StreamConfig, StreamEngine, StreamName, Subject,
    SubjectPattern, TailEvent,
};
use finmesh_embedded::EmbeddedEngine;
use futures::StreamExt;

/// Arguments of `finmesh demo`.
#[derive(Debug, clap::Args)]
pub struct DemoArgs {
    /// Where the engine keeps its data.
    #[arg(long, env = "FINMESH_DATA_DIR", default_value = "./finmesh-data")]
    data_dir: PathBuf,
    /// Milliseconds between the background task's publishes.
    #[arg(long, default_value_t = 1000, value_parser = clap::value_parser!(u64).range(1..))]
    interval_ms: u64,
}

/// Run the demo until Ctrl-C or SIGTERM.
pub async fn run(args: DemoArgs) -> anyhow::Result<()> {
    let engine = EmbeddedEngine::open(&args.data_dir)
        .with_context(|| format!("opening the engine in {}", args.data_dir.display()))?;
    println!("finmesh demo: embedded engine open in {}", args.data_dir.display());
    let result = demo(&engine, &args).await;
    engine.close().await.context("closing the engine")?;
    println!("engine closed; everything acked is on disk. Run again to see the data persist.");
    result
}

async fn demo(engine: &EmbeddedEngine, args: &DemoArgs) -> anyhow::Result<()> {
    let stream = StreamName::new("demo")?;
    let info = engine
        .create_stream(StreamConfig::new(stream.clone(), vec![SubjectPattern::new("demo.>")?]))
        .await
        .context("creating stream `demo`")?;
    println!("stream demo: {} messages stored, last seq {}", info.state.messages, info.state.last_seq);
    let bucket = BucketName::new("demo")?;
    engine.create_bucket(BucketConfig::new(bucket.clone())).await.context("creating bucket `demo`")?;

    // KV: a counter of demo runs (read, increment, write) and a greeting.
    let runs_key = Key::new("runs")?;
    let runs = match engine.kv_get(&bucket, &runs_key).await? {
        Some(e) => std::str::from_utf8(&e.value).ok().and_then(|s| s.parse::<u64>().ok()).unwrap_or(0),
        None => 0,
    } + 1;
    let rev = engine.kv_put(&bucket, &runs_key, Bytes::from(runs.to_string())).await?;
    println!("kv demo/runs = {runs} (revision {rev})");
    let greeting = Key::new("greeting")?;
    let rev = engine.kv_put(&bucket, &greeting, Bytes::from_static(b"hello from finmesh")).await?;
    println!("kv demo/greeting = \"hello from finmesh\" (revision {rev})");

    // Tail from the first message this run publishes.
    let start = info.state.last_seq.next();
    let mut tail = engine.tail(&stream, start, None).await?;
    for (subject, text) in [("demo.hello", "hello"), ("demo.orders.created", "order 42 created")] {
        let ack =
            engine.publish(&stream, OutgoingMessage::new(Subject::new(subject)?, Bytes::from(text.to_owned()))).await?;
        println!("published {subject} -> seq {}", ack.seq);
    }

    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let publisher = tokio::spawn(publish_ticks(engine.clone(), stream.clone(), args.interval_ms, stop_rx));
    println!(
        "tailing stream demo from seq {start}; a tick is published every {} ms. Ctrl-C to stop.",
        args.interval_ms
    );

    let shutdown = shutdown_signal();
    tokio::pin!(shutdown);
    let outcome = loop {
        tokio::select! {
            signal = &mut shutdown => {
                println!("{}: shutting down", signal?);
                break Ok(());
            }
            event = tail.next() => match event {
                Some(Ok(TailEvent::Message(m))) => {
                    println!("[seq {}] {}: {}", m.seq, m.subject, String::from_utf8_lossy(&m.payload));
                }
                Some(Ok(TailEvent::Gap { from, to })) => println!("[gap] seq {from}..={to} removed before delivery"),
                Some(Err(e)) => break Err(anyhow::Error::new(e).context("tail failed")),
                None => break Err(anyhow::anyhow!("the tail ended")),
            },
        }
    };
    let _ = stop_tx.send(true);
    drop(tail);
    publisher.await.context("publisher task panicked")??;
    outcome
}

/// Publish `demo.tick` every `interval_ms` until `stop` turns true.
async fn publish_ticks(
    engine: EmbeddedEngine,
    stream: StreamName,
    interval_ms: u64,
    mut stop: tokio::sync::watch::Receiver<bool>,
) -> anyhow::Result<()> {
    let subject = Subject::new("demo.tick")?;
    let mut interval = tokio::time::interval(Duration::from_millis(interval_ms));
    interval.tick().await; // the first tick is immediate
    for n in 1u64.. {
        tokio::select! {
            _ = stop.changed() => break,
            _ = interval.tick() => {
                let payload = Bytes::from(format!("tick {n}"));
                engine.publish(&stream, OutgoingMessage::new(subject.clone(), payload)).await?;
            }
        }
    }
    Ok(())
}

/// Resolves with the signal's name on Ctrl-C (SIGINT) or SIGTERM.
async fn shutdown_signal() -> anyhow::Result<&'static str> {
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    tokio::select! {
        r = tokio::signal::ctrl_c() => { r?; Ok("SIGINT") }
        _ = term.recv() => Ok("SIGTERM"),
    }
}
