//! What a partner sends first, read by the DMZ before any stream is opened to an agent: the
//! protocol a service expects (`expect`), the server-name patterns of SNI routing (`sni`), and
//! the check of a partner's first bytes against them. Pure functions over buffers, fuzzed.
//!
//! The partner's TLS is never terminated: the ClientHello is parsed (by rustls' `Acceptor`)
//! only to read its server name, and every byte read is passed on unchanged.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

/// Most bytes read before a verdict: one early-bytes block. A ClientHello larger than this
/// (far above the usual 0.3 to 2 KiB) is refused.
pub const LIMIT: usize = 16 * 1024;

/// The protocol a service's partners must speak first (`[[inbound]] expect`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Expect {
    /// Anything: no check (the default, and the only choice for protocols whose server speaks
    /// first: FTP, SMTP, OFTP without TLS).
    #[default]
    Any,
    /// A TLS ClientHello (AS2 over HTTPS, FTPS implicit, OFTP2 over TLS, any TLS service).
    Tls,
    /// An SSH identification line (`SSH-2.0-`): SFTP.
    Ssh,
    /// An HTTP/1.x request line (AS2 over plain HTTP).
    Http,
}

impl Expect {
    /// Whether this is the default, which needs no check.
    pub fn is_any(&self) -> bool {
        *self == Expect::Any
    }
}

impl FromStr for Expect {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "any" => Ok(Expect::Any),
            "tls" => Ok(Expect::Tls),
            "ssh" => Ok(Expect::Ssh),
            "http" => Ok(Expect::Http),
            other => Err(format!(
                "unknown protocol {other:?} (expected \"any\", \"tls\", \"ssh\" or \"http\")"
            )),
        }
    }
}

impl fmt::Display for Expect {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Expect::Any => "any",
            Expect::Tls => "tls",
            Expect::Ssh => "ssh",
            Expect::Http => "http",
        })
    }
}

/// One entry of a service's `sni` list.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum NamePattern {
    /// Exactly this name (stored lowercase).
    Exact(String),
    /// One label in front of this suffix (`*.edi.example.com`: stored as `.edi.example.com`).
    Wildcard(String),
    /// `*` alone: partners that send no server name, or one no other service on the address
    /// claims.
    Default,
}

impl NamePattern {
    /// How well `name` matches: exact 3, wildcard 2, default 1; `None` if it does not.
    pub fn rank(&self, name: Option<&str>) -> Option<u8> {
        match (self, name) {
            (NamePattern::Default, _) => Some(1),
            (NamePattern::Exact(e), Some(n)) => n.eq_ignore_ascii_case(e).then_some(3),
            (NamePattern::Wildcard(suffix), Some(n)) => {
                let n = n.to_ascii_lowercase();
                let label = n.strip_suffix(suffix.as_str())?;
                (!label.is_empty() && !label.contains('.')).then_some(2)
            }
            (_, None) => None,
        }
    }
}

impl FromStr for NamePattern {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        if s == "*" {
            return Ok(NamePattern::Default);
        }
        let lower = s.to_ascii_lowercase();
        let (wild, name) = match lower.strip_prefix("*.") {
            Some(rest) => (true, rest),
            None => (false, lower.as_str()),
        };
        let label_ok = |l: &str| {
            !l.is_empty()
                && l.len() <= 63
                && l.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-')
                && !l.starts_with('-')
                && !l.ends_with('-')
        };
        let labels: Vec<&str> = name.split('.').collect();
        if name.len() > 253 || !labels.iter().all(|l| label_ok(l)) {
            return Err(format!(
                "invalid server name {s:?} (expected a host name, \"*.\" and a host name, or \"*\")"
            ));
        }
        if wild && labels.len() < 2 {
            return Err(format!(
                "invalid server name {s:?}: a wildcard needs at least two labels after \"*.\""
            ));
        }
        Ok(if wild {
            NamePattern::Wildcard(format!(".{name}"))
        } else {
            NamePattern::Exact(name.to_owned())
        })
    }
}

impl fmt::Display for NamePattern {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            NamePattern::Exact(n) => f.write_str(n),
            NamePattern::Wildcard(suffix) => write!(f, "*{suffix}"),
            NamePattern::Default => f.write_str("*"),
        }
    }
}

