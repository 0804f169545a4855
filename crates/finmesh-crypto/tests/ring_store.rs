//! The key ring stored in a real (embedded) engine: two `RingStore`s on one
//! engine stand for two gateways fronting the same cluster.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use finmesh_core::{BucketName, Key, KvEngine};
use finmesh_crypto::{
    CryptoErrorKind, FileKeyProvider, KEYS_BUCKET, KeyId, KeyProvider, KeyPurpose, KeyRing, KeyState, MasterKey,
    RING_KEY, Rewrapped, RingStore, WrappedRing, key_id_of, keys_bucket_config, rewrap,
};
use finmesh_embedded::EmbeddedEngine;

/// Fields drop in order: the engine closes before its directory goes.
struct Site {
    engine: Arc<dyn KvEngine>,
    master: FileKeyProvider,
    dir: tempfile::TempDir,
}

fn site() -> Site {
    let dir = tempfile::tempdir().unwrap();
    let engine: Arc<dyn KvEngine> = Arc::new(EmbeddedEngine::open(dir.path().join("data")).unwrap());
    let path = dir.path().join("master.key");
    FileKeyProvider::create(&path).unwrap();
    Site { engine, master: FileKeyProvider::new(path), dir }
}

fn keys_bucket() -> BucketName {
    BucketName::new(KEYS_BUCKET).unwrap()
}

