//! Feed in: the receiver of a continuous upload from a central server.
//!
//! Two transports carry the same lines ([`lines`]) and the same answers:
//! - `POST /v1/streams/{stream}/feed`: one long (usually chunked) request
//!   whose body is NDJSON; the response body, streamed while the request is
//!   still being sent, is NDJSON too ([`http`]);
//! - `GET /v1/streams/{stream}/feed/ws`: a WebSocket whose text frames hold
//!   whole lines, answered by text frames ([`ws`]).
//!
//! The receiver reads the input incrementally (never buffered whole) and
//! publishes it in batches, one [`publish_batch`](finmesh_core::StreamEngine::publish_batch)
//! per batch. A batch closes at [`FeedConfig::batch_max_messages`] lines,
//! [`FeedConfig::batch_max_bytes`] bytes, or when no more input is waiting
//! and [`FeedConfig::linger`] has passed since its first line, whichever
//! comes first.
//!
//! Answers, one JSON object per line (frame), in this order:
//!
//! ```text
//! {"event":"ack","batch":1,"first_line":1,"last_line":3,"first_msg_id":"f-1","last_msg_id":"f-3","count":3,"duplicates":0,"first_seq":1,"last_seq":3}
//! {"event":"error","problem":{"type":".../invalid","status":400,"detail":"line 4, column 9: …","line":4,"column":9,…}}
//! {"event":"end","lines":3,"messages":3,"duplicates":0,"batches":1}
//! {"event":"reconnect","retry_ms":2500}
//! ```
//!
//! Invariants:
//! - an ack is sent only after the engine acked its batch: everything it
//!   names is as durable as the stream's `sync` promises; `last_seq` is the
//!   highest sequence of the batch (a duplicate counts with its original's);
//! - batches are published one at a time, in line order, and acked in that
//!   order; every input line is in exactly one ack, or is the line an error
//!   names, or comes after it;
//! - a bad line (malformed, too long, no subject, a subject the stream does
//!   not capture or the token may not publish, too large) is never
//!   published: the lines before it are published and acked, then one
//!   `error` names it (line, column when known, reason) and the feed ends
//!   without reading further; nothing is half-published, since each line
//!   is checked before it joins a batch;
//! - an input that stops mid-line (connection lost, idle past
//!   [`FeedConfig::idle_timeout`]) never publishes the partial line;
//! - at most [`FeedConfig::max_line_bytes`] of an unfinished line and one
//!   batch are held per feed;
//! - when the gateway drains, the open batch is published and acked, then
//!   `reconnect` ends the feed;
//! - before the feed starts, errors are `problem+json` answers (400, 401,
//!   403, 404, 503); after it, they are `error` lines.
//!
//! The sender's message ids are the engine's `Msg-Id`, so a line sent again
//! within the stream's duplicate window (after a reconnect, or to another
//! gateway of the same NATS cluster) is acked with `duplicates` and stored
//! once. A feed counts as one request against the caller's rate limit when
//! it starts; its lines are bounded by these limits instead.

pub mod http;
pub mod lines;
pub mod ws;

use std::time::Duration;

use bytes::Bytes;
use finmesh_auth::Access;
use finmesh_auth::Scope;
use finmesh_auth::scope::{NameMatch, StreamAction};
use finmesh_core::{Error, ErrorKind, OutgoingMessage, StreamName, Subject, SubjectPattern};
use futures::{Stream, StreamExt};
use serde::Serialize;
use tokio::time::Instant;

use crate::AppState;
use crate::caller::Caller;
use crate::problem::{ApiResult, Problem};
use lines::{LineSplitter, TooLong};

/// Limits and batching of feed uploads (`[feed]` in the configuration).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FeedConfig {
    /// Longest line (one message) accepted. Default 1 MiB.
    pub max_line_bytes: usize,
    /// A batch closes at this many messages. Default 1,000.
    pub batch_max_messages: usize,
    /// A batch closes once its messages hold this many bytes. Default 1 MiB.
    pub batch_max_bytes: usize,
    /// A batch with no more input waiting closes this long after its first
    /// line. Default 0: as soon as the input pauses.
    pub linger: Duration,
    /// A feed that receives no byte for this long ends with `timeout`
    /// (blank lines are keepalives). Default 30 s.
    pub idle_timeout: Duration,
    /// Bytes one upload may carry; past it the feed acks what it has, ends
    /// with `too-large`, and the sender opens a new upload. Default 16 GiB.
    pub max_upload_bytes: u64,
}

