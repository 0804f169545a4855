//! Token issuance round trips: what the node signs, the node (and any
//! standard verifier holding the public key) accepts, with exactly the
//! documented claims.

mod common;

use std::time::Duration;

use common::*;
use finmesh_auth::{
    Access, AuthConfig, Authenticator, JwksConfig, KeyAlgorithm, KeyConfig, Scope, SigningConfig, TokenIssuer,
    issue_token, load_or_create_secret,
};
use finmesh_core::{ErrorKind, StreamName, Subject};
use serde_json::Value;

fn claims_of(token: &str) -> Value {
    jsonwebtoken::dangerous::insecure_decode::<Value>(token).unwrap().claims
}

fn node(dir: &tempfile::TempDir) -> AuthConfig {
    let path = dir.path().join("auth-secret");
    load_or_create_secret(&path).unwrap();
    AuthConfig::node_secret(path)
}

#[test]
fn hs256_round_trip_carries_every_claim() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = node(&dir);
    let scopes = vec!["stream:publish:md:md.>".to_owned(), "kv:read:cards stream:consume:orders".to_owned()];
    let issued = issue_token(&cfg, "pricer", &scopes, Some(Duration::from_secs(600))).unwrap();
    assert_eq!(issued.scope, "stream:publish:md:md.> kv:read:cards stream:consume:orders");
    assert_eq!(issued.expires_in, 600);

    let c = claims_of(&issued.token);
    let keys: Vec<&str> = c.as_object().unwrap().keys().map(String::as_str).collect();
    assert_eq!(keys, ["aud", "exp", "iat", "iss", "jti", "scope", "sub"]);
    assert_eq!(c["sub"], "pricer");
    assert_eq!(c["iss"], "finmesh");
    assert_eq!(c["aud"], "finmesh");
    assert_eq!(c["exp"].as_u64().unwrap() - c["iat"].as_u64().unwrap(), 600);
    assert_eq!(c["exp"].as_u64().unwrap(), issued.expires_at);
    assert_eq!(c["jti"].as_str().unwrap(), issued.jti);
    assert_eq!(issued.jti.len(), 22, "128 bits, base64url");
    let header = jsonwebtoken::decode_header(&issued.token).unwrap();
    assert_eq!(header.alg, jsonwebtoken::Algorithm::HS256);

    let a = Authenticator::from_config(&cfg).unwrap();
    let p = a.authenticate(Some(&bearer(&issued.token))).unwrap();
    assert_eq!(p.subject(), "pricer");
    let md = StreamName::new("md").unwrap();
    assert!(p.allows(&Access::StreamPublish { stream: &md, subject: &Subject::new("md.eu.x").unwrap() }));
    assert!(!p.allows(&Access::StreamPublish { stream: &md, subject: &Subject::new("fx.eu").unwrap() }));
    assert!(!p.allows(&Access::Admin));
}

#[test]
fn jti_is_unique_and_another_nodes_secret_refuses_the_token() {
    let (d1, d2) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let (c1, c2) = (node(&d1), node(&d2));
    let i = TokenIssuer::from_config(&c1).unwrap();
    let a = i.issue("x", &[Scope::Admin], None).unwrap();
    let b = i.issue("x", &[Scope::Admin], None).unwrap();
    assert_ne!(a.jti, b.jti);
    assert_eq!(a.expires_in, 3600, "default ttl");
    let other = Authenticator::from_config(&c2).unwrap();
    assert_eq!(other.authenticate(Some(&bearer(&a.token))).unwrap_err().kind(), ErrorKind::Unauthorized);
}

#[test]
fn eddsa_issuer_tokens_verify_with_the_public_key_alone() {
    let cfg = AuthConfig {
        audience: Some(AUDIENCE.into()),
        signing: Some(SigningConfig {
            kid: Some("node-ed".into()),
            alg: KeyAlgorithm::EdDSA,
            secret_file: None,
            private_key_file: Some(key("ed.pem")),
            default_ttl_secs: 60,
            max_ttl_secs: 120,
            issuer: Some(ISSUER.into()),
        }),
        ..AuthConfig::default()
    };
    let issued = issue_token(&cfg, "svc", &["kv:write:cards".into()], None).unwrap();
    let header = jsonwebtoken::decode_header(&issued.token).unwrap();
    assert_eq!((header.alg, header.kid.as_deref()), (jsonwebtoken::Algorithm::EdDSA, Some("node-ed")));
    assert_eq!(claims_of(&issued.token)["iss"], ISSUER);
    // The issuing node verifies its own tokens.
    assert!(Authenticator::from_config(&cfg).unwrap().authenticate(Some(&bearer(&issued.token))).is_ok());
    // A peer that only has the public key verifies them too.
    let peer = AuthConfig {
        audience: Some(AUDIENCE.into()),
        keys: vec![KeyConfig {
            kid: Some("node-ed".into()),
            ..KeyConfig::new(KeyAlgorithm::EdDSA, key("ed.pub.pem"), ISSUER, &["admin"])
        }],
        ..AuthConfig::default()
    };
    assert!(Authenticator::from_config(&peer).unwrap().authenticate(Some(&bearer(&issued.token))).is_ok());
    // Over the maximum lifetime: refused.
    let e = issue_token(&cfg, "svc", &["kv:write:cards".into()], Some(Duration::from_secs(121))).unwrap_err();
    assert_eq!(e.kind(), ErrorKind::Invalid);
}

#[test]
fn issuing_refuses_bad_requests() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = node(&dir);
    let ok = ["kv:read:cards".to_owned()];
    for (sub, scopes, ttl) in [
        ("svc", &["kv:read:cards".to_owned(), "kv:raed:cards".to_owned()][..], None),
        ("svc", &["openid".to_owned()][..], None),
        ("svc", &[][..], None),
        ("svc", &["  ".to_owned()][..], None),
        ("", &ok[..], None),
        ("a\nb", &ok[..], None),
        ("svc", &ok[..], Some(Duration::ZERO)),
        ("svc", &ok[..], Some(Duration::from_secs(91 * 86_400))),
    ] {
        let e = issue_token(&cfg, sub, scopes, ttl).unwrap_err();
        assert_eq!(e.kind(), ErrorKind::Invalid, "{sub:?} {scopes:?} {ttl:?}");
    }
    let jwks = JwksConfig { file: "j.json".into(), issuer: ISSUER.into(), max_scope: vec!["admin".into()] };
    let no_signing = AuthConfig { signing: None, jwks: vec![jwks], ..cfg };
    assert_eq!(issue_token(&no_signing, "svc", &ok, None).unwrap_err().kind(), ErrorKind::Invalid);
}
