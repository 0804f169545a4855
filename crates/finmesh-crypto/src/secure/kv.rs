//! The KV half of [`SecureEngine`]: keys mapped to their stored form, values
//! sealed on the way in and opened on the way out (the rules are in the
//! parent module's doc).

use std::sync::Arc;

use async_trait::async_trait;
use bytes::Bytes;
use finmesh_core::{
    BoxStream, BucketConfig, BucketInfo, BucketName, Error, Key, KeysPage, KvEngine, KvEntry, KvOp, Result, Revision,
    SecurityOption, WatchStart,
};
use futures::StreamExt;

use super::{Policy, SecureEngine, check_format, enforces};
use crate::{hash_key, hash_key_candidates};

impl SecureEngine {
    /// `entry` as the client sees it: the value opened (puts of a sealed
    /// bucket) and the key named `clear` (when the caller asked by it).
    async fn reveal(
        &self,
        bucket: &BucketName,
        policy: &Policy,
        mut entry: KvEntry,
        clear: Option<&Key>,
    ) -> Result<KvEntry> {
        if policy.sealed() && entry.op == KvOp::Put {
            entry.value = self.open(bucket, &entry.key, entry.revision, &entry.value).await?;
        }
        if let Some(k) = clear {
            entry.key = k.clone();
        }
        Ok(entry)
    }

    fn refuse_prefix(&self, bucket: &BucketName, policy: &Policy, prefix: &str) -> Result<()> {
        if policy.hashed() && !prefix.is_empty() {
            return Err(Error::invalid(format!(
                "bucket `{bucket}` stores keys as keyed hashes, which cannot be listed by prefix; list all keys \
                 (the hashes) with an empty prefix"
            )));
        }
        Ok(())
    }
}

#[async_trait]
impl KvEngine for SecureEngine {
    async fn create_bucket(&self, config: BucketConfig) -> Result<BucketInfo> {
        let inner = self.to_inner(config)?;
        let info = self.inner.create_bucket(inner).await?;
        Ok(self.to_user(info))
    }

    async fn update_bucket(&self, config: BucketConfig) -> Result<BucketInfo> {
        let inner = self.to_inner(config)?;
        let info = self.inner.update_bucket(inner).await?;
        Ok(self.to_user(info))
    }

    async fn bucket_info(&self, bucket: &BucketName) -> Result<BucketInfo> {
        let info = self.inner.bucket_info(bucket).await?;
        Ok(self.to_user(info))
    }

    async fn list_buckets(&self) -> Result<Vec<BucketName>> {
        let mut names = self.inner.list_buckets().await?;
        names.retain(|b| !b.is_reserved());
        Ok(names)
    }

    async fn delete_bucket(&self, bucket: &BucketName) -> Result<()> {
        let out = self.inner.delete_bucket(bucket).await;
        self.forget(bucket);
        out
    }

    async fn kv_get(&self, bucket: &BucketName, key: &Key) -> Result<Option<KvEntry>> {
        let policy = self.policy(bucket).await?;
        if !policy.hashed() {
            // The hot path of a bucket with clear keys: one get, no copies
            // of the key.
            check_format(&policy, key)?;
            return match self.inner.kv_get(bucket, key).await? {
                Some(entry) => Ok(Some(self.reveal(bucket, &policy, entry, None).await?)),
                None => Ok(None),
            };
        }
        // The active hashing key's stored key first, on its own: nearly
        // every key lives there; the others are computed only on a miss.
        check_format(&policy, key)?;
        let ring = self.keys.ring();
        let active = hash_key(&ring, bucket, key.as_str())?;
        if let Some(entry) = self.inner.kv_get(bucket, &active).await? {
            return Ok(Some(self.reveal(bucket, &policy, entry, Some(key)).await?));
        }
        for stored in hash_key_candidates(&ring, bucket, key.as_str())?.into_iter().skip(1) {
            if let Some(entry) = self.inner.kv_get(bucket, &stored).await? {
                return Ok(Some(self.reveal(bucket, &policy, entry, Some(key)).await?));
            }
        }
        Ok(None)
    }

    async fn kv_get_revision(&self, bucket: &BucketName, key: &Key, revision: Revision) -> Result<Option<KvEntry>> {
        let policy = self.policy(bucket).await?;
        for stored in self.candidates(bucket, &policy, key)? {
            if let Some(entry) = self.inner.kv_get_revision(bucket, &stored, revision).await? {
                return Ok(Some(self.reveal(bucket, &policy, entry, Some(key)).await?));
            }
        }
        Ok(None)
    }

    async fn kv_put(&self, bucket: &BucketName, key: &Key, value: Bytes) -> Result<Revision> {
        let policy = self.policy(bucket).await?;
        let stored = self.stored_key(bucket, &policy, key).await?;
        let value = self.seal(bucket, &policy, &stored, value)?;
        self.inner.kv_put(bucket, &stored, value).await
    }

