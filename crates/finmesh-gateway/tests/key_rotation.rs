//! Key rotation without downtime (issue 18, item 7), through the key
//! administration routes, on both engines:
//! - rotation under load: writers and readers run through rotate,
//!   re-encrypt and retire; no read fails, no acknowledged write is lost,
//!   every stored value ends under the new key id and the old key retires;
//! - retiring a key that still protects values (or keys, for a hashing key)
//!   is refused with the count per bucket, and succeeds after re-encryption;
//! - a re-encryption stopped mid-way resumes after its last batch without
//!   redoing finished work;
//! - a client write between the job's read of a value and its
//!   compare-and-set is never overwritten (counted `changed`);
//! - the key listing never carries key material.

mod support;

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use axum::http::Method;
use finmesh_core::{BucketName, Engine, Key, KvOp};
use finmesh_gateway::GatewayConfig;
use futures::StreamExt;
use parking_lot::Mutex;
use serde_json::{Value, json};
use support::{Gw, Harness, eventually};

/// The NDJSON lines of a finished re-encryption; panics unless the last
/// one says `done`.
async fn reencrypt(gw: &Gw, bucket: &str, query: &str) -> Vec<Value> {
    let res = gw.post(&format!("/v1/keys/reencrypt/{bucket}{query}"), "").await;
    assert_eq!(res.status, 200, "{}", res.text());
    assert_eq!(res.header("content-type"), Some("application/x-ndjson"));
    let lines: Vec<Value> = res.text().lines().map(|l| serde_json::from_str(l).expect("a JSON line")).collect();
    let last = lines.last().expect("at least one line");
    assert_eq!(last["done"], true, "{last}");
    lines
}

async fn encrypted_bucket(gw: &Gw, name: &str) {
    let body = json!({"security": {"encryption": "aes256gcm"}}).to_string();
    let res = gw.put(&format!("/v1/kv/{name}"), body).await;
    assert_eq!(res.status, 200, "{}", res.text());
}

async fn rotate(gw: &Gw, purpose: &str) -> u64 {
    let res = gw.post("/v1/keys/rotate", json!({"purpose": purpose}).to_string()).await;
    assert_eq!(res.status, 200, "{}", res.text());
    let key = res.json();
    assert_eq!(key["purpose"], purpose);
    assert_eq!(key["state"], "active");
    key["id"].as_u64().unwrap()
}

/// Every stored value of `bucket`, read under the wrapper: the key id in
/// its envelope header, per stored key.
async fn stored_key_ids(raw: &Arc<dyn Engine>, bucket: &str) -> HashMap<String, u32> {
    let bucket = BucketName::new(bucket).unwrap();
    let mut out = HashMap::new();
    let mut after: Option<Key> = None;
    loop {
        let page = raw.kv_keys_page(&bucket, "", after.as_ref(), 100).await.unwrap();
        for key in &page.keys {
            let entry = raw.kv_get(&bucket, key).await.unwrap().unwrap();
            assert_eq!(entry.op, KvOp::Put);
            out.insert(key.as_str().to_owned(), finmesh_crypto::key_id_of(&entry.value).unwrap().0);
        }
        match page.next {
            Some(next) => after = Some(next),
            None => return out,
        }
    }
}

const KEYS: usize = 120;
const WRITERS: usize = 4;
const READERS: usize = 2;

