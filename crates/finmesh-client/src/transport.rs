//! The two wire transports of a subscription: Server-Sent Events
//! (`GET /v1/streams/{stream}/events`) and WebSocket
//! (`GET /v1/streams/{stream}/ws`), behind one connection type.
//!
//! Owns opening a connection (the HTTP request, the answer's status, the
//! WebSocket handshake) and turning what arrives into [`SseEvent`]s, so the
//! subscription applies one set of rules to both. A WebSocket text frame
//! that is an envelope (`{"seq":N,…}`) becomes a `message` with id `N`; a
//! control frame (`{"event":"gap"|"reset"|"error"|"reconnect"|"lagged"|"end",…}`)
//! becomes the SSE event of that name with the frame as its data (an
//! `error`'s nested `problem`, when there is one, as the data). Resuming
//! differs only on the wire: SSE sends `Last-Event-ID: N`, WebSocket
//! `from_seq=N+1`.
//!
//! The WebSocket upgrade goes through the same `reqwest` client as SSE
//! (its TLS roots, proxies and timeouts), over HTTP/1.1: over TLS that
//! client must be `http1_only` (ALPN would pick HTTP/2, which has no
//! upgrade); the SDK's default client for WebSocket is.

use std::time::Duration;

use bytes::Bytes;
use futures::StreamExt;
use futures::stream::BoxStream;
use reqwest::StatusCode;
use reqwest::header::{HeaderMap, RETRY_AFTER};
use tokio_tungstenite::WebSocketStream;
use tokio_tungstenite::tungstenite::Message as WsMessage;
use tokio_tungstenite::tungstenite::handshake::client::generate_key;
use tokio_tungstenite::tungstenite::handshake::derive_accept_key;
use tokio_tungstenite::tungstenite::protocol::Role;

use crate::sse::{SseEvent, SseParser};
use crate::{Error, ErrorKind};

/// The header that carries the stream's epoch.
pub const EPOCH_HEADER: &str = "finmesh-stream-epoch";

/// How a subscription talks to a node.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Transport {
    /// Server-Sent Events (`/events`), the default.
    #[default]
    Sse,
    /// WebSocket (`/ws`), one envelope per text frame.
    WebSocket,
}

/// Where a connection starts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Resume {
    /// Only new messages.
    New,
    /// From this sequence on.
    From(u64),
    /// After this sequence.
    After(u64),
}

/// What one connection attempt asks for.
pub(crate) struct Request<'a> {
    pub endpoint: &'a str,
    pub stream: &'a str,
    pub subject: Option<&'a str>,
    pub epoch: Option<u64>,
    pub resume: Resume,
    pub token: Option<&'a str>,
}

/// Why an attempt failed.
pub(crate) enum Refused {
    /// Do not try again (400, 401, 403, 404).
    Fatal(Error),
    /// Try again, maybe elsewhere; `retry_after` from a 429/503.
    Retry { reason: String, retry_after: Option<Duration> },
}

