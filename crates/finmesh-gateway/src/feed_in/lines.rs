//! Framing and parsing of feed lines: bytes as they arrive (HTTP chunks or
//! WebSocket frames) become numbered lines ([`LineSplitter`]), and each line
//! becomes one [`OutgoingMessage`] ([`parse_line`]).
//!
//! Line format (one JSON object per line, UTF-8, `\n`-terminated, `\r\n`
//! accepted; blank lines are skipped but counted, so they serve as
//! keepalives):
//!
//! ```text
//! {"symbol":"AAPL","msg_id":"feed1-000042","payload":{"bid":189.1,"ask":189.2}}
//! {"subject":"md.AAPL","msg_id":"feed1-000043","payload":"AAEC","encoding":"base64","headers":{"src":"x"}}
//! ```
//!
//! - exactly one of `subject` and `symbol`; `symbol` `S` means the subject
//!   `<prefix>.S` (prefix `md` unless the route was given another);
//! - `msg_id` (alias `id`) is required: it is the engine's `Msg-Id`, so a
//!   line sent again (after a reconnect, or to another receiver of the same
//!   stream) within the stream's duplicate window is acked as a duplicate
//!   and stored once;
//! - `payload`, `encoding` and `headers` as in an NDJSON batch publish.
//!
//! Invariants:
//! - a line is never longer than the splitter's limit: the splitter fails
//!   before it buffers more than `max_line_bytes` without a newline;
//! - a payload is the exact bytes of the line's JSON value, sliced from the
//!   line buffer without a copy (base64 payloads are decoded);
//! - a line that fails here was not published and nothing after it is read.

use bytes::{Bytes, BytesMut};
use finmesh_core::{Error, OutgoingMessage, Subject};
use serde::Deserialize;
use serde_json::value::RawValue;

/// Splits a byte stream into lines of at most `max_line_bytes` (without the
/// terminator), numbering them from 1.
#[derive(Debug)]
pub struct LineSplitter {
    buf: BytesMut,
    max_line_bytes: usize,
    /// Number of the last line returned (blank ones included).
    line_no: u64,
    /// Bytes of `buf` already searched for a newline.
    scanned: usize,
}

/// Why the splitter stopped.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TooLong {
    /// The line that is too long.
    pub line: u64,
    /// The limit it passed.
    pub max_line_bytes: usize,
}

impl LineSplitter {
    /// A splitter refusing lines longer than `max_line_bytes`.
    pub fn new(max_line_bytes: usize) -> Self {
        LineSplitter { buf: BytesMut::new(), max_line_bytes, line_no: 0, scanned: 0 }
    }

    /// Append received bytes.
    pub fn extend(&mut self, chunk: &[u8]) {
        self.buf.extend_from_slice(chunk);
    }

    /// The next complete line (terminator removed) with its number, `None`
    /// when no complete line is buffered; an error when the buffered part
    /// of the next line is already too long.
    pub fn next_line(&mut self) -> Result<Option<(u64, Bytes)>, TooLong> {
        match memchr_newline(&self.buf[self.scanned..]) {
            Some(at) => {
                let end = self.scanned + at;
                self.scanned = 0;
                let mut line = self.buf.split_to(end + 1).freeze();
                line.truncate(end);
                if line.last() == Some(&b'\r') {
                    line.truncate(end - 1);
                }
                self.line_no += 1;
                if line.len() > self.max_line_bytes {
                    return Err(TooLong { line: self.line_no, max_line_bytes: self.max_line_bytes });
                }
                Ok(Some((self.line_no, line)))
            }
            None => {
                self.scanned = self.buf.len();
                if self.buf.len() > self.max_line_bytes {
                    return Err(TooLong { line: self.line_no + 1, max_line_bytes: self.max_line_bytes });
                }
                Ok(None)
            }
        }
    }

    /// At the end of the input: the last line if it had no terminator.
    pub fn finish(&mut self) -> Option<(u64, Bytes)> {
        if self.buf.is_empty() {
            return None;
        }
        self.scanned = 0;
        self.line_no += 1;
        Some((self.line_no, self.buf.split().freeze()))
    }

    /// Bytes of an unfinished line held (a partial line when input stops).
    pub fn pending(&self) -> usize {
        self.buf.len()
    }

    /// Number of the line being received (the last complete one + 1).
    pub fn current_line(&self) -> u64 {
        self.line_no + 1
    }
}

fn memchr_newline(b: &[u8]) -> Option<usize> {
    b.iter().position(|c| *c == b'\n')
}

/// One feed line.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct FeedLine<'a> {
    #[serde(default, borrow)]
    subject: Option<&'a str>,
    #[serde(default, borrow)]
    symbol: Option<&'a str>,
    #[serde(default, alias = "id")]
    msg_id: Option<String>,
    #[serde(default, borrow, deserialize_with = "present")]
    payload: Option<&'a RawValue>,
    #[serde(default)]
    encoding: Option<String>,
    #[serde(default)]
    headers: Option<std::collections::BTreeMap<String, String>>,
}

/// A member that is present, even as `null`.
fn present<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Option<&'de RawValue>, D::Error> {
    <&'de RawValue>::deserialize(d).map(Some)
}

/// Why a line was refused: its column when the JSON itself is bad.
#[derive(Debug)]
pub struct LineError {
    /// 1-based column of a JSON syntax error.
    pub column: Option<usize>,
    /// The error (kind `Invalid` or `TooLarge`).
    pub error: Error,
}

impl LineError {
    fn invalid(message: impl Into<String>) -> Self {
        LineError { column: None, error: Error::invalid(message) }
    }
}

impl From<Error> for LineError {
    fn from(error: Error) -> Self {
        LineError { column: None, error }
    }
}

