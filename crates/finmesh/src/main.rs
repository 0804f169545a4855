//! The `finmesh` binary.
//!
//! Subcommands:
//! - `finmesh demo`: open an embedded engine under `./finmesh-data`, create
//!   a `demo` stream and KV bucket, and tail the stream live while a
//!   background task publishes once a second, until Ctrl-C ([`demo`]).
//!
//! - `finmesh audit`: prove fan-out lossless end to end (subscribers,
//!   a feed, a forced reconnect and a node restart) ([`audit`]).
//! - `finmesh feed`: simulate the central market-data server feeding a
//!   node, failing over between receivers ([`feed`]).
//!
//! - `finmesh pipeline gen` and `finmesh pipeline rules check`: the
//!   risk-feed tools that run locally, no node needed ([`pipeline`]);
//!   `pipeline ingest | run | worker | watch | rules apply` and `finmesh refdata
//!   load` need a node or an engine ([`pipeline_cmds`], [`pipeline_node`]).
//!
//! The benchmark harness is a binary of its own (`finmesh-bench`, crate
//! `finmesh-bench`), so that this one links no benchmark or test-kit code.
//!
//! `finmesh serve` (the gateway) comes with a later issue. Errors here are
//! `anyhow`; the libraries below have typed errors.

mod audit;
mod client;
mod config;
mod demo;
mod direct_sse;
mod feed;
mod keys;
mod pipeline;
mod pipeline_cmds;
mod pipeline_node;
mod pipeline_runs;
mod reconcile_task;
mod security;
mod serve;
mod serving;
mod tls;
mod tokens;

/// mimalloc instead of glibc malloc: the write path allocates per message,
/// and glibc's malloc/free took ~38% of a publish-batch profile.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

use clap::{Parser, Subcommand};
use tracing_subscriber::EnvFilter;

/// finmesh: durable streams, KV and fan-out in one binary.
#[derive(Debug, Parser)]
#[command(name = "finmesh", version, about)]
struct Cli {
    /// Log filter (tracing `EnvFilter` syntax), e.g. `info`, `finmesh=debug`.
    /// [default: `info` for serve, `warn` otherwise]
    #[arg(long, global = true, env = "FINMESH_LOG")]
    log: Option<String>,
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run a node: the HTTP API on the configured engine.
    Serve(serve::ServeArgs),
    /// Open an embedded engine, publish to a `demo` stream and tail it live until Ctrl-C.
    Demo(demo::DemoArgs),
    /// Check a configuration file and explain every problem in it.
    Config {
        #[command(subcommand)]
        command: ConfigCommand,
    },
    /// TLS certificates for local use.
    Certs {
        #[command(subcommand)]
        command: CertsCommand,
    },
    /// Bearer tokens signed with this node's key.
    Token {
        #[command(subcommand)]
        command: TokenCommand,
    },
    /// OAuth client credentials.
    Oauth {
        #[command(subcommand)]
        command: OauthCommand,
    },
    /// Key-value buckets on a running node.
    Kv {
        #[command(flatten)]
        client: client::ClientArgs,
        #[command(subcommand)]
        command: client::KvCommand,
    },
    /// Streams on a running node.
    Stream {
        #[command(flatten)]
        client: client::ClientArgs,
        #[command(subcommand)]
        command: client::StreamCommand,
    },
    /// Durable consumers on a running node.
    Consumer {
        #[command(flatten)]
        client: client::ClientArgs,
        #[command(subcommand)]
        command: client::ConsumerCommand,
    },
    /// Prove fan-out lossless: K subscribers, a feed, a forced reconnect and a
    /// node restart; every subscriber must get every sequence once, in order.
    Audit(audit::AuditArgs),
    /// Simulate the central market-data server: feed ticks to a node, failing over between receivers.
    Feed {
        #[command(flatten)]
        client: client::ClientArgs,
        #[command(flatten)]
        args: feed::FeedArgs,
    },
    /// The risk-feed pipeline: generate a feed, check or apply rules, ingest, run the stages.
    Pipeline {
        #[command(subcommand)]
        command: pipeline::PipelineCommand,
    },
    /// Key management: create the key ring, list, rotate, retire keys.
    Keys {
        #[command(flatten)]
        client: client::ClientArgs,
        #[command(subcommand)]
        command: keys::KeysCommand,
    },
    /// Reference data of the pipeline's enrich and validate stages.
    Refdata {
        #[command(subcommand)]
        command: RefdataCommand,
    },
}

