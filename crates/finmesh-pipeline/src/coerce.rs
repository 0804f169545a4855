//! Coercion of one CSV cell (bytes) into one Avro field.
//!
//! Owns the text rules of every [`FieldType`] and the Avro binary encoding
//! of the result. Two outputs share the same parsing:
//! - [`encode_cell`] appends the field's Avro binary datum to a buffer (the
//!   ingest hot path: no [`Value`], no allocation for valid cells);
//! - [`cell_value`] builds the [`Value`] apache-avro would encode; tests
//!   check byte for byte that `apache_avro` encodes that value exactly as
//!   [`encode_cell`] does.
//!
//! Invariants:
//! - on error nothing is appended (callers still truncate the whole row);
//! - numbers are exact: decimals become an `i128` unscaled value digit by
//!   digit, never through a float; a decimal with more significant
//!   fractional digits than its scale, or more digits than its precision, is
//!   refused, never rounded;
//! - non-string types ignore surrounding ASCII whitespace; strings are kept
//!   as they are (only checked to be UTF-8);
//! - an empty cell is `null` for a nullable field, else the field's default,
//!   else the exception [`Reason::Empty`].

use apache_avro::Decimal;
use apache_avro::types::Value;
use bytes::{BufMut, BytesMut};
use time::OffsetDateTime;
use time::format_description::well_known::Rfc3339;

use crate::schema::{Field, FieldType};

/// Longest cell excerpt quoted back in a [`Reason`].
pub const MAX_QUOTED: usize = 64;

/// Why one cell (or row) does not fit the schema. One exception per row
/// carries one reason.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error, serde::Serialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
#[non_exhaustive]
pub enum Reason {
    /// The cell is empty, the field is not nullable and has no default.
    #[error("required field is empty")]
    Empty,
    /// The cell is not UTF-8.
    #[error("invalid UTF-8 at byte {offset} of the field")]
    InvalidUtf8 { offset: usize },
    /// The text is not a value of the field's type.
    #[error("expected {expected}, found {found:?}")]
    Parse { expected: String, found: String },
    /// A number of the right shape but outside the type's range.
    #[error("{found:?} is out of range for {expected}")]
    OutOfRange { expected: String, found: String },
    /// Non-zero decimal digits beyond the scale (would need rounding).
    #[error("{found:?} has more than {scale} decimal places")]
    DecimalScale { scale: usize, found: String },
    /// More digits than the decimal's precision.
    #[error("{found:?} has more than {precision} digits")]
    DecimalPrecision { precision: usize, found: String },
    /// `NaN` or an infinity in a float/double field.
    #[error("{found:?} is not a finite number")]
    NotFinite { found: String },
    /// The text is not one of the enum's symbols.
    #[error("{found:?} is not one of {}", symbols.join(", "))]
    UnknownSymbol { found: String, symbols: Vec<String> },
    /// The row does not have as many fields as the header.
    #[error("expected {expected} fields (as in the header), found {found}")]
    FieldCount { expected: usize, found: usize },
    /// One field is longer than the configured limit.
    #[error("field longer than the limit of {limit} bytes")]
    FieldTooLarge { limit: usize },
    /// The row is longer than the configured limit.
    #[error("row longer than the limit of {limit} bytes")]
    RecordTooLarge { limit: usize },
    /// The row has more fields than the configured limit.
    #[error("row has more than {limit} fields")]
    TooManyFields { limit: usize },
}

impl Reason {
    /// A stable short code (`"parse"`, `"field_count"`, …) for metrics and
    /// grouping; the same as the `kind` tag of the JSON form.
    pub fn kind(&self) -> &'static str {
        match self {
            Reason::Empty => "empty",
            Reason::InvalidUtf8 { .. } => "invalid_utf8",
            Reason::Parse { .. } => "parse",
            Reason::OutOfRange { .. } => "out_of_range",
            Reason::DecimalScale { .. } => "decimal_scale",
            Reason::DecimalPrecision { .. } => "decimal_precision",
            Reason::NotFinite { .. } => "not_finite",
            Reason::UnknownSymbol { .. } => "unknown_symbol",
            Reason::FieldCount { .. } => "field_count",
            Reason::FieldTooLarge { .. } => "field_too_large",
            Reason::RecordTooLarge { .. } => "record_too_large",
            Reason::TooManyFields { .. } => "too_many_fields",
        }
    }
}

