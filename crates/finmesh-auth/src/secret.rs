//! Shared secrets on disk and random values.
//!
//! File format of a secret: its bytes, trailing whitespace ignored (so
//! `echo`, editors and Kubernetes secrets may add a newline). The HS256 key is
//! exactly those bytes. A secret shorter than [`MIN_SECRET_LEN`] bytes is
//! refused; a secret longer than [`MAX_SECRET_LEN`] too.
//!
//! [`load_or_create_secret`] creates 32 random bytes written as 43 base64url
//! characters (256 bits of entropy, printable, so the same string works as
//! the secret in other JWT tools), in a new file with mode 0600, fsynced with
//! its directory before it is used. Invariant: a secret is never logged, and
//! is zeroed when dropped.

use std::io::{Read, Write};
use std::path::Path;

use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use finmesh_core::{Error, Result};
use zeroize::Zeroizing;

/// Name of the node's own secret file in the data directory, used when no
/// `[auth]` table is configured.
pub const DEFAULT_SECRET_FILE: &str = "auth-secret";

/// Shortest HS256 secret accepted, in bytes (RFC 7518 §3.2: at least the hash size).
pub const MIN_SECRET_LEN: usize = 32;
/// Longest secret file read, in bytes.
pub const MAX_SECRET_LEN: usize = 4096;

/// A shared secret, zeroed on drop.
pub type Secret = Zeroizing<Vec<u8>>;

/// `n` random bytes from the operating system's CSPRNG (through aws-lc-rs).
pub fn random_bytes(n: usize) -> Result<Zeroizing<Vec<u8>>> {
    let mut buf = Zeroizing::new(vec![0u8; n]);
    aws_lc_rs::rand::fill(&mut buf).map_err(|_| Error::internal("the system random generator failed"))?;
    Ok(buf)
}

/// A random string of `n` bytes of entropy, base64url without padding.
pub fn random_token(n: usize) -> Result<String> {
    Ok(URL_SAFE_NO_PAD.encode(random_bytes(n)?))
}

fn io_error(what: &str, path: &Path, e: std::io::Error) -> Error {
    // The path is operator configuration, not client input: it may be shown.
    Error::internal(format!("{what} {}: {e}", path.display())).with_source(e)
}

/// Read the secret in `path` (format in the module doc).
pub fn read_secret(path: &Path) -> Result<Secret> {
    let file = std::fs::File::open(path).map_err(|e| io_error("cannot open secret file", path, e))?;
    warn_if_readable_by_others(&file, path);
    let mut buf = Zeroizing::new(Vec::new());
    file.take(MAX_SECRET_LEN as u64 + 1)
        .read_to_end(&mut buf)
        .map_err(|e| io_error("cannot read secret file", path, e))?;
    if buf.len() > MAX_SECRET_LEN {
        return Err(Error::invalid(format!("secret file {} is longer than {MAX_SECRET_LEN} bytes", path.display())));
    }
    let len = buf.iter().rposition(|b| !b.is_ascii_whitespace()).map_or(0, |i| i + 1);
    buf.truncate(len);
    if buf.len() < MIN_SECRET_LEN {
        return Err(Error::invalid(format!(
            "secret file {} holds {} bytes; an HS256 secret needs at least {MIN_SECRET_LEN}",
            path.display(),
            buf.len()
        )));
    }
    Ok(buf)
}

/// Read the secret in `path`, or create it (random, mode 0600) when the file
/// does not exist. Returns the secret and whether it was created just now —
/// the moment to print an admin token once.
pub fn load_or_create_secret(path: &Path) -> Result<(Secret, bool)> {
    match create_secret(path) {
        Ok(secret) => Ok((secret, true)),
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => Ok((read_secret(path)?, false)),
        Err(e) => Err(io_error("cannot create secret file", path, e)),
    }
}

