//! The NATS engine on a real 3-node JetStream cluster (test kit
//! `NatsCluster`), with replicated (R3) streams and buckets, while nodes are
//! killed with SIGKILL and restarted on their stores:
//!
//! - killing the stream leader during a publish load from several tasks:
//!   publishing continues after an election, every call ends in an ack or an
//!   error, and the stream afterwards holds every acked message once, in
//!   order, without holes;
//! - killing two of three nodes: writes fail with `Unavailable` within the
//!   request timeout; one node back and writes resume, nothing acked lost;
//! - a restarted node catches up (asked directly through its own `/jsz`);
//! - a KV put acked before a leader kill is read afterwards at its revision;
//! - R3 KV reads through a follower (direct gets) see
//!   the engine's own writes at once (on loopback the follower is never
//!   behind, so this one alone does not prove much);
//! - the same through a replica that really lags (a node whose routes pass
//!   delay proxies with jitter): reads must never return a revision older
//!   than the one just written, KV keys and history must include it, and
//!   stream range and last-per-subject reads right after an ack must
//!   include it.
//!
//! No fixed sleeps: every wait polls a condition with a deadline.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use bytes::Bytes;
use finmesh_core::{
    BucketConfig, BucketName, ConsumerConfig, ConsumerEngine, ConsumerName, ErrorKind, FetchRequest, Key, KvEngine,
    KvOp, Message, OutgoingMessage, ReadRequest, Revision, Seq, StreamConfig, StreamEngine, StreamName, Subject,
    SubjectPattern,
};
use finmesh_nats::{NatsEngine, NatsEngineOptions};
use finmesh_testkit::probe::jsz_last_seq;
use finmesh_testkit::{ManagedServer, NatsCluster};
use parking_lot::Mutex;

/// Request timeout of the engines in these tests: long enough to ride out
/// most of an election inside the engine's own retries, short enough that
/// the two-nodes-down case answers quickly.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(3);
/// Upper bound on any wait in these tests.
const DEADLINE: Duration = Duration::from_secs(30);

async fn cluster() -> NatsCluster {
    NatsCluster::start(3).await.expect("start a 3-node nats cluster")
}

async fn engine_on(urls: Vec<String>) -> NatsEngine {
    let mut options = NatsEngineOptions::new(urls[0].clone());
    options.servers = urls;
    options.request_timeout = REQUEST_TIMEOUT;
    NatsEngine::connect(options).await.expect("connect the engine")
}

async fn r3_stream(engine: &NatsEngine, name: &str) -> StreamName {
    let s = StreamName::new(name).unwrap();
    let mut config =
        StreamConfig::new(s.clone(), vec![SubjectPattern::new(format!("{}.>", name.to_lowercase())).unwrap()]);
    config.replicas = 3;
    engine.create_stream(config).await.expect("create an R3 stream");
    s
}

/// Index in the cluster of the node leading the raw JetStream stream `name`
/// (`KV_<bucket>` for a bucket), polled until the stream has a leader.
async fn leader_of(cluster: &NatsCluster, client: &async_nats::Client, name: &str) -> usize {
    cluster.stream_leader(client, name, DEADLINE).await.unwrap_or_else(|| panic!("stream {name} has no leader"))
}

/// Every message of `stream`, read through the engine (retried until the
/// stream answers, e.g. right after an election).
async fn read_all(engine: &NatsEngine, stream: &StreamName) -> Vec<Message> {
    let deadline = Instant::now() + DEADLINE;
    'again: loop {
        let mut out: Vec<Message> = Vec::new();
        loop {
            let from = out.last().map_or(Seq(1), |m| Seq(m.seq.0 + 1));
            match engine.read(stream, ReadRequest::from_seq(from, 5_000)).await {
                Ok(batch) if batch.is_empty() => return out,
                Ok(batch) => out.extend(batch),
                Err(e) => {
                    assert!(Instant::now() < deadline, "reading {stream} kept failing: {e:?}");
                    continue 'again;
                }
            }
        }
    }
}

