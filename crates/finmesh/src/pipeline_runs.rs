//! `finmesh pipeline open-run` and `finmesh pipeline status`: pipeline runs
//! on a running node, over `PUT`/`GET /v1/pipelines/runs/{run}`
//! (docs/api.md).
//!
//! `status` prints the run's state once (text, or the server's JSON with
//! `--json`); with `--watch` it polls until the run is complete or failed,
//! drawing one progress bar per file and stage on a terminal (indicatif)
//! and printing a line per change otherwise. `--watch` exits with status 1
//! when the run failed.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::time::Duration;

use anyhow::{Context, bail};
use clap::Args;
use finmesh_pipeline::reconcile::{FileStatus, Phase, RunStatus, StageCount, time_fmt};
use indicatif::{MultiProgress, ProgressBar, ProgressDrawTarget, ProgressStyle};
use reqwest::Method;

use crate::client::{Client, ClientArgs, segment};

#[derive(Debug, Args)]
pub struct OpenRunArgs {
    /// The run id (1-64 of A-Z a-z 0-9 _ -).
    run: String,
    /// A slice and what it expects: `S=F1,F2` (file ids) or `S=3` (a number
    /// of files). Repeat for each slice.
    #[arg(long = "slice", value_name = "SLICE=FILES|COUNT", required = true)]
    slices: Vec<String>,
    /// The end of the run's window (RFC 3339).
    #[arg(long, conflicts_with = "window_s", required_unless_present = "window_s")]
    deadline: Option<String>,
    /// The window's length from now, in seconds.
    #[arg(long = "window-s")]
    window_s: Option<u64>,
    /// The pipeline.
    #[arg(long, default_value = "risk")]
    pipeline: String,
    #[command(flatten)]
    client: ClientArgs,
}

#[derive(Debug, Args)]
pub struct StatusArgs {
    /// The run id.
    run: String,
    /// The pipeline.
    #[arg(long, default_value = "risk")]
    pipeline: String,
    /// Follow the run until it is complete or failed (exit status 1 when failed).
    #[arg(long)]
    watch: bool,
    /// Milliseconds between polls with `--watch`.
    #[arg(long, default_value_t = 500)]
    interval_ms: u64,
    #[command(flatten)]
    client: ClientArgs,
}

fn path(run: &str, pipeline: &str) -> String {
    format!("/v1/pipelines/runs/{}?pipeline={}", segment(run), segment(pipeline))
}

/// The request body of `open-run`.
fn open_body(args: &OpenRunArgs) -> anyhow::Result<serde_json::Value> {
    let mut slices = serde_json::Map::new();
    for s in &args.slices {
        let (name, what) =
            s.split_once('=').with_context(|| format!("--slice {s:?}: expected SLICE=F1,F2 or SLICE=N"))?;
        let spec = match what.parse::<u32>() {
            Ok(n) => serde_json::json!({ "expected_files": n }),
            Err(_) => serde_json::json!({ "files": what.split(',').filter(|f| !f.is_empty()).collect::<Vec<_>>() }),
        };
        if slices.insert(name.to_owned(), spec).is_some() {
            bail!("--slice {name} is given twice");
        }
    }
    let mut body = serde_json::json!({ "slices": slices });
    match (&args.deadline, args.window_s) {
        (Some(d), _) => body["deadline"] = d.clone().into(),
        (None, Some(w)) => body["window_s"] = w.into(),
        (None, None) => bail!("give --deadline or --window-s"),
    }
    Ok(body)
}

pub async fn open_run(args: OpenRunArgs) -> anyhow::Result<()> {
    let client = Client::new(&args.client)?;
    let body = open_body(&args)?;
    let request = client.request(Method::PUT, &path(&args.run, &args.pipeline)).json(&body);
    let value = client.json(request).await?;
    print_status(&client, &value)
}

pub async fn status(args: StatusArgs) -> anyhow::Result<()> {
    let client = Client::new(&args.client)?;
    let get = || client.json(client.request(Method::GET, &path(&args.run, &args.pipeline)));
    if !args.watch {
        return print_status(&client, &get().await?);
    }
    let mut view = LiveView::new();
    loop {
        let value = get().await?;
        let status: RunStatus = serde_json::from_value(value.clone()).context("the server's run state")?;
        view.update(&status);
        if status.state.is_terminal() {
            view.finish();
            print_status(&client, &value)?;
            if status.state == Phase::Failed {
                bail!("run {} failed", status.run);
            }
            return Ok(());
        }
        tokio::time::sleep(Duration::from_millis(args.interval_ms.max(50))).await;
    }
}

fn print_status(client: &Client, value: &serde_json::Value) -> anyhow::Result<()> {
    if client.json {
        println!("{value}");
        return Ok(());
    }
    let status: RunStatus = serde_json::from_value(value.clone()).context("the server's run state")?;
    print!("{}", describe(&status));
    Ok(())
}

