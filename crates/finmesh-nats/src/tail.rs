//! Tails of streams and watches of KV buckets: one background task per
//! tail that follows an ephemeral consumer and feeds a bounded channel.
//!
//! The task is its own ordered consumer: it remembers the last stream
//! sequence it handed on, and whenever something goes wrong (the pull
//! request ends without an answer, heartbeats stop, the connection was
//! re-established, the server restarted and forgot the in-memory consumer)
//! it drops the consumer and creates a new one from `last + 1`. So a tail
//! or a watch survives reconnects with no gap and no duplicate, which
//! async-nats's own KV watcher does not. If the stream itself is gone the
//! tail yields an error and ends. The task ends when the receiver is
//! dropped.
//!
//! Gaps: a tail from sequence `n > 0` that starts (or resumes) below the
//! stream's first sequence yields `Gap { n, first - 1 }`. Without a filter,
//! a jump in delivered sequences is a gap too (every sequence matches); with
//! a filter a jump is normal and only the start/resume check applies. A
//! message stored by a foreign client on a subject finmesh cannot represent
//! (a [`Subject`] is printable ASCII) is a one-message gap of its own, and
//! skipped by watches.

use std::sync::Arc;
use std::time::Duration;

use async_nats::StatusCode;
use finmesh_core::{
    BoxStream, BucketName, Error, ErrorKind, KvEntry, Message, Result, Seq, StreamName, Subject, SubjectPattern,
    TailEvent, WatchStart,
};
use futures::StreamExt;
use serde_json::{Value, json};
use tokio::sync::mpsc;

use crate::api::{headers_from, parse_ack_subject};
use crate::{Inner, kv};

/// Queue between the task and the consumer of a tail.
const QUEUE: usize = 512;
/// Messages asked for per pull request.
const PULL_BATCH: usize = 256;
/// Lifetime of one pull request and heartbeat interval.
const PULL_EXPIRES: Duration = Duration::from_secs(10);
const HEARTBEAT: Duration = Duration::from_secs(1);

/// Where a follower starts.
#[derive(Clone, Copy)]
enum Start {
    All,
    From(u64),
    New,
    LastPerSubject,
}

enum Item {
    Msg(Message),
    Gap(u64, u64),
}

struct Follower {
    inner: Arc<Inner>,
    stream: String,
    filter: Option<String>,
    /// Report gaps (tails) or not (watches).
    gaps: bool,
    tx: mpsc::Sender<Result<Item>>,
}

impl Follower {
    fn config(&self, start: Start) -> Value {
        let mut c = json!({
            "ack_policy": "none",
            "mem_storage": true,
            "num_replicas": 1,
            "inactive_threshold": 30_000_000_000u64,
        });
        match start {
            Start::All => c["deliver_policy"] = json!("all"),
            Start::From(s) => {
                c["deliver_policy"] = json!("by_start_sequence");
                c["opt_start_seq"] = json!(s.max(1));
            }
            Start::New => c["deliver_policy"] = json!("new"),
            Start::LastPerSubject => c["deliver_policy"] = json!("last_per_subject"),
        }
        match (&self.filter, start) {
            (Some(f), _) => c["filter_subject"] = json!(f),
            (None, Start::LastPerSubject) => c["filter_subject"] = json!(">"),
            _ => {}
        }
        c
    }

    /// Create a consumer; `Err` only if the stream is gone.
    async fn create(&self, start: Start) -> Result<Option<String>> {
        #[derive(serde::Deserialize)]
        struct Created {
            name: String,
        }
        let body = json!({ "stream_name": self.stream, "config": self.config(start) });
        let what = format!("tail stream `{}`", self.stream);
        match self.inner.request::<Created>(&format!("CONSUMER.CREATE.{}", self.stream), &body, &what).await {
            Ok(c) => Ok(Some(c.name)),
            Err(e) if e.kind() == ErrorKind::NotFound => Err(e),
            Err(e) => {
                tracing::debug!(error = %e, "tail: consumer create failed; retrying");
                Ok(None)
            }
        }
    }

    /// A gap between `next` (the first sequence still wanted) and the stream's first.
    /// Reports it and moves `next` past it.
    async fn start_gap(&self, next: &mut u64) -> Result<()> {
        if !self.gaps || *next == 0 {
            return Ok(());
        }
        let info = self.inner.raw_stream_info(&self.stream).await?;
        let first = info.state.first_sequence;
        if *next < first {
            let to = (first - 1).min(info.state.last_sequence.max(*next));
            if self.tx.send(Ok(Item::Gap(*next, to))).await.is_err() {
                return Err(Error::internal("tail closed"));
            }
            *next = to + 1;
        }
        Ok(())
    }

