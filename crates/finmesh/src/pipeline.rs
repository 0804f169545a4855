//! `finmesh pipeline`: the risk-feed commands; those here run locally, without a node.
//!
//! - `finmesh pipeline gen`: a generated risk feed (CSV, the columns of
//!   `examples/pipeline/risk.avsc`) with chosen shares of bad and
//!   rule-failing rows ([`finmesh_pipeline::feedgen`]); what was generated
//!   goes to standard error, so the CSV can go to standard output;
//! - `ingest`, `run`, `worker`, `watch` and `rules apply`, which need a node or an
//!   engine, are in [`crate::pipeline_cmds`];
//! - `finmesh pipeline rules check`: a rules file type-checked against an
//!   Avro schema and the named reference datasets
//!   ([`finmesh_rules::check_file`]); a one-line summary, or every error
//!   with its line, column and a caret, and exit status 1;
//! - `finmesh pipeline open-run` / `status`: runs on a running node
//!   ([`crate::pipeline_runs`]).

use std::io::{self, Write};
use std::path::PathBuf;

use anyhow::Context as _;
use clap::{Args, Subcommand};
use finmesh_pipeline::feedgen::{self, GenOptions, GenSummary, RuleFailShares};
use finmesh_rules::{Datasets, KeyType};

#[derive(Debug, Subcommand)]
pub enum PipelineCommand {
    /// Write a generated risk feed (CSV); what was generated goes to standard error.
    Gen(GenArgs),
    /// Validation rules files.
    Rules {
        #[command(subcommand)]
        command: RulesCommand,
    },
    /// Upload a CSV file to a running node (streamed), with a progress bar and a summary.
    Ingest(crate::pipeline_cmds::IngestArgs),
    /// Run a node (as `finmesh serve`) that also runs every stage of the pipeline.
    Run(crate::pipeline_cmds::RunArgs),
    /// Run one stage against the configured engine (scale-out on NATS).
    Worker(crate::pipeline_cmds::WorkerArgs),
    /// Watch a directory: ingest each complete file once (moved to done/ or failed/).
    Watch(crate::pipeline_cmds::WatchArgs),
    /// Open a run on a running node: its slices, expected files and time window.
    OpenRun(crate::pipeline_runs::OpenRunArgs),
    /// A run's reconciliation state on a running node; `--watch` follows it live.
    Status(crate::pipeline_runs::StatusArgs),
}

#[derive(Debug, Subcommand)]
pub enum RulesCommand {
    /// Type-check a rules file against an Avro schema; print a summary or every error.
    Check(CheckArgs),
    /// Check a rules file against the node's schema and store it: runs that start later use it.
    Apply(crate::pipeline_cmds::ApplyArgs),
}

#[derive(Debug, Args)]
pub struct GenArgs {
    /// Data rows to write (after the header).
    #[arg(long)]
    rows: u64,
    /// Seed of the generator: the same seed and options give the same bytes. [default: random]
    #[arg(long)]
    seed: Option<u64>,
    /// Share of rows (0..=1) that do not fit the schema (ingest exceptions).
    #[arg(long, default_value_t = 0.0)]
    bad_share: f64,
    /// Share of rows (0..=1) that fit the schema but fail each of the four
    /// issue rules (notional_positive, ccy_known, maturity, cpty).
    #[arg(long, default_value_t = 0.0)]
    rule_fail_share: f64,
    /// The `as_of` of every row (RFC 3339, 2024-01-01 ..= 2050-12-31).
    #[arg(long, default_value = "2026-12-01T18:00:00Z")]
    as_of: String,
    /// Output file, or `-` for standard output.
    #[arg(long, default_value = "-")]
    out: PathBuf,
    /// Print the summary as one JSON object (on standard error).
    #[arg(long)]
    json: bool,
}

#[derive(Debug, Args)]
pub struct CheckArgs {
    /// The rules file.
    rules: PathBuf,
    /// The Avro record schema (`.avsc`) the rules read.
    #[arg(long)]
    schema: PathBuf,
    /// A reference dataset the rules may look up, as `NAME=string` or
    /// `NAME=int` (its key type); repeat for each.
    #[arg(long = "dataset", value_name = "NAME=KIND", value_parser = parse_dataset)]
    datasets: Vec<(String, KeyType)>,
}

