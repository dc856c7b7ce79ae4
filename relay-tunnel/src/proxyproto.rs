//! PROXY protocol v1 and v2 (parsed with the `ppp` crate): reading the header a trusted load
//! balancer puts in front of a partner connection, and writing one toward a target.

use std::net::{IpAddr, SocketAddr};

use ppp::{HeaderResult, PartialResult, v1, v2};

/// Largest header accepted: a v1 header is at most 107 bytes; a v2 header with a few TLVs
/// fits easily. Anything longer is refused, not buffered.
pub const MAX_HEADER: usize = 1024;

/// Longest v1 header (the protocol says 107 bytes with CRLF).
const V1_MAX: usize = 107;

/// The result of parsing the start of a connection.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Parsed {
    /// More bytes are needed.
    Incomplete,
    /// A complete header of `len` bytes; `source` is the original client when the header
    /// carries one (`None` for LOCAL, UNKNOWN or unspecified: use the socket's peer).
    Header {
        /// Bytes the header takes.
        len: usize,
        /// The original client address.
        source: Option<SocketAddr>,
    },
}

/// Parses a PROXY header at the start of `buf`.
pub fn parse(buf: &[u8]) -> Result<Parsed, String> {
    // A v1 header is one line: judge it only once the line is complete (ppp may call a cut
    // line malformed).
    let looks_v1 = buf.starts_with(b"PROXY") || b"PROXY".starts_with(buf);
    let mut buf = buf;
    if looks_v1 {
        let Some(end) = buf.windows(2).position(|w| w == b"\r\n") else {
            return if buf.len() > V1_MAX {
                Err(format!("PROXY v1 header longer than {V1_MAX} bytes"))
            } else {
                Ok(Parsed::Incomplete)
            };
        };
        if end + 2 > V1_MAX {
            return Err(format!("PROXY v1 header longer than {V1_MAX} bytes"));
        }
        // Give ppp the first line alone: it mis-measures a line holding a stray CR or LF
        // (found by fuzzing), and a complete line is never "incomplete".
        buf = &buf[..end + 2];
    }
    let result = HeaderResult::parse(buf);
    if result.is_incomplete() {
        return if looks_v1 {
            Err("malformed PROXY v1 header: the line ends early".to_owned())
        } else if buf.len() >= MAX_HEADER {
            Err(format!(
                "no complete PROXY header within {MAX_HEADER} bytes"
            ))
        } else {
            Ok(Parsed::Incomplete)
        };
    }
    match result {
        HeaderResult::V1(Ok(h)) if h.header.len() != buf.len() => {
            Err("malformed PROXY v1 header: stray CR or LF in the line".to_owned())
        }
        HeaderResult::V1(Ok(h)) => {
            let source = match h.addresses {
                v1::Addresses::Tcp4(a) => {
                    Some(SocketAddr::new(IpAddr::V4(a.source_address), a.source_port))
                }
                v1::Addresses::Tcp6(a) => {
                    Some(SocketAddr::new(IpAddr::V6(a.source_address), a.source_port))
                }
                v1::Addresses::Unknown => None,
            };
            Ok(Parsed::Header {
                len: h.header.len(),
                source,
            })
        }
        HeaderResult::V2(Ok(h)) => {
            if h.len() > MAX_HEADER {
                return Err(format!(
                    "PROXY v2 header of {} bytes exceeds {MAX_HEADER}",
                    h.len()
                ));
            }
            // TLVs must parse too: a length that overflows the header is malformed.
            if let Some(Err(e)) = h.tlvs().find(Result::is_err) {
                return Err(format!("malformed PROXY v2 TLV: {e:?}"));
            }
            let source = match (h.command, h.addresses) {
                (v2::Command::Local, _) => None,
                (_, v2::Addresses::IPv4(a)) => {
                    Some(SocketAddr::new(IpAddr::V4(a.source_address), a.source_port))
                }
                (_, v2::Addresses::IPv6(a)) => {
                    Some(SocketAddr::new(IpAddr::V6(a.source_address), a.source_port))
                }
                _ => None,
            };
            Ok(Parsed::Header {
                len: h.len(),
                source,
            })
        }
        HeaderResult::V1(Err(e)) => Err(format!("malformed PROXY v1 header: {e:?}")),
        HeaderResult::V2(Err(e)) => Err(format!("malformed PROXY v2 header: {e:?}")),
    }
}

/// PROXY protocol version to write toward a target.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Version {
    /// The text header.
    V1,
    /// The binary header.
    V2,
}

