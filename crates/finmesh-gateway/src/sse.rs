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
//! - the last event says why the stream ends: `event: error` with a
//!   problem document carrying `"reason": "slow_consumer"` and `last_seq`
//!   (a stream subscriber's queue was full when the fan-out hub had a frame
//!   for it), `event: lagged` (`{"last_seq"}`, a watcher fell behind), `event: reconnect`
//!   (`{"last_seq"}` + `retry:` = `retry_ms` plus a random part up to
//!   `retry_jitter_ms`, the gateway drains), `event: error` (a
//!   problem document) or `event: end`;
//! - a comment line (`: heartbeat`) every heartbeat interval while idle;
//!   on a stream subscription it also carries `id: <head>` when the hub
//!   dispatched past the subscriber's last id with nothing for it (see
//!   [`Feed::heartbeat`]).
//!
//! Stream subscriptions are served by [`feed_response`] from a hub
//! [`Feed`] (messages pre-encoded, handed to the socket without a copy);
//! watches by axum's `Sse` from their own queue.
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
use std::pin::Pin;
use std::time::Duration;

use axum::body::Body;
use axum::extract::{Path, Query, State};
use axum::http::{HeaderMap, HeaderValue, header};
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use bytes::{Bytes, BytesMut};
use finmesh_auth::Access;
use finmesh_core::{Error, Result, StreamName, SubjectPattern, WatchStart};
use futures::StreamExt;
use serde::Deserialize;
use serde_json::json;

use crate::AppState;
use crate::caller::{Caller, Peer};
use crate::hub::Feed;
use crate::problem::{ApiResult, PROBLEM_BASE};
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
    let require = state.config().subscriptions.require_registration;
    let admission = state.registry().admit(caller.subject(), require, filter.as_ref()).await?;
    let spec = SubscriberSpec {
        kind: "sse",
        identity: caller.subject().to_owned(),
        resource: name.to_string(),
        filter: filter.as_ref().map(ToString::to_string),
    };
    let spec = Subscription::admit_from(&state, spec, &peer)?;
    let (feed, epoch) = Feed::open(&state, spec, &name, filter, first, q.epoch).await?;
    let mut response = feed_response(&state, feed.with_registry(state.registry(), &admission, "sse", peer.0));
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
    let name = crate::kv::client_bucket(bucket)?;
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
        Item::Frame(Frame::Shared(e)) => Event::default().id(e.seq.to_string()).data(e.ws.as_str()),
        Item::End(End::SlowConsumer { last_sent }) => {
            Event::default().event("error").data(slow_consumer(*last_sent).to_string())
        }
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

/// The `error` event's data when the hub cut a subscriber off: a problem
/// document with `reason` `slow_consumer` and the last sequence sent.
pub fn slow_consumer(last_seq: u64) -> serde_json::Value {
    json!({
        "type": format!("{PROBLEM_BASE}slow-consumer"),
        "title": "Slow consumer",
        "status": 503,
        "detail": "the subscriber did not read fast enough and its queue filled up; resume from last_seq",
        "reason": "slow_consumer",
        "last_seq": last_seq,
    })
}

/// One SSE event (`event:` line if named, `id:`, `retry:`, one `data:` line).
fn raw_event(name: Option<&str>, id: Option<u64>, retry: Option<Duration>, data: &str) -> Bytes {
    let mut out = String::with_capacity(data.len() + 48);
    if let Some(name) = name {
        out.push_str("event: ");
        out.push_str(name);
        out.push('\n');
    }
    if let Some(id) = id {
        out.push_str(&format!("id: {id}\n"));
    }
    if let Some(retry) = retry {
        out.push_str(&format!("retry: {}\n", retry.as_millis()));
    }
    out.push_str("data: ");
    out.push_str(data);
    out.push_str("\n\n");
    Bytes::from(out)
}

