//! Publishing: one message, or a batch with pipelined acks.
//!
//! Every message is checked before anything is sent: the subject must be
//! captured by the named stream (`Invalid`), the size (subject + headers +
//! payload) within `max_msg_size` (`TooLarge`), a `Nats-Msg-Id` at most 256
//! bytes (`Invalid`). A batch is refused whole if one message fails a check.
//!
//! Acks: a publish is a request; the caller gets the JetStream ack or an
//! error, never silence. A publish that got no answer within the request
//! timeout is retried (until the timeout's budget is spent) only when the
//! message has a `Nats-Msg-Id`, so the stream's duplicate window makes the
//! retry harmless and the message is stored once; without an id the caller
//! gets `Timeout` and decides. "No responders" (the stream's leader is
//! moving, the server is restarting) means nothing was stored and is retried
//! with backoff for any message.
//!
//! A batch is sent in order on one connection with at most
//! `max_in_flight` acks outstanding; acks are collected on one inbox
//! subscription (`<inbox>.<index>`) and returned in batch order.

use std::time::Duration;

use async_nats::jetstream::publish::PublishAck;
use finmesh_core::{Error, ErrorKind, OutgoingMessage, PubAck, Result, Seq, StreamName};
use futures::StreamExt;

use crate::api::{self, decode_reply};
use crate::{Inner, StreamMeta};

/// Longest `Nats-Msg-Id` accepted.
const MAX_MSG_ID_LEN: usize = 256;

fn check(stream: &StreamName, meta: &StreamMeta, m: &OutgoingMessage) -> Result<()> {
    if !meta.subjects.iter().any(|p| p.matches(&m.subject)) {
        return Err(Error::invalid(format!("stream `{stream}` does not capture subject `{}`", m.subject)));
    }
    if m.size() > meta.max_msg_size as usize {
        return Err(Error::too_large(format!(
            "message of {} bytes exceeds the stream's limit of {} bytes",
            m.size(),
            meta.max_msg_size
        )));
    }
    if let Some(id) = m.msg_id()
        && id.len() > MAX_MSG_ID_LEN
    {
        return Err(Error::invalid(format!("message id is {} bytes; the limit is {MAX_MSG_ID_LEN}", id.len())));
    }
    Ok(())
}

fn to_ack(a: PublishAck) -> PubAck {
    PubAck { seq: Seq(a.sequence), duplicate: a.duplicate }
}

impl Inner {
    pub(crate) async fn publish(&self, stream: &StreamName, msg: OutgoingMessage) -> Result<PubAck> {
        let meta = self.stream_meta(stream).await?;
        check(stream, &meta, &msg)?;
        self.send_one(&msg).await.map(to_ack)
    }

    /// One publish with the retry rules of the module doc.
    pub(crate) async fn send_one(&self, msg: &OutgoingMessage) -> Result<PublishAck> {
        let budget = tokio::time::Instant::now() + self.options.request_timeout;
        let mut backoff = Duration::from_millis(20);
        loop {
            let req = async_nats::Request::new()
                .headers(api::headers_to(&msg.headers))
                .payload(msg.payload.clone())
                .timeout(Some(self.options.request_timeout));
            let err = match self.client.send_request(msg.subject.as_str().to_owned(), req).await {
                Ok(reply) => return decode_reply(&reply.payload, &format!("publish to `{}`", msg.subject)),
                Err(e) => api::map_request_error(e, &format!("publish to `{}`", msg.subject)),
            };
            let retry = match err.kind() {
                ErrorKind::Unavailable => true,
                ErrorKind::Timeout => msg.msg_id().is_some(),
                _ => false,
            };
            if !retry || tokio::time::Instant::now() + backoff >= budget {
                return Err(err);
            }
            tracing::debug!(subject = %msg.subject, error = %err, "publish retried");
            tokio::time::sleep(backoff).await;
            backoff = (backoff * 2).min(Duration::from_millis(500));
        }
    }

    pub(crate) async fn publish_batch(&self, stream: &StreamName, msgs: Vec<OutgoingMessage>) -> Result<Vec<PubAck>> {
        let meta = self.stream_meta(stream).await?;
        for m in &msgs {
            check(stream, &meta, m)?;
        }
        if msgs.len() <= 1 {
            let mut out = Vec::with_capacity(msgs.len());
            for m in &msgs {
                out.push(to_ack(self.send_one(m).await?));
            }
            return Ok(out);
        }
        let inbox = self.client.new_inbox();
        let mut sub = self
            .client
            .subscribe(format!("{inbox}.*"))
            .await
            .map_err(|e| Error::unavailable(format!("subscribe for publish acks: {e}")).with_source(e))?;
        let n = msgs.len();
        let mut acks: Vec<Option<Result<PublishAck>>> = (0..n).map(|_| None).collect();
        let (mut sent, mut received) = (0usize, 0usize);
        let timeout = self.options.request_timeout;
        let what = format!("publish batch to `{stream}`");
        while received < n {
            if sent < n && sent - received < self.options.max_in_flight {
                let m = &msgs[sent];
                self.client
                    .publish_with_reply_and_headers(
                        m.subject.as_str().to_owned(),
                        format!("{inbox}.{sent}"),
                        api::headers_to(&m.headers),
                        m.payload.clone(),
                    )
                    .await
                    .map_err(|e| Error::unavailable(format!("{what}: send failed after {sent} of {n}: {e}")))?;
                sent += 1;
                continue;
            }
            let reply = match tokio::time::timeout(timeout, sub.next()).await {
                Ok(Some(r)) => r,
                Ok(None) => {
                    return Err(Error::unavailable(format!("{what}: connection closed; {received} of {n} acked")));
                }
                Err(_) => {
                    return Err(Error::new(
                        ErrorKind::Timeout,
                        format!("{what}: no ack within {timeout:?}; {received} of {n} acked, the rest unknown"),
                    ));
                }
            };
            let Some(i) = reply.subject.rsplit('.').next().and_then(|i| i.parse::<usize>().ok()) else { continue };
            if i >= n || acks[i].is_some() {
                continue;
            }
            let r = match reply.status {
                Some(async_nats::StatusCode::NO_RESPONDERS) => {
                    Err(Error::unavailable(format!("{what}: no responders for message {i}")))
                }
                _ => decode_reply(&reply.payload, &what),
            };
            acks[i] = Some(r);
            received += 1;
        }
        acks.into_iter().map(|a| a.unwrap_or_else(|| Err(Error::internal("missing ack"))).map(to_ack)).collect()
    }
}
