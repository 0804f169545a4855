//! The rows a record message carries: the `Finmesh-Rows` and
//! `Finmesh-Lines` headers and the payload's framing.
//!
//! A record message on `raw`, `enriched` or `validated` carries the records
//! of up to [`MAX_MESSAGE_ROWS`] rows of one file (docs/pipeline.md,
//! "Streams and messages"):
//! - [`HDR_ROWS`] lists the rows, ascending, as comma-separated ranges
//!   `a-b` (inclusive) or single rows `a`, disjoint and not adjacent
//!   (`1-37,39-500`); rows are `1..=u32::MAX`. Bound: at most
//!   [`MAX_MESSAGE_ROWS`] rows, and at most 11 bytes per row (a lone
//!   10-digit row and its comma; a range covers at least two rows in at
//!   most 22 bytes): 45,056 bytes in the worst case, a few bytes in the
//!   usual one. [`RowSet`] parses and writes it; a reader counts rows from it
//!   without touching the payload.
//! - [`HDR_LINES`] gives each row's physical line as steps `row+offset`,
//!   ascending by row: the line of row `r` is `r + offset` of the last step
//!   at or before `r` (a file with a header and no multi-line field is one
//!   step, `1+1`). At most one step per row. [`LineMap`].
//! - The payload is, for each row of [`HDR_ROWS`] in that order, the
//!   row's Avro datum as an Avro `bytes` value: its length as a zigzag
//!   varint `long`, then the datum. [`push_frame`] writes one,
//!   [`split_frames`] reads them back (checking there is exactly one per
//!   row).
//!
//! A message without [`HDR_ROWS`] is a single-row message (the format
//! before batching, still read everywhere): its row is the `Finmesh-Row`
//! header and its payload the bare datum.
//!
//! Invariants: a [`RowSet`] is never empty, its ranges are sorted,
//! disjoint and not adjacent, and it holds at most [`MAX_MESSAGE_ROWS`]
//! rows; parsing accepts exactly the canonical text that `Display` writes.

use std::fmt;

use bytes::{BufMut, Bytes, BytesMut};
use finmesh_core::{Error, Result};

/// Header: the rows a record message carries, as ranges.
pub const HDR_ROWS: &str = "Finmesh-Rows";
/// Header: the physical lines of those rows, as `row+offset` steps.
pub const HDR_LINES: &str = "Finmesh-Lines";
/// Most rows one record message may carry.
pub const MAX_MESSAGE_ROWS: usize = 4096;

/// A non-empty, sorted set of rows (see the module doc).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RowSet {
    /// Inclusive ranges, sorted, disjoint, not adjacent.
    ranges: Vec<(u32, u32)>,
    len: u64,
}

impl RowSet {
    /// One row.
    pub fn single(row: u32) -> Result<RowSet> {
        RowSet::from_sorted([row])
    }

    /// The rows of `rows`, which must be strictly ascending, at least one
    /// and at most [`MAX_MESSAGE_ROWS`], each at least 1.
    pub fn from_sorted(rows: impl IntoIterator<Item = u32>) -> Result<RowSet> {
        let mut ranges: Vec<(u32, u32)> = Vec::new();
        let mut len = 0u64;
        for row in rows {
            if row == 0 {
                return Err(Error::invalid("row 0 is the header, not a data row"));
            }
            match ranges.last_mut() {
                Some((_, end)) if row <= *end => {
                    return Err(Error::invalid(format!("rows must ascend: {row} after {end}")));
                }
                Some((_, end)) if row == *end + 1 => *end = row,
                _ => ranges.push((row, row)),
            }
            len += 1;
            if len > MAX_MESSAGE_ROWS as u64 {
                return Err(Error::invalid(format!("a message carries at most {MAX_MESSAGE_ROWS} rows")));
            }
        }
        if ranges.is_empty() {
            return Err(Error::invalid("a message carries at least one row"));
        }
        Ok(RowSet { ranges, len })
    }

    /// Parses [`HDR_ROWS`]'s canonical text.
    pub fn parse(text: &str) -> Result<RowSet> {
        let bad = |why: String| Error::invalid(format!("header {HDR_ROWS} `{}`: {why}", clip(text)));
        let mut ranges: Vec<(u32, u32)> = Vec::new();
        let mut len = 0u64;
        for part in text.split(',') {
            let (a, b) = match part.split_once('-') {
                Some((a, b)) => (number(a), number(b)),
                None => (number(part), number(part)),
            };
            let (Some(a), Some(b)) = (a, b) else {
                return Err(bad(format!("`{}` is not a row or a range", clip(part))));
            };
            if a == 0 || b < a {
                return Err(bad(format!("`{part}` is not a range of rows from 1")));
            }
            if part.contains('-') && a == b {
                return Err(bad(format!("`{part}` is one row, written `{a}`")));
            }
            if let Some(&(_, end)) = ranges.last()
                && a <= end.saturating_add(1)
            {
                return Err(bad(format!("`{part}` does not start after the previous range ends (+1)")));
            }
            len += u64::from(b - a) + 1;
            if len > MAX_MESSAGE_ROWS as u64 {
                return Err(bad(format!("more than {MAX_MESSAGE_ROWS} rows")));
            }
            ranges.push((a, b));
        }
        Ok(RowSet { ranges, len })
    }

