//! Bounded reads through an ephemeral consumer: ranges, last per subject,
//! KV history and keys.
//!
//! The consumer (no acks, memory storage, removed after 10 s of inactivity
//! and deleted at once after the read) reports in its create reply how many
//! messages match (`num_pending`), so the read asks for exactly
//! `min(limit, num_pending)` messages with `no_wait` and never waits for
//! messages that are not there.

use finmesh_core::{Message, Result};
use serde_json::{Value, json};

use crate::Inner;
use crate::api;

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
        while pulled.len() < want {
            let before = pulled.len();
            match api::pull(&self.client, &self.prefix, stream, &created.name, want - before, None, &mut pulled).await {
                Ok(api::PullEnd::Done) if pulled.len() > before => {}
                Ok(_) => break,
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
