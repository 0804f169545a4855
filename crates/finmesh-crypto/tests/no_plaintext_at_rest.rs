//! No plaintext at rest (issue 18): 10,000 random Luhn-valid card numbers
//! (PANs), written as keys and inside values into an encrypted, hashed
//! bucket through [`SecureEngine`], appear nowhere on disk and in no log,
//! in ASCII or with spaces or dashes every 4 digits:
//!
//! - embedded: every byte of the data dir, after the engine closed;
//! - NATS: a 3-node hub cluster (R3 bucket) plus a leaf holding a mirror of
//!   the bucket's stream: every file of every store dir and every server
//!   log, once the mirror holds everything.
//!
//! The scanner is shown to work in the same run: a control bucket without
//! options, holding another set of PANs the same way, is found in every
//! place scanned (each node's and the leaf's store, the data dir).

mod secure;

use std::collections::HashSet;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use finmesh_core::{BucketConfig, BucketName, BucketSecurity, Encryption, Engine, Key, KeyFormat, KeyHashing};
use finmesh_crypto::{RingStore, SecureEngine, keys_bucket_config};
use futures::StreamExt;
use secure::MasterKeyFile;

const PANS: usize = 10_000;
/// Writes in flight at once.
const CONCURRENCY: usize = 64;

/// A random 16-digit Visa-like card number with a valid Luhn digit.
fn random_pan() -> String {
    let mut digits: Vec<u8> = std::iter::once(4).chain((0..14).map(|_| fastrand::u8(0..10))).collect();
    let sum: u32 = digits
        .iter()
        .rev()
        .enumerate()
        .map(|(i, &d)| {
            let d = u32::from(d);
            if i % 2 == 0 {
                let d2 = d * 2;
                if d2 > 9 { d2 - 9 } else { d2 }
            } else {
                d
            }
        })
        .sum();
    digits.push(((10 - sum % 10) % 10) as u8);
    let pan: String = digits.iter().map(|d| char::from(b'0' + d)).collect();
    assert!(finmesh_crypto::validate_pan(&pan).is_ok(), "{pan}");
    pan
}

/// `n` distinct random PANs.
fn pans(n: usize) -> HashSet<String> {
    let mut set = HashSet::with_capacity(n);
    while set.len() < n {
        set.insert(random_pan());
    }
    set
}

/// The value stored for `pan`: the number itself inside a record.
fn value_of(pan: &str) -> Bytes {
    Bytes::from(format!("{{\"holder\":\"A. Cardholder\",\"pan\":\"{pan}\",\"exp\":\"12/30\"}}"))
}

/// Every 16-digit number in `data` written as 16 digits, or as 4 groups of
/// 4 with one space or one dash between groups, normalized to its digits.
fn card_numbers_in(data: &[u8], found: &mut dyn FnMut(&str)) {
    let mut i = 0;
    while i < data.len() {
        if !data[i].is_ascii_digit() || (i > 0 && data[i - 1].is_ascii_digit()) {
            i += 1;
            continue;
        }
        for sep in [None, Some(b' '), Some(b'-')] {
            let mut digits = String::with_capacity(16);
            let mut at = i;
            let mut ok = true;
            for group in 0..4 {
                if group > 0
                    && let Some(s) = sep
                {
                    if data.get(at) != Some(&s) {
                        ok = false;
                        break;
                    }
                    at += 1;
                }
                for _ in 0..4 {
                    match data.get(at) {
                        Some(d) if d.is_ascii_digit() => digits.push(char::from(*d)),
                        _ => ok = false,
                    }
                    at += 1;
                }
                if !ok {
                    break;
                }
            }
            if ok && data.get(at).is_none_or(|d| !d.is_ascii_digit()) {
                found(&digits);
            }
        }
        i += 1;
    }
}

/// How many of `wanted` occur in the files under `dirs` and in `logs`.
fn hits(dirs: &[PathBuf], logs: &[String], wanted: &HashSet<String>) -> usize {
    let mut seen = HashSet::new();
    let mut look = |data: &[u8]| {
        card_numbers_in(data, &mut |d| {
            if wanted.contains(d) {
                seen.insert(d.to_owned());
            }
        })
    };
    for dir in dirs {
        for file in files(dir) {
            look(&std::fs::read(&file).unwrap_or_default());
        }
    }
    for log in logs {
        look(log.as_bytes());
    }
    seen.len()
}

