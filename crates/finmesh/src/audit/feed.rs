//! The audit's side of the node's HTTP API: create the stream, publish
//! the feed through the batch publish route (NDJSON with message ids),
//! read the stream's head and its contents back.
//!
//! Invariant: a batch is resent, with the same message ids, until the node
//! acks it (the node may be restarting), so the stream's deduplication
//! stores each message once and every acked sequence is recorded once,
//! with the time of the batch's first send.

use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use serde_json::json;
use tokio::sync::watch;

use super::AuditArgs;
use crate::client::segment;

/// The feed's shape.
pub(super) struct FeedPlan {
    pub(super) stream: String,
    pub(super) messages: u64,
    pub(super) symbols: u64,
    pub(super) rate: u64,
    pub(super) batch: u64,
}

impl From<&AuditArgs> for FeedPlan {
    fn from(a: &AuditArgs) -> Self {
        FeedPlan { stream: a.stream.clone(), messages: a.messages, symbols: a.symbols, rate: a.rate, batch: a.batch }
    }
}

/// Publish the feed; returns each stored sequence with the time its batch
/// was first sent (microseconds on the audit's clock). A failed batch is
/// sent again with the same message ids until it is acked, so the node's
/// deduplication keeps a resend from being stored twice.
pub(super) async fn feed(
    api: Api,
    plan: FeedPlan,
    clock: Instant,
    progress: watch::Sender<u64>,
) -> anyhow::Result<Vec<(u64, u64)>> {
    let run = fastrand::u64(..);
    let per_batch = Duration::from_secs_f64(plan.batch as f64 / plan.rate as f64);
    let mut ticker = tokio::time::interval(per_batch);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut sent = Vec::with_capacity(plan.messages as usize);
    let mut next = 0;
    while next < plan.messages {
        ticker.tick().await;
        let end = (next + plan.batch).min(plan.messages);
        let body: String = (next..end)
            .map(|i| {
                let symbol = i % plan.symbols;
                let price = 100.0 + (i % 97) as f64 / 100.0;
                let tick = json!({"sym": format!("S{symbol}"), "bid": price, "ask": price + 0.01, "i": i});
                let line = json!({"subject": format!("md.S{symbol}"), "msg_id": format!("audit-{run:x}-{i}"), "payload": tick});
                format!("{line}\n")
            })
            .collect();
        let first_send = clock.elapsed().as_micros() as u64;
        let acks = api.publish(&plan.stream, body).await?;
        sent.extend(acks.into_iter().map(|seq| (seq, first_send)));
        next = end;
        progress.send_replace(next);
    }
    Ok(sent)
}

/// The node's HTTP API, as the audit uses it.
#[derive(Clone)]
pub(super) struct Api {
    pub(super) http: reqwest::Client,
    pub(super) base: String,
    pub(super) token: Option<String>,
}

impl Api {
    pub(super) fn request(&self, method: reqwest::Method, path: &str) -> reqwest::RequestBuilder {
        let request = self.http.request(method, format!("{}{path}", self.base));
        match &self.token {
            Some(token) => request.bearer_auth(token),
            None => request,
        }
    }

    pub(super) async fn ensure_stream(&self, stream: &str) -> anyhow::Result<()> {
        let path = format!("/v1/streams/{}", segment(stream));
        let response = self.request(reqwest::Method::GET, &path).send().await.context("reaching the node")?;
        match response.status().as_u16() {
            200 => return Ok(()),
            404 => {}
            status => bail!("reading stream {stream}: HTTP {status}: {}", response.text().await.unwrap_or_default()),
        }
        let response = self.request(reqwest::Method::PUT, &path).json(&json!({"subjects": ["md.>"]})).send().await?;
        if !response.status().is_success() {
            bail!("creating stream {stream}: HTTP {}: {}", response.status().as_u16(), response.text().await?);
        }
        Ok(())
    }

    pub(super) async fn last_seq(&self, stream: &str) -> anyhow::Result<u64> {
        let path = format!("/v1/streams/{}", segment(stream));
        let response = self.request(reqwest::Method::GET, &path).send().await.context("reaching the node")?;
        if !response.status().is_success() {
            bail!("reading stream {stream}: HTTP {}", response.status().as_u16());
        }
        let info: serde_json::Value = response.json().await?;
        info["state"]["last_seq"].as_u64().context("the stream info has no state.last_seq")
    }

    /// Publish one NDJSON batch, retrying (the node may be restarting)
    /// for up to a minute; returns the acked sequences in order.
    pub(super) async fn publish(&self, stream: &str, body: String) -> anyhow::Result<Vec<u64>> {
        let path = format!("/v1/streams/{}/messages", segment(stream));
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            let attempt = self
                .request(reqwest::Method::POST, &path)
                .header("content-type", "application/x-ndjson")
                .body(body.clone())
                .send()
                .await;
            let why = match attempt {
                Ok(r) if r.status().is_success() => {
                    let acks: serde_json::Value = r.json().await.context("the publish answer")?;
                    let acks = acks["acks"].as_array().context("the publish answer has no acks")?;
                    return acks.iter().map(|a| a["seq"].as_u64().context("an ack without seq")).collect();
                }
                Ok(r) if r.status().is_server_error() || r.status() == 429 => format!("HTTP {}", r.status().as_u16()),
                Ok(r) => bail!("publishing: HTTP {}: {}", r.status().as_u16(), r.text().await.unwrap_or_default()),
                Err(e) => e.to_string(),
            };
            if Instant::now() > deadline {
                bail!("publishing failed for a minute: {why}");
            }
            tracing::debug!("publish failed ({why}); sending the batch again");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// The sequences `first..=last` of `stream` matching `filter`.
    pub(super) async fn seqs(
        &self,
        stream: &str,
        filter: Option<&str>,
        first: u64,
        last: u64,
    ) -> anyhow::Result<Vec<u64>> {
        let path = format!("/v1/streams/{}/messages", segment(stream));
        let mut seqs = Vec::new();
        let mut from = first;
        while from <= last {
            let mut query = vec![("from_seq", from.to_string()), ("limit", "10000".to_owned())];
            if let Some(f) = filter {
                query.push(("subject", f.to_owned()));
            }
            let response = self.request(reqwest::Method::GET, &path).query(&query).send().await?;
            if !response.status().is_success() {
                bail!("reading stream {stream}: HTTP {}", response.status().as_u16());
            }
            let body = response.text().await?;
            let mut page_last = None;
            for line in body.lines().filter(|l| !l.is_empty()) {
                let envelope: serde_json::Value = serde_json::from_str(line).context("a stored envelope")?;
                let seq = envelope["seq"].as_u64().context("an envelope without seq")?;
                page_last = Some(seq);
                if seq <= last {
                    seqs.push(seq);
                }
            }
            match page_last {
                Some(seq) => from = seq + 1,
                None => break,
            }
        }
        Ok(seqs)
    }
}
