//! Prometheus metrics: what is recorded and the `/metrics` rendering.
//!
//! Metric names (all prefixed `finmesh_`):
//! - `http_requests_total{method,route,status}` and
//!   `http_request_duration_seconds{method,route,status}` (histogram): one
//!   sample per request (recorded by the [`edge`](crate::edge) through
//!   [`RequestMetrics`]), `route` is the matched path template and `method`
//!   a standard method or `other`, so cardinality stays bounded;
//! - `publishes_total{stream}`: messages acked (duplicates included);
//! - `subscriptions_active{kind}` (gauge): connected SSE/WS/watch subscribers;
//! - `subscriptions_lagged_total`: subscribers cut off for falling behind;
//! - `subscriptions_refused_total{reason}`: subscriptions refused by the
//!   caps (`principal`: 429, `node`: 503);
//! - `subscriber_queued_bytes` (gauge): bytes of frames waiting in every
//!   subscriber's queue;
//! - `engine_errors_total{kind}`: error answers by error kind;
//! - `rate_limited_total`, `shed_total`: requests refused by the limits.
//!
//! Invariants:
//! - one process-wide recorder is installed on first use (the `metrics`
//!   facade is global); every [`AppState`](crate::AppState) renders from it,
//!   so several gateways in one test process share counters;
//! - memory is bounded whether or not anyone scrapes: a `finmesh-metrics`
//!   thread folds histogram samples into their buckets every 5 s.

use std::collections::HashMap;
use std::sync::OnceLock;
use std::time::Duration;

use axum::http::{Method, StatusCode};
use finmesh_core::ErrorKind;
use metrics::{Counter, Histogram};
use metrics_exporter_prometheus::{PrometheusBuilder, PrometheusHandle};
use parking_lot::RwLock;

/// Latency buckets in seconds (100 µs … 10 s).
const BUCKETS: &[f64] =
    &[0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 10.0];

/// How often histogram samples are folded into their buckets.
const UPKEEP_INTERVAL: Duration = Duration::from_secs(5);

/// The upkeep thread, once started.
static UPKEEP: OnceLock<std::thread::JoinHandle<()>> = OnceLock::new();

/// The exporter keeps every histogram sample until upkeep folds it into the
/// buckets (a scrape does too); without this thread a node nobody scrapes
/// would grow by 8 bytes per request, forever.
fn spawn_upkeep(handle: PrometheusHandle) {
    let spawned = std::thread::Builder::new().name("finmesh-metrics".into()).spawn(move || {
        loop {
            std::thread::sleep(UPKEEP_INTERVAL);
            handle.run_upkeep();
        }
    });
    match spawned {
        Ok(thread) => {
            let _ = UPKEEP.set(thread);
        }
        Err(e) => tracing::warn!(error = %e, "cannot start metrics upkeep; histograms are folded only when scraped"),
    }
}

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
                Ok(h) => {
                    spawn_upkeep(h.clone());
                    Some(h)
                }
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

/// The per-request metrics, `http_requests_total` and
/// `http_request_duration_seconds`, with their handles cached by route,
/// method and status: recording a request is a read lock, a short hash of
/// the route template and two atomic updates, with no allocation after the
/// first request of each combination. The combinations are bounded: route
/// templates are fixed, methods outside the standard ones share the label
/// `other`, statuses are three digits.
#[derive(Default)]
pub struct RequestMetrics {
    by_route: RwLock<HashMap<Box<str>, Vec<Handles>, foldhash::quality::RandomState>>,
}

struct Handles {
    method: &'static str,
    status: u16,
    count: Counter,
    latency: Histogram,
}

/// The `method` label: a standard method's name, else `other`.
fn method_label(method: &Method) -> &'static str {
    const STANDARD: [Method; 9] = [
        Method::GET,
        Method::HEAD,
        Method::POST,
        Method::PUT,
        Method::DELETE,
        Method::PATCH,
        Method::OPTIONS,
        Method::CONNECT,
        Method::TRACE,
    ];
    STANDARD.iter().find(|m| *m == method).map_or("other", |m| m.as_str())
}

impl RequestMetrics {
    /// One request of `method` on the route template `route` (`None`: no
    /// route matched, label `other`) answered with `status` after `elapsed`.
    pub fn record(&self, route: Option<&str>, method: &Method, status: StatusCode, elapsed: Duration) {
        let (route, method, status) = (route.unwrap_or("other"), method_label(method), status.as_u16());
        let seconds = elapsed.as_secs_f64();
        {
            let by_route = self.by_route.read();
            let cached =
                by_route.get(route).and_then(|hs| hs.iter().find(|h| h.method == method && h.status == status));
            if let Some(h) = cached {
                h.count.increment(1);
                h.latency.record(seconds);
                return;
            }
        }
        let labels = [("method", method.to_owned()), ("route", route.to_owned()), ("status", status.to_string())];
        let h = Handles {
            method,
            status,
            count: metrics::counter!("finmesh_http_requests_total", &labels),
            latency: metrics::histogram!("finmesh_http_request_duration_seconds", &labels),
        };
        h.count.increment(1);
        h.latency.record(seconds);
        let mut by_route = self.by_route.write();
        let handles = by_route.entry(route.into()).or_default();
        if !handles.iter().any(|x| x.method == method && x.status == status) {
            handles.push(h);
        }
    }
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

/// A subscription refused by a cap (`principal` or `node`).
pub fn subscription_refused(reason: &'static str) {
    metrics::counter!("finmesh_subscriptions_refused_total", "reason" => reason).increment(1);
}

/// The gauge of bytes queued for all subscribers.
pub fn queued_bytes() -> metrics::Gauge {
    metrics::gauge!("finmesh_subscriber_queued_bytes")
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn installing_the_recorder_starts_upkeep() {
        assert!(Metrics::global().handle.is_some(), "the recorder installs in a fresh process");
        let upkeep = UPKEEP.get().expect("the upkeep thread started");
        assert_eq!(upkeep.thread().name(), Some("finmesh-metrics"));
        assert!(!upkeep.is_finished(), "upkeep runs for the life of the process");
    }

    #[test]
    fn methods_outside_the_standard_ones_share_a_label() {
        assert_eq!(method_label(&Method::GET), "GET");
        assert_eq!(method_label(&Method::from_bytes(b"BREW").unwrap()), "other");
    }
}
