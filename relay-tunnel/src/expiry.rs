//! When the TLS files a node depends on stop working: its certificate, the CA, the DMZ's CRL
//! (an expired CRL fails every agent handshake closed) and each connected agent's certificate.
//! Published as metrics, and warned about in the log at start, at reload and once a day while
//! any of them is within `admin.expiry_warning`.

use std::path::Path;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use rustls_pki_types::{CertificateDer, CertificateRevocationListDer};
use tokio_util::sync::CancellationToken;
use x509_parser::prelude::{FromDer, X509Certificate};
use x509_parser::revocation_list::CertificateRevocationList;

use crate::metrics as m;

/// Default of `admin.expiry_warning`.
pub const DEFAULT_WARNING: Duration = Duration::from_secs(30 * 24 * 3600);
/// How often the warnings are repeated while something is close to expiry.
pub const REPEAT: Duration = Duration::from_secs(24 * 3600);

/// What an [`Expiry`] is about.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// A certificate: it stops working at its notAfter.
    Certificate,
    /// A CRL: after its nextUpdate, handshakes checked against it fail.
    Crl,
}

/// The moment one TLS item stops working.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Expiry {
    /// The config key of the file (`tunnel.cert`), or `agent NAME` for an agent's certificate.
    pub what: String,
    /// The certificate's subject, or the CRL's issuer.
    pub subject: String,
    /// Certificate or CRL.
    pub kind: Kind,
    /// notAfter or nextUpdate, in seconds since the Unix epoch.
    pub not_after: i64,
}

impl Expiry {
    /// A certificate's notAfter; `None` if it does not parse.
    pub fn of_certificate(what: &str, der: &CertificateDer<'_>) -> Option<Self> {
        let (_, cert) = X509Certificate::from_der(der.as_ref()).ok()?;
        Some(Self {
            what: what.to_owned(),
            subject: cert.subject().to_string(),
            kind: Kind::Certificate,
            not_after: cert.validity().not_after.timestamp(),
        })
    }

    /// A CRL's nextUpdate; `None` if it does not parse or has none (it never goes stale).
    pub fn of_crl(what: &str, der: &CertificateRevocationListDer<'_>) -> Option<Self> {
        let (_, crl) = CertificateRevocationList::from_der(der.as_ref()).ok()?;
        Some(Self {
            what: what.to_owned(),
            subject: crl.issuer().to_string(),
            kind: Kind::Crl,
            not_after: crl.next_update()?.timestamp(),
        })
    }

    /// The first of several items to stop working (a chain or a CA bundle works until its
    /// first certificate expires).
    pub fn earliest(items: impl IntoIterator<Item = Self>) -> Option<Self> {
        items.into_iter().min_by_key(|e| e.not_after)
    }

    /// The earliest notAfter of the certificates in a PEM file, for the config key `what`.
    pub fn of_certificate_file(what: &str, path: &Path) -> Option<Self> {
        let certs = crate::tls::load_certs(path).ok()?;
        Self::earliest(certs.iter().filter_map(|c| Self::of_certificate(what, c)))
    }

    /// The earliest nextUpdate of the CRLs in a PEM file, for the config key `what`.
    pub fn of_crl_file(what: &str, path: &Path) -> Option<Self> {
        let crls = crate::tls::load_crls(path).ok()?;
        Self::earliest(crls.iter().filter_map(|c| Self::of_crl(what, c)))
    }

    /// Time left at `now`; negative once expired.
    pub fn left(&self, now: SystemTime) -> i64 {
        self.not_after - unix(now)
    }

    /// notAfter as RFC 3339 (UTC, seconds).
    pub fn date(&self) -> String {
        let t = if self.not_after >= 0 {
            UNIX_EPOCH + Duration::from_secs(self.not_after.unsigned_abs())
        } else {
            UNIX_EPOCH - Duration::from_secs(self.not_after.unsigned_abs())
        };
        humantime::format_rfc3339_seconds(t).to_string()
    }

    /// This item in `/status`: its date, the time left, and whether that is within `warning`.
    pub fn status(&self, warning: Duration) -> serde_json::Value {
        let left = self.left(SystemTime::now());
        serde_json::json!({
            "what": self.what,
            "subject": self.subject,
            "not_after": self.date(),
            "left": human_left(left),
            "left_seconds": left,
            "expiring": left <= i64::try_from(warning.as_secs()).unwrap_or(i64::MAX),
        })
    }

