//! The authentication matrix at the crate level: every way a bearer token
//! can be wrong is refused as Unauthorized, and each algorithm is accepted
//! with its right key.

mod common;

use common::*;
use finmesh_auth::{Access, AuthConfig, Authenticator, JwksConfig, KeyAlgorithm, KeyConfig};
use finmesh_core::{BucketName, ErrorKind};
use jsonwebtoken::{Algorithm, EncodingKey};
use serde_json::json;

fn auth(f: &Fixture) -> Authenticator {
    Authenticator::from_config(&f.config).unwrap()
}

fn refused(a: &Authenticator, header: &str, why: &str) {
    let e = a.authenticate(Some(header)).expect_err(why);
    assert_eq!(e.kind(), ErrorKind::Unauthorized, "{why}: {e}");
    let token = header.rsplit(' ').next().unwrap_or("");
    if token.len() > 8 {
        assert!(!e.message().contains(token), "{why}: the message must not echo the token");
    }
}

#[test]
fn each_algorithm_is_accepted_with_its_key_with_and_without_kid() {
    let f = Fixture::new();
    let a = auth(&f);
    for (alg, kid) in
        [(Algorithm::HS256, "hs"), (Algorithm::EdDSA, "ed"), (Algorithm::RS256, "rsa"), (Algorithm::ES256, "ec")]
    {
        for kid in [Some(kid), None] {
            let t = sign(alg, kid, &claims("kv:read:cards"), &signing_key(alg));
            let p = a.authenticate(Some(&bearer(&t))).unwrap_or_else(|e| panic!("{alg:?} {kid:?}: {e}"));
            assert_eq!(p.subject(), "client-1");
            let cards = BucketName::new("cards").unwrap();
            assert!(p.allows(&Access::KvRead { bucket: &cards }));
            assert!(!p.allows(&Access::KvWrite { bucket: &cards }));
        }
    }
}

#[test]
fn missing_wrong_scheme_empty_huge_and_garbage_headers() {
    let f = Fixture::new();
    let a = auth(&f);
    assert_eq!(a.authenticate(None).unwrap_err().kind(), ErrorKind::Unauthorized);
    let good = sign(Algorithm::HS256, Some("hs"), &claims("admin"), &signing_key(Algorithm::HS256));
    refused(&a, &format!("Basic {good}"), "wrong scheme");
    refused(&a, &format!("Token {good}"), "wrong scheme");
    refused(&a, &good, "no scheme");
    refused(&a, "Bearer", "no token");
    refused(&a, "Bearer    ", "empty token");
    refused(&a, "", "empty header");
    refused(&a, &format!("Bearer {}", "A".repeat(1 << 20)), "huge");
    refused(&a, "Bearer a.b.c", "garbage");
    refused(&a, "Bearer ....", "dots");
    refused(&a, "Bearer e30.e30.", "empty json");
    refused(&a, &format!("Bearer {good}.x"), "four parts");
    refused(&a, &format!("Bearer {good} extra"), "trailing junk");
    for bytes in [&[0xff_u8, 0xfe, 0x00][..], b"Bearer \xc3\x28", b"\x80Bearer x"] {
        assert_eq!(a.authenticate_bytes(Some(bytes)).unwrap_err().kind(), ErrorKind::Unauthorized);
    }
    assert!(a.authenticate_bytes(Some(bearer(&good).as_bytes())).is_ok());
}

