//! nats-server configuration files.
//!
//! [`NatsConfig`] is plain data rendered by a pure function, so the shapes
//! finmesh needs are one struct literal each:
//! - a single JetStream server (what [`super::NatsServer`] starts by default);
//! - a cluster node: [`ClusterSpec`] with the other nodes' route ports (and
//!   the route port it advertises, when it sits behind a proxy);
//! - a hub: `jetstream_domain = Some("hub")` and a `leafnode_port` to accept
//!   leaf connections;
//! - a leaf: `jetstream_domain = Some("leaf")` and `leafnode_remotes` pointing
//!   at the hub's leafnode URLs (see NATS-NOTES.md for a tested pair, and
//!   [`super::HubAndLeaves`] for the whole set-up). A hub does not advertise
//!   its other nodes' leafnode URLs (`no_advertise`), so a leaf connects
//!   only where its config says, e.g. through a delaying proxy.
//!
//! Every listener binds 127.0.0.1 only.

use std::fmt::Write as _;
use std::path::PathBuf;

/// Cluster (route) settings of one node.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClusterSpec {
    /// The cluster's name (the same on every node).
    pub name: String,
    /// This node's route port.
    pub port: u16,
    /// Route ports this node dials. Its own may be listed: nats-server
    /// notices a route to itself and drops it, and a JetStream cluster node
    /// needs at least one configured route, so a cluster's first node lists
    /// only itself.
    pub routes: Vec<u16>,
    /// Route port announced to the other nodes (`advertise`), which dial it
    /// when they learn of this node through gossip; `None`: the real port.
    /// A node behind a [`crate::DelayProxy`] advertises the proxy's port.
    pub advertise: Option<u16>,
}

/// Everything the kit writes into a nats-server config file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NatsConfig {
    /// `server_name`: unique within a cluster, required for JetStream clustering.
    pub server_name: String,
    /// Client port.
    pub port: u16,
    /// Monitoring (HTTP) port: `/healthz`, `/varz`, `/jsz`.
    pub http_port: u16,
    /// JetStream's `store_dir`.
    pub store_dir: PathBuf,
    /// JetStream domain (hub/leaf set-ups).
    pub jetstream_domain: Option<String>,
    /// Extra lines inside the `jetstream { }` block, e.g. `sync_interval: always`.
    pub jetstream_options: Vec<String>,
    /// Cluster settings, if this node is part of a cluster.
    pub cluster: Option<ClusterSpec>,
    /// Port on which to accept leafnode connections (a hub).
    pub leafnode_port: Option<u16>,
    /// Leafnode remotes (a leaf): one leaf connection each, with the URLs
    /// it may use, e.g. `[["nats-leaf://127.0.0.1:7422"]]`, or every node of
    /// a hub cluster in one remote.
    pub leafnode_remotes: Vec<Vec<String>>,
    /// Extra top-level lines, written verbatim at the end.
    pub extra: Vec<String>,
}

impl NatsConfig {
    /// A single JetStream server with nothing else configured.
    pub fn single(server_name: impl Into<String>, port: u16, http_port: u16, store_dir: PathBuf) -> Self {
        NatsConfig {
            server_name: server_name.into(),
            port,
            http_port,
            store_dir,
            jetstream_domain: None,
            jetstream_options: Vec::new(),
            cluster: None,
            leafnode_port: None,
            leafnode_remotes: Vec::new(),
            extra: Vec::new(),
        }
    }