    /// Logs a warning if this item expires within `within` of `now` (an error once expired);
    /// returns whether it did.
    pub fn warn(&self, within: Duration, now: SystemTime) -> bool {
        let left = self.left(now);
        let (what, subject, date) = (&self.what, &self.subject, self.date());
        if left <= 0 {
            match self.kind {
                Kind::Certificate => tracing::error!(%what, %subject, not_after = %date,
                    "certificate has expired"),
                Kind::Crl => tracing::error!(%what, %subject, next_update = %date,
                    "CRL is past its next update: every agent handshake fails until a newer CRL is loaded"),
            }
            true
        } else if left.unsigned_abs() <= within.as_secs() {
            let left = human_left(left);
            match self.kind {
                Kind::Certificate => tracing::warn!(%what, %subject, not_after = %date, %left,
                    "certificate expires soon"),
                Kind::Crl => tracing::warn!(%what, %subject, next_update = %date, %left,
                    "CRL's next update is due soon: every agent handshake fails after it unless a newer CRL is loaded"),
            }
            true
        } else {
            false
        }
    }
}

/// Seconds since the Unix epoch (negative before it).
pub fn unix(t: SystemTime) -> i64 {
    match t.duration_since(UNIX_EPOCH) {
        Ok(d) => i64::try_from(d.as_secs()).unwrap_or(i64::MAX),
        Err(e) => -i64::try_from(e.duration().as_secs()).unwrap_or(i64::MAX),
    }
}

/// Time left, rounded for people: "12d 3h", "5h 10m", "42m", "expired".
pub fn human_left(seconds: i64) -> String {
    if seconds <= 0 {
        return "expired".into();
    }
    let (d, h, m) = (seconds / 86400, seconds % 86400 / 3600, seconds % 3600 / 60);
    match (d, h) {
        (0, 0) => format!("{m}m"),
        (0, _) => format!("{h}h {m}m"),
        _ => format!("{d}d {h}h"),
    }
}

/// Sets [`m::CERT_EXPIRY`] for the node's own files.
pub fn publish(files: &[Expiry]) {
    for e in files {
        metrics::gauge!(m::CERT_EXPIRY, "file" => e.what.clone()).set(e.not_after as f64);
    }
}

/// Logs a warning for each item within `within` of expiry; returns how many.
pub fn warn_all(items: &[Expiry], within: Duration) -> usize {
    let now = SystemTime::now();
    items.iter().filter(|e| e.warn(within, now)).count()
}

/// Repeats [`warn_all`] over `items()` every [`REPEAT`] (the first time after one period:
/// start and reload warn on their own) until `stop`.
pub async fn watch(
    items: impl Fn() -> Vec<Expiry>,
    within: impl Fn() -> Duration,
    stop: CancellationToken,
) {
    loop {
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tokio::time::sleep(REPEAT) => { warn_all(&items(), within()); }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cert(days: i64) -> CertificateDer<'static> {
        let mut params = rcgen::CertificateParams::new(vec!["agent.example".into()]).unwrap();
        params.not_after = time::OffsetDateTime::now_utc() + time::Duration::days(days);
        let key = rcgen::KeyPair::generate().unwrap();
        params.self_signed(&key).unwrap().der().clone()
    }

    #[test]
    fn a_certificate_near_its_end_is_warned_about_and_a_far_one_is_not() {
        let now = SystemTime::now();
        let near = Expiry::of_certificate("tls.cert", &cert(10)).unwrap();
        let far = Expiry::of_certificate("tls.ca", &cert(90)).unwrap();
        let left = near.left(now);
        assert!((9 * 86400..=10 * 86400).contains(&left), "{left}");
        assert!(near.warn(DEFAULT_WARNING, now));
        assert!(!far.warn(DEFAULT_WARNING, now));
        assert!(far.warn(Duration::from_secs(91 * 86400), now));
        assert_eq!(Expiry::earliest([far.clone(), near.clone()]), Some(near));
        assert_eq!(far.kind, Kind::Certificate);
    }

    #[test]
    fn an_expired_certificate_counts_as_warned_and_reads_expired() {
        let past = Expiry::of_certificate("tunnel.cert", &cert(-1)).unwrap();
        assert!(past.left(SystemTime::now()) < 0);
        assert!(past.warn(Duration::ZERO, SystemTime::now()));
        assert_eq!(human_left(past.left(SystemTime::now())), "expired");
    }

    #[test]
    fn time_left_reads_like_a_person_would_say_it() {
        assert_eq!(human_left(42 * 60 + 5), "42m");
        assert_eq!(human_left(5 * 3600 + 10 * 60), "5h 10m");
        assert_eq!(human_left(12 * 86400 + 3 * 3600 + 59), "12d 3h");
        let e = Expiry {
            what: "x".into(),
            subject: String::new(),
            kind: Kind::Crl,
            not_after: 86400,
        };
        assert_eq!(e.date(), "1970-01-02T00:00:00Z");
    }

    #[test]
    fn garbage_is_no_expiry() {
        assert_eq!(
            Expiry::of_certificate("x", &CertificateDer::from(vec![1, 2, 3])),
            None
        );
        assert_eq!(
            Expiry::of_crl("x", &CertificateRevocationListDer::from(vec![1, 2, 3])),
            None
        );
    }
}
