//! The one tower layer every request passes through, in place of a stack of
//! generic middleware: [`Edge`], applied to each group of routes (and the
//! router's 404 fallback) with that group's settings.
//!
//! For every request, in this order:
//! - load shedding: a request arriving while `max_concurrent_requests` are
//!   in flight (counted across all groups) is answered at once with 503
//!   `overloaded` + `Retry-After`, never queued; a request is in flight until
//!   its response head is ready. Health probes (`/healthz`, `/readyz`,
//!   built with [`EdgeLayer::unshed`]) are counted but never shed, so an
//!   overloaded node still answers its load balancer;
//! - on API groups, authentication and the per-client rate limit with
//!   [`caller::admit`] before the handler runs (401 / 429); a wrong method on
//!   an API path is therefore answered 401 before 405. Subscription groups
//!   ([`EdgeLayer::query_token`]) also take the token from `access_token`
//!   in the query (other groups refuse it with 400), and every answer to a
//!   request with one, refusals included, carries
//!   `Cache-Control: no-store, private`;
//! - on request/response groups, the request timeout (504 `timeout`
//!   problem), counted from the handler's first `Pending`: a handler that
//!   answers on its first poll (an embedded-engine read) never touches the
//!   runtime's timer wheel; subscriptions have no timeout;
//! - panics, both while the handler builds its future and while the future
//!   runs, become a logged 500 problem;
//! - every error answer that is not problem+json yet (axum rejections, 405)
//!   is rewritten with [`problem::into_problem`];
//! - every answer, shed, refused and rewritten ones included, is counted and
//!   timed by route template, method and status ([`RequestMetrics`]).
//!
//! Why hand-written, and why one: each generic layer (`from_fn`,
//! `HandleError`, `CatchPanic`, `Router::layer` itself) costs a boxed service
//! clone and a boxed future per request; on small KV reads that was most of
//! the gateway's own CPU time (see BENCHMARKS.md, "Gateway"). Here the
//! success path allocates nothing of its own: the in-flight count is one
//! atomic, metric handles are cached, the future is a plain enum, and the
//! inner service is called in place (axum's routes are always ready, and
//! tower's contract is honoured: `poll_ready` is forwarded).

use std::convert::Infallible;
use std::future::Future;
use std::panic::{AssertUnwindSafe, catch_unwind};
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::task::{Context, Poll, ready};
use std::time::{Duration, Instant};

use axum::extract::{MatchedPath, Request};
use axum::http::{HeaderValue, Method, StatusCode, header};
use axum::response::{IntoResponse, Response};
use futures::future::BoxFuture;
use pin_project_lite::pin_project;
use tower::{Layer, Service};

use crate::caller::TokenSource;
use crate::metrics::RequestMetrics;
use crate::problem::{self, Problem};
use crate::{AppState, caller};

/// Builds [`Edge`] services. Every layer derived from one
/// [`EdgeLayer::new`] shares its in-flight count and metrics cache.
#[derive(Clone)]
pub struct EdgeLayer {
    shared: Arc<Shared>,
    auth: Option<AppState>,
    tokens: TokenSource,
    timeout: Option<Duration>,
    shed: bool,
}

struct Shared {
    in_flight: AtomicUsize,
    max_in_flight: usize,
    metrics: RequestMetrics,
}

impl EdgeLayer {
    /// An edge admitting at most `max_in_flight` requests at a time (at
    /// least one), with no authentication and no timeout.
    pub fn new(max_in_flight: usize) -> Self {
        let shared = Shared {
            in_flight: AtomicUsize::new(0),
            max_in_flight: max_in_flight.max(1),
            metrics: RequestMetrics::default(),
        };
        EdgeLayer { shared: Arc::new(shared), auth: None, tokens: TokenSource::Header, timeout: None, shed: true }
    }

    /// The same edge for routes that need a bearer token, authenticated and
    /// rate-limited against `state`.
    pub fn authenticated(&self, state: AppState) -> Self {
        EdgeLayer { auth: Some(state), ..self.clone() }
    }

    /// The same edge, also taking the bearer token from an `access_token`
    /// query parameter (subscription routes; see [`TokenSource`]).
    pub fn query_token(&self) -> Self {
        EdgeLayer { tokens: TokenSource::HeaderOrQuery, ..self.clone() }
    }

    /// The same edge, bounding handlers by `timeout`.
    pub fn timeout(&self, timeout: Duration) -> Self {
        EdgeLayer { timeout: Some(timeout), ..self.clone() }
    }

    /// The same edge, never shedding (health probes).
    pub fn unshed(&self) -> Self {
        EdgeLayer { shed: false, ..self.clone() }
    }
}

impl<S> Layer<S> for EdgeLayer {
    type Service = Edge<S>;

