//! Reconciliation against real engines (embedded and NATS): synthetic
//! records, exceptions and file events are published straight into the
//! stage streams with the contract's subjects, ids and headers, and the
//! reconciler's stored status is checked: exact counts under redelivery,
//! crashes and late duplicates, and the time window's verdicts.

mod recon_support;

use std::time::Duration;

use finmesh_core::{ErrorKind, ReadRequest, Seq, StreamConfig, SubjectPattern, Timestamp};
use finmesh_pipeline::reconcile::store::load_tally;
use finmesh_pipeline::reconcile::{Counted, Phase, RunRequest, RunStatus, Source, open_run};
use recon_support::{Feed, Fixture, config, file, spawn, until};

const LONG: Duration = Duration::from_secs(60);

fn request(json: serde_json::Value) -> RunRequest {
    serde_json::from_value(json).unwrap()
}

async fn open(feed: &Feed, run: &str, json: serde_json::Value) -> RunStatus {
    let spec = request(json).into_spec(Timestamp::now()).unwrap();
    open_run(&*feed.engine, &feed.names, run, spec).await.unwrap()
}

async fn wait_state(feed: &Feed, run: &str, state: Phase) -> RunStatus {
    until(LONG, &format!("run {run} {state:?}"), || async { feed.status(run).await.filter(|s| s.state == state) }).await
}

/// `(subject, state)` of every state change published so far.
async fn state_events(feed: &Feed) -> Vec<(String, String)> {
    let req = ReadRequest::from_seq(Seq(0), 10_000).filter(SubjectPattern::new("risk.state.>").unwrap());
    let msgs = feed.engine.read(&feed.names.stream(Source::Events), req).await.unwrap();
    msgs.iter()
        .map(|m| {
            let v: serde_json::Value = serde_json::from_slice(&m.payload).unwrap();
            (m.subject.as_str().to_owned(), v["state"].as_str().unwrap().to_owned())
        })
        .collect()
}

on_both_engines!(
    a_run_completes_with_exact_counts_per_stage,
    a_crash_between_the_write_and_the_ack_changes_no_count,
    a_duplicate_after_the_dedup_window_changes_no_count,
    a_large_file_is_counted_exactly_through_kills,
    a_missing_file_fails_its_slice_and_run_with_the_reason,
    a_late_file_is_reported_and_not_merged,
    a_failed_ingest_fails_the_run_at_once,
    batch_messages_with_gaps_are_counted_exactly,
);

