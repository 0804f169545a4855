//! Streams: finmesh streams are JetStream streams of the same name
//! (file storage, limits retention, discard old).
//!
//! Mapping of [`StreamConfig`]: `subjects`, `max_msgs`, `max_bytes`,
//! `max_age`, `max_msgs_per_subject`, `duplicate_window` and `replicas` map
//! one to one (`None` = NATS's `-1`/`0`). `max_msg_size` is checked by the
//! engine against finmesh's size (subject + headers + payload) and kept in
//! the stream metadata `finmesh.max_msg_size`; the server's own limit is set
//! 12 bytes higher, because NATS counts the header block's framing
//! (`NATS/1.0\r\n…\r\n`) and not the subject, so it never refuses what the
//! engine accepted. `sync` is reported as the server's policy
//! ([`crate::NatsEngineOptions::server_sync`]): NATS has no per-stream fsync.
//! `security` and `metadata` live in the stream's metadata map
//! (`metadata.rs`).
//!
//! Streams named `KV_*` are KV buckets and are hidden from the stream calls.
//! Publishing checks the subject against the stream's subjects (cached per
//! engine) so a message never lands in another stream that happens to
//! capture it. The cache follows changes made elsewhere (another gateway,
//! any NATS client): JetStream's stream advisories evict an entry as soon
//! as the change is announced; a publish refused by a cached entry is
//! checked again with fresh facts; any publish error evicts the entry; and
//! an ack from a stream other than the one named (the subject moved to
//! another stream between an advisory and the publish) is reported as an
//! `Invalid` error naming where the message went, never as a success.

use std::sync::Arc;

use async_nats::jetstream::stream::Info;
use finmesh_core::engine::MAX_READ_LIMIT;
use finmesh_core::{
    Error, Message, ReadRequest, ReadStart, Result, Seq, StreamConfig, StreamInfo, StreamName, StreamState, Subject,
    SubjectPattern,
};
use serde_json::{Value, json};

use crate::api::{self, GetMsg};
use crate::{Inner, StreamMeta};

/// Metadata key holding finmesh's `max_msg_size`.
pub(crate) const META_MAX_MSG_SIZE: &str = "finmesh.max_msg_size";
/// Prefix of the streams that back KV buckets.
pub(crate) const KV_PREFIX: &str = "KV_";
/// JetStream's advisories of stream changes: `…STREAM.<CREATED|UPDATED|DELETED>.<stream>`.
const STREAM_ADVISORIES: &str = "$JS.EVENT.ADVISORY.STREAM.*.*";
/// Bytes NATS counts for a header block's framing beyond finmesh's count.
const HEADER_FRAMING: u32 = 12;

/// A duration as NATS's nanoseconds (a Go `int64`), saturating.
pub(crate) fn nanos(d: std::time::Duration) -> u64 {
    d.as_nanos().min(i64::MAX as u128) as u64
}

/// The JSON config NATS gets for `c`.
pub(crate) fn nats_config(c: &StreamConfig) -> Value {
    let mut v = json!({
        "name": c.name.as_str(),
        "subjects": c.subjects.iter().map(|s| s.as_str()).collect::<Vec<_>>(),
        "retention": "limits",
        "storage": "file",
        "discard": "old",
        "max_consumers": -1,
        "max_msgs": c.max_msgs.map_or(-1, |n| n.min(i64::MAX as u64) as i64),
        "max_bytes": c.max_bytes.map_or(-1, |n| n.min(i64::MAX as u64) as i64),
        "max_msgs_per_subject": c.max_msgs_per_subject.map_or(-1, |n| n.min(i64::MAX as u64) as i64),
        "max_age": c.max_age.map_or(0, nanos),
        "duplicate_window": nanos(c.duplicate_window),
        "num_replicas": c.replicas,
        "allow_direct": true,
    });
    let mut own = Vec::new();
    if let Some(size) = c.max_msg_size {
        v["max_msg_size"] = json!(size.saturating_add(HEADER_FRAMING).min(i32::MAX as u32));
        own.push((META_MAX_MSG_SIZE, size.to_string()));
    }
    if let Some(m) = crate::metadata::encode(&own, &c.security.options(), &c.metadata) {
        v["metadata"] = m;
    }
    v
}

