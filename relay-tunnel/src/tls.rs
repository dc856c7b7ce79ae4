//! TLS for the tunnel: TLS 1.3 only, mutual authentication, ALPN required, no resumption on
//! the DMZ listener, and the agent identity taken from its certificate.

use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use rustls::crypto::CryptoProvider;
use rustls::server::WebPkiClientVerifier;
use rustls::server::danger::ClientCertVerifier;
use rustls::{ClientConfig, RootCertStore, ServerConfig};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, CertificateRevocationListDer, PrivateKeyDer};

/// A TLS file that cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    /// The file cannot be read or holds no usable PEM item.
    #[error("{path}: {reason}")]
    File {
        /// The file.
        path: PathBuf,
        /// What is wrong with it.
        reason: String,
    },
    /// rustls refused the material (e.g. key does not match certificate).
    #[error("{0}")]
    Rustls(String),
}

fn file_error(path: &Path, reason: impl fmt::Display) -> TlsError {
    TlsError::File {
        path: path.to_owned(),
        reason: reason.to_string(),
    }
}

/// A certificate chain and its private key. `Debug` never shows the key.
#[derive(Clone)]
pub struct Credentials {
    chain: Vec<CertificateDer<'static>>,
    key: Arc<PrivateKeyDer<'static>>,
    /// Where they came from, for error messages.
    origin: String,
}

impl fmt::Debug for Credentials {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Credentials")
            .field("chain_len", &self.chain.len())
            .field("key", &"<redacted>")
            .finish()
    }
}

impl Credentials {
    /// Loads a PEM certificate chain and a PEM private key.
    pub fn load(cert: &Path, key: &Path) -> Result<Self, TlsError> {
        Ok(Self::from_parts(
            load_certs(cert)?,
            load_key(key)?,
            cert,
            key,
        ))
    }

    /// Pairs a chain and a key loaded by [`load_certs`] and [`load_key`].
    pub fn from_parts(
        chain: Vec<CertificateDer<'static>>,
        key: PrivateKeyDer<'static>,
        cert_path: &Path,
        key_path: &Path,
    ) -> Self {
        Self {
            chain,
            key: Arc::new(key),
            origin: format!("{} and {}", cert_path.display(), key_path.display()),
        }
    }

    /// The end-entity certificate.
    pub fn leaf(&self) -> &CertificateDer<'static> {
        &self.chain[0]
    }

    /// The certificate chain.
    pub fn chain(&self) -> &[CertificateDer<'static>] {
        &self.chain
    }

    /// A copy of the private key.
    pub fn key(&self) -> PrivateKeyDer<'static> {
        self.key.clone_key()
    }
}

fn pem_reason(e: rustls_pki_types::pem::Error) -> String {
    match e {
        rustls_pki_types::pem::Error::Io(io) => io.to_string(),
        rustls_pki_types::pem::Error::NoItemsFound => "no PEM item of the expected kind".into(),
        other => format!("invalid PEM: {other:?}"),
    }
}

/// Loads a PEM private key that the crypto provider can use.
pub fn load_key(path: &Path) -> Result<PrivateKeyDer<'static>, TlsError> {
    let key = PrivateKeyDer::from_pem_file(path).map_err(|e| file_error(path, pem_reason(e)))?;
    provider()
        .key_provider
        .load_private_key(key.clone_key())
        .map_err(|e| file_error(path, format!("unusable private key: {e}")))?;
    Ok(key)
}

/// Loads every certificate of a PEM file; fails if there is none.
pub fn load_certs(path: &Path) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let certs = CertificateDer::pem_file_iter(path)
        .map_err(|e| file_error(path, pem_reason(e)))?
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| file_error(path, pem_reason(e)))?;
    if certs.is_empty() {
        return Err(file_error(path, "no certificate found"));
    }
    Ok(certs)
}

/// Loads a CA bundle into a root store.
pub fn load_roots(path: &Path) -> Result<RootCertStore, TlsError> {
    let mut roots = RootCertStore::empty();
    for cert in load_certs(path)? {
        roots
            .add(cert)
            .map_err(|e| file_error(path, format!("not a usable CA certificate: {e}")))?;
    }
    Ok(roots)
}

/// The crypto provider of every tunnel endpoint.
pub fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::aws_lc_rs::default_provider())
}

