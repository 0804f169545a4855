//! Operator commands for credentials: `finmesh token issue` and
//! `finmesh oauth hash-secret` (docs/auth.md), and the admin token file that
//! `serve` writes on first start ([`write_admin_token`]).
//!
//! Both read the same configuration as `serve` (file, `FINMESH_*`, flags),
//! so a token is signed with exactly the key the node verifies with.

use std::io::{Read, Write};
use std::path::{Path, PathBuf};

use anyhow::Context;

use crate::config::{ConfigOverrides, ServeConfig};

/// `finmesh token issue`.
#[derive(Debug, clap::Args)]
pub struct IssueArgs {
    #[command(flatten)]
    pub config: ConfigOverrides,
    /// The token's subject (`sub`): who it is for; rate limits key on it.
    #[arg(long)]
    pub sub: String,
    /// A scope, e.g. `kv:read:cards` (repeat, or separate with spaces).
    #[arg(long = "scope", required = true)]
    pub scopes: Vec<String>,
    /// Lifetime: seconds or 15m, 12h, 30d [default: the signing key's default_ttl_secs].
    #[arg(long)]
    pub ttl: Option<String>,
    /// Print the token with its id and expiry as JSON.
    #[arg(long)]
    pub json: bool,
}

/// `finmesh oauth hash-secret`.
#[derive(Debug, clap::Args)]
pub struct HashSecretArgs {
    /// Generate a random secret instead of reading one from standard input.
    #[arg(long)]
    pub generate: bool,
}

pub fn issue(args: &IssueArgs) -> anyhow::Result<()> {
    let config = ServeConfig::load(&args.config)?;
    let auth = config.auth_or_node_secret();
    if config.auth.is_none() {
        // The node's secret: it must exist, or the node would not accept the token.
        let path = config.data_dir.join(finmesh_auth::DEFAULT_SECRET_FILE);
        anyhow::ensure!(
            path.is_file(),
            "no [auth] configuration and no node secret at {}: start `finmesh serve` once, or configure [auth.signing]",
            path.display()
        );
    }
    let ttl = args.ttl.as_deref().map(finmesh_auth::parse_ttl).transpose()?;
    let token = finmesh_auth::issue_token(&auth, &args.sub, &args.scopes, ttl).context("issuing the token")?;
    if args.json {
        println!(
            "{}",
            serde_json::json!({"token": token.token, "jti": token.jti, "sub": token.subject, "expires_at": token.expires_at})
        );
    } else {
        println!("{}", token.token);
    }
    Ok(())
}

/// Name of the file, under the data dir, holding the admin token of the
/// first start.
pub const ADMIN_TOKEN_FILE: &str = "admin-token";

/// Write `token` to `<data_dir>/admin-token`, readable by its owner only
/// (created with mode 0600, never through an existing file or symlink: an
/// older file, from a secret since deleted, is removed first). Returns the path.
pub fn write_admin_token(data_dir: &Path, token: &str) -> anyhow::Result<PathBuf> {
    use std::os::unix::fs::OpenOptionsExt;
    let path = data_dir.join(ADMIN_TOKEN_FILE);
    match std::fs::remove_file(&path) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(e).with_context(|| format!("removing the old {}", path.display())),
    }
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(&path)
        .with_context(|| format!("creating {}", path.display()))?;
    file.write_all(format!("{token}\n").as_bytes())
        .and_then(|()| file.sync_all())
        .with_context(|| format!("writing {}", path.display()))?;
    Ok(path)
}

pub fn hash_secret(args: &HashSecretArgs) -> anyhow::Result<()> {
    let secret = if args.generate {
        finmesh_auth::generate_client_secret()?
    } else {
        let mut s = String::new();
        std::io::stdin().read_to_string(&mut s).context("reading the secret from standard input")?;
        let s = s.trim_end_matches(['\r', '\n']).to_owned();
        anyhow::ensure!(s.len() >= 16, "a client secret needs at least 16 characters");
        s
    };
    let hash = finmesh_auth::hash_client_secret(&secret)?;
    if args.generate {
        println!("secret:      {secret}");
    }
    println!("secret_hash: {hash}");
    Ok(())
}
