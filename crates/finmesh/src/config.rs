//! Configuration of `finmesh serve`: parse, validate, build.
//!
//! Sources, later ones winning: built-in defaults, a TOML file (`--config`),
//! `FINMESH_*` environment variables, command-line flags. Flags and
//! variables are the same clap arguments (`env = ...`), so clap resolves
//! those two; [`ServeConfig::load`] lays the result over the file.
//!
//! Invariants: unknown keys in the file are errors (`deny_unknown_fields`);
//! [`ServeConfig::validate`] is pure apart from checking that named files
//! exist, and reports *every* problem at once, each with the key it is
//! about, so `finmesh config check` can print them all.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use finmesh_auth::AuthConfig;
use finmesh_core::BucketName;
use finmesh_nats::NatsEngineOptions;
use serde::{Deserialize, Serialize};

use crate::tls::TlsConfig;

/// Most serving threads `serve_threads` accepts.
pub const MAX_SERVE_THREADS: usize = 1024;

/// Which engine the gateway runs on.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize, Serialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum EngineKind {
    /// One process, storage on local disk (`data_dir`).
    #[default]
    Embedded,
    /// A NATS JetStream cluster (`[nats]`).
    Nats,
}

/// Log output format.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize, Serialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    #[default]
    Text,
    Json,
}

/// A sustained rate with a burst allowance (`[limits.rate]`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct RateSection {
    pub per_second: u32,
    pub burst: u32,
}

/// Request limits (`[limits]`); defaults are the gateway's.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct LimitsSection {
    /// Largest request body (413 above).
    pub max_body_bytes: usize,
    /// Deadline of a request that is not a subscription (504 after).
    pub request_timeout_ms: u64,
    /// Bytes of messages one range read or fetch returns (plus one message).
    pub max_read_bytes: usize,
    /// Requests in flight before shedding with 503 + Retry-After.
    pub max_concurrent_requests: usize,
    /// Default per-client rate, keyed by the token's `sub`; absent = none.
    pub rate: Option<RateSection>,
    /// Per-subject rates, e.g. `[limits.rate_overrides.pricing-feed]`.
    pub rate_overrides: std::collections::BTreeMap<String, RateSection>,
    /// `POST /oauth/token` calls per client IP; absent = none.
    pub token_rate: Option<RateSection>,
    /// `POST /oauth/token` calls over all clients together; absent = none.
    pub token_rate_global: Option<RateSection>,
    /// argon2 verifications of `POST /oauth/token` at once (503 above).
    pub max_concurrent_token_grants: usize,
    /// Most keys one key listing page may ask for (400 above), 1-10000.
    pub max_keys_page: usize,
    /// Largest pipeline file upload, in bytes (413 above).
    pub max_upload_bytes: u64,
}

/// Connection caps and timeouts (`[connections]`); defaults are
/// [`ConnectionLimits::default`](crate::serving::ConnectionLimits).
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct ConnectionsSection {
    /// Connections open at once on the node.
    pub max: usize,
    /// Connections open at once from one client IP address.
    pub max_per_address: usize,
    /// Longest time to receive a whole request head.
    pub header_timeout_ms: u64,
    /// Longest a connection may stay open with nothing in flight or received.
    pub idle_timeout_ms: u64,
    /// Longest a write may wait for the client to read.
    pub write_timeout_ms: u64,
}

impl Default for ConnectionsSection {
    fn default() -> Self {
        let d = crate::serving::ConnectionLimits::default();
        Self {
            max: d.max_connections,
            max_per_address: d.max_connections_per_address,
            header_timeout_ms: d.header_timeout.as_millis() as u64,
            idle_timeout_ms: d.idle_timeout.as_millis() as u64,
            write_timeout_ms: d.write_timeout.as_millis() as u64,
        }
    }
}

impl Default for LimitsSection {
    fn default() -> Self {
        let d = finmesh_gateway::Limits::default();
        Self {
            max_body_bytes: d.max_body_bytes,
            request_timeout_ms: d.request_timeout.as_millis() as u64,
            max_read_bytes: d.max_read_bytes,
            max_concurrent_requests: d.max_concurrent_requests,
            rate: d.rate.map(|r| RateSection { per_second: r.per_second, burst: r.burst }),
            rate_overrides: Default::default(),
            token_rate: d.token_rate.map(|r| RateSection { per_second: r.per_second, burst: r.burst }),
            token_rate_global: d.token_rate_global.map(|r| RateSection { per_second: r.per_second, burst: r.burst }),
            max_concurrent_token_grants: d.max_concurrent_token_grants,
            max_keys_page: d.max_keys_page,
            max_upload_bytes: d.max_upload_bytes,
        }
    }
}

