//! Durable consumer routes under `/v1/streams/{stream}/consumers`: create
//! or update, info, delete, list, `fetch` (batch + wait) and `ack`.
//!
//! Invariants: a fetch waits at most [`MAX_FETCH_WAIT`] (well inside the
//! request timeout) and returns at most [`MAX_FETCH_BATCH`] deliveries and
//! at most `max_read_bytes` of messages plus one (fetched in pages, see
//! [`Paging`]: every delivery fetched is returned); a delivery's `token` is
//! passed back verbatim to `ack`, alone (`token`), in a list of at most
//! [`MAX_ACK_TOKENS`] (`tokens`), or covered by `upto` (every delivery up
//! to a stream sequence).

use std::time::Duration;

use axum::Json;
use axum::body::Bytes;
use axum::extract::{Path, State};
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use finmesh_auth::Access;
use finmesh_core::{
    AckKind, AckToken, ConsumerConfig, ConsumerName, Delivery, Error, ErrorKind, FetchRequest, Seq, StreamName,
};
use serde::Deserialize;
use serde_json::json;

use crate::AppState;
use crate::caller::Caller;
use crate::kv::config_with_name;
use crate::limits::Paging;
use crate::problem::ApiResult;
use crate::schema::{ConsumerList, Fetched};

/// Longest wait of one fetch.
pub const MAX_FETCH_WAIT: Duration = Duration::from_secs(20);
/// Most deliveries of one fetch.
pub const MAX_FETCH_BATCH: usize = 1000;
/// Most tokens of one ack.
pub const MAX_ACK_TOKENS: usize = 10_000;

fn names(stream: String, consumer: String) -> ApiResult<(StreamName, ConsumerName)> {
    Ok((StreamName::new(stream)?, ConsumerName::new(consumer)?))
}

/// `GET /v1/streams/{stream}/consumers`: consumer names.
#[utoipa::path(get, path = "/v1/streams/{stream}/consumers", tag = "consumers", params(("stream" = String, Path)),
    responses((status = 200, description = "consumer names", body = ConsumerList), (status = 404, body = crate::Problem)))]
pub async fn list(State(state): State<AppState>, caller: Caller, Path(stream): Path<String>) -> ApiResult<Response> {
    let stream = StreamName::new(stream)?;
    caller.require(&Access::StreamConsume { stream: &stream })?;
    Ok(Json(ConsumerList { consumers: state.engine().list_consumers(&stream).await? }).into_response())
}

/// `PUT /v1/streams/{stream}/consumers/{name}`: create or update.
#[utoipa::path(put, path = "/v1/streams/{stream}/consumers/{name}", tag = "consumers",
    params(("stream" = String, Path), ("name" = String, Path)),
    request_body(content = Object, description = "ConsumerConfig without `name`"),
    responses((status = 200, description = "consumer info", body = Object), (status = 400, body = crate::Problem),
        (status = 404, description = "no such stream", body = crate::Problem)))]
pub async fn put(
    State(state): State<AppState>,
    caller: Caller,
    Path((stream, name)): Path<(String, String)>,
    body: Bytes,
) -> ApiResult<Response> {
    let (stream, name) = names(stream, name)?;
    caller.require(&Access::StreamAdmin { stream: &stream })?;
    let config: ConsumerConfig = config_with_name(&body, name.as_str())?;
    let engine = state.engine();
    let info = match engine.create_consumer(&stream, config.clone()).await {
        Err(e) if e.kind() == ErrorKind::AlreadyExists => engine.update_consumer(&stream, config).await?,
        other => other?,
    };
    Ok(Json(info).into_response())
}

/// `GET /v1/streams/{stream}/consumers/{name}`: configuration and position.
#[utoipa::path(get, path = "/v1/streams/{stream}/consumers/{name}", tag = "consumers",
    params(("stream" = String, Path), ("name" = String, Path)),
    responses((status = 200, description = "consumer info", body = Object), (status = 404, body = crate::Problem)))]
pub async fn get(
    State(state): State<AppState>,
    caller: Caller,
    Path((stream, name)): Path<(String, String)>,
) -> ApiResult<Response> {
    let (stream, name) = names(stream, name)?;
    caller.require(&Access::StreamConsume { stream: &stream })?;
    Ok(Json(state.engine().consumer_info(&stream, &name).await?).into_response())
}

/// `DELETE /v1/streams/{stream}/consumers/{name}`.
#[utoipa::path(delete, path = "/v1/streams/{stream}/consumers/{name}", tag = "consumers",
    params(("stream" = String, Path), ("name" = String, Path)),
    responses((status = 204, description = "deleted"), (status = 404, body = crate::Problem)))]
