//! The OAuth client-credentials grant: success through both client
//! authentication methods, scope narrowing, every RFC 6749 error, clients
//! file checks, and the equal-cost path for unknown clients.

mod common;

use std::sync::Arc;
use std::time::{Duration, Instant};

use argon2::Params;
use base64::Engine as _;
use common::*;
use finmesh_auth::oauth::hash_client_secret_with;
use finmesh_auth::{
    Access, AuthConfig, Authenticator, ClientConfig, ClientRegistry, OAuthErrorCode, TokenIssuer, TokenRequest,
    hash_client_secret, load_or_create_secret,
};
use finmesh_core::{ErrorKind, StreamName};

/// Cheap argon2id parameters so debug-build tests stay fast.
fn cheap() -> Params {
    Params::new(1024, 1, 1, None).unwrap()
}

struct Node {
    _dir: tempfile::TempDir,
    config: AuthConfig,
    registry: ClientRegistry,
}

fn node_with(params: Params) -> Node {
    let dir = tempfile::tempdir().unwrap();
    let secret = dir.path().join("auth-secret");
    load_or_create_secret(&secret).unwrap();
    let config = AuthConfig::node_secret(&secret);
    let issuer = Arc::new(TokenIssuer::from_config(&config).unwrap());
    let clients = vec![
        ClientConfig {
            id: "feed".into(),
            secret_hash: hash_client_secret_with("feed-secret", params.clone()).unwrap(),
            scopes: vec!["stream:publish:md:md.>".into(), "stream:subscribe:md:md.>".into()],
            ttl_secs: Some(900),
        },
        ClientConfig {
            id: "ops:team".into(),
            secret_hash: hash_client_secret_with("ops secret+1", params).unwrap(),
            scopes: vec!["admin".into()],
            ttl_secs: None,
        },
    ];
    let registry = ClientRegistry::new(clients, issuer).unwrap();
    Node { _dir: dir, config, registry }
}

fn basic(id: &str, secret: &str) -> String {
    let enc = |s: &str| percent_encoding::utf8_percent_encode(s, percent_encoding::NON_ALPHANUMERIC).to_string();
    format!("Basic {}", base64::engine::general_purpose::STANDARD.encode(format!("{}:{}", enc(id), enc(secret))))
}

fn req(basic_auth: Option<String>, form: &[(&str, &str)]) -> TokenRequest {
    let mut r = TokenRequest { authorization: basic_auth, ..TokenRequest::default() };
    for (k, v) in form {
        let v = Some((*v).to_owned());
        match *k {
            "grant_type" => r.grant_type = v,
            "scope" => r.scope = v,
            "client_id" => r.client_id = v,
            "client_secret" => r.client_secret = v,
            other => panic!("{other}"),
        }
    }
    r
}

const GT: (&str, &str) = ("grant_type", "client_credentials");

#[test]
fn grant_with_basic_auth_gives_all_allowed_scopes() {
    let n = node_with(cheap());
    let resp = n.registry.grant(&req(Some(basic("feed", "feed-secret")), &[GT])).unwrap();
    assert_eq!(resp.token_type, "Bearer");
    assert_eq!(resp.expires_in, 900);
    assert_eq!(resp.scope, "stream:publish:md:md.> stream:subscribe:md:md.>");
    let json = serde_json::to_value(&resp).unwrap();
    assert_eq!(json["token_type"], "Bearer");
    assert!(json["access_token"].is_string());

    let p = Authenticator::from_config(&n.config).unwrap().authenticate(Some(&bearer(&resp.access_token))).unwrap();
    assert_eq!(p.subject(), "feed");
    let md = StreamName::new("md").unwrap();
    assert!(p.allows(&Access::StreamPublish { stream: &md, subject: &finmesh_core::Subject::new("md.a").unwrap() }));
    assert!(!p.allows(&Access::StreamAdmin { stream: &md }));
}

