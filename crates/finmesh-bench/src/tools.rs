//! The external programs the gateway benchmarks drive: nginx (the peer that
//! serves a static file) and wrk (the HTTP/1.1 load generator).
//!
//! - [`find_tool`]: `$FINMESH_NGINX` / `$FINMESH_WRK`, else `PATH`; when
//!   missing, the error names the Debian package to install.
//! - [`Nginx`]: started with a generated configuration (2 workers,
//!   `access_log off`, keep-alive without a request cap, one 256-byte file
//!   at `/v`, plain and TLS ports) in a temporary prefix directory; killed
//!   and reaped on drop, before its directory is removed.
//! - [`run_wrk`] / [`parse_wrk`]: one `wrk --latency` run; a run with any
//!   non-2xx answer, connect error or timeout is an error, not a figure.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::Context as _;
use finmesh_testkit::process::ServerProcess;

use super::measure::Measurement;

/// Environment variable naming the nginx binary.
pub const NGINX_ENV: &str = "FINMESH_NGINX";
/// Environment variable naming the wrk binary.
pub const WRK_ENV: &str = "FINMESH_WRK";
/// Path nginx serves its static value at.
pub const NGINX_PATH: &str = "/v";

/// Find `program`: `$env_var`, else `PATH`, else `/usr/sbin` (Debian's
/// nginx, not on a normal user's `PATH`); the error names `apt_package`.
pub fn find_tool(program: &'static str, env_var: &str, apt_package: &str) -> anyhow::Result<PathBuf> {
    let hint = format!("install the Debian package `{apt_package}` (apt-get install {apt_package}) or set {env_var}");
    let found = finmesh_testkit::binary::find_binary(program, None, env_var, &hint);
    let sbin = Path::new("/usr/sbin").join(program);
    match found {
        Err(_) if std::env::var_os(env_var).is_none() && sbin.is_file() => Ok(sbin),
        other => other.with_context(|| format!("the gateway benchmarks need {program}")),
    }
}

/// The nginx configuration for a server rooted in `prefix`.
pub fn nginx_config(prefix: &Path, http_port: u16, https_port: u16, cert: &Path, key: &Path, as_root: bool) -> String {
    let p = prefix.display();
    // As root, nginx would run its workers as `nobody`, who cannot enter a
    // private temporary directory.
    let user = if as_root { "user root root;\n" } else { "" };
    format!(
        "{user}worker_processes 2;
daemon off;
master_process on;
pid {p}/nginx.pid;
error_log {p}/error.log warn;
events {{ worker_connections 4096; }}
http {{
    access_log off;
    default_type application/octet-stream;
    keepalive_requests 100000000;
    client_body_temp_path {p}/tmp/body;
    proxy_temp_path {p}/tmp/proxy;
    fastcgi_temp_path {p}/tmp/fastcgi;
    uwsgi_temp_path {p}/tmp/uwsgi;
    scgi_temp_path {p}/tmp/scgi;
    server {{
        listen 127.0.0.1:{http_port};
        listen 127.0.0.1:{https_port} ssl;
        ssl_certificate {cert};
        ssl_certificate_key {key};
        root {p}/html;
    }}
}}
",
        cert = cert.display(),
        key = key.display(),
    )
}

/// A running nginx serving `value` at [`NGINX_PATH`] over HTTP and HTTPS.
#[derive(Debug)]
pub struct Nginx {
    // Declared before `_dir`: the process is killed before its files go.
    process: ServerProcess,
    /// Plain HTTP port.
    pub http_port: u16,
    /// TLS port (same certificate as the gateway's).
    pub https_port: u16,
    _dir: tempfile::TempDir,
}

impl Nginx {
    /// Start nginx in `dir` and wait (up to 20 s) until it serves the file.
    pub async fn start(
        binary: &Path,
        dir: tempfile::TempDir,
        value: &[u8],
        cert: &Path,
        key: &Path,
    ) -> anyhow::Result<Nginx> {
        let prefix = dir.path().to_path_buf();
        std::fs::create_dir_all(prefix.join("html"))?;
        std::fs::create_dir_all(prefix.join("tmp"))?;
        std::fs::write(prefix.join("html").join(NGINX_PATH.trim_start_matches('/')), value)?;
        let ports = finmesh_testkit::ports::free_ports(2)?;
        let (http_port, https_port) = (ports[0], ports[1]);
        let as_root = std::os::unix::fs::MetadataExt::uid(&std::fs::metadata("/proc/self")?) == 0;
        let conf = prefix.join("nginx.conf");
        std::fs::write(&conf, nginx_config(&prefix, http_port, https_port, cert, key, as_root))?;
        let mut command = Command::new(binary);
        command.arg("-p").arg(&prefix).arg("-c").arg(&conf).arg("-e").arg(prefix.join("error.log"));
        let mut process = ServerProcess::spawn("nginx", command, &prefix.join("nginx.log"))?;
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            if let Some(status) = process.try_exit_status()? {
                let log = std::fs::read_to_string(prefix.join("error.log")).unwrap_or_default();
                anyhow::bail!("{}\nerror.log:\n{log}", process.exited_error(status));
            }
            if finmesh_testkit::probe::http_status(http_port, NGINX_PATH).await == Some(200) {
                break;
            }
            anyhow::ensure!(Instant::now() < deadline, "{}", process.not_ready_error(Duration::from_secs(20)));
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        Ok(Nginx { process, http_port, https_port, _dir: dir })
    }

