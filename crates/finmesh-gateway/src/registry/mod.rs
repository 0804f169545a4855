//! The subscriber registry: the known downstream servers of the fan-out
//! (the original design's "metadata service"), and what each of them is
//! allowed to receive (see `docs/fanout.md`, "Subscriber registry").
//!
//! Shape: a [`Registration`] per server id is stored as JSON in the internal
//! KV bucket [`BUCKET`] (created by the first write), so every gateway on
//! the same engine sees the same registry; [`Registry`] reads it through a
//! snapshot refreshed at most every [`REFRESH`], and keeps the live status
//! of this node's connections ([`status`]). The routes are in [`routes`].
//!
//! Invariants:
//! - a stored registration is valid ([`Registration::validate`] ran before
//!   every write) and its `identity` (a token subject) is unique among the
//!   registrations this node could read when it was written;
//! - a subscription of a registered identity is checked against the
//!   registration current at subscribe time: a filter that no allowed
//!   filter covers is refused with 403, and its rate limit paces its
//!   writer ([`Pace`]); a registration written on this node is seen at
//!   once, one written on another node within [`REFRESH`];
//! - the registry never holds a lock across an await: the snapshot is an
//!   `Arc` swapped under a short lock; refreshes are serialised by an
//!   async mutex so a burst of subscribers costs one read of the bucket.

pub mod pace;
pub mod routes;
pub mod status;

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use finmesh_core::{BucketConfig, BucketName, Engine, Error, ErrorKind, Key, Result, Revision, SubjectPattern};
use parking_lot::Mutex;
use serde::{Deserialize, Serialize};

pub use pace::Pace;
pub use status::{Session, StatusBook};

/// The internal bucket holding the registrations (key = server id).
pub const BUCKET: &str = "_finmesh_subscribers";

/// How old a registry snapshot may be when a subscription is checked
/// against it: a registration written on another gateway applies within this.
pub const REFRESH: Duration = Duration::from_secs(1);

/// Longest server id, in bytes.
pub const MAX_ID_LEN: usize = 64;
/// Longest identity (token subject), in bytes.
pub const MAX_IDENTITY_LEN: usize = 256;
/// Longest region, in bytes.
pub const MAX_REGION_LEN: usize = 64;
/// Longest notes, in bytes.
pub const MAX_NOTES_LEN: usize = 4096;
/// Most allowed filters per registration.
pub const MAX_FILTERS: usize = 64;
/// Most registrations the registry holds.
pub const MAX_REGISTRATIONS: usize = 10_000;

/// A registered downstream server, as stored and as `PUT` takes it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct Registration {
    /// The token subject (`sub`) the server authenticates as.
    #[schema(min_length = 1, max_length = 256)]
    pub identity: String,
    /// Where it runs (free text, for operators).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(max_length = 64)]
    pub region: Option<String>,
    /// Subject filters it may subscribe with: a subscription's filter must
    /// be covered by one of them (`>` allows everything, including no filter).
    #[schema(min_items = 1, max_items = 64)]
    pub filters: Vec<String>,
    /// Its delivery rate limit; absent = unlimited.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rate_limit: Option<RateLimit>,
    /// Free text.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(max_length = 4096)]
    pub notes: Option<String>,
}

/// A delivery rate limit; each bound is optional, both apply when given.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct RateLimit {
    /// Messages per second (sustained; a burst of one second's worth).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(minimum = 1)]
    pub messages_per_second: Option<u32>,
    /// Bytes of events per second (sustained; a burst of one second's worth).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(minimum = 1)]
    pub bytes_per_second: Option<u32>,
}

/// A server id: 1-64 bytes of `A-Z a-z 0-9 _ -`.
pub fn validate_id(id: &str) -> Result<Key> {
    let ok = !id.is_empty()
        && id.len() <= MAX_ID_LEN
        && id.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-');
    if !ok {
        return Err(Error::invalid(format!(
            "subscriber id `{}`: must be 1-{MAX_ID_LEN} characters of A-Z a-z 0-9 _ -",
            id.chars().take(80).collect::<String>()
        )));
    }
    Key::new(id)
}

impl Registration {
    /// Parse a `PUT` body: JSON, known fields only, then [`validate`](Self::validate).
    pub fn parse(body: &[u8]) -> Result<Self> {
        let reg: Registration =
            serde_json::from_slice(body).map_err(|e| Error::invalid(format!("bad registration body: {e}")))?;
        reg.validate()?;
        Ok(reg)
    }