fn files(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    let mut todo = vec![dir.to_path_buf()];
    while let Some(d) = todo.pop() {
        let Ok(entries) = std::fs::read_dir(&d) else { continue };
        for e in entries.flatten() {
            let p = e.path();
            if p.is_dir() { todo.push(p) } else { out.push(p) }
        }
    }
    out
}

#[test]
fn the_scanner_finds_every_form() {
    let pan = random_pan();
    let spaced: String =
        pan.as_bytes().chunks(4).map(|c| std::str::from_utf8(c).unwrap()).collect::<Vec<_>>().join(" ");
    let dashed = spaced.replace(' ', "-");
    for text in [format!("x{pan}y"), format!("\"{spaced}\""), format!("{dashed}\n")] {
        let mut found = Vec::new();
        card_numbers_in(text.as_bytes(), &mut |d| found.push(d.to_owned()));
        assert_eq!(found, vec![pan.clone()], "{text}");
    }
    let mut found = Vec::new();
    card_numbers_in(format!("1{pan}").as_bytes(), &mut |d| found.push(d.to_owned()));
    assert!(found.is_empty(), "a longer number is not this card number");
}

/// Log lines of this process (every level from debug), to scan as well.
#[derive(Clone, Default)]
struct CapturedLogs(Arc<Mutex<Vec<u8>>>);

impl std::io::Write for CapturedLogs {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

fn capture_logs() -> CapturedLogs {
    let logs = CapturedLogs::default();
    let writer = logs.clone();
    let _ = tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::new("debug"))
        .with_writer(move || writer.clone())
        .try_init();
    logs
}

fn secured() -> BucketSecurity {
    BucketSecurity {
        encryption: Some(Encryption::Aes256Gcm),
        key_hashing: Some(KeyHashing::HmacSha256),
        key_format: Some(KeyFormat::Pan),
    }
}

/// Write every PAN of `set` as a key, with a value holding it, into `bucket`.
async fn write_all(engine: &Arc<dyn Engine>, bucket: &BucketName, set: &HashSet<String>) {
    let started = Instant::now();
    let writes = futures::stream::iter(set.iter().cloned()).map(|pan| {
        let (engine, bucket) = (engine.clone(), bucket.clone());
        async move {
            let key = Key::new(pan.as_str()).unwrap();
            engine.kv_put(&bucket, &key, value_of(&pan)).await.unwrap_or_else(|e| panic!("put: {e}"));
        }
    });
    writes.buffer_unordered(CONCURRENCY).collect::<Vec<()>>().await;
    println!("{} puts into {bucket} in {:?}", set.len(), started.elapsed());
}