/// SSE and WebSocket settings (`[subscriptions]`).
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct SubscriptionsSection {
    pub heartbeat_ms: u64,
    pub retry_ms: u64,
    /// Most added at random to `retry_ms` in a `reconnect` event's hint.
    pub retry_jitter_ms: u64,
    pub queue_capacity: usize,
    /// Bytes of frames queued per subscriber.
    pub queue_max_bytes: usize,
    /// How long a KV watcher's full queue may stay full before it is cut
    /// off with `lagged`.
    pub stall_timeout_ms: u64,
    /// Frames of recent messages the fan-out hub keeps per stream.
    pub ring_max_messages: usize,
    /// Bytes of those frames per stream.
    pub ring_max_bytes: usize,
    /// History reads of the hub running at once.
    pub history_reads: usize,
    /// A stream's hub tail stops after this long without subscribers.
    pub tail_idle_ms: u64,
    /// Subscriptions open at once per principal (token `sub`).
    pub max_per_principal: usize,
    /// Subscriptions open at once on the node.
    pub max_total: usize,
    /// Refuse stream subscriptions of identities not in the subscriber registry.
    pub require_registration: bool,
    /// A registered subscriber disconnected longer than this is reported
    /// by `/readyz` and `finmesh_subscribers_disconnected_over_threshold`.
    pub registered_disconnect_alert_ms: u64,
}

impl Default for SubscriptionsSection {
    fn default() -> Self {
        let d = finmesh_gateway::SubscriptionConfig::default();
        Self {
            heartbeat_ms: d.heartbeat.as_millis() as u64,
            retry_ms: d.retry.as_millis() as u64,
            retry_jitter_ms: d.retry_jitter.as_millis() as u64,
            queue_capacity: d.queue_capacity,
            queue_max_bytes: d.queue_max_bytes,
            stall_timeout_ms: d.stall_timeout.as_millis() as u64,
            ring_max_messages: d.ring_max_messages,
            ring_max_bytes: d.ring_max_bytes,
            history_reads: d.history_reads,
            tail_idle_ms: d.tail_idle.as_millis() as u64,
            max_per_principal: d.max_per_principal,
            max_total: d.max_total,
            require_registration: d.require_registration,
            registered_disconnect_alert_ms: d.registered_disconnect_alert.as_millis() as u64,
        }
    }
}

/// Feed uploads (`[feed]`); see `finmesh_gateway::feed_in`.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct FeedSection {
    /// Longest line (one message) of a feed.
    pub max_line_bytes: usize,
    /// A batch closes at this many messages.
    pub batch_max_messages: usize,
    /// A batch closes at this many bytes.
    pub batch_max_bytes: usize,
    /// A batch with no more input waiting closes this long after its first line.
    pub linger_ms: u64,
    /// A feed with no input for this long ends.
    pub idle_timeout_ms: u64,
    /// Bytes one upload may carry.
    pub max_upload_bytes: u64,
}

impl Default for FeedSection {
    fn default() -> Self {
        let d = finmesh_gateway::feed_in::FeedConfig::default();
        Self {
            max_line_bytes: d.max_line_bytes,
            batch_max_messages: d.batch_max_messages,
            batch_max_bytes: d.batch_max_bytes,
            linger_ms: d.linger.as_millis() as u64,
            idle_timeout_ms: d.idle_timeout.as_millis() as u64,
            max_upload_bytes: d.max_upload_bytes,
        }
    }
}

/// Browser origins allowed to call the API (`[cors]`); see
/// `finmesh_gateway::cors`.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct CorsSection {
    /// Exact origins, e.g. `["https://dashboard.example.com"]`; no wildcard.
    pub allowed_origins: Vec<String>,
    /// How long a browser may cache a preflight answer.
    #[serde(default = "default_cors_max_age_secs")]
    pub max_age_secs: u64,
}

fn default_cors_max_age_secs() -> u64 {
    finmesh_gateway::CorsConfig::default().max_age.as_secs()
}

/// Encryption of KV buckets (`[security]`, docs/security.md): where the
/// master key comes from. Exactly one of the two sources. Without this
/// section the node enforces no bucket security option and refuses to
/// create buckets that ask for one.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct SecuritySection {
    /// A file holding the master key (32 raw bytes, 64 hex digits or
    /// base64 of 32 bytes; mode 0600).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub master_key_file: Option<PathBuf>,
    /// An environment variable holding the master key in base64.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub master_key_env: Option<String>,
    /// Copies of the key ring's bucket (`_finmesh_keys`) when the node
    /// creates it: the cluster's replication factor on NATS (1-5), 1 on the
    /// embedded engine.
    #[serde(default = "default_ring_replicas")]
    pub ring_replicas: u8,
}

