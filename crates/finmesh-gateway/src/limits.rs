//! Per-client rate limits. (The other limits, the request timeout and load
//! shedding, are enforced by the layers of [`edge`](crate::edge).)
//!
//! Invariants:
//! - rate limits are keyed by the principal's subject (token `sub`); a
//!   subject listed in [`Limits::rate_overrides`](crate::Limits) gets its own
//!   bucket with its own rate, everyone else shares the default quota per key;
//! - without token identities (authentication off: every request has the
//!   same principal) the default quota is kept per client IP address
//!   instead, so one client cannot use up the whole node's;
//! - a refusal ([`Refusal`]) names the rate that refused and the setting
//!   that raises it, for the 429 problem's detail;
//! - the key is shared with the principal (`Arc<str>`) or is an address:
//!   checking a known client allocates nothing;
//! - a range read or fetch asks the engine for pages ([`Paging`]) that
//!   cannot hold more than the byte budget ([`Limits::max_read_bytes`](crate::Limits))
//!   and stops once it is spent: in all, at most the budget plus one
//!   message. A page holds at most `(budget - used) / largest` messages,
//!   `largest` being the stream's message size limit or its stored bytes if
//!   fewer; a stream that stores less than the budget is read in one call.

use std::collections::HashMap;
use std::net::IpAddr;
use std::num::NonZeroU32;
use std::sync::Arc;
use std::time::Duration;

use foldhash::quality::RandomState;
use governor::clock::{Clock, DefaultClock};
use governor::middleware::NoOpMiddleware;
use governor::{DefaultDirectRateLimiter, DefaultKeyedRateLimiter, Quota};

use finmesh_core::{Message, StreamInfo};

use crate::problem::Problem;
use crate::state::Rate;

fn quota(rate: Rate) -> Quota {
    let per_second = NonZeroU32::new(rate.per_second).unwrap_or(NonZeroU32::MIN);
    let burst = NonZeroU32::new(rate.burst).unwrap_or(NonZeroU32::MIN);
    Quota::per_second(per_second).allow_burst(burst)
}

/// The keyed limiter: governor's default (a `DashMap`) with foldhash in place
/// of SipHash, which showed in the KV GET profile. Keys are the subjects of
/// verified tokens, which a client cannot choose freely, or client addresses.
type KeyedLimiter<K> = DefaultKeyedRateLimiter<K, NoOpMiddleware<<DefaultClock as Clock>::Instant>, RandomState>;

/// Whose requests a rate limit counts.
#[derive(Debug, Clone, Copy)]
pub enum Client<'a> {
    /// A token's subject.
    Subject(&'a Arc<str>),
    /// A client address (authentication off).
    Address(IpAddr),
}

/// Why a request was refused: which rate, set where, and how long to wait.
#[derive(Debug, Clone)]
pub struct Refusal {
    /// The rate that refused.
    pub rate: Rate,
    /// Who was counted, as the detail names it.
    pub who: String,
    /// The configuration key that sets this rate.
    pub setting: String,
    /// How long until the request would pass; `None` if it never can (a
    /// batch larger than the burst).
    pub wait: Option<Duration>,
    /// Requests this call counted (messages of a batch).
    pub cost: u32,
}

impl Refusal {
    /// The 429 problem, naming the limit and the setting that raises it.
    pub fn problem(&self) -> Problem {
        let Rate { per_second, burst } = self.rate;
        let (who, setting) = (&self.who, &self.setting);
        let detail = match self.wait {
            Some(_) => format!(
                "{who} is over its rate limit of {per_second} requests/s (burst {burst}); \
                 raise it with `{setting}` (per_second, burst) in the configuration"
            ),
            None => format!(
                "a batch of {} messages counts as {} requests, more than the burst of {burst} of {who}; \
                 send smaller batches or raise `{setting}` (burst) in the configuration",
                self.cost, self.cost
            ),
        };
        let secs = self.wait.map_or(1, |w| w.as_secs_f64().ceil() as u64);
        Problem::rate_limited_with(secs, detail)
    }
}

type Instant = <DefaultClock as Clock>::Instant;

/// A governor answer as `Err(Some(wait))` (over the rate) or `Err(None)`
/// (more than the burst: never).
fn waited(
    r: Result<Result<(), governor::NotUntil<Instant>>, governor::InsufficientCapacity>,
    now: Instant,
) -> Result<(), Option<Duration>> {
    match r {
        Ok(Ok(())) => Ok(()),
        Ok(Err(not_until)) => Err(Some(not_until.wait_time_from(now))),
        Err(_) => Err(None),
    }
}

/// Per-client rate limits (GCRA, from `governor`).
pub struct RateLimiter {
    default: Option<(Rate, KeyedLimiter<Arc<str>>)>,
    by_address: Option<KeyedLimiter<IpAddr>>,
    overrides: HashMap<String, (Rate, DefaultDirectRateLimiter)>,
    clock: DefaultClock,
    /// The configuration key of the default rate, for refusals.
    setting: &'static str,
}

impl RateLimiter {
    /// Limits with a default rate (or none) and per-subject overrides.
    /// `setting` is the configuration key of `default` (e.g. `limits.rate`).
    pub fn new(default: Option<Rate>, overrides: &HashMap<String, Rate>, setting: &'static str) -> Self {
        RateLimiter {
            default: default.map(|r| (r, KeyedLimiter::dashmap_with_hasher(quota(r), RandomState::default()))),
            by_address: default.map(|r| KeyedLimiter::dashmap_with_hasher(quota(r), RandomState::default())),
            overrides: overrides
                .iter()
                .map(|(k, r)| (k.clone(), (*r, DefaultDirectRateLimiter::direct(quota(*r)))))
                .collect(),
            clock: DefaultClock::default(),
            setting,
        }
    }

