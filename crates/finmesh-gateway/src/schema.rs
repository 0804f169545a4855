//! Response bodies the gateway owns, typed so the OpenAPI document
//! describes them exactly. Handlers serialize these types (or, for
//! envelopes built as bytes on hot paths, documents shaped like
//! [`Envelope`], [`KvEnvelope`] and [`Delivery`]). Also request bodies
//! whose Rust type lives in `finmesh-core` without a schema
//! ([`StreamConfigBody`]); a test keeps each in step with its core type.

use serde::Serialize;
use utoipa::ToSchema;

/// `{"buckets": [...]}`.
#[derive(Debug, Serialize, ToSchema)]
pub struct BucketList {
    /// Bucket names, sorted.
    #[schema(value_type = Vec<String>)]
    pub buckets: Vec<finmesh_core::BucketName>,
}

/// `{"streams": [...]}`.
#[derive(Debug, Serialize, ToSchema)]
pub struct StreamList {
    /// Stream names, sorted.
    #[schema(value_type = Vec<String>)]
    pub streams: Vec<finmesh_core::StreamName>,
}

/// `{"consumers": [...]}`.
#[derive(Debug, Serialize, ToSchema)]
pub struct ConsumerList {
    /// Consumer names, sorted.
    #[schema(value_type = Vec<String>)]
    pub consumers: Vec<finmesh_core::ConsumerName>,
}

/// `{"keys": [...], "next": ...}`: one page of a key listing.
#[derive(Debug, Serialize, ToSchema)]
pub struct KeyList {
    /// Live keys, sorted bytewise.
    #[schema(value_type = Vec<String>)]
    pub keys: Vec<finmesh_core::Key>,
    /// Pass as `?after=` for the next page; `null` on the last page.
    #[schema(value_type = Option<String>)]
    pub next: Option<finmesh_core::Key>,
}

/// The body of `PUT /v1/streams/{stream}`: `finmesh_core::StreamConfig`
/// as JSON (durations in milliseconds), its `name` optional (the path's).
/// Only documents the body; the handler parses a `StreamConfig`, and
/// `stream_config_body_documents_every_stream_config_field` keeps the two
/// alike.
#[derive(Debug, Serialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct StreamConfigBody {
    /// The stream's name; when given, the same as the path's.
    pub name: Option<String>,
    /// Subject patterns the stream captures (`*` one token, `>` the rest);
    /// none may overlap another, nor another stream's.
    #[schema(min_items = 1)]
    pub subjects: Vec<String>,
    /// Keep at most this many messages (absent: no limit).
    #[schema(minimum = 1)]
    pub max_msgs: Option<u64>,
    /// Keep at most this many bytes (absent: no limit).
    #[schema(minimum = 1)]
    pub max_bytes: Option<u64>,
    /// Drop messages older than this many milliseconds (absent: never).
    #[schema(minimum = 1)]
    pub max_age: Option<u64>,
    /// Keep at most this many messages per subject (absent: no limit).
    #[schema(minimum = 1)]
    pub max_msgs_per_subject: Option<u64>,
    /// Refuse larger messages (default and maximum 8 MiB).
    #[schema(minimum = 1, maximum = 8388608)]
    pub max_msg_size: Option<u32>,
    /// Milliseconds in which a repeated `Msg-Id` is a duplicate (default
    /// 120000; at most `max_age`).
    pub duplicate_window: Option<u64>,
    /// Durability of acks (default `never`).
    pub sync: Option<SyncBody>,
    /// Copies kept by a clustered engine, 1-5 (default 1).
    #[schema(minimum = 1, maximum = 5)]
    pub replicas: Option<u8>,
    /// Security options, fixed at creation; refused (400) by a node whose
    /// engine stack does not enforce them.
    pub security: Option<StreamSecurityBody>,
    /// User metadata: at most 16 entries, keys of 1-64 bytes of
    /// `A-Z a-z 0-9 . _ -` not starting with `finmesh.` or `_nats.`,
    /// values of at most 512 bytes.
    #[schema(value_type = Option<std::collections::BTreeMap<String, String>>)]
    pub metadata: Option<serde_json::Value>,
}

/// `finmesh_core::StreamSecurity` as JSON.
#[derive(Debug, Serialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct StreamSecurityBody {
    /// `aes256gcm`: payloads sealed before they reach storage.
    #[schema(pattern = "^aes256gcm$")]
    pub encryption: Option<String>,
}

