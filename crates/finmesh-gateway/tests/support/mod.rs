//! Shared test support: engine harnesses, a gateway under test (through
//! `oneshot` or a real socket), an SSE reader, and the `per_engine!` macro
//! that stamps each case once per engine.
//!
//! Adding an engine = one harness type here and one line in `per_engine!`.
//! Engines: [`Embedded`] (fjall on a temp dir) and [`Nats`] (a fresh
//! `nats-server` per case from the test kit).

#![allow(dead_code)]

pub mod auth;
pub mod counting;

use std::any::Any;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::body::{Body, Bytes};
use axum::http::{HeaderMap, Method, Request, StatusCode};
use finmesh_auth::{Authenticator, ClientRegistry};
use finmesh_core::Engine;
use finmesh_gateway::{AppState, GatewayConfig, app};
use futures::StreamExt;
use http_body_util::BodyExt;
use tower::ServiceExt;

/// How an engine for a gateway test is started.
pub trait Harness: Send + Sync + 'static {
    /// A fresh engine and whatever must live as long as it (temp dirs, servers).
    fn start() -> impl std::future::Future<Output = (Arc<dyn Engine>, Box<dyn Any + Send + Sync>)> + Send;
}

/// The embedded engine on a temporary directory.
pub struct Embedded;

impl Harness for Embedded {
    async fn start() -> (Arc<dyn Engine>, Box<dyn Any + Send + Sync>) {
        let dir = tempfile::tempdir().expect("temp dir");
        let engine = finmesh_embedded::EmbeddedEngine::open(dir.path()).expect("open embedded engine");
        (Arc::new(engine), Box::new(dir))
    }
}

/// The NATS engine on its own `nats-server -js` (test kit: free ports, a
/// temporary store), one per case.
pub struct Nats;

/// Keeps the server alive as long as the gateway; the engine connection
/// (held by the state, dropped first) closes before the server stops.
struct NatsGuard {
    _server: finmesh_testkit::NatsServer,
}

impl Harness for Nats {
    async fn start() -> (Arc<dyn Engine>, Box<dyn Any + Send + Sync>) {
        let server = finmesh_testkit::NatsServer::start().await.expect("start nats-server");
        let options = finmesh_nats::NatsEngineOptions::new(server.url());
        let engine = finmesh_nats::NatsEngine::connect(options).await.expect("connect the NATS engine");
        (Arc::new(engine), Box::new(NatsGuard { _server: server }))
    }
}

/// Stamp every listed case (an `async fn case<H: Harness>()`) once per
/// engine: one `stamp_cases!` line per engine.
#[macro_export]
macro_rules! per_engine {
    ($($case:ident),* $(,)?) => {
        $crate::stamp_cases!(embedded, Embedded; $($case),*);
        $crate::stamp_cases!(nats, Nats; $($case),*);
    };
}

/// One module of `#[tokio::test]`s running `cases` with `harness`.
#[macro_export]
macro_rules! stamp_cases {
    ($module:ident, $harness:ident; $($case:ident),*) => {
        mod $module {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $case() {
                    let case = super::$case::<super::support::$harness>();
                    tokio::time::timeout(std::time::Duration::from_secs(60), case).await.expect("case timed out");
                }
            )*
        }
    };
}

/// A gateway over a fresh engine.
pub struct Gw {
    pub state: AppState,
    pub app: Router,
    _guard: Box<dyn Any + Send + Sync>,
}

/// A response, collected.
pub struct Res {
    pub status: StatusCode,
    pub headers: HeaderMap,
    pub body: Bytes,
}

impl Res {
    pub fn json(&self) -> serde_json::Value {
        serde_json::from_slice(&self.body)
            .unwrap_or_else(|e| panic!("body is not JSON ({e}): {}", String::from_utf8_lossy(&self.body)))
    }

    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name).and_then(|v| v.to_str().ok())
    }

    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }

    /// Assert a problem+json body with `status` and type slug `slug`.
    pub fn assert_problem(&self, status: u16, slug: &str) -> serde_json::Value {
        assert_eq!(self.status.as_u16(), status, "body: {}", self.text());
        assert_eq!(self.header("content-type"), Some("application/problem+json"), "body: {}", self.text());
        let p = self.json();
        assert_eq!(p["type"], format!("https://finmesh.dev/problems/{slug}"), "{p}");
        assert_eq!(p["status"], status, "{p}");
        assert!(p["title"].as_str().is_some_and(|t| !t.is_empty()), "{p}");
        assert!(p["detail"].as_str().is_some(), "{p}");
        p
    }
}

