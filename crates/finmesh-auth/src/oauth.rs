//! The OAuth 2.0 client-credentials grant (RFC 6749 §4.4) against a clients
//! file, as data: the gateway turns the body and headers into a
//! [`TokenRequest`] with [`TokenRequest::from_form`], calls
//! [`ClientRegistry::grant`] (on a blocking thread: it runs argon2), and turns
//! the result into a response: a [`TokenResponse`] as JSON with
//! `Cache-Control: no-store`, or an [`OAuthError`] as JSON with
//! [`OAuthError::status`] and [`OAuthError::www_authenticate`].
//!
//! Clients file (TOML):
//!
//! ```toml
//! [[client]]
//! id = "pricing-feed"
//! secret_hash = "$argon2id$v=19$m=19456,t=2,p=1$…"   # from hash_client_secret
//! scopes = ["stream:publish:md:md.>", "kv:read:refdata"]
//! ttl_secs = 900                                      # optional; default: signing.default_ttl_secs
//! ```
//!
//! Invariants:
//! - secrets are stored only as argon2id PHC strings and compared only by
//!   argon2 verification, whose final comparison is constant-time;
//! - an unknown client id costs the same as a known one: it is verified
//!   against a dummy hash made at load time with the parameters of the first
//!   client's hash (so keep every client on the same parameters, as
//!   [`hash_client_secret`] does);
//! - every failure of client authentication answers the same
//!   `invalid_client` description, whether the id or the secret was wrong;
//! - a granted token's scopes are each included (see [`Scope::includes`]) in
//!   one of the client's allowed scopes; without a `scope` parameter the
//!   token carries all allowed scopes.

use std::collections::HashMap;
use std::fmt;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use argon2::{Argon2, Params, PasswordHash, PasswordHasher, PasswordVerifier};
use base64::Engine as _;
use finmesh_core::{Error, Result};
use serde::{Deserialize, Serialize};

use crate::issue::TokenIssuer;
use crate::scope::{Scope, parse_scope_list};
use crate::secret::random_token;

/// Longest client secret accepted in a request, in bytes.
pub const MAX_CLIENT_SECRET_LEN: usize = 1024;
/// Longest client id, in bytes.
pub const MAX_CLIENT_ID_LEN: usize = 256;

/// The `error` codes of RFC 6749 §5.2 this endpoint answers.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum OAuthErrorCode {
    /// A parameter is missing, repeated or malformed (400).
    InvalidRequest,
    /// Client authentication failed (401, with `WWW-Authenticate`).
    InvalidClient,
    /// `grant_type` is not `client_credentials` (400).
    UnsupportedGrantType,
    /// A requested scope is malformed or beyond what the client may have (400).
    InvalidScope,
    /// The token could not be signed (500); not in RFC 6749 §5.2.
    ServerError,
}

/// An OAuth error response: `{"error": …, "error_description": …}` with
/// [`OAuthError::status`] as the HTTP status.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct OAuthError {
    /// The RFC's error code.
    pub error: OAuthErrorCode,
    /// A human-readable explanation; never contains a secret.
    pub error_description: String,
}

impl OAuthError {
    fn new(error: OAuthErrorCode, description: impl Into<String>) -> Self {
        Self { error, error_description: description.into() }
    }

    /// The HTTP status of the response.
    pub fn status(&self) -> u16 {
        match self.error {
            OAuthErrorCode::InvalidClient => 401,
            OAuthErrorCode::ServerError => 500,
            _ => 400,
        }
    }

    /// The `WWW-Authenticate` header value a 401 must carry.
    pub fn www_authenticate(&self) -> Option<&'static str> {
        (self.error == OAuthErrorCode::InvalidClient).then_some("Basic realm=\"finmesh\", charset=\"UTF-8\"")
    }
}

impl fmt::Display for OAuthError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let code = serde_json::to_value(self.error).ok();
        let code = code.as_ref().and_then(|v| v.as_str()).unwrap_or("error");
        write!(f, "{code}: {}", self.error_description)
    }
}

impl std::error::Error for OAuthError {}

