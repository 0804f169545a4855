//! Hostile CSV: every malformed input becomes a precise exception or file
//! error, never a panic and never a lost row (`rows == records +
//! exceptions`, row numbers contiguous).

use std::io::Read;
use std::sync::Arc;

use apache_avro::reader::datum::GenericDatumReader;
use apache_avro::types::Value;
use finmesh_pipeline::{Exception, FileError, IngestSchema, ReaderOptions, Reason, Record, Row, RowReader};
use proptest::prelude::*;

const RISK_AVSC: &str = include_str!("fixtures/risk12.avsc");
const HEADER: &str = "trade_id,book,desk,counterparty,ccy,notional,maturity,pv,delta,gamma,vega,as_of";
const GOOD: &str =
    "T1,RATES-01,RATES,Northwind Bank plc,USD,1000000.00,2031-06-30,-1234.56,12.5,0.001,3.25,2026-12-01T18:00:00Z";

fn risk() -> Arc<IngestSchema> {
    Arc::new(IngestSchema::parse(RISK_AVSC).unwrap())
}

struct Outcome {
    records: Vec<Record>,
    exceptions: Vec<Exception>,
    error: Option<FileError>,
}

/// Reads everything, checking the counting invariant and the numbering.
fn read_with(input: impl Read, schema: Arc<IngestSchema>, opts: ReaderOptions) -> Outcome {
    let mut reader = match RowReader::new(input, schema, "f", opts) {
        Ok(r) => r,
        Err(e) => return Outcome { records: vec![], exceptions: vec![], error: Some(e) },
    };
    let (mut records, mut exceptions, mut error) = (Vec::new(), Vec::new(), None);
    let mut expected_row = 1;
    let mut last_line = 1;
    loop {
        match reader.next_row() {
            Ok(Some(row)) => {
                let (row_no, line) = match &row {
                    Row::Record(r) => (r.row, r.line),
                    Row::Exception(e) => (e.row, e.line),
                };
                assert_eq!(row_no, expected_row, "rows are numbered 1, 2, 3…");
                // A lone CR ends a row but not a line: lines never decrease.
                assert!(line >= last_line, "lines never decrease");
                expected_row += 1;
                last_line = line;
                match row {
                    Row::Record(r) => records.push(r),
                    Row::Exception(e) => exceptions.push(e),
                }
            }
            Ok(None) => break,
            Err(e) => {
                error = Some(e);
                assert!(reader.next_row().unwrap().is_none(), "nothing after a file error");
                break;
            }
        }
    }
    let p = reader.progress();
    assert_eq!(p.rows, p.records + p.exceptions);
    assert_eq!(p.records, records.len() as u64);
    assert_eq!(p.exceptions, exceptions.len() as u64);
    Outcome { records, exceptions, error }
}

fn read(input: &[u8]) -> Outcome {
    read_with(input, risk(), ReaderOptions::default())
}

fn decode(schema: &IngestSchema, avro: &[u8]) -> Vec<(String, Value)> {
    let reader = GenericDatumReader::builder(schema.avro()).build().unwrap();
    let mut cursor = avro;
    let Value::Record(fields) = reader.read_value(&mut cursor).unwrap() else { panic!("a record") };
    assert!(cursor.is_empty(), "the datum is exactly one record");
    fields
}