pub async fn delete(
    State(state): State<AppState>,
    caller: Caller,
    Path((stream, name)): Path<(String, String)>,
) -> ApiResult<StatusCode> {
    let (stream, name) = names(stream, name)?;
    caller.require(&Access::StreamAdmin { stream: &stream })?;
    state.engine().delete_consumer(&stream, &name).await?;
    Ok(StatusCode::NO_CONTENT)
}

/// Body of a fetch. The schema's bounds are [`MAX_FETCH_BATCH`] and
/// [`MAX_FETCH_WAIT`] (utoipa takes only literals; a unit test keeps them
/// equal), so that a client or fuzzer that keeps to the document never
/// waits longer than the server allows.
#[derive(Debug, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct FetchBody {
    /// Most deliveries (default 1, at most 1000).
    #[serde(default = "one")]
    #[schema(minimum = 1, maximum = 1000)]
    pub batch: usize,
    /// Milliseconds to wait when nothing is ready (default 0, at most 20000).
    #[serde(default)]
    #[schema(maximum = 20000)]
    pub wait_ms: u64,
}

fn one() -> usize {
    1
}

fn json_body<T: serde::de::DeserializeOwned>(body: &[u8], default: &str) -> ApiResult<T> {
    let body = if body.iter().all(u8::is_ascii_whitespace) { default.as_bytes() } else { body };
    serde_json::from_slice(body).map_err(|e| Error::invalid(format!("bad JSON body: {e}")).into())
}

/// `POST .../fetch`: up to `batch` deliveries, waiting up to `wait_ms`.
#[utoipa::path(post, path = "/v1/streams/{stream}/consumers/{name}/fetch", tag = "consumers",
    params(("stream" = String, Path), ("name" = String, Path)), request_body = FetchBody,
    responses((status = 200, description = "deliveries", body = Fetched),
        (status = 404, body = crate::Problem)))]
pub async fn fetch(
    State(state): State<AppState>,
    caller: Caller,
    Path((stream, name)): Path<(String, String)>,
    body: Bytes,
) -> ApiResult<Response> {
    let (stream, name) = names(stream, name)?;
    caller.require(&Access::StreamConsume { stream: &stream })?;
    let req: FetchBody = json_body(&body, "{}")?;
    if req.batch == 0 || req.batch > MAX_FETCH_BATCH {
        return Err(Error::invalid(format!("batch must be 1-{MAX_FETCH_BATCH}")).into());
    }
    let wait = Duration::from_millis(req.wait_ms);
    if wait > MAX_FETCH_WAIT {
        return Err(Error::invalid(format!("wait_ms must be at most {}", MAX_FETCH_WAIT.as_millis())).into());
    }
    let deliveries = fetch_within_budget(&state, &stream, &name, req.batch, wait).await?;
    let mut out = Vec::from(&b"{\"messages\":["[..]);
    for (i, d) in deliveries.iter().enumerate() {
        if i > 0 {
            out.push(b',');
        }
        let extra = [("delivery_count", json!(d.delivery_count)), ("token", json!(d.token.0))];
        out.extend_from_slice(&crate::envelope::message_with(&d.message, &extra));
    }
    out.extend_from_slice(b"]}");
    Ok(([(header::CONTENT_TYPE, "application/json")], out).into_response())
}

/// Up to `batch` deliveries within `max_read_bytes` (see [`Paging`]): only
/// the first engine fetch waits; a short page or a spent budget ends it.
async fn fetch_within_budget(
    state: &AppState,
    stream: &StreamName,
    name: &ConsumerName,
    batch: usize,
    wait: Duration,
) -> ApiResult<Vec<Delivery>> {
    let engine = state.engine();
    if batch == 1 {
        // One message is within any budget: no need to look at the stream.
        return Ok(engine.fetch(stream, name, FetchRequest { max: 1, wait }).await?);
    }
    let mut paging = Paging::new(state.config().limits.max_read_bytes, &engine.stream_info(stream).await?);
    let (mut deliveries, mut wait) = (Vec::new(), wait);
    loop {
        let page = paging.next(batch - deliveries.len());
        if page == 0 {
            break;
        }
        let got = engine.fetch(stream, name, FetchRequest { max: page, wait }).await?;
        wait = Duration::ZERO;
        let short = got.len() < page;
        for d in &got {
            paging.add(&d.message);
        }
        deliveries.extend(got);
        if short {
            break;
        }
    }
    Ok(deliveries)
}

/// How a delivery is acknowledged.
#[derive(Debug, Clone, Copy, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum AckKindName {
    /// Done; never deliver it again.
    Ack,
    /// Failed; deliver it again after `delay` ms (default 0).
    Nak,
    /// Give up on it; never deliver again, no dead letter.
    Term,
    /// Still working; restart the ack_wait clock.
    InProgress,
}

