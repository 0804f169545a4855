//! Security options enforced by an engine stack (an encrypting wrapper
//! around an engine): values sealed in storage, ciphertexts bound to their
//! bucket and key, the size limit on the plaintext, keys replaced by keyed
//! hashes yet reachable by the clear key, card-number keys validated.
//!
//! These cases need a stack that enforces the options and a handle to the
//! engine under it, to look at what reaches storage: a [`SecureHarness`].
//! Stamp them with [`security_conformance_tests!`](crate::security_conformance_tests).
//! Expectations that hold for any enforcing stack only: the suite never
//! decodes a ciphertext or a hashed key.

use std::sync::Arc;

use async_trait::async_trait;
use bytes::Bytes;

use crate::testsuite::Harness;
use crate::testsuite::support::*;
use crate::{
    BucketConfig, BucketName, BucketSecurity, Encryption, Engine, ErrorKind, KeyFormat, KeyHashing, KvOp, Revision,
    SecurityOption, WatchStart,
};

/// A harness whose engine enforces the security options of buckets, with
/// a handle to the engine under the enforcing layer.
#[async_trait]
pub trait SecureHarness: Harness {
    /// The engine that stores what the enforcing layer hands it (the same
    /// storage as [`Harness::engine`], without the layer).
    fn raw(&self) -> Arc<dyn Engine>;
}

fn encrypted() -> BucketSecurity {
    BucketSecurity { encryption: Some(Encryption::Aes256Gcm), ..BucketSecurity::default() }
}

fn encrypted_hashed() -> BucketSecurity {
    BucketSecurity { key_hashing: Some(KeyHashing::HmacSha256), ..encrypted() }
}

fn all_options() -> BucketSecurity {
    BucketSecurity { key_format: Some(KeyFormat::Pan), ..encrypted_hashed() }
}

async fn create(e: &dyn Engine, name: &str, security: BucketSecurity, history: u8) -> BucketName {
    let b = bucket(name);
    e.create_bucket(BucketConfig { security, history, ..BucketConfig::new(b.clone()) }).await.unwrap();
    b
}

fn contains(haystack: &[u8], needle: &[u8]) -> bool {
    haystack.windows(needle.len()).any(|w| w == needle)
}

/// The stack says it enforces every bucket option, and a bucket with all of
/// them reports them (and the user's limits) in its info.
pub async fn info_returns_options<H: SecureHarness>() {
    let h = H::start().await;
    let e = h.engine();
    for o in all_options().options() {
        assert!(e.supports_security(o), "the stack enforces {o}");
    }
    assert!(!e.supports_stream_security(SecurityOption::Encryption(Encryption::Aes256Gcm)), "payloads are not sealed");
    let config =
        BucketConfig { security: all_options(), max_value_size: Some(100), ..BucketConfig::new(bucket("cards")) };
    let reported = crate::testsuite::as_reported_bucket::<H>(config.clone());
    assert_eq!(e.create_bucket(config.clone()).await.unwrap().config, reported);
    assert_eq!(e.bucket_info(&bucket("cards")).await.unwrap().config, reported);
    assert_eq!(e.create_bucket(config).await.unwrap().config, reported, "same config again");
    assert_eq!(h.raw().bucket_info(&bucket("cards")).await.unwrap().config.security, all_options());
    assert_eq!(e.list_buckets().await.unwrap(), vec![bucket("cards")], "internal buckets are not listed");
}

/// A value of an encrypted bucket is stored sealed (the plaintext appears
/// nowhere in what the engine holds) and comes back in clear from get, get
/// at revision, history and watch.
pub async fn values_are_sealed_in_storage<H: SecureHarness>() {
    let h = H::start().await;
    let (e, raw) = (h.engine(), h.raw());
    let b = create(&*e, "b", encrypted(), 3).await;
    let secret = Bytes::from("secret-value-0123456789");
    let r1 = e.kv_put(&b, &key("a"), secret.clone()).await.unwrap();
    let stored = raw.kv_get(&b, &key("a")).await.unwrap().expect("stored under the clear key");
    assert!(!contains(&stored.value, &secret), "the plaintext reached storage");
    assert!(stored.value.len() > secret.len());
    assert_eq!(e.kv_get(&b, &key("a")).await.unwrap().unwrap().value, secret);
    assert_eq!(e.kv_get_revision(&b, &key("a"), r1).await.unwrap().unwrap().value, secret);
    e.kv_delete(&b, &key("a")).await.unwrap();
    let history = e.kv_history(&b, &key("a")).await.unwrap();
    assert_eq!(
        history.iter().map(|x| (x.op, x.value.clone())).collect::<Vec<_>>(),
        vec![(KvOp::Put, secret.clone()), (KvOp::Delete, Bytes::new())]
    );
    let mut w = e.kv_watch(&b, "", WatchStart::FromRevision(Revision(1))).await.unwrap();
    assert_eq!(next_entry(&mut w, "sealed put").await.value, secret);
    assert_eq!(next_entry(&mut w, "delete marker").await.op, KvOp::Delete);
    e.kv_put(&b, &key("a"), Bytes::from("live")).await.unwrap();
    assert_eq!(next_entry(&mut w, "live put").await.value, "live");
}

