//! Durable consumers: JetStream durable pull consumers with explicit acks.
//!
//! Mapping of [`ConsumerConfig`]: `name` → `durable_name`, `filter` →
//! `filter_subject`, `deliver` → `deliver_policy` (+ `opt_start_seq` /
//! `opt_start_time`), `ack_wait`, `max_ack_pending` one to one. The state
//! (delivered, ack floor, pending, redelivery counts) lives in the server, so
//! it survives engine and server restarts.
//!
//! Ack tokens are the deliveries' JetStream ack subjects
//! (`$JS.ACK.<stream>.<consumer>.…`); an ack is a request to that subject
//! (`+ACK`, `-NAK {"delay":…}`, `+TERM`, `+WPI`) that waits for the server's
//! confirmation, so the next fetch sees its effect.
//!
//! Batch acks: [`ack_many`](Inner::ack_many) checks every token, then
//! sends the per-token acks concurrently ([`ACK_CONCURRENCY`] in flight),
//! each waiting for its confirmation as a single ack does.
//! [`ack_all`](Inner::ack_all) is JetStream's AckAll on an explicit-ack
//! consumer, which the server has no verb for: it reads the messages the
//! consumer's filter matches between its ack floor and `min(upto,
//! delivered)`, page by page, and acks each one on the ack subject the
//! server would have given it (`$JS.ACK.<stream>.<consumer>.1.<seq>.0.0.0`;
//! an explicit ack is keyed by stream sequence, and a delivery sequence of
//! 0 never moves the ack floor by itself). Acking one that is not pending
//! is a no-op on the server. Those acks are published without waiting; a
//! final `+WPI` request on the page's last (now acked) sequence, which the
//! server always answers and processes after them, confirms the page. Each
//! page restarts at the new ack floor, so acked stretches are skipped.
//!
//! Listing: `CONSUMER.LIST` answers at most 256 consumers per request, so
//! [`list_consumers`](Inner::list_consumers) pages with `offset` until it
//! has `total`. It returns only durable consumers (`durable_name` set):
//! the ephemeral consumers that tails and watches follow (see `tail.rs`;
//! server-named, `inactive_threshold` set) are an implementation detail,
//! as are other clients' ephemeral consumers. A consumer created or
//! deleted while the pages are read may be missed or listed, as with any
//! list that is not a snapshot.
//!
//! Dead-lettering: NATS stops redelivering after `max_deliver` but moves
//! nothing. Without a dead-letter stream the consumer gets NATS's own
//! `max_deliver` and nothing more is needed. With one, the server's
//! `max_deliver` is unlimited and the engine enforces the limit: a delivery
//! whose count exceeds `max_deliver` is never returned by `fetch`; the
//! engine publishes a copy to the dead-letter stream (subject
//! `dlq.<stream>.<consumer>`, the `Finmesh-Dlq-*` headers, message id
//! `dlq.<stream>.<consumer>.<seq>` as on the embedded engine
//! ([`dead_letter_msg_id`]), so a retry after a crash is stored once),
//! then terminates it. If the engine dies in between, the server redelivers
//! it and the next fetch finishes the job. The limit and the dead-letter
//! stream are kept in the consumer's metadata (`finmesh.max_deliver`,
//! `finmesh.dead_letter`).

use async_nats::jetstream::consumer::{DeliverPolicy as NatsDeliver, Info};
use finmesh_core::config::{dead_letter_headers as dlq, dead_letter_msg_id, dead_letter_subject};
use finmesh_core::{
    AckKind, AckToken, ConsumerConfig, ConsumerInfo, ConsumerName, DeliverPolicy, Delivery, Error, ErrorKind,
    FetchRequest, OutgoingMessage, ReadRequest, Result, Seq, StreamConfig, StreamName, SubjectPattern,
};
use futures::StreamExt;
use serde_json::{Value, json};

use crate::Inner;
use crate::api::{self, PullEnd, Pulled};
use crate::streams::{nanos, rfc3339};

/// Acks of one [`Inner::ack_many`] in flight at once.
const ACK_CONCURRENCY: usize = 64;
/// Messages one step of [`Inner::ack_all`] reads and acks.
const ACK_ALL_PAGE: usize = 1000;

