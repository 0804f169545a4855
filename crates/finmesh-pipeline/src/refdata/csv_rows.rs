//! Reference rows from a CSV file: what `finmesh refdata load` reads.
//!
//! The file has a header. Each data row becomes one [`RefRow`]: the key is
//! the value of the key column (the first column unless named), the value
//! is a JSON object of the row's other columns (`{"name":"Euro",…}`, every
//! value a string). A row with another number of fields than the header, a
//! row that is not UTF-8 or an empty key is an `Invalid` error naming its
//! line, which aborts the load (the version stays invisible).

use std::io::Read;

use bytes::Bytes;
use finmesh_core::{Error, Result};

use super::RefRow;

/// The rows of the CSV `input`, keyed by column `key` (default: the first).
/// Errors in the header are returned at once; errors in rows come out of
/// the iterator.
pub fn csv_rows<R: Read + Send + 'static>(
    input: R,
    key: Option<&str>,
) -> Result<impl Iterator<Item = Result<RefRow>> + Send + 'static> {
    let mut reader = csv::ReaderBuilder::new().has_headers(true).from_reader(input);
    let header: Vec<String> = reader
        .headers()
        .map_err(|e| Error::invalid(format!("reference file header: {e}")))?
        .iter()
        .map(str::to_owned)
        .collect();
    if header.is_empty() || header.iter().all(String::is_empty) {
        return Err(Error::invalid("reference file has no header"));
    }
    let key_index = match key {
        None => 0,
        Some(k) => header.iter().position(|h| h == k).ok_or_else(|| {
            Error::invalid(format!("reference file has no column `{k}`; its columns are {}", header.join(", ")))
        })?,
    };
    let mut records = reader.into_records();
    Ok(std::iter::from_fn(move || {
        let record = records.next()?;
        Some(record.map_err(|e| Error::invalid(format!("reference file: {e}"))).and_then(|r| {
            let line = r.position().map(|p| p.line()).unwrap_or(0);
            let key = r.get(key_index).unwrap_or_default();
            if key.is_empty() {
                return Err(Error::invalid(format!("reference file line {line}: the key column is empty")));
            }
            let mut value = serde_json::Map::new();
            for (i, (name, cell)) in header.iter().zip(r.iter()).enumerate() {
                if i != key_index {
                    value.insert(name.clone(), serde_json::Value::String(cell.to_owned()));
                }
            }
            let json = serde_json::to_vec(&value).map_err(|e| Error::internal(e.to_string()))?;
            Ok((key.to_owned(), Bytes::from(json)))
        }))
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rows_are_keyed_and_valued_as_json() {
        let csv = "ccy,name,minor\nEUR,Euro,2\nJPY,Yen,0\n";
        let rows: Vec<_> = csv_rows(csv.as_bytes(), None).unwrap().collect::<Result<_>>().unwrap();
        assert_eq!(rows[0].0, "EUR");
        assert_eq!(&rows[0].1[..], br#"{"minor":"2","name":"Euro"}"#);
        let rows: Vec<_> = csv_rows(csv.as_bytes(), Some("name")).unwrap().collect::<Result<_>>().unwrap();
        assert_eq!(rows[1].0, "Yen");
        assert!(csv_rows(csv.as_bytes(), Some("nope")).is_err());
        let bad: Vec<_> = csv_rows("a,b\n1\n".as_bytes(), None).unwrap().collect();
        assert!(bad[0].is_err(), "a short row is an error");
        let empty: Vec<_> = csv_rows("a,b\n,1\n".as_bytes(), None).unwrap().collect();
        assert!(empty[0].as_ref().unwrap_err().to_string().contains("line 2"), "{empty:?}");
    }
}
