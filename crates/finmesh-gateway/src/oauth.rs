//! `POST /oauth/token`: the OAuth 2.0 client-credentials grant (RFC 6749
//! §4.4) over the [`ClientRegistry`] of `finmesh-auth`, which owns the
//! rules (client authentication, scope narrowing, signing); this module is
//! only its HTTP transport.
//!
//! Invariants:
//! - the route exists only when the state has a registry
//!   ([`AppState::with_oauth`]); otherwise it answers 404 `not-found`;
//! - it takes no bearer token; it is rate-limited per client IP (the
//!   `ConnectInfo<SocketAddr>` of the connection; requests without one, as
//!   in-process tests, share one key) and then by a global rate over all
//!   clients (so many addresses cannot add up to unbounded argon2 work),
//!   both before the body is read (429);
//! - the body is read up to [`MAX_FORM_LEN`] bytes; argon2 runs on a
//!   blocking thread, never on the runtime, and at most
//!   `max_concurrent_token_grants` run at once: a request finding them all
//!   busy is answered 503 `overloaded` with `Retry-After` at once, never
//!   queued (a queue of argon2 work only adds latency to an overload);
//! - grant outcomes (success and every RFC error) are `application/json` in
//!   the RFC's format, with `Cache-Control: no-store` and `Pragma: no-cache`,
//!   and `WWW-Authenticate` on `invalid_client`; they are marked so that the
//!   problem+json fallback leaves them alone. Transport answers that are not
//!   grant outcomes (404 without a registry, 429) stay problem+json.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;

use axum::Json;
use axum::body::to_bytes;
use axum::extract::{ConnectInfo, Request, State};
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use finmesh_auth::oauth::MAX_FORM_LEN;
use finmesh_auth::{ClientRegistry, OAuthError, OAuthErrorCode, TokenRequest};

use tokio::sync::{OwnedSemaphorePermit, Semaphore};

use crate::limits::RateLimiter;
use crate::problem::Problem;
use crate::schema::{OAuthErrorBody, TokenForm, TokenGrant};
use crate::{AppState, Limits};

/// Marks a response whose error status and body are final (not rewritten
/// into problem+json by the [`edge`](crate::edge)).
#[derive(Debug, Clone, Copy)]
pub struct RfcBody;

/// Admission to the argon2 work of the endpoint, next to the per-IP rate:
/// a global rate and a cap on verifications running at once.
pub(crate) struct TokenAdmission {
    /// One bucket for every client (a keyed limiter with a single key).
    global: RateLimiter,
    /// One permit per verification allowed to run.
    grants: Arc<Semaphore>,
    /// The number of permits.
    max: usize,
}

impl TokenAdmission {
    pub(crate) fn new(limits: &Limits) -> Self {
        let max = limits.max_concurrent_token_grants;
        TokenAdmission {
            global: RateLimiter::new(limits.token_rate_global, &HashMap::new(), "limits.token_rate_global"),
            grants: Arc::new(Semaphore::new(max)),
            max,
        }
    }

    fn check_global(&self) -> Result<(), std::time::Duration> {
        static KEY: std::sync::LazyLock<Arc<str>> = std::sync::LazyLock::new(|| "all-clients".into());
        self.global.check(&KEY)
    }

    /// Verifications running now.
    pub(crate) fn running(&self) -> usize {
        self.max - self.grants.available_permits()
    }
}

/// The rate-limit key of a request: its peer IP, or one shared key.
fn client_key(req: &Request) -> Arc<str> {
    match req.extensions().get::<ConnectInfo<SocketAddr>>() {
        Some(ConnectInfo(addr)) => addr.ip().to_string().into(),
        None => "unknown-peer".into(),
    }
}

fn oauth_error(error: OAuthErrorCode, description: &str) -> OAuthError {
    OAuthError { error, error_description: description.to_owned() }
}

