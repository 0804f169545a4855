//! Stream routes: lifecycle (`/v1/streams`, `/v1/streams/{stream}`),
//! publish (one message or an NDJSON batch) and range reads (NDJSON).
//!
//! Invariants:
//! - a batch is parsed and validated whole before anything is published: a
//!   malformed line answers 400 with its line and column and nothing is
//!   written; the engine's `publish_batch` then checks subjects and sizes
//!   for all messages before writing any;
//! - acks come back in the order of the lines;
//! - a publish needs `stream:publish` for every subject it writes;
//! - a batch of N messages counts as N requests against the caller's rate
//!   limit (429 before anything is written when it is over).

use axum::Json;
use axum::body::Bytes;
use axum::extract::{Path, Query, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use finmesh_auth::Access;
use finmesh_core::engine::MAX_READ_LIMIT;
use finmesh_core::{
    Error, ErrorKind, OutgoingMessage, ReadRequest, Seq, StreamConfig, StreamName, Subject, SubjectPattern,
};
use serde::Deserialize;
use serde_json::value::RawValue;

use crate::AppState;
use crate::caller::{Caller, Peer};
use crate::kv::config_with_name;
use crate::limits::Paging;
use crate::problem::{ApiError, ApiResult, Problem};
use crate::schema::{Ack, Acks, StreamConfigBody, StreamList};

/// Header naming a single message's subject (alternative to `?subject=`).
pub const SUBJECT_HEADER: &str = "Finmesh-Subject";
/// Header carrying a message id for deduplication.
pub const MSG_ID_HEADER: &str = "Msg-Id";
/// Media type of batches and range reads.
pub const NDJSON: &str = "application/x-ndjson";

/// `GET /v1/streams`: all stream names.
#[utoipa::path(get, path = "/v1/streams", tag = "streams", responses((status = 200, description = "stream names", body = StreamList)))]
pub async fn list_streams(State(state): State<AppState>, caller: Caller) -> ApiResult<Response> {
    caller.require(&Access::Admin)?;
    Ok(Json(StreamList { streams: state.engine().list_streams().await? }).into_response())
}

/// `PUT /v1/streams/{stream}`: create or update.
#[utoipa::path(put, path = "/v1/streams/{stream}", tag = "streams", params(("stream" = String, Path)),
    request_body(content = StreamConfigBody, description = "StreamConfig without `name`"),
    responses((status = 200, description = "stream info", body = Object), (status = 400, body = crate::Problem)))]
pub async fn put_stream(
    State(state): State<AppState>,
    caller: Caller,
    Path(stream): Path<String>,
    body: Bytes,
) -> ApiResult<Response> {
    let name = StreamName::new(stream)?;
    caller.require(&Access::StreamAdmin { stream: &name })?;
    let config: StreamConfig = config_with_name(&body, name.as_str())?;
    let engine = state.engine();
    let enforced = |o| engine.supports_stream_security(o);
    crate::kv::refuse_unenforced(&enforced, &config.security.options(), &format!("stream `{name}`"))?;
    let info = match engine.create_stream(config.clone()).await {
        Err(e) if e.kind() == ErrorKind::AlreadyExists => engine.update_stream(config).await?,
        other => other?,
    };
    Ok(Json(info).into_response())
}

/// `GET /v1/streams/{stream}`: configuration and state.
#[utoipa::path(get, path = "/v1/streams/{stream}", tag = "streams", params(("stream" = String, Path)),
    responses((status = 200, description = "stream info", body = Object), (status = 404, body = crate::Problem)))]
pub async fn get_stream(
    State(state): State<AppState>,
    caller: Caller,
    Path(stream): Path<String>,
) -> ApiResult<Response> {
    let name = StreamName::new(stream)?;
    caller.require(&Access::StreamSubscribe { stream: &name, filter: None })?;
    Ok(Json(state.engine().stream_info(&name).await?).into_response())
}

/// `DELETE /v1/streams/{stream}`.
#[utoipa::path(delete, path = "/v1/streams/{stream}", tag = "streams", params(("stream" = String, Path)),
    responses((status = 204, description = "deleted"), (status = 404, body = crate::Problem)))]
pub async fn delete_stream(
    State(state): State<AppState>,
    caller: Caller,
    Path(stream): Path<String>,
) -> ApiResult<StatusCode> {
    let name = StreamName::new(stream)?;
    caller.require(&Access::StreamAdmin { stream: &name })?;
    state.engine().delete_stream(&name).await?;
    Ok(StatusCode::NO_CONTENT)
}

/// `?subject=` of a single publish.
#[derive(Debug, Deserialize, utoipa::IntoParams)]
pub struct PublishQuery {
    /// Subject of a single message (or the `Finmesh-Subject` header).
    pub subject: Option<String>,
}

