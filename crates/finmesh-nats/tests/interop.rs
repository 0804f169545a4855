//! Interop with plain NATS clients and connection faults, on a real
//! `nats-server`: what finmesh writes is readable by async-nats directly
//! (standard stream and KV layout) and the other way round; an unreachable
//! server gives a clear error naming the URL.

use std::time::{Duration, Instant};

use async_nats::jetstream;
use bytes::Bytes;
use finmesh_core::{
    BucketConfig, BucketName, ErrorKind, Key, KvEngine, ReadRequest, Seq, StreamConfig, StreamEngine, StreamName,
    SubjectPattern,
};
use finmesh_nats::{NatsEngine, NatsEngineOptions};
use finmesh_testkit::NatsServer;

async fn setup() -> (NatsServer, NatsEngine, async_nats::Client) {
    let server = NatsServer::start().await.expect("start nats-server");
    let engine = NatsEngine::connect(NatsEngineOptions::new(server.url())).await.expect("connect engine");
    let plain = async_nats::connect(server.url()).await.expect("connect plain client");
    (server, engine, plain)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn plain_publish_is_read_through_the_engine() {
    let (_server, engine, plain) = setup().await;
    let s = StreamName::new("ORDERS").unwrap();
    engine.create_stream(StreamConfig::new(s.clone(), vec![SubjectPattern::new("orders.>").unwrap()])).await.unwrap();
    let js = jetstream::new(plain);
    let mut headers = async_nats::HeaderMap::new();
    headers.insert("X-From", "plain");
    let ack =
        js.publish_with_headers("orders.eu.1", headers, Bytes::from_static(b"hello")).await.unwrap().await.unwrap();
    assert_eq!(ack.sequence, 1);
    let m = engine.get_message(&s, Seq(1)).await.unwrap();
    assert_eq!(
        (m.subject.as_str(), &m.payload[..], m.headers.get("X-From")),
        ("orders.eu.1", &b"hello"[..], Some("plain"))
    );
    let read = engine.read(&s, ReadRequest::from_seq(Seq(0), 10)).await.unwrap();
    assert_eq!(read, vec![m]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kv_values_cross_between_engine_and_plain_kv_client() {
    let (_server, engine, plain) = setup().await;
    let b = BucketName::new("cards").unwrap();
    engine.create_bucket(BucketConfig { history: 3, ..BucketConfig::new(b.clone()) }).await.unwrap();
    let rev = engine.kv_put(&b, &Key::new("tok.1").unwrap(), Bytes::from_static(b"v1")).await.unwrap();

    let js = jetstream::new(plain);
    let kv = js.get_key_value("cards").await.expect("standard bucket KV_cards");
    let entry = kv.entry("tok.1").await.unwrap().expect("value written by the engine");
    assert_eq!((&entry.value[..], entry.revision), (&b"v1"[..], rev.0));

    let plain_rev = kv.put("tok.2", Bytes::from_static(b"from plain")).await.unwrap();
    let got = engine.kv_get(&b, &Key::new("tok.2").unwrap()).await.unwrap().expect("value written by plain client");
    assert_eq!((&got.value[..], got.revision.0), (&b"from plain"[..], plain_rev));

    kv.delete("tok.1").await.unwrap();
    assert_eq!(engine.kv_get(&b, &Key::new("tok.1").unwrap()).await.unwrap(), None, "plain delete is a tombstone");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unreachable_server_is_a_clear_error_after_retries() {
    // Bind a port, then free it: nobody listens there.
    let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let url = format!("nats://127.0.0.1:{port}");
    let mut options = NatsEngineOptions::new(url.clone());
    options.connect_attempts = 3;
    options.connect_timeout = Duration::from_millis(200);
    let start = Instant::now();
    let err = match NatsEngine::connect(options).await {
        Ok(_) => panic!("connected to a port nobody listens on"),
        Err(e) => e,
    };
    assert_eq!(err.kind(), ErrorKind::Unavailable, "{err:?}");
    assert!(err.message().contains(&url), "the error names the URL: {err}");
    assert!(err.message().contains("3 attempts"), "the error says it retried: {err}");
    // Two backoffs (100 ms + 200 ms) between three attempts.
    assert!(start.elapsed() >= Duration::from_millis(300), "no backoff: {:?}", start.elapsed());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn publish_to_a_stopped_server_errors_and_dedup_survives_a_restart() {
    use finmesh_testkit::ManagedServer;
    let mut server = NatsServer::start().await.expect("start nats-server");
    let mut options = NatsEngineOptions::new(server.url());
    options.request_timeout = Duration::from_secs(1);
    let engine = NatsEngine::connect(options).await.expect("connect engine");
    let s = StreamName::new("ORDERS").unwrap();
    engine.create_stream(StreamConfig::new(s.clone(), vec![SubjectPattern::new("orders.>").unwrap()])).await.unwrap();
    let msg = || finmesh_core::OutgoingMessage::new("orders.a".parse().unwrap(), "x").with_msg_id("id-1").unwrap();
    assert_eq!(engine.publish(&s, msg()).await.unwrap().seq, Seq(1));
    server.stop().await.unwrap();
    let err = engine.publish(&s, msg()).await.expect_err("no server: an error, not silence");
    assert!(matches!(err.kind(), ErrorKind::Unavailable | ErrorKind::Timeout), "{err:?}");
    server.restart().await.unwrap();
    // The client reconnects by itself; the retried message is a duplicate.
    let deadline = Instant::now() + Duration::from_secs(10);
    let ack = loop {
        match engine.publish(&s, msg()).await {
            Ok(a) => break a,
            Err(e) if Instant::now() < deadline => tracing::debug!("waiting for reconnect: {e}"),
            Err(e) => panic!("no reconnect within 10 s: {e:?}"),
        }
    };
    assert!(ack.duplicate && ack.seq == Seq(1), "{ack:?}");
    assert_eq!(engine.stream_info(&s).await.unwrap().state.messages, 1);
}

/// Regression: a message a foreign client stored on a subject finmesh cannot
/// represent (non-ASCII) made the tail re-create its consumer on it for ever;
/// now it is a one-message gap and the tail goes on.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tail_passes_a_foreign_subject_as_a_one_message_gap() {
    use finmesh_core::TailEvent;
    use futures::StreamExt;
    let (_server, engine, plain) = setup().await;
    let s = StreamName::new("MD").unwrap();
    engine.create_stream(StreamConfig::new(s.clone(), vec![SubjectPattern::new("md.>").unwrap()])).await.unwrap();
    let js = jetstream::new(plain);
    for subject in ["md.a", "md.é", "md.b"] {
        js.publish(subject, Bytes::from_static(b"x")).await.unwrap().await.unwrap();
    }
    for filter in [None, Some(SubjectPattern::new("md.>").unwrap())] {
        let mut tail = engine.tail(&s, Seq(1), filter.clone()).await.unwrap();
        let mut got = Vec::new();
        while got.len() < 3 {
            let ev = tokio::time::timeout(Duration::from_secs(10), tail.next())
                .await
                .unwrap_or_else(|_| panic!("filter {filter:?}: the tail is stuck after {got:?}"))
                .expect("open")
                .expect("no error");
            got.push(match ev {
                TailEvent::Message(m) => format!("msg {} {}", m.seq.0, m.subject),
                TailEvent::Gap { from, to } => format!("gap {}..{}", from.0, to.0),
            });
        }
        assert_eq!(got, ["msg 1 md.a", "gap 2..2", "msg 3 md.b"], "filter {filter:?}");
    }
}

/// Two engines (two gateways) on one server: a stream changed or deleted
/// through one is noticed by the other's publish cache.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_publish_cache_follows_changes_made_through_another_engine() {
    use finmesh_core::OutgoingMessage;
    let (server, a, _plain) = setup().await;
    let b = NatsEngine::connect(NatsEngineOptions::new(server.url())).await.expect("second engine");
    let s1 = StreamName::new("S1").unwrap();
    let msg =
        |subject: &str| OutgoingMessage::new(finmesh_core::Subject::new(subject).unwrap(), Bytes::from_static(b"x"));
    let pattern = |p: &str| vec![SubjectPattern::new(p).unwrap()];
    a.create_stream(StreamConfig::new(s1.clone(), pattern("a.>"))).await.unwrap();
    assert_eq!(b.publish(&s1, msg("a.x")).await.unwrap().seq, Seq(1), "b caches S1 = a.>");

    // Widened elsewhere: b's cached subjects would refuse `w.x`.
    a.update_stream(StreamConfig::new(
        s1.clone(),
        vec![SubjectPattern::new("a.>").unwrap(), SubjectPattern::new("w.>").unwrap()],
    ))
    .await
    .unwrap();
    assert_eq!(b.publish(&s1, msg("w.x")).await.unwrap().seq, Seq(2));

    // Narrowed elsewhere and the subject moved to another stream: b never
    // reports success for a message that S1 did not store.
    a.update_stream(StreamConfig::new(s1.clone(), pattern("w.>"))).await.unwrap();
    let s2 = StreamName::new("S2").unwrap();
    a.create_stream(StreamConfig::new(s2.clone(), pattern("a.>"))).await.unwrap();
    let err = b.publish(&s1, msg("a.y")).await.expect_err("S1 no longer captures a.y");
    assert_eq!(err.kind(), ErrorKind::Invalid, "{err}");
    let err = b.publish_batch(&s1, vec![msg("a.z")]).await.expect_err("nor in a batch");
    assert_eq!(err.kind(), ErrorKind::Invalid, "{err}");

    // Deleted elsewhere: NotFound, well before the request timeout.
    a.delete_stream(&s1).await.unwrap();
    let started = Instant::now();
    let err = b.publish(&s1, msg("w.y")).await.expect_err("S1 is gone");
    assert_eq!(err.kind(), ErrorKind::NotFound, "{err}");
    assert!(started.elapsed() < Duration::from_secs(2), "took {:?}", started.elapsed());
}

/// A read over a slow link returns every message it counted. Each pull
/// used to end at a fixed 2 s after it was sent; with a round trip longer
/// than that, the read gave up on the pull and returned fewer messages
/// than the stream held (the server had already sent them into the
/// abandoned pull), and a large read on a busy machine lost keys the same
/// way.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reads_over_a_slow_link_return_every_message() {
    const MESSAGES: usize = 2_500;
    let server = NatsServer::start().await.expect("start nats-server");
    let plain = async_nats::connect(server.url()).await.expect("connect plain client");
    let js = jetstream::new(plain);
    js.create_stream(jetstream::stream::Config {
        name: "SLOW".into(),
        subjects: vec!["slow.>".into()],
        ..Default::default()
    })
    .await
    .unwrap();
    let mut acks = Vec::new();
    for i in 0..MESSAGES {
        acks.push(js.publish(format!("slow.{}", i % 7), Bytes::from(i.to_string())).await.unwrap());
    }
    for ack in acks {
        ack.await.unwrap();
    }
    let addr = format!("127.0.0.1:{}", server.port()).parse().unwrap();
    // A 2.4 s round trip: longer than the old fixed deadline of a pull.
    let proxy = finmesh_testkit::DelayProxy::start(addr, Duration::from_millis(1_200)).await.unwrap();
    let mut options = NatsEngineOptions::new(format!("nats://127.0.0.1:{}", proxy.port()));
    options.request_timeout = Duration::from_secs(20);
    options.connect_timeout = Duration::from_secs(20);
    let engine = NatsEngine::connect(options).await.expect("connect engine through the proxy");
    let s = StreamName::new("SLOW").unwrap();
    let read = engine.read(&s, ReadRequest::from_seq(Seq(1), MESSAGES)).await.unwrap();
    assert_eq!(read.len(), MESSAGES, "a read over a slow link lost messages");
    assert!(read.iter().enumerate().all(|(i, m)| m.seq == Seq(i as u64 + 1) && m.payload == i.to_string()));
}
