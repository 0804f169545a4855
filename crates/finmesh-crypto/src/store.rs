//! The key ring in the engine: [`RingStore`] loads, reloads and changes the
//! wrapped ring kept in an internal KV bucket, so every gateway fronting the
//! same engine (and every edge reading its mirror) gets new keys through the
//! engine itself, without copying files.
//!
//! Layout: bucket [`KEYS_BUCKET`] (`_finmesh_keys`, history 1,
//! `sync = always`), key [`RING_KEY`] (`ring`), value a [`WrappedRing`] as
//! JSON. The leading `_finmesh` marks the bucket as internal
//! (`BucketName::is_reserved`): the gateway refuses it to clients and
//! [`crate::SecureEngine`] leaves it out of bucket listings.
//!
//! Invariants:
//! - the master key is fetched from the [`KeyProvider`] before the engine
//!   is touched, and a ring that does not unwrap is never replaced: a wrong
//!   or missing master key at start is a clear error and changes nothing;
//! - a new ring is created only where the ring key never had an entry
//!   (`kv_update` at revision 0): if the stored ring was deleted or purged,
//!   its marker stays and [`RingStore::open_or_create`] refuses rather than
//!   start a new ring under which no existing value would open. (Deleting
//!   the whole bucket cannot be told apart from a first start: it loses
//!   every key.)
//! - every change reads the latest stored ring, applies the change to a copy
//!   and writes it back with `kv_update` at the revision it read; on a
//!   conflict it starts again from the newer ring, so two gateways rotating
//!   at once both get their key in and none is lost;
//! - the ring in memory only moves forward: a reload installs a stored ring
//!   only if its revision is newer than the one held; the new revision is
//!   announced on the [`RingStore::subscribe`] channel after the ring's
//!   lock is released (never both locks at once);
//! - [`RingStore::open_value`] reloads at most once per unknown key id and
//!   concurrent readers that meet the same unknown id share one reload;
//! - [`RingStore::follow`] watches the stored ring from the revision after
//!   the one in use and reloads on every change, so a rotation reaches
//!   every gateway within one watch delivery (a gateway that does not
//!   follow would keep sealing with a key another gateway has demoted).
//!   When the watch fails it is set up again after a backoff of 100 ms
//!   doubling to [`FOLLOW_MAX_BACKOFF`]; nothing is missed, since it
//!   restarts from the revision in use.
//! - a master-key change ([`rewrap`]) rewraps the same data keys (ids,
//!   states, material unchanged, so every stored value still opens) by
//!   compare-and-set at the revision it read, like any change; the ring is
//!   stored under one master key at any moment.

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use finmesh_core::{BucketConfig, BucketName, ErrorKind, Key, KvEngine, Revision, WatchStart};
use futures::StreamExt;
use parking_lot::RwLock;

use crate::envelope;
use crate::error::{CryptoError, CryptoErrorKind, Result};
use crate::provider::KeyProvider;
use crate::ring::{KeyId, KeyPurpose, KeyRing};
use crate::wrap::{MasterKey, WrappedRing};

/// The internal bucket that holds the wrapped key ring.
pub const KEYS_BUCKET: &str = "_finmesh_keys";
/// The key of the wrapped ring in [`KEYS_BUCKET`].
pub const RING_KEY: &str = "ring";

/// How often [`RingStore::update`] retries after losing a compare-and-set race.
const MAX_UPDATE_ATTEMPTS: usize = 16;

/// Longest wait before [`RingStore::follow`] sets up a failed watch again.
pub const FOLLOW_MAX_BACKOFF: Duration = Duration::from_secs(5);
const FOLLOW_FIRST_BACKOFF: Duration = Duration::from_millis(100);

/// The configuration [`RingStore::open_or_create`] gives a new keys bucket:
/// [`KEYS_BUCKET`], history 1 (a destroyed key must not survive in an older
/// revision), `sync = always`, `replicas` copies (the primary cluster's
/// replication factor on NATS, 1 on the embedded engine).
pub fn keys_bucket_config(replicas: u8) -> BucketConfig {
    let mut config = BucketConfig::new(BucketName::new(KEYS_BUCKET).expect("a valid bucket name"));
    config.replicas = replicas;
    config
}

#[derive(Clone)]
struct Loaded {
    ring: Arc<KeyRing>,
    revision: Revision,
}

/// The wrapped key ring in an engine, and the unwrapped copy this node uses.
pub struct RingStore {
    engine: Arc<dyn KvEngine>,
    bucket: BucketName,
    key: Key,
    master: MasterKey,
    /// The ring in use; readers clone the `Arc` under a short read lock.
    current: RwLock<Loaded>,
    /// Serializes reloads so a burst of readers meeting one unknown key id
    /// costs one engine read.
    reloading: tokio::sync::Mutex<()>,
    /// The revision of the ring in use, for [`RingStore::subscribe`].
    installed: tokio::sync::watch::Sender<Revision>,
}