#[test]
fn grant_with_form_credentials_and_a_narrower_scope() {
    let n = node_with(cheap());
    let r = req(
        None,
        &[GT, ("client_id", "ops:team"), ("client_secret", "ops secret+1"), ("scope", "kv:read:cards stream:admin:*")],
    );
    let resp = n.registry.grant(&r).unwrap();
    assert_eq!(resp.scope, "kv:read:cards stream:admin:*");
    assert_eq!(resp.expires_in, 3600, "the issuer's default ttl");
    // Percent-encoded id and secret in the Basic header.
    let resp = n.registry.grant(&req(Some(basic("ops:team", "ops secret+1")), &[GT])).unwrap();
    assert_eq!(resp.scope, "admin");
    let r = req(Some(basic("feed", "feed-secret")), &[GT, ("scope", "stream:subscribe:md:md.eu.>")]);
    assert_eq!(n.registry.grant(&r).unwrap().scope, "stream:subscribe:md:md.eu.>");
}

#[test]
fn every_error_has_its_rfc_code_and_status() {
    let n = node_with(cheap());
    let cases: Vec<(TokenRequest, OAuthErrorCode, u16)> = vec![
        (req(Some(basic("feed", "feed-secret")), &[]), OAuthErrorCode::InvalidRequest, 400),
        (req(Some(basic("feed", "feed-secret")), &[("grant_type", "")]), OAuthErrorCode::InvalidRequest, 400),
        (
            req(Some(basic("feed", "feed-secret")), &[("grant_type", "password")]),
            OAuthErrorCode::UnsupportedGrantType,
            400,
        ),
        (req(None, &[GT]), OAuthErrorCode::InvalidClient, 401),
        (req(None, &[GT, ("client_id", "feed")]), OAuthErrorCode::InvalidClient, 401),
        (req(Some(basic("feed", "wrong")), &[GT]), OAuthErrorCode::InvalidClient, 401),
        (req(Some(basic("nobody", "feed-secret")), &[GT]), OAuthErrorCode::InvalidClient, 401),
        (req(None, &[GT, ("client_id", "feed"), ("client_secret", "wrong")]), OAuthErrorCode::InvalidClient, 401),
        (req(Some("Basic !!!".into()), &[GT]), OAuthErrorCode::InvalidClient, 401),
        (req(Some("Bearer abc".into()), &[GT]), OAuthErrorCode::InvalidClient, 401),
        (req(Some(basic("feed", &"x".repeat(2000))), &[GT]), OAuthErrorCode::InvalidClient, 401),
        (
            req(Some(basic("feed", "feed-secret")), &[GT, ("client_secret", "feed-secret")]),
            OAuthErrorCode::InvalidRequest,
            400,
        ),
        (req(Some(basic("feed", "feed-secret")), &[GT, ("client_id", "other")]), OAuthErrorCode::InvalidRequest, 400),
        (req(Some(basic("feed", "feed-secret")), &[GT, ("scope", "admin")]), OAuthErrorCode::InvalidScope, 400),
        (
            req(Some(basic("feed", "feed-secret")), &[GT, ("scope", "stream:publish:md")]),
            OAuthErrorCode::InvalidScope,
            400,
        ),
        (
            req(Some(basic("feed", "feed-secret")), &[GT, ("scope", "stream:publish:md:fx.>")]),
            OAuthErrorCode::InvalidScope,
            400,
        ),
        (req(Some(basic("feed", "feed-secret")), &[GT, ("scope", "kv:nope:x")]), OAuthErrorCode::InvalidScope, 400),
    ];
    for (i, (r, code, status)) in cases.into_iter().enumerate() {
        let e = n.registry.grant(&r).expect_err(&format!("case {i}"));
        assert_eq!((e.error, e.status()), (code, status), "case {i}: {e}");
        assert_eq!(e.www_authenticate().is_some(), status == 401);
        assert!(!e.error_description.contains("feed-secret"), "case {i}");
    }
    // Wrong secret and unknown id are indistinguishable in the answer.
    let wrong = n.registry.grant(&req(Some(basic("feed", "wrong")), &[GT])).unwrap_err();
    let unknown = n.registry.grant(&req(Some(basic("nobody", "x")), &[GT])).unwrap_err();
    assert_eq!(wrong, unknown);
}

#[test]
fn unknown_client_ids_pay_for_a_verification_too() {
    // Parameters heavy enough that one verification clearly dominates noise.
    let n = node_with(Params::new(4 * 1024, 1, 1, None).unwrap());
    let time = |id: &str| {
        let mut samples: Vec<Duration> = (0..5)
            .map(|_| {
                let t = Instant::now();
                let _ = n.registry.grant(&req(Some(basic(id, "wrong")), &[GT]));
                t.elapsed()
            })
            .collect();
        samples.sort();
        samples[2]
    };
    let (known, unknown) = (time("feed"), time("nobody"));
    assert!(unknown * 3 > known, "unknown id answered in {unknown:?}, known in {known:?}: a timing oracle");
    assert!(known * 3 > unknown, "unknown id answered in {unknown:?}, known in {known:?}");
}

