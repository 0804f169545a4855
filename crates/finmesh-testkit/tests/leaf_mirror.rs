//! A leaf site mirrors a KV bucket and a stream of the hub domain (R3 on the
//! 3-node hub), driven with async-nats directly: hub writes reach the leaf
//! with the same sequences/revisions, and after the leaf's link was cut
//! (through its `DelayProxy`) and restored, both mirrors catch up to exactly
//! the hub's state. The catch-up time after the restore is printed: NATS
//! retries a stalled mirror on its own schedule, which is a figure to know.

use std::time::{Duration, Instant};

use async_nats::jetstream::{self, kv, stream};
use finmesh_testkit::{HUB_DOMAIN, HubAndLeaves, until_routed};

/// Generous: NATS retries mirrors every 10–20 s after a failure.
const CATCH_UP_DEADLINE: Duration = Duration::from_secs(60);

/// JetStream API requests may wait this long. async-nats's default (5 s)
/// was once too short for creating the R3 bucket while the whole suite
/// loaded the 2 cores; this test is about mirrors, not API latency.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(20);

async fn connect(url: &str) -> async_nats::Client {
    async_nats::ConnectOptions::new().request_timeout(Some(REQUEST_TIMEOUT)).connect(url).await.expect("connect")
}

async fn put(kv: &kv::Store, key: &str, value: String) -> u64 {
    until_routed(REQUEST_TIMEOUT, || kv.put(key, value.clone().into()))
        .await
        .unwrap_or_else(|e| panic!("put {key}: {e}"))
}

async fn publish(js: &jetstream::Context, subject: String, payload: String) {
    until_routed(REQUEST_TIMEOUT, || async { js.publish(subject.clone(), payload.clone().into()).await?.await })
        .await
        .unwrap_or_else(|e| panic!("publish to {subject}: {e}"));
}

fn hub_api() -> stream::External {
    stream::External { api_prefix: format!("$JS.{HUB_DOMAIN}.API"), delivery_prefix: None }
}

async fn last_sequence(s: &mut stream::Stream) -> u64 {
    s.info().await.expect("stream info").state.last_sequence
}

