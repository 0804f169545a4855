//! The HTTP gateway (`finmesh serve` as a child process, auth on) next to
//! its peers, measured in the same run.
//!
//! - [`run_kv`] (`gateway-kv`): `GET /v1/kv/bench/<key>` (256-byte value,
//!   embedded engine) with `wrk -t2 -c64 --latency` and a bearer token,
//!   against nginx serving a 256-byte static file with the same wrk command;
//!   plain HTTP, then TLS (same self-signed certificate for both servers).
//! - [`run_nats_kv`] (`gateway-nats-kv`): the same wrk load on `serve` with
//!   `engine = nats` against a test-kit nats-server, next to async-nats KV
//!   get on that server directly (64 concurrent tasks, one connection).
//! - [`run_publish`] (`gateway-publish`): NDJSON batches of 100 messages of
//!   128 bytes (`{"subject": ..., "payload": "<126 chars>"}`, stored as the
//!   128-byte JSON string) from 4 reqwest clients, next to the embedded
//!   engine's in-process `publish_batch` of 100 from 4 tasks on the same
//!   stream configuration.
//!
//! wrk gets a 1-second warm-up run before each measured run. Every get or
//! publish answer is checked (wrk: any non-2xx fails the run).

use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::Context as _;
use async_nats::jetstream;
use bytes::Bytes;
use finmesh_core::{OutgoingMessage, StreamConfig, StreamEngine, StreamName, Subject, SubjectPattern, SyncPolicy};
use finmesh_embedded::EmbeddedEngine;

use super::embedded_kv::{check_value, key_name, value_for};
use super::measure::{Measurement, closed_loop, warmup_for};
use super::node::{Node, NodeOptions, expect_ok, http_client};
use super::tools::{NGINX_ENV, NGINX_PATH, Nginx, WRK_ENV, WrkResult, WrkRun, find_tool, run_wrk};
use super::{BenchContext, PUBLISH_PAYLOAD, start_nats};

/// Bucket the gateway serves the value from.
pub const BUCKET: &str = "bench";
/// wrk threads.
pub const WRK_THREADS: usize = 2;
/// wrk connections.
pub const WRK_CONNECTIONS: usize = 64;
/// Concurrent HTTP publishers (and in-process publishing tasks).
pub const PUBLISH_CLIENTS: usize = 4;
/// Messages per NDJSON batch.
pub const PUBLISH_BATCH: usize = 100;

/// Ids (ratios refer to them).
pub const KV_HTTP: &str = "gateway.kv.get.http";
pub const KV_HTTPS: &str = "gateway.kv.get.https";
pub const NGINX_HTTP: &str = "nginx.static.http";
pub const NGINX_HTTPS: &str = "nginx.static.https";
pub const NATS_KV_HTTP: &str = "gateway.nats.kv.get.http";
pub const NATS_KV_DIRECT: &str = "nats.kv.get.64-tasks";
pub const PUBLISH_HTTP: &str = "gateway.publish.ndjson-100";
pub const PUBLISH_IN_PROCESS: &str = "embedded.publish.batch-100.4-tasks";
pub const PUBLISH_HTTP_INTERVAL: &str = "gateway.publish.ndjson-100.interval";
pub const PUBLISH_IN_PROCESS_INTERVAL: &str = "embedded.publish.batch-100.4-tasks.interval";
/// The stream policies `gateway-publish` measures: the default (`always`)
/// and `interval(100 ms)`, with the ids of (HTTP, in-process) for each.
const PUBLISH_POLICIES: [(&str, SyncPolicy, &str, &str); 2] = [
    ("sync = always (the default)", SyncPolicy::Always, PUBLISH_HTTP, PUBLISH_IN_PROCESS),
    ("sync = interval(100 ms)", SyncPolicy::Interval { ms: 100 }, PUBLISH_HTTP_INTERVAL, PUBLISH_IN_PROCESS_INTERVAL),
];

