//! The single writer: one OS thread owns every mutation, fed by a bounded
//! channel, and commits concurrent requests together (group commit).
//!
//! A round drains every queued request and applies them in order; the
//! publishes of a round to one stream are staged in one atomic fjall batch
//! (one journal write, handed to the OS page cache). Acks of writes that
//! need no fsync go out at once. Writes that wait for an fsync (`sync =
//! always` streams, stream and consumer changes) are made durable by one
//! fsync for everything committed so far, then acked together; the fsync
//! does not hold fjall's journal lock (see `journal_sync`).
//!
//! Who runs that fsync depends on the load:
//! - **The syncer thread**, while requests keep coming: the writer hands
//!   the round over and goes on with the next one, so the disk's flush and
//!   the CPU work of the next requests overlap, and each fsync covers every
//!   write committed while the previous one ran.
//! - **The writer itself**, when nothing else is queued and the syncer is
//!   idle, i.e. when every client is waiting for this fsync (publishers
//!   that each await their ack). Handing over would then only add a
//!   thread's wake-up to every round trip. Having acked the burst itself,
//!   the writer knows it is coming back: it polls the queue for the first
//!   of them instead of sleeping (so their return costs no wake-up of the
//!   writer), then stages requests as they arrive (yielding the CPU to the
//!   returning publishers while none is queued, for at most half an fsync
//!   before the first and again after it) until it has as many as the
//!   fsync answered, and commits the whole burst at once. Its fsync starts
//!   the journal's writeback, commits the round's subject-index changes
//!   while the disk writes (see `txn.rs`: the index is derived data, in a
//!   batch of its own), then waits for the disk.
//!
//! Either way, if fewer requests are waiting than the last fsync answered,
//! the fsync waits up to half an fsync ([`MAX_LINGER`] at most) for the
//! rest of the burst, so fsyncs do not alternate between full and nearly
//! empty. After every few rounds that wait for an fsync, the writer also
//! keeps the journal zeroed ahead of its data, so those fsyncs allocate no
//! blocks (`journal_sync` again; it must run here, between commits).
//!
//! `sync = interval` writes are fsynced once their interval is up: the
//! writer checks whenever it waits for requests (with the due time as its
//! deadline), after every round and every [`INTERVAL_CHECK`] messages
//! staged within one, so no queue, however full, holds that fsync back, and
//! hands the fsync to the syncer thread (it answers nobody), so publishes
//! are not held back while the disk flushes. Housekeeping (age retention
//! of streams nobody publishes to) keeps its own schedule the same way:
//! run when the writer's wait for requests times out at its due time, or
//! after the round during which it fell due.
//!
//! Invariants:
//! - no ack of a `sync = always` write is sent before an fsync that started
//!   after its commit has returned successfully; nor the ack of a
//!   duplicate whose original is such a write, nor the refusal of a
//!   conditional write (KV create/update/delete-if) that may have seen
//!   one (the revision it names would not be visible yet);
//! - a commit is revealed to readers ([`StreamHandle::reveal`]) only once
//!   its ack condition holds, before its acks, in commit order per stream:
//!   a commit that does not wait for an fsync is revealed at once only
//!   while no earlier commit of its stream waits for one
//!   ([`StreamHandle::unsynced`]), else after the next fsync too;
//! - the index changes of a round ([`Writer::index_pending`]) are committed
//!   before any other request is applied, before the next round and before
//!   the round's acks: nothing reads the index without them;
//! - after a failed commit or fsync the writer is poisoned: every later write
//!   fails with `Unavailable`, and writes waiting for that fsync get the error;
//! - live notifications (tails) of a write are sent after its ack condition
//!   holds, in sequence order per stream: the writer runs an fsync itself
//!   only while the syncer has no job left ([`SyncShared::queued`]), so
//!   completions never overtake each other.

use std::collections::VecDeque;

use hashbrown::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use finmesh_core::{
    Error, ErrorKind, OutgoingMessage, PubAck, Result, Revision, Seq, StreamName, SyncPolicy, Timestamp,
};
use fjall::{Database, Keyspace, PersistMode};
use tokio::sync::oneshot;

use crate::consumers::{ConsumerOp, Consumers};
use crate::journal_sync::{JournalSync, JournalZeroer};
use crate::store::{self, Registry, StreamHandle, StreamKind, StreamRecord, storage};
use crate::txn::{IndexBatch, Txn};

/// Most requests applied in one round.
const MAX_ROUND: usize = 4096;
/// Messages staged (other requests count one) between two checks, within
/// a round, whether an interval fsync is due.
const INTERVAL_CHECK: usize = 256;
/// Most messages removed by age in one housekeeping pass per stream.
const MAX_AGE_EVICTIONS: usize = 10_000;
/// How often [`Writer::housekeeping`] (age retention) runs.
const HOUSEKEEPING_EVERY: Duration = Duration::from_millis(10);

pub(crate) type Reply<T> = oneshot::Sender<Result<T>>;

/// A precondition on a single-message publish (used by KV).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Cond {
    None,
    /// The subject has no live value (no entry, or its last is a marker).
    NoLiveValue,
    /// The subject's last sequence is exactly this (0 = no entry).
    LastSubjectSeq(Revision),
    /// After storing, remove every older message of the subject.
    Rollup,
}

/// A request to the writer. Kept small (rare, large requests are boxed):
/// every publish moves one through the channel.
pub(crate) enum Op {
    CreateStream {
        record: Box<StreamRecord>,
        reply: Reply<Arc<StreamHandle>>,
    },
    UpdateStream {
        record: Box<StreamRecord>,
        reply: Reply<Arc<StreamHandle>>,
    },
    DeleteStream {
        name: StreamName,
        kind: StreamKindTag,
        reply: Reply<()>,
    },
    PurgeStream {
        stream: Arc<StreamHandle>,
        reply: Reply<u64>,
    },
    Publish {
        stream: Arc<StreamHandle>,
        msgs: Vec<OutgoingMessage>,
        cond: Cond,
        reply: Reply<Vec<PubAck>>,
    },
    Consumer(Box<ConsumerOp>),
    /// Housekeeping is due; made by the writer itself, never sent.
    Tick,
    Close {
        reply: Reply<()>,
    },
}

/// Whether a delete addresses a user stream or a bucket's stream.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum StreamKindTag {
    User,
    Kv,
}

/// What to do once a request's durability condition holds (or failed).
pub(crate) type Completion = Box<dyn FnOnce(Result<()>) + Send>;

/// A completion that answers `reply` with `res`, or with the sync failure.
pub(crate) fn complete<T: Send + 'static>(reply: Reply<T>, res: Result<T>) -> Completion {
    Box::new(move |synced| {
        let _ = reply.send(synced.and(res));
    })
}

/// Set once a write or fsync failed; the store then refuses writes.
#[derive(Default)]
pub(crate) struct Poison(parking_lot::Mutex<Option<String>>);

impl Poison {
    fn get(&self) -> Option<String> {
        self.0.lock().clone()
    }

    fn set(&self, msg: String) {
        self.0.lock().get_or_insert(msg);
    }
}

