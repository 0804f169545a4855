//! Streaming CSV → Avro rows: [`RowReader`].
//!
//! Owns reading one CSV file from any [`Read`], its header, the numbering of
//! rows and lines, the limits on what one row may occupy in memory, and the
//! split of every row into a [`Record`] (an Avro datum) or an
//! [`Exception`]. Parsing is `csv_core` (the state machine under the `csv`
//! crate, RFC 4180: `,` delimiter, `"` quotes doubled inside quoted fields,
//! `\n`, `\r\n` or `\r` ends a record), driven directly so that this module,
//! not the parser, owns every buffer; the private `scan` module follows
//! the same bytes to number lines and to find where an open quote opened.
//!
//! Numbering:
//! - `line` is the physical line (1-based, counting `\n`) on which a row
//!   starts; a quoted field may span lines, so a row's next row may start
//!   several lines later;
//! - `row` is the data row number (1-based): the header is row 0, and lines
//!   that are entirely empty are skipped and are not rows;
//! - a row's message id is `<file>:<row>` (`FileRef::msg_id`); the reader
//!   does not build it per row, since record messages carry many rows.
//!
//! Invariants:
//! - every row read is returned exactly once, as a record or as an
//!   exception: `rows == records + exceptions` at every point
//!   ([`RowReader::progress`]);
//! - memory is bounded whatever the input: the input buffer
//!   ([`ReaderOptions::buffer_bytes`]) plus one row of at most
//!   [`ReaderOptions::max_record_bytes`] bytes and
//!   [`ReaderOptions::max_fields`] field offsets. A longer field, row, or a
//!   row with more fields becomes an exception for that row; its bytes are
//!   read through a small scratch buffer and dropped, and the next row is
//!   read normally;
//! - a UTF-8 byte order mark at the start of the file is dropped;
//! - file-level problems end the file with a [`FileError`]: no header
//!   (empty file), a header that does not fit the schema, and a quoted field
//!   that is still open at the end of the input (then the parser has read
//!   everything from the opening quote to the end as one field, so the rows
//!   after it are lost; the error names the line and field where the quote
//!   opened, and the rows before it stay counted);
//! - a record's `avro` is the raw Avro binary datum of the schema's record
//!   (no single-object header); the schema is identified by
//!   [`IngestSchema::fingerprint`]. Records of one batch share one buffer.

use std::io::{self, Read};
use std::sync::Arc;

use bytes::{Bytes, BytesMut};
use csv_core::ReadRecordResult;

use crate::coerce::{Reason, encode_cell, encode_text};
use crate::scan::{Scan, Tracker};
use crate::schema::{ColumnMap, HeaderError, IngestSchema, Source};

/// Limits and dialect of a [`RowReader`].
#[derive(Debug, Clone)]
pub struct ReaderOptions {
    /// Field delimiter. Default `b','`.
    pub delimiter: u8,
    /// Longest field, in bytes. Default 1 MiB.
    pub max_field_bytes: usize,
    /// Longest row (all its fields, without delimiters and quotes), in
    /// bytes. Default 4 MiB.
    pub max_record_bytes: usize,
    /// Most fields in a row. Default 4,096.
    pub max_fields: usize,
    /// Size of the input buffer. Default 64 KiB.
    pub buffer_bytes: usize,
    /// Encoding buffer reserved at a time; records share it. Default 64 KiB.
    pub encode_chunk_bytes: usize,
}

impl Default for ReaderOptions {
    fn default() -> Self {
        ReaderOptions {
            delimiter: b',',
            max_field_bytes: 1 << 20,
            max_record_bytes: 4 << 20,
            max_fields: 4096,
            buffer_bytes: 64 << 10,
            encode_chunk_bytes: 64 << 10,
        }
    }
}

/// A row that fits the schema.
#[derive(Debug, Clone, PartialEq)]
pub struct Record {
    /// Data row number (1-based; the header is row 0).
    pub row: u64,
    /// Physical line (1-based) on which the row starts.
    pub line: u64,
    /// The raw Avro binary datum of the record.
    pub avro: Bytes,
}

/// A row that does not fit the schema, and why.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct Exception {
    /// Data row number (1-based; the header is row 0).
    pub row: u64,
    /// Physical line (1-based) on which the row starts.
    pub line: u64,
    /// The column (header name) at fault, when one is.
    pub column: Option<String>,
    /// What is wrong.
    pub reason: Reason,
}

impl std::fmt::Display for Exception {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "row {} (line {})", self.row, self.line)?;
        if let Some(c) = &self.column {
            write!(f, ", column {c}")?;
        }
        write!(f, ": {}", self.reason)
    }
}

/// One data row's outcome.
#[derive(Debug, Clone, PartialEq)]
pub enum Row {
    Record(Record),
    Exception(Exception),
}

