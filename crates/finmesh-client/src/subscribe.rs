//! A resumable subscription to a stream over Server-Sent Events
//! (`GET /v1/streams/{stream}/events`) or WebSocket
//! (`GET /v1/streams/{stream}/ws`, [`Transport`]; docs/api.md):
//! [`Subscription`], built with [`SubscriptionBuilder`], read with
//! [`Subscription::next`]. Both transports give the same events and the
//! same guarantees ([`transport`] maps their wires).
//!
//! What it guarantees, and how:
//! - **resume without loss or duplicate.** The subscription's
//!   [`position`](Subscription::position) is the last sequence it handed to
//!   the application (or skipped past for a `gap`, a `reset` or a
//!   heartbeat that carries the head sequence). Every reconnection resumes
//!   after it (SSE `Last-Event-ID`, WebSocket `from_seq`), so the node
//!   sends from the next sequence on. A message counts as processed once
//!   [`next`](Subscription::next) handed it out: a reconnection can only
//!   happen inside `next`, when every received message was handed out and
//!   the one the application held was handled. Messages received and still
//!   queued inside the subscription do not move the position, so
//!   `position()` never runs ahead of the application. Across restarts of
//!   the application, persist `position()` after handling and start again
//!   with [`Start::After`];
//! - **continuity checks.** A `gap` event (history the node no longer has)
//!   is reported as [`Event::Gap`]; a `reset` (the stream's epoch changed:
//!   it was recreated or lost writes, so sequences past `last_seq` are void)
//!   as [`Event::Reset`]; a message at or below the position within one
//!   epoch (a node that rewound) as [`Event::Rewind`], and such messages
//!   are dropped, never handed out twice. Without a subject filter the
//!   sequences of a stream are consecutive, so a jump the node did not
//!   announce is reported as a `Gap` with `announced: false`. The stream's
//!   epoch (`Finmesh-Stream-Epoch`) is sent back as `epoch=` on every
//!   reconnection, so a changed stream is noticed even on another node.
//!   [`Subscription::stats`] counts every gap (and the sequences it
//!   covers), rewind, dropped duplicate and reset ([`Continuity`]);
//! - **reconnect and failover.** Endpoints are tried in turn. A broken
//!   connection, a refused one, an attempt without an answer within
//!   [`open_timeout`](SubscriptionBuilder::open_timeout), a connection
//!   silent for [`idle_timeout`](SubscriptionBuilder::idle_timeout) (no
//!   heartbeat), a 5xx or 429 answer or an `error` event
//!   (engine unavailable) moves to the next endpoint after a jittered
//!   exponential [`Backoff`] (a 429/503's `Retry-After` is honoured up to
//!   the backoff's cap); a `reconnect` event (the node drains) moves to the
//!   next endpoint after the node's hint (SSE `retry:`, WebSocket
//!   `retry_ms`); `lagged` or an `error`
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

use crate::backoff::Backoff;
use crate::continuity::{Check, Continuity, Stats};
use crate::sse::SseEvent;
use crate::transport::{self, Conn, Read, Refused, Request, Resume, Transport};
use crate::{Error, ErrorKind};

