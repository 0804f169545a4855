//! Errors of a rules file, with their place in the source and their rendering.
//!
//! Owns [`Span`], [`RuleError`] and [`ErrorKind`]. A span is a half-open range of
//! byte offsets into the rules source; every span the lexer, parser and checker
//! create starts and ends on a UTF-8 character boundary, and rendering re-checks
//! this so that a bad span can never panic. Lines and columns are 1-based and
//! counted in characters (not bytes); they are computed only when an error is
//! rendered, so the hot path never pays for them.
//!
//! Rendered form (one error):
//!
//! ```text
//! rules.txt:3:25: unknown field `notionl`
//!   3 | rule notional_positive: notionl > 0
//!     |                         ^^^^^^^ did you mean `notional`?
//! ```

use std::fmt::{self, Write as _};

/// A half-open range of byte offsets `[start, end)` into the rules source.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
pub struct Span {
    /// Offset of the first byte.
    pub start: usize,
    /// Offset one past the last byte (equal to `start` for a point).
    pub end: usize,
}

impl Span {
    /// The span `[start, end)`.
    pub fn new(start: usize, end: usize) -> Span {
        debug_assert!(start <= end, "span {start}..{end} is reversed");
        Span { start, end }
    }

    /// The smallest span that covers `self` and `other`.
    pub fn to(self, other: Span) -> Span {
        Span { start: self.start.min(other.start), end: self.end.max(other.end) }
    }
}

/// What kind of problem a [`RuleError`] reports; tests compare kinds, not strings.
#[non_exhaustive]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum ErrorKind {
    /// The text does not follow the grammar (unexpected token, missing `)`, …).
    Syntax,
    /// A literal is malformed: a date that does not exist, an unterminated string, …
    InvalidLiteral,
    /// An expression nests deeper than [`MAX_DEPTH`](crate::MAX_DEPTH).
    TooDeep,
    /// Two rules have the same name.
    DuplicateRule,
    /// A field name that the Avro schema does not have.
    UnknownField,
    /// A `LOOKUP` dataset that is not among the known reference datasets.
    UnknownDataset,
    /// Operands whose types do not fit the operator (string field against a number, …).
    TypeMismatch,
    /// A string compared with an enum field is not one of the enum's symbols.
    UnknownSymbol,
    /// The field's Avro type cannot be compared (array, map, record, bytes, …).
    UnsupportedField,
    /// `IN RANGE [a, b]` with `a > b`: no value can pass.
    EmptyRange,
    /// The Avro schema is not a record schema, or could not be parsed.
    Schema,
    /// A file could not be read.
    File,
}

/// One problem in a rules file: a kind, a place, a message and an optional hint.
#[derive(Clone, Debug, PartialEq)]
pub struct RuleError {
    kind: ErrorKind,
    span: Span,
    message: String,
    help: Option<String>,
}

impl RuleError {
    pub(crate) fn new(kind: ErrorKind, span: Span, message: impl Into<String>) -> RuleError {
        RuleError { kind, span, message: message.into(), help: None }
    }

    pub(crate) fn with_help(mut self, help: impl Into<String>) -> RuleError {
        self.help = Some(help.into());
        self
    }

    pub(crate) fn set_help(&mut self, help: impl Into<String>) {
        self.help = Some(help.into());
    }

    /// What kind of problem this is.
    pub fn kind(&self) -> ErrorKind {
        self.kind
    }

    /// Where in the source the problem is.
    pub fn span(&self) -> Span {
        self.span
    }

    /// The message, without location.
    pub fn message(&self) -> &str {
        &self.message
    }

    /// A hint shown after the caret, if any (`did you mean …?`).
    pub fn help(&self) -> Option<&str> {
        self.help.as_deref()
    }

    /// 1-based line and column (in characters) of the start of the span in `source`.
    pub fn line_col(&self, source: &str) -> (usize, usize) {
        line_col(source, self.span)
    }

    /// The error as text: `origin:line:col: message`, the source line, and a caret
    /// line under the span. `origin` (usually the file name) may be empty.
    pub fn render(&self, source: &str, origin: &str) -> String {
        let at = Located::new(source, self.span);
        let mut out = String::new();
        if !origin.is_empty() {
            let _ = write!(out, "{origin}:");
        }
        let _ = writeln!(out, "{}:{}: {}", at.line, at.col, self.message);
        let number = at.line.to_string();
        let pad = " ".repeat(number.len());
        let text = &source[at.line_start..at.line_end];
        let _ = writeln!(out, " {number} | {text}");
        // Copy tabs from the source so the caret lines up under tab-indented text.
        let lead: String =
            source[at.line_start..at.start].chars().map(|c| if c == '\t' { '\t' } else { ' ' }).collect();
        let _ = write!(out, " {pad} | {lead}{}", "^".repeat(at.width));
        if let Some(help) = &self.help {
            let _ = write!(out, " {help}");
        }
        out.push('\n');
        out
    }
}

