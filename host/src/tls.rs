//! TLS: rustls configurations from PEM files, and identities from certificates.
//!
//! Every listener requires and verifies a client certificate signed by the configured CA when TLS
//! is on; the subject of a connection is the common name of that certificate. Only the `ring`
//! provider is compiled in.

use rustls::server::ServerConnection;
use x509_parser::prelude::{FromDer, X509Certificate};

/// The common name of the first certificate the client presented, if any.
pub fn subject_of(connection: &ServerConnection) -> Option<String> {
    let certificate = connection.peer_certificates()?.first()?;
    common_name(certificate.as_ref())
}

/// The first common name in the subject of a DER certificate.
pub fn common_name(der: &[u8]) -> Option<String> {
    let (_, certificate) = X509Certificate::from_der(der).ok()?;
    let cn = certificate.subject().iter_common_name().next()?;
    cn.as_str().ok().map(str::to_owned)
}
