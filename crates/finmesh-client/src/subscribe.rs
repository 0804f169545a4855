//! A resumable SSE subscription to a stream
//! (`GET /v1/streams/{stream}/events`, docs/api.md): [`Subscription`],
//! built with [`SubscriptionBuilder`], read with [`Subscription::next`].
//!
//! What it guarantees, and how:
//! - **resume without loss or duplicate.** The subscription's
//!   [`position`](Subscription::position) is the last sequence it handed to
//!   the application (or skipped past for a `gap`, a `reset` or a
//!   heartbeat that carries the head sequence). Every reconnection sends it
//!   as `Last-Event-ID`, so the node sends from the next sequence on. A
//!   message handed out by [`next`](Subscription::next) counts as processed
//!   (processed-on-delivery): a reconnection can only happen inside `next`,
//!   so the message the application holds was always handled first. Across
//!   restarts of the application, persist `position()` after handling and
//!   start again with [`Start::After`];
//! - **continuity checks.** A `gap` event (history the node no longer has)
//!   is reported as [`Event::Gap`]; a `reset` (the stream's epoch changed:
//!   it was recreated or lost writes, so sequences past `last_seq` are void)
//!   as [`Event::Reset`]; a message at or below the position within one
//!   epoch (a node that rewound) as [`Event::Rewind`], and such messages
//!   are dropped, never handed out twice. Without a subject filter the
//!   sequences of a stream are consecutive, so a jump the node did not
//!   announce is reported as a `Gap` with `announced: false`. The stream's
//!   epoch (`Finmesh-Stream-Epoch`) is sent back as `epoch=` on every
//!   reconnection, so a changed stream is noticed even on another node;
//! - **reconnect and failover.** Endpoints are tried in turn. A broken
//!   connection, a refused one, a 5xx or 429 answer or an `error` event
//!   (engine unavailable) moves to the next endpoint after a jittered
//!   exponential [`Backoff`] (a 429/503's `Retry-After` is honoured up to
//!   the backoff's cap); a `reconnect` event (the node drains) moves to the
//!   next endpoint after the node's `retry:` hint; `lagged` or an `error`
//!   with reason `slow_consumer` (the application read too slowly) comes
//!   back to the same endpoint at once. Every attempt that fails and every
//!   lost connection is reported as [`Event::Disconnected`], every
//!   connection as [`Event::Connected`]. The backoff starts again from its
//!   first step once a connection delivered an event;
//! - **what is fatal.** 400, 401, 403 and 404 answers (and a 404 `error`
//!   event: the stream was deleted) end the subscription with an [`Error`],
//!   as does [`SubscriptionBuilder::max_failed_attempts`] consecutive
//!   failed attempts (unlimited by default).
//!
//! With [`Start::New`] and no message received yet, a reconnection again
//! asks for new messages only: what was published while disconnected
//! before the first message is not replayed (use [`Start::From`] for that).

use std::collections::VecDeque;
use std::time::Duration;

use bytes::Bytes;
use futures::StreamExt;
use futures::stream::BoxStream;
use reqwest::StatusCode;
use reqwest::header::{HeaderMap, RETRY_AFTER};

use crate::backoff::Backoff;
use crate::sse::{SseEvent, SseParser};
use crate::{Error, ErrorKind};

/// The header that carries the stream's epoch.
pub const EPOCH_HEADER: &str = "finmesh-stream-epoch";

/// Where a subscription starts.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Start {
    /// Only messages published from now on.
    #[default]
    New,
    /// From this sequence on (`0` = the first one stored).
    From(u64),
    /// After this sequence: the position an application persisted.
    After(u64),
}

