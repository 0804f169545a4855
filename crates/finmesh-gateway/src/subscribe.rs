//! One subscriber's bounded queue, and the registry of connected
//! subscribers behind `GET /v1/subscribers`.
//!
//! Shape: [`Subscription::admit`] counts a new subscriber against the
//! caps, then [`Subscription::open`] registers it and returns its bounded
//! queue's two ends: the [`Subscription`] the connection (SSE or WebSocket)
//! reads with [`Subscription::next`], and a [`QueueWriter`] a source fills.
//! Stream subscribers are fed by the fan-out hub ([`crate::hub`]), which
//! `try_push`es the same shared frames into many writers and never waits;
//! a KV watch gets its own source and feeder task ([`Subscription::spawn`]).
//!
//! Invariants:
//! - at most [`SubscriptionConfig::max_per_principal`](crate::SubscriptionConfig)
//!   subscriptions per principal (per client address when authentication
//!   is off; 429 `too-many-subscriptions` above) and
//!   [`SubscriptionConfig::max_total`](crate::SubscriptionConfig) on the node
//!   (503) are admitted; an [`Admitted`] holds its place until its
//!   subscription ends;
//! - the queue (`queue.rs`: nothing allocated until its first frame,
//!   so an idle subscriber costs no slots) is bounded in frames
//!   ([`SubscriptionConfig::queue_capacity`](crate::SubscriptionConfig))
//!   and in bytes ([`SubscriptionConfig::queue_max_bytes`](crate::SubscriptionConfig);
//!   a larger frame waits for the queue to empty and then goes alone).
//!   The hub finds a full queue and cuts the subscriber off at once
//!   ([`QueueWriter::slow_consumer`]); a KV watch's own feeder waits for
//!   room at most [`SubscriptionConfig::stall_timeout`](crate::SubscriptionConfig)
//!   and then marks it `lagged`. Either way the connection still delivers
//!   what is queued, then ends with the last sequence it really sent, from
//!   which the client resumes;
//! - drain wins over queued frames: once draining starts, the next item a
//!   connection reads is the `reconnect` end;
//! - a subscription is in the registry exactly while its value lives.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use axum::http::StatusCode;
use bytes::Bytes;
use finmesh_core::{BoxStream, Timestamp};
use futures::StreamExt;
use parking_lot::Mutex;
use serde::Serialize;
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;

use crate::AppState;
use crate::caller::Peer;
use crate::problem::{ApiError, Problem, RETRY_AFTER_SECS};
use crate::queue;

/// One encoded item for a subscriber.
#[derive(Debug, Clone)]
pub enum Frame {
    /// A message (or KV entry): its sequence (revision) and JSON envelope.
    Message {
        /// Sequence or revision: the SSE `id:`.
        id: u64,
        /// The envelope (see [`crate::envelope`]).
        data: Bytes,
    },
    /// A stream message encoded once by the fan-out hub and shared by
    /// every subscriber it goes to (see [`Encoded`]).
    Shared(Arc<Encoded>),
    /// Sequences `from..=to` are gone and will not be delivered.
    Gap {
        /// First missing sequence.
        from: u64,
        /// Last missing sequence.
        to: u64,
        /// The stream's epoch (`StreamInfo::epoch`; 0 = unknown).
        epoch: u64,
    },
    /// The client's position belongs to another epoch of the stream (it was
    /// recreated, or recovered with loss): what the client has past
    /// `last_seq` is void, and delivery goes on from `last_seq + 1`.
    Reset {
        /// The stream's epoch now.
        epoch: u64,
        /// The stream's last sequence when the subscription started.
        last_seq: u64,
    },
}

/// A stream message encoded once into its wire frames: the complete SSE
/// event (`id:` + `data:` + blank line) and the WebSocket text payload (the
/// envelope, a slice of the same buffer).
#[derive(Debug)]
pub struct Encoded {
    /// The message's sequence.
    pub seq: u64,
    /// `id: <seq>\ndata: <envelope>\n\n`.
    pub sse: Bytes,
    /// The envelope alone (UTF-8 JSON, one line), checked as UTF-8 once.
    pub ws: axum::extract::ws::Utf8Bytes,
    /// When the stream stored the message (ns since the epoch; 0 = unknown).
    pub time: u64,
}