fn phase(p: Phase) -> String {
    serde_json::to_value(p).ok().and_then(|v| v.as_str().map(str::to_owned)).unwrap_or_default()
}

fn count(c: &StageCount) -> String {
    match c.expected {
        Some(e) => format!("{}/{e}", c.actual),
        None => format!("{}/?", c.actual),
    }
}

fn file_line(id: &str, f: &FileStatus) -> String {
    format!(
        "  file {id}: {}  raw {}  enriched {}  validated {}  (valid {}, exceptions: ingest {}, enrich {}, validate {})",
        phase(f.state),
        count(&f.raw),
        count(&f.enriched),
        count(&f.validated),
        f.valid_records,
        f.exceptions.ingest,
        f.exceptions.enrich,
        f.exceptions.validate
    )
}

/// The human form of a run's state.
pub fn describe(s: &RunStatus) -> String {
    let mut out = String::new();
    let when = match s.state_at {
        Some(t) => format!(" at {}", time_fmt::format(t)),
        None => String::new(),
    };
    let _ = writeln!(
        out,
        "run {} (pipeline {}): {}{when}; deadline {}",
        s.run,
        s.pipeline,
        phase(s.state),
        time_fmt::format(s.spec.deadline)
    );
    for (name, slice) in &s.slices {
        let _ = writeln!(
            out,
            "slice {name}: {} ({} of {} files)",
            phase(slice.state),
            slice.files.len(),
            slice.expected_files
        );
        for (id, f) in &slice.files {
            let _ = writeln!(out, "{}", file_line(id, f));
        }
        if !slice.missing.is_empty() {
            let _ = writeln!(out, "  missing: {}", slice.missing.join(", "));
        }
    }
    if !s.failures.is_empty() {
        let _ = writeln!(out, "failures:");
        for f in &s.failures {
            let _ = writeln!(out, "  - {f}");
        }
    }
    for (what, list) in [("late", &s.late), ("unexpected", &s.unexpected)] {
        for n in list {
            let at = n.ingested_at.map(|t| format!(", ingested at {}", time_fmt::format(t))).unwrap_or_default();
            let rows = n.rows.map(|r| format!(", {r} rows")).unwrap_or_default();
            let _ = writeln!(out, "{what}: slice {} file {}{at}{rows}", n.slice, n.file);
        }
    }
    out
}

/// `--watch`: a bar per (file, stage) on a terminal, a line per change otherwise.
struct LiveView {
    multi: MultiProgress,
    bars: BTreeMap<(String, String, &'static str), ProgressBar>,
    last: String,
    terminal: bool,
}

impl LiveView {
    fn new() -> Self {
        let multi = MultiProgress::with_draw_target(ProgressDrawTarget::stderr());
        let terminal = !multi.is_hidden();
        LiveView { multi, bars: BTreeMap::new(), last: String::new(), terminal }
    }

    fn update(&mut self, s: &RunStatus) {
        if !self.terminal {
            let text = describe(s);
            if text != self.last {
                eprint!("{text}");
                self.last = text;
            }
            return;
        }
        let style = ProgressStyle::with_template("{prefix:>28} [{bar:30}] {pos}/{len} {msg}")
            .expect("a valid template")
            .progress_chars("=> ");
        for (slice_id, slice) in &s.slices {
            for (file_id, f) in &slice.files {
                for (stage, c) in [("raw", f.raw), ("enriched", f.enriched), ("validated", f.validated)] {
                    let key = (slice_id.clone(), file_id.clone(), stage);
                    let bar = self.bars.entry(key).or_insert_with(|| {
                        let b = self.multi.add(ProgressBar::new(0));
                        b.set_style(style.clone());
                        b.set_prefix(format!("{slice_id}/{file_id} {stage}"));
                        b
                    });
                    bar.set_length(c.expected.unwrap_or(c.actual.max(1)));
                    bar.set_position(c.actual);
                    bar.set_message(if c.complete { "complete".to_owned() } else { phase(f.state) });
                }
            }
        }
    }

    fn finish(&self) {
        for b in self.bars.values() {
            b.finish();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn open_run_flags_become_the_api_body() {
        let args = OpenRunArgs {
            run: "r".into(),
            slices: vec!["s1=a,b".into(), "s2=3".into()],
            deadline: None,
            window_s: Some(60),
            pipeline: "risk".into(),
            client: ClientArgs { server: String::new(), token: None, ca_cert: None, json: false },
        };
        let body = open_body(&args).unwrap();
        assert_eq!(
            body,
            serde_json::json!({"slices": {"s1": {"files": ["a", "b"]}, "s2": {"expected_files": 3}}, "window_s": 60})
        );
        let bad = OpenRunArgs { slices: vec!["s1".into()], ..args };
        assert!(open_body(&bad).unwrap_err().to_string().contains("SLICE=F1,F2"));
    }
}
