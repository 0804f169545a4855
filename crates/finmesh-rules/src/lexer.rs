//! The lexer: rules source text to tokens.
//!
//! Owns the token set. Invariants: every token's span starts and ends on a
//! character boundary; the token list always ends with exactly one
//! [`Tok::Eof`], placed just after the last real token (so "unexpected end"
//! errors point at the end of the text, not at trailing blank lines); a lexing
//! error is recorded and the lexer moves on, so one pass reports every bad
//! character or literal. Keywords are case-insensitive; a field whose name is a
//! keyword is written in backticks (`` `range` ``).

use crate::error::{ErrorKind, RuleError, Span};
use crate::literal::{parse_date, parse_timestamp};

/// Keywords of the language.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Kw {
    Rule,
    And,
    Or,
    Not,
    In,
    Range,
    Null,
    Lookup,
    True,
    False,
}

impl Kw {
    fn from_ident(word: &str) -> Option<Kw> {
        const ALL: [(&str, Kw); 10] = [
            ("rule", Kw::Rule),
            ("and", Kw::And),
            ("or", Kw::Or),
            ("not", Kw::Not),
            ("in", Kw::In),
            ("range", Kw::Range),
            ("null", Kw::Null),
            ("lookup", Kw::Lookup),
            ("true", Kw::True),
            ("false", Kw::False),
        ];
        ALL.iter().find(|(k, _)| k.eq_ignore_ascii_case(word)).map(|&(_, kw)| kw)
    }
}

#[derive(Clone, Debug, PartialEq)]
pub(crate) enum Tok {
    /// A bare identifier; its text is the token's source slice.
    Ident,
    /// A backtick-quoted identifier, without the backticks.
    QuotedIdent(String),
    /// A string literal, unescaped.
    Str(String),
    /// An unsigned number literal; its text is the token's source slice.
    Number,
    /// A date literal, days since the epoch.
    Date(i32),
    /// A timestamp literal, nanoseconds since the epoch.
    Timestamp(i128),
    /// A literal the lexer already reported as malformed.
    BadLiteral,
    Kw(Kw),
    Colon,
    Comma,
    Minus,
    LParen,
    RParen,
    LBracket,
    RBracket,
    Lt,
    Le,
    Gt,
    Ge,
    Eq,
    Ne,
    Eof,
}

#[derive(Clone, Debug)]
pub(crate) struct Token {
    pub tok: Tok,
    pub span: Span,
}

/// Splits `src` into tokens, reporting malformed input into `errors`.
pub(crate) fn lex(src: &str, errors: &mut Vec<RuleError>) -> Vec<Token> {
    let mut lexer = Lexer { src, pos: 0, tokens: Vec::new(), errors };
    lexer.run();
    let end = lexer.tokens.last().map_or(0, |t| t.span.end);
    lexer.tokens.push(Token { tok: Tok::Eof, span: Span::new(end, end) });
    lexer.tokens
}

struct Lexer<'s, 'e> {
    src: &'s str,
    pos: usize,
    tokens: Vec<Token>,
    errors: &'e mut Vec<RuleError>,
}

impl Lexer<'_, '_> {
    fn peek(&self) -> Option<char> {
        self.src[self.pos..].chars().next()
    }

    fn peek_at(&self, n: usize) -> Option<char> {
        self.src[self.pos..].chars().nth(n)
    }

    fn push(&mut self, tok: Tok, start: usize) {
        self.tokens.push(Token { tok, span: Span::new(start, self.pos) });
    }

    /// Records an error from `start` to the current position; `.set_help(…)` may follow.
    fn error(&mut self, kind: ErrorKind, start: usize, message: String) -> &mut RuleError {
        self.errors.push(RuleError::new(kind, Span::new(start, self.pos), message));
        self.errors.last_mut().expect("just pushed")
    }

    fn run(&mut self) {
        // Editors on Windows may start a UTF-8 file with a byte order mark.
        if self.src.starts_with('\u{feff}') {
            self.pos = '\u{feff}'.len_utf8();
        }
        while let Some(c) = self.peek() {
            let start = self.pos;
            match c {
                c if c.is_whitespace() => self.pos += c.len_utf8(),
                '#' => self.pos = self.src[start..].find('\n').map_or(self.src.len(), |i| start + i),
                c if c.is_ascii_alphabetic() || c == '_' => self.ident(start),
                c if c.is_ascii_digit() => self.number(start),
                '"' => self.string(start),
                '`' => self.quoted_ident(start),
                _ => self.punct(start, c),
            }
        }
    }

