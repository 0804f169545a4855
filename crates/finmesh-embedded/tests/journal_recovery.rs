//! A damaged journal after a crash: a torn last batch is cut and the store
//! opens with every earlier write; damage before the last batch refuses to
//! open (`Internal`) instead of silently dropping acknowledged writes.
//!
//! Each test writes through the engine with `sync = always` (each publish
//! awaited: one journal batch for its message, then one for its subject
//! index changes), closes it, damages the newest journal file
//! (`<dir>/<id>.jnl`, zero-padded after its data), and reopens.

use std::path::{Path, PathBuf};

use bytes::Bytes;
use finmesh_core::{
    ConsumerConfig, ConsumerEngine, ConsumerName, DeliverPolicy, ErrorKind, OutgoingMessage, ReadRequest, Seq,
    StreamConfig, StreamEngine, StreamName, Subject, SubjectPattern, SyncPolicy,
};
use finmesh_embedded::EmbeddedEngine;

const MESSAGES: u64 = 40;

fn stream() -> StreamName {
    StreamName::new("J").unwrap()
}

fn payload(i: u64) -> Bytes {
    Bytes::from(format!("message-{i:04}-").repeat(8))
}

/// The test stream on `j.>`, `sync = always`, with an optional per-subject limit.
async fn create_stream(engine: &EmbeddedEngine, max_msgs_per_subject: Option<u64>) {
    let mut config = StreamConfig::new(stream(), vec![SubjectPattern::new("j.>").unwrap()]);
    config.sync = SyncPolicy::Always;
    config.max_msgs_per_subject = max_msgs_per_subject;
    engine.create_stream(config).await.unwrap();
}

/// Publish `MESSAGES` messages one by one and close; return the newest journal.
async fn write_and_close(dir: &Path) -> PathBuf {
    let engine = EmbeddedEngine::open(dir).unwrap();
    create_stream(&engine, None).await;
    for i in 1..=MESSAGES {
        let ack = engine.publish(&stream(), OutgoingMessage::new(Subject::new("j.x").unwrap(), payload(i))).await;
        assert_eq!(ack.unwrap().seq, Seq(i));
    }
    engine.close().await.unwrap();
    newest_journal(dir)
}

fn newest_journal(dir: &Path) -> PathBuf {
    std::fs::read_dir(dir)
        .unwrap()
        .filter_map(|e| {
            let name = e.unwrap().file_name().into_string().unwrap();
            name.strip_suffix(".jnl").and_then(|n| n.parse::<u64>().ok())
        })
        .max()
        .map(|id| dir.join(format!("{id}.jnl")))
        .expect("a journal file")
}

/// Zero the tail of the newest journal's last batch, as if the process had
/// died while writing it.
fn lose_last_batch(dir: &Path) {
    let journal = newest_journal(dir);
    let mut bytes = std::fs::read(&journal).unwrap();
    let end = data_end(&bytes);
    bytes[end - 24..end].fill(0);
    std::fs::write(&journal, &bytes).unwrap();
}

/// `num_pending` of a new consumer on `filter`: counted through the subject index.
async fn pending_through_index(engine: &EmbeddedEngine, name: &str, filter: &str, deliver: DeliverPolicy) -> u64 {
    let mut c = ConsumerConfig::new(ConsumerName::new(name).unwrap());
    c.filter = Some(SubjectPattern::new(filter).unwrap());
    c.deliver = deliver;
    engine.create_consumer(&stream(), c).await.unwrap().num_pending
}