impl Encoded {
    /// Encode `msg` (see [`crate::envelope`]).
    pub fn message(msg: &finmesh_core::Message) -> Self {
        let mut encoded = Self::envelope(msg.seq.0, &crate::envelope::message(msg));
        encoded.time = msg.time.as_nanos();
        encoded
    }

    /// Frame an envelope (one line of JSON) with sequence `seq`.
    pub fn envelope(seq: u64, envelope: &[u8]) -> Self {
        debug_assert!(!envelope.contains(&b'\n'), "an envelope is one line");
        let head = format!("id: {seq}\ndata: ");
        let mut buf = bytes::BytesMut::with_capacity(head.len() + envelope.len() + 2);
        buf.extend_from_slice(head.as_bytes());
        buf.extend_from_slice(envelope);
        buf.extend_from_slice(b"\n\n");
        let sse = buf.freeze();
        // Envelopes are serde_json output and validated JSON: UTF-8.
        let ws = axum::extract::ws::Utf8Bytes::try_from(sse.slice(head.len()..sse.len() - 2))
            .unwrap_or_else(|_| axum::extract::ws::Utf8Bytes::from_static("{}"));
        Encoded { seq, sse, ws, time: 0 }
    }
}

/// Why a subscription ended.
#[derive(Debug, Clone)]
pub enum End {
    /// The subscriber fell `queue_capacity` frames behind (KV watch).
    Lagged {
        /// Last sequence delivered to it.
        last_sent: u64,
    },
    /// The fan-out hub found the subscriber's queue full and cut it off
    /// (SSE/WebSocket `error` event with reason `slow_consumer`).
    SlowConsumer {
        /// Last sequence delivered to it.
        last_sent: u64,
    },
    /// The gateway is draining; reconnect (elsewhere) and resume.
    Reconnect {
        /// Last sequence delivered to it.
        last_sent: u64,
    },
    /// The source failed (stream deleted, engine unavailable).
    Failed(Box<Problem>),
    /// The source ended.
    Finished,
}

impl Frame {
    /// Bytes this frame takes in a queue.
    pub(crate) fn bytes(&self) -> usize {
        match self {
            Frame::Message { data, .. } => data.len(),
            Frame::Shared(e) => e.sse.len(),
            Frame::Gap { .. } | Frame::Reset { .. } => 0,
        }
    }
}

/// What [`Subscription::next`] yields.
#[derive(Debug, Clone)]
pub enum Item {
    /// Send this frame.
    Frame(Frame),
    /// Send the closing event; nothing follows.
    End(End),
}

/// Who subscribes to what (for the registry and logs).
#[derive(Debug, Clone, Serialize)]
pub struct SubscriberSpec {
    /// `sse`, `ws` or `watch`.
    pub kind: &'static str,
    /// The principal's subject.
    pub identity: String,
    /// Stream (or bucket, for `watch`) name.
    pub resource: String,
    /// Subject filter (key prefix for `watch`), if any.
    pub filter: Option<String>,
}

struct Entry {
    spec: SubscriberSpec,
    connected: Timestamp,
    last_sent: AtomicU64,
    sent: AtomicU64,
    /// Frames in the queue: +1 by the feeder per frame queued, -1 per frame read.
    queued: AtomicU64,
    /// Bytes of the frames in the queue, counted the same way.
    queued_bytes: AtomicU64,
    /// Room left in the queue, in bytes (permits), given back per frame read.
    room: Semaphore,
    /// Most bytes one frame takes of `room` (the queue's byte bound).
    max_bytes: usize,
    /// `finmesh_subscriber_queued_bytes`, kept with `queued_bytes`.
    gauge: metrics::Gauge,
    /// Set by the feeder when it stops on its own (lag, failure, end).
    end: Mutex<Option<End>>,
    /// Set when the feeder cut the subscriber off for lagging.
    lagged: AtomicBool,
}

