//! finmesh-nats: the NATS JetStream engine. Streams, KV buckets and durable
//! consumers live in a NATS server or cluster; finmesh keeps no state of its
//! own, so any number of engines (gateways) can share one cluster, and
//! everything survives an engine restart.
//!
//! Read in this order: [`options`] (configuration), `api` (JetStream
//! requests, error mapping, pull requests), `streams` (stream mapping and
//! reads), `publish` (acks, retries, pipelined batches), `snapshot`
//! (bounded reads through ephemeral consumers), `tail` (tails and KV
//! watches, resumed after reconnects), `kv` (standard KV buckets),
//! `consumers` (durable pull consumers and dead-lettering).
//!
//! # Mapping
//!
//! | finmesh | NATS |
//! |---|---|
//! | stream `S` | JetStream stream `S`, file storage, limits retention, discard old |
//! | KV bucket `b` | stream `KV_b` on `$KV.b.>`, the standard KV layout, readable by any NATS KV client |
//! | consumer | durable pull consumer, explicit ack |
//! | tail / watch | ephemeral ordered consumer, re-created from the last sequence seen |
//! | dead letter | the engine copies the message to the dead-letter stream on the delivery after `max_deliver`, then terminates it |
//!
//! # Durability
//!
//! A JetStream ack means the message is stored by the stream's leader (R1)
//! or by a quorum of its replicas (R3). The server writes it to its files
//! and fsyncs on its own schedule: `sync_interval` (default every 2
//! minutes) or `always`. That is a server-wide setting, so every stream's
//! [`StreamInfo`] reports [`NatsEngineOptions::server_sync`], which must
//! say how the server is configured. With R1 and the default, an ack
//! survives a process crash of the server only once the write reached the
//! OS (normally within milliseconds), and a power loss loses up to the last
//! interval; with R3, an acked message survives losing any one node.
//!
//! # Differences from the embedded engine
//!
//! Listed in the conformance suite (`finmesh_core::testsuite::Difference`)
//! and in `docs/nats.md`: byte counts include NATS's per-message overhead,
//! and `sync` is the server's policy.

pub mod options;

mod api;
mod consumers;
mod kv;
mod metadata;
mod publish;
mod snapshot;
mod streams;
mod tail;

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use bytes::Bytes;
use finmesh_core::{
    AckKind, AckToken, BoxStream, BucketConfig, BucketInfo, BucketName, ConsumerConfig, ConsumerEngine, ConsumerInfo,
    ConsumerName, Delivery, Error, ErrorKind, FetchRequest, Key, KvEngine, KvEntry, Message, OutgoingMessage, PubAck,
    ReadRequest, Result, Revision, Seq, StreamConfig, StreamEngine, StreamInfo, StreamName, Subject, SubjectPattern,
    TailEvent, WatchStart,
};
use parking_lot::Mutex;
use serde::Serialize;
use serde::de::DeserializeOwned;

pub use options::{NATS_DEFAULT_SYNC, NatsAuth, NatsEngineOptions};

/// The NATS engine: a cheap, cloneable handle on one NATS connection.
#[derive(Clone)]
pub struct NatsEngine {
    inner: Arc<Inner>,
}

/// What publishing needs to know about a stream.
pub(crate) struct StreamMeta {
    pub subjects: Vec<SubjectPattern>,
    pub max_msg_size: u32,
    /// More than one replica: reads check a short answer with the leader
    /// (see `Inner::read`).
    pub replicated: bool,
}

pub(crate) struct Inner {
    pub client: async_nats::Client,
    /// `$JS.API` or `$JS.<domain>.API`.
    pub prefix: String,
    pub options: NatsEngineOptions,
    /// Subjects and size limits of streams, so a publish needs no lookup.
    /// Entries are replaced by this engine's create/update, removed by its
    /// delete and by JetStream's stream advisories (changes made elsewhere);
    /// the lock is never held across an await.
    pub streams: Mutex<HashMap<String, Arc<StreamMeta>>>,
    /// Bucket value size limits and replicas, for the same reason.
    pub buckets: Mutex<HashMap<String, kv::BucketMeta>>,
}

impl Inner {
    pub(crate) async fn request<T: DeserializeOwned>(
        &self,
        subject: &str,
        body: &impl Serialize,
        what: &str,
    ) -> Result<T> {
        api::request(&self.client, &self.prefix, subject, body, self.options.request_timeout, what).await
    }

    /// A stream (or bucket) create or update: errors mapped by
    /// [`api::map_config_error`].
    pub(crate) async fn config_request<T: DeserializeOwned>(
        &self,
        subject: &str,
        body: &impl Serialize,
        what: &str,
    ) -> Result<T> {
        api::request_api(&self.client, &self.prefix, subject, body, self.options.request_timeout, what)
            .await?
            .map_err(|e| api::map_config_error(&e, what))
    }
}

