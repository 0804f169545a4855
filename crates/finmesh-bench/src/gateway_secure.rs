//! `gateway-kv-secure`: HTTP KV GET on an encrypted, hashed bucket next
//! to a plain bucket, on one `finmesh serve` (embedded engine, auth on)
//! started with `[security]` (a master key file written for the run).
//!
//! Bucket `plain` has no security options; bucket `secure` has
//! `encryption = "aes256gcm"` and `key_hashing = "hmac-sha256"`, so each of
//! its gets hashes the key (HMAC-SHA256) and opens the value (AES-256-GCM).
//! Both hold the same 256-byte value under the same key and are measured
//! with the same wrk command as `gateway-kv` (`-t2 -c64`, 1-second warm-up,
//! any non-2xx fails the run), one after the other on the same node; the
//! order swaps between odd and even runs. The ratio encrypted / plain has a
//! target of ≥ 0.90 (issue 18).

use anyhow::Context as _;

use super::BenchContext;
use super::embedded_kv::{key_name, value_for};
use super::gateway::{WRK_CONNECTIONS, WRK_THREADS};
use super::measure::{Measurement, warmup_for};
use super::node::{Node, NodeOptions, expect_ok, http_client};
use super::tools::{WRK_ENV, WrkRun, find_tool, run_wrk};

/// Ids (the ratio refers to them).
pub const PLAIN: &str = "gateway.kv.get.http.plain-bucket";
pub const SECURE: &str = "gateway.kv.get.http.encrypted-hashed-bucket";

/// The two buckets: (name, `security` of its `PUT` body).
const BUCKETS: [(&str, &str); 2] =
    [("plain", "{}"), ("secure", r#"{"security": {"encryption": "aes256gcm", "key_hashing": "hmac-sha256"}}"#)];

/// Write a fresh random master key (64 hex digits) to `path`, mode 0600.
fn write_master_key(path: &std::path::Path) -> anyhow::Result<()> {
    use std::io::Read as _;
    use std::os::unix::fs::OpenOptionsExt as _;
    let mut key = [0u8; 32];
    std::fs::File::open("/dev/urandom")?.read_exact(&mut key)?;
    let hex: String = key.iter().map(|b| format!("{b:02x}")).collect();
    let mut file = std::fs::OpenOptions::new().write(true).create_new(true).mode(0o600).open(path)?;
    std::io::Write::write_all(&mut file, hex.as_bytes())?;
    Ok(())
}

/// The `[security]` table of the node's configuration.
pub fn security_config(key_file: &std::path::Path) -> String {
    format!("\n[security]\nmaster_key_file = {:?}\n", key_file.display().to_string())
}

/// Run the scenario (see the module doc).
pub async fn run(ctx: &BenchContext) -> anyhow::Result<Vec<Measurement>> {
    let wrk = find_tool("wrk", WRK_ENV, "wrk")?;
    let dir = ctx.tempdir("gateway-kv-secure")?;
    let keys = ctx.tempdir("gateway-kv-secure-key")?;
    let key_file = keys.path().join("master.key");
    write_master_key(&key_file).context("writing the master key")?;
    let node = Node::start_with(dir.path(), &NodeOptions::default(), &security_config(&key_file)).await?;
    let token = node.token.clone().context("finmesh serve printed no admin token")?;
    let client = http_client(None)?;
    let key = key_name(0);
    let mut urls = Vec::new();
    for (bucket, body) in BUCKETS {
        let body: serde_json::Value = serde_json::from_str(body)?;
        expect_ok(client.put(format!("{}/v1/kv/{bucket}", node.url)).bearer_auth(&token).json(&body), "create bucket")
            .await?;
        let url = format!("{}/v1/kv/{bucket}/{key}", node.url);
        expect_ok(client.put(&url).bearer_auth(&token).body(value_for(0)), "put the key").await?;
        let got = expect_ok(client.get(&url).bearer_auth(&token), "get the key").await?;
        anyhow::ensure!(got == value_for(0), "bucket {bucket}: the value read back differs");
        urls.push(url);
    }
    let headers = [format!("Authorization: Bearer {token}")];
    let mut order = [0, 1];
    if ctx.run.is_multiple_of(2) {
        order.reverse();
    }
    let mut results = [None, None];
    for i in order {
        let run = WrkRun {
            wrk: &wrk,
            url: &urls[i],
            headers: &headers,
            threads: WRK_THREADS,
            connections: WRK_CONNECTIONS,
            script: None,
        };
        run_wrk(&run, warmup_for(ctx.duration)).await.context("wrk warm-up")?;
        results[i] =
            Some(run_wrk(&run, ctx.duration).await.with_context(|| format!("wrk on bucket {}", BUCKETS[i].0))?);
    }
    node.stop().await?;
    let note =
        format!("wrk -t{WRK_THREADS} -c{WRK_CONNECTIONS} keep-alive, HTTP/1.1, one 256 B value, node with [security]");
    let [plain, secure] = results.map(|r| r.expect("both buckets measured"));
    Ok(vec![
        plain
            .measurement(PLAIN, "finmesh-gateway", "KV GET 256 B over http, plain bucket, embedded engine, auth on")
            .note(note.as_str()),
        secure
            .measurement(
                SECURE,
                "finmesh-gateway",
                "KV GET 256 B over http, bucket with aes256gcm + hmac-sha256 keys, embedded engine, auth on",
            )
            .note(format!("{note}; target ≥ 0.90 × the plain bucket")),
    ])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_master_key_file_is_private_hex() {
        use std::os::unix::fs::PermissionsExt as _;
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("k");
        write_master_key(&path).unwrap();
        let text = std::fs::read_to_string(&path).unwrap();
        assert!(text.len() == 64 && text.bytes().all(|b| b.is_ascii_hexdigit()), "{text}");
        assert_eq!(std::fs::metadata(&path).unwrap().permissions().mode() & 0o777, 0o600);
        assert!(security_config(&path).contains("master_key_file = \""));
    }
}
