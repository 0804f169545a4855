//! `finmesh audit`: prove that fan-out is lossless, end to end.
//!
//! The audit starts a node (`finmesh serve` as a child, [`node`]; embedded,
//! or NATS with `--nats`) or targets one (`--server`), connects K
//! subscribers through the SDK (`finmesh-client`; SSE, WebSocket or both,
//! each with its filter), publishes a feed through the batch publish route
//! (`POST /v1/streams/{s}/messages`, NDJSON, with message ids so a batch
//! resent across the restart is not stored twice), forces a reconnect of
//! every subscriber (a new SDK subscription resuming after the position the
//! old one handed out) at a third of the feed and restarts the node (drain
//! by default) at two thirds. Then, per subscriber, it compares what was
//! received with the stream's own contents for its filter ([`check`]) and
//! prints the verdict, the delivery latency (publish send to receive) and
//! the skew (per message, last minus first subscriber to receive it).
//!
//! Invariants: the expected list comes from reading the stream back after
//! the feed, never from the audit's own counters; every subscriber starts
//! at the first sequence after the stream's head when the audit began, so
//! its expected list is that range filtered; the exit status is non-zero
//! when any subscriber missed, doubled, reordered or got an unexpected
//! sequence. `--inject-gap` (hidden) makes subscriber 0 forget one message
//! it received, to show that the checker catches it.
//!
//! Files: this one (the options, the run, the subscribers), [`check`] (the
//! verdict), `feed` (the HTTP side: stream, feed, read-back), [`node`]
//! (the child node), `report` (the output).

pub mod check;
mod feed;
pub mod node;
mod report;

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use finmesh_client::{Event, Start, Stats, Subscription, Transport};
use tokio::sync::{mpsc, watch};

use feed::{Api, FeedPlan, feed};
use node::{ChildNode, Restart};
use report::{print_human, report};

/// `finmesh audit` options.
#[derive(Debug, clap::Args)]
pub struct AuditArgs {
    /// Audit this running node (base URL) instead of starting one; it is
    /// not restarted then.
    #[arg(long)]
    server: Option<String>,
    /// Bearer token for --server (needs stream create/publish/subscribe);
    /// a node the audit starts uses its own admin token.
    #[arg(long, env = "FINMESH_TOKEN", hide_env_values = true)]
    token: Option<String>,
    /// Start the node on the NATS engine, on the NATS server at this URL
    /// (default: the embedded engine).
    #[arg(long, conflicts_with = "server")]
    nats: Option<String>,
    /// The stream to audit (created on subjects `md.>` when missing).
    #[arg(long, default_value = "AUDIT")]
    stream: String,
    /// Subscribers to connect.
    #[arg(long, default_value_t = 6)]
    subscribers: usize,
    /// Their transport: sse, ws, or mixed (alternating).
    #[arg(long, value_enum, default_value = "mixed")]
    transport: TransportChoice,
    /// Subject filters given to the subscribers in turn, comma-separated;
    /// `none` = no filter.
    #[arg(long, value_delimiter = ',', default_value = "none,md.S0,md.S1")]
    filters: Vec<String>,
    /// Messages to publish.
    #[arg(long, default_value_t = 3000)]
    messages: u64,
    /// Symbols (subjects `md.S0` … `md.S<n-1>`, in turn).
    #[arg(long, default_value_t = 10)]
    symbols: u64,
    /// Messages per second.
    #[arg(long, default_value_t = 1000)]
    rate: u64,
    /// Messages per publish request.
    #[arg(long, default_value_t = 50)]
    batch: u64,
    /// How the node is restarted at two thirds of the feed (a node the
    /// audit started): drain (SIGTERM), kill (SIGKILL) or none.
    #[arg(long, value_enum, default_value = "drain")]
    restart: Restart,
    /// Do not force the reconnect of every subscriber at a third of the feed.
    #[arg(long)]
    no_reconnect: bool,
    /// Seconds to wait, after the feed, for every subscriber to catch up.
    #[arg(long, default_value_t = 60)]
    timeout_secs: u64,
    /// Print the report as JSON.
    #[arg(long)]
    json: bool,
    /// Check the checker: subscriber 0 forgets one message it received.
    #[arg(long, hide = true)]
    inject_gap: bool,
}

/// The subscribers' transports.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
enum TransportChoice {
    Sse,
    Ws,
    Mixed,
}

/// One subscriber's settings.
#[derive(Debug, Clone)]
struct SubscriberSpec {
    id: usize,
    transport: Transport,
    filter: Option<String>,
}

