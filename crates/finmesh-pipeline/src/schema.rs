//! The Avro record schema a feed is ingested into, and the mapping from a
//! CSV header onto its fields.
//!
//! Owns: loading an `.avsc` file ([`IngestSchema::parse`]), checking that
//! every field has a type a CSV cell can be coerced into ([`FieldType`]),
//! pre-encoding each field's default once, and [`ColumnMap`], which says
//! for every schema field (in schema order) which CSV column feeds it or
//! that its default does.
//!
//! Invariants:
//! - the top-level schema is a `record`; every field's type is one of
//!   [`FieldType`], or a two-branch union of `null` and one of them (either
//!   order); anything else is refused at load time, naming the field;
//! - a field's default, when present, has been resolved against the field's
//!   schema and encoded once ([`Field::default_datum`]); a default that does
//!   not fit is refused at load time;
//! - a [`ColumnMap`] exists only if the header names every field that has no
//!   default, names no column the schema lacks, and names no column twice
//!   (all three problems are reported together in one
//!   [`HeaderError`]); header names are matched exactly (case and
//!   whitespace count).

use std::path::Path;

use apache_avro::Schema;
use apache_avro::rabin::Rabin;
use apache_avro::schema::InnerDecimalSchema;
use apache_avro::types::Value;
use apache_avro::writer::datum::GenericDatumWriter;

/// Decimals are coerced exactly into an `i128` unscaled value: at most 38
/// digits.
pub const MAX_DECIMAL_PRECISION: usize = 38;

/// Why a schema could not be used for CSV ingest.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum SchemaError {
    /// The file could not be read.
    #[error("cannot read schema {path}: {source}")]
    Io { path: String, source: std::io::Error },
    /// Not a valid Avro schema.
    #[error("not a valid Avro schema: {0}")]
    Avro(#[source] Box<apache_avro::Error>),
    /// Valid Avro, but the top level is not a record.
    #[error("the schema must be an Avro record, found {0}")]
    NotARecord(String),
    /// A field whose type a CSV cell cannot be coerced into.
    #[error("field {field:?}: type {found} cannot be read from a CSV cell ({why})")]
    Unsupported { field: String, found: String, why: &'static str },
    /// A field default that does not fit its type.
    #[error("field {field:?}: default {default} does not fit the field's type: {reason}")]
    BadDefault { field: String, default: String, reason: String },
}

/// What kind of value a field holds, as far as coercion from text cares.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum FieldType {
    Boolean,
    Int,
    Long,
    Float,
    Double,
    String,
    /// An enum: the cell must be one of the symbols (encoded as its index).
    Enum {
        symbols: Vec<String>,
    },
    /// `decimal` logical type on `bytes` (`fixed: None`) or on a `fixed` of
    /// that many bytes.
    Decimal {
        precision: usize,
        scale: usize,
        fixed: Option<usize>,
    },
    /// `date` logical type: days since 1970-01-01.
    Date,
    /// `timestamp-millis`: milliseconds since the Unix epoch, UTC.
    TimestampMillis,
    /// `timestamp-micros`: microseconds since the Unix epoch, UTC.
    TimestampMicros,
}

impl FieldType {
    /// The name used in exception reasons and docs (`"decimal(18,2)"`).
    pub fn describe(&self) -> String {
        match self {
            FieldType::Boolean => "boolean".into(),
            FieldType::Int => "int".into(),
            FieldType::Long => "long".into(),
            FieldType::Float => "float".into(),
            FieldType::Double => "double".into(),
            FieldType::String => "string".into(),
            FieldType::Enum { .. } => "enum".into(),
            FieldType::Decimal { precision, scale, .. } => format!("decimal({precision},{scale})"),
            FieldType::Date => "date".into(),
            FieldType::TimestampMillis => "timestamp-millis".into(),
            FieldType::TimestampMicros => "timestamp-micros".into(),
        }
    }
}

/// Where `null` sits in a nullable field's union.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Nullable {
    /// Union branch index of `null`.
    pub null_index: u32,
    /// Union branch index of the value type.
    pub value_index: u32,
}

/// One field of the record, ready for coercion.
#[derive(Debug, Clone)]
pub struct Field {
    /// Field name, as in the schema and as expected in the CSV header.
    pub name: String,
    /// Value type (the non-null branch for a nullable field).
    pub ty: FieldType,
    /// `Some` for a `["null", T]` / `[T, "null"]` union.
    pub nullable: Option<Nullable>,
    /// The field's own Avro schema (a union for nullable fields).
    pub schema: Schema,
    /// The field's default, encoded as an Avro datum of `schema`.
    pub default_datum: Option<Vec<u8>>,
    /// The field's default as an Avro value (resolved against `schema`).
    pub default_value: Option<Value>,
}

