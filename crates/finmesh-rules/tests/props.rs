//! Property tests of the rule language.
//!
//! 1. Random well-typed rule files over a schema with every supported type
//!    (nullable and not) are rendered to text, compiled, and evaluated on
//!    random records; each rule's result must equal the one of a
//!    straightforward reference interpreter over the generated expression
//!    tree (three-valued logic written out case by case, on the test's own
//!    values, not on the crate's types). This covers the parser (precedence,
//!    flipped comparisons, keyword case), the checker's literal conversion and
//!    the evaluator, through both the Avro `Value` view and the `FieldRef` view.
//! 2. Parser fuzzing: arbitrary strings, token soup and mutations of the
//!    example rules never panic; every error span lies on character
//!    boundaries inside the source and renders.

mod common;

use std::cmp::Ordering;
use std::fmt::Write as _;

use apache_avro::Schema;
use apache_avro::types::Value;
use finmesh_rules::{DatasetId, Datasets, FieldRef, KeyType, Lookup, RuleSet, Truth};
use proptest::prelude::*;
use proptest::sample::select;

// ---------------------------------------------------------------- the model

#[derive(Clone, Copy, Debug, PartialEq)]
enum Kind {
    Int,
    Float,
    /// Avro `float`: values are `f32`, literals are rounded to `f32` at load.
    Float32,
    Dec,
    Date,
    Ts,
    Str,
    Enum,
    Bool,
}

/// (name, kind, nullable), in schema order.
const FIELDS: [(&str, Kind, bool); 14] = [
    ("i", Kind::Int, false),
    ("l", Kind::Int, true),
    ("f", Kind::Float, false),
    ("g", Kind::Float, true),
    ("dec", Kind::Dec, false),
    ("dt", Kind::Date, false),
    ("ts", Kind::Ts, false),
    ("s", Kind::Str, false),
    ("ns", Kind::Str, true),
    ("e", Kind::Enum, false),
    ("ne", Kind::Enum, true),
    ("b", Kind::Bool, false),
    ("nb", Kind::Bool, true),
    ("h", Kind::Float32, false),
];

const SCHEMA: &str = r#"{"type": "record", "name": "T", "fields": [
    {"name": "i", "type": "int"},
    {"name": "l", "type": ["null", "long"]},
    {"name": "f", "type": "double"},
    {"name": "g", "type": ["null", "double"]},
    {"name": "dec", "type": {"type": "bytes", "logicalType": "decimal", "precision": 12, "scale": 2}},
    {"name": "dt", "type": {"type": "int", "logicalType": "date"}},
    {"name": "ts", "type": {"type": "long", "logicalType": "timestamp-micros"}},
    {"name": "s", "type": "string"},
    {"name": "ns", "type": ["null", "string"]},
    {"name": "e", "type": {"type": "enum", "name": "E", "symbols": ["A", "B", "C"]}},
    {"name": "ne", "type": ["null", "E"]},
    {"name": "b", "type": "boolean"},
    {"name": "nb", "type": ["null", "boolean"]},
    {"name": "h", "type": "float"}
]}"#;

const SYMBOLS: [&str; 3] = ["A", "B", "C"];

/// A value of the model. Timestamps are microseconds, decimals unscaled at scale 2.
#[derive(Clone, Debug, PartialEq)]
enum MV {
    Null,
    Int(i64),
    Float(f64),
    Dec(i128),
    Date(i32),
    Ts(i64),
    Str(String),
    Enum(u32),
    Bool(bool),
}

#[derive(Clone, Copy, Debug, PartialEq)]
enum Op {
    Eq,
    Ne,
    Lt,
    Le,
    Gt,
    Ge,
}

impl Op {
    fn text(self) -> &'static str {
        ["=", "!=", "<", "<=", ">", ">="][self as usize]
    }
    fn flip(self) -> Op {
        match self {
            Op::Lt => Op::Gt,
            Op::Le => Op::Ge,
            Op::Gt => Op::Lt,
            Op::Ge => Op::Le,
            other => other,
        }
    }
}

