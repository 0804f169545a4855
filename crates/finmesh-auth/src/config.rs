//! [`AuthConfig`]: which keys verify tokens, which key signs the tokens this
//! node issues, and where the OAuth clients file is.
//!
//! Parse (serde, unknown fields refused), validate (pure, every problem at
//! once, no file access), then build ([`crate::Authenticator::from_config`],
//! [`crate::TokenIssuer::from_config`], [`crate::ClientRegistry::load`]),
//! which read the files. In the finmesh TOML file this is the `[auth]` table:
//!
//! ```toml
//! [auth]
//! issuer = "https://idp.example.com/"   # `iss` checked when set
//! audience = "finmesh"                   # `aud` checked when set
//! leeway_secs = 30                        # clock skew allowed for exp/nbf
//! jwks_files = ["/etc/finmesh/idp-jwks.json"]
//!
//! [[auth.keys]]
//! kid = "partner-1"                       # optional; matched against the token's `kid`
//! alg = "ES256"                           # HS256 | EdDSA | RS256 | ES256
//! public_key_file = "/etc/finmesh/partner-1.pub.pem"
//!
//! [auth.signing]                          # tokens this node issues
//! alg = "HS256"                           # HS256 | EdDSA
//! secret_file = "/var/lib/finmesh/auth-secret"
//! ```

use std::collections::HashSet;
use std::path::PathBuf;

use finmesh_core::{Error, Result};
use serde::{Deserialize, Serialize};

/// Largest clock skew accepted for `leeway_secs` (5 minutes).
pub const MAX_LEEWAY_SECS: u64 = 300;

/// A signature algorithm a key is pinned to. A token whose header names
/// another algorithm is never checked against that key.
#[allow(clippy::upper_case_acronyms)]
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum KeyAlgorithm {
    /// HMAC-SHA-256 with a shared secret.
    HS256,
    /// Ed25519.
    EdDSA,
    /// RSA PKCS#1 v1.5 with SHA-256 (keys of 2048 bits or more).
    RS256,
    /// ECDSA on P-256 with SHA-256.
    ES256,
}

impl KeyAlgorithm {
    pub(crate) fn jwt(self) -> jsonwebtoken::Algorithm {
        match self {
            KeyAlgorithm::HS256 => jsonwebtoken::Algorithm::HS256,
            KeyAlgorithm::EdDSA => jsonwebtoken::Algorithm::EdDSA,
            KeyAlgorithm::RS256 => jsonwebtoken::Algorithm::RS256,
            KeyAlgorithm::ES256 => jsonwebtoken::Algorithm::ES256,
        }
    }

    pub(crate) fn from_jwt(alg: jsonwebtoken::Algorithm) -> Option<Self> {
        match alg {
            jsonwebtoken::Algorithm::HS256 => Some(KeyAlgorithm::HS256),
            jsonwebtoken::Algorithm::EdDSA => Some(KeyAlgorithm::EdDSA),
            jsonwebtoken::Algorithm::RS256 => Some(KeyAlgorithm::RS256),
            jsonwebtoken::Algorithm::ES256 => Some(KeyAlgorithm::ES256),
            _ => None,
        }
    }

    fn is_symmetric(self) -> bool {
        self == KeyAlgorithm::HS256
    }
}

/// Authentication settings (the `[auth]` table).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AuthConfig {
    /// Expected `iss` claim; tokens without it or with another are refused.
    /// Also the `iss` of tokens this node issues (default `finmesh`).
    #[serde(default)]
    pub issuer: Option<String>,
    /// Expected `aud` claim (one of the token's audiences must equal it).
    /// Also the `aud` of tokens this node issues (default `finmesh`).
    #[serde(default)]
    pub audience: Option<String>,
    /// Clock skew allowed when checking `exp` and `nbf`, in seconds.
    #[serde(default = "default_leeway")]
    pub leeway_secs: u64,
    /// Verification keys, each pinned to one algorithm.
    #[serde(default)]
    pub keys: Vec<KeyConfig>,
    /// JWKS files (RFC 7517 `{"keys": [...]}`); see [`crate::Authenticator`]
    /// for how each key's algorithm is pinned.
    #[serde(default)]
    pub jwks_files: Vec<PathBuf>,
    /// The key this node signs its own tokens with; it also verifies them.
    #[serde(default)]
    pub signing: Option<SigningConfig>,
    /// OAuth client-credentials clients (TOML); needs `signing`.
    #[serde(default)]
    pub clients_file: Option<PathBuf>,
    /// How many verified tokens to remember, so a client that repeats its
    /// token pays for signature verification once; 0 disables the cache.
    #[serde(default = "default_cache")]
    pub token_cache_entries: usize,
}

fn default_leeway() -> u64 {
    30
}

fn default_cache() -> usize {
    4096
}

/// Largest `token_cache_entries`.
pub const MAX_TOKEN_CACHE_ENTRIES: usize = 1 << 20;

