//! The gateway's shared state ([`AppState`]) and its configuration
//! ([`GatewayConfig`], [`Limits`], [`SubscriptionConfig`], [`CorsConfig`]).
//!
//! Invariants:
//! - the gateway holds an `Arc<dyn Engine>` and never asks which engine it is;
//! - `AppState` is cheap to clone (one `Arc`); nothing in it is locked across
//!   an await;
//! - `POST /oauth/token` is served only when a [`ClientRegistry`] was given
//!   with [`AppState::with_oauth`]; without one the route answers 404;
//! - the drain signal only goes one way: once [`AppState::begin_drain`] is
//!   called, `/readyz` fails and every subscription ends with a `reconnect`;
//!   [`AppState::withdraw_readiness`] (the lame duck period before it) only
//!   fails `/readyz`.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use finmesh_auth::{Authenticator, ClientRegistry};
use finmesh_core::{BucketName, Engine};
use finmesh_crypto::{KeyAdmin, RingStore};
use tokio_util::sync::CancellationToken;

use crate::cors::CorsConfig;
use crate::feed_in::FeedConfig;
use crate::hub::Hub;
use crate::limits::RateLimiter;
use crate::metrics::Metrics;
use crate::oauth::TokenAdmission;
use crate::registry::Registry;
use crate::subscribe::Subscribers;

/// A sustained request rate with a burst allowance.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Rate {
    /// Requests per second, sustained (at least 1).
    pub per_second: u32,
    /// Requests allowed at once above the sustained rate (at least 1).
    pub burst: u32,
}

/// Request limits, applied as tower layers around the API routes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Limits {
    /// Largest request body accepted (413 above it). Default 9 MiB: an
    /// 8 MiB value or message plus room for an NDJSON envelope.
    pub max_body_bytes: usize,
    /// Deadline of a request that is not a subscription (SSE, WebSocket);
    /// 504 after it. Default 30 s.
    pub request_timeout: Duration,
    /// Bytes of messages one range read or consumer fetch returns (plus at
    /// most one message); fewer messages than asked come back when it is
    /// reached. Default 32 MiB.
    pub max_read_bytes: usize,
    /// Requests handled at once; above it requests are shed with 503 and
    /// `Retry-After` instead of queueing. Default 1024.
    pub max_concurrent_requests: usize,
    /// Default per-client rate (keyed by the token's `sub`; by the client's
    /// IP address when authentication is off, since every request then has
    /// the same identity); `None` = no limit. Default 1000/s with a burst of
    /// 2000. A batch publish counts as one request per message.
    pub rate: Option<Rate>,
    /// Per-subject rates that replace the default.
    pub rate_overrides: HashMap<String, Rate>,
    /// Rate of `POST /oauth/token` per client IP; `None` = no limit. Every
    /// call costs an argon2 verification (tens of milliseconds of CPU), so
    /// the default is low: 10/s with a burst of 20.
    pub token_rate: Option<Rate>,
    /// Rate of `POST /oauth/token` over all clients together, checked after
    /// the per-IP [`token_rate`](Self::token_rate): many addresses cannot
    /// add up to more argon2 work than this. `None` = no limit. Default 50/s
    /// with a burst of 100.
    pub token_rate_global: Option<Rate>,
    /// argon2 verifications of `POST /oauth/token` running at once; a request
    /// that finds them all busy is answered 503 `overloaded` at once instead
    /// of queueing. Default 4.
    pub max_concurrent_token_grants: usize,
    /// Most keys one `GET /v1/kv/{bucket}/keys` page may ask for with
    /// `?limit=` (400 above; the default page is 1,000 or this, if lower).
    /// Default and maximum [`finmesh_core::engine::MAX_KEYS_PAGE`] (10,000).
    pub max_keys_page: usize,
    /// Largest file `POST /v1/pipelines/{pipeline}/files` accepts (413
    /// above; the upload is streamed, so this bounds the file, not memory).
    /// Default 4 GiB.
    pub max_upload_bytes: u64,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_body_bytes: 9 * 1024 * 1024,
            request_timeout: Duration::from_secs(30),
            max_read_bytes: 32 * 1024 * 1024,
            max_concurrent_requests: 1024,
            rate: Some(Rate { per_second: 1000, burst: 2000 }),
            rate_overrides: HashMap::new(),
            token_rate: Some(Rate { per_second: 10, burst: 20 }),
            token_rate_global: Some(Rate { per_second: 50, burst: 100 }),
            max_concurrent_token_grants: 4,
            max_keys_page: finmesh_core::engine::MAX_KEYS_PAGE,
            max_upload_bytes: 4 << 30,
        }
    }
}