#[test]
fn good_rows_become_decodable_avro_records() {
    let input = format!("{HEADER}\n{GOOD}\n{}\n", GOOD.replace("Northwind Bank plc", "").replacen("T1,", "T2,", 1));
    let out = read(input.as_bytes());
    assert!(out.error.is_none() && out.exceptions.is_empty(), "{:?} {:?}", out.error, out.exceptions);
    assert_eq!(out.records.len(), 2);
    let schema = risk();
    let fields = decode(&schema, &out.records[0].avro);
    let get = |name: &str| fields.iter().find(|(n, _)| n == name).unwrap().1.clone();
    assert_eq!(get("trade_id"), Value::String("T1".into()));
    assert_eq!(get("desk"), Value::Enum(0, "RATES".into()));
    assert_eq!(get("counterparty"), Value::Union(1, Box::new(Value::String("Northwind Bank plc".into()))));
    assert_eq!(get("maturity"), Value::Date(22_460));
    assert_eq!(get("pv"), Value::Double(-1234.56));
    assert_eq!(get("as_of"), Value::TimestampMillis(1_796_148_000_000));
    let Value::Decimal(d) = get("notional") else { panic!("decimal") };
    assert_eq!(<Vec<u8>>::try_from(d).unwrap(), 100_000_000i64.to_be_bytes()[4..].to_vec());
    let fields = decode(&schema, &out.records[1].avro);
    assert_eq!(fields[3].1, Value::Union(0, Box::new(Value::Null)), "empty cell → null");
    assert_eq!((out.records[1].row, out.records[1].line), (2, 3));
}

/// A record is the raw datum, and the fingerprint is what Avro's
/// single-object encoding would put before it: `C3 01`, fingerprint, datum.
#[test]
fn records_are_raw_datums_and_the_fingerprint_is_the_single_object_ones() {
    let out = read(format!("{HEADER}\n{GOOD}\n").as_bytes());
    let schema = risk();
    let value = Value::Record(decode(&schema, &out.records[0].avro));
    let mut single = Vec::new();
    apache_avro::GenericSingleObjectWriter::new_with_capacity(schema.avro(), 1024)
        .unwrap()
        .write_value(value, &mut single)
        .unwrap();
    assert_eq!(&single[..2], &[0xC3, 0x01]);
    assert_eq!(single[2..10], schema.fingerprint());
    assert_eq!(&single[10..], &out.records[0].avro[..]);
    assert_eq!(schema.fingerprint_hex().len(), 16);
}

#[test]
fn wrong_column_counts_name_expected_and_found() {
    let input = format!("{HEADER}\n{GOOD}\nT2,RATES-01,RATES\n{GOOD},extra\n{GOOD}\n");
    let out = read(input.as_bytes());
    assert!(out.error.is_none());
    assert_eq!(out.records.len(), 2);
    assert_eq!(out.exceptions.len(), 2);
    let e = &out.exceptions[0];
    assert_eq!((e.row, e.line, e.column.as_deref()), (2, 3, None));
    assert_eq!(e.reason, Reason::FieldCount { expected: 12, found: 3 });
    assert_eq!(e.to_string(), "row 2 (line 3): expected 12 fields (as in the header), found 3");
    assert_eq!(out.exceptions[1].reason, Reason::FieldCount { expected: 12, found: 13 });
}

#[test]
fn unbalanced_quote_is_a_file_error_naming_where_it_opened() {
    let input = format!(
        "{HEADER}\n{GOOD}\n{GOOD}\nT3,RATES-01,RATES,\"Open Quote Ltd,USD,1.00,2031-06-30,1,1,1,2026-12-01T18:00:00Z\n{GOOD}\n{GOOD}\n"
    );
    let out = read(input.as_bytes());
    assert_eq!(out.records.len(), 2, "rows before the quote are kept");
    assert!(out.exceptions.is_empty());
    let e = out.error.expect("a file error");
    assert!(
        matches!(&e, FileError::UnterminatedQuote { row: 3, line: 4, field: 4, column: Some(c) } if c == "counterparty"),
        "{e:?}"
    );
    assert_eq!(
        e.to_string(),
        "unterminated quoted field: the quote opened at line 4, field 4 (counterparty) of row 3, and is never closed; \
         the rest of the file (from line 4) cannot be read as rows"
    );
    // In the header: row 0.
    let out = read(b"trade_id,\"book\n");
    assert!(matches!(out.error, Some(FileError::UnterminatedQuote { row: 0, line: 1, field: 2, column: None })));
}