/// fsync the journal; a failure poisons the store.
fn fsync(db: &Database, poison: &Poison) -> std::result::Result<(), String> {
    if let Some(p) = poison.get() {
        return Err(p);
    }
    db.persist(PersistMode::SyncData).map_err(|e| {
        let msg = format!("fsync failed, the store refuses writes until restarted: {e}");
        tracing::error!("{msg}");
        poison.set(msg.clone());
        msg
    })
}

/// Writes handed to the syncer: their completions and how many requests they answer.
pub(crate) type SyncJob = (Vec<Completion>, usize);

/// Longest the syncer waits for more writes to share an fsync, as a
/// fraction of the last fsync's duration (and never more than [`MAX_LINGER`]).
const MAX_LINGER: Duration = Duration::from_micros(200);

/// What the writer and the syncer thread share to make writes durable.
pub(crate) struct SyncShared {
    db: Database,
    journal: parking_lot::Mutex<JournalSync>,
    poison: Arc<Poison>,
    /// Jobs handed to the syncer thread whose completions have not all run.
    /// While it is zero the writer may fsync a round itself: no ack of an
    /// earlier round can then be overtaken.
    queued: AtomicUsize,
    /// Requests the last fsync answered and how long it took (µs), whoever
    /// ran it: the size of burst worth waiting for, and how long to wait.
    last_requests: AtomicUsize,
    last_fsync_us: AtomicU64,
    /// Totals for [`SyncStats`].
    fsyncs: AtomicU64,
    writer_fsyncs: AtomicU64,
    requests: AtomicU64,
    interval_fsyncs: AtomicU64,
    interval_max_lag_us: AtomicU64,
    /// Interval fsyncs handed to the syncer and not run yet.
    interval_handed: AtomicUsize,
    /// Set while [`SyncShared::hold`] holds the group commit's fsyncs (a
    /// test hook); checked once per fsync, so it costs nothing otherwise.
    held: AtomicBool,
    hold: parking_lot::Mutex<bool>,
    released: parking_lot::Condvar,
}

/// How writes that wait for their fsync (`sync = always`, stream and
/// consumer changes) have been made durable since the engine opened.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct SyncStats {
    /// fsyncs of the journal that answered waiting writes.
    pub fsyncs: u64,
    /// How many of those the writer thread ran itself (see the `writer`
    /// module doc); the rest ran on the syncer thread.
    pub writer_fsyncs: u64,
    /// Requests answered by those fsyncs (a publish batch counts once).
    pub requests: u64,
    /// fsyncs run for `sync = interval` writes.
    pub interval_fsyncs: u64,
    /// The longest an acked `interval` write waited for its fsync to
    /// be started: from the first commit after an fsync to the hand-over of
    /// the next interval fsync to the syncer thread. The policy promises its
    /// interval plus the time the writer takes for a few dozen requests (the disk's time for the
    /// fsync itself comes on top).
    pub interval_max_lag: Duration,
}

impl SyncShared {
    /// One fsync that covers every write committed before the call, then
    /// the completions of `waiting` with its outcome; a failure poisons
    /// the store.
    ///
    /// `meanwhile` runs once the journal's pages are on their way to the
    /// disk, before the fsync waits for them; its failure fails the fsync.
    fn sync_and_complete(
        &self,
        waiting: Vec<Completion>,
        count: usize,
        stats: &mut SyncerStats,
        meanwhile: impl FnOnce() -> std::result::Result<(), String>,
    ) {
        if self.held.load(Ordering::Acquire) {
            let mut held = self.hold.lock();
            while *held {
                self.released.wait(&mut held);
            }
        }
        // Interval fsyncs handed over before this one starts: it covers
        // their writes (one handed over later waits for the next).
        let interval = self.interval_handed.swap(0, Ordering::AcqRel);
        let started = Instant::now();
        let res = match self.poison.get() {
            Some(p) => Err(p),
            None => self.journal.lock().sync(&self.db, meanwhile).map_err(|e| {
                let msg = format!("{e}; the store refuses writes until restarted");
                tracing::error!("{msg}");
                self.poison.set(msg.clone());
                msg
            }),
        };
        let fsync = started.elapsed();
        // Counted before the acks, so that whoever got an ack sees its fsync.
        self.last_fsync_us.store(fsync.as_micros() as u64, Ordering::Relaxed);
        if count > 0 {
            // An interval fsync alone answers nobody: it is no burst.
            self.last_requests.store(count, Ordering::Relaxed);
            self.fsyncs.fetch_add(1, Ordering::Relaxed);
            self.requests.fetch_add(count as u64, Ordering::Relaxed);
        }
        if interval > 0 && res.is_ok() {
            self.interval_fsyncs.fetch_add(1, Ordering::Relaxed);
        }
        for done in waiting {
            done(res.clone().map_err(Error::unavailable));
        }
        stats.fsync += fsync;
        stats.fsyncs += 1;
        stats.requests += count as u64;
        stats.acks += started.elapsed() - fsync;
    }

    pub(crate) fn stats(&self) -> SyncStats {
        SyncStats {
            fsyncs: self.fsyncs.load(Ordering::Relaxed),
            writer_fsyncs: self.writer_fsyncs.load(Ordering::Relaxed),
            requests: self.requests.load(Ordering::Relaxed),
            interval_fsyncs: self.interval_fsyncs.load(Ordering::Relaxed),
            interval_max_lag: Duration::from_micros(self.interval_max_lag_us.load(Ordering::Relaxed)),
        }
    }

    /// Hold (`true`) or release the fsyncs that answer waiting writes (the
    /// syncer's and the writer's own); while held, the writer hands every
    /// such fsync to the syncer, so it keeps applying requests. A test
    /// hook: it shows what is visible and acked before an fsync returns.
    pub(crate) fn hold(&self, on: bool) {
        let mut held = self.hold.lock();
        *held = on;
        self.held.store(on, Ordering::Release);
        if !on {
            self.released.notify_all();
        }
    }

    fn is_held(&self) -> bool {
        self.held.load(Ordering::Acquire)
    }

    /// How long to wait for the rest of a burst, from the last fsync.
    fn linger(&self) -> Duration {
        (Duration::from_micros(self.last_fsync_us.load(Ordering::Relaxed)) / 2).min(MAX_LINGER)
    }

    fn burst(&self) -> usize {
        self.last_requests.load(Ordering::Relaxed)
    }
}

