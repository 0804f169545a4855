//! Tails: stored messages from a start sequence, then live ones, with no
//! gap and no duplicate at the join.
//!
//! The tail subscribes to the stream's live feed *before* reading the store,
//! so anything committed after the subscription arrives on the feed, and
//! anything before it is in the store. It delivers strictly increasing
//! sequences (`next` only moves forward), so overlap between the two is
//! dropped. If the feed lags or shows a sequence beyond `next` that the
//! store has not given yet, the tail goes back to reading the store. An
//! explicit start below the stream's first sequence yields a
//! [`TailEvent::Gap`]; `Seq(0)` starts at the first stored message.
//! Messages removed from the middle (per-subject limits, KV purge rollups)
//! are superseded, not lost history, and are not reported as gaps.
//!
//! Invariant: each tail is one task writing into a bounded channel; a slow
//! consumer slows only its own task (which then re-reads the store). Store
//! reads run on the blocking pool (filtered ones through the subject index,
//! see `filtered.rs`), never on the async workers.

use std::sync::Arc;

use finmesh_core::{BoxStream, Error, Message, ReadRequest, Result, Seq, SubjectPattern, TailEvent};
use tokio::sync::{broadcast, mpsc};

use crate::store::StreamHandle;

/// Items buffered per tail.
const TAIL_BUFFER: usize = 256;
/// Messages read from the store per step while catching up.
const CATCH_UP_BATCH: usize = 512;

pub(crate) fn start(h: Arc<StreamHandle>, from: Seq, filter: Option<SubjectPattern>) -> BoxStream<TailEvent> {
    let (tx, rx) = mpsc::channel(TAIL_BUFFER);
    let live = h.live.subscribe();
    // `Seq(0)` means "whatever is stored first": no gap for what retention removed.
    let from = if from == Seq(0) { h.state().first_seq } else { from };
    tokio::spawn(run(h, from, filter, live, tx));
    Box::pin(tokio_stream_from(rx))
}

fn tokio_stream_from(mut rx: mpsc::Receiver<Result<TailEvent>>) -> impl futures::Stream<Item = Result<TailEvent>> {
    futures::stream::poll_fn(move |cx| rx.poll_recv(cx))
}

type Tx = mpsc::Sender<Result<TailEvent>>;

async fn run(
    h: Arc<StreamHandle>,
    mut next: Seq,
    filter: Option<SubjectPattern>,
    mut live: broadcast::Receiver<crate::store::LiveBatch>,
    tx: Tx,
) {
    let ended = |h: &StreamHandle| Error::not_found(format!("stream `{}` was deleted or the engine closed", h.name));
    loop {
        // Catch up from the store until it has nothing at or after `next`.
        loop {
            if h.is_deleted() {
                let _ = tx.send(Err(ended(&h))).await;
                return;
            }
            let st = h.state();
            if next < st.first_seq {
                let to = Seq(st.first_seq.0 - 1);
                if tx.send(Ok(TailEvent::Gap { from: next, to })).await.is_err() {
                    return;
                }
                next = st.first_seq;
            }
            if next > st.last_seq {
                break;
            }
            let req =
                ReadRequest { filter: filter.clone(), ..ReadRequest::from_seq(next, CATCH_UP_BATCH) }.end(st.last_seq);
            let hh = h.clone();
            let batch = match crate::blocking(move || hh.read(&req)).await {
                Ok(b) => b,
                Err(e) => {
                    let _ = tx.send(Err(e)).await;
                    return;
                }
            };
            // Retention may have moved the front past `next` while we read.
            if let Some(first) = batch.first() {
                let front = h.state().first_seq;
                if first.seq > next && front > next {
                    let to = Seq(front.min(first.seq).0 - 1);
                    if tx.send(Ok(TailEvent::Gap { from: next, to })).await.is_err() {
                        return;
                    }
                }
            }
            let full = batch.len() == CATCH_UP_BATCH;
            for m in batch {
                next = m.seq.next();
                if tx.send(Ok(TailEvent::Message(m))).await.is_err() {
                    return;
                }
            }
            if !full {
                // Everything up to the last sequence we saw has been delivered.
                next = next.max(st.last_seq.next());
                break;
            }
        }
        // Follow the live feed until it lags or skips ahead.
        loop {
            match live.recv().await {
                Ok(batch) => {
                    if batch.is_empty() && h.is_deleted() {
                        let _ = tx.send(Err(ended(&h))).await;
                        return;
                    }
                    if batch.first().is_some_and(|m| m.seq > next) {
                        // The feed is ahead of us (we lagged or joined late): re-read the store.
                        break;
                    }
                    if !deliver(&batch, &mut next, &filter, &tx).await {
                        return;
                    }
                }
                Err(broadcast::error::RecvError::Lagged(_)) => break,
                Err(broadcast::error::RecvError::Closed) => {
                    let _ = tx.send(Err(ended(&h))).await;
                    return;
                }
            }
        }
    }
}

async fn deliver(batch: &[Message], next: &mut Seq, filter: &Option<SubjectPattern>, tx: &Tx) -> bool {
    for m in batch {
        if m.seq < *next {
            continue;
        }
        *next = m.seq.next();
        if filter.as_ref().is_none_or(|f| f.matches(&m.subject))
            && tx.send(Ok(TailEvent::Message(m.clone()))).await.is_err()
        {
            return false;
        }
    }
    true
}
