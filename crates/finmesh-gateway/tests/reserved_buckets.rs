//! Buckets whose names start with `_finmesh` (any case) hold finmesh's own
//! data, the wrapped key ring first of all: a client deleting or rewriting
//! `_finmesh_keys` would make every sealed value unreadable. Every bucket
//! route answers such a name with a 400 problem, on both engines, and
//! touches nothing; the engine itself still serves the bucket.

mod support;

use bytes::Bytes;
use finmesh_core::{BucketConfig, BucketName, Key};
use support::{Gw, Harness};

async fn reserved_buckets_are_refused_to_clients<H: Harness>() {
    let gw = Gw::start::<H>().await;
    let engine = gw.state.engine();
    let keys = BucketName::new("_finmesh_keys").unwrap();
    engine.create_bucket(BucketConfig::new(keys.clone())).await.unwrap();
    engine.kv_put(&keys, &Key::new("ring").unwrap(), Bytes::from_static(b"wrapped")).await.unwrap();
    for bucket in ["_finmesh_keys", "_FINMESH_keys", "_finmesh"] {
        for (method, uri) in [
            ("PUT", format!("/v1/kv/{bucket}")),
            ("GET", format!("/v1/kv/{bucket}")),
            ("DELETE", format!("/v1/kv/{bucket}")),
            ("GET", format!("/v1/kv/{bucket}/ring")),
            ("PUT", format!("/v1/kv/{bucket}/ring")),
            ("DELETE", format!("/v1/kv/{bucket}/ring")),
            ("GET", format!("/v1/kv/{bucket}/ring/history")),
            ("GET", format!("/v1/kv/{bucket}/keys")),
            ("GET", format!("/v1/kv/{bucket}/watch")),
        ] {
            let r = gw.send(method.parse().unwrap(), &uri, &[], "{}").await;
            let p = r.assert_problem(400, "invalid");
            assert!(p["detail"].as_str().unwrap().contains("reserved"), "{method} {uri}: {p}");
        }
    }
    let ring = engine.kv_get(&keys, &Key::new("ring").unwrap()).await.unwrap().expect("the ring is untouched");
    assert_eq!(&ring.value[..], b"wrapped");
    // Names that merely contain it are ordinary buckets.
    assert_eq!(gw.put("/v1/kv/my_finmesh_keys", "{}").await.status, 200);
}

per_engine!(reserved_buckets_are_refused_to_clients);