/// Write a self-signed certificate for `localhost` and `127.0.0.1` and its
/// key under `dir/certs` (what `finmesh certs dev` writes).
pub fn dev_cert(dir: &Path) -> anyhow::Result<(PathBuf, PathBuf)> {
    let names = vec!["localhost".to_owned(), "127.0.0.1".to_owned()];
    let pair = rcgen::generate_simple_self_signed(names).context("generating a self-signed certificate")?;
    let out = dir.join("certs");
    std::fs::create_dir_all(&out).with_context(|| format!("creating {}", out.display()))?;
    let (cert, key) = (out.join("cert.pem"), out.join("key.pem"));
    std::fs::write(&cert, pair.cert.pem()).with_context(|| format!("writing {}", cert.display()))?;
    std::fs::write(&key, pair.signing_key.serialize_pem()).with_context(|| format!("writing {}", key.display()))?;
    Ok((cert, key))
}

/// Create the bucket and put the benchmark's key; check that it reads back.
pub async fn setup_kv(client: &reqwest::Client, url: &str, token: &str) -> anyhow::Result<String> {
    expect_ok(
        client.put(format!("{url}/v1/kv/{BUCKET}")).bearer_auth(token).json(&serde_json::json!({})),
        "create bucket",
    )
    .await?;
    let key_url = format!("{url}/v1/kv/{BUCKET}/{}", key_name(0));
    expect_ok(client.put(&key_url).bearer_auth(token).body(value_for(0)), "put the key").await?;
    check_get(client, &key_url, token).await?;
    Ok(key_url)
}

async fn check_get(client: &reqwest::Client, key_url: &str, token: &str) -> anyhow::Result<()> {
    let value = expect_ok(client.get(key_url).bearer_auth(token), "get the key").await?;
    check_value(0, &value)
}

/// A 1-second wrk warm-up, then the measured run.
async fn wrk_measure(wrk: &Path, url: &str, headers: &[String], duration: Duration) -> anyhow::Result<WrkResult> {
    let run = WrkRun { wrk, url, headers, threads: WRK_THREADS, connections: WRK_CONNECTIONS, script: None };
    run_wrk(&run, warmup_for(duration)).await.context("wrk warm-up")?;
    run_wrk(&run, duration).await
}

fn wrk_note(tls: bool) -> String {
    let scheme = if tls { "HTTPS (TLS 1.3, dev certificate)" } else { "HTTP/1.1" };
    format!("wrk -t{WRK_THREADS} -c{WRK_CONNECTIONS} keep-alive, {scheme}, one 256 B value, p99.9 not reported by wrk")
}

fn token_of(node: &Node, earlier: Option<String>) -> anyhow::Result<String> {
    node.token.clone().or(earlier).context("finmesh serve printed no admin token on its first start")
}

/// `gateway-kv`: gateway KV GET vs nginx static file, plain and TLS.
pub async fn run_kv(ctx: &BenchContext) -> anyhow::Result<Vec<Measurement>> {
    let wrk = find_tool("wrk", WRK_ENV, "wrk")?;
    let nginx_bin = find_tool("nginx", NGINX_ENV, "nginx")?;
    let dir = ctx.tempdir("gateway-kv")?;
    let (cert, key) = dev_cert(dir.path())?;
    let nginx = Nginx::start(&nginx_bin, ctx.tempdir("nginx")?, &value_for(0), &cert, &key).await?;
    let mut token: Option<String> = None;
    let mut out = Vec::new();
    for tls in [false, true] {
        let options = NodeOptions { nats_url: None, tls: tls.then(|| (cert.clone(), key.clone())) };
        let node = Node::start(dir.path(), &options).await?;
        let t = token_of(&node, token.take())?;
        let client = http_client(tls.then_some(cert.as_path()))?;
        let key_url = if tls {
            let key_url = format!("{}/v1/kv/{BUCKET}/{}", node.url, key_name(0));
            check_get(&client, &key_url, &t).await?;
            key_url
        } else {
            setup_kv(&client, &node.url, &t).await?
        };
        let headers = [format!("Authorization: Bearer {t}")];
        let (scheme, id, nginx_id, port) = if tls {
            ("https", KV_HTTPS, NGINX_HTTPS, nginx.https_port)
        } else {
            ("http", KV_HTTP, NGINX_HTTP, nginx.http_port)
        };
        let gw = wrk_measure(&wrk, &key_url, &headers, ctx.duration).await.context("wrk on the gateway")?;
        node.stop().await?;
        let what = format!("KV GET 256 B over {scheme}, embedded engine, bearer token (auth on)");
        out.push(gw.measurement(id, "finmesh-gateway", &what).note(wrk_note(tls)));
        let nginx_url = format!("{scheme}://127.0.0.1:{port}{NGINX_PATH}");
        let ng = wrk_measure(&wrk, &nginx_url, &[], ctx.duration).await.context("wrk on nginx")?;
        let what = format!("static 256 B file over {scheme}, 2 workers, access_log off");
        out.push(ng.measurement(nginx_id, "nginx", &what).note(wrk_note(tls)));
        token = Some(t);
    }
    nginx.stop().await?;
    Ok(out)
}