#[test]
fn quotes_that_close_are_fine_even_mid_field_and_across_lines() {
    let row = GOOD.replace("Northwind Bank plc", "\"Banco \"\"Austral\"\",\nS.A.\"");
    let odd = GOOD.replace("Northwind Bank plc", "5'10\" Capital");
    let input = format!("{HEADER}\n{row}\n{odd}\n{GOOD}");
    let out = read(input.as_bytes());
    assert!(out.error.is_none(), "{:?}", out.error);
    assert_eq!(out.records.len(), 3, "{:?}", out.exceptions);
    let lines: Vec<u64> = out.records.iter().map(|r| r.line).collect();
    assert_eq!(lines, vec![2, 4, 5], "a quoted newline moves the next row's line");
    let fields = decode(&risk(), &out.records[0].avro);
    assert_eq!(fields[3].1, Value::Union(1, Box::new(Value::String("Banco \"Austral\",\nS.A.".into()))));
    let fields = decode(&risk(), &out.records[1].avro);
    assert_eq!(fields[3].1, Value::Union(1, Box::new(Value::String("5'10\" Capital".into()))));
}

#[test]
fn non_utf8_bytes_are_an_exception_with_column_and_offset() {
    let mut input = format!("{HEADER}\n").into_bytes();
    input.extend_from_slice(GOOD.replace("Northwind", "North\u{1}").as_bytes());
    let at = input.iter().position(|&b| b == 1).unwrap();
    input[at] = 0xFF;
    input.extend_from_slice(format!("\n{GOOD}\n").as_bytes());
    let out = read(&input);
    assert_eq!(out.records.len(), 1);
    let e = &out.exceptions[0];
    assert_eq!(e.column.as_deref(), Some("counterparty"));
    assert_eq!(e.reason, Reason::InvalidUtf8 { offset: 5 });
    assert_eq!(e.to_string(), "row 1 (line 2), column counterparty: invalid UTF-8 at byte 5 of the field");
    // A character split across two fields: the row as a whole is UTF-8
    // ("North" + C3 A9 = "Northé"), each of the two fields is not.
    let mut input = format!("{HEADER}\n").into_bytes();
    input.extend_from_slice(GOOD.replace("Northwind Bank plc,USD", "North\u{1},\u{2}USD").as_bytes());
    let (a, b) = (input.iter().position(|&b| b == 1).unwrap(), input.iter().position(|&b| b == 2).unwrap());
    (input[a], input[b]) = (0xC3, 0xA9);
    let out = read(&input);
    assert_eq!(out.exceptions.len(), 1);
    assert_eq!(out.exceptions[0].column.as_deref(), Some("counterparty"));
    assert_eq!(out.exceptions[0].reason, Reason::InvalidUtf8 { offset: 5 });
    // In the header: a file error.
    let out = read(b"trade_id,bo\xC3\x28k\n");
    assert!(matches!(out.error, Some(FileError::HeaderUtf8 { field: 2, offset: 2 })), "{:?}", out.error);
}

#[test]
fn empty_inputs_are_a_file_error() {
    for input in [&b""[..], b"\xEF\xBB\xBF", b"\n\n\r\n"] {
        let out = read(input);
        let e = out.error.expect("error");
        assert!(matches!(e, FileError::Empty), "{input:?}: {e:?}");
        assert_eq!(e.to_string(), "empty file: no header");
    }
}

#[test]
fn header_only_is_zero_rows() {
    for input in [HEADER.to_string(), format!("{HEADER}\n"), format!("{HEADER}\r\n\r\n")] {
        let out = read(input.as_bytes());
        assert!(out.error.is_none() && out.records.is_empty() && out.exceptions.is_empty());
    }
}

