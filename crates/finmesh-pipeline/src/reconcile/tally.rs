//! A file's tally: which rows each stage's output really contains, as one
//! roaring bitmap per (stage, outcome), plus what the file's ingest said,
//! and its stored form split into shards of rows so that no stored value
//! outgrows an engine's value limit, whatever the file's size and pattern.
//!
//! Invariants:
//! - a row is a bit: applying the same record twice (a redelivery, a
//!   duplicate published after the dedup window, a replay after a crash)
//!   sets a bit that is already set and changes nothing; a message of many
//!   rows sets their bits by ranges ([`FileTally::insert_rows`]), and two
//!   messages that overlap (a stage's output holds a subset of its input's
//!   rows) only set each row's bit once;
//! - tallies only grow, and two tallies of the same file merge by union
//!   ([`FileTally::merge`]), which is commutative, associative and
//!   idempotent: two reconcilers writing the same file by compare-and-set
//!   converge on the union whatever the order; this holds shard by shard,
//!   since shards hold disjoint rows;
//! - shard `n` holds rows `[n·2^19, (n+1)·2^19)` ([`shard_of`]); every
//!   shard has its own time, the latest stored time of a message that
//!   changed it (shard 0's also moves with the file's events);
//!   [`FileTally::last_time`], the time the file's counts last moved, is
//!   the latest of them; `applied` is the highest stream sequence applied
//!   per source, as of the head's last write (informational);
//! - an ingest failure's reason is at most [`MAX_REASON_BYTES`].
//!
//! Stored form (in `{P}-recon`, keys in [`super::names::FileRef`]): one
//! **head** at `file.{run}.{slice}.{file}` holding shard 0 and everything
//! that is not a row (ingest, failure, `applied`, the list of other
//! shards), and one **part** per other non-empty shard at
//! `part.{run}.{slice}.{file}.{n}`. Each value is JSON, each bitmap in
//! roaring's portable serialisation (run-optimised), base64-encoded:
//! - head, `v:1` (no other shard; exactly the format of before shards, so
//!   an older binary still reads a file whose rows are all below 2^19):
//!   `{"v":1,"bits":{"raw":B64,...},"ingested":{...}?,"failed":{...}?,
//!   "last_time":NANOS,"applied":{"raw":SEQ,...}}`; when *read*, a `v:1`
//!   value may hold rows of any shard (stored before shards existed), and
//!   they are moved into parts at the next write;
//! - head, `v:2` (other shards exist): the same plus `"parts":[n,...]`,
//!   the non-empty shards `n ≥ 1` (an older binary refuses `v:2` instead
//!   of under-counting);
//! - part: `{"v":2,"part":n,"bits":{...},"last_time":NANOS}`, rows of
//!   shard `n` only.
//!
//! Size bound (checked by a test against a worst case): a roaring
//! container covers 2^16 rows and serialises, run-optimised, to at most
//! 8 KiB, so one bitmap of a shard (8 containers) is at most 65,609 bytes
//! with its header, six are 393,654, 524,880 in base64. Add the JSON
//! names, a reason of [`MAX_REASON_BYTES`] (escaped, at most 6× longer)
//! and a list of all 8,191 other shards: every stored value is below
//! [`MAX_STORED_BYTES`] (640 KiB), under NATS's default `max_payload`
//! (1 MiB) and the embedded engine's value limit (8 MiB).

use std::collections::{BTreeMap, BTreeSet};
use std::ops::RangeInclusive;

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as B64;
use bytes::Bytes;
use finmesh_core::{Error, Result, Timestamp};
use roaring::RoaringBitmap;
use serde::{Deserialize, Serialize};

use super::time_fmt;
use crate::rowset::RowSet;

