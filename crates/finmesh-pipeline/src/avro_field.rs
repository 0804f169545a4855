//! Reading fields of a raw Avro datum without decoding the record.
//!
//! Owns the binary layout of the field types [`crate::schema`] accepts
//! (the same ones [`crate::coerce`] writes): a field is reached by skipping
//! the fields before it, so enrich reads a lookup key at the cost of a few
//! varints and length prefixes, and validate hands the rules a
//! [`DatumView`] that decodes only the fields they read, with no
//! allocation (an `apache_avro::Value` per record was ~12% of a pipeline
//! run). Invariants: every read is bounds-checked; a datum that does not
//! fit the schema gives `None`, never a panic; a value reads as the
//! [`FieldRef`] that `FieldRef::from_avro` gives for apache-avro's decoding
//! of the same bytes (tested against it).

use finmesh_rules::{FieldRef, RecordView, decimal_from_be_bytes};

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

/// Reads one field at `pos`, checked as apache-avro's decoder checks it
/// (union branch, enum index, `int` range, boolean byte); a string is
/// checked for UTF-8 and borrowed only when `want` (skipped ones read as
/// [`FieldRef::Other`]).
fn value<'a>(f: &Field, buf: &'a [u8], pos: &mut usize, want: bool) -> Option<FieldRef<'a>> {
    if let Some(n) = f.nullable {
        let branch = varint(buf, pos)?;
        if branch == i64::from(n.null_index) {
            return Some(FieldRef::Null);
        }
        if branch != i64::from(n.value_index) {
            return None;
        }
    }
    Some(match &f.ty {
        FieldType::Boolean => {
            let b = *buf.get(*pos)?;
            advance(buf, pos, 1)?;
            match b {
                0 => FieldRef::Bool(false),
                1 => FieldRef::Bool(true),
                _ => return None,
            }
        }
        FieldType::Int => FieldRef::Int(i64::from(i32::try_from(varint(buf, pos)?).ok()?)),
        FieldType::Long => FieldRef::Int(varint(buf, pos)?),
        FieldType::Date => FieldRef::Date(i32::try_from(varint(buf, pos)?).ok()?),
        FieldType::TimestampMillis | FieldType::TimestampMicros => FieldRef::Timestamp(varint(buf, pos)?),
        FieldType::Float => {
            let b: [u8; 4] = buf.get(*pos..)?.get(..4)?.try_into().ok()?;
            advance(buf, pos, 4)?;
            FieldRef::Float(f64::from(f32::from_le_bytes(b)))
        }
        FieldType::Double => {
            let b: [u8; 8] = buf.get(*pos..)?.get(..8)?.try_into().ok()?;
            advance(buf, pos, 8)?;
            FieldRef::Float(f64::from_le_bytes(b))
        }
        FieldType::String => {
            let b = bytes(buf, pos)?;
            if want { FieldRef::Str(std::str::from_utf8(b).ok()?) } else { FieldRef::Other }
        }
        FieldType::Enum { symbols } => {
            let i = u32::try_from(varint(buf, pos)?).ok()?;
            (usize::try_from(i).ok()? < symbols.len()).then_some(FieldRef::Enum(i))?
        }
        FieldType::Decimal { fixed, .. } => {
            let digits = match fixed {
                Some(n) => {
                    let start = *pos;
                    advance(buf, pos, *n)?;
                    &buf[start..*pos]
                }
                None => bytes(buf, pos)?,
            };
            decimal_from_be_bytes(digits).map_or(FieldRef::Other, FieldRef::Decimal)
        }
    })
}

/// The value of field `index` of `fields` in `datum`, if it is a string,
/// enum or integer (other types read as [`FieldKey::Null`]); `None` if the
/// datum is malformed.
pub fn read_key<'a>(fields: &'a [Field], datum: &'a [u8], index: usize) -> Option<FieldKey<'a>> {
    let mut pos = 0;
    for f in fields.get(..index)? {
        value(f, datum, &mut pos, false)?;
    }
    let f = fields.get(index)?;
    Some(match value(f, datum, &mut pos, true)? {
        FieldRef::Str(s) => FieldKey::Str(s),
        FieldRef::Enum(i) => match &f.ty {
            FieldType::Enum { symbols } => FieldKey::Str(symbols.get(i as usize)?.as_str()),
            _ => FieldKey::Null,
        },
        FieldRef::Int(i) | FieldRef::Timestamp(i) => FieldKey::Int(i),
        FieldRef::Date(d) => FieldKey::Int(i64::from(d)),
        _ => FieldKey::Null,
    })
}

