//! One subscriber's side of the hub: [`Feed`] yields its frames in order —
//! a `reset` if its epoch is stale, then history read from the engine while
//! its start is older than the ring, then the ring's frames from its start,
//! then live frames from its queue — and the heartbeat position.
//!
//! Invariants:
//! - frames come out in sequence order with no gap and no duplicate: the
//!   history phase reads `next..covered_from` and advances `next` past what
//!   it read; the join (under the tail's lock) copies the ring from `next`
//!   and registers for live frames after it (see [`super`]);
//! - at most one page of history (bounded by the queue's byte limit) is
//!   held per subscriber, and the next page is read only when it is sent,
//!   so history goes at the reader's pace and never overflows the queue;
//! - [`Feed::next`] is cancel-safe: a history read in flight is kept and
//!   resumed by the next call, and so is a frame waiting for its pace, so
//!   callers may `select!` on it;
//! - a feed with a [`Session`] (see [`Feed::with_registry`]) reports every
//!   item it yields to it, and a feed with a [`Pace`] yields a frame only
//!   when the pace allows, one at a time (no batching: a paced subscriber
//!   is slow by choice), and gives no heartbeat position while a frame is
//!   held.

use std::collections::VecDeque;
use std::sync::Arc;

use finmesh_core::{Error, Message, ReadRequest, ReadStart, Result, Seq, StreamName, SubjectPattern};
use futures::future::BoxFuture;

use super::{Hub, HubInner, HubTail, Join};
use crate::AppState;
use crate::limits::Paging;
use crate::problem::Problem;
use crate::registry::{Admission, Pace, Registry, Session};
use crate::subscribe::{Admitted, Encoded, End, Frame, Item, QueueWriter, Subscription};

/// Most messages one history read asks for.
const PAGE: usize = 1_000;

type HistoryRead = BoxFuture<'static, Result<Vec<Message>>>;

/// One subscriber of a stream, fed by the hub.
pub struct Feed {
    sub: Subscription,
    tail: Arc<HubTail>,
    hub: Arc<HubInner>,
    stream: StreamName,
    filter: Option<SubjectPattern>,
    /// The stream's epoch when the feed opened (its gaps carry it).
    epoch: u64,
    /// Messages per history read, within the hub's page budget for the
    /// stream as it was when the feed opened (not the whole `StreamInfo`:
    /// an idle subscriber keeps only what it uses).
    page_limit: usize,
    phase: Phase,
    /// Frames to send before the queue: a reset, a history page, the ring's part.
    backlog: VecDeque<Frame>,
    /// Next sequence wanted (history phase).
    next: u64,
    /// Where its status and metrics go (registry), if set.
    session: Option<Session>,
    /// Its registered rate limit, if any.
    pace: Option<Pace>,
    /// A frame waiting for its pace, and whether its bytes are paid.
    held: Option<(Item, bool)>,
}

enum Phase {
    /// Reading history; the queue's writer waits for the join.
    /// `read`: the history read in flight and the ring start it reads up to.
    Catching { writer: Option<QueueWriter>, read: Option<(u64, HistoryRead)> },
    /// Joined as this live id.
    Live(u64),
    /// The end was given.
    Ended,
}

impl Feed {
    /// Open a subscription to `stream` for an admitted subscriber: `first` is
    /// the first sequence wanted (`Some(0)`: the first stored; `None`: only
    /// new ones), `client_epoch` the epoch the client's position belongs to.
    /// Returns the feed and the stream's epoch.
    pub async fn open(
        state: &AppState,
        admitted: Admitted,
        stream: &StreamName,
        filter: Option<SubjectPattern>,
        first: Option<u64>,
        client_epoch: Option<u64>,
    ) -> Result<(Feed, u64)> {
        let info = state.engine().stream_info(stream).await?;
        let (epoch, last_seq) = (info.epoch, info.state.last_seq.0);
        let reset = client_epoch.is_some_and(|e| epoch != 0 && e != epoch);
        let next = match first {
            Some(0) if !reset => info.state.first_seq.0.max(1),
            Some(s) if !reset => s,
            _ => last_seq + 1,
        };
        let mut backlog = VecDeque::new();
        if reset {
            backlog.push_back(Frame::Reset { epoch, last_seq });
        }
        let hub: &Hub = state.hub();
        let tail = hub.attach(stream, epoch, last_seq);
        let (sub, writer) = Subscription::open(state, admitted, next - 1);
        let feed = Feed {
            sub,
            tail,
            hub: hub.inner.clone(),
            stream: stream.clone(),
            filter,
            epoch,
            page_limit: Paging::new(hub.inner.page_bytes, &info).next(PAGE),
            phase: Phase::Catching { writer: Some(writer), read: None },
            backlog,
            next,
            session: None,
            pace: None,
            held: None,
        };
        Ok((feed, epoch))
    }

    /// Report this `kind` (`sse`, `ws`) of connection from `peer` to the
    /// registry's live status from now on, paced by the rate limit of its
    /// `admission`.
    pub fn with_registry(
        mut self,
        registry: &Registry,
        admission: &Admission,
        kind: &'static str,
        peer: Option<std::net::SocketAddr>,
    ) -> Self {
        let filter = self.filter.as_ref().map(|f| f.as_str());
        let (session, pace) = registry.open(admission, kind, self.stream.as_str(), filter, peer);
        self.session = Some(session);
        self.pace = pace;
        self
    }