fn opt(n: i64) -> Option<u64> {
    (n > 0).then_some(n as u64)
}

/// finmesh's view of a NATS stream.
pub(crate) fn stream_info(inner: &Inner, info: &Info) -> Result<StreamInfo> {
    let c = &info.config;
    let max_msg_size = match c.metadata.get(META_MAX_MSG_SIZE) {
        Some(v) => v.parse().ok(),
        None if c.max_message_size > 0 => Some(c.max_message_size as u32),
        None => None,
    };
    let config = StreamConfig {
        name: StreamName::new(c.name.as_str())?,
        subjects: c.subjects.iter().map(|s| SubjectPattern::new(s.as_str())).collect::<Result<_>>()?,
        max_msgs: opt(c.max_messages),
        max_bytes: opt(c.max_bytes),
        max_age: (!c.max_age.is_zero()).then_some(c.max_age),
        max_msgs_per_subject: opt(c.max_messages_per_subject),
        max_msg_size,
        duplicate_window: c.duplicate_window,
        sync: inner.options.server_sync,
        replicas: c.num_replicas.clamp(1, 5) as u8,
        security: crate::metadata::stream_security(&c.metadata, &format!("stream `{}`", c.name))?,
        metadata: crate::metadata::user(&c.metadata),
    };
    let s = &info.state;
    let state = StreamState {
        messages: s.messages,
        bytes: s.bytes,
        // NATS reports 0 for a stream that never had a message; finmesh
        // (and NATS after a purge) says `last + 1` for an empty stream.
        first_seq: Seq(if s.messages == 0 { s.last_sequence + 1 } else { s.first_sequence }),
        last_seq: Seq(s.last_sequence),
        first_time: if s.messages > 0 { api::opt_ts(s.first_timestamp) } else { None },
        last_time: if s.last_sequence > 0 { api::opt_ts(s.last_timestamp) } else { None },
    };
    // JetStream keeps no epoch; the creation time changes exactly when the
    // stream is created again (a JetStream stream does not lose acked
    // writes on recovery, so that is the only rewind). A mirror (an edge's
    // copy) has its own creation time, unrelated to its source's history:
    // unknown (0), so moving between edges never looks like a rewind.
    let epoch = match c.mirror {
        Some(_) => 0,
        None => u64::try_from(info.created.unix_timestamp_nanos()).unwrap_or(0),
    };
    Ok(StreamInfo { config, state, epoch })
}

fn not_kv(name: &StreamName) -> Result<()> {
    if name.as_str().starts_with(KV_PREFIX) {
        return Err(Error::invalid(format!("stream names starting with `{KV_PREFIX}` are reserved for KV buckets")));
    }
    Ok(())
}

impl Inner {
    pub(crate) async fn raw_stream_info(&self, name: &str) -> Result<Info> {
        self.request(&format!("STREAM.INFO.{name}"), &json!({}), &format!("stream `{name}`")).await
    }

    /// The cached subjects and size limit of a stream (fetched on a miss).
    pub(crate) async fn stream_meta(&self, name: &StreamName) -> Result<Arc<StreamMeta>> {
        if let Some(m) = self.streams.lock().get(name.as_str()) {
            return Ok(m.clone());
        }
        if name.as_str().starts_with(KV_PREFIX) {
            return Err(Error::not_found(format!("stream `{name}` not found")));
        }
        let info = self.raw_stream_info(name.as_str()).await?;
        Ok(self.remember(&stream_info(self, &info)?.config))
    }

    pub(crate) fn remember(&self, c: &StreamConfig) -> Arc<StreamMeta> {
        let meta = Arc::new(StreamMeta {
            subjects: c.subjects.clone(),
            max_msg_size: c.msg_size_limit(),
            replicated: c.replicas > 1,
        });
        self.streams.lock().insert(c.name.as_str().to_owned(), meta.clone());
        meta
    }