const META_MAX_DELIVER: &str = "finmesh.max_deliver";
const META_DEAD_LETTER: &str = "finmesh.dead_letter";

fn nats_config(c: &ConsumerConfig) -> Result<Value> {
    let mut v = json!({
        "durable_name": c.name.as_str(),
        "ack_policy": "explicit",
        "ack_wait": nanos(c.ack_wait),
        "max_ack_pending": c.max_ack_pending,
        "max_waiting": 512,
    });
    match c.deliver {
        DeliverPolicy::All => v["deliver_policy"] = json!("all"),
        DeliverPolicy::New => v["deliver_policy"] = json!("new"),
        DeliverPolicy::FromSeq { seq } => {
            v["deliver_policy"] = json!("by_start_sequence");
            v["opt_start_seq"] = json!(seq.0);
        }
        DeliverPolicy::FromTime { time } => {
            v["deliver_policy"] = json!("by_start_time");
            v["opt_start_time"] = json!(rfc3339(time)?);
        }
        DeliverPolicy::LastPerSubject => v["deliver_policy"] = json!("last_per_subject"),
    }
    match (&c.filter, c.deliver) {
        (Some(f), _) => v["filter_subject"] = json!(f.as_str()),
        (None, DeliverPolicy::LastPerSubject) => v["filter_subject"] = json!(">"),
        _ => {}
    }
    match (&c.dead_letter, c.max_deliver) {
        (Some(d), Some(n)) => {
            v["max_deliver"] = json!(-1);
            v["metadata"] = json!({ META_MAX_DELIVER: n.to_string(), META_DEAD_LETTER: d.as_str() });
        }
        (_, n) => v["max_deliver"] = json!(n.map_or(-1, i64::from)),
    }
    Ok(v)
}

fn consumer_info(stream: &StreamName, i: &Info) -> Result<ConsumerInfo> {
    let c = &i.config;
    let name = c.durable_name.clone().or_else(|| c.name.clone()).unwrap_or_default();
    let filter = match c.filter_subject.as_str() {
        "" => None,
        ">" if c.deliver_policy == NatsDeliver::LastPerSubject => None,
        f => Some(SubjectPattern::new(f)?),
    };
    let deliver = match c.deliver_policy {
        NatsDeliver::All => DeliverPolicy::All,
        NatsDeliver::New => DeliverPolicy::New,
        NatsDeliver::Last => DeliverPolicy::LastPerSubject,
        NatsDeliver::LastPerSubject => DeliverPolicy::LastPerSubject,
        NatsDeliver::ByStartSequence { start_sequence } => DeliverPolicy::FromSeq { seq: Seq(start_sequence) },
        NatsDeliver::ByStartTime { start_time } => DeliverPolicy::FromTime { time: api::ts(start_time) },
    };
    let dead_letter = c.metadata.get(META_DEAD_LETTER).map(|d| StreamName::new(d.as_str())).transpose()?;
    let max_deliver = match c.metadata.get(META_MAX_DELIVER) {
        Some(n) => n.parse().ok(),
        None => (c.max_deliver > 0).then_some(c.max_deliver as u32),
    };
    let config = ConsumerConfig {
        name: ConsumerName::new(name)?,
        filter,
        deliver,
        ack_wait: c.ack_wait,
        max_deliver,
        max_ack_pending: c.max_ack_pending.max(0) as u32,
        dead_letter,
    };
    Ok(ConsumerInfo {
        stream: stream.clone(),
        config,
        delivered: Seq(i.delivered.stream_sequence),
        ack_floor: Seq(i.ack_floor.stream_sequence),
        num_pending: i.num_pending,
        num_ack_pending: i.num_ack_pending as u64,
        num_redelivered: i.num_redelivered as u64,
    })
}

impl Inner {
    async fn raw_consumer(&self, stream: &StreamName, c: &ConsumerName) -> Result<Info> {
        self.stream_meta(stream).await?;
        self.request(&format!("CONSUMER.INFO.{stream}.{c}"), &json!({}), &format!("consumer `{c}` of `{stream}`")).await
    }

