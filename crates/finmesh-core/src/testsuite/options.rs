//! Bucket and stream options ([`crate::options`]): security options and
//! user metadata round-trip through create, info, update and a restart;
//! invalid metadata is refused and creates nothing; an update that changes
//! a security option is refused (on an empty bucket too) and changes
//! nothing.

use bytes::Bytes;

use crate::testsuite::support::*;
use crate::testsuite::{Harness, as_reported_bucket, as_reported_stream};
use crate::{
    BucketConfig, BucketSecurity, Encryption, ErrorKind, KeyFormat, KeyHashing, Metadata, StreamConfig, StreamSecurity,
};

fn all_bucket_options() -> BucketSecurity {
    BucketSecurity {
        encryption: Some(Encryption::Aes256Gcm),
        key_hashing: Some(KeyHashing::HmacSha256),
        key_format: Some(KeyFormat::Pan),
    }
}

fn metadata(pairs: &[(&str, &str)]) -> Metadata {
    pairs.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect()
}

/// A bucket's security options and metadata come back from create, info,
/// a create with the same config, an update (which may change the
/// metadata) and a restart.
pub async fn bucket_options_round_trip<H: Harness>() {
    let mut h = H::start().await;
    let e = h.engine();
    let config = BucketConfig {
        security: all_bucket_options(),
        metadata: metadata(&[("owner", "cards-team"), ("cost.centre", "4711")]),
        ..BucketConfig::new(bucket("cards"))
    };
    let reported = as_reported_bucket::<H>(config.clone());
    assert_eq!(e.create_bucket(config.clone()).await.unwrap().config, reported);
    assert_eq!(e.bucket_info(&bucket("cards")).await.unwrap().config, reported);
    assert_eq!(e.create_bucket(config.clone()).await.unwrap().config, reported, "same config again");
    // A card number: a stack that enforces `key_format = "pan"` takes no other key.
    e.kv_put(&bucket("cards"), &key("4111111111111111"), Bytes::from("v")).await.unwrap();
    let updated = BucketConfig { history: 3, metadata: metadata(&[("owner", "risk-team")]), ..config.clone() };
    let reported = as_reported_bucket::<H>(updated.clone());
    assert_eq!(e.update_bucket(updated).await.unwrap().config, reported);
    assert_eq!(e.bucket_info(&bucket("cards")).await.unwrap().config, reported);
    // A bucket without options reports none.
    let plain = e.create_bucket(BucketConfig::new(bucket("plain"))).await.unwrap();
    assert!(plain.config.security.is_none() && plain.config.metadata.is_empty(), "{plain:?}");
    drop(e);
    h.restart().await;
    let e = h.engine();
    assert_eq!(e.bucket_info(&bucket("cards")).await.unwrap().config, reported);
    let plain = e.bucket_info(&bucket("plain")).await.unwrap();
    assert!(plain.config.security.is_none() && plain.config.metadata.is_empty(), "{plain:?}");
    // Metadata can be removed again.
    let cleared = BucketConfig { metadata: Metadata::new(), ..reported.clone() };
    assert_eq!(e.update_bucket(cleared.clone()).await.unwrap().config, as_reported_bucket::<H>(cleared));
}

/// A stream's security options and metadata come back from create, info,
/// an update and a restart.
pub async fn stream_options_round_trip<H: Harness>() {
    let mut h = H::start().await;
    let e = h.engine();
    let config = StreamConfig {
        security: StreamSecurity { encryption: Some(Encryption::Aes256Gcm) },
        metadata: metadata(&[("owner", "md-team")]),
        ..stream_config("ORDERS", &["orders.>"])
    };
    let reported = as_reported_stream::<H>(config.clone());
    assert_eq!(e.create_stream(config.clone()).await.unwrap().config, reported);
    assert_eq!(e.create_stream(config.clone()).await.unwrap().config, reported, "same config again");
    publish_one(&*e, &sn("ORDERS"), "orders.a", "x").await;
    let updated = StreamConfig {
        max_msgs: Some(10),
        metadata: metadata(&[("owner", "md-team"), ("tier", "gold")]),
        ..config.clone()
    };
    let reported = as_reported_stream::<H>(updated.clone());
    assert_eq!(e.update_stream(updated).await.unwrap().config, reported);
    assert_eq!(e.stream_info(&sn("ORDERS")).await.unwrap().config, reported);
    drop(e);
    h.restart().await;
    let e = h.engine();
    assert_eq!(e.stream_info(&sn("ORDERS")).await.unwrap().config, reported);
}