    /// Every problem of this registration at once (one `Invalid` error
    /// whose message lists them, `; `-separated, each naming its field).
    pub fn validate(&self) -> Result<()> {
        let mut problems = Vec::new();
        if self.identity.is_empty() || self.identity.len() > MAX_IDENTITY_LEN {
            problems.push(format!("identity: must be 1-{MAX_IDENTITY_LEN} bytes"));
        }
        if self.identity.chars().any(char::is_control) {
            problems.push("identity: must not contain control characters".to_owned());
        }
        if self.region.as_ref().is_some_and(|r| r.len() > MAX_REGION_LEN) {
            problems.push(format!("region: must be at most {MAX_REGION_LEN} bytes"));
        }
        if self.notes.as_ref().is_some_and(|n| n.len() > MAX_NOTES_LEN) {
            problems.push(format!("notes: must be at most {MAX_NOTES_LEN} bytes"));
        }
        if self.filters.is_empty() || self.filters.len() > MAX_FILTERS {
            problems.push(format!("filters: must list 1-{MAX_FILTERS} subject filters (`>` for every subject)"));
        }
        for (i, f) in self.filters.iter().enumerate() {
            if let Err(e) = SubjectPattern::new(f.as_str()) {
                problems.push(format!("filters[{i}]: {}", e.message()));
            }
        }
        if let Some(rate) = &self.rate_limit {
            if rate.messages_per_second == Some(0) {
                problems.push("rate_limit.messages_per_second: must be at least 1 (leave it out for no limit)".into());
            }
            if rate.bytes_per_second == Some(0) {
                problems.push("rate_limit.bytes_per_second: must be at least 1 (leave it out for no limit)".into());
            }
        }
        if problems.is_empty() { Ok(()) } else { Err(Error::invalid(problems.join("; "))) }
    }

    /// The allowed filters, parsed (validated at write time; one that no
    /// longer parses allows nothing).
    fn patterns(&self) -> impl Iterator<Item = SubjectPattern> + '_ {
        self.filters.iter().filter_map(|f| SubjectPattern::new(f.as_str()).ok())
    }

    /// Whether a subscription with `filter` (`None` = every subject) is allowed.
    pub fn allows(&self, filter: Option<&SubjectPattern>) -> bool {
        self.patterns().any(|p| match filter {
            Some(f) => p.covers(f),
            None => p.as_str() == ">",
        })
    }
}

/// One registration as read, with its KV revision.
#[derive(Debug, Clone)]
pub struct Stored {
    /// The server id (the KV key).
    pub id: String,
    /// What was registered.
    pub registration: Registration,
    /// Its revision (the `ETag`).
    pub revision: Revision,
}

/// The registry as read at one moment.
#[derive(Debug, Default)]
pub struct Snapshot {
    /// By server id.
    pub by_id: BTreeMap<String, Stored>,
}

impl Snapshot {
    /// The registration of `identity`, if any.
    pub fn by_identity(&self, identity: &str) -> Option<&Stored> {
        self.by_id.values().find(|s| s.registration.identity == identity)
    }
}

/// What [`Registry::admit`] decided for a subscription.
#[derive(Debug, Clone)]
pub struct Admission {
    /// The registered id, `None` for an unregistered identity.
    pub id: Option<String>,
    /// The registration's rate limit.
    pub rate_limit: Option<RateLimit>,
}

/// The registry of one gateway: engine access, snapshot and live status.
/// Cheap to clone.
#[derive(Clone)]
pub struct Registry {
    inner: Arc<RegistryInner>,
}

struct RegistryInner {
    engine: Arc<dyn Engine>,
    bucket: BucketName,
    /// The last snapshot and when it was read.
    snapshot: Mutex<Option<(Instant, Arc<Snapshot>)>>,
    /// Serialises refreshes.
    refreshing: tokio::sync::Mutex<()>,
    /// Live status of this node's connections.
    book: Arc<StatusBook>,
}

impl Registry {
    /// The registry on `engine`.
    pub fn new(engine: Arc<dyn Engine>) -> Self {
        Registry {
            inner: Arc::new(RegistryInner {
                engine,
                bucket: BucketName::new(BUCKET).expect("the registry bucket name is valid"),
                snapshot: Mutex::new(None),
                refreshing: tokio::sync::Mutex::new(()),
                book: Arc::new(StatusBook::new()),
            }),
        }
    }

    /// The internal bucket.
    pub fn bucket(&self) -> &BucketName {
        &self.inner.bucket
    }

    /// Live status of this node.
    pub fn book(&self) -> &Arc<StatusBook> {
        &self.inner.book
    }

