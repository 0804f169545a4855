//! What the rules can see of an Avro record schema: its top-level fields, each
//! with its position, nullability and the scalar type that rules compare.
//!
//! Invariants: `fields[i]` is the schema's field at position `i`, the position
//! a record's values have in `apache_avro::types::Value::Record` decoded with
//! that schema; named types (`Schema::Ref`) are resolved against the types the
//! schema itself defines. A union `["null", T]` (either order) is a nullable
//! `T`; a union with two or more non-null branches, and types without an order
//! or equality that rules can use (array, map, record, bytes, fixed, uuid,
//! time-of-day, duration, big-decimal, decimal above 38 digits), become
//! [`ScalarType::Unsupported`]: such a field can be tested with `NULL` /
//! `NOT NULL` only.

use std::collections::HashMap;

use apache_avro::Schema;

/// How a timestamp field counts time since the epoch.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TimeUnit {
    Millis,
    Micros,
    Nanos,
}

impl TimeUnit {
    /// Nanoseconds in one unit.
    pub fn nanos(self) -> i128 {
        match self {
            TimeUnit::Millis => 1_000_000,
            TimeUnit::Micros => 1_000,
            TimeUnit::Nanos => 1,
        }
    }
}

/// The type of a field as far as rules are concerned.
#[derive(Clone, Debug, PartialEq)]
pub enum ScalarType {
    Bool,
    /// Avro `int` or `long`, compared as `i64`.
    Int,
    /// Avro `float` (`single = true`) or `double`, compared as `f64`.
    Float {
        single: bool,
    },
    /// Avro `decimal` with at most 38 digits, compared as the unscaled `i128`.
    Decimal {
        scale: u32,
    },
    /// Avro `date`: days since the epoch.
    Date,
    /// Avro `timestamp-*` or `local-timestamp-*` in its unit.
    Timestamp(TimeUnit),
    /// Avro `string`.
    String,
    /// Avro `enum`, compared by symbol.
    Enum {
        name: String,
        symbols: Vec<String>,
    },
    /// Anything rules cannot compare; the text describes the Avro type.
    Unsupported(String),
}

/// One top-level field of the record schema. Whether it is nullable does not
/// matter to the checker (null is handled at evaluation); it shows in `type_name`.
#[derive(Clone, Debug)]
pub struct FieldInfo {
    pub name: String,
    /// Position in the record.
    pub index: usize,
    pub ty: ScalarType,
    /// The Avro type as users know it (`long`, `decimal(18,2)`, `enum Desk`, …), for messages.
    pub type_name: String,
}

/// The fields of a record schema, by position and by name.
#[derive(Clone, Debug)]
pub struct RecordFields {
    pub fields: Vec<FieldInfo>,
    by_name: HashMap<String, usize>,
}

impl RecordFields {
    /// Reads the top-level fields of `schema`, which must be a record.
    pub fn from_schema(schema: &Schema) -> Result<RecordFields, String> {
        let Schema::Record(record) = schema else {
            return Err(format!("the schema must be a record, not {}", describe(schema)));
        };
        let mut named = HashMap::new();
        collect_named(schema, &mut named);
        let fields: Vec<FieldInfo> = record
            .fields
            .iter()
            .enumerate()
            .map(|(index, field)| {
                let (ty, type_name) = scalar(&field.schema, &named);
                FieldInfo { name: field.name.clone(), index, ty, type_name }
            })
            .collect();
        let by_name = fields.iter().map(|f| (f.name.clone(), f.index)).collect();
        Ok(RecordFields { fields, by_name })
    }

    pub fn get(&self, name: &str) -> Option<&FieldInfo> {
        self.by_name.get(name).map(|&i| &self.fields[i])
    }
}

/// Every named type (record, enum, fixed) defined anywhere in `schema`, by full and short name.
fn collect_named<'a>(schema: &'a Schema, named: &mut HashMap<String, &'a Schema>) {
    if let Some(name) = schema.name().filter(|_| !matches!(schema, Schema::Ref { .. })) {
        named.insert(name.fullname(None), schema);
        named.entry(name.name().to_string()).or_insert(schema);
    }
    match schema {
        Schema::Record(r) => r.fields.iter().for_each(|f| collect_named(&f.schema, named)),
        Schema::Array(a) => collect_named(&a.items, named),
        Schema::Map(m) => collect_named(&m.types, named),
        Schema::Union(u) => u.variants().iter().for_each(|v| collect_named(v, named)),
        _ => {}
    }
}

fn resolve<'a>(schema: &'a Schema, named: &HashMap<String, &'a Schema>) -> &'a Schema {
    match schema {
        Schema::Ref { name } => {
            named.get(&name.fullname(None)).or_else(|| named.get(name.name())).copied().unwrap_or(schema)
        }
        other => other,
    }
}

