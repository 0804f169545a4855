//! `finmesh serve`: configuration → engine → auth → gateway → sockets,
//! and the drain on SIGTERM/SIGINT.
//!
//! Start-up order: load and validate the configuration (every problem at
//! once), fetch the master key (`[security]`, [`crate::security`]), set up
//! authentication, open the engine, load the key ring from it and wrap the
//! engine in the encrypting wrapper (`[security]`), bind the listener, start
//! the serving threads ([`crate::serving`]), then print `listening on <url>`
//! on standard output (tests and scripts wait for that line; with
//! `--listen 127.0.0.1:0` it carries the chosen port).
//!
//! Authentication, in order of precedence: `--insecure-no-auth` (off, loud
//! warning); an `[auth]` section; otherwise the node signs its own tokens
//! with a secret generated under the data dir, and on the start that creates
//! it writes an admin token to `<data dir>/admin-token` (mode 0600) and
//! prints that file's path, never the token (standard output ends up in
//! logs).
//!
//! Exposure ([`exposure`]), checked before anything is opened: a listener
//! that is not loopback without TLS starts with a warning; with
//! `--insecure-no-auth` it does not start at all, unless TLS is on or
//! `--insecure-no-auth-on-public-address` says so explicitly.
//!
//! Drain (invariant: an acked write is never lost): on the first SIGTERM or
//! SIGINT readiness fails at once, but the node keeps accepting and serving
//! for `lame_duck_ms` (so load balancers see the probe fail before
//! connections are refused); then every SSE/WebSocket subscriber gets
//! `reconnect` (with a jittered retry hint), the listener stops accepting,
//! in-flight requests get up to `drain_timeout_ms` to finish (connections
//! still open then are dropped), then the engine is closed (the embedded
//! engine fsyncs) and the process exits 0. A second signal, during the lame
//! duck period or the drain, stops at once.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use finmesh_auth::{Authenticator, ClientRegistry, TokenIssuer};
use finmesh_core::Engine;
use finmesh_embedded::EmbeddedEngine;
use finmesh_gateway::AppState;
use finmesh_nats::NatsEngine;
use tokio::signal::unix::{SignalKind, signal};
use tokio::sync::watch;

use crate::config::{ConfigOverrides, EngineKind, LogFormat, ServeConfig};
use crate::serving::{self, Phase};

/// Lifetime of the admin token printed on first start.
const ADMIN_TOKEN_TTL: Duration = Duration::from_secs(30 * 86_400);

/// Arguments of `finmesh serve`.
#[derive(Debug, clap::Args)]
pub struct ServeArgs {
    #[command(flatten)]
    pub config: ConfigOverrides,
    /// Turn authentication off: every request acts as an admin. Local
    /// experiments only: refused on a non-loopback address without TLS
    /// unless `--insecure-no-auth-on-public-address` is given too.
    #[arg(long)]
    pub insecure_no_auth: bool,
    /// With `--insecure-no-auth`: start even on a non-loopback address
    /// without TLS, where anyone who reaches the port is an admin.
    #[arg(long, requires = "insecure_no_auth")]
    pub insecure_no_auth_on_public_address: bool,
    /// Also run every stage of the pipeline this `pipeline.toml` describes
    /// (what `finmesh pipeline run` does).
    #[arg(long)]
    pub pipeline: Option<std::path::PathBuf>,
}

/// Whether `listen` may serve as asked; `Ok(Some(warning))` to start with a
/// warning. Pure, so the rules are unit-tested.
pub fn exposure(listen: SocketAddr, tls: bool, args: &ServeArgs) -> anyhow::Result<Option<String>> {
    if listen.ip().is_loopback() || tls {
        return Ok(None);
    }
    if args.insecure_no_auth && !args.insecure_no_auth_on_public_address {
        anyhow::bail!(
            "--insecure-no-auth on {listen}, which is not a loopback address, without TLS: anyone who reaches \
             it would be an admin. Listen on 127.0.0.1, turn TLS on, or add --insecure-no-auth-on-public-address"
        );
    }
    Ok(Some(format!(
        "listening on {listen} without TLS: tokens and data cross the network in clear; configure [tls] \
         (or --tls-cert/--tls-key)"
    )))
}

/// The engine `serve` opened, kept typed so it can be closed properly.
pub(crate) enum OpenEngine {
    Embedded(EmbeddedEngine),
    Nats(NatsEngine),
}

impl OpenEngine {
    pub(crate) async fn open(config: &ServeConfig) -> anyhow::Result<Self> {
        Ok(match config.engine {
            EngineKind::Embedded => {
                let dir = &config.data_dir;
                let options = config.embedded_options();
                let engine = tokio::task::block_in_place(|| EmbeddedEngine::open_with(dir, options))
                    .with_context(|| format!("opening the embedded engine in {}", dir.display()))?;
                OpenEngine::Embedded(engine)
            }
            EngineKind::Nats => {
                let options = config.nats.clone().context("engine = \"nats\" needs a [nats] section")?;
                OpenEngine::Nats(NatsEngine::connect(options).await.context("connecting to NATS")?)
            }
        })
    }

