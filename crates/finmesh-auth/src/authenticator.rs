//! Bearer-token authentication: `Authorization` header → [`Principal`].
//!
//! The checks, in order; the first that fails answers
//! [`ErrorKind::Unauthorized`] with a message that never echoes the token:
//!
//! 1. the header is present, at most [`MAX_AUTHORIZATION_LEN`] bytes, of
//!    the form `Bearer <token>` (scheme case-insensitive, RFC 9110 §11.1),
//!    and the token uses only token68 characters (so it is ASCII);
//! 2. the JOSE header parses, names HS256, EdDSA, RS256 or ES256 (`none`
//!    and everything else are refused before any key is touched), and has no
//!    `crit` extensions (RFC 7515 §4.1.11: none is understood here);
//! 3. key selection: with a `kid`, only the key with that id, and only if it
//!    is pinned to the header's algorithm; without a `kid`, every key pinned
//!    to that algorithm. A token can therefore never be checked with a key of
//!    another algorithm: an HS256 token "signed" with an RSA public key is
//!    checked against HS256 secrets only (algorithm confusion);
//! 4. the signature verifies with one of the selected keys;
//! 5. `exp` is present and not past, `nbf` (when present) is not in the
//!    future, both with `leeway_secs` of skew; `sub` is a non-empty string; `iss`
//!    equals the issuer of the key that verified it (each key speaks for one
//!    issuer, see [`crate::config`]), and one `aud` equals the configured
//!    audience when one is configured (a token's `aud` is ignored otherwise);
//! 6. the token's scopes are capped by the key's ceiling (`max_scope`):
//!    a scope that no ceiling entry includes is dropped (logged at debug
//!    level), so a partner's key cannot mint `admin` or reach another
//!    tenant's streams. The node's own signing key has no ceiling.
//!
//! A token that passed is remembered (see [`crate::cache`]) until
//! `exp + leeway_secs`, so repeating it costs a map lookup, not a signature
//! check nor even the character check of step 1: the cache is asked first,
//! with the token's raw bytes.
//!
//! Scopes are read from the `scope` claim (a space-separated string as in
//! OAuth, RFC 8693 §4.2; an array of strings is accepted too) and from a
//! `scopes` claim (an array of strings); a token may carry either or both, and
//! the principal holds all of them. Unknown scopes grant nothing (see
//! [`crate::access`]).

use std::sync::Arc;

use finmesh_core::{Error, ErrorKind, Result};
use jsonwebtoken::errors::ErrorKind as JwtError;
use jsonwebtoken::{Validation, decode, decode_header};
use serde::Deserialize;

use crate::Principal;
use crate::cache::TokenCache;
use crate::config::{AuthConfig, KeyAlgorithm};
use crate::keys::{VerifyingKey, load_keys};

/// Longest `Authorization` header accepted, in bytes.
pub const MAX_AUTHORIZATION_LEN: usize = 16 * 1024;

/// `WWW-Authenticate` of a 401 for a request without credentials (RFC 6750 §3).
pub const BEARER_CHALLENGE: &str = "Bearer realm=\"finmesh\"";
/// `WWW-Authenticate` of a 401 for a request whose token was refused.
pub const BEARER_INVALID_TOKEN: &str = "Bearer realm=\"finmesh\", error=\"invalid_token\"";
/// `WWW-Authenticate` of a 403: a valid token without the needed scope.
pub const BEARER_INSUFFICIENT_SCOPE: &str = "Bearer realm=\"finmesh\", error=\"insufficient_scope\"";

/// The `WWW-Authenticate` value of a 401 from [`Authenticator::authenticate`],
/// given whether the request had an `Authorization` header.
pub fn bearer_challenge(had_authorization: bool) -> &'static str {
    if had_authorization { BEARER_INVALID_TOKEN } else { BEARER_CHALLENGE }
}

/// Verifies bearer tokens. Cheap to clone; shared by every request.
#[derive(Debug, Clone)]
pub struct Authenticator {
    mode: Mode,
}

#[derive(Debug, Clone)]
enum Mode {
    /// `--insecure-no-auth`: every request is an admin.
    Disabled,
    /// Bearer JWTs checked against pinned keys.
    Jwt(Arc<Verifier>),
}

#[derive(Debug)]
struct Verifier {
    /// Each key with the validation rules for its algorithm.
    keys: Vec<(VerifyingKey, Validation)>,
    /// Tokens that verified, until they expire.
    cache: TokenCache,
    /// Seconds of skew allowed past `exp`.
    leeway: u64,
}

/// Select jsonwebtoken's aws-lc-rs provider explicitly, so that a crate that
/// also enables its `rust_crypto` feature cannot make it panic at first use.
pub(crate) fn install_jwt_provider() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        let _ = jsonwebtoken::crypto::aws_lc::DEFAULT_PROVIDER.install_default();
    });
}