#[derive(Clone, Debug)]
enum MExpr {
    Const(bool),
    And(Vec<MExpr>),
    Or(Vec<MExpr>),
    Not(Box<MExpr>),
    /// `field op lit`, written `lit op' field` when `lit_left`; `date_lit` writes a timestamp as a date.
    Cmp {
        field: usize,
        op: Op,
        lit: MV,
        lit_left: bool,
    },
    CmpFields {
        a: usize,
        op: Op,
        b: usize,
    },
    Range {
        field: usize,
        lo: MV,
        hi: MV,
        negated: bool,
    },
    Set {
        field: usize,
        items: Vec<MV>,
        negated: bool,
    },
    IsNull {
        field: usize,
        negated: bool,
    },
    Truthy {
        field: usize,
    },
    Lookup {
        field: usize,
    },
}

/// Three-valued truth: `None` is unknown.
type T3 = Option<bool>;

fn order(a: &MV, b: &MV) -> Option<Ordering> {
    match (a, b) {
        (MV::Int(x), MV::Int(y)) => Some(x.cmp(y)),
        (MV::Float(x), MV::Float(y)) => x.partial_cmp(y),
        (MV::Dec(x), MV::Dec(y)) => Some(x.cmp(y)),
        (MV::Date(x), MV::Date(y)) => Some(x.cmp(y)),
        (MV::Ts(x), MV::Ts(y)) => Some(x.cmp(y)),
        (MV::Str(x), MV::Str(y)) => Some(x.as_bytes().cmp(y.as_bytes())),
        (MV::Enum(x), MV::Enum(y)) => Some(x.cmp(y)),
        (MV::Bool(x), MV::Bool(y)) => Some(x.cmp(y)),
        _ => None, // a null or a NaN on either side
    }
}

fn compare(a: &MV, op: Op, b: &MV) -> T3 {
    let o = order(a, b)?;
    Some(match op {
        Op::Eq => o.is_eq(),
        Op::Ne => o.is_ne(),
        Op::Lt => o.is_lt(),
        Op::Le => o.is_le(),
        Op::Gt => o.is_gt(),
        Op::Ge => o.is_ge(),
    })
}

fn not(t: T3) -> T3 {
    t.map(|b| !b)
}

/// The reference data of the model: `codes` (strings, enum symbols by name) and `ids` (integers).
fn in_reference(v: &MV) -> T3 {
    match v {
        MV::Null => None,
        MV::Str(s) => Some(["USD", "a", "A"].contains(&s.as_str())),
        MV::Enum(i) => Some(["USD", "a", "A"].contains(&SYMBOLS[*i as usize])),
        MV::Int(i) => Some([1, -2].contains(i)),
        other => panic!("no lookup on {other:?}"),
    }
}

/// A literal as the field holds it: rounded to `f32` for a `float` field.
fn as_field(field: usize, lit: &MV) -> MV {
    match (FIELDS[field].1, lit) {
        (Kind::Float32, MV::Float(x)) => MV::Float(f64::from(*x as f32)),
        _ => lit.clone(),
    }
}

/// The reference interpreter.
fn eval(e: &MExpr, r: &[MV]) -> T3 {
    match e {
        MExpr::Const(b) => Some(*b),
        MExpr::And(items) => {
            let values: Vec<T3> = items.iter().map(|i| eval(i, r)).collect();
            if values.contains(&Some(false)) {
                Some(false)
            } else if values.contains(&None) {
                None
            } else {
                Some(true)
            }
        }
        MExpr::Or(items) => {
            let values: Vec<T3> = items.iter().map(|i| eval(i, r)).collect();
            if values.contains(&Some(true)) {
                Some(true)
            } else if values.contains(&None) {
                None
            } else {
                Some(false)
            }
        }
        MExpr::Not(inner) => not(eval(inner, r)),
        MExpr::Cmp { field, op, lit, .. } => compare(&r[*field], *op, &as_field(*field, lit)),
        MExpr::CmpFields { a, op, b } => compare(&r[*a], *op, &r[*b]),
        MExpr::Range { field, lo, hi, negated } => {
            let (lo, hi) = (as_field(*field, lo), as_field(*field, hi));
            let inside = match (compare(&r[*field], Op::Ge, &lo), compare(&r[*field], Op::Le, &hi)) {
                (Some(x), Some(y)) => Some(x && y),
                _ => None,
            };
            if *negated { not(inside) } else { inside }
        }
        MExpr::Set { field, items, negated } => {
            let hits: Vec<T3> = items.iter().map(|i| compare(&r[*field], Op::Eq, &as_field(*field, i))).collect();
            let member = if hits.contains(&Some(true)) {
                Some(true)
            } else if hits.contains(&None) {
                None
            } else {
                Some(false)
            };
            if *negated { not(member) } else { member }
        }
        MExpr::IsNull { field, negated } => Some((r[*field] == MV::Null) != *negated),
        MExpr::Truthy { field } => match r[*field] {
            MV::Bool(b) => Some(b),
            _ => None,
        },
        MExpr::Lookup { field } => in_reference(&r[*field]),
    }
}

