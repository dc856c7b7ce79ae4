//! The PEM files of the test PKI, read for hand-made TLS peers (rogue agents and DMZ nodes,
//! handshake probes).

use std::path::Path;

use rustls::RootCertStore;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};

use crate::Pki;

/// Every certificate in the PEM file at `path`.
pub fn certs(path: &Path) -> Vec<CertificateDer<'static>> {
    CertificateDer::pem_file_iter(path)
        .expect("read certs")
        .collect::<Result<_, _>>()
        .expect("parse certs")
}

/// The private key in the PEM file at `path`.
pub fn key(path: &Path) -> PrivateKeyDer<'static> {
    PrivateKeyDer::from_pem_file(path).expect("read key")
}

/// A root store holding the PKI's CA (`ca.pem`).
pub fn roots(pki: &Pki) -> RootCertStore {
    let mut roots = RootCertStore::empty();
    for c in certs(&pki.path("ca.pem")) {
        roots.add(c).expect("add root");
    }
    roots
}
