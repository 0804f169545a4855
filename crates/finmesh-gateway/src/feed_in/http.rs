//! `POST /v1/streams/{stream}/feed`: the feed over one long HTTP request.
//!
//! The request body is read frame by frame as it arrives and the answers
//! stream back in the response body at the same time (HTTP/1.1 chunked or
//! HTTP/2), so the sender learns what is durable while it keeps sending.
//! The response head (200, `application/x-ndjson`) goes out before the
//! first line is read; every error after it is an `error` line.
//!
//! One task per feed reads the body and publishes; the response body is a
//! bounded channel of answer lines, so a sender that stops reading answers
//! stops the feed (back-pressure) instead of growing a buffer.

use std::convert::Infallible;

use axum::body::{Body, Bytes};
use axum::extract::{Path, Query, State};
use axum::http::{HeaderValue, header};
use axum::response::{IntoResponse, Response};
use futures::StreamExt;
use tokio::sync::mpsc;

use super::{Answers, FeedQuery, Input, Session};
use crate::AppState;
use crate::caller::Caller;
use crate::problem::ApiResult;

/// Answer lines waiting to be written to the sender.
const ANSWERS_QUEUED: usize = 64;

struct Channel(mpsc::Sender<Result<Bytes, Infallible>>);

impl Answers for Channel {
    async fn send(&mut self, line: Bytes) -> bool {
        self.0.send(Ok(line)).await.is_ok()
    }
}

/// `POST /v1/streams/{stream}/feed`: publish NDJSON lines as they arrive,
/// answering with NDJSON acks.
#[utoipa::path(post, path = "/v1/streams/{stream}/feed", tag = "streams",
    params(("stream" = String, Path), FeedQuery),
    request_body(content = String, content_type = "application/x-ndjson",
        description = "NDJSON lines {subject | symbol, msg_id, payload?, encoding?, headers?}, sent as they happen (chunked)"),
    responses((status = 200, description = "NDJSON answers while the body is read: `ack` per batch, then `end`, `error` or `reconnect`",
            content_type = "application/x-ndjson", body = String),
        (status = 404, body = crate::Problem)))]
pub async fn feed(
    State(state): State<AppState>,
    caller: Caller,
    Path(stream): Path<String>,
    Query(query): Query<FeedQuery>,
    body: Body,
) -> ApiResult<Response> {
    let session = Session::open(&state, caller, stream, query).await?;
    let (tx, rx) = mpsc::channel(ANSWERS_QUEUED);
    let input = body.into_data_stream().map(|chunk| chunk.map(Input::Data));
    tokio::spawn(async move {
        let mut answers = Channel(tx);
        session.run(input, &mut answers).await
    });
    let mut res = Body::from_stream(answer_stream(rx)).into_response();
    res.headers_mut().insert(header::CONTENT_TYPE, HeaderValue::from_static(crate::streams::NDJSON));
    res.headers_mut().insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    Ok(res)
}

/// The receiving end of the answer channel as a stream.
fn answer_stream(
    rx: mpsc::Receiver<Result<Bytes, Infallible>>,
) -> impl futures::Stream<Item = Result<Bytes, Infallible>> {
    futures::stream::unfold(rx, |mut rx| async move { rx.recv().await.map(|item| (item, rx)) })
}
