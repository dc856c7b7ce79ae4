//! CONNECT authorities: `host:port` of an outbound session (`parse_destination`, checked by the
//! DMZ against `policy.connect_allow`) and `service:port` of an inbound session
//! (`parse_session_authority`, checked by the agent). The HTTP request head around them is
//! parsed by hyper and h2.
#![no_main]

use libfuzzer_sys::fuzz_target;
use relay_tunnel::protocol::{
    destination_authority, parse_destination, parse_session_authority, session_authority,
    valid_service_name,
};

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    if let Some((host, port)) = parse_destination(text) {
        assert!(port != 0);
        assert!(!host.is_empty() && host.len() <= 253);
        assert_eq!(host, host.to_ascii_lowercase());
        // What the agent writes for a parsed destination parses back to it.
        let again = destination_authority(&host, port);
        assert_eq!(parse_destination(&again), Some((host, port)), "{again:?}");
    }
    if let Some((service, port)) = parse_session_authority(text) {
        assert!(valid_service_name(service));
        // A session authority never names an address.
        assert!(service.parse::<std::net::IpAddr>().is_err());
        assert_eq!(
            parse_session_authority(&session_authority(service, port)),
            Some((service, port))
        );
    }
});