impl NatsEngine {
    /// Connect to the servers of `options`, retrying with backoff (100 ms
    /// doubling to 2 s) up to `connect_attempts` times. The error names the
    /// URLs and the last cause.
    pub async fn connect(options: NatsEngineOptions) -> Result<NatsEngine> {
        options.validate()?;
        let urls = options.servers.join(", ");
        let mut backoff = Duration::from_millis(100);
        let mut attempt = 0;
        let client = loop {
            attempt += 1;
            let mut co = async_nats::ConnectOptions::new()
                .connection_timeout(options.connect_timeout)
                .request_timeout(Some(options.request_timeout))
                .name("finmesh");
            co = match &options.auth {
                NatsAuth::None => co,
                NatsAuth::Token { token } => co.token(token.clone()),
                NatsAuth::UserPassword { user, password } => co.user_and_password(user.clone(), password.clone()),
                NatsAuth::CredentialsFile { path } => co.credentials_file(path).await.map_err(|e| {
                    Error::invalid(format!("cannot read NATS credentials file {}: {e}", path.display()))
                })?,
            };
            match async_nats::connect_with_options(options.servers.clone(), co).await {
                Ok(c) => break c,
                Err(e) if attempt >= options.connect_attempts => {
                    let kind = match e.kind() {
                        async_nats::ConnectErrorKind::Authentication
                        | async_nats::ConnectErrorKind::AuthorizationViolation => ErrorKind::Unauthorized,
                        _ => ErrorKind::Unavailable,
                    };
                    return Err(Error::new(
                        kind,
                        format!("cannot connect to NATS at {urls} after {attempt} attempts: {e}"),
                    )
                    .with_source(e));
                }
                Err(e) => {
                    tracing::warn!(%urls, attempt, error = %e, "NATS connect failed; retrying");
                    tokio::time::sleep(backoff).await;
                    backoff = (backoff * 2).min(Duration::from_secs(2));
                }
            }
        };
        let prefix = match &options.domain {
            Some(d) => format!("$JS.{d}.API"),
            None => "$JS.API".to_owned(),
        };
        let inner = Arc::new(Inner {
            client,
            prefix,
            options,
            streams: Mutex::new(HashMap::new()),
            buckets: Mutex::new(HashMap::new()),
        });
        Inner::follow_stream_advisories(&inner).await;
        Ok(NatsEngine { inner })
    }

    /// The underlying async-nats client (for tools and tests).
    pub fn client(&self) -> &async_nats::Client {
        &self.inner.client
    }

    /// Flush pending writes and close the connection.
    pub async fn close(self) -> Result<()> {
        self.inner.client.drain().await.map_err(|e| Error::unavailable(format!("drain the NATS connection: {e}")))
    }
}

#[async_trait]
impl StreamEngine for NatsEngine {
    async fn create_stream(&self, config: StreamConfig) -> Result<StreamInfo> {
        self.inner.create_stream(config).await
    }
    async fn update_stream(&self, config: StreamConfig) -> Result<StreamInfo> {
        self.inner.update_stream(config).await
    }
    async fn stream_info(&self, stream: &StreamName) -> Result<StreamInfo> {
        self.inner.stream_info(stream).await
    }
    async fn list_streams(&self) -> Result<Vec<StreamName>> {
        self.inner.list_streams().await
    }
    async fn delete_stream(&self, stream: &StreamName) -> Result<()> {
        self.inner.delete_stream(stream).await
    }
    async fn purge_stream(&self, stream: &StreamName) -> Result<u64> {
        self.inner.purge_stream(stream).await
    }
    async fn publish(&self, stream: &StreamName, msg: OutgoingMessage) -> Result<PubAck> {
        self.inner.publish(stream, msg).await
    }
    async fn publish_batch(&self, stream: &StreamName, msgs: Vec<OutgoingMessage>) -> Result<Vec<PubAck>> {
        self.inner.publish_batch(stream, msgs).await
    }
    async fn get_message(&self, stream: &StreamName, seq: Seq) -> Result<Message> {
        self.inner.get_message(stream, seq).await
    }
    async fn read(&self, stream: &StreamName, request: ReadRequest) -> Result<Vec<Message>> {
        self.inner.read(stream, request).await
    }
    async fn last_message(&self, stream: &StreamName, subject: &Subject) -> Result<Message> {
        self.inner.last_message(stream, subject).await
    }
    async fn last_per_subject(&self, stream: &StreamName, filter: Option<&SubjectPattern>) -> Result<Vec<Message>> {
        self.inner.last_per_subject(stream, filter).await
    }
    async fn tail(
        &self,
        stream: &StreamName,
        from: Seq,
        filter: Option<SubjectPattern>,
    ) -> Result<BoxStream<TailEvent>> {
        tail::tail(self.inner.clone(), stream, from, filter).await
    }
}