/// Rows per shard, as a power of two: 2^19 = 524,288 rows.
pub const SHARD_ROWS_LOG2: u32 = 19;
/// Shards of the row space (`u32` rows): 8,192.
pub const SHARDS: u32 = 1 << (32 - SHARD_ROWS_LOG2);
/// Longest ingest-failure reason kept, in bytes (a longer one is cut at a
/// character boundary).
pub const MAX_REASON_BYTES: usize = 4096;
/// Largest stored value of a tally (head or part), whatever its rows (see
/// the module doc).
pub const MAX_STORED_BYTES: usize = 640 * 1024;
const _: () = assert!(MAX_STORED_BYTES < 1024 * 1024, "under NATS's default max_payload");
const _: () = assert!(MAX_STORED_BYTES < finmesh_core::config::MAX_PAYLOAD_LIMIT as usize, "under any engine's limit");

/// The shard of `row`.
pub fn shard_of(row: u32) -> u32 {
    row >> SHARD_ROWS_LOG2
}

/// The rows of shard `n`.
pub fn shard_rows(n: u32) -> RangeInclusive<u32> {
    debug_assert!(n < SHARDS);
    let lo = n << SHARD_ROWS_LOG2;
    lo..=lo | ((1 << SHARD_ROWS_LOG2) - 1)
}

/// Which bitmap a row lands in.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Counted {
    /// A record on `raw`.
    Raw,
    /// A record on `enriched`.
    Enriched,
    /// A record on `validated`.
    Validated,
    /// An exception raised at ingest.
    ExcIngest,
    /// An exception raised by enrichment.
    ExcEnrich,
    /// An exception raised by validation.
    ExcValidate,
}

impl Counted {
    /// Every bitmap.
    pub const ALL: [Counted; 6] = [
        Counted::Raw,
        Counted::Enriched,
        Counted::Validated,
        Counted::ExcIngest,
        Counted::ExcEnrich,
        Counted::ExcValidate,
    ];

    fn as_str(self) -> &'static str {
        match self {
            Counted::Raw => "raw",
            Counted::Enriched => "enriched",
            Counted::Validated => "validated",
            Counted::ExcIngest => "exc_ingest",
            Counted::ExcEnrich => "exc_enrich",
            Counted::ExcValidate => "exc_validate",
        }
    }

    fn index(self) -> usize {
        self as usize
    }

    /// The bitmap of an exception raised at `stage` (contract: `ingest`,
    /// `enrich`, `validate`).
    pub fn exception(stage: &str) -> Option<Counted> {
        match stage {
            "ingest" => Some(Counted::ExcIngest),
            "enrich" => Some(Counted::ExcEnrich),
            "validate" => Some(Counted::ExcValidate),
            _ => None,
        }
    }
}

/// What a file's `file_ingested` event said.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Ingested {
    /// Data rows: the file's expected count (validated + exceptions).
    pub rows: u64,
    /// Rows that became records on `raw`.
    pub records: u64,
    /// Rows that became exceptions at ingest.
    pub exceptions: u64,
    /// When the ingest ended (the event's `at`).
    #[serde(with = "time_fmt")]
    pub at: Timestamp,
}

/// What a file's `file_failed` event said.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Failed {
    /// The reason the ingest gave.
    pub reason: String,
    /// When the event was stored.
    #[serde(with = "time_fmt")]
    pub at: Timestamp,
}

/// The tally of one file (see the module doc).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct FileTally {
    bits: [RoaringBitmap; 6],
    /// The ingest's end, once its event was seen.
    ingested: Option<Ingested>,
    /// The ingest's failure, once its event was seen.
    failed: Option<Failed>,
    /// Per shard, the stored time of the latest message that changed it.
    times: BTreeMap<u32, Timestamp>,
    /// Highest sequence applied, per source stream name suffix.
    applied: BTreeMap<String, u64>,
}

/// One stored value: a head (`part` absent) or a part.
#[derive(Serialize, Deserialize)]
struct Stored {
    v: u32,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    part: Option<u32>,
    bits: BTreeMap<String, String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    ingested: Option<Ingested>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    failed: Option<Failed>,
    last_time: u64,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    applied: BTreeMap<String, u64>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    parts: Vec<u32>,
}

fn corrupt(what: impl std::fmt::Display) -> Error {
    Error::internal(format!("corrupt reconciliation tally: {what}"))
}