/// (type, type name) of a field schema.
fn scalar(schema: &Schema, named: &HashMap<String, &Schema>) -> (ScalarType, String) {
    let schema = resolve(schema, named);
    if let Schema::Union(union) = schema {
        let non_null: Vec<&Schema> =
            union.variants().iter().map(|v| resolve(v, named)).filter(|v| !matches!(v, Schema::Null)).collect();
        let nullable = non_null.len() < union.variants().len();
        return match non_null.as_slice() {
            [] => (ScalarType::Unsupported("null".into()), "null".into()),
            [one] => {
                let (ty, name) = scalar(one, named);
                (ty, if nullable { format!("nullable {name}") } else { name })
            }
            many => {
                let names: Vec<String> = many.iter().map(|s| describe(s)).collect();
                let name = format!("union of {}", names.join(", "));
                (ScalarType::Unsupported(name.clone()), name)
            }
        };
    }
    let ty = match schema {
        Schema::Boolean => ScalarType::Bool,
        Schema::Int | Schema::Long => ScalarType::Int,
        Schema::Float => ScalarType::Float { single: true },
        Schema::Double => ScalarType::Float { single: false },
        Schema::String => ScalarType::String,
        Schema::Date => ScalarType::Date,
        Schema::TimestampMillis | Schema::LocalTimestampMillis => ScalarType::Timestamp(TimeUnit::Millis),
        Schema::TimestampMicros | Schema::LocalTimestampMicros => ScalarType::Timestamp(TimeUnit::Micros),
        Schema::TimestampNanos | Schema::LocalTimestampNanos => ScalarType::Timestamp(TimeUnit::Nanos),
        Schema::Decimal(d) if d.precision <= 38 => {
            ScalarType::Decimal { scale: u32::try_from(d.scale).unwrap_or(u32::MAX) }
        }
        Schema::Enum(e) => ScalarType::Enum { name: e.name.name().to_string(), symbols: e.symbols.clone() },
        Schema::Null => ScalarType::Unsupported("null".into()),
        other => ScalarType::Unsupported(describe(other)),
    };
    (ty, describe(schema))
}

/// The Avro type as users write it.
fn describe(schema: &Schema) -> String {
    match schema {
        Schema::Null => "null".into(),
        Schema::Boolean => "boolean".into(),
        Schema::Int => "int".into(),
        Schema::Long => "long".into(),
        Schema::Float => "float".into(),
        Schema::Double => "double".into(),
        Schema::Bytes => "bytes".into(),
        Schema::String => "string".into(),
        Schema::Array(_) => "array".into(),
        Schema::Map(_) => "map".into(),
        Schema::Union(_) => "union".into(),
        Schema::Record(r) => format!("record {}", r.name.name()),
        Schema::Enum(e) => format!("enum {}", e.name.name()),
        Schema::Fixed(f) => format!("fixed {}", f.name.name()),
        Schema::Decimal(d) => format!("decimal({},{})", d.precision, d.scale),
        Schema::BigDecimal => "big-decimal".into(),
        Schema::Uuid(_) => "uuid".into(),
        Schema::Date => "date".into(),
        Schema::TimeMillis => "time-millis".into(),
        Schema::TimeMicros => "time-micros".into(),
        Schema::TimestampMillis => "timestamp-millis".into(),
        Schema::TimestampMicros => "timestamp-micros".into(),
        Schema::TimestampNanos => "timestamp-nanos".into(),
        Schema::LocalTimestampMillis => "local-timestamp-millis".into(),
        Schema::LocalTimestampMicros => "local-timestamp-micros".into(),
        Schema::LocalTimestampNanos => "local-timestamp-nanos".into(),
        Schema::Duration(_) => "duration".into(),
        Schema::Ref { name } => name.name().to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_scalars_nullables_refs_and_unsupported_types() {
        let schema = Schema::parse_str(
            r#"{"type":"record","name":"R","namespace":"n","fields":[
                {"name":"a","type":"long"},
                {"name":"b","type":["null",{"type":"enum","name":"Desk","symbols":["RATES","FX"]}]},
                {"name":"c","type":"Desk"},
                {"name":"d","type":{"type":"bytes","logicalType":"decimal","precision":10,"scale":2}},
                {"name":"e","type":["null","string","long"]},
                {"name":"f","type":{"type":"map","values":"double"}},
                {"name":"g","type":[{"type":"long","logicalType":"timestamp-millis"},"null"]}
            ]}"#,
        )
        .unwrap();
        let fields = RecordFields::from_schema(&schema).unwrap();
        let f = |n: &str| fields.get(n).unwrap();
        assert_eq!((f("a").type_name.as_str(), &f("a").ty), ("long", &ScalarType::Int));
        let desk = ScalarType::Enum { name: "Desk".into(), symbols: vec!["RATES".into(), "FX".into()] };
        assert_eq!((f("b").type_name.as_str(), &f("b").ty), ("nullable enum Desk", &desk));
        assert_eq!(f("c").ty, desk);
        assert_eq!(f("d").ty, ScalarType::Decimal { scale: 2 });
        assert!(matches!(&f("e").ty, ScalarType::Unsupported(s) if s == "union of string, long"));
        assert!(matches!(&f("f").ty, ScalarType::Unsupported(s) if s == "map"));
        assert_eq!(
            (f("g").type_name.as_str(), &f("g").ty),
            ("nullable timestamp-millis", &ScalarType::Timestamp(TimeUnit::Millis))
        );
        assert_eq!(f("g").index, 6);
    }
}