    pub(crate) async fn consumer_info(&self, stream: &StreamName, c: &ConsumerName) -> Result<ConsumerInfo> {
        consumer_info(stream, &self.raw_consumer(stream, c).await?)
    }

    pub(crate) async fn create_consumer(&self, stream: &StreamName, config: ConsumerConfig) -> Result<ConsumerInfo> {
        config.validate()?;
        self.stream_meta(stream).await?;
        let exists = |info: ConsumerInfo| {
            if info.config == config {
                Ok(info)
            } else {
                Err(Error::new(
                    ErrorKind::AlreadyExists,
                    format!("consumer `{}` exists with another configuration", config.name),
                ))
            }
        };
        match self.consumer_info(stream, &config.name).await {
            Ok(info) => return exists(info),
            Err(e) if e.kind() == ErrorKind::NotFound => {}
            Err(e) => return Err(e),
        }
        let body = json!({ "stream_name": stream.as_str(), "config": nats_config(&config)?, "action": "create" });
        let what = format!("create consumer `{}` on `{stream}`", config.name);
        match self.request::<Info>(&format!("CONSUMER.CREATE.{stream}.{}", config.name), &body, &what).await {
            Ok(i) => consumer_info(stream, &i),
            // Lost a race with another creator: same config is fine.
            Err(e) if e.kind() == ErrorKind::AlreadyExists => exists(self.consumer_info(stream, &config.name).await?),
            Err(e) => Err(e),
        }
    }

    pub(crate) async fn update_consumer(&self, stream: &StreamName, config: ConsumerConfig) -> Result<ConsumerInfo> {
        config.validate()?;
        let current = self.consumer_info(stream, &config.name).await?;
        if current.config.filter != config.filter || current.config.deliver != config.deliver {
            return Err(Error::invalid(format!("consumer `{}`: filter and deliver policy cannot change", config.name)));
        }
        let body = json!({ "stream_name": stream.as_str(), "config": nats_config(&config)?, "action": "update" });
        let what = format!("update consumer `{}` on `{stream}`", config.name);
        let i: Info = self.request(&format!("CONSUMER.CREATE.{stream}.{}", config.name), &body, &what).await?;
        consumer_info(stream, &i)
    }

    /// Every durable consumer of `stream`, sorted (see the module doc).
    pub(crate) async fn list_consumers(&self, stream: &StreamName) -> Result<Vec<ConsumerName>> {
        self.stream_meta(stream).await?;
        #[derive(serde::Deserialize)]
        struct Page {
            #[serde(default)]
            total: usize,
            #[serde(default)]
            consumers: Option<Vec<Listed>>,
        }
        #[derive(serde::Deserialize)]
        struct Listed {
            config: ListedConfig,
        }
        #[derive(serde::Deserialize)]
        struct ListedConfig {
            #[serde(default)]
            durable_name: Option<String>,
        }
        let what = format!("consumers of `{stream}`");
        let mut names = Vec::new();
        let mut offset = 0;
        loop {
            let page: Page =
                self.request(&format!("CONSUMER.LIST.{stream}"), &json!({ "offset": offset }), &what).await?;
            let listed = page.consumers.unwrap_or_default();
            if listed.is_empty() {
                break;
            }
            offset += listed.len();
            names.extend(
                listed.into_iter().filter_map(|c| c.config.durable_name).filter_map(|n| ConsumerName::new(n).ok()),
            );
            if offset >= page.total {
                break;
            }
        }
        names.sort();
        names.dedup();
        Ok(names)
    }

    pub(crate) async fn delete_consumer(&self, stream: &StreamName, c: &ConsumerName) -> Result<()> {
        self.stream_meta(stream).await?;
        let _: Value = self
            .request(&format!("CONSUMER.DELETE.{stream}.{c}"), &json!({}), &format!("delete consumer `{c}`"))
            .await?;
        Ok(())
    }