impl RingStore {
    /// Load the ring stored in `bucket`; [`CryptoErrorKind::NoRing`] if the
    /// bucket or the ring does not exist. Writes nothing.
    pub async fn open(engine: Arc<dyn KvEngine>, provider: &dyn KeyProvider, bucket: BucketName) -> Result<RingStore> {
        let master = provider.master_key().await?;
        let key = ring_key();
        match engine.bucket_info(&bucket).await {
            Err(e) if e.kind() == ErrorKind::NotFound => return Err(no_ring(&bucket)),
            r => r?,
        };
        let (ring, revision) = load(engine.as_ref(), &bucket, &key, &master).await?.ok_or_else(|| no_ring(&bucket))?;
        Ok(Self::new(engine, bucket, key, master, ring, revision))
    }

    /// Load the ring, first creating the bucket (with `config`) and a new
    /// ring if there is none. Two nodes doing this at once end up with the
    /// same ring. A wrong master key for an existing ring changes nothing.
    pub async fn open_or_create(
        engine: Arc<dyn KvEngine>,
        provider: &dyn KeyProvider,
        config: BucketConfig,
    ) -> Result<RingStore> {
        let master = provider.master_key().await?;
        let bucket = config.name.clone();
        let key = ring_key();
        match engine.bucket_info(&bucket).await {
            Err(e) if e.kind() == ErrorKind::NotFound => match engine.create_bucket(config).await {
                Err(e) if e.kind() == ErrorKind::AlreadyExists => {}
                r => drop(r?),
            },
            r => drop(r?),
        }
        if let Some((ring, revision)) = load(engine.as_ref(), &bucket, &key, &master).await? {
            return Ok(Self::new(engine, bucket, key, master, ring, revision));
        }
        let ring = KeyRing::generate()?;
        let bytes = Bytes::from(WrappedRing::wrap(&ring, &master)?.to_bytes());
        match engine.kv_update(&bucket, &key, bytes, Revision(0)).await {
            Ok(revision) => Ok(Self::new(engine, bucket, key, master, ring, revision)),
            Err(e) if e.kind() == ErrorKind::WrongRevision => {
                // Another node created it first (use theirs), or the ring
                // was deleted and only its marker is left (refuse).
                match load(engine.as_ref(), &bucket, &key, &master).await? {
                    Some((ring, revision)) => Ok(Self::new(engine, bucket, key, master, ring, revision)),
                    None => Err(CryptoError::new(
                        CryptoErrorKind::NoRing,
                        format!(
                            "the key ring in bucket `{bucket}` was deleted (its marker is at revision {}); not \
                             creating a new one, under which no existing value would open: restore the ring",
                            e.current_revision().unwrap_or_default()
                        ),
                    )),
                }
            }
            Err(e) => Err(e.into()),
        }
    }

    fn new(
        engine: Arc<dyn KvEngine>,
        bucket: BucketName,
        key: Key,
        master: MasterKey,
        ring: KeyRing,
        revision: Revision,
    ) -> RingStore {
        RingStore {
            engine,
            bucket,
            key,
            master,
            current: RwLock::new(Loaded { ring: Arc::new(ring), revision }),
            reloading: tokio::sync::Mutex::new(()),
            installed: tokio::sync::watch::Sender::new(revision),
        }
    }

    /// The ring in use now (cheap: an `Arc` clone).
    pub fn ring(&self) -> Arc<KeyRing> {
        self.current.read().ring.clone()
    }

    /// The KV revision of the ring in use.
    pub fn revision(&self) -> Revision {
        self.current.read().revision
    }

    /// The bucket the ring is stored in.
    pub fn bucket(&self) -> &BucketName {
        &self.bucket
    }

    /// Read the stored ring and use it if it is newer than the one in use.
    /// Returns the ring in use afterwards.
    pub async fn reload(&self) -> Result<Arc<KeyRing>> {
        let _one_at_a_time = self.reloading.lock().await;
        self.reload_locked().await
    }

    async fn reload_locked(&self) -> Result<Arc<KeyRing>> {
        let (ring, revision) = load(self.engine.as_ref(), &self.bucket, &self.key, &self.master)
            .await?
            .ok_or_else(|| no_ring(&self.bucket))?;
        Ok(self.install(ring, revision))
    }

    /// Reload unless someone else did since `seen` was the ring in use.
    async fn reload_after(&self, seen: &Arc<KeyRing>) -> Result<()> {
        let _one_at_a_time = self.reloading.lock().await;
        if Arc::ptr_eq(&self.ring(), seen) {
            self.reload_locked().await?;
        }
        Ok(())
    }