impl Default for FeedConfig {
    fn default() -> Self {
        FeedConfig {
            max_line_bytes: 1024 * 1024,
            batch_max_messages: 1000,
            batch_max_bytes: 1024 * 1024,
            linger: Duration::ZERO,
            idle_timeout: Duration::from_secs(30),
            max_upload_bytes: 16 * 1024 * 1024 * 1024,
        }
    }
}

/// The subject prefix a `symbol` is put under unless the route names another.
pub const DEFAULT_SYMBOL_PREFIX: &str = "md";

/// `?symbol_prefix=` of both feed routes.
#[derive(Debug, serde::Deserialize, utoipa::IntoParams)]
pub struct FeedQuery {
    /// Subject prefix of lines that give a `symbol` (default `md`: symbol
    /// `AAPL` is subject `md.AAPL`).
    pub symbol_prefix: Option<String>,
}

/// One answer line.
#[derive(Debug, Serialize)]
#[serde(tag = "event", rename_all = "snake_case")]
enum Answer<'a> {
    Ack(&'a BatchAck),
    Error { problem: &'a Problem },
    End { lines: u64, messages: u64, duplicates: u64, batches: u64 },
    Reconnect { retry_ms: u64 },
}

/// What one batch's ack says.
#[derive(Debug, Clone, Serialize)]
pub struct BatchAck {
    /// 1-based number of the batch in this feed.
    pub batch: u64,
    /// Input line of its first message.
    pub first_line: u64,
    /// Input line of its last message.
    pub last_line: u64,
    /// The sender's id of its first message.
    pub first_msg_id: String,
    /// The sender's id of its last message.
    pub last_msg_id: String,
    /// Messages in the batch.
    pub count: usize,
    /// How many of them were duplicates (stored before; not stored again).
    pub duplicates: usize,
    /// Lowest sequence of the batch.
    pub first_seq: u64,
    /// Highest sequence of the batch.
    pub last_seq: u64,
}

fn encode(answer: &Answer<'_>) -> Bytes {
    let mut out = serde_json::to_vec(answer).unwrap_or_default();
    out.push(b'\n');
    Bytes::from(out)
}

/// A line's problem: `invalid` or `too-large`, with its line and column.
fn line_problem(line: u64, column: Option<usize>, e: &Error) -> Problem {
    let at = match column {
        Some(c) => format!("line {line}, column {c}"),
        None => format!("line {line}"),
    };
    let mut p = Problem::from_error(&Error::new(e.kind(), format!("{at}: {}", e.message())));
    p.line = usize::try_from(line).ok();
    p.column = column;
    p
}

/// Whether the caller may publish to at least one subject of `stream`
/// (each line's subject is checked again on its own).
fn may_publish_to(caller: &Caller, stream: &StreamName) -> bool {
    caller.0.grants().iter().any(|g| match g {
        Scope::Admin => true,
        Scope::Stream { action: StreamAction::Publish, stream: s, .. } => match s {
            NameMatch::Any => true,
            NameMatch::Exact(n) => n == stream,
        },
        _ => false,
    })
}

/// One feed: what it writes to, the open batch and the counts so far.
pub(crate) struct Session {
    state: AppState,
    caller: Caller,
    stream: StreamName,
    prefix: String,
    captures: Vec<SubjectPattern>,
    max_msg_bytes: usize,
    cfg: FeedConfig,
    batch: Vec<OutgoingMessage>,
    batch_bytes: usize,
    first_line: u64,
    last_line: u64,
    batches: u64,
    messages: u64,
    duplicates: u64,
    /// Input not yet cut into lines (at most one unfinished line).
    splitter: LineSplitter,
    /// Bytes received in all.
    received: u64,
    /// When the open batch got its first line.
    opened: Option<Instant>,
}

/// How a feed ended (the WebSocket picks its close code from it).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Outcome {
    /// The input ended and everything was acked.
    Finished,
    /// An `error` line was sent; its kind.
    Failed(ErrorKind),
    /// The gateway drains: `reconnect` was sent.
    Drained,
    /// The sender went away (input or answers broken).
    Gone,
}