#[derive(Debug, Subcommand)]
enum RefdataCommand {
    /// Load a CSV file as one version of a dataset (directly on the configured engine).
    Load(pipeline_cmds::RefdataLoadArgs),
}

#[derive(Debug, Subcommand)]
enum ConfigCommand {
    /// Parse and validate the configuration (file, FINMESH_* variables, flags).
    Check(config::ConfigOverrides),
}

#[derive(Debug, Subcommand)]
enum TokenCommand {
    /// Issue a token with the given scopes (printed on standard output).
    Issue(tokens::IssueArgs),
}

#[derive(Debug, Subcommand)]
enum OauthCommand {
    /// Hash a client secret (stdin, or --generate) for the clients file.
    HashSecret(tokens::HashSecretArgs),
}

#[derive(Debug, Subcommand)]
enum CertsCommand {
    /// Write a self-signed certificate and key for localhost.
    Dev(tls::DevCertArgs),
}

fn main() -> std::process::ExitCode {
    let runtime = match tokio::runtime::Builder::new_multi_thread().enable_all().build() {
        Ok(runtime) => runtime,
        Err(e) => {
            eprintln!("error: cannot start the async runtime: {e}");
            return std::process::ExitCode::FAILURE;
        }
    };
    // One line per cause, no backtrace: these are operator-facing errors.
    match runtime.block_on(run()) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

async fn run() -> anyhow::Result<()> {
    let cli = Cli::parse();
    // One TLS crypto provider for the whole process (see CRATES.md); an
    // error only means one is installed already.
    let _ = rustls::crypto::aws_lc_rs::default_provider().install_default();
    let command = match cli.command {
        // serve (and `pipeline run`, a node) sets up logging itself, in the configured format.
        Command::Serve(args) => return serve::run(args, cli.log.as_deref().unwrap_or("info")).await,
        Command::Pipeline { command: pipeline::PipelineCommand::Run(args) } => {
            return serve::run(args.serve_args(), cli.log.as_deref().unwrap_or("info")).await;
        }
        other => other,
    };
    let filter = cli.log.as_deref().unwrap_or("warn");
    tracing_subscriber::fmt()
        .with_env_filter(EnvFilter::try_new(filter).unwrap_or_else(|_| EnvFilter::new("warn")))
        .with_writer(std::io::stderr)
        .init();

    match command {
        Command::Serve(_) => Ok(()),
        Command::Demo(args) => demo::run(args).await,
        Command::Config { command: ConfigCommand::Check(overrides) } => config_check(&overrides),
        Command::Certs { command: CertsCommand::Dev(args) } => {
            let written = tls::write_dev_pair(&args)?;
            println!("wrote {} and {}", written.cert.display(), written.key.display());
            println!(
                "serve with: finmesh serve --tls-cert {} --tls-key {}",
                written.cert.display(),
                written.key.display()
            );
            Ok(())
        }
        Command::Token { command: TokenCommand::Issue(args) } => tokens::issue(&args),
        Command::Oauth { command: OauthCommand::HashSecret(args) } => tokens::hash_secret(&args),
        Command::Kv { client, command } => client::commands_kv(&client::Client::new(&client)?, command).await,
        Command::Stream { client, command } => client::commands_stream(&client::Client::new(&client)?, command).await,
        Command::Consumer { client, command } => {
            client::commands_consumer(&client::Client::new(&client)?, command).await
        }
        Command::Audit(args) => audit::run(args).await,
        Command::Pipeline { command } => pipeline::run(command).await,
        Command::Feed { client, args } => feed::run(&client, &args).await,
        Command::Keys { client, command } => keys::run(&client, command).await,
        Command::Refdata { command: RefdataCommand::Load(args) } => pipeline_cmds::refdata_load(args).await,
    }
}

/// `finmesh config check`: every problem, one per line; exit 1 when any.
fn config_check(overrides: &config::ConfigOverrides) -> anyhow::Result<()> {
    let config = config::ServeConfig::load(overrides)?;
    let problems = config.validate();
    if problems.is_empty() {
        println!("configuration is valid");
        return Ok(());
    }
    for problem in &problems {
        eprintln!("error: {problem}");
    }
    anyhow::bail!("{} problem(s) in the configuration", problems.len())
}
