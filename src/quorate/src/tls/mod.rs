//! TLS for every connection, and identities from certificates.
//!
//! - [`certs`]: `quorate certs init|issue` (a cluster CA, certificates per
//!   identity).
//! - [`config`]: rustls configurations for both sides, reloaded when their
//!   files change.
//! - [`transport`]: plain text or mutual TLS for every gRPC connection; a
//!   server's accepted connections carry their peer's identity.
//! - [`caller`]: who is calling, and the one enforcement of
//!   `quorate_core::access::check` (refusals logged and counted).
//! - [`identity_of`]: the identity a peer's certificate carries (its one
//!   `quorate://` URI subject alternative name), checked by the service
//!   layer with `quorate_core::access::check`.

pub mod caller;
pub mod certs;
pub mod config;
pub mod transport;

use quorate_core::access::{Identity, URI_SCHEME};
use x509_parser::extensions::GeneralName;
use x509_parser::prelude::{FromDer as _, X509Certificate};

/// Why a certificate carries no usable identity.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum IdentityError {
    #[error("the certificate cannot be parsed: {0}")]
    Parse(String),
    #[error("the certificate has no quorate:// URI subject alternative name (issue it with `quorate certs issue`)")]
    Missing,
    #[error("the certificate has {0} quorate:// URI subject alternative names; it must have exactly one")]
    Several(usize),
    #[error("the certificate's identity: {0}")]
    Bad(#[from] quorate_core::access::IdentityError),
}

/// The identity in a (CA-verified) certificate.
pub fn identity_of(cert_der: &[u8]) -> Result<Identity, IdentityError> {
    let (_, cert) = X509Certificate::from_der(cert_der).map_err(|e| IdentityError::Parse(e.to_string()))?;
    let sans = cert.subject_alternative_name().map_err(|e| IdentityError::Parse(e.to_string()))?;
    let uris: Vec<&str> = sans
        .iter()
        .flat_map(|ext| ext.value.general_names.iter())
        .filter_map(|n| match n {
            GeneralName::URI(u) if u.starts_with(URI_SCHEME) => Some(*u),
            _ => None,
        })
        .collect();
    match uris.as_slice() {
        [] => Err(IdentityError::Missing),
        [one] => Ok(Identity::parse_uri(one)?),
        many => Err(IdentityError::Several(many.len())),
    }
}

#[cfg(test)]
mod tests {
    use quorate_core::access::Role;

    use super::certs::{IssueRequest, init, issue};
    use super::*;

    fn der_of(path: &std::path::Path) -> Vec<u8> {
        use rustls_pki_types::CertificateDer;
        use rustls_pki_types::pem::PemObject as _;
        CertificateDer::from_pem_file(path).unwrap().to_vec()
    }

    #[test]
    fn the_identity_is_read_back_from_the_issued_certificate() {
        let dir = tempfile::tempdir().unwrap();
        init(dir.path()).unwrap();
        let mut req = IssueRequest::new("svc", Role::Client);
        req.groups = vec!["g1".into(), "*".into()];
        let (crt, _) = issue(dir.path(), &req).unwrap();
        assert_eq!(identity_of(&der_of(&crt)).unwrap(), req.identity().unwrap());
        // The CA itself carries no identity.
        let ca = der_of(&dir.path().join(certs::CA_CERT));
        assert_eq!(identity_of(&ca), Err(IdentityError::Missing));
        assert!(matches!(identity_of(b"not a certificate"), Err(IdentityError::Parse(_))));
    }
}
