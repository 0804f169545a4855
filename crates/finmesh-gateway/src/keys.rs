//! Key administration routes (`admin` scope): list, rotate, retire and
//! restore the data keys of the key ring, count what a key still protects,
//! and re-encrypt a bucket under the active key while the node serves.
//!
//! The gateway holds a [`KeyAdmin`] (from the encrypting engine wrapper the
//! node built) and only translates HTTP to it: the scans, the
//! compare-and-set rewrites and the cursor are in `finmesh-crypto`. Without
//! `[security]` there is no key ring and every route answers 404.
//!
//! Invariants:
//! - no answer carries key material: a key is shown as id, purpose, state
//!   and creation time;
//! - retiring a key that still protects values answers 409 `key-in-use`
//!   with the count per bucket, and changes nothing;
//! - a re-encryption runs in a task of its own and reports one NDJSON
//!   progress line per batch; it stops (cursor saved, resumable) when the
//!   client goes away or the node drains. A problem after the 200 head is
//!   sent as a last line `{"error": problem}`.

use std::convert::Infallible;
use std::num::NonZeroU32;
use std::ops::ControlFlow;
use std::sync::Arc;

use axum::Json;
use axum::body::{Body, Bytes};
use axum::extract::{Path, Query, State};
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use finmesh_auth::Access;
use finmesh_core::Error;
use finmesh_crypto::{KeyAdmin, KeyId, KeyInfo, KeyPurpose, KeyUsage, ReencryptOptions, ReencryptProgress, admin};
use serde::Deserialize;
use serde_json::{Value, json};
use tokio::sync::mpsc;

use crate::AppState;
use crate::caller::Caller;
use crate::envelope::rfc3339;
use crate::kv::client_bucket;
use crate::problem::{ApiResult, Problem};

/// Progress lines a re-encryption may queue for a slow client; further
/// lines are dropped (the next one carries the counts anyway).
const PROGRESS_QUEUED: usize = 16;

fn admin_of(state: &AppState) -> ApiResult<&Arc<KeyAdmin>> {
    state
        .key_admin()
        .ok_or_else(|| Error::not_found("this node runs without `[security]`: it has no key ring to administer").into())
}

fn key_id(raw: &str) -> ApiResult<KeyId> {
    match raw.parse::<u32>() {
        Ok(n) if n > 0 => Ok(KeyId(n)),
        _ => Err(Error::invalid(format!("key id `{raw}`: a key id is a positive integer")).into()),
    }
}

/// A key as the API shows it.
fn key_json(key: &KeyInfo) -> Value {
    json!({"id": key.id.0, "purpose": key.purpose, "state": key.state, "created": rfc3339(key.created)})
}

/// `GET /v1/keys`: every key of the ring, without key material.
#[utoipa::path(get, path = "/v1/keys", tag = "keys",
    responses((status = 200, description = r#"{"keys": [{"id", "purpose": "encryption" | "hashing", "state": "active" | "decrypt_only" | "retired", "created"}]}"#, body = Object),
        (status = 404, body = crate::Problem)))]
pub async fn list(State(state): State<AppState>, caller: Caller) -> ApiResult<Response> {
    caller.require(&Access::Admin)?;
    let keys = admin_of(&state)?.list().await?;
    Ok(Json(json!({"keys": keys.iter().map(key_json).collect::<Vec<_>>()})).into_response())
}

/// The body of `POST /v1/keys/rotate`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RotateBody {
    /// `encryption` or `hashing`.
    pub purpose: KeyPurpose,
}

/// `POST /v1/keys/rotate`: a new active key for a purpose.
#[utoipa::path(post, path = "/v1/keys/rotate", tag = "keys",
    request_body(content = Object, description = r#"{"purpose": "encryption" | "hashing"}"#),
    responses((status = 200, description = "the new active key; the previous one is now decrypt-only", body = Object),
        (status = 404, body = crate::Problem)))]
