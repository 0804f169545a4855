//! The market-data fan-out of issue 19, next to core NATS in the same run.
//!
//! - [`run_latency`] (`fanout`): the original load, [`SYMBOLS`] symbols ×
//!   1 tick/s each = one message per millisecond, to [`SUBSCRIBERS`] SSE
//!   subscribers of `finmesh serve` (embedded engine, auth on): feed-send
//!   to subscriber-receive latency and skew (per message, the last
//!   subscriber's receive time minus the first's), with the stream on
//!   `sync = interval` and on `sync = always`; beside it, core NATS at the
//!   same load (one async-nats publisher, [`SUBSCRIBERS`] subscriber
//!   connections on `md.>`).
//! - [`run_max`] (`fanout-max`): the highest sustained deliveries/s before
//!   the p99 passes [`MAX_P99`] (or a message is lost, or the feed falls
//!   behind its rate), raising the rate ×1.5 per window, then halving the
//!   interval between the last step that passed and the first that failed
//!   ([`REFINE_STEPS`] more windows), for both systems. Every step also
//!   reports the CPU (user + sys, from `/proc`) the server (`finmesh
//!   serve` or `nats-server`) and the harness spent per delivery: both
//!   share this machine's cores, so the server's cost per delivery is what
//!   its maximum is made of.
//! - [`run_idle`] (`fanout-idle`): [`IDLE_SUBSCRIBERS`] (by default) idle SSE
//!   connections from several 127.0.0.x source addresses: the node's RSS
//!   growth per subscriber, and whether heartbeats arrive on time; once on
//!   the direct SSE path and once on hyper's (each connection makes a
//!   `/healthz` request before subscribing), so the difference is hyper's
//!   per-connection state.
//! - [`run_filters`] (`fanout-filters`): [`FILTER_SUBSCRIBERS`] SSE
//!   subscribers with 1, 10 and 100 distinct symbol filters, fed
//!   [`FILTER_RATE`] msgs/s over 100 symbols: the node's CPU (user + sys,
//!   from `/proc`) per delivered message, which should not grow with the
//!   number of filters. Subscriber *i* filters on symbol *i mod k*, so
//!   every message on one of the first *k* symbols goes to 100/*k*
//!   subscribers and the deliveries per second are the same for every *k*.
//!
//! `fanout` also measures the node on the NATS engine (a test-kit
//! nats-server, one JetStream consumer per hub tail) beside the embedded one.
//!
//! The feed sends each millisecond's messages together. By default
//! (`--fanout-feed upload`) it is what the issue's central server does: one
//! long `POST /v1/streams/{stream}/feed` upload, a millisecond's lines
//! written as one body chunk, each line's sequence taken from the
//! receiver's per-batch acks; with `--fanout-feed requests` it is one NDJSON
//! `POST …/messages` per millisecond, each message's sequence taken from
//! that request's acks (the transport of the figures before session 20).
//! A message's send time is taken just before its chunk or request is
//! handed to the HTTP client. Every subscriber records the receive
//! time of each `id:` it is sent with a `data:` line (one clock read per
//! socket read). Only messages sent inside the measured window (after a
//! warm-up) count. Every subscriber must receive every sequence exactly
//! once and in order: a loss, duplicate or reorder is reported in the
//! figure's note and fails the `fanout-max` step.

use std::collections::HashMap;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context as _;
use bytes::Bytes;
use finmesh_testkit::ManagedServer as _;
use futures::StreamExt as _;
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::sync::watch;

use super::measure::{Measurement, Sample, vm_rss_bytes};
use super::node::{Node, NodeOptions, expect_ok, http_client};
use super::{BenchContext, start_nats};

/// Downstream servers.
pub const SUBSCRIBERS: usize = 60;
/// Symbols in the feed (1 tick/s each at the original load).
pub const SYMBOLS: usize = 1_000;
/// A `fanout-max` step fails when its p99 passes this.
pub const MAX_P99: Duration = Duration::from_millis(50);
/// Windows `fanout-max` spends narrowing the rate between the last step
/// that passed and the first that failed.
const REFINE_STEPS: usize = 3;
/// Idle SSE connections of `fanout-idle`.
pub const IDLE_SUBSCRIBERS: usize = 15_000;
/// Source addresses the idle connections are spread over (127.0.0.2 …).
const IDLE_SOURCES: u8 = 8;
/// Heartbeat interval the idle node runs with.
const IDLE_HEARTBEAT: Duration = Duration::from_secs(2);
/// How long subscribers may take to receive the last message after the feed stops.
const DRAIN: Duration = Duration::from_secs(10);

/// Ids (ratios refer to them).
pub const LATENCY_INTERVAL: &str = "fanout.sse-60.latency.interval";
pub const SKEW_INTERVAL: &str = "fanout.sse-60.skew.interval";
pub const LATENCY_ALWAYS: &str = "fanout.sse-60.latency.always";
pub const SKEW_ALWAYS: &str = "fanout.sse-60.skew.always";
pub const NATS_LATENCY: &str = "nats.core.fanout-60.latency";
pub const NATS_SKEW: &str = "nats.core.fanout-60.skew";
pub const MAX_FINMESH: &str = "fanout.sse-60.max-deliveries";
pub const MAX_NATS: &str = "nats.core.fanout-60.max-deliveries";
pub const IDLE_RSS: &str = "fanout.idle.rss-per-subscriber";
pub const IDLE_RSS_HYPER: &str = "fanout.idle.rss-per-subscriber.hyper-path";
pub const LATENCY_NATS_ENGINE: &str = "fanout.sse-60.latency.nats-engine";
pub const SKEW_NATS_ENGINE: &str = "fanout.sse-60.skew.nats-engine";
/// `fanout.filters-<k>.cpu-per-delivery`.
pub const FILTER_CPU_PREFIX: &str = "fanout.filters";

/// Subscribers of `fanout-filters`, and symbols of its feed.
pub const FILTER_SUBSCRIBERS: usize = 100;
/// Messages per second into the stream in `fanout-filters`.
pub const FILTER_RATE: usize = 100_000;
/// Distinct filters `fanout-filters` measures with.
pub const FILTER_COUNTS: [usize; 3] = [1, 10, 100];
/// Clock ticks per second of `/proc/<pid>/stat` (`USER_HZ`, 100 on Linux).
const USER_HZ: f64 = 100.0;

/// The node configuration the fan-out scenarios add to the bench's.
const FANOUT_CONFIG: &str = "
[subscriptions]
max_per_principal = 100000
max_total = 100000
";

