//! Stream, bucket and consumer configurations, and what engines report
//! about them.
//!
//! Configs are parsed (serde, unknown fields refused), then checked by a pure
//! `validate()` that reports every problem at once in one
//! [`ErrorKind::Invalid`](crate::ErrorKind::Invalid) error, problems joined
//! by `; `. Engines call `validate()` before anything reaches storage.
//! Durations are serialized as milliseconds.
//!
//! Invariant: a user stream never captures the engines' own subjects. A
//! subject pattern of a [`StreamConfig`] must start with a literal token that
//! neither starts with `$` (`$KV.…` holds KV values, `$JS.…` the JetStream
//! API and acks, `$SYS.…` the server's events) nor with `_INBOX` (replies);
//! a wildcard first token (`*`, `>`) is refused too, since it would match
//! them. The engines build their own streams (KV buckets' `$KV.<b>.>`)
//! without this check.

use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::options::{BucketSecurity, Metadata, StreamSecurity, check_metadata};
use crate::{ConsumerName, Error, Result, Seq, StreamName, SubjectPattern, Timestamp};

/// How a stream's (or bucket's) writes are made durable before the ack,
/// and when readers see them (see `docs/embedded.md`). The default is
/// `Always`: an acked write is never lost.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum SyncPolicy {
    /// Ack only after the write is fsynced: survives power loss. Readers
    /// see the write only then too.
    #[default]
    Always,
    /// Ack after the write reached the OS; fsync at least every `ms`
    /// milliseconds: survives a process crash, and a power loss loses at most
    /// the last interval.
    Interval {
        /// Milliseconds between fsyncs.
        ms: u64,
    },
    /// Ack after the write reached the OS; fsync when the OS decides:
    /// survives a process crash only.
    Never,
}

impl SyncPolicy {
    /// `interval(ms)` from a duration.
    pub fn interval(d: Duration) -> SyncPolicy {
        SyncPolicy::Interval { ms: d.as_millis().max(1) as u64 }
    }
}

pub(crate) mod millis {
    use serde::{Deserialize, Deserializer, Serializer};
    use std::time::Duration;

    pub fn serialize<S: Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_u64(d.as_millis() as u64)
    }
    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
        Ok(Duration::from_millis(u64::deserialize(d)?))
    }

    pub mod option {
        use super::*;
        pub fn serialize<S: Serializer>(d: &Option<Duration>, s: S) -> Result<S::Ok, S::Error> {
            match d {
                Some(d) => s.serialize_some(&(d.as_millis() as u64)),
                None => s.serialize_none(),
            }
        }
        pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Option<Duration>, D::Error> {
            Ok(Option::<u64>::deserialize(d)?.map(Duration::from_millis))
        }
    }
}

fn finish(problems: Vec<String>, what: &str) -> Result<()> {
    if problems.is_empty() { Ok(()) } else { Err(Error::invalid(format!("invalid {what}: {}", problems.join("; ")))) }
}

/// Default duplicate window: two minutes, as JetStream.
pub const DEFAULT_DUPLICATE_WINDOW: Duration = Duration::from_secs(120);

/// Largest message or value any engine accepts (8 MiB, NATS's hard limit).
pub const MAX_PAYLOAD_LIMIT: u32 = 8 * 1024 * 1024;

/// Configuration of a stream. Retention always discards the oldest messages.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StreamConfig {
    /// The stream's name.
    pub name: StreamName,
    /// Subjects the stream captures; must not overlap another stream's.
    pub subjects: Vec<SubjectPattern>,
    /// Keep at most this many messages.
    #[serde(default)]
    pub max_msgs: Option<u64>,
    /// Keep at most this many bytes (message sizes as counted by [`crate::Message::size`]).
    #[serde(default)]
    pub max_bytes: Option<u64>,
    /// Drop messages older than this.
    #[serde(default, with = "millis::option")]
    pub max_age: Option<Duration>,
    /// Keep at most this many messages per subject.
    #[serde(default)]
    pub max_msgs_per_subject: Option<u64>,
    /// Refuse messages larger than this with `TooLarge` (default and maximum 8 MiB).
    #[serde(default)]
    pub max_msg_size: Option<u32>,
    /// Window in which a repeated `Nats-Msg-Id` is acked as a duplicate.
    #[serde(default = "default_dup_window", with = "millis")]
    pub duplicate_window: Duration,
    /// Durability of acks.
    #[serde(default)]
    pub sync: SyncPolicy,
    /// Copies kept by a clustered engine (1 on the embedded engine).
    #[serde(default = "one")]
    pub replicas: u8,
    /// Security options, fixed at creation (see [`crate::options`]).
    #[serde(default, skip_serializing_if = "StreamSecurity::is_none")]
    pub security: StreamSecurity,
    /// User metadata, kept and reported (see [`crate::options`] for its limits).
    #[serde(default, skip_serializing_if = "Metadata::is_empty")]
    pub metadata: Metadata,
}

