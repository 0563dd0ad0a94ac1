//! Certificates generated in-process for TLS servers and clients.

use std::path::{Path, PathBuf};

use rcgen::{
    BasicConstraints, CertificateParams, CertifiedIssuer, DnType, ExtendedKeyUsagePurpose, IsCa,
    KeyPair, KeyUsagePurpose,
};

use crate::HarnessError;

/// A certificate authority plus a server and a client certificate it signed,
/// written as PEM files into a directory.
///
/// The server certificate is valid for `localhost` and `127.0.0.1`.
///
/// ```no_run
/// # fn main() -> Result<(), natskit_testing::HarnessError> {
/// let dir = tempfile::tempdir().unwrap();
/// let tls = natskit_testing::TlsFiles::generate(dir.path())?;
/// assert!(tls.ca.exists() && tls.client_cert.exists());
/// # Ok(()) }
/// ```
#[derive(Debug, Clone)]
pub struct TlsFiles {
    /// The CA certificate that signed both certificates below.
    pub ca: PathBuf,
    /// Server certificate (PEM).
    pub server_cert: PathBuf,
    /// Server private key (PEM).
    pub server_key: PathBuf,
    /// Client certificate (PEM), for servers that verify client certificates.
    pub client_cert: PathBuf,
    /// Client private key (PEM).
    pub client_key: PathBuf,
}

impl TlsFiles {
    /// Generates a fresh CA, server and client certificate into `dir`.
    ///
    /// # Errors
    /// Certificate generation or file writing failed.
    pub fn generate(dir: &Path) -> Result<Self, HarnessError> {
        let mut ca_params = CertificateParams::new(Vec::<String>::new())?;
        ca_params
            .distinguished_name
            .push(DnType::CommonName, "natskit-testing CA");
        ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        ca_params.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::CrlSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        let ca = CertifiedIssuer::self_signed(ca_params, KeyPair::generate()?)?;

        let leaf = |name: &str, usage: ExtendedKeyUsagePurpose| -> Result<_, HarnessError> {
            let mut params =
                CertificateParams::new(vec!["localhost".to_owned(), "127.0.0.1".to_owned()])?;
            params.distinguished_name.push(DnType::CommonName, name);
            params.extended_key_usages = vec![usage];
            let key = KeyPair::generate()?;
            let cert = params.signed_by(&key, &ca)?;
            Ok((cert.pem(), key.serialize_pem()))
        };
        let (server_cert, server_key) =
            leaf("natskit-server", ExtendedKeyUsagePurpose::ServerAuth)?;
        let (client_cert, client_key) =
            leaf("natskit-client", ExtendedKeyUsagePurpose::ClientAuth)?;

        let write = |name: &str, pem: &str| -> Result<PathBuf, HarnessError> {
            let path = dir.join(name);
            std::fs::write(&path, pem).map_err(|e| HarnessError::io("writing a PEM file", e))?;
            Ok(path)
        };
        Ok(Self {
            ca: write("ca.pem", &ca.pem())?,
            server_cert: write("server-cert.pem", &server_cert)?,
            server_key: write("server-key.pem", &server_key)?,
            client_cert: write("client-cert.pem", &client_cert)?,
            client_key: write("client-key.pem", &client_key)?,
        })
    }
}
