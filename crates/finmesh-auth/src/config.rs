//! [`AuthConfig`]: which keys verify tokens, whom each key speaks for, which
//! key signs the tokens this node issues, and where the OAuth clients file is.
//!
//! Parse (serde, unknown fields refused), validate (pure, every problem at
//! once, no file access), then build ([`crate::Authenticator::from_config`],
//! [`crate::TokenIssuer::from_config`], [`crate::ClientRegistry::load`]),
//! which read the files. In the finmesh TOML file this is the `[auth]` table:
//!
//! ```toml
//! [auth]
//! audience = "finmesh"                   # `aud` checked when set; required with [[auth.jwks]]
//! leeway_secs = 30                        # clock skew allowed for exp/nbf
//!
//! [[auth.jwks]]
//! file = "/etc/finmesh/idp-jwks.json"
//! issuer = "https://idp.example.com/"     # the only `iss` its keys verify
//! max_scope = ["kv:read:*", "stream:subscribe:*"]
//!
//! [[auth.keys]]
//! kid = "partner-1"                       # optional; matched against the token's `kid`
//! alg = "ES256"                           # HS256 | EdDSA | RS256 | ES256
//! public_key_file = "/etc/finmesh/partner-1.pub.pem"
//! issuer = "partner-1"
//! max_scope = ["stream:publish:orders"]
//!
//! [auth.signing]                          # tokens this node issues
//! alg = "HS256"                           # HS256 | EdDSA
//! secret_file = "/var/lib/finmesh/auth-secret"
//! issuer = "finmesh"                      # the node's own issuer (default)
//! ```
//!
//! Trust invariants (checked by [`AuthConfig::problems`]):
//! - every verification key (`keys`, each `jwks` file) names the one issuer
//!   it speaks for and a scope ceiling (`max_scope`): a token it verifies
//!   must carry that `iss`, and grants only the scopes the ceiling includes
//!   (others are dropped; `admin` only if the ceiling lists `admin`);
//! - the node's signing key has its own issuer (`signing.issuer`, default
//!   `finmesh`) that no other key may claim; its tokens are not capped
//!   (issuance itself is: `finmesh token issue` is an operator's act, and
//!   OAuth clients get at most the scopes the clients file lists);
//! - with a JWKS configured, `audience` is required: an identity provider
//!   signs tokens for many services, and only the audience tells which are
//!   meant for this one.

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
    /// Expected `aud` claim (one of the token's audiences must equal it).
    /// Also the `aud` of tokens this node issues (default `finmesh`).
    /// Required when `jwks` is set.
    #[serde(default)]
    pub audience: Option<String>,
    /// Clock skew allowed when checking `exp` and `nbf`, in seconds.
    #[serde(default = "default_leeway")]
    pub leeway_secs: u64,
    /// Verification keys, each pinned to one algorithm.
    #[serde(default)]
    pub keys: Vec<KeyConfig>,
    /// JWKS files (RFC 7517 `{"keys": [...]}`), each with its issuer and
    /// scope ceiling; see [`crate::Authenticator`] for how each key's
    /// algorithm is pinned.
    #[serde(default)]
    pub jwks: Vec<JwksConfig>,
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
            audience: None,
            leeway_secs: default_leeway(),
            keys: vec![],
            jwks: vec![],
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
    /// The issuer this key speaks for: the only `iss` it verifies.
    pub issuer: String,
    /// The most a token verified by this key may grant: each of its scopes
    /// must be included by one of these (see [`crate::Scope::includes`]),
    /// or it is dropped. At least one; `["admin"]` lets the key grant anything.
    pub max_scope: Vec<String>,
}

impl KeyConfig {
    /// A key of `alg` in `file` (the secret for HS256, the PEM public key
    /// otherwise), for `issuer`, granting at most `max_scope`.
    pub fn new(alg: KeyAlgorithm, file: impl Into<PathBuf>, issuer: &str, max_scope: &[&str]) -> Self {
        let file = file.into();
        let (secret_file, public_key_file) = if alg.is_symmetric() { (Some(file), None) } else { (None, Some(file)) };
        Self {
            kid: None,
            alg,
            secret_file,
            public_key_file,
            issuer: issuer.to_owned(),
            max_scope: max_scope.iter().map(|s| (*s).to_owned()).collect(),
        }
    }
}

