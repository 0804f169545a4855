//! `POST /v1/pipelines/{pipeline}/files` on both engines: a generated feed
//! uploaded over a real socket in small chunks (so the body is streamed),
//! the summary, the records and exceptions in the streams, a duplicate-free
//! re-upload, precise 400s for bad parameters, 404 for an undefined
//! pipeline and 413 past `max_upload_bytes`, with and without a length.

mod support;

use std::time::Duration;

use bytes::Bytes;
use finmesh_core::{ReadRequest, Seq, StreamName};
use finmesh_gateway::GatewayConfig;
use finmesh_pipeline::definition;
use finmesh_pipeline::feedgen::{self, GenOptions};
use finmesh_pipeline::flow::Pipeline;
use serde_json::Value;
use support::{Gw, Harness};

const EXAMPLES: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../../examples/pipeline");

async fn gateway<H: Harness>(max_upload_bytes: u64) -> Gw {
    let mut config = GatewayConfig::default();
    config.limits.max_upload_bytes = max_upload_bytes;
    let gw = Gw::with_config::<H>(config).await;
    let avsc = std::fs::read_to_string(format!("{EXAMPLES}/risk.avsc")).unwrap();
    definition::store_schema(&**gw.state.engine(), &Pipeline::new("risk").unwrap(), &avsc).await.unwrap();
    gw
}

/// Posts `body` to `addr` in chunks of `chunk` bytes (chunked encoding: no
/// length), or with a `Content-Length` when `sized`.
async fn upload(addr: std::net::SocketAddr, query: &str, body: Vec<u8>, chunk: usize, sized: bool) -> (u16, Value) {
    let url = format!("http://{addr}/v1/pipelines/risk/files?{query}");
    let client = reqwest::Client::new();
    let request = if sized {
        client.post(url).body(body)
    } else {
        let chunks: Vec<Result<Bytes, std::io::Error>> =
            body.chunks(chunk).map(|c| Ok(Bytes::copy_from_slice(c))).collect();
        client.post(url).body(reqwest::Body::wrap_stream(futures::stream::iter(chunks)))
    };
    let res = request.timeout(Duration::from_secs(60)).send().await.unwrap();
    let status = res.status().as_u16();
    (status, res.json().await.unwrap())
}

async fn count(gw: &Gw, stream: &str) -> usize {
    let name = StreamName::new(stream).unwrap();
    gw.state.engine().read(&name, ReadRequest::from_seq(Seq(1), 10_000)).await.unwrap().len()
}

/// Rows in the record messages of `raw` of file `file`, the most rows one
/// message holds, and the messages.
async fn raw_rows(gw: &Gw, file: &str) -> (u64, u64, u64) {
    let name = StreamName::new("risk-raw").unwrap();
    let messages = gw.state.engine().read(&name, ReadRequest::from_seq(Seq(1), 10_000)).await.unwrap();
    let rows = messages
        .iter()
        .filter(|m| m.headers.get(finmesh_pipeline::flow::HDR_FILE) == Some(file))
        .map(|m| finmesh_pipeline::flow::message_rows(&m.headers).unwrap().len());
    rows.fold((0, 0, 0), |(sum, max, n_msgs), n| (sum + n, max.max(n), n_msgs + 1))
}

