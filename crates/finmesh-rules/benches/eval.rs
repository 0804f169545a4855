//! Rule evaluation throughput: the example rules (`examples/pipeline/rules.txt`,
//! 13 rules) over a pre-decoded batch of 10,000 risk records, in rule checks
//! per second (criterion's "elements" = records × rules).
//!
//! - `field_ref_view`: records as a stage that decodes itself hands them over
//!   (`&[FieldRef]`), the allocation-free path;
//! - `avro_value_view`: records as `apache_avro` decodes them (`Value::Record`),
//!   nullable decimal `price` set on two thirds of them (each read allocates);
//! - `avro_value_view_no_decimals`: the same with every `price` null.
//!
//! Run: `cargo bench -p finmesh-rules -- --measurement-time 3`. Figures: BENCHMARKS.md.

#[path = "../tests/common/mod.rs"]
mod common;

use std::hint::black_box;

use apache_avro::types::Value;
use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use finmesh_rules::{FieldRef, RuleSet};

const RECORDS: usize = 10_000;

fn eval(c: &mut Criterion) {
    let rules = RuleSet::compile(&common::sample_rules(), &common::risk_schema(), &common::datasets()).unwrap();
    let lookup = common::RefData::new();
    let trades = common::trade_batch(RECORDS);
    let views: Vec<Vec<FieldRef<'_>>> = trades.iter().map(|t| t.to_field_refs()).collect();
    let values: Vec<Value> = trades.iter().map(|t| t.to_value()).collect();
    let without_decimals: Vec<Value> = trades
        .iter()
        .map(|t| {
            let mut t = t.clone();
            t.price = None;
            t.to_value()
        })
        .collect();
    let mut failures = rules.failure_buffer();

    let mut group = c.benchmark_group("rules");
    group.throughput(Throughput::Elements((RECORDS * rules.len()) as u64));
    group.bench_function("field_ref_view", |b| {
        b.iter(|| {
            let mut failed = 0;
            for view in &views {
                failed += usize::from(!rules.evaluate(black_box(view.as_slice()), &lookup, &mut failures));
            }
            failed
        })
    });
    for (name, batch) in [("avro_value_view", &values), ("avro_value_view_no_decimals", &without_decimals)] {
        group.bench_function(name, |b| {
            b.iter(|| {
                let mut failed = 0;
                for value in batch {
                    failed += usize::from(!rules.evaluate_avro(black_box(value), &lookup, &mut failures).unwrap());
                }
                failed
            })
        });
    }
    group.finish();
}

criterion_group!(benches, eval);
criterion_main!(benches);
