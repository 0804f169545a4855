//! Feed in (`POST /v1/streams/{stream}/feed`, `GET .../feed/ws`): lines
//! sent as they happen are published in batches and acked while the body is
//! still being sent; a resend (to the same gateway, or to a second gateway
//! of the same NATS cluster) is duplicate-free; bad input of every kind is
//! named precisely, nothing before it is lost and nothing of it is
//! published.

mod support;

use std::time::Duration;

use axum::body::{Body, Bytes};
use axum::http::{Method, Request};
use finmesh_gateway::feed_in::FeedConfig;
use finmesh_gateway::{AppState, GatewayConfig, Limits, app};
use futures::{SinkExt, StreamExt};
use http_body_util::BodyExt;
use serde_json::{Value, json};
use support::{Gw, Harness};
use tokio::sync::mpsc;
use tower::ServiceExt;

const WAIT: Duration = Duration::from_secs(20);

fn config(feed: FeedConfig) -> GatewayConfig {
    GatewayConfig { feed, limits: Limits { rate: None, ..Default::default() }, ..Default::default() }
}

/// A tick line for symbol `sym` with id `f-<i>`.
fn tick(sym: &str, i: u64) -> String {
    format!("{{\"symbol\":\"{sym}\",\"msg_id\":\"f-{i}\",\"payload\":{{\"i\":{i},\"bid\":1.5}}}}\n")
}

fn ticks(range: std::ops::RangeInclusive<u64>) -> String {
    range.map(|i| tick(if i % 2 == 0 { "AAPL" } else { "MSFT" }, i)).collect()
}

/// One feed through `oneshot`: the request body is fed from a channel,
/// the answers are read as they come.
struct FeedCall {
    body: Option<mpsc::Sender<Result<Bytes, std::io::Error>>>,
    answers: axum::body::BodyDataStream,
    buf: Vec<u8>,
    pub status: u16,
    pub content_type: String,
}

impl FeedCall {
    async fn open(gw: &Gw, uri: &str, headers: &[(&str, &str)]) -> FeedCall {
        let (tx, rx) = mpsc::channel::<Result<Bytes, std::io::Error>>(16);
        let stream = futures::stream::unfold(rx, |mut rx| async move { rx.recv().await.map(|item| (item, rx)) });
        let mut req = Request::builder().method(Method::POST).uri(uri).header("content-type", "application/x-ndjson");
        for (k, v) in headers {
            req = req.header(*k, *v);
        }
        let res = gw.app.clone().oneshot(req.body(Body::from_stream(stream)).unwrap()).await.unwrap();
        let status = res.status().as_u16();
        let content_type = res.headers().get("content-type").and_then(|v| v.to_str().ok()).unwrap_or("").to_owned();
        FeedCall { body: Some(tx), answers: res.into_body().into_data_stream(), buf: Vec::new(), status, content_type }
    }

    async fn send(&self, text: impl Into<Bytes>) {
        self.body.as_ref().expect("body open").send(Ok(text.into())).await.expect("the receiver reads the body");
    }

    /// End the body cleanly.
    fn close(&mut self) {
        self.body = None;
    }

    /// Break the body off (the sender's connection failed).
    async fn abort(&mut self) {
        let tx = self.body.take().expect("body open");
        tx.send(Err(std::io::Error::other("connection reset"))).await.expect("send the error");
    }

    /// The next answer line; `None` when the answers ended.
    async fn answer(&mut self) -> Option<Value> {
        let read = async {
            loop {
                if let Some(at) = self.buf.iter().position(|b| *b == b'\n') {
                    let line: Vec<u8> = self.buf.drain(..=at).collect();
                    return Some(serde_json::from_slice(&line).expect("an answer is one JSON line"));
                }
                match self.answers.next().await {
                    Some(Ok(chunk)) => self.buf.extend_from_slice(&chunk),
                    Some(Err(e)) => panic!("answers broke: {e}"),
                    None => {
                        assert!(self.buf.is_empty(), "a partial answer: {:?}", String::from_utf8_lossy(&self.buf));
                        return None;
                    }
                }
            }
        };
        tokio::time::timeout(WAIT, read).await.expect("an answer in time")
    }

    /// Every answer until the end.
    async fn rest(&mut self) -> Vec<Value> {
        let mut all = Vec::new();
        while let Some(a) = self.answer().await {
            all.push(a);
        }
        all
    }
}

/// Acks up to and including the one that covers `line`.
async fn acks_through(call: &mut FeedCall, line: u64) -> Vec<Value> {
    let mut acks = Vec::new();
    loop {
        let a = call.answer().await.expect("an ack");
        assert_eq!(a["event"], "ack", "{a}");
        let last = a["last_line"].as_u64().unwrap();
        acks.push(a);
        if last >= line {
            return acks;
        }
    }
}

