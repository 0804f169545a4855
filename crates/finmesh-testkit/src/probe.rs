//! Readiness probes over plain TCP.
//!
//! The kit needs two questions answered and no client library for either:
//! "does this HTTP endpoint answer 200?" (the NATS monitoring port's
//! `/healthz`) and "does this Redis answer `PING` with `PONG`?". Each probe
//! is one short-lived connection with a timeout; callers poll it until a
//! deadline.

use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// Timeout of one probe (connect + request + response).
pub const PROBE_TIMEOUT: Duration = Duration::from_secs(2);

/// The status code of `GET path` on `127.0.0.1:port`, or `None` if the
/// connection or the request failed.
pub async fn http_status(port: u16, path: &str) -> Option<u16> {
    http_get(port, path).await.map(|(status, _)| status)
}

/// Status code and body of `GET path` on `127.0.0.1:port`, or `None` if the
/// connection or the request failed.
pub async fn http_get(port: u16, path: &str) -> Option<(u16, Vec<u8>)> {
    let request = async {
        let mut s = TcpStream::connect(("127.0.0.1", port)).await.ok()?;
        // HTTP/1.0: the server closes the connection after its answer.
        let req = format!("GET {path} HTTP/1.0\r\nHost: 127.0.0.1:{port}\r\n\r\n");
        s.write_all(req.as_bytes()).await.ok()?;
        let mut buf = Vec::with_capacity(512);
        s.read_to_end(&mut buf).await.ok()?;
        let status = parse_status_line(&buf)?;
        let body_at = buf.windows(4).position(|w| w == b"\r\n\r\n").map_or(buf.len(), |i| i + 4);
        Some((status, buf.split_off(body_at)))
    };
    tokio::time::timeout(PROBE_TIMEOUT, request).await.ok().flatten()
}

fn parse_status_line(response: &[u8]) -> Option<u16> {
    let line = response.split(|&b| b == b'\n').next()?;
    let line = std::str::from_utf8(line).ok()?;
    let mut parts = line.split_whitespace();
    if !parts.next()?.starts_with("HTTP/") {
        return None;
    }
    parts.next()?.parse().ok()
}

/// Does the Redis server on `127.0.0.1:port` answer `PING` with `+PONG`?
pub async fn redis_ping(port: u16) -> bool {
    let ping = async {
        let mut s = TcpStream::connect(("127.0.0.1", port)).await.ok()?;
        s.write_all(b"*1\r\n$4\r\nPING\r\n").await.ok()?;
        let mut buf = [0u8; 64];
        let mut n = 0;
        while n < buf.len() {
            let read = s.read(&mut buf[n..]).await.ok()?;
            if read == 0 {
                break;
            }
            n += read;
            if buf[..n].ends_with(b"\r\n") {
                break;
            }
        }
        Some(&buf[..n] == b"+PONG\r\n")
    };
    tokio::time::timeout(PROBE_TIMEOUT, ping).await.ok().flatten().unwrap_or(false)
}

/// The last sequence of JetStream stream `name` in the store of the
/// nats-server whose monitoring port is `http_port` (its `/jsz`), whether or
/// not that server leads the stream; `None` if it has no such stream or the
/// request failed. Shows how far one replica is behind.
pub async fn jsz_last_seq(http_port: u16, name: &str) -> Option<u64> {
    let (status, body) = http_get(http_port, "/jsz?streams=true").await?;
    if status != 200 {
        return None;
    }
    let v: serde_json::Value = serde_json::from_slice(&body).ok()?;
    v["account_details"].as_array()?.iter().find_map(|acc| {
        acc["stream_detail"]
            .as_array()?
            .iter()
            .find(|s| s["name"].as_str() == Some(name))
            .and_then(|s| s["state"]["last_seq"].as_u64())
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_status_lines() {
        assert_eq!(parse_status_line(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\n{}"), Some(200));
        assert_eq!(parse_status_line(b"HTTP/1.0 503 Service Unavailable\r\n"), Some(503));
        assert_eq!(parse_status_line(b"-ERR wrong protocol\r\n"), None);
        assert_eq!(parse_status_line(b""), None);
    }

    #[tokio::test]
    async fn probes_fail_on_a_closed_port() {
        let port = crate::ports::free_port().unwrap();
        assert_eq!(http_status(port, "/healthz").await, None);
        assert!(!redis_ping(port).await);
    }
}