fn validation(cfg: &AuthConfig, alg: KeyAlgorithm, issuer: &str) -> Validation {
    let mut v = Validation::new(alg.jwt());
    v.leeway = cfg.leeway_secs;
    v.validate_exp = true;
    v.validate_nbf = true;
    let mut required = vec!["exp", "sub", "iss"];
    v.set_issuer(&[issuer]);
    match &cfg.audience {
        Some(aud) => {
            v.set_audience(&[aud]);
            required.push("aud");
        }
        None => v.validate_aud = false,
    }
    v.set_required_spec_claims(&required);
    v
}

impl Authenticator {
    /// No authentication: every request acts as an admin principal named
    /// `anonymous`. Only for `--insecure-no-auth` and tests that are not
    /// about auth.
    pub fn disabled() -> Self {
        Self { mode: Mode::Disabled }
    }

    /// Validate `cfg`, read every key it names, and build the verifier.
    /// Errors: [`ErrorKind::Invalid`] for a bad configuration or key,
    /// [`ErrorKind::Internal`] for a file that cannot be read.
    pub fn from_config(cfg: &AuthConfig) -> Result<Self> {
        install_jwt_provider();
        let keys = load_keys(cfg)?.into_iter().map(|k| {
            let v = validation(cfg, k.alg, &k.trust.issuer);
            (k, v)
        });
        let keys = keys.collect();
        let verifier = Verifier { keys, cache: TokenCache::new(cfg.token_cache_entries), leeway: cfg.leeway_secs };
        Ok(Self { mode: Mode::Jwt(Arc::new(verifier)) })
    }

    /// Whether authentication is off.
    pub fn is_disabled(&self) -> bool {
        matches!(self.mode, Mode::Disabled)
    }

    /// Authenticate a request from its `Authorization` header value, if any.
    /// Errors are [`ErrorKind::Unauthorized`].
    pub fn authenticate(&self, authorization: Option<&str>) -> Result<Principal> {
        self.authenticate_bytes(authorization.map(str::as_bytes))
    }

    /// [`Self::authenticate`] from the raw header bytes (an `http::HeaderValue`
    /// may hold bytes that are not UTF-8: they are refused, not a panic).
    pub fn authenticate_bytes(&self, authorization: Option<&[u8]>) -> Result<Principal> {
        match &self.mode {
            Mode::Disabled => Ok(Principal::admin("anonymous")),
            Mode::Jwt(v) => {
                let header = authorization.ok_or_else(|| unauthorized("missing bearer token"))?;
                v.verify(bearer_token(header)?)
            }
        }
    }
}

/// The token of a `Bearer` authorization header value.
pub fn parse_bearer(header: &str) -> Result<&str> {
    token68(bearer_token(header.as_bytes())?)
}

/// The token of a `Bearer` header, its characters not checked yet (see
/// [`token68`]). Works on bytes: every boundary is an ASCII byte.
fn bearer_token(header: &[u8]) -> Result<&[u8]> {
    if header.len() > MAX_AUTHORIZATION_LEN {
        return Err(unauthorized(format!("authorization header is longer than {MAX_AUTHORIZATION_LEN} bytes")));
    }
    let blank = |b: &u8| *b == b' ' || *b == b'\t';
    let start = header.iter().position(|b| !blank(b)).unwrap_or(header.len());
    let end = header.iter().rposition(|b| !blank(b)).map_or(start, |i| i + 1);
    let trimmed = &header[start..end];
    let scheme_len = trimmed.iter().position(blank).unwrap_or(trimmed.len());
    let (scheme, rest) = trimmed.split_at(scheme_len);
    if !scheme.eq_ignore_ascii_case(b"bearer") {
        return Err(unauthorized("expected the Bearer authorization scheme"));
    }
    let gap = rest.iter().position(|b| !blank(b)).unwrap_or(rest.len());
    let token = &rest[gap..];
    if token.is_empty() {
        return Err(unauthorized("empty bearer token"));
    }
    Ok(token)
}

/// `token` as text if it uses only token68 characters (RFC 9110 §11.2).
fn token68(token: &[u8]) -> Result<&str> {
    let allowed = |b: &u8| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~' | b'+' | b'/' | b'=');
    if !token.iter().all(allowed) {
        return Err(unauthorized("malformed bearer token"));
    }
    // All ASCII, hence UTF-8.
    std::str::from_utf8(token).map_err(|_| unauthorized("malformed bearer token"))
}

/// The claims this crate reads; the rest are checked by jsonwebtoken or
/// ignored.
#[derive(Deserialize)]
struct Claims {
    sub: String,
    /// Checked by jsonwebtoken; read here to bound the cache entry.
    exp: u64,
    #[serde(default)]
    scope: Option<OneOrMany>,
    #[serde(default)]
    scopes: Option<OneOrMany>,
}

#[derive(Deserialize)]
#[serde(untagged)]
enum OneOrMany {
    /// Space-separated.
    One(String),
    Many(Vec<String>),
}

impl OneOrMany {
    fn into_vec(self, out: &mut Vec<String>) {
        match self {
            OneOrMany::One(s) => out.extend(s.split_ascii_whitespace().map(str::to_owned)),
            OneOrMany::Many(v) => out.extend(v),
        }
    }
}

