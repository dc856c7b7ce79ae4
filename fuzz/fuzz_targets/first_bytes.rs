//! A partner's first bytes as the DMZ checks them (`relay_tunnel::first_bytes::inspect`): the
//! TLS ClientHello of SNI routing (through rustls' `Acceptor`), the SSH and HTTP gates; and a
//! server-name pattern parsed from the same input.
#![no_main]

use libfuzzer_sys::fuzz_target;
use relay_tunnel::first_bytes::{Expect, LIMIT, NamePattern, Sniffed, inspect, route};

fuzz_target!(|data: &[u8]| {
    let data = &data[..data.len().min(LIMIT)];
    for expect in [Expect::Tls, Expect::Ssh, Expect::Http] {
        match inspect(expect, data) {
            Sniffed::Pass { server_name } => {
                // A verdict does not change when more bytes follow.
                let mut more = data.to_vec();
                more.extend_from_slice(b"more");
                if more.len() <= LIMIT {
                    assert_eq!(
                        inspect(expect, &more),
                        Sniffed::Pass { server_name: server_name.clone() },
                        "{expect}: more bytes changed the verdict"
                    );
                }
                let patterns: Vec<NamePattern> = ["*.example.com", "a.example.com", "*"]
                    .iter()
                    .map(|p| p.parse().expect("pattern"))
                    .collect();
                let routes = [(&patterns[..1], 1), (&patterns[1..2], 2), (&patterns[2..], 3)];
                assert!(route(routes, server_name.as_deref()).is_some(), "the default routes all");
            }
            Sniffed::More => assert!(data.len() < LIMIT, "{expect}: still undecided at the limit"),
            Sniffed::Fail(_) => {}
        }
    }
    if let Ok(text) = std::str::from_utf8(data)
        && let Ok(pattern) = text.parse::<NamePattern>()
    {
        // Display gives back a pattern that parses to the same one.
        assert_eq!(pattern.to_string().parse::<NamePattern>(), Ok(pattern));
    }
});
