//! `finmesh serve` as a child process of the benchmark: the shipped
//! `finmesh` binary, authentication on, as users run it. Which binary:
//! [`finmesh_binary`] (`$FINMESH_BIN`, else the `finmesh` beside this
//! executable, so `cargo build --release -p finmesh -p finmesh-bench`
//! measures a release gateway, else the first `finmesh` on `PATH`).
//!
//! The child's stdout and stderr go to a log file in its directory; start-up
//! polls that file (with a deadline) for the `listening on <url>` line and
//! takes the admin token written on the first start (its file's path is printed). Its configuration file
//! raises only the per-client rate limit (default 1000/s, which a load
//! generator on one token would hit at once) and the concurrency cap; the
//! limiter itself still runs on every request. The child is SIGKILLed and
//! reaped on drop, before its directory is removed.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::Context as _;
use finmesh_testkit::process::ServerProcess;

/// The variable naming the `finmesh` binary to measure.
pub const FINMESH_BIN_ENV: &str = "FINMESH_BIN";

/// The `finmesh` binary whose `serve` the gateway scenarios measure:
/// `$FINMESH_BIN`, else `finmesh` in this executable's directory, else the
/// first `finmesh` on `PATH`.
pub fn finmesh_binary() -> anyhow::Result<PathBuf> {
    if let Some(path) = std::env::var_os(FINMESH_BIN_ENV) {
        let path = PathBuf::from(path);
        anyhow::ensure!(path.is_file(), "{FINMESH_BIN_ENV}={} is not a file", path.display());
        return Ok(path);
    }
    let beside = std::env::current_exe().ok().and_then(|exe| Some(exe.parent()?.join("finmesh")));
    let on_path = std::env::var_os("PATH").into_iter().flat_map(|p| std::env::split_paths(&p).collect::<Vec<_>>());
    beside.into_iter().chain(on_path.map(|dir| dir.join("finmesh"))).find(|p| p.is_file()).context(
        "no finmesh binary to benchmark: build it beside finmesh-bench (`cargo build -p finmesh -p finmesh-bench`, \
         with the same profile) or set FINMESH_BIN",
    )
}

/// How long `finmesh serve` may take to print its URL.
const START_TIMEOUT: Duration = Duration::from_secs(60);

/// The configuration the benchmark runs `serve` with.
pub const SERVE_CONFIG: &str = "\
[limits]
max_concurrent_requests = 4096

[limits.rate]
per_second = 1000000000
burst = 1000000000
";

/// Which engine, and TLS or not.
#[derive(Debug, Clone, Default)]
pub struct NodeOptions {
    /// `Some(url)`: `--engine nats --nats-servers url`; else embedded.
    pub nats_url: Option<String>,
    /// `Some((cert, key))`: serve HTTPS.
    pub tls: Option<(PathBuf, PathBuf)>,
}

/// A running `finmesh serve`.
#[derive(Debug)]
pub struct Node {
    process: ServerProcess,
    /// `http://127.0.0.1:<port>` or `https://...`.
    pub url: String,
    /// The admin token written at the first start in this data directory.
    pub token: Option<String>,
}

impl Node {
    /// Start `finmesh serve` with its data, config and log under `dir`.
    /// A second start on the same `dir` keeps the node secret (no new token).
    pub async fn start(dir: &Path, options: &NodeOptions) -> anyhow::Result<Node> {
        Node::start_with(dir, options, "").await
    }