impl Field {
    /// Whether a CSV may leave this column out.
    pub fn has_default(&self) -> bool {
        self.default_datum.is_some()
    }
}

/// A record schema checked for CSV ingest.
#[derive(Debug, Clone)]
pub struct IngestSchema {
    schema: Schema,
    name: String,
    fields: Vec<Field>,
    fingerprint: [u8; 8],
}

impl IngestSchema {
    /// Reads and checks an `.avsc` file.
    pub fn load(path: impl AsRef<Path>) -> Result<Self, SchemaError> {
        let path = path.as_ref();
        let text = std::fs::read_to_string(path)
            .map_err(|source| SchemaError::Io { path: path.display().to_string(), source })?;
        Self::parse(&text)
    }

    /// Parses and checks the JSON text of an Avro schema.
    pub fn parse(avsc: &str) -> Result<Self, SchemaError> {
        let schema = Schema::parse_str(avsc).map_err(|e| SchemaError::Avro(Box::new(e)))?;
        Self::from_schema(schema)
    }

    /// Checks an already parsed schema.
    pub fn from_schema(schema: Schema) -> Result<Self, SchemaError> {
        let Schema::Record(record) = &schema else {
            return Err(SchemaError::NotARecord(kind_name(&schema)));
        };
        let mut fields = Vec::with_capacity(record.fields.len());
        for f in &record.fields {
            let (ty, nullable) = field_type(&f.name, &f.schema)?;
            let (default_datum, default_value) = match &f.default {
                None => (None, None),
                Some(json) => {
                    let bad = |reason: String| SchemaError::BadDefault {
                        field: f.name.clone(),
                        default: json.to_string(),
                        reason,
                    };
                    let value = default_value(json, &f.schema).map_err(|e| bad(e.to_string()))?;
                    let datum = GenericDatumWriter::builder(&f.schema)
                        .build()
                        .and_then(|w| w.write_value_to_vec(value.clone()))
                        .map_err(|e| bad(e.to_string()))?;
                    (Some(datum), Some(value))
                }
            };
            fields.push(Field {
                name: f.name.clone(),
                ty,
                nullable,
                schema: f.schema.clone(),
                default_datum,
                default_value,
            });
        }
        let fp = schema.fingerprint::<Rabin>();
        let mut fingerprint = [0u8; 8];
        fingerprint.copy_from_slice(&fp.bytes[..8]);
        Ok(IngestSchema { name: record.name.name().to_string(), schema, fields, fingerprint })
    }

    /// The record's name (without namespace).
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The fields in schema (= encoding) order.
    pub fn fields(&self) -> &[Field] {
        &self.fields
    }

    /// The parsed Avro schema.
    pub fn avro(&self) -> &Schema {
        &self.schema
    }

    /// CRC-64-AVRO (Rabin) fingerprint of the schema's canonical form, as
    /// the 8 little-endian bytes the Avro single-object encoding puts after
    /// its `C3 01` marker. Consumers find the writer schema by it.
    pub fn fingerprint(&self) -> [u8; 8] {
        self.fingerprint
    }

    /// [`fingerprint`](Self::fingerprint) as 16 lowercase hex digits.
    pub fn fingerprint_hex(&self) -> String {
        self.fingerprint.iter().map(|b| format!("{b:02x}")).collect()
    }

    /// Maps a CSV header onto the fields; see [`ColumnMap`].
    pub fn map_header<S: AsRef<str>>(&self, header: &[S]) -> Result<ColumnMap, HeaderError> {
        ColumnMap::new(self, header)
    }
}

/// A field default as Avro resolves it: a union's default belongs to its
/// first branch.
fn default_value(json: &serde_json::Value, schema: &Schema) -> Result<Value, apache_avro::Error> {
    let value = Value::try_from(json.clone())?;
    match schema {
        Schema::Union(u) => Ok(Value::Union(0, Box::new(value.resolve(&u.variants()[0])?))),
        _ => value.resolve(schema),
    }
}

fn kind_name(s: &Schema) -> String {
    match s {
        Schema::Record(_) => "record".into(),
        Schema::Union(_) => "union".into(),
        other => {
            let json = serde_json::to_string(other)
                .unwrap_or_else(|_| format!("{:?}", apache_avro::schema::SchemaKind::from(other)));
            if json.len() > 80 { format!("{}…", &json[..json.floor_char_boundary(80)]) } else { json }
        }
    }
}