#[test]
fn bom_is_dropped_and_crlf_accepted() {
    let input = format!("\u{FEFF}{HEADER}\r\n{GOOD}\r\n\r\n{GOOD}\r\n");
    let out = read(input.as_bytes());
    assert!(out.error.is_none(), "{:?}", out.error);
    assert!(out.exceptions.is_empty(), "{:?}", out.exceptions);
    assert_eq!(out.records.iter().map(|r| (r.row, r.line)).collect::<Vec<_>>(), vec![(1, 2), (2, 4)]);
    assert_eq!(out.records[0].avro, out.records[1].avro, "CR is not part of the last field");
    // A BOM split across reads is still found.
    let out = read_with(OneByteAtATime(input.as_bytes()), risk(), ReaderOptions::default());
    assert!(out.error.is_none() && out.exceptions.is_empty());
    assert_eq!(out.records.len(), 2);
}

/// Hands out `data`, failing once with `Interrupted` first, then with a
/// real error once `data` is used up.
struct Failing<'a> {
    data: &'a [u8],
    interrupted: bool,
}

impl Read for Failing<'_> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        if !self.interrupted {
            self.interrupted = true;
            return Err(std::io::ErrorKind::Interrupted.into());
        }
        if self.data.is_empty() {
            return Err(std::io::Error::other("disk on fire"));
        }
        let n = buf.len().min(self.data.len()).min(100);
        buf[..n].copy_from_slice(&self.data[..n]);
        self.data = &self.data[n..];
        Ok(n)
    }
}

#[test]
fn a_failing_input_is_a_file_error_after_the_rows_it_gave() {
    let input = format!("{HEADER}\n{GOOD}\n{GOOD}\n");
    let out = read_with(Failing { data: input.as_bytes(), interrupted: false }, risk(), ReaderOptions::default());
    assert_eq!(out.records.len(), 2, "interrupted reads are retried");
    let e = out.error.expect("file error");
    assert_eq!(e.kind(), "io");
    assert_eq!(e.to_string(), format!("read error after {} bytes: disk on fire", input.len()));
}

/// A reader that hands out one byte per `read`.
struct OneByteAtATime<'a>(&'a [u8]);

impl Read for OneByteAtATime<'_> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        if self.0.is_empty() || buf.is_empty() {
            return Ok(0);
        }
        buf[0] = self.0[0];
        self.0 = &self.0[1..];
        Ok(1)
    }
}

#[test]
fn header_that_does_not_fit_names_every_problem() {
    let out = read(b"trade_id,book,desk,ccy,notional,maturity,pv,delta,gamma,vega,as_of,colour,colour\n");
    let e = out.error.unwrap();
    assert_eq!(e.kind(), "header");
    assert_eq!(
        e.to_string(),
        "header does not fit the schema: unknown column(s): colour, colour; duplicate column(s): colour"
    );
    let out = read(b"trade_id,book\n");
    assert!(e_contains(
        &out,
        "missing required column(s): desk, ccy, notional, maturity, pv, delta, gamma, vega, as_of"
    ));
}

fn e_contains(out: &Outcome, s: &str) -> bool {
    out.error.as_ref().is_some_and(|e| e.to_string().contains(s))
}

#[test]
fn absent_optional_column_takes_the_default() {
    let header = HEADER.replace("counterparty,", "");
    let row = GOOD.replace("Northwind Bank plc,", "");
    let out = read(format!("{header}\n{row}\n").as_bytes());
    assert_eq!(out.records.len(), 1, "{:?} {:?}", out.error, out.exceptions);
    let fields = decode(&risk(), &out.records[0].avro);
    assert_eq!(fields[3], ("counterparty".into(), Value::Union(0, Box::new(Value::Null))));
}

