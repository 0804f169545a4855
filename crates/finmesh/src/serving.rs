//! The serving threads of `finmesh serve`: one acceptor hands each new
//! connection, in turn, to one of N threads, and each thread runs its own
//! single-threaded tokio runtime (thread per core, as nginx and actix do).
//!
//! A connection lives its whole life on the thread it was handed to: its
//! requests are never stolen by another worker and its buffers never move
//! between cores. On the 2-core bench machine this served the same KV GET
//! load with ~30% less user CPU per request than one work-stealing runtime
//! for the whole process (BENCHMARKS.md, "Session 5"). The price: one busy
//! connection (HTTP/2 multiplexing many streams, a large upload) uses one
//! core; many connections spread over all of them.
//!
//! Invariants:
//! - connection *i* goes to thread *i mod N* (round robin, so keep-alive
//!   clients that open their connections together are spread evenly;
//!   `finmesh_connections_accepted_total{thread}` counts them);
//! - at most [`ConnectionLimits::max_connections`] connections are open on
//!   the node and [`ConnectionLimits::max_connections_per_address`] from one
//!   client address; the acceptor closes a connection over either at once
//!   (`finmesh_connections_refused_total{reason}`). The counts live in the
//!   acceptor's map and are given back when the connection's socket closes,
//!   after a WebSocket upgrade included;
//! - a TLS handshake runs on its connection's thread, concurrently with the
//!   others, for at most [`HANDSHAKE_TIMEOUT`];
//! - every connection has a watchdog ([`Watchdog`]), woken a few times per
//!   timeout, never per request: a connection that has not completed a
//!   request head within `header_timeout` of opening, or of the first byte
//!   of a later head, is closed; so is one with no request in flight and
//!   nothing read for `idle_timeout`. A write that makes no progress for
//!   `write_timeout` fails the connection ([`Watched`]): a reader that stops
//!   reading (an SSE or WebSocket subscriber included) is cut. Each cut is
//!   counted in `finmesh_connections_cut_total{reason}`;
//! - nothing here allocates, locks or arms a timer per request: a request
//!   costs a few uncontended atomic operations on its connection's
//!   [`Activity`] (the write deadline's timer is armed only while a write
//!   waits, and allocated once per connection);
//! - [`Phase::Draining`]: the acceptor stops (new connections are refused by
//!   the kernel once the listener is closed) and every connection finishes
//!   its in-flight request, then closes (hyper's graceful shutdown; HTTP/2
//!   gets GOAWAY); a serving thread ends only once every socket of the
//!   node is closed, upgraded WebSocket ones included (their tasks run on
//!   the thread's runtime and still have to send `reconnect`);
//!   [`Phase::Stop`]: every connection is dropped at once.
//!   Work the engine acked stays acked either way.

use std::collections::HashMap;
use std::convert::Infallible;
use std::future::Future;
use std::io;
use std::net::{IpAddr, SocketAddr};
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll, ready};
use std::time::Duration;

use anyhow::Context as _;
use axum::Router;
use axum::body::Body;
use axum::extract::ConnectInfo;
use axum::http::{Request, Response};
use bytes::BytesMut;
use hyper::body::{Frame, Incoming, SizeHint};
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, watch};
use tokio::task::JoinSet;
use tokio::time::{Instant, Sleep};
use tower::Service;

use crate::direct_sse;

/// Longest a client may take to finish its TLS handshake.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// Accepted connections waiting for their thread, per thread.
const HANDOFF_QUEUE: usize = 1024;

/// Where the server is in its life; sent to every thread.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Phase {
    Serving,
    /// Stop accepting; let connections finish what they are doing.
    Draining,
    /// Drop every connection now.
    Stop,
}

