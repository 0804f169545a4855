//! Cross-origin requests (CORS, the Fetch standard): lets pages served from
//! the origins in [`CorsConfig::allowed_origins`] call the API and subscribe
//! with `EventSource` or `WebSocket`.
//!
//! Behaviour, for an `Origin` header that is exactly one of the allowed
//! origins (byte for byte; there is no wildcard, because credentials are
//! allowed and the Fetch standard forbids `*` with them):
//! - a preflight (`OPTIONS` with `Access-Control-Request-Method`) is
//!   answered here, 204, before authentication (browsers send preflights
//!   without credentials), with `Access-Control-Allow-Origin: <origin>`,
//!   `-Allow-Credentials: true`, `-Allow-Methods` ([`ALLOWED_METHODS`]),
//!   `-Allow-Headers` ([`ALLOWED_HEADERS`]) and `-Max-Age`;
//! - any other request goes through the API as usual, and its answer
//!   (errors included) gets `Access-Control-Allow-Origin: <origin>`,
//!   `-Allow-Credentials: true` and `-Expose-Headers` ([`EXPOSED_HEADERS`]).
//!
//! A request from any other origin, or without `Origin`, gets no CORS
//! header at all (a preflight goes on to the API, which refuses it), so the
//! browser blocks the page from reading the answer. Every answer carries
//! `Vary: Origin`, so a cache never serves one origin's answer to another.
//!
//! Invariant: without a `[cors]` section [`app`](crate::app) adds no layer
//! at all, so the hot paths pay nothing for this module.
//!
//! Why not tower-http's `CorsLayer`: it sends `Allow-Credentials`,
//! `Allow-Methods`, `Allow-Headers` and `Expose-Headers` to every origin,
//! allowed or not; this module sends nothing to an origin it does not allow.

use std::sync::Arc;
use std::time::Duration;

use axum::extract::{Request, State};
use axum::http::{HeaderMap, HeaderValue, Method, StatusCode, header};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};

/// Methods a preflight allows.
pub const ALLOWED_METHODS: &str = "GET, HEAD, PUT, POST, DELETE";

/// Request headers a preflight allows (every header the API reads).
pub const ALLOWED_HEADERS: &str =
    "authorization, content-type, if-match, if-none-match, last-event-id, msg-id, cache-control";

/// Response headers a page may read.
pub const EXPOSED_HEADERS: &str = "finmesh-stream-epoch, etag, retry-after, www-authenticate, content-type";

/// `[cors]`: which browser origins may call the API.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CorsConfig {
    /// Exact origins (`scheme://host[:port]`, lower case, no path), e.g.
    /// `https://dashboard.example.com`. Check them with [`origin_problem`].
    pub allowed_origins: Vec<String>,
    /// How long a browser may cache a preflight answer
    /// (`Access-Control-Max-Age`, whole seconds). Default 10 min.
    pub max_age: Duration,
}

impl Default for CorsConfig {
    fn default() -> Self {
        CorsConfig { allowed_origins: Vec::new(), max_age: Duration::from_secs(600) }
    }
}

/// Why `origin` cannot be an allowed origin, if it cannot: it must be
/// `http://` or `https://` followed by a lower-case host, optionally
/// `:port`, with nothing after (browsers send origins in exactly that
/// serialisation, and matching is byte for byte).
pub fn origin_problem(origin: &str) -> Option<String> {
    if origin.contains('*') {
        return Some(format!("`{origin}`: wildcards are not allowed (credentials are); list exact origins"));
    }
    if origin == "null" {
        return Some("`null` is not allowed: sandboxed pages and files all send it".to_owned());
    }
    let Some(rest) = origin.strip_prefix("https://").or_else(|| origin.strip_prefix("http://")) else {
        return Some(format!("`{origin}` must start with http:// or https://"));
    };
    let ok = |b: u8| b.is_ascii_lowercase() || b.is_ascii_digit() || matches!(b, b'.' | b'-' | b':' | b'[' | b']');
    if rest.is_empty() || !rest.bytes().all(ok) {
        return Some(format!("`{origin}` must be scheme://host[:port] in lower case, with no path or trailing slash"));
    }
    None
}

/// The allowed origins, ready to answer with.
#[derive(Debug)]
pub struct CorsPolicy {
    origins: Vec<HeaderValue>,
    max_age: HeaderValue,
}

impl CorsPolicy {
    /// The policy of `config`; origins that are not valid header values are
    /// skipped (validation refuses them before).
    pub fn new(config: &CorsConfig) -> Arc<Self> {
        let origins = config.allowed_origins.iter().filter_map(|o| HeaderValue::from_str(o).ok()).collect();
        Arc::new(CorsPolicy { origins, max_age: config.max_age.as_secs().into() })
    }

    fn allowed(&self, headers: &HeaderMap) -> Option<HeaderValue> {
        let origin = headers.get(header::ORIGIN)?;
        self.origins.iter().find(|o| *o == origin).cloned()
    }
}

/// The middleware (see the [module documentation](self)).
pub async fn respond(State(policy): State<Arc<CorsPolicy>>, req: Request, next: Next) -> Response {
    let origin = policy.allowed(req.headers());
    let preflight =
        req.method() == Method::OPTIONS && req.headers().contains_key(header::ACCESS_CONTROL_REQUEST_METHOD);
    let mut res = match (&origin, preflight) {
        (Some(_), true) => {
            let mut res = StatusCode::NO_CONTENT.into_response();
            let h = res.headers_mut();
            h.insert(header::ACCESS_CONTROL_ALLOW_METHODS, HeaderValue::from_static(ALLOWED_METHODS));
            h.insert(header::ACCESS_CONTROL_ALLOW_HEADERS, HeaderValue::from_static(ALLOWED_HEADERS));
            h.insert(header::ACCESS_CONTROL_MAX_AGE, policy.max_age.clone());
            h.append(header::VARY, HeaderValue::from_static("access-control-request-method"));
            h.append(header::VARY, HeaderValue::from_static("access-control-request-headers"));
            res
        }
        (Some(_), false) => {
            let mut res = next.run(req).await;
            res.headers_mut().insert(header::ACCESS_CONTROL_EXPOSE_HEADERS, HeaderValue::from_static(EXPOSED_HEADERS));
            res
        }
        (None, _) => next.run(req).await,
    };
    let h = res.headers_mut();
    h.append(header::VARY, HeaderValue::from_static("origin"));
    if let Some(origin) = origin {
        h.insert(header::ACCESS_CONTROL_ALLOW_ORIGIN, origin);
        h.insert(header::ACCESS_CONTROL_ALLOW_CREDENTIALS, HeaderValue::from_static("true"));
    }
    res
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn origins_must_be_exact_lower_case_and_without_path() {
        for ok in ["https://app.example.com", "http://127.0.0.1:8081", "http://[::1]:9000"] {
            assert_eq!(origin_problem(ok), None, "{ok}");
        }
        for bad in [
            "*",
            "https://*.example.com",
            "null",
            "app.example.com",
            "https://App.example.com",
            "https://app.example.com/",
            "https://app.example.com/path",
            "https://",
            "ftp://x",
        ] {
            assert!(origin_problem(bad).is_some(), "{bad}");
        }
    }
}
