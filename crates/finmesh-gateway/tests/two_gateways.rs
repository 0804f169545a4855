//! Two (and three) gateways on one 3-node NATS cluster (issue 18): a key
//! rotation made through one gateway is used by the others without a
//! restart.
//! - gateway B follows the stored ring (as every node does): after a
//!   rotation through A, a value written through B is sealed under the new
//!   key id;
//! - gateway C does not follow: it meets a value sealed with a key it has
//!   not loaded, reloads the ring once and opens it;
//! - a re-encryption through B and the retirement through A then leave
//!   every value readable through all three.

use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::body::{Body, Bytes};
use axum::http::{Method, Request, StatusCode};
use finmesh_auth::Authenticator;
use finmesh_core::{BucketName, Engine, Key, KvEngine};
use finmesh_crypto::{FileKeyProvider, KeyAdmin, KeyId, KeyPurpose, RingStore, SecureEngine, keys_bucket_config};
use finmesh_gateway::{AppState, GatewayConfig, app};
use finmesh_nats::{NatsEngine, NatsEngineOptions};
use finmesh_testkit::NatsCluster;
use http_body_util::BodyExt;
use serde_json::json;
use tower::ServiceExt;

struct Gateway {
    app: Router,
    keys: Arc<RingStore>,
    follow: Option<tokio::task::JoinHandle<()>>,
}

impl Drop for Gateway {
    fn drop(&mut self) {
        if let Some(f) = &self.follow {
            f.abort();
        }
    }
}

async fn engine_on(urls: Vec<String>) -> Arc<dyn Engine> {
    let mut options = NatsEngineOptions::new(urls[0].clone());
    options.servers = urls;
    Arc::new(NatsEngine::connect(options).await.expect("connect the engine"))
}

/// A gateway as `finmesh serve` builds one with `[security]`: the ring
/// loaded from the engine (created by the first), following it or not.
async fn gateway(raw: Arc<dyn Engine>, provider: &FileKeyProvider, first: bool, follow: bool) -> Gateway {
    let kv: Arc<dyn KvEngine> = raw.clone();
    let keys = if first {
        RingStore::open_or_create(kv, provider, keys_bucket_config(3)).await
    } else {
        RingStore::open(kv, provider, BucketName::new(finmesh_crypto::KEYS_BUCKET).unwrap()).await
    };
    let keys = Arc::new(keys.expect("key ring"));
    let secure = Arc::new(SecureEngine::new(raw, keys.clone()));
    let admin = Arc::new(KeyAdmin::new(secure.clone()));
    let state = AppState::new(secure, Authenticator::disabled(), GatewayConfig::default()).with_key_admin(admin);
    let follow = follow.then(|| {
        let keys = keys.clone();
        tokio::spawn(async move { keys.follow().await })
    });
    Gateway { app: app(state), keys, follow }
}

impl Gateway {
    async fn send(&self, method: Method, uri: &str, body: &str) -> (StatusCode, Bytes) {
        let req = Request::builder().method(method).uri(uri).body(Body::from(body.to_owned())).unwrap();
        let res = self.app.clone().oneshot(req).await.unwrap();
        let status = res.status();
        (status, res.into_body().collect().await.unwrap().to_bytes())
    }

    async fn ok(&self, method: Method, uri: &str, body: &str) -> Bytes {
        let (status, bytes) = self.send(method, uri, body).await;
        assert_eq!(status, StatusCode::OK, "{uri}: {}", String::from_utf8_lossy(&bytes));
        bytes
    }

    fn active(&self) -> KeyId {
        self.keys.ring().active(KeyPurpose::Encryption).id()
    }
}

async fn sealed_with(raw: &Arc<dyn Engine>, key: &str) -> KeyId {
    let entry = raw.kv_get(&BucketName::new("cards").unwrap(), &Key::new(key).unwrap()).await.unwrap().unwrap();
    finmesh_crypto::key_id_of(&entry.value).unwrap()
}