/// Write the secret to a private temp file, then hard-link it into place:
/// the link either appears complete or fails with `AlreadyExists`, so two
/// processes starting at once agree on one secret and neither can read a
/// half-written file.
fn create_secret(path: &Path) -> std::io::Result<Secret> {
    let rng_failed = |_| std::io::Error::other("the system random generator failed");
    let bytes = random_bytes(32).map_err(rng_failed)?;
    let text = Zeroizing::new(URL_SAFE_NO_PAD.encode(&bytes).into_bytes());
    if path.exists() {
        return Err(std::io::ErrorKind::AlreadyExists.into());
    }
    let name = path.file_name().ok_or_else(|| std::io::Error::other("the secret path has no file name"))?;
    let tmp = path.with_file_name(format!(".{}.{}.tmp", name.to_string_lossy(), random_token(8).map_err(rng_failed)?));
    let mut opts = std::fs::OpenOptions::new();
    opts.write(true).create_new(true);
    #[cfg(unix)]
    std::os::unix::fs::OpenOptionsExt::mode(&mut opts, 0o600);
    let linked = opts.open(&tmp).and_then(|mut file| {
        file.write_all(&text)?;
        file.write_all(b"\n")?;
        file.sync_all()?;
        std::fs::hard_link(&tmp, path)
    });
    let _ = std::fs::remove_file(&tmp);
    linked?;
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::File::open(dir)?.sync_all()?;
    }
    Ok(text)
}

fn warn_if_readable_by_others(file: &std::fs::File, path: &Path) {
    #[cfg(unix)]
    if let Ok(meta) = file.metadata() {
        use std::os::unix::fs::PermissionsExt;
        let mode = meta.permissions().mode();
        if mode & 0o077 != 0 {
            tracing::warn!(path = %path.display(), mode = format!("{:o}", mode & 0o777), "secret file is readable by group or others; chmod 600 it");
        }
    }
    #[cfg(not(unix))]
    let _ = (file, path);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn creates_once_with_0600_then_reads_the_same() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("secret");
        let (a, created) = load_or_create_secret(&path).unwrap();
        assert!(created);
        assert_eq!(a.len(), 43);
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            assert_eq!(std::fs::metadata(&path).unwrap().permissions().mode() & 0o777, 0o600);
        }
        let (b, created) = load_or_create_secret(&path).unwrap();
        assert!(!created);
        assert_eq!(*a, *b);
        let other = load_or_create_secret(&dir.path().join("other")).unwrap().0;
        assert_ne!(*a, *other);
    }

    #[test]
    fn read_trims_and_checks_length() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("s");
        std::fs::write(&path, format!("{}\r\n\n", "x".repeat(32))).unwrap();
        assert_eq!(read_secret(&path).unwrap().len(), 32);
        std::fs::write(&path, "short\n").unwrap();
        assert_eq!(read_secret(&path).unwrap_err().kind(), finmesh_core::ErrorKind::Invalid);
        std::fs::write(&path, vec![b'x'; MAX_SECRET_LEN + 1]).unwrap();
        assert_eq!(read_secret(&path).unwrap_err().kind(), finmesh_core::ErrorKind::Invalid);
        assert_eq!(read_secret(&dir.path().join("missing")).unwrap_err().kind(), finmesh_core::ErrorKind::Internal);
    }

    #[test]
    fn concurrent_creators_agree_on_one_secret() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("secret");
        let results: Vec<(Secret, bool)> = std::thread::scope(|s| {
            let handles: Vec<_> = (0..8).map(|_| s.spawn(|| load_or_create_secret(&path).unwrap())).collect();
            handles.into_iter().map(|h| h.join().unwrap()).collect()
        });
        assert_eq!(results.iter().filter(|(_, created)| *created).count(), 1);
        assert!(results.iter().all(|(s, _)| **s == *results[0].0));
        let left: Vec<_> = std::fs::read_dir(dir.path()).unwrap().map(|e| e.unwrap().file_name()).collect();
        assert_eq!(left, ["secret"], "no temp file is left behind");
    }

    #[test]
    fn missing_directory_is_an_error_not_a_panic() {
        let dir = tempfile::tempdir().unwrap();
        let e = load_or_create_secret(&dir.path().join("no/such/dir/secret")).unwrap_err();
        assert_eq!(e.kind(), finmesh_core::ErrorKind::Internal);
    }
}