    /// Rows in the set.
    pub fn len(&self) -> u64 {
        self.len
    }

    /// Never empty (kept for clippy's `len_without_is_empty`).
    pub fn is_empty(&self) -> bool {
        false
    }

    /// The first row.
    pub fn first(&self) -> u32 {
        self.ranges[0].0
    }

    /// The last row.
    pub fn last(&self) -> u32 {
        self.ranges[self.ranges.len() - 1].1
    }

    /// The inclusive ranges, ascending.
    pub fn ranges(&self) -> &[(u32, u32)] {
        &self.ranges
    }

    /// Every row, ascending.
    pub fn iter(&self) -> impl Iterator<Item = u32> + '_ {
        self.ranges.iter().flat_map(|&(a, b)| a..=b)
    }
}

impl fmt::Display for RowSet {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, &(a, b)) in self.ranges.iter().enumerate() {
            if i > 0 {
                f.write_str(",")?;
            }
            if a == b { write!(f, "{a}")? } else { write!(f, "{a}-{b}")? }
        }
        Ok(())
    }
}

/// Digits only (no sign, no spaces), as a `u32`.
fn number(s: &str) -> Option<u32> {
    if s.is_empty() || !s.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    s.parse().ok()
}

fn clip(s: &str) -> &str {
    match s.char_indices().nth(40) {
        Some((i, _)) => &s[..i],
        None => s,
    }
}

/// Rows to physical lines (see the module doc).
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct LineMap {
    /// `(row, offset)`, ascending by row, offsets changing at each step.
    steps: Vec<(u32, u64)>,
}

impl LineMap {
    /// Notes that `row` starts on `line`; rows must come in ascending order.
    pub fn push(&mut self, row: u32, line: u64) {
        let offset = line.saturating_sub(u64::from(row));
        if self.steps.last().is_none_or(|&(_, o)| o != offset) {
            self.steps.push((row, offset));
        }
    }

    /// Parses [`HDR_LINES`].
    pub fn parse(text: &str) -> Result<LineMap> {
        let mut steps: Vec<(u32, u64)> = Vec::new();
        for part in text.split(',') {
            let step = part.split_once('+').and_then(|(r, o)| Some((number(r)?, o.parse::<u64>().ok()?)));
            let Some((row, offset)) = step else {
                return Err(Error::invalid(format!("header {HDR_LINES}: `{}` is not `row+offset`", clip(part))));
            };
            if steps.last().is_some_and(|&(r, _)| r >= row) {
                return Err(Error::invalid(format!("header {HDR_LINES}: rows must ascend at `{part}`")));
            }
            steps.push((row, offset));
        }
        Ok(LineMap { steps })
    }

    /// The line of `row` (0 when the map starts after it).
    pub fn line(&self, row: u32) -> u64 {
        let i = self.steps.partition_point(|&(r, _)| r <= row);
        match i {
            0 => 0,
            i => u64::from(row) + self.steps[i - 1].1,
        }
    }
}

impl fmt::Display for LineMap {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, (row, offset)) in self.steps.iter().enumerate() {
            if i > 0 {
                f.write_str(",")?;
            }
            write!(f, "{row}+{offset}")?;
        }
        Ok(())
    }
}

/// Appends one frame (an Avro `bytes` value) holding `datum`.
pub fn push_frame(buf: &mut BytesMut, datum: &[u8]) {
    let mut n = (datum.len() as u64) << 1; // zigzag of a non-negative long
    while n >= 0x80 {
        buf.put_u8((n as u8) | 0x80);
        n >>= 7;
    }
    buf.put_u8(n as u8);
    buf.put_slice(datum);
}

