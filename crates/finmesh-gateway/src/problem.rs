//! Errors as `application/problem+json` (RFC 9457): the one place that maps
//! a [`finmesh_core::ErrorKind`] to an HTTP status and a stable `type` URI.
//!
//! Invariants:
//! - every error response of the API is problem+json (but the grant
//!   outcomes of `POST /oauth/token`, in RFC 6749's format): handler errors go
//!   through [`ApiError`]; axum's rejections (bad JSON, bad path, wrong
//!   content type, body too large) and 404/405 from the router are rewritten
//!   by the [`edge`](crate::edge) with [`into_problem`];
//! - `type` is `https://finmesh.dev/problems/<slug>` with a slug per kind
//!   (see [`PROBLEM_BASE`] and `docs/api.md`); clients branch on it;
//! - `detail` is the error's client-safe message; for `Internal` and
//!   `Integrity` errors it is a fixed text and the real cause is logged,
//!   never sent.

use axum::body::{Body, to_bytes};
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use finmesh_core::{Error, ErrorKind};
use serde::Serialize;

/// Prefix of every problem `type`.
pub const PROBLEM_BASE: &str = "https://finmesh.dev/problems/";

/// The media type of error bodies.
pub const PROBLEM_JSON: &str = "application/problem+json";

/// Seconds a shed or unavailable request is told to wait (`Retry-After`).
pub const RETRY_AFTER_SECS: u64 = 1;

/// An RFC 9457 problem document.
#[derive(Debug, Clone, Serialize, utoipa::ToSchema)]
pub struct Problem {
    /// `https://finmesh.dev/problems/<slug>`.
    #[serde(rename = "type")]
    pub type_uri: String,
    /// Short summary of the problem type.
    pub title: String,
    /// The HTTP status.
    pub status: u16,
    /// What went wrong with this request.
    pub detail: String,
    /// For `wrong-revision`: the key's current revision (0 = no entry).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub current_revision: Option<u64>,
    /// For a malformed NDJSON batch: the 1-based line.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub line: Option<usize>,
    /// For a malformed NDJSON batch: the 1-based column.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub column: Option<usize>,
    /// Seconds to wait before retrying (also in `Retry-After`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub retry_after: Option<u64>,
}

/// Status, slug and title of each problem type.
pub fn kind_info(kind: ErrorKind) -> (StatusCode, &'static str, &'static str) {
    match kind {
        ErrorKind::NotFound => (StatusCode::NOT_FOUND, "not-found", "Not found"),
        ErrorKind::AlreadyExists => (StatusCode::CONFLICT, "already-exists", "Already exists"),
        ErrorKind::WrongRevision => (StatusCode::PRECONDITION_FAILED, "wrong-revision", "Wrong revision"),
        ErrorKind::Invalid => (StatusCode::BAD_REQUEST, "invalid", "Invalid request"),
        ErrorKind::TooLarge => (StatusCode::PAYLOAD_TOO_LARGE, "too-large", "Too large"),
        ErrorKind::Unauthorized => (StatusCode::UNAUTHORIZED, "unauthorized", "Unauthorized"),
        ErrorKind::Forbidden => (StatusCode::FORBIDDEN, "forbidden", "Forbidden"),
        ErrorKind::Unavailable => (StatusCode::SERVICE_UNAVAILABLE, "unavailable", "Service unavailable"),
        ErrorKind::Timeout => (StatusCode::GATEWAY_TIMEOUT, "timeout", "Timeout"),
        ErrorKind::Integrity => {
            (StatusCode::INTERNAL_SERVER_ERROR, "integrity", "Stored value failed its integrity check")
        }
        _ => (StatusCode::INTERNAL_SERVER_ERROR, "internal", "Internal error"),
    }
}

impl Problem {
    /// A problem of `slug` with `status`, `title` and `detail`.
    pub fn new(status: StatusCode, slug: &str, title: &str, detail: impl Into<String>) -> Self {
        Problem {
            type_uri: format!("{PROBLEM_BASE}{slug}"),
            title: title.to_owned(),
            status: status.as_u16(),
            detail: detail.into(),
            current_revision: None,
            line: None,
            column: None,
            retry_after: None,
        }
    }

    /// The problem for a finmesh error (internal detail logged, not sent).
    pub fn from_error(e: &Error) -> Self {
        let (status, slug, title) = kind_info(e.kind());
        let detail = match e.kind() {
            ErrorKind::Internal => {
                tracing::error!(error = ?e, "internal error");
                "internal error; see the server log".to_owned()
            }
            // The engine stack logged bucket, key id and revision where it
            // failed; the message names no key and no byte.
            ErrorKind::Integrity => {
                tracing::error!(error = %e, "a stored value failed its integrity check");
                "a stored value failed its integrity check (it was changed or moved); see the server log".to_owned()
            }
            _ => e.message().to_owned(),
        };
        let mut p = Problem::new(status, slug, title, detail);
        p.current_revision = e.current_revision().map(|r| r.0);
        if matches!(e.kind(), ErrorKind::Unavailable) {
            p.retry_after = Some(RETRY_AFTER_SECS);
        }
        p
    }

    /// `429 rate-limited`, retry after `secs`.
    pub fn rate_limited(secs: u64) -> Self {
        Self::rate_limited_with(secs, "this client's request rate is over its limit")
    }

    /// `429 rate-limited` with a `detail` naming the limit, retry after `secs`.
    pub fn rate_limited_with(secs: u64, detail: impl Into<String>) -> Self {
        let mut p = Problem::new(StatusCode::TOO_MANY_REQUESTS, "rate-limited", "Too many requests", detail);
        p.retry_after = Some(secs.max(1));
        p
    }