    /// The next item, or `None` after the end (paced, when a pace is set).
    pub async fn next(&mut self) -> Option<Item> {
        if self.pace.is_none() {
            let item = self.next_unpaced().await;
            self.observe(&item);
            return item;
        }
        if self.held.is_none() {
            // Cancel-safe, and nothing is held yet: a cancel loses nothing.
            let item = self.next_unpaced().await?;
            self.held = Some((item, false));
        }
        if let (Some(pace), Some((Item::Frame(frame), bytes_paid))) = (&self.pace, &mut self.held) {
            pace.wait(frame, bytes_paid).await;
        }
        let item = self.held.take().map(|(item, _)| item);
        self.observe(&item);
        item
    }

    fn observe(&mut self, item: &Option<Item>) {
        let Some(session) = &mut self.session else { return };
        match item {
            Some(Item::Frame(frame)) => session.sent(frame),
            Some(Item::End(end)) => session.ended(end),
            None => {}
        }
    }

    /// Whether the subscriber has joined the live feed.
    pub fn is_live(&self) -> bool {
        matches!(self.phase, Phase::Live(_))
    }

    async fn next_unpaced(&mut self) -> Option<Item> {
        loop {
            if let Some(item) = self.pop_backlog() {
                return Some(item);
            }
            if !matches!(self.phase, Phase::Catching { .. }) {
                return self.sub.next().await;
            }
            if self.sub.is_draining() {
                self.phase = Phase::Ended;
                return Some(self.sub.reconnect());
            }
            if let Phase::Catching { read: Some((upto, pending)), .. } = &mut self.phase {
                let upto = *upto;
                let drain = self.sub.drain_token().clone();
                let result = tokio::select! {
                    biased;
                    () = drain.cancelled() => continue,
                    result = pending => result,
                };
                if let Phase::Catching { read, .. } = &mut self.phase {
                    *read = None;
                }
                if let Err(e) = self.page(result, upto) {
                    self.phase = Phase::Ended;
                    return Some(self.sub.end(End::Failed(Box::new(Problem::from_error(&e)))));
                }
                continue;
            }
            let Phase::Catching { writer, .. } = &mut self.phase else { continue };
            let w = writer.take().expect("a catching feed holds its writer between reads");
            match self.tail.join(self.next, self.filter.as_ref(), w) {
                Join::Live { id, backlog } => {
                    self.backlog.extend(backlog);
                    self.phase = Phase::Live(id);
                }
                Join::Behind { writer: w, covered_from } => {
                    let read = self.read(covered_from);
                    self.phase = Phase::Catching { writer: Some(w), read: Some((covered_from, read)) };
                }
                Join::Closed(end) => {
                    self.phase = Phase::Ended;
                    return Some(self.sub.end(end));
                }
            }
        }
    }

    /// The next item if one is ready now (for batching writes).
    pub fn try_next(&mut self) -> Option<Item> {
        if self.pace.is_some() {
            return None;
        }
        let item = self.pop_backlog().or_else(|| match self.phase {
            Phase::Live(_) => self.sub.try_next(),
            _ => None,
        });
        self.observe(&item);
        item
    }

    /// The position a heartbeat carries: the hub's head, when the
    /// subscriber is live, has nothing pending and is behind it (a filtered
    /// subscriber that matched nothing lately). Counts as its position.
    pub fn heartbeat(&self) -> Option<u64> {
        if !self.is_live() || !self.backlog.is_empty() || self.held.is_some() {
            return None;
        }
        // Head first: every frame up to it was queued before this read, so
        // an empty queue after it means all of them were sent.
        let head = self.tail.head();
        (self.sub.queue_is_empty() && head > self.sub.last_sent()).then(|| {
            self.sub.advance(head);
            if let Some(session) = &self.session {
                session.advance(head);
            }
            head
        })
    }

    fn pop_backlog(&mut self) -> Option<Item> {
        if matches!(self.phase, Phase::Ended) {
            return None;
        }
        let frame = self.backlog.pop_front()?;
        self.sub.sent(&frame);
        Some(Item::Frame(frame))
    }

    /// A history read of `next..covered_from`, under the hub's concurrency limit.
    fn read(&self, covered_from: u64) -> HistoryRead {
        let (engine, stream, permits) = (self.hub.engine.clone(), self.stream.clone(), self.hub.history.clone());
        let request = ReadRequest {
            start: ReadStart::Seq(Seq(self.next)),
            end: Some(Seq(covered_from - 1)),
            filter: None,
            limit: self.page_limit,
        };
        Box::pin(async move {
            let _permit = permits.acquire_owned().await.map_err(|_| Error::unavailable("the hub is shutting down"))?;
            engine.read(&stream, request).await
        })
    }

    /// Queue a page of history read up to `upto - 1`: a gap for what is
    /// gone before it, its matching messages; an empty page means
    /// everything up to `upto` is gone.
    fn page(&mut self, result: Result<Vec<Message>>, upto: u64) -> Result<()> {
        let messages = result?;
        let epoch = self.epoch;
        let Some(first) = messages.first().map(|m| m.seq.0) else {
            if upto > self.next {
                self.backlog.push_back(Frame::Gap { from: self.next, to: upto - 1, epoch });
                self.next = upto;
            }
            return Ok(());
        };
        if first > self.next {
            self.backlog.push_back(Frame::Gap { from: self.next, to: first - 1, epoch });
        }
        for m in messages {
            self.next = m.seq.0 + 1;
            if self.filter.as_ref().is_none_or(|f| f.matches(&m.subject)) {
                self.backlog.push_back(Frame::Shared(Arc::new(Encoded::message(&m))));
            }
        }
        Ok(())
    }
}

impl Drop for Feed {
    fn drop(&mut self) {
        let live = match self.phase {
            Phase::Live(id) => Some(id),
            _ => None,
        };
        self.tail.detach(live);
    }
}