/// An open connection.
pub(crate) enum Conn {
    Sse { body: BoxStream<'static, reqwest::Result<Bytes>>, parser: SseParser },
    Ws { socket: Box<WebSocketStream<reqwest::Upgraded>> },
}

/// What one read from a connection gave.
pub(crate) enum Read {
    Events(Vec<SseEvent>),
    /// The connection ended, and why.
    Closed(String),
}

/// Open a connection; returns it and the epoch the node announced.
pub(crate) async fn open(
    http: &reqwest::Client,
    transport: Transport,
    req: &Request<'_>,
) -> Result<(Conn, Option<u64>), Refused> {
    let route = match transport {
        Transport::Sse => "events",
        Transport::WebSocket => "ws",
    };
    let url = format!("{}/v1/streams/{}/{route}", req.endpoint, encode(req.stream));
    let mut query: Vec<(&str, String)> = Vec::new();
    if let Some(subject) = req.subject {
        query.push(("subject", subject.to_owned()));
    }
    if let Some(epoch) = req.epoch.filter(|e| *e != 0) {
        query.push(("epoch", epoch.to_string()));
    }
    let mut request = http.get(url);
    match (req.resume, transport) {
        (Resume::New, _) => {}
        (Resume::From(seq), _) => query.push(("from_seq", seq.to_string())),
        (Resume::After(seq), Transport::Sse) => request = request.header("last-event-id", seq.to_string()),
        (Resume::After(seq), Transport::WebSocket) => query.push(("from_seq", (seq + 1).to_string())),
    }
    let key = generate_key();
    request = match transport {
        Transport::Sse => request.header("accept", "text/event-stream"),
        Transport::WebSocket => request
            .version(reqwest::Version::HTTP_11)
            .header("connection", "upgrade")
            .header("upgrade", "websocket")
            .header("sec-websocket-version", "13")
            .header("sec-websocket-key", &key),
    };
    request = request.query(&query);
    if let Some(token) = req.token {
        request = request.bearer_auth(token);
    }
    let response = request
        .send()
        .await
        .map_err(|e| Refused::Retry { reason: format!("cannot connect: {e}"), retry_after: None })?;
    let status = response.status();
    let expected = match transport {
        Transport::Sse => status.is_success(),
        Transport::WebSocket => status == StatusCode::SWITCHING_PROTOCOLS,
    };
    if !expected {
        return Err(refused(req.endpoint, response).await);
    }
    let epoch = response.headers().get(EPOCH_HEADER).and_then(|v| v.to_str().ok()?.parse::<u64>().ok());
    let conn = match transport {
        Transport::Sse => Conn::Sse { body: response.bytes_stream().boxed(), parser: SseParser::default() },
        Transport::WebSocket => {
            let accept = response.headers().get("sec-websocket-accept").and_then(|v| v.to_str().ok());
            if accept != Some(derive_accept_key(key.as_bytes()).as_str()) {
                return Err(Refused::Fatal(Error::new(
                    ErrorKind::Protocol,
                    format!("{}: the WebSocket handshake answer has no valid Sec-WebSocket-Accept", req.endpoint),
                )));
            }
            let upgraded = response.upgrade().await.map_err(|e| Refused::Retry {
                reason: format!("the WebSocket upgrade failed: {e}"),
                retry_after: None,
            })?;
            let socket = WebSocketStream::from_raw_socket(upgraded, Role::Client, None).await;
            Conn::Ws { socket: Box::new(socket) }
        }
    };
    Ok((conn, epoch))
}

/// Map a refusing answer: 400/401/403/404 are fatal, the rest retried.
async fn refused(endpoint: &str, response: reqwest::Response) -> Refused {
    let status = response.status();
    let retry_after = retry_after(response.headers());
    let detail = problem_detail(response).await;
    let message = format!("{endpoint}: HTTP {}: {detail}", status.as_u16());
    let kind = match status {
        StatusCode::BAD_REQUEST => Some(ErrorKind::Invalid),
        StatusCode::UNAUTHORIZED => Some(ErrorKind::Unauthorized),
        StatusCode::FORBIDDEN => Some(ErrorKind::Forbidden),
        StatusCode::NOT_FOUND => Some(ErrorKind::NotFound),
        _ => None,
    };
    match kind {
        Some(kind) => Refused::Fatal(Error::new(kind, message)),
        None => Refused::Retry { reason: message, retry_after },
    }
}

impl Conn {
    /// The next events, or why the connection ended.
    pub(crate) async fn read(&mut self) -> Result<Read, Error> {
        match self {
            Conn::Sse { body, parser } => Ok(match body.next().await {
                Some(Ok(chunk)) => Read::Events(parser.feed(&chunk)),
                Some(Err(e)) => Read::Closed(format!("the connection broke: {e}")),
                None => Read::Closed("the node closed the stream".to_owned()),
            }),
            Conn::Ws { socket } => loop {
                // Pings are answered by the library as it reads.
                return Ok(match socket.next().await {
                    Some(Ok(WsMessage::Text(text))) => Read::Events(vec![ws_event(text.as_str())?]),
                    Some(Ok(WsMessage::Close(frame))) => Read::Closed(match frame {
                        Some(f) => format!("the node closed the WebSocket ({} {})", u16::from(f.code), f.reason),
                        None => "the node closed the WebSocket".to_owned(),
                    }),
                    // A ping proves the connection alive (the idle timeout).
                    Some(Ok(WsMessage::Ping(_) | WsMessage::Pong(_))) => Read::Events(Vec::new()),
                    Some(Ok(_)) => continue,
                    Some(Err(e)) => Read::Closed(format!("the connection broke: {e}")),
                    None => Read::Closed("the node closed the stream".to_owned()),
                });
            },
        }
    }