#[test]
fn cell_errors_name_the_column() {
    let bad = GOOD.replace("1000000.00", "1O00.00");
    let out = read(format!("{HEADER}\n{bad}\n").as_bytes());
    assert_eq!(
        out.exceptions[0].to_string(),
        "row 1 (line 2), column notional: expected decimal(18,2), found \"1O00.00\""
    );
    assert_eq!(
        serde_json::to_value(&out.exceptions[0]).unwrap(),
        serde_json::json!({"row": 1, "line": 2, "column": "notional",
            "reason": {"kind": "parse", "expected": "decimal(18,2)", "found": "1O00.00"}})
    );
    let bad = GOOD.replace(",RATES,", ",COMMODITIES,");
    let out = read(format!("{HEADER}\n{bad}\n").as_bytes());
    assert_eq!(
        out.exceptions[0].to_string(),
        "row 1 (line 2), column desk: \"COMMODITIES\" is not one of RATES, FX, CREDIT, EQ"
    );
}

#[test]
fn a_field_over_the_limit_is_an_exception_and_the_next_row_is_read() {
    let opts = ReaderOptions { max_field_bytes: 100, ..ReaderOptions::default() };
    let long = GOOD.replace("Northwind Bank plc", &"x".repeat(101));
    let quoted_long = GOOD.replace("Northwind Bank plc", &format!("\"{}\"", "y,\n".repeat(40)));
    let input = format!("{HEADER}\n{GOOD}\n{long}\n{quoted_long}\n{GOOD}\n");
    let out = read_with(input.as_bytes(), risk(), opts);
    assert!(out.error.is_none());
    assert_eq!(out.records.iter().map(|r| r.row).collect::<Vec<_>>(), vec![1, 4]);
    assert_eq!(out.exceptions.len(), 2);
    for e in &out.exceptions {
        assert_eq!(e.column.as_deref(), Some("counterparty"));
        assert_eq!(e.reason, Reason::FieldTooLarge { limit: 100 });
    }
    assert_eq!(out.exceptions[1].line, 4);
    assert_eq!(out.records[1].line, 45);
}

#[test]
fn rows_over_the_record_and_field_count_limits_are_exceptions() {
    let opts = ReaderOptions { max_record_bytes: 200, max_fields: 20, ..ReaderOptions::default() };
    let wide = format!("{GOOD}{}", ",".repeat(30));
    let long = GOOD.replace("Northwind Bank plc", &"z".repeat(150));
    let input = format!("{HEADER}\n{wide}\n{long}\n{GOOD}\n");
    let out = read_with(input.as_bytes(), risk(), opts);
    assert!(out.error.is_none());
    assert_eq!(out.records.len(), 1);
    assert_eq!(out.exceptions[0].reason, Reason::TooManyFields { limit: 20 });
    assert_eq!(out.exceptions[1].reason, Reason::RecordTooLarge { limit: 200 });
}

#[test]
fn reading_in_any_chunking_gives_the_same_rows() {
    let bad = GOOD.replace("2031-06-30", "2031-02-30");
    let input = format!(
        "\u{FEFF}{HEADER}\r\n{GOOD}\r\n\"T\"\"9\",B,FX,\"a\nb\",EUR,1,2030-01-01,1,2,3,4,2026-12-01T18:00:00Z\r\n{bad}\n"
    );
    let whole = read(input.as_bytes());
    let bytewise = read_with(OneByteAtATime(input.as_bytes()), risk(), ReaderOptions::default());
    assert_eq!(whole.records, bytewise.records);
    assert_eq!(whole.exceptions, bytewise.exceptions);
    assert_eq!(whole.records.len(), 2, "{:?}", whole.exceptions);
    // The reader is also an iterator of rows.
    let rows: Vec<Row> = RowReader::new(input.as_bytes(), risk(), "f", ReaderOptions::default())
        .unwrap()
        .collect::<Result<_, _>>()
        .unwrap();
    assert_eq!(rows.len(), 3);
    assert!(matches!(&rows[2], Row::Exception(e) if e.row == 3));
    assert_eq!(whole.exceptions.len(), 1);
}