/// One line of an NDJSON batch.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct BatchLine {
    subject: String,
    /// Absent = empty payload; `null` is the JSON value `null`. Kept as the
    /// exact bytes of the line: a payload is never re-serialized.
    #[serde(default, deserialize_with = "present")]
    payload: Option<Box<RawValue>>,
    #[serde(default)]
    encoding: Option<String>,
    #[serde(default)]
    headers: Option<std::collections::BTreeMap<String, String>>,
    #[serde(default)]
    msg_id: Option<String>,
}

/// A member that is present, even as `null`.
fn present<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Option<Box<RawValue>>, D::Error> {
    Box::<RawValue>::deserialize(d).map(Some)
}

fn line_problem(line: usize, column: Option<usize>, detail: String) -> Box<Problem> {
    let mut p = Problem::from_error(&Error::invalid(match column {
        Some(c) => format!("line {line}, column {c}: {detail}"),
        None => format!("line {line}: {detail}"),
    }));
    p.line = Some(line);
    p.column = column;
    Box::new(p)
}

/// Parse a whole NDJSON batch (blank lines skipped) or name the first bad line.
fn parse_batch(body: &[u8]) -> Result<Vec<OutgoingMessage>, Box<Problem>> {
    let mut out = Vec::new();
    for (i, raw) in body.split(|b| *b == b'\n').enumerate() {
        let line_no = i + 1;
        if raw.iter().all(u8::is_ascii_whitespace) {
            continue;
        }
        let line: BatchLine =
            serde_json::from_slice(raw).map_err(|e| line_problem(line_no, Some(e.column()), e.to_string()))?;
        let bad = |e: Error| line_problem(line_no, None, e.message().to_owned());
        let subject = Subject::new(line.subject).map_err(bad)?;
        let payload = crate::envelope::decode_payload(line.payload.as_deref(), line.encoding.as_deref())
            .map_err(|e| line_problem(line_no, None, e))?;
        let mut msg = OutgoingMessage::new(subject, payload);
        for (k, v) in line.headers.unwrap_or_default() {
            msg.headers.append(k, v).map_err(bad)?;
        }
        if let Some(id) = line.msg_id {
            msg = msg.with_msg_id(id).map_err(bad)?;
        }
        out.push(msg);
    }
    if out.is_empty() {
        return Err(Box::new(Problem::from_error(&Error::invalid("the batch has no messages"))));
    }
    Ok(out)
}

/// `POST /v1/streams/{stream}/messages`: publish one message (the body), or a
/// batch when `Content-Type: application/x-ndjson`.
#[utoipa::path(post, path = "/v1/streams/{stream}/messages", tag = "streams",
    params(("stream" = String, Path), PublishQuery,
        ("Finmesh-Subject" = Option<String>, Header, description = "subject of a single message"),
        ("Msg-Id" = Option<String>, Header, description = "deduplication id of a single message")),
    request_body(content = Vec<u8>, description = "payload, or NDJSON lines {subject, payload, encoding?, headers?, msg_id?}"),
    responses((status = 200, description = "one message: Ack; a batch: Acks", body = Ack),
        (status = 400, body = crate::Problem), (status = 404, body = crate::Problem), (status = 413, body = crate::Problem)))]
pub async fn publish(
    State(state): State<AppState>,
    caller: Caller,
    peer: Peer,
    Path(stream): Path<String>,
    Query(q): Query<PublishQuery>,
    headers: HeaderMap,
    body: Bytes,
) -> ApiResult<Response> {
    let name = StreamName::new(stream)?;
    let is_batch = headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.split(';').next().is_some_and(|m| m.trim().eq_ignore_ascii_case(NDJSON)));
    let engine = state.engine();
    if is_batch {
        let msgs = parse_batch(&body).map_err(ApiError::Problem)?;
        for m in &msgs {
            caller.require(&Access::StreamPublish { stream: &name, subject: &m.subject })?;
        }
        // The request was counted once on admission; each further message counts too.
        crate::caller::charge(&state, &caller, &peer, msgs.len() - 1)?;
        let acks = engine.publish_batch(&name, msgs).await?;
        crate::metrics::published(name.as_str(), acks.len());
        return Ok(Json(Acks { acks: acks.iter().map(Ack::from).collect() }).into_response());
    }
    let subject = match (q.subject, headers.get(SUBJECT_HEADER)) {
        (Some(s), _) => s,
        (None, Some(h)) => h.to_str().map_err(|_| Error::invalid("Finmesh-Subject must be ASCII"))?.to_owned(),
        (None, None) => return Err(Error::invalid("a message needs `?subject=` or a Finmesh-Subject header").into()),
    };
    let subject = Subject::new(subject)?;
    caller.require(&Access::StreamPublish { stream: &name, subject: &subject })?;
    let mut msg = OutgoingMessage::new(subject, body);
    if let Some(id) = headers.get(MSG_ID_HEADER) {
        let id = id.to_str().map_err(|_| Error::invalid("Msg-Id must be ASCII"))?;
        msg = msg.with_msg_id(id)?;
    }
    let ack = engine.publish(&name, msg).await?;
    crate::metrics::published(name.as_str(), 1);
    Ok(Json(Ack::from(&ack)).into_response())
}

