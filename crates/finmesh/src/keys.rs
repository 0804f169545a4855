//! `finmesh keys init|list|rotate|usage|retire|restore|rewrap` and
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
//! - `rewrap` (a master-key change) works the same way, offline on the
//!   embedded engine: it unwraps the ring with the configured master key
//!   and stores it wrapped by the new one (`finmesh_crypto::rewrap`); on
//!   NATS the nodes may keep running, and keep the keys they loaded, until
//!   they are restarted with the new key (docs/security.md).
//! - every other command goes through a running node's HTTP API
//!   (`/v1/keys…`, `admin` scope; docs/api.md), since the node holds the
//!   embedded data dir locked and every gateway follows the stored ring.
//!
//! Invariant: nothing printed carries key material; the node never sends
//! any (a key is its id, purpose, state and creation time).

use std::io::IsTerminal;
use std::path::{Path, PathBuf};

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
    /// Change the master key (offline on the embedded engine): store the
    /// ring wrapped by a new master key; then restart every node with it.
    Rewrap {
        #[command(flatten)]
        node: NodeArgs,
        /// The new master key's file (base64 or hex text, or 32 raw bytes; mode 0600).
        #[arg(long, value_name = "PATH", required_unless_present = "new_master_key_env")]
        new_master_key_file: Option<PathBuf>,
        /// First write a fresh random key to --new-master-key-file (refuses an existing file).
        #[arg(long)]
        create: bool,
        /// The environment variable holding the new master key (base64).
        #[arg(long, value_name = "VAR", conflicts_with = "new_master_key_file")]
        new_master_key_env: Option<String>,
    },
}

/// Run a `finmesh keys` command.
pub async fn run(client: &crate::client::ClientArgs, command: KeysCommand) -> anyhow::Result<()> {
    let command = match command {
        KeysCommand::Init { node } => return init(&node).await,
        KeysCommand::Rewrap { node, new_master_key_file, create, new_master_key_env } => {
            return rewrap(&node, new_master_key_file.as_deref(), create, new_master_key_env.as_deref()).await;
        }
        online => online,
    };
    let client = Client::new(client)?;
    let answer = match command {
        KeysCommand::Init { .. } | KeysCommand::Rewrap { .. } => unreachable!("handled above"),
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

/// `finmesh keys rewrap`: change the master key (see the module doc).
async fn rewrap(node: &NodeArgs, file: Option<&Path>, create: bool, env: Option<&str>) -> anyhow::Result<()> {
    use finmesh_crypto::{EnvKeyProvider, FileKeyProvider, KeyProvider, Rewrapped};
    if create && file.is_none() {
        bail!("--create writes the new master key to a file: name it with --new-master-key-file PATH");
    }
    let config = crate::config::ServeConfig::load(&node.overrides())?;
    let Some(section) = &config.security else {
        bail!("the node configuration has no [security] section: there is no master key and no key ring to rewrap");
    };
    let master = crate::security::MasterKeySource::check(section).await?;
    let (new, source): (_, String) = match (file, env) {
        (Some(path), _) if create => {
            let key = FileKeyProvider::create(path).context("creating the new master key file")?;
            (key, format!("key file {}", path.display()))
        }
        (Some(path), _) => {
            let provider = FileKeyProvider::new(path.to_owned());
            (provider.master_key().await.context("loading the new master key")?, provider.describe())
        }
        (None, Some(var)) => {
            let provider = EnvKeyProvider::new(var.to_owned());
            (provider.master_key().await.context("loading the new master key")?, provider.describe())
        }
        (None, None) => bail!("name the new master key: --new-master-key-file PATH or --new-master-key-env VAR"),
    };
    let outcome = match crate::serve::OpenEngine::open(&config).await {
        Ok(engine) => {
            let outcome = master.rewrap(engine.shared(), &new).await;
            engine.close().await?;
            outcome
        }
        Err(e) => Err(e),
    };
    let outcome = match outcome {
        Ok(o) => o,
        Err(e) => {
            if let (true, Some(path)) = (create, file) {
                // Made by this run and wrapping nothing: not left behind.
                let _ = std::fs::remove_file(path);
            }
            return Err(e);
        }
    };
    match outcome {
        Rewrapped::Done(revision) => println!(
            "key ring rewrapped (revision {}): only the master key from the {source} opens it now. Point every \
             node's [security] at that key and restart it; a node still running with the old key keeps the keys \
             it loaded but cannot load ring changes, so rotate only once every node is restarted.",
            revision.0
        ),
        Rewrapped::Already(revision) => println!(
            "the key ring (revision {}) is wrapped by the master key from the {source} already; nothing changed",
            revision.0
        ),
    }
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
