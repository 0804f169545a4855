//! `PUT`/`GET /v1/pipelines/runs/{run}`: opening a run, reading the state
//! the reconciler keeps, precise 400/404/409 problems. The reconciler runs
//! beside the gateway on the same engine; the records it counts are
//! published straight into the stage streams as the wire contract says.

mod support;

use std::time::Duration;

use finmesh_core::{OutgoingMessage, Timestamp};
use finmesh_pipeline::reconcile::{FileRef, Names, Reconciler, ReconcilerConfig, Source, time_fmt, worker};
use serde_json::json;
use support::{Gw, Harness};
use tokio_util::sync::CancellationToken;

const RUN: &str = "/v1/pipelines/runs/r1";

fn spec() -> String {
    json!({"slices": {"s1": {"files": ["a"]}}, "window_s": 600}).to_string()
}

async fn a_run_is_opened_and_read_back<H: Harness>() {
    let gw = Gw::start::<H>().await;
    gw.get(RUN).await.assert_problem(404, "not-found");
    let r = gw.put(RUN, spec()).await;
    assert_eq!(r.status, 200, "{}", r.text());
    let opened = r.json();
    assert_eq!((opened["run"].as_str(), opened["state"].as_str()), (Some("r1"), Some("open")));
    assert_eq!(opened["slices"]["s1"]["missing"], json!(["a"]));
    let r = gw.get(RUN).await;
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.json(), opened);
    // Another pipeline has no such run.
    gw.get("/v1/pipelines/runs/r1?pipeline=other").await.assert_problem(404, "not-found");
}

async fn bad_requests_are_precise_problems<H: Harness>() {
    let gw = Gw::start::<H>().await;
    let p = gw.get("/v1/pipelines/runs/bad.id").await.assert_problem(400, "invalid");
    assert!(p["detail"].as_str().unwrap().contains("run id `bad.id`"), "{p}");
    let p = gw.get("/v1/pipelines/runs/r?pipeline=no%20pe").await.assert_problem(400, "invalid");
    assert!(p["detail"].as_str().unwrap().contains("pipeline name"), "{p}");
    let p = gw.put(RUN, "{").await.assert_problem(400, "invalid");
    assert!(p["detail"].as_str().unwrap().contains("bad run body"), "{p}");
    let body = json!({"slices": {"s": {}}, "window_s": 0}).to_string();
    let p = gw.put(RUN, body).await.assert_problem(400, "invalid");
    let detail = p["detail"].as_str().unwrap();
    assert!(detail.contains("slice `s`: give `files`") && detail.contains("window_s must be at least 1"), "{p}");
    assert_eq!(gw.put(RUN, spec()).await.status, 200);
    assert_eq!(gw.put(RUN, spec()).await.status, 200, "the same spec again");
    let other = json!({"slices": {"s1": {"expected_files": 2}}, "window_s": 600}).to_string();
    gw.put(RUN, other).await.assert_problem(409, "already-exists");
}

async fn the_reconciled_state_is_served<H: Harness>() {
    let gw = Gw::start::<H>().await;
    let engine = gw.state.engine().clone();
    let names = Names::new("risk").unwrap();
    worker::ensure_streams(&*engine, &names).await.unwrap();
    assert_eq!(gw.put(RUN, spec()).await.status, 200);
    let shutdown = CancellationToken::new();
    let mut config = ReconcilerConfig::new("risk");
    config.fetch_wait = Duration::from_millis(50);
    config.refresh = Duration::from_millis(100);
    let task = tokio::spawn(Reconciler::run(engine.clone(), config, shutdown.clone()));

    let file = FileRef::new("r1", "s1", "a").unwrap();
    for source in [Source::Raw, Source::Enriched, Source::Validated] {
        let msgs = (1..=3)
            .map(|row| {
                let mut m = OutgoingMessage::new(names.file_subject(source, &file), &b"avro"[..])
                    .with_msg_id(format!("a:{row}"))
                    .unwrap();
                for (k, v) in [("Finmesh-Run", "r1"), ("Finmesh-Slice", "s1"), ("Finmesh-File", "a")] {
                    m.headers.insert(k, v).unwrap();
                }
                m.headers.insert("Finmesh-Row", row.to_string()).unwrap();
                m
            })
            .collect();
        engine.publish_batch(&names.stream(source), msgs).await.unwrap();
    }
    let event = json!({"type": "file_ingested", "run": "r1", "slice": "s1", "file": "a",
        "rows": 3, "records": 3, "exceptions": 0, "at": time_fmt::format(Timestamp::now())});
    let m = OutgoingMessage::new(names.file_subject(Source::Events, &file), event.to_string())
        .with_msg_id("a:ingested")
        .unwrap();
    engine.publish(&names.stream(Source::Events), m).await.unwrap();

    let end = tokio::time::Instant::now() + Duration::from_secs(30);
    let state = loop {
        let r = gw.get(RUN).await;
        assert_eq!(r.status, 200, "{}", r.text());
        if r.json()["state"] == "complete" {
            break r.json();
        }
        assert!(tokio::time::Instant::now() < end, "the run did not complete: {}", r.text());
        tokio::time::sleep(Duration::from_millis(25)).await;
    };
    let a = &state["slices"]["s1"]["files"]["a"];
    assert_eq!(a["validated"], json!({"expected": 3, "actual": 3, "complete": true}));
    assert_eq!(a["raw"]["actual"], 3);
    shutdown.cancel();
    task.await.unwrap().unwrap();
}

per_engine!(a_run_is_opened_and_read_back, bad_requests_are_precise_problems, the_reconciled_state_is_served);
