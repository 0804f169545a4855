//! Subjects and subject patterns, with NATS matching rules.
//!
//! A [`Subject`] is a literal: dot-separated non-empty tokens of printable
//! ASCII without whitespace, and no token may be `*` or `>`. A
//! [`SubjectPattern`] may also use `*` (exactly one token) and `>` (one or
//! more tokens, only as the last token). Both are at most
//! [`MAX_SUBJECT_LEN`] bytes.
//!
//! Invariant: values of these types are valid; [`SubjectPattern::matches`]
//! never re-validates.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Deserializer, Serialize};

use crate::names::truncate;
use crate::{Error, Result};

/// Longest subject accepted, in bytes.
pub const MAX_SUBJECT_LEN: usize = 1024;

fn check_tokens(what: &str, s: &str, wildcards: bool) -> Result<()> {
    if s.is_empty() {
        return Err(Error::invalid(format!("{what} must not be empty")));
    }
    if s.len() > MAX_SUBJECT_LEN {
        return Err(Error::invalid(format!(
            "{what} `{}…` is {} bytes long; the limit is {MAX_SUBJECT_LEN}",
            truncate(s),
            s.len()
        )));
    }
    if let Some((i, c)) = s.char_indices().find(|(_, c)| !c.is_ascii_graphic()) {
        return Err(Error::invalid(format!(
            "{what} `{}` has {c:?} at byte {i}; subjects are printable ASCII without spaces",
            truncate(s)
        )));
    }
    let mut offset = 0;
    let count = s.split('.').count();
    for (n, token) in s.split('.').enumerate() {
        if token.is_empty() {
            return Err(Error::invalid(format!("{what} `{}` has an empty token at byte {offset}", truncate(s))));
        }
        let is_wild = token == "*" || token == ">";
        if !wildcards && is_wild {
            return Err(Error::invalid(format!(
                "{what} `{}` has wildcard `{token}` at byte {offset}; a subject must be literal",
                truncate(s)
            )));
        }
        if token == ">" && n + 1 != count {
            return Err(Error::invalid(format!(
                "{what} `{}` has `>` at byte {offset}; `>` may only be the last token",
                truncate(s)
            )));
        }
        if !is_wild && (token.contains('*') || token.contains('>')) {
            return Err(Error::invalid(format!(
                "{what} `{}` has `*` or `>` inside token `{token}` at byte {offset}; wildcards must be whole tokens",
                truncate(s)
            )));
        }
        offset += token.len() + 1;
    }
    Ok(())
}

/// A literal subject, e.g. `md.eu.EURUSD`.
#[derive(Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
#[serde(transparent)]
pub struct Subject(String);

impl Subject {
    /// Validate `s` and wrap it.
    pub fn new(s: impl Into<String>) -> Result<Self> {
        let s = s.into();
        check_tokens("subject", &s, false)?;
        Ok(Subject(s))
    }

    /// The subject as a string slice.
    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// The dot-separated tokens.
    pub fn tokens(&self) -> impl Iterator<Item = &str> {
        self.0.split('.')
    }
}

/// A subject pattern with optional `*` and trailing `>` wildcards.
#[derive(Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
#[serde(transparent)]
pub struct SubjectPattern(String);

impl SubjectPattern {
    /// Validate `s` and wrap it.
    pub fn new(s: impl Into<String>) -> Result<Self> {
        let s = s.into();
        check_tokens("subject pattern", &s, true)?;
        Ok(SubjectPattern(s))
    }

    /// The pattern matching every subject (`>`).
    pub fn all() -> Self {
        SubjectPattern(">".to_owned())
    }

    /// The pattern as a string slice.
    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// Whether the pattern has no wildcard.
    pub fn is_literal(&self) -> bool {
        !self.0.split('.').any(|t| t == "*" || t == ">")
    }

    /// Does `subject` match this pattern?
    pub fn matches(&self, subject: &Subject) -> bool {
        matches_str(&self.0, &subject.0)
    }

    /// Does the raw subject string `subject` (assumed valid, e.g. read back
    /// from storage) match this pattern?
    pub fn matches_str(&self, subject: &str) -> bool {
        matches_str(&self.0, subject)
    }

    /// Does every subject matched by `other` also match `self`?
    pub fn covers(&self, other: &SubjectPattern) -> bool {
        let mut mine = self.0.split('.');
        let mut theirs = other.0.split('.');
        loop {
            match (mine.next(), theirs.next()) {
                (Some(">"), Some(_)) => return true,
                (Some("*"), Some(t)) if t != ">" => {}
                (Some(m), Some(t)) if m == t => {}
                (None, None) => return true,
                _ => return false,
            }
        }
    }

    /// Could some subject match both patterns?
    pub fn overlaps(&self, other: &SubjectPattern) -> bool {
        let mut a = self.0.split('.');
        let mut b = other.0.split('.');
        loop {
            match (a.next(), b.next()) {
                (Some(">"), Some(_)) | (Some(_), Some(">")) => return true,
                (Some(x), Some(y)) if x == "*" || y == "*" || x == y => {}
                (None, None) => return true,
                _ => return false,
            }
        }
    }
}

/// NATS subject matching on raw strings; both sides must be valid.
/// Token-by-token match on bytes (the hot path of every publish: a stream
/// checks each subject against its patterns). Both sides are valid, so
/// neither is empty and no token is.
fn matches_str(pattern: &str, subject: &str) -> bool {
    if pattern == subject {
        return true;
    }
    let (p, s) = (pattern.as_bytes(), subject.as_bytes());
    let (mut i, mut j) = (0, 0);
    // Invariant: both have a token starting at `i` and `j`.
    loop {
        let (pe, se) = (token_end(p, i), token_end(s, j));
        match &p[i..pe] {
            b">" => return true,
            b"*" => {}
            token if token == &s[j..se] => {}
            _ => return false,
        }
        match (pe == p.len(), se == s.len()) {
            (true, true) => return true,
            (false, false) => (i, j) = (pe + 1, se + 1),
            _ => return false,
        }
    }
}