/// A snapshot of one subscriber, as `GET /v1/subscribers` reports it.
#[derive(Debug, Clone, Serialize, utoipa::ToSchema)]
pub struct SubscriberInfo {
    /// Registry id.
    pub id: u64,
    /// `sse`, `ws` or `watch`.
    pub kind: &'static str,
    /// The principal's subject.
    pub identity: String,
    /// Stream or bucket.
    pub resource: String,
    /// Subject filter or key prefix.
    pub filter: Option<String>,
    /// RFC 3339 time of connection.
    pub connected: String,
    /// Last sequence (revision) sent.
    pub last_seq: u64,
    /// Frames sent so far.
    pub sent: u64,
    /// Frames waiting in its queue.
    pub queued: u64,
    /// Bytes of the frames waiting in its queue.
    pub queued_bytes: u64,
    /// Cut off for falling behind (it still receives what is queued).
    pub lagged: bool,
    /// Sequences stored but not yet sent (filled in by the handler).
    pub lag: Option<u64>,
    /// The identity's rate limit (filled in by the handler).
    pub rate_limit: Option<crate::schema::RateInfo>,
}

/// The registry of connected subscribers. Cheap to clone.
#[derive(Clone, Default)]
pub struct Subscribers {
    next_id: Arc<AtomicU64>,
    map: Arc<Mutex<HashMap<u64, Arc<Entry>>>>,
    admitted: Arc<Mutex<Places>>,
}

/// Admitted subscriptions, for the caps.
#[derive(Default)]
struct Places {
    total: usize,
    by_principal: HashMap<String, usize>,
}

/// A subscriber counted against the caps, not yet opened: what
/// [`Subscription::open`] and [`Subscription::spawn`] take. Dropping it
/// (or the subscription opened from it) gives its place back.
pub struct Admitted {
    spec: SubscriberSpec,
    /// Whose place this is: the principal, or the client address without
    /// token identities.
    holder: String,
    registry: Subscribers,
}

impl Drop for Admitted {
    fn drop(&mut self) {
        let mut places = self.registry.admitted.lock();
        places.total -= 1;
        if let Some(n) = places.by_principal.get_mut(&self.holder) {
            *n -= 1;
            if *n == 0 {
                places.by_principal.remove(&self.holder);
            }
        }
    }
}

fn too_many(status: StatusCode, detail: String) -> ApiError {
    let mut p = Problem::new(status, "too-many-subscriptions", "Too many subscriptions", detail);
    p.retry_after = Some(RETRY_AFTER_SECS);
    p.into()
}

impl Subscribers {
    /// Number of connected subscribers.
    pub fn len(&self) -> usize {
        self.map.lock().len()
    }

    /// Whether nobody is connected.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Snapshots of every subscriber, by id.
    pub fn snapshot(&self) -> Vec<SubscriberInfo> {
        let entries: Vec<(u64, Arc<Entry>)> = self.map.lock().iter().map(|(k, v)| (*k, v.clone())).collect();
        let mut out: Vec<SubscriberInfo> = entries
            .into_iter()
            .map(|(id, e)| SubscriberInfo {
                id,
                kind: e.spec.kind,
                identity: e.spec.identity.clone(),
                resource: e.spec.resource.clone(),
                filter: e.spec.filter.clone(),
                connected: crate::envelope::rfc3339(e.connected),
                last_seq: e.last_sent.load(Ordering::Relaxed),
                sent: e.sent.load(Ordering::Relaxed),
                queued: e.queued.load(Ordering::Relaxed),
                queued_bytes: e.queued_bytes.load(Ordering::Relaxed),
                lagged: e.lagged.load(Ordering::Relaxed),
                lag: None,
                rate_limit: None,
            })
            .collect();
        out.sort_by_key(|s| s.id);
        out
    }
}

/// One subscriber's end of its queue. Dropping it unregisters it and stops its feeder.
pub struct Subscription {
    id: u64,
    _admitted: Admitted,
    rx: queue::Receiver<Frame>,
    entry: Arc<Entry>,
    registry: Subscribers,
    drain: CancellationToken,
    /// The per-subscriber feeder, when [`Subscription::spawn`] started one.
    feeder: Option<tokio::task::JoinHandle<()>>,
    done: bool,
}

