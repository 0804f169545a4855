//! Follows csv_core's quoting over the bytes it consumes, to number lines
//! and to know where a still-open quote opened.
//!
//! csv_core reports neither: it counts lines but not where a record starts
//! (blank lines before it are skipped in the same call), and a quote left
//! open at the end of the input silently becomes one long last field.
//! [`Tracker`] mirrors its states (RFC 4180, `"` quotes, `""` escapes, a
//! quote that does not start a field is an ordinary byte, `\n`, `\r\n`
//! or `\r` end a record, empty lines are skipped).
//!
//! Invariant: fed exactly the bytes csv_core consumed, in order (at most one
//! record end per call, as csv_core returns after each record), its state,
//! line and record line are csv_core's; the quote-free fast path equals
//! stepping byte by byte (property-tested below).

/// Mirrors csv_core's quoting states, to know where a record starts and
/// where a still-open quote opened.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Scan {
    StartRecord,
    StartField,
    InField,
    InQuoted,
    QuoteInQuoted,
}

#[derive(Debug)]
pub(crate) struct Tracker {
    pub(crate) state: Scan,
    pub(crate) delimiter: u8,
    /// Current physical line (1-based).
    pub(crate) line: u64,
    /// Line on which the current record started.
    pub(crate) record_line: u64,
    /// 0-based field index within the current record.
    pub(crate) field: usize,
    /// Line and field where the current quoted field opened.
    pub(crate) quote_at: (u64, usize),
}

impl Tracker {
    /// At the start of a file split by `delimiter`.
    pub(crate) fn new(delimiter: u8) -> Self {
        Tracker { state: Scan::StartRecord, delimiter, line: 1, record_line: 1, field: 0, quote_at: (1, 0) }
    }

    /// Follows `bytes` (the bytes csv_core just consumed: at most one
    /// record's end, so at most one record start).
    pub(crate) fn scan(&mut self, bytes: &[u8]) {
        if matches!(self.state, Scan::StartRecord | Scan::StartField | Scan::InField) && !bytes.contains(&b'"') {
            self.scan_unquoted(bytes);
        } else {
            self.scan_bytes(bytes);
        }
    }

    /// Without a quote, and outside quotes at the start, only line breaks,
    /// delimiters and the last byte matter: counted, not stepped through.
    fn scan_unquoted(&mut self, mut bytes: &[u8]) {
        if self.state == Scan::StartRecord {
            let blank = bytes.iter().take_while(|&&b| b == b'\n' || b == b'\r').count();
            self.line += count(&bytes[..blank], b'\n');
            bytes = &bytes[blank..];
            let Some(&first) = bytes.first() else { return };
            self.record_line = self.line;
            self.field = 0;
            self.step(first);
            bytes = &bytes[1..];
        }
        let Some(&last) = bytes.last() else { return };
        self.line += count(bytes, b'\n');
        self.field += count(bytes, self.delimiter) as usize;
        self.state = if last == b'\n' || last == b'\r' {
            Scan::StartRecord
        } else if last == self.delimiter {
            Scan::StartField
        } else {
            Scan::InField
        };
    }

    /// Byte by byte, skipping ordinary bytes inside fields and quotes in
    /// tight loops.
    pub(crate) fn scan_bytes(&mut self, bytes: &[u8]) {
        let (mut i, n, delimiter) = (0, bytes.len(), self.delimiter);
        while i < n {
            match self.state {
                Scan::InField => {
                    while i < n && bytes[i] != delimiter && bytes[i] != b'\n' && bytes[i] != b'\r' {
                        i += 1;
                    }
                }
                Scan::InQuoted => {
                    while i < n && bytes[i] != b'"' {
                        self.line += u64::from(bytes[i] == b'\n');
                        i += 1;
                    }
                }
                _ => {}
            }
            if i < n {
                self.step(bytes[i]);
                i += 1;
            }
        }
    }

    fn step(&mut self, b: u8) {
        let is_term = b == b'\n' || b == b'\r';
        if b == b'\n' {
            self.line += 1;
        }
        self.state = match self.state {
            Scan::StartRecord if is_term => Scan::StartRecord,
            Scan::StartRecord | Scan::StartField => {
                if self.state == Scan::StartRecord {
                    self.record_line = self.line;
                    self.field = 0;
                }
                if b == b'"' {
                    self.quote_at = (self.line, self.field);
                    Scan::InQuoted
                } else if b == self.delimiter {
                    self.field += 1;
                    Scan::StartField
                } else if is_term {
                    Scan::StartRecord
                } else {
                    Scan::InField
                }
            }
            Scan::InField | Scan::QuoteInQuoted => {
                if self.state == Scan::QuoteInQuoted && b == b'"' {
                    Scan::InQuoted
                } else if b == self.delimiter {
                    self.field += 1;
                    Scan::StartField
                } else if is_term {
                    Scan::StartRecord
                } else {
                    Scan::InField
                }
            }
            Scan::InQuoted => {
                if b == b'"' {
                    Scan::QuoteInQuoted
                } else {
                    Scan::InQuoted
                }
            }
        };
    }
}

fn count(bytes: &[u8], b: u8) -> u64 {
    bytes.iter().filter(|&&x| x == b).count() as u64
}

#[cfg(test)]
mod tests {
    use super::*;
    use csv_core::ReadRecordResult;
    use proptest::prelude::*;

    fn tracker() -> Tracker {
        Tracker::new(b',')
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(1024))]

        /// The counting fast path agrees with stepping byte by byte on the
        /// chunks csv_core consumes, whatever the read sizes.
        #[test]
        fn tracker_fast_path_matches_byte_by_byte(
            input in proptest::collection::vec(prop_oneof![
                Just(b','), Just(b'"'), Just(b'\n'), Just(b'\r'), Just(b'a'), Just(b'1')
            ], 0..80),
            read_size in 1usize..12,
        ) {
            let mut core = csv_core::Reader::new();
            let (mut fast, mut slow) = (tracker(), tracker());
            let (mut out, mut ends) = ([0u8; 256], [0usize; 128]);
            let mut pos = 0;
            loop {
                let end = (pos + read_size).min(input.len());
                let (res, nin, _, _) = core.read_record(&input[pos..end], &mut out, &mut ends);
                fast.scan(&input[pos..pos + nin]);
                slow.scan_bytes(&input[pos..pos + nin]);
                pos += nin;
                prop_assert_eq!(fast.state, slow.state);
                prop_assert_eq!(fast.line, slow.line);
                prop_assert_eq!(fast.record_line, slow.record_line);
                prop_assert_eq!(fast.quote_at, slow.quote_at);
                if fast.state != Scan::StartRecord {
                    prop_assert_eq!(fast.field, slow.field);
                }
                // Once the input is used up, the empty input tells csv_core
                // it has ended: the last record, then End.
                if res == ReadRecordResult::End {
                    break;
                }
            }
        }
    }
}
