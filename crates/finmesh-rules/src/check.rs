//! The type checker: resolves names against the Avro schema and the reference
//! datasets, checks every operator against its operands' types, and lowers
//! the AST into evaluator [`Node`]s in the same pass.
//!
//! Invariants: a rule is lowered only if it has no error; the checker keeps
//! going after an error (sibling sub-expressions and later rules are still
//! checked), so one run reports every problem of the file; every error points
//! at the narrowest span that explains it (the unknown name, the literal of
//! the wrong type, the operator that does not apply). The typing table is in
//! `docs/rules.md`.

use std::cmp::Ordering;

use crate::ast::{CmpOp, Expr, ExprKind, Ident, LitValue, Literal, Operand};
use crate::error::{ErrorKind, RuleError, Span, closest};
use crate::eval::{Lit, Node, Truth};
use crate::literal::{Number, parse_date, parse_timestamp};
use crate::record::{Datasets, KeyType};
use crate::schema::{FieldInfo, RecordFields, ScalarType};

pub(crate) struct Checker<'a> {
    pub fields: &'a RecordFields,
    pub datasets: &'a Datasets,
    pub errors: Vec<RuleError>,
}

fn mismatch(span: Span, message: String) -> RuleError {
    RuleError::new(ErrorKind::TypeMismatch, span, message)
}

impl<'a> Checker<'a> {
    /// Checks and lowers one expression; `None` if it has errors (already recorded).
    pub(crate) fn expr(&mut self, expr: &Expr) -> Option<Node> {
        match &expr.kind {
            ExprKind::And(items) => self.all(items).map(|nodes| Node::And(nodes.into())),
            ExprKind::Or(items) => self.all(items).map(|nodes| Node::Or(nodes.into())),
            ExprKind::Not(inner) => self.expr(inner).map(|n| Node::Not(Box::new(n))),
            ExprKind::Compare { op, op_span, lhs, rhs } => self.compare(expr.span, *op, *op_span, lhs, rhs),
            ExprKind::InRange { operand, low, high, negated } => {
                self.in_range(operand, low, high).map(|n| negate(n, *negated))
            }
            ExprKind::InSet { operand, items, negated } => self.in_set(operand, items).map(|n| negate(n, *negated)),
            ExprKind::IsNull { operand, negated } => {
                let field = self.operand_field(operand, "NULL and NOT NULL test a field")?;
                Some(Node::IsNull { field: field.index, negated: *negated })
            }
            ExprKind::Lookup { dataset, key } => self.lookup(dataset, key),
            ExprKind::Truthy(operand) => self.truthy(operand),
        }
    }

    fn all(&mut self, items: &[Expr]) -> Option<Vec<Node>> {
        let nodes: Vec<Option<Node>> = items.iter().map(|e| self.expr(e)).collect();
        nodes.into_iter().collect()
    }

    fn push(&mut self, error: RuleError) -> Option<Node> {
        self.errors.push(error);
        None
    }