/// What one subscriber saw.
#[derive(Debug, Default)]
struct Log {
    /// Sequences in the order they were handed out, with their receive
    /// time (microseconds since the audit's clock started).
    received: Vec<(u64, u64)>,
    /// The SDK's counters, summed over its subscriptions.
    stats: Stats,
    /// Subscriptions replaced by a forced reconnect.
    forced_reconnects: u64,
}

/// Run an audit; an error when any subscriber lost, doubled or reordered.
pub async fn run(args: AuditArgs) -> anyhow::Result<()> {
    validate(&args)?;
    let mut node = match &args.server {
        Some(_) => None,
        None => Some(ChildNode::start(args.nats.as_deref()).await?),
    };
    let (base, token, engine) = match (&node, &args.server) {
        (Some(n), _) => (n.url(), Some(n.admin_token()?), if args.nats.is_some() { "nats" } else { "embedded" }),
        (None, Some(server)) => (server.trim_end_matches('/').to_owned(), args.token.clone(), "target"),
        (None, None) => unreachable!("a node is started without --server"),
    };
    let api = Api { http: reqwest::Client::builder().timeout(Duration::from_secs(30)).build()?, base, token };
    api.ensure_stream(&args.stream).await?;
    let first_seq = api.last_seq(&args.stream).await? + 1;
    let clock = Instant::now();

    // Subscribers, all from `first_seq`.
    let (reconnect_tx, reconnect_rx) = watch::channel(0u32);
    let (stop_tx, stop_rx) = watch::channel(false);
    let (connected_tx, mut connected_rx) = mpsc::channel(args.subscribers);
    let mut tasks = Vec::new();
    let mut highest = Vec::new();
    let specs = specs(&args);
    for spec in &specs {
        let top = Arc::new(AtomicU64::new(0));
        highest.push(top.clone());
        let sub = Subscriber {
            spec: spec.clone(),
            endpoint: api.base.clone(),
            token: api.token.clone(),
            stream: args.stream.clone(),
            first_seq,
            clock,
            highest: top,
            inject_gap: args.inject_gap && spec.id == 0,
        };
        let (reconnect, stop, connected) = (reconnect_rx.clone(), stop_rx.clone(), connected_tx.clone());
        tasks.push(tokio::spawn(sub.run(reconnect, stop, connected)));
    }
    drop(connected_tx);
    let wait = Duration::from_secs(args.timeout_secs);
    for _ in 0..specs.len() {
        match tokio::time::timeout(wait, connected_rx.recv()).await {
            Ok(Some(())) => {}
            _ => bail!("not every subscriber connected within {wait:?}"),
        }
    }

    // The feed, with a forced reconnect at 1/3 and a restart at 2/3.
    let (progress_tx, mut progress_rx) = watch::channel(0u64);
    let feed = tokio::spawn(feed(api.clone(), FeedPlan::from(&args), clock, progress_tx));
    let total = args.messages;
    if !args.no_reconnect {
        progress_rx.wait_for(|n| *n >= total / 3).await.ok();
        reconnect_tx.send_modify(|g| *g += 1);
    }
    let restart = if node.is_some() { args.restart } else { Restart::None };
    if let Some(node) = node.as_mut().filter(|_| restart != Restart::None) {
        progress_rx.wait_for(|n| *n >= total * 2 / 3).await.ok();
        node.restart(restart).await.context("restarting the node")?;
    }
    let sent = feed.await.context("the feed task")??;
    let last_seq = api.last_seq(&args.stream).await?;

    // What each filter should have received: the stream's own contents.
    let mut expected: HashMap<Option<String>, Vec<u64>> = HashMap::new();
    // Unfiltered too: every acked message must be in the stream.
    expected.insert(None, api.seqs(&args.stream, None, first_seq, last_seq).await?);
    for spec in &specs {
        if !expected.contains_key(&spec.filter) {
            let seqs = api.seqs(&args.stream, spec.filter.as_deref(), first_seq, last_seq).await?;
            expected.insert(spec.filter.clone(), seqs);
        }
    }
    let deadline = tokio::time::Instant::now() + wait;
    for (spec, top) in specs.iter().zip(&highest) {
        let want = expected[&spec.filter].last().copied().unwrap_or(0);
        while top.load(Ordering::Acquire) < want && tokio::time::Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
    stop_tx.send_replace(true);
    let mut logs = Vec::new();
    for task in tasks {
        logs.push(task.await.context("a subscriber task")??);
    }

    let report = report(&args, &api, engine, &specs, &logs, &expected, &sent, (first_seq, last_seq), restart);
    drop(node);
    if args.json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        print_human(&report);
    }
    if report.acked_not_stored > 0 {
        bail!("loss audit failed: {} acked messages are not in the stream", report.acked_not_stored);
    }
    if !report.ok {
        let bad = report.subscribers.iter().filter(|s| !s.ok).count();
        bail!(
            "loss audit failed: {bad} of {} subscribers did not receive their messages exactly once in order",
            specs.len()
        );
    }
    Ok(())
}

