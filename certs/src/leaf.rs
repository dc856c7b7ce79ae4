//! What an end-entity certificate should contain, and what issuing one returns.

use std::fmt;
use std::net::IpAddr;

use rcgen::{ExtendedKeyUsagePurpose, SanType};
use time::{Duration, OffsetDateTime};

use crate::Error;

/// Default lifetime of a leaf certificate, in days (the CA/Browser Forum's old maximum).
pub const DEFAULT_DAYS: u32 = 825;

/// The extended key usage of a leaf certificate.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Usage {
    /// serverAuth only: the DMZ's tunnel certificate.
    Server,
    /// clientAuth only: an agent's certificate.
    Client,
    /// serverAuth and clientAuth.
    Both,
    /// No extendedKeyUsage extension at all (RFC 5280 reads that as "any purpose").
    Unrestricted,
}

impl Usage {
    pub(crate) fn purposes(self) -> Vec<ExtendedKeyUsagePurpose> {
        match self {
            Usage::Server => vec![ExtendedKeyUsagePurpose::ServerAuth],
            Usage::Client => vec![ExtendedKeyUsagePurpose::ClientAuth],
            Usage::Both => vec![
                ExtendedKeyUsagePurpose::ServerAuth,
                ExtendedKeyUsagePurpose::ClientAuth,
            ],
            Usage::Unrestricted => Vec::new(),
        }
    }
}

/// The contents of a leaf certificate to issue.
#[derive(Clone, Debug)]
pub struct LeafSpec {
    /// The subject's common name.
    pub common_name: String,
    /// Subject alternative names, in order: an IP address if the value parses as one, a URI
    /// if it contains "://" (e.g. `spiffe://...`), else a DNS name.
    pub sans: Vec<String>,
    /// The extended key usage.
    pub usage: Usage,
    /// Start of validity.
    pub not_before: OffsetDateTime,
    /// End of validity.
    pub not_after: OffsetDateTime,
}

impl LeafSpec {
    /// A server certificate for `names` (CN = first name), valid from an hour ago for 825 days.
    pub fn server(names: &[&str]) -> LeafSpec {
        let (not_before, not_after) = validity(DEFAULT_DAYS);
        LeafSpec {
            common_name: names.first().copied().unwrap_or_default().to_owned(),
            sans: names.iter().map(|n| (*n).to_owned()).collect(),
            usage: Usage::Server,
            not_before,
            not_after,
        }
    }

    /// A client certificate whose CN and only SAN are `name`, valid from an hour ago for 825 days.
    pub fn client(name: &str) -> LeafSpec {
        let (not_before, not_after) = validity(DEFAULT_DAYS);
        LeafSpec {
            common_name: name.to_owned(),
            sans: vec![name.to_owned()],
            usage: Usage::Client,
            not_before,
            not_after,
        }
    }

    /// The same spec valid from an hour ago for `days` days.
    pub fn valid_for_days(mut self, days: u32) -> LeafSpec {
        (self.not_before, self.not_after) = validity(days);
        self
    }

    pub(crate) fn san_types(&self) -> Result<Vec<SanType>, Error> {
        self.sans.iter().map(|s| san_type(s)).collect()
    }
}

/// Validity from one hour ago (so a peer whose clock lags a little accepts it) to `days` from now.
pub fn validity(days: u32) -> (OffsetDateTime, OffsetDateTime) {
    let now = OffsetDateTime::now_utc();
    (
        now - Duration::hours(1),
        now.saturating_add(Duration::days(i64::from(days))),
    )
}

pub(crate) fn check_validity(
    not_before: OffsetDateTime,
    not_after: OffsetDateTime,
) -> Result<(), Error> {
    if not_after <= not_before {
        return Err(Error::InvalidValidity(format!(
            "not_after {not_after} is not later than not_before {not_before}"
        )));
    }
    Ok(())
}

fn san_type(value: &str) -> Result<SanType, Error> {
    if let Ok(ip) = value.parse::<IpAddr>() {
        return Ok(SanType::IpAddress(ip));
    }
    let ia5 = value.try_into().map_err(|source| Error::InvalidSan {
        value: value.to_owned(),
        source,
    })?;
    Ok(if value.contains("://") {
        SanType::URI(ia5)
    } else {
        SanType::DnsName(ia5)
    })
}

/// An issued certificate and its private key, both PEM.
#[derive(Clone)]
pub struct Leaf {
    /// The certificate, PEM.
    pub cert_pem: String,
    /// The PKCS#8 private key, PEM. Never printed by `Debug`.
    pub key_pem: String,
}

impl fmt::Debug for Leaf {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Leaf")
            .field("cert_pem", &self.cert_pem)
            .field("key_pem", &"<redacted>")
            .finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sans_are_typed_by_form() {
        let spec = LeafSpec {
            sans: vec![
                "127.0.0.1".into(),
                "::1".into(),
                "spiffe://example.org/agent".into(),
                "engine-1".into(),
            ],
            ..LeafSpec::client("x")
        };
        let types = spec.san_types().unwrap();
        assert!(matches!(types[0], SanType::IpAddress(ip) if ip.is_ipv4()));
        assert!(matches!(types[1], SanType::IpAddress(ip) if ip.is_ipv6()));
        assert!(matches!(&types[2], SanType::URI(u) if u.as_str() == "spiffe://example.org/agent"));
        assert!(matches!(&types[3], SanType::DnsName(d) if d.as_str() == "engine-1"));
    }

    #[test]
    fn non_ascii_san_is_refused() {
        let spec = LeafSpec::client("bücher");
        assert!(matches!(spec.san_types(), Err(Error::InvalidSan { .. })));
    }

    #[test]
    fn debug_masks_the_key() {
        let leaf = Leaf {
            cert_pem: "CERT".into(),
            key_pem: "SECRET".into(),
        };
        let shown = format!("{leaf:?}");
        assert!(!shown.contains("SECRET"));
        assert!(shown.contains("CERT"));
    }

    #[test]
    fn constructors_set_usage_and_validity() {
        let s = LeafSpec::server(&["localhost", "127.0.0.1"]);
        assert_eq!(s.common_name, "localhost");
        assert_eq!(s.usage, Usage::Server);
        assert!(s.not_before < OffsetDateTime::now_utc());
        let c = LeafSpec::client("engine-1").valid_for_days(1);
        assert_eq!(c.sans, vec!["engine-1".to_owned()]);
        assert_eq!(c.usage, Usage::Client);
        assert!(c.not_after - c.not_before < Duration::days(2));
    }
}