impl Gw {
    pub async fn start<H: Harness>() -> Self {
        Self::with_config::<H>(GatewayConfig::default()).await
    }

    pub async fn with_config<H: Harness>(config: GatewayConfig) -> Self {
        Self::build::<H>(Authenticator::disabled(), config, None).await
    }

    /// A gateway that verifies tokens with `auth`, serving `/oauth/token`
    /// when `oauth` is given.
    pub async fn with_auth<H: Harness>(auth: Authenticator, oauth: Option<Arc<ClientRegistry>>) -> Self {
        Self::build::<H>(auth, GatewayConfig::default(), oauth).await
    }

    /// The general constructor.
    pub async fn build<H: Harness>(
        auth: Authenticator,
        config: GatewayConfig,
        oauth: Option<Arc<ClientRegistry>>,
    ) -> Self {
        let (engine, guard) = H::start().await;
        let mut state = AppState::new(engine, auth, config);
        if let Some(clients) = oauth {
            state = state.with_oauth(clients);
        }
        Gw { app: app(state.clone()), state, _guard: guard }
    }

    /// A gateway whose engine is wrapped in the encrypting wrapper
    /// ([`finmesh_crypto::SecureEngine`], key ring in the engine, master
    /// key in a temporary file, key administration on), as a node with
    /// `[security]` runs; also
    /// returns the engine under the wrapper, to look at what is stored.
    pub async fn secure<H: Harness>() -> (Self, Arc<dyn Engine>) {
        Self::secure_with::<H>(GatewayConfig::default()).await
    }

    /// [`secure`](Self::secure) with `config`.
    pub async fn secure_with<H: Harness>(config: GatewayConfig) -> (Self, Arc<dyn Engine>) {
        let (raw, guard) = H::start().await;
        Self::secure_over(raw, guard, config).await
    }

    /// [`secure`](Self::secure) with a [`counting::CountingEngine`]
    /// between the wrapper and the engine (so also under the key
    /// administration); also returns it.
    pub async fn secure_counting<H: Harness>() -> (Self, Arc<dyn Engine>, Arc<counting::CountingEngine>) {
        let (engine, guard) = H::start().await;
        let counting = counting::CountingEngine::new(engine);
        let (gw, raw) = Self::secure_over(counting.clone(), guard, GatewayConfig::default()).await;
        (gw, raw, counting)
    }

    async fn secure_over(
        raw: Arc<dyn Engine>,
        guard: Box<dyn Any + Send + Sync>,
        config: GatewayConfig,
    ) -> (Self, Arc<dyn Engine>) {
        let dir = tempfile::tempdir().expect("temp dir");
        let path = dir.path().join("master.key");
        finmesh_crypto::FileKeyProvider::create(&path).expect("create a master key");
        let provider = finmesh_crypto::FileKeyProvider::new(path);
        let kv: Arc<dyn finmesh_core::KvEngine> = raw.clone();
        let ring_bucket = finmesh_crypto::keys_bucket_config(1);
        let keys =
            Arc::new(finmesh_crypto::RingStore::open_or_create(kv, &provider, ring_bucket).await.expect("key ring"));
        let engine = Arc::new(finmesh_crypto::SecureEngine::new(raw.clone(), keys));
        let admin = Arc::new(finmesh_crypto::KeyAdmin::new(engine.clone()));
        let state = AppState::new(engine, Authenticator::disabled(), config).with_key_admin(admin);
        (Gw { app: app(state.clone()), state, _guard: Box::new((guard, dir)) }, raw)
    }

    /// A gateway whose engine is wrapped in a [`counting::CountingEngine`]
    /// (the real engine does the work; reads and tails are counted).
    pub async fn counting<H: Harness>(config: GatewayConfig) -> (Self, Arc<counting::CountingEngine>) {
        let (engine, guard) = H::start().await;
        let counting = counting::CountingEngine::new(engine);
        let state = AppState::new(counting.clone(), Authenticator::disabled(), config);
        (Gw { app: app(state.clone()), state, _guard: guard }, counting)
    }