    /// A snapshot at most [`REFRESH`] old (a stale one if the engine fails
    /// and there is one; else the engine's error).
    pub async fn snapshot(&self) -> Result<Arc<Snapshot>> {
        if let Some(fresh) = self.fresh() {
            return Ok(fresh);
        }
        let _one = self.inner.refreshing.lock().await;
        if let Some(fresh) = self.fresh() {
            return Ok(fresh);
        }
        match self.read_all().await {
            Ok(snap) => {
                let snap = Arc::new(snap);
                *self.inner.snapshot.lock() = Some((Instant::now(), snap.clone()));
                Ok(snap)
            }
            Err(e) => match self.inner.snapshot.lock().as_ref() {
                Some((_, stale)) => {
                    tracing::warn!(error = %e, "subscriber registry unreadable; using the last snapshot");
                    Ok(stale.clone())
                }
                None => Err(e),
            },
        }
    }

    fn fresh(&self) -> Option<Arc<Snapshot>> {
        let snap = self.inner.snapshot.lock();
        snap.as_ref().filter(|(at, _)| at.elapsed() < REFRESH).map(|(_, s)| s.clone())
    }

    /// Forget the snapshot (after a write on this node).
    pub fn invalidate(&self) {
        *self.inner.snapshot.lock() = None;
    }

    /// Every registration, read from the engine now (an absent bucket is
    /// an empty registry).
    pub async fn read_all(&self) -> Result<Snapshot> {
        let engine = &self.inner.engine;
        let keys = match engine.kv_keys_page(&self.inner.bucket, "", None, MAX_REGISTRATIONS).await {
            Ok(page) => page.keys,
            Err(e) if e.kind() == ErrorKind::NotFound => return Ok(Snapshot::default()),
            Err(e) => return Err(e),
        };
        let mut by_id = BTreeMap::new();
        for key in keys {
            if let Some(stored) = self.get(&key).await? {
                by_id.insert(stored.id.clone(), stored);
            }
        }
        Ok(Snapshot { by_id })
    }

    /// The registration under `id`, if any.
    pub async fn get(&self, id: &Key) -> Result<Option<Stored>> {
        let entry = match self.inner.engine.kv_get(&self.inner.bucket, id).await {
            Ok(e) => e,
            Err(e) if e.kind() == ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(e),
        };
        let Some(entry) = entry else { return Ok(None) };
        match serde_json::from_slice::<Registration>(&entry.value) {
            Ok(registration) => Ok(Some(Stored { id: id.as_str().to_owned(), registration, revision: entry.revision })),
            Err(e) => {
                tracing::warn!(id = %id, error = %e, "unreadable subscriber registration; ignored");
                Ok(None)
            }
        }
    }

    /// Write `reg` under `id`: `expected` = only at that revision
    /// (`If-Match`), `create_only` = only if absent (`If-None-Match: *`).
    /// 409 `already-exists` if another id registers the same identity.
    pub async fn put(
        &self,
        id: &Key,
        reg: &Registration,
        expected: Option<Revision>,
        create_only: bool,
    ) -> Result<Revision> {
        let current = self.read_all().await?;
        if let Some(other) = current.by_identity(&reg.identity).filter(|s| s.id != id.as_str()) {
            return Err(Error::new(
                ErrorKind::AlreadyExists,
                format!("identity `{}` is already registered as subscriber `{}`", reg.identity, other.id),
            ));
        }
        if !current.by_id.contains_key(id.as_str()) && current.by_id.len() >= MAX_REGISTRATIONS {
            return Err(Error::invalid(format!("the registry holds {MAX_REGISTRATIONS} subscribers, its maximum")));
        }
        self.ensure_bucket().await?;
        let value = Bytes::from(serde_json::to_vec(reg).map_err(|e| Error::internal(e.to_string()))?);
        let engine = &self.inner.engine;
        let rev = match (expected, create_only) {
            (Some(_), true) => return Err(Error::invalid("use If-Match or If-None-Match, not both")),
            (Some(rev), false) => engine.kv_update(&self.inner.bucket, id, value, rev).await?,
            (None, true) => engine.kv_create(&self.inner.bucket, id, value).await?,
            (None, false) => engine.kv_put(&self.inner.bucket, id, value).await?,
        };
        self.invalidate();
        Ok(rev)
    }