/// Checks a whole datum of `fields` (every field as [`value`] checks it,
/// and nothing after the last) and records where each field starts in
/// `starts`, so a [`DatumView`] reads any of them without decoding the
/// record. `None` if the datum is malformed (`starts` is then partial).
pub fn index_record(fields: &[Field], datum: &[u8], starts: &mut Vec<usize>) -> Option<()> {
    starts.clear();
    let mut pos = 0;
    for f in fields {
        starts.push(pos);
        value(f, datum, &mut pos, true)?;
    }
    (pos == datum.len()).then_some(())
}

/// A datum read in place by the rules: field `i` is decoded from its
/// offset when a rule asks for it. Built from [`index_record`]'s offsets
/// over the same `fields` and `datum`.
pub struct DatumView<'a> {
    pub fields: &'a [Field],
    pub datum: &'a [u8],
    pub starts: &'a [usize],
}

impl RecordView for DatumView<'_> {
    fn field(&self, index: usize) -> FieldRef<'_> {
        let (Some(f), Some(&start)) = (self.fields.get(index), self.starts.get(index)) else {
            return FieldRef::Null;
        };
        let mut pos = start;
        value(f, self.datum, &mut pos, true).unwrap_or(FieldRef::Other)
    }
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

    /// Every field type [`crate::schema`] accepts, plain and nullable with
    /// `null` first and last.
    const EVERY_TYPE: &str = r#"{"type":"record","name":"R","fields":[
        {"name":"b","type":"boolean"},{"name":"i","type":"int"},{"name":"l","type":"long"},
        {"name":"f","type":"float"},{"name":"d","type":"double"},{"name":"s","type":"string"},
        {"name":"ns","type":["null","string"]},{"name":"sn","type":["string","null"]},
        {"name":"e","type":{"type":"enum","name":"E","symbols":["X","Y","Z"]}},
        {"name":"m","type":{"type":"bytes","logicalType":"decimal","precision":38,"scale":2}},
        {"name":"fm","type":{"type":"fixed","name":"F8","size":8,"logicalType":"decimal","precision":18,"scale":4}},
        {"name":"dt","type":{"type":"int","logicalType":"date"}},
        {"name":"tm","type":{"type":"long","logicalType":"timestamp-millis"}},
        {"name":"tu","type":{"type":"long","logicalType":"timestamp-micros"}},
        {"name":"nl","type":["null","long"]}]}"#;

    fn same(a: FieldRef<'_>, b: FieldRef<'_>) -> bool {
        match (a, b) {
            (FieldRef::Float(x), FieldRef::Float(y)) => x.to_bits() == y.to_bits(),
            (a, b) => a == b,
        }
    }

    fn nullable(inner: impl Strategy<Value = Value>, null_index: u32) -> impl Strategy<Value = Value> {
        prop_oneof![
            Just(Value::Union(null_index, Box::new(Value::Null))),
            inner.prop_map(move |v| Value::Union(1 - null_index, Box::new(v)))
        ]
    }

    fn record() -> impl Strategy<Value = Vec<Value>> {
        (
            (any::<bool>(), any::<i32>(), any::<i64>(), any::<f32>(), any::<f64>(), ".{0,12}"),
            (nullable(".{0,8}".prop_map(Value::String), 0), nullable(".{0,8}".prop_map(Value::String), 1), 0u32..3),
            (proptest::collection::vec(any::<u8>(), 1..20), proptest::collection::vec(any::<u8>(), 8..=8)),
            (any::<i32>(), any::<i64>(), any::<i64>(), nullable(any::<i64>().prop_map(Value::Long), 0)),
        )
            .prop_map(|((b, i, l, f, d, s), (ns, sn, e), (m, fm), (dt, tm, tu, nl))| {
                vec![
                    Value::Boolean(b),
                    Value::Int(i),
                    Value::Long(l),
                    Value::Float(f),
                    Value::Double(d),
                    Value::String(s),
                    ns,
                    sn,
                    Value::Enum(e, ["X", "Y", "Z"][e as usize].into()),
                    Value::Decimal(apache_avro::Decimal::from(m)),
                    Value::Decimal(apache_avro::Decimal::from(fm)),
                    Value::Date(dt),
                    Value::TimestampMillis(tm),
                    Value::TimestampMicros(tu),
                    nl,
                ]
            })
    }

    /// What the rules saw before: apache-avro's decoding, seen through `FieldRef::from_avro`.
    fn decoded(schema: &IngestSchema, datum: &[u8]) -> Option<Vec<Value>> {
        let reader = apache_avro::reader::datum::GenericDatumReader::builder(schema.avro()).build().unwrap();
        match reader.read_value(&mut &datum[..]).ok()? {
            Value::Record(fields) => Some(fields.into_iter().map(|(_, v)| v).collect()),
            _ => None,
        }
    }

    /// `datum` is refused, or every field reads as apache-avro decodes it.
    fn refused_or_read_alike(schema: &IngestSchema, datum: &[u8]) -> Result<(), TestCaseError> {
        let fields = schema.fields();
        let mut starts = Vec::new();
        if index_record(fields, datum, &mut starts).is_some() {
            let expected = decoded(schema, datum);
            prop_assert!(expected.is_some(), "accepted bytes apache-avro refuses");
            let view = DatumView { fields, datum, starts: &starts };
            for (i, v) in expected.unwrap().iter().enumerate() {
                prop_assert!(same(view.field(i), FieldRef::from_avro(v)), "field {i}");
            }
        }
        Ok(())
    }

    use apache_avro::types::Value;
    use proptest::prelude::*;

    proptest! {
        #[test]
        fn a_datum_view_reads_what_apache_avro_decodes(
            values in record(),
            flip_at in any::<prop::sample::Index>(),
            flip_to in any::<u8>(),
        ) {
            let schema = IngestSchema::parse(EVERY_TYPE).unwrap();
            let fields = schema.fields();
            let named: Vec<(String, Value)> = fields.iter().map(|f| f.name.clone()).zip(values).collect();
            let writer = apache_avro::writer::datum::GenericDatumWriter::builder(schema.avro()).build().unwrap();
            let datum = writer.write_value_to_vec(Value::Record(named)).unwrap();
            let expected = decoded(&schema, &datum).unwrap();
            let mut starts = Vec::new();
            prop_assert!(index_record(fields, &datum, &mut starts).is_some());
            let view = DatumView { fields, datum: &datum, starts: &starts };
            for (i, v) in expected.iter().enumerate() {
                prop_assert!(same(view.field(i), FieldRef::from_avro(v)), "field {i}: {:?} vs {:?}", view.field(i), v);
            }
            prop_assert_eq!(view.field(fields.len()), FieldRef::Null, "past the last field");
            // Every shorter datum is refused, as is one with a byte after it.
            for cut in 0..datum.len() {
                prop_assert!(index_record(fields, &datum[..cut], &mut starts).is_none(), "cut at {cut}");
            }
            let mut longer = datum.clone();
            longer.push(0);
            prop_assert!(index_record(fields, &longer, &mut starts).is_none());
            // One changed byte: refused, or read as apache-avro reads it.
            let mut changed = datum.clone();
            changed[flip_at.index(datum.len())] = flip_to;
            refused_or_read_alike(&schema, &changed)?;
        }

        /// Hostile bytes never panic, and what is accepted is what
        /// apache-avro decodes to the same values.
        #[test]
        fn arbitrary_bytes_are_refused_or_read_as_apache_avro_reads_them(
            datum in proptest::collection::vec(any::<u8>(), 0..96)
        ) {
            let schema = IngestSchema::parse(EVERY_TYPE).unwrap();
            let fields = schema.fields();
            refused_or_read_alike(&schema, &datum)?;
            for i in 0..fields.len() {
                let _ = read_key(fields, &datum, i);
            }
        }
    }
}