    pub(crate) fn forget(&self, name: &str) {
        self.streams.lock().remove(name);
    }

    /// The cached facts of `stream` if every message of `msgs` passes the
    /// publish checks against them. A refusal from a cached copy is checked
    /// once more against fresh facts, since another gateway may have widened
    /// the stream's subjects or size limit since this engine cached them.
    pub(crate) async fn checked_meta(
        &self,
        stream: &StreamName,
        msgs: &[finmesh_core::OutgoingMessage],
    ) -> Result<Arc<StreamMeta>> {
        let meta = self.stream_meta(stream).await?;
        if msgs.iter().all(|m| crate::publish::check(stream, &meta, m).is_ok()) {
            return Ok(meta);
        }
        self.forget(stream.as_str());
        let meta = self.stream_meta(stream).await?;
        for m in msgs {
            crate::publish::check(stream, &meta, m)?;
        }
        Ok(meta)
    }

    /// Follow JetStream's stream advisories, so a stream created, updated or
    /// deleted through another gateway (or any NATS client) drops out of
    /// this engine's cache at once; and a deleted `KV_` stream drops its
    /// bucket's facts. The task ends with the engine or the connection.
    pub(crate) async fn follow_stream_advisories(inner: &Arc<Inner>) {
        let sub = match inner.client.subscribe(STREAM_ADVISORIES).await {
            Ok(sub) => sub,
            Err(e) => {
                tracing::warn!(error = %e, "cannot follow stream advisories; cached stream facts are checked on use only");
                return;
            }
        };
        let weak = Arc::downgrade(inner);
        tokio::spawn(async move {
            use futures::StreamExt;
            let mut sub = sub;
            while let Some(advisory) = sub.next().await {
                let Some(inner) = weak.upgrade() else { return };
                let mut tokens = advisory.subject.as_str().rsplit('.');
                let (Some(stream), Some(event)) = (tokens.next(), tokens.next()) else { continue };
                inner.forget(stream);
                if event == "DELETED"
                    && let Some(bucket) = stream.strip_prefix(KV_PREFIX)
                {
                    inner.buckets.lock().remove(bucket);
                }
            }
        });
    }

    pub(crate) async fn create_stream(&self, config: StreamConfig) -> Result<StreamInfo> {
        config.validate()?;
        not_kv(&config.name)?;
        let what = format!("create stream `{}`", config.name);
        let info: Info =
            self.config_request(&format!("STREAM.CREATE.{}", config.name), &nats_config(&config), &what).await?;
        let info = stream_info(self, &info)?;
        self.remember(&info.config);
        Ok(info)
    }

    pub(crate) async fn update_stream(&self, config: StreamConfig) -> Result<StreamInfo> {
        config.validate()?;
        not_kv(&config.name)?;
        let what = format!("update stream `{}`", config.name);
        // Security options are fixed at creation (finmesh_core::options):
        // checked against the stream as it is (they never change, so no
        // update can race this check into a change).
        let old = self.stream_info(&config.name).await?.config;
        finmesh_core::options::check_security_unchanged(
            &format!("stream `{}`", config.name),
            &old.security.options(),
            &config.security.options(),
        )?;
        self.forget(config.name.as_str());
        let info: Info =
            self.config_request(&format!("STREAM.UPDATE.{}", config.name), &nats_config(&config), &what).await?;
        let info = stream_info(self, &info)?;
        self.remember(&info.config);
        Ok(info)
    }

    pub(crate) async fn stream_info(&self, name: &StreamName) -> Result<StreamInfo> {
        if name.as_str().starts_with(KV_PREFIX) {
            return Err(Error::not_found(format!("stream `{name}` not found")));
        }
        stream_info(self, &self.raw_stream_info(name.as_str()).await?)
    }