// ---------------------------------------------------------------- rendering

fn dec_text(u: i128) -> String {
    let sign = if u < 0 { "-" } else { "" };
    format!("{sign}{}.{:02}", u.abs() / 100, u.abs() % 100)
}

const DATES: [(i32, &str); 5] =
    [(18262, "2020-01-01"), (19782, "2024-02-29"), (0, "1970-01-01"), (-1, "1969-12-31"), (40542, "2080-12-31")];
const TIMESTAMPS: [(i64, &str); 5] = [
    (0, "1970-01-01T00:00:00Z"),
    (1_500_000, "1970-01-01T00:00:01.5Z"),
    (1_577_836_800_000_000, "2020-01-01T00:00:00Z"),
    (1_577_833_200_000_000, "2020-01-01T01:00:00+02:00"),
    (-1, "1969-12-31T23:59:59.999999Z"),
];

fn lit_text(v: &MV) -> String {
    match v {
        MV::Int(i) => i.to_string(),
        MV::Float(f) => format!("{f:?}"),
        MV::Dec(u) => dec_text(*u),
        MV::Date(d) => DATES.iter().find(|(x, _)| x == d).expect("date from the table").1.to_string(),
        MV::Ts(t) => match TIMESTAMPS.iter().find(|(x, _)| x == t) {
            Some((_, text)) => text.to_string(),
            // Midnight of a date in the table: written as a date literal.
            None => DATES.iter().find(|(d, _)| i64::from(*d) * 86_400_000_000 == *t).expect("ts from a table").1.into(),
        },
        MV::Str(s) => format!("\"{}\"", s.replace('\\', "\\\\").replace('"', "\\\"")),
        MV::Enum(i) => format!("\"{}\"", SYMBOLS[*i as usize]),
        MV::Bool(b) => if *b { "TRUE" } else { "FALSE" }.into(),
        MV::Null => unreachable!("NULL is never a generated literal"),
    }
}

struct Style {
    lower: bool,
}

impl Style {
    fn kw(&self, k: &str) -> String {
        if self.lower { k.to_lowercase() } else { k.to_string() }
    }
}