fn default_ring_replicas() -> u8 {
    1
}

impl SecuritySection {
    /// The master key's source. Call after [`ServeConfig::validate`].
    pub fn provider(&self) -> Box<dyn finmesh_crypto::KeyProvider> {
        match (&self.master_key_file, &self.master_key_env) {
            (Some(path), _) => Box::new(finmesh_crypto::FileKeyProvider::new(path.clone())),
            (None, Some(var)) => Box::new(finmesh_crypto::EnvKeyProvider::new(var.clone())),
            (None, None) => Box::new(finmesh_crypto::EnvKeyProvider::default()),
        }
    }

    fn problems(&self, engine: EngineKind, problem: &mut dyn FnMut(&str, String)) {
        match (&self.master_key_file, &self.master_key_env) {
            (Some(_), Some(_)) => problem(
                "security",
                "set one of master_key_file and master_key_env, not both (which one holds the key?)".to_owned(),
            ),
            (None, None) => problem("security", "needs master_key_file or master_key_env".to_owned()),
            (Some(p), None) if p.as_os_str().is_empty() => {
                problem("security.master_key_file", "must name a file".to_owned())
            }
            (None, Some(v)) if v.is_empty() || v.contains('=') || v.contains('\0') => {
                problem("security.master_key_env", format!("`{v}` is not an environment variable name"))
            }
            _ => {}
        }
        match engine {
            EngineKind::Embedded if self.ring_replicas != 1 => {
                problem("security.ring_replicas", "must be 1 on the embedded engine".to_owned())
            }
            EngineKind::Nats if !(1..=5).contains(&self.ring_replicas) => {
                problem("security.ring_replicas", format!("must be 1 to 5, not {}", self.ring_replicas))
            }
            _ => {}
        }
    }
}

/// The embedded engine's storage tuning (`[embedded]`); defaults are
/// [`finmesh_embedded::EmbeddedOptions::default`].
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct EmbeddedSection {
    /// Block cache in bytes: KV values live on disk, the cache (with the
    /// OS page cache) keeps the hot set in memory.
    pub cache_bytes: u64,
    /// Hot-value cache of each KV bucket in bytes (`0` turns it off): a
    /// hot key's get skips the store.
    pub kv_cache_bytes: u64,
}

/// Smallest `embedded.cache_bytes` accepted.
pub const MIN_CACHE_BYTES: u64 = 1024 * 1024;

impl Default for EmbeddedSection {
    fn default() -> Self {
        Self { cache_bytes: finmesh_embedded::CACHE_BYTES, kv_cache_bytes: finmesh_embedded::KV_CACHE_BYTES }
    }
}

/// The whole file. Every field has a default, so an empty file is valid.
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct ServeConfig {
    /// Address to listen on. The default is loopback only.
    pub listen: String,
    pub engine: EngineKind,
    /// Storage of the embedded engine, and the node's generated secret.
    pub data_dir: PathBuf,
    /// Bucket served at `GET /kv/{key}`.
    pub default_bucket: String,
    pub log_format: LogFormat,
    /// How long in-flight requests may take to finish after SIGTERM.
    pub drain_timeout_ms: u64,
    /// After SIGTERM, how long the node keeps accepting with `/readyz`
    /// failing, so load balancers stop sending before connections are
    /// refused; 0 = none.
    pub lame_duck_ms: u64,
    /// Threads that serve connections, each owning the connections it is
    /// handed (see `serving`); absent = one per core.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub serve_threads: Option<usize>,
    /// The NATS engine's connection settings (`engine = "nats"`); the
    /// fields of [`NatsEngineOptions`], durations in milliseconds.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub nats: Option<NatsEngineOptions>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tls: Option<TlsConfig>,
    pub limits: LimitsSection,
    pub connections: ConnectionsSection,
    pub subscriptions: SubscriptionsSection,
    /// The embedded engine's storage tuning (`engine = "embedded"`).
    pub embedded: EmbeddedSection,
    pub feed: FeedSection,
    /// Token verification, issuance and OAuth clients (docs/auth.md).
    /// Without it the node signs its own tokens with a generated secret.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub auth: Option<AuthConfig>,
    /// Cross-origin access for browsers; absent = none.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub cors: Option<CorsSection>,
    /// Encryption of KV buckets: the master key's source; absent = no
    /// bucket may ask for a security option.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub security: Option<SecuritySection>,
    /// Pipeline reconcilers run inside the node (docs/pipeline.md).
    pub reconcile: crate::reconcile_task::ReconcileSection,
}