/// The `rows` frames of `payload`, as slices of it; `Invalid` when the
/// payload does not hold exactly `rows` well-formed frames.
pub fn split_frames(payload: &Bytes, rows: u64) -> Result<Vec<Bytes>> {
    let bad = |why: &str| Error::invalid(format!("record payload: {why}"));
    let mut out = Vec::with_capacity(rows.min(MAX_MESSAGE_ROWS as u64) as usize);
    let mut pos = 0usize;
    while pos < payload.len() {
        let (mut value, mut shift) = (0u64, 0u32);
        loop {
            let b = *payload.get(pos).ok_or_else(|| bad("a frame's length is cut short"))?;
            pos += 1;
            if shift > 63 {
                return Err(bad("a frame's length is not a varint"));
            }
            value |= u64::from(b & 0x7f) << shift;
            if b & 0x80 == 0 {
                break;
            }
            shift += 7;
        }
        if value & 1 == 1 {
            return Err(bad("a frame's length is negative"));
        }
        let len = usize::try_from(value >> 1).map_err(|_| bad("a frame is too long"))?;
        let end = pos.checked_add(len).filter(|&e| e <= payload.len()).ok_or_else(|| bad("a frame is cut short"))?;
        if out.len() as u64 == rows {
            return Err(bad(&format!("more frames than the {rows} rows")));
        }
        out.push(payload.slice(pos..end));
        pos = end;
    }
    if out.len() as u64 != rows {
        return Err(bad(&format!("{} frames for {rows} rows", out.len())));
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rows_round_trip_in_canonical_ranges() {
        let rows = RowSet::from_sorted([1, 2, 3, 5, 7, 8]).unwrap();
        assert_eq!(rows.to_string(), "1-3,5,7-8");
        assert_eq!((rows.len(), rows.first(), rows.last()), (6, 1, 8));
        assert_eq!(RowSet::parse("1-3,5,7-8").unwrap(), rows);
        assert_eq!(rows.iter().collect::<Vec<_>>(), vec![1, 2, 3, 5, 7, 8]);
        assert_eq!(RowSet::single(u32::MAX).unwrap().to_string(), u32::MAX.to_string());
        for bad in ["", "0", "3-1", "1-1", "1-3,3", "1-3,4", "5,2", "a", "1,,2", " 1", "+1", "1-", "4294967296"] {
            assert!(RowSet::parse(bad).is_err(), "{bad:?} parsed");
        }
        assert!(RowSet::from_sorted([2, 1]).is_err());
        assert!(RowSet::from_sorted([]).is_err());
        assert!(RowSet::from_sorted([0]).is_err());
        let max = MAX_MESSAGE_ROWS as u32;
        assert!(RowSet::from_sorted(1..=max).is_ok());
        assert!(RowSet::from_sorted(1..=max + 1).is_err());
        assert!(RowSet::parse(&format!("1-{max}")).is_ok());
        assert!(RowSet::parse(&format!("1-{}", max + 1)).is_err());
    }

    #[test]
    fn random_row_sets_round_trip() {
        for _ in 0..200 {
            let rows: Vec<u32> =
                (1..=fastrand::u32(1..3000)).filter(|_| fastrand::u8(..) < 200).take(MAX_MESSAGE_ROWS).collect();
            let Ok(set) = RowSet::from_sorted(rows.iter().copied()) else {
                assert!(rows.is_empty());
                continue;
            };
            assert_eq!(set.iter().collect::<Vec<_>>(), rows);
            assert_eq!(RowSet::parse(&set.to_string()).unwrap(), set);
            assert!(set.to_string().len() <= 11 * rows.len());
        }
    }

    #[test]
    fn lines_follow_their_steps() {
        let mut m = LineMap::default();
        for (row, line) in [(1, 2), (2, 3), (3, 4), (4, 7), (5, 8), (9, 12)] {
            m.push(row, line);
        }
        assert_eq!(m.to_string(), "1+1,4+3");
        let back = LineMap::parse(&m.to_string()).unwrap();
        assert_eq!(back, m);
        assert_eq!([1, 3, 4, 9].map(|r| back.line(r)), [2, 4, 7, 12]);
        assert_eq!(LineMap::parse("5+1").unwrap().line(4), 0);
        for bad in ["", "1", "1+", "+1", "2+1,1+1", "1+-1"] {
            assert!(LineMap::parse(bad).is_err(), "{bad:?} parsed");
        }
    }

    #[test]
    fn frames_round_trip_and_refuse_a_wrong_count() {
        let mut buf = BytesMut::new();
        let long = vec![7u8; 300];
        for d in [&b"ab"[..], &b""[..], &long[..]] {
            push_frame(&mut buf, d);
        }
        let payload = buf.freeze();
        assert_eq!(&payload[..3], &[4, b'a', b'b'], "length 2 is the zigzag long 4");
        let frames = split_frames(&payload, 3).unwrap();
        assert_eq!(frames.iter().map(|f| f.len()).collect::<Vec<_>>(), vec![2, 0, 300]);
        assert!(split_frames(&payload, 2).is_err());
        assert!(split_frames(&payload, 4).is_err());
        assert!(split_frames(&payload.slice(..payload.len() - 1), 3).is_err());
        assert!(split_frames(&Bytes::from_static(&[1]), 1).is_err(), "negative length");
        assert!(split_frames(&Bytes::new(), 0).unwrap().is_empty());
    }
}
