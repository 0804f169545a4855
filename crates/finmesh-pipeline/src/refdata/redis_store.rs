//! The Redis backend of [`RefStore`](super::RefStore) (feature `redis`).
//!
//! Layout under a prefix `p` (default `refdata`), for dataset `d` and a
//! version V written as whole microseconds (the score):
//! - `p:d:key:<key>`: a sorted set per row key, one member per version that
//!   has the key, scored by V; the member is V (8 bytes, big endian)
//!   followed by the value. The as-of query is the original design's
//!   `ZREVRANGEBYSCORE p:d:key:<key> V -inf LIMIT 0 1`, with V the resolved
//!   version, so members of newer or incomplete versions are never seen;
//! - `p:d:rows:V`: a hash `key → value` of version V (the source of
//!   snapshots, and the list of keys to remove when a partial load is redone);
//! - `p:d:versions`: a sorted set of the complete versions (member: V in
//!   decimal, score V), written last by a load: the "complete" marker.
//!
//! Rows are written with pipelines of [`LOAD_BATCH_ROWS`](super::LOAD_BATCH_ROWS)
//! rows (three commands each); batches go one after the other, so the last
//! duplicate of a key wins.
//!
//! Every command waits up to [`RESPONSE_TIMEOUT`] for its answer: a load's
//! pipeline of 3,072 commands, or a busy server, takes longer than
//! redis-rs's default of 500 ms, and a timed-out load would fail a run for
//! nothing. A server that does not answer at all is still an error.

use std::time::Duration;

use async_trait::async_trait;
use bytes::Bytes;
use finmesh_core::{Error, Result, Timestamp};
use redis::aio::{ConnectionManager, ConnectionManagerConfig};

use super::{
    LoadReport, RefRows, RefSnapshot, RefStore, check_dataset, check_key, next_batch, pinned_micros, version_micros,
};

/// How long a command (or a load's pipeline) may wait for Redis's answer.
pub const RESPONSE_TIMEOUT: Duration = Duration::from_secs(30);

/// Reference data in Redis (see the module doc for the layout).
#[derive(Clone)]
pub struct RedisRefStore {
    conn: ConnectionManager,
    prefix: String,
}

fn unavailable(e: redis::RedisError) -> Error {
    Error::unavailable(format!("redis: {e}")).with_source(e)
}

impl RedisRefStore {
    /// Connect to `url` (`redis://host:port`), keys under prefix `refdata`.
    pub async fn connect(url: &str) -> Result<Self> {
        Self::connect_with_prefix(url, "refdata").await
    }

    /// Connect to `url`, keys under `prefix`.
    pub async fn connect_with_prefix(url: &str, prefix: &str) -> Result<Self> {
        let client = redis::Client::open(url).map_err(|e| Error::invalid(format!("redis url: {e}")).with_source(e))?;
        let config = ConnectionManagerConfig::new().set_response_timeout(Some(RESPONSE_TIMEOUT));
        let conn = ConnectionManager::new_with_config(client, config).await.map_err(unavailable)?;
        Ok(RedisRefStore { conn, prefix: prefix.to_owned() })
    }

    /// A store over an existing connection manager.
    pub fn new(conn: ConnectionManager, prefix: impl Into<String>) -> Self {
        RedisRefStore { conn, prefix: prefix.into() }
    }

    fn versions_key(&self, dataset: &str) -> String {
        format!("{}:{dataset}:versions", self.prefix)
    }

    fn rows_key(&self, dataset: &str, us: u64) -> String {
        format!("{}:{dataset}:rows:{us}", self.prefix)
    }

    fn row_zset(&self, dataset: &str, key: &[u8]) -> Vec<u8> {
        let mut k = format!("{}:{dataset}:key:", self.prefix).into_bytes();
        k.extend_from_slice(key);
        k
    }

    async fn clear_partial(&self, dataset: &str, us: u64) -> Result<()> {
        let mut conn = self.conn.clone();
        let rows_key = self.rows_key(dataset, us);
        let keys: Vec<Vec<u8>> =
            redis::cmd("HKEYS").arg(&rows_key).query_async(&mut conn).await.map_err(unavailable)?;
        for chunk in keys.chunks(super::LOAD_BATCH_ROWS) {
            let mut pipe = redis::pipe();
            for k in chunk {
                pipe.cmd("ZREMRANGEBYSCORE").arg(self.row_zset(dataset, k)).arg(us).arg(us).ignore();
            }
            pipe.query_async::<()>(&mut conn).await.map_err(unavailable)?;
        }
        redis::cmd("DEL").arg(&rows_key).query_async::<()>(&mut conn).await.map_err(unavailable)
    }
}

