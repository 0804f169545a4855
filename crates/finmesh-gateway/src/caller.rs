//! The auth seam: who calls ([`Caller`]) and what each route needs
//! ([`ROUTE_ACCESS`]).
//!
//! [`admit`] runs in front of every API route: it turns
//! the raw `Authorization` header (or, on subscription routes only, the
//! `access_token` query parameter of RFC 6750 §2.3, see [`TokenSource`])
//! into a [`Principal`] through
//! [`finmesh_auth::Authenticator::authenticate_bytes`] (401 `unauthorized`
//! with `WWW-Authenticate` from [`bearer_challenge`] when that fails: a bare
//! challenge without a header, `error="invalid_token"` with one), applies the
//! caller's rate limit (429), and stores the principal in the request. Each
//! handler then builds the [`Access`] its validated parameters describe and
//! calls [`Caller::require`] (403 `forbidden` with
//! `WWW-Authenticate: `[`BEARER_INSUFFICIENT_SCOPE`] when not allowed).
//!
//! Invariants: no API handler touches the engine before `require` succeeded;
//! [`ROUTE_ACCESS`] is the one source of the route list, with the access of
//! every route. The router ([`app`](crate::app)), the OpenAPI document and
//! `docs/api.md` are checked against it (`tests/routes.rs`), and the auth
//! matrix test walks it.

use std::net::SocketAddr;
use std::num::NonZeroU32;

use axum::extract::{ConnectInfo, FromRequestParts, Request};
use axum::http::request::Parts;
use axum::http::{HeaderValue, header};
use axum::response::{IntoResponse, Response};
#[cfg(doc)]
use finmesh_auth::BEARER_INSUFFICIENT_SCOPE;
use finmesh_auth::{Access, Principal, bearer_challenge};
use finmesh_core::{Error, ErrorKind};

use crate::AppState;
use crate::limits::Client;
use crate::problem::ApiError;

/// The authenticated principal of a request.
#[derive(Debug, Clone)]
pub struct Caller(pub Principal);

impl Caller {
    /// Fail with 403 unless the principal may perform `access`.
    pub fn require(&self, access: &Access<'_>) -> Result<(), ApiError> {
        if self.0.allows(access) {
            Ok(())
        } else {
            Err(Error::new(ErrorKind::Forbidden, format!("`{}` may not perform {access:?}", self.0.subject())).into())
        }
    }

    /// The token's subject.
    pub fn subject(&self) -> &str {
        self.0.subject()
    }
}

impl<S: Send + Sync> FromRequestParts<S> for Caller {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, _: &S) -> Result<Self, Self::Rejection> {
        parts
            .extensions
            .get::<Principal>()
            .cloned()
            .map(Caller)
            .ok_or_else(|| Error::new(ErrorKind::Unauthorized, "no credentials").into())
    }
}

/// Where a request's bearer token may come from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TokenSource {
    /// Only `Authorization: Bearer` (request/response routes): an
    /// `access_token` query parameter is refused with 400.
    Header,
    /// The header or the `access_token` query parameter (RFC 6750 §2.3),
    /// but not both: subscription routes, for browsers, whose
    /// `EventSource` cannot set headers.
    HeaderOrQuery,
}

/// The `WWW-Authenticate` of a request refused for how it sent its token.
pub const BEARER_INVALID_REQUEST: &str = "Bearer realm=\"finmesh\", error=\"invalid_request\"";

/// Authenticate and rate-limit `req`, and remember its principal in it; the
/// refusal (400, 401 or 429) to send otherwise. The [`Edge`](crate::edge::Edge)
/// calls this in front of every API route.
///
/// The token of an `access_token` parameter is never logged, and neither is
/// the request's URI.
pub fn admit(state: &AppState, req: &mut Request, tokens: TokenSource) -> Result<(), Box<Response>> {
    let header = req.headers().get(header::AUTHORIZATION);
    let query = match req.uri().query().map(query_token) {
        None | Some(QueryToken::Absent) => None,
        Some(QueryToken::Ambiguous) => {
            return Err(invalid_request("send `access_token` at most once"));
        }
        Some(QueryToken::Present(_)) if tokens == TokenSource::Header => {
            return Err(invalid_request(
                "the `access_token` query parameter is accepted only on subscription routes \
                 (`/events`, `/ws`, `/watch`); send `Authorization: Bearer <token>`",
            ));
        }
        Some(QueryToken::Present(_)) if header.is_some() => {
            return Err(invalid_request("send the token either in `Authorization` or as `access_token`, not both"));
        }
        Some(QueryToken::Present(token)) => Some(format!("Bearer {token}")),
    };
    let credentials = query.as_deref().map(str::as_bytes).or(header.map(HeaderValue::as_bytes));
    let principal = match state.inner.auth.authenticate_bytes(credentials) {
        Ok(p) => p,
        Err(e) => {
            tracing::debug!(error = %e, "request refused: authentication failed");
            let mut res = ApiError::from(e).into_response();
            let challenge = HeaderValue::from_static(bearer_challenge(credentials.is_some()));
            res.headers_mut().insert(header::WWW_AUTHENTICATE, challenge);
            return Err(Box::new(res));
        }
    };
    let peer = || req.extensions().get::<ConnectInfo<SocketAddr>>().map(|c| c.0);
    if let Err(refusal) = state.inner.rate.check_n(rate_client(state, &principal, peer), NonZeroU32::MIN) {
        crate::metrics::rate_limited();
        return Err(Box::new(refusal.problem().into_response()));
    }
    req.extensions_mut().insert(principal);
    Ok(())
}

