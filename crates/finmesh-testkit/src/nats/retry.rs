//! Retrying JetStream requests that a cluster refuses for a moment.
//!
//! A replicated cluster refuses some requests while it settles, and says
//! so precisely: a create is refused for want of placeable peers (10005,
//! 10023) while the meta leader waits for a peer's report; a publish gets
//! "no responders" while no server has announced interest in the stream's
//! subjects yet (only a stream's leader subscribes to them, so right after
//! a create or a leader change the interest may still be on its way over
//! the routes). Neither stored anything, so sending again is safe.
//! [`until_placed`] and [`until_routed`] retry exactly those refusals, every
//! [`POLL_INTERVAL`], until a deadline, and return any other result at once.
//! Nothing announces the moment the cluster is ready, so polling is the
//! only way to wait for it.

use std::time::{Duration, Instant};

use crate::process::POLL_INTERVAL;

/// Run `write` until its failure is not `refused`, for at most `timeout`.
async fn retry_refused<T, E, F, Fut>(
    timeout: Duration,
    refused: fn(&(dyn std::error::Error + 'static)) -> bool,
    mut write: F,
) -> std::result::Result<T, E>
where
    E: std::error::Error + 'static,
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = std::result::Result<T, E>>,
{
    let deadline = Instant::now() + timeout;
    loop {
        match write().await {
            Err(e) if Instant::now() < deadline && refused(&e) => {
                tracing::debug!(error = %e, "refused for now; retrying");
                tokio::time::sleep(POLL_INTERVAL).await;
            }
            r => return r,
        }
    }
}

/// Run `create` (a replicated stream or bucket create) until it is not
/// refused for want of placeable peers, for at most `timeout`. nats-server
/// answers 10005 ("no suitable peers for placement, peer offline") or 10023
/// ("insufficient resources") while its meta leader lacks a peer's STATSZ
/// report, which a loaded machine can delay even after the cluster was
/// ready (seen in the bench harness during full test runs). Any other
/// result is returned at once.
pub async fn until_placed<T, E, F, Fut>(timeout: Duration, create: F) -> std::result::Result<T, E>
where
    E: std::error::Error + 'static,
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = std::result::Result<T, E>>,
{
    retry_refused(timeout, placement_refused, create).await
}

/// Is a JetStream error with code 10005 or 10023 anywhere in `e`'s chain?
fn placement_refused(e: &(dyn std::error::Error + 'static)) -> bool {
    use async_nats::jetstream::context::{CreateStreamError, CreateStreamErrorKind};
    use async_nats::jetstream::{Error as JsError, ErrorCode};
    let refused =
        |js: &JsError| matches!(js.error_code(), ErrorCode::CLUSTER_NO_PEERS | ErrorCode::INSUFFICIENT_RESOURCES);
    let mut cur = Some(e);
    while let Some(err) = cur {
        if let Some(js) = err.downcast_ref::<JsError>()
            && refused(js)
        {
            return true;
        }
        // A stream create carries the server's error in its kind, not as a source.
        if let Some(c) = err.downcast_ref::<CreateStreamError>()
            && let CreateStreamErrorKind::JetStream(js) = c.kind()
            && refused(&js)
        {
            return true;
        }
        cur = err.source();
    }
    false
}

/// Run `write` (a publish, a KV put) until it is not answered "no
/// responders", for at most `timeout`: right after a replicated stream was
/// created or changed leader, the server the client is connected to may not
/// know yet where the stream's subjects go. Any other result is returned at
/// once, so a write that timed out (and may be stored) is not repeated.
pub async fn until_routed<T, E, F, Fut>(timeout: Duration, write: F) -> std::result::Result<T, E>
where
    E: std::error::Error + 'static,
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = std::result::Result<T, E>>,
{
    retry_refused(timeout, no_responders, write).await
}

/// Is a publish refused with "no responders" (async-nats reports the 503
/// as `StreamNotFound`) anywhere in `e`'s chain?
fn no_responders(e: &(dyn std::error::Error + 'static)) -> bool {
    use async_nats::jetstream::context::{PublishError, PublishErrorKind};
    let mut cur = Some(e);
    while let Some(err) = cur {
        if let Some(p) = err.downcast_ref::<PublishError>() {
            return p.kind() == PublishErrorKind::StreamNotFound;
        }
        cur = err.source();
    }
    false
}

#[cfg(test)]
mod tests {
    use super::*;
    use async_nats::jetstream::context::{
        CreateKeyValueError, CreateKeyValueErrorKind, CreateStreamError, CreateStreamErrorKind, PublishError,
        PublishErrorKind,
    };
    use async_nats::jetstream::kv::{PutError, PutErrorKind};

    fn server_error(code: u64) -> async_nats::jetstream::Error {
        serde_json::from_value(serde_json::json!({ "code": 400, "err_code": code, "description": "from the server" }))
            .unwrap()
    }

    /// A KV create as async-nats reports it: the stream create's error as
    /// the source, the server's error inside its kind.
    fn kv_create_error(code: u64) -> CreateKeyValueError {
        let stream = CreateStreamError::new(CreateStreamErrorKind::JetStream(server_error(code)));
        CreateKeyValueError::with_source(CreateKeyValueErrorKind::BucketCreate, stream)
    }

    #[test]
    fn placement_refusals_are_found_where_async_nats_puts_them() {
        assert!(placement_refused(&kv_create_error(10005)));
        assert!(placement_refused(&kv_create_error(10023)));
        assert!(placement_refused(&server_error(10005)));
        assert!(!placement_refused(&kv_create_error(10058)), "stream name already in use is final");
        assert!(!placement_refused(&CreateKeyValueError::new(CreateKeyValueErrorKind::TimedOut)));
    }

    #[tokio::test]
    async fn until_placed_retries_only_placement_refusals() {
        let mut calls = 0;
        let r: std::result::Result<u32, CreateKeyValueError> = until_placed(Duration::from_secs(10), || {
            calls += 1;
            let n = calls;
            async move { if n < 3 { Err(kv_create_error(10005)) } else { Ok(n) } }
        })
        .await;
        assert_eq!(r.unwrap(), 3);

        let mut calls = 0;
        let r: std::result::Result<u32, CreateKeyValueError> = until_placed(Duration::from_secs(10), || {
            calls += 1;
            async { Err(kv_create_error(10058)) }
        })
        .await;
        assert!(r.is_err());
        assert_eq!(calls, 1, "another error is returned at once");

        let started = Instant::now();
        let r: std::result::Result<u32, CreateKeyValueError> =
            until_placed(Duration::from_millis(300), || async { Err(kv_create_error(10005)) }).await;
        assert!(r.is_err() && started.elapsed() >= Duration::from_millis(300), "gives up at the timeout");
    }

    fn unrouted() -> PublishError {
        PublishError::new(PublishErrorKind::StreamNotFound)
    }

    #[test]
    fn no_responders_is_found_in_a_publish_and_under_a_kv_put() {
        assert!(no_responders(&unrouted()));
        assert!(no_responders(&PutError::with_source(PutErrorKind::Publish, unrouted())));
        assert!(!no_responders(&PublishError::new(PublishErrorKind::TimedOut)), "a timeout may have stored");
        assert!(!no_responders(&server_error(10059)));
    }

    #[tokio::test]
    async fn until_routed_retries_only_no_responders() {
        let mut calls = 0;
        let r: std::result::Result<u32, PublishError> = until_routed(Duration::from_secs(10), || {
            calls += 1;
            let n = calls;
            async move { if n < 3 { Err(unrouted()) } else { Ok(n) } }
        })
        .await;
        assert_eq!(r.unwrap(), 3);

        let mut calls = 0;
        let r: std::result::Result<u32, PublishError> = until_routed(Duration::from_secs(10), || {
            calls += 1;
            async { Err(PublishError::new(PublishErrorKind::TimedOut)) }
        })
        .await;
        assert!(r.is_err());
        assert_eq!(calls, 1, "a write that may be stored is not repeated");
    }
}
