//! Byte encodings of everything the embedded engine stores.
//!
//! Message record (value in a stream's `m` keyspace), version 1:
//!
//! ```text
//! u8   version (1)
//! u64  time, ns since the epoch, big endian
//! u16  subject length, then the subject bytes
//! u16  header count, then per header: u16 name length, name, u32 value length, value
//! ...  payload (the rest)
//! ```
//!
//! Keys are big-endian so byte order is numeric order. Index entries in a
//! stream's `x` keyspace are `subject 0x00 seq(u64 BE)`: subjects never
//! contain `0x00`, so a prefix scan of `subject 0x00` finds exactly one
//! subject's sequences, in order. Values in the `l` keyspace are
//! `last_seq(u64 BE) count(u64 BE)`.
//!
//! Invariant: decoding never panics; any inconsistency is an `Internal`
//! error naming what is corrupt. A corrupt record is reported, never skipped.

use bytes::{BufMut, Bytes, BytesMut};
use finmesh_core::{Error, Headers, Message, Result, Seq, Subject, Timestamp};

const RECORD_VERSION: u8 = 1;

/// Encode a message record.
pub(crate) fn encode_message(time: Timestamp, subject: &Subject, headers: &Headers, payload: &[u8]) -> Bytes {
    let s = subject.as_str().as_bytes();
    let mut buf =
        BytesMut::with_capacity(1 + 8 + 2 + s.len() + 2 + headers.encoded_len() + 6 * headers.len() + payload.len());
    buf.put_u8(RECORD_VERSION);
    buf.put_u64(time.0);
    buf.put_u16(s.len() as u16);
    buf.put_slice(s);
    buf.put_u16(headers.len() as u16);
    for (n, v) in headers.iter() {
        buf.put_u16(n.len() as u16);
        buf.put_slice(n.as_bytes());
        buf.put_u32(v.len() as u32);
        buf.put_slice(v.as_bytes());
    }
    buf.put_slice(payload);
    buf.freeze()
}

struct Reader<'a> {
    buf: &'a [u8],
    pos: usize,
}

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Option<&'a [u8]> {
        let end = self.pos.checked_add(n)?;
        let s = self.buf.get(self.pos..end)?;
        self.pos = end;
        Some(s)
    }
    fn u16(&mut self) -> Option<u16> {
        self.take(2).map(|b| u16::from_be_bytes([b[0], b[1]]))
    }
    fn u32(&mut self) -> Option<u32> {
        self.take(4).map(|b| u32::from_be_bytes(b.try_into().unwrap_or_default()))
    }
    fn u64(&mut self) -> Option<u64> {
        self.take(8).map(|b| u64::from_be_bytes(b.try_into().unwrap_or_default()))
    }
    fn str(&mut self, n: usize) -> Option<&'a str> {
        std::str::from_utf8(self.take(n)?).ok()
    }
}

/// Decode a message record stored at `seq`. `raw` is shared, so the payload
/// is a zero-copy slice of it.
pub(crate) fn decode_message(seq: Seq, raw: Bytes) -> Result<Message> {
    let corrupt = |what: &str| Error::internal(format!("corrupt message record at seq {seq}: {what}"));
    let mut r = Reader { buf: &raw, pos: 0 };
    match r.take(1) {
        Some([RECORD_VERSION]) => {}
        Some([v]) => return Err(corrupt(&format!("unknown record version {v}"))),
        _ => return Err(corrupt("empty record")),
    }
    let time = r.u64().ok_or_else(|| corrupt("truncated time"))?;
    let slen = r.u16().ok_or_else(|| corrupt("truncated subject length"))? as usize;
    let subject = r.str(slen).ok_or_else(|| corrupt("truncated or non-UTF-8 subject"))?;
    let subject = Subject::new(subject).map_err(|e| corrupt(&format!("bad subject: {}", e.message())))?;
    let count = r.u16().ok_or_else(|| corrupt("truncated header count"))?;
    let mut headers = Headers::new();
    for _ in 0..count {
        let nlen = r.u16().ok_or_else(|| corrupt("truncated header"))? as usize;
        let name = r.str(nlen).ok_or_else(|| corrupt("truncated header name"))?;
        let vlen = r.u32().ok_or_else(|| corrupt("truncated header"))? as usize;
        let value = r.str(vlen).ok_or_else(|| corrupt("truncated header value"))?;
        headers.append(name, value).map_err(|e| corrupt(&format!("bad header: {}", e.message())))?;
    }
    let payload = raw.slice(r.pos..);
    Ok(Message { seq, subject, headers, payload, time: Timestamp(time) })
}