impl Default for ServeConfig {
    fn default() -> Self {
        Self {
            listen: "127.0.0.1:8080".to_owned(),
            engine: EngineKind::Embedded,
            data_dir: PathBuf::from("finmesh-data"),
            default_bucket: "default".to_owned(),
            log_format: LogFormat::Text,
            drain_timeout_ms: 10_000,
            lame_duck_ms: 3_000,
            serve_threads: None,
            nats: None,
            tls: None,
            limits: LimitsSection::default(),
            connections: ConnectionsSection::default(),
            subscriptions: SubscriptionsSection::default(),
            embedded: EmbeddedSection::default(),
            feed: FeedSection::default(),
            auth: None,
            cors: None,
            security: None,
            reconcile: Default::default(),
        }
    }
}

/// One problem with a configuration, tied to the key it is about.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Problem {
    /// Dotted key, e.g. `tls.cert`.
    pub key: String,
    pub message: String,
}

impl std::fmt::Display for Problem {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}: {}", self.key, self.message)
    }
}

/// Flags (and their `FINMESH_*` variables) of `finmesh serve` that override
/// the file.
#[derive(Debug, Default, Clone, clap::Args)]
pub struct ConfigOverrides {
    /// TOML configuration file.
    #[arg(long, env = "FINMESH_CONFIG")]
    pub config: Option<PathBuf>,
    /// Address to listen on [default: 127.0.0.1:8080].
    #[arg(long, env = "FINMESH_LISTEN")]
    pub listen: Option<String>,
    /// Engine [default: embedded].
    #[arg(long, env = "FINMESH_ENGINE")]
    pub engine: Option<EngineKind>,
    /// Data directory [default: finmesh-data].
    #[arg(long, env = "FINMESH_DATA_DIR")]
    pub data_dir: Option<PathBuf>,
    /// NATS server URLs, comma-separated.
    #[arg(long, env = "FINMESH_NATS_SERVERS", value_delimiter = ',')]
    pub nats_servers: Option<Vec<String>>,
    /// TLS certificate chain (PEM); needs --tls-key.
    #[arg(long, env = "FINMESH_TLS_CERT")]
    pub tls_cert: Option<PathBuf>,
    /// TLS private key (PEM); needs --tls-cert.
    #[arg(long, env = "FINMESH_TLS_KEY")]
    pub tls_key: Option<PathBuf>,
    /// CA bundle for client certificates (PEM); makes them required.
    #[arg(long, env = "FINMESH_TLS_CLIENT_CA")]
    pub tls_client_ca: Option<PathBuf>,
    /// Log format [default: text].
    #[arg(long, env = "FINMESH_LOG_FORMAT")]
    pub log_format: Option<LogFormat>,
    /// Threads that serve connections [default: one per core].
    #[arg(long, env = "FINMESH_SERVE_THREADS")]
    pub serve_threads: Option<usize>,
    /// Milliseconds the node keeps accepting, not ready, after SIGTERM
    /// (`lame_duck_ms`) [default: 3000].
    #[arg(long, env = "FINMESH_LAME_DUCK_MS")]
    pub lame_duck_ms: Option<u64>,
    /// Connections open at once on the node (`connections.max`) [default: 10000].
    #[arg(long, env = "FINMESH_MAX_CONNECTIONS")]
    pub max_connections: Option<usize>,
    /// Requests per second per client (`limits.rate.per_second`) [default: 1000].
    #[arg(long, env = "FINMESH_RATE_PER_SECOND")]
    pub rate_per_second: Option<u32>,
    /// Requests a client may send at once above its rate (`limits.rate.burst`)
    /// [default: 2000].
    #[arg(long, env = "FINMESH_RATE_BURST")]
    pub rate_burst: Option<u32>,
    /// Block cache of the embedded engine in bytes (`embedded.cache_bytes`)
    /// [default: 33554432].
    #[arg(long, env = "FINMESH_CACHE_BYTES")]
    pub cache_bytes: Option<u64>,
}

impl ServeConfig {
    /// Parse a TOML document; the error names the line and column.
    pub fn parse(text: &str, origin: &Path) -> anyhow::Result<Self> {
        toml::from_str(text).map_err(|e| anyhow::anyhow!("{}: {e}", origin.display()))
    }

    /// Read the file named by `overrides.config` (if any), then lay the
    /// flags and variables over it.
    pub fn load(overrides: &ConfigOverrides) -> anyhow::Result<Self> {
        let mut config = match &overrides.config {
            None => Self::default(),
            Some(path) => {
                let text = std::fs::read_to_string(path)
                    .map_err(|e| anyhow::anyhow!("reading the configuration {}: {e}", path.display()))?;
                Self::parse(&text, path)?
            }
        };
        config.apply(overrides);
        Ok(config)
    }

