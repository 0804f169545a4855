//! The pipeline's names, as the wire contract fixes them: ids, streams,
//! subjects, the reconciler's consumers, its KV bucket and keys.
//!
//! Invariants: a [`Names`] exists only for a valid pipeline name (1-32
//! characters of `A-Z a-z 0-9 _ -`); a [`FileRef`] only for valid run, slice
//! and file ids (1-64 of the same), so every subject and key built from them
//! is valid and nothing below re-checks them.

use finmesh_core::{BucketName, ConsumerName, Error, Key, Result, StreamName, Subject, SubjectPattern};

/// Longest pipeline name.
pub const MAX_PIPELINE_LEN: usize = 32;
/// Longest run, slice or file id.
pub const MAX_ID_LEN: usize = 64;
/// The pipeline used when none is named.
pub const DEFAULT_PIPELINE: &str = "risk";

fn check(what: &str, s: &str, max: usize) -> Result<()> {
    if s.is_empty() || s.len() > max {
        let shown: String = s.chars().take(max).collect();
        return Err(Error::invalid(format!("{what} `{shown}` must be 1-{max} characters, got {}", s.len())));
    }
    if let Some((i, c)) = s.char_indices().find(|(_, c)| !(c.is_ascii_alphanumeric() || *c == '_' || *c == '-')) {
        return Err(Error::invalid(format!("{what} `{s}` has {c:?} at byte {i}; allowed are A-Z a-z 0-9 _ -")));
    }
    Ok(())
}

/// Check a run, slice or file id (`what` names it in the error).
pub fn check_id(what: &str, s: &str) -> Result<()> {
    check(what, s, MAX_ID_LEN)
}

/// A stream the reconciler reads.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Source {
    /// `{P}-raw`: records as ingested.
    Raw,
    /// `{P}-enriched`: records after enrichment.
    Enriched,
    /// `{P}-validated`: records that passed validation.
    Validated,
    /// `{P}-exceptions`: rows that ended in an exception, at any stage.
    Exceptions,
    /// `{P}-events`, file-level events only (`{P}.events.>`).
    Events,
}

impl Source {
    /// Every source, in the order the reconciler polls them.
    pub const ALL: [Source; 5] = [Source::Raw, Source::Enriched, Source::Validated, Source::Exceptions, Source::Events];

    /// The stream's suffix and the subject's stage token.
    pub fn as_str(self) -> &'static str {
        match self {
            Source::Raw => "raw",
            Source::Enriched => "enriched",
            Source::Validated => "validated",
            Source::Exceptions => "exceptions",
            Source::Events => "events",
        }
    }
}

/// The names of one pipeline.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Names {
    pipeline: String,
}

impl Names {
    /// The names of pipeline `pipeline`; `Invalid` for a bad name.
    pub fn new(pipeline: &str) -> Result<Self> {
        check("pipeline name", pipeline, MAX_PIPELINE_LEN)?;
        Ok(Names { pipeline: pipeline.to_owned() })
    }

    /// The pipeline's name.
    pub fn pipeline(&self) -> &str {
        &self.pipeline
    }

    /// `{P}-{source}`.
    pub fn stream(&self, source: Source) -> StreamName {
        StreamName::new(format!("{}-{}", self.pipeline, source.as_str())).expect("valid by construction")
    }

    /// The subjects a source's stream captures. The events stream also
    /// carries the reconciler's state changes (`{P}.state.>`).
    pub fn stream_subjects(&self, source: Source) -> Vec<SubjectPattern> {
        let p = &self.pipeline;
        let mut v = vec![SubjectPattern::new(format!("{p}.{}.>", source.as_str())).expect("valid")];
        if source == Source::Events {
            v.push(SubjectPattern::new(format!("{p}.state.>")).expect("valid"));
        }
        v
    }

    /// What the reconciler's consumer on `source` reads.
    pub fn consumer_filter(&self, source: Source) -> SubjectPattern {
        SubjectPattern::new(format!("{}.{}.>", self.pipeline, source.as_str())).expect("valid")
    }

    /// The reconciler's durable consumer on `source`: `{P}-recon-{source}`
    /// (the stage consumers are `{P}-{stage}`, so the names never meet).
    pub fn consumer(&self, source: Source) -> ConsumerName {
        ConsumerName::new(format!("{}-recon-{}", self.pipeline, source.as_str())).expect("valid by construction")
    }

    /// The KV bucket of reconciliation state: `{P}-recon`.
    pub fn bucket(&self) -> BucketName {
        BucketName::new(format!("{}-recon", self.pipeline)).expect("valid by construction")
    }

    /// Subject of a state change: `{P}.state.{run}[.{slice}[.{file}]]`.
    pub fn state_subject(&self, run: &str, slice: Option<&str>, file: Option<&str>) -> Subject {
        let mut s = format!("{}.state.{run}", self.pipeline);
        for t in [slice, file].into_iter().flatten() {
            s.push('.');
            s.push_str(t);
        }
        Subject::new(s).expect("ids are valid subject tokens")
    }

