//! Generated risk feeds through the ingest driver: every injected defect is
//! found where it should be (bad rows as exceptions, rule-failing rows as
//! records carrying the failing values), in batches, with progress.

use std::collections::HashSet;
use std::sync::Arc;

use apache_avro::reader::datum::GenericDatumReader;
use apache_avro::types::Value;
use finmesh_pipeline::feedgen::{self, GenOptions, RuleFailShares};
use finmesh_pipeline::{IngestError, IngestOptions, IngestSchema, ReaderOptions, RowReader, ingest};

const EXAMPLES: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../../examples/pipeline");

fn risk() -> Arc<IngestSchema> {
    Arc::new(IngestSchema::load(format!("{EXAMPLES}/risk.avsc")).unwrap())
}

fn decimal_to_i128(v: &Value) -> i128 {
    let Value::Decimal(d) = v else { panic!("decimal, got {v:?}") };
    let bytes = <Vec<u8>>::try_from(d).unwrap();
    let mut wide = [if bytes[0] & 0x80 != 0 { 0xFF } else { 0 }; 16];
    wide[16 - bytes.len()..].copy_from_slice(&bytes);
    i128::from_be_bytes(wide)
}

#[test]
fn generated_defects_are_found_where_they_belong() {
    let opts = GenOptions {
        rows: 5_000,
        seed: fastrand::u64(..),
        bad_share: 0.04,
        rule_fail: RuleFailShares {
            notional_not_positive: 0.02,
            unknown_currency: 0.02,
            maturity_out_of_range: 0.02,
            counterparty_null_or_desk_not_rates_fx: 0.02,
        },
        ..GenOptions::default()
    };
    let mut csv = Vec::new();
    let summary = feedgen::generate(&mut csv, &opts).unwrap();
    let schema = risk();
    let reader = RowReader::new(&csv[..], schema.clone(), "feed-1", ReaderOptions::default()).unwrap();
    let mut batches = Vec::new();
    let mut progress = Vec::new();
    let report = ingest(
        reader,
        &IngestOptions { batch_rows: 700, progress_every: 1_000, ..Default::default() },
        |b| {
            batches.push(b);
            Ok::<(), std::convert::Infallible>(())
        },
        |p| progress.push(*p),
    )
    .unwrap();
    assert_eq!(report.rows, opts.rows, "seed {}", opts.seed);
    assert_eq!(report.exceptions, summary.bad, "seed {}: {summary:?}", opts.seed);
    assert_eq!(report.records, summary.good + summary.rule_fails);
    assert_eq!(report.bytes, csv.len() as u64);
    assert!(batches.iter().all(|b| !b.is_empty() && b.rows() <= 700));
    assert_eq!(batches.iter().map(|b| b.rows() as u64).sum::<u64>(), opts.rows);
    assert_eq!(progress.iter().map(|p| p.rows).collect::<Vec<_>>(), vec![1400, 2100, 3500, 4200, 5000, 5000]);
    assert!(progress.iter().all(|p| p.rows == p.records + p.exceptions));

    let known: HashSet<&str> = feedgen::CURRENCIES.iter().map(|c| c.0).collect();
    let (lo, hi) = (18_262, 40_542); // 2020-01-01, 2080-12-31
    let (mut nonpositive, mut unknown, mut out_of_range, mut cpty_rule) = (0, 0, 0, 0);
    let decoder = GenericDatumReader::builder(schema.avro()).build().unwrap();
    let mut ids = HashSet::new();
    for r in batches.iter().flat_map(|b| &b.records) {
        assert!(ids.insert(r.row), "rows are unique");
        let Value::Record(f) = decoder.read_value(&mut &r.avro[..]).unwrap() else { panic!() };
        let get = |name: &str| &f.iter().find(|(n, _)| n == name).unwrap().1;
        if decimal_to_i128(get("notional")) <= 0 {
            nonpositive += 1;
        }
        if let Value::String(c) = get("ccy")
            && !known.contains(c.as_str())
        {
            unknown += 1;
        }
        if let Value::Date(d) = get("maturity")
            && !(lo..=hi).contains(d)
        {
            out_of_range += 1;
        }
        let rates_fx = matches!(get("desk"), Value::Enum(0 | 1, _));
        if !rates_fx || *get("counterparty") == Value::Union(0, Box::new(Value::Null)) {
            cpty_rule += 1;
        }
    }
    assert_eq!(nonpositive, summary.notional_not_positive);
    assert_eq!(unknown, summary.unknown_currency);
    assert_eq!(out_of_range, summary.maturity_out_of_range);
    assert_eq!(cpty_rule, summary.counterparty_null_or_desk_not_rates_fx);
    let mut kinds: Vec<&str> = batches.iter().flat_map(|b| &b.exceptions).map(|e| e.reason.kind()).collect();
    kinds.sort();
    kinds.dedup();
    assert_eq!(kinds, vec!["empty", "field_count", "parse"], "seed {}", opts.seed);
}