    /// Stop nginx (SIGTERM, then SIGKILL after a grace period).
    pub async fn stop(mut self) -> anyhow::Result<()> {
        self.process.stop(finmesh_testkit::process::STOP_GRACE).await.map(drop).context("stopping nginx")
    }
}

/// What one wrk run measured.
#[derive(Debug, Clone, PartialEq)]
pub struct WrkResult {
    /// Requests completed in the run.
    pub requests: u64,
    /// Requests per second over the run.
    pub requests_per_sec: f64,
    /// Median latency, µs.
    pub p50_us: f64,
    /// 99th percentile latency, µs.
    pub p99_us: f64,
    /// Answers outside 2xx/3xx.
    pub non_2xx: u64,
    /// Socket errors: connect, read, write, timeout.
    pub socket_errors: [u64; 4],
}

impl WrkResult {
    /// As a benchmark figure.
    pub fn measurement(&self, id: &str, peer: &str, what: &str) -> Measurement {
        Measurement {
            id: id.to_owned(),
            peer: peer.to_owned(),
            what: what.to_owned(),
            value: self.requests_per_sec,
            unit: "req/s".to_owned(),
            p50_us: Some(self.p50_us),
            p99_us: Some(self.p99_us),
            p999_us: None,
            max_us: None,
            note: None,
        }
    }
}

/// A wrk latency such as `812.00us`, `4.60ms` or `1.02s`, in µs.
fn parse_latency_us(s: &str) -> Option<f64> {
    let split = s.find(|c: char| c.is_ascii_alphabetic())?;
    let (number, unit) = s.split_at(split);
    let n: f64 = number.parse().ok()?;
    let factor = match unit {
        "us" => 1.0,
        "ms" => 1e3,
        "s" => 1e6,
        "m" => 60e6,
        "h" => 3600e6,
        _ => return None,
    };
    Some(n * factor)
}

/// Parse the output of `wrk --latency`.
pub fn parse_wrk(out: &str) -> anyhow::Result<WrkResult> {
    let mut result = WrkResult {
        requests: 0,
        requests_per_sec: f64::NAN,
        p50_us: f64::NAN,
        p99_us: f64::NAN,
        non_2xx: 0,
        socket_errors: [0; 4],
    };
    let mut in_distribution = false;
    for line in out.lines() {
        let t = line.trim();
        if t.starts_with("Latency Distribution") {
            in_distribution = true;
            continue;
        }
        if in_distribution {
            let mut parts = t.split_whitespace();
            match (parts.next(), parts.next()) {
                (Some("50%"), Some(v)) => result.p50_us = parse_latency_us(v).context("wrk p50")?,
                (Some("99%"), Some(v)) => result.p99_us = parse_latency_us(v).context("wrk p99")?,
                (Some(q), Some(_)) if q.ends_with('%') => {}
                _ => in_distribution = false,
            }
        }
        if let Some(v) = t.strip_prefix("Requests/sec:") {
            result.requests_per_sec = v.trim().parse().context("wrk Requests/sec")?;
        } else if let Some(v) = t.strip_prefix("Non-2xx or 3xx responses:") {
            result.non_2xx = v.trim().parse().context("wrk Non-2xx")?;
        } else if let Some(v) = t.strip_prefix("Socket errors:") {
            // "connect 0, read 0, write 0, timeout 0"
            for (i, part) in v.split(',').enumerate().take(4) {
                result.socket_errors[i] =
                    part.split_whitespace().nth(1).and_then(|n| n.parse().ok()).context("wrk Socket errors")?;
            }
        } else if let Some((n, _)) = t.split_once(" requests in ") {
            result.requests = n.trim().parse().context("wrk request count")?;
        }
    }
    anyhow::ensure!(
        result.requests_per_sec.is_finite() && result.p50_us.is_finite() && result.p99_us.is_finite(),
        "wrk output lacks Requests/sec or the latency distribution (was --latency given?):\n{out}"
    );
    Ok(result)
}

/// One wrk run against `url`.
#[derive(Debug, Clone)]
pub struct WrkRun<'a> {
    /// The wrk binary.
    pub wrk: &'a Path,
    /// Full URL, `http://` or `https://`.
    pub url: &'a str,
    /// Extra request headers, `Name: value`.
    pub headers: &'a [String],
    /// wrk threads (`-t`).
    pub threads: usize,
    /// Open connections (`-c`).
    pub connections: usize,
    /// A Lua script (`-s`), e.g. one that picks the path per request.
    pub script: Option<&'a Path>,
}

