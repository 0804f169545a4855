//! What the evaluator reads: records through [`RecordView`], reference data
//! through [`Lookup`], and the registry of reference datasets ([`Datasets`]).
//!
//! Contract of a [`RecordView`]: `field(i)` returns the value of the schema's
//! field at position `i` (the schema the rule set was compiled against), as a
//! [`FieldRef`] of the kind listed for that field's Avro type on [`FieldRef`].
//! A value of another kind is not an error: every predicate on it is unknown
//! (so the rule fails), exactly as for null. `field` must not allocate if the
//! caller wants evaluation free of allocation. The provided views over
//! `apache_avro::types::Value` allocate only when a rule reads an Avro
//! `decimal` value, whose digits apache-avro hands out only as new `Vec`s; a
//! stage that wants those free too supplies [`FieldRef::Decimal`] from its own
//! view (`tests/no_alloc.rs` pins both).

use apache_avro::types::Value;

/// A borrowed scalar value of one field, in the representation rules compare.
///
/// | Avro type | variant |
/// |---|---|
/// | `null` branch of a union | `Null` |
/// | `boolean` | `Bool` |
/// | `int`, `long` | `Int` |
/// | `float`, `double` | `Float` |
/// | `decimal` (≤ 38 digits) | `Decimal`: the unscaled integer at the schema's scale |
/// | `date` | `Date`: days since 1970-01-01 |
/// | `timestamp-*`, `local-timestamp-*` | `Timestamp`: count of the schema's unit since the epoch |
/// | `string` | `Str` |
/// | `enum` | `Enum`: the symbol's position in the schema's symbol list |
/// | anything else | `Other` |
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum FieldRef<'a> {
    Null,
    Bool(bool),
    Int(i64),
    Float(f64),
    Decimal(i128),
    Date(i32),
    Timestamp(i64),
    Str(&'a str),
    Enum(u32),
    Other,
}

impl<'a> FieldRef<'a> {
    /// The rules' view of one Avro value (a union is seen through to its branch).
    pub fn from_avro(value: &'a Value) -> FieldRef<'a> {
        match value {
            Value::Null => FieldRef::Null,
            Value::Boolean(b) => FieldRef::Bool(*b),
            Value::Int(i) => FieldRef::Int(i64::from(*i)),
            Value::Long(l) => FieldRef::Int(*l),
            Value::Float(f) => FieldRef::Float(f64::from(*f)),
            Value::Double(d) => FieldRef::Float(*d),
            Value::String(s) => FieldRef::Str(s),
            Value::Enum(i, _) => FieldRef::Enum(*i),
            Value::Union(_, inner) => FieldRef::from_avro(inner),
            Value::Date(d) => FieldRef::Date(*d),
            Value::TimestampMillis(t)
            | Value::TimestampMicros(t)
            | Value::TimestampNanos(t)
            | Value::LocalTimestampMillis(t)
            | Value::LocalTimestampMicros(t)
            | Value::LocalTimestampNanos(t) => FieldRef::Timestamp(*t),
            Value::Decimal(d) => match <Vec<u8>>::try_from(d) {
                Ok(bytes) => decimal_from_be_bytes(&bytes).map_or(FieldRef::Other, FieldRef::Decimal),
                Err(_) => FieldRef::Other,
            },
            _ => FieldRef::Other,
        }
    }

    pub fn is_null(&self) -> bool {
        matches!(self, FieldRef::Null)
    }
}

/// A two's-complement big-endian integer of at most 16 bytes (Avro's decimal encoding).
pub fn decimal_from_be_bytes(bytes: &[u8]) -> Option<i128> {
    let significant = bytes.len().checked_sub(16).map_or(bytes, |extra| {
        // Leading bytes beyond 16 may only be sign extension.
        let (lead, rest) = bytes.split_at(extra);
        let fill = if rest.first().is_some_and(|b| b & 0x80 != 0) { 0xFF } else { 0x00 };
        if lead.iter().all(|&b| b == fill) { rest } else { &[] }
    });
    if significant.is_empty() {
        return if bytes.is_empty() { Some(0) } else { None };
    }
    let fill = if significant[0] & 0x80 != 0 { 0xFF } else { 0x00 };
    let mut buf = [fill; 16];
    buf[16 - significant.len()..].copy_from_slice(significant);
    Some(i128::from_be_bytes(buf))
}

/// A record as the evaluator reads it: field values by schema position.
pub trait RecordView {
    /// The value of the field at position `index` of the schema.
    fn field(&self, index: usize) -> FieldRef<'_>;
}

/// The fields of a decoded `Value::Record`, in schema order. A missing position reads as null.
impl RecordView for [(String, Value)] {
    fn field(&self, index: usize) -> FieldRef<'_> {
        self.get(index).map_or(FieldRef::Null, |(_, v)| FieldRef::from_avro(v))
    }
}

/// Field values in schema order. A missing position reads as null.
impl RecordView for [Value] {
    fn field(&self, index: usize) -> FieldRef<'_> {
        self.get(index).map_or(FieldRef::Null, FieldRef::from_avro)
    }
}