async fn stored_ring(engine: &dyn KvEngine) -> (bytes::Bytes, finmesh_core::Revision) {
    let entry = engine.kv_get(&keys_bucket(), &Key::new(RING_KEY).unwrap()).await.unwrap().unwrap();
    (entry.value, entry.revision)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn first_start_creates_the_ring_and_the_next_one_loads_it() {
    let s = site();
    let a = RingStore::open_or_create(s.engine.clone(), &s.master, keys_bucket_config(1)).await.unwrap();
    let b = RingStore::open_or_create(s.engine.clone(), &s.master, keys_bucket_config(1)).await.unwrap();
    let c = RingStore::open(s.engine.clone(), &s.master, keys_bucket()).await.unwrap();
    for store in [&b, &c] {
        assert_eq!(store.revision(), a.revision());
        assert_eq!(store.ring().active(KeyPurpose::Encryption).id(), KeyId(1));
        assert_eq!(store.ring().active(KeyPurpose::Hashing).id(), KeyId(2));
    }
    // Same keys: what one seals the other opens.
    let (bucket, key) = (BucketName::new("cards").unwrap(), Key::new("k").unwrap());
    let sealed = a.seal_value(&bucket, &key, b"value").unwrap();
    assert_eq!(&c.open_value(&bucket, &key, &sealed).await.unwrap()[..], b"value");
    // The stored form holds no material in clear and names the bucket's config.
    let (stored, _) = stored_ring(s.engine.as_ref()).await;
    let wrapped = WrappedRing::from_bytes(&stored).unwrap();
    assert_eq!(wrapped.keys().len(), 2);
    let info = s.engine.bucket_info(&keys_bucket()).await.unwrap();
    assert_eq!(info.config.history, 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rotation_through_one_gateway_reaches_another_through_the_engine() {
    let s = site();
    let a = RingStore::open_or_create(s.engine.clone(), &s.master, keys_bucket_config(1)).await.unwrap();
    let b = RingStore::open(s.engine.clone(), &s.master, keys_bucket()).await.unwrap();
    let new = a.rotate(KeyPurpose::Encryption).await.unwrap();
    assert_eq!(new, KeyId(3));
    assert_eq!(a.ring().active(KeyPurpose::Encryption).id(), new);
    assert_eq!(b.ring().active(KeyPurpose::Encryption).id(), KeyId(1), "b has not reloaded yet");
    let ring = b.reload().await.unwrap();
    assert_eq!(ring.active(KeyPurpose::Encryption).id(), new);
    assert_eq!(ring.get(KeyId(1)).unwrap().state(), KeyState::DecryptOnly);
    assert_eq!(b.revision(), a.revision());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_gateway_meeting_an_unknown_key_id_reloads_once_then_fails() {
    let s = site();
    let a = RingStore::open_or_create(s.engine.clone(), &s.master, keys_bucket_config(1)).await.unwrap();
    let b = RingStore::open(s.engine.clone(), &s.master, keys_bucket()).await.unwrap();
    let (bucket, key) = (BucketName::new("cards").unwrap(), Key::new("4111").unwrap());
    a.rotate(KeyPurpose::Encryption).await.unwrap();
    let sealed = a.seal_value(&bucket, &key, b"after rotation").unwrap();
    assert_eq!(key_id_of(&sealed).unwrap(), KeyId(3));
    // b still holds the old ring: the value names key 3, which b loads on demand.
    assert!(b.ring().get(KeyId(3)).is_none());
    assert_eq!(&b.open_value(&bucket, &key, &sealed).await.unwrap()[..], b"after rotation");
    assert!(b.ring().get(KeyId(3)).is_some());
    // A key id nobody has: one reload, then a clear UnknownKey.
    let mut forged = sealed.to_vec();
    forged[2..6].copy_from_slice(&77u32.to_be_bytes());
    let revision = b.revision();
    let e = b.open_value(&bucket, &key, &forged).await.unwrap_err();
    assert_eq!((e.kind(), e.key_id()), (CryptoErrorKind::UnknownKey, Some(KeyId(77))));
    assert_eq!(b.revision(), revision);
}

/// Two gateways change the ring at once: the second one's compare-and-set
/// fails, it starts again from the newer ring, and both keys are kept.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_rotations_lose_no_key() {
    let s = site();
    let a = Arc::new(RingStore::open_or_create(s.engine.clone(), &s.master, keys_bucket_config(1)).await.unwrap());
    let b = RingStore::open(s.engine.clone(), &s.master, keys_bucket()).await.unwrap();
    let attempts = AtomicUsize::new(0);
    let handle = tokio::runtime::Handle::current();
    let b_key = b
        .update(|ring| {
            if attempts.fetch_add(1, Ordering::SeqCst) == 0 {
                // Between b's read and b's write, a rotates and stores first.
                let a = a.clone();
                tokio::task::block_in_place(|| handle.block_on(a.rotate(KeyPurpose::Encryption))).unwrap();
            }
            ring.rotate(KeyPurpose::Encryption)
        })
        .await
        .unwrap();
    assert_eq!(attempts.load(Ordering::SeqCst), 2, "b's first write lost the race and was redone");
    assert_eq!(b_key, KeyId(4), "b's key comes after a's key 3");
    let ring = a.reload().await.unwrap();
    let states: Vec<_> = ring.keys().map(|k| (k.id().0, k.purpose(), k.state())).collect();
    assert_eq!(
        states,
        vec![
            (1, KeyPurpose::Encryption, KeyState::DecryptOnly),
            (2, KeyPurpose::Hashing, KeyState::Active),
            (3, KeyPurpose::Encryption, KeyState::DecryptOnly),
            (4, KeyPurpose::Encryption, KeyState::Active),
        ]
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_wrong_master_key_at_start_is_named_and_changes_nothing() {
    let s = site();
    RingStore::open_or_create(s.engine.clone(), &s.master, keys_bucket_config(1)).await.unwrap();
    let before = stored_ring(s.engine.as_ref()).await;
    let info_before = s.engine.bucket_info(&keys_bucket()).await.unwrap();
    let other = tempfile::tempdir().unwrap();
    let wrong = FileKeyProvider::new(other.path().join("wrong.key"));
    FileKeyProvider::create(wrong.path()).unwrap();
    for result in [
        RingStore::open_or_create(s.engine.clone(), &wrong, keys_bucket_config(1)).await,
        RingStore::open(s.engine.clone(), &wrong, keys_bucket()).await,
    ] {
        let e = result.unwrap_err();
        assert_eq!(e.kind(), CryptoErrorKind::WrongMasterKey);
        assert_eq!(
            e.to_string(),
            "wrong-master-key: wrong master key: it does not open the stored key ring (nothing was changed)"
        );
    }
    assert_eq!(stored_ring(s.engine.as_ref()).await, before);
    assert_eq!(s.engine.bucket_info(&keys_bucket()).await.unwrap().last_revision, info_before.last_revision);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_missing_master_key_or_ring_at_start_is_named_and_creates_nothing() {
    let s = site();
    let missing = FileKeyProvider::new(s.dir.path().join("no-such.key"));
    let e = RingStore::open_or_create(s.engine.clone(), &missing, keys_bucket_config(1)).await.unwrap_err();
    assert_eq!(e.kind(), CryptoErrorKind::MasterKey);
    assert!(e.to_string().contains("no-such.key") && e.to_string().contains("No such file"), "{e}");
    assert!(s.engine.list_buckets().await.unwrap().is_empty(), "no bucket was created");
    let e = RingStore::open(s.engine.clone(), &s.master, keys_bucket()).await.unwrap_err();
    assert_eq!(e.kind(), CryptoErrorKind::NoRing);
    assert!(e.to_string().contains("no key ring in bucket `_finmesh_keys`"), "{e}");
    assert!(s.engine.list_buckets().await.unwrap().is_empty(), "open never creates");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn state_changes_go_through_the_engine_and_refusals_store_nothing() {
    let s = site();
    let a = RingStore::open_or_create(s.engine.clone(), &s.master, keys_bucket_config(1)).await.unwrap();
    let b = RingStore::open(s.engine.clone(), &s.master, keys_bucket()).await.unwrap();
    let revision = a.revision();
    let e = a.retire(KeyId(1)).await.unwrap_err();
    assert_eq!((e.kind(), e.key_id()), (CryptoErrorKind::KeyState, Some(KeyId(1))));
    assert_eq!(stored_ring(s.engine.as_ref()).await.1, revision, "a refused change writes nothing");
    let (bucket, key) = (BucketName::new("cards").unwrap(), Key::new("k").unwrap());
    let old = a.seal_value(&bucket, &key, b"v").unwrap();
    a.rotate(KeyPurpose::Encryption).await.unwrap();
    a.retire(KeyId(1)).await.unwrap();
    // Once b has the new ring, the value under the retired key opens nowhere.
    b.reload().await.unwrap();
    assert_eq!(b.ring().get(KeyId(1)).unwrap().state(), KeyState::Retired);
    let e = b.open_value(&bucket, &key, &old).await.unwrap_err();
    assert_eq!((e.kind(), e.key_id()), (CryptoErrorKind::KeyState, Some(KeyId(1))));
    a.restore(KeyId(1)).await.unwrap();
    b.reload().await.unwrap();
    assert_eq!(&b.open_value(&bucket, &key, &old).await.unwrap()[..], b"v");
}

/// A following gateway gets a rotation made elsewhere without meeting the
/// new key first, so it stops sealing with the demoted key.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_following_gateway_picks_up_rotations_by_itself() {
    let s = site();
    let a = RingStore::open_or_create(s.engine.clone(), &s.master, keys_bucket_config(1)).await.unwrap();
    let b = Arc::new(RingStore::open(s.engine.clone(), &s.master, keys_bucket()).await.unwrap());
    let mut installed = b.subscribe();
    let follower = tokio::spawn({
        let b = b.clone();
        async move { b.follow().await }
    });
    let (bucket, key) = (BucketName::new("cards").unwrap(), Key::new("k").unwrap());
    for expected in [KeyId(3), KeyId(4)] {
        assert_eq!(a.rotate(KeyPurpose::Encryption).await.unwrap(), expected);
        let target = a.revision();
        tokio::time::timeout(std::time::Duration::from_secs(10), installed.wait_for(|r| *r >= target))
            .await
            .expect("b installs the rotated ring within 10 s")
            .unwrap();
        assert_eq!(b.ring().active(KeyPurpose::Encryption).id(), expected);
        assert_eq!(key_id_of(&b.seal_value(&bucket, &key, b"v").unwrap()).unwrap(), expected);
    }
    follower.abort();
}

/// Regression guard: a deleted ring must not be silently replaced by a new
/// one, which would leave every sealed value unreadable.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_deleted_ring_is_not_replaced_by_a_new_one() {
    let s = site();
    RingStore::open_or_create(s.engine.clone(), &s.master, keys_bucket_config(1)).await.unwrap();
    let ring_key = Key::new(RING_KEY).unwrap();
    let marker = s.engine.kv_delete(&keys_bucket(), &ring_key).await.unwrap();
    let e = RingStore::open_or_create(s.engine.clone(), &s.master, keys_bucket_config(1)).await.unwrap_err();
    assert_eq!(e.kind(), CryptoErrorKind::NoRing);
    assert!(e.to_string().contains(&format!("was deleted (its marker is at revision {marker})")), "{e}");
    assert!(s.engine.kv_get(&keys_bucket(), &ring_key).await.unwrap().is_none(), "nothing was written");
    assert_eq!(s.engine.bucket_info(&keys_bucket()).await.unwrap().last_revision, marker);
}

fn described(ring: &KeyRing) -> Vec<(u32, KeyPurpose, KeyState, finmesh_core::Timestamp)> {
    ring.keys().map(|k| (k.id().0, k.purpose(), k.state(), k.created())).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_master_key_change_keeps_every_data_key_and_every_value() {
    let s = site();
    let a = RingStore::open_or_create(s.engine.clone(), &s.master, keys_bucket_config(1)).await.unwrap();
    a.rotate(KeyPurpose::Encryption).await.unwrap();
    let (bucket, key) = (BucketName::new("cards").unwrap(), Key::new("k").unwrap());
    let sealed_before = a.seal_value(&bucket, &key, b"value").unwrap();
    let (_, before) = stored_ring(s.engine.as_ref()).await;
    let old = s.master.master_key().await.unwrap();
    let new_path = s.dir.path().join("new.key");
    let new = FileKeyProvider::create(&new_path).unwrap();

    let outcome = rewrap(s.engine.as_ref(), &keys_bucket(), &old, &new).await.unwrap();
    let Rewrapped::Done(revision) = outcome else { panic!("nothing written: {outcome:?}") };
    assert!(revision > before);

    // The new master key opens the same ring: same ids, purposes, states,
    // creation times, and the same material (a value sealed before opens).
    let b = RingStore::open(s.engine.clone(), &FileKeyProvider::new(&new_path), keys_bucket()).await.unwrap();
    assert_eq!(b.revision(), revision);
    assert_eq!(described(&b.ring()), described(&a.ring()));
    assert_eq!(&b.open_value(&bucket, &key, &sealed_before).await.unwrap()[..], b"value");
    // The old one opens it no more; a gateway still running with it keeps
    // the ring it loaded, and its changes are refused, storing nothing.
    let e = RingStore::open(s.engine.clone(), &s.master, keys_bucket()).await.unwrap_err();
    assert_eq!(e.kind(), CryptoErrorKind::WrongMasterKey, "{e}");
    assert_eq!(&a.open_value(&bucket, &key, &sealed_before).await.unwrap()[..], b"value");
    assert_eq!(a.rotate(KeyPurpose::Encryption).await.unwrap_err().kind(), CryptoErrorKind::WrongMasterKey);
    assert_eq!(stored_ring(s.engine.as_ref()).await.1, revision);

    // Again (say after a crash): nothing to do. Neither key: refused.
    // The same key twice: refused.
    assert_eq!(rewrap(s.engine.as_ref(), &keys_bucket(), &old, &new).await.unwrap(), Rewrapped::Already(revision));
    let (x, y) = (MasterKey::generate().unwrap(), MasterKey::generate().unwrap());
    let e = rewrap(s.engine.as_ref(), &keys_bucket(), &x, &y).await.unwrap_err();
    assert_eq!(e.kind(), CryptoErrorKind::WrongMasterKey, "{e}");
    let e = rewrap(s.engine.as_ref(), &keys_bucket(), &new, &new).await.unwrap_err();
    assert_eq!(e.kind(), CryptoErrorKind::Invalid, "{e}");
    assert_eq!(stored_ring(s.engine.as_ref()).await.1, revision, "refusals store nothing");

    let empty = site();
    let e = rewrap(empty.engine.as_ref(), &keys_bucket(), &x, &y).await.unwrap_err();
    assert_eq!(e.kind(), CryptoErrorKind::NoRing, "{e}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rotations_racing_a_master_key_change_are_kept_or_refused_never_lost() {
    let s = site();
    let a = Arc::new(RingStore::open_or_create(s.engine.clone(), &s.master, keys_bucket_config(1)).await.unwrap());
    let old = s.master.master_key().await.unwrap();
    let new = MasterKey::generate().unwrap();
    let rotations: Vec<_> = (0..8)
        .map(|_| {
            let a = a.clone();
            tokio::spawn(async move { a.rotate(KeyPurpose::Encryption).await })
        })
        .collect();
    let outcome = rewrap(s.engine.as_ref(), &keys_bucket(), &old, &new).await.unwrap();
    assert!(matches!(outcome, Rewrapped::Done(_)), "{outcome:?}");
    let mut stored = 0;
    for r in rotations {
        match r.await.unwrap() {
            Ok(_) => stored += 1,
            Err(e) => assert_eq!(e.kind(), CryptoErrorKind::WrongMasterKey, "{e}"),
        }
    }
    let (bytes, _) = stored_ring(s.engine.as_ref()).await;
    let ring = WrappedRing::from_bytes(&bytes).unwrap().unwrap(&new).unwrap();
    assert_eq!(ring.keys().count(), 2 + stored, "every rotation stored before the change is in the rewrapped ring");
}

/// A subscriber that reads the ring while it holds the revision channel
/// (as a `wait_for` closure does) never deadlocks against a rotation
/// installing a ring. (The install used to announce the revision while it
/// held the ring's lock: two locks taken in opposite orders.)
#[test]
fn reading_the_ring_while_holding_its_revision_never_deadlocks() {
    let (done, finished) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
        rt.block_on(async {
            let s = site();
            let store =
                Arc::new(RingStore::open_or_create(s.engine.clone(), &s.master, keys_bucket_config(1)).await.unwrap());
            let rotations = tokio::spawn({
                let store = store.clone();
                async move {
                    for _ in 0..30 {
                        store.rotate(KeyPurpose::Encryption).await.unwrap();
                    }
                }
            });
            let revisions = store.subscribe();
            let mut reads = 0u64;
            while !rotations.is_finished() {
                let held = revisions.borrow();
                reads += store.ring().keys().count() as u64;
                drop(held);
                tokio::task::yield_now().await;
            }
            rotations.await.unwrap();
            assert!(reads > 0);
            assert_eq!(*revisions.borrow(), store.revision(), "the last install was announced");
        });
        let _ = done.send(());
    });
    finished
        .recv_timeout(std::time::Duration::from_secs(60))
        .expect("a rotation and a subscriber reading the ring deadlocked");
}
