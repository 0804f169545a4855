//! The in-memory index of a KV bucket's live values: key -> (revision,
//! created, value), so a get is one hash lookup and never touches storage.
//!
//! Why: a get through fjall costs two LSM point reads (the key's last
//! sequence, then the record), measured at p50 ≈ 16 µs with 1M keys; the
//! index answers in well under a microsecond. The cost is memory: each live
//! value is held once more (values written since the last flush share their
//! buffer with the memtable).
//!
//! Invariants:
//! - only the writer thread mutates the index, after the commit that made the
//!   change durable to its policy's level and before the ack is sent, so a
//!   get issued after an ack sees that write;
//! - the index holds exactly the keys whose latest entry is a `Put` still
//!   stored; deletes, purges and evictions (TTL, `max_bytes`) remove them;
//! - it is rebuilt at open by one sequential scan of the bucket's messages.

use std::collections::HashMap;
use std::hash::BuildHasher;

use bytes::Bytes;
use finmesh_core::{KvOp, Message, Seq, Timestamp};
use parking_lot::RwLock;

const SHARDS: usize = 16;

/// One live value.
#[derive(Debug, Clone)]
pub(crate) struct Latest {
    pub seq: Seq,
    pub created: Timestamp,
    pub value: Bytes,
}

pub(crate) struct KvIndex {
    /// Prefix of the bucket's subjects (`$KV.<bucket>.`), stripped to get keys.
    prefix: String,
    hasher: std::collections::hash_map::RandomState,
    /// Sharded so readers on different keys rarely meet the writer.
    shards: Box<[Shard]>,
}

type Shard = RwLock<HashMap<Box<str>, Latest>>;

impl KvIndex {
    pub fn new(prefix: String) -> Self {
        KvIndex {
            prefix,
            hasher: Default::default(),
            shards: (0..SHARDS).map(|_| RwLock::new(HashMap::new())).collect(),
        }
    }

    fn shard(&self, key: &str) -> &Shard {
        &self.shards[(self.hasher.hash_one(key) as usize) % SHARDS]
    }

    /// The live value of `key`.
    pub fn get(&self, key: &str) -> Option<Latest> {
        self.shard(key).read().get(key).cloned()
    }

    /// Account for a stored message of the bucket.
    pub fn stored(&self, m: &Message) {
        let Some(key) = m.subject.as_str().strip_prefix(&self.prefix) else { return };
        let mut shard = self.shard(key).write();
        match crate::kv::op_of(m) {
            KvOp::Put => {
                let latest = Latest { seq: m.seq, created: m.time, value: m.payload.clone() };
                shard.insert(key.into(), latest);
            }
            KvOp::Delete | KvOp::Purge => {
                shard.remove(key);
            }
        }
    }

    /// Account for a removed message: if it was the key's live value, drop it.
    pub fn removed(&self, seq: Seq, subject: &str) {
        let Some(key) = subject.strip_prefix(&self.prefix) else { return };
        let mut shard = self.shard(key).write();
        if shard.get(key).is_some_and(|l| l.seq == seq) {
            shard.remove(key);
        }
    }

    /// Number of live keys.
    #[cfg(test)]
    pub fn len(&self) -> usize {
        self.shards.iter().map(|s| s.read().len()).sum()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use finmesh_core::{Headers, Subject};

    fn msg(seq: u64, key: &str, op: Option<&str>, value: &'static [u8]) -> Message {
        let mut headers = Headers::new();
        if let Some(op) = op {
            headers.insert(crate::kv::OP_HEADER, op).unwrap();
        }
        Message {
            seq: Seq(seq),
            subject: Subject::new(format!("$KV.b.{key}")).unwrap(),
            headers,
            payload: Bytes::from_static(value),
            time: Timestamp(seq),
        }
    }

    #[test]
    fn tracks_puts_deletes_and_evictions() {
        let idx = KvIndex::new("$KV.b.".into());
        idx.stored(&msg(1, "a", None, b"1"));
        idx.stored(&msg(2, "a", None, b"2"));
        idx.stored(&msg(3, "c", None, b"3"));
        assert_eq!(idx.get("a").unwrap().seq, Seq(2));
        // Evicting an older revision leaves the live value alone.
        idx.removed(Seq(1), "$KV.b.a");
        assert_eq!(&idx.get("a").unwrap().value[..], b"2");
        idx.removed(Seq(3), "$KV.b.c");
        assert!(idx.get("c").is_none());
        idx.stored(&msg(4, "a", Some("DEL"), b""));
        assert!(idx.get("a").is_none());
        assert_eq!(idx.len(), 0);
    }
}
