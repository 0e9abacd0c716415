//! A development PKI, made with rcgen so no external tool is needed: a CA, node certificates
//! (server and client authentication, common name `node:<name>`) and client certificates (common
//! name = the subject the authorizer sees). `goutube certs` writes them as PEM files.

use std::net::IpAddr;
use std::path::{Path, PathBuf};

use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose,
};
use time::{Duration, OffsetDateTime};

pub use crate::net::NODE_PREFIX;

/// Why certificates could not be made or written.
#[derive(Debug, thiserror::Error)]
pub enum CertError {
    /// rcgen could not make a key or a certificate.
    #[error("generating {what}: {source}")]
    Generate {
        /// What was being made.
        what: String,
        /// rcgen's error.
        #[source]
        source: rcgen::Error,
    },
    /// A file could not be written.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// What the system said.
        #[source]
        source: std::io::Error,
    },
    /// A file is there already.
    #[error("{0} already exists; pass --force to replace it")]
    Exists(PathBuf),
    /// A name or a value asked for cannot be used.
    #[error("{what}: {message}")]
    Invalid {
        /// What.
        what: String,
        /// Why not.
        message: String,
    },
}

/// When a certificate is valid.
#[derive(Debug, Clone, Copy)]
pub struct Validity {
    /// From.
    pub not_before: OffsetDateTime,
    /// Until.
    pub not_after: OffsetDateTime,
}

impl Validity {
    /// From an hour ago (clock skew) to `days` from now.
    pub fn days(days: i64) -> Self {
        let now = OffsetDateTime::now_utc();
        Self {
            not_before: now - Duration::hours(1),
            not_after: now + Duration::days(days),
        }
    }

    /// A window that ended yesterday (tests of expired certificates).
    pub fn expired() -> Self {
        let now = OffsetDateTime::now_utc();
        Self {
            not_before: now - Duration::days(30),
            not_after: now - Duration::days(1),
        }
    }
}

/// A certificate and its private key, PEM-encoded.
#[derive(Debug, Clone)]
pub struct Issued {
    /// The certificate.
    pub cert_pem: String,
    /// Its private key.
    pub key_pem: String,
}

/// A certificate authority that issues node and client certificates.
pub struct Authority {
    issuer: Issuer<'static, KeyPair>,
    pem: Issued,
}

impl Authority {
    /// A new self-signed CA.
    pub fn new(common_name: &str, validity: Validity) -> Result<Self, CertError> {
        let generate = |source| CertError::Generate {
            what: "the CA".into(),
            source,
        };
        let key = KeyPair::generate().map_err(generate)?;
        let mut params = CertificateParams::new(Vec::<String>::new()).map_err(generate)?;
        params
            .distinguished_name
            .push(DnType::CommonName, common_name);
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::CrlSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        params.not_before = validity.not_before;
        params.not_after = validity.not_after;
        let cert = params.self_signed(&key).map_err(generate)?;
        let pem = Issued {
            cert_pem: cert.pem(),
            key_pem: key.serialize_pem(),
        };
        Ok(Self {
            issuer: Issuer::new(params, key),
            pem,
        })
    }

    /// A CA from its PEM certificate and key (to issue more certificates with it).
    pub fn from_pem(cert_pem: &str, key_pem: &str) -> Result<Self, CertError> {
        let generate = |source| CertError::Generate {
            what: "loading the CA".into(),
            source,
        };
        let key = KeyPair::from_pem(key_pem).map_err(generate)?;
        let issuer = Issuer::from_ca_cert_pem(cert_pem, key).map_err(generate)?;
        Ok(Self {
            issuer,
            pem: Issued {
                cert_pem: cert_pem.to_owned(),
                key_pem: key_pem.to_owned(),
            },
        })
    }

    /// The CA's own certificate and key.
    pub fn pem(&self) -> &Issued {
        &self.pem
    }

    /// A node certificate: common name `node:<name>`, usable as server and as client, valid for
    /// `localhost`, `127.0.0.1`, `::1`, `name` and every entry of `sans` (host names or IPs).
    pub fn node(
        &self,
        name: &str,
        sans: &[String],
        validity: Validity,
    ) -> Result<Issued, CertError> {
        let mut names = vec![
            "localhost".to_owned(),
            "127.0.0.1".to_owned(),
            "::1".to_owned(),
        ];
        if name.parse::<IpAddr>().is_ok() || is_dns_name(name) {
            names.push(name.to_owned());
        }
        names.extend(sans.iter().cloned());
        names.dedup();
        self.issue(
            &format!("{NODE_PREFIX}{name}"),
            names,
            vec![
                ExtendedKeyUsagePurpose::ServerAuth,
                ExtendedKeyUsagePurpose::ClientAuth,
            ],
            validity,
        )
    }