/// Caps and timeouts of connections (`[connections]` in the configuration).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ConnectionLimits {
    /// Connections open at once on the node. Default 10,000.
    pub max_connections: usize,
    /// Connections open at once from one client IP address. Default 1,000.
    pub max_connections_per_address: usize,
    /// Longest time to receive a whole request head. Default 10 s.
    pub header_timeout: Duration,
    /// Longest a connection may stay open with no request in flight and
    /// nothing received. Default 60 s.
    pub idle_timeout: Duration,
    /// Longest a write may wait for the client to read. Default 30 s.
    pub write_timeout: Duration,
}

impl Default for ConnectionLimits {
    fn default() -> Self {
        ConnectionLimits {
            max_connections: 10_000,
            max_connections_per_address: 1_000,
            header_timeout: Duration::from_secs(10),
            idle_timeout: Duration::from_secs(60),
            write_timeout: Duration::from_secs(30),
        }
    }
}

impl ConnectionLimits {
    /// How often a connection's watchdog looks: a quarter of the shorter
    /// read timeout, so a cut comes at most a quarter late.
    fn tick(&self) -> Duration {
        (self.header_timeout.min(self.idle_timeout) / 4).max(Duration::from_millis(10))
    }
}

/// The running threads; [`Servers::wait`] returns once all have stopped.
pub struct Servers {
    threads: Vec<std::thread::JoinHandle<()>>,
    acceptor: tokio::task::JoinHandle<()>,
}

/// What a serving thread needs to serve one connection.
#[derive(Clone)]
struct ThreadSetup {
    app: Router,
    limits: ConnectionLimits,
    tls: Option<tokio_rustls::TlsAcceptor>,
    phase: watch::Receiver<Phase>,
    /// Counts every open socket, upgraded (WebSocket) ones included.
    gate: Arc<Gate>,
}

/// Start `threads` serving threads for `app` on `listener` (a bound,
/// non-blocking socket), with TLS when `tls` is given. Must be called
/// inside a tokio runtime, which runs the acceptor.
pub fn start(
    listener: std::net::TcpListener,
    tls: Option<Arc<rustls::ServerConfig>>,
    app: Router,
    threads: usize,
    limits: ConnectionLimits,
    phase: watch::Receiver<Phase>,
) -> anyhow::Result<Servers> {
    let listener = TcpListener::from_std(listener).context("registering the listener")?;
    let gate = Arc::new(Gate::new(limits));
    let tls = tls.map(tokio_rustls::TlsAcceptor::from);
    let setup = ThreadSetup { app, limits, tls, phase: phase.clone(), gate: gate.clone() };
    let mut senders = Vec::with_capacity(threads);
    let mut handles = Vec::with_capacity(threads);
    for i in 0..threads {
        // Built here so that a failure stops start-up instead of one thread.
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .context("starting a serving thread's runtime")?;
        let (tx, rx) = mpsc::channel(HANDOFF_QUEUE);
        senders.push(tx);
        let setup = setup.clone();
        let handle = std::thread::Builder::new()
            .name(format!("finmesh-serve-{i}"))
            .spawn(move || runtime.block_on(serve_thread(rx, setup)))
            .context("spawning a serving thread")?;
        handles.push(handle);
    }
    let acceptor = tokio::spawn(accept(listener, senders, gate, phase));
    Ok(Servers { threads: handles, acceptor })
}

impl Servers {
    /// Wait until every serving thread has stopped (after [`Phase::Draining`]
    /// once their connections are done, or after [`Phase::Stop`]).
    pub async fn wait(self) {
        let threads = self.threads;
        let joined = tokio::task::spawn_blocking(move || {
            for t in threads {
                if t.join().is_err() {
                    tracing::error!("a serving thread panicked");
                }
            }
        });
        let _ = joined.await;
        self.acceptor.abort();
    }
}

/// A connection on its way to a thread, with its place in the counts.
type Handoff = (std::net::TcpStream, SocketAddr, Pass);

