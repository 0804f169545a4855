//! finmesh-auth: who is calling, and what may they do.
//!
//! The gateway asks two questions of this crate and nothing else:
//!
//! 1. [`Authenticator::authenticate`]: turn the `Authorization` header of a
//!    request into a [`Principal`] (or an `Unauthorized` error);
//! 2. [`Principal::allows`]: may this principal perform this [`Access`]?
//!    (`false` becomes a `Forbidden` answer).
//!
//! Scopes are strings carried in the token, one capability each:
//!
//! | scope | grants |
//! |---|---|
//! | `admin` | everything |
//! | `subscribers:read` | the subscriber registry and its live status (`GET /v1/subscribers[/{id}]`) |
//! | `kv:read:<bucket>` | get, history, keys, watch |
//! | `kv:write:<bucket>` | put, create, update, delete, purge |
//! | `kv:admin:<bucket>` | create, update, delete the bucket |
//! | `stream:publish:<stream>[:<subject pattern>]` | publish |
//! | `stream:subscribe:<stream>[:<subject pattern>]` | read, SSE, WebSocket |
//! | `stream:consume:<stream>` | fetch and ack on durable consumers |
//! | `stream:admin:<stream>` | create, update, delete the stream and its consumers |
//!
//! `<bucket>` and `<stream>` may be `*` for every name. A scope with a
//! subject pattern grants only subjects (or filters) that pattern covers; the
//! pattern is everything after the third `:` (subjects may contain `:`), and
//! only `publish` and `subscribe` take one. A subscription without a filter
//! asks for every subject, so only a scope without a pattern (or with `>`)
//! grants it. Actions do not imply each other (`kv:write` does not grant
//! reads); only `admin` grants everything. Strings that are not scopes of
//! this grammar grant nothing and do not make a token invalid. Details and
//! rationale: [`scope`].
//!
//! Layout, in reading order: [`scope`] (the language), [`access`] (who asks
//! for what), [`config`] (keys and issuing settings), [`authenticator`]
//! (bearer JWT verification), [`cache`] (verified tokens), [`issue`] (signing tokens), [`oauth`] (the
//! client-credentials grant), [`secret`] (secret files, randomness).
//!
//! Invariant: authentication never panics on hostile input; every failure is
//! an [`ErrorKind::Unauthorized`](finmesh_core::ErrorKind::Unauthorized) error
//! whose message says why without echoing the token.
//!
//! # Example
//!
//! A node with its own secret issues a token and checks a request with it:
//!
//! ```
//! use finmesh_auth::{Access, AuthConfig, Authenticator, TokenIssuer, issue_token, load_or_create_secret};
//! use finmesh_core::{StreamName, SubjectPattern};
//!
//! # fn main() -> finmesh_core::Result<()> {
//! # let dir = tempfile::tempdir().unwrap();
//! let secret = dir.path().join(finmesh_auth::DEFAULT_SECRET_FILE);
//! let (_, created) = load_or_create_secret(&secret)?; // 0600, random, once
//! assert!(created);
//! let config = AuthConfig::node_secret(&secret);
//! let auth = Authenticator::from_config(&config)?;
//!
//! // `finmesh token issue --sub feed --scope stream:subscribe:md:md.> --ttl 15m`
//! let ttl = finmesh_auth::parse_ttl("15m")?;
//! let token = issue_token(&config, "feed", &["stream:subscribe:md:md.>".into()], Some(ttl))?;
//!
//! // Per request, in the gateway:
//! let principal = auth.authenticate(Some(&format!("Bearer {}", token.token)))?;
//! let md = StreamName::new("md")?;
//! let eq = SubjectPattern::new("md.eq.*")?;
//! assert!(principal.allows(&Access::StreamSubscribe { stream: &md, filter: Some(&eq) }));
//! assert!(!principal.allows(&Access::StreamSubscribe { stream: &md, filter: None }));
//! assert!(!principal.allows(&Access::StreamPublish { stream: &md, subject: &"md.eq.x".parse()? }));
//! # let _ = TokenIssuer::from_config(&config)?;
//! # Ok(())
//! # }
//! ```

pub mod access;
pub mod authenticator;
pub mod cache;
pub mod config;
pub mod issue;
mod keys;
pub mod oauth;
pub mod scope;
pub mod secret;

pub use access::{Access, Principal};
pub use authenticator::{
    Authenticator, BEARER_CHALLENGE, BEARER_INSUFFICIENT_SCOPE, BEARER_INVALID_TOKEN, bearer_challenge, parse_bearer,
};
pub use config::{AuthConfig, JwksConfig, KeyAlgorithm, KeyConfig, SigningConfig};
pub use issue::{IssuedToken, NodeAuth, TokenIssuer, bootstrap_node_auth, issue_token, parse_ttl};
pub use oauth::{
    ClientConfig, ClientRegistry, OAuthError, OAuthErrorCode, TokenRequest, TokenResponse, generate_client_secret,
    hash_client_secret,
};
pub use scope::Scope;
pub use secret::{DEFAULT_SECRET_FILE, load_or_create_secret};
