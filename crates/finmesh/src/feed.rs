//! `finmesh feed`: simulates the central market-data server feeding a
//! finmesh node (docs/fanout.md, "Feed in").
//!
//! It generates ticks for N symbols at a steady rate (plus optional
//! bursts), with prices that walk, and sends them as NDJSON lines over one
//! long `POST /v1/streams/{stream}/feed` to the first receiver of its list.
//! Each tick has a message id `<feed id>-<n>`, n counting from 1.
//!
//! Invariants:
//! - every generated tick stays in the unacked queue until an `ack` covers
//!   its id; the queue is in id order and acks come in line order, so a
//!   tick is acked exactly when its n is at most the ack's last id;
//! - on a lost connection (refused, broken, an `error` the receiver cannot
//!   take, or `reconnect` from a draining node) the feed moves to the next
//!   receiver of the list (wrapping around, with a short backoff once the
//!   whole list failed) and first resends the whole unacked queue, with the
//!   same ids: the stream's duplicate window makes the resend
//!   duplicate-free, so with a window longer than the outage every tick is
//!   stored exactly once;
//! - the run ends when every tick was generated and acked.

use std::collections::VecDeque;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use bytes::Bytes;
use futures::StreamExt;
use serde::Serialize;
use tokio::sync::mpsc;

use crate::client::ClientArgs;

/// What to feed, how fast, and where.
#[derive(Debug, Clone, clap::Args)]
pub struct FeedArgs {
    /// More receivers, tried in order after `--server` when a connection is lost.
    #[arg(long, value_delimiter = ',')]
    pub failover: Vec<String>,
    /// The market-data stream (created on `md.>` if missing).
    #[arg(long, default_value = "MD")]
    pub stream: String,
    /// Number of symbols.
    #[arg(long, default_value_t = 100)]
    pub symbols: usize,
    /// Ticks per second, over all symbols.
    #[arg(long, default_value_t = 1000.0)]
    pub rate: f64,
    /// Stop after this many ticks (default: run until --duration or Ctrl-C;
    /// after Ctrl-C the ticks generated so far are still acked).
    #[arg(long)]
    pub count: Option<u64>,
    /// Stop generating after this many seconds.
    #[arg(long)]
    pub duration: Option<f64>,
    /// Every this many milliseconds, send a burst of `--burst-size` extra ticks at once.
    #[arg(long)]
    pub burst_every_ms: Option<u64>,
    /// Ticks in a burst.
    #[arg(long, default_value_t = 500)]
    pub burst_size: u64,
    /// Prefix of the message ids (default: random); use the same one to resend a run.
    #[arg(long)]
    pub feed_id: Option<String>,
    /// Duplicate window of the stream when it is created, in milliseconds:
    /// longer than any outage the feed must survive without duplicates.
    #[arg(long, default_value_t = 600_000)]
    pub duplicate_window_ms: u64,
    /// Give up after the receivers were unreachable this long, in milliseconds.
    #[arg(long, default_value_t = 60_000)]
    pub give_up_ms: u64,
}

/// The report printed at the end.
#[derive(Debug, Default, Serialize)]
pub struct Report {
    /// Ticks generated.
    pub ticks: u64,
    /// Lines sent, resends included.
    pub sent: u64,
    /// Ticks acked (each once).
    pub acked: u64,
    /// Acked lines the receiver reported as duplicates (resends that had
    /// been stored before).
    pub duplicates: u64,
    /// Lines sent again after a lost connection.
    pub resent: u64,
    /// Connections opened after the first.
    pub reconnects: u64,
    /// Receivers used, in order (a URL each time the feed moved).
    pub receivers: Vec<String>,
    /// Seconds from start to the last ack.
    pub seconds: f64,
    /// Ticks acked per second.
    pub rate: f64,
}

/// One symbol's state: its name and price walk.
struct Symbol {
    name: String,
    mid: f64,
}

