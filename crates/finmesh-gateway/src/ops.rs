//! Operations routes: `/healthz` (the process answers), `/readyz` (engine
//! reachable and not draining; its body lists registered subscribers
//! disconnected from this node for longer than
//! `subscriptions.registered_disconnect_alert`, which never fails it),
//! `/metrics` (Prometheus text) and `/v1/subscribers` (connected SSE/WS
//! subscribers, and the subscriber registry with its live status here).

use std::collections::HashMap;
use std::time::Duration;

use axum::Json;
use axum::extract::State;
use axum::http::header;
use axum::response::{IntoResponse, Response};
use finmesh_auth::Access;
use finmesh_core::{BucketName, Error, StreamName};

use crate::AppState;
use crate::caller::Caller;
use crate::problem::{ApiResult, Problem};
use crate::schema::{DisconnectedSubscriber, RateInfo, Readiness, Status, SubscriberList};

/// How long `/readyz` waits for the engine.
const READY_PROBE_TIMEOUT: Duration = Duration::from_secs(2);

/// `GET /healthz`: 200 while the process serves requests.
#[utoipa::path(get, path = "/healthz", tag = "ops", security(()), responses((status = 200, description = "alive", body = Status)))]
pub async fn healthz() -> Response {
    Json(Status { status: "ok" }).into_response()
}

/// `GET /readyz`: 200 when the engine answers and the gateway is not draining.
#[utoipa::path(get, path = "/readyz", tag = "ops", security(()),
    responses((status = 200, description = "ready", body = Readiness), (status = 503, body = crate::Problem)))]
pub async fn readyz(State(state): State<AppState>) -> Response {
    if state.is_unready() {
        return Problem::from_error(&Error::unavailable("draining")).into_response();
    }
    match tokio::time::timeout(READY_PROBE_TIMEOUT, state.engine().list_buckets()).await {
        Ok(Ok(_)) => {
            let disconnected = disconnected_registered(&state).await;
            Json(Readiness { status: "ready", disconnected_subscribers: disconnected }).into_response()
        }
        Ok(Err(e)) => {
            tracing::warn!(error = %e, "readiness probe: engine error");
            Problem::from_error(&Error::unavailable(format!("engine not reachable: {}", e.kind()))).into_response()
        }
        Err(_) => Problem::from_error(&Error::unavailable("engine did not answer in time")).into_response(),
    }
}

/// `GET /metrics`: Prometheus text exposition.
#[utoipa::path(get, path = "/metrics", tag = "ops", security(()),
    responses((status = 200, description = "Prometheus text format", content_type = "text/plain", body = String)))]
pub async fn metrics(State(state): State<AppState>) -> Response {
    disconnected_registered(&state).await;
    ([(header::CONTENT_TYPE, "text/plain; version=0.0.4")], state.inner.metrics.render()).into_response()
}

/// `GET /v1/subscribers`: who is subscribed to what, how far they got, and
/// their lag behind the stream (or bucket) head.
#[utoipa::path(get, path = "/v1/subscribers", tag = "ops",
    responses((status = 200, description = "connected subscribers, and registered ones with their status on this node", body = SubscriberList)))]
pub async fn subscribers(State(state): State<AppState>, caller: Caller) -> ApiResult<Response> {
    caller.require(&Access::SubscribersRead)?;
    let mut subs = state.inner.subscribers.snapshot();
    let mut heads: HashMap<(bool, String), Option<u64>> = HashMap::new();
    for s in &mut subs {
        let is_kv = s.kind == "watch";
        let key = (is_kv, s.resource.clone());
        if !heads.contains_key(&key) {
            let head = if is_kv {
                match BucketName::new(s.resource.as_str()) {
                    Ok(b) => state.engine().bucket_info(&b).await.ok().map(|i| i.last_revision.0),
                    Err(_) => None,
                }
            } else {
                match StreamName::new(s.resource.as_str()) {
                    Ok(n) => state.engine().stream_info(&n).await.ok().map(|i| i.state.last_seq.0),
                    Err(_) => None,
                }
            };
            heads.insert(key.clone(), head);
        }
        s.lag = heads.get(&key).copied().flatten().map(|h| h.saturating_sub(s.last_seq));
    }
    let rate = state.config().limits.rate;
    let overrides = &state.config().limits.rate_overrides;
    for s in &mut subs {
        let r = overrides.get(&s.identity).copied().or(rate);
        s.rate_limit = r.map(|r| RateInfo { per_second: r.per_second, burst: r.burst });
    }
    let registered = crate::registry::routes::registered(&state).await?;
    let node = state.registry().book().node().to_owned();
    Ok(Json(SubscriberList { node, subscribers: subs, registered }).into_response())
}

/// Registered subscribers disconnected from this node for longer than
/// `subscriptions.registered_disconnect_alert` (and their gauges set);
/// nothing when the registry cannot be read in time.
async fn disconnected_registered(state: &AppState) -> Vec<DisconnectedSubscriber> {
    let Ok(Ok(snapshot)) = tokio::time::timeout(READY_PROBE_TIMEOUT, state.registry().snapshot()).await else {
        return Vec::new();
    };
    let ids: Vec<String> = snapshot.by_id.keys().cloned().collect();
    let threshold = state.config().subscriptions.registered_disconnect_alert;
    state
        .registry()
        .book()
        .disconnected(&ids, threshold)
        .into_iter()
        .map(|(id, seconds)| DisconnectedSubscriber { id, seconds })
        .collect()
}