/// What [`Subscription::next`] yields.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum Event {
    /// A message: deliver it, the subscription's position is now its `seq`.
    Message(Message),
    /// Sequences `from..=to` will never be delivered (retention or a purge
    /// dropped them). `announced` is false when the node sent no `gap` and
    /// the client saw the jump itself (only without a subject filter).
    Gap {
        /// First missing sequence.
        from: u64,
        /// Last missing sequence.
        to: u64,
        /// The stream's epoch, when known.
        epoch: Option<u64>,
        /// Whether the node announced it.
        announced: bool,
    },
    /// The stream's history changed under the position (recreated, or lost
    /// writes in a crash): what the application has past `last_seq` is
    /// void, and delivery goes on from `last_seq + 1` in epoch `epoch`.
    Reset {
        /// The stream's epoch now.
        epoch: u64,
        /// The last sequence of the old history that still holds.
        last_seq: u64,
    },
    /// The node sent sequence `got` although `expected` was next: it went
    /// back in the same epoch. Messages up to the position are dropped (the
    /// application has them); reported once per connection.
    Rewind {
        /// The sequence that was expected.
        expected: u64,
        /// The sequence that came.
        got: u64,
    },
    /// A connection is open (the first one, or a reconnection).
    Connected {
        /// The endpoint's base URL.
        endpoint: String,
        /// The stream's epoch the node announced (`None` = unknown).
        epoch: Option<u64>,
        /// The position it resumes after (`None` = not known yet).
        resume_after: Option<u64>,
    },
    /// A connection attempt failed, or an open connection ended; the next
    /// attempt comes after `retry_in`.
    Disconnected {
        /// The endpoint's base URL.
        endpoint: String,
        /// Why, for logs.
        reason: String,
        /// The wait before the next attempt.
        retry_in: Duration,
    },
}

/// One message of a stream.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Message {
    /// Its sequence in the stream.
    pub seq: u64,
    /// The JSON envelope, as sent (`{"seq","subject","time","headers"?,"payload","encoding"?}`).
    pub envelope: String,
}

impl Message {
    /// The envelope, parsed.
    pub fn json(&self) -> Result<serde_json::Value, Error> {
        serde_json::from_str(&self.envelope).map_err(|e| Error::new(ErrorKind::Protocol, format!("envelope: {e}")))
    }
}

/// Builds a [`Subscription`].
#[derive(Debug, Clone)]
pub struct SubscriptionBuilder {
    endpoints: Vec<String>,
    stream: String,
    subject: Option<String>,
    token: Option<String>,
    start: Start,
    epoch: Option<u64>,
    backoff: Backoff,
    max_failed_attempts: Option<u32>,
    http: Option<reqwest::Client>,
}

impl SubscriptionBuilder {
    /// A subscription to `stream` on the nodes at `endpoints` (base URLs
    /// like `https://node-a:8080`, tried in this order).
    pub fn new(endpoints: impl IntoIterator<Item = impl Into<String>>, stream: impl Into<String>) -> Self {
        SubscriptionBuilder {
            endpoints: endpoints.into_iter().map(|e| e.into().trim_end_matches('/').to_owned()).collect(),
            stream: stream.into(),
            subject: None,
            token: None,
            start: Start::New,
            epoch: None,
            backoff: Backoff::default(),
            max_failed_attempts: None,
            http: None,
        }
    }

    /// Only subjects matching `pattern` (wildcards allowed).
    pub fn subject(mut self, pattern: impl Into<String>) -> Self {
        self.subject = Some(pattern.into());
        self
    }

    /// The bearer token sent as `Authorization`.
    pub fn token(mut self, token: impl Into<String>) -> Self {
        self.token = Some(token.into());
        self
    }

    /// Where to start (default [`Start::New`]).
    pub fn start(mut self, start: Start) -> Self {
        self.start = start;
        self
    }

    /// The epoch a persisted position belongs to (from
    /// [`Subscription::epoch`]), so a changed stream is reported.
    pub fn epoch(mut self, epoch: u64) -> Self {
        self.epoch = Some(epoch);
        self
    }

    /// Backoff between failed attempts.
    pub fn backoff(mut self, backoff: Backoff) -> Self {
        self.backoff = backoff;
        self
    }

    /// Give up after `n` consecutive failed attempts (default: never).
    pub fn max_failed_attempts(mut self, n: u32) -> Self {
        self.max_failed_attempts = Some(n);
        self
    }

    /// The HTTP client to use (its TLS roots, proxies, timeouts; it must
    /// not time out whole requests, since a subscription never ends).
    pub fn http_client(mut self, client: reqwest::Client) -> Self {
        self.http = Some(client);
        self
    }