/// Both addresses in one family (IPv4 is mapped into IPv6 when the two differ).
fn same_family(source: SocketAddr, destination: SocketAddr) -> (SocketAddr, SocketAddr) {
    let v6 = |a: SocketAddr| match a.ip() {
        IpAddr::V4(ip) => SocketAddr::new(IpAddr::V6(ip.to_ipv6_mapped()), a.port()),
        IpAddr::V6(_) => a,
    };
    if source.is_ipv4() == destination.is_ipv4() {
        (source, destination)
    } else {
        (v6(source), v6(destination))
    }
}

/// A PROXY header saying that `source` connected to `destination`.
pub fn encode(version: Version, source: SocketAddr, destination: SocketAddr) -> Vec<u8> {
    let (source, destination) = same_family(source, destination);
    match version {
        Version::V1 => {
            let family = if source.is_ipv4() { "TCP4" } else { "TCP6" };
            format!(
                "PROXY {family} {} {} {} {}\r\n",
                source.ip(),
                destination.ip(),
                source.port(),
                destination.port()
            )
            .into_bytes()
        }
        Version::V2 => {
            let addresses: v2::Addresses = (source, destination).into();
            v2::Builder::with_addresses(
                v2::Version::Two | v2::Command::Proxy,
                v2::Protocol::Stream,
                addresses,
            )
            .build()
            .expect("writing a header into a Vec cannot fail")
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn addr(s: &str) -> SocketAddr {
        s.parse().unwrap()
    }

    #[test]
    fn v1_and_v2_round_trip() {
        for version in [Version::V1, Version::V2] {
            for (src, dst) in [
                (addr("198.51.100.7:40000"), addr("10.0.0.1:8443")),
                (addr("[2001:db8::7]:40000"), addr("[2001:db8::1]:8443")),
            ] {
                let mut bytes = encode(version, src, dst);
                let len = bytes.len();
                bytes.extend_from_slice(b"payload");
                assert_eq!(
                    parse(&bytes),
                    Ok(Parsed::Header {
                        len,
                        source: Some(src)
                    }),
                    "{version:?}"
                );
            }
        }
    }

    #[test]
    fn mixed_families_are_mapped() {
        let bytes = encode(Version::V1, addr("198.51.100.7:1"), addr("[::1]:2"));
        assert!(
            String::from_utf8(bytes)
                .unwrap()
                .starts_with("PROXY TCP6 ::ffff:198.51.100.7 ::1 1 2")
        );
    }

    #[test]
    fn partial_headers_wait_for_more_and_garbage_is_refused() {
        let full = encode(Version::V2, addr("198.51.100.7:1"), addr("10.0.0.1:2"));
        for cut in 1..full.len() {
            assert_eq!(parse(&full[..cut]), Ok(Parsed::Incomplete), "cut at {cut}");
        }
        let v1 = b"PROXY TCP4 198.51.100.7 10.0.0.1 1 2\r\n";
        for cut in 1..v1.len() {
            assert_eq!(parse(&v1[..cut]), Ok(Parsed::Incomplete), "cut at {cut}");
        }
        assert!(parse(b"GET / HTTP/1.1\r\n\r\n").is_err());
        assert!(parse(b"PROXY TCP4 999.1.1.1 10.0.0.1 1 2\r\n").is_err());
        assert!(parse(&[b'P'; MAX_HEADER]).is_err());
    }

    #[test]
    fn a_v1_line_with_a_stray_cr_or_lf_is_refused() {
        // Found by fuzzing: ppp measured this header one byte short of its CRLF.
        assert!(parse(b"PROXY UNKNOWN NOWN \n\r\r\nP \x0b\0\0\0N\r").is_err());
        assert!(parse(b"PROXY UNKNOWN\r\r\npayload").is_err());
    }

    #[test]
    fn local_and_unknown_headers_carry_no_source() {
        let local = v2::Builder::with_addresses(
            v2::Version::Two | v2::Command::Local,
            v2::Protocol::Stream,
            v2::Addresses::Unspecified,
        )
        .build()
        .unwrap();
        assert_eq!(
            parse(&local),
            Ok(Parsed::Header {
                len: local.len(),
                source: None
            })
        );
        let unknown = b"PROXY UNKNOWN\r\n";
        assert_eq!(
            parse(unknown),
            Ok(Parsed::Header {
                len: unknown.len(),
                source: None
            })
        );
    }
}
