//! Loading verification keys from the files an [`AuthConfig`] names.
//!
//! Every [`VerifyingKey`] is pinned to exactly one [`KeyAlgorithm`]:
//! - `keys` entries: the configured `alg`;
//! - JWKS entries: the JWK's `alg` when present (it must be one of HS256,
//!   EdDSA, RS256, ES256 and agree with the key type), otherwise inferred
//!   from the key type: `RSA` → RS256, `EC` on P-256 → ES256, `OKP` on
//!   Ed25519 → EdDSA, `oct` → HS256. Entries with `use: enc`, other curves or
//!   other algorithms are skipped with a warning; a JWKS file with no usable
//!   key is an error;
//! - the signing key: its `alg`; it verifies the tokens this node issues.
//!
//! Every key also carries whom it speaks for: the one issuer whose tokens it
//! verifies and the scope ceiling of those tokens ([`Trust`]): the key's (or
//! its JWKS file's) `issuer` and `max_scope`, or for the signing key the
//! node's own issuer and no ceiling.
//!
//! Files are read once, at build time; a key rotation restarts the node (or
//! rebuilds the [`crate::Authenticator`]).

use std::path::Path;
use std::sync::Arc;

use finmesh_core::{Error, Result};
use jsonwebtoken::jwk::{AlgorithmParameters, EllipticCurve, Jwk, JwkSet, KeyAlgorithm as JwkAlg, PublicKeyUse};
use jsonwebtoken::{AlgorithmFamily, DecodingKey, EncodingKey};

use crate::config::{AuthConfig, KeyAlgorithm, SigningConfig};
use crate::scope::Scope;
use crate::secret::{MIN_SECRET_LEN, read_secret};

/// Largest key or JWKS file read, in bytes.
const MAX_KEY_FILE: u64 = 1024 * 1024;

/// Whom a key speaks for.
#[derive(Debug, Clone)]
pub(crate) struct Trust {
    /// The only `iss` the key verifies.
    pub issuer: String,
    /// The most its tokens grant; `None` for the node's own key.
    pub ceiling: Option<Arc<[Scope]>>,
}

impl Trust {
    fn external(issuer: &str, max_scope: &[String]) -> Result<Self> {
        let ceiling = max_scope.iter().map(|s| s.parse()).collect::<Result<Vec<Scope>>>()?;
        Ok(Trust { issuer: issuer.to_owned(), ceiling: Some(ceiling.into()) })
    }
}

/// A key that verifies signatures of one algorithm, for one issuer.
#[derive(Clone)]
pub(crate) struct VerifyingKey {
    pub kid: Option<String>,
    pub alg: KeyAlgorithm,
    pub key: DecodingKey,
    pub trust: Trust,
}

impl std::fmt::Debug for VerifyingKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never print key material (an HS256 key is the secret itself).
        f.debug_struct("VerifyingKey")
            .field("kid", &self.kid)
            .field("alg", &self.alg)
            .field("trust", &self.trust)
            .finish_non_exhaustive()
    }
}

fn family(alg: KeyAlgorithm) -> AlgorithmFamily {
    match alg {
        KeyAlgorithm::HS256 => AlgorithmFamily::Hmac,
        KeyAlgorithm::EdDSA => AlgorithmFamily::Ed,
        KeyAlgorithm::RS256 => AlgorithmFamily::Rsa,
        KeyAlgorithm::ES256 => AlgorithmFamily::Ec,
    }
}

pub(crate) fn read_key_file(path: &Path) -> Result<Vec<u8>> {
    use std::io::Read;
    let file = std::fs::File::open(path)
        .map_err(|e| Error::internal(format!("cannot open key file {}: {e}", path.display())).with_source(e))?;
    let mut buf = Vec::new();
    file.take(MAX_KEY_FILE + 1)
        .read_to_end(&mut buf)
        .map_err(|e| Error::internal(format!("cannot read key file {}: {e}", path.display())).with_source(e))?;
    if buf.len() as u64 > MAX_KEY_FILE {
        return Err(Error::invalid(format!("key file {} is larger than {MAX_KEY_FILE} bytes", path.display())));
    }
    Ok(buf)
}

fn bad_key(path: &Path, alg: KeyAlgorithm, e: jsonwebtoken::errors::Error) -> Error {
    Error::invalid(format!("{} is not a PEM {alg:?} public key: {e}", path.display())).with_source(e)
}

/// A PEM public key of `alg`.
pub(crate) fn public_key(path: &Path, alg: KeyAlgorithm) -> Result<DecodingKey> {
    let pem = read_key_file(path)?;
    let key = match alg {
        KeyAlgorithm::HS256 => return Err(Error::invalid("HS256 has no public key")),
        KeyAlgorithm::EdDSA => DecodingKey::from_ed_pem(&pem),
        KeyAlgorithm::RS256 => DecodingKey::from_rsa_pem(&pem),
        KeyAlgorithm::ES256 => DecodingKey::from_ec_pem(&pem),
    };
    key.map_err(|e| bad_key(path, alg, e))
}