/// Generates ticks: realistic shapes, not a market model.
struct Ticks {
    symbols: Vec<Symbol>,
    feed_id: String,
    next: u64,
}

impl Ticks {
    fn new(n: usize, feed_id: String) -> Self {
        let symbols =
            (0..n.max(1)).map(|i| Symbol { name: symbol_name(i), mid: 10.0 + fastrand::f64() * 490.0 }).collect();
        Ticks { symbols, feed_id, next: 1 }
    }

    /// The next tick as a feed line.
    fn line(&mut self) -> (u64, Bytes) {
        let n = self.next;
        self.next += 1;
        let i = fastrand::usize(..self.symbols.len());
        let s = &mut self.symbols[i];
        // A small random step, at most 5 basis points.
        s.mid = (s.mid * (1.0 + (fastrand::f64() - 0.5) * 0.001)).max(0.01);
        let half_spread = (s.mid * 0.0001).max(0.005);
        let (bid, ask) = (round2(s.mid - half_spread), round2(s.mid + half_spread));
        let last = round2(bid + (ask - bid) * fastrand::f64());
        let size = 100 * fastrand::u64(1..=50);
        let time = now_rfc3339();
        let line = format!(
            "{{\"symbol\":\"{sym}\",\"msg_id\":\"{id}-{n}\",\"payload\":{{\"symbol\":\"{sym}\",\"bid\":{bid:.2},\"ask\":{ask:.2},\"last\":{last:.2},\"size\":{size},\"exch_time\":\"{time}\",\"n\":{n}}}}}\n",
            sym = s.name,
            id = self.feed_id,
        );
        (n, Bytes::from(line))
    }
}

fn round2(x: f64) -> f64 {
    (x * 100.0).round() / 100.0
}

/// `AAA`, `AAB`, … (3 letters; 4 past 17,576 symbols).
fn symbol_name(i: usize) -> String {
    let letters = if i < 26 * 26 * 26 { 3 } else { 4 };
    let mut name = vec![b'A'; letters];
    let mut rest = i;
    for slot in name.iter_mut().rev() {
        *slot = b'A' + (rest % 26) as u8;
        rest /= 26;
    }
    String::from_utf8(name).expect("ASCII")
}

fn now_rfc3339() -> String {
    time::OffsetDateTime::now_utc().format(&time::format_description::well_known::Rfc3339).unwrap_or_default()
}

/// Why a connection ended.
enum Lost {
    /// Everything was generated, sent and acked; the receiver said `end`.
    Done,
    /// Try the next receiver.
    Next(String),
}

/// The feed's state across connections.
struct Feeder {
    http: reqwest::Client,
    token: Option<String>,
    receivers: Vec<String>,
    stream: String,
    ticks: Ticks,
    /// Generated, not yet acked: (n, line), in n order.
    unacked: VecDeque<(u64, Bytes)>,
    /// Last n generated or to generate.
    count: Option<u64>,
    deadline: Option<Instant>,
    rate: f64,
    burst: Option<(Duration, u64)>,
    started: Instant,
    /// Set by Ctrl-C: stop generating, finish what was generated.
    interrupted: std::sync::Arc<std::sync::atomic::AtomicBool>,
    report: Report,
}

impl Feeder {
    fn generating(&self) -> bool {
        let generated = self.ticks.next - 1;
        !self.interrupted.load(std::sync::atomic::Ordering::Relaxed)
            && self.count.is_none_or(|c| generated < c)
            && self.deadline.is_none_or(|d| Instant::now() < d)
    }

    /// Ticks that are due now and not generated yet.
    fn due(&mut self) -> u64 {
        let elapsed = self.started.elapsed();
        let mut due = (elapsed.as_secs_f64() * self.rate) as u64;
        if let Some((every, size)) = self.burst {
            let bursts = (elapsed.as_millis() / every.as_millis().max(1)) as u64;
            due += bursts * size;
        }
        let generated = self.ticks.next - 1;
        let mut n = due.saturating_sub(generated);
        if let Some(c) = self.count {
            n = n.min(c.saturating_sub(generated));
        }
        n
    }

