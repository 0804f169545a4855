//! Property test: random sequences of KV and stream operations run against
//! an engine and against the in-memory [`model`](super::model); every
//! result (sequences, revisions, values, messages, error kinds and reported
//! current revisions) must agree, and so must the final `stream_info` and
//! `bucket_info`.
//!
//! Each proptest case starts a fresh engine through the [`Harness`] on its
//! own runtime. The number of cases is 64, or `FINMESH_PROPTEST_CASES`.
//! Failures shrink to a minimal operation list, printed with the step that
//! disagreed.

use std::fmt::Debug;

use bytes::Bytes;
use proptest::prelude::*;
use proptest::test_runner::{Config, TestCaseError, TestError, TestRunner};

use crate::testsuite::model::{KvModel, ModelEntry, ModelError, ModelMessage, StreamModel};
use crate::testsuite::support::{bucket, key, pat, sn, stream_config, subj};
use crate::testsuite::{Difference, Harness, differs};
use crate::{BucketConfig, Engine, KvEntry, Message, OutgoingMessage, ReadRequest, Result, Revision, Seq};

const KEYS: [&str; 4] = ["a", "a.b", "ab", "b"];
const PREFIXES: [&str; 5] = ["", "a", "a.", "b", "z"];
const SUBJECTS: [&str; 4] = ["p.a", "p.b", "p.c.d", "q.x"];
const FILTERS: [&str; 5] = ["p.*", "p.>", "p.a", "p.c.*", ">"];
const HISTORY: u8 = 3;
const MAX_VALUE: u32 = 64;
const MAX_MSGS: u64 = 16;
const MAX_MSG_SIZE: u32 = 128;

fn value(i: u8) -> Bytes {
    match i {
        0 => Bytes::new(),
        1 => Bytes::from_static(b"x"),
        2 => Bytes::from_static(b"hello"),
        3 => Bytes::from(vec![b'm'; MAX_VALUE as usize]),
        _ => Bytes::from(vec![b'L'; MAX_VALUE as usize + 1]),
    }
}

fn payload(i: u8) -> Bytes {
    match i {
        0 => Bytes::new(),
        1 => Bytes::from_static(b"x"),
        2 => Bytes::from_static(b"payload"),
        3 => Bytes::from(vec![b'p'; 96]),
        _ => Bytes::from(vec![b'P'; 200]),
    }
}

/// How an update names its expected revision.
#[derive(Debug, Clone, Copy)]
pub enum Expected {
    /// The key's current latest revision (usually succeeds).
    Current,
    /// `Revision(0)`.
    Zero,
    /// A fixed revision (usually stale or wrong).
    Fixed(u8),
}

/// One random operation.
#[derive(Debug, Clone)]
pub enum Op {
    /// `kv_put`.
    Put(u8, u8),
    /// `kv_create`.
    Create(u8, u8),
    /// `kv_update`.
    Update(u8, u8, Expected),
    /// `kv_delete`.
    Delete(u8),
    /// `kv_purge`.
    Purge(u8),
    /// `kv_get`.
    Get(u8),
    /// `kv_get_revision`.
    GetRevision(u8, u8),
    /// `kv_history`.
    History(u8),
    /// `kv_keys`.
    Keys(u8),
    /// `publish` of (subject, payload, msg id).
    Publish(u8, u8, Option<u8>),
    /// `publish_batch`.
    PublishBatch(Vec<(u8, u8, Option<u8>)>),
    /// `read` from a sequence, with a limit and maybe a filter.
    Read(u8, u8, Option<u8>),
    /// `get_message`.
    GetMessage(u8),
    /// `last_message`.
    LastMessage(u8),
    /// `last_per_subject`.
    LastPerSubject(Option<u8>),
}

fn message() -> impl Strategy<Value = (u8, u8, Option<u8>)> {
    // Subject `q.x` (not captured) and the oversized payload are rare; an
    // oversized payload carries no id (the order of the size and dedup
    // checks is left open by the contract).
    (prop_oneof![9 => 0..3u8, 1 => Just(3u8)], prop_oneof![9 => 0..4u8, 1 => Just(4u8)], proptest::option::of(0..6u8))
        .prop_map(|(s, p, id)| (s, p, if p == 4 { None } else { id }))
}

