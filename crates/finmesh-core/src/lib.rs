//! finmesh-core: the model every part of finmesh shares.
//!
//! Read in this order:
//! 1. [`error`]: the error type (a comparable kind plus a source);
//! 2. [`names`] and [`subject`]: validated names, keys and subjects;
//! 3. [`message`]: sequences, revisions, timestamps, headers, messages;
//! 4. [`config`]: stream, bucket and consumer configurations, and
//!    [`options`]: their security options and user metadata;
//! 5. [`engine`]: the engine traits and their semantics.
//!
//! With the `testsuite` feature, `testsuite` is the conformance suite that
//! every engine runs through `engine_conformance_tests!`.

pub mod config;
pub mod engine;
pub mod error;
pub mod message;
pub mod names;
pub mod options;
pub mod subject;

#[cfg(feature = "testsuite")]
pub mod testsuite;

pub use config::{
    BucketConfig, BucketInfo, ConsumerConfig, ConsumerInfo, DeliverPolicy, StreamConfig, StreamInfo, StreamState,
    SyncPolicy,
};
pub use engine::{
    AckKind, AckToken, BoxStream, ConsumerEngine, Delivery, Engine, FetchRequest, KeysPage, KvEngine, KvEntry, KvOp,
    ReadRequest, ReadStart, StreamEngine, TailEvent, WatchStart,
};
pub use error::{Error, ErrorKind, Result};
pub use message::{Headers, Message, OutgoingMessage, PubAck, Revision, Seq, Timestamp};
pub use names::{BucketName, ConsumerName, Key, StreamName};
pub use options::{BucketSecurity, Encryption, KeyFormat, KeyHashing, Metadata, SecurityOption, StreamSecurity};
pub use subject::{Subject, SubjectPattern};
