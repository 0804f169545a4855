//! The parser: tokens to a [`RuleFile`], by recursive descent.
//!
//! Grammar (the full EBNF with examples is in `docs/rules.md`):
//!
//! ```text
//! file      = { rule } ;
//! rule      = "rule" name ":" or ;
//! or        = and { "OR" and } ;
//! and       = unary { "AND" unary } ;
//! unary     = "NOT" unary | primary ;
//! primary   = "(" or ")" | "LOOKUP" "(" name "," operand ")" | predicate ;
//! predicate = operand [ cmp operand | [ "NOT" ] "IN" set | [ "NOT" ] "IN" "RANGE" range
//!                     | "NULL" | "NOT" "NULL" ] ;
//! ```
//!
//! Invariants: the parser never panics and never recurses deeper than
//! [`MAX_DEPTH`] nested parentheses / `NOT`s (deeper input is an error, so
//! hostile input cannot overflow the stack). After a syntax error it skips to
//! the next `rule` keyword and goes on, so one pass reports the first syntax
//! error of every rule.

use crate::ast::{CmpOp, Expr, ExprKind, Ident, LitValue, Literal, Operand, RuleDef, RuleFile};
use crate::error::{ErrorKind, RuleError, Span};
use crate::lexer::{Kw, Tok, Token, lex};

/// How deeply parentheses and `NOT` may nest.
pub const MAX_DEPTH: usize = 64;

/// Parses a rules file. Syntax errors are appended to `errors`; the returned
/// file holds every rule that parsed.
pub fn parse(src: &str, errors: &mut Vec<RuleError>) -> RuleFile {
    let tokens = lex(src, errors);
    // Where the lexer already complained: a syntax error that follows one of
    // these in the same rule is its echo and is not reported again.
    let lex_errors: Vec<usize> = errors.iter().map(|e| e.span().start).collect();
    let mut parser = Parser { src, tokens, pos: 0, depth: 0 };
    let mut rules = Vec::new();
    while !parser.at(&Tok::Eof) {
        let start = parser.pos;
        match parser.rule() {
            Ok(rule) => rules.push(rule),
            Err(error) => {
                let from = parser.tokens[start].span.start;
                if !lex_errors.iter().any(|&at| from <= at && at <= error.span().start) {
                    errors.push(error);
                }
                parser.skip_to_next_rule(start);
            }
        }
    }
    RuleFile { rules }
}

type PResult<T> = Result<T, RuleError>;

struct Parser<'s> {
    src: &'s str,
    tokens: Vec<Token>,
    pos: usize,
    depth: usize,
}

