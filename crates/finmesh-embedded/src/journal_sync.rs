//! Our own I/O on fjall's journal: an fsync that does not hold fjall's
//! journal lock, so commits go on while the disk flushes, and zeros written
//! ahead of the journal's end, so that fsync writes no allocation metadata.
//!
//! fjall's own `Database::persist(SyncData)` holds the journal writer's
//! mutex for the whole fsync; every commit waits behind it, so a write that
//! arrives during an fsync can only be covered by the one after it. Measured
//! here: 16 publishers with `sync = always` waited ~2.8 fsyncs each.
//!
//! What we rely on from fjall 3.1 (pinned to one exact version in the
//! workspace `Cargo.toml`; each is checked by the test named, so an upgrade
//! that changes one fails loudly):
//! 1. journals are the files `<db dir>/<id>.jnl`; the one with the highest
//!    id is the active one, a rotation creates the next id (`id + 1`), and
//!    fully flushed journals are deleted oldest first
//!    (`fjall_keeps_sparse_journals_where_we_look`, `sync_follows_a_rotation`,
//!    `sync_follows_rotations_past_a_deleted_journal`);
//! 2. a commit hands its journal bytes to the OS before it returns
//!    (`PersistMode::Buffer`, fjall's default when journal persistence is not
//!    manual), and `persist(Buffer)` flushes any user-space remainder (at
//!    most its 8 KiB write buffer), a batch committed with `durability(None)`
//!    included (`fjall_hands_commits_to_the_os`);
//! 3. *not relied on*: fjall 3.1.13 fsyncs a journal when it rotates away
//!    from it, but we cannot observe an fsync from a test, so a sync that
//!    finds the journal rotated fsyncs every older journal still present
//!    (their data may postdate our last fsync) and the directory (the new
//!    journal's entry) itself (`sync_covers_journals_sealed_since_the_last_sync`).
//!    A journal already deleted had its data flushed into tables, which
//!    fjall fsyncs before it deletes the journal (its own crash safety);
//! 4. a new journal is created with `set_len` to 64 MiB (a sparse file) and
//!    written from offset 0 on; recovery stops at the first invalid entry,
//!    so zero bytes after the data read exactly like the hole they replace
//!    (`fjall_keeps_sparse_journals_where_we_look`,
//!    `zeroing_ahead_keeps_every_write_and_never_grows_the_journal`).
//!
//! **Sync** ([`JournalSync`]; the syncer thread, or the writer thread when
//! it runs the fsync itself, never both at once): flush under the lock
//! (`persist(Buffer)`, no disk wait), then `fdatasync` the newest journal
//! through our own descriptor. A write committed before the call is either
//! in that file, or in an older journal: the first sync after a rotation
//! fsyncs those too (see 3 above), later ones know they are durable.
//! If no journal file is found the fallback is fjall's own
//! `persist(SyncData)`. Between the flush and the `fdatasync`, the sync
//! starts the file's writeback (`sync_file_range`) and runs the caller's
//! `meanwhile` work (the writer's subject-index commits), so that CPU work
//! overlaps the disk's write instead of preceding it.
//!
//! **Zeroing ahead** ([`JournalZeroer`], writer thread): writing into a hole
//! allocates blocks, so each `fdatasync` that reaches new blocks also
//! writes the filesystem's allocation metadata — measured here at ~1.4×
//! the time of an fdatasync that overwrites allocated blocks (a 3 KB write
//! plus fdatasync: ~4,000/s into a hole, ~5,600/s over zeros). So while
//! writes that wait for their fsync flow (`sync = always`, stream and
//! consumer changes), the writer keeps the next [`ZERO_AHEAD`] bytes past
//! the journal's data physically zeroed, a [`ZERO_CHUNK`] at a time.
//!
//! Safety: it finds the data's end with `lseek(SEEK_HOLE)` (the first hole
//! is at or after the last byte fjall wrote) and only writes at least
//! [`CANARY`] bytes past that hole. Every chunk is preceded by a
//! [`CANARY`]-sized hole it leaves alone, so the first hole always marks
//! where the data has got to, and [`CANARY`] is larger than anything fjall
//! may still hold unwritten. The writer thread is the only one that
//! commits, so no commit runs while it zeroes; writes from other threads
//! (the syncer's flush, a rotation's final flush) are at most fjall's
//! buffer, inside the canary. The file never grows: zeros only go below its
//! length, and a journal with no hole (opened in append mode after a
//! recovery, or on a filesystem without `SEEK_HOLE`) is never touched.