/// Spot checks: values read back in clear through the wrapper.
async fn read_some(engine: &Arc<dyn Engine>, bucket: &BucketName, set: &HashSet<String>) {
    for pan in set.iter().take(20) {
        let entry = engine.kv_get(bucket, &Key::new(pan.as_str()).unwrap()).await.unwrap().expect("written");
        assert_eq!(entry.value, value_of(pan));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn embedded_data_dir_holds_no_card_number() {
    let logs = capture_logs();
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let raw = finmesh_embedded::EmbeddedEngine::open(&data).unwrap();
    let master = MasterKeyFile::new();
    let engine: Arc<dyn Engine> = secure::wrap(Arc::new(raw.clone()), &master, false).await;
    let (secret, control) = (bucket("cards"), bucket("control"));
    engine.create_bucket(BucketConfig { security: secured(), ..BucketConfig::new(secret.clone()) }).await.unwrap();
    engine.create_bucket(BucketConfig::new(control.clone())).await.unwrap();
    let (secret_pans, control_pans) = (pans(PANS), pans(100));
    write_all(&engine, &secret, &secret_pans).await;
    write_all(&engine, &control, &control_pans).await;
    read_some(&engine, &secret, &secret_pans).await;
    drop(engine);
    raw.close().await.unwrap();

    let logs = String::from_utf8_lossy(&logs.0.lock().unwrap()).into_owned();
    let dirs = [data];
    assert_eq!(hits(&dirs, &[], &control_pans), control_pans.len(), "the scanner sees the control bucket");
    assert_eq!(hits(&dirs, &[logs], &secret_pans), 0, "card numbers of the encrypted bucket at rest");
}

fn bucket(name: &str) -> BucketName {
    BucketName::new(name).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nats_cluster_and_leaf_mirror_hold_no_card_number() {
    use async_nats::jetstream::{self, stream};
    use finmesh_testkit::{HUB_DOMAIN, HubAndLeaves};
    let logs = capture_logs();
    let sites = HubAndLeaves::builder().direct_leaf().start().await.unwrap();
    let mut options = finmesh_nats::NatsEngineOptions::new("");
    options.servers = sites.hub().urls();
    let raw = finmesh_nats::NatsEngine::connect(options).await.unwrap();
    let master = MasterKeyFile::new();
    let inner: Arc<dyn Engine> = Arc::new(raw.clone());
    let kv: Arc<dyn finmesh_core::KvEngine> = inner.clone();
    let keys = RingStore::open_or_create(kv, &master.provider, keys_bucket_config(3)).await;
    let engine: Arc<dyn Engine> = Arc::new(SecureEngine::new(inner, Arc::new(keys.unwrap())));
    let (secret, control) = (bucket("cards"), bucket("control"));
    for (b, security) in [(&secret, secured()), (&control, BucketSecurity::default())] {
        let config = BucketConfig { security, replicas: 3, ..BucketConfig::new(b.clone()) };
        engine.create_bucket(config).await.unwrap();
    }
    let (secret_pans, control_pans) = (pans(PANS), pans(100));
    write_all(&engine, &secret, &secret_pans).await;
    write_all(&engine, &control, &control_pans).await;
    read_some(&engine, &secret, &secret_pans).await;

    // The edge site: mirrors of both buckets' streams on the leaf.
    let leaf = jetstream::new(async_nats::connect(sites.leaf(0).url()).await.unwrap());
    let hub_api = stream::External { api_prefix: format!("$JS.{HUB_DOMAIN}.API"), delivery_prefix: None };
    for b in [&secret, &control] {
        let origin = format!("KV_{b}");
        leaf.create_stream(stream::Config {
            name: format!("{origin}_MIRROR"),
            mirror: Some(stream::Source { name: origin, external: Some(hub_api.clone()), ..Default::default() }),
            ..Default::default()
        })
        .await
        .unwrap();
    }
    let wanted = (PANS + control_pans.len()) as u64;
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let mut held = 0;
        for b in [&secret, &control] {
            held += leaf.get_stream(format!("KV_{b}_MIRROR")).await.unwrap().info().await.unwrap().state.messages;
        }
        if held == wanted {
            break;
        }
        assert!(Instant::now() < deadline, "the leaf mirrors hold {held} of {wanted} messages");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    // Every store dir, each on its own, shows the control set: the files
    // hold what was written (polled: a server writes its blocks shortly
    // after it acks).
    let stores: Vec<PathBuf> = sites
        .hub()
        .nodes()
        .iter()
        .map(|n| n.store_dir().to_path_buf())
        .chain([sites.leaf(0).server().store_dir().to_path_buf()])
        .collect();
    for store in &stores {
        let deadline = Instant::now() + Duration::from_secs(20);
        while hits(std::slice::from_ref(store), &[], &control_pans) < control_pans.len() {
            assert!(Instant::now() < deadline, "{} never held the control set", store.display());
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
    let mut all_logs: Vec<String> = sites
        .hub()
        .nodes()
        .iter()
        .map(|n| n.log_path())
        .chain([sites.leaf(0).server().log_path()])
        .map(|p| std::fs::read_to_string(p).unwrap_or_default())
        .collect();
    all_logs.push(String::from_utf8_lossy(&logs.0.lock().unwrap()).into_owned());
    assert_eq!(hits(&stores, &all_logs, &secret_pans), 0, "card numbers of the encrypted bucket at rest or in logs");
}