/// `POST /oauth/token`: exchange client credentials for a bearer token.
#[utoipa::path(post, path = "/oauth/token", tag = "auth", security(()),
    description = "OAuth 2.0 client-credentials grant (RFC 6749 §4.4). Client authentication: HTTP Basic \
        (id and secret form-urlencoded, then base64) or `client_id`/`client_secret` form fields, not both. \
        Answers 404 when the node has no OAuth clients configured.",
    request_body(content = TokenForm, content_type = "application/x-www-form-urlencoded"),
    responses(
        (status = 200, description = "the token (`Cache-Control: no-store`)", body = TokenGrant),
        (status = 400, description = "`invalid_request`, `unsupported_grant_type`, `invalid_scope`", body = OAuthErrorBody),
        (status = 401, description = "`invalid_client`, with `WWW-Authenticate: Basic`", body = OAuthErrorBody),
        (status = 404, description = "no OAuth clients configured", body = crate::Problem),
        (status = 429, description = "this IP's, or all clients', request rate is over its limit", body = crate::Problem),
        (status = 503, description = "`overloaded` (too many requests in flight, or every argon2 verification slot busy), draining or engine unavailable; `Retry-After`", body = crate::Problem),
        (status = 500, description = "`server_error`: the token could not be signed", body = OAuthErrorBody),
    ))]
pub async fn token(State(state): State<AppState>, req: Request) -> Response {
    let Some(clients) = state.oauth().cloned() else {
        return Problem::new(StatusCode::NOT_FOUND, "not-found", "Not found", "this node has no OAuth clients")
            .into_response();
    };
    let admission = &state.inner.oauth_admission;
    if let Err(wait) = state.inner.oauth_rate.check(&client_key(&req)).and_then(|()| admission.check_global()) {
        crate::metrics::rate_limited();
        return Problem::rate_limited(wait.as_secs_f64().ceil() as u64).into_response();
    }
    let (parts, body) = req.into_parts();
    let result = match to_bytes(body, MAX_FORM_LEN).await {
        Err(_) => Err(oauth_error(
            OAuthErrorCode::InvalidRequest,
            &format!("the body is unreadable or larger than {MAX_FORM_LEN} bytes"),
        )),
        Ok(body) => {
            let content_type = parts.headers.get(header::CONTENT_TYPE).map(HeaderValue::as_bytes);
            let authorization = parts.headers.get(header::AUTHORIZATION).map(HeaderValue::as_bytes);
            match TokenRequest::from_form(content_type, &body, authorization) {
                Ok(req) => {
                    let Ok(permit) = admission.grants.clone().try_acquire_owned() else {
                        tracing::debug!("oauth token request shed: every argon2 slot is busy");
                        return Problem::overloaded().into_response();
                    };
                    grant(clients, req, permit).await
                }
                Err(e) => Err(e),
            }
        }
    };
    respond(result)
}

/// Run the grant (argon2) on a blocking thread, holding `permit` until it
/// is done (even if the request is dropped meanwhile).
async fn grant(
    clients: Arc<ClientRegistry>,
    req: TokenRequest,
    permit: OwnedSemaphorePermit,
) -> Result<finmesh_auth::TokenResponse, OAuthError> {
    let work = move || {
        let result = clients.grant(&req);
        drop(permit);
        result
    };
    match tokio::task::spawn_blocking(work).await {
        Ok(result) => result,
        Err(e) => {
            tracing::error!(error = %e, "oauth grant task failed");
            Err(oauth_error(OAuthErrorCode::ServerError, "internal error"))
        }
    }
}

/// A grant outcome as the RFC's JSON, with its caching headers.
fn respond(result: Result<finmesh_auth::TokenResponse, OAuthError>) -> Response {
    let mut res = match result {
        Ok(ok) => (StatusCode::OK, Json(ok)).into_response(),
        Err(e) => {
            let status = StatusCode::from_u16(e.status()).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
            let mut r = (status, Json(&e)).into_response();
            if let Some(v) = e.www_authenticate() {
                r.headers_mut().insert(header::WWW_AUTHENTICATE, HeaderValue::from_static(v));
            }
            tracing::debug!(error = %e, "oauth token request refused");
            r
        }
    };
    let h = res.headers_mut();
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    h.insert(header::PRAGMA, HeaderValue::from_static("no-cache"));
    res.extensions_mut().insert(RfcBody);
    res
}