    /// Resolves a field name, reporting an unknown one with the nearest known name.
    fn field(&mut self, ident: &Ident) -> Option<&'a FieldInfo> {
        let fields = self.fields;
        if let Some(field) = fields.get(&ident.name) {
            return Some(field);
        }
        let mut error = RuleError::new(ErrorKind::UnknownField, ident.span, format!("unknown field `{}`", ident.name));
        if let Some(near) = closest(&ident.name, fields.fields.iter().map(|f| f.name.as_str())) {
            error.set_help(format!("did you mean `{near}`?"));
        }
        self.errors.push(error);
        None
    }

    /// The field an operand names; a literal there is an error explained by `why`.
    fn operand_field(&mut self, operand: &Operand, why: &str) -> Option<&'a FieldInfo> {
        match operand {
            Operand::Field(ident) => self.field(ident),
            Operand::Literal(lit) => {
                if lit.value != LitValue::Invalid {
                    self.errors.push(mismatch(lit.span, format!("{why}, not a literal")));
                }
                None
            }
        }
    }

    /// Reports a field of a type rules cannot compare.
    fn comparable(&mut self, field: &FieldInfo, span: Span) -> bool {
        if let ScalarType::Unsupported(_) = field.ty {
            let message = format!("field `{}` has type {}, which rules cannot compare", field.name, field.type_name);
            let error = RuleError::new(ErrorKind::UnsupportedField, span, message)
                .with_help("it can only be tested with NULL or NOT NULL");
            self.errors.push(error);
            return false;
        }
        true
    }

    fn ordered(&mut self, field: &FieldInfo, op_span: Span, what: &str) -> bool {
        if matches!(field.ty, ScalarType::Enum { .. } | ScalarType::Bool) {
            let message = format!("{what} does not apply to {} field `{}`", field.type_name, field.name);
            self.errors.push(mismatch(op_span, message).with_help("compare it with =, != or IN (…)"));
            return false;
        }
        true
    }

    fn compare(&mut self, span: Span, op: CmpOp, op_span: Span, lhs: &Operand, rhs: &Operand) -> Option<Node> {
        match (lhs, rhs) {
            (Operand::Field(a), Operand::Field(b)) => {
                let (fa, fb) = (self.field(a), self.field(b));
                let (fa, fb) = (fa?, fb?);
                if !self.comparable(fa, a.span) | !self.comparable(fb, b.span) {
                    return None;
                }
                if !same_kind(&fa.ty, &fb.ty) {
                    let message = format!(
                        "cannot compare {} field `{}` with {} field `{}`",
                        fa.type_name, fa.name, fb.type_name, fb.name
                    );
                    return self.push(mismatch(b.span, message));
                }
                if op.is_ordering() && !self.ordered(fa, op_span, &format!("`{}`", op.symbol())) {
                    return None;
                }
                Some(Node::CmpFields { lhs: fa.index, op, rhs: fb.index })
            }
            (Operand::Field(f), Operand::Literal(l)) => self.compare_literal(f, op, op_span, l),
            (Operand::Literal(l), Operand::Field(f)) => self.compare_literal(f, op.flip(), op_span, l),
            (Operand::Literal(_), Operand::Literal(_)) => {
                self.push(mismatch(span, "a comparison needs a field on at least one side".into()))
            }
        }
    }

    fn compare_literal(&mut self, ident: &Ident, op: CmpOp, op_span: Span, lit: &Literal) -> Option<Node> {
        let field = self.field(ident)?;
        if lit.value == LitValue::Null {
            let fix = if op == CmpOp::Ne { "NOT NULL" } else { "NULL" };
            let error = mismatch(lit.span, "NULL is not a value; comparing with it is never true".into())
                .with_help(format!("write `{} {fix}`", ident.name));
            return self.push(error);
        }
        if !self.comparable(field, ident.span) {
            return None;
        }
        if op.is_ordering() && !self.ordered(field, op_span, &format!("`{}`", op.symbol())) {
            return None;
        }
        let lit = self.lower(field, lit)?;
        Some(Node::CmpLit { field: field.index, op, lit })
    }

    fn in_range(&mut self, operand: &Operand, low: &Literal, high: &Literal) -> Option<Node> {
        let field = self.operand_field(operand, "IN RANGE tests a field")?;
        if !self.comparable(field, operand.span()) || !self.ordered(field, operand.span(), "IN RANGE") {
            return None;
        }
        let (lo, hi) = (self.lower(field, low), self.lower(field, high));
        let (lo, hi) = (lo?, hi?);
        if lit_order(&lo, &hi) == Some(Ordering::Greater) {
            let error = RuleError::new(
                ErrorKind::EmptyRange,
                low.span.to(high.span),
                "the range is empty: its lower bound is above its upper bound",
            )
            .with_help("write the smaller bound first");
            return self.push(error);
        }
        Some(Node::Range { field: field.index, low: lo, high: hi })
    }

    fn in_set(&mut self, operand: &Operand, items: &[Literal]) -> Option<Node> {
        let field = self.operand_field(operand, "IN tests a field")?;
        if !self.comparable(field, operand.span()) {
            return None;
        }
        let lits: Vec<Option<Lit>> = items.iter().map(|l| self.lower(field, l)).collect();
        let lits: Vec<Lit> = lits.into_iter().collect::<Option<_>>()?;
        if let ScalarType::Enum { symbols, .. } = &field.ty {
            let mut members = vec![false; symbols.len()];
            for lit in &lits {
                if let Lit::Enum(i) = lit {
                    members[*i as usize] = true;
                }
            }
            return Some(Node::EnumSet { field: field.index, members: members.into() });
        }
        Some(Node::Set { field: field.index, items: lits.into() })
    }

    fn lookup(&mut self, dataset: &Ident, key: &Operand) -> Option<Node> {
        let datasets = self.datasets;
        let id = datasets.id(&dataset.name);
        if id.is_none() {
            let mut error = RuleError::new(
                ErrorKind::UnknownDataset,
                dataset.span,
                format!("unknown reference dataset `{}`", dataset.name),
            );
            let names: Vec<&str> = datasets.names().collect();
            if let Some(near) = closest(&dataset.name, names.iter().copied()) {
                error.set_help(format!("did you mean `{near}`?"));
            } else if names.is_empty() {
                error.set_help("no reference datasets are loaded");
            } else {
                error.set_help(format!("known datasets: {}", names.join(", ")));
            }
            self.errors.push(error);
        }
        let field = self.operand_field(key, "LOOKUP needs a field as its key")?;
        let id = id?;
        let key_type = datasets.key_type(id).expect("id from this registry");
        let symbols = match (&field.ty, key_type) {
            (ScalarType::String, KeyType::String) | (ScalarType::Int, KeyType::Int) => None,
            (ScalarType::Enum { symbols, .. }, KeyType::String) => {
                Some(symbols.iter().map(|s| s.as_str().into()).collect())
            }
            _ => {
                let message = format!(
                    "dataset `{}` has {} keys, but field `{}` is {}",
                    dataset.name,
                    Datasets::describe_key(key_type),
                    field.name,
                    article(&field.type_name)
                );
                return self.push(mismatch(key.span(), message));
            }
        };
        Some(Node::Lookup { dataset: id, field: field.index, symbols })
    }

    fn truthy(&mut self, operand: &Operand) -> Option<Node> {
        match operand {
            Operand::Literal(Literal { value: LitValue::Bool(b), .. }) => {
                Some(Node::Const(if *b { Truth::True } else { Truth::False }))
            }
            Operand::Literal(Literal { value: LitValue::Invalid, .. }) => None,
            Operand::Literal(lit) => self.push(
                mismatch(lit.span, format!("{} alone is not a condition", lit.value.describe()))
                    .with_help("compare a field with it, e.g. `field = …`"),
            ),
            Operand::Field(ident) => {
                let field = self.field(ident)?;
                if field.ty == ScalarType::Bool {
                    return Some(Node::Truthy { field: field.index });
                }
                let message = format!("field `{}` is {}, not a condition", field.name, article(&field.type_name));
                let help = match field.ty {
                    ScalarType::Int | ScalarType::Float { .. } | ScalarType::Decimal { .. } => {
                        format!("compare it, e.g. `{} > 0`, or test `{} NOT NULL`", field.name, field.name)
                    }
                    _ => format!("compare it with a value, or test `{} NOT NULL`", field.name),
                };
                self.push(mismatch(ident.span, message).with_help(help))
            }
        }
    }

    /// Converts a literal to the representation of `field`, or reports why it cannot be.
    fn lower(&mut self, field: &FieldInfo, lit: &Literal) -> Option<Lit> {
        let wrong_kind = |help: Option<&str>| {
            let message =
                format!("cannot compare {} field `{}` with {}", field.type_name, field.name, lit.value.describe());
            let error = mismatch(lit.span, message);
            match help {
                Some(help) => error.with_help(help),
                None => error,
            }
        };
        let result = match (&field.ty, &lit.value) {
            (_, LitValue::Invalid) => return None,
            (_, LitValue::Null) => Err(mismatch(lit.span, "NULL is not a value; use `field NULL` instead".into())),
            (ScalarType::Int, LitValue::Number(text)) => Number::parse(text).to_i64().map(Lit::Int).ok_or_else(|| {
                let n = Number::parse(text);
                let why = if n.frac.trim_end_matches('0').is_empty() {
                    format!("{text} does not fit in field `{}` ({})", field.name, field.type_name)
                } else {
                    format!("field `{}` is {}; {text} is not a whole number", field.name, article(&field.type_name))
                };
                mismatch(lit.span, why)
            }),
            (ScalarType::Float { single }, LitValue::Number(text)) => {
                // The lexer only makes `-?digits(.digits)?`, which always parses.
                let value: f64 = text.parse().unwrap_or(f64::NAN);
                // A float field holds f32 values: round the literal the same way so `x = 0.1` can hold.
                Ok(Lit::Float(if *single { f64::from(value as f32) } else { value }))
            }
            (ScalarType::Decimal { scale }, LitValue::Number(text)) => {
                let number = Number::parse(text);
                number.to_scaled(*scale).map(Lit::Decimal).ok_or_else(|| {
                    let why = if number.frac.trim_end_matches('0').len() > *scale as usize {
                        format!(
                            "{text} has more decimal places than field `{}` ({}) holds",
                            field.name, field.type_name
                        )
                    } else {
                        format!("{text} has more digits than field `{}` ({}) holds", field.name, field.type_name)
                    };
                    mismatch(lit.span, why)
                })
            }
            (ScalarType::Date, LitValue::Date(d)) => Ok(Lit::Date(*d)),
            (ScalarType::Timestamp(unit), LitValue::Timestamp(nanos)) => {
                if nanos % unit.nanos() != 0 {
                    Err(mismatch(
                        lit.span,
                        format!("this timestamp is more precise than field `{}` ({})", field.name, field.type_name),
                    ))
                } else {
                    i64::try_from(nanos / unit.nanos()).map(Lit::Timestamp).map_err(|_| {
                        mismatch(lit.span, format!("this timestamp is out of range for field `{}`", field.name))
                    })
                }
            }
            (ScalarType::Timestamp(unit), LitValue::Date(days)) => {
                i64::try_from(i128::from(*days) * 86_400 * 1_000_000_000 / unit.nanos())
                    .map(Lit::Timestamp)
                    .map_err(|_| mismatch(lit.span, format!("this date is out of range for field `{}`", field.name)))
            }
            (ScalarType::String, LitValue::Str(s)) => Ok(Lit::Str(s.as_str().into())),
            (ScalarType::Enum { name, symbols }, LitValue::Str(s)) => match symbols.iter().position(|x| x == s) {
                Some(i) => Ok(Lit::Enum(i as u32)),
                None => {
                    let help = match closest(s, symbols.iter().map(String::as_str)) {
                        Some(near) => format!("did you mean \"{near}\"?"),
                        None => format!("symbols: {}", symbols.join(", ")),
                    };
                    Err(RuleError::new(
                        ErrorKind::UnknownSymbol,
                        lit.span,
                        format!("\"{s}\" is not a symbol of enum {name}"),
                    )
                    .with_help(help))
                }
            },
            (ScalarType::Bool, LitValue::Bool(b)) => Ok(Lit::Bool(*b)),
            (ScalarType::Date | ScalarType::Timestamp(_), LitValue::Str(s)) => {
                let help = if parse_date(s).is_ok() || parse_timestamp(s).is_ok() {
                    format!("write it without quotes: {s}")
                } else if field.ty == ScalarType::Date {
                    "write dates without quotes, as YYYY-MM-DD".to_string()
                } else {
                    "write timestamps without quotes, as YYYY-MM-DDTHH:MM:SSZ".to_string()
                };
                Err(wrong_kind(Some(&help)))
            }
            (ScalarType::Int | ScalarType::Float { .. } | ScalarType::Decimal { .. }, LitValue::Str(s))
                if s.parse::<f64>().is_ok() =>
            {
                Err(wrong_kind(Some("write numbers without quotes")))
            }
            (ScalarType::String | ScalarType::Enum { .. }, LitValue::Number(_) | LitValue::Date(_)) => {
                Err(wrong_kind(Some("put the value in quotes")))
            }
            _ => Err(wrong_kind(None)),
        };
        result.map_err(|e| self.errors.push(e)).ok()
    }
}

