//! The JSON envelope of a message or KV entry, as sent in SSE `data:`,
//! WebSocket text frames, NDJSON reads and consumer fetches.
//!
//! Format (one line, no newline inside):
//!
//! ```text
//! {"seq":42,"subject":"md.eu.x","time":"2026-11-22T06:25:18.123456789Z","headers":{"a":"1"},"payload":{"px":1.5}}
//! {"seq":43,"subject":"md.eu.x","time":"…","payload":"AAEC","encoding":"base64"}
//! {"revision":7,"key":"card.1","op":"put","time":"…","payload":"…"}
//! ```
//!
//! Invariants:
//! - payloads are bytes and are never rewritten: `payload` is inline exactly
//!   when the bytes are one JSON value with no whitespace before or after it
//!   and no CR or LF anywhere (an envelope is one line), and then it is those
//!   bytes unchanged, so a client that takes the member's raw text (for
//!   example `serde_json::value::RawValue`) gets the published bytes back.
//!   Any other payload is a base64 (standard alphabet, padded) string and
//!   `"encoding":"base64"` is present;
//! - `headers` is omitted when empty; a header repeated under one name
//!   becomes an array of its values, in order;
//! - `time` is RFC 3339 in UTC with nanoseconds.

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as B64;
use bytes::Bytes;
use finmesh_core::{Headers, KvEntry, KvOp, Message, Timestamp};
use serde_json::value::RawValue;
use serde_json::{Map, Value};

/// RFC 3339 text of a timestamp.
pub fn rfc3339(t: Timestamp) -> String {
    time::OffsetDateTime::from_unix_timestamp_nanos(i128::from(t.as_nanos()))
        .ok()
        .and_then(|d| d.format(&time::format_description::well_known::Rfc3339).ok())
        .unwrap_or_else(|| "1970-01-01T00:00:00Z".to_owned())
}

/// Append `,"payload":…` (and the encoding member when needed) to `out`.
fn push_payload(out: &mut Vec<u8>, payload: &[u8]) {
    out.extend_from_slice(b",\"payload\":");
    if is_inline_json(payload) {
        out.extend_from_slice(payload);
    } else {
        out.push(b'"');
        out.extend_from_slice(B64.encode(payload).as_bytes());
        out.extend_from_slice(b"\",\"encoding\":\"base64\"");
    }
}

/// Whether `payload` can stand inline in a one-line envelope unchanged: one
/// JSON value, nothing around it, no CR or LF (which JSON allows only as
/// whitespace between tokens, and which a one-line envelope cannot carry).
fn is_inline_json(payload: &[u8]) -> bool {
    let (Some(first), Some(last)) = (payload.first(), payload.last()) else {
        return false;
    };
    !first.is_ascii_whitespace()
        && !last.is_ascii_whitespace()
        && !payload.iter().any(|b| matches!(b, b'\n' | b'\r'))
        && serde_json::from_slice::<serde::de::IgnoredAny>(payload).is_ok()
}

fn headers_json(headers: &Headers) -> Value {
    let mut map = Map::new();
    for (name, value) in headers.iter() {
        match map.get_mut(name) {
            Some(Value::Array(values)) => values.push(value.into()),
            Some(first) => {
                let first = first.take();
                map.insert(name.to_owned(), Value::Array(vec![first, value.into()]));
            }
            None => {
                map.insert(name.to_owned(), value.into());
            }
        }
    }
    Value::Object(map)
}

fn push_json(out: &mut Vec<u8>, v: &impl serde::Serialize) {
    // Serializing strings and maps of strings into a Vec cannot fail.
    let _ = serde_json::to_writer(&mut *out, v);
}

/// The envelope of a stream message.
pub fn message(msg: &Message) -> Bytes {
    let mut out = Vec::with_capacity(96 + msg.payload.len() * 4 / 3);
    out.extend_from_slice(format!("{{\"seq\":{},\"subject\":", msg.seq.0).as_bytes());
    push_json(&mut out, &msg.subject.as_str());
    out.extend_from_slice(b",\"time\":");
    push_json(&mut out, &rfc3339(msg.time));
    if !msg.headers.is_empty() {
        out.extend_from_slice(b",\"headers\":");
        push_json(&mut out, &headers_json(&msg.headers));
    }
    push_payload(&mut out, &msg.payload);
    out.push(b'}');
    Bytes::from(out)
}

/// The envelope of a stream message with extra members appended (consumer
/// deliveries add `delivery_count` and `token`).
pub fn message_with(msg: &Message, extra: &[(&str, Value)]) -> Bytes {
    let base = message(msg);
    let mut out = base[..base.len() - 1].to_vec();
    for (k, v) in extra {
        out.push(b',');
        push_json(&mut out, k);
        out.push(b':');
        push_json(&mut out, v);
    }
    out.push(b'}');
    Bytes::from(out)
}