pub async fn rotate(State(state): State<AppState>, caller: Caller, body: Bytes) -> ApiResult<Response> {
    caller.require(&Access::Admin)?;
    let body: RotateBody = serde_json::from_slice(&body).map_err(|e| {
        Error::invalid(format!("bad rotate body: {e}; expected {{\"purpose\": \"encryption\" | \"hashing\"}}"))
    })?;
    let key = admin_of(&state)?.rotate(body.purpose).await?;
    tracing::info!(key_id = key.id.0, purpose = %key.purpose, by = caller.subject(), "key rotated");
    Ok(Json(key_json(&key)).into_response())
}

fn usage_json(usage: &KeyUsage) -> Value {
    json!({"key_id": usage.key_id.0, "purpose": usage.purpose, "total": usage.total, "buckets": usage.buckets})
}

/// `GET /v1/keys/{id}/usage`: what a key still protects.
#[utoipa::path(get, path = "/v1/keys/{id}/usage", tag = "keys", params(("id" = u32, Path)),
    responses((status = 200, description = r#"{"key_id", "purpose", "total", "buckets": {"bucket": count}}: values sealed with an encryption key, or keys stored under a hashing key's hash (latest revisions)"#, body = Object),
        (status = 404, body = crate::Problem)))]
pub async fn usage(State(state): State<AppState>, caller: Caller, Path(id): Path<String>) -> ApiResult<Response> {
    caller.require(&Access::Admin)?;
    let id = key_id(&id)?;
    let admin = admin_of(&state)?;
    Ok(Json(usage_json(&admin.usage(id).await?)).into_response())
}

/// `POST /v1/keys/{id}/retire`: retire a decrypt-only key that protects nothing.
#[utoipa::path(post, path = "/v1/keys/{id}/retire", tag = "keys", params(("id" = u32, Path)),
    responses((status = 200, description = "the key, now retired", body = Object),
        (status = 400, body = crate::Problem, description = "the key is active (rotate first) or already retired"),
        (status = 404, body = crate::Problem),
        (status = 409, body = crate::Problem, description = "`key-in-use`: the key still protects values; `usage` has the count per bucket")))]
pub async fn retire(State(state): State<AppState>, caller: Caller, Path(id): Path<String>) -> ApiResult<Response> {
    caller.require(&Access::Admin)?;
    let id = key_id(&id)?;
    let admin = admin_of(&state)?;
    match admin.retire(id).await? {
        Ok(key) => {
            tracing::info!(key_id = id.0, by = caller.subject(), "key retired");
            Ok(Json(key_json(&key)).into_response())
        }
        Err(usage) => {
            let detail = format!(
                "key {id} still protects {} {} ({}); re-encrypt those buckets (`finmesh kv reencrypt BUCKET`) and \
                 retire it then",
                usage.total,
                if usage.purpose == KeyPurpose::Hashing { "stored keys" } else { "values" },
                usage.describe()
            );
            let problem = Problem::new(StatusCode::CONFLICT, "key-in-use", "Key still in use", detail);
            let mut body = serde_json::to_value(&problem).unwrap_or_default();
            body["usage"] = usage_json(&usage);
            let mut res = (StatusCode::CONFLICT, Json(body)).into_response();
            res.headers_mut().insert(header::CONTENT_TYPE, HeaderValue::from_static(crate::problem::PROBLEM_JSON));
            Ok(res)
        }
    }
}

/// `POST /v1/keys/{id}/restore`: undo a retirement.
#[utoipa::path(post, path = "/v1/keys/{id}/restore", tag = "keys", params(("id" = u32, Path)),
    responses((status = 200, description = "the key, decrypt-only again", body = Object),
        (status = 400, body = crate::Problem, description = "the key is not retired"),
        (status = 404, body = crate::Problem)))]
pub async fn restore(State(state): State<AppState>, caller: Caller, Path(id): Path<String>) -> ApiResult<Response> {
    caller.require(&Access::Admin)?;
    let id = key_id(&id)?;
    let admin = admin_of(&state)?;
    let key = admin.restore(id).await?;
    tracing::info!(key_id = id.0, by = caller.subject(), "key restored");
    Ok(Json(key_json(&key)).into_response())
}

