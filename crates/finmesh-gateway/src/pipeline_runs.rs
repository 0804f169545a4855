//! Pipeline run routes: `PUT /v1/pipelines/runs/{run}` opens a run (its
//! slices, expected files and window) and `GET /v1/pipelines/runs/{run}`
//! returns its reconciliation state.
//!
//! The gateway embeds no pipeline logic: it validates the request with
//! [`finmesh_pipeline::reconcile::RunRequest`], stores it with
//! [`open_run`] and reads back the
//! document the reconciler maintains
//! ([`load_run`]); the reconciler
//! runs elsewhere (a node task or `finmesh pipeline run`).
//!
//! Access: the state lives in the KV bucket `{P}-recon`, so reading a run
//! needs `kv:read:{P}-recon` and opening one `kv:write:{P}-recon`. The
//! pipeline is `?pipeline=` (default `risk`).

use axum::Json;
use axum::body::Bytes;
use axum::extract::{Path, Query, State};
use axum::response::{IntoResponse, Response};
use finmesh_auth::Access;
use finmesh_core::{Error, Timestamp};
use finmesh_pipeline::reconcile::{DEFAULT_PIPELINE, Names, RunRequest, load_run, names::check_id, open_run};
use serde::Deserialize;

use crate::AppState;
use crate::caller::Caller;
use crate::problem::ApiResult;

/// `?pipeline=`.
#[derive(Debug, Deserialize)]
pub struct PipelineQuery {
    /// The pipeline (default `risk`).
    pub pipeline: Option<String>,
}

fn names(q: &PipelineQuery) -> ApiResult<Names> {
    Ok(Names::new(q.pipeline.as_deref().unwrap_or(DEFAULT_PIPELINE))?)
}

/// `GET /v1/pipelines/runs/{run}`: the run's reconciliation state.
#[utoipa::path(get, path = "/v1/pipelines/runs/{run}", tag = "pipelines",
    params(("run" = String, Path), ("pipeline" = Option<String>, Query, description = "pipeline name (default `risk`)")),
    responses((status = 200, description = "the run's state: slices, files, per-stage expected/actual/complete, failures, late files", body = Object),
        (status = 400, body = crate::Problem), (status = 404, body = crate::Problem)))]
pub async fn get_run(
    State(state): State<AppState>,
    caller: Caller,
    Path(run): Path<String>,
    Query(q): Query<PipelineQuery>,
) -> ApiResult<Response> {
    let names = names(&q)?;
    check_id("run id", &run)?;
    caller.require(&Access::KvRead { bucket: &names.bucket() })?;
    match load_run(&**state.engine(), &names, &run).await? {
        Some((status, _)) => Ok(Json(status).into_response()),
        None => Err(Error::not_found(format!("pipeline `{}` has no run `{run}`", names.pipeline())).into()),
    }
}

/// `PUT /v1/pipelines/runs/{run}`: open a run.
#[utoipa::path(put, path = "/v1/pipelines/runs/{run}", tag = "pipelines",
    params(("run" = String, Path), ("pipeline" = Option<String>, Query, description = "pipeline name (default `risk`)")),
    request_body(content = Object, description = r#"{"slices": {"S": {"files": ["F", ...]} | {"expected_files": N}}, "deadline": RFC 3339 | "window_s": seconds}"#),
    responses((status = 200, description = "the run's state (the stored one when the same spec was opened before)", body = Object),
        (status = 400, body = crate::Problem), (status = 409, body = crate::Problem)))]
pub async fn put_run(
    State(state): State<AppState>,
    caller: Caller,
    Path(run): Path<String>,
    Query(q): Query<PipelineQuery>,
    body: Bytes,
) -> ApiResult<Response> {
    let names = names(&q)?;
    check_id("run id", &run)?;
    caller.require(&Access::KvWrite { bucket: &names.bucket() })?;
    let request: RunRequest =
        serde_json::from_slice(&body).map_err(|e| Error::invalid(format!("bad run body: {e}")))?;
    let spec = request.into_spec(Timestamp::now())?;
    Ok(Json(open_run(&**state.engine(), &names, &run, spec).await?).into_response())
}