    /// Subject of a record of `file` on a stage stream (or of its events).
    pub fn file_subject(&self, source: Source, file: &FileRef) -> Subject {
        Subject::new(format!("{}.{}.{}.{}.{}", self.pipeline, source.as_str(), file.run, file.slice, file.file))
            .expect("ids are valid subject tokens")
    }

    /// The file a subject of `source` names, if it has the contract's shape.
    pub fn parse_subject(&self, source: Source, subject: &str) -> Option<FileRef> {
        let mut t = subject.split('.');
        if t.next()? != self.pipeline || t.next()? != source.as_str() {
            return None;
        }
        let (run, slice, file) = (t.next()?, t.next()?, t.next()?);
        if t.next().is_some() {
            return None;
        }
        FileRef::new(run, slice, file).ok()
    }
}

/// One file of one slice of one run.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct FileRef {
    /// The run id.
    pub run: String,
    /// The slice id.
    pub slice: String,
    /// The file id.
    pub file: String,
}

impl FileRef {
    /// Check the three ids.
    pub fn new(run: &str, slice: &str, file: &str) -> Result<Self> {
        check_id("run id", run)?;
        check_id("slice id", slice)?;
        check_id("file id", file)?;
        Ok(FileRef { run: run.to_owned(), slice: slice.to_owned(), file: file.to_owned() })
    }

    /// The key of the file's tally: `file.{run}.{slice}.{file}`.
    pub fn key(&self) -> Key {
        Key::new(format!("file.{}.{}.{}", self.run, self.slice, self.file)).expect("ids are valid key tokens")
    }

    /// The key of part `n` (`n ≥ 1`) of the file's tally:
    /// `part.{run}.{slice}.{file}.{n}`. Not under `file.`, so listing a
    /// run's files ([`run_files_prefix`]) never meets it.
    pub fn part_key(&self, n: u32) -> Key {
        Key::new(format!("part.{}.{}.{}.{n}", self.run, self.slice, self.file)).expect("ids are valid key tokens")
    }

    /// The file a tally key (its head's) names.
    pub fn from_key(key: &str) -> Option<FileRef> {
        let mut t = key.strip_prefix("file.")?.split('.');
        let (run, slice, file) = (t.next()?, t.next()?, t.next()?);
        if t.next().is_some() {
            return None;
        }
        FileRef::new(run, slice, file).ok()
    }
}

/// Key of a run's document: `run.{run}`.
pub fn run_key(run: &str) -> Key {
    Key::new(format!("run.{run}")).expect("a checked run id is a valid key token")
}

/// Prefix of the tally keys of `run`.
pub fn run_files_prefix(run: &str) -> String {
    format!("file.{run}.")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn subjects_and_keys_round_trip() {
        let n = Names::new("risk").unwrap();
        let f = FileRef::new("r1", "s-1", "f_1").unwrap();
        assert_eq!(n.file_subject(Source::Raw, &f).as_str(), "risk.raw.r1.s-1.f_1");
        assert_eq!(n.parse_subject(Source::Raw, "risk.raw.r1.s-1.f_1"), Some(f.clone()));
        assert_eq!(n.parse_subject(Source::Enriched, "risk.raw.r1.s-1.f_1"), None);
        assert_eq!(n.parse_subject(Source::Raw, "risk.raw.r1.s-1"), None);
        assert_eq!(n.parse_subject(Source::Raw, "risk.raw.r1.s.f.x"), None);
        assert_eq!(FileRef::from_key(f.key().as_str()), Some(f.clone()));
        assert_eq!(f.part_key(3).as_str(), "part.r1.s-1.f_1.3");
        assert!(!f.part_key(3).as_str().starts_with(&run_files_prefix("r1")), "a part is not listed as a file");
        assert_eq!(FileRef::from_key(f.part_key(3).as_str()), None);
        let long = FileRef::new(&"r".repeat(64), &"s".repeat(64), &"f".repeat(64)).unwrap();
        assert!(long.part_key(crate::reconcile::tally::SHARDS - 1).as_str().len() < 220);
        assert_eq!(n.consumer(Source::Events).as_str(), "risk-recon-events");
        assert_eq!(n.state_subject("r", Some("s"), None).as_str(), "risk.state.r.s");
    }

    #[test]
    fn bad_ids_are_refused_precisely() {
        let e = FileRef::new("r.1", "s", "f").unwrap_err();
        assert!(e.message().contains("run id `r.1` has '.' at byte 1"), "{e}");
        assert!(FileRef::new("r", "", "f").unwrap_err().message().contains("slice id"));
        assert!(FileRef::new("r", "s", &"x".repeat(65)).unwrap_err().message().contains("1-64"));
        assert!(Names::new(&"p".repeat(33)).is_err());
        assert!(Names::new("risk").is_ok());
    }
}
