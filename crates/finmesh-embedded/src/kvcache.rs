//! The hot-value cache of KV gets: the live value of recently read keys of
//! one bucket, so a hot key is served without the two point reads of
//! `kv::get_live`.
//!
//! Bounded by bytes (`EmbeddedOptions::kv_cache_bytes`, per bucket; `0`
//! turns it off); eviction is quick_cache's CLOCK-Pro, so keys read once
//! (a random scan) do not push the hot set out.
//!
//! Invariants:
//! - an entry is the value a get would read from the store at that moment
//!   (the key's last *visible* revision, a put). Only live values are
//!   cached, never a miss; expiry (TTL) is checked on every hit against the
//!   entry's creation time, as `get_live` does.
//! - every commit of the stream removes the subjects it changes (its `l`
//!   entries) before the commit, and the reveal that shows it to readers
//!   removes them again ([`KvCache::changed`], [`KvCache::revealed`]); a
//!   purge of the whole stream clears the cache the same way. Between the
//!   two, gets read the store and find the last visible value.
//! - a get that missed inserts what it read only if no commit or reveal
//!   ran since it started ([`KvCache::ticket`] before the read, checked
//!   under [`KvCache::state`]'s lock at insert): a value read before a
//!   change is never cached after the change.
//!
//! Every change and every insert takes one short lock (`state`); hits do
//! not.

use std::sync::atomic::{AtomicU64, Ordering};

use bytes::Bytes;
use finmesh_core::{Seq, Timestamp};
use parking_lot::Mutex;

/// Per-entry bookkeeping counted against the capacity, next to the subject
/// and value bytes.
const ENTRY_OVERHEAD: u64 = 64;

/// A cached live value.
#[derive(Clone)]
pub(crate) struct Cached {
    pub seq: Seq,
    pub time: Timestamp,
    pub value: Bytes,
}

#[derive(Clone)]
struct Weigh;

impl quick_cache::Weighter<Box<str>, Cached> for Weigh {
    fn weight(&self, key: &Box<str>, val: &Cached) -> u64 {
        key.len() as u64 + val.value.len() as u64 + ENTRY_OVERHEAD
    }
}

/// What a commit not yet revealed changed.
enum Change {
    Subjects(Vec<String>),
    All,
}

struct State {
    /// Changes committed and not yet revealed, with the last sequence of
    /// their commit (reveals come in commit order).
    pending: Vec<(Seq, Change)>,
}

pub(crate) struct KvCache {
    /// `None`: turned off (capacity 0).
    map: Option<quick_cache::sync::Cache<Box<str>, Cached, Weigh>>,
    /// Bumped (under `state`) by every change and reveal; see the module doc.
    generation: AtomicU64,
    /// Held while a change or reveal removes entries and while an insert
    /// checks the generation, so the two never interleave.
    state: Mutex<State>,
}

impl KvCache {
    pub fn new(capacity_bytes: u64) -> Self {
        // An estimate for the table's initial size: values of ~256 bytes.
        let estimated = (capacity_bytes / (256 + ENTRY_OVERHEAD)).clamp(16, 1 << 20) as usize;
        let map =
            (capacity_bytes > 0).then(|| quick_cache::sync::Cache::with_weighter(estimated, capacity_bytes, Weigh));
        KvCache { map, generation: AtomicU64::new(0), state: Mutex::new(State { pending: Vec::new() }) }
    }

    pub fn enabled(&self) -> bool {
        self.map.is_some()
    }

    /// Taken before a get reads the store; pass it to [`Self::insert`].
    pub fn ticket(&self) -> u64 {
        self.generation.load(Ordering::Acquire)
    }

    pub fn get(&self, subject: &str) -> Option<Cached> {
        self.map.as_ref()?.get(subject)
    }

    /// Cache what a get read from the store, unless anything changed since
    /// it took `ticket`.
    pub fn insert(&self, ticket: u64, subject: &str, entry: Cached) {
        let Some(map) = &self.map else { return };
        let _state = self.state.lock();
        if self.generation.load(Ordering::Acquire) == ticket {
            map.insert(subject.into(), entry);
        }
    }

