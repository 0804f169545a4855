//! A file's tally stored over several keys, against real engines (the
//! embedded one and a `nats-server` with its default 1 MiB `max_payload`):
//! a 3M-row file with 5% of its rows excepted at random (one value of
//! about 1.7 MB before shards: `TooLarge` on NATS) is stored in values
//! under the bound, read back whole, and rewritten only where it changed;
//! two writers of the same file converge on the union of their rows.

mod recon_support;

use std::collections::BTreeSet;

use finmesh_core::{Engine, Timestamp};
use finmesh_pipeline::reconcile::store::{self, HeldTally, load_tally, run_files, save_tally};
use finmesh_pipeline::reconcile::tally::{MAX_STORED_BYTES, SHARD_ROWS_LOG2, shard_of};
use finmesh_pipeline::reconcile::{Counted, FileRef, FileTally, Names};
use finmesh_pipeline::rowset::{MAX_MESSAGE_ROWS, RowSet};
use recon_support::{Fixture, file};

const NATS_DEFAULT_MAX_PAYLOAD: usize = 1024 * 1024;

on_both_engines!(a_3m_row_tally_with_random_exceptions_is_stored_under_the_bound, two_writers_converge_on_the_union);

/// Insert `rows` (ascending) into `which`, as messages of at most
/// [`MAX_MESSAGE_ROWS`] rows.
fn insert(held: &mut HeldTally, which: Counted, rows: &[u32], time: Timestamp) {
    for chunk in rows.chunks(MAX_MESSAGE_ROWS) {
        held.insert_rows(which, &RowSet::from_sorted(chunk.iter().copied()).unwrap(), time);
    }
}

/// Every stored value of `file`'s tally: (key, bytes).
async fn stored_values(engine: &dyn Engine, names: &Names, file: &FileRef, tally: &FileTally) -> Vec<(String, usize)> {
    let mut keys = vec![file.key()];
    keys.extend(tally.parts().into_iter().map(|n| file.part_key(n)));
    let mut out = Vec::new();
    for k in keys {
        let e = engine.kv_get(&names.bucket(), &k).await.unwrap().unwrap_or_else(|| panic!("{k} is stored"));
        out.push((k.to_string(), e.value.len()));
    }
    out
}

async fn a_3m_row_tally_with_random_exceptions_is_stored_under_the_bound(f: Fixture) {
    const ROWS: u32 = 3_000_000;
    let seed = fastrand::u64(..);
    eprintln!("seed {seed}");
    let mut rng = fastrand::Rng::with_seed(seed);
    let names = Names::new("risk").unwrap();
    store::ensure_bucket(&*f.engine, &names).await.unwrap();
    let a = file("big", "s", "a");

    // 5% of the rows excepted at random, at one of the three stages.
    let (mut raw, mut enriched, mut validated) = (Vec::new(), Vec::new(), Vec::new());
    let mut exc: [Vec<u32>; 3] = Default::default();
    for row in 1..=ROWS {
        if rng.f64() < 0.05 {
            let stage = rng.usize(0..3);
            exc[stage].push(row);
            if stage == 0 {
                continue;
            }
            raw.push(row);
            if stage == 2 {
                enriched.push(row);
            }
        } else {
            raw.push(row);
            enriched.push(row);
            validated.push(row);
        }
    }
    let mut held = HeldTally::default();
    insert(&mut held, Counted::Raw, &raw, Timestamp(1));
    insert(&mut held, Counted::Enriched, &enriched, Timestamp(2));
    insert(&mut held, Counted::Validated, &validated, Timestamp(3));
    for (which, rows) in [Counted::ExcIngest, Counted::ExcEnrich, Counted::ExcValidate].into_iter().zip(&exc) {
        insert(&mut held, which, rows, Timestamp(4));
    }
    let single_value: usize = Counted::ALL
        .into_iter()
        .map(|c| {
            let mut b = held.tally().bits(c).clone();
            b.optimize();
            b.serialized_size() * 4 / 3
        })
        .sum();
    assert!(
        single_value > NATS_DEFAULT_MAX_PAYLOAD,
        "the tally would fit one NATS value ({single_value} bytes): the test proves nothing"
    );

    save_tally(&*f.engine, &names, &a, &mut held).await.unwrap();
    assert!(!held.is_dirty());
    let loaded = load_tally(&*f.engine, &names, &a).await.unwrap();
    assert_eq!(loaded.tally(), held.tally(), "read back whole");
    assert_eq!(loaded.tally().count(Counted::Validated), validated.len() as u64);
    assert_eq!(loaded.tally().final_actual(), u64::from(ROWS));
    let parts = loaded.tally().parts();
    assert_eq!(parts, (1..=shard_of(ROWS)).collect::<BTreeSet<_>>());
    let values = stored_values(&*f.engine, &names, &a, held.tally()).await;
    for (key, len) in &values {
        assert!(*len <= MAX_STORED_BYTES, "{key}: {len} bytes");
    }
    eprintln!("{} keys, largest {:?}", values.len(), values.iter().max_by_key(|(_, l)| *l));
    assert_eq!(run_files(&*f.engine, &names, "big").await.unwrap(), vec![a.clone()], "parts are not files");

    // One more row in shard 3 rewrites that part alone, not the head nor
    // the other parts.
    let before = load_tally(&*f.engine, &names, &a).await.unwrap().revision();
    let row = exc[0].iter().copied().find(|&r| shard_of(r) == 3).expect("shard 3 has a row excepted at ingest");
    assert!(held.insert_rows(Counted::Raw, &RowSet::single(row).unwrap(), Timestamp(5)));
    save_tally(&*f.engine, &names, &a, &mut held).await.unwrap();
    let after = load_tally(&*f.engine, &names, &a).await.unwrap();
    assert_eq!(after.revision().0, before.0 + 1, "one key written");
    let part3 = f.engine.kv_get(&names.bucket(), &a.part_key(3)).await.unwrap().unwrap();
    assert_eq!(part3.revision, after.revision(), "the key written is part 3");
    assert_eq!(after.tally(), held.tally());
    assert_eq!(after.tally().last_time(), Timestamp(5));
}