async fn a_rotation_through_one_gateway_is_used_by_the_others() {
    let mut cluster = NatsCluster::start(3).await.expect("start a 3-node nats cluster");
    cluster.wait_healthy(Duration::from_secs(30)).await.expect("cluster healthy");
    let urls = cluster.urls();
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("master.key");
    FileKeyProvider::create(&path).unwrap();
    let provider = FileKeyProvider::new(path);
    // Each gateway on its own connection, to a different node first.
    let raw_a = engine_on(urls.clone()).await;
    let a = gateway(raw_a.clone(), &provider, true, true).await;
    let b = gateway(engine_on(vec![urls[1].clone(), urls[0].clone()]).await, &provider, false, true).await;
    let c = gateway(engine_on(vec![urls[2].clone(), urls[0].clone()]).await, &provider, false, false).await;

    a.ok(Method::PUT, "/v1/kv/cards", &json!({"security": {"encryption": "aes256gcm"}}).to_string()).await;
    a.ok(Method::PUT, "/v1/kv/cards/before", "sealed with key 1").await;
    assert_eq!(c.ok(Method::GET, "/v1/kv/cards/before", "").await, "sealed with key 1");

    let mut installed = b.keys.subscribe();
    let rotated = a.ok(Method::POST, "/v1/keys/rotate", r#"{"purpose": "encryption"}"#).await;
    let new = KeyId(serde_json::from_slice::<serde_json::Value>(&rotated).unwrap()["id"].as_u64().unwrap() as u32);
    assert_eq!(new, KeyId(3));
    assert_eq!(a.active(), new);

    // B follows the stored ring: the rotation reaches it by its watch.
    tokio::time::timeout(Duration::from_secs(20), installed.wait_for(|_| b.active() == new))
        .await
        .expect("gateway B installs the rotated ring")
        .unwrap();
    b.ok(Method::PUT, "/v1/kv/cards/from-b", "written through B").await;
    assert_eq!(sealed_with(&raw_a, "from-b").await, new, "B seals with the key rotated through A");
    assert_eq!(a.ok(Method::GET, "/v1/kv/cards/from-b", "").await, "written through B");

    // C does not follow: it has not loaded key 3, meets it, reloads once.
    a.ok(Method::PUT, "/v1/kv/cards/from-a", "written through A").await;
    assert_eq!(sealed_with(&raw_a, "from-a").await, new);
    assert!(c.keys.ring().get(new).is_none(), "C has not loaded key {new} yet");
    assert_eq!(c.ok(Method::GET, "/v1/kv/cards/from-a", "").await, "written through A");
    assert!(c.keys.ring().get(new).is_some(), "C reloaded the ring on meeting key {new}");

    // Re-encrypt through B, retire through A, read through C.
    let lines = b.ok(Method::POST, "/v1/keys/reencrypt/cards", "").await;
    let last: serde_json::Value =
        serde_json::from_slice(lines.split(|&b| b == b'\n').rfind(|l| !l.is_empty()).unwrap()).unwrap();
    assert_eq!(last["done"], true, "{last}");
    assert_eq!(last["total"]["rewritten"], 1, "only `before` was under key 1: {last}");
    assert_eq!(sealed_with(&raw_a, "before").await, new);
    let retired = a.ok(Method::POST, "/v1/keys/1/retire", "").await;
    assert!(String::from_utf8_lossy(&retired).contains("\"retired\""));
    for key in ["before", "from-a", "from-b"] {
        let (status, _) = c.send(Method::GET, &format!("/v1/kv/cards/{key}"), "").await;
        assert_eq!(status, StatusCode::OK, "{key} through C");
    }
    drop((a, b, c));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nats_cluster() {
    tokio::time::timeout(Duration::from_secs(120), a_rotation_through_one_gateway_is_used_by_the_others())
        .await
        .expect("case timed out");
}