async fn a_streamed_upload_is_ingested_once<H: Harness>() {
    let gw = gateway::<H>(1 << 30).await;
    let addr = gw.serve().await;
    let opts = GenOptions { rows: 2_000, seed: fastrand::u64(..), bad_share: 0.05, ..GenOptions::default() };
    let mut csv = Vec::new();
    let generated = feedgen::generate(&mut csv, &opts).unwrap();

    let (status, summary) = upload(addr, "run=r1&slice=s1&file=f1", csv.clone(), 1000, false).await;
    assert_eq!(status, 200, "{summary}");
    assert_eq!(summary["status"], "completed", "{summary}");
    assert_eq!(summary["rows"], generated.rows);
    assert_eq!(summary["exceptions"], generated.bad);
    assert_eq!(summary["records"], generated.rows - generated.bad);
    assert_eq!(summary["bytes"], csv.len() as u64);
    assert_eq!(summary["duplicates"], 0);
    let (rows, max, messages) = raw_rows(&gw, "f1").await;
    assert_eq!(rows, generated.rows - generated.bad);
    assert!(max <= 1000 && messages == 2, "one message per batch of 1,000 rows: {messages} of at most {max}");
    assert_eq!(count(&gw, "risk-exceptions").await as u64, generated.bad);
    assert_eq!(count(&gw, "risk-events").await, 1);

    // The same file id again: nothing new is stored, and the summary says so.
    let (status, again) = upload(addr, "run=r1&slice=s1&file=f1", csv.clone(), 777, true).await;
    assert_eq!(status, 200, "{again}");
    assert_eq!(again["status"], "already_ingested", "{again}");
    assert_eq!(again["duplicates"], generated.rows);
    assert_eq!(raw_rows(&gw, "f1").await.0, generated.rows - generated.bad);
    assert_eq!(count(&gw, "risk-events").await, 1);

    // Smaller messages on request.
    let (status, small) = upload(addr, "run=r1&slice=s1&file=f3&rows_per_message=100", csv, 1000, false).await;
    assert_eq!(status, 200, "{small}");
    let (rows, max, messages) = raw_rows(&gw, "f3").await;
    assert_eq!(rows, generated.rows - generated.bad);
    assert!(max <= 100 && messages == 20, "one message per batch of 100 rows: {messages} of at most {max}");

    // A file that does not fit the schema fails, with the reason.
    let (status, failed) = upload(addr, "run=r1&slice=s1&file=f2", b"nope,nothing\n1,2\n".to_vec(), 4, false).await;
    assert_eq!(status, 200, "{failed}");
    assert_eq!(failed["status"], "failed");
    assert!(failed["reason"].as_str().unwrap().contains("trade_id"), "{failed}");
}

async fn bad_parameters_are_precise_problems<H: Harness>() {
    let gw = gateway::<H>(1 << 30).await;
    for (query, needle) in [
        ("slice=s&file=f", "`run=`"),
        ("run=r&file=f", "`slice=`"),
        ("run=r&slice=s", "`file=`"),
        ("run=a%20b&slice=s&file=f", "run id `a b`"),
        ("run=r&slice=s&file=f&refdata=yesterday", "RFC 3339"),
        ("run=r&slice=s&file=f&rows_per_message=0", "rows_per_message must be 1-4096"),
        ("run=r&slice=s&file=f&rows_per_message=4097", "rows_per_message must be 1-4096"),
    ] {
        let r = gw.post(&format!("/v1/pipelines/risk/files?{query}"), "x").await;
        let p = r.assert_problem(400, "invalid");
        assert!(p["detail"].as_str().unwrap().contains(needle), "{query}: {p}");
    }
    gw.post("/v1/pipelines/a.b/files?run=r&slice=s&file=f", "x").await.assert_problem(400, "invalid");
    let p = gw.post("/v1/pipelines/other/files?run=r&slice=s&file=f", "x").await.assert_problem(404, "not-found");
    assert!(p["detail"].as_str().unwrap().contains("pipeline `other` is not defined"), "{p}");
}

async fn uploads_past_the_limit_are_413<H: Harness>() {
    let gw = gateway::<H>(10_000).await;
    let addr = gw.serve().await;
    let mut csv = Vec::new();
    feedgen::generate(&mut csv, &GenOptions { rows: 500, ..GenOptions::default() }).unwrap();
    assert!(csv.len() > 10_000);
    // With a length: refused before anything is read or written.
    let (status, p) = upload(addr, "run=r&slice=s&file=sized", csv.clone(), 0, true).await;
    assert_eq!(status, 413, "{p}");
    assert!(p["detail"].as_str().unwrap().contains("max_upload_bytes"), "{p}");
    // Without: cut at the limit, the file reported failed.
    let (status, p) = upload(addr, "run=r&slice=s&file=chunked", csv, 1000, false).await;
    assert_eq!(status, 413, "{p}");
    let events = gw
        .state
        .engine()
        .read(&StreamName::new("risk-events").unwrap(), ReadRequest::from_seq(Seq(1), 10))
        .await
        .unwrap();
    assert_eq!(events.len(), 1);
    let event: Value = serde_json::from_slice(&events[0].payload).unwrap();
    assert_eq!((event["type"].as_str(), event["file"].as_str()), (Some("file_failed"), Some("chunked")));
}

per_engine!(a_streamed_upload_is_ingested_once, bad_parameters_are_precise_problems, uploads_past_the_limit_are_413);
