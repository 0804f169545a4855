//! Where the master key comes from: the [`KeyProvider`] trait, a key file
//! ([`FileKeyProvider`]) and an environment variable ([`EnvKeyProvider`]).
//!
//! Invariants:
//! - a provider hands out a [`MasterKey`] and keeps nothing: the node holds
//!   the key in memory only, zeroed on drop, and never writes it to the
//!   engine; every intermediate buffer (file contents, decoded text) is a
//!   zeroed-on-drop buffer;
//! - errors name the file or variable and what is wrong with it (missing,
//!   unreadable, readable by others, wrong length, not decodable), never
//!   any of its bytes.
//!
//! Accepted encodings:
//! - key file: exactly 32 raw bytes; or, as text (surrounding whitespace and
//!   a final newline ignored), 64 hex digits, or base64 of 32 bytes
//!   (standard or URL-safe alphabet, padding optional). A 32-byte file made
//!   only of hex digits is refused (it is 16 bytes in hex, not a 32-byte
//!   key). On Unix the file must not be readable or writable by group or
//!   others (`chmod 600`);
//! - environment variable (default [`DEFAULT_MASTER_KEY_VAR`]): base64 of
//!   32 bytes, as above. The value stays in the process environment
//!   (`/proc/<pid>/environ` for the same user and root), which is weaker
//!   than a file: prefer a file or, later, a KMS.
//!
//! A cloud KMS provider fits the same trait later (the method is async for
//! that reason): it would decrypt a master key kept encrypted under a KMS key.

use std::io::Read;
use std::path::{Path, PathBuf};

use async_trait::async_trait;
use base64::Engine as _;
use base64::alphabet;
use base64::engine::{DecodePaddingMode, GeneralPurpose, GeneralPurposeConfig};
use zeroize::Zeroizing;

use crate::error::{CryptoError, CryptoErrorKind, Result};
use crate::ring::KEY_LEN;
use crate::wrap::MasterKey;

/// The environment variable [`EnvKeyProvider::default`] reads.
pub const DEFAULT_MASTER_KEY_VAR: &str = "FINMESH_MASTER_KEY";

/// Largest key file read, in bytes (a key in any accepted encoding is far
/// smaller).
const MAX_KEY_FILE: u64 = 1024;

/// A source of the master key.
#[async_trait]
pub trait KeyProvider: Send + Sync {
    /// Where the key comes from, for messages (never the key itself), e.g.
    /// `key file /etc/finmesh/master.key`.
    fn describe(&self) -> String;

    /// Fetch the master key.
    async fn master_key(&self) -> Result<MasterKey>;
}

fn problem(message: String) -> CryptoError {
    CryptoError::new(CryptoErrorKind::MasterKey, message)
}

/// The master key from a file (see the module doc for the format).
#[derive(Debug, Clone)]
pub struct FileKeyProvider {
    path: PathBuf,
}

impl FileKeyProvider {
    /// Read the key from `path` (each time [`KeyProvider::master_key`] is called).
    pub fn new(path: impl Into<PathBuf>) -> Self {
        FileKeyProvider { path: path.into() }
    }

    /// The key file's path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Write a new random master key to `path` as base64 text, with mode
    /// 0600; refuses to overwrite an existing file. Returns the key.
    pub fn create(path: impl AsRef<Path>) -> Result<MasterKey> {
        use std::io::Write;
        let path = path.as_ref();
        let key = MasterKey::generate()?;
        let mut text = Zeroizing::new(base64::engine::general_purpose::STANDARD.encode(key.expose_secret()));
        text.push('\n');
        let mut opts = std::fs::OpenOptions::new();
        opts.write(true).create_new(true);
        #[cfg(unix)]
        std::os::unix::fs::OpenOptionsExt::mode(&mut opts, 0o600);
        opts.open(path)
            .and_then(|mut f| {
                f.write_all(text.as_bytes())?;
                f.sync_all()
            })
            .map_err(|e| problem(format!("cannot create master key file {}: {e}", path.display())).with_source(e))?;
        Ok(key)
    }