/// `reason` cut to [`MAX_REASON_BYTES`] at a character boundary.
fn clip_reason(mut f: Failed) -> Failed {
    if f.reason.len() > MAX_REASON_BYTES {
        let mut end = MAX_REASON_BYTES;
        while !f.reason.is_char_boundary(end) {
            end -= 1;
        }
        f.reason.truncate(end);
    }
    f
}

impl FileTally {
    /// Mark rows `range` seen in `which` by a message stored at `time`;
    /// the shards that gained a row (empty: nothing was new).
    pub fn insert_range(&mut self, which: Counted, range: RangeInclusive<u32>, time: Timestamp) -> BTreeSet<u32> {
        let mut changed = BTreeSet::new();
        let (mut lo, hi) = (*range.start(), *range.end());
        while lo <= hi {
            let n = shard_of(lo);
            let end = hi.min(*shard_rows(n).end());
            if self.bits[which.index()].insert_range(lo..=end) > 0 {
                self.touch(n, time);
                changed.insert(n);
            }
            match end.checked_add(1) {
                Some(next) => lo = next,
                None => break,
            }
        }
        changed
    }

    /// Mark every row of `rows` seen in `which` by a message stored at
    /// `time`; the shards that gained a row (empty: nothing was new).
    pub fn insert_rows(&mut self, which: Counted, rows: &RowSet, time: Timestamp) -> BTreeSet<u32> {
        let mut changed = BTreeSet::new();
        for &(a, b) in rows.ranges() {
            changed.extend(self.insert_range(which, a..=b, time));
        }
        changed
    }

    /// Record the ingest's end (an event stored at `time`); whether it is
    /// new (the first one seen wins).
    pub fn end_ingest(&mut self, ingested: Ingested, time: Timestamp) -> bool {
        if self.ingested.is_some() {
            return false;
        }
        self.ingested = Some(ingested);
        self.touch(0, time);
        true
    }

    /// Record the ingest's failure (an event stored at `time`); whether it
    /// is new (the first one seen wins). A reason longer than
    /// [`MAX_REASON_BYTES`] is cut.
    pub fn fail_ingest(&mut self, failed: Failed, time: Timestamp) -> bool {
        if self.failed.is_some() {
            return false;
        }
        self.failed = Some(clip_reason(failed));
        self.touch(0, time);
        true
    }

    /// Note that the message of sequence `seq` of `source` was applied.
    pub fn note(&mut self, source: &str, seq: u64) {
        match self.applied.get_mut(source) {
            Some(a) => *a = (*a).max(seq),
            None => {
                self.applied.insert(source.to_owned(), seq);
            }
        }
    }

    fn touch(&mut self, shard: u32, time: Timestamp) {
        if time == Timestamp(0) {
            return; // as stored: a time of 0 is no time
        }
        let t = self.times.entry(shard).or_default();
        *t = (*t).max(time);
    }

    /// The bitmap `which`.
    pub fn bits(&self, which: Counted) -> &RoaringBitmap {
        &self.bits[which.index()]
    }

    /// Distinct rows in `which`.
    pub fn count(&self, which: Counted) -> u64 {
        self.bits(which).len()
    }

    /// What the file's `file_ingested` event said, once seen.
    pub fn ingested(&self) -> Option<&Ingested> {
        self.ingested.as_ref()
    }

    /// What the file's `file_failed` event said, once seen.
    pub fn failed(&self) -> Option<&Failed> {
        self.failed.as_ref()
    }

    /// Highest sequence applied, per source stream name suffix.
    pub fn applied(&self) -> &BTreeMap<String, u64> {
        &self.applied
    }

    /// Stored time of the latest message that changed this tally.
    pub fn last_time(&self) -> Timestamp {
        self.times.values().copied().max().unwrap_or_default()
    }

    /// The stored time of the latest message that changed shard `n`.
    pub fn shard_time(&self, n: u32) -> Timestamp {
        self.times.get(&n).copied().unwrap_or_default()
    }