use std::fs::File;
use std::path::{Path, PathBuf};

use fjall::{Database, PersistMode};

/// Bytes kept zeroed past the journal's data.
pub(crate) const ZERO_AHEAD: u64 = 2 << 20;
/// Bytes zeroed by one write.
pub(crate) const ZERO_CHUNK: u64 = 1 << 20;
/// The hole left before each zeroed chunk; larger than fjall's 8 KiB
/// journal write buffer.
pub(crate) const CANARY: u64 = 16 << 10;

/// The newest journal and a descriptor of it, found again after a rotation.
struct Active {
    dir: PathBuf,
    write: bool,
    current: Option<Current>,
}

/// The journal [`Active`] holds open, and the directory it looks in for
/// the next one.
struct Current {
    id: u64,
    file: File,
    /// The journal directory, opened with the first journal and kept:
    /// looking up one name relative to it is cheaper than resolving the
    /// whole path on every fsync.
    dir: File,
    /// `<id>.jnl`: gone once fjall deleted this journal (ids are never reused).
    name: std::ffi::CString,
    /// `<id + 1>.jnl`, the name a rotation creates next.
    next: std::ffi::CString,
}

impl Active {
    fn new(dir: &Path, write: bool) -> Self {
        Active { dir: dir.to_path_buf(), write, current: None }
    }

    /// The newest journal (`None` if there is none): listed once, and
    /// listed again only after a rotation, noticed by two name lookups in
    /// the directory per call. A rotation creates `<id + 1>.jnl`; if that
    /// is already gone as well, this journal was deleted before it (fjall
    /// deletes flushed journals oldest first), so `<id>.jnl` is gone too.
    /// (Asking the held descriptor for its link count instead, an `fstat`,
    /// cost ~10 % of `sync = always` throughput with 16 publishers here.)
    fn refresh(&mut self) -> std::io::Result<Option<(u64, &File)>> {
        let rotated = match &self.current {
            None => true,
            Some(cur) => exists_in(&cur.dir, &cur.next)? || !exists_in(&cur.dir, &cur.name)?,
        };
        if rotated {
            let dir = match self.current.take() {
                Some(cur) => cur.dir,
                None => File::open(&self.dir)?,
            };
            if let Some(id) = newest_journal(&self.dir)? {
                let file =
                    std::fs::OpenOptions::new().read(true).write(self.write).open(self.dir.join(journal_name(id)))?;
                self.current = Some(Current { id, file, dir, name: journal_cname(id), next: journal_cname(id + 1) });
            }
        }
        Ok(self.current.as_ref().map(|c| (c.id, &c.file)))
    }
}

fn journal_name(id: u64) -> String {
    format!("{id}.jnl")
}

fn journal_cname(id: u64) -> std::ffi::CString {
    std::ffi::CString::new(journal_name(id)).expect("no NUL in a journal name")
}

/// Whether `name` exists in the directory `dir`.
fn exists_in(dir: &File, name: &std::ffi::CStr) -> std::io::Result<bool> {
    use std::os::fd::AsRawFd;
    // SAFETY: `name` is NUL-terminated and `dir` an open descriptor;
    // faccessat only reads them.
    if unsafe { libc::faccessat(dir.as_raw_fd(), name.as_ptr(), libc::F_OK, 0) } == 0 {
        return Ok(true);
    }
    match std::io::Error::last_os_error() {
        e if e.kind() == std::io::ErrorKind::NotFound => Ok(false),
        e => Err(e),
    }
}

pub(crate) struct JournalSync {
    active: Active,
    /// The journal the last sync fsynced as the active one: every older
    /// journal was durable by then.
    synced: Option<u64>,
    /// Older journals fsynced after rotations (see the module doc, 3).
    sealed_synced: u64,
}

impl JournalSync {
    pub fn new(dir: &Path) -> Self {
        JournalSync { active: Active::new(dir, false), synced: None, sealed_synced: 0 }
    }