/// Hand accepted connections to the threads in turn until the drain starts.
async fn accept(
    listener: TcpListener,
    threads: Vec<mpsc::Sender<Handoff>>,
    gate: Arc<Gate>,
    mut phase: watch::Receiver<Phase>,
) {
    let accepted_by: Vec<metrics::Counter> = (0..threads.len())
        .map(|i| metrics::counter!("finmesh_connections_accepted_total", "thread" => i.to_string()))
        .collect();
    let mut next = 0;
    loop {
        let accepted = tokio::select! {
            accepted = listener.accept() => accepted,
            _ = phase.wait_for(|p| *p != Phase::Serving) => return,
        };
        let (stream, peer) = match accepted {
            Ok(conn) => conn,
            Err(e) if is_connection_error(&e) => continue,
            Err(e) => {
                // Out of descriptors or memory: retrying at once would spin.
                tracing::error!(error = %e, "accepting a connection failed; retrying in 100 ms");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let pass = match gate.admit(peer.ip()) {
            Ok(pass) => pass,
            Err(refused) => {
                tracing::debug!(%peer, reason = refused.reason(), "connection refused");
                refused.count();
                continue; // dropping the stream closes it
            }
        };
        if let Err(e) = stream.set_nodelay(true) {
            tracing::debug!(error = %e, %peer, "cannot set TCP_NODELAY");
        }
        let stream = match stream.into_std() {
            Ok(s) => s,
            Err(e) => {
                tracing::warn!(error = %e, %peer, "cannot hand a connection over; dropped");
                continue;
            }
        };
        // Counted before the handoff, so a request on this connection sees it.
        accepted_by[next].increment(1);
        if threads[next].send((stream, peer, pass)).await.is_err() {
            return; // that thread has stopped: so is the server
        }
        next = (next + 1) % threads.len();
    }
}

/// Errors of one connection (the client gave up before we accepted it).
fn is_connection_error(e: &io::Error) -> bool {
    matches!(
        e.kind(),
        io::ErrorKind::ConnectionRefused | io::ErrorKind::ConnectionAborted | io::ErrorKind::ConnectionReset
    )
}

/// The connection counts of the node and of each client address.
struct Gate {
    limits: ConnectionLimits,
    open: AtomicUsize,
    by_address: Mutex<HashMap<IpAddr, usize>>,
    gauge: metrics::Gauge,
}

/// Why the acceptor closed a connection at once.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Refused {
    NodeLimit,
    AddressLimit,
}

impl Refused {
    fn reason(self) -> &'static str {
        match self {
            Refused::NodeLimit => "node_limit",
            Refused::AddressLimit => "address_limit",
        }
    }

    fn count(self) {
        metrics::counter!("finmesh_connections_refused_total", "reason" => self.reason()).increment(1);
    }
}

impl Gate {
    fn new(limits: ConnectionLimits) -> Self {
        Gate {
            limits,
            open: AtomicUsize::new(0),
            by_address: Mutex::new(HashMap::new()),
            gauge: metrics::gauge!("finmesh_connections_open"),
        }
    }

    /// Count a new connection from `ip`, or say which cap it is over.
    fn admit(self: &Arc<Self>, ip: IpAddr) -> Result<Pass, Refused> {
        let ip = ip.to_canonical();
        let mut by_address = self.by_address.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        if self.open.load(Ordering::Relaxed) >= self.limits.max_connections {
            return Err(Refused::NodeLimit);
        }
        let from_ip = by_address.entry(ip).or_insert(0);
        if *from_ip >= self.limits.max_connections_per_address {
            return Err(Refused::AddressLimit);
        }
        *from_ip += 1;
        let open = self.open.fetch_add(1, Ordering::Relaxed) + 1;
        self.gauge.set(open as f64);
        Ok(Pass { gate: self.clone(), ip })
    }
}

/// One open connection's place in the counts, given back on drop.
struct Pass {
    gate: Arc<Gate>,
    ip: IpAddr,
}

