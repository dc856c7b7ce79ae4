//! The agent's `[audit]` table: where audit records go as syslog, checked into a
//! [`SyslogConfig`] with every problem named by its key.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use relay_tunnel::config::{self as cfg, ConfigError};
use relay_tunnel::tls;
use rustls::pki_types::ServerName;
use serde::Deserialize;

use super::format::Facility;

/// `audit.queue` when absent: records held while the collector is away.
pub const DEFAULT_QUEUE: usize = 10_000;
/// The largest `audit.queue`.
pub const MAX_QUEUE: usize = 1_000_000;

/// `[audit]` as written.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawAudit {
    syslog: Option<String>,
    ca: Option<String>,
    server_name: Option<String>,
    queue: Option<usize>,
    facility: Option<String>,
}

impl RawAudit {
    /// `audit.ca`, resolved against `base`.
    pub fn ca(&self, base: &Path) -> Option<std::path::PathBuf> {
        self.ca.as_ref().map(|ca| cfg::resolve(base, ca))
    }

    /// A table that names the collector `syslog` and leaves every other key at its default.
    pub fn new(syslog: &str) -> Self {
        Self {
            syslog: Some(syslog.to_owned()),
            ca: None,
            server_name: None,
            queue: None,
            facility: None,
        }
    }
}

/// A checked `[audit]` table: the collector and how records reach it.
#[derive(Debug, Clone)]
pub struct SyslogConfig {
    /// `audit.syslog` as written, to name the collector in logs.
    pub url: String,
    /// Host name or IP address of the collector, resolved at each connect.
    pub host: String,
    /// Its port.
    pub port: u16,
    /// TLS toward the collector (`tls://`), or plain TCP (`None`).
    pub tls: Option<SyslogTls>,
    /// Records held at most while the collector is away or slow.
    pub queue: usize,
    /// The facility of every record.
    pub facility: Facility,
    /// `audit.ca` (resolved), to tell a change on reload.
    ca: Option<PathBuf>,
}

/// TLS toward the collector.
#[derive(Debug, Clone)]
pub struct SyslogTls {
    /// Client config: the collector's certificate verified against `audit.ca`.
    pub config: Arc<rustls::ClientConfig>,
    /// The name its certificate must carry.
    pub server_name: ServerName<'static>,
}

/// Equal when the same keys say the same (the TLS config is built from them).
impl PartialEq for SyslogConfig {
    fn eq(&self, other: &Self) -> bool {
        let server_name = |c: &Self| c.tls.as_ref().map(|t| t.server_name.clone());
        self.url == other.url
            && self.ca == other.ca
            && server_name(self) == server_name(other)
            && self.queue == other.queue
            && self.facility == other.facility
    }
}

/// The transport of `audit.syslog`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Scheme {
    Tcp,
    Tls,
}

/// Checks `[audit]`; `base` is the directory relative paths start from. `None` after
/// recording the problems in `err`.
pub fn check(raw: &RawAudit, err: &mut ConfigError, base: &Path) -> Option<SyslogConfig> {
    let before = err.problems.len();
    let target = match &raw.syslog {
        Some(url) => err.check("audit.syslog", parse_url(url)),
        None => {
            err.push(
                "audit.syslog",
                "missing: the collector, as \"tcp://HOST:PORT\" or \"tls://HOST:PORT\"",
            );
            None
        }
    };
    let queue = raw.queue.unwrap_or(DEFAULT_QUEUE);
    if !(1..=MAX_QUEUE).contains(&queue) {
        err.push(
            "audit.queue",
            format_args!("{queue} records: must be between 1 and {MAX_QUEUE}"),
        );
    }
    let facility = match &raw.facility {
        Some(f) => err.check("audit.facility", f.parse::<Facility>()),
        None => Some(Facility::default()),
    };
    let ca = raw.ca.as_ref().map(|ca| cfg::resolve(base, ca));
    let tls = match target.as_ref().map(|(scheme, host, _)| (*scheme, host)) {
        Some((Scheme::Tls, host)) => tls_config(err, raw, ca.as_deref(), host),
        Some((Scheme::Tcp, _)) => {
            for (key, set) in [
                ("audit.ca", raw.ca.is_some()),
                ("audit.server_name", raw.server_name.is_some()),
            ] {
                if set {
                    err.push(
                        key,
                        "applies to tls:// only: this collector is reached over plain TCP",
                    );
                }
            }
            None
        }
        None => None,
    };
    if err.problems.len() != before {
        return None;
    }
    let (_, host, port) = target?;
    Some(SyslogConfig {
        url: raw.syslog.clone().unwrap_or_default(),
        host,
        port,
        tls,
        queue,
        facility: facility?,
        ca,
    })
}

