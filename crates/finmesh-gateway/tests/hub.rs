//! The fan-out hub on real sockets, on both engines: one engine tail per
//! stream for any number of subscribers, everything delivered in order, a
//! slow subscriber cut off with `slow_consumer` without slowing the others,
//! history joined to the live feed with no gap or duplicate, a reconnect
//! storm served from the ring without engine reads, heartbeats carrying the
//! head to filtered subscribers, and an idle tail stopped.

mod support;

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use axum::body::Bytes;
use axum::http::Method;
use finmesh_gateway::{GatewayConfig, Limits, SubscriptionConfig};
use futures::StreamExt;
use serde_json::json;
use support::{Gw, Harness, SseReader, eventually, http_client};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

const WAIT: Duration = Duration::from_secs(20);

/// No rate limit: the tests publish in bursts from one client.
fn config(subscriptions: SubscriptionConfig) -> GatewayConfig {
    GatewayConfig { subscriptions, limits: Limits { rate: None, ..Default::default() }, ..Default::default() }
}

/// Caps high enough for the crowds below (one client address).
fn crowd() -> SubscriptionConfig {
    SubscriptionConfig { max_per_principal: 5_000, max_total: 5_000, ..Default::default() }
}

/// An SSE subscription over a real socket.
async fn sse_socket(client: &reqwest::Client, addr: SocketAddr, path: &str, headers: &[(&str, &str)]) -> SseReader {
    let mut req = client.get(format!("http://{addr}{path}"));
    for (k, v) in headers {
        req = req.header(*k, *v);
    }
    let res = req.send().await.expect("subscribe");
    assert_eq!(res.status(), 200, "{:?}", res.text().await);
    SseReader::new(res.bytes_stream())
}

/// Publish `n` messages on `subject` with payloads of about `pad` bytes;
/// returns the last sequence.
async fn publish(gw: &Gw, subject: &str, n: usize, pad: usize) -> u64 {
    let padding = "x".repeat(pad);
    let mut body = String::new();
    for i in 0..n {
        body.push_str(&format!("{{\"subject\":\"{subject}\",\"payload\":{{\"i\":{i},\"pad\":\"{padding}\"}}}}\n"));
    }
    let r = gw.send(Method::POST, "/v1/streams/MD/messages", &[("content-type", "application/x-ndjson")], body).await;
    assert_eq!(r.status, 200, "publish: {}", r.text());
    let acks = r.json();
    let acks = acks["acks"].as_array().or_else(|| acks.as_array()).cloned().unwrap_or_default();
    acks.last().and_then(|a| a["seq"].as_u64()).unwrap_or_else(|| panic!("no acks in {}", r.text()))
}

async fn last_seq(gw: &Gw) -> u64 {
    gw.get("/v1/streams/MD").await.json()["state"]["last_seq"].as_u64().expect("last_seq")
}

/// 60 subscribers on sockets receive every message in order, through one
/// engine tail.
async fn sixty_subscribers_get_everything_in_order<H: Harness>() {
    let (gw, engine) = Gw::counting::<H>(config(crowd())).await;
    gw.stream("MD", json!({"subjects": ["md.>"]})).await;
    let addr = gw.serve().await;
    let client = http_client();
    const N: u64 = 600;
    let mut readers = Vec::new();
    for _ in 0..60 {
        let mut r = sse_socket(&client, addr, "/v1/streams/MD/events?from_seq=1", &[]).await;
        readers.push(tokio::spawn(async move {
            r.hello().await;
            for want in 1..=N {
                let ev = r.next(WAIT).await.expect("an event");
                assert_eq!((ev.event.as_deref(), ev.seq()), (None, want), "{ev:?}");
                assert_eq!(ev.json()["seq"], want);
            }
        }));
    }
    for _ in 0..6 {
        publish(&gw, "md.x", 100, 16).await;
    }
    for r in readers {
        r.await.expect("reader");
    }
    assert_eq!(engine.tails(), 1, "one engine tail serves all 60 subscribers");
    assert_eq!(gw.state.hub_tails(), 1);
}

/// A raw HTTP/1.1 subscriber with a tiny receive buffer, to stop reading at will.
struct RawSubscriber {
    stream: TcpStream,
    buf: Vec<u8>,
}