impl Drop for Pass {
    fn drop(&mut self) {
        let mut by_address = self.gate.by_address.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        if let Some(n) = by_address.get_mut(&self.ip) {
            *n -= 1;
            if *n == 0 {
                by_address.remove(&self.ip);
            }
        }
        let open = self.gate.open.fetch_sub(1, Ordering::Relaxed) - 1;
        self.gate.gauge.set(open as f64);
    }
}

/// One thread: serve each handed connection in its own task until the
/// acceptor stops and every connection is done, or until [`Phase::Stop`].
async fn serve_thread(mut rx: mpsc::Receiver<Handoff>, setup: ThreadSetup) {
    let mut connections = JoinSet::new();
    let mut stopping = setup.phase.clone();
    let mut accepting = true;
    loop {
        tokio::select! {
            handed = rx.recv(), if accepting => match handed {
                Some((stream, peer, pass)) => match TcpStream::from_std(stream) {
                    Ok(stream) => {
                        connections.spawn(connection(stream, peer, pass, setup.clone()));
                    }
                    Err(e) => tracing::warn!(error = %e, %peer, "cannot register a connection; dropped"),
                },
                // The acceptor stopped: the drain is on.
                None => accepting = false,
            },
            Some(_) = connections.join_next() => {}
            _ = stopping.wait_for(|p| *p == Phase::Stop) => return,
        }
        if !accepting && connections.is_empty() {
            // An upgraded (WebSocket) connection left hyper for a task of
            // this thread's runtime, which ends with this function: let
            // those tasks send their `reconnect` and close first.
            tokio::select! {
                () = sockets_closed(&setup.gate) => {}
                _ = stopping.wait_for(|p| *p == Phase::Stop) => {}
            }
            return;
        }
    }
}

/// Wait until no socket is open on the node (checked every 10 ms).
async fn sockets_closed(gate: &Gate) {
    while gate.open.load(Ordering::Relaxed) > 0 {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// One connection, from the TLS handshake (if any) to its close.
///
/// Not an `async fn`: its future would hold copies of what it hands on
/// (rustc does not overlap them), and an idle subscriber keeps this future
/// for its whole life. So it returns the plain path's future itself, or the
/// TLS path's boxed: a TLS stream and its handshake take several KiB, and
/// inline they made every plain connection's task that large too (5 KiB,
/// most of an idle subscriber's memory).
fn connection(
    stream: TcpStream,
    peer: SocketAddr,
    pass: Pass,
    setup: ThreadSetup,
) -> futures::future::Either<impl Future<Output = ()>, Pin<Box<impl Future<Output = ()>>>> {
    let activity = Arc::new(Activity::default());
    let io = Watched::new(stream, activity.clone(), setup.limits.write_timeout, pass);
    match setup.tls.clone() {
        None => futures::future::Either::Left(serve_http(io, peer, activity, setup)),
        Some(acceptor) => futures::future::Either::Right(Box::pin(serve_tls(acceptor, io, peer, activity, setup))),
    }
}

/// The TLS handshake, then [`serve_http`] over the TLS stream.
async fn serve_tls(
    acceptor: tokio_rustls::TlsAcceptor,
    io: Watched<TcpStream>,
    peer: SocketAddr,
    activity: Arc<Activity>,
    setup: ThreadSetup,
) {
    match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(io)).await {
        Ok(Ok(tls)) => serve_http(tls, peer, activity, setup).await,
        Ok(Err(e)) => tracing::debug!(error = %e, %peer, "TLS handshake failed"),
        Err(_) => tracing::debug!(%peer, "TLS handshake timed out"),
    }
}

/// Serve `io`: read its first request head; a stream subscription is
/// answered on the direct SSE path ([`direct_sse`]), anything else by
/// hyper ([`serve_hyper`]), which reads the head's bytes again first.
async fn serve_http<I>(mut io: I, peer: SocketAddr, activity: Arc<Activity>, setup: ThreadSetup)
where
    I: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let mut head = BytesMut::with_capacity(0);
    let mut phase = setup.phase.clone();
    // Boxed: the head's read (its timer, the phase watch) lives only until
    // the head is in, and inline it would size this future, which an idle
    // subscriber keeps for its whole life.
    let first = Box::pin(async {
        tokio::select! {
            first = tokio::time::timeout(setup.limits.header_timeout, direct_sse::read_first(&mut io, &mut head)) => {
                first.ok()
            }
            // Draining or stopping: hyper finishes (or drops) what was read.
            _ = phase.wait_for(|p| *p != Phase::Serving) => Some(direct_sse::First::Other),
        }
    })
    .await;
    let Some(first) = first else {
        tracing::debug!(%peer, reason = "header_timeout", "connection cut");
        metrics::counter!("finmesh_connections_cut_total", "reason" => "header_timeout").increment(1);
        return;
    };
    match first {
        direct_sse::First::Closed => {}
        direct_sse::First::Other => {
            let io = direct_sse::Prefixed::new(io, head.freeze());
            Box::pin(serve_hyper(io, peer, activity, setup)).await;
        }
        direct_sse::First::Subscription(parts) => {
            drop(head);
            let mut req = Request::from_parts(*parts, Body::empty());
            req.extensions_mut().insert(ConnectInfo(peer));
            activity.heads.fetch_add(1, Ordering::Relaxed);
            activity.in_flight.fetch_add(1, Ordering::Relaxed);
            let _in_flight = InFlight(activity);
            let _direct = DirectGauge::open();
            let answer = Box::pin(direct_sse::respond(&mut io, req, setup.app.clone()));
            tokio::select! {
                res = answer => if let Err(e) = res {
                    tracing::trace!(error = %e, %peer, "direct SSE connection ended with an error");
                },
                _ = phase.wait_for(|p| *p == Phase::Stop) => {}
            }
        }
    }
}