    pub(crate) fn shared(&self) -> Arc<dyn Engine> {
        match self {
            OpenEngine::Embedded(e) => Arc::new(e.clone()),
            OpenEngine::Nats(e) => Arc::new(e.clone()),
        }
    }

    pub(crate) async fn close(self) -> anyhow::Result<()> {
        match self {
            OpenEngine::Embedded(e) => e.close().await.context("closing the embedded engine"),
            OpenEngine::Nats(e) => e.close().await.context("closing the NATS connection"),
        }
    }
}

/// Install the tracing subscriber in the configured format.
fn init_logging(filter: &str, format: LogFormat) {
    let filter =
        tracing_subscriber::EnvFilter::try_new(filter).unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr);
    match format {
        LogFormat::Text => builder.init(),
        LogFormat::Json => builder.json().init(),
    }
}

/// The token verifier, and the OAuth client registry when `[auth]` names a
/// clients file (then `POST /oauth/token` is served).
fn authenticator(
    config: &ServeConfig,
    insecure_no_auth: bool,
) -> anyhow::Result<(Authenticator, Option<Arc<ClientRegistry>>)> {
    if insecure_no_auth {
        tracing::warn!("--insecure-no-auth: authentication is OFF, every request acts as an admin");
        eprintln!("WARNING: --insecure-no-auth: authentication is OFF, every request acts as an admin");
        return Ok((Authenticator::disabled(), None));
    }
    if let Some(auth) = &config.auth {
        let verifier = Authenticator::from_config(auth).context("setting up authentication from [auth]")?;
        let clients = match &auth.clients_file {
            None => None,
            Some(path) => {
                let issuer = TokenIssuer::from_config(auth).context("[auth] clients_file needs [auth.signing]")?;
                let registry = ClientRegistry::load(path, Arc::new(issuer))
                    .with_context(|| format!("loading the OAuth clients file {}", path.display()))?;
                tracing::info!(clients = registry.len(), "POST /oauth/token is served");
                Some(Arc::new(registry))
            }
        };
        return Ok((verifier, clients));
    }
    std::fs::create_dir_all(&config.data_dir)
        .with_context(|| format!("creating the data directory {}", config.data_dir.display()))?;
    let secret = config.data_dir.join(finmesh_auth::DEFAULT_SECRET_FILE);
    let node = finmesh_auth::bootstrap_node_auth(&secret, ADMIN_TOKEN_TTL)
        .with_context(|| format!("setting up the node secret {}", secret.display()))?;
    if let Some(token) = &node.admin_token {
        let path = crate::tokens::write_admin_token(&config.data_dir, &token.token)?;
        println!("admin token (valid 30 days) written to {}", path.display());
        println!("issue more with: finmesh token issue --sub <who> --scope <scope>");
    }
    Ok((node.authenticator, None))
}

pub async fn run(args: ServeArgs, log_filter: &str) -> anyhow::Result<()> {
    let config = ServeConfig::load(&args.config)?;
    init_logging(log_filter, config.log_format);
    let problems = config.validate();
    if !problems.is_empty() {
        let list: Vec<String> = problems.iter().map(ToString::to_string).collect();
        anyhow::bail!("the configuration has {} problem(s):\n  {}", list.len(), list.join("\n  "));
    }
    let listen: SocketAddr = config.listen.parse().context("listen")?;
    let tls = config.tls.as_ref().map(crate::tls::server_config).transpose()?;
    if let Some(warning) = exposure(listen, tls.is_some(), &args)? {
        tracing::warn!("{warning}");
        eprintln!("WARNING: {warning}");
    }
    // The master key first: a missing or unreadable key stops the node
    // before anything (data dir, engine) is touched.
    let master = match &config.security {
        Some(security) => Some(crate::security::MasterKeySource::check(security).await?),
        None => None,
    };
    let (auth, oauth) = authenticator(&config, args.insecure_no_auth)?;
    let engine = OpenEngine::open(&config).await?;
    let (shared, keys) = match &master {
        None => (engine.shared(), None),
        Some(master) => match master.wrap(engine.shared()).await {
            Ok((wrapped, keys)) => (wrapped, Some(keys)),
            Err(e) => {
                engine.close().await?;
                return Err(e);
            }
        },
    };
    // Pipeline stages (if any) run on the engine itself: their buckets and
    // streams carry no security options.
    let (stop_stages, stop_rx) = watch::channel(false);
    let mut reconcile = config.reconcile.clone();
    let stages = match &args.pipeline {
        None => Vec::new(),
        Some(path) => {
            let loaded = crate::pipeline_node::load(path)?;
            // A node that runs a pipeline's stages reconciles its runs too.
            let name = loaded.pipeline.name().to_owned();
            if !reconcile.pipelines.contains(&name) {
                reconcile.pipelines.push(name);
            }
            crate::pipeline_node::define(&engine.shared(), &loaded).await?;
            let counts = [
                (finmesh_pipeline::stages::StageKind::Enrich, loaded.config.stages.enrich_workers),
                (finmesh_pipeline::stages::StageKind::Validate, loaded.config.stages.validate_workers),
            ];
            let mut tasks =
                crate::pipeline_node::start_stages(engine.shared(), &loaded, &counts, stop_rx.clone()).await?;
            tasks.extend(crate::pipeline_node::start_watch(engine.shared(), &loaded, stop_rx).await?);
            tasks
        }
    };
    let mut state = AppState::new(shared, auth, config.gateway()?);
    if let Some(clients) = oauth {
        state = state.with_oauth(clients);
    }
    // Keep the ring current: rotations made through another gateway.
    let follow = match keys {
        Some(admin) => {
            let keys = admin.keys().clone();
            state = state.with_key_admin(admin);
            Some(tokio::spawn(async move { keys.follow().await }))
        }
        None => None,
    };
    let app = finmesh_gateway::app(state.clone());
    let stop_reconcilers = tokio_util::sync::CancellationToken::new();
    let reconcilers = reconcile.spawn(engine.shared(), stop_reconcilers.clone());

    let listener = std::net::TcpListener::bind(listen).with_context(|| format!("binding {listen}"))?;
    listener.set_nonblocking(true)?;
    let local = listener.local_addr()?;
    let threads = config.serve_threads();
    let (phase, phase_rx) = watch::channel(Phase::Serving);
    let secure = tls.is_some();
    let limits = config.connection_limits();
    let servers = serving::start(listener, tls.map(Arc::new), app, threads, limits, phase_rx)?;
    let drain = tokio::spawn(drain_on_signal(state, phase, config.lame_duck(), config.drain_timeout()));

    let scheme = if secure { "https" } else { "http" };
    println!("listening on {scheme}://{local}");
    tracing::info!(%local, engine = ?config.engine, tls = secure, threads, "finmesh serving");
    servers.wait().await;
    drain.abort();
    if let Some(follow) = follow {
        follow.abort();
    }
    // Stages finish their current step (publish, then ack) before the engine closes.
    let _ = stop_stages.send(true);
    for stage in stages {
        let _ = stage.await;
    }
    stop_reconcilers.cancel();
    for r in reconcilers {
        let _ = r.await;
    }
    engine.close().await?;
    tracing::info!("finmesh stopped");
    Ok(())
}