/// Name of a KV op in envelopes.
pub fn op_name(op: KvOp) -> &'static str {
    match op {
        KvOp::Put => "put",
        KvOp::Delete => "delete",
        KvOp::Purge => "purge",
    }
}

/// The envelope of a KV entry (watch and history); markers have no payload.
pub fn kv_entry(e: &KvEntry) -> Bytes {
    let mut out = Vec::with_capacity(96 + e.value.len() * 4 / 3);
    out.extend_from_slice(format!("{{\"revision\":{},\"key\":", e.revision.0).as_bytes());
    push_json(&mut out, &e.key.as_str());
    out.extend_from_slice(format!(",\"op\":\"{}\",\"time\":", op_name(e.op)).as_bytes());
    push_json(&mut out, &rfc3339(e.created));
    if e.op == KvOp::Put {
        push_payload(&mut out, &e.value);
    }
    out.push(b'}');
    Bytes::from(out)
}

/// Payload bytes of an NDJSON batch line: the JSON value's exact bytes as
/// they stand in the line, or the decoded base64 string when `encoding` is
/// `base64`.
pub fn decode_payload(payload: Option<&RawValue>, encoding: Option<&str>) -> Result<Bytes, String> {
    match (payload, encoding) {
        (None, _) => Ok(Bytes::new()),
        (Some(raw), Some("base64")) => {
            let text: String =
                serde_json::from_str(raw.get()).map_err(|_| "a base64 payload must be a string".to_owned())?;
            B64.decode(text).map(Bytes::from).map_err(|e| format!("payload is not valid base64: {e}"))
        }
        (Some(_), Some(other)) => Err(format!("unknown encoding `{other}`; only `base64` is known")),
        (Some(raw), None) => Ok(Bytes::copy_from_slice(raw.get().as_bytes())),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use finmesh_core::{Seq, Subject};

    fn msg(payload: &'static [u8]) -> Message {
        let mut headers = Headers::new();
        headers.append("a", "1").unwrap();
        headers.append("a", "2").unwrap();
        Message {
            seq: Seq(3),
            subject: Subject::new("x.y").unwrap(),
            headers,
            payload: Bytes::from_static(payload),
            time: Timestamp(1_500_000_000),
        }
    }

    #[derive(serde::Deserialize)]
    struct Raw<'a> {
        #[serde(borrow)]
        payload: &'a RawValue,
        encoding: Option<&'a str>,
    }

    #[test]
    fn json_payload_is_inline_and_unchanged() {
        let payload = b"{\"b\": 1.50,\"a\":[1e2, 12345678901234567890123]}";
        let bytes = message(&msg(payload));
        let v: Value = serde_json::from_slice(&bytes).unwrap();
        assert!(v.get("encoding").is_none());
        assert_eq!(v["seq"], 3);
        assert_eq!(v["headers"]["a"], serde_json::json!(["1", "2"]));
        assert_eq!(v["time"], "1970-01-01T00:00:01.5Z");
        let raw: Raw = serde_json::from_slice(&bytes).unwrap();
        assert_eq!(raw.payload.get().as_bytes(), payload);
    }

    #[test]
    fn json_with_line_breaks_or_outer_whitespace_is_base64() {
        for payload in [&b"{\n \"px\": 1.5\r\n}"[..], b" 1", b"1 ", b"\t{}", b""] {
            let bytes = message(&msg(payload));
            assert!(!bytes.contains(&b'\n'));
            let raw: Raw = serde_json::from_slice(&bytes).unwrap();
            assert_eq!(raw.encoding, Some("base64"), "{payload:?}");
            assert_eq!(&decode_payload(Some(raw.payload), raw.encoding).unwrap()[..], payload);
        }
    }

    #[test]
    fn a_batch_payload_keeps_its_bytes() {
        let line = br#"{"payload": {"z":1,"a":1.50}  }"#;
        let raw: Raw = serde_json::from_slice(line).unwrap();
        assert_eq!(&decode_payload(Some(raw.payload), None).unwrap()[..], br#"{"z":1,"a":1.50}"#);
    }

    #[test]
    fn binary_payload_is_base64() {
        let bytes = message(&msg(b"\x00\x01not json"));
        assert!(!bytes.contains(&b'\n'));
        let raw: Raw = serde_json::from_slice(&bytes).unwrap();
        assert_eq!(raw.encoding, Some("base64"));
        let back = decode_payload(Some(raw.payload), raw.encoding).unwrap();
        assert_eq!(&back[..], b"\x00\x01not json");
    }
}
