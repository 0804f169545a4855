//! The client subcommands: one function per command, each one request.

use std::io::Write;

use anyhow::Context;
use reqwest::Method;
use serde_json::{Value, json};

use super::{Client, follow, segment};

#[derive(Debug, clap::Subcommand)]
pub enum KvCommand {
    /// Create (or update) a bucket.
    Create {
        bucket: String,
        /// Values kept per key (1..=64).
        #[arg(long, default_value_t = 1)]
        history: u8,
        /// Time to live of a value, in milliseconds.
        #[arg(long)]
        ttl_ms: Option<u64>,
        /// Largest value in bytes.
        #[arg(long)]
        max_value_size: Option<u32>,
        /// Seal values (`encryption = "aes256gcm"`); the node needs `[security]`.
        #[arg(long)]
        encrypt: bool,
        /// Store keys as keyed hashes (`key_hashing = "hmac-sha256"`).
        #[arg(long)]
        hash_keys: bool,
        /// Accept only card numbers as keys (`key_format = "pan"`).
        #[arg(long)]
        pan_keys: bool,
    },
    /// Print a key's value (raw bytes) or, with --json, its entry.
    Get { bucket: String, key: String },
    /// Write a value: from the argument, stdin when it is `-`, or --file.
    /// A bucket that is encrypted or hashes its keys takes the value only
    /// from stdin or --file (an argument stays in shell history).
    Put {
        bucket: String,
        key: String,
        #[arg(required_unless_present = "file", conflicts_with = "file")]
        value: Option<String>,
        /// Read the value from this file.
        #[arg(long)]
        file: Option<std::path::PathBuf>,
        /// Only if the key is at this revision (compare-and-set).
        #[arg(long, conflicts_with = "create")]
        if_revision: Option<u64>,
        /// Only if the key does not exist.
        #[arg(long)]
        create: bool,
    },
    /// Delete a key (a tombstone; history is kept).
    Del {
        bucket: String,
        key: String,
        /// Only if the key is at this revision.
        #[arg(long)]
        if_revision: Option<u64>,
    },
    /// List keys, optionally by prefix: one page (sorted), or every page
    /// with --all. When more keys follow a page, its cursor is printed on
    /// stderr (in --json output, the page's `next`); with --all and --json,
    /// one JSON string per key and line.
    Keys {
        bucket: String,
        #[arg(long, default_value = "")]
        prefix: String,
        /// Keys per page (server default 1000, at most its `limits.max_keys_page`).
        #[arg(long)]
        limit: Option<u32>,
        /// Start after this key: the `next` of the previous page.
        #[arg(long)]
        after: Option<String>,
        /// Follow the cursor and list every key, page by page.
        #[arg(long)]
        all: bool,
    },
    /// A key's history, oldest first.
    History { bucket: String, key: String },
    /// Rewrite an encrypted bucket's values under the active key, on the
    /// node, while it serves (resumable; a progress bar on a terminal).
    Reencrypt {
        bucket: String,
        /// Most values examined per second [default: no limit].
        #[arg(long)]
        rate: Option<u32>,
        /// Keys per batch (progress and the saved cursor move per batch) [default: 500].
        #[arg(long)]
        batch: Option<usize>,
        /// Ignore a saved cursor and start from the first key.
        #[arg(long)]
        restart: bool,
    },
    /// Follow changes (puts and deletes) until interrupted.
    Watch {
        bucket: String,
        #[arg(long, default_value = "")]
        prefix: String,
        #[arg(long)]
        from_revision: Option<u64>,
    },
}