fn field_type(name: &str, schema: &Schema) -> Result<(FieldType, Option<Nullable>), SchemaError> {
    if let Schema::Union(u) = schema {
        let v = u.variants();
        let unsupported = |why| SchemaError::Unsupported { field: name.into(), found: kind_name(schema), why };
        if v.len() != 2 {
            return Err(unsupported("only two-branch unions of null and one type are supported"));
        }
        let (null_index, value_index) = match (&v[0], &v[1]) {
            (Schema::Null, t) if !matches!(t, Schema::Null) => (0, 1),
            (t, Schema::Null) if !matches!(t, Schema::Null) => (1, 0),
            _ => return Err(unsupported("only two-branch unions of null and one type are supported")),
        };
        let ty = scalar_type(name, &v[value_index as usize])?;
        return Ok((ty, Some(Nullable { null_index, value_index })));
    }
    Ok((scalar_type(name, schema)?, None))
}

fn scalar_type(name: &str, schema: &Schema) -> Result<FieldType, SchemaError> {
    let unsupported = |why| SchemaError::Unsupported { field: name.into(), found: kind_name(schema), why };
    Ok(match schema {
        Schema::Boolean => FieldType::Boolean,
        Schema::Int => FieldType::Int,
        Schema::Long => FieldType::Long,
        Schema::Float => FieldType::Float,
        Schema::Double => FieldType::Double,
        Schema::String => FieldType::String,
        Schema::Enum(e) => FieldType::Enum { symbols: e.symbols.clone() },
        Schema::Decimal(d) => {
            if d.precision == 0 || d.precision > MAX_DECIMAL_PRECISION {
                return Err(unsupported("decimal precision must be 1..=38"));
            }
            if d.scale > d.precision {
                return Err(unsupported("decimal scale must not exceed its precision"));
            }
            let fixed = match &d.inner {
                InnerDecimalSchema::Bytes => None,
                InnerDecimalSchema::Fixed(f) => {
                    if f.size == 0 || max_precision_for_fixed(f.size) < d.precision {
                        return Err(unsupported("the fixed size cannot hold the decimal's precision"));
                    }
                    Some(f.size)
                }
            };
            FieldType::Decimal { precision: d.precision, scale: d.scale, fixed }
        }
        Schema::Date => FieldType::Date,
        Schema::TimestampMillis => FieldType::TimestampMillis,
        Schema::TimestampMicros => FieldType::TimestampMicros,
        Schema::Null => return Err(unsupported("a field that is always null carries nothing from the CSV")),
        _ => {
            return Err(unsupported(
                "supported: boolean, int, long, float, double, string, enum, decimal, date, timestamp-millis, timestamp-micros, and [\"null\", T] unions of them",
            ));
        }
    })
}

/// Largest decimal precision a two's complement `fixed` of `size` bytes holds.
fn max_precision_for_fixed(size: usize) -> usize {
    if size >= 17 {
        return MAX_DECIMAL_PRECISION;
    }
    // The largest value, 2^(8 size - 1) - 1, holds every number of
    // ilog10(max) digits.
    let max = i128::MAX >> (128 - 8 * size);
    max.ilog10() as usize
}

/// A header that does not fit the schema. Every problem is listed at once.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{}", describe_header_error(self))]
pub struct HeaderError {
    /// Fields without a default that no column names.
    pub missing: Vec<String>,
    /// Columns that name no field.
    pub unknown: Vec<String>,
    /// Columns named more than once.
    pub duplicate: Vec<String>,
}

fn describe_header_error(e: &HeaderError) -> String {
    let mut parts = Vec::new();
    if !e.missing.is_empty() {
        parts.push(format!("missing required column(s): {}", e.missing.join(", ")));
    }
    if !e.unknown.is_empty() {
        parts.push(format!("unknown column(s): {}", e.unknown.join(", ")));
    }
    if !e.duplicate.is_empty() {
        parts.push(format!("duplicate column(s): {}", e.duplicate.join(", ")));
    }
    format!("header does not fit the schema: {}", parts.join("; "))
}

/// Where a field's value comes from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Source {
    /// The CSV column with this 0-based index.
    Column(usize),
    /// The field's schema default (the column is absent from the CSV).
    Default,
}

/// For each schema field, in schema order, where its value comes from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ColumnMap {
    sources: Vec<Source>,
    columns: Vec<String>,
}