/// What a query string says about `access_token`.
enum QueryToken {
    Absent,
    Present(String),
    Ambiguous,
}

fn query_token(query: &str) -> QueryToken {
    // The common case, no parameter at all, without decoding anything.
    if !query.contains("access_token") {
        return QueryToken::Absent;
    }
    let mut found = QueryToken::Absent;
    for (key, value) in form_urlencoded::parse(query.as_bytes()) {
        if key == "access_token" {
            if !matches!(found, QueryToken::Absent) {
                return QueryToken::Ambiguous;
            }
            found = QueryToken::Present(value.into_owned());
        }
    }
    found
}

/// 400 `invalid` with RFC 6750's `error="invalid_request"` challenge.
fn invalid_request(detail: &str) -> Box<Response> {
    let mut res = ApiError::from(Error::invalid(detail.to_owned())).into_response();
    res.headers_mut().insert(header::WWW_AUTHENTICATE, HeaderValue::from_static(BEARER_INVALID_REQUEST));
    Box::new(res)
}

/// Whose rate limit a request counts against: its token's subject, or its
/// client address when authentication is off (every request then has the
/// same principal). `peer` is asked only in the second case.
pub fn rate_client<'a>(
    state: &AppState,
    principal: &'a Principal,
    peer: impl FnOnce() -> Option<SocketAddr>,
) -> Client<'a> {
    if state.inner.auth.is_disabled()
        && let Some(addr) = peer()
    {
        return Client::Address(addr.ip().to_canonical());
    }
    Client::Subject(principal.subject_shared())
}

/// Count `n` more requests against the caller's rate limit (each message of
/// a batch after the first, which [`admit`] counted); 429 when over it.
pub fn charge(state: &AppState, caller: &Caller, peer: &Peer, n: usize) -> Result<(), ApiError> {
    let Some(more) = NonZeroU32::new(u32::try_from(n).unwrap_or(u32::MAX)) else { return Ok(()) };
    state.inner.rate.check_n(rate_client(state, &caller.0, || peer.0), more).map_err(|mut refusal| {
        crate::metrics::rate_limited();
        refusal.cost = refusal.cost.saturating_add(1);
        ApiError::from(refusal.problem())
    })
}

/// The client's address (`ConnectInfo`), when the server recorded it.
#[derive(Debug, Clone, Copy)]
pub struct Peer(pub Option<SocketAddr>);

impl<S: Send + Sync> FromRequestParts<S> for Peer {
    type Rejection = std::convert::Infallible;

    async fn from_request_parts(parts: &mut Parts, _: &S) -> Result<Self, Self::Rejection> {
        Ok(Peer(parts.extensions.get::<ConnectInfo<SocketAddr>>().map(|c| c.0)))
    }
}

/// What a route needs, as written in the scope table of `finmesh-auth`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Need {
    /// No bearer token needed (health, metrics, OpenAPI, and the OAuth token
    /// endpoint, which authenticates clients itself).
    Public,
    /// `admin`.
    Admin,
    /// `kv:read:<bucket>`.
    KvRead,
    /// `kv:write:<bucket>`.
    KvWrite,
    /// `kv:admin:<bucket>`.
    KvAdmin,
    /// `stream:publish:<stream>[:<subject>]`.
    StreamPublish,
    /// `stream:subscribe:<stream>[:<filter>]`.
    StreamSubscribe,
    /// `stream:consume:<stream>`.
    StreamConsume,
    /// `stream:admin:<stream>`.
    StreamAdmin,
    /// `subscribers:read` (the subscriber registry and its status).
    SubscribersRead,
}