/// What one trial measured.
#[derive(Debug)]
struct Trial {
    /// Deliveries per second in the window (messages × subscribers / window).
    deliveries_per_s: f64,
    /// Messages the feed sent per second in the window.
    sent_per_s: f64,
    /// Send-to-receive latency of every (message, subscriber) in the window.
    latency: Sample,
    /// Per message: last receive minus first receive.
    skew: Sample,
    /// (message, subscriber) pairs of the window never received.
    lost: u64,
    /// Deliveries out of order or twice.
    disorder: u64,
    /// Every delivery the subscribers recorded, warm-up included.
    received: u64,
}

impl Trial {
    fn note(&self, what: &str) -> String {
        format!(
            "{what}; {:.0} deliveries/s ({:.0} msgs/s sent); lost {}, out of order or duplicate {}",
            self.deliveries_per_s, self.sent_per_s, self.lost, self.disorder
        )
    }
}

/// One subscriber's receive log: (message key, receive time in ns since the trial's epoch).
type Tape = Vec<(u64, u64)>;

/// How the feed reaches finmesh (`--fanout-feed`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum FeedTransport {
    /// One long `POST /v1/streams/{stream}/feed` upload, per-batch acks:
    /// the receiver of issue 19, as `finmesh feed` sends to it.
    Upload,
    /// One `POST /v1/streams/{stream}/messages` per millisecond (the
    /// figures of sessions 14–19).
    Requests,
}

/// Which system a trial feeds.
#[derive(Debug, Clone)]
enum System {
    /// `finmesh serve` at `url`, stream `stream`, bearer `token`, fed over `transport`.
    Finmesh { url: String, token: String, stream: String, transport: FeedTransport },
    /// core NATS at `url`.
    Nats { url: String },
}

/// `fanout`: latency and skew at the original load, finmesh (interval and
/// always) and core NATS.
pub async fn run_latency(ctx: &BenchContext) -> anyhow::Result<Vec<Measurement>> {
    let window = ctx.duration;
    let mut out = Vec::new();
    let dir = ctx.tempdir("fanout")?;
    let node = start_node(dir.path()).await?;
    let token = node.token.clone().context("finmesh serve printed no admin token")?;
    for (sync, lat_id, skew_id) in
        [("interval", LATENCY_INTERVAL, SKEW_INTERVAL), ("always", LATENCY_ALWAYS, SKEW_ALWAYS)]
    {
        let stream = format!("md_{sync}");
        create_stream(&node.url, &token, &stream, sync).await?;
        let system = System::Finmesh { url: node.url.clone(), token: token.clone(), stream, transport: ctx.feed };
        let trial = trial(&system, SUBSCRIBERS, 1, window).await?;
        let what = format!(
            "{SYMBOLS} symbols × 1 tick/s to {SUBSCRIBERS} SSE subscribers, embedded engine, sync = {sync}, auth on"
        );
        out.push(
            Measurement::latency(lat_id, "finmesh-gateway", &what, &trial.latency)
                .note(trial.note("feed-send → receive")),
        );
        out.push(
            Measurement::latency(skew_id, "finmesh-gateway", &what, &trial.skew)
                .note("last − first receive of each message"),
        );
    }
    node.stop().await?;
    let nats = start_nats(ctx).await?;
    // The same node on the NATS engine (its durability is the server's
    // `sync_interval`, whatever the stream asks for).
    let engine_dir = ctx.tempdir("fanout-nats-engine")?;
    let options = NodeOptions { nats_url: Some(nats.url()), ..NodeOptions::default() };
    let node = Node::start_with(engine_dir.path(), &options, FANOUT_CONFIG).await?;
    let token = node.token.clone().context("finmesh serve printed no admin token")?;
    create_stream(&node.url, &token, "md", "interval").await?;
    let system = System::Finmesh { url: node.url.clone(), token, stream: "md".to_owned(), transport: ctx.feed };
    let engine_trial = trial(&system, SUBSCRIBERS, 1, window).await?;
    let what = format!("{SYMBOLS} symbols × 1 tick/s to {SUBSCRIBERS} SSE subscribers, NATS engine (R1), auth on");
    out.push(
        Measurement::latency(LATENCY_NATS_ENGINE, "finmesh-gateway", &what, &engine_trial.latency)
            .note(engine_trial.note("feed-send → receive")),
    );
    out.push(
        Measurement::latency(SKEW_NATS_ENGINE, "finmesh-gateway", &what, &engine_trial.skew)
            .note("last − first receive of each message"),
    );
    node.stop().await?;
    let trial = trial(&System::Nats { url: nats.url() }, SUBSCRIBERS, 1, window).await?;
    let what = format!("{SYMBOLS} msgs/s to {SUBSCRIBERS} async-nats subscriber connections, core NATS");
    out.push(
        Measurement::latency(NATS_LATENCY, "nats-server", &what, &trial.latency).note(trial.note("publish → receive")),
    );
    out.push(
        Measurement::latency(NATS_SKEW, "nats-server", &what, &trial.skew).note("last − first receive of each message"),
    );
    drop(nats);
    Ok(out)
}

/// `fanout-max`: the highest sustained deliveries/s with a p99 under
/// [`MAX_P99`], no loss and the feed keeping its rate, for each system.
pub async fn run_max(ctx: &BenchContext) -> anyhow::Result<Vec<Measurement>> {
    let window = ctx.duration;
    let dir = ctx.tempdir("fanout-max")?;
    let node = start_node(dir.path()).await?;
    let token = node.token.clone().context("finmesh serve printed no admin token")?;
    create_stream(&node.url, &token, "md", "interval").await?;
    let finmesh = System::Finmesh { url: node.url.clone(), token, stream: "md".to_owned(), transport: ctx.feed };
    let (best, steps) = ramp(&finmesh, node.pid(), window).await?;
    node.stop().await?;
    let nats = start_nats(ctx).await?;
    let nats_pid = nats.pid().context("nats-server is not running")?;
    let (nats_best, nats_steps) = ramp(&System::Nats { url: nats.url() }, nats_pid, window).await?;
    drop(nats);
    Ok(vec![
        max_measurement(MAX_FINMESH, "finmesh-gateway", "SSE, embedded engine, sync = interval", best, &steps),
        max_measurement(MAX_NATS, "nats-server", "core NATS, async-nats", nats_best, &nats_steps),
    ])
}

fn max_measurement(id: &str, peer: &str, what: &str, best: Option<Trial>, steps: &str) -> Measurement {
    let what =
        format!("highest deliveries/s to {SUBSCRIBERS} subscribers with p99 < {} ms, {what}", MAX_P99.as_millis());
    match best {
        // The latency sample counts deliveries over the window: its rate is deliveries/s.
        Some(t) => Measurement::rate(id, peer, &what, "deliveries/s", &t.latency).note(format!("steps: {steps}")),
        None => {
            Measurement::rate(id, peer, &what, "deliveries/s", &Sample::new()).note(format!("no step passed; {steps}"))
        }
    }
}

