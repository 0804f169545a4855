//! finmesh-crypto: the key ring, envelope encryption of values, keyed
//! hashing of sensitive keys, and card number (PAN) helpers.
//!
//! Read in this order:
//! 1. [`error`]: the error type; [`CryptoErrorKind::Integrity`] and
//!    [`CryptoErrorKind::UnknownKey`] are the two that drive behaviour;
//! 2. [`ring`]: [`KeyRing`], versioned [`DataKey`]s and their states;
//! 3. [`envelope`]: [`seal`] / [`open`] and the ciphertext format;
//! 4. [`hash`]: [`hash_key`], the stored form of a sensitive key;
//! 5. [`pan`]: [`validate_pan`], [`mask_pan`], [`Masked`];
//! 6. [`wrap`]: the [`MasterKey`] and the stored [`WrappedRing`];
//! 7. [`provider`]: where the master key comes from ([`KeyProvider`]);
//! 8. [`store`]: [`RingStore`], the ring kept in the engine itself;
//! 9. [`secure`]: [`SecureEngine`], the engine wrapper that seals values,
//!    hashes keys and checks key formats of the buckets that ask for it;
//! 10. [`admin`]: [`KeyAdmin`], key administration on a running node
//!     (list, rotate, retire with a usage check, re-encrypt a bucket).
//!
//! Key hierarchy: a master key (from a file or an environment variable,
//! never stored in the engine) wraps the data keys; the wrapped ring lives in
//! the engine's `_finmesh_keys` bucket, so every gateway on the same engine
//! sees rotations. Data keys seal values (AES-256-GCM) and hash keys
//! (HMAC-SHA-256).
//!
//! # Why aws-lc-rs
//!
//! AES-256-GCM and HMAC-SHA-256 come from aws-lc-rs, which the TLS stack
//! already links (no new dependency), whose AES-GCM is the assembly of
//! AWS-LC (AES-NI + PCLMULQDQ / VAES) from a FIPS 140-3 validated lineage,
//! and whose key contexts are zeroed by aws-lc when freed. It is also the
//! faster of the two candidates: `benches/seal.rs` against RustCrypto's
//! `aes-gcm` 0.11, 256-byte values, 2-core VM (loaded by other builds),
//! 2026-12-02, criterion estimates:
//!
//! | 256 B value                   | aws-lc-rs | aes-gcm 0.11 |
//! |-------------------------------|-----------|--------------|
//! | seal (nonce + AEAD)           | 1.80 µs   | 2.24 µs      |
//! | open (AEAD)                   | 0.45 µs   | 0.81 µs      |
//! | [`seal`] of this crate        | 1.40 µs   |              |
//! | [`open`] of this crate        | 0.59 µs   |              |
//!
//! This crate's `seal` and `open` are both under the 2 µs target.
//! BENCHMARKS.md has the command and the conditions.

pub mod admin;
pub mod envelope;
pub mod error;
pub mod hash;
pub mod pan;
pub mod provider;
pub mod ring;
pub mod secure;
pub mod store;
pub mod wrap;

pub use admin::{KeyAdmin, KeyInfo, KeyUsage, ReencryptCounts, ReencryptOptions, ReencryptProgress};
pub use envelope::{OVERHEAD, key_id_of, open, seal};
pub use error::{CryptoError, CryptoErrorKind, Result};
pub use hash::{hash_key, hash_key_candidates, hashed_key_id};
pub use pan::{Masked, PanError, Redacted, mask_pan, validate_pan};
pub use provider::{DEFAULT_MASTER_KEY_VAR, EnvKeyProvider, FileKeyProvider, KeyProvider};
pub use ring::{DataKey, KeyId, KeyPurpose, KeyRing, KeyState};
pub use secure::{MAX_SEALED_VALUE_SIZE, SecureEngine};
pub use store::{FOLLOW_MAX_BACKOFF, KEYS_BUCKET, RING_KEY, Rewrapped, RingStore, keys_bucket_config, rewrap};
pub use wrap::{MasterKey, WrappedKey, WrappedRing};

#[cfg(test)]
pub(crate) mod testutil {
    use base64::Engine as _;
    use base64::engine::general_purpose::{STANDARD, STANDARD_NO_PAD, URL_SAFE_NO_PAD};

    /// Assert that `text` shows `secret` in none of the ways code could
    /// print it: hex (either case), base64 (either alphabet), Rust's `{:?}`
    /// of the array, or any 8-byte run of it in hex.
    pub(crate) fn assert_no_secret(text: &str, secret: &[u8]) {
        let hex: String = secret.iter().map(|b| format!("{b:02x}")).collect();
        let forms = [
            hex.clone(),
            hex.to_uppercase(),
            STANDARD.encode(secret),
            STANDARD_NO_PAD.encode(secret),
            URL_SAFE_NO_PAD.encode(secret),
            format!("{secret:?}"),
            format!("{:?}", &secret[..8]).trim_end_matches(']').to_string(),
        ];
        for form in forms {
            assert!(!text.contains(&form), "secret shown as {form:?} in {text:?}");
        }
        for run in hex.as_bytes().chunks(16) {
            let run = std::str::from_utf8(run).unwrap();
            if run.len() == 16 {
                assert!(!text.to_lowercase().contains(run), "secret bytes shown as {run} in {text:?}");
            }
        }
    }
}