    /// The node's `retry:` hint (SSE), in milliseconds.
    pub(crate) fn retry_hint(&self) -> Option<u64> {
        match self {
            Conn::Sse { parser, .. } => parser.retry(),
            Conn::Ws { .. } => None,
        }
    }
}

/// A WebSocket text frame as the SSE event it stands for.
fn ws_event(text: &str) -> Result<SseEvent, Error> {
    let invalid = |why: &str| Error::new(ErrorKind::Protocol, format!("a WebSocket frame {why}: {text}"));
    // Envelopes start with their sequence (see the gateway's envelope.rs):
    // no JSON parse on the hot path.
    if let Some(rest) = text.strip_prefix("{\"seq\":") {
        let digits: String = rest.chars().take_while(char::is_ascii_digit).collect();
        if digits.is_empty() {
            return Err(invalid("has no numeric seq"));
        }
        return Ok(SseEvent { id: Some(digits), event: "message".to_owned(), data: text.to_owned(), has_data: true });
    }
    let value: serde_json::Value = serde_json::from_str(text).map_err(|_| invalid("is not JSON"))?;
    if let Some(name) = value["event"].as_str() {
        let data = match value.get("problem") {
            Some(problem) if name == "error" => problem.to_string(),
            _ => text.to_owned(),
        };
        return Ok(SseEvent { id: None, event: name.to_owned(), data, has_data: true });
    }
    match value["seq"].as_u64() {
        Some(seq) => Ok(SseEvent {
            id: Some(seq.to_string()),
            event: "message".to_owned(),
            data: text.to_owned(),
            has_data: true,
        }),
        None => Err(invalid("is neither an envelope nor an event")),
    }
}

fn retry_after(headers: &HeaderMap) -> Option<Duration> {
    let secs = headers.get(RETRY_AFTER)?.to_str().ok()?.trim().parse::<u64>().ok()?;
    Some(Duration::from_secs(secs))
}

/// The `detail` (or `title`) of a problem+json answer, else its text.
async fn problem_detail(response: reqwest::Response) -> String {
    let body = response.text().await.unwrap_or_default();
    match serde_json::from_str::<serde_json::Value>(&body) {
        Ok(p) => p["detail"].as_str().or(p["title"].as_str()).unwrap_or(&body).to_owned(),
        Err(_) => body.trim().to_owned(),
    }
}

/// Percent-encode one path segment.
fn encode(segment: &str) -> String {
    let mut out = String::with_capacity(segment.len());
    for b in segment.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.' | b'~') {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn websocket_frames_read_as_sse_events() {
        let m = ws_event(r#"{"seq":42,"subject":"md.x","payload":{}}"#).unwrap();
        assert_eq!((m.id.as_deref(), m.event.as_str()), (Some("42"), "message"));
        let g = ws_event(r#"{"epoch":3,"event":"gap","from":4,"to":8}"#).unwrap();
        assert_eq!((g.id, g.event.as_str()), (None, "gap"));
        let e = ws_event(r#"{"event":"error","problem":{"status":404,"detail":"gone"}}"#).unwrap();
        assert_eq!(e.data, r#"{"detail":"gone","status":404}"#);
        let slow = ws_event(r#"{"event":"error","reason":"slow_consumer","last_seq":9}"#).unwrap();
        assert!(slow.data.contains("slow_consumer"));
        assert_eq!(ws_event("not json").unwrap_err().kind(), ErrorKind::Protocol);
        assert_eq!(ws_event(r#"{"seq":"x"}"#).unwrap_err().kind(), ErrorKind::Protocol);
    }
}
