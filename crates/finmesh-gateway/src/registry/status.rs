//! Live status of registered subscribers on this node ([`StatusBook`]), and
//! the per-connection handle a hub feed reports through ([`Session`]).
//!
//! Status is per gateway: the hub and its connections live in one process,
//! so each node reports the connections it serves (its `node` id is in
//! every answer). Across nodes, aggregate the metrics (for example
//! `min by (id) (finmesh_subscriber_disconnected_seconds)`).
//!
//! Metrics (labels bounded: `id` is a registered server id, or
//! `_unregistered` for every other identity together):
//! - `finmesh_subscriber_sent_messages_total{id}`,
//!   `finmesh_subscriber_sent_bytes_total{id}`: frames and bytes handed to
//!   the connection;
//! - `finmesh_subscriber_connections{id}` (gauge): open connections;
//! - `finmesh_subscriber_disconnects_total{id,reason}`: ended connections
//!   by reason (`slow_consumer`, `client_closed`, `drain`, `error`, `end`,
//!   `lagged`);
//! - `finmesh_subscriber_disconnected_seconds{id}` (gauge, set when
//!   `/metrics` or `/readyz` is read): how long a registered server has had
//!   no connection on this node (0 while connected);
//! - `finmesh_subscribers_disconnected_over_threshold` (gauge): registered
//!   servers disconnected longer than `subscriptions.registered_disconnect_alert`.
//!
//! Invariants: a session is in the book from [`StatusBook::open`] until it
//! is dropped, and counts exactly one disconnect (with the reason its feed
//! recorded, `client_closed` when it ended without one); the lock is never
//! held across an await.

use std::collections::{BTreeMap, HashMap};
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use finmesh_core::Timestamp;
use metrics::Counter;
use parking_lot::Mutex;
use serde::Serialize;

use crate::subscribe::{End, Frame};

/// The `id` label of every unregistered identity.
pub const UNREGISTERED: &str = "_unregistered";

/// One open connection of a registered server.
#[derive(Debug)]
struct Conn {
    kind: &'static str,
    stream: String,
    filter: Option<String>,
    peer: Option<SocketAddr>,
    since: Timestamp,
    bytes: AtomicU64,
    messages: AtomicU64,
    last_seq: AtomicU64,
    /// Store time (ns) of the last message sent; 0 before the first.
    last_time: AtomicU64,
}

/// What the book keeps per registered id.
#[derive(Default)]
struct IdStatus {
    conns: HashMap<u64, Arc<Conn>>,
    disconnects: BTreeMap<&'static str, u64>,
    last_disconnect: Option<(Timestamp, &'static str)>,
    /// Bytes and messages of connections that ended.
    past_bytes: u64,
    past_messages: u64,
}

/// The live status of this node's registered subscribers.
pub struct StatusBook {
    node: String,
    started: Timestamp,
    next: AtomicU64,
    by_id: Mutex<HashMap<String, IdStatus>>,
}

/// A feed's handle on its status entry and metrics.
pub struct Session {
    book: Arc<StatusBook>,
    /// The registered id, `None` for an unregistered identity.
    id: Option<String>,
    key: u64,
    conn: Arc<Conn>,
    sent_messages: Counter,
    sent_bytes: Counter,
    /// Why it ended, once known.
    reason: Option<&'static str>,
}

/// One connection, as `/v1/subscribers` reports it.
#[derive(Debug, Clone, Serialize, utoipa::ToSchema)]
pub struct ConnectionStatus {
    /// `sse` or `ws`.
    pub kind: &'static str,
    /// The stream.
    pub stream: String,
    /// Its subject filter, if any.
    pub filter: Option<String>,
    /// The client's address, as this node saw it.
    pub peer: Option<String>,
    /// RFC 3339 time of connection.
    pub since: String,
    /// Last sequence sent (or the heartbeat position).
    pub last_seq: u64,
    /// Messages stored in the stream after `last_seq` (of any subject).
    pub lag_messages: Option<u64>,
    /// Store time of the stream's last message minus that of the last
    /// message sent (0 when caught up).
    pub lag_ms: Option<u64>,
    /// Bytes sent on this connection.
    pub bytes_sent: u64,
    /// Frames sent on this connection.
    pub messages_sent: u64,
}

/// A registered server's live status on this node.
#[derive(Debug, Clone, Serialize, utoipa::ToSchema)]
pub struct LiveStatus {
    /// The node answering (status is per gateway).
    pub node: String,
    /// Whether it has a connection on this node now.
    pub connected: bool,
    /// RFC 3339 time since which it is connected (its oldest open
    /// connection), or disconnected (its last disconnect, or the node's
    /// start).
    pub since: String,
    /// Seconds disconnected from this node (0 while connected).
    pub disconnected_seconds: u64,
    /// Its open connections.
    pub connections: Vec<ConnectionStatus>,
    /// Bytes sent to it by this node since the node started.
    pub bytes_sent: u64,
    /// Frames sent to it by this node since the node started.
    pub messages_sent: u64,
    /// Ended connections by reason (`slow_consumer`, `client_closed`,
    /// `drain`, `error`, `end`, `lagged`).
    pub disconnects: BTreeMap<String, u64>,
    /// The last disconnect: `{"at", "reason"}`.
    pub last_disconnect: Option<Disconnect>,
}

/// One disconnect.
#[derive(Debug, Clone, Serialize, utoipa::ToSchema)]
pub struct Disconnect {
    /// RFC 3339 time.
    pub at: String,
    /// Why.
    pub reason: String,
}

/// The disconnect reason of an end.
pub fn reason(end: &End) -> &'static str {
    match end {
        End::SlowConsumer { .. } => "slow_consumer",
        End::Lagged { .. } => "lagged",
        End::Reconnect { .. } => "drain",
        End::Failed(_) => "error",
        End::Finished => "end",
    }
}