#[test]
fn clients_file_is_loaded_and_checked() {
    let dir = tempfile::tempdir().unwrap();
    let secret = dir.path().join("auth-secret");
    load_or_create_secret(&secret).unwrap();
    let issuer = Arc::new(TokenIssuer::from_config(&AuthConfig::node_secret(&secret)).unwrap());
    let hash = hash_client_secret_with("s", cheap()).unwrap();
    let path = dir.path().join("clients.toml");
    std::fs::write(
        &path,
        format!("[[client]]\nid = \"a\"\nsecret_hash = \"{hash}\"\nscopes = [\"kv:read:x\"]\nttl_secs = 60\n"),
    )
    .unwrap();
    let reg = ClientRegistry::load(&path, issuer.clone()).unwrap();
    assert_eq!(reg.len(), 1);
    assert_eq!(reg.grant(&req(Some(basic("a", "s")), &[GT])).unwrap().expires_in, 60);

    let argon2i = argon2::Argon2::new(argon2::Algorithm::Argon2i, argon2::Version::V0x13, cheap());
    let argon2i = argon2::PasswordHasher::hash_password(&argon2i, b"s").unwrap().to_string();
    let bad = format!(
        "[[client]]\nid = \"a\"\nsecret_hash = \"plain\"\nscopes = [\"kv:read:x\", \"nope\"]\n\
         [[client]]\nid = \"a\"\nsecret_hash = \"{argon2i}\"\nscopes = []\nttl_secs = 0\n"
    );
    let e = ClientRegistry::from_toml(&bad, issuer.clone()).unwrap_err();
    assert_eq!(e.kind(), ErrorKind::Invalid);
    for needle in ["not a PHC string", "nope", "not argon2id", "at least one scope", "ttl_secs", "used twice"] {
        assert!(e.message().contains(needle), "{needle} missing from {}", e.message());
    }
    let unknown_field =
        format!("[[client]]\nid = \"a\"\nsecret = \"s\"\nsecret_hash = \"{hash}\"\nscopes = [\"admin\"]\n");
    assert!(ClientRegistry::from_toml(&unknown_field, issuer.clone()).is_err());
    assert!(ClientRegistry::from_toml("", issuer).unwrap().is_empty());
}

#[test]
fn default_hash_is_argon2id_with_owasp_parameters() {
    let t = Instant::now();
    let h = hash_client_secret("s3cret").unwrap();
    eprintln!("argon2id default-parameter hash took {:?} (debug build)", t.elapsed());
    assert!(h.starts_with("$argon2id$v=19$m=19456,t=2,p=1$"), "{h}");
    let again = hash_client_secret("s3cret").unwrap();
    assert_ne!(h, again, "random salt");
    assert!(argon2::PasswordVerifier::verify_password(&argon2::Argon2::default(), b"s3cret", h.as_str()).is_ok());
}

#[test]
fn raw_form_and_header_to_grant_as_the_gateway_does() {
    let n = node_with(cheap());
    let ct = Some(&b"application/x-www-form-urlencoded"[..]);
    let header = basic("feed", "feed-secret");
    let r = TokenRequest::from_form(
        ct,
        b"grant_type=client_credentials&scope=stream%3Apublish%3Amd%3Amd.eu.%3E",
        Some(header.as_bytes()),
    )
    .unwrap();
    assert_eq!(n.registry.grant(&r).unwrap().scope, "stream:publish:md:md.eu.>");
    let r = TokenRequest::from_form(ct, b"grant_type=client_credentials", Some(b"Basic \xff\xfe")).unwrap();
    assert_eq!(n.registry.grant(&r).unwrap_err().error, OAuthErrorCode::InvalidClient);
    let r =
        TokenRequest::from_form(ct, b"grant_type=client_credentials&client_id=feed&client_secret=feed-secret", None)
            .unwrap();
    assert!(n.registry.grant(&r).is_ok());
}
