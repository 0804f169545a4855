//! The CLI client: `finmesh kv|stream|consumer ...` against a running
//! `finmesh serve` over its HTTP API (docs/api.md).
//!
//! Owns turning a command line into one HTTP request (or an SSE
//! subscription) and its answer into output: the value or a short table by
//! default, the server's JSON with `--json`. Errors come back from the server
//! as problem+json and are printed as `error: <title>: <detail> (HTTP n)`
//! with exit status 1. The token comes from `FINMESH_TOKEN` (or `--token`),
//! never from a positional argument, so it stays out of shell history.

mod commands;

pub use finmesh_client::sse;

use std::path::PathBuf;

use anyhow::{Context, bail};
use reqwest::{Method, RequestBuilder, Response};

pub use commands::{
    ConsumerCommand, KvCommand, StreamCommand, consumer as commands_consumer, kv as commands_kv,
    stream as commands_stream,
};

/// Connection options shared by every client command.
#[derive(Debug, Clone, clap::Args)]
pub struct ClientArgs {
    /// Base URL of a finmesh node.
    #[arg(long, global = true, env = "FINMESH_SERVER", default_value = "http://127.0.0.1:8080")]
    pub server: String,
    /// Bearer token (prefer the environment variable).
    #[arg(long, global = true, env = "FINMESH_TOKEN", hide_env_values = true)]
    pub token: Option<String>,
    /// Extra CA certificate (PEM) to trust, e.g. from `finmesh certs dev`.
    #[arg(long, global = true, env = "FINMESH_CA_CERT")]
    pub ca_cert: Option<PathBuf>,
    /// Print the server's JSON instead of human output.
    #[arg(long, global = true)]
    pub json: bool,
}

/// A configured HTTP client for one node.
pub struct Client {
    http: reqwest::Client,
    /// The same settings, HTTP/1.1 only: a WebSocket upgrade cannot go
    /// over an HTTP/2 connection that TLS (ALPN) would otherwise pick.
    http1: reqwest::Client,
    base: String,
    token: Option<String>,
    pub json: bool,
}

impl Client {
    pub fn new(args: &ClientArgs) -> anyhow::Result<Self> {
        let cert = match &args.ca_cert {
            Some(path) => {
                let pem = std::fs::read(path).with_context(|| format!("reading {}", path.display()))?;
                Some(reqwest::Certificate::from_pem(&pem).with_context(|| format!("parsing {}", path.display()))?)
            }
            None => None,
        };
        let builder = || {
            let builder = reqwest::Client::builder().user_agent(concat!("finmesh-cli/", env!("CARGO_PKG_VERSION")));
            match &cert {
                Some(cert) => builder.add_root_certificate(cert.clone()),
                None => builder,
            }
        };
        Ok(Self {
            http: builder().build().context("building the HTTP client")?,
            http1: builder().http1_only().build().context("building the HTTP client")?,
            base: args.server.trim_end_matches('/').to_owned(),
            token: args.token.clone().filter(|t| !t.is_empty()),
            json: args.json,
        })
    }

    /// A subscription to `stream` through the SDK, on this node and then
    /// the `failover` ones, with this client's TLS settings and token.
    pub fn subscription(
        &self,
        stream: &str,
        failover: &[String],
        transport: finmesh_client::Transport,
    ) -> finmesh_client::SubscriptionBuilder {
        let endpoints: Vec<String> = std::iter::once(self.base.clone()).chain(failover.iter().cloned()).collect();
        self.subscription_to(&endpoints, stream, transport)
    }

    /// A subscription to `stream` on `endpoints` (in this order) over
    /// `transport`, with this client's TLS settings and token.
    pub fn subscription_to(
        &self,
        endpoints: &[String],
        stream: &str,
        transport: finmesh_client::Transport,
    ) -> finmesh_client::SubscriptionBuilder {
        let http = match transport {
            finmesh_client::Transport::WebSocket => self.http1.clone(),
            _ => self.http.clone(),
        };
        let builder = finmesh_client::Subscription::builder(endpoints.iter().cloned(), stream)
            .http_client(http)
            .transport(transport);
        match &self.token {
            Some(token) => builder.token(token.clone()),
            None => builder,
        }
    }

    /// A request to `path` (which starts with `/`), with the token.
    pub fn request(&self, method: Method, path: &str) -> RequestBuilder {
        let request = self.http.request(method, format!("{}{path}", self.base));
        match &self.token {
            Some(token) => request.bearer_auth(token),
            None => request,
        }
    }

    /// Send, and turn a non-2xx answer into an error carrying its problem.
    pub async fn send(&self, request: RequestBuilder) -> anyhow::Result<Response> {
        let response = request.send().await.with_context(|| format!("cannot reach {}", self.base))?;
        if response.status().is_success() {
            return Ok(response);
        }
        Err(problem_error(response).await)
    }

    /// Send and parse a JSON answer.
    pub async fn json(&self, request: RequestBuilder) -> anyhow::Result<serde_json::Value> {
        let response = self.send(request).await?;
        response.json().await.context("the server's answer is not JSON")
    }
}

async fn problem_error(response: Response) -> anyhow::Error {
    let status = response.status();
    let body = response.bytes().await.unwrap_or_default();
    let detail = match serde_json::from_slice::<serde_json::Value>(&body) {
        Ok(problem) => {
            let title = problem["title"].as_str().unwrap_or_else(|| status.canonical_reason().unwrap_or("error"));
            match problem["detail"].as_str() {
                Some(detail) => format!("{title}: {detail}"),
                None => title.to_owned(),
            }
        }
        Err(_) => String::from_utf8_lossy(&body).trim().to_owned(),
    };
    anyhow::anyhow!("{detail} (HTTP {})", status.as_u16())
}

/// Percent-encode one path segment (keys may hold `/`, `=`, ...).
pub fn segment(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.' | b'~') {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

/// Follow an SSE endpoint (a KV watch), printing each event with `print`
/// until the server ends the stream; a `reconnect` or `lagged` event resumes
/// from the last id. Stream subscriptions use the SDK instead
/// ([`Client::subscription`]).
pub async fn follow(
    client: &Client,
    path: &str,
    mut print: impl FnMut(&sse::SseEvent) -> anyhow::Result<()>,
) -> anyhow::Result<()> {
    use futures::StreamExt;
    let mut last_id: Option<String> = None;
    for attempt in 0u32.. {
        let mut request = client.request(Method::GET, path).header("accept", "text/event-stream");
        if let Some(id) = &last_id {
            request = request.header("last-event-id", id);
        }
        let response = client.send(request).await?;
        let mut parser = sse::SseParser::default();
        let mut body = response.bytes_stream();
        let mut resume = false;
        while let Some(chunk) = body.next().await {
            let chunk = chunk.context("the event stream broke")?;
            for event in parser.feed(&chunk) {
                match event.event.as_str() {
                    "reconnect" | "lagged" => resume = true,
                    _ => print(&event)?,
                }
            }
            if let Some(id) = parser.last_id() {
                last_id = Some(id.to_owned());
            }
        }
        if !resume {
            return Ok(());
        }
        if attempt >= 30 {
            bail!("the server asked to reconnect 30 times in a row; giving up");
        }
        tokio::time::sleep(std::time::Duration::from_millis(500)).await;
    }
    Ok(())
}