/// Offset just past the last non-zero byte (the journal is preallocated with zeros).
fn data_end(bytes: &[u8]) -> usize {
    bytes.iter().rposition(|b| *b != 0).map_or(0, |i| i + 1)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn torn_last_batch_is_cut_and_earlier_writes_survive() {
    let dir = tempfile::tempdir().unwrap();
    let journal = write_and_close(dir.path()).await;
    let mut bytes = std::fs::read(&journal).unwrap();
    let end = data_end(&bytes);
    assert!(end > 64, "the journal holds the writes");
    // A crash in the middle of writing the last message's batch: from inside
    // its payload on, nothing reached the disk (nor its index batch).
    let needle = format!("message-{MESSAGES:04}-");
    let at = bytes[..end].windows(needle.len()).position(|w| w == needle.as_bytes()).expect("payload in journal");
    for b in &mut bytes[at + 4..] {
        *b = 0;
    }
    std::fs::write(&journal, &bytes).unwrap();

    let engine = EmbeddedEngine::open(dir.path()).unwrap();
    let info = engine.stream_info(&stream()).await.unwrap();
    // Only the torn batch is gone; it was the last publish.
    assert_eq!(info.state.messages, MESSAGES - 1, "{:?}", info.state);
    assert_eq!(info.state.last_seq, Seq(MESSAGES - 1));
    let msgs = engine.read(&stream(), ReadRequest::from_seq(Seq(1), 1000)).await.unwrap();
    assert_eq!(msgs.len() as u64, MESSAGES - 1);
    for (i, m) in msgs.iter().enumerate() {
        assert_eq!(m.seq, Seq(i as u64 + 1));
        assert_eq!(m.payload, payload(i as u64 + 1));
    }
    // The stream goes on from there.
    let ack = engine.publish(&stream(), OutgoingMessage::new(Subject::new("j.x").unwrap(), payload(0))).await;
    assert_eq!(ack.unwrap().seq, Seq(MESSAGES));
    engine.close().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lost_index_batch_is_rebuilt_from_the_messages() {
    let dir = tempfile::tempdir().unwrap();
    write_and_close(dir.path()).await;
    // The crash came while the last batch, the last message's index
    // changes, was written: its tail never reached the disk.
    lose_last_batch(dir.path());

    let engine = EmbeddedEngine::open(dir.path()).unwrap();
    let info = engine.stream_info(&stream()).await.unwrap();
    assert_eq!(info.state.messages, MESSAGES, "every message survives: {:?}", info.state);
    // The subject index counts every message again (it would miss the last
    // one without the rebuild): a filtered consumer sees all of them.
    assert_eq!(pending_through_index(&engine, "all", "j.x", DeliverPolicy::All).await, MESSAGES);
    engine.close().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lost_first_index_batch_is_rebuilt() {
    // The stream's very first write: its index batch is also the first to
    // write the stream's index marker, so after the crash there is none.
    // (Found by the crash test: a child killed between the two batches of
    // its first group commit left 16 messages and an empty index.)
    let dir = tempfile::tempdir().unwrap();
    let engine = EmbeddedEngine::open(dir.path()).unwrap();
    create_stream(&engine, None).await;
    let ack = engine.publish(&stream(), OutgoingMessage::new(Subject::new("j.x").unwrap(), payload(1))).await;
    assert_eq!(ack.unwrap().seq, Seq(1));
    engine.close().await.unwrap();
    lose_last_batch(dir.path());

    let engine = EmbeddedEngine::open(dir.path()).unwrap();
    assert_eq!(engine.stream_info(&stream()).await.unwrap().state.messages, 1);
    assert_eq!(pending_through_index(&engine, "all", "j.x", DeliverPolicy::All).await, 1);
    engine.close().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lost_index_batch_that_removed_is_repaired() {
    // One message per subject (`max_msgs_per_subject = 1`): the third
    // publish, on `j.a` again, stores seq 3 and removes seq 2 with its
    // index entry.
    let dir = tempfile::tempdir().unwrap();
    let engine = EmbeddedEngine::open(dir.path()).unwrap();
    create_stream(&engine, Some(1)).await;
    for (i, subject) in [(1, "j.b"), (2, "j.a"), (3, "j.a")] {
        let ack = engine.publish(&stream(), OutgoingMessage::new(Subject::new(subject).unwrap(), payload(i))).await;
        assert_eq!(ack.unwrap().seq, Seq(i));
    }
    engine.close().await.unwrap();
    // Lose the last batch: the index changes of the third publish.
    lose_last_batch(dir.path());

    let engine = EmbeddedEngine::open(dir.path()).unwrap();
    let info = engine.stream_info(&stream()).await.unwrap();
    assert_eq!((info.state.first_seq, info.state.last_seq, info.state.messages), (Seq(1), Seq(3), 2));
    // Filtered consumers count through the index: `j.a` holds seq 3 (missing
    // without the repair) and not seq 2 (still there without it).
    let from_3 = DeliverPolicy::FromSeq { seq: Seq(3) };
    for (name, filter, deliver) in
        [("a_all", "j.a", DeliverPolicy::All), ("a_new", "j.a", from_3), ("b", "j.b", DeliverPolicy::All)]
    {
        assert_eq!(pending_through_index(&engine, name, filter, deliver).await, 1, "consumer {name}");
    }
    engine.close().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn damage_before_the_last_batch_refuses_to_open() {
    let dir = tempfile::tempdir().unwrap();
    let journal = write_and_close(dir.path()).await;
    let mut bytes = std::fs::read(&journal).unwrap();
    let end = data_end(&bytes);
    // Flip a byte inside a message payload in the middle of the journal.
    let needle = format!("message-{:04}-", MESSAGES / 2);
    let at = bytes[..end].windows(needle.len()).position(|w| w == needle.as_bytes()).expect("payload in journal");
    bytes[at] ^= 0x55;
    std::fs::write(&journal, &bytes).unwrap();

    let err = EmbeddedEngine::open(dir.path()).err().expect("a corrupt journal must not open");
    assert_eq!(err.kind(), ErrorKind::Internal, "{err}");
    assert!(err.message().contains("corrupt"), "{err}");
}

/// Large messages go to the journal as they are: lz4 on the one writer
/// thread cost more than the journal bytes it saved (fjall compresses
/// entries of 4 KiB and more unless told not to).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn large_messages_are_journaled_uncompressed() {
    let dir = tempfile::tempdir().unwrap();
    let engine = EmbeddedEngine::open(dir.path()).unwrap();
    create_stream(&engine, None).await;
    // 64 KiB that lz4 would shrink to a few hundred bytes.
    let large = Bytes::from("finmesh-journal!".repeat(4096));
    engine.publish(&stream(), OutgoingMessage::new(Subject::new("j.x").unwrap(), large.clone())).await.unwrap();
    let journal = std::fs::read(newest_journal(dir.path())).unwrap();
    assert!(
        journal.windows(large.len()).any(|w| w == &large[..]),
        "the message is not in the journal as written ({} journal bytes)",
        data_end(&journal)
    );
    engine.close().await.unwrap();
}
