//! Token issuance: [`TokenIssuer`] signs the tokens this node hands out
//! (`finmesh token issue`, `POST /oauth/token`, the admin token printed at
//! first start).
//!
//! An issued token's header is `{"alg": <HS256|EdDSA>, "typ": "JWT"}` plus
//! `kid` when configured; its claims are exactly
//! `sub`, `scope` (canonical scopes joined by one space), `iat`, `exp`,
//! `iss` (the node's own issuer, `signing.issuer`), `aud` (`audience`; both
//! default `finmesh`) and `jti` (128 random bits,
//! base64url). Invariants: every scope in a token parsed as a [`Scope`]
//! before signing; `0 < exp - iat <= max_ttl_secs`; a token this issuer signs
//! is accepted by an [`crate::Authenticator`] built from the same
//! configuration.

use std::path::Path;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use finmesh_core::{Error, Result};
use jsonwebtoken::{EncodingKey, Header, encode};
use serde::Serialize;

use crate::authenticator::install_jwt_provider;
use crate::config::{AuthConfig, DEFAULT_ISSUER, KeyAlgorithm};
use crate::keys::signing_key;
use crate::scope::{Scope, format_scope_list};
use crate::secret::{load_or_create_secret, random_token};
use crate::{Authenticator, Principal};

/// Longest `sub` accepted when issuing, in bytes.
pub const MAX_SUBJECT_LEN: usize = 256;

/// Signs tokens with the node's key. Cheap to share behind an `Arc`.
pub struct TokenIssuer {
    key: EncodingKey,
    header: Header,
    issuer: String,
    audience: String,
    default_ttl: Duration,
    max_ttl: Duration,
}

impl std::fmt::Debug for TokenIssuer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TokenIssuer")
            .field("alg", &self.header.alg)
            .field("kid", &self.header.kid)
            .field("issuer", &self.issuer)
            .field("audience", &self.audience)
            .finish_non_exhaustive()
    }
}

/// A freshly signed token.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IssuedToken {
    /// The compact JWT.
    pub token: String,
    /// Its `jti`.
    pub jti: String,
    /// Its `sub`.
    pub subject: String,
    /// Its `scope` claim: canonical scopes joined by one space.
    pub scope: String,
    /// Lifetime from issuance, whole seconds.
    pub expires_in: u64,
    /// `exp`, seconds since the Unix epoch.
    pub expires_at: u64,
}

#[derive(Serialize)]
struct IssuedClaims<'a> {
    sub: &'a str,
    scope: &'a str,
    iat: u64,
    exp: u64,
    iss: &'a str,
    aud: &'a str,
    jti: &'a str,
}

impl TokenIssuer {
    /// Build from the `signing` table of `cfg` (validated first).
    /// [`ErrorKind::Invalid`](finmesh_core::ErrorKind::Invalid) when there is none.
    pub fn from_config(cfg: &AuthConfig) -> Result<Self> {
        install_jwt_provider();
        cfg.validate()?;
        let s = cfg.signing.as_ref().ok_or_else(|| Error::invalid("auth.signing is not configured"))?;
        let (key, _) = signing_key(s)?;
        let mut header = Header::new(s.alg.jwt());
        header.kid = s.kid.clone();
        Ok(Self {
            key,
            header,
            issuer: s.issuer().to_owned(),
            audience: cfg.audience.clone().unwrap_or_else(|| DEFAULT_ISSUER.to_owned()),
            default_ttl: Duration::from_secs(s.default_ttl_secs),
            max_ttl: Duration::from_secs(s.max_ttl_secs),
        })
    }

    /// The algorithm tokens are signed with.
    pub fn algorithm(&self) -> KeyAlgorithm {
        KeyAlgorithm::from_jwt(self.header.alg).unwrap_or(KeyAlgorithm::HS256)
    }

    /// Lifetime used when a request names none.
    pub fn default_ttl(&self) -> Duration {
        self.default_ttl
    }

    /// Longest lifetime this issuer signs.
    pub fn max_ttl(&self) -> Duration {
        self.max_ttl
    }

    /// Sign a token for `subject` with `scopes`, valid for `ttl` (default
    /// [`Self::default_ttl`]); whole seconds, rounded up.
    /// [`ErrorKind::Invalid`](finmesh_core::ErrorKind::Invalid) for an empty or
    /// overlong subject, no scope, or a lifetime of zero or above the maximum.
    pub fn issue(&self, subject: &str, scopes: &[Scope], ttl: Option<Duration>) -> Result<IssuedToken> {
        if subject.is_empty() || subject.len() > MAX_SUBJECT_LEN || subject.chars().any(char::is_control) {
            return Err(Error::invalid(format!(
                "token subject must be 1 to {MAX_SUBJECT_LEN} bytes without control characters"
            )));
        }
        if scopes.is_empty() {
            return Err(Error::invalid("a token needs at least one scope"));
        }
        let ttl = ttl.unwrap_or(self.default_ttl);
        let secs = ttl.as_secs() + u64::from(ttl.subsec_nanos() > 0);
        if secs == 0 || secs > self.max_ttl.as_secs() {
            return Err(Error::invalid(format!(
                "token lifetime must be between 1 s and {} s; asked for {secs} s",
                self.max_ttl.as_secs()
            )));
        }
        let now = SystemTime::now().duration_since(UNIX_EPOCH).map_err(|_| Error::internal("clock before 1970"))?;
        let iat = now.as_secs();
        let exp = iat + secs;
        let jti = random_token(16)?;
        let scope = format_scope_list(scopes);
        let claims =
            IssuedClaims { sub: subject, scope: &scope, iat, exp, iss: &self.issuer, aud: &self.audience, jti: &jti };
        let token = encode(&self.header, &claims, &self.key)
            .map_err(|e| Error::internal("cannot sign the token").with_source(e))?;
        Ok(IssuedToken { token, jti, subject: subject.to_owned(), scope, expires_in: secs, expires_at: exp })
    }
}