/// The syncer thread: one fsync for every write handed over since the last
/// one started, then their acks. Every write it receives was committed
/// before it was sent here, so the fsync that follows covers it.
///
/// Publishers that await their acks come back in a burst after each fsync.
/// If fewer requests are waiting than the last fsync covered, the syncer
/// waits up to half an fsync for the rest of the burst (the writer keeps
/// committing meanwhile), so fsyncs do not alternate between full and
/// nearly empty.
fn run_syncer(shared: &SyncShared, rx: &flume::Receiver<SyncJob>) {
    let mut stats = SyncerStats::default();
    let mut acked = None::<Instant>;
    while let Ok((mut waiting, mut count)) = rx.recv() {
        let arrived = Instant::now();
        if let Some(acked) = acked {
            stats.idle += arrived - acked;
        }
        let mut jobs = 1;
        while let Ok((more, n)) = rx.try_recv() {
            waiting.extend(more);
            count += n;
            jobs += 1;
        }
        stats.first += count as u64;
        let burst = shared.burst();
        if count > 0 && count < burst {
            let deadline = Instant::now() + shared.linger();
            while count < burst {
                match rx.recv_deadline(deadline) {
                    Ok((more, n)) => {
                        waiting.extend(more);
                        count += n;
                        jobs += 1;
                    }
                    Err(_) => break,
                }
            }
        }
        stats.linger += arrived.elapsed();
        shared.sync_and_complete(waiting, count, &mut stats, || Ok(()));
        shared.queued.fetch_sub(jobs, Ordering::Release);
        acked = Some(Instant::now());
    }
    stats.log("syncer stopped");
}

/// Where the syncer's time goes, logged at debug level when it stops: per
/// fsync, the mean wait for work (`idle`: from the last acks to the next
/// write, i.e. the publishers' return trip and the writer's round), the
/// mean wait for the rest of a burst (`linger`), the fsync, and sending
/// the acks.
#[derive(Default)]
struct SyncerStats {
    fsyncs: u64,
    requests: u64,
    /// Requests already there when the syncer woke.
    first: u64,
    idle: Duration,
    linger: Duration,
    fsync: Duration,
    acks: Duration,
}

impl SyncerStats {
    fn log(&self, what: &str) {
        let n = self.fsyncs.max(1);
        let us = |d: Duration| d.as_micros() as u64 / n;
        tracing::debug!(
            fsyncs = self.fsyncs,
            requests_per_fsync = self.requests as f64 / n as f64,
            first_per_fsync = self.first as f64 / n as f64,
            mean_idle_us = us(self.idle),
            mean_linger_us = us(self.linger),
            mean_fsync_us = us(self.fsync),
            mean_acks_us = us(self.acks),
            "{what}"
        );
    }
}

/// Publishes of one round to one stream, staged in one batch.
struct Staged {
    txn: Txn,
    config: finmesh_core::StreamConfig,
    /// A bucket's stream: `max_bytes` refuses new writes instead of
    /// evicting old ones (see [`Writer::stage`]).
    discard_new: bool,
    stored: Vec<finmesh_core::Message>,
    replies: Vec<(Reply<Vec<PubAck>>, Vec<PubAck>)>,
}

impl Staged {
    fn new(db: &Database, h: &Arc<StreamHandle>) -> Self {
        let discard_new = matches!(h.record.read().kind, StreamKind::Kv(_));
        Staged { txn: Txn::new(db, h), config: h.config(), discard_new, stored: Vec::new(), replies: Vec::new() }
    }

    /// Whether a failed condition may have seen a write that readers do
    /// not see yet: one of this round (for `always`), or one still waiting
    /// for its fsync. Refusing at once would name a revision that a read
    /// right after does not show.
    fn conflict_may_be_unsynced(&self) -> bool {
        self.txn.h.has_unsynced() || (self.config.sync == SyncPolicy::Always && !self.txn.is_empty())
    }
}

/// Message ids seen within a stream's duplicate window.
#[derive(Default)]
pub(crate) struct Dedup {
    ids: HashMap<String, Seq>,
    order: VecDeque<(Timestamp, String)>,
}

impl Dedup {
    fn expire(&mut self, now: Timestamp, window: Duration) {
        let cutoff = now.saturating_sub(window);
        while let Some((t, _)) = self.order.front() {
            if *t >= cutoff {
                break;
            }
            if let Some((_, id)) = self.order.pop_front() {
                self.ids.remove(&id);
            }
        }
    }
}

pub(crate) struct Writer {
    pub db: Database,
    pub meta: Keyspace,
    pub registry: Arc<Registry>,
    pub consumers: Consumers,
    dedup: HashMap<StreamName, Dedup>,
    poison: Arc<Poison>,
    /// The journal's fsync, shared with the syncer thread.
    sync: Arc<SyncShared>,
    /// Writes waiting for an fsync, handed to the syncer thread.
    sync_tx: Option<flume::Sender<SyncJob>>,
    syncer: Option<std::thread::JoinHandle<()>>,
    /// Requests answered by this round's deferred completions.
    deferred_requests: usize,
    /// Committed writes waiting for an fsync the writer will run itself,
    /// the requests they answer, and until when it waits for more.
    pending: Vec<Completion>,
    pending_requests: usize,
    pending_until: Option<Instant>,
    /// Index changes of this round's `sync = always` writes, committed
    /// before anything reads the index and before those writes are acked:
    /// by the writer's own fsync while the disk writes, otherwise at once
    /// ([`Writer::commit_index`]).
    index_pending: Vec<IndexBatch>,
    /// When the next `sync = interval` fsync is due, if anything waits for
    /// one, and since when the oldest write it covers waits.
    interval_due: Option<Instant>,
    /// When [`Writer::housekeeping`] (age retention) runs next. The writer
    /// keeps this schedule itself, so no queue, however full, delays it.
    housekeeping_at: Instant,
    interval_since: Option<Instant>,
    /// Conditional writes refused because of writes not visible yet (see
    /// [`Staged::conflict_may_be_unsynced`]): answered after the next fsync,
    /// behind the completions of those writes ([`Writer::flush`] appends
    /// them last).
    conflicts: Vec<Completion>,
    /// Reveals (see [`Writer::reveal`]) that wait for the next fsync,
    /// queued by requests applied outside a publish round's staging
    /// (updates, purges, retention, dead letters); the round moves them to
    /// its deferred completions right after the request that made them.
    reveals: Vec<Completion>,
    /// Keeps the journal zeroed ahead of its data, checked every
    /// [`ZERO_EVERY`] rounds that wait for an fsync.
    zeroer: JournalZeroer,
    synced_rounds: u64,
    /// Time those rounds took, from the first request to the hand-off.
    synced_busy: Duration,
    /// The writer has just acked a burst itself: gather it in the next round.
    gather_burst: bool,
    /// Debug statistics of the writer's own fsyncs (rounds it did not hand
    /// to the syncer): when the last one's acks were out, and since when
    /// the current pending writes wait.
    inline: SyncerStats,
    inline_acked: Option<Instant>,
    pending_since: Option<Instant>,
}

/// Rounds waiting for an fsync between two checks of the journal's zeroed
/// space. Only those rounds count: zeroing saves each small fsync its
/// block allocation, while `interval` and `never` writes share one fsync
/// per interval and would only pay for writing every byte twice.
const ZERO_EVERY: u64 = 8;