/// Whether a line holds nothing but whitespace (a keepalive).
pub fn is_blank(line: &[u8]) -> bool {
    line.iter().all(u8::is_ascii_whitespace)
}

/// The message of one non-blank line; `prefix` is what a `symbol` is put under.
pub fn parse_line(line: &Bytes, prefix: &str) -> Result<OutgoingMessage, LineError> {
    let parsed: FeedLine<'_> = serde_json::from_slice(line)
        .map_err(|e| LineError { column: Some(e.column()), error: Error::invalid(e.to_string()) })?;
    let subject = match (parsed.subject, parsed.symbol) {
        (Some(s), None) => Subject::new(s)?,
        (None, Some(sym)) => {
            if sym.is_empty() || sym.contains(['.', '*', '>']) || sym.contains(char::is_whitespace) {
                return Err(LineError::invalid(format!(
                    "symbol `{}` must be one subject token (no `.`, `*`, `>` or whitespace)",
                    sym.chars().take(64).collect::<String>()
                )));
            }
            Subject::new(format!("{prefix}.{sym}"))?
        }
        (Some(_), Some(_)) => return Err(LineError::invalid("a line has `subject` or `symbol`, not both")),
        (None, None) => return Err(LineError::invalid("a line needs `subject` or `symbol`")),
    };
    let Some(id) = parsed.msg_id else {
        return Err(LineError::invalid("a line needs `msg_id`: it makes a resend after a reconnect duplicate-free"));
    };
    let payload = match (parsed.payload, parsed.encoding.as_deref()) {
        // The JSON value's bytes, sliced out of the line without a copy.
        (Some(raw), None) => {
            let text = raw.get().as_bytes();
            let start = text.as_ptr() as usize - line.as_ptr() as usize;
            line.slice(start..start + text.len())
        }
        (raw, encoding) => crate::envelope::decode_payload(raw, encoding).map_err(LineError::invalid)?,
    };
    let mut msg = OutgoingMessage::new(subject, payload);
    for (k, v) in parsed.headers.unwrap_or_default() {
        msg.headers.append(k, v)?;
    }
    Ok(msg.with_msg_id(id)?)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn lines(s: &mut LineSplitter) -> Vec<(u64, String)> {
        let mut out = Vec::new();
        while let Some((n, l)) = s.next_line().unwrap() {
            out.push((n, String::from_utf8(l.to_vec()).unwrap()));
        }
        out
    }

    #[test]
    fn lines_span_chunks_and_are_numbered() {
        let mut s = LineSplitter::new(16);
        s.extend(b"ab");
        assert!(lines(&mut s).is_empty());
        s.extend(b"c\r\n\nde");
        assert_eq!(lines(&mut s), vec![(1, "abc".into()), (2, "".into())]);
        assert_eq!((s.pending(), s.current_line()), (2, 3));
        s.extend(b"f\n");
        assert_eq!(lines(&mut s), vec![(3, "def".into())]);
        s.extend(b"tail");
        assert!(lines(&mut s).is_empty());
        assert_eq!(s.finish().map(|(n, l)| (n, l.to_vec())), Some((4, b"tail".to_vec())));
        assert_eq!(s.finish(), None);
    }

    #[test]
    fn a_long_line_fails_before_it_is_buffered_whole() {
        let mut s = LineSplitter::new(4);
        s.extend(b"1234\n12");
        assert_eq!(lines(&mut s), vec![(1, "1234".into())]);
        s.extend(b"345");
        assert_eq!(s.next_line(), Err(TooLong { line: 2, max_line_bytes: 4 }));
        let mut s = LineSplitter::new(4);
        s.extend(b"12345\n");
        assert_eq!(s.next_line(), Err(TooLong { line: 1, max_line_bytes: 4 }));
    }

    #[test]
    fn a_line_becomes_a_message_with_its_id_and_exact_payload() {
        let line = Bytes::from_static(br#"{"symbol":"AAPL","id":"f-1","payload": {"bid":1.50, "ask":2}}"#);
        let m = parse_line(&line, "md").unwrap();
        assert_eq!(m.subject.as_str(), "md.AAPL");
        assert_eq!(m.msg_id(), Some("f-1"));
        assert_eq!(&m.payload[..], br#"{"bid":1.50, "ask":2}"#);
        let line = Bytes::from_static(br#"{"subject":"x.y","msg_id":"2","payload":"AAE=","encoding":"base64"}"#);
        assert_eq!(&parse_line(&line, "md").unwrap().payload[..], &[0, 1]);
    }

    #[test]
    fn bad_lines_say_why() {
        let cases: &[(&[u8], &str)] = &[
            (br#"{"payload":1,"msg_id":"a"}"#, "needs `subject` or `symbol`"),
            (br#"{"symbol":"A","subject":"md.A","msg_id":"a"}"#, "not both"),
            (br#"{"symbol":"A.B","msg_id":"a"}"#, "one subject token"),
            (br#"{"symbol":"A"}"#, "needs `msg_id`"),
            (br#"{"symbol":"A","msg_id":""}"#, "must not be empty"),
            (br#"{"symbol":"A","msg_id":"a","extra":1}"#, "unknown field"),
            (br#"{"subject":"a b","msg_id":"a"}"#, "subject"),
        ];
        for (line, want) in cases {
            let e = parse_line(&Bytes::from_static(line), "md").unwrap_err();
            assert!(e.error.message().contains(want), "{}: {}", String::from_utf8_lossy(line), e.error.message());
        }
        let e = parse_line(&Bytes::from_static(br#"{"symbol":"A", tru}"#), "md").unwrap_err();
        assert_eq!(e.column, Some(16));
    }
}
