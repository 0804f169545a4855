//! The audit's report: the verdict per subscriber, latency and skew,
//! printed as a table or as JSON (`--json`, the same fields).

use std::collections::HashMap;

use finmesh_client::Transport;
use serde::Serialize;

use super::check::{self, Percentiles, Verdict};
use super::feed::Api;
use super::node::Restart;
use super::{AuditArgs, Log, SubscriberSpec};

/// The whole report (`--json` prints it as is).
#[derive(Debug, Serialize)]
pub(super) struct Report {
    pub(super) ok: bool,
    pub(super) node: NodeReport,
    pub(super) stream: String,
    pub(super) first_seq: u64,
    pub(super) last_seq: u64,
    pub(super) published: u64,
    /// Acked publishes whose sequence the stream does not hold (lost after
    /// the ack: retention, a crash). Must be 0.
    pub(super) acked_not_stored: u64,
    pub(super) forced_reconnect: bool,
    pub(super) restart: Restart,
    pub(super) subscribers: Vec<SubscriberReport>,
    pub(super) latency_us: Percentiles,
    pub(super) skew_us: Percentiles,
}

#[derive(Debug, Serialize)]
pub(super) struct NodeReport {
    pub(super) url: String,
    /// `embedded` or `nats` (started by the audit), `target` (--server).
    pub(super) engine: &'static str,
}

#[derive(Debug, Serialize)]
pub(super) struct SubscriberReport {
    pub(super) id: usize,
    pub(super) transport: &'static str,
    pub(super) filter: Option<String>,
    pub(super) ok: bool,
    #[serde(flatten)]
    pub(super) verdict: Verdict,
    /// Gaps, rewinds and resets the SDK reported to the subscriber (a gap
    /// fails the subscriber even when the stream no longer holds what it
    /// covers: it was published and not delivered).
    pub(super) gaps_reported: u64,
    pub(super) rewinds_reported: u64,
    pub(super) resets_reported: u64,
    pub(super) connections: u64,
    pub(super) forced_reconnects: u64,
}

#[allow(clippy::too_many_arguments)]
pub(super) fn report(
    args: &AuditArgs,
    api: &Api,
    engine: &'static str,
    specs: &[SubscriberSpec],
    logs: &[Log],
    expected: &HashMap<Option<String>, Vec<u64>>,
    sent: &[(u64, u64)],
    (first_seq, last_seq): (u64, u64),
    restart: Restart,
) -> Report {
    let sent_at: HashMap<u64, u64> = sent.iter().copied().collect();
    let mut latencies = Vec::new();
    let mut receipts: HashMap<u64, Vec<u64>> = HashMap::new();
    let mut subscribers = Vec::new();
    for (spec, log) in specs.iter().zip(logs) {
        let seqs: Vec<u64> = log.received.iter().map(|(s, _)| *s).collect();
        let verdict = check::verify(&expected[&spec.filter], &seqs);
        let mut first_receipt = std::collections::HashSet::new();
        for &(seq, at) in &log.received {
            if let Some(send) = sent_at.get(&seq) {
                latencies.push(at.saturating_sub(*send));
            }
            if first_receipt.insert(seq) {
                receipts.entry(seq).or_default().push(at);
            }
        }
        subscribers.push(SubscriberReport {
            id: spec.id,
            transport: match spec.transport {
                Transport::WebSocket => "ws",
                _ => "sse",
            },
            filter: spec.filter.clone(),
            ok: verdict.ok() && log.stats.gaps == 0,
            verdict,
            gaps_reported: log.stats.gaps,
            rewinds_reported: log.stats.rewinds,
            resets_reported: log.stats.resets,
            connections: log.stats.connections,
            forced_reconnects: log.forced_reconnects,
        });
    }
    let stored: std::collections::HashSet<u64> = expected[&None].iter().copied().collect();
    let acked_not_stored = sent.iter().filter(|(seq, _)| !stored.contains(seq)).count() as u64;
    Report {
        ok: acked_not_stored == 0 && subscribers.iter().all(|s| s.ok),
        acked_not_stored,
        node: NodeReport { url: api.base.clone(), engine },
        stream: args.stream.clone(),
        first_seq,
        last_seq,
        published: sent.len() as u64,
        forced_reconnect: !args.no_reconnect,
        restart,
        subscribers,
        latency_us: Percentiles::of(latencies),
        skew_us: Percentiles::of(check::skews(receipts.into_values())),
    }
}

pub(super) fn print_human(r: &Report) {
    println!("loss audit of stream {} on {} ({})", r.stream, r.node.url, r.node.engine);
    println!(
        "published {} messages (seq {}..={}, {} acked but not stored); forced reconnect: {}; node restart: {}",
        r.published,
        r.first_seq,
        r.last_seq,
        r.acked_not_stored,
        r.forced_reconnect,
        serde_json::to_value(r.restart).ok().and_then(|v| v.as_str().map(str::to_owned)).unwrap_or_default()
    );
    println!(
        "{:>3}  {:<4} {:<12} {:>9} {:>9} {:>8} {:>5} {:>8} {:>10} {:>5} {:>6}",
        "sub", "wire", "filter", "expected", "received", "missing", "dup", "reorder", "unexpected", "gaps", "conns"
    );
    for s in &r.subscribers {
        let v = &s.verdict;
        println!(
            "{:>3}  {:<4} {:<12} {:>9} {:>9} {:>8} {:>5} {:>8} {:>10} {:>5} {:>6}{}",
            s.id,
            s.transport,
            s.filter.as_deref().unwrap_or("-"),
            v.expected,
            v.received,
            v.missing,
            v.duplicates,
            v.out_of_order,
            v.unexpected,
            s.gaps_reported,
            s.connections,
            if v.first_missing.is_empty() { String::new() } else { format!("  missing: {:?}", v.first_missing) }
        );
    }
    let (l, k) = (&r.latency_us, &r.skew_us);
    println!(
        "delivery latency (publish send -> receive, {} deliveries): p50 {} p99 {} p999 {} max {}",
        l.count,
        ms(l.p50),
        ms(l.p99),
        ms(l.p999),
        ms(l.max)
    );
    println!(
        "skew (last - first subscriber, {} messages): p50 {} p99 {} max {}",
        k.count,
        ms(k.p50),
        ms(k.p99),
        ms(k.max)
    );
    println!(
        "{}",
        if r.ok { "LOSSLESS: every subscriber got every sequence exactly once, in order" } else { "LOSS DETECTED" }
    );
}

fn ms(us: u64) -> String {
    format!("{:.3} ms", us as f64 / 1000.0)
}