/// `finmesh_connections_direct_sse`: connections on the direct SSE path.
struct DirectGauge;

impl DirectGauge {
    fn open() -> Self {
        metrics::gauge!("finmesh_connections_direct_sse").increment(1.0);
        DirectGauge
    }
}

impl Drop for DirectGauge {
    fn drop(&mut self) {
        metrics::gauge!("finmesh_connections_direct_sse").decrement(1.0);
    }
}

/// Serve HTTP/1.1 or HTTP/2 on `io` until the client closes, the watchdog
/// cuts it, the drain finishes it, or [`Phase::Stop`].
async fn serve_hyper<I>(io: I, peer: SocketAddr, activity: Arc<Activity>, setup: ThreadSetup)
where
    I: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let mut builder = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new());
    // CONNECT protocol needed for HTTP/2 WebSockets (as axum::serve sets it).
    builder.http2().enable_connect_protocol();
    let service = ConnApp { app: setup.app.clone(), peer, activity: activity.clone() };
    let conn = builder.serve_connection_with_upgrades(TokioIo::new(io), service);
    tokio::pin!(conn);
    let limits = setup.limits;
    let mut phase = setup.phase.clone();
    let mut watchdog = Watchdog::new(&activity);
    let tick = tokio::time::sleep(limits.tick());
    tokio::pin!(tick);
    // A connection handed over just as the drain began finishes at once.
    let mut graceful = match *phase.borrow_and_update() {
        Phase::Serving => false,
        Phase::Draining => {
            conn.as_mut().graceful_shutdown();
            true
        }
        Phase::Stop => return,
    };
    loop {
        tokio::select! {
            res = conn.as_mut() => {
                if let Err(e) = res {
                    tracing::trace!(error = %e, %peer, "connection ended with an error");
                }
                return;
            }
            () = tick.as_mut() => {
                let now = Instant::now();
                if let Some(reason) = watchdog.check(&activity, &limits, now) {
                    tracing::debug!(%peer, reason, "connection cut");
                    metrics::counter!("finmesh_connections_cut_total", "reason" => reason).increment(1);
                    return;
                }
                tick.as_mut().reset(now + limits.tick());
            }
            changed = phase.changed() => {
                let now = if changed.is_err() { Phase::Stop } else { *phase.borrow_and_update() };
                match now {
                    Phase::Serving => {}
                    Phase::Draining if !graceful => {
                        graceful = true;
                        conn.as_mut().graceful_shutdown();
                    }
                    Phase::Draining => {}
                    Phase::Stop => return,
                }
            }
        }
    }
}