/// Every route with the access it checks: (method, path template, need).
/// Adding a route means a line here, its `.route` in [`app`](crate::app),
/// its `#[utoipa::path]` in [`openapi`](crate::openapi) and its row in
/// `docs/api.md`; `tests/routes.rs` fails until all four agree.
pub const ROUTE_ACCESS: &[(&str, &str, Need)] = &[
    ("GET", "/healthz", Need::Public),
    ("GET", "/readyz", Need::Public),
    ("GET", "/metrics", Need::Public),
    ("GET", "/openapi.json", Need::Public),
    ("POST", "/oauth/token", Need::Public),
    ("GET", "/v1/kv", Need::Admin),
    ("PUT", "/v1/kv/{bucket}", Need::KvAdmin),
    ("GET", "/v1/kv/{bucket}", Need::KvRead),
    ("DELETE", "/v1/kv/{bucket}", Need::KvAdmin),
    ("GET", "/v1/kv/{bucket}/keys", Need::KvRead),
    ("GET", "/v1/kv/{bucket}/watch", Need::KvRead),
    ("GET", "/v1/kv/{bucket}/{key}", Need::KvRead),
    ("PUT", "/v1/kv/{bucket}/{key}", Need::KvWrite),
    ("DELETE", "/v1/kv/{bucket}/{key}", Need::KvWrite),
    ("GET", "/v1/kv/{bucket}/{key}/history", Need::KvRead),
    ("GET", "/kv/{key}", Need::KvRead),
    ("GET", "/v1/streams", Need::Admin),
    ("PUT", "/v1/streams/{stream}", Need::StreamAdmin),
    ("GET", "/v1/streams/{stream}", Need::StreamSubscribe),
    ("DELETE", "/v1/streams/{stream}", Need::StreamAdmin),
    ("POST", "/v1/streams/{stream}/messages", Need::StreamPublish),
    ("GET", "/v1/streams/{stream}/messages", Need::StreamSubscribe),
    ("GET", "/v1/streams/{stream}/events", Need::StreamSubscribe),
    ("GET", "/v1/streams/{stream}/ws", Need::StreamSubscribe),
    ("POST", "/v1/streams/{stream}/feed", Need::StreamPublish),
    ("GET", "/v1/streams/{stream}/feed/ws", Need::StreamPublish),
    ("GET", "/v1/streams/{stream}/consumers", Need::StreamConsume),
    ("PUT", "/v1/streams/{stream}/consumers/{name}", Need::StreamAdmin),
    ("GET", "/v1/streams/{stream}/consumers/{name}", Need::StreamConsume),
    ("DELETE", "/v1/streams/{stream}/consumers/{name}", Need::StreamAdmin),
    ("POST", "/v1/streams/{stream}/consumers/{name}/fetch", Need::StreamConsume),
    ("POST", "/v1/streams/{stream}/consumers/{name}/ack", Need::StreamConsume),
    ("GET", "/v1/subscribers", Need::SubscribersRead),
    ("PUT", "/v1/subscribers/{id}", Need::Admin),
    ("GET", "/v1/subscribers/{id}", Need::SubscribersRead),
    ("DELETE", "/v1/subscribers/{id}", Need::Admin),
    ("POST", "/v1/pipelines/{pipeline}/files", Need::StreamPublish),
    ("PUT", "/v1/pipelines/runs/{run}", Need::KvWrite),
    ("GET", "/v1/pipelines/runs/{run}", Need::KvRead),
    ("GET", "/v1/keys", Need::Admin),
    ("POST", "/v1/keys/rotate", Need::Admin),
    ("GET", "/v1/keys/{id}/usage", Need::Admin),
    ("POST", "/v1/keys/{id}/retire", Need::Admin),
    ("POST", "/v1/keys/{id}/restore", Need::Admin),
    ("POST", "/v1/keys/reencrypt/{bucket}", Need::Admin),
];

#[cfg(test)]
mod tests {
    use super::*;
    use axum::http::StatusCode;
    use finmesh_core::StreamName;

    #[test]
    fn require_answers_403_without_the_scope() {
        let stream = StreamName::new("S").unwrap();
        let access = Access::StreamAdmin { stream: &stream };
        assert!(Caller(Principal::admin("root")).require(&access).is_ok());
        let err = Caller(Principal::new("app", vec![])).require(&access).unwrap_err();
        assert_eq!(err.into_response().status(), StatusCode::FORBIDDEN);
    }
}