/// Raise the messages per millisecond ×1.5 (at least +1) until a step
/// fails, then halve the gap between the last pass and the first failure
/// [`REFINE_STEPS`] times; the best passing step and a summary of every
/// step, each with the CPU `server` and this harness spent per delivery.
async fn ramp(system: &System, server: u32, window: Duration) -> anyhow::Result<(Option<Trial>, String)> {
    let mut best: Option<(usize, Trial)> = None;
    let mut failed: Option<usize> = None;
    let mut steps = Vec::new();
    let mut refined = 0;
    while let Some(per_tick) = next_step(best.as_ref().map(|b| b.0), failed, refined) {
        refined += usize::from(failed.is_some());
        let (server_before, own_before) = (cpu_ticks(&server.to_string())?, cpu_ticks("self")?);
        let trial = trial(system, SUBSCRIBERS, per_tick, window).await?;
        let per_delivery = |before, now| (now - before) as f64 / USER_HZ * 1e6 / trial.received.max(1) as f64;
        let server_us = per_delivery(server_before, cpu_ticks(&server.to_string())?);
        let own_us = per_delivery(own_before, cpu_ticks("self")?);
        let p99 = trial.latency.percentile_us(99.0).unwrap_or(f64::INFINITY);
        let target = per_tick as f64 * 1000.0;
        let kept_up = trial.sent_per_s >= 0.9 * target;
        let failure = if p99 >= MAX_P99.as_secs_f64() * 1e6 {
            " ✗".to_owned()
        } else if trial.lost > 0 || trial.disorder > 0 {
            format!(" ✗ lost {}, out of order {}", trial.lost, trial.disorder)
        } else if !kept_up {
            format!(" ✗ the feed sent {:.1}k msgs/s", trial.sent_per_s / 1000.0)
        } else {
            String::new()
        };
        let pass = failure.is_empty();
        steps.push(format!(
            "{per_tick}/ms {:.0}k/s p99 {:.1} ms{failure} (CPU/delivery: server {server_us:.2} µs, harness {own_us:.2} µs)",
            trial.deliveries_per_s / 1000.0,
            p99 / 1000.0,
        ));
        eprintln!("    {}", steps.last().map(String::as_str).unwrap_or(""));
        if pass {
            best = Some((per_tick, trial));
        } else {
            failed = Some(failed.map_or(per_tick, |f| f.min(per_tick)));
        }
    }
    Ok((best.map(|b| b.1), steps.join(", ")))
}

/// The messages per millisecond of `fanout-max`'s next step, from the
/// highest rate that passed, the lowest that failed and the narrowing
/// steps taken; `None` when the ramp is over.
fn next_step(passed: Option<usize>, failed: Option<usize>, refined: usize) -> Option<usize> {
    match (passed, failed) {
        (None, None) => Some(1),
        (None, Some(_)) => None,
        (Some(pass), None) => Some((pass * 3 / 2).max(pass + 1)),
        (Some(pass), Some(fail)) if fail > pass + 1 && refined < REFINE_STEPS => Some(pass + (fail - pass) / 2),
        (Some(_), Some(_)) => None,
    }
}

/// Connect `subscribers`, feed `per_tick` messages every millisecond for a
/// warm-up and `window`, wait for every subscriber to catch up, and
/// measure.
async fn trial(system: &System, subscribers: usize, per_tick: usize, window: Duration) -> anyhow::Result<Trial> {
    let epoch = Instant::now();
    // The last message key the feed sent; subscribers stop once they have it.
    let (last_tx, last_rx) = watch::channel(None::<u64>);
    let mut readers = tokio::task::JoinSet::new();
    let mut ready = Vec::new();
    for _ in 0..subscribers {
        let (ready_tx, ready_rx) = tokio::sync::oneshot::channel();
        ready.push(ready_rx);
        let system = system.clone();
        let last = last_rx.clone();
        readers.spawn(async move { subscribe(system, epoch, ready_tx, last).await });
    }
    for r in ready {
        r.await.context("a subscriber failed to connect")?;
    }
    let warmup = (window / 4).clamp(Duration::from_millis(250), Duration::from_secs(2));
    let feed_start = epoch.elapsed();
    let sent = feed(system, epoch, per_tick, SYMBOLS, warmup, window).await?;
    tracing::debug!(sent = sent.len(), first = ?sent.first(), last = ?sent.last(), "feed done");
    let last_key = sent.iter().map(|s| s.0).max();
    last_tx.send_replace(last_key);
    let mut tapes = Vec::with_capacity(subscribers);
    while let Some(joined) = readers.join_next().await {
        tapes.push(joined.context("a subscriber panicked")??);
    }
    let from = (feed_start + warmup).as_nanos() as u64;
    let to = (feed_start + warmup + window).as_nanos() as u64;
    Ok(analyse(&sent, &tapes, from, to, window))
}

/// Compare what was sent (key, send ns) with what each subscriber received.
fn analyse(sent: &[(u64, u64)], tapes: &[Tape], from: u64, to: u64, window: Duration) -> Trial {
    let in_window: HashMap<u64, u64> = sent.iter().copied().filter(|(_, t)| (from..to).contains(t)).collect();
    let mut latency = Sample::new();
    let mut skew = Sample::new();
    let mut first_last: HashMap<u64, (u64, u64, usize)> = HashMap::with_capacity(in_window.len());
    let mut disorder = 0u64;
    let mut delivered = 0u64;
    for tape in tapes {
        let mut previous = None;
        for &(key, at) in tape {
            if previous.is_some_and(|p| key <= p) {
                disorder += 1;
            }
            previous = Some(key);
            if let Some(&sent_at) = in_window.get(&key) {
                delivered += 1;
                latency.record(Duration::from_nanos(at.saturating_sub(sent_at)));
                let e = first_last.entry(key).or_insert((at, at, 0));
                e.0 = e.0.min(at);
                e.1 = e.1.max(at);
                e.2 += 1;
            }
        }
    }
    for (first, last, _) in first_last.values() {
        skew.record(Duration::from_nanos(last - first));
    }
    let expected = in_window.len() as u64 * tapes.len() as u64;
    latency.msgs = delivered;
    latency.elapsed = window;
    Trial {
        deliveries_per_s: delivered as f64 / window.as_secs_f64(),
        sent_per_s: in_window.len() as f64 / window.as_secs_f64(),
        latency,
        skew,
        lost: expected.saturating_sub(delivered),
        disorder,
        received: tapes.iter().map(|t| t.len() as u64).sum(),
    }
}