/// The cell text quoted back in a reason, cut at [`MAX_QUOTED`] bytes.
fn quote(s: &str) -> String {
    if s.len() <= MAX_QUOTED { s.to_string() } else { format!("{}…", &s[..s.floor_char_boundary(MAX_QUOTED)]) }
}

/// A cell parsed into the field's type, before encoding.
enum Parsed<'a> {
    Null,
    Default,
    Boolean(bool),
    Int(i32),
    Long(i64),
    Float(f32),
    Double(f64),
    Str(&'a str),
    Enum(u32),
    Decimal(i128),
}

fn parse<'a>(field: &Field, text: &'a str) -> Result<Parsed<'a>, Reason> {
    let trimmed = if field.ty == FieldType::String { text } else { text.trim_ascii() };
    if trimmed.is_empty() {
        return if field.nullable.is_some() {
            Ok(Parsed::Null)
        } else if field.default_datum.is_some() {
            Ok(Parsed::Default)
        } else {
            Err(Reason::Empty)
        };
    }
    let t = trimmed;
    let expected = || field.ty.describe();
    let parse_err = || Reason::Parse { expected: expected(), found: quote(t) };
    Ok(match &field.ty {
        FieldType::String => Parsed::Str(t),
        FieldType::Boolean => Parsed::Boolean(match t {
            "true" | "TRUE" | "True" | "1" => true,
            "false" | "FALSE" | "False" | "0" => false,
            _ => return Err(parse_err()),
        }),
        FieldType::Int => Parsed::Int(parse_integer(t, expected)?),
        FieldType::Long => Parsed::Long(parse_integer(t, expected)?),
        FieldType::Float => {
            let v: f32 = t.parse().map_err(|_| parse_err())?;
            if !v.is_finite() {
                return Err(not_finite_or_range(t, expected));
            }
            Parsed::Float(v)
        }
        FieldType::Double => {
            let v: f64 = t.parse().map_err(|_| parse_err())?;
            if !v.is_finite() {
                return Err(not_finite_or_range(t, expected));
            }
            Parsed::Double(v)
        }
        FieldType::Enum { symbols } => match symbols.iter().position(|s| s == t) {
            Some(i) => Parsed::Enum(i as u32),
            None => return Err(Reason::UnknownSymbol { found: quote(t), symbols: symbols.clone() }),
        },
        FieldType::Decimal { precision, scale, .. } => Parsed::Decimal(parse_decimal(t, *precision, *scale)?),
        FieldType::Date => Parsed::Int(
            parse_date(t).ok_or_else(|| Reason::Parse { expected: "a date YYYY-MM-DD".into(), found: quote(t) })?,
        ),
        FieldType::TimestampMillis | FieldType::TimestampMicros => {
            let ts = OffsetDateTime::parse(t, &Rfc3339).map_err(|_| Reason::Parse {
                expected: "an RFC 3339 timestamp (e.g. 2026-12-02T10:00:00Z)".into(),
                found: quote(t),
            })?;
            let unit = if field.ty == FieldType::TimestampMillis { 1_000_000 } else { 1_000 };
            let v = ts.unix_timestamp_nanos().div_euclid(unit);
            Parsed::Long(i64::try_from(v).map_err(|_| Reason::OutOfRange { expected: expected(), found: quote(t) })?)
        }
    })
}

fn not_finite_or_range(t: &str, expected: impl Fn() -> String) -> Reason {
    // "1e999" parses to infinity: a number, just too big.
    if t.bytes().any(|b| b.is_ascii_digit()) {
        Reason::OutOfRange { expected: expected(), found: quote(t) }
    } else {
        Reason::NotFinite { found: quote(t) }
    }
}