/// Renders with the fewest parentheses the precedence (NOT > AND > OR) allows.
fn render(e: &MExpr, st: &Style, out: &mut String) {
    let name = |f: &usize| FIELDS[*f].0;
    match e {
        MExpr::Const(b) => out.push_str(&st.kw(if *b { "TRUE" } else { "FALSE" })),
        MExpr::And(items) | MExpr::Or(items) => {
            let (kw, is_and) = if matches!(e, MExpr::And(_)) { ("AND", true) } else { ("OR", false) };
            for (i, item) in items.iter().enumerate() {
                if i > 0 {
                    let _ = write!(out, " {} ", st.kw(kw));
                }
                // AND binds tighter than OR: only an OR inside an AND needs parentheses.
                let paren = is_and && matches!(item, MExpr::Or(_));
                if paren {
                    out.push('(');
                }
                render(item, st, out);
                if paren {
                    out.push(')');
                }
            }
        }
        MExpr::Not(inner) => {
            let _ = write!(out, "{} ", st.kw("NOT"));
            let paren = matches!(**inner, MExpr::And(_) | MExpr::Or(_));
            if paren {
                out.push('(');
            }
            render(inner, st, out);
            if paren {
                out.push(')');
            }
        }
        MExpr::Cmp { field, op, lit, lit_left } => {
            if *lit_left {
                let _ = write!(out, "{} {} {}", lit_text(lit), op.flip().text(), name(field));
            } else {
                let _ = write!(out, "{} {} {}", name(field), op.text(), lit_text(lit));
            }
        }
        MExpr::CmpFields { a, op, b } => {
            let _ = write!(out, "{} {} {}", name(a), op.text(), name(b));
        }
        MExpr::Range { field, lo, hi, negated } => {
            let not = if *negated { format!("{} ", st.kw("NOT")) } else { String::new() };
            let _ = write!(
                out,
                "{} {not}{} {} [{}, {}]",
                name(field),
                st.kw("IN"),
                st.kw("RANGE"),
                lit_text(lo),
                lit_text(hi)
            );
        }
        MExpr::Set { field, items, negated } => {
            let not = if *negated { format!("{} ", st.kw("NOT")) } else { String::new() };
            let items: Vec<String> = items.iter().map(lit_text).collect();
            let _ = write!(out, "{} {not}{} ({})", name(field), st.kw("IN"), items.join(", "));
        }
        MExpr::IsNull { field, negated } => {
            let test = if *negated { "NOT NULL" } else { "NULL" };
            let _ = write!(out, "{} {}", name(field), st.kw(test));
        }
        MExpr::Truthy { field } => out.push_str(name(field)),
        MExpr::Lookup { field } => {
            let dataset = if FIELDS[*field].1 == Kind::Int { "ids" } else { "codes" };
            let _ = write!(out, "{}({dataset}, {})", st.kw("LOOKUP"), name(field));
        }
    }
}

// ---------------------------------------------------------------- generators

fn lit_for(kind: Kind) -> BoxedStrategy<MV> {
    match kind {
        Kind::Int => (-3i64..=3).prop_map(MV::Int).boxed(),
        Kind::Float => select(vec![-1.5, -0.0, 0.0, 0.5, 2.0, 1e-3]).prop_map(MV::Float).boxed(),
        Kind::Float32 => select(vec![0.1, 0.3, -1.5, 2.0, 1e-3]).prop_map(MV::Float).boxed(),
        Kind::Dec => select(vec![-250i128, -5, 0, 5, 100, 250]).prop_map(MV::Dec).boxed(),
        Kind::Date => select(DATES.map(|(d, _)| d).to_vec()).prop_map(MV::Date).boxed(),
        Kind::Ts => {
            let mut values: Vec<i64> = TIMESTAMPS.map(|(t, _)| t).to_vec();
            values.push(19782 * 86_400_000_000); // 2024-02-29, written as a date literal
            select(values).prop_map(MV::Ts).boxed()
        }
        Kind::Str => select(vec!["", "a", "b", "USD", "é", "a\"b"]).prop_map(|s| MV::Str(s.into())).boxed(),
        Kind::Enum => (0u32..3).prop_map(MV::Enum).boxed(),
        Kind::Bool => any::<bool>().prop_map(MV::Bool).boxed(),
    }
}

fn value_for(field: usize) -> BoxedStrategy<MV> {
    let (_, kind, nullable) = FIELDS[field];
    let base = if kind == Kind::Float32 {
        // Values a float field can hold: the literals rounded to f32, or NaN.
        prop_oneof![9 => lit_for(kind).prop_map(move |v| as_field(field, &v)), 1 => Just(MV::Float(f64::NAN))].boxed()
    } else if kind == Kind::Float {
        prop_oneof![9 => lit_for(kind), 1 => Just(MV::Float(f64::NAN))].boxed()
    } else {
        lit_for(kind)
    };
    if nullable { prop_oneof![3 => base, 1 => Just(MV::Null)].boxed() } else { base }
}

