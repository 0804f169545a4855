//! The compiled form of a rule and its evaluation.
//!
//! A [`Node`] is a rule after type checking: fields are schema positions,
//! literals are already in the representation of the field they meet
//! (`i64`, `f64`, unscaled `i128`, days, units of the field's timestamp, enum
//! symbol positions), operators whose literal stands on the left are flipped,
//! and `NOT IN` is `Not(In)`. Evaluation walks this tree over a borrowed
//! [`RecordView`]; it allocates nothing and recurses no deeper than the
//! parser's [`MAX_DEPTH`](crate::MAX_DEPTH) allows.
//!
//! Logic is three-valued (Kleene, as SQL): a predicate whose field is null,
//! a NaN, or a value of the wrong kind is [`Truth::Unknown`]; `NOT` keeps
//! unknown unknown; `AND` is false if any side is false, `OR` is true if any
//! side is true, otherwise unknown wins over the neutral value. A rule passes
//! only when it is [`Truth::True`]. `NULL` / `NOT NULL` are never unknown.

use std::cmp::Ordering;

use crate::ast::CmpOp;
use crate::record::{DatasetId, FieldRef, Lookup, RecordView};

/// The value of a rule or sub-expression for one record.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Truth {
    False,
    True,
    Unknown,
}

impl Truth {
    fn from_bool(b: bool) -> Truth {
        if b { Truth::True } else { Truth::False }
    }

    fn not(self) -> Truth {
        match self {
            Truth::False => Truth::True,
            Truth::True => Truth::False,
            Truth::Unknown => Truth::Unknown,
        }
    }
}

/// A literal in the representation of the field it is compared with.
#[derive(Clone, Debug, PartialEq)]
pub(crate) enum Lit {
    Bool(bool),
    Int(i64),
    Float(f64),
    Decimal(i128),
    Date(i32),
    Timestamp(i64),
    Str(Box<str>),
    Enum(u32),
}

#[derive(Clone, Debug)]
pub(crate) enum Node {
    Const(Truth),
    And(Box<[Node]>),
    Or(Box<[Node]>),
    Not(Box<Node>),
    /// `field NULL` (or `NOT NULL` when `negated`).
    IsNull {
        field: usize,
        negated: bool,
    },
    /// A boolean field standing alone.
    Truthy {
        field: usize,
    },
    /// `field <op> literal`.
    CmpLit {
        field: usize,
        op: CmpOp,
        lit: Lit,
    },
    /// `field <op> field`.
    CmpFields {
        lhs: usize,
        op: CmpOp,
        rhs: usize,
    },
    /// `field IN RANGE [low, high]`.
    Range {
        field: usize,
        low: Lit,
        high: Lit,
    },
    /// `field IN (items…)`.
    Set {
        field: usize,
        items: Box<[Lit]>,
    },
    /// `enum_field IN (symbols…)`: `members[symbol position]`.
    EnumSet {
        field: usize,
        members: Box<[bool]>,
    },
    /// `LOOKUP(dataset, field)`; `symbols` is set for an enum key, passed by symbol.
    Lookup {
        dataset: DatasetId,
        field: usize,
        symbols: Option<Box<[Box<str>]>>,
    },
}

/// Orders a field value against a literal; `None` when the comparison is unknown.
fn cmp_lit(value: &FieldRef<'_>, lit: &Lit) -> Option<Ordering> {
    match (value, lit) {
        (FieldRef::Int(a), Lit::Int(b)) => Some(a.cmp(b)),
        (FieldRef::Float(a), Lit::Float(b)) => a.partial_cmp(b),
        (FieldRef::Decimal(a), Lit::Decimal(b)) => Some(a.cmp(b)),
        (FieldRef::Date(a), Lit::Date(b)) => Some(a.cmp(b)),
        (FieldRef::Timestamp(a), Lit::Timestamp(b)) => Some(a.cmp(b)),
        (FieldRef::Str(a), Lit::Str(b)) => Some((*a).cmp(&**b)),
        (FieldRef::Enum(a), Lit::Enum(b)) => Some(a.cmp(b)),
        (FieldRef::Bool(a), Lit::Bool(b)) => Some(a.cmp(b)),
        // Views that hand out the underlying Avro integer of a logical type.
        (FieldRef::Int(a), Lit::Date(b)) => Some(a.cmp(&i64::from(*b))),
        (FieldRef::Int(a), Lit::Timestamp(b)) => Some(a.cmp(b)),
        _ => None,
    }
}

/// Orders two field values of the same kind; `None` when the comparison is unknown.
fn cmp_fields(a: &FieldRef<'_>, b: &FieldRef<'_>) -> Option<Ordering> {
    match (a, b) {
        (FieldRef::Int(a), FieldRef::Int(b)) => Some(a.cmp(b)),
        (FieldRef::Float(a), FieldRef::Float(b)) => a.partial_cmp(b),
        (FieldRef::Decimal(a), FieldRef::Decimal(b)) => Some(a.cmp(b)),
        (FieldRef::Date(a), FieldRef::Date(b)) => Some(a.cmp(b)),
        (FieldRef::Timestamp(a), FieldRef::Timestamp(b)) => Some(a.cmp(b)),
        (FieldRef::Str(a), FieldRef::Str(b)) => Some(a.cmp(b)),
        (FieldRef::Enum(a), FieldRef::Enum(b)) => Some(a.cmp(b)),
        (FieldRef::Bool(a), FieldRef::Bool(b)) => Some(a.cmp(b)),
        _ => None,
    }
}

