//! The syntax tree of a rules file, as parsed and before any type is known.
//!
//! Owns the AST types. Every node keeps its [`Span`] so that the checker can
//! point at the exact spot of a type error. Nothing here refers to the Avro
//! schema: names are plain strings until the checker resolves them.
//! `AND` and `OR` chains are n-ary (`a AND b AND c` is one node with three
//! children), so only parentheses and `NOT` add depth, and the parser bounds
//! that depth by [`MAX_DEPTH`](crate::MAX_DEPTH).

use crate::error::Span;

/// A parsed rules file: its rules in source order.
#[derive(Clone, Debug, PartialEq)]
pub struct RuleFile {
    pub rules: Vec<RuleDef>,
}

/// `rule <name>: <expr>`.
#[derive(Clone, Debug, PartialEq)]
pub struct RuleDef {
    pub name: Ident,
    pub expr: Expr,
}

/// A name as written, with its place.
#[derive(Clone, Debug, PartialEq)]
pub struct Ident {
    pub name: String,
    pub span: Span,
}

/// A boolean expression.
#[derive(Clone, Debug, PartialEq)]
pub struct Expr {
    pub kind: ExprKind,
    pub span: Span,
}

#[derive(Clone, Debug, PartialEq)]
pub enum ExprKind {
    /// `a OR b OR …` (two or more children).
    Or(Vec<Expr>),
    /// `a AND b AND …` (two or more children).
    And(Vec<Expr>),
    /// `NOT a`.
    Not(Box<Expr>),
    /// `lhs <op> rhs`.
    Compare { op: CmpOp, op_span: Span, lhs: Operand, rhs: Operand },
    /// `operand [NOT] IN RANGE [low, high]` (inclusive).
    InRange { operand: Operand, low: Literal, high: Literal, negated: bool },
    /// `operand [NOT] IN (a, b, …)`.
    InSet { operand: Operand, items: Vec<Literal>, negated: bool },
    /// `operand NULL` / `operand NOT NULL`.
    IsNull { operand: Operand, negated: bool },
    /// `LOOKUP(dataset, key)`.
    Lookup { dataset: Ident, key: Operand },
    /// An operand standing alone: a boolean field, `TRUE` or `FALSE`.
    Truthy(Operand),
}

/// A comparison operator.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum CmpOp {
    Eq,
    Ne,
    Lt,
    Le,
    Gt,
    Ge,
}

impl CmpOp {
    /// The operator with its operands swapped: `a < b` ⇔ `b > a`.
    pub fn flip(self) -> CmpOp {
        match self {
            CmpOp::Lt => CmpOp::Gt,
            CmpOp::Le => CmpOp::Ge,
            CmpOp::Gt => CmpOp::Lt,
            CmpOp::Ge => CmpOp::Le,
            other => other,
        }
    }

    /// Whether the operator orders its operands (`<`, `<=`, `>`, `>=`).
    pub fn is_ordering(self) -> bool {
        !matches!(self, CmpOp::Eq | CmpOp::Ne)
    }

    /// The operator as written.
    pub fn symbol(self) -> &'static str {
        match self {
            CmpOp::Eq => "=",
            CmpOp::Ne => "!=",
            CmpOp::Lt => "<",
            CmpOp::Le => "<=",
            CmpOp::Gt => ">",
            CmpOp::Ge => ">=",
        }
    }
}

/// A field or a literal.
#[derive(Clone, Debug, PartialEq)]
pub enum Operand {
    Field(Ident),
    Literal(Literal),
}

impl Operand {
    pub fn span(&self) -> Span {
        match self {
            Operand::Field(f) => f.span,
            Operand::Literal(l) => l.span,
        }
    }
}

/// A literal value as written.
#[derive(Clone, Debug, PartialEq)]
pub struct Literal {
    pub value: LitValue,
    pub span: Span,
}

#[derive(Clone, Debug, PartialEq)]
pub enum LitValue {
    /// A number, as written, with a leading `-` if negative (`-12.50`).
    Number(String),
    Str(String),
    /// Days since 1970-01-01.
    Date(i32),
    /// Nanoseconds since 1970-01-01T00:00:00Z.
    Timestamp(i128),
    Bool(bool),
    Null,
    /// A literal the lexer already reported as malformed; the checker skips it silently.
    Invalid,
}

impl LitValue {
    /// How the literal is described in type errors ("a string", "a date", …).
    pub fn describe(&self) -> &'static str {
        match self {
            LitValue::Number(_) => "a number",
            LitValue::Str(_) => "a string",
            LitValue::Date(_) => "a date",
            LitValue::Timestamp(_) => "a timestamp",
            LitValue::Bool(_) => "a boolean",
            LitValue::Null => "NULL",
            LitValue::Invalid => "an invalid literal",
        }
    }
}
