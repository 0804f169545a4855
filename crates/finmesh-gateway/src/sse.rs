//! Server-Sent Events: `GET /v1/streams/{stream}/events` and
//! `GET /v1/kv/{bucket}/watch`.
//!
//! Wire format (see `docs/api.md`):
//! - the first event carries only the `retry:` hint;
//! - a message is `id: <seq>` + `data: <envelope>` (revision for watch);
//! - `event: gap` (`id:` = last missing sequence) with `{"from","to","epoch"}`
//!   when history the client asked for is gone;
//! - `event: reset` (`id:` = the stream's last sequence) with
//!   `{"epoch","last_seq","reason"}` when the client named an `epoch=` that
//!   is not the stream's (the stream was recreated, or recovered with loss
//!   after a crash, and reuses sequences): what the client has past
//!   `last_seq` is void and delivery goes on from `last_seq + 1`;
//! - the last event says why the stream ends: `event: lagged`
//!   (`{"last_seq"}`, the subscriber fell behind), `event: reconnect`
//!   (`{"last_seq"}` + `retry:` = `retry_ms` plus a random part up to
//!   `retry_jitter_ms`, the gateway drains), `event: error` (a
//!   problem document) or `event: end`;
//! - a comment line (`: heartbeat`) every heartbeat interval while idle.
//!
//! The response's `Finmesh-Stream-Epoch` header carries the stream's epoch
//! (`StreamInfo::epoch`, `0` = unknown), which a client sends back as
//! `epoch=` when it resumes.
//!
//! Resume rules: `Last-Event-ID: N` resumes *after* N (first sequence sent is
//! N+1); `from_seq=N` names the *first* sequence wanted (`0` = the first
//! stored); `Last-Event-ID` wins when both are given; with neither, only new
//! messages are sent. Watch: `from_revision=N` is the first revision wanted;
//! with neither, the latest entry of every matching key, then changes.

use std::convert::Infallible;
use std::time::Duration;

use axum::extract::{Path, Query, State};
use axum::http::HeaderMap;
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use finmesh_auth::Access;
use finmesh_core::{BoxStream, BucketName, Error, Result, Seq, StreamName, SubjectPattern, TailEvent, WatchStart};
use futures::StreamExt;
use serde::Deserialize;
use serde_json::json;

use crate::AppState;
use crate::caller::{Caller, Peer};
use crate::problem::ApiResult;
use crate::subscribe::{End, Frame, Item, SubscriberSpec, Subscription};

/// The response header that carries the stream's epoch.
pub const EPOCH_HEADER: &str = "finmesh-stream-epoch";

/// `?subject=&from_seq=&epoch=` of a subscription.
#[derive(Debug, Deserialize, utoipa::IntoParams)]
pub struct SubscribeQuery {
    /// Subject filter (wildcards allowed; default: every subject).
    pub subject: Option<String>,
    /// First sequence wanted (`0` = first stored; default: only new).
    pub from_seq: Option<u64>,
    /// The stream epoch the client's position belongs to (from the
    /// `Finmesh-Stream-Epoch` header or a `gap`/`reset` event); another
    /// epoch gets a `reset` event first.
    pub epoch: Option<u64>,
}

/// `?prefix=&from_revision=` of a watch.
#[derive(Debug, Deserialize, utoipa::IntoParams)]
pub struct WatchQuery {
    /// Key prefix (default: all keys).
    #[serde(default)]
    pub prefix: String,
    /// First revision wanted (default: latest values, then changes).
    pub from_revision: Option<u64>,
}

/// The sequence after `Last-Event-ID`, if the header is present.
pub fn after_last_event_id(headers: &HeaderMap) -> Result<Option<u64>> {
    match headers.get("last-event-id") {
        None => Ok(None),
        Some(v) => {
            let s = v.to_str().unwrap_or("").trim();
            s.parse::<u64>()
                .map(|n| Some(n.saturating_add(1)))
                .map_err(|_| Error::invalid(format!("Last-Event-ID must be a sequence number, got `{s}`")))
        }
    }
}

