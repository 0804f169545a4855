//! A counting wrapper around a real engine: every call goes to the engine
//! it wraps; `read` and `tail` calls are counted, so a test can assert how
//! often the gateway asked the engine (not a mock: the engine does the work).
//! It can also hold back one `kv_update` of a key
//! ([`CountingEngine::pause_update`]), so a test can put another write
//! between a compare-and-set's read and its write.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use async_trait::async_trait;
use bytes::Bytes;
use finmesh_core::*;
use tokio::sync::oneshot;

pub struct CountingEngine {
    pub inner: Arc<dyn Engine>,
    pub reads: AtomicU64,
    pub tails: AtomicU64,
    /// The `kv_update` to hold back, if any.
    pause: parking_lot::Mutex<Option<UpdatePause>>,
}

/// The next `kv_update` of `key`: tell `reached`, then wait for `go`.
struct UpdatePause {
    key: Key,
    reached: oneshot::Sender<()>,
    go: oneshot::Receiver<()>,
}

impl CountingEngine {
    pub fn new(inner: Arc<dyn Engine>) -> Arc<Self> {
        Arc::new(CountingEngine {
            inner,
            reads: AtomicU64::new(0),
            tails: AtomicU64::new(0),
            pause: parking_lot::Mutex::new(None),
        })
    }

    /// Hold back the next `kv_update` of `key` before it reaches the
    /// engine: the first receiver resolves when it arrives, and it goes on
    /// when the sender is used (or dropped).
    pub fn pause_update(&self, key: Key) -> (oneshot::Receiver<()>, oneshot::Sender<()>) {
        let (reached_tx, reached_rx) = oneshot::channel();
        let (go_tx, go_rx) = oneshot::channel();
        *self.pause.lock() = Some(UpdatePause { key, reached: reached_tx, go: go_rx });
        (reached_rx, go_tx)
    }

    /// Forget a pause not reached yet (its first receiver then fails).
    pub fn clear_pause(&self) {
        *self.pause.lock() = None;
    }

    pub fn reads(&self) -> u64 {
        self.reads.load(Ordering::SeqCst)
    }

    pub fn tails(&self) -> u64 {
        self.tails.load(Ordering::SeqCst)
    }
}

#[async_trait]
impl StreamEngine for CountingEngine {
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
        self.reads.fetch_add(1, Ordering::SeqCst);
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
        self.tails.fetch_add(1, Ordering::SeqCst);
        self.inner.tail(stream, from, filter).await
    }
}

#[async_trait]
impl KvEngine for CountingEngine {
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
        let paused = {
            let mut pause = self.pause.lock();
            match pause.take() {
                Some(p) if &p.key == key => Some(p),
                other => {
                    *pause = other;
                    None
                }
            }
        };
        if let Some(p) = paused {
            let _ = p.reached.send(());
            let _ = p.go.await;
        }
        self.inner.kv_update(bucket, key, value, expected).await
    }

    async fn kv_delete(&self, bucket: &BucketName, key: &Key) -> Result<Revision> {
        self.inner.kv_delete(bucket, key).await
    }

    async fn kv_delete_if(&self, bucket: &BucketName, key: &Key, expected: Revision) -> Result<Revision> {
        self.inner.kv_delete_if(bucket, key, expected).await
    }

    async fn kv_purge(&self, bucket: &BucketName, key: &Key) -> Result<Revision> {
        self.inner.kv_purge(bucket, key).await
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
    ) -> Result<KeysPage> {
        self.inner.kv_keys_page(bucket, prefix, after, limit).await
    }

    async fn kv_history(&self, bucket: &BucketName, key: &Key) -> Result<Vec<KvEntry>> {
        self.inner.kv_history(bucket, key).await
    }

    async fn kv_watch(&self, bucket: &BucketName, prefix: &str, start: WatchStart) -> Result<BoxStream<KvEntry>> {
        self.inner.kv_watch(bucket, prefix, start).await
    }
}

#[async_trait]
impl ConsumerEngine for CountingEngine {
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