    fn apply(&mut self, o: &ConfigOverrides) {
        if let Some(v) = &o.listen {
            self.listen = v.clone();
        }
        if let Some(v) = o.engine {
            self.engine = v;
        }
        if let Some(v) = &o.data_dir {
            self.data_dir = v.clone();
        }
        if let Some(v) = &o.nats_servers {
            match &mut self.nats {
                Some(nats) => nats.servers = v.clone(),
                None => self.nats = Some(NatsEngineOptions { servers: v.clone(), ..NatsEngineOptions::new("") }),
            }
        }
        if let Some(v) = o.log_format {
            self.log_format = v;
        }
        if let Some(v) = o.serve_threads {
            self.serve_threads = Some(v);
        }
        if let Some(v) = o.lame_duck_ms {
            self.lame_duck_ms = v;
        }
        if let Some(v) = o.max_connections {
            self.connections.max = v;
        }
        if let Some(v) = o.cache_bytes {
            self.embedded.cache_bytes = v;
        }
        if o.rate_per_second.is_some() || o.rate_burst.is_some() {
            let base = self.limits.rate.unwrap_or(RateSection { per_second: 1000, burst: 2000 });
            self.limits.rate = Some(RateSection {
                per_second: o.rate_per_second.unwrap_or(base.per_second),
                burst: o.rate_burst.unwrap_or(base.burst),
            });
        }
        if o.tls_cert.is_some() || o.tls_key.is_some() || o.tls_client_ca.is_some() {
            let base =
                self.tls.clone().unwrap_or(TlsConfig { cert: PathBuf::new(), key: PathBuf::new(), client_ca: None });
            self.tls = Some(TlsConfig {
                cert: o.tls_cert.clone().unwrap_or(base.cert),
                key: o.tls_key.clone().unwrap_or(base.key),
                client_ca: o.tls_client_ca.clone().or(base.client_ca),
            });
        }
    }