/// A ciphertext copied to another key or bucket, or changed, fails to open
/// with `Integrity` (on get, history and watch), and nothing is returned in
/// its place.
pub async fn moved_or_changed_ciphertext_is_integrity<H: SecureHarness>() {
    let h = H::start().await;
    let (e, raw) = (h.engine(), h.raw());
    let b = create(&*e, "b", encrypted(), 2).await;
    let other = create(&*e, "other", encrypted(), 2).await;
    e.kv_put(&b, &key("a"), Bytes::from("value of a")).await.unwrap();
    e.kv_put(&b, &key("b"), Bytes::from("value of b")).await.unwrap();
    let sealed = raw.kv_get(&b, &key("a")).await.unwrap().unwrap().value;
    raw.kv_put(&b, &key("b"), sealed.clone()).await.unwrap();
    expect_kind(e.kv_get(&b, &key("b")).await, ErrorKind::Integrity);
    expect_kind(e.kv_history(&b, &key("b")).await, ErrorKind::Integrity);
    raw.kv_put(&other, &key("a"), sealed.clone()).await.unwrap();
    expect_kind(e.kv_get(&other, &key("a")).await, ErrorKind::Integrity);
    let mut w = e.kv_watch(&other, "", WatchStart::LatestValues).await.unwrap();
    match tokio::time::timeout(STEP, futures::StreamExt::next(&mut w)).await {
        Ok(Some(Err(err))) => assert_eq!(err.kind(), ErrorKind::Integrity, "{err:?}"),
        other => panic!("the watch must fail with an integrity error, got {other:?}"),
    }
    let mut changed = sealed.to_vec();
    let last = changed.len() - 1;
    changed[last] ^= 1;
    raw.kv_put(&b, &key("a"), Bytes::from(changed)).await.unwrap();
    expect_kind(e.kv_get(&b, &key("a")).await, ErrorKind::Integrity);
    raw.kv_put(&b, &key("a"), Bytes::from("never sealed")).await.unwrap();
    expect_kind(e.kv_get(&b, &key("a")).await, ErrorKind::Integrity);
    // The original is still fine where it belongs.
    raw.kv_put(&b, &key("a"), sealed).await.unwrap();
    assert_eq!(e.kv_get(&b, &key("a")).await.unwrap().unwrap().value, "value of a");
}

/// `max_value_size` of an encrypted bucket limits the plaintext: exactly
/// the limit fits, one byte more is `TooLarge` for put, create and update,
/// and nothing is written; info reports the user's figure.
pub async fn size_limit_is_on_the_plaintext<H: SecureHarness>() {
    let h = H::start().await;
    let e = h.engine();
    let b = bucket("b");
    let config = BucketConfig { max_value_size: Some(10), security: encrypted(), ..BucketConfig::new(b.clone()) };
    e.create_bucket(config).await.unwrap();
    assert_eq!(e.bucket_info(&b).await.unwrap().config.max_value_size, Some(10));
    let r = e.kv_put(&b, &key("a"), Bytes::from(vec![b'y'; 10])).await.unwrap();
    let big = Bytes::from(vec![b'x'; 11]);
    expect_kind(e.kv_put(&b, &key("a"), big.clone()).await, ErrorKind::TooLarge);
    expect_kind(e.kv_update(&b, &key("a"), big.clone(), r).await, ErrorKind::TooLarge);
    expect_kind(e.kv_create(&b, &key("new"), big).await, ErrorKind::TooLarge);
    assert_eq!(e.bucket_info(&b).await.unwrap().last_revision, r);
    let updated = BucketConfig { max_value_size: Some(20), security: encrypted(), ..BucketConfig::new(b.clone()) };
    assert_eq!(e.update_bucket(updated).await.unwrap().config.max_value_size, Some(20));
    e.kv_put(&b, &key("a"), Bytes::from(vec![b'z'; 20])).await.unwrap();
    expect_kind(e.kv_put(&b, &key("a"), Bytes::from(vec![b'z'; 21])).await, ErrorKind::TooLarge);
}