/// Record messages carry many rows (`Finmesh-Rows`), with gaps where rows
/// went to exceptions; a stage's output keeps its input's id with fewer
/// rows. Each row is counted once, whether it comes in a batch, again in a
/// replayed batch of another id, or in a single-row message of before.
async fn batch_messages_with_gaps_are_counted_exactly(f: Fixture) {
    let feed = Feed::new(f.engine.clone()).await;
    let a = file("r1", "s1", "a");
    let r = spawn(&f.engine, config());
    open(&feed, "r1", serde_json::json!({"slices": {"s1": {"files": ["a"]}}, "window_s": 600})).await;
    // 2,500 rows in messages of 1,000: row 4 and 1,500 fail at ingest, 8
    // and 2,000-2,009 at enrich, 2 and 2,500 at validate.
    let (ingest_bad, enrich_bad, validate_bad): (Vec<u32>, Vec<u32>, Vec<u32>) =
        (vec![4, 1500], [8].into_iter().chain(2000..=2009).collect(), vec![2, 2500]);
    feed.exceptions(&a, "ingest", ingest_bad.iter().copied()).await;
    for (lo, hi) in [(1, 1000), (1001, 2000), (2001, 2500)] {
        let raw: Vec<u32> = (lo..=hi).filter(|r| !ingest_bad.contains(r)).collect();
        assert!(feed.batch(Source::Raw, &a, (lo, hi), &raw).await);
        let enriched: Vec<u32> = raw.iter().copied().filter(|r| !enrich_bad.contains(r)).collect();
        assert!(feed.batch(Source::Enriched, &a, (lo, hi), &enriched).await);
        let valid: Vec<u32> = enriched.iter().copied().filter(|r| !validate_bad.contains(r)).collect();
        // The last message: row 2,500 failed, so it ends at 2,499 under id 2001-2500.
        assert!(feed.batch(Source::Validated, &a, (lo, hi), &valid).await);
        // Redelivered: the same id, a duplicate, not stored.
        assert!(!feed.batch(Source::Validated, &a, (lo, hi), &valid).await);
    }
    feed.exceptions(&a, "enrich", enrich_bad.iter().copied()).await;
    feed.exceptions(&a, "validate", validate_bad.iter().copied()).await;
    feed.ingested(&a, 2500, 2498, Timestamp::now()).await;
    let st = wait_state(&feed, "r1", Phase::Complete).await;
    let check = |st: &RunStatus| {
        let fa = &st.slices["s1"].files["a"];
        assert_eq!((fa.raw.expected, fa.raw.actual), (Some(2498), 2498));
        assert_eq!((fa.enriched.expected, fa.enriched.actual), (Some(2498), 2498));
        assert_eq!((fa.validated.expected, fa.validated.actual), (Some(2500), 2500));
        assert_eq!(fa.valid_records, 2485);
        assert_eq!((fa.exceptions.ingest, fa.exceptions.enrich, fa.exceptions.validate), (2, 11, 2));
    };
    check(&st);

    // Stored again under other ids (a replay cut differently, the format
    // of before): no count moves.
    assert!(
        feed.batch(Source::Validated, &a, (1, 50), &(1..=50).filter(|r| ![2, 4, 8].contains(r)).collect::<Vec<_>>())
            .await
    );
    assert_eq!(feed.records(Source::Validated, &a, [1, 3, 2499]).await, 3);
    until(LONG, "the replay applied", || async {
        let t = load_tally(&*feed.engine, &feed.names, &a).await.unwrap().into_tally();
        let info = feed
            .engine
            .consumer_info(&feed.names.stream(Source::Validated), &feed.names.consumer(Source::Validated))
            .await
            .unwrap();
        (info.num_pending == 0 && info.num_ack_pending == 0 && t.count(Counted::Validated) == 2485).then_some(())
    })
    .await;
    r.stop().await;
    let t = load_tally(&*feed.engine, &feed.names, &a).await.unwrap().into_tally();
    let missing: Vec<u32> = (1..=2500).filter(|r| !t.bits(Counted::Validated).contains(*r)).collect();
    let mut want: Vec<u32> = ingest_bad.iter().chain(&enrich_bad).chain(&validate_bad).copied().collect();
    want.sort_unstable();
    assert_eq!(missing, want, "exactly the excepted rows are missing from validated");
    check(&feed.status("r1").await.unwrap());
}

async fn a_run_completes_with_exact_counts_per_stage(f: Fixture) {
    let feed = Feed::new(f.engine.clone()).await;
    // Files flow before the run is opened and before the reconciler runs.
    feed.flow(&file("r1", "s1", "a"), 100, &[3, 50], &[7], &[8, 9]).await;
    feed.flow(&file("r1", "s1", "b"), 10, &[], &[], &[]).await;
    let r = spawn(&f.engine, config());
    open(
        &feed,
        "r1",
        serde_json::json!({"slices": {"s1": {"files": ["a", "b"]}, "s2": {"expected_files": 1}}, "window_s": 600}),
    )
    .await;

    let st = until(LONG, "slice s1 complete", || async {
        feed.status("r1").await.filter(|s| s.slices["s1"].state == Phase::Complete)
    })
    .await;
    assert_eq!(st.state, Phase::Open, "slice s2 still waits for its file");
    assert_eq!(st.slices["s2"].state, Phase::Open);

    feed.flow(&file("r1", "s2", "c"), 5, &[1], &[], &[]).await;
    let st = wait_state(&feed, "r1", Phase::Complete).await;
    let a = &st.slices["s1"].files["a"];
    assert_eq!((a.raw.expected, a.raw.actual), (Some(98), 98));
    assert_eq!((a.enriched.expected, a.enriched.actual), (Some(98), 98));
    assert_eq!((a.validated.expected, a.validated.actual), (Some(100), 100));
    assert_eq!(a.valid_records, 95);
    assert_eq!((a.exceptions.ingest, a.exceptions.enrich, a.exceptions.validate), (2, 1, 2));
    assert!(st.failures.is_empty() && st.late.is_empty() && st.unexpected.is_empty(), "{st:?}");
    assert!(st.slices.values().all(|s| s.state == Phase::Complete));

    let events = state_events(&feed).await;
    let count = |subject: &str, state: &str| events.iter().filter(|(s, st)| s == subject && st == state).count();
    assert_eq!(count("risk.state.r1", "complete"), 1, "{events:?}");
    assert_eq!(count("risk.state.r1.s1", "complete"), 1);
    assert_eq!(count("risk.state.r1.s2", "complete"), 1);
    assert_eq!(count("risk.state.r1.s1.a", "complete"), 1);
    assert_eq!(events.last().unwrap().0, "risk.state.r1", "the run's change comes last: {events:?}");
    r.stop().await;

    // A restarted reconciler recomputes the same status and publishes nothing new.
    let before = state_events(&feed).await.len();
    let r = spawn(&f.engine, config());
    let probe = file("r1", "s1", "a");
    feed.records(Source::Raw, &probe, [1]).await; // a duplicate within the window: not stored
    until(LONG, "the restarted reconciler is caught up", || async {
        let info = feed
            .engine
            .consumer_info(&feed.names.stream(Source::Events), &feed.names.consumer(Source::Events))
            .await
            .unwrap();
        (info.num_pending == 0 && info.num_ack_pending == 0).then_some(())
    })
    .await;
    r.stop().await;
    assert_eq!(state_events(&feed).await.len(), before);
    assert_eq!(feed.status("r1").await.unwrap().slices, st.slices);
}

