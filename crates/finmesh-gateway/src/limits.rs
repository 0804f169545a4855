//! Request limits: the per-client rate limiter and the tower layers
//! (timeout, load shedding, concurrency, panic catching) put around routes.
//!
//! Invariants:
//! - rate limits are keyed by the principal's subject (token `sub`); a
//!   subject listed in [`Limits::rate_overrides`](crate::Limits) gets its own
//!   bucket with its own rate, everyone else shares the default quota per key;
//! - the request timeout wraps unary routes only: SSE and WebSocket streams
//!   live as long as the client keeps them;
//! - load shedding answers at once (503 + `Retry-After`) instead of queueing.

use std::collections::HashMap;
use std::num::NonZeroU32;
use std::time::Duration;

use axum::BoxError;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use governor::clock::{Clock, DefaultClock};
use governor::{DefaultDirectRateLimiter, DefaultKeyedRateLimiter, Quota};

use crate::problem::Problem;
use crate::state::Rate;

fn quota(rate: Rate) -> Quota {
    let per_second = NonZeroU32::new(rate.per_second).unwrap_or(NonZeroU32::MIN);
    let burst = NonZeroU32::new(rate.burst).unwrap_or(NonZeroU32::MIN);
    Quota::per_second(per_second).allow_burst(burst)
}

/// Per-client rate limits (GCRA, from `governor`).
pub struct RateLimiter {
    default: Option<DefaultKeyedRateLimiter<String>>,
    overrides: HashMap<String, DefaultDirectRateLimiter>,
    clock: DefaultClock,
}

impl RateLimiter {
    /// Limits with a default rate (or none) and per-subject overrides.
    pub fn new(default: Option<Rate>, overrides: &HashMap<String, Rate>) -> Self {
        RateLimiter {
            default: default.map(|r| DefaultKeyedRateLimiter::keyed(quota(r))),
            overrides: overrides
                .iter()
                .map(|(k, r)| (k.clone(), DefaultDirectRateLimiter::direct(quota(*r))))
                .collect(),
            clock: DefaultClock::default(),
        }
    }

    /// Count one request of `subject`; `Err(wait)` when it is over its rate.
    pub fn check(&self, subject: &str) -> Result<(), Duration> {
        let now = self.clock.now();
        if let Some(limiter) = self.overrides.get(subject) {
            return limiter.check().map_err(|n| n.wait_time_from(now));
        }
        match &self.default {
            Some(limiter) => {
                let res = limiter.check_key(&subject.to_owned()).map_err(|n| n.wait_time_from(now));
                if limiter.len() > 100_000 {
                    limiter.retain_recent();
                }
                res
            }
            None => Ok(()),
        }
    }
}

/// Turn an error of the timeout / load-shed / concurrency layers into a problem.
pub async fn layer_error(err: BoxError) -> Response {
    if err.is::<tower::load_shed::error::Overloaded>() {
        crate::metrics::shed();
        Problem::overloaded().into_response()
    } else if err.is::<tower::timeout::error::Elapsed>() {
        Problem::from_status(StatusCode::GATEWAY_TIMEOUT, "the request took too long".to_owned()).into_response()
    } else {
        tracing::error!(error = %err, "request layer failed");
        Problem::from_status(StatusCode::INTERNAL_SERVER_ERROR, String::new()).into_response()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn override_replaces_default() {
        let mut o = HashMap::new();
        o.insert("big".to_owned(), Rate { per_second: 1, burst: 5 });
        let rl = RateLimiter::new(Some(Rate { per_second: 1, burst: 1 }), &o);
        assert!(rl.check("small").is_ok());
        assert!(rl.check("small").is_err());
        for _ in 0..5 {
            assert!(rl.check("big").is_ok());
        }
        assert!(rl.check("big").is_err());
        assert!(rl.check("other").is_ok(), "keys are independent");
    }
}