/// Verifies agent certificates against `roots`, and against `crls` when given (an expired
/// CRL fails every handshake rather than being ignored).
pub fn client_verifier(
    roots: RootCertStore,
    crls: Vec<CertificateRevocationListDer<'static>>,
) -> Result<Arc<dyn ClientCertVerifier>, TlsError> {
    let mut builder = WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider());
    if !crls.is_empty() {
        builder = builder.with_crls(crls).enforce_revocation_expiration();
    }
    builder
        .build()
        .map_err(|e| TlsError::Rustls(format!("client verifier: {e}")))
}

/// Loads every CRL of a PEM file; fails if there is none.
pub fn load_crls(path: &Path) -> Result<Vec<CertificateRevocationListDer<'static>>, TlsError> {
    let crls = CertificateRevocationListDer::pem_file_iter(path)
        .map_err(|e| file_error(path, pem_reason(e)))?
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| file_error(path, pem_reason(e)))?;
    if crls.is_empty() {
        return Err(file_error(path, "no CRL found"));
    }
    Ok(crls)
}

/// Whether a certificate chain presented earlier still passes `verifier` now (after a reload
/// of the CA).
pub fn still_valid(verifier: &dyn ClientCertVerifier, chain: &[CertificateDer<'static>]) -> bool {
    let Some((leaf, intermediates)) = chain.split_first() else {
        return false;
    };
    verifier
        .verify_client_cert(leaf, intermediates, rustls_pki_types::UnixTime::now())
        .is_ok()
}

/// The DMZ's tunnel listener config: TLS 1.3, client certificates required and checked by
/// `verifier`, ALPN `alpn`, no session tickets and no session cache.
pub fn server_config(
    creds: &Credentials,
    verifier: Arc<dyn ClientCertVerifier>,
    alpn: &[&[u8]],
) -> Result<Arc<ServerConfig>, TlsError> {
    let provider = provider();
    let mut config = ServerConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(|e| TlsError::Rustls(e.to_string()))?
        .with_client_cert_verifier(verifier)
        .with_single_cert(creds.chain.clone(), creds.key.clone_key())
        .map_err(|e| TlsError::Rustls(format!("certificate and key ({}): {e}", creds.origin)))?;
    config.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
    config.session_storage = Arc::new(rustls::server::NoServerSessionStorage {});
    config.send_tls13_tickets = 0;
    Ok(Arc::new(config))
}

/// The agent's dialer config: TLS 1.3, the DMZ verified against `roots`, our client
/// certificate, ALPN `alpn`, no resumption.
pub fn client_config(
    creds: &Credentials,
    roots: RootCertStore,
    alpn: &[&[u8]],
) -> Result<Arc<ClientConfig>, TlsError> {
    let mut config = ClientConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(|e| TlsError::Rustls(e.to_string()))?
        .with_root_certificates(roots)
        .with_client_auth_cert(creds.chain.clone(), creds.key.clone_key())
        .map_err(|e| TlsError::Rustls(format!("certificate and key ({}): {e}", creds.origin)))?;
    config.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
    config.resumption = rustls::client::Resumption::disabled();
    Ok(Arc::new(config))
}

/// The identity of a certificate: its first DNS or URI subject alternative name.
pub fn identity(cert: &CertificateDer<'_>) -> Option<String> {
    use x509_parser::prelude::{FromDer, GeneralName, X509Certificate};
    let (_, parsed) = X509Certificate::from_der(cert.as_ref()).ok()?;
    let san = parsed.subject_alternative_name().ok()??;
    san.value.general_names.iter().find_map(|name| match name {
        GeneralName::DNSName(s) | GeneralName::URI(s) => Some((*s).to_owned()),
        _ => None,
    })
}

/// The identity of the peer of an established connection.
pub fn peer_identity(conn: &rustls::CommonState) -> Option<String> {
    identity(conn.peer_certificates()?.first()?)
}

/// A server certificate verifier that accepts any certificate but still checks the handshake
/// signatures: for health checks of targets whose CA the agent does not have (a check proves
/// that a TLS server answers, not who it is). Never used for the tunnel.
#[derive(Debug)]
pub struct AnyServerCert(Arc<CryptoProvider>);

impl AnyServerCert {
    /// A verifier with the tunnel's crypto provider.
    pub fn new() -> Self {
        Self(provider())
    }
}

impl Default for AnyServerCert {
    fn default() -> Self {
        Self::new()
    }
}

impl rustls::client::danger::ServerCertVerifier for AnyServerCert {
    fn verify_server_cert(
        &self,
        _end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &rustls_pki_types::ServerName<'_>,
        _ocsp_response: &[u8],
        _now: rustls_pki_types::UnixTime,
    ) -> Result<rustls::client::danger::ServerCertVerified, rustls::Error> {
        Ok(rustls::client::danger::ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}