#[derive(Debug, clap::Subcommand)]
pub enum StreamCommand {
    /// Create (or update) a stream.
    Create {
        stream: String,
        /// Subject patterns, comma-separated (e.g. `md.>`).
        #[arg(long, value_delimiter = ',', required = true)]
        subjects: Vec<String>,
        #[arg(long)]
        max_msgs: Option<u64>,
        #[arg(long)]
        max_bytes: Option<u64>,
        /// Maximum age in milliseconds.
        #[arg(long)]
        max_age_ms: Option<u64>,
    },
    /// Show a stream's configuration and state.
    Info { stream: String },
    /// Publish one message: the payload argument, or stdin when it is `-`.
    Pub {
        stream: String,
        subject: String,
        payload: String,
        /// Deduplication id.
        #[arg(long)]
        msg_id: Option<String>,
    },
    /// Read stored messages.
    Read {
        stream: String,
        #[arg(long, default_value_t = 1)]
        from_seq: u64,
        #[arg(long)]
        subject: Option<String>,
        #[arg(long, default_value_t = 100)]
        limit: u64,
    },
    /// Subscribe (SSE, or WebSocket with --ws) and print messages until
    /// interrupted; reconnects, resumes and fails over (the finmesh-client
    /// SDK). Gaps, rewinds and resets are printed as events; connections
    /// and retries go to standard error.
    #[command(visible_alias = "subscribe")]
    Sub {
        stream: String,
        #[arg(long)]
        subject: Option<String>,
        #[arg(long)]
        from_seq: Option<u64>,
        /// Another node to fail over to (repeat for more), after --server.
        #[arg(long)]
        failover: Vec<String>,
        /// The nodes to subscribe to, in order, comma-separated (instead of
        /// --server and --failover), e.g. `http://a:8080,http://b:8080`.
        #[arg(long, value_delimiter = ',', conflicts_with = "failover")]
        endpoints: Vec<String>,
        /// Subscribe over WebSocket instead of Server-Sent Events.
        #[arg(long)]
        ws: bool,
    },
}

#[derive(Debug, clap::Subcommand)]
pub enum ConsumerCommand {
    /// Create (or update) a durable consumer.
    Create {
        stream: String,
        name: String,
        #[arg(long)]
        filter: Option<String>,
        /// all | new | last_per_subject
        #[arg(long, default_value = "all")]
        deliver: String,
        #[arg(long)]
        ack_wait_ms: Option<u64>,
        #[arg(long)]
        max_deliver: Option<u32>,
    },
    /// Fetch a batch of messages.
    Fetch {
        stream: String,
        name: String,
        #[arg(long, default_value_t = 10)]
        batch: u32,
        #[arg(long, default_value_t = 1000)]
        wait_ms: u64,
    },
    /// Acknowledge (or nak/term) a delivery by its ack token.
    Ack {
        stream: String,
        name: String,
        /// The delivery's ack token (from fetch).
        #[arg(value_name = "ACK_TOKEN")]
        ack_token: String,
        /// ack | nak | term | in_progress
        #[arg(long, default_value = "ack")]
        kind: String,
        /// Redelivery delay for nak, in milliseconds.
        #[arg(long)]
        delay_ms: Option<u64>,
    },
}

fn read_arg(value: &str) -> anyhow::Result<Vec<u8>> {
    if value == "-" {
        let mut buf = Vec::new();
        std::io::Read::read_to_end(&mut std::io::stdin(), &mut buf).context("reading stdin")?;
        Ok(buf)
    } else {
        Ok(value.as_bytes().to_vec())
    }
}

/// Refuse a value given as an argument for a bucket whose options say its
/// contents are sensitive: arguments stay in shell history and show in the
/// process list. Asks the node for the bucket's options; if it cannot tell
/// (no read access, no such bucket), the write goes ahead and the node
/// answers it.
async fn refuse_argv_value(client: &Client, bucket: &str) -> anyhow::Result<()> {
    let request = client.request(Method::GET, &format!("/v1/kv/{}", segment(bucket)));
    let Ok(info) = client.json(request).await else { return Ok(()) };
    let security = &info["config"]["security"];
    let sensitive = ["encryption", "key_hashing", "key_format"].iter().find(|o| !security[**o].is_null());
    if let Some(option) = sensitive {
        anyhow::bail!(
            "bucket `{bucket}` has {option} set, so its values are sensitive: give the value on stdin (`-`) or with \
             --file, not as an argument (arguments are kept in shell history and visible in the process list)"
        );
    }
    Ok(())
}

fn print_json(value: &Value) -> anyhow::Result<()> {
    println!("{}", serde_json::to_string_pretty(value)?);
    Ok(())
}