    /// Names of all JetStream streams, paged.
    pub(crate) async fn all_stream_names(&self) -> Result<Vec<String>> {
        #[derive(serde::Deserialize)]
        struct Names {
            #[serde(default)]
            streams: Option<Vec<String>>,
            total: usize,
        }
        let mut out = Vec::new();
        loop {
            let page: Names = self.request("STREAM.NAMES", &json!({ "offset": out.len() }), "list streams").await?;
            let got = page.streams.unwrap_or_default();
            let empty = got.is_empty();
            out.extend(got);
            if empty || out.len() >= page.total {
                return Ok(out);
            }
        }
    }

    pub(crate) async fn list_streams(&self) -> Result<Vec<StreamName>> {
        let mut names: Vec<StreamName> = self
            .all_stream_names()
            .await?
            .into_iter()
            .filter(|n| !n.starts_with(KV_PREFIX))
            .filter_map(|n| StreamName::new(n).ok())
            .collect();
        names.sort();
        Ok(names)
    }

    pub(crate) async fn delete_stream(&self, name: &StreamName) -> Result<()> {
        not_kv(name).map_err(|_| Error::not_found(format!("stream `{name}` not found")))?;
        self.forget(name.as_str());
        let _: Value =
            self.request(&format!("STREAM.DELETE.{name}"), &json!({}), &format!("delete stream `{name}`")).await?;
        self.forget(name.as_str());
        Ok(())
    }

    pub(crate) async fn purge_stream(&self, name: &StreamName) -> Result<u64> {
        self.stream_meta(name).await?;
        #[derive(serde::Deserialize)]
        struct Purged {
            purged: u64,
        }
        let r: Purged =
            self.request(&format!("STREAM.PURGE.{name}"), &json!({}), &format!("purge stream `{name}`")).await?;
        Ok(r.purged)
    }

    /// `STREAM.MSG.GET` with `body`; `Ok(None)` when there is no such message.
    pub(crate) async fn msg_get(&self, stream: &str, body: &Value) -> Result<Option<Message>> {
        let what = format!("stream `{stream}`");
        let reply = api::request_api::<GetMsg>(
            &self.client,
            &self.prefix,
            &format!("STREAM.MSG.GET.{stream}"),
            body,
            self.options.request_timeout,
            &what,
        )
        .await?;
        match api::absent_on(reply, async_nats::jetstream::ErrorCode::NO_MESSAGE_FOUND, &what)? {
            Some(m) => api::raw_to_message(m.message).map(Some),
            None => Ok(None),
        }
    }

    /// The last message on `subject` through a direct get (the stream must
    /// allow them): the stored message itself, described by the
    /// `Nats-Sequence`, `Nats-Subject` and `Nats-Time-Stamp` headers, or
    /// status 404 for none.
    pub(crate) async fn direct_last(&self, stream: &str, subject: &Subject) -> Result<Option<Message>> {
        let req = async_nats::Request::new();
        self.direct_request(stream, format!("{}.DIRECT.GET.{stream}.{subject}", self.prefix), req).await
    }

    /// A direct get with a JSON request (`last_by_subj`, `seq`,
    /// `min_last_seq`, …); the reply is read like [`Inner::direct_last`]'s.
    pub(crate) async fn direct_get(&self, stream: &str, body: &Value) -> Result<Option<Message>> {
        let payload = serde_json::to_vec(body).map_err(|e| Error::internal("encode a direct get").with_source(e))?;
        let req = async_nats::Request::new().payload(payload.into());
        self.direct_request(stream, format!("{}.DIRECT.GET.{stream}", self.prefix), req).await
    }

    async fn direct_request(&self, stream: &str, subject: String, req: async_nats::Request) -> Result<Option<Message>> {
        let req = req.timeout(Some(self.options.request_timeout));
        let reply = self
            .client
            .send_request(subject, req)
            .await
            .map_err(|e| api::map_request_error(e, &format!("direct get from stream `{stream}`")))?;
        api::direct_reply(reply)
    }

    pub(crate) async fn get_message(&self, stream: &StreamName, seq: Seq) -> Result<Message> {
        self.stream_meta(stream).await?;
        let missing = || Error::not_found(format!("stream `{stream}` has no message {seq}"));
        if seq.0 == 0 {
            return Err(missing());
        }
        self.msg_get(stream.as_str(), &json!({ "seq": seq.0 })).await?.ok_or_else(missing)
    }