    /// The subscription; it connects on the first [`Subscription::next`].
    pub fn build(self) -> Result<Subscription, Error> {
        if self.endpoints.is_empty() {
            return Err(Error::new(ErrorKind::Invalid, "at least one endpoint is needed"));
        }
        let http = match self.http.clone() {
            Some(c) => c,
            None => reqwest::Client::builder()
                .connect_timeout(Duration::from_secs(10))
                .build()
                .map_err(|e| Error::new(ErrorKind::Invalid, format!("building the HTTP client: {e}")))?,
        };
        let (position, first) = match self.start {
            Start::New => (None, None),
            Start::From(seq) => (None, Some(seq)),
            Start::After(seq) => (Some(seq), None),
        };
        Ok(Subscription {
            epoch: self.epoch,
            cfg: self,
            http,
            position,
            first,
            current: 0,
            failures: 0,
            wait: None,
            conn: None,
            queue: VecDeque::new(),
            finished: false,
        })
    }
}

/// One open connection.
struct Conn {
    endpoint: String,
    body: BoxStream<'static, reqwest::Result<Bytes>>,
    parser: SseParser,
    rewound: bool,
}

/// See the [module documentation](self).
pub struct Subscription {
    cfg: SubscriptionBuilder,
    http: reqwest::Client,
    /// The last sequence handed out or skipped; `Last-Event-ID` on reconnection.
    position: Option<u64>,
    /// `from_seq` of the first connection ([`Start::From`]), until a position is known.
    first: Option<u64>,
    epoch: Option<u64>,
    /// Index of the endpoint in use or tried next.
    current: usize,
    /// Consecutive failed attempts (the backoff's step).
    failures: u32,
    /// Wait before the next attempt.
    wait: Option<Duration>,
    conn: Option<Conn>,
    /// Events ready for the application.
    queue: VecDeque<Event>,
    finished: bool,
}

impl std::fmt::Debug for Subscription {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Subscription")
            .field("stream", &self.cfg.stream)
            .field("position", &self.position)
            .field("epoch", &self.epoch)
            .field("endpoint", &self.cfg.endpoints[self.current])
            .finish_non_exhaustive()
    }
}

/// How a connection ended, and where to go next.
enum Next {
    /// The same endpoint, at once (the application lagged).
    SameNow,
    /// The next endpoint after this wait (a draining node's hint).
    OtherAfter(Duration),
    /// The next endpoint after the backoff (or `Retry-After`, capped).
    OtherBackoff(Option<Duration>),
}

impl Subscription {
    /// A builder; see [`SubscriptionBuilder::new`].
    pub fn builder(
        endpoints: impl IntoIterator<Item = impl Into<String>>,
        stream: impl Into<String>,
    ) -> SubscriptionBuilder {
        SubscriptionBuilder::new(endpoints, stream)
    }

    /// The last sequence handed out (or skipped past): persist it after
    /// handling a message to resume with [`Start::After`].
    pub fn position(&self) -> Option<u64> {
        self.position
    }

    /// The stream's epoch, when a node announced it.
    pub fn epoch(&self) -> Option<u64> {
        self.epoch
    }

    /// The next event; `Ok(None)` when the node ended the stream (`end`).
    /// Reconnects as needed (see the [module documentation](self)).
    pub async fn next(&mut self) -> Result<Option<Event>, Error> {
        loop {
            if let Some(event) = self.queue.pop_front() {
                return Ok(Some(event));
            }
            if self.finished {
                return Ok(None);
            }
            let Some(conn) = self.conn.as_mut() else {
                if let Some(wait) = self.wait.take() {
                    tokio::time::sleep(wait).await;
                }
                self.connect().await?;
                continue;
            };
            match conn.body.next().await {
                Some(Ok(chunk)) => {
                    for event in conn.parser.feed(&chunk) {
                        self.handle(event)?;
                        if self.conn.is_none() {
                            break;
                        }
                    }
                }
                Some(Err(e)) => self.lost(format!("the connection broke: {e}"), Next::OtherBackoff(None)),
                None => self.lost("the node closed the stream".to_owned(), Next::OtherBackoff(None)),
            }
        }
    }