#[async_trait]
impl KvEngine for NatsEngine {
    async fn create_bucket(&self, config: BucketConfig) -> Result<BucketInfo> {
        self.inner.create_bucket(config).await
    }
    async fn update_bucket(&self, config: BucketConfig) -> Result<BucketInfo> {
        self.inner.update_bucket(config).await
    }
    async fn bucket_info(&self, bucket: &BucketName) -> Result<BucketInfo> {
        self.inner.bucket_info(bucket).await
    }
    async fn list_buckets(&self) -> Result<Vec<BucketName>> {
        self.inner.list_buckets().await
    }
    async fn delete_bucket(&self, bucket: &BucketName) -> Result<()> {
        self.inner.delete_bucket(bucket).await
    }
    async fn kv_get(&self, bucket: &BucketName, key: &Key) -> Result<Option<KvEntry>> {
        self.inner.kv_get(bucket, key).await
    }
    async fn kv_get_revision(&self, bucket: &BucketName, key: &Key, revision: Revision) -> Result<Option<KvEntry>> {
        self.inner.kv_get_revision(bucket, key, revision).await
    }
    async fn kv_put(&self, bucket: &BucketName, key: &Key, value: Bytes) -> Result<Revision> {
        self.inner.kv_put(bucket, key, value).await
    }
    async fn kv_create(&self, bucket: &BucketName, key: &Key, value: Bytes) -> Result<Revision> {
        self.inner.kv_create(bucket, key, value).await
    }
    async fn kv_update(&self, bucket: &BucketName, key: &Key, value: Bytes, expected: Revision) -> Result<Revision> {
        self.inner.kv_update(bucket, key, value, expected).await
    }
    async fn kv_delete(&self, bucket: &BucketName, key: &Key) -> Result<Revision> {
        self.inner.kv_marker(bucket, key, false, None).await
    }
    async fn kv_delete_if(&self, bucket: &BucketName, key: &Key, expected: Revision) -> Result<Revision> {
        self.inner.kv_marker(bucket, key, false, Some(expected)).await
    }
    async fn kv_purge(&self, bucket: &BucketName, key: &Key) -> Result<Revision> {
        self.inner.kv_marker(bucket, key, true, None).await
    }
    async fn kv_keys(&self, bucket: &BucketName, prefix: &str) -> Result<Vec<Key>> {
        self.inner.kv_keys(bucket, prefix).await
    }
    async fn kv_keys_page(
        &self,
        bucket: &BucketName,
        prefix: &str,
        after: Option<&Key>,
        limit: usize,
    ) -> Result<finmesh_core::KeysPage> {
        self.inner.kv_keys_page(bucket, prefix, after, limit).await
    }
    async fn kv_history(&self, bucket: &BucketName, key: &Key) -> Result<Vec<KvEntry>> {
        self.inner.kv_history(bucket, key).await
    }
    async fn kv_watch(&self, bucket: &BucketName, prefix: &str, start: WatchStart) -> Result<BoxStream<KvEntry>> {
        tail::watch(self.inner.clone(), bucket, prefix, start).await
    }
}

#[async_trait]
impl ConsumerEngine for NatsEngine {
    async fn create_consumer(&self, stream: &StreamName, config: ConsumerConfig) -> Result<ConsumerInfo> {
        self.inner.create_consumer(stream, config).await
    }
    async fn update_consumer(&self, stream: &StreamName, config: ConsumerConfig) -> Result<ConsumerInfo> {
        self.inner.update_consumer(stream, config).await
    }
    async fn consumer_info(&self, stream: &StreamName, consumer: &ConsumerName) -> Result<ConsumerInfo> {
        self.inner.consumer_info(stream, consumer).await
    }
    async fn list_consumers(&self, stream: &StreamName) -> Result<Vec<ConsumerName>> {
        self.inner.list_consumers(stream).await
    }
    async fn delete_consumer(&self, stream: &StreamName, consumer: &ConsumerName) -> Result<()> {
        self.inner.delete_consumer(stream, consumer).await
    }
    async fn fetch(
        &self,
        stream: &StreamName,
        consumer: &ConsumerName,
        request: FetchRequest,
    ) -> Result<Vec<Delivery>> {
        self.inner.fetch(stream, consumer, request).await
    }
    async fn ack(&self, stream: &StreamName, consumer: &ConsumerName, token: &AckToken, kind: AckKind) -> Result<()> {
        self.inner.ack(stream, consumer, token, kind).await
    }
    async fn ack_many(
        &self,
        stream: &StreamName,
        consumer: &ConsumerName,
        tokens: &[AckToken],
        kind: AckKind,
    ) -> Result<()> {
        self.inner.ack_many(stream, consumer, tokens, kind).await
    }
    async fn ack_all(&self, stream: &StreamName, consumer: &ConsumerName, upto: Seq) -> Result<()> {
        self.inner.ack_all(stream, consumer, upto).await
    }
}
