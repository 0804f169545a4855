//! A real browser as a subscriber: headless Chromium loads a page from
//! another origin (a small HTTP server in this test, on another port), the
//! page opens an `EventSource` on a node with authentication on (the token
//! in `access_token`, CORS from `[cors]`), the node is restarted on the
//! same port mid-stream, and the browser resumes by itself with
//! `Last-Event-ID`: the sequences the page received have no hole and no
//! duplicate. The page reports what it received by POSTing it back to the
//! test's server after every event. The token never reaches the node's log.
//!
//! Needs Debian's `chromium` (`scripts/test` installs it), or the browser
//! named by `FINMESH_CHROMIUM`.

mod support;

use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};

use serde::Deserialize;
use serde_json::json;
use support::{Engine, NodeSpec, WAIT, create_stream, publish};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;

/// What the page reports after each event (see [`page`]).
#[derive(Debug, Clone, Default, Deserialize)]
struct Report {
    /// The page's report counter: reports can arrive out of order.
    n: u64,
    /// `lastEventId` of every message, in the order received.
    seen: Vec<u64>,
    /// `open` events: 1 + the reconnections.
    opens: u32,
    /// `gap` and `reset` events received.
    anomalies: Vec<serde_json::Value>,
}

/// The page: subscribes to `source` and POSTs its state to `/report`.
fn page(source: &str) -> String {
    format!(
        r#"<!doctype html><meta charset="utf-8"><title>finmesh subscriber</title>
<script>
const seen = [], anomalies = [];
let opens = 0, n = 0;
const es = new EventSource({source:?});
function report() {{
  n += 1;
  fetch('/report', {{ method: 'POST', body: JSON.stringify({{ n, seen, opens, anomalies }}) }}).catch(() => {{}});
}}
es.onopen = () => {{ opens += 1; report(); }};
es.onmessage = (e) => {{ seen.push(Number(e.lastEventId)); report(); }};
for (const kind of ['gap', 'reset']) es.addEventListener(kind, (e) => {{ anomalies.push({{ kind, data: e.data }}); report(); }});
</script>"#
    )
}

/// The page's origin: serves the page at `/` and collects reports.
struct PageServer {
    reports: watch::Receiver<Report>,
}

impl PageServer {
    fn spawn(listener: TcpListener, html: String) -> PageServer {
        let (tx, reports) = watch::channel(Report::default());
        tokio::spawn(async move {
            while let Ok((conn, _)) = listener.accept().await {
                let (html, tx) = (html.clone(), tx.clone());
                tokio::spawn(async move {
                    let _ = serve_page(conn, &html, &tx).await;
                });
            }
        });
        PageServer { reports }
    }

    /// Wait until a report satisfies `cond`; panics after [`WAIT`] with the
    /// last report and the browser's log.
    async fn until(&mut self, browser: &Browser, what: &str, cond: impl Fn(&Report) -> bool) -> Report {
        let outcome = tokio::time::timeout(WAIT, self.reports.wait_for(|r| cond(r))).await;
        match outcome.map(|r| r.map(|report| report.clone())) {
            Ok(Ok(r)) => r,
            _ => panic!(
                "the page did not report {what} within {WAIT:?}; last report: {:?}\nchromium log:\n{}",
                *self.reports.borrow(),
                browser.log()
            ),
        }
    }
}

/// One HTTP/1.1 exchange of the page server (`Connection: close`).
async fn serve_page(mut conn: TcpStream, html: &str, reports: &watch::Sender<Report>) -> std::io::Result<()> {
    let mut buf = Vec::new();
    let head_end = loop {
        if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            break i + 4;
        }
        let mut chunk = [0u8; 4096];
        let n = conn.read(&mut chunk).await?;
        if n == 0 || buf.len() > 64 * 1024 {
            return Ok(());
        }
        buf.extend_from_slice(&chunk[..n]);
    };
    let head = String::from_utf8_lossy(&buf[..head_end]).into_owned();
    let length = head
        .lines()
        .find_map(|l| l.to_ascii_lowercase().strip_prefix("content-length:").map(|v| v.trim().parse::<usize>()))
        .and_then(Result::ok)
        .unwrap_or(0);
    while buf.len() < head_end + length {
        let mut chunk = [0u8; 4096];
        let n = conn.read(&mut chunk).await?;
        if n == 0 {
            return Ok(());
        }
        buf.extend_from_slice(&chunk[..n]);
    }
    let body = &buf[head_end..head_end + length];
    let (status, content_type, out) = if head.starts_with("GET / ") {
        ("200 OK", "text/html; charset=utf-8", html.as_bytes().to_vec())
    } else if head.starts_with("POST /report ") {
        let report: Report = serde_json::from_slice(body).expect("the page's report is JSON");
        reports.send_if_modified(|last| {
            let newer = report.n > last.n;
            if newer {
                *last = report;
            }
            newer
        });
        ("204 No Content", "text/plain", Vec::new())
    } else {
        ("404 Not Found", "text/plain", b"not found".to_vec())
    };
    let head = format!(
        "HTTP/1.1 {status}\r\ncontent-type: {content_type}\r\ncontent-length: {}\r\ncache-control: no-store\r\nconnection: close\r\n\r\n",
        out.len()
    );
    conn.write_all(head.as_bytes()).await?;
    conn.write_all(&out).await?;
    conn.shutdown().await
}