fn token_end(b: &[u8], from: usize) -> usize {
    b[from..].iter().position(|&c| c == b'.').map_or(b.len(), |k| from + k)
}

impl From<Subject> for SubjectPattern {
    fn from(s: Subject) -> Self {
        SubjectPattern(s.0)
    }
}

macro_rules! string_impls {
    ($t:ident) => {
        impl FromStr for $t {
            type Err = Error;
            fn from_str(s: &str) -> Result<Self> {
                Self::new(s)
            }
        }
        impl TryFrom<&str> for $t {
            type Error = Error;
            fn try_from(s: &str) -> Result<Self> {
                Self::new(s)
            }
        }
        impl AsRef<str> for $t {
            fn as_ref(&self) -> &str {
                &self.0
            }
        }
        impl fmt::Display for $t {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(&self.0)
            }
        }
        impl fmt::Debug for $t {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                write!(f, "{}({:?})", stringify!($t), self.0)
            }
        }
        impl<'de> Deserialize<'de> for $t {
            fn deserialize<D: Deserializer<'de>>(d: D) -> std::result::Result<Self, D::Error> {
                let s = String::deserialize(d)?;
                $t::new(s).map_err(serde::de::Error::custom)
            }
        }
    };
}
string_impls!(Subject);
string_impls!(SubjectPattern);

#[cfg(test)]
mod tests {
    use super::*;

    fn p(s: &str) -> SubjectPattern {
        SubjectPattern::new(s).unwrap()
    }
    fn s(x: &str) -> Subject {
        Subject::new(x).unwrap()
    }

    #[test]
    fn matching() {
        assert!(p("a.b").matches(&s("a.b")));
        assert!(!p("a.b").matches(&s("a.b.c")));
        assert!(p("a.*").matches(&s("a.b")));
        assert!(!p("a.*").matches(&s("a.b.c")));
        assert!(!p("a.*").matches(&s("a")));
        assert!(p("a.>").matches(&s("a.b.c")));
        assert!(!p("a.>").matches(&s("a")));
        assert!(p(">").matches(&s("x")));
        assert!(p("*.b.>").matches(&s("x.b.y.z")));
        assert!(!p("*.b.>").matches(&s("x.c.y")));
    }

    /// The byte matcher agrees with matching split tokens, for every pattern
    /// and subject of up to four tokens over a small alphabet.
    #[test]
    fn matching_agrees_with_token_by_token() {
        fn by_tokens(pattern: &str, subject: &str) -> bool {
            let (mut p, mut s) = (pattern.split('.'), subject.split('.'));
            loop {
                match (p.next(), s.next()) {
                    (Some(">"), Some(_)) => return true,
                    (Some("*"), Some(_)) => {}
                    (Some(a), Some(b)) if a == b => {}
                    (None, None) => return true,
                    _ => return false,
                }
            }
        }
        fn all(tokens: &[&str], max: usize) -> Vec<String> {
            let mut out: Vec<String> = tokens.iter().map(|t| t.to_string()).collect();
            let mut last = out.clone();
            for _ in 1..max {
                last = last.iter().flat_map(|l| tokens.iter().map(move |t| format!("{l}.{t}"))).collect();
                out.extend(last.iter().cloned());
            }
            out
        }
        let subjects = all(&["a", "b", "ab"], 4);
        let patterns: Vec<SubjectPattern> =
            all(&["a", "b", "ab", "*", ">"], 4).into_iter().filter_map(|x| SubjectPattern::new(x).ok()).collect();
        assert!(patterns.len() > 300, "{}", patterns.len());
        for pat in &patterns {
            for sub in &subjects {
                assert_eq!(pat.matches(&s(sub)), by_tokens(pat.as_str(), sub), "{pat} vs {sub}");
            }
        }
    }

    #[test]
    fn covers_and_overlaps() {
        assert!(p("a.>").covers(&p("a.*")));
        assert!(p("a.>").covers(&p("a.b.>")));
        assert!(!p("a.*").covers(&p("a.>")));
        assert!(p("*.b").covers(&p("a.b")));
        assert!(p("a.*").overlaps(&p("*.b")));
        assert!(!p("a.b").overlaps(&p("a.c")));
        assert!(p("a.>").overlaps(&p("a.b.c")));
        assert!(!p("a.b").overlaps(&p("a.b.c")));
    }

    #[test]
    fn invalid_subjects_name_the_rule() {
        let cases = [
            ("", "empty"),
            ("a..b", "empty token at byte 2"),
            (".a", "empty token at byte 0"),
            ("a b", "' ' at byte 1"),
            ("a.*", "must be literal"),
            ("a.>", "must be literal"),
            ("a\tb", "'\\t' at byte 1"),
        ];
        for (bad, why) in cases {
            let e = Subject::new(bad).unwrap_err();
            assert!(e.message().contains(why), "{bad:?}: {e}");
        }
        assert!(SubjectPattern::new("a.>.b").unwrap_err().message().contains("last token"));
        assert!(SubjectPattern::new("a.b*").unwrap_err().message().contains("whole tokens"));
        assert!(Subject::new("é").is_err());
        assert!(Subject::new("x".repeat(1025)).unwrap_err().message().contains("limit"));
    }
}