impl Writer {
    pub fn new(
        db: Database,
        dir: &std::path::Path,
        meta: Keyspace,
        registry: Arc<Registry>,
        consumers: Consumers,
    ) -> Self {
        let poison = Arc::new(Poison::default());
        let (sync_tx, sync_rx) = flume::unbounded();
        let sync = Arc::new(SyncShared {
            db: db.clone(),
            journal: parking_lot::Mutex::new(JournalSync::new(dir)),
            poison: poison.clone(),
            queued: AtomicUsize::new(0),
            last_requests: AtomicUsize::new(0),
            last_fsync_us: AtomicU64::new(0),
            fsyncs: AtomicU64::new(0),
            writer_fsyncs: AtomicU64::new(0),
            requests: AtomicU64::new(0),
            interval_fsyncs: AtomicU64::new(0),
            interval_max_lag_us: AtomicU64::new(0),
            interval_handed: AtomicUsize::new(0),
            held: AtomicBool::new(false),
            hold: parking_lot::Mutex::new(false),
            released: parking_lot::Condvar::new(),
        });
        let shared = sync.clone();
        let syncer = std::thread::Builder::new()
            .name("finmesh-syncer".into())
            .spawn(move || run_syncer(&shared, &sync_rx))
            .expect("spawn the syncer thread");
        Writer {
            db,
            meta,
            registry,
            consumers,
            dedup: HashMap::new(),
            poison,
            sync,
            sync_tx: Some(sync_tx),
            syncer: Some(syncer),
            deferred_requests: 0,
            pending: Vec::new(),
            pending_requests: 0,
            pending_until: None,
            index_pending: Vec::new(),
            interval_due: None,
            housekeeping_at: Instant::now() + HOUSEKEEPING_EVERY,
            interval_since: None,
            conflicts: Vec::new(),
            reveals: Vec::new(),
            zeroer: JournalZeroer::new(dir),
            synced_rounds: 0,
            synced_busy: Duration::ZERO,
            gather_burst: false,
            inline: SyncerStats::default(),
            inline_acked: None,
            pending_since: None,
        }
    }

    /// The fsync counters, readable while the writer runs.
    pub fn sync_shared(&self) -> Arc<SyncShared> {
        self.sync.clone()
    }

    /// The writer thread's loop; returns when closed or every sender is gone.
    pub fn run(mut self, rx: flume::Receiver<Op>) {
        let mut close_reply = None;
        while close_reply.is_none() {
            // The publishers the writer just acked itself are on their way back.
            let returning = if self.gather_burst { self.poll_for_return(&rx) } else { None };
            let deadline =
                [self.pending_until, self.interval_due, Some(self.housekeeping_at)].into_iter().flatten().min();
            let first = match (returning, deadline) {
                (Some(op), _) => Ok(op),
                (None, None) => rx.recv(),
                (None, Some(until)) => match rx.recv_deadline(until) {
                    Err(flume::RecvTimeoutError::Timeout) => {
                        if self.pending_until.is_some_and(|u| u <= Instant::now()) {
                            self.sync_pending();
                        }
                        self.interval_fsync_if_due();
                        if self.housekeeping_at <= Instant::now() {
                            Ok(Op::Tick)
                        } else {
                            continue;
                        }
                    }
                    r => r.map_err(|_| flume::RecvError::Disconnected),
                },
            };
            let Ok(first) = first else { break };
            let round_started = Instant::now();
            let gather = std::mem::take(&mut self.gather_burst).then(|| self.gather_window(round_started));
            let mut deferred: Vec<Completion> = Vec::new();
            let mut staged: Vec<Staged> = Vec::new();
            let (mut next, mut taken, mut unchecked) = (Some(first), 0, 0);
            while taken < MAX_ROUND {
                let op = match next.take().or_else(|| rx.try_recv().ok()) {
                    Some(op) => op,
                    None => match gather {
                        Some((burst, until)) if taken < burst && Instant::now() < until => {
                            std::thread::yield_now();
                            continue;
                        }
                        _ => break,
                    },
                };
                taken += 1;
                unchecked += match &op {
                    Op::Publish { msgs, .. } => msgs.len(),
                    _ => 1,
                };
                if unchecked >= INTERVAL_CHECK {
                    unchecked = 0;
                    if self.interval_due.is_some_and(|d| d <= Instant::now()) {
                        // A long round must not hold back an interval fsync.
                        self.flush(&mut staged, &mut deferred);
                        self.commit_index();
                        self.interval_fsync_if_due();
                    }
                }
                match op {
                    Op::Close { reply } => close_reply = Some(reply),
                    Op::Publish { stream, msgs, cond, reply } => {
                        if let Err(e) = self.check_poison() {
                            let _ = reply.send(Err(e));
                            continue;
                        }
                        let i = match staged.iter().position(|s| Arc::ptr_eq(&s.txn.h, &stream)) {
                            Some(i) => i,
                            None => {
                                staged.push(Staged::new(&self.db, &stream));
                                staged.len() - 1
                            }
                        };
                        let r = self.stage(&mut staged[i], msgs, cond);
                        match self.poison_on_err(r) {
                            Ok(acks) => staged[i].replies.push((reply, acks)),
                            Err(e) if e.kind() == ErrorKind::WrongRevision && staged[i].conflict_may_be_unsynced() => {
                                // The revision it names may not be visible
                                // yet: answer once it is (see `flush`).
                                self.deferred_requests += 1;
                                self.conflicts.push(complete(reply, Err(e)));
                            }
                            Err(e) => {
                                let _ = reply.send(Err(e));
                            }
                        }
                    }
                    Op::Tick => {
                        self.flush(&mut staged, &mut deferred);
                        self.commit_index();
                        self.housekeeping();
                        deferred.append(&mut self.reveals);
                    }
                    op => {
                        // Other requests see every publish before them committed.
                        self.flush(&mut staged, &mut deferred);
                        self.commit_index();
                        let sync = self.needs_sync(&op);
                        let done = self.apply(op);
                        // Its reveals go before its own completion: commit order.
                        deferred.append(&mut self.reveals);
                        if sync {
                            self.deferred_requests += 1;
                            deferred.push(done)
                        } else {
                            done(Ok(()))
                        }
                    }
                }
            }
            self.flush(&mut staged, &mut deferred);
            self.interval_fsync_if_due();
            if self.housekeeping_at <= Instant::now() {
                // A busy writer never times out waiting: run it between rounds.
                self.commit_index();
                self.housekeeping();
                deferred.append(&mut self.reveals);
            }
            if deferred.is_empty() && self.pending.is_empty() {
                continue;
            }
            if !deferred.is_empty() {
                self.synced_busy += round_started.elapsed();
                self.synced_rounds += 1;
            }
            self.pending.extend(deferred);
            self.pending_requests += std::mem::take(&mut self.deferred_requests);
            self.hand_over(&rx);
            // Between commits (so none runs concurrently), while the
            // syncer's fsync is under way or the publishers come back.
            if self.synced_rounds.is_multiple_of(ZERO_EVERY) {
                self.zeroer.maintain();
            }
        }
        self.sync_pending();
        tracing::debug!(
            rounds = self.synced_rounds,
            mean_round_us = self.synced_busy.as_micros() as u64 / self.synced_rounds.max(1),
            "writer: rounds that waited for an fsync"
        );
        self.inline.log("writer's own fsyncs");
        // Let the syncer finish what it has, then make everything durable.
        drop(self.sync_tx.take());
        if let Some(t) = self.syncer.take() {
            let _ = t.join();
        }
        let res = match self.poison.get() {
            None => self.close_cleanly(),
            Some(_) => Ok(()),
        };
        if let Some(reply) = close_reply {
            let _ = reply.send(res);
        }
    }