#[test]
fn a_failing_sink_stops_ingest_and_a_file_error_keeps_the_counts() {
    let mut csv = Vec::new();
    feedgen::generate(&mut csv, &GenOptions { rows: 100, seed: fastrand::u64(..), ..GenOptions::default() }).unwrap();
    let reader = RowReader::new(&csv[..], risk(), "f", ReaderOptions::default()).unwrap();
    let mut calls = 0;
    let err = ingest(
        reader,
        &IngestOptions { batch_rows: 30, progress_every: 10, ..Default::default() },
        |_| {
            calls += 1;
            if calls == 2 { Err("publisher down") } else { Ok(()) }
        },
        |_| {},
    )
    .unwrap_err();
    let IngestError::Sink { error, report } = err else { panic!("sink error") };
    assert_eq!((error, report.rows), ("publisher down", 60));

    csv.extend_from_slice(b"T,B,RATES,\"never closed,USD,1,2031-01-01,1,1,1,1,2026-12-01T18:00:00Z\n");
    let reader = RowReader::new(&csv[..], risk(), "f", ReaderOptions::default()).unwrap();
    let mut published = 0;
    let err = ingest(
        reader,
        &IngestOptions::default(),
        |b| {
            published += b.rows();
            Ok::<(), ()>(())
        },
        |_| {},
    )
    .unwrap_err();
    let IngestError::File { error, report } = err else { panic!("file error") };
    assert_eq!(error.kind(), "unterminated_quote");
    assert_eq!((report.rows, published), (100, 100), "rows before the error are counted and published");
}

/// The sample files under `examples/pipeline/` are what the generator makes;
/// `FINMESH_BLESS=1` rewrites them.
#[test]
fn examples_match_the_generator() {
    let mut sample = Vec::new();
    feedgen::generate(&mut sample, &feedgen::sample_options()).unwrap();
    let currencies = feedgen::currencies_csv();
    let books = feedgen::books_csv();
    if std::env::var_os("FINMESH_BLESS").is_some() {
        std::fs::write(format!("{EXAMPLES}/risk-sample.csv"), &sample).unwrap();
        std::fs::write(format!("{EXAMPLES}/currencies.csv"), &currencies).unwrap();
        std::fs::write(format!("{EXAMPLES}/books.csv"), &books).unwrap();
    }
    assert_eq!(std::fs::read(format!("{EXAMPLES}/risk-sample.csv")).unwrap(), sample);
    assert_eq!(std::fs::read_to_string(format!("{EXAMPLES}/currencies.csv")).unwrap(), currencies);
    assert_eq!(std::fs::read_to_string(format!("{EXAMPLES}/books.csv")).unwrap(), books);
    let reader = RowReader::new(&sample[..], risk(), "sample", ReaderOptions::default()).unwrap();
    let report = ingest(reader, &IngestOptions::default(), |_| Ok::<(), ()>(()), |_| {}).unwrap();
    assert!(report.exceptions > 0 && report.records > report.exceptions, "{report}");
}
