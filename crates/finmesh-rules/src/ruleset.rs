//! [`RuleSet`]: a rules file compiled against one Avro schema and one set of
//! reference datasets, ready to evaluate records.
//!
//! Invariants: a `RuleSet` exists only if the whole file parsed and type
//! checked; [`RuleId`]s are the rules' positions in the file (0-based), stable
//! for the life of the rule set; evaluation reads the record only through
//! [`RecordView`] and reference data only through [`Lookup`], takes `&self`
//! (share one `RuleSet` across threads behind an `Arc`; to change rules for
//! the next run, compile a new one and swap the `Arc`), and allocates nothing
//! once the caller's failure vector has room for [`RuleSet::len`] ids.

use std::collections::HashMap;
use std::fmt;

use apache_avro::Schema;
use apache_avro::types::Value;

use crate::check::Checker;
use crate::error::{ErrorKind, RuleError, Span, line_col};
use crate::eval::{Node, Truth};
use crate::parser::parse;
use crate::record::{DatasetId, Datasets, Lookup, RecordView};
use crate::schema::RecordFields;

/// A rule, by its position in the rules file.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct RuleId(pub u32);

struct CompiledRule {
    name: String,
    /// The expression as written (for exception records and messages).
    text: String,
    node: Node,
}

/// A compiled rules file. See the [crate documentation](crate) for an example.
pub struct RuleSet {
    rules: Vec<CompiledRule>,
    field_names: Vec<String>,
    fields_used: Vec<usize>,
    datasets_used: Vec<DatasetId>,
}

impl fmt::Debug for RuleSet {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RuleSet").field("rules", &self.rules.iter().map(|r| &r.name).collect::<Vec<_>>()).finish()
    }
}

impl RuleSet {
    /// Parses `source`, checks it against the record `schema` and the known
    /// `datasets`, and compiles it. On failure returns every error found, in
    /// source order; render them with [`RuleError::render`] or [`render_all`](crate::render_all).
    /// A `schema` that is not a record yields a single error of kind
    /// [`ErrorKind::Schema`], whose span does not point into `source`.
    pub fn compile(source: &str, schema: &Schema, datasets: &Datasets) -> Result<RuleSet, Vec<RuleError>> {
        let fields = RecordFields::from_schema(schema)
            .map_err(|message| vec![RuleError::new(ErrorKind::Schema, Span::default(), message)])?;
        let mut errors = Vec::new();
        let file = parse(source, &mut errors);
        let mut checker = Checker { fields: &fields, datasets, errors };
        let mut seen: HashMap<&str, Span> = HashMap::new();
        let mut rules = Vec::with_capacity(file.rules.len());
        for rule in &file.rules {
            if let Some(first) = seen.get(rule.name.name.as_str()) {
                let (line, col) = line_col(source, *first);
                checker.errors.push(
                    RuleError::new(
                        ErrorKind::DuplicateRule,
                        rule.name.span,
                        format!("rule `{}` is defined twice", rule.name.name),
                    )
                    .with_help(format!("first defined at {line}:{col}")),
                );
            } else {
                seen.insert(&rule.name.name, rule.name.span);
            }
            if let Some(node) = checker.expr(&rule.expr) {
                let text = source[rule.expr.span.start..rule.expr.span.end].to_string();
                rules.push(CompiledRule { name: rule.name.name.clone(), text, node });
            }
        }
        let mut errors = checker.errors;
        if !errors.is_empty() {
            errors.sort_by_key(|e| (e.span().start, e.span().end));
            return Err(errors);
        }
        if u32::try_from(rules.len()).is_err() {
            return Err(vec![RuleError::new(ErrorKind::Syntax, Span::default(), "too many rules")]);
        }
        let mut fields_used = Vec::new();
        let mut datasets_used = Vec::new();
        for rule in &rules {
            collect_uses(&rule.node, &mut fields_used, &mut datasets_used);
        }
        fields_used.sort_unstable();
        fields_used.dedup();
        datasets_used.sort_unstable();
        datasets_used.dedup();
        let field_names = fields.fields.into_iter().map(|f| f.name).collect();
        Ok(RuleSet { rules, field_names, fields_used, datasets_used })
    }

    /// Number of rules.
    pub fn len(&self) -> usize {
        self.rules.len()
    }

    pub fn is_empty(&self) -> bool {
        self.rules.is_empty()
    }