/// The feed: every millisecond, `per_tick` ticks in one batch. Returns
/// (message key, send time in ns since `epoch`) of every message sent.
async fn feed(
    system: &System,
    epoch: Instant,
    per_tick: usize,
    symbols: usize,
    warmup: Duration,
    window: Duration,
) -> anyhow::Result<Vec<(u64, u64)>> {
    let end = Instant::now() + warmup + window;
    let mut ticker = tokio::time::interval(Duration::from_millis(1));
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
    let mut symbol = 0usize;
    let mut sent = Vec::new();
    match system {
        System::Finmesh { url, token, stream, transport: FeedTransport::Upload } => {
            return feed_upload(url, token, stream, epoch, per_tick, symbols, end).await;
        }
        System::Finmesh { url, token, stream, transport: FeedTransport::Requests } => {
            let client = http_client(None)?;
            let url = format!("{url}/v1/streams/{stream}/messages");
            let auth = format!("Bearer {token}");
            // Several batches in flight, so a slow ack does not stall the feed.
            let mut in_flight = futures::stream::FuturesUnordered::new();
            while Instant::now() < end {
                ticker.tick().await;
                let mut body = String::with_capacity(per_tick * 128);
                for _ in 0..per_tick {
                    body.push_str(&tick_line(stream, symbol));
                    symbol = (symbol + 1) % symbols;
                }
                let at = epoch.elapsed().as_nanos() as u64;
                let request = client
                    .post(&url)
                    .header("authorization", &auth)
                    .header("content-type", "application/x-ndjson")
                    .body(body);
                in_flight.push(async move { (at, expect_ok(request, "publish a tick batch").await) });
                while in_flight.len() >= 64 {
                    let (at, answer) = in_flight.next().await.context("in flight")?;
                    record_acks(&mut sent, at, &answer?)?;
                }
                // Collect acks that are ready without waiting.
                while let Some(Some((at, answer))) = futures::FutureExt::now_or_never(in_flight.next()) {
                    record_acks(&mut sent, at, &answer?)?;
                }
            }
            while let Some((at, answer)) = in_flight.next().await {
                record_acks(&mut sent, at, &answer?)?;
            }
        }
        System::Nats { url } => {
            let client = async_nats::connect(url.as_str()).await.context("connecting the NATS publisher")?;
            let mut key = 0u64;
            while Instant::now() < end {
                ticker.tick().await;
                let at = epoch.elapsed().as_nanos() as u64;
                for _ in 0..per_tick {
                    key += 1;
                    let mut payload = Vec::with_capacity(112);
                    payload.extend_from_slice(&key.to_be_bytes());
                    payload.extend_from_slice(tick_line("md", symbol).as_bytes());
                    client.publish(format!("md.S{symbol:04}"), Bytes::from(payload)).await?;
                    symbol = (symbol + 1) % symbols;
                    sent.push((key, at));
                }
                client.flush().await?;
            }
        }
    }
    Ok(sent)
}

/// The upload feed: one long `POST /v1/streams/{stream}/feed` (the
/// receiver of issue 19, as `finmesh feed` uses it), each millisecond's
/// `per_tick` lines written as one body chunk; sequences come from the
/// receiver's per-batch acks (line numbers → sequences).
async fn feed_upload(
    url: &str,
    token: &str,
    stream: &str,
    epoch: Instant,
    per_tick: usize,
    symbols: usize,
    end: Instant,
) -> anyhow::Result<Vec<(u64, u64)>> {
    let (tx, rx) = tokio::sync::mpsc::unbounded_channel::<Result<Bytes, std::io::Error>>();
    let body =
        reqwest::Body::wrap_stream(futures::stream::unfold(
            rx,
            |mut rx| async move { rx.recv().await.map(|c| (c, rx)) },
        ));
    // No request timeout: the upload lasts the whole trial.
    let request = reqwest::Client::builder()
        .build()?
        .post(format!("{url}/v1/streams/{stream}/feed?symbol_prefix={stream}"))
        .bearer_auth(token)
        .header("content-type", "application/x-ndjson")
        .body(body);
    let answers = tokio::spawn(upload_answers(request));
    let mut ticker = tokio::time::interval(Duration::from_millis(1));
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
    // Message ids unique per upload: a stream outlives one trial
    // (`fanout-max` feeds it again and again) and would drop repeats.
    static UPLOADS: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    let upload = UPLOADS.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let (mut symbol, mut line_sent) = (0usize, Vec::new());
    while Instant::now() < end {
        ticker.tick().await;
        let mut chunk = String::with_capacity(per_tick * 140);
        for i in 1..=per_tick {
            chunk.push_str(&upload_line(symbol, upload, line_sent.len() + i));
            symbol = (symbol + 1) % symbols;
        }
        let at = epoch.elapsed().as_nanos() as u64;
        line_sent.extend(std::iter::repeat_n(at, per_tick));
        if tx.send(Ok(Bytes::from(chunk))).is_err() {
            break;
        }
    }
    drop(tx);
    let ranges = answers.await.context("the feed's answer reader panicked")??;
    let mut sent = Vec::with_capacity(line_sent.len());
    for (first_line, first_seq, count) in ranges {
        for i in 0..count {
            let at = line_sent.get((first_line + i - 1) as usize).context("an ack for a line never sent")?;
            sent.push((first_seq + i, *at));
        }
    }
    anyhow::ensure!(sent.len() == line_sent.len(), "the feed acked {} of {} lines", sent.len(), line_sent.len());
    Ok(sent)
}

/// Send the upload and read its answers until `end`: every ack's
/// (first line, first sequence, lines).
async fn upload_answers(request: reqwest::RequestBuilder) -> anyhow::Result<Vec<(u64, u64, u64)>> {
    let response = request.send().await.context("opening the feed upload")?;
    anyhow::ensure!(response.status().is_success(), "the feed upload answered {}", response.status());
    let mut chunks = response.bytes_stream();
    let mut acks = UploadAcks::default();
    while let Some(chunk) = chunks.next().await {
        if acks.feed(&chunk.context("reading the feed's answers")?)? {
            return Ok(acks.ranges);
        }
    }
    anyhow::bail!("the feed upload ended without `end`")
}

/// One tick as a feed line with its message id (line `n` of `upload`).
fn upload_line(symbol: usize, upload: u64, n: usize) -> String {
    format!(
        "{{\"symbol\":\"S{symbol:04}\",\"msg_id\":\"b{upload}-{n}\",\"payload\":{{\"s\":\"S{symbol:04}\",\"bid\":101.25,\"ask\":101.27,\"last\":101.26,\"size\":300}}}}\n"
    )
}

/// The feed upload's answers, parsed as they arrive: every ack as
/// (first line, first sequence, lines).
#[derive(Debug, Default)]
struct UploadAcks {
    partial: Vec<u8>,
    ranges: Vec<(u64, u64, u64)>,
}

