//! `gateway-tls`: new TLS connections per second and the handshake's
//! latency, on `finmesh serve` (TLS, auth on) and on nginx with the same
//! certificate, in the same run.
//!
//! Each of [`TASKS`] tasks loops: TCP connect, full TLS handshake (rustls
//! client, session resumption off, ALPN `http/1.1`), one `GET` with
//! `Connection: close` (the gateway's KV key with a bearer token; nginx's
//! static file), read the whole answer (must be 200), then wait for the
//! server to close. The figure counts connections; the latency recorded is
//! connect + handshake (the design budgets 10 ms for it), measured on the
//! client, and the note gives the whole connection's p99 too.

use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context as _;
use rustls::pki_types::pem::PemObject as _;
use rustls::pki_types::{CertificateDer, ServerName};
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::net::TcpStream;
use tokio_rustls::TlsConnector;

use super::BenchContext;
use super::embedded_kv::key_name;
use super::gateway::{BUCKET, dev_cert, setup_kv};
use super::measure::{Measurement, Sample, Window};
use super::node::{Node, NodeOptions, http_client};
use super::tools::{NGINX_ENV, NGINX_PATH, Nginx, find_tool};

/// Concurrent connecting tasks.
pub const TASKS: usize = 4;
/// Ids (ratios refer to them).
pub const GATEWAY: &str = "gateway.tls.new-conn";
pub const NGINX: &str = "nginx.tls.new-conn";

/// A rustls client trusting `cert`, without session resumption.
pub fn client_config(cert: &Path) -> anyhow::Result<rustls::ClientConfig> {
    let mut roots = rustls::RootCertStore::empty();
    for c in CertificateDer::pem_file_iter(cert).with_context(|| format!("reading {}", cert.display()))? {
        roots.add(c?)?;
    }
    let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    let mut config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()?
        .with_root_certificates(roots)
        .with_no_client_auth();
    config.resumption = rustls::client::Resumption::disabled();
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(config)
}

/// Connections completed in the window: handshake and whole-connection latencies.
struct Connections {
    handshake: Sample,
    total: Sample,
}

/// Read one HTTP/1.1 answer (headers + `Content-Length` body); its status.
async fn read_answer<S: tokio::io::AsyncRead + Unpin>(stream: &mut S) -> anyhow::Result<u16> {
    let mut buf = Vec::with_capacity(1024);
    let mut chunk = [0u8; 4096];
    loop {
        if let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            let head = std::str::from_utf8(&buf[..end]).context("answer head is not UTF-8")?;
            let status: u16 = head.split_whitespace().nth(1).and_then(|s| s.parse().ok()).context("no status")?;
            let length: usize = head
                .lines()
                .find_map(|l| l.split_once(':').filter(|(n, _)| n.eq_ignore_ascii_case("content-length")))
                .and_then(|(_, v)| v.trim().parse().ok())
                .context("answer without Content-Length")?;
            if buf.len() >= end + 4 + length {
                return Ok(status);
            }
        }
        let n = stream.read(&mut chunk).await?;
        anyhow::ensure!(n > 0, "connection closed mid-answer");
        buf.extend_from_slice(&chunk[..n]);
    }
}

async fn measure(
    duration: Duration,
    addr: SocketAddr,
    connector: TlsConnector,
    request: Arc<Vec<u8>>,
) -> anyhow::Result<Connections> {
    let window = Window::after_warmup(duration);
    let mut handles = Vec::new();
    for _ in 0..TASKS {
        let (connector, request) = (connector.clone(), request.clone());
        handles.push(tokio::spawn(async move {
            let mut c = Connections { handshake: Sample::new(), total: Sample::new() };
            loop {
                let started = Instant::now();
                if !window.keep_going(started, c.handshake.msgs > 0) {
                    break;
                }
                let tcp = TcpStream::connect(addr).await?;
                tcp.set_nodelay(true)?;
                let mut tls = connector.connect(ServerName::try_from("localhost")?, tcp).await?;
                let handshake = started.elapsed();
                tls.write_all(&request).await?;
                let status = read_answer(&mut tls).await?;
                anyhow::ensure!(status == 200, "answer {status}");
                // Let the server close first (Connection: close), so the
                // client's ports do not pile up in TIME_WAIT.
                let mut rest = [0u8; 256];
                while matches!(tls.read(&mut rest).await, Ok(n) if n > 0) {}
                if window.counts(started) {
                    c.handshake.record(handshake);
                    c.total.record(started.elapsed());
                    c.handshake.msgs += 1;
                }
            }
            anyhow::Ok(c)
        }));
    }
    let mut all = Connections { handshake: Sample::new(), total: Sample::new() };
    for h in handles {
        let c = h.await.context("connecting task panicked")??;
        all.handshake.msgs += c.handshake.msgs;
        all.handshake.hist.add(&c.handshake.hist)?;
        all.total.hist.add(&c.total.hist)?;
    }
    all.handshake.elapsed = window.elapsed();
    Ok(all)
}

