//! A file's tally: which rows each stage's output really contains, as one
//! roaring bitmap per (stage, outcome), plus what the file's ingest said.
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
//!   converge on the union whatever the order;
//! - `last_time` is the latest stored time of a message that changed the
//!   tally (the time the file's counts last moved), `applied` the highest
//!   stream sequence applied per source: the position the tally reflects.
//!
//! Stored format (value of key `file.{run}.{slice}.{file}` in `{P}-recon`):
//! JSON `{"v":1,"bits":{"raw":B64,...},"ingested":{...}?,"failed":{...}?,
//! "last_time":NANOS,"applied":{"raw":SEQ,...}}`, each bitmap in roaring's
//! portable serialisation (run-optimised), base64-encoded.

use std::collections::BTreeMap;

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as B64;
use bytes::Bytes;
use finmesh_core::{Error, Result, Timestamp};
use roaring::RoaringBitmap;
use serde::{Deserialize, Serialize};

use super::time_fmt;
use crate::rowset::RowSet;

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
    pub ingested: Option<Ingested>,
    /// The ingest's failure, once its event was seen.
    pub failed: Option<Failed>,
    /// Stored time of the latest message that changed this tally.
    pub last_time: Timestamp,
    /// Highest sequence applied, per source stream name suffix.
    pub applied: BTreeMap<String, u64>,
}

#[derive(Serialize, Deserialize)]
struct Stored {
    v: u32,
    bits: BTreeMap<String, String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    ingested: Option<Ingested>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    failed: Option<Failed>,
    last_time: u64,
    #[serde(default)]
    applied: BTreeMap<String, u64>,
}

impl FileTally {
    /// Mark `row` seen in `which`; whether it was new.
    pub fn insert(&mut self, which: Counted, row: u32) -> bool {
        self.bits[which.index()].insert(row)
    }

    /// Mark every row of `rows` seen in `which`; how many were new.
    pub fn insert_rows(&mut self, which: Counted, rows: &RowSet) -> u64 {
        let bits = &mut self.bits[which.index()];
        rows.ranges().iter().map(|&(a, b)| bits.insert_range(a..=b)).sum()
    }

    /// The bitmap `which`.
    pub fn bits(&self, which: Counted) -> &RoaringBitmap {
        &self.bits[which.index()]
    }

    /// Distinct rows in `which`.
    pub fn count(&self, which: Counted) -> u64 {
        self.bits(which).len()
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

    /// Note that a message stored at `time` with sequence `seq` of
    /// `source` was applied.
    pub fn note(&mut self, source: &str, seq: u64, time: Timestamp, changed: bool) {
        match self.applied.get_mut(source) {
            Some(a) => *a = (*a).max(seq),
            None => {
                self.applied.insert(source.to_owned(), seq);
            }
        }
        if changed {
            self.last_time = self.last_time.max(time);
        }
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
        self.last_time = self.last_time.max(other.last_time);
        for (k, v) in &other.applied {
            let a = self.applied.entry(k.clone()).or_default();
            *a = (*a).max(*v);
        }
    }

    /// The stored form.
    pub fn encode(&self) -> Bytes {
        let mut bits = BTreeMap::new();
        for c in Counted::ALL {
            let mut b = self.bits(c).clone();
            if b.is_empty() {
                continue;
            }
            b.optimize();
            let mut buf = Vec::with_capacity(b.serialized_size());
            b.serialize_into(&mut buf).expect("writing to a Vec cannot fail");
            bits.insert(c.as_str().to_owned(), B64.encode(buf));
        }
        let stored = Stored {
            v: 1,
            bits,
            ingested: self.ingested.clone(),
            failed: self.failed.clone(),
            last_time: self.last_time.0,
            applied: self.applied.clone(),
        };
        Bytes::from(serde_json::to_vec(&stored).expect("a tally always serialises"))
    }

    /// Read the stored form.
    pub fn decode(bytes: &[u8]) -> Result<FileTally> {
        let bad = |what: String| Error::internal(format!("corrupt reconciliation tally: {what}"));
        let stored: Stored = serde_json::from_slice(bytes).map_err(|e| bad(e.to_string()))?;
        if stored.v != 1 {
            return Err(bad(format!("unknown version {}", stored.v)));
        }
        let mut t = FileTally {
            ingested: stored.ingested,
            failed: stored.failed,
            last_time: Timestamp(stored.last_time),
            applied: stored.applied,
            ..FileTally::default()
        };
        for (name, b64) in stored.bits {
            let c =
                Counted::ALL.into_iter().find(|c| c.as_str() == name).ok_or_else(|| bad(format!("bitmap {name}")))?;
            let raw = B64.decode(b64).map_err(|e| bad(e.to_string()))?;
            t.bits[c.index()] = RoaringBitmap::deserialize_from(&raw[..]).map_err(|e| bad(e.to_string()))?;
        }
        Ok(t)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_tally_round_trips_and_merges_by_union() {
        let mut a = FileTally::default();
        for r in 1..=100_000 {
            a.insert(Counted::Raw, r);
        }
        assert!(!a.insert(Counted::Raw, 7), "a row seen twice is not new");
        let rows = RowSet::parse("99999-100000,100002-100004").unwrap();
        assert_eq!(a.insert_rows(Counted::Raw, &rows), 3, "only rows 100002-100004 are new");
        assert_eq!(a.insert_rows(Counted::Raw, &rows), 0, "a message applied twice changes nothing");
        assert_eq!(a.count(Counted::Raw), 100_003);
        a.bits[Counted::Raw.index()].remove_range(100_001..);
        a.insert(Counted::ExcValidate, 3);
        a.note("raw", 10, Timestamp(5), true);
        let enc = a.encode();
        assert!(enc.len() < 1000, "contiguous rows compress: {} bytes", enc.len());
        assert_eq!(FileTally::decode(&enc).unwrap(), a);

        let mut b = FileTally::default();
        b.insert(Counted::Raw, 100_001);
        b.insert(Counted::Validated, 1);
        b.ingested = Some(Ingested { rows: 2, records: 2, exceptions: 0, at: Timestamp(9) });
        let mut ab = a.clone();
        ab.merge(&b);
        let mut ba = b.clone();
        ba.merge(&a);
        assert_eq!(ab, ba);
        assert_eq!(ab.count(Counted::Raw), 100_001);
        let again = ab.clone();
        ab.merge(&again);
        assert_eq!(ab, again, "merge is idempotent");
        assert_eq!(ab.final_actual(), 2);
        assert!(FileTally::decode(b"{}").unwrap_err().message().contains("corrupt"));
    }
}
