//! KV buckets as standard JetStream KV buckets, so `nats kv` and every NATS
//! KV client read and write them.
//!
//! Layout (the NATS KV convention): bucket `b` is stream `KV_b` capturing
//! `$KV.b.>`; key `k` is subject `$KV.b.k`; a revision is the stream
//! sequence; `history` is `max_msgs_per_subject`; `ttl` is `max_age`;
//! delete writes an empty message with `KV-Operation: DEL`, purge one with
//! `KV-Operation: PURGE` and `Nats-Rollup: sub` (which removes the key's
//! older messages); `allow_direct`, `allow_rollup_hdrs`, `deny_delete` and
//! `discard: new` as NATS clients create them.
//!
//! Compare-and-set uses `Nats-Expected-Last-Subject-Sequence`: the server
//! refuses the write with error 10071 whose description carries the key's
//! current revision, which becomes `WrongRevision`'s current revision.
//! `max_value_size` is checked by the engine on the value alone and kept in
//! the stream metadata `finmesh.max_value_size`; the server's `max_msg_size`
//! is 256 bytes higher, because NATS counts the compare-and-set headers too.
//! `security` and `metadata` live in the same map (`metadata.rs`).
//!
//! Reads of a key's latest entry use a direct get (`DIRECT.GET`, the
//! message as it is stored, no JSON), which any replica may answer. A
//! follower may not have applied the latest write yet, and a read after an
//! acked write must see it. nats-server 2.15 offers no way to ask a replica
//! to be up to date (`min_last_seq`, proposed in nats-architecture-and-design
//! PR #358, was removed before 2.12 shipped: the server ignores the field;
//! measured with a lagging node), so the engine checks the answer itself:
//! per bucket with more than one replica it keeps [`Watermarks`], the
//! highest revision it wrote or read for each key (by a 64-bit hash of the
//! key: 16 bytes plus hash-table overhead per key written or read through
//! this engine; a hash collision only costs a leader read). A direct get
//! whose answer is older than the key's watermark (or absent while the
//! watermark is set) is repeated as `STREAM.MSG.GET`, which the leader
//! answers. So reads through one engine see its own writes and never go
//! back in time for a key; a write made through another connection is seen
//! once the answering replica has applied it (eventual, usually within a
//! millisecond). A read at a revision is immutable data: any replica that
//! has it answers, and one that does not yet sends the read to the leader.

use bytes::Bytes;
use finmesh_core::{
    BucketConfig, BucketInfo, BucketName, Error, ErrorKind, Headers, Key, KeysPage, KvEntry, KvOp, Message,
    OutgoingMessage, Result, Revision, Seq, Subject, SubjectPattern,
};
use serde_json::{Value, json};
use std::collections::HashMap;
use std::sync::Arc;

use crate::Inner;
use crate::streams::KV_PREFIX;

const META_MAX_VALUE_SIZE: &str = "finmesh.max_value_size";
const HEADER_SLACK: u32 = 256;
const OP_HEADER: &str = "KV-Operation";
const EXPECTED_HEADER: &str = "Nats-Expected-Last-Subject-Sequence";

/// `KV_<bucket>`.
pub(crate) fn stream_name(b: &BucketName) -> String {
    format!("{KV_PREFIX}{b}")
}

/// `$KV.<bucket>.`
pub(crate) fn subject_prefix(b: &BucketName) -> String {
    format!("$KV.{b}.")
}

fn key_subject(b: &BucketName, k: &Key) -> Result<Subject> {
    Subject::new(format!("$KV.{b}.{k}"))
}

/// A KV entry from a message of the bucket's stream.
pub(crate) fn entry_from(prefix: &str, m: Message) -> Result<KvEntry> {
    let key = m
        .subject
        .as_str()
        .strip_prefix(prefix)
        .ok_or_else(|| Error::internal(format!("subject `{}` is not a key of this bucket", m.subject)))?;
    let op = match m.headers.get(OP_HEADER) {
        Some("DEL") => KvOp::Delete,
        Some("PURGE") => KvOp::Purge,
        _ => KvOp::Put,
    };
    let value = if op == KvOp::Put { m.payload } else { Bytes::new() };
    Ok(KvEntry { key: Key::new(key)?, value, revision: Revision(m.seq.0), created: m.time, op })
}