/// What the first bytes say.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Sniffed {
    /// Too few bytes to tell yet.
    More,
    /// They fit; for TLS, the server name of the ClientHello, if any (lowercase).
    Pass {
        /// The ClientHello's server name.
        server_name: Option<String>,
    },
    /// They do not fit: why, for the log.
    Fail(String),
}

/// Checks `bytes`, everything the partner sent so far (at most [`LIMIT`]), against `expect`.
pub fn inspect(expect: Expect, bytes: &[u8]) -> Sniffed {
    match expect {
        Expect::Any => Sniffed::Pass { server_name: None },
        Expect::Tls => client_hello(bytes),
        Expect::Ssh => prefixed(
            bytes,
            &[b"SSH-2.0-", b"SSH-1.99-"],
            "an SSH identification line",
        ),
        Expect::Http => prefixed(
            bytes,
            &[
                b"GET ",
                b"HEAD ",
                b"POST ",
                b"PUT ",
                b"DELETE ",
                b"CONNECT ",
                b"OPTIONS ",
                b"TRACE ",
                b"PATCH ",
            ],
            "an HTTP request line",
        ),
    }
}

/// `Pass` once `bytes` start with one of `prefixes`, `More` while they are the start of one.
fn prefixed(bytes: &[u8], prefixes: &[&[u8]], what: &str) -> Sniffed {
    if prefixes.iter().any(|p| bytes.starts_with(p)) {
        return Sniffed::Pass { server_name: None };
    }
    if prefixes.iter().any(|p| p.starts_with(bytes)) {
        return Sniffed::More;
    }
    Sniffed::Fail(format!("the first bytes are not {what}"))
}

/// Parses a TLS ClientHello, which may span several TLS records and TCP segments.
fn client_hello(bytes: &[u8]) -> Sniffed {
    // A TLS record starts with the handshake content type: refuse anything else at once,
    // without waiting for more.
    if bytes.first().is_some_and(|b| *b != 0x16) {
        return Sniffed::Fail("the first bytes are not a TLS handshake record".into());
    }
    let mut acceptor = rustls::server::Acceptor::default();
    let mut rest = bytes;
    while !rest.is_empty() {
        match acceptor.read_tls(&mut rest) {
            Ok(0) => break,
            Ok(_) => {}
            Err(e) => return Sniffed::Fail(format!("not a TLS ClientHello: {e}")),
        }
    }
    match acceptor.accept() {
        Ok(None) if bytes.len() >= LIMIT => {
            Sniffed::Fail(format!("no complete TLS ClientHello within {LIMIT} bytes"))
        }
        Ok(None) => Sniffed::More,
        Ok(Some(accepted)) => Sniffed::Pass {
            server_name: accepted
                .client_hello()
                .server_name()
                .map(str::to_ascii_lowercase),
        },
        Err((e, _)) => Sniffed::Fail(format!("not a TLS ClientHello: {e}")),
    }
}

/// The best of `routes` for `server_name`: an exact name before a wildcard before the
/// default; `None` when none matches.
pub fn route<'a, T>(
    routes: impl IntoIterator<Item = (&'a [NamePattern], T)>,
    server_name: Option<&str>,
) -> Option<T> {
    routes
        .into_iter()
        .filter_map(|(patterns, t)| {
            let rank = patterns.iter().filter_map(|p| p.rank(server_name)).max()?;
            Some((rank, t))
        })
        .max_by_key(|(rank, _)| *rank)
        .map(|(_, t)| t)
}