/// Settings of SSE and WebSocket subscriptions.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SubscriptionConfig {
    /// A comment line (`:`) or WebSocket ping is sent this often when idle.
    /// Default 15 s.
    pub heartbeat: Duration,
    /// The `retry:` hint sent to SSE clients. Default 2 s.
    pub retry: Duration,
    /// The hint of a `reconnect` event (drain) is `retry` plus a random
    /// part up to this, so that subscribers told together do not all come
    /// back in the same millisecond. Default 3 s.
    pub retry_jitter: Duration,
    /// Frames buffered per subscriber. Default 1024. A stream subscriber
    /// whose queue is full when the fan-out hub has a frame for it is cut
    /// off at once (`error`, reason `slow_consumer`).
    pub queue_capacity: usize,
    /// Bytes of frames buffered per subscriber (a frame larger than this
    /// is queued alone); also the most bytes one history read of the hub
    /// returns. Default 8 MiB.
    pub queue_max_bytes: usize,
    /// A KV watcher whose queue stays full this long is cut off with
    /// `lagged`. Default 5 s. (Stream subscribers are never waited for.)
    pub stall_timeout: Duration,
    /// Frames of recent messages the fan-out hub keeps per stream to serve
    /// resumes and late joiners without reading the engine. Default 10,000.
    pub ring_max_messages: usize,
    /// Bytes of those frames per stream (whichever bound is reached first
    /// evicts). Default 16 MiB.
    pub ring_max_bytes: usize,
    /// History reads (subscribers starting before the ring) running at
    /// once on the gateway; more wait their turn. Default 16.
    pub history_reads: usize,
    /// A stream's hub tail (its engine subscription) stops after this long
    /// without subscribers. Default 30 s.
    pub tail_idle: Duration,
    /// Subscriptions open at once per principal (token `sub`; per client
    /// address when authentication is off); above it a new one is refused
    /// with 429. Default 1,000.
    pub max_per_principal: usize,
    /// Subscriptions open at once on the node; above it a new one is
    /// refused with 503. Default 10,000.
    pub max_total: usize,
    /// Refuse (403) stream subscriptions of identities that are not in the
    /// subscriber registry (`/v1/subscribers/{id}`). Default `false`:
    /// unregistered identities subscribe as their scopes allow.
    pub require_registration: bool,
    /// A registered subscriber disconnected from this node for longer than
    /// this shows in `/readyz`'s details and in
    /// `finmesh_subscribers_disconnected_over_threshold`. Default 60 s.
    pub registered_disconnect_alert: Duration,
}

impl Default for SubscriptionConfig {
    fn default() -> Self {
        SubscriptionConfig {
            heartbeat: Duration::from_secs(15),
            retry: Duration::from_secs(2),
            retry_jitter: Duration::from_secs(3),
            queue_capacity: 1024,
            queue_max_bytes: 8 * 1024 * 1024,
            stall_timeout: Duration::from_secs(5),
            ring_max_messages: 10_000,
            ring_max_bytes: 16 * 1024 * 1024,
            history_reads: 16,
            tail_idle: Duration::from_secs(30),
            max_per_principal: 1_000,
            max_total: 10_000,
            require_registration: false,
            registered_disconnect_alert: Duration::from_secs(60),
        }
    }
}