    /// Send a request through `oneshot` and collect the response.
    pub async fn send(&self, method: Method, uri: &str, headers: &[(&str, &str)], body: impl Into<Body>) -> Res {
        let mut req = Request::builder().method(method).uri(uri);
        for (k, v) in headers {
            req = req.header(*k, *v);
        }
        let res = self.app.clone().oneshot(req.body(body.into()).expect("request")).await.expect("infallible");
        let (parts, body) = res.into_parts();
        let body = body.collect().await.expect("body").to_bytes();
        Res { status: parts.status, headers: parts.headers, body }
    }

    /// Send a request through `oneshot` and return the response with its
    /// body unread (subscriptions never end by themselves).
    pub async fn send_head(&self, method: Method, uri: &str, headers: &[(&str, &str)]) -> axum::response::Response {
        let mut req = Request::builder().method(method).uri(uri);
        for (k, v) in headers {
            req = req.header(*k, *v);
        }
        self.app.clone().oneshot(req.body(Body::empty()).expect("request")).await.expect("infallible")
    }

    pub async fn get(&self, uri: &str) -> Res {
        self.send(Method::GET, uri, &[], Body::empty()).await
    }

    pub async fn put(&self, uri: &str, body: impl Into<Body>) -> Res {
        self.send(Method::PUT, uri, &[], body).await
    }

    pub async fn post(&self, uri: &str, body: impl Into<Body>) -> Res {
        self.send(Method::POST, uri, &[], body).await
    }

    pub async fn delete(&self, uri: &str) -> Res {
        self.send(Method::DELETE, uri, &[], Body::empty()).await
    }

    /// Create stream `name` capturing `subjects` with extra config members.
    pub async fn stream(&self, name: &str, config: serde_json::Value) {
        let r = self.put(&format!("/v1/streams/{name}"), config.to_string()).await;
        assert_eq!(r.status, StatusCode::OK, "create stream: {}", r.text());
    }

    /// Publish `n` JSON messages `{"i": k}` on `subject` (one NDJSON batch).
    pub async fn publish_n(&self, stream: &str, subject: &str, n: usize) {
        let mut body = String::new();
        for i in 0..n {
            body.push_str(&format!("{{\"subject\":\"{subject}\",\"payload\":{{\"i\":{i}}}}}\n"));
        }
        let r = self
            .send(
                Method::POST,
                &format!("/v1/streams/{stream}/messages"),
                &[("content-type", "application/x-ndjson")],
                body,
            )
            .await;
        assert_eq!(r.status, StatusCode::OK, "publish: {}", r.text());
    }

    /// Serve the app on a real loopback socket until the gateway drains.
    pub async fn serve(&self) -> SocketAddr {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("addr");
        let app = self.app.clone();
        let drain = self.state.drain_token();
        tokio::spawn(async move {
            let _ = axum::serve(listener, app).with_graceful_shutdown(async move { drain.cancelled().await }).await;
        });
        addr
    }
}

/// One parsed SSE event.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct SseEvent {
    pub event: Option<String>,
    pub id: Option<String>,
    pub data: String,
    pub retry: Option<u64>,
}

impl SseEvent {
    pub fn json(&self) -> serde_json::Value {
        serde_json::from_str(&self.data).unwrap_or_else(|e| panic!("data is not JSON ({e}): {}", self.data))
    }

    pub fn seq(&self) -> u64 {
        self.id.as_deref().and_then(|s| s.parse().ok()).unwrap_or_else(|| panic!("event has no numeric id: {self:?}"))
    }
}

/// A minimal SSE parser over any byte stream (reqwest or an axum body).
pub struct SseReader {
    stream: futures::stream::BoxStream<'static, Result<Bytes, String>>,
    buf: String,
    /// Bytes of a character split across chunks, not yet in `buf`.
    pending: Vec<u8>,
    /// Comment lines seen (heartbeats).
    pub comments: usize,
}

impl SseReader {
    pub fn new<S, E>(stream: S) -> Self
    where
        S: futures::Stream<Item = Result<Bytes, E>> + Send + 'static,
        E: std::fmt::Display,
    {
        SseReader {
            stream: stream.map(|r| r.map_err(|e| e.to_string())).boxed(),
            buf: String::new(),
            pending: Vec::new(),
            comments: 0,
        }
    }

    /// Append a chunk to `buf`, keeping a UTF-8 character that a chunk
    /// boundary split until its remaining bytes arrive.
    fn push_chunk(&mut self, chunk: &[u8]) {
        self.pending.extend_from_slice(chunk);
        let valid = match std::str::from_utf8(&self.pending) {
            Ok(s) => s.len(),
            Err(e) if e.error_len().is_none() => e.valid_up_to(),
            Err(e) => panic!("the event stream is not UTF-8: {e}"),
        };
        self.buf.push_str(std::str::from_utf8(&self.pending[..valid]).expect("checked"));
        self.pending.drain(..valid);
    }