/// Where answers go.
pub(crate) trait Answers {
    /// Send one answer line; false when the sender is gone.
    fn send(&mut self, line: Bytes) -> impl std::future::Future<Output = bool> + Send;
}

/// Input the transports hand to [`Session::run`].
pub(crate) enum Input {
    /// Bytes of lines.
    Data(Bytes),
    /// Bytes of whole lines: their end also ends a line (a WebSocket frame).
    Lines(Bytes),
    /// A frame the transport refuses (WebSocket binary frames).
    Refused(Error),
}

impl Session {
    /// Check everything that can be checked before the feed starts.
    pub(crate) async fn open(state: &AppState, caller: Caller, stream: String, query: FeedQuery) -> ApiResult<Session> {
        let stream = StreamName::new(stream)?;
        if !may_publish_to(&caller, &stream) {
            return Err(Error::new(
                ErrorKind::Forbidden,
                format!("`{}` may not publish to stream `{stream}`", caller.subject()),
            )
            .into());
        }
        let prefix = query.symbol_prefix.unwrap_or_else(|| DEFAULT_SYMBOL_PREFIX.to_owned());
        if prefix.contains(['*', '>']) || Subject::new(format!("{prefix}.X")).is_err() {
            return Err(Error::invalid(format!("symbol_prefix `{prefix}` is not a subject prefix")).into());
        }
        if state.is_draining() {
            return Err(Error::unavailable("the gateway is draining; feed another gateway").into());
        }
        let info = state.engine().stream_info(&stream).await?;
        Ok(Session {
            state: state.clone(),
            caller,
            stream,
            prefix,
            captures: info.config.subjects.clone(),
            max_msg_bytes: info.config.msg_size_limit() as usize,
            cfg: state.config().feed.clone(),
            batch: Vec::new(),
            batch_bytes: 0,
            first_line: 0,
            last_line: 0,
            batches: 0,
            messages: 0,
            duplicates: 0,
            splitter: LineSplitter::new(state.config().feed.max_line_bytes),
            received: 0,
            opened: None,
        })
    }

    /// Check line `line_no` and add it to the open batch.
    fn add(&mut self, line_no: u64, line: &Bytes) -> Result<(), Box<Problem>> {
        let msg =
            lines::parse_line(line, &self.prefix).map_err(|e| Box::new(line_problem(line_no, e.column, &e.error)))?;
        let refuse =
            |kind: ErrorKind, message: String| Box::new(line_problem(line_no, None, &Error::new(kind, message)));
        if !self.captures.iter().any(|p| p.matches(&msg.subject)) {
            return Err(refuse(
                ErrorKind::Invalid,
                format!("stream `{}` does not capture subject `{}`", self.stream, msg.subject),
            ));
        }
        if !self.caller.0.allows(&Access::StreamPublish { stream: &self.stream, subject: &msg.subject }) {
            return Err(refuse(
                ErrorKind::Forbidden,
                format!("`{}` may not publish to `{}`", self.caller.subject(), msg.subject),
            ));
        }
        if msg.size() > self.max_msg_bytes {
            return Err(refuse(
                ErrorKind::TooLarge,
                format!(
                    "the message is {} bytes; stream `{}` takes at most {}",
                    msg.size(),
                    self.stream,
                    self.max_msg_bytes
                ),
            ));
        }
        if self.batch.is_empty() {
            self.first_line = line_no;
        }
        self.last_line = line_no;
        self.batch_bytes += msg.size();
        self.batch.push(msg);
        Ok(())
    }

    fn is_full(&self) -> bool {
        self.batch.len() >= self.cfg.batch_max_messages.max(1) || self.batch_bytes >= self.cfg.batch_max_bytes
    }