impl UploadAcks {
    /// Take a chunk of answers; whether `end` came.
    fn feed(&mut self, chunk: &[u8]) -> anyhow::Result<bool> {
        self.partial.extend_from_slice(chunk);
        let mut ended = false;
        while let Some(at) = self.partial.iter().position(|b| *b == b'\n') {
            let line: Vec<u8> = self.partial.drain(..=at).collect();
            let answer: serde_json::Value = serde_json::from_slice(&line).context("a feed answer that is not JSON")?;
            match answer["event"].as_str() {
                Some("ack") => {
                    let field = |k: &str| answer[k].as_u64().with_context(|| format!("an ack without `{k}`: {answer}"));
                    let (first_line, last_line) = (field("first_line")?, field("last_line")?);
                    let (first_seq, last_seq) = (field("first_seq")?, field("last_seq")?);
                    let count = last_line + 1 - first_line;
                    anyhow::ensure!(
                        field("duplicates")? == 0 && last_seq + 1 - first_seq == count,
                        "an ack that does not map lines to sequences one to one: {answer}"
                    );
                    self.ranges.push((first_line, first_seq, count));
                }
                Some("end") => ended = true,
                _ => anyhow::bail!("the feed upload answered {answer}"),
            }
        }
        Ok(ended)
    }
}

/// One tick as an NDJSON publish line, on subject `<prefix>.S<symbol>`.
fn tick_line(prefix: &str, symbol: usize) -> String {
    format!(
        "{{\"subject\":\"{prefix}.S{symbol:04}\",\"payload\":{{\"s\":\"S{symbol:04}\",\"bid\":101.25,\"ask\":101.27,\"last\":101.26,\"size\":300}}}}\n"
    )
}

#[derive(serde::Deserialize)]
struct Acks {
    acks: Vec<Ack>,
}

#[derive(serde::Deserialize)]
struct Ack {
    seq: u64,
}

fn record_acks(sent: &mut Vec<(u64, u64)>, at: u64, body: &Bytes) -> anyhow::Result<()> {
    let acks: Acks = serde_json::from_slice(body).context("parsing publish acks")?;
    sent.extend(acks.acks.iter().map(|a| (a.seq, at)));
    Ok(())
}

/// One subscriber: connect, say ready, record every message until the
/// last key is known and received (or [`DRAIN`] after it is known).
async fn subscribe(
    system: System,
    epoch: Instant,
    ready: tokio::sync::oneshot::Sender<()>,
    mut last: watch::Receiver<Option<u64>>,
) -> anyhow::Result<Tape> {
    let mut tape = Tape::with_capacity(1 << 16);
    let mut deadline: Option<tokio::time::Instant> = None;
    let done = |tape: &Tape, last: Option<u64>| last.is_some_and(|l| tape.last().is_some_and(|(k, _)| *k >= l));
    match system {
        System::Finmesh { url, token, stream, .. } => {
            let client = reqwest::Client::builder().build()?;
            let response = client
                .get(format!("{url}/v1/streams/{stream}/events"))
                .bearer_auth(&token)
                .send()
                .await
                .context("opening an SSE subscription")?;
            anyhow::ensure!(response.status().is_success(), "SSE subscription answered {}", response.status());
            let _ = ready.send(());
            let mut body = response.bytes_stream();
            let mut parser = SseIds::default();
            loop {
                if done(&tape, *last.borrow()) {
                    break;
                }
                let sleep = async {
                    match deadline {
                        Some(d) => tokio::time::sleep_until(d).await,
                        None => std::future::pending().await,
                    }
                };
                tokio::select! {
                    chunk = body.next() => {
                        let Some(chunk) = chunk else { break };
                        let at = epoch.elapsed().as_nanos() as u64;
                        parser.feed(&chunk?, |seq| tape.push((seq, at)));
                    }
                    _ = last.changed(), if deadline.is_none() => {
                        deadline = Some(tokio::time::Instant::now() + DRAIN);
                    }
                    _ = sleep => break,
                }
            }
        }
        System::Nats { url } => {
            let client = async_nats::connect(url.as_str()).await.context("connecting a NATS subscriber")?;
            let mut subscription = client.subscribe("md.>").await?;
            client.flush().await?;
            let _ = ready.send(());
            loop {
                if done(&tape, *last.borrow()) {
                    break;
                }
                let sleep = async {
                    match deadline {
                        Some(d) => tokio::time::sleep_until(d).await,
                        None => std::future::pending().await,
                    }
                };
                tokio::select! {
                    message = subscription.next() => {
                        let Some(message) = message else { break };
                        let at = epoch.elapsed().as_nanos() as u64;
                        let key = message.payload.get(..8).and_then(|b| b.try_into().ok()).map(u64::from_be_bytes);
                        tape.push((key.context("a message without its key")?, at));
                    }
                    _ = last.changed(), if deadline.is_none() => {
                        deadline = Some(tokio::time::Instant::now() + DRAIN);
                    }
                    _ = sleep => break,
                }
            }
        }
    }
    Ok(tape)
}

/// Incremental SSE parsing of what the bench needs: the `id:` of every
/// event that has a `data:` line (heartbeats are `id:` only).
#[derive(Debug, Default)]
struct SseIds {
    /// Bytes of an incomplete line.
    partial: Vec<u8>,
    id: Option<u64>,
    data: bool,
    /// The highest `id:` seen, a heartbeat's included.
    position: u64,
}

impl SseIds {
    fn feed(&mut self, chunk: &[u8], mut on_message: impl FnMut(u64)) {
        let mut rest = chunk;
        while let Some(nl) = rest.iter().position(|&b| b == b'\n') {
            let line_end = &rest[..nl];
            rest = &rest[nl + 1..];
            let line: &[u8] = if self.partial.is_empty() {
                line_end
            } else {
                self.partial.extend_from_slice(line_end);
                &self.partial
            };
            let line = line.strip_suffix(b"\r").unwrap_or(line);
            if line.is_empty() {
                if let (Some(id), true) = (self.id, self.data) {
                    on_message(id);
                }
                self.id = None;
                self.data = false;
            } else if let Some(v) = line.strip_prefix(b"id:") {
                self.id = std::str::from_utf8(v).ok().and_then(|s| s.trim().parse().ok());
                self.position = self.position.max(self.id.unwrap_or(0));
            } else if line.starts_with(b"data:") {
                self.data = true;
            }
            self.partial.clear();
        }
        self.partial.extend_from_slice(rest);
    }
}

/// `fanout-idle`: `--idle-subscribers` (default [`IDLE_SUBSCRIBERS`]) idle
/// SSE subscribers on one node, once on the direct SSE path (each
/// connection's first request is the subscription) and once on hyper's
/// (each connection asks `/healthz` first), each on a fresh node.
pub async fn run_idle(ctx: &BenchContext) -> anyhow::Result<Vec<Measurement>> {
    let mut out = Vec::new();
    for (id, via_hyper) in [(IDLE_RSS, false), (IDLE_RSS_HYPER, true)] {
        out.push(idle_node(ctx, id, via_hyper).await?);
    }
    Ok(out)
}