/// The writing end of one subscriber's queue: what a source holds (the
/// per-subscriber feeder today, a shared fan-out hub later). Dropping it
/// without [`finish`](QueueWriter::finish) ends the subscription with `end` (`Finished`).
pub struct QueueWriter {
    tx: queue::Sender<Frame>,
    entry: Arc<Entry>,
}

impl QueueWriter {
    /// Queue `frame` if there is room now; gives it back when the queue is
    /// full or the subscriber is gone. A hub calls this and, on a full
    /// queue, [`lagged`](QueueWriter::lagged).
    pub fn try_push(&self, frame: Frame) -> Result<(), Frame> {
        let Ok(room) = self.entry.room.try_acquire_many(self.entry.cost(&frame)) else { return Err(frame) };
        self.tx.try_send_counted(frame, |f| self.entry.queued_one(f))?;
        room.forget();
        Ok(())
    }

    /// Queue `frame`, waiting up to `stall` for room (in frames and in
    /// bytes). `Ok(false)`: the subscriber is gone; `Err(())`: the queue
    /// stayed full.
    pub async fn push(&self, frame: Frame, stall: Duration) -> Result<bool, ()> {
        let room = async {
            let room = self.entry.room.acquire_many(self.entry.cost(&frame)).await.ok()?;
            // One writer per queue: the room it waited for stays until it sends.
            self.tx.room().await.then_some(room)
        };
        match tokio::time::timeout(stall, room).await {
            Ok(Some(room)) => {
                if self.tx.try_send_counted(frame, |f| self.entry.queued_one(f)).is_err() {
                    return Ok(false); // closed meanwhile
                }
                room.forget();
                Ok(true)
            }
            Ok(None) => Ok(false),
            Err(_elapsed) => Err(()),
        }
    }

    /// Whether the subscriber went away.
    pub fn is_closed(&self) -> bool {
        self.tx.is_closed()
    }

    /// Resolves when the subscriber goes away.
    pub async fn closed(&self) {
        self.tx.closed().await
    }

    /// Cut the subscriber off because its queue is full (the hub never
    /// waits): it gets what is queued, then `error` with reason
    /// `slow_consumer` and the last sequence it received.
    pub fn slow_consumer(self) {
        self.entry.lagged.store(true, Ordering::Relaxed);
        crate::metrics::lagged();
        tracing::info!(identity = %self.entry.spec.identity, resource = %self.entry.spec.resource, "slow consumer; cut off");
        self.finish(End::SlowConsumer { last_sent: 0 });
    }

    /// Cut the subscriber off for falling behind: it gets what is queued,
    /// then `lagged` with the last sequence it received.
    pub fn lagged(self) {
        self.entry.lagged.store(true, Ordering::Relaxed);
        crate::metrics::lagged();
        tracing::info!(identity = %self.entry.spec.identity, resource = %self.entry.spec.resource, "subscriber lagged; cut off");
        self.finish(End::Lagged { last_sent: 0 });
    }

    /// End the subscription with `end` after what is queued.
    pub fn finish(self, end: End) {
        *self.entry.end.lock() = Some(end);
    }
}

impl Entry {
    /// Permits of `room` that `frame` takes.
    fn cost(&self, frame: &Frame) -> u32 {
        frame.bytes().min(self.max_bytes) as u32
    }

    fn queued_one(&self, frame: &Frame) {
        let bytes = frame.bytes() as u64;
        self.queued.fetch_add(1, Ordering::Relaxed);
        self.queued_bytes.fetch_add(bytes, Ordering::Relaxed);
        self.gauge.increment(bytes as f64);
    }

    fn read_one(&self, frame: &Frame) {
        let bytes = frame.bytes() as u64;
        self.room.add_permits(self.cost(frame) as usize);
        self.queued.fetch_sub(1, Ordering::Relaxed);
        self.queued_bytes.fetch_sub(bytes, Ordering::Relaxed);
        self.gauge.decrement(bytes as f64);
    }
}

impl Subscription {
    /// Count a new subscriber against the caps: 429 when its principal
    /// has `max_per_principal` open, 503 when the node has `max_total`.
    /// Call before opening its source.
    pub fn admit(state: &AppState, spec: SubscriberSpec) -> Result<Admitted, ApiError> {
        Self::admit_from(state, spec, &Peer(None))
    }