    /// Read and check the key file now.
    pub fn load(&self) -> Result<MasterKey> {
        let path = &self.path;
        let what = format!("master key file {}", path.display());
        let io = |e: std::io::Error| problem(format!("cannot read {what}: {e}")).with_source(e);
        let mut file = std::fs::File::open(path).map_err(io)?;
        let meta = file.metadata().map_err(io)?;
        if !meta.is_file() {
            return Err(problem(format!("{what} is not a regular file")));
        }
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let mode = meta.permissions().mode() & 0o777;
            if mode & 0o077 != 0 {
                return Err(problem(format!(
                    "{what} can be read or written by group or others (mode {mode:o}); run `chmod 600` on it"
                )));
            }
        }
        if meta.len() > MAX_KEY_FILE {
            return Err(problem(format!(
                "{what} is {} bytes long; a key file holds 32 raw bytes, 64 hex digits or base64 of 32 bytes",
                meta.len()
            )));
        }
        let mut bytes = Zeroizing::new(Vec::with_capacity(meta.len() as usize));
        file.by_ref().take(MAX_KEY_FILE).read_to_end(&mut bytes).map_err(io)?;
        MasterKey::from_bytes(parse_key_file(&bytes, &what)?)
    }
}

#[async_trait]
impl KeyProvider for FileKeyProvider {
    fn describe(&self) -> String {
        format!("key file {}", self.path.display())
    }

    async fn master_key(&self) -> Result<MasterKey> {
        self.load()
    }
}

/// The master key from an environment variable, in base64.
#[derive(Debug, Clone)]
pub struct EnvKeyProvider {
    var: String,
}

impl EnvKeyProvider {
    /// Read the key from the variable `var`.
    pub fn new(var: impl Into<String>) -> Self {
        EnvKeyProvider { var: var.into() }
    }

    /// Read and decode the variable now.
    pub fn load(&self) -> Result<MasterKey> {
        let var = &self.var;
        let value = std::env::var_os(var).ok_or_else(|| {
            problem(format!(
                "the environment variable {var} is not set; it must hold the master key (base64 of 32 bytes)"
            ))
        })?;
        let value = Zeroizing::new(
            value.into_string().map_err(|_| problem(format!("the environment variable {var} is not valid UTF-8")))?,
        );
        MasterKey::from_bytes(decode_base64(value.trim(), &format!("the environment variable {var}"))?)
    }
}

impl Default for EnvKeyProvider {
    fn default() -> Self {
        Self::new(DEFAULT_MASTER_KEY_VAR)
    }
}

#[async_trait]
impl KeyProvider for EnvKeyProvider {
    fn describe(&self) -> String {
        format!("environment variable {}", self.var)
    }

    async fn master_key(&self) -> Result<MasterKey> {
        self.load()
    }
}

/// Decode a key file's contents (see the module doc).
fn parse_key_file(bytes: &[u8], what: &str) -> Result<Zeroizing<[u8; KEY_LEN]>> {
    if bytes.len() == KEY_LEN {
        if bytes.iter().all(u8::is_ascii_hexdigit) {
            return Err(problem(format!(
                "{what} holds 32 hex digits, which is a 16-byte key; a master key is 32 bytes (64 hex digits)"
            )));
        }
        let mut key = Zeroizing::new([0u8; KEY_LEN]);
        key.copy_from_slice(bytes);
        return Ok(key);
    }
    let text = std::str::from_utf8(bytes)
        .map_err(|_| {
            problem(format!("{what} is {} bytes long and not text; a raw key file is exactly 32 bytes", bytes.len()))
        })?
        .trim();
    if text.len() == 2 * KEY_LEN && text.bytes().all(|b| b.is_ascii_hexdigit()) {
        let mut key = Zeroizing::new([0u8; KEY_LEN]);
        for (i, pair) in text.as_bytes().chunks_exact(2).enumerate() {
            key[i] = (hex_value(pair[0]) << 4) | hex_value(pair[1]);
        }
        return Ok(key);
    }
    decode_base64(text, what)
}

fn hex_value(b: u8) -> u8 {
    match b {
        b'0'..=b'9' => b - b'0',
        b'a'..=b'f' => b - b'a' + 10,
        _ => b - b'A' + 10,
    }
}

