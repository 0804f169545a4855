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
//! - a TLS handshake runs on its connection's thread, concurrently with the
//!   others, for at most [`HANDSHAKE_TIMEOUT`];
//! - [`Phase::Draining`]: the acceptor stops (new connections are refused by
//!   the kernel once the listener is closed) and every connection finishes
//!   its in-flight request, then closes (hyper's graceful shutdown; HTTP/2
//!   gets GOAWAY); [`Phase::Stop`]: every connection is dropped at once.
//!   Work the engine acked stays acked either way.

use std::convert::Infallible;
use std::future::{Ready, ready};
use std::io;
use std::net::SocketAddr;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use anyhow::Context as _;
use axum::Router;
use axum::extract::{ConnectInfo, Request};
use axum::response::Response;
use axum::serve::{IncomingStream, Listener};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, watch};
use tokio::task::JoinSet;
use tower::Service;

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

/// The running threads; [`Servers::wait`] returns once all have stopped.
pub struct Servers {
    threads: Vec<std::thread::JoinHandle<()>>,
    acceptor: tokio::task::JoinHandle<()>,
}

/// Start `threads` serving threads for `app` on `listener` (a bound,
/// non-blocking socket), with TLS when `tls` is given. Must be called
/// inside a tokio runtime, which runs the acceptor.
pub fn start(
    listener: std::net::TcpListener,
    tls: Option<Arc<rustls::ServerConfig>>,
    app: Router,
    threads: usize,
    phase: watch::Receiver<Phase>,
) -> anyhow::Result<Servers> {
    let local = listener.local_addr()?;
    let listener = TcpListener::from_std(listener).context("registering the listener")?;
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
        let (app, phase, tls) = (app.clone(), phase.clone(), tls.clone());
        let handle = std::thread::Builder::new()
            .name(format!("finmesh-serve-{i}"))
            .spawn(move || {
                runtime.block_on(async move {
                    match tls {
                        None => serve(Handed { rx, local }, app, phase).await,
                        Some(config) => {
                            let tls = HandedTls {
                                rx: Some(rx),
                                local,
                                acceptor: tokio_rustls::TlsAcceptor::from(config),
                                handshakes: JoinSet::new(),
                            };
                            serve(tls, app, phase).await
                        }
                    }
                });
            })
            .context("spawning a serving thread")?;
        handles.push(handle);
    }
    let acceptor = tokio::spawn(accept(listener, senders, phase));
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