fn parse_integer<T: std::str::FromStr<Err = std::num::ParseIntError>>(
    t: &str,
    expected: impl Fn() -> String,
) -> Result<T, Reason> {
    t.parse::<T>().map_err(|e| match e.kind() {
        std::num::IntErrorKind::PosOverflow | std::num::IntErrorKind::NegOverflow => {
            Reason::OutOfRange { expected: expected(), found: quote(t) }
        }
        _ => Reason::Parse { expected: expected(), found: quote(t) },
    })
}

/// Exact decimal text → unscaled value: `[+-]digits[.digits]`, no exponent.
pub fn parse_decimal(t: &str, precision: usize, scale: usize) -> Result<i128, Reason> {
    let bytes = t.as_bytes();
    let (negative, body) = match bytes.first() {
        Some(b'-') => (true, &bytes[1..]),
        Some(b'+') => (false, &bytes[1..]),
        _ => (false, bytes),
    };
    let (int_part, frac_part) = match body.iter().position(|&b| b == b'.') {
        Some(i) => (&body[..i], &body[i + 1..]),
        None => (body, &[][..]),
    };
    let digits_ok = |s: &[u8]| s.iter().all(u8::is_ascii_digit);
    if (int_part.is_empty() && frac_part.is_empty()) || !digits_ok(int_part) || !digits_ok(frac_part) {
        return Err(Reason::Parse { expected: format!("decimal({precision},{scale})"), found: quote(t) });
    }
    // Digits past the scale must be zeros: they are dropped exactly.
    if frac_part.len() > scale && frac_part[scale..].iter().any(|&b| b != b'0') {
        return Err(Reason::DecimalScale { scale, found: quote(t) });
    }
    let too_many = || Reason::DecimalPrecision { precision, found: quote(t) };
    let int_digits = int_part.iter().skip_while(|&&b| b == b'0');
    let frac_digits = (0..scale).map(|i| frac_part.get(i).copied().unwrap_or(b'0'));
    if precision <= 18 {
        // v < 10^18 before each step, so v * 10 + 9 < 2^64: plain u64.
        let limit = 10u64.pow(precision as u32);
        let mut v: u64 = 0;
        for d in int_digits.copied().chain(frac_digits) {
            v = v * 10 + u64::from(d - b'0');
            if v >= limit {
                return Err(too_many());
            }
        }
        let v = i128::from(v);
        return Ok(if negative { -v } else { v });
    }
    let limit = 10i128.pow(precision as u32);
    let mut v: i128 = 0;
    for d in int_digits.copied().chain(frac_digits) {
        // v < 10^precision <= 10^38 here, so v * 10 + 9 may pass i128::MAX.
        v = v.checked_mul(10).and_then(|v| v.checked_add(i128::from(d - b'0'))).ok_or_else(too_many)?;
        if v >= limit {
            return Err(too_many());
        }
    }
    Ok(if negative { -v } else { v })
}

/// `YYYY-MM-DD` (proleptic Gregorian) → days since 1970-01-01.
pub fn parse_date(t: &str) -> Option<i32> {
    let b = t.as_bytes();
    if b.len() != 10 || b[4] != b'-' || b[7] != b'-' {
        return None;
    }
    let num = |s: &[u8]| -> Option<i32> {
        s.iter().try_fold(0i32, |acc, &c| c.is_ascii_digit().then(|| acc * 10 + i32::from(c - b'0')))
    };
    let (y, m, d) = (num(&b[..4])?, num(&b[5..7])?, num(&b[8..])?);
    let leap = (y % 4 == 0 && y % 100 != 0) || y % 400 == 0;
    let days_in_month = match m {
        1 | 3 | 5 | 7 | 8 | 10 | 12 => 31,
        4 | 6 | 9 | 11 => 30,
        2 if leap => 29,
        2 => 28,
        _ => return None,
    };
    if d < 1 || d > days_in_month {
        return None;
    }
    // Howard Hinnant's days_from_civil.
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let mp = (m + 9) % 12;
    let doy = (153 * mp + 2) / 5 + d - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    Some(era * 146_097 + doe - 719_468)
}

fn utf8(cell: &[u8]) -> Result<&str, Reason> {
    std::str::from_utf8(cell).map_err(|e| Reason::InvalidUtf8 { offset: e.valid_up_to() })
}