/// What a connection has done, counted by its IO and its requests; read
/// only by its [`Watchdog`].
#[derive(Default)]
struct Activity {
    /// Reads that returned bytes.
    reads: AtomicU64,
    /// Requests whose head was complete (the service was called).
    heads: AtomicU64,
    /// Requests between their head and the end (or drop) of their response.
    in_flight: AtomicUsize,
}

/// The read timeouts of one connection, judged from its [`Activity`] at
/// each tick (so a cut is at most one tick late).
struct Watchdog {
    heads: u64,
    reads: u64,
    /// Since when nothing has been in flight.
    quiet_since: Instant,
    /// Since when a request head has been awaited (the connection opened,
    /// or a byte of a new head was seen while quiet).
    head_since: Option<Instant>,
}

impl Watchdog {
    fn new(activity: &Activity) -> Self {
        let now = Instant::now();
        Watchdog {
            heads: activity.heads.load(Ordering::Relaxed),
            reads: activity.reads.load(Ordering::Relaxed),
            quiet_since: now,
            head_since: Some(now),
        }
    }

    /// The reason to cut the connection now, if any.
    fn check(&mut self, activity: &Activity, limits: &ConnectionLimits, now: Instant) -> Option<&'static str> {
        let heads = activity.heads.load(Ordering::Relaxed);
        let reads = activity.reads.load(Ordering::Relaxed);
        let busy = activity.in_flight.load(Ordering::Relaxed) > 0;
        if busy || heads != self.heads {
            // A request is running or ran since the last look: quiet from now.
            self.heads = heads;
            self.reads = reads;
            self.quiet_since = now;
            self.head_since = None;
            return None;
        }
        if reads != self.reads {
            self.reads = reads;
            self.head_since.get_or_insert(now);
        }
        match self.head_since {
            Some(since) if now - since >= limits.header_timeout => Some("header_timeout"),
            _ if now - self.quiet_since >= limits.idle_timeout => Some("idle_timeout"),
            _ => None,
        }
    }
}

/// A connection's socket, counting reads for its watchdog and failing a
/// write that waits longer than the write timeout. Holds the connection's
/// [`Pass`], so the counts are given back when the socket closes, after an
/// upgrade too.
struct Watched<T> {
    io: T,
    activity: Arc<Activity>,
    write_timeout: Duration,
    /// Armed while a write waits for the client; allocated on the first wait.
    write_deadline: Option<Pin<Box<Sleep>>>,
    write_waiting: bool,
    _pass: Pass,
}

impl<T> Watched<T> {
    fn new(io: T, activity: Arc<Activity>, write_timeout: Duration, pass: Pass) -> Self {
        Watched { io, activity, write_timeout, write_deadline: None, write_waiting: false, _pass: pass }
    }

