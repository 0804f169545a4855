//! KV routes: buckets (`/v1/kv`, `/v1/kv/{bucket}`), keys
//! (`/v1/kv/{bucket}/{key}`, history, listing) and the default bucket
//! (`/kv/{key}`). The watch (SSE) lives in [`crate::sse`].
//!
//! Invariants:
//! - `ETag` is the quoted revision of the value returned or written;
//! - `If-Match: "<rev>"` makes a put an update at that revision and
//!   `If-None-Match: *` makes it create-only; a failed precondition answers
//!   412 `wrong-revision` with the current revision;
//! - a key that never existed, was deleted or purged answers 404;
//! - a key is one path segment: a key holding `/` (or named `keys`/`watch`)
//!   is sent percent-encoded (`a%2Fb`, `%6Beys`);
//! - a bucket (or stream, `streams.rs`) whose security options the engine
//!   stack does not enforce ([`finmesh_core::KvEngine::supports_security`])
//!   is never created or updated: 400 naming the option, so nothing is
//!   stored in clear under a promise of encryption;
//! - a key is named in problem texts masked (first 6 / last 4 characters at
//!   most; `client_key`): it may be a card number, and problems are
//!   logged; values are never named;
//! - a key listing is one page (`?limit=`, default [`DEFAULT_KEYS_PAGE`],
//!   at most `limits.max_keys_page`), never the whole bucket; `next` is the
//!   cursor to pass as `?after=` for the next page.

use axum::Json;
use axum::body::Bytes;
use axum::extract::{Path, Query, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use finmesh_auth::Access;
use finmesh_core::{BucketConfig, BucketName, Error, ErrorKind, Key, Revision, SecurityOption};
use serde::Deserialize;
use serde_json::{Value, json};

use crate::AppState;
use crate::caller::Caller;
use crate::problem::ApiResult;
use crate::schema::{BucketList, History, KeyList, Written};

/// `"<rev>"`.
pub fn etag(rev: Revision) -> HeaderValue {
    // Digits written backwards into a stack buffer: every KV GET answers
    // with one, and `format!` showed in its profile.
    let mut buf = [b'"'; 22];
    let mut at = buf.len() - 1;
    let mut n = rev.0;
    loop {
        at -= 1;
        buf[at] = b'0' + (n % 10) as u8;
        n /= 10;
        if n == 0 {
            break;
        }
    }
    HeaderValue::from_bytes(&buf[at - 1..]).unwrap_or(HeaderValue::from_static("\"0\""))
}

/// Parse `If-Match: "<rev>"` (quotes optional, `W/` refused).
pub(crate) fn if_match(headers: &HeaderMap) -> ApiResult<Option<Revision>> {
    let Some(v) = headers.get(header::IF_MATCH) else { return Ok(None) };
    let s = v.to_str().unwrap_or("").trim();
    let digits = s.strip_prefix('"').and_then(|s| s.strip_suffix('"')).unwrap_or(s);
    digits
        .parse::<u64>()
        .map(|r| Some(Revision(r)))
        .map_err(|_| Error::invalid(format!("If-Match must be a quoted revision like \"7\", got `{s}`")).into())
}

pub(crate) fn if_none_match_star(headers: &HeaderMap) -> ApiResult<bool> {
    match headers.get(header::IF_NONE_MATCH) {
        None => Ok(false),
        Some(v) if v.as_bytes().trim_ascii() == b"*" => Ok(true),
        Some(_) => Err(Error::invalid("If-None-Match supports only `*` (create only)").into()),
    }
}

/// A JSON body without a `name`, or with the same name as the path, given
/// the name from the path. An empty body means all defaults.
pub fn config_with_name<T: serde::de::DeserializeOwned>(body: &[u8], name: &str) -> ApiResult<T> {
    let mut v: Value = if body.iter().all(u8::is_ascii_whitespace) {
        json!({})
    } else {
        serde_json::from_slice(body).map_err(|e| Error::invalid(format!("bad JSON body: {e}")))?
    };
    let obj = v.as_object_mut().ok_or_else(|| Error::invalid("the body must be a JSON object"))?;
    match obj.get("name") {
        Some(Value::String(n)) if n == name => {}
        Some(other) => return Err(Error::invalid(format!("body name {other} differs from the path's `{name}`")).into()),
        None => {
            obj.insert("name".to_owned(), Value::String(name.to_owned()));
        }
    }
    serde_json::from_value(v).map_err(|e| Error::invalid(format!("bad configuration: {e}")).into())
}

/// Refuse `options` that the engine stack does not enforce (see the module doc).
/// `enforced` is the stack's answer for the kind of thing being created
/// ([`finmesh_core::KvEngine::supports_security`] for buckets,
/// [`finmesh_core::StreamEngine::supports_stream_security`] for streams).
pub(crate) fn refuse_unenforced(
    enforced: &dyn Fn(SecurityOption) -> bool,
    options: &[SecurityOption],
    what: &str,
) -> ApiResult<()> {
    let missing: Vec<SecurityOption> = options.iter().copied().filter(|o| !enforced(*o)).collect();
    let Some(first) = missing.first() else { return Ok(()) };
    let names: Vec<String> = missing.iter().map(|o| o.to_string()).collect();
    Err(Error::invalid(format!(
        "{} is not available on this node yet: its engine stack does not enforce {} for {what}, and finmesh never \
         stores in clear what a configuration promises to protect",
        first.field(),
        names.join(", ")
    ))
    .into())
}

/// A bucket named in a client's request: valid, and not one of finmesh's
/// internal buckets (deleting or rewriting the key ring would make every
/// sealed value unreadable).
pub(crate) fn client_bucket(raw: String) -> Result<BucketName, Error> {
    let name = BucketName::new(raw)?;
    if name.is_reserved() {
        return Err(Error::invalid(format!(
            "bucket `{name}`: names starting with `{}` are reserved for finmesh's own data",
            finmesh_core::names::RESERVED_BUCKET_PREFIX
        )));
    }
    Ok(name)
}

/// A key named in a client's request, validated. A refused key is named
/// masked in the problem (first 6 / last 4 characters at most): it may be
/// a card number, and problem bodies end up in logs.
pub(crate) fn client_key(raw: String) -> Result<Key, Error> {
    Key::new(raw.as_str()).map_err(|e| {
        let shown: String = raw.chars().take(64).collect();
        let masked = finmesh_crypto::mask_pan(&raw);
        Error::invalid(e.message().replace(&shown, &masked))
    })
}

/// A key as problem texts name it: masked (see [`client_key`]).
fn shown(key: &Key) -> finmesh_crypto::Masked<'_> {
    finmesh_crypto::Masked(key.as_str())
}