pub async fn kv(client: &Client, command: KvCommand) -> anyhow::Result<()> {
    match command {
        KvCommand::Create { bucket, history, ttl_ms, max_value_size, encrypt, hash_keys, pan_keys } => {
            let mut body = json!({"history": history, "ttl": ttl_ms, "max_value_size": max_value_size});
            let mut security = serde_json::Map::new();
            if encrypt {
                security.insert("encryption".into(), "aes256gcm".into());
            }
            if hash_keys {
                security.insert("key_hashing".into(), "hmac-sha256".into());
            }
            if pan_keys {
                security.insert("key_format".into(), "pan".into());
            }
            if !security.is_empty() {
                body["security"] = Value::Object(security);
            }
            let info =
                client.json(client.request(Method::PUT, &format!("/v1/kv/{}", segment(&bucket))).json(&body)).await?;
            if client.json {
                print_json(&info)
            } else {
                println!(
                    "bucket {} (history {})",
                    info["config"]["name"].as_str().unwrap_or("?"),
                    info["config"]["history"]
                );
                Ok(())
            }
        }
        KvCommand::Get { bucket, key } => {
            let path = format!("/v1/kv/{}/{}", segment(&bucket), segment(&key));
            let response = client.send(client.request(Method::GET, &path)).await?;
            let revision = etag(&response);
            let value = response.bytes().await?;
            if client.json {
                print_json(&json!({"key": key, "revision": revision, "value": String::from_utf8_lossy(&value)}))
            } else {
                std::io::stdout().write_all(&value)?;
                Ok(())
            }
        }
        KvCommand::Put { bucket, key, value, file, if_revision, create } => {
            let body = match (&value, &file) {
                (_, Some(path)) => std::fs::read(path).with_context(|| format!("reading {}", path.display()))?,
                (Some(v), None) if v == "-" => read_arg(v)?,
                (Some(v), None) => {
                    refuse_argv_value(client, &bucket).await?;
                    v.as_bytes().to_vec()
                }
                (None, None) => anyhow::bail!("give a value, `-` for stdin, or --file"),
            };
            let path = format!("/v1/kv/{}/{}", segment(&bucket), segment(&key));
            let mut request = client.request(Method::PUT, &path).body(body);
            if let Some(rev) = if_revision {
                request = request.header("if-match", format!("\"{rev}\""));
            }
            if create {
                request = request.header("if-none-match", "*");
            }
            let response = client.send(request).await?;
            let revision = etag(&response);
            if client.json {
                print_json(&json!({"key": key, "revision": revision}))
            } else {
                println!("{key} @ revision {}", revision.unwrap_or_default());
                Ok(())
            }
        }
        KvCommand::Del { bucket, key, if_revision } => {
            let path = format!("/v1/kv/{}/{}", segment(&bucket), segment(&key));
            let mut request = client.request(Method::DELETE, &path);
            if let Some(rev) = if_revision {
                request = request.header("if-match", format!("\"{rev}\""));
            }
            let response = client.send(request).await?;
            let revision = etag(&response);
            if client.json {
                print_json(&json!({"key": key, "revision": revision}))
            } else {
                println!("deleted {key} @ revision {}", revision.unwrap_or_default());
                Ok(())
            }
        }
        KvCommand::Keys { bucket, prefix, limit, after, all } => {
            let path = format!("/v1/kv/{}/keys", segment(&bucket));
            let mut after = after;
            loop {
                let mut query = vec![("prefix", prefix.clone())];
                if let Some(limit) = limit {
                    query.push(("limit", limit.to_string()));
                }
                if let Some(after) = &after {
                    query.push(("after", after.clone()));
                }
                let page = client.json(client.request(Method::GET, &path).query(&query)).await?;
                let next = page["next"].as_str().map(str::to_owned);
                if all && client.json {
                    // One JSON line per key, so the output of any size streams.
                    for k in page["keys"].as_array().into_iter().flatten() {
                        println!("{k}");
                    }
                } else {
                    print_list(client, &page, "keys", |v| v.as_str().map(str::to_owned))?;
                }
                match next {
                    Some(next) if all => after = Some(next),
                    Some(next) if !client.json => {
                        // On stderr, so stdout holds only keys.
                        eprintln!("more keys follow: --after {next} (or --all)");
                        return Ok(());
                    }
                    _ => return Ok(()),
                }
            }
        }
        KvCommand::History { bucket, key } => {
            let path = format!("/v1/kv/{}/{}/history", segment(&bucket), segment(&key));
            let body = client.send(client.request(Method::GET, &path)).await?.text().await?;
            print_envelopes(client, &body, "entries", |e, payload| {
                format!("{:>8}  {:<7} {payload}", e["revision"], e["op"].as_str().unwrap_or("?"))
            })
        }
        KvCommand::Reencrypt { bucket, rate, batch, restart } => {
            crate::keys::reencrypt(client, &bucket, rate, batch, restart).await
        }
        KvCommand::Watch { bucket, prefix, from_revision } => {
            let mut path = format!("/v1/kv/{}/watch?prefix={}", segment(&bucket), segment(&prefix));
            if let Some(rev) = from_revision {
                path.push_str(&format!("&from_revision={rev}"));
            }
            let json = client.json;
            follow(client, &path, |event| print_event(json, event)).await
        }
    }
}