impl ColumnMap {
    fn new<S: AsRef<str>>(schema: &IngestSchema, header: &[S]) -> Result<Self, HeaderError> {
        let columns: Vec<String> = header.iter().map(|s| s.as_ref().to_string()).collect();
        let mut err = HeaderError { missing: Vec::new(), unknown: Vec::new(), duplicate: Vec::new() };
        for (i, c) in columns.iter().enumerate() {
            if columns[..i].contains(c) && !err.duplicate.contains(c) {
                err.duplicate.push(c.clone());
            }
            if !schema.fields.iter().any(|f| &f.name == c) {
                err.unknown.push(c.clone());
            }
        }
        let mut sources = Vec::with_capacity(schema.fields.len());
        for f in &schema.fields {
            match columns.iter().position(|c| c == &f.name) {
                Some(i) => sources.push(Source::Column(i)),
                None if f.has_default() => sources.push(Source::Default),
                None => err.missing.push(f.name.clone()),
            }
        }
        if err.missing.is_empty() && err.unknown.is_empty() && err.duplicate.is_empty() {
            Ok(ColumnMap { sources, columns })
        } else {
            Err(err)
        }
    }

    /// The map of a file whose header is not read yet.
    pub(crate) fn empty() -> Self {
        ColumnMap { sources: Vec::new(), columns: Vec::new() }
    }

    /// One source per schema field, in schema order.
    pub fn sources(&self) -> &[Source] {
        &self.sources
    }

    /// The CSV header as read.
    pub fn columns(&self) -> &[String] {
        &self.columns
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const SCHEMA: &str = r#"{"type":"record","name":"T","fields":[
        {"name":"a","type":"string"},
        {"name":"b","type":["null","long"]},
        {"name":"c","type":"int","default":7},
        {"name":"d","type":["null","string"],"default":null}
    ]}"#;

    #[test]
    fn header_maps_columns_in_any_order_and_defaults_absent_ones() {
        let s = IngestSchema::parse(SCHEMA).unwrap();
        let m = s.map_header(&["b", "a"]).unwrap();
        assert_eq!(m.sources(), &[Source::Column(1), Source::Column(0), Source::Default, Source::Default]);
        assert_eq!(s.fields()[2].default_datum.as_deref(), Some(&[14u8][..]));
        assert_eq!(s.fields()[3].default_datum.as_deref(), Some(&[0u8][..]));
    }

    #[test]
    fn header_errors_name_every_problem_at_once() {
        let s = IngestSchema::parse(SCHEMA).unwrap();
        let e = s.map_header(&["a", "x", "a", "y"]).unwrap_err();
        assert_eq!(e.missing, vec!["b"]);
        assert_eq!(e.unknown, vec!["x", "y"]);
        assert_eq!(e.duplicate, vec!["a"]);
        assert_eq!(
            e.to_string(),
            "header does not fit the schema: missing required column(s): b; unknown column(s): x, y; duplicate column(s): a"
        );
    }

    #[test]
    fn unsupported_types_are_refused_naming_the_field() {
        let e = IngestSchema::parse(
            r#"{"type":"record","name":"T","fields":[{"name":"xs","type":{"type":"array","items":"int"}}]}"#,
        )
        .unwrap_err();
        assert!(matches!(&e, SchemaError::Unsupported { field, .. } if field == "xs"), "{e}");
        let e = IngestSchema::parse(
            r#"{"type":"record","name":"T","fields":[{"name":"u","type":["null","int","string"]}]}"#,
        )
        .unwrap_err();
        assert!(e.to_string().contains("\"u\""), "{e}");
        let e = IngestSchema::parse(r#""string""#).unwrap_err();
        assert!(matches!(e, SchemaError::NotARecord(_)), "{e}");
        let e = IngestSchema::parse(
            r#"{"type":"record","name":"T","fields":[{"name":"d","type":{"type":"bytes","logicalType":"decimal","precision":40,"scale":2}}]}"#,
        )
        .unwrap_err();
        assert!(e.to_string().contains("1..=38"), "{e}");
    }

    #[test]
    fn a_default_that_does_not_fit_is_refused_naming_the_field() {
        let e = IngestSchema::parse(
            r#"{"type":"record","name":"T","fields":[{"name":"when","type":{"type":"int","logicalType":"date"},"default":"soon"}]}"#,
        )
        .unwrap_err();
        // apache-avro checks most defaults itself; either way the field is named.
        assert!(e.to_string().contains("field `when`"), "{e}");
        let e = IngestSchema::parse(
            r#"{"type":"record","name":"T","fields":[{"name":"d","type":{"type":"enum","name":"D","symbols":["A"]},"default":"B"}]}"#,
        )
        .unwrap_err();
        assert!(e.to_string().contains("field `d`") && e.to_string().contains("\"B\""), "{e}");
    }

    #[test]
    fn fixed_decimal_size_must_hold_the_precision() {
        assert_eq!(max_precision_for_fixed(1), 2);
        assert_eq!(max_precision_for_fixed(8), 18);
        assert_eq!(max_precision_for_fixed(16), 38);
    }
}