fn nats_config(c: &BucketConfig) -> Value {
    let two_minutes = std::time::Duration::from_secs(120);
    let window = c.ttl.map_or(two_minutes, |t| t.min(two_minutes));
    let mut v = json!({
        "name": format!("{KV_PREFIX}{}", c.name),
        "subjects": [format!("$KV.{}.>", c.name)],
        "retention": "limits",
        "storage": "file",
        "discard": "new",
        "max_consumers": -1,
        "max_msgs": -1,
        "max_bytes": c.max_bytes.map_or(-1, |n| n.min(i64::MAX as u64) as i64),
        "max_msgs_per_subject": c.history,
        "max_age": c.ttl.map_or(0, crate::streams::nanos),
        "duplicate_window": crate::streams::nanos(window),
        "num_replicas": c.replicas,
        "allow_rollup_hdrs": true,
        "deny_delete": true,
        "allow_direct": true,
    });
    let mut own = Vec::new();
    if let Some(size) = c.max_value_size {
        v["max_msg_size"] = json!(size.saturating_add(HEADER_SLACK).min(i32::MAX as u32));
        own.push((META_MAX_VALUE_SIZE, size.to_string()));
    }
    if let Some(m) = crate::metadata::encode(&own, &c.security.options(), &c.metadata) {
        v["metadata"] = m;
    }
    v
}

fn bucket_info(inner: &Inner, info: &async_nats::jetstream::stream::Info) -> Result<BucketInfo> {
    let c = &info.config;
    let name = c.name.strip_prefix(KV_PREFIX).ok_or_else(|| Error::internal("not a KV stream"))?;
    let max_value_size = match c.metadata.get(META_MAX_VALUE_SIZE) {
        Some(v) => v.parse().ok(),
        None if c.max_message_size > 0 => Some(c.max_message_size as u32),
        None => None,
    };
    let config = BucketConfig {
        name: BucketName::new(name)?,
        history: c.max_messages_per_subject.clamp(1, 64) as u8,
        ttl: (!c.max_age.is_zero()).then_some(c.max_age),
        max_value_size,
        max_bytes: (c.max_bytes > 0).then_some(c.max_bytes as u64),
        sync: inner.options.server_sync,
        replicas: c.num_replicas.clamp(1, 5) as u8,
        security: crate::metadata::bucket_security(&c.metadata, &format!("bucket `{name}`"))?,
        metadata: crate::metadata::user(&c.metadata),
    };
    Ok(BucketInfo {
        config,
        entries: info.state.messages,
        bytes: info.state.bytes,
        last_revision: Revision(info.state.last_sequence),
    })
}

fn not_found(b: &BucketName) -> Error {
    Error::not_found(format!("bucket `{b}` not found"))
}

/// What reads and writes need to know about a bucket (cached per engine).
#[derive(Debug, Clone)]
pub(crate) struct BucketMeta {
    /// Largest value accepted.
    pub limit: u32,
    /// Replicas of its stream.
    pub replicas: u8,
    /// Highest revision this engine wrote or read, per key (kept only for
    /// buckets with more than one replica).
    pub seen: Arc<Watermarks>,
}

/// The highest revision written or read per key, by a 64-bit hash of the
/// key (two keys with the same hash share an entry, which only costs an
/// extra leader read); see the module doc.
pub(crate) struct Watermarks {
    hasher: std::hash::RandomState,
    revs: parking_lot::Mutex<HashMap<u64, u64>>,
}

impl std::fmt::Debug for Watermarks {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Watermarks")
    }
}

impl Watermarks {
    fn new() -> Self {
        Watermarks { hasher: std::hash::RandomState::new(), revs: parking_lot::Mutex::new(HashMap::new()) }
    }

