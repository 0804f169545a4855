//! finmesh risk-feed pipeline: CSV files become Avro records on `raw`, flow
//! through the enrich and validate stages, and end validated or excepted.
//!
//! A file's path through this crate, in reading order:
//! 1. [`schema`]: an `.avsc` record schema is loaded and checked once
//!    ([`IngestSchema`]); a file's header is mapped onto its fields
//!    ([`ColumnMap`]);
//! 2. [`reader`]: [`RowReader`] streams the CSV (never the whole file in
//!    memory), numbers rows and lines, enforces the per-row memory limits
//!    and turns every row into a [`Record`] (message id `<file>:<row>`, raw
//!    Avro datum) or an [`Exception`] (row, line, column, reason);
//! 3. [`coerce`]: the text rules of each Avro type and the binary encoding;
//! 4. [`ingest`](mod@ingest): the driver that batches rows for a publisher,
//!    reports progress every N rows and ends with an [`IngestReport`];
//! 5. [`flow`]: the wire contract on an engine (streams, subjects, ids,
//!    headers, exceptions, file events) and [`flow::ingest_file`], which
//!    publishes a file into `{P}-raw` as record messages of many rows each,
//!    whose rows header and payload framing [`rowset`] owns;
//! 6. [`stages`]: enrich and validate as durable consumers;
//! 7. [`reconcile`]: exact reconciliation of what the stages' output
//!    streams contain against what each file's ingest said, rolled up into
//!    slices and runs with a time window;
//! 8. [`watch`]: a watched directory whose files are each ingested once,
//!    across restarts and competing watchers;
//! 9. [`feedgen`]: deterministic, realistic risk-feed files with a chosen share
//!    of bad rows and of rows that fail each validation rule.
//!
//! The crate's invariant, checked by tests over hostile and random input:
//! every row read is either one record or one exception
//! (`rows == records + exceptions`), and a file that cannot be read to its
//! end says why with a [`FileError`].
//!
//! User documentation: `docs/pipeline.md`.

mod avro_field;
pub mod coerce;
pub mod definition;
pub mod feedgen;
pub mod flow;
pub mod ingest;
pub mod reader;
pub mod reconcile;
pub mod refdata;
pub mod rowset;
mod scan;
pub mod schema;
pub mod stages;
pub mod watch;

pub use coerce::Reason;
pub use ingest::{IngestError, IngestOptions, IngestReport, ingest};
pub use reader::{Batch, Exception, FileError, Progress, ReaderOptions, Record, Row, RowReader};
pub use schema::{ColumnMap, Field, FieldType, HeaderError, IngestSchema, SchemaError};