    /// Distinct rows in all three exception bitmaps.
    pub fn exceptions(&self) -> RoaringBitmap {
        self.bits(Counted::ExcIngest) | self.bits(Counted::ExcEnrich) | self.bits(Counted::ExcValidate)
    }

    /// Enrichment's actual count: distinct rows enriched or sent to
    /// exceptions by enrichment.
    pub fn enriched_actual(&self) -> u64 {
        self.bits(Counted::Enriched).union_len(self.bits(Counted::ExcEnrich))
    }

    /// The end's actual count: distinct rows validated or in exceptions.
    pub fn final_actual(&self) -> u64 {
        self.bits(Counted::Validated).union_len(&self.exceptions())
    }

    /// The shards `n ≥ 1` with a row: the parts the head lists.
    pub fn parts(&self) -> BTreeSet<u32> {
        let mut parts = BTreeSet::new();
        for b in &self.bits {
            let (Some(min), Some(max)) = (b.min(), b.max()) else { continue };
            for n in shard_of(min).max(1)..=shard_of(max) {
                if !parts.contains(&n) && b.range_cardinality(shard_rows(n)) > 0 {
                    parts.insert(n);
                }
            }
        }
        parts
    }

    /// Rows of shard `n` over all six bitmaps (a bitmap's rows counted
    /// once per bitmap that has them).
    pub fn shard_len(&self, n: u32) -> u64 {
        self.bits.iter().map(|b| b.range_cardinality(shard_rows(n))).sum()
    }

    /// Union with `other` (see the module doc).
    pub fn merge(&mut self, other: &FileTally) {
        for (a, b) in self.bits.iter_mut().zip(&other.bits) {
            *a |= b;
        }
        if self.ingested.is_none() {
            self.ingested.clone_from(&other.ingested);
        }
        if self.failed.is_none() {
            self.failed.clone_from(&other.failed);
        }
        for (&n, &t) in &other.times {
            self.touch(n, t);
        }
        for (k, v) in &other.applied {
            let a = self.applied.entry(k.clone()).or_default();
            *a = (*a).max(*v);
        }
    }

    /// The six bitmaps restricted to shard `n`, encoded.
    fn encode_bits(&self, n: u32) -> BTreeMap<String, String> {
        let mut window = RoaringBitmap::new();
        window.insert_range(shard_rows(n));
        let mut bits = BTreeMap::new();
        for c in Counted::ALL {
            let mut b = self.bits(c) & &window;
            if b.is_empty() {
                continue;
            }
            b.optimize();
            let mut buf = Vec::with_capacity(b.serialized_size());
            b.serialize_into(&mut buf).expect("writing to a Vec cannot fail");
            bits.insert(c.as_str().to_owned(), B64.encode(buf));
        }
        bits
    }

    fn to_bytes(stored: &Stored) -> Bytes {
        let bytes = serde_json::to_vec(stored).expect("a tally always serialises");
        debug_assert!(bytes.len() <= MAX_STORED_BYTES, "a stored tally value of {} bytes", bytes.len());
        Bytes::from(bytes)
    }

    /// The head's stored form: shard 0, the file's events, `applied` and
    /// the list of [`parts`](Self::parts) (`v:1` when there is none).
    pub fn encode_head(&self) -> Bytes {
        let parts: Vec<u32> = self.parts().into_iter().collect();
        FileTally::to_bytes(&Stored {
            v: if parts.is_empty() { 1 } else { 2 },
            part: None,
            bits: self.encode_bits(0),
            ingested: self.ingested.clone(),
            failed: self.failed.clone(),
            last_time: self.shard_time(0).0,
            applied: self.applied.clone(),
            parts,
        })
    }

    /// The stored form of part `n` (`n ≥ 1`): its rows and its time.
    pub fn encode_part(&self, n: u32) -> Bytes {
        debug_assert!((1..SHARDS).contains(&n), "part {n}");
        FileTally::to_bytes(&Stored {
            v: 2,
            part: Some(n),
            bits: self.encode_bits(n),
            ingested: None,
            failed: None,
            last_time: self.shard_time(n).0,
            applied: BTreeMap::new(),
            parts: Vec::new(),
        })
    }

