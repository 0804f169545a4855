//! Shared fixtures: the checked-in test keys (tests/keys), a node secret in a
//! temp dir, and a signer for hand-made tokens.
#![allow(dead_code)]

use std::path::PathBuf;
use std::time::{SystemTime, UNIX_EPOCH};

use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use finmesh_auth::{AuthConfig, KeyAlgorithm, KeyConfig};
use jsonwebtoken::{Algorithm, EncodingKey, Header, encode};
use serde_json::{Value, json};

pub const ISSUER: &str = "https://issuer.test/";
pub const AUDIENCE: &str = "finmesh-test";
pub const SECRET: &str = "0123456789abcdef0123456789abcdef-test-secret";

pub fn key(name: &str) -> PathBuf {
    // The runtime value (cargo and nextest set it): a test binary reused
    // from a checkout at another path must still find this checkout's keys.
    let dir =
        std::env::var_os("CARGO_MANIFEST_DIR").map_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")), PathBuf::from);
    dir.join("tests/keys").join(name)
}

pub fn pem(name: &str) -> Vec<u8> {
    std::fs::read(key(name)).unwrap()
}

pub fn now() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).unwrap().as_secs()
}

/// A temp dir with the HS256 secret, and a config with one key of each
/// algorithm (kids `hs`, `ed`, `rsa`, `ec`), all for issuer [`ISSUER`] with
/// the ceiling `admin`, and the audience set.
pub struct Fixture {
    pub dir: tempfile::TempDir,
    pub config: AuthConfig,
}

impl Fixture {
    pub fn new() -> Self {
        let dir = tempfile::tempdir().unwrap();
        let secret = dir.path().join("hs.secret");
        std::fs::write(&secret, format!("{SECRET}\n")).unwrap();
        let public = |kid: &str, alg, file: &str| KeyConfig {
            kid: Some(kid.into()),
            ..KeyConfig::new(alg, key(file), ISSUER, &["admin"])
        };
        let config = AuthConfig {
            audience: Some(AUDIENCE.into()),
            keys: vec![
                KeyConfig { kid: Some("hs".into()), ..KeyConfig::new(KeyAlgorithm::HS256, secret, ISSUER, &["admin"]) },
                public("ed", KeyAlgorithm::EdDSA, "ed.pub.pem"),
                public("rsa", KeyAlgorithm::RS256, "rsa.pub.pem"),
                public("ec", KeyAlgorithm::ES256, "ec.pub.pem"),
            ],
            ..AuthConfig::default()
        };
        Self { dir, config }
    }
}

/// Valid claims for the fixture, valid for a minute.
pub fn claims(scope: &str) -> Value {
    let t = now();
    json!({"sub": "client-1", "scope": scope, "iat": t, "exp": t + 60, "iss": ISSUER, "aud": AUDIENCE})
}

/// The private key matching fixture key `kid`.
pub fn signing_key(alg: Algorithm) -> EncodingKey {
    match alg {
        Algorithm::HS256 => EncodingKey::from_secret(SECRET.as_bytes()),
        Algorithm::EdDSA => EncodingKey::from_ed_pem(&pem("ed.pem")).unwrap(),
        Algorithm::RS256 => EncodingKey::from_rsa_pem(&pem("rsa.pem")).unwrap(),
        Algorithm::ES256 => EncodingKey::from_ec_pem(&pem("ec.pem")).unwrap(),
        other => panic!("no fixture key for {other:?}"),
    }
}

pub fn sign(alg: Algorithm, kid: Option<&str>, claims: &Value, key: &EncodingKey) -> String {
    let mut h = Header::new(alg);
    h.kid = kid.map(str::to_owned);
    encode(&h, claims, key).unwrap()
}

/// A token with an arbitrary JOSE header and no signature check on our side:
/// for `alg: none` and friends.
pub fn raw_token(header: &Value, claims: &Value, signature: &[u8]) -> String {
    format!(
        "{}.{}.{}",
        URL_SAFE_NO_PAD.encode(header.to_string()),
        URL_SAFE_NO_PAD.encode(claims.to_string()),
        URL_SAFE_NO_PAD.encode(signature)
    )
}

pub fn bearer(token: &str) -> String {
    format!("Bearer {token}")
}
