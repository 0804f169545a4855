//! The example rules (`examples/pipeline/rules.txt`) on risk records: every
//! failing rule is reported, nulls follow the documented semantics, and a
//! record decoded from Avro bytes evaluates like the one it was built from.

mod common;

use apache_avro::reader::datum::GenericDatumReader;
use apache_avro::types::Value;
use apache_avro::writer::datum::GenericDatumWriter;
use common::{RefData, Trade, datasets, good_trade, risk_schema, sample_rules};
use finmesh_rules::{ErrorKind, FieldRef, KeyType, NoLookup, RuleId, RuleSet, ShapeError, Truth, check_file};

fn sample() -> RuleSet {
    RuleSet::compile(&sample_rules(), &risk_schema(), &datasets()).expect("the sample rules compile")
}

fn failing(rules: &RuleSet, trade: &Trade) -> Vec<String> {
    let mut failures = rules.failure_buffer();
    rules.evaluate_avro(&trade.to_value(), &RefData::new(), &mut failures).unwrap();
    failures.iter().map(|&id| rules.name(id).to_string()).collect()
}

#[test]
fn a_good_trade_passes_every_rule() {
    let rules = sample();
    assert_eq!(rules.len(), 13);
    assert_eq!(failing(&rules, &good_trade()), Vec::<String>::new());
}

#[test]
fn every_failing_rule_of_a_record_is_reported_in_file_order() {
    let rules = sample();
    let mut t = good_trade();
    t.notional = -500;
    t.ccy = "XXX".into();
    t.maturity = 45_000; // 2093
    t.desk = 2; // CREDIT
    t.trade_id = String::new();
    t.version = 0;
    assert_eq!(
        failing(&rules, &t),
        ["notional_positive", "ccy_known", "maturity", "cpty", "trade_id_present", "version_positive"]
    );
}

#[test]
fn null_fields_fail_comparisons_unless_the_rule_allows_null() {
    let rules = sample();
    let mut t = good_trade();
    t.counterparty = None;
    t.price = None;
    t.delta = None;
    // cpty needs a counterparty; price allows null; rates_have_delta needs delta on RATES.
    assert_eq!(failing(&rules, &t), ["cpty", "rates_have_delta"]);
    t.desk = 1; // FX: delta no longer required, EUR is a major
    assert_eq!(failing(&rules, &t), ["cpty"]);
}

#[test]
fn comparisons_with_null_are_unknown_and_not_keeps_them_unknown() {
    let schema = apache_avro::Schema::parse_str(
        r#"{"type":"record","name":"R","fields":[{"name":"x","type":["null","long"]}]}"#,
    )
    .unwrap();
    let src = "rule gt: x > 0\nrule not_gt: NOT (x > 0)\nrule ne: x != 0\nrule is_null: x NULL\n\
               rule null_or_gt: x NULL OR x > 0\nrule not_in: x NOT IN (1, 2)\nrule or_true: x > 0 OR TRUE\n";
    let rules = RuleSet::compile(src, &schema, &finmesh_rules::Datasets::new()).unwrap();
    let null = [FieldRef::Null];
    let truths: Vec<Truth> = rules.ids().map(|id| rules.evaluate_rule(id, &null[..], &NoLookup)).collect();
    use Truth::*;
    assert_eq!(truths, [Unknown, Unknown, Unknown, True, True, Unknown, True]);
    let mut failures = rules.failure_buffer();
    assert!(!rules.evaluate(&null[..], &NoLookup, &mut failures));
    let names: Vec<&str> = failures.iter().map(|&id| rules.name(id)).collect();
    assert_eq!(names, ["gt", "not_gt", "ne", "not_in"]);
}

#[test]
fn records_decoded_from_avro_bytes_evaluate_like_the_built_ones() {
    let rules = sample();
    let schema = risk_schema();
    let writer = GenericDatumWriter::builder(&schema).build().unwrap();
    let reader = GenericDatumReader::builder(&schema).build().unwrap();
    for trade in common::trade_batch(200) {
        let bytes = writer.write_value_to_vec(trade.to_value()).unwrap();
        let decoded = reader.read_value(&mut bytes.as_slice()).unwrap();
        let (mut a, mut b, mut c) = (rules.failure_buffer(), rules.failure_buffer(), rules.failure_buffer());
        rules.evaluate_avro(&decoded, &RefData::new(), &mut a).unwrap();
        rules.evaluate_avro(&trade.to_value(), &RefData::new(), &mut b).unwrap();
        rules.evaluate(trade.to_field_refs().as_slice(), &RefData::new(), &mut c);
        assert_eq!(a, b, "{trade:?}");
        assert_eq!(a, c, "{trade:?}");
    }
}

#[test]
fn the_batch_mixes_passing_and_failing_records() {
    let rules = sample();
    let mut failures = rules.failure_buffer();
    let batch = common::trade_batch(1000);
    let passed =
        batch.iter().filter(|t| rules.evaluate_avro(&t.to_value(), &RefData::new(), &mut failures).unwrap()).count();
    assert!(passed > 0 && passed < batch.len(), "{passed}");
}