    /// [`admit`](Self::admit), counting per client address instead of per
    /// principal when authentication is off (every request then has the
    /// same principal), as the rate limit does.
    pub fn admit_from(state: &AppState, spec: SubscriberSpec, peer: &Peer) -> Result<Admitted, ApiError> {
        let holder = match peer.0 {
            Some(addr) if state.inner.auth.is_disabled() => format!("client address {}", addr.ip().to_canonical()),
            _ => format!("`{}`", spec.identity),
        };
        let cfg = &state.config().subscriptions;
        let registry = state.inner.subscribers.clone();
        {
            let mut places = registry.admitted.lock();
            if places.total >= cfg.max_total {
                crate::metrics::subscription_refused("node");
                let detail = format!(
                    "this node has {} subscriptions open, the most `subscriptions.max_total` allows; \
                     retry shortly or on another node",
                    places.total
                );
                return Err(too_many(StatusCode::SERVICE_UNAVAILABLE, detail));
            }
            let mine = places.by_principal.get(&holder).copied().unwrap_or(0);
            if mine >= cfg.max_per_principal {
                crate::metrics::subscription_refused("principal");
                let detail = format!(
                    "{holder} has {mine} subscriptions open, the most `subscriptions.max_per_principal` allows; \
                     close one or raise the setting"
                );
                return Err(too_many(StatusCode::TOO_MANY_REQUESTS, detail));
            }
            places.total += 1;
            *places.by_principal.entry(holder.clone()).or_insert(0) += 1;
        }
        Ok(Admitted { spec, holder, registry })
    }

    /// Register an admitted subscriber with an empty bounded queue and
    /// return it with the queue's writing end. `resume_after` is the
    /// sequence the client already has (reported as `last_seq` until
    /// something newer is sent).
    pub fn open(state: &AppState, admitted: Admitted, resume_after: u64) -> (Self, QueueWriter) {
        let cfg = &state.config().subscriptions;
        let (tx, rx) = queue::bounded(cfg.queue_capacity.max(1));
        let max_bytes = cfg.queue_max_bytes.clamp(1, u32::MAX as usize);
        let entry = Arc::new(Entry {
            spec: admitted.spec.clone(),
            connected: Timestamp::now(),
            last_sent: AtomicU64::new(resume_after),
            sent: AtomicU64::new(0),
            queued: AtomicU64::new(0),
            queued_bytes: AtomicU64::new(0),
            room: Semaphore::new(max_bytes),
            max_bytes,
            gauge: crate::metrics::queued_bytes(),
            end: Mutex::new(None),
            lagged: AtomicBool::new(false),
        });
        let registry = state.inner.subscribers.clone();
        let id = registry.next_id.fetch_add(1, Ordering::Relaxed) + 1;
        registry.map.lock().insert(id, entry.clone());
        crate::metrics::subscription(entry.spec.kind, 1.0);
        let sub = Subscription {
            id,
            _admitted: admitted,
            rx,
            entry: entry.clone(),
            registry,
            drain: state.drain_token(),
            feeder: None,
            done: false,
        };
        (sub, QueueWriter { tx, entry })
    }

    /// [`open`](Subscription::open) a subscriber and start a feeder task that
    /// copies its own `source` into the queue (see the module doc for pacing).
    pub fn spawn(state: &AppState, admitted: Admitted, resume_after: u64, source: BoxStream<Frame>) -> Self {
        let (mut sub, writer) = Self::open(state, admitted, resume_after);
        let stall = state.config().subscriptions.stall_timeout;
        sub.feeder = Some(tokio::spawn(feed(source, writer, stall)));
        sub
    }

    /// The next frame, or the end (once), then `None`.
    pub async fn next(&mut self) -> Option<Item> {
        if self.done {
            return None;
        }
        let frame = tokio::select! {
            biased;
            () = self.drain.cancelled() => return Some(self.reconnect()),
            frame = self.rx.recv() => frame,
        };
        Some(self.received(frame))
    }