/// `GET /v1/kv`: all bucket names.
#[utoipa::path(get, path = "/v1/kv", tag = "kv", responses((status = 200, description = "bucket names", body = BucketList)))]
pub async fn list_buckets(State(state): State<AppState>, caller: Caller) -> ApiResult<Response> {
    caller.require(&Access::Admin)?;
    let names = state.engine().list_buckets().await?;
    Ok(Json(BucketList { buckets: names }).into_response())
}

/// `PUT /v1/kv/{bucket}`: create or update a bucket.
#[utoipa::path(put, path = "/v1/kv/{bucket}", tag = "kv",
    params(("bucket" = String, Path)), request_body(content = crate::schema::BucketConfigBody),
    responses((status = 200, description = "bucket info", body = Object), (status = 400, body = crate::Problem)))]
pub async fn put_bucket(
    State(state): State<AppState>,
    caller: Caller,
    Path(bucket): Path<String>,
    body: Bytes,
) -> ApiResult<Response> {
    let name = client_bucket(bucket)?;
    caller.require(&Access::KvAdmin { bucket: &name })?;
    let config: BucketConfig = config_with_name(&body, name.as_str())?;
    let engine = state.engine();
    refuse_unenforced(&|o| engine.supports_security(o), &config.security.options(), &format!("bucket `{name}`"))?;
    let info = match engine.create_bucket(config.clone()).await {
        Err(e) if e.kind() == ErrorKind::AlreadyExists => engine.update_bucket(config).await?,
        other => other?,
    };
    Ok(Json(info).into_response())
}

/// `GET /v1/kv/{bucket}`: bucket info.
#[utoipa::path(get, path = "/v1/kv/{bucket}", tag = "kv", params(("bucket" = String, Path)),
    responses((status = 200, description = "bucket info", body = Object), (status = 404, body = crate::Problem)))]
pub async fn get_bucket(
    State(state): State<AppState>,
    caller: Caller,
    Path(bucket): Path<String>,
) -> ApiResult<Response> {
    let name = client_bucket(bucket)?;
    caller.require(&Access::KvRead { bucket: &name })?;
    Ok(Json(state.engine().bucket_info(&name).await?).into_response())
}

/// `DELETE /v1/kv/{bucket}`.
#[utoipa::path(delete, path = "/v1/kv/{bucket}", tag = "kv", params(("bucket" = String, Path)),
    responses((status = 204, description = "deleted"), (status = 404, body = crate::Problem)))]
pub async fn delete_bucket(
    State(state): State<AppState>,
    caller: Caller,
    Path(bucket): Path<String>,
) -> ApiResult<StatusCode> {
    let name = client_bucket(bucket)?;
    caller.require(&Access::KvAdmin { bucket: &name })?;
    state.engine().delete_bucket(&name).await?;
    Ok(StatusCode::NO_CONTENT)
}

/// Keys one listing page holds when `?limit=` is not given.
pub const DEFAULT_KEYS_PAGE: usize = 1_000;

