//! SOCKS5 (RFC 1928) without authentication, CONNECT only: pure parsers over buffers.

/// Protocol version byte.
pub const VERSION: u8 = 5;

/// Reply codes.
pub mod reply {
    /// Succeeded.
    pub const OK: u8 = 0;
    /// General failure.
    pub const FAILURE: u8 = 1;
    /// Connection not allowed by ruleset.
    pub const NOT_ALLOWED: u8 = 2;
    /// Host unreachable.
    pub const HOST_UNREACHABLE: u8 = 4;
    /// Connection refused.
    pub const REFUSED: u8 = 5;
    /// Command not supported.
    pub const COMMAND_NOT_SUPPORTED: u8 = 7;
    /// Address type not supported.
    pub const ADDRESS_NOT_SUPPORTED: u8 = 8;
}

/// A malformed or unsupported SOCKS5 message, with the reply code to send if any.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Socks5Error {
    /// Not SOCKS version 5.
    #[error("not SOCKS5 (version byte {0})")]
    Version(u8),
    /// The client offers no "no authentication" method.
    #[error("client offers no acceptable authentication method")]
    NoAcceptableMethod,
    /// A command other than CONNECT.
    #[error("unsupported command {0}")]
    Command(u8),
    /// An unknown address type.
    #[error("unsupported address type {0}")]
    AddressType(u8),
    /// A malformed domain name.
    #[error("invalid domain name")]
    Domain,
}

impl Socks5Error {
    /// The reply code to send before closing, if the exchange reached the request.
    pub fn reply_code(&self) -> Option<u8> {
        match self {
            Socks5Error::Command(_) => Some(reply::COMMAND_NOT_SUPPORTED),
            Socks5Error::AddressType(_) => Some(reply::ADDRESS_NOT_SUPPORTED),
            Socks5Error::Domain => Some(reply::FAILURE),
            Socks5Error::Version(_) | Socks5Error::NoAcceptableMethod => None,
        }
    }
}

/// Parses the greeting; `Ok(None)` while more bytes are needed, else the bytes consumed.
pub fn parse_greeting(buf: &[u8]) -> Result<Option<usize>, Socks5Error> {
    let [version, n, ..] = buf else {
        return Ok(None);
    };
    if *version != VERSION {
        return Err(Socks5Error::Version(*version));
    }
    let len = 2 + usize::from(*n);
    if buf.len() < len {
        return Ok(None);
    }
    if !buf[2..len].contains(&0) {
        return Err(Socks5Error::NoAcceptableMethod);
    }
    Ok(Some(len))
}

/// Parses a CONNECT request; `Ok(None)` while more bytes are needed, else the bytes consumed
/// and the destination as `(host, port)`.
pub fn parse_request(buf: &[u8]) -> Result<Option<(usize, String, u16)>, Socks5Error> {
    let [version, command, _reserved, atyp, rest @ ..] = buf else {
        return Ok(None);
    };
    if *version != VERSION {
        return Err(Socks5Error::Version(*version));
    }
    if *command != 1 {
        return Err(Socks5Error::Command(*command));
    }
    let (host, addr_len) = match *atyp {
        1 => {
            let Some(b) = rest.get(..4) else {
                return Ok(None);
            };
            (
                std::net::Ipv4Addr::new(b[0], b[1], b[2], b[3]).to_string(),
                4,
            )
        }
        4 => {
            let Some(b) = rest.get(..16) else {
                return Ok(None);
            };
            let octets: [u8; 16] = b.try_into().expect("16 bytes");
            (std::net::Ipv6Addr::from(octets).to_string(), 16)
        }
        3 => {
            let Some(&n) = rest.first() else {
                return Ok(None);
            };
            let Some(name) = rest.get(1..1 + usize::from(n)) else {
                return Ok(None);
            };
            let name = std::str::from_utf8(name).map_err(|_| Socks5Error::Domain)?;
            if name.is_empty()
                || !name
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'-' | b'_'))
            {
                return Err(Socks5Error::Domain);
            }
            (name.to_owned(), 1 + usize::from(n))
        }
        other => return Err(Socks5Error::AddressType(other)),
    };
    let Some(port) = rest.get(addr_len..addr_len + 2) else {
        return Ok(None);
    };
    let port = u16::from_be_bytes([port[0], port[1]]);
    Ok(Some((4 + addr_len + 2, host, port)))
}

/// The reply to a request: code, then an unspecified IPv4 bound address.
pub fn reply(code: u8) -> [u8; 10] {
    [VERSION, code, 0, 1, 0, 0, 0, 0, 0, 0]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn greetings_need_no_auth() {
        assert_eq!(parse_greeting(&[5]), Ok(None));
        assert_eq!(parse_greeting(&[5, 2, 2]), Ok(None));
        assert_eq!(parse_greeting(&[5, 2, 2, 0]), Ok(Some(4)));
        assert_eq!(
            parse_greeting(&[5, 1, 2]),
            Err(Socks5Error::NoAcceptableMethod)
        );
        assert_eq!(parse_greeting(&[4, 1, 0]), Err(Socks5Error::Version(4)));
    }

    #[test]
    fn requests_carry_ipv4_ipv6_and_names() {
        let v4 = [5, 1, 0, 1, 127, 0, 0, 1, 0x1f, 0x90];
        assert_eq!(parse_request(&v4), Ok(Some((10, "127.0.0.1".into(), 8080))));
        for cut in 0..v4.len() {
            assert_eq!(parse_request(&v4[..cut]), Ok(None));
        }
        let mut v6 = vec![5, 1, 0, 4];
        v6.extend_from_slice(&std::net::Ipv6Addr::LOCALHOST.octets());
        v6.extend_from_slice(&443u16.to_be_bytes());
        assert_eq!(parse_request(&v6), Ok(Some((22, "::1".into(), 443))));
        let mut name = vec![5, 1, 0, 3, 11];
        name.extend_from_slice(b"example.com");
        name.extend_from_slice(&80u16.to_be_bytes());
        assert_eq!(
            parse_request(&name),
            Ok(Some((18, "example.com".into(), 80)))
        );
    }

    #[test]
    fn unsupported_requests_get_their_reply_codes() {
        assert_eq!(
            parse_request(&[5, 2, 0, 1]).unwrap_err().reply_code(),
            Some(reply::COMMAND_NOT_SUPPORTED)
        );
        assert_eq!(
            parse_request(&[5, 1, 0, 9]).unwrap_err().reply_code(),
            Some(reply::ADDRESS_NOT_SUPPORTED)
        );
        assert_eq!(
            parse_request(&[5, 1, 0, 3, 1, b' ', 0, 80]),
            Err(Socks5Error::Domain)
        );
        assert_eq!(
            parse_request(&[5, 1, 0, 3, 0, 0, 80]),
            Err(Socks5Error::Domain)
        );
    }
}