/// Why a whole file cannot be (further) read.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum FileError {
    /// The underlying reader failed.
    #[error("read error after {bytes} bytes: {source}")]
    Io { bytes: u64, source: io::Error },
    /// Nothing but perhaps a BOM and empty lines.
    #[error("empty file: no header")]
    Empty,
    /// The header is not UTF-8.
    #[error("header is not UTF-8: field {field} at byte {offset}")]
    HeaderUtf8 { field: usize, offset: usize },
    /// The header is longer than the row limits.
    #[error("header does not fit the row limits: {0}")]
    HeaderTooLarge(Reason),
    /// The header does not fit the schema.
    #[error(transparent)]
    Header(Box<HeaderError>),
    /// A quoted field opened and never closed: everything from the quote to
    /// the end of the input was one field, and the rows in it are lost.
    #[error(
        "unterminated quoted field: the quote opened at line {line}, field {field}{} of row {row}, and is never closed; \
         the rest of the file (from line {line}) cannot be read as rows",
        column.as_ref().map(|c| format!(" ({c})")).unwrap_or_default()
    )]
    UnterminatedQuote { row: u64, line: u64, field: usize, column: Option<String> },
}

impl FileError {
    /// A stable short code for metrics and the JSON summary.
    pub fn kind(&self) -> &'static str {
        match self {
            FileError::Io { .. } => "io",
            FileError::Empty => "empty",
            FileError::HeaderUtf8 { .. } => "header_utf8",
            FileError::HeaderTooLarge(_) => "header_too_large",
            FileError::Header(_) => "header",
            FileError::UnterminatedQuote { .. } => "unterminated_quote",
        }
    }
}

/// Counts so far. `rows == records + exceptions` always.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize)]
pub struct Progress {
    pub rows: u64,
    pub records: u64,
    pub exceptions: u64,
    /// Input bytes consumed (including the header and a BOM).
    pub bytes: u64,
}

/// How reading one raw record ended.
enum RawRecord {
    /// All fields are in `data`/`ends`.
    Complete,
    /// The record went over a limit; its bytes were dropped.
    Overflow { reason: Reason, field: Option<usize> },
}

/// Reads one CSV file into Avro records and exceptions, row by row.
pub struct RowReader<R> {
    input: R,
    opts: ReaderOptions,
    core: csv_core::Reader,
    tracker: Tracker,
    buf: Box<[u8]>,
    pos: usize,
    len: usize,
    eof: bool,
    started: bool,
    done: bool,
    data: Vec<u8>,
    ends: Vec<usize>,
    nends: usize,
    scratch: Vec<u8>,
    scratch_ends: Vec<usize>,
    schema: Arc<IngestSchema>,
    map: ColumnMap,
    file: String,
    encoded: BytesMut,
    progress: Progress,
}

impl<R: Read> RowReader<R> {
    /// Opens a file: reads its header and maps it onto `schema`. `file` is
    /// the file id used in message ids (`<file>:<row>`).
    pub fn new(
        input: R,
        schema: Arc<IngestSchema>,
        file: impl Into<String>,
        opts: ReaderOptions,
    ) -> Result<Self, FileError> {
        let core = csv_core::ReaderBuilder::new().delimiter(opts.delimiter).build();
        let tracker = Tracker::new(opts.delimiter);
        let mut reader = RowReader {
            input,
            core,
            tracker,
            buf: vec![0; opts.buffer_bytes.max(16)].into_boxed_slice(),
            pos: 0,
            len: 0,
            eof: false,
            started: false,
            done: false,
            data: vec![0; 4096.min(opts.max_record_bytes.max(1))],
            ends: vec![0; 64.min(opts.max_fields.max(1))],
            nends: 0,
            scratch: vec![0; 8192],
            scratch_ends: vec![0; 64],
            schema: schema.clone(),
            map: ColumnMap::empty(),
            file: file.into(),
            encoded: BytesMut::new(),
            progress: Progress::default(),
            opts,
        };
        let header = match reader.read_raw()? {
            None => return Err(FileError::Empty),
            Some(RawRecord::Overflow { reason, .. }) => return Err(FileError::HeaderTooLarge(reason)),
            Some(RawRecord::Complete) => {
                let mut names = Vec::with_capacity(reader.nends);
                for i in 0..reader.nends {
                    let cell = reader.cell(i);
                    let name = std::str::from_utf8(cell)
                        .map_err(|e| FileError::HeaderUtf8 { field: i + 1, offset: e.valid_up_to() })?;
                    names.push(name.to_string());
                }
                names
            }
        };
        reader.map = schema.map_header(&header).map_err(|e| FileError::Header(Box::new(e)))?;
        Ok(reader)
    }

    /// The CSV header and how it maps onto the schema.
    pub fn columns(&self) -> &ColumnMap {
        &self.map
    }