    /// Make everything durable, then mark the store closed cleanly (see
    /// [`store::CLEAN_CLOSE_KEY`]).
    fn close_cleanly(&mut self) -> Result<()> {
        self.db.persist(PersistMode::SyncAll).map_err(storage)?;
        self.meta.insert(store::CLEAN_CLOSE_KEY, []).map_err(storage)?;
        self.db.persist(PersistMode::SyncAll).map_err(storage)
    }

    /// Get the pending writes fsynced: by the writer itself while the
    /// syncer is idle, once every publisher of the last burst is in (or it
    /// waited long enough); by the syncer thread while it is busy, or when
    /// more requests keep coming (then the writer goes on committing them
    /// during the fsync).
    ///
    /// The writer's own fsync saves the syncer's wake-up on every round
    /// trip of publishers that await their acks; it only happens while the
    /// syncer has nothing queued, so acks keep their commit order.
    fn hand_over(&mut self, rx: &flume::Receiver<Op>) {
        if self.sync.queued.load(Ordering::Acquire) == 0 && !self.sync.is_held() {
            let now = Instant::now();
            let until = *self.pending_until.get_or_insert_with(|| now + self.sync.linger());
            self.pending_since.get_or_insert(now);
            let more_coming = !rx.is_empty();
            if now < until && (more_coming || self.pending_requests < self.sync.burst()) {
                return self.commit_index();
            }
            if !more_coming {
                return self.sync_pending();
            }
        }
        // The syncer may ack as soon as its fsync returns.
        self.commit_index();
        self.pending_until = None;
        self.pending_since = None;
        let (pending, requests) = (std::mem::take(&mut self.pending), std::mem::take(&mut self.pending_requests));
        if let Some(tx) = &self.sync_tx {
            self.sync.queued.fetch_add(1, Ordering::Release);
            if let Err(flume::SendError((pending, _))) = tx.send((pending, requests)) {
                self.sync.queued.fetch_sub(1, Ordering::Release);
                for done in pending {
                    done(Err(Error::unavailable("the syncer thread is gone")));
                }
            }
        }
    }

    /// The publishers the writer's own fsync acked come back in a burst:
    /// the round that starts with the first of them takes requests as they
    /// arrive until it has as many as that fsync answered, for at most
    /// [`SyncShared::linger`] (which then also bounds the wait after the
    /// round), and commits them together. While the queue is empty it
    /// yields the CPU to the publishers rather than sleeping: on few cores
    /// they need it to come back, and one commit for the whole burst costs
    /// less than several for its parts. Returns (burst, deadline).
    fn gather_window(&mut self, arrived: Instant) -> (usize, Instant) {
        let until = arrived + self.sync.linger();
        self.pending_until = Some(until);
        (self.sync.burst(), until)
    }

    /// Wait for the first request after the writer acked a burst itself,
    /// polling the queue and yielding the CPU for at most
    /// [`SyncShared::linger`] rather than sleeping: the publishers it woke
    /// come back within tens of microseconds, and the first of them then
    /// finds the writer awake instead of paying for its wake-up (a futex
    /// wake, and on a VM the scheduling of an idle virtual CPU) on every
    /// round trip. `None` if nothing came (the caller then blocks).
    fn poll_for_return(&self, rx: &flume::Receiver<Op>) -> Option<Op> {
        let until = Instant::now() + self.sync.linger();
        loop {
            match rx.try_recv() {
                Ok(op) => return Some(op),
                Err(flume::TryRecvError::Empty) if Instant::now() < until => std::thread::yield_now(),
                Err(_) => return None,
            }
        }
    }

    /// fsync on the writer thread for everything pending.
    fn sync_pending(&mut self) {
        self.pending_until = None;
        if self.pending.is_empty() {
            return self.commit_index();
        }
        let (pending, requests) = (std::mem::take(&mut self.pending), std::mem::take(&mut self.pending_requests));
        let now = Instant::now();
        if let Some(since) = self.pending_since.take() {
            self.inline.linger += now - since;
        }
        if let Some(acked) = self.inline_acked {
            self.inline.idle += now - acked;
        }
        self.inline.first += requests as u64;
        self.sync.writer_fsyncs.fetch_add(1, Ordering::Relaxed);
        // The index changes of these writes go in while the disk writes.
        let index = std::mem::take(&mut self.index_pending);
        let commit_index = || index.into_iter().try_for_each(IndexBatch::commit).map_err(|e| format!("{e}"));
        self.sync.sync_and_complete(pending, requests, &mut self.inline, commit_index);
        self.inline_acked = Some(Instant::now());
        self.gather_burst = true;
    }

    /// Commit the index changes of this round's `sync = always` writes.
    fn commit_index(&mut self) {
        for index in std::mem::take(&mut self.index_pending) {
            let r = index.commit();
            if self.poison_on_err(r).is_err() {
                break;
            }
        }
    }

    /// The fsync for `sync = interval` writes, if one is due: handed to the
    /// syncer thread (a job that answers nobody), so the writer goes on
    /// applying requests while the disk flushes; an fsync here held every
    /// publish back for its 2–4 ms (the embedded engine's p99.9 at 1,000
    /// publishes/s). Run here only if the syncer is gone.
    fn interval_fsync_if_due(&mut self) {
        if self.interval_due.is_none_or(|d| d > Instant::now()) {
            return;
        }
        // Cleared even if it fails: the store is poisoned then, and a
        // deadline left in the past would spin the writer's loop.
        self.interval_due = None;
        if let Some(lag) = self.interval_since.take().map(|since| since.elapsed()) {
            self.sync.interval_max_lag_us.fetch_max(lag.as_micros() as u64, Ordering::Relaxed);
        }
        if let Some(tx) = &self.sync_tx {
            self.sync.interval_handed.fetch_add(1, Ordering::AcqRel);
            self.sync.queued.fetch_add(1, Ordering::Release);
            if tx.send((Vec::new(), 0)).is_ok() {
                return;
            }
            self.sync.queued.fetch_sub(1, Ordering::Release);
            self.sync.interval_handed.store(0, Ordering::Release);
        }
        if fsync(&self.db, &self.poison).is_ok() {
            self.sync.interval_fsyncs.fetch_add(1, Ordering::Relaxed);
        }
    }

    fn needs_sync(&self, op: &Op) -> bool {
        match op {
            Op::Publish { stream, .. } | Op::PurgeStream { stream, .. } => {
                stream.record.read().config.sync == SyncPolicy::Always
            }
            Op::CreateStream { .. } | Op::UpdateStream { .. } | Op::DeleteStream { .. } => true,
            Op::Consumer(op) => op.needs_sync(),
            Op::Tick | Op::Close { .. } => false,
        }
    }