/// Every stored message of `MD` as (msg id, payload text), in order.
async fn stored(gw: &Gw) -> Vec<(String, String)> {
    let r = gw.get("/v1/streams/MD/messages?limit=10000").await;
    assert_eq!(r.status, 200, "{}", r.text());
    r.text()
        .lines()
        .map(|l| {
            let v: Value = serde_json::from_str(l).unwrap();
            (v["headers"]["Nats-Msg-Id"].as_str().unwrap_or("").to_owned(), v["payload"].to_string())
        })
        .collect()
}

fn ids(range: std::ops::RangeInclusive<u64>) -> Vec<String> {
    range.map(|i| format!("f-{i}")).collect()
}

async fn md<H: Harness>(feed: FeedConfig) -> Gw {
    let gw = Gw::with_config::<H>(config(feed)).await;
    gw.stream("MD", json!({"subjects": ["md.>"]})).await;
    gw
}

/// Acks arrive while the body is still open, for lines split across
/// chunks; `end` follows the end of the body; the stream holds every line
/// once, with the sender's id and the payload's exact bytes.
async fn lines_are_acked_while_the_body_is_open<H: Harness>() {
    let gw = md::<H>(FeedConfig::default()).await;
    let mut call = FeedCall::open(&gw, "/v1/streams/MD/feed", &[]).await;
    assert_eq!((call.status, call.content_type.as_str()), (200, "application/x-ndjson"));
    let first = ticks(1..=3);
    let (a, b) = first.split_at(first.len() / 2 + 3);
    call.send(a.to_owned()).await;
    call.send(b.to_owned()).await;
    let acks = acks_through(&mut call, 3).await;
    assert_eq!(acks[0]["first_line"], 1);
    assert_eq!(acks[0]["first_msg_id"], "f-1");
    assert_eq!(acks.last().unwrap()["last_msg_id"], "f-3");
    assert_eq!(acks.iter().map(|a| a["count"].as_u64().unwrap()).sum::<u64>(), 3);
    assert_eq!(acks.last().unwrap()["last_seq"], 3);
    // A keepalive (blank line) is counted as a line, not published.
    call.send("\n").await;
    call.send(ticks(4..=6)).await;
    acks_through(&mut call, 7).await;
    call.close();
    let end = call.rest().await;
    assert_eq!(
        end,
        vec![json!({"event": "end", "lines": 7, "messages": 6, "duplicates": 0, "batches": end[0]["batches"]})]
    );
    let got = stored(&gw).await;
    assert_eq!(got.iter().map(|g| g.0.clone()).collect::<Vec<_>>(), ids(1..=6));
    let raw = gw.get("/v1/streams/MD/messages?limit=1").await.text();
    assert!(raw.contains(r#""payload":{"i":1,"bid":1.5}}"#), "the payload's bytes are kept: {raw}");
    let subjects = gw.get("/v1/streams/MD/messages?subject=md.AAPL").await.text();
    assert_eq!(subjects.lines().count(), 3);
}

/// A batch closes at `batch_max_messages` (the linger is long here), and
/// the rest is published when the body ends.
async fn batches_close_at_their_message_limit<H: Harness>() {
    let feed = FeedConfig { batch_max_messages: 10, linger: Duration::from_secs(60), ..Default::default() };
    let gw = md::<H>(feed).await;
    let mut call = FeedCall::open(&gw, "/v1/streams/MD/feed", &[]).await;
    call.send(ticks(1..=25)).await;
    let first = acks_through(&mut call, 20).await;
    let ranges: Vec<_> =
        first.iter().map(|a| (a["first_line"].clone(), a["last_line"].clone(), a["count"].clone())).collect();
    assert_eq!(ranges, vec![(json!(1), json!(10), json!(10)), (json!(11), json!(20), json!(10))]);
    assert_eq!((&first[1]["first_msg_id"], &first[1]["last_msg_id"]), (&json!("f-11"), &json!("f-20")));
    call.close();
    let rest = call.rest().await;
    assert_eq!((&rest[0]["first_line"], &rest[0]["count"]), (&json!(21), &json!(5)));
    assert_eq!(rest[1]["event"], "end");
}

/// A batch that is not full closes once the input pauses for the linger.
async fn a_batch_closes_after_the_linger<H: Harness>() {
    let feed = FeedConfig { batch_max_messages: 1000, linger: Duration::from_millis(50), ..Default::default() };
    let gw = md::<H>(feed).await;
    let mut call = FeedCall::open(&gw, "/v1/streams/MD/feed", &[]).await;
    call.send(ticks(1..=4)).await;
    let acks = acks_through(&mut call, 4).await;
    assert_eq!(acks.len(), 1);
    assert_eq!(acks[0]["count"], 4);
}

/// With no linger (the default), a batch is published as soon as the input
/// pauses, without a timer: on a clock paused off the millisecond grid,
/// each line is acked while the clock stands still. (A timer, even one
/// already due, fires only at the next millisecond tick, which this clock
/// would jump to.) Embedded engine only: a paused clock jumps to the next
/// timer whenever the runtime waits on a socket, as a NATS engine would.
#[tokio::test]
async fn without_a_linger_a_batch_is_published_without_waiting_for_a_timer() {
    let gw = md::<support::Embedded>(FeedConfig::default()).await;
    tokio::time::pause();
    let (tx, rx) = mpsc::channel::<Result<Bytes, std::io::Error>>(16);
    let stream = futures::stream::unfold(rx, |mut rx| async move { rx.recv().await.map(|item| (item, rx)) });
    let req = Request::post("/v1/streams/MD/feed").body(Body::from_stream(stream)).unwrap();
    let res = gw.app.clone().oneshot(req).await.unwrap();
    assert_eq!(res.status(), 200);
    let mut answers = res.into_body().into_data_stream();
    tokio::time::advance(Duration::from_micros(500)).await;
    for i in 1..=3 {
        let before = tokio::time::Instant::now();
        tx.send(Ok(Bytes::from(tick("AAPL", i)))).await.unwrap();
        // No timeout here: its timer would be the one the clock jumps to.
        let chunk = answers.next().await.expect("an answer").unwrap();
        let ack: Value = serde_json::from_slice(chunk.strip_suffix(b"\n").unwrap_or(&chunk)).unwrap();
        assert_eq!((&ack["event"], &ack["last_line"]), (&json!("ack"), &json!(i)), "{ack}");
        assert_eq!(before.elapsed(), Duration::ZERO, "line {i} waited for a timer before its batch was published");
    }
}

/// Lines sent again (a reconnect resending what it saw no ack for) are
/// acked as duplicates and stored once.
async fn a_resend_is_acked_as_duplicates<H: Harness>() {
    let gw = md::<H>(FeedConfig::default()).await;
    let mut call = FeedCall::open(&gw, "/v1/streams/MD/feed", &[]).await;
    call.send(ticks(1..=20)).await;
    acks_through(&mut call, 20).await;
    call.abort().await;
    assert_eq!(call.rest().await, Vec::<Value>::new());
    let mut again = FeedCall::open(&gw, "/v1/streams/MD/feed", &[]).await;
    again.send(ticks(11..=30)).await;
    again.close();
    let answers = again.rest().await;
    let end = answers.last().unwrap();
    assert_eq!((&end["event"], &end["messages"], &end["duplicates"]), (&json!("end"), &json!(20), &json!(10)));
    let dup: u64 = answers.iter().filter(|a| a["event"] == "ack").map(|a| a["duplicates"].as_u64().unwrap()).sum();
    assert_eq!(dup, 10);
    let got: Vec<String> = stored(&gw).await.into_iter().map(|g| g.0).collect();
    assert_eq!(got, ids(1..=30));
}

/// A malformed line: the lines before it are published and acked, then one
/// error names its line and column, and nothing after it is read.
async fn a_bad_line_is_named_and_the_lines_before_it_are_kept<H: Harness>() {
    let gw = md::<H>(FeedConfig::default()).await;
    let mut call = FeedCall::open(&gw, "/v1/streams/MD/feed", &[]).await;
    call.send(format!("{}{{\"symbol\":\"X\", \"msg_id\": tru}}\n{}", ticks(1..=3), tick("Y", 5))).await;
    let answers = call.rest().await;
    assert_eq!(answers.len(), 2, "{answers:?}");
    assert_eq!((&answers[0]["last_line"], &answers[0]["last_msg_id"]), (&json!(3), &json!("f-3")));
    let p = &answers[1]["problem"];
    assert_eq!(answers[1]["event"], "error");
    assert_eq!((&p["status"], &p["line"], &p["column"]), (&json!(400), &json!(4), &json!(29)));
    assert!(p["detail"].as_str().unwrap().starts_with("line 4, column 29: "), "{p}");
    assert_eq!(stored(&gw).await.len(), 3);
}

/// Each kind of bad line, alone after one good line: the good one is kept,
/// the error names line 2 with the right problem type.
async fn every_kind_of_bad_line_is_refused_precisely<H: Harness>() {
    let feed = FeedConfig { max_line_bytes: 256, ..Default::default() };
    let gw = md::<H>(feed).await;
    gw.stream("OTHER", json!({"subjects": ["other.>"]})).await;
    let long = format!("{{\"symbol\":\"L\",\"msg_id\":\"x\",\"payload\":\"{}\"}}\n", "a".repeat(300));
    let cases: Vec<(String, u16, &str, &str)> = vec![
        ("{\"payload\":1,\"msg_id\":\"x\"}\n".into(), 400, "invalid", "needs `subject` or `symbol`"),
        ("{\"symbol\":\"A\",\"payload\":1}\n".into(), 400, "invalid", "needs `msg_id`"),
        ("{\"subject\":\"other.a\",\"msg_id\":\"x\"}\n".into(), 400, "invalid", "does not capture subject `other.a`"),
        ("{\"subject\":\"md.a b\",\"msg_id\":\"x\"}\n".into(), 400, "invalid", "line 2"),
        (
            "{\"symbol\":\"A\",\"msg_id\":\"x\",\"payload\":1,\"encoding\":\"rot13\"}\n".into(),
            400,
            "invalid",
            "unknown encoding",
        ),
        ("[1,2]\n".into(), 400, "invalid", "line 2, column"),
        ("\u{1}not json\n".into(), 400, "invalid", "line 2, column 1"),
        (long, 413, "too-large", "longer than feed.max_line_bytes (256)"),
    ];
    for (i, (bad, status, slug, detail)) in cases.into_iter().enumerate() {
        let good = tick("G", 100 + i as u64);
        let r = gw.post("/v1/streams/MD/feed", format!("{good}{bad}{}", tick("G", 999))).await;
        assert_eq!(r.status, 200);
        let answers: Vec<Value> = r.text().lines().map(|l| serde_json::from_str(l).unwrap()).collect();
        assert_eq!(answers.len(), 2, "{bad}: {answers:?}");
        assert_eq!(answers[0]["count"], 1, "{bad}");
        let p = &answers[1]["problem"];
        assert_eq!(p["status"], status, "{bad}: {p}");
        assert_eq!(p["type"], format!("https://finmesh.dev/problems/{slug}"), "{bad}: {p}");
        assert_eq!(p["line"], 2, "{bad}: {p}");
        assert!(p["detail"].as_str().unwrap().contains(detail), "{bad}: {p}");
    }
    let got: Vec<String> = stored(&gw).await.into_iter().map(|g| g.0).collect();
    assert_eq!(got, (100..108).map(|i| format!("f-{i}")).collect::<Vec<_>>(), "only the good lines");
}

/// A message over the stream's `max_msg_size` is refused by line with 413.
async fn a_message_over_the_streams_size_limit_is_refused<H: Harness>() {
    let gw = Gw::with_config::<H>(config(FeedConfig::default())).await;
    gw.stream("MD", json!({"subjects": ["md.>"], "max_msg_size": 64})).await;
    let big = format!("{{\"symbol\":\"B\",\"msg_id\":\"b\",\"payload\":\"{}\"}}\n", "x".repeat(100));
    let r = gw.post("/v1/streams/MD/feed", format!("{}{big}", tick("A", 1))).await;
    let answers: Vec<Value> = r.text().lines().map(|l| serde_json::from_str(l).unwrap()).collect();
    assert_eq!(answers[1]["problem"]["status"], 413, "{answers:?}");
    assert_eq!(answers[1]["problem"]["line"], 2);
    assert_eq!(stored(&gw).await.len(), 1);
}

/// Before the feed starts, errors are problems: a missing stream, a bad
/// name, a bad symbol prefix.
async fn errors_before_the_feed_starts_are_problems<H: Harness>() {
    let gw = md::<H>(FeedConfig::default()).await;
    gw.post("/v1/streams/NOPE/feed", tick("A", 1)).await.assert_problem(404, "not-found");
    gw.post("/v1/streams/a.b/feed", tick("A", 1)).await.assert_problem(400, "invalid");
    gw.post("/v1/streams/MD/feed?symbol_prefix=md.*", tick("A", 1)).await.assert_problem(400, "invalid");
    let r = gw.post("/v1/streams/MD/feed?symbol_prefix=md.eu", tick("A", 1)).await;
    assert!(r.text().contains("\"end\""), "{}", r.text());
    assert_eq!(gw.get("/v1/streams/MD/messages?subject=md.eu.A").await.text().lines().count(), 1);
    gw.state.begin_drain();
    gw.post("/v1/streams/MD/feed", tick("A", 2)).await.assert_problem(503, "unavailable");
}

/// A sender whose connection breaks mid-line: the complete lines are
/// published, the partial line is not.
async fn a_sender_that_breaks_off_mid_line_publishes_no_partial_line<H: Harness>() {
    let gw = md::<H>(FeedConfig { linger: Duration::from_secs(60), ..Default::default() }).await;
    let mut call = FeedCall::open(&gw, "/v1/streams/MD/feed", &[]).await;
    call.send(format!("{}{{\"symbol\":\"P\",\"msg_id\":\"partial\",\"pay", ticks(1..=2))).await;
    call.abort().await;
    let _ = call.rest().await;
    support::eventually(WAIT, "the complete lines are stored", || async { stored(&gw).await.len() == 2 }).await;
    let got: Vec<String> = stored(&gw).await.into_iter().map(|g| g.0).collect();
    assert_eq!(got, ids(1..=2));
}

/// A sender that stops sending mid-line: after the idle timeout the feed
/// ends with `timeout`, naming the unfinished line; it is not published.
async fn a_sender_that_stalls_mid_line_times_out<H: Harness>() {
    let gw = md::<H>(FeedConfig { idle_timeout: Duration::from_millis(200), ..Default::default() }).await;
    let mut call = FeedCall::open(&gw, "/v1/streams/MD/feed", &[]).await;
    call.send(format!("{}{{\"symbol\":\"P\",\"msg_id\":\"partial\"", ticks(1..=2))).await;
    let answers = call.rest().await;
    let error = answers.last().unwrap();
    assert_eq!(error["problem"]["status"], 504, "{answers:?}");
    let detail = error["problem"]["detail"].as_str().unwrap();
    assert!(detail.contains("feed.idle_timeout") && detail.contains("unfinished line 3"), "{detail}");
    assert_eq!(stored(&gw).await.len(), 2);
}

/// An upload past `max_upload_bytes` ends with `too-large` after acking
/// the lines before the limit.
async fn an_upload_past_its_byte_limit_ends_with_too_large<H: Harness>() {
    let ten: u64 = (1..=10).map(|i| tick("A", i).len() as u64).sum();
    let gw = md::<H>(FeedConfig { max_upload_bytes: ten, linger: Duration::from_secs(60), ..Default::default() }).await;
    let mut call = FeedCall::open(&gw, "/v1/streams/MD/feed", &[]).await;
    for i in 1..=10 {
        call.send(tick("A", i)).await;
    }
    // A huge chunked body: the receiver stops reading at the limit.
    let sender = call.body.clone().unwrap();
    let answers = async {
        loop {
            let Some(a) = call.answer().await else { panic!("the feed ended without an error") };
            if a["event"] == "error" {
                return a;
            }
        }
    };
    let flood = tokio::spawn(async move {
        for i in 11..100_000 {
            if sender.send(Ok(Bytes::from(tick("A", i)))).await.is_err() {
                return i;
            }
        }
        panic!("the receiver read the whole flood");
    });
    let error = answers.await;
    assert_eq!(error["problem"]["status"], 413, "{error}");
    assert!(error["problem"]["detail"].as_str().unwrap().contains("feed.max_upload_bytes"), "{error}");
    call.close();
    assert!(flood.await.unwrap() < 100);
    let got: Vec<String> = stored(&gw).await.into_iter().map(|g| g.0).collect();
    assert_eq!(got, ids(1..=10), "exactly the lines within the limit");
}

/// With authentication: no token is 401 and a token without a publish
/// scope on the stream is 403, both before the feed starts; a token limited
/// to some subjects is refused in-band at the first line outside them.
async fn feeds_need_the_publish_scope<H: Harness>() {
    let kit = support::auth::AuthKit::new();
    let gw = Gw::with_auth::<H>(kit.auth.clone(), None).await;
    let admin = support::auth::bearer(&kit.token("root", "admin"));
    let r = gw
        .send(Method::PUT, "/v1/streams/MD", &[("authorization", &admin)], json!({"subjects": ["md.>"]}).to_string())
        .await;
    assert_eq!(r.status, 200);
    gw.send(Method::POST, "/v1/streams/MD/feed", &[], tick("A", 1)).await.assert_problem(401, "unauthorized");
    let reader = support::auth::bearer(&kit.token("reader", "stream:subscribe:MD stream:publish:OTHER"));
    gw.send(Method::POST, "/v1/streams/MD/feed", &[("authorization", &reader)], tick("A", 1))
        .await
        .assert_problem(403, "forbidden");
    let only_a = support::auth::bearer(&kit.token("feeder", "stream:publish:MD:md.A"));
    let r = gw
        .send(
            Method::POST,
            "/v1/streams/MD/feed",
            &[("authorization", &only_a)],
            format!("{}{}", tick("A", 1), tick("B", 2)),
        )
        .await;
    let answers: Vec<Value> = r.text().lines().map(|l| serde_json::from_str(l).unwrap()).collect();
    assert_eq!(answers[0]["count"], 1, "{answers:?}");
    assert_eq!((&answers[1]["problem"]["status"], &answers[1]["problem"]["line"]), (&json!(403), &json!(2)));
    // The access_token query parameter is for browsers' subscriptions, not feeds.
    let token = kit.token("feeder", "stream:publish:MD");
    gw.send(Method::POST, &format!("/v1/streams/MD/feed?access_token={token}"), &[], tick("A", 3))
        .await
        .assert_problem(400, "invalid");
}

/// When the gateway drains, the open batch is published and acked, then
/// `reconnect` ends the feed.
async fn a_draining_gateway_acks_then_says_reconnect<H: Harness>() {
    let gw = md::<H>(FeedConfig { linger: Duration::from_secs(60), ..Default::default() }).await;
    let mut call = FeedCall::open(&gw, "/v1/streams/MD/feed", &[]).await;
    call.send(ticks(1..=5)).await;
    // Nothing is acked before the linger: wait until the five lines were
    // read (the body channel is empty again); they sit in the open batch.
    let tx = call.body.clone().unwrap();
    support::eventually(WAIT, "the body was read", || {
        let free = tx.capacity() == tx.max_capacity();
        async move { free }
    })
    .await;
    gw.state.begin_drain();
    let answers = call.rest().await;
    assert_eq!(answers.len(), 2, "{answers:?}");
    assert_eq!((&answers[0]["event"], &answers[0]["count"]), (&json!("ack"), &json!(5)));
    assert_eq!(answers[1]["event"], "reconnect");
    assert!(answers[1]["retry_ms"].as_u64().is_some());
    assert_eq!(stored(&gw).await.len(), 5);
}

/// The WebSocket route on a real socket: frames of whole lines in, one
/// answer per frame out, `end` and close 1000 after the client's close;
/// a binary frame is refused with close 1008.
async fn the_websocket_feed_acks_frames<H: Harness>() {
    let gw = md::<H>(FeedConfig::default()).await;
    let addr = gw.serve().await;
    let url = format!("ws://{addr}/v1/streams/MD/feed/ws");
    let (mut ws, _) = tokio_tungstenite::connect_async(&url).await.expect("connect");
    use tokio_tungstenite::tungstenite::Message as M;
    // A frame's end ends its last line.
    ws.send(M::text(ticks(1..=3).trim_end().to_owned())).await.unwrap();
    let mut acked = 0;
    while acked < 3 {
        let frame = tokio::time::timeout(WAIT, ws.next()).await.unwrap().unwrap().unwrap();
        let a: Value = serde_json::from_str(frame.to_text().unwrap()).unwrap();
        assert_eq!(a["event"], "ack", "{a}");
        acked = a["last_line"].as_u64().unwrap();
    }
    // The sender closes once everything it sent is acked (after a close
    // the socket carries no more answers).
    ws.send(M::text(ticks(4..=5))).await.unwrap();
    let ack: Value =
        serde_json::from_str(tokio::time::timeout(WAIT, ws.next()).await.unwrap().unwrap().unwrap().to_text().unwrap())
            .unwrap();
    assert_eq!((&ack["first_line"], &ack["last_line"], &ack["last_msg_id"]), (&json!(4), &json!(5), &json!("f-5")));
    ws.send(M::Close(None)).await.unwrap();
    while let Some(Ok(frame)) = tokio::time::timeout(WAIT, ws.next()).await.unwrap() {
        assert!(frame.is_close(), "{frame:?}");
    }
    assert_eq!(stored(&gw).await.len(), 5);

    let (mut ws, _) = tokio_tungstenite::connect_async(&url).await.expect("connect");
    ws.send(M::binary(vec![1, 2, 3])).await.unwrap();
    let mut frames = Vec::new();
    while let Some(Ok(frame)) = tokio::time::timeout(WAIT, ws.next()).await.unwrap() {
        frames.push(frame);
    }
    let error: Value = serde_json::from_str(frames[0].to_text().unwrap()).unwrap();
    assert_eq!((&error["event"], &error["problem"]["status"]), (&json!("error"), &json!(400)), "{frames:?}");
    assert!(matches!(frames.last(), Some(M::Close(Some(c))) if u16::from(c.code) == 1008), "{frames:?}");
    // Not an upgrade: a problem.
    gw.get("/v1/streams/MD/feed/ws").await.assert_problem(400, "invalid");
}

/// The POST route on a real socket with reqwest: a streamed request body,
/// acks read while it is still being sent (HTTP/1.1 full duplex).
async fn the_http_feed_is_full_duplex_on_a_real_socket<H: Harness>() {
    let gw = md::<H>(FeedConfig::default()).await;
    let addr = gw.serve().await;
    let (tx, rx) = mpsc::channel::<Result<Bytes, std::io::Error>>(4);
    let body = reqwest::Body::wrap_stream(futures::stream::unfold(rx, |mut rx| async move {
        rx.recv().await.map(|item| (item, rx))
    }));
    let send = support::http_client().post(format!("http://{addr}/v1/streams/MD/feed")).body(body).send();
    let send = tokio::spawn(send);
    tx.send(Ok(Bytes::from(ticks(1..=3)))).await.unwrap();
    let res = tokio::time::timeout(WAIT, send).await.unwrap().unwrap().expect("response head");
    assert_eq!(res.status(), 200);
    let mut answers = res.bytes_stream();
    let mut buf = Vec::new();
    let mut last_line = 0;
    while last_line < 3 {
        buf.extend_from_slice(&tokio::time::timeout(WAIT, answers.next()).await.unwrap().unwrap().unwrap());
        while let Some(at) = buf.iter().position(|b| *b == b'\n') {
            let line: Vec<u8> = buf.drain(..=at).collect();
            let a: Value = serde_json::from_slice(&line).unwrap();
            last_line = a["last_line"].as_u64().unwrap();
        }
    }
    tx.send(Ok(Bytes::from(ticks(4..=5)))).await.unwrap();
    drop(tx);
    let mut rest = buf;
    while let Some(chunk) = tokio::time::timeout(WAIT, answers.next()).await.unwrap() {
        rest.extend_from_slice(&chunk.unwrap());
    }
    let text = String::from_utf8(rest).unwrap();
    let end: Value = serde_json::from_str(text.lines().last().unwrap()).unwrap();
    assert_eq!((&end["event"], &end["messages"]), (&json!("end"), &json!(5)), "{text}");
    assert_eq!(stored(&gw).await.len(), 5);
}

/// On a real socket: a sender whose TCP connection closes in the middle of
/// a chunked body and of a line. The complete lines were published and
/// acked; the cut line was not published (sent again whole, it is not a
/// duplicate).
async fn a_connection_closed_mid_line_publishes_no_partial_line<H: Harness>() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let gw = md::<H>(FeedConfig::default()).await;
    let addr = gw.serve().await;
    let mut tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
    let chunk = format!("{}{{\"symbol\":\"P\",\"msg_id\":\"partial\",\"payload\":{{\"bid\":", ticks(1..=2));
    let head = "POST /v1/streams/MD/feed HTTP/1.1\r\nhost: x\r\ntransfer-encoding: chunked\r\n\r\n";
    tcp.write_all(format!("{head}{:x}\r\n{chunk}\r\n", chunk.len()).as_bytes()).await.unwrap();
    let mut seen = Vec::new();
    let read = async {
        let mut buf = [0u8; 4096];
        while !String::from_utf8_lossy(&seen).contains("\"last_line\":2") {
            let n = tcp.read(&mut buf).await.unwrap();
            assert!(n > 0, "the connection closed: {}", String::from_utf8_lossy(&seen));
            seen.extend_from_slice(&buf[..n]);
        }
    };
    tokio::time::timeout(WAIT, read).await.expect("the ack of the complete lines");
    assert!(String::from_utf8_lossy(&seen).starts_with("HTTP/1.1 200"));
    drop(tcp);
    let whole = "{\"symbol\":\"P\",\"msg_id\":\"partial\",\"payload\":{\"bid\":1}}\n";
    let r = gw.post("/v1/streams/MD/feed", whole).await;
    let end: Value = serde_json::from_str(r.text().lines().last().unwrap()).unwrap();
    assert_eq!((&end["messages"], &end["duplicates"]), (&json!(1), &json!(0)), "{}", r.text());
    assert_eq!(stored(&gw).await.len(), 3);
}

/// Oversized WebSocket frames: a frame with a line over `max_line_bytes`
/// gets `too-large` naming the line and close 1009; a frame far over it is
/// refused by the WebSocket layer. Nothing of either is published, the
/// line before them is.
async fn oversized_websocket_frames_are_refused<H: Harness>() {
    use tokio_tungstenite::tungstenite::Message as M;
    let gw = md::<H>(FeedConfig { max_line_bytes: 1000, ..Default::default() }).await;
    let addr = gw.serve().await;
    let url = format!("ws://{addr}/v1/streams/MD/feed/ws");
    let big = |n: usize| format!("{{\"symbol\":\"B\",\"msg_id\":\"big\",\"payload\":\"{}\"}}", "x".repeat(n));
    let (mut ws, _) = tokio_tungstenite::connect_async(&url).await.expect("connect");
    ws.send(M::text(tick("A", 1))).await.unwrap();
    ws.send(M::text(big(5000))).await.unwrap();
    let mut frames = Vec::new();
    while let Some(Ok(frame)) = tokio::time::timeout(WAIT, ws.next()).await.unwrap() {
        frames.push(frame);
    }
    let answers: Vec<Value> = frames
        .iter()
        .filter(|f| f.is_text())
        .filter_map(|f| f.to_text().ok())
        .map(|t| serde_json::from_str(t).unwrap())
        .collect();
    assert_eq!(answers[0]["count"], 1, "{answers:?}");
    assert_eq!(
        (&answers[1]["problem"]["status"], &answers[1]["problem"]["line"]),
        (&json!(413), &json!(2)),
        "{answers:?}"
    );
    assert!(matches!(frames.last(), Some(M::Close(Some(c))) if u16::from(c.code) == 1009), "{frames:?}");

    let (mut ws, _) = tokio_tungstenite::connect_async(&url).await.expect("connect");
    ws.send(M::text(big(300_000))).await.unwrap();
    // The connection ends (a close or an error), whatever the client sees.
    while let Ok(Some(Ok(frame))) = tokio::time::timeout(WAIT, ws.next()).await {
        assert!(frame.is_close() || frame.is_text(), "{frame:?}");
    }
    assert_eq!(stored(&gw).await.len(), 1);
}

per_engine!(
    oversized_websocket_frames_are_refused,
    a_connection_closed_mid_line_publishes_no_partial_line,
    lines_are_acked_while_the_body_is_open,
    batches_close_at_their_message_limit,
    a_batch_closes_after_the_linger,
    a_resend_is_acked_as_duplicates,
    a_bad_line_is_named_and_the_lines_before_it_are_kept,
    every_kind_of_bad_line_is_refused_precisely,
    a_message_over_the_streams_size_limit_is_refused,
    errors_before_the_feed_starts_are_problems,
    a_sender_that_breaks_off_mid_line_publishes_no_partial_line,
    a_sender_that_stalls_mid_line_times_out,
    an_upload_past_its_byte_limit_ends_with_too_large,
    feeds_need_the_publish_scope,
    a_draining_gateway_acks_then_says_reconnect,
    the_websocket_feed_acks_frames,
    the_http_feed_is_full_duplex_on_a_real_socket,
);

/// Two gateways on one NATS server (as two nodes of a cluster would be):
/// a feed to the first, then the same lines resent to the second after the
/// first one is gone, are stored once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_resend_to_a_second_gateway_on_the_same_nats_is_duplicate_free() {
    let server = finmesh_testkit::NatsServer::start().await.expect("nats-server");
    let gateway = || async {
        let options = finmesh_nats::NatsEngineOptions::new(server.url());
        let engine = finmesh_nats::NatsEngine::connect(options).await.expect("connect");
        let state = AppState::new(
            std::sync::Arc::new(engine),
            finmesh_auth::Authenticator::disabled(),
            config(FeedConfig::default()),
        );
        (app(state.clone()), state)
    };
    let (first, first_state) = gateway().await;
    let (second, _second_state) = gateway().await;
    let put = Request::put("/v1/streams/MD").body(Body::from(json!({"subjects": ["md.>"]}).to_string())).unwrap();
    assert_eq!(first.clone().oneshot(put).await.unwrap().status(), 200);
    let feed = |app: axum::Router, body: String| async move {
        let res = app.oneshot(Request::post("/v1/streams/MD/feed").body(Body::from(body)).unwrap()).await.unwrap();
        let text = res.into_body().collect().await.unwrap().to_bytes();
        let answers: Vec<Value> =
            String::from_utf8_lossy(&text).lines().map(|l| serde_json::from_str(l).unwrap()).collect();
        answers.last().cloned().unwrap()
    };
    let end = feed(first.clone(), ticks(1..=50)).await;
    assert_eq!((&end["messages"], &end["duplicates"]), (&json!(50), &json!(0)), "{end}");
    first_state.begin_drain();
    drop(first);
    let end = feed(second.clone(), ticks(26..=75)).await;
    assert_eq!((&end["messages"], &end["duplicates"]), (&json!(50), &json!(25)), "{end}");
    let res =
        second.oneshot(Request::get("/v1/streams/MD/messages?limit=1000").body(Body::empty()).unwrap()).await.unwrap();
    let text = res.into_body().collect().await.unwrap().to_bytes();
    let got: Vec<String> = String::from_utf8_lossy(&text)
        .lines()
        .map(|l| serde_json::from_str::<Value>(l).unwrap()["headers"]["Nats-Msg-Id"].as_str().unwrap().to_owned())
        .collect();
    assert_eq!(got, ids(1..=75));
}