    fn ident(&mut self, start: usize) {
        let len = self.src[start..]
            .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
            .unwrap_or(self.src.len() - start);
        self.pos = start + len;
        let word = &self.src[start..self.pos];
        let tok = Kw::from_ident(word).map_or(Tok::Ident, Tok::Kw);
        self.push(tok, start);
    }

    fn quoted_ident(&mut self, start: usize) {
        self.pos += 1;
        match self.src[self.pos..].find(['`', '\n']) {
            Some(i) if self.src.as_bytes()[self.pos + i] == b'`' && i > 0 => {
                let name = self.src[self.pos..self.pos + i].to_string();
                self.pos += i + 1;
                self.push(Tok::QuotedIdent(name), start);
            }
            _ => {
                let end = self.src[self.pos..].find('\n').map_or(self.src.len(), |i| self.pos + i);
                self.pos = end;
                self.error(ErrorKind::Syntax, start, "unterminated or empty `quoted` field name".into());
                self.push(Tok::QuotedIdent(String::new()), start);
            }
        }
    }

    fn digits(&mut self) -> usize {
        let n = self.src[self.pos..].bytes().take_while(u8::is_ascii_digit).count();
        self.pos += n;
        n
    }

    fn number(&mut self, start: usize) {
        let int_digits = self.digits();
        // `YYYY-MM-DD` and `YYYY-MM-DDTHH:MM:SS…` start like a number.
        if int_digits == 4 && self.peek() == Some('-') && self.peek_at(1).is_some_and(|c| c.is_ascii_digit()) {
            return self.date_or_timestamp(start);
        }
        if self.peek() == Some('.') && self.peek_at(1).is_some_and(|c| c.is_ascii_digit()) {
            self.pos += 1;
            self.digits();
        }
        if self.peek().is_some_and(|c| c.is_ascii_alphanumeric() || c == '_' || c == '.') {
            self.pos = start
                + self.src[start..]
                    .find(|c: char| !(c.is_ascii_alphanumeric() || "_.".contains(c)))
                    .unwrap_or(self.src.len() - start);
            let text = &self.src[start..self.pos];
            self.error(ErrorKind::InvalidLiteral, start, format!("`{text}` is not a number"))
                .set_help("numbers are written like 42, -7 or 0.25");
            return self.push(Tok::BadLiteral, start);
        }
        self.push(Tok::Number, start);
    }

    fn date_or_timestamp(&mut self, start: usize) {
        let len = self.src[start..]
            .find(|c: char| !(c.is_ascii_alphanumeric() || "-:.+".contains(c)))
            .unwrap_or(self.src.len() - start);
        self.pos = start + len;
        let text = &self.src[start..self.pos];
        let parsed =
            if text.len() > 10 { parse_timestamp(text).map(Tok::Timestamp) } else { parse_date(text).map(Tok::Date) };
        match parsed {
            Ok(tok) => self.push(tok, start),
            Err(message) => {
                self.error(ErrorKind::InvalidLiteral, start, message);
                self.push(Tok::BadLiteral, start);
            }
        }
    }

    fn string(&mut self, start: usize) {
        self.pos += 1;
        let mut value = String::new();
        loop {
            let Some(c) = self.peek() else {
                self.error(ErrorKind::InvalidLiteral, start, "unterminated string".into())
                    .set_help("close it with `\"` on the same line");
                return self.push(Tok::BadLiteral, start);
            };
            match c {
                '"' => {
                    self.pos += 1;
                    return self.push(Tok::Str(value), start);
                }
                '\n' => {
                    self.error(ErrorKind::InvalidLiteral, start, "unterminated string".into())
                        .set_help("close it with `\"` on the same line");
                    return self.push(Tok::BadLiteral, start);
                }
                '\\' => {
                    let escape_start = self.pos;
                    self.pos += 1;
                    match self.peek() {
                        Some(e @ ('"' | '\\')) => {
                            value.push(e);
                            self.pos += 1;
                        }
                        Some('n') => {
                            value.push('\n');
                            self.pos += 1;
                        }
                        Some('t') => {
                            value.push('\t');
                            self.pos += 1;
                        }
                        other => {
                            self.pos += other.filter(|&c| c != '\n').map_or(0, char::len_utf8);
                            self.error(ErrorKind::InvalidLiteral, escape_start, "unknown escape in string".into())
                                .set_help("use \\\", \\\\, \\n or \\t");
                        }
                    }
                }
                c => {
                    value.push(c);
                    self.pos += c.len_utf8();
                }
            }
        }
    }