    /// Every rule id, in file order.
    pub fn ids(&self) -> impl ExactSizeIterator<Item = RuleId> + '_ {
        (0..self.rules.len()).map(|i| RuleId(i as u32))
    }

    /// The name of a rule. Panics if `id` is not from this rule set.
    pub fn name(&self, id: RuleId) -> &str {
        &self.rules[id.0 as usize].name
    }

    /// The expression of a rule as written in the file (comments inside it
    /// included), e.g. `notional > 0`. Panics if `id` is not from this rule set.
    pub fn text(&self, id: RuleId) -> &str {
        &self.rules[id.0 as usize].text
    }

    /// The id of the rule with this name.
    pub fn id(&self, name: &str) -> Option<RuleId> {
        self.rules.iter().position(|r| r.name == name).map(|i| RuleId(i as u32))
    }

    /// Number of top-level fields in the schema the rules were compiled against.
    pub fn field_count(&self) -> usize {
        self.field_names.len()
    }

    /// Schema positions of the fields some rule reads, ascending (a stage may decode only these).
    pub fn fields_used(&self) -> &[usize] {
        &self.fields_used
    }

    /// Name of the schema field at `index`.
    pub fn field_name(&self, index: usize) -> Option<&str> {
        self.field_names.get(index).map(String::as_str)
    }

    /// The datasets some `LOOKUP` names, ascending.
    pub fn datasets_used(&self) -> &[DatasetId] {
        &self.datasets_used
    }

    /// A vector with room for every rule id, so that [`evaluate`](RuleSet::evaluate) never grows it.
    pub fn failure_buffer(&self) -> Vec<RuleId> {
        Vec::with_capacity(self.rules.len())
    }

    /// Evaluates every rule on `record`. Clears `failures`, then pushes the id
    /// of each rule that did not evaluate to true (false or unknown), in file
    /// order. Returns whether the record passed every rule.
    pub fn evaluate<R, L>(&self, record: &R, lookup: &L, failures: &mut Vec<RuleId>) -> bool
    where
        R: RecordView + ?Sized,
        L: Lookup + ?Sized,
    {
        failures.clear();
        for (i, rule) in self.rules.iter().enumerate() {
            if rule.node.eval(record, lookup) != Truth::True {
                failures.push(RuleId(i as u32));
            }
        }
        failures.is_empty()
    }

    /// The three-valued result of one rule on `record` (for diagnostics and tests).
    pub fn evaluate_rule<R, L>(&self, id: RuleId, record: &R, lookup: &L) -> Truth
    where
        R: RecordView + ?Sized,
        L: Lookup + ?Sized,
    {
        self.rules[id.0 as usize].node.eval(record, lookup)
    }

    /// [`evaluate`](RuleSet::evaluate) on a decoded Avro record
    /// (`Value::Record`, as `apache_avro::from_avro_datum` yields it with the
    /// schema the rules were compiled against).
    pub fn evaluate_avro<L>(&self, record: &Value, lookup: &L, failures: &mut Vec<RuleId>) -> Result<bool, ShapeError>
    where
        L: Lookup + ?Sized,
    {
        match record {
            Value::Record(fields) if fields.len() == self.field_names.len() => {
                Ok(self.evaluate(fields.as_slice(), lookup, failures))
            }
            Value::Record(fields) => Err(ShapeError { expected: self.field_names.len(), found: Some(fields.len()) }),
            _ => Err(ShapeError { expected: self.field_names.len(), found: None }),
        }
    }
}

fn collect_uses(node: &Node, fields: &mut Vec<usize>, datasets: &mut Vec<DatasetId>) {
    match node {
        Node::Const(_) => {}
        Node::And(items) | Node::Or(items) => items.iter().for_each(|n| collect_uses(n, fields, datasets)),
        Node::Not(inner) => collect_uses(inner, fields, datasets),
        Node::IsNull { field, .. }
        | Node::Truthy { field }
        | Node::CmpLit { field, .. }
        | Node::Range { field, .. }
        | Node::Set { field, .. }
        | Node::EnumSet { field, .. } => fields.push(*field),
        Node::CmpFields { lhs, rhs, .. } => fields.extend([*lhs, *rhs]),
        Node::Lookup { dataset, field, .. } => {
            fields.push(*field);
            datasets.push(*dataset);
        }
    }
}

/// A value given to [`RuleSet::evaluate_avro`] that is not a record of the compiled schema's shape.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ShapeError {
    /// Fields in the schema.
    pub expected: usize,
    /// Fields in the value, or `None` if it is not a record.
    pub found: Option<usize>,
}

impl fmt::Display for ShapeError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.found {
            Some(n) => write!(f, "record has {n} fields, the rules' schema has {}", self.expected),
            None => write!(f, "value is not a record"),
        }
    }
}

impl std::error::Error for ShapeError {}