    /// A commit ending at `last` changes `subjects` (`None`: every subject):
    /// drop them now and again when the commit is revealed. Called before
    /// the commit.
    pub fn changed(&self, last: Seq, subjects: Option<Vec<String>>) {
        let Some(map) = &self.map else { return };
        let mut state = self.state.lock();
        self.generation.fetch_add(1, Ordering::AcqRel);
        let change = match subjects {
            Some(subjects) => {
                for s in &subjects {
                    map.remove(s.as_str());
                }
                Change::Subjects(subjects)
            }
            None => {
                map.clear();
                Change::All
            }
        };
        state.pending.push((last, change));
    }

    /// The commits up to `last` are visible now: drop what they changed
    /// again (a get between commit and reveal may have cached the value
    /// visible then). Called after the visible state moved.
    pub fn revealed(&self, last: Seq) {
        let Some(map) = &self.map else { return };
        let mut state = self.state.lock();
        if state.pending.first().is_none_or(|(s, _)| *s > last) {
            return;
        }
        self.generation.fetch_add(1, Ordering::AcqRel);
        let keep = state.pending.iter().position(|(s, _)| *s > last).unwrap_or(state.pending.len());
        for (_, change) in state.pending.drain(..keep) {
            match change {
                Change::Subjects(subjects) => {
                    for s in &subjects {
                        map.remove(s.as_str());
                    }
                }
                Change::All => map.clear(),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(seq: u64, v: &'static [u8]) -> Cached {
        Cached { seq: Seq(seq), time: Timestamp(1), value: Bytes::from_static(v) }
    }

    #[test]
    fn an_insert_after_a_change_is_dropped() {
        let c = KvCache::new(1 << 20);
        let t = c.ticket();
        c.changed(Seq(2), Some(vec!["$KV.b.other".into()]));
        c.insert(t, "$KV.b.k", entry(1, b"old"));
        assert!(c.get("$KV.b.k").is_none(), "read before a change, cached after it");
        let t = c.ticket();
        c.insert(t, "$KV.b.k", entry(1, b"old"));
        assert_eq!(c.get("$KV.b.k").unwrap().value, Bytes::from_static(b"old"));
    }

    #[test]
    fn a_reveal_drops_what_its_commit_changed_and_keeps_later_commits_pending() {
        let c = KvCache::new(1 << 20);
        c.changed(Seq(5), Some(vec!["$KV.b.a".into()]));
        c.changed(Seq(7), Some(vec!["$KV.b.b".into()]));
        // Cached between commit and reveal (the old visible values).
        for k in ["$KV.b.a", "$KV.b.b"] {
            c.insert(c.ticket(), k, entry(1, b"old"));
        }
        c.revealed(Seq(5));
        assert!(c.get("$KV.b.a").is_none());
        assert!(c.get("$KV.b.b").is_some(), "its commit is not visible yet");
        let t = c.ticket();
        c.revealed(Seq(7));
        assert!(c.get("$KV.b.b").is_none());
        c.insert(t, "$KV.b.b", entry(1, b"old"));
        assert!(c.get("$KV.b.b").is_none(), "read before the reveal");
    }

    #[test]
    fn a_purge_clears_everything_at_commit_and_reveal() {
        let c = KvCache::new(1 << 20);
        c.insert(c.ticket(), "$KV.b.a", entry(1, b"v"));
        c.changed(Seq(1), None);
        assert!(c.get("$KV.b.a").is_none());
        c.insert(c.ticket(), "$KV.b.a", entry(1, b"v"));
        c.revealed(Seq(1));
        assert!(c.get("$KV.b.a").is_none());
    }

    #[test]
    fn capacity_bounds_the_bytes_and_zero_turns_it_off() {
        let c = KvCache::new(64 * 1024);
        for i in 0..10_000 {
            c.insert(c.ticket(), &format!("$KV.b.k{i}"), entry(i, &[0; 200]));
        }
        let held = (0..10_000).filter(|i| c.get(&format!("$KV.b.k{i}")).is_some()).count();
        assert!(held > 0 && held * 200 <= 64 * 1024, "{held} entries held");
        let off = KvCache::new(0);
        off.insert(off.ticket(), "$KV.b.a", entry(1, b"v"));
        assert!(!off.enabled() && off.get("$KV.b.a").is_none());
    }
}
