//! Pipeline routes: `POST /v1/pipelines/{pipeline}/files`, a risk-feed file
//! uploaded and ingested into `{P}-raw` as it arrives.
//!
//! Invariants:
//! - the body is never buffered whole: its chunks go through a channel of
//!   [`UPLOAD_QUEUE_CHUNKS`] chunks to the CSV reader, which runs on a
//!   blocking thread ([`finmesh_pipeline::flow::ingest_file`]), so a slow
//!   engine slows the upload instead of filling memory;
//! - parameters are checked before anything is read or written (400
//!   problem); a `Content-Length` over [`Limits::max_upload_bytes`] is
//!   refused with 413 before anything is read; a body without a length that
//!   grows past it is cut there: the rows before the cut stay published, the
//!   file is `file_failed`, and the answer is 413;
//! - the route has no request timeout (an upload lasts as long as the file
//!   takes), like the subscriptions;
//! - access: `stream:publish` on `{P}-raw` for the subject
//!   `{P}.raw.{run}.{slice}.{file}`;
//! - the schema is the pipeline's definition in the engine
//!   ([`finmesh_pipeline::definition`]); 404 when the pipeline is not defined.
//!
//! [`Limits::max_upload_bytes`]: crate::Limits::max_upload_bytes

use std::io;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use axum::Json;
use axum::body::{Body, Bytes};
use axum::extract::{Path, Query, State};
use axum::http::{HeaderMap, header};
use axum::response::{IntoResponse, Response};
use finmesh_auth::Access;
use finmesh_core::{Error, ErrorKind};
use finmesh_pipeline::IngestOptions;
use finmesh_pipeline::flow::{self, FileRef, IngestSpec, Pipeline, StreamKind, StreamLimits};
use finmesh_pipeline::rowset::MAX_MESSAGE_ROWS;
use futures::StreamExt;
use serde::Deserialize;

use crate::AppState;
use crate::caller::Caller;
use crate::problem::ApiResult;

/// Body chunks queued between the connection and the CSV reader.
pub const UPLOAD_QUEUE_CHUNKS: usize = 8;

/// Query of `POST /v1/pipelines/{pipeline}/files`.
#[derive(Debug, Deserialize, utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
pub struct UploadQuery {
    /// The run id (1-64 characters of A-Z a-z 0-9 _ -).
    pub run: Option<String>,
    /// The slice id (same characters).
    pub slice: Option<String>,
    /// The file id (same characters); a record message's id is
    /// `file:first-last` (its rows), an exception's `file:row`.
    pub file: Option<String>,
    /// The reference-data version the run pins (RFC 3339); the stages wait
    /// until it is loaded.
    pub refdata: Option<String>,
    /// Most rows per record message, 1-4096 [default: 1000]. A re-upload
    /// is recognised as duplicates only with the same value.
    pub rows_per_message: Option<usize>,
}

/// `POST /v1/pipelines/{pipeline}/files`: ingest the body (a CSV file).
#[utoipa::path(post, path = "/v1/pipelines/{pipeline}/files", tag = "pipelines",
    params(("pipeline" = String, Path), UploadQuery),
    request_body(content = Vec<u8>, description = "the CSV file (header first), streamed", content_type = "text/csv"),
    responses((status = 200, description = "the ingest summary (status completed, already_ingested or failed)", body = Object),
        (status = 400, body = crate::Problem), (status = 404, body = crate::Problem), (status = 413, body = crate::Problem)))]
pub async fn upload(
    State(state): State<AppState>,
    caller: Caller,
    Path(pipeline): Path<String>,
    Query(q): Query<UploadQuery>,
    headers: HeaderMap,
    body: Body,
) -> ApiResult<Response> {
    let pipeline = Pipeline::new(&pipeline)?;
    let need = |what: &str, v: Option<String>| v.ok_or_else(|| Error::invalid(format!("the query needs `{what}=`")));
    let file = FileRef::new(&need("run", q.run)?, &need("slice", q.slice)?, &need("file", q.file)?)?;
    let refdata = q.refdata.as_deref().map(flow::parse_rfc3339).transpose()?;
    let mut options = IngestOptions::default();
    if let Some(n) = q.rows_per_message {
        if !(1..=MAX_MESSAGE_ROWS).contains(&n) {
            return Err(Error::invalid(format!("rows_per_message must be 1-{MAX_MESSAGE_ROWS}, got {n}")).into());
        }
        options.batch_rows = n;
    }
    let subject = pipeline.subject(StreamKind::Raw, &file)?;
    caller.require(&Access::StreamPublish { stream: pipeline.stream(StreamKind::Raw), subject: &subject })?;
    let limit = state.config().limits.max_upload_bytes;
    let too_large = || {
        Error::new(
            ErrorKind::TooLarge,
            format!("the upload is larger than the limit of {limit} bytes (limits.max_upload_bytes)"),
        )
    };
    if let Some(len) =
        headers.get(header::CONTENT_LENGTH).and_then(|v| v.to_str().ok()).and_then(|v| v.parse::<u64>().ok())
        && len > limit
    {
        return Err(too_large().into());
    }
    let engine = state.engine().clone();
    let schema = finmesh_pipeline::definition::load_schema(&*engine, &pipeline).await?;
    flow::ensure_streams(&*engine, &pipeline, &StreamLimits::default()).await?;

    let (tx, rx) = tokio::sync::mpsc::channel::<io::Result<Bytes>>(UPLOAD_QUEUE_CHUNKS);
    let cut = Arc::new(AtomicBool::new(false));
    let feed = {
        let cut = cut.clone();
        async move {
            let mut stream = body.into_data_stream();
            let mut seen: u64 = 0;
            while let Some(chunk) = stream.next().await {
                let item = match chunk {
                    Ok(bytes) => {
                        seen += bytes.len() as u64;
                        if seen > limit {
                            cut.store(true, Ordering::Relaxed);
                            Err(io::Error::other(format!("the upload passed the limit of {limit} bytes")))
                        } else {
                            Ok(bytes)
                        }
                    }
                    Err(e) => Err(io::Error::other(format!("the upload broke off: {e}"))),
                };
                let stop = item.is_err();
                if tx.send(item).await.is_err() || stop {
                    return;
                }
            }
        }
    };
    let spec = IngestSpec { file, refdata, options, reader: Default::default() };
    let ingest = flow::ingest_file(engine, &pipeline, schema, spec, ChunkReader::new(rx), |_| {});
    let ((), summary) = tokio::join!(feed, ingest);
    let summary = summary?;
    if cut.load(Ordering::Relaxed) {
        return Err(too_large().into());
    }
    Ok(Json(summary).into_response())
}

/// A blocking [`io::Read`] over the chunks of an upload.
struct ChunkReader {
    rx: tokio::sync::mpsc::Receiver<io::Result<Bytes>>,
    current: Bytes,
}

impl ChunkReader {
    fn new(rx: tokio::sync::mpsc::Receiver<io::Result<Bytes>>) -> Self {
        ChunkReader { rx, current: Bytes::new() }
    }
}

impl io::Read for ChunkReader {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        while self.current.is_empty() {
            match self.rx.blocking_recv() {
                Some(Ok(chunk)) => self.current = chunk,
                Some(Err(e)) => return Err(e),
                None => return Ok(0),
            }
        }
        let n = buf.len().min(self.current.len());
        buf[..n].copy_from_slice(&self.current.split_to(n));
        Ok(n)
    }
}