    /// Every problem with this configuration, empty when it is usable.
    pub fn validate(&self) -> Vec<Problem> {
        let mut problems = Vec::new();
        let mut problem = |key: &str, message: String| problems.push(Problem { key: key.to_owned(), message });
        for (key, message) in self.reconcile.problems() {
            problem(&key, message);
        }
        if let Err(e) = self.listen.parse::<SocketAddr>() {
            problem("listen", format!("`{}` is not an address like 127.0.0.1:8080 ({e})", self.listen));
        }
        if let Err(e) = BucketName::new(self.default_bucket.clone()) {
            problem("default_bucket", e.message().to_owned());
        }
        if self.drain_timeout_ms == 0 {
            problem("drain_timeout_ms", "must be at least 1".to_owned());
        }
        if let Some(n) = self.serve_threads
            && !(1..=MAX_SERVE_THREADS).contains(&n)
        {
            problem("serve_threads", format!("must be 1 to {MAX_SERVE_THREADS}, not {n}"));
        }
        match self.engine {
            EngineKind::Embedded => {
                if self.data_dir.as_os_str().is_empty() {
                    problem("data_dir", "must name a directory".to_owned());
                }
            }
            EngineKind::Nats if self.nats.is_none() => {
                problem("nats", "engine = \"nats\" needs a [nats] section with `servers`".to_owned())
            }
            EngineKind::Nats => {}
        }
        if let Some(nats) = &self.nats
            && let Err(e) = nats.validate()
        {
            problem("nats", e.message().to_owned());
        }
        let l = &self.limits;
        for (key, value) in [
            ("limits.max_body_bytes", l.max_body_bytes as u64),
            ("limits.request_timeout_ms", l.request_timeout_ms),
            ("limits.max_read_bytes", l.max_read_bytes as u64),
            ("limits.max_concurrent_requests", l.max_concurrent_requests as u64),
            ("limits.max_concurrent_token_grants", l.max_concurrent_token_grants as u64),
            ("limits.max_keys_page", l.max_keys_page as u64),
            ("subscriptions.heartbeat_ms", self.subscriptions.heartbeat_ms),
            ("subscriptions.retry_ms", self.subscriptions.retry_ms),
            ("subscriptions.queue_capacity", self.subscriptions.queue_capacity as u64),
            ("subscriptions.queue_max_bytes", self.subscriptions.queue_max_bytes as u64),
            ("subscriptions.stall_timeout_ms", self.subscriptions.stall_timeout_ms),
            ("subscriptions.ring_max_messages", self.subscriptions.ring_max_messages as u64),
            ("subscriptions.ring_max_bytes", self.subscriptions.ring_max_bytes as u64),
            ("subscriptions.history_reads", self.subscriptions.history_reads as u64),
            ("subscriptions.tail_idle_ms", self.subscriptions.tail_idle_ms),
            ("subscriptions.max_per_principal", self.subscriptions.max_per_principal as u64),
            ("subscriptions.max_total", self.subscriptions.max_total as u64),
            ("subscriptions.registered_disconnect_alert_ms", self.subscriptions.registered_disconnect_alert_ms),
            ("feed.max_line_bytes", self.feed.max_line_bytes as u64),
            ("feed.batch_max_messages", self.feed.batch_max_messages as u64),
            ("feed.batch_max_bytes", self.feed.batch_max_bytes as u64),
            ("feed.idle_timeout_ms", self.feed.idle_timeout_ms),
            ("feed.max_upload_bytes", self.feed.max_upload_bytes),
            ("connections.max", self.connections.max as u64),
            ("connections.max_per_address", self.connections.max_per_address as u64),
            ("connections.header_timeout_ms", self.connections.header_timeout_ms),
            ("connections.idle_timeout_ms", self.connections.idle_timeout_ms),
            ("connections.write_timeout_ms", self.connections.write_timeout_ms),
        ] {
            if value == 0 {
                problem(key, "must be at least 1".to_owned());
            }
        }
        if self.embedded.cache_bytes < MIN_CACHE_BYTES {
            problem("embedded.cache_bytes", format!("must be at least {MIN_CACHE_BYTES} (1 MiB)"));
        }
        if l.max_keys_page > finmesh_core::engine::MAX_KEYS_PAGE {
            problem("limits.max_keys_page", format!("must be at most {}", finmesh_core::engine::MAX_KEYS_PAGE));
        }
        if self.subscriptions.queue_max_bytes > u32::MAX as usize {
            problem("subscriptions.queue_max_bytes", format!("must be at most {}", u32::MAX));
        }
        for (who, rate) in l
            .rate
            .iter()
            .map(|r| ("limits.rate".to_owned(), r))
            .chain(l.token_rate.iter().map(|r| ("limits.token_rate".to_owned(), r)))
            .chain(l.token_rate_global.iter().map(|r| ("limits.token_rate_global".to_owned(), r)))
            .chain(l.rate_overrides.iter().map(|(sub, r)| (format!("limits.rate_overrides.{sub}"), r)))
        {
            if rate.per_second == 0 || rate.burst == 0 {
                problem(&who, "per_second and burst must be at least 1".to_owned());
            }
        }
        if let Some(auth) = &self.auth {
            for message in auth.problems() {
                problem("auth", message);
            }
        }
        if let Some(cors) = &self.cors {
            if cors.allowed_origins.is_empty() {
                problem("cors.allowed_origins", "list at least one origin, or remove [cors]".to_owned());
            }
            for message in cors.allowed_origins.iter().filter_map(|o| finmesh_gateway::cors::origin_problem(o)) {
                problem("cors.allowed_origins", message);
            }
        }
        if let Some(security) = &self.security {
            security.problems(self.engine, &mut problem);
        }
        if let Some(tls) = &self.tls {
            for (key, path) in
                [("tls.cert", Some(&tls.cert)), ("tls.key", Some(&tls.key)), ("tls.client_ca", tls.client_ca.as_ref())]
            {
                match path {
                    Some(p) if p.as_os_str().is_empty() => problem(key, "is required when TLS is on".to_owned()),
                    Some(p) if !p.is_file() => problem(key, format!("{} is not a readable file", p.display())),
                    _ => {}
                }
            }
        }
        problems
    }

    /// The auth settings in force: the configured ones, or the node's own
    /// generated secret under `data_dir`.
    pub fn auth_or_node_secret(&self) -> AuthConfig {
        self.auth
            .clone()
            .unwrap_or_else(|| AuthConfig::node_secret(self.data_dir.join(finmesh_auth::DEFAULT_SECRET_FILE)))
    }