/// One acked publish of the load: publisher, its counter, the stored seq, when.
#[derive(Debug, Clone, Copy)]
struct Acked {
    task: u64,
    i: u64,
    seq: u64,
    at: Instant,
}

/// A publish load: `tasks` publishers, each publishing `t<task>-<i>` for
/// i = 0, 1, … with the message id of the same name, one at a time, retrying
/// a failed message (same id) until it is acked. Every call must end within
/// twice the request timeout: an ack or an error, never silence.
struct Load {
    stop: Arc<AtomicBool>,
    acked: Arc<Mutex<Vec<Acked>>>,
    errors: Arc<Mutex<Vec<(ErrorKind, String)>>>,
    count: Arc<AtomicU64>,
    handles: Vec<tokio::task::JoinHandle<()>>,
}

impl Load {
    fn start(engine: &NatsEngine, stream: &StreamName, tasks: u64) -> Load {
        let stop = Arc::new(AtomicBool::new(false));
        let acked = Arc::new(Mutex::new(Vec::new()));
        let errors = Arc::new(Mutex::new(Vec::new()));
        let count = Arc::new(AtomicU64::new(0));
        let subject_root = stream.as_str().to_lowercase();
        let handles = (0..tasks)
            .map(|task| {
                let (engine, stream) = (engine.clone(), stream.clone());
                let (stop, acked, errors, count) = (stop.clone(), acked.clone(), errors.clone(), count.clone());
                let subject: Subject = format!("{subject_root}.t{task}").parse().unwrap();
                tokio::spawn(async move {
                    let mut i = 0;
                    while !stop.load(Ordering::Relaxed) {
                        let id = format!("t{task}-{i}");
                        let msg =
                            OutgoingMessage::new(subject.clone(), Bytes::from(id.clone())).with_msg_id(&id).unwrap();
                        let call = tokio::time::timeout(2 * REQUEST_TIMEOUT, engine.publish(&stream, msg)).await;
                        match call.unwrap_or_else(|_| panic!("publish of {id} neither acked nor failed: silence")) {
                            Ok(ack) => {
                                acked.lock().push(Acked { task, i, seq: ack.seq.0, at: Instant::now() });
                                count.fetch_add(1, Ordering::Relaxed);
                                i += 1;
                            }
                            Err(e) => errors.lock().push((e.kind(), e.to_string())),
                        }
                    }
                })
            })
            .collect();
        Load { stop, acked, errors, count, handles }
    }

