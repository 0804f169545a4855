//! The scope language: one [`Scope`] is one capability, parsed once from its
//! string form (grammar in the crate doc) and then matched against an
//! [`Access`] without allocation.
//!
//! Invariants:
//! - a `Scope` always holds validated names and patterns, so matching never
//!   re-validates and never fails;
//! - `Display` writes the canonical string, and parsing it gives back the
//!   same `Scope` (`to_string` / `parse` round-trip);
//! - actions do not imply each other: `kv:write:b` does not grant reads, and
//!   `stream:admin:s` does not grant publishing. Only `admin` grants
//!   everything;
//! - [`Scope::includes`] is sound: if `a.includes(&b)`, every access `b`
//!   grants, `a` grants too. The OAuth grant uses it to allow a client to ask
//!   for a narrower scope than the clients file lists.
//!
//! Subject patterns: a publish scope with pattern `p` grants subject `s` when
//! `p` matches `s`; a subscribe scope with pattern `p` grants filter `f` when
//! `p` covers `f` (every subject `f` matches, `p` matches). A subscription
//! without a filter asks for every subject of the stream, which only a scope
//! without a pattern (or with `>`) grants: this crate does not know which
//! subjects a stream holds, so `stream:subscribe:md:md.>` does not grant an
//! unfiltered subscription even when every subject of `md` starts with `md.`.
//! Clients with such scopes pass `subject=md.>` explicitly. Several scopes are
//! not combined: `md.eu.>` and `md.us.>` together do not grant filter `md.*.>`.

use std::fmt;
use std::str::FromStr;

use finmesh_core::{BucketName, Error, Result, StreamName, SubjectPattern};

use crate::Access;

/// Longest scope string accepted, in bytes (a stream name, a subject pattern
/// and the prefixes).
pub const MAX_SCOPE_LEN: usize = 1200;

/// A bucket or stream name in a scope, or `*` for every name.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum NameMatch<N> {
    /// `*`: every name.
    Any,
    /// Exactly this name.
    Exact(N),
}

impl<N: PartialEq> NameMatch<N> {
    fn grants(&self, name: &N) -> bool {
        match self {
            NameMatch::Any => true,
            NameMatch::Exact(n) => n == name,
        }
    }

    fn includes(&self, other: &NameMatch<N>) -> bool {
        match (self, other) {
            (NameMatch::Any, _) => true,
            (NameMatch::Exact(a), NameMatch::Exact(b)) => a == b,
            (NameMatch::Exact(_), NameMatch::Any) => false,
        }
    }
}

impl<N: fmt::Display> fmt::Display for NameMatch<N> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            NameMatch::Any => f.write_str("*"),
            NameMatch::Exact(n) => n.fmt(f),
        }
    }
}

/// What a `kv:` scope allows on its buckets.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum KvAction {
    /// `kv:read`: get, history, keys, watch.
    Read,
    /// `kv:write`: put, create, update, delete, purge.
    Write,
    /// `kv:admin`: create, update, delete the bucket.
    Admin,
}

/// What a `stream:` scope allows on its streams.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum StreamAction {
    /// `stream:publish`, optionally limited to a subject pattern.
    Publish,
    /// `stream:subscribe`: read, SSE, WebSocket; optionally limited to a
    /// subject pattern.
    Subscribe,
    /// `stream:consume`: fetch and ack on durable consumers.
    Consume,
    /// `stream:admin`: create, update, delete the stream and its consumers.
    Admin,
}

/// One parsed capability. See the crate doc for the grammar.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Scope {
    /// `admin`: everything.
    Admin,
    /// `subscribers:read`: the subscriber registry and its live status.
    SubscribersRead,
    /// `kv:<action>:<bucket>`.
    Kv {
        /// What may be done.
        action: KvAction,
        /// On which bucket(s).
        bucket: NameMatch<BucketName>,
    },
    /// `stream:<action>:<stream>[:<subject pattern>]`.
    Stream {
        /// What may be done.
        action: StreamAction,
        /// On which stream(s).
        stream: NameMatch<StreamName>,
        /// For publish and subscribe: only these subjects (`None` = all).
        subjects: Option<SubjectPattern>,
    },
}

fn bad(scope: &str, why: impl fmt::Display) -> Error {
    let shown: String = scope.chars().take(80).collect();
    Error::invalid(format!("scope `{shown}`: {why}"))
}

fn name<N: FromStr<Err = Error>>(scope: &str, s: &str) -> Result<NameMatch<N>> {
    if s == "*" {
        return Ok(NameMatch::Any);
    }
    s.parse::<N>().map(NameMatch::Exact).map_err(|e| bad(scope, e.message()))
}

impl FromStr for Scope {
    type Err = Error;