/// `?prefix=&limit=&after=`.
#[derive(Debug, Deserialize, utoipa::IntoParams)]
pub struct KeysQuery {
    /// Plain string prefix of the keys wanted (default: all).
    #[serde(default)]
    pub prefix: String,
    /// Most keys returned (default 1000; at most `limits.max_keys_page`,
    /// 10000 unless set lower).
    #[param(minimum = 1, maximum = 10000)]
    pub limit: Option<usize>,
    /// Only keys sorting (bytewise) after this one: the `next` of the
    /// previous page. A key (at most 958 bytes), not necessarily stored.
    #[param(min_length = 1, max_length = 958, pattern = r"^[A-Za-z0-9_=/.-]+$")]
    pub after: Option<String>,
}

/// `GET /v1/kv/{bucket}/keys?prefix=&limit=&after=`: one page of live keys, sorted.
#[utoipa::path(get, path = "/v1/kv/{bucket}/keys", tag = "kv", params(("bucket" = String, Path), KeysQuery),
    responses((status = 200, description = "a page of keys", body = KeyList), (status = 400, body = crate::Problem),
        (status = 404, body = crate::Problem)))]
pub async fn keys(
    State(state): State<AppState>,
    caller: Caller,
    Path(bucket): Path<String>,
    Query(q): Query<KeysQuery>,
) -> ApiResult<Response> {
    let name = client_bucket(bucket)?;
    caller.require(&Access::KvRead { bucket: &name })?;
    let max = state.config().limits.max_keys_page;
    let limit = q.limit.unwrap_or(DEFAULT_KEYS_PAGE.min(max));
    if limit == 0 || limit > max {
        return Err(Error::invalid(format!(
            "limit must be 1-{max} (the maximum is the setting `limits.max_keys_page`), got {limit}"
        ))
        .into());
    }
    let after = q.after.map(Key::new).transpose()?;
    let page = state.engine().kv_keys_page(&name, &q.prefix, after.as_ref(), limit).await?;
    Ok(Json(KeyList { keys: page.keys, next: page.next }).into_response())
}

async fn get_value(state: &AppState, caller: &Caller, bucket: &BucketName, key: String) -> ApiResult<Response> {
    let key = client_key(key)?;
    caller.require(&Access::KvRead { bucket })?;
    match state.engine().kv_get(bucket, &key).await? {
        Some(entry) => {
            // `Bytes` answers as application/octet-stream already.
            let mut res = entry.value.into_response();
            res.headers_mut().insert(header::ETAG, etag(entry.revision));
            Ok(res)
        }
        None => Err(Error::not_found(format!("key `{}` not found in bucket `{bucket}`", shown(&key))).into()),
    }
}

/// `GET /v1/kv/{bucket}/{key}`: the value; `ETag` is its revision.
#[utoipa::path(get, path = "/v1/kv/{bucket}/{key}", tag = "kv", params(("bucket" = String, Path), ("key" = String, Path)),
    responses((status = 200, description = "the value", content_type = "application/octet-stream", body = Vec<u8>,
        headers(("ETag" = String, description = "quoted revision"))), (status = 404, body = crate::Problem)))]
pub async fn get_key(
    State(state): State<AppState>,
    caller: Caller,
    Path((bucket, key)): Path<(String, String)>,
) -> ApiResult<Response> {
    get_value(&state, &caller, &client_bucket(bucket)?, key).await
}

/// `GET /kv/{key}`: a value of the default bucket.
#[utoipa::path(get, path = "/kv/{key}", tag = "kv", params(("key" = String, Path)),
    responses((status = 200, description = "the value", content_type = "application/octet-stream", body = Vec<u8>),
        (status = 404, body = crate::Problem)))]
pub async fn get_default(
    State(state): State<AppState>,
    caller: Caller,
    Path(key): Path<String>,
) -> ApiResult<Response> {
    get_value(&state, &caller, &state.config().default_bucket, key).await
}

/// `PUT /v1/kv/{bucket}/{key}`: write; `If-Match` / `If-None-Match: *` for CAS.
#[utoipa::path(put, path = "/v1/kv/{bucket}/{key}", tag = "kv",
    params(("bucket" = String, Path), ("key" = String, Path),
        ("If-Match" = Option<String>, Header, description = "quoted revision: update only at it",
            pattern = r#"^("[0-9]{1,19}"|[0-9]{1,19})$"#),
        ("If-None-Match" = Option<String>, Header, description = "`*`: create only", pattern = r"^\*$")),
    request_body(content = Vec<u8>, content_type = "application/octet-stream"),
    responses((status = 200, description = "written", body = Written), (status = 404, body = crate::Problem),
        (status = 412, body = crate::Problem)))]
