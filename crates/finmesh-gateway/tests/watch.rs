//! KV watch over SSE: `id:` is the revision, deletes are included, and
//! `Last-Event-ID` / `from_revision` resume.

mod support;

use std::time::Duration;

use serde_json::json;
use support::{Gw, Harness, sse_oneshot};

const WAIT: Duration = Duration::from_secs(10);

async fn watch_puts_and_deletes<H: Harness>() {
    let gw = Gw::start::<H>().await;
    gw.put("/v1/kv/b", json!({"history": 5}).to_string()).await;
    gw.put("/v1/kv/b/card.1", "{\"v\":1}").await; // rev 1
    gw.put("/v1/kv/b/acct.1", "x").await; // rev 2
    let mut w = sse_oneshot(&gw, "/v1/kv/b/watch?prefix=card.", &[]).await;
    w.hello().await;
    let first = w.next(WAIT).await.unwrap();
    assert_eq!(first.seq(), 1);
    assert_eq!(first.json()["payload"], json!({"v": 1}));
    assert_eq!(first.json()["op"], "put");
    gw.delete("/v1/kv/b/card.1").await; // rev 3
    gw.put("/v1/kv/b/card.2", "\u{0}").await; // rev 4
    let del = w.next(WAIT).await.unwrap();
    assert_eq!((del.seq(), del.json()["op"].as_str()), (3, Some("delete")));
    let put = w.next(WAIT).await.unwrap();
    assert_eq!((put.seq(), put.json()["encoding"].as_str()), (4, Some("base64")));

    // Resume after revision 1: the delete and the new key, nothing before.
    let mut r = sse_oneshot(&gw, "/v1/kv/b/watch?prefix=card.", &[("last-event-id", "1")]).await;
    r.hello().await;
    assert_eq!(r.next(WAIT).await.unwrap().seq(), 3);
    assert_eq!(r.next(WAIT).await.unwrap().seq(), 4);
    let mut f = sse_oneshot(&gw, "/v1/kv/b/watch?from_revision=2", &[]).await;
    f.hello().await;
    assert_eq!(f.next(WAIT).await.unwrap().seq(), 2);
}

per_engine!(watch_puts_and_deletes);