    /// One connection attempt: on success `conn` is set and `Connected`
    /// queued; on a retryable failure `Disconnected` is queued and `wait` set.
    async fn connect(&mut self) -> Result<(), Error> {
        let endpoint = self.cfg.endpoints[self.current].clone();
        let url = format!("{endpoint}/v1/streams/{}/events", encode(&self.cfg.stream));
        let mut query: Vec<(&str, String)> = Vec::new();
        if let Some(subject) = &self.cfg.subject {
            query.push(("subject", subject.clone()));
        }
        if let Some(epoch) = self.epoch.filter(|e| *e != 0) {
            query.push(("epoch", epoch.to_string()));
        }
        let mut request = self.http.get(url).header("accept", "text/event-stream");
        match (self.position, self.first) {
            (Some(seq), _) => request = request.header("last-event-id", seq.to_string()),
            (None, Some(first)) => query.push(("from_seq", first.to_string())),
            (None, None) => {}
        }
        request = request.query(&query);
        if let Some(token) = &self.cfg.token {
            request = request.bearer_auth(token);
        }
        let response = match request.send().await {
            Ok(r) => r,
            Err(e) => return self.failed(endpoint, format!("cannot connect: {e}"), Next::OtherBackoff(None)),
        };
        let status = response.status();
        if !status.is_success() {
            let retry_after = retry_after(response.headers());
            let detail = problem_detail(response).await;
            let message = format!("{endpoint}: HTTP {}: {detail}", status.as_u16());
            let kind = match status {
                StatusCode::BAD_REQUEST => Some(ErrorKind::Invalid),
                StatusCode::UNAUTHORIZED => Some(ErrorKind::Unauthorized),
                StatusCode::FORBIDDEN => Some(ErrorKind::Forbidden),
                StatusCode::NOT_FOUND => Some(ErrorKind::NotFound),
                _ => None,
            };
            if let Some(kind) = kind {
                return Err(Error::new(kind, message));
            }
            return self.failed(endpoint, message, Next::OtherBackoff(retry_after));
        }
        let announced = response.headers().get(EPOCH_HEADER).and_then(|v| v.to_str().ok()?.parse::<u64>().ok());
        if self.epoch.is_none() {
            self.epoch = announced.filter(|e| *e != 0);
        }
        tracing::debug!(%endpoint, position = ?self.position, "subscription connected");
        self.queue.push_back(Event::Connected {
            endpoint: endpoint.clone(),
            epoch: announced,
            resume_after: self.position,
        });
        self.conn = Some(Conn {
            endpoint,
            body: response.bytes_stream().boxed(),
            parser: SseParser::default(),
            rewound: false,
        });
        Ok(())
    }

    /// An attempt failed: count it, report it, schedule the next one.
    fn failed(&mut self, endpoint: String, reason: String, next: Next) -> Result<(), Error> {
        self.failures = self.failures.saturating_add(1);
        if let Some(max) = self.cfg.max_failed_attempts
            && self.failures >= max
        {
            return Err(Error::new(ErrorKind::Unavailable, format!("gave up after {max} failed attempts: {reason}")));
        }
        self.schedule(endpoint, reason, next);
        Ok(())
    }

    /// An open connection ended.
    fn lost(&mut self, reason: String, next: Next) {
        if let Some(conn) = self.conn.take() {
            self.schedule(conn.endpoint, reason, next);
        }
    }

    fn schedule(&mut self, endpoint: String, reason: String, next: Next) {
        let backoff = self.cfg.backoff;
        let retry_in = match next {
            Next::SameNow => Duration::ZERO,
            Next::OtherAfter(hint) => hint.min(backoff.max),
            Next::OtherBackoff(retry_after) => {
                let step = backoff.delay(self.failures.saturating_sub(1));
                retry_after.map_or(step, |r| r.min(backoff.max).max(step))
            }
        };
        if !matches!(next, Next::SameNow) {
            self.current = (self.current + 1) % self.cfg.endpoints.len();
        }
        tracing::debug!(%endpoint, %reason, ?retry_in, "subscription disconnected");
        self.wait = Some(retry_in);
        self.queue.push_back(Event::Disconnected { endpoint, reason, retry_in });
    }