    fn hash(&self, key: &Key) -> u64 {
        use std::hash::BuildHasher as _;
        self.hasher.hash_one(key.as_str())
    }

    /// Note that `key` is at least at `rev` (written or read).
    fn saw(&self, key: &Key, rev: u64) {
        let h = self.hash(key);
        let mut revs = self.revs.lock();
        let e = revs.entry(h).or_insert(0);
        *e = (*e).max(rev);
    }

    /// Whether an answer for `key` at `rev` (`None`: no entry) is at least
    /// as new as everything this engine wrote or read for it.
    fn fresh(&self, key: &Key, rev: Option<u64>) -> bool {
        let h = self.hash(key);
        rev.unwrap_or(0) >= self.revs.lock().get(&h).copied().unwrap_or(0)
    }
}

impl BucketMeta {
    fn new(info: &BucketInfo) -> Self {
        BucketMeta {
            limit: info.config.value_size_limit(),
            replicas: info.config.replicas,
            seen: Arc::new(Watermarks::new()),
        }
    }
}

impl Inner {
    fn remember_bucket(&self, info: &BucketInfo) {
        let mut meta = BucketMeta::new(info);
        let mut buckets = self.buckets.lock();
        if let Some(known) = buckets.get(info.config.name.as_str()) {
            // Keep the watermarks: a refresh must not weaken later reads.
            meta.seen = known.seen.clone();
        }
        buckets.insert(info.config.name.to_string(), meta);
    }

    /// The bucket's cached facts; `NotFound` if the bucket does not exist.
    pub(crate) async fn bucket_meta(&self, b: &BucketName) -> Result<BucketMeta> {
        if let Some(m) = self.buckets.lock().get(b.as_str()) {
            return Ok(m.clone());
        }
        let info = self.bucket_info(b).await?;
        self.remember_bucket(&info);
        Ok(self.buckets.lock().get(b.as_str()).cloned().unwrap_or_else(|| BucketMeta::new(&info)))
    }

    /// The bucket's value size limit; `NotFound` if the bucket does not exist.
    pub(crate) async fn bucket_limit(&self, b: &BucketName) -> Result<u32> {
        Ok(self.bucket_meta(b).await?.limit)
    }

    pub(crate) async fn create_bucket(&self, config: BucketConfig) -> Result<BucketInfo> {
        config.validate()?;
        let name = stream_name(&config.name);
        let what = format!("create bucket `{}`", config.name);
        let info = self.config_request(&format!("STREAM.CREATE.{name}"), &nats_config(&config), &what).await?;
        let info = bucket_info(self, &info)?;
        self.remember_bucket(&info);
        Ok(info)
    }

    pub(crate) async fn update_bucket(&self, config: BucketConfig) -> Result<BucketInfo> {
        config.validate()?;
        // Security options are fixed at creation (finmesh_core::options);
        // they never change, so no update can race this check into a change.
        let old = self.bucket_info(&config.name).await?.config;
        finmesh_core::options::check_security_unchanged(
            &format!("bucket `{}`", config.name),
            &old.security.options(),
            &config.security.options(),
        )?;
        let name = stream_name(&config.name);
        let what = format!("update bucket `{}`", config.name);
        let info = self.config_request(&format!("STREAM.UPDATE.{name}"), &nats_config(&config), &what).await;
        let info = bucket_info(
            self,
            &info.map_err(|e| if e.kind() == ErrorKind::NotFound { not_found(&config.name) } else { e })?,
        )?;
        self.remember_bucket(&info);
        Ok(info)
    }

    pub(crate) async fn bucket_info(&self, b: &BucketName) -> Result<BucketInfo> {
        let info = self
            .raw_stream_info(&stream_name(b))
            .await
            .map_err(|e| if e.kind() == ErrorKind::NotFound { not_found(b) } else { e })?;
        let info = bucket_info(self, &info)?;
        self.remember_bucket(&info);
        Ok(info)
    }