    pub(crate) async fn fetch(
        &self,
        stream: &StreamName,
        c: &ConsumerName,
        req: FetchRequest,
    ) -> Result<Vec<Delivery>> {
        let info = self.consumer_info(stream, c).await?;
        let dead = match (&info.config.dead_letter, info.config.max_deliver) {
            (Some(d), Some(n)) => Some((d.clone(), n)),
            _ => None,
        };
        let deadline = tokio::time::Instant::now() + req.wait;
        // The server holds a pull that would pass max_ack_pending instead of
        // ending it, so never ask for more than there is room for (but at
        // least one: a due redelivery is already counted as pending).
        let room = (info.config.max_ack_pending as u64).saturating_sub(info.num_ack_pending).max(1);
        let max = req.max.max(1).min(room as usize);
        let mut out = Vec::new();
        loop {
            let mut pulled = Vec::new();
            // What is there now, then (if nothing) wait for one more.
            let mut end =
                api::pull(&self.client, &self.prefix, stream.as_str(), c.as_str(), max - out.len(), None, &mut pulled)
                    .await?;
            let now = tokio::time::Instant::now();
            if pulled.is_empty() && out.is_empty() && now < deadline && matches!(end, PullEnd::Done | PullEnd::Stalled)
            {
                end = api::pull(
                    &self.client,
                    &self.prefix,
                    stream.as_str(),
                    c.as_str(),
                    1,
                    Some(deadline - now),
                    &mut pulled,
                )
                .await?;
                if !pulled.is_empty() && max - out.len() > 1 {
                    end = api::pull(
                        &self.client,
                        &self.prefix,
                        stream.as_str(),
                        c.as_str(),
                        max - out.len() - 1,
                        None,
                        &mut pulled,
                    )
                    .await?;
                }
            }
            if matches!(end, PullEnd::Gone | PullEnd::Unrouted) && pulled.is_empty() && out.is_empty() {
                self.consumer_info(stream, c).await?;
            }
            let got_any = !pulled.is_empty();
            for p in pulled {
                match &dead {
                    Some((dlq, n)) if p.ack.delivered > *n => self.dead_letter(stream, c, dlq, p).await?,
                    _ => out.push(Delivery {
                        delivery_count: p.ack.delivered,
                        token: AckToken(p.reply),
                        message: p.message,
                    }),
                }
            }
            if !out.is_empty() || !got_any || tokio::time::Instant::now() >= deadline {
                return Ok(out);
            }
        }
    }

    /// Copy `p` to the dead-letter stream, then terminate it.
    async fn dead_letter(
        &self,
        stream: &StreamName,
        c: &ConsumerName,
        dlq_stream: &StreamName,
        p: Pulled,
    ) -> Result<()> {
        if let Err(e) = self.stream_meta(dlq_stream).await {
            if e.kind() != ErrorKind::NotFound {
                return Err(e);
            }
            let pattern = SubjectPattern::new(format!("dlq.{stream}.>"))?;
            match self.create_stream(StreamConfig::new(dlq_stream.clone(), vec![pattern])).await {
                Ok(_) => {}
                Err(e) if e.kind() == ErrorKind::AlreadyExists => {}
                Err(e) => return Err(e),
            }
        }
        let mut msg = OutgoingMessage {
            subject: dead_letter_subject(stream, c),
            headers: p.message.headers.clone(),
            payload: p.message.payload.clone(),
        };
        msg.headers.insert(dlq::STREAM, stream.as_str())?;
        msg.headers.insert(dlq::CONSUMER, c.as_str())?;
        msg.headers.insert(dlq::SEQ, p.message.seq.0.to_string())?;
        msg.headers.insert(dlq::SUBJECT, p.message.subject.as_str())?;
        msg.headers.insert(dlq::DELIVERIES, (p.ack.delivered - 1).to_string())?;
        msg.headers.insert(finmesh_core::message::MSG_ID_HEADER, dead_letter_msg_id(stream, c, p.message.seq))?;
        self.send_one(dlq_stream.as_str(), &msg).await?;
        self.ack_subject(&p.reply, "+TERM".into()).await
    }

    async fn ack_subject(&self, reply: &str, body: String) -> Result<()> {
        let req = async_nats::Request::new().payload(body.into()).timeout(Some(self.options.request_timeout));
        match self.client.send_request(reply.to_owned(), req).await {
            Ok(_) => Ok(()),
            Err(e) => Err(api::map_request_error(e, "ack")),
        }
    }