pub async fn put_key(
    State(state): State<AppState>,
    caller: Caller,
    Path((bucket, key)): Path<(String, String)>,
    headers: HeaderMap,
    body: Bytes,
) -> ApiResult<Response> {
    let bucket = client_bucket(bucket)?;
    let key = client_key(key)?;
    caller.require(&Access::KvWrite { bucket: &bucket })?;
    let expected = if_match(&headers)?;
    let create_only = if_none_match_star(&headers)?;
    let engine = state.engine();
    let rev = match (expected, create_only) {
        (Some(_), true) => return Err(Error::invalid("use If-Match or If-None-Match, not both").into()),
        (Some(rev), false) => engine.kv_update(&bucket, &key, body, rev).await?,
        (None, true) => engine.kv_create(&bucket, &key, body).await?,
        (None, false) => engine.kv_put(&bucket, &key, body).await?,
    };
    Ok(written(rev))
}

/// The answer to a write: the new revision in the body and as the `ETag`.
fn written(rev: Revision) -> Response {
    let mut res = Json(Written { revision: rev.0 }).into_response();
    res.headers_mut().insert(header::ETAG, etag(rev));
    res
}

/// Times a plain `DELETE` re-reads a key that keeps changing under it.
const DELETE_ATTEMPTS: usize = 8;

/// `DELETE /v1/kv/{bucket}/{key}`: write a delete marker (404 if no live
/// value); `If-Match` deletes only at that revision (412 otherwise).
///
/// Without `If-Match` the marker is written conditionally on the revision
/// just read, so of two concurrent deletes one answers 404, and a write
/// that lands between the read and the delete is read again rather than
/// deleted unseen.
#[utoipa::path(delete, path = "/v1/kv/{bucket}/{key}", tag = "kv",
    params(("bucket" = String, Path), ("key" = String, Path),
        ("If-Match" = Option<String>, Header, description = "quoted revision: delete only at it",
            pattern = r#"^("[0-9]{1,19}"|[0-9]{1,19})$"#)),
    responses((status = 200, description = "deleted; the marker's revision", body = Written), (status = 404, body = crate::Problem),
        (status = 412, body = crate::Problem)))]
pub async fn delete_key(
    State(state): State<AppState>,
    caller: Caller,
    Path((bucket, key)): Path<(String, String)>,
    headers: HeaderMap,
) -> ApiResult<Response> {
    let bucket = client_bucket(bucket)?;
    let key = client_key(key)?;
    caller.require(&Access::KvWrite { bucket: &bucket })?;
    let engine = state.engine();
    if let Some(expected) = if_match(&headers)? {
        return Ok(written(engine.kv_delete_if(&bucket, &key, expected).await?));
    }
    for _ in 0..DELETE_ATTEMPTS {
        let Some(live) = engine.kv_get(&bucket, &key).await? else {
            return Err(Error::not_found(format!("key `{}` not found in bucket `{bucket}`", shown(&key))).into());
        };
        match engine.kv_delete_if(&bucket, &key, live.revision).await {
            Ok(rev) => return Ok(written(rev)),
            Err(e) if e.kind() == ErrorKind::WrongRevision => continue,
            Err(e) => return Err(e.into()),
        }
    }
    Err(Error::unavailable(format!("key `{}` changed {DELETE_ATTEMPTS} times during the delete; retry", shown(&key)))
        .into())
}

/// `GET /v1/kv/{bucket}/{key}/history`: every kept entry, oldest first.
#[utoipa::path(get, path = "/v1/kv/{bucket}/{key}/history", tag = "kv", params(("bucket" = String, Path), ("key" = String, Path)),
    responses((status = 200, description = "entries as envelopes", body = History), (status = 404, body = crate::Problem)))]
pub async fn history(
    State(state): State<AppState>,
    caller: Caller,
    Path((bucket, key)): Path<(String, String)>,
) -> ApiResult<Response> {
    let bucket = client_bucket(bucket)?;
    let key = client_key(key)?;
    caller.require(&Access::KvRead { bucket: &bucket })?;
    let entries = state.engine().kv_history(&bucket, &key).await?;
    if entries.is_empty() {
        return Err(Error::not_found(format!("key `{}` has no history in bucket `{bucket}`", shown(&key))).into());
    }
    let mut body = Vec::from(&b"{\"entries\":["[..]);
    for (i, e) in entries.iter().enumerate() {
        if i > 0 {
            body.push(b',');
        }
        body.extend_from_slice(&crate::envelope::kv_entry(e));
    }
    body.extend_from_slice(b"]}");
    Ok(([(header::CONTENT_TYPE, "application/json")], body).into_response())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn etag_is_the_quoted_revision() {
        for n in [0, 1, 9, 10, 12_345, u64::MAX] {
            assert_eq!(etag(Revision(n)).to_str().unwrap(), format!("\"{n}\""));
        }
    }
}
