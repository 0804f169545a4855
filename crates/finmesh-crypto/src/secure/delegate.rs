//! The stream and consumer halves of [`SecureEngine`]: passed through to
//! the inner engine unchanged. Stream payloads are not sealed, so the
//! wrapper does not claim any stream option
//! ([`StreamEngine::supports_stream_security`] is the inner engine's).

use async_trait::async_trait;
use finmesh_core::{
    AckKind, AckToken, BoxStream, ConsumerConfig, ConsumerEngine, ConsumerInfo, ConsumerName, Delivery, FetchRequest,
    Message, OutgoingMessage, PubAck, ReadRequest, Result, Seq, StreamConfig, StreamEngine, StreamInfo, StreamName,
    Subject, SubjectPattern, TailEvent,
};

use super::SecureEngine;

#[async_trait]
impl StreamEngine for SecureEngine {
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
        self.inner.tail(stream, from, filter).await
    }

    fn supports_stream_security(&self, option: finmesh_core::SecurityOption) -> bool {
        self.inner.supports_stream_security(option)
    }
}

#[async_trait]
impl ConsumerEngine for SecureEngine {
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