async fn idle_node(ctx: &BenchContext, id: &str, via_hyper: bool) -> anyhow::Result<Measurement> {
    let dir = ctx.tempdir("fanout-idle")?;
    let extra = format!(
        "{FANOUT_CONFIG}heartbeat_ms = {}\n\n[connections]\nmax = 19000\nmax_per_address = 19000\n",
        IDLE_HEARTBEAT.as_millis()
    );
    let node = Node::start_with(dir.path(), &NodeOptions::default(), &extra).await?;
    let token = node.token.clone().context("finmesh serve printed no admin token")?;
    create_stream(&node.url, &token, "md", "interval").await?;
    let addr: SocketAddr = node.url.trim_start_matches("http://").parse().context("the node's address")?;
    let first = if via_hyper { format!("GET /healthz HTTP/1.1\r\nhost: {addr}\r\n\r\n") } else { String::new() };
    let request = Arc::new(format!(
        "{first}GET /v1/streams/md/events HTTP/1.1\r\nhost: {addr}\r\nauthorization: Bearer {token}\r\naccept: text/event-stream\r\n\r\n"
    ));
    // One subscriber first, so the hub's tail exists in the baseline.
    let mut connections = vec![idle_connect(addr, 0, &request).await?];
    let pid = node.pid().to_string();
    let before = vm_rss_bytes(&pid)?;
    let mut opening = tokio::task::JoinSet::new();
    let started = Instant::now();
    anyhow::ensure!(ctx.idle_subscribers >= 2, "--idle-subscribers must be at least 2");
    for i in 1..ctx.idle_subscribers {
        let request = request.clone();
        opening.spawn(async move { idle_connect(addr, i, &request).await });
        if opening.len() >= 256 {
            connections.push(opening.join_next().await.context("opening")???);
        }
    }
    while let Some(c) = opening.join_next().await {
        connections.push(c??);
    }
    let open_time = started.elapsed();
    // Let allocations settle for a heartbeat, then check heartbeats arrive
    // on time on a sample of connections.
    let sample: Vec<usize> = (0..connections.len()).step_by(connections.len() / 100 + 1).collect();
    let mut late = 0usize;
    let mut waits = Sample::new();
    let mut buf = vec![0u8; 4096];
    for &i in &sample {
        let started = Instant::now();
        let wait = IDLE_HEARTBEAT * 2 + Duration::from_secs(1);
        match tokio::time::timeout(wait, connections[i].read(&mut buf)).await {
            Ok(Ok(n)) if n > 0 => waits.record(started.elapsed()),
            _ => late += 1,
        }
    }
    let after = vm_rss_bytes(&pid)?;
    let per_sub = after.saturating_sub(before) as f64 / (connections.len() - 1) as f64;
    let n = connections.len();
    drop(connections);
    node.stop().await?;
    let path = if via_hyper { "hyper's connection path (a /healthz request first)" } else { "the direct SSE path" };
    let what = format!(
        "{n} idle SSE subscribers on one stream, embedded engine, from {IDLE_SOURCES} source addresses, {path}"
    );
    let mut m = Measurement::mib(id, "finmesh-gateway", &what, 0);
    m.value = per_sub / 1024.0;
    m.unit = "KiB/subscriber".to_owned();
    Ok(m.note(format!(
        "node RSS {:.0} → {:.0} MiB; opened in {:.1} s; heartbeat every {} s: {} of {} sampled connections late, wait p99 {:.2} s",
        before as f64 / 1048576.0,
        after as f64 / 1048576.0,
        open_time.as_secs_f64(),
        IDLE_HEARTBEAT.as_secs(),
        late,
        sample.len(),
        waits.percentile_us(99.0).unwrap_or(0.0) / 1e6
    )))
}

/// Open one idle SSE connection from 127.0.0.(2 + i % IDLE_SOURCES), send
/// `request` (the subscription, possibly after other requests) and read
/// through the subscription's response head.
async fn idle_connect(addr: SocketAddr, i: usize, request: &str) -> anyhow::Result<tokio::net::TcpStream> {
    let source = IpAddr::V4(Ipv4Addr::new(127, 0, 0, 2 + (i % IDLE_SOURCES as usize) as u8));
    let socket = tokio::net::TcpSocket::new_v4()?;
    socket.bind(SocketAddr::new(source, 0)).with_context(|| format!("binding {source}"))?;
    let mut stream = socket.connect(addr).await.with_context(|| format!("connection {i}"))?;
    stream.write_all(request.as_bytes()).await?;
    let answers = request.matches(" HTTP/1.1\r\n").count();
    let mut head = Vec::with_capacity(512);
    let mut buf = [0u8; 512];
    let sse_head_done = |head: &[u8]| {
        let text = String::from_utf8_lossy(head);
        text.find("text/event-stream").is_some_and(|at| text[at..].contains("\r\n\r\n"))
    };
    while !sse_head_done(&head) {
        let n = stream.read(&mut buf).await?;
        anyhow::ensure!(n > 0, "connection {i} closed before its response head: {}", String::from_utf8_lossy(&head));
        head.extend_from_slice(&buf[..n]);
        anyhow::ensure!(head.len() < 16 * 1024, "connection {i}: response head too long");
    }
    let text = String::from_utf8_lossy(&head);
    anyhow::ensure!(text.matches("HTTP/1.1 200").count() == answers, "connection {i}: {text}");
    Ok(stream)
}

/// `fanout-filters`: CPU per delivered message with 1, 10 and 100 distinct
/// filters among [`FILTER_SUBSCRIBERS`] subscribers at [`FILTER_RATE`] msgs/s in.
pub async fn run_filters(ctx: &BenchContext) -> anyhow::Result<Vec<Measurement>> {
    let dir = ctx.tempdir("fanout-filters")?;
    let node = Node::start_with(dir.path(), &NodeOptions::default(), &filter_config()).await?;
    let token = node.token.clone().context("finmesh serve printed no admin token")?;
    create_stream(&node.url, &token, "md", "interval").await?;
    let system = System::Finmesh { url: node.url.clone(), token, stream: "md".to_owned(), transport: ctx.feed };
    let mut out = Vec::new();
    for filters in FILTER_COUNTS {
        let t = filter_trial(&system, node.pid(), FILTER_SUBSCRIBERS, filters, FILTER_RATE, ctx.duration).await?;
        out.push(t.measurement(FILTER_SUBSCRIBERS, FILTER_RATE));
    }
    node.stop().await?;
    Ok(out)
}

/// The node configuration of `fanout-filters`: heartbeats often enough that
/// a subscriber whose filter matched nothing lately learns the head soon.
fn filter_config() -> String {
    format!("{FANOUT_CONFIG}heartbeat_ms = 100\n")
}

