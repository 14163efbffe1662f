//! A throw-away certificate authority and a server certificate it signs for
//! `localhost`/`127.0.0.1`, so TLS fakes are verified like real servers (clients add the
//! CA as a trust root; nothing disables verification).

use rcgen::{
    BasicConstraints, CertificateParams, CertifiedIssuer, DnType, IsCa, KeyPair, KeyUsagePurpose,
};
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};
use std::sync::Arc;

/// Errors making test certificates or the TLS configuration.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    /// rcgen failed.
    #[error("certificate generation")]
    Rcgen(#[from] rcgen::Error),
    /// rustls refused the configuration.
    #[error("tls configuration")]
    Rustls(#[from] rustls::Error),
}

/// A test CA and one server certificate.
pub struct TestCa {
    ca_pem: String,
    server_config: Arc<rustls::ServerConfig>,
}

impl TestCa {
    /// Generates a CA and a server certificate for `localhost` and `127.0.0.1`, with the
    /// given ALPN protocols (e.g. `[b"h2"]`).
    ///
    /// # Errors
    /// [`TlsError`] if generation fails.
    pub fn new(alpn: &[&[u8]]) -> Result<Self, TlsError> {
        let mut ca_params = CertificateParams::new(Vec::<String>::new())?;
        ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        ca_params
            .distinguished_name
            .push(DnType::CommonName, "Herald test CA");
        ca_params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        let ca = CertifiedIssuer::self_signed(ca_params, KeyPair::generate()?)?;

        let server_key = KeyPair::generate()?;
        let mut params =
            CertificateParams::new(vec!["localhost".to_owned(), "127.0.0.1".to_owned()])?;
        params
            .distinguished_name
            .push(DnType::CommonName, "localhost");
        let server_cert = params.signed_by(&server_key, &ca)?;

        let key = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(server_key.serialize_der()));
        let chain: Vec<CertificateDer<'static>> = vec![server_cert.der().clone(), ca.der().clone()];
        let mut config = rustls::ServerConfig::builder_with_provider(Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_safe_default_protocol_versions()?
        .with_no_client_auth()
        .with_single_cert(chain, key)?;
        config.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
        Ok(Self {
            ca_pem: ca.pem(),
            server_config: Arc::new(config),
        })
    }

    /// The CA certificate, PEM: what clients must trust.
    pub fn ca_pem(&self) -> &str {
        &self.ca_pem
    }

    /// The server side.
    pub fn server_config(&self) -> Arc<rustls::ServerConfig> {
        Arc::clone(&self.server_config)
    }
}
