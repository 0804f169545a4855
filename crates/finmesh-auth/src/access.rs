//! What a request wants to do ([`Access`]) and who asks ([`Principal`]).
//!
//! The gateway builds one `Access` per request from its route and validated
//! path/query parameters; this module decides whether a principal's scopes
//! grant it. Scope grammar: see the crate doc.

use finmesh_core::{BucketName, StreamName, Subject, SubjectPattern};

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
}

/// An authenticated caller: the token's subject and its scopes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Principal {
    subject: String,
    scopes: Vec<String>,
}

impl Principal {
    /// A principal holding `scopes` (as written in a token).
    pub fn new(subject: impl Into<String>, scopes: Vec<String>) -> Self {
        Self { subject: subject.into(), scopes }
    }

    /// A principal that may do everything (auth disabled, or an admin token).
    pub fn admin(subject: impl Into<String>) -> Self {
        Self::new(subject, vec!["admin".to_owned()])
    }

    /// The token's `sub` claim: used for per-client rate limits and logs.
    pub fn subject(&self) -> &str {
        &self.subject
    }

    /// The scopes as written in the token.
    pub fn scopes(&self) -> &[String] {
        &self.scopes
    }

    /// Whether the scopes grant `access`.
    pub fn allows(&self, access: &Access<'_>) -> bool {
        // Placeholder until the scope language lands: only `admin` grants.
        let _ = access;
        self.scopes.iter().any(|s| s == "admin")
    }
}