    /// The next event (skipping comments), `None` at the end of the stream;
    /// panics after `wait` without one.
    pub async fn next(&mut self, wait: Duration) -> Option<SseEvent> {
        tokio::time::timeout(wait, self.next_inner()).await.expect("no SSE event in time")
    }

    /// Read until at least `n` comment lines (heartbeats) have arrived;
    /// panics if an event arrives instead or after `wait`.
    pub async fn comments_at_least(&mut self, n: usize, wait: Duration) {
        let read = async {
            while self.comments < n {
                if let Some(end) = self.buf.find("\n\n") {
                    let block: String = self.buf.drain(..end + 2).collect();
                    assert!(
                        block.lines().all(|l| l.is_empty() || l.starts_with(':')),
                        "an event arrived while idle: {block}"
                    );
                    self.comments += block.lines().filter(|l| l.starts_with(':')).count();
                    continue;
                }
                match self.stream.next().await {
                    Some(Ok(chunk)) => self.push_chunk(&chunk),
                    other => panic!("the event stream ended while waiting for heartbeats: {other:?}"),
                }
            }
        };
        tokio::time::timeout(wait, read).await.expect("heartbeats in time");
    }

    async fn next_inner(&mut self) -> Option<SseEvent> {
        loop {
            if let Some(end) = self.buf.find("\n\n") {
                let block: String = self.buf.drain(..end + 2).collect();
                let mut ev = SseEvent::default();
                let mut data = Vec::new();
                let mut any = false;
                for line in block.lines() {
                    if line.is_empty() {
                        continue;
                    }
                    if line.starts_with(':') {
                        self.comments += 1;
                        continue;
                    }
                    let (k, v) = line.split_once(':').unwrap_or((line, ""));
                    let v = v.strip_prefix(' ').unwrap_or(v);
                    any = true;
                    match k {
                        "event" => ev.event = Some(v.to_owned()),
                        "id" => ev.id = Some(v.to_owned()),
                        "data" => data.push(v.to_owned()),
                        "retry" => ev.retry = v.parse().ok(),
                        _ => {}
                    }
                }
                if !any {
                    continue;
                }
                ev.data = data.join("\n");
                return Some(ev);
            }
            match self.stream.next().await {
                Some(Ok(chunk)) => {
                    if std::env::var("SSE_DEBUG").is_ok() {
                        eprintln!("CHUNK {:?}", String::from_utf8_lossy(&chunk));
                    }
                    self.push_chunk(&chunk)
                }
                Some(Err(e)) => panic!("SSE stream failed: {e}"),
                None => return None,
            }
        }
    }

    /// Skip the `retry:`-only hello event and return it.
    pub async fn hello(&mut self) -> SseEvent {
        let ev = self.next(Duration::from_secs(10)).await.expect("hello event");
        assert!(ev.retry.is_some() && ev.id.is_none(), "first event carries the retry hint: {ev:?}");
        ev
    }
}

/// Open an SSE subscription through `oneshot` and return its reader.
pub async fn sse_oneshot(gw: &Gw, uri: &str, headers: &[(&str, &str)]) -> SseReader {
    let mut req = Request::builder().method(Method::GET).uri(uri);
    for (k, v) in headers {
        req = req.header(*k, *v);
    }
    let res = gw.app.clone().oneshot(req.body(Body::empty()).expect("request")).await.expect("infallible");
    assert_eq!(res.status(), StatusCode::OK);
    assert_eq!(res.headers().get("content-type").and_then(|v| v.to_str().ok()), Some("text/event-stream"));
    SseReader::new(res.into_body().into_data_stream())
}

/// Poll `cond` every 10 ms until it holds or `deadline` passes.
pub async fn eventually<F, Fut>(deadline: Duration, what: &str, mut cond: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let end = tokio::time::Instant::now() + deadline;
    loop {
        if cond().await {
            return;
        }
        assert!(tokio::time::Instant::now() < end, "timed out waiting for: {what}");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// A reqwest client for socket tests (installs the rustls provider once).
pub fn http_client() -> reqwest::Client {
    let _ = rustls::crypto::aws_lc_rs::default_provider().install_default();
    reqwest::Client::builder().build().expect("client")
}
