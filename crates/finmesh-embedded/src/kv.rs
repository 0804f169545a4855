//! KV buckets on top of streams, as JetStream does it: bucket `b` is the
//! stream `KV_b` capturing `$KV.b.>`; key `k` is subject `$KV.b.k`; a
//! revision is the stream sequence; `history` is `max_msgs_per_subject`;
//! `ttl` is `max_age`. Delete and purge are messages with a `KV-Operation`
//! header (`DEL`, `PURGE`); purge also rolls up the key's older entries.
//!
//! Invariant: a get reads two point lookups (`l` for the key's last
//! sequence, `m` for the record) and never scans.

use std::time::Duration;

use bytes::Bytes;
use finmesh_core::{
    BucketConfig, BucketInfo, BucketName, Error, Key, KvEntry, KvOp, Message, OutgoingMessage, Result, Revision,
    StreamConfig, StreamName, Subject, SubjectPattern, Timestamp,
};

/// Header carrying a marker's operation.
pub(crate) const OP_HEADER: &str = "KV-Operation";

pub(crate) fn stream_name(bucket: &BucketName) -> StreamName {
    StreamName::new(format!("KV_{bucket}")).expect("bucket names are at most 61 characters")
}

pub(crate) fn subject(bucket: &BucketName, key: &Key) -> Subject {
    Subject::new(format!("$KV.{bucket}.{key}")).expect("keys are valid subject tokens")
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
