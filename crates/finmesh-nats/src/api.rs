//! The JetStream API as the engine uses it: JSON requests with their error
//! codes mapped to [`ErrorKind`]s, message conversions, and one pull
//! request (`CONSUMER.MSG.NEXT`) read to its end.
//!
//! Error mapping (JetStream `err_code` first, then the HTTP-like `code`):
//!
//! | NATS | kind |
//! |---|---|
//! | 10059 stream not found, 10014 consumer not found, 10037 no message found, 404 | `NotFound` |
//! | 10058 stream name in use with another config, 10148/10105 consumer exists | `AlreadyExists` |
//! | 10071 wrong last sequence | `WrongRevision` (current revision parsed from the description) |
//! | 10054 message exceeds maximum | `TooLarge` |
//! | 10077 store failed: `maximum bytes exceeded` (a full `discard: new` bucket) | `TooLarge` |
//! | 10008/10005/10004/10023/10002, 10047/10028 storage/memory exhausted, 503, no responders | `Unavailable` |
//! | 10065 subjects overlap, 10052 subjects overlap the JetStream API, 10074 replicas > 1 on one server | `Invalid` |
//! | request timed out | `Timeout` |
//! | other 400s (10065 subject overlap, …) | `Invalid` |
//! | anything else | `Internal` |
//!
//! Callers that must tell one "not found" from another (no such message vs.
//! no such stream) get the API error itself ([`request_api`]) and branch on
//! its code ([`absent_on`]), never on the text of a message.

use std::time::Duration;

use async_nats::jetstream::ErrorCode;
use async_nats::jetstream::stream::RawMessage;
use async_nats::{HeaderMap, StatusCode};
use finmesh_core::{Error, ErrorKind, Headers, Message, Result, Revision, Seq, Subject, Timestamp};
use futures::StreamExt;
use serde::Serialize;
use serde::de::DeserializeOwned;

/// A JetStream API error reply.
#[derive(Debug, serde::Deserialize)]
pub(crate) struct ApiError {
    pub code: u64,
    #[serde(default)]
    pub err_code: u64,
    #[serde(default)]
    pub description: String,
}

#[derive(serde::Deserialize)]
#[serde(untagged)]
enum Reply<T> {
    Err { error: ApiError },
    Ok(T),
}

impl ApiError {
    /// The JetStream error code.
    pub fn code(&self) -> ErrorCode {
        ErrorCode(self.err_code)
    }
}

/// JetStream's "stream store failed" error code (`JSStreamStoreFailedF`).
const STORE_FAILED: u64 = 10077;

/// Map an API error to a finmesh error; `what` names the object for the message.
pub(crate) fn map_api_error(e: &ApiError, what: &str) -> Error {
    let msg = format!("{what}: {} (NATS error {})", e.description, e.err_code);
    let kind = match (e.code(), e.code) {
        (ErrorCode::STREAM_NOT_FOUND | ErrorCode::CONSUMER_NOT_FOUND | ErrorCode::NO_MESSAGE_FOUND, _) => {
            ErrorKind::NotFound
        }
        (ErrorCode::STREAM_NAME_EXIST | ErrorCode::CONSUMER_NAME_EXIST | ErrorCode(10148 | 10105), _) => {
            ErrorKind::AlreadyExists
        }
        (ErrorCode::STREAM_WRONG_LAST_SEQUENCE, _) => {
            let current = e.description.rsplit(':').next().and_then(|n| n.trim().parse().ok()).unwrap_or(0);
            return Error::wrong_revision(Revision(current), msg);
        }
        (ErrorCode::STREAM_MESSAGE_EXCEEDS_MAXIMUM, _) => ErrorKind::TooLarge,
        // 10077 carries the store's error as its description; only the
        // text tells a full bucket from other store failures.
        (ErrorCode(STORE_FAILED), _) if e.description.contains("maximum bytes exceeded") => ErrorKind::TooLarge,
        (
            ErrorCode::CLUSTER_NOT_AVAILABLE
            | ErrorCode::CLUSTER_NO_PEERS
            | ErrorCode::CLUSTER_INCOMPLETE
            | ErrorCode::INSUFFICIENT_RESOURCES
            | ErrorCode::ACCOUNT_RESOURCES_EXCEEDED
            | ErrorCode::STORAGE_RESOURCES_EXCEEDED
            | ErrorCode::MEMORY_RESOURCES_EXCEEDED,
            _,
        )
        | (_, 503) => ErrorKind::Unavailable,
        (ErrorCode(10052) | ErrorCode::STREAM_SUBJECT_OVERLAP | ErrorCode::STREAM_REPLICAS_NOT_SUPPORTED, _) => {
            ErrorKind::Invalid
        }
        (_, 404) => ErrorKind::NotFound,
        (_, 408) => ErrorKind::Timeout,
        (_, 400) => ErrorKind::Invalid,
        _ => ErrorKind::Internal,
    };
    Error::new(kind, msg)
}