    /// Note a commit on a stream with `policy`, for interval fsyncs.
    fn committed(&mut self, policy: SyncPolicy) {
        if let SyncPolicy::Interval { ms } = policy {
            let now = Instant::now();
            let due = now + Duration::from_millis(ms);
            self.interval_due = Some(self.interval_due.map_or(due, |d| d.min(due)));
            self.interval_since.get_or_insert(now);
        }
    }

    fn check_poison(&self) -> Result<()> {
        match self.poison.get() {
            Some(p) => Err(Error::unavailable(p)),
            None => Ok(()),
        }
    }

    /// Record a storage failure: commits that fail poison the writer.
    fn poison_on_err<T>(&mut self, r: Result<T>) -> Result<T> {
        if let Err(e) = &r
            && matches!(e.kind(), ErrorKind::Internal | ErrorKind::Unavailable)
            && self.poison.get().is_none()
        {
            let msg = format!("write failed, the store refuses writes until restarted: {e}");
            tracing::error!("{msg}");
            self.poison.set(msg);
        }
        r
    }

    fn apply(&mut self, op: Op) -> Completion {
        if let Err(e) = self.check_poison() {
            return match op {
                Op::CreateStream { reply, .. } | Op::UpdateStream { reply, .. } => complete(reply, Err(e)),
                Op::DeleteStream { reply, .. } => complete(reply, Err(e)),
                Op::PurgeStream { reply, .. } => complete(reply, Err(e)),
                Op::Publish { reply, .. } => complete(reply, Err(e)),
                Op::Consumer(op) => (*op).fail(e),
                Op::Tick | Op::Close { .. } => Box::new(|_| {}),
            };
        }
        match op {
            Op::CreateStream { record, reply } => {
                let r = self.create_stream(*record);
                complete(reply, r)
            }
            Op::UpdateStream { record, reply } => {
                let r = self.update_stream(*record);
                complete(reply, r)
            }
            Op::DeleteStream { name, kind, reply } => {
                let r = self.delete_stream(&name, kind);
                complete(reply, r)
            }
            Op::PurgeStream { stream, reply } => {
                let r = self.purge_stream(&stream);
                complete(reply, r)
            }
            Op::Publish { reply, .. } => complete(reply, Err(Error::internal("publishes are staged, not applied"))),
            Op::Consumer(op) => (*op).apply(self),
            Op::Tick | Op::Close { .. } => Box::new(|_| {}),
        }
    }

    fn persist_record(&mut self, record: &StreamRecord) -> Result<()> {
        let v = serde_json::to_vec(record).map_err(|e| Error::internal("encode stream record").with_source(e))?;
        let r = self.meta.insert(store::stream_meta_key(&record.config.name), v).map_err(storage);
        self.poison_on_err(r)
    }

    fn check_subjects(&self, record: &StreamRecord) -> Result<()> {
        for other in self.registry.all() {
            if other.name == record.config.name {
                continue;
            }
            let theirs = other.record.read().config.subjects.clone();
            for mine in &record.config.subjects {
                if let Some(t) = theirs.iter().find(|t| t.overlaps(mine)) {
                    return Err(Error::invalid(format!("subject `{mine}` overlaps `{t}` of stream `{}`", other.name)));
                }
            }
        }
        Ok(())
    }

    pub(crate) fn create_stream(&mut self, record: StreamRecord) -> Result<Arc<StreamHandle>> {
        if let Some(h) = self.registry.get(&record.config.name) {
            let existing = h.record.read().clone();
            if existing.config == record.config && existing.kind == record.kind {
                return Ok(h);
            }
            return Err(Error::new(
                ErrorKind::AlreadyExists,
                format!("`{}` exists with a different configuration", record.config.name),
            ));
        }
        self.check_subjects(&record)?;
        let epoch = store::new_epoch(None);
        let r = self.meta.insert(store::epoch_meta_key(&record.config.name), epoch.to_be_bytes()).map_err(storage);
        self.poison_on_err(r)?;
        self.persist_record(&record)?;
        let h =
            store::open_handle(&self.db, record, store::Counters::default(), true, epoch, self.registry.kv_cache_bytes);
        let h = self.poison_on_err(h)?;
        self.registry.insert(h.clone());
        Ok(h)
    }

    fn update_stream(&mut self, record: StreamRecord) -> Result<Arc<StreamHandle>> {
        let name = &record.config.name;
        let h = self.registry.get(name).ok_or_else(|| Error::not_found(format!("`{name}` does not exist")))?;
        let old = h.record.read().clone();
        if std::mem::discriminant(&old.kind) != std::mem::discriminant(&record.kind) {
            return Err(Error::not_found(format!("`{name}` does not exist")));
        }
        if old.config.replicas != record.config.replicas {
            return Err(Error::invalid("replicas cannot change on the embedded engine"));
        }
        // Checked here, in line with creates, so no create slips between.
        let (what, before, after) = match (&old.kind, &record.kind) {
            (StreamKind::Kv(o), StreamKind::Kv(n)) => {
                (format!("bucket `{}`", n.name), o.security.options(), n.security.options())
            }
            _ => (format!("stream `{name}`"), old.config.security.options(), record.config.security.options()),
        };
        finmesh_core::options::check_security_unchanged(&what, &before, &after)?;
        self.check_subjects(&record)?;
        self.persist_record(&record)?;
        let policy = record.config.sync;
        *h.record.write() = record;
        // Tighter limits apply at once.
        let r = self.enforce_limits(&h, None);
        self.poison_on_err(r)?;
        self.committed(policy);
        Ok(h)
    }

    fn delete_stream(&mut self, name: &StreamName, kind: StreamKindTag) -> Result<()> {
        let missing = || Error::not_found(format!("`{name}` does not exist"));
        let h = self.registry.get(name).ok_or_else(missing)?;
        let is_kv = matches!(h.record.read().kind, StreamKind::Kv(_));
        if is_kv != (kind == StreamKindTag::Kv) {
            return Err(missing());
        }
        let mut batch = self.db.batch();
        batch.remove(&self.meta, store::stream_meta_key(name));
        batch.remove(&self.meta, store::state_meta_key(name));
        batch.remove(&self.meta, store::index_meta_key(name));
        batch.remove(&self.meta, store::epoch_meta_key(name));
        self.consumers.remove_stream(&mut batch, &self.meta, name)?;
        let r = batch.commit().map_err(storage);
        self.poison_on_err(r)?;
        self.registry.remove(name);
        self.dedup.remove(name);
        h.deleted.store(true, std::sync::atomic::Ordering::Release);
        let _ = h.live.send(Arc::from(Vec::new()));
        for ks in [h.msgs.clone(), h.index.clone(), h.last.clone()] {
            let r = self.db.delete_keyspace(ks).map_err(storage);
            self.poison_on_err(r)?;
        }
        Ok(())
    }

