//! `finmesh keys init|list|rotate|usage|retire|restore` and
//! `finmesh kv reencrypt BUCKET`: key management.
//!
//! How each command reaches the key ring:
//! - `init` works offline, on the engine the node configuration names (as
//!   `finmesh refdata load` does): the embedded data dir must not be in use
//!   by a running node. It creates the keys bucket and a new ring wrapped by
//!   the configured master key, and refuses when a ring exists already (even
//!   one this master key does not open), so it never clobbers one. A node
//!   started with `[security]` also creates the ring on its first start;
//!   `init` only makes that step explicit.
//! - every other command goes through a running node's HTTP API
//!   (`/v1/keys…`, `admin` scope; docs/api.md), since the node holds the
//!   embedded data dir locked and every gateway follows the stored ring.
//!
//! Invariant: nothing printed carries key material; the node never sends
//! any (a key is its id, purpose, state and creation time).

use std::io::IsTerminal;

use anyhow::{Context, bail};
use futures::StreamExt;
use reqwest::Method;
use serde_json::{Value, json};

use crate::client::{Client, segment};
use crate::pipeline_cmds::NodeArgs;

#[derive(Debug, clap::Subcommand)]
pub enum KeysCommand {
    /// Create the key ring in the configured engine (offline; refuses if one exists).
    Init {
        #[command(flatten)]
        node: NodeArgs,
    },
    /// Every key: id, purpose, state, creation time (never key material).
    List,
    /// Make a new active key; the old one becomes decrypt-only.
    Rotate {
        /// `encryption` (seals values) or `hashing` (names hashed keys).
        #[arg(long, default_value = "encryption")]
        purpose: String,
    },
    /// Count what a key still protects, per bucket.
    Usage { id: u32 },
    /// Retire a decrypt-only key; refused while it still protects values.
    Retire { id: u32 },
    /// Undo a retirement: the key becomes decrypt-only again.
    Restore { id: u32 },
}

/// Run a `finmesh keys` command.
pub async fn run(client: &crate::client::ClientArgs, command: KeysCommand) -> anyhow::Result<()> {
    if let KeysCommand::Init { node } = command {
        return init(&node).await;
    }
    let client = Client::new(client)?;
    let answer = match command {
        KeysCommand::Init { .. } => unreachable!("handled above"),
        KeysCommand::List => {
            let answer = client.json(client.request(Method::GET, "/v1/keys")).await?;
            if !client.json {
                println!("{:>4}  {:<10}  {:<12}  created", "id", "purpose", "state");
                for key in answer["keys"].as_array().into_iter().flatten() {
                    println!(
                        "{:>4}  {:<10}  {:<12}  {}",
                        key["id"],
                        key["purpose"].as_str().unwrap_or("?"),
                        key["state"].as_str().unwrap_or("?").replace('_', "-"),
                        key["created"].as_str().unwrap_or("?")
                    );
                }
                return Ok(());
            }
            answer
        }
        KeysCommand::Rotate { purpose } => {
            let request = client.request(Method::POST, "/v1/keys/rotate").json(&json!({"purpose": purpose}));
            client.json(request).await?
        }
        KeysCommand::Usage { id } => {
            let answer = client.json(client.request(Method::GET, &format!("/v1/keys/{id}/usage"))).await?;
            if !client.json {
                println!("key {id}: {} in all", answer["total"]);
                for (bucket, n) in answer["buckets"].as_object().into_iter().flatten() {
                    println!("  {bucket}: {n}");
                }
                return Ok(());
            }
            answer
        }
        KeysCommand::Retire { id } => {
            client.json(client.request(Method::POST, &format!("/v1/keys/{id}/retire"))).await?
        }
        KeysCommand::Restore { id } => {
            client.json(client.request(Method::POST, &format!("/v1/keys/{id}/restore"))).await?
        }
    };
    if client.json {
        println!("{}", serde_json::to_string_pretty(&answer)?);
    } else {
        println!(
            "key {}: {} {}",
            answer["id"],
            answer["purpose"].as_str().unwrap_or("?"),
            answer["state"].as_str().unwrap_or("?").replace('_', "-")
        );
    }
    Ok(())
}

