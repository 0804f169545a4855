//! KV buckets on top of streams, as JetStream does it: bucket `b` is the
//! stream `KV_b` capturing `$KV.b.>`; key `k` is subject `$KV.b.k`; a
//! revision is the stream sequence; `history` is `max_msgs_per_subject`;
//! `ttl` is `max_age`. Delete and purge are messages with a `KV-Operation`
//! header (`DEL`, `PURGE`); purge also rolls up the key's older entries.
//!
//! Values live on disk: the engine holds no KV value or key in memory
//! beyond a bounded hot-value cache per bucket (`kvcache.rs`,
//! `EmbeddedOptions::kv_cache_bytes`); fjall's block cache
//! (`EmbeddedOptions::cache_bytes`) and the OS page cache keep the rest of
//! the hot set, so memory does not grow with the bucket.
//!
//! Invariants: a get is served by the hot-value cache, or reads two point
//! lookups (`l` for the key's last sequence, `m` for the record) and never
//! scans, except when the key's
//! last write is committed but not yet visible (an `always` write waiting
//! for its fsync): then it takes the newer of the key's last visible
//! revision in its index and the value that write replaced, which the
//! handle keeps in memory until the write is revealed
//! (`StreamHandle::replaced`). So no get sees a write before it is
//! durable, and none finds a key without a value while one write replaces
//! another. A key listing page is
//! one range scan of `l` from the cursor (or the prefix) that stops after
//! `limit + 1` live keys: its cost follows the page and the dead keys
//! (deleted, purged, expired) it steps over, not the bucket's size.

use std::time::Duration;

use bytes::Bytes;
use finmesh_core::{
    BucketConfig, BucketInfo, BucketName, Error, Key, KeysPage, KvEntry, KvOp, Message, OutgoingMessage, Result,
    Revision, Seq, StreamConfig, StreamName, Subject, SubjectPattern, Timestamp,
};

use crate::codec;
use crate::kvcache;
use crate::store::{StreamHandle, storage};

/// Header carrying a marker's operation.
pub(crate) const OP_HEADER: &str = "KV-Operation";

pub(crate) fn stream_name(bucket: &BucketName) -> StreamName {
    StreamName::new(format!("KV_{bucket}")).expect("bucket names are at most 61 characters")
}

pub(crate) fn subject(bucket: &BucketName, key: &Key) -> Subject {
    Subject::new(format!("$KV.{bucket}.{key}")).expect("keys are valid subject tokens")
}

/// The subject of `key` as a plain string, for lookups: both names are
/// valid already, so this skips `Subject`'s checks (the get path).
fn subject_str(bucket: &BucketName, key: &Key) -> String {
    let (b, k) = (bucket.as_str(), key.as_str());
    let mut s = String::with_capacity(5 + b.len() + k.len());
    s.push_str("$KV.");
    s.push_str(b);
    s.push('.');
    s.push_str(k);
    s
}

pub(crate) fn key_prefix(bucket: &BucketName) -> String {
    format!("$KV.{bucket}.")
}

/// The backing stream's configuration for a bucket.
pub(crate) fn stream_config(b: &BucketConfig) -> StreamConfig {
    let mut c = StreamConfig::new(
        stream_name(&b.name),
        vec![SubjectPattern::new(format!("$KV.{}.>", b.name)).expect("valid pattern")],
    );
    c.max_msgs_per_subject = Some(u64::from(b.history));
    c.max_age = b.ttl;
    c.max_bytes = b.max_bytes;
    c.max_msg_size = None;
    c.duplicate_window = b.ttl.map_or(Duration::from_secs(120), |t| t.min(Duration::from_secs(120)));
    c.sync = b.sync;
    c.replicas = b.replicas;
    c
}

/// What a stored message means as a KV entry.
pub(crate) fn op_of(m: &Message) -> KvOp {
    op_of_headers(&m.headers)
}

/// The KV operation that `headers` mark.
pub(crate) fn op_of_headers(headers: &finmesh_core::Headers) -> KvOp {
    match headers.get(OP_HEADER) {
        Some("DEL") => KvOp::Delete,
        Some("PURGE") => KvOp::Purge,
        _ => KvOp::Put,
    }
}

pub(crate) fn message(bucket: &BucketName, key: &Key, value: Bytes, op: KvOp) -> OutgoingMessage {
    let mut m = OutgoingMessage::new(subject(bucket, key), value);
    match op {
        KvOp::Put => {}
        KvOp::Delete => m.headers.insert(OP_HEADER, "DEL").expect("valid header"),
        KvOp::Purge => m.headers.insert(OP_HEADER, "PURGE").expect("valid header"),
    }
    m
}

/// A stored message as a KV entry of `bucket`.
pub(crate) fn entry(bucket: &BucketName, m: Message) -> Result<KvEntry> {
    let prefix = key_prefix(bucket);
    let key = m
        .subject
        .as_str()
        .strip_prefix(&prefix)
        .ok_or_else(|| Error::internal(format!("subject `{}` is not in bucket `{bucket}`", m.subject)))?;
    Ok(KvEntry { key: Key::new(key)?, op: op_of(&m), value: m.payload, revision: Revision(m.seq.0), created: m.time })
}