    /// The config file's text.
    pub fn render(&self) -> String {
        let mut s = String::new();
        // `writeln!` into a String cannot fail.
        let _ = writeln!(s, "server_name: {}", quote(&self.server_name));
        let _ = writeln!(s, "listen: \"127.0.0.1:{}\"", self.port);
        let _ = writeln!(s, "http: \"127.0.0.1:{}\"", self.http_port);
        let _ = writeln!(s, "jetstream {{");
        let _ = writeln!(s, "  store_dir: {}", quote(&self.store_dir.to_string_lossy()));
        if let Some(domain) = &self.jetstream_domain {
            let _ = writeln!(s, "  domain: {}", quote(domain));
        }
        for line in &self.jetstream_options {
            let _ = writeln!(s, "  {line}");
        }
        let _ = writeln!(s, "}}");
        if let Some(c) = &self.cluster {
            let _ = writeln!(s, "cluster {{");
            let _ = writeln!(s, "  name: {}", quote(&c.name));
            let _ = writeln!(s, "  listen: \"127.0.0.1:{}\"", c.port);
            if let Some(p) = c.advertise {
                let _ = writeln!(s, "  advertise: \"127.0.0.1:{p}\"");
            }
            let routes: Vec<String> = c.routes.iter().map(|p| format!("\"nats-route://127.0.0.1:{p}\"")).collect();
            let _ = writeln!(s, "  routes: [{}]", routes.join(", "));
            let _ = writeln!(s, "}}");
        }
        if self.leafnode_port.is_some() || !self.leafnode_remotes.is_empty() {
            let _ = writeln!(s, "leafnodes {{");
            if let Some(p) = self.leafnode_port {
                let _ = writeln!(s, "  listen: \"127.0.0.1:{p}\"");
                // Leaves use only the URLs they were given, so a proxy
                // between leaf and hub cannot be bypassed after a cut.
                let _ = writeln!(s, "  no_advertise: true");
            }
            if !self.leafnode_remotes.is_empty() {
                let remotes: Vec<String> = self
                    .leafnode_remotes
                    .iter()
                    .map(|urls| match urls.as_slice() {
                        [url] => format!("{{ url: {} }}", quote(url)),
                        urls => {
                            let urls: Vec<String> = urls.iter().map(|u| quote(u)).collect();
                            format!("{{ urls: [{}] }}", urls.join(", "))
                        }
                    })
                    .collect();
                let _ = writeln!(s, "  remotes: [{}]", remotes.join(", "));
            }
            let _ = writeln!(s, "}}");
        }
        for line in &self.extra {
            let _ = writeln!(s, "{line}");
        }
        s
    }
}

/// A double-quoted config string.
fn quote(s: &str) -> String {
    format!("\"{}\"", s.replace('\\', "\\\\").replace('"', "\\\""))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_a_single_server() {
        let c = NatsConfig::single("n1", 4222, 8222, PathBuf::from("/tmp/x/store"));
        assert_eq!(
            c.render(),
            "server_name: \"n1\"\nlisten: \"127.0.0.1:4222\"\nhttp: \"127.0.0.1:8222\"\n\
             jetstream {\n  store_dir: \"/tmp/x/store\"\n}\n"
        );
    }

    #[test]
    fn renders_cluster_hub_and_leaf_sections() {
        let mut c = NatsConfig::single("n2", 1, 2, PathBuf::from("/s"));
        c.cluster = Some(ClusterSpec { name: "c".into(), port: 6002, routes: vec![6001, 6002, 6003], advertise: None });
        c.jetstream_domain = Some("hub".into());
        c.jetstream_options.push("sync_interval: always".into());
        c.leafnode_port = Some(7422);
        let text = c.render();
        assert!(text.contains("  domain: \"hub\"\n  sync_interval: always\n}"), "{text}");
        assert!(
            text.contains(
                "routes: [\"nats-route://127.0.0.1:6001\", \"nats-route://127.0.0.1:6002\", \"nats-route://127.0.0.1:6003\"]"
            ),
            "{text}"
        );
        assert!(!text.contains("  advertise:"), "{text}");
        assert!(text.contains("leafnodes {\n  listen: \"127.0.0.1:7422\"\n  no_advertise: true\n}"), "{text}");

        let mut leaf = NatsConfig::single("leaf", 1, 2, PathBuf::from("/s"));
        leaf.leafnode_remotes.push(vec!["nats-leaf://127.0.0.1:7422".into()]);
        assert!(leaf.render().contains("remotes: [{ url: \"nats-leaf://127.0.0.1:7422\" }]"));
        leaf.leafnode_remotes = vec![vec!["nats-leaf://127.0.0.1:1".into(), "nats-leaf://127.0.0.1:2".into()]];
        let text = leaf.render();
        assert!(
            text.contains("remotes: [{ urls: [\"nats-leaf://127.0.0.1:1\", \"nats-leaf://127.0.0.1:2\"] }]"),
            "{text}"
        );
    }

    #[test]
    fn renders_an_advertised_route_port() {
        let mut c = NatsConfig::single("n3", 1, 2, PathBuf::from("/s"));
        c.cluster = Some(ClusterSpec { name: "c".into(), port: 6003, routes: vec![7001, 7002], advertise: Some(7003) });
        let text = c.render();
        assert!(text.contains("  listen: \"127.0.0.1:6003\"\n  advertise: \"127.0.0.1:7003\"\n"), "{text}");
        assert!(text.contains("routes: [\"nats-route://127.0.0.1:7001\", \"nats-route://127.0.0.1:7002\"]"), "{text}");
    }

    #[test]
    fn quotes_paths() {
        assert_eq!(quote(r#"a"b\c"#), r#""a\"b\\c""#);
    }
}
