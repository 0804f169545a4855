//! Bounded reads through an ephemeral consumer: ranges, last per subject,
//! KV history and keys.
//!
//! The consumer (no acks, memory storage, removed after 10 s of inactivity
//! and deleted at once after the read) reports in its create reply how many
//! messages match (`num_pending`), so the read asks for exactly
//! `min(limit, num_pending)` messages with `no_wait` and never waits for
//! messages that are not there.
//!
//! In a cluster NATS may put the consumer on another server than the
//! client's, and the create reply can arrive before that server's interest
//! in the consumer's pull subject has reached the client's server: a pull
//! sent then is answered "no responders". That is not the end of the data:
//! the pull is repeated (backoff 2 ms doubling to 50 ms) for up to the
//! request timeout, then the read fails with `Unavailable`. A read never
//! returns fewer messages than it counted because a pull was not routed.
//!
//! Messages are pulled [`SNAPSHOT_PULL`] at a time. A pull whose messages
//! stop coming before it ended ([`PullEnd::Stalled`]) fails the read with
//! `Unavailable`: the consumer has no acks, so what the server sent into
//! the abandoned pull would be missing from the answer. (Before, a pull of
//! 100,000 messages on a busy machine could outlast a fixed 2 s deadline
//! and the read silently returned fewer keys.)

use std::time::{Duration, Instant};

use finmesh_core::{Error, Message, Result};
use serde_json::{Value, json};

use crate::Inner;
use crate::api::{self, PullEnd};

/// Backoff between pulls the server answered with "no responders".
const FIRST_BACKOFF: Duration = Duration::from_millis(2);
const MAX_BACKOFF: Duration = Duration::from_millis(50);
/// Messages asked for per pull: a read of any size is a series of pulls
/// of at most this many, each read to its end.
const SNAPSHOT_PULL: usize = 1_000;

#[derive(serde::Deserialize)]
struct Created {
    name: String,
    #[serde(default)]
    num_pending: u64,
}

impl Inner {
    /// Up to `limit` messages of `stream` as the consumer config `cfg`
    /// (deliver policy, start, filter) selects, in sequence order.
    pub(crate) async fn snapshot(&self, stream: &str, mut cfg: Value, limit: usize) -> Result<Vec<Message>> {
        cfg["ack_policy"] = json!("none");
        cfg["mem_storage"] = json!(true);
        cfg["num_replicas"] = json!(1);
        cfg["inactive_threshold"] = json!(10_000_000_000u64);
        let body = json!({ "stream_name": stream, "config": cfg });
        let created: Created =
            self.request(&format!("CONSUMER.CREATE.{stream}"), &body, &format!("read stream `{stream}`")).await?;
        let want = (created.num_pending.min(usize::MAX as u64) as usize).min(limit);
        let mut pulled = Vec::with_capacity(want.min(10_000));
        let mut result = Ok(());
        let started = Instant::now();
        let mut backoff = FIRST_BACKOFF;
        while pulled.len() < want {
            let before = pulled.len();
            let batch = (want - before).min(SNAPSHOT_PULL);
            match api::pull(&self.client, &self.prefix, stream, &created.name, batch, None, &mut pulled).await {
                Ok(PullEnd::Done) if pulled.len() > before => {}
                // Fewer than counted: removed meanwhile (limits, a purge).
                Ok(PullEnd::Done) => break,
                Ok(PullEnd::Unrouted) if started.elapsed() < self.options.request_timeout => {
                    tokio::time::sleep(backoff).await;
                    backoff = (backoff * 2).min(MAX_BACKOFF);
                }
                Ok(PullEnd::Unrouted) => {
                    result = Err(Error::unavailable(format!(
                        "read stream `{stream}`: no server answered for its reading consumer within {:?}",
                        self.options.request_timeout
                    )));
                    break;
                }
                Ok(PullEnd::Stalled) => {
                    result = Err(Error::unavailable(format!(
                        "read stream `{stream}`: the server stopped answering its reading consumer for {:?}",
                        api::PULL_IDLE
                    )));
                    break;
                }
                Ok(PullEnd::Gone) => {
                    result = Err(Error::unavailable(format!(
                        "read stream `{stream}`: its reading consumer was deleted during the read"
                    )));
                    break;
                }
                Err(e) => {
                    result = Err(e);
                    break;
                }
            }
        }
        let client = self.client.clone();
        let subject = format!("{}.CONSUMER.DELETE.{stream}.{}", self.prefix, created.name);
        // Best effort: the inactivity threshold removes it anyway.
        tokio::spawn(async move {
            let _ = client.publish(subject, bytes::Bytes::new()).await;
        });
        result?;
        Ok(pulled.into_iter().map(|p| p.message).collect())
    }
}