/// Is an entry created at `created` expired under `ttl` at `now`? The same
/// boundary as age retention (`created < now - ttl`), so reads and writes agree.
pub(crate) fn expired(ttl: Option<Duration>, created: Timestamp, now: Timestamp) -> bool {
    ttl.is_some_and(|t| created < now.saturating_sub(t))
}

/// The live, unexpired value of `key` in `h` (bucket `bucket`) at `now`:
/// the key's last visible revision, if it is a put. Served from the
/// bucket's hot-value cache when it holds the key (see `kvcache.rs`).
pub(crate) fn get_live(h: &StreamHandle, bucket: &BucketName, key: &Key, now: Timestamp) -> Result<Option<KvEntry>> {
    let ttl = match &h.record.read().kind {
        crate::store::StreamKind::Kv(c) => c.ttl,
        crate::store::StreamKind::User => None,
    };
    let subject = subject_str(bucket, key);
    let live = |seq: Seq, time: Timestamp, value: Bytes| {
        (!expired(ttl, time, now)).then(|| KvEntry {
            key: key.clone(),
            op: KvOp::Put,
            value,
            revision: Revision(seq.0),
            created: time,
        })
    };
    if let Some(c) = h.kv_cache.get(&subject) {
        return Ok(live(c.seq, c.time, c.value));
    }
    // Before the store is read: an insert after a change is refused.
    let ticket = h.kv_cache.ticket();
    let Some(m) = get_visible(h, &subject)? else { return Ok(None) };
    if op_of(&m) != KvOp::Put {
        return Ok(None);
    }
    if h.kv_cache.enabled() {
        let cached = kvcache::Cached { seq: m.seq, time: m.time, value: m.payload.clone() };
        h.kv_cache.insert(ticket, &subject, cached);
    }
    Ok(live(m.seq, m.time, m.payload))
}

/// The last visible message of `subject` in `h`, read from the store.
fn get_visible(h: &StreamHandle, subject: &str) -> Result<Option<Message>> {
    loop {
        let visible = h.visible_seq();
        let Some((last, _)) = h.last_of(subject)? else { return Ok(None) };
        let m = if last <= visible { h.get(last)? } else { None };
        // Not visible yet, or replaced since `l` was read (by a write not
        // revealed yet; else the key's value was evicted).
        let m = match m {
            Some(m) => Some(m),
            None => h.last_visible_message(subject, visible)?,
        };
        // A reveal in between may have dropped what it looked for from
        // memory: look again at the new state.
        if m.is_some() || h.visible_seq() == visible {
            return Ok(m);
        }
    }
}

/// Check a value against the bucket's size limit.
pub(crate) fn check_value(config: &BucketConfig, value: &Bytes) -> Result<()> {
    let limit = config.value_size_limit();
    if value.len() > limit as usize {
        return Err(Error::too_large(format!(
            "value of {} bytes exceeds bucket `{}`'s limit of {limit} bytes",
            value.len(),
            config.name
        )));
    }
    Ok(())
}

pub(crate) fn info(config: BucketConfig, state: &finmesh_core::StreamState) -> BucketInfo {
    BucketInfo { config, entries: state.messages, bytes: state.bytes, last_revision: Revision(state.last_seq.0) }
}

/// Up to `limit` live keys of the bucket starting with `prefix` and sorting
/// after `after`, in order, read by one range scan of the `l` keyspace
/// (subjects `$KV.<bucket>.<key>` sort as their keys do); `next` is set
/// when one more live key follows.
pub(crate) fn keys_page(
    h: &StreamHandle,
    config: &BucketConfig,
    bucket: &BucketName,
    prefix: &str,
    after: Option<&Key>,
    limit: usize,
) -> Result<KeysPage> {
    use std::ops::Bound;
    let now = Timestamp::now();
    let subject_prefix = format!("{}{prefix}", key_prefix(bucket));
    let start = match after {
        Some(a) if format!("{}{a}", key_prefix(bucket)) >= subject_prefix => {
            Bound::Excluded(format!("{}{a}", key_prefix(bucket)).into_bytes())
        }
        _ => Bound::Included(subject_prefix.clone().into_bytes()),
    };
    let visible = h.state().last_seq;
    let mut keys = Vec::new();
    let mut more = false;
    for kv_pair in h.last.range::<Vec<u8>, _>((start, Bound::Unbounded)) {
        let (k, v) = kv_pair.into_inner().map_err(storage)?;
        if !k.starts_with(subject_prefix.as_bytes()) {
            break;
        }
        let (mut seq, _) = codec::decode_last(&v)?;
        if seq > visible {
            // Not visible yet: the key's last visible revision, if any.
            let subject = std::str::from_utf8(&k).map_err(|_| Error::internal("corrupt subject in last index"))?;
            let Some(v) = h.last_visible_of(subject)? else { continue };
            seq = v;
        }
        let Some(m) = h.get(seq)? else { continue };
        let e = entry(bucket, m)?;
        if e.op != KvOp::Put || expired(config.ttl, e.created, now) {
            continue;
        }
        if keys.len() == limit {
            more = true;
            break;
        }
        keys.push(e.key);
    }
    let next = if more { keys.last().cloned() } else { None };
    Ok(KeysPage { keys, next })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_lookup_subject_is_the_subject() {
        let (b, k) = (BucketName::new("reg").unwrap(), Key::new("card.4111-x/y=z").unwrap());
        assert_eq!(subject_str(&b, &k), subject(&b, &k).as_str());
    }
}