/// The first pattern of `a` that `b` claims too (the same exact name or wildcard, or two
/// defaults): two services on one address may not share one.
pub fn overlap<'a>(a: &'a [NamePattern], b: &[NamePattern]) -> Option<&'a NamePattern> {
    a.iter().find(|p| b.contains(p))
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::*;

    fn hello(name: Option<&str>) -> Vec<u8> {
        let mut roots = rustls::RootCertStore::empty();
        let _ = &mut roots;
        let config = rustls::ClientConfig::builder_with_provider(crate::tls::provider())
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_root_certificates(roots)
            .with_no_client_auth();
        let server_name = match name {
            Some(n) => rustls::pki_types::ServerName::try_from(n.to_owned()).unwrap(),
            None => rustls::pki_types::ServerName::IpAddress(
                std::net::IpAddr::from([192, 0, 2, 1]).into(),
            ),
        };
        let mut conn = rustls::ClientConnection::new(Arc::new(config), server_name).unwrap();
        let mut out = Vec::new();
        conn.write_tls(&mut out).unwrap();
        out
    }

    #[test]
    fn a_client_hello_gives_its_server_name_byte_by_byte_too() {
        let bytes = hello(Some("AS2.Example.com"));
        for n in 1..bytes.len() {
            assert_eq!(
                inspect(Expect::Tls, &bytes[..n]),
                Sniffed::More,
                "{n} bytes"
            );
        }
        assert_eq!(
            inspect(Expect::Tls, &bytes),
            Sniffed::Pass {
                server_name: Some("as2.example.com".into())
            }
        );
        assert_eq!(
            inspect(Expect::Tls, &hello(None)),
            Sniffed::Pass { server_name: None },
            "an IP address sends no SNI"
        );
    }

    #[test]
    fn a_client_hello_split_over_two_records_is_parsed() {
        let bytes = hello(Some("as2.example.com"));
        let body = &bytes[5..];
        let (a, b) = body.split_at(body.len() / 2);
        let mut split = Vec::new();
        for part in [a, b] {
            split.extend_from_slice(&[0x16, 0x03, 0x01]);
            split.extend_from_slice(&(part.len() as u16).to_be_bytes());
            split.extend_from_slice(part);
        }
        assert_eq!(
            inspect(Expect::Tls, &split),
            Sniffed::Pass {
                server_name: Some("as2.example.com".into())
            }
        );
    }

    #[test]
    fn other_protocols_fail_the_tls_gate_at_once() {
        for bytes in [
            &b"GET / HTTP/1.1\r\n"[..],
            b"SSH-2.0-OpenSSH_9.2\r\n",
            b"\x16\x03\x01\x00\x05\x02\x00\x00\x01\x00",
        ] {
            assert!(
                matches!(inspect(Expect::Tls, bytes), Sniffed::Fail(_)),
                "{bytes:?}"
            );
        }
        let mut oversized = vec![0x16, 0x03, 0x01, 0x40, 0x00];
        oversized.resize(LIMIT, 1);
        assert!(matches!(inspect(Expect::Tls, &oversized), Sniffed::Fail(_)));
    }

    #[test]
    fn ssh_and_http_gates_read_just_enough() {
        assert_eq!(inspect(Expect::Ssh, b"SS"), Sniffed::More);
        assert_eq!(
            inspect(Expect::Ssh, b"SSH-2.0-OpenSSH_9.2"),
            Sniffed::Pass { server_name: None }
        );
        assert!(matches!(inspect(Expect::Ssh, b"GET /"), Sniffed::Fail(_)));
        assert_eq!(inspect(Expect::Http, b"PO"), Sniffed::More);
        assert_eq!(
            inspect(Expect::Http, b"POST /as2 HTTP/1.1"),
            Sniffed::Pass { server_name: None }
        );
        assert!(matches!(
            inspect(Expect::Http, b"\x16\x03\x01"),
            Sniffed::Fail(_)
        ));
        assert!(matches!(
            inspect(Expect::Http, b"SSH-2.0-x"),
            Sniffed::Fail(_)
        ));
    }

    #[test]
    fn names_route_exact_then_wildcard_then_default() {
        let p = |list: &[&str]| -> Vec<NamePattern> {
            list.iter().map(|s| s.parse().unwrap()).collect()
        };
        let (as2, edi, dflt) = (
            p(&["as2.example.com"]),
            p(&["*.EDI.example.com"]),
            p(&["*"]),
        );
        let routes = || [(&as2[..], "as2"), (&edi[..], "edi"), (&dflt[..], "default")];
        assert_eq!(route(routes(), Some("as2.example.com")), Some("as2"));
        assert_eq!(route(routes(), Some("a.edi.example.com")), Some("edi"));
        assert_eq!(
            route(routes(), Some("a.b.edi.example.com")),
            Some("default")
        );
        assert_eq!(route(routes(), Some("edi.example.com")), Some("default"));
        assert_eq!(route(routes(), None), Some("default"));
        assert_eq!(route([(&as2[..], "as2")], Some("other.example.com")), None);
        assert_eq!(
            overlap(&p(&["x.example.com", "*"]), &dflt),
            Some(&NamePattern::Default)
        );
        assert_eq!(overlap(&as2, &edi), None);
        for bad in [
            "",
            "*.com",
            "a..b",
            "-a.example.com",
            "a_b.example.com",
            "*x.example.com",
        ] {
            assert!(bad.parse::<NamePattern>().is_err(), "{bad:?}");
        }
    }
}