#[test]
fn bad_signature_and_tampered_payload() {
    let f = Fixture::new();
    let a = auth(&f);
    let other = EncodingKey::from_ed_pem(&pem("ed-other.pem")).unwrap();
    refused(&a, &bearer(&sign(Algorithm::EdDSA, Some("ed"), &claims("admin"), &other)), "other Ed25519 key");
    refused(&a, &bearer(&sign(Algorithm::EdDSA, None, &claims("admin"), &other)), "other key, no kid");
    let wrong_secret = EncodingKey::from_secret(b"not-the-secret-not-the-secret-not-the-secret");
    refused(&a, &bearer(&sign(Algorithm::HS256, None, &claims("admin"), &wrong_secret)), "wrong secret");

    let t = sign(Algorithm::RS256, Some("rsa"), &claims("kv:read:cards"), &signing_key(Algorithm::RS256));
    let parts: Vec<&str> = t.split('.').collect();
    let forged = raw_token(&json!({"alg": "RS256", "kid": "rsa"}), &claims("admin"), b"");
    let forged: Vec<&str> = forged.split('.').collect();
    let tampered = format!("{}.{}.{}", parts[0], forged[1], parts[2]);
    refused(&a, &bearer(&tampered), "payload swapped under a valid signature");
}

#[test]
fn expiry_and_not_before_with_leeway() {
    let f = Fixture::new();
    let a = auth(&f);
    let key = signing_key(Algorithm::ES256);
    let mut c = claims("admin");
    c["exp"] = json!(now() - 120);
    let e = a.authenticate(Some(&bearer(&sign(Algorithm::ES256, Some("ec"), &c, &key)))).unwrap_err();
    assert_eq!(e.message(), "token expired");
    c["exp"] = json!(now() - 5);
    assert!(a.authenticate(Some(&bearer(&sign(Algorithm::ES256, Some("ec"), &c, &key)))).is_ok(), "within leeway");
    let mut c = claims("admin");
    c.as_object_mut().unwrap().remove("exp");
    refused(&a, &bearer(&sign(Algorithm::ES256, Some("ec"), &c, &key)), "no exp");
    let mut c = claims("admin");
    c["exp"] = json!("tomorrow");
    refused(&a, &bearer(&sign(Algorithm::ES256, Some("ec"), &c, &key)), "exp not a number");
    let mut c = claims("admin");
    c["nbf"] = json!(now() + 600);
    let e = a.authenticate(Some(&bearer(&sign(Algorithm::ES256, Some("ec"), &c, &key)))).unwrap_err();
    assert_eq!(e.message(), "token not valid yet (nbf)");
    c["nbf"] = json!(now() + 5);
    assert!(a.authenticate(Some(&bearer(&sign(Algorithm::ES256, Some("ec"), &c, &key)))).is_ok(), "within leeway");

    let strict = AuthConfig { leeway_secs: 0, ..f.config.clone() };
    let a = Authenticator::from_config(&strict).unwrap();
    let mut c = claims("admin");
    c["exp"] = json!(now() - 5);
    refused(&a, &bearer(&sign(Algorithm::ES256, Some("ec"), &c, &key)), "no leeway");
}

#[test]
fn issuer_audience_and_subject_are_checked() {
    let f = Fixture::new();
    let a = auth(&f);
    let key = signing_key(Algorithm::HS256);
    let with = |k: &str, v: serde_json::Value| {
        let mut c = claims("admin");
        if v.is_null() {
            c.as_object_mut().unwrap().remove(k);
        } else {
            c[k] = v;
        }
        bearer(&sign(Algorithm::HS256, Some("hs"), &c, &key))
    };
    assert_eq!(a.authenticate(Some(&with("iss", json!("https://evil/")))).unwrap_err().message(), "wrong issuer");
    refused(&a, &with("iss", serde_json::Value::Null), "missing iss");
    assert_eq!(a.authenticate(Some(&with("aud", json!("other")))).unwrap_err().message(), "wrong audience");
    refused(&a, &with("aud", serde_json::Value::Null), "missing aud");
    refused(&a, &with("aud", json!(["a", "b"])), "aud list without ours");
    assert!(a.authenticate(Some(&with("aud", json!(["other", AUDIENCE])))).is_ok(), "one of the audiences is ours");
    refused(&a, &with("sub", serde_json::Value::Null), "missing sub");
    refused(&a, &with("sub", json!(42)), "sub not a string");
    refused(&a, &with("sub", json!(" ")), "empty sub");

    // Without an audience configured, `aud` is not checked; `iss` always is.
    let open = AuthConfig { audience: None, ..f.config.clone() };
    let a = Authenticator::from_config(&open).unwrap();
    assert!(a.authenticate(Some(&with("aud", json!("anything")))).is_ok());
    assert_eq!(a.authenticate(Some(&with("iss", json!("https://anyone/")))).unwrap_err().message(), "wrong issuer");
}

