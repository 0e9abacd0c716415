//! TLS: rustls configurations from PEM files, and identities from certificates.
//!
//! With `[tls]` configured, every listener of a node speaks only TLS and requires a client
//! certificate signed by the configured CA (expired certificates, other CAs and missing
//! certificates fail the handshake). The subject of a connection is the certificate's common
//! name; a certificate without one is identified by its first DNS name, then by
//! `sha256:<fingerprint>`. The subject `anonymous` is reserved for plaintext listeners: a
//! certificate claiming it is refused. Only the `ring` provider is compiled in.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::server::{ServerConnection, WebPkiClientVerifier};
use rustls::{ClientConfig, RootCertStore, ServerConfig};
use sha2::{Digest, Sha256};
use x509_parser::extensions::GeneralName;
use x509_parser::prelude::{FromDer, X509Certificate};

use serde::{Deserialize, Serialize};

/// The `[tls]` section of the configuration: TLS material, PEM files.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TlsSection {
    /// CA that client (and peer) certificates must be signed by.
    pub ca: PathBuf,
    /// This node's certificate chain.
    pub cert: PathBuf,
    /// Its private key.
    pub key: PathBuf,
    /// What this node uses when it dials other nodes (default: the three files above).
    #[serde(default)]
    pub peer: Option<PeerTlsSection>,
}

/// `[tls.peer]`: the material this node presents when it dials other nodes (a balancer, the
/// mover, a follower), when it differs from its server's.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct PeerTlsSection {
    /// The CA that signs the other nodes' certificates (default: `tls.ca`).
    pub ca: Option<PathBuf>,
    /// This node's client certificate (default: `tls.cert`).
    pub cert: Option<PathBuf>,
    /// Its key (default: `tls.key`).
    pub key: Option<PathBuf>,
}

impl TlsSection {
    /// Every configured file exists (the config key of the first that does not is named).
    pub fn validate(&self) -> Result<(), TlsError> {
        let peer = self.peer.clone().unwrap_or_default();
        for (key, path) in [
            ("tls.ca", Some(&self.ca)),
            ("tls.cert", Some(&self.cert)),
            ("tls.key", Some(&self.key)),
            ("tls.peer.ca", peer.ca.as_ref()),
            ("tls.peer.cert", peer.cert.as_ref()),
            ("tls.peer.key", peer.key.as_ref()),
        ] {
            if let Some(path) = path
                && !path.is_file()
            {
                return Err(TlsError::File {
                    key,
                    path: path.display().to_string(),
                    message: "not a readable file".into(),
                });
            }
        }
        Ok(())
    }
}

#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("config key `{key}`: {path}: {message}")]
    File {
        key: &'static str,
        path: String,
        message: String,
    },
    #[error("config key `{key}`: {message}")]
    Invalid { key: &'static str, message: String },
}

fn certificates(key: &'static str, path: &Path) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let file_error = |message: String| TlsError::File {
        key,
        path: path.display().to_string(),
        message,
    };
    let certs: Vec<_> = CertificateDer::pem_file_iter(path)
        .map_err(|e| file_error(e.to_string()))?
        .collect::<Result<_, _>>()
        .map_err(|e| file_error(e.to_string()))?;
    if certs.is_empty() {
        return Err(file_error("no PEM certificate in the file".into()));
    }
    Ok(certs)
}