/// Map the API error of a stream (or bucket) create or update: a `max_bytes`
/// the server cannot reserve (10047/10028) is a configuration this server
/// cannot take, `Invalid`, not a passing shortage; the rest as
/// [`map_api_error`].
pub(crate) fn map_config_error(e: &ApiError, what: &str) -> Error {
    match e.code() {
        ErrorCode::STORAGE_RESOURCES_EXCEEDED | ErrorCode::MEMORY_RESOURCES_EXCEEDED => Error::invalid(format!(
            "{what}: the server cannot reserve this much storage ({}; NATS error {}): lower max_bytes",
            e.description, e.err_code
        )),
        _ => map_api_error(e, what),
    }
}

/// `Ok(None)` when `reply` is the API error `absent` (e.g.
/// [`ErrorCode::NO_MESSAGE_FOUND`]); any other API error mapped as usual.
pub(crate) fn absent_on<T>(
    reply: std::result::Result<T, ApiError>,
    absent: ErrorCode,
    what: &str,
) -> Result<Option<T>> {
    match reply {
        Ok(v) => Ok(Some(v)),
        Err(e) if e.code() == absent => Ok(None),
        Err(e) => Err(map_api_error(&e, what)),
    }
}

/// Map a failed request (no reply) to a finmesh error.
pub(crate) fn map_request_error(e: async_nats::RequestError, what: &str) -> Error {
    use async_nats::RequestErrorKind as K;
    match e.kind() {
        K::TimedOut => Error::new(ErrorKind::Timeout, format!("{what}: NATS did not answer in time")).with_source(e),
        K::NoResponders => {
            Error::unavailable(format!("{what}: no NATS server answered (no responders)")).with_source(e)
        }
        K::MaxPayloadExceeded => {
            Error::too_large(format!("{what}: larger than the server's max_payload")).with_source(e)
        }
        K::InvalidSubject => Error::invalid(format!("{what}: invalid subject")).with_source(e),
        K::Other => Error::unavailable(format!("{what}: request to NATS failed: {e}")).with_source(e),
    }
}

/// Send a JetStream API request (`subject` without the `$JS.API.` prefix).
pub(crate) async fn request<T: DeserializeOwned>(
    client: &async_nats::Client,
    prefix: &str,
    subject: &str,
    body: &impl Serialize,
    timeout: Duration,
    what: &str,
) -> Result<T> {
    request_api(client, prefix, subject, body, timeout, what).await?.map_err(|e| map_api_error(&e, what))
}

/// [`request`], with an API error returned as sent (the outer error is the
/// transport's, or an undecodable reply), so the caller can branch on its code.
pub(crate) async fn request_api<T: DeserializeOwned>(
    client: &async_nats::Client,
    prefix: &str,
    subject: &str,
    body: &impl Serialize,
    timeout: Duration,
    what: &str,
) -> Result<std::result::Result<T, ApiError>> {
    let payload = serde_json::to_vec(body).map_err(|e| Error::internal(format!("{what}: encode request: {e}")))?;
    let req = async_nats::Request::new().payload(payload.into()).timeout(Some(timeout));
    let msg = client.send_request(format!("{prefix}.{subject}"), req).await.map_err(|e| map_request_error(e, what))?;
    decode_api_reply(&msg.payload, || what)
}