pub async fn stream(client: &Client, command: StreamCommand) -> anyhow::Result<()> {
    match command {
        StreamCommand::Create { stream, subjects, max_msgs, max_bytes, max_age_ms } => {
            let body = json!({"name": stream, "subjects": subjects, "max_msgs": max_msgs, "max_bytes": max_bytes, "max_age": max_age_ms});
            let path = format!("/v1/streams/{}", segment(&stream));
            let info = client.json(client.request(Method::PUT, &path).json(&body)).await?;
            if client.json { print_json(&info) } else { print_stream_info(&info) }
        }
        StreamCommand::Info { stream } => {
            let info = client.json(client.request(Method::GET, &format!("/v1/streams/{}", segment(&stream)))).await?;
            if client.json { print_json(&info) } else { print_stream_info(&info) }
        }
        StreamCommand::Pub { stream, subject, payload, msg_id } => {
            let path = format!("/v1/streams/{}/messages", segment(&stream));
            let mut request =
                client.request(Method::POST, &path).query(&[("subject", &subject)]).body(read_arg(&payload)?);
            if let Some(id) = msg_id {
                request = request.header("msg-id", id);
            }
            let ack = client.json(request).await?;
            if client.json {
                print_json(&ack)
            } else {
                let dup = if ack["duplicate"].as_bool() == Some(true) { " (duplicate)" } else { "" };
                println!("{stream} seq {}{dup}", ack["seq"]);
                Ok(())
            }
        }
        StreamCommand::Read { stream, from_seq, subject, limit } => {
            let path = format!("/v1/streams/{}/messages", segment(&stream));
            let mut query = vec![("from_seq", from_seq.to_string()), ("limit", limit.to_string())];
            if let Some(s) = subject {
                query.push(("subject", s));
            }
            let response = client.send(client.request(Method::GET, &path).query(&query)).await?;
            let body = response.text().await?;
            for line in body.lines().filter(|l| !l.is_empty()) {
                if client.json {
                    println!("{line}");
                } else {
                    let (m, payload) = envelope(line)?;
                    println!("{:>8}  {}  {payload}", m["seq"], m["subject"].as_str().unwrap_or("?"));
                }
            }
            Ok(())
        }
        StreamCommand::Sub { stream, subject, from_seq, failover, endpoints, ws } => {
            let transport = if ws { finmesh_client::Transport::WebSocket } else { finmesh_client::Transport::Sse };
            let mut builder = if endpoints.is_empty() {
                client.subscription(&stream, &failover, transport)
            } else {
                client.subscription_to(&endpoints, &stream, transport)
            };
            if let Some(s) = subject {
                builder = builder.subject(s);
            }
            if let Some(seq) = from_seq {
                builder = builder.start(finmesh_client::Start::From(seq));
            }
            let mut sub = builder.build()?;
            while let Some(event) = sub.next().await? {
                print_subscription_event(client.json, &event)?;
            }
            Ok(())
        }
    }
}

pub async fn consumer(client: &Client, command: ConsumerCommand) -> anyhow::Result<()> {
    match command {
        ConsumerCommand::Create { stream, name, filter, deliver, ack_wait_ms, max_deliver } => {
            let mut body =
                json!({"name": name, "filter": filter, "deliver": {"policy": deliver}, "max_deliver": max_deliver});
            if let Some(ms) = ack_wait_ms {
                body["ack_wait"] = json!(ms);
            }
            let path = format!("/v1/streams/{}/consumers/{}", segment(&stream), segment(&name));
            let info = client.json(client.request(Method::PUT, &path).json(&body)).await?;
            print_json(&info)
        }
        ConsumerCommand::Fetch { stream, name, batch, wait_ms } => {
            let path = format!("/v1/streams/{}/consumers/{}/fetch", segment(&stream), segment(&name));
            let request = client.request(Method::POST, &path).json(&json!({"batch": batch, "wait_ms": wait_ms}));
            let body = client.send(request).await?.text().await?;
            print_envelopes(client, &body, "messages", |d, payload| {
                format!("{:>8}  {}  {payload}  token={}", d["seq"], d["subject"].as_str().unwrap_or("?"), d["token"])
            })
        }
        ConsumerCommand::Ack { stream, name, ack_token, kind, delay_ms } => {
            let path = format!("/v1/streams/{}/consumers/{}/ack", segment(&stream), segment(&name));
            let body = json!({"token": ack_token, "kind": kind, "delay": delay_ms});
            client.send(client.request(Method::POST, &path).json(&body)).await?;
            if !client.json {
                println!("{kind} sent");
            }
            Ok(())
        }
    }
}

