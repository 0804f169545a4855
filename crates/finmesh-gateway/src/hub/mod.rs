//! The fan-out hub: one engine tail per stream shared by every SSE and
//! WebSocket subscriber of that stream (see `docs/fanout.md`).
//!
//! Shape: [`Hub`] (in the gateway state) keeps one `HubTail` per stream
//! and epoch. A hub tail is a task reading the engine's unfiltered tail from
//! the stream's head at the time the first subscriber came, plus a lock
//! around its `TailState`: the ring of recent frames, the live subscribers
//! and the [`SubjectTrie`] that files them by filter. Each message is
//! encoded once ([`Encoded`]: its SSE event and its WebSocket payload) and
//! the same `Arc` is pushed, without waiting, into the queue of every live
//! subscriber whose filter matches. A subscriber's side is a [`Feed`].
//!
//! Invariants:
//! - **one engine subscription per stream**: a hub tail opens exactly one
//!   engine tail (on NATS, one JetStream consumer) whatever the number of
//!   subscribers; history for starts older than the ring is read with
//!   `Engine::read`, at most [`SubscriptionConfig::history_reads`](crate::SubscriptionConfig)
//!   at once per gateway;
//! - **never wait on a subscriber**: the tail pushes with `try_push`; a full
//!   queue cuts that subscriber off (`slow_consumer`) and nobody else is
//!   slowed. The lock is never held across an await;
//! - **the ring is exact**: `covered_from..=head` — every frame the tail
//!   dispatched with a sequence at or after `covered_from` is in the ring,
//!   in order; the ring is bounded by
//!   [`ring_max_messages`](crate::SubscriptionConfig) and
//!   [`ring_max_bytes`](crate::SubscriptionConfig) and evicts from the front;
//! - **joining is atomic**: a subscriber whose next wanted sequence is at
//!   or after `covered_from` copies the ring's matching frames from there
//!   and registers for live frames under the same lock, so it sees every
//!   frame once (no gap, no duplicate); an older start reads history from
//!   the engine up to `covered_from - 1` and tries again;
//! - `head` is the last sequence dispatched: every matching frame up to it
//!   is in a live subscriber's queue (or was sent), which is what lets a
//!   heartbeat carry it as the subscriber's position;
//! - a tail with no subscriber attached (live or catching up) for
//!   [`SubscriptionConfig::tail_idle`](crate::SubscriptionConfig) stops, and
//!   its engine tail with it; the check and the stop happen under the lock
//!   an attaching subscriber takes, so none attaches to a stopped tail.

mod feed;
mod trie;

use std::collections::{HashMap, VecDeque};
use std::sync::Arc;
use std::time::Duration;

use finmesh_core::{BoxStream, Engine, Message, Seq, StreamName, SubjectPattern, TailEvent};
use futures::StreamExt;
use parking_lot::Mutex;
use tokio::sync::{Notify, Semaphore};

pub use feed::Feed;
pub use trie::SubjectTrie;

use crate::SubscriptionConfig;
use crate::problem::Problem;
use crate::subscribe::{Encoded, End, Frame, QueueWriter};

/// Most tail events dispatched under one lock.
const BATCH: usize = 256;

/// The fan-out hub. Cheap to clone.
#[derive(Clone)]
pub struct Hub {
    inner: Arc<HubInner>,
}

struct HubInner {
    engine: Arc<dyn Engine>,
    ring_max_messages: usize,
    ring_max_bytes: usize,
    tail_idle: Duration,
    /// Bytes of history one read may return (the subscriber queue's bound).
    page_bytes: usize,
    /// Running tails by stream.
    tails: Mutex<HashMap<StreamName, Arc<HubTail>>>,
    /// History reads in flight, across the gateway.
    history: Arc<Semaphore>,
}

impl Hub {
    /// A hub over `engine` with the ring and history settings of `cfg`.
    pub fn new(engine: Arc<dyn Engine>, cfg: &SubscriptionConfig) -> Self {
        Hub {
            inner: Arc::new(HubInner {
                engine,
                ring_max_messages: cfg.ring_max_messages.max(1),
                ring_max_bytes: cfg.ring_max_bytes.max(1),
                tail_idle: cfg.tail_idle,
                page_bytes: cfg.queue_max_bytes.max(1),
                tails: Mutex::new(HashMap::new()),
                history: Arc::new(Semaphore::new(cfg.history_reads.max(1))),
            }),
        }
    }

    /// Streams with a running hub tail.
    pub fn tails(&self) -> usize {
        self.inner.tails.lock().len()
    }