    fn install(&self, ring: KeyRing, revision: Revision) -> Arc<KeyRing> {
        let (in_use, newer) = {
            let mut current = self.current.write();
            let newer = revision > current.revision;
            if newer {
                *current = Loaded { ring: Arc::new(ring), revision };
            }
            (current.ring.clone(), newer)
        };
        // Announced after the ring's lock is released: a subscriber may
        // read the ring while it holds the watch (`wait_for`'s closure does),
        // and holding both here deadlocked against it. Only ever forward,
        // as two installs may announce out of order.
        if newer {
            self.installed.send_if_modified(|announced| {
                let later = revision > *announced;
                if later {
                    *announced = revision;
                }
                later
            });
        }
        in_use
    }

    /// The revision of the ring in use, changing each time a newer ring is
    /// installed (by a reload, an update or [`follow`](Self::follow)).
    pub fn subscribe(&self) -> tokio::sync::watch::Receiver<Revision> {
        self.installed.subscribe()
    }

    /// Keep the ring in use current: watch the stored ring and reload on
    /// every change (see the module doc). Runs until the future is dropped
    /// or its task aborted; problems are logged, never returned.
    pub async fn follow(&self) {
        let mut backoff = FOLLOW_FIRST_BACKOFF;
        loop {
            let from = Revision(self.revision().0 + 1);
            match self.engine.kv_watch(&self.bucket, RING_KEY, WatchStart::FromRevision(from)).await {
                Ok(mut changes) => {
                    backoff = FOLLOW_FIRST_BACKOFF;
                    while let Some(change) = changes.next().await {
                        let outcome = match change {
                            Ok(entry) if entry.key == self.key && entry.revision > self.revision() => {
                                self.reload().await.map(drop)
                            }
                            Ok(_) => Ok(()),
                            Err(e) => {
                                tracing::warn!(bucket = %self.bucket, error = %e, "the key ring watch failed; setting it up again");
                                break;
                            }
                        };
                        if let Err(e) = outcome {
                            tracing::error!(bucket = %self.bucket, error = %e, "cannot load the changed key ring; keeping the one in use");
                        }
                    }
                }
                Err(e) => tracing::warn!(bucket = %self.bucket, error = %e, "cannot watch the key ring"),
            }
            tokio::time::sleep(backoff).await;
            backoff = (backoff * 2).min(FOLLOW_MAX_BACKOFF);
        }
    }

    /// Change the stored ring with `change` (see the module doc: it runs on
    /// the latest stored ring and again after a lost race, so it must only
    /// depend on the ring it is given). Returns what `change` returned on
    /// the attempt that was stored.
    pub async fn update<T>(&self, mut change: impl FnMut(&mut KeyRing) -> Result<T> + Send) -> Result<T> {
        for _ in 0..MAX_UPDATE_ATTEMPTS {
            let (mut ring, revision) = load(self.engine.as_ref(), &self.bucket, &self.key, &self.master)
                .await?
                .ok_or_else(|| no_ring(&self.bucket))?;
            let out = change(&mut ring)?;
            let bytes = Bytes::from(WrappedRing::wrap(&ring, &self.master)?.to_bytes());
            match self.engine.kv_update(&self.bucket, &self.key, bytes, revision).await {
                Ok(revision) => {
                    self.install(ring, revision);
                    return Ok(out);
                }
                Err(e) if e.kind() == ErrorKind::WrongRevision => continue,
                Err(e) => return Err(e.into()),
            }
        }
        Err(CryptoError::new(
            CryptoErrorKind::Storage,
            format!("the key ring changed under {MAX_UPDATE_ATTEMPTS} attempts in a row to update it; try again"),
        ))
    }

    /// Make a new active key for `purpose` (the old one becomes decrypt-only).
    pub async fn rotate(&self, purpose: KeyPurpose) -> Result<KeyId> {
        self.update(|ring| ring.rotate(purpose)).await
    }

    /// Retire a decrypt-only key (see [`KeyRing::retire`]).
    pub async fn retire(&self, id: KeyId) -> Result<()> {
        self.update(|ring| ring.retire(id)).await
    }

    /// Undo a retirement (see [`KeyRing::restore`]).
    pub async fn restore(&self, id: KeyId) -> Result<()> {
        self.update(|ring| ring.restore(id)).await
    }

    /// Destroy a retired key for good (see [`KeyRing::destroy`]).
    pub async fn destroy(&self, id: KeyId) -> Result<()> {
        self.update(|ring| ring.destroy(id)).await
    }

    /// Seal with the ring in use (see [`envelope::seal`]).
    pub fn seal_value(&self, bucket: &BucketName, key: &Key, plaintext: &[u8]) -> Result<Bytes> {
        envelope::seal(&self.ring(), bucket, key, plaintext)
    }