fn record() -> impl Strategy<Value = Vec<MV>> {
    (0..FIELDS.len()).map(value_for).collect::<Vec<_>>()
}

fn orderable(kind: Kind) -> bool {
    !matches!(kind, Kind::Enum | Kind::Bool)
}

/// Fields of the same class compare with each other (`float` with `double`).
fn class(kind: Kind) -> Kind {
    if kind == Kind::Float32 { Kind::Float } else { kind }
}

fn ops_for(kind: Kind) -> Vec<Op> {
    if orderable(kind) { vec![Op::Eq, Op::Ne, Op::Lt, Op::Le, Op::Gt, Op::Ge] } else { vec![Op::Eq, Op::Ne] }
}

fn fields_where(pred: impl Fn(Kind) -> bool) -> Vec<usize> {
    (0..FIELDS.len()).filter(|&f| pred(FIELDS[f].1)).collect()
}

fn leaf() -> BoxedStrategy<MExpr> {
    let cmp = (0..FIELDS.len())
        .prop_flat_map(|f| {
            let kind = FIELDS[f].1;
            (Just(f), select(ops_for(kind)), lit_for(kind), any::<bool>())
        })
        .prop_map(|(field, op, lit, lit_left)| MExpr::Cmp { field, op, lit, lit_left });
    let pairs: Vec<(usize, usize)> = (0..FIELDS.len())
        .flat_map(|a| (0..FIELDS.len()).map(move |b| (a, b)))
        .filter(|&(a, b)| class(FIELDS[a].1) == class(FIELDS[b].1))
        .collect();
    let cmp_fields = select(pairs)
        .prop_flat_map(|(a, b)| (Just(a), select(ops_for(FIELDS[a].1)), Just(b)))
        .prop_map(|(a, op, b)| MExpr::CmpFields { a, op, b });
    let range = select(fields_where(orderable))
        .prop_flat_map(|f| (Just(f), lit_for(FIELDS[f].1), lit_for(FIELDS[f].1), any::<bool>()))
        .prop_map(|(field, x, y, negated)| {
            let (lo, hi) = if order(&x, &y) == Some(Ordering::Greater) { (y, x) } else { (x, y) };
            MExpr::Range { field, lo, hi, negated }
        });
    let set = (0..FIELDS.len())
        .prop_flat_map(|f| (Just(f), prop::collection::vec(lit_for(FIELDS[f].1), 1..4), any::<bool>()))
        .prop_map(|(field, items, negated)| MExpr::Set { field, items, negated });
    let is_null = (0..FIELDS.len(), any::<bool>()).prop_map(|(field, negated)| MExpr::IsNull { field, negated });
    let truthy = select(fields_where(|k| k == Kind::Bool)).prop_map(|field| MExpr::Truthy { field });
    let lookup = select(fields_where(|k| matches!(k, Kind::Int | Kind::Str | Kind::Enum)))
        .prop_map(|field| MExpr::Lookup { field });
    prop_oneof![
        4 => cmp,
        2 => cmp_fields,
        2 => range,
        2 => set,
        2 => is_null,
        1 => truthy,
        1 => lookup,
        1 => any::<bool>().prop_map(MExpr::Const),
    ]
    .boxed()
}

fn expr() -> impl Strategy<Value = MExpr> {
    leaf().prop_recursive(4, 32, 4, |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 2..4).prop_map(MExpr::And),
            prop::collection::vec(inner.clone(), 2..4).prop_map(MExpr::Or),
            inner.prop_map(|e| MExpr::Not(Box::new(e))),
        ]
    })
}

// ---------------------------------------------------------------- evaluation plumbing

fn datasets() -> Datasets {
    Datasets::new().with("codes", KeyType::String).with("ids", KeyType::Int)
}

struct Reference;

impl Lookup for Reference {
    fn contains(&self, dataset: DatasetId, key: &FieldRef<'_>) -> bool {
        match (dataset.0, key) {
            (0, FieldRef::Str(s)) => ["USD", "a", "A"].contains(s),
            (1, FieldRef::Int(i)) => [1, -2].contains(i),
            other => panic!("unexpected lookup {other:?}"),
        }
    }
}