    /// The gateway's configuration. Call after [`validate`](Self::validate).
    pub fn gateway(&self) -> anyhow::Result<finmesh_gateway::GatewayConfig> {
        use finmesh_gateway::{GatewayConfig, Limits, Rate, SubscriptionConfig};
        let rate = |r: &RateSection| Rate { per_second: r.per_second, burst: r.burst };
        Ok(GatewayConfig {
            default_bucket: BucketName::new(self.default_bucket.clone())?,
            limits: Limits {
                max_body_bytes: self.limits.max_body_bytes,
                request_timeout: Duration::from_millis(self.limits.request_timeout_ms),
                max_read_bytes: self.limits.max_read_bytes,
                max_concurrent_requests: self.limits.max_concurrent_requests,
                rate: self.limits.rate.as_ref().map(rate),
                rate_overrides: self.limits.rate_overrides.iter().map(|(k, v)| (k.clone(), rate(v))).collect(),
                token_rate: self.limits.token_rate.as_ref().map(rate),
                token_rate_global: self.limits.token_rate_global.as_ref().map(rate),
                max_concurrent_token_grants: self.limits.max_concurrent_token_grants,
                max_keys_page: self.limits.max_keys_page,
                max_upload_bytes: self.limits.max_upload_bytes,
            },
            subscriptions: SubscriptionConfig {
                heartbeat: Duration::from_millis(self.subscriptions.heartbeat_ms),
                retry: Duration::from_millis(self.subscriptions.retry_ms),
                retry_jitter: Duration::from_millis(self.subscriptions.retry_jitter_ms),
                queue_capacity: self.subscriptions.queue_capacity,
                queue_max_bytes: self.subscriptions.queue_max_bytes,
                stall_timeout: Duration::from_millis(self.subscriptions.stall_timeout_ms),
                ring_max_messages: self.subscriptions.ring_max_messages,
                ring_max_bytes: self.subscriptions.ring_max_bytes,
                history_reads: self.subscriptions.history_reads,
                tail_idle: Duration::from_millis(self.subscriptions.tail_idle_ms),
                max_per_principal: self.subscriptions.max_per_principal,
                max_total: self.subscriptions.max_total,
                require_registration: self.subscriptions.require_registration,
                registered_disconnect_alert: Duration::from_millis(self.subscriptions.registered_disconnect_alert_ms),
            },
            cors: self.cors.as_ref().map(|c| finmesh_gateway::CorsConfig {
                allowed_origins: c.allowed_origins.clone(),
                max_age: Duration::from_secs(c.max_age_secs),
            }),
            feed: finmesh_gateway::feed_in::FeedConfig {
                max_line_bytes: self.feed.max_line_bytes,
                batch_max_messages: self.feed.batch_max_messages,
                batch_max_bytes: self.feed.batch_max_bytes,
                linger: Duration::from_millis(self.feed.linger_ms),
                idle_timeout: Duration::from_millis(self.feed.idle_timeout_ms),
                max_upload_bytes: self.feed.max_upload_bytes,
            },
        })
    }

    /// The embedded engine's options.
    pub fn embedded_options(&self) -> finmesh_embedded::EmbeddedOptions {
        finmesh_embedded::EmbeddedOptions {
            cache_bytes: self.embedded.cache_bytes,
            kv_cache_bytes: self.embedded.kv_cache_bytes,
            ..Default::default()
        }
    }

    /// The drain deadline.
    pub fn drain_timeout(&self) -> Duration {
        Duration::from_millis(self.drain_timeout_ms)
    }

    /// How long the node keeps accepting, not ready, after SIGTERM.
    pub fn lame_duck(&self) -> Duration {
        Duration::from_millis(self.lame_duck_ms)
    }

    /// The serving threads' connection caps and timeouts.
    pub fn connection_limits(&self) -> crate::serving::ConnectionLimits {
        let c = &self.connections;
        crate::serving::ConnectionLimits {
            max_connections: c.max,
            max_connections_per_address: c.max_per_address,
            header_timeout: Duration::from_millis(c.header_timeout_ms),
            idle_timeout: Duration::from_millis(c.idle_timeout_ms),
            write_timeout: Duration::from_millis(c.write_timeout_ms),
        }
    }