fn default_dup_window() -> Duration {
    DEFAULT_DUPLICATE_WINDOW
}
fn one() -> u8 {
    1
}

impl StreamConfig {
    /// A stream with defaults: no limits, 2-minute duplicate window, `sync = always`.
    pub fn new(name: StreamName, subjects: Vec<SubjectPattern>) -> Self {
        StreamConfig {
            name,
            subjects,
            max_msgs: None,
            max_bytes: None,
            max_age: None,
            max_msgs_per_subject: None,
            max_msg_size: None,
            duplicate_window: DEFAULT_DUPLICATE_WINDOW,
            sync: SyncPolicy::default(),
            replicas: 1,
            security: StreamSecurity::default(),
            metadata: Metadata::new(),
        }
    }

    /// The effective message size limit.
    pub fn msg_size_limit(&self) -> u32 {
        self.max_msg_size.unwrap_or(MAX_PAYLOAD_LIMIT)
    }

    /// Every problem with this configuration, at once.
    pub fn validate(&self) -> Result<()> {
        let mut p = Vec::new();
        if self.subjects.is_empty() {
            p.push("subjects must not be empty".to_owned());
        }
        for s in &self.subjects {
            if let Some(why) = reserved_subject(s) {
                p.push(format!("subject `{s}` {why}"));
            }
        }
        for (i, a) in self.subjects.iter().enumerate() {
            for b in &self.subjects[i + 1..] {
                if a.overlaps(b) {
                    p.push(format!("subjects `{a}` and `{b}` overlap"));
                }
            }
        }
        for (field, v) in [
            ("max_msgs", self.max_msgs),
            ("max_bytes", self.max_bytes),
            ("max_msgs_per_subject", self.max_msgs_per_subject),
        ] {
            if v == Some(0) {
                p.push(format!("{field} must be at least 1 (leave it out for no limit)"));
            }
        }
        if self.max_age == Some(Duration::ZERO) {
            p.push("max_age must be positive (leave it out for no limit)".to_owned());
        }
        match self.max_msg_size {
            Some(0) => p.push("max_msg_size must be at least 1".to_owned()),
            Some(n) if n > MAX_PAYLOAD_LIMIT => {
                p.push(format!("max_msg_size {n} exceeds the limit of {MAX_PAYLOAD_LIMIT} bytes"))
            }
            _ => {}
        }
        if let Some(age) = self.max_age
            && self.duplicate_window > age
        {
            p.push(format!(
                "duplicate_window ({} ms) must not exceed max_age ({} ms)",
                self.duplicate_window.as_millis(),
                age.as_millis()
            ));
        }
        if let SyncPolicy::Interval { ms: 0 } = self.sync {
            p.push("sync interval must be at least 1 ms".to_owned());
        }
        if !(1..=5).contains(&self.replicas) {
            p.push(format!("replicas must be 1-5, got {}", self.replicas));
        }
        check_metadata(&self.metadata, &mut p);
        finish(p, "stream config")
    }
}

/// Why a stream may not capture `pattern`, if it may not (see the module doc).
pub fn reserved_subject(pattern: &SubjectPattern) -> Option<&'static str> {
    let first = pattern.as_str().split('.').next().unwrap_or_default();
    if first == "*" || first == ">" {
        Some("starts with a wildcard, which would capture the reserved `$…` and `_INBOX…` subjects")
    } else if first.starts_with('$') {
        Some("starts with `$`; subjects starting with `$` are reserved for KV, the JetStream API and the system")
    } else if first.starts_with("_INBOX") {
        Some("starts with `_INBOX`; those subjects carry other clients' replies")
    } else {
        None
    }
}

/// A stream's current contents.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct StreamState {
    /// Messages stored.
    pub messages: u64,
    /// Bytes stored, as counted by [`crate::Message::size`].
    pub bytes: u64,
    /// First stored sequence; `last_seq + 1` when empty (JetStream's convention).
    pub first_seq: Seq,
    /// Last sequence ever assigned; `Seq(0)` for a new stream.
    pub last_seq: Seq,
    /// Time of the first stored message, if any.
    pub first_time: Option<Timestamp>,
    /// Time of the last stored message, if any.
    pub last_time: Option<Timestamp>,
}