    /// A client certificate whose common name is `subject`.
    pub fn client(&self, subject: &str, validity: Validity) -> Result<Issued, CertError> {
        if subject == crate::net::ANONYMOUS {
            return Err(CertError::Invalid {
                what: format!("client certificate {subject:?}"),
                message: "\"anonymous\" is reserved for plaintext connections; nodes refuse it"
                    .into(),
            });
        }
        self.issue(
            subject,
            Vec::new(),
            vec![ExtendedKeyUsagePurpose::ClientAuth],
            validity,
        )
    }

    fn issue(
        &self,
        common_name: &str,
        sans: Vec<String>,
        usages: Vec<ExtendedKeyUsagePurpose>,
        validity: Validity,
    ) -> Result<Issued, CertError> {
        let generate = |source| CertError::Generate {
            what: format!("the certificate of {common_name}"),
            source,
        };
        let key = KeyPair::generate().map_err(generate)?;
        let mut params = CertificateParams::new(sans).map_err(generate)?;
        params
            .distinguished_name
            .push(DnType::CommonName, common_name);
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.extended_key_usages = usages;
        params.use_authority_key_identifier_extension = true;
        params.not_before = validity.not_before;
        params.not_after = validity.not_after;
        let cert = params.signed_by(&key, &self.issuer).map_err(generate)?;
        Ok(Issued {
            cert_pem: cert.pem(),
            key_pem: key.serialize_pem(),
        })
    }
}

fn is_dns_name(name: &str) -> bool {
    !name.is_empty()
        && name.split('.').all(|label| {
            !label.is_empty() && label.chars().all(|c| c.is_ascii_alphanumeric() || c == '-')
        })
}

/// The file of the cluster key in the directory `goutube certs` writes.
pub const CLUSTER_KEY_FILE: &str = "cluster.key";

/// What `goutube certs` writes.
#[derive(Clone, Copy)]
pub struct Request<'a> {
    /// The directory written.
    pub out: &'a Path,
    /// The node certificates (`node:<name>`).
    pub nodes: &'a [String],
    /// Extra subject alternative names of the node certificates.
    pub sans: &'a [String],
    /// The client certificates (their subjects).
    pub clients: &'a [String],
    /// How long each is valid.
    pub days: i64,
    /// Replace files that exist.
    pub force: bool,
}

/// Writes a CA (or reuses the one in `out`), then the node and client certificates: `ca.pem`,
/// `ca-key.pem`, `node-<name>.pem`, `node-<name>-key.pem`, `client-<subject>.pem`,
/// `client-<subject>-key.pem`, and the cluster key that seals gossip, `cluster.key` (also reused
/// when present). Keys are written with mode 0600. No existing file is replaced unless `force`.
/// Returns the paths written.
pub fn write(request: &Request<'_>) -> Result<Vec<PathBuf>, CertError> {
    let out = request.out;
    std::fs::create_dir_all(out).map_err(|source| CertError::Io {
        path: out.to_owned(),
        source,
    })?;
    let validity = Validity::days(request.days);
    let ca_cert = out.join("ca.pem");
    let ca_key = out.join("ca-key.pem");
    let mut files: Vec<(PathBuf, String, bool)> = Vec::new();
    let authority = if ca_cert.exists() && ca_key.exists() && !request.force {
        // Keep the existing CA: certificates issued before stay valid.
        let read = |path: &Path| {
            std::fs::read_to_string(path).map_err(|source| CertError::Io {
                path: path.to_owned(),
                source,
            })
        };
        Authority::from_pem(&read(&ca_cert)?, &read(&ca_key)?)?
    } else {
        let authority = Authority::new(
            "goutube development CA",
            Validity::days(request.days.max(3650)),
        )?;
        files.push((ca_cert, authority.pem().cert_pem.clone(), false));
        files.push((ca_key, authority.pem().key_pem.clone(), true));
        authority
    };
    let cluster_key = out.join(CLUSTER_KEY_FILE);
    if !cluster_key.exists() || request.force {
        use rand::RngCore;
        let mut secret = [0u8; 32];
        rand::rng().fill_bytes(&mut secret);
        let hex: String = secret.iter().map(|b| format!("{b:02x}")).collect();
        files.push((cluster_key, format!("{hex}\n"), true));
    }
    for name in request.nodes {
        let issued = authority.node(name, request.sans, validity)?;
        files.push((out.join(format!("node-{name}.pem")), issued.cert_pem, false));
        files.push((
            out.join(format!("node-{name}-key.pem")),
            issued.key_pem,
            true,
        ));
    }
    for subject in request.clients {
        let issued = authority.client(subject, validity)?;
        files.push((
            out.join(format!("client-{subject}.pem")),
            issued.cert_pem,
            false,
        ));
        files.push((
            out.join(format!("client-{subject}-key.pem")),
            issued.key_pem,
            true,
        ));
    }
    if !request.force
        && let Some((path, _, _)) = files.iter().find(|(path, _, _)| path.exists())
    {
        return Err(CertError::Exists(path.clone()));
    }
    for (path, contents, private) in &files {
        write_file(path, contents, *private)?;
    }
    Ok(files.into_iter().map(|(path, _, _)| path).collect())
}