impl Verifier {
    fn verify(&self, token: &[u8]) -> Result<Principal> {
        let now = jsonwebtoken::get_current_timestamp();
        // A hit means these exact bytes passed every check below before.
        if let Some(p) = self.cache.get(token, now) {
            return Ok(p);
        }
        let token = token68(token)?;
        let header = decode_header(token)
            .map_err(|_| unauthorized("malformed token header, or an algorithm this node does not accept"))?;
        if header.crit.is_some() {
            // RFC 7515 §4.1.11: this node understands no extension.
            return Err(unauthorized("token header has critical extensions this node does not understand"));
        }
        let alg = KeyAlgorithm::from_jwt(header.alg)
            .ok_or_else(|| unauthorized(format!("algorithm {:?} is not accepted", header.alg)))?;
        let candidates = self.keys.iter().filter(|(k, _)| match &header.kid {
            Some(kid) => k.kid.as_deref() == Some(kid.as_str()),
            None => k.alg == alg,
        });
        let mut last = unauthorized(match &header.kid {
            Some(_) => "unknown key id",
            None => "no key for the token's algorithm",
        });
        for (key, validation) in candidates {
            if key.alg != alg {
                // A kid names a key of another algorithm: never try it.
                last = unauthorized("the token's algorithm does not match its key");
                continue;
            }
            match decode::<Claims>(token, &key.key, validation) {
                Ok(data) if data.claims.sub.trim().is_empty() => {
                    return Err(unauthorized("token has an empty `sub` claim"));
                }
                Ok(data) => {
                    let mut scopes = vec![];
                    if let Some(s) = data.claims.scope {
                        s.into_vec(&mut scopes);
                    }
                    if let Some(s) = data.claims.scopes {
                        s.into_vec(&mut scopes);
                    }
                    let principal = match &key.trust.ceiling {
                        None => Principal::new(data.claims.sub, scopes),
                        Some(ceiling) => Principal::within(data.claims.sub, scopes, ceiling),
                    };
                    let valid_until = data.claims.exp.saturating_add(self.leeway);
                    self.cache.insert(token.as_bytes(), &principal, valid_until, now);
                    return Ok(principal);
                }
                Err(e) if matches!(e.kind(), JwtError::InvalidSignature) => {
                    last = unauthorized("bad signature");
                }
                // Other errors: the token's form (no other key would help),
                // or its claims, checked only after this key verified it.
                Err(e) => return Err(claim_error(e)),
            }
        }
        Err(last)
    }
}

fn claim_error(e: jsonwebtoken::errors::Error) -> Error {
    let msg = match e.kind() {
        JwtError::ExpiredSignature => "token expired".to_owned(),
        JwtError::ImmatureSignature => "token not valid yet (nbf)".to_owned(),
        JwtError::InvalidIssuer => "wrong issuer".to_owned(),
        JwtError::InvalidAudience => "wrong audience".to_owned(),
        JwtError::MissingRequiredClaim(c) => format!("token has no `{c}` claim"),
        JwtError::InvalidClaimFormat(c) => format!("claim `{c}` is malformed"),
        JwtError::Json(_) | JwtError::Base64(_) | JwtError::Utf8(_) => "malformed token claims".to_owned(),
        JwtError::InvalidAlgorithm => "the token's algorithm does not match its key".to_owned(),
        _ => "invalid token".to_owned(),
    };
    unauthorized(msg).with_source(e)
}

fn unauthorized(message: impl Into<String>) -> Error {
    Error::new(ErrorKind::Unauthorized, message)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bearer_parsing_accepts_the_usual_forms() {
        assert_eq!(parse_bearer("Bearer a.b.c").unwrap(), "a.b.c");
        assert_eq!(parse_bearer("bearer  a.b-_c=").unwrap(), "a.b-_c=");
        assert_eq!(parse_bearer(" BEARER\ta.b.c ").unwrap(), "a.b.c");
        assert_eq!(parse_bearer("\t Bearer \t x.y~+/ \t").unwrap(), "x.y~+/");
    }

    #[test]
    fn bearer_parsing_refuses_hostile_input() {
        let huge = format!("Bearer {}", "a".repeat(MAX_AUTHORIZATION_LEN));
        for h in ["", "Bearer", "Bearer ", "Basic dXNlcjpwdw==", "Bearera.b.c", "Bearer a b", "Bearer a\u{0}b", &huge] {
            let e = parse_bearer(h).unwrap_err();
            assert_eq!(e.kind(), ErrorKind::Unauthorized, "{h:?}");
            assert!(!e.message().contains("dXNlcjpwdw"), "never echo credentials");
        }
        assert!(parse_bearer("Bearer tökén").is_err());
        assert!(parse_bearer("ö Bearer a.b.c").is_err());
        assert!(parse_bearer("Bearer a.b.c ö").is_err());
    }

    #[test]
    fn disabled_lets_everyone_in_as_admin() {
        let a = Authenticator::disabled();
        assert!(a.is_disabled());
        let p = a.authenticate(None).unwrap();
        assert_eq!(p.subject(), "anonymous");
        assert!(p.allows(&crate::Access::Admin));
        assert!(a.authenticate_bytes(Some(&[0xff, 0xfe])).is_ok());
    }
}
