//! The `finmesh-bench` binary: the benchmark harness of [`finmesh_bench`]
//! as a command line. `finmesh-bench --scenario fsync --runs 3` runs one
//! family; `finmesh-bench --help` lists them all.
//!
//! It is a binary of its own, not a `finmesh` subcommand, so that the
//! shipped `finmesh` links no benchmark code and no test kit; the gateway
//! scenarios still measure the shipped binary, started as `finmesh serve`
//! (see `finmesh_bench::finmesh_binary` for which one).

/// The same allocator as `finmesh`: in-process figures (embedded engine,
/// NATS engine) compare with the gateway's.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

use clap::{Parser, Subcommand};
use tracing_subscriber::EnvFilter;

/// Benchmark finmesh (embedded engine, NATS engine, gateway) side by side
/// with the disk's fsync ceiling, nats-server and nginx, in one run.
#[derive(Debug, Parser)]
#[command(name = "finmesh-bench", version, about, args_conflicts_with_subcommands = true)]
struct Cli {
    /// Log filter (tracing `EnvFilter` syntax).
    #[arg(long, global = true, env = "FINMESH_LOG", default_value = "warn")]
    log: String,
    #[command(flatten)]
    bench: finmesh_bench::BenchArgs,
    #[command(subcommand)]
    child: Option<Child>,
}

#[derive(Debug, Subcommand)]
enum Child {
    /// Internal: one phase of a benchmark in a fresh process (clean memory figures).
    #[command(name = "__bench-child", hide = true)]
    BenchChild(finmesh_bench::ChildArgs),
}

fn main() -> std::process::ExitCode {
    let cli = Cli::parse();
    // One TLS crypto provider for the whole process (see CRATES.md); an
    // error only means one is installed already.
    let _ = rustls::crypto::aws_lc_rs::default_provider().install_default();
    tracing_subscriber::fmt()
        .with_env_filter(EnvFilter::try_new(&cli.log).unwrap_or_else(|_| EnvFilter::new("warn")))
        .with_writer(std::io::stderr)
        .init();
    let runtime = match tokio::runtime::Builder::new_multi_thread().enable_all().build() {
        Ok(runtime) => runtime,
        Err(e) => {
            eprintln!("error: cannot start the async runtime: {e}");
            return std::process::ExitCode::FAILURE;
        }
    };
    let result = runtime.block_on(async {
        match cli.child {
            Some(Child::BenchChild(args)) => finmesh_bench::run_child(args).await,
            None => finmesh_bench::run(cli.bench).await,
        }
    });
    match result {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}