    /// Wait until `n` more acks than now arrived.
    async fn wait_acks(&self, n: u64, what: &str) {
        let target = self.count.load(Ordering::Relaxed) + n;
        let deadline = Instant::now() + DEADLINE;
        while self.count.load(Ordering::Relaxed) < target {
            assert!(
                Instant::now() < deadline,
                "{what}: {} of {n} acks in {DEADLINE:?}; errors: {:?}",
                target - self.count.load(Ordering::Relaxed),
                self.errors.lock().iter().rev().take(3).collect::<Vec<_>>()
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    async fn finish(self) -> (Vec<Acked>, Vec<(ErrorKind, String)>) {
        self.stop.store(true, Ordering::Relaxed);
        for h in self.handles {
            h.await.expect("publisher panicked");
        }
        let acked = std::mem::take(&mut *self.acked.lock());
        let errors = std::mem::take(&mut *self.errors.lock());
        (acked, errors)
    }
}

/// The stream holds sequences 1..=last without holes, every message id
/// once, each publisher's messages in publish order with none missing, and
/// every acked message at its acked sequence.
fn check_stream(stored: &[Message], acked: &[Acked]) {
    for (k, m) in stored.iter().enumerate() {
        assert_eq!(m.seq.0, k as u64 + 1, "hole or disorder in the stream before seq {}", m.seq);
    }
    let mut by_id: HashMap<&str, u64> = HashMap::new();
    let mut next_of_task: HashMap<String, u64> = HashMap::new();
    for m in stored {
        let id = m.headers.get(finmesh_core::message::MSG_ID_HEADER).expect("every message has an id");
        assert!(by_id.insert(id, m.seq.0).is_none(), "message {id} stored twice");
        assert_eq!(&m.payload[..], id.as_bytes());
        let (task, i) = id.split_once('-').unwrap();
        let i: u64 = i.parse().unwrap();
        let next = next_of_task.entry(task.to_owned()).or_default();
        assert_eq!(i, *next, "publisher {task}: message {i} stored where {next} was due");
        *next += 1;
    }
    for a in acked {
        let id = format!("t{}-{}", a.task, a.i);
        assert_eq!(by_id.get(id.as_str()), Some(&a.seq), "acked {id} (seq {}) is not stored at its seq", a.seq);
    }
}

/// The longest time between two consecutive acks (of any publisher) after `from`.
fn longest_gap_after(acked: &[Acked], from: Instant) -> Duration {
    let mut times: Vec<Instant> = acked.iter().map(|a| a.at).filter(|t| *t >= from).collect();
    times.sort();
    let first = times.first().map_or(Duration::MAX, |t| t.duration_since(from));
    times.windows(2).map(|w| w[1].duration_since(w[0])).fold(first, Duration::max)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killing_the_stream_leader_loses_and_duplicates_nothing() {
    let mut cluster = cluster().await;
    let engine = engine_on(cluster.urls()).await;
    let stream = r3_stream(&engine, "ORDERS").await;
    let load = Load::start(&engine, &stream, 4);
    load.wait_acks(200, "before the kill").await;

    let leader = leader_of(&cluster, engine.client(), "ORDERS").await;
    let killed_at = Instant::now();
    cluster.node_mut(leader).kill().await.unwrap();
    load.wait_acks(400, "after killing the leader").await;
    let (acked, errors) = load.finish().await;

    let stall = longest_gap_after(&acked, killed_at);
    let new_leader = leader_of(&cluster, engine.client(), "ORDERS").await;
    eprintln!(
        "leader n{} killed: longest gap between acks {stall:?}; {} acks, {} errors {:?}; new leader n{}",
        leader + 1,
        acked.len(),
        errors.len(),
        errors.iter().map(|(k, _)| *k).collect::<HashSet<_>>(),
        new_leader + 1
    );
    assert_ne!(new_leader, leader);
    assert!(stall < Duration::from_secs(20), "publishing stalled {stall:?}");
    for (kind, msg) in &errors {
        assert!(matches!(kind, ErrorKind::Unavailable | ErrorKind::Timeout), "unexpected error {kind}: {msg}");
    }
    let stored = read_all(&engine, &stream).await;
    check_stream(&stored, &acked);
    assert!(stored.len() >= acked.len());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_nodes_down_is_unavailable_and_writes_resume_with_one_back() {
    let mut cluster = cluster().await;
    let engine = engine_on(cluster.urls()).await;
    let stream = r3_stream(&engine, "PAYMENTS").await;
    let msg = |i: u64| {
        OutgoingMessage::new("payments.a".parse().unwrap(), Bytes::from(format!("t0-{i}")))
            .with_msg_id(format!("t0-{i}"))
            .unwrap()
    };
    let mut acked = Vec::new();
    for i in 0..20 {
        let ack = engine.publish(&stream, msg(i)).await.unwrap();
        acked.push(Acked { task: 0, i, seq: ack.seq.0, at: Instant::now() });
    }

    // Keep the leader: it goes on answering as leader for seconds before it
    // notices the lost quorum, the harder case to report (the engine may be
    // connected to a killed node; it fails over).
    let leader = leader_of(&cluster, engine.client(), "PAYMENTS").await;
    let (a, b) = ((leader + 1) % 3, (leader + 2) % 3);
    cluster.node_mut(a).kill().await.unwrap();
    cluster.node_mut(b).kill().await.unwrap();
    let started = Instant::now();
    let err = engine.publish(&stream, msg(20)).await.expect_err("no quorum: the write must fail");
    let took = started.elapsed();
    eprintln!("two nodes down: publish failed after {took:?}: {err}");
    assert_eq!(err.kind(), ErrorKind::Unavailable, "{err:?}");
    let m = err.message();
    assert!(m.contains("PAYMENTS") && m.contains("payments.a"), "names what failed: {err}");
    assert!(m.contains("quorum") && m.contains("may or may not be stored"), "says why and what it means: {err}");
    // request_timeout, then at most 1 s asking the stream why.
    assert!(took <= REQUEST_TIMEOUT + Duration::from_millis(1500), "failed only after {took:?}");

    cluster.node_mut(a).restart().await.unwrap();
    let deadline = Instant::now() + DEADLINE;
    let resumed_from = Instant::now();
    // Message 20 may or may not have been stored by the failed call; its id
    // makes the retry store it once either way.
    let ack = loop {
        match engine.publish(&stream, msg(20)).await {
            Ok(ack) => break ack,
            Err(e) => assert!(Instant::now() < deadline, "writes did not resume with two nodes up: {e:?}"),
        }
    };
    eprintln!("one node back: writes resumed after {:?}", resumed_from.elapsed());
    acked.push(Acked { task: 0, i: 20, seq: ack.seq.0, at: Instant::now() });
    let stored = read_all(&engine, &stream).await;
    check_stream(&stored, &acked);
    assert_eq!(stored.len(), 21);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restarted_node_catches_up() {
    let mut cluster = cluster().await;
    let engine = engine_on(cluster.urls()).await;
    let stream = r3_stream(&engine, "EVENTS").await;
    let publish_n = |from: u64, n: u64| {
        let (engine, stream) = (engine.clone(), stream.clone());
        async move {
            let msgs = (from..from + n)
                .map(|i| OutgoingMessage::new("events.a".parse().unwrap(), Bytes::from(format!("t0-{i}"))))
                .map(|m| {
                    let id = String::from_utf8(m.payload.to_vec()).unwrap();
                    m.with_msg_id(id).unwrap()
                })
                .collect();
            engine.publish_batch(&stream, msgs).await.expect("publish with two of three nodes up")
        }
    };
    publish_n(0, 100).await;
    // Kill a follower, so the stream keeps its leader and quorum.
    let leader = leader_of(&cluster, engine.client(), "EVENTS").await;
    let follower = (leader + 1) % 3;
    cluster.node_mut(follower).kill().await.unwrap();
    let acks = publish_n(100, 500).await;
    let last = acks.last().unwrap().seq.0;
    assert_eq!(last, 600);

    let restarted_at = Instant::now();
    cluster.node_mut(follower).restart().await.unwrap();
    let http = cluster.nodes()[follower].config().http_port;
    let deadline = Instant::now() + DEADLINE;
    loop {
        let local = jsz_last_seq(http, "EVENTS").await;
        if local == Some(last) {
            break;
        }
        assert!(Instant::now() < deadline, "restarted node stuck at {local:?}, leader at {last}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    eprintln!("restarted node n{} caught up to seq {last} in {:?}", follower + 1, restarted_at.elapsed());
    // The other nodes agree, and the stream reads whole.
    for (i, node) in cluster.nodes().iter().enumerate() {
        assert_eq!(jsz_last_seq(node.config().http_port, "EVENTS").await, Some(last), "node n{}", i + 1);
    }
    assert_eq!(read_all(&engine, &stream).await.len(), 600);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kv_put_acked_before_a_leader_kill_keeps_its_revision() {
    let mut cluster = cluster().await;
    let engine = engine_on(cluster.urls()).await;
    let bucket = BucketName::new("cards").unwrap();
    engine.create_bucket(BucketConfig { replicas: 3, history: 5, ..BucketConfig::new(bucket.clone()) }).await.unwrap();
    let mut written = Vec::new();
    for i in 0..50u64 {
        let key = Key::new(format!("k{}", i % 10)).unwrap();
        let value = Bytes::from(format!("v{i}"));
        let rev = engine.kv_put(&bucket, &key, value.clone()).await.unwrap();
        written.push((key, value, rev));
    }
    let leader = leader_of(&cluster, engine.client(), "KV_cards").await;
    cluster.node_mut(leader).kill().await.unwrap();

    // The last write of each key is its current value, at the same revision.
    let latest: HashMap<&Key, (&Bytes, _)> = written.iter().map(|(k, v, r)| (k, (v, *r))).collect();
    let deadline = Instant::now() + DEADLINE;
    for (key, (value, rev)) in latest {
        let entry = loop {
            match engine.kv_get(&bucket, key).await {
                Ok(e) => break e.expect("acked key present after the leader kill"),
                Err(e) => assert!(Instant::now() < deadline, "get {key} kept failing: {e:?}"),
            }
        };
        assert_eq!((&entry.value, entry.revision), (value, rev), "key {key}");
    }
    // History survives too, and the bucket takes writes under its new leader.
    let (key, value, rev) = &written[0];
    let old = engine.kv_get_revision(&bucket, key, *rev).await.unwrap().expect("old revision kept");
    assert_eq!(&old.value, value);
    // Reads may be answered by a replica before the election ends; writes
    // need the new leader.
    let new_leader = leader_of(&cluster, engine.client(), "KV_cards").await;
    assert_ne!(new_leader, leader);
    let next = engine.kv_put(&bucket, key, Bytes::from_static(b"after")).await.unwrap();
    assert!(next > written.last().unwrap().2, "{next:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn r3_kv_reads_through_a_follower_see_their_own_writes() {
    let cluster = cluster().await;
    let admin = engine_on(cluster.urls()).await;
    let bucket = BucketName::new("limits").unwrap();
    admin.create_bucket(BucketConfig { replicas: 3, ..BucketConfig::new(bucket.clone()) }).await.unwrap();
    let leader = leader_of(&cluster, admin.client(), "KV_limits").await;
    // Connected to a follower only: its local replica answers direct gets
    // first, and it applies each write a little after the leader acks it.
    let follower = (leader + 1) % 3;
    let engine = engine_on(vec![cluster.urls()[follower].clone()]).await;
    let mut tasks = Vec::new();
    for t in 0..4 {
        let (engine, bucket) = (engine.clone(), bucket.clone());
        tasks.push(tokio::spawn(async move {
            let key = Key::new(format!("card{t}")).unwrap();
            let mut last_rev = finmesh_core::Revision(0);
            for i in 0..150u32 {
                let value = Bytes::from(format!("{t}-{i}"));
                let rev = engine.kv_put(&bucket, &key, value.clone()).await.unwrap();
                let got = engine.kv_get(&bucket, &key).await.unwrap().expect("the key just written");
                assert_eq!((&got.value, got.revision), (&value, rev), "task {t} write {i}");
                assert!(rev > last_rev);
                last_rev = rev;
            }
            // Deletes are writes too: the key reads as gone at once.
            engine.kv_delete(&bucket, &key).await.unwrap();
            assert_eq!(engine.kv_get(&bucket, &key).await.unwrap(), None, "task {t} after delete");
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
}

/// One-way delay on every route link of the slow node in the lagging-
/// replica test, and its jitter; see that test for why both.
const SLOW_DELAY: Duration = Duration::from_millis(25);
const SLOW_JITTER: Duration = Duration::from_millis(20);
/// The lagging node of [`lagging_cluster`].
const SLOW: usize = 2;

/// A 3-node cluster whose n3 routes only through delay proxies with
/// jitter (see `r3_kv_reads_through_a_lagging_replica_see_their_own_writes`).
async fn lagging_cluster() -> NatsCluster {
    let cluster = NatsCluster::start_with_slow_node(3, SLOW, SLOW_DELAY).await.expect("start a cluster with a slow n3");
    for link in cluster.slow_links() {
        link.set_jitter(SLOW_JITTER);
    }
    cluster
}

/// History of the lagging-replica test's bucket: fewer than the puts per
/// key, so the leader has dropped revisions a lagging replica still holds.
const HISTORY: u8 = 5;

/// The revision a plain direct get on `client`'s
/// server returns for the key's latest entry; `None` if the key is absent
/// or the request fails (only reported, never asserted).
async fn raw_direct_last_rev(client: &async_nats::Client, bucket: &str, key: &str) -> Option<u64> {
    let body = serde_json::to_vec(&serde_json::json!({ "last_by_subj": format!("$KV.{bucket}.{key}") })).ok()?;
    let reply = client.request(format!("$JS.API.DIRECT.GET.KV_{bucket}"), body.into()).await.ok()?;
    let headers = reply.headers.as_ref()?;
    headers.get("Nats-Sequence").and_then(|v| v.as_str().parse().ok())
}

/// Read-your-writes through a replica that really lags.
///
/// n3's routes all pass delay proxies with jitter. Why jitter: a client on
/// n3 gets its put's ack through n3, over the same links that bring n3 the
/// write and the leader's commit (a raft heartbeat sent right after the
/// quorum acked); with a fixed delay they arrive in order and n3 has
/// applied the write before the client sees the ack, so nothing lags. Raft
/// traffic and client traffic use different route connections (the system
/// account has its own), and jitter reorders them: in about half the rounds
/// the ack overtakes the commit and n3's store is behind the ack (counted
/// and asserted through n3's `/jsz`).
///
/// Before the engine checked answers against its per-key watermarks it
/// relied on `min_last_seq`, which nats-server 2.15.1 ignores (the
/// read-after-write feature was removed again before 2.12 shipped,
/// nats-server PR #7285): this test then failed in 12 of 15 runs (a stale
/// value, or none, within 30 rounds); with leader reads it passed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn r3_kv_reads_through_a_lagging_replica_see_their_own_writes() {
    // n3's routes all pass delay proxies: its replica of the bucket applies
    // writes up to SLOW_DELAY + SLOW_JITTER after n1 and n2 (the quorum).
    let cluster = lagging_cluster().await;
    let admin = engine_on(vec![cluster.urls()[0].clone()]).await;
    let bucket = BucketName::new("limits").unwrap();
    admin
        .create_bucket(BucketConfig { replicas: 3, history: HISTORY, ..BucketConfig::new(bucket.clone()) })
        .await
        .unwrap();
    let leader = cluster
        .lead_elsewhere(admin.client(), "KV_limits", SLOW, DEADLINE)
        .await
        .expect("a leader other than the slow node");

    // An engine connected only to the slow node: direct gets are answered
    // by its lagging replica first.
    let slow_url = cluster.urls()[SLOW].clone();
    let engine = engine_on(vec![slow_url.clone()]).await;
    let raw = async_nats::connect(slow_url.as_str()).await.unwrap();
    let slow_http = cluster.nodes()[SLOW].config().http_port;
    let (mut behind, mut stale_raw) = (0, 0);
    let rounds = 30u32;
    let started = Instant::now();
    for i in 0..rounds {
        let key = Key::new(format!("card{}", i % 3)).unwrap();
        let value = Bytes::from(format!("v{i}"));
        let rev = engine.kv_put(&bucket, &key, value.clone()).await.unwrap();
        // The slow node's own store right at the ack, and what a plain
        // direct get through it returns (any replica may answer that).
        if jsz_last_seq(slow_http, "KV_limits").await.is_none_or(|s| s < rev.0) {
            behind += 1;
        }
        if raw_direct_last_rev(&raw, "limits", key.as_str()).await.is_none_or(|r| r < rev.0) {
            stale_raw += 1;
        }
        let got = engine.kv_get(&bucket, &key).await.unwrap().expect("the key just written");
        assert_eq!((&got.value, got.revision), (&value, rev), "round {i}: get after put");
        let at = engine.kv_get_revision(&bucket, &key, rev).await.unwrap().expect("the revision just written");
        assert_eq!(at.value, value, "round {i}: get of the revision just written");
        // Keys and history read through a consumer on any replica.
        let keys = engine.kv_keys(&bucket, "").await.unwrap();
        assert_eq!(keys.len() as u32, (i + 1).min(3), "round {i}: keys {keys:?}");
        let history = engine.kv_history(&bucket, &key).await.unwrap();
        let revs: Vec<Revision> = history.iter().map(|e| e.revision).collect();
        assert_eq!(revs.last(), Some(&rev), "round {i}: history of {key}");
        assert_eq!(history.len() as u32, (i / 3 + 1).min(HISTORY.into()), "round {i}: history of {key}: {revs:?}");
    }
    // Deletes are writes too: the key reads as gone at once.
    let key = Key::new("card0").unwrap();
    let del = engine.kv_delete(&bucket, &key).await.unwrap();
    let raw_after_delete = raw_direct_last_rev(&raw, "limits", key.as_str()).await;
    assert_eq!(engine.kv_get(&bucket, &key).await.unwrap(), None, "get after delete");
    assert!(!engine.kv_keys(&bucket, "").await.unwrap().contains(&key), "keys after delete");
    let history = engine.kv_history(&bucket, &key).await.unwrap();
    assert_eq!(history.last().map(|e| (e.op, e.revision)), Some((KvOp::Delete, del)), "history after delete");
    // A purge leaves only its marker.
    let key = Key::new("card1").unwrap();
    let purge = engine.kv_purge(&bucket, &key).await.unwrap();
    let history = engine.kv_history(&bucket, &key).await.unwrap();
    let got: Vec<(KvOp, Revision)> = history.iter().map(|e| (e.op, e.revision)).collect();
    assert_eq!(got, vec![(KvOp::Purge, purge)], "history after purge");
    eprintln!(
        "leader n{}; {rounds} put-then-get rounds through slow n3 in {:?}; n3's store was behind the ack \
         {behind}/{rounds} times, a plain direct get through n3 right after the put was stale {stale_raw}/{rounds} \
         times; after the delete (rev {}) it returned rev {raw_after_delete:?}",
        leader + 1,
        started.elapsed(),
        del.0
    );
    // The lag is real: n3 often has not applied a write when its ack
    // reaches the client.
    assert!(behind >= 3, "n3 was behind only {behind}/{rounds} times: it does not lag");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn r3_stream_reads_through_a_lagging_replica_see_every_acked_message() {
    // As above: n3's replica applies writes up to SLOW_DELAY + SLOW_JITTER
    // late. A read goes through an ephemeral consumer that NATS places on
    // any replica, n3 included.
    let cluster = lagging_cluster().await;
    let engine = engine_on(vec![cluster.urls()[0].clone()]).await;
    let stream = r3_stream(&engine, "LEDGER").await;
    cluster.lead_elsewhere(engine.client(), "LEDGER", SLOW, DEADLINE).await.expect("a leader other than the slow node");
    let rounds = 30u64;
    for i in 0..rounds {
        let subject = Subject::new(format!("ledger.{}", i % 3)).unwrap();
        let ack = engine.publish(&stream, OutgoingMessage::new(subject, Bytes::from(format!("m{i}")))).await.unwrap();
        assert_eq!(ack.seq, Seq(i + 1));
        // Right after the ack: from the message itself, from the start, and
        // filtered to its subject.
        let from_it = engine.read(&stream, ReadRequest::from_seq(ack.seq, 10)).await.unwrap();
        assert_eq!(from_it.iter().map(|m| m.seq).collect::<Vec<_>>(), vec![ack.seq], "round {i}: read from the ack");
        let all = engine.read(&stream, ReadRequest::from_seq(Seq(1), 1_000)).await.unwrap();
        assert_eq!(all.len() as u64, i + 1, "round {i}: read of the whole stream");
        assert!(all.iter().enumerate().all(|(k, m)| m.seq.0 == k as u64 + 1 && m.payload == format!("m{k}")));
        let mut filtered = ReadRequest::from_seq(Seq(1), 1_000);
        filtered.filter = Some(SubjectPattern::new(format!("ledger.{}", i % 3)).unwrap());
        let mine = engine.read(&stream, filtered).await.unwrap();
        assert_eq!(mine.last().map(|m| m.seq), Some(ack.seq), "round {i}: filtered read");
        assert_eq!(mine.len() as u64, i / 3 + 1, "round {i}: filtered read");
        // The last message per subject: this one for its subject, the
        // previous rounds' for the other two.
        let last: Vec<u64> = engine.last_per_subject(&stream, None).await.unwrap().iter().map(|m| m.seq.0).collect();
        assert_eq!(last, (i.saturating_sub(2) + 1..=i + 1).collect::<Vec<_>>(), "round {i}: last per subject");
    }
    // A bounded range still ends at its end.
    let mut bounded = ReadRequest::from_seq(Seq(5), 1_000);
    bounded.end = Some(Seq(9));
    let got: Vec<u64> = engine.read(&stream, bounded).await.unwrap().iter().map(|m| m.seq.0).collect();
    assert_eq!(got, (5..=9).collect::<Vec<_>>());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reads_through_a_consumer_on_another_server_return_every_message() {
    // A read's consumer lives where NATS puts it (for an R1 stream: on the
    // stream's server), and its create reply can reach the client before
    // that server's interest in the consumer's pull subject does. Across
    // the jittery slow node's links that window is wide: each round's R1
    // stream is read by a client on the other side of a slow link (on n1
    // if the stream is on the slow n3, else on n3). A pull sent into the
    // window gets "no responders"; the reads must not come back short.
    let cluster = lagging_cluster().await;
    let fast_client = engine_on(vec![cluster.urls()[0].clone()]).await;
    let slow_client = engine_on(vec![cluster.urls()[SLOW].clone()]).await;
    for round in 0..12 {
        let stream = StreamName::new(format!("R1_{round}")).unwrap();
        let pattern = SubjectPattern::new(format!("r1.{round}.>")).unwrap();
        fast_client.create_stream(StreamConfig::new(stream.clone(), vec![pattern])).await.unwrap();
        let on_slow = leader_of(&cluster, fast_client.client(), stream.as_str()).await == SLOW;
        let engine = if on_slow { &fast_client } else { &slow_client };
        for i in 0..3 {
            let subject = Subject::new(format!("r1.{round}.{i}")).unwrap();
            engine.publish(&stream, OutgoingMessage::new(subject, Bytes::from(format!("m{i}")))).await.unwrap();
        }
        let all = engine.read(&stream, ReadRequest::from_seq(Seq(1), 100)).await.unwrap();
        assert_eq!(all.len(), 3, "round {round} (stream on the slow node: {on_slow}): range read");
        let last = engine.last_per_subject(&stream, None).await.unwrap();
        assert_eq!(last.len(), 3, "round {round} (stream on the slow node: {on_slow}): last per subject");
        let consumer = ConsumerName::new("c").unwrap();
        engine.create_consumer(&stream, ConsumerConfig::new(consumer.clone())).await.unwrap();
        // (A durable consumer's fetch asks for the consumer's info first,
        // which gives its interest the time to arrive.)
        let fetched = engine.fetch(&stream, &consumer, FetchRequest { max: 10, wait: DEADLINE }).await.unwrap();
        assert_eq!(fetched.len(), 3, "round {round} (stream on the slow node: {on_slow}): fetch from a new consumer");
    }
}