/// Decode a JSON reply, keeping an API error as sent.
pub(crate) fn decode_api_reply<T: DeserializeOwned, W: std::fmt::Display>(
    payload: &[u8],
    what: impl FnOnce() -> W,
) -> Result<std::result::Result<T, ApiError>> {
    match serde_json::from_slice::<Reply<T>>(payload) {
        Ok(Reply::Ok(v)) => Ok(Ok(v)),
        Ok(Reply::Err { error }) => Ok(Err(error)),
        Err(e) => Err(Error::internal(format!("{}: unexpected reply from NATS: {e}", what()))),
    }
}

/// Decode a JSON reply that may be an API error; `what` (made only on an
/// error) names the request.
pub(crate) fn decode_reply<T: DeserializeOwned, W: std::fmt::Display>(
    payload: &[u8],
    what: impl FnOnce() -> W,
) -> Result<T> {
    match serde_json::from_slice::<Reply<T>>(payload) {
        Ok(Reply::Ok(v)) => Ok(v),
        Ok(Reply::Err { error }) => Err(map_api_error(&error, &what().to_string())),
        Err(e) => Err(Error::internal(format!("{}: unexpected reply from NATS: {e}", what()))),
    }
}

/// Nanoseconds since the epoch of a NATS time.
pub(crate) fn ts(t: time::OffsetDateTime) -> Timestamp {
    Timestamp(t.unix_timestamp_nanos().clamp(0, u64::MAX as i128) as u64)
}

/// A NATS time from a finmesh timestamp.
pub(crate) fn datetime(t: Timestamp) -> time::OffsetDateTime {
    time::OffsetDateTime::from_unix_timestamp_nanos(t.0 as i128).unwrap_or(time::OffsetDateTime::UNIX_EPOCH)
}

/// `None` for Go's zero time (`0001-01-01`), which NATS sends for "none".
pub(crate) fn opt_ts(t: time::OffsetDateTime) -> Option<Timestamp> {
    (t.unix_timestamp() > 0).then(|| ts(t))
}

/// finmesh headers from NATS headers (status pseudo-headers are not part of it).
///
/// async-nats keeps headers in a hash map, so the wire order is lost and the
/// iteration order changes from one read to the next. Names are sorted to
/// give every read of a message the same `Headers`; the values of one name
/// keep their order.
pub(crate) fn headers_from(h: Option<&HeaderMap>) -> Headers {
    let mut out = Headers::new();
    if let Some(h) = h {
        let mut names: Vec<_> = h.iter().collect();
        names.sort_by_key(|(name, _)| name.to_string());
        for (name, values) in names {
            for v in values {
                // NATS enforces the same rules on the wire; a header that
                // breaks ours is skipped rather than failing the read.
                let _ = out.append(name.to_string(), v.as_str().to_owned());
            }
        }
    }
    out
}

/// NATS headers from finmesh headers.
pub(crate) fn headers_to(h: &Headers) -> HeaderMap {
    let mut out = HeaderMap::new();
    for (name, value) in h.iter() {
        out.append(name, value);
    }
    out
}

/// Reply of `STREAM.MSG.GET`.
#[derive(serde::Deserialize)]
pub(crate) struct GetMsg {
    pub message: RawMessage,
}

/// A stored message from a `STREAM.MSG.GET` reply.
pub(crate) fn raw_to_message(raw: RawMessage) -> Result<Message> {
    let m = async_nats::jetstream::message::StreamMessage::try_from(raw)
        .map_err(|e| Error::internal(format!("undecodable message from NATS: {e}")))?;
    Ok(Message {
        seq: Seq(m.sequence),
        subject: Subject::new(m.subject.as_str())?,
        headers: headers_from(Some(&m.headers)),
        payload: m.payload,
        time: ts(m.time),
    })
}

/// Headers a direct get adds to describe the stored message.
const DIRECT_HEADERS: [&str; 4] = ["Nats-Stream", "Nats-Subject", "Nats-Sequence", "Nats-Time-Stamp"];