    /// The running tail of `stream` at `epoch`, started from `last_seq + 1`
    /// if there is none, with one more subscriber attached.
    fn attach(&self, stream: &StreamName, epoch: u64, last_seq: u64) -> Arc<HubTail> {
        let mut tails = self.inner.tails.lock();
        if let Some(tail) = tails.get(stream) {
            let mut st = tail.state.lock();
            if st.closed.is_none() && tail.epoch == epoch {
                st.interest += 1;
                return tail.clone();
            }
        }
        let tail = Arc::new(HubTail {
            stream: stream.clone(),
            epoch,
            state: Mutex::new(TailState {
                closed: None,
                interest: 1,
                head: last_seq,
                covered_from: last_seq + 1,
                ring: VecDeque::new(),
                ring_bytes: 0,
                live: HashMap::new(),
                trie: SubjectTrie::default(),
                next_id: 0,
            }),
            idle: Notify::new(),
        });
        tails.insert(stream.clone(), tail.clone());
        tokio::spawn(run(tail.clone(), self.inner.clone(), last_seq + 1));
        tail
    }
}

/// One stream's shared tail.
pub(crate) struct HubTail {
    stream: StreamName,
    epoch: u64,
    state: Mutex<TailState>,
    /// Woken when the last subscriber detaches (the tail then times its idleness).
    idle: Notify,
}

struct TailState {
    /// Set once the tail stopped; what a subscriber joining later gets.
    closed: Option<End>,
    /// Subscribers attached: live ones and those still reading history.
    interest: usize,
    /// Last sequence dispatched.
    head: u64,
    /// The ring holds every frame from here to `head`.
    covered_from: u64,
    ring: VecDeque<RingEntry>,
    ring_bytes: usize,
    live: HashMap<u64, Live>,
    trie: SubjectTrie,
    next_id: u64,
}

/// A frame in the ring.
struct RingEntry {
    /// First sequence it covers (a gap's `from`).
    first: u64,
    /// Last sequence it covers.
    last: u64,
    /// The message's subject; `None` for a gap (sent to everyone).
    subject: Option<Box<str>>,
    frame: Frame,
}

impl RingEntry {
    fn cost(&self) -> usize {
        self.frame.bytes() + self.subject.as_ref().map_or(0, |s| s.len()) + std::mem::size_of::<Self>()
    }

    /// The frame for a subscriber that wants sequences from `min` on, if any.
    fn frame_from(&self, min: u64) -> Option<Frame> {
        if self.last < min {
            return None;
        }
        match &self.frame {
            Frame::Gap { to, epoch, .. } if self.first < min => Some(Frame::Gap { from: min, to: *to, epoch: *epoch }),
            f => Some(f.clone()),
        }
    }
}

/// A live subscriber.
struct Live {
    writer: QueueWriter,
    /// Its filter as filed in the trie (`>` = everything).
    pattern: Box<str>,
    /// Frames before this sequence are not for it (it asked to start later).
    min_seq: u64,
}

/// What [`HubTail::join`] found.
enum Join {
    /// Registered for live frames as `id`; `backlog` holds the ring's
    /// frames from the wanted sequence on.
    Live { id: u64, backlog: VecDeque<Frame> },
    /// The wanted sequence is older than the ring: read history up to
    /// `covered_from - 1` and try again.
    Behind { writer: QueueWriter, covered_from: u64 },
    /// The tail stopped.
    Closed(End),
}

impl HubTail {
    /// Register a subscriber wanting sequences from `next` on (see the
    /// module doc: atomic with the ring copy).
    fn join(&self, next: u64, filter: Option<&SubjectPattern>, writer: QueueWriter) -> Join {
        let mut st = self.state.lock();
        if let Some(end) = &st.closed {
            return Join::Closed(end.clone());
        }
        if next < st.covered_from {
            return Join::Behind { writer, covered_from: st.covered_from };
        }
        let backlog = st
            .ring
            .iter()
            .filter(|e| match (&e.subject, filter) {
                (Some(subject), Some(f)) => f.matches_str(subject),
                _ => true,
            })
            .filter_map(|e| e.frame_from(next))
            .collect();
        st.next_id += 1;
        let id = st.next_id;
        let pattern: Box<str> = filter.map_or(">", |f| f.as_str()).into();
        st.trie.insert(&pattern, id);
        st.live.insert(id, Live { writer, pattern, min_seq: next });
        Join::Live { id, backlog }
    }

    /// A subscriber went away (`live`: its id, if it had joined).
    fn detach(&self, live: Option<u64>) {
        let mut st = self.state.lock();
        if let Some(id) = live
            && let Some(l) = st.live.remove(&id)
        {
            st.trie.remove(&l.pattern, id);
        }
        st.interest -= 1;
        if st.interest == 0 {
            self.idle.notify_one();
        }
    }

    /// The last sequence dispatched.
    fn head(&self) -> u64 {
        self.state.lock().head
    }

