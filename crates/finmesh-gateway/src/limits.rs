//! Per-client rate limits. (The other limits, the request timeout and load
//! shedding, are enforced by the layers of [`edge`](crate::edge).)
//!
//! Invariants:
//! - rate limits are keyed by the principal's subject (token `sub`); a
//!   subject listed in [`Limits::rate_overrides`](crate::Limits) gets its own
//!   bucket with its own rate, everyone else shares the default quota per key;
//! - the key is shared with the principal (`Arc<str>`): checking a known
//!   client allocates nothing.

use std::collections::HashMap;
use std::num::NonZeroU32;
use std::sync::Arc;
use std::time::Duration;

use foldhash::quality::RandomState;
use governor::clock::{Clock, DefaultClock};
use governor::middleware::NoOpMiddleware;
use governor::{DefaultDirectRateLimiter, DefaultKeyedRateLimiter, Quota};

use crate::state::Rate;

fn quota(rate: Rate) -> Quota {
    let per_second = NonZeroU32::new(rate.per_second).unwrap_or(NonZeroU32::MIN);
    let burst = NonZeroU32::new(rate.burst).unwrap_or(NonZeroU32::MIN);
    Quota::per_second(per_second).allow_burst(burst)
}

/// The keyed limiter: governor's default (a `DashMap`) with foldhash in place
/// of SipHash, which showed in the KV GET profile. Keys are the subjects of
/// verified tokens, which a client cannot choose freely.
type KeyedLimiter = DefaultKeyedRateLimiter<Arc<str>, NoOpMiddleware<<DefaultClock as Clock>::Instant>, RandomState>;

/// Per-client rate limits (GCRA, from `governor`).
pub struct RateLimiter {
    default: Option<KeyedLimiter>,
    overrides: HashMap<String, DefaultDirectRateLimiter>,
    clock: DefaultClock,
}

impl RateLimiter {
    /// Limits with a default rate (or none) and per-subject overrides.
    pub fn new(default: Option<Rate>, overrides: &HashMap<String, Rate>) -> Self {
        RateLimiter {
            default: default.map(|r| KeyedLimiter::dashmap_with_hasher(quota(r), RandomState::default())),
            overrides: overrides
                .iter()
                .map(|(k, r)| (k.clone(), DefaultDirectRateLimiter::direct(quota(*r))))
                .collect(),
            clock: DefaultClock::default(),
        }
    }

    /// Count one request of `subject`; `Err(wait)` when it is over its rate.
    pub fn check(&self, subject: &Arc<str>) -> Result<(), Duration> {
        let now = self.clock.now();
        if let Some(limiter) = self.overrides.get(&**subject) {
            return limiter.check().map_err(|n| n.wait_time_from(now));
        }
        match &self.default {
            Some(limiter) => {
                let res = limiter.check_key(subject).map_err(|n| n.wait_time_from(now));
                if limiter.len() > 100_000 {
                    limiter.retain_recent();
                }
                res
            }
            None => Ok(()),
        }
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
        let (small, big, other): (Arc<str>, Arc<str>, Arc<str>) = ("small".into(), "big".into(), "other".into());
        assert!(rl.check(&small).is_ok());
        assert!(rl.check(&small).is_err());
        for _ in 0..5 {
            assert!(rl.check(&big).is_ok());
        }
        assert!(rl.check(&big).is_err());
        assert!(rl.check(&other).is_ok(), "keys are independent");
    }
}