async fn rotation_under_load<H: Harness>() {
    // No per-client rate limit: the load is the point.
    let mut config = GatewayConfig::default();
    config.limits.rate = None;
    let (gw, raw) = Gw::secure_with::<H>(config).await;
    let gw = Arc::new(gw);
    encrypted_bucket(&gw, "cards").await;
    for i in 0..KEYS {
        assert_eq!(gw.put(&format!("/v1/kv/cards/k{i}"), format!("seed-{i}")).await.status, 200);
    }
    let stop = Arc::new(AtomicBool::new(false));
    // The last acknowledged value of every key (each key has one writer).
    let acked: Arc<Mutex<HashMap<usize, String>>> =
        Arc::new(Mutex::new((0..KEYS).map(|i| (i, format!("seed-{i}"))).collect()));
    let writes = Arc::new(AtomicU64::new(0));
    let mut tasks = Vec::new();
    for w in 0..WRITERS {
        let (gw, stop, acked, writes) = (gw.clone(), stop.clone(), acked.clone(), writes.clone());
        tasks.push(tokio::spawn(async move {
            let mut round = 0u64;
            while !stop.load(Ordering::Relaxed) {
                for i in (w..KEYS).step_by(WRITERS) {
                    let value = format!("w{w}-r{round}-k{i}");
                    let res = gw.put(&format!("/v1/kv/cards/k{i}"), value.clone()).await;
                    assert_eq!(res.status, 200, "write k{i}: {}", res.text());
                    acked.lock().insert(i, value);
                    writes.fetch_add(1, Ordering::Relaxed);
                    tokio::task::yield_now().await;
                }
                round += 1;
            }
        }));
    }
    let reads = Arc::new(AtomicU64::new(0));
    for r in 0..READERS {
        let (gw, stop, reads) = (gw.clone(), stop.clone(), reads.clone());
        tasks.push(tokio::spawn(async move {
            let mut i = r;
            while !stop.load(Ordering::Relaxed) {
                let res = gw.get(&format!("/v1/kv/cards/k{}", i % KEYS)).await;
                assert_eq!(res.status, 200, "read k{}: {}", i % KEYS, res.text());
                assert!(res.text().ends_with(&format!("k{}", i % KEYS)) || res.text().starts_with("seed-"));
                reads.fetch_add(1, Ordering::Relaxed);
                i += 7;
                // An embedded read never waits: let the other tasks (and
                // the case's timeout) run on this worker.
                tokio::task::yield_now().await;
            }
        }));
    }
    let progressed = |counter: Arc<AtomicU64>, from: u64| async move { counter.load(Ordering::Relaxed) > from };
    eventually(Duration::from_secs(20), "writers and readers under way", || progressed(writes.clone(), 0)).await;

    let new = rotate(&gw, "encryption").await;
    assert_eq!(new, 3, "ids 1 and 2 are the first ring's");
    let w0 = writes.load(Ordering::Relaxed);
    eventually(Duration::from_secs(20), "writes after the rotation", || progressed(writes.clone(), w0 + 20)).await;
    // Re-encrypt and retire while the load runs. A write sealed just before
    // the rotation but stored after the job passed its key would keep key 1
    // alive: the retirement is then refused (409) and another pass fixes it.
    let mut retired = false;
    for _ in 0..5 {
        let lines = reencrypt(&gw, "cards", "?batch=25").await;
        let last = lines.last().unwrap();
        assert_eq!(last["key_id"], new);
        assert_eq!(last["total"]["failed"], 0, "{last}");
        let res = gw.post("/v1/keys/1/retire", "").await;
        if res.status == 200 {
            assert_eq!(res.json()["state"], "retired");
            retired = true;
            break;
        }
        res.assert_problem(409, "key-in-use");
    }
    assert!(retired, "key 1 retires once every value is under key {new}");
    let w1 = writes.load(Ordering::Relaxed);
    let r1 = reads.load(Ordering::Relaxed);
    eventually(Duration::from_secs(20), "writes after the retirement", || progressed(writes.clone(), w1 + 20)).await;
    eventually(Duration::from_secs(20), "reads after the retirement", || progressed(reads.clone(), r1 + 20)).await;
    stop.store(true, Ordering::Relaxed);
    for t in tasks {
        t.await.expect("no writer or reader failed");
    }

    let acked = acked.lock().clone();
    for (i, value) in &acked {
        let res = gw.get(&format!("/v1/kv/cards/k{i}")).await;
        assert_eq!(res.status, 200);
        assert_eq!(&res.text(), value, "k{i}: the last acknowledged write is what is read");
    }
    let ids = stored_key_ids(&raw, "cards").await;
    assert_eq!(ids.len(), KEYS);
    assert!(ids.values().all(|&id| u64::from(id) == new), "every value under key {new}: {ids:?}");
    let keys = gw.get("/v1/keys").await.json();
    let states: Vec<(u64, &str)> = keys["keys"]
        .as_array()
        .unwrap()
        .iter()
        .map(|k| (k["id"].as_u64().unwrap(), k["state"].as_str().unwrap()))
        .collect();
    assert_eq!(states, vec![(1, "retired"), (2, "active"), (3, "active")]);
}