fn negate(node: Node, negated: bool) -> Node {
    if negated { Node::Not(Box::new(node)) } else { node }
}

/// "a long", "an enum Desk".
fn article(type_name: &str) -> String {
    let vowel = type_name.starts_with(['a', 'e', 'i', 'o', 'u']);
    format!("{} {type_name}", if vowel { "an" } else { "a" })
}

/// Whether two fields' values can be compared with each other.
fn same_kind(a: &ScalarType, b: &ScalarType) -> bool {
    use ScalarType::*;
    match (a, b) {
        (Int, Int) | (Float { .. }, Float { .. }) | (Date, Date) | (String, String) | (Bool, Bool) => true,
        (Decimal { scale: x }, Decimal { scale: y }) => x == y,
        (Timestamp(x), Timestamp(y)) => x == y,
        (Enum { name: n1, symbols: s1 }, Enum { name: n2, symbols: s2 }) => n1 == n2 && s1 == s2,
        _ => false,
    }
}

/// Orders two literals lowered for the same field.
fn lit_order(a: &Lit, b: &Lit) -> Option<Ordering> {
    match (a, b) {
        (Lit::Int(a), Lit::Int(b)) => Some(a.cmp(b)),
        (Lit::Float(a), Lit::Float(b)) => a.partial_cmp(b),
        (Lit::Decimal(a), Lit::Decimal(b)) => Some(a.cmp(b)),
        (Lit::Date(a), Lit::Date(b)) => Some(a.cmp(b)),
        (Lit::Timestamp(a), Lit::Timestamp(b)) => Some(a.cmp(b)),
        (Lit::Str(a), Lit::Str(b)) => Some(a.cmp(b)),
        _ => None,
    }
}