async fn a_crash_between_the_write_and_the_ack_changes_no_count(f: Fixture) {
    let feed = Feed::new(f.engine.clone()).await;
    open(&feed, "r1", serde_json::json!({"slices": {"s1": {"files": ["a"]}}, "window_s": 600})).await;
    let a = file("r1", "s1", "a");
    feed.flow(&a, 300, &[10], &[20], &[30, 31]).await;

    // One round per tally write: a round of 100 per consumer reaches
    // `max_unwritten`, so the first round writes (and then fails).
    let mut crashing = config();
    crashing.batch = 100;
    crashing.max_unwritten = 100;
    crashing.fail_before_ack_after = Some(1);
    let r = spawn(&f.engine, crashing);
    let err = r.task.await.unwrap().unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Unavailable, "{err}");

    // The tally is written, the input is not acked.
    let tally = load_tally(&*f.engine, &feed.names, &a).await.unwrap().into_tally();
    assert_eq!(tally.count(Counted::Raw), 100);
    let info =
        f.engine.consumer_info(&feed.names.stream(Source::Raw), &feed.names.consumer(Source::Raw)).await.unwrap();
    assert_eq!((info.ack_floor, info.num_ack_pending), (Seq(0), 100));

    let mut normal = config();
    normal.batch = 100;
    let r = spawn(&f.engine, normal);
    let st = wait_state(&feed, "r1", Phase::Complete).await;
    let fa = &st.slices["s1"].files["a"];
    assert_eq!((fa.raw.actual, fa.enriched.actual, fa.validated.actual), (299, 299, 300));
    assert_eq!((fa.exceptions.ingest, fa.exceptions.enrich, fa.exceptions.validate), (1, 1, 2));
    r.stop().await;
    let tally = load_tally(&*f.engine, &feed.names, &a).await.unwrap().into_tally();
    assert_eq!(tally.count(Counted::Raw), 299, "the redelivered rows were not counted twice");
}