    /// Apply one SSE event of the open connection.
    fn handle(&mut self, ev: SseEvent) -> Result<(), Error> {
        // Anything the node sends proves the connection works.
        self.failures = 0;
        let id = ev.id.as_deref().and_then(|s| s.parse::<u64>().ok());
        match ev.event.as_str() {
            "message" if !ev.has_data => {
                // A heartbeat carrying the head: nothing up to it matches.
                if let Some(head) = id {
                    self.position = Some(self.position.map_or(head, |p| p.max(head)));
                }
            }
            "message" => {
                let seq = id.ok_or_else(|| Error::new(ErrorKind::Protocol, "a message without a numeric id"))?;
                if let Some(p) = self.position {
                    if seq <= p {
                        let conn = self.conn.as_mut().expect("events come from a connection");
                        if !std::mem::replace(&mut conn.rewound, true) {
                            self.queue.push_back(Event::Rewind { expected: p + 1, got: seq });
                        }
                        return Ok(());
                    }
                    if self.cfg.subject.is_none() && seq > p + 1 {
                        let (from, to, epoch) = (p + 1, seq - 1, self.epoch);
                        self.queue.push_back(Event::Gap { from, to, epoch, announced: false });
                    }
                }
                self.position = Some(seq);
                self.queue.push_back(Event::Message(Message { seq, envelope: ev.data }));
            }
            "gap" => {
                let v = json(&ev.data)?;
                let (from, to) = (v["from"].as_u64().unwrap_or(0), v["to"].as_u64().or(id).unwrap_or(0));
                let epoch = v["epoch"].as_u64().filter(|e| *e != 0);
                self.position = Some(self.position.map_or(to, |p| p.max(to)));
                self.queue.push_back(Event::Gap { from, to, epoch, announced: true });
            }
            "reset" => {
                let v = json(&ev.data)?;
                let epoch = v["epoch"].as_u64().unwrap_or(0);
                let last_seq = v["last_seq"].as_u64().or(id).unwrap_or(0);
                self.epoch = Some(epoch).filter(|e| *e != 0);
                self.position = Some(last_seq);
                self.queue.push_back(Event::Reset { epoch, last_seq });
            }
            "reconnect" => {
                let hint = Duration::from_millis(self.conn.as_ref().and_then(|c| c.parser.retry()).unwrap_or(0));
                self.lost("the node is draining".to_owned(), Next::OtherAfter(hint));
            }
            "lagged" => self.lost("the subscription lagged behind".to_owned(), Next::SameNow),
            "error" => {
                let v = json(&ev.data).unwrap_or_default();
                let slow =
                    v["reason"] == "slow_consumer" || v["type"].as_str().is_some_and(|t| t.ends_with("slow-consumer"));
                if slow {
                    self.lost("cut off as a slow consumer".to_owned(), Next::SameNow);
                } else if v["status"] == 404 {
                    let detail = v["detail"].as_str().unwrap_or("the stream is gone");
                    return Err(Error::new(ErrorKind::NotFound, detail.to_owned()));
                } else {
                    let detail = v["detail"].as_str().unwrap_or(&ev.data).to_owned();
                    self.lost(format!("the node reported an error: {detail}"), Next::OtherBackoff(None));
                }
            }
            "end" => {
                self.conn = None;
                self.finished = true;
            }
            _ => {}
        }
        Ok(())
    }
}

fn json(data: &str) -> Result<serde_json::Value, Error> {
    serde_json::from_str(data)
        .map_err(|e| Error::new(ErrorKind::Protocol, format!("event data is not JSON ({e}): {data}")))
}

fn retry_after(headers: &HeaderMap) -> Option<Duration> {
    let secs = headers.get(RETRY_AFTER)?.to_str().ok()?.trim().parse::<u64>().ok()?;
    Some(Duration::from_secs(secs))
}

/// The `detail` (or `title`) of a problem+json answer, else its text.
async fn problem_detail(response: reqwest::Response) -> String {
    let body = response.text().await.unwrap_or_default();
    match serde_json::from_str::<serde_json::Value>(&body) {
        Ok(p) => p["detail"].as_str().or(p["title"].as_str()).unwrap_or(&body).to_owned(),
        Err(_) => body.trim().to_owned(),
    }
}

/// Percent-encode one path segment.
fn encode(segment: &str) -> String {
    let mut out = String::with_capacity(segment.len());
    for b in segment.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.' | b'~') {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}
