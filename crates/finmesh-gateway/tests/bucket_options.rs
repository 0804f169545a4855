//! Bucket and stream options over HTTP (issue 18): user metadata goes in
//! with the PUT body and comes back in the info; security options
//! (`encryption`, `key_hashing`, `key_format`) are refused with a 400
//! naming the option while the engine stack does not enforce them, so no
//! value is ever stored in clear under a promise of encryption; unknown
//! values are refused with a 400 naming them.

mod support;

use std::any::Any;
use std::sync::Arc;

use async_trait::async_trait;
use bytes::Bytes;
use finmesh_core::engine::{
    AckKind, AckToken, BoxStream, ConsumerEngine, Delivery, FetchRequest, KeysPage, KvEngine, KvEntry, ReadRequest,
    StreamEngine, TailEvent, WatchStart,
};
use finmesh_core::{
    BucketConfig, BucketInfo, BucketName, ConsumerConfig, ConsumerInfo, ConsumerName, Encryption, Engine, Key, Message,
    OutgoingMessage, PubAck, Result, Revision, SecurityOption, Seq, StreamConfig, StreamInfo, StreamName, Subject,
    SubjectPattern,
};
use serde_json::json;
use support::{Gw, Harness};

/// An engine stack that says it enforces `encryption = "aes256gcm"` (as
/// the encrypting wrapper will) and passes everything else through: the
/// capability hook the gateway consults.
struct EnforcesEncryption(Arc<dyn Engine>);

/// Harness `H`'s engine inside [`EnforcesEncryption`].
struct Encrypting<H>(std::marker::PhantomData<H>);

impl<H: Harness> Harness for Encrypting<H> {
    async fn start() -> (Arc<dyn Engine>, Box<dyn Any + Send + Sync>) {
        let (engine, guard) = H::start().await;
        (Arc::new(EnforcesEncryption(engine)), guard)
    }
}

#[async_trait]
impl StreamEngine for EnforcesEncryption {
    async fn create_stream(&self, c: StreamConfig) -> Result<StreamInfo> {
        self.0.create_stream(c).await
    }
    async fn update_stream(&self, c: StreamConfig) -> Result<StreamInfo> {
        self.0.update_stream(c).await
    }
    async fn stream_info(&self, s: &StreamName) -> Result<StreamInfo> {
        self.0.stream_info(s).await
    }
    async fn list_streams(&self) -> Result<Vec<StreamName>> {
        self.0.list_streams().await
    }
    async fn delete_stream(&self, s: &StreamName) -> Result<()> {
        self.0.delete_stream(s).await
    }
    async fn purge_stream(&self, s: &StreamName) -> Result<u64> {
        self.0.purge_stream(s).await
    }
    async fn publish(&self, s: &StreamName, m: OutgoingMessage) -> Result<PubAck> {
        self.0.publish(s, m).await
    }
    async fn publish_batch(&self, s: &StreamName, m: Vec<OutgoingMessage>) -> Result<Vec<PubAck>> {
        self.0.publish_batch(s, m).await
    }
    async fn get_message(&self, s: &StreamName, seq: Seq) -> Result<Message> {
        self.0.get_message(s, seq).await
    }
    async fn read(&self, s: &StreamName, r: ReadRequest) -> Result<Vec<Message>> {
        self.0.read(s, r).await
    }
    async fn last_message(&self, s: &StreamName, subject: &Subject) -> Result<Message> {
        self.0.last_message(s, subject).await
    }
    async fn last_per_subject(&self, s: &StreamName, f: Option<&SubjectPattern>) -> Result<Vec<Message>> {
        self.0.last_per_subject(s, f).await
    }
    async fn tail(&self, s: &StreamName, from: Seq, f: Option<SubjectPattern>) -> Result<BoxStream<TailEvent>> {
        self.0.tail(s, from, f).await
    }
    fn supports_stream_security(&self, option: SecurityOption) -> bool {
        option == SecurityOption::Encryption(Encryption::Aes256Gcm) || self.0.supports_stream_security(option)
    }
}