fn seconds_between(from: Timestamp, to: Timestamp) -> u64 {
    Duration::from_nanos(to.as_nanos().saturating_sub(from.as_nanos())).as_secs()
}

impl Default for StatusBook {
    fn default() -> Self {
        Self::new()
    }
}

impl StatusBook {
    /// An empty book for a node starting now.
    pub fn new() -> Self {
        let host = std::env::var("HOSTNAME").ok().filter(|h| !h.is_empty()).unwrap_or_else(|| "finmesh".to_owned());
        StatusBook {
            node: format!("{host}-{}-{:04x}", std::process::id(), fastrand::u16(..)),
            started: Timestamp::now(),
            next: AtomicU64::new(0),
            by_id: Mutex::new(HashMap::new()),
        }
    }

    /// This node's id in status answers.
    pub fn node(&self) -> &str {
        &self.node
    }

    /// Record a new connection (`id`: the registered id, `None` for an
    /// unregistered identity) to `stream` with `filter` from `peer`.
    pub fn open(
        self: &Arc<Self>,
        id: Option<&str>,
        kind: &'static str,
        stream: &str,
        filter: Option<&str>,
        peer: Option<SocketAddr>,
    ) -> Session {
        let conn = Arc::new(Conn {
            kind,
            stream: stream.to_owned(),
            filter: filter.map(str::to_owned),
            peer,
            since: Timestamp::now(),
            bytes: AtomicU64::new(0),
            messages: AtomicU64::new(0),
            last_seq: AtomicU64::new(0),
            last_time: AtomicU64::new(0),
        });
        let key = self.next.fetch_add(1, Ordering::Relaxed);
        let label = id.unwrap_or(UNREGISTERED).to_owned();
        if let Some(id) = id {
            self.by_id.lock().entry(id.to_owned()).or_default().conns.insert(key, conn.clone());
        }
        metrics::gauge!("finmesh_subscriber_connections", "id" => label.clone()).increment(1.0);
        Session {
            book: self.clone(),
            id: id.map(str::to_owned),
            key,
            conn,
            sent_messages: metrics::counter!("finmesh_subscriber_sent_messages_total", "id" => label.clone()),
            sent_bytes: metrics::counter!("finmesh_subscriber_sent_bytes_total", "id" => label),
            reason: None,
        }
    }

    /// The live status of `id` on this node, without lag (see
    /// [`ConnectionStatus::lag_messages`]; the route fills it in).
    pub fn status(&self, id: &str) -> LiveStatus {
        self.status_and_times(id).0
    }

    /// [`status`](Self::status), and the store time (ns, 0 = none yet) of
    /// the last message sent on each of its connections, in their order.
    pub fn status_and_times(&self, id: &str) -> (LiveStatus, Vec<u64>) {
        let now = Timestamp::now();
        let by_id = self.by_id.lock();
        let Some(st) = by_id.get(id) else {
            let status = LiveStatus {
                node: self.node.clone(),
                connected: false,
                since: crate::envelope::rfc3339(self.started),
                disconnected_seconds: seconds_between(self.started, now),
                connections: Vec::new(),
                bytes_sent: 0,
                messages_sent: 0,
                disconnects: BTreeMap::new(),
                last_disconnect: None,
            };
            return (status, Vec::new());
        };
        let mut conns: Vec<&Arc<Conn>> = st.conns.values().collect();
        conns.sort_by_key(|c| c.since);
        let connected = !conns.is_empty();
        let since = match (conns.first(), st.last_disconnect) {
            (Some(c), _) => c.since,
            (None, Some((at, _))) => at,
            (None, None) => self.started,
        };
        let connections: Vec<ConnectionStatus> = conns
            .iter()
            .map(|c| ConnectionStatus {
                kind: c.kind,
                stream: c.stream.clone(),
                filter: c.filter.clone(),
                peer: c.peer.map(|p| p.to_string()),
                since: crate::envelope::rfc3339(c.since),
                last_seq: c.last_seq.load(Ordering::Relaxed),
                lag_messages: None,
                lag_ms: None,
                bytes_sent: c.bytes.load(Ordering::Relaxed),
                messages_sent: c.messages.load(Ordering::Relaxed),
            })
            .collect();
        let times = conns.iter().map(|c| c.last_time.load(Ordering::Relaxed)).collect();
        let status = LiveStatus {
            node: self.node.clone(),
            connected,
            since: crate::envelope::rfc3339(since),
            disconnected_seconds: if connected { 0 } else { seconds_between(since, now) },
            bytes_sent: st.past_bytes + connections.iter().map(|c| c.bytes_sent).sum::<u64>(),
            messages_sent: st.past_messages + connections.iter().map(|c| c.messages_sent).sum::<u64>(),
            connections,
            disconnects: st.disconnects.iter().map(|(k, v)| ((*k).to_owned(), *v)).collect(),
            last_disconnect: st
                .last_disconnect
                .map(|(at, reason)| Disconnect { at: crate::envelope::rfc3339(at), reason: reason.to_owned() }),
        };
        (status, times)
    }