    pub(crate) async fn last_message(&self, stream: &StreamName, subject: &Subject) -> Result<Message> {
        self.stream_meta(stream).await?;
        self.msg_get(stream.as_str(), &json!({ "last_by_subj": subject.as_str() }))
            .await?
            .ok_or_else(|| Error::not_found(format!("stream `{stream}` has no message on `{subject}`")))
    }

    /// A range of messages, read through an ephemeral consumer (see
    /// `snapshot.rs`); see [`Inner::read_checked`].
    pub(crate) async fn read(&self, stream: &StreamName, request: ReadRequest) -> Result<Vec<Message>> {
        let meta = self.stream_meta(stream).await?;
        self.read_checked(stream.as_str(), meta.replicated, &request).await
    }

    /// A range of messages of JetStream stream `stream`. On a replicated
    /// stream NATS puts the reading consumer on a replica of its choosing,
    /// which may still be catching up (after a restart, say) and then
    /// answers with an older prefix of the stream. A full answer is right
    /// anyway (a replica's log is a prefix of the leader's); a short one is
    /// checked with the leader (`STREAM.MSG.GET` of the next matching
    /// message), and when the leader has one, that message is taken from it
    /// and the rest read again. So a read sees every message stored before
    /// it began, like on a single server.
    pub(crate) async fn read_checked(
        &self,
        stream: &str,
        replicated: bool,
        request: &ReadRequest,
    ) -> Result<Vec<Message>> {
        let limit = request.limit.min(MAX_READ_LIMIT);
        if limit == 0 || request.end.is_some_and(|e| e.0 == 0) {
            return Ok(Vec::new());
        }
        let in_range = |m: &Message| request.end.is_none_or(|end| m.seq <= end);
        let mut msgs = self.read_range(stream, request.start, request.filter.as_ref(), limit).await?;
        msgs.retain(in_range);
        while replicated && msgs.len() < limit {
            let filter = request.filter.as_ref().map_or(">", |f| f.as_str());
            let next = match (msgs.last(), request.start) {
                (Some(m), _) => json!({ "seq": m.seq.0 + 1, "next_by_subj": filter }),
                (None, ReadStart::Seq(s)) => json!({ "seq": s.0.max(1), "next_by_subj": filter }),
                (None, ReadStart::Time(t)) => json!({ "start_time": rfc3339(t)?, "next_by_subj": filter }),
            };
            let Some(m) = self.msg_get(stream, &next).await? else { break };
            if !in_range(&m) {
                break;
            }
            let from = Seq(m.seq.0 + 1);
            msgs.push(m);
            let rest =
                self.read_range(stream, ReadStart::Seq(from), request.filter.as_ref(), limit - msgs.len()).await?;
            msgs.extend(rest.into_iter().filter(in_range));
        }
        Ok(msgs)
    }

    /// Up to `limit` messages from `start` matching `filter`, as the
    /// snapshot consumer's replica has them.
    async fn read_range(
        &self,
        stream: &str,
        start: ReadStart,
        filter: Option<&SubjectPattern>,
        limit: usize,
    ) -> Result<Vec<Message>> {
        if limit == 0 {
            return Ok(Vec::new());
        }
        let mut cfg = json!({});
        match start {
            ReadStart::Seq(Seq(0)) => cfg["deliver_policy"] = json!("all"),
            ReadStart::Seq(s) => {
                cfg["deliver_policy"] = json!("by_start_sequence");
                cfg["opt_start_seq"] = json!(s.0);
            }
            ReadStart::Time(t) => {
                cfg["deliver_policy"] = json!("by_start_time");
                cfg["opt_start_time"] = json!(rfc3339(t)?);
            }
        }
        if let Some(f) = filter {
            cfg["filter_subject"] = json!(f.as_str());
        }
        self.snapshot(stream, cfg, limit).await
    }