    /// Publish the open batch: its ack line, or the error line.
    async fn flush(&mut self) -> Option<Result<Bytes, (ErrorKind, Bytes)>> {
        if self.batch.is_empty() {
            return None;
        }
        let msgs = std::mem::take(&mut self.batch);
        self.batch_bytes = 0;
        self.opened = None;
        let id = |m: Option<&OutgoingMessage>| m.and_then(OutgoingMessage::msg_id).unwrap_or_default().to_owned();
        let (first_msg_id, last_msg_id) = (id(msgs.first()), id(msgs.last()));
        let count = msgs.len();
        match self.state.engine().publish_batch(&self.stream, msgs).await {
            Ok(acks) => {
                self.batches += 1;
                let duplicates = acks.iter().filter(|a| a.duplicate).count();
                self.messages += count as u64;
                self.duplicates += duplicates as u64;
                crate::metrics::published(self.stream.as_str(), count - duplicates);
                let ack = BatchAck {
                    batch: self.batches,
                    first_line: self.first_line,
                    last_line: self.last_line,
                    first_msg_id,
                    last_msg_id,
                    count,
                    duplicates,
                    first_seq: acks.iter().map(|a| a.seq.0).min().unwrap_or(0),
                    last_seq: acks.iter().map(|a| a.seq.0).max().unwrap_or(0),
                };
                Some(Ok(encode(&Answer::Ack(&ack))))
            }
            Err(e) => {
                crate::metrics::engine_error(e.kind());
                let mut problem = Problem::from_error(&e);
                problem.detail = format!(
                    "lines {}-{} were not published (everything acked before them was): {}",
                    self.first_line, self.last_line, problem.detail
                );
                Some(Err((e.kind(), encode(&Answer::Error { problem: &problem }))))
            }
        }
    }

    /// Publish the open batch and send its answer; the outcome when the
    /// feed must end.
    async fn flush_and_answer(&mut self, out: &mut impl Answers) -> Option<Outcome> {
        match self.flush().await {
            None => None,
            Some(Ok(ack)) => (!out.send(ack).await).then_some(Outcome::Gone),
            Some(Err((kind, line))) => {
                out.send(line).await;
                Some(Outcome::Failed(kind))
            }
        }
    }

    /// Publish what is complete, then end with `problem`.
    async fn fail(&mut self, out: &mut impl Answers, problem: Problem) -> Outcome {
        if let Some(outcome) = self.flush_and_answer(out).await {
            return outcome;
        }
        let kind = match problem.status {
            403 => ErrorKind::Forbidden,
            413 => ErrorKind::TooLarge,
            504 => ErrorKind::Timeout,
            _ => ErrorKind::Invalid,
        };
        out.send(encode(&Answer::Error { problem: &problem })).await;
        Outcome::Failed(kind)
    }

    /// Take received bytes: add their complete lines to batches, publishing
    /// each batch that fills up; the outcome when the feed must end.
    async fn take(&mut self, chunk: Bytes, ends_line: bool, out: &mut impl Answers) -> Option<Outcome> {
        self.received += chunk.len() as u64;
        if self.received > self.cfg.max_upload_bytes {
            let e = Error::too_large(format!(
                "the upload passed feed.max_upload_bytes ({}) in line {}; the lines before it are acked, \
                 send the rest in a new upload",
                self.cfg.max_upload_bytes,
                self.splitter.current_line()
            ));
            return Some(self.fail(out, Problem::from_error(&e)).await);
        }
        self.splitter.extend(&chunk);
        if ends_line && !chunk.ends_with(b"\n") {
            self.splitter.extend(b"\n");
        }
        loop {
            let (line_no, line) = match self.splitter.next_line() {
                Ok(Some(line)) => line,
                Ok(None) => break,
                Err(TooLong { line, max_line_bytes }) => {
                    let e = Error::too_large(format!("the line is longer than feed.max_line_bytes ({max_line_bytes})"));
                    return Some(self.fail(out, line_problem(line, None, &e)).await);
                }
            };
            if lines::is_blank(&line) {
                continue;
            }
            if let Err(problem) = self.add(line_no, &line) {
                return Some(self.fail(out, *problem).await);
            }
            if self.is_full()
                && let Some(outcome) = self.flush_and_answer(out).await
            {
                return Some(outcome);
            }
        }
        if self.opened.is_none() && !self.batch.is_empty() {
            self.opened = Some(Instant::now());
        }
        None
    }