/// Key of a message in a stream's `m` keyspace.
pub(crate) fn seq_key(seq: Seq) -> [u8; 8] {
    seq.0.to_be_bytes()
}

/// Sequence from an `m` key.
pub(crate) fn key_seq(key: &[u8]) -> Result<Seq> {
    let arr: [u8; 8] =
        key.try_into().map_err(|_| Error::internal(format!("corrupt message key of {} bytes", key.len())))?;
    Ok(Seq(u64::from_be_bytes(arr)))
}

/// Prefix of a subject's entries in the `x` keyspace.
pub(crate) fn subject_prefix(subject: &str) -> Vec<u8> {
    let mut k = Vec::with_capacity(subject.len() + 9);
    k.extend_from_slice(subject.as_bytes());
    k.push(0);
    k
}

/// An `x` keyspace entry: `subject 0x00 seq`.
pub(crate) fn index_key(subject: &str, seq: Seq) -> Vec<u8> {
    let mut k = subject_prefix(subject);
    k.extend_from_slice(&seq.0.to_be_bytes());
    k
}

/// Sequence from an `x` key.
pub(crate) fn index_key_seq(key: &[u8]) -> Result<Seq> {
    let tail = key.len().checked_sub(8).ok_or_else(|| Error::internal("corrupt subject index key"))?;
    key_seq(&key[tail..])
}

/// An `l` keyspace value: the subject's last sequence and its message count.
pub(crate) fn encode_last(last: Seq, count: u64) -> [u8; 16] {
    let mut v = [0u8; 16];
    v[..8].copy_from_slice(&last.0.to_be_bytes());
    v[8..].copy_from_slice(&count.to_be_bytes());
    v
}

/// Decode an `l` keyspace value.
pub(crate) fn decode_last(v: &[u8]) -> Result<(Seq, u64)> {
    if v.len() != 16 {
        return Err(Error::internal(format!("corrupt last-per-subject entry of {} bytes", v.len())));
    }
    let last = u64::from_be_bytes(v[..8].try_into().unwrap_or_default());
    let count = u64::from_be_bytes(v[8..].try_into().unwrap_or_default());
    Ok((Seq(last), count))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn message_round_trip() {
        let mut h = Headers::new();
        h.append("Nats-Msg-Id", "abc").unwrap();
        h.append("X", "").unwrap();
        let s = Subject::new("a.b").unwrap();
        let raw = encode_message(Timestamp(42), &s, &h, b"payload");
        let m = decode_message(Seq(7), raw).unwrap();
        assert_eq!(m.seq, Seq(7));
        assert_eq!(m.subject, s);
        assert_eq!(m.headers, h);
        assert_eq!(&m.payload[..], b"payload");
        assert_eq!(m.time, Timestamp(42));
    }

    #[test]
    fn truncated_records_are_errors_not_panics() {
        let s = Subject::new("a.b").unwrap();
        let mut h = Headers::new();
        h.append("k", "v").unwrap();
        let raw = encode_message(Timestamp(1), &s, &h, b"xyz");
        // Every strict prefix that cuts into the header section must fail cleanly.
        for cut in 0..raw.len() - 3 {
            let e = decode_message(Seq(1), raw.slice(..cut)).unwrap_err();
            assert_eq!(e.kind(), finmesh_core::ErrorKind::Internal, "cut {cut}");
        }
        let mut bad = raw.to_vec();
        bad[0] = 9;
        assert!(decode_message(Seq(1), bad.into()).unwrap_err().message().contains("version 9"));
    }

    #[test]
    fn index_keys_sort_by_subject_then_seq() {
        let a = index_key("a", Seq(300));
        let b = index_key("a", Seq(2));
        let c = index_key("a.b", Seq(1));
        assert!(b < a && a < c);
        assert_eq!(index_key_seq(&a).unwrap(), Seq(300));
        assert_eq!(decode_last(&encode_last(Seq(5), 3)).unwrap(), (Seq(5), 3));
    }
}