fn etag(response: &reqwest::Response) -> Option<u64> {
    let tag = response.headers().get("etag")?.to_str().ok()?;
    tag.trim_start_matches("W/").trim_matches('"').parse().ok()
}

/// Print a JSON list (either the answer itself or its `field`), one line each.
fn print_list(
    client: &Client,
    value: &Value,
    field: &str,
    line: impl Fn(&Value) -> Option<String>,
) -> anyhow::Result<()> {
    if client.json {
        return print_json(value);
    }
    let items = value.as_array().or_else(|| value[field].as_array());
    for item in items.into_iter().flatten() {
        println!("{}", line(item).unwrap_or_else(|| item.to_string()));
    }
    Ok(())
}

/// An envelope's members and its payload's raw text: payloads are shown as
/// the bytes the server sent, never re-serialized (`1.50` stays `1.50`).
fn envelope(text: &str) -> anyhow::Result<(Value, String)> {
    #[derive(serde::Deserialize)]
    struct Payload<'a> {
        #[serde(borrow)]
        payload: Option<&'a serde_json::value::RawValue>,
    }
    let members: Value = serde_json::from_str(text).context("the server sent an envelope that is not JSON")?;
    let payload: Payload = serde_json::from_str(text).context("the server sent an envelope that is not JSON")?;
    Ok((members, payload.payload.map_or_else(String::new, |p| p.get().to_owned())))
}

/// Print the envelopes under `field` of a JSON answer, one line each, or with
/// `--json` the answer exactly as the server sent it.
fn print_envelopes(
    client: &Client,
    body: &str,
    field: &str,
    line: impl Fn(&Value, &str) -> String,
) -> anyhow::Result<()> {
    if client.json {
        println!("{body}");
        return Ok(());
    }
    use serde_json::value::RawValue;
    let answer: std::collections::HashMap<String, &RawValue> =
        serde_json::from_str(body).context("the server's answer is not JSON")?;
    let items: Vec<&RawValue> = match answer.get(field) {
        Some(list) => serde_json::from_str(list.get()).context("the server's answer is not a list")?,
        None => Vec::new(),
    };
    for item in items {
        let (members, payload) = envelope(item.get())?;
        println!("{}", line(&members, &payload));
    }
    Ok(())
}

fn print_stream_info(info: &Value) -> anyhow::Result<()> {
    let state = &info["state"];
    println!("stream   {}", info["config"]["name"].as_str().unwrap_or("?"));
    println!("subjects {}", info["config"]["subjects"]);
    println!(
        "messages {}  bytes {}  seq {}..{}",
        state["messages"], state["bytes"], state["first_seq"], state["last_seq"]
    );
    Ok(())
}

/// A message, gap or reset like [`print_event`]; connection changes as notes
/// on standard error.
fn print_subscription_event(json: bool, event: &finmesh_client::Event) -> anyhow::Result<()> {
    use finmesh_client::Event;
    let (id, kind, data) = match event {
        Event::Message(m) => (m.seq, "message", m.envelope.clone()),
        Event::Gap { from, to, epoch, .. } => (*to, "gap", json!({"from": from, "to": to, "epoch": epoch}).to_string()),
        Event::Reset { epoch, last_seq } => {
            (*last_seq, "reset", json!({"epoch": epoch, "last_seq": last_seq}).to_string())
        }
        Event::Rewind { expected, got } => (*got, "rewind", json!({"expected": expected, "got": got}).to_string()),
        Event::Connected { endpoint, resume_after, .. } => {
            eprintln!("connected to {endpoint} (after {})", resume_after.map_or("-".to_owned(), |s| s.to_string()));
            return Ok(());
        }
        Event::Disconnected { endpoint, reason, retry_in } => {
            eprintln!("disconnected from {endpoint}: {reason}; retrying in {retry_in:?}");
            return Ok(());
        }
        other => {
            eprintln!("{other:?}");
            return Ok(());
        }
    };
    let id = Some(id.to_string());
    print_event(json, &super::sse::SseEvent { id, event: kind.to_owned(), data, has_data: true })
}

fn print_event(json: bool, event: &super::sse::SseEvent) -> anyhow::Result<()> {
    if json {
        println!("{}", serde_json::to_string(&json!({"id": event.id, "event": event.event, "data": event.data}))?);
    } else {
        println!("{:>8}  {:<8} {}", event.id.as_deref().unwrap_or("-"), event.event, event.data);
    }
    Ok(())
}
