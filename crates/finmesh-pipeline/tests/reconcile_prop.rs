//! Property: whatever the interleaving of deliveries, redeliveries,
//! duplicates (inside and past the dedup window) and reconciler crashes
//! (killed anywhere, or stopped between its write and its ack), the final
//! tally holds exactly the distinct rows published per stage, whether they
//! came one per message (`F:row`) or many per message (`Finmesh-Rows`,
//! overlapping each other and the single rows).
//! On the embedded engine, with a 1 ms dedup window so replays are stored.
//! Rows are spread over the first three shards of the stored tally
//! ([`spread`], [`batch_row`]), so every case writes a head and parts.
//!
//! Exceptions of every stage share one stream and one message id per row
//! (`F:row`), so the contract lets a row be excepted at one stage only; the
//! generator keeps each stage's exception rows apart (see
//! [`exception_row`]), or a row excepted twice within the window would be
//! deduplicated and the model would expect a bit no message carries.

mod recon_support;

use std::collections::BTreeSet;
use std::time::Duration;

use finmesh_core::{Engine, StreamConfig};
use finmesh_pipeline::reconcile::store::load_tally;
use finmesh_pipeline::reconcile::tally::SHARD_ROWS_LOG2;
use finmesh_pipeline::reconcile::{Counted, Names, Source};
use proptest::prelude::*;
use recon_support::{Feed, Running, config, file, spawn, until};

#[derive(Debug, Clone)]
enum Op {
    /// Publish these rows (repeats included) as `Counted::ALL[which]`.
    Publish { which: usize, rows: Vec<u32> },
    /// Publish these rows as one record message (`Finmesh-Rows`) on
    /// `Counted::ALL[which]`, a record stream, with an id of its own (two
    /// messages of one id and other rows within the dedup window would
    /// store one of them: the contract never does that).
    PublishBatch { which: usize, rows: Vec<u32> },
    /// Abort the reconciler after a moment, wherever it is, and start another.
    Kill { after_ms: u64 },
    /// Replace the reconciler by one that stops after its first write, before acking.
    CrashBeforeAck,
    /// Wait until everything published so far is applied and acked.
    Settle,
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        4 => (0..6usize, prop::collection::vec(1..=30u32, 0..12)).prop_map(|(which, rows)| Op::Publish { which, rows }),
        3 => (0..3usize, prop::collection::vec(1..=40u32, 1..30)).prop_map(|(which, rows)| Op::PublishBatch { which, rows }),
        2 => (0..30u64).prop_map(|after_ms| Op::Kill { after_ms }),
        1 => Just(Op::CrashBeforeAck),
        1 => Just(Op::Settle),
    ]
}

/// Row `row` as published for `counted`: exception rows are moved into a
/// range of their own per stage (see the module doc); records keep theirs.
fn exception_row(counted: Counted, row: u32) -> u32 {
    match counted {
        Counted::Raw | Counted::Enriched | Counted::Validated => row,
        Counted::ExcIngest => 100 + row,
        Counted::ExcEnrich => 200 + row,
        Counted::ExcValidate => 300 + row,
    }
}

const SHARD: u32 = 1 << SHARD_ROWS_LOG2;

/// A single row `row` as stored: in shard `row % 3` (one to one, so rows
/// kept apart stay apart).
fn spread(row: u32) -> u32 {
    row + (row % 3) * SHARD
}

/// A batch's row `row` as stored: rows 1-40 straddle shards 0 and 1, so
/// one message's ranges are split between two keys.
fn batch_row(row: u32) -> u32 {
    row + SHARD - 20
}

async fn settled(engine: &dyn Engine, names: &Names) -> Option<()> {
    for s in [Source::Raw, Source::Enriched, Source::Validated, Source::Exceptions] {
        let last = engine.stream_info(&names.stream(s)).await.ok()?.state.last_seq;
        let info = engine.consumer_info(&names.stream(s), &names.consumer(s)).await.ok()?;
        if info.ack_floor != last || info.num_ack_pending != 0 {
            return None;
        }
    }
    Some(())
}

async fn case(ops: Vec<Op>) {
    let f = recon_support::embedded().await;
    let names = Names::new("risk").unwrap();
    for s in Source::ALL {
        let mut c = StreamConfig::new(names.stream(s), names.stream_subjects(s));
        c.duplicate_window = Duration::from_millis(1);
        f.engine.create_stream(c).await.unwrap();
    }
    let feed = Feed::new(f.engine.clone()).await;
    let a = file("p", "s", "a");
    let mut model: [BTreeSet<u32>; 6] = Default::default();
    let mut cfg = config();
    cfg.ack_wait = Duration::from_millis(150);
    cfg.batch = 7;
    let mut r: Running = spawn(&f.engine, cfg.clone());
    let mut batches = 0u32;
    for op in ops {
        match op {
            Op::Publish { which, rows } => {
                let rows: Vec<u32> = rows.into_iter().map(|r| spread(exception_row(Counted::ALL[which], r))).collect();
                model[which].extend(rows.iter().copied());
                match Counted::ALL[which] {
                    Counted::Raw => drop(feed.records(Source::Raw, &a, rows).await),
                    Counted::Enriched => drop(feed.records(Source::Enriched, &a, rows).await),
                    Counted::Validated => drop(feed.records(Source::Validated, &a, rows).await),
                    Counted::ExcIngest => feed.exceptions(&a, "ingest", rows).await,
                    Counted::ExcEnrich => feed.exceptions(&a, "enrich", rows).await,
                    Counted::ExcValidate => feed.exceptions(&a, "validate", rows).await,
                }
            }
            Op::PublishBatch { which, rows } => {
                let rows: Vec<u32> = rows.into_iter().map(batch_row).collect();
                model[which].extend(rows.iter().copied());
                let source = [Source::Raw, Source::Enriched, Source::Validated][which];
                batches += 1;
                feed.batch(source, &a, (batches, batches), &rows).await;
            }
            Op::Kill { after_ms } => {
                tokio::time::sleep(Duration::from_millis(after_ms)).await; // chaos timing, not synchronisation
                r.kill().await;
                r = spawn(&f.engine, cfg.clone());
            }
            Op::CrashBeforeAck => {
                r.kill().await;
                let mut crashing = cfg.clone();
                crashing.fail_before_ack_after = Some(1);
                let c = spawn(&f.engine, crashing);
                // It ends by itself once it has written something; with
                // nothing left to write it would wait forever, so it is
                // killed once everything is acked.
                let mut task = c.task;
                let engine = f.engine.clone();
                tokio::select! {
                    _ = &mut task => {}
                    _ = until(Duration::from_secs(30), "idle", || settled(&*engine, &feed.names)) => task.abort(),
                }
                r = spawn(&f.engine, cfg.clone());
            }
            Op::Settle => until(Duration::from_secs(30), "settled", || settled(&*f.engine, &feed.names)).await,
        }
    }
    until(Duration::from_secs(30), "settled at the end", || settled(&*f.engine, &feed.names)).await;
    r.stop().await;
    let tally = load_tally(&*f.engine, &feed.names, &a).await.unwrap().into_tally();
    for (i, c) in Counted::ALL.into_iter().enumerate() {
        let got: BTreeSet<u32> = tally.bits(c).iter().collect();
        assert_eq!(got, model[i], "{c:?}");
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 12, ..ProptestConfig::default() })]
    #[test]
    fn final_counts_equal_the_distinct_ids(ops in prop::collection::vec(op(), 1..14)) {
        let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
        rt.block_on(case(ops));
    }
}