/// Whole seconds for wrk's `-d` (it takes no fractions): at least 1.
fn whole_secs(d: Duration) -> u64 {
    d.as_secs_f64().ceil().max(1.0) as u64
}

/// Run wrk for `duration`; fails on any non-2xx answer, connect error or timeout.
pub async fn run_wrk(run: &WrkRun<'_>, duration: Duration) -> anyhow::Result<WrkResult> {
    let mut command = tokio::process::Command::new(run.wrk);
    command
        .arg(format!("-t{}", run.threads))
        .arg(format!("-c{}", run.connections))
        .arg(format!("-d{}s", whole_secs(duration)))
        .arg("--latency")
        .arg("--timeout")
        .arg("5s");
    for h in run.headers {
        command.arg("-H").arg(h);
    }
    if let Some(script) = run.script {
        command.arg("-s").arg(script);
    }
    command.arg(run.url).kill_on_drop(true);
    let output = command.output().await.with_context(|| format!("running {}", run.wrk.display()))?;
    let stdout = String::from_utf8_lossy(&output.stdout);
    anyhow::ensure!(
        output.status.success(),
        "wrk {} failed ({}): {stdout}{}",
        run.url,
        output.status,
        String::from_utf8_lossy(&output.stderr)
    );
    let result = parse_wrk(&stdout)?;
    anyhow::ensure!(result.non_2xx == 0, "wrk {}: {} non-2xx answers\n{stdout}", run.url, result.non_2xx);
    let [connect, _, _, timeout] = result.socket_errors;
    anyhow::ensure!(connect == 0 && timeout == 0, "wrk {}: socket errors\n{stdout}", run.url);
    anyhow::ensure!(result.requests > 0, "wrk {}: no requests completed\n{stdout}", run.url);
    Ok(result)
}

#[cfg(test)]
mod tests {
    use super::*;

    const OUTPUT: &str = "Running 2s test @ http://127.0.0.1:8080/v
  2 threads and 64 connections
  Thread Stats   Avg      Stdev     Max   +/- Stdev
    Latency     1.14ms  812.07us  24.51ms   89.12%
    Req/Sec    28.10k     2.01k   31.55k    70.00%
  Latency Distribution
     50%  812.00us
     75%    1.20ms
     90%    2.01ms
     99%    4.60ms
  111872 requests in 2.00s, 51.12MB read
  Socket errors: connect 0, read 3, write 0, timeout 1
  Non-2xx or 3xx responses: 7
Requests/sec:  55902.41
Transfer/sec:     25.54MB
";

    #[test]
    fn parses_wrk_latency_output() {
        let r = parse_wrk(OUTPUT).unwrap();
        assert_eq!(r.requests, 111_872);
        assert_eq!(r.requests_per_sec, 55_902.41);
        assert_eq!(r.p50_us, 812.0);
        assert_eq!(r.p99_us, 4600.0);
        assert_eq!(r.non_2xx, 7);
        assert_eq!(r.socket_errors, [0, 3, 0, 1]);
        let m = r.measurement("x", "nginx", "w");
        assert_eq!((m.value, m.unit.as_str(), m.p99_us), (55_902.41, "req/s", Some(4600.0)));
    }

    #[test]
    fn output_without_latency_distribution_is_an_error() {
        let without: String =
            OUTPUT.lines().filter(|l| !l.contains('%') || l.contains("Stdev")).collect::<Vec<_>>().join("\n");
        let err = parse_wrk(&without).unwrap_err().to_string();
        assert!(err.contains("--latency"), "{err}");
        assert_eq!(parse_latency_us("1.5s"), Some(1_500_000.0));
        assert_eq!(parse_latency_us("12xs"), None);
        assert_eq!(whole_secs(Duration::from_millis(200)), 1);
        assert_eq!(whole_secs(Duration::from_millis(2500)), 3);
    }

    #[test]
    fn a_missing_tool_names_its_apt_package() {
        let err = find_tool("finmesh-no-such-tool", "FINMESH_TEST_NO_SUCH_TOOL_VAR", "wrk").unwrap_err();
        let text = format!("{err:#}");
        assert!(text.contains("apt-get install wrk"), "{text}");
    }

    #[test]
    fn nginx_config_has_two_workers_no_access_log_and_both_ports() {
        let conf = nginx_config(Path::new("/p"), 8080, 8443, Path::new("/c.pem"), Path::new("/k.pem"), false);
        for needle in [
            "worker_processes 2;",
            "access_log off;",
            "listen 127.0.0.1:8080;",
            "listen 127.0.0.1:8443 ssl;",
            "ssl_certificate /c.pem;",
            "ssl_certificate_key /k.pem;",
            "root /p/html;",
            "pid /p/nginx.pid;",
        ] {
            assert!(conf.contains(needle), "{needle} missing in\n{conf}");
        }
        assert!(!conf.contains("user "));
        assert!(nginx_config(Path::new("/p"), 1, 2, Path::new("/c"), Path::new("/k"), true).starts_with("user root"));
    }
}