/// Everything configurable about the gateway.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GatewayConfig {
    /// The bucket `GET /kv/{key}` serves. Default `default`.
    pub default_bucket: BucketName,
    /// Request limits.
    pub limits: Limits,
    /// Subscription settings.
    pub subscriptions: SubscriptionConfig,
    /// Cross-origin access for browsers; `None` = no CORS headers at all
    /// (and no CORS layer).
    pub cors: Option<CorsConfig>,
    /// Limits and batching of feed uploads (`/v1/streams/{stream}/feed`).
    pub feed: FeedConfig,
}

impl Default for GatewayConfig {
    fn default() -> Self {
        GatewayConfig {
            default_bucket: BucketName::new("default").expect("`default` is a valid bucket name"),
            limits: Limits::default(),
            subscriptions: SubscriptionConfig::default(),
            cors: None,
            feed: FeedConfig::default(),
        }
    }
}

/// The state every handler shares. Cheap to clone.
#[derive(Clone)]
pub struct AppState {
    pub(crate) inner: Arc<Inner>,
}

/// Every field is shared by its clones (`Arc`s, a cancellation token), so
/// [`AppState::with_oauth`] can copy it without splitting any state.
#[derive(Clone)]
pub(crate) struct Inner {
    /// The engine; the gateway never knows which one.
    pub engine: Arc<dyn Engine>,
    /// Verifies bearer tokens.
    pub auth: Authenticator,
    /// Configuration, fixed for the state's life.
    pub config: GatewayConfig,
    /// Cancelled by `begin_drain`; every subscription selects on it.
    pub drain: CancellationToken,
    /// Cancelled by `withdraw_readiness` (and `begin_drain`): `/readyz` fails.
    pub unready: CancellationToken,
    /// Connected SSE/WS subscribers (for `/v1/subscribers`).
    pub subscribers: Subscribers,
    /// The fan-out hub: one engine tail per stream for every subscriber.
    pub hub: Hub,
    /// The subscriber registry (in the engine) and its live status on this node.
    pub registry: Registry,
    /// Per-client rate limits (keyed by token subject).
    pub rate: Arc<RateLimiter>,
    /// OAuth clients for `POST /oauth/token`; `None` = the route answers 404.
    pub oauth: Option<Arc<ClientRegistry>>,
    /// Rate limits of `POST /oauth/token`, keyed by client IP (each call
    /// costs an argon2 verification), at [`Limits::token_rate`].
    pub oauth_rate: Arc<RateLimiter>,
    /// The global rate and the cap on argon2 verifications running at once
    /// of `POST /oauth/token`.
    pub oauth_admission: Arc<TokenAdmission>,
    /// Prometheus handles.
    pub metrics: Metrics,
    /// The key ring of the encrypting engine wrapper, when the node runs
    /// with `[security]` (key administration acts on it); `None` = no
    /// bucket security is enforced.
    pub keys: Option<Arc<RingStore>>,
    /// Key administration (`/v1/keys`), when the node runs with
    /// `[security]`; `None` = those routes answer 404.
    pub key_admin: Option<Arc<KeyAdmin>>,
}

impl AppState {
    /// State for `engine`, verifying tokens with `auth`.
    pub fn new(engine: Arc<dyn Engine>, auth: Authenticator, config: GatewayConfig) -> Self {
        let rate = Arc::new(RateLimiter::new(config.limits.rate, &config.limits.rate_overrides, "limits.rate"));
        let oauth_rate = Arc::new(RateLimiter::new(config.limits.token_rate, &HashMap::new(), "limits.token_rate"));
        let oauth_admission = Arc::new(TokenAdmission::new(&config.limits));
        AppState {
            inner: Arc::new(Inner {
                hub: Hub::new(engine.clone(), &config.subscriptions),
                registry: Registry::new(engine.clone()),
                engine,
                auth,
                config,
                drain: CancellationToken::new(),
                unready: CancellationToken::new(),
                subscribers: Subscribers::default(),
                rate,
                oauth: None,
                oauth_rate,
                oauth_admission,
                metrics: Metrics::global(),
                keys: None,
                key_admin: None,
            }),
        }
    }