/// `?rate=&batch=&restart=` of `POST /v1/keys/reencrypt/{bucket}`.
#[derive(Debug, Deserialize, utoipa::IntoParams)]
pub struct ReencryptQuery {
    /// Most values examined per second (default: no limit).
    #[param(minimum = 1)]
    pub rate: Option<u32>,
    /// Keys per batch: progress is reported and the cursor saved after each
    /// (default 500, at most 10000).
    #[param(minimum = 1, maximum = 10000)]
    pub batch: Option<usize>,
    /// `true`: ignore a saved cursor and start from the first key.
    #[serde(default)]
    pub restart: bool,
}

/// `POST /v1/keys/reencrypt/{bucket}`: rewrite the bucket's values under the
/// active encryption key, streaming progress.
#[utoipa::path(post, path = "/v1/keys/reencrypt/{bucket}", tag = "keys",
    params(("bucket" = String, Path), ReencryptQuery),
    responses((status = 200, description = "NDJSON: one progress line per batch {bucket, key_id, estimate, after, resumed, done, run: counts, total: counts} (counts: scanned, rewritten, current, changed, failed); the last has `done: true`, or is `{\"error\": problem}`",
            content_type = "application/x-ndjson", body = String),
        (status = 404, body = crate::Problem),
        (status = 409, body = crate::Problem, description = "a re-encryption of the bucket already runs on this node")))]
pub async fn reencrypt(
    State(state): State<AppState>,
    caller: Caller,
    Path(bucket): Path<String>,
    Query(q): Query<ReencryptQuery>,
) -> ApiResult<Response> {
    caller.require(&Access::Admin)?;
    let bucket = client_bucket(bucket)?;
    let admin = admin_of(&state)?.clone();
    let rate = match q.rate {
        None => None,
        Some(r) => Some(NonZeroU32::new(r).ok_or_else(|| Error::invalid("rate must be at least 1 value per second"))?),
    };
    let options =
        ReencryptOptions { rate, batch: q.batch.unwrap_or(admin::DEFAULT_REENCRYPT_BATCH), restart: q.restart };
    if !(1..=admin::MAX_REENCRYPT_BATCH).contains(&options.batch) {
        return Err(Error::invalid(format!("batch must be 1 to {}", admin::MAX_REENCRYPT_BATCH)).into());
    }
    // Refuse what can be refused before the 200 head: an unknown or plain
    // bucket, a job already running (a race past this check is reported
    // in the stream).
    admin.check_reencrypt(&bucket).await?;
    let (tx, rx) = mpsc::channel::<Result<Bytes, Infallible>>(PROGRESS_QUEUED);
    let drain = state.drain_token();
    let by = caller.subject().to_owned();
    tokio::spawn(async move {
        tracing::info!(bucket = %bucket, by, "re-encryption started");
        let progress_tx = tx.clone();
        let mut on_progress = move |p: &ReencryptProgress| {
            if drain.is_cancelled() {
                return ControlFlow::Break(());
            }
            match progress_tx.try_send(Ok(line(&json!(p)))) {
                Err(mpsc::error::TrySendError::Closed(_)) => ControlFlow::Break(()),
                _ => ControlFlow::Continue(()),
            }
        };
        let last = match admin.reencrypt(&bucket, options, &mut on_progress).await {
            Ok(p) => {
                tracing::info!(bucket = %bucket, done = p.done, run = ?p.run, total = ?p.total, "re-encryption stopped");
                json!(p)
            }
            Err(e) => {
                tracing::warn!(bucket = %bucket, error = %e, "re-encryption failed");
                json!({"error": Problem::from_error(&e)})
            }
        };
        let _ = tx.send(Ok(line(&last))).await;
    });
    let stream = futures::stream::unfold(rx, |mut rx| async move { rx.recv().await.map(|item| (item, rx)) });
    let mut res = Body::from_stream(stream).into_response();
    res.headers_mut().insert(header::CONTENT_TYPE, HeaderValue::from_static(crate::streams::NDJSON));
    res.headers_mut().insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    Ok(res)
}

fn line(value: &Value) -> Bytes {
    let mut out = serde_json::to_vec(value).unwrap_or_default();
    out.push(b'\n');
    Bytes::from(out)
}