#[test]
fn another_delimiter_is_an_option() {
    let input = format!("{HEADER}\n{GOOD}\n").replace(',', ";");
    let out = read_with(input.as_bytes(), risk(), ReaderOptions { delimiter: b';', ..ReaderOptions::default() });
    assert_eq!(out.records.len(), 1, "{:?} {:?}", out.error, out.exceptions);
    let out = read(input.as_bytes());
    assert!(e_contains(&out, "unknown column(s): trade_id;book;"), "{:?}", out.error);
}

/// A reader that hands out at most `.1` bytes per `read`.
struct Chunked<'a>(&'a [u8], usize);

impl Read for Chunked<'_> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let n = self.1.min(buf.len()).min(self.0.len());
        buf[..n].copy_from_slice(&self.0[..n]);
        self.0 = &self.0[n..];
        Ok(n)
    }
}

fn nullable_abc() -> Arc<IngestSchema> {
    Arc::new(
        IngestSchema::parse(
            r#"{"type":"record","name":"M","fields":[
                {"name":"a","type":["null","string"]},
                {"name":"b","type":["null","long"]},
                {"name":"c","type":["null","string"]}]}"#,
        )
        .unwrap(),
    )
}

/// Messy CSV: the header `a,b,c` followed by random pieces.
fn messy() -> impl Strategy<Value = Vec<u8>> {
    let piece = prop_oneof![
        Just(b",".to_vec()),
        Just(b"\"".to_vec()),
        Just(b"\"\"".to_vec()),
        Just(b"\n".to_vec()),
        Just(b"\r\n".to_vec()),
        Just(b"\r".to_vec()),
        Just(b"12".to_vec()),
        Just(b"-7".to_vec()),
        Just(b"x".to_vec()),
        Just(b"\xFF".to_vec()),
        Just(b"\xEF\xBB\xBF".to_vec()),
        Just(b"1,2,3\n".to_vec()),
        Just(b"a,\"b\",c\n".to_vec()),
        proptest::collection::vec(any::<u8>(), 0..8),
    ];
    (any::<bool>(), proptest::collection::vec(piece, 0..60)).prop_map(|(bom, pieces)| {
        let mut v = if bom { b"\xEF\xBB\xBF".to_vec() } else { Vec::new() };
        v.extend_from_slice(b"a,b,c\n");
        for p in pieces {
            v.extend_from_slice(&p);
        }
        v
    })
}

/// Records the csv crate itself finds (the header included).
fn csv_crate_records(input: &[u8]) -> u64 {
    let mut r = csv::ReaderBuilder::new().has_headers(false).flexible(true).from_reader(input);
    let mut rec = csv::ByteRecord::new();
    let mut n = 0;
    while r.read_byte_record(&mut rec).unwrap() {
        n += 1;
    }
    n
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(512))]

    /// No panic, the invariant holds, and every record the csv crate sees
    /// is a row (less the header, and less the swallowed record on an
    /// unterminated quote).
    #[test]
    fn messy_csv_loses_no_row(input in messy(), chunk in 1usize..16) {
        let out = read_with(&input[..], nullable_abc(), ReaderOptions::default());
        // Any read sizes give the same rows, lines and errors.
        let chunked = read_with(Chunked(&input, chunk), nullable_abc(), ReaderOptions::default());
        prop_assert_eq!(&out.records, &chunked.records);
        prop_assert_eq!(&out.exceptions, &chunked.exceptions);
        prop_assert_eq!(format!("{:?}", out.error), format!("{:?}", chunked.error));
        let rows = (out.records.len() + out.exceptions.len()) as u64;
        let expected = match &out.error {
            None => csv_crate_records(&input) - 1,
            Some(FileError::UnterminatedQuote { .. }) => csv_crate_records(&input) - 2,
            Some(e) => panic!("unexpected file error {e:?}"),
        };
        prop_assert_eq!(rows, expected);
        let schema = nullable_abc();
        for r in &out.records {
            prop_assert_eq!(decode(&schema, &r.avro).len(), 3);
        }
    }
}
