//! A delaying, cuttable TCP proxy: a simulated wide-area link on loopback.
//!
//! There is no `tc netem` on the machines finmesh is tested on, so tests put
//! a [`DelayProxy`] between two processes (a leaf and its hub, say) to give
//! the link latency, jitter and outages.
//!
//! How data moves: every accepted connection is served by one task that
//! connects to the first reachable target and runs two directions. A
//! direction reads whatever the socket has (up to [`READ_CHUNK`] bytes),
//! stamps the chunk with its release time `t + delay ± jitter` and queues it
//! on a bounded channel; a writer waits for each chunk's release time and
//! writes it. Reading never waits for the delay, so many chunks are in
//! flight at once and a 40 ms link still carries hundreds of MB/s (the
//! bandwidth-delay product is bounded by [`QUEUE_CHUNKS`] × [`READ_CHUNK`]
//! per direction).
//!
//! Invariants:
//! - order and content are preserved per direction: release times never
//!   decrease (a chunk whose jittered time falls before its predecessor's
//!   waits for it), and chunks are written in the order they were read;
//! - bytes read at time `t` are not written before `t + delay - jitter`
//!   (never before `t`); a half-close (EOF) travels with the same delay;
//! - an I/O error on either side ends both directions of that connection;
//! - [`DelayProxy::cut`] returns only after the listener is closed (new
//!   connects are refused) and every open connection is closed;
//!   [`DelayProxy::restore`] listens again on the same address;
//! - dropping the proxy aborts its accept task and every connection task.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::{TcpListener, TcpSocket, TcpStream};
use tokio::sync::mpsc;
use tokio::task::{JoinHandle, JoinSet};
use tokio::time::Instant;

use crate::{Error, Result};

/// Most bytes read from a socket into one chunk.
pub const READ_CHUNK: usize = 64 * 1024;

/// Chunks queued per direction (the in-flight bound of a delayed link).
pub const QUEUE_CHUNKS: usize = 256;

/// How long the proxy waits for one target to accept a connection.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(2);

/// Options of a [`DelayProxy`]; see [`DelayProxy::builder`].
#[derive(Debug, Clone)]
pub struct DelayProxyBuilder {
    targets: Vec<SocketAddr>,
    delay: Duration,
    jitter: Duration,
}

impl DelayProxyBuilder {
    /// Also forward to `target` when the targets before it refuse (e.g. the
    /// other nodes of a cluster). Targets are tried in the order given.
    pub fn target(mut self, target: SocketAddr) -> Self {
        self.targets.push(target);
        self
    }

    /// One-way latency added to each direction (default none).
    pub fn delay(mut self, delay: Duration) -> Self {
        self.delay = delay;
        self
    }

    /// Each chunk's delay varies uniformly within `delay ± jitter` (default
    /// none); order is still preserved.
    pub fn jitter(mut self, jitter: Duration) -> Self {
        self.jitter = jitter;
        self
    }

    /// Listen on a free loopback port and start forwarding.
    pub async fn start(self) -> Result<DelayProxy> {
        let listener = bind(SocketAddr::from(([127, 0, 0, 1], 0)))?;
        let addr = listener.local_addr().map_err(|e| Error::io("reading the proxy's address", e))?;
        let shared = Arc::new(Shared {
            targets: self.targets,
            delay_ns: AtomicU64::new(nanos(self.delay)),
            jitter_ns: AtomicU64::new(nanos(self.jitter)),
            cut: AtomicBool::new(false),
            connections: Mutex::new(JoinSet::new()),
            accept: Mutex::new(None),
        });
        *lock(&shared.accept) = Some(tokio::spawn(accept_loop(listener, shared.clone())));
        tracing::debug!(%addr, targets = ?shared.targets, "delay proxy listening");
        Ok(DelayProxy { addr, shared })
    }
}

/// A TCP proxy on `127.0.0.1:<free port>` that delays, and can cut, the
/// traffic to its target; see the module doc.
///
/// ```no_run
/// # async fn f(target: std::net::SocketAddr) -> finmesh_testkit::Result<()> {
/// use std::time::Duration;
/// let proxy = finmesh_testkit::DelayProxy::builder(target).delay(Duration::from_millis(40)).start().await?;
/// let addr = proxy.addr(); // connect here instead of to `target`
/// proxy.cut().await; // existing connections closed, new ones refused
/// proxy.restore().await?;
/// proxy.set_delay(Duration::ZERO);
/// # Ok(()) }
/// ```
#[derive(Debug)]
pub struct DelayProxy {
    addr: SocketAddr,
    shared: Arc<Shared>,
}

