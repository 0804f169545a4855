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