async fn a_duplicate_after_the_dedup_window_changes_no_count(f: Fixture) {
    // Stage streams with a short dedup window, made before the reconciler.
    let names = finmesh_pipeline::reconcile::Names::new("risk").unwrap();
    for s in [Source::Raw, Source::Validated, Source::Exceptions] {
        let mut c = StreamConfig::new(names.stream(s), names.stream_subjects(s));
        c.duplicate_window = Duration::from_millis(100);
        f.engine.create_stream(c).await.unwrap();
    }
    let feed = Feed::new(f.engine.clone()).await;
    open(&feed, "r1", serde_json::json!({"slices": {"s1": {"expected_files": 1}}, "window_s": 600})).await;
    let a = file("r1", "s1", "a");
    feed.flow(&a, 20, &[], &[], &[5]).await;
    let r = spawn(&f.engine, config());
    let before = wait_state(&feed, "r1", Phase::Complete).await;

    // Replay: the same ids, stored again once the window has passed. A
    // probe published after everything else tells when it has: once the
    // probe's own id is no longer a duplicate, no earlier id is either.
    let probe = file("probe", "s", "p");
    assert_eq!(feed.records(Source::Raw, &probe, [1]).await, 1);
    until(LONG, "the dedup window passed", || async {
        (feed.records(Source::Raw, &probe, [1]).await == 1).then_some(())
    })
    .await;
    assert_eq!(feed.records(Source::Raw, &a, 1..=20).await, 20, "the replay is stored, not deduplicated");
    assert_eq!(feed.records(Source::Validated, &a, [1, 2, 3]).await, 3);
    feed.exceptions(&a, "validate", [5]).await;
    let raw_info = f.engine.stream_info(&feed.names.stream(Source::Raw)).await.unwrap();
    assert_eq!(raw_info.state.messages, 20 + 2 + 20, "the replay really is in the stream");

    until(LONG, "the reconciler consumed the replay", || async {
        let mut done = true;
        for s in [Source::Raw, Source::Validated, Source::Exceptions] {
            let info = f.engine.consumer_info(&feed.names.stream(s), &feed.names.consumer(s)).await.unwrap();
            let last = f.engine.stream_info(&feed.names.stream(s)).await.unwrap().state.last_seq;
            done &= info.ack_floor == last && info.num_ack_pending == 0;
        }
        done.then_some(())
    })
    .await;
    r.stop().await;
    let after = feed.status("r1").await.unwrap();
    assert_eq!(after.slices, before.slices, "counts unchanged by the replay");
    assert_eq!(after.slices["s1"].files["a"].raw.actual, 20);
    let tally = load_tally(&*f.engine, &feed.names, &a).await.unwrap().into_tally();
    assert_eq!(
        (tally.count(Counted::Raw), tally.count(Counted::Validated), tally.count(Counted::ExcValidate)),
        (20, 19, 1)
    );
}

async fn a_large_file_is_counted_exactly_through_kills(f: Fixture) {
    // Three messages per row through a debug build on a shared 2-core
    // machine: 50k rows (150k messages) on the embedded engine, 20k on NATS.
    let rows: u32 = if f.kind == "nats" { 20_000 } else { 50_000 };
    let feed = Feed::new(f.engine.clone()).await;
    open(&feed, "big", serde_json::json!({"slices": {"s": {"files": ["big"]}}, "window_s": 3600})).await;
    let big = file("big", "s", "big");
    let ingest_bad: Vec<u32> = (0..50).map(|_| fastrand::u32(1..=rows)).collect();
    let validate_bad: Vec<u32> = (0..50).map(|_| fastrand::u32(1..=rows)).collect();
    let producer = {
        let feed = Feed::new(f.engine.clone()).await;
        let (big, ib, vb) = (big.clone(), ingest_bad.clone(), validate_bad.clone());
        tokio::spawn(async move { feed.flow(&big, rows, &ib, &[], &vb).await })
    };
    let mut c = config();
    c.batch = 2000;
    let started = std::time::Instant::now();
    let mut r = spawn(&f.engine, c.clone());
    // Kill the reconciler three times, each once it has counted past a random point.
    for _ in 0..3 {
        let mark = fastrand::u64(1..u64::from(rows));
        until(Duration::from_secs(500), "the tally passes a random mark", || async {
            let t = load_tally(&*f.engine, &feed.names, &big).await.ok()?.into_tally();
            (t.count(Counted::Raw) + t.count(Counted::Validated) >= mark).then_some(())
        })
        .await;
        r.kill().await;
        r = spawn(&f.engine, c.clone());
    }
    producer.await.unwrap();
    eprintln!("{rows} rows produced in {:?}", started.elapsed());
    let st = until(Duration::from_secs(500), "run big complete", || async {
        feed.status("big").await.filter(|s| s.state == Phase::Complete)
    })
    .await;
    r.stop().await;
    let fb = &st.slices["s"].files["big"];
    let distinct_ingest_bad = ingest_bad.iter().collect::<std::collections::BTreeSet<_>>().len() as u64;
    let records = u64::from(rows) - distinct_ingest_bad;
    assert_eq!((fb.raw.expected, fb.raw.actual), (Some(records), records));
    assert_eq!(fb.validated.actual, u64::from(rows));
    assert_eq!(fb.exceptions.ingest, distinct_ingest_bad);
    eprintln!("{rows} rows reconciled in {:?}", started.elapsed());
}