    /// Apply `kind` to every token (see the module doc).
    pub(crate) async fn ack_many(
        &self,
        stream: &StreamName,
        c: &ConsumerName,
        tokens: &[AckToken],
        kind: AckKind,
    ) -> Result<()> {
        for (i, token) in tokens.iter().enumerate() {
            let Some(info) = api::parse_ack_subject(&token.0) else {
                self.consumer_info(stream, c).await?;
                return Err(Error::invalid(format!("token {i} is not a delivery of this engine")));
            };
            if info.stream != stream.as_str() || info.consumer != c.as_str() {
                // As on the embedded engine, a missing consumer is NotFound first.
                self.consumer_info(stream, c).await?;
                return Err(Error::invalid(format!(
                    "token {i} belongs to consumer `{}` of `{}`",
                    info.consumer, info.stream
                )));
            }
        }
        let mut acks = futures::stream::iter(tokens.to_vec())
            .map(|t| async move { self.ack(stream, c, &t, kind).await })
            .buffer_unordered(ACK_CONCURRENCY);
        while let Some(r) = acks.next().await {
            r?;
        }
        Ok(())
    }

    /// Ack every pending delivery up to `upto` (see the module doc).
    pub(crate) async fn ack_all(&self, stream: &StreamName, c: &ConsumerName, upto: Seq) -> Result<()> {
        let mut from = Seq(1);
        loop {
            let info = self.consumer_info(stream, c).await?;
            let last = upto.min(info.delivered);
            let start = info.ack_floor.next().max(from);
            if info.num_ack_pending == 0 || start > last {
                return Ok(());
            }
            let request =
                ReadRequest { filter: info.config.filter.clone(), ..ReadRequest::from_seq(start, ACK_ALL_PAGE) };
            let msgs = self.read(stream, request.end(last)).await?;
            let Some(page_end) = msgs.last().map(|m| m.seq) else { return Ok(()) };
            let subject = |seq: Seq| format!("$JS.ACK.{stream}.{c}.1.{seq}.0.0.0");
            for m in &msgs {
                self.client
                    .publish(subject(m.seq), "+ACK".into())
                    .await
                    .map_err(|e| Error::unavailable("ack: cannot reach NATS").with_source(e))?;
            }
            self.ack_subject(&subject(page_end), "+WPI".into()).await?;
            if msgs.len() < ACK_ALL_PAGE {
                return Ok(());
            }
            from = page_end.next();
        }
    }

    pub(crate) async fn ack(
        &self,
        stream: &StreamName,
        c: &ConsumerName,
        token: &AckToken,
        kind: AckKind,
    ) -> Result<()> {
        let Some(info) = api::parse_ack_subject(&token.0) else {
            // A missing stream or consumer is NotFound, as on the embedded
            // engine, whatever the token; only then is the token invalid.
            self.consumer_info(stream, c).await?;
            return Err(Error::invalid("ack token is not a delivery of this engine"));
        };
        if info.stream != stream.as_str() || info.consumer != c.as_str() {
            return Err(Error::invalid(format!(
                "ack token belongs to consumer `{}` of `{}`",
                info.consumer, info.stream
            )));
        }
        let body = match kind {
            AckKind::Ack => "+ACK".to_owned(),
            AckKind::Nak { delay } if delay.is_zero() => "-NAK".to_owned(),
            AckKind::Nak { delay } => format!("-NAK {}", json!({ "delay": nanos(delay) })),
            AckKind::Term => "+TERM".to_owned(),
            AckKind::InProgress => "+WPI".to_owned(),
        };
        match self.ack_subject(&token.0, body).await {
            Ok(()) => Ok(()),
            // No confirmation: the consumer may be gone, or the ack was a
            // repeat the server does not answer. Tell the two apart.
            Err(e) if matches!(e.kind(), ErrorKind::Timeout | ErrorKind::Unavailable) => {
                self.consumer_info(stream, c).await.map(|_| ())
            }
            Err(e) => Err(e),
        }
    }
}