/// Wait for SIGTERM/SIGINT, then fail readiness for the lame duck period,
/// then drain; after the deadline, or a second signal, stop at once.
async fn drain_on_signal(state: AppState, phase: watch::Sender<Phase>, lame_duck: Duration, deadline: Duration) {
    let (Ok(mut term), Ok(mut int)) = (signal(SignalKind::terminate()), signal(SignalKind::interrupt())) else {
        tracing::error!("cannot install signal handlers; drain on signal is unavailable");
        return;
    };
    tokio::select! {
        _ = term.recv() => {}
        _ = int.recv() => {}
    }
    tracing::info!(lame_duck_ms = lame_duck.as_millis() as u64, "signal received: not ready, still accepting");
    state.withdraw_readiness();
    tokio::select! {
        _ = term.recv() => return stop_now(&phase),
        _ = int.recv() => return stop_now(&phase),
        _ = tokio::time::sleep(lame_duck) => {}
    }
    tracing::info!(deadline_ms = deadline.as_millis() as u64, "draining");
    state.begin_drain();
    let _ = phase.send(Phase::Draining);
    tokio::select! {
        _ = term.recv() => tracing::warn!("second signal: stopping now"),
        _ = int.recv() => tracing::warn!("second signal: stopping now"),
        _ = tokio::time::sleep(deadline) => tracing::warn!("drain deadline passed: closing the remaining connections"),
    }
    let _ = phase.send(Phase::Stop);
}

/// A second signal: drop every connection now.
fn stop_now(phase: &watch::Sender<Phase>) {
    tracing::warn!("second signal: stopping now");
    let _ = phase.send(Phase::Stop);
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(insecure_no_auth: bool, public: bool) -> ServeArgs {
        ServeArgs {
            config: ConfigOverrides::default(),
            insecure_no_auth,
            insecure_no_auth_on_public_address: public,
            pipeline: None,
        }
    }

    #[test]
    fn exposure_rules() {
        let loopback: SocketAddr = "127.0.0.1:8080".parse().unwrap();
        let v6_loopback: SocketAddr = "[::1]:8080".parse().unwrap();
        let public: SocketAddr = "0.0.0.0:8080".parse().unwrap();
        for addr in [loopback, v6_loopback] {
            assert!(exposure(addr, false, &args(true, false)).unwrap().is_none(), "{addr}");
        }
        assert!(exposure(public, true, &args(true, false)).unwrap().is_none(), "TLS on: allowed, no warning");
        let e = exposure(public, false, &args(true, false)).unwrap_err().to_string();
        assert!(e.contains("--insecure-no-auth-on-public-address"), "{e}");
        let w = exposure(public, false, &args(true, true)).unwrap().expect("a warning");
        assert!(w.contains("without TLS"), "{w}");
        let w = exposure(public, false, &args(false, false)).unwrap().expect("a warning with auth on too");
        assert!(w.contains("without TLS"), "{w}");
    }
}