#[async_trait]
impl KvEngine for EnforcesEncryption {
    async fn create_bucket(&self, c: BucketConfig) -> Result<BucketInfo> {
        self.0.create_bucket(c).await
    }
    async fn update_bucket(&self, c: BucketConfig) -> Result<BucketInfo> {
        self.0.update_bucket(c).await
    }
    async fn bucket_info(&self, b: &BucketName) -> Result<BucketInfo> {
        self.0.bucket_info(b).await
    }
    async fn list_buckets(&self) -> Result<Vec<BucketName>> {
        self.0.list_buckets().await
    }
    async fn delete_bucket(&self, b: &BucketName) -> Result<()> {
        self.0.delete_bucket(b).await
    }
    async fn kv_get(&self, b: &BucketName, k: &Key) -> Result<Option<KvEntry>> {
        self.0.kv_get(b, k).await
    }
    async fn kv_get_revision(&self, b: &BucketName, k: &Key, r: Revision) -> Result<Option<KvEntry>> {
        self.0.kv_get_revision(b, k, r).await
    }
    async fn kv_put(&self, b: &BucketName, k: &Key, v: Bytes) -> Result<Revision> {
        self.0.kv_put(b, k, v).await
    }
    async fn kv_create(&self, b: &BucketName, k: &Key, v: Bytes) -> Result<Revision> {
        self.0.kv_create(b, k, v).await
    }
    async fn kv_update(&self, b: &BucketName, k: &Key, v: Bytes, r: Revision) -> Result<Revision> {
        self.0.kv_update(b, k, v, r).await
    }
    async fn kv_delete(&self, b: &BucketName, k: &Key) -> Result<Revision> {
        self.0.kv_delete(b, k).await
    }
    async fn kv_delete_if(&self, b: &BucketName, k: &Key, r: Revision) -> Result<Revision> {
        self.0.kv_delete_if(b, k, r).await
    }
    async fn kv_purge(&self, b: &BucketName, k: &Key) -> Result<Revision> {
        self.0.kv_purge(b, k).await
    }
    async fn kv_keys(&self, b: &BucketName, prefix: &str) -> Result<Vec<Key>> {
        self.0.kv_keys(b, prefix).await
    }
    async fn kv_keys_page(&self, b: &BucketName, p: &str, after: Option<&Key>, limit: usize) -> Result<KeysPage> {
        self.0.kv_keys_page(b, p, after, limit).await
    }
    fn supports_security(&self, option: SecurityOption) -> bool {
        option == SecurityOption::Encryption(Encryption::Aes256Gcm) || self.0.supports_security(option)
    }
    async fn kv_history(&self, b: &BucketName, k: &Key) -> Result<Vec<KvEntry>> {
        self.0.kv_history(b, k).await
    }
    async fn kv_watch(&self, b: &BucketName, prefix: &str, start: WatchStart) -> Result<BoxStream<KvEntry>> {
        self.0.kv_watch(b, prefix, start).await
    }
}

#[async_trait]
impl ConsumerEngine for EnforcesEncryption {
    async fn create_consumer(&self, s: &StreamName, c: ConsumerConfig) -> Result<ConsumerInfo> {
        self.0.create_consumer(s, c).await
    }
    async fn update_consumer(&self, s: &StreamName, c: ConsumerConfig) -> Result<ConsumerInfo> {
        self.0.update_consumer(s, c).await
    }
    async fn consumer_info(&self, s: &StreamName, c: &ConsumerName) -> Result<ConsumerInfo> {
        self.0.consumer_info(s, c).await
    }
    async fn list_consumers(&self, s: &StreamName) -> Result<Vec<ConsumerName>> {
        self.0.list_consumers(s).await
    }
    async fn delete_consumer(&self, s: &StreamName, c: &ConsumerName) -> Result<()> {
        self.0.delete_consumer(s, c).await
    }
    async fn fetch(&self, s: &StreamName, c: &ConsumerName, r: FetchRequest) -> Result<Vec<Delivery>> {
        self.0.fetch(s, c, r).await
    }
    async fn ack(&self, s: &StreamName, c: &ConsumerName, t: &AckToken, k: AckKind) -> Result<()> {
        self.0.ack(s, c, t, k).await
    }
    async fn ack_many(&self, s: &StreamName, c: &ConsumerName, t: &[AckToken], k: AckKind) -> Result<()> {
        self.0.ack_many(s, c, t, k).await
    }
    async fn ack_all(&self, s: &StreamName, c: &ConsumerName, upto: Seq) -> Result<()> {
        self.0.ack_all(s, c, upto).await
    }
}

async fn metadata_round_trips<H: Harness>() {
    let gw = Gw::start::<H>().await;
    let r = gw.put("/v1/kv/cards", json!({"history": 2, "metadata": {"owner": "cards-team"}}).to_string()).await;
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.json()["config"]["metadata"], json!({"owner": "cards-team"}));
    assert_eq!(gw.get("/v1/kv/cards").await.json()["config"]["metadata"], json!({"owner": "cards-team"}));
    let r = gw.put("/v1/kv/cards", json!({"history": 2, "metadata": {"owner": "risk", "tier": "1"}}).to_string()).await;
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(gw.get("/v1/kv/cards").await.json()["config"]["metadata"], json!({"owner": "risk", "tier": "1"}));
    // A bucket without options shows none.
    gw.put("/v1/kv/plain", "").await;
    let plain = gw.get("/v1/kv/plain").await.json();
    assert!(plain["config"].get("security").is_none() && plain["config"].get("metadata").is_none(), "{plain}");
    let body = json!({"subjects": ["md.>"], "metadata": {"feed": "prices"}});
    assert_eq!(
        gw.put("/v1/streams/MD", body.to_string()).await.json()["config"]["metadata"],
        json!({"feed": "prices"})
    );
    assert_eq!(gw.get("/v1/streams/MD").await.json()["config"]["metadata"], json!({"feed": "prices"}));
    for bad in [json!({"finmesh.encryption": "x"}), json!({"a b": "x"}), json!({"k": "v".repeat(513)})] {
        gw.put("/v1/kv/cards", json!({"history": 2, "metadata": bad}).to_string()).await.assert_problem(400, "invalid");
    }
    assert_eq!(gw.get("/v1/kv/cards").await.json()["config"]["metadata"], json!({"owner": "risk", "tier": "1"}));
}