    fn punct(&mut self, start: usize, c: char) {
        self.pos += c.len_utf8();
        let next = self.peek();
        let two = |lexer: &mut Self, tok: Tok| {
            lexer.pos += 1;
            lexer.push(tok, start);
        };
        match (c, next) {
            ('<', Some('=')) => two(self, Tok::Le),
            ('<', Some('>')) => two(self, Tok::Ne),
            ('>', Some('=')) => two(self, Tok::Ge),
            ('!', Some('=')) => two(self, Tok::Ne),
            ('=', Some('=')) => {
                self.pos += 1;
                self.error(ErrorKind::Syntax, start, "`==` is not an operator".into()).set_help("write `=` to compare");
                self.push(Tok::Eq, start);
            }
            ('<', _) => self.push(Tok::Lt, start),
            ('>', _) => self.push(Tok::Gt, start),
            ('=', _) => self.push(Tok::Eq, start),
            (':', _) => self.push(Tok::Colon, start),
            (',', _) => self.push(Tok::Comma, start),
            ('-', _) => self.push(Tok::Minus, start),
            ('(', _) => self.push(Tok::LParen, start),
            (')', _) => self.push(Tok::RParen, start),
            ('[', _) => self.push(Tok::LBracket, start),
            (']', _) => self.push(Tok::RBracket, start),
            ('&', _) | ('|', _) | ('!', _) => {
                let (word, kw) = match c {
                    '&' => ("AND", Kw::And),
                    '|' => ("OR", Kw::Or),
                    _ => ("NOT", Kw::Not),
                };
                if next == Some(c) {
                    self.pos += 1;
                }
                self.error(ErrorKind::Syntax, start, format!("unexpected `{}`", &self.src[start..self.pos]))
                    .set_help(format!("write `{word}`"));
                // Read as what it surely meant, so the parser does not report it a second time.
                self.push(Tok::Kw(kw), start);
            }
            (c, _) => {
                self.error(ErrorKind::Syntax, start, format!("unexpected character `{}`", c.escape_debug()));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn toks(src: &str) -> (Vec<Tok>, Vec<RuleError>) {
        let mut errors = Vec::new();
        let tokens = lex(src, &mut errors);
        (tokens.into_iter().map(|t| t.tok).collect(), errors)
    }

    #[test]
    fn lexes_a_rule_with_every_literal_kind() {
        let (tokens, errors) = toks(
            "rule r: x >= -1.5 and d IN RANGE [2020-01-01, 2020-01-01T10:00:00Z] or s = \"a\\\"b\" # c\n`in` <> 3",
        );
        assert!(errors.is_empty(), "{errors:?}");
        assert_eq!(
            tokens,
            vec![
                Tok::Kw(Kw::Rule),
                Tok::Ident,
                Tok::Colon,
                Tok::Ident,
                Tok::Ge,
                Tok::Minus,
                Tok::Number,
                Tok::Kw(Kw::And),
                Tok::Ident,
                Tok::Kw(Kw::In),
                Tok::Kw(Kw::Range),
                Tok::LBracket,
                Tok::Date(18262),
                Tok::Comma,
                Tok::Timestamp(1_577_872_800_000_000_000),
                Tok::RBracket,
                Tok::Kw(Kw::Or),
                Tok::Ident,
                Tok::Eq,
                Tok::Str("a\"b".into()),
                Tok::QuotedIdent("in".into()),
                Tok::Ne,
                Tok::Number,
                Tok::Eof,
            ]
        );
    }

    #[test]
    fn a_byte_order_mark_and_crlf_line_ends_are_whitespace() {
        let (tokens, errors) = toks("\u{feff}rule a:\r\n  x\r\n");
        assert!(errors.is_empty(), "{errors:?}");
        assert_eq!(tokens, [Tok::Kw(Kw::Rule), Tok::Ident, Tok::Colon, Tok::Ident, Tok::Eof]);
    }

    #[test]
    fn eof_sits_after_the_last_token() {
        let mut errors = Vec::new();
        let tokens = lex("rule a: x >\n\n# trailing\n", &mut errors);
        assert_eq!(tokens.last().unwrap().span, Span::new(11, 11));
    }

    #[test]
    fn bad_input_is_reported_and_skipped() {
        let (tokens, errors) = toks("x && y ~ \"open\n2020-02-30 12ab");
        let kinds: Vec<ErrorKind> = errors.iter().map(RuleError::kind).collect();
        assert_eq!(
            kinds,
            [
                ErrorKind::Syntax,
                ErrorKind::Syntax,
                ErrorKind::InvalidLiteral,
                ErrorKind::InvalidLiteral,
                ErrorKind::InvalidLiteral
            ]
        );
        assert_eq!(tokens.last(), Some(&Tok::Eof));
    }
}
