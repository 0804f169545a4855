//! `RedisServer` against a real redis-server: readiness means a raw `PING`
//! gets `PONG`, kill closes the port, restart reuses it, drop kills.

use finmesh_testkit::ManagedServer;
use std::path::Path;

use finmesh_testkit::{Error, RedisServer};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// Send one RESP command, return its whole raw reply.
async fn command(port: u16, args: &[&str]) -> String {
    let mut s = TcpStream::connect(("127.0.0.1", port)).await.expect("connect to redis");
    let mut req = format!("*{}\r\n", args.len());
    for a in args {
        req.push_str(&format!("${}\r\n{a}\r\n", a.len()));
    }
    s.write_all(req.as_bytes()).await.unwrap();
    let mut buf = Vec::new();
    let mut chunk = [0u8; 256];
    while reply_len(&buf).is_none() {
        let n = s.read(&mut chunk).await.unwrap();
        assert!(n > 0, "redis closed the connection");
        buf.extend_from_slice(&chunk[..n]);
    }
    String::from_utf8(buf).unwrap()
}

/// Length of the complete RESP value at the start of `buf`, if complete.
fn reply_len(buf: &[u8]) -> Option<usize> {
    let line_end = buf.windows(2).position(|w| w == b"\r\n")? + 2;
    let n = || std::str::from_utf8(&buf[1..line_end - 2]).ok()?.parse::<i64>().ok();
    match buf[0] {
        b'+' | b'-' | b':' => Some(line_end),
        b'$' => match n()? {
            -1 => Some(line_end),
            len => (buf.len() >= line_end + len as usize + 2).then_some(line_end + len as usize + 2),
        },
        b'*' => {
            let mut at = line_end;
            for _ in 0..n()?.max(0) {
                at += reply_len(&buf[at..])?;
            }
            Some(at)
        }
        _ => panic!("not RESP: {:?}", String::from_utf8_lossy(buf)),
    }
}

#[tokio::test]
async fn answers_ping_survives_kill_and_restarts_on_its_port() {
    let mut redis = RedisServer::start().await.expect("start redis-server");
    assert_eq!(redis.url(), format!("redis://127.0.0.1:{}", redis.port()));
    assert_eq!(command(redis.port(), &["PING"]).await, "+PONG\r\n");
    assert_eq!(command(redis.port(), &["SET", "k", "v"]).await, "+OK\r\n");
    assert_eq!(command(redis.port(), &["GET", "k"]).await, "$1\r\nv\r\n");
    assert_eq!(command(redis.port(), &["CONFIG", "GET", "save"]).await, "*2\r\n$4\r\nsave\r\n$0\r\n\r\n");

    let pid = redis.pid().unwrap();
    let port = redis.port();
    redis.kill().await.unwrap();
    assert!(!redis.is_running());
    assert!(!Path::new(&format!("/proc/{pid}")).exists());
    assert!(TcpStream::connect(("127.0.0.1", port)).await.is_err(), "port still open after kill");

    redis.restart().await.expect("restart");
    assert_eq!(redis.port(), port);
    assert_eq!(command(port, &["PING"]).await, "+PONG\r\n");
    assert_eq!(command(port, &["GET", "k"]).await, "$-1\r\n", "save '' and appendonly no: nothing survives");
    assert_eq!(command(port, &["CONFIG", "GET", "appendonly"]).await, "*2\r\n$10\r\nappendonly\r\n$2\r\nno\r\n");

    let dir = redis.dir().to_path_buf();
    let pid = redis.pid().unwrap();
    drop(redis);
    assert!(!Path::new(&format!("/proc/{pid}")).exists(), "server {pid} outlived its handle");
    assert!(!dir.exists());
}

#[tokio::test]
async fn a_missing_binary_is_a_clear_error() {
    let err = RedisServer::builder().binary("/nonexistent/redis-server").start().await.unwrap_err();
    assert!(matches!(err, Error::BinaryNotFound { program: "redis-server", .. }), "{err}");
}