#[test]
fn alg_none_and_unaccepted_algorithms_are_refused() {
    let f = Fixture::new();
    let a = auth(&f);
    for alg in ["none", "None", "NONE", "nOnE", "", "HS384", "HS512", "RS512", "PS256", "ES384", "ES512", "XYZ"] {
        for kid in [json!(null), json!("hs"), json!("rsa")] {
            let mut h = json!({"alg": alg, "typ": "JWT"});
            if !kid.is_null() {
                h["kid"] = kid.clone();
            }
            refused(&a, &bearer(&raw_token(&h, &claims("admin"), b"")), &format!("alg {alg}"));
            refused(&a, &bearer(&raw_token(&h, &claims("admin"), b"sig")), &format!("alg {alg} with bytes"));
        }
    }
    refused(&a, &bearer(&raw_token(&json!({"typ": "JWT"}), &claims("admin"), b"")), "no alg");
    let mut h = jsonwebtoken::Header::new(Algorithm::HS256);
    h.crit = Some(vec!["exp-ext".into()]);
    let t = jsonwebtoken::encode(&h, &claims("admin"), &signing_key(Algorithm::HS256)).unwrap();
    refused(&a, &bearer(&t), "crit extension, validly signed");
    // A real HS384 signature with the right secret is still refused: keys are pinned.
    let t = sign(Algorithm::HS384, Some("hs"), &claims("admin"), &signing_key(Algorithm::HS256));
    refused(&a, &bearer(&t), "HS384 with the HS256 secret");
}

#[test]
fn algorithm_confusion_hs256_signed_with_public_keys() {
    let f = Fixture::new();
    let a = auth(&f);
    for (public, kid) in [("rsa.pub.pem", "rsa"), ("ec.pub.pem", "ec"), ("ed.pub.pem", "ed")] {
        let key = EncodingKey::from_secret(&pem(public));
        refused(&a, &bearer(&sign(Algorithm::HS256, Some(kid), &claims("admin"), &key)), "kid of a public key");
        refused(&a, &bearer(&sign(Algorithm::HS256, None, &claims("admin"), &key)), "no kid");
        refused(&a, &bearer(&sign(Algorithm::HS256, Some("hs"), &claims("admin"), &key)), "kid of the secret");
    }
    // A node with public keys only has no HS256 key at all.
    let public_only = AuthConfig { keys: f.config.keys[1..].to_vec(), ..f.config.clone() };
    let a = Authenticator::from_config(&public_only).unwrap();
    let key = EncodingKey::from_secret(&pem("rsa.pub.pem"));
    let e = a.authenticate(Some(&bearer(&sign(Algorithm::HS256, None, &claims("admin"), &key)))).unwrap_err();
    assert_eq!(e.message(), "no key for the token's algorithm");
    // An RS256 token naming the EC key's kid is not checked with it.
    let t = sign(Algorithm::RS256, Some("ec"), &claims("admin"), &signing_key(Algorithm::RS256));
    assert_eq!(
        a.authenticate(Some(&bearer(&t))).unwrap_err().message(),
        "the token's algorithm does not match its key"
    );
}

#[test]
fn unknown_kid_is_refused() {
    let f = Fixture::new();
    let a = auth(&f);
    let t = sign(Algorithm::EdDSA, Some("retired"), &claims("admin"), &signing_key(Algorithm::EdDSA));
    assert_eq!(a.authenticate(Some(&bearer(&t))).unwrap_err().message(), "unknown key id");
}

