//! Encrypted and hashed buckets through the gateway over the encrypting
//! wrapper (issue 18), on both engines: a value that fails to open answers
//! 500 with its own problem type and names nothing; a card-number bucket
//! answers 400 naming the rule broken, never the number; keys are stored
//! hashed and values sealed, and reads by the clear key work.

mod support;

use bytes::Bytes;
use finmesh_core::{BucketName, Key};
use serde_json::json;
use support::{Gw, Harness};

const PAN: &str = "4111111111111111";

async fn integrity_failure_is_a_500_with_its_own_type<H: Harness>() {
    let (gw, raw) = Gw::secure::<H>().await;
    assert!(gw.state.keys().is_some(), "the state keeps the key ring");
    let body = json!({"security": {"encryption": "aes256gcm"}}).to_string();
    assert_eq!(gw.put("/v1/kv/cards", body).await.status, 200);
    assert_eq!(gw.put("/v1/kv/cards/a", "value of a").await.status, 200);
    assert_eq!(gw.put("/v1/kv/cards/b", "value of b").await.status, 200);
    let b = BucketName::new("cards").unwrap();
    let sealed = raw.kv_get(&b, &Key::new("a").unwrap()).await.unwrap().unwrap().value;
    assert!(!sealed.windows(10).any(|w| w == b"value of a"), "stored sealed");
    raw.kv_put(&b, &Key::new("b").unwrap(), sealed).await.unwrap();
    let p = gw.get("/v1/kv/cards/b").await.assert_problem(500, "integrity");
    let detail = p["detail"].as_str().unwrap();
    assert!(detail.contains("integrity") && !detail.contains("value of"), "{p}");
    gw.get("/v1/kv/cards/b/history").await.assert_problem(500, "integrity");
    assert_eq!(gw.get("/v1/kv/cards/a").await.text(), "value of a", "the original still opens");
    raw.kv_put(&b, &Key::new("a").unwrap(), Bytes::from_static(b"never sealed")).await.unwrap();
    gw.get("/v1/kv/cards/a").await.assert_problem(500, "integrity");
}

async fn pan_buckets_name_the_rule_never_the_number<H: Harness>() {
    let (gw, raw) = Gw::secure::<H>().await;
    let body = json!({"security": {"encryption": "aes256gcm", "key_hashing": "hmac-sha256", "key_format": "pan"}});
    let info = gw.put("/v1/kv/cards", body.to_string()).await;
    assert_eq!(info.status, 200, "{}", info.text());
    assert_eq!(info.json()["config"]["security"]["key_format"], "pan");
    assert_eq!(gw.put(&format!("/v1/kv/cards/{PAN}"), "tok").await.status, 200);
    assert_eq!(gw.get(&format!("/v1/kv/cards/{PAN}")).await.text(), "tok");
    for (bad, rule) in [
        ("4111111111111112", "Luhn"),
        ("41111111", "12 to 19"),
        ("4111x11111111111", "digits only"),
        ("4111%201111%201111%201111", "not allowed"),
    ] {
        for res in [gw.put(&format!("/v1/kv/cards/{bad}"), "v").await, gw.get(&format!("/v1/kv/cards/{bad}")).await] {
            let p = res.assert_problem(400, "invalid");
            let text = p.to_string();
            assert!(text.contains(rule) || text.contains("allowed are"), "{bad}: {p}");
            assert!(!text.contains("41111111") && !text.contains("4111 1111"), "{bad}: {p}");
        }
    }
    // Missing keys are named masked.
    let p = gw.get("/v1/kv/cards/5500005555555559").await.assert_problem(404, "not-found");
    assert!(!p.to_string().contains("5500005555"), "{p}");
    // Storage holds the hash, the listing says so, a prefix is refused.
    let stored = raw.kv_keys(&BucketName::new("cards").unwrap(), "").await.unwrap();
    assert_eq!(stored.len(), 1);
    assert!(!stored[0].as_str().contains("411111"), "{stored:?}");
    assert_eq!(gw.get("/v1/kv/cards/keys").await.json()["keys"], json!([stored[0].as_str()]));
    gw.get("/v1/kv/cards/keys?prefix=4111").await.assert_problem(400, "invalid");
}

per_engine!(integrity_failure_is_a_500_with_its_own_type, pan_buckets_name_the_rule_never_the_number);
