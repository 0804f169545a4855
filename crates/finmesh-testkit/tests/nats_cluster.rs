//! `NatsCluster`: three routed JetStream nodes that hold an R3 stream and
//! keep accepting writes while one node is down; and a cluster whose slow
//! node routes only through delay proxies, so its replica lags the quorum.

use finmesh_testkit::ManagedServer;
use std::time::Duration;

use async_nats::jetstream;
use finmesh_testkit::{NatsCluster, until_routed};

#[tokio::test]
async fn three_nodes_replicate_and_survive_one_node_down() {
    let mut cluster = NatsCluster::start(3).await.expect("start a 3-node cluster");
    assert_eq!(cluster.nodes().len(), 3);
    let urls = cluster.urls();

    let js = jetstream::new(async_nats::connect(urls[0].as_str()).await.unwrap());
    let stream = js
        .create_stream(jetstream::stream::Config {
            name: "R".into(),
            subjects: vec!["r.>".into()],
            num_replicas: 3,
            ..Default::default()
        })
        .await
        .expect("ready cluster accepts an R3 stream at once");
    assert_eq!(stream.cached_info().config.num_replicas, 3);
    let first = until_routed(Duration::from_secs(10), || async { js.publish("r.1", "a".into()).await?.await }).await;
    assert_eq!(first.expect("publish to R").sequence, 1);

    // Kill the first node; a client on the third still publishes (2 of 3
    // replicas form a quorum). Leader election may take a moment: retry
    // the publish until a deadline, with a message id so a retry whose
    // first attempt was stored is acked as a duplicate, not stored twice.
    cluster.node_mut(0).kill().await.unwrap();
    let js3 = jetstream::new(async_nats::connect(urls[2].as_str()).await.unwrap());
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    let seq = loop {
        let msg = jetstream::message::PublishMessage::build().payload("b".into()).message_id("b-1");
        match js3.send_publish("r.2", msg).await {
            Ok(ack) => match ack.await {
                Ok(ack) => break ack.sequence,
                Err(e) if std::time::Instant::now() < deadline => drop(e),
                Err(e) => panic!("no ack with one node down: {e}"),
            },
            Err(e) => panic!("publish failed: {e}"),
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert_eq!(seq, 2);

    cluster.node_mut(0).restart().await.unwrap();
    cluster.wait_healthy(Duration::from_secs(30)).await.unwrap();
    let js1 = jetstream::new(async_nats::connect(urls[0].as_str()).await.unwrap());
    let mut stream = js1.get_stream("R").await.unwrap();
    assert_eq!(stream.info().await.unwrap().state.last_sequence, 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_node_routes_only_through_its_proxies_and_lags() {
    let delay = Duration::from_millis(40);
    let cluster = NatsCluster::start_with_slow_node(3, 2, delay).await.expect("start a cluster with a slow n3");
    assert_eq!(cluster.slow_node(), Some(2));
    assert_eq!(cluster.slow_links().len(), 3, "one inbound and one outbound proxy per fast node");
    assert!(cluster.slow_node_isolated().await, "every route of n3 passes a proxy");
    assert!(cluster.slow_links().iter().map(|p| p.open_connections()).sum::<usize>() > 0);

    // A stream led by a fast node: n3 gets each write a delay after the
    // quorum (n1 + n2) acked it.
    let js = jetstream::new(async_nats::connect(cluster.urls()[0].as_str()).await.unwrap());
    js.create_stream(jetstream::stream::Config {
        name: "LAG".into(),
        subjects: vec!["lag.>".into()],
        num_replicas: 3,
        ..Default::default()
    })
    .await
    .unwrap();
    let leader = cluster.lead_elsewhere(&js.client(), "LAG", 2, Duration::from_secs(20)).await;
    assert!(matches!(leader, Some(0 | 1)), "no fast leader for LAG: {leader:?}");

    let slow_http = cluster.nodes()[2].config().http_port;
    let mut behind = 0;
    for i in 0..5 {
        // The stream may have just changed leader: its subjects reach n1
        // over the routes a moment after the election.
        let seq = until_routed(Duration::from_secs(10), || async {
            js.publish("lag.a", format!("m{i}").into()).await?.await
        })
        .await
        .expect("publish to LAG")
        .sequence;
        let at_ack = finmesh_testkit::probe::jsz_last_seq(slow_http, "LAG").await;
        if at_ack.is_some_and(|s| s < seq) {
            behind += 1;
        }
        let started = std::time::Instant::now();
        while finmesh_testkit::probe::jsz_last_seq(slow_http, "LAG").await.is_none_or(|s| s < seq) {
            assert!(started.elapsed() < Duration::from_secs(10), "n3 never applied seq {seq}");
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
        eprintln!("seq {seq}: n3 at {at_ack:?} when acked, applied {:?} after the ack", started.elapsed());
    }
    assert_eq!(behind, 5, "n3 must be behind at the moment each write is acked");
}