    pub(crate) async fn list_buckets(&self) -> Result<Vec<BucketName>> {
        let mut names: Vec<BucketName> = self
            .all_stream_names()
            .await?
            .into_iter()
            .filter_map(|n| n.strip_prefix(KV_PREFIX).and_then(|b| BucketName::new(b).ok()))
            .collect();
        names.sort();
        Ok(names)
    }

    pub(crate) async fn delete_bucket(&self, b: &BucketName) -> Result<()> {
        self.buckets.lock().remove(b.as_str());
        let name = stream_name(b);
        let r: Result<Value> =
            self.request(&format!("STREAM.DELETE.{name}"), &json!({}), &format!("delete bucket `{b}`")).await;
        self.buckets.lock().remove(b.as_str());
        r.map(|_| ()).map_err(|e| if e.kind() == ErrorKind::NotFound { not_found(b) } else { e })
    }

    /// The latest entry of `k`, markers included.
    async fn kv_last(&self, b: &BucketName, k: &Key) -> Result<Option<KvEntry>> {
        let meta = self.bucket_meta(b).await?;
        let subject = key_subject(b, k)?;
        let stream = stream_name(b);
        // Any failure of the direct get (a bucket deleted behind the cache:
        // no responders) and any answer older than what this engine wrote
        // or read for the key falls through to the API get, which the
        // leader answers (or says what is wrong).
        let direct = match self.direct_last(&stream, &subject).await {
            Ok(m) if meta.replicas == 1 || meta.seen.fresh(k, m.as_ref().map(|m| m.seq.0)) => Some(m),
            _ => None,
        };
        let m = match direct {
            Some(m) => m,
            None => self.msg_get(&stream, &json!({ "last_by_subj": subject.as_str() })).await?,
        };
        if let Some(m) = &m
            && meta.replicas > 1
        {
            meta.seen.saw(k, m.seq.0);
        }
        m.map(|m| entry_from(&subject_prefix(b), m)).transpose()
    }

    pub(crate) async fn kv_get(&self, b: &BucketName, k: &Key) -> Result<Option<KvEntry>> {
        Ok(self.kv_last(b, k).await?.filter(|e| e.op == KvOp::Put))
    }

    pub(crate) async fn kv_get_revision(&self, b: &BucketName, k: &Key, rev: Revision) -> Result<Option<KvEntry>> {
        self.bucket_limit(b).await?;
        if rev.0 == 0 {
            return Ok(None);
        }
        let subject = key_subject(b, k)?;
        let stream = stream_name(b);
        // Any replica holding `rev` may answer; one that does not have it
        // (yet) sends the read to the leader. See the module doc.
        let m = match self.direct_get(&stream, &json!({ "seq": rev.0 })).await {
            Ok(Some(m)) => Some(m),
            _ => self.msg_get(&stream, &json!({ "seq": rev.0 })).await?,
        };
        match m {
            Some(m) if m.subject == subject => entry_from(&subject_prefix(b), m).map(Some),
            _ => Ok(None),
        }
    }

    /// Write to `k` with `headers`; checks the value size first.
    async fn kv_write(&self, b: &BucketName, k: &Key, value: Bytes, headers: Headers) -> Result<Revision> {
        let limit = self.bucket_limit(b).await?;
        if value.len() > limit as usize {
            return Err(Error::too_large(format!(
                "value of {} bytes exceeds bucket `{b}`'s limit of {limit} bytes",
                value.len()
            )));
        }
        let msg = OutgoingMessage { subject: key_subject(b, k)?, headers, payload: value };
        let ack = self.send_one(&stream_name(b), &msg).await?;
        if let Some(meta) = self.buckets.lock().get(b.as_str())
            && meta.replicas > 1
        {
            meta.seen.saw(k, ack.sequence);
        }
        Ok(Revision(ack.sequence))
    }

    pub(crate) async fn kv_put(&self, b: &BucketName, k: &Key, value: Bytes) -> Result<Revision> {
        self.kv_write(b, k, value, Headers::new()).await
    }