/// Poll until `mirror` holds as many messages as `origin`, up to the same
/// last sequence; returns how long that took.
async fn wait_caught_up(origin: &mut stream::Stream, mirror: &mut stream::Stream, what: &str) -> Duration {
    let started = Instant::now();
    let target = origin.info().await.unwrap().state.clone();
    loop {
        let state = mirror.info().await.unwrap().state.clone();
        if state.last_sequence == target.last_sequence && state.messages == target.messages {
            return started.elapsed();
        }
        assert!(
            started.elapsed() < CATCH_UP_DEADLINE,
            "{what}: mirror at seq {} ({} msgs), origin at {} ({} msgs) after {CATCH_UP_DEADLINE:?}",
            state.last_sequence,
            state.messages,
            target.last_sequence,
            target.messages
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Every message of `origin` is in `mirror` at the same sequence, with the
/// same subject, headers and payload, and the states match.
async fn assert_same_messages(origin: &mut stream::Stream, mirror: &mut stream::Stream, what: &str) {
    let a = origin.info().await.unwrap().state.clone();
    let b = mirror.info().await.unwrap().state.clone();
    assert_eq!(
        (a.first_sequence, a.last_sequence, a.messages),
        (b.first_sequence, b.last_sequence, b.messages),
        "{what}"
    );
    let mut present = 0;
    for seq in a.first_sequence..=a.last_sequence {
        let x = message_at(origin, seq).await;
        let y = message_at(mirror, seq).await;
        assert_eq!(x, y, "{what}: seq {seq}");
        present += u64::from(x.is_some());
    }
    assert_eq!(present, a.messages, "{what}");
}

/// Sequence, subject, headers and payload of the message at `seq`, or
/// `None` if there is none (a KV bucket drops revisions beyond its history).
async fn message_at(
    s: &stream::Stream,
    seq: u64,
) -> Option<(u64, async_nats::Subject, async_nats::HeaderMap, bytes::Bytes)> {
    match s.get_raw_message(seq).await {
        Ok(m) => Some((m.sequence, m.subject, m.headers, m.payload)),
        Err(e) if e.kind() == stream::RawMessageErrorKind::NoMessageFound => None,
        Err(e) => panic!("seq {seq}: {e}"),
    }
}

/// The leaf's KV view of every key matches the hub's: value and revision.
async fn assert_same_entries(hub: &kv::Store, leaf: &kv::Store, keys: &[String]) {
    for key in keys {
        let h = hub.entry(key).await.unwrap();
        let l = leaf.entry(key).await.unwrap();
        let h = h.map(|e| (e.revision, e.value, e.operation));
        let l = l.map(|e| (e.revision, e.value, e.operation));
        assert_eq!(h, l, "key {key}");
    }
}

#[tokio::test]
async fn leaf_mirrors_match_the_hub_and_catch_up_after_a_cut_link() {
    let mut sites = HubAndLeaves::builder().proxied_leaf(Duration::from_millis(5)).start().await.unwrap();
    let hub = jetstream::new(connect(sites.hub().urls()[0].as_str()).await);
    let leaf = jetstream::new(connect(&sites.leaf(0).url()).await);

    // Origin: an R3 bucket and an R3 stream on the hub.
    let prices = hub
        .create_key_value(kv::Config { bucket: "prices".into(), history: 10, num_replicas: 3, ..Default::default() })
        .await
        .unwrap();
    let mut orders = hub
        .create_stream(stream::Config {
            name: "ORDERS".into(),
            subjects: vec!["orders.>".into()],
            num_replicas: 3,
            ..Default::default()
        })
        .await
        .unwrap();
    let keys: Vec<String> = (0..5).map(|k| format!("k{k}")).collect();
    let mut expected_revision = 0;
    for i in 0..20u64 {
        expected_revision = put(&prices, &keys[i as usize % 5], format!("v{i}")).await;
        publish(&hub, format!("orders.{}", i % 3), format!("order {i}")).await;
    }
    assert_eq!(expected_revision, 20);

    // Mirrors on the leaf, in its own domain, reading the hub's API.
    let leaf_prices = leaf
        .create_key_value(kv::Config {
            bucket: "prices_leaf".into(),
            history: 10,
            mirror: Some(stream::Source { name: "KV_prices".into(), external: Some(hub_api()), ..Default::default() }),
            mirror_direct: true,
            ..Default::default()
        })
        .await
        .unwrap();
    let mut orders_mirror = leaf
        .create_stream(stream::Config {
            name: "ORDERS_MIRROR".into(),
            mirror: Some(stream::Source { name: "ORDERS".into(), external: Some(hub_api()), ..Default::default() }),
            ..Default::default()
        })
        .await
        .unwrap();
    let mut prices_stream = hub.get_stream("KV_prices").await.unwrap();
    let mut prices_mirror = leaf.get_stream("KV_prices_leaf").await.unwrap();

    let initial = wait_caught_up(&mut prices_stream, &mut prices_mirror, "KV").await;
    wait_caught_up(&mut orders, &mut orders_mirror, "stream").await;
    println!("initial sync of both mirrors: {initial:?}");
    assert_same_messages(&mut prices_stream, &mut prices_mirror, "KV").await;
    assert_same_messages(&mut orders, &mut orders_mirror, "stream").await;
    assert_same_entries(&prices, &leaf_prices, &keys).await;

    // Steady state: a new put shows up on the leaf with the same revision.
    let rev = put(&prices, "k0", "fresh".into()).await;
    let started = Instant::now();
    loop {
        if let Some(e) = leaf_prices.entry("k0").await.unwrap()
            && e.revision == rev
        {
            assert_eq!(e.value.as_ref(), b"fresh");
            break;
        }
        assert!(started.elapsed() < CATCH_UP_DEADLINE, "put {rev} not mirrored");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    println!("one put mirrored to the leaf in {:?}", started.elapsed());

    // Cut the leaf's link and write on the hub meanwhile.
    let proxy = sites.leaf(0).proxy().unwrap();
    proxy.cut().await;
    sites.leaf(0).wait_link_down(Duration::from_secs(10)).await.unwrap();
    let mirrored_before = last_sequence(&mut prices_mirror).await;
    for i in 0..50u64 {
        put(&prices, &keys[i as usize % 5], format!("during cut {i}")).await;
        publish(&hub, format!("orders.{}", i % 3), format!("cut order {i}")).await;
    }
    prices.delete("k4").await.unwrap();
    assert_eq!(last_sequence(&mut prices_mirror).await, mirrored_before, "the mirror advanced over a cut link");

    // Restore: the mirrors catch up to exactly the hub's state.
    let restored = Instant::now();
    sites.leaf(0).proxy().unwrap().restore().await.unwrap();
    sites.leaf_mut(0).wait_link_up().await.unwrap();
    let link = restored.elapsed();
    wait_caught_up(&mut prices_stream, &mut prices_mirror, "KV after restore").await;
    let kv_caught_up = restored.elapsed();
    wait_caught_up(&mut orders, &mut orders_mirror, "stream after restore").await;
    let stream_caught_up = restored.elapsed();
    println!(
        "after restore: leafnode link up in {link:?}; KV mirror caught up after {kv_caught_up:?}, \
         stream mirror after {stream_caught_up:?}"
    );
    assert_same_messages(&mut prices_stream, &mut prices_mirror, "KV after restore").await;
    assert_same_messages(&mut orders, &mut orders_mirror, "stream after restore").await;
    assert_same_entries(&prices, &leaf_prices, &keys).await;
    assert!(leaf_prices.get("k4").await.unwrap().is_none(), "a delete on the hub is a delete on the leaf");
}
