//! finmesh-gateway: the HTTP face of finmesh. [`app`] builds the axum
//! [`Router`] for an [`AppState`] (an `Arc<dyn Engine>`, an
//! [`Authenticator`](finmesh_auth::Authenticator) and a [`GatewayConfig`]);
//! the binary's `serve` binds it to sockets, TLS and signals.
//!
//! Read in this order:
//! 1. [`state`]: the shared state, configuration and the drain signal;
//! 2. [`problem`]: every error as `application/problem+json`;
//! 3. [`caller`]: authentication, per-route access, the route table;
//!    [`edge`]: the one layer around the routes (shedding, authentication,
//!    timeouts, panics, error rewriting, metrics);
//! 4. [`kv`], [`streams`], [`consumers`]: the request/response routes;
//!    [`oauth`]: `POST /oauth/token`, the client-credentials grant;
//!    [`cors`]: cross-origin answers for browsers, when configured;
//!    [`pipelines`]: risk-feed file uploads, streamed into the pipeline;
//!    [`pipeline_runs`]: pipeline runs (open one, read its reconciliation state);
//!    [`keys`]: key administration (list, rotate, retire, re-encrypt a bucket);
//! 5. [`envelope`], [`subscribe`], [`hub`], [`sse`], [`ws`]: subscriptions,
//!    from the JSON envelope through the fan-out hub (one engine tail per
//!    stream) and the bounded per-subscriber queue to the wire;
//!    [`feed_in`]: the receiver of a continuous upload (NDJSON lines over a
//!    long POST or a WebSocket), published in batches with acks streamed back;
//! 6. [`limits`], [`metrics`], [`ops`], [`openapi`], [`schema`]: limits,
//!    observability, health and the OpenAPI document with its response types;
//!    [`registry`]: the subscriber registry (downstream servers, their
//!    allowed filters and rate limits, their live status).
//!
//! The gateway holds no state that is not in the engine except connections
//! and counters, and it never asks which engine it runs on.

pub mod caller;
pub mod consumers;
pub mod cors;
pub mod edge;
pub mod envelope;
pub mod feed_in;
pub mod hub;
pub mod keys;
pub mod kv;
pub mod limits;
pub mod metrics;
pub mod oauth;
pub mod openapi;
pub mod ops;
pub mod pipeline_runs;
pub mod pipelines;
pub mod problem;
mod queue;
pub mod registry;
pub mod schema;
pub mod sse;
pub mod state;
pub mod streams;
pub mod subscribe;
pub mod ws;

use axum::Router;
use axum::extract::DefaultBodyLimit;
use axum::response::IntoResponse;
use axum::routing::{get, post};
use tower::ServiceBuilder;

use crate::edge::EdgeLayer;

pub use caller::{Caller, Need, ROUTE_ACCESS};
pub use cors::CorsConfig;
pub use problem::{ApiError, PROBLEM_BASE, Problem};
pub use state::{AppState, GatewayConfig, Limits, Rate, SubscriptionConfig};