fn private_key(key: &'static str, path: &Path) -> Result<PrivateKeyDer<'static>, TlsError> {
    PrivateKeyDer::from_pem_file(path).map_err(|e| TlsError::File {
        key,
        path: path.display().to_string(),
        message: e.to_string(),
    })
}

fn roots(key: &'static str, path: &Path) -> Result<Arc<RootCertStore>, TlsError> {
    let mut roots = RootCertStore::empty();
    for cert in certificates(key, path)? {
        roots.add(cert).map_err(|e| TlsError::Invalid {
            key,
            message: format!("{}: {e}", path.display()),
        })?;
    }
    Ok(Arc::new(roots))
}

/// The server side: this node's certificate, and client certificates required and verified
/// against the CA. ALPN offers `h2` (gRPC) and `http/1.1` (metrics).
pub(crate) fn server_config(tls: &TlsSection) -> Result<Arc<ServerConfig>, TlsError> {
    build_server_config(tls, true, &[b"h2", b"http/1.1"])
}

/// The HTTP gateway's server side: client certificates asked for and verified when presented,
/// but not required (browsers present none and carry signed URLs). HTTP/1.1 only.
pub(crate) fn gateway_server_config(tls: &TlsSection) -> Result<Arc<ServerConfig>, TlsError> {
    build_server_config(tls, false, &[b"http/1.1"])
}

fn build_server_config(
    tls: &TlsSection,
    require_certificates: bool,
    alpn: &[&[u8]],
) -> Result<Arc<ServerConfig>, TlsError> {
    let mut verifier = WebPkiClientVerifier::builder(roots("tls.ca", &tls.ca)?);
    if !require_certificates {
        verifier = verifier.allow_unauthenticated();
    }
    let verifier = verifier.build().map_err(|e| TlsError::Invalid {
        key: "tls.ca",
        message: e.to_string(),
    })?;
    let mut config = ServerConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .map_err(|e| TlsError::Invalid {
            key: "tls",
            message: e.to_string(),
        })?
        .with_client_cert_verifier(verifier)
        .with_single_cert(
            certificates("tls.cert", &tls.cert)?,
            private_key("tls.key", &tls.key)?,
        )
        .map_err(|e| TlsError::Invalid {
            key: "tls.key",
            message: format!("does not match tls.cert: {e}"),
        })?;
    config.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
    // Our preference, not the client's: AES-128-GCM first (see `provider`).
    config.ignore_client_order = true;
    Ok(Arc::new(config))
}

/// Bytes read from the socket at once under a TLS stream that carries bulk data. rustls asks
/// its transport for at most 4 KiB at a time (it grows its record buffer in 4 KiB steps); served
/// from this buffer, those asks are copies, not system calls (256 KiB measured faster than 64 KiB
/// for replication over mTLS; docs/security.md).
pub(crate) const READ_BUFFER: usize = 256 * 1024;

/// The ring provider with AES-128-GCM preferred: as safe as AES-256-GCM for TLS 1.3 and cheaper
/// per byte, which matters when a node streams gigabytes (docs/benchmarks.md).
fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    use rustls::CipherSuite::{TLS13_AES_128_GCM_SHA256, TLS13_AES_256_GCM_SHA384};
    let mut provider = rustls::crypto::ring::default_provider();
    provider
        .cipher_suites
        .sort_by_key(|suite| match suite.suite() {
            TLS13_AES_128_GCM_SHA256 => 0,
            TLS13_AES_256_GCM_SHA384 => 1,
            _ => 2,
        });
    Arc::new(provider)
}

/// The client side of node-to-node connections: the peer section's files, defaulting to the
/// node's own (a node certificate is valid for both).
pub(crate) fn peer_client_config(tls: &TlsSection) -> Result<Arc<ClientConfig>, TlsError> {
    let peer = tls.peer.clone().unwrap_or_default();
    client_config(
        ("tls.peer.ca", peer.ca.as_deref().unwrap_or(&tls.ca)),
        ("tls.peer.cert", peer.cert.as_deref().unwrap_or(&tls.cert)),
        ("tls.peer.key", peer.key.as_deref().unwrap_or(&tls.key)),
    )
    .map(Arc::new)
}

/// A client configuration that trusts `ca` and presents `cert` with `key`; each file comes with
/// the name errors give it (a config key for a node; the client library names the files).
pub(crate) fn client_config(
    (ca_name, ca): (&'static str, &Path),
    (cert_name, cert): (&'static str, &Path),
    (key_name, key): (&'static str, &Path),
) -> Result<ClientConfig, TlsError> {
    let config = ClientConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .map_err(|e| TlsError::Invalid {
            key: ca_name,
            message: e.to_string(),
        })?
        .with_root_certificates(roots(ca_name, ca)?)
        .with_client_auth_cert(certificates(cert_name, cert)?, private_key(key_name, key)?)
        .map_err(|e| TlsError::Invalid {
            key: key_name,
            message: format!("does not match {cert_name}: {e}"),
        })?;
    Ok(config)
}

/// The subject of the client certificate of `connection`.
pub(crate) fn subject_of(connection: &ServerConnection) -> Option<String> {
    let certificate = connection.peer_certificates()?.first()?;
    Some(subject(certificate.as_ref()))
}

/// The subject of a DER certificate: its common name, else its first DNS name, else
/// `sha256:<hex fingerprint>`.
pub(crate) fn subject(der: &[u8]) -> String {
    if let Some(name) = common_name(der) {
        return name;
    }
    if let Ok((_, certificate)) = X509Certificate::from_der(der)
        && let Ok(Some(names)) = certificate.subject_alternative_name()
        && let Some(dns) = names
            .value
            .general_names
            .iter()
            .find_map(|name| match name {
                GeneralName::DNSName(dns) => Some(*dns),
                _ => None,
            })
    {
        return dns.to_owned();
    }
    let digest = Sha256::digest(der);
    format!(
        "sha256:{}",
        digest
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect::<String>()
    )
}

/// The first common name in the subject of a DER certificate.
pub(crate) fn common_name(der: &[u8]) -> Option<String> {
    let (_, certificate) = X509Certificate::from_der(der).ok()?;
    let cn = certificate.subject().iter_common_name().next()?;
    cn.as_str().ok().map(str::to_owned)
}
