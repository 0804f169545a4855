//! Publishing: one message, or a batch with pipelined acks.
//!
//! Every message is checked before anything is sent: the subject must be
//! captured by the named stream (`Invalid`), the size (subject + headers +
//! payload) within `max_msg_size` (`TooLarge`), a `Nats-Msg-Id` not empty
//! and at most 256 bytes (`Invalid`). A batch is refused whole if one message fails a check.
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
//! When the budget is spent without an answer, the engine asks the stream
//! itself (`STREAM.INFO`, at most [`PROBE_TIMEOUT`] more): if it has no
//! leader or does not answer either (an election under way, a cluster that
//! lost its quorum, every server down), the caller gets `Unavailable` saying
//! so, rather than a bare `Timeout`; if the stream answers with a leader,
//! the `Timeout` stands. Either way a message that got no ack may or may
//! not be stored, and the error says so: resending it with the same
//! `Nats-Msg-Id` stores it once. A failed single publish therefore ends
//! within `request_timeout` + [`PROBE_TIMEOUT`].
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
use async_nats::jetstream::stream::Info;

/// Longest `Nats-Msg-Id` accepted.
const MAX_MSG_ID_LEN: usize = 256;
/// Most time spent asking a stream why a publish got no answer.
pub(crate) const PROBE_TIMEOUT: Duration = Duration::from_secs(1);

/// What a caller must know about a publish that got no ack.
const UNKNOWN_OUTCOME: &str =
    "the message may or may not be stored (resend it with the same Nats-Msg-Id to store it once)";

pub(crate) fn check(stream: &StreamName, meta: &StreamMeta, m: &OutgoingMessage) -> Result<()> {
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
    match m.msg_id() {
        Some("") => return Err(Error::invalid("a message id must not be empty")),
        Some(id) if id.len() > MAX_MSG_ID_LEN => {
            return Err(Error::invalid(format!("message id is {} bytes; the limit is {MAX_MSG_ID_LEN}", id.len())));
        }
        _ => {}
    }
    Ok(())
}

/// A replica not heard from for longer than this is counted as gone
/// (NATS's Raft heartbeats every second).
const PEER_SILENT: Duration = Duration::from_secs(2);

/// Why a replicated stream cannot take writes, if its info shows it: no
/// leader, or a leader that has not heard from enough replicas for a
/// quorum (a leader notices that it lost its quorum only after several
/// seconds, and answers `STREAM.INFO` until then).
fn no_quorum(info: &Info) -> Option<String> {
    let cluster = info.cluster.as_ref()?;
    let replicas = info.config.num_replicas.max(1);
    let Some(leader) = &cluster.leader else {
        return Some(format!(
            "has no leader: an election is under way, or too few of its {replicas} replicas are up for a quorum"
        ));
    };
    let quorum = replicas / 2 + 1;
    let heard = cluster.replicas.iter().filter(|p| !p.offline && p.active <= PEER_SILENT).count();
    (1 + heard < quorum).then(|| {
        format!(
            "has lost its quorum: its leader `{leader}` heard from {heard} of its {} other replicas within {PEER_SILENT:?}",
            replicas - 1
        )
    })
}

fn to_ack(a: PublishAck) -> PubAck {
    PubAck { seq: Seq(a.sequence), duplicate: a.duplicate }
}

impl Inner {
    pub(crate) async fn publish(&self, stream: &StreamName, msg: OutgoingMessage) -> Result<PubAck> {
        self.checked_meta(stream, std::slice::from_ref(&msg)).await?;
        let ack = self.send_one(stream.as_str(), &msg).await.inspect_err(|_| self.forget(stream.as_str()))?;
        self.landed(stream, &msg, ack)
    }

    /// The ack of a message meant for `stream`, or `Invalid` if another
    /// stream stored it: the subject was moved to that stream after this
    /// engine last checked (see the module doc of `streams`).
    fn landed(&self, stream: &StreamName, msg: &OutgoingMessage, ack: PublishAck) -> Result<PubAck> {
        if ack.stream == stream.as_str() {
            return Ok(to_ack(ack));
        }
        self.forget(stream.as_str());
        Err(Error::invalid(format!(
            "stream `{stream}` no longer captures subject `{}`: it was changed elsewhere, and stream `{}` stored the message as sequence {}",
            msg.subject, ack.stream, ack.sequence
        )))
    }

