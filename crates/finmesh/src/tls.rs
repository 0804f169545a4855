//! TLS for `finmesh serve`: a rustls server configuration from PEM files,
//! and `finmesh certs dev`, a self-signed pair for local use.
//!
//! Invariants: aws-lc-rs is the only crypto provider (installed at the top
//! of `main`; [`server_config`] names it explicitly too, so a library user
//! that forgot gets the same provider rather than a panic); ALPN offers
//! HTTP/2 and HTTP/1.1; with a client CA configured, a client certificate
//! signed by it is *required*.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::{Context, bail};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::server::WebPkiClientVerifier;

/// Where the server's certificate material lives.
#[derive(Debug, Clone, PartialEq, Eq, serde::Deserialize, serde::Serialize)]
#[serde(deny_unknown_fields)]
pub struct TlsConfig {
    /// PEM certificate chain, leaf first.
    pub cert: PathBuf,
    /// PEM private key (PKCS#8, PKCS#1 or SEC1).
    pub key: PathBuf,
    /// PEM bundle of CAs whose client certificates are accepted; when set,
    /// every client must present one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub client_ca: Option<PathBuf>,
}

/// A rustls server configuration for `config`, with ALPN `h2` and `http/1.1`.
pub fn server_config(config: &TlsConfig) -> anyhow::Result<rustls::ServerConfig> {
    let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    let certs = load_certs(&config.cert)?;
    let key = PrivateKeyDer::from_pem_file(&config.key)
        .with_context(|| format!("reading the TLS private key {}", config.key.display()))?;
    let builder = rustls::ServerConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .context("choosing TLS protocol versions")?;
    let builder = match &config.client_ca {
        None => builder.with_no_client_auth(),
        Some(path) => {
            let mut roots = rustls::RootCertStore::empty();
            for cert in load_certs(path)? {
                roots.add(cert).with_context(|| format!("adding a client CA from {}", path.display()))?;
            }
            let verifier = WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider)
                .build()
                .with_context(|| format!("building the client verifier from {}", path.display()))?;
            builder.with_client_cert_verifier(verifier)
        }
    };
    let mut server = builder
        .with_single_cert(certs, key)
        .with_context(|| format!("{} and {} do not form a usable pair", config.cert.display(), config.key.display()))?;
    server.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    Ok(server)
}

fn load_certs(path: &Path) -> anyhow::Result<Vec<CertificateDer<'static>>> {
    let certs = CertificateDer::pem_file_iter(path)
        .with_context(|| format!("reading certificates from {}", path.display()))?
        .collect::<Result<Vec<_>, _>>()
        .with_context(|| format!("parsing certificates in {}", path.display()))?;
    if certs.is_empty() {
        bail!("{} holds no PEM certificate", path.display());
    }
    Ok(certs)
}

/// Arguments of `finmesh certs dev`.
#[derive(Debug, clap::Args)]
pub struct DevCertArgs {
    /// Directory to write `cert.pem` and `key.pem` into.
    #[arg(long, default_value = "finmesh-certs")]
    pub out: PathBuf,
    /// Host names and IP addresses the certificate is valid for.
    #[arg(long = "name", default_values_t = ["localhost".to_owned(), "127.0.0.1".to_owned(), "::1".to_owned()])]
    pub names: Vec<String>,
    /// Overwrite existing files.
    #[arg(long)]
    pub force: bool,
}

/// Write a self-signed certificate and its key (mode 0600) for local use.
pub fn write_dev_pair(args: &DevCertArgs) -> anyhow::Result<TlsConfig> {
    let pair =
        rcgen::generate_simple_self_signed(args.names.clone()).context("generating a self-signed certificate")?;
    std::fs::create_dir_all(&args.out).with_context(|| format!("creating {}", args.out.display()))?;
    let config = TlsConfig { cert: args.out.join("cert.pem"), key: args.out.join("key.pem"), client_ca: None };
    for path in [&config.cert, &config.key] {
        if path.exists() && !args.force {
            bail!("{} exists; pass --force to overwrite it", path.display());
        }
    }
    std::fs::write(&config.cert, pair.cert.pem()).with_context(|| format!("writing {}", config.cert.display()))?;
    write_private(&config.key, pair.signing_key.serialize_pem().as_bytes())?;
    Ok(config)
}

/// Write a secret file readable by its owner only.
pub fn write_private(path: &Path, contents: &[u8]) -> anyhow::Result<()> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(path)
        .with_context(|| format!("opening {}", path.display()))?;
    file.write_all(contents).with_context(|| format!("writing {}", path.display()))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dev_pair_loads_as_a_server_config_with_h2() {
        let dir = tempfile::tempdir().unwrap();
        let args = DevCertArgs { out: dir.path().join("c"), names: vec!["localhost".into()], force: false };
        let config = write_dev_pair(&args).unwrap();
        let server = server_config(&config).unwrap();
        assert_eq!(server.alpn_protocols[0], b"h2");
        // A second run refuses to overwrite without --force.
        let err = write_dev_pair(&args).unwrap_err().to_string();
        assert!(err.contains("--force"), "{err}");
        let mode = std::os::unix::fs::PermissionsExt::mode(&std::fs::metadata(&config.key).unwrap().permissions());
        assert_eq!(mode & 0o777, 0o600);
    }

    #[test]
    fn a_missing_or_empty_file_is_a_clear_error() {
        let dir = tempfile::tempdir().unwrap();
        let empty = dir.path().join("empty.pem");
        std::fs::write(&empty, "").unwrap();
        let config = TlsConfig { cert: empty.clone(), key: empty.clone(), client_ca: None };
        let err = format!("{:#}", server_config(&config).unwrap_err());
        assert!(err.contains("no PEM certificate"), "{err}");
        let config = TlsConfig { cert: dir.path().join("nope.pem"), key: empty, client_ca: None };
        let err = format!("{:#}", server_config(&config).unwrap_err());
        assert!(err.contains("nope.pem"), "{err}");
    }
}
