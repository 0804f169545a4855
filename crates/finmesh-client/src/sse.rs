//! A minimal Server-Sent Events parser (the SDK's subscriptions and the
//! CLI's `watch`).
//!
//! Owns the wire grammar of the WHATWG spec that finmesh uses: `id:`,
//! `event:`, `data:` (joined with `\n` when repeated), `retry:` and comment
//! lines; an event ends at a blank line. Lines may end in `\n`, `\r\n` or
//! `\r`. Invariants: a partial line stays buffered until its end arrives, so
//! events split across network chunks parse the same as whole ones; unlike a
//! browser, an event with an `id:` but no `data:` is dispatched too (finmesh
//! heartbeats may carry the head sequence that way), with `has_data` false.

/// One dispatched event.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SseEvent {
    pub id: Option<String>,
    /// `message` when the stream named none.
    pub event: String,
    pub data: String,
    /// Whether the event had a `data:` line.
    pub has_data: bool,
}

/// Incremental parser: feed chunks, collect events.
#[derive(Debug, Default)]
pub struct SseParser {
    buffer: Vec<u8>,
    current: SseEvent,
    has_data: bool,
    last_id: Option<String>,
    retry: Option<u64>,
}

impl SseParser {
    /// The id of the last event with one: what `Last-Event-ID` resumes from.
    pub fn last_id(&self) -> Option<&str> {
        self.last_id.as_deref()
    }

    /// The last `retry:` hint, in milliseconds.
    pub fn retry(&self) -> Option<u64> {
        self.retry
    }

    /// Add a chunk; returns the events it completed.
    pub fn feed(&mut self, chunk: &[u8]) -> Vec<SseEvent> {
        self.buffer.extend_from_slice(chunk);
        let mut events = Vec::new();
        while let Some(end) = self.buffer.iter().position(|&b| b == b'\n' || b == b'\r') {
            // A `\r` at the very end may be the first half of `\r\n`: wait.
            if self.buffer[end] == b'\r' && end + 1 == self.buffer.len() {
                break;
            }
            let skip = if self.buffer[end] == b'\r' && self.buffer.get(end + 1) == Some(&b'\n') { 2 } else { 1 };
            let line: Vec<u8> = self.buffer.drain(..end + skip).take(end).collect();
            if let Some(event) = self.line(&String::from_utf8_lossy(&line)) {
                events.push(event);
            }
        }
        events
    }

    fn line(&mut self, line: &str) -> Option<SseEvent> {
        if line.is_empty() {
            let mut event = std::mem::take(&mut self.current);
            let dispatch = self.has_data || event.id.is_some() || !event.event.is_empty();
            event.has_data = std::mem::take(&mut self.has_data);
            if !dispatch {
                return None;
            }
            if event.event.is_empty() {
                event.event = "message".to_owned();
            }
            if event.id.is_some() {
                self.last_id.clone_from(&event.id);
            }
            return Some(event);
        }
        if line.starts_with(':') {
            return None;
        }
        let (field, value) = line.split_once(':').unwrap_or((line, ""));
        let value = value.strip_prefix(' ').unwrap_or(value);
        match field {
            "id" => self.current.id = Some(value.to_owned()),
            "event" => self.current.event = value.to_owned(),
            "retry" => {
                if let Ok(ms) = value.parse() {
                    self.retry = Some(ms);
                }
            }
            "data" => {
                if self.has_data {
                    self.current.data.push('\n');
                }
                self.current.data.push_str(value);
                self.has_data = true;
            }
            _ => {}
        }
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn events_split_anywhere_parse_the_same() {
        let text = b": hello\nretry: 1000\n\nid: 7\nevent: gap\ndata: {\"a\":1}\ndata: x\r\n\r\nid: 8\ndata: y\n\n";
        let whole = SseParser::default().feed(text);
        assert_eq!(whole.len(), 2);
        assert_eq!(
            whole[0],
            SseEvent { id: Some("7".into()), event: "gap".into(), data: "{\"a\":1}\nx".into(), has_data: true }
        );
        assert_eq!(whole[1].event, "message");
        for split in 0..text.len() {
            let mut parser = SseParser::default();
            let mut events = parser.feed(&text[..split]);
            events.extend(parser.feed(&text[split..]));
            assert_eq!(events, whole, "split at {split}");
            assert_eq!(parser.last_id(), Some("8"));
            assert_eq!(parser.retry(), Some(1000));
        }
    }

    #[test]
    fn an_id_without_data_is_dispatched_as_such() {
        let events = SseParser::default().feed(b"id: 42\n\nid: 43\ndata: {}\n\n");
        assert_eq!(events.len(), 2);
        assert_eq!((events[0].id.as_deref(), events[0].has_data), (Some("42"), false));
        assert_eq!((events[1].id.as_deref(), events[1].has_data), (Some("43"), true));
    }
}
