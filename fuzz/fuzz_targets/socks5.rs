//! SOCKS5 greeting and CONNECT request parsing (`relay_internal::socks5`), what a trading
//! engine sends the agent's outbound proxy port.
#![no_main]

use libfuzzer_sys::fuzz_target;
use relay_internal::socks5::{parse_greeting, parse_request};

fuzz_target!(|data: &[u8]| {
    if let Ok(Some(n)) = parse_greeting(data) {
        assert!(n <= data.len());
    }
    if let Ok(Some((n, host, _port))) = parse_request(data) {
        assert!(n <= data.len());
        assert!(!host.is_empty());
    }
});