    fn purge_stream(&mut self, h: &Arc<StreamHandle>) -> Result<u64> {
        if h.is_deleted() {
            return Err(Error::not_found(format!("stream `{}` does not exist", h.name)));
        }
        let mut st = h.committed_state();
        let removed = st.messages;
        st.messages = 0;
        st.bytes = 0;
        st.first_seq = st.last_seq.next();
        st.first_time = None;
        // Counters first: a crash before the clears is finished at open.
        let c = store::Counters { messages: 0, bytes: 0, first_seq: st.first_seq.0, last_seq: st.last_seq.0 };
        let mut batch = self.db.batch();
        batch.insert(&self.meta, store::state_meta_key(&h.name), c.encode());
        batch.insert(&self.meta, store::index_meta_key(&h.name), c.encode());
        let r = batch.commit().map_err(storage);
        self.poison_on_err(r)?;
        h.kv_cache.changed(st.last_seq, None);
        for ks in [&h.msgs, &h.index, &h.last] {
            let r = ks.clear().map_err(storage);
            self.poison_on_err(r)?;
        }
        h.after_commit(st);
        self.reveal(h, st, Vec::new());
        self.committed(h.record.read().config.sync);
        Ok(removed)
    }

    /// Rebuild a stream's dedup state from its newest messages inside the
    /// window, once per stream. A record that does not decode is skipped with
    /// a warning (its id, if it had one, no longer deduplicates): one bad
    /// record must not fail every publish, and the error would poison the
    /// writer for every stream.
    fn load_dedup(&mut self, h: &StreamHandle, window: Duration) -> Result<()> {
        if !self.dedup.contains_key(&h.name) {
            let mut d = Dedup::default();
            let cutoff = Timestamp::now().saturating_sub(window);
            let mut found = Vec::new();
            for kv in h.msgs.iter().rev() {
                let (k, v) = kv.into_inner().map_err(storage)?;
                let m = match crate::codec::key_seq(&k).and_then(|seq| crate::codec::decode_message(seq, v.into())) {
                    Ok(m) => m,
                    Err(e) => {
                        let seq = crate::codec::key_seq(&k).ok().map(|s| s.0);
                        tracing::warn!(stream = %h.name, seq = ?seq, error = %e,
                            "skipping a corrupt record while rebuilding the dedup state");
                        continue;
                    }
                };
                if m.time < cutoff {
                    break;
                }
                if let Some(id) = m.headers.get(finmesh_core::message::MSG_ID_HEADER) {
                    found.push((m.time, id.to_owned(), m.seq));
                }
            }
            for (t, id, seq) in found.into_iter().rev() {
                d.ids.insert(id.clone(), seq);
                d.order.push_back((t, id));
            }
            self.dedup.insert(h.name.clone(), d);
        }
        Ok(())
    }

    /// Stage `msgs` (all checked first) into `s`, applying retention; the
    /// commit happens in [`Writer::flush`]. Message ids are recorded at
    /// once so later requests of the same round see them.
    ///
    /// A bucket's `max_bytes` discards new, as JetStream KV buckets do: a
    /// write that would leave the bucket above it (after the key's own
    /// history trimming) is refused with `TooLarge` and nothing is written;
    /// other keys' values are never evicted to make room.
    fn stage(&mut self, s: &mut Staged, msgs: Vec<OutgoingMessage>, cond: Cond) -> Result<Vec<PubAck>> {
        let h = s.txn.h.clone();
        if h.is_deleted() {
            return Err(Error::not_found(format!("stream `{}` does not exist", h.name)));
        }
        crate::check_publish(&s.config, &msgs)?;
        let window = s.config.duplicate_window;
        let now = Timestamp::now().max(s.txn.st.last_time.unwrap_or_default());
        self.load_dedup(&h, window)?;
        let dedup = self.dedup.get_mut(&h.name).expect("loaded above");
        dedup.expire(now, window);
        let txn = &mut s.txn;
        let bytes_cap = if s.discard_new { s.config.max_bytes } else { None };
        if (cond != Cond::None || bytes_cap.is_some()) && s.config.max_age.is_some() {
            // Conditions and the bucket's byte cap must not see entries
            // that reads already treat as expired: apply age retention first.
            limits(&s.config, txn, now)?;
        }
        let mut acks = Vec::with_capacity(msgs.len());
        for msg in msgs {
            if let Some(seq) = msg.msg_id().and_then(|id| dedup.ids.get(id)) {
                acks.push(PubAck { seq: *seq, duplicate: true });
                continue;
            }
            let subject = msg.subject.clone();
            let before = txn.last_of(subject.as_str())?;
            match cond {
                Cond::None | Cond::Rollup => {}
                Cond::NoLiveValue => {
                    if let Some((last, _)) = before
                        && txn.kv_op(last)? == Some(finmesh_core::KvOp::Put)
                    {
                        return Err(Error::wrong_revision(Revision(last.0), "key exists"));
                    }
                }
                Cond::LastSubjectSeq(expected) => {
                    let current = before.map_or(0, |(s, _)| s.0);
                    if current != expected.0 {
                        return Err(Error::wrong_revision(
                            Revision(current),
                            format!("expected revision {expected}, the key is at {current}"),
                        ));
                    }
                }
            }
            if let Some(cap) = bytes_cap {
                let keep = if cond == Cond::Rollup { 1 } else { s.config.max_msgs_per_subject.unwrap_or(u64::MAX) };
                let freed = txn.bytes_trimmed_by_append(&subject, keep)?;
                let after = (txn.st.bytes + msg.size() as u64).saturating_sub(freed);
                if after > cap {
                    return Err(Error::too_large(format!(
                        "bucket stream `{}` is full: this write would bring it to {after} bytes, above its \
                         max_bytes of {cap}; nothing was written",
                        h.name
                    )));
                }
            }
            let id = msg.msg_id().map(str::to_owned);
            let m = txn.append(now, msg, before)?;
            if let Some(id) = id {
                dedup.ids.insert(id.clone(), m.seq);
                dedup.order.push_back((now, id));
            }
            acks.push(PubAck { seq: m.seq, duplicate: false });
            s.stored.push(m);
            if cond == Cond::Rollup {
                txn.trim_after_append(&subject, 1, before)?;
            } else if let Some(keep) = s.config.max_msgs_per_subject {
                txn.trim_after_append(&subject, keep, before)?;
            }
        }
        limits(&s.config, txn, now)?;
        Ok(acks)
    }