/// Open a stream tail as a frame source; returns the source, the sequence
/// the client already has and the stream's epoch. A client position from
/// another epoch (`client_epoch`) is void: the source starts with a
/// `reset` frame and goes on with new messages.
pub async fn stream_source(
    state: &AppState,
    stream: &StreamName,
    filter: Option<SubjectPattern>,
    first: Option<u64>,
    client_epoch: Option<u64>,
) -> Result<(BoxStream<Frame>, u64, u64)> {
    let info = state.engine().stream_info(stream).await?;
    let (epoch, last_seq) = (info.epoch, info.state.last_seq);
    let reset = client_epoch.is_some_and(|e| epoch != 0 && e != epoch);
    let from = match first {
        Some(s) if !reset => Seq(s),
        _ => last_seq.next(),
    };
    let tail = state.engine().tail(stream, from, filter).await?;
    let head = reset.then_some(Ok(Frame::Reset { epoch, last_seq: last_seq.0 }));
    let source = futures::stream::iter(head)
        .chain(tail.map(move |r| {
            r.map(|ev| match ev {
                TailEvent::Message(m) => Frame::Message { id: m.seq.0, data: crate::envelope::message(&m) },
                TailEvent::Gap { from, to } => Frame::Gap { from: from.0, to: to.0, epoch },
            })
        }))
        .boxed();
    Ok((source, from.0.saturating_sub(1), epoch))
}

/// `GET /v1/streams/{stream}/events`: an SSE subscription.
#[utoipa::path(get, path = "/v1/streams/{stream}/events", tag = "streams",
    params(("stream" = String, Path), SubscribeQuery, ("access_token" = Option<String>, Query, description = "the bearer token, for browsers whose EventSource cannot set Authorization (RFC 6750 §2.3; subscription routes only)"),
        ("Last-Event-ID" = Option<String>, Header, description = "resume after this sequence")),
    responses((status = 200, description = "SSE: id = sequence, data = envelope", content_type = "text/event-stream", body = String),
        (status = 404, body = crate::Problem)))]
pub async fn events(
    State(state): State<AppState>,
    caller: Caller,
    peer: Peer,
    Path(stream): Path<String>,
    Query(q): Query<SubscribeQuery>,
    headers: HeaderMap,
) -> ApiResult<Response> {
    let name = StreamName::new(stream)?;
    let filter = q.subject.map(SubjectPattern::new).transpose()?;
    caller.require(&Access::StreamSubscribe { stream: &name, filter: filter.as_ref() })?;
    let first = after_last_event_id(&headers)?.or(q.from_seq);
    let spec = SubscriberSpec {
        kind: "sse",
        identity: caller.subject().to_owned(),
        resource: name.to_string(),
        filter: filter.as_ref().map(ToString::to_string),
    };
    let spec = Subscription::admit_from(&state, spec, &peer)?;
    let (source, resume_after, epoch) = stream_source(&state, &name, filter, first, q.epoch).await?;
    let mut response = sse_response(&state, Subscription::spawn(&state, spec, resume_after, source));
    response.headers_mut().insert(EPOCH_HEADER, epoch.into());
    Ok(response)
}

/// `GET /v1/kv/{bucket}/watch`: changes of keys as SSE (deletes included).
#[utoipa::path(get, path = "/v1/kv/{bucket}/watch", tag = "kv",
    params(("bucket" = String, Path), WatchQuery, ("access_token" = Option<String>, Query, description = "the bearer token, for browsers whose EventSource cannot set Authorization (RFC 6750 §2.3; subscription routes only)"),
        ("Last-Event-ID" = Option<String>, Header, description = "resume after this revision")),
    responses((status = 200, description = "SSE: id = revision, data = KV envelope", content_type = "text/event-stream", body = String),
        (status = 404, body = crate::Problem)))]