/// What one `fanout-filters` step measured.
#[derive(Debug)]
struct FilterTrial {
    filters: usize,
    /// Messages the feed published (acked).
    sent: u64,
    /// Messages received, summed over subscribers.
    delivered: u64,
    /// Deliveries the filters call for.
    expected: u64,
    /// Node CPU (user + sys) from the feed's start to the last delivery.
    cpu: Duration,
    /// From the feed's start to the last delivery.
    elapsed: Duration,
}

impl FilterTrial {
    fn cpu_per_delivery_us(&self) -> f64 {
        self.cpu.as_secs_f64() * 1e6 / self.delivered.max(1) as f64
    }

    fn measurement(&self, subscribers: usize, rate: usize) -> Measurement {
        let id = format!("{FILTER_CPU_PREFIX}-{}.cpu-per-delivery", self.filters);
        let what = format!(
            "{subscribers} SSE subscribers, {} distinct symbol filter(s), {rate} msgs/s in over {subscribers} symbols, embedded engine",
            self.filters
        );
        let mut m = Measurement::mib(&id, "finmesh-gateway", &what, 0);
        m.value = self.cpu_per_delivery_us();
        m.unit = "µs CPU/delivery".to_owned();
        m.note(format!(
            "node CPU {:.2} s over {:.1} s; {:.0} msgs/s sent, {} deliveries of {} expected ({:.0}/s)",
            self.cpu.as_secs_f64(),
            self.elapsed.as_secs_f64(),
            self.sent as f64 / self.elapsed.as_secs_f64(),
            self.delivered,
            self.expected,
            self.delivered as f64 / self.elapsed.as_secs_f64()
        ))
    }
}

/// `subscribers` subscribers, subscriber *i* on symbol *i mod filters*, fed
/// `rate` msgs/s over `subscribers` symbols for a warm-up and `window`;
/// the node's CPU from the feed's start until every subscriber has seen
/// the stream's last sequence (a message or a heartbeat's position).
async fn filter_trial(
    system: &System,
    pid: u32,
    subscribers: usize,
    filters: usize,
    rate: usize,
    window: Duration,
) -> anyhow::Result<FilterTrial> {
    anyhow::ensure!(
        filters >= 1 && subscribers.is_multiple_of(filters),
        "{filters} filters must divide {subscribers} subscribers"
    );
    let System::Finmesh { url, token, stream, .. } = system else { anyhow::bail!("fanout-filters measures finmesh") };
    let epoch = Instant::now();
    let (last_tx, last_rx) = watch::channel(None::<u64>);
    let mut readers = tokio::task::JoinSet::new();
    let mut ready = Vec::new();
    for i in 0..subscribers {
        let (ready_tx, ready_rx) = tokio::sync::oneshot::channel();
        ready.push(ready_rx);
        let url = format!("{url}/v1/streams/{stream}/events?subject={stream}.S{:04}", i % filters);
        readers.spawn(count_filtered(url, token.clone(), ready_tx, last_rx.clone()));
    }
    for r in ready {
        r.await.context("a subscriber failed to connect")?;
    }
    let pid = pid.to_string();
    let cpu_before = cpu_ticks(&pid)?;
    let per_tick = (rate / 1000).max(1);
    let warmup = (window / 4).clamp(Duration::from_millis(250), Duration::from_secs(2));
    let sent = feed(system, epoch, per_tick, subscribers, warmup, window).await?;
    last_tx.send_replace(sent.iter().map(|s| s.0).max());
    let mut delivered = 0;
    while let Some(joined) = readers.join_next().await {
        delivered += joined.context("a subscriber panicked")??;
    }
    let elapsed = epoch.elapsed();
    let cpu = Duration::from_secs_f64((cpu_ticks(&pid)? - cpu_before) as f64 / USER_HZ);
    // Symbols round robin from 0 over `subscribers` symbols: messages on the
    // first `filters` symbols match, each for `subscribers / filters` readers.
    let matching = (0..sent.len()).filter(|j| j % subscribers < filters).count() as u64;
    let expected = matching * (subscribers / filters) as u64;
    Ok(FilterTrial { filters, sent: sent.len() as u64, delivered, expected, cpu, elapsed })
}

