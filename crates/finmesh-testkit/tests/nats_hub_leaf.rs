//! `HubAndLeaves`: a 3-node hub in domain `hub` and two leaves in their own
//! domains, one direct and one through a `DelayProxy`. Ready means the hub's
//! JetStream API answers through each leaf at once; a leaf survives kill -9
//! with its store; a cut proxy takes its leaf off the hub until restored; a
//! hub node's death does not strand the leaves.

use std::time::Duration;

use async_nats::jetstream;
use finmesh_testkit::{HUB_DOMAIN, HubAndLeaves, ManagedServer};

/// JetStream of domain `domain`, reached through the server at `url`.
async fn js_in(url: &str, domain: &str) -> jetstream::Context {
    let client = async_nats::ConnectOptions::new()
        .request_timeout(Some(Duration::from_secs(2)))
        .connect(url)
        .await
        .expect("connect");
    jetstream::with_domain(client, domain)
}

#[tokio::test]
async fn leaves_reach_the_hub_domain_survive_kills_and_follow_their_proxy() {
    let mut sites =
        HubAndLeaves::builder().direct_leaf().proxied_leaf(Duration::from_millis(10)).start().await.unwrap();
    assert_eq!(sites.hub().nodes().len(), 3);
    assert_eq!(sites.leaves().len(), 2);
    assert_eq!(sites.leaf(0).domain(), "leaf1");
    assert_eq!(sites.leaf(1).domain(), "leaf2");
    assert!(sites.leaf(0).proxy().is_none());
    let proxy_targets = sites.leaf(1).proxy().unwrap().targets().len();
    assert_eq!(proxy_targets, 3, "the proxy may forward to every hub node");

    // Ready: the hub's JetStream answers through either leaf, and each
    // leaf's own domain is its own.
    let hub = js_in(&sites.hub().urls()[0], HUB_DOMAIN).await;
    hub.create_stream(jetstream::stream::Config {
        name: "H".into(),
        subjects: vec!["h.>".into()],
        num_replicas: 3,
        ..Default::default()
    })
    .await
    .unwrap();
    for leaf in sites.leaves() {
        let via_leaf = js_in(&leaf.url(), HUB_DOMAIN).await;
        assert_eq!(via_leaf.query_account().await.unwrap().streams, 1, "hub domain via {}", leaf.domain());
        let own = js_in(&leaf.url(), leaf.domain()).await;
        assert_eq!(own.query_account().await.unwrap().streams, 0, "{}'s own domain", leaf.domain());
    }

    // kill -9 a leaf: it comes back with its store and its link.
    let leaf1 = js_in(&sites.leaf(0).url(), "leaf1").await;
    leaf1
        .create_stream(jetstream::stream::Config {
            name: "L".into(),
            subjects: vec!["l.>".into()],
            ..Default::default()
        })
        .await
        .unwrap();
    leaf1.publish("l.1", "kept".into()).await.unwrap().await.unwrap();
    let pid = sites.leaf(0).pid().unwrap();
    sites.leaf_mut(0).kill().await.unwrap();
    assert!(!sites.leaf(0).link_up().await);
    sites.leaf_mut(0).restart().await.unwrap();
    assert_ne!(sites.leaf(0).pid(), Some(pid));
    assert!(sites.leaf(0).link_up().await);
    let leaf1 = js_in(&sites.leaf(0).url(), "leaf1").await;
    let mut l = leaf1.get_stream("L").await.unwrap();
    assert_eq!(l.info().await.unwrap().state.messages, 1, "kill -9 kept the leaf's store");

    // Cut the proxied leaf: the hub domain is out of its reach until the
    // link is restored; the direct leaf is not affected.
    sites.leaf(1).proxy().unwrap().cut().await;
    sites.leaf(1).wait_link_down(Duration::from_secs(10)).await.unwrap();
    let via_cut = js_in(&sites.leaf(1).url(), HUB_DOMAIN).await;
    assert!(via_cut.query_account().await.is_err(), "hub reachable over a cut link");
    assert!(sites.leaf(0).link_up().await);
    sites.leaf(1).proxy().unwrap().restore().await.unwrap();
    sites.leaf_mut(1).wait_link_up().await.unwrap();
    assert_eq!(js_in(&sites.leaf(1).url(), HUB_DOMAIN).await.query_account().await.unwrap().streams, 1);

    // Kill the hub node both leaves may be attached to: they reconnect to
    // another node (the proxy to its next target) and the R3 stream still
    // answers through them.
    sites.hub_mut().node_mut(0).kill().await.unwrap();
    for i in 0..2 {
        sites.leaf_mut(i).wait_link_up().await.unwrap();
        let via_leaf = js_in(&sites.leaf(i).url(), HUB_DOMAIN).await;
        let deadline = std::time::Instant::now() + Duration::from_secs(30);
        // The stream's leader may move: poll until it answers.
        loop {
            match via_leaf.get_stream("H").await {
                Ok(_) => break,
                Err(e) => assert!(std::time::Instant::now() < deadline, "H via leaf{}: {e}", i + 1),
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
    sites.hub_mut().node_mut(0).restart().await.unwrap();
    sites.hub_mut().wait_healthy(Duration::from_secs(30)).await.unwrap();
}
