//! Shared by the tests and the benchmark: the example risk schema and rules
//! (`examples/pipeline/`), reference data, and risk records.
#![allow(dead_code)]

use std::collections::HashSet;
use std::path::PathBuf;

use apache_avro::Schema;
use apache_avro::types::Value;
use finmesh_rules::{DatasetId, Datasets, FieldRef, KeyType, Lookup};

pub fn examples_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../examples/pipeline")
}

pub fn risk_schema() -> Schema {
    Schema::parse_str(&std::fs::read_to_string(examples_dir().join("risk.avsc")).unwrap()).unwrap()
}

pub fn sample_rules() -> String {
    std::fs::read_to_string(examples_dir().join("rules.txt")).unwrap()
}

/// `currencies` (id 0) and `books` (id 1), both keyed by string.
pub fn datasets() -> Datasets {
    Datasets::new().with("currencies", KeyType::String).with("books", KeyType::String)
}

/// In-memory reference data for `datasets()`.
pub struct RefData {
    sets: [HashSet<String>; 2],
}

impl RefData {
    pub fn new() -> RefData {
        let currencies = ["USD", "EUR", "GBP", "JPY", "CHF", "AUD", "CAD", "SEK"];
        let books = ["RATES-LDN-1", "RATES-NY-1", "FX-LDN-1", "CREDIT-LDN-1"];
        RefData {
            sets: [currencies.iter().map(|s| s.to_string()).collect(), books.iter().map(|s| s.to_string()).collect()],
        }
    }
}

impl Lookup for RefData {
    fn contains(&self, dataset: DatasetId, key: &FieldRef<'_>) -> bool {
        match key {
            FieldRef::Str(s) => self.sets[dataset.0 as usize].contains(*s),
            _ => false,
        }
    }
}

pub const DESKS: [&str; 4] = ["RATES", "FX", "CREDIT", "EQ"];

/// One risk-feed row, in the fields of `risk.avsc`.
#[derive(Clone, Debug)]
pub struct Trade {
    pub trade_id: String,
    pub book: String,
    pub desk: u32,
    pub counterparty: Option<String>,
    pub ccy: String,
    /// Unscaled, scale 2 (cents).
    pub notional: i64,
    /// Unscaled, scale 6.
    pub price: Option<i64>,
    pub quantity: i64,
    pub trade_date: i32,
    pub maturity: i32,
    pub as_of_millis: i64,
    pub pv: f64,
    pub delta: Option<f64>,
    pub gamma: Option<f64>,
    pub vega: Option<f64>,
    pub version: i32,
    pub is_cleared: bool,
}

/// 2025-06-30T18:00:00Z in milliseconds.
pub const AS_OF: i64 = 1_751_306_400_000;

/// A trade that passes every sample rule.
pub fn good_trade() -> Trade {
    Trade {
        trade_id: "T-000001".into(),
        book: "RATES-LDN-1".into(),
        desk: 0,
        counterparty: Some("ACME BANK".into()),
        ccy: "EUR".into(),
        notional: 1_000_000_000,
        price: Some(101_250_000),
        quantity: 10,
        trade_date: 20_000,
        maturity: 23_000,
        as_of_millis: AS_OF,
        pv: 12_345.67,
        delta: Some(0.52),
        gamma: None,
        vega: Some(-0.01),
        version: 1,
        is_cleared: true,
    }
}

fn nullable(v: Option<Value>) -> Value {
    match v {
        None => Value::Union(0, Box::new(Value::Null)),
        Some(v) => Value::Union(1, Box::new(v)),
    }
}

fn decimal(unscaled: i64) -> Value {
    let bytes = unscaled.to_be_bytes();
    // Minimal two's-complement width, as Avro writers emit.
    let mut start = 0;
    while start < 7 {
        let (b, next) = (bytes[start], bytes[start + 1]);
        if (b == 0x00 && next & 0x80 == 0) || (b == 0xFF && next & 0x80 != 0) {
            start += 1;
        } else {
            break;
        }
    }
    Value::Decimal(apache_avro::Decimal::from(&bytes[start..]))
}