/// What an engine reports about a stream.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StreamInfo {
    /// The configuration in force.
    pub config: StreamConfig,
    /// Current contents.
    pub state: StreamState,
    /// Names the stream's history: sequences mean the same messages only
    /// within one epoch. It changes when the stream is created again
    /// (deleted and recreated) or recovered with possible loss (the
    /// embedded engine reopened after a crash, for a stream whose policy is
    /// not `always`: a reader may have seen writes the crash took back, and
    /// their sequences will be reused). A subscriber that resumes under
    /// another epoch must drop what it has past the stream's `last_seq`.
    /// Engines derive it from a time (nanoseconds since the Unix epoch):
    /// the embedded engine from the creation or the lossy recovery, NATS
    /// from the stream's `created` time. `0` = unknown.
    #[serde(default)]
    pub epoch: u64,
}

/// Configuration of a KV bucket.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BucketConfig {
    /// The bucket's name.
    pub name: crate::BucketName,
    /// Revisions kept per key, 1–64 (delete and purge markers count).
    #[serde(default = "one")]
    pub history: u8,
    /// Entries older than this disappear (with their history).
    #[serde(default, with = "millis::option")]
    pub ttl: Option<Duration>,
    /// Refuse values larger than this with `TooLarge` (default and maximum 8 MiB).
    #[serde(default)]
    pub max_value_size: Option<u32>,
    /// Keep at most this many bytes in the bucket. When full, a write that
    /// would go past it is refused with [`TooLarge`](crate::ErrorKind::TooLarge)
    /// and nothing is written: other keys' values are never evicted to make
    /// room (JetStream KV's `discard: new`). A write that replaces a key's
    /// oldest kept revision counts only the difference.
    #[serde(default)]
    pub max_bytes: Option<u64>,
    /// Durability of acks.
    #[serde(default)]
    pub sync: SyncPolicy,
    /// Copies kept by a clustered engine (1 on the embedded engine).
    #[serde(default = "one")]
    pub replicas: u8,
    /// Security options, fixed at creation (see [`crate::options`]).
    #[serde(default, skip_serializing_if = "BucketSecurity::is_none")]
    pub security: BucketSecurity,
    /// User metadata, kept and reported (see [`crate::options`] for its limits).
    #[serde(default, skip_serializing_if = "Metadata::is_empty")]
    pub metadata: Metadata,
}

/// Most revisions a bucket may keep per key (JetStream's limit).
pub const MAX_HISTORY: u8 = 64;

impl BucketConfig {
    /// A bucket with defaults: history 1, no TTL, `sync = always`.
    pub fn new(name: crate::BucketName) -> Self {
        BucketConfig {
            name,
            history: 1,
            ttl: None,
            max_value_size: None,
            max_bytes: None,
            sync: SyncPolicy::default(),
            replicas: 1,
            security: BucketSecurity::default(),
            metadata: Metadata::new(),
        }
    }

    /// The effective value size limit.
    pub fn value_size_limit(&self) -> u32 {
        self.max_value_size.unwrap_or(MAX_PAYLOAD_LIMIT)
    }

    /// Every problem with this configuration, at once.
    pub fn validate(&self) -> Result<()> {
        let mut p = Vec::new();
        if !(1..=MAX_HISTORY).contains(&self.history) {
            p.push(format!("history must be 1-{MAX_HISTORY}, got {}", self.history));
        }
        if self.ttl == Some(Duration::ZERO) {
            p.push("ttl must be positive (leave it out for no expiry)".to_owned());
        }
        if let Some(ttl) = self.ttl
            && ttl < Duration::from_millis(100)
        {
            p.push(format!("ttl must be at least 100 ms, got {} ms", ttl.as_millis()));
        }
        match self.max_value_size {
            Some(0) => p.push("max_value_size must be at least 1".to_owned()),
            Some(n) if n > MAX_PAYLOAD_LIMIT => {
                p.push(format!("max_value_size {n} exceeds the limit of {MAX_PAYLOAD_LIMIT} bytes"))
            }
            _ => {}
        }
        if self.max_bytes == Some(0) {
            p.push("max_bytes must be at least 1 (leave it out for no limit)".to_owned());
        }
        if let SyncPolicy::Interval { ms: 0 } = self.sync {
            p.push("sync interval must be at least 1 ms".to_owned());
        }
        if !(1..=5).contains(&self.replicas) {
            p.push(format!("replicas must be 1-5, got {}", self.replicas));
        }
        check_metadata(&self.metadata, &mut p);
        finish(p, "bucket config")
    }
}

