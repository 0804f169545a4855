//! The finmesh validation rule language.
//!
//! A rules file is a list of named rules, each a boolean expression over the
//! fields of one Avro record schema:
//!
//! ```text
//! # comments start with '#'
//! rule notional_positive: notional > 0
//! rule ccy_known: LOOKUP(currencies, ccy)
//! rule maturity: maturity IN RANGE [2020-01-01, 2080-12-31]
//! rule cpty: counterparty NOT NULL AND (desk = "RATES" OR desk = "FX")
//! ```
//!
//! The file is parsed once, type checked against the schema and the known
//! reference datasets, and compiled to a [`RuleSet`]; a record then passes or
//! fails each rule. The language, its typing and its null semantics are
//! specified in `docs/rules.md`.
//!
//! Layout, in the order a rules file travels through it:
//!
//! - `lexer` (private): text to tokens;
//! - `parser` ([`parse`]) → [`ast`]: tokens to a syntax tree, with spans;
//! - `schema` (private): the Avro record's fields as rules see them;
//! - `check` (private): names and types checked, AST lowered to evaluator nodes;
//! - `eval` (private): the nodes and their three-valued evaluation;
//! - `record`: what evaluation reads ([`RecordView`], [`FieldRef`], [`Lookup`], [`Datasets`]);
//! - [`RuleSet`]: the compiled file and its evaluation API;
//! - `error`: [`RuleError`]s with spans, rendered with a caret under the spot;
//! - `file`: [`check_file`], the entry point of `finmesh pipeline rules check`.
//!
//! Invariants: compilation either yields a `RuleSet` or every error of the
//! file; no input makes the lexer, parser or checker panic; evaluation does
//! not allocate (see [`RuleSet::evaluate`]).
//!
//! ```
//! use apache_avro::{Schema, types::Value};
//! use finmesh_rules::{Datasets, FieldRef, KeyType, RuleSet};
//!
//! let schema = Schema::parse_str(r#"{"type": "record", "name": "Risk", "fields": [
//!     {"name": "notional", "type": "double"},
//!     {"name": "ccy", "type": "string"},
//!     {"name": "counterparty", "type": ["null", "string"]}
//! ]}"#).unwrap();
//! let datasets = Datasets::new().with("currencies", KeyType::String);
//! let rules = RuleSet::compile(
//!     "rule notional_positive: notional > 0\n\
//!      rule ccy_known: LOOKUP(currencies, ccy)\n\
//!      rule cpty: counterparty NOT NULL\n",
//!     &schema,
//!     &datasets,
//! ).unwrap();
//!
//! // Reference data, supplied at evaluation time.
//! let currencies = |_, key: &FieldRef<'_>| matches!(key, FieldRef::Str("USD" | "EUR"));
//! let record = Value::Record(vec![
//!     ("notional".into(), Value::Double(-5.0)),
//!     ("ccy".into(), Value::String("USD".into())),
//!     ("counterparty".into(), Value::Union(0, Box::new(Value::Null))),
//! ]);
//! let mut failures = rules.failure_buffer();
//! let passed = rules.evaluate_avro(&record, &currencies, &mut failures).unwrap();
//! assert!(!passed);
//! let names: Vec<&str> = failures.iter().map(|&id| rules.name(id)).collect();
//! assert_eq!(names, ["notional_positive", "cpty"]);
//!
//! // Errors point at the spot.
//! let errors = RuleSet::compile("rule r: notionl > 0", &schema, &datasets).unwrap_err();
//! assert_eq!(
//!     errors[0].render("rule r: notionl > 0", "rules.txt"),
//!     "rules.txt:1:9: unknown field `notionl`\n 1 | rule r: notionl > 0\n   |         ^^^^^^^ did you mean `notional`?\n"
//! );
//! ```

pub mod ast;
mod check;
mod error;
mod eval;
mod file;
mod lexer;
mod literal;
mod parser;
mod record;
mod ruleset;
mod schema;

pub use error::{ErrorKind, RuleError, Span, render_all};
pub use eval::Truth;
pub use file::{RenderedError, Summary, check_file, load_file};
pub use parser::{MAX_DEPTH, parse};
pub use record::{DatasetId, Datasets, FieldRef, KeyType, Lookup, NoLookup, RecordView, decimal_from_be_bytes};
pub use ruleset::{RuleId, RuleSet, ShapeError};