impl Parser<'_> {
    fn peek(&self) -> &Token {
        &self.tokens[self.pos]
    }

    fn peek_second(&self) -> &Tok {
        &self.tokens[(self.pos + 1).min(self.tokens.len() - 1)].tok
    }

    fn at(&self, tok: &Tok) -> bool {
        &self.peek().tok == tok
    }

    fn at_kw(&self, kw: Kw) -> bool {
        self.at(&Tok::Kw(kw))
    }

    /// Consumes and returns the current token (never moves past `Eof`).
    fn bump(&mut self) -> Token {
        let token = self.tokens[self.pos].clone();
        if token.tok != Tok::Eof {
            self.pos += 1;
        }
        token
    }

    fn eat(&mut self, tok: &Tok) -> bool {
        let hit = self.at(tok);
        if hit {
            self.bump();
        }
        hit
    }

    fn expect(&mut self, tok: &Tok, what: &str) -> PResult<Span> {
        if self.at(tok) { Ok(self.bump().span) } else { Err(self.unexpected(what)) }
    }

    /// "expected X, found Y" at the current token.
    fn unexpected(&self, expected: &str) -> RuleError {
        let token = self.peek();
        let found = match &token.tok {
            Tok::Eof => "the end of the file".to_string(),
            _ => format!("`{}`", &self.src[token.span.start..token.span.end]),
        };
        RuleError::new(ErrorKind::Syntax, token.span, format!("expected {expected}, found {found}"))
    }

    /// After an error in the rule that began at token `start`: on to the next `rule`
    /// keyword (which may be the token the error was found at).
    fn skip_to_next_rule(&mut self, start: usize) {
        if self.pos == start {
            self.bump();
        }
        while !self.at(&Tok::Eof) && !self.at_kw(Kw::Rule) {
            self.bump();
        }
        self.depth = 0;
    }

    fn rule(&mut self) -> PResult<RuleDef> {
        self.expect(&Tok::Kw(Kw::Rule), "`rule`")?;
        let name = match self.ident() {
            Some(name) => name,
            None => {
                let mut error = self.unexpected("a rule name");
                if let Tok::Kw(_) = self.peek().tok {
                    error.set_help("a keyword can be a rule name only in backticks");
                }
                return Err(error);
            }
        };
        self.expect(&Tok::Colon, "`:` after the rule name")?;
        let expr = self.or()?;
        if !self.at(&Tok::Eof) && !self.at_kw(Kw::Rule) {
            let mut error = self.unexpected("AND, OR or the next `rule`");
            if self.at_kw(Kw::Not) {
                error.set_help("after a value, NOT is followed by NULL or IN");
            }
            return Err(error);
        }
        Ok(RuleDef { name, expr })
    }

    fn ident(&mut self) -> Option<Ident> {
        let token = self.peek();
        let name = match &token.tok {
            Tok::Ident => self.src[token.span.start..token.span.end].to_string(),
            Tok::QuotedIdent(name) => name.clone(),
            _ => return None,
        };
        let span = self.bump().span;
        Some(Ident { name, span })
    }

    fn or(&mut self) -> PResult<Expr> {
        self.chain(Kw::Or, Self::and, ExprKind::Or)
    }

    fn and(&mut self) -> PResult<Expr> {
        self.chain(Kw::And, Self::unary, ExprKind::And)
    }

    /// `item { kw item }`, folded into one n-ary node when there are two or more items.
    fn chain(
        &mut self,
        kw: Kw,
        mut item: impl FnMut(&mut Self) -> PResult<Expr>,
        node: fn(Vec<Expr>) -> ExprKind,
    ) -> PResult<Expr> {
        let first = item(self)?;
        if !self.at_kw(kw) {
            return Ok(first);
        }
        let mut items = vec![first];
        while self.eat(&Tok::Kw(kw)) {
            items.push(item(self)?);
        }
        let span = items[0].span.to(items[items.len() - 1].span);
        Ok(Expr { kind: node(items), span })
    }

    fn enter(&mut self, span: Span) -> PResult<()> {
        self.depth += 1;
        if self.depth > MAX_DEPTH {
            return Err(RuleError::new(
                ErrorKind::TooDeep,
                span,
                format!("expression nested deeper than {MAX_DEPTH} levels of parentheses and NOT"),
            ));
        }
        Ok(())
    }

    fn unary(&mut self) -> PResult<Expr> {
        if !self.at_kw(Kw::Not) {
            return self.primary();
        }
        let not = self.bump().span;
        self.enter(not)?;
        let inner = self.unary()?;
        self.depth -= 1;
        let span = not.to(inner.span);
        Ok(Expr { kind: ExprKind::Not(Box::new(inner)), span })
    }

    fn primary(&mut self) -> PResult<Expr> {
        if self.at(&Tok::LParen) {
            let open = self.bump().span;
            self.enter(open)?;
            let mut inner = self.or()?;
            let close = self.expect(&Tok::RParen, "`)`")?;
            self.depth -= 1;
            inner.span = open.to(close);
            return Ok(inner);
        }
        if self.at_kw(Kw::Lookup) {
            return self.lookup();
        }
        self.predicate()
    }

    fn lookup(&mut self) -> PResult<Expr> {
        let start = self.bump().span;
        self.expect(&Tok::LParen, "`(` after LOOKUP")?;
        let dataset = self.ident().ok_or_else(|| self.unexpected("a dataset name"))?;
        self.expect(&Tok::Comma, "`,` after the dataset name")?;
        let key = self.operand()?;
        let close = self.expect(&Tok::RParen, "`)`")?;
        Ok(Expr { kind: ExprKind::Lookup { dataset, key }, span: start.to(close) })
    }

    fn predicate(&mut self) -> PResult<Expr> {
        let operand = self.operand()?;
        let start = operand.span();
        let op = match self.peek().tok {
            Tok::Eq => Some(CmpOp::Eq),
            Tok::Ne => Some(CmpOp::Ne),
            Tok::Lt => Some(CmpOp::Lt),
            Tok::Le => Some(CmpOp::Le),
            Tok::Gt => Some(CmpOp::Gt),
            Tok::Ge => Some(CmpOp::Ge),
            _ => None,
        };
        if let Some(op) = op {
            let op_span = self.bump().span;
            let rhs = self.operand()?;
            let span = start.to(rhs.span());
            return Ok(Expr { kind: ExprKind::Compare { op, op_span, lhs: operand, rhs }, span });
        }
        if self.at_kw(Kw::Null) {
            let end = self.bump().span;
            return Ok(Expr { kind: ExprKind::IsNull { operand, negated: false }, span: start.to(end) });
        }
        if self.at_kw(Kw::Not) && matches!(self.peek_second(), Tok::Kw(Kw::Null) | Tok::Kw(Kw::In)) {
            self.bump();
            if self.at_kw(Kw::Null) {
                let end = self.bump().span;
                return Ok(Expr { kind: ExprKind::IsNull { operand, negated: true }, span: start.to(end) });
            }
            return self.membership(operand, true);
        }
        if self.at_kw(Kw::In) {
            return self.membership(operand, false);
        }
        Ok(Expr { span: operand.span(), kind: ExprKind::Truthy(operand) })
    }

    /// After the operand (and `NOT`): `IN RANGE [a, b]` or `IN (a, b, …)`.
    fn membership(&mut self, operand: Operand, negated: bool) -> PResult<Expr> {
        let start = operand.span();
        self.expect(&Tok::Kw(Kw::In), "IN")?;
        if self.eat(&Tok::Kw(Kw::Range)) {
            self.expect(&Tok::LBracket, "`[` to open the range")?;
            let low = self.literal()?;
            self.expect(&Tok::Comma, "`,` between the bounds of the range")?;
            let high = self.literal()?;
            let close = self.expect(&Tok::RBracket, "`]` to close the range")?;
            return Ok(Expr { kind: ExprKind::InRange { operand, low, high, negated }, span: start.to(close) });
        }
        if !self.at(&Tok::LParen) {
            return Err(self.unexpected("RANGE or `(` after IN"));
        }
        self.bump();
        let mut items = vec![self.literal()?];
        while self.eat(&Tok::Comma) {
            items.push(self.literal()?);
        }
        let close = self.expect(&Tok::RParen, "`,` or `)` in the IN list")?;
        Ok(Expr { kind: ExprKind::InSet { operand, items, negated }, span: start.to(close) })
    }

    fn operand(&mut self) -> PResult<Operand> {
        if let Some(field) = self.ident() {
            return Ok(Operand::Field(field));
        }
        match self.literal() {
            Ok(literal) => Ok(Operand::Literal(literal)),
            Err(_) => Err(self.unexpected("a field, a literal, `(`, NOT or LOOKUP")),
        }
    }

    fn literal(&mut self) -> PResult<Literal> {
        let token = self.peek().clone();
        let value = match token.tok {
            Tok::Number => LitValue::Number(self.src[token.span.start..token.span.end].to_string()),
            Tok::Minus => {
                self.bump();
                let number = self.peek().clone();
                if number.tok != Tok::Number {
                    return Err(self.unexpected("a number after `-`"));
                }
                self.bump();
                let text = format!("-{}", &self.src[number.span.start..number.span.end]);
                return Ok(Literal { value: LitValue::Number(text), span: token.span.to(number.span) });
            }
            Tok::Str(s) => LitValue::Str(s),
            Tok::Date(d) => LitValue::Date(d),
            Tok::Timestamp(t) => LitValue::Timestamp(t),
            Tok::Kw(Kw::True) => LitValue::Bool(true),
            Tok::Kw(Kw::False) => LitValue::Bool(false),
            Tok::Kw(Kw::Null) => LitValue::Null,
            Tok::BadLiteral => LitValue::Invalid,
            _ => return Err(self.unexpected("a literal (number, string, date, timestamp, TRUE, FALSE)")),
        };
        self.bump();
        Ok(Literal { value, span: token.span })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse_ok(src: &str) -> RuleFile {
        let mut errors = Vec::new();
        let file = parse(src, &mut errors);
        assert!(errors.is_empty(), "{errors:?}");
        file
    }

    #[test]
    fn parses_the_issue_examples() {
        let file = parse_ok(
            "rule notional_positive: notional > 0\n\
             rule ccy_known: LOOKUP(currencies, ccy)\n\
             rule maturity: maturity IN RANGE [2020-01-01, 2080-12-31]\n\
             rule cpty: counterparty NOT NULL AND (desk = \"RATES\" OR desk = \"FX\")\n",
        );
        let names: Vec<&str> = file.rules.iter().map(|r| r.name.name.as_str()).collect();
        assert_eq!(names, ["notional_positive", "ccy_known", "maturity", "cpty"]);
        let ExprKind::And(items) = &file.rules[3].expr.kind else { panic!("{:?}", file.rules[3].expr) };
        assert!(matches!(items[0].kind, ExprKind::IsNull { negated: true, .. }));
        assert!(matches!(&items[1].kind, ExprKind::Or(alts) if alts.len() == 2));
    }

    #[test]
    fn and_binds_tighter_than_or_and_not_tighter_than_and() {
        let file = parse_ok("rule r: a OR NOT b AND c");
        let ExprKind::Or(items) = &file.rules[0].expr.kind else { panic!() };
        let ExprKind::And(conj) = &items[1].kind else { panic!() };
        assert!(matches!(conj[0].kind, ExprKind::Not(_)));
    }

    #[test]
    fn negated_membership_and_negative_literals() {
        let file = parse_ok("rule r: x NOT IN (-1, 2.5) AND y NOT IN RANGE [-3, 3]");
        let ExprKind::And(items) = &file.rules[0].expr.kind else { panic!() };
        let ExprKind::InSet { items: lits, negated: true, .. } = &items[0].kind else { panic!() };
        assert_eq!(lits[0].value, LitValue::Number("-1".into()));
        assert!(matches!(items[1].kind, ExprKind::InRange { negated: true, .. }));
    }

    #[test]
    fn every_broken_rule_is_reported_and_good_ones_kept() {
        let mut errors = Vec::new();
        let file = parse("rule a: x >\nrule b: y = 1\nrule c (z)\nrule d: (w = 1", &mut errors);
        assert_eq!(file.rules.len(), 1);
        assert_eq!(errors.len(), 3, "{errors:?}");
        assert!(errors.iter().all(|e| e.kind() == ErrorKind::Syntax));
    }

    #[test]
    fn a_bad_character_is_reported_once_not_again_by_the_parser() {
        let mut errors = Vec::new();
        let file = parse(
            "rule a: x ~ 1
rule b: y && z || NOT !w
rule c: (",
            &mut errors,
        );
        let messages: Vec<&str> = errors.iter().map(RuleError::message).collect();
        assert_eq!(
            messages,
            [
                "unexpected character `~`",
                "unexpected `&&`",
                "unexpected `||`",
                "unexpected `!`",
                "expected a field, a literal, `(`, NOT or LOOKUP, found the end of the file"
            ]
        );
        // `&&`, `||` and `!` read as AND, OR and NOT: rule b parsed.
        assert_eq!(file.rules.len(), 1);
    }

    #[test]
    fn deep_nesting_is_an_error_not_a_stack_overflow() {
        let src = format!("rule r: {}x{}", "(".repeat(100_000), ")".repeat(100_000));
        let mut errors = Vec::new();
        parse(&src, &mut errors);
        assert_eq!(errors[0].kind(), ErrorKind::TooDeep);
        let src = format!("rule r: {}x", "NOT ".repeat(100_000));
        let mut errors = Vec::new();
        parse(&src, &mut errors);
        assert_eq!(errors[0].kind(), ErrorKind::TooDeep);
    }
}