    fn from_str(s: &str) -> Result<Self> {
        if s.len() > MAX_SCOPE_LEN {
            return Err(bad(s, format_args!("longer than {MAX_SCOPE_LEN} bytes")));
        }
        if s == "admin" {
            return Ok(Scope::Admin);
        }
        if s == "subscribers:read" {
            return Ok(Scope::SubscribersRead);
        }
        // A subject pattern may itself contain `:`, so split at most 4 ways.
        let mut parts = s.splitn(4, ':');
        let (Some(kind), Some(action), Some(target)) = (parts.next(), parts.next(), parts.next()) else {
            return Err(bad(
                s,
                "expected `admin`, `subscribers:read`, `kv:<action>:<bucket>` or `stream:<action>:<stream>[:<subjects>]`",
            ));
        };
        let pattern = parts.next();
        match kind {
            "kv" => {
                let action = match action {
                    "read" => KvAction::Read,
                    "write" => KvAction::Write,
                    "admin" => KvAction::Admin,
                    _ => return Err(bad(s, "kv actions are read, write, admin")),
                };
                if pattern.is_some() {
                    return Err(bad(s, "kv scopes take no subject pattern"));
                }
                Ok(Scope::Kv { action, bucket: name(s, target)? })
            }
            "stream" => {
                let action = match action {
                    "publish" => StreamAction::Publish,
                    "subscribe" => StreamAction::Subscribe,
                    "consume" => StreamAction::Consume,
                    "admin" => StreamAction::Admin,
                    _ => return Err(bad(s, "stream actions are publish, subscribe, consume, admin")),
                };
                let subjects = match pattern {
                    None => None,
                    Some(_) if matches!(action, StreamAction::Consume | StreamAction::Admin) => {
                        return Err(bad(s, "only publish and subscribe scopes take a subject pattern"));
                    }
                    Some(p) => Some(SubjectPattern::new(p).map_err(|e| bad(s, e.message()))?),
                };
                Ok(Scope::Stream { action, stream: name(s, target)?, subjects })
            }
            _ => Err(bad(s, "expected `admin`, `kv:…` or `stream:…`")),
        }
    }
}

impl fmt::Display for Scope {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Scope::Admin => f.write_str("admin"),
            Scope::SubscribersRead => f.write_str("subscribers:read"),
            Scope::Kv { action, bucket } => {
                let a = match action {
                    KvAction::Read => "read",
                    KvAction::Write => "write",
                    KvAction::Admin => "admin",
                };
                write!(f, "kv:{a}:{bucket}")
            }
            Scope::Stream { action, stream, subjects } => {
                let a = match action {
                    StreamAction::Publish => "publish",
                    StreamAction::Subscribe => "subscribe",
                    StreamAction::Consume => "consume",
                    StreamAction::Admin => "admin",
                };
                write!(f, "stream:{a}:{stream}")?;
                if let Some(p) = subjects {
                    write!(f, ":{p}")?;
                }
                Ok(())
            }
        }
    }
}

impl Scope {
    /// Does this scope grant `access`?
    pub fn grants(&self, access: &Access<'_>) -> bool {
        use StreamAction as S;
        match (self, access) {
            (Scope::Admin, _) => true,
            (Scope::SubscribersRead, Access::SubscribersRead) => true,
            (Scope::Kv { action: KvAction::Read, bucket }, Access::KvRead { bucket: b })
            | (Scope::Kv { action: KvAction::Write, bucket }, Access::KvWrite { bucket: b })
            | (Scope::Kv { action: KvAction::Admin, bucket }, Access::KvAdmin { bucket: b }) => bucket.grants(b),
            (Scope::Stream { action: S::Publish, stream, subjects }, Access::StreamPublish { stream: s, subject }) => {
                stream.grants(s) && subjects.as_ref().is_none_or(|p| p.matches(subject))
            }
            (
                Scope::Stream { action: S::Subscribe, stream, subjects },
                Access::StreamSubscribe { stream: s, filter },
            ) => {
                stream.grants(s)
                    && match (subjects, filter) {
                        (None, _) => true,
                        (Some(p), Some(f)) => p.covers(f),
                        // No filter = every subject: only `>` covers that.
                        (Some(p), None) => p.as_str() == ">",
                    }
            }
            (Scope::Stream { action: S::Consume, stream, .. }, Access::StreamConsume { stream: s })
            | (Scope::Stream { action: S::Admin, stream, .. }, Access::StreamAdmin { stream: s }) => stream.grants(s),
            _ => false,
        }
    }

    /// Does this scope grant everything `other` grants? (`admin` includes
    /// every scope; otherwise same kind and action, a name that includes the
    /// other's, and a subject pattern that covers the other's.)
    pub fn includes(&self, other: &Scope) -> bool {
        match (self, other) {
            (Scope::Admin, _) => true,
            (Scope::SubscribersRead, Scope::SubscribersRead) => true,
            (Scope::Kv { action: a, bucket: x }, Scope::Kv { action: b, bucket: y }) => a == b && x.includes(y),
            (
                Scope::Stream { action: a, stream: x, subjects: p },
                Scope::Stream { action: b, stream: y, subjects: q },
            ) => {
                a == b
                    && x.includes(y)
                    && match (p, q) {
                        (None, _) => true,
                        (Some(p), Some(q)) => p.covers(q),
                        (Some(p), None) => p.as_str() == ">",
                    }
            }
            _ => false,
        }
    }
}

/// Parse a space-separated scope list (the OAuth `scope` form: RFC 6749
/// §3.3), failing on the first malformed entry. Empty input gives no scopes.
pub fn parse_scope_list(s: &str) -> Result<Vec<Scope>> {
    s.split_ascii_whitespace().map(str::parse).collect()
}

/// Write scopes in the OAuth form: canonical strings joined by one space.
pub fn format_scope_list(scopes: &[Scope]) -> String {
    scopes.iter().map(ToString::to_string).collect::<Vec<_>>().join(" ")
}

#[cfg(test)]
mod tests;