fn holds(op: CmpOp, ordering: Option<Ordering>) -> Truth {
    let Some(o) = ordering else { return Truth::Unknown };
    Truth::from_bool(match op {
        CmpOp::Eq => o == Ordering::Equal,
        CmpOp::Ne => o != Ordering::Equal,
        CmpOp::Lt => o == Ordering::Less,
        CmpOp::Le => o != Ordering::Greater,
        CmpOp::Gt => o == Ordering::Greater,
        CmpOp::Ge => o != Ordering::Less,
    })
}

impl Node {
    /// Evaluates the node for one record.
    pub(crate) fn eval<R, L>(&self, record: &R, lookup: &L) -> Truth
    where
        R: RecordView + ?Sized,
        L: Lookup + ?Sized,
    {
        match self {
            Node::Const(t) => *t,
            Node::And(items) => {
                let mut acc = Truth::True;
                for item in items.iter() {
                    match item.eval(record, lookup) {
                        Truth::False => return Truth::False,
                        Truth::Unknown => acc = Truth::Unknown,
                        Truth::True => {}
                    }
                }
                acc
            }
            Node::Or(items) => {
                let mut acc = Truth::False;
                for item in items.iter() {
                    match item.eval(record, lookup) {
                        Truth::True => return Truth::True,
                        Truth::Unknown => acc = Truth::Unknown,
                        Truth::False => {}
                    }
                }
                acc
            }
            Node::Not(inner) => inner.eval(record, lookup).not(),
            Node::IsNull { field, negated } => Truth::from_bool(record.field(*field).is_null() != *negated),
            Node::Truthy { field } => match record.field(*field) {
                FieldRef::Bool(b) => Truth::from_bool(b),
                _ => Truth::Unknown,
            },
            Node::CmpLit { field, op, lit } => holds(*op, cmp_lit(&record.field(*field), lit)),
            Node::CmpFields { lhs, op, rhs } => holds(*op, cmp_fields(&record.field(*lhs), &record.field(*rhs))),
            Node::Range { field, low, high } => {
                let value = record.field(*field);
                match (cmp_lit(&value, low), cmp_lit(&value, high)) {
                    (Some(lo), Some(hi)) => Truth::from_bool(lo != Ordering::Less && hi != Ordering::Greater),
                    _ => Truth::Unknown,
                }
            }
            Node::Set { field, items } => {
                let value = record.field(*field);
                let mut acc = Truth::False;
                for item in items.iter() {
                    match cmp_lit(&value, item) {
                        Some(Ordering::Equal) => return Truth::True,
                        Some(_) => {}
                        None => acc = Truth::Unknown,
                    }
                }
                acc
            }
            Node::EnumSet { field, members } => match record.field(*field) {
                // A position past the symbols is a corrupt value: unknown, like a wrong kind.
                FieldRef::Enum(i) => members.get(i as usize).map_or(Truth::Unknown, |&m| Truth::from_bool(m)),
                _ => Truth::Unknown,
            },
            Node::Lookup { dataset, field, symbols } => {
                let key = record.field(*field);
                let key = match (key, symbols) {
                    (FieldRef::Null | FieldRef::Other, _) => return Truth::Unknown,
                    (FieldRef::Enum(i), Some(symbols)) => match symbols.get(i as usize) {
                        Some(symbol) => FieldRef::Str(symbol),
                        None => return Truth::Unknown,
                    },
                    (key, _) => key,
                };
                Truth::from_bool(lookup.contains(*dataset, &key))
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kleene_logic_for_and_or_not() {
        use Truth::*;
        let c = |t| Node::Const(t);
        let record: [FieldRef<'_>; 0] = [];
        let and = |a, b| Node::And(Box::new([c(a), c(b)])).eval(&record[..], &crate::NoLookup);
        let or = |a, b| Node::Or(Box::new([c(a), c(b)])).eval(&record[..], &crate::NoLookup);
        assert_eq!([and(True, Unknown), and(False, Unknown), and(Unknown, Unknown)], [Unknown, False, Unknown]);
        assert_eq!([or(True, Unknown), or(False, Unknown), or(Unknown, Unknown)], [True, Unknown, Unknown]);
        assert_eq!(Node::Not(Box::new(c(Unknown))).eval(&record[..], &crate::NoLookup), Unknown);
    }

    #[test]
    fn enum_positions_past_the_symbols_are_unknown() {
        let record = [FieldRef::Enum(7)];
        let node = Node::EnumSet { field: 0, members: Box::new([true, false]) };
        assert_eq!(node.eval(&record[..], &crate::NoLookup), Truth::Unknown);
        let node = Node::Lookup { dataset: crate::DatasetId(0), field: 0, symbols: Some(Box::new(["A".into()])) };
        assert_eq!(node.eval(&record[..], &|_, _: &FieldRef<'_>| true), Truth::Unknown);
    }

    #[test]
    fn null_nan_and_wrong_kinds_are_unknown() {
        let record = [FieldRef::Null, FieldRef::Float(f64::NAN), FieldRef::Str("x")];
        for field in 0..3 {
            let node = Node::CmpLit { field, op: CmpOp::Ne, lit: Lit::Float(1.0) };
            assert_eq!(node.eval(&record[..], &crate::NoLookup), Truth::Unknown, "field {field}");
        }
        let node = Node::IsNull { field: 0, negated: false };
        assert_eq!(node.eval(&record[..], &crate::NoLookup), Truth::True);
    }
}