async fn a_missing_file_fails_its_slice_and_run_with_the_reason(f: Fixture) {
    let feed = Feed::new(f.engine.clone()).await;
    let opened = open(
        &feed,
        "w1",
        serde_json::json!({"slices": {"s1": {"files": ["a", "b"]}, "s2": {"expected_files": 2}}, "window_s": 2}),
    )
    .await;
    let r = spawn(&f.engine, config());
    feed.flow(&file("w1", "s1", "a"), 10, &[], &[], &[]).await;
    // File c of s2: ingested, 3 rows never reach the end.
    let c = file("w1", "s2", "c");
    feed.records(Source::Raw, &c, 1..=10).await;
    feed.ingested(&c, 10, 10, Timestamp::now()).await;
    feed.records(Source::Enriched, &c, 1..=10).await;
    feed.records(Source::Validated, &c, 1..=7).await;

    let st = wait_state(&feed, "w1", Phase::Failed).await;
    assert!(st.state_at.unwrap() > opened.spec.deadline);
    let has = |needle: &str| st.failures.iter().any(|f| f.contains(needle));
    assert!(has("slice s1: file b never arrived"), "{:?}", st.failures);
    assert!(has("slice s2: 1 of 2 expected files arrived (c)"), "{:?}", st.failures);
    assert!(has("slice s2, file c: stage validated has 7 of 10 rows, 3 missing"), "{:?}", st.failures);
    assert_eq!(st.failures.len(), 3, "{:?}", st.failures);
    assert_eq!(st.slices["s1"].state, Phase::Failed);
    assert_eq!(st.slices["s1"].missing, vec!["b".to_owned()]);
    assert_eq!(st.slices["s1"].files["a"].state, Phase::Complete);
    assert_eq!(st.slices["s2"].state, Phase::Failed);
    r.stop().await;
    let events = state_events(&feed).await;
    assert!(events.contains(&("risk.state.w1".to_owned(), "failed".to_owned())), "{events:?}");
    assert!(events.contains(&("risk.state.w1.s1".to_owned(), "failed".to_owned())), "{events:?}");
}

async fn a_late_file_is_reported_and_not_merged(f: Fixture) {
    let feed = Feed::new(f.engine.clone()).await;
    let opened = open(&feed, "l1", serde_json::json!({"slices": {"s1": {"expected_files": 1}}, "window_s": 600})).await;
    let r = spawn(&f.engine, config());
    feed.flow(&file("l1", "s1", "a"), 4, &[], &[], &[]).await;
    let done = wait_state(&feed, "l1", Phase::Complete).await;

    // A file whose ingest ended after the deadline, and one the spec does not know.
    let z = file("l1", "s1", "z");
    feed.records(Source::Raw, &z, 1..=3).await;
    feed.ingested(&z, 3, 3, opened.spec.deadline.saturating_add(Duration::from_secs(1))).await;
    feed.flow(&file("l1", "nope", "y"), 2, &[], &[], &[]).await;
    let st = until(LONG, "the late file reported", || async {
        feed.status("l1").await.filter(|s| !s.late.is_empty() && !s.unexpected.is_empty())
    })
    .await;
    assert_eq!(st.state, Phase::Complete, "a late file does not change a finished run");
    assert_eq!(st.state_at, done.state_at);
    assert_eq!((st.late[0].slice.as_str(), st.late[0].file.as_str(), st.late[0].rows), ("s1", "z", Some(3)));
    assert_eq!((st.unexpected[0].slice.as_str(), st.unexpected[0].file.as_str()), ("nope", "y"));
    assert!(!st.slices["s1"].files.contains_key("z"), "not merged");
    r.stop().await;
    let events = state_events(&feed).await;
    assert!(events.contains(&("risk.state.l1.s1.z".to_owned(), "late".to_owned())), "{events:?}");
}