impl Default for AuthConfig {
    fn default() -> Self {
        Self {
            issuer: None,
            audience: None,
            leeway_secs: default_leeway(),
            keys: vec![],
            jwks_files: vec![],
            signing: None,
            clients_file: None,
            token_cache_entries: default_cache(),
        }
    }
}

/// One verification key.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct KeyConfig {
    /// Key id: a token whose header has a `kid` is checked only against the
    /// key with that id.
    #[serde(default)]
    pub kid: Option<String>,
    /// The one algorithm this key verifies.
    pub alg: KeyAlgorithm,
    /// HS256: file holding the shared secret (trailing whitespace ignored,
    /// at least 32 bytes).
    #[serde(default)]
    pub secret_file: Option<PathBuf>,
    /// EdDSA, RS256, ES256: PEM public key (`-----BEGIN PUBLIC KEY-----`).
    #[serde(default)]
    pub public_key_file: Option<PathBuf>,
}

/// The key this node signs tokens with (`finmesh token issue`, `/oauth/token`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SigningConfig {
    /// Written into the header of issued tokens when set.
    #[serde(default)]
    pub kid: Option<String>,
    /// HS256 or EdDSA.
    pub alg: KeyAlgorithm,
    /// HS256: the secret file (see [`crate::load_or_create_secret`]).
    #[serde(default)]
    pub secret_file: Option<PathBuf>,
    /// EdDSA: PKCS#8 PEM private key (`-----BEGIN PRIVATE KEY-----`).
    #[serde(default)]
    pub private_key_file: Option<PathBuf>,
    /// Lifetime of an issued token when the request names none, in seconds.
    #[serde(default = "default_ttl")]
    pub default_ttl_secs: u64,
    /// Longest lifetime an issued token may have, in seconds.
    #[serde(default = "default_max_ttl")]
    pub max_ttl_secs: u64,
}

fn default_ttl() -> u64 {
    3600
}

fn default_max_ttl() -> u64 {
    90 * 24 * 3600
}

impl SigningConfig {
    /// HS256 signing with the secret in `secret_file`, default lifetimes.
    pub fn hs256(secret_file: impl Into<PathBuf>) -> Self {
        Self {
            kid: None,
            alg: KeyAlgorithm::HS256,
            secret_file: Some(secret_file.into()),
            private_key_file: None,
            default_ttl_secs: default_ttl(),
            max_ttl_secs: default_max_ttl(),
        }
    }
}

impl AuthConfig {
    /// The configuration of a node without any auth settings: it signs and
    /// verifies HS256 tokens with its own secret (create it first with
    /// [`crate::load_or_create_secret`]), issuer and audience `finmesh`.
    pub fn node_secret(secret_file: impl Into<PathBuf>) -> Self {
        Self {
            issuer: Some(DEFAULT_ISSUER.to_owned()),
            audience: Some(DEFAULT_ISSUER.to_owned()),
            signing: Some(SigningConfig::hs256(secret_file)),
            ..Self::default()
        }
    }

    /// Every problem with this configuration, in one pass, without touching
    /// the files it names.
    pub fn problems(&self) -> Vec<String> {
        let mut p = vec![];
        for (what, v) in [("issuer", &self.issuer), ("audience", &self.audience)] {
            if v.as_deref().is_some_and(|s| s.trim().is_empty()) {
                p.push(format!("auth.{what} must not be empty when set"));
            }
        }
        if self.leeway_secs > MAX_LEEWAY_SECS {
            p.push(format!("auth.leeway_secs is {}; the limit is {MAX_LEEWAY_SECS}", self.leeway_secs));
        }
        if self.token_cache_entries > MAX_TOKEN_CACHE_ENTRIES {
            p.push(format!(
                "auth.token_cache_entries is {}; the limit is {MAX_TOKEN_CACHE_ENTRIES}",
                self.token_cache_entries
            ));
        }
        if self.keys.is_empty() && self.jwks_files.is_empty() && self.signing.is_none() {
            p.push("auth has no key: set auth.keys, auth.jwks_files or auth.signing".to_owned());
        }
        let mut kids = HashSet::new();
        for (i, k) in self.keys.iter().enumerate() {
            let at = format!("auth.keys[{i}]");
            check_kid(&mut p, &mut kids, &at, k.kid.as_deref());
            match (k.alg.is_symmetric(), &k.secret_file, &k.public_key_file) {
                (true, Some(_), None) | (false, None, Some(_)) => {}
                (true, _, _) => p.push(format!("{at}: alg HS256 needs secret_file and no public_key_file")),
                (false, _, _) => p.push(format!("{at}: alg {:?} needs public_key_file and no secret_file", k.alg)),
            }
        }
        if let Some(s) = &self.signing {
            check_kid(&mut p, &mut kids, "auth.signing", s.kid.as_deref());
            match (s.alg, &s.secret_file, &s.private_key_file) {
                (KeyAlgorithm::HS256, Some(_), None) | (KeyAlgorithm::EdDSA, None, Some(_)) => {}
                (KeyAlgorithm::HS256, _, _) => {
                    p.push("auth.signing: alg HS256 needs secret_file and no private_key_file".to_owned())
                }
                (KeyAlgorithm::EdDSA, _, _) => {
                    p.push("auth.signing: alg EdDSA needs private_key_file and no secret_file".to_owned())
                }
                (alg, _, _) => p.push(format!("auth.signing: alg {alg:?} cannot sign here; use HS256 or EdDSA")),
            }
            if s.default_ttl_secs == 0 || s.max_ttl_secs == 0 {
                p.push("auth.signing: default_ttl_secs and max_ttl_secs must be positive".to_owned());
            }
            if s.default_ttl_secs > s.max_ttl_secs {
                p.push(format!(
                    "auth.signing: default_ttl_secs ({}) is above max_ttl_secs ({})",
                    s.default_ttl_secs, s.max_ttl_secs
                ));
            }
        }
        if self.clients_file.is_some() && self.signing.is_none() {
            p.push("auth.clients_file needs auth.signing: OAuth tokens are signed by this node".to_owned());
        }
        p
    }