    /// Drop acked ticks up to `last` (the n of the ack's last id).
    fn acked(&mut self, last: u64) {
        while self.unacked.front().is_some_and(|(n, _)| *n <= last) {
            self.unacked.pop_front();
        }
    }

    /// One connection to `url`: resend the unacked queue, then stream new
    /// ticks, until it ends.
    async fn connection(&mut self, url: &str) -> Lost {
        let (tx, rx) = mpsc::unbounded_channel::<Result<Bytes, std::io::Error>>();
        let body = reqwest::Body::wrap_stream(futures::stream::unfold(rx, |mut rx| async move {
            rx.recv().await.map(|item| (item, rx))
        }));
        let target = format!("{}/v1/streams/{}/feed", url.trim_end_matches('/'), self.stream);
        let mut request = self.http.post(&target).header("content-type", "application/x-ndjson").body(body);
        if let Some(token) = &self.token {
            request = request.bearer_auth(token);
        }
        // Queue the resend before the head comes back: the receiver reads
        // the body as soon as it answers.
        for (_, line) in &self.unacked {
            let _ = tx.send(Ok(line.clone()));
            self.report.sent += 1;
            self.report.resent += 1;
        }
        let response = match request.send().await {
            Ok(r) => r,
            Err(e) => return Lost::Next(format!("cannot reach {url}: {e}")),
        };
        if !response.status().is_success() {
            let status = response.status();
            let body = response.text().await.unwrap_or_default();
            return Lost::Next(format!("{url} answered {status}: {body}"));
        }
        let mut tx = Some(tx);
        let mut answers = response.bytes_stream();
        let mut buf: Vec<u8> = Vec::new();
        let mut pace = tokio::time::interval(Duration::from_millis(1));
        pace.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
        loop {
            tokio::select! {
                chunk = answers.next() => {
                    let chunk = match chunk {
                        Some(Ok(chunk)) => chunk,
                        Some(Err(e)) => return Lost::Next(format!("the connection to {url} broke: {e}")),
                        None => return Lost::Next(format!("{url} ended the feed without `end`")),
                    };
                    buf.extend_from_slice(&chunk);
                    while let Some(at) = buf.iter().position(|b| *b == b'\n') {
                        let line: Vec<u8> = buf.drain(..=at).collect();
                        match self.answer(&line) {
                            Ok(None) => {}
                            Ok(Some(lost)) => return lost,
                            Err(e) => return Lost::Next(format!("{url}: {e:#}")),
                        }
                    }
                }
                _ = pace.tick(), if tx.is_some() => {
                    let n = if self.generating() { self.due() } else { 0 };
                    for _ in 0..n {
                        let (n, line) = self.ticks.line();
                        self.unacked.push_back((n, line.clone()));
                        self.report.sent += 1;
                        if let Some(t) = &tx { let _ = t.send(Ok(line)); }
                    }
                    if !self.generating() {
                        // Everything is generated: end the body; the receiver
                        // publishes the rest and says `end`.
                        tx = None;
                    }
                }
            }
        }
    }