pub async fn watch(
    State(state): State<AppState>,
    caller: Caller,
    peer: Peer,
    Path(bucket): Path<String>,
    Query(q): Query<WatchQuery>,
    headers: HeaderMap,
) -> ApiResult<Response> {
    let name = BucketName::new(bucket)?;
    caller.require(&Access::KvRead { bucket: &name })?;
    let first = after_last_event_id(&headers)?.or(q.from_revision);
    let start = match first {
        Some(r) => WatchStart::FromRevision(finmesh_core::Revision(r.max(1))),
        None => WatchStart::LatestValues,
    };
    let spec = SubscriberSpec {
        kind: "watch",
        identity: caller.subject().to_owned(),
        resource: name.to_string(),
        filter: (!q.prefix.is_empty()).then(|| q.prefix.clone()),
    };
    let spec = Subscription::admit_from(&state, spec, &peer)?;
    let watch = state.engine().kv_watch(&name, &q.prefix, start).await?;
    let source =
        watch.map(|r| r.map(|e| Frame::Message { id: e.revision.0, data: crate::envelope::kv_entry(&e) })).boxed();
    let resume_after = first.unwrap_or(1).saturating_sub(1);
    Ok(sse_response(&state, Subscription::spawn(&state, spec, resume_after, source)))
}

fn text(data: &[u8]) -> &str {
    // Envelopes are built from serde_json output and validated JSON: UTF-8.
    std::str::from_utf8(data).unwrap_or("{}")
}

/// The retry hint of a `reconnect`: `retry` plus a random part up to
/// `jitter`, so subscribers told together come back spread out.
pub fn reconnect_retry(retry: Duration, jitter: Duration) -> Duration {
    let jitter_ms = u64::try_from(jitter.as_millis()).unwrap_or(u64::MAX);
    retry + Duration::from_millis(fastrand::u64(0..=jitter_ms))
}

/// The SSE event for one item (`jitter`: see [`reconnect_retry`]).
fn event(item: &Item, retry: Duration, jitter: Duration) -> Event {
    match item {
        Item::Frame(Frame::Message { id, data }) => Event::default().id(id.to_string()).data(text(data)),
        Item::Frame(Frame::Gap { from, to, epoch }) => Event::default()
            .event("gap")
            .id(to.to_string())
            .data(json!({ "from": from, "to": to, "epoch": epoch }).to_string()),
        Item::Frame(Frame::Reset { epoch, last_seq }) => Event::default().event("reset").id(last_seq.to_string()).data(
            json!({
                "epoch": epoch,
                "last_seq": last_seq,
                "reason": "the stream was recreated or lost writes in a crash since your epoch; drop what you have past last_seq"
            })
            .to_string(),
        ),
        Item::End(End::Lagged { last_sent }) => Event::default().event("lagged").data(
            json!({ "last_seq": last_sent, "reason": "subscriber fell behind; resume from last_seq" }).to_string(),
        ),
        Item::End(End::Reconnect { last_sent }) => Event::default()
            .event("reconnect")
            .retry(retry + jitter)
            .data(json!({ "last_seq": last_sent, "reason": "gateway draining; reconnect" }).to_string()),
        Item::End(End::Failed(p)) => Event::default().event("error").data(serde_json::to_string(p).unwrap_or_default()),
        Item::End(End::Finished) => Event::default().event("end").data("{}"),
    }
}

/// Serve a subscription as `text/event-stream`.
pub fn sse_response(state: &AppState, sub: Subscription) -> Response {
    let cfg = &state.config().subscriptions;
    let (retry, jitter) = (cfg.retry, cfg.retry_jitter);
    let hello = futures::stream::once(async move { Ok::<_, Infallible>(Event::default().retry(retry)) });
    let items = futures::stream::unfold(Some(sub), move |sub| async move {
        let mut sub = sub?;
        let item = sub.next().await?;
        let extra = match item {
            Item::End(End::Reconnect { .. }) => reconnect_retry(Duration::ZERO, jitter),
            _ => Duration::ZERO,
        };
        let ev = event(&item, retry, extra);
        let next = match item {
            Item::End(_) => None,
            Item::Frame(_) => Some(sub),
        };
        Some((Ok::<_, Infallible>(ev), next))
    });
    Sse::new(hello.chain(items)).keep_alive(KeepAlive::new().interval(cfg.heartbeat).text("heartbeat")).into_response()
}