    /// The schema records are encoded with.
    pub fn schema(&self) -> &Arc<IngestSchema> {
        &self.schema
    }

    /// The file id used in message ids.
    pub fn file(&self) -> &str {
        &self.file
    }

    /// Counts so far.
    pub fn progress(&self) -> Progress {
        self.progress
    }

    /// The next row, `Ok(None)` at the end of the file. After an error the
    /// reader returns `Ok(None)`.
    pub fn next_row(&mut self) -> Result<Option<Row>, FileError> {
        if self.done {
            return Ok(None);
        }
        let raw = match self.read_raw() {
            Ok(Some(raw)) => raw,
            Ok(None) => {
                self.done = true;
                return Ok(None);
            }
            Err(e) => {
                self.done = true;
                return Err(e);
            }
        };
        self.progress.rows += 1;
        let row = self.progress.rows;
        let line = self.tracker.record_line;
        let exception = |column: Option<usize>, reason: Reason, map: &ColumnMap| {
            Row::Exception(Exception { row, line, column: column.and_then(|c| map.columns().get(c).cloned()), reason })
        };
        let out = match raw {
            RawRecord::Overflow { reason, field } => exception(field, reason, &self.map),
            RawRecord::Complete if self.nends != self.map.columns().len() => {
                exception(None, Reason::FieldCount { expected: self.map.columns().len(), found: self.nends }, &self.map)
            }
            RawRecord::Complete => match self.encode() {
                Ok(avro) => Row::Record(Record { row, line, avro }),
                Err((column, reason)) => exception(Some(column), reason, &self.map),
            },
        };
        match out {
            Row::Record(_) => self.progress.records += 1,
            Row::Exception(_) => self.progress.exceptions += 1,
        }
        debug_assert_eq!(self.progress.rows, self.progress.records + self.progress.exceptions);
        Ok(Some(out))
    }

    /// Appends up to `max_rows` rows to `batch`. Returns `Ok(false)` when
    /// the file has no more rows (the batch may still have received some).
    pub fn next_batch(&mut self, max_rows: usize, batch: &mut Batch) -> Result<bool, FileError> {
        for _ in 0..max_rows {
            match self.next_row()? {
                Some(Row::Record(r)) => batch.records.push(r),
                Some(Row::Exception(e)) => batch.exceptions.push(e),
                None => return Ok(false),
            }
        }
        Ok(true)
    }

    fn cell(&self, i: usize) -> &[u8] {
        let start = if i == 0 { 0 } else { self.ends[i - 1] };
        &self.data[start..self.ends[i]]
    }

    /// Encodes the current complete row. On error: the column index and
    /// the reason; nothing stays in the encoding buffer.
    fn encode(&mut self) -> Result<Bytes, (usize, Reason)> {
        let RowReader { schema, map, data, ends, nends, encoded, opts, .. } = self;
        if encoded.capacity() - encoded.len() < 1024 {
            encoded.reserve(opts.encode_chunk_bytes.max(1024));
        }
        debug_assert!(encoded.is_empty());
        let used = if *nends == 0 { 0 } else { ends[*nends - 1] };
        // One UTF-8 check for the whole row; a field is then valid when both
        // its ends are character boundaries. Otherwise each field is checked
        // on its own, which finds the failing field and offset.
        let text = std::str::from_utf8(&data[..used]).ok();
        for (field, source) in schema.fields().iter().zip(map.sources()) {
            let result = match *source {
                Source::Column(c) => {
                    let (start, end) = (if c == 0 { 0 } else { ends[c - 1] }, ends[c]);
                    match text {
                        Some(t) if t.is_char_boundary(start) && t.is_char_boundary(end) => {
                            encode_text(field, &t[start..end], encoded)
                        }
                        _ => encode_cell(field, &data[start..end], encoded),
                    }
                    .map_err(|r| (c, r))
                }
                Source::Default => {
                    encoded.extend_from_slice(field.default_datum.as_deref().unwrap_or_default());
                    Ok(())
                }
            };
            if let Err(e) = result {
                encoded.clear();
                return Err(e);
            }
        }
        Ok(encoded.split().freeze())
    }

    fn fill(&mut self) -> Result<(), FileError> {
        self.pos = 0;
        self.len = 0;
        loop {
            match self.input.read(&mut self.buf[self.len..]) {
                Ok(0) => {
                    self.eof = true;
                    break;
                }
                Ok(n) => self.len += n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(source) => return Err(FileError::Io { bytes: self.progress.bytes, source }),
            }
            // The first fill needs 3 bytes to see a BOM.
            if self.started || self.len >= 3 {
                break;
            }
        }
        if !self.started {
            self.started = true;
            if self.buf[..self.len].starts_with(b"\xEF\xBB\xBF") {
                self.pos = 3;
                self.progress.bytes += 3;
            }
        }
        Ok(())
    }