    /// Set the disconnected gauges of `ids` (the registered servers) and
    /// return those disconnected longer than `threshold`, with their seconds.
    pub fn disconnected(&self, ids: &[String], threshold: Duration) -> Vec<(String, u64)> {
        let now = Timestamp::now();
        let mut over = Vec::new();
        for id in ids {
            let gone = self.disconnected_for(id, now);
            metrics::gauge!("finmesh_subscriber_disconnected_seconds", "id" => id.clone()).set(gone.as_secs_f64());
            if gone > threshold {
                over.push((id.clone(), gone.as_secs()));
            }
        }
        metrics::gauge!("finmesh_subscribers_disconnected_over_threshold").set(over.len() as f64);
        over
    }

    /// How long `id` has had no connection here (zero while it has one):
    /// since its last disconnect, or since the node started.
    fn disconnected_for(&self, id: &str, now: Timestamp) -> Duration {
        let by_id = self.by_id.lock();
        let since = match by_id.get(id) {
            Some(st) if !st.conns.is_empty() => return Duration::ZERO,
            Some(st) => st.last_disconnect.map_or(self.started, |(at, _)| at),
            None => self.started,
        };
        Duration::from_nanos(now.as_nanos().saturating_sub(since.as_nanos()))
    }

    fn close(&self, session: &Session) {
        let reason = session.reason.unwrap_or("client_closed");
        let label = session.id.as_deref().unwrap_or(UNREGISTERED).to_owned();
        metrics::gauge!("finmesh_subscriber_connections", "id" => label.clone()).decrement(1.0);
        metrics::counter!("finmesh_subscriber_disconnects_total", "id" => label, "reason" => reason).increment(1);
        let Some(id) = &session.id else { return };
        let mut by_id = self.by_id.lock();
        let st = by_id.entry(id.clone()).or_default();
        if let Some(conn) = st.conns.remove(&session.key) {
            st.past_bytes += conn.bytes.load(Ordering::Relaxed);
            st.past_messages += conn.messages.load(Ordering::Relaxed);
        }
        *st.disconnects.entry(reason).or_default() += 1;
        st.last_disconnect = Some((Timestamp::now(), reason));
    }
}

impl Session {
    /// Count `frame` as sent.
    pub fn sent(&self, frame: &Frame) {
        let (seq, time) = match frame {
            Frame::Shared(e) => (e.seq, e.time),
            Frame::Message { id, .. } => (*id, 0),
            Frame::Gap { to, .. } => (*to, 0),
            Frame::Reset { last_seq, .. } => (*last_seq, 0),
        };
        let bytes = frame.bytes() as u64;
        self.conn.bytes.fetch_add(bytes, Ordering::Relaxed);
        self.conn.messages.fetch_add(1, Ordering::Relaxed);
        self.conn.last_seq.fetch_max(seq, Ordering::Relaxed);
        if time > 0 {
            self.conn.last_time.store(time, Ordering::Relaxed);
        }
        self.sent_messages.increment(1);
        self.sent_bytes.increment(bytes);
    }

    /// The position moved to `seq` without a message (heartbeat).
    pub fn advance(&self, seq: u64) {
        self.conn.last_seq.fetch_max(seq, Ordering::Relaxed);
    }

    /// Record why the connection ends.
    pub fn ended(&mut self, end: &End) {
        self.reason.get_or_insert(reason(end));
    }

    /// The registered id, if any.
    pub fn id(&self) -> Option<&str> {
        self.id.as_deref()
    }
}

impl Drop for Session {
    fn drop(&mut self) {
        self.book.clone().close(self);
    }
}