/// The stored message of a direct get's reply; `None` for status 404.
pub(crate) fn direct_reply(reply: async_nats::Message) -> Result<Option<Message>> {
    match reply.status {
        Some(StatusCode::NOT_FOUND) => return Ok(None),
        Some(s) if s != StatusCode::OK => {
            let d = reply.description.unwrap_or_default();
            return Err(Error::unavailable(format!("direct get: NATS answered {s} {d}")));
        }
        _ => {}
    }
    let h = reply.headers.as_ref().ok_or_else(|| Error::internal("direct get: reply without headers"))?;
    let get = |name: &str| {
        h.get(name).map(|v| v.as_str()).ok_or_else(|| Error::internal(format!("direct get: no {name} header")))
    };
    let seq = get("Nats-Sequence")?.parse().map_err(|_| Error::internal("direct get: bad Nats-Sequence"))?;
    let subject = Subject::new(get("Nats-Subject")?)?;
    let time = time::OffsetDateTime::parse(get("Nats-Time-Stamp")?, &time::format_description::well_known::Rfc3339)
        .map_err(|e| Error::internal(format!("direct get: bad Nats-Time-Stamp: {e}")))?;
    let mut headers = Headers::new();
    for (name, values) in h.iter() {
        if DIRECT_HEADERS.iter().any(|d| d.eq_ignore_ascii_case(AsRef::<str>::as_ref(name))) {
            continue;
        }
        for v in values {
            let _ = headers.append(name.to_string(), v.as_str().to_owned());
        }
    }
    Ok(Some(Message { seq: Seq(seq), subject, headers, payload: reply.payload, time: ts(time) }))
}

/// What a JetStream delivery's reply subject says
/// (`$JS.ACK.[<domain>.<hash>.]<stream>.<consumer>.<delivered>.<sseq>.<cseq>.<tm>.<pending>[.<token>]`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct AckInfo {
    pub stream: String,
    pub consumer: String,
    pub delivered: u32,
    pub stream_seq: u64,
    pub time: Timestamp,
}

/// Parse an ack subject; `None` if it is not one.
pub(crate) fn parse_ack_subject(s: &str) -> Option<AckInfo> {
    let rest = s.strip_prefix("$JS.ACK.")?;
    let t: Vec<&str> = rest.split('.').collect();
    let base = match t.len() {
        7 => 0,
        n if n >= 9 => 2,
        _ => return None,
    };
    let num = |i: usize| t.get(base + i).and_then(|x| x.parse::<u64>().ok());
    if t[base].is_empty() || t[base + 1].is_empty() {
        return None;
    }
    Some(AckInfo {
        stream: t[base].to_owned(),
        consumer: t[base + 1].to_owned(),
        delivered: u32::try_from(num(2)?).ok()?,
        stream_seq: num(3)?,
        time: Timestamp(num(5)?),
    })
}

/// One delivery of a pull request: the message and its ack subject.
pub(crate) struct Pulled {
    pub message: Message,
    pub ack: AckInfo,
    pub reply: String,
}

/// Body of `CONSUMER.MSG.NEXT`.
#[derive(Serialize)]
struct NextRequest {
    batch: usize,
    #[serde(skip_serializing_if = "Option::is_none")]
    expires: Option<u64>,
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    no_wait: bool,
}

/// The outcome of a pull request that ended without a JetStream error.
pub(crate) enum PullEnd {
    /// Batch filled, expired, or nothing (more) available.
    Done,
    /// "No responders": no server took the request. Right after a consumer
    /// was created in a cluster this is a moment in which its server's
    /// interest has not reached the client's server over the routes yet;
    /// later it means the consumer is gone.
    Unrouted,
    /// The server ended the pull because the consumer was deleted.
    Gone,
    /// Nothing came for [`PULL_IDLE`] before the pull ended: the server
    /// may still be sending. Messages of a consumer with acks come again
    /// after `ack_wait`; for one without acks they are lost to this read.
    Stalled,
}