/// Metadata past its limits (count, key length and characters, reserved
/// prefixes, value length) is `Invalid` on create and update, and nothing
/// is created or changed.
pub async fn invalid_options_are_refused<H: Harness>() {
    let h = H::start().await;
    let e = h.engine();
    use crate::options::{MAX_METADATA_ENTRIES, MAX_METADATA_KEY_LEN, MAX_METADATA_VALUE_LEN};
    let too_many: Metadata = (0..=MAX_METADATA_ENTRIES).map(|i| (format!("k{i}"), "v".to_owned())).collect();
    let bad = [
        too_many,
        metadata(&[(&"k".repeat(MAX_METADATA_KEY_LEN + 1), "v")]),
        metadata(&[("", "v")]),
        metadata(&[("with space", "v")]),
        metadata(&[("finmesh.encryption", "none")]),
        metadata(&[("_nats.req.level", "0")]),
        metadata(&[("big", &"v".repeat(MAX_METADATA_VALUE_LEN + 1))]),
    ];
    for m in &bad {
        let b = BucketConfig { metadata: m.clone(), ..BucketConfig::new(bucket("b")) };
        expect_kind(e.create_bucket(b).await, ErrorKind::Invalid);
        let s = StreamConfig { metadata: m.clone(), ..stream_config("S", &["s.>"]) };
        expect_kind(e.create_stream(s).await, ErrorKind::Invalid);
    }
    expect_kind(e.bucket_info(&bucket("b")).await, ErrorKind::NotFound);
    expect_kind(e.stream_info(&sn("S")).await, ErrorKind::NotFound);
    // At the limits is fine.
    let max: Metadata = (0..MAX_METADATA_ENTRIES - 1)
        .map(|i| (format!("k{i}"), "v".repeat(MAX_METADATA_VALUE_LEN)))
        .chain([("k".repeat(MAX_METADATA_KEY_LEN), String::new())])
        .collect();
    let b = BucketConfig { metadata: max.clone(), ..BucketConfig::new(bucket("b")) };
    assert_eq!(e.create_bucket(b.clone()).await.unwrap().config.metadata, max);
    for m in &bad {
        let r = e.update_bucket(BucketConfig { metadata: m.clone(), ..b.clone() }).await;
        expect_kind(r, ErrorKind::Invalid);
    }
    assert_eq!(e.bucket_info(&bucket("b")).await.unwrap().config.metadata, max);
    let s = StreamConfig { metadata: max.clone(), ..stream_config("S", &["s.>"]) };
    assert_eq!(e.create_stream(s).await.unwrap().config.metadata, max);
}

/// An update that sets, clears or replaces a security option is `Invalid`,
/// on an empty and on a non-empty bucket or stream, and changes nothing; a
/// create with other options is `AlreadyExists`.
pub async fn changing_security_is_refused<H: Harness>() {
    let h = H::start().await;
    let e = h.engine();
    let enc = BucketSecurity { encryption: Some(Encryption::Aes256Gcm), ..BucketSecurity::default() };
    let secured = BucketConfig { security: enc, ..BucketConfig::new(bucket("secured")) };
    let plain = BucketConfig::new(bucket("plain"));
    e.create_bucket(secured.clone()).await.unwrap();
    e.create_bucket(plain.clone()).await.unwrap();
    for round in ["empty", "with data"] {
        let changes = [
            BucketConfig { security: BucketSecurity::default(), ..secured.clone() },
            BucketConfig { security: all_bucket_options(), ..secured.clone() },
            BucketConfig { security: enc, ..plain.clone() },
            BucketConfig {
                security: BucketSecurity { key_hashing: Some(KeyHashing::HmacSha256), ..BucketSecurity::default() },
                ..plain.clone()
            },
        ];
        for c in changes {
            let name = c.name.clone();
            let before = e.bucket_info(&name).await.unwrap().config;
            expect_kind(e.update_bucket(c.clone()).await, ErrorKind::Invalid);
            expect_kind(e.create_bucket(c).await, ErrorKind::AlreadyExists);
            assert_eq!(e.bucket_info(&name).await.unwrap().config, before, "{round}: {name} unchanged");
        }
        if round == "empty" {
            e.kv_put(&bucket("secured"), &key("k"), Bytes::from("v")).await.unwrap();
            e.kv_put(&bucket("plain"), &key("k"), Bytes::from("v")).await.unwrap();
        }
    }
    let enc = StreamSecurity { encryption: Some(Encryption::Aes256Gcm) };
    let secured = StreamConfig { security: enc, ..stream_config("SECURED", &["secured.>"]) };
    let plain = stream_config("PLAIN", &["plain.>"]);
    e.create_stream(secured.clone()).await.unwrap();
    e.create_stream(plain.clone()).await.unwrap();
    publish_one(&*e, &sn("SECURED"), "secured.a", "x").await;
    for c in [StreamConfig { security: StreamSecurity::default(), ..secured }, StreamConfig { security: enc, ..plain }]
    {
        let before = e.stream_info(&c.name).await.unwrap().config;
        expect_kind(e.update_stream(c.clone()).await, ErrorKind::Invalid);
        assert_eq!(e.stream_info(&c.name).await.unwrap().config, before);
    }
}