/// A token request: the form fields of `POST /oauth/token`
/// (`application/x-www-form-urlencoded`) plus the `Authorization` header.
#[derive(Clone, Default, Deserialize)]
pub struct TokenRequest {
    /// Must be `client_credentials`.
    #[serde(default)]
    pub grant_type: Option<String>,
    /// Space-separated scopes; absent = every scope the client may have.
    #[serde(default)]
    pub scope: Option<String>,
    /// Form authentication (RFC 6749 §2.3.1), when no Basic header is sent.
    #[serde(default)]
    pub client_id: Option<String>,
    /// Form authentication, with `client_id`.
    #[serde(default)]
    pub client_secret: Option<String>,
    /// The `Authorization` header (`Basic base64(urlenc(id):urlenc(secret))`),
    /// set by the gateway, not from the form. A header that is not UTF-8
    /// should be passed lossily converted: it then fails as `invalid_client`.
    #[serde(skip)]
    pub authorization: Option<String>,
}

/// Largest `POST /oauth/token` body [`TokenRequest::from_form`] reads, in bytes.
pub const MAX_FORM_LEN: usize = 16 * 1024;

impl TokenRequest {
    /// Build a request from what the gateway has: the `Content-Type` header,
    /// the raw body and the raw `Authorization` header. Checks what RFC 6749
    /// §3.2 asks of the transport: a form body (`invalid_request` otherwise),
    /// no parameter repeated, at most [`MAX_FORM_LEN`] bytes. Unknown
    /// parameters are ignored (§3.2). Never panics on any input.
    pub fn from_form(
        content_type: Option<&[u8]>,
        body: &[u8],
        authorization: Option<&[u8]>,
    ) -> std::result::Result<Self, OAuthError> {
        use OAuthErrorCode::InvalidRequest;
        let is_form = content_type
            .and_then(|c| std::str::from_utf8(c).ok())
            .and_then(|c| c.split(';').next())
            .is_some_and(|m| m.trim().eq_ignore_ascii_case("application/x-www-form-urlencoded"));
        if !is_form {
            return Err(OAuthError::new(InvalidRequest, "the body must be application/x-www-form-urlencoded"));
        }
        if body.len() > MAX_FORM_LEN {
            return Err(OAuthError::new(InvalidRequest, format!("the body is larger than {MAX_FORM_LEN} bytes")));
        }
        let mut req = TokenRequest {
            // Not UTF-8: keep it as something that fails as invalid_client.
            authorization: authorization.map(|a| String::from_utf8_lossy(a).into_owned()),
            ..TokenRequest::default()
        };
        for (k, v) in form_urlencoded::parse(body) {
            let slot = match &*k {
                "grant_type" => &mut req.grant_type,
                "scope" => &mut req.scope,
                "client_id" => &mut req.client_id,
                "client_secret" => &mut req.client_secret,
                _ => continue,
            };
            if slot.replace(v.into_owned()).is_some() {
                return Err(OAuthError::new(InvalidRequest, format!("parameter `{k}` is repeated")));
            }
        }
        Ok(req)
    }
}

impl fmt::Debug for TokenRequest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TokenRequest")
            .field("grant_type", &self.grant_type)
            .field("scope", &self.scope)
            .field("client_id", &self.client_id)
            .field("client_secret", &self.client_secret.as_ref().map(|_| "<redacted>"))
            .field("authorization", &self.authorization.as_ref().map(|_| "<redacted>"))
            .finish()
    }
}

/// A successful token response (RFC 6749 §5.1). Send it with
/// `Cache-Control: no-store`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct TokenResponse {
    /// The signed JWT.
    pub access_token: String,
    /// Always `Bearer`.
    pub token_type: &'static str,
    /// Lifetime in seconds.
    pub expires_in: u64,
    /// The granted scopes, space-separated.
    pub scope: String,
}

/// One client as written in the clients file.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ClientConfig {
    /// The client id.
    pub id: String,
    /// argon2id PHC string of the secret ([`hash_client_secret`]).
    pub secret_hash: String,
    /// The scopes this client may be granted.
    pub scopes: Vec<String>,
    /// Token lifetime for this client, in seconds.
    #[serde(default)]
    pub ttl_secs: Option<u64>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct ClientsFile {
    #[serde(default)]
    client: Vec<ClientConfig>,
}

#[derive(Debug)]
struct Client {
    secret_hash: String,
    scopes: Vec<Scope>,
    ttl: Option<Duration>,
}