/// What an engine reports about a bucket.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BucketInfo {
    /// The configuration in force.
    pub config: BucketConfig,
    /// Entries stored, history and markers included.
    pub entries: u64,
    /// Bytes stored.
    pub bytes: u64,
    /// The last revision assigned (`Revision(0)` for a new bucket).
    pub last_revision: crate::Revision,
}

/// Where a consumer starts.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "snake_case", tag = "policy")]
pub enum DeliverPolicy {
    /// Every message still stored.
    #[default]
    All,
    /// Only messages published after the consumer was created.
    New,
    /// From this sequence on.
    FromSeq {
        /// First sequence delivered (if still stored).
        seq: Seq,
    },
    /// From the first message stored at or after this time.
    FromTime {
        /// Start time.
        time: Timestamp,
    },
    /// The last message of each subject, then everything new.
    LastPerSubject,
}

/// Default time a delivered message waits for its ack before redelivery.
pub const DEFAULT_ACK_WAIT: Duration = Duration::from_secs(30);

/// Default maximum of delivered-but-unacked messages per consumer.
pub const DEFAULT_MAX_ACK_PENDING: u32 = 1000;

/// Configuration of a durable pull consumer with explicit acks.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ConsumerConfig {
    /// The consumer's durable name.
    pub name: ConsumerName,
    /// Only messages whose subject matches.
    #[serde(default)]
    pub filter: Option<SubjectPattern>,
    /// Where to start (fixed at creation).
    #[serde(default)]
    pub deliver: DeliverPolicy,
    /// Time a delivery waits for its ack before it is redelivered.
    #[serde(default = "default_ack_wait", with = "millis")]
    pub ack_wait: Duration,
    /// Deliveries before a message is dead-lettered; `None` = unlimited.
    #[serde(default)]
    pub max_deliver: Option<u32>,
    /// Most delivered-but-unacked messages at once.
    #[serde(default = "default_max_ack_pending")]
    pub max_ack_pending: u32,
    /// Stream that receives messages that reached `max_deliver`, on subject
    /// `dlq.<stream>.<consumer>` (see [`dead_letter_subject`]). Without it,
    /// such messages are dropped, as JetStream does. The engine creates the
    /// stream with subjects `dlq.<stream>.>` when it does not exist.
    #[serde(default)]
    pub dead_letter: Option<StreamName>,
}

fn default_ack_wait() -> Duration {
    DEFAULT_ACK_WAIT
}
fn default_max_ack_pending() -> u32 {
    DEFAULT_MAX_ACK_PENDING
}

/// Subject on which a dead-lettered message of `consumer` on `stream` is published.
pub fn dead_letter_subject(stream: &StreamName, consumer: &ConsumerName) -> crate::Subject {
    crate::Subject::new(format!("dlq.{stream}.{consumer}")).expect("names are valid subject tokens")
}

/// Message id (`Nats-Msg-Id`) of the dead-lettered copy of message `seq`
/// of `stream`, given up on by `consumer`: `dlq.<stream>.<consumer>.<seq>`.
/// Both engines set it (replacing the original's id), so an engine that
/// dies between storing the copy and recording the message as done stores
/// the copy once when it dead-letters the message again (within the
/// dead-letter stream's duplicate window).
pub fn dead_letter_msg_id(stream: &StreamName, consumer: &ConsumerName, seq: crate::Seq) -> String {
    format!("dlq.{stream}.{consumer}.{seq}")
}

/// Headers set on a dead-lettered copy (original headers are kept too,
/// except `Nats-Msg-Id`, replaced by [`dead_letter_msg_id`]).
pub mod dead_letter_headers {
    /// Stream the message came from.
    pub const STREAM: &str = "Finmesh-Dlq-Stream";
    /// Consumer that gave up on it.
    pub const CONSUMER: &str = "Finmesh-Dlq-Consumer";
    /// Its sequence in the original stream.
    pub const SEQ: &str = "Finmesh-Dlq-Seq";
    /// Its original subject.
    pub const SUBJECT: &str = "Finmesh-Dlq-Subject";
    /// Deliveries made before it was dead-lettered.
    pub const DELIVERIES: &str = "Finmesh-Dlq-Deliveries";
}