#[test]
fn values_that_are_not_records_of_the_schema_are_refused() {
    let rules = sample();
    let mut failures = rules.failure_buffer();
    let short = Value::Record(vec![("trade_id".into(), Value::String("x".into()))]);
    assert_eq!(rules.evaluate_avro(&short, &NoLookup, &mut failures), Err(ShapeError { expected: 17, found: Some(1) }));
    assert_eq!(
        rules.evaluate_avro(&Value::Null, &NoLookup, &mut failures),
        Err(ShapeError { expected: 17, found: None })
    );
}

#[test]
fn lookup_on_an_enum_key_passes_the_symbol() {
    let schema = common::risk_schema();
    let datasets = finmesh_rules::Datasets::new().with("desks", KeyType::String);
    let rules = RuleSet::compile("rule d: LOOKUP(desks, desk)", &schema, &datasets).unwrap();
    let only_fx = |_, key: &FieldRef<'_>| *key == FieldRef::Str("FX");
    let mut t = good_trade();
    let mut failures = rules.failure_buffer();
    assert!(!rules.evaluate_avro(&t.to_value(), &only_fx, &mut failures).unwrap());
    t.desk = 1;
    assert!(rules.evaluate_avro(&t.to_value(), &only_fx, &mut failures).unwrap());
}

#[test]
fn each_rule_keeps_its_text_for_exception_records() {
    let rules = sample();
    let cpty = rules.id("cpty").unwrap();
    assert_eq!(rules.text(cpty), "counterparty NOT NULL AND (desk = \"RATES\" OR desk = \"FX\")");
    let multi = RuleSet::compile(
        "rule a:\n  notional > 0 # positive\n  AND pv > 0\n\n# next\nrule b: (pv < 1)",
        &risk_schema(),
        &datasets(),
    )
    .unwrap();
    assert_eq!(multi.text(RuleId(0)), "notional > 0 # positive\n  AND pv > 0");
    assert_eq!(multi.text(RuleId(1)), "(pv < 1)");
}

#[test]
fn uses_are_listed_for_the_stage() {
    let rules = sample();
    let used: Vec<&str> = rules.fields_used().iter().map(|&i| rules.field_name(i).unwrap()).collect();
    assert_eq!(
        used,
        [
            "trade_id",
            "book",
            "desk",
            "counterparty",
            "ccy",
            "notional",
            "price",
            "trade_date",
            "maturity",
            "as_of",
            "pv",
            "delta",
            "version"
        ]
    );
    assert_eq!(rules.datasets_used().len(), 2);
}

#[test]
fn check_file_summarises_the_example_and_renders_errors_with_the_path() {
    let dir = common::examples_dir();
    let summary = check_file(&dir.join("rules.txt"), &dir.join("risk.avsc"), &datasets()).unwrap();
    assert_eq!(summary.rules.len(), 13);
    assert_eq!(summary.datasets_used, ["currencies", "books"]);
    assert!(summary.to_string().starts_with("13 rules; fields read: trade_id, book, desk,"), "{summary}");
    assert!(summary.to_string().ends_with("; datasets: currencies, books"), "{summary}");

    let tmp = tempfile::tempdir().unwrap();
    let bad = tmp.path().join("bad.rules");
    std::fs::write(&bad, "rule a: notional > 0\nrule b: LOOKUP(ccys, ccy)\n").unwrap();
    let errors = check_file(&bad, &dir.join("risk.avsc"), &datasets()).unwrap_err();
    assert_eq!(errors.len(), 1);
    assert_eq!((errors[0].kind, errors[0].line, errors[0].col), (ErrorKind::UnknownDataset, 2, 16));
    assert!(errors[0].text.starts_with(&format!("{}:2:16: unknown reference dataset `ccys`", bad.display())));

    let missing = check_file(&tmp.path().join("none"), &tmp.path().join("none.avsc"), &datasets()).unwrap_err();
    assert_eq!(missing.len(), 2);
    assert!(missing.iter().all(|e| e.kind == ErrorKind::File));

    let schema = tmp.path().join("bad.avsc");
    std::fs::write(&schema, "{\"type\": \"strin\"}").unwrap();
    let errors = check_file(&bad, &schema, &datasets()).unwrap_err();
    assert_eq!(errors[0].kind, ErrorKind::Schema);
    std::fs::write(&schema, "\"string\"").unwrap();
    let errors = check_file(&bad, &schema, &datasets()).unwrap_err();
    assert_eq!(errors[0].kind, ErrorKind::Schema);
    assert!(errors[0].message.contains("must be a record"), "{:?}", errors[0]);
}

#[test]
fn a_rule_set_can_be_shared_across_threads() {
    fn shared<T: Send + Sync + 'static>() {}
    shared::<RuleSet>();
    shared::<finmesh_rules::Datasets>();
    let rules = std::sync::Arc::new(sample());
    let handles: Vec<_> = (0..2)
        .map(|i| {
            let rules = rules.clone();
            std::thread::spawn(move || {
                let mut t = good_trade();
                t.notional = if i == 0 { 100 } else { -100 };
                failing(&rules, &t)
            })
        })
        .collect();
    let results: Vec<Vec<String>> = handles.into_iter().map(|h| h.join().unwrap()).collect();
    assert_eq!(results, [vec![], vec!["notional_positive".to_string()]]);
}
