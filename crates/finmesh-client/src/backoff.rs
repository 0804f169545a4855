//! Jittered exponential backoff between reconnection attempts.
//!
//! The `n`-th consecutive failed attempt (from 0) waits a random time in
//! `[d/2, d]` where `d = min(initial * 2^n, max)` ("equal jitter"): it
//! grows quickly towards the cap, and many clients cut off together (a node
//! that died) come back spread over half the interval instead of at once.

use std::time::Duration;

/// Backoff settings.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Backoff {
    /// Wait before the first retry (before jitter). Default 100 ms.
    pub initial: Duration,
    /// Longest wait (before jitter). Default 10 s.
    pub max: Duration,
}

impl Default for Backoff {
    fn default() -> Self {
        Backoff { initial: Duration::from_millis(100), max: Duration::from_secs(10) }
    }
}

impl Backoff {
    /// The wait before retry number `attempt` (0 = the first retry).
    pub fn delay(&self, attempt: u32) -> Duration {
        let factor = 1u32.checked_shl(attempt.min(31)).unwrap_or(u32::MAX);
        let cap = self.initial.saturating_mul(factor).min(self.max);
        let half = cap / 2;
        let spread = u64::try_from((cap - half).as_millis()).unwrap_or(u64::MAX);
        half + Duration::from_millis(fastrand::u64(0..=spread))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn delays_grow_to_the_cap_with_jitter() {
        let b = Backoff { initial: Duration::from_millis(100), max: Duration::from_secs(2) };
        for attempt in 0..40 {
            let cap = Duration::from_millis(100u64.saturating_mul(1 << attempt.min(20))).min(b.max);
            for _ in 0..20 {
                let d = b.delay(attempt);
                assert!(d >= cap / 2 && d <= cap, "attempt {attempt}: {d:?} not in [{:?}, {cap:?}]", cap / 2);
            }
        }
        let spread: std::collections::HashSet<_> = (0..50).map(|_| b.delay(10)).collect();
        assert!(spread.len() > 1, "jittered");
    }
}
