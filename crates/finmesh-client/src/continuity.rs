//! The continuity check of a subscription: given the sequences a node
//! sends, decide which to deliver and report every break.
//!
//! Owns the received position (the last sequence accepted from the wire,
//! or skipped past) and the counters of [`Stats`]. Invariants:
//! - a sequence at or below the position is never accepted twice: the
//!   position's own sequence again is a [`Check::Duplicate`], an older one a
//!   [`Check::Rewind`]; both are dropped and counted;
//! - without a subject filter the sequences of a stream are consecutive, so
//!   an accepted sequence past `position + 1` is a [`Check::Gap`] the node
//!   did not announce (with a filter, jumps are normal and not reported);
//! - the position only grows, except through [`Continuity::reset`] (the
//!   stream's epoch changed: the node said which sequence still holds).
//!
//! Pure and synchronous, so every rule is unit-tested below.

/// Counters of a subscription, from its start (see
/// [`Subscription::stats`](crate::Subscription::stats)).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Stats {
    /// Messages handed to the application.
    pub delivered: u64,
    /// Gaps reported (announced by the node or seen by the client).
    pub gaps: u64,
    /// Sequences the reported gaps cover in all.
    pub missing: u64,
    /// Rewinds reported: a node sent a sequence at or below the position
    /// (at most one report per connection).
    pub rewinds: u64,
    /// Messages dropped because the application already had them.
    pub duplicates_dropped: u64,
    /// Resets reported (the stream's epoch changed).
    pub resets: u64,
    /// Connections opened.
    pub connections: u64,
    /// Failed attempts and lost connections.
    pub disconnections: u64,
    /// Moves to another endpoint than the one just used.
    pub failovers: u64,
}

/// The verdict on one sequence from the wire.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Check {
    /// The next one: deliver it.
    Next,
    /// Deliver it, but `from..=to` before it never came (unfiltered only).
    Gap {
        /// First missing sequence.
        from: u64,
        /// Last missing sequence.
        to: u64,
    },
    /// The position's own sequence again: drop it.
    Duplicate,
    /// An older sequence than the position: drop it.
    Rewind {
        /// The sequence that was expected.
        expected: u64,
    },
}

/// The received position and its counters.
#[derive(Debug, Clone, Default)]
pub struct Continuity {
    position: Option<u64>,
    consecutive: bool,
    stats: Stats,
}

impl Continuity {
    /// A check starting after `position` (`None`: nothing seen yet);
    /// `consecutive` when the subscription has no subject filter.
    pub fn new(position: Option<u64>, consecutive: bool) -> Self {
        Continuity { position, consecutive, stats: Stats::default() }
    }

    /// The last sequence accepted or skipped past.
    pub fn position(&self) -> Option<u64> {
        self.position
    }

    /// The counters so far.
    pub fn stats(&self) -> Stats {
        self.stats
    }

    /// Mutable counters, for the connection counts the subscription keeps.
    pub(crate) fn stats_mut(&mut self) -> &mut Stats {
        &mut self.stats
    }

    /// Check a message's sequence; accepts it (moves the position) unless
    /// it is a duplicate or a rewind.
    pub fn check(&mut self, seq: u64) -> Check {
        let Some(p) = self.position else {
            self.position = Some(seq);
            return Check::Next;
        };
        if seq == p {
            self.stats.duplicates_dropped += 1;
            return Check::Duplicate;
        }
        if seq < p {
            self.stats.duplicates_dropped += 1;
            return Check::Rewind { expected: p + 1 };
        }
        self.position = Some(seq);
        if self.consecutive && seq > p + 1 {
            self.note_gap(p + 1, seq - 1);
            return Check::Gap { from: p + 1, to: seq - 1 };
        }
        Check::Next
    }

    /// The node announced that `from..=to` is gone: skip past it. Returns
    /// whether it is news (some of it lies past the position).
    pub fn announced_gap(&mut self, from: u64, to: u64) -> bool {
        if self.position.is_some_and(|p| to <= p) {
            return false;
        }
        let from = self.position.map_or(from, |p| from.max(p + 1));
        self.note_gap(from, to);
        self.position = Some(to);
        true
    }

    /// Everything up to `head` that matches was sent (a heartbeat's id).
    pub fn skip_to(&mut self, head: u64) {
        self.position = Some(self.position.map_or(head, |p| p.max(head)));
    }

    /// The stream's history changed: only sequences up to `last_seq` hold.
    pub fn reset(&mut self, last_seq: u64) {
        self.stats.resets += 1;
        self.position = Some(last_seq);
    }

    /// A rewind was reported to the application.
    pub(crate) fn note_rewind(&mut self) {
        self.stats.rewinds += 1;
    }

    fn note_gap(&mut self, from: u64, to: u64) {
        self.stats.gaps += 1;
        self.stats.missing += to.saturating_sub(from) + 1;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn consecutive_sequences_pass() {
        let mut c = Continuity::new(None, true);
        for seq in 5..=9 {
            assert_eq!(c.check(seq), Check::Next);
        }
        assert_eq!(c.position(), Some(9));
        assert_eq!(c.stats(), Stats::default());
    }

    #[test]
    fn a_jump_without_filter_is_a_gap() {
        let mut c = Continuity::new(Some(3), true);
        assert_eq!(c.check(4), Check::Next);
        assert_eq!(c.check(8), Check::Gap { from: 5, to: 7 });
        assert_eq!(c.check(9), Check::Next);
        assert_eq!((c.stats().gaps, c.stats().missing), (1, 3));
        assert_eq!(c.position(), Some(9));
    }

    #[test]
    fn a_jump_with_a_filter_is_normal() {
        let mut c = Continuity::new(Some(3), false);
        assert_eq!(c.check(8), Check::Next);
        assert_eq!(c.stats().gaps, 0);
    }

    #[test]
    fn the_same_sequence_again_is_a_dropped_duplicate() {
        let mut c = Continuity::new(None, true);
        assert_eq!(c.check(1), Check::Next);
        assert_eq!(c.check(1), Check::Duplicate);
        assert_eq!(c.check(2), Check::Next);
        assert_eq!(c.stats().duplicates_dropped, 1);
        assert_eq!(c.position(), Some(2));
    }

    #[test]
    fn an_older_sequence_is_a_rewind_and_never_moves_the_position_back() {
        let mut c = Continuity::new(Some(10), false);
        assert_eq!(c.check(7), Check::Rewind { expected: 11 });
        assert_eq!(c.check(8), Check::Rewind { expected: 11 });
        assert_eq!(c.position(), Some(10));
        assert_eq!(c.check(11), Check::Next);
        assert_eq!(c.stats().duplicates_dropped, 2);
    }

    #[test]
    fn announced_gaps_count_only_what_lies_ahead() {
        let mut c = Continuity::new(Some(5), true);
        assert!(!c.announced_gap(2, 5), "all behind the position");
        assert!(c.announced_gap(4, 9));
        assert_eq!((c.stats().gaps, c.stats().missing), (1, 4), "6..=9");
        assert_eq!(c.check(10), Check::Next);
    }

    #[test]
    fn heartbeats_and_resets_move_the_position() {
        let mut c = Continuity::new(Some(5), false);
        c.skip_to(3);
        assert_eq!(c.position(), Some(5), "never back");
        c.skip_to(12);
        assert_eq!(c.position(), Some(12));
        c.reset(4);
        assert_eq!(c.position(), Some(4), "a reset may go back");
        assert_eq!(c.check(5), Check::Next);
        assert_eq!(c.stats().resets, 1);
    }
}