fn op() -> impl Strategy<Value = Op> {
    let k = || 0..KEYS.len() as u8;
    let v = || prop_oneof![9 => 0..4u8, 1 => Just(4u8)];
    let expected =
        prop_oneof![6 => Just(Expected::Current), 1 => Just(Expected::Zero), 2 => (0..40u8).prop_map(Expected::Fixed)];
    prop_oneof![
        6 => (k(), v()).prop_map(|(k, v)| Op::Put(k, v)),
        3 => (k(), v()).prop_map(|(k, v)| Op::Create(k, v)),
        4 => (k(), v(), expected).prop_map(|(k, v, x)| Op::Update(k, v, x)),
        2 => k().prop_map(Op::Delete),
        1 => k().prop_map(Op::Purge),
        3 => k().prop_map(Op::Get),
        2 => (k(), 0..40u8).prop_map(|(k, r)| Op::GetRevision(k, r)),
        2 => k().prop_map(Op::History),
        2 => (0..PREFIXES.len() as u8).prop_map(Op::Keys),
        8 => message().prop_map(|(s, p, id)| Op::Publish(s, p, id)),
        2 => proptest::collection::vec(message(), 0..5).prop_map(Op::PublishBatch),
        3 => (0..40u8, 1..8u8, proptest::option::of(0..FILTERS.len() as u8)).prop_map(|(f, l, x)| Op::Read(f, l, x)),
        2 => (0..40u8).prop_map(Op::GetMessage),
        2 => (0..SUBJECTS.len() as u8 - 1).prop_map(Op::LastMessage),
        1 => proptest::option::of(0..FILTERS.len() as u8).prop_map(Op::LastPerSubject),
    ]
}

/// Run the property for `H`: 64 random operation lists (or
/// `FINMESH_PROPTEST_CASES`), each on a fresh engine.
pub fn engine_matches_model<H: Harness>() {
    let cases = std::env::var("FINMESH_PROPTEST_CASES").ok().and_then(|v| v.parse().ok()).unwrap_or(64);
    let config = Config { cases, failure_persistence: None, max_shrink_iters: 512, ..Config::default() };
    let mut runner = TestRunner::new(config);
    let result = runner.run(&proptest::collection::vec(op(), 1..60), |ops| {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .expect("build the test runtime");
        rt.block_on(run_ops::<H>(&ops)).map_err(TestCaseError::fail)
    });
    match result {
        Ok(()) => {}
        Err(TestError::Fail(reason, ops)) => {
            panic!("engine and model disagree: {reason}\nminimal failing operations: {ops:#?}")
        }
        Err(err) => panic!("property test aborted: {err}"),
    }
}

/// A result reduced to what can be compared with the model.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Seen<T> {
    Ok(T),
    Err(crate::ErrorKind, Option<u64>),
}

fn seen<T, U>(r: Result<T>, f: impl FnOnce(T) -> U) -> Seen<U> {
    match r {
        Ok(v) => Seen::Ok(f(v)),
        Err(e) => Seen::Err(e.kind(), e.current_revision().map(|r| r.0)),
    }
}

fn agree<T: PartialEq + Debug>(
    step: usize,
    op: &Op,
    model: std::result::Result<T, ModelError>,
    engine: Seen<T>,
) -> std::result::Result<(), String> {
    let ok = match (&model, &engine) {
        (Ok(m), Seen::Ok(e)) => m == e,
        (Err(m), Seen::Err(kind, current)) => {
            m.kinds.contains(kind) && (*kind != crate::ErrorKind::WrongRevision || *current == m.current)
        }
        _ => false,
    };
    if ok { Ok(()) } else { Err(format!("step {step} {op:?}: model {model:?}, engine {engine:?}")) }
}

fn entry_view(e: KvEntry) -> ModelEntry {
    ModelEntry { key: e.key.to_string(), value: e.value, revision: e.revision.0, op: e.op }
}

fn msg_view(m: Message) -> ModelMessage {
    let msg_id = m.headers.get(crate::message::MSG_ID_HEADER).map(str::to_owned);
    ModelMessage { seq: m.seq.0, size: m.size() as u64, subject: m.subject, payload: m.payload, msg_id }
}

fn outgoing((s, p, id): (u8, u8, Option<u8>)) -> OutgoingMessage {
    let m = OutgoingMessage::new(subj(SUBJECTS[s as usize]), payload(p));
    match id {
        Some(id) => m.with_msg_id(format!("id-{id}")).expect("valid id"),
        None => m,
    }
}