    /// Commit every staged stream write; acks go out at once, or after the
    /// round's fsync (`deferred`) for `sync = always` (and while earlier
    /// writes of the stream still wait for theirs). The write is revealed
    /// to readers right before its acks.
    fn flush(&mut self, staged: &mut Vec<Staged>, deferred: &mut Vec<Completion>) {
        for s in staged.drain(..) {
            let Staged { txn, config, stored, replies, .. } = s;
            let n_replies = replies.len();
            let h = txn.h.clone();
            let always = config.sync == SyncPolicy::Always || h.has_unsynced();
            if txn.is_empty() {
                // Only duplicates, of messages committed in earlier rounds:
                // their acks wait until the originals are durable, i.e.
                // visible (an fsync that starts after now covers them).
                let visible = h.state().last_seq;
                if always && replies.iter().any(|(_, acks)| acks.iter().any(|a| a.seq > visible)) {
                    self.deferred_requests += n_replies;
                    deferred.push(Box::new(move |synced: Result<()>| {
                        for (reply, acks) in replies {
                            let _ = reply.send(match &synced {
                                Ok(()) => Ok(acks),
                                Err(e) => Err(Error::new(e.kind(), e.message())),
                            });
                        }
                    }));
                } else {
                    for (reply, acks) in replies {
                        let _ = reply.send(Ok(acks));
                    }
                }
                continue;
            }
            let r = self.check_poison().and_then(|_| txn.commit_deferring_index(&self.meta));
            let r = match r {
                Ok((st, index)) if always => {
                    self.index_pending.push(index);
                    Ok(st)
                }
                Ok((st, index)) => index.commit().map(|()| st),
                Err(e) => Err(e),
            };
            match self.poison_on_err(r) {
                Ok(st) => {
                    h.after_commit(st);
                    self.committed(config.sync);
                    if always {
                        h.unsynced.fetch_add(1, Ordering::AcqRel);
                    }
                    let done: Completion = Box::new(move |synced: Result<()>| {
                        let ok = synced.is_ok();
                        if ok {
                            h.reveal(st);
                        }
                        for (reply, acks) in replies {
                            let _ = reply.send(match &synced {
                                Ok(()) => Ok(acks),
                                Err(e) => Err(Error::new(e.kind(), e.message())),
                            });
                        }
                        if ok && !stored.is_empty() && h.live.receiver_count() > 0 {
                            let _ = h.live.send(stored.into());
                        }
                        if always {
                            h.unsynced.fetch_sub(1, Ordering::AcqRel);
                        }
                    });
                    if always {
                        self.deferred_requests += n_replies;
                        deferred.push(done)
                    } else {
                        done(Ok(()))
                    }
                }
                Err(e) => {
                    for (reply, _) in replies {
                        let _ = reply.send(Err(Error::new(e.kind(), e.message())));
                    }
                }
            }
        }
        // After the writes they conflicted with: a reader then sees those.
        deferred.append(&mut self.conflicts);
    }

    /// Publish and commit at once (internal writes, e.g. dead letters).
    pub(crate) fn publish_now(
        &mut self,
        h: &Arc<StreamHandle>,
        msgs: Vec<OutgoingMessage>,
    ) -> Result<Vec<finmesh_core::Message>> {
        let mut s = Staged::new(&self.db, h);
        self.stage(&mut s, msgs, Cond::None)?;
        let Staged { txn, config, stored, .. } = s;
        let r = txn.commit(&self.meta);
        let st = self.poison_on_err(r)?;
        h.after_commit(st);
        self.committed(config.sync);
        self.reveal(h, st, stored.clone());
        Ok(stored)
    }

    /// Show a commit made outside a publish round's staging to readers (see
    /// [`StreamHandle::reveal`]) and notify tails of its messages: at once,
    /// or for an `always` stream (or one whose earlier commits still wait
    /// for their fsync) after the next fsync, through [`Writer::reveals`].
    fn reveal(&mut self, h: &Arc<StreamHandle>, st: finmesh_core::StreamState, stored: Vec<finmesh_core::Message>) {
        let show = move |h: &StreamHandle| {
            h.reveal(st);
            if !stored.is_empty() && h.live.receiver_count() > 0 {
                let _ = h.live.send(stored.into());
            }
        };
        if h.record.read().config.sync != SyncPolicy::Always && !h.has_unsynced() {
            return show(h);
        }
        h.unsynced.fetch_add(1, Ordering::AcqRel);
        let h = h.clone();
        self.reveals.push(Box::new(move |synced| {
            if synced.is_ok() {
                show(&h);
            }
            h.unsynced.fetch_sub(1, Ordering::AcqRel);
        }));
    }

    /// Apply the stream-wide limits now (after an update, or by age).
    /// A bucket's `max_bytes` refuses new writes and never evicts, also
    /// when an update lowers it below what the bucket holds (as JetStream's
    /// `discard: new`).
    fn enforce_limits(&mut self, h: &Arc<StreamHandle>, max_evictions: Option<usize>) -> Result<()> {
        let mut config = h.config();
        if matches!(h.record.read().kind, StreamKind::Kv(_)) {
            config.max_bytes = None;
        }
        let mut txn = Txn::new(&self.db, h);
        let before = txn.st.messages;
        if let Some(keep) = config.max_msgs_per_subject {
            // Only needed after an update lowered the limit: walk the subjects.
            let subjects: Vec<String> = h
                .last
                .iter()
                .filter_map(|kv| kv.into_inner().ok())
                .filter(|(_, v)| crate::codec::decode_last(v).is_ok_and(|(_, c)| c > keep))
                .filter_map(|(k, _)| String::from_utf8(k.to_vec()).ok())
                .collect();
            for s in subjects {
                if let Ok(subject) = finmesh_core::Subject::new(s) {
                    txn.trim_subject(&subject, keep)?;
                }
            }
        }
        let now = Timestamp::now();
        let mut budget = max_evictions.unwrap_or(usize::MAX);
        limits_bounded(&config, &mut txn, now, &mut budget)?;
        if txn.st.messages != before {
            let st = txn.commit(&self.meta)?;
            h.after_commit(st);
            self.reveal(h, st, Vec::new());
        }
        Ok(())
    }

    /// Periodic work: interval fsyncs, age retention, consumer timers.
    fn housekeeping(&mut self) {
        self.housekeeping_at = Instant::now() + HOUSEKEEPING_EVERY;
        if self.poison.get().is_some() {
            return;
        }
        self.interval_fsync_if_due();
        let now = Timestamp::now();
        for h in self.registry.all() {
            let (max_age, front) = {
                let cfg = h.record.read().config.max_age;
                (cfg, h.committed_state().first_time)
            };
            if let (Some(age), Some(first)) = (max_age, front)
                && first < now.saturating_sub(age)
            {
                let r = self.enforce_limits(&h, Some(MAX_AGE_EVICTIONS));
                if let Err(e) = self.poison_on_err(r) {
                    tracing::error!(stream = %h.name, "age retention failed: {e}");
                    return;
                }
                self.committed(h.record.read().config.sync);
            }
        }
    }
}

/// max_msgs, max_bytes and max_age, evicting from the front.
fn limits(config: &finmesh_core::StreamConfig, txn: &mut Txn, now: Timestamp) -> Result<()> {
    let mut unbounded = usize::MAX;
    limits_bounded(config, txn, now, &mut unbounded)
}

fn limits_bounded(
    config: &finmesh_core::StreamConfig,
    txn: &mut Txn,
    now: Timestamp,
    budget: &mut usize,
) -> Result<()> {
    let cutoff = config.max_age.map(|a| now.saturating_sub(a));
    while *budget > 0 && txn.st.messages > 0 {
        let over_msgs = config.max_msgs.is_some_and(|m| txn.st.messages > m);
        let over_bytes = config.max_bytes.is_some_and(|b| txn.st.bytes > b);
        let too_old = match cutoff {
            Some(c) => txn.front_time()?.is_some_and(|t| t < c),
            None => false,
        };
        if !(over_msgs || over_bytes || too_old) {
            break;
        }
        txn.evict_front()?;
        *budget -= 1;
    }
    Ok(())
}