#[test]
fn scopes_come_from_scope_string_and_scopes_array() {
    let f = Fixture::new();
    let a = auth(&f);
    let key = signing_key(Algorithm::HS256);
    let (cards, tokens) = (BucketName::new("cards").unwrap(), BucketName::new("tokens").unwrap());
    let mut c = claims("kv:read:cards openid  kv:write:cards");
    c["scopes"] = json!(["kv:read:tokens", "profile"]);
    let p = a.authenticate(Some(&bearer(&sign(Algorithm::HS256, None, &c, &key)))).unwrap();
    assert_eq!(p.scopes(), ["kv:read:cards", "openid", "kv:write:cards", "kv:read:tokens", "profile"]);
    assert_eq!(p.grants().len(), 3, "openid and profile are kept but grant nothing");
    assert!(p.allows(&Access::KvWrite { bucket: &cards }));
    assert!(p.allows(&Access::KvRead { bucket: &tokens }));
    assert!(!p.allows(&Access::Admin));

    let mut c = claims("");
    c["scope"] = json!(["kv:read:cards"]);
    let p = a.authenticate(Some(&bearer(&sign(Algorithm::HS256, None, &c, &key)))).unwrap();
    assert!(p.allows(&Access::KvRead { bucket: &cards }), "an array in `scope` is accepted");

    let mut c = claims("");
    c.as_object_mut().unwrap().remove("scope");
    let p = a.authenticate(Some(&bearer(&sign(Algorithm::HS256, None, &c, &key)))).unwrap();
    assert!(p.scopes().is_empty() && !p.allows(&Access::KvRead { bucket: &cards }), "no scope grants nothing");
    c["scope"] = json!(7);
    refused(&a, &bearer(&sign(Algorithm::HS256, None, &c, &key)), "scope of the wrong type");
}

#[test]
fn jwks_file_keys_are_pinned_and_selected_by_kid() {
    use jsonwebtoken::jwk::{Jwk, JwkSet, PublicKeyUse};
    let dir = tempfile::tempdir().unwrap();
    let jwk = |alg: Algorithm, kid: &str, with_alg: bool| {
        let mut k = Jwk::from_encoding_key(&signing_key(alg), alg).unwrap();
        k.common.key_id = Some(kid.into());
        if !with_alg {
            k.common.key_algorithm = None;
        }
        k
    };
    let mut enc = jwk(Algorithm::RS256, "enc-key", true);
    enc.common.public_key_use = Some(PublicKeyUse::Encryption);
    let set = JwkSet {
        keys: vec![
            jwk(Algorithm::RS256, "k-rsa", true),
            jwk(Algorithm::ES256, "k-ec", false),
            jwk(Algorithm::EdDSA, "k-ed", true),
            enc,
        ],
    };
    let path = dir.path().join("jwks.json");
    std::fs::write(&path, serde_json::to_vec(&set).unwrap()).unwrap();
    let jwks = JwksConfig { file: path.clone(), issuer: ISSUER.into(), max_scope: vec!["admin".into()] };
    let cfg = AuthConfig { jwks: vec![jwks], audience: Some(AUDIENCE.into()), ..AuthConfig::default() };
    let a = Authenticator::from_config(&cfg).unwrap();
    for (alg, kid) in [(Algorithm::RS256, "k-rsa"), (Algorithm::ES256, "k-ec"), (Algorithm::EdDSA, "k-ed")] {
        let t = sign(alg, Some(kid), &claims("admin"), &signing_key(alg));
        assert!(a.authenticate(Some(&bearer(&t))).is_ok(), "{kid}");
        let t = sign(alg, None, &claims("admin"), &signing_key(alg));
        assert!(a.authenticate(Some(&bearer(&t))).is_ok(), "{kid} without kid");
    }
    let t = sign(Algorithm::RS256, Some("enc-key"), &claims("admin"), &signing_key(Algorithm::RS256));
    assert_eq!(a.authenticate(Some(&bearer(&t))).unwrap_err().message(), "unknown key id", "use=enc is skipped");
    let t = sign(Algorithm::ES256, Some("k-rsa"), &claims("admin"), &signing_key(Algorithm::ES256));
    refused(&a, &bearer(&t), "ES256 token naming the RSA key");
    let t = sign(Algorithm::HS256, Some("k-rsa"), &claims("admin"), &EncodingKey::from_secret(&pem("rsa.pub.pem")));
    refused(&a, &bearer(&t), "HS256 confusion against a JWKS RSA key");

    // A JWK whose alg contradicts its key type is skipped; a file with no usable key fails.
    let mut liar = jwk(Algorithm::EdDSA, "liar", true);
    liar.common.key_algorithm = Some(jsonwebtoken::jwk::KeyAlgorithm::RS256);
    std::fs::write(&path, serde_json::to_vec(&JwkSet { keys: vec![liar] }).unwrap()).unwrap();
    assert_eq!(Authenticator::from_config(&cfg).unwrap_err().kind(), ErrorKind::Invalid);
    std::fs::write(&path, b"{\"keys\": 5}").unwrap();
    assert_eq!(Authenticator::from_config(&cfg).unwrap_err().kind(), ErrorKind::Invalid);
}