async fn run_ops<H: Harness>(ops: &[Op]) -> std::result::Result<(), String> {
    let h = H::start().await;
    let e: std::sync::Arc<dyn Engine> = h.engine();
    let (b, s) = (bucket("prop"), sn("PROP"));
    let bucket_config =
        BucketConfig { history: HISTORY, max_value_size: Some(MAX_VALUE), ..BucketConfig::new(b.clone()) };
    e.create_bucket(bucket_config).await.map_err(|e| format!("create bucket: {e}"))?;
    let mut sc = stream_config("PROP", &["p.>"]);
    (sc.max_msgs, sc.max_msg_size) = (Some(MAX_MSGS), Some(MAX_MSG_SIZE));
    e.create_stream(sc).await.map_err(|e| format!("create stream: {e}"))?;
    let mut kv = KvModel::new(HISTORY, MAX_VALUE);
    let mut st = StreamModel::new(vec![pat("p.>")], Some(MAX_MSGS), MAX_MSG_SIZE);
    for (step, op) in ops.iter().enumerate() {
        let k = |i: &u8| KEYS[*i as usize];
        match op {
            Op::Put(i, v) => {
                let r = e.kv_put(&b, &key(k(i)), value(*v)).await;
                agree(step, op, kv.put(k(i), value(*v)), seen(r, |r| r.0))?;
            }
            Op::Create(i, v) => {
                let r = e.kv_create(&b, &key(k(i)), value(*v)).await;
                agree(step, op, kv.create(k(i), value(*v)), seen(r, |r| r.0))?;
            }
            Op::Update(i, v, x) => {
                let expected = match x {
                    Expected::Current => kv.current_revision(k(i)),
                    Expected::Zero => 0,
                    Expected::Fixed(r) => *r as u64,
                };
                let r = e.kv_update(&b, &key(k(i)), value(*v), Revision(expected)).await;
                agree(step, op, kv.update(k(i), value(*v), expected), seen(r, |r| r.0))?;
            }
            Op::Delete(i) => {
                let r = e.kv_delete(&b, &key(k(i))).await;
                agree(step, op, Ok(kv.delete(k(i))), seen(r, |r| r.0))?;
            }
            Op::Purge(i) => {
                let r = e.kv_purge(&b, &key(k(i))).await;
                agree(step, op, Ok(kv.purge(k(i))), seen(r, |r| r.0))?;
            }
            Op::Get(i) => {
                let r = e.kv_get(&b, &key(k(i))).await;
                agree(step, op, Ok(kv.get(k(i))), seen(r, |x| x.map(entry_view)))?;
            }
            Op::GetRevision(i, rev) => {
                let r = e.kv_get_revision(&b, &key(k(i)), Revision(*rev as u64)).await;
                agree(step, op, Ok(kv.get_revision(k(i), *rev as u64)), seen(r, |x| x.map(entry_view)))?;
            }
            Op::History(i) => {
                let r = e.kv_history(&b, &key(k(i))).await;
                agree(step, op, Ok(kv.history(k(i))), seen(r, |h| h.into_iter().map(entry_view).collect()))?;
            }
            Op::Keys(p) => {
                let prefix = PREFIXES[*p as usize];
                let r = e.kv_keys(&b, prefix).await;
                agree(step, op, Ok(kv.keys(prefix)), seen(r, |ks| ks.iter().map(|k| k.to_string()).collect()))?;
            }
            Op::Publish(sub, p, id) => {
                let m = outgoing((*sub, *p, *id));
                let r = e.publish(&s, m.clone()).await;
                agree(step, op, st.publish(&m), seen(r, |a| a))?;
            }
            Op::PublishBatch(msgs) => {
                let ms: Vec<_> = msgs.iter().copied().map(outgoing).collect();
                let r = e.publish_batch(&s, ms.clone()).await;
                agree(step, op, st.publish_batch(&ms), seen(r, |a| a))?;
            }
            Op::Read(from, limit, filter) => {
                let filter = filter.map(|f| pat(FILTERS[f as usize]));
                let mut req = ReadRequest::from_seq(Seq(*from as u64), *limit as usize);
                req.filter = filter.clone();
                let r = e.read(&s, req).await;
                let want = st.read(*from as u64, *limit as usize, filter.as_ref());
                agree(step, op, Ok(want), seen(r, |ms| ms.into_iter().map(msg_view).collect()))?;
            }
            Op::GetMessage(seq) => {
                let r = e.get_message(&s, Seq(*seq as u64)).await;
                agree(step, op, st.get(*seq as u64), seen(r, msg_view))?;
            }
            Op::LastMessage(sub) => {
                let subject = subj(SUBJECTS[*sub as usize]);
                let r = e.last_message(&s, &subject).await;
                agree(step, op, st.last_message(&subject), seen(r, msg_view))?;
            }
            Op::LastPerSubject(filter) => {
                let filter = filter.map(|f| pat(FILTERS[f as usize]));
                let r = e.last_per_subject(&s, filter.as_ref()).await;
                let want = st.last_per_subject(filter.as_ref());
                agree(step, op, Ok(want), seen(r, |ms| ms.into_iter().map(msg_view).collect()))?;
            }
        }
    }
    let end = ops.len();
    let info = e.stream_info(&s).await.map(|i| {
        let x = i.state;
        (x.messages, x.bytes, x.first_seq.0, x.last_seq.0)
    });
    let mut want = st.state();
    if differs::<H>(Difference::StoredBytesIncludeOverhead) {
        // Bytes are the engine's own count; everything else must agree.
        if let Ok(got) = &info {
            want.1 = got.1;
        }
    }
    agree(end, &Op::LastPerSubject(None), Ok(want), seen(info, |x| x)).map_err(|m| format!("stream_info: {m}"))?;
    let info = e.bucket_info(&b).await.map(|i| (i.entries, i.last_revision.0));
    agree(end, &Op::Keys(0), Ok(kv.info()), seen(info, |x| x)).map_err(|m| format!("bucket_info: {m}"))?;
    Ok(())
}