fn parse_dataset(s: &str) -> Result<(String, KeyType), String> {
    let (name, kind) = s.split_once('=').ok_or_else(|| format!("expected NAME=string or NAME=int, got {s:?}"))?;
    if name.is_empty() {
        return Err(format!("empty dataset name in {s:?}"));
    }
    let kind = match kind {
        "string" => KeyType::String,
        "int" => KeyType::Int,
        other => return Err(format!("key type {other:?} of dataset {name:?} is neither `string` nor `int`")),
    };
    Ok((name.to_string(), kind))
}

pub async fn run(command: PipelineCommand) -> anyhow::Result<()> {
    match command {
        PipelineCommand::Gen(args) => generate(&args),
        PipelineCommand::Rules { command: RulesCommand::Check(args) } => check(&args),
        PipelineCommand::Rules { command: RulesCommand::Apply(args) } => crate::pipeline_cmds::apply(args).await,
        PipelineCommand::Ingest(args) => crate::pipeline_cmds::ingest(args).await,
        PipelineCommand::Worker(args) => crate::pipeline_cmds::worker(args).await,
        PipelineCommand::Watch(args) => crate::pipeline_cmds::watch(args).await,
        // Dispatched by main as a node (it sets up logging like `serve`).
        PipelineCommand::Run(args) => crate::serve::run(args.serve_args(), "info").await,
        PipelineCommand::OpenRun(args) => crate::pipeline_runs::open_run(args).await,
        PipelineCommand::Status(args) => crate::pipeline_runs::status(args).await,
    }
}

fn generate(args: &GenArgs) -> anyhow::Result<()> {
    let share = args.rule_fail_share;
    let opts = GenOptions {
        rows: args.rows,
        seed: args.seed.unwrap_or_else(|| fastrand::u64(..)),
        bad_share: args.bad_share,
        rule_fail: RuleFailShares {
            notional_not_positive: share,
            unknown_currency: share,
            maturity_out_of_range: share,
            counterparty_null_or_desk_not_rates_fx: share,
        },
        as_of: args.as_of.clone(),
    };
    // Refuse bad options before an output file is created.
    feedgen::generate(io::sink(), &GenOptions { rows: 0, ..opts.clone() }).context("invalid options")?;
    let summary = if args.out.as_os_str() == "-" {
        let mut out = io::BufWriter::new(io::stdout().lock());
        let summary = feedgen::generate(&mut out, &opts)?;
        out.flush()?;
        summary
    } else {
        let file = std::fs::File::create(&args.out).with_context(|| format!("cannot create {}", args.out.display()))?;
        let mut out = io::BufWriter::new(file);
        let summary = feedgen::generate(&mut out, &opts).with_context(|| format!("writing {}", args.out.display()))?;
        out.flush().with_context(|| format!("writing {}", args.out.display()))?;
        summary
    };
    if args.json {
        let mut value = serde_json::to_value(&summary)?;
        value["seed"] = opts.seed.into();
        eprintln!("{value}");
    } else {
        eprint!("{}", describe(&summary, opts.seed));
    }
    Ok(())
}

/// The human summary of `pipeline gen`.
fn describe(s: &GenSummary, seed: u64) -> String {
    format!(
        "{} rows, {} bytes, seed {seed}\n\
         good: {}\n\
         bad (ingest exceptions): {} (unparseable_number {}, bad_date {}, missing_required {}, missing_field {})\n\
         failing one rule: {} (notional_positive {}, ccy_known {}, maturity {}, cpty {})\n",
        s.rows,
        s.bytes,
        s.good,
        s.bad,
        s.unparseable_number,
        s.bad_date,
        s.missing_required,
        s.missing_field,
        s.rule_fails,
        s.notional_not_positive,
        s.unknown_currency,
        s.maturity_out_of_range,
        s.counterparty_null_or_desk_not_rates_fx,
    )
}

fn check(args: &CheckArgs) -> anyhow::Result<()> {
    let mut datasets = Datasets::new();
    for (name, kind) in &args.datasets {
        datasets.add(name.clone(), *kind);
    }
    match finmesh_rules::check_file(&args.rules, &args.schema, &datasets) {
        Ok(summary) => {
            println!("{}: {summary}", args.rules.display());
            Ok(())
        }
        Err(errors) => {
            for e in &errors {
                eprint!("{}", e.text);
            }
            anyhow::bail!("{} error(s) in {}", errors.len(), args.rules.display())
        }
    }
}
