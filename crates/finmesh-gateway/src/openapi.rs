//! The OpenAPI document, generated from the handlers' `#[utoipa::path]`
//! annotations, served at `/openapi.json` and checked into
//! `docs/openapi.json` (the `openapi_drift` test fails when they differ; run
//! it with `FINMESH_UPDATE_OPENAPI=1` to rewrite the file).

use axum::Json;
use axum::response::{IntoResponse, Response};
use utoipa::openapi::security::{HttpAuthScheme, HttpBuilder, SecurityScheme};
use utoipa::{Modify, OpenApi};

use crate::{consumers, kv, oauth, ops, sse, streams, ws};

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

/// The finmesh HTTP API.
#[derive(OpenApi)]
#[openapi(
    info(title = "finmesh", description = "finmesh HTTP API (v1). Errors are application/problem+json (RFC 9457)."),
    modifiers(&BearerJwt),
    paths(
        ops::healthz, ops::readyz, ops::metrics, ops::subscribers,
        kv::list_buckets, kv::put_bucket, kv::get_bucket, kv::delete_bucket, kv::keys, sse::watch,
        kv::get_key, kv::put_key, kv::delete_key, kv::history, kv::get_default,
        streams::list_streams, streams::put_stream, streams::get_stream, streams::delete_stream,
        streams::publish, streams::read, sse::events, ws::ws,
        consumers::list, consumers::put, consumers::get, consumers::delete, consumers::fetch, consumers::ack,
        oauth::token,
    ),
    components(schemas(crate::Problem, crate::subscribe::SubscriberInfo, crate::schema::Acks, crate::schema::Envelope)),
    tags((name = "kv"), (name = "streams"), (name = "consumers"), (name = "ops"), (name = "auth"))
)]
pub struct ApiDoc;

/// The document as pretty JSON (what `docs/openapi.json` holds).
pub fn openapi_json() -> String {
    ApiDoc::openapi().to_pretty_json().unwrap_or_default()
}

/// `GET /openapi.json`.
pub async fn serve() -> Response {
    Json(ApiDoc::openapi()).into_response()
}