/// The TLS settings of a `tls://` collector at `host`.
fn tls_config(
    err: &mut ConfigError,
    raw: &RawAudit,
    ca: Option<&Path>,
    host: &str,
) -> Option<SyslogTls> {
    let server_name = match &raw.server_name {
        Some(name) => err.check(
            "audit.server_name",
            ServerName::try_from(name.clone()).map_err(|_| format!("invalid server name {name:?}")),
        ),
        None => err.check(
            "audit.syslog",
            ServerName::try_from(host.to_owned()).map_err(|_| {
                format!("{host:?} cannot be checked in a certificate; set audit.server_name")
            }),
        ),
    };
    let Some(ca) = ca else {
        err.push(
            "audit.ca",
            "missing: tls:// needs the CA bundle that the collector's certificate must chain to",
        );
        return None;
    };
    let roots = err.check("audit.ca", tls::load_roots(ca))?;
    let config = rustls::ClientConfig::builder_with_provider(tls::provider())
        .with_safe_default_protocol_versions()
        .expect("the provider supports the default versions")
        .with_root_certificates(roots)
        .with_no_client_auth();
    Some(SyslogTls {
        config: Arc::new(config),
        server_name: server_name?,
    })
}

/// `tcp://HOST:PORT` or `tls://HOST:PORT` (IPv6 in brackets): scheme, host, port.
fn parse_url(url: &str) -> Result<(Scheme, String, u16), String> {
    let expected = "expected \"tcp://HOST:PORT\" or \"tls://HOST:PORT\"";
    let Some((scheme, rest)) = url.split_once("://") else {
        return Err(format!("{url:?} has no scheme ({expected})"));
    };
    let scheme = match scheme {
        "tcp" => Scheme::Tcp,
        "tls" => Scheme::Tls,
        "udp" => {
            return Err(format!(
                "{url:?}: UDP is not supported, it loses records without telling ({expected})"
            ));
        }
        other => return Err(format!("unknown scheme {other:?} in {url:?} ({expected})")),
    };
    let Some((host, port)) = relay_tunnel::protocol::parse_destination(rest) else {
        return Err(format!(
            "invalid address {rest:?} in {url:?} ({expected}, IPv6 in brackets, port 1-65535)"
        ));
    };
    Ok((scheme, host, port))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn raw(syslog: &str) -> RawAudit {
        RawAudit::new(syslog)
    }

    /// The problems of `raw`, or its checked config.
    fn checked(raw: &RawAudit) -> Result<SyslogConfig, Vec<String>> {
        let mut err = ConfigError::default();
        let dir = Path::new(env!("CARGO_MANIFEST_DIR"));
        match check(raw, &mut err, dir) {
            Some(c) => {
                assert!(err.problems.is_empty(), "{:?}", err.problems);
                Ok(c)
            }
            None => {
                assert!(!err.problems.is_empty(), "None without a problem");
                Err(err.problems)
            }
        }
    }

    fn problems(raw: &RawAudit) -> Vec<String> {
        checked(raw).expect_err("refused")
    }

    /// A CA bundle written by rcgen, in a directory removed on drop.
    fn ca_file() -> (tempfile::TempDir, String) {
        let dir = tempfile::tempdir().expect("temp dir");
        let key = rcgen::KeyPair::generate().expect("key");
        let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).expect("params");
        params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        let cert = params.self_signed(&key).expect("CA");
        let path = dir.path().join("ca.pem");
        std::fs::write(&path, cert.pem()).expect("write CA");
        (dir, path.display().to_string())
    }

    #[test]
    fn tcp_collector_with_defaults() {
        let c = checked(&raw("tcp://siem.example.net:514")).expect("valid");
        assert_eq!((c.host.as_str(), c.port), ("siem.example.net", 514));
        assert!(c.tls.is_none());
        assert_eq!(c.queue, DEFAULT_QUEUE);
        assert_eq!(c.facility, Facility::default());
        let c = checked(&raw("tcp://[2001:db8::5]:6514")).expect("valid");
        assert_eq!((c.host.as_str(), c.port), ("2001:db8::5", 6514));
    }

    #[test]
    fn tls_collector_needs_a_ca_and_checks_the_host_name() {
        let (_dir, ca) = ca_file();
        let mut r = raw("tls://127.0.0.1:6514");
        r.ca = Some(ca.clone());
        let c = checked(&r).expect("valid");
        let tls = c.tls.expect("tls");
        assert_eq!(tls.server_name, ServerName::try_from("127.0.0.1").unwrap());
        r.server_name = Some("siem.example.net".into());
        let tls = checked(&r).expect("valid").tls.expect("tls");
        assert_eq!(
            tls.server_name,
            ServerName::try_from("siem.example.net").unwrap()
        );

        assert_eq!(
            problems(&raw("tls://siem.example.net:6514")),
            [
                "audit.ca: missing: tls:// needs the CA bundle that the collector's certificate must chain to"
            ]
        );
        let mut r = raw("tls://siem..example:6514");
        r.ca = Some(ca);
        assert_eq!(
            problems(&r),
            [
                "audit.syslog: \"siem..example\" cannot be checked in a certificate; set audit.server_name"
            ]
        );
        r.server_name = Some("bad name".into());
        assert_eq!(
            problems(&r),
            ["audit.server_name: invalid server name \"bad name\""]
        );
        let mut r = raw("tls://siem.example.net:6514");
        r.ca = Some("/nonexistent/ca.pem".into());
        let p = problems(&r);
        assert!(
            p.len() == 1 && p[0].starts_with("audit.ca: ") && p[0].contains("/nonexistent/ca.pem"),
            "{p:?}"
        );
    }

    #[test]
    fn tls_keys_are_refused_for_tcp() {
        let mut r = raw("tcp://siem.example.net:514");
        r.ca = Some("ca.pem".into());
        r.server_name = Some("siem.example.net".into());
        assert_eq!(
            problems(&r),
            [
                "audit.ca: applies to tls:// only: this collector is reached over plain TCP",
                "audit.server_name: applies to tls:// only: this collector is reached over plain TCP",
            ]
        );
    }

    #[test]
    fn bad_addresses_name_the_key_and_the_reason() {
        let cases = [
            (
                "siem.example.net:514",
                "audit.syslog: \"siem.example.net:514\" has no scheme (expected \"tcp://HOST:PORT\" or \"tls://HOST:PORT\")",
            ),
            (
                "udp://siem.example.net:514",
                "audit.syslog: \"udp://siem.example.net:514\": UDP is not supported, it loses records without telling (expected \"tcp://HOST:PORT\" or \"tls://HOST:PORT\")",
            ),
            (
                "relp://siem.example.net:2514",
                "audit.syslog: unknown scheme \"relp\" in \"relp://siem.example.net:2514\" (expected \"tcp://HOST:PORT\" or \"tls://HOST:PORT\")",
            ),
            (
                "tcp://siem.example.net",
                "audit.syslog: invalid address \"siem.example.net\" in \"tcp://siem.example.net\" (expected \"tcp://HOST:PORT\" or \"tls://HOST:PORT\", IPv6 in brackets, port 1-65535)",
            ),
        ];
        for (url, want) in cases {
            assert_eq!(problems(&raw(url)), [want], "{url}");
        }
        for url in [
            "tcp://siem.example.net:0",
            "tcp://siem.example.net:70000",
            "tcp://:514",
            "tcp://2001:db8::5:514",
            "tcp://siem.example.net:514/path",
        ] {
            let p = problems(&raw(url));
            assert!(
                p.len() == 1 && p[0].starts_with("audit.syslog: invalid address"),
                "{url}: {p:?}"
            );
        }
        let missing = RawAudit {
            syslog: None,
            ..raw("")
        };
        assert_eq!(
            problems(&missing),
            ["audit.syslog: missing: the collector, as \"tcp://HOST:PORT\" or \"tls://HOST:PORT\""]
        );
    }

    #[test]
    fn queue_and_facility_are_checked() {
        let mut r = raw("tcp://127.0.0.1:514");
        r.queue = Some(5);
        r.facility = Some("auth".into());
        let c = checked(&r).expect("valid");
        assert_eq!(c.queue, 5);
        assert_eq!(c.facility.code(), 4);
        r.queue = Some(0);
        r.facility = Some("local8".into());
        let p = problems(&r);
        assert_eq!(p.len(), 2, "{p:?}");
        assert_eq!(
            p[0],
            "audit.queue: 0 records: must be between 1 and 1000000"
        );
        assert!(
            p[1].starts_with("audit.facility: unknown facility \"local8\" (expected "),
            "{p:?}"
        );
        r.queue = Some(MAX_QUEUE + 1);
        r.facility = None;
        assert_eq!(
            problems(&r),
            ["audit.queue: 1000001 records: must be between 1 and 1000000"]
        );
    }

    #[test]
    fn equal_when_the_keys_are() {
        let a = checked(&raw("tcp://127.0.0.1:514")).expect("valid");
        assert_eq!(a, checked(&raw("tcp://127.0.0.1:514")).expect("valid"));
        assert_ne!(a, checked(&raw("tcp://127.0.0.1:515")).expect("valid"));
        let mut r = raw("tcp://127.0.0.1:514");
        r.queue = Some(10);
        assert_ne!(a, checked(&r).expect("valid"));
    }
}