impl fmt::Display for RuleError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.message)?;
        if let Some(help) = &self.help {
            write!(f, " ({help})")?;
        }
        Ok(())
    }
}

impl std::error::Error for RuleError {}

/// 1-based line and column (in characters) of the start of `span` in `source`.
pub(crate) fn line_col(source: &str, span: Span) -> (usize, usize) {
    let at = Located::new(source, span);
    (at.line, at.col)
}

/// Renders every error of one source, in source order, separated by blank lines.
pub fn render_all(errors: &[RuleError], source: &str, origin: &str) -> String {
    let mut sorted: Vec<&RuleError> = errors.iter().collect();
    sorted.sort_by_key(|e| (e.span.start, e.span.end));
    sorted.iter().map(|e| e.render(source, origin)).collect::<Vec<_>>().join("\n")
}

/// A span resolved against its source: line, column and the extent of its line.
struct Located {
    line: usize,
    col: usize,
    /// Byte offset of the span's start (clamped to a character boundary).
    start: usize,
    line_start: usize,
    line_end: usize,
    /// Carets to draw: characters of the span on its first line, at least one.
    width: usize,
}

impl Located {
    fn new(source: &str, span: Span) -> Located {
        let start = floor_boundary(source, span.start);
        let end = floor_boundary(source, span.end.max(start));
        let line_start = source[..start].rfind('\n').map_or(0, |i| i + 1);
        let mut line_end = source[start..].find('\n').map_or(source.len(), |i| start + i);
        if source[line_start..line_end].ends_with('\r') && start < line_end {
            line_end -= 1; // CRLF files: do not print the carriage return
        }
        let line = source[..start].matches('\n').count() + 1;
        let col = source[line_start..start].chars().count() + 1;
        let width = source[start..end.min(line_end)].chars().count().max(1);
        Located { line, col, start, line_start, line_end, width }
    }
}

/// The largest character boundary of `s` at or below `i` (and at most `s.len()`).
fn floor_boundary(s: &str, i: usize) -> usize {
    let mut i = i.min(s.len());
    while !s.is_char_boundary(i) {
        i -= 1;
    }
    i
}

/// Levenshtein distance, for "did you mean" hints on short names.
pub(crate) fn edit_distance(a: &str, b: &str) -> usize {
    let b: Vec<char> = b.chars().collect();
    let mut prev: Vec<usize> = (0..=b.len()).collect();
    let mut cur = vec![0; b.len() + 1];
    for (i, ca) in a.chars().enumerate() {
        cur[0] = i + 1;
        for (j, &cb) in b.iter().enumerate() {
            let sub = prev[j] + usize::from(ca != cb);
            cur[j + 1] = sub.min(prev[j + 1] + 1).min(cur[j] + 1);
        }
        std::mem::swap(&mut prev, &mut cur);
    }
    prev[b.len()]
}

/// The candidate closest to `name`, if it is close enough to be a likely typo.
pub(crate) fn closest<'a>(name: &str, candidates: impl IntoIterator<Item = &'a str>) -> Option<&'a str> {
    let limit = (name.chars().count() / 3).max(1);
    candidates
        .into_iter()
        .map(|c| (edit_distance(&name.to_ascii_lowercase(), &c.to_ascii_lowercase()), c))
        .filter(|(d, _)| *d <= limit)
        .min_by_key(|(d, _)| *d)
        .map(|(_, c)| c)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn columns_count_characters_and_carets_follow_tabs() {
        let src = "rule a:\n\té = 1 AND zz > 2";
        let start = src.find("zz").unwrap();
        let err = RuleError::new(ErrorKind::UnknownField, Span::new(start, start + 2), "unknown field `zz`");
        assert_eq!(err.line_col(src), (2, 12));
        let text = err.render(src, "f");
        assert_eq!(text, "f:2:12: unknown field `zz`\n 2 | \té = 1 AND zz > 2\n   | \t          ^^\n");
    }

    #[test]
    fn crlf_sources_render_without_the_carriage_return() {
        let src = "rule a: x\r\nrule b: zz > 1\r\n";
        let start = src.find("zz").unwrap();
        let err = RuleError::new(ErrorKind::UnknownField, Span::new(start, start + 2), "unknown field `zz`");
        assert_eq!(err.render(src, ""), "2:9: unknown field `zz`\n 2 | rule b: zz > 1\n   |         ^^\n");
    }

    #[test]
    fn spans_off_char_boundaries_or_past_the_end_do_not_panic() {
        let src = "é\n";
        for (s, e) in [(1, 1), (1, 7), (0, 100), (100, 200), (3, 3)] {
            let err = RuleError::new(ErrorKind::Syntax, Span { start: s, end: e }, "x");
            let _ = err.render(src, "");
        }
    }

    #[test]
    fn typo_hints_pick_the_nearest_name() {
        assert_eq!(closest("notionl", ["notional", "pv", "book"]), Some("notional"));
        assert_eq!(closest("xyz", ["notional", "pv"]), None);
    }
}