    /// `503 overloaded`: shed because too many requests are in flight.
    pub fn overloaded() -> Self {
        let mut p = Problem::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "overloaded",
            "Overloaded",
            "too many requests in flight; retry shortly",
        );
        p.retry_after = Some(RETRY_AFTER_SECS);
        p
    }

    /// The problem for a bare status (router 404/405, layer errors).
    pub fn from_status(status: StatusCode, detail: String) -> Self {
        let (slug, title) = match status {
            StatusCode::NOT_FOUND => ("not-found", "Not found"),
            StatusCode::METHOD_NOT_ALLOWED => ("method-not-allowed", "Method not allowed"),
            StatusCode::PAYLOAD_TOO_LARGE => ("too-large", "Too large"),
            StatusCode::UNSUPPORTED_MEDIA_TYPE => ("unsupported-media-type", "Unsupported media type"),
            StatusCode::REQUEST_TIMEOUT | StatusCode::GATEWAY_TIMEOUT => ("timeout", "Timeout"),
            StatusCode::TOO_MANY_REQUESTS => ("rate-limited", "Too many requests"),
            StatusCode::SERVICE_UNAVAILABLE => ("unavailable", "Service unavailable"),
            StatusCode::UNAUTHORIZED => ("unauthorized", "Unauthorized"),
            StatusCode::FORBIDDEN => ("forbidden", "Forbidden"),
            s if s.is_client_error() => ("invalid", "Invalid request"),
            _ => ("internal", "Internal error"),
        };
        let detail = if detail.is_empty() || status.is_server_error() && slug == "internal" {
            status.canonical_reason().unwrap_or("error").to_owned()
        } else {
            detail
        };
        // A timed-out request is reported as 504 whatever the layer said.
        let status = if slug == "timeout" { StatusCode::GATEWAY_TIMEOUT } else { status };
        Problem::new(status, slug, title, detail)
    }
}

impl IntoResponse for Problem {
    fn into_response(self) -> Response {
        let status = StatusCode::from_u16(self.status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
        let body = serde_json::to_vec(&self).unwrap_or_default();
        let mut res = (status, body).into_response();
        let h = res.headers_mut();
        h.insert(header::CONTENT_TYPE, HeaderValue::from_static(PROBLEM_JSON));
        if let Some(secs) = self.retry_after {
            h.insert(header::RETRY_AFTER, HeaderValue::from(secs));
        }
        // RFC 6750 §3: a 401 carries a challenge, a 403 for a missing scope
        // says so. The auth middleware replaces the 401 challenge with
        // `error="invalid_token"` when the request had a header.
        if status == StatusCode::UNAUTHORIZED {
            h.insert(header::WWW_AUTHENTICATE, HeaderValue::from_static(finmesh_auth::BEARER_CHALLENGE));
        } else if status == StatusCode::FORBIDDEN {
            h.insert(header::WWW_AUTHENTICATE, HeaderValue::from_static(finmesh_auth::BEARER_INSUFFICIENT_SCOPE));
        }
        res
    }
}

/// A handler error: a finmesh error or a ready-made problem.
#[derive(Debug)]
pub enum ApiError {
    /// An error from the engine, the auth seam or validation.
    Core(Error),
    /// A problem built by the gateway itself.
    Problem(Box<Problem>),
}

impl From<Error> for ApiError {
    fn from(e: Error) -> Self {
        ApiError::Core(e)
    }
}

impl From<Problem> for ApiError {
    fn from(p: Problem) -> Self {
        ApiError::Problem(Box::new(p))
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        match self {
            ApiError::Core(e) => {
                crate::metrics::engine_error(e.kind());
                Problem::from_error(&e).into_response()
            }
            ApiError::Problem(p) => p.into_response(),
        }
    }
}

/// Handler result.
pub type ApiResult<T> = Result<T, ApiError>;

/// Bodies longer than this are not read back when rewriting an error.
const MAX_REWRITE_BODY: usize = 16 * 1024;

/// Whether `res` is an error answer that is not problem+json yet (axum
/// rejections, router 404/405): [`into_problem`] must rewrite it. The grant
/// outcomes of `/oauth/token` ([`RfcBody`](crate::oauth::RfcBody)) keep their format.
pub fn needs_rewrite(res: &Response) -> bool {
    let status = res.status();
    if !(status.is_client_error() || status.is_server_error()) {
        return false;
    }
    if res.extensions().get::<crate::oauth::RfcBody>().is_some() {
        return false;
    }
    res.headers().get(header::CONTENT_TYPE).is_none_or(|v| v.as_bytes() != PROBLEM_JSON.as_bytes())
}

/// The error answer `res` as a problem with the same status: its text body
/// (up to 16 KiB) becomes the `detail`, `Retry-After` is kept.
pub async fn into_problem(res: Response) -> Response {
    let status = res.status();
    let retry_after = res.headers().get(header::RETRY_AFTER).cloned();
    let body = to_bytes(res.into_body(), MAX_REWRITE_BODY).await.unwrap_or_default();
    let detail = String::from_utf8_lossy(&body).trim().to_owned();
    let mut out = Problem::from_status(status, detail).into_response();
    if let Some(v) = retry_after {
        out.headers_mut().insert(header::RETRY_AFTER, v);
    }
    out
}

/// A panic caught in a handler: logged, answered with a 500 problem that does
/// not repeat the panic message.
pub fn panic_response(err: Box<dyn std::any::Any + Send + 'static>) -> Response<Body> {
    let what = err
        .downcast_ref::<String>()
        .map(String::as_str)
        .or_else(|| err.downcast_ref::<&str>().copied())
        .unwrap_or("unknown panic");
    tracing::error!(panic = what, "request handler panicked");
    Problem::new(StatusCode::INTERNAL_SERVER_ERROR, "internal", "Internal error", "internal error; see the server log")
        .into_response()
}