    /// Open with the ring in use; if the value names a key id that ring does
    /// not hold, reload the ring once (another gateway may have rotated) and
    /// try again before failing.
    pub async fn open_value(&self, bucket: &BucketName, key: &Key, sealed: &[u8]) -> Result<Bytes> {
        let ring = self.ring();
        match envelope::open(&ring, bucket, key, sealed) {
            Err(e) if e.kind() == CryptoErrorKind::UnknownKey => {
                // Boxed: the rare reload keeps its state out of every
                // get's future.
                Box::pin(self.reload_after(&ring)).await?;
                envelope::open(&self.ring(), bucket, key, sealed)
            }
            r => r,
        }
    }
}

impl std::fmt::Debug for RingStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let current = self.current.read();
        f.debug_struct("RingStore")
            .field("bucket", &self.bucket)
            .field("revision", &current.revision)
            .field("ring", &current.ring)
            .finish_non_exhaustive()
    }
}

/// What [`rewrap`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Rewrapped {
    /// The ring is now wrapped by the new master key, at this revision.
    Done(Revision),
    /// The new master key opens the stored ring already (an earlier run got
    /// its write in): nothing was written. The ring's revision.
    Already(Revision),
}

/// Change the master key of the ring stored in `bucket` from `old` to
/// `new`: unwrap it with `old`, wrap the same data keys with `new`, and
/// store that by compare-and-set at the revision read (a concurrent change,
/// say a rotation through a running gateway, is read again and kept).
/// A ring that `new` opens already is left as it is
/// ([`Rewrapped::Already`]), so an interrupted run can be repeated; a ring
/// that neither opens is [`CryptoErrorKind::WrongMasterKey`]; `new` equal
/// to `old` is [`CryptoErrorKind::Invalid`].
///
/// A gateway running with `old` keeps the ring it loaded but can no longer
/// load a changed one: restart every gateway with `new` (docs/security.md,
/// "Changing the master key").
pub async fn rewrap(engine: &dyn KvEngine, bucket: &BucketName, old: &MasterKey, new: &MasterKey) -> Result<Rewrapped> {
    if old.expose_secret() == new.expose_secret() {
        return Err(CryptoError::new(
            CryptoErrorKind::Invalid,
            "the new master key is the one the ring is wrapped with already; nothing to change",
        ));
    }
    let key = ring_key();
    for _ in 0..MAX_UPDATE_ATTEMPTS {
        let entry = match engine.kv_get(bucket, &key).await {
            Ok(Some(entry)) => entry,
            Ok(None) => return Err(no_ring(bucket)),
            Err(e) if e.kind() == ErrorKind::NotFound => return Err(no_ring(bucket)),
            Err(e) => return Err(e.into()),
        };
        let stored = WrappedRing::from_bytes(&entry.value)?;
        let ring = match stored.unwrap(old) {
            Ok(ring) => ring,
            Err(e) if e.kind() == CryptoErrorKind::WrongMasterKey => {
                return match stored.unwrap(new) {
                    Ok(_) => Ok(Rewrapped::Already(entry.revision)),
                    Err(_) => Err(e),
                };
            }
            Err(e) => return Err(e),
        };
        let bytes = Bytes::from(WrappedRing::wrap(&ring, new)?.to_bytes());
        match engine.kv_update(bucket, &key, bytes, entry.revision).await {
            Ok(revision) => return Ok(Rewrapped::Done(revision)),
            Err(e) if e.kind() == ErrorKind::WrongRevision => continue,
            Err(e) => return Err(e.into()),
        }
    }
    Err(CryptoError::new(
        CryptoErrorKind::Storage,
        format!("the key ring changed under {MAX_UPDATE_ATTEMPTS} attempts in a row to rewrap it; try again"),
    ))
}

fn ring_key() -> Key {
    Key::new(RING_KEY).expect("a valid key")
}

fn no_ring(bucket: &BucketName) -> CryptoError {
    CryptoError::new(
        CryptoErrorKind::NoRing,
        format!(
            "there is no key ring in bucket `{bucket}`; create one first (the first node started with encryption does)"
        ),
    )
}

/// The stored ring and its revision, unwrapped; `None` if there is none.
async fn load(
    engine: &dyn KvEngine,
    bucket: &BucketName,
    key: &Key,
    master: &MasterKey,
) -> Result<Option<(KeyRing, Revision)>> {
    let Some(entry) = engine.kv_get(bucket, key).await? else {
        return Ok(None);
    };
    let ring = WrappedRing::from_bytes(&entry.value)?.unwrap(master)?;
    Ok(Some((ring, entry.revision)))
}