/// Two writers, each with its own copy of the tally (read once, never
/// re-read but on a conflict), add rows over five shards, always one they
/// share, and write, concurrently or one after the other, several times:
/// every row either added is stored.
async fn two_writers_converge_on_the_union(f: Fixture) {
    const SHARD: u32 = 1 << SHARD_ROWS_LOG2;
    let seed = fastrand::u64(..);
    eprintln!("seed {seed}");
    let mut rng = fastrand::Rng::with_seed(seed);
    let names = Names::new("risk").unwrap();
    store::ensure_bucket(&*f.engine, &names).await.unwrap();
    let a = file("r", "s", "a");
    let mut writers = [load_tally(&*f.engine, &names, &a).await.unwrap(), HeldTally::default()];
    let mut model: [BTreeSet<u32>; 6] = Default::default();
    for round in 0..6u64 {
        for w in &mut writers {
            // The first insert of a round goes to a shard both writers
            // change, so their writes of that part conflict.
            for i in 0..rng.usize(1..4) {
                let which = rng.usize(0..6);
                let shard = if i == 0 { round as u32 % 5 } else { rng.u32(0..5) };
                let lo = shard * SHARD + rng.u32(1..SHARD - 100);
                let rows: Vec<u32> = (lo..lo + rng.u32(1..100)).filter(|&r| r == lo || rng.bool()).collect();
                model[which].extend(&rows);
                insert(w, Counted::ALL[which], &rows, Timestamp(10 + round));
            }
        }
        let [w0, w1] = &mut writers;
        if round % 2 == 0 {
            let (r0, r1) = tokio::join!(save_tally(&*f.engine, &names, &a, w0), save_tally(&*f.engine, &names, &a, w1));
            r0.unwrap();
            r1.unwrap();
        } else {
            // One after the other: the second is stale for sure.
            save_tally(&*f.engine, &names, &a, w1).await.unwrap();
            save_tally(&*f.engine, &names, &a, w0).await.unwrap();
        }
    }
    let stored = load_tally(&*f.engine, &names, &a).await.unwrap();
    for (i, c) in Counted::ALL.into_iter().enumerate() {
        let got: BTreeSet<u32> = stored.tally().bits(c).iter().collect();
        assert_eq!(got, model[i], "{c:?} (seed {seed})");
    }
}
