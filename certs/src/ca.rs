//! A certificate authority that signs leaf certificates.

use std::fmt;

use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, IsCa, Issuer, KeyPair,
    KeyUsagePurpose,
};
use rustls_pki_types::CertificateDer;
use rustls_pki_types::pem::PemObject;
use time::OffsetDateTime;

use crate::Error;
use crate::leaf::{Leaf, LeafSpec, check_validity, validity};

/// Default lifetime of a CA made by [`Ca::new`], in days (ten years).
pub const CA_DAYS: u32 = 3650;

/// A CA: its certificate and the key that signs with it. `Debug` does not show the key.
pub struct Ca {
    cert_pem: String,
    issuer: Issuer<'static, KeyPair>,
}

impl Ca {
    /// A new self-signed CA, valid from an hour ago for ten years.
    pub fn new(common_name: &str) -> Result<Ca, Error> {
        let (not_before, not_after) = validity(CA_DAYS);
        Ca::with_validity(common_name, not_before, not_after)
    }

    /// A new self-signed CA with the given validity.
    pub fn with_validity(
        common_name: &str,
        not_before: OffsetDateTime,
        not_after: OffsetDateTime,
    ) -> Result<Ca, Error> {
        check_validity(not_before, not_after)?;
        let key = KeyPair::generate()?;
        let mut params = CertificateParams::default();
        params.distinguished_name = common_name_dn(common_name);
        // Path length 0: this CA signs leaves only, never another CA.
        params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
        params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        params.not_before = not_before;
        params.not_after = not_after;
        let cert = params.self_signed(&key)?;
        Ok(Ca {
            cert_pem: cert.pem(),
            issuer: Issuer::new(params, key),
        })
    }

    /// Loads a CA from its PEM certificate and PEM private key.
    ///
    /// The certificate text must hold exactly one certificate, marked as a CA, whose public key
    /// is the key's: a bundle of several CAs is refused, since it is unclear which one signs.
    pub fn from_pem(cert_pem: &str, key_pem: &str) -> Result<Ca, Error> {
        let certs = CertificateDer::pem_slice_iter(cert_pem.as_bytes())
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| bad_cert(format!("not PEM: {e}")))?;
        let der = match certs.as_slice() {
            [der] => der,
            [] => return Err(bad_cert("no CERTIFICATE block found".into())),
            more => {
                return Err(bad_cert(format!(
                    "{} certificates found; give the signing CA certificate alone",
                    more.len()
                )));
            }
        };
        let (_, x509) = x509_parser::parse_x509_certificate(der)
            .map_err(|e| bad_cert(format!("not an X.509 certificate: {e}")))?;
        if !x509.is_ca() {
            return Err(bad_cert(
                "it is not a CA (no basicConstraints CA:TRUE)".into(),
            ));
        }
        let key = KeyPair::from_pem(key_pem).map_err(|e| Error::BadCa {
            what: "key",
            reason: e.to_string(),
        })?;
        if key.public_key_raw() != x509.public_key().subject_public_key.data.as_ref() {
            return Err(Error::BadCa {
                what: "key",
                reason: "it does not belong to the CA certificate".into(),
            });
        }
        let issuer = Issuer::from_ca_cert_der(der, key).map_err(|e| bad_cert(e.to_string()))?;
        Ok(Ca {
            cert_pem: cert_pem.to_owned(),
            issuer,
        })
    }

    /// The CA certificate, PEM.
    pub fn cert_pem(&self) -> String {
        self.cert_pem.clone()
    }

    /// The CA private key, PKCS#8 PEM.
    pub fn key_pem(&self) -> String {
        self.issuer.key().serialize_pem()
    }

    /// Issues a leaf certificate with a fresh ECDSA P-256 key.
    pub fn issue(&self, spec: &LeafSpec) -> Result<Leaf, Error> {
        check_validity(spec.not_before, spec.not_after)?;
        let mut params = CertificateParams::default();
        params.distinguished_name = common_name_dn(&spec.common_name);
        params.subject_alt_names = spec.san_types()?;
        params.is_ca = IsCa::ExplicitNoCa;
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.extended_key_usages = spec.usage.purposes();
        params.use_authority_key_identifier_extension = true;
        params.not_before = spec.not_before;
        params.not_after = spec.not_after;
        let key = KeyPair::generate()?;
        let cert = params.signed_by(&key, &self.issuer)?;
        Ok(Leaf {
            cert_pem: cert.pem(),
            key_pem: key.serialize_pem(),
        })
    }
}