/// State shared by the handle, the accept task and the connection tasks.
#[derive(Debug)]
struct Shared {
    /// Where connections go, tried in order.
    targets: Vec<SocketAddr>,
    /// One-way delay in ns; atomics so it can change while chunks flow.
    delay_ns: AtomicU64,
    /// Jitter in ns.
    jitter_ns: AtomicU64,
    /// Is the link cut? Connections accepted while it is are dropped.
    cut: AtomicBool,
    /// Every connection's task; std mutex, never held across an await
    /// (cut takes the whole set out before awaiting it).
    connections: Mutex<JoinSet<()>>,
    /// The accept task, `None` while cut.
    accept: Mutex<Option<JoinHandle<()>>>,
}

impl DelayProxy {
    /// Options for a proxy forwarding to `target`.
    pub fn builder(target: SocketAddr) -> DelayProxyBuilder {
        DelayProxyBuilder { targets: vec![target], delay: Duration::ZERO, jitter: Duration::ZERO }
    }

    /// A proxy to `target` with `delay` one way and no jitter.
    pub async fn start(target: SocketAddr, delay: Duration) -> Result<DelayProxy> {
        Self::builder(target).delay(delay).start().await
    }

    /// The address to connect to instead of the target.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// The proxy's port on 127.0.0.1.
    pub fn port(&self) -> u16 {
        self.addr.port()
    }

    /// The targets, in the order they are tried.
    pub fn targets(&self) -> &[SocketAddr] {
        &self.shared.targets
    }

    /// The current one-way delay.
    pub fn delay(&self) -> Duration {
        Duration::from_nanos(self.shared.delay_ns.load(Ordering::Relaxed))
    }

    /// Change the one-way delay; applies to bytes read from now on.
    pub fn set_delay(&self, delay: Duration) {
        self.shared.delay_ns.store(nanos(delay), Ordering::Relaxed);
    }

    /// The current jitter.
    pub fn jitter(&self) -> Duration {
        Duration::from_nanos(self.shared.jitter_ns.load(Ordering::Relaxed))
    }

    /// Change the jitter; applies to bytes read from now on.
    pub fn set_jitter(&self, jitter: Duration) {
        self.shared.jitter_ns.store(nanos(jitter), Ordering::Relaxed);
    }

    /// Is the link cut?
    pub fn is_cut(&self) -> bool {
        self.shared.cut.load(Ordering::SeqCst)
    }

    /// Connections currently open through the proxy.
    pub fn open_connections(&self) -> usize {
        let mut conns = lock(&self.shared.connections);
        while conns.try_join_next().is_some() {}
        conns.len()
    }

    /// Cut the link: stop listening (connects are refused) and close every
    /// open connection. Returns once both are done. Cutting twice is a no-op.
    pub async fn cut(&self) {
        self.shared.cut.store(true, Ordering::SeqCst);
        let accept = lock(&self.shared.accept).take();
        if let Some(accept) = accept {
            accept.abort();
            let _ = accept.await;
        }
        let mut conns = std::mem::take(&mut *lock(&self.shared.connections));
        conns.shutdown().await;
        tracing::debug!(addr = %self.addr, "delay proxy cut");
    }

    /// Restore a cut link: listen again on the same address. A no-op if the
    /// link is not cut. Fails if another process took the port meanwhile.
    pub async fn restore(&self) -> Result<()> {
        if lock(&self.shared.accept).is_some() {
            return Ok(());
        }
        let listener = bind(self.addr)?;
        self.shared.cut.store(false, Ordering::SeqCst);
        *lock(&self.shared.accept) = Some(tokio::spawn(accept_loop(listener, self.shared.clone())));
        tracing::debug!(addr = %self.addr, "delay proxy restored");
        Ok(())
    }
}

impl Drop for DelayProxy {
    fn drop(&mut self) {
        if let Some(accept) = lock(&self.shared.accept).take() {
            accept.abort();
        }
        lock(&self.shared.connections).abort_all();
    }
}

/// Lock a std mutex; a poisoned one is still usable (the data are handles).
fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

fn nanos(d: Duration) -> u64 {
    u64::try_from(d.as_nanos()).unwrap_or(u64::MAX)
}

/// A listener with SO_REUSEADDR, so [`DelayProxy::restore`] can bind the
/// port again right after the cut closed it.
fn bind(addr: SocketAddr) -> Result<TcpListener> {
    let context = || format!("binding the delay proxy to {addr}");
    let socket = TcpSocket::new_v4().map_err(|e| Error::io(context(), e))?;
    socket.set_reuseaddr(true).map_err(|e| Error::io(context(), e))?;
    socket.bind(addr).map_err(|e| Error::io(context(), e))?;
    socket.listen(1024).map_err(|e| Error::io(context(), e))
}