    fn decode_bits(&mut self, bits: BTreeMap<String, String>) -> Result<()> {
        for (name, b64) in bits {
            let c = Counted::ALL
                .into_iter()
                .find(|c| c.as_str() == name)
                .ok_or_else(|| corrupt(format!("bitmap {name}")))?;
            let raw = B64.decode(b64).map_err(corrupt)?;
            self.bits[c.index()] = RoaringBitmap::deserialize_from(&raw[..]).map_err(corrupt)?;
        }
        Ok(())
    }

    /// Read a head: the tally it holds and the parts it lists. A `v:1`
    /// head lists none and may hold rows of any shard.
    pub fn decode_head(bytes: &[u8]) -> Result<(FileTally, BTreeSet<u32>)> {
        let stored: Stored = serde_json::from_slice(bytes).map_err(corrupt)?;
        match (stored.v, stored.part) {
            (1 | 2, None) => {}
            (1 | 2, Some(n)) => return Err(corrupt(format!("part {n} where the head was expected"))),
            (v, _) => return Err(corrupt(format!("unknown version {v}"))),
        }
        if stored.v == 1 && !stored.parts.is_empty() {
            return Err(corrupt("a v:1 head lists parts"));
        }
        let parts: BTreeSet<u32> = stored.parts.into_iter().collect();
        if let Some(bad) = parts.iter().find(|&&n| n == 0 || n >= SHARDS) {
            return Err(corrupt(format!("head lists part {bad}")));
        }
        let mut t = FileTally {
            ingested: stored.ingested,
            failed: stored.failed.map(clip_reason),
            applied: stored.applied,
            ..FileTally::default()
        };
        t.decode_bits(stored.bits)?;
        if stored.v == 2 && t.bits.iter().any(|b| b.max().is_some_and(|m| shard_of(m) != 0)) {
            return Err(corrupt("a v:2 head holds rows beyond shard 0"));
        }
        if stored.last_time != 0 {
            t.times.insert(0, Timestamp(stored.last_time));
        }
        Ok((t, parts))
    }