    pub(crate) async fn kv_update(
        &self,
        b: &BucketName,
        k: &Key,
        value: Bytes,
        expected: Revision,
    ) -> Result<Revision> {
        let mut h = Headers::new();
        h.insert(EXPECTED_HEADER, expected.0.to_string())?;
        self.kv_write(b, k, value, h).await
    }

    pub(crate) async fn kv_create(&self, b: &BucketName, k: &Key, value: Bytes) -> Result<Revision> {
        let limit = self.bucket_limit(b).await?;
        if value.len() > limit as usize {
            return Err(Error::too_large(format!("value of {} bytes exceeds the limit of {limit} bytes", value.len())));
        }
        let mut attempts = 0;
        loop {
            attempts += 1;
            let expected = match self.kv_last(b, k).await? {
                Some(e) if e.op == KvOp::Put => {
                    return Err(Error::wrong_revision(e.revision, format!("key `{k}` exists")));
                }
                Some(marker) => marker.revision,
                None => Revision(0),
            };
            match self.kv_update(b, k, value.clone(), expected).await {
                Err(e) if e.kind() == ErrorKind::WrongRevision && attempts < 5 => continue,
                r => return r,
            }
        }
    }

    /// A delete (or purge) marker, only at the `expected` latest revision if given.
    pub(crate) async fn kv_marker(
        &self,
        b: &BucketName,
        k: &Key,
        purge: bool,
        expected: Option<Revision>,
    ) -> Result<Revision> {
        let mut h = Headers::new();
        h.insert(OP_HEADER, if purge { "PURGE" } else { "DEL" })?;
        if purge {
            h.insert("Nats-Rollup", "sub")?;
        }
        if let Some(expected) = expected {
            h.insert(EXPECTED_HEADER, expected.0.to_string())?;
        }
        self.kv_write(b, k, Bytes::new(), h).await
    }

    /// Keys whose latest entry is a put, read as the last entry per key
    /// (through [`Inner::last_per_subject_checked`], so a lagging replica
    /// is brought up to date by the leader on a replicated bucket).
    pub(crate) async fn kv_keys(&self, b: &BucketName, prefix: &str) -> Result<Vec<Key>> {
        self.live_keys(b, prefix, None).await
    }

    /// A page of [`kv_keys`](Self::kv_keys). JetStream has no ordered key
    /// listing: the engine reads the last entry (headers only) of every key
    /// under the prefix's complete tokens (`$KV.<b>.<tokens>.>`, so prefix
    /// `cards.eu.1` reads only `cards.eu.*` keys), keeps the live keys after
    /// the cursor, sorts and cuts. Each page costs a read of every key
    /// under those tokens, and memory for them (docs/nats.md).
    pub(crate) async fn kv_keys_page(
        &self,
        b: &BucketName,
        prefix: &str,
        after: Option<&Key>,
        limit: usize,
    ) -> Result<KeysPage> {
        let limit = finmesh_core::engine::keys_page_limit(limit)?;
        Ok(KeysPage::cut(self.live_keys(b, prefix, after).await?, None, limit))
    }

    /// Live keys starting with `prefix` and after `after`, sorted.
    async fn live_keys(&self, b: &BucketName, prefix: &str, after: Option<&Key>) -> Result<Vec<Key>> {
        let meta = self.bucket_meta(b).await?;
        let sp = subject_prefix(b);
        // The prefix's complete tokens narrow the server's filter; a prefix
        // no key can have (bad characters, too long) falls back to all keys.
        let tokens = prefix.rfind('.').map_or("", |i| &prefix[..=i]);
        let filter =
            SubjectPattern::new(format!("{sp}{tokens}>")).or_else(|_| SubjectPattern::new(format!("{sp}>")))?;
        let cfg = json!({ "headers_only": true });
        let mut keys = Vec::new();
        for m in self.last_per_subject_checked(&stream_name(b), meta.replicas > 1, &filter, cfg).await? {
            let e = entry_from(&sp, m)?;
            if e.op == KvOp::Put && e.key.as_str().starts_with(prefix) && after.is_none_or(|a| &e.key > a) {
                keys.push(e.key);
            }
        }
        keys.sort();
        Ok(keys)
    }

