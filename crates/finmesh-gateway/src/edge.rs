//! The two tower layers every request passes through, in place of a stack of
//! generic middleware: [`Edge`] around the whole router, [`Guard`] around
//! each group of routes.
//!
//! [`Edge`] (outermost, on every route and the router's 404/405 answers):
//! - sheds load: a request arriving while `max_concurrent_requests` are in
//!   flight is answered at once with 503 `overloaded` + `Retry-After`, never
//!   queued (a request is in flight until its response head is ready);
//! - catches panics, both while the handler builds its future and while the
//!   future runs, and answers a logged 500 problem;
//! - rewrites every error answer that is not problem+json yet (axum
//!   rejections, router 404/405) with [`problem::into_problem`];
//! - counts and times every answer, shed and rewritten ones included, by
//!   route template, method and status ([`RequestMetrics`]).
//!
//! [`Guard`] (on each group of routes, after routing):
//! - on API routes, authenticates and rate-limits with [`caller::admit`]
//!   before the handler runs (401 / 429);
//! - on request/response routes, bounds the handler by the request timeout
//!   (504 `gateway-timeout` problem); subscriptions have none.
//!
//! Why hand-written: the generic layers cost a boxed service clone and a
//! boxed future each per request; on small KV reads that was most of the
//! gateway's own CPU time (see BENCHMARKS.md, "Gateway"). Here the success
//! path allocates nothing of its own: the in-flight count is one atomic,
//! metric handles are cached, both futures are plain enums, and the inner
//! service is called in place (axum's routes are always ready, and tower's
//! contract is honoured: `poll_ready` is forwarded).

use std::convert::Infallible;
use std::future::Future;
use std::panic::{AssertUnwindSafe, catch_unwind};
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::task::{Context, Poll, ready};
use std::time::{Duration, Instant};

use axum::extract::{MatchedPath, Request};
use axum::http::{Method, StatusCode};
use axum::response::{IntoResponse, Response};
use futures::future::BoxFuture;
use pin_project_lite::pin_project;
use tower::{Layer, Service};

use crate::metrics::RequestMetrics;
use crate::problem::{self, Problem};
use crate::{AppState, caller};

/// Builds [`Edge`] services; clones share one in-flight count and one
/// metrics cache.
#[derive(Clone)]
pub struct EdgeLayer {
    shared: Arc<Shared>,
}

struct Shared {
    in_flight: AtomicUsize,
    max_in_flight: usize,
    metrics: RequestMetrics,
}

impl EdgeLayer {
    /// An edge admitting at most `max_in_flight` requests at a time (at least one).
    pub fn new(max_in_flight: usize) -> Self {
        let shared = Shared {
            in_flight: AtomicUsize::new(0),
            max_in_flight: max_in_flight.max(1),
            metrics: RequestMetrics::default(),
        };
        EdgeLayer { shared: Arc::new(shared) }
    }
}

impl<S> Layer<S> for EdgeLayer {
    type Service = Edge<S>;

    fn layer(&self, inner: S) -> Edge<S> {
        Edge { inner, shared: self.shared.clone() }
    }
}

/// See the [module documentation](self).
#[derive(Clone)]
pub struct Edge<S> {
    inner: S,
    shared: Arc<Shared>,
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

    fn call(&mut self, req: Request) -> Self::Future {
        let shared = self.shared.clone();
        let admitted = shared.in_flight.fetch_add(1, Ordering::AcqRel) < shared.max_in_flight;
        let pass = InFlight {
            shared,
            start: Instant::now(),
            route: req.extensions().get::<MatchedPath>().cloned(),
            method: req.method().clone(),
        };
        let state = if !admitted {
            crate::metrics::shed();
            EdgeState::Done { res: Some(Problem::overloaded().into_response()) }
        } else {
            match catch_unwind(AssertUnwindSafe(|| self.inner.call(req))) {
                Ok(fut) => EdgeState::Running { fut },
                Err(panic) => EdgeState::Done { res: Some(problem::panic_response(panic)) },
            }
        };
        EdgeFuture { state, pass: Some(pass) }
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
    }
}

pin_project! {
    #[project = EdgeStateProj]
    enum EdgeState<F> {
        Running { #[pin] fut: F },
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
                EdgeStateProj::Running { fut } => match catch_unwind(AssertUnwindSafe(|| fut.poll(cx))) {
                    Ok(Poll::Pending) => return Poll::Pending,
                    Ok(Poll::Ready(Ok(res))) => (res, false),
                    Ok(Poll::Ready(Err(never))) => match never {},
                    Err(panic) => (problem::panic_response(panic), true),
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
            return Poll::Ready(Ok(res));
        }
    }
}

/// Builds [`Guard`] services.
#[derive(Clone)]
pub struct GuardLayer {
    auth: Option<AppState>,
    timeout: Option<Duration>,
}

impl GuardLayer {
    /// Routes that need a bearer token (authenticated and rate-limited
    /// against `state`), bounded by `timeout` if given.
    pub fn authenticated(state: AppState, timeout: Option<Duration>) -> Self {
        GuardLayer { auth: Some(state), timeout }
    }

    /// Routes that authenticate their callers themselves, bounded by `timeout`.
    pub fn timeout_only(timeout: Duration) -> Self {
        GuardLayer { auth: None, timeout: Some(timeout) }
    }
}

impl<S> Layer<S> for GuardLayer {
    type Service = Guard<S>;

    fn layer(&self, inner: S) -> Guard<S> {
        Guard { inner, auth: self.auth.clone(), timeout: self.timeout }
    }
}

/// See the [module documentation](self).
#[derive(Clone)]
pub struct Guard<S> {
    inner: S,
    auth: Option<AppState>,
    timeout: Option<Duration>,
}

impl<S> Service<Request> for Guard<S>
where
    S: Service<Request, Response = Response, Error = Infallible>,
{
    type Response = Response;
    type Error = Infallible;
    type Future = GuardFuture<S::Future>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut req: Request) -> Self::Future {
        if let Some(state) = &self.auth
            && let Err(refusal) = caller::admit(state, &mut req)
        {
            return GuardFuture::Refused { res: Some(*refusal) };
        }
        let fut = self.inner.call(req);
        match self.timeout {
            Some(limit) => GuardFuture::Timed { fut: tokio::time::timeout(limit, fut) },
            None => GuardFuture::Untimed { fut },
        }
    }
}

pin_project! {
    /// The response future of [`Guard`].
    #[project = GuardProj]
    pub enum GuardFuture<F> {
        Refused { res: Option<Response> },
        Untimed { #[pin] fut: F },
        Timed { #[pin] fut: tokio::time::Timeout<F> },
    }
}

impl<F> Future for GuardFuture<F>
where
    F: Future<Output = Result<Response, Infallible>>,
{
    type Output = Result<Response, Infallible>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        match self.project() {
            GuardProj::Refused { res } => Poll::Ready(Ok(res.take().expect("GuardFuture polled after completion"))),
            GuardProj::Untimed { fut } => fut.poll(cx),
            GuardProj::Timed { fut } => Poll::Ready(match ready!(fut.poll(cx)) {
                Ok(answer) => answer,
                Err(_elapsed) => Ok(timed_out()),
            }),
        }
    }
}

fn timed_out() -> Response {
    Problem::from_status(StatusCode::GATEWAY_TIMEOUT, "the request took too long".to_owned()).into_response()
}