impl RawSubscriber {
    async fn open(addr: SocketAddr, path: &str) -> Self {
        let socket = tokio::net::TcpSocket::new_v4().expect("socket");
        socket.set_recv_buffer_size(4096).expect("SO_RCVBUF");
        let mut stream = socket.connect(addr).await.expect("connect");
        let req = format!("GET {path} HTTP/1.1\r\nhost: test\r\n\r\n");
        stream.write_all(req.as_bytes()).await.expect("request");
        RawSubscriber { stream, buf: Vec::new() }
    }

    /// Read until `needle` has arrived.
    async fn read_until(&mut self, needle: &[u8]) {
        let read = async {
            let mut scanned = 0;
            while !self.buf[scanned..].windows(needle.len()).any(|w| w == needle) {
                // Only the new bytes (and a needle's length before them) need a look.
                scanned = self.buf.len().saturating_sub(needle.len());
                let mut chunk = [0u8; 65536];
                let n = self.stream.read(&mut chunk).await.expect("read");
                assert!(n > 0, "connection closed before {:?}", String::from_utf8_lossy(needle));
                self.buf.extend_from_slice(&chunk[..n]);
            }
        };
        tokio::time::timeout(WAIT, read).await.expect("in time");
    }

    /// Read the rest of the response (up to the last chunk) and parse its events.
    async fn rest(mut self) -> SseReader {
        self.read_until(b"\r\n0\r\n\r\n").await;
        let start = self.buf.windows(4).position(|w| w == b"\r\n\r\n").expect("headers") + 4;
        let mut body = Vec::new();
        let mut at = start;
        loop {
            let line_end = at + self.buf[at..].windows(2).position(|w| w == b"\r\n").expect("chunk size");
            let size = usize::from_str_radix(std::str::from_utf8(&self.buf[at..line_end]).expect("hex"), 16)
                .expect("chunk size");
            if size == 0 {
                break;
            }
            body.extend_from_slice(&self.buf[line_end + 2..line_end + 2 + size]);
            at = line_end + 2 + size + 2;
        }
        SseReader::new(futures::stream::iter([Ok::<_, Infallible>(Bytes::from(body))]))
    }
}

/// Fast subscribers next to the stalled one.
const FAST: usize = 59;