async fn a_failed_ingest_fails_the_run_at_once(f: Fixture) {
    let feed = Feed::new(f.engine.clone()).await;
    open(&feed, "x1", serde_json::json!({"slices": {"s1": {"files": ["a", "b"]}}, "window_s": 3600})).await;
    let r = spawn(&f.engine, config());
    let a = file("x1", "s1", "a");
    feed.records(Source::Raw, &a, 1..=5).await;
    feed.failed(&a, "line 7: unbalanced quote").await;
    let st = wait_state(&feed, "x1", Phase::Failed).await;
    assert_eq!(st.failures, vec!["slice s1, file a: ingest failed: line 7: unbalanced quote".to_owned()]);
    assert_eq!(st.slices["s1"].files["a"].state, Phase::Failed);
    r.stop().await;
}

#[tokio::test]
async fn a_run_spec_is_checked_whole() {
    let e = request(serde_json::json!({"slices": {"s.1": {"files": ["a", "a"]}, "s2": {"files": ["b"], "expected_files": 1}, "s3": {}}, "deadline": "yesterday"}))
        .into_spec(Timestamp::now())
        .unwrap_err();
    let m = e.message();
    for needle in [
        "slice id `s.1`",
        "file `a` is listed twice",
        "slice `s2`: give `files` or `expected_files`, not both",
        "slice `s3`: give `files`",
        "deadline `yesterday`",
    ] {
        assert!(m.contains(needle), "{needle} in {m}");
    }
    let e = request(serde_json::json!({"slices": {"s": {"expected_files": 1}}, "deadline": "2001-01-01T00:00:00Z"}))
        .into_spec(Timestamp::now())
        .unwrap_err();
    assert!(e.message().contains("has already passed"), "{e}");
    assert!(serde_json::from_value::<RunRequest>(serde_json::json!({"slices": {}, "window": 3})).is_err());
}

#[tokio::test]
async fn reopening_a_run_with_another_spec_is_refused() {
    let f = recon_support::embedded().await;
    let feed = Feed::new(f.engine.clone()).await;
    let first = open(
        &feed,
        "r",
        serde_json::json!({"slices": {"s": {"expected_files": 1}}, "deadline": "2099-01-01T00:00:00Z"}),
    )
    .await;
    let again = open(
        &feed,
        "r",
        serde_json::json!({"slices": {"s": {"expected_files": 1}}, "deadline": "2099-01-01T00:00:00Z"}),
    )
    .await;
    assert_eq!(first, again);
    let relative = serde_json::json!({"slices": {"s": {"expected_files": 1}}, "window_s": 60});
    let first = open(&feed, "w", relative.clone()).await;
    assert_eq!(open(&feed, "w", relative).await, first, "the same relative window again");
    let other = request(serde_json::json!({"slices": {"s": {"expected_files": 2}}, "window_s": 5}))
        .into_spec(Timestamp::now())
        .unwrap();
    let e = open_run(&*f.engine, &feed.names, "r", other).await.unwrap_err();
    assert_eq!(e.kind(), ErrorKind::AlreadyExists);
}

/// A file's tally grows with its rows, so the reconciler must not rewrite it
/// once per fetched batch while messages keep coming: 3,000 rows (about
/// 9,000 messages) fetched 100 at a time are one flush, not 30+ writes.
#[tokio::test]
async fn a_tally_is_written_per_flush_not_per_batch() {
    let f = recon_support::embedded().await;
    let feed = Feed::new(f.engine.clone()).await;
    open(&feed, "bulk", serde_json::json!({"slices": {"s": {"files": ["a"]}}, "window_s": 600})).await;
    let a = file("bulk", "s", "a");
    feed.flow(&a, 3000, &[7], &[], &[9]).await;
    let mut c = config();
    c.batch = 100;
    c.ack_wait = Duration::from_secs(120);
    c.flush_every = Duration::from_secs(10);
    c.max_unwritten = 100_000;
    let r = spawn(&f.engine, c);
    let st = wait_state(&feed, "bulk", Phase::Complete).await;
    r.stop().await;
    assert_eq!(st.slices["s"].files["a"].validated.actual, 3000);
    // Every write to the bucket (tallies and run documents) takes a revision.
    let revision = load_tally(&*f.engine, &feed.names, &a).await.unwrap().revision();
    assert!(revision.0 < 10, "the tally was rewritten per batch: bucket revision {}", revision.0);
}
