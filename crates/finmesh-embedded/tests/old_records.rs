//! Data directories written before buckets and streams had options
//! (`security`, `metadata`) still open: their `stream/<name>` records,
//! exactly as the older version wrote them, load with no options, and the
//! bucket and stream can then be updated and given metadata.

use bytes::Bytes;
use finmesh_core::{BucketName, Key, KvEngine, StreamEngine, StreamName};
use finmesh_embedded::EmbeddedEngine;

/// The records of bucket `cards` (history 3) and stream `ORDERS` as the
/// version before options wrote them.
const OLD_BUCKET: &str = r#"{"config":{"name":"KV_cards","subjects":["$KV.cards.>"],"max_msgs":null,"max_bytes":null,"max_age":null,"max_msgs_per_subject":3,"max_msg_size":null,"duplicate_window":120000,"sync":"always","replicas":1},"kind":{"kv":{"name":"cards","history":3,"ttl":null,"max_value_size":null,"max_bytes":null,"sync":"always","replicas":1}}}"#;
const OLD_STREAM: &str = r#"{"config":{"name":"ORDERS","subjects":["orders.>"],"max_msgs":null,"max_bytes":null,"max_age":null,"max_msgs_per_subject":null,"max_msg_size":null,"duplicate_window":120000,"sync":"always","replicas":1},"kind":"user"}"#;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn records_without_options_still_open() {
    let dir = tempfile::tempdir().unwrap();
    let (b, s) = (BucketName::new("cards").unwrap(), StreamName::new("ORDERS").unwrap());
    {
        let e = EmbeddedEngine::open(dir.path()).unwrap();
        e.create_bucket(finmesh_core::BucketConfig { history: 3, ..finmesh_core::BucketConfig::new(b.clone()) })
            .await
            .unwrap();
        e.create_stream(finmesh_core::StreamConfig::new(
            s.clone(),
            vec![finmesh_core::SubjectPattern::new("orders.>").unwrap()],
        ))
        .await
        .unwrap();
        e.kv_put(&b, &Key::new("k").unwrap(), Bytes::from("v")).await.unwrap();
        e.close().await.unwrap();
    }
    {
        let db = fjall::Database::builder(dir.path()).open().unwrap();
        let meta = db.keyspace("meta", fjall::KeyspaceCreateOptions::default).unwrap();
        // A record without options is written as before, byte for byte.
        assert_eq!(String::from_utf8(meta.get("stream/KV_cards").unwrap().unwrap().to_vec()).unwrap(), OLD_BUCKET);
        assert_eq!(String::from_utf8(meta.get("stream/ORDERS").unwrap().unwrap().to_vec()).unwrap(), OLD_STREAM);
        // Write them again from the literals, as the older version left them.
        meta.insert("stream/KV_cards", OLD_BUCKET).unwrap();
        meta.insert("stream/ORDERS", OLD_STREAM).unwrap();
        db.persist(fjall::PersistMode::SyncAll).unwrap();
    }
    let e = EmbeddedEngine::open(dir.path()).unwrap();
    let info = e.bucket_info(&b).await.unwrap();
    assert_eq!(info.config.history, 3);
    assert!(info.config.security.is_none() && info.config.metadata.is_empty());
    assert_eq!(e.kv_get(&b, &Key::new("k").unwrap()).await.unwrap().unwrap().value, "v");
    let stream = e.stream_info(&s).await.unwrap();
    assert!(stream.config.security.is_none() && stream.config.metadata.is_empty());
    // Metadata can be added to them; it persists.
    let mut config = info.config.clone();
    config.metadata.insert("owner".into(), "cards-team".into());
    e.update_bucket(config.clone()).await.unwrap();
    e.close().await.unwrap();
    let e = EmbeddedEngine::open(dir.path()).unwrap();
    assert_eq!(e.bucket_info(&b).await.unwrap().config, config);
    e.close().await.unwrap();
}