/// One subscriber stops reading: its queue fills, it is cut off with
/// `error`/`slow_consumer` and its last sequence, and the others receive
/// everything, batch by batch, while it is stalled.
async fn slow_subscriber_is_cut_and_never_slows_the_others<H: Harness>() {
    let subs = SubscriptionConfig { queue_max_bytes: 1024 * 1024, queue_capacity: 100_000, ..crowd() };
    let (gw, engine) = Gw::counting::<H>(config(subs)).await;
    gw.stream("MD", json!({"subjects": ["md.>"]})).await;
    let addr = gw.serve().await;
    let client = http_client();
    let mut slow = RawSubscriber::open(addr, "/v1/streams/MD/events?from_seq=1").await;
    let mut fast = Vec::new();
    for _ in 0..FAST {
        fast.push(sse_socket(&client, addr, "/v1/streams/MD/events?from_seq=1", &[]).await);
    }
    // Everyone has joined once they saw message 1; then the slow one stops reading.
    publish(&gw, "md.x", 1, 16).await;
    slow.read_until(b"\nid: 1\n").await;
    let acked: Arc<parking_lot::Mutex<Vec<(u64, Instant)>>> = Default::default();
    let progress: Arc<Vec<std::sync::atomic::AtomicU64>> = Arc::new((0..FAST).map(|_| Default::default()).collect());
    let readers: Vec<_> = fast
        .into_iter()
        .enumerate()
        .map(|(i, mut r)| {
            let (acked, progress) = (acked.clone(), progress.clone());
            tokio::spawn(async move {
                r.hello().await;
                let mut worst = Duration::ZERO;
                let mut want = 1;
                loop {
                    let ev = r.next(WAIT).await.expect("an event");
                    assert_eq!((ev.event.as_deref(), ev.seq()), (None, want), "{ev:?}");
                    let received = Instant::now();
                    if let Some((_, at)) = acked.lock().iter().find(|(seq, _)| *seq == want) {
                        worst = worst.max(received.saturating_duration_since(*at));
                    }
                    progress[i].store(want, Ordering::Relaxed);
                    if ev.json()["subject"] == "md.end" {
                        return (want, worst);
                    }
                    want += 1;
                }
            })
        })
        .collect();
    // Publish, at the pace of the fast subscribers, until the hub cuts the
    // stalled one off.
    let mut published = 1;
    let mut bytes = 0;
    while gw.get("/v1/subscribers").await.json()["subscribers"].as_array().unwrap().iter().all(|s| s["lagged"] != true)
    {
        assert!(bytes < 64 << 20, "the stalled subscriber was not cut after {bytes} bytes");
        published = publish(&gw, "md.x", 50, 8000).await;
        acked.lock().push((published, Instant::now()));
        bytes += 50 * 8100;
        let caught_up = || async { progress.iter().all(|p| p.load(Ordering::Relaxed) >= published) };
        eventually(WAIT, "the fast subscribers received the batch", caught_up).await;
    }
    let end = publish(&gw, "md.end", 1, 16).await;
    acked.lock().push((end, Instant::now()));
    assert!(end > published);
    for r in readers {
        let (last, worst) = r.await.expect("reader");
        assert_eq!(last, end, "every fast subscriber got everything");
        // A bound for a debug build on a busy 2-core box: 59 readers parse
        // 400 KB each per batch; a subscriber held up by the stalled one
        // would wait for the whole test instead.
        assert!(worst < Duration::from_secs(10), "a fast subscriber waited {worst:?} for a batch");
    }
    // Only now does the slow one read again: what was queued, then the cut.
    let mut rest = slow.rest().await;
    rest.hello().await;
    let mut want = 1;
    let cut = loop {
        let ev = rest.next(WAIT).await.expect("an event before the end");
        if ev.event.is_some() {
            break ev;
        }
        assert_eq!(ev.seq(), want);
        want += 1;
    };
    assert_eq!(cut.event.as_deref(), Some("error"), "{cut:?}");
    let problem = cut.json();
    assert_eq!(problem["reason"], "slow_consumer", "{problem}");
    assert_eq!(problem["last_seq"], want - 1, "last_seq is the last message it got: {problem}");
    assert!(want - 1 < end, "it was cut before the end");
    assert!(rest.next(WAIT).await.is_none(), "the stream ends after the error");
    // It resumes from its last sequence and gets the rest.
    let mut again =
        sse_socket(&client, addr, "/v1/streams/MD/events", &[("last-event-id", &(want - 1).to_string())]).await;
    again.hello().await;
    for seq in want..=end {
        assert_eq!(again.next(WAIT).await.expect("resumed").seq(), seq);
    }
    assert_eq!(engine.tails(), 1);
}

/// Subscribers starting before the ring read history from the engine and
/// join the live feed during a publish burst with no gap and no duplicate,
/// many times over; those starting inside the ring join from it.
async fn history_joins_live_without_gap_or_duplicate<H: Harness>() {
    let subs = SubscriptionConfig { ring_max_messages: 64, ..crowd() };
    let (gw, engine) = Gw::counting::<H>(config(subs)).await;
    gw.stream("MD", json!({"subjects": ["md.>"]})).await;
    let addr = gw.serve().await;
    let client = http_client();
    // Keep the tail running, then publish in bursts all along.
    let mut keeper = sse_socket(&client, addr, "/v1/streams/MD/events", &[]).await;
    keeper.hello().await;
    publish(&gw, "md.x", 300, 16).await;
    let gw = Arc::new(gw);
    let stop = Arc::new(AtomicBool::new(false));
    let publisher = {
        let (gw, stop) = (gw.clone(), stop.clone());
        tokio::spawn(async move {
            while !stop.load(Ordering::Relaxed) {
                publish(&gw, "md.x", 10, 16).await;
                tokio::task::yield_now().await;
            }
        })
    };
    for _ in 0..50 {
        let head = last_seq(&gw).await;
        let start = head.saturating_sub(fastrand::u64(0..200)).max(1);
        let mut r = sse_socket(&client, addr, &format!("/v1/streams/MD/events?from_seq={start}"), &[]).await;
        r.hello().await;
        for want in start..start + 250 {
            let ev = r.next(WAIT).await.expect("an event");
            assert_eq!((ev.event.as_deref(), ev.seq()), (None, want), "started at {start} (head {head}): {ev:?}");
        }
    }
    stop.store(true, Ordering::Relaxed);
    publisher.await.expect("publisher");
    assert!(engine.reads() > 0, "starts before the ring read history");
    assert_eq!(engine.tails(), 1, "history reads never open another tail");
}