    /// Handle one answer line: `Some` when the connection is over.
    fn answer(&mut self, line: &[u8]) -> anyhow::Result<Option<Lost>> {
        let answer: serde_json::Value = serde_json::from_slice(line).context("an answer that is not JSON")?;
        match answer["event"].as_str() {
            Some("ack") => {
                let last = answer["last_msg_id"].as_str().and_then(|id| id.rsplit('-').next()?.parse().ok());
                let Some(last) = last else { bail!("an ack without a last_msg_id of this feed: {answer}") };
                self.report.acked += answer["count"].as_u64().unwrap_or(0);
                self.report.duplicates += answer["duplicates"].as_u64().unwrap_or(0);
                self.acked(last);
                Ok(None)
            }
            Some("end") if self.unacked.is_empty() && !self.generating() => Ok(Some(Lost::Done)),
            Some("end") => Ok(Some(Lost::Next("the receiver ended the feed early".to_owned()))),
            Some("reconnect") => Ok(Some(Lost::Next("the receiver drains".to_owned()))),
            Some("error") => {
                let p = &answer["problem"];
                let status = p["status"].as_u64().unwrap_or(0);
                // The upload limit, an engine outage, a timeout: try again
                // elsewhere; anything else is a bad line, which resending repeats.
                if matches!(status, 413 | 500..=599) && p["line"].is_null() {
                    Ok(Some(Lost::Next(format!("the receiver ended the feed: {}", p["detail"]))))
                } else {
                    bail!("the receiver refused a line: {}", p["detail"])
                }
            }
            _ => bail!("an unknown answer: {answer}"),
        }
    }
}

/// Create `stream` on `md.>` if it does not exist, on the first receiver
/// that answers.
async fn ensure_stream(feeder: &Feeder, window_ms: u64) -> anyhow::Result<()> {
    let mut last_error = None;
    for url in &feeder.receivers {
        let target = format!("{}/v1/streams/{}", url.trim_end_matches('/'), feeder.stream);
        let auth = |r: reqwest::RequestBuilder| match &feeder.token {
            Some(t) => r.bearer_auth(t),
            None => r,
        };
        let res = match auth(feeder.http.get(&target)).send().await {
            Ok(r) => r,
            Err(e) => {
                last_error = Some(anyhow::anyhow!("cannot reach {url}: {e}"));
                continue;
            }
        };
        if res.status().is_success() {
            return Ok(());
        }
        if res.status() != reqwest::StatusCode::NOT_FOUND {
            bail!("{target} answered {}: {}", res.status(), res.text().await.unwrap_or_default());
        }
        let config = serde_json::json!({"subjects": ["md.>"], "duplicate_window": window_ms});
        let res = auth(feeder.http.put(&target)).json(&config).send().await.context("creating the stream")?;
        if !res.status().is_success() {
            bail!("creating {target} answered {}: {}", res.status(), res.text().await.unwrap_or_default());
        }
        return Ok(());
    }
    Err(last_error.unwrap_or_else(|| anyhow::anyhow!("no receiver")))
}