    fn layer(&self, inner: S) -> Edge<S> {
        Edge {
            inner,
            shared: self.shared.clone(),
            auth: self.auth.clone(),
            tokens: self.tokens,
            timeout: self.timeout,
            shed: self.shed,
        }
    }
}

/// See the [module documentation](self).
#[derive(Clone)]
pub struct Edge<S> {
    inner: S,
    shared: Arc<Shared>,
    auth: Option<AppState>,
    tokens: TokenSource,
    timeout: Option<Duration>,
    shed: bool,
}

impl<S> Service<Request> for Edge<S>
where
    S: Service<Request, Response = Response, Error = Infallible>,
{
    type Response = Response;
    type Error = Infallible;
    type Future = EdgeFuture<S::Future>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut req: Request) -> Self::Future {
        let shared = self.shared.clone();
        let admitted = shared.in_flight.fetch_add(1, Ordering::AcqRel) < shared.max_in_flight || !self.shed;
        let pass = InFlight {
            shared,
            start: Instant::now(),
            route: req.extensions().get::<MatchedPath>().cloned(),
            method: req.method().clone(),
        };
        // A token in the query makes every answer uncacheable, refusals too.
        let no_store = req.uri().query().is_some_and(|q| q.contains("access_token"));
        let refused = if !admitted {
            crate::metrics::shed();
            Some(Problem::overloaded().into_response())
        } else {
            self.auth.as_ref().and_then(|state| caller::admit(state, &mut req, self.tokens).err().map(|res| *res))
        };
        let state = match refused {
            Some(res) => EdgeState::Done { res: Some(res) },
            None => match catch_unwind(AssertUnwindSafe(|| self.inner.call(req))) {
                Ok(fut) => EdgeState::Running { fut, limit: self.timeout, timer: None },
                Err(panic) => EdgeState::Done { res: Some(problem::panic_response(panic)) },
            },
        };
        EdgeFuture { state, pass: Some(pass), no_store }
    }
}

/// One request between admission and its answer: leaving (answer or drop)
/// frees its place in the in-flight count.
struct InFlight {
    shared: Arc<Shared>,
    start: Instant,
    route: Option<MatchedPath>,
    method: Method,
}

impl InFlight {
    fn answered(self, status: StatusCode) {
        let route = self.route.as_ref().map(MatchedPath::as_str);
        self.shared.metrics.record(route, &self.method, status, self.start.elapsed());
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        self.shared.in_flight.fetch_sub(1, Ordering::AcqRel);
    }
}

pin_project! {
    /// The response future of [`Edge`].
    pub struct EdgeFuture<F> {
        #[pin]
        state: EdgeState<F>,
        pass: Option<InFlight>,
        no_store: bool,
    }
}

pin_project! {
    #[project = EdgeStateProj]
    enum EdgeState<F> {
        Running {
            #[pin] fut: F,
            limit: Option<Duration>,
            // Armed at the first `Pending` (see the module documentation).
            timer: Option<Pin<Box<tokio::time::Sleep>>>,
        },
        Rewriting { fut: BoxFuture<'static, Response> },
        Done { res: Option<Response> },
    }
}

impl<F> Future for EdgeFuture<F>
where
    F: Future<Output = Result<Response, Infallible>>,
{
    type Output = Result<Response, Infallible>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let mut this = self.project();
        loop {
            let (res, rewritten) = match this.state.as_mut().project() {
                EdgeStateProj::Running { fut, limit, timer } => match catch_unwind(AssertUnwindSafe(|| fut.poll(cx))) {
                    Ok(Poll::Ready(Ok(res))) => (res, false),
                    Ok(Poll::Ready(Err(never))) => match never {},
                    Err(panic) => (problem::panic_response(panic), true),
                    Ok(Poll::Pending) => {
                        let Some(limit) = *limit else { return Poll::Pending };
                        let timer = timer.get_or_insert_with(|| Box::pin(tokio::time::sleep(limit)));
                        ready!(timer.as_mut().poll(cx));
                        (timed_out(), true)
                    }
                },
                EdgeStateProj::Rewriting { fut } => (ready!(fut.as_mut().poll(cx)), true),
                EdgeStateProj::Done { res } => (res.take().expect("EdgeFuture polled after completion"), false),
            };
            if !rewritten && problem::needs_rewrite(&res) {
                this.state.set(EdgeState::Rewriting { fut: Box::pin(problem::into_problem(res)) });
                continue;
            }
            if let Some(pass) = this.pass.take() {
                pass.answered(res.status());
            }
            let mut res = res;
            if *this.no_store {
                res.headers_mut().insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store, private"));
            }
            return Poll::Ready(Ok(res));
        }
    }
}

fn timed_out() -> Response {
    Problem::from_status(StatusCode::GATEWAY_TIMEOUT, "the request took too long".to_owned()).into_response()
}