pub use crate::transport::EPOCH_HEADER;

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
    transport: Transport,
    open_timeout: Duration,
    idle_timeout: Duration,
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
            transport: Transport::Sse,
            open_timeout: Duration::from_secs(10),
            idle_timeout: Duration::from_secs(45),
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

    /// The wire: Server-Sent Events (the default) or WebSocket; the same
    /// events and guarantees either way.
    pub fn transport(mut self, transport: Transport) -> Self {
        self.transport = transport;
        self
    }

    /// Backoff between failed attempts.
    pub fn backoff(mut self, backoff: Backoff) -> Self {
        self.backoff = backoff;
        self
    }

    /// How long one attempt may wait for the node's answer (the HTTP
    /// status, the WebSocket handshake) before it counts as failed and the
    /// next endpoint is tried. Default 10 s.
    pub fn open_timeout(mut self, timeout: Duration) -> Self {
        self.open_timeout = timeout;
        self
    }

    /// How long an open connection may stay silent before it counts as
    /// lost (a node that vanished without closing it: a partition, a
    /// machine that died). Nodes send a heartbeat when idle
    /// (`subscriptions.heartbeat_ms`, 15 s), so the default, 45 s, is three
    /// missed heartbeats.
    pub fn idle_timeout(mut self, timeout: Duration) -> Self {
        self.idle_timeout = timeout;
        self
    }

    /// Give up after `n` consecutive failed attempts (default: never).
    pub fn max_failed_attempts(mut self, n: u32) -> Self {
        self.max_failed_attempts = Some(n);
        self
    }

    /// The HTTP client to use (its TLS roots, proxies, timeouts; it must
    /// not time out whole requests, since a subscription never ends). For
    /// [`Transport::WebSocket`] over TLS, build it with `http1_only()`: the
    /// upgrade needs HTTP/1.1, which ALPN would otherwise not pick.
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
            None => {
                let builder = reqwest::Client::builder().connect_timeout(Duration::from_secs(10));
                match self.transport {
                    Transport::WebSocket => builder.http1_only(),
                    Transport::Sse => builder,
                }
                .build()
                .map_err(|e| Error::new(ErrorKind::Invalid, format!("building the HTTP client: {e}")))?
            }
        };
        let (position, first) = match self.start {
            Start::New => (None, None),
            Start::From(seq) => (None, Some(seq)),
            Start::After(seq) => (Some(seq), None),
        };
        Ok(Subscription {
            epoch: self.epoch,
            continuity: Continuity::new(position, self.subject.is_none()),
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
struct Open {
    endpoint: String,
    conn: Conn,
    /// Whether this connection already reported a rewind.
    rewound: bool,
}

/// An event waiting for the application, and the position it moves the
/// subscription to when handed out (`event` `None`: a heartbeat's move only).
struct Pending {
    event: Option<Event>,
    position: Option<u64>,
}

/// See the [module documentation](self).
pub struct Subscription {
    cfg: SubscriptionBuilder,
    http: reqwest::Client,
    /// The last sequence handed to the application (or skipped past with a
    /// `Gap`, `Reset` or heartbeat it was handed): what [`position`](Self::position) tells.
    position: Option<u64>,
    /// What came from the wire: the received position (ahead of `position`
    /// by what is queued) and the counters. Reconnections resume after its
    /// position, which equals `position` then, since they wait for an empty queue.
    continuity: Continuity,
    /// `from_seq` of the first connection ([`Start::From`]), until a position is known.
    first: Option<u64>,
    epoch: Option<u64>,
    /// Index of the endpoint in use or tried next.
    current: usize,
    /// Consecutive failed attempts (the backoff's step).
    failures: u32,
    /// Wait before the next attempt.
    wait: Option<Duration>,
    conn: Option<Open>,
    /// Events ready for the application.
    queue: VecDeque<Pending>,
    finished: bool,
}

impl std::fmt::Debug for Subscription {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Subscription")
            .field("stream", &self.cfg.stream)
            .field("transport", &self.cfg.transport)
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

    /// The last sequence handed to the application by [`next`](Self::next)
    /// (or skipped past): persist it after handling a message to resume
    /// with [`Start::After`]. Messages received but not yet handed out do
    /// not count.
    pub fn position(&self) -> Option<u64> {
        self.position
    }

    /// The stream's epoch, when a node announced it.
    pub fn epoch(&self) -> Option<u64> {
        self.epoch
    }

    /// The counters: messages delivered, gaps, rewinds, duplicates
    /// dropped, resets, connections, failovers.
    pub fn stats(&self) -> Stats {
        self.continuity.stats()
    }

    /// The endpoint in use (or tried next).
    pub fn endpoint(&self) -> &str {
        &self.cfg.endpoints[self.current]
    }

    /// The next event; `Ok(None)` when the node ended the stream (`end`).
    /// Reconnects as needed (see the [module documentation](self)).
    pub async fn next(&mut self) -> Result<Option<Event>, Error> {
        loop {
            if let Some(pending) = self.queue.pop_front() {
                if let Some(p) = pending.position {
                    self.position = Some(p);
                }
                match pending.event {
                    Some(event) => {
                        if matches!(event, Event::Message(_)) {
                            self.continuity.stats_mut().delivered += 1;
                        }
                        return Ok(Some(event));
                    }
                    None => continue,
                }
            }
            if self.finished {
                return Ok(None);
            }
            let Some(open) = self.conn.as_mut() else {
                if let Some(wait) = self.wait.take() {
                    tokio::time::sleep(wait).await;
                }
                self.connect().await?;
                continue;
            };
            let idle = self.cfg.idle_timeout;
            let Ok(read) = tokio::time::timeout(idle, open.conn.read()).await else {
                let reason = format!("nothing from the node for {idle:?} (not even a heartbeat)");
                self.lost(reason, Next::OtherBackoff(None));
                continue;
            };
            match read? {
                Read::Events(events) => {
                    for event in events {
                        self.handle(event)?;
                        if self.conn.is_none() {
                            break;
                        }
                    }
                }
                Read::Closed(reason) => self.lost(reason, Next::OtherBackoff(None)),
            }
        }
    }

    fn push(&mut self, event: Option<Event>, position: Option<u64>) {
        self.queue.push_back(Pending { event, position });
    }

    /// One connection attempt: on success `conn` is set and `Connected`
    /// queued; on a retryable failure `Disconnected` is queued and `wait` set.
    async fn connect(&mut self) -> Result<(), Error> {
        debug_assert!(self.queue.is_empty() && self.position == self.continuity.position());
        let endpoint = self.cfg.endpoints[self.current].clone();
        let resume = match (self.continuity.position(), self.first) {
            (Some(seq), _) => Resume::After(seq),
            (None, Some(first)) => Resume::From(first),
            (None, None) => Resume::New,
        };
        let request = Request {
            endpoint: &endpoint,
            stream: &self.cfg.stream,
            subject: self.cfg.subject.as_deref(),
            epoch: self.epoch,
            resume,
            token: self.cfg.token.as_deref(),
        };
        let limit = self.cfg.open_timeout;
        let opened = tokio::time::timeout(limit, transport::open(&self.http, self.cfg.transport, &request)).await;
        let (conn, announced) = match opened {
            Ok(Ok(opened)) => opened,
            Ok(Err(Refused::Fatal(e))) => return Err(e),
            Ok(Err(Refused::Retry { reason, retry_after })) => {
                return self.failed(endpoint, reason, Next::OtherBackoff(retry_after));
            }
            Err(_) => {
                let reason = format!("no answer within {limit:?}");
                return self.failed(endpoint, reason, Next::OtherBackoff(None));
            }
        };
        if self.epoch.is_none() {
            self.epoch = announced.filter(|e| *e != 0);
        }
        tracing::debug!(%endpoint, position = ?self.position, transport = ?self.cfg.transport, "subscription connected");
        self.continuity.stats_mut().connections += 1;
        let connected = Event::Connected { endpoint: endpoint.clone(), epoch: announced, resume_after: self.position };
        self.push(Some(connected), None);
        self.conn = Some(Open { endpoint, conn, rewound: false });
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
        if let Some(open) = self.conn.take() {
            self.schedule(open.endpoint, reason, next);
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
        let stats = self.continuity.stats_mut();
        stats.disconnections += 1;
        if !matches!(next, Next::SameNow) && self.cfg.endpoints.len() > 1 {
            self.current = (self.current + 1) % self.cfg.endpoints.len();
            stats.failovers += 1;
        }
        tracing::debug!(%endpoint, %reason, ?retry_in, "subscription disconnected");
        self.wait = Some(retry_in);
        self.push(Some(Event::Disconnected { endpoint, reason, retry_in }), None);
    }

    /// Apply one event of the open connection.
    fn handle(&mut self, ev: SseEvent) -> Result<(), Error> {
        // Anything the node sends proves the connection works.
        self.failures = 0;
        let id = ev.id.as_deref().and_then(|s| s.parse::<u64>().ok());
        match ev.event.as_str() {
            "message" if !ev.has_data => {
                // A heartbeat carrying the head: nothing up to it matches.
                if let Some(head) = id {
                    self.continuity.skip_to(head);
                    let position = self.continuity.position();
                    self.push(None, position);
                }
            }
            "message" => {
                let seq = id.ok_or_else(|| Error::new(ErrorKind::Protocol, "a message without a numeric id"))?;
                match self.continuity.check(seq) {
                    Check::Next => {}
                    Check::Gap { from, to } => {
                        let gap = Event::Gap { from, to, epoch: self.epoch, announced: false };
                        self.push(Some(gap), Some(to));
                    }
                    Check::Duplicate | Check::Rewind { .. } => {
                        let open = self.conn.as_mut().expect("events come from a connection");
                        if !std::mem::replace(&mut open.rewound, true) {
                            self.continuity.note_rewind();
                            let expected = self.continuity.position().map_or(seq, |p| p + 1);
                            self.push(Some(Event::Rewind { expected, got: seq }), None);
                        }
                        return Ok(());
                    }
                }
                self.push(Some(Event::Message(Message { seq, envelope: ev.data })), Some(seq));
            }
            "gap" => {
                let v = json(&ev.data)?;
                let (from, to) = (v["from"].as_u64().unwrap_or(0), v["to"].as_u64().or(id).unwrap_or(0));
                let epoch = v["epoch"].as_u64().filter(|e| *e != 0);
                if self.continuity.announced_gap(from, to) {
                    let position = self.continuity.position();
                    self.push(Some(Event::Gap { from, to, epoch, announced: true }), position);
                }
            }
            "reset" => {
                let v = json(&ev.data)?;
                let epoch = v["epoch"].as_u64().unwrap_or(0);
                let last_seq = v["last_seq"].as_u64().or(id).unwrap_or(0);
                self.epoch = Some(epoch).filter(|e| *e != 0);
                self.continuity.reset(last_seq);
                self.push(Some(Event::Reset { epoch, last_seq }), Some(last_seq));
            }
            "reconnect" => {
                let retry_ms = json(&ev.data).ok().and_then(|v| v["retry_ms"].as_u64());
                let hint = retry_ms.or_else(|| self.conn.as_ref().and_then(|o| o.conn.retry_hint())).unwrap_or(0);
                self.lost("the node is draining".to_owned(), Next::OtherAfter(Duration::from_millis(hint)));
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