    /// fsync the journals older than `active` that may hold writes made
    /// since the last sync (those from the one it fsynced on), and the
    /// directory, so a rotation needs no fsync of fjall's to be covered.
    fn sync_sealed(&mut self, active: u64) -> std::io::Result<()> {
        let from = self.synced.unwrap_or(0);
        for entry in std::fs::read_dir(&self.active.dir)? {
            let name = entry?.file_name();
            let Some(id) = name.to_str().and_then(|n| n.strip_suffix(".jnl")).and_then(|n| n.parse::<u64>().ok())
            else {
                continue;
            };
            if id < from || id >= active {
                continue;
            }
            match File::open(self.active.dir.join(&name)) {
                Ok(f) => {
                    f.sync_data()?;
                    self.sealed_synced += 1;
                }
                // Deleted meanwhile: flushed into tables, which are durable.
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => return Err(e),
            }
        }
        File::open(&self.active.dir)?.sync_all()
    }

    /// Make every write committed before this call durable. `meanwhile`
    /// runs after the journal's dirty pages were handed to the disk and
    /// before the fsync waits for them (and for the disk's cache flush), so
    /// CPU work that need not precede the fsync overlaps the disk's write.
    /// What `meanwhile` commits is not covered by this fsync.
    pub fn sync(&mut self, db: &Database, meanwhile: impl FnOnce() -> Result<(), String>) -> Result<(), String> {
        db.persist(PersistMode::Buffer).map_err(|e| format!("journal flush failed: {e}"))?;
        let active = self.active.refresh().map_err(|e| format!("cannot find the active journal: {e}"))?;
        match active.map(|(id, _)| id) {
            Some(id) if self.synced != Some(id) => {
                self.sync_sealed(id).map_err(|e| format!("fsync of the journals before {id} failed: {e}"))?;
            }
            _ => {}
        }
        match self.active.current.as_ref().map(|c| (c.id, &c.file)) {
            Some((id, file)) => {
                start_writeback(file);
                let done = meanwhile();
                let synced = file.sync_data().map_err(|e| format!("journal fsync failed: {e}"));
                if synced.is_ok() {
                    self.synced = Some(id);
                }
                done.and(synced)
            }
            None => {
                let done = meanwhile();
                let synced = db.persist(PersistMode::SyncData).map_err(|e| format!("journal fsync failed: {e}"));
                done.and(synced)
            }
        }
    }
}

/// Keeps the bytes after the active journal's data zeroed (see the module
/// doc). Runs on the writer thread, between its commits.
pub(crate) struct JournalZeroer {
    active: Active,
    /// The journal zeroed so far and the end of its last zeroed chunk.
    zeroed: Option<(u64, u64)>,
    zeros: Vec<u8>,
    /// Set after an I/O error: zeroing is an optimisation, so it stops
    /// (with one log line) rather than failing writes.
    disabled: bool,
}

impl JournalZeroer {
    pub fn new(dir: &Path) -> Self {
        JournalZeroer { active: Active::new(dir, true), zeroed: None, zeros: Vec::new(), disabled: false }
    }

    /// Zero ahead of the active journal's data if less than [`ZERO_AHEAD`]
    /// is zeroed. Must not run concurrently with a commit.
    pub fn maintain(&mut self) {
        if self.disabled {
            return;
        }
        if let Err(e) = self.try_maintain() {
            tracing::warn!("stopped zeroing the journal ahead of its data (fsyncs get slower, nothing is lost): {e}");
            self.disabled = true;
        }
    }

    fn try_maintain(&mut self) -> std::io::Result<()> {
        let Some((id, file)) = self.active.refresh()? else { return Ok(()) };
        let len = file.metadata()?.len();
        let hole = first_hole(file)?;
        let mut end = match self.zeroed {
            Some((zid, end)) if zid == id => end,
            _ => 0,
        };
        while end < hole.saturating_add(ZERO_AHEAD) {
            let start = end.max(hole) + CANARY;
            let stop = (start + ZERO_CHUNK).min(len);
            if start >= stop {
                break;
            }
            self.zeros.resize(ZERO_CHUNK as usize, 0);
            write_zeros(file, start, &self.zeros[..(stop - start) as usize])?;
            end = stop;
        }
        self.zeroed = Some((id, end));
        Ok(())
    }
}

