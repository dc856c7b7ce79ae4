//! Property tests of the wire parsers: arbitrary input never panics, and what we encode we
//! parse back.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

use proptest::prelude::*;
use relay_tunnel::config::{AddrRule, ConnectRule, ListenSpec, PortRange, TargetSpec};
use relay_tunnel::protocol::{self, AgentMessage, DmzMessage, Registration, ServiceDecl};
use relay_tunnel::proxyproto::{self, Parsed, Version};

fn socket_addr() -> impl Strategy<Value = SocketAddr> {
    prop_oneof![
        (any::<[u8; 4]>(), any::<u16>())
            .prop_map(|(ip, port)| SocketAddr::new(IpAddr::V4(Ipv4Addr::from(ip)), port)),
        (any::<[u8; 16]>(), any::<u16>())
            .prop_map(|(ip, port)| SocketAddr::new(IpAddr::V6(Ipv6Addr::from(ip)), port)),
    ]
}

proptest! {
    #[test]
    fn proxy_headers_round_trip(src in socket_addr(), dst in socket_addr(), v2 in any::<bool>(), tail in proptest::collection::vec(any::<u8>(), 0..64)) {
        let version = if v2 { Version::V2 } else { Version::V1 };
        let mut bytes = proxyproto::encode(version, src, dst);
        let len = bytes.len();
        bytes.extend_from_slice(&tail);
        match proxyproto::parse(&bytes) {
            Ok(Parsed::Header { len: parsed_len, source: Some(source) }) => {
                prop_assert_eq!(parsed_len, len);
                // Mixed families are mapped into IPv6; the address stays the same.
                let same = match (source.ip(), src.ip()) {
                    (IpAddr::V6(a), IpAddr::V4(b)) => a.to_ipv4_mapped() == Some(b),
                    (a, b) => a == b,
                };
                prop_assert!(same && source.port() == src.port());
            }
            other => prop_assert!(false, "unexpected {:?}", other),
        }
    }

    #[test]
    fn proxy_parser_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..2048)) {
        let _ = proxyproto::parse(&bytes);
    }

    #[test]
    fn proxy_parser_never_panics_on_header_like_input(tail in proptest::collection::vec(any::<u8>(), 0..600)) {
        let mut v2 = b"\\r\\n\\r\\n\\0\\r\\nQUIT\\n".to_vec();
        v2.extend_from_slice(&tail);
        let _ = proxyproto::parse(&v2);
        let mut v1 = b"PROXY ".to_vec();
        v1.extend_from_slice(&tail);
        let _ = proxyproto::parse(&v1);
    }

    #[test]
    fn control_and_registration_decoders_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..512)) {
        let _ = protocol::decode::<Registration>(&bytes);
        let _ = protocol::decode::<AgentMessage>(&bytes);
        let _ = protocol::decode::<DmzMessage>(&bytes);
        if bytes.len() >= 4 {
            let _ = protocol::decode_len(bytes[..4].try_into().unwrap());
        }
    }

    #[test]
    fn registrations_round_trip(name in "[a-z][a-z0-9._-]{0,20}", port in 1u16.., allow in proptest::collection::vec("[0-9]{1,3}\\\\.[0-9]{1,3}\\\\.0\\\\.0/16", 0..4), accept_proxy in any::<bool>()) {
        let reg = Registration {
            instance: "x".into(),
            services: vec![ServiceDecl { name, listen: format!("0.0.0.0:{port}"), allow, accept_proxy, ..Default::default() }],
        };
        let framed = protocol::encode(&reg);
        prop_assert_eq!(protocol::decode::<Registration>(&framed[4..]).unwrap(), reg);
    }

    #[test]
    fn authorities_and_destinations_never_panic(s in "\\\\PC{0,80}") {
        let _ = protocol::parse_session_authority(&s);
        let _ = protocol::parse_destination(&s);
        let _ = s.parse::<ListenSpec>();
        let _ = s.parse::<TargetSpec>();
        let _ = s.parse::<AddrRule>();
        let _ = s.parse::<ConnectRule>();
        let _ = s.parse::<PortRange>();
        let _ = relay_tunnel::config::parse_duration(&s);
    }

    #[test]
    fn listen_specs_round_trip(addr in socket_addr(), extra in 0u16..100) {
        prop_assume!(addr.port() > 0);
        let last = addr.port().saturating_add(extra);
        let text = match addr.ip() {
            IpAddr::V4(ip) => format!("{ip}:{}-{last}", addr.port()),
            IpAddr::V6(ip) => format!("[{ip}]:{}-{last}", addr.port()),
        };
        let spec: ListenSpec = text.parse().unwrap();
        prop_assert_eq!(spec.ip, addr.ip());
        prop_assert_eq!(spec.ports.len(), usize::from(last - addr.port()) + 1);
        prop_assert_eq!(spec.to_string().parse::<ListenSpec>().unwrap(), spec);
    }
}