    /// [`Self::problems`] as one [`ErrorKind::Invalid`](finmesh_core::ErrorKind::Invalid)
    /// error, problems joined by `; `.
    pub fn validate(&self) -> Result<()> {
        let p = self.problems();
        if p.is_empty() { Ok(()) } else { Err(Error::invalid(format!("invalid auth config: {}", p.join("; ")))) }
    }
}

/// `iss` and `aud` of issued tokens when the configuration names none.
pub const DEFAULT_ISSUER: &str = "finmesh";

fn check_kid<'a>(p: &mut Vec<String>, seen: &mut HashSet<&'a str>, at: &str, kid: Option<&'a str>) {
    if let Some(kid) = kid {
        if kid.is_empty() || kid.len() > 256 {
            p.push(format!("{at}: kid must be 1 to 256 bytes"));
        } else if !seen.insert(kid) {
            p.push(format!("{at}: kid `{kid}` is used twice"));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_toml_and_refuses_unknown_fields() {
        let c: AuthConfig = toml::from_str(
            r#"
            issuer = "https://idp/"
            jwks_files = ["j.json"]
            [[keys]]
            kid = "a"
            alg = "ES256"
            public_key_file = "a.pem"
            [signing]
            alg = "EdDSA"
            private_key_file = "s.pem"
            "#,
        )
        .unwrap();
        assert_eq!(c.leeway_secs, 30);
        assert_eq!(c.keys[0].alg, KeyAlgorithm::ES256);
        assert_eq!(c.signing.as_ref().unwrap().default_ttl_secs, 3600);
        c.validate().unwrap();
        assert!(toml::from_str::<AuthConfig>("isuer = \"x\"").is_err());
        assert!(toml::from_str::<AuthConfig>("[[keys]]\nalg = \"none\"\nsecret_file = \"s\"").is_err());
        assert!(toml::from_str::<AuthConfig>("[[keys]]\nalg = \"HS512\"\nsecret_file = \"s\"").is_err());
    }

    /// The operator doc's example must stay a valid configuration.
    #[test]
    fn docs_example_parses_and_validates() {
        #[derive(Deserialize)]
        struct File {
            auth: AuthConfig,
        }
        let doc = include_str!("../../../docs/auth.md");
        let start = doc.find("```toml\n[auth]").expect("docs/auth.md has the [auth] example") + "```toml\n".len();
        let len = doc[start..].find("```").unwrap();
        let file: File = toml::from_str(&doc[start..start + len]).unwrap();
        file.auth.validate().unwrap();
        assert_eq!(file.auth.keys.len(), 2);
        assert!(file.auth.clients_file.is_some() && file.auth.signing.is_some());
    }

    #[test]
    fn validate_reports_every_problem() {
        let c = AuthConfig {
            issuer: Some(" ".into()),
            leeway_secs: 1000,
            keys: vec![
                KeyConfig { kid: Some("k".into()), alg: KeyAlgorithm::HS256, secret_file: None, public_key_file: None },
                KeyConfig {
                    kid: Some("k".into()),
                    alg: KeyAlgorithm::RS256,
                    secret_file: Some("s".into()),
                    public_key_file: Some("p".into()),
                },
            ],
            signing: Some(SigningConfig {
                alg: KeyAlgorithm::RS256,
                default_ttl_secs: 10,
                max_ttl_secs: 5,
                ..SigningConfig::hs256("s")
            }),
            ..AuthConfig::default()
        };
        let p = c.problems();
        assert_eq!(p.len(), 7, "{p:#?}");
        let e = c.validate().unwrap_err();
        assert_eq!(e.kind(), finmesh_core::ErrorKind::Invalid);
        assert!(e.message().contains("kid `k` is used twice"));
        assert!(AuthConfig::default().problems()[0].contains("has no key"));
        let clients = AuthConfig { clients_file: Some("c.toml".into()), ..AuthConfig::node_secret("s") };
        clients.validate().unwrap();
        let no_signing = AuthConfig { signing: None, jwks_files: vec!["j".into()], ..clients };
        assert!(no_signing.problems()[0].contains("needs auth.signing"));
    }
}