/// How long a pull waits for its next message (or end) past its own
/// expiry before it gives up; it guards against a lost connection. Counted
/// from the last message received, so a long batch on a slow link is read
/// to its end.
pub(crate) const PULL_IDLE: Duration = Duration::from_secs(5);

/// Issue one pull request for up to `batch` messages of `stream`'s
/// `consumer` and read it to its end: with `wait == None` only what is
/// available now (`no_wait`), else until the batch is full or `wait` passed.
pub(crate) async fn pull(
    client: &async_nats::Client,
    prefix: &str,
    stream: &str,
    consumer: &str,
    batch: usize,
    wait: Option<Duration>,
    out: &mut Vec<Pulled>,
) -> Result<PullEnd> {
    let inbox = client.new_inbox();
    let mut sub = client
        .subscribe(inbox.clone())
        .await
        .map_err(|e| Error::unavailable(format!("subscribe for a fetch: {e}")).with_source(e))?;
    let body =
        NextRequest { batch, expires: wait.map(|w| w.as_nanos().max(1_000_000) as u64), no_wait: wait.is_none() };
    let payload = serde_json::to_vec(&body).map_err(|e| Error::internal(format!("encode pull request: {e}")))?;
    client
        .publish_with_reply(format!("{prefix}.CONSUMER.MSG.NEXT.{stream}.{consumer}"), inbox, payload.into())
        .await
        .map_err(|e| Error::unavailable(format!("send pull request: {e}")).with_source(e))?;
    // The server ends the request itself (status 404/408/409) unless the
    // batch fills; this deadline only guards against a lost connection.
    let mut deadline = tokio::time::Instant::now() + wait.unwrap_or_default() + PULL_IDLE;
    let mut got = 0;
    while got < batch {
        let msg = match tokio::time::timeout_at(deadline, sub.next()).await {
            Err(_) => return Ok(PullEnd::Stalled),
            Ok(None) => return Err(Error::unavailable("fetch: connection to NATS closed")),
            Ok(Some(m)) => m,
        };
        deadline = deadline.max(tokio::time::Instant::now() + PULL_IDLE);
        if let Some(status) = msg.status {
            match status {
                StatusCode::IDLE_HEARTBEAT => continue,
                StatusCode::NOT_FOUND | StatusCode::TIMEOUT => return Ok(PullEnd::Done),
                StatusCode::NO_RESPONDERS => return Ok(PullEnd::Unrouted),
                StatusCode::REQUEST_TERMINATED => {
                    let d = msg.description.unwrap_or_default().to_ascii_lowercase();
                    if d.contains("deleted") {
                        return Ok(PullEnd::Gone);
                    }
                    return Ok(PullEnd::Done);
                }
                _ if msg.payload.is_empty() && msg.reply.is_none() => {
                    let d = msg.description.unwrap_or_default();
                    return Err(Error::unavailable(format!("fetch: NATS ended the pull with {status} {d}")));
                }
                _ => {}
            }
        }
        let Some(reply) = msg.reply.as_ref().map(|r| r.to_string()) else { continue };
        let Some(ack) = parse_ack_subject(&reply) else { continue };
        let message = Message {
            seq: Seq(ack.stream_seq),
            subject: Subject::new(msg.subject.as_str())?,
            headers: headers_from(msg.headers.as_ref()),
            payload: msg.payload,
            time: ack.time,
        };
        out.push(Pulled { message, ack, reply });
        got += 1;
    }
    Ok(PullEnd::Done)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ack_subjects_v1_and_v2() {
        let v1 = parse_ack_subject("$JS.ACK.ORDERS.c.2.17.5.1700000000000000000.3").unwrap();
        assert_eq!((v1.stream.as_str(), v1.consumer.as_str(), v1.delivered, v1.stream_seq), ("ORDERS", "c", 2, 17));
        let v2 = parse_ack_subject("$JS.ACK.hub.ACCHASH.ORDERS.c.1.9.9.1700000000000000000.0.tok").unwrap();
        assert_eq!((v2.stream.as_str(), v2.stream_seq, v2.time), ("ORDERS", 9, Timestamp(1_700_000_000_000_000_000)));
        for bad in ["", "garbage", "1.2.3.4.5.6.7.8.9", "$JS.ACK.a.b.c", "$JS.ACK.S.c.x.1.1.1.1"] {
            assert!(parse_ack_subject(bad).is_none(), "{bad}");
        }
    }

    #[test]
    fn wrong_last_sequence_carries_the_current_revision() {
        let e = ApiError { code: 400, err_code: 10071, description: "wrong last sequence: 42".into() };
        let err = map_api_error(&e, "kv update");
        assert_eq!((err.kind(), err.current_revision()), (ErrorKind::WrongRevision, Some(Revision(42))));
        let nf = ApiError { code: 404, err_code: 10059, description: "stream not found".into() };
        assert_eq!(map_api_error(&nf, "x").kind(), ErrorKind::NotFound);
    }

    /// Regression (issue 17): "no such message" was told from other "not
    /// found"s by searching the error text for `10037`, so a stream whose
    /// name holds those digits (`KV_b10037`, a bucket deleted meanwhile) read
    /// as "no message" instead of "no stream". The code decides now.
    #[test]
    fn no_message_is_decided_by_the_error_code() {
        let reply = |err_code, description: &str| -> std::result::Result<(), ApiError> {
            decode_api_reply::<(), _>(
                serde_json::json!({"error": {"code": 404, "err_code": err_code, "description": description}})
                    .to_string()
                    .as_bytes(),
                || "x",
            )
            .unwrap()
        };
        let what = "stream `KV_b10037`";
        let gone = absent_on(reply(10059, "stream not found"), ErrorCode::NO_MESSAGE_FOUND, what).unwrap_err();
        assert_eq!(gone.kind(), ErrorKind::NotFound);
        assert!(gone.message().contains("stream not found"), "{gone}");
        assert_eq!(absent_on(reply(10037, "no message found"), ErrorCode::NO_MESSAGE_FOUND, what).unwrap(), None);
        // The description does not matter, only the code.
        assert_eq!(absent_on(reply(10037, "stream not found"), ErrorCode::NO_MESSAGE_FOUND, "s").unwrap(), None);
        assert_eq!(
            absent_on(reply(10014, "no message found"), ErrorCode::NO_MESSAGE_FOUND, "s").unwrap_err().kind(),
            ErrorKind::NotFound
        );
        assert_eq!(absent_on::<()>(Ok(()), ErrorCode::NO_MESSAGE_FOUND, "s").unwrap(), Some(()));
    }

    /// Found by the limits sweep (issue 17): a `max_bytes` the server cannot
    /// reserve, or replicas on a single server, answered 500 (`Internal`).
    /// In a config request they are `Invalid`; storage running out
    /// elsewhere is `Unavailable`.
    #[test]
    fn config_errors_are_the_callers_and_exhaustion_is_unavailable() {
        let storage = ApiError { code: 500, err_code: 10047, description: "insufficient storage resources".into() };
        assert_eq!(map_config_error(&storage, "create stream `S`").kind(), ErrorKind::Invalid);
        assert_eq!(map_api_error(&storage, "publish").kind(), ErrorKind::Unavailable);
        let replicas = ApiError { code: 500, err_code: 10074, description: "replicas > 1 not supported".into() };
        assert_eq!(map_config_error(&replicas, "create stream `S`").kind(), ErrorKind::Invalid);
        let other = ApiError { code: 500, err_code: 10049, description: "stream create failed".into() };
        assert_eq!(map_config_error(&other, "create stream `S`").kind(), ErrorKind::Internal);
    }

    /// Issue 17 §4: a full bucket (`discard: new`) is `TooLarge` on both
    /// engines; other store failures keep their mapping.
    #[test]
    fn full_bucket_is_too_large() {
        let full = ApiError { code: 503, err_code: 10077, description: "maximum bytes exceeded".into() };
        assert_eq!(map_api_error(&full, "kv put").kind(), ErrorKind::TooLarge);
        let closed = ApiError { code: 503, err_code: 10077, description: "store closed".into() };
        assert_eq!(map_api_error(&closed, "kv put").kind(), ErrorKind::Unavailable);
    }
}