async fn accept_loop(listener: TcpListener, shared: Arc<Shared>) {
    loop {
        let client = match listener.accept().await {
            Ok((client, _)) => client,
            Err(e) => {
                // EMFILE and the like: back off instead of spinning.
                tracing::warn!(error = %e, "delay proxy accept failed");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        if shared.cut.load(Ordering::SeqCst) {
            continue; // accepted in the instant of a cut: drop it
        }
        let mut conns = lock(&shared.connections);
        while conns.try_join_next().is_some() {}
        conns.spawn(serve(client, shared.clone()));
    }
}

async fn serve(client: TcpStream, shared: Arc<Shared>) {
    let Some(upstream) = connect_any(&shared.targets).await else {
        tracing::debug!(targets = ?shared.targets, "delay proxy: no target reachable; closing the client");
        return;
    };
    let _ = client.set_nodelay(true);
    let _ = upstream.set_nodelay(true);
    let (client_read, client_write) = client.into_split();
    let (upstream_read, upstream_write) = upstream.into_split();
    let res = tokio::try_join!(
        direction(client_read, upstream_write, &shared),
        direction(upstream_read, client_write, &shared),
    );
    if let Err(e) = res {
        tracing::debug!(error = %e, "delay proxy connection ended");
    }
}

async fn connect_any(targets: &[SocketAddr]) -> Option<TcpStream> {
    for target in targets {
        if let Ok(Ok(s)) = tokio::time::timeout(CONNECT_TIMEOUT, TcpStream::connect(target)).await {
            return Some(s);
        }
    }
    None
}

/// One queued chunk: `None` data is the sender's EOF.
struct Chunk {
    release: Instant,
    data: Option<Bytes>,
}

/// Forward `from` to `to` with the proxy's delay; see the module doc.
async fn direction(mut from: OwnedReadHalf, mut to: OwnedWriteHalf, shared: &Shared) -> std::io::Result<()> {
    let (tx, mut rx) = mpsc::channel::<Chunk>(QUEUE_CHUNKS);
    let read = async move {
        let mut buf = BytesMut::new();
        let mut last_release = Instant::now();
        loop {
            buf.reserve(READ_CHUNK);
            let n = (&mut from).take(READ_CHUNK as u64).read_buf(&mut buf).await?;
            let release = release_time(Instant::now(), shared).max(last_release);
            last_release = release;
            let data = (n > 0).then(|| buf.split().freeze());
            let eof = data.is_none();
            if tx.send(Chunk { release, data }).await.is_err() || eof {
                return Ok::<(), std::io::Error>(());
            }
        }
    };
    let write = async move {
        while let Some(chunk) = rx.recv().await {
            tokio::time::sleep_until(chunk.release).await;
            match chunk.data {
                Some(data) => to.write_all(&data).await?,
                None => {
                    to.shutdown().await?;
                    break;
                }
            }
        }
        Ok(())
    };
    tokio::try_join!(read, write).map(|_| ())
}

/// `now + delay ± jitter`, never before `now`.
fn release_time(now: Instant, shared: &Shared) -> Instant {
    let delay = shared.delay_ns.load(Ordering::Relaxed);
    let jitter = shared.jitter_ns.load(Ordering::Relaxed);
    let ns = if jitter == 0 {
        delay
    } else {
        let low = delay.saturating_sub(jitter);
        let high = delay.saturating_add(jitter);
        fastrand::u64(low..=high)
    };
    now + Duration::from_nanos(ns)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn shared(delay_ms: u64, jitter_ms: u64) -> Shared {
        Shared {
            targets: Vec::new(),
            delay_ns: AtomicU64::new(delay_ms * 1_000_000),
            jitter_ns: AtomicU64::new(jitter_ms * 1_000_000),
            cut: AtomicBool::new(false),
            connections: Mutex::new(JoinSet::new()),
            accept: Mutex::new(None),
        }
    }

    #[tokio::test]
    async fn release_time_stays_within_delay_plus_minus_jitter() {
        let now = Instant::now();
        assert_eq!(release_time(now, &shared(40, 0)), now + Duration::from_millis(40));
        let s = shared(40, 5);
        for _ in 0..1000 {
            let d = release_time(now, &s) - now;
            assert!(d >= Duration::from_millis(35) && d <= Duration::from_millis(45), "{d:?}");
        }
        // Jitter larger than the delay never releases before `now`.
        let s = shared(1, 10);
        for _ in 0..100 {
            assert!(release_time(now, &s) >= now);
        }
    }
}