    /// Feed `input` through batches to the engine, answering on `out`,
    /// until the input ends, a line fails, or the gateway drains.
    pub(crate) async fn run<I, E>(mut self, input: I, out: &mut impl Answers) -> Outcome
    where
        I: Stream<Item = Result<Input, E>> + Send,
        E: std::fmt::Display,
    {
        let mut input = std::pin::pin!(input);
        let drain = self.state.drain_token();
        loop {
            let next = match self.opened {
                // The linger is over (at once when it is zero): take input
                // that is already waiting, else publish now. Never through a
                // timer: the runtime's timers tick per millisecond, so an
                // expired deadline would still hold the batch up to the
                // next tick (+0.5 ms per batch on average, measured).
                Some(at) if at + self.cfg.linger <= Instant::now() => {
                    if drain.is_cancelled() {
                        Wake::Drain
                    } else {
                        match futures::FutureExt::now_or_never(input.next()) {
                            Some(next) => Wake::Input(next),
                            None => Wake::Linger,
                        }
                    }
                }
                Some(at) => tokio::select! {
                    biased;
                    _ = drain.cancelled() => Wake::Drain,
                    next = input.next() => Wake::Input(next),
                    _ = tokio::time::sleep_until(at + self.cfg.linger) => Wake::Linger,
                },
                None => tokio::select! {
                    biased;
                    _ = drain.cancelled() => Wake::Drain,
                    next = tokio::time::timeout(self.cfg.idle_timeout, input.next()) => match next {
                        Ok(next) => Wake::Input(next),
                        Err(_) => Wake::Idle,
                    },
                },
            };
            let ended = match next {
                // Draining: what is complete is published and acked, then `reconnect`.
                Wake::Drain => match self.flush_and_answer(out).await {
                    Some(outcome) => Some(outcome),
                    None => {
                        let cfg = &self.state.config().subscriptions;
                        let retry = crate::sse::reconnect_retry(cfg.retry, cfg.retry_jitter);
                        out.send(encode(&Answer::Reconnect { retry_ms: retry.as_millis() as u64 })).await;
                        Some(Outcome::Drained)
                    }
                },
                Wake::Linger => self.flush_and_answer(out).await,
                Wake::Idle => {
                    let detail = format!(
                        "no input for {} ms (feed.idle_timeout; send blank lines as keepalives){}",
                        self.cfg.idle_timeout.as_millis(),
                        match self.splitter.pending() {
                            0 => String::new(),
                            n => format!(
                                "; the unfinished line {} ({n} bytes) was dropped",
                                self.splitter.current_line()
                            ),
                        }
                    );
                    Some(self.fail(out, Problem::from_error(&Error::new(ErrorKind::Timeout, detail))).await)
                }
                Wake::Input(Some(Ok(Input::Data(chunk)))) => self.take(chunk, false, out).await,
                Wake::Input(Some(Ok(Input::Lines(chunk)))) => self.take(chunk, true, out).await,
                Wake::Input(Some(Ok(Input::Refused(e)))) => {
                    let problem = line_problem(self.splitter.current_line(), None, &e);
                    Some(self.fail(out, problem).await)
                }
                // The sender's connection broke: complete lines are
                // published (the sender resends what it saw no ack for),
                // the unfinished one is dropped.
                Wake::Input(Some(Err(e))) => {
                    tracing::debug!(stream = %self.stream, error = %e, partial = self.splitter.pending(),
                        "feed input broke off");
                    let _ = self.flush_and_answer(out).await;
                    Some(Outcome::Gone)
                }
                Wake::Input(None) => Some(self.finish(out).await),
            };
            if let Some(outcome) = ended {
                return outcome;
            }
        }
    }

    /// The input ended: its last line (even without a newline) is
    /// published, then `end`.
    async fn finish(&mut self, out: &mut impl Answers) -> Outcome {
        if let Some((line_no, line)) = self.splitter.finish()
            && !lines::is_blank(&line)
            && let Err(problem) = self.add(line_no, &line)
        {
            return self.fail(out, *problem).await;
        }
        if let Some(outcome) = self.flush_and_answer(out).await {
            return outcome;
        }
        let end = Answer::End {
            lines: self.splitter.current_line() - 1,
            messages: self.messages,
            duplicates: self.duplicates,
            batches: self.batches,
        };
        out.send(encode(&end)).await;
        Outcome::Finished
    }
}

/// What woke the feed loop.
enum Wake<T> {
    Drain,
    Linger,
    Idle,
    Input(Option<T>),
}