/// The wire bytes of one item of a hub feed: a shared message is its
/// pre-encoded event, as is (no copy).
fn encode(item: &Item, retry: Duration, jitter: Duration) -> Bytes {
    match item {
        Item::Frame(Frame::Shared(e)) => e.sse.clone(),
        Item::Frame(Frame::Message { id, data }) => raw_event(None, Some(*id), None, text(data)),
        Item::Frame(Frame::Gap { from, to, epoch }) => {
            raw_event(Some("gap"), Some(*to), None, &json!({ "from": from, "to": to, "epoch": epoch }).to_string())
        }
        Item::Frame(Frame::Reset { epoch, last_seq }) => raw_event(
            Some("reset"),
            Some(*last_seq),
            None,
            &json!({
                "epoch": epoch,
                "last_seq": last_seq,
                "reason": "the stream was recreated or lost writes in a crash since your epoch; drop what you have past last_seq"
            })
            .to_string(),
        ),
        Item::End(End::Lagged { last_sent }) => raw_event(
            Some("lagged"),
            None,
            None,
            &json!({ "last_seq": last_sent, "reason": "subscriber fell behind; resume from last_seq" }).to_string(),
        ),
        Item::End(End::SlowConsumer { last_sent }) => {
            raw_event(Some("error"), None, None, &slow_consumer(*last_sent).to_string())
        }
        Item::End(End::Reconnect { last_sent }) => raw_event(
            Some("reconnect"),
            None,
            Some(retry + reconnect_retry(Duration::ZERO, jitter)),
            &json!({ "last_seq": last_sent, "reason": "gateway draining; reconnect" }).to_string(),
        ),
        Item::End(End::Failed(p)) => raw_event(Some("error"), None, None, &serde_json::to_string(p).unwrap_or_default()),
        Item::End(End::Finished) => raw_event(Some("end"), None, None, "{}"),
    }
}

/// A body chunk gathers ready items up to about this many bytes.
const CHUNK_BYTES: usize = 64 * 1024;

/// The connection's writer: the hub feed's items as body chunks (every
/// item ready at once in one chunk), and a heartbeat when idle.
struct FeedWriter {
    feed: Feed,
    hello: Option<Bytes>,
    idle: Pin<Box<tokio::time::Sleep>>,
    heartbeat: Duration,
    retry: Duration,
    jitter: Duration,
    done: bool,
}

impl FeedWriter {
    async fn chunk(&mut self) -> Option<Bytes> {
        if let Some(hello) = self.hello.take() {
            return Some(hello);
        }
        if self.done {
            return None;
        }
        let item = tokio::select! {
            biased;
            item = self.feed.next() => item,
            () = &mut self.idle => {
                self.idle.as_mut().reset(tokio::time::Instant::now() + self.heartbeat);
                return Some(match self.feed.heartbeat() {
                    Some(head) => Bytes::from(format!(": heartbeat\nid: {head}\n\n")),
                    None => Bytes::from_static(b": heartbeat\n\n"),
                });
            }
        };
        self.idle.as_mut().reset(tokio::time::Instant::now() + self.heartbeat);
        let item = item?;
        self.done = matches!(item, Item::End(_));
        let first = encode(&item, self.retry, self.jitter);
        if self.done {
            return Some(first);
        }
        // Items ready now go out in the same chunk: one pass through the
        // body, the timer and the writer for all of them instead of one
        // each (a subscriber that fell behind, or a burst). A single item
        // is sent as is, without a copy.
        let Some(mut item) = self.feed.try_next() else { return Some(first) };
        let mut batch = BytesMut::from(&first[..]);
        loop {
            self.done = matches!(item, Item::End(_));
            batch.extend_from_slice(&encode(&item, self.retry, self.jitter));
            if self.done || batch.len() >= CHUNK_BYTES {
                break;
            }
            let Some(next) = self.feed.try_next() else { break };
            item = next;
        }
        Some(batch.freeze())
    }
}

/// Serve a hub feed as `text/event-stream`. A lone item is its own body
/// chunk, handed over without copying; items ready together are copied
/// into one chunk (up to about 64 KiB), and the writer gathers the
/// chunks that are ready into one (vectored) write. The write deadline is the
/// server's (`finmesh serve`: `write_timeout`).
pub fn feed_response(state: &AppState, feed: Feed) -> Response {
    let cfg = &state.config().subscriptions;
    let writer = FeedWriter {
        feed,
        hello: Some(Bytes::from(format!("retry: {}\n\n", cfg.retry.as_millis()))),
        idle: Box::pin(tokio::time::sleep(cfg.heartbeat)),
        heartbeat: cfg.heartbeat,
        retry: cfg.retry,
        jitter: cfg.retry_jitter,
        done: false,
    };
    let body = futures::stream::unfold(writer, |mut w| async move {
        let chunk = w.chunk().await?;
        Some((Ok::<_, Infallible>(chunk), w))
    });
    let mut response = Body::from_stream(body).into_response();
    let headers = response.headers_mut();
    headers.insert(header::CONTENT_TYPE, HeaderValue::from_static("text/event-stream"));
    headers.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    response
}