/// The whole API as a router (every route of `docs/api.md`; `/oauth/token`
/// answers 404 unless the state was built [`with_oauth`](AppState::with_oauth)).
pub fn app(state: AppState) -> Router {
    let limits = state.config().limits.clone();
    let edge = EdgeLayer::new(limits.max_concurrent_requests);
    // Each group gets exactly one layer application: axum boxes every
    // application per request (see `edge`).
    let around =
        |edge: EdgeLayer| ServiceBuilder::new().layer(edge).layer(DefaultBodyLimit::max(limits.max_body_bytes));
    let api = edge.authenticated(state.clone());

    // Request/response routes: bounded by the request timeout.
    let unary = Router::new()
        .route("/v1/kv", get(kv::list_buckets))
        .route("/v1/kv/{bucket}", get(kv::get_bucket).put(kv::put_bucket).delete(kv::delete_bucket))
        .route("/v1/kv/{bucket}/keys", get(kv::keys))
        .route("/v1/kv/{bucket}/{key}", get(kv::get_key).put(kv::put_key).delete(kv::delete_key))
        .route("/v1/kv/{bucket}/{key}/history", get(kv::history))
        .route("/kv/{key}", get(kv::get_default))
        .route("/v1/streams", get(streams::list_streams))
        .route("/v1/streams/{stream}", get(streams::get_stream).put(streams::put_stream).delete(streams::delete_stream))
        .route("/v1/streams/{stream}/messages", get(streams::read).post(streams::publish))
        .route("/v1/streams/{stream}/consumers", get(consumers::list))
        .route(
            "/v1/streams/{stream}/consumers/{name}",
            get(consumers::get).put(consumers::put).delete(consumers::delete),
        )
        .route("/v1/streams/{stream}/consumers/{name}/fetch", post(consumers::fetch))
        .route("/v1/streams/{stream}/consumers/{name}/ack", post(consumers::ack))
        .route("/v1/subscribers", get(ops::subscribers))
        .route(
            "/v1/subscribers/{id}",
            get(registry::routes::get).put(registry::routes::put).delete(registry::routes::delete),
        )
        .route("/v1/pipelines/runs/{run}", get(pipeline_runs::get_run).put(pipeline_runs::put_run))
        .route("/v1/keys", get(keys::list))
        .route("/v1/keys/rotate", post(keys::rotate))
        .route("/v1/keys/{id}/usage", get(keys::usage))
        .route("/v1/keys/{id}/retire", post(keys::retire))
        .route("/v1/keys/{id}/restore", post(keys::restore))
        .layer(around(api.timeout(limits.request_timeout)));

    // Subscriptions live as long as the client keeps them: no timeout.
    let streaming = Router::new()
        .route("/v1/kv/{bucket}/watch", get(sse::watch))
        .route("/v1/streams/{stream}/events", get(sse::events))
        .route("/v1/streams/{stream}/ws", get(ws::ws))
        .layer(around(api.query_token()));

    // Feeds in: as long as the sender keeps sending, no timeout; the token
    // only in `Authorization` (a sender is a server, not a browser).
    // A re-encryption reports progress as long as it runs: no timeout.
    let feeding = Router::new()
        .route("/v1/keys/reencrypt/{bucket}", post(keys::reencrypt))
        .route("/v1/streams/{stream}/feed", post(feed_in::http::feed))
        .route("/v1/streams/{stream}/feed/ws", get(feed_in::ws::feed_ws))
        .layer(around(api.clone()));
    let unary = unary.merge(feeding);
    // Uploads last as long as the file takes: no timeout, no body limit
    // (the route enforces `max_upload_bytes` itself, streaming).
    let uploads = Router::new()
        .route("/v1/pipelines/{pipeline}/files", post(pipelines::upload))
        .layer(ServiceBuilder::new().layer(api.clone()).layer(DefaultBodyLimit::disable()));

    // The token endpoint authenticates clients itself; bounded by the timeout.
    let token =
        Router::new().route("/oauth/token", post(oauth::token)).layer(around(edge.timeout(limits.request_timeout)));

    // Health probes answer even while requests are shed.
    let probes = Router::new()
        .route("/healthz", get(ops::healthz))
        .route("/readyz", get(ops::readyz))
        .layer(around(edge.unshed()));

    let public = Router::new()
        .route("/metrics", get(ops::metrics))
        .route("/openapi.json", get(openapi::serve))
        .layer(around(edge.clone()));

    // Paths no route matches: a 404 problem, through the edge like the rest.
    let not_found = around(edge).service(tower::service_fn(|_: axum::extract::Request| {
        std::future::ready(Ok::<_, std::convert::Infallible>(axum::http::StatusCode::NOT_FOUND.into_response()))
    }));
    let cors = state.config().cors.as_ref().map(cors::CorsPolicy::new);
    let router = unary
        .merge(streaming)
        .merge(uploads)
        .merge(token)
        .merge(probes)
        .merge(public)
        .fallback_service(not_found)
        .with_state(state);
    // Outermost, so preflights are answered before authentication; absent
    // without `[cors]`, so the hot paths pay nothing for it.
    match cors {
        Some(policy) => router.layer(axum::middleware::from_fn_with_state(policy, cors::respond)),
        None => router,
    }
}