/// Headless Chromium showing one page; killed on drop.
struct Browser {
    child: Child,
    log: PathBuf,
}

impl Browser {
    fn launch(url: &str, dir: &Path) -> Browser {
        let bin = std::env::var("FINMESH_CHROMIUM").unwrap_or_else(|_| "chromium".to_owned());
        let log = dir.join("chromium.log");
        let child = Command::new(&bin)
            // Its own process group, so that drop stops its helpers too.
            .process_group(0)
            .args([
                "--headless=new",
                "--no-sandbox",
                "--disable-gpu",
                "--disable-dev-shm-usage",
                "--no-first-run",
                "--no-default-browser-check",
                "--disable-extensions",
                "--disable-background-networking",
                "--remote-debugging-port=0",
            ])
            .arg(format!("--user-data-dir={}", dir.join("profile").display()))
            .arg(url)
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).expect("chromium log file"))
            .spawn()
            .unwrap_or_else(|e| {
                panic!(
                    "cannot start `{bin}` ({e}): install Debian's chromium (scripts/test does) or set FINMESH_CHROMIUM"
                )
            });
        Browser { child, log }
    }

    fn log(&self) -> String {
        let text = std::fs::read_to_string(&self.log).unwrap_or_default();
        let tail = text.len().saturating_sub(4000);
        text[text.floor_char_boundary(tail)..].to_owned()
    }
}

impl Drop for Browser {
    fn drop(&mut self) {
        // SAFETY: kill(2) on the process group of our own, not yet reaped child.
        unsafe { libc::kill(-(self.child.id() as libc::pid_t), libc::SIGKILL) };
        let _ = self.child.wait();
    }
}

async fn browser_resumes_across_a_node_restart(engine: Engine) {
    let dir = tempfile::tempdir().unwrap();
    let page_listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let origin = format!("http://{}", page_listener.local_addr().unwrap());
    // A short retry hint and no lame duck: the test waits for the browser's
    // own reconnection, so it should come soon.
    let config = format!(
        "lame_duck_ms = 0\n[subscriptions]\nretry_ms = 200\nretry_jitter_ms = 200\n[cors]\nallowed_origins = [\"{origin}\"]\n"
    );
    let spec = NodeSpec::new(dir.path(), &config, &engine);
    let node = spec.start("127.0.0.1:0");
    let admin = spec.admin_token();
    create_stream(&node, &admin, "MD", json!({"subjects": ["md.>"]})).await;
    publish(&node, &admin, "MD", "md.eu", 1..=10).await;
    publish(&node, &admin, "MD", "md.us", 11..=11).await; // filtered out

    let token = spec.issue_token("dashboard", &["stream:subscribe:MD:md.eu"]);
    let source = node.url(&format!("/v1/streams/MD/events?subject=md.eu&from_seq=1&access_token={token}"));
    let mut pages = PageServer::spawn(page_listener, page(&source));
    let browser = Browser::launch(&format!("{origin}/"), dir.path());
    pages.until(&browser, "the first 10 messages", |r| r.seen.len() >= 10).await;

    // Restart the node on the same port while the page is subscribed.
    let addr = node.addr;
    let first_log = node.stop(libc::SIGTERM);
    let node = spec.start(&addr.to_string());
    publish(&node, &admin, "MD", "md.eu", 12..=20).await;
    let r = pages.until(&browser, "the messages after the restart", |r| r.seen.len() >= 19).await;
    assert!(r.opens >= 2, "the browser reconnected by itself: {r:?}");
    // Live messages after the join.
    publish(&node, &admin, "MD", "md.eu", 21..=25).await;
    let r = pages.until(&browser, "live messages", |r| r.seen.len() >= 24).await;

    let want: Vec<u64> = (1..=10).chain(12..=25).collect();
    assert_eq!(r.seen, want, "no hole, no duplicate, in order");
    assert_eq!(r.anomalies, Vec::<serde_json::Value>::new(), "no gap or reset");
    for (what, log) in [("before the restart", first_log), ("after the restart", node.stderr())] {
        assert!(log.contains("DEBUG"), "the node logged at debug level {what}");
        assert!(!log.contains(&token), "the access token reached the node's log {what}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn embedded_browser_resumes_across_a_node_restart() {
    browser_resumes_across_a_node_restart(Engine::Embedded).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nats_browser_resumes_across_a_node_restart() {
    let nats = finmesh_testkit::NatsServer::start().await.expect("start nats-server");
    browser_resumes_across_a_node_restart(Engine::Nats(nats.url())).await;
}
