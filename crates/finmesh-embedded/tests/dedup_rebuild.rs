//! Regression (issue 17): rebuilding a stream's dedup state after a restart
//! decoded every record inside the window and failed on the first corrupt
//! one; the failure poisoned the writer, so writes to every stream failed
//! until a restart (which failed the same way). A corrupt record is now
//! skipped with a warning; the ids around it still deduplicate.

use bytes::Bytes;
use finmesh_core::{
    ErrorKind, OutgoingMessage, PubAck, Seq, StreamConfig, StreamEngine, StreamName, Subject, SubjectPattern,
};
use finmesh_embedded::EmbeddedEngine;

fn config(name: &str) -> StreamConfig {
    StreamConfig::new(StreamName::new(name).unwrap(), vec![SubjectPattern::new(format!("{name}.>")).unwrap()])
}

fn msg(stream: &str, id: &str) -> OutgoingMessage {
    let subject = Subject::new(format!("{stream}.x")).unwrap();
    OutgoingMessage::new(subject, Bytes::from(format!("payload of {id}"))).with_msg_id(id).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_corrupt_record_does_not_poison_the_writer() {
    let dir = tempfile::tempdir().unwrap();
    let (a, b) = (StreamName::new("A").unwrap(), StreamName::new("B").unwrap());
    let engine = EmbeddedEngine::open(dir.path()).unwrap();
    engine.create_stream(config("A")).await.unwrap();
    engine.create_stream(config("B")).await.unwrap();
    for id in ["a1", "a2", "a3"] {
        engine.publish(&a, msg("A", id)).await.unwrap();
    }
    engine.close().await.unwrap();

    // Overwrite message 2 of A with bytes that do not decode.
    {
        let db = fjall::Database::builder(dir.path()).open().unwrap();
        let msgs = db.keyspace("s.A.m", fjall::KeyspaceCreateOptions::default).unwrap();
        assert!(msgs.get(2u64.to_be_bytes()).unwrap().is_some(), "the stream's message keyspace and key layout");
        msgs.insert(2u64.to_be_bytes(), b"\xffnot a message").unwrap();
        db.persist(fjall::PersistMode::SyncAll).unwrap();
    }

    let engine = EmbeddedEngine::open(dir.path()).unwrap();
    // The first publish with an id rebuilds A's dedup state past the corrupt record.
    assert_eq!(engine.publish(&a, msg("A", "a3")).await.unwrap(), PubAck { seq: Seq(3), duplicate: true });
    assert_eq!(engine.publish(&a, msg("A", "a1")).await.unwrap(), PubAck { seq: Seq(1), duplicate: true });
    assert_eq!(engine.publish(&a, msg("A", "a4")).await.unwrap(), PubAck { seq: Seq(4), duplicate: false });
    // Writes to every stream still work.
    assert_eq!(engine.publish(&b, msg("B", "b1")).await.unwrap(), PubAck { seq: Seq(1), duplicate: false });
    // Reading the corrupt record itself is an error of its own, not a poisoned store.
    let e = engine.get_message(&a, Seq(2)).await.unwrap_err();
    assert_eq!(e.kind(), ErrorKind::Internal);
    assert_eq!(engine.publish(&b, msg("B", "b2")).await.unwrap(), PubAck { seq: Seq(2), duplicate: false });
    engine.close().await.unwrap();
}
