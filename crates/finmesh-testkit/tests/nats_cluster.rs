//! `NatsCluster`: three routed JetStream nodes that hold an R3 stream and
//! keep accepting writes while one node is down.

use finmesh_testkit::ManagedServer;
use std::time::Duration;

use async_nats::jetstream;
use finmesh_testkit::NatsCluster;

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
    assert_eq!(js.publish("r.1", "a".into()).await.unwrap().await.unwrap().sequence, 1);

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
