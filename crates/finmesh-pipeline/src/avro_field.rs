//! Reading one field of a raw Avro datum without decoding the record.
//!
//! Owns the binary layout of the field types [`crate::schema`] accepts
//! (the same ones [`crate::coerce`] writes): a field is reached by skipping
//! the fields before it, so enrich reads a lookup key at the cost of a few
//! varints and length prefixes. Invariant: every read is bounds-checked; a
//! datum that does not fit the schema gives `None`, never a panic.

use crate::schema::{Field, FieldType};

/// A key read from a datum.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum FieldKey<'a> {
    /// A string, or an enum's symbol.
    Str(&'a str),
    /// An int, long, date or timestamp.
    Int(i64),
    /// The field is null.
    Null,
}

fn varint(buf: &[u8], pos: &mut usize) -> Option<i64> {
    let mut value: u64 = 0;
    let mut shift = 0;
    loop {
        let b = *buf.get(*pos)?;
        *pos += 1;
        if shift > 63 {
            return None;
        }
        value |= u64::from(b & 0x7f) << shift;
        if b & 0x80 == 0 {
            break;
        }
        shift += 7;
    }
    Some(((value >> 1) as i64) ^ -((value & 1) as i64))
}

fn bytes<'a>(buf: &'a [u8], pos: &mut usize) -> Option<&'a [u8]> {
    let len = usize::try_from(varint(buf, pos)?).ok()?;
    let end = pos.checked_add(len)?;
    let out = buf.get(*pos..end)?;
    *pos = end;
    Some(out)
}

fn advance(buf: &[u8], pos: &mut usize, n: usize) -> Option<()> {
    let end = pos.checked_add(n)?;
    (end <= buf.len()).then(|| *pos = end)
}

/// Reads (when `want`) or skips one field at `pos`.
fn field<'a>(f: &'a Field, buf: &'a [u8], pos: &mut usize, want: bool) -> Option<FieldKey<'a>> {
    if let Some(n) = f.nullable {
        let branch = varint(buf, pos)?;
        if branch == i64::from(n.null_index) {
            return Some(FieldKey::Null);
        }
    }
    Some(match &f.ty {
        FieldType::Boolean => {
            advance(buf, pos, 1)?;
            FieldKey::Null
        }
        FieldType::Int
        | FieldType::Long
        | FieldType::Date
        | FieldType::TimestampMillis
        | FieldType::TimestampMicros => FieldKey::Int(varint(buf, pos)?),
        FieldType::Float => {
            advance(buf, pos, 4)?;
            FieldKey::Null
        }
        FieldType::Double => {
            advance(buf, pos, 8)?;
            FieldKey::Null
        }
        FieldType::String => {
            let b = bytes(buf, pos)?;
            if want { FieldKey::Str(std::str::from_utf8(b).ok()?) } else { FieldKey::Null }
        }
        FieldType::Enum { symbols } => {
            let i = usize::try_from(varint(buf, pos)?).ok()?;
            FieldKey::Str(symbols.get(i)?.as_str())
        }
        FieldType::Decimal { fixed: Some(n), .. } => {
            advance(buf, pos, *n)?;
            FieldKey::Null
        }
        FieldType::Decimal { fixed: None, .. } => {
            bytes(buf, pos)?;
            FieldKey::Null
        }
    })
}

/// The value of field `index` of `fields` in `datum`, if it is a string,
/// enum or integer (other types read as [`FieldKey::Null`]); `None` if the
/// datum is malformed.
pub fn read_key<'a>(fields: &'a [Field], datum: &'a [u8], index: usize) -> Option<FieldKey<'a>> {
    let mut pos = 0;
    for f in fields.get(..index)? {
        field(f, datum, &mut pos, false)?;
    }
    field(fields.get(index)?, datum, &mut pos, true)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::schema::IngestSchema;

    #[test]
    fn reads_a_field_after_skipping_every_kind_before_it() {
        let schema = IngestSchema::parse(
            r#"{"type":"record","name":"R","fields":[
                {"name":"b","type":"boolean"},{"name":"l","type":"long"},{"name":"d","type":"double"},
                {"name":"f","type":"float"},{"name":"s","type":["null","string"]},
                {"name":"e","type":{"type":"enum","name":"E","symbols":["X","Y"]}},
                {"name":"m","type":{"type":"bytes","logicalType":"decimal","precision":10,"scale":2}},
                {"name":"k","type":"string"}]}"#,
        )
        .unwrap();
        let mut avro = vec![1u8, 0x05];
        avro.extend_from_slice(&[0; 8]);
        avro.extend_from_slice(&[0; 4]);
        avro.extend_from_slice(&[2, 4, b'a', b'b']); // union branch 1, "ab"
        avro.push(2); // enum index 1
        avro.extend_from_slice(&[4, 1, 2]); // decimal bytes
        avro.extend_from_slice(&[6, b'K', b'E', b'Y']);
        let f = schema.fields();
        assert_eq!(read_key(f, &avro, 7), Some(FieldKey::Str("KEY")));
        assert_eq!(read_key(f, &avro, 5), Some(FieldKey::Str("Y")));
        assert_eq!(read_key(f, &avro, 4), Some(FieldKey::Str("ab")));
        assert_eq!(read_key(f, &avro, 1), Some(FieldKey::Int(-3)));
        assert_eq!(read_key(f, &avro[..avro.len() - 1], 7), None, "truncated");
        assert_eq!(read_key(f, &avro, 8), None, "no such field");
    }
}