/// One JWKS file and whom its keys speak for.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct JwksConfig {
    /// The JWKS document (downloaded by the operator; read at start).
    pub file: PathBuf,
    /// The issuer its keys speak for: the only `iss` they verify.
    pub issuer: String,
    /// The most a token verified by one of its keys may grant (as for
    /// [`KeyConfig::max_scope`]).
    pub max_scope: Vec<String>,
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
    /// The node's own issuer: the `iss` of the tokens it signs, and the only
    /// one its signing key verifies. No other key may claim it. Default
    /// [`DEFAULT_ISSUER`].
    #[serde(default)]
    pub issuer: Option<String>,
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
            issuer: None,
        }
    }

    /// The `iss` of this node's tokens.
    pub fn issuer(&self) -> &str {
        self.issuer.as_deref().unwrap_or(DEFAULT_ISSUER)
    }
}

impl AuthConfig {
    /// The configuration of a node without any auth settings: it signs and
    /// verifies HS256 tokens with its own secret (create it first with
    /// [`crate::load_or_create_secret`]), issuer and audience `finmesh`.
    pub fn node_secret(secret_file: impl Into<PathBuf>) -> Self {
        Self {
            audience: Some(DEFAULT_ISSUER.to_owned()),
            signing: Some(SigningConfig::hs256(secret_file)),
            ..Self::default()
        }
    }