    async fn run(self, mut start: Start, mut next: u64, mut first: Option<String>) {
        let mut last_delivered: Option<u64> = None;
        let mut pause = Duration::from_millis(50);
        loop {
            if self.tx.is_closed() {
                return;
            }
            if let Err(e) = self.start_gap(&mut next).await {
                let kind = e.kind();
                if kind == ErrorKind::NotFound {
                    let _ = self.tx.send(Err(e)).await;
                }
                if kind != ErrorKind::Unavailable && kind != ErrorKind::Timeout {
                    return;
                }
            }
            let created = match first.take() {
                Some(n) => Ok(Some(n)),
                None => self.create(start).await,
            };
            let name = match created {
                Ok(Some(n)) => n,
                Ok(None) => {
                    tokio::time::sleep(pause).await;
                    pause = (pause * 2).min(Duration::from_secs(2));
                    continue;
                }
                Err(e) => {
                    let _ = self.tx.send(Err(e)).await;
                    return;
                }
            };
            let (before, since) = (last_delivered, tokio::time::Instant::now());
            match self.follow(&name, &mut next, &mut last_delivered).await {
                Ok(()) => return,
                Err(e) => tracing::debug!(error = %e, "tail: consumer lost; resuming"),
            }
            // Back off while consumers keep failing at once, delivering nothing.
            if last_delivered == before && since.elapsed() < PULL_EXPIRES {
                tokio::time::sleep(pause).await;
                pause = (pause * 2).min(Duration::from_secs(2));
            } else {
                pause = Duration::from_millis(50);
            }
            let _ = self
                .inner
                .client
                .publish(format!("{}.CONSUMER.DELETE.{}.{name}", self.inner.prefix, self.stream), bytes::Bytes::new())
                .await;
            if let Some(l) = last_delivered {
                next = l + 1;
            }
            start = if next == 0 {
                match start {
                    Start::New | Start::LastPerSubject if last_delivered.is_none() => start,
                    _ => Start::All,
                }
            } else {
                Start::From(next)
            };
        }
    }

    /// Pull from `consumer` until it fails (`Err`: resume) or the receiver is gone (`Ok`).
    async fn follow(&self, consumer: &str, next: &mut u64, last: &mut Option<u64>) -> Result<()> {
        let client = &self.inner.client;
        let inbox = client.new_inbox();
        let mut sub = client.subscribe(inbox.clone()).await.map_err(|e| Error::unavailable(e.to_string()))?;
        let body = serde_json::to_vec(&json!({
            "batch": PULL_BATCH,
            "expires": PULL_EXPIRES.as_nanos() as u64,
            "idle_heartbeat": HEARTBEAT.as_nanos() as u64,
        }))
        .map_err(|e| Error::internal(e.to_string()))?;
        let subject = format!("{}.CONSUMER.MSG.NEXT.{}.{consumer}", self.inner.prefix, self.stream);
        loop {
            client
                .publish_with_reply(subject.clone(), inbox.clone(), body.clone().into())
                .await
                .map_err(|e| Error::unavailable(e.to_string()))?;
            let mut got = 0;
            while got < PULL_BATCH {
                let msg = match tokio::time::timeout(HEARTBEAT * 3, sub.next()).await {
                    Ok(Some(m)) => m,
                    Ok(None) => return Err(Error::unavailable("subscription closed")),
                    Err(_) => return Err(Error::unavailable("heartbeats stopped")),
                };
                if self.tx.is_closed() {
                    return Ok(());
                }
                match msg.status {
                    Some(StatusCode::IDLE_HEARTBEAT) => continue,
                    Some(StatusCode::TIMEOUT) | Some(StatusCode::NOT_FOUND) => break,
                    Some(s) if msg.reply.is_none() => {
                        return Err(Error::unavailable(format!("pull ended with {s} {:?}", msg.description)));
                    }
                    _ => {}
                }
                let Some(ack) = msg.reply.as_ref().and_then(|r| parse_ack_subject(r.as_str())) else { continue };
                got += 1;
                let seq = ack.stream_seq;
                if last.is_some_and(|l| seq <= l) {
                    continue;
                }
                if self.gaps
                    && self.filter.is_none()
                    && *next > 0
                    && seq > *next
                    && self.tx.send(Ok(Item::Gap(*next, seq - 1))).await.is_err()
                {
                    return Ok(());
                }
                let subject = match Subject::new(msg.subject.as_str()) {
                    Ok(subject) => subject,
                    Err(e) => {
                        // A foreign client's message on a subject finmesh
                        // cannot represent (e.g. non-ASCII): a one-message
                        // gap, never a consumer re-created on it for ever.
                        tracing::warn!(stream = %self.stream, seq, error = %e, "tail: skipping a message whose subject finmesh cannot represent");
                        *last = Some(seq);
                        *next = seq + 1;
                        if self.gaps && self.tx.send(Ok(Item::Gap(seq, seq))).await.is_err() {
                            return Ok(());
                        }
                        continue;
                    }
                };
                let m = Message {
                    seq: Seq(seq),
                    subject,
                    headers: headers_from(msg.headers.as_ref()),
                    payload: msg.payload,
                    time: ack.time,
                };
                *last = Some(seq);
                *next = seq + 1;
                if self.tx.send(Ok(Item::Msg(m))).await.is_err() {
                    return Ok(());
                }
            }
        }
    }
}