/// `gateway-nats-kv`: gateway KV GET on the NATS engine vs async-nats directly.
pub async fn run_nats_kv(ctx: &BenchContext) -> anyhow::Result<Vec<Measurement>> {
    let wrk = find_tool("wrk", WRK_ENV, "wrk")?;
    let dir = ctx.tempdir("gateway-nats-kv")?;
    let nats = start_nats(ctx).await?;
    let options = NodeOptions { nats_url: Some(nats.url()), tls: None };
    let node = Node::start(dir.path(), &options).await?;
    let token = token_of(&node, None)?;
    let key_url = setup_kv(&http_client(None)?, &node.url, &token).await?;
    let headers = [format!("Authorization: Bearer {token}")];
    let gw = wrk_measure(&wrk, &key_url, &headers, ctx.duration).await.context("wrk on the gateway")?;
    node.stop().await?;
    let mut out = vec![
        gw.measurement(NATS_KV_HTTP, "finmesh-gateway", "KV GET 256 B over HTTP, NATS engine, bearer token (auth on)")
            .note(wrk_note(false)),
    ];

    let client = async_nats::connect(nats.url()).await?;
    let store = jetstream::new(client).get_key_value(BUCKET).await.context("opening the bucket with async-nats")?;
    let key = key_name(0);
    let sample = closed_loop(
        WRK_CONNECTIONS,
        ctx.duration,
        move |_| (store.clone(), key.clone()),
        |st, _| async move {
            let (store, key) = &*st;
            let value = store.get(key).await?.context("key missing")?;
            check_value(0, &value)?;
            Ok(1)
        },
    )
    .await?;
    out.push(
        Measurement::rate(
            NATS_KV_DIRECT,
            "nats-server",
            &format!("KV get via async-nats, {WRK_CONNECTIONS} concurrent tasks on one connection"),
            "req/s",
            &sample,
        )
        .note("the same bucket and key the gateway served"),
    );
    Ok(out)
}

/// One NDJSON batch of `PUBLISH_BATCH` messages whose stored payload is
/// `PUBLISH_PAYLOAD` bytes (a JSON string: quotes + filler).
pub fn ndjson_batch() -> Bytes {
    let filler = "x".repeat(PUBLISH_PAYLOAD - 2);
    let line = format!("{{\"subject\":\"bench.x\",\"payload\":\"{filler}\"}}\n");
    Bytes::from(line.repeat(PUBLISH_BATCH))
}

fn stream_config(sync: SyncPolicy) -> anyhow::Result<StreamConfig> {
    let mut config = StreamConfig::new(StreamName::new("bench")?, vec![SubjectPattern::new("bench.>")?]);
    config.sync = sync;
    Ok(config)
}

#[derive(serde::Deserialize)]
struct Acks {
    acks: Vec<serde::de::IgnoredAny>,
}

/// `gateway-publish`: NDJSON over HTTP vs in-process `publish_batch`, for
/// each of [`PUBLISH_POLICIES`].
pub async fn run_publish(ctx: &BenchContext) -> anyhow::Result<Vec<Measurement>> {
    let mut out = Vec::new();
    for (policy_note, sync, http_id, in_process_id) in PUBLISH_POLICIES {
        out.extend(publish_with(ctx, sync, policy_note, http_id, in_process_id).await?);
    }
    Ok(out)
}

