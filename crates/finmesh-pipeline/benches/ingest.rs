//! Ingest throughput on one core against its ceiling, the csv crate alone.
//!
//! One generated risk feed of 200,000 rows (1% bad rows, 4% rule-failing)
//! is read from memory by:
//! - `csv_alone`: `csv::Reader::read_byte_record` in a loop (the ceiling);
//! - `ingest`: `RowReader::next_row` to the end: parse, coerce, encode to
//!   Avro, split into records and exceptions (the shipped path);
//! - `apache_avro_value`: the csv crate, then `coerce::cell_value` per
//!   field into an `apache_avro` `Value::Record` and `GenericDatumWriter`
//!   (the path the hand encoder replaces, for comparison).
//!
//! Throughput is in rows (elements); MB/s = rows/s × bytes per row, with
//! bytes per row printed at start. Run:
//! `cargo bench -p finmesh-pipeline -- --measurement-time 5`.

use std::hint::black_box;
use std::sync::Arc;

use apache_avro::types::Value;
use apache_avro::writer::datum::GenericDatumWriter;
use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use finmesh_pipeline::feedgen::{self, GenOptions, RuleFailShares};
use finmesh_pipeline::schema::Source;
use finmesh_pipeline::{IngestSchema, ReaderOptions, RowReader, coerce};

const ROWS: u64 = 200_000;

fn feed() -> Vec<u8> {
    let opts = GenOptions {
        rows: ROWS,
        seed: 20_261_202,
        bad_share: 0.01,
        rule_fail: RuleFailShares {
            notional_not_positive: 0.01,
            unknown_currency: 0.01,
            maturity_out_of_range: 0.01,
            counterparty_null_or_desk_not_rates_fx: 0.01,
        },
        ..GenOptions::default()
    };
    let mut csv = Vec::new();
    feedgen::generate(&mut csv, &opts).expect("generate");
    csv
}

fn bench(c: &mut Criterion) {
    let csv = feed();
    let schema = Arc::new(IngestSchema::parse(include_str!("../../../examples/pipeline/risk.avsc")).expect("schema"));
    eprintln!("feed: {ROWS} rows, {} bytes ({:.1} bytes/row)", csv.len(), csv.len() as f64 / ROWS as f64);
    let mut g = c.benchmark_group("ingest_200k");
    g.sample_size(10);
    g.throughput(Throughput::Elements(ROWS));

    g.bench_function("csv_alone", |b| {
        b.iter(|| {
            let mut r = csv::ReaderBuilder::new().flexible(true).from_reader(&csv[..]);
            let mut rec = csv::ByteRecord::new();
            let mut n = 0u64;
            while r.read_byte_record(&mut rec).expect("read") {
                n += rec.len() as u64;
            }
            black_box(n)
        })
    });

    g.bench_function("ingest", |b| {
        b.iter(|| {
            let mut r = RowReader::new(&csv[..], schema.clone(), "bench", ReaderOptions::default()).expect("open");
            while let Some(row) = r.next_row().expect("row") {
                black_box(row);
            }
            assert_eq!(r.progress().rows, ROWS);
        })
    });

    g.bench_function("apache_avro_value", |b| {
        let writer = GenericDatumWriter::builder(schema.avro()).build().expect("writer");
        b.iter(|| {
            let mut r = csv::ReaderBuilder::new().flexible(true).from_reader(&csv[..]);
            let header: Vec<String> = r.headers().expect("header").iter().map(str::to_string).collect();
            let map = schema.map_header(&header).expect("map");
            let mut rec = csv::ByteRecord::new();
            let mut ok = 0u64;
            while r.read_byte_record(&mut rec).expect("read") {
                if rec.len() != header.len() {
                    continue;
                }
                let fields: Result<Vec<(String, Value)>, _> = schema
                    .fields()
                    .iter()
                    .zip(map.sources())
                    .map(|(f, s)| match s {
                        Source::Column(i) => coerce::cell_value(f, &rec[*i]).map(|v| (f.name.clone(), v)),
                        Source::Default => Ok((f.name.clone(), f.default_value.clone().expect("default"))),
                    })
                    .collect();
                if let Ok(fields) = fields {
                    black_box(writer.write_value_to_vec(Value::Record(fields)).expect("encode"));
                    ok += 1;
                }
            }
            black_box(ok)
        })
    });
    g.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