    /// Delete `id` (only at `expected`, when given); `NotFound` if absent.
    pub async fn delete(&self, id: &Key, expected: Option<Revision>) -> Result<Revision> {
        let engine = &self.inner.engine;
        let expected = match expected {
            Some(rev) => rev,
            None => match self.get(id).await? {
                Some(s) => s.revision,
                None => return Err(Error::not_found(format!("subscriber `{id}` is not registered"))),
            },
        };
        let rev = match engine.kv_delete_if(&self.inner.bucket, id, expected).await {
            Err(e) if e.kind() == ErrorKind::NotFound => {
                return Err(Error::not_found(format!("subscriber `{id}` is not registered")));
            }
            other => other?,
        };
        self.invalidate();
        Ok(rev)
    }

    /// Check a stream subscription of `identity` with `filter` against the
    /// registry: a registered identity must ask for a filter its
    /// registration allows (403 naming it), an unregistered one is refused
    /// only when `require_registration`.
    pub async fn admit(
        &self,
        identity: &str,
        require_registration: bool,
        filter: Option<&SubjectPattern>,
    ) -> Result<Admission> {
        let snapshot = self.snapshot().await?;
        let Some(stored) = snapshot.by_identity(identity) else {
            if require_registration {
                return Err(Error::new(
                    ErrorKind::Forbidden,
                    format!(
                        "identity `{identity}` is not a registered subscriber, and this node requires registration \
                         (subscriptions.require_registration); register it with PUT /v1/subscribers/{{id}}"
                    ),
                ));
            }
            return Ok(Admission { id: None, rate_limit: None });
        };
        let reg = &stored.registration;
        if !reg.allows(filter) {
            return Err(Error::new(
                ErrorKind::Forbidden,
                format!(
                    "subject filter `{}` is not allowed for subscriber `{}` (identity `{identity}`); \
                     its registration allows {}",
                    filter.map_or(">", |f| f.as_str()),
                    stored.id,
                    reg.filters.iter().map(|f| format!("`{f}`")).collect::<Vec<_>>().join(", ")
                ),
            ));
        }
        Ok(Admission { id: Some(stored.id.clone()), rate_limit: reg.rate_limit })
    }

    /// Start the status session of an admitted connection.
    pub fn open(
        &self,
        admission: &Admission,
        kind: &'static str,
        stream: &str,
        filter: Option<&str>,
        peer: Option<std::net::SocketAddr>,
    ) -> (Session, Option<Pace>) {
        let session = self.inner.book.open(admission.id.as_deref(), kind, stream, filter, peer);
        (session, admission.rate_limit.as_ref().and_then(Pace::new))
    }

    async fn ensure_bucket(&self) -> Result<()> {
        match self.inner.engine.create_bucket(BucketConfig::new(self.inner.bucket.clone())).await {
            Ok(_) => Ok(()),
            Err(e) if e.kind() == ErrorKind::AlreadyExists => Ok(()),
            Err(e) => Err(e),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn reg(filters: &[&str]) -> Registration {
        Registration {
            identity: "srv".into(),
            region: None,
            filters: filters.iter().map(|s| (*s).to_owned()).collect(),
            rate_limit: None,
            notes: None,
        }
    }

    #[test]
    fn a_filter_is_allowed_when_an_allowed_filter_covers_it() {
        let r = reg(&["md.eu.>", "md.us.AAPL"]);
        let p = |s: &str| SubjectPattern::new(s).unwrap();
        assert!(r.allows(Some(&p("md.eu.>"))));
        assert!(r.allows(Some(&p("md.eu.*"))));
        assert!(r.allows(Some(&p("md.us.AAPL"))));
        assert!(!r.allows(Some(&p("md.us.*"))));
        assert!(!r.allows(Some(&p("md.>"))));
        assert!(!r.allows(None), "no filter means every subject");
        assert!(reg(&[">"]).allows(None));
    }

    #[test]
    fn validation_reports_every_problem_at_once() {
        let mut r = reg(&["md..x", ">"]);
        r.identity = String::new();
        r.rate_limit = Some(RateLimit { messages_per_second: Some(0), bytes_per_second: None });
        let msg = r.validate().unwrap_err().message().to_owned();
        for want in ["identity:", "filters[0]:", "rate_limit.messages_per_second:"] {
            assert!(msg.contains(want), "{msg}");
        }
        assert!(!msg.contains("filters[1]"), "{msg}");
    }

    #[test]
    fn ids_are_short_plain_names() {
        assert!(validate_id("eu-west_1").is_ok());
        for bad in ["", "a.b", "a/b", "a b", &"x".repeat(65)] {
            assert_eq!(validate_id(bad).unwrap_err().kind(), ErrorKind::Invalid, "{bad}");
        }
    }
}