/// Base64 (standard or URL-safe, padding optional) of exactly 32 bytes.
fn decode_base64(text: &str, what: &str) -> Result<Zeroizing<[u8; KEY_LEN]>> {
    let config = GeneralPurposeConfig::new().with_decode_padding_mode(DecodePaddingMode::Indifferent);
    let mut decoded = Zeroizing::new(Vec::new());
    for engine in [GeneralPurpose::new(&alphabet::STANDARD, config), GeneralPurpose::new(&alphabet::URL_SAFE, config)] {
        decoded.clear();
        if engine.decode_vec(text, &mut decoded).is_ok() {
            if decoded.len() != KEY_LEN {
                return Err(problem(format!(
                    "{what} decodes to {} bytes; a master key is {KEY_LEN} bytes",
                    decoded.len()
                )));
            }
            let mut key = Zeroizing::new([0u8; KEY_LEN]);
            key.copy_from_slice(&decoded);
            return Ok(key);
        }
    }
    // The decoder's own message names the offending character: not shown.
    Err(problem(format!(
        "{what} is neither 64 hex digits nor base64 of {KEY_LEN} bytes ({} characters)",
        text.chars().count()
    )))
}

#[cfg(test)]
mod tests {
    use super::*;
    use base64::engine::general_purpose::{STANDARD, URL_SAFE_NO_PAD};

    fn key_bytes() -> [u8; 32] {
        // Contains 0xfb.. so standard and URL-safe base64 differ.
        std::array::from_fn(|i| 0xe0 + i as u8)
    }