/// Keys of a hashed bucket never reach storage in clear, yet every
/// operation by the clear key works (and returns the clear key); a listing
/// returns the stored hashes and refuses a prefix.
pub async fn hashed_keys_work_by_the_clear_key<H: SecureHarness>() {
    let h = H::start().await;
    let (e, raw) = (h.engine(), h.raw());
    let b = create(&*e, "b", encrypted_hashed(), 5).await;
    let (a, c) = (key("alice.card"), key("carol.card"));
    let r1 = e.kv_put(&b, &a, Bytes::from("1")).await.unwrap();
    let r2 = e.kv_update(&b, &a, Bytes::from("2"), r1).await.unwrap();
    let err = expect_kind(e.kv_update(&b, &a, Bytes::from("x"), r1).await, ErrorKind::WrongRevision);
    assert_eq!(err.current_revision(), Some(r2));
    expect_kind(e.kv_create(&b, &a, Bytes::from("x")).await, ErrorKind::WrongRevision);
    let rc = e.kv_create(&b, &c, Bytes::from("c")).await.unwrap();
    let got = e.kv_get(&b, &a).await.unwrap().unwrap();
    assert_eq!((got.key.clone(), got.value.clone(), got.revision), (a.clone(), Bytes::from("2"), r2));
    assert_eq!(e.kv_get_revision(&b, &a, r1).await.unwrap().unwrap().value, "1");
    assert_eq!(e.kv_get_revision(&b, &a, rc).await.unwrap(), None, "another key's revision");
    // Storage holds neither clear key.
    let stored = raw.kv_keys(&b, "").await.unwrap();
    assert_eq!(stored.len(), 2);
    for k in &stored {
        assert!(!k.as_str().contains("alice") && !k.as_str().contains("carol"), "{k} is a clear key");
    }
    assert_eq!(raw.kv_get(&b, &a).await.unwrap(), None);
    // Listing returns the hashes, all of them; a prefix cannot be served.
    assert_eq!(e.kv_keys(&b, "").await.unwrap(), stored);
    assert_eq!(e.kv_keys_page(&b, "", None, 10).await.unwrap().keys, stored);
    expect_kind(e.kv_keys(&b, "alice").await, ErrorKind::Invalid);
    expect_kind(e.kv_keys_page(&b, "alice", None, 10).await, ErrorKind::Invalid);
    // Deletes, conditional deletes, purge and history by the clear key.
    expect_kind(e.kv_delete_if(&b, &a, r1).await, ErrorKind::WrongRevision);
    let rd = e.kv_delete_if(&b, &a, r2).await.unwrap();
    assert_eq!(e.kv_get(&b, &a).await.unwrap(), None);
    let history = e.kv_history(&b, &a).await.unwrap();
    let seen: Vec<_> = history.iter().map(|x| (x.key.clone(), x.revision, x.op)).collect();
    assert_eq!(seen, vec![(a.clone(), r1, KvOp::Put), (a.clone(), r2, KvOp::Put), (a.clone(), rd, KvOp::Delete)]);
    e.kv_put(&b, &a, Bytes::from("3")).await.unwrap();
    e.kv_delete(&b, &c).await.unwrap();
    e.kv_purge(&b, &a).await.unwrap();
    assert_eq!(e.kv_history(&b, &a).await.unwrap().len(), 1, "only the purge marker");
    assert!(e.kv_keys(&b, "").await.unwrap().is_empty());
}

/// A watch of a hashed bucket by a clear key sees that key only, named in
/// clear; a watch of everything sees the stored hashes.
pub async fn watch_one_hashed_key<H: SecureHarness>() {
    let h = H::start().await;
    let e = h.engine();
    let b = create(&*e, "b", encrypted_hashed(), 3).await;
    e.kv_put(&b, &key("card1"), Bytes::from("old")).await.unwrap();
    let mut one = e.kv_watch(&b, "card1", WatchStart::LatestValues).await.unwrap();
    let mut all = e.kv_watch(&b, "", WatchStart::New).await.unwrap();
    let x = next_entry(&mut one, "latest of card1").await;
    assert_eq!((x.key.as_str(), &x.value[..]), ("card1", &b"old"[..]));
    e.kv_put(&b, &key("card10"), Bytes::from("other")).await.unwrap();
    e.kv_put(&b, &key("card1"), Bytes::from("new")).await.unwrap();
    let x = next_entry(&mut one, "card1 changed").await;
    assert_eq!((x.key.as_str(), &x.value[..]), ("card1", &b"new"[..]), "card10 is another key, not in the watch");
    let first = next_entry(&mut all, "card10 in the watch of all").await;
    assert_eq!(first.value, "other");
    assert!(first.key.as_str() != "card10", "a watch of all shows stored keys");
    assert_eq!(next_entry(&mut all, "card1 in the watch of all").await.value, "new");
}

/// A bucket with `key_format = "pan"` accepts card numbers only: anything
/// else is `Invalid` with a message that never repeats the key.
pub async fn pan_keys_are_validated<H: SecureHarness>() {
    let h = H::start().await;
    let e = h.engine();
    let b = create(&*e, "cards", all_options(), 1).await;
    let pan = key("4111111111111111");
    e.kv_put(&b, &pan, Bytes::from("token-1")).await.unwrap();
    assert_eq!(e.kv_get(&b, &pan).await.unwrap().unwrap().value, "token-1");
    for bad in ["4111111111111112", "41111111", "4111x11111111111", "41111111111111111111"] {
        let k = key(bad);
        let err = expect_kind(e.kv_put(&b, &k, Bytes::from("v")).await, ErrorKind::Invalid);
        assert!(!err.to_string().contains(&bad[..6]), "the message shows the key: {err}");
        expect_kind(e.kv_get(&b, &k).await, ErrorKind::Invalid);
        expect_kind(e.kv_delete(&b, &k).await, ErrorKind::Invalid);
    }
}
