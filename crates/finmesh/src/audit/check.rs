//! The verdict of a loss audit: per subscriber, what it should have
//! received against what it did; and the latency and skew figures.
//!
//! Lossless, precisely (docs/fanout.md "Loss audit"): a subscriber received
//! every sequence of the stream that matches its filter from its start on,
//! each exactly once, in increasing order, across reconnects, a node
//! restart and a drain. [`verify`] checks exactly that against the stream's
//! own contents (the expected list), never against a counter kept by the
//! sender or the subscriber. Pure, so the checker itself is unit-tested on
//! injected gaps, duplicates and reorders.

use std::collections::HashSet;

use serde::Serialize;

/// How many missing sequences a report names (the count is always exact).
const NAMED: usize = 20;

/// One subscriber's verdict.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct Verdict {
    /// Sequences it should have received.
    pub expected: u64,
    /// Messages it received (duplicates included).
    pub received: u64,
    /// Expected sequences it never received.
    pub missing: u64,
    /// The first missing sequences (at most 20).
    pub first_missing: Vec<u64>,
    /// Receptions of a sequence it already had.
    pub duplicates: u64,
    /// Receptions of a sequence lower than one received before it.
    pub out_of_order: u64,
    /// Received sequences that are not expected (outside its filter or range).
    pub unexpected: u64,
}

impl Verdict {
    /// Nothing missing, doubled, reordered or unexpected.
    pub fn ok(&self) -> bool {
        self.missing == 0 && self.duplicates == 0 && self.out_of_order == 0 && self.unexpected == 0
    }
}

/// Compare `received` (in arrival order) with `expected` (increasing).
pub fn verify(expected: &[u64], received: &[u64]) -> Verdict {
    debug_assert!(expected.windows(2).all(|w| w[0] < w[1]), "expected is strictly increasing");
    let wanted: HashSet<u64> = expected.iter().copied().collect();
    let mut seen = HashSet::with_capacity(received.len());
    let mut verdict =
        Verdict { expected: expected.len() as u64, received: received.len() as u64, ..Verdict::default() };
    let mut highest = None;
    for &seq in received {
        if !seen.insert(seq) {
            verdict.duplicates += 1;
            continue;
        }
        if highest.is_some_and(|h| seq < h) {
            verdict.out_of_order += 1;
        }
        highest = highest.max(Some(seq));
        if !wanted.contains(&seq) {
            verdict.unexpected += 1;
        }
    }
    for &seq in expected {
        if !seen.contains(&seq) {
            verdict.missing += 1;
            if verdict.first_missing.len() < NAMED {
                verdict.first_missing.push(seq);
            }
        }
    }
    verdict
}

/// Percentiles of a set of durations, in microseconds.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct Percentiles {
    pub count: u64,
    pub p50: u64,
    pub p99: u64,
    pub p999: u64,
    pub max: u64,
}

impl Percentiles {
    /// Nearest-rank percentiles of `values` (sorted here).
    pub fn of(mut values: Vec<u64>) -> Self {
        if values.is_empty() {
            return Percentiles::default();
        }
        values.sort_unstable();
        let rank = |q: f64| {
            let n = values.len();
            let i = ((q * n as f64).ceil() as usize).clamp(1, n) - 1;
            values[i]
        };
        Percentiles {
            count: values.len() as u64,
            p50: rank(0.50),
            p99: rank(0.99),
            p999: rank(0.999),
            max: *values.last().expect("not empty"),
        }
    }
}

/// For each sequence received by at least two subscribers, the time
/// between the first and the last of them (`receipts[seq]` = every
/// subscriber's receive time of it, in microseconds).
pub fn skews(receipts: impl IntoIterator<Item = Vec<u64>>) -> Vec<u64> {
    receipts
        .into_iter()
        .filter(|times| times.len() >= 2)
        .map(|times| {
            let (lo, hi) = times.iter().fold((u64::MAX, 0), |(lo, hi), &t| (lo.min(t), hi.max(t)));
            hi - lo
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn everything_once_in_order_is_ok() {
        let v = verify(&[2, 4, 6], &[2, 4, 6]);
        assert!(v.ok(), "{v:?}");
        assert_eq!((v.expected, v.received), (3, 3));
    }

    #[test]
    fn an_injected_gap_is_found_and_named() {
        let v = verify(&[1, 2, 3, 4, 5], &[1, 2, 4, 5]);
        assert!(!v.ok());
        assert_eq!((v.missing, v.first_missing.clone()), (1, vec![3]));
        assert_eq!((v.duplicates, v.out_of_order, v.unexpected), (0, 0, 0));
    }

    #[test]
    fn a_duplicate_is_found() {
        let v = verify(&[1, 2, 3], &[1, 2, 2, 3]);
        assert_eq!((v.duplicates, v.missing, v.out_of_order), (1, 0, 0));
        assert!(!v.ok());
    }

    #[test]
    fn a_reorder_is_found() {
        let v = verify(&[1, 2, 3, 4], &[1, 3, 2, 4]);
        assert_eq!((v.out_of_order, v.missing, v.duplicates), (1, 0, 0));
        assert!(!v.ok());
    }

    #[test]
    fn a_sequence_outside_the_filter_is_unexpected() {
        let v = verify(&[1, 3], &[1, 2, 3]);
        assert_eq!(v.unexpected, 1);
        assert!(!v.ok());
    }

    #[test]
    fn missing_sequences_are_counted_exactly_and_named_up_to_a_limit() {
        let expected: Vec<u64> = (1..=100).collect();
        let v = verify(&expected, &[1]);
        assert_eq!(v.missing, 99);
        assert_eq!(v.first_missing, (2..=21).collect::<Vec<_>>());
    }

    #[test]
    fn percentiles_are_nearest_rank() {
        let p = Percentiles::of((1..=1000).rev().collect());
        assert_eq!((p.count, p.p50, p.p99, p.p999, p.max), (1000, 500, 990, 999, 1000));
        assert_eq!(Percentiles::of(vec![]), Percentiles::default());
    }

    #[test]
    fn skew_is_last_minus_first_and_needs_two_receivers() {
        assert_eq!(skews([vec![10, 40, 25], vec![7], vec![5, 5]]), vec![30, 0]);
    }
}
