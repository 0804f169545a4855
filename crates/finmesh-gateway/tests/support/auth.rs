//! Auth fixtures: a node whose HS256 secret the test knows, tokens issued by
//! its `TokenIssuer` (valid ones) or hand-made (expired, wrongly signed,
//! `alg: none`), cheap-argon2 OAuth clients, and the sample request of every
//! route of `ROUTE_ACCESS` with the fixture it needs.

use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use argon2::Params;
use axum::http::Method;
use base64::Engine as _;
use base64::engine::general_purpose::{STANDARD, URL_SAFE_NO_PAD};
use finmesh_auth::oauth::hash_client_secret_with;
use finmesh_auth::scope::parse_scope_list;
use finmesh_auth::{AuthConfig, Authenticator, ClientConfig, ClientRegistry, TokenIssuer};
use jsonwebtoken::{Algorithm, EncodingKey, Header, encode};
use serde_json::{Value, json};

use super::Gw;

/// The node's HS256 secret (≥ 32 bytes), known to the test.
pub const SECRET: &str = "gateway-test-secret-0123456789abcdef-0123456789";

/// A node's auth: verifier, issuer, and the files they read.
pub struct AuthKit {
    _dir: tempfile::TempDir,
    pub config: AuthConfig,
    pub auth: Authenticator,
    pub issuer: Arc<TokenIssuer>,
}

fn now() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).expect("clock").as_secs()
}

impl AuthKit {
    /// The default node configuration (`AuthConfig::node_secret`: issuer and
    /// audience `finmesh`) on a secret the test knows.
    pub fn new() -> Self {
        let dir = tempfile::tempdir().expect("temp dir");
        let path = dir.path().join("auth-secret");
        std::fs::write(&path, format!("{SECRET}\n")).expect("write secret");
        let mode = <std::fs::Permissions as std::os::unix::fs::PermissionsExt>::from_mode(0o600);
        std::fs::set_permissions(&path, mode).expect("chmod secret");
        let config = AuthConfig::node_secret(&path);
        let auth = Authenticator::from_config(&config).expect("authenticator");
        let issuer = Arc::new(TokenIssuer::from_config(&config).expect("issuer"));
        AuthKit { _dir: dir, config, auth, issuer }
    }

    /// A valid token for `sub` with exactly `scopes` (space-separated).
    pub fn token(&self, sub: &str, scopes: &str) -> String {
        let scopes = parse_scope_list(scopes).expect("scopes parse");
        self.issuer.issue(sub, &scopes, Some(Duration::from_secs(300))).expect("issue").token
    }

    fn claims(sub: &str, scope: &str, exp: u64) -> Value {
        json!({"sub": sub, "scope": scope, "iat": now(), "exp": exp, "iss": "finmesh", "aud": "finmesh"})
    }

    /// Signed with the node's secret, but expired ten minutes ago (beyond
    /// any leeway).
    pub fn expired(&self, sub: &str, scope: &str) -> String {
        let claims = Self::claims(sub, scope, now() - 600);
        encode(&Header::new(Algorithm::HS256), &claims, &EncodingKey::from_secret(SECRET.as_bytes())).unwrap()
    }

    /// Valid claims signed with another secret.
    pub fn bad_signature(&self, sub: &str, scope: &str) -> String {
        let claims = Self::claims(sub, scope, now() + 300);
        let key = EncodingKey::from_secret(b"not-the-node-secret-0123456789abcdef-xyz");
        encode(&Header::new(Algorithm::HS256), &claims, &key).unwrap()
    }

    /// Valid claims, `alg: none`, no signature.
    pub fn alg_none(&self, sub: &str, scope: &str) -> String {
        let header = json!({"alg": "none", "typ": "JWT"});
        let claims = Self::claims(sub, scope, now() + 300);
        format!("{}.{}.", URL_SAFE_NO_PAD.encode(header.to_string()), URL_SAFE_NO_PAD.encode(claims.to_string()))
    }

    /// A client registry with cheap argon2 parameters: `feed` (secret
    /// `feed-secret`) may publish and subscribe `S` under `s.>`.
    pub fn clients(&self) -> Arc<ClientRegistry> {
        let cheap = Params::new(1024, 1, 1, None).expect("argon2 params");
        let clients = vec![ClientConfig {
            id: "feed".into(),
            secret_hash: hash_client_secret_with("feed-secret", cheap).expect("hash"),
            scopes: vec!["stream:publish:S:s.>".into(), "stream:subscribe:S:s.>".into()],
            ttl_secs: Some(120),
        }];
        Arc::new(ClientRegistry::new(clients, self.issuer.clone()).expect("registry"))
    }
}

/// `Authorization: Bearer <token>`.
pub fn bearer(token: &str) -> String {
    format!("Bearer {token}")
}