    /// Dispatch a batch of tail events (encoded outside the lock).
    fn dispatch(&self, entries: Vec<RingEntry>, ring_max_messages: usize, ring_max_bytes: usize) {
        let mut st = self.state.lock();
        let st = &mut *st;
        let mut matched = Vec::new();
        let mut cut = Vec::new();
        for entry in entries {
            matched.clear();
            match &entry.subject {
                Some(subject) => st.trie.matches(subject, &mut matched),
                None => matched.extend(st.live.keys().copied()),
            }
            for id in &matched {
                let Some(live) = st.live.get(id) else { continue };
                let Some(frame) = entry.frame_from(live.min_seq) else { continue };
                if live.writer.try_push(frame).is_err() {
                    cut.push(*id);
                }
            }
            for id in cut.drain(..) {
                let Some(live) = st.live.remove(&id) else { continue };
                st.trie.remove(&live.pattern, id);
                if !live.writer.is_closed() {
                    live.writer.slow_consumer();
                }
            }
            st.head = entry.last;
            st.ring_bytes += entry.cost();
            st.ring.push_back(entry);
        }
        while st.ring.len() > ring_max_messages || st.ring_bytes > ring_max_bytes {
            let Some(old) = st.ring.pop_front() else { break };
            st.ring_bytes -= old.cost();
            st.covered_from = old.last + 1;
        }
    }

    /// Stop: every live subscriber ends with `end` after what is queued;
    /// a subscriber joining later gets it too.
    fn close(&self, end: End) {
        let mut st = self.state.lock();
        for (_, live) in st.live.drain() {
            live.writer.finish(end.clone());
        }
        st.trie = SubjectTrie::default();
        st.ring.clear();
        st.closed = Some(end);
    }

    /// Stop if nobody is attached; whether it stopped.
    fn close_if_idle(&self) -> bool {
        let mut st = self.state.lock();
        if st.interest > 0 {
            return false;
        }
        st.ring.clear();
        st.closed = Some(End::Finished);
        true
    }
}

/// Encode one tail event for the ring (outside the lock).
fn ring_entry(event: TailEvent, epoch: u64) -> RingEntry {
    match event {
        TailEvent::Message(m) => message_entry(m),
        TailEvent::Gap { from, to } => {
            RingEntry { first: from.0, last: to.0, subject: None, frame: Frame::Gap { from: from.0, to: to.0, epoch } }
        }
    }
}

fn message_entry(m: Message) -> RingEntry {
    let frame = Frame::Shared(Arc::new(Encoded::message(&m)));
    RingEntry { first: m.seq.0, last: m.seq.0, subject: Some(m.subject.as_str().into()), frame }
}

/// The tail task: open the engine tail, dispatch until it fails, ends or
/// idles, then stop and leave the hub.
async fn run(tail: Arc<HubTail>, hub: Arc<HubInner>, from: u64) {
    let end = match hub.engine.tail(&tail.stream, Seq(from), None).await {
        Ok(events) => pump(&tail, &hub, events).await,
        Err(e) => Some(End::Failed(Box::new(Problem::from_error(&e)))),
    };
    if let Some(end) = end {
        tracing::debug!(stream = %tail.stream, ?end, "hub tail stopped");
        tail.close(end);
    }
    let mut tails = hub.tails.lock();
    if tails.get(&tail.stream).is_some_and(|t| Arc::ptr_eq(t, &tail)) {
        tails.remove(&tail.stream);
    }
}

/// Dispatch `events`; `None` when the tail stopped for idleness (already
/// closed), else the end to give its subscribers.
async fn pump(tail: &HubTail, hub: &HubInner, events: BoxStream<TailEvent>) -> Option<End> {
    let mut batches = events.ready_chunks(BATCH);
    loop {
        let idle = tail.state.lock().interest == 0;
        let batch = if idle {
            tokio::select! {
                batch = batches.next() => batch,
                () = tokio::time::sleep(hub.tail_idle) => {
                    if tail.close_if_idle() {
                        return None;
                    }
                    continue;
                }
            }
        } else {
            tokio::select! {
                batch = batches.next() => batch,
                () = tail.idle.notified() => continue,
            }
        };
        let Some(batch) = batch else { return Some(End::Finished) };
        let mut entries = Vec::with_capacity(batch.len());
        let mut failure = None;
        for event in batch {
            match event {
                Ok(ev) => entries.push(ring_entry(ev, tail.epoch)),
                Err(e) => {
                    failure = Some(e);
                    break;
                }
            }
        }
        tail.dispatch(entries, hub.ring_max_messages, hub.ring_max_bytes);
        if let Some(e) = failure {
            return Some(End::Failed(Box::new(Problem::from_error(&e))));
        }
    }
}