/// `finmesh_core::BucketSecurity` as JSON.
#[derive(Debug, Serialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct BucketSecurityBody {
    /// `aes256gcm`: values sealed before they reach storage.
    #[schema(pattern = "^aes256gcm$")]
    pub encryption: Option<String>,
    /// `hmac-sha256`: keys stored as a keyed hash.
    #[schema(pattern = "^hmac-sha256$")]
    pub key_hashing: Option<String>,
    /// `pan`: keys must be card numbers.
    #[schema(pattern = "^pan$")]
    pub key_format: Option<String>,
}

/// The body of `PUT /v1/kv/{bucket}`: `finmesh_core::BucketConfig` as
/// JSON (durations in milliseconds), its `name` optional (the path's); an
/// empty body means all defaults. Only documents the body, as
/// [`StreamConfigBody`]; `bucket_config_body_documents_every_bucket_config_field`
/// keeps the two alike.
#[derive(Debug, Serialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct BucketConfigBody {
    /// The bucket's name; when given, the same as the path's.
    pub name: Option<String>,
    /// Revisions kept per key, 1-64 (default 1).
    #[schema(minimum = 1, maximum = 64)]
    pub history: Option<u8>,
    /// Entries older than this many milliseconds disappear (at least 100; absent: never).
    #[schema(minimum = 100)]
    pub ttl: Option<u64>,
    /// Refuse larger values (default and maximum 8 MiB).
    #[schema(minimum = 1, maximum = 8388608)]
    pub max_value_size: Option<u32>,
    /// Keep at most this many bytes; a write past it is refused (absent: no limit).
    #[schema(minimum = 1)]
    pub max_bytes: Option<u64>,
    /// Durability of acks (default `always`).
    pub sync: Option<SyncBody>,
    /// Copies kept by a clustered engine, 1-5 (default 1).
    #[schema(minimum = 1, maximum = 5)]
    pub replicas: Option<u8>,
    /// Security options, fixed at creation; refused (400) by a node whose
    /// engine stack does not enforce them.
    pub security: Option<BucketSecurityBody>,
    /// User metadata, as a stream's.
    #[schema(value_type = Option<std::collections::BTreeMap<String, String>>)]
    pub metadata: Option<serde_json::Value>,
}

/// `finmesh_core::SyncPolicy` as JSON: `"always"`, `"never"` or
/// `{"interval": {"ms": n}}`.
#[derive(Debug, Serialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum SyncBody {
    /// Ack after fsync: survives power loss.
    Always,
    /// Ack once the OS has the write, fsync at least every `ms`.
    Interval {
        /// Milliseconds between fsyncs.
        #[schema(minimum = 1)]
        ms: u64,
    },
    /// Ack once the OS has the write; fsync when the OS decides.
    Never,
}

/// The revision a KV write (or delete marker) got.
#[derive(Debug, Serialize, ToSchema)]
pub struct Written {
    /// Bucket-wide revision.
    pub revision: u64,
}

/// The ack of one published message.
#[derive(Debug, Serialize, ToSchema)]
pub struct Ack {
    /// Its stream sequence (for a duplicate: the original's).
    pub seq: u64,
    /// The message id was seen within the duplicate window; nothing stored.
    pub duplicate: bool,
}

impl From<&finmesh_core::PubAck> for Ack {
    fn from(a: &finmesh_core::PubAck) -> Self {
        Ack { seq: a.seq.0, duplicate: a.duplicate }
    }
}

/// The acks of a batch, in line order.
#[derive(Debug, Serialize, ToSchema)]
pub struct Acks {
    /// One ack per message.
    pub acks: Vec<Ack>,
}

/// `{"status": "ok" | "ready"}`.
#[derive(Debug, Serialize, ToSchema)]
pub struct Status {
    /// `ok` (healthz) or `ready` (readyz).
    pub status: &'static str,
}

/// A stream message as sent to clients (see `crate::envelope`).
#[derive(Debug, Serialize, ToSchema)]
pub struct Envelope {
    /// Stream sequence.
    pub seq: u64,
    /// Subject.
    pub subject: String,
    /// RFC 3339 UTC time the stream stored it.
    pub time: String,
    /// Headers (omitted when none); a repeated name maps to an array.
    #[schema(value_type = Option<Object>)]
    pub headers: Option<serde_json::Value>,
    /// The payload: inline JSON, or a base64 string when `encoding` is set.
    pub payload: serde_json::Value,
    /// `base64` when the payload is not JSON.
    pub encoding: Option<String>,
}

