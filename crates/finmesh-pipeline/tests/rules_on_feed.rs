//! The two halves of the risk-feed pipeline agree: a generated feed, ingested
//! against `examples/pipeline/risk.avsc` and validated with
//! `examples/pipeline/rules.txt` (reference data from `currencies.csv` and
//! `books.csv`), fails each issue rule on exactly the rows the generator made
//! fail it, and no other rule on any row.

use std::collections::{BTreeMap, HashSet};
use std::sync::Arc;

use apache_avro::reader::datum::GenericDatumReader;
use finmesh_pipeline::feedgen::{self, GenOptions, RuleFailShares};
use finmesh_pipeline::{IngestOptions, IngestSchema, ReaderOptions, RowReader, ingest};
use finmesh_rules::{DatasetId, Datasets, FieldRef, KeyType, Lookup, RuleSet};

const EXAMPLES: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../../examples/pipeline");

/// The first column of each reference CSV, per dataset id.
struct RefData(Vec<HashSet<String>>);

impl RefData {
    fn load(files: &[&str]) -> RefData {
        RefData(
            files
                .iter()
                .map(|f| {
                    let mut r = csv::Reader::from_path(format!("{EXAMPLES}/{f}")).unwrap();
                    r.records().map(|row| row.unwrap()[0].to_string()).collect()
                })
                .collect(),
        )
    }
}

impl Lookup for RefData {
    fn contains(&self, dataset: DatasetId, key: &FieldRef<'_>) -> bool {
        matches!(key, FieldRef::Str(s) if self.0[dataset.0 as usize].contains(*s))
    }
}

#[test]
fn the_example_rules_fail_exactly_the_rows_the_generator_broke() {
    let opts = GenOptions {
        rows: 4_000,
        seed: fastrand::u64(..),
        bad_share: 0.05,
        rule_fail: RuleFailShares {
            notional_not_positive: 0.03,
            unknown_currency: 0.02,
            maturity_out_of_range: 0.04,
            counterparty_null_or_desk_not_rates_fx: 0.05,
        },
        ..GenOptions::default()
    };
    let mut csv = Vec::new();
    let summary = feedgen::generate(&mut csv, &opts).unwrap();

    let schema = Arc::new(IngestSchema::load(format!("{EXAMPLES}/risk.avsc")).unwrap());
    let datasets = Datasets::new().with("currencies", KeyType::String).with("books", KeyType::String);
    let src = std::fs::read_to_string(format!("{EXAMPLES}/rules.txt")).unwrap();
    let rules = RuleSet::compile(&src, schema.avro(), &datasets).expect("rules.txt type-checks against risk.avsc");
    let refdata = RefData::load(&["currencies.csv", "books.csv"]);

    let reader = RowReader::new(&csv[..], schema.clone(), "feed", ReaderOptions::default()).unwrap();
    let decoder = GenericDatumReader::builder(schema.avro()).build().unwrap();
    let mut failures = rules.failure_buffer();
    let mut by_rule: BTreeMap<String, u64> = BTreeMap::new();
    let (mut passed, mut failed_once) = (0, 0);
    let report = ingest(
        reader,
        &IngestOptions::default(),
        |batch| {
            for r in &batch.records {
                let value = decoder.read_value(&mut &r.avro[..]).unwrap();
                if rules.evaluate_avro(&value, &refdata, &mut failures).unwrap() {
                    passed += 1;
                } else {
                    failed_once += u64::from(failures.len() == 1);
                }
                for &id in failures.iter() {
                    *by_rule.entry(rules.name(id).to_string()).or_default() += 1;
                }
            }
            Ok::<(), std::convert::Infallible>(())
        },
        |_| {},
    )
    .unwrap();

    let seed = opts.seed;
    assert_eq!(report.exceptions, summary.bad, "seed {seed}: {summary:?}");
    assert_eq!(passed, summary.good, "seed {seed}: {by_rule:?}");
    assert_eq!(failed_once, summary.rule_fails, "seed {seed}: every failing row breaks one rule: {by_rule:?}");
    let want: BTreeMap<String, u64> = [
        ("notional_positive", summary.notional_not_positive),
        ("ccy_known", summary.unknown_currency),
        ("maturity", summary.maturity_out_of_range),
        ("cpty", summary.counterparty_null_or_desk_not_rates_fx),
    ]
    .into_iter()
    .filter(|(_, n)| *n > 0)
    .map(|(k, n)| (k.to_string(), n))
    .collect();
    assert_eq!(by_rule, want, "seed {seed}");
}
