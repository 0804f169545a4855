//! What a request wants to do ([`Access`]) and who asks ([`Principal`]).
//!
//! The gateway builds one `Access` per request from its route and validated
//! path/query parameters; this module decides whether a principal's scopes
//! grant it. Scope grammar: see the crate doc; matching: [`crate::scope`].
//!
//! Invariant: a `Principal`'s scopes are parsed once, when it is built;
//! strings that are not scopes of this crate (an identity provider's
//! `openid`, `profile`, a typo) are kept in [`Principal::scopes`] for logs but
//! grant nothing, and are logged at debug level. A token is not rejected for
//! them: tokens from a shared identity provider routinely carry scopes meant
//! for other services.

use std::sync::Arc;

use finmesh_core::{BucketName, StreamName, Subject, SubjectPattern};

use crate::scope::Scope;

/// One thing a request wants to do, on one resource.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Access<'a> {
    /// Operator actions that belong to no single resource (listings of all
    /// buckets/streams, `/v1/subscribers`, token issuance for others).
    Admin,
    KvRead {
        bucket: &'a BucketName,
    },
    KvWrite {
        bucket: &'a BucketName,
    },
    KvAdmin {
        bucket: &'a BucketName,
    },
    StreamPublish {
        stream: &'a StreamName,
        subject: &'a Subject,
    },
    /// `filter: None` means every subject of the stream.
    StreamSubscribe {
        stream: &'a StreamName,
        filter: Option<&'a SubjectPattern>,
    },
    StreamConsume {
        stream: &'a StreamName,
    },
    StreamAdmin {
        stream: &'a StreamName,
    },
    /// Read the subscriber registry and its live status
    /// (`GET /v1/subscribers`, `GET /v1/subscribers/{id}`); writing it
    /// needs [`Access::Admin`].
    SubscribersRead,
}

/// An authenticated caller: the token's subject and its scopes.
///
/// Cloning is one reference-count increment: a principal is built once per
/// verified token and then shared by the token cache and every request that
/// presents the token.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Principal(Arc<Parts>);

#[derive(Debug, PartialEq, Eq)]
struct Parts {
    subject: Arc<str>,
    /// As written in the token, including strings that are not scopes.
    scopes: Vec<String>,
    /// The parsed, valid ones: what `allows` consults.
    grants: Vec<Scope>,
}

impl Principal {
    /// A principal holding `scopes` (as written in a token).
    /// Malformed or unknown scope strings are kept but grant nothing.
    pub fn new(subject: impl Into<String>, scopes: Vec<String>) -> Self {
        let subject: Arc<str> = subject.into().into();
        let grants = scopes
            .iter()
            .filter_map(|s| match s.parse::<Scope>() {
                Ok(scope) => Some(scope),
                Err(e) => {
                    tracing::debug!(subject = %subject, error = %e, "ignoring a scope this node does not know");
                    None
                }
            })
            .collect();
        Self(Arc::new(Parts { subject, scopes, grants }))
    }

    /// A principal holding `scopes` (as written in a token) capped by
    /// `ceiling`: a scope that no ceiling entry includes grants nothing
    /// (it is kept in [`Self::scopes`] for logs and logged at debug level).
    pub fn within(subject: impl Into<String>, scopes: Vec<String>, ceiling: &[Scope]) -> Self {
        let p = Self::new(subject, scopes);
        let grants: Vec<Scope> =
            p.0.grants
                .iter()
                .filter(|g| {
                    let kept = ceiling.iter().any(|c| c.includes(g));
                    if !kept {
                        tracing::debug!(subject = %p.0.subject, scope = %g, "dropping a scope above its key's ceiling");
                    }
                    kept
                })
                .cloned()
                .collect();
        if grants.len() == p.0.grants.len() {
            return p;
        }
        Self(Arc::new(Parts { subject: p.0.subject.clone(), scopes: p.0.scopes.clone(), grants }))
    }

    /// A principal that may do everything (auth disabled, or an admin token).
    pub fn admin(subject: impl Into<String>) -> Self {
        Self::new(subject, vec!["admin".to_owned()])
    }

    /// The token's `sub` claim: used for per-client rate limits and logs.
    pub fn subject(&self) -> &str {
        &self.0.subject
    }

    /// The subject as a shared string (a cheap key for per-client state).
    pub fn subject_shared(&self) -> &Arc<str> {
        &self.0.subject
    }

    /// The scopes as written in the token.
    pub fn scopes(&self) -> &[String] {
        &self.0.scopes
    }

    /// The scopes this node understood: the ones that can grant anything.
    pub fn grants(&self) -> &[Scope] {
        &self.0.grants
    }

    /// Whether any of the scopes grants `access` (see [`Scope::grants`]).
    pub fn allows(&self, access: &Access<'_>) -> bool {
        self.0.grants.iter().any(|g| g.grants(access))
    }
}