/// Already converted values in schema order (tests, benchmarks, stages that decode themselves).
impl RecordView for [FieldRef<'_>] {
    fn field(&self, index: usize) -> FieldRef<'_> {
        self.get(index).copied().unwrap_or(FieldRef::Null)
    }
}

/// A reference dataset known to the rules, by its position in [`Datasets`].
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct DatasetId(pub u32);

/// The type of a reference dataset's keys, which a `LOOKUP` key field must match.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum KeyType {
    /// Matched by `string` and `enum` fields; the key is passed as [`FieldRef::Str`]
    /// (an enum as its symbol).
    String,
    /// Matched by `int` and `long` fields; the key is passed as [`FieldRef::Int`].
    Int,
}

impl KeyType {
    fn describe(self) -> &'static str {
        match self {
            KeyType::String => "string",
            KeyType::Int => "integer",
        }
    }
}

/// The reference datasets rules may name in `LOOKUP`, with their key types.
///
/// A [`DatasetId`] is the dataset's position here; a rule set compiled against
/// one `Datasets` hands those ids to [`Lookup::contains`].
#[derive(Clone, Debug, Default)]
pub struct Datasets {
    entries: Vec<(String, KeyType)>,
}

impl Datasets {
    pub fn new() -> Datasets {
        Datasets::default()
    }

    /// Registers a dataset, or changes the key type of one already registered; returns its id.
    pub fn add(&mut self, name: impl Into<String>, key: KeyType) -> DatasetId {
        let name = name.into();
        if let Some(id) = self.id(&name) {
            self.entries[id.0 as usize].1 = key;
            return id;
        }
        self.entries.push((name, key));
        DatasetId(u32::try_from(self.entries.len() - 1).expect("fewer than 2^32 datasets"))
    }

    /// Builder form of [`add`](Datasets::add).
    pub fn with(mut self, name: impl Into<String>, key: KeyType) -> Datasets {
        self.add(name, key);
        self
    }

    pub fn id(&self, name: &str) -> Option<DatasetId> {
        self.entries.iter().position(|(n, _)| n == name).map(|i| DatasetId(i as u32))
    }

    pub fn name(&self, id: DatasetId) -> Option<&str> {
        self.entries.get(id.0 as usize).map(|(n, _)| n.as_str())
    }

    pub fn key_type(&self, id: DatasetId) -> Option<KeyType> {
        self.entries.get(id.0 as usize).map(|&(_, k)| k)
    }

    pub fn names(&self) -> impl Iterator<Item = &str> {
        self.entries.iter().map(|(n, _)| n.as_str())
    }

    pub(crate) fn describe_key(key: KeyType) -> &'static str {
        key.describe()
    }
}

/// Reference data for `LOOKUP`, supplied at evaluation time.
pub trait Lookup {
    /// Whether `key` is present in `dataset`. `key` is never [`FieldRef::Null`]
    /// (a null key makes `LOOKUP` unknown without asking).
    fn contains(&self, dataset: DatasetId, key: &FieldRef<'_>) -> bool;
}

/// No reference data: every `LOOKUP` is false. For rule sets that do not use `LOOKUP`.
#[derive(Clone, Copy, Debug, Default)]
pub struct NoLookup;

impl Lookup for NoLookup {
    fn contains(&self, _: DatasetId, _: &FieldRef<'_>) -> bool {
        false
    }
}

impl<F: Fn(DatasetId, &FieldRef<'_>) -> bool> Lookup for F {
    fn contains(&self, dataset: DatasetId, key: &FieldRef<'_>) -> bool {
        self(dataset, key)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn decimals_decode_from_any_sign_extended_width() {
        assert_eq!(decimal_from_be_bytes(&[]), Some(0));
        assert_eq!(decimal_from_be_bytes(&[0x04, 0xD2]), Some(1234));
        assert_eq!(decimal_from_be_bytes(&[0xFF, 0x85]), Some(-123));
        let mut wide = vec![0xFF; 20];
        wide[19] = 0xFE;
        assert_eq!(decimal_from_be_bytes(&wide), Some(-2));
        let mut too_big = vec![0x00; 20];
        too_big[0] = 1;
        assert_eq!(decimal_from_be_bytes(&too_big), None);
    }

    #[test]
    fn avro_values_map_to_field_refs() {
        let dec = apache_avro::Decimal::from(vec![0xFF, 0x85]);
        assert_eq!(FieldRef::from_avro(&Value::Decimal(dec)), FieldRef::Decimal(-123));
        let null = Value::Union(0, Box::new(Value::Null));
        assert_eq!(FieldRef::from_avro(&null), FieldRef::Null);
        let s = Value::Union(1, Box::new(Value::String("x".into())));
        assert_eq!(FieldRef::from_avro(&s), FieldRef::Str("x"));
        assert_eq!(FieldRef::from_avro(&Value::Enum(2, "FX".into())), FieldRef::Enum(2));
        assert_eq!(FieldRef::from_avro(&Value::Int(-4)), FieldRef::Int(-4));
        assert_eq!(FieldRef::from_avro(&Value::Bytes(vec![1])), FieldRef::Other);
    }
}