    /// Every entry the bucket keeps for a key, oldest first. On a
    /// replicated bucket the consumer's replica may lag, so the entries the
    /// leader has after its newest are read from the leader
    /// ([`Inner::read_after`]) and appended; the leader has then applied
    /// what the replica had not yet: a purge removed every entry before it,
    /// and the bucket's `history` keeps only the newest entries.
    pub(crate) async fn kv_history(&self, b: &BucketName, k: &Key) -> Result<Vec<KvEntry>> {
        let meta = self.bucket_meta(b).await?;
        let subject = key_subject(b, k)?;
        let stream = stream_name(b);
        let cfg = json!({ "deliver_policy": "all", "filter_subject": subject.as_str() });
        let mut msgs = self.snapshot(&stream, cfg, usize::MAX).await?;
        let newest = msgs.last().map_or(Seq(0), |m| m.seq);
        let newer = if meta.replicas > 1 {
            self.read_after(&stream, newest, &SubjectPattern::new(subject.as_str())?).await?
        } else {
            Vec::new()
        };
        let caught_up = !newer.is_empty();
        msgs.extend(newer);
        let sp = subject_prefix(b);
        let entries = msgs.into_iter().map(|m| entry_from(&sp, m)).collect::<Result<Vec<_>>>()?;
        if !caught_up {
            return Ok(entries);
        }
        // The history setting as the bucket has it now (rare path: one more
        // request rather than trusting a cached config).
        let history = self.bucket_info(b).await?.config.history;
        Ok(as_the_leader_keeps(entries, history))
    }
}

/// A key's entries (oldest first; a lagging replica's followed by the
/// leader's newer ones) as the leader keeps them: nothing before the last
/// purge (its rollup removed it), and only the newest `history`.
fn as_the_leader_keeps(mut entries: Vec<KvEntry>, history: u8) -> Vec<KvEntry> {
    if let Some(purge) = entries.iter().rposition(|e| e.op == KvOp::Purge) {
        entries.drain(..purge);
    }
    entries.drain(..entries.len().saturating_sub(usize::from(history)));
    entries
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(revision: u64, op: KvOp) -> KvEntry {
        KvEntry {
            key: Key::new("k").unwrap(),
            value: Bytes::new(),
            revision: Revision(revision),
            created: finmesh_core::Timestamp(0),
            op,
        }
    }

    fn revisions(entries: &[KvEntry]) -> Vec<u64> {
        entries.iter().map(|e| e.revision.0).collect()
    }

    #[test]
    fn a_caught_up_history_drops_what_a_purge_removed_and_keeps_the_newest() {
        let put = |r| entry(r, KvOp::Put);
        // Four from the replica and two newer from the leader, history 5.
        let kept = as_the_leader_keeps((1..=6).map(put).collect(), 5);
        assert_eq!(revisions(&kept), vec![2, 3, 4, 5, 6]);
        // A purge among the newer ones: only it and what follows.
        let mut entries: Vec<KvEntry> = (1..=3).map(put).collect();
        entries.push(entry(4, KvOp::Purge));
        entries.push(put(5));
        assert_eq!(revisions(&as_the_leader_keeps(entries, 5)), vec![4, 5]);
        // Deletes are entries like puts.
        let entries = vec![put(1), entry(2, KvOp::Delete), put(3)];
        assert_eq!(revisions(&as_the_leader_keeps(entries, 2)), vec![2, 3]);
    }

    #[test]
    fn as_the_leader_keeps_leaves_a_short_history_alone() {
        let entries = vec![entry(7, KvOp::Put), entry(9, KvOp::Delete)];
        assert_eq!(revisions(&as_the_leader_keeps(entries, 64)), vec![7, 9]);
    }
}
