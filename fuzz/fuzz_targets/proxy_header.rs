//! PROXY protocol v1/v2 header parsing (`relay_tunnel::proxyproto::parse`), the first bytes a
//! trusted load balancer — or anyone who reaches an `accept_proxy` port — sends.
#![no_main]

use libfuzzer_sys::fuzz_target;
use relay_tunnel::proxyproto::{MAX_HEADER, Parsed, parse};

fuzz_target!(|data: &[u8]| {
    match parse(data) {
        Ok(Parsed::Header { len, .. }) => {
            assert!(
                len <= data.len(),
                "header of {len} bytes in {} bytes",
                data.len()
            );
            assert!(len <= MAX_HEADER, "header of {len} bytes accepted");
            // The header alone parses to the same result.
            assert_eq!(
                parse(&data[..len]).map(|p| matches!(p, Parsed::Header { len: l, .. } if l == len)),
                Ok(true)
            );
        }
        Ok(Parsed::Incomplete) => {
            assert!(
                data.len() < MAX_HEADER,
                "{} bytes still incomplete",
                data.len()
            );
        }
        Err(_) => {}
    }
});