    /// [`next`](Self::next) if an item is ready now, without waiting
    /// (the drain is left to `next`).
    pub fn try_next(&mut self) -> Option<Item> {
        if self.done {
            return None;
        }
        match self.rx.try_recv() {
            Ok(frame) => Some(self.received(Some(frame))),
            Err(queue::TryRecvError::Empty) => None,
            Err(queue::TryRecvError::Disconnected) => Some(self.received(None)),
        }
    }

    fn received(&mut self, frame: Option<Frame>) -> Item {
        match frame {
            Some(frame) => {
                self.sent(&frame);
                self.entry.read_one(&frame);
                Item::Frame(frame)
            }
            None => {
                self.done = true;
                let last_sent = self.last_sent();
                let end = match self.entry.end.lock().take() {
                    Some(End::Lagged { .. }) => End::Lagged { last_sent },
                    Some(End::SlowConsumer { .. }) => End::SlowConsumer { last_sent },
                    Some(other) => other,
                    None => End::Finished,
                };
                Item::End(end)
            }
        }
    }

    /// Count `frame` as sent (for a frame that did not come through the
    /// queue, such as one replayed from the hub's ring).
    pub fn sent(&self, frame: &Frame) {
        let seq = match frame {
            Frame::Message { id, .. } => *id,
            Frame::Shared(e) => e.seq,
            Frame::Gap { to, .. } => *to,
            Frame::Reset { last_seq, .. } => *last_seq,
        };
        self.entry.last_sent.store(seq, Ordering::Relaxed);
        self.entry.sent.fetch_add(1, Ordering::Relaxed);
    }

    /// The last sequence sent (or the resume point, before anything was).
    pub fn last_sent(&self) -> u64 {
        self.entry.last_sent.load(Ordering::Relaxed)
    }

    /// Move the position forward to `seq` without a message (a heartbeat
    /// carrying the head of the stream to a filtered subscriber).
    pub fn advance(&self, seq: u64) {
        self.entry.last_sent.fetch_max(seq, Ordering::Relaxed);
    }

    /// Whether nothing waits in the queue.
    pub fn queue_is_empty(&self) -> bool {
        self.rx.is_empty()
    }

    /// End now with `end` (a source that is not this subscription's queue failed).
    pub fn end(&mut self, end: End) -> Item {
        self.done = true;
        Item::End(end)
    }

    /// Whether the gateway is draining (the next item is `reconnect`).
    pub fn is_draining(&self) -> bool {
        self.drain.is_cancelled()
    }

    /// End now with `reconnect` (the drain), for a caller that found
    /// [`is_draining`](Self::is_draining) outside [`next`](Self::next).
    pub fn reconnect(&mut self) -> Item {
        self.done = true;
        Item::End(End::Reconnect { last_sent: self.last_sent() })
    }

    /// A token cancelled when the gateway starts draining.
    pub fn drain_token(&self) -> &CancellationToken {
        &self.drain
    }
}

impl Drop for Subscription {
    fn drop(&mut self) {
        if let Some(feeder) = &self.feeder {
            feeder.abort();
        }
        self.registry.map.lock().remove(&self.id);
        crate::metrics::subscription(self.entry.spec.kind, -1.0);
        // Frames still queued go with the queue (none can be added once closed).
        self.rx.close();
        while let Ok(frame) = self.rx.try_recv() {
            self.entry.read_one(&frame);
        }
    }
}

/// Copy `source` into the queue until the subscriber goes, lags, or the source ends.
async fn feed(mut source: BoxStream<Frame>, writer: QueueWriter, stall: Duration) {
    loop {
        let item = tokio::select! {
            () = writer.closed() => return,
            item = source.next() => item,
        };
        match item {
            None => return writer.finish(End::Finished),
            Some(Err(e)) => {
                tracing::debug!(error = %e, resource = %writer.entry.spec.resource, "subscription source failed");
                return writer.finish(End::Failed(Box::new(Problem::from_error(&e))));
            }
            Some(Ok(frame)) => match writer.push(frame, stall).await {
                Ok(true) => {}
                Ok(false) => return,
                Err(()) => return writer.lagged(),
            },
        }
    }
}