/// One filtered subscriber: counts messages until it has seen the last
/// sequence (as a message's or a heartbeat's `id:`), or [`DRAIN`] after it is known.
async fn count_filtered(
    url: String,
    token: String,
    ready: tokio::sync::oneshot::Sender<()>,
    mut last: watch::Receiver<Option<u64>>,
) -> anyhow::Result<u64> {
    let client = reqwest::Client::builder().build()?;
    let response = client.get(url).bearer_auth(&token).send().await.context("opening an SSE subscription")?;
    anyhow::ensure!(response.status().is_success(), "SSE subscription answered {}", response.status());
    let _ = ready.send(());
    let mut body = response.bytes_stream();
    let (mut messages, mut position) = (0u64, 0u64);
    let mut parser = SseIds::default();
    let mut deadline: Option<tokio::time::Instant> = None;
    loop {
        if last.borrow().is_some_and(|l| position >= l) {
            return Ok(messages);
        }
        let sleep = async {
            match deadline {
                Some(d) => tokio::time::sleep_until(d).await,
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            chunk = body.next() => {
                let Some(chunk) = chunk else { return Ok(messages) };
                let chunk = chunk?;
                parser.feed(&chunk, |_| messages += 1);
                position = position.max(parser.position);
            }
            _ = last.changed(), if deadline.is_none() => {
                deadline = Some(tokio::time::Instant::now() + DRAIN);
            }
            _ = sleep => return Ok(messages),
        }
    }
}

/// utime + stime of process `pid`, in clock ticks (`/proc/<pid>/stat`).
fn cpu_ticks(pid: &str) -> anyhow::Result<u64> {
    let path = format!("/proc/{pid}/stat");
    let stat = std::fs::read_to_string(&path).with_context(|| format!("reading {path}"))?;
    parse_cpu_ticks(&stat).with_context(|| format!("no utime/stime in {path}"))
}

fn parse_cpu_ticks(stat: &str) -> Option<u64> {
    // Fields after the command name (which may hold spaces, in parentheses):
    // state is field 3, utime 14, stime 15.
    let rest = &stat[stat.rfind(')')? + 2..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    Some(fields.get(11)?.parse::<u64>().ok()? + fields.get(12)?.parse::<u64>().ok()?)
}

async fn start_node(dir: &std::path::Path) -> anyhow::Result<Node> {
    Node::start_with(dir, &NodeOptions::default(), FANOUT_CONFIG).await
}

async fn create_stream(url: &str, token: &str, stream: &str, sync: &str) -> anyhow::Result<()> {
    let sync = match sync {
        "always" => serde_json::json!("always"),
        _ => serde_json::json!({"interval": {"ms": 100}}),
    };
    // Subjects `<stream>.>`: streams of one node may not overlap.
    let body = serde_json::json!({"subjects": [format!("{stream}.>")], "sync": sync});
    expect_ok(
        http_client(None)?.put(format!("{url}/v1/streams/{stream}")).bearer_auth(token).json(&body),
        "create stream",
    )
    .await
    .map(drop)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sse_ids_counts_messages_not_heartbeats_across_chunk_boundaries() {
        let mut ids = Vec::new();
        let mut p = SseIds::default();
        let text =
            b": hello\n\nid: 1\ndata: {}\n\n: heartbeat\nid: 1\n\nid: 2\r\ndata: {\"a\":1}\r\n\r\nid: 3\ndata: x\n\n";
        for chunk in text.chunks(3) {
            p.feed(chunk, |id| ids.push(id));
        }
        assert_eq!(ids, vec![1, 2, 3]);
    }

    #[test]
    fn the_max_ramp_climbs_by_half_then_narrows_between_pass_and_fail() {
        // Climb ×1.5 (at least +1) while steps pass.
        let climb: Vec<_> = [1, 2, 3, 4, 6, 9].iter().map(|&p| next_step(Some(p), None, 0).unwrap()).collect();
        assert_eq!(climb, [2, 3, 4, 6, 9, 13]);
        assert_eq!(next_step(None, None, 0), Some(1));
        // 13 failed after 9 passed: halve the gap while it is wider than one.
        assert_eq!(next_step(Some(9), Some(13), 0), Some(11));
        assert_eq!(next_step(Some(11), Some(13), 1), Some(12));
        assert_eq!(next_step(Some(12), Some(13), 2), None, "adjacent rates: nothing left to narrow");
        assert_eq!(next_step(Some(9), Some(11), 1), Some(10));
        assert_eq!(next_step(Some(19), Some(28), REFINE_STEPS), None, "at most REFINE_STEPS narrowing steps");
        assert_eq!(next_step(None, Some(1), 0), None, "the first step failed");
    }

    #[test]
    fn cpu_ticks_are_utime_plus_stime_after_a_command_with_spaces() {
        let stat = "4242 (finmesh serve) S 1 4242 4242 0 -1 4194560 500 0 0 0 731 269 0 0 20 0 7 0 100 1000 200";
        assert_eq!(parse_cpu_ticks(stat), Some(1000));
    }

    /// `fanout-filters` at a tiny size on a debug build: every expected
    /// delivery arrives and the CPU figure is computed.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_tiny_filter_trial_delivers_what_the_filters_call_for() {
        let dir = tempfile::tempdir().unwrap();
        let node = Node::start_with(dir.path(), &NodeOptions::default(), &filter_config()).await.unwrap();
        let token = node.token.clone().unwrap();
        create_stream(&node.url, &token, "md", "interval").await.unwrap();
        let system = System::Finmesh {
            url: node.url.clone(),
            token,
            stream: "md".to_owned(),
            transport: FeedTransport::Requests,
        };
        for filters in [1, 2, 4] {
            let t = filter_trial(&system, node.pid(), 4, filters, 1_000, Duration::from_millis(300)).await.unwrap();
            assert!(t.sent > 0, "{t:?}");
            assert_eq!(t.delivered, t.expected, "{t:?}");
            assert!(t.cpu_per_delivery_us().is_finite(), "{t:?}");
            assert!(t.measurement(4, 1_000).id.starts_with("fanout.filters-"), "{t:?}");
        }
        node.stop().await.unwrap();
    }

    /// Both feed transports, at a tiny size on a debug build, two trials
    /// on one stream: every subscriber gets every acked message once and
    /// in order.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_tiny_trial_delivers_everything_over_either_feed() {
        let dir = tempfile::tempdir().unwrap();
        let node = start_node(dir.path()).await.unwrap();
        let token = node.token.clone().unwrap();
        for transport in [FeedTransport::Upload, FeedTransport::Requests] {
            let stream = format!("md_{transport:?}").to_lowercase();
            create_stream(&node.url, &token, &stream, "interval").await.unwrap();
            let system = System::Finmesh { url: node.url.clone(), token: token.clone(), stream, transport };
            // Twice on the same stream, as `fanout-max` does.
            for _ in 0..2 {
                let t = trial(&system, 3, 2, Duration::from_millis(300)).await.unwrap();
                assert!(t.sent_per_s > 0.0, "{transport:?}: {t:?}");
                assert_eq!((t.lost, t.disorder), (0, 0), "{transport:?}: {t:?}");
                assert!(t.latency.msgs >= 3, "every subscriber got the window's messages: {transport:?}: {t:?}");
            }
        }
        node.stop().await.unwrap();
    }

    #[test]
    fn upload_acks_map_lines_to_sequences_across_chunks() {
        let mut acks = UploadAcks::default();
        let answers = concat!(
            r#"{"event":"ack","batch":1,"first_line":1,"last_line":3,"count":3,"duplicates":0,"first_seq":10,"last_seq":12}"#,
            "\n",
            r#"{"event":"ack","batch":2,"first_line":4,"last_line":4,"count":1,"duplicates":0,"first_seq":13,"last_seq":13}"#,
            "\n",
            r#"{"event":"end","lines":4,"messages":4,"duplicates":0,"batches":2}"#,
            "\n"
        )
        .as_bytes();
        let (a, b) = answers.split_at(57);
        assert!(!acks.feed(a).unwrap());
        assert!(acks.feed(b).unwrap(), "`end` ends the answers");
        assert_eq!(acks.ranges, [(1, 10, 3), (4, 13, 1)]);
        let duplicate = br#"{"event":"ack","batch":1,"first_line":1,"last_line":2,"count":2,"duplicates":1,"first_seq":5,"last_seq":5}
"#;
        assert!(UploadAcks::default().feed(duplicate).is_err(), "a duplicate breaks the line → sequence map");
        let error = br#"{"event":"error","problem":{"status":400}}
"#;
        assert!(UploadAcks::default().feed(error).is_err());
    }

    #[test]
    fn analyse_counts_loss_disorder_latency_and_skew() {
        let sent = vec![(1, 100), (2, 200), (3, 300)];
        let tapes = vec![vec![(1, 150), (2, 260), (3, 330)], vec![(1, 170), (3, 390), (2, 400)], vec![(1, 160)]];
        let t = analyse(&sent, &tapes, 0, 1_000, Duration::from_secs(1));
        assert_eq!(t.lost, 2, "subscriber 3 missed 2 and 3");
        assert_eq!(t.disorder, 1, "subscriber 2 got 2 after 3");
        assert_eq!(t.latency.msgs, 7);
        assert_eq!(t.skew.hist.len(), 3);
        assert_eq!(t.skew.hist.max(), 140, "message 2: 400 − 260");
    }
}