    /// The inner write returned `Pending`: arm the deadline on the first
    /// wait, and fail once it passes.
    fn waiting<R>(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<R>> {
        if !self.write_waiting {
            self.write_waiting = true;
            let deadline = Instant::now() + self.write_timeout;
            match &mut self.write_deadline {
                Some(sleep) => sleep.as_mut().reset(deadline),
                None => self.write_deadline = Some(Box::pin(tokio::time::sleep_until(deadline))),
            }
        }
        let sleep = self.write_deadline.as_mut().expect("armed above");
        ready!(sleep.as_mut().poll(cx));
        metrics::counter!("finmesh_connections_cut_total", "reason" => "write_timeout").increment(1);
        Poll::Ready(Err(io::Error::new(io::ErrorKind::TimedOut, "the client read nothing within the write timeout")))
    }

    fn wrote<R>(&mut self, res: Poll<io::Result<R>>, cx: &mut Context<'_>) -> Poll<io::Result<R>> {
        match res {
            Poll::Pending => self.waiting(cx),
            done => {
                self.write_waiting = false;
                done
            }
        }
    }
}

impl<T: AsyncRead + Unpin> AsyncRead for Watched<T> {
    fn poll_read(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        let before = buf.filled().len();
        let res = Pin::new(&mut self.io).poll_read(cx, buf);
        if matches!(res, Poll::Ready(Ok(()))) && buf.filled().len() > before {
            self.activity.reads.fetch_add(1, Ordering::Relaxed);
        }
        res
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for Watched<T> {
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        let res = Pin::new(&mut self.io).poll_write(cx, buf);
        self.wrote(res, cx)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let res = Pin::new(&mut self.io).poll_write_vectored(cx, bufs);
        self.wrote(res, cx)
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let res = Pin::new(&mut self.io).poll_flush(cx);
        self.wrote(res, cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let res = Pin::new(&mut self.io).poll_shutdown(cx);
        self.wrote(res, cx)
    }
}

/// The app for one connection: every request gets the peer's address
/// (`ConnectInfo<SocketAddr>`, as axum's connect-info service does) and is
/// counted in flight until its response body ends.
#[derive(Clone)]
struct ConnApp {
    app: Router,
    peer: SocketAddr,
    activity: Arc<Activity>,
}

impl hyper::service::Service<Request<Incoming>> for ConnApp {
    type Response = Response<Tracked>;
    type Error = Infallible;
    type Future = Answer<<Router as Service<Request<Body>>>::Future>;

    fn call(&self, req: Request<Incoming>) -> Self::Future {
        let mut req = req.map(Body::new);
        req.extensions_mut().insert(ConnectInfo(self.peer));
        self.activity.heads.fetch_add(1, Ordering::Relaxed);
        self.activity.in_flight.fetch_add(1, Ordering::Relaxed);
        let in_flight = InFlight(self.activity.clone());
        // A Router is always ready (axum's own serve calls it the same way).
        let fut = self.app.clone().call(req);
        Answer { fut, in_flight: Some(in_flight) }
    }
}

/// One request in flight on its connection, until dropped.
struct InFlight(Arc<Activity>);

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.in_flight.fetch_sub(1, Ordering::Relaxed);
    }
}

pin_project_lite::pin_project! {
    /// The app's answer, its body tracked.
    struct Answer<F> {
        #[pin]
        fut: F,
        in_flight: Option<InFlight>,
    }
}

impl<F> Future for Answer<F>
where
    F: Future<Output = Result<Response<Body>, Infallible>>,
{
    type Output = Result<Response<Tracked>, Infallible>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.project();
        let res = ready!(this.fut.poll(cx))?;
        let in_flight = this.in_flight.take();
        Poll::Ready(Ok(res.map(|body| Tracked { body, _in_flight: in_flight })))
    }
}

/// A response body that keeps its request counted in flight while it lives.
struct Tracked {
    body: Body,
    _in_flight: Option<InFlight>,
}

