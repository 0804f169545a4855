//! WebSocket subscription: `GET /v1/streams/{stream}/ws?subject=&from_seq=`.
//!
//! Carries the same envelopes as SSE, one per text frame. Control events are
//! text frames too, tagged with `"event"`: `{"event":"gap","from","to","epoch"}`,
//! `{"event":"reset","epoch","last_seq"}` (see `sse.rs`);
//! the last one before the close is
//! `{"event":"error","reason":"slow_consumer","last_seq",…}` (close code
//! 1013, try again later: the fan-out hub found its queue full), `{"event":"reconnect","last_seq","retry_ms"}`
//! (close code 1012, service restart: the gateway drains; `retry_ms` is
//! jittered as SSE's `retry:`) or `{"event":"error",…}`
//! (close code 1011). `from_seq` names the first sequence wanted; without it
//! only new messages are sent. Pings go out after a heartbeat interval
//! without frames; client messages other than close are ignored.
//!
//! Messages come from the fan-out hub ([`crate::hub`]) already encoded; the
//! connection task feeds every frame that is ready, then flushes them in
//! one write.

use axum::extract::ws::rejection::WebSocketUpgradeRejection;
use axum::extract::ws::{CloseFrame, Message as WsMessage, Utf8Bytes, WebSocket, WebSocketUpgrade};
use axum::extract::{Path, Query, State};
use axum::response::{IntoResponse, Response};
use finmesh_auth::Access;
use finmesh_core::{StreamName, SubjectPattern};
use futures::SinkExt;
use serde_json::json;

use crate::AppState;
use crate::caller::{Caller, Peer};
use crate::hub::Feed;
use crate::problem::ApiResult;
use crate::sse::SubscribeQuery;
use crate::subscribe::{End, Frame, Item, SubscriberSpec, Subscription};

/// `GET /v1/streams/{stream}/ws`: upgrade to a WebSocket subscription.
#[utoipa::path(get, path = "/v1/streams/{stream}/ws", tag = "streams", params(("stream" = String, Path), SubscribeQuery, ("access_token" = Option<String>, Query, description = "the bearer token, for browsers whose EventSource cannot set Authorization (RFC 6750 §2.3; subscription routes only)")),
    responses((status = 101, description = "WebSocket: text frames carry envelopes"), (status = 404, body = crate::Problem),
        (status = 426, description = "not a WebSocket upgrade", body = crate::Problem)))]
pub async fn ws(
    State(state): State<AppState>,
    caller: Caller,
    peer: Peer,
    Path(stream): Path<String>,
    Query(q): Query<SubscribeQuery>,
    upgrade: Result<WebSocketUpgrade, WebSocketUpgradeRejection>,
) -> ApiResult<Response> {
    let name = StreamName::new(stream)?;
    let filter = q.subject.map(SubjectPattern::new).transpose()?;
    caller.require(&Access::StreamSubscribe { stream: &name, filter: filter.as_ref() })?;
    // Authorization first: a caller without the scope learns nothing more.
    let upgrade = match upgrade {
        Ok(u) => u,
        Err(rejection) => return Ok(rejection.into_response()),
    };
    let require = state.config().subscriptions.require_registration;
    let admission = state.registry().admit(caller.subject(), require, filter.as_ref()).await?;
    let spec = SubscriberSpec {
        kind: "ws",
        identity: caller.subject().to_owned(),
        resource: name.to_string(),
        filter: filter.as_ref().map(ToString::to_string),
    };
    let spec = Subscription::admit_from(&state, spec, &peer)?;
    // Open the feed before upgrading so a missing stream is a 404, not a close.
    let (sub, epoch) = Feed::open(&state, spec, &name, filter, q.from_seq, q.epoch).await?;
    let sub = sub.with_registry(state.registry(), &admission, "ws", peer.0);
    let cfg = &state.config().subscriptions;
    let (heartbeat, retry) = (cfg.heartbeat, crate::sse::reconnect_retry(cfg.retry, cfg.retry_jitter));
    let mut response = upgrade.on_upgrade(move |socket| serve(socket, sub, heartbeat, retry));
    response.headers_mut().insert(crate::sse::EPOCH_HEADER, epoch.into());
    Ok(response)
}

fn close(code: u16, reason: &str) -> WsMessage {
    WsMessage::Close(Some(CloseFrame { code, reason: reason.into() }))
}

/// The frames that end a subscription: a final event and a close frame.
fn ending(end: &End, retry: std::time::Duration) -> (String, WsMessage) {
    match end {
        End::Lagged { last_sent } => {
            (json!({ "event": "lagged", "last_seq": last_sent }).to_string(), close(1013, "lagged"))
        }
        End::SlowConsumer { last_sent } => {
            let mut ev = crate::sse::slow_consumer(*last_sent);
            ev["event"] = "error".into();
            (ev.to_string(), close(1013, "slow consumer"))
        }
        End::Reconnect { last_sent } => (
            json!({ "event": "reconnect", "last_seq": last_sent, "retry_ms": retry.as_millis() as u64 }).to_string(),
            close(1012, "draining; reconnect"),
        ),
        End::Failed(p) => (json!({ "event": "error", "problem": p }).to_string(), close(1011, "subscription failed")),
        End::Finished => (json!({ "event": "end" }).to_string(), close(1000, "end")),
    }
}

/// The text message of a frame (a shared message: its payload, no copy).
fn message(frame: Frame) -> WsMessage {
    match frame {
        Frame::Shared(e) => WsMessage::Text(e.ws.clone()),
        // Envelopes are UTF-8 JSON (see `envelope`).
        Frame::Message { data, .. } => WsMessage::Text(Utf8Bytes::try_from(data).unwrap_or_default()),
        Frame::Gap { from, to, epoch } => {
            WsMessage::Text(json!({ "event": "gap", "from": from, "to": to, "epoch": epoch }).to_string().into())
        }
        Frame::Reset { epoch, last_seq } => {
            WsMessage::Text(json!({ "event": "reset", "epoch": epoch, "last_seq": last_seq }).to_string().into())
        }
    }
}

/// The connection's task: sends every frame that is ready, then flushes
/// them in one write; pings when idle.
async fn serve(mut socket: WebSocket, mut sub: Feed, heartbeat: std::time::Duration, retry: std::time::Duration) {
    let mut ping = tokio::time::interval(heartbeat);
    ping.reset();
    loop {
        let item = tokio::select! {
            item = sub.next() => item,
            incoming = socket.recv() => match incoming {
                Some(Ok(WsMessage::Close(_))) | None | Some(Err(_)) => return,
                Some(Ok(_)) => continue,
            },
            _ = ping.tick() => {
                if socket.send(WsMessage::Ping(Default::default())).await.is_err() {
                    return;
                }
                continue;
            }
        };
        let mut item = item;
        loop {
            match item {
                Some(Item::Frame(frame)) => {
                    if socket.feed(message(frame)).await.is_err() {
                        return;
                    }
                }
                Some(Item::End(end)) => {
                    let (last, close) = ending(&end, retry);
                    let _ = socket.feed(WsMessage::Text(last.into())).await;
                    let _ = socket.send(close).await;
                    return;
                }
                None => {
                    let _ = socket.flush().await;
                    return;
                }
            }
            item = sub.try_next();
            if item.is_none() {
                break;
            }
        }
        if socket.flush().await.is_err() {
            return;
        }
        ping.reset();
    }
}