/// 1,000 subscribers reconnecting at once from inside the ring are served
/// from it: no engine read at all.
async fn reconnect_storm_is_served_from_the_ring<H: Harness>() {
    let (gw, engine) = Gw::counting::<H>(config(crowd())).await;
    gw.stream("MD", json!({"subjects": ["md.>"]})).await;
    let addr = gw.serve().await;
    let client = http_client();
    let mut first = sse_socket(&client, addr, "/v1/streams/MD/events?from_seq=1", &[]).await;
    first.hello().await;
    publish(&gw, "md.x", 200, 16).await;
    for want in 1..=200 {
        assert_eq!(first.next(WAIT).await.expect("event").seq(), want);
    }
    let reads = engine.reads();
    let storm: Vec<_> = (0..1_000)
        .map(|_| {
            let client = client.clone();
            tokio::spawn(async move {
                let mut r = sse_socket(&client, addr, "/v1/streams/MD/events", &[("last-event-id", "100")]).await;
                r.hello().await;
                for want in 101..=200 {
                    assert_eq!(r.next(WAIT).await.expect("event").seq(), want);
                }
            })
        })
        .collect();
    for r in storm {
        r.await.expect("reconnected subscriber");
    }
    assert_eq!(engine.reads() - reads, 0, "the ring served every reconnect");
    assert_eq!(engine.tails(), 1);
}

/// A filtered subscriber that matches nothing still learns the head: an
/// `id:`-only heartbeat carries it, and it resumes from there.
async fn heartbeat_carries_the_head_to_a_filtered_subscriber<H: Harness>() {
    let subs = SubscriptionConfig { heartbeat: Duration::from_millis(100), ..Default::default() };
    let gw = Gw::with_config::<H>(config(subs)).await;
    gw.stream("MD", json!({"subjects": ["md.>"]})).await;
    let addr = gw.serve().await;
    let client = http_client();
    let mut r = sse_socket(&client, addr, "/v1/streams/MD/events?subject=md.a", &[]).await;
    r.hello().await;
    eventually(WAIT, "the subscriber is connected", || async { gw.state.subscriber_count() == 1 }).await;
    let head = publish(&gw, "md.b", 5, 16).await;
    loop {
        let ev = r.next(WAIT).await.expect("a heartbeat");
        assert_eq!((ev.event.as_deref(), ev.data.as_str()), (None, ""), "only id-only events: {ev:?}");
        assert!(ev.seq() <= head);
        if ev.seq() == head {
            break;
        }
    }
    drop(r);
    let mut again =
        sse_socket(&client, addr, "/v1/streams/MD/events?subject=md.a", &[("last-event-id", &head.to_string())]).await;
    again.hello().await;
    let mine = publish(&gw, "md.a", 1, 16).await;
    let ev = loop {
        let ev = again.next(WAIT).await.expect("the message");
        if !ev.data.is_empty() {
            break ev;
        }
    };
    assert_eq!(ev.seq(), mine);
    assert_eq!(ev.json()["subject"], "md.a");
}

/// A tail nobody subscribes to stops (and its engine subscription with it);
/// the next subscriber starts a new one.
async fn idle_tail_stops_and_restarts<H: Harness>() {
    let subs = SubscriptionConfig { tail_idle: Duration::from_millis(200), ..Default::default() };
    let (gw, engine) = Gw::counting::<H>(config(subs)).await;
    gw.stream("MD", json!({"subjects": ["md.>"]})).await;
    let addr = gw.serve().await;
    let client = http_client();
    let mut r = sse_socket(&client, addr, "/v1/streams/MD/events", &[]).await;
    r.hello().await;
    eventually(WAIT, "the tail runs", || async { gw.state.hub_tails() == 1 }).await;
    drop(r);
    eventually(WAIT, "the idle tail stops", || async { gw.state.hub_tails() == 0 }).await;
    let mut r = sse_socket(&client, addr, "/v1/streams/MD/events?from_seq=1", &[]).await;
    r.hello().await;
    let seq = publish(&gw, "md.x", 1, 16).await;
    assert_eq!(r.next(WAIT).await.expect("event").seq(), seq);
    assert_eq!(engine.tails(), 2, "one tail per running period");
}