    /// Read part `n`: a tally holding its rows and its time only.
    pub fn decode_part(n: u32, bytes: &[u8]) -> Result<FileTally> {
        let stored: Stored = serde_json::from_slice(bytes).map_err(corrupt)?;
        if stored.v != 2 {
            return Err(corrupt(format!("unknown version {} of part {n}", stored.v)));
        }
        if stored.part != Some(n) {
            return Err(corrupt(format!("part {n} says it is {:?}", stored.part)));
        }
        let mut t = FileTally::default();
        t.decode_bits(stored.bits)?;
        let rows = shard_rows(n);
        if t.bits.iter().any(|b| b.min().is_some_and(|m| m < *rows.start()) || b.max().is_some_and(|m| m > *rows.end()))
        {
            return Err(corrupt(format!("part {n} holds rows of another shard")));
        }
        if stored.last_time != 0 {
            t.times.insert(n, Timestamp(stored.last_time));
        }
        Ok(t)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rows(text: &str) -> RowSet {
        RowSet::parse(text).unwrap()
    }

    /// Head and parts decoded and merged back into one tally.
    fn round_trip(t: &FileTally) -> FileTally {
        let (mut back, parts) = FileTally::decode_head(&t.encode_head()).unwrap();
        assert_eq!(parts, t.parts());
        for n in parts {
            back.merge(&FileTally::decode_part(n, &t.encode_part(n)).unwrap());
        }
        back
    }

    #[test]
    fn a_tally_round_trips_and_merges_by_union() {
        let mut a = FileTally::default();
        assert_eq!(a.insert_range(Counted::Raw, 1..=100_000, Timestamp(5)), BTreeSet::from([0]));
        assert!(a.insert_rows(Counted::Raw, &rows("7"), Timestamp(6)).is_empty(), "a row seen twice is not new");
        let r = rows("99999-100000,100002-100004");
        assert_eq!(a.insert_rows(Counted::Raw, &r, Timestamp(5)), BTreeSet::from([0]));
        assert!(a.insert_rows(Counted::Raw, &r, Timestamp(7)).is_empty(), "a message applied twice changes nothing");
        assert_eq!(a.count(Counted::Raw), 100_003);
        assert_eq!(a.last_time(), Timestamp(5), "only a change moves the time");
        a.insert_rows(Counted::ExcValidate, &rows("3"), Timestamp(4));
        a.note("raw", 10);
        let enc = a.encode_head();
        assert!(enc.len() < 1000, "contiguous rows compress: {} bytes", enc.len());
        assert!(enc.starts_with(b"{\"v\":1,"), "a file within shard 0 keeps the v:1 format");
        assert_eq!(round_trip(&a), a);

        let mut b = FileTally::default();
        b.insert_rows(Counted::Raw, &rows("100005"), Timestamp(8));
        b.insert_rows(Counted::Validated, &rows("1"), Timestamp(8));
        assert!(b.end_ingest(Ingested { rows: 2, records: 2, exceptions: 0, at: Timestamp(9) }, Timestamp(9)));
        assert!(!b.end_ingest(Ingested { rows: 3, records: 3, exceptions: 0, at: Timestamp(10) }, Timestamp(10)));
        let mut ab = a.clone();
        ab.merge(&b);
        let mut ba = b.clone();
        ba.merge(&a);
        assert_eq!(ab, ba);
        assert_eq!(ab.count(Counted::Raw), 100_004);
        assert_eq!(ab.last_time(), Timestamp(9));
        let again = ab.clone();
        ab.merge(&again);
        assert_eq!(ab, again, "merge is idempotent");
        assert_eq!(ab.final_actual(), 2);
        assert!(FileTally::decode_head(b"{}").unwrap_err().message().contains("corrupt"));
    }

    #[test]
    fn rows_beyond_shard_0_go_to_parts_with_their_own_time() {
        let mut t = FileTally::default();
        let s = 1u32 << SHARD_ROWS_LOG2;
        // One range across three shards: each shard it reaches gains rows.
        assert_eq!(t.insert_range(Counted::Raw, s - 2..=2 * s + 1, Timestamp(10)), BTreeSet::from([0, 1, 2]));
        assert_eq!(t.insert_range(Counted::Raw, s..=2 * s, Timestamp(11)), BTreeSet::new());
        assert_eq!(t.insert_range(Counted::Enriched, 5 * s + 7..=5 * s + 7, Timestamp(12)), BTreeSet::from([5]));
        assert_eq!(
            t.insert_range(Counted::ExcValidate, u32::MAX..=u32::MAX, Timestamp(3)),
            BTreeSet::from([SHARDS - 1])
        );
        assert!(t.fail_ingest(Failed { reason: "é".repeat(MAX_REASON_BYTES), at: Timestamp(2) }, Timestamp(2)));
        assert_eq!(t.failed().unwrap().reason.len(), MAX_REASON_BYTES, "cut at a character boundary");
        assert_eq!(t.parts(), BTreeSet::from([1, 2, 5, SHARDS - 1]));
        assert_eq!(
            (t.shard_time(0), t.shard_time(1), t.shard_time(5), t.last_time()),
            (Timestamp(10), Timestamp(10), Timestamp(12), Timestamp(12))
        );
        assert!(t.encode_head().starts_with(b"{\"v\":2,"));
        let part = FileTally::decode_part(5, &t.encode_part(5)).unwrap();
        assert_eq!((part.count(Counted::Enriched), part.count(Counted::Raw), part.last_time()), (1, 0, Timestamp(12)));
        assert_eq!(round_trip(&t), t);

        // A part is checked against its key.
        assert!(FileTally::decode_part(4, &t.encode_part(5)).unwrap_err().message().contains("says it is"));
        let e = FileTally::decode_head(&t.encode_part(5)).unwrap_err();
        assert!(e.message().contains("where the head was expected"), "{e}");
        let forged = String::from_utf8(t.encode_part(5).to_vec()).unwrap().replace("\"part\":5", "\"part\":6");
        assert!(FileTally::decode_part(6, forged.as_bytes()).unwrap_err().message().contains("another shard"));
        let future = String::from_utf8(t.encode_head().to_vec()).unwrap().replace("\"v\":2", "\"v\":3");
        assert!(FileTally::decode_head(future.as_bytes()).unwrap_err().message().contains("unknown version 3"));
    }

    /// A head written before shards existed (`v:1`, rows of any shard in
    /// one value) is read whole; its rows beyond shard 0 become parts.
    #[test]
    fn a_v1_tally_of_before_shards_is_read_whole() {
        let mut raw = RoaringBitmap::new();
        raw.insert_range(1..=1_000_000);
        let mut exc = RoaringBitmap::new();
        exc.insert(2_000_000);
        let b64 = |b: &RoaringBitmap| {
            let mut buf = Vec::new();
            b.serialize_into(&mut buf).unwrap();
            B64.encode(buf)
        };
        let v1 = serde_json::json!({
            "v": 1,
            "bits": {"raw": b64(&raw), "exc_ingest": b64(&exc)},
            "ingested": {"rows": 1_000_001, "records": 1_000_000, "exceptions": 1, "at": "2026-01-01T00:00:00Z"},
            "last_time": 77,
            "applied": {"raw": 12, "events": 3},
        });
        let (t, parts) = FileTally::decode_head(&serde_json::to_vec(&v1).unwrap()).unwrap();
        assert!(parts.is_empty(), "a v:1 head lists no part");
        assert_eq!((t.count(Counted::Raw), t.count(Counted::ExcIngest)), (1_000_000, 1));
        assert_eq!((t.ingested().unwrap().rows, t.last_time(), t.applied()["raw"]), (1_000_001, Timestamp(77), 12));
        assert_eq!(t.parts(), BTreeSet::from([1, 3]), "rows 524,288.. and 2,000,000 belong to parts");
        assert_eq!(round_trip(&t), t, "written again as a v:2 head and its parts, nothing lost");
    }

    /// The bound of the module doc, against the worst case: every other
    /// row of a full shard set in all six bitmaps (a bitmap container per
    /// 2^16 rows, no run helps), the longest reason made of characters
    /// JSON escapes six-fold, every other shard listed, every source noted.
    #[test]
    fn no_stored_value_outgrows_the_bound_whatever_the_rows() {
        let every_other = |t: &mut FileTally, n: u32| {
            for c in Counted::ALL {
                t.bits[c.index()].extend(shard_rows(n).step_by(2));
            }
            t.touch(n, Timestamp(u64::MAX));
        };
        let mut t = FileTally::default();
        every_other(&mut t, 0);
        every_other(&mut t, SHARDS - 1);
        for n in 1..SHARDS {
            t.insert_range(Counted::Raw, *shard_rows(n).start()..=*shard_rows(n).start(), Timestamp(1));
        }
        t.fail_ingest(Failed { reason: "\u{1}".repeat(2 * MAX_REASON_BYTES), at: Timestamp(u64::MAX) }, Timestamp(1));
        t.end_ingest(
            Ingested { rows: u64::MAX, records: u64::MAX, exceptions: u64::MAX, at: Timestamp(u64::MAX) },
            Timestamp(1),
        );
        for s in ["raw", "enriched", "validated", "exceptions", "events"] {
            t.note(s, u64::MAX);
        }
        assert_eq!(t.parts().len() as u32, SHARDS - 1);
        let head = t.encode_head();
        let last = t.encode_part(SHARDS - 1);
        for (what, len) in [("head", head.len()), ("part", last.len())] {
            eprintln!("worst-case {what}: {len} bytes");
            assert!(len <= MAX_STORED_BYTES, "{what}: {len} bytes, over the bound (itself under 1 MiB and 8 MiB)");
            assert!(len > 520_000, "{what}: {len} bytes: not the worst case");
        }
        assert_eq!(round_trip(&t), t);
    }
}