    /// One publish to JetStream stream `stream` with the retry rules of the
    /// module doc.
    pub(crate) async fn send_one(&self, stream: &str, msg: &OutgoingMessage) -> Result<PublishAck> {
        let budget = tokio::time::Instant::now() + self.options.request_timeout;
        let mut backoff = Duration::from_millis(20);
        let mut first = true;
        loop {
            let req = async_nats::Request::new()
                .headers(api::headers_to(&msg.headers))
                .payload(msg.payload.clone())
                .timeout(Some(self.options.request_timeout));
            let err = match self.client.send_request(msg.subject.as_str().to_owned(), req).await {
                Ok(reply) => return decode_reply(&reply.payload, || format!("publish to `{}`", msg.subject)),
                Err(e) => api::map_request_error(e, &format!("publish to `{}`", msg.subject)),
            };
            let retry = match err.kind() {
                ErrorKind::Unavailable => true,
                ErrorKind::Timeout => msg.msg_id().is_some(),
                _ => false,
            };
            if !retry {
                return Err(err);
            }
            // No responders at the first try: a stream deleted elsewhere
            // answers NotFound now rather than after the whole budget.
            if first && err.kind() == ErrorKind::Unavailable {
                first = false;
                if let Err(e) = self.raw_stream_info(stream).await
                    && e.kind() == ErrorKind::NotFound
                {
                    return Err(e);
                }
            }
            if tokio::time::Instant::now() + backoff >= budget {
                return Err(self.unanswered(stream, err).await);
            }
            tracing::debug!(subject = %msg.subject, error = %err, "publish retried");
            tokio::time::sleep(backoff).await;
            backoff = (backoff * 2).min(Duration::from_millis(500));
        }
    }

    /// The error for a publish to `stream` that got no ack (`err` is
    /// `Timeout` or `Unavailable`): `Unavailable` naming the cause when the
    /// stream has no leader or does not answer, else `err`; both say that
    /// the message may be stored.
    async fn unanswered(&self, stream: &str, err: Error) -> Error {
        let what = format!("stream `{stream}`");
        let probe = api::request::<Info>(
            &self.client,
            &self.prefix,
            &format!("STREAM.INFO.{stream}"),
            &serde_json::json!({}),
            PROBE_TIMEOUT.min(self.options.request_timeout),
            &what,
        )
        .await;
        let cause = match probe {
            Ok(info) => match no_quorum(&info) {
                Some(cause) => format!("{what} {cause}"),
                None => {
                    let message = format!("{}; {UNKNOWN_OUTCOME}", err.message());
                    return Error::new(err.kind(), message).with_source(err);
                }
            },
            Err(e) if e.kind() == ErrorKind::NotFound => return Error::not_found(e.message().to_owned()),
            Err(e) => format!(
                "{what} does not answer either ({}): its servers are down or the cluster lost its quorum",
                e.message()
            ),
        };
        let message = format!("{}; {cause}; {UNKNOWN_OUTCOME}", err.message());
        Error::unavailable(message).with_source(err)
    }

    pub(crate) async fn publish_batch(&self, stream: &StreamName, msgs: Vec<OutgoingMessage>) -> Result<Vec<PubAck>> {
        self.checked_meta(stream, &msgs).await?;
        let acks = self.send_batch(stream, &msgs).await.inspect_err(|_| self.forget(stream.as_str()))?;
        msgs.iter().zip(acks).map(|(m, ack)| self.landed(stream, m, ack)).collect()
    }

    /// Send a checked batch in order with pipelined acks.
    async fn send_batch(&self, stream: &StreamName, msgs: &[OutgoingMessage]) -> Result<Vec<PublishAck>> {
        if msgs.len() <= 1 {
            let mut out = Vec::with_capacity(msgs.len());
            for m in msgs {
                out.push(self.send_one(stream.as_str(), m).await?);
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
                    let err = Error::new(
                        ErrorKind::Timeout,
                        format!("{what}: no ack within {timeout:?}; {received} of {n} acked"),
                    );
                    return Err(self.unanswered(stream.as_str(), err).await);
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
                _ => decode_reply(&reply.payload, || &what),
            };
            acks[i] = Some(r);
            received += 1;
        }
        acks.into_iter().map(|a| a.unwrap_or_else(|| Err(Error::internal("missing ack")))).collect()
    }
}