/// Offset of the first hole in `file` (its length if it has none).
fn first_hole(file: &File) -> std::io::Result<u64> {
    use std::os::fd::AsRawFd;
    // SAFETY: lseek on a descriptor we own; it only moves that
    // descriptor's offset, which nothing else of ours uses.
    let off = unsafe { libc::lseek(file.as_raw_fd(), 0, libc::SEEK_HOLE) };
    if off < 0 { Err(std::io::Error::last_os_error()) } else { Ok(off as u64) }
}

/// Write `zeros` at `offset` and start (not wait for) their writeback, so
/// that the next fdatasync finds them mostly on disk already.
/// Start writing the file's dirty pages to the disk without waiting
/// (Linux `sync_file_range`). Only an early start for the `fdatasync` that
/// follows, which waits for them and reports any error: failures here are
/// ignored.
fn start_writeback(file: &File) {
    #[cfg(target_os = "linux")]
    {
        use std::os::fd::AsRawFd;
        // SAFETY: a plain syscall on a descriptor we own.
        unsafe { libc::sync_file_range(file.as_raw_fd(), 0, 0, libc::SYNC_FILE_RANGE_WRITE) };
    }
    #[cfg(not(target_os = "linux"))]
    let _ = file;
}

fn write_zeros(file: &File, offset: u64, zeros: &[u8]) -> std::io::Result<()> {
    use std::os::unix::fs::FileExt;
    file.write_all_at(zeros, offset)?;
    #[cfg(target_os = "linux")]
    {
        use std::os::fd::AsRawFd;
        // SAFETY: a plain syscall on a descriptor we own.
        let rc = unsafe {
            libc::sync_file_range(
                file.as_raw_fd(),
                offset as libc::off64_t,
                zeros.len() as libc::off64_t,
                libc::SYNC_FILE_RANGE_WRITE,
            )
        };
        if rc != 0 {
            return Err(std::io::Error::last_os_error());
        }
    }
    Ok(())
}