/// Everything `finmesh token issue --sub S --scope A --scope B --ttl T` does
/// after parsing its arguments: parse the scopes (each argument may itself be
/// a space-separated list), build the issuer from `cfg`, sign.
/// [`ErrorKind::Invalid`](finmesh_core::ErrorKind::Invalid) for an unknown
/// scope, so an operator's typo never yields a token that silently grants
/// nothing.
pub fn issue_token(cfg: &AuthConfig, subject: &str, scopes: &[String], ttl: Option<Duration>) -> Result<IssuedToken> {
    let scopes =
        scopes.iter().flat_map(|s| s.split_ascii_whitespace()).map(str::parse).collect::<Result<Vec<Scope>>>()?;
    TokenIssuer::from_config(cfg)?.issue(subject, &scopes, ttl)
}

/// Parse a lifetime such as `900`, `900s`, `15m`, `12h` or `30d`.
pub fn parse_ttl(s: &str) -> Result<Duration> {
    let s = s.trim();
    let (digits, unit) = s.split_at(s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len()));
    let n: u64 =
        digits.parse().map_err(|_| Error::invalid(format!("lifetime `{s}`: expected e.g. 900s, 15m, 12h, 30d")))?;
    let mult = match unit {
        "" | "s" => 1,
        "m" => 60,
        "h" => 3600,
        "d" => 86_400,
        _ => return Err(Error::invalid(format!("lifetime `{s}`: units are s, m, h, d"))),
    };
    n.checked_mul(mult).map(Duration::from_secs).ok_or_else(|| Error::invalid(format!("lifetime `{s}` is too long")))
}

/// A node started without any auth settings: its own secret in `secret_file`
/// (created on first start), the matching authenticator and issuer, and — only
/// when the secret was created just now — an admin token for `admin_ttl` to
/// print once.
#[derive(Debug)]
pub struct NodeAuth {
    /// [`AuthConfig::node_secret`] of the secret file.
    pub config: AuthConfig,
    /// Verifies the node's tokens.
    pub authenticator: Authenticator,
    /// Signs the node's tokens.
    pub issuer: TokenIssuer,
    /// `Some` on first start only: print it, it is not stored.
    pub admin_token: Option<IssuedToken>,
}

/// Build [`NodeAuth`], creating the secret (mode 0600) when missing.
pub fn bootstrap_node_auth(secret_file: &Path, admin_ttl: Duration) -> Result<NodeAuth> {
    let (_, created) = load_or_create_secret(secret_file)?;
    let config = AuthConfig::node_secret(secret_file);
    let authenticator = Authenticator::from_config(&config)?;
    let issuer = TokenIssuer::from_config(&config)?;
    let admin_token = if created { Some(issuer.issue("admin", &[Scope::Admin], Some(admin_ttl))?) } else { None };
    Ok(NodeAuth { config, authenticator, issuer, admin_token })
}

impl NodeAuth {
    /// Authenticate `token` as a bearer token (a convenience for tests and
    /// the CLI's `token verify`).
    pub fn check(&self, token: &str) -> Result<Principal> {
        self.authenticator.authenticate(Some(&format!("Bearer {token}")))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ttl_parsing() {
        assert_eq!(parse_ttl("900").unwrap(), Duration::from_secs(900));
        assert_eq!(parse_ttl("15m").unwrap(), Duration::from_secs(900));
        assert_eq!(parse_ttl("12h").unwrap(), Duration::from_secs(43_200));
        assert_eq!(parse_ttl("30d").unwrap(), Duration::from_secs(2_592_000));
        for bad in ["", "m", "1y", "-5", "1.5h", "99999999999999999999d"] {
            assert!(parse_ttl(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn bootstrap_prints_an_admin_token_only_the_first_time() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("auth-secret");
        let first = bootstrap_node_auth(&path, Duration::from_secs(60)).unwrap();
        let token = first.admin_token.as_ref().expect("first start issues an admin token");
        let p = first.check(&token.token).unwrap();
        assert!(p.allows(&crate::Access::Admin));
        assert_eq!(p.subject(), "admin");
        let second = bootstrap_node_auth(&path, Duration::from_secs(60)).unwrap();
        assert!(second.admin_token.is_none());
        second.check(&token.token).expect("the same secret verifies the first token after a restart");
    }
}