/// Hand accepted connections to the threads in turn until the drain starts.
async fn accept(
    listener: TcpListener,
    threads: Vec<mpsc::Sender<(std::net::TcpStream, SocketAddr)>>,
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
        if threads[next].send((stream, peer)).await.is_err() {
            return; // that thread has stopped: so is the server
        }
        accepted_by[next].increment(1);
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

/// One thread's server: until [`Phase::Draining`] gracefully, or until
/// [`Phase::Stop`] at once.
async fn serve<L: Listener<Addr = SocketAddr>>(listener: L, app: Router, phase: watch::Receiver<Phase>) {
    let mut draining = phase.clone();
    let mut stopping = phase;
    let server = axum::serve(listener, WithPeer(app)).with_graceful_shutdown(async move {
        let _ = draining.wait_for(|p| *p != Phase::Serving).await;
    });
    tokio::select! {
        res = server => {
            if let Err(e) = res {
                tracing::error!(error = %e, "a serving thread failed");
            }
        }
        _ = stopping.wait_for(|p| *p == Phase::Stop) => {}
    }
}

/// Connections handed to this thread by the acceptor.
struct Handed {
    rx: mpsc::Receiver<(std::net::TcpStream, SocketAddr)>,
    local: SocketAddr,
}

impl Listener for Handed {
    type Io = TcpStream;
    type Addr = SocketAddr;

    async fn accept(&mut self) -> (TcpStream, SocketAddr) {
        loop {
            let Some((stream, peer)) = self.rx.recv().await else {
                // The acceptor stopped: the drain is on and ends this server.
                return std::future::pending().await;
            };
            match TcpStream::from_std(stream) {
                Ok(stream) => return (stream, peer),
                Err(e) => tracing::warn!(error = %e, %peer, "cannot register a connection; dropped"),
            }
        }
    }

    fn local_addr(&self) -> io::Result<SocketAddr> {
        Ok(self.local)
    }
}

/// The same, each connection after its TLS handshake.
struct HandedTls {
    /// `None` once the acceptor has stopped.
    rx: Option<mpsc::Receiver<(std::net::TcpStream, SocketAddr)>>,
    local: SocketAddr,
    acceptor: tokio_rustls::TlsAcceptor,
    handshakes: JoinSet<Option<(tokio_rustls::server::TlsStream<TcpStream>, SocketAddr)>>,
}

impl Listener for HandedTls {
    type Io = tokio_rustls::server::TlsStream<TcpStream>;
    type Addr = SocketAddr;

    async fn accept(&mut self) -> (Self::Io, SocketAddr) {
        enum Event<T> {
            Raw(Option<(std::net::TcpStream, SocketAddr)>),
            Done(T),
        }
        loop {
            let event = match &mut self.rx {
                Some(rx) => tokio::select! {
                    raw = rx.recv() => Event::Raw(raw),
                    Some(done) = self.handshakes.join_next() => Event::Done(done),
                },
                None => match self.handshakes.join_next().await {
                    Some(done) => Event::Done(done),
                    // Acceptor stopped, no handshake left: the drain ends this server.
                    None => return std::future::pending().await,
                },
            };
            match event {
                Event::Raw(Some((stream, peer))) => match TcpStream::from_std(stream) {
                    Ok(stream) => {
                        self.handshakes.spawn(handshake(self.acceptor.clone(), stream, peer));
                    }
                    Err(e) => tracing::warn!(error = %e, %peer, "cannot register a connection; dropped"),
                },
                Event::Raw(None) => self.rx = None,
                Event::Done(Ok(Some(conn))) => return conn,
                Event::Done(_) => {}
            }
        }
    }

    fn local_addr(&self) -> io::Result<SocketAddr> {
        Ok(self.local)
    }
}

/// A TLS handshake, bounded by [`HANDSHAKE_TIMEOUT`]; `None` if it failed.
async fn handshake(
    acceptor: tokio_rustls::TlsAcceptor,
    stream: TcpStream,
    peer: SocketAddr,
) -> Option<(tokio_rustls::server::TlsStream<TcpStream>, SocketAddr)> {
    match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(stream)).await {
        Ok(Ok(tls)) => Some((tls, peer)),
        Ok(Err(e)) => {
            tracing::debug!(error = %e, %peer, "TLS handshake failed");
            None
        }
        Err(_) => {
            tracing::debug!(%peer, "TLS handshake timed out");
            None
        }
    }
}

/// Makes, per connection, the app with the peer's address in every request
/// (`ConnectInfo<SocketAddr>`, as axum's own connect-info service does).
#[derive(Clone)]
struct WithPeer(Router);

impl<'a, L: Listener<Addr = SocketAddr>> Service<IncomingStream<'a, L>> for WithPeer {
    type Response = PeerApp;
    type Error = Infallible;
    type Future = Ready<Result<PeerApp, Infallible>>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, incoming: IncomingStream<'a, L>) -> Self::Future {
        ready(Ok(PeerApp { app: self.0.clone(), peer: *incoming.remote_addr() }))
    }
}

/// The app for one connection.
#[derive(Clone)]
struct PeerApp {
    app: Router,
    peer: SocketAddr,
}

impl Service<Request> for PeerApp {
    type Response = Response;
    type Error = Infallible;
    type Future = <Router as Service<Request>>::Future;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        Service::<Request>::poll_ready(&mut self.app, cx)
    }

    fn call(&mut self, mut req: Request) -> Self::Future {
        req.extensions_mut().insert(ConnectInfo(self.peer));
        self.app.call(req)
    }
}