    /// Count one request of `subject`; `Err(wait)` when it is over its rate.
    pub fn check(&self, subject: &Arc<str>) -> Result<(), Duration> {
        self.check_n(Client::Subject(subject), NonZeroU32::MIN).map_err(|r| r.wait.unwrap_or(Duration::MAX))
    }

    /// Count `n` requests of `client` at once (the messages of a batch).
    pub fn check_n(&self, client: Client<'_>, n: NonZeroU32) -> Result<(), Box<Refusal>> {
        let now = self.clock.now();
        let refuse = |rate: Rate, who: String, setting: String, wait: Option<Duration>| {
            Err(Box::new(Refusal { rate, who, setting, wait, cost: n.get() }))
        };
        let outcome = |r| waited(r, now);
        match client {
            Client::Subject(subject) => {
                if let Some((rate, limiter)) = self.overrides.get(&**subject) {
                    return match outcome(limiter.check_n(n)) {
                        Ok(_) => Ok(()),
                        Err(wait) => {
                            refuse(*rate, format!("`{subject}`"), format!("{}_overrides.{subject}", self.setting), wait)
                        }
                    };
                }
                let Some((rate, limiter)) = &self.default else { return Ok(()) };
                let res = outcome(limiter.check_key_n(subject, n));
                if limiter.len() > 100_000 {
                    limiter.retain_recent();
                }
                match res {
                    Ok(_) => Ok(()),
                    Err(wait) => refuse(*rate, format!("`{subject}`"), self.setting.to_owned(), wait),
                }
            }
            Client::Address(ip) => {
                let (Some((rate, _)), Some(limiter)) = (&self.default, &self.by_address) else { return Ok(()) };
                let res = outcome(limiter.check_key_n(&ip, n));
                if limiter.len() > 100_000 {
                    limiter.retain_recent();
                }
                match res {
                    Ok(_) => Ok(()),
                    Err(wait) => refuse(
                        *rate,
                        format!("client address {ip} (without token identities each address has its own limit)"),
                        self.setting.to_owned(),
                        wait,
                    ),
                }
            }
        }
    }
}

/// Room for a message's subject and headers on top of its payload limit.
const MESSAGE_OVERHEAD: u64 = 64 * 1024;

/// The pages of one range read or fetch, bounded in bytes (see the module
/// documentation).
#[derive(Debug, Clone, Copy)]
pub struct Paging {
    budget: u64,
    used: u64,
    largest: u64,
    whole: bool,
}

impl Paging {
    /// Pages within `budget` bytes of `stream`'s messages.
    pub fn new(budget: usize, stream: &StreamInfo) -> Self {
        let stored = stream.state.bytes;
        let largest = (u64::from(stream.config.msg_size_limit()) + MESSAGE_OVERHEAD).min(stored).max(1);
        let budget = budget as u64;
        Paging { budget, used: 0, largest, whole: stored <= budget }
    }

    /// Messages the next engine call may return when `wanted` more are
    /// wanted; 0 when done.
    pub fn next(&self, wanted: usize) -> usize {
        if wanted == 0 || self.spent() {
            return 0;
        }
        if self.whole {
            return wanted;
        }
        let fit = (self.budget - self.used) / self.largest;
        usize::try_from(fit).unwrap_or(usize::MAX).clamp(1, wanted)
    }

    /// Count a message the engine returned.
    pub fn add(&mut self, msg: &Message) {
        self.used += msg.size() as u64;
    }

    /// Whether the budget is used up.
    pub fn spent(&self) -> bool {
        self.used >= self.budget
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn override_replaces_default() {
        let mut o = HashMap::new();
        o.insert("big".to_owned(), Rate { per_second: 1, burst: 5 });
        let rl = RateLimiter::new(Some(Rate { per_second: 1, burst: 1 }), &o, "limits.rate");
        let (small, big, other): (Arc<str>, Arc<str>, Arc<str>) = ("small".into(), "big".into(), "other".into());
        assert!(rl.check(&small).is_ok());
        assert!(rl.check(&small).is_err());
        for _ in 0..5 {
            assert!(rl.check(&big).is_ok());
        }
        assert!(rl.check(&big).is_err());
        assert!(rl.check(&other).is_ok(), "keys are independent");
    }

    #[test]
    fn a_refusal_names_the_rate_and_its_setting() {
        let mut o = HashMap::new();
        o.insert("big".to_owned(), Rate { per_second: 7, burst: 3 });
        let rl = RateLimiter::new(Some(Rate { per_second: 1, burst: 2 }), &o, "limits.rate");
        let big: Arc<str> = "big".into();
        let two = NonZeroU32::new(2).unwrap();
        assert!(rl.check_n(Client::Subject(&big), two).is_ok());
        let refusal = rl.check_n(Client::Subject(&big), two).unwrap_err();
        let detail = refusal.problem().detail;
        assert!(detail.contains("`big`") && detail.contains("7 requests/s (burst 3)"), "{detail}");
        assert!(detail.contains("`limits.rate_overrides.big`"), "{detail}");
        let ip: IpAddr = "10.1.2.3".parse().unwrap();
        assert!(rl.check_n(Client::Address(ip), two).is_ok());
        let detail = rl.check_n(Client::Address(ip), NonZeroU32::MIN).unwrap_err().problem().detail;
        assert!(detail.contains("client address 10.1.2.3") && detail.contains("`limits.rate`"), "{detail}");
        let never = rl.check_n(Client::Address("10.9.9.9".parse().unwrap()), NonZeroU32::new(3).unwrap());
        assert_eq!(never.unwrap_err().wait, None, "more than the burst never passes");
    }
}