/// A KV entry as sent by watch and history.
#[derive(Debug, Serialize, ToSchema)]
pub struct KvEnvelope {
    /// Bucket-wide revision.
    pub revision: u64,
    /// Key.
    pub key: String,
    /// `put`, `delete` or `purge`.
    pub op: String,
    /// RFC 3339 UTC time of the revision.
    pub time: String,
    /// The value (absent on markers): inline JSON or base64.
    pub payload: Option<serde_json::Value>,
    /// `base64` when the value is not JSON.
    pub encoding: Option<String>,
}

/// `{"entries": [...]}`, oldest first.
#[derive(Debug, Serialize, ToSchema)]
pub struct History {
    /// Every kept entry of the key, markers included.
    pub entries: Vec<KvEnvelope>,
}

/// A delivery of a durable consumer: an envelope plus ack data.
#[derive(Debug, Serialize, ToSchema)]
pub struct Delivery {
    /// The message.
    #[serde(flatten)]
    pub message: Envelope,
    /// 1 on first delivery, then 2, 3, …
    pub delivery_count: u32,
    /// Pass back to `.../ack`.
    pub token: String,
}

/// `{"messages": [...]}` of a fetch.
#[derive(Debug, Serialize, ToSchema)]
pub struct Fetched {
    /// Deliveries, due redeliveries first.
    pub messages: Vec<Delivery>,
}

/// A rate as reported by `/v1/subscribers`.
#[derive(Debug, Clone, Copy, Serialize, ToSchema)]
pub struct RateInfo {
    /// Sustained requests per second.
    pub per_second: u32,
    /// Burst allowance.
    pub burst: u32,
}

/// `{"node", "subscribers": [...], "registered": [...]}`.
#[derive(Debug, Serialize, ToSchema)]
pub struct SubscriberList {
    /// The answering node: connections and status are this node's.
    pub node: String,
    /// Connected subscribers, by id.
    pub subscribers: Vec<crate::subscribe::SubscriberInfo>,
    /// The subscriber registry, each with its live status on this node.
    pub registered: Vec<crate::registry::routes::RegisteredSubscriber>,
}

/// The answer of a ready `/readyz`.
#[derive(Debug, Serialize, ToSchema)]
pub struct Readiness {
    /// `ready`.
    pub status: &'static str,
    /// Registered subscribers disconnected from this node for longer than
    /// `subscriptions.registered_disconnect_alert` (a detail: readiness
    /// does not fail for them). Absent when none.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub disconnected_subscribers: Vec<DisconnectedSubscriber>,
}

/// A registered subscriber without a connection on this node.
#[derive(Debug, Serialize, ToSchema)]
pub struct DisconnectedSubscriber {
    /// Its id.
    pub id: String,
    /// Seconds since it had a connection here (or since the node started).
    pub seconds: u64,
}

/// The form body of `POST /oauth/token` (`application/x-www-form-urlencoded`).
#[derive(Debug, Serialize, ToSchema)]
pub struct TokenForm {
    /// Must be `client_credentials`.
    pub grant_type: String,
    /// Space-separated scopes, each within one the client may have; absent =
    /// all of them.
    pub scope: Option<String>,
    /// Form client authentication, when no Basic header is sent.
    pub client_id: Option<String>,
    /// Form client authentication, with `client_id`.
    pub client_secret: Option<String>,
}

/// A granted token (RFC 6749 §5.1), as `finmesh_auth::TokenResponse` serializes.
#[derive(Debug, Serialize, ToSchema)]
pub struct TokenGrant {
    /// The signed JWT.
    pub access_token: String,
    /// Always `Bearer`.
    pub token_type: String,
    /// Lifetime in seconds.
    pub expires_in: u64,
    /// The granted scopes, space-separated.
    pub scope: String,
}

/// An OAuth error (RFC 6749 §5.2), as `finmesh_auth::OAuthError` serializes.
#[derive(Debug, Serialize, ToSchema)]
pub struct OAuthErrorBody {
    /// `invalid_request`, `invalid_client`, `unsupported_grant_type`,
    /// `invalid_scope` or `server_error`.
    pub error: String,
    /// What went wrong; never contains a secret.
    pub error_description: String,
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeSet;