async fn security_options_are_refused_until_enforced<H: Harness>() {
    let gw = Gw::start::<H>().await;
    for (security, field) in [
        (json!({"encryption": "aes256gcm"}), "encryption"),
        (json!({"key_hashing": "hmac-sha256"}), "key_hashing"),
        (json!({"key_format": "pan"}), "key_format"),
        (json!({"encryption": "aes256gcm", "key_hashing": "hmac-sha256", "key_format": "pan"}), "encryption"),
    ] {
        let p = gw.put("/v1/kv/cards", json!({"security": security}).to_string()).await.assert_problem(400, "invalid");
        let detail = p["detail"].as_str().unwrap();
        assert!(detail.contains(&format!("{field} is not available on this node yet")), "{detail}");
        gw.get("/v1/kv/cards").await.assert_problem(404, "not-found");
    }
    // Not on an existing bucket either.
    gw.put("/v1/kv/cards", "").await;
    let body = json!({"security": {"encryption": "aes256gcm"}}).to_string();
    gw.put("/v1/kv/cards", body).await.assert_problem(400, "invalid");
    assert!(gw.get("/v1/kv/cards").await.json()["config"].get("security").is_none());
    let body = json!({"subjects": ["s.>"], "security": {"encryption": "aes256gcm"}}).to_string();
    let p = gw.put("/v1/streams/S", body).await.assert_problem(400, "invalid");
    assert!(p["detail"].as_str().unwrap().contains("encryption is not available on this node yet"), "{p}");
    gw.get("/v1/streams/S").await.assert_problem(404, "not-found");
    // Unknown values and fields are named.
    for (security, named) in [
        (json!({"encryption": "aes128"}), "aes128"),
        (json!({"key_hashing": "md5"}), "md5"),
        (json!({"key_format": "iban"}), "iban"),
        (json!({"compression": "s2"}), "compression"),
    ] {
        let p = gw.put("/v1/kv/other", json!({"security": security}).to_string()).await.assert_problem(400, "invalid");
        assert!(p["detail"].as_str().unwrap().contains(named), "{p}");
    }
    let body = json!({"subjects": ["s.>"], "security": {"key_format": "pan"}}).to_string();
    gw.put("/v1/streams/S", body).await.assert_problem(400, "invalid");
}

/// A stack that enforces encryption may create encrypted buckets and
/// streams; the option comes back in the info, cannot change on update
/// (400), and the options the stack does not enforce are still refused.
async fn an_enforcing_stack_may_create_encrypted_buckets<H: Harness>() {
    let gw = Gw::start::<Encrypting<H>>().await;
    let body = json!({"history": 2, "security": {"encryption": "aes256gcm"}});
    let r = gw.put("/v1/kv/cards", body.to_string()).await;
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.json()["config"]["security"], json!({"encryption": "aes256gcm"}));
    assert_eq!(gw.get("/v1/kv/cards").await.json()["config"]["security"], json!({"encryption": "aes256gcm"}));
    assert_eq!(gw.put("/v1/kv/cards", body.to_string()).await.status, 200, "the same config again");
    let r = gw.put("/v1/kv/cards", json!({"history": 3, "security": {"encryption": "aes256gcm"}}).to_string()).await;
    assert_eq!(r.json()["config"]["history"], 3, "other fields may change");
    gw.put("/v1/kv/cards/k", "v").await;
    let p = gw.put("/v1/kv/cards", json!({"history": 3}).to_string()).await.assert_problem(400, "invalid");
    assert!(p["detail"].as_str().unwrap().contains("fixed at creation"), "{p}");
    assert_eq!(gw.get("/v1/kv/cards").await.json()["config"]["security"], json!({"encryption": "aes256gcm"}));
    let body = json!({"security": {"encryption": "aes256gcm", "key_hashing": "hmac-sha256"}});
    let p = gw.put("/v1/kv/hashed", body.to_string()).await.assert_problem(400, "invalid");
    assert!(p["detail"].as_str().unwrap().contains("key_hashing is not available on this node yet"), "{p}");
    let body = json!({"subjects": ["s.>"], "security": {"encryption": "aes256gcm"}});
    let r = gw.put("/v1/streams/S", body.to_string()).await;
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(gw.get("/v1/streams/S").await.json()["config"]["security"], json!({"encryption": "aes256gcm"}));
}

per_engine!(
    metadata_round_trips,
    security_options_are_refused_until_enforced,
    an_enforcing_stack_may_create_encrypted_buckets
);
