//! Trust per issuer (issue 21): every verification key speaks for one issuer
//! and grants at most its scope ceiling; the node's own tokens have their own
//! issuer; a JWKS without an audience refuses to start. Regression: any
//! configured key could mint `admin`.

mod common;

use common::*;
use finmesh_auth::{Access, AuthConfig, Authenticator, JwksConfig, KeyAlgorithm, KeyConfig, TokenIssuer};
use finmesh_core::{BucketName, ErrorKind, StreamName, Subject};
use jsonwebtoken::Algorithm;
use jsonwebtoken::jwk::{Jwk, JwkSet};
use serde_json::json;

const PARTNER: &str = "https://partner.test/";

/// A node with its own secret and one partner key (ES256, kid `partner`)
/// whose ceiling is publishing to `orders`.
fn node_with_partner(dir: &tempfile::TempDir) -> AuthConfig {
    let secret = dir.path().join("auth-secret");
    finmesh_auth::load_or_create_secret(&secret).unwrap();
    let partner = KeyConfig {
        kid: Some("partner".into()),
        ..KeyConfig::new(KeyAlgorithm::ES256, key("ec.pub.pem"), PARTNER, &["stream:publish:orders"])
    };
    AuthConfig { keys: vec![partner], ..AuthConfig::node_secret(secret) }
}

fn partner_token(scope: &str, iss: &str) -> String {
    let mut c = claims(scope);
    c["iss"] = json!(iss);
    c["aud"] = json!("finmesh");
    bearer(&sign(Algorithm::ES256, Some("partner"), &c, &signing_key(Algorithm::ES256)))
}

#[test]
fn a_partner_key_cannot_mint_admin() {
    let dir = tempfile::tempdir().unwrap();
    let a = Authenticator::from_config(&node_with_partner(&dir)).unwrap();
    let p = a.authenticate(Some(&partner_token("admin stream:publish:orders kv:read:cards", PARTNER))).unwrap();
    let (orders, cards) = (StreamName::new("orders").unwrap(), BucketName::new("cards").unwrap());
    let subject = Subject::new("orders.eu").unwrap();
    assert!(p.allows(&Access::StreamPublish { stream: &orders, subject: &subject }), "within the ceiling");
    assert!(!p.allows(&Access::Admin), "admin is above the partner's ceiling");
    assert!(!p.allows(&Access::KvRead { bucket: &cards }), "kv:read is above the partner's ceiling");
    assert!(!p.allows(&Access::StreamAdmin { stream: &orders }));
    assert_eq!(p.grants().len(), 1);
    assert_eq!(p.scopes().len(), 3, "the token's scopes are kept as written, for logs");
    // A wildcard scope is capped too: `stream:publish:*` is not included by
    // `stream:publish:orders`.
    let p = a.authenticate(Some(&partner_token("stream:publish:*", PARTNER))).unwrap();
    assert!(p.grants().is_empty());
}

#[test]
fn a_key_verifies_only_its_own_issuer() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = node_with_partner(&dir);
    let a = Authenticator::from_config(&cfg).unwrap();
    // Signed by the partner, claiming the node's issuer (or another): refused.
    for iss in ["finmesh", "https://someone-else/"] {
        let e = a.authenticate(Some(&partner_token("admin", iss))).unwrap_err();
        assert_eq!((e.kind(), e.message()), (ErrorKind::Unauthorized, "wrong issuer"), "{iss}");
    }
    // The node's own tokens carry its issuer and are not capped.
    let issuer = TokenIssuer::from_config(&cfg).unwrap();
    let t = issuer.issue("root", &[finmesh_auth::Scope::Admin], None).unwrap();
    let claims = jsonwebtoken::dangerous::insecure_decode::<serde_json::Value>(&t.token).unwrap().claims;
    assert_eq!(claims["iss"], "finmesh");
    assert!(a.authenticate(Some(&bearer(&t.token))).unwrap().allows(&Access::Admin));
    // The node's issuer can be renamed; its tokens follow.
    let mut renamed = cfg.clone();
    renamed.signing.as_mut().unwrap().issuer = Some("node-7".into());
    let t = TokenIssuer::from_config(&renamed).unwrap().issue("root", &[finmesh_auth::Scope::Admin], None).unwrap();
    let claims = jsonwebtoken::dangerous::insecure_decode::<serde_json::Value>(&t.token).unwrap().claims;
    assert_eq!(claims["iss"], "node-7");
    assert!(Authenticator::from_config(&renamed).unwrap().authenticate(Some(&bearer(&t.token))).is_ok());
    assert_eq!(a.authenticate(Some(&bearer(&t.token))).unwrap_err().message(), "wrong issuer");
}

#[test]
fn a_key_claiming_the_node_issuer_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = node_with_partner(&dir);
    cfg.keys[0].issuer = "finmesh".into();
    let e = Authenticator::from_config(&cfg).unwrap_err();
    assert_eq!(e.kind(), ErrorKind::Invalid);
    assert!(e.message().contains("this node's own"), "{e}");
}

fn jwks_file(dir: &tempfile::TempDir) -> std::path::PathBuf {
    let mut k = Jwk::from_encoding_key(&signing_key(Algorithm::RS256), Algorithm::RS256).unwrap();
    k.common.key_id = Some("idp-1".into());
    let path = dir.path().join("jwks.json");
    std::fs::write(&path, serde_json::to_vec(&JwkSet { keys: vec![k] }).unwrap()).unwrap();
    path
}

#[test]
fn jwks_needs_an_audience_and_has_a_ceiling() {
    let dir = tempfile::tempdir().unwrap();
    let jwks = JwksConfig { file: jwks_file(&dir), issuer: ISSUER.into(), max_scope: vec!["kv:read:*".into()] };
    let no_audience = AuthConfig { jwks: vec![jwks.clone()], ..AuthConfig::default() };
    let e = Authenticator::from_config(&no_audience).unwrap_err();
    assert_eq!(e.kind(), ErrorKind::Invalid);
    assert!(e.message().contains("auth.audience is required with auth.jwks"), "{e}");

    let cfg = AuthConfig { audience: Some(AUDIENCE.into()), ..no_audience };
    let a = Authenticator::from_config(&cfg).unwrap();
    let t = sign(Algorithm::RS256, Some("idp-1"), &claims("admin kv:read:cards"), &signing_key(Algorithm::RS256));
    let p = a.authenticate(Some(&bearer(&t))).unwrap();
    assert!(p.allows(&Access::KvRead { bucket: &BucketName::new("cards").unwrap() }));
    assert!(!p.allows(&Access::Admin), "the IdP's ceiling is kv:read:*");
    let mut other_aud = claims("kv:read:cards");
    other_aud["aud"] = json!("another-service");
    let t = sign(Algorithm::RS256, Some("idp-1"), &other_aud, &signing_key(Algorithm::RS256));
    assert_eq!(a.authenticate(Some(&bearer(&t))).unwrap_err().message(), "wrong audience");
}