/// Create the first consumer (so a `New` start is fixed when this returns,
/// and a missing stream fails here), then hand over to the task.
async fn spawn(
    inner: Arc<Inner>,
    stream: String,
    filter: Option<String>,
    gaps: bool,
    start: Start,
    next: u64,
) -> Result<mpsc::Receiver<Result<Item>>> {
    let (tx, rx) = mpsc::channel(QUEUE);
    let f = Follower { inner, stream, filter, gaps, tx };
    let first = f.create(start).await?;
    tokio::spawn(f.run(start, next, first));
    Ok(rx)
}

fn receiver_stream<T: Send + 'static>(
    rx: mpsc::Receiver<Result<Item>>,
    map: impl Fn(Item) -> Option<Result<T>> + Send + 'static,
) -> BoxStream<T> {
    Box::pin(futures::stream::unfold((rx, map), |(mut rx, map)| async move {
        loop {
            match rx.recv().await? {
                Err(e) => return Some((Err(e), (rx, map))),
                Ok(item) => {
                    if let Some(v) = map(item) {
                        return Some((v, (rx, map)));
                    }
                }
            }
        }
    }))
}

pub(crate) async fn tail(
    inner: Arc<Inner>,
    stream: &StreamName,
    from: Seq,
    filter: Option<SubjectPattern>,
) -> Result<BoxStream<TailEvent>> {
    inner.stream_meta(stream).await?;
    let start = if from.0 == 0 { Start::All } else { Start::From(from.0) };
    let rx = spawn(inner, stream.to_string(), filter.map(|f| f.to_string()), true, start, from.0).await?;
    Ok(receiver_stream(rx, |item| {
        Some(Ok(match item {
            Item::Msg(m) => TailEvent::Message(m),
            Item::Gap(a, b) => TailEvent::Gap { from: Seq(a), to: Seq(b) },
        }))
    }))
}

pub(crate) async fn watch(
    inner: Arc<Inner>,
    bucket: &BucketName,
    prefix: &str,
    start: WatchStart,
) -> Result<BoxStream<KvEntry>> {
    inner.bucket_limit(bucket).await?;
    let stream = kv::stream_name(bucket);
    let key_prefix = kv::subject_prefix(bucket);
    // A prefix of whole tokens narrows the server-side filter.
    let filter = if prefix.is_empty() || prefix.ends_with('.') {
        format!("{key_prefix}{prefix}>")
    } else {
        format!("{key_prefix}>")
    };
    let (start, next) = match start {
        WatchStart::LatestValues => (Start::LastPerSubject, 0),
        WatchStart::FromRevision(r) if r.0 == 0 => (Start::All, 0),
        WatchStart::FromRevision(r) => (Start::From(r.0), r.0),
        WatchStart::New => (Start::New, 0),
    };
    let rx = spawn(inner, stream, Some(filter), false, start, next).await?;
    let prefix = prefix.to_owned();
    Ok(receiver_stream(rx, move |item| match item {
        Item::Gap(..) => None,
        Item::Msg(m) => match kv::entry_from(&key_prefix, m) {
            Ok(e) if e.key.as_str().starts_with(&prefix) => Some(Ok(e)),
            Ok(_) => None,
            Err(e) => Some(Err(e)),
        },
    }))
}