impl hyper::body::Body for Tracked {
    type Data = bytes::Bytes;
    type Error = axum::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Self::Data>, Self::Error>>> {
        Pin::new(&mut self.body).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.body.size_hint()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn limits() -> ConnectionLimits {
        ConnectionLimits {
            header_timeout: Duration::from_secs(4),
            idle_timeout: Duration::from_secs(8),
            ..ConnectionLimits::default()
        }
    }

    #[tokio::test(start_paused = true)]
    async fn the_watchdog_times_heads_from_open_and_from_their_first_byte() {
        let (a, l) = (Activity::default(), limits());
        let s = Duration::from_secs(1);
        let t0 = Instant::now();
        let mut w = Watchdog::new(&a);
        assert_eq!(w.check(&a, &l, t0 + 3 * s), None);
        assert_eq!(w.check(&a, &l, t0 + 4 * s), Some("header_timeout"), "no head within 4 s of opening");

        // A request ran: quiet from then on, idle after 8 s without bytes.
        let mut w = Watchdog::new(&a);
        a.heads.fetch_add(1, Ordering::Relaxed);
        assert_eq!(w.check(&a, &l, t0 + s), None);
        assert_eq!(w.check(&a, &l, t0 + 8 * s), None);
        assert_eq!(w.check(&a, &l, t0 + 9 * s), Some("idle_timeout"));

        // A byte of the next head at 5 s: the head must be complete by 9 s.
        let mut w = Watchdog::new(&a);
        assert_eq!(w.check(&a, &l, t0 + s), None);
        a.heads.fetch_add(1, Ordering::Relaxed);
        assert_eq!(w.check(&a, &l, t0 + 2 * s), None);
        a.reads.fetch_add(1, Ordering::Relaxed);
        assert_eq!(w.check(&a, &l, t0 + 5 * s), None);
        assert_eq!(w.check(&a, &l, t0 + 8 * s), None);
        assert_eq!(w.check(&a, &l, t0 + 9 * s), Some("header_timeout"));

        // A request in flight (a subscription) is never cut by the watchdog.
        let mut w = Watchdog::new(&a);
        a.in_flight.fetch_add(1, Ordering::Relaxed);
        assert_eq!(w.check(&a, &l, t0 + 100 * s), None);
        assert_eq!(w.check(&a, &l, t0 + 1000 * s), None);
    }

    /// An idle subscriber keeps its connection's future for its whole
    /// life: with the TLS path inline it was 5 KiB, half of what an idle
    /// subscriber cost (`finmesh-bench --scenario fanout-idle`: 10.4 KiB per
    /// subscriber then, 5.2 KiB with the TLS path boxed).
    #[tokio::test]
    async fn a_connection_future_stays_small() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let _client = TcpStream::connect(listener.local_addr().unwrap()).await.unwrap();
        let (stream, peer) = listener.accept().await.unwrap();
        let gate = Arc::new(Gate::new(limits()));
        let pass = gate.admit(peer.ip()).unwrap();
        let (_phase_tx, phase) = watch::channel(Phase::Serving);
        let setup = ThreadSetup { app: Router::new(), limits: limits(), tls: None, phase, gate };
        let task = connection(stream, peer, pass, setup);
        let size = std::mem::size_of_val(&task);
        assert!(size <= 2048, "a connection's future takes {size} bytes");
    }

    #[test]
    fn the_gate_caps_the_node_and_each_address() {
        let gate = Arc::new(Gate::new(ConnectionLimits {
            max_connections: 3,
            max_connections_per_address: 2,
            ..ConnectionLimits::default()
        }));
        let (a, b): (IpAddr, IpAddr) = ("10.0.0.1".parse().unwrap(), "10.0.0.2".parse().unwrap());
        let a1 = gate.admit(a).unwrap();
        let _a2 = gate.admit(a).unwrap();
        assert_eq!(gate.admit(a).err(), Some(Refused::AddressLimit));
        // The same address written as IPv4-mapped IPv6 is the same client.
        assert_eq!(gate.admit("::ffff:10.0.0.1".parse().unwrap()).err(), Some(Refused::AddressLimit));
        let _b1 = gate.admit(b).unwrap();
        assert_eq!(gate.admit(b).err(), Some(Refused::NodeLimit));
        drop(a1);
        let _b2 = gate.admit(b).unwrap();
        assert_eq!(gate.by_address.lock().unwrap().len(), 2);
    }
}