fn avro(v: &MV) -> Value {
    match v {
        MV::Null => Value::Null,
        MV::Int(i) => Value::Int(*i as i32),
        MV::Float(f) => Value::Double(*f),
        MV::Dec(u) => Value::Decimal(apache_avro::Decimal::from(u.to_be_bytes())),
        MV::Date(d) => Value::Date(*d),
        MV::Ts(t) => Value::TimestampMicros(*t),
        MV::Str(s) => Value::String(s.clone()),
        MV::Enum(i) => Value::Enum(*i, SYMBOLS[*i as usize].into()),
        MV::Bool(b) => Value::Boolean(*b),
    }
}

fn avro_record(r: &[MV]) -> Value {
    Value::Record(
        FIELDS
            .iter()
            .zip(r)
            .map(|(&(name, _, nullable), v)| {
                let mut value = avro(v);
                value = match (name, v) {
                    ("l", MV::Int(i)) => Value::Long(*i),
                    ("h", MV::Float(f)) => Value::Float(*f as f32),
                    _ => value,
                };
                if nullable {
                    value = if *v == MV::Null {
                        Value::Union(0, Box::new(Value::Null))
                    } else {
                        Value::Union(1, Box::new(value))
                    };
                }
                (name.to_string(), value)
            })
            .collect(),
    )
}

fn field_refs(r: &[MV]) -> Vec<FieldRef<'_>> {
    r.iter()
        .map(|v| match v {
            MV::Null => FieldRef::Null,
            MV::Int(i) => FieldRef::Int(*i),
            MV::Float(f) => FieldRef::Float(*f),
            MV::Dec(u) => FieldRef::Decimal(*u),
            MV::Date(d) => FieldRef::Date(*d),
            MV::Ts(t) => FieldRef::Timestamp(*t),
            MV::Str(s) => FieldRef::Str(s),
            MV::Enum(i) => FieldRef::Enum(*i),
            MV::Bool(b) => FieldRef::Bool(*b),
        })
        .collect()
}

fn truth(t: T3) -> Truth {
    match t {
        Some(true) => Truth::True,
        Some(false) => Truth::False,
        None => Truth::Unknown,
    }
}

/// Fresh random cases on every run: no regression file pins seeds (a failure prints its minimal case).
fn config(cases: u32) -> ProptestConfig {
    ProptestConfig { cases, failure_persistence: None, ..ProptestConfig::default() }
}

proptest! {
    #![proptest_config(config(512))]

    #[test]
    fn compiled_rules_agree_with_the_reference_interpreter(
        exprs in prop::collection::vec(expr(), 1..5),
        records in prop::collection::vec(record(), 1..8),
        lower in any::<bool>(),
    ) {
        let schema = Schema::parse_str(SCHEMA).unwrap();
        let style = Style { lower };
        let mut src = String::new();
        for (i, e) in exprs.iter().enumerate() {
            let _ = write!(src, "{} r{i}: ", style.kw("rule"));
            render(e, &style, &mut src);
            src.push('\n');
        }
        let rules = match RuleSet::compile(&src, &schema, &datasets()) {
            Ok(rules) => rules,
            Err(errors) => {
                return Err(TestCaseError::fail(format!("{}\n{src}", finmesh_rules::render_all(&errors, &src, ""))));
            }
        };
        prop_assert_eq!(rules.len(), exprs.len());
        let mut failures = rules.failure_buffer();
        for r in &records {
            let expected: Vec<Truth> = exprs.iter().map(|e| truth(eval(e, r))).collect();
            let value = avro_record(r);
            let Value::Record(fields) = &value else { unreachable!() };
            let refs = field_refs(r);
            for id in rules.ids() {
                let want = expected[id.0 as usize];
                prop_assert_eq!(rules.evaluate_rule(id, fields.as_slice(), &Reference), want, "rule {:?} on {:?}\n{}", id, r, src);
                prop_assert_eq!(rules.evaluate_rule(id, refs.as_slice(), &Reference), want, "rule {:?} on {:?}\n{}", id, r, src);
            }
            rules.evaluate_avro(&value, &Reference, &mut failures).unwrap();
            let want_failures: Vec<u32> =
                expected.iter().enumerate().filter(|(_, t)| **t != Truth::True).map(|(i, _)| i as u32).collect();
            prop_assert_eq!(failures.iter().map(|id| id.0).collect::<Vec<_>>(), want_failures);
        }
    }
}