fn write_file(path: &Path, contents: &str, private: bool) -> Result<(), CertError> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let io = |source| CertError::Io {
        path: path.to_owned(),
        source,
    };
    let mode = if private { 0o600 } else { 0o644 };
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(mode)
        .open(path)
        .map_err(io)?;
    // `mode` only applies to new files: tighten a replaced key too.
    use std::os::unix::fs::PermissionsExt;
    file.set_permissions(std::fs::Permissions::from_mode(mode))
        .map_err(io)?;
    file.write_all(contents.as_bytes()).map_err(io)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn node_and_client_certificates_carry_their_identity() {
        let ca = Authority::new("test CA", Validity::days(1)).unwrap();
        let node = ca
            .node(
                "alpha",
                &["10.1.2.3".into(), "alpha.example".into()],
                Validity::days(1),
            )
            .unwrap();
        let der = pem_der(&node.cert_pem);
        assert_eq!(crate::tls::common_name(&der).unwrap(), "node:alpha");
        let client = ca.client("alice", Validity::days(1)).unwrap();
        assert_eq!(
            crate::tls::common_name(&pem_der(&client.cert_pem)).unwrap(),
            "alice"
        );
        assert!(ca.client("anonymous", Validity::days(1)).is_err());
        let reloaded = Authority::from_pem(&ca.pem().cert_pem, &ca.pem().key_pem).unwrap();
        reloaded.client("bob", Validity::days(1)).unwrap();
    }

    fn pem_der(pem: &str) -> Vec<u8> {
        use rustls::pki_types::CertificateDer;
        use rustls::pki_types::pem::PemObject;
        CertificateDer::from_pem_slice(pem.as_bytes())
            .unwrap()
            .to_vec()
    }

    #[test]
    fn write_refuses_to_overwrite_and_protects_keys() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let nodes = ["n1".to_string()];
        let clients = ["root".to_string(), "nobody".to_string()];
        let request = Request {
            out: dir.path(),
            nodes: &nodes,
            sans: &[],
            clients: &clients,
            days: 1,
            force: false,
        };
        let written = write(&request).unwrap();
        assert_eq!(written.len(), 9);
        let cluster_key = std::fs::read_to_string(dir.path().join(CLUSTER_KEY_FILE)).unwrap();
        assert_eq!(cluster_key.trim().len(), 64, "32 random bytes, hex");
        for path in &written {
            let mode = std::fs::metadata(path).unwrap().permissions().mode() & 0o777;
            let name = path.to_str().unwrap();
            let key = name.ends_with("-key.pem") || name.ends_with(CLUSTER_KEY_FILE);
            assert_eq!(mode, if key { 0o600 } else { 0o644 }, "{}", path.display());
        }
        let before = std::fs::read(dir.path().join("client-root.pem")).unwrap();
        assert!(matches!(write(&request), Err(CertError::Exists(_))));
        assert_eq!(
            std::fs::read(dir.path().join("client-root.pem")).unwrap(),
            before
        );
        // A new client with the existing CA is fine.
        let more = ["alice".to_string()];
        let ca_before = std::fs::read(dir.path().join("ca.pem")).unwrap();
        write(&Request {
            clients: &more,
            nodes: &[],
            ..request
        })
        .unwrap();
        assert_eq!(std::fs::read(dir.path().join("ca.pem")).unwrap(), ca_before);
        // --force replaces everything, including the CA.
        write(&Request {
            force: true,
            ..request
        })
        .unwrap();
        assert_ne!(std::fs::read(dir.path().join("ca.pem")).unwrap(), ca_before);
    }
}
