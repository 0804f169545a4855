//! Prometheus metrics: what is recorded and the `/metrics` rendering.
//!
//! Metric names (all prefixed `finmesh_`):
//! - `http_requests_total{method,route,status}` and
//!   `http_request_duration_seconds{method,route,status}` (histogram): one
//!   sample per request, `route` is the matched path template so cardinality
//!   stays bounded;
//! - `publishes_total{stream}`: messages acked (duplicates included);
//! - `subscriptions_active{kind}` (gauge): connected SSE/WS/watch subscribers;
//! - `subscriptions_lagged_total`: subscribers cut off for falling behind;
//! - `engine_errors_total{kind}`: error answers by error kind;
//! - `rate_limited_total`, `shed_total`: requests refused by the limits.
//!
//! Invariant: one process-wide recorder is installed on first use (the
//! `metrics` facade is global); every [`AppState`](crate::AppState) renders
//! from it, so several gateways in one test process share counters.

use std::sync::OnceLock;
use std::time::Instant;

use axum::extract::{MatchedPath, Request};
use axum::middleware::Next;
use axum::response::Response;
use finmesh_core::ErrorKind;
use metrics_exporter_prometheus::{PrometheusBuilder, PrometheusHandle};

/// Latency buckets in seconds (100 µs … 10 s).
const BUCKETS: &[f64] =
    &[0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 10.0];

/// A handle to render the process's metrics.
#[derive(Clone)]
pub struct Metrics {
    handle: Option<PrometheusHandle>,
}

impl Metrics {
    /// The process-wide recorder, installed on first call. `None` inside if
    /// another recorder was installed first (then `/metrics` is empty).
    pub fn global() -> Self {
        static HANDLE: OnceLock<Option<PrometheusHandle>> = OnceLock::new();
        let handle = HANDLE.get_or_init(|| {
            let builder = PrometheusBuilder::new().set_buckets(BUCKETS).ok()?;
            match builder.install_recorder() {
                Ok(h) => Some(h),
                Err(e) => {
                    tracing::warn!(error = %e, "cannot install the Prometheus recorder; /metrics stays empty");
                    None
                }
            }
        });
        Metrics { handle: handle.clone() }
    }

    /// The text exposition format.
    pub fn render(&self) -> String {
        self.handle.as_ref().map(PrometheusHandle::render).unwrap_or_default()
    }
}

/// Middleware: count and time every request by route and status.
pub async fn track(req: Request, next: Next) -> Response {
    let start = Instant::now();
    let route = req.extensions().get::<MatchedPath>().map(|p| p.as_str().to_owned()).unwrap_or_else(|| "other".into());
    let method = req.method().as_str().to_owned();
    let res = next.run(req).await;
    let labels = [("method", method), ("route", route), ("status", res.status().as_u16().to_string())];
    metrics::counter!("finmesh_http_requests_total", &labels).increment(1);
    metrics::histogram!("finmesh_http_request_duration_seconds", &labels).record(start.elapsed().as_secs_f64());
    res
}

/// `n` messages acked on `stream`.
pub fn published(stream: &str, n: usize) {
    metrics::counter!("finmesh_publishes_total", "stream" => stream.to_owned()).increment(n as u64);
}

/// An error answer of `kind`.
pub fn engine_error(kind: ErrorKind) {
    metrics::counter!("finmesh_engine_errors_total", "kind" => kind.as_str()).increment(1);
}

/// A subscription of `kind` started (`+1`) or ended (`-1`).
pub fn subscription(kind: &'static str, delta: f64) {
    metrics::gauge!("finmesh_subscriptions_active", "kind" => kind).increment(delta);
}

/// A subscriber was cut off for lagging.
pub fn lagged() {
    metrics::counter!("finmesh_subscriptions_lagged_total").increment(1);
}

/// A request refused by the rate limit.
pub fn rate_limited() {
    metrics::counter!("finmesh_rate_limited_total").increment(1);
}

/// A request shed by the concurrency limit.
pub fn shed() {
    metrics::counter!("finmesh_shed_total").increment(1);
}