#[test]
fn from_config_reports_bad_key_files() {
    let f = Fixture::new();
    let with_key = |k: KeyConfig| AuthConfig { keys: vec![k], ..AuthConfig::default() };
    let public = |alg, path| KeyConfig::new(alg, path, ISSUER, &["admin"]);
    let e = Authenticator::from_config(&with_key(public(KeyAlgorithm::RS256, key("missing.pem")))).unwrap_err();
    assert_eq!(e.kind(), ErrorKind::Internal);
    let e = Authenticator::from_config(&with_key(public(KeyAlgorithm::RS256, key("ec.pub.pem")))).unwrap_err();
    assert_eq!(e.kind(), ErrorKind::Invalid, "an EC key configured as RS256");
    let e = Authenticator::from_config(&with_key(public(KeyAlgorithm::EdDSA, key("README.md")))).unwrap_err();
    assert_eq!(e.kind(), ErrorKind::Invalid);
    let short = f.dir.path().join("short");
    std::fs::write(&short, "too-short").unwrap();
    let hs = KeyConfig::new(KeyAlgorithm::HS256, short, ISSUER, &["admin"]);
    assert_eq!(Authenticator::from_config(&with_key(hs)).unwrap_err().kind(), ErrorKind::Invalid);
    assert_eq!(Authenticator::from_config(&AuthConfig::default()).unwrap_err().kind(), ErrorKind::Invalid);
}

#[test]
fn the_verified_token_cache_never_admits_a_different_token() {
    let f = Fixture::new();
    for entries in [0, 4096] {
        let cfg = AuthConfig { token_cache_entries: entries, ..f.config.clone() };
        let a = Authenticator::from_config(&cfg).unwrap();
        let t = sign(Algorithm::EdDSA, Some("ed"), &claims("kv:read:cards"), &signing_key(Algorithm::EdDSA));
        for _ in 0..3 {
            assert_eq!(a.authenticate(Some(&bearer(&t))).unwrap().scopes(), ["kv:read:cards"]);
        }
        // Same header and claims, signature altered: refused even though the
        // original is cached.
        let (body, sig) = t.rsplit_once('.').unwrap();
        let mut sig = sig.as_bytes().to_vec();
        sig[10] = if sig[10] == b'A' { b'B' } else { b'A' };
        let sig = String::from_utf8(sig).unwrap();
        refused(&a, &bearer(&format!("{body}.{sig}")), "altered signature after a cached hit");
        refused(&a, &bearer(&format!("{t}x")), "extended token");
        // Another authenticator (other keys) shares nothing with this cache.
        let b = Authenticator::from_config(&AuthConfig { keys: f.config.keys[..1].to_vec(), ..cfg.clone() }).unwrap();
        refused(&b, &bearer(&t), "no EdDSA key in the other authenticator");
    }
}