// ---------------------------------------------------------------- parser fuzzing

/// Compiles `src` against the example schema; on errors, checks and renders each.
fn compile_never_panics(src: &str) -> Result<(), TestCaseError> {
    match RuleSet::compile(src, &common::risk_schema(), &common::datasets()) {
        Ok(rules) => {
            let trade = common::good_trade();
            let mut failures = rules.failure_buffer();
            rules.evaluate_avro(&trade.to_value(), &common::RefData::new(), &mut failures).unwrap();
        }
        Err(errors) => {
            prop_assert!(!errors.is_empty());
            for e in &errors {
                let span = e.span();
                prop_assert!(span.start <= span.end && span.end <= src.len(), "{:?} in {:?}", span, src);
                prop_assert!(src.is_char_boundary(span.start) && src.is_char_boundary(span.end), "{:?}", span);
                let text = e.render(src, "f");
                prop_assert!(text.contains('^'));
            }
        }
    }
    Ok(())
}

const VOCAB: &[&str] = &[
    "rule",
    "RULE",
    "r",
    "x:",
    ":",
    "AND",
    "or",
    "NOT",
    "IN",
    "RANGE",
    "NULL",
    "LOOKUP",
    "TRUE",
    "false",
    "(",
    ")",
    "[",
    "]",
    ",",
    "-",
    "=",
    "!=",
    "<>",
    "<",
    "<=",
    ">",
    ">=",
    "==",
    "&&",
    "!",
    "notional",
    "ccy",
    "desk",
    "maturity",
    "counterparty",
    "price",
    "tags",
    "as_of",
    "quantity",
    "currencies",
    "books",
    "`",
    "`in`",
    "\"",
    "\"RATES\"",
    "\"a\\q\"",
    "0",
    "-1.5",
    "1.",
    "12ab",
    "2020-01-01",
    "2020-02-30",
    "2020-",
    "2020-01-01T00:00:00Z",
    "2020-01-01T25:00:00Z",
    "2020-01-01T00:00:00.1234567890Z",
    "#",
    "\n",
    "\t",
    "é",
    "ΦX",
    "\u{0}",
    "99999999999999999999999999999999999999999",
];

fn mutate(src: &str, edits: &[(usize, u8, usize)]) -> String {
    let mut chars: Vec<char> = src.chars().collect();
    for &(at, kind, arg) in edits {
        let at = if chars.is_empty() { 0 } else { at % (chars.len() + 1) };
        match kind % 3 {
            0 => {
                let end = (at + arg % 8).min(chars.len());
                chars.drain(at..end);
            }
            1 => {
                let word: Vec<char> = format!(" {} ", VOCAB[arg % VOCAB.len()]).chars().collect();
                chars.splice(at..at, word);
            }
            _ => {
                if at < chars.len() {
                    let other = (at + arg) % chars.len();
                    chars.swap(at, other);
                }
            }
        }
    }
    chars.into_iter().collect()
}

proptest! {
    #![proptest_config(config(1024))]

    #[test]
    fn arbitrary_text_never_panics(src in ".{0,200}") {
        compile_never_panics(&src)?;
    }

    #[test]
    fn token_soup_never_panics(words in prop::collection::vec(select(VOCAB), 0..40), sep in select(vec![" ", "", "\n"])) {
        compile_never_panics(&words.join(sep))?;
    }

    #[test]
    fn mutated_example_rules_never_panic(edits in prop::collection::vec((any::<usize>(), any::<u8>(), any::<usize>()), 1..6)) {
        compile_never_panics(&mutate(&common::sample_rules(), &edits))?;
    }
}