async fn retire_is_refused_with_the_count<H: Harness>() {
    let (gw, _raw) = Gw::secure::<H>().await;
    encrypted_bucket(&gw, "a").await;
    encrypted_bucket(&gw, "b").await;
    assert_eq!(gw.put("/v1/kv/plain", "{}").await.status, 200);
    for (bucket, n) in [("a", 3), ("b", 2), ("plain", 4)] {
        for i in 0..n {
            assert_eq!(gw.put(&format!("/v1/kv/{bucket}/k{i}"), "v").await.status, 200);
        }
    }
    gw.post("/v1/keys/1/retire", "").await.assert_problem(400, "invalid"); // the active key
    assert_eq!(rotate(&gw, "encryption").await, 3);
    let res = gw.post("/v1/keys/1/retire", "").await;
    let p = res.assert_problem(409, "key-in-use");
    assert_eq!(p["usage"]["total"], 5, "{p}");
    assert_eq!(p["usage"]["buckets"], json!({"a": 3, "b": 2}), "{p}");
    let detail = p["detail"].as_str().unwrap();
    assert!(detail.contains("5 values") && detail.contains("bucket `a`: 3 values"), "{detail}");
    let usage = gw.get("/v1/keys/1/usage").await.json();
    assert_eq!(usage, p["usage"]);
    // Still decrypt-only: old values read.
    assert_eq!(gw.get("/v1/kv/a/k0").await.text(), "v");

    let a = reencrypt(&gw, "a", "").await;
    assert_eq!(a.last().unwrap()["total"]["rewritten"], 3);
    let p = gw.post("/v1/keys/1/retire", "").await.assert_problem(409, "key-in-use");
    assert_eq!(p["usage"]["buckets"], json!({"b": 2}), "{p}");
    reencrypt(&gw, "b", "").await;
    let res = gw.post("/v1/keys/1/retire", "").await;
    assert_eq!(res.status, 200, "{}", res.text());
    assert_eq!(res.json()["state"], "retired");
    gw.post("/v1/keys/1/retire", "").await.assert_problem(400, "invalid"); // already retired
    assert_eq!(gw.get("/v1/kv/a/k2").await.text(), "v");
    let res = gw.post("/v1/keys/1/restore", "").await;
    assert_eq!(res.json()["state"], "decrypt_only", "{}", res.text());
    gw.post("/v1/keys/99/retire", "").await.assert_problem(404, "not-found");
    gw.post("/v1/keys/x/retire", "").await.assert_problem(400, "invalid");
    gw.post("/v1/keys/rotate", r#"{"purpose": "signing"}"#).await.assert_problem(400, "invalid");
    gw.post("/v1/keys/reencrypt/plain", "").await.assert_problem(400, "invalid");
    gw.post("/v1/keys/reencrypt/nope", "").await.assert_problem(404, "not-found");
    gw.post("/v1/keys/reencrypt/a?batch=0", "").await.assert_problem(400, "invalid");

    // A hashing key: counted by the stored keys still under its hash.
    let body = json!({"security": {"encryption": "aes256gcm", "key_hashing": "hmac-sha256"}}).to_string();
    assert_eq!(gw.put("/v1/kv/h", body).await.status, 200);
    for i in 0..2 {
        assert_eq!(gw.put(&format!("/v1/kv/h/card{i}"), "t").await.status, 200);
    }
    assert_eq!(rotate(&gw, "hashing").await, 4);
    assert_eq!(gw.get("/v1/kv/h/card1").await.text(), "t", "found under the old hash");
    let p = gw.post("/v1/keys/2/retire", "").await.assert_problem(409, "key-in-use");
    assert_eq!(p["usage"]["buckets"], json!({"h": 2}), "{p}");
    assert!(p["detail"].as_str().unwrap().contains("2 stored keys"), "{p}");
    // Deleting and writing the key again moves it under the active hash.
    for i in 0..2 {
        assert_eq!(gw.delete(&format!("/v1/kv/h/card{i}")).await.status, 200);
        assert_eq!(gw.put(&format!("/v1/kv/h/card{i}"), "t2").await.status, 200);
    }
    let res = gw.post("/v1/keys/2/retire", "").await;
    assert_eq!(res.status, 200, "{}", res.text());
    assert_eq!(gw.get("/v1/kv/h/card0").await.text(), "t2");
}

async fn the_key_listing_shows_no_key_material<H: Harness>() {
    let (gw, _raw) = Gw::secure::<H>().await;
    rotate(&gw, "encryption").await;
    rotate(&gw, "hashing").await;
    let res = gw.get("/v1/keys").await;
    assert_eq!(res.status, 200);
    let body = res.json();
    let keys = body["keys"].as_array().unwrap();
    assert_eq!(keys.len(), 4);
    for key in keys {
        let mut fields: Vec<&str> = key.as_object().unwrap().keys().map(String::as_str).collect();
        fields.sort_unstable();
        assert_eq!(fields, ["created", "id", "purpose", "state"], "{key}");
        assert!(key["created"].as_str().unwrap().ends_with('Z'), "{key}");
    }
    // No run of characters that could hold 32 key bytes (hex or base64).
    let text = res.text();
    let longest = text.split(|c: char| !c.is_ascii_alphanumeric() && c != '+' && c != '/').map(str::len).max();
    assert!(longest.unwrap_or(0) < 40, "{text}");
}

async fn reencrypt_resumes_where_it_stopped<H: Harness>() {
    const N: u64 = 150;
    let (gw, raw) = Gw::secure::<H>().await;
    encrypted_bucket(&gw, "cards").await;
    for i in 0..N {
        assert_eq!(gw.put(&format!("/v1/kv/cards/k{i:03}"), format!("v{i}")).await.status, 200);
    }
    rotate(&gw, "encryption").await;
    // Slowly (50 values/s, batches of 10), and stop after 20 values by
    // going away: the job notices at its next batch and keeps its cursor.
    let res = gw.send_head(Method::POST, "/v1/keys/reencrypt/cards?rate=50&batch=10", &[]).await;
    assert_eq!(res.status(), 200);
    let mut body = res.into_body().into_data_stream();
    let mut text = String::new();
    let mut first: Option<Value> = None;
    while first.is_none() {
        let chunk = body.next().await.expect("progress before the end").expect("a chunk");
        text.push_str(std::str::from_utf8(&chunk).unwrap());
        for line in text.lines() {
            let p: Value = serde_json::from_str(line).unwrap();
            assert_eq!(p["done"], false, "{p}");
            if p["total"]["scanned"].as_u64().unwrap() >= 20 {
                first = Some(p);
            }
        }
    }
    drop(body);
    let first = first.unwrap();
    assert_eq!(first["resumed"], false);
    // A second job starts once the first has stopped (409 until then).
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    let lines: Vec<Value> = loop {
        let res = gw.post("/v1/keys/reencrypt/cards?batch=10", "").await;
        if res.status != 409 {
            assert_eq!(res.status, 200, "{}", res.text());
            break res.text().lines().map(|l| serde_json::from_str(l).unwrap()).collect();
        }
        assert!(tokio::time::Instant::now() < deadline, "the stopped job never let a new one start");
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    let last = lines.last().unwrap();
    assert_eq!(last["done"], true, "{last}");
    assert_eq!(last["resumed"], true, "{last}");
    let run = last["run"]["scanned"].as_u64().unwrap();
    assert!(run <= N - 20, "the resumed run skipped finished batches: {last}");
    assert_eq!(last["total"]["scanned"], N, "every key examined exactly once over both runs: {last}");
    assert_eq!(last["total"]["rewritten"], N, "every value rewritten exactly once: {last}");
    assert!(stored_key_ids(&raw, "cards").await.values().all(|&id| id == 3));
    // A finished job starts over, and finds nothing to do.
    let again = reencrypt(&gw, "cards", "").await;
    let again = again.last().unwrap();
    assert_eq!(again["resumed"], false);
    assert_eq!(again["run"]["rewritten"], 0, "{again}");
    assert_eq!(again["run"]["current"], N, "{again}");
}

/// A client write that lands between the job's read of a value and its
/// compare-and-set is never overwritten: the job counts it `changed` and
/// the client's value stays, sealed under the active key.
async fn a_write_during_reencrypt_is_never_overwritten<H: Harness>() {
    const N: u64 = 40;
    let (gw, raw, counting) = Gw::secure_counting::<H>().await;
    encrypted_bucket(&gw, "cards").await;
    for i in 0..N {
        assert_eq!(gw.put(&format!("/v1/kv/cards/k{i:03}"), format!("v{i}")).await.status, 200);
    }
    let new_key = rotate(&gw, "encryption").await;
    // The job's compare-and-set of k017 waits until the client has written.
    let (reached, go) = counting.pause_update(Key::new("k017").unwrap());
    let client = async {
        reached.await.expect("the job reached k017's compare-and-set");
        assert_eq!(gw.put("/v1/kv/cards/k017", "the client's").await.status, 200);
        go.send(()).unwrap();
    };
    let job = async {
        let lines = reencrypt(&gw, "cards", "?batch=10").await;
        counting.clear_pause(); // a job that never reached k017 fails the client's side
        lines
    };
    let (lines, ()) = tokio::join!(job, client);
    let last = lines.last().unwrap();
    assert_eq!(last["total"]["scanned"], N, "{last}");
    assert_eq!(last["total"]["changed"], 1, "{last}");
    assert_eq!(last["total"]["rewritten"], N - 1, "{last}");
    let res = gw.get("/v1/kv/cards/k017").await;
    assert_eq!(res.status, 200);
    assert_eq!(res.text(), "the client's");
    for i in [0, 16, 18, N - 1] {
        assert_eq!(gw.get(&format!("/v1/kv/cards/k{i:03}")).await.text(), format!("v{i}"));
    }
    let ids = stored_key_ids(&raw, "cards").await;
    assert_eq!(ids.len() as u64, N);
    assert!(ids.values().all(|&id| u64::from(id) == new_key), "{ids:?}");
}

per_engine!(
    rotation_under_load,
    a_write_during_reencrypt_is_never_overwritten,
    retire_is_refused_with_the_count,
    the_key_listing_shows_no_key_material,
    reencrypt_resumes_where_it_stopped
);