/// `Authorization: Basic …` for a client id and secret (both plain ASCII
/// without `:`, so form-urlencoding is the identity).
pub fn basic(id: &str, secret: &str) -> String {
    format!("Basic {}", STANDARD.encode(format!("{id}:{secret}")))
}

/// The resources every sample request needs: buckets `default` and `b` with
/// key `k`, stream `S` on `s.>` with consumer `c`. `auth` is the
/// `Authorization` header to create them with (empty without auth).
pub async fn seed(gw: &Gw, auth: &str) {
    let h: Vec<(&str, &str)> = if auth.is_empty() { vec![] } else { vec![("authorization", auth)] };
    for (uri, body) in [
        ("/v1/kv/default", String::new()),
        ("/v1/kv/default/k", "v".to_owned()),
        ("/v1/kv/b", String::new()),
        ("/v1/kv/b/k", "v".to_owned()),
        ("/v1/streams/S", json!({"subjects": ["s.>"]}).to_string()),
        ("/v1/streams/S/consumers/c", String::new()),
        ("/v1/subscribers/r1", json!({"identity": "srv-r1", "filters": ["s.>"]}).to_string()),
        ("/v1/pipelines/runs/r", sample_run()),
    ] {
        let r = gw.send(Method::PUT, uri, &h, body).await;
        assert_eq!(r.status, 200, "seed PUT {uri}: {}", r.text());
    }
}

/// A request for `path` that succeeds against [`seed`], with the status it
/// answers.
pub fn sample_request(method: &str, path: &str) -> (Method, String, String, u16) {
    let uri = path
        .replace("{bucket}", "b")
        .replace("{key}", "k")
        .replace("{stream}", "S")
        .replace("{name}", "c")
        .replace("{id}", "r1")
        .replace("{pipeline}", "risk")
        .replace("{run}", "r");
    let method = Method::from_bytes(method.as_bytes()).expect("method");
    let (body, status) = match (method.as_str(), path) {
        ("PUT", "/v1/kv/{bucket}") => (json!({"history": 2}).to_string(), 200),
        ("PUT", "/v1/streams/{stream}") => (json!({"subjects": ["s.>"]}).to_string(), 200),
        ("PUT", "/v1/streams/{stream}/consumers/{name}") => (String::new(), 200),
        ("PUT", "/v1/subscribers/{id}") => (json!({"identity": "srv-r1", "filters": ["s.>"]}).to_string(), 200),
        ("PUT", "/v1/pipelines/runs/{run}") => (sample_run(), 200),
        ("PUT", _) => ("v".to_owned(), 200),
        ("POST", "/v1/streams/{stream}/messages") => ("1".to_owned(), 200),
        ("POST", "/v1/streams/{stream}/feed") => (r#"{"subject":"s.a","msg_id":"sample","payload":1}"#.to_owned(), 200),
        ("POST", "/v1/streams/{stream}/consumers/{name}/fetch") => (json!({"batch": 1}).to_string(), 200),
        // Routed and checked; the fixture defines no pipeline.
        ("POST", "/v1/pipelines/{pipeline}/files") => ("h\n".to_owned(), 404),
        // Served only with `[security]` (a key ring); the sample gateway has none.
        ("POST", "/v1/keys/rotate") => (json!({"purpose": "encryption"}).to_string(), 404),
        (_, p) if p.starts_with("/v1/keys") => (String::new(), 404),
        // Served only with an OAuth client registry; the sample gateway has none.
        ("POST", "/oauth/token") => ("grant_type=client_credentials".to_owned(), 404),
        // A valid-looking request whose token the engine refuses: routed, checked, answered.
        ("POST", "/v1/streams/{stream}/consumers/{name}/ack") => {
            (json!({"token": "x", "kind": "ack"}).to_string(), 400)
        }
        ("DELETE", _) => (String::new(), if path.ends_with("{key}") { 200 } else { 204 }),
        // Not an upgrade request: the route exists and says so.
        ("GET", "/v1/streams/{stream}/ws" | "/v1/streams/{stream}/feed/ws") => (String::new(), 400),
        _ => (String::new(), 200),
    };
    let uri = if method == Method::POST && path.ends_with("/messages") { format!("{uri}?subject=s.a") } else { uri };
    let uri = if path.starts_with("/v1/keys/{id}") { path.replace("{id}", "1") } else { uri };
    let uri = if path.ends_with("/files") { format!("{uri}?run=r&slice=s&file=f") } else { uri };
    (method, uri, body, status)
}

/// The run `seed` opens (the same body again is accepted).
pub fn sample_run() -> String {
    json!({"slices": {"s": {"expected_files": 1}}, "deadline": "2099-01-01T00:00:00Z"}).to_string()
}

/// Whether a route answers with an SSE stream.
pub fn is_sse(path: &str) -> bool {
    path.ends_with("/events") || path.ends_with("/watch")
}