/// Id of the newest `<id>.jnl` in `dir`.
fn newest_journal(dir: &Path) -> std::io::Result<Option<u64>> {
    let mut newest = None;
    for entry in std::fs::read_dir(dir)? {
        let name = entry?.file_name();
        if let Some(id) = name.to_str().and_then(|n| n.strip_suffix(".jnl")).and_then(|n| n.parse::<u64>().ok()) {
            newest = newest.max(Some(id));
        }
    }
    Ok(newest)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn open(dir: &Path) -> (Database, fjall::Keyspace) {
        let db = Database::builder(dir).open().unwrap();
        let ks = db.keyspace("k", fjall::KeyspaceCreateOptions::default).unwrap();
        (db, ks)
    }

    fn journal(dir: &Path) -> File {
        let id = newest_journal(dir).unwrap().expect("a journal");
        File::open(dir.join(format!("{id}.jnl"))).unwrap()
    }

    /// Offset of the first data at or after `from` (`None` past the end).
    fn next_data(file: &File, from: u64) -> Option<u64> {
        use std::os::fd::AsRawFd;
        // SAFETY: lseek on a descriptor the test owns.
        let off = unsafe { libc::lseek(file.as_raw_fd(), from as libc::off_t, libc::SEEK_DATA) };
        (off >= 0).then_some(off as u64)
    }

    /// Pins properties 1 and 4 of the module doc: if fjall stops keeping its
    /// journals as `<id>.jnl` in the database directory, or stops creating
    /// them sparse, this fails instead of the engine silently falling back.
    #[test]
    fn fjall_keeps_sparse_journals_where_we_look() {
        let dir = tempfile::tempdir().unwrap();
        let (db, ks) = open(dir.path());
        ks.insert("a", "b").unwrap();
        let file = journal(dir.path());
        let len = file.metadata().unwrap().len();
        let hole = first_hole(&file).unwrap();
        assert!(hole < len, "the new journal has no hole (length {len})");
        assert_eq!(next_data(&file, hole), None, "data after the first hole of a new journal");
        let mut js = JournalSync::new(dir.path());
        js.sync(&db, || Ok(())).unwrap();
        assert!(js.active.current.is_some(), "sync went to the fallback");
    }

    /// Write past fjall's 64 MB journal limit into `ks` and flush its
    /// memtable, which makes fjall rotate to the next journal; returns that
    /// journal's id.
    fn rotate_journal(dir: &Path, ks: &fjall::Keyspace, tag: &str) -> u64 {
        let before = newest_journal(dir).unwrap().expect("a journal");
        // Incompressible, in case the journal is compressed.
        let mut x = 0x9e37_79b9_7f4a_7c15_u64;
        let value: Vec<u8> = (0..256 << 10)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                x as u8
            })
            .collect();
        for i in 0..260 {
            ks.insert(format!("{tag}-{i:04}"), &value).unwrap();
        }
        ks.rotate_memtable_and_wait().unwrap();
        let after = newest_journal(dir).unwrap().expect("a journal");
        assert_eq!(after, before + 1, "fjall did not rotate");
        after
    }

    fn synced_id(js: &JournalSync) -> Option<u64> {
        js.active.current.as_ref().map(|c| c.id)
    }

    /// Pins property 1's rotation half while the old journal stays (another
    /// keyspace still has unflushed writes in it): the sync finds the new
    /// `<id + 1>.jnl` and fsyncs that.
    #[test]
    fn sync_follows_a_rotation() {
        let dir = tempfile::tempdir().unwrap();
        let (db, ks) = open(dir.path());
        let other = db.keyspace("other", fjall::KeyspaceCreateOptions::default).unwrap();
        let mut js = JournalSync::new(dir.path());
        other.insert("keeps the journal", "x").unwrap();
        js.sync(&db, || Ok(())).unwrap();
        let first = synced_id(&js).expect("a journal");
        let next = rotate_journal(dir.path(), &ks, "r");
        assert!(dir.path().join(journal_name(first)).exists(), "the old journal is still needed");
        ks.insert("after", "x").unwrap();
        js.sync(&db, || Ok(())).unwrap();
        assert_eq!(synced_id(&js), Some(next), "sync missed the rotation");
    }

    /// Pins property 1's deletion half: after two rotations between two
    /// syncs, fjall has already deleted the journal in between (and the
    /// one the sync held), and the sync still finds the newest.
    #[test]
    fn sync_follows_rotations_past_a_deleted_journal() {
        let dir = tempfile::tempdir().unwrap();
        let (db, ks) = open(dir.path());
        let mut js = JournalSync::new(dir.path());
        ks.insert("a", "b").unwrap();
        js.sync(&db, || Ok(())).unwrap();
        let first = synced_id(&js).expect("a journal");
        rotate_journal(dir.path(), &ks, "r1");
        let newest = rotate_journal(dir.path(), &ks, "r2");
        // fjall's flush worker deletes flushed journals right after the
        // flush that `rotate_memtable_and_wait` waits for, on its own
        // thread, and announces nothing: poll for it.
        let between = dir.path().join(journal_name(first + 1));
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
        while between.exists() {
            assert!(std::time::Instant::now() < deadline, "fjall kept the journal in between");
            std::thread::sleep(std::time::Duration::from_millis(1));
        }
        ks.insert("after", "x").unwrap();
        js.sync(&db, || Ok(())).unwrap();
        assert_eq!(synced_id(&js), Some(newest), "sync missed the rotations");
    }

    /// Pins property 2: a default commit's bytes are in the journal file
    /// (the OS's, readable through another descriptor) when it returns, and
    /// a batch committed with `durability(None)` (as the writer's index
    /// batches are) once `persist(Buffer)` returns.
    #[test]
    fn fjall_hands_commits_to_the_os() {
        let dir = tempfile::tempdir().unwrap();
        let (db, ks) = open(dir.path());
        let in_journal = |marker: &[u8]| {
            let bytes = std::fs::read(dir.path().join(journal_name(newest_journal(dir.path()).unwrap().unwrap())));
            bytes.unwrap().windows(marker.len()).any(|w| w == marker)
        };
        let committed = b"committed-0a1b2c3d4e5f60718293a4b5c6d7e8f9";
        let mut batch = db.batch();
        batch.insert(&ks, "k1", committed);
        batch.commit().unwrap();
        assert!(in_journal(committed), "a commit returned before its bytes reached the OS");
        ks.insert("k2", b"inserted-1f2e3d4c5b6a79880a9b8c7d6e5f4031").unwrap();
        assert!(in_journal(b"inserted-1f2e3d4c5b6a79880a9b8c7d6e5f4031"), "an insert stayed in fjall's buffer");
        let buffered = b"buffered-99aa88bb77cc66dd55ee44ff33001122";
        let mut batch = db.batch().durability(None);
        batch.insert(&ks, "k3", buffered);
        batch.commit().unwrap();
        db.persist(PersistMode::Buffer).unwrap();
        assert!(in_journal(buffered), "persist(Buffer) left a batch in fjall's buffer");
    }

    /// Property 3 is not relied on: a write committed before a rotation, to
    /// a journal that is still there, is covered by the next sync, which
    /// fsyncs that sealed journal itself.
    #[test]
    fn sync_covers_journals_sealed_since_the_last_sync() {
        let dir = tempfile::tempdir().unwrap();
        let (db, ks) = open(dir.path());
        let other = db.keyspace("other", fjall::KeyspaceCreateOptions::default).unwrap();
        let mut js = JournalSync::new(dir.path());
        other.insert("keeps the journal", "x").unwrap();
        js.sync(&db, || Ok(())).unwrap();
        let first = synced_id(&js).expect("a journal");
        let before = js.sealed_synced;
        // Written after that sync, into the journal the rotation seals.
        other.insert("after the sync", "y").unwrap();
        let next = rotate_journal(dir.path(), &ks, "s");
        assert!(dir.path().join(journal_name(first)).exists(), "the sealed journal is still needed");
        js.sync(&db, || Ok(())).unwrap();
        assert_eq!(synced_id(&js), Some(next));
        assert_eq!(js.sealed_synced, before + 1, "the sync did not fsync the sealed journal {first}");
        // Until the next rotation, the sealed journals are known durable.
        ks.insert("more", "z").unwrap();
        js.sync(&db, || Ok(())).unwrap();
        assert_eq!(js.sealed_synced, before + 1);
    }

    /// Zeros go ahead of the data with a hole before each chunk, the file
    /// never grows, and everything written through the zeroed space (and
    /// past it, into the next chunks) is recovered on reopening.
    #[test]
    fn zeroing_ahead_keeps_every_write_and_never_grows_the_journal() {
        let dir = tempfile::tempdir().unwrap();
        let value = vec![0x5a_u8; 1000];
        let mut zeroer = JournalZeroer::new(dir.path());
        let n = 5_000; // ~5 MB: through several zeroed chunks
        {
            let (db, ks) = open(dir.path());
            ks.insert("first", &value).unwrap();
            zeroer.maintain();
            let file = journal(dir.path());
            let len = file.metadata().unwrap().len();
            let hole = first_hole(&file).unwrap();
            assert_eq!(next_data(&file, hole), Some(hole + CANARY), "the first chunk starts after the canary");
            let after = hole + CANARY + ZERO_CHUNK;
            assert_eq!(first_hole(&file).unwrap(), hole, "the data's end moved");
            assert_eq!(next_data(&file, after), Some(after + CANARY), "the second chunk starts after its canary");
            for i in 0..n {
                ks.insert(format!("k{i:05}"), &value).unwrap();
                if i % 50 == 0 {
                    zeroer.maintain();
                    assert!(!zeroer.disabled, "zeroing stopped");
                }
            }
            assert_eq!(file.metadata().unwrap().len(), len, "the journal grew");
            assert!(first_hole(&file).unwrap() > 4 << 20, "the data did not go past the first chunks");
            drop((ks, db));
        }
        let (_db, ks) = open(dir.path());
        assert_eq!(ks.get("first").unwrap().as_deref(), Some(&value[..]));
        for i in 0..n {
            assert_eq!(ks.get(format!("k{i:05}")).unwrap().as_deref(), Some(&value[..]), "k{i:05} lost");
        }
    }

    /// A journal reopened after recovery has no hole (fjall truncates it and
    /// appends): zeroing leaves it alone rather than growing it.
    #[test]
    fn zeroing_never_extends_a_journal_without_a_hole() {
        let dir = tempfile::tempdir().unwrap();
        {
            let (_db, ks) = open(dir.path());
            ks.insert("a", "b").unwrap();
        }
        let (_db, ks) = open(dir.path());
        ks.insert("c", "d").unwrap();
        let file = journal(dir.path());
        let before = file.metadata().unwrap().len();
        let mut zeroer = JournalZeroer::new(dir.path());
        zeroer.maintain();
        assert!(!zeroer.disabled);
        assert_eq!(file.metadata().unwrap().len(), before, "zeroing grew the journal");
        assert_eq!(ks.get("a").unwrap().as_deref(), Some(&b"b"[..]));
    }
}