    /// Serve `POST /oauth/token` (OAuth 2.0 client credentials) with
    /// `clients`. Builder style: call it before handing the state to
    /// [`app`](crate::app); clones made earlier keep answering 404 there
    /// (they share everything else: drain, subscribers, rate limits).
    pub fn with_oauth(mut self, clients: Arc<ClientRegistry>) -> Self {
        Arc::make_mut(&mut self.inner).oauth = Some(clients);
        self
    }

    /// Keep the key ring the engine wrapper uses (see [`keys`](Self::keys)).
    /// Builder style, as [`with_oauth`](Self::with_oauth).
    pub fn with_keys(mut self, keys: Arc<RingStore>) -> Self {
        Arc::make_mut(&mut self.inner).keys = Some(keys);
        self
    }

    /// Serve the key administration routes (`/v1/keys`) with `admin`, and
    /// keep its key ring (as [`with_keys`](Self::with_keys)). Builder style.
    pub fn with_key_admin(mut self, admin: Arc<KeyAdmin>) -> Self {
        let inner = Arc::make_mut(&mut self.inner);
        inner.keys = Some(admin.keys().clone());
        inner.key_admin = Some(admin);
        self
    }

    /// Key administration, when the node runs with `[security]`.
    pub fn key_admin(&self) -> Option<&Arc<KeyAdmin>> {
        self.inner.key_admin.as_ref()
    }

    /// The key ring of the encrypting engine wrapper, when the node runs
    /// with `[security]`.
    pub fn keys(&self) -> Option<&Arc<RingStore>> {
        self.inner.keys.as_ref()
    }

    /// The OAuth client registry, when `POST /oauth/token` is served.
    pub fn oauth(&self) -> Option<&Arc<ClientRegistry>> {
        self.inner.oauth.as_ref()
    }

    /// The engine.
    pub fn engine(&self) -> &Arc<dyn Engine> {
        &self.inner.engine
    }

    /// The configuration.
    pub fn config(&self) -> &GatewayConfig {
        &self.inner.config
    }

    /// Start draining: `/readyz` answers 503 from now on and every SSE/WS
    /// subscriber receives `reconnect` and its stream ends, so a graceful
    /// server shutdown can finish. Idempotent.
    pub fn begin_drain(&self) {
        if !self.inner.drain.is_cancelled() {
            tracing::info!("gateway draining: subscribers are told to reconnect");
        }
        self.inner.unready.cancel();
        self.inner.drain.cancel();
    }

    /// Fail `/readyz` from now on, but keep serving everything else (the
    /// lame duck period before [`begin_drain`](Self::begin_drain), so load
    /// balancers stop sending before connections are refused). Idempotent.
    pub fn withdraw_readiness(&self) {
        self.inner.unready.cancel();
    }

    /// Whether [`begin_drain`](Self::begin_drain) was called.
    pub fn is_draining(&self) -> bool {
        self.inner.drain.is_cancelled()
    }

    /// Whether `/readyz` fails for good (readiness withdrawn or draining).
    pub fn is_unready(&self) -> bool {
        self.inner.unready.is_cancelled()
    }

    /// A token cancelled when draining starts (for the server's own shutdown wiring).
    pub fn drain_token(&self) -> CancellationToken {
        self.inner.drain.clone()
    }

    /// argon2 verifications of `POST /oauth/token` running now (at most
    /// [`Limits::max_concurrent_token_grants`]).
    pub fn token_grants_running(&self) -> usize {
        self.inner.oauth_admission.running()
    }

    /// The fan-out hub.
    pub fn hub(&self) -> &Hub {
        &self.inner.hub
    }

    /// Streams whose hub tail (one engine subscription each) is running.
    pub fn hub_tails(&self) -> usize {
        self.inner.hub.tails()
    }

    /// The subscriber registry and its live status on this node.
    pub fn registry(&self) -> &Registry {
        &self.inner.registry
    }

    /// Number of connected SSE/WebSocket subscribers.
    pub fn subscriber_count(&self) -> usize {
        self.inner.subscribers.len()
    }
}