    /// Every message matching `filter` stored after `after`, as the
    /// replicated stream's leader has them, in order: one leader request
    /// when there is none (the usual answer), else a read from the first.
    pub(crate) async fn read_after(&self, stream: &str, after: Seq, filter: &SubjectPattern) -> Result<Vec<Message>> {
        let next = json!({ "seq": after.0 + 1, "next_by_subj": filter.as_str() });
        let Some(first) = self.msg_get(stream, &next).await? else { return Ok(Vec::new()) };
        let mut out = vec![first];
        loop {
            let from = out.last().map_or(after, |m| m.seq);
            let request = ReadRequest::from_seq(Seq(from.0 + 1), MAX_READ_LIMIT).filter(filter.clone());
            let page = self.read_checked(stream, true, &request).await?;
            let full = page.len() == MAX_READ_LIMIT;
            out.extend(page);
            if !full {
                return Ok(out);
            }
        }
    }

    /// The last message per subject matching `filter`, read through an
    /// ephemeral consumer. On a replicated stream its replica may lag: its
    /// answer is a last-per-subject view of an older prefix, so every
    /// matching message the leader has after the newest of them
    /// ([`Inner::read_after`]) is folded in. (A message on the lagging
    /// replica after that newest one cannot match, or it would have been
    /// the last of its subject.)
    pub(crate) async fn last_per_subject_checked(
        &self,
        stream: &str,
        replicated: bool,
        filter: &SubjectPattern,
        mut cfg: Value,
    ) -> Result<Vec<Message>> {
        cfg["deliver_policy"] = json!("last_per_subject");
        cfg["filter_subject"] = json!(filter.as_str());
        let last = self.snapshot(stream, cfg, usize::MAX).await?;
        if !replicated {
            return Ok(last);
        }
        let newest = last.iter().map(|m| m.seq).max().unwrap_or(Seq(0));
        let newer = self.read_after(stream, newest, filter).await?;
        Ok(fold_last_per_subject(last, newer))
    }

    pub(crate) async fn last_per_subject(
        &self,
        stream: &StreamName,
        filter: Option<&SubjectPattern>,
    ) -> Result<Vec<Message>> {
        let meta = self.stream_meta(stream).await?;
        let all = SubjectPattern::new(">")?;
        self.last_per_subject_checked(stream.as_str(), meta.replicated, filter.unwrap_or(&all), json!({})).await
    }
}

/// `last` (one message per subject, in sequence order) updated by `newer`
/// (later messages, in sequence order): the last message of each subject,
/// in sequence order.
fn fold_last_per_subject(last: Vec<Message>, newer: Vec<Message>) -> Vec<Message> {
    if newer.is_empty() {
        return last;
    }
    let mut seen = std::collections::HashSet::new();
    let mut out: Vec<Message> =
        last.into_iter().chain(newer).rev().filter(|m| seen.insert(m.subject.clone())).collect();
    out.reverse();
    out
}

/// RFC 3339 with nanoseconds, as NATS expects times.
pub(crate) fn rfc3339(t: finmesh_core::Timestamp) -> Result<String> {
    api::datetime(t)
        .format(&time::format_description::well_known::Rfc3339)
        .map_err(|e| Error::internal(format!("format a time: {e}")))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn msg(seq: u64, subject: &str) -> Message {
        Message {
            seq: Seq(seq),
            subject: Subject::new(subject).unwrap(),
            headers: Default::default(),
            payload: bytes::Bytes::new(),
            time: finmesh_core::Timestamp(0),
        }
    }

    #[test]
    fn newer_messages_replace_their_subjects_entry_in_sequence_order() {
        let last = vec![msg(2, "a"), msg(5, "b"), msg(7, "c")];
        let newer = vec![msg(8, "a"), msg(9, "d"), msg(10, "a")];
        let got: Vec<(u64, String)> =
            fold_last_per_subject(last, newer).into_iter().map(|m| (m.seq.0, m.subject.to_string())).collect();
        assert_eq!(got, vec![(5, "b".into()), (7, "c".into()), (9, "d".into()), (10, "a".into())]);
        assert_eq!(fold_last_per_subject(vec![msg(1, "a")], Vec::new()).len(), 1);
    }
}
