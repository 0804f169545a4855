//! Pacing of a registered subscriber's writer by its rate limit.
//!
//! Policy: the limit paces the subscriber's own connection task (it waits
//! before taking the next frame off its queue); the hub still pushes into
//! the queue without waiting, so a paced subscriber never slows anyone
//! else. A feed faster than the limit for longer than the queue can
//! absorb fills the queue, and the hub then cuts the subscriber off with
//! `slow_consumer` like any slow reader: it resumes from its last sequence.
//!
//! Invariants: both bounds are token buckets with one second's worth of
//! burst; a wait is cancel-safe (tokens are taken only when granted, and a
//! frame's bytes are paid once even if its message token is waited for
//! after them).

use std::num::NonZeroU32;
use std::time::Duration;

use governor::clock::{Clock, DefaultClock};
use governor::{DefaultDirectRateLimiter, Quota};

use super::RateLimit;
use crate::subscribe::Frame;

/// The pacer of one subscriber.
pub struct Pace {
    messages: Option<DefaultDirectRateLimiter>,
    bytes: Option<(DefaultDirectRateLimiter, NonZeroU32)>,
    clock: DefaultClock,
}

impl Pace {
    /// A pacer for `limit`; `None` when it bounds nothing.
    pub fn new(limit: &RateLimit) -> Option<Self> {
        let per_second = |n: Option<u32>| n.and_then(NonZeroU32::new);
        let messages =
            per_second(limit.messages_per_second).map(|n| governor::RateLimiter::direct(Quota::per_second(n)));
        let bytes =
            per_second(limit.bytes_per_second).map(|n| (governor::RateLimiter::direct(Quota::per_second(n)), n));
        (messages.is_some() || bytes.is_some()).then(|| Pace { messages, bytes, clock: DefaultClock::default() })
    }

    /// Wait until `frame` may be sent; `bytes_paid` records that its bytes
    /// were taken already (kept by the caller across a cancelled wait).
    pub async fn wait(&self, frame: &Frame, bytes_paid: &mut bool) {
        if !*bytes_paid {
            if let Some((limiter, burst)) = &self.bytes {
                // A frame larger than a second's worth pays a full second.
                let n = u32::try_from(frame.bytes()).unwrap_or(u32::MAX).clamp(1, burst.get());
                let n = NonZeroU32::new(n).unwrap_or(NonZeroU32::MIN);
                loop {
                    match limiter.check_n(n) {
                        Ok(Ok(())) | Err(_) => break,
                        Ok(Err(not_until)) => tokio::time::sleep(self.until(not_until)).await,
                    }
                }
            }
            *bytes_paid = true;
        }
        if let Some(limiter) = &self.messages {
            while let Err(not_until) = limiter.check() {
                tokio::time::sleep(self.until(not_until)).await;
            }
        }
    }

    fn until(&self, not_until: governor::NotUntil<<DefaultClock as Clock>::Instant>) -> Duration {
        not_until.wait_time_from(self.clock.now()).max(Duration::from_micros(100))
    }
}