/// Coerces `cell` into `field` and appends its Avro binary datum to `out`.
/// On error `out` is unchanged.
pub fn encode_cell(field: &Field, cell: &[u8], out: &mut BytesMut) -> Result<(), Reason> {
    encode_text(field, utf8(cell)?, out)
}

/// [`encode_cell`] for a cell already known to be UTF-8.
pub fn encode_text(field: &Field, text: &str, out: &mut BytesMut) -> Result<(), Reason> {
    let parsed = parse(field, text)?;
    if let Parsed::Default = parsed {
        out.extend_from_slice(field.default_datum.as_deref().unwrap_or_default());
        return Ok(());
    }
    if let Some(n) = field.nullable {
        if let Parsed::Null = parsed {
            put_long(out, i64::from(n.null_index));
            return Ok(());
        }
        put_long(out, i64::from(n.value_index));
    }
    match parsed {
        Parsed::Null | Parsed::Default => unreachable!("handled above"),
        Parsed::Boolean(b) => out.put_u8(u8::from(b)),
        Parsed::Int(v) => put_long(out, i64::from(v)),
        Parsed::Long(v) => put_long(out, v),
        Parsed::Float(v) => out.put_f32_le(v),
        Parsed::Double(v) => out.put_f64_le(v),
        Parsed::Str(s) => {
            put_long(out, s.len() as i64);
            out.extend_from_slice(s.as_bytes());
        }
        Parsed::Enum(i) => put_long(out, i64::from(i)),
        Parsed::Decimal(v) => {
            let FieldType::Decimal { fixed, .. } = field.ty else { unreachable!("decimal parsed for a decimal field") };
            let be = v.to_be_bytes();
            match fixed {
                Some(size) => {
                    let sign = if v < 0 { 0xFF } else { 0 };
                    for _ in 16..size {
                        out.put_u8(sign);
                    }
                    out.extend_from_slice(&be[16usize.saturating_sub(size)..]);
                }
                None => {
                    let min = minimal_twos_complement(&be);
                    put_long(out, min.len() as i64);
                    out.extend_from_slice(min);
                }
            }
        }
    }
    Ok(())
}

/// Coerces `cell` into `field` as the [`Value`] apache-avro encodes to the
/// same bytes as [`encode_cell`].
pub fn cell_value(field: &Field, cell: &[u8]) -> Result<Value, Reason> {
    let parsed = parse(field, utf8(cell)?)?;
    if let Parsed::Default = parsed {
        return Ok(field.default_value.clone().unwrap_or(Value::Null));
    }
    let value = match parsed {
        Parsed::Null | Parsed::Default => Value::Null,
        Parsed::Boolean(b) => Value::Boolean(b),
        Parsed::Int(v) if field.ty == FieldType::Date => Value::Date(v),
        Parsed::Int(v) => Value::Int(v),
        Parsed::Long(v) => match field.ty {
            FieldType::TimestampMillis => Value::TimestampMillis(v),
            FieldType::TimestampMicros => Value::TimestampMicros(v),
            _ => Value::Long(v),
        },
        Parsed::Float(v) => Value::Float(v),
        Parsed::Double(v) => Value::Double(v),
        Parsed::Str(s) => Value::String(s.to_string()),
        Parsed::Enum(i) => {
            let FieldType::Enum { symbols } = &field.ty else { unreachable!("enum parsed for an enum field") };
            Value::Enum(i, symbols[i as usize].clone())
        }
        Parsed::Decimal(v) => Value::Decimal(Decimal::from(minimal_twos_complement(&v.to_be_bytes()))),
    };
    Ok(match field.nullable {
        Some(n) if value == Value::Null => Value::Union(n.null_index, Box::new(Value::Null)),
        Some(n) => Value::Union(n.value_index, Box::new(value)),
        None => value,
    })
}