impl Trade {
    /// The record as `apache_avro::from_avro_datum` yields it for `risk.avsc`.
    pub fn to_value(&self) -> Value {
        Value::Record(vec![
            ("trade_id".into(), Value::String(self.trade_id.clone())),
            ("book".into(), Value::String(self.book.clone())),
            ("desk".into(), Value::Enum(self.desk, DESKS[self.desk as usize].into())),
            ("counterparty".into(), nullable(self.counterparty.clone().map(Value::String))),
            ("ccy".into(), Value::String(self.ccy.clone())),
            ("notional".into(), decimal(self.notional)),
            ("price".into(), nullable(self.price.map(decimal))),
            ("quantity".into(), Value::Long(self.quantity)),
            ("trade_date".into(), Value::Date(self.trade_date)),
            ("maturity".into(), Value::Date(self.maturity)),
            ("as_of".into(), Value::TimestampMillis(self.as_of_millis)),
            ("pv".into(), Value::Double(self.pv)),
            ("delta".into(), nullable(self.delta.map(Value::Double))),
            ("gamma".into(), nullable(self.gamma.map(Value::Double))),
            ("vega".into(), nullable(self.vega.map(Value::Double))),
            ("version".into(), Value::Int(self.version)),
            ("is_cleared".into(), Value::Boolean(self.is_cleared)),
        ])
    }

    /// The record as a stage that decodes itself would hand it over: no Avro values at all.
    pub fn to_field_refs(&self) -> Vec<FieldRef<'_>> {
        let opt_f = |v: Option<f64>| v.map_or(FieldRef::Null, FieldRef::Float);
        vec![
            FieldRef::Str(&self.trade_id),
            FieldRef::Str(&self.book),
            FieldRef::Enum(self.desk),
            self.counterparty.as_deref().map_or(FieldRef::Null, FieldRef::Str),
            FieldRef::Str(&self.ccy),
            FieldRef::Decimal(i128::from(self.notional)),
            self.price.map_or(FieldRef::Null, |p| FieldRef::Decimal(i128::from(p))),
            FieldRef::Int(self.quantity),
            FieldRef::Date(self.trade_date),
            FieldRef::Date(self.maturity),
            FieldRef::Timestamp(self.as_of_millis),
            FieldRef::Float(self.pv),
            opt_f(self.delta),
            opt_f(self.gamma),
            opt_f(self.vega),
            FieldRef::Int(i64::from(self.version)),
            FieldRef::Bool(self.is_cleared),
        ]
    }
}

/// A deterministic mix of trades: most pass, some break one or several rules.
pub fn trade_batch(n: usize) -> Vec<Trade> {
    let ccys = ["USD", "EUR", "GBP", "JPY", "XXX", "CHF", "AUD"];
    let books = ["RATES-LDN-1", "RATES-NY-1", "FX-LDN-1", "CREDIT-LDN-1", "UNKNOWN", "RATES-LDN-1", "FX-LDN-1"];
    // Mostly RATES and FX (the sample's `cpty` rule wants those), some CREDIT and EQ.
    let desks = [0, 1, 0, 1, 0, 1, 2, 0, 1, 3, 0];
    (0..n)
        .map(|i| {
            let mut t = good_trade();
            t.trade_id = format!("T-{i:06}");
            t.desk = desks[i % desks.len()];
            t.ccy = ccys[i % ccys.len()].into();
            t.book = books[i % books.len()].into();
            t.notional = if i % 17 == 0 { -100 } else { (1_000 * (i % 1000) as i64 + 1) * 100 };
            t.price = if i % 3 == 0 { None } else { Some(1_000_000 + i as i64) };
            t.counterparty = if i % 11 == 0 { None } else { Some(format!("CPTY-{}", i % 50)) };
            t.maturity = if i % 23 == 0 { 45_000 } else { 20_001 + (i % 5000) as i32 };
            t.delta = if i % 7 == 0 { None } else { Some(0.1 * (i % 10) as f64) };
            t
        })
        .collect()
}