fn measurement(id: &str, peer: &str, what: &str, c: &Connections) -> Measurement {
    let total_p99 = c.total.percentile_us(99.0).unwrap_or(f64::NAN);
    Measurement::rate(id, peer, what, "conns/s", &c.handshake).note(format!(
        "{TASKS} tasks; latency = TCP connect + full TLS handshake (no resumption); whole connection with one GET: p99 {total_p99:.0} µs"
    ))
}

fn local_addr(url: &str) -> anyhow::Result<SocketAddr> {
    let host_port = url.split("://").nth(1).context("URL without scheme")?;
    host_port.trim_end_matches('/').parse().with_context(|| format!("address of {url}"))
}

/// `gateway-tls`: new connections per second, gateway vs nginx.
pub async fn run(ctx: &BenchContext) -> anyhow::Result<Vec<Measurement>> {
    let nginx_bin = find_tool("nginx", NGINX_ENV, "nginx")?;
    let dir = ctx.tempdir("gateway-tls")?;
    let (cert, key) = dev_cert(dir.path())?;
    let connector = TlsConnector::from(Arc::new(client_config(&cert)?));

    let options = NodeOptions { nats_url: None, tls: Some((cert.clone(), key.clone())) };
    let node = Node::start(dir.path(), &options).await?;
    let token = node.token.clone().context("finmesh serve printed no admin token")?;
    setup_kv(&http_client(Some(&cert))?, &node.url, &token).await?;
    let request = format!(
        "GET /v1/kv/{BUCKET}/{} HTTP/1.1\r\nHost: localhost\r\nAuthorization: Bearer {token}\r\nConnection: close\r\n\r\n",
        key_name(0)
    );
    let gw = measure(ctx.duration, local_addr(&node.url)?, connector.clone(), Arc::new(request.into_bytes())).await;
    node.stop().await?;
    let gw = gw.context("new TLS connections to the gateway")?;

    let nginx = Nginx::start(&nginx_bin, ctx.tempdir("nginx")?, &super::embedded_kv::value_for(0), &cert, &key).await?;
    let request = format!("GET {NGINX_PATH} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n");
    let addr = SocketAddr::from(([127, 0, 0, 1], nginx.https_port));
    let ng = measure(ctx.duration, addr, connector, Arc::new(request.into_bytes())).await;
    nginx.stop().await?;
    let ng = ng.context("new TLS connections to nginx")?;
    Ok(vec![
        measurement(GATEWAY, "finmesh-gateway", "new TLS connection + KV GET + close, embedded engine, auth on", &gw),
        measurement(NGINX, "nginx", "new TLS connection + static 256 B file + close", &ng),
    ])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn reads_an_answer_by_its_content_length() {
        let answer = b"HTTP/1.1 200 OK\r\ncontent-length: 5\r\nx: y\r\n\r\nhello".to_vec();
        assert_eq!(read_answer(&mut answer.as_slice()).await.unwrap(), 200);
        let cut = b"HTTP/1.1 404 Not Found\r\nContent-Length: 9\r\n\r\nnot".to_vec();
        assert!(read_answer(&mut cut.as_slice()).await.is_err());
        assert_eq!(local_addr("https://127.0.0.1:4433").unwrap(), SocketAddr::from(([127, 0, 0, 1], 4433)));
    }

    #[test]
    fn the_client_speaks_http1_and_needs_a_certificate() {
        let dir = tempfile::tempdir().unwrap();
        let (cert, _) = dev_cert(dir.path()).unwrap();
        let config = client_config(&cert).unwrap();
        assert_eq!(config.alpn_protocols, vec![b"http/1.1".to_vec()]);
        let empty = dir.path().join("empty.pem");
        std::fs::write(&empty, "").unwrap();
        assert!(client_config(&dir.path().join("missing.pem")).is_err());
    }
}
