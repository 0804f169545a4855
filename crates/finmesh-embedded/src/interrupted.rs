//! A store whose creation was interrupted is created again.
//!
//! fjall 3.1 creates a database in steps: the lock file, `keyspaces/`, the
//! first journal `0.jnl` (sparse, fsynced), and last the `version` marker
//! (created, written, fsynced). A process killed between the journal and a
//! written marker leaves a directory fjall refuses to open (`0.jnl` already
//! exists, or the marker is empty: `InvalidVersion`), although nothing was
//! ever stored in it — writes only begin once creation has returned. The
//! crash test found this: a child killed during its very first open.
//!
//! [`finish_interrupted_create`] removes exactly what such a creation left
//! behind, so that fjall creates the store afresh. Invariant: it removes
//! files only when all of these hold, and otherwise leaves the directory to
//! fjall's own checks:
//! - the `version` marker is missing or empty;
//! - `keyspaces/` is missing or empty (fjall creates keyspaces after the
//!   marker);
//! - every journal is empty or all hole (`lseek(SEEK_DATA)` finds no data;
//!   a filesystem without `SEEK_DATA` reports data, so nothing is removed);
//! - nothing else is in the directory;
//! - fjall's lock file can be locked (no other process is creating or using
//!   the store); the lock is held while removing.

use std::fs::File;
use std::path::Path;

const VERSION_MARKER: &str = "version";
const LOCK_FILE: &str = "lock";
const KEYSPACES: &str = "keyspaces";

/// If `dir` holds only the remains of an interrupted creation, remove them
/// (and say so in the log). Returns whether it did.
pub(crate) fn finish_interrupted_create(dir: &Path) -> std::io::Result<bool> {
    let marker = dir.join(VERSION_MARKER);
    match std::fs::metadata(&marker) {
        Ok(m) if m.len() > 0 => return Ok(false),
        Ok(_) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(e),
    }
    let mut journals = Vec::new();
    let entries = match std::fs::read_dir(dir) {
        Ok(entries) => entries,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(false),
        Err(e) => return Err(e),
    };
    for entry in entries {
        let entry = entry?;
        let name = entry.file_name();
        let Some(name) = name.to_str() else { return Ok(false) };
        match name {
            VERSION_MARKER | LOCK_FILE => {}
            KEYSPACES => {
                if std::fs::read_dir(entry.path())?.next().is_some() {
                    return Ok(false);
                }
            }
            _ if name.strip_suffix(".jnl").is_some_and(|id| id.parse::<u64>().is_ok()) => {
                if has_data(&File::open(entry.path())?)? {
                    return Ok(false);
                }
                journals.push(entry.path());
            }
            _ => return Ok(false),
        }
    }
    if journals.is_empty() && !marker.exists() {
        // Nothing in fjall's way: it creates the store itself.
        return Ok(false);
    }
    let lock =
        std::fs::OpenOptions::new().read(true).write(true).create(true).truncate(false).open(dir.join(LOCK_FILE))?;
    if lock.try_lock().is_err() {
        return Ok(false);
    }
    for journal in &journals {
        std::fs::remove_file(journal)?;
    }
    if marker.exists() {
        std::fs::remove_file(&marker)?;
    }
    File::open(dir)?.sync_all()?;
    tracing::warn!(
        dir = %dir.display(),
        removed_journals = journals.len(),
        "the store's creation was interrupted before it held any data; creating it again"
    );
    Ok(true)
}

/// Does `file` hold any data (anything but holes)?
fn has_data(file: &File) -> std::io::Result<bool> {
    use std::os::fd::AsRawFd;
    if file.metadata()?.len() == 0 {
        return Ok(false);
    }
    // SAFETY: lseek on a descriptor we own.
    let off = unsafe { libc::lseek(file.as_raw_fd(), 0, libc::SEEK_DATA) };
    if off >= 0 {
        return Ok(true);
    }
    let e = std::io::Error::last_os_error();
    if e.raw_os_error() == Some(libc::ENXIO) { Ok(false) } else { Err(e) }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The directory fjall leaves when killed after the first journal and
    /// before a written marker: the lock, `keyspaces/`, a sparse `0.jnl`,
    /// and an empty (or no) marker.
    fn interrupted(dir: &Path, marker: bool) {
        File::create(dir.join(LOCK_FILE)).unwrap();
        std::fs::create_dir(dir.join(KEYSPACES)).unwrap();
        File::create(dir.join("0.jnl")).unwrap().set_len(64 << 20).unwrap();
        if marker {
            File::create(dir.join(VERSION_MARKER)).unwrap();
        }
    }

    #[test]
    fn an_interrupted_creation_is_cleared_and_the_store_opens() {
        for marker in [true, false] {
            let dir = tempfile::tempdir().unwrap();
            interrupted(dir.path(), marker);
            assert!(fjall::Database::builder(dir.path()).open().is_err(), "fjall opened it without help");
            assert!(finish_interrupted_create(dir.path()).unwrap());
            let db = fjall::Database::builder(dir.path()).open().unwrap();
            db.keyspace("k", fjall::KeyspaceCreateOptions::default).unwrap().insert("a", "b").unwrap();
        }
    }

    /// Names of everything under `dir`, recursively.
    fn listing(dir: &Path) -> Vec<String> {
        let mut names = Vec::new();
        for entry in std::fs::read_dir(dir).unwrap() {
            let path = entry.unwrap().path();
            names.push(path.display().to_string());
            if path.is_dir() {
                names.extend(listing(&path));
            }
        }
        names.sort();
        names
    }

    /// An interrupted creation (with or without `marker`) changed by
    /// `change` is not cleared, and not a file of it is removed.
    fn assert_left_alone(what: &str, marker: bool, change: impl FnOnce(&Path)) {
        let dir = tempfile::tempdir().unwrap();
        interrupted(dir.path(), marker);
        change(dir.path());
        let before = listing(dir.path());
        assert!(!finish_interrupted_create(dir.path()).unwrap(), "{what}: cleared");
        assert_eq!(listing(dir.path()), before, "{what}: files removed");
    }

    #[test]
    fn anything_that_may_hold_data_is_left_alone() {
        assert_left_alone("a journal with data", true, |d| std::fs::write(d.join("0.jnl"), b"batch").unwrap());
        assert_left_alone("a keyspace", true, |d| std::fs::create_dir(d.join(KEYSPACES).join("0")).unwrap());
        assert_left_alone("a written marker", false, |d| std::fs::write(d.join(VERSION_MARKER), b"FJL\x03").unwrap());
        assert_left_alone("someone else's file", true, |d| std::fs::write(d.join("notes.txt"), b"mine").unwrap());
        let mut held = None;
        assert_left_alone("a held lock", true, |d| {
            let f = File::open(d.join(LOCK_FILE)).unwrap();
            f.lock().unwrap();
            held = Some(f);
        });
        let dir = tempfile::tempdir().unwrap();
        drop(fjall::Database::builder(dir.path()).open().unwrap());
        let before = listing(dir.path());
        assert!(!finish_interrupted_create(dir.path()).unwrap(), "a complete store: cleared");
        assert_eq!(listing(dir.path()), before);
    }
}