impl ConsumerConfig {
    /// A consumer with defaults: deliver all, ack_wait 30 s, unlimited deliveries.
    pub fn new(name: ConsumerName) -> Self {
        ConsumerConfig {
            name,
            filter: None,
            deliver: DeliverPolicy::All,
            ack_wait: DEFAULT_ACK_WAIT,
            max_deliver: None,
            max_ack_pending: DEFAULT_MAX_ACK_PENDING,
            dead_letter: None,
        }
    }

    /// Every problem with this configuration, at once.
    pub fn validate(&self) -> Result<()> {
        let mut p = Vec::new();
        if self.ack_wait < Duration::from_millis(1) {
            p.push("ack_wait must be at least 1 ms".to_owned());
        }
        if self.max_deliver == Some(0) {
            p.push("max_deliver must be at least 1 (leave it out for unlimited)".to_owned());
        }
        if self.max_ack_pending == 0 {
            p.push("max_ack_pending must be at least 1".to_owned());
        }
        if let DeliverPolicy::FromSeq { seq: Seq(0) } = self.deliver {
            p.push("deliver from_seq must be at least 1".to_owned());
        }
        if self.dead_letter.is_some() && self.max_deliver.is_none() {
            p.push("dead_letter needs max_deliver".to_owned());
        }
        finish(p, "consumer config")
    }
}