/// Run `finmesh feed`.
pub async fn run(client: &ClientArgs, args: &FeedArgs) -> anyhow::Result<()> {
    if !(args.rate > 0.0 && args.rate.is_finite()) {
        bail!("--rate must be a positive number of ticks per second");
    }
    let mut builder = reqwest::Client::builder().user_agent(concat!("finmesh-feed/", env!("CARGO_PKG_VERSION")));
    if let Some(path) = &client.ca_cert {
        let pem = std::fs::read(path).with_context(|| format!("reading {}", path.display()))?;
        builder = builder.add_root_certificate(reqwest::Certificate::from_pem(&pem)?);
    }
    let receivers: Vec<String> =
        std::iter::once(client.server.clone()).chain(args.failover.iter().cloned()).filter(|u| !u.is_empty()).collect();
    let feed_id = args.feed_id.clone().unwrap_or_else(|| format!("feed{:08x}", fastrand::u32(..)));
    if feed_id.is_empty() || feed_id.contains(char::is_whitespace) {
        bail!("--feed-id must be non-empty without whitespace");
    }
    let mut feeder = Feeder {
        http: builder.build().context("building the HTTP client")?,
        token: client.token.clone().filter(|t| !t.is_empty()),
        receivers,
        stream: args.stream.clone(),
        ticks: Ticks::new(args.symbols, feed_id),
        unacked: VecDeque::new(),
        count: args.count,
        deadline: args.duration.map(|s| Instant::now() + Duration::from_secs_f64(s)),
        rate: args.rate,
        burst: args.burst_every_ms.map(|ms| (Duration::from_millis(ms.max(1)), args.burst_size)),
        started: Instant::now(),
        interrupted: Default::default(),
        report: Report::default(),
    };
    // Ctrl-C stops generating; what was generated is still sent and acked
    // and the report printed. A second Ctrl-C ends the process at once.
    let interrupted = feeder.interrupted.clone();
    tokio::spawn(async move {
        if tokio::signal::ctrl_c().await.is_ok() {
            interrupted.store(true, std::sync::atomic::Ordering::Relaxed);
            if tokio::signal::ctrl_c().await.is_ok() {
                std::process::exit(130);
            }
        }
    });
    ensure_stream(&feeder, args.duplicate_window_ms).await?;
    feeder.started = Instant::now();
    let give_up = Duration::from_millis(args.give_up_ms);
    let mut at = 0;
    let mut failing_since: Option<Instant> = None;
    let mut failures_in_a_row = 0u32;
    loop {
        let url = feeder.receivers[at].clone();
        feeder.report.receivers.push(url.clone());
        let acked_before = feeder.report.acked;
        match feeder.connection(&url).await {
            Lost::Done => break,
            Lost::Next(why) => {
                tracing::warn!(receiver = %url, "{why}");
                if !client.json {
                    eprintln!("feed: {why}; moving on");
                }
                if feeder.report.acked > acked_before {
                    failing_since = None;
                    failures_in_a_row = 0;
                }
                let since = *failing_since.get_or_insert_with(Instant::now);
                if since.elapsed() > give_up {
                    bail!("no receiver took the feed for {} ms; last: {why}", give_up.as_millis());
                }
                failures_in_a_row += 1;
                at = (at + 1) % feeder.receivers.len();
                feeder.report.reconnects += 1;
                // Back off once every receiver failed in a row.
                if failures_in_a_row as usize >= feeder.receivers.len() {
                    let exp = (failures_in_a_row as usize / feeder.receivers.len()).min(5) as u32;
                    tokio::time::sleep(Duration::from_millis(50 * 2u64.pow(exp))).await;
                }
            }
        }
    }
    let r = &mut feeder.report;
    r.ticks = feeder.ticks.next - 1;
    r.seconds = feeder.started.elapsed().as_secs_f64();
    r.rate = if r.seconds > 0.0 { r.ticks as f64 / r.seconds } else { 0.0 };
    if client.json {
        println!("{}", serde_json::to_string(&r)?);
    } else {
        println!(
            "ticks {}  sent {}  acked {}  duplicates {}  resent {}  reconnects {}  {:.1} s  {:.0} ticks/s",
            r.ticks, r.sent, r.acked, r.duplicates, r.resent, r.reconnects, r.seconds, r.rate
        );
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn symbols_are_distinct_tickers() {
        assert_eq!(symbol_name(0), "AAA");
        assert_eq!(symbol_name(27), "ABB");
        let names: std::collections::HashSet<_> = (0..20_000).map(symbol_name).collect();
        assert_eq!(names.len(), 20_000);
    }

    #[test]
    fn ticks_are_feed_lines_with_a_sane_quote() {
        let mut t = Ticks::new(5, "f".into());
        for want in 1..=200 {
            let (n, line) = t.line();
            assert_eq!(n, want);
            let v: serde_json::Value = serde_json::from_slice(&line).unwrap();
            assert_eq!(v["msg_id"], format!("f-{n}"));
            let p = &v["payload"];
            let (bid, ask, last) =
                (p["bid"].as_f64().unwrap(), p["ask"].as_f64().unwrap(), p["last"].as_f64().unwrap());
            assert!(bid < ask && bid <= last && last <= ask, "{p}");
            assert_eq!(p["symbol"], v["symbol"]);
            assert!(line.ends_with(b"\n") && !line[..line.len() - 1].contains(&b'\n'));
        }
    }
}