    fn write(dir: &Path, name: &str, contents: &[u8], mode: u32) -> PathBuf {
        let path = dir.join(name);
        std::fs::write(&path, contents).unwrap();
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            std::fs::set_permissions(&path, std::fs::Permissions::from_mode(mode)).unwrap();
        }
        #[cfg(not(unix))]
        let _ = mode;
        path
    }

    #[tokio::test]
    async fn key_files_in_every_documented_encoding() {
        let dir = tempfile::tempdir().unwrap();
        let k = key_bytes();
        let hex: String = k.iter().map(|b| format!("{b:02X}")).collect();
        let cases: Vec<(&str, Vec<u8>)> = vec![
            ("raw", k.to_vec()),
            ("hex", format!("{hex}\n").into_bytes()),
            ("hex-lower", format!("  {}\r\n", hex.to_lowercase()).into_bytes()),
            ("b64", format!("{}\n", STANDARD.encode(k)).into_bytes()),
            ("b64url", URL_SAFE_NO_PAD.encode(k).into_bytes()),
        ];
        for (name, contents) in cases {
            let provider = FileKeyProvider::new(write(dir.path(), name, &contents, 0o600));
            let key = provider.master_key().await.unwrap_or_else(|e| panic!("{name}: {e}"));
            assert_eq!(key.expose_secret(), &k, "{name}");
            assert!(provider.describe().starts_with("key file "));
        }
    }

    #[test]
    fn bad_key_files_get_clear_errors_without_their_bytes() {
        let dir = tempfile::tempdir().unwrap();
        let k = key_bytes();
        let short = STANDARD.encode(&k[..16]);
        let hex16: String = k[..16].iter().map(|b| format!("{b:02x}")).collect();
        let cases: Vec<(&str, Vec<u8>, u32, &str)> = vec![
            (
                "readable",
                k.to_vec(),
                0o644,
                "can be read or written by group or others (mode 644); run `chmod 600` on it",
            ),
            ("group", k.to_vec(), 0o640, "(mode 640)"),
            ("short-b64", short.clone().into_bytes(), 0o600, "decodes to 16 bytes; a master key is 32 bytes"),
            ("hex16", hex16.clone().into_bytes(), 0o600, "holds 32 hex digits, which is a 16-byte key"),
            ("garbage", b"this is not a key at all, is it?!\n".to_vec(), 0o600, "neither 64 hex digits nor base64"),
            ("binary", vec![0xff; 33], 0o600, "is 33 bytes long and not text"),
            ("big", vec![b'a'; 2000], 0o600, "is 2000 bytes long"),
        ];
        for (name, contents, mode, message) in cases {
            let path = write(dir.path(), name, &contents, mode);
            let e = FileKeyProvider::new(&path).load().unwrap_err();
            assert_eq!(e.kind(), CryptoErrorKind::MasterKey, "{name}");
            let text = format!("{e} {e:?}");
            assert!(text.contains(message) && text.contains(&path.display().to_string()), "{name}: {text}");
            assert!(!text.contains(&short) && !text.contains(&hex16), "{text}");
            crate::testutil::assert_no_secret(&text, &k);
        }
        let e = FileKeyProvider::new(dir.path().join("missing")).load().unwrap_err();
        assert_eq!(e.kind(), CryptoErrorKind::MasterKey);
        assert!(e.to_string().contains("cannot read master key file") && e.to_string().contains("No such file"), "{e}");
        let e = FileKeyProvider::new(dir.path()).load().unwrap_err();
        assert!(e.to_string().contains("is not a regular file"), "{e}");
    }

    #[test]
    fn create_writes_a_private_file_once() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("master.key");
        let key = FileKeyProvider::create(&path).unwrap();
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            assert_eq!(std::fs::metadata(&path).unwrap().permissions().mode() & 0o777, 0o600);
        }
        assert_eq!(FileKeyProvider::new(&path).load().unwrap().expose_secret(), key.expose_secret());
        let e = FileKeyProvider::create(&path).unwrap_err();
        assert!(e.to_string().contains("cannot create master key file"), "{e}");
        assert_eq!(FileKeyProvider::new(&path).load().unwrap().expose_secret(), key.expose_secret(), "not overwritten");
    }

    /// The environment is process-wide and setting it is unsafe while other
    /// threads run, so the positive case runs in a child process of this
    /// test binary that gets the variable from its parent.
    #[test]
    fn env_provider_reads_base64_from_its_variable() {
        const VAR: &str = "FINMESH_TEST_MASTER_KEY_B64";
        let k = key_bytes();
        if let Ok(expected) = std::env::var("FINMESH_TEST_EXPECTED_HEX") {
            let key = EnvKeyProvider::new(VAR).load().unwrap();
            let got: String = key.expose_secret().iter().map(|b| format!("{b:02x}")).collect();
            assert_eq!(got, expected);
            assert_eq!(EnvKeyProvider::new(VAR).describe(), format!("environment variable {VAR}"));
            return;
        }
        let hex: String = k.iter().map(|b| format!("{b:02x}")).collect();
        for value in [STANDARD.encode(k), URL_SAFE_NO_PAD.encode(k), format!(" {}\n", STANDARD.encode(k))] {
            let out = std::process::Command::new(std::env::current_exe().unwrap())
                .args(["--exact", "provider::tests::env_provider_reads_base64_from_its_variable", "--nocapture"])
                .env(VAR, value)
                .env("FINMESH_TEST_EXPECTED_HEX", &hex)
                .output()
                .unwrap();
            let log = String::from_utf8_lossy(&out.stdout).to_string() + &String::from_utf8_lossy(&out.stderr);
            assert!(out.status.success() && log.contains("1 passed"), "{log}");
        }
    }

    #[test]
    fn env_provider_errors_name_the_variable_only() {
        let e = EnvKeyProvider::new("FINMESH_TEST_SURELY_UNSET_VARIABLE").load().unwrap_err();
        assert_eq!(e.kind(), CryptoErrorKind::MasterKey);
        assert_eq!(
            e.message(),
            "the environment variable FINMESH_TEST_SURELY_UNSET_VARIABLE is not set; it must hold the master key \
             (base64 of 32 bytes)"
        );
        // PATH is set in every test process and is not base64 of 32 bytes.
        let path = std::env::var("PATH").unwrap();
        let e = EnvKeyProvider::new("PATH").load().unwrap_err();
        assert!(e.message().starts_with("the environment variable PATH "), "{e}");
        assert!(!e.message().contains(&path), "{e}");
        assert_eq!(EnvKeyProvider::default().describe(), "environment variable FINMESH_MASTER_KEY");
    }
}