/// The clients of the client-credentials grant and the issuer that signs
/// their tokens.
#[derive(Debug)]
pub struct ClientRegistry {
    clients: HashMap<String, Client>,
    /// Verified against when the client id is unknown, to equalize time.
    dummy_hash: String,
    issuer: Arc<TokenIssuer>,
}

/// Hash a client secret for the clients file: argon2id with the crate's
/// default parameters (RFC 9106 / OWASP: 19 MiB, 2 passes, 1 lane) and a
/// random salt, as a PHC string.
pub fn hash_client_secret(secret: &str) -> Result<String> {
    hash_client_secret_with(secret, Params::default())
}

/// [`hash_client_secret`] with explicit argon2id parameters (memory in KiB,
/// passes, lanes) — for tests and very small machines.
pub fn hash_client_secret_with(secret: &str, params: Params) -> Result<String> {
    Argon2::from(params)
        .hash_password(secret.as_bytes())
        .map(|h| h.to_string())
        .map_err(|e| Error::internal(format!("argon2 hashing failed: {e}")))
}

/// A new random client secret (256 bits, base64url).
pub fn generate_client_secret() -> Result<String> {
    random_token(32)
}

fn argon2id_params(phc: &str) -> std::result::Result<Params, String> {
    let hash = PasswordHash::new(phc).map_err(|e| format!("not a PHC string: {e}"))?;
    if hash.algorithm.as_str() != "argon2id" {
        return Err(format!("algorithm `{}` is not argon2id", hash.algorithm.as_str()));
    }
    Params::try_from(&hash).map_err(|e| format!("bad argon2 parameters: {e}"))
}

impl ClientRegistry {
    /// Read and check the clients file at `path`.
    pub fn load(path: &Path, issuer: Arc<TokenIssuer>) -> Result<Self> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| Error::internal(format!("cannot read clients file {}: {e}", path.display())).with_source(e))?;
        Self::from_toml(&text, issuer).map_err(|e| Error::invalid(format!("{}: {}", path.display(), e.message())))
    }

    /// Parse and check a clients file; every problem is reported at once.
    pub fn from_toml(text: &str, issuer: Arc<TokenIssuer>) -> Result<Self> {
        let file: ClientsFile = toml::from_str(text).map_err(|e| Error::invalid(format!("clients file: {e}")))?;
        Self::new(file.client, issuer)
    }

    /// Build from client entries; every problem is reported at once.
    pub fn new(entries: Vec<ClientConfig>, issuer: Arc<TokenIssuer>) -> Result<Self> {
        let mut problems = vec![];
        let mut clients = HashMap::new();
        let mut first_params = None;
        for (i, c) in entries.into_iter().enumerate() {
            let at = format!("client[{i}] `{}`", c.id.chars().take(64).collect::<String>());
            if c.id.is_empty() || c.id.len() > MAX_CLIENT_ID_LEN || c.id.chars().any(char::is_control) {
                problems.push(format!("{at}: id must be 1 to {MAX_CLIENT_ID_LEN} bytes without control characters"));
            }
            match argon2id_params(&c.secret_hash) {
                Ok(p) => {
                    first_params.get_or_insert(p);
                }
                Err(why) => problems.push(format!("{at}: secret_hash: {why}")),
            }
            let mut scopes = vec![];
            for s in &c.scopes {
                match s.parse::<Scope>() {
                    Ok(scope) => scopes.push(scope),
                    Err(e) => problems.push(format!("{at}: {}", e.message())),
                }
            }
            if c.scopes.is_empty() {
                problems.push(format!("{at}: needs at least one scope"));
            }
            if let Some(ttl) = c.ttl_secs
                && (ttl == 0 || ttl > issuer.max_ttl().as_secs())
            {
                problems.push(format!("{at}: ttl_secs must be between 1 and {}", issuer.max_ttl().as_secs()));
            }
            let client = Client { secret_hash: c.secret_hash, scopes, ttl: c.ttl_secs.map(Duration::from_secs) };
            if clients.insert(c.id, client).is_some() {
                problems.push(format!("{at}: id is used twice"));
            }
        }
        if !problems.is_empty() {
            return Err(Error::invalid(format!("invalid clients file: {}", problems.join("; "))));
        }
        let dummy_secret = random_token(32)?;
        let dummy_hash = hash_client_secret_with(&dummy_secret, first_params.unwrap_or_default())?;
        Ok(Self { clients, dummy_hash, issuer })
    }

    /// How many clients are registered.
    pub fn len(&self) -> usize {
        self.clients.len()
    }

    /// Whether no client is registered.
    pub fn is_empty(&self) -> bool {
        self.clients.is_empty()
    }

    /// Run the client-credentials grant. CPU-bound (one argon2
    /// verification): call it from a blocking thread.
    pub fn grant(&self, req: &TokenRequest) -> std::result::Result<TokenResponse, OAuthError> {
        use OAuthErrorCode::*;
        match req.grant_type.as_deref() {
            None | Some("") => return Err(OAuthError::new(InvalidRequest, "grant_type is missing")),
            Some("client_credentials") => {}
            Some(_) => return Err(OAuthError::new(UnsupportedGrantType, "only client_credentials is supported")),
        }
        let (id, secret) = client_credentials(req)?;
        let client = self.clients.get(&id);
        let hash = client.map_or(self.dummy_hash.as_str(), |c| c.secret_hash.as_str());
        let verified =
            secret.len() <= MAX_CLIENT_SECRET_LEN && Argon2::default().verify_password(secret.as_bytes(), hash).is_ok();
        let client = match client {
            Some(c) if verified => c,
            _ => return Err(OAuthError::new(InvalidClient, "client authentication failed")),
        };
        let scopes = match req.scope.as_deref().map(str::trim).filter(|s| !s.is_empty()) {
            None => client.scopes.clone(),
            Some(s) => {
                let asked = parse_scope_list(s).map_err(|e| OAuthError::new(InvalidScope, e.message()))?;
                if let Some(extra) = asked.iter().find(|a| !client.scopes.iter().any(|c| c.includes(a))) {
                    return Err(OAuthError::new(
                        InvalidScope,
                        format!("scope `{extra}` is not allowed for this client"),
                    ));
                }
                asked
            }
        };
        let ttl = client.ttl.unwrap_or(self.issuer.default_ttl()).min(self.issuer.max_ttl());
        let token = self.issuer.issue(&id, &scopes, Some(ttl)).map_err(|e| {
            tracing::error!(client = %id, error = %e, "cannot issue an OAuth token");
            OAuthError::new(ServerError, "the token could not be issued")
        })?;
        Ok(TokenResponse {
            access_token: token.token,
            token_type: "Bearer",
            expires_in: token.expires_in,
            scope: token.scope,
        })
    }
}