/// The shortest big-endian two's complement form (at least one byte).
fn minimal_twos_complement(be: &[u8; 16]) -> &[u8] {
    let mut start = 0;
    while start < 15 {
        let (b, next) = (be[start], be[start + 1]);
        if (b == 0x00 && next & 0x80 == 0) || (b == 0xFF && next & 0x80 != 0) {
            start += 1;
        } else {
            break;
        }
    }
    &be[start..]
}

/// Avro `long`/`int`: zig-zag, then base-128 varint.
pub(crate) fn put_long(out: &mut BytesMut, v: i64) {
    let mut z = ((v << 1) ^ (v >> 63)) as u64;
    let mut buf = [0u8; 10];
    let mut n = 0;
    loop {
        if z < 0x80 {
            buf[n] = z as u8;
            n += 1;
            break;
        }
        buf[n] = (z as u8 & 0x7F) | 0x80;
        z >>= 7;
        n += 1;
    }
    out.extend_from_slice(&buf[..n]);
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::schema::IngestSchema;
    use apache_avro::writer::datum::GenericDatumWriter;
    use proptest::prelude::*;

    fn schema() -> IngestSchema {
        IngestSchema::parse(
            r#"{"type":"record","name":"T","fields":[
            {"name":"i","type":"int"},
            {"name":"l","type":"long"},
            {"name":"f","type":"float"},
            {"name":"d","type":"double"},
            {"name":"b","type":"boolean"},
            {"name":"s","type":"string"},
            {"name":"e","type":{"type":"enum","name":"E","symbols":["A","B","C"]}},
            {"name":"dec","type":{"type":"bytes","logicalType":"decimal","precision":18,"scale":2}},
            {"name":"fix","type":{"type":"fixed","name":"F","size":9,"logicalType":"decimal","precision":20,"scale":4}},
            {"name":"dt","type":{"type":"int","logicalType":"date"}},
            {"name":"ms","type":{"type":"long","logicalType":"timestamp-millis"}},
            {"name":"us","type":{"type":"long","logicalType":"timestamp-micros"}},
            {"name":"ns","type":["null","string"]},
            {"name":"nd","type":[{"type":"int","logicalType":"date"},"null"]},
            {"name":"di","type":"int","default":42}
        ]}"#,
        )
        .unwrap()
    }

    fn field(s: &IngestSchema, name: &str) -> Field {
        s.fields().iter().find(|f| f.name == name).unwrap().clone()
    }

    /// Encodes with our hot path and with apache-avro from `cell_value`, and
    /// requires the same bytes.
    fn both(f: &Field, cell: &str) -> Result<Vec<u8>, Reason> {
        let mut out = BytesMut::new();
        let ours = encode_cell(f, cell.as_bytes(), &mut out).map(|()| out.to_vec());
        let value = cell_value(f, cell.as_bytes());
        match (&ours, value) {
            (Ok(bytes), Ok(v)) => {
                let theirs = GenericDatumWriter::builder(&f.schema).build().unwrap().write_value_to_vec(v).unwrap();
                assert_eq!(bytes, &theirs, "field {} cell {cell:?}", f.name);
            }
            (Err(a), Err(b)) => assert_eq!(a, &b),
            (a, b) => panic!("paths disagree on {cell:?}: {a:?} vs {b:?}"),
        }
        if ours.is_err() {
            assert!(out.is_empty(), "nothing appended on error");
        }
        ours
    }

    fn reason(f: &Field, cell: &str) -> String {
        both(f, cell).unwrap_err().to_string()
    }

    #[test]
    fn integers_parse_exactly_and_report_range() {
        let s = schema();
        let i = field(&s, "i");
        assert_eq!(both(&i, "-1").unwrap(), vec![1]);
        assert_eq!(both(&i, " 64 ").unwrap(), vec![0x80, 0x01]);
        assert_eq!(reason(&i, "2147483648"), "\"2147483648\" is out of range for int");
        assert_eq!(reason(&i, "12x"), "expected int, found \"12x\"");
        assert_eq!(reason(&i, "1.5"), "expected int, found \"1.5\"");
        assert_eq!(reason(&i, ""), "required field is empty");
        both(&field(&s, "l"), "-9223372036854775808").unwrap();
    }

    #[test]
    fn floats_refuse_nan_and_infinities() {
        let s = schema();
        let d = field(&s, "d");
        both(&d, "1.25e3").unwrap();
        assert_eq!(reason(&d, "NaN"), "\"NaN\" is not a finite number");
        assert_eq!(reason(&d, "inf"), "\"inf\" is not a finite number");
        assert_eq!(reason(&d, "1e999"), "\"1e999\" is out of range for double");
        assert_eq!(reason(&field(&s, "f"), "1e39"), "\"1e39\" is out of range for float");
        assert_eq!(reason(&d, "1,5"), "expected double, found \"1,5\"");
    }

    #[test]
    fn decimals_are_exact_and_never_rounded() {
        let s = schema();
        let dec = field(&s, "dec");
        // 123.45 → unscaled 12345 = 0x3039: two bytes, length 2 (zig-zag 4).
        assert_eq!(both(&dec, "123.45").unwrap(), vec![4, 0x30, 0x39]);
        assert_eq!(both(&dec, "123.4").unwrap(), both(&dec, "123.40").unwrap());
        assert_eq!(both(&dec, "123.450").unwrap(), both(&dec, "123.45").unwrap());
        assert_eq!(both(&dec, "-0.01").unwrap(), vec![2, 0xFF]);
        assert_eq!(both(&dec, "0").unwrap(), vec![2, 0]);
        both(&dec, ".5").unwrap();
        both(&dec, "7.").unwrap();
        both(&dec, "9999999999999999.99").unwrap();
        assert_eq!(reason(&dec, "123.456"), "\"123.456\" has more than 2 decimal places");
        assert_eq!(reason(&dec, "10000000000000000.00"), "\"10000000000000000.00\" has more than 18 digits");
        assert_eq!(reason(&dec, "1e5"), "expected decimal(18,2), found \"1e5\"");
        assert_eq!(reason(&dec, "."), "expected decimal(18,2), found \".\"");
        assert_eq!(reason(&dec, "1.2.3"), "expected decimal(18,2), found \"1.2.3\"");
        assert_eq!(reason(&dec, "--1"), "expected decimal(18,2), found \"--1\"");
        let fix = field(&s, "fix");
        assert_eq!(both(&fix, "-1").unwrap(), {
            // -10000 sign-extended to 9 bytes.
            let mut v = vec![0xFF; 9];
            v[7..].copy_from_slice(&(-10000i16).to_be_bytes());
            v
        });
        both(&fix, "9999999999999999.9999").unwrap();
        // Precision 38: 38 nines fit, 39 digits are refused without overflow.
        let nines = "9".repeat(38);
        assert_eq!(parse_decimal(&nines, 38, 0), Ok(10i128.pow(38) - 1));
        assert_eq!(parse_decimal(&format!("-{nines}"), 38, 0), Ok(1 - 10i128.pow(38)));
        for text in [format!("{nines}9"), format!("{nines}99999"), format!("{nines}.5")] {
            assert!(
                matches!(
                    parse_decimal(&text, 38, 0),
                    Err(Reason::DecimalPrecision { .. } | Reason::DecimalScale { .. })
                ),
                "{text}"
            );
        }
        assert!(matches!(
            parse_decimal(&format!("{nines}9"), 38, 0),
            Err(Reason::DecimalPrecision { precision: 38, .. })
        ));
    }

    #[test]
    fn dates_and_timestamps() {
        let s = schema();
        let dt = field(&s, "dt");
        assert_eq!(parse_date("1970-01-01"), Some(0));
        assert_eq!(parse_date("2000-03-01"), Some(11017));
        assert_eq!(parse_date("1969-12-31"), Some(-1));
        assert_eq!(parse_date("2024-02-29"), Some(19782));
        assert_eq!(reason(&dt, "2023-02-29"), "expected a date YYYY-MM-DD, found \"2023-02-29\"");
        assert_eq!(reason(&dt, "2023-13-01"), "expected a date YYYY-MM-DD, found \"2023-13-01\"");
        assert_eq!(reason(&dt, "02/01/2023"), "expected a date YYYY-MM-DD, found \"02/01/2023\"");
        both(&dt, "2031-06-30").unwrap();
        let ms = field(&s, "ms");
        both(&ms, "2026-12-02T10:00:00.123Z").unwrap();
        both(&ms, "2026-12-02T10:00:00+01:00").unwrap();
        both(&ms, "1969-12-31T23:59:59.9995Z").unwrap();
        both(&field(&s, "us"), "2026-12-02T10:00:00.123456Z").unwrap();
        assert!(reason(&ms, "2026-12-02 10:00").starts_with("expected an RFC 3339 timestamp"));
    }

    #[test]
    fn enums_strings_booleans() {
        let s = schema();
        let e = field(&s, "e");
        assert_eq!(both(&e, "C").unwrap(), vec![4]);
        assert_eq!(reason(&e, "D"), "\"D\" is not one of A, B, C");
        assert_eq!(reason(&e, "a"), "\"a\" is not one of A, B, C");
        let st = field(&s, "s");
        assert_eq!(both(&st, " x ").unwrap(), vec![6, b' ', b'x', b' ']);
        assert_eq!(reason(&st, ""), "required field is empty");
        let mut out = BytesMut::new();
        assert_eq!(
            encode_cell(&st, b"ab\xffc", &mut out).unwrap_err().to_string(),
            "invalid UTF-8 at byte 2 of the field"
        );
        let b = field(&s, "b");
        assert_eq!(both(&b, "true").unwrap(), vec![1]);
        assert_eq!(both(&b, "0").unwrap(), vec![0]);
        assert_eq!(reason(&b, "yes"), "expected boolean, found \"yes\"");
        let long = "x".repeat(1000);
        assert!(reason(&b, &long).len() < 100, "quoted text is cut");
    }

    #[test]
    fn nullable_and_defaults() {
        let s = schema();
        let ns = field(&s, "ns");
        assert_eq!(both(&ns, "").unwrap(), vec![0]);
        assert_eq!(both(&ns, "a").unwrap(), vec![2, 2, b'a']);
        let nd = field(&s, "nd");
        assert_eq!(both(&nd, "").unwrap(), vec![2], "null is branch 1 of [date, null]");
        assert_eq!(both(&nd, "1970-01-02").unwrap(), vec![0, 2]);
        assert_eq!(reason(&nd, "x"), "expected a date YYYY-MM-DD, found \"x\"");
        let di = field(&s, "di");
        assert_eq!(both(&di, " ").unwrap(), vec![84], "empty cell takes the default 42");
    }

    proptest! {
        #[test]
        fn decimal_text_round_trips(unscaled in -999_999_999_999_999_999i64..=999_999_999_999_999_999i64) {
            let s = schema();
            let dec = field(&s, "dec");
            let sign = if unscaled < 0 { "-" } else { "" };
            let a = unscaled.unsigned_abs();
            let text = format!("{sign}{}.{:02}", a / 100, a % 100);
            prop_assert_eq!(parse_decimal(&text, 18, 2).unwrap(), i128::from(unscaled));
            prop_assert_eq!(parse_decimal(&text, 30, 2).unwrap(), i128::from(unscaled));
            prop_assert_eq!(parse_decimal(&format!("{text}0"), 19, 3).unwrap(), i128::from(unscaled) * 10);
            both(&dec, &text).unwrap();
        }

        #[test]
        fn dates_match_the_time_crate(days in -719_162i32..2_932_896) {
            let d = time::Date::from_julian_day(days + 2_440_588).unwrap();
            let text = format!("{:04}-{:02}-{:02}", d.year(), u8::from(d.month()), d.day());
            prop_assert_eq!(parse_date(&text), Some(days));
        }

        #[test]
        fn any_text_gives_a_value_or_a_reason_never_a_panic(cell in any::<Vec<u8>>()) {
            let s = schema();
            for f in s.fields() {
                let mut out = BytesMut::new();
                if let Ok(text) = std::str::from_utf8(&cell) {
                    let _ = both(f, text);
                } else {
                    prop_assert!(encode_cell(f, &cell, &mut out).is_err());
                }
            }
        }
    }
}
