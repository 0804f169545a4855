//! The key ring stored in NATS JetStream KV: two engines connected to one
//! `nats-server` (test kit) stand for two gateways of one cluster. The
//! compare-and-set, the revision-0 create and the watch that `RingStore`
//! relies on are the NATS engine's here, not the embedded one's.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use finmesh_core::{BucketName, Key, KvEngine};
use finmesh_crypto::{
    CryptoErrorKind, FileKeyProvider, KEYS_BUCKET, KeyId, KeyProvider, KeyPurpose, KeyState, RING_KEY, Rewrapped,
    RingStore, key_id_of, keys_bucket_config, rewrap,
};
use finmesh_nats::{NatsEngine, NatsEngineOptions};
use finmesh_testkit::NatsServer;

/// Fields drop in order: connections close before the server stops.
struct Cluster {
    a: Arc<dyn KvEngine>,
    b: Arc<dyn KvEngine>,
    master: FileKeyProvider,
    _server: NatsServer,
    dir: tempfile::TempDir,
}

async fn cluster() -> Cluster {
    let server = NatsServer::start().await.expect("start nats-server");
    let connect = || NatsEngine::connect(NatsEngineOptions::new(server.url()));
    let a: Arc<dyn KvEngine> = Arc::new(connect().await.unwrap());
    let b: Arc<dyn KvEngine> = Arc::new(connect().await.unwrap());
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("master.key");
    FileKeyProvider::create(&path).unwrap();
    Cluster { a, b, master: FileKeyProvider::new(path), _server: server, dir }
}

fn keys_bucket() -> BucketName {
    BucketName::new(KEYS_BUCKET).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rotations_through_one_gateway_reach_another_over_nats() {
    let c = cluster().await;
    let a = Arc::new(RingStore::open_or_create(c.a.clone(), &c.master, keys_bucket_config(1)).await.unwrap());
    let b = Arc::new(RingStore::open_or_create(c.b.clone(), &c.master, keys_bucket_config(1)).await.unwrap());
    assert_eq!(a.revision(), b.revision(), "the second start loads the first one's ring");
    let (bucket, key) = (BucketName::new("cards").unwrap(), Key::new("k").unwrap());

    // b meets a value under a key it has not loaded: one reload, then it opens.
    a.rotate(KeyPurpose::Encryption).await.unwrap();
    let sealed = a.seal_value(&bucket, &key, b"v").unwrap();
    assert_eq!(&b.open_value(&bucket, &key, &sealed).await.unwrap()[..], b"v");

    // b follows: the next rotation arrives without b asking.
    let mut installed = b.subscribe();
    let follower = tokio::spawn({
        let b = b.clone();
        async move { b.follow().await }
    });
    let new = a.rotate(KeyPurpose::Encryption).await.unwrap();
    let target = a.revision();
    tokio::time::timeout(Duration::from_secs(10), installed.wait_for(|r| *r >= target))
        .await
        .expect("b installs the rotated ring within 10 s")
        .unwrap();
    assert_eq!(key_id_of(&b.seal_value(&bucket, &key, b"v").unwrap()).unwrap(), new);
    follower.abort();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_rotations_over_nats_lose_no_key() {
    let c = cluster().await;
    let a = Arc::new(RingStore::open_or_create(c.a.clone(), &c.master, keys_bucket_config(1)).await.unwrap());
    let b = RingStore::open(c.b.clone(), &c.master, keys_bucket()).await.unwrap();
    let attempts = AtomicUsize::new(0);
    let handle = tokio::runtime::Handle::current();
    let b_key = b
        .update(|ring| {
            if attempts.fetch_add(1, Ordering::SeqCst) == 0 {
                let a = a.clone();
                tokio::task::block_in_place(|| handle.block_on(a.rotate(KeyPurpose::Hashing))).unwrap();
            }
            ring.rotate(KeyPurpose::Hashing)
        })
        .await
        .unwrap();
    assert_eq!(attempts.load(Ordering::SeqCst), 2);
    assert_eq!(b_key, KeyId(4));
    let ring = a.reload().await.unwrap();
    let hashing: Vec<_> =
        ring.keys().filter(|k| k.purpose() == KeyPurpose::Hashing).map(|k| (k.id().0, k.state())).collect();
    assert_eq!(hashing, vec![(2, KeyState::DecryptOnly), (3, KeyState::DecryptOnly), (4, KeyState::Active)]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wrong_master_key_and_deleted_ring_change_nothing_over_nats() {
    let c = cluster().await;
    RingStore::open_or_create(c.a.clone(), &c.master, keys_bucket_config(1)).await.unwrap();
    let ring_key = Key::new(RING_KEY).unwrap();
    let before = c.a.kv_get(&keys_bucket(), &ring_key).await.unwrap().unwrap();
    let wrong = FileKeyProvider::new(c.dir.path().join("wrong.key"));
    FileKeyProvider::create(wrong.path()).unwrap();
    let e = RingStore::open_or_create(c.b.clone(), &wrong, keys_bucket_config(1)).await.unwrap_err();
    assert_eq!(e.kind(), CryptoErrorKind::WrongMasterKey);
    let after = c.a.kv_get(&keys_bucket(), &ring_key).await.unwrap().unwrap();
    assert_eq!((after.revision, after.value), (before.revision, before.value));

    let marker = c.a.kv_delete(&keys_bucket(), &ring_key).await.unwrap();
    let e = RingStore::open_or_create(c.b.clone(), &c.master, keys_bucket_config(1)).await.unwrap_err();
    assert_eq!(e.kind(), CryptoErrorKind::NoRing, "{e}");
    assert!(c.a.kv_get(&keys_bucket(), &ring_key).await.unwrap().is_none());
    assert_eq!(c.a.bucket_info(&keys_bucket()).await.unwrap().last_revision, marker);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_master_key_change_over_nats_reaches_a_gateway_started_with_the_new_key() {
    let c = cluster().await;
    let a = RingStore::open_or_create(c.a.clone(), &c.master, keys_bucket_config(1)).await.unwrap();
    let (bucket, key) = (BucketName::new("cards").unwrap(), Key::new("k").unwrap());
    let sealed = a.seal_value(&bucket, &key, b"v").unwrap();
    let new_path = c.dir.path().join("new.key");
    let new = FileKeyProvider::create(&new_path).unwrap();
    let old = c.master.master_key().await.unwrap();
    let Rewrapped::Done(revision) = rewrap(c.a.as_ref(), &keys_bucket(), &old, &new).await.unwrap() else {
        panic!("nothing written")
    };
    // Another gateway of the cluster starts with the new key: same ring.
    let b = RingStore::open(c.b.clone(), &FileKeyProvider::new(&new_path), keys_bucket()).await.unwrap();
    assert_eq!(b.revision(), revision);
    assert_eq!(&b.open_value(&bucket, &key, &sealed).await.unwrap()[..], b"v");
    let e = RingStore::open(c.b.clone(), &c.master, keys_bucket()).await.unwrap_err();
    assert_eq!(e.kind(), CryptoErrorKind::WrongMasterKey, "{e}");
    assert_eq!(rewrap(c.b.as_ref(), &keys_bucket(), &old, &new).await.unwrap(), Rewrapped::Already(revision));
}
