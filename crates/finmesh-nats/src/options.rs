//! [`NatsEngineOptions`]: where the NATS servers are, how to authenticate,
//! and the timeouts and bounds the engine works with.
//!
//! Parsed with serde (unknown fields refused), checked by a pure
//! [`NatsEngineOptions::validate`] that reports every problem at once, then
//! used by [`crate::NatsEngine::connect`]. Durations are milliseconds.

use std::path::PathBuf;
use std::time::Duration;

use finmesh_core::{Error, Result, SyncPolicy};
use serde::{Deserialize, Serialize};

/// How the engine authenticates (at most one way).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "snake_case", tag = "kind", deny_unknown_fields)]
pub enum NatsAuth {
    /// No credentials.
    #[default]
    None,
    /// A `.creds` file (JWT + nkey seed).
    CredentialsFile {
        /// Path of the file.
        path: PathBuf,
    },
    /// A token.
    Token {
        /// The token.
        token: String,
    },
    /// User and password.
    UserPassword {
        /// User name.
        user: String,
        /// Password.
        password: String,
    },
}

/// Configuration of a [`crate::NatsEngine`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NatsEngineOptions {
    /// Server URLs, e.g. `nats://127.0.0.1:4222`; the client picks one and
    /// fails over to the others.
    pub servers: Vec<String>,
    /// Credentials.
    #[serde(default)]
    pub auth: NatsAuth,
    /// Time one connection attempt may take.
    #[serde(default = "d_connect_timeout", with = "ms")]
    pub connect_timeout: Duration,
    /// Attempts at start before `connect` gives up (backoff doubles from
    /// 100 ms up to 2 s between attempts).
    #[serde(default = "d_connect_attempts")]
    pub connect_attempts: u32,
    /// Time one JetStream request (publish ack, API call) may take before it
    /// fails with `Timeout`.
    #[serde(default = "d_request_timeout", with = "ms")]
    pub request_timeout: Duration,
    /// Most publishes of one `publish_batch` waiting for their acks at once.
    #[serde(default = "d_max_in_flight")]
    pub max_in_flight: usize,
    /// JetStream domain to address (hub/leaf set-ups); `None` = the local one.
    #[serde(default)]
    pub domain: Option<String>,
    /// The fsync policy the server runs with (`jetstream { sync_interval }`:
    /// NATS's default is every 2 minutes, `always` fsyncs before each ack).
    /// NATS has no per-stream policy, so `info` reports this for every
    /// stream and bucket.
    #[serde(default = "d_server_sync")]
    pub server_sync: SyncPolicy,
}

/// NATS's default `sync_interval`: two minutes.
pub const NATS_DEFAULT_SYNC: SyncPolicy = SyncPolicy::Interval { ms: 120_000 };

fn d_connect_timeout() -> Duration {
    Duration::from_secs(2)
}
fn d_connect_attempts() -> u32 {
    5
}
fn d_request_timeout() -> Duration {
    Duration::from_secs(5)
}
fn d_max_in_flight() -> usize {
    1000
}
fn d_server_sync() -> SyncPolicy {
    NATS_DEFAULT_SYNC
}

mod ms {
    use serde::{Deserialize, Deserializer, Serializer};
    use std::time::Duration;
    pub fn serialize<S: Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_u64(d.as_millis() as u64)
    }
    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
        Ok(Duration::from_millis(u64::deserialize(d)?))
    }
}

impl NatsEngineOptions {
    /// Options for one server URL, everything else default.
    pub fn new(server: impl Into<String>) -> Self {
        NatsEngineOptions {
            servers: vec![server.into()],
            auth: NatsAuth::None,
            connect_timeout: d_connect_timeout(),
            connect_attempts: d_connect_attempts(),
            request_timeout: d_request_timeout(),
            max_in_flight: d_max_in_flight(),
            domain: None,
            server_sync: d_server_sync(),
        }
    }

    /// Every problem with these options, at once.
    pub fn validate(&self) -> Result<()> {
        let mut p = Vec::new();
        if self.servers.is_empty() {
            p.push("servers must name at least one URL".to_owned());
        }
        for s in &self.servers {
            let ok = ["nats://", "tls://", "ws://", "wss://"].iter().any(|scheme| s.starts_with(scheme))
                || (!s.contains("://") && !s.is_empty());
            if !ok || s.chars().any(char::is_whitespace) {
                p.push(format!("server URL `{s}` is not a nats://, tls://, ws:// or wss:// URL"));
            }
        }
        if self.connect_timeout < Duration::from_millis(10) {
            p.push("connect_timeout must be at least 10 ms".to_owned());
        }
        if self.connect_attempts == 0 {
            p.push("connect_attempts must be at least 1".to_owned());
        }
        if self.request_timeout < Duration::from_millis(10) {
            p.push("request_timeout must be at least 10 ms".to_owned());
        }
        if self.max_in_flight == 0 {
            p.push("max_in_flight must be at least 1".to_owned());
        }
        if let Some(d) = &self.domain
            && (d.is_empty() || d.contains(['.', '*', '>', ' ']))
        {
            p.push(format!("domain `{d}` must be a non-empty name without `.`, `*`, `>` or spaces"));
        }
        match &self.auth {
            NatsAuth::Token { token } if token.is_empty() => p.push("auth token must not be empty".to_owned()),
            NatsAuth::UserPassword { user, .. } if user.is_empty() => p.push("auth user must not be empty".to_owned()),
            NatsAuth::CredentialsFile { path } if path.as_os_str().is_empty() => {
                p.push("auth credentials file path must not be empty".to_owned())
            }
            _ => {}
        }
        if let SyncPolicy::Interval { ms: 0 } = self.server_sync {
            p.push("server_sync interval must be at least 1 ms".to_owned());
        }
        if p.is_empty() { Ok(()) } else { Err(Error::invalid(format!("invalid NATS options: {}", p.join("; ")))) }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn validate_reports_every_problem() {
        let mut o = NatsEngineOptions::new("http://x");
        o.max_in_flight = 0;
        o.connect_attempts = 0;
        o.domain = Some("a.b".into());
        let m = o.validate().unwrap_err();
        for want in ["http://x", "max_in_flight", "connect_attempts", "domain"] {
            assert!(m.message().contains(want), "missing {want}: {m}");
        }
        assert!(NatsEngineOptions::new("nats://127.0.0.1:4222").validate().is_ok());
        assert!(NatsEngineOptions::new("127.0.0.1:4222").validate().is_ok());
    }

    #[test]
    fn json_defaults_and_unknown_fields() {
        let o: NatsEngineOptions = serde_json::from_str(r#"{"servers":["nats://h:4222"]}"#).unwrap();
        assert_eq!(o, NatsEngineOptions::new("nats://h:4222"));
        assert!(serde_json::from_str::<NatsEngineOptions>(r#"{"servers":[],"typo":1}"#).is_err());
    }
}