/// WebSocket and SSE subscribers of a stream share one tail and get the
/// same envelopes.
async fn websocket_and_sse_share_the_tail<H: Harness>() {
    let (gw, engine) = Gw::counting::<H>(config(SubscriptionConfig::default())).await;
    gw.stream("MD", json!({"subjects": ["md.>"]})).await;
    let addr = gw.serve().await;
    let client = http_client();
    let mut sse = sse_socket(&client, addr, "/v1/streams/MD/events?from_seq=1", &[]).await;
    sse.hello().await;
    let mut sockets = Vec::new();
    for _ in 0..3 {
        let (ws, _) = tokio_tungstenite::connect_async(format!("ws://{addr}/v1/streams/MD/ws?from_seq=1"))
            .await
            .expect("websocket");
        sockets.push(ws);
    }
    publish(&gw, "md.x", 20, 16).await;
    let mut envelopes = Vec::new();
    for _ in 1..=20 {
        envelopes.push(sse.next(WAIT).await.expect("event").data);
    }
    for ws in &mut sockets {
        for want in &envelopes {
            let msg = tokio::time::timeout(WAIT, ws.next()).await.expect("in time").expect("open").expect("frame");
            assert_eq!(msg.into_text().expect("text").as_str(), want.as_str());
        }
        ws.close(None).await.expect("close");
    }
    assert_eq!(engine.tails(), 1);
}

/// Events ready together leave in one body chunk (one pass through the
/// writer), whole and in order; a lone live event is a chunk of its own.
async fn ready_events_share_a_chunk<H: Harness>() {
    use tower::ServiceExt;
    let gw = Gw::with_config::<H>(config(crowd())).await;
    gw.stream("MD", json!({"subjects": ["md.>"]})).await;
    publish(&gw, "md.x", 50, 16).await;
    let req = axum::http::Request::get("/v1/streams/MD/events?from_seq=1").body(axum::body::Body::empty()).unwrap();
    let res = gw.app.clone().oneshot(req).await.unwrap();
    assert_eq!(res.status(), 200);
    let mut body = res.into_body().into_data_stream();
    let mut chunk = async || {
        let next = tokio::time::timeout(WAIT, body.next()).await.expect("a chunk in time");
        String::from_utf8(next.expect("the body goes on").expect("a chunk").to_vec()).unwrap()
    };
    assert!(chunk().await.starts_with("retry:"), "the hello first");
    let ids = |text: &str| -> Vec<u64> {
        text.lines().filter_map(|l| l.strip_prefix("id: ")).map(|id| id.parse().unwrap()).collect()
    };
    let (mut seen, mut chunks) = (Vec::new(), 0);
    while seen.len() < 50 {
        let text = chunk().await;
        assert!(text.ends_with("\n\n"), "a chunk holds whole events: {text:?}");
        seen.extend(ids(&text));
        chunks += 1;
    }
    assert_eq!(seen, (1..=50).collect::<Vec<_>>());
    assert!(chunks < 5, "50 ready events took {chunks} chunks");
    publish(&gw, "md.x", 1, 16).await;
    let text = chunk().await;
    assert_eq!(ids(&text), [51], "{text:?}");
    assert_eq!(text.matches("data: ").count(), 1, "{text:?}");
}

per_engine!(
    ready_events_share_a_chunk,
    sixty_subscribers_get_everything_in_order,
    slow_subscriber_is_cut_and_never_slows_the_others,
    history_joins_live_without_gap_or_duplicate,
    reconnect_storm_is_served_from_the_ring,
    heartbeat_carries_the_head_to_a_filtered_subscriber,
    idle_tail_stops_and_restarts,
    websocket_and_sse_share_the_tail,
);
