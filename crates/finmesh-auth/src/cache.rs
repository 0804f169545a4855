//! A bounded cache of verified tokens, so that a client sending the same
//! bearer token on every request pays for signature verification once.
//!
//! Invariants:
//! - the key is the complete token text (header, claims and signature): a
//!   hit means these exact bytes verified before, under this authenticator's
//!   keys and rules; nothing is cached for a refused token;
//! - an entry is used only while `now <= exp + leeway`, the same instant at
//!   which verification would start refusing the token; `nbf` needs no check
//!   because a token is cached only once it is valid;
//! - memory is bounded: [`SHARDS`] shards of at most `capacity / SHARDS`
//!   entries, tokens longer than [`MAX_CACHED_TOKEN_LEN`] are not cached; a
//!   full shard drops its expired entries, and if none expired, all of them;
//! - lookups hash the token with foldhash (seeded at random per cache and
//!   per shard; SipHash over a 300-byte token weighed as much in a profile as the rest of the
//!   lookup): only tokens that verified are ever inserted, so a client cannot
//!   choose colliding keys to slow a shard down;
//! - each shard has its own short lock, held only for a lookup or insert
//!   (no I/O, no verification under it).

use std::collections::HashMap;
use std::hash::BuildHasher;

use foldhash::quality::RandomState;

use parking_lot::Mutex;

use crate::Principal;

/// Number of independently locked shards.
pub const SHARDS: usize = 16;
/// Longest token cached, in bytes.
pub const MAX_CACHED_TOKEN_LEN: usize = 4096;

#[derive(Debug)]
struct Entry {
    principal: Principal,
    /// Last second (Unix time) at which the token is still accepted.
    valid_until: u64,
}

/// Token bytes → entry.
type Shard = HashMap<Box<[u8]>, Entry, RandomState>;

#[derive(Debug)]
pub(crate) struct TokenCache {
    shards: Vec<Mutex<Shard>>,
    per_shard: usize,
    hasher: RandomState,
}

impl TokenCache {
    /// A cache of about `capacity` tokens; 0 disables it.
    pub(crate) fn new(capacity: usize) -> Self {
        let per_shard = capacity.div_ceil(SHARDS);
        let shards = if capacity == 0 { vec![] } else { (0..SHARDS).map(|_| Mutex::default()).collect() };
        Self { shards, per_shard, hasher: RandomState::default() }
    }

    fn shard(&self, token: &[u8]) -> Option<&Mutex<Shard>> {
        if self.shards.is_empty() || token.len() > MAX_CACHED_TOKEN_LEN {
            return None;
        }
        let i = self.hasher.hash_one(token) as usize % self.shards.len();
        self.shards.get(i)
    }

    /// The principal of a token verified before and still valid at `now`.
    pub(crate) fn get(&self, token: &[u8], now: u64) -> Option<Principal> {
        let mut shard = self.shard(token)?.lock();
        match shard.get(token) {
            Some(e) if now <= e.valid_until => Some(e.principal.clone()),
            Some(_) => {
                shard.remove(token);
                None
            }
            None => None,
        }
    }

    /// Remember a verified token until `valid_until` (Unix seconds).
    pub(crate) fn insert(&self, token: &[u8], principal: &Principal, valid_until: u64, now: u64) {
        let Some(shard) = self.shard(token) else { return };
        let mut shard = shard.lock();
        if shard.len() >= self.per_shard {
            shard.retain(|_, e| now <= e.valid_until);
            if shard.len() >= self.per_shard {
                shard.clear();
            }
        }
        shard.insert(token.into(), Entry { principal: principal.clone(), valid_until });
    }

    #[cfg(test)]
    fn len(&self) -> usize {
        self.shards.iter().map(|s| s.lock().len()).sum()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hit_until_valid_until_then_gone() {
        let c = TokenCache::new(64);
        let p = Principal::new("a", vec!["admin".into()]);
        assert!(c.get(b"t", 100).is_none());
        c.insert(b"t", &p, 110, 100);
        assert_eq!(c.get(b"t", 110), Some(p));
        assert!(c.get(b"t", 111).is_none());
        assert_eq!(c.len(), 0, "an expired entry is dropped on lookup");
    }

    #[test]
    fn bounded_and_disabled() {
        let c = TokenCache::new(32);
        let p = Principal::new("a", vec![]);
        for i in 0..10_000 {
            c.insert(format!("token-{i}").as_bytes(), &p, 1_000, 0);
        }
        assert!(c.len() <= 32, "{}", c.len());
        let long = vec![b'x'; MAX_CACHED_TOKEN_LEN + 1];
        c.insert(&long, &p, 1_000, 0);
        assert!(c.get(&long, 0).is_none());
        let off = TokenCache::new(0);
        off.insert(b"t", &p, 1_000, 0);
        assert!(off.get(b"t", 0).is_none());
    }

    #[test]
    fn full_shard_drops_expired_entries_first() {
        let c = TokenCache::new(SHARDS); // one entry per shard
        let p = Principal::new("a", vec![]);
        c.insert(b"old", &p, 5, 0);
        // Whatever shard "new" lands in, inserting at now = 10 keeps it.
        c.insert(b"new", &p, 100, 10);
        assert!(c.get(b"new", 10).is_some());
        assert!(c.get(b"old", 10).is_none());
    }
}