    /// Serving threads: the configured number, or one per core.
    pub fn serve_threads(&self) -> usize {
        self.serve_threads
            .unwrap_or_else(|| std::thread::available_parallelism().map_or(1, std::num::NonZeroUsize::get))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_example_in_docs_operations_parses() {
        let doc = include_str!("../../../docs/operations.md");
        let start = doc.find("```toml\n").expect("a toml block") + "```toml\n".len();
        let text = &doc[start..start + doc[start..].find("```").unwrap()];
        let config = ServeConfig::parse(text, Path::new("docs/operations.md")).unwrap();
        assert_eq!(config.limits.rate_overrides["pricing-feed"].per_second, 20_000);
        assert_eq!(config.limits.token_rate, Some(RateSection { per_second: 10, burst: 20 }));
        // Only the example's file paths, which do not exist here, are problems.
        for p in config.validate() {
            assert!(p.message.contains("/etc/finmesh/") || p.key == "auth", "{p}");
        }
    }

    #[test]
    fn an_empty_file_is_the_defaults_and_valid() {
        let config = ServeConfig::parse("", Path::new("x.toml")).unwrap();
        assert_eq!(config, ServeConfig::default());
        assert_eq!(config.validate(), vec![]);
        assert!(config.listen.starts_with("127.0.0.1:"), "loopback by default");
    }

    #[test]
    fn unknown_keys_and_bad_types_name_line_and_column() {
        let err = ServeConfig::parse("listen = \"0.0.0.0:1\"\nlisen = 3\n", Path::new("x.toml")).unwrap_err();
        let text = err.to_string();
        assert!(text.contains("line 2") && text.contains("unknown field `lisen`"), "{text}");
        let err = ServeConfig::parse("[tls]\ncert = 5\n", Path::new("x.toml")).unwrap_err();
        assert!(err.to_string().contains("line 2"), "{err}");
    }

    #[test]
    fn validate_reports_every_problem_at_once() {
        let text = r#"
            listen = "localhost"
            engine = "nats"
            default_bucket = "no spaces"
            drain_timeout_ms = 0
            serve_threads = 0
            [limits]
            token_rate = { per_second = 0, burst = 5 }
            [subscriptions]
            queue_max_bytes = 0
            [connections]
            header_timeout_ms = 0
            [nats]
            servers = ["http://x"]
            [tls]
            cert = "/does/not/exist.pem"
            key = ""
            [cors]
            allowed_origins = ["https://*.example.com", "https://ok.example.com"]
        "#;
        let config = ServeConfig::parse(text, Path::new("x.toml")).unwrap();
        let keys: Vec<String> = config.validate().into_iter().map(|p| p.key).collect();
        assert_eq!(
            keys,
            [
                "listen",
                "default_bucket",
                "drain_timeout_ms",
                "serve_threads",
                "nats",
                "subscriptions.queue_max_bytes",
                "connections.header_timeout_ms",
                "limits.token_rate",
                "cors.allowed_origins",
                "tls.cert",
                "tls.key"
            ]
        );
    }

    #[test]
    fn flags_override_the_file_and_complete_tls() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("c.toml");
        std::fs::write(&path, "listen = \"127.0.0.1:1\"\n[tls]\ncert = \"a.pem\"\nkey = \"b.pem\"\n").unwrap();
        let overrides = ConfigOverrides {
            config: Some(path),
            listen: Some("127.0.0.1:2".into()),
            tls_key: Some("c.pem".into()),
            lame_duck_ms: Some(0),
            max_connections: Some(7),
            rate_per_second: Some(5),
            ..Default::default()
        };
        let config = ServeConfig::load(&overrides).unwrap();
        assert_eq!(config.listen, "127.0.0.1:2");
        assert_eq!((config.lame_duck_ms, config.connections.max), (0, 7));
        assert_eq!(config.limits.rate, Some(RateSection { per_second: 5, burst: 2000 }), "the burst stays");
        assert_eq!(config.connection_limits().max_connections, 7);
        assert_eq!(config.embedded_options().cache_bytes, finmesh_embedded::CACHE_BYTES, "the default");
        let tls = config.tls.unwrap();
        assert_eq!((tls.cert.to_str().unwrap(), tls.key.to_str().unwrap()), ("a.pem", "c.pem"));
    }

    #[test]
    fn the_embedded_cache_is_set_from_the_file_or_a_flag_and_checked() {
        let config = ServeConfig::parse("[embedded]\ncache_bytes = 1073741824\n", Path::new("x.toml")).unwrap();
        assert_eq!(config.embedded_options().cache_bytes, 1 << 30);
        assert_eq!(config.validate(), vec![]);
        let mut config = config;
        config.apply(&ConfigOverrides { cache_bytes: Some(4096), ..Default::default() });
        assert_eq!(config.embedded.cache_bytes, 4096);
        let keys: Vec<String> = config.validate().into_iter().map(|p| p.key).collect();
        assert_eq!(keys, ["embedded.cache_bytes"]);
        let config = ServeConfig::parse("[embedded]\nkv_cache_bytes = 0\n", Path::new("x.toml")).unwrap();
        assert_eq!(config.embedded_options().kv_cache_bytes, 0, "0 turns the hot-value cache off");
        assert_eq!(config.validate(), vec![]);
        let default = ServeConfig::parse("", Path::new("x.toml")).unwrap().embedded_options().kv_cache_bytes;
        assert_eq!(default, finmesh_embedded::KV_CACHE_BYTES);
        let err = ServeConfig::parse("[embedded]\ncache = 1\n", Path::new("x.toml")).unwrap_err();
        assert!(err.to_string().contains("unknown field `cache`"), "{err}");
    }
}
