//! Paginated key listing ([`KvEngine::kv_keys_page`](crate::KvEngine::kv_keys_page)):
//! following the cursor visits every live key once, in bytewise order;
//! deleted, purged and unmatched keys never show; the limit is checked.

use bytes::Bytes;
use futures::future::try_join_all;

use crate::engine::MAX_KEYS_PAGE;
use crate::testsuite::Harness;
use crate::testsuite::kv::bucket_with_history;
use crate::testsuite::support::*;
use crate::{BucketName, Engine, ErrorKind, Key};

/// Every page of `prefix` with `limit`, following the cursor; checks each
/// page's shape on the way.
async fn walk(e: &dyn Engine, b: &BucketName, prefix: &str, limit: usize) -> Vec<String> {
    let mut out = Vec::new();
    let mut after: Option<Key> = None;
    loop {
        let page = e.kv_keys_page(b, prefix, after.as_ref(), limit).await.expect("a page");
        assert!(page.keys.len() <= limit, "a page of {} keys with limit {limit}", page.keys.len());
        if let Some(next) = &page.next {
            assert_eq!(page.keys.len(), limit, "only a full page has a next cursor");
            assert_eq!(Some(next), page.keys.last(), "the cursor is the page's last key");
        }
        out.extend(page.keys.iter().map(|k| k.to_string()));
        match page.next {
            Some(next) => after = Some(next),
            None => return out,
        }
        assert!(out.len() <= 100_000, "the walk does not end");
    }
}

/// 1,000 keys in pages of 7: every live key once, sorted; deletes and
/// purges skipped; the prefix respected.
pub async fn paging_visits_every_live_key_once_in_order<H: Harness>() {
    let h = H::start().await;
    let e = h.engine();
    let b = bucket_with_history(&*e, 1).await;
    // Written out of order, 50 at a time.
    let names: Vec<String> =
        (0..1000).map(|i| format!("{}.{:04}", ["x", "a", "m"][i % 3], (i * 7919) % 1000)).collect();
    let keys: Vec<Key> = names.iter().map(|k| key(k)).collect();
    for chunk in keys.chunks(50) {
        try_join_all(chunk.iter().map(|k| e.kv_put(&b, k, Bytes::from("v")))).await.expect("put");
    }
    for (i, k) in names.iter().enumerate() {
        if i % 10 == 3 {
            e.kv_delete(&b, &key(k)).await.unwrap();
        } else if i % 10 == 7 {
            e.kv_purge(&b, &key(k)).await.unwrap();
        }
    }
    let mut live: Vec<String> =
        names.into_iter().enumerate().filter(|(i, _)| i % 10 != 3 && i % 10 != 7).map(|(_, k)| k).collect();
    live.sort();
    assert_eq!(walk(&*e, &b, "", 7).await, live);
    let a: Vec<String> = live.iter().filter(|k| k.starts_with("a.")).cloned().collect();
    assert!(!a.is_empty());
    assert_eq!(walk(&*e, &b, "a.", 7).await, a);
    let m0: Vec<String> = live.iter().filter(|k| k.starts_with("m.00")).cloned().collect();
    assert_eq!(walk(&*e, &b, "m.00", 3).await, m0);
    assert_eq!(walk(&*e, &b, "", live.len()).await, live, "one page exactly as long as the list");
    assert_eq!(walk(&*e, &b, "", MAX_KEYS_PAGE).await, live);
    assert!(walk(&*e, &b, "zzz", 7).await.is_empty());
    // The unpaged listing agrees.
    let all: Vec<String> = e.kv_keys(&b, "").await.unwrap().iter().map(|k| k.to_string()).collect();
    assert_eq!(all, live);
}

/// A cursor starts strictly after itself, need not be a stored key, and a
/// cursor past the end gives an empty last page; a limit of 0 is `Invalid`,
/// one above [`MAX_KEYS_PAGE`] is clamped; a missing bucket is `NotFound`.
pub async fn keys_page_cursor_and_limit_rules<H: Harness>() {
    let h = H::start().await;
    let e = h.engine();
    let b = bucket_with_history(&*e, 1).await;
    for k in ["a", "b", "c", "d"] {
        e.kv_put(&b, &key(k), Bytes::from(k)).await.unwrap();
    }
    let page = |after: Option<&'static str>, limit: usize| {
        let (e, b) = (e.clone(), b.clone());
        async move {
            let after = after.map(key);
            let p = e.kv_keys_page(&b, "", after.as_ref(), limit).await.unwrap();
            (p.keys.iter().map(|k| k.to_string()).collect::<Vec<_>>(), p.next.map(|k| k.to_string()))
        }
    };
    assert_eq!(page(None, 2).await, (vec!["a".into(), "b".into()], Some("b".into())));
    assert_eq!(page(Some("b"), 2).await, (vec!["c".into(), "d".into()], None), "a full last page has no next");
    assert_eq!(page(Some("bb"), 10).await, (vec!["c".into(), "d".into()], None), "a cursor that is not a key");
    assert_eq!(page(Some("d"), 10).await, (vec![], None));
    assert_eq!(page(Some("zzz"), 10).await, (vec![], None));
    assert_eq!(page(None, usize::MAX).await.0.len(), 4, "a huge limit is clamped, not refused");
    expect_kind(e.kv_keys_page(&b, "", None, 0).await, ErrorKind::Invalid);
    expect_kind(e.kv_keys_page(&bucket("nope"), "", None, 10).await, ErrorKind::NotFound);
    // A key deleted behind the cursor does not disturb the walk.
    let first = e.kv_keys_page(&b, "", None, 2).await.unwrap();
    e.kv_delete(&b, &key("a")).await.unwrap();
    e.kv_delete(&b, &key("c")).await.unwrap();
    let rest = e.kv_keys_page(&b, "", first.next.as_ref(), 2).await.unwrap();
    assert_eq!(rest.keys, vec![key("d")]);
    assert_eq!(rest.next, None);
}
