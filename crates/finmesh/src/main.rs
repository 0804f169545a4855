//! The `finmesh` binary.
//!
//! Subcommands:
//! - `finmesh demo`: open an embedded engine under `./finmesh-data`, create
//!   a `demo` stream and KV bucket, and tail the stream live while a
//!   background task publishes once a second, until Ctrl-C ([`demo`]);
//! - `finmesh bench`: the embedded engine side by side with the disk's fsync
//!   ceiling and a real nats-server, in one run ([`mod@bench`]).
//!
//! `finmesh serve` (the gateway) comes with a later issue. Errors here are
//! `anyhow`; the libraries below have typed errors.

mod bench;
mod demo;

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
    #[arg(long, global = true, env = "FINMESH_LOG", default_value = "warn")]
    log: String,
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Open an embedded engine, publish to a `demo` stream and tail it live until Ctrl-C.
    Demo(demo::DemoArgs),
    /// Benchmark the embedded engine against the disk and nats-server, side by side.
    Bench(bench::BenchArgs),
    /// Internal: one phase of a benchmark in a fresh process (clean memory figures).
    #[command(name = "__bench-child", hide = true)]
    BenchChild(bench::ChildArgs),
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    tracing_subscriber::fmt()
        .with_env_filter(EnvFilter::try_new(&cli.log).unwrap_or_else(|_| EnvFilter::new("warn")))
        .with_writer(std::io::stderr)
        .init();
    // One TLS crypto provider for the whole process (see CRATES.md); an
    // error only means one is installed already.
    let _ = rustls::crypto::aws_lc_rs::default_provider().install_default();

    match cli.command {
        Command::Demo(args) => demo::run(args).await,
        Command::Bench(args) => bench::run(args).await,
        Command::BenchChild(args) => bench::run_child(args).await,
    }
}
