//! The OpenAPI document, generated from the handlers' `#[utoipa::path]`
//! annotations, served at `/openapi.json` and checked into
//! `docs/openapi.json` (the `openapi_drift` test fails when they differ; run
//! it with `FINMESH_UPDATE_OPENAPI=1` to rewrite the file).
//!
//! Invariant: every status an operation can answer is documented, so that a
//! client (or `scripts/fuzz-api`) can trust the document. Route-specific
//! answers are in each handler's annotation; the answers of the layers every
//! route shares (authentication, validation of names and bodies, limits,
//! timeouts) are added to every operation by `LayerResponses`, and every
//! error response is declared as `application/problem+json`.

use axum::Json;
use axum::response::{IntoResponse, Response};
use utoipa::openapi::path::Operation;
use utoipa::openapi::security::{HttpAuthScheme, HttpBuilder, SecurityScheme};
use utoipa::openapi::{ContentBuilder, Ref, RefOr, ResponseBuilder};
use utoipa::{Modify, OpenApi};

use crate::problem::PROBLEM_JSON;
use crate::{consumers, feed_in, keys, kv, oauth, ops, pipelines, registry, sse, streams, ws};

/// Paths without a request timeout: subscriptions, feeds and uploads.
/// (A re-encryption is matched by its prefix, see [`LayerResponses`].)
const STREAMING_SUFFIXES: [&str; 5] = ["/watch", "/events", "/ws", "/feed", "/files"];

/// Adds the bearer-JWT security scheme and requires it globally.
struct BearerJwt;

impl Modify for BearerJwt {
    fn modify(&self, openapi: &mut utoipa::openapi::OpenApi) {
        let components = openapi.components.get_or_insert_with(Default::default);
        components.add_security_scheme(
            "bearer",
            SecurityScheme::Http(HttpBuilder::new().scheme(HttpAuthScheme::Bearer).bearer_format("JWT").build()),
        );
        openapi.security =
            Some(vec![utoipa::openapi::security::SecurityRequirement::new("bearer", Vec::<String>::new())]);
    }
}

/// Documents what the shared layers answer, on every operation: error bodies
/// as `application/problem+json`; 500 (caught panic) and 503 (load shed,
/// `Retry-After`) everywhere; on authenticated routes (those whose annotation
/// does not set its own `security`) also 401, 403 and 429, 400 where there is
/// anything to validate (parameters or a body), 413 where there is a body,
/// and 504 where the request timeout applies (all but subscriptions).
struct LayerResponses;

impl LayerResponses {
    fn problem(description: &str) -> RefOr<utoipa::openapi::Response> {
        let content = ContentBuilder::new().schema(Some(Ref::from_schema_name("Problem"))).build();
        RefOr::T(ResponseBuilder::new().description(description).content(PROBLEM_JSON, content).build())
    }

    fn add(op: &mut Operation, status: u16, description: &str) {
        op.responses.responses.entry(status.to_string()).or_insert_with(|| Self::problem(description));
    }

    fn document(path: &str, op: &mut Operation) {
        // Problem bodies that an annotation declared as plain JSON.
        for response in op.responses.responses.values_mut() {
            if let RefOr::T(response) = response
                && let Some(content) = response.content.shift_remove("application/json")
            {
                let is_problem = matches!(&content.schema, Some(RefOr::Ref(r)) if r.ref_location.ends_with("/Problem"));
                let media = if is_problem { PROBLEM_JSON } else { "application/json" };
                response.content.insert(media.to_owned(), content);
            }
        }
        Self::add(op, 500, "internal error (details only in the server log)");
        Self::add(op, 503, "overloaded, draining or engine unavailable (`Retry-After`)");
        if op.security.is_some() {
            return; // a public route: no token, no rate limit, no request timeout
        }
        let has_params = op.parameters.as_ref().is_some_and(|p| !p.is_empty());
        if has_params || op.request_body.is_some() {
            Self::add(op, 400, "invalid name, parameter or body");
        }
        Self::add(op, 401, "missing or invalid bearer token");
        Self::add(op, 403, "the token's scopes do not allow this");
        if op.request_body.is_some() {
            Self::add(op, 413, "body over the size limit");
        }
        Self::add(op, 429, "over this client's rate limit (`Retry-After`)");
        if !STREAMING_SUFFIXES.iter().any(|s| path.ends_with(s)) && !path.starts_with("/v1/keys/reencrypt/") {
            Self::add(op, 504, "the request took longer than the request timeout");
        }
    }
}

impl Modify for LayerResponses {
    fn modify(&self, openapi: &mut utoipa::openapi::OpenApi) {
        for (path, item) in openapi.paths.paths.iter_mut() {
            let ops = [&mut item.get, &mut item.put, &mut item.post, &mut item.delete, &mut item.patch];
            for op in ops.into_iter().flatten() {
                Self::document(path, op);
            }
        }
    }
}

/// The finmesh HTTP API.
#[derive(OpenApi)]
#[openapi(
    info(title = "finmesh", description = "finmesh HTTP API (v1). Errors are application/problem+json (RFC 9457)."),
    modifiers(&BearerJwt, &LayerResponses),
    paths(
        ops::healthz, ops::readyz, ops::metrics, ops::subscribers, serve,
        kv::list_buckets, kv::put_bucket, kv::get_bucket, kv::delete_bucket, kv::keys, sse::watch,
        kv::get_key, kv::put_key, kv::delete_key, kv::history, kv::get_default,
        streams::list_streams, streams::put_stream, streams::get_stream, streams::delete_stream,
        streams::publish, streams::read, sse::events, ws::ws, feed_in::http::feed, feed_in::ws::feed_ws,
        consumers::list, consumers::put, consumers::get, consumers::delete, consumers::fetch, consumers::ack,
        oauth::token, pipelines::upload,
        registry::routes::put, registry::routes::get, registry::routes::delete,
        crate::pipeline_runs::put_run, crate::pipeline_runs::get_run,
        keys::list, keys::rotate, keys::usage, keys::retire, keys::restore, keys::reencrypt,
    ),
    components(schemas(crate::Problem, crate::subscribe::SubscriberInfo, crate::schema::Acks, crate::schema::Envelope)),
    tags((name = "kv"), (name = "streams"), (name = "consumers"), (name = "ops"), (name = "auth"), (name = "pipelines"), (name = "keys"))
)]
pub struct ApiDoc;

/// The document as pretty JSON (what `docs/openapi.json` holds).
pub fn openapi_json() -> String {
    ApiDoc::openapi().to_pretty_json().unwrap_or_default()
}

/// `GET /openapi.json`: this document.
#[utoipa::path(get, path = "/openapi.json", tag = "ops", security(()),
    responses((status = 200, description = "the OpenAPI 3.1 document of this API", body = Object)))]
pub async fn serve() -> Response {
    Json(ApiDoc::openapi()).into_response()
}