impl Ca {
    /// A CRL, signed by this CA, revoking the given leaf certificates (PEM); valid from an
    /// hour ago until `next_update`.
    pub fn crl(&self, revoked: &[&str], next_update: OffsetDateTime) -> Result<String, Error> {
        let now = OffsetDateTime::now_utc();
        let revoked_certs = revoked
            .iter()
            .map(|pem| {
                let der = CertificateDer::from_pem_slice(pem.as_bytes())
                    .map_err(|e| Error::Crl(format!("revoked certificate: {e}")))?;
                let (_, cert) = x509_parser::parse_x509_certificate(der.as_ref())
                    .map_err(|e| Error::Crl(format!("revoked certificate: {e}")))?;
                Ok(rcgen::RevokedCertParams {
                    serial_number: rcgen::SerialNumber::from_slice(cert.raw_serial()),
                    revocation_time: now - time::Duration::hours(1),
                    reason_code: Some(rcgen::RevocationReason::KeyCompromise),
                    invalidity_date: None,
                })
            })
            .collect::<Result<Vec<_>, Error>>()?;
        let params = rcgen::CertificateRevocationListParams {
            this_update: now - time::Duration::hours(1),
            next_update,
            crl_number: rcgen::SerialNumber::from(now.unix_timestamp() as u64),
            issuing_distribution_point: None,
            revoked_certs,
            key_identifier_method: rcgen::KeyIdMethod::Sha256,
        };
        let crl = params
            .signed_by(&self.issuer)
            .map_err(|e| Error::Crl(e.to_string()))?;
        crl.pem().map_err(|e| Error::Crl(e.to_string()))
    }
}

impl fmt::Debug for Ca {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // rcgen's Issuer Debug leaves the signing key out.
        f.debug_struct("Ca")
            .field("issuer", &self.issuer)
            .field("key", &"<redacted>")
            .finish()
    }
}

fn common_name_dn(common_name: &str) -> DistinguishedName {
    let mut dn = DistinguishedName::new();
    dn.push(DnType::CommonName, common_name);
    dn
}

fn bad_cert(reason: String) -> Error {
    Error::BadCa {
        what: "certificate",
        reason,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trips_through_pem() {
        let ca = Ca::new("test CA").unwrap();
        let loaded = Ca::from_pem(&ca.cert_pem(), &ca.key_pem()).unwrap();
        assert_eq!(loaded.cert_pem(), ca.cert_pem());
        assert_eq!(loaded.key_pem(), ca.key_pem());
    }

    #[test]
    fn refuses_a_key_of_another_ca() {
        let a = Ca::new("a").unwrap();
        let b = Ca::new("b").unwrap();
        let err = Ca::from_pem(&a.cert_pem(), &b.key_pem()).unwrap_err();
        assert!(err.to_string().contains("does not belong"), "{err}");
        assert!(err.is_usage());
    }

    #[test]
    fn refuses_a_bundle_and_a_leaf() {
        let a = Ca::new("a").unwrap();
        let bundle = a.cert_pem() + &a.cert_pem();
        let err = Ca::from_pem(&bundle, &a.key_pem()).unwrap_err();
        assert!(err.to_string().contains("2 certificates"), "{err}");

        let leaf = a.issue(&LeafSpec::client("x")).unwrap();
        let err = Ca::from_pem(&leaf.cert_pem, &leaf.key_pem).unwrap_err();
        assert!(err.to_string().contains("not a CA"), "{err}");

        let err = Ca::from_pem("garbage", &a.key_pem()).unwrap_err();
        assert!(err.is_usage());
    }

    #[test]
    fn debug_masks_the_key() {
        let ca = Ca::new("a").unwrap();
        let shown = format!("{ca:?}");
        let key_body: String = ca.key_pem().lines().nth(1).unwrap().to_owned();
        assert!(!shown.contains(&key_body), "{shown}");
    }

    #[test]
    fn refuses_reversed_validity() {
        let ca = Ca::new("a").unwrap();
        let mut spec = LeafSpec::client("x");
        spec.not_after = spec.not_before;
        assert!(matches!(ca.issue(&spec), Err(Error::InvalidValidity(_))));
    }
}
