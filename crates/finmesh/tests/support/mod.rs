//! A `finmesh serve` process that can be stopped and started again on the
//! same data directory and port (the browser and SDK tests restart nodes
//! under their subscribers), with its standard error kept for inspection.

#![allow(dead_code)]

use std::io::{BufRead, BufReader, Read};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::Duration;

pub const WAIT: Duration = Duration::from_secs(60);

/// Which engine a node runs on.
pub enum Engine {
    Embedded,
    /// `--engine nats` against this server URL.
    Nats(String),
}

/// How to start (and start again) a node.
pub struct NodeSpec {
    pub data_dir: PathBuf,
    pub config: PathBuf,
    pub engine_args: Vec<String>,
}

impl NodeSpec {
    /// A node on `dir` with the TOML `config` and `engine`.
    pub fn new(dir: &Path, config: &str, engine: &Engine) -> NodeSpec {
        let file = dir.join("finmesh.toml");
        std::fs::write(&file, config).expect("write the configuration");
        let engine_args = match engine {
            Engine::Embedded => vec![],
            Engine::Nats(url) => vec!["--engine".into(), "nats".into(), "--nats-servers".into(), url.clone()],
        };
        NodeSpec { data_dir: dir.join("data"), config: file, engine_args }
    }

    /// Start on `listen` (`127.0.0.1:0` for any port); returns once the
    /// node printed its address.
    pub fn start(&self, listen: &str) -> Node {
        let mut child = Command::new(env!("CARGO_BIN_EXE_finmesh"))
            .args(["serve", "--listen", listen, "--config"])
            .arg(&self.config)
            .arg("--data-dir")
            .arg(&self.data_dir)
            .args(&self.engine_args)
            .env_remove("FINMESH_CONFIG")
            .env("FINMESH_LOG", "debug")
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("start finmesh serve");
        let stderr = Arc::new(Mutex::new(String::new()));
        let mut err = child.stderr.take().expect("stderr");
        let keep = stderr.clone();
        std::thread::spawn(move || {
            let mut buf = [0u8; 8192];
            while let Ok(n) = err.read(&mut buf) {
                if n == 0 {
                    break;
                }
                keep.lock().unwrap().push_str(&String::from_utf8_lossy(&buf[..n]));
            }
        });
        let mut lines = BufReader::new(child.stdout.take().expect("stdout")).lines();
        let addr = loop {
            let Some(Ok(line)) = lines.next() else {
                panic!("serve exited before listening:\n{}", stderr.lock().unwrap());
            };
            if let Some(url) = line.strip_prefix("listening on http://") {
                break (url.parse().expect("address"), false);
            }
            if let Some(url) = line.strip_prefix("listening on https://") {
                break (url.parse().expect("address"), true);
            }
        };
        let (addr, tls) = addr;
        std::thread::spawn(move || lines.for_each(drop));
        Node { child, addr, tls, stderr }
    }

    /// The admin token the first start wrote.
    pub fn admin_token(&self) -> String {
        std::fs::read_to_string(self.data_dir.join("admin-token")).expect("admin token").trim_end().to_owned()
    }

    /// A token for `sub` with `scopes`, from `finmesh token issue`.
    pub fn issue_token(&self, sub: &str, scopes: &[&str]) -> String {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_finmesh"));
        cmd.args(["token", "issue", "--config"]).arg(&self.config).arg("--data-dir").arg(&self.data_dir);
        cmd.args(["--sub", sub, "--ttl", "15m"]).env_remove("FINMESH_CONFIG");
        for scope in scopes {
            cmd.args(["--scope", scope]);
        }
        let out = cmd.output().expect("run finmesh token issue");
        assert!(out.status.success(), "token issue: {}", String::from_utf8_lossy(&out.stderr));
        String::from_utf8(out.stdout).expect("UTF-8").trim().to_owned()
    }
}

/// A running `finmesh serve`.
pub struct Node {
    child: Child,
    pub addr: SocketAddr,
    /// Whether it serves HTTPS (a `[tls]` section in its configuration).
    pub tls: bool,
    stderr: Arc<Mutex<String>>,
}

impl Node {
    pub fn url(&self, path: &str) -> String {
        let scheme = if self.tls { "https" } else { "http" };
        format!("{scheme}://{}{path}", self.addr)
    }

    /// Everything the node wrote to standard error so far.
    pub fn stderr(&self) -> String {
        self.stderr.lock().unwrap().clone()
    }

    pub fn signal(&self, sig: libc::c_int) {
        // SAFETY: kill(2) on our own, not yet reaped child.
        assert_eq!(unsafe { libc::kill(self.child.id() as libc::pid_t, sig) }, 0);
    }

    /// Send `sig` and wait (with a deadline) for the process to exit.
    pub fn stop(mut self, sig: libc::c_int) -> String {
        self.signal(sig);
        let pid = self.child.id();
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::scope(|scope| {
            let child = &mut self.child;
            scope.spawn(move || {
                let _ = tx.send(child.wait());
            });
            if rx.recv_timeout(WAIT).is_err() {
                // SAFETY: kill(2) on our own child, which the thread still waits for.
                unsafe { libc::kill(pid as libc::pid_t, libc::SIGKILL) };
                panic!("serve did not exit within {WAIT:?}");
            }
        });
        self.stderr()
    }
}

impl Drop for Node {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A reqwest client (installs the rustls provider once).
pub fn http() -> reqwest::Client {
    let _ = rustls::crypto::aws_lc_rs::default_provider().install_default();
    reqwest::Client::builder().timeout(WAIT).build().expect("client")
}

/// Create stream `name` on `subjects` with `token`.
pub async fn create_stream(node: &Node, token: &str, name: &str, config: serde_json::Value) {
    let res = http().put(node.url(&format!("/v1/streams/{name}"))).bearer_auth(token).json(&config).send().await;
    let res = res.expect("create stream");
    assert_eq!(res.status(), 200, "create stream: {}", res.text().await.unwrap_or_default());
}

/// Publish messages `{"i": k}` for each `k` in `range` on `subject`.
pub async fn publish(node: &Node, token: &str, stream: &str, subject: &str, range: std::ops::RangeInclusive<u64>) {
    let body: String = range.map(|i| format!("{{\"subject\":\"{subject}\",\"payload\":{{\"i\":{i}}}}}\n")).collect();
    let res = http()
        .post(node.url(&format!("/v1/streams/{stream}/messages")))
        .bearer_auth(token)
        .header("content-type", "application/x-ndjson")
        .body(body)
        .send()
        .await
        .expect("publish");
    assert_eq!(res.status(), 200, "publish: {}", res.text().await.unwrap_or_default());
}

/// Poll `cond` every 20 ms until it holds; panics after `deadline`.
pub async fn until<F, Fut>(deadline: Duration, what: &str, mut cond: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let end = tokio::time::Instant::now() + deadline;
    while !cond().await {
        assert!(tokio::time::Instant::now() < end, "timed out waiting for: {what}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}