/// `?from_seq=&subject=&limit=` of a range read.
#[derive(Debug, Deserialize, utoipa::IntoParams)]
pub struct ReadQuery {
    /// First sequence wanted (default: the first stored).
    pub from_seq: Option<u64>,
    /// Subject filter (wildcards allowed).
    pub subject: Option<String>,
    /// Most messages returned (default 100, at most 10000); fewer when
    /// `max_read_bytes` is reached first.
    #[param(minimum = 1, maximum = 10000)]
    pub limit: Option<usize>,
}

/// `GET /v1/streams/{stream}/messages`: stored messages as NDJSON envelopes.
#[utoipa::path(get, path = "/v1/streams/{stream}/messages", tag = "streams", params(("stream" = String, Path), ReadQuery),
    responses((status = 200, description = "one envelope per line", content_type = "application/x-ndjson", body = String),
        (status = 404, body = crate::Problem)))]
pub async fn read(
    State(state): State<AppState>,
    caller: Caller,
    Path(stream): Path<String>,
    Query(q): Query<ReadQuery>,
) -> ApiResult<Response> {
    let name = StreamName::new(stream)?;
    let filter = q.subject.map(SubjectPattern::new).transpose()?;
    caller.require(&Access::StreamSubscribe { stream: &name, filter: filter.as_ref() })?;
    let limit = q.limit.unwrap_or(100);
    if limit == 0 || limit > MAX_READ_LIMIT {
        return Err(Error::invalid(format!("limit must be 1-{MAX_READ_LIMIT}")).into());
    }
    let engine = state.engine();
    let mut paging = Paging::new(state.config().limits.max_read_bytes, &engine.stream_info(&name).await?);
    let (mut from, mut remaining, mut body) = (Seq(q.from_seq.unwrap_or(0)), limit, Vec::new());
    loop {
        let page = paging.next(remaining);
        if page == 0 {
            break;
        }
        let mut request = ReadRequest::from_seq(from, page);
        request.filter = filter.clone();
        let msgs = engine.read(&name, request).await?;
        for m in &msgs {
            body.extend_from_slice(&crate::envelope::message(m));
            body.push(b'\n');
            paging.add(m);
        }
        remaining -= msgs.len().min(remaining);
        match msgs.last() {
            Some(last) if msgs.len() == page => from = last.seq.next(),
            _ => break,
        }
    }
    Ok(([(header::CONTENT_TYPE, NDJSON)], body).into_response())
}

#[cfg(test)]
mod tests {
    use super::*;
    use utoipa::OpenApi;

    /// The document's bounds of `?limit=` are the ones `read` enforces.
    #[test]
    fn read_limit_schema_bounds_are_the_enforced_limits() {
        let doc = serde_json::to_value(crate::openapi::ApiDoc::openapi()).unwrap();
        let params = doc["paths"]["/v1/streams/{stream}/messages"]["get"]["parameters"].as_array().unwrap();
        let limit = params.iter().find(|p| p["name"] == "limit").unwrap();
        assert_eq!(limit["schema"]["minimum"], 1);
        assert_eq!(limit["schema"]["maximum"], MAX_READ_LIMIT);
    }

    #[test]
    fn batch_errors_name_line_and_column() {
        let body = b"{\"subject\":\"a\",\"payload\":1}\n\n{\"subject\":\"a\", \"payload\": tru}\n";
        let p = parse_batch(body).unwrap_err();
        assert_eq!(p.line, Some(3));
        assert!(p.column.is_some_and(|c| c > 10), "{p:?}");
        let p = parse_batch(b"{\"subject\":\"a b\"}").unwrap_err();
        assert_eq!((p.line, p.column), (Some(1), None));
        let ok =
            parse_batch(b"{\"subject\":\"a\",\"payload\":\"AAE=\",\"encoding\":\"base64\",\"msg_id\":\"m1\"}").unwrap();
        assert_eq!(&ok[0].payload[..], &[0, 1]);
        assert_eq!(ok[0].msg_id(), Some("m1"));
        let nulls = parse_batch(b"{\"subject\":\"a\",\"payload\":null}\n{\"subject\":\"a\"}").unwrap();
        assert_eq!((&nulls[0].payload[..], &nulls[1].payload[..]), (&b"null"[..], &b""[..]));
    }
}
