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

#[cfg(test)]
mod tests {
    use std::time::Instant;

    use bytes::Bytes;

    use super::*;

    fn frame(bytes: usize) -> Frame {
        Frame::Message { id: 1, data: Bytes::from(vec![b'x'; bytes]) }
    }

    #[test]
    fn nothing_to_bound_is_no_pace() {
        assert!(Pace::new(&RateLimit { messages_per_second: None, bytes_per_second: None }).is_none());
    }

    #[tokio::test]
    async fn bytes_beyond_a_second_s_worth_wait_for_their_share() {
        let pace = Pace::new(&RateLimit { messages_per_second: None, bytes_per_second: Some(1000) }).unwrap();
        let start = Instant::now();
        for _ in 0..2 {
            pace.wait(&frame(400), &mut false).await;
        }
        // 800 of the 1000-byte burst are used: 400 more need 200 bytes' time.
        pace.wait(&frame(400), &mut false).await;
        assert!(start.elapsed() >= Duration::from_millis(150), "{:?}", start.elapsed());
        // Paid bytes are not paid again (a wait cancelled after them).
        let again = Instant::now();
        pace.wait(&frame(1000), &mut true).await;
        assert!(again.elapsed() < Duration::from_millis(500), "{:?}", again.elapsed());
    }

    #[tokio::test]
    async fn messages_beyond_the_burst_wait() {
        let pace = Pace::new(&RateLimit { messages_per_second: Some(10), bytes_per_second: None }).unwrap();
        let start = Instant::now();
        for _ in 0..12 {
            pace.wait(&frame(1), &mut false).await;
        }
        // A burst of 10, then one every 100 ms.
        assert!(start.elapsed() >= Duration::from_millis(150), "{:?}", start.elapsed());
    }
}