    /// Every problem with this configuration, in one pass, without touching
    /// the files it names.
    pub fn problems(&self) -> Vec<String> {
        let mut p = vec![];
        if self.audience.as_deref().is_some_and(|s| s.trim().is_empty()) {
            p.push("auth.audience must not be empty when set".to_owned());
        }
        if !self.jwks.is_empty() && self.audience.is_none() {
            p.push(
                "auth.audience is required with auth.jwks: an identity provider signs tokens for many \
                 services, and only the audience says which are meant for this node"
                    .to_owned(),
            );
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
        if self.keys.is_empty() && self.jwks.is_empty() && self.signing.is_none() {
            p.push("auth has no key: set auth.keys, auth.jwks or auth.signing".to_owned());
        }
        let node_issuer = self.signing.as_ref().map(SigningConfig::issuer);
        let mut kids = HashSet::new();
        for (i, j) in self.jwks.iter().enumerate() {
            check_trust(&mut p, &format!("auth.jwks[{i}]"), &j.issuer, &j.max_scope, node_issuer);
        }
        for (i, k) in self.keys.iter().enumerate() {
            let at = format!("auth.keys[{i}]");
            check_kid(&mut p, &mut kids, &at, k.kid.as_deref());
            check_trust(&mut p, &at, &k.issuer, &k.max_scope, node_issuer);
            match (k.alg.is_symmetric(), &k.secret_file, &k.public_key_file) {
                (true, Some(_), None) | (false, None, Some(_)) => {}
                (true, _, _) => p.push(format!("{at}: alg HS256 needs secret_file and no public_key_file")),
                (false, _, _) => p.push(format!("{at}: alg {:?} needs public_key_file and no secret_file", k.alg)),
            }
        }
        if let Some(s) = &self.signing {
            check_kid(&mut p, &mut kids, "auth.signing", s.kid.as_deref());
            if s.issuer.as_deref().is_some_and(|i| i.trim().is_empty()) {
                p.push("auth.signing: issuer must not be empty when set".to_owned());
            }
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

/// An external key's issuer and scope ceiling: an issuer of its own (not
/// the node's), and a non-empty ceiling of valid scopes.
fn check_trust(p: &mut Vec<String>, at: &str, issuer: &str, max_scope: &[String], node_issuer: Option<&str>) {
    if issuer.trim().is_empty() {
        p.push(format!("{at}: issuer must not be empty"));
    } else if node_issuer == Some(issuer) {
        p.push(format!("{at}: issuer `{issuer}` is this node's own (auth.signing.issuer); give the key its own"));
    }
    if max_scope.is_empty() {
        p.push(format!("{at}: max_scope must list at least one scope (`[\"admin\"]` for everything)"));
    }
    for s in max_scope {
        if let Err(e) = s.parse::<crate::Scope>() {
            p.push(format!("{at}: max_scope: {}", e.message()));
        }
    }
}

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
            audience = "finmesh"
            [[jwks]]
            file = "j.json"
            issuer = "https://idp/"
            max_scope = ["kv:read:*"]
            [[keys]]
            kid = "a"
            alg = "ES256"
            public_key_file = "a.pem"
            issuer = "partner"
            max_scope = ["stream:publish:orders"]
            [signing]
            alg = "EdDSA"
            private_key_file = "s.pem"
            "#,
        )
        .unwrap();
        assert_eq!(c.leeway_secs, 30);
        assert_eq!(c.keys[0].alg, KeyAlgorithm::ES256);
        assert_eq!(c.keys[0].issuer, "partner");
        assert_eq!(c.jwks[0].max_scope, vec!["kv:read:*".to_owned()]);
        assert_eq!(c.signing.as_ref().unwrap().default_ttl_secs, 3600);
        assert_eq!(c.signing.as_ref().unwrap().issuer(), DEFAULT_ISSUER);
        c.validate().unwrap();
        assert!(toml::from_str::<AuthConfig>("isuer = \"x\"").is_err());
        assert!(toml::from_str::<AuthConfig>("issuer = \"x\"").is_err(), "the global issuer is gone");
        let no_trust = "[[keys]]\nalg = \"HS256\"\nsecret_file = \"s\"";
        assert!(toml::from_str::<AuthConfig>(no_trust).unwrap_err().to_string().contains("issuer"));
        let bad_alg = "[[keys]]\nalg = \"none\"\nsecret_file = \"s\"\nissuer = \"i\"\nmax_scope = [\"admin\"]";
        assert!(toml::from_str::<AuthConfig>(bad_alg).is_err());
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
        assert_eq!(file.auth.jwks.len(), 1);
        assert!(file.auth.clients_file.is_some() && file.auth.signing.is_some());
    }

    #[test]
    fn validate_reports_every_problem() {
        let c = AuthConfig {
            audience: Some(" ".into()),
            leeway_secs: 1000,
            keys: vec![
                KeyConfig {
                    kid: Some("k".into()),
                    secret_file: None,
                    ..KeyConfig::new(KeyAlgorithm::HS256, "s", "i", &["admin"])
                },
                KeyConfig {
                    kid: Some("k".into()),
                    secret_file: Some("s".into()),
                    ..KeyConfig::new(KeyAlgorithm::RS256, "p", "i", &["admin"])
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
        let jwks = JwksConfig { file: "j".into(), issuer: "idp".into(), max_scope: vec!["admin".into()] };
        let no_signing = AuthConfig { signing: None, jwks: vec![jwks], ..clients };
        assert!(no_signing.problems()[0].contains("needs auth.signing"));
    }

    /// Issue 21: every key names its own issuer and a ceiling of valid
    /// scopes; no key claims the node's issuer; a JWKS needs an audience.
    #[test]
    fn trust_needs_issuer_ceiling_and_audience() {
        let key = |issuer: &str, max_scope: &[&str]| KeyConfig::new(KeyAlgorithm::ES256, "k.pem", issuer, max_scope);
        let jwks =
            |issuer: &str| JwksConfig { file: "j".into(), issuer: issuer.into(), max_scope: vec!["kv:read:*".into()] };
        let ok = AuthConfig {
            audience: Some("finmesh".into()),
            keys: vec![key("partner", &["stream:publish:orders", "kv:read:*"])],
            jwks: vec![jwks("https://idp/")],
            ..AuthConfig::node_secret("s")
        };
        ok.validate().unwrap();
        let cases: [(AuthConfig, &str); 6] = [
            (AuthConfig { audience: None, ..ok.clone() }, "auth.audience is required with auth.jwks"),
            (AuthConfig { keys: vec![key(" ", &["admin"])], ..ok.clone() }, "auth.keys[0]: issuer must not be empty"),
            (AuthConfig { keys: vec![key("finmesh", &["admin"])], ..ok.clone() }, "is this node's own"),
            (
                AuthConfig { jwks: vec![jwks("finmesh")], ..ok.clone() },
                "auth.jwks[0]: issuer `finmesh` is this node's own",
            ),
            (AuthConfig { keys: vec![key("p", &[])], ..ok.clone() }, "auth.keys[0]: max_scope must list at least one"),
            (AuthConfig { keys: vec![key("p", &["kv:fly:b"])], ..ok.clone() }, "auth.keys[0]: max_scope:"),
        ];
        for (c, want) in cases {
            let p = c.problems();
            assert!(p.iter().any(|m| m.contains(want)), "want {want}: {p:#?}");
        }
        // The node's issuer is configurable, and then `finmesh` is free.
        let mut own = ok.clone();
        own.signing.as_mut().unwrap().issuer = Some("node-7".into());
        own.keys = vec![key("finmesh", &["admin"])];
        own.validate().unwrap();
    }
}