    /// Reads the next raw record into `data`/`ends` (or drops it on
    /// overflow). `Ok(None)`: the input is exhausted.
    fn read_raw(&mut self) -> Result<Option<RawRecord>, FileError> {
        let mut out = 0usize;
        self.nends = 0;
        let mut overflow: Option<(Reason, Option<usize>)> = None;
        loop {
            if self.pos == self.len && !self.eof {
                self.fill()?;
                if self.pos == self.len && !self.eof {
                    continue;
                }
            }
            let input = &self.buf[self.pos..self.len];
            let (res, nin, nout, nend) = if overflow.is_some() {
                self.core.read_record(input, &mut self.scratch, &mut self.scratch_ends)
            } else {
                self.core.read_record(input, &mut self.data[out..], &mut self.ends[self.nends..])
            };
            self.tracker.scan(&input[..nin]);
            self.pos += nin;
            self.progress.bytes += nin as u64;
            if overflow.is_none() {
                let first_new = self.nends;
                out += nout;
                self.nends += nend;
                overflow = self.check_limits(first_new, out);
            }
            match res {
                ReadRecordResult::InputEmpty => {}
                ReadRecordResult::OutputFull if overflow.is_none() => {
                    if self.data.len() >= self.opts.max_record_bytes {
                        overflow = Some((Reason::RecordTooLarge { limit: self.opts.max_record_bytes }, None));
                    } else {
                        // Never more than the open field can use before it is
                        // over its limit.
                        let open_start = if self.nends == 0 { 0 } else { self.ends[self.nends - 1] };
                        let cap = self.opts.max_record_bytes.min(open_start + self.opts.max_field_bytes + 1);
                        let new_len = (self.data.len() * 2).min(cap).max(self.data.len() + 1);
                        self.data.reserve_exact(new_len - self.data.len());
                        self.data.resize(new_len, 0);
                    }
                }
                ReadRecordResult::OutputEndsFull if overflow.is_none() => {
                    if self.ends.len() >= self.opts.max_fields {
                        overflow = Some((Reason::TooManyFields { limit: self.opts.max_fields }, None));
                    } else {
                        let new_len = (self.ends.len() * 2).min(self.opts.max_fields);
                        self.ends.reserve_exact(new_len - self.ends.len());
                        self.ends.resize(new_len, 0);
                    }
                }
                ReadRecordResult::OutputFull | ReadRecordResult::OutputEndsFull => {}
                ReadRecordResult::Record => {
                    if self.eof && self.pos == self.len && self.tracker.state == Scan::InQuoted {
                        let (line, field) = self.tracker.quote_at;
                        return Err(FileError::UnterminatedQuote {
                            row: self.progress.rows + u64::from(self.header_read()),
                            line,
                            field: field + 1,
                            column: self.map.columns().get(field).cloned(),
                        });
                    }
                    return Ok(Some(match overflow {
                        None => RawRecord::Complete,
                        Some((reason, field)) => RawRecord::Overflow { reason, field },
                    }));
                }
                ReadRecordResult::End => return Ok(None),
            }
        }
    }

    /// Whether the header has been read (so the open row is a data row).
    fn header_read(&self) -> bool {
        !self.map.columns().is_empty()
    }

    /// Checks the fields completed since `first_new` and the one still
    /// being read (which ends at `out`).
    fn check_limits(&self, first_new: usize, out: usize) -> Option<(Reason, Option<usize>)> {
        let limit = self.opts.max_field_bytes;
        let too_large = |field| Some((Reason::FieldTooLarge { limit }, Some(field)));
        for i in first_new..self.nends {
            let start = if i == 0 { 0 } else { self.ends[i - 1] };
            if self.ends[i] - start > limit {
                return too_large(i);
            }
        }
        let open_start = if self.nends == 0 { 0 } else { self.ends[self.nends - 1] };
        if out.saturating_sub(open_start) > limit {
            return too_large(self.nends);
        }
        None
    }
}

/// Rows in order, then `None`; a file error is the last item.
impl<R: Read> Iterator for RowReader<R> {
    type Item = Result<Row, FileError>;

    fn next(&mut self) -> Option<Self::Item> {
        self.next_row().transpose()
    }
}

/// Rows of one batch, as handed to a publisher: records (in row order) and
/// exceptions (in row order).
#[derive(Debug, Default, Clone, PartialEq)]
pub struct Batch {
    pub records: Vec<Record>,
    pub exceptions: Vec<Exception>,
}

impl Batch {
    /// Rows in the batch.
    pub fn rows(&self) -> usize {
        self.records.len() + self.exceptions.len()
    }

    pub fn is_empty(&self) -> bool {
        self.rows() == 0
    }

    pub fn clear(&mut self) {
        self.records.clear();
        self.exceptions.clear();
    }
}
