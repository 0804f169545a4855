//! `GET /v1/streams/{stream}/feed/ws`: the feed over a WebSocket.
//!
//! Each text frame holds one or more whole lines (a frame's end also ends
//! its last line); answers are text frames, one answer each. The sender
//! ends the feed by closing once it holds an ack for every line it sent
//! (lines received before its close are still published, but after a close
//! the socket carries no answers, so there is no `end`). When the receiver
//! ends the feed, its last answer is followed by a close frame: 1012 after
//! `reconnect` (the gateway drains), 1009 after a `too-large` error, 1008
//! after any other refused input, 1011 when the engine failed. Binary
//! frames are refused. Pings are answered by the WebSocket layer.

use axum::extract::ws::rejection::WebSocketUpgradeRejection;
use axum::extract::ws::{CloseFrame, Message as WsMessage, Utf8Bytes, WebSocket, WebSocketUpgrade};
use axum::extract::{Path, Query, State};
use axum::response::{IntoResponse, Response};
use bytes::Bytes;
use finmesh_core::{Error, ErrorKind};
use futures::stream::SplitSink;
use futures::{SinkExt, StreamExt};

use super::{Answers, FeedQuery, Input, Outcome, Session};
use crate::AppState;
use crate::caller::Caller;
use crate::problem::ApiResult;

struct Socket(SplitSink<WebSocket, WsMessage>);

impl Answers for Socket {
    async fn send(&mut self, line: Bytes) -> bool {
        // Answers are UTF-8 JSON; the newline is the HTTP framing's.
        let text = line.slice(..line.len() - usize::from(line.ends_with(b"\n")));
        let text = Utf8Bytes::try_from(text).unwrap_or_default();
        self.0.send(WsMessage::Text(text)).await.is_ok()
    }
}

/// `GET /v1/streams/{stream}/feed/ws`: upgrade to a feed WebSocket.
#[utoipa::path(get, path = "/v1/streams/{stream}/feed/ws", tag = "streams",
    params(("stream" = String, Path), FeedQuery),
    responses((status = 101, description = "WebSocket: text frames of NDJSON lines in, one answer per text frame out"),
        (status = 404, body = crate::Problem),
        (status = 426, description = "not a WebSocket upgrade", body = crate::Problem)))]
pub async fn feed_ws(
    State(state): State<AppState>,
    caller: Caller,
    Path(stream): Path<String>,
    Query(query): Query<FeedQuery>,
    upgrade: Result<WebSocketUpgrade, WebSocketUpgradeRejection>,
) -> ApiResult<Response> {
    let session = Session::open(&state, caller, stream, query).await?;
    let upgrade = match upgrade {
        Ok(u) => u,
        Err(rejection) => return Ok(rejection.into_response()),
    };
    // Frames a little over a line are refused by the session with the line
    // number; far larger ones by the WebSocket layer.
    let max_frame = state.config().feed.max_line_bytes.saturating_mul(2).max(64 * 1024);
    Ok(upgrade.max_message_size(max_frame).max_frame_size(max_frame).on_upgrade(move |socket| serve(socket, session)))
}

/// The close frame after the last answer of a feed that ended with `outcome`.
fn close_frame(outcome: Outcome) -> Option<WsMessage> {
    let (code, reason) = match outcome {
        Outcome::Finished => (1000, "end"),
        Outcome::Drained => (1012, "draining; reconnect"),
        Outcome::Failed(ErrorKind::TooLarge) => (1009, "too large"),
        Outcome::Failed(ErrorKind::Unavailable | ErrorKind::Internal | ErrorKind::Timeout) => (1011, "feed failed"),
        Outcome::Failed(_) => (1008, "input refused"),
        Outcome::Gone => return None,
    };
    Some(WsMessage::Close(Some(CloseFrame { code, reason: reason.into() })))
}

async fn serve(socket: WebSocket, session: Session) {
    let (sink, stream) = socket.split();
    let input = stream.take_while(|m| std::future::ready(!matches!(m, Ok(WsMessage::Close(_))))).filter_map(|m| {
        std::future::ready(match m {
            Ok(WsMessage::Text(text)) => Some(Ok(Input::Lines(Bytes::from(text)))),
            Ok(WsMessage::Binary(_)) => {
                Some(Ok(Input::Refused(Error::invalid("binary frames are not accepted; send lines as text frames"))))
            }
            Ok(_) => None,
            Err(e) => Some(Err(e)),
        })
    });
    let mut out = Socket(sink);
    let outcome = session.run(input, &mut out).await;
    if let Some(close) = close_frame(outcome) {
        let _ = out.0.send(close).await;
    }
}