fn validate(args: &AuditArgs) -> anyhow::Result<()> {
    let mut problems = Vec::new();
    for (name, value) in [
        ("--subscribers", args.subscribers as u64),
        ("--messages", args.messages),
        ("--symbols", args.symbols),
        ("--rate", args.rate),
        ("--batch", args.batch),
    ] {
        if value == 0 {
            problems.push(format!("{name} must be at least 1"));
        }
    }
    if args.filters.is_empty() {
        problems.push("--filters needs at least one entry (`none` = no filter)".to_owned());
    }
    if !problems.is_empty() {
        bail!("{}", problems.join("; "));
    }
    Ok(())
}

/// The subscribers' transports and filters, in turn.
fn specs(args: &AuditArgs) -> Vec<SubscriberSpec> {
    (0..args.subscribers)
        .map(|id| {
            let transport = match args.transport {
                TransportChoice::Sse => Transport::Sse,
                TransportChoice::Ws => Transport::WebSocket,
                TransportChoice::Mixed if id % 2 == 0 => Transport::Sse,
                TransportChoice::Mixed => Transport::WebSocket,
            };
            let filter = args.filters[id % args.filters.len()].trim();
            let filter = (!filter.is_empty() && filter != "none").then(|| filter.to_owned());
            SubscriberSpec { id, transport, filter }
        })
        .collect()
}

/// One subscriber's task.
struct Subscriber {
    spec: SubscriberSpec,
    endpoint: String,
    token: Option<String>,
    stream: String,
    first_seq: u64,
    clock: Instant,
    /// The highest sequence received, for the catch-up wait.
    highest: Arc<AtomicU64>,
    inject_gap: bool,
}

impl Subscriber {
    fn subscription(&self, start: Start, epoch: Option<u64>) -> anyhow::Result<Subscription> {
        let mut builder = Subscription::builder([self.endpoint.clone()], self.stream.clone())
            .start(start)
            .transport(self.spec.transport)
            .backoff(finmesh_client::Backoff { initial: Duration::from_millis(50), max: Duration::from_secs(1) });
        if let Some(filter) = &self.spec.filter {
            builder = builder.subject(filter.clone());
        }
        if let Some(token) = &self.token {
            builder = builder.token(token.clone());
        }
        if let Some(epoch) = epoch {
            builder = builder.epoch(epoch);
        }
        Ok(builder.build()?)
    }

    async fn run(
        self,
        mut reconnect: watch::Receiver<u32>,
        mut stop: watch::Receiver<bool>,
        connected: mpsc::Sender<()>,
    ) -> anyhow::Result<Log> {
        let mut log = Log::default();
        let mut sub = self.subscription(Start::From(self.first_seq), None)?;
        let (mut told, mut dropped) = (false, false);
        loop {
            tokio::select! {
                biased;
                _ = stop.changed() => break,
                changed = reconnect.changed() => {
                    if changed.is_err() {
                        continue;
                    }
                    // A new subscription resumes after what the old one handed out.
                    add(&mut log.stats, sub.stats());
                    let start = sub.position().map_or(Start::From(self.first_seq), Start::After);
                    sub = self.subscription(start, sub.epoch())?;
                    log.forced_reconnects += 1;
                }
                event = sub.next() => match event {
                    Ok(Some(Event::Message(m))) => {
                        let at = self.clock.elapsed().as_micros() as u64;
                        self.highest.fetch_max(m.seq, Ordering::AcqRel);
                        if self.inject_gap && !dropped && log.received.len() == 1 {
                            dropped = true;
                            continue;
                        }
                        log.received.push((m.seq, at));
                    }
                    Ok(Some(Event::Connected { .. })) if !told => {
                        told = true;
                        let _ = connected.send(()).await;
                    }
                    Ok(Some(_)) => {}
                    Ok(None) => bail!("subscriber {}: the node ended the subscription", self.spec.id),
                    Err(e) => bail!("subscriber {}: {e}", self.spec.id),
                }
            }
        }
        add(&mut log.stats, sub.stats());
        Ok(log)
    }
}

fn add(total: &mut Stats, s: Stats) {
    total.delivered += s.delivered;
    total.gaps += s.gaps;
    total.missing += s.missing;
    total.rewinds += s.rewinds;
    total.duplicates_dropped += s.duplicates_dropped;
    total.resets += s.resets;
    total.connections += s.connections;
    total.disconnections += s.disconnections;
    total.failovers += s.failovers;
}
