//! Registry routes: `PUT/GET/DELETE /v1/subscribers/{id}`, and the
//! registered part of `GET /v1/subscribers` ([`registered`]).
//!
//! Invariants: writes need `admin`, reads `subscribers:read` (or `admin`);
//! `ETag` is the quoted revision of the registration, `If-Match` and
//! `If-None-Match: *` make a write conditional as on KV keys (412
//! `wrong-revision` otherwise); a body is validated whole before anything
//! is written (400 listing every problem).

use std::collections::HashMap;

use axum::Json;
use axum::body::Bytes;
use axum::extract::{Path, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use finmesh_auth::Access;
use finmesh_core::StreamName;
use serde::Serialize;

use super::status::LiveStatus;
use super::{Registration, Stored, validate_id};
use crate::AppState;
use crate::caller::Caller;
use crate::kv::{etag, if_match, if_none_match_star};
use crate::problem::ApiResult;
use crate::schema::Written;

/// A registration with its revision and its live status on this node.
#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct RegisteredSubscriber {
    /// The server id.
    pub id: String,
    /// The registration's revision (its `ETag`).
    pub revision: u64,
    /// What was registered.
    #[serde(flatten)]
    pub registration: Registration,
    /// Its live status on the answering node.
    pub status: LiveStatus,
}

/// `PUT /v1/subscribers/{id}`: register (or update) a downstream server.
#[utoipa::path(put, path = "/v1/subscribers/{id}", tag = "ops",
    params(("id" = String, Path, description = "1-64 characters of A-Z a-z 0-9 _ -", pattern = r"^[A-Za-z0-9_-]{1,64}$"),
        ("If-Match" = Option<String>, Header, description = "quoted revision: update only at it",
            pattern = r#"^("[0-9]{1,19}"|[0-9]{1,19})$"#),
        ("If-None-Match" = Option<String>, Header, description = "`*`: create only", pattern = r"^\*$")),
    request_body(content = Registration),
    responses((status = 200, description = "written; `ETag` is the new revision", body = Written),
        (status = 409, description = "another id registers this identity", body = crate::Problem),
        (status = 412, body = crate::Problem)))]
pub async fn put(
    State(state): State<AppState>,
    caller: Caller,
    Path(id): Path<String>,
    headers: HeaderMap,
    body: Bytes,
) -> ApiResult<Response> {
    let key = validate_id(&id)?;
    caller.require(&Access::Admin)?;
    let expected = if_match(&headers)?;
    let create_only = if_none_match_star(&headers)?;
    let reg = Registration::parse(&body)?;
    let rev = state.registry().put(&key, &reg, expected, create_only).await?;
    let mut res = Json(Written { revision: rev.0 }).into_response();
    res.headers_mut().insert(header::ETAG, etag(rev));
    Ok(res)
}

/// `GET /v1/subscribers/{id}`: a registration and its live status here.
#[utoipa::path(get, path = "/v1/subscribers/{id}", tag = "ops",
    params(("id" = String, Path, description = "1-64 characters of A-Z a-z 0-9 _ -", pattern = r"^[A-Za-z0-9_-]{1,64}$")),
    // `body = Object`: utoipa renders the flattened `Registration` (which
    // refuses unknown fields) as `additionalProperties: false`, which the
    // answer's own `id`, `revision` and `status` would violate.
    responses((status = 200, description = "the registration (its fields at the top level) with `id`, `revision` and `status`, its live status on this node",
        body = Object, headers(("ETag" = String, description = "quoted revision"))),
        (status = 404, body = crate::Problem)))]
pub async fn get(State(state): State<AppState>, caller: Caller, Path(id): Path<String>) -> ApiResult<Response> {
    let key = validate_id(&id)?;
    caller.require(&Access::SubscribersRead)?;
    let Some(stored) = state.registry().get(&key).await? else {
        return Err(finmesh_core::Error::not_found(format!("subscriber `{id}` is not registered")).into());
    };
    let rev = stored.revision;
    let mut heads = Heads::default();
    let mut res = Json(view(&state, stored, &mut heads).await).into_response();
    res.headers_mut().insert(header::ETAG, etag(rev));
    Ok(res)
}

/// `DELETE /v1/subscribers/{id}`: forget a server (its open connections
/// stay; new ones are checked as unregistered).
#[utoipa::path(delete, path = "/v1/subscribers/{id}", tag = "ops",
    params(("id" = String, Path, description = "1-64 characters of A-Z a-z 0-9 _ -", pattern = r"^[A-Za-z0-9_-]{1,64}$"),
        ("If-Match" = Option<String>, Header, description = "quoted revision: delete only at it",
            pattern = r#"^("[0-9]{1,19}"|[0-9]{1,19})$"#)),
    responses((status = 204, description = "deleted"), (status = 404, body = crate::Problem),
        (status = 412, body = crate::Problem)))]
pub async fn delete(
    State(state): State<AppState>,
    caller: Caller,
    Path(id): Path<String>,
    headers: HeaderMap,
) -> ApiResult<StatusCode> {
    let key = validate_id(&id)?;
    caller.require(&Access::Admin)?;
    let expected = if_match(&headers)?;
    state.registry().delete(&key, expected).await?;
    Ok(StatusCode::NO_CONTENT)
}

/// Every registration (read from the engine now) with its live status here.
pub async fn registered(state: &AppState) -> ApiResult<Vec<RegisteredSubscriber>> {
    let all = state.registry().read_all().await?;
    let mut heads = Heads::default();
    let mut out = Vec::with_capacity(all.by_id.len());
    for stored in all.by_id.into_values() {
        out.push(view(state, stored, &mut heads).await);
    }
    Ok(out)
}

/// Stream heads (last sequence, its store time in ns), read once per answer.
#[derive(Default)]
struct Heads(HashMap<String, Option<(u64, u64)>>);

impl Heads {
    async fn of(&mut self, state: &AppState, stream: &str) -> Option<(u64, u64)> {
        if let Some(head) = self.0.get(stream) {
            return *head;
        }
        let head = match StreamName::new(stream) {
            Ok(name) => state
                .engine()
                .stream_info(&name)
                .await
                .ok()
                .map(|i| (i.state.last_seq.0, i.state.last_time.map_or(0, |t| t.as_nanos()))),
            Err(_) => None,
        };
        self.0.insert(stream.to_owned(), head);
        head
    }
}

async fn view(state: &AppState, stored: Stored, heads: &mut Heads) -> RegisteredSubscriber {
    let book = state.registry().book();
    let (mut status, times) = book.status_and_times(&stored.id);
    for (conn, last_time) in status.connections.iter_mut().zip(times) {
        if let Some((head, head_time)) = heads.of(state, &conn.stream).await {
            let lag = head.saturating_sub(conn.last_seq);
            conn.lag_messages = Some(lag);
            conn.lag_ms = match (lag, last_time) {
                (0, _) => Some(0),
                (_, 0) => None,
                _ => Some(head_time.saturating_sub(last_time) / 1_000_000),
            };
        }
    }
    RegisteredSubscriber { id: stored.id, revision: stored.revision.0, registration: stored.registration, status }
}