/// What an engine reports about a consumer.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ConsumerInfo {
    /// The stream it reads.
    pub stream: StreamName,
    /// Its configuration.
    pub config: ConsumerConfig,
    /// Highest stream sequence delivered so far (`Seq(0)` if none).
    pub delivered: Seq,
    /// Every sequence at or below this is acked, terminated or dead-lettered.
    pub ack_floor: Seq,
    /// Matching messages not yet delivered.
    pub num_pending: u64,
    /// Delivered messages waiting for an ack.
    pub num_ack_pending: u64,
    /// Messages delivered more than once so far and still unacked.
    pub num_redelivered: u64,
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sn(s: &str) -> StreamName {
        StreamName::new(s).unwrap()
    }
    fn sp(s: &str) -> SubjectPattern {
        SubjectPattern::new(s).unwrap()
    }

    #[test]
    fn stream_config_reports_every_problem() {
        let mut c = StreamConfig::new(sn("S"), vec![sp("a.>"), sp("a.b")]);
        c.max_msgs = Some(0);
        c.max_msg_size = Some(MAX_PAYLOAD_LIMIT + 1);
        c.replicas = 0;
        let e = c.validate().unwrap_err();
        let m = e.message();
        for want in ["overlap", "max_msgs must be", "max_msg_size", "replicas"] {
            assert!(m.contains(want), "missing {want}: {m}");
        }
        assert!(StreamConfig::new(sn("S"), vec![sp("a.*")]).validate().is_ok());
        assert!(StreamConfig::new(sn("S"), vec![]).validate().is_err());
    }

    /// Regression (issue 21): a stream capturing `_INBOX.>`, `$KV.other.>`,
    /// `$JS.API.>` or `$SYS.>` would read other tenants' replies and values.
    #[test]
    fn reserved_subjects_are_refused() {
        for bad in ["_INBOX.>", "_INBOX", "_INBOXES.x", "$KV.other.>", "$JS.API.>", "$SYS.>", "$x", ">", "*.b", "*.>"] {
            let e = StreamConfig::new(sn("S"), vec![sp("ok.x"), sp(bad)]).validate().unwrap_err();
            assert_eq!(e.kind(), crate::ErrorKind::Invalid);
            assert!(e.message().contains(&format!("subject `{bad}`")), "{bad}: {e}");
        }
        for good in ["a.$x", "orders.>", "a._INBOX.>", "x.*", "INBOX.>", "KV.a"] {
            assert!(StreamConfig::new(sn("S"), vec![sp(good)]).validate().is_ok(), "{good}");
        }
    }

    #[test]
    fn bucket_history_is_1_to_64() {
        let mut b = BucketConfig::new(crate::BucketName::new("b").unwrap());
        b.history = 0;
        assert!(b.validate().unwrap_err().message().contains("history must be 1-64"));
        b.history = 65;
        assert!(b.validate().is_err());
        b.history = 64;
        assert!(b.validate().is_ok());
    }

    #[test]
    fn config_json_round_trip_and_unknown_fields() {
        let c = StreamConfig::new(sn("S"), vec![sp("a.>")]);
        let json = serde_json::to_string(&c).unwrap();
        assert_eq!(serde_json::from_str::<StreamConfig>(&json).unwrap(), c);
        let bad = r#"{"name":"S","subjects":["a"],"max_msg":3}"#;
        assert!(serde_json::from_str::<StreamConfig>(bad).unwrap_err().to_string().contains("max_msg"));
        let min: StreamConfig =
            serde_json::from_str(r#"{"name":"S","subjects":["a"],"sync":{"interval":{"ms":100}}}"#).unwrap();
        assert_eq!(min.sync, SyncPolicy::Interval { ms: 100 });
        assert_eq!(min.duplicate_window, DEFAULT_DUPLICATE_WINDOW);
    }

    /// An acked write is never lost unless the config says otherwise.
    #[test]
    fn streams_and_buckets_default_to_sync_always() {
        assert_eq!(SyncPolicy::default(), SyncPolicy::Always);
        assert_eq!(StreamConfig::new(sn("S"), vec![sp("a")]).sync, SyncPolicy::Always);
        assert_eq!(BucketConfig::new(crate::BucketName::new("b").unwrap()).sync, SyncPolicy::Always);
        let parsed: StreamConfig = serde_json::from_str(r#"{"name":"S","subjects":["a"]}"#).unwrap();
        assert_eq!(parsed.sync, SyncPolicy::Always);
        let parsed: BucketConfig = serde_json::from_str(r#"{"name":"b"}"#).unwrap();
        assert_eq!(parsed.sync, SyncPolicy::Always);
        let never: StreamConfig = serde_json::from_str(r#"{"name":"S","subjects":["a"],"sync":"never"}"#).unwrap();
        assert_eq!(never.sync, SyncPolicy::Never);
    }

    /// Configs written before buckets and streams had options (embedded
    /// engine records, API bodies) still parse, with no options; configs
    /// without options serialize as before.
    #[test]
    fn configs_without_options_parse_and_serialize_as_before() {
        let b: BucketConfig = serde_json::from_str(
            r#"{"name":"b","history":1,"ttl":null,"max_value_size":null,"max_bytes":null,"sync":"always","replicas":1}"#,
        )
        .unwrap();
        assert!(b.security.is_none() && b.metadata.is_empty());
        assert!(!serde_json::to_string(&b).unwrap().contains("security"));
        let s: StreamConfig = serde_json::from_str(r#"{"name":"S","subjects":["a"]}"#).unwrap();
        assert!(s.security.is_none() && s.metadata.is_empty());
        let json = serde_json::to_value(&s).unwrap();
        assert!(json.get("security").is_none() && json.get("metadata").is_none(), "{json}");
    }

    #[test]
    fn options_round_trip_and_are_validated() {
        let b: BucketConfig = serde_json::from_str(
            r#"{"name":"b","security":{"encryption":"aes256gcm","key_hashing":"hmac-sha256","key_format":"pan"},
                "metadata":{"owner":"cards-team"}}"#,
        )
        .unwrap();
        assert_eq!(b.security.options().len(), 3);
        assert_eq!(serde_json::from_value::<BucketConfig>(serde_json::to_value(&b).unwrap()).unwrap(), b);
        let bad = r#"{"name":"b","security":{"encryption":"rot13"}}"#;
        assert!(serde_json::from_str::<BucketConfig>(bad).unwrap_err().to_string().contains("rot13"));
        let bad = r#"{"name":"S","subjects":["a"],"security":{"key_format":"pan"}}"#;
        assert!(serde_json::from_str::<StreamConfig>(bad).is_err(), "key options are for buckets");
        let mut s = StreamConfig::new(sn("S"), vec![sp("a")]);
        s.metadata.insert("finmesh.encryption".into(), "x".into());
        let e = s.validate().unwrap_err();
        assert_eq!(e.kind(), crate::ErrorKind::Invalid);
        assert!(e.message().contains("reserved"), "{e}");
    }

    #[test]
    fn consumer_config_rules() {
        let mut c = ConsumerConfig::new(ConsumerName::new("c").unwrap());
        c.dead_letter = Some(sn("DLQ"));
        c.max_ack_pending = 0;
        let m = c.validate().unwrap_err();
        assert!(m.message().contains("dead_letter needs max_deliver"), "{m}");
        assert!(m.message().contains("max_ack_pending"), "{m}");
    }
}
