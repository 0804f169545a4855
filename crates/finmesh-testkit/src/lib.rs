//! finmesh-testkit: real peer servers for tests and benchmarks.
//!
//! finmesh's tests run against real `nats-server` and `redis-server`
//! processes, never mocks of them (STYLE.md, principle 10). This crate starts
//! them on free loopback ports with their data in temporary directories, waits
//! until they actually serve (by polling, with a deadline, never by sleeping a
//! fixed time), and kills them when the handle is dropped, also when a test
//! panics.
//!
//! Read in this order:
//! 1. [`error`] — what can go wrong, with the server's last log lines attached;
//! 2. [`binary`] — how a server binary is found (`FINMESH_*` env var, then `PATH`);
//! 3. [`process`] — one child process: log file, SIGTERM/SIGKILL, kill on drop;
//! 4. [`ports`] and [`probe`] — free ports and readiness probes;
//! 5. [`nats`] — [`NatsServer`], [`NatsCluster`] and [`HubAndLeaves`] (a hub
//!    cluster with leaf sites), with a config generator for all of them;
//! 6. [`proxy`] — [`DelayProxy`], a TCP link with latency, jitter and cuts;
//! 7. [`redis`] — [`RedisServer`].
//!
//! ```no_run
//! # async fn f() -> finmesh_testkit::Result<()> {
//! use finmesh_testkit::ManagedServer; // pid, stop, kill, restart
//! let mut nats = finmesh_testkit::NatsServer::start().await?;
//! let url = nats.url(); // nats://127.0.0.1:<free port>
//! nats.kill().await?; // SIGKILL, as a crash would
//! nats.restart().await?; // same port, same store dir
//! # Ok(()) }
//! ```

pub mod binary;
pub mod error;
pub mod nats;
pub mod ports;
pub mod probe;
pub mod process;
pub mod proxy;
pub mod redis;

pub use error::{Error, Result};
pub use nats::{
    ClusterSpec, HUB_DOMAIN, HubAndLeaves, HubAndLeavesBuilder, LeafSite, NatsCluster, NatsConfig, NatsServer,
    NatsServerBuilder, until_placed, until_routed,
};
pub use process::ManagedServer;
pub use proxy::{DelayProxy, DelayProxyBuilder};
pub use redis::{RedisServer, RedisServerBuilder};