async fn publish_with(
    ctx: &BenchContext,
    sync: SyncPolicy,
    policy_note: &str,
    http_id: &str,
    in_process_id: &str,
) -> anyhow::Result<Vec<Measurement>> {
    let dir = ctx.tempdir("gateway-publish")?;
    let node = Node::start(dir.path(), &NodeOptions::default()).await?;
    let token = token_of(&node, None)?;
    let config = stream_config(sync)?;
    let mut body = serde_json::to_value(&config)?;
    body.as_object_mut().context("stream config is an object")?.remove("name");
    let client = http_client(None)?;
    expect_ok(client.put(format!("{}/v1/streams/bench", node.url)).bearer_auth(&token).json(&body), "create stream")
        .await?;
    let url = format!("{}/v1/streams/bench/messages", node.url);
    let batch = ndjson_batch();
    let sample = closed_loop(
        PUBLISH_CLIENTS,
        ctx.duration,
        |_| (http_client(None), url.clone(), format!("Bearer {token}"), batch.clone()),
        |st, _| async move {
            let (client, url, auth, batch) = &*st;
            let client = client.as_ref().map_err(|e| anyhow::anyhow!("building a client: {e}"))?;
            let request = client
                .post(url)
                .header("authorization", auth)
                .header("content-type", "application/x-ndjson")
                .body(batch.clone());
            let body = expect_ok(request, "publish a batch").await?;
            let acks: Acks = serde_json::from_slice(&body)?;
            anyhow::ensure!(
                acks.acks.len() == PUBLISH_BATCH,
                "{} acks for a batch of {PUBLISH_BATCH}",
                acks.acks.len()
            );
            Ok(PUBLISH_BATCH as u64)
        },
    )
    .await?;
    node.stop().await?;
    let stream_note = format!("{policy_note}, latency per batch");
    let mut out = vec![
        Measurement::rate(
            http_id,
            "finmesh-gateway",
            &format!(
                "POST NDJSON batches of {PUBLISH_BATCH} × {PUBLISH_PAYLOAD} B, {PUBLISH_CLIENTS} reqwest clients, embedded engine, auth on"
            ),
            "msgs/s",
            &sample,
        )
        .note(stream_note.as_str()),
    ];

    let engine_dir = ctx.tempdir("gateway-publish-engine")?;
    let engine = EmbeddedEngine::open(engine_dir.path())?;
    engine.create_stream(stream_config(sync)?).await?;
    let (stream, subject) = (StreamName::new("bench")?, Subject::new("bench.x")?);
    let payload = Bytes::from(vec![b'x'; PUBLISH_PAYLOAD]);
    let e = engine.clone();
    let sample = closed_loop(
        PUBLISH_CLIENTS,
        ctx.duration,
        move |_| (e.clone(), stream.clone(), subject.clone(), payload.clone()),
        |st, _| async move {
            let (engine, stream, subject, payload) = &*st;
            let msgs = (0..PUBLISH_BATCH).map(|_| OutgoingMessage::new(subject.clone(), payload.clone())).collect();
            let acks = engine.publish_batch(stream, msgs).await?;
            anyhow::ensure!(acks.len() == PUBLISH_BATCH, "{} acks", acks.len());
            Ok(PUBLISH_BATCH as u64)
        },
    )
    .await;
    engine.close().await?;
    out.push(
        Measurement::rate(
            in_process_id,
            "finmesh-embedded",
            &format!("in-process publish_batch of {PUBLISH_BATCH} × {PUBLISH_PAYLOAD} B, {PUBLISH_CLIENTS} tasks"),
            "msgs/s",
            &sample?,
        )
        .note(stream_note),
    );
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_ndjson_batch_stores_payloads_of_the_benchmark_size() {
        let batch = ndjson_batch();
        let lines: Vec<&[u8]> = batch.split(|&b| b == b'\n').filter(|l| !l.is_empty()).collect();
        assert_eq!(lines.len(), PUBLISH_BATCH);
        for line in lines {
            let v: serde_json::Value = serde_json::from_slice(line).unwrap();
            assert_eq!(v["subject"], "bench.x");
            // Stored as its compact JSON text: the string with its quotes.
            assert_eq!(serde_json::to_string(&v["payload"]).unwrap().len(), PUBLISH_PAYLOAD);
        }
    }
}
