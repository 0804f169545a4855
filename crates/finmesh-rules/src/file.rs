//! Rules and schema files on disk: the entry points of `finmesh pipeline rules
//! check` (report) and of a stage that loads rules for its next run.
//!
//! Invariant: every problem comes back as a [`RenderedError`] whose `text` is
//! ready to print (`path:line:col: message`, the source line and a caret), so
//! a CLI prints them one after the other and exits non-zero.

use std::fmt;
use std::path::Path;

use apache_avro::Schema;

use crate::error::{ErrorKind, RuleError};
use crate::record::Datasets;
use crate::ruleset::RuleSet;

/// One problem with a rules file (or the files it needs), ready to print.
#[derive(Clone, Debug, PartialEq)]
pub struct RenderedError {
    pub kind: ErrorKind,
    /// 1-based line and column in the rules file; 0 for problems of a whole file.
    pub line: usize,
    pub col: usize,
    /// The message and its hint (in parentheses), without location.
    pub message: String,
    /// The full text: location, message, source line and caret.
    pub text: String,
}

impl fmt::Display for RenderedError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.text)
    }
}

/// What a rules file that checked contains.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Summary {
    /// Rule names, in file order.
    pub rules: Vec<String>,
    /// Schema fields the rules read, in schema order.
    pub fields_used: Vec<String>,
    /// Reference datasets the rules look up.
    pub datasets_used: Vec<String>,
}

/// One line for the CLI: `13 rules; fields read: a, b; datasets: currencies, books`.
impl fmt::Display for Summary {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let plural = if self.rules.len() == 1 { "" } else { "s" };
        write!(f, "{} rule{plural}; fields read: ", self.rules.len())?;
        let list = |items: &[String]| if items.is_empty() { "none".to_string() } else { items.join(", ") };
        write!(f, "{}; datasets: {}", list(&self.fields_used), list(&self.datasets_used))
    }
}

impl Summary {
    fn of(rules: &RuleSet, datasets: &Datasets) -> Summary {
        Summary {
            rules: rules.ids().map(|id| rules.name(id).to_string()).collect(),
            fields_used: rules.fields_used().iter().filter_map(|&i| rules.field_name(i)).map(String::from).collect(),
            datasets_used: rules.datasets_used().iter().filter_map(|&d| datasets.name(d)).map(String::from).collect(),
        }
    }
}

fn whole_file(kind: ErrorKind, path: &Path, message: String) -> RenderedError {
    RenderedError { kind, line: 0, col: 0, text: format!("{}: {message}\n", path.display()), message }
}

/// Reads and compiles a rules file against an Avro schema file (`.avsc`, JSON).
pub fn load_file(rules_path: &Path, schema_path: &Path, datasets: &Datasets) -> Result<RuleSet, Vec<RenderedError>> {
    let read = |path: &Path| {
        std::fs::read_to_string(path).map_err(|e| whole_file(ErrorKind::File, path, format!("cannot read: {e}")))
    };
    let (source, schema_text) = (read(rules_path), read(schema_path));
    let (source, schema_text) = match (source, schema_text) {
        (Ok(s), Ok(t)) => (s, t),
        (s, t) => return Err(s.err().into_iter().chain(t.err()).collect()),
    };
    let schema = Schema::parse_str(&schema_text)
        .map_err(|e| vec![whole_file(ErrorKind::Schema, schema_path, format!("not a valid Avro schema: {e}"))])?;
    let origin = rules_path.display().to_string();
    RuleSet::compile(&source, &schema, datasets).map_err(|errors| {
        errors
            .into_iter()
            .map(|e: RuleError| {
                if e.kind() == ErrorKind::Schema {
                    return whole_file(ErrorKind::Schema, schema_path, e.message().to_string());
                }
                let (line, col) = e.line_col(&source);
                RenderedError { kind: e.kind(), line, col, message: e.to_string(), text: e.render(&source, &origin) }
            })
            .collect()
    })
}

/// Checks a rules file against an Avro schema file and the known reference
/// datasets: what `finmesh pipeline rules check` reports.
pub fn check_file(rules_path: &Path, schema_path: &Path, datasets: &Datasets) -> Result<Summary, Vec<RenderedError>> {
    load_file(rules_path, schema_path, datasets).map(|rules| Summary::of(&rules, datasets))
}