    use finmesh_core::{StreamConfig, StreamName, SubjectPattern};
    use utoipa::OpenApi;

    /// The documented stream body has exactly the fields of `StreamConfig`,
    /// and the bounds it documents are the ones `StreamConfig` validates.
    #[test]
    fn stream_config_body_documents_every_stream_config_field() {
        let name = StreamName::new("S").unwrap();
        let mut config = StreamConfig::new(name, vec![SubjectPattern::new("s.>").unwrap()]);
        config.security.encryption = Some(finmesh_core::Encryption::Aes256Gcm);
        config.metadata.insert("owner".into(), "team".into());
        let fields: BTreeSet<String> =
            serde_json::to_value(&config).unwrap().as_object().unwrap().keys().cloned().collect();
        let doc = serde_json::to_value(crate::openapi::ApiDoc::openapi()).unwrap();
        let schema = &doc["components"]["schemas"]["StreamConfigBody"];
        let documented: BTreeSet<String> = schema["properties"].as_object().unwrap().keys().cloned().collect();
        assert_eq!(documented, fields);
        assert_eq!(schema["additionalProperties"], false);
        assert_eq!(schema["required"], serde_json::json!(["subjects"]));
        let max_size = schema["properties"]["max_msg_size"]["maximum"].as_u64().unwrap();
        assert_eq!(max_size, u64::from(finmesh_core::config::MAX_PAYLOAD_LIMIT));
        let parse = |v: serde_json::Value| serde_json::from_value::<StreamConfig>(v).unwrap().validate();
        let max = serde_json::json!({"name": "S", "subjects": ["s.>"], "max_msg_size": max_size, "replicas": 5});
        assert!(parse(max).is_ok());
        let over = serde_json::json!({"name": "S", "subjects": ["s.>"], "max_msg_size": max_size + 1});
        assert!(parse(over).is_err());
        assert!(parse(serde_json::json!({"name": "S", "subjects": ["s.>"], "replicas": 6})).is_err());
        use finmesh_core::SyncPolicy;
        for (core, doc) in [
            (SyncPolicy::Always, super::SyncBody::Always),
            (SyncPolicy::Never, super::SyncBody::Never),
            (SyncPolicy::Interval { ms: 7 }, super::SyncBody::Interval { ms: 7 }),
        ] {
            assert_eq!(serde_json::to_value(core).unwrap(), serde_json::to_value(doc).unwrap());
        }
    }
}

#[cfg(test)]
mod bucket_body_tests {
    use std::collections::BTreeSet;

    use finmesh_core::{BucketConfig, BucketName, BucketSecurity, Encryption, KeyFormat, KeyHashing};
    use utoipa::OpenApi;

    /// The documented bucket body has exactly the fields of `BucketConfig`
    /// (security options included), with the bounds `BucketConfig` validates.
    #[test]
    fn bucket_config_body_documents_every_bucket_config_field() {
        let mut config = BucketConfig::new(BucketName::new("b").unwrap());
        config.security = BucketSecurity {
            encryption: Some(Encryption::Aes256Gcm),
            key_hashing: Some(KeyHashing::HmacSha256),
            key_format: Some(KeyFormat::Pan),
        };
        config.metadata.insert("owner".into(), "team".into());
        let value = serde_json::to_value(&config).unwrap();
        let fields: BTreeSet<String> = value.as_object().unwrap().keys().cloned().collect();
        let doc = serde_json::to_value(crate::openapi::ApiDoc::openapi()).unwrap();
        let schemas = &doc["components"]["schemas"];
        let schema = &schemas["BucketConfigBody"];
        let documented: BTreeSet<String> = schema["properties"].as_object().unwrap().keys().cloned().collect();
        assert_eq!(documented, fields);
        assert_eq!(schema["additionalProperties"], false);
        let security: BTreeSet<String> = value["security"].as_object().unwrap().keys().cloned().collect();
        let documented: BTreeSet<String> =
            schemas["BucketSecurityBody"]["properties"].as_object().unwrap().keys().cloned().collect();
        assert_eq!(documented, security);
        for (field, v) in value["security"].as_object().unwrap() {
            let pattern = schemas["BucketSecurityBody"]["properties"][field]["pattern"].as_str().unwrap();
            assert_eq!(pattern, format!("^{}$", v.as_str().unwrap()));
        }
        assert_eq!(schema["properties"]["history"]["maximum"], u64::from(finmesh_core::config::MAX_HISTORY));
    }
}