/// Body of an ack: exactly one of `token`, `tokens` and `upto`.
#[derive(Debug, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct AckBody {
    /// The delivery's token.
    #[serde(default)]
    pub token: Option<String>,
    /// Several deliveries' tokens (1-10000), all checked before any is
    /// applied.
    #[serde(default)]
    pub tokens: Option<Vec<String>>,
    /// Every delivery still pending whose stream sequence is at most this
    /// (JetStream's AckAll); `kind` must be `ack`. Messages not delivered
    /// yet are not skipped.
    #[serde(default)]
    pub upto: Option<u64>,
    /// What to do with the deliveries.
    pub kind: AckKindName,
    /// For `nak`: milliseconds before redelivery.
    #[serde(default)]
    pub delay: Option<u64>,
}

/// Which deliveries an ack addresses.
enum AckTarget {
    One(AckToken),
    Many(Vec<AckToken>),
    UpTo(Seq),
}

impl AckBody {
    fn target(self, kind: AckKind) -> ApiResult<AckTarget> {
        match (self.token, self.tokens, self.upto) {
            (Some(t), None, None) => Ok(AckTarget::One(AckToken(t))),
            (None, Some(ts), None) => {
                if ts.is_empty() || ts.len() > MAX_ACK_TOKENS {
                    return Err(Error::invalid(format!(
                        "`tokens` holds {}; it must hold 1-{MAX_ACK_TOKENS}",
                        ts.len()
                    ))
                    .into());
                }
                Ok(AckTarget::Many(ts.into_iter().map(AckToken).collect()))
            }
            (None, None, Some(upto)) => match kind {
                AckKind::Ack => Ok(AckTarget::UpTo(Seq(upto))),
                _ => Err(Error::invalid("`upto` acknowledges (`kind` must be `ack`)").into()),
            },
            _ => Err(Error::invalid("give exactly one of `token`, `tokens` and `upto`").into()),
        }
    }

    fn kind(&self) -> ApiResult<AckKind> {
        match (self.kind, self.delay) {
            (AckKindName::Nak, delay) => Ok(AckKind::Nak { delay: Duration::from_millis(delay.unwrap_or(0)) }),
            (_, Some(_)) => Err(Error::invalid("`delay` applies to `nak` only").into()),
            (AckKindName::Ack, None) => Ok(AckKind::Ack),
            (AckKindName::Term, None) => Ok(AckKind::Term),
            (AckKindName::InProgress, None) => Ok(AckKind::InProgress),
        }
    }
}

/// `POST .../ack`: acknowledge one delivery, a list, or every delivery up
/// to a sequence.
#[utoipa::path(post, path = "/v1/streams/{stream}/consumers/{name}/ack", tag = "consumers",
    params(("stream" = String, Path), ("name" = String, Path)), request_body = AckBody,
    responses((status = 204, description = "acknowledged"), (status = 400, body = crate::Problem),
        (status = 404, body = crate::Problem)))]
pub async fn ack(
    State(state): State<AppState>,
    caller: Caller,
    Path((stream, name)): Path<(String, String)>,
    body: Bytes,
) -> ApiResult<StatusCode> {
    let (stream, name) = names(stream, name)?;
    caller.require(&Access::StreamConsume { stream: &stream })?;
    let req: AckBody = json_body(&body, "")?;
    let kind = req.kind()?;
    let engine = state.engine();
    match req.target(kind)? {
        AckTarget::One(token) => engine.ack(&stream, &name, &token, kind).await?,
        AckTarget::Many(tokens) => engine.ack_many(&stream, &name, &tokens, kind).await?,
        AckTarget::UpTo(upto) => engine.ack_all(&stream, &name, upto).await?,
    }
    Ok(StatusCode::NO_CONTENT)
}

#[cfg(test)]
mod tests {
    use super::*;
    use utoipa::OpenApi;

    /// The document's bounds of a fetch body are the ones `fetch` enforces,
    /// and a fetch's longest wait fits in the default request timeout.
    #[test]
    fn fetch_body_schema_bounds_are_the_enforced_limits() {
        let doc = serde_json::to_value(crate::openapi::ApiDoc::openapi()).unwrap();
        let props = &doc["components"]["schemas"]["FetchBody"]["properties"];
        assert_eq!(props["batch"]["minimum"], 1);
        assert_eq!(props["batch"]["maximum"], MAX_FETCH_BATCH);
        assert_eq!(props["wait_ms"]["minimum"], 0);
        assert_eq!(props["wait_ms"]["maximum"], MAX_FETCH_WAIT.as_millis() as u64);
        assert!(MAX_FETCH_WAIT < crate::Limits::default().request_timeout);
    }
}