/// The client id and secret, from exactly one of: the Basic header, the form.
fn client_credentials(req: &TokenRequest) -> std::result::Result<(String, String), OAuthError> {
    use OAuthErrorCode::*;
    let failed = || OAuthError::new(InvalidClient, "client authentication failed");
    match &req.authorization {
        Some(header) => {
            if req.client_secret.is_some() {
                return Err(OAuthError::new(InvalidRequest, "use one client authentication method, not two"));
            }
            let (id, secret) = parse_basic(header).ok_or_else(failed)?;
            if req.client_id.as_ref().is_some_and(|form_id| *form_id != id) {
                return Err(OAuthError::new(InvalidRequest, "client_id differs from the Authorization header"));
            }
            Ok((id, secret))
        }
        None => match (&req.client_id, &req.client_secret) {
            (Some(id), Some(secret)) => Ok((id.clone(), secret.clone())),
            _ => Err(OAuthError::new(InvalidClient, "client authentication is missing")),
        },
    }
}

/// `Basic base64(urlencode(id) ":" urlencode(secret))` (RFC 6749 §2.3.1).
fn parse_basic(header: &str) -> Option<(String, String)> {
    if header.len() > 4 * MAX_CLIENT_SECRET_LEN {
        return None;
    }
    let (scheme, rest) = header.trim().split_once(' ')?;
    if !scheme.eq_ignore_ascii_case("basic") {
        return None;
    }
    let raw = base64::engine::general_purpose::STANDARD.decode(rest.trim()).ok()?;
    let text = String::from_utf8(raw).ok()?;
    let (id, secret) = text.split_once(':')?;
    let decode = |s: &str| -> Option<String> {
        let plus = s.replace('+', " ");
        percent_encoding::percent_decode_str(&plus).decode_utf8().ok().map(|c| c.into_owned())
    };
    let id = decode(id)?;
    (!id.is_empty()).then_some(())?;
    Some((id, decode(secret)?))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn basic(id: &str, secret: &str) -> String {
        format!("Basic {}", base64::engine::general_purpose::STANDARD.encode(format!("{id}:{secret}")))
    }

    #[test]
    fn basic_header_parsing() {
        assert_eq!(parse_basic(&basic("a", "s3")), Some(("a".into(), "s3".into())));
        assert_eq!(parse_basic(&basic("a%3Ab", "x+y%2B")), Some(("a:b".into(), "x y+".into())));
        assert_eq!(parse_basic(&basic("a", "b:c")), Some(("a".into(), "b:c".into())));
        for bad in ["", "Basic", "Basic !!!", "Bearer abc", &basic("", "x"), "Basic YQ=="] {
            assert_eq!(parse_basic(bad), None, "{bad}");
        }
        assert_eq!(parse_basic(&format!("Basic {}", "A".repeat(10_000))), None);
        // Invalid escapes stay literal, as in WHATWG form decoding.
        assert_eq!(parse_basic(&basic("a%ZZ", "x")), Some(("a%ZZ".into(), "x".into())));
    }

    #[test]
    fn errors_map_to_rfc_statuses_and_json() {
        let e = OAuthError::new(OAuthErrorCode::InvalidClient, "x");
        assert_eq!(e.status(), 401);
        assert!(e.www_authenticate().unwrap().starts_with("Basic"));
        assert_eq!(
            serde_json::to_value(&e).unwrap(),
            serde_json::json!({"error": "invalid_client", "error_description": "x"})
        );
        for (code, status) in [
            (OAuthErrorCode::InvalidRequest, 400),
            (OAuthErrorCode::UnsupportedGrantType, 400),
            (OAuthErrorCode::InvalidScope, 400),
            (OAuthErrorCode::ServerError, 500),
        ] {
            let e = OAuthError::new(code, "x");
            assert_eq!(e.status(), status);
            assert!(e.www_authenticate().is_none());
        }
        assert_eq!(OAuthError::new(OAuthErrorCode::InvalidScope, "y").to_string(), "invalid_scope: y");
    }

    #[test]
    fn form_parsing() {
        let ct = Some(&b"application/x-www-form-urlencoded; charset=UTF-8"[..]);
        let body =
            b"grant_type=client_credentials&scope=kv%3Aread%3Aa+kv%3Aread%3Ab&client_id=a&client_secret=s%2B1&x=y";
        let r = TokenRequest::from_form(ct, body, Some(b"Basic \xff")).unwrap();
        assert_eq!(r.grant_type.as_deref(), Some("client_credentials"));
        assert_eq!(r.scope.as_deref(), Some("kv:read:a kv:read:b"));
        assert_eq!((r.client_id.as_deref(), r.client_secret.as_deref()), (Some("a"), Some("s+1")));
        assert!(r.authorization.is_some(), "non-UTF-8 header kept (lossily) so it fails as invalid_client");
        let bad = |ct: Option<&[u8]>, body: &[u8]| TokenRequest::from_form(ct, body, None).unwrap_err().error;
        assert_eq!(bad(None, b"grant_type=client_credentials"), OAuthErrorCode::InvalidRequest);
        assert_eq!(bad(Some(b"application/json"), b"{}"), OAuthErrorCode::InvalidRequest);
        assert_eq!(bad(ct, b"scope=a&scope=b"), OAuthErrorCode::InvalidRequest);
        assert_eq!(bad(ct, &vec![b'a'; MAX_FORM_LEN + 1]), OAuthErrorCode::InvalidRequest);
        let r = TokenRequest::from_form(ct, b"\xff\xfe=%ZZ&&=&grant_type", None).unwrap();
        assert_eq!(r.grant_type.as_deref(), Some(""));
    }

    #[test]
    fn request_debug_redacts_secrets() {
        let r = TokenRequest {
            client_secret: Some("hunter2".into()),
            authorization: Some(basic("a", "hunter2")),
            ..TokenRequest::default()
        };
        assert!(!format!("{r:?}").contains("hunter2"));
        assert!(!format!("{r:?}").contains(&basic("a", "hunter2")[6..]));
    }
}