    async fn kv_create(&self, bucket: &BucketName, key: &Key, value: Bytes) -> Result<Revision> {
        let policy = self.policy(bucket).await?;
        let stored = self.stored_key(bucket, &policy, key).await?;
        let value = self.seal(bucket, &policy, &stored, value)?;
        self.inner.kv_create(bucket, &stored, value).await
    }

    async fn kv_update(&self, bucket: &BucketName, key: &Key, value: Bytes, expected: Revision) -> Result<Revision> {
        let policy = self.policy(bucket).await?;
        let stored = self.stored_key(bucket, &policy, key).await?;
        let value = self.seal(bucket, &policy, &stored, value)?;
        self.inner.kv_update(bucket, &stored, value, expected).await
    }

    async fn kv_delete(&self, bucket: &BucketName, key: &Key) -> Result<Revision> {
        let policy = self.policy(bucket).await?;
        let stored = self.stored_key(bucket, &policy, key).await?;
        self.inner.kv_delete(bucket, &stored).await
    }

    async fn kv_delete_if(&self, bucket: &BucketName, key: &Key, expected: Revision) -> Result<Revision> {
        let policy = self.policy(bucket).await?;
        let stored = self.stored_key(bucket, &policy, key).await?;
        self.inner.kv_delete_if(bucket, &stored, expected).await
    }

    async fn kv_purge(&self, bucket: &BucketName, key: &Key) -> Result<Revision> {
        let policy = self.policy(bucket).await?;
        let stored = self.stored_key(bucket, &policy, key).await?;
        self.inner.kv_purge(bucket, &stored).await
    }

    async fn kv_keys(&self, bucket: &BucketName, prefix: &str) -> Result<Vec<Key>> {
        let policy = self.policy(bucket).await?;
        self.refuse_prefix(bucket, &policy, prefix)?;
        self.inner.kv_keys(bucket, prefix).await
    }

    async fn kv_keys_page(
        &self,
        bucket: &BucketName,
        prefix: &str,
        after: Option<&Key>,
        limit: usize,
    ) -> Result<KeysPage> {
        let policy = self.policy(bucket).await?;
        self.refuse_prefix(bucket, &policy, prefix)?;
        self.inner.kv_keys_page(bucket, prefix, after, limit).await
    }

    fn supports_security(&self, option: SecurityOption) -> bool {
        enforces(option) || self.inner.supports_security(option)
    }

    async fn kv_history(&self, bucket: &BucketName, key: &Key) -> Result<Vec<KvEntry>> {
        let policy = self.policy(bucket).await?;
        for stored in self.candidates(bucket, &policy, key)? {
            let entries = self.inner.kv_history(bucket, &stored).await?;
            if entries.is_empty() {
                continue;
            }
            let mut out = Vec::with_capacity(entries.len());
            for e in entries {
                out.push(self.reveal(bucket, &policy, e, Some(key)).await?);
            }
            return Ok(out);
        }
        Ok(Vec::new())
    }

    async fn kv_watch(&self, bucket: &BucketName, prefix: &str, start: WatchStart) -> Result<BoxStream<KvEntry>> {
        let policy = self.policy(bucket).await?;
        let (inner_prefix, clear) = if policy.hashed() && !prefix.is_empty() {
            // One whole clear key (see the module doc).
            let key = Key::new(prefix).map_err(|_| {
                Error::invalid(format!(
                    "bucket `{bucket}` stores keys as keyed hashes: a watch prefix is taken as one whole key, and \
                     this one is not a valid key"
                ))
            })?;
            let stored = self.stored_key(bucket, &policy, &key).await?;
            (stored.as_str().to_owned(), Some(key))
        } else {
            (prefix.to_owned(), None)
        };
        let changes = self.inner.kv_watch(bucket, &inner_prefix, start).await?;
        if !policy.sealed() && clear.is_none() {
            return Ok(changes);
        }
        let opener = Opener { keys: self.keys.clone(), bucket: bucket.clone(), policy, clear };
        let opener = Arc::new(opener);
        Ok(Box::pin(changes.then(move |change| {
            let opener = opener.clone();
            async move { opener.reveal(change?).await }
        })))
    }
}

/// What a watch needs to reveal entries after the call that started it
/// returned (the stream outlives the borrow of the wrapper).
struct Opener {
    keys: Arc<crate::RingStore>,
    bucket: BucketName,
    policy: Policy,
    clear: Option<Key>,
}

impl Opener {
    async fn reveal(&self, mut entry: KvEntry) -> Result<KvEntry> {
        if self.policy.sealed() && entry.op == KvOp::Put {
            entry.value = super::open_with(&self.keys, &self.bucket, &entry.key, entry.revision, &entry.value).await?;
        }
        if let Some(k) = &self.clear {
            entry.key = k.clone();
        }
        Ok(entry)
    }
}
