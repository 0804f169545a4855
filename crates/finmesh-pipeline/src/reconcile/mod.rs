//! Reconciliation, exact: per (run, slice, file, stage) expected and actual
//! counts, taken from what the stages' output streams really contain.
//!
//! Read in this order:
//! 1. [`names`]: ids, streams, subjects, consumers, the `{P}-recon` bucket;
//! 2. [`tally`]: a file's rows seen, one roaring bitmap per stage and
//!    outcome, keyed by the row of the record's id (`{file}:{row}`), and
//!    its stored form in shards of 2^19 rows;
//! 3. [`run`]: a run's spec and status, and the pure function from tallies
//!    to status and state changes;
//! 4. [`store`]: the KV documents and their compare-and-set writes;
//! 5. [`worker`]: the [`Reconciler`] loop over five durable consumers.
//!
//! Why it is exact: a count is the cardinality of a set of row numbers, not
//! a counter. The reconciler writes a file's tally (by compare-and-set)
//! before it acks the messages it applied; a crash between the write and
//! the ack redelivers them, and setting a bit twice changes nothing. A
//! duplicate published after the stream's dedup window has the same id,
//! hence the same bit. Two reconcilers merge their tallies by union.
//!
//! State in `{P}-recon` (history 1):
//! - `run.{run}`: the [`RunStatus`] JSON (spec, states, counts, failures,
//!   late files), written by `open_run` and by the reconciler;
//! - `file.{run}.{slice}.{file}`: the head of the [`FileTally`] of one
//!   file (rows 0 to 2^19-1, the ingest's events, the list of parts);
//! - `part.{run}.{slice}.{file}.{n}`: its rows `[n·2^19, (n+1)·2^19)`,
//!   for each such shard `n ≥ 1` with a row (see [`tally`] for the format
//!   and the size bound of every value, [`store`] for the write order).
//!
//! State changes are published on `{P}-events` under
//! `{P}.state.{run}[.{slice}[.{file}]]` before the run document records
//! them, with a message id per (scope, state): a crash in between
//! publishes the change again, and the stream drops the duplicate.

pub mod names;
pub mod run;
pub mod store;
pub mod tally;
pub mod worker;

pub use names::{DEFAULT_PIPELINE, FileRef, Names, Source};
pub use run::{FileNote, FileStatus, Phase, RunRequest, RunSpec, RunStatus, SliceSpec, SliceStatus, StageCount};
pub use store::{load_run, open_run};
pub use tally::{Counted, FileTally};
pub use worker::{Reconciler, ReconcilerConfig};

/// Timestamps as RFC 3339 text (nanosecond precision), for serde.
pub mod time_fmt {
    use finmesh_core::Timestamp;
    use serde::{Deserialize, Deserializer, Serializer};
    use time::OffsetDateTime;
    use time::format_description::well_known::Rfc3339;

    /// `t` as RFC 3339 (UTC).
    pub fn format(t: Timestamp) -> String {
        OffsetDateTime::from_unix_timestamp_nanos(i128::from(t.0))
            .ok()
            .and_then(|d| d.format(&Rfc3339).ok())
            .unwrap_or_else(|| t.0.to_string())
    }

    /// RFC 3339 text as a timestamp (times before 1970 are refused).
    pub fn parse(s: &str) -> Result<Timestamp, String> {
        let d = OffsetDateTime::parse(s, &Rfc3339).map_err(|e| format!("not an RFC 3339 time: {e}"))?;
        u64::try_from(d.unix_timestamp_nanos()).map(Timestamp).map_err(|_| "before 1970".to_owned())
    }

    /// Serialise as RFC 3339.
    pub fn serialize<S: Serializer>(t: &Timestamp, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&format(*t))
    }

    /// Deserialise from RFC 3339.
    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Timestamp, D::Error> {
        let s = String::deserialize(d)?;
        parse(&s).map_err(serde::de::Error::custom)
    }

    /// The same for `Option<Timestamp>`.
    pub mod option {
        use super::*;

        /// Serialise as RFC 3339 or null.
        pub fn serialize<S: Serializer>(t: &Option<Timestamp>, s: S) -> Result<S::Ok, S::Error> {
            match t {
                Some(t) => s.serialize_str(&format(*t)),
                None => s.serialize_none(),
            }
        }

        /// Deserialise from RFC 3339 or null.
        pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Option<Timestamp>, D::Error> {
            Option::<String>::deserialize(d)?.map(|s| parse(&s).map_err(serde::de::Error::custom)).transpose()
        }
    }
}