    /// [`Node::start`] with `extra` TOML appended to [`SERVE_CONFIG`]
    /// (tables other than `[limits]`, e.g. `[subscriptions]`).
    pub async fn start_with(dir: &Path, options: &NodeOptions, extra: &str) -> anyhow::Result<Node> {
        let exe = finmesh_binary()?;
        let config = dir.join("serve.toml");
        std::fs::write(&config, format!("{SERVE_CONFIG}{extra}"))?;
        let log = dir.join(if options.tls.is_some() { "serve-tls.log" } else { "serve.log" });
        let mut command = std::process::Command::new(exe);
        command
            .args(["--log", "warn", "serve", "--listen", "127.0.0.1:0", "--config"])
            .arg(&config)
            .arg("--data-dir")
            .arg(dir.join("data"));
        for var in ["FINMESH_LISTEN", "FINMESH_ENGINE", "FINMESH_DATA_DIR", "FINMESH_NATS_SERVERS", "FINMESH_LOG"] {
            command.env_remove(var);
        }
        if let Some(url) = &options.nats_url {
            command.args(["--engine", "nats", "--nats-servers", url]);
        }
        if let Some((cert, key)) = &options.tls {
            command.arg("--tls-cert").arg(cert).arg("--tls-key").arg(key);
        }
        let mut process = ServerProcess::spawn("finmesh serve", command, &log)?;
        let deadline = Instant::now() + START_TIMEOUT;
        loop {
            if let Some(status) = process.try_exit_status()? {
                anyhow::bail!("{}", process.exited_error(status));
            }
            let text = std::fs::read_to_string(&log).unwrap_or_default();
            if let Some((url, token_file)) = parse_start_lines(&text) {
                let token = match token_file {
                    Some(path) => Some(
                        std::fs::read_to_string(&path)
                            .with_context(|| format!("reading the admin token in {path}"))?
                            .trim()
                            .to_owned(),
                    ),
                    None => None,
                };
                return Ok(Node { process, url, token });
            }
            anyhow::ensure!(Instant::now() < deadline, "{}", process.not_ready_error(START_TIMEOUT));
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    /// The process id of `finmesh serve` (for its VmRSS).
    pub fn pid(&self) -> u32 {
        self.process.pid()
    }

    /// SIGTERM (the drain), then SIGKILL after a grace period.
    pub async fn stop(mut self) -> anyhow::Result<()> {
        self.process.stop(finmesh_testkit::process::STOP_GRACE).await.map(drop).context("stopping finmesh serve")
    }
}

/// The URL from `listening on <url>` and the path of the admin token file,
/// once the URL line is there.
fn parse_start_lines(text: &str) -> Option<(String, Option<String>)> {
    let url = text.lines().find_map(|l| l.strip_prefix("listening on "))?;
    let token_file = text
        .lines()
        .find(|l| l.starts_with("admin token ("))
        .and_then(|l| l.split_once(") written to "))
        .map(|(_, path)| path.trim().to_owned());
    Some((url.trim().to_owned(), token_file))
}

/// A reqwest client for set-up calls, trusting `cert` when given.
pub fn http_client(cert: Option<&Path>) -> anyhow::Result<reqwest::Client> {
    let mut builder = reqwest::Client::builder().timeout(Duration::from_secs(30));
    if let Some(cert) = cert {
        let pem = std::fs::read(cert).with_context(|| format!("reading {}", cert.display()))?;
        builder = builder.add_root_certificate(reqwest::Certificate::from_pem(&pem)?);
    }
    Ok(builder.build()?)
}

/// Send a set-up request and fail unless it answers 2xx.
pub async fn expect_ok(request: reqwest::RequestBuilder, what: &str) -> anyhow::Result<bytes::Bytes> {
    let response = request.send().await.with_context(|| what.to_owned())?;
    let status = response.status();
    let body = response.bytes().await?;
    anyhow::ensure!(status.is_success(), "{what}: {status}: {}", String::from_utf8_lossy(&body));
    Ok(body)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn start_lines_give_the_url_and_the_token_file() {
        let first = "admin token (valid 30 days) written to /d/admin-token\nissue more with: ...\nlistening on http://127.0.0.1:4100\n";
        assert_eq!(
            parse_start_lines(first),
            Some(("http://127.0.0.1:4100".to_owned(), Some("/d/admin-token".to_owned())))
        );
        assert_eq!(parse_start_lines("admin token (valid 30 days) written to /d/admin-token\n"), None);
        assert_eq!(parse_start_lines("listening on https://h:1\n"), Some(("https://h:1".to_owned(), None)));
    }
}