#[async_trait]
impl RefStore for RedisRefStore {
    async fn load_version(&self, dataset: &str, version: Timestamp, rows: RefRows<'_>) -> Result<LoadReport> {
        check_dataset(dataset)?;
        let us = version_micros(version)?;
        if self.is_complete(dataset, version).await? {
            return Ok(LoadReport { rows: 0, already_complete: true });
        }
        self.clear_partial(dataset, us).await?;
        let mut conn = self.conn.clone();
        let rows_key = self.rows_key(dataset, us);
        let mut read = 0;
        while let Some(batch) = next_batch(rows, &mut read)? {
            let mut pipe = redis::pipe();
            for (key, value) in &batch {
                let zkey = self.row_zset(dataset, key.as_bytes());
                let mut member = Vec::with_capacity(8 + value.len());
                member.extend_from_slice(&us.to_be_bytes());
                member.extend_from_slice(value);
                pipe.cmd("HSET").arg(&rows_key).arg(key.as_bytes()).arg(&value[..]).ignore();
                pipe.cmd("ZREMRANGEBYSCORE").arg(&zkey).arg(us).arg(us).ignore();
                pipe.cmd("ZADD").arg(&zkey).arg(us).arg(member).ignore();
            }
            pipe.query_async::<()>(&mut conn).await.map_err(unavailable)?;
        }
        redis::cmd("ZADD")
            .arg(self.versions_key(dataset))
            .arg(us)
            .arg(us.to_string())
            .query_async::<()>(&mut conn)
            .await
            .map_err(unavailable)?;
        Ok(LoadReport { rows: read, already_complete: false })
    }

    async fn versions(&self, dataset: &str) -> Result<Vec<Timestamp>> {
        check_dataset(dataset)?;
        let mut conn = self.conn.clone();
        let members: Vec<String> = redis::cmd("ZRANGE")
            .arg(self.versions_key(dataset))
            .arg(0)
            .arg(-1)
            .query_async(&mut conn)
            .await
            .map_err(unavailable)?;
        Ok(members.iter().filter_map(|m| m.parse::<u64>().ok()).map(|us| Timestamp(us * 1000)).collect())
    }

    async fn is_complete(&self, dataset: &str, version: Timestamp) -> Result<bool> {
        check_dataset(dataset)?;
        let us = version_micros(version)?;
        let mut conn = self.conn.clone();
        let score: Option<f64> = redis::cmd("ZSCORE")
            .arg(self.versions_key(dataset))
            .arg(us.to_string())
            .query_async(&mut conn)
            .await
            .map_err(unavailable)?;
        Ok(score.is_some())
    }

    async fn resolve(&self, dataset: &str, pinned: Timestamp) -> Result<Option<Timestamp>> {
        check_dataset(dataset)?;
        let mut conn = self.conn.clone();
        let found: Vec<String> = redis::cmd("ZREVRANGEBYSCORE")
            .arg(self.versions_key(dataset))
            .arg(pinned_micros(pinned))
            .arg("-inf")
            .arg("LIMIT")
            .arg(0)
            .arg(1)
            .query_async(&mut conn)
            .await
            .map_err(unavailable)?;
        Ok(found.first().and_then(|m| m.parse::<u64>().ok()).map(|us| Timestamp(us * 1000)))
    }

    async fn snapshot(&self, dataset: &str, version: Timestamp) -> Result<RefSnapshot> {
        if !self.is_complete(dataset, version).await? {
            return Err(Error::not_found(format!(
                "version {} of dataset `{dataset}` is not loaded",
                version.as_nanos()
            )));
        }
        let us = version_micros(version)?;
        let rows_key = self.rows_key(dataset, us);
        let mut conn = self.conn.clone();
        let mut rows = std::collections::HashMap::new();
        let mut cursor = "0".to_owned();
        loop {
            let (next, items): (String, Vec<Vec<u8>>) = redis::cmd("HSCAN")
                .arg(&rows_key)
                .arg(&cursor)
                .arg("COUNT")
                .arg(1000)
                .query_async(&mut conn)
                .await
                .map_err(unavailable)?;
            let mut it = items.into_iter();
            while let (Some(k), Some(v)) = (it.next(), it.next()) {
                let k = String::from_utf8(k)
                    .map_err(|_| Error::internal(format!("redis hash `{rows_key}` has a key that is not UTF-8")))?;
                rows.insert(k, Bytes::from(v));
            }
            if next == "0" {
                break;
            }
            cursor = next;
        }
        Ok(RefSnapshot::new(dataset, version, rows))
    }

    async fn lookup_remote(&self, dataset: &str, key: &str, pinned: Timestamp) -> Result<Option<Bytes>> {
        check_key(key)?;
        let Some(version) = self.resolve(dataset, pinned).await? else { return Ok(None) };
        let us = version_micros(version)?;
        let mut conn = self.conn.clone();
        let found: Vec<Vec<u8>> = redis::cmd("ZREVRANGEBYSCORE")
            .arg(self.row_zset(dataset, key.as_bytes()))
            .arg(us)
            .arg("-inf")
            .arg("LIMIT")
            .arg(0)
            .arg(1)
            .query_async(&mut conn)
            .await
            .map_err(unavailable)?;
        // The newest member at or before the resolved version: the key's row
        // in that version if it has one, else an older version's (the key is
        // then absent as of `pinned`).
        Ok(found
            .into_iter()
            .next()
            .and_then(|m| (m.len() >= 8 && m[..8] == us.to_be_bytes()).then(|| Bytes::copy_from_slice(&m[8..]))))
    }
}