/// The signing key of `cfg` and the verification key that goes with it.
pub(crate) fn signing_key(cfg: &SigningConfig) -> Result<(EncodingKey, DecodingKey)> {
    match (cfg.alg, &cfg.secret_file, &cfg.private_key_file) {
        (KeyAlgorithm::HS256, Some(path), None) => {
            let secret = read_secret(path)?;
            Ok((EncodingKey::from_secret(&secret), DecodingKey::from_secret(&secret)))
        }
        (KeyAlgorithm::EdDSA, None, Some(path)) => {
            let pem = zeroize::Zeroizing::new(read_key_file(path)?);
            let enc = EncodingKey::from_ed_pem(&pem).map_err(|e| {
                Error::invalid(format!("{} is not a PKCS#8 PEM Ed25519 private key: {e}", path.display()))
                    .with_source(e)
            })?;
            let dec = Jwk::from_encoding_key(&enc, jsonwebtoken::Algorithm::EdDSA)
                .and_then(|jwk| DecodingKey::from_jwk(&jwk))
                .map_err(|e| {
                    Error::invalid(format!("cannot derive the public key of {}: {e}", path.display())).with_source(e)
                })?;
            Ok((enc, dec))
        }
        _ => Err(Error::invalid("auth.signing: invalid; run validate() first")),
    }
}

/// Every verification key of `cfg` (validated first).
pub(crate) fn load_keys(cfg: &AuthConfig) -> Result<Vec<VerifyingKey>> {
    cfg.validate()?;
    let mut keys = vec![];
    for k in &cfg.keys {
        let key = match (&k.secret_file, &k.public_key_file) {
            (Some(secret), _) => DecodingKey::from_secret(&read_secret(secret)?),
            (None, Some(public)) => public_key(public, k.alg)?,
            (None, None) => return Err(Error::invalid("auth.keys: a key has no file; run validate() first")),
        };
        keys.push(VerifyingKey {
            kid: k.kid.clone(),
            alg: k.alg,
            key,
            trust: Trust::external(&k.issuer, &k.max_scope)?,
        });
    }
    for j in &cfg.jwks {
        let trust = Trust::external(&j.issuer, &j.max_scope)?;
        keys.extend(load_jwks(&j.file, &trust)?);
    }
    if let Some(s) = &cfg.signing {
        let (_, key) = signing_key(s)?;
        let trust = Trust { issuer: s.issuer().to_owned(), ceiling: None };
        keys.push(VerifyingKey { kid: s.kid.clone(), alg: s.alg, key, trust });
    }
    let mut kids = std::collections::HashSet::new();
    if let Some(dup) = keys.iter().filter_map(|k| k.kid.as_deref()).find(|kid| !kids.insert(*kid)) {
        return Err(Error::invalid(format!("key id `{dup}` appears twice among auth.keys, JWKS files and signing")));
    }
    Ok(keys)
}

/// The usable keys of one JWKS file, each speaking for `trust`.
pub(crate) fn load_jwks(path: &Path, trust: &Trust) -> Result<Vec<VerifyingKey>> {
    let bytes = read_key_file(path)?;
    let set: JwkSet = serde_json::from_slice(&bytes)
        .map_err(|e| Error::invalid(format!("{} is not a JWKS document: {e}", path.display())).with_source(e))?;
    let mut keys = vec![];
    for (i, jwk) in set.keys.iter().enumerate() {
        match jwk_key(jwk, trust) {
            Ok(k) => keys.push(k),
            Err(why) => {
                tracing::warn!(path = %path.display(), index = i, kid = ?jwk.common.key_id, "skipping JWK: {why}")
            }
        }
    }
    if keys.is_empty() {
        return Err(Error::invalid(format!("{} has no usable key (HS256, EdDSA, RS256 or ES256)", path.display())));
    }
    Ok(keys)
}

fn jwk_key(jwk: &Jwk, trust: &Trust) -> std::result::Result<VerifyingKey, String> {
    if matches!(jwk.common.public_key_use, Some(PublicKeyUse::Encryption)) {
        return Err("its use is encryption".into());
    }
    let inferred = match &jwk.algorithm {
        AlgorithmParameters::RSA(_) => KeyAlgorithm::RS256,
        AlgorithmParameters::EllipticCurve(p) if p.curve == EllipticCurve::P256 => KeyAlgorithm::ES256,
        AlgorithmParameters::OctetKeyPair(p) if p.curve == EllipticCurve::Ed25519 => KeyAlgorithm::EdDSA,
        AlgorithmParameters::OctetKey(_) => KeyAlgorithm::HS256,
        _ => return Err("unsupported key type or curve".into()),
    };
    let alg = match jwk.common.key_algorithm {
        None => inferred,
        Some(JwkAlg::HS256) => KeyAlgorithm::HS256,
        Some(JwkAlg::EdDSA) => KeyAlgorithm::EdDSA,
        Some(JwkAlg::RS256) => KeyAlgorithm::RS256,
        Some(JwkAlg::ES256) => KeyAlgorithm::ES256,
        Some(other) => return Err(format!("algorithm {other:?} is not accepted")),
    };
    if alg != inferred {
        return Err(format!("alg {alg:?} does not fit its key type"));
    }
    let key = DecodingKey::from_jwk(jwk).map_err(|e| format!("bad key parameters: {e}"))?;
    if key.family() != family(alg) {
        return Err(format!("alg {alg:?} does not fit its key type"));
    }
    if alg == KeyAlgorithm::HS256 && key.try_get_as_bytes().map_or(0, <[u8]>::len) < MIN_SECRET_LEN {
        return Err(format!("an HS256 key needs at least {MIN_SECRET_LEN} bytes"));
    }
    Ok(VerifyingKey { kid: jwk.common.key_id.clone(), alg, key, trust: trust.clone() })
}