/// `finmesh keys init`: create the ring offline (see the module doc).
async fn init(node: &NodeArgs) -> anyhow::Result<()> {
    let config = crate::config::ServeConfig::load(&node.overrides())?;
    let Some(section) = &config.security else {
        bail!("the node configuration has no [security] section: there is no master key to wrap a key ring with");
    };
    let master = crate::security::MasterKeySource::check(section).await?;
    let engine = crate::serve::OpenEngine::open(&config).await?;
    let outcome = master.init(engine.shared()).await;
    engine.close().await?;
    let keys = outcome?;
    println!("key ring created: encryption key {} and hashing key {} active", keys.0, keys.1);
    Ok(())
}

/// `finmesh kv reencrypt BUCKET`: run the node's re-encryption job,
/// showing a progress bar on a terminal and NDJSON progress with `--json`
/// (or when stderr is not a terminal, one summary line at the end).
pub async fn reencrypt(
    client: &Client,
    bucket: &str,
    rate: Option<u32>,
    batch: Option<usize>,
    restart: bool,
) -> anyhow::Result<()> {
    let mut query: Vec<(&str, String)> = Vec::new();
    if let Some(rate) = rate {
        query.push(("rate", rate.to_string()));
    }
    if let Some(batch) = batch {
        query.push(("batch", batch.to_string()));
    }
    if restart {
        query.push(("restart", "true".to_owned()));
    }
    let path = format!("/v1/keys/reencrypt/{}", segment(bucket));
    let response = client.send(client.request(Method::POST, &path).query(&query)).await?;
    let bar = (!client.json && std::io::stderr().is_terminal()).then(|| {
        let bar = indicatif::ProgressBar::new(0);
        bar.set_style(
            indicatif::ProgressStyle::with_template("{msg} [{bar:40}] {pos}/{len} keys ({per_sec}, eta {eta})")
                .expect("a valid template")
                .progress_chars("=> "),
        );
        bar.set_message(format!("re-encrypting {bucket}"));
        bar
    });
    let mut body = response.bytes_stream();
    let mut pending = Vec::new();
    let mut last: Option<Value> = None;
    while let Some(chunk) = body.next().await {
        pending.extend_from_slice(&chunk.context("the progress stream broke")?);
        while let Some(end) = pending.iter().position(|&b| b == b'\n') {
            let line: Vec<u8> = pending.drain(..=end).collect();
            let value: Value = serde_json::from_slice(&line).context("a progress line is not JSON")?;
            if client.json {
                println!("{}", serde_json::to_string(&value)?);
            }
            if let Some(bar) = &bar {
                let scanned = value["total"]["scanned"].as_u64().unwrap_or(0);
                bar.set_length(value["estimate"].as_u64().unwrap_or(0).max(scanned));
                bar.set_position(scanned);
            }
            last = Some(value);
        }
    }
    if let Some(bar) = &bar {
        bar.finish_and_clear();
    }
    let Some(last) = last else { bail!("the node ended the re-encryption without a word") };
    if let Some(problem) = last.get("error") {
        bail!(
            "{}: {}",
            problem["title"].as_str().unwrap_or("error"),
            problem["detail"].as_str().unwrap_or("the re-encryption failed")
        );
    }
    let total = &last["total"];
    if !client.json {
        println!(
            "bucket {bucket}: {} keys examined, {} rewritten under key {}, {} already current, {} changed meanwhile \
             (skipped), {} failed to open{}",
            total["scanned"],
            total["rewritten"],
            last["key_id"],
            total["current"],
            total["changed"],
            total["failed"],
            if last["done"] == true { "" } else { "; stopped before the end: run it again to resume" }
        );
    }
    if last["done"] != true {
        bail!("the re-encryption of bucket {bucket} stopped before the end; run it again to resume");
    }
    if total["failed"].as_u64().unwrap_or(0) > 0 {
        bail!("{} values of bucket {bucket} do not open (see the node's log)", total["failed"]);
    }
    Ok(())
}
